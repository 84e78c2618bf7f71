"""The local stack: :class:`Stack`, the one driver that starts any subset of Azurite, the identity, Graph and
Dataverse emulators and the local Functions host, and ``python -m local.stack up | status | down`` on top of it.

Everything that runs the stack from code uses :class:`Stack`: ``make run`` (the CLI below), ``make demo``
(local/demo.py), the e2e and chaos tests (tests/e2e/stack_harness.py) and the pipeline benchmark.

The driver

* chooses ports (given ones are checked the way the servers bind; 0 = a free one), writes TLS material, function
  keys, the host's ``local.settings.json`` and ``stack.json`` into a state directory;
* starts the services in parallel (each in its own process group, output to ``<log_dir>/<name>.log`` and, for the
  CLI, echoed with a ``[name]`` prefix), the Functions host once the others are healthy, and waits for each
  health check with a deadline;
* exposes endpoints, credentials, tokens, raw Web API / Graph calls, the emulators' admin APIs, the host's admin
  API, the storage queues and tables, SMTP in and the outbox, and seeds an org and runs the CRM sync and the
  subscription reconcile through the host's own timers;
* can stop the host (SIGTERM, its grace), SIGKILL it and start it again, and stops everything in reverse order
  (TERM, then KILL after a grace) so nothing is left behind. It never restarts anything by itself: ``watch``
  reports a service that dies.

Adding a service = appending a :class:`ServiceSpec` to ``local.services.SERVICES`` (see docs/local-host.md).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import json
import logging
import os
import re
import shutil
import signal
import smtplib
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

from emulators.common.tls import client_env, ensure_tls
from local.host.keys import load_or_create_keys
from local.services import (
    SERVICES,
    HealthCheck,
    PortInUseError,
    Ports,
    ServiceSpec,
    StackContext,
    assign_ports,
    select_services,
    write_private_json,
)

__all__ = [
    "SERVICES",
    "HealthCheck",
    "PortInUseError",
    "Ports",
    "ServiceSpec",
    "Stack",
    "StackContext",
    "StackError",
    "StackOrg",
    "main",
    "poll",
]

ROOT = Path(__file__).resolve().parent.parent
STACK_FILE = "stack.json"
EXIT_OK, EXIT_SERVICE_FAILED, EXIT_USAGE = 0, 1, 2
ODATA = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"}
GRAPH_SCOPE = "https://graph.microsoft.com/.default"
DEFAULT_TABLE_PREFIX = "emailrouter"

T = TypeVar("T")
log = logging.getLogger("local.stack")
_EXECUTED = re.compile(r"Executed 'Functions\.([^']+)' \((\w+)")


class StackError(AssertionError):
    """The stack or a wait did not behave; the message carries what is needed to debug it (log tails).

    An ``AssertionError`` so that a test failing on it reads as a failed expectation, not an error in the test."""


def poll(what: str, check: Callable[[], T | None], *, within: float, every: float = 0.25,
         detail: Callable[[], str] | None = None) -> T:
    """Call ``check`` until it returns something truthy (returned), or raise :class:`StackError` after ``within``
    seconds."""
    deadline = time.monotonic() + within
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() >= deadline:
            extra = f"\n{detail()}" if detail else ""
            raise StackError(f"timed out after {within:.0f}s waiting for {what}{extra}")
        time.sleep(every)


class StackOrg(Protocol):
    """An org the driver can seed (tests, the benchmark): Graph users and rules, CRM rows, and what the router's CRM
    sync and subscription reconcile must produce from them."""

    def graph_seed(self) -> Mapping[str, Any]:
        """Body of the Graph emulator's ``POST /_emulator/seed``."""
        ...

    def dataverse_seed(self) -> Mapping[str, Any]:
        """Body of the Dataverse emulator's ``POST /_emulator/seed``."""
        ...

    def crm_records(self) -> Sequence[tuple[str, Mapping[str, Any]]]:
        """(entity set, body) rows the seed format cannot carry, created through the Web API (the forward mailbox)."""
        ...

    @property
    def mailbox_addresses(self) -> Collection[str]:
        """Every address the CRM sync must write a Mailboxes row for."""
        ...

    @property
    def watched(self) -> Collection[tuple[str, str | None]]:
        """(address, Graph user id or None) of every mailbox that must get a Graph subscription."""
        ...

    @property
    def caller_id(self) -> str | None:
        """The CRM user the driver's own Web API calls impersonate (None: the application user)."""
        ...


# ------------------------------------------------------------------------------------------ processes


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """In the child: SIGTERM when the driver's process dies (even by -9), so nothing is orphaned."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class _Process:
    spec: ServiceSpec
    proc: subprocess.Popen[bytes]
    log_path: Path
    pump: threading.Thread | None = None
    expected_exit: bool = False  # stopped or killed by the driver on purpose

    @property
    def name(self) -> str:
        return self.spec.name

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    def finish(self) -> None:
        """After the main process ended: whatever is left in its group (grandchildren) goes too."""
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if self.pump is not None:
            self.pump.join(2)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# ------------------------------------------------------------------------------------------ the driver


class Stack:
    """One local stack in one state directory. See the module docstring; ``with Stack(...) as s:`` starts and stops.

    ``services``: names from ``local.services.SERVICES`` (None: every available one). ``ports``: a
    :class:`Ports` or a mapping of port names; 0 or absent = a free port. ``seed``: ``"demo"`` (the Contoso org of
    local/demo_org.py, applied to new emulator databases) or ``"none"``. ``fresh``: delete the services' data
    first. ``host_values``: app settings that win over the generated ones (a test's compressed timers).
    ``host_lease_seconds``: the host's queue-message lease (default the real host's 600 s; a test that SIGKILLs
    the host shortens it). ``timers=False``: no timer schedules in the host's settings, so its timers never fire (a
    host for HTTP tests). ``echo(name, line)``: also show service output (the CLI). ``say(line)``: the driver's
    own messages (default: the ``local.stack`` logger).
    """

    def __init__(self, state_dir: Path | str, *, services: Iterable[str] | None = None,
                 ports: Ports | Mapping[str, int] | None = None, seed: str = "none", fresh: bool = False,
                 log_dir: Path | str | None = None, echo: Callable[[str, str], None] | None = None,
                 say: Callable[[str], None] | None = None, host_values: Mapping[str, str] | None = None,
                 host_lease_seconds: int | None = None, host_grace: float = 10.0, timers: bool = True,
                 root: Path = ROOT) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.log_dir = Path(log_dir).resolve() if log_dir is not None else self.state_dir / "logs"
        self.root = root
        if isinstance(ports, Ports):
            self._ports = ports
        else:
            self._ports = Ports.any_free()
            for name, port in (ports or {}).items():
                if name not in Ports.names():
                    raise ValueError(f"unknown port {name!r}; known: {', '.join(Ports.names())}")
                setattr(self._ports, name, int(port))
        self.specs, self.skipped = select_services(services)
        self.seed = seed
        self.fresh = fresh
        self.echo = echo
        self.say = say or log.info
        self.host_values = dict(host_values or {})
        self.host_lease_seconds = host_lease_seconds
        self.host_grace = host_grace
        self.timers = timers
        self.ctx: StackContext | None = None
        self.doc: dict[str, Any] = {}
        self.host_starts = 0
        self.caller_id: str | None = None  # CRM user the driver's own Web API calls impersonate
        self.started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self._procs: dict[str, _Process] = {}
        self._cancel: threading.Event | None = None
        self._log_pos = 0
        self._executed: dict[str, int] = {}
        self._last_status: dict[str, str] = {}
        self._table_prefix: str | None = None
        self._owned = True  # False for a stack attached to (not started by) this process
        self._http: Any = None
        self._tokens: dict[str, tuple[str, float]] = {}
        self._tokens_lock = threading.Lock()

    @classmethod
    def attach(cls, state_dir: Path | str) -> Stack:
        """A driver for a stack another process runs (``make run``): endpoints and clients from its stack.json;
        ``stop`` leaves that stack alone."""
        stack = cls(state_dir, services=())
        stack._owned = False
        try:
            stack.doc = json.loads((stack.state_dir / STACK_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise StackError(f"no stack.json in {stack.state_dir}: {exc}") from None
        if not stack.doc.get("running"):
            raise StackError(f"the stack in {stack.state_dir} is not running")
        return stack

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- start and stop ----------------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def ports(self) -> Ports:
        """The ports in use (chosen ones filled in once started)."""
        return self.ctx.ports if self.ctx is not None else self._ports

    def start(self, *, host: bool = True, within: float = 240.0, cancel: threading.Event | None = None) -> Stack:
        """Start every selected service (the Functions host too unless ``host=False``: then ``start_host`` later,
        e.g. after seeding). Raises :class:`PortInUseError` before starting anything when a chosen port is taken,
        :class:`StackError` (everything stopped again) when a service exits, is not healthy in time or ``cancel``
        is set meanwhile.

        Call it (and ``start_host``) from the thread that will outlive the services: a child gets SIGTERM when the
        thread that started it ends (``PR_SET_PDEATHSIG``), which is what keeps a killed driver from leaving
        orphans."""
        self._cancel = cancel
        if not self.specs:
            raise StackError("nothing to start" + (f": {'; '.join(self.skipped)}" if self.skipped else ""))
        for line in self.skipped:
            self.say(line)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.fresh:
            for spec in self.specs:
                for sub in spec.fresh_dirs:
                    shutil.rmtree(self.state_dir / sub, ignore_errors=True)
        ports = assign_ports(self._ports, {s.name: s.ports for s in self.specs})
        self.ctx = StackContext(
            root=self.root, state_dir=self.state_dir, ports=ports, tls=ensure_tls(self.state_dir / "tls"),
            keys=load_or_create_keys(None, self.state_dir / "functions-keys.json"), started=self.names,
            seed=self.seed, host_values=self.host_values, host_lease_seconds=self.host_lease_seconds,
            host_grace=self.host_grace, timers=self.timers, say=self.say)
        deadline = time.monotonic() + within
        try:
            first = [s for s in self.specs if not s.after_others]
            self._start_wave(first, deadline)
            if host:
                self._start_wave([s for s in self.specs if s.after_others], deadline)
        except BaseException:
            self.stop()
            raise
        self.write_state(running=True)
        return self

    def _start_wave(self, specs: Sequence[ServiceSpec], deadline: float) -> None:
        """Start ``specs`` together, then wait until every one is healthy."""
        assert self.ctx is not None
        started = [self._spawn(spec) for spec in specs]
        checks = {p.name: p.spec.health(self.ctx) for p in started}
        limits = {p.name: min(deadline, time.monotonic() + p.spec.startup_timeout) for p in started}
        pending = list(started)
        while pending:
            if self._cancel is not None and self._cancel.is_set():
                raise StackError("start-up cancelled")
            for p in list(pending):
                if not p.alive():
                    if p.pump is not None:
                        p.pump.join(2)
                    raise StackError(f"{p.name} exited while starting with status {p.proc.returncode}\n"
                                     f"last lines of {p.log_path}:\n{_tail(p.log_path)}")
                if checks[p.name].probe(self.ctx.tls):
                    self.say(f"{p.name} is healthy (pid {p.proc.pid})")
                    pending.remove(p)
                elif time.monotonic() >= limits[p.name]:
                    raise StackError(f"{p.name} did not become healthy in time\n"
                                     f"last lines of {p.log_path}:\n{_tail(p.log_path)}")
            if pending:
                time.sleep(0.1)

    def _spawn(self, spec: ServiceSpec) -> _Process:
        assert self.ctx is not None
        if spec.prepare is not None:
            spec.prepare(self.ctx)
        env = {**os.environ, **client_env(self.ctx.tls), "PYTHONUNBUFFERED": "1"}
        for name in spec.env_unset(self.ctx):
            env.pop(name, None)
        env.update(spec.env(self.ctx))
        argv = spec.argv(self.ctx)
        log_path = self.log_dir / f"{spec.name}.log"
        self.say(f"starting {spec.name}: {' '.join(argv)}")
        with log_path.open("ab") as out:
            if spec.after_others:
                self.host_starts += 1
                out.write(f"\n===== {spec.name} start #{self.host_starts} =====\n".encode())
                out.flush()
            proc = subprocess.Popen(  # noqa: S603 - argv built from our own specs
                argv, cwd=self.root, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if self.echo is not None else out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent)
        process = _Process(spec, proc, log_path)
        if self.echo is not None:
            process.pump = threading.Thread(target=self._pump, args=(process,), daemon=True, name=f"log-{spec.name}")
            process.pump.start()
        self._procs[spec.name] = process
        return process

    def _pump(self, process: _Process) -> None:
        """Echo mode: the service's output to its log file and to ``echo``."""
        assert process.proc.stdout is not None and self.echo is not None
        with process.log_path.open("a", encoding="utf-8") as out:
            for raw in iter(process.proc.stdout.readline, b""):
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                out.write(line + "\n")
                out.flush()
                self.echo(process.name, line)

    def _stop_process(self, process: _Process) -> None:
        process.expected_exit = True
        if process.alive():
            self.say(f"stopping {process.name}")
            process.signal_group(signal.SIGTERM)
            try:
                process.proc.wait(process.spec.stop_timeout)
            except subprocess.TimeoutExpired:
                self.say(f"{process.name} did not stop within {process.spec.stop_timeout:g}s: killing it")
        process.finish()

    def stop(self) -> None:
        """Stop what this driver started: the host first (it drains in-flight work), then the rest together."""
        if self._http is not None:
            self._http.close()
            self._http = None
        if not self._owned:
            return
        order = list(reversed(self._procs.values()))
        for process in [p for p in order if p.spec.after_others]:
            self._stop_process(process)
        rest = [p for p in order if not p.spec.after_others]
        for process in rest:
            process.expected_exit = True
            if process.alive():
                self.say(f"stopping {process.name}")
                process.signal_group(signal.SIGTERM)
        for process in rest:
            try:
                process.proc.wait(process.spec.stop_timeout)
            except subprocess.TimeoutExpired:
                self.say(f"{process.name} did not stop within {process.spec.stop_timeout:g}s: killing it")
            process.finish()
        if self.ctx is not None:
            self.write_state(running=False)

    def watch(self, stop: threading.Event) -> int:
        """Until ``stop`` is set (0) or a service exits without being asked to (1, with its last lines)."""
        while True:
            for process in self._procs.values():
                if not process.expected_exit and not process.alive():
                    if process.pump is not None:
                        process.pump.join(2)
                    self.say(f"{process.name} exited unexpectedly with status {process.proc.returncode}")
                    self.say(f"last lines of {process.name}:")
                    for line in _tail(process.log_path, 30).splitlines():
                        self.say(f"  | {line}")
                    return EXIT_SERVICE_FAILED
            if stop.wait(0.2):
                return EXIT_OK

    def pids(self) -> dict[str, int]:
        return {name: p.proc.pid for name, p in self._procs.items() if p.alive()}

    def write_state(self, *, running: bool) -> None:
        """``stack.json``: every endpoint and credential of the started services (0600: it holds secrets)."""
        assert self.ctx is not None
        doc: dict[str, Any] = {"version": 1, "running": running, "started_at": self.started_at,
                               "root": str(self.root), "ca_bundle": str(self.ctx.tls.bundle)}
        for spec in self.specs:
            doc.update(spec.stack_json(self.ctx))
        doc["pids"] = {"stack": os.getpid(), **self.pids()}
        if not running:
            doc["stopped_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        write_private_json(self.state_dir / STACK_FILE, doc)
        self.doc = doc

    # -- the Functions host ------------------------------------------------------------------------------------

    def _host_spec(self) -> ServiceSpec:
        spec = next((s for s in self.specs if s.after_others), None)
        if spec is None or self.ctx is None:
            raise StackError("the Functions host is not part of this stack (or the stack is not started)")
        return spec

    def start_host(self, *, within: float = 180.0) -> None:
        """Start (or start again) the Functions host and wait for ``/admin/host/ping``."""
        spec = self._host_spec()
        running = self._procs.get(spec.name)
        if running is not None and running.alive():
            raise StackError("the Functions host is already running")
        self._start_wave([spec], time.monotonic() + within)
        self.write_state(running=True)

    def stop_host(self) -> None:
        """SIGTERM: the host stops taking work and gives in-flight invocations its grace."""
        process = self._procs.get(self._host_spec().name)
        if process is not None:
            self._stop_process(process)

    def kill_host(self) -> None:
        """SIGKILL the host's whole process group: no grace, in-flight messages stay leased."""
        process = self._procs.get(self._host_spec().name)
        if process is None:
            return
        process.expected_exit = True
        process.signal_group(signal.SIGKILL)
        process.proc.wait(60)
        process.finish()
        with process.log_path.open("ab") as out:
            out.write(f"\n===== {process.name} SIGKILLed by the driver =====\n".encode())

    def restart_host(self, *, kill: bool = False, within: float = 180.0) -> None:
        (self.kill_host if kill else self.stop_host)()
        self.start_host(within=within)

    @property
    def host_log(self) -> Path:
        return self.log_dir / "functions.log"

    def host_log_text(self) -> str:
        try:
            return self.host_log.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, name: str, lines: int = 60) -> str:
        return _tail(self.log_dir / f"{name}.log", lines)

    def app_settings(self) -> dict[str, str]:
        """The host's app settings (the generated local.settings.json Values)."""
        values: dict[str, str] = json.loads((self.state_dir / "local.settings.json").read_text())["Values"]
        return values

    # -- endpoints and credentials (from stack.json) -----------------------------------------------------------

    def _section(self, name: str) -> dict[str, Any]:
        section = self.doc.get(name)
        if not isinstance(section, dict):
            raise StackError(f"{name} is not part of this stack ({', '.join(self.names) or 'attached'})")
        return section

    @property
    def ca_bundle(self) -> str:
        return str(self.doc["ca_bundle"])

    def client_env(self) -> dict[str, str]:
        """``REQUESTS_CA_BUNDLE`` / ``SSL_CERT_FILE`` for a process that must trust the stack (DESIGN.md §4)."""
        return {"REQUESTS_CA_BUNDLE": self.ca_bundle, "SSL_CERT_FILE": self.ca_bundle}

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_bundle)

    @property
    def authority(self) -> str:
        return str(self._section("identity")["authority"])

    @property
    def tenant_id(self) -> str:
        return str(self._section("identity")["tenant_id"])

    @property
    def client_id(self) -> str:
        return str(self._section("app")["client_id"])

    @property
    def client_secret(self) -> str:
        return str(self._section("app")["client_secret"])

    @property
    def graph_url(self) -> str:
        return str(self._section("graph")["url"])

    @property
    def graph_base_url(self) -> str:
        return str(self._section("graph")["base_url"])

    @property
    def smtp(self) -> tuple[str, int]:
        host, port = str(self._section("graph")["smtp"]).rsplit(":", 1)
        return host, int(port)

    smtp_addr = smtp

    @property
    def dataverse_url(self) -> str:
        return str(self._section("dataverse")["url"])

    @property
    def dataverse_api_url(self) -> str:
        return str(self._section("dataverse")["api_url"])

    @property
    def functions_root(self) -> str:
        """The host's root URL (admin API under ``/admin``, functions under ``/api``)."""
        return str(self._section("functions")["base_url"]).removesuffix("/api")

    @property
    def function_key(self) -> str:
        return str(self._section("functions")["function_key"])

    @property
    def admin_key(self) -> str:
        return str(self._section("functions")["admin_key"])

    @property
    def storage_connection_string(self) -> str:
        return str(self._section("storage")["connection_string"])

    @property
    def table_prefix(self) -> str:
        """The host's ``TABLE_PREFIX`` (the router's tables are ``<prefix><Logical>``)."""
        if self._table_prefix is None:
            prefix = DEFAULT_TABLE_PREFIX
            with contextlib.suppress(OSError, ValueError, KeyError):
                prefix = self.app_settings().get("TABLE_PREFIX") or DEFAULT_TABLE_PREFIX
            self._table_prefix = prefix
        return self._table_prefix

    # -- HTTP: tokens, Web API, Graph, emulator admin APIs -----------------------------------------------------

    @property
    def http(self) -> Any:
        """An ``httpx.Client`` trusting the stack's CA."""
        if self._http is None:
            import httpx

            self._http = httpx.Client(verify=self.ssl_context(), timeout=60)
        return self._http

    def token(self, scope: str) -> str:
        """An app-only token (client credentials at the identity emulator), cached until a minute before expiry."""
        with self._tokens_lock:
            cached = self._tokens.get(scope)
            if cached and cached[1] > time.monotonic() + 60:
                return cached[0]
        r = self.http.post(f"{self.authority}/oauth2/v2.0/token", data={
            "grant_type": "client_credentials", "client_id": self.client_id, "client_secret": self.client_secret,
            "scope": scope})
        if r.status_code != 200:
            raise StackError(f"no token for {scope}: {r.status_code} {r.text[:300]}")
        body = r.json()
        with self._tokens_lock:
            self._tokens[scope] = (str(body["access_token"]), time.monotonic() + float(body.get("expires_in", 600)))
        return str(body["access_token"])

    def dv_headers(self) -> dict[str, str]:
        return {**ODATA, "Authorization": f"Bearer {self.token(f'{self.dataverse_url}/.default')}"}

    def graph_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(GRAPH_SCOPE)}"}

    def emulator(self, which: str, method: str, path: str, body: Any = None, *, timeout: float = 120) -> Any:
        """An emulator admin call: ``which`` is ``graph`` or ``dataverse``, ``path`` below ``/_emulator/``."""
        base = {"graph": self.graph_url, "dataverse": self.dataverse_url}[which]
        r = self.http.request(method, f"{base}/_emulator/{path}", json=body, timeout=timeout)
        if r.status_code >= 400:
            raise StackError(f"{which} emulator {method} {path}: {r.status_code} {r.text[:500]}")
        return r.json() if r.content else None

    def clear_faults(self) -> None:
        """Every injected fault off: Graph request and notification faults, delta-token eviction, Dataverse."""
        self.emulator("graph", "DELETE", "faults")
        self.emulator("graph", "DELETE", "notification-faults")
        self.emulator("graph", "POST", "config", {"delta_evict_probability": 0.0})
        self.emulator("dataverse", "DELETE", "faults")

    def dv(self, method: str, path: str, body: Any = None, *, headers: Mapping[str, str] | None = None,
           ok: Iterable[int] = (), within: float = 300.0) -> Any:
        """A raw Web API call (``path`` below ``/api/data/v9.2/``, or a full URL): the caller's own view of CRM,
        independent of the product's client. Injected faults and service protection hit these calls too, so
        429/5xx answers are retried, honouring Retry-After, within ``within`` seconds; other errors raise. With
        ``caller_id`` set the call runs as that CRM user (``MSCRMCallerID``): service protection counts per
        effective user, so the caller's own polling does not eat the router's budget. Returns the response."""
        url = path if path.startswith("https://") else f"{self.dataverse_api_url}/{path}"
        caller = {"MSCRMCallerID": self.caller_id} if self.caller_id else {}
        accepted = set(ok)
        deadline = time.monotonic() + within
        attempt = 0
        while True:
            attempt += 1
            r = self.http.request(method, url, json=body, headers={**self.dv_headers(), **caller, **(headers or {})})
            if r.status_code in (429, 500, 502, 503, 504) and r.status_code not in accepted:
                if time.monotonic() >= deadline:
                    raise StackError(f"Dataverse {method} {path}: still {r.status_code} after {attempt} attempts "
                                     f"({within:.0f}s): {r.text[:300]}")
                retry_after = float(r.headers.get("Retry-After") or 0)
                time.sleep(min(30.0, max(retry_after, 0.2 * min(attempt, 10))))
                continue
            if r.status_code >= 400 and r.status_code not in accepted:
                raise StackError(f"Dataverse {method} {path}: {r.status_code} {r.text[:500]}")
            return r

    def dv_list(self, path: str) -> list[dict[str, Any]]:
        """Every row of a Web API query, following ``@odata.nextLink``."""
        rows: list[dict[str, Any]] = []
        url: str | None = path
        for _ in range(1000):
            if url is None:
                break
            data = self.dv("GET", url, headers={"Prefer": "odata.maxpagesize=500"}).json()
            rows.extend(data["value"])
            url = data.get("@odata.nextLink")
        return rows

    def graph(self, method: str, path: str, *, params: Mapping[str, str] | None = None) -> Any:
        """A raw Graph call as the app (``path`` below ``/v1.0/``); the JSON answer."""
        r = self.http.request(method, f"{self.graph_base_url}/{path}", params=params, headers=self.graph_headers())
        if r.status_code >= 400:
            raise StackError(f"Graph {method} {path}: {r.status_code} {r.text[:300]}")
        return r.json() if r.content else None

    # -- the Functions host's admin API ------------------------------------------------------------------------

    def functions(self) -> list[dict[str, Any]]:
        r = self.http.get(f"{self.functions_root}/admin/functions", headers={"x-functions-key": self.admin_key})
        if r.status_code != 200:
            raise StackError(f"admin functions: {r.status_code} {r.text[:300]}")
        return list(r.json())

    def _scan_host_log(self) -> None:
        """Count the host's ``Executed 'Functions.X' (Status`` lines, reading only what was added since last time."""
        try:
            with self.host_log.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                if size < self._log_pos:  # a new log file: count afresh
                    self._log_pos = 0
                    self._executed.clear()
                fh.seek(self._log_pos)
                chunk = fh.read(size - self._log_pos)
        except OSError:
            return
        end = chunk.rfind(b"\n") + 1  # whole lines only; a partial last line is read again next time
        self._log_pos += end
        for match in _EXECUTED.finditer(chunk[:end].decode("utf-8", errors="replace")):
            name = match.group(1)
            self._executed[name] = self._executed.get(name, 0) + 1
            self._last_status[name] = match.group(2)

    def executed_count(self, function: str) -> int:
        """How many invocations of ``function`` the host has logged as finished (every start of the host)."""
        self._scan_host_log()
        return self._executed.get(function, 0)

    def run_function(self, name: str, *, wait: bool = True, within: float = 180.0) -> str:
        """Run a function now (admin API, master key); with ``wait``, until its ``Executed`` line appears, whose
        status (``Succeeded`` / ``Failed``) is returned."""
        before = self.executed_count(name)
        r = self.http.post(f"{self.functions_root}/admin/functions/{name}", json={"input": ""},
                           headers={"x-functions-key": self.admin_key})
        if r.status_code != 202:
            raise StackError(f"admin run {name}: {r.status_code} {r.text[:300]}")
        if not wait:
            return "started"
        poll(f"{name} to finish", lambda: self.executed_count(name) > before, within=within, every=0.1,
             detail=lambda: _tail(self.host_log))
        return self._last_status.get(name, "")

    # -- storage -----------------------------------------------------------------------------------------------

    def queue_service(self) -> Any:
        from azure.storage.queue import QueueServiceClient

        return QueueServiceClient.from_connection_string(self.storage_connection_string)

    def queue_depth(self, name: str) -> int:
        from azure.core.exceptions import ResourceNotFoundError

        client = self.queue_service().get_queue_client(name)
        try:
            return int(client.get_queue_properties().approximate_message_count or 0)
        except ResourceNotFoundError:  # the queue does not exist (yet): nothing in it
            return 0

    def peek_queue(self, name: str) -> list[str]:
        from azure.core.exceptions import ResourceNotFoundError

        client = self.queue_service().get_queue_client(name)
        try:
            return [str(m.content) for m in client.peek_messages(max_messages=32)]
        except ResourceNotFoundError:
            return []

    def put_raw_queue_message(self, name: str, content: str) -> None:
        """A message exactly as given (no encoding policy): for deliberately malformed items."""
        from azure.core.exceptions import ResourceExistsError

        client = self.queue_service().get_queue_client(name)
        with contextlib.suppress(ResourceExistsError):
            client.create_queue()
        client.send_message(content)

    def table(self, logical: str, *, prefix: str | None = None) -> Any:
        """A ``TableClient`` for one of the router's tables (``TABLE_PREFIX`` + logical name)."""
        from azure.data.tables import TableServiceClient

        tables = TableServiceClient.from_connection_string(self.storage_connection_string)
        return tables.get_table_client(f"{prefix or self.table_prefix}{logical}")

    def table_rows(self, logical: str, *, partition: str | None = None) -> list[dict[str, Any]]:
        from azure.core.exceptions import ResourceNotFoundError

        table = self.table(logical)
        try:
            if partition is None:
                return [dict(e) for e in table.list_entities()]
            return [dict(e) for e in table.query_entities("PartitionKey eq @pk", parameters={"pk": partition})]
        except ResourceNotFoundError:
            return []

    def set_org_setting(self, key: str, value: str) -> None:
        """An admin's edit of the OrgSettings table (``Value`` column; docs/admin-guide.md)."""
        from azure.core.exceptions import ResourceExistsError
        from azure.data.tables import UpdateMode

        table = self.table("OrgSettings")
        with contextlib.suppress(ResourceExistsError):
            table.create_table()
        table.upsert_entity({"PartitionKey": "org", "RowKey": key, "Value": value}, mode=UpdateMode.MERGE)

    # -- mail --------------------------------------------------------------------------------------------------

    def smtp_send(self, mails: Iterable[EmailMessage]) -> int:
        """Deliver mails from outside over the Graph emulator's SMTP listener (one connection)."""
        sent = 0
        host, port = self.smtp
        with smtplib.SMTP(host, port, timeout=60) as client:
            for msg in mails:
                client.send_message(msg)
                sent += 1
        return sent

    def outbox(self) -> list[dict[str, Any]]:
        """Mail the router sent to outside addresses (the Graph emulator's outbox)."""
        body = self.emulator("graph", "GET", "outbox")
        return list(body if isinstance(body, list) else body.get("value", []))

    # -- an org ------------------------------------------------------------------------------------------------

    def seed_org(self, org: StackOrg) -> None:
        """Graph users (+ rules) and CRM rows through the emulators' seed endpoints, the rest through the Web API;
        the driver's own Web API calls then run as ``org.caller_id``."""
        self.emulator("graph", "POST", "seed", dict(org.graph_seed()), timeout=300)
        self.emulator("dataverse", "POST", "seed", dict(org.dataverse_seed()), timeout=300)
        for entity_set, body in org.crm_records():
            self.dv("POST", entity_set, dict(body))
        self.caller_id = org.caller_id

    def subscriptions(self) -> list[dict[str, Any]]:
        body = self.emulator("graph", "GET", "subscriptions")
        return list(body.get("value", []) if isinstance(body, dict) else body)

    def sync_and_subscribe(self, org: StackOrg, *, within: float = 240.0) -> dict[str, Any]:
        """The router's CRM sync, then its subscription reconcile, each run now through the host's admin API (what
        an admin does after a deployment) until every mailbox row exists and every watched mailbox has its
        subscription. Returns how long each part took."""
        t0 = time.monotonic()
        wanted = {a.lower() for a in org.mailbox_addresses}

        def synced() -> bool:
            rows = {str(r.get("Address", "")).lower() for r in self.table_rows("Mailboxes", partition="mailbox")}
            return wanted <= rows

        status = self.run_function("crm_settings_sync", within=within)
        poll("the CRM sync to write every mailbox row", synced, within=within, every=0.2,
             detail=lambda: f"crm_settings_sync: {status}\n{_tail(self.host_log)}")
        sync_s = time.monotonic() - t0
        watched = list(org.watched)

        def subscribed() -> int:
            subs = self.subscriptions()
            text = json.dumps(subs).lower()
            ids_ok = all(address.lower() in text or (user_id is not None and user_id.lower() in text)
                         for address, user_id in watched if user_id is not None)
            return len(subs) if ids_ok and len(subs) >= len(watched) else 0

        # The host's settings directory caches the mailbox rows for a short while; a reconcile that ran before it
        # saw every row leaves some out, so it runs again until every watched mailbox has its subscription.
        deadline = time.monotonic() + within
        rounds = 0
        while time.monotonic() < deadline:
            rounds += 1
            self.run_function("subscription_reconcile", within=within)
            with contextlib.suppress(StackError):
                count = poll("subscriptions", subscribed, within=10, every=0.2)
                return {"sync_s": round(sync_s, 2), "subscribe_s": round(time.monotonic() - t0 - sync_s, 2),
                        "reconcile_rounds": rounds, "subscriptions": count}
        raise StackError(f"not every watched mailbox got a subscription\n{_tail(self.host_log)}")


# ------------------------------------------------------------------------------------------ CLI output

_COLOURS = ("36", "35", "33", "32", "34", "31", "96", "95")
_print_lock = threading.Lock()


def _use_colour() -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    return bool(os.environ.get("FORCE_COLOR")) or sys.stdout.isatty()


def _emit(prefix: str, colour: str | None, line: str, stream: IO[str] | None = None) -> None:
    tag = f"\x1b[{colour}m[{prefix}]\x1b[0m" if colour and _use_colour() else f"[{prefix}]"
    out = stream or sys.stdout
    with _print_lock:
        out.write(f"{tag} {line}\n")
        out.flush()


def _say(line: str) -> None:
    _emit("stack", "1", line)


def _echo(name: str, line: str) -> None:
    order = [s.name for s in SERVICES]
    _emit(name, _COLOURS[order.index(name) % len(_COLOURS)] if name in order else None, line)


# ------------------------------------------------------------------------------------------ commands


def _first_round(stack: Stack) -> None:
    """Read CRM, then subscribe, now instead of at the timers' next occurrence (up to 15 minutes away): what an
    admin does by hand after a deployment. Runs the `emailrouter` CLI (in order: the subscriptions follow the
    synced settings) with the host's own app settings, so it is the product's code path, not a shortcut."""
    if not {"functions", "identity", "graph", "dataverse", "azurite"} <= set(stack.names):
        return
    env = {**os.environ, **stack.app_settings(), **stack.client_env()}
    for command in (["sync-crm"], ["subscriptions", "reconcile"]):
        done = subprocess.run(  # noqa: S603 - our own CLI, fixed arguments
            [sys.executable, "-c", "import sys; from core.cli import main; sys.exit(main(sys.argv[1:]))", "--json",
             *command], cwd=stack.root, env=env, capture_output=True, text=True, timeout=300, check=False)
        outcome = "ok" if done.returncode == 0 else f"failed (exit {done.returncode}): {done.stderr.strip()[-300:]}"
        _say(f"first round: emailrouter {' '.join(command)}: {outcome}")


def _print_try_it(stack: Stack) -> None:
    """Copy-paste commands for the demo org (README "Try it" has the full walkthrough)."""
    _say(f"service logs: {stack.log_dir}/<service>.log")
    if stack.seed != "demo" or "graph" not in stack.names:
        return
    where = "" if stack.state_dir == (stack.root / ".local").resolve() else f" --state-dir {stack.state_dir}"
    py = ".venv/bin/python"
    for line in (
        "try it, in another terminal (README, 'Try it'):",
        f"  {py} -m local.send_test_mail{where} --from nora@northwind.example --to erin@contoso.example "
        "--subject 'Quarterly review'",
        f"  {py} -m local.send_test_mail{where} --crm --from alice@contoso.example --to fiona@fabrikam.example "
        "--subject 'Your proposal' --regarding opportunity",
        "  .venv/bin/emailrouter status      .venv/bin/emailrouter explain '<Message-ID printed above>'",
        f"  curl -sk {stack.graph_url}/_emulator/outbox",
    ):
        _say(line)


def _watch_with_live_view(stack: Stack, stop: threading.Event) -> int:
    """--live: the live view in this terminal while a thread watches the services; either ending stops both."""
    from local.live_view import run as run_live_view

    outcome = {"code": EXIT_OK}

    def watch() -> None:
        outcome["code"] = stack.watch(stop)
        stop.set()

    watcher = threading.Thread(target=watch, name="stack-watch", daemon=True)
    watcher.start()
    run_live_view(stack.state_dir, stop=stop, host_log=stack.host_log)
    stop.set()
    watcher.join(5)
    return outcome["code"]


def _ports_from(args: argparse.Namespace) -> Ports:
    ports = Ports()
    for name in Ports.names():
        value = getattr(args, f"{name}_port", None)
        if value is None:
            value = os.environ.get(Ports.env_name(name)) or None
        if value is not None:
            setattr(ports, name, int(value))
    return ports


def cmd_up(args: argparse.Namespace) -> int:
    state_dir = args.state_dir.resolve()
    previous = _read_state(state_dir)
    if previous and previous.get("running") and _alive(previous.get("pids", {}).get("stack")):
        _say(f"a stack is already running (pid {previous['pids']['stack']}); `python -m local.stack down` first")
        return EXIT_USAGE
    try:
        only = None if not args.only else args.only.split(",")
        stack = Stack(state_dir, services=only, ports=_ports_from(args), seed=args.seed, fresh=args.fresh,
                      echo=None if args.live else _echo, say=_say)
    except ValueError as exc:
        _say(str(exc))
        return EXIT_USAGE
    if not stack.specs:
        for line in stack.skipped:
            _say(line)
        _say("nothing to start")
        return EXIT_USAGE
    if args.fresh:
        _say(f"--fresh: removing service data under {state_dir} (TLS material and keys kept)")
    if args.live:
        stack.log_dir.mkdir(parents=True, exist_ok=True)
        for old in stack.log_dir.glob("*.log"):
            old.unlink()
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = EXIT_OK
    try:
        stack.start(cancel=stop)
    except PortInUseError as exc:
        for line in str(exc).splitlines():
            _say(line)
        return EXIT_USAGE
    except StackError as exc:
        if stop.is_set():
            _say("stopped while starting")
            return EXIT_OK
        for line in str(exc).splitlines():
            _say(line)
        _say(f"stopped after a failure (exit {EXIT_SERVICE_FAILED})")
        return EXIT_SERVICE_FAILED
    try:
        _first_round(stack)
        _say(f"stack is up; endpoints and credentials in {state_dir / STACK_FILE}")
        if "functions" in stack.names:
            _say(f"functions: {stack.functions_root}/api (e.g. {stack.functions_root}/api/health). Ctrl-C stops.")
        _print_try_it(stack)
        code = _watch_with_live_view(stack, stop) if args.live else stack.watch(stop)
    finally:
        stack.stop()
        _say("stopped" if code == EXIT_OK else f"stopped after a failure (exit {code})")
    return code


def _read_state(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / STACK_FILE
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmd_status(args: argparse.Namespace) -> int:
    doc = _read_state(args.state_dir.resolve())
    if doc is None:
        print("no stack has been started here")
        return 3
    pids: dict[str, int] = doc.get("pids", {})
    running = bool(doc.get("running")) and _alive(pids.get("stack"))
    print(f"stack: {'running' if running else 'stopped'} (started {doc.get('started_at')})")
    for name, pid in pids.items():
        print(f"  {name:<10} pid {pid:<8} {'alive' if _alive(pid) else 'gone'}")
    for section in ("functions", "storage", "identity", "graph", "dataverse"):
        if section in doc:
            info = doc[section]
            where = info.get("base_url") or info.get("url") or info.get("queue")
            print(f"  {section:<10} {where}")
    return 0 if running and all(_alive(p) for p in pids.values()) else 1


def cmd_down(args: argparse.Namespace) -> int:
    state_dir = args.state_dir.resolve()
    doc = _read_state(state_dir)
    if doc is None:
        print("no stack has been started here")
        return 0
    pids: dict[str, int] = doc.get("pids", {})
    launcher = pids.get("stack")
    if _alive(launcher):
        assert isinstance(launcher, int)
        os.kill(launcher, signal.SIGTERM)  # the launcher stops its services in order
        deadline = time.monotonic() + 60
        while _alive(launcher) and time.monotonic() < deadline:
            time.sleep(0.2)
    # A launcher killed with -9 cannot clean up: stop what it left, by process group.
    for name, pid in pids.items():
        if name != "stack" and _alive(pid):
            print(f"stopping leftover {name} (pid {pid})")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    print("stack is down")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m local.stack", description="Run the local stack")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start everything and stay in the foreground until Ctrl-C")
    status = sub.add_parser("status", help="print what stack.json says and whether its processes are alive")
    down = sub.add_parser("down", help="stop a running stack (the launcher, or leftovers of a killed one)")
    for command in (up, status, down):
        command.add_argument("--state-dir", type=Path, default=ROOT / ".local",
                             help="where stack.json, TLS material, keys, logs and service data live (default .local/)")
    up.add_argument("--fresh", action="store_true", help="delete service data (Azurite, emulator state) first")
    up.add_argument("--live", action="store_true",
                    help="show the live view in this terminal; service output only in <state-dir>/logs/<name>.log")
    up.add_argument("--seed", choices=("demo", "none"), default="demo",
                    help="demo: the Contoso demo org (local/demo_org.py) on first start (default); none: empty")
    up.add_argument("--only", help="comma-separated services to start (default: all available): "
                    + ",".join(s.name for s in SERVICES))
    for name, default in vars(Ports()).items():
        up.add_argument(Ports.flag(name), type=int, default=None,
                        help=f"default {default} (or env {Ports.env_name(name)}); 0 = any free port")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Library messages (e.g. "generated function keys into ...") carry the launcher's prefix.
    logging.basicConfig(level=logging.INFO, format="[stack] %(message)s", stream=sys.stdout)
    # The launcher's own HTTP (health probes, the live view's reads) is not news: SDK request logs stay quiet.
    for noisy in ("azure", "httpx", "httpcore", "msal", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    handler = {"up": cmd_up, "status": cmd_status, "down": cmd_down}[args.command]
    return handler(args)


@contextlib.contextmanager
def running(state_dir: Path | str, **options: Any) -> Iterator[Stack]:
    """``Stack(state_dir, **options)`` started for the ``with`` block, stopped after it."""
    stack = Stack(state_dir, **options)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
