"""The local Functions host, run as a subprocess against Azurite with the fixture app tests/fixtures/hostapp.

Everything is observed from outside, as a developer would: HTTP responses, queue contents and the
events the fixture functions append to a file. Waits are polls with generous deadlines.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
import requests
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.queue import QueueClient, TextBase64EncodePolicy

from local.azurite import Azurite
from local.host.config import HostConfigError, load_host_json, parse_timespan
from local.host.discovery import FunctionSpec, TimerTriggerSpec, TriggerKind
from local.host.invoke import InvocationResult
from local.host.routes import compile_route
from local.host.schedule import ScheduleError, parse_schedule
from local.host.timers import TimerRunner

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
APP_DIR = ROOT / "tests" / "fixtures" / "hostapp"
MASTER, HOST_KEY, FUNCTION_KEY = "test-master-key", "test-host-key", "test-hello-key"
DEADLINE = 60.0

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], what: str, timeout: float = DEADLINE, host: HostProcess | None = None) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    tail = host.log_tail() if host else ""
    raise AssertionError(f"timed out waiting for {what}\n--- host log ---\n{tail}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class HostProcess:
    proc: subprocess.Popen[bytes]
    port: int
    prefix: str
    workdir: Path
    connection_string: str
    log_path: Path
    descendants: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def queue_name(self, kind: str) -> str:
        return f"{self.prefix}-{kind}"

    def queue(self, kind: str, *, base64_policy: bool = False, suffix: str = "") -> QueueClient:
        return QueueClient.from_connection_string(
            self.connection_string,
            self.queue_name(kind) + suffix,
            message_encode_policy=TextBase64EncodePolicy() if base64_policy else None,
        )

    def events(self, fn: str | None = None) -> list[dict[str, Any]]:
        path = self.workdir / "events.jsonl"
        if not path.exists():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in rows if fn is None or r.get("fn") == fn]

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"host did not stop within {timeout}s\n{self.log_tail()}") from None
        return int(self.proc.returncode)


def start_host(azurite: Azurite, workdir: Path, *, grace: float = 10.0, storage: bool = True) -> HostProcess:
    prefix = "h" + uuid.uuid4().hex[:10]
    workdir.mkdir(parents=True, exist_ok=True)
    values = {
        "AzureWebJobsStorage": azurite.connection_string,
        "FUNCTIONS_WORKER_RUNTIME": "python",
        "HOSTAPP_EVENTS": str(workdir / "events.jsonl"),
        "HOSTAPP_TIMER_SCHEDULE": "*/2 * * * * *",
        **{f"HOSTAPP_Q_{kind.upper()}": f"{prefix}-{kind}" for kind in ("record", "chained", "fails", "async", "slow")},
    }
    if not storage:
        del values["AzureWebJobsStorage"]
    settings = {
        "IsEncrypted": False,
        "Values": values,
        "Keys": {"master": MASTER, "host": {"default": HOST_KEY}, "functions": {"hello": {"default": FUNCTION_KEY}}},
    }
    settings_path = workdir / "local.settings.json"
    settings_path.write_text(json.dumps(settings))
    port = _free_port()
    log_path = workdir / "host.log"
    # The file's values must win (Core Tools lets the environment win), and "no storage" must mean none.
    env = {k: v for k, v in os.environ.items() if k not in values and k != "AzureWebJobsStorage"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "local.host", "--port", str(port), "--script-root", str(APP_DIR),
             "--settings", str(settings_path), "--grace", str(grace)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    host = HostProcess(proc, port, prefix, workdir, azurite.connection_string, log_path)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"host exited with {proc.returncode}\n{host.log_tail()}")
        with contextlib.suppress(requests.RequestException):
            return requests.get(f"{host.url}/admin/host/ping", timeout=2).status_code == 200
        return False

    try:
        wait_for(ready, "host ready", host=host)
    except BaseException:
        host.stop(signal.SIGKILL)
        raise
    host.descendants = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    return host


def peek(queue: QueueClient) -> list[Any]:
    """Visible messages; none while the queue does not exist yet (poison queues are created lazily)."""
    try:
        return list(queue.peek_messages(max_messages=32))
    except ResourceNotFoundError:
        return []


def assert_no_orphans(host: HostProcess) -> None:
    alive = [pid for pid in host.descendants if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert alive == [], f"processes left behind: {alive}"


@pytest.fixture(scope="module")
def host(azurite: Azurite, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostProcess]:
    h = start_host(azurite, tmp_path_factory.mktemp("host"))
    try:
        yield h
    finally:
        h.stop()


# ------------------------------------------------------------------------------------------ HTTP


def test_function_auth_level_is_enforced(host: HostProcess) -> None:
    url = f"{host.url}/api/hello/ada"
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, params={"code": "wrong"}, timeout=10).status_code == 401
    assert requests.get(url, headers={"x-functions-key": "wrong"}, timeout=10).status_code == 401
    assert requests.get(url, params={"code": FUNCTION_KEY}, timeout=10).status_code == 200
    assert requests.get(url, headers={"x-functions-key": HOST_KEY}, timeout=10).status_code == 200
    assert requests.get(url, headers={"x-functions-key": MASTER}, timeout=10).status_code == 200


def test_http_request_and_response_are_built_like_the_worker(host: HostProcess) -> None:
    r = requests.post(
        f"{host.url}/api/hello/ada", params={"code": FUNCTION_KEY, "q": "1"}, data=b"payload",
        headers={"X-Test": "yes"}, timeout=10,
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-fixture"] == "hello"
    body = r.json()
    assert body["method"] == "POST"
    assert body["route_params"] == {"name": "ada"}
    assert body["params"] == {"code": FUNCTION_KEY, "q": "1"}
    assert body["x_test"] == "yes"
    assert body["body"] == "payload"
    assert body["url"].startswith(f"{host.url}/api/hello/ada?")
    # The optional route parameter may be absent.
    r = requests.get(f"{host.url}/api/hello", params={"code": FUNCTION_KEY}, timeout=10)
    assert r.status_code == 200 and r.json()["route_params"] == {}


def test_anonymous_route_constraints_and_methods(host: HostProcess) -> None:
    r = requests.get(f"{host.url}/api/items/42", timeout=10)
    assert (r.status_code, r.text) == (201, "item 42")
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    assert requests.get(f"{host.url}/api/items/abc", timeout=10).status_code == 404  # {id:int}
    assert requests.post(f"{host.url}/api/items/42", timeout=10).status_code == 404  # method not bound
    assert requests.get(f"{host.url}/api/nowhere", timeout=10).status_code == 404
    assert requests.get(f"{host.url}/items/42", timeout=10).status_code == 404  # outside the route prefix


def test_admin_level_needs_the_master_key(host: HostProcess) -> None:
    url = f"{host.url}/api/secret"
    assert requests.get(url, headers={"x-functions-key": HOST_KEY}, timeout=10).status_code == 401
    r = requests.get(url, params={"code": MASTER}, timeout=10)
    assert (r.status_code, r.text) == (200, "admin only")


def test_function_exception_gives_500(host: HostProcess) -> None:
    assert requests.get(f"{host.url}/api/broken", timeout=10).status_code == 500
    wait_for(lambda: "(Failed, Id=" in host.log_tail(400) and "ValueError" in host.log_tail(400),
             "a Failed invocation log line", host=host)


def test_admin_status_and_functions(host: HostProcess) -> None:
    assert requests.get(f"{host.url}/admin/host/status", timeout=10).status_code == 401
    status = requests.get(f"{host.url}/admin/host/status", params={"code": MASTER}, timeout=10).json()
    assert status["state"] == "Running"
    assert {"hello", "record_message", "tick", "overlap"} <= set(status["functions"])
    assert status["errors"] == {}
    listing = requests.get(f"{host.url}/admin/functions", headers={"x-functions-key": MASTER}, timeout=10).json()
    tick = next(f for f in listing if f["name"] == "tick")
    assert tick["schedule"] == "*/2 * * * * *"  # %HOSTAPP_TIMER_SCHEDULE% resolved from app settings


# ------------------------------------------------------------------------------------------ queues


def test_queue_message_enqueued_with_sdk_base64_policy_is_processed(host: HostProcess) -> None:
    text = f"hello ü {uuid.uuid4()}"
    host.queue("record", base64_policy=True).send_message(text)
    event = wait_for(lambda: [e for e in host.events("record_message") if e["body"] == text], "record", host=host)[0]
    assert event["dequeue_count"] == 1
    assert event["function_name"] == "record_message" and event["invocation_id"]
    assert all(event[k] for k in ("has_insertion_time", "has_expiration_time", "has_next_visible", "has_pop_receipt"))
    # Processed messages are deleted.
    wait_for(lambda: host.queue("record").get_queue_properties().approximate_message_count == 0, "queue empty")


def test_message_that_is_not_base64_fails_and_lands_in_poison(host: HostProcess) -> None:
    raw = f"plain text, not base64 {uuid.uuid4()}!"
    host.queue("record").send_message(raw)  # no encode policy: what the encoding trap looks like
    poison = host.queue("record", suffix="-poison")
    wait_for(lambda: [m for m in peek(poison) if m.content == raw], "poison", host=host)
    assert not [e for e in host.events("record_message") if raw in e["body"]]


def test_failing_message_ends_in_poison_after_max_dequeue_count(host: HostProcess) -> None:
    text = f"doomed {uuid.uuid4()}"
    host.queue("fails", base64_policy=True).send_message(text)
    poison = host.queue("fails", suffix="-poison")
    messages = wait_for(lambda: peek(poison), "poison message", host=host)
    assert len(messages) == 1
    # Content preserved as stored (still base64, so a poison-queue trigger decodes it the same way).
    assert base64.b64decode(messages[0].content).decode() == text
    attempts = [e["dequeue_count"] for e in host.events("always_fails") if e["body"] == text]
    assert attempts == [1, 2, 3]  # maxDequeueCount=3 in the fixture host.json
    # ...and nowhere else: the original queue holds nothing (visible or not).
    assert host.queue("fails").get_queue_properties().approximate_message_count == 0


def test_queue_output_binding_writes_each_item(host: HostProcess) -> None:
    a, b = f"a-{uuid.uuid4()}", f"b-{uuid.uuid4()}"
    r = requests.post(f"{host.url}/api/enqueue", data=f"{a}\n{b}\n", timeout=10)
    assert r.status_code == 202
    wait_for(lambda: {a, b} <= {e["body"] for e in host.events("chained")}, "chained messages", host=host)


def test_async_functions_run_concurrently(host: HostProcess) -> None:
    q = host.queue("async", base64_policy=True)
    q.send_message("first")
    q.send_message("second")
    events = wait_for(lambda: len(host.events("overlap")) >= 2 and host.events("overlap"), "overlap", host=host)
    # Each invocation waited (up to 30 s) until both were in flight at once; serial runs would record 1.
    assert [e["max_in_flight_seen"] for e in events] == [2, 2]


def test_admin_run_of_a_queue_function(host: HostProcess) -> None:
    text = f"manual {uuid.uuid4()}"
    r = requests.post(f"{host.url}/admin/functions/record_message", json={"input": text},
                      headers={"x-functions-key": MASTER}, timeout=10)
    assert r.status_code == 202
    wait_for(lambda: [e for e in host.events("record_message") if e["body"] == text], "manual run", host=host)


# ------------------------------------------------------------------------------------------ timers


def test_timer_fires_on_its_ncrontab_schedule_without_overlap(host: HostProcess) -> None:
    ticks = wait_for(lambda: len(host.events("tick")) >= 3 and host.events("tick"), "three ticks", host=host)
    nexts = [dt.datetime.fromisoformat(t["next"]) for t in ticks]
    # "*/2 * * * * *": seconds first, every even second, on the second.
    assert all(n.second % 2 == 0 and n.microsecond == 0 for n in nexts)
    assert nexts == sorted(nexts) and len(set(nexts)) == len(nexts)
    assert all(t["in_flight"] == 1 for t in ticks)
    assert all(isinstance(t["past_due"], bool) for t in ticks)


def test_timer_run_on_startup_and_admin_run(host: HostProcess) -> None:
    wait_for(lambda: host.events("nightly"), "runOnStartup invocation", host=host)  # schedule is 03:00 daily
    before = len(host.events("nightly"))
    url = f"{host.url}/admin/functions/nightly"
    assert requests.post(url, json={}, timeout=10).status_code == 401
    assert requests.post(url, json={}, headers={"x-functions-key": MASTER}, timeout=10).status_code == 202
    wait_for(lambda: len(host.events("nightly")) > before, "admin-triggered run", host=host)
    admin = {"x-functions-key": MASTER}
    assert requests.post(f"{host.url}/admin/functions/nope", json={}, headers=admin, timeout=10).status_code == 404
    assert requests.post(f"{host.url}/admin/functions/hello", json={}, headers=admin, timeout=10).status_code == 400


# ------------------------------------------------------------------------------------------ shutdown


def test_sigterm_lets_in_flight_invocations_finish(azurite: Azurite, tmp_path: Path) -> None:
    h = start_host(azurite, tmp_path / "graceful", grace=60)
    try:
        release = tmp_path / "release-graceful"
        h.queue("slow", base64_policy=True).send_message(str(release))
        wait_for(lambda: [e for e in h.events("slow") if e["event"] == "started"], "slow started", host=h)
        h.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "Stopping the host" in h.log_tail(), "stop requested", host=h)
        # It cannot leave before the invocation ends (grace is 60 s): still alive.
        assert h.proc.poll() is None
        release.touch()
        assert h.proc.wait(60) == 0  # (a second signal would mean "exit now")
        assert [e for e in h.events("slow") if e["event"] == "finished"] == [{"fn": "slow", "event": "finished",
                                                                              "released": True}]
        # Finished before the exit: the message was deleted.
        assert h.queue("slow").get_queue_properties().approximate_message_count == 0
        assert_no_orphans(h)
    finally:
        h.stop(signal.SIGKILL)


def test_sigterm_releases_unfinished_messages(azurite: Azurite, tmp_path: Path) -> None:
    h = start_host(azurite, tmp_path / "release", grace=1)
    try:
        never = tmp_path / "never-created"
        h.queue("slow", base64_policy=True).send_message(str(never))
        wait_for(lambda: [e for e in h.events("slow") if e["event"] == "started"], "slow started", host=h)
        assert h.stop(signal.SIGTERM, timeout=60) == 0
        assert_no_orphans(h)
        assert not [e for e in h.events("slow") if e["event"] == "finished"]
        # Not deleted, and visible again now (not after the 10-minute fetch lease).
        visible = h.queue("slow").peek_messages(max_messages=32)
        assert [base64.b64decode(m.content).decode() for m in visible] == [str(never)]
    finally:
        h.stop(signal.SIGKILL)


def test_without_storage_queue_functions_are_in_error_and_http_still_runs(azurite: Azurite, tmp_path: Path) -> None:
    h = start_host(azurite, tmp_path / "nostorage", storage=False)
    try:
        status = requests.get(f"{h.url}/admin/host/status", params={"code": MASTER}, timeout=10).json()
        assert set(status["errors"]) == {"record_message", "chained", "always_fails", "overlap", "slow"}
        assert "AzureWebJobsStorage" in status["errors"]["record_message"]
        assert requests.get(f"{h.url}/api/items/7", timeout=10).status_code == 201
        assert h.stop() == 0
    finally:
        h.stop(signal.SIGKILL)


# ------------------------------------------------------------------------------------------ pure parts


def test_route_templates() -> None:
    r = compile_route("items/{id:int}/{name?}")
    assert r.match("items/5") == {"id": "5"}
    assert r.match("ITEMS/5/x") == {"id": "5", "name": "x"}
    assert r.match("items/x") is None
    assert r.match("items/99999999999") is None  # out of int range
    assert compile_route("files/{*rest}").match("files/a/b/c") == {"rest": "a/b/c"}
    assert compile_route("v/{kind=all}").match("v") == {"kind": "all"}
    assert compile_route("{file}.{ext:alpha}").match("report.pdf") == {"file": "report", "ext": "pdf"}
    assert compile_route("g/{id:guid}").match(f"g/{uuid.uuid4()}") is not None
    assert compile_route("g/{id:guid}").match("g/nope") is None
    assert compile_route("health").match("health/extra") is None


def test_timespans_schedules_and_host_json(tmp_path: Path) -> None:
    assert parse_timespan("00:00:00.500") == 0.5
    assert parse_timespan("1.02:00:00") == 93600
    with pytest.raises(HostConfigError):
        parse_timespan("5s")
    moment = dt.datetime(2024, 1, 1, 8, 59, 59, tzinfo=dt.UTC)
    assert parse_schedule("0 0 9 * * Mon-Fri").next_after(moment) == dt.datetime(2024, 1, 1, 9, tzinfo=dt.UTC)
    assert parse_schedule("00:05:00").next_after(moment) == moment + dt.timedelta(minutes=5)
    with pytest.raises(ScheduleError):
        parse_schedule("*/5 * * * *")  # 5 fields: the host wants 6
    config = load_host_json(APP_DIR, environ={})
    q = config.queues
    assert (q.batch_size, q.new_batch_threshold, q.max_dequeue_count, q.max_polling_interval) == (4, 2, 3, 0.5)
    (tmp_path / "host.json").write_text(json.dumps({"version": "2.0", "extensions": {"queues": {"batchSize": 64}}}))
    with pytest.raises(HostConfigError):
        load_host_json(tmp_path, environ={})
    (tmp_path / "host.json").write_text(json.dumps({"version": "2.0"}))
    defaults = load_host_json(tmp_path, environ={}).queues
    assert (defaults.batch_size, defaults.new_batch_threshold, defaults.max_dequeue_count) == (16, 8, 5)
    assert defaults.message_encoding == "base64" and defaults.visibility_timeout == 0
    # App settings override host.json values, as on Azure (the deployment sets the per-instance concurrency so)
    overridden = load_host_json(APP_DIR, environ={"AzureFunctionsJobHost__extensions__queues__batchSize": "2",
                                                  "AZUREFUNCTIONSJOBHOST__Extensions__Queues__NEWBATCHTHRESHOLD": "1",
                                                  "OTHER": "x"}).queues
    assert (overridden.batch_size, overridden.new_batch_threshold, overridden.max_dequeue_count) == (2, 1, 3)


async def test_timer_that_overran_its_next_occurrence_runs_late_with_past_due() -> None:
    calls: list[bool] = []
    second_call = asyncio.Event()

    class SlowFirstRun:
        async def invoke(self, spec: FunctionSpec, request: Any, *, reason: str) -> InvocationResult:
            calls.append(request.past_due)
            if len(calls) >= 2:
                second_call.set()
            if len(calls) == 1:
                await asyncio.sleep(2.5)  # overruns the 1 s interval by >= 1.5 s, whatever the load
            return InvocationResult("id", True)

    spec = FunctionSpec(
        name="t", kind=TriggerKind.TIMER, trigger_param="timer",
        trigger=TimerTriggerSpec(parse_schedule("00:00:01"), run_on_startup=False, use_monitor=False),
        outputs=[], user_function=lambda timer: None, is_async=True, parameters=[],
    )
    runner = TimerRunner(spec, SlowFirstRun())  # type: ignore[arg-type]
    runner.start()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(second_call.wait(), DEADLINE)
    runner.stop()
    await runner.drain(asyncio.get_running_loop().time() + 10)
    assert len(calls) >= 2
    assert calls[1] is True  # the occurrence due during the first run fired late, once, flagged past due
