"""The stack launcher, run as `python -m local.stack up --only azurite,functions` on free ports, and the stack
driver under it (``local.stack.Stack``): port probing, host kill and restart.

Ports and state live in a temporary folder so a developer's running `make run` is never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 90.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Launcher:
    proc: subprocess.Popen[bytes]
    state_dir: Path
    log_path: Path
    functions_port: int

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def state(self) -> dict[str, Any] | None:
        with contextlib.suppress(OSError, ValueError):
            doc: dict[str, Any] = json.loads((self.state_dir / "stack.json").read_text())
            return doc
        return None

    def wait_up(self) -> dict[str, Any]:
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"launcher exited with {self.proc.returncode}\n{self.output()}")
            doc = self.state()
            if doc and doc.get("running"):
                return doc
            time.sleep(0.2)
        raise AssertionError(f"stack not up within {DEADLINE}s\n{self.output()}")

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def start_launcher(tmp_path: Path, *extra: str, functions_port: int | None = None) -> Launcher:
    state_dir = tmp_path / "state"
    fport = functions_port or _free_port()
    ports = ["--functions-port", str(fport), "--blob-port", str(_free_port()),
             "--queue-port", str(_free_port()), "--table-port", str(_free_port())]
    log_path = tmp_path / "stack.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "local.stack", "up", "--state-dir", str(state_dir),
             "--only", "azurite,functions", *ports, *extra],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"},
        )
    return Launcher(proc, state_dir, log_path, fport)


@pytest.fixture
def launcher_cleanup() -> Iterator[list[Launcher]]:
    started: list[Launcher] = []
    yield started
    for launcher in started:  # safety net when an assertion failed mid-test
        procs = [psutil.Process(launcher.proc.pid)] if launcher.proc.poll() is None else []
        with contextlib.suppress(psutil.NoSuchProcess):
            procs += launcher.descendants() if procs else []
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            launcher.proc.wait(10)


def test_stack_up_health_and_sigint_leaves_no_orphans(tmp_path: Path, launcher_cleanup: list[Launcher]) -> None:
    launcher = start_launcher(tmp_path)
    launcher_cleanup.append(launcher)
    doc = launcher.wait_up()

    assert doc["version"] == 1 and doc["running"] is True
    assert doc["functions"]["base_url"] == f"http://127.0.0.1:{launcher.functions_port}/api"
    assert doc["functions"]["function_key"] and doc["functions"]["admin_key"]
    assert "DefaultEndpointsProtocol=http" in doc["storage"]["connection_string"]
    assert Path(doc["ca_bundle"]).exists()
    assert "graph" not in doc and "identity" not in doc  # not started: sections omitted
    assert set(doc["pids"]) == {"stack", "azurite", "functions"}
    assert (launcher.state_dir / "stack.json").stat().st_mode & 0o077 == 0  # holds secrets

    r = requests.get(f"{doc['functions']['base_url']}/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    # The generated settings point the app at the stack's storage, with the host's own key.
    settings = json.loads((launcher.state_dir / "local.settings.json").read_text())
    assert settings["Values"]["AzureWebJobsStorage"] == doc["storage"]["connection_string"]
    assert settings["Values"]["WEBHOOK_FUNCTION_KEY"] == doc["functions"]["function_key"]
    admin = requests.get(f"http://127.0.0.1:{launcher.functions_port}/admin/host/status",
                         headers={"x-functions-key": doc["functions"]["admin_key"]}, timeout=10)
    assert admin.status_code == 200

    status = subprocess.run([sys.executable, "-m", "local.stack", "status", "--state-dir", str(launcher.state_dir)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr

    children = launcher.descendants()
    assert {doc["pids"]["azurite"], doc["pids"]["functions"]} <= {c.pid for c in children}
    launcher.proc.send_signal(signal.SIGINT)
    assert launcher.proc.wait(60) == 0, launcher.output()
    assert _alive(children) == []
    final = launcher.state()
    assert final is not None and final["running"] is False


def test_a_dying_service_is_reported_and_the_rest_stopped(tmp_path: Path, launcher_cleanup: list[Launcher]) -> None:
    launcher = start_launcher(tmp_path)
    launcher_cleanup.append(launcher)
    doc = launcher.wait_up()
    children = launcher.descendants()
    os.kill(doc["pids"]["functions"], signal.SIGKILL)
    assert launcher.proc.wait(60) == 1
    out = launcher.output()
    assert "functions exited unexpectedly with status -9" in out
    assert "stopping azurite" in out
    assert _alive(children) == []


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        taken = blocker.getsockname()[1]
        launcher = start_launcher(tmp_path, functions_port=taken)
        assert launcher.proc.wait(60) == 2
    out = launcher.output()
    assert f"port in use: {taken} (functions); choose another with --functions-port" in out, out
    assert launcher.state() is None  # nothing was started


def _time_wait_port() -> int:
    """A port whose last connection is in TIME_WAIT on our side (we closed first) and that nobody listens on."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = int(listener.getsockname()[1])
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = listener.accept()
        conn.close()  # the active close: TIME_WAIT stays with the listening port
        time.sleep(0.05)
        client.close()
    return port


def test_the_port_probe_binds_like_the_servers() -> None:
    """A port in TIME_WAIT is free to a server (uvicorn, aiosmtpd and Node set SO_REUSEADDR), so the probe says free;
    a port someone listens on is taken."""
    from local.services import port_is_free

    lingering = _time_wait_port()
    with socket.socket() as plain:  # what the old probe did: refused while TIME_WAIT lasts
        with contextlib.suppress(OSError):
            plain.bind(("127.0.0.1", lingering))
            pytest.skip("this kernel let a plain bind through TIME_WAIT; nothing to tell apart")
    assert port_is_free(lingering)
    with socket.socket() as server:  # and a server really can bind it
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", lingering))
        server.listen(1)
        assert not port_is_free(lingering)


def test_the_driver_names_every_taken_port_and_its_flag(tmp_path: Path) -> None:
    from local.stack import PortInUseError, Stack

    with socket.socket() as a, socket.socket() as b:
        for s in (a, b):
            s.bind(("127.0.0.1", 0))
            s.listen(1)
        queue, table = a.getsockname()[1], b.getsockname()[1]
        stack = Stack(tmp_path, services=["azurite"], ports={"queue": queue, "table": table})
        with pytest.raises(PortInUseError) as info:
            stack.start()
    text = str(info.value)
    assert f"port in use: {queue} (azurite queue); choose another with --queue-port" in text
    assert f"port in use: {table} (azurite table); choose another with --table-port" in text
    assert not (tmp_path / "stack.json").exists()


def test_the_driver_kills_and_restarts_the_host(tmp_path: Path) -> None:
    """SIGKILL the host: it is gone at once (whole process group), ``watch`` does not call that a failure, and a
    new host comes up on the same port; ``run_function`` waits for the admin run's Executed line."""
    import threading

    from local.stack import Stack

    with Stack(tmp_path / "state", services=["azurite", "functions"], host_lease_seconds=30) as stack:
        first = stack.pids()["functions"]
        host = psutil.Process(first)
        assert "--lease-seconds" in host.cmdline()
        stack.kill_host()
        assert not psutil.pid_exists(first) or psutil.Process(first).status() == psutil.STATUS_ZOMBIE
        stop = threading.Event()
        stop.set()
        assert stack.watch(stop) == 0
        stack.start_host()
        assert stack.pids()["functions"] != first and stack.host_starts == 2
        r = requests.get(f"{stack.functions_root}/api/health", timeout=10)
        assert r.status_code == 200
        before = stack.executed_count("outbound_scan")  # its schedule (every 15 s) may have run it already
        status = stack.run_function("outbound_scan", within=120)  # a timer; no Dataverse here, so it may fail
        assert status in ("Succeeded", "Failed") and stack.executed_count("outbound_scan") > before
        children = [psutil.Process(p) for p in stack.pids().values()]
    assert _alive(children) == []
    assert json.loads((tmp_path / "state" / "stack.json").read_text())["running"] is False
