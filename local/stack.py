"""The local stack launcher: ``python -m local.stack up [--fresh] [--only a,b]``, ``status``, ``down``.

It starts and owns the local processes (Azurite, the emulators whose modules exist, the Functions
host), each in its own process group, waits until each is healthy, streams their output with a
``[name]`` prefix, writes ``.local/stack.json`` and, on Ctrl-C / SIGTERM, stops them in reverse
order (TERM, then KILL after a grace) so nothing is left behind. If one dies, it says which, with
its exit code and last lines, stops the rest and exits non-zero: nothing is restarted silently.

Adding a service = appending a :class:`ServiceSpec` to :data:`SERVICES` (see docs/local-host.md).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import datetime as dt
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from emulators.common import demo
from emulators.common.tls import TlsMaterial, client_env, ensure_tls
from local.azurite import ACCOUNT, ACCOUNT_KEY, ensure_installed
from local.host.keys import HostKeys, load_or_create_keys

__all__ = ["SERVICES", "HealthCheck", "Ports", "ServiceSpec", "StackContext", "main"]

ROOT = Path(__file__).resolve().parent.parent
STACK_FILE = "stack.json"
EXIT_OK, EXIT_SERVICE_FAILED, EXIT_USAGE = 0, 1, 2


# ------------------------------------------------------------------------------------------ model


@dataclass
class Ports:
    functions: int = 7071
    blob: int = 10000
    queue: int = 10001
    table: int = 10002
    identity: int = 8440
    graph: int = 8441
    smtp: int = 2525
    dataverse: int = 8442


@dataclass
class StackContext:
    root: Path
    state_dir: Path
    ports: Ports
    tls: TlsMaterial
    keys: HostKeys
    python: str = sys.executable
    started: list[str] = field(default_factory=list)  # names of services selected to run, in order
    seed: str = "demo"  # "demo": the Contoso org from local/demo_org.py on first start; "none": empty emulators

    @property
    def identity_url(self) -> str:
        return f"https://127.0.0.1:{self.ports.identity}"

    @property
    def graph_url(self) -> str:
        return f"https://127.0.0.1:{self.ports.graph}"

    @property
    def dataverse_url(self) -> str:
        return f"https://127.0.0.1:{self.ports.dataverse}"

    @property
    def functions_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.functions}"

    @property
    def storage_connection_string(self) -> str:
        p = self.ports
        return (
            "DefaultEndpointsProtocol=http;"
            f"AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{p.blob}/{ACCOUNT};"
            f"QueueEndpoint=http://127.0.0.1:{p.queue}/{ACCOUNT};"
            f"TableEndpoint=http://127.0.0.1:{p.table}/{ACCOUNT};"
        )

    @property
    def settings_file(self) -> Path:
        return self.state_dir / "local.settings.json"


@dataclass(frozen=True)
class HealthCheck:
    """Healthy when every TCP port accepts a connection and (if set) GET ``http_url`` answers 200."""

    tcp_ports: tuple[int, ...] = ()
    http_url: str | None = None

    def probe(self, tls: TlsMaterial) -> bool:
        for port in self.tcp_ports:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    pass
            except OSError:
                return False
        if self.http_url is None:
            return True
        ctx = ssl.create_default_context(cafile=str(tls.bundle)) if self.http_url.startswith("https") else None
        try:
            with urllib.request.urlopen(self.http_url, timeout=2, context=ctx) as resp:  # noqa: S310 - our URL
                return int(resp.status) == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False


def _nothing(ctx: StackContext) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    argv: Callable[[StackContext], list[str]]
    health: Callable[[StackContext], HealthCheck]
    ports: Callable[[StackContext], dict[str, int]]  # what must be free before starting (label -> port)
    env: Callable[[StackContext], dict[str, str]] = _nothing  # added to the launcher's environment
    env_unset: Callable[[StackContext], list[str]] = lambda ctx: []  # removed from it
    depends_on: tuple[str, ...] = ()
    # Why it cannot run here (None = it can): lets emulators be optional until they all exist.
    unavailable: Callable[[], str | None] = lambda: None
    stack_json: Callable[[StackContext], dict[str, Any]] = _nothing  # top-level sections it contributes
    app_settings: Callable[[StackContext], dict[str, str]] = _nothing  # Values for the host's settings
    prepare: Callable[[StackContext], None] | None = None  # runs just before the start
    fresh_dirs: tuple[str, ...] = ()  # state_dir subfolders `--fresh` deletes
    startup_timeout: float = 90.0
    stop_timeout: float = 20.0


def _module_missing(module: str) -> Callable[[], str | None]:
    def check() -> str | None:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        return None if found else f"module {module} not found (not written yet)"

    return check


# ------------------------------------------------------------------------------------------ services


def _azurite_argv(ctx: StackContext) -> list[str]:
    p = ctx.ports
    return [
        str(ensure_installed()),
        "--blobHost", "127.0.0.1", "--blobPort", str(p.blob),
        "--queueHost", "127.0.0.1", "--queuePort", str(p.queue),
        "--tableHost", "127.0.0.1", "--tablePort", str(p.table),
        "--location", str(ctx.state_dir / "azurite"),
        "--skipApiVersionCheck", "--disableTelemetry", "--loose",
    ]


def _azurite_json(ctx: StackContext) -> dict[str, Any]:
    p = ctx.ports
    return {"storage": {
        "connection_string": ctx.storage_connection_string,
        "queue": f"http://127.0.0.1:{p.queue}/{ACCOUNT}",
        "table": f"http://127.0.0.1:{p.table}/{ACCOUNT}",
        "blob": f"http://127.0.0.1:{p.blob}/{ACCOUNT}",
    }}


def _identity_json(ctx: StackContext) -> dict[str, Any]:
    return {
        "identity": {"url": ctx.identity_url, "authority": f"{ctx.identity_url}/{demo.TENANT_ID}",
                     "tenant_id": demo.TENANT_ID},
        "app": {"client_id": demo.APP_CLIENT_ID, "client_secret": demo.APP_CLIENT_SECRET},
    }


def _identity_settings(ctx: StackContext) -> dict[str, str]:
    return {
        "GRAPH_TENANT_ID": demo.TENANT_ID,
        "GRAPH_CLIENT_ID": demo.APP_CLIENT_ID,
        "GRAPH_CLIENT_SECRET": demo.APP_CLIENT_SECRET,
        "GRAPH_AUTHORITY_HOST": ctx.identity_url,
    }


def _emulator_health(port: Callable[[StackContext], int]) -> Callable[[StackContext], HealthCheck]:
    return lambda ctx: HealthCheck(http_url=f"https://127.0.0.1:{port(ctx)}/_emulator/health")


def _schedule_defaults() -> dict[str, str]:
    """Timer bindings use ``%X_SCHEDULE%``; the host resolves them from app settings only (no code
    defaults), so the generated settings carry the documented defaults."""
    try:
        from core.config import SETTINGS
    except ImportError:
        return {}
    return {s.name: s.default for s in SETTINGS if s.name.endswith("_SCHEDULE") and s.default is not None}


def _prepare_functions(ctx: StackContext) -> None:
    _functions_settings_file(ctx)
    _apply_runtime_seed(ctx)


def _seed_args(ctx: StackContext, emulator: str) -> list[str]:
    """``--seed FILE`` for an emulator when the demo org is wanted. Emulators apply a seed only to a new
    database, so the org (and whatever the user added) is kept across restarts until ``make reset``."""
    if ctx.seed != "demo":
        return []
    from local.demo_org import write_seed_files

    return ["--seed", str(write_seed_files(ctx.state_dir / "seeds")[emulator])]


def _apply_runtime_seed(ctx: StackContext) -> None:
    """The part of the demo org that only the Web API can create (the CRM forward-mailbox record); idempotent."""
    if ctx.seed != "demo" or not {"identity", "dataverse"} <= set(ctx.started):
        return
    from local.demo_org import apply_runtime_seed

    created = apply_runtime_seed(
        authority=f"{ctx.identity_url}/{demo.TENANT_ID}", dataverse_url=ctx.dataverse_url, ca_bundle=ctx.tls.bundle,
        storage_connection_string=ctx.storage_connection_string if "azurite" in ctx.started else None)
    for line in created:
        _say(f"demo org: created {line}")


def _first_round(ctx: StackContext) -> None:
    """Read CRM, then subscribe, now instead of at the timers' next occurrence (up to 15 minutes away): what an
    admin does by hand after a deployment. Runs the `emailrouter` CLI (in order: the subscriptions follow the
    synced settings) with the host's own app settings, so it is the product's code path, not a shortcut."""
    if "functions" not in ctx.started or not {"identity", "graph", "dataverse", "azurite"} <= set(ctx.started):
        return
    env = {**os.environ, **json.loads(ctx.settings_file.read_text())["Values"], **client_env(ctx.tls)}
    for command in (["sync-crm"], ["subscriptions", "reconcile"]):
        done = subprocess.run(  # noqa: S603 - our own CLI, fixed arguments
            [ctx.python, "-c", "import sys; from core.cli import main; sys.exit(main(sys.argv[1:]))", "--json",
             *command], cwd=ctx.root, env=env, capture_output=True, text=True, timeout=300, check=False)
        outcome = "ok" if done.returncode == 0 else f"failed (exit {done.returncode}): {done.stderr.strip()[-300:]}"
        _say(f"first round: emailrouter {' '.join(command)}: {outcome}")


def _print_try_it(ctx: StackContext, state_dir: Path, log_dir: Path | None) -> None:
    """Copy-paste commands for the demo org (README "Try it" has the full walkthrough)."""
    if log_dir is not None:
        _say(f"service logs: {log_dir}/<service>.log")
    if ctx.seed != "demo" or "graph" not in ctx.started:
        return
    where = "" if state_dir == (ctx.root / ".local").resolve() else f" --state-dir {state_dir}"
    py = ".venv/bin/python"
    for line in (
        "try it, in another terminal (README, 'Try it'):",
        f"  {py} -m local.send_test_mail{where} --from nora@northwind.example --to erin@contoso.example "
        "--subject 'Quarterly review'",
        f"  {py} -m local.send_test_mail{where} --crm --from alice@contoso.example --to fiona@fabrikam.example "
        "--subject 'Your proposal' --regarding opportunity",
        "  .venv/bin/emailrouter status      .venv/bin/emailrouter explain '<Message-ID printed above>'",
        f"  curl -sk {ctx.graph_url}/_emulator/outbox",
    ):
        _say(line)


def _watch_with_live_view(stack: Stack, state_dir: Path) -> int:
    """--live: the live view in this terminal while a thread watches the services; either ending stops both."""
    from local.live_view import run as run_live_view

    outcome = {"code": EXIT_OK}

    def watch() -> None:
        outcome["code"] = stack.watch()
        stack.stop_requested.set()

    watcher = threading.Thread(target=watch, name="stack-watch", daemon=True)
    watcher.start()
    assert stack.log_dir is not None
    run_live_view(state_dir, stop=stack.stop_requested, host_log=stack.log_dir / "functions.log")
    stack.stop_requested.set()
    watcher.join(5)
    return outcome["code"]


def _functions_settings_file(ctx: StackContext) -> None:
    """Write .local/local.settings.json: the user's own Values (if any) under the stack's endpoints."""
    values: dict[str, str] = {}
    user_file = ctx.root / "local.settings.json"
    if user_file.exists():
        with contextlib.suppress(ValueError, OSError):
            values.update({k: str(v) for k, v in (json.loads(user_file.read_text()).get("Values") or {}).items()})
        _say(f"merging Values from {user_file} (the stack's endpoints win)")
    values.update(_schedule_defaults())
    for spec in SERVICES:
        if spec.name in ctx.started:
            values.update(spec.app_settings(ctx))
    values.update(client_env(ctx.tls))
    doc = {
        "IsEncrypted": False,
        "Values": values,
        "Host": {"LocalHttpPort": ctx.ports.functions},
        "Keys": ctx.keys.to_json(),
    }
    _write_private_json(ctx.settings_file, doc)


def _functions_settings(ctx: StackContext) -> dict[str, str]:
    values = {
        "FUNCTIONS_WORKER_RUNTIME": "python",
        "WEBHOOK_BASE_URL": f"{ctx.functions_url}/api",
        "WEBHOOK_FUNCTION_KEY": ctx.keys.default_function_key,
    }
    if "azurite" in ctx.started:
        values["AzureWebJobsStorage"] = ctx.storage_connection_string
    return values


def _functions_env_unset(ctx: StackContext) -> list[str]:
    # Core Tools semantics: the environment beats local.settings.json. The stack's file must win, so
    # the host gets an environment without those names.
    return list(json.loads(ctx.settings_file.read_text())["Values"])


SERVICES: list[ServiceSpec] = [
    ServiceSpec(
        name="azurite",
        argv=_azurite_argv,
        health=lambda ctx: HealthCheck(tcp_ports=(ctx.ports.blob, ctx.ports.queue, ctx.ports.table)),
        ports=lambda ctx: {"blob": ctx.ports.blob, "queue": ctx.ports.queue, "table": ctx.ports.table},
        stack_json=_azurite_json,
        fresh_dirs=("azurite",),
    ),
    ServiceSpec(
        name="identity",
        argv=lambda ctx: [ctx.python, "-m", "emulators.identity", "--port", str(ctx.ports.identity),
                          "--tls-dir", str(ctx.state_dir / "tls"), *_seed_args(ctx, "identity")],
        health=_emulator_health(lambda ctx: ctx.ports.identity),
        ports=lambda ctx: {"https": ctx.ports.identity},
        unavailable=_module_missing("emulators.identity.__main__"),
        stack_json=_identity_json,
        app_settings=_identity_settings,
    ),
    ServiceSpec(
        name="graph",
        argv=lambda ctx: [ctx.python, "-m", "emulators.graph", "--port", str(ctx.ports.graph),
                          "--smtp-port", str(ctx.ports.smtp), "--tls-dir", str(ctx.state_dir / "tls"),
                          "--identity-url", ctx.identity_url, "--state-dir", str(ctx.state_dir / "graph"),
                          *_seed_args(ctx, "graph")],
        health=_emulator_health(lambda ctx: ctx.ports.graph),
        ports=lambda ctx: {"https": ctx.ports.graph, "smtp": ctx.ports.smtp},
        depends_on=("identity",),
        unavailable=_module_missing("emulators.graph.__main__"),
        stack_json=lambda ctx: {"graph": {"url": ctx.graph_url, "base_url": f"{ctx.graph_url}/v1.0",
                                          "smtp": f"127.0.0.1:{ctx.ports.smtp}"}},
        app_settings=lambda ctx: {"GRAPH_BASE_URL": f"{ctx.graph_url}/v1.0"},
        fresh_dirs=("graph",),
    ),
    ServiceSpec(
        name="dataverse",
        argv=lambda ctx: [ctx.python, "-m", "emulators.dataverse", "--port", str(ctx.ports.dataverse),
                          "--tls-dir", str(ctx.state_dir / "tls"), "--identity-url", ctx.identity_url,
                          "--state-dir", str(ctx.state_dir / "dataverse"), *_seed_args(ctx, "dataverse")],
        health=_emulator_health(lambda ctx: ctx.ports.dataverse),
        ports=lambda ctx: {"https": ctx.ports.dataverse},
        depends_on=("identity",),
        unavailable=_module_missing("emulators.dataverse.__main__"),
        stack_json=lambda ctx: {"dataverse": {"url": ctx.dataverse_url,
                                              "api_url": f"{ctx.dataverse_url}/api/data/v9.2"}},
        app_settings=lambda ctx: {"DATAVERSE_URL": ctx.dataverse_url},
        fresh_dirs=("dataverse",),
    ),
    ServiceSpec(
        name="functions",
        argv=lambda ctx: [ctx.python, "-m", "local.host", "--port", str(ctx.ports.functions),
                          "--script-root", str(ctx.root), "--settings", str(ctx.settings_file),
                          "--grace", "10"],
        health=lambda ctx: HealthCheck(http_url=f"{ctx.functions_url}/admin/host/ping"),
        ports=lambda ctx: {"http": ctx.ports.functions},
        env_unset=_functions_env_unset,
        app_settings=_functions_settings,
        stack_json=lambda ctx: {"functions": {"base_url": f"{ctx.functions_url}/api",
                                              "function_key": ctx.keys.default_function_key,
                                              "admin_key": ctx.keys.master}},
        prepare=_prepare_functions,
        stop_timeout=20.0,  # the host's own grace (10 s) plus margin
    ),
]


# ------------------------------------------------------------------------------------------ output

_COLOURS = ("36", "35", "33", "32", "34", "31", "96", "95")
_print_lock = threading.Lock()


def _use_colour() -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    return bool(os.environ.get("FORCE_COLOR")) or sys.stdout.isatty()


def _emit(prefix: str, colour: str | None, line: str) -> None:
    tag = f"\x1b[{colour}m[{prefix}]\x1b[0m" if colour and _use_colour() else f"[{prefix}]"
    with _print_lock:
        sys.stdout.write(f"{tag} {line}\n")
        sys.stdout.flush()


def _say(line: str) -> None:
    _emit("stack", "1", line)


def _write_private_json(path: Path, doc: Mapping[str, Any]) -> None:
    """Atomic and 0600: these files hold the demo secret and the function keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ processes


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the launcher itself is killed (-9), so nothing is orphaned."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Running:
    spec: ServiceSpec
    proc: subprocess.Popen[bytes]
    colour: str
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=30))
    pump: threading.Thread | None = None
    log_path: Path | None = None  # --live: the service's output goes to this file instead of the terminal

    def start_pump(self) -> None:
        def pump(stream: IO[bytes]) -> None:
            log = self.log_path.open("a", encoding="utf-8") if self.log_path is not None else None
            try:
                for raw in iter(stream.readline, b""):
                    line = raw.decode("utf-8", errors="replace").rstrip("\n")
                    self.tail.append(line)
                    if log is not None:
                        log.write(line + "\n")
                        log.flush()
                    else:
                        _emit(self.spec.name, self.colour, line)
            finally:
                if log is not None:
                    log.close()

        assert self.proc.stdout is not None
        self.pump = threading.Thread(target=pump, args=(self.proc.stdout,), daemon=True, name=f"log-{self.spec.name}")
        self.pump.start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(self.spec.stop_timeout)
            except subprocess.TimeoutExpired:
                _say(f"{self.spec.name} did not stop within {self.spec.stop_timeout:g}s: killing it")
        # Whatever is left in its process group (grandchildren included) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if self.pump is not None:
            self.pump.join(2)


class Stack:
    def __init__(self, ctx: StackContext, specs: Sequence[ServiceSpec], *, log_dir: Path | None = None) -> None:
        self.ctx = ctx
        self.specs = list(specs)
        self.log_dir = log_dir
        self.running: list[Running] = []
        self.stop_requested = threading.Event()
        self.started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")

    # -- stack.json
    def write_state(self, *, running: bool) -> None:
        doc: dict[str, Any] = {
            "version": 1,
            "running": running,
            "started_at": self.started_at,
            "root": str(self.ctx.root),
            "ca_bundle": str(self.ctx.tls.bundle),
        }
        for r in self.running:
            doc.update(r.spec.stack_json(self.ctx))
        doc["pids"] = {"stack": os.getpid(), **{r.spec.name: r.proc.pid for r in self.running}}
        if not running:
            doc["stopped_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        _write_private_json(self.ctx.state_dir / STACK_FILE, doc)

    # -- lifecycle
    def start_all(self) -> bool:
        base_env = {**os.environ, **client_env(self.ctx.tls), "PYTHONUNBUFFERED": "1"}
        for i, spec in enumerate(self.specs):
            if self.stop_requested.is_set():
                return False
            if spec.prepare is not None:
                spec.prepare(self.ctx)
            env = dict(base_env)
            for name in spec.env_unset(self.ctx):
                env.pop(name, None)
            env.update(spec.env(self.ctx))
            argv = spec.argv(self.ctx)
            _say(f"starting {spec.name}: {' '.join(argv)}")
            proc = subprocess.Popen(  # noqa: S603 - argv built from our own specs
                argv, cwd=self.ctx.root, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            run = Running(spec, proc, _COLOURS[i % len(_COLOURS)],
                          log_path=self.log_dir / f"{spec.name}.log" if self.log_dir is not None else None)
            run.start_pump()
            self.running.append(run)
            if not self._wait_healthy(run):
                return False
            _say(f"{spec.name} is healthy (pid {proc.pid})")
        return True

    def _wait_healthy(self, run: Running) -> bool:
        check = run.spec.health(self.ctx)
        deadline = time.monotonic() + run.spec.startup_timeout
        while time.monotonic() < deadline:
            if self.stop_requested.is_set():
                return False
            if run.proc.poll() is not None:
                self._report_death(run, "while starting")
                return False
            if check.probe(self.ctx.tls):
                return True
            time.sleep(0.2)
        _say(f"{run.spec.name} did not become healthy within {run.spec.startup_timeout:g}s")
        self._print_tail(run)
        return False

    def _report_death(self, run: Running, when: str) -> None:
        if run.pump is not None:
            run.pump.join(2)  # let its last lines arrive
        _say(f"{run.spec.name} exited {when} with status {run.proc.returncode}")
        self._print_tail(run)

    def _print_tail(self, run: Running) -> None:
        if run.tail:
            _say(f"last lines of {run.spec.name}:")
            for line in run.tail:
                _say(f"  | {line}")

    def watch(self) -> int:
        while not self.stop_requested.wait(0.2):
            for run in self.running:
                if run.proc.poll() is not None:
                    self._report_death(run, "unexpectedly")
                    return EXIT_SERVICE_FAILED
        return EXIT_OK

    def stop_all(self) -> None:
        for run in reversed(self.running):
            if run.proc.poll() is None:
                _say(f"stopping {run.spec.name}")
            run.stop()


# ------------------------------------------------------------------------------------------ commands


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports_from(args: argparse.Namespace) -> Ports:
    ports = Ports()
    for name in vars(ports):
        value = getattr(args, f"{name}_port", None) or os.environ.get(f"STACK_{name.upper()}_PORT")
        if value:
            setattr(ports, name, int(value))
    return ports


def _select(only: str | None) -> list[ServiceSpec]:
    wanted = None if not only else {n.strip() for n in only.split(",") if n.strip()}
    known = {s.name for s in SERVICES}
    if wanted is not None and (unknown := wanted - known):
        raise SystemExit(f"unknown service(s) {sorted(unknown)}; known: {sorted(known)}")
    chosen: list[ServiceSpec] = []
    for spec in SERVICES:
        if wanted is not None and spec.name not in wanted:
            continue
        reason = spec.unavailable()
        missing = [d for d in spec.depends_on if d not in {c.name for c in chosen}]
        if reason is None and missing:
            reason = f"depends on {', '.join(missing)} which is not started"
        if reason is not None:
            _say(f"SKIPPING {spec.name}: {reason}")
            continue
        chosen.append(spec)
    return chosen


def cmd_up(args: argparse.Namespace) -> int:
    state_dir = args.state_dir.resolve()
    specs = _select(args.only)
    if not specs:
        _say("nothing to start")
        return EXIT_USAGE
    if args.fresh:
        for spec in specs:
            for sub in spec.fresh_dirs:
                shutil.rmtree(state_dir / sub, ignore_errors=True)
        _say(f"--fresh: removed service data under {state_dir} (TLS material and keys kept)")
    previous = _read_state(state_dir)
    if previous and previous.get("running") and _alive(previous.get("pids", {}).get("stack")):
        _say(f"a stack is already running (pid {previous['pids']['stack']}); `python -m local.stack down` first")
        return EXIT_USAGE
    ports = _ports_from(args)
    ctx = StackContext(
        root=ROOT, state_dir=state_dir, ports=ports, tls=ensure_tls(state_dir / "tls"),
        keys=load_or_create_keys(None, state_dir / "functions-keys.json"), started=[s.name for s in specs],
        seed=args.seed,
    )
    taken = [f"{s.name} {label} port {port}" for s in specs for label, port in s.ports(ctx).items()
             if not _port_free(port)]
    if taken:
        for t in taken:
            _say(f"port in use: {t} (choose another with the matching --*-port flag)")
        return EXIT_USAGE
    log_dir = None
    if args.live:
        log_dir = state_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        for old in log_dir.glob("*.log"):
            old.unlink()
    stack = Stack(ctx, specs, log_dir=log_dir)

    def on_signal(signum: int, frame: object) -> None:
        stack.stop_requested.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = EXIT_OK
    try:
        if not stack.start_all():
            code = EXIT_OK if stack.stop_requested.is_set() else EXIT_SERVICE_FAILED
        else:
            stack.write_state(running=True)
            _first_round(ctx)
            _say(f"stack is up; endpoints and credentials in {state_dir / STACK_FILE}")
            _say(f"functions: {ctx.functions_url}/api (e.g. {ctx.functions_url}/api/health). Ctrl-C stops.")
            _print_try_it(ctx, state_dir, stack.log_dir)
            code = _watch_with_live_view(stack, state_dir) if stack.log_dir is not None else stack.watch()
    finally:
        stack.stop_all()
        stack.write_state(running=False)
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
                             help="where stack.json, TLS material, keys and service data live (default .local/)")
    up.add_argument("--fresh", action="store_true", help="delete service data (Azurite, emulator state) first")
    up.add_argument("--live", action="store_true",
                    help="show the live view in this terminal; service output goes to <state-dir>/logs/<name>.log")
    up.add_argument("--seed", choices=("demo", "none"), default="demo",
                    help="demo: the Contoso demo org (local/demo_org.py) on first start (default); none: empty")
    up.add_argument("--only", help="comma-separated services to start (default: all available): "
                    + ",".join(s.name for s in SERVICES))
    for name, default in vars(Ports()).items():
        up.add_argument(f"--{name}-port", type=int, default=None,
                        help=f"default {default} (or env STACK_{name.upper()}_PORT)")
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


if __name__ == "__main__":
    sys.exit(main())
