"""The host: wires indexing, the HTTP front, queue listeners and timers, and shuts them down cleanly.

Shutdown (SIGTERM / Ctrl-C): stop polling queues and firing timers, stop accepting HTTP, let
in-flight invocations finish within the grace period; queue messages still running after it are made
visible again (never deleted) and the process exits. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import uvicorn
from azure.functions.queue import QueueMessage as FunctionsQueueMessage

from .config import HostConfig
from .discovery import FunctionSpec, HttpTriggerSpec, QueueTriggerSpec, TimerTriggerSpec, TriggerKind
from .http import build_app
from .invoke import Invoker
from .keys import HostKeys
from .queues import QueueListener, QueueOutputWriter, StorageClients
from .timers import TimerRunner

__all__ = ["FunctionsHost", "HostOptions", "PortInUseError"]

log = logging.getLogger("Host")


class PortInUseError(OSError):
    pass


@dataclass(frozen=True)
class HostOptions:
    script_root: Path
    port: int = 7071
    bind: str = "127.0.0.1"
    grace: float = 10.0  # seconds in-flight invocations get at shutdown
    max_threads: int | None = None  # sync functions' pool (None: Python's default, like the worker)


class _Server(uvicorn.Server):
    """uvicorn inside our loop: signals are ours (we must drain triggers before HTTP stops)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortInUseError(f"cannot listen on {host}:{port}: {exc.strerror} (is another host running?)") from exc
    sock.listen(512)
    sock.set_inheritable(True)
    return sock


class FunctionsHost:
    def __init__(
        self,
        options: HostOptions,
        config: HostConfig,
        keys: HostKeys,
        functions: list[FunctionSpec],
        errors: dict[str, str] | None = None,
    ) -> None:
        self.options = options
        self.config = config
        self.keys = keys
        self.functions = functions
        self.errors = errors or {}
        self.started = False
        self.accepting = False
        self._t0 = time.monotonic()
        self._stop = asyncio.Event()
        self._storage = StorageClients()
        self._outputs = QueueOutputWriter(self._storage, config.queues)
        self.invoker = Invoker(
            script_root=str(options.script_root),
            write_output=self._outputs.write,
            function_timeout=config.function_timeout,
            max_threads=options.max_threads,
        )
        self._listeners: list[QueueListener] = []
        self._timers: dict[str, TimerRunner] = {}
        self._adhoc: set[asyncio.Task[Any]] = set()
        self._signals = 0

    # ------------------------------------------------------------------ introspection (admin API)

    def describe(self, spec: FunctionSpec) -> dict[str, Any]:
        info: dict[str, Any] = {"name": spec.name, "trigger": str(spec.kind), "isAsync": spec.is_async}
        t = spec.trigger
        if isinstance(t, HttpTriggerSpec):
            info |= {"route": t.route.template, "methods": sorted(t.methods or []), "authLevel": t.auth_level}
        elif isinstance(t, QueueTriggerSpec):
            info |= {"queueName": t.queue_name, "connection": t.connection}
        elif isinstance(t, TimerTriggerSpec):
            info |= {"schedule": t.schedule.expression, "runOnStartup": t.run_on_startup}
        info["outputs"] = [{"name": o.name, "type": o.type, "queueName": o.queue_name} for o in spec.outputs]
        return info

    def status(self) -> dict[str, Any]:
        try:
            lib = metadata.version("azure-functions")
        except metadata.PackageNotFoundError:
            lib = "unknown"
        return {
            "id": f"local-{socket.gethostname()}".lower(),
            "state": "Running" if self.started and self.accepting else ("Stopping" if self.started else "Initialized"),
            "version": f"local-host (azure-functions {lib})",
            "processUptime": int((time.monotonic() - self._t0) * 1000),
            "functions": [f.name for f in self.functions],
            "errors": dict(self.errors),
            "inFlight": self.invoker.in_flight,
        }

    # ------------------------------------------------------------------ on-demand runs

    def run_now(self, spec: FunctionSpec, text: str) -> None:
        """Invoke a non-HTTP function outside its trigger (like POST /admin/functions/{name})."""
        if spec.kind == TriggerKind.TIMER:
            coro = self._timers[spec.name].run_now()
        else:
            now = dt.datetime.now(dt.UTC)
            message = FunctionsQueueMessage(
                id=str(uuid.uuid4()), body=text.encode("utf-8"), dequeue_count=1,
                insertion_time=now, expiration_time=now + dt.timedelta(days=7), time_next_visible=now,
                pop_receipt=None,
            )
            coro = self.invoker.invoke(spec, message, reason=HTTP_ADMIN_REASON)
        task = asyncio.get_running_loop().create_task(coro)
        self._adhoc.add(task)
        task.add_done_callback(self._adhoc.discard)

    # ------------------------------------------------------------------ lifecycle

    def request_stop(self) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("Second stop request: exiting without waiting")
            raise SystemExit(130)
        log.info("Stopping the host (grace %.0fs)...", self.options.grace)
        self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal)
        sock = bind_socket(self.options.bind, self.options.port)
        server = _Server(
            uvicorn.Config(
                build_app(self), log_level="warning", access_log=False, lifespan="off",
                timeout_graceful_shutdown=max(1, int(self.options.grace)), timeout_keep_alive=5,
            )
        )
        server_task: asyncio.Task[None] | None = None
        try:
            for spec in list(self.functions):
                if spec.kind == TriggerKind.QUEUE:
                    listener = QueueListener(spec, self._storage, self.config.queues, self.invoker)
                    try:
                        await listener.start()
                    except Exception as exc:
                        # Like the real host: the function is in error, the others still run.
                        self.errors[spec.name] = f"queue listener could not start: {exc}"
                        self.functions.remove(spec)
                        log.error("Function '%s' cannot run: %s", spec.name, exc)
                        continue
                    self._outputs.watch(listener.queue, listener)
                    self._listeners.append(listener)
            server_task = asyncio.create_task(server.serve(sockets=[sock]), name="http")
            while not server.started:
                if server_task.done():
                    server_task.result()
                    raise RuntimeError("HTTP server stopped during startup")
                await asyncio.sleep(0.02)
            self.accepting = True
            for spec in self.functions:
                if spec.kind == TriggerKind.TIMER:
                    runner = TimerRunner(spec, self.invoker)
                    self._timers[spec.name] = runner
                    runner.start()
            self.started = True
            self._announce()
            await self._stop.wait()
        finally:
            await self._shutdown(server, server_task)
            sock.close()
        return 0

    def _on_signal(self) -> None:
        try:
            self.request_stop()
        except SystemExit:
            # Raised from a signal callback SystemExit would only be logged by the loop; leave hard.
            import os

            logging.shutdown()
            os._exit(130)

    async def _shutdown(self, server: uvicorn.Server, server_task: asyncio.Task[None] | None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.grace
        self.accepting = False
        for listener in self._listeners:
            listener.stop_polling()
        for runner in self._timers.values():
            runner.stop()
        server.should_exit = True
        await asyncio.gather(
            *(listener.drain(deadline) for listener in self._listeners),
            *(runner.drain(deadline) for runner in self._timers.values()),
            return_exceptions=True,
        )
        if self._adhoc:
            _, pending = await asyncio.wait(set(self._adhoc), timeout=max(0.0, deadline - loop.time()))
            for task in pending:
                task.cancel()
        if server_task is not None:
            # uvicorn itself waits for in-flight requests up to timeout_graceful_shutdown.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(server_task, self.options.grace + 5)
        self.invoker.shutdown()
        self._storage.close()
        log.info("Host stopped")

    def _announce(self) -> None:
        base = f"http://{self.options.bind}:{self.options.port}"
        lines = ["", "Functions:", ""]
        for spec in self.functions:
            t = spec.trigger
            if isinstance(t, HttpTriggerSpec):
                methods = ",".join(sorted(t.methods)) if t.methods else "ALL"
                prefix = f"/{self.config.route_prefix}" if self.config.route_prefix else ""
                lines.append(f"        {spec.name}: [{methods}] {base}{prefix}/{t.route.template}")
            else:
                lines.append(f"        {spec.name}: {spec.kind}")
            lines.append("")
        for name, error in self.errors.items():
            lines.append(f"        {name}: ERROR {error}")
        log.info("\n".join(lines))
        log.info("Host started on %s (%d functions, %d errors)", base, len(self.functions), len(self.errors))


HTTP_ADMIN_REASON = "This function was programmatically called via the host APIs."
