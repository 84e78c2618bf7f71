"""The services of the local stack, as data: how each one starts, when it is healthy, which ports it needs, what it
adds to ``stack.json`` and to the Functions host's app settings. :class:`local.stack.Stack` (the one driver) starts
any subset of them.

Adding a service = appending a :class:`ServiceSpec` to :data:`SERVICES` (see docs/local-host.md).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import socket
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from emulators.common import demo
from emulators.common.tls import TlsMaterial, client_env
from local.azurite import ACCOUNT, ACCOUNT_KEY, ensure_installed
from local.host.keys import HostKeys

__all__ = [
    "SERVICES",
    "HealthCheck",
    "PortInUseError",
    "Ports",
    "ServiceSpec",
    "StackContext",
    "assign_ports",
    "port_is_free",
    "select_services",
    "write_private_json",
]

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------ ports


@dataclass
class Ports:
    """Every port of the stack; the defaults are ``make run``'s. 0 = pick a free one when the stack starts."""

    functions: int = 7071
    blob: int = 10000
    queue: int = 10001
    table: int = 10002
    identity: int = 8440
    graph: int = 8441
    smtp: int = 2525
    dataverse: int = 8442

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def any_free(cls) -> Ports:
        """All zero: every port is chosen free at start."""
        return cls(**dict.fromkeys(cls.names(), 0))

    @staticmethod
    def flag(name: str) -> str:
        return f"--{name}-port"

    @staticmethod
    def env_name(name: str) -> str:
        return f"STACK_{name.upper()}_PORT"


class PortInUseError(RuntimeError):
    """A chosen port is taken; the message names each port, its service and the flag that changes it."""

    def __init__(self, taken: list[tuple[str, str, int]]) -> None:
        self.taken = taken  # (service, port name, port)
        lines = [f"port in use: {port} ({service if service == name else f'{service} {name}'}); choose another "
                 f"with {Ports.flag(name)} or {Ports.env_name(name)}, or 0 for any free port"
                 for service, name, port in taken]
        super().__init__("\n".join(lines))


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Can a server bind ``host:port`` now? Probed the way our servers bind (uvicorn, aiosmtpd and Node set
    ``SO_REUSEADDR``), so a port whose last connection is still in TIME_WAIT counts as free, as it is to them,
    while a port another socket listens on (or is bound to) is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def assign_ports(ports: Ports, wanted: Mapping[str, Iterable[str]]) -> Ports:
    """``ports`` with every 0 among the wanted names replaced by a distinct free port; raises
    :class:`PortInUseError` (all conflicts at once) when a chosen one is taken. ``wanted``: service -> port names."""
    taken: list[tuple[str, str, int]] = []
    holders: list[socket.socket] = []
    chosen = Ports(**{n: getattr(ports, n) for n in Ports.names()})
    try:
        for service, names in wanted.items():
            for name in names:
                port = getattr(chosen, name)
                if port:
                    if not port_is_free(port):
                        taken.append((service, name, port))
                    continue
                # Held open until every free port is chosen, so no two services get the same one.
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                holders.append(s)
                setattr(chosen, name, int(s.getsockname()[1]))
    finally:
        for s in holders:
            s.close()
    if taken:
        raise PortInUseError(taken)
    return chosen


# ------------------------------------------------------------------------------------------ context


def _quiet(line: str) -> None:
    return None


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
    host_values: dict[str, str] = field(default_factory=dict)  # app settings that win over the generated ones
    host_lease_seconds: int | None = None  # the host's queue-message lease (None: the real host's 600 s)
    host_grace: float = 10.0  # seconds in-flight invocations get when the host stops
    timers: bool = True  # False: no *_SCHEDULE defaults, so the timer functions stay unresolved and never fire
    say: Callable[[str], None] = _quiet

    @property
    def identity_url(self) -> str:
        return f"https://127.0.0.1:{self.ports.identity}"

    @property
    def authority(self) -> str:
        return f"{self.identity_url}/{demo.TENANT_ID}"

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
        ctx = _ssl_context(str(tls.bundle)) if self.http_url.startswith("https") else None
        try:
            with urllib.request.urlopen(self.http_url, timeout=2, context=ctx) as resp:  # noqa: S310 - our URL
                return int(resp.status) == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False


@functools.lru_cache(maxsize=8)
def _ssl_context(bundle: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=bundle)


def _nothing(ctx: StackContext) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    argv: Callable[[StackContext], list[str]]
    health: Callable[[StackContext], HealthCheck]
    ports: tuple[str, ...]  # the Ports fields it listens on (checked or chosen free before starting)
    env: Callable[[StackContext], dict[str, str]] = _nothing  # added to the driver's environment
    env_unset: Callable[[StackContext], list[str]] = lambda ctx: []  # removed from it
    depends_on: tuple[str, ...] = ()  # selected only with these (they need not be healthy before it starts)
    # Why it cannot run here (None = it can): lets emulators be optional until they all exist.
    unavailable: Callable[[], str | None] = lambda: None
    stack_json: Callable[[StackContext], dict[str, Any]] = _nothing  # top-level sections it contributes
    app_settings: Callable[[StackContext], dict[str, str]] = _nothing  # Values for the host's settings
    prepare: Callable[[StackContext], None] | None = None  # runs just before the start
    fresh_dirs: tuple[str, ...] = ()  # state_dir subfolders `--fresh` deletes
    after_others: bool = False  # starts once every other selected service is healthy (the Functions host)
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


def write_private_json(path: Path, doc: Mapping[str, Any]) -> None:
    """Atomic and 0600: these files hold the demo secret and the function keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


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
        "identity": {"url": ctx.identity_url, "authority": ctx.authority, "tenant_id": demo.TENANT_ID},
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
    write_host_settings(ctx)
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
        authority=ctx.authority, dataverse_url=ctx.dataverse_url, ca_bundle=ctx.tls.bundle,
        storage_connection_string=ctx.storage_connection_string if "azurite" in ctx.started else None)
    for line in created:
        ctx.say(f"demo org: created {line}")


def write_host_settings(ctx: StackContext) -> None:
    """``<state>/local.settings.json`` for the host, lowest precedence first: the documented timer schedules (unless
    ``timers`` is off), the
    user's own ``local.settings.json`` Values (if any), every started service's endpoints, the CA bundle, then the
    driver's ``host_values`` (a test's compressed timers); plus the host port and the ``Keys`` section."""
    values: dict[str, str] = dict(_schedule_defaults()) if ctx.timers else {}
    user_file = ctx.root / "local.settings.json"
    if user_file.exists():
        with contextlib.suppress(ValueError, OSError):
            values.update({k: str(v) for k, v in (json.loads(user_file.read_text()).get("Values") or {}).items()})
        ctx.say(f"merging Values from {user_file} (the stack's endpoints win)")
    for spec in SERVICES:
        if spec.name in ctx.started:
            values.update(spec.app_settings(ctx))
    values.update(client_env(ctx.tls))
    values.update(ctx.host_values)
    doc = {
        "IsEncrypted": False,
        "Values": values,
        "Host": {"LocalHttpPort": ctx.ports.functions},
        "Keys": ctx.keys.to_json(),
    }
    write_private_json(ctx.settings_file, doc)


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


def _functions_argv(ctx: StackContext) -> list[str]:
    argv = [ctx.python, "-m", "local.host", "--port", str(ctx.ports.functions), "--script-root", str(ctx.root),
            "--settings", str(ctx.settings_file), "--grace", f"{ctx.host_grace:g}"]
    if ctx.host_lease_seconds is not None:
        argv += ["--lease-seconds", str(ctx.host_lease_seconds)]
    return argv


SERVICES: list[ServiceSpec] = [
    ServiceSpec(
        name="azurite",
        argv=_azurite_argv,
        health=lambda ctx: HealthCheck(tcp_ports=(ctx.ports.blob, ctx.ports.queue, ctx.ports.table)),
        ports=("blob", "queue", "table"),
        stack_json=_azurite_json,
        fresh_dirs=("azurite",),
    ),
    ServiceSpec(
        name="identity",
        argv=lambda ctx: [ctx.python, "-m", "emulators.identity", "--port", str(ctx.ports.identity),
                          "--tls-dir", str(ctx.state_dir / "tls"), *_seed_args(ctx, "identity")],
        health=_emulator_health(lambda ctx: ctx.ports.identity),
        ports=("identity",),
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
        ports=("graph", "smtp"),
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
        ports=("dataverse",),
        depends_on=("identity",),
        unavailable=_module_missing("emulators.dataverse.__main__"),
        stack_json=lambda ctx: {"dataverse": {"url": ctx.dataverse_url,
                                              "api_url": f"{ctx.dataverse_url}/api/data/v9.2"}},
        app_settings=lambda ctx: {"DATAVERSE_URL": ctx.dataverse_url},
        fresh_dirs=("dataverse",),
    ),
    ServiceSpec(
        name="functions",
        argv=_functions_argv,
        health=lambda ctx: HealthCheck(http_url=f"{ctx.functions_url}/admin/host/ping"),
        ports=("functions",),
        env_unset=_functions_env_unset,
        app_settings=_functions_settings,
        stack_json=lambda ctx: {"functions": {"base_url": f"{ctx.functions_url}/api",
                                              "function_key": ctx.keys.default_function_key,
                                              "admin_key": ctx.keys.master}},
        prepare=_prepare_functions,
        after_others=True,
        stop_timeout=20.0,  # the host's own grace (10 s) plus margin
    ),
]


def select_services(only: Iterable[str] | None) -> tuple[list[ServiceSpec], list[str]]:
    """The specs to start, in :data:`SERVICES` order, and why others were skipped (unavailable here, or a
    dependency not selected). ``None`` = every available service. Unknown names raise ``ValueError``."""
    wanted = None if only is None else {n.strip() for n in only if n.strip()}
    known = {s.name for s in SERVICES}
    if wanted is not None and (unknown := wanted - known):
        raise ValueError(f"unknown service(s) {sorted(unknown)}; known: {sorted(known)}")
    chosen: list[ServiceSpec] = []
    skipped: list[str] = []
    for spec in SERVICES:
        if wanted is not None and spec.name not in wanted:
            continue
        reason = spec.unavailable()
        missing = [d for d in spec.depends_on if d not in {c.name for c in chosen}]
        if reason is None and missing:
            reason = f"depends on {', '.join(missing)} which is not started"
        if reason is not None:
            skipped.append(f"SKIPPING {spec.name}: {reason}")
            continue
        chosen.append(spec)
    return chosen, skipped
