"""Serve an ASGI app (the emulators, the local host) with uvicorn, in a thread (tests) or the main process."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn

from .tls import TlsMaterial

__all__ = ["RunningServer", "free_port", "serve", "serve_in_thread"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(app: Any, host: str, port: int, tls: TlsMaterial | None, **kw: Any) -> uvicorn.Config:
    extra: dict[str, Any] = {}
    if tls is not None:
        extra = {"ssl_certfile": str(tls.server_cert), "ssl_keyfile": str(tls.server_key)}
    return uvicorn.Config(
        app, host=host, port=port, log_level=kw.pop("log_level", "warning"), access_log=False,
        lifespan=kw.pop("lifespan", "auto"), timeout_keep_alive=kw.pop("timeout_keep_alive", 30),
        **extra, **kw,
    )


@dataclass
class RunningServer:
    server: uvicorn.Server
    thread: threading.Thread
    host: str
    port: int
    scheme: str

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        # force_exit: don't wait for idle keep-alive connections (msal's requests pool keeps one open),
        # which would otherwise hold the stop for the whole join timeout.
        self.server.force_exit = True
        self.server.should_exit = True
        self.thread.join(timeout)


def start_in_thread(
    app: Any, *, host: str = "127.0.0.1", port: int = 0, tls: TlsMaterial | None = None, **kw: Any
) -> RunningServer:
    port = port or free_port()
    server = uvicorn.Server(_config(app, host, port, tls, **kw))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # not the main thread

    def _run() -> None:
        asyncio.run(server.serve())

    thread = threading.Thread(target=_run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"server on port {port} failed to start")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"server on port {port} did not start within 20 s")
        time.sleep(0.01)
    return RunningServer(server, thread, host, port, "https" if tls else "http")


@contextlib.contextmanager
def serve_in_thread(
    app: Any, *, host: str = "127.0.0.1", port: int = 0, tls: TlsMaterial | None = None, **kw: Any
) -> Iterator[RunningServer]:
    running = start_in_thread(app, host=host, port=port, tls=tls, **kw)
    try:
        yield running
    finally:
        running.stop()


def serve(app: Any, *, host: str = "127.0.0.1", port: int, tls: TlsMaterial | None = None, **kw: Any) -> None:
    """Run in the foreground until SIGINT/SIGTERM (uvicorn handles the signals)."""
    uvicorn.Server(_config(app, host, port, tls, **kw)).run()
