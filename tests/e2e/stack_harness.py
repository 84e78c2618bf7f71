"""A reusable harness for whole-stack tests (e2e and chaos): the local stack as a subprocess, our own Functions host
process (so it can be SIGKILLed and restarted), an org seeded through the emulators and the CRM sync, and the
test's own independent view of CRM, the queues, the tables and the outbox.

How it runs:

* ``python -m local.stack up --only azurite,identity,graph,dataverse`` in a temporary state dir, every port free
  and chosen here. The launcher never restarts a child and stops the whole stack when one dies, so the Functions
  host is *not* one of its children: the harness writes the host's settings with the launcher's own ``functions``
  service ``prepare`` hook (the same generated ``local.settings.json``: schedule defaults, every service's values,
  the CA bundle, the ``Keys`` section), merges the test's extra ``Values`` into a copy (the launcher's only
  documented way to add Values is a ``local.settings.json`` in the repository root, shared by every developer and
  test, so it is not used) and runs ``python -m local.host`` itself.
* The host is started through this module (``python -m tests.e2e.stack_harness host --lease S -- <host args>``)
  so that a test can compress time: the local host keeps a running queue message invisible for 600 s (the real
  host's value), which after a SIGKILL would stall a CI run for ten minutes. ``--lease`` shortens that one
  constant; everything else is the unmodified host.

Everything listens on 127.0.0.1; every wait is bounded by a deadline and polls often.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import httpx
import msal
import psutil
from azure.data.tables import TableServiceClient, UpdateMode
from azure.storage.queue import QueueServiceClient

ROOT = Path(__file__).resolve().parents[2]
DOMAIN = "contoso.example"
TENANT_ID = "c0ffee00-0000-4000-8000-000000000001"
APP_CLIENT_ID = "c0ffee00-0000-4000-8000-0000000000a1"
TABLE_PREFIX = "emailrouter"
ODATA = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"}
NO_COLOR = {"NO_COLOR": "1"}

# CRM option values (dataverse reference): delivery methods, filters, approval.
NONE, OUTLOOK, INDIVIDUAL, FORWARD = 0, 1, 2, 3
ROUTER = 2
FILTER_ALL, FILTER_REPLIES, FILTER_CONTACTS = 0, 1, 2
APPROVED, PENDING = 1, 2

# Demo CRM records of the Dataverse emulator's default seed (senders to resolve against).
FABRIKAM_ACCOUNT = "c0ffee00-0000-4000-8000-00000000ac01"
CONTACT_FIONA = ("fiona@fabrikam.example", "c0ffee00-0000-4000-8000-00000000c001")
CONTACT_GUS = ("gus@example.org", "c0ffee00-0000-4000-8000-00000000c002")
LEAD_LENA = ("lena@prospect.example", "c0ffee00-0000-4000-8000-000000001e01")
KNOWN_SENDERS: tuple[tuple[str, str], ...] = (CONTACT_FIONA, CONTACT_GUS, LEAD_LENA)

T = TypeVar("T")


class HarnessError(AssertionError):
    """The stack or a wait did not behave; the message carries what is needed to debug it."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll(what: str, check: Callable[[], T | None], *, within: float, every: float = 0.25,
         detail: Callable[[], str] | None = None) -> T:
    """Call ``check`` until it returns something truthy (returned), or fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    last: T | None = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() >= deadline:
            extra = f"\n{detail()}" if detail else ""
            raise HarnessError(f"timed out after {within:.0f}s waiting for {what}{extra}")
        time.sleep(every)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: a killed test run leaves no host behind


def _launcher_has_seed_option() -> bool:
    """Newer launchers seed a demo org unless ``--seed none``; the harness's org must be the only one with a
    forward mailbox (the CRM sync assigns the sink only when exactly one exists)."""
    from local.stack import StackContext

    return "seed" in {f.name for f in dataclasses.fields(StackContext)}


def user_id(local: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"stack-harness/systemuser/{local}"))


def object_id(local: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"entra/user/{local}@{DOMAIN}"))


def queue_id(local: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"stack-harness/queue/{local}"))


# ------------------------------------------------------------------------------------------------ the org


@dataclass(frozen=True)
class OrgMailbox:
    """One mailbox of the seeded org, with the CRM values the router will read through the CRM sync."""

    local: str
    kind: str  # "user" | "queue" | "sink"
    inbound: int = NONE
    outbound: int = NONE
    filter: int = FILTER_ALL
    approval: int = APPROVED
    queue_owner: str | None = None  # local part of the queue's owning user

    @property
    def address(self) -> str:
        return f"{self.local}@{DOMAIN}"

    @property
    def crm_id(self) -> str:
        return queue_id(self.local) if self.kind == "queue" else user_id(self.local)

    @property
    def watched(self) -> bool:
        """The router reads this mailbox itself (Graph subscription + delta)."""
        return self.kind == "sink" or (self.inbound == INDIVIDUAL and self.approval == APPROVED)

    @property
    def routes_outbound(self) -> bool:
        return self.kind == "user" and self.outbound == ROUTER and self.approval == APPROVED


@dataclass(frozen=True)
class Org:
    tag: str
    mailboxes: tuple[OrgMailbox, ...]
    sink: OrgMailbox

    def by_address(self, address: str) -> OrgMailbox:
        for m in (*self.mailboxes, self.sink):
            if m.address == address.lower():
                return m
        raise KeyError(address)

    @property
    def users(self) -> list[OrgMailbox]:
        return [m for m in self.mailboxes if m.kind == "user"]

    @property
    def queues(self) -> list[OrgMailbox]:
        return [m for m in self.mailboxes if m.kind == "queue"]


# The mix of methods, repeated until the org has the requested size: individual mailboxes under each filter,
# forward-mailbox users, Outlook and None users, an unapproved user and router-watched queues.
_PATTERN: tuple[dict[str, Any], ...] = (
    {"kind": "user", "inbound": INDIVIDUAL, "outbound": ROUTER, "filter": FILTER_ALL},
    {"kind": "user", "inbound": FORWARD, "outbound": ROUTER, "filter": FILTER_ALL},
    {"kind": "user", "inbound": INDIVIDUAL, "outbound": NONE, "filter": FILTER_CONTACTS},
    {"kind": "user", "inbound": OUTLOOK, "outbound": OUTLOOK, "filter": FILTER_ALL},
    {"kind": "user", "inbound": INDIVIDUAL, "outbound": ROUTER, "filter": FILTER_REPLIES},
    {"kind": "queue", "inbound": INDIVIDUAL, "outbound": NONE, "filter": FILTER_ALL},
    {"kind": "user", "inbound": NONE, "outbound": NONE, "filter": FILTER_ALL},
    {"kind": "user", "inbound": INDIVIDUAL, "outbound": ROUTER, "filter": FILTER_ALL, "approval": PENDING},
)


def build_org(n_mailboxes: int, *, tag: str | None = None) -> Org:
    tag = tag or uuid.uuid4().hex[:6]
    boxes: list[OrgMailbox] = []
    owners: list[str] = []
    for i in range(n_mailboxes):
        spec = dict(_PATTERN[i % len(_PATTERN)])
        kind = spec.pop("kind")
        local = f"{'q' if kind == 'queue' else 'u'}{tag}{i:03d}"
        if kind == "queue":
            owner = owners[len(boxes) % len(owners)] if owners else None
            boxes.append(OrgMailbox(local, "queue", queue_owner=owner, **spec))
        else:
            boxes.append(OrgMailbox(local, "user", **spec))
            owners.append(local)
    return Org(tag, tuple(boxes), OrgMailbox(f"sink{tag}", "sink", inbound=INDIVIDUAL))


def graph_seed(org: Org) -> dict[str, Any]:
    users: list[dict[str, Any]] = []
    for m in (*org.mailboxes, org.sink):
        user: dict[str, Any] = {"userPrincipalName": m.address, "displayName": m.local, "mail": m.address}
        if m.kind == "user":
            user["id"] = object_id(m.local)
        if m.inbound == FORWARD:
            user["rules"] = [{
                "displayName": "Email Router: forward to CRM", "sequence": 1, "isEnabled": True, "conditions": {},
                "actions": {"forwardAsAttachmentTo": [{"emailAddress": {"address": org.sink.address}}]}}]
        users.append(user)
    return {"users": users}


def dataverse_seed(org: Org) -> dict[str, Any]:
    users = [{
        "systemuserid": m.crm_id, "firstname": "Chaos", "lastname": m.local,
        "internalemailaddress": m.address, "domainname": m.address, "azureactivedirectoryobjectid": object_id(m.local),
        "incomingemaildeliverymethod": m.inbound, "outgoingemaildeliverymethod": m.outbound,
        "emailrouteraccessapproval": m.approval, "isemailaddressapprovedbyo365admin": m.approval == APPROVED,
        "usersettings": {"incomingemailfilteringmethod": m.filter},
    } for m in org.users]
    queues = [{
        "queueid": m.crm_id, "name": f"Queue {m.local}", "emailaddress": m.address,
        "incomingemaildeliverymethod": m.inbound, "outgoingemaildeliverymethod": m.outbound,
        "emailrouteraccessapproval": m.approval, "incomingemailfilteringmethod": m.filter,
        "ownerid@odata.bind": f"/systemusers({user_id(m.queue_owner or org.users[0].local)})",
    } for m in org.queues]
    return {"systemusers": users, "queues": queues}


def sink_mailbox_record(org: Org) -> dict[str, Any]:
    """The CRM forward mailbox record (no seed section exists for mailboxes; created through the Web API)."""
    # Only create-valid columns (mailbox.md): isforwardmailbox is read-only and defaults to Yes for a mailbox
    # without a regarding user/queue; the enabledfor* flags default to Yes.
    return {"name": f"Forward mailbox {org.tag}", "emailaddress": org.sink.address,
            "incomingemaildeliverymethod": INDIVIDUAL, "outgoingemaildeliverymethod": NONE,
            "emailrouteraccessapproval": APPROVED, "processanddeleteemails": False}


# ------------------------------------------------------------------------------------------------ the stack


@dataclass
class HostProcess:
    proc: subprocess.Popen[bytes]
    started: float


@dataclass
class Stack:
    """The running stack: endpoints from stack.json, our Functions host, and clients for the test's own checks."""

    workdir: Path
    extra_values: dict[str, str] = field(default_factory=dict)
    lease_seconds: int = 600
    launcher: subprocess.Popen[bytes] | None = None
    doc: dict[str, Any] = field(default_factory=dict)
    host: HostProcess | None = None
    host_settings: Path | None = None
    functions_port: int = 0
    host_starts: int = 0
    _http: httpx.Client | None = None
    _dv_app: msal.ConfidentialClientApplication | None = None
    _graph_app: msal.ConfidentialClientApplication | None = None
    caller_id: str | None = None  # CRM user the test's own Dataverse calls impersonate (set after seeding)
    _saved_env: dict[str, str | None] = field(default_factory=dict)

    # -- lifecycle ---------------------------------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def launcher_log(self) -> Path:
        return self.workdir / "stack.log"

    @property
    def host_log(self) -> Path:
        return self.workdir / "host.log"

    def start(self, *, within: float = 240.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        ports = {name: free_port() for name in ("blob", "queue", "table", "identity", "graph", "smtp", "dataverse")}
        self.functions_port = free_port()
        argv = [sys.executable, "-m", "local.stack", "up", "--state-dir", str(self.state_dir),
                "--only", "azurite,identity,graph,dataverse", "--functions-port", str(self.functions_port)]
        if _launcher_has_seed_option():
            argv += ["--seed", "none"]  # the emulators' own default seeds only; the test seeds its org itself
        for name, port in ports.items():
            argv += [f"--{name}-port", str(port)]
        with open(self.launcher_log, "wb") as log:
            self.launcher = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                             env={**os.environ, **NO_COLOR}, preexec_fn=_die_with_parent)

        def up() -> dict[str, Any] | None:
            assert self.launcher is not None
            if self.launcher.poll() is not None:
                code = self.launcher.returncode
                raise HarnessError(f"stack launcher exited with {code}\n{self._tail(self.launcher_log)}")
            with contextlib.suppress(OSError, ValueError):
                doc: dict[str, Any] = json.loads((self.state_dir / "stack.json").read_text())
                if doc.get("running"):
                    return doc
            return None

        self.doc = poll("the local stack (stack.json running)", up, within=within, every=0.3,
                        detail=lambda: self._tail(self.launcher_log))
        self._http = httpx.Client(verify=ssl.create_default_context(cafile=self.ca_bundle), timeout=60)
        # requests (under msal) lets REQUESTS_CA_BUNDLE override a session's own `verify` (DESIGN.md §4): the test
        # process trusts the stack's bundle (system CAs + the local CA) while the stack runs; stop() restores.
        for name in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
            self._saved_env[name] = os.environ.get(name)
            os.environ[name] = self.ca_bundle
        self.host_settings = self._write_host_settings(ports)

    def _write_host_settings(self, ports: Mapping[str, int]) -> Path:
        """The launcher's own generated settings for the ``functions`` service, plus the test's extra Values."""
        from emulators.common.tls import ensure_tls
        from local.host.keys import load_or_create_keys
        from local.stack import SERVICES, Ports, StackContext

        ctx = StackContext(
            root=ROOT, state_dir=self.state_dir,
            ports=Ports(functions=self.functions_port, **ports),
            tls=ensure_tls(self.state_dir / "tls"),
            keys=load_or_create_keys(None, self.state_dir / "functions-keys.json"),
            started=["azurite", "identity", "graph", "dataverse", "functions"],
            **({"seed": "none"} if _launcher_has_seed_option() else {}),
        )
        functions = next(s for s in SERVICES if s.name == "functions")
        assert functions.prepare is not None
        functions.prepare(ctx)  # writes <state>/local.settings.json exactly as `up` would
        doc = json.loads(ctx.settings_file.read_text())
        doc["Values"].update(self.extra_values)
        path = self.workdir / "host.settings.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=2)
        self.doc.setdefault("functions", {
            "base_url": f"http://127.0.0.1:{self.functions_port}/api",
            "function_key": ctx.keys.default_function_key, "admin_key": ctx.keys.master})
        return path

    def start_host(self, *, within: float = 180.0) -> None:
        assert self.host_settings is not None
        values = json.loads(self.host_settings.read_text())["Values"]
        env = {k: v for k, v in os.environ.items() if k not in values}  # the settings file must win
        env.update(PYTHONUNBUFFERED="1", **NO_COLOR)
        argv = [sys.executable, "-m", "tests.e2e.stack_harness", "host", "--lease", str(self.lease_seconds), "--",
                "--port", str(self.functions_port), "--script-root", str(ROOT), "--settings", str(self.host_settings),
                "--grace", "5"]
        with open(self.host_log, "ab") as log:
            log.write(f"\n===== host start #{self.host_starts + 1} =====\n".encode())
            log.flush()
            proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        self.host = HostProcess(proc, time.monotonic())
        self.host_starts += 1

        def ping() -> bool:
            assert self.host is not None
            if self.host.proc.poll() is not None:
                code = self.host.proc.returncode
                raise HarnessError(f"functions host exited with {code}\n{self._tail(self.host_log)}")
            with contextlib.suppress(httpx.HTTPError):
                return self.http.get(f"{self.functions_root}/admin/host/ping", timeout=5).status_code == 200
            return False

        poll("the functions host (/admin/host/ping)", ping, within=within, every=0.3,
             detail=lambda: self._tail(self.host_log))

    def kill_host(self) -> None:
        """SIGKILL the host (the whole process group): no grace, in-flight messages stay leased."""
        assert self.host is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.host.proc.pid, signal.SIGKILL)
        self.host.proc.wait(60)
        with open(self.host_log, "ab") as log:
            log.write(b"\n===== host SIGKILLed by the test =====\n")

    def stop_host(self) -> None:
        if self.host is None or self.host.proc.poll() is not None:
            return
        self.host.proc.send_signal(signal.SIGTERM)
        try:
            self.host.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill_host()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.stop_host()
        if self.launcher is not None and self.launcher.poll() is None:
            children = []
            with contextlib.suppress(psutil.NoSuchProcess):
                children = psutil.Process(self.launcher.pid).children(recursive=True)
            self.launcher.send_signal(signal.SIGTERM)
            try:
                self.launcher.wait(90)
            except subprocess.TimeoutExpired:
                self.launcher.kill()
                self.launcher.wait(30)
            for child in children:  # the launcher stops its children; this is the safety net
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
        if self._http is not None:
            self._http.close()
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    @staticmethod
    def _tail(path: Path, lines: int = 60) -> str:
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def host_log_text(self) -> str:
        return self.host_log.read_text(errors="replace") if self.host_log.exists() else ""

    # -- endpoints ---------------------------------------------------------------------------------------------

    @property
    def http(self) -> httpx.Client:
        assert self._http is not None, "stack not started"
        return self._http

    @property
    def ca_bundle(self) -> str:
        return str(self.doc["ca_bundle"])

    @property
    def functions_root(self) -> str:
        return f"http://127.0.0.1:{self.functions_port}"

    @property
    def admin_key(self) -> str:
        return str(self.doc["functions"]["admin_key"])

    @property
    def graph_url(self) -> str:
        return str(self.doc["graph"]["url"])

    @property
    def dataverse_url(self) -> str:
        return str(self.doc["dataverse"]["url"])

    @property
    def smtp_addr(self) -> tuple[str, int]:
        host, port = str(self.doc["graph"]["smtp"]).rsplit(":", 1)
        return host, int(port)

    @property
    def storage_connection_string(self) -> str:
        return str(self.doc["storage"]["connection_string"])

    # -- emulators ---------------------------------------------------------------------------------------------

    def emulator(self, which: str, method: str, path: str, body: Any = None) -> Any:
        base = self.graph_url if which == "graph" else self.dataverse_url
        r = self.http.request(method, f"{base}/_emulator/{path}", json=body)
        if r.status_code >= 400:
            raise HarnessError(f"{which} emulator {method} {path}: {r.status_code} {r.text[:500]}")
        return r.json() if r.content else None

    def clear_faults(self) -> None:
        self.emulator("graph", "DELETE", "faults")
        self.emulator("graph", "DELETE", "notification-faults")
        self.emulator("dataverse", "DELETE", "faults")

    def _dv_token(self) -> str:
        if self._dv_app is None:
            self._dv_app = msal.ConfidentialClientApplication(
                str(self.doc["app"]["client_id"]), client_credential=str(self.doc["app"]["client_secret"]),
                authority=str(self.doc["identity"]["authority"]), instance_discovery=False, verify=self.ca_bundle)
        result = self._dv_app.acquire_token_for_client(scopes=[f"{self.dataverse_url}/.default"])
        if "access_token" not in result:
            raise HarnessError(f"no Dataverse token: {result.get('error')}")
        return str(result["access_token"])

    def dv(self, method: str, path: str, body: Any = None, *, headers: Mapping[str, str] | None = None,
           ok: Iterable[int] = (), within: float = 300.0) -> httpx.Response:
        """A raw Web API call: the test's own view of CRM, independent of the product's client. Injected faults and
        service protection also hit these calls, so 429/5xx answers are retried here, honouring Retry-After,
        within a deadline. With ``caller_id`` set, calls run as that CRM user (``MSCRMCallerID``): Dataverse's
        service protection counts per effective user, so the test's own polling does not eat the router's budget.
        """
        url = path if path.startswith("https://") else f"{self.dataverse_url}/api/data/v9.2/{path}"
        caller = {"MSCRMCallerID": self.caller_id} if self.caller_id else {}
        deadline = time.monotonic() + within
        attempt = 0
        while True:
            attempt += 1
            r = self.http.request(method, url, json=body, headers={
                **ODATA, "Authorization": f"Bearer {self._dv_token()}", **caller, **(headers or {})})
            if r.status_code in (429, 500, 502, 503, 504) and r.status_code not in ok:
                if time.monotonic() >= deadline:
                    raise HarnessError(f"Dataverse {method} {path}: still {r.status_code} after {attempt} attempts "
                                       f"({within:.0f}s): {r.text[:300]}")
                retry_after = float(r.headers.get("Retry-After") or 0)
                time.sleep(min(30.0, max(retry_after, 0.2 * min(attempt, 10))))
                continue
            if r.status_code >= 400 and r.status_code not in ok:
                raise HarnessError(f"Dataverse {method} {path}: {r.status_code} {r.text[:500]}")
            return r

    def dv_list(self, path: str) -> list[dict[str, Any]]:
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
        """A raw Graph call as the app (the test's own view of the mailboxes)."""
        if self._graph_app is None:
            self._graph_app = msal.ConfidentialClientApplication(
                str(self.doc["app"]["client_id"]), client_credential=str(self.doc["app"]["client_secret"]),
                authority=str(self.doc["identity"]["authority"]), instance_discovery=False, verify=self.ca_bundle)
        token = self._graph_app.acquire_token_for_client(scopes=["https://graph.microsoft.com/.default"])
        if "access_token" not in token:
            raise HarnessError(f"no Graph token: {token.get('error')}")
        r = self.http.request(method, f"{self.doc['graph']['base_url']}/{path}", params=params,
                              headers={"Authorization": f"Bearer {token['access_token']}"})
        if r.status_code >= 400:
            raise HarnessError(f"Graph {method} {path}: {r.status_code} {r.text[:300]}")
        return r.json() if r.content else None

    # -- the Functions host's admin API ------------------------------------------------------------------------

    def executed_count(self, function: str) -> int:
        return self.host_log_text().count(f"Executed 'Functions.{function}' (")

    def run_function(self, name: str, *, wait: bool = True, within: float = 180.0) -> str:
        """Run a timer now (admin API, master key); with ``wait``, until its ``Executed`` line appears."""
        before = self.executed_count(name)
        r = self.http.post(f"{self.functions_root}/admin/functions/{name}", json={"input": ""},
                           headers={"x-functions-key": self.admin_key})
        if r.status_code != 202:
            raise HarnessError(f"admin run {name}: {r.status_code} {r.text[:300]}")
        if not wait:
            return "started"
        poll(f"{name} to finish", lambda: self.executed_count(name) > before, within=within,
             detail=lambda: self._tail(self.host_log))
        last = self.host_log_text().rsplit(f"Executed 'Functions.{name}' (", 1)[1]
        return last.split(",", 1)[0]

    # -- storage -----------------------------------------------------------------------------------------------

    def queue_service(self) -> QueueServiceClient:
        return QueueServiceClient.from_connection_string(self.storage_connection_string)

    def queue_depth(self, name: str) -> int:
        client = self.queue_service().get_queue_client(name)
        try:
            return int(client.get_queue_properties().approximate_message_count or 0)
        except Exception:  # the queue does not exist (yet): nothing in it
            return 0

    def peek_queue(self, name: str) -> list[str]:
        client = self.queue_service().get_queue_client(name)
        try:
            return [str(m.content) for m in client.peek_messages(max_messages=32)]
        except Exception:
            return []

    def put_raw_queue_message(self, name: str, content: str) -> None:
        """A message exactly as given (no encoding policy): for deliberately malformed items."""
        client = self.queue_service().get_queue_client(name)
        with contextlib.suppress(Exception):
            client.create_queue()
        client.send_message(content)

    def table_rows(self, logical: str, *, partition: str | None = None) -> list[dict[str, Any]]:
        tables = TableServiceClient.from_connection_string(self.storage_connection_string)
        table = tables.get_table_client(f"{TABLE_PREFIX}{logical}")
        try:
            if partition is None:
                return [dict(e) for e in table.list_entities()]
            return [dict(e) for e in table.query_entities("PartitionKey eq @pk", parameters={"pk": partition})]
        except Exception:
            return []

    def set_org_setting(self, key: str, value: str) -> None:
        """An admin's edit of the OrgSettings table (``Value`` column; docs/admin-guide.md)."""
        tables = TableServiceClient.from_connection_string(self.storage_connection_string)
        table = tables.create_table_if_not_exists(f"{TABLE_PREFIX}OrgSettings")
        table.upsert_entity({"PartitionKey": "org", "RowKey": key, "Value": value}, mode=UpdateMode.MERGE)

    # -- mail --------------------------------------------------------------------------------------------------

    def smtp_send(self, mails: Iterable[EmailMessage]) -> int:
        sent = 0
        host, port = self.smtp_addr
        with smtplib.SMTP(host, port, timeout=60) as client:
            for msg in mails:
                client.send_message(msg)
                sent += 1
        return sent

    def outbox(self) -> list[dict[str, Any]]:
        return list(self.emulator("graph", "GET", "outbox"))

    # -- org -----------------------------------------------------------------------------------------------

    def seed_org(self, org: Org) -> None:
        """Graph users (+ forward rules) and CRM users/queues/filters through the seed endpoints, the forward
        mailbox record through the Web API. The CRM sync (run by ``sync_and_subscribe``) turns them into the
        router's mailbox settings."""
        self.emulator("graph", "POST", "seed", graph_seed(org))
        self.emulator("dataverse", "POST", "seed", dataverse_seed(org))
        self.dv("POST", "mailboxes", sink_mailbox_record(org))
        self.caller_id = org.users[0].crm_id

    def sync_and_subscribe(self, org: Org, *, within: float = 240.0) -> None:
        """The CRM sync and the subscription reconcile, both as the host's own timers run through the admin API."""
        wanted = {m.address for m in (*org.mailboxes, org.sink)}

        def synced() -> bool:
            rows = {str(r.get("Address", "")) for r in self.table_rows("Mailboxes", partition="mailbox")}
            return wanted <= rows

        status = self.run_function("crm_settings_sync")
        poll("the CRM sync to write every mailbox row", synced, within=within,
             detail=lambda: f"crm_settings_sync: {status}\n{self._tail(self.host_log)}")
        watched = {m.address for m in (*org.mailboxes, org.sink) if m.watched}
        ids = {object_id(m.local) for m in org.mailboxes if m.watched and m.kind == "user"}

        def subscribed() -> bool:
            subs = self.emulator("graph", "GET", "subscriptions")
            items = subs.get("value", subs) if isinstance(subs, dict) else subs
            text = json.dumps(items).lower()
            return all(i in text for i in ids) and sum(1 for _ in items) >= len(watched)

        # The settings directory caches rows for 30 s; a reconcile that ran before the host saw every row would
        # leave some out, so run it until every watched mailbox has its subscription (bounded).
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            self.run_function("subscription_reconcile")
            with contextlib.suppress(HarnessError):
                poll("subscriptions", subscribed, within=10)
                return
        raise HarnessError(f"not every watched mailbox got a subscription\n{self._tail(self.host_log)}")


@contextlib.contextmanager
def running_stack(workdir: Path, *, extra_values: Mapping[str, str] | None = None,
                  lease_seconds: int = 600) -> Iterator[Stack]:
    stack = Stack(workdir, dict(extra_values or {}), lease_seconds)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


# ------------------------------------------------------------------------------------------------ mail helpers


def make_mail(sender: str, to: list[str], subject: str, *, message_id: str, body: str = "Hello",
              in_reply_to: str | None = None, cc: list[str] | None = None) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"], msg["Message-ID"] = sender, ", ".join(to), subject, message_id
    if cc:
        msg["Cc"] = ", ".join(cc)
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = in_reply_to
    msg.set_content(body)
    return msg


def activity_id_for(message_id: str) -> str:
    """What the router derives as the CRM activity id (kept independent: the test's expectation)."""
    from core.domain.identity import activity_id_for as product_id

    return str(product_id(message_id))


def email_rows(stack: Stack, subject_marker: str) -> list[dict[str, Any]]:
    marker = subject_marker.replace("'", "''")
    return stack.dv_list(
        "emails?$select=activityid,subject,messageid,statecode,statuscode,_ownerid_value,_regardingobjectid_value,"
        "trackingtoken,deliveryattempts,directioncode"
        "&$expand=email_activity_parties($select=participationtypemask,addressused,_partyid_value)"
        f"&$filter=contains(subject,'{marker}')")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# ------------------------------------------------------------------------------------------------ host shim


def _host_main(argv: list[str]) -> int:  # pragma: no cover - runs in the host subprocess
    lease = 600
    if argv[:1] == ["--lease"]:
        lease = int(argv[1])
        argv = argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    import local.host.queues as host_queues
    from local.host.__main__ import main

    host_queues.FETCH_VISIBILITY = lease  # the only change: a compressed invisibility while a message runs
    return main(argv)


if __name__ == "__main__":  # pragma: no cover
    if sys.argv[1:2] == ["host"]:
        sys.exit(_host_main(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} host [--lease S] -- <local.host args>")


__all__ = [
    "APPROVED", "CONTACT_FIONA", "CONTACT_GUS", "FABRIKAM_ACCOUNT", "FILTER_ALL", "FILTER_CONTACTS",
    "FILTER_REPLIES", "FORWARD", "INDIVIDUAL", "KNOWN_SENDERS", "LEAD_LENA", "NONE", "OUTLOOK", "ROUTER",
    "HarnessError", "Org", "OrgMailbox", "Stack", "activity_id_for", "b64", "build_org", "email_rows",
    "make_mail", "poll", "running_stack", "user_id",
]
