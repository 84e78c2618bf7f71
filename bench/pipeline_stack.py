"""The local stack for the pipeline benchmark: ``python -m local.stack up --seed none --fresh`` on free ports as a
subprocess, its endpoints from stack.json, tokens, raw Web API / emulator calls, and a bounded shutdown.

Only the launcher is our child; it owns the services (each in its own process group, stopped in reverse order on
SIGTERM). As a safety net the services' pids are remembered and killed if the launcher leaves any behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from emulators.common.server import free_port

ROOT = Path(__file__).resolve().parents[1]
ODATA = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"}
GRAPH_SCOPE = "https://graph.microsoft.com/.default"
PORT_NAMES = ("functions", "blob", "queue", "table", "identity", "graph", "smtp", "dataverse")


class StackError(RuntimeError):
    """The stack did not start or answer as expected; the message carries the log tail."""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: no orphans


@dataclass
class BenchStack:
    workdir: Path
    launcher: subprocess.Popen[bytes] | None = None
    doc: dict[str, Any] = field(default_factory=dict)
    http: httpx.Client | None = None
    _tokens: dict[str, tuple[str, float]] = field(default_factory=dict)
    _service_pids: list[int] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def log_path(self) -> Path:
        return self.workdir / "stack.log"

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self, *, within: float = 240.0) -> float:
        """Start the launcher and wait for its "stack is up" line (after its own first sync/reconcile round, so
        nothing of ours races with it). Returns the start-up time in seconds."""
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "local.stack", "up", "--seed", "none", "--fresh",
                "--state-dir", str(self.state_dir)]
        for name in PORT_NAMES:
            argv += [f"--{name}-port", str(free_port())]
        with open(self.log_path, "wb") as log:
            self.launcher = subprocess.Popen(
                argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "NO_COLOR": "1"}, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.launcher.poll() is not None:
                raise StackError(f"stack launcher exited {self.launcher.returncode}: {self.tail()}")
            if "stack is up;" in self.log_text():
                break
            time.sleep(0.3)
        else:
            raise StackError(f"stack not up within {within:.0f} s: {self.tail()}")
        self.doc = json.loads((self.state_dir / "stack.json").read_text())
        self._service_pids = [int(p) for n, p in self.doc.get("pids", {}).items() if n != "stack"]
        self.http = httpx.Client(verify=self.ssl_context(), timeout=60)
        return time.monotonic() - t0

    def stop(self) -> None:
        if self.http is not None:
            self.http.close()
        if self.launcher is not None and self.launcher.poll() is None:
            self.launcher.send_signal(signal.SIGTERM)  # the launcher stops every service in reverse order
            try:
                self.launcher.wait(90)
            except subprocess.TimeoutExpired:
                self.launcher.kill()
                self.launcher.wait(10)
        for pid in self._service_pids:  # safety net: a service the launcher failed to stop
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError, PermissionError):
                if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    os.killpg(pid, signal.SIGKILL)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 25) -> str:
        return " | ".join(self.log_text().splitlines()[-lines:])

    # -- endpoints ------------------------------------------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.state_dir / "tls" / "bundle.pem"))

    @property
    def graph_url(self) -> str:
        return str(self.doc["graph"]["url"])

    @property
    def dataverse_url(self) -> str:
        return str(self.doc["dataverse"]["url"])

    @property
    def api(self) -> str:
        return f"{self.dataverse_url}/api/data/v9.2"

    @property
    def smtp(self) -> tuple[str, int]:
        host, port = str(self.doc["graph"]["smtp"]).rsplit(":", 1)
        return host, int(port)

    @property
    def functions_root(self) -> str:
        return str(self.doc["functions"]["base_url"]).removesuffix("/api")

    @property
    def storage_connection_string(self) -> str:
        return str(self.doc["storage"]["connection_string"])

    def host_values(self) -> dict[str, str]:
        """The Functions host's app settings (the launcher's generated local.settings.json)."""
        values: dict[str, str] = json.loads((self.state_dir / "local.settings.json").read_text())["Values"]
        return values

    def client(self) -> httpx.Client:
        assert self.http is not None, "stack not started"
        return self.http

    # -- tokens (plain client credentials against the identity emulator; cached until near expiry) ---------
    def token(self, scope: str) -> str:
        cached = self._tokens.get(scope)
        if cached and cached[1] > time.monotonic() + 60:
            return cached[0]
        resp = self.client().post(f"{self.doc['identity']['authority']}/oauth2/v2.0/token", data={
            "grant_type": "client_credentials", "client_id": self.doc["app"]["client_id"],
            "client_secret": self.doc["app"]["client_secret"], "scope": scope})
        resp.raise_for_status()
        body = resp.json()
        self._tokens[scope] = (str(body["access_token"]), time.monotonic() + float(body.get("expires_in", 600)))
        return self._tokens[scope][0]

    def dv_headers(self) -> dict[str, str]:
        return {**ODATA, "Authorization": f"Bearer {self.token(f'{self.dataverse_url}/.default')}"}

    def graph_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(GRAPH_SCOPE)}"}

    # -- raw calls ------------------------------------------------------------------------------------------
    def emulator(self, which: str, method: str, path: str, body: Any = None, timeout: float = 120) -> Any:
        base = self.graph_url if which == "graph" else self.dataverse_url
        r = self.client().request(method, f"{base}/_emulator/{path}", json=body, timeout=timeout)
        if r.status_code >= 400:
            raise StackError(f"{which} emulator {method} {path}: {r.status_code} {r.text[:300]}")
        return r.json() if r.content else None

    def dv(self, method: str, path: str, body: Any = None, headers: Mapping[str, str] | None = None) -> Any:
        r = self.client().request(method, f"{self.api}/{path}", json=body,
                                  headers={**self.dv_headers(), **(headers or {})})
        if r.status_code >= 400:
            raise StackError(f"Dataverse {method} {path}: {r.status_code} {r.text[:300]}")
        return r.json() if r.content else None

    def graph(self, method: str, path: str, params: Mapping[str, str] | None = None) -> Any:
        r = self.client().request(method, f"{self.graph_url}/v1.0/{path}", params=params, headers=self.graph_headers())
        if r.status_code >= 400:
            raise StackError(f"Graph {method} {path}: {r.status_code} {r.text[:300]}")
        return r.json() if r.content else None

    def executed(self, function: str) -> int:
        """How many invocations of ``function`` the host has logged as finished (through the launcher's log)."""
        return self.log_text().count(f"Executed 'Functions.{function}' (")

    def run_function(self, name: str, *, within: float = 180.0) -> str:
        """Run a timer function now through the host's admin API (master key) and wait for its Executed line."""
        before = self.executed(name)
        r = self.client().post(f"{self.functions_root}/admin/functions/{name}", json={"input": ""},
                               headers={"x-functions-key": str(self.doc["functions"]["admin_key"])})
        if r.status_code != 202:
            raise StackError(f"admin run {name}: {r.status_code} {r.text[:200]}")
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.executed(name) > before:
                return self.log_text().rsplit(f"Executed 'Functions.{name}' (", 1)[1].split(",", 1)[0]
            time.sleep(0.2)
        raise StackError(f"{name} did not finish within {within:.0f} s: {self.tail()}")
