"""Outbound service: CRM Pending Send -> sent through the sender's own mailbox, exactly once, marked Sent.

Three entry points, all over small ports (fakes in the unit tests, real adapters in production):

* :meth:`OutboundService.scan` (timer): Pending Send emails of router senders, ordered fairly across senders
  (``fair_order``), one :class:`~core.work_items.OutboundItem` each.
* :meth:`OutboundService.process` (queue): claim -> draft -> send -> mark Sent, or a transient/permanent
  failure path.
* :meth:`OutboundService.reap` (timer, after the scan): emails stuck in Sending go back to Pending Send, unless
  the ledger proves they were sent, then they are finished as Sent.

Exactly once rests on three things:

1. **The CRM claim** — an If-Match PATCH Pending Send -> Sending. Two scans, two queue messages, two workers:
   one claim wins per version of the email; the loser drops its work item.
2. **The ledger** (``OutboundLedger``; one Table entity per email): the phase reached (claimed, draft with its
   id and internetMessageId, sent, done) under a lease. Every write is ETag-conditional, so a worker that lost
   its lease (slow, then reaped and re-claimed by another) notices at its next write and stops.
3. **Recovery by internetMessageId**: a retry that finds a draft recorded in the ledger asks Graph for that
   internetMessageId. A non-draft copy (Sent Items) = the send happened -> only the CRM update is finished. A
   draft that is still a draft = not sent -> it is sent (only after the send attempt has had time to settle,
   because a just-accepted draft can linger in Drafts for a moment). Nothing found after a send attempt = the
   outcome is unknown -> retried later and finally Failed with that reason, never sent a second time.

The Graph client never retries POSTs (``GraphMailClient``); this service decides.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final, Protocol

# The Graph adapter module is light (msgraph is imported only when a client is built); its error types are the
# vocabulary of the MailSender port.
from core.adapters.graph import GraphError
from core.config import Settings
from core.domain.identity import outbound_message_id
from core.domain.model import (
    ApprovalStatus,
    MailboxConfig,
    MailboxKind,
    OrgEmailSettings,
    OutboundMethod,
    SssStatus,
)
from core.domain.outbound import (
    GRAPH_INLINE_LIMIT,
    Claimed,
    CrmOutboundEmail,
    OutboundMessage,
    OutboundRejected,
    OutboundState,
    OutboundStatus,
    PendingEmail,
    PermanentFailure,
    ReaperCheck,
    SendSucceeded,
    TransientFailure,
    build_outbound_message,
    fair_order,
    next_state,
)
from core.domain.records import ActiveMarker, LedgerConflict, Phase
from core.domain.records import OutboundLedgerEntry as LedgerEntry
from core.names import OUTBOUND_QUEUE
from core.ports import MailboxDirectory, WorkQueue
from core.services.outbound_crm import (
    ClaimLost,
    CrmEmailState,
    CrmRejected,
    CrmUnavailable,
    EmailGone,
    LoadedEmail,
    OutboundCrmError,
    OutboundCrmGateway,
)
from core.work_items import InvalidWorkItem, OutboundItem

if TYPE_CHECKING:
    from core.services.org_schema import OrgSchemaSource
    from core.settings.rows import RouterSettings

__all__ = [
    "ActiveMarker",
    "LedgerConflict",
    "LedgerEntry",
    "MailSender",
    "OutboundLedger",
    "OutboundService",
    "OutboundSettings",
    "OutboundStatusSink",
    "Phase",
    "ReapResult",
    "ScanResult",
    "SendOutcome",
    "SendResult",
]

log = logging.getLogger("emailrouter.outbound")

Clock = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(UTC)


# ------------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class OutboundSettings:
    """Outbound knobs (app settings ``OUTBOUND_*``, all optional; docs/outbound.md lists them)."""

    max_attempts: int = 10  # crm-ref §9: SSS retries transient failures up to 10 times
    per_sender_cap: int = 20  # emails per sender per scan
    scan_max_rows: int = 50_000  # Pending Send rows read per scan
    sending_timeout: timedelta = timedelta(minutes=15)  # reaper: Sending longer than this is stuck
    lease: timedelta = timedelta(minutes=5)  # a worker's hold on an email; must exceed one attempt's duration
    requeue_after: timedelta = timedelta(minutes=5)  # an enqueued but unclaimed email is enqueued again after this
    retry_base: timedelta = timedelta(seconds=30)  # first transient backoff, doubled per attempt
    retry_max: timedelta = timedelta(hours=1)
    send_settle: timedelta = timedelta(seconds=60)  # after a send attempt, wait this long before re-sending a draft
    finish_retry: timedelta = timedelta(seconds=30)  # delay before retrying a failed "mark Sent"
    save_to_sent_items: bool = True
    # Give the draft a Message-ID of our own (core.domain.identity.outbound_message_id) before it exists. Graph
    # documents internetMessageId as updatable while isDraft; whether Exchange Online keeps it on send is NOT
    # VERIFIED: the router records whatever the draft reports and warns when it differs (docs/outbound.md).
    choose_message_id: bool = True

    def __post_init__(self) -> None:
        if self.lease >= self.sending_timeout:
            raise ValueError("OUTBOUND_LEASE_SECONDS must be shorter than the reaper timeout "
                             "(OutboundReaperTimeoutSeconds)")

    @classmethod
    def from_settings(cls, settings: Settings) -> OutboundSettings:
        """Engineering knobs from app settings (core.config). The admin-facing ones (attempts, reaper timeout,
        Sent Items) come from the OrgSettings table at run time: see :meth:`with_router`."""
        secs = lambda name: timedelta(seconds=settings.integer(name, minimum=1))  # noqa: E731
        return cls(
            per_sender_cap=settings.integer("OUTBOUND_PER_SENDER_CAP", minimum=1),
            scan_max_rows=settings.integer("OUTBOUND_SCAN_MAX_ROWS", minimum=1),
            lease=secs("OUTBOUND_LEASE_SECONDS"),
            requeue_after=secs("OUTBOUND_REQUEUE_AFTER_SECONDS"),
            retry_base=secs("OUTBOUND_RETRY_BASE_SECONDS"),
            retry_max=secs("OUTBOUND_RETRY_MAX_SECONDS"),
            send_settle=secs("OUTBOUND_SEND_SETTLE_SECONDS"),
            choose_message_id=settings.flag("OUTBOUND_CHOOSE_MESSAGE_ID"),
        )

    def with_router(self, router: RouterSettings) -> OutboundSettings:
        """These settings with the admin's OrgSettings-table values (OutboundMaxAttempts,
        OutboundReaperTimeoutSeconds, SaveToSentItems) in force. A reaper timeout not longer than the lease
        would let the reaper steal live sends, so such a value is refused (logged) and the current one kept."""
        timeout = timedelta(seconds=router.outbound_reaper_timeout_seconds)
        if timeout <= self.lease:
            log.warning("OutboundReaperTimeoutSeconds (%ss) must exceed the lease (%ss); keeping %ss",
                        router.outbound_reaper_timeout_seconds, int(self.lease.total_seconds()),
                        int(self.sending_timeout.total_seconds()))
            timeout = self.sending_timeout
        return replace(self, max_attempts=router.outbound_max_attempts, sending_timeout=timeout,
                       save_to_sent_items=router.save_to_sent_items)


# ------------------------------------------------------------------------------------------------ ports


class OutboundLedger(Protocol):
    async def get(self, email_id: str) -> tuple[LedgerEntry, str] | None:
        """The entry and its ETag, or None."""
        ...

    async def put(self, entry: LedgerEntry, *, etag: str | None) -> str:
        """``etag=None``: insert (LedgerConflict if present); else replace only if unchanged. New ETag."""
        ...

    async def mark_active(self, marker: ActiveMarker) -> None: ...

    async def list_active(self) -> Sequence[ActiveMarker]: ...

    async def clear_active(self, email_id: str) -> None: ...


class MailSender(Protocol):
    """The Graph calls outbound makes (``core.adapters.graph.GraphMailClient`` implements them)."""

    async def create_draft(self, mailbox: str, message: Mapping[str, Any]) -> dict[str, Any]: ...

    async def upload_large_attachment(self, mailbox: str, message_id: str, *, name: str, content_type: str,
                                      data: bytes, is_inline: bool = False, content_id: str | None = None) -> None: ...

    async def send_draft(self, mailbox: str, draft_id: str) -> None: ...

    async def find_messages_by_internet_id(self, mailbox: str, internet_message_id: str, *,
                                           folder: str | None = None) -> list[dict[str, Any]]: ...

    async def delete_message(self, mailbox: str, message_id: str) -> None: ...


class OutboundStatusSink(Protocol):
    """Where an admin sees outbound health per mailbox (the MailboxStatus table, read by the admin CLI)."""

    async def record_failure(self, mailbox: str, email_id: str, reason: str, at: datetime) -> None: ...

    async def record_sent(self, mailbox: str, email_id: str, at: datetime) -> None: ...


# ------------------------------------------------------------------------------------------------ results


class SendOutcome(StrEnum):
    SENT = "sent"  # sent now and marked Sent
    FINISHED = "finished"  # had been sent before (recovered); CRM now marked Sent
    FINISH_PENDING = "finish_pending"  # sent, but marking Sent failed: re-enqueued to finish
    RETRY = "retry"  # transient failure: back to Pending Send with a delay
    FAILED = "failed"  # permanent failure or attempts exhausted: CRM Failed with a reason
    SKIPPED = "skipped"  # not ours to do (claimed elsewhere, not Pending Send, not a router sender)
    DEFERRED = "deferred"  # CRM not reachable before the claim: re-enqueued
    GONE = "gone"  # the email no longer exists


@dataclass(frozen=True)
class SendResult:
    outcome: SendOutcome
    reason: str = ""
    requeue_delay: int | None = None  # seconds; the service already re-enqueued the item


@dataclass
class ScanResult:
    scan_id: str
    seen: int = 0
    enqueued: int = 0
    in_flight: int = 0
    not_router: int = 0
    row_limit_hit: bool = False
    items: list[OutboundItem] = field(default_factory=list)
    blocked: str | None = None  # outbound does not run at all (why)
    sss_refused: dict[str, str] = field(default_factory=dict)  # mailbox -> an email left to SSS


@dataclass
class ReapResult:
    returned: int = 0
    finished: int = 0
    failed: int = 0
    markers_cleared: int = 0


class _LostLease(Exception):
    """Our ledger write lost: another worker took the email over (we were too slow)."""


@dataclass
class _Attempt:
    """One worker's hold on one email during :meth:`OutboundService.process`."""

    email_id: uuid.UUID
    mailbox: str
    entry: LedgerEntry
    etag: str
    resumed: bool = False  # an earlier attempt of this send generation may have left a draft


# ------------------------------------------------------------------------------------------------ the service


class OutboundService:
    def __init__(
        self,
        *,
        crm: OutboundCrmGateway,
        ledger: OutboundLedger,
        directory: MailboxDirectory,
        mail: MailSender,
        queue: WorkQueue,
        status: OutboundStatusSink,
        settings: OutboundSettings | None = None,
        clock: Clock = _utcnow,
        worker_id: str | None = None,
        schema: OrgSchemaSource | None = None,
    ) -> None:
        self._crm = crm
        self._ledger = ledger
        self._directory = directory
        self._mail = mail
        self._queue = queue
        self._status = status
        self._base_settings = settings or OutboundSettings()
        self.settings = self._base_settings  # refreshed with the admin's table values at each entry point
        self._clock = clock
        self._worker = worker_id or uuid.uuid4().hex
        self._schema = schema  # the org's metadata: optimistic concurrency on email (None = not checked)

    # -- helpers ---------------------------------------------------------------------------------------

    def _now(self) -> datetime:
        return self._clock()

    def _backoff(self, attempts: int, retry_after: float | None) -> int:
        """Seconds before the next attempt: exponential from ``retry_base``, at least Retry-After, capped."""
        s = self.settings
        exponential = s.retry_base.total_seconds() * 2 ** max(0, attempts - 1)
        wanted = max(exponential, retry_after or 0.0)
        return int(min(wanted, s.retry_max.total_seconds()) + 0.999)

    async def _blocked(self) -> str | None:
        """Why outbound must not claim anything now (None = it may): the org has optimistic concurrency off on
        email, so the If-Match claim would fail (0x8006088d) and every email would end Failed (audit #11)."""
        if self._schema is None:
            return None
        try:
            schema = await self._schema.get()
        except Exception as exc:  # the cache keeps its last good read; an unexpected failure must not stop sends
            log.warning("outbound: org metadata not readable (%s)", type(exc).__name__)
            return None
        if schema.concurrency_enabled("email") is False:
            return ("optimistic concurrency is off on the email table (EntityDefinitions IsOptimisticConcurrencyEnabled"
                    " = false): the claim needs If-Match, so the router sends nothing until it is on again")
        return None

    async def _sss_senders(self) -> dict[tuple[str, uuid.UUID], MailboxConfig]:
        """Router-outbound mailboxes the router refuses because Server-Side Synchronization is active for their
        outgoing email too (both would send the same Pending Send email; audit #12). SSS sends them."""
        org = await self._directory.get_org_settings()
        return {(mb.owner.table, mb.owner.id): mb for mb in await self._directory.list_mailboxes()
                if mb.owner is not None and mb.sss_outgoing is SssStatus.ACTIVE
                and _may_send(replace(mb, sss_outgoing=SssStatus.NONE), org)}

    async def _router_senders(self) -> tuple[dict[tuple[str, uuid.UUID], MailboxConfig], dict[uuid.UUID,
                                                                                              MailboxConfig]]:
        """Router-outbound mailboxes that may send (enabled, approved when the org requires it)."""
        org = await self._directory.get_org_settings()
        by_owner: dict[tuple[str, uuid.UUID], MailboxConfig] = {}
        by_mailbox: dict[uuid.UUID, MailboxConfig] = {}
        for mb in await self._directory.list_mailboxes():
            if not _may_send(mb, org) or mb.owner is None:
                continue
            by_owner[(mb.owner.table, mb.owner.id)] = mb
            if mb.mailbox_id is not None:
                by_mailbox[mb.mailbox_id] = mb
        return by_owner, by_mailbox

    @staticmethod
    def _match(state: CrmEmailState, by_owner: Mapping[tuple[str, uuid.UUID], MailboxConfig],
               by_mailbox: Mapping[uuid.UUID, MailboxConfig]) -> MailboxConfig | None:
        if state.sender is not None:
            found = by_owner.get((state.sender.table, state.sender.id))
            if found is not None:
                return found
        if state.sender_mailbox_id is not None:
            return by_mailbox.get(state.sender_mailbox_id)
        return None

    async def _requeue(self, item: OutboundItem, delay: int) -> None:
        await self._queue.send_many(OUTBOUND_QUEUE, [item.to_json()], delay_seconds=max(0, delay))

    async def _save(self, attempt: _Attempt, entry: LedgerEntry) -> None:
        try:
            attempt.etag = await self._ledger.put(replace(entry, updated_at=self._now()), etag=attempt.etag)
        except LedgerConflict as exc:
            raise _LostLease(f"ledger for {attempt.email_id} changed under us") from exc
        attempt.entry = entry

    # -- scan ------------------------------------------------------------------------------------------

    async def _refresh_settings(self) -> None:
        self.settings = self._base_settings.with_router(await self._directory.get_router_settings())

    async def scan(self) -> ScanResult:
        """Enqueue Pending Send emails of router senders, fairly across senders (issue 6 "Scan")."""
        await self._refresh_settings()
        now = self._now()
        result = ScanResult(scan_id=uuid.uuid4().hex)
        blocked = await self._blocked()
        if blocked is not None:
            log.error("outbound scan: not running: %s", blocked)
            result.blocked = blocked
            return result
        by_owner, by_mailbox = await self._router_senders()
        refused = await self._sss_senders()
        if not by_owner and not by_mailbox and not refused:
            return result
        active = {m.email_id: m for m in await self._ledger.list_active()}
        pending: list[PendingEmail] = []
        mailbox_of: dict[uuid.UUID, str] = {}
        async for state in self._crm.list_pending(max_rows=self.settings.scan_max_rows):
            result.seen += 1
            mb = self._match(state, by_owner, by_mailbox)
            if mb is None:
                sss = refused.get((state.sender.table, state.sender.id)) if state.sender is not None else None
                if sss is not None:
                    result.sss_refused.setdefault(sss.address, str(state.activity_id))
                result.not_router += 1  # Outlook / None / SSS senders: left alone
                continue
            marker = active.get(str(state.activity_id))
            if marker is not None and self._busy(marker, now):
                result.in_flight += 1
                continue
            pending.append(PendingEmail(state.activity_id, mb.address, state.modified_on or now))
            mailbox_of[state.activity_id] = mb.address
        result.row_limit_hit = result.seen >= self.settings.scan_max_rows
        if result.row_limit_hit:
            log.warning("outbound scan read the row limit (%d): later Pending Send emails wait for the next scan",
                        self.settings.scan_max_rows)
        ordered = fair_order(pending, per_sender_cap=self.settings.per_sender_cap)
        result.items = [OutboundItem(str(p.activity_id), mailbox_of[p.activity_id], result.scan_id)
                        for p in ordered]
        if result.items:
            # Enqueue first, then mark: a crash in between costs a duplicate work item (harmless: the claim
            # decides), never a lost one.
            await self._queue.send_many(OUTBOUND_QUEUE, [i.to_json() for i in result.items])
            gate = asyncio.Semaphore(16)

            async def mark(item: OutboundItem) -> None:
                async with gate:
                    await self._ledger.mark_active(ActiveMarker(item.email_id, item.sender_mailbox, now, None, now))

            await asyncio.gather(*(mark(i) for i in result.items))
        result.enqueued = len(result.items)
        for address, email_id in result.sss_refused.items():
            log.warning("outbound scan: %s: %s", address, SSS_REFUSAL)
            await self._status.record_failure(address, email_id, SSS_REFUSAL, now)
        log.info("outbound scan %s: %d pending seen, %d enqueued, %d in flight, %d not router senders",
                 result.scan_id, result.seen, result.enqueued, result.in_flight, result.not_router)
        return result

    def _busy(self, marker: ActiveMarker, now: datetime) -> bool:
        if marker.not_before is not None and marker.not_before > now:
            return True
        return marker.enqueued_at is not None and now - marker.enqueued_at < self.settings.requeue_after

    # -- sender ----------------------------------------------------------------------------------------

    async def handle(self, raw: str | bytes) -> SendResult:
        """Queue-trigger entry: parse (raises :class:`InvalidWorkItem`, which poisons the message), process."""
        return await self.process(OutboundItem.from_json(raw))

    async def process(self, item: OutboundItem) -> SendResult:
        await self._refresh_settings()
        try:
            email_id = uuid.UUID(item.email_id)
        except ValueError:
            raise InvalidWorkItem(f"email_id is not a GUID: {item.email_id[:64]!r}") from None
        key = str(email_id)
        try:
            loaded = await self._crm.load(email_id)
        except CrmUnavailable as exc:
            delay = self._backoff(1, exc.retry_after)
            await self._requeue(item, delay)
            return SendResult(SendOutcome.DEFERRED, exc.reason, delay)
        if loaded is None:
            await self._ledger.clear_active(key)
            return SendResult(SendOutcome.GONE, "the email no longer exists")

        got = await self._ledger.get(key)
        entry, etag = got if got is not None else (None, None)
        if entry is not None and etag is not None and entry.phase in (Phase.SENT, Phase.DONE):
            if entry.phase is Phase.DONE and loaded.state.status is OutboundStatus.SENT:
                await self._ledger.clear_active(key)
                return SendResult(SendOutcome.SKIPPED, "already sent")
            # Graph already sent it: only the CRM side is left (crash or failure after the send).
            return await self._finish(entry.sender_mailbox, entry, etag, recovered=True)

        now = self._now()
        status = loaded.state.status
        if status is not OutboundStatus.PENDING_SEND:
            return SendResult(SendOutcome.SKIPPED, f"CRM status is {status.value if status else 'not outbound'}")
        if entry is not None and entry.leased(now):
            return SendResult(SendOutcome.SKIPPED, "another worker holds the lease")
        if entry is not None and entry.phase is Phase.RETRY and entry.not_before and entry.not_before > now:
            return SendResult(SendOutcome.SKIPPED, "retry not due yet")

        mailbox = await self._directory.get_mailbox(item.sender_mailbox)
        if mailbox is None or mailbox.outbound_method is not OutboundMethod.ROUTER:
            # Not a router sender (Outlook, None, unknown): left alone, not even claimed.
            await self._ledger.clear_active(key)
            return SendResult(SendOutcome.SKIPPED, f"{item.sender_mailbox} is not a router-outbound mailbox")
        if mailbox.sss_outgoing is SssStatus.ACTIVE:
            await self._ledger.clear_active(key)
            return SendResult(SendOutcome.SKIPPED, SSS_REFUSAL)
        blocked = await self._blocked()
        if blocked is not None:
            await self._ledger.clear_active(key)  # stays Pending Send; the scan enqueues it once outbound may run
            log.error("outbound %s: not claimed: %s", email_id, blocked)
            return SendResult(SendOutcome.SKIPPED, blocked)

        # Claim: one winner per version of the email.
        try:
            await self._crm.set_status(email_id, OutboundStatus.SENDING, etag=loaded.state.etag)
        except ClaimLost:
            return SendResult(SendOutcome.SKIPPED, "claimed by someone else")
        except CrmUnavailable as exc:
            delay = self._backoff(1, exc.retry_after)
            await self._requeue(item, delay)
            return SendResult(SendOutcome.DEFERRED, exc.reason, delay)

        # A Failed email sent again from CRM is an admin/user retry (next_state AdminRetry): attempts restart.
        fresh = entry is None or entry.phase is Phase.FAILED
        base = LedgerEntry(key, mailbox.address, Phase.CLAIMED) if fresh or entry is None else entry
        sending = next_state(OutboundState(OutboundStatus.PENDING_SEND, 0 if fresh else base.attempts),
                             Claimed(now))
        claimed = replace(base, phase=Phase.CLAIMED, sender_mailbox=mailbox.address, owner=self._worker,
                          attempts=sending.delivery_attempts, lease_until=now + self.settings.lease,
                          claimed_at=sending.claimed_at, not_before=None,
                          internet_message_id=base.internet_message_id or self._planned_message_id(
                              email_id, mailbox.address))
        attempt = _Attempt(email_id, mailbox.address, claimed, "", resumed=not fresh)
        try:
            attempt.etag = await self._ledger.put(replace(claimed, updated_at=now), etag=etag)
        except LedgerConflict:
            # A stale worker wrote in between; give the email back and let the next scan decide.
            await self._safe_set_pending(email_id)
            return SendResult(SendOutcome.SKIPPED, "ledger changed during the claim")
        try:
            return await self._attempt(attempt, loaded, mailbox)
        except _LostLease as exc:
            log.warning("outbound %s: %s; stopping", email_id, exc)
            return SendResult(SendOutcome.SKIPPED, "lease lost to another worker")

    def _planned_message_id(self, email_id: uuid.UUID, sender: str) -> str:
        """The Message-ID this send generation will use, recorded with the claim (before any draft exists), so a
        crash between creating the draft and recording it leaves a draft the retry can find and remove."""
        if not self.settings.choose_message_id:
            return ""
        return outbound_message_id(email_id, uuid.uuid4().hex[:12], sender.rpartition("@")[2])

    async def _attempt(self, attempt: _Attempt, loaded: LoadedEmail, mailbox: MailboxConfig) -> SendResult:
        try:
            org = await self._directory.get_org_settings()
            email = await self._with_inline_content(await self._with_parent_message_id(loaded))
            built = build_outbound_message(email, mailbox, org)
            if isinstance(built, OutboundRejected):
                return await self._permanent(attempt, f"{built.code.value}: {built.why}", built.code.value)
            return await self._send(attempt, built, mailbox.address)
        except GraphError as exc:
            reason = f"Graph {exc.status} {exc.code}"
            if exc.transient or exc.status == 401:
                return await self._transient(attempt, reason, exc.code, exc.retry_after)
            return await self._permanent(attempt, _graph_reason(exc), exc.code)
        except CrmUnavailable as exc:
            return await self._transient(attempt, exc.reason, exc.code, exc.retry_after)
        except EmailGone as exc:
            await self._ledger.clear_active(attempt.entry.email_id)
            return SendResult(SendOutcome.GONE, exc.reason)
        except (CrmRejected, ClaimLost) as exc:
            return await self._permanent(attempt, exc.reason, exc.code)

    async def _with_parent_message_id(self, loaded: LoadedEmail) -> CrmOutboundEmail:
        """A reply composed in CRM to an email the router sent: CRM keeps no ``messageid`` for that parent (the
        column is for received email and a Sent email is read-only), so the Message-ID Exchange used comes from
        the ledger; the reply then threads under it (In-Reply-To)."""
        email = loaded.email
        if email.in_reply_to or loaded.parent_id is None:
            return email
        got = await self._ledger.get(str(loaded.parent_id))
        if got is None or not got[0].internet_message_id:
            return email
        return replace(email, in_reply_to=got[0].internet_message_id)

    async def _with_inline_content(self, email: CrmOutboundEmail) -> CrmOutboundEmail:
        """Load the bodies of attachments that travel inside the draft POST (< 3 MB); larger ones are uploaded
        to the draft later, one at a time, so at most one large body is in memory."""
        if not any(a.content is None and a.size < GRAPH_INLINE_LIMIT for a in email.attachments):
            return email
        loaded = []
        for a in email.attachments:
            if a.content is None and a.size < GRAPH_INLINE_LIMIT:
                a = replace(a, content=await self._crm.load_attachment(a.attachment_id))
            loaded.append(a)
        return replace(email, attachments=tuple(loaded))

    async def _send(self, attempt: _Attempt, built: OutboundMessage, mailbox: str) -> SendResult:
        entry = attempt.entry
        draft_id = ""
        if entry.draft_id or (attempt.resumed and entry.internet_message_id):
            verdict, draft_id = await self._resume(attempt, mailbox)
            if verdict == "sent":
                await self._save(attempt, replace(attempt.entry, phase=Phase.SENT, lease_until=None))
                return await self._finish(mailbox, attempt.entry, attempt.etag, recovered=True)
            if verdict == "unknown":
                return await self._transient(
                    attempt, "send outcome not visible yet: the draft is gone and no sent copy was found",
                    "send_unknown", None)
        if not draft_id:
            planned = attempt.entry.internet_message_id
            message = {**built.graph_message, "internetMessageId": planned} if planned else built.graph_message
            draft = await self._mail.create_draft(mailbox, message)
            draft_id = str(draft.get("id") or "")
            imid = str(draft.get("internetMessageId") or "")
            if not draft_id:
                return await self._transient(attempt, "Graph returned a draft without an id", "no_draft_id", None)
            if not imid:
                log.warning("outbound %s: the draft has no internetMessageId; crash recovery will be blind",
                            attempt.email_id)
                imid = planned
            elif planned and imid != planned:
                log.warning("outbound %s: Exchange gave the draft its own Message-ID instead of the chosen one; "
                            "recorded %s (replies correlate by it only through the tracking token)",
                            attempt.email_id, imid)
            await self._save(attempt, replace(attempt.entry, phase=Phase.DRAFT, draft_id=draft_id,
                                              internet_message_id=imid, draft_complete=False,
                                              send_attempted_at=None))
            for large in built.large_attachments:
                data = await self._crm.load_attachment(large.attachment_id)
                await self._mail.upload_large_attachment(mailbox, draft_id, name=large.name,
                                                         content_type=large.content_type, data=data,
                                                         is_inline=large.is_inline, content_id=large.content_id)
            await self._save(attempt, replace(attempt.entry, draft_complete=True))
        # Renew the lease right before the send and note the attempt: from here on a retry must check Graph
        # before sending again.
        now = self._now()
        await self._save(attempt, replace(attempt.entry, send_attempted_at=now, lease_until=now + self.settings.lease))
        try:
            await self._mail.send_draft(mailbox, draft_id)
        except GraphError as exc:
            if exc.status not in _AMBIGUOUS_SEND_STATUS:
                # Exchange answered and refused: nothing was submitted, the draft may be sent again at once.
                await self._save(attempt, replace(attempt.entry, send_attempted_at=None))
            raise
        await self._save(attempt, replace(attempt.entry, phase=Phase.SENT, lease_until=None))
        return await self._finish(mailbox, attempt.entry, attempt.etag, recovered=False)

    async def _resume(self, attempt: _Attempt, mailbox: str) -> tuple[str, str]:
        """What became of the draft a previous attempt created: ("sent", ""), ("send", draft_id) to send that
        draft, ("create", "") for a new draft, or ("unknown", "")."""
        entry = attempt.entry
        found: list[dict[str, Any]] = []
        if entry.internet_message_id:
            found = await self._mail.find_messages_by_internet_id(mailbox, entry.internet_message_id)
        if any(not m.get("isDraft", False) for m in found):
            return "sent", ""
        drafts = [str(m.get("id")) for m in found if m.get("isDraft") and m.get("id")]
        if entry.send_attempted_at is not None:
            settled = self._now() - entry.send_attempted_at >= self.settings.send_settle
            if drafts and settled:
                return "send", entry.draft_id if entry.draft_id in drafts else drafts[0]
            return "unknown", ""
        if drafts and entry.draft_complete:
            return "send", entry.draft_id if entry.draft_id in drafts else drafts[0]
        for draft in drafts:  # half-built (attachments missing): start over
            await self._mail.delete_message(mailbox, draft)
        return "create", ""

    async def _finish(self, mailbox: str, entry: LedgerEntry, etag: str, *, recovered: bool) -> SendResult:
        """Mark the CRM email Sent (the send already happened) and close the ledger entry."""
        email_id = uuid.UUID(entry.email_id)
        attempts = next_state(OutboundState(OutboundStatus.SENDING, entry.attempts), SendSucceeded()).delivery_attempts
        if entry.phase is Phase.DONE:
            attempts = entry.attempts
        try:
            await self._crm.mark_sent(email_id)
        except EmailGone:
            log.warning("outbound %s: sent, but the CRM email was deleted meanwhile", email_id)
        except OutboundCrmError as exc:
            delay = int(self.settings.finish_retry.total_seconds())
            log.warning("outbound %s: sent, marking Sent failed (%s); finishing again in %ds",
                        email_id, exc.reason, delay)
            await self._requeue(OutboundItem(entry.email_id, mailbox), delay)
            return SendResult(SendOutcome.FINISH_PENDING, exc.reason, delay)
        now = self._now()
        if entry.phase is not Phase.DONE:
            try:
                await self._ledger.put(replace(entry, phase=Phase.DONE, attempts=attempts, lease_until=None,
                                               owner="", last_error="", last_error_code="", updated_at=now),
                                       etag=etag)
            except LedgerConflict:
                log.info("outbound %s: ledger changed while finishing; CRM is Sent", email_id)
        await self._ledger.clear_active(entry.email_id)
        await self._status.record_sent(mailbox, entry.email_id, now)
        if not self.settings.save_to_sent_items and entry.internet_message_id:
            await self._drop_sent_copy(mailbox, entry.internet_message_id)
        log.info("outbound %s: %s (attempt %d)", email_id, "finished after recovery" if recovered else "sent",
                 attempts)
        return SendResult(SendOutcome.FINISHED if recovered else SendOutcome.SENT)

    async def _drop_sent_copy(self, mailbox: str, internet_message_id: str) -> None:
        """SaveToSentItems=false (org settings table): a draft send always saves to Sent Items (graph.md §7.2), so the
        copy is deleted once CRM is marked Sent (not before: recovery relies on it). Best effort."""
        try:
            for message in await self._mail.find_messages_by_internet_id(mailbox, internet_message_id,
                                                                         folder="sentitems"):
                if not message.get("isDraft") and message.get("id"):
                    await self._mail.delete_message(mailbox, str(message["id"]))
        except GraphError as exc:
            log.warning("outbound: could not remove the Sent Items copy (%s %s)", exc.status, exc.code)

    async def _transient(self, attempt: _Attempt, reason: str, code: str, retry_after: float | None) -> SendResult:
        entry = attempt.entry
        state = next_state(OutboundState(OutboundStatus.SENDING, entry.attempts, entry.claimed_at),
                           TransientFailure(reason, self.settings.max_attempts))
        if state.status is OutboundStatus.FAILED:
            return await self._fail(attempt, state, code)
        delay = self._backoff(state.delivery_attempts, retry_after)
        now = self._now()
        not_before = now + timedelta(seconds=delay)
        await self._save(attempt, replace(entry, phase=Phase.RETRY, attempts=state.delivery_attempts, owner="",
                                          lease_until=None, not_before=not_before, last_error=reason[:1000],
                                          last_error_code=code))
        email_id = attempt.email_id
        await self._safe_set_pending(email_id)
        await self._ledger.mark_active(ActiveMarker(entry.email_id, attempt.mailbox, not_before, not_before, now))
        await self._requeue(OutboundItem(entry.email_id, attempt.mailbox), delay)
        log.info("outbound %s: transient failure (%s), attempt %d of %d, retry in %ds", email_id, reason,
                 state.delivery_attempts, self.settings.max_attempts, delay)
        return SendResult(SendOutcome.RETRY, reason, delay)

    async def _safe_set_pending(self, email_id: uuid.UUID) -> None:
        try:
            await self._crm.set_status(email_id, OutboundStatus.PENDING_SEND, etag=None)
        except OutboundCrmError as exc:
            # Left in Sending: the reaper returns it after OutboundReaperTimeoutSeconds.
            log.warning("outbound %s: could not return to Pending Send (%s)", email_id, exc.reason)

    async def _permanent(self, attempt: _Attempt, reason: str, code: str) -> SendResult:
        entry = attempt.entry
        state = next_state(OutboundState(OutboundStatus.SENDING, entry.attempts, entry.claimed_at),
                           PermanentFailure(reason))
        return await self._fail(attempt, state, code)

    async def _fail(self, attempt: _Attempt, state: OutboundState, code: str) -> SendResult:
        """CRM Failed with the reason in the ledger and the mailbox status; the draft (never sent) removed."""
        entry = attempt.entry
        reason = state.reason or "failed"
        try:
            await self._crm.mark_failed(attempt.email_id, delivery_attempts=state.delivery_attempts)
        except OutboundCrmError as exc:
            log.warning("outbound %s: could not mark Failed (%s)", attempt.email_id, exc.reason)
            if not isinstance(exc, EmailGone):
                # Keep the reason; the reaper gets the email out of Sending and the next attempt decides again.
                await self._save(attempt, replace(entry, phase=Phase.RETRY, attempts=state.delivery_attempts,
                                                  owner="", lease_until=None, last_error=reason[:1000],
                                                  last_error_code=code))
                return SendResult(SendOutcome.RETRY, reason)
        if entry.draft_id:
            try:
                await self._mail.delete_message(attempt.mailbox, entry.draft_id)
            except GraphError as exc:
                log.info("outbound %s: draft not removed (%s %s)", attempt.email_id, exc.status, exc.code)
        now = self._now()
        await self._save(attempt, replace(entry, phase=Phase.FAILED, attempts=state.delivery_attempts, owner="",
                                          lease_until=None, draft_id="", draft_complete=False,
                                          send_attempted_at=None, last_error=reason[:1000], last_error_code=code))
        await self._ledger.clear_active(entry.email_id)
        await self._status.record_failure(attempt.mailbox, entry.email_id, reason, now)
        log.warning("outbound %s: Failed after %d attempt(s): %s", attempt.email_id, state.delivery_attempts,
                    reason)
        return SendResult(SendOutcome.FAILED, reason)

    # -- reaper ----------------------------------------------------------------------------------------

    async def reap(self) -> ReapResult:
        """Emails stuck in Sending past OutboundReaperTimeoutSeconds go back to Pending Send (or Failed when
        their attempts are used up) unless the ledger proves they were sent: those are finished as Sent.
        Then the ledger sweep finishes sent-but-unmarked emails CRM no longer shows as Sending."""
        await self._refresh_settings()
        result = ReapResult()
        now = self._now()
        s = self.settings
        by_owner, by_mailbox = await self._router_senders()
        async for state in self._crm.list_sending(max_rows=s.scan_max_rows):
            mb = self._match(state, by_owner, by_mailbox)
            got = await self._ledger.get(str(state.activity_id))
            entry, etag = got if got is not None else (None, "")
            if mb is None and entry is None:
                continue  # not a router email
            mailbox = entry.sender_mailbox if entry is not None else mb.address if mb else ""
            if entry is not None and entry.phase in (Phase.SENT, Phase.DONE):
                finished = await self._finish(mailbox, entry, etag, recovered=True)
                result.finished += finished.outcome is not SendOutcome.FINISH_PENDING
                continue
            if entry is not None and entry.leased(now):
                continue
            attempts = entry.attempts if entry is not None else state.delivery_attempts
            claimed_at = (entry.claimed_at if entry is not None and entry.claimed_at else state.modified_on)
            new = next_state(OutboundState(OutboundStatus.SENDING, attempts, claimed_at),
                             ReaperCheck(now, s.sending_timeout, s.max_attempts))
            if new.status is OutboundStatus.SENDING:
                continue
            if new.status is OutboundStatus.PENDING_SEND:
                try:
                    await self._crm.set_status(state.activity_id, OutboundStatus.PENDING_SEND, etag=state.etag)
                except OutboundCrmError as exc:
                    log.info("reaper: %s not returned (%s)", state.activity_id, exc.reason)
                    continue
                await self._reaper_ledger(entry, etag, state, mailbox, Phase.RETRY, new, now)
                result.returned += 1
                log.warning("reaper: %s was stuck in Sending; back to Pending Send (attempt %d)",
                            state.activity_id, new.delivery_attempts)
            else:
                attempt = _Attempt(state.activity_id, mailbox,
                                   entry or LedgerEntry(str(state.activity_id), mailbox, Phase.CLAIMED,
                                                        attempts=attempts), etag)
                if entry is None:
                    try:
                        attempt.etag = await self._ledger.put(attempt.entry, etag=None)
                    except LedgerConflict:
                        continue
                try:
                    await self._fail(attempt, new, "stuck_in_sending")
                except _LostLease:
                    continue
                result.failed += 1
        result.markers_cleared += await self._sweep_markers(now)
        return result

    async def _reaper_ledger(self, entry: LedgerEntry | None, etag: str, state: CrmEmailState, mailbox: str,
                             phase: Phase, new: OutboundState, now: datetime) -> None:
        base = entry or LedgerEntry(str(state.activity_id), mailbox, phase)
        updated = replace(base, phase=phase, attempts=new.delivery_attempts, owner="", lease_until=None,
                          not_before=now, last_error=(new.reason or "")[:1000], last_error_code="stuck_in_sending",
                          updated_at=now)
        try:
            await self._ledger.put(updated, etag=etag if entry is not None else None)
        except LedgerConflict:
            log.info("reaper: ledger for %s changed meanwhile", state.activity_id)

    async def _sweep_markers(self, now: datetime) -> int:
        """Finish emails the ledger says were sent whose CRM update never happened (e.g. a crash between the
        two steps of mark Sent), and drop markers of emails that are over."""
        cleared = 0
        for marker in await self._ledger.list_active():
            stamp = marker.updated_at or marker.enqueued_at
            if stamp is not None and now - stamp < self.settings.sending_timeout:
                continue
            got = await self._ledger.get(marker.email_id)
            if got is None:
                if stamp is None or now - stamp >= timedelta(days=1):
                    await self._ledger.clear_active(marker.email_id)
                    cleared += 1
                continue
            entry, etag = got
            if entry.phase is Phase.SENT and not entry.leased(now):
                await self._finish(entry.sender_mailbox, entry, etag, recovered=True)
            elif entry.phase in (Phase.DONE, Phase.FAILED):
                await self._ledger.clear_active(marker.email_id)
                cleared += 1
        return cleared


SSS_REFUSAL: Final = ("not sent by the router: Server-Side Synchronization is also active for outgoing email on this "
                      "mailbox (email server profile, Test & Enable passed), and both would send it; SSS sends it. "
                      "Remove the profile in CRM (or override SssOutgoing) to have the router send")


def _may_send(mb: MailboxConfig, org: OrgEmailSettings) -> bool:
    if mb.kind is MailboxKind.FORWARD_SINK or mb.outbound_method is not OutboundMethod.ROUTER:
        return False
    if mb.sss_outgoing is SssStatus.ACTIVE:
        return False
    if not mb.enabled_for_outgoing:
        return False
    required = (org.require_approval_for_queue_email if mb.kind is MailboxKind.QUEUE
                else org.require_approval_for_user_email)
    return not required or mb.approval is ApprovalStatus.APPROVED


# A send that ended in a transport error (status 0) or a gateway timeout may have been accepted anyway.
_AMBIGUOUS_SEND_STATUS: Final = frozenset({0, 504})

# Graph error codes that mean "this message will never go" (graph.md §8; crm-ref §9).
_PERMANENT_REASONS = {
    "ErrorInvalidRecipients": "invalid recipients",
    "ErrorMessageSizeExceeded": "message too large",
    "ErrorQuotaExceeded": "mailbox quota exceeded",
    "ErrorAccessDenied": "the app may not send as this mailbox (application access policy)",
    "ErrorSendAsDenied": "the app may not send as this mailbox",
    "InvalidInternetMessageHeader": "invalid internet message header",
    "InvalidInternetMessageHeaderCollection": "too many internet message headers",
}


def _graph_reason(exc: Any) -> str:
    status, code = int(getattr(exc, "status", 0)), str(getattr(exc, "code", ""))
    what = _PERMANENT_REASONS.get(code)
    if what is None:
        what = {403: "the app may not send as this mailbox (403)", 404: "the sender mailbox does not exist",
                413: "message too large"}.get(status, "rejected by Exchange")
    return f"{what} (Graph {status} {code})"
