"""Start the repository's local Functions host (``python -m local.host``) on a free loopback port for the benchmark
and the security tests: a generated local.settings.json (Values + Keys), the host's output in a log file, a bounded
wait for ``/admin/host/ping``, and a stop that never leaves the process behind."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["FunctionsHost", "HostNotReady", "free_port", "host_available", "start_functions_host"]


class HostNotReady(RuntimeError):
    """The host exited or did not answer its ping in time (message carries the log tail)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def host_available() -> bool:
    return (ROOT / "local" / "host" / "__main__.py").exists()


@dataclass
class FunctionsHost:
    proc: subprocess.Popen[bytes]
    port: int
    master_key: str
    host_key: str
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def start_functions_host(values: Mapping[str, str], workdir: Path, *, timeout: float = 60.0,
                         app_module: str = "function_app") -> FunctionsHost:
    """Run the host over the repository root with ``values`` as app settings and freshly generated keys."""
    workdir.mkdir(parents=True, exist_ok=True)
    master, host_key = secrets.token_urlsafe(30), secrets.token_urlsafe(30)
    settings = {"IsEncrypted": False, "Values": {"FUNCTIONS_WORKER_RUNTIME": "python", **values},
                "Keys": {"master": master, "host": {"default": host_key}}}
    settings_path = workdir / "local.settings.json"
    settings_path.write_text(json.dumps(settings))
    os.chmod(settings_path, 0o600)
    port = free_port()
    log_path = workdir / "host.log"
    # The file's values must win (Core Tools lets the environment win).
    env = {k: v for k, v in os.environ.items() if k not in settings["Values"]}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "local.host", "--port", str(port), "--script-root", str(ROOT),
             "--settings", str(settings_path), "--app-module", app_module, "--grace", "5"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    host = FunctionsHost(proc, port, master, host_key, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HostNotReady(f"the local host exited with {proc.returncode}\n{host.log_tail()}")
        try:
            with urllib.request.urlopen(f"{host.url}/admin/host/ping", timeout=2) as r:
                if r.status == 200:
                    return host
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    host.stop()
    raise HostNotReady(f"the local host did not answer /admin/host/ping within {timeout:.0f}s\n{host.log_tail()}")
