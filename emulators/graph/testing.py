"""Start the Graph emulator in-process for tests: HTTPS on a free loopback port, SQLite in memory."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from emulators.common.server import RunningServer, free_port, start_in_thread
from emulators.common.tls import ensure_tls

from .app import GraphEmulator, create_app
from .config import GraphConfig
from .store import Store

__all__ = ["RunningGraph", "WebhookReceiver", "start_graph", "start_webhook_receiver"]


@dataclass
class RunningGraph:
    server: RunningServer
    emulator: GraphEmulator

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def base_url(self) -> str:
        return f"{self.server.url}/v1.0"

    @property
    def smtp_port(self) -> int | None:
        return self.emulator.smtp.port if self.emulator.smtp is not None else None

    @property
    def store(self) -> Store:
        return self.emulator.store

    def stop(self) -> None:
        # force_exit: do not wait for idle keep-alive TLS clients (same reasoning as the identity helper)
        self.server.server.force_exit = True
        self.server.stop()
        self.emulator.stop()
        self.emulator.mail.close()


def start_graph(tls_dir: Path, identity_url: str, seed: dict[str, Any] | None = None, smtp: bool = True,
                **options: Any) -> RunningGraph:
    """Serve a fresh emulator; ``options`` are :class:`GraphConfig` fields (e.g. ``missed_after_s=0.5``).

    ``seed=None`` = the demo seed. Clients must trust ``ensure_tls(tls_dir).bundle``. Call ``.stop()``.
    """
    tls = ensure_tls(tls_dir)
    options.setdefault("ca_bundle", str(tls.bundle))
    config = GraphConfig(identity_url=identity_url, seed=seed, smtp_port=free_port() if smtp else None, **options)
    emulator = GraphEmulator(config)
    emulator.start()
    server = start_in_thread(create_app(config, emulator), tls=tls, lifespan="off")
    return RunningGraph(server, emulator)


@dataclass
class WebhookReceiver:
    """A notification endpoint for tests: answers validation handshakes, records every POST.

    ``notifications``: the items of change-notification POSTs to ``/notify``; ``lifecycle``: items POSTed to
    ``/lifecycle``; ``posts``: (path, query, body) of every non-validation POST. ``status`` is what
    notification POSTs get (set 500 to make the emulator retry); ``validation_mode`` = "ok" | "forbidden" |
    "encoded" | "slow" (sleeps ``slow_s``) controls the handshake answer.
    """

    server: RunningServer | None = None
    notifications: list[dict[str, Any]] = field(default_factory=list)
    lifecycle: list[dict[str, Any]] = field(default_factory=list)
    validations: list[str] = field(default_factory=list)
    posts: list[tuple[str, str, Any]] = field(default_factory=list)
    status: int = 202
    validation_mode: str = "ok"
    slow_s: float = 0.0
    notify_delay_s: float = 0.0  # each notification/lifecycle POST is answered this late (slow endpoints)
    validations_in_flight: int = 0
    max_validations_in_flight: int = 0  # the most validation handshakes this endpoint served at once
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def wait_for(self, predicate: Callable[[WebhookReceiver], bool], timeout: float = 20.0) -> bool:
        """Poll until ``predicate(self)`` holds (generous deadlines; never a timing assertion)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if predicate(self):
                    return True
            time.sleep(0.02)
        with self.lock:
            return predicate(self)

    def clear(self) -> None:
        with self.lock:
            self.notifications.clear()
            self.lifecycle.clear()
            self.validations.clear()
            self.posts.clear()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def start_webhook_receiver() -> WebhookReceiver:
    receiver = WebhookReceiver()

    async def answer_validation(token: str) -> Response:
        mode = receiver.validation_mode
        if mode == "forbidden":
            return Response(status_code=403)
        if mode == "encoded":
            from urllib.parse import quote

            return PlainTextResponse(quote(token, safe=""))
        # let concurrent handshakes overlap (the in-flight count is what a pacing test reads)
        await asyncio.sleep(receiver.slow_s if mode == "slow" else 0.01)
        return PlainTextResponse(token)

    async def endpoint(request: Request) -> Response:
        token = request.query_params.get("validationToken")
        if token is not None:
            with receiver.lock:
                receiver.validations.append(token)
                receiver.validations_in_flight += 1
                receiver.max_validations_in_flight = max(receiver.max_validations_in_flight,
                                                         receiver.validations_in_flight)
            try:
                return await answer_validation(token)
            finally:
                with receiver.lock:
                    receiver.validations_in_flight -= 1
        body = json.loads(await request.body() or b"{}")
        if receiver.notify_delay_s:
            await asyncio.sleep(receiver.notify_delay_s)
        with receiver.lock:
            receiver.posts.append((request.url.path, request.url.query, body))
            target = receiver.lifecycle if request.url.path.endswith("/lifecycle") else receiver.notifications
            if receiver.status < 300:
                target.extend(body.get("value", []))
        return Response(status_code=receiver.status)

    app = Starlette(routes=[Route("/notify", endpoint, methods=["POST"]),
                            Route("/lifecycle", endpoint, methods=["POST"])])
    receiver.server = start_in_thread(app, lifespan="off")
    return receiver
