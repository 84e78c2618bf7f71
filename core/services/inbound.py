"""Inbound processor: one work item (mailbox + Graph message id) -> at most one CRM email, exactly once.

Imperative shell around ``core.domain.inbound``: ledger check -> fetch once -> normalise -> (forward unwrap: the
attached original's raw MIME) -> look up parties and correlation keys (one coalesced Dataverse
request, short-TTL caches) -> ``plan_inbound`` (pure) -> write (one change set, deterministic activityid) ->
category / delete the forward wrapper -> ledger + decision record.

Failure handling (issue 5):

* transient (Graph 429/5xx, Dataverse 429/5xx, expired token, timeouts): the item is re-enqueued with a visibility
  delay (``Retry-After``, bounded) and the invocation ends successfully, so no worker sleeps and the host's dequeue
  count is not burned. The attempt count lives in the processed ledger (the work item has no counter field); after
  ``max_attempts`` the failure is treated as permanent.
* permanent (403 no access, 404 message gone, 400 bad data, unusable message): recorded in the decision log, the
  ledger (so it is not retried by redelivered notifications) and the mailbox status; the Outlook message gets the
  "undeliverable" category where possible.
* anything else (a bug, storage down) is raised: the Functions host retries up to ``maxDequeueCount`` and then
  moves the message to ``inbound-mail-poison``. On the last attempt the reason is written to the PoisonLog table
  first (the host does not tell the poison queue why).
"""

from __future__ import annotations

import logging
import random
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Protocol

from core.adapters.dataverse import DataverseError
from core.adapters.graph import AttachmentContents, GraphAccessDenied, GraphError, GraphNotFound
from core.domain.category import CATEGORY_SOURCE
from core.domain.correlation import KnownEmail
from core.domain.forward import WrapperFate, wrapper_fate
from core.domain.inbound import (
    InboundContext,
    InboundPlan,
    Skip,
    TrackEmail,
    already_in_crm,
    decision_record,
    inbound_lookups,
    mailbox_index,
    plan_inbound,
)
from core.domain.model import (
    FolderKind,
    MailboxConfig,
    MailboxKind,
    MailMessage,
    OrgEmailSettings,
)
from core.domain.normalize import LIMITS, InvalidMessage, normalize_graph_message
from core.domain.queue_items import plan_queue_items
from core.domain.records import InboundLedgerEntry as LedgerEntry
from core.domain.records import LedgerOutcome
from core.names import INBOUND_QUEUE
from core.ports import MailboxDirectory, WorkQueue
from core.services.inbound_crm import (
    AttachmentRejected,
    CrmLookup,
    InboundCrmGateway,
    StaleReference,
    WriteOutcome,
)
from core.work_items import InboundItem, InvalidWorkItem

if TYPE_CHECKING:
    from core.bootstrap import Container
    from core.services.queue_items_crm import QueueItemGateway

__all__ = [
    "MAX_DEQUEUE_COUNT",
    "DecisionLog",
    "InboundOptions",
    "InboundProcessor",
    "LedgerEntry",
    "LedgerOutcome",
    "MailGateway",
    "MailboxStatusLog",
    "PoisonLog",
    "ProcessResult",
    "ProcessedLedger",
    "describe_error",
    "folder_kind_of",
    "is_transient",
    "processor_for",
    "reevaluation_allowed",
    "reopened_by_category",
]

log = logging.getLogger("emailrouter.inbound")

# host.json extensions.queues.maxDequeueCount (a test pins the two together): on this attempt the host gives up.
MAX_DEQUEUE_COUNT: Final = 5

_WELL_KNOWN_FOLDERS: Final[Mapping[str, FolderKind]] = {
    "inbox": FolderKind.INBOX,
    "sentitems": FolderKind.SENT_ITEMS,
    "junkemail": FolderKind.JUNK,
    "drafts": FolderKind.DRAFTS,
}


# ------------------------------------------------------------------------------------------------ ports


class ProcessedLedger(Protocol):
    async def get(self, mailbox: str, graph_id: str) -> LedgerEntry | None: ...

    async def put(self, entry: LedgerEntry) -> None: ...


class DecisionLog(Protocol):
    """Decision records for ``emailrouter explain`` (one per mailbox + message, latest wins)."""

    async def record(self, mailbox: str, graph_id: str, record: Mapping[str, Any]) -> None: ...


class MailboxStatusLog(Protocol):
    async def record_failure(self, mailbox: str, *, code: str, reason: str, permanent: bool) -> None: ...


class PoisonLog(Protocol):
    async def record(self, *, queue: str, message: str, dequeue_count: int, reason: str) -> None: ...


class MailGateway(Protocol):
    """The Graph calls the processor makes (``core.adapters.graph.GraphMailClient`` implements them)."""

    async def get_message(self, mailbox: str, message_id: str, *, with_attachments: bool = True
                          ) -> dict[str, Any]: ...

    async def get_attachment_mime(self, mailbox: str, message_id: str, attachment_id: str) -> bytes: ...

    async def get_attachment_contents(self, mailbox: str, message_id: str,
                                      attachments: Sequence[Mapping[str, Any]]) -> AttachmentContents: ...

    async def set_categories(self, mailbox: str, message_id: str, categories: Sequence[str]) -> None: ...

    async def delete_message(self, mailbox: str, message_id: str) -> None: ...

    async def move_message(self, mailbox: str, message_id: str, destination_id: str) -> dict[str, Any]: ...

    async def ensure_child_folder(self, mailbox: str, parent: str, display_name: str) -> str: ...


@dataclass(frozen=True)
class InboundOptions:
    max_attempts: int = 20  # transient failures of one message before it counts as permanent
    min_retry_delay: int = 5  # seconds
    max_retry_delay: int = 900  # seconds: Retry-After values beyond this are capped
    mailbox_cache_seconds: float = 30.0  # how long the list of mailboxes (forward users, queues) is reused


@dataclass(frozen=True)
class ProcessResult:
    outcome: str  # tracked | already_tracked | duplicate_item | skipped:<stage>:<code> | retry | failed:<code> | gone
    activity_id: str = ""
    retry_in: int | None = None
    graph_calls: int = 0
    crm_requests: int = 0


# ------------------------------------------------------------------------------------------------ helpers


def reevaluation_allowed(item: InboundItem, entry: LedgerEntry) -> bool:
    """Whether a re-evaluation item (``emailrouter reprocess``) may decide a message the ledger has an outcome for.
    Pure. Only an outcome the item names (skipped, failed) is overruled - tracked mail stays tracked, gone mail is
    gone - and only once: an entry written after the request is the re-evaluation itself, so a redelivered item is a
    duplicate like any other (exactly once in CRM also holds without this: the deterministic activity id and the
    Message-ID lookup find an email that is there already)."""
    if not item.reevaluates or entry.outcome.value not in item.reevaluates:
        return False
    if not item.requested_at or entry.at is None:
        return True
    try:
        requested = datetime.fromisoformat(item.requested_at.replace("Z", "+00:00"))
    except ValueError:
        return False
    at = entry.at if entry.at.tzinfo else entry.at.replace(tzinfo=UTC)
    return at < (requested if requested.tzinfo else requested.replace(tzinfo=UTC))


_REOPENABLE: Final = frozenset({LedgerOutcome.SKIPPED, LedgerOutcome.FAILED, LedgerOutcome.GONE})


def reopened_by_category(item: InboundItem, entry: LedgerEntry) -> bool:
    """A track-by-category request re-evaluates a message that automatic processing skipped, failed or did not
    find - once: never one already tracked, never one a category request was answered for already."""
    return (item.source == CATEGORY_SOURCE and entry.outcome in _REOPENABLE
            and entry.source != CATEGORY_SOURCE)


def folder_kind_of(folder: str) -> FolderKind:
    """A work item's folder (well-known name or folder id) -> the folder kind the rules need."""
    return _WELL_KNOWN_FOLDERS.get(folder.strip().lower(), FolderKind.OTHER) if folder else FolderKind.INBOX


def is_transient(exc: BaseException) -> bool:
    """Worth retrying later: throttling, 5xx, timeouts, an expired token (401)."""
    if isinstance(exc, GraphError):
        return exc.transient or exc.status == 401
    if isinstance(exc, DataverseError):
        return bool(exc.retryable)
    return False


def _retry_after(exc: BaseException) -> float | None:
    value = getattr(exc, "retry_after", None)
    return float(value) if isinstance(value, int | float) else None


def _needs_content(attachment: object, limit: int) -> bool:
    """A file attachment listed without its content that CRM can keep (base64 size within ``limit``), or a
    message/rfc822 file (a forwarded original, unwrapped whatever its size)."""
    if not isinstance(attachment, Mapping) or not attachment.get("id") or "contentBytes" in attachment:
        return False
    if str(attachment.get("@odata.type", "")).lower() != "#microsoft.graph.fileattachment":
        return False  # item attachments are read as MIME by _attached_messages; reference ones have no content
    name = str(attachment.get("name") or "").lower()
    if str(attachment.get("contentType") or "").lower() == "message/rfc822" or name.endswith(".eml"):
        return True
    size = attachment.get("size")
    return not isinstance(size, int) or 4 * ((size + 2) // 3) <= limit


def describe_error(exc: BaseException) -> str:
    # Class, status and code only: error messages can quote addresses or subjects (never logged above DEBUG).
    status = getattr(exc, "status", "")
    code = getattr(exc, "code", "")
    return " ".join(str(p) for p in (exc.__class__.__name__, status, code) if p != "")


class _MailboxSnapshot:
    """Mailboxes list (for forward users, queue addresses, owners) reused for a few seconds across messages."""

    def __init__(self, ttl: float, clock: Callable[[], float]) -> None:
        self._ttl = ttl
        self._clock = clock
        self._expires = 0.0
        self._value: tuple[MailboxConfig, ...] = ()
        self.read_at: datetime | None = None

    async def get(self, directory: MailboxDirectory) -> tuple[MailboxConfig, ...]:
        if self._clock() >= self._expires:
            self._value = tuple(await directory.list_mailboxes())
            self._expires = self._clock() + self._ttl
            self.read_at = datetime.now(UTC)
        return self._value

    def expire(self) -> None:
        self._expires = 0.0


@dataclass
class _Counters:
    graph: int = 0
    crm: int = 0


# ------------------------------------------------------------------------------------------------ the processor


@dataclass
class InboundProcessor:
    mail: MailGateway
    crm: InboundCrmGateway
    mailboxes: MailboxDirectory
    ledger: ProcessedLedger
    decisions: DecisionLog
    status: MailboxStatusLog
    poison: PoisonLog
    queue: WorkQueue
    options: InboundOptions = field(default_factory=InboundOptions)
    queue_items: QueueItemGateway | None = None  # None: no queue items (tests that do not look at them)
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    monotonic: Callable[[], float] = time.monotonic
    _snapshot: _MailboxSnapshot | None = field(default=None, init=False, repr=False)
    _folders: dict[tuple[str, str], str] = field(default_factory=dict, init=False, repr=False)

    # -- entry points ---------------------------------------------------------------------------------------

    async def handle_message(self, raw: str, *, dequeue_count: int = 1,
                             max_dequeue_count: int = MAX_DEQUEUE_COUNT) -> ProcessResult:
        """The queue trigger's body: parse, process, and on the host's last attempt record why it is poisoned."""
        try:
            item = InboundItem.from_json(raw)
            return await self.process(item)
        except Exception as exc:
            if dequeue_count >= max_dequeue_count:
                reason = f"invalid work item: {exc}" if isinstance(exc, InvalidWorkItem) else describe_error(exc)
                log.error("inbound item fails on its last attempt (%d); moving to poison: %s", dequeue_count, reason)
                await self.poison.record(queue=INBOUND_QUEUE, message=raw, dequeue_count=dequeue_count,
                                         reason=reason)
            raise

    async def process(self, item: InboundItem) -> ProcessResult:
        entry = await self.ledger.get(item.mailbox, item.message_id)
        if entry is not None and entry.outcome.terminal and not (
                reevaluation_allowed(item, entry) or reopened_by_category(item, entry)):
            # Redelivered/duplicated notification, or delta re-reporting a message: no refetch.
            return ProcessResult("duplicate_item", activity_id=entry.activity_id)
        attempts = entry.attempts if entry is not None and not entry.outcome.terminal else 0
        if item.reevaluates:
            await self._settings_fresh_since(item.requested_at)
        counters = _Counters()
        try:
            return await self._process(item, counters)
        except Exception as exc:
            if is_transient(exc):
                return await self._retry_later(item, attempts + 1, exc, counters)
            raise

    async def _settings_fresh_since(self, requested_at: str) -> None:
        """A re-evaluation is asked for right after an admin changed a setting: decide it with the settings as
        they are now, not as this process cached them before the change (up to the cache TTL)."""
        try:
            moment = datetime.fromisoformat(requested_at.replace("Z", "+00:00")) if requested_at else self.clock()
        except ValueError:
            moment = self.clock()
        fresh = getattr(self.mailboxes, "fresh_since", None)
        if callable(fresh):
            await fresh(moment)
        if self._snapshot is not None and (self._snapshot.read_at is None or self._snapshot.read_at < moment):
            self._snapshot.expire()

    # -- the pipeline ---------------------------------------------------------------------------------------

    async def _process(self, item: InboundItem, counters: _Counters) -> ProcessResult:
        mailbox = await self.mailboxes.get_mailbox(item.mailbox)
        if mailbox is None:
            reason = f"{item.mailbox} is not a configured mailbox"
            return await self._skip_unfetched(item, "mailbox:unknown", reason)
        org = await self.mailboxes.get_org_settings()

        try:
            data = await self._fetch(item, counters)
            data = await self._attachment_contents(item, data, org, counters)
            attached = await self._attached_messages(item, data, mailbox, counters)
        except GraphNotFound:
            return await self._terminal(item, LedgerOutcome.GONE, "gone", "the message no longer exists in the "
                                        "mailbox (deleted or moved before it was processed)", record_status=False)
        except GraphAccessDenied as exc:
            if exc.status == 401:
                raise
            return await self._permanent(item, None, "access_denied", describe_error(exc))

        try:
            message = normalize_graph_message(mailbox.address, data, folder_kind_of(item.folder),
                                              item.folder if folder_kind_of(item.folder) is FolderKind.OTHER else "",
                                              attached_mime=attached)
        except InvalidMessage as exc:
            return await self._permanent(item, None, "invalid_message", exc.reason, tag=(mailbox.address, []))

        known = await self._known_mailboxes()
        requested = ""
        if item.source == CATEGORY_SOURCE:
            router = await self.mailboxes.get_router_settings()
            requested = router.track_category_name if router.track_categorized_items else ""
        if item.source == "backfill":
            # An explicit history import: the admin chose the start date, so "process email received after" does
            # not apply (the backfill lists only mail received after its own `since`).
            mailbox = replace(mailbox, process_email_received_after=None)
            known = tuple(replace(m, process_email_received_after=None) for m in known)
        context = InboundContext(
            mailbox=mailbox, org=org, now=self.clock(), known_mailboxes=known,
            forward_users=mailbox_index(known).forward_users,
            requested_category=requested,
        )
        return await self._plan_and_write(item, message, context, org, counters)

    async def _fetch(self, item: InboundItem, counters: _Counters) -> dict[str, Any]:
        counters.graph += 1
        return await self.mail.get_message(item.mailbox, item.message_id)

    async def _attached_messages(self, item: InboundItem, data: Mapping[str, Any], mailbox: MailboxConfig,
                                 counters: _Counters) -> dict[str, bytes]:
        """A forward wrapper's original is an item attachment; ``$expand=attachments`` leaves the item out and an
        expanded item has default properties only (no headers: no In-Reply-To/References, no Auto-Submitted, no
        loop marker). Its raw MIME (``$value``) has them all: one call per item attachment, in sinks only (anywhere
        else an attached Outlook item is not stored in CRM)."""
        attachments = data.get("attachments")
        if mailbox.kind is not MailboxKind.FORWARD_SINK or not isinstance(attachments, list):
            return {}
        found: dict[str, bytes] = {}
        for attachment in attachments[:LIMITS.max_attachments]:
            if (isinstance(attachment, dict) and attachment.get("id")
                    and str(attachment.get("@odata.type", "")).lower() == "#microsoft.graph.itemattachment"):
                counters.graph += 1
                found[str(attachment["id"])] = await self.mail.get_attachment_mime(
                    item.mailbox, item.message_id, str(attachment["id"]))
        return found

    async def _attachment_contents(self, item: InboundItem, data: dict[str, Any], org: OrgEmailSettings,
                                   counters: _Counters) -> dict[str, Any]:
        """The message was read with attachment metadata only: download the content of the file attachments CRM
        will keep (under the org's limit; a forwarded ``.eml`` always, it is the original to unwrap). Mail without
        attachments costs nothing here; the rest are left out by the plan with the reason."""
        attachments = data.get("attachments")
        if not isinstance(attachments, list):
            return data
        wanted = [a for a in attachments if _needs_content(a, org.max_attachment_bytes)]
        if not wanted:
            return data
        fetched = await self.mail.get_attachment_contents(item.mailbox, item.message_id, wanted)
        counters.graph += fetched.requests
        by_id = {str(a.get("id")): a for a in fetched.attachments}
        merged = [by_id.get(str(a.get("id")), a) if isinstance(a, dict) else a for a in attachments]
        return {**data, "attachments": merged}

    async def _known_mailboxes(self) -> tuple[MailboxConfig, ...]:
        if self._snapshot is None:
            self._snapshot = _MailboxSnapshot(self.options.mailbox_cache_seconds, self.monotonic)
        return await self._snapshot.get(self.mailboxes)

    async def _lookup(self, message: MailMessage, context: InboundContext, counters: _Counters
                      ) -> tuple[InboundContext, CrmLookup | None]:
        lookups = inbound_lookups(message, context)
        if lookups.message is None:  # not unwrappable: the planner reports why, nothing to look up
            return context, None
        found = await self.crm.lookup(lookups.addresses, lookups.keys)
        counters.crm += found.requests
        return replace(context, directory=found.directory, correlation=found.correlation), found

    async def _plan_and_write(self, item: InboundItem, message: MailMessage, context: InboundContext,
                              org: OrgEmailSettings, counters: _Counters) -> ProcessResult:
        stale_retries = 1
        while True:
            context, _ = await self._lookup(message, context, counters)
            plan = plan_inbound(message, context)
            if isinstance(plan, Skip):
                await self._record(item, message, plan, LedgerOutcome.SKIPPED)
                if plan.wrapper_graph_id and context.mailbox.kind is MailboxKind.FORWARD_SINK:
                    # Decided for a forwarding user (a skip rule, the filter): processed. Not unwrappable for anyone:
                    # undeliverable.
                    await self._dispose_wrapper(item.mailbox, plan.wrapper_graph_id, context.mailbox,
                                                delivered=plan.stage != "unwrap", counters=counters)
                return ProcessResult(f"skipped:{plan.stage}:{plan.code}", graph_calls=counters.graph,
                                     crm_requests=counters.crm)
            existing = already_in_crm(plan, context.correlation)
            if existing is not None:
                return await self._already_tracked(item, message, plan, existing, context.mailbox, org, counters)
            try:
                counters.crm += 1
                written = await self.crm.write(plan)
            except AttachmentRejected as exc:
                # The org's limit is lower than configured: leave that attachment (and larger ones) out, with a
                # note on the email, instead of failing the email (issue 5 "Write").
                limit = 4 * ((exc.size + 2) // 3) - 1
                if limit >= org.max_attachment_bytes:
                    raise
                org = replace(org, max_attachment_bytes=limit)
                context = replace(context, org=org)
                continue
            except StaleReference:
                if stale_retries <= 0:
                    return await self._permanent(item, message, "stale_reference",
                                                 "a record the email refers to no longer exists in CRM",
                                                 tag=self._tag_target(message, plan))
                stale_retries -= 1
                continue
            except DataverseError as exc:
                if is_transient(exc):
                    raise
                return await self._permanent(item, message, "crm_rejected", describe_error(exc),
                                             tag=self._tag_target(message, plan))
            break

        outcome = LedgerOutcome.TRACKED if written is WriteOutcome.CREATED else LedgerOutcome.ALREADY_TRACKED
        queued = await self._queue_items(plan, context.mailbox, org, written, counters)
        await self._after_write(item, message, plan, counters)
        notes = [] if outcome is LedgerOutcome.TRACKED else [
            "an email with this Message-ID is already in CRM (redelivery, or tracked from another mailbox first): "
            "kept as it is"]
        if queued:
            notes.append(queued)
        await self._record(item, message, plan, outcome, note="; ".join(notes) or None)
        return ProcessResult(outcome.value, activity_id=str(plan.activity_id), graph_calls=counters.graph,
                             crm_requests=counters.crm)

    async def _already_tracked(self, item: InboundItem, message: MailMessage, plan: TrackEmail, existing: KnownEmail,
                               mailbox: MailboxConfig, org: OrgEmailSettings, counters: _Counters) -> ProcessResult:
        """The Message-ID is in CRM already (the loop guard): written by someone — the router's own send coming back
        from Sent Items or through a forward rule, another mailbox that tracked it first, or this mailbox's own
        earlier attempt that stopped before its queue items. Nothing is written to the email; its queue items are
        completed as for any already-tracked email (on the CRM email that exists), and the wrapper/category steps
        run as after a write."""
        queued = await self._queue_items(replace(plan, activity_id=existing.activity_id), mailbox, org,
                                         WriteOutcome.ALREADY_TRACKED, counters)
        await self._after_write(item, message, plan, counters)
        note = f"CRM email {existing.activity_id} already has this Message-ID (already in CRM): not written again"
        await self._record(item, message, plan, LedgerOutcome.ALREADY_TRACKED, activity_id=str(existing.activity_id),
                           note=f"{note}; {queued}" if queued else note)
        return ProcessResult(LedgerOutcome.ALREADY_TRACKED.value, activity_id=str(existing.activity_id),
                             graph_calls=counters.graph, crm_requests=counters.crm)

    async def _queue_items(self, plan: TrackEmail, mailbox: MailboxConfig, org: OrgEmailSettings,
                           written: WriteOutcome, counters: _Counters) -> str | None:
        """The email's queue items (core/domain/queue_items.py), once per email per queue: deterministic ids make a
        repeat a no-op, and for an email that was already there the queues holding an item are read first. A
        transient failure propagates (the message is retried; the email, already written, is then "already
        tracked" and only the missing items are made). Returns a note for the decision record."""
        if self.queue_items is None:
            return None
        base = {"email_id": plan.activity_id, "direction": plan.direction, "parties": plan.parties,
                "mailbox": mailbox, "org": org}
        if not plan_queue_items(**base):
            return None  # no queue involved: no extra request
        if written is WriteOutcome.ALREADY_TRACKED:
            counters.crm += 1
            held = await self.queue_items.tracked_email_queues(plan.activity_id)
            # Our own earlier, interrupted attempt (the router binds its mailbox) owes every item; another mailbox
            # having tracked it first owes only what CreateAdditionalQueueItemsForAlreadyTrackedEmail allows.
            own = plan.receiving_mailbox_id is None or held.receiving_mailbox_id == plan.receiving_mailbox_id
            items = plan_queue_items(**base, already_tracked=True, created_by_this_mailbox=own,
                                     existing_queues=held.queues)
        else:
            items = plan_queue_items(**base)
        if not items:
            return None
        counters.crm += 1
        result = await self.queue_items.create_queue_items(items)
        for queue_id, why in result.refused.items():
            log.warning("queue item for email %s in queue %s refused: %s", plan.activity_id, queue_id, why)
        parts = []
        if result.created:
            parts.append(f"queue items created in {len(result.created)} queue(s)")
        if result.refused:
            parts.append("queue items refused: " + "; ".join(f"queue {q}: {w}" for q, w in result.refused.items()))
        return ", ".join(parts) or None

    @staticmethod
    def _tag_target(message: MailMessage, plan: InboundPlan) -> tuple[str, list[str]] | None:
        # For a forward sink, the wrapper is the Outlook item we can tag (the original is only an attachment).
        return (message.mailbox, list(message.categories)) if isinstance(plan, TrackEmail) else None

    async def _after_write(self, item: InboundItem, message: MailMessage, plan: TrackEmail,
                           counters: _Counters) -> None:
        """Category, and the forward wrapper deleted or moved: best effort, never undoes or fails a written email."""
        if plan.wrapper_graph_id:
            sink = await self.mailboxes.get_mailbox(item.mailbox)
            if sink is not None and sink.kind is MailboxKind.FORWARD_SINK and await self._dispose_wrapper(
                    item.mailbox, plan.wrapper_graph_id, sink, delivered=True, counters=counters):
                return
        # Admin knob in the OrgSettings table (TrackedCategory); "" = don't tag (saves a Graph call per email).
        category = (await self.mailboxes.get_router_settings()).tracked_category
        if not category or category in message.categories:
            return
        try:
            counters.graph += 1
            await self.mail.set_categories(item.mailbox, item.message_id, [*message.categories, category])
        except GraphError as exc:
            log.warning("tracked category not set (%s)", describe_error(exc))

    async def _dispose_wrapper(self, mailbox: str, wrapper_id: str, sink: MailboxConfig, *, delivered: bool,
                               counters: _Counters) -> bool:
        """Delete or move a decided forward wrapper (``core.domain.forward.wrapper_fate``): the sink keeps only mail
        not decided yet in its Inbox. True when the wrapper left the Inbox. Best effort: a failure is logged and
        the wrapper stays where it is."""
        router = await self.mailboxes.get_router_settings()
        fate, folder = wrapper_fate(delivered=delivered, delete_after_processing=sink.delete_after_processing,
                                    processed_folder=router.processed_folder,
                                    undeliverable_folder=router.undeliverable_folder)
        if fate is WrapperFate.KEEP:
            return False
        try:
            if fate is WrapperFate.DELETE:
                counters.graph += 1
                await self.mail.delete_message(mailbox, wrapper_id)
                return True
            key = (mailbox.lower(), folder.lower())
            folder_id = self._folders.get(key)
            if folder_id is None:
                counters.graph += 1
                folder_id = self._folders[key] = await self.mail.ensure_child_folder(mailbox, "inbox", folder)
            counters.graph += 1
            await self.mail.move_message(mailbox, wrapper_id, folder_id)
            return True
        except GraphNotFound:
            self._folders.pop((mailbox.lower(), folder.lower()), None)  # the folder may have been deleted
            log.info("forward wrapper not %s: not found (gone already, or its folder was removed)", fate.value)
        except GraphError as exc:
            log.warning("forward wrapper not %s (%s); it stays in the sink's Inbox", fate.value, describe_error(exc))
        return False

    # -- outcomes ---------------------------------------------------------------------------------------------

    async def _record(self, item: InboundItem, message: MailMessage, plan: InboundPlan, outcome: LedgerOutcome,
                      *, note: str | None = None, activity_id: str | None = None) -> None:
        record = decision_record(message, plan)
        record["source"] = item.source
        record["folder"] = item.folder
        if note:
            record["note"] = note
            record["outcome"] = outcome.value
        if activity_id is not None:
            record["activityId"] = activity_id
        await self.decisions.record(item.mailbox, item.message_id, record)
        await self.ledger.put(LedgerEntry(
            item.mailbox, item.message_id, outcome,
            activity_id=activity_id if activity_id is not None else
            str(plan.activity_id) if isinstance(plan, TrackEmail) else "",
            internet_message_id=message.internet_message_id or "",
            reason=record["outcome"], at=self.clock(), source=item.source))

    async def _skip_unfetched(self, item: InboundItem, code: str, reason: str) -> ProcessResult:
        await self.decisions.record(item.mailbox, item.message_id, {
            "mailbox": item.mailbox, "graphId": item.message_id, "source": item.source, "folder": item.folder,
            "outcome": f"skipped:{code}", "decisions": [{"step": "mailbox", "outcome": f"skip:{code}",
                                                         "why": reason}]})
        await self.ledger.put(LedgerEntry(item.mailbox, item.message_id, LedgerOutcome.SKIPPED, reason=reason,
                                          at=self.clock(), source=item.source))
        return ProcessResult(f"skipped:{code}")

    async def _terminal(self, item: InboundItem, outcome: LedgerOutcome, code: str, reason: str, *,
                        record_status: bool, message: MailMessage | None = None) -> ProcessResult:
        await self.decisions.record(item.mailbox, item.message_id, {
            "mailbox": item.mailbox, "graphId": item.message_id, "source": item.source, "folder": item.folder,
            "internetMessageId": message.internet_message_id if message else None,
            **({"from": message.originator.address if message.originator else "", "subject": message.subject[:400]}
               if message else {}),
            "outcome": f"{outcome.value}:{code}",
            "decisions": [{"step": "processing", "outcome": code, "why": reason}]})
        await self.ledger.put(LedgerEntry(
            item.mailbox, item.message_id, outcome, reason=f"{code}: {reason}"[:1024],
            internet_message_id=(message.internet_message_id or "") if message else "", at=self.clock(),
            source=item.source))
        if record_status:
            await self.status.record_failure(item.mailbox, code=code, reason=reason, permanent=True)
        prefix = "gone" if outcome is LedgerOutcome.GONE else f"failed:{code}"
        return ProcessResult(prefix)

    async def _permanent(self, item: InboundItem, message: MailMessage | None, code: str, reason: str, *,
                         tag: tuple[str, list[str]] | None = None) -> ProcessResult:
        log.warning("inbound message failed permanently in %s: %s (%s)", item.mailbox, code, reason)
        result = await self._terminal(item, LedgerOutcome.FAILED, code, reason, record_status=True, message=message)
        category = (await self.mailboxes.get_router_settings()).undeliverable_category
        if tag is not None and category and category not in tag[1]:
            try:
                await self.mail.set_categories(item.mailbox, item.message_id, [*tag[1], category])
            except GraphError as exc:
                log.info("undeliverable category not set (%s)", describe_error(exc))
        sink = await self.mailboxes.get_mailbox(item.mailbox)
        if sink is not None and sink.kind is MailboxKind.FORWARD_SINK and code != "access_denied":
            await self._dispose_wrapper(item.mailbox, item.message_id, sink, delivered=False, counters=_Counters())
        return result

    async def _retry_later(self, item: InboundItem, attempts: int, exc: BaseException,
                           counters: _Counters) -> ProcessResult:
        if attempts > self.options.max_attempts:
            return await self._permanent(item, None, "retries_exhausted",
                                         f"still failing after {attempts - 1} attempts: {describe_error(exc)}",
                                         tag=None)
        wanted = _retry_after(exc)
        if wanted is None:  # exponential backoff with jitter when the service gave no Retry-After
            wanted = min(self.options.max_retry_delay, self.options.min_retry_delay * 2 ** min(attempts - 1, 10))
            wanted *= 0.5 + random.random() / 2
        delay = int(min(self.options.max_retry_delay, max(self.options.min_retry_delay, wanted)))
        log.info("inbound item for %s hit %s; retry %d in %d s", item.mailbox, describe_error(exc), attempts, delay)
        await self.ledger.put(LedgerEntry(item.mailbox, item.message_id, LedgerOutcome.RETRYING, attempts=attempts,
                                          reason=describe_error(exc), at=self.clock(), source=item.source))
        await self.queue.send_many(INBOUND_QUEUE, [item.to_json()], delay_seconds=delay)
        return ProcessResult("retry", retry_in=delay, graph_calls=counters.graph, crm_requests=counters.crm)


# ------------------------------------------------------------------------------------------------ wiring


def options_from_settings(container: Container) -> InboundOptions:
    s = container.settings
    return InboundOptions(
        max_attempts=s.integer("INBOUND_MAX_ATTEMPTS", minimum=1),
        max_retry_delay=s.integer("INBOUND_MAX_RETRY_DELAY_SECONDS", minimum=5),
    )


_PROCESSORS: weakref.WeakKeyDictionary[Any, InboundProcessor] = weakref.WeakKeyDictionary()


def processor_for(container: Container) -> InboundProcessor:
    """The process-wide processor for a container (its caches live as long as the container)."""
    processor = _PROCESSORS.get(container)
    if processor is None:
        from core.adapters.inbound_state import InboundState
        from core.services.inbound_crm import DataverseInboundCrm
        from core.services.org_schema import org_schema_for
        from core.services.queue_items_crm import DataverseQueueItems

        state = InboundState.for_container(container)
        schema = org_schema_for(container)  # one metadata read shared by both gateways (and the CRM sync)
        processor = InboundProcessor(
            mail=container.graph,
            crm=DataverseInboundCrm(
                container.dataverse,
                party_ttl=float(container.settings.integer("CRM_PARTY_CACHE_SECONDS", minimum=0)),
                correlation_days=container.settings.integer("CRM_CORRELATION_DAYS", minimum=0),
                schema=schema,
            ),
            mailboxes=container.mailbox_directory,
            ledger=container.processed_ledger, decisions=state.decisions, status=state.status, poison=state.poison,
            queue=container.work_queue, options=options_from_settings(container),
            queue_items=DataverseQueueItems(container.dataverse, schema=schema),
        )
        _PROCESSORS[container] = processor
    return processor

