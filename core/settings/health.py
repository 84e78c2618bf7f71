"""Mailbox health: SSS's "Test & Enable", done so that nothing ever silently stops.

Per mailbox the probe checks what the router needs for that mailbox's methods:

* ``graph_read`` (inbound individual, forward sinks): list one message of the Inbox.
* ``forward_rule`` (forward users): the user's Inbox has a rule forwarding as attachment to their sink.
* ``graph_send`` (outbound = router): a draft can be created and deleted in the mailbox (proves Mail.ReadWrite and
  that the mailbox is inside the app's scope: the router's outbound creates a draft, then sends it). Mail.Send is
  shown by the token's ``roles`` when granted in Entra; with Exchange RBAC for Applications the grant lives in
  Exchange and the token has no Mail.* roles (auth-limit-mailbox-access), so absent roles are *unknown*, not a
  failure: the router's own sends prove it (``LastOutboundSentAt`` on the status row), and a send refused with 403
  after the last good one fails the check. Nothing is sent by the probe: SSS sends a test mail to the user, which
  clutters mailboxes, and Graph has no "may I send" query.
* ``subscription`` (inbound individual, sinks): a subscription row for the mailbox exists and has not expired.
* ``crm_owner``: the CRM user/queue (or the sink's mailbox record) exists, is enabled, and is approved when the org
  requires approval (crm-ref §2.3).
* ``crm_write`` (on demand only: ``emailrouter mailbox test``, not the timer): the app user can write to CRM — it
  sets ``testmailboxaccesscompletedon`` on the mailbox record to now (a column Microsoft documents as writable and
  that means exactly "the mailbox was last tested at"; nothing else changes). Counts for both sides.

CRM's own **Test & Enable** button sets ``testemailconfigurationscheduled`` on the mailbox record; for router
mailboxes without an email server profile ``core/settings/test_requests.py`` answers it within a minute through
:meth:`MailboxHealthService.answer_test_request` (these checks, then one PATCH with the results and the cleared
request).

Results go to the MailboxStatus table (row per mailbox) and back to the CRM ``mailbox`` record
(``incomingemailstatus``/``outgoingemailstatus``/``mailboxstatus`` 1 Success / 2 Failure / 0 Not Run,
``lastsyncerror*``, ``transientfailurecount``, ``testmailboxaccesscompletedon``, ``lastsuccessfulsynccompletedon``).
Failing mailboxes are re-probed with exponential back-off (``HealthProbeIntervalMinutes`` doubling up to
``HealthMaxBackoffMinutes``) and never disabled: they recover by themselves. Every state change (ok <-> failing)
raises an alert: a WARNING log, ``LastAlert`` on the status row, and — when ``AlertSender`` and ``AlertRecipients``
are set — an email sent with Graph ``sendMail`` from the alert sender (not through CRM, so alerts still go out
when Dataverse is the thing that is down).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from core.domain.leases import JOB_HEALTH, JOB_RECONCILE, new_owner
from core.domain.model import (
    ApprovalStatus,
    InboundMethod,
    MailboxConfig,
    MailboxKind,
    OrgEmailSettings,
    OutboundMethod,
    SssStatus,
)
from core.services.jobs import LeaseStore, exclusive

if TYPE_CHECKING:
    from core.services.org_schema import OrgSchemaSource

from .rows import MAILBOX_PARTITION, RouterSettings, format_value, parse_datetime, row_key
from .store import RowStore

__all__ = [
    "RECONCILE_RUN",
    "ROUTER_PARTITION",
    "CheckResult",
    "Health",
    "MailboxHealthService",
    "ProbeOutcome",
    "ProbeState",
    "after_change",
    "backoff",
    "checks_for",
    "crm_mailbox_update",
    "crm_test_answer",
    "health_service_for",
    "next_state",
    "send_permission",
    "subscription_verdict",
    "token_roles",
]

_log = logging.getLogger("emailrouter.health")

PROBE_SUBJECT = "Email Router permission probe (deleted automatically)"

# Rows of the MailboxStatus table's "router" partition: one per job, with its last run (emailrouter status).
ROUTER_PARTITION = "router"
RECONCILE_RUN = "subscription-reconcile"  # StartedOn = when the last finished full reconcile read the settings


class Health(StrEnum):
    UNKNOWN = "unknown"
    OK = "ok"
    PENDING = "pending"  # set up and waiting for the router (first subscription being created): not a failure
    FAILING = "failing"
    NOT_APPLICABLE = "n/a"


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    code: int = 0  # HTTP status of the failing call (lastsyncerrorcode), 0 if none
    pending: bool = False  # not ok yet, but nothing is wrong: the router is still setting it up

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "code": self.code,
                **({"pending": True} if self.pending else {})}


@dataclass(frozen=True)
class ProbeState:
    health: Health = Health.UNKNOWN
    failures: int = 0
    next_probe: datetime | None = None
    last_change: datetime | None = None
    last_ok: datetime | None = None
    settled: Health = Health.UNKNOWN  # the last health that was not "pending" (alerts compare these)

    @staticmethod
    def from_row(row: Mapping[str, Any] | None) -> ProbeState:
        if not row:
            return ProbeState()

        def when(name: str) -> datetime | None:
            value = row.get(name)
            try:
                return parse_datetime(value) if value else None
            except ValueError:
                return None

        try:
            health = Health(str(row.get("Health") or "unknown"))
        except ValueError:
            health = Health.UNKNOWN
        try:
            settled = Health(str(row.get("SettledHealth") or "")) if row.get("SettledHealth") else (
                health if health is not Health.PENDING else Health.UNKNOWN)
        except ValueError:
            settled = Health.UNKNOWN
        return ProbeState(health, int(row.get("Failures") or 0), when("NextProbeOn"), when("LastChangeOn"),
                          when("LastOkOn"), settled)


@dataclass(frozen=True)
class ProbeOutcome:
    address: str
    health: Health
    incoming: Health
    outgoing: Health
    checks: tuple[CheckResult, ...]
    state: ProbeState
    alert: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "health": self.health.value, "incoming": self.incoming.value,
                "outgoing": self.outgoing.value, "checks": [c.to_json() for c in self.checks],
                "failures": self.state.failures,
                "next_probe": format_value(self.state.next_probe) if self.state.next_probe else None,
                "alert": self.alert}


# ------------------------------------------------------------------------------------------------ pure core


def checks_for(mailbox: MailboxConfig, *, crm_write: bool = False) -> dict[str, tuple[str, ...]]:
    """Which checks decide the incoming and outgoing status of this mailbox (empty = not the router's job);
    ``crm_write`` adds the on-demand CRM write check to each side that has checks."""
    incoming: tuple[str, ...] = ()
    outgoing: tuple[str, ...] = ()
    if mailbox.kind is MailboxKind.FORWARD_SINK or mailbox.inbound_method is InboundMethod.INDIVIDUAL:
        incoming = ("graph_read", "subscription", "crm_owner")
    elif mailbox.inbound_method is InboundMethod.FORWARD:
        incoming = ("forward_rule", "crm_owner")
    if incoming:
        incoming = (*incoming, "sss_incoming")
    if mailbox.outbound_method is OutboundMethod.ROUTER and mailbox.kind is not MailboxKind.FORWARD_SINK:
        outgoing = ("graph_send", "crm_owner", "sss_outgoing", "crm_concurrency")
    if not mailbox.enabled_for_incoming:
        incoming = ()
    if not mailbox.enabled_for_outgoing:
        outgoing = ()
    if crm_write:
        incoming, outgoing = (tuple((*side, "crm_write")) if side else () for side in (incoming, outgoing))
    return {"incoming": incoming, "outgoing": outgoing}


def backoff(failures: int, base: timedelta, cap: timedelta) -> timedelta:
    """Delay before re-probing after ``failures`` consecutive failures: base, 2·base, 4·base, ... capped."""
    if failures <= 0:
        return base
    return min(cap, base * (2 ** min(failures - 1, 30)))


def _side(results: Mapping[str, CheckResult], names: Sequence[str]) -> Health:
    if not names:
        return Health.NOT_APPLICABLE
    checked = [results[n] for n in names if n in results]
    if any(not r.ok and not r.pending for r in checked):
        return Health.FAILING
    return Health.PENDING if any(r.pending for r in checked) else Health.OK


# A pending mailbox is looked at again soon: it becomes ok (or failing) within minutes, not a probe interval.
PENDING_REPROBE = timedelta(minutes=1)


def next_state(
    previous: ProbeState, mailbox: MailboxConfig, results: Sequence[CheckResult], now: datetime, router: RouterSettings
) -> tuple[ProbeState, Health, Health, str | None]:
    """New state, incoming and outgoing health, and the alert text when the overall health changed.

    ``unknown -> ok`` is the first baseline, not an alert (a fresh deployment must not mail the admin once per
    mailbox); ``unknown -> failing``, ``ok -> failing`` and ``failing -> ok`` are alerts. ``pending`` (the router is
    still setting the mailbox up) is neither a failure nor an alert: alerts compare the last settled states, and
    back-off counts failures only.
    """
    by_name = {r.name: r for r in results}
    needed = checks_for(mailbox, crm_write="crm_write" in by_name)
    incoming, outgoing = _side(by_name, needed["incoming"]), _side(by_name, needed["outgoing"])
    sides = [h for h in (incoming, outgoing) if h is not Health.NOT_APPLICABLE]
    health = (Health.NOT_APPLICABLE if not sides
              else Health.FAILING if Health.FAILING in sides
              else Health.PENDING if Health.PENDING in sides else Health.OK)
    base = timedelta(minutes=router.health_probe_interval_minutes)
    cap = timedelta(minutes=router.health_max_backoff_minutes)
    failures = previous.failures + 1 if health is Health.FAILING else 0
    delay = (backoff(failures, base, cap) if health is Health.FAILING
             else min(base, PENDING_REPROBE) if health is Health.PENDING else base)
    changed = health is not previous.health
    settled = previous.settled if health is Health.PENDING else health
    alert: str | None = None
    if settled is not previous.settled and not (previous.settled is Health.UNKNOWN
                                                and settled in (Health.OK, Health.NOT_APPLICABLE)):
        failing = [f"{r.name}: {r.detail}" for r in results if not r.ok and not r.pending]
        if settled is Health.FAILING:
            alert = f"{mailbox.address} is failing ({'; '.join(failing)}); re-probed automatically with back-off"
        else:
            alert = f"{mailbox.address} changed from {previous.settled.value} to {settled.value}"
    state = ProbeState(
        health=health, failures=failures, next_probe=now + delay,
        last_change=now if changed else previous.last_change,
        last_ok=now if health is Health.OK else previous.last_ok,
        settled=settled,
    )
    return state, incoming, outgoing, alert


_CRM_STATUS = {Health.OK: 1, Health.FAILING: 2, Health.NOT_APPLICABLE: 0, Health.UNKNOWN: 0, Health.PENDING: 0}


# mailbox.lastsyncerror is String(2048) in mailbox.md: a longer value fails the whole PATCH with 0x80044331.
LAST_SYNC_ERROR_MAX = 2048


def crm_mailbox_update(outcome: ProbeOutcome, now: datetime, *, statuses: bool = True) -> dict[str, Any]:
    """The CRM ``mailbox`` columns for an outcome (crm-ref §2.1: 0 Not Run, 1 Success, 2 Failure).

    Only columns mailbox.md lists as writable: ``mailboxstatus`` and ``transientfailurecount`` are read-only
    (Dataverse ignores them), so the overall health and the failure count stay in the router's own status table.
    ``statuses=False`` leaves ``incomingemailstatus``/``outgoingemailstatus`` alone: on a mailbox with an email server
    profile they are Server-Side Synchronization's own Test & Enable results, and a Success written by the router
    could make SSS start processing the mailbox too.
    """
    stamp = format_value(now)
    body: dict[str, Any] = {"testmailboxaccesscompletedon": stamp}
    if statuses:
        body["incomingemailstatus"] = _CRM_STATUS[outcome.incoming]
        body["outgoingemailstatus"] = _CRM_STATUS[outcome.outgoing]
    failing = [c for c in outcome.checks if not c.ok and not c.pending]
    if outcome.health is Health.FAILING and failing:
        text = "Email Router: " + "; ".join(f"{c.name}: {c.detail}" for c in failing)
        body["lastsyncerror"] = text[:LAST_SYNC_ERROR_MAX]
        body["lastsyncerrorcode"] = failing[0].code
        body["lastsyncerroroccurredon"] = stamp
    elif outcome.health is Health.OK:
        body["lastsyncerror"] = ""
        body["lastsyncerrorcode"] = 0
        body["lastsuccessfulsynccompletedon"] = stamp
    return body


def subscription_verdict(*, expired: bool, row: Mapping[str, Any], needed_since: datetime,
                         reconcile_running: str | None, reconciled_from: datetime | None, now: datetime,
                         grace: timedelta) -> CheckResult:
    """The ``subscription`` check of a mailbox that has no live subscription. Pure (unit-tested).

    * The last reconcile tried and failed for this mailbox (after its last success): failing, with Graph's answer.
    * An expired subscription: failing (reconcile renews before expiry; expiry means it did not).
    * A reconcile is running now: pending (it is creating the subscription).
    * No full reconcile has read the settings since the mailbox needed a subscription (``needed_since``): pending,
      for at most ``grace`` (HealthPendingMinutes) - longer means the reconcile timer is not running.
    * Otherwise a reconcile saw the mailbox and it still has none: failing.
    """
    error_at, ok_at = _when(row.get("InboundLastSyncErrorAt")), _when(row.get("InboundLastSyncAt"))
    error = str(row.get("InboundLastSyncError") or "")
    if error_at is not None and error.startswith("subscription") and (ok_at is None or error_at > ok_at):
        return CheckResult("subscription", False, f"the last reconcile could not write it ({error[:300]})")
    if expired:
        return CheckResult("subscription", False, "subscription expired (reconcile renews it)")
    if reconcile_running:
        return CheckResult("subscription", False, f"being created: a subscription reconcile is running "
                                                  f"({reconcile_running})", pending=True)
    waited = now - needed_since
    if reconciled_from is None or reconciled_from < needed_since:
        if waited < grace:
            return CheckResult("subscription", False, "waiting for the first subscription reconcile since this "
                                                      "mailbox was set up", pending=True)
        return CheckResult("subscription", False, f"no Graph subscription {int(waited.total_seconds() // 60)} min "
                           "after the mailbox was set up and no reconcile since: is the subscription_reconcile "
                           "timer running? (`emailrouter subscriptions reconcile` creates it now)")
    return CheckResult("subscription", False, f"no Graph subscription although a reconcile ran at "
                       f"{format_value(reconciled_from)} (`emailrouter subscriptions reconcile` shows why)")


def crm_test_answer(outcome: ProbeOutcome, mailbox: MailboxConfig, now: datetime) -> dict[str, Any]:
    """The PATCH that answers CRM's Test & Enable (``testemailconfigurationscheduled``) for a router mailbox without
    an email server profile: the probe's columns (:func:`crm_mailbox_update`, with the incoming/outgoing statuses:
    no profile means SSS never reads them) and the request cleared. Only columns mailbox.md lists as writable;
    ``testemailconfigurationretrycount`` (SSS's own retry counter) is left alone. A mailbox the router serves in
    neither direction gets Not Run on both sides and says why in ``lastsyncerror``."""
    body = crm_mailbox_update(outcome, now, statuses=True)
    body["testemailconfigurationscheduled"] = False
    if outcome.health is Health.NOT_APPLICABLE:
        text = (f"Email Router: nothing to test - the router processes neither incoming nor outgoing email of "
                f"this mailbox (incoming: {mailbox.inbound_method.name.lower()}"
                f"{'' if mailbox.enabled_for_incoming else ', disabled'}, outgoing: "
                f"{mailbox.outbound_method.name.lower()}{'' if mailbox.enabled_for_outgoing else ', disabled'})")
        body["lastsyncerror"] = text[:LAST_SYNC_ERROR_MAX]
    return body


@dataclass(frozen=True)
class SendPermission:
    ok: bool
    detail: str


def send_permission(roles: frozenset[str] | None, status_row: Mapping[str, Any] | None) -> SendPermission:
    """What is known about Mail.Send for one mailbox, without sending anything. Pure (unit-tested).

    The token's ``roles`` show Entra grants only; an Exchange RBAC for Applications grant is invisible there
    (auth-limit-mailbox-access), so a missing role is unknown, and the router's own sends decide: the last one went
    through (``LastOutboundSentAt``), or it was refused with 403 (``LastOutboundError`` after that)."""
    if roles is not None and "Mail.Send" in roles:
        return SendPermission(True, "Mail.Send granted (token)")
    row = status_row or {}
    sent, failed = _when(row.get("LastOutboundSentAt")), _when(row.get("LastOutboundErrorAt"))
    error = str(row.get("LastOutboundError") or "")
    if failed is not None and "403" in error and (sent is None or failed > sent):
        return SendPermission(False, f"the last send was refused: {error[:200]}")
    if sent is not None:
        return SendPermission(True, f"Mail.Send proven by a send at {format_value(sent)}")
    return SendPermission(True, "Mail.Send not in the token (granted in Exchange with RBAC for Applications?): "
                                "not proven until the first send")


def _when(value: object) -> datetime | None:
    if isinstance(value, datetime):
        return _aware(value)
    if isinstance(value, str) and value:
        try:
            return _aware(parse_datetime(value))
        except ValueError:
            return None
    return None


def token_roles(token: str) -> frozenset[str]:
    """The ``roles`` claim of our own access token (read, not verified: the token came from our identity provider
    and only tells us what we were granted)."""
    import jwt

    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return frozenset()
    roles = claims.get("roles") or []
    return frozenset(str(r) for r in roles) if isinstance(roles, list) else frozenset()


# ------------------------------------------------------------------------------------------------ ports


class GraphProbe(Protocol):
    """The Graph calls the probe makes (``core.adapters.graph.GraphMailClient`` fits)."""

    def list_messages(self, mailbox: str, folder: str, *, received_after: datetime | None = None,
                      page_size: int = 50) -> AsyncIterator[dict[str, Any]]: ...

    async def create_draft(self, mailbox: str, message: Mapping[str, Any]) -> dict[str, Any]: ...

    async def delete_message(self, mailbox: str, message_id: str) -> None: ...

    async def list_inbox_rules(self, mailbox: str) -> list[dict[str, Any]]: ...

    async def send_mail(self, mailbox: str, message: Mapping[str, Any], *, save_to_sent_items: bool = True) -> None:
        ...


class CrmProbe(Protocol):
    """``core.adapters.dataverse.DataverseClient`` fits."""

    async def get(self, entity_set: str, record_id: Any, *, select: Sequence[str] | None = None) -> dict[str, Any]:
        ...

    async def update(self, entity_set: str, record_id: Any, body: Mapping[str, Any]) -> str | None: ...


class SubscriptionLister(Protocol):
    def list(self) -> AsyncIterator[Any]: ...  # SubscriptionRecord: .mailbox, .expires


class SettingsSource(Protocol):
    async def list_mailboxes(self) -> Sequence[MailboxConfig]: ...

    async def get_mailbox(self, address: str) -> MailboxConfig | None: ...

    async def get_org_settings(self) -> OrgEmailSettings: ...

    async def get_router_settings(self) -> RouterSettings: ...


# ------------------------------------------------------------------------------------------------ shell


@dataclass
class _Context:
    org: OrgEmailSettings
    router: RouterSettings
    subscriptions: dict[str, list[Any]] = field(default_factory=dict)
    roles: frozenset[str] | None = None
    status_rows: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # MailboxStatus rows by RowKey
    reconcile_running: str | None = None  # who holds the reconcile lease now (None: no reconcile running)
    reconciled_from: datetime | None = None  # when the last completed full reconcile read the mailbox settings
    needed_since: dict[str, datetime] = field(default_factory=dict)  # address -> subscription expected since


class MailboxHealthService:
    """Probe due mailboxes (timer) or one on demand (``emailrouter mailbox test``)."""

    def __init__(
        self,
        settings: SettingsSource,
        graph: GraphProbe,
        crm: CrmProbe,
        subscriptions: SubscriptionLister,
        status: RowStore,
        *,
        roles: Callable[[], Awaitable[frozenset[str]]] | None = None,
        schema: OrgSchemaSource | None = None,
        leases: LeaseStore | None = None,
        owner: str | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._leases = leases  # the reconcile's lease says "subscription being created"; the probe job's own lease
        self._owner = owner or new_owner("health")
        self._settings = settings
        self._graph = graph
        self._crm = crm
        self._subscriptions = subscriptions
        self._status = status
        self._roles = roles
        self._schema = schema  # the org's metadata (optimistic concurrency on email)
        self._clock = clock

    async def _context(self) -> _Context:
        ctx = _Context(await self._settings.get_org_settings(), await self._settings.get_router_settings())
        async for record in self._subscriptions.list():
            ctx.subscriptions.setdefault(str(record.mailbox).lower(), []).append(record)
        if self._leases is not None:
            try:
                holder = await self._leases.get(JOB_RECONCILE)
            except Exception as exc:  # unknown: treated as "not running"
                _log.info("health: cannot read the reconcile lease (%s)", type(exc).__name__)
                holder = None
            if holder is not None and holder.held(self._clock()):
                ctx.reconcile_running = holder.owner
        try:
            run = await self._status.get(ROUTER_PARTITION, RECONCILE_RUN)
            started = run.get("StartedOn")
            ctx.reconciled_from = parse_datetime(started) if started else None
        except (KeyError, ValueError):  # no full reconcile has finished yet
            ctx.reconciled_from = None
        if self._roles is not None:
            try:
                ctx.roles = await self._roles()
            except Exception as exc:  # no token at all: every send check fails with this reason
                _log.warning("health: cannot read the app's Graph roles (%s)", type(exc).__name__)
                ctx.roles = frozenset()
        return ctx

    async def probe_due(self, *, wait: float = 0.0) -> list[ProbeOutcome]:
        """Probe every mailbox whose next probe time has come (new ones at once). Never raises for one mailbox.

        The timer runs every 30 s (it also answers CRM's Test & Enable requests): a tick with nothing due reads the
        status rows and the (cached) settings only; the subscriptions and the token's roles are read when some
        mailbox is due. Probing holds the probe job's lease: a second run (another instance, an admin's
        ``mailbox test --all``) waits up to ``wait`` seconds, then raises :class:`core.services.jobs.JobBusy`."""
        now = self._clock()
        states = {str(r.get("RowKey")): r async for r in self._status.list_partition(MAILBOX_PARTITION)}
        due: list[tuple[MailboxConfig, ProbeState]] = []
        for mailbox in await self._settings.list_mailboxes():
            state = ProbeState.from_row(states.get(row_key(mailbox.address)))
            if state.next_probe is not None and state.next_probe > now:
                continue
            if not any(checks_for(mailbox).values()) and state.health is Health.NOT_APPLICABLE:
                continue
            due.append((mailbox, state))
        if not due:
            return []
        async with exclusive(self._leases, JOB_HEALTH, owner=self._owner, wait=wait, purpose="due mailboxes"):
            ctx = await self._context()
            ctx.status_rows = states
            outcomes: list[ProbeOutcome] = []
            for mailbox, state in due:
                try:
                    outcomes.append(await self._probe(mailbox, state, ctx))
                except Exception:
                    _log.exception("health probe of %s crashed; retried next round", mailbox.address)
        return outcomes

    async def probe(self, address: str, *, crm_write: bool = False) -> ProbeOutcome:
        """Probe one mailbox now, whatever its schedule."""
        return await self._probe_now(address, crm_write=crm_write)

    async def answer_test_request(self, address: str) -> ProbeOutcome:
        """CRM's Test & Enable for one router mailbox (``core/settings/test_requests.py`` decides which): probe now
        and write every result column and the cleared request (``testemailconfigurationscheduled``) to the CRM
        mailbox record in one PATCH. That PATCH is the CRM write check; when CRM refuses it, it raises and the
        request stays set."""
        return await self._probe_now(address, answer=True)

    async def _probe_now(self, address: str, *, crm_write: bool = False, answer: bool = False) -> ProbeOutcome:
        mailbox = await self._settings.get_mailbox(address)
        if mailbox is None:
            raise KeyError(f"no mailbox {address!r} in the settings table")
        try:
            row: Mapping[str, Any] | None = await self._status.get(MAILBOX_PARTITION, row_key(mailbox.address))
        except KeyError:  # EntityNotFoundError is a KeyError
            row = None
        if answer:
            # Answered only for a CRM mailbox record read just now without an email server profile: SSS serves
            # neither direction of it, whatever the last CRM sync copied into the settings row.
            mailbox = replace(mailbox, sss_incoming=SssStatus.NONE, sss_outgoing=SssStatus.NONE)
        ctx = await self._context()
        ctx.status_rows = {row_key(mailbox.address): row} if row else {}
        return await self._probe(mailbox, ProbeState.from_row(row), ctx, crm_write=crm_write, answer=answer)

    async def probe_all(self, *, crm_write: bool = False, progress: Callable[[int, int], None] | None = None,
                        wait: float = 0.0, on_wait: Callable[[str], None] | None = None) -> list[ProbeOutcome]:
        """Probe every mailbox now (``emailrouter mailbox test --all``, the Router's "Test Access"). A probe that
        crashes is reported as a failing outcome for that mailbox; the others go on."""
        async with exclusive(self._leases, JOB_HEALTH, owner=self._owner, wait=wait, on_wait=on_wait,
                             purpose="every mailbox"):
            return await self._probe_all(crm_write=crm_write, progress=progress)

    async def probe_some(self, addresses: Iterable[str], *, limit: int = 25, concurrency: int = 4
                         ) -> list[ProbeOutcome]:
        """Probe these mailboxes now (after a reconcile or a CRM sync changed them), at most ``limit`` of them; the
        rest are made due, so the next probe run takes them at once. Not under the probe job's lease: a mailbox
        probed twice at the same moment only writes the same state twice."""
        wanted = sorted({a.strip().lower() for a in addresses if a})
        if not wanted:
            return []
        ctx = await self._context()
        ctx.status_rows = {str(r.get("RowKey")): r async for r in self._status.list_partition(MAILBOX_PARTITION)}
        mailboxes = {m.address: m for m in await self._settings.list_mailboxes()}
        now_list = [mailboxes[a] for a in wanted if a in mailboxes][:limit]
        later = [a for a in wanted if a in mailboxes][limit:]
        gate = asyncio.Semaphore(max(1, concurrency))

        async def one(mailbox: MailboxConfig) -> ProbeOutcome | None:
            async with gate:
                previous = ProbeState.from_row(ctx.status_rows.get(row_key(mailbox.address)))
                try:
                    return await self._probe(mailbox, previous, ctx)
                except Exception:
                    _log.exception("health probe of %s crashed; retried next round", mailbox.address)
                    return None

        outcomes = [o for o in await asyncio.gather(*(one(m) for m in now_list)) if o is not None]
        now = self._clock()
        for address in later:
            # Without a status row a mailbox is probed at the next run anyway; a healthy one needs nothing sooner.
            # A failing or pending one may sit in back-off: make it due now.
            state = ProbeState.from_row(ctx.status_rows.get(row_key(address)))
            if state.health in (Health.FAILING, Health.PENDING) and state.next_probe and state.next_probe > now:
                await self._status.upsert({"PartitionKey": MAILBOX_PARTITION, "RowKey": row_key(address),
                                           "NextProbeOn": format_value(now)}, mode="merge")
        return outcomes

    async def _probe_all(self, *, crm_write: bool, progress: Callable[[int, int], None] | None
                         ) -> list[ProbeOutcome]:
        ctx = await self._context()
        states = {str(r.get("RowKey")): r async for r in self._status.list_partition(MAILBOX_PARTITION)}
        ctx.status_rows = states
        mailboxes = sorted(await self._settings.list_mailboxes(), key=lambda m: m.address)
        outcomes: list[ProbeOutcome] = []
        for done, mailbox in enumerate(mailboxes, start=1):
            previous = ProbeState.from_row(states.get(row_key(mailbox.address)))
            try:
                outcomes.append(await self._probe(mailbox, previous, ctx, crm_write=crm_write))
            except Exception as exc:
                _log.exception("health probe of %s crashed", mailbox.address)
                crashed = CheckResult("probe", False, f"the probe itself failed ({type(exc).__name__})")
                outcomes.append(ProbeOutcome(mailbox.address, Health.FAILING, Health.FAILING, Health.FAILING,
                                             (crashed,), previous))
            if progress is not None:
                progress(done, len(mailboxes))
        return outcomes

    async def _probe(self, mailbox: MailboxConfig, previous: ProbeState, ctx: _Context, *,
                     crm_write: bool = False, answer: bool = False) -> ProbeOutcome:
        now = self._clock()
        needed = {n for names in checks_for(mailbox, crm_write=crm_write).values() for n in names}
        if "subscription" in needed:
            row = ctx.status_rows.get(row_key(mailbox.address)) or {}
            try:
                since = parse_datetime(row["SubscriptionNeededSince"]) if row.get("SubscriptionNeededSince") else None
            except ValueError:
                since = None
            ctx.needed_since[mailbox.address] = since or now
        results: list[CheckResult] = []
        for name in ("crm_owner", "crm_write", "graph_read", "forward_rule", "graph_send", "subscription",
                     "sss_incoming", "sss_outgoing", "crm_concurrency"):
            if name in needed:
                results.append(await getattr(self, f"_check_{name}")(mailbox, ctx, now))
        state, incoming, outgoing, alert = next_state(previous, mailbox, results, now, ctx.router)
        outcome = ProbeOutcome(mailbox.address, state.health, incoming, outgoing, tuple(results), state, alert)
        await self._record(mailbox, outcome, previous, now, ctx, answer=answer)
        return outcome

    # -- checks ----------------------------------------------------------------------------------------

    async def _check_graph_read(self, mailbox: MailboxConfig, ctx: _Context, now: datetime) -> CheckResult:
        try:
            async for _ in self._graph.list_messages(mailbox.address, "inbox", page_size=1):
                break
        except Exception as exc:
            return _graph_failure("graph_read", "cannot read the Inbox", exc)
        return CheckResult("graph_read", True, "Inbox readable")

    async def _check_forward_rule(self, mailbox: MailboxConfig, ctx: _Context, now: datetime) -> CheckResult:
        sink = mailbox.forward_sink_address
        if not sink:
            return CheckResult("forward_rule", False, "no ForwardSink configured for this forward user")
        try:
            rules = await self._graph.list_inbox_rules(mailbox.address)
        except Exception as exc:
            return _graph_failure("forward_rule", "cannot read inbox rules", exc)
        for rule in rules:
            targets = ((rule.get("actions") or {}).get("forwardAsAttachmentTo") or [])
            if rule.get("isEnabled", True) and any(
                    str((t.get("emailAddress") or {}).get("address", "")).lower() == sink for t in targets):
                return CheckResult("forward_rule", True, f"rule {rule.get('displayName')!r} forwards to {sink}")
        return CheckResult("forward_rule", False,
                           f"no enabled inbox rule forwards as attachment to {sink} (emailrouter forward-rules deploy)")

    async def _check_graph_send(self, mailbox: MailboxConfig, ctx: _Context, now: datetime) -> CheckResult:
        try:
            draft = await self._graph.create_draft(mailbox.address, {"subject": PROBE_SUBJECT,
                                                                     "body": {"contentType": "text", "content": ""}})
        except Exception as exc:
            return _graph_failure("graph_send", "cannot create a draft: Mail.ReadWrite missing or the mailbox is "
                                                "outside the app's scope", exc)
        try:
            await self._graph.delete_message(mailbox.address, str(draft.get("id", "")))
        except Exception as exc:
            return _graph_failure("graph_send", "draft created but could not be deleted", exc)
        verdict = send_permission(ctx.roles, ctx.status_rows.get(row_key(mailbox.address)))
        return CheckResult("graph_send", verdict.ok, f"draft created and deleted (Mail.ReadWrite); {verdict.detail}",
                           0 if verdict.ok else 403)

    async def _check_subscription(self, mailbox: MailboxConfig, ctx: _Context, now: datetime) -> CheckResult:
        records = ctx.subscriptions.get(mailbox.address, [])
        live = [r for r in records if _aware(r.expires) > now]
        if live:
            latest = max(_aware(r.expires) for r in live)
            return CheckResult("subscription", True, f"{len(live)} subscription(s), expires {format_value(latest)}")
        return subscription_verdict(
            expired=bool(records), row=ctx.status_rows.get(row_key(mailbox.address)) or {},
            needed_since=ctx.needed_since.get(mailbox.address, now), reconcile_running=ctx.reconcile_running,
            reconciled_from=ctx.reconciled_from, now=now,
            grace=timedelta(minutes=ctx.router.health_pending_minutes))

    async def _check_sss_incoming(self, mailbox: MailboxConfig, ctx: _Context, now: datetime) -> CheckResult:
        return _sss_check("sss_incoming", mailbox.sss_incoming, "incoming",
                          "SSS tracks the same mail: duplicate CRM emails")

    async def _check_sss_outgoing(self, mailbox: MailboxConfig, ctx: _Context, now: datetime) -> CheckResult:
        return _sss_check("sss_outgoing", mailbox.sss_outgoing, "outgoing",
                          "both would send its Pending Send email, so the router does not send for it")

    async def _check_crm_concurrency(self, mailbox: MailboxConfig, ctx: _Context, now: datetime) -> CheckResult:
        if self._schema is None:
            return CheckResult("crm_concurrency", True, "not checked")
        try:
            enabled = (await self._schema.get()).concurrency_enabled("email")
        except Exception as exc:
            return CheckResult("crm_concurrency", False, f"CRM metadata not readable ({type(exc).__name__})",
                               int(getattr(exc, "status", 0) or 0))
        if enabled is False:
            return CheckResult("crm_concurrency", False, "optimistic concurrency is off on the email table "
                               "(IsOptimisticConcurrencyEnabled): the outbound claim needs If-Match, so outbound "
                               "is stopped")
        return CheckResult("crm_concurrency", True, "optimistic concurrency on for email")

    async def _check_crm_owner(self, mailbox: MailboxConfig, ctx: _Context, now: datetime) -> CheckResult:
        from core.adapters.dataverse import NotFoundError

        try:
            if mailbox.kind is MailboxKind.FORWARD_SINK:
                if mailbox.mailbox_id is None:
                    return CheckResult("crm_owner", True, "sink configured only in the settings table")
                row = await self._crm.get("mailboxes", mailbox.mailbox_id, select=["statecode"])
                ok = row.get("statecode") in (None, 0)
                return CheckResult("crm_owner", ok, "sink mailbox record active" if ok else "sink mailbox inactive")
            assert mailbox.owner is not None
            if mailbox.kind is MailboxKind.QUEUE:
                row = await self._crm.get("queues", mailbox.owner.id, select=["statecode", "emailrouteraccessapproval"])
                active = row.get("statecode") in (None, 0)
                required = ctx.org.require_approval_for_queue_email
            else:
                row = await self._crm.get("systemusers", mailbox.owner.id,
                                          select=["isdisabled", "emailrouteraccessapproval"])
                active = not row.get("isdisabled")
                required = ctx.org.require_approval_for_user_email
        except NotFoundError:
            return CheckResult("crm_owner", False, f"the CRM {mailbox.kind.value} no longer exists", 404)
        except Exception as exc:
            return CheckResult("crm_owner", False, f"CRM not reachable ({type(exc).__name__})",
                               int(getattr(exc, "status", 0) or 0))
        if not active:
            return CheckResult("crm_owner", False, f"the CRM {mailbox.kind.value} is disabled")
        approval = row.get("emailrouteraccessapproval")
        if required and approval != ApprovalStatus.APPROVED:
            label = ApprovalStatus(approval).name.lower() if approval in (0, 1, 2, 3) else str(approval)
            return CheckResult("crm_owner", False, f"email address not approved ({label}) and the org requires "
                                                   "approval")
        return CheckResult("crm_owner", True, "CRM record active" + (" and approved" if required else ""))

    async def _check_crm_write(self, mailbox: MailboxConfig, ctx: _Context, now: datetime) -> CheckResult:
        if mailbox.mailbox_id is None:
            return CheckResult("crm_write", True, "no CRM mailbox record for this mailbox: nothing to write")
        try:
            await self._crm.update("mailboxes", mailbox.mailbox_id, {"testmailboxaccesscompletedon": format_value(now)})
        except Exception as exc:
            status = int(getattr(exc, "status", 0) or 0)
            hint = " — the application user's security role needs Write on Mailbox" if status in (401, 403) else ""
            return CheckResult("crm_write", False, f"cannot write the CRM mailbox record [{status or '-'} "
                                                   f"{type(exc).__name__}]{hint}", status)
        return CheckResult("crm_write", True, "wrote testmailboxaccesscompletedon on the CRM mailbox record")

    # -- recording -------------------------------------------------------------------------------------

    async def _record(self, mailbox: MailboxConfig, outcome: ProbeOutcome, previous: ProbeState, now: datetime,
                      ctx: _Context, *, answer: bool = False) -> None:
        failing = [c for c in outcome.checks if not c.ok and not c.pending]
        row: dict[str, Any] = {
            "PartitionKey": MAILBOX_PARTITION, "RowKey": row_key(mailbox.address), "Address": mailbox.address,
            "Health": outcome.health.value, "Incoming": outcome.incoming.value, "Outgoing": outcome.outgoing.value,
            "Checks": json.dumps([c.to_json() for c in outcome.checks]), "Failures": outcome.state.failures,
            "LastProbeOn": format_value(now),
            "NextProbeOn": format_value(outcome.state.next_probe) if outcome.state.next_probe else "",
            "LastChangeOn": format_value(outcome.state.last_change) if outcome.state.last_change else "",
            "LastOkOn": format_value(outcome.state.last_ok) if outcome.state.last_ok else "",
            "LastError": "; ".join(f"{c.name}: {c.detail}" for c in failing)[:4000],
            "PendingReason": "; ".join(f"{c.name}: {c.detail}" for c in outcome.checks if c.pending)[:2000],
            "SettledHealth": outcome.state.settled.value,
            "SubscriptionNeededSince": format_value(ctx.needed_since[mailbox.address])
            if mailbox.address in ctx.needed_since else "",
        }
        if outcome.alert:
            row["LastAlert"] = f"{format_value(now)} {outcome.alert}"
            _log.warning("mailbox health: %s", outcome.alert)
            await self._notify(outcome.alert, ctx.router)
        if answer:
            # One PATCH with every result and the cleared request; a refusal propagates (the request stays set).
            if mailbox.mailbox_id is None:
                raise KeyError(f"{mailbox.address} has no CRM mailbox record to answer")
            await self._crm.update("mailboxes", mailbox.mailbox_id, crm_test_answer(outcome, mailbox, now))
            row.update({"CrmTestAnsweredOn": format_value(now), "CrmTestError": "", "CrmTestRetryOn": ""})
            await self._status.upsert(row, mode="merge")
            return
        await self._status.upsert(row, mode="merge")
        if mailbox.mailbox_id is not None and (outcome.alert or outcome.health is Health.FAILING
                                               or outcome.health is not previous.health):
            # Written on changes and while failing (failure count moves); a steady healthy mailbox costs no CRM call.
            try:
                no_sss = SssStatus.NONE == mailbox.sss_incoming == mailbox.sss_outgoing
                await self._crm.update("mailboxes", mailbox.mailbox_id,
                                       crm_mailbox_update(outcome, now, statuses=no_sss))
            except Exception as exc:
                _log.warning("health: could not write status to CRM mailbox of %s (%s)", mailbox.address,
                             type(exc).__name__)

    async def _notify(self, text: str, router: RouterSettings) -> None:
        if not router.alert_sender or not router.alert_recipients:
            return
        message = {
            "subject": f"Email Router alert: {text[:120]}",
            "body": {"contentType": "text", "content": text},
            "toRecipients": [{"emailAddress": {"address": a}} for a in router.alert_recipients],
        }
        try:
            await self._graph.send_mail(router.alert_sender, message, save_to_sent_items=False)
        except Exception as exc:
            _log.warning("health: alert email from %s failed (%s)", router.alert_sender, type(exc).__name__)


def _sss_check(name: str, state: SssStatus, direction: str, effect: str) -> CheckResult:
    if state is SssStatus.ACTIVE:
        return CheckResult(name, False, f"Server-Side Synchronization is also active for {direction} email (an "
                           f"email server profile is set on the CRM mailbox and it passed Test & Enable): {effect}; "
                           "remove the profile, or let SSS serve this mailbox and set the router's method to none")
    if state is SssStatus.CONFIGURED:
        return CheckResult(name, True, f"an email server profile is set; a Test & Enable in CRM would start SSS for "
                           f"{direction} email too")
    return CheckResult(name, True, "no Server-Side Synchronization")


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _graph_failure(name: str, what: str, exc: Exception) -> CheckResult:
    status = int(getattr(exc, "status", 0) or 0)
    code = str(getattr(exc, "code", "") or type(exc).__name__)
    if status == 403:
        what += " — access denied (application access policy or missing permission)"
    return CheckResult(name, False, f"{what} [{status or '-'} {code}]", status)


# ------------------------------------------------------------------------------------------------ wiring


def health_service_for(container: Any, *, role: str = "router") -> MailboxHealthService:
    """The health service over the container's adapters (Graph roles read from our own token)."""
    from core.adapters.auth import graph_token_provider
    from core.names import MAILBOX_STATUS_TABLE

    from .store import TableMailboxDirectory

    tokens = graph_token_provider(container.settings)

    async def roles() -> frozenset[str]:
        return token_roles(await tokens.get_token_async())

    from core.services.jobs import lease_store_for
    from core.services.org_schema import org_schema_for

    directory = getattr(container, "mailbox_directory", None) or TableMailboxDirectory.from_account(container.storage)
    return MailboxHealthService(directory, container.graph, container.dataverse, container.subscription_directory,
                                container.storage.table(MAILBOX_STATUS_TABLE), roles=roles,
                                schema=org_schema_for(container), leases=lease_store_for(container),
                                owner=new_owner(role))


async def after_change(container: Any, job: str, changed: Iterable[str], *,
                       run: Mapping[str, Any] | None = None) -> list[ProbeOutcome]:
    """After a reconcile or a CRM sync: record the run (``run``: its ``router/<job>`` status row values, for a full
    run) and re-probe the mailboxes it changed, so ``emailrouter status`` shows the new truth at once instead of at
    the next probe (and back-off) of each mailbox."""
    from core.names import MAILBOX_STATUS_TABLE

    if run is not None:
        await container.storage.table(MAILBOX_STATUS_TABLE).upsert(
            {"PartitionKey": ROUTER_PARTITION, "RowKey": job, **run}, mode="merge")
    wanted = sorted(set(changed))
    if not wanted:
        return []
    outcomes = await health_service_for(container, role=f"after-{job}").probe_some(wanted)
    _log.info("%s: re-probed %d changed mailbox(es): %s", job, len(outcomes),
              dict(sorted({o.health.value: sum(1 for x in outcomes if x.health is o.health)
                           for o in outcomes}.items())))
    return outcomes
