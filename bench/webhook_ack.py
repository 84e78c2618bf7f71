"""Webhook acknowledgement: a burst of Graph change notifications at a fixed rate against the webhook HTTP trigger
served by the local Functions host, with Azurite behind it (subscription lookup + enqueue on every request).

Open-loop: request i is due at t0 + i/rate whatever happened before, and its latency is counted from that due
time (so a stalled server cannot hide queueing behind a slower client: no coordinated omission). A small
keep-alive HTTP/1.1 client on asyncio streams keeps the load generator cheap on 2 cores. Bounded: the request
count is rate x duration and a hard wall-clock cap stops everything.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.metrics import Metric, not_measured, summarise_ms
from emulators.common import demo
from local.stack import Stack, StackError

NAME_P99 = "webhook ack at 500/s: p99"
NAME_P50 = "webhook ack at 500/s: p50"
NAME_ERR = "webhook ack at 500/s: errors"


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def post(self, host: str, path: str, body: bytes) -> int:
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("connection closed")
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if length:
            await self.reader.readexactly(length)
        return status


async def _open(port: int) -> _Conn:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return _Conn(reader, writer)


async def run_load(port: int, path: str, make_body: Callable[[int], bytes], *, rate: float, duration: float,
                   connections: int = 48, cap_s: float = 60.0,
                   on_progress: Callable[[int], Awaitable[None]] | None = None) -> dict[str, Any]:
    total = int(rate * duration)
    latencies: list[float] = []
    service: list[float] = []
    errors: dict[str, int] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    t0 = time.perf_counter() + 0.2

    async def scheduler() -> None:
        for i in range(total):
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            queue.put_nowait(i)
        for _ in range(connections):
            queue.put_nowait(-1)

    async def worker() -> None:
        conn: _Conn | None = None
        while True:
            i = await queue.get()
            if i < 0:
                break
            due = t0 + i / rate
            sent = time.perf_counter()
            try:
                if conn is None:
                    conn = await _open(port)
                status = await asyncio.wait_for(conn.post(f"127.0.0.1:{port}", path, make_body(i)), 10)
            except (TimeoutError, OSError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                if conn is not None:
                    conn.writer.close()
                conn = None
                continue
            done = time.perf_counter()
            latencies.append(done - due)
            service.append(done - sent)
            if status != 202:
                errors[f"HTTP {status}"] = errors.get(f"HTTP {status}", 0) + 1
        if conn is not None:
            conn.writer.close()

    started = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(scheduler(), *(worker() for _ in range(connections))), cap_s)
    except TimeoutError:
        errors["wall-clock cap reached"] = 1
    elapsed = time.perf_counter() - started
    return {"requests": total, "completed": len(latencies), "elapsed_s": round(elapsed, 2),
            "achieved_rate": round(len(latencies) / max(elapsed - 0.2, 1e-9), 1), "errors": errors,
            "latency_ms": summarise_ms(latencies), "service_ms": summarise_ms(service)}


def _notification_body(sub_id: str, client_state: str) -> Callable[[int], bytes]:
    def make(i: int) -> bytes:
        return json.dumps({"value": [{
            "subscriptionId": sub_id, "clientState": client_state, "tenantId": demo.TENANT_ID,
            "changeType": "created", "subscriptionExpirationDateTime": "2030-01-01T00:00:00Z",
            "resource": f"Users/{uuid.UUID(int=i)}/Messages/AAMk{i}",
            "resourceData": {"@odata.type": "#Microsoft.Graph.Message", "id": f"AAMkAGI2-bench-{i:08d}"}}]}).encode()
    return make


async def _seed(connection_string: str, prefix: str) -> tuple[str, str]:
    from core.adapters.state import SubscriptionRecord
    from core.bootstrap import Container
    from core.config import Settings

    container = Container(Settings(env={"AzureWebJobsStorage": connection_string, "TABLE_PREFIX": prefix,
                                        "GRAPH_TENANT_ID": demo.TENANT_ID}))
    record = SubscriptionRecord(id=str(uuid.uuid4()), mailbox="alice@contoso.example", folder="inbox",
                                client_state="cs-" + uuid.uuid4().hex * 2, tenant_id=demo.TENANT_ID,
                                resource="users/alice@contoso.example/mailFolders('inbox')/messages",
                                expires=datetime.now(UTC) + timedelta(days=2))
    await container.subscription_directory.put(record)
    await container.storage.close()
    return record.id, record.client_state


def _queued(connection_string: str) -> int | None:
    from azure.storage.queue import QueueClient

    from core.names import INBOUND_QUEUE

    try:
        q = QueueClient.from_connection_string(connection_string, INBOUND_QUEUE)
        return int(q.get_queue_properties().approximate_message_count)
    except Exception:  # informative only
        return None


def measure(*, rate: float = 500.0, duration: float = 5.0) -> list[Metric]:
    label = f"{rate:.0f}/s for {duration:.0f} s"
    from local.azurite import start_azurite

    work = Path(tempfile.mkdtemp(prefix="bench-webhook-"))
    azurite = start_azurite()
    host = None
    try:
        prefix = "bench" + uuid.uuid4().hex[:8]
        sub_id, client_state = asyncio.run(_seed(azurite.connection_string, prefix))
        # Every notification names the same subscription: with the hot-mailbox switch on, all but the first 600 of a
        # minute would become one delta request instead of an enqueue each. The row measures the enqueue path.
        values = {"AzureWebJobsStorage": azurite.connection_string, "TABLE_PREFIX": prefix,
                  "GRAPH_TENANT_ID": demo.TENANT_ID, "HOT_MAILBOX_NOTIFICATIONS_PER_MINUTE": "0"}
        # Only the webhook runs: the queue processors would otherwise pick up every enqueued item (and fail
        # without Graph) on the same 2 cores, and timers would fire mid-run.
        from bench.pipeline import _indexed_bindings

        others = sorted({name for name, _, _ in _indexed_bindings()} - {"graph_notifications", "health"})
        values.update({f"AzureWebJobs.{name}.Disabled": "true" for name in others})
        try:
            host = Stack(work, services=["functions"], host_values=values, host_grace=5).start()
        except StackError as exc:
            reason = f"local host did not start: {str(exc).splitlines()[0]}"
            return [not_measured(NAME_P99, "ms", 100, reason, error=True),
                    not_measured(NAME_ERR, "errors", 0, reason, "==", error=True)]
        path = f"/api/graph/notifications?code={host.function_key}"
        make = _notification_body(sub_id, client_state)
        # Warm-up: first calls build the container, the storage clients and the subscription cache.
        asyncio.run(run_load(host.ports.functions, path, make, rate=50, duration=1, connections=4, cap_s=30))
        before = _queued(azurite.connection_string)
        result = asyncio.run(run_load(host.ports.functions, path, make, rate=rate, duration=duration,
                                      cap_s=duration * 4 + 30))
        after = _queued(azurite.connection_string)
    finally:
        if host is not None:
            host.stop()
        azurite.stop()
    lat = result["latency_ms"]
    n_errors = sum(result["errors"].values()) + (result["requests"] - result["completed"]
                                                 - sum(v for k, v in result["errors"].items()
                                                       if not k.startswith("HTTP")))
    enqueued = (after - before) if after is not None and before is not None else None
    detail = (f"local Functions host (other functions disabled, hot-mailbox switch off) + Azurite, {label}, "
              f"{result['completed']}/{result['requests']} answered, "
              f"achieved {result['achieved_rate']}/s, enqueued {enqueued}; latency from each request's due time")
    extra = {**result, "enqueued": enqueued, "source": "local Functions host (python -m local.host)"}
    if not lat:
        return [not_measured(NAME_P99, "ms", 100, "no request completed: " + json.dumps(result["errors"]),
                             error=True)]
    return [
        Metric(NAME_P50, round(lat["p50"], 1), "ms", None, detail=detail, extra=extra),
        Metric(NAME_P99, round(lat["p99"], 1), "ms", 100, detail=f"max {lat['max']:.0f} ms; service-time p99 "
               f"{result['service_ms']['p99']:.1f} ms"),
        Metric(NAME_ERR, float(max(n_errors, 0)), "errors", 0, "==",
               detail=", ".join(f"{k}: {v}" for k, v in result["errors"].items()) or "none"),
    ]
