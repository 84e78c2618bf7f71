"""The live view of a running local stack: what the router is doing, readable by a CRM admin.

    python -m local.live_view [--state-dir .local] [--interval 2] [--once] [--host-log FILE]

Run it in a second terminal next to ``make run`` (see the README, "The live view"). It only
reads; it never changes the router's state. Sources, polled every ``--interval`` seconds:

=====================================  ==========================================================================
source                                 shown as
=====================================  ==========================================================================
``<state>/stack.json``                 endpoints; the view waits until a stack is running
Azure Table ``<prefix>Decisions``      one row per processed (mailbox, message): *tracked* or *skipped* + reason,
                                       and whether a notification or a delta round found it (``source``)
Dataverse ``emails(<activityId>)``     for tracked rows: subject, sender, regarding and owner (names, via the
                                       Web API with the demo app's token; cached)
Azure Table ``<prefix>Outbound``       CRM emails the router sends: phase (claimed/draft/sent/done/retry/failed),
                                       sender mailbox, attempts, last error; subject from Dataverse
Azure Table ``<prefix>MailboxStatus``  failures per mailbox (inbound and outbound last errors)
Azure Table ``<prefix>PoisonLog``      messages the host gave up on, with the recorded reason
Graph ``/_emulator/subscriptions``     how many mailboxes the router watches
Graph/Dataverse ``/_emulator/requests`` API calls the router made (totals and errors)
``--host-log`` (optional)              notifications received = the Functions host's ``Executing
                                       'Functions.graph_notifications'`` lines (and failed invocations)
=====================================  ==========================================================================

``<prefix>`` is ``TABLE_PREFIX`` from ``<state>/local.settings.json`` (default ``emailrouter``). Nothing here logs
message bodies or credentials.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import ssl
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import httpx

__all__ = ["Snapshot", "StackReader", "collect", "render", "run"]

MAX_ROWS: Final = 10
_EXECUTING: Final = re.compile(r"Executing 'Functions\.(?P<name>[\w-]+)'")
_FAILED: Final = re.compile(r"Executed 'Functions\.(?P<name>[\w-]+)' \(Failed")
NOTIFICATION_FUNCTIONS: Final = frozenset({"graph_notifications"})


@dataclass(frozen=True)
class TrackedRow:
    at: datetime | None
    mailbox: str
    subject: str
    sender: str
    regarding: str
    owner: str
    source: str


@dataclass(frozen=True)
class SkippedRow:
    at: datetime | None
    mailbox: str
    reason: str
    source: str


@dataclass(frozen=True)
class SentRow:
    at: datetime | None
    sender: str
    subject: str
    phase: str
    attempts: int
    error: str


@dataclass(frozen=True)
class FailureRow:
    at: datetime | None
    where: str
    reason: str


@dataclass
class Snapshot:
    started: str = ""
    watched_mailboxes: int = 0
    notifications: int | None = None  # None: no host log to count from
    from_notifications: int = 0
    from_delta: int = 0
    tracked: list[TrackedRow] = field(default_factory=list)
    skipped: list[SkippedRow] = field(default_factory=list)
    sent: list[SentRow] = field(default_factory=list)
    failures: list[FailureRow] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)
    api_calls: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # sources that could not be read (shown, never fatal)


def _table_prefix(state_dir: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        values = json.loads((state_dir / "local.settings.json").read_text()).get("Values") or {}
        if values.get("TABLE_PREFIX"):
            return str(values["TABLE_PREFIX"])
    return "emailrouter"


class StackReader:
    """Read-only access to one running stack (tables, emulator endpoints, Dataverse names)."""

    def __init__(self, stack: Mapping[str, Any], *, table_prefix: str = "emailrouter",
                 host_log: Path | None = None) -> None:
        from core.adapters.storage import StorageAccount

        self.stack = stack
        self.http = httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(stack["ca_bundle"])), timeout=10)
        self.storage = StorageAccount(connection_string=str(stack["storage"]["connection_string"]),
                                      table_prefix=table_prefix)
        self.host_log = host_log
        self._log_offset = 0
        self._log_counts: dict[str, int] = {}
        self._log_failed: dict[str, int] = {}
        self._token: tuple[float, str] | None = None
        self._emails: dict[str, dict[str, Any]] = {}

    async def close(self) -> None:
        await self.http.aclose()
        await self.storage.close()

    # -- tables
    async def rows(self, logical: str, filter: str = "PartitionKey ne ''",
                   parameters: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Entities of a router table; an absent table (nothing happened yet) is empty, not an error."""
        from azure.core.exceptions import ResourceNotFoundError

        table = self.storage.table(logical)
        try:
            return [dict(e) async for e in table.query(filter, parameters=parameters)]
        except ResourceNotFoundError:
            return []

    # -- Dataverse names for tracked / sent emails
    async def _dv_token(self) -> str:
        if self._token and self._token[0] > time.monotonic():
            return self._token[1]
        org = str(self.stack["dataverse"]["url"]).rstrip("/")
        resp = await self.http.post(f"{str(self.stack['identity']['authority']).rstrip('/')}/oauth2/v2.0/token",
                                    data={"grant_type": "client_credentials",
                                          "client_id": self.stack["app"]["client_id"],
                                          "client_secret": self.stack["app"]["client_secret"],
                                          "scope": f"{org}/.default"})
        resp.raise_for_status()
        body = resp.json()
        self._token = (time.monotonic() + max(30, int(body.get("expires_in", 300)) - 60), str(body["access_token"]))
        return self._token[1]

    async def email(self, activity_id: str) -> dict[str, Any]:
        """Subject, sender, regarding, owner and status names of a CRM email (cached once it is final)."""
        hit = self._emails.get(activity_id)
        if hit is not None:
            return hit
        api = str(self.stack["dataverse"]["api_url"]).rstrip("/")
        resp = await self.http.get(f"{api}/emails({activity_id})", params={
            "$select": "subject,sender,statuscode,_ownerid_value,_regardingobjectid_value"}, headers={
            "Authorization": f"Bearer {await self._dv_token()}", "Accept": "application/json",
            "Prefer": 'odata.include-annotations="OData.Community.Display.V1.FormattedValue"'})
        if resp.status_code == 404:
            return {}
        resp.raise_for_status()
        raw = resp.json()

        def name(col: str) -> str:
            return str(raw.get(f"{col}@OData.Community.Display.V1.FormattedValue") or raw.get(col) or "")

        info = {"subject": str(raw.get("subject") or ""), "sender": str(raw.get("sender") or ""),
                "owner": name("_ownerid_value"), "regarding": name("_regardingobjectid_value"),
                "status": name("statuscode"), "statuscode": raw.get("statuscode")}
        if info["statuscode"] in (3, 4, 8):  # Sent, Received, Failed: will not change by itself
            self._emails[activity_id] = info
        return info

    # -- emulators
    async def emulator(self, service: str, path: str) -> Any:
        resp = await self.http.get(f"{str(self.stack[service]['url']).rstrip('/')}/_emulator/{path}")
        resp.raise_for_status()
        return resp.json()

    # -- host log
    def read_host_log(self) -> tuple[int | None, int]:
        """(notifications received, failed invocations) from the host log's new lines; None if no log."""
        if self.host_log is None or not self.host_log.exists():
            return None, 0
        with self.host_log.open("rb") as fh:
            fh.seek(self._log_offset)
            chunk = fh.read(4 * 1024 * 1024)
        cut = chunk.rfind(b"\n") + 1
        self._log_offset += cut
        for line in chunk[:cut].decode("utf-8", errors="replace").splitlines():
            if (m := _EXECUTING.search(line)) is not None:
                self._log_counts[m["name"]] = self._log_counts.get(m["name"], 0) + 1
            elif (m := _FAILED.search(line)) is not None:
                self._log_failed[m["name"]] = self._log_failed.get(m["name"], 0) + 1
        return (sum(v for k, v in self._log_counts.items() if k in NOTIFICATION_FUNCTIONS),
                sum(self._log_failed.values()))


def _when(value: object) -> datetime | None:
    return value if isinstance(value, datetime) else None


def _last_reason(record: Mapping[str, Any]) -> str:
    """The reason a message was skipped: the outcome code plus the deciding step's explanation."""
    outcome = str(record.get("outcome", ""))
    decisions = [d for d in record.get("decisions") or [] if isinstance(d, Mapping)]
    why = str(decisions[-1].get("why", "")) if decisions else ""
    code = outcome.split(":", 1)[1] if ":" in outcome else outcome
    return f"{code}: {why}" if why else code


async def collect(reader: StackReader, *, since: datetime | None = None) -> Snapshot:
    """One snapshot of everything the view shows. A source that fails is listed in ``problems``."""
    from core.adapters.storage import join_text
    from core.names import DECISIONS_TABLE, MAILBOX_STATUS_TABLE, OUTBOUND_TABLE, POISON_LOG_TABLE

    snap = Snapshot(started=str(reader.stack.get("started_at", "")))
    since = since or datetime.now(UTC) - timedelta(days=3650)

    # inbound decisions
    try:
        decisions = await reader.rows(DECISIONS_TABLE, "At ge @t", {"t": since})
        decisions.sort(key=lambda e: _when(e.get("At")) or datetime.min.replace(tzinfo=UTC), reverse=True)
        tracked = skipped = 0
        for e in decisions:
            try:
                record = dict(json.loads(join_text(e, "Record")))
            except ValueError:
                record = {"outcome": str(e.get("Outcome", ""))}
            source = str(record.get("source") or "")
            snap.from_notifications += source == "notification"
            snap.from_delta += source == "delta"
            outcome = str(record.get("outcome", ""))
            mailbox = str(record.get("mailbox") or e.get("PartitionKey") or "")
            if outcome in ("tracked", "already_tracked") and record.get("activityId"):
                tracked += 1
                if len(snap.tracked) < MAX_ROWS:
                    info = await reader.email(str(record["activityId"]))
                    snap.tracked.append(TrackedRow(_when(e.get("At")), mailbox, info.get("subject", ""),
                                                   info.get("sender", ""), info.get("regarding", ""),
                                                   info.get("owner", ""), source))
            elif outcome.startswith(("failed", "gone")):
                snap.failures.append(FailureRow(_when(e.get("At")), mailbox, _last_reason(record)))
            else:
                skipped += 1
                if len(snap.skipped) < MAX_ROWS:
                    snap.skipped.append(SkippedRow(_when(e.get("At")), mailbox, _last_reason(record), source))
        snap.totals.update(tracked=tracked, skipped=skipped)
    except Exception as exc:  # a view never dies on one source
        snap.problems.append(f"decisions: {type(exc).__name__}")

    # outbound ledger
    try:
        entries = [e for e in await reader.rows(OUTBOUND_TABLE, "RowKey eq 'state'")]
        entries.sort(key=lambda e: _when(e.get("UpdatedAt")) or datetime.min.replace(tzinfo=UTC), reverse=True)
        counts: dict[str, int] = {}
        for e in entries:
            phase = str(e.get("Phase", ""))
            counts[phase] = counts.get(phase, 0) + 1
            if len(snap.sent) < MAX_ROWS:
                info = await reader.email(str(e["PartitionKey"]))
                snap.sent.append(SentRow(_when(e.get("UpdatedAt")), str(e.get("SenderMailbox", "")),
                                         info.get("subject", ""), phase, int(e.get("Attempts", 0) or 0),
                                         str(e.get("LastError", ""))[:200]))
        snap.totals.update(sent=counts.get("done", 0) + counts.get("sent", 0), send_failed=counts.get("failed", 0))
    except Exception as exc:
        snap.problems.append(f"outbound: {type(exc).__name__}")

    # failures: mailbox status, poison log
    try:
        for e in await reader.rows(MAILBOX_STATUS_TABLE):
            mailbox = str(e.get("Mailbox") or e.get("PartitionKey") or "")
            for key, value in e.items():
                if key.endswith("Error") and value and not key.endswith("Permanent"):
                    at = _when(e.get(f"{key}At"))
                    if at is None or at >= since:
                        snap.failures.append(FailureRow(at, mailbox, f"{key}: {str(value)[:200]}"))
        for e in await reader.rows(POISON_LOG_TABLE, "At ge @t", {"t": since}):
            snap.failures.append(FailureRow(_when(e.get("At")), f"poison {e.get('PartitionKey')}",
                                            str(e.get("Reason", ""))[:200]))
        snap.failures.sort(key=lambda f: f.at or datetime.min.replace(tzinfo=UTC), reverse=True)
        snap.totals["failures"] = len(snap.failures)
        del snap.failures[MAX_ROWS:]
    except Exception as exc:
        snap.problems.append(f"failures: {type(exc).__name__}")

    # emulators
    try:
        subs = (await reader.emulator("graph", "subscriptions")).get("value", [])
        snap.watched_mailboxes = len({s.get("_userId") for s in subs})
        for service in ("graph", "dataverse"):
            log = (await reader.emulator(service, "requests")).get("value", [])
            errors = sum(1 for r in log if int(r.get("status", 0) or 0) >= 400)
            snap.api_calls[service] = f"{len(log)} calls" + (f", {errors} errors" if errors else "")
    except Exception as exc:
        snap.problems.append(f"emulators: {type(exc).__name__}")

    notifications, failed = reader.read_host_log()
    snap.notifications = notifications
    if failed:
        snap.totals["failed_invocations"] = failed
    return snap


def _t(value: datetime | None) -> str:
    return value.astimezone().strftime("%H:%M:%S") if value else ""


def render(snap: Snapshot) -> Any:
    """The snapshot as rich renderables (a Group of panels and tables)."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    notif = "-" if snap.notifications is None else str(snap.notifications)
    head = Text.assemble(
        ("Email Router - live view   ", "bold"),
        f"watching {snap.watched_mailboxes} mailboxes | notifications received {notif} "
        f"(work found by notification {snap.from_notifications}, by delta {snap.from_delta}) | ",
        (f"tracked {snap.totals.get('tracked', 0)}", "green"), " | ",
        (f"skipped {snap.totals.get('skipped', 0)}", "yellow"), " | ",
        (f"sent {snap.totals.get('sent', 0)}", "cyan"), " | ",
        (f"failures {snap.totals.get('failures', 0)}", "red" if snap.totals.get("failures") else ""),
    )
    calls = ("emulator API calls (every client): " + "  ".join(f"{k} {v}" for k, v in snap.api_calls.items())
             if snap.api_calls else "")
    parts: list[Any] = [Panel(Group(head, Text(calls, style="dim")) if calls else head)]

    def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], style: str, empty: str) -> Table:
        t = Table(title=title, title_style=style, title_justify="left", expand=True)
        for c in columns:
            if c == "time":
                t.add_column(c, no_wrap=True, width=8)
            else:
                t.add_column(c, overflow="fold")
        for r in rows:
            t.add_row(*r)
        if not rows:
            t.add_row(*([empty] + [""] * (len(columns) - 1)))
        return t

    parts.append(table("Emails tracked", ("time", "mailbox", "subject", "from", "regarding", "owner"),
                       [(_t(r.at), r.mailbox, r.subject, r.sender, r.regarding or "-", r.owner)
                        for r in snap.tracked], "bold green", "nothing tracked yet"))
    parts.append(table("Skipped", ("time", "mailbox", "why"),
                       [(_t(r.at), r.mailbox, r.reason) for r in snap.skipped], "bold yellow", "nothing skipped"))
    parts.append(table("Sent from CRM", ("time", "sender", "subject", "state", "attempts", "last error"),
                       [(_t(r.at), r.sender, r.subject, r.phase, str(r.attempts), r.error or "")
                        for r in snap.sent], "bold cyan", "nothing sent yet"))
    parts.append(table("Failures", ("time", "where", "reason"),
                       [(_t(r.at), r.where, r.reason) for r in snap.failures], "bold red", "none"))
    if snap.problems:
        parts.append(Text("could not read: " + ", ".join(snap.problems), style="dim red"))
    return Group(*parts)


def _load_stack(state_dir: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        doc: dict[str, Any] = json.loads((state_dir / "stack.json").read_text())
        if doc.get("running") and "storage" in doc:
            return doc
    return None


def run(state_dir: Path, *, stop: threading.Event | None = None, interval: float = 2.0,
        host_log: Path | None = None, once: bool = False, since: datetime | None = None) -> int:
    """Show the view until ``stop`` is set (or Ctrl-C); ``once`` prints one snapshot and returns."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    stop = stop or threading.Event()
    stack = _load_stack(state_dir)
    while stack is None:
        if once:
            console.print(f"no running stack in {state_dir} (start one with `make run`)")
            return 2
        console.print(f"waiting for a stack in {state_dir} ...")
        if stop.wait(2):
            return 0
        stack = _load_stack(state_dir)
    host_log = host_log or (state_dir / "logs" / "functions.log")

    async def loop() -> None:
        reader = StackReader(stack, table_prefix=_table_prefix(state_dir), host_log=host_log)
        try:
            if once:
                console.print(render(await collect(reader, since=since)))
                return
            with Live(render(Snapshot()), console=console, refresh_per_second=4, screen=False) as live:
                while not stop.is_set():
                    live.update(render(await collect(reader, since=since)))
                    await asyncio.to_thread(stop.wait, interval)
        finally:
            await reader.close()

    try:
        asyncio.run(loop())
    except KeyboardInterrupt:
        return 0
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m local.live_view", description="Live view of the local stack")
    p.add_argument("--state-dir", type=Path, default=Path(".local"))
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--host-log", type=Path, help="the Functions host's log file (default <state>/logs/functions.log "
                                                 "when present): counts notifications received")
    p.add_argument("--since-minutes", type=float, help="only what happened in the last N minutes")
    args = p.parse_args(argv)
    since = datetime.now(UTC) - timedelta(minutes=args.since_minutes) if args.since_minutes else None
    return run(args.state_dir, interval=args.interval, host_log=args.host_log, once=args.once, since=since)


if __name__ == "__main__":
    sys.exit(main())
