"""Subscription reconcile: make our Graph subscriptions match the mailbox settings (timer, and on demand).

Desired set (pure, :func:`watched_folders`): per individual-mailbox user the Inbox, plus Sent Items when sent items
are tracked, plus each folder mapped to a regarding record; each forward (sink) mailbox's Inbox; each queue
mailbox's Inbox. :func:`plan_reconcile` (pure) compares it with our records and with what Graph still has; the
service applies the plan and records every subscription in the subscription table the webhook checks notifications
against:

* renewals and deletions go through Graph JSON ``$batch`` (20 parallel requests each, a bounded number in flight);
* creates are direct POSTs (``Prefer: IdType="ImmutableId"`` applies only to the request it is sent with), at most
  ``create_concurrency`` in flight: Graph validates each new subscription with 1-2 POSTs to our webhook that must be
  answered within 10 s, so a first reconcile of a large tenant must not flood a cold HTTP trigger;
* every subscription write is paced below the subscription service's limit (1,000 writes per 20 s per app per
  tenant, throttling-limits); a 429 is still honoured (``Retry-After``).

Per-mailbox failures are recorded (mailbox status) and reported, never fatal for the run: a mailbox that could not
be subscribed this time is retried on the next run, and delta catch-up covers it meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import quote

from core.adapters.graph import GraphError
from core.adapters.state import SubscriptionRecord
from core.domain.leases import JOB_RECONCILE, new_owner
from core.domain.model import ApprovalStatus, InboundMethod, MailboxConfig, MailboxKind, OrgEmailSettings
from core.ports import MailboxDirectory
from core.services.jobs import LeaseStore, exclusive

if TYPE_CHECKING:
    from core.bootstrap import Container

__all__ = [
    "GRAPH_BATCH_LIMIT",
    "ReconcilePlan",
    "ReconcileReport",
    "SubscriptionGateway",
    "SubscriptionOptions",
    "SubscriptionService",
    "SubscriptionStore",
    "SyncStatusLog",
    "WritePacer",
    "is_watched",
    "plan_reconcile",
    "resource_for",
    "watched_folders",
]

log = logging.getLogger("emailrouter.subscriptions")

GRAPH_BATCH_LIMIT: Final = 20
# Outlook message subscriptions: the current Learn subscription page allows 10,080 minutes ("under seven days"; the
# service's own error names 10,070), older pages and national clouds 4,230. The default stays under 4,230 so it is
# valid everywhere; SUBSCRIPTION_LIFETIME_MINUTES up to ~10,000 halves the renewals where the longer lifetime holds.
DEFAULT_LIFETIME: Final = timedelta(minutes=4200)
DEFAULT_RENEW_BEFORE: Final = timedelta(hours=24)
# New subscriptions' records are written in table transactions of up to this many, at the latest this many seconds
# after Graph created the first of them (see _NewRecords).
RECORD_BATCH: Final = 100
RECORD_FLUSH_SECONDS: Final = 0.5
# Subscription service limit: 1,000 writes per 20 s per app per tenant. The router paces itself a little below it
# (another instance may be answering lifecycle events at the same time).
SUBSCRIPTION_WRITE_WINDOW: Final = 20.0
DEFAULT_WRITES_PER_WINDOW: Final = 950


# ------------------------------------------------------------------------------------------------ ports


class SubscriptionStore(Protocol):
    """Our subscription records (``core.adapters.state.SubscriptionTable``)."""

    async def put(self, record: SubscriptionRecord) -> None: ...

    async def put_many(self, records: Sequence[SubscriptionRecord]) -> None: ...

    async def delete(self, subscription_id: str) -> None: ...

    def list(self) -> AsyncIterator[SubscriptionRecord]: ...


class SubscriptionGateway(Protocol):
    """The Graph calls reconcile makes (``core.adapters.graph.GraphMailClient``)."""

    async def batch(self, requests: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]: ...

    async def create_subscription(self, body: Mapping[str, Any]) -> dict[str, Any]: ...

    async def list_subscriptions(self) -> list[dict[str, Any]]: ...

    async def renew_subscription(self, subscription_id: str, expires: datetime) -> dict[str, Any]: ...


class SyncStatusLog(Protocol):
    async def record_sync(self, mailbox: str, *, ok: bool, detail: str = "") -> None: ...

    async def record_synced(self, mailboxes: Sequence[str]) -> None: ...


# ------------------------------------------------------------------------------------------------ pure part


def is_watched(mailbox: MailboxConfig, org: OrgEmailSettings) -> bool:
    """Does the router read this mailbox at all (subscriptions + delta)?"""
    if not mailbox.enabled_for_incoming:
        return False
    if mailbox.kind is MailboxKind.FORWARD_SINK:
        return True
    if mailbox.inbound_method is not InboundMethod.INDIVIDUAL:
        return False  # None / Outlook / Forward users: nothing to watch in their own mailbox
    required = (org.require_approval_for_queue_email if mailbox.kind is MailboxKind.QUEUE
                else org.require_approval_for_user_email)
    return not (required and mailbox.approval is not ApprovalStatus.APPROVED)


def watched_folders(mailbox: MailboxConfig, org: OrgEmailSettings) -> tuple[str, ...]:
    """The folders of a mailbox the router subscribes to and runs delta on (well-known names or folder ids)."""
    if not is_watched(mailbox, org):
        return ()
    folders = ["inbox"]
    if mailbox.kind is MailboxKind.USER:
        if mailbox.track_sent_items:
            folders.append("sentitems")
        folders.extend(sorted(f for f in mailbox.folder_regarding if f and f not in folders))
    return tuple(folders)


def resource_for(mailbox: str, folder: str) -> str:
    """The subscription ``resource``, with raw ids as in Learn's examples (``users/{id}/mailFolders('{id}')/...``):
    only characters that would end a path segment or start a query/fragment are escaped. ``mailbox``: what Graph
    names the user by - the Entra object id (``MailboxConfig.graph_user``) or the UPN."""
    return f"users/{_raw_segment(mailbox)}/mailFolders('{_raw_segment(folder)}')/messages"


def _raw_segment(value: str) -> str:
    return "".join(quote(ch, safe="") if ch in "/?#% " else ch for ch in value)


@dataclass(frozen=True)
class ReconcilePlan:
    create: tuple[tuple[str, str], ...] = ()  # (mailbox, folder)
    renew: tuple[SubscriptionRecord, ...] = ()
    delete: tuple[str, ...] = ()  # subscription ids to delete in Graph (and from our table)
    drop_records: tuple[SubscriptionRecord, ...] = ()  # records Graph no longer has
    keep: int = 0
    duplicates: tuple[str, ...] = ()  # the part of ``delete`` that duplicates a kept subscription (or is an orphan)


def _key(mailbox: str, folder: str) -> tuple[str, str]:
    return mailbox.strip().lower(), folder.strip().lower()


def plan_reconcile(desired: Iterable[tuple[str, str]], records: Iterable[SubscriptionRecord],
                   graph_subscriptions: Iterable[Mapping[str, Any]] | None, *, now: datetime,
                   renew_before: timedelta, notification_url: str) -> ReconcilePlan:
    """What to create, renew, delete and forget. ``graph_subscriptions=None`` = Graph's list is unavailable: then
    nothing is dropped or treated as orphaned this run."""
    wanted = {_key(m, f): (m, f) for m, f in desired}
    graph_ids: set[str] | None = None
    orphans: list[str] = []
    by_id = {r.id: r for r in records}
    if graph_subscriptions is not None:
        graph_ids = set()
        for sub in graph_subscriptions:
            sid = str(sub.get("id", ""))
            graph_ids.add(sid)
            # A subscription of ours Graph has but our table lacks (crash between create and record): delete it,
            # its notifications are rejected by the webhook anyway.
            if sid not in by_id and str(sub.get("notificationUrl", "")).startswith(notification_url.split("?")[0]):
                orphans.append(sid)
    drop: list[SubscriptionRecord] = []
    delete: list[str] = list(orphans)
    duplicates: list[str] = list(orphans)
    renew: list[SubscriptionRecord] = []
    live: dict[tuple[str, str], SubscriptionRecord] = {}
    for record in sorted(by_id.values(), key=lambda r: (r.expires, r.id), reverse=True):
        key = _key(record.mailbox, record.folder)
        expired = record.expires <= now
        if (graph_ids is not None and record.id not in graph_ids) or expired:
            drop.append(record)
            continue
        if key not in wanted or key in live:  # unwanted, or a duplicate of a newer one
            delete.append(record.id)
            if key in live:
                duplicates.append(record.id)
            continue
        live[key] = record
        if record.expires - now <= renew_before:
            renew.append(record)
    create = tuple(wanted[k] for k in sorted(wanted) if k not in live)
    return ReconcilePlan(create=create, renew=tuple(renew), delete=tuple(delete), drop_records=tuple(drop),
                         keep=len(live) - len(renew), duplicates=tuple(duplicates))


# ------------------------------------------------------------------------------------------------ the service


@dataclass(frozen=True)
class SubscriptionOptions:
    notification_url: str
    lifecycle_url: str
    tenant_id: str
    lifetime: timedelta = DEFAULT_LIFETIME
    renew_before: timedelta = DEFAULT_RENEW_BEFORE
    concurrency: int = 8  # Graph $batch requests (renewals, deletions) in flight
    create_concurrency: int = 8  # subscription creates in flight (each makes Graph validate our webhook)
    writes_per_window: int = DEFAULT_WRITES_PER_WINDOW  # subscription writes per 20 s (Graph allows 1,000)
    reauthorize_coalesce: timedelta = timedelta(minutes=10)  # renewed this recently: a challenge needs no PATCH
    max_batch_wait: float = 30.0  # longest Retry-After honoured inline for a throttled batch or create
    recreate_wait: float = 20.0  # a lifecycle re-subscribe waits this long for a running reconcile, then retries later


@dataclass
class ReconcileReport:
    created: int = 0
    renewed: int = 0
    deleted: int = 0
    dropped: int = 0
    unchanged: int = 0
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (mailbox, folder, reason)
    duplicates: int = 0  # subscriptions deleted because another one serves the same mailbox folder (or none of ours)
    # Mailboxes whose subscriptions this run created, deleted or failed to write (their health is re-probed).
    changed: set[str] = field(default_factory=set)
    mailboxes: set[str] = field(default_factory=set)  # every mailbox the run looked at
    full: bool = True  # every mailbox (False: one mailbox, e.g. a lifecycle event's re-subscribe)
    started_at: datetime | None = None  # when the run read the mailbox settings

    def as_dict(self) -> dict[str, Any]:
        return {"created": self.created, "renewed": self.renewed, "deleted": self.deleted, "dropped": self.dropped,
                "unchanged": self.unchanged, "duplicates_removed": self.duplicates,
                "failed": [{"mailbox": m, "folder": f, "reason": r} for m, f, r in self.failed]}


@dataclass
class _Op:
    request: dict[str, Any]
    mailbox: str = ""
    folder: str = ""
    record: SubscriptionRecord | None = None
    duplicate: bool = False


class WritePacer:
    """Sliding-window pacing of subscription writes from this process: at most ``limit`` per ``window`` seconds
    (``acquire`` waits for room). Graph's own limit still answers 429 if other writers share the budget."""

    def __init__(self, limit: int, window: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._limit = max(1, limit)
        self._window = window
        self._clock = clock
        self._sleep = sleep
        self._stamps: deque[float] = deque()
        self._lock = asyncio.Lock()

    async def acquire(self, writes: int = 1) -> None:
        writes = min(max(1, writes), self._limit)
        async with self._lock:
            while True:
                now = self._clock()
                while self._stamps and now - self._stamps[0] >= self._window:
                    self._stamps.popleft()
                excess = len(self._stamps) + writes - self._limit
                if excess <= 0:
                    self._stamps.extend([now] * writes)
                    return
                await self._sleep(max(0.0, self._stamps[excess - 1] + self._window - now))


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(value: object, fallback: datetime) -> datetime:
    if isinstance(value, str) and value:
        try:
            text = value.replace("Z", "+00:00")
            head, dot, rest = text.partition(".")
            if dot:  # Graph sends 7 fractional digits; fromisoformat wants at most 6
                digits = "".join(ch for ch in rest if ch.isdigit())
                text = f"{head}.{digits[:6]}{rest[len(digits):]}"
            parsed = datetime.fromisoformat(text)
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        except ValueError:
            pass
    return fallback


def _error_text(response: Mapping[str, Any]) -> str:
    body = response.get("body")
    code = ""
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        code = str(body["error"].get("code", ""))
    return f"HTTP {response.get('status')} {code}".strip()


class SubscriptionService:
    def __init__(self, graph: SubscriptionGateway, store: SubscriptionStore, mailboxes: MailboxDirectory,
                 options: SubscriptionOptions, *, status: SyncStatusLog | None = None,
                 clock: Callable[[], datetime] | None = None,
                 on_created: Callable[[str, str, datetime], Awaitable[None]] | None = None,
                 pacer: WritePacer | None = None, leases: LeaseStore | None = None, owner: str | None = None,
                 on_reconciled: Callable[[ReconcileReport], Awaitable[None]] | None = None) -> None:
        self._on_created = on_created
        self._on_reconciled = on_reconciled
        self._leases = leases
        self._owner = owner or new_owner("router")
        self._graph = graph
        self._store = store
        self._mailboxes = mailboxes
        self._options = options
        self._status = status
        self._clock = clock or (lambda: datetime.now(UTC))
        self._pacer = pacer or WritePacer(options.writes_per_window, SUBSCRIPTION_WRITE_WINDOW)

    # -- whole reconcile ------------------------------------------------------------------------------------

    async def reconcile(self, *, only_mailbox: str | None = None,
                        progress: Callable[[int, int], None] | None = None, wait: float = 0.0,
                        on_wait: Callable[[str], None] | None = None) -> ReconcileReport:
        """``progress(done, total)`` is called as Graph requests complete (the CLI's progress bar).

        Every run - the timer's, an admin's, a lifecycle event's re-subscribe of one mailbox - holds the reconcile
        lease while it plans and writes: two runs that both planned "create" for the same folder would make two
        subscriptions (two notifications per message). A run that finds the lease held waits up to ``wait`` seconds,
        then raises :class:`core.services.jobs.JobBusy` naming the holder. Duplicates that exist anyway (from
        before, or from a run whose lease lapsed) are deleted by the plan: the newest subscription per mailbox
        folder is kept."""
        purpose = f"mailbox {only_mailbox}" if only_mailbox else "all mailboxes"
        async with exclusive(self._leases, JOB_RECONCILE, owner=self._owner, wait=wait, on_wait=on_wait,
                             purpose=purpose):
            report = await self._reconcile(only_mailbox, progress)
        if self._on_reconciled is not None:
            try:
                await self._on_reconciled(report)
            except Exception as exc:  # the re-probe is a courtesy; the subscriptions are written
                log.warning("after reconcile: re-probe of the changed mailboxes failed (%s)", type(exc).__name__)
        return report

    async def _reconcile(self, only_mailbox: str | None,
                         progress: Callable[[int, int], None] | None) -> ReconcileReport:
        invalidate = getattr(self._mailboxes, "invalidate", None)
        if only_mailbox is None and callable(invalidate):
            invalidate()  # read the settings as they are now, not as this process cached them a minute ago
        started = self._clock()
        org = await self._mailboxes.get_org_settings()
        if only_mailbox is not None:
            config = await self._mailboxes.get_mailbox(only_mailbox)
            configs: Sequence[MailboxConfig] = [config] if config is not None else []
        else:
            configs = await self._mailboxes.list_mailboxes()
        desired = [(m.address, f) for m in configs for f in watched_folders(m, org)]
        records = [r async for r in self._store.list()]
        if only_mailbox is not None:
            records = [r for r in records if r.mailbox.lower() == only_mailbox.lower()]
        try:
            graph_subs: list[dict[str, Any]] | None = await self._graph.list_subscriptions()
        except GraphError as exc:
            log.warning("listing Graph subscriptions failed (%s %s); no record is dropped this run",
                        exc.status, exc.code)
            graph_subs = None
        if graph_subs is not None and only_mailbox is not None:
            # Only this mailbox's records are in play: orphans of other mailboxes are left for the full run.
            ids = {r.id for r in records}
            graph_subs = [s for s in graph_subs if str(s.get("id")) in ids]
        now = self._clock()
        plan = plan_reconcile(desired, records, graph_subs, now=now, renew_before=self._options.renew_before,
                              notification_url=self._options.notification_url)
        if plan.duplicates:
            log.warning("reconcile: %d duplicate or orphaned subscription(s); deleting them", len(plan.duplicates))
        report = await self.apply(plan, now=now, progress=progress)
        report.mailboxes = {m.address.lower() for m in configs}
        report.full = only_mailbox is None
        report.started_at = started
        mailbox_of = {r.id: r.mailbox.lower() for r in records}
        report.changed |= {mailbox_of[sid] for sid in plan.delete if sid in mailbox_of}
        report.changed |= {r.mailbox.lower() for r in plan.drop_records}
        return report

    async def recreate(self, mailbox: str, subscription_id: str = "") -> ReconcileReport:
        """After ``subscriptionRemoved``: forget the removed subscription and subscribe the mailbox again."""
        if subscription_id:
            await self._store.delete(subscription_id)
        return await self.reconcile(only_mailbox=mailbox, wait=self._options.recreate_wait)

    async def reauthorize(self, mailbox: str, subscription_id: str) -> ReconcileReport:
        """After ``reauthorizationRequired``: one PATCH of the expiry, which reauthorizes *and* renews (lifecycle
        events page: call either ``/reauthorize`` or PATCH). Coalesced: a subscription renewed within
        ``reauthorize_coalesce`` is left alone (Graph may challenge "once every few minutes"). If Graph lost the
        subscription, subscribe again."""
        report = ReconcileReport()
        record = next(iter([r async for r in self._store.list() if r.id == subscription_id]), None)
        now = self._clock()
        lifetime = self._options.lifetime
        if record is not None and record.expires >= now + lifetime - self._options.reauthorize_coalesce:
            log.info("reauthorizationRequired for %s: renewed moments ago, no PATCH", subscription_id)
            report.unchanged += 1
            return report
        expires = now + lifetime
        try:
            await self._pacer.acquire()
            body = await self._graph.renew_subscription(subscription_id, expires)
        except GraphError as exc:
            if exc.transient:
                raise
            log.info("reauthorize of %s failed (%s %s); recreating", subscription_id, exc.status, exc.code)
            return await self.recreate(mailbox, subscription_id)
        if record is not None:
            await self._store.put(_with_expiry(record, _parse_time(body.get("expirationDateTime"), expires)))
            report.renewed += 1
        return report

    # -- applying a plan ------------------------------------------------------------------------------------

    async def apply(self, plan: ReconcilePlan, *, now: datetime,
                    progress: Callable[[int, int], None] | None = None) -> ReconcileReport:
        report = ReconcileReport(unchanged=plan.keep)
        duplicates = set(plan.duplicates)
        for record in plan.drop_records:
            await self._store.delete(record.id)
            report.dropped += 1
        expires = now + self._options.lifetime
        ops: list[_Op] = []
        for sid in plan.delete:
            ops.append(_Op({"method": "DELETE", "url": f"/subscriptions/{quote(sid, safe='')}"},
                           record=SubscriptionRecord(sid, "", "", "", "", "", now), duplicate=sid in duplicates))
        for record in plan.renew:
            ops.append(_Op({"method": "PATCH", "url": f"/subscriptions/{quote(record.id, safe='')}",
                            "headers": {"Content-Type": "application/json"},
                            "body": {"expirationDateTime": _iso(expires)}},
                           mailbox=record.mailbox, folder=record.folder, record=record))
        counter = _Progress(progress, len(ops) + len(plan.create))
        renew_lost = await self._run(ops, report, expires, counter.advance)
        # renewals Graph answered 404 for: the subscription is gone, make a new one now
        counter.total += len(renew_lost)
        creates = [*plan.create, *renew_lost]
        graph_users = await self._graph_users() if creates else {}
        await self._create_all(creates, graph_users, report, expires, counter.advance)
        if self._status is not None:
            for mailbox, folder, reason in report.failed:
                if mailbox != "-":
                    await self._status.record_sync(mailbox, ok=False, detail=f"subscription {folder}: {reason}")
        report.changed |= {m.lower() for m, _, _ in report.failed if m != "-"}
        return report

    async def _graph_users(self) -> dict[str, str]:
        """Address -> what Graph names that mailbox by (its Entra object id when the CRM sync resolved it)."""
        return {m.address.lower(): m.graph_user for m in await self._mailboxes.list_mailboxes()}

    def _create_body(self, mailbox: str, folder: str, expires: datetime, graph_user: str | None = None
                     ) -> dict[str, Any]:
        return {
            "changeType": "created",
            "notificationUrl": self._options.notification_url,
            "lifecycleNotificationUrl": self._options.lifecycle_url,
            "resource": resource_for(graph_user or mailbox, folder),
            "expirationDateTime": _iso(expires),
            # 64 characters (Graph allows 128), a fresh one per subscription
            "clientState": secrets.token_urlsafe(48),
            "latestSupportedTlsVersion": "v1_2",
        }

    async def _create_all(self, targets: Sequence[tuple[str, str]], graph_users: Mapping[str, str],
                          report: ReconcileReport, expires: datetime,
                          advance: Callable[[int], None] | None = None) -> None:
        """Direct POSTs, ``create_concurrency`` in flight: Graph's validation requests to our webhook stay few.
        The new subscriptions' records go to the table in transactions (:class:`_NewRecords`)."""
        if not targets:
            return
        gate = asyncio.Semaphore(max(1, self._options.create_concurrency))
        records = _NewRecords(self._store, self._status, report)

        async def one(mailbox: str, folder: str) -> None:
            async with gate:
                await self._create(mailbox, folder, graph_users.get(mailbox.lower()), report, expires, records)
            if advance is not None:
                advance(1)

        async with records.flushing():
            await asyncio.gather(*(one(m, f) for m, f in targets))

    async def _create(self, mailbox: str, folder: str, graph_user: str | None, report: ReconcileReport,
                      expires: datetime, records: _NewRecords) -> None:
        body = self._create_body(mailbox, folder, expires, graph_user)
        for attempt in range(3):
            await self._pacer.acquire()
            try:
                created = await self._graph.create_subscription(body)
                break
            except GraphError as exc:
                wait = exc.retry_after if exc.retry_after is not None else 1.0 * (attempt + 1)
                # A 429 means the POST was not executed: sending it again cannot create a second subscription.
                if exc.status == 429 and attempt < 2 and wait <= self._options.max_batch_wait:
                    await asyncio.sleep(wait)
                    continue
                log.warning("subscription for a mailbox folder %s failed: %s %s", folder, exc.status, exc.code)
                report.failed.append((mailbox, folder, f"create: HTTP {exc.status} {exc.code}".strip()))
                return
        await self._record_created(mailbox, folder, body, created, report, expires, records)

    async def _record_created(self, mailbox: str, folder: str, request: Mapping[str, Any],
                              body: Mapping[str, Any], report: ReconcileReport, expires: datetime,
                              records: _NewRecords) -> None:
        if not body.get("id"):
            report.failed.append((mailbox, folder, "create: Graph returned no subscription id"))
            return
        record = SubscriptionRecord(
            id=str(body["id"]), mailbox=mailbox.lower(), folder=folder, client_state=str(request["clientState"]),
            tenant_id=self._options.tenant_id, resource=str(body.get("resource") or request["resource"]),
            expires=_parse_time(body.get("expirationDateTime"), expires), change_type="created")
        report.changed.add(mailbox.lower())
        if self._on_created is not None:
            # Delta's first round for this folder starts now: a notification dropped from here on is
            # recovered by delta, nothing older is imported.
            await self._on_created(mailbox, folder, self._clock())
        await records.add(record)

    async def _run(self, ops: list[_Op], report: ReconcileReport, expires: datetime,
                   advance: Callable[[int], None] | None = None) -> list[tuple[str, str]]:
        chunks = [ops[i:i + GRAPH_BATCH_LIMIT] for i in range(0, len(ops), GRAPH_BATCH_LIMIT)]
        gate = asyncio.Semaphore(max(1, self._options.concurrency))
        lost: list[tuple[str, str]] = []

        async def one(chunk: list[_Op]) -> None:
            async with gate:
                await self._run_chunk(chunk, report, expires, lost)
            if advance is not None:
                advance(len(chunk))

        await asyncio.gather(*(one(c) for c in chunks))
        return lost

    async def _send_batch(self, chunk: list[_Op]) -> list[dict[str, Any]]:
        requests = [{"id": str(n), **op.request} for n, op in enumerate(chunk, start=1)]
        for attempt in range(3):
            await self._pacer.acquire(len(requests))
            try:
                return await self._graph.batch(requests)
            except GraphError as exc:
                wait = exc.retry_after if exc.retry_after is not None else 1.0 * (attempt + 1)
                if not exc.transient or attempt == 2 or wait > self._options.max_batch_wait:
                    raise
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def _run_chunk(self, chunk: list[_Op], report: ReconcileReport, expires: datetime,
                         lost: list[tuple[str, str]]) -> None:
        pending = chunk
        renewed: list[SubscriptionRecord] = []
        try:
            await self._run_rounds(pending, report, expires, lost, renewed)
        finally:
            if renewed:  # the chunk's renewed expiries in one table transaction, not one write each
                try:
                    await self._store.put_many(renewed)
                    report.renewed += len(renewed)
                except Exception as exc:  # Graph has the new expiry; the record's older one only renews it again
                    log.error("recording %d renewal(s) failed (%s); the next reconcile renews them again",
                              len(renewed), type(exc).__name__)
                    report.failed.extend((r.mailbox, r.folder, f"record: {type(exc).__name__}") for r in renewed)

    async def _run_rounds(self, pending: list[_Op], report: ReconcileReport, expires: datetime,
                          lost: list[tuple[str, str]], renewed: list[SubscriptionRecord]) -> None:
        for round_ in range(2):  # second round: items Graph throttled inside the batch
            try:
                responses = await self._send_batch(pending)
            except GraphError as exc:
                reason = f"batch failed: {exc.status} {exc.code}"
                report.failed.extend((op.mailbox or "-", op.folder or "-", reason) for op in pending)
                return
            throttled: list[_Op] = []
            wait = 0.0
            for op, response in zip(pending, responses, strict=True):
                status = int(response.get("status") or 0)
                if status == 429 and round_ == 0:
                    headers = {str(k).lower(): v for k, v in (response.get("headers") or {}).items()}
                    try:
                        wait = max(wait, float(headers.get("retry-after", 1)))
                    except (TypeError, ValueError):
                        wait = max(wait, 1.0)
                    throttled.append(op)
                    continue
                await self._settle(op, status, response, report, expires, lost, renewed)
            if not throttled:
                return
            await asyncio.sleep(min(wait, self._options.max_batch_wait))
            pending = throttled

    async def _settle(self, op: _Op, status: int, response: Mapping[str, Any], report: ReconcileReport,
                      expires: datetime, lost: list[tuple[str, str]], renewed: list[SubscriptionRecord]) -> None:
        method = op.request["method"]
        body = response.get("body") if isinstance(response.get("body"), Mapping) else {}
        assert isinstance(body, Mapping)
        if method == "DELETE":
            if status < 300 or status == 404:
                assert op.record is not None
                await self._store.delete(op.record.id)
                report.deleted += 1
                report.duplicates += op.duplicate
            else:
                report.failed.append((op.mailbox or "-", op.folder or "-", f"delete: {_error_text(response)}"))
            return
        if method == "PATCH":
            assert op.record is not None
            if status < 300:
                renewed.append(_with_expiry(op.record, _parse_time(body.get("expirationDateTime"), expires)))
            elif status == 404:
                await self._store.delete(op.record.id)
                lost.append((op.record.mailbox, op.record.folder))
            else:
                report.failed.append((op.mailbox, op.folder, f"renew: {_error_text(response)}"))


class _NewRecords:
    """The records of subscriptions Graph just created, written in table transactions: up to ``RECORD_BATCH`` per
    request, at the latest ``RECORD_FLUSH_SECONDS`` after the oldest was added, and all of them before the run ends.

    Why: a first reconcile of 10,000 mailboxes otherwise spends two table writes per mailbox (record + status) on
    top of its Graph POST; in transactions they cost a fiftieth of that. The price is the short window: a
    notification for a subscription whose record is still buffered is rejected as unknown (delta, whose cursor
    for the folder is written at once, brings the message), and a crash inside the window leaves the subscription
    without a record - the next reconcile deletes it as an orphan and creates it again. A write that fails marks
    its mailboxes failed in the report (same outcome as the crash)."""

    def __init__(self, store: SubscriptionStore, status: SyncStatusLog | None, report: ReconcileReport, *,
                 batch: int = RECORD_BATCH, seconds: float = RECORD_FLUSH_SECONDS) -> None:
        self._store = store
        self._status = status
        self._report = report
        self._batch = max(1, batch)
        self._seconds = seconds
        self._pending: list[SubscriptionRecord] = []
        self._lock = asyncio.Lock()
        self._due = asyncio.Event()

    async def add(self, record: SubscriptionRecord) -> None:
        self._pending.append(record)
        self._due.set()
        if len(self._pending) >= self._batch:
            await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            records, self._pending = self._pending, []
            if not records:
                return
            try:
                await self._store.put_many(records)
            except Exception as exc:  # the subscriptions exist in Graph: the next run deletes them as orphans
                log.error("writing %d new subscription record(s) failed (%s); the next reconcile replaces them",
                          len(records), type(exc).__name__)
                self._report.failed.extend((r.mailbox, r.folder, f"record: {type(exc).__name__}") for r in records)
                return
            self._report.created += len(records)
            if self._status is not None:
                try:
                    await self._status.record_synced(sorted({r.mailbox for r in records}))
                except Exception as exc:  # a status row is a report, not state: the subscriptions stand
                    log.warning("recording sync status of %d mailbox(es) failed (%s)", len(records),
                                type(exc).__name__)

    @contextlib.asynccontextmanager
    async def flushing(self) -> AsyncIterator[None]:
        """Flush what waits ``seconds`` after it was added while the body runs; the rest when it ends."""

        async def timer() -> None:
            while True:
                await self._due.wait()
                await asyncio.sleep(self._seconds)
                self._due.clear()
                # shielded: the body ending cancels this task, never a transaction already on its way
                await asyncio.shield(self.flush())

        task = asyncio.create_task(timer())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.flush()


class _Progress:
    """Counts finished Graph writes for ``progress(done, total)`` (the CLI's progress bar)."""

    def __init__(self, report: Callable[[int, int], None] | None, total: int) -> None:
        self._report = report
        self.total = total
        self.done = 0

    def advance(self, n: int) -> None:
        self.done += n
        if self._report is not None:
            self._report(self.done, self.total)


def _with_expiry(record: SubscriptionRecord, expires: datetime) -> SubscriptionRecord:
    return SubscriptionRecord(id=record.id, mailbox=record.mailbox, folder=record.folder,
                              client_state=record.client_state, tenant_id=record.tenant_id,
                              resource=record.resource, expires=expires, change_type=record.change_type)


# ------------------------------------------------------------------------------------------------ wiring


def service_for(container: Container, *, role: str = "router") -> SubscriptionService:
    """The reconcile service over the container's adapters. ``role`` names the run in its lease (``timer``, ``cli``,
    ``lifecycle``): a second run is told who holds it."""
    from core.adapters.inbound_state import InboundState
    from core.services.jobs import lease_store_for

    s = container.settings
    key = s.webhook_function_key
    suffix = f"?code={quote(key, safe='')}" if key else ""
    base = s.webhook_base_url
    options = SubscriptionOptions(
        notification_url=f"{base}/graph/notifications{suffix}",
        lifecycle_url=f"{base}/graph/lifecycle{suffix}",
        tenant_id=s.graph_tenant_id,
        lifetime=timedelta(minutes=s.integer("SUBSCRIPTION_LIFETIME_MINUTES", minimum=45)),
        renew_before=timedelta(minutes=s.integer("SUBSCRIPTION_RENEW_BEFORE_MINUTES", minimum=1)),
        create_concurrency=s.integer("SUBSCRIPTION_CREATE_CONCURRENCY", minimum=1),
        writes_per_window=s.integer("SUBSCRIPTION_WRITES_PER_20S", minimum=1),
        reauthorize_coalesce=timedelta(minutes=s.integer("SUBSCRIPTION_REAUTHORIZE_COALESCE_MINUTES", minimum=0)),
    )
    state = InboundState.for_container(container)

    async def start_delta(mailbox: str, folder: str, at: datetime) -> None:
        from core.services.delta import DeltaCursor

        await state.delta.put_if_absent(DeltaCursor(mailbox, folder, None, None, at))

    async def after_reconcile(report: ReconcileReport) -> None:
        from core.settings.health import RECONCILE_RUN, after_change
        from core.settings.rows import format_value

        run = None
        if report.full and report.started_at is not None:
            run = {"StartedOn": format_value(report.started_at), "LastRunOn": format_value(datetime.now(UTC)),
                   **{k.title().replace("_", ""): v for k, v in report.as_dict().items() if k != "failed"},
                   "Failed": len(report.failed)}
        await after_change(container, RECONCILE_RUN, report.changed, run=run)

    return SubscriptionService(container.graph, container.subscription_directory,
                               container.mailbox_directory,
                               options, status=state.status, on_created=start_delta,
                               leases=lease_store_for(container), owner=new_owner(role),
                               on_reconciled=after_reconcile)
