"""Copy delivery methods, mailbox flags, tracking filters and org email settings from Dataverse into the settings
tables (timer every ``CRM_SYNC_SCHEDULE``, and ``emailrouter sync-crm``).

Shape: read everything (paged), then the pure :func:`crm_mailboxes` and :func:`plan_sync` decide which rows to
write, then the writes run. The sync only writes ``Crm*`` columns and state columns (``CrmDisabled``,
``RemovedFromCrm``, ``RemovedOn``, ``CrmSyncedOn``) with merge upserts, so ``Override*`` columns survive every sync.
A mailbox that disappears from CRM is marked ``RemovedFromCrm`` (disabled), never deleted; rows an admin created
(no ``CrmKind``) are never touched. Only rows that changed are written.

Sources (crm-ref §2.1-§2.3, §5.1; dv-ref §4.2): ``systemusers`` and ``queues`` (delivery methods, address, approval,
``isdisabled``/statecode), ``mailboxes`` (enabled flags, ``isforwardmailbox``, ``processanddeleteemails``,
``processemailreceivedafter``, statecode), ``usersettingscollection`` (``incomingemailfilteringmethod``), queues'
own ``incomingemailfilteringmethod``, and the ``organizations`` row.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from core.domain.leases import JOB_CRM_SYNC, new_owner
from core.domain.model import SssStatus
from core.services.jobs import LeaseStore, exclusive

from .rows import (
    MAILBOX_PARTITION,
    ORG_KEYS,
    ORG_PARTITION,
    format_value,
    normalise_address,
    parse_approval,
    parse_bool,
    parse_datetime,
    parse_filter,
    parse_guid,
    parse_inbound,
    parse_outbound,
    row_key,
)
from .store import RowStore

__all__ = [
    "CrmMailbox",
    "CrmSource",
    "CrmSyncService",
    "SyncPlan",
    "SyncReport",
    "UserDirectory",
    "crm_mailboxes",
    "org_crm_values",
    "plan_org_sync",
    "plan_sync",
    "run_scheduled_sync",
    "sync_due",
    "sync_service_for",
]

_log = logging.getLogger("emailrouter.settings.sync")

USER_SELECT = ("systemuserid", "fullname", "internalemailaddress", "incomingemaildeliverymethod",
               "outgoingemaildeliverymethod", "emailrouteraccessapproval", "isdisabled", "applicationid",
               "accessmode", "_defaultmailbox_value", "_queueid_value")
TEAM_SELECT = ("teamid", "_queueid_value")
QUEUE_SELECT = ("queueid", "name", "emailaddress", "incomingemaildeliverymethod", "outgoingemaildeliverymethod",
                "incomingemailfilteringmethod", "emailrouteraccessapproval", "statecode", "_ownerid_value",
                "_defaultmailbox_value")
MAILBOX_SELECT = ("mailboxid", "emailaddress", "_regardingobjectid_value", "incomingemaildeliverymethod",
                  "outgoingemaildeliverymethod", "emailrouteraccessapproval", "enabledforincomingemail",
                  "enabledforoutgoingemail", "isforwardmailbox", "processanddeleteemails",
                  "processemailreceivedafter", "statecode", "_emailserverprofile_value", "incomingemailstatus",
                  "outgoingemailstatus")
USERSETTINGS_SELECT = ("systemuserid", "incomingemailfilteringmethod")
ORG_SELECT = tuple(k.crm for k in ORG_KEYS if k.crm)


class UserDirectory(Protocol):
    """Mailbox address -> Entra object id (``core.adapters.graph.GraphMailClient.find_user_ids`` fits)."""

    async def find_user_ids(self, addresses: Sequence[str]) -> dict[str, str]: ...


class CrmSource(Protocol):
    """Paged reads from Dataverse (``core.adapters.dataverse.DataverseClient.list`` fits)."""

    def list(
        self, entity_set: str, *, select: Sequence[str] | None = None, filter: str | None = None,
        page_size: int | None = None,
    ) -> AsyncIterator[dict[str, Any]]: ...


# ------------------------------------------------------------------------------------------------ pure core


@dataclass(frozen=True)
class CrmMailbox:
    """What CRM says about one mailbox, as the Crm* columns of its settings row."""

    address: str
    columns: Mapping[str, Any]
    source: str  # "systemuser <id>", "queue <id>", "mailbox <id>" (for reports)


def _fmt(parse: Callable[[object], Any], value: object) -> Any:
    if value is None or value == "":
        return ""
    return format_value(parse(value))


def _inactive(row: Mapping[str, Any] | None) -> bool:
    return row is not None and row.get("statecode") not in (None, 0)


_SSS_METHOD = 2  # "Server-Side Synchronization or Email Router" (mailbox.md): the only method SSS acts on
_STATUS_SUCCESS = 1  # incomingemailstatus / outgoingemailstatus: 0 Not Run, 1 Success, 2 Failure


def sss_status(mbx: Mapping[str, Any] | None, direction: str) -> SssStatus:
    """Whether Server-Side Synchronization serves ``direction`` ("incoming"/"outgoing") of a CRM mailbox (pure).

    SSS needs an email server profile; it acts on a direction whose delivery method is 2 ("Server-Side
    Synchronization or Email Router", the value the router shares with it), that is enabled and whose Test & Enable
    passed (status Success). A profile without that is CONFIGURED: one Test & Enable away from SSS acting too."""
    if mbx is None or not mbx.get("_emailserverprofile_value") or _inactive(mbx):
        return SssStatus.NONE
    if mbx.get(f"{direction}emaildeliverymethod") != _SSS_METHOD:
        return SssStatus.NONE
    enabled = mbx.get(f"enabledfor{direction}email")
    if enabled is not False and mbx.get(f"{direction}emailstatus") == _STATUS_SUCCESS:
        return SssStatus.ACTIVE
    return SssStatus.CONFIGURED


def default_queue_ids(users: Iterable[Mapping[str, Any]], teams: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    """The default queues of users and teams (``systemuser.queueid``, ``team.queueid``): every user and team has one,
    it may carry the owner's address, and it is no mailbox of its own to route (audit dataverse-fidelity #23)."""
    return frozenset(str(row.get("_queueid_value")).lower() for row in (*users, *teams) if row.get("_queueid_value"))


def crm_mailboxes(
    users: Iterable[Mapping[str, Any]],
    queues: Iterable[Mapping[str, Any]],
    mailboxes: Iterable[Mapping[str, Any]],
    usersettings: Iterable[Mapping[str, Any]],
    teams: Iterable[Mapping[str, Any]] = (),
) -> tuple[list[CrmMailbox], list[str]]:
    """Join the CRM rows into one :class:`CrmMailbox` per address; errors (bad values, duplicate addresses) are
    returned as text and the offending record is left out (its settings row keeps its previous values). Users' and
    teams' default queues are left out."""
    users = list(users)
    defaults = default_queue_ids(users, teams)
    by_mailbox_id = {str(m.get("mailboxid", "")).lower(): m for m in mailboxes}
    by_regarding = {str(m.get("_regardingobjectid_value") or "").lower(): m for m in by_mailbox_id.values()
                    if m.get("_regardingobjectid_value")}
    filters = {str(s.get("systemuserid", "")).lower(): s.get("incomingemailfilteringmethod") for s in usersettings}
    sinks = [m for m in by_mailbox_id.values() if m.get("isforwardmailbox") and not _inactive(m)]
    only_sink = ""
    if len(sinks) == 1:
        try:
            only_sink = normalise_address(sinks[0].get("emailaddress"))
        except ValueError:
            only_sink = ""
    out: dict[str, CrmMailbox] = {}
    errors: list[str] = []

    def mailbox_of(owner: Mapping[str, Any], owner_id: str) -> Mapping[str, Any] | None:
        mbx_id = str(owner.get("_defaultmailbox_value") or "").lower()
        return by_mailbox_id.get(mbx_id) or by_regarding.get(owner_id)

    def add(address: object, source: str, build: Callable[[str], dict[str, Any]]) -> None:
        if not address:
            return  # no address: nothing the router could do for it
        try:
            clean = normalise_address(address)
            columns = build(clean)
        except ValueError as exc:
            errors.append(f"{source}: {exc}")
            return
        if clean in out:
            errors.append(f"{source}: address {clean} is also used by {out[clean].source}; kept {out[clean].source}")
            return
        out[clean] = CrmMailbox(clean, columns, source)

    def common(mbx: Mapping[str, Any] | None) -> dict[str, Any]:
        if mbx is None:
            return {"CrmMailboxId": "", "CrmEnabledIncoming": "", "CrmEnabledOutgoing": "",
                    "CrmDeleteAfterProcessing": "", "CrmProcessEmailFrom": "", "CrmSssIncoming": "none",
                    "CrmSssOutgoing": "none"}
        return {
            "CrmMailboxId": _fmt(parse_guid, mbx.get("mailboxid")),
            "CrmEnabledIncoming": _fmt(parse_bool, mbx.get("enabledforincomingemail")),
            "CrmEnabledOutgoing": _fmt(parse_bool, mbx.get("enabledforoutgoingemail")),
            "CrmDeleteAfterProcessing": _fmt(parse_bool, mbx.get("processanddeleteemails")),
            "CrmProcessEmailFrom": _fmt(parse_datetime, mbx.get("processemailreceivedafter")),
            "CrmSssIncoming": format_value(sss_status(mbx, "incoming")),
            "CrmSssOutgoing": format_value(sss_status(mbx, "outgoing")),
        }

    for user in users:
        if user.get("applicationid") or user.get("accessmode") == 4:
            continue  # application / non-interactive users have no mailbox to route
        uid = str(user.get("systemuserid", "")).lower()
        mbx = mailbox_of(user, uid)

        def build_user(address: str, user: Mapping[str, Any] = user, uid: str = uid,
                       mbx: Mapping[str, Any] | None = mbx) -> dict[str, Any]:
            inbound = _fmt(parse_inbound, user.get("incomingemaildeliverymethod"))
            approval = user.get("emailrouteraccessapproval")
            if approval is None and mbx is not None:
                approval = mbx.get("emailrouteraccessapproval")
            return {
                "CrmKind": "user", "CrmOwnerId": _fmt(parse_guid, uid), "CrmQueueOwnerId": "",
                "CrmInbound": inbound,
                "CrmOutbound": _fmt(parse_outbound, user.get("outgoingemaildeliverymethod")),
                "CrmFilter": _fmt(parse_filter, filters.get(uid)),
                "CrmForwardSink": only_sink if inbound == "forward" else "",
                "CrmApproval": _fmt(parse_approval, approval),
                "CrmDisabled": bool(user.get("isdisabled")) or _inactive(mbx),
                **common(mbx),
            }

        add(user.get("internalemailaddress"), f"systemuser {uid}", build_user)

    for queue in queues:
        qid = str(queue.get("queueid", "")).lower()
        if qid in defaults:
            continue  # a user's or team's default queue (#23)
        mbx = mailbox_of(queue, qid)

        def build_queue(address: str, queue: Mapping[str, Any] = queue, qid: str = qid,
                        mbx: Mapping[str, Any] | None = mbx) -> dict[str, Any]:
            inbound = _fmt(parse_inbound, queue.get("incomingemaildeliverymethod"))
            return {
                "CrmKind": "queue", "CrmOwnerId": _fmt(parse_guid, qid),
                "CrmQueueOwnerId": _fmt(parse_guid, queue.get("_ownerid_value")),
                "CrmInbound": inbound,
                "CrmOutbound": _fmt(parse_outbound, queue.get("outgoingemaildeliverymethod")),
                "CrmFilter": _fmt(parse_filter, queue.get("incomingemailfilteringmethod")),
                "CrmForwardSink": only_sink if inbound == "forward" else "",
                "CrmApproval": _fmt(parse_approval, queue.get("emailrouteraccessapproval")),
                "CrmDisabled": _inactive(queue) or _inactive(mbx),
                **common(mbx),
            }

        add(queue.get("emailaddress"), f"queue {qid}", build_queue)

    for sink in sinks:
        mid = str(sink.get("mailboxid", "")).lower()

        def build_sink(address: str, sink: Mapping[str, Any] = sink) -> dict[str, Any]:
            return {
                "CrmKind": "forward_sink", "CrmOwnerId": "", "CrmQueueOwnerId": "", "CrmInbound": "individual",
                "CrmOutbound": "none", "CrmFilter": "all", "CrmForwardSink": "",
                "CrmApproval": _fmt(parse_approval, sink.get("emailrouteraccessapproval")),
                "CrmDisabled": _inactive(sink),
                **common(sink),
            }

        add(sink.get("emailaddress"), f"mailbox {mid}", build_sink)
    return list(out.values()), errors


@dataclass
class SyncReport:
    added: list[str] = field(default_factory=list)
    changed: dict[str, list[str]] = field(default_factory=dict)  # address -> changed Crm columns
    disabled: list[str] = field(default_factory=list)  # removed from CRM -> RemovedFromCrm
    unchanged: int = 0
    org_changed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # e.g. Server-Side Sync also active on a router mailbox

    def to_json(self) -> dict[str, Any]:
        return {"added": self.added, "changed": self.changed, "disabled": self.disabled,
                "unchanged": self.unchanged, "org_changed": self.org_changed, "errors": self.errors,
                "warnings": self.warnings}


@dataclass
class SyncPlan:
    writes: list[dict[str, Any]]
    report: SyncReport


def _same(a: object, b: object) -> bool:
    def norm(v: object) -> object:
        return "" if v is None else v

    return norm(a) == norm(b)


def plan_sync(crm: Sequence[CrmMailbox], existing: Iterable[Mapping[str, Any]], now: datetime) -> SyncPlan:
    """Which rows to write (merge upserts of Crm*/state columns only) and the change report."""
    stamp = format_value(now)
    rows = {str(r.get("RowKey", "")): r for r in existing}
    report = SyncReport()
    writes: list[dict[str, Any]] = []
    seen: set[str] = set()
    for mbx in crm:
        key = row_key(mbx.address)
        seen.add(key)
        base = {"PartitionKey": MAILBOX_PARTITION, "RowKey": key, "Address": mbx.address}
        row = rows.get(key)
        if row is None:
            writes.append({**base, **mbx.columns, "RemovedFromCrm": False, "CrmSyncedOn": stamp})
            report.added.append(mbx.address)
            continue
        diff = {c: v for c, v in mbx.columns.items() if not _same(row.get(c), v)}
        came_back = bool(row.get("RemovedFromCrm"))
        if not diff and not came_back:
            report.unchanged += 1
            continue
        change = {**base, **diff, "CrmSyncedOn": stamp}
        if came_back:
            change.update({"RemovedFromCrm": False, "RemovedOn": ""})
        writes.append(change)
        report.changed[mbx.address] = sorted(diff) + (["RemovedFromCrm"] if came_back else [])
    for key, row in rows.items():
        if key in seen or not row.get("CrmKind") or row.get("RemovedFromCrm"):
            continue  # still in CRM, admin-created (never synced), or already marked
        writes.append({"PartitionKey": MAILBOX_PARTITION, "RowKey": key, "RemovedFromCrm": True,
                       "RemovedOn": stamp, "CrmSyncedOn": stamp})
        report.disabled.append(str(row.get("Address") or key))
    return SyncPlan(writes, report)


def sss_findings(found: Iterable[CrmMailbox]) -> list[str]:
    """One line per mailbox on which Server-Side Synchronization is also set up for a direction the router serves
    (delivery method 2): SSS and the router would both send (or both track) the same mail. Pure."""
    lines: list[str] = []
    for mbx in found:
        for direction, column, method in (("outgoing", "CrmSssOutgoing", "CrmOutbound"),
                                          ("incoming", "CrmSssIncoming", "CrmInbound")):
            state = mbx.columns.get(column)
            if state not in (SssStatus.ACTIVE.value, SssStatus.CONFIGURED.value):
                continue
            if direction == "outgoing":
                effect = ("the router does not send its Pending Send email (SSS does)" if state == "active" else
                          "a Test & Enable in CRM would make SSS send its email too")
            else:
                effect = ("SSS tracks its mail too: duplicates" if state == "active" and
                          mbx.columns.get(method) in ("individual", "forward") else
                          "a Test & Enable in CRM would make SSS track its mail too")
            lines.append(f"{mbx.address}: Server-Side Synchronization {state} for {direction} email "
                         f"(an email server profile is set on its CRM mailbox): {effect}")
    return lines


def org_crm_values(org_row: Mapping[str, Any]) -> dict[str, str]:
    """The organization row -> ``CrmValue`` per org key (as text, the way admins edit ``Value``)."""
    out: dict[str, str] = {}
    for spec in ORG_KEYS:
        if spec.crm is None or org_row.get(spec.crm) is None:
            continue
        value = org_row[spec.crm]
        if spec.from_crm is not None:
            out[spec.key] = spec.from_crm(value)
        else:
            out[spec.key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out


def plan_org_sync(values: Mapping[str, str], existing: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = {str(r.get("RowKey", "")): r for r in existing}
    return [{"PartitionKey": ORG_PARTITION, "RowKey": key, "CrmValue": value}
            for key, value in values.items() if not _same((rows.get(key) or {}).get("CrmValue"), value)]


# ------------------------------------------------------------------------------------------------ shell


class CrmSyncService:
    """Reads CRM, plans, writes. ``status`` (optional) gets a ``router/crm-sync`` row with the last run."""

    def __init__(
        self,
        crm: CrmSource,
        mailboxes: RowStore,
        org: RowStore,
        status: RowStore | None = None,
        *,
        users: UserDirectory | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        page_size: int = 500,
        write_concurrency: int = 16,
        leases: LeaseStore | None = None,
        owner: str | None = None,
    ) -> None:
        self._leases = leases
        self._owner = owner or new_owner("crm-sync")
        self._crm = crm
        self._mailboxes = mailboxes
        self._org = org
        self._status = status
        self._users = users
        self._clock = clock
        self._page_size = page_size
        self._gate = asyncio.Semaphore(write_concurrency)

    async def _read(self, entity_set: str, select: Sequence[str]) -> list[dict[str, Any]]:
        return [row async for row in self._crm.list(entity_set, select=select, page_size=self._page_size)]

    async def run(self, *, progress: Callable[[str, int, int], None] | None = None, wait: float = 0.0,
                  on_wait: Callable[[str], None] | None = None) -> SyncReport:
        """One sync. ``progress(step, done, total)`` is called as work advances (CLI progress bar). Holds the CRM
        sync lease: a second run (the timer while an admin syncs) waits up to ``wait`` seconds, then raises
        :class:`core.services.jobs.JobBusy`."""
        async with exclusive(self._leases, JOB_CRM_SYNC, owner=self._owner, wait=wait, on_wait=on_wait):
            return await self._run(progress)

    async def _run(self, progress: Callable[[str, int, int], None] | None) -> SyncReport:
        notify = progress or (lambda step, done, total: None)
        now = self._clock()
        notify("reading CRM", 0, 6)
        users = await self._read("systemusers", USER_SELECT)
        notify("reading CRM", 1, 6)
        queues = await self._read("queues", QUEUE_SELECT)
        notify("reading CRM", 2, 6)
        mailboxes = await self._read("mailboxes", MAILBOX_SELECT)
        notify("reading CRM", 3, 6)
        usersettings = await self._read("usersettingscollection", USERSETTINGS_SELECT)
        notify("reading CRM", 4, 6)
        teams = await self._read("teams", TEAM_SELECT)
        notify("reading CRM", 5, 6)
        orgs = await self._read("organizations", ORG_SELECT)
        notify("reading CRM", 6, 6)

        found, errors = crm_mailboxes(users, queues, mailboxes, usersettings, teams)
        existing = [row async for row in self._mailboxes.list_partition(MAILBOX_PARTITION)]
        found = await self._with_graph_user_ids(found, existing, errors)
        plan = plan_sync(found, existing, now)
        plan.report.errors.extend(errors)
        plan.report.warnings.extend(sss_findings(found))
        org_writes = plan_org_sync(org_crm_values(orgs[0]) if orgs else {},
                                   [r async for r in self._org.list_partition(ORG_PARTITION)])
        plan.report.org_changed = [str(w["RowKey"]) for w in org_writes]

        total = len(plan.writes) + len(org_writes)
        done = 0

        async def write(store: RowStore, entity: dict[str, Any]) -> None:
            nonlocal done
            async with self._gate:
                await store.upsert(entity, mode="merge")
            done += 1
            notify("writing settings", done, total)

        await asyncio.gather(*(write(self._mailboxes, w) for w in plan.writes),
                             *(write(self._org, w) for w in org_writes))
        report = plan.report
        for text in (*report.errors, *report.warnings):
            _log.warning("CRM sync: %s", text)
        _log.info("CRM sync: %d added, %d changed, %d disabled, %d unchanged, %d org settings, %d errors",
                  len(report.added), len(report.changed), len(report.disabled), report.unchanged,
                  len(report.org_changed), len(report.errors))
        if self._status is not None:
            await self._status.upsert({
                "PartitionKey": "router", "RowKey": "crm-sync", "LastRunOn": format_value(now),
                "Added": len(report.added), "Changed": len(report.changed), "Disabled": len(report.disabled),
                "Errors": len(report.errors), "LastErrors": "\n".join(report.errors)[:16000],
            }, mode="merge")
        return report


    async def _with_graph_user_ids(self, found: list[CrmMailbox], existing: Sequence[Mapping[str, Any]],
                                   errors: list[str]) -> list[CrmMailbox]:
        """``CrmGraphUserId`` for each mailbox not resolved yet: its Entra object id, found by address in the
        directory (mail, UPN, then proxy addresses). Graph documents ``/users/{id | userPrincipalName}`` only, and
        CRM holds the primary SMTP address, which can differ from the UPN (audit graph-fidelity #3). Resolved once:
        an object id never changes; clear the column (or set ``OverrideGraphUserId``) to change it."""
        if self._users is None:
            return found
        resolved = {str(r.get("RowKey", "")): r.get("CrmGraphUserId") for r in existing}
        missing = [m.address for m in found if not resolved.get(row_key(m.address))]
        if not missing:
            return found
        try:
            ids = await self._users.find_user_ids(missing)
        except Exception as exc:  # no User.Read.All, Graph down: the sync of CRM values goes on
            errors.append(f"Graph directory lookup failed ({type(exc).__name__} {getattr(exc, 'status', '')}): "
                          f"{len(missing)} mailbox(es) stay addressed by their SMTP address (needs User.Read.All)")
            return found
        errors.extend(f"{a}: no Entra user has this address (mail, UPN or proxy address); Graph calls use the "
                      "address" for a in missing if a not in ids)
        return [replace(m, columns={**m.columns, "CrmGraphUserId": ids[m.address]}) if m.address in ids else m
                for m in found]


# ------------------------------------------------------------------------------------------------ wiring


def sync_service_for(container: Any, *, role: str = "timer") -> CrmSyncService:
    from core.names import MAILBOX_STATUS_TABLE, MAILBOXES_TABLE, ORG_SETTINGS_TABLE
    from core.services.jobs import lease_store_for

    storage = container.storage
    return CrmSyncService(container.dataverse, storage.table(MAILBOXES_TABLE), storage.table(ORG_SETTINGS_TABLE),
                          storage.table(MAILBOX_STATUS_TABLE), users=container.graph,
                          leases=lease_store_for(container), owner=new_owner(role))


async def sync_now(container: Any, *, role: str = "timer", wait: float = 0.0,
                   on_wait: Callable[[str], None] | None = None,
                   progress: Callable[[str, int, int], None] | None = None) -> SyncReport:
    """One CRM sync and what follows it, for the timer and ``emailrouter sync-crm`` alike: this process's settings
    cache is dropped (its pipelines see the new rows at once; other instances within the cache TTL), the org's names
    are re-read (what the org does not declare becomes a finding in the report), and the mailboxes the sync added,
    changed or disabled are re-probed (``emailrouter status`` tells the new truth at once)."""
    report = await sync_service_for(container, role=role).run(progress=progress, wait=wait, on_wait=on_wait)
    container.mailbox_directory.invalidate()
    from core.services.org_schema import describe_missing, org_schema_for

    schema = await org_schema_for(container).refresh()
    if schema.from_org:
        report.errors.extend(f"org schema: {finding}" for finding in describe_missing(schema))
    from core.settings.health import after_change

    try:
        changed = [*report.added, *report.changed, *report.disabled]
        if report.org_changed:  # an org value (approval required, ...) can change every mailbox's health
            changed += [m.address for m in await container.mailbox_directory.list_mailboxes()]
        await after_change(container, "crm-sync", changed)
    except Exception as exc:  # the sync itself is done; the next probe run catches up
        _log.warning("CRM sync: re-probe of the changed mailboxes failed (%s)", type(exc).__name__)
    return report


def sync_due(last_run: datetime | None, now: datetime, interval_minutes: int) -> bool:
    """The timer fires on ``CRM_SYNC_SCHEDULE``; ``CrmSyncIntervalMinutes`` (org setting) can space runs further
    without a redeploy. A small tolerance keeps a 15-minute timer with a 15-minute interval from skipping."""
    from datetime import timedelta

    return last_run is None or now - last_run >= timedelta(minutes=interval_minutes) - timedelta(seconds=30)


async def run_scheduled_sync(container: Any, *, now: datetime | None = None) -> SyncReport | None:
    """Timer entry: run the sync when due; None when skipped."""
    from core.adapters.storage import EntityNotFoundError
    from core.names import MAILBOX_STATUS_TABLE

    moment = now or datetime.now(UTC)
    directory = container.mailbox_directory
    router = await directory.get_router_settings()
    try:
        row = await container.storage.table(MAILBOX_STATUS_TABLE).get("router", "crm-sync")
        last = parse_datetime(row["LastRunOn"]) if row.get("LastRunOn") else None
    except (EntityNotFoundError, ValueError):
        last = None
    if not sync_due(last, moment, router.crm_sync_interval_minutes):
        _log.info("CRM sync skipped: last run %s is within CrmSyncIntervalMinutes", last)
        return None
    return await sync_now(container, role="timer")
