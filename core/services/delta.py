"""Delta catch-up, lifecycle handling and backfill: a missed notification costs latency, never an email.

* :meth:`DeltaService.run_round` - one delta round for (mailbox, folder): follows next links, enqueues every new
  message as ``InboundItem(source="delta")`` (the processed ledger dedupes against notification items), keeps the
  delta link and a high-water mark (latest ``receivedDateTime`` seen) in the DeltaState table. The first round starts
  at the mailbox's "process email received after" date, or *now* for a mailbox without one: history is imported
  only by an explicit :func:`backfill`. It asks ``$orderby=receivedDateTime desc`` and ``changeType=created`` (later
  rounds then skip read flags and the router's own category PATCH). With ``$filter`` Graph returns at most 5,000
  messages: a first round that reaches the cap lists the older rest with ``list_messages``. An expired delta token
  (410 ``syncStateNotFound``, ``resyncRequired``, ``SyncStateInvalid``) restarts the round from the high-water mark
  (minus a few minutes for late arrivals).
* :meth:`DeltaService.handle_sync_item` - the mailbox-sync queue: ``timer``/``manual`` -> delta rounds for the
  mailbox's watched folders; a lifecycle event names its subscription's folder and syncs only that one: ``missed`` ->
  delta; ``subscriptionRemoved`` -> subscribe again, then delta; ``reauthorizationRequired`` -> one PATCH (renewing
  reauthorizes; coalesced), then delta (notifications may have paused).
  ``hot`` (core/domain/hot_mailboxes.py: the webhook saw more notifications for the folder than
  HOT_MAILBOX_NOTIFICATIONS_PER_MINUTE) -> a delta round whose messages are processed right here, under the mailbox's
  lease, instead of one queue item each: the mailbox's Graph requests then come from one instance at a time (Graph's
  4 concurrent per mailbox hold across instances) and one delta page lists up to 100 messages. A message that fails
  inline goes to the inbound queue and its normal retries.
* :meth:`DeltaService.fan_out` - the timer: one ``MailboxSyncItem(reason="timer")`` per watched mailbox, so the
  rounds spread over every instance that reads the mailbox-sync queue instead of running in one timer invocation.
  A ``timer``/``manual`` item also runs the mailbox's track-by-category search when that is on and due
  (core/services/category_tracking.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Protocol

from core.adapters.graph import DeltaPage, GraphError, GraphNotFound, GraphSyncStateNotFound
from core.domain.leases import JOB_DELTA_FANOUT, delta_lease, new_owner
from core.domain.records import DeltaCursor, InboundLedgerEntry
from core.names import INBOUND_QUEUE, MAILBOX_SYNC_QUEUE
from core.ports import MailboxDirectory, WorkQueue
from core.services.jobs import JobBusy, LeaseStore, exclusive
from core.services.subscriptions import SubscriptionService, watched_folders
from core.work_items import InboundItem, MailboxSyncItem

if TYPE_CHECKING:
    from core.bootstrap import Container
    from core.services.category_tracking import CategoryTracker

__all__ = [
    "BackfillReport",
    "DeltaCursor",
    "DeltaGateway",
    "DeltaReport",
    "DeltaService",
    "DeltaStateStore",
    "backfill",
    "delta_service_for",
]

log = logging.getLogger("emailrouter.delta")

MAX_PAGES_PER_ROUND: Final = 500  # bounded: a huge backlog continues on the next round from the saved link
DELTA_FILTER_CAP: Final = 5000  # "Applying $filter in a delta query returns only up to 5,000 messages"
LATE_ARRIVAL_SLACK: Final = timedelta(minutes=10)
ENQUEUE_CHUNK: Final = 64
DELTA_LEASE: Final = timedelta(minutes=2)  # renewed while the rounds run
BUSY_RETRY_SECONDS: Final = 60  # a lifecycle sync item that finds its mailbox busy comes back this much later
HOT_BUSY_RETRY_SECONDS: Final = 5  # a hot mailbox's delta request that finds a round running: soon, latency matters
HOT_FIRST_ROUND_SLACK: Final = timedelta(minutes=15)  # a hot folder without a cursor: how far back its round looks
LEDGER_LOOKUPS_IN_FLIGHT: Final = 16  # ledger reads of one delta page at once
HOT_MAX_PAGES: Final = 10  # a hot round works at most this many pages, then hands the rest to a new hot item

InlineProcessor = Callable[[InboundItem], Awaitable[object]]


class DeltaStateStore(Protocol):
    async def get(self, mailbox: str, folder: str) -> DeltaCursor | None: ...

    async def put(self, cursor: DeltaCursor) -> None: ...


class ProcessedLookup(Protocol):
    """The processed ledger's read side (``core.adapters.inbound_state.RememberingLedger``)."""

    async def get(self, mailbox: str, graph_id: str) -> InboundLedgerEntry | None: ...

    def known_final(self, mailbox: str, graph_id: str) -> bool:
        """This process wrote a final outcome for it (no read needed); False = ask ``get``."""
        ...


class DeltaGateway(Protocol):
    async def delta_page(self, mailbox: str, folder: str, link: str | None, *,
                         received_after: datetime | None = None, page_size: int = 100,
                         change_type: str | None = None) -> DeltaPage: ...

    def list_messages(self, mailbox: str, folder: str, *, received_after: datetime | None = None,
                      received_before: datetime | None = None, page_size: int = 50
                      ) -> AsyncIterator[dict[str, Any]]: ...


@dataclass
class DeltaReport:
    mailbox: str
    folder: str
    enqueued: int = 0
    pages: int = 0
    restarted: bool = False
    more: bool = False  # the round stopped at its page limit; the saved link continues it
    backfilled: int = 0  # messages past the 5,000 cap of a first round, listed instead
    processed: int = 0  # hot mailbox: messages processed inline by the round (not enqueued)
    already_processed: int = 0  # listed, but the ledger has a final outcome for them: not enqueued
    error: str = ""


@dataclass
class BackfillReport:
    mailbox: str
    since: datetime
    enqueued: int = 0
    folders: list[str] = field(default_factory=list)
    error: str = ""


def _received(message: dict[str, Any]) -> datetime | None:
    value = message.get("receivedDateTime")
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class DeltaService:
    def __init__(self, graph: DeltaGateway, state: DeltaStateStore, queue: WorkQueue, mailboxes: MailboxDirectory,
                 *, subscriptions: SubscriptionService | None = None, page_size: int = 100,
                 concurrency: int = 4, clock: Callable[[], datetime] | None = None,
                 change_type: str | None = "created", filter_cap: int = DELTA_FILTER_CAP,
                 category: CategoryTracker | None = None, leases: LeaseStore | None = None,
                 owner: str | None = None, inline: Callable[[], InlineProcessor] | None = None,
                 inline_gate: asyncio.Semaphore | None = None, ledger: ProcessedLookup | None = None) -> None:
        self._leases = leases
        # Delta re-reports every message notifications already brought (a round lists all mail since the last one):
        # asking the ledger first keeps those out of the inbound queue - one table read each instead of a queue
        # message, a function invocation and the same read there. The processor's ledger check stays the rule.
        self._ledger = ledger
        self._inline = inline  # builds the processor for hot rounds on first use (not every caller needs one)
        # Messages processed inline at once by every hot round of this process together (each holds its kept
        # attachments until written: memory is bounded per process, not per round; docs/deploy.md §9 "Memory").
        self._inline_gate = inline_gate or asyncio.Semaphore(6)
        self._owner = owner or new_owner("delta")
        self._graph = graph
        self._state = state
        self._queue = queue
        self._mailboxes = mailboxes
        self._subscriptions = subscriptions
        self._page_size = page_size
        self._concurrency = concurrency
        self._clock = clock or (lambda: datetime.now(UTC))
        self._change_type = change_type
        self._filter_cap = filter_cap
        self._category = category  # track by category rides the timer's per-mailbox items

    # -- one round ------------------------------------------------------------------------------------------

    async def run_round(self, mailbox: str, folder: str, *, start_from: datetime | None,
                        inline: bool = False) -> DeltaReport:
        """One delta round; ``inline``: process the messages found here instead of enqueueing them (hot mailbox)."""
        report = DeltaReport(mailbox, folder)
        cursor = await self._state.get(mailbox, folder)
        if cursor is None:
            floor = start_from or self._clock()
            cursor = DeltaCursor(mailbox, folder, None, high_water=None, round_started=floor)
        elif cursor.link is None and cursor.high_water is None and start_from is not None and (
                cursor.round_started is None or start_from < cursor.round_started):
            # Never ran (cursor made when the subscription was created): the process-from date wins if earlier.
            cursor = replace(cursor, round_started=start_from)
        restarted = False
        while True:
            try:
                await self._pages(cursor, report, inline)
                return report
            except GraphSyncStateNotFound:
                if restarted:
                    raise
                # The sync state expired: a new round from where we know we were (never from the beginning).
                restarted = report.restarted = True
                cursor = await self._state.get(mailbox, folder) or cursor  # the pages saved a newer mark
                floor = cursor.high_water - LATE_ARRIVAL_SLACK if cursor.high_water else cursor.round_started
                log.info("delta token expired for a %s folder; restarting the round", folder)
                cursor = DeltaCursor(mailbox, folder, None, high_water=cursor.high_water,
                                     round_started=floor or self._clock())
                await self._state.put(cursor)

    async def _pages(self, cursor: DeltaCursor, report: DeltaReport, inline: bool = False) -> None:
        link = cursor.link
        high = cursor.high_water
        floor = cursor.round_started
        # A new round's first request carries the $filter: count what it reports (Graph's 5,000 cap).
        seen, oldest = (0, None) if link is None else (cursor.initial_seen, cursor.initial_oldest)
        # A hot round processes what it lists inside one function invocation: fewer pages, then a new hot item.
        limit = HOT_MAX_PAGES if inline else MAX_PAGES_PER_ROUND
        for _ in range(limit):
            page = await self._graph.delta_page(cursor.mailbox, cursor.folder, link,
                                                received_after=floor if link is None else None,
                                                page_size=self._page_size,
                                                change_type=self._change_type if link is None else None)
            report.pages += 1
            items: list[InboundItem] = []
            if seen is not None:
                seen += len(page.messages)
                oldest = min([d for d in (oldest, *map(_received, page.messages)) if d is not None], default=None)
            for message in page.messages:
                received = _received(message)
                if message.get("isDraft") or not message.get("id"):
                    continue
                # Changes to old mail (read flags, moves) also come through delta: only mail received inside the
                # round's window is work. The processor's ledger dedupes the rest.
                # Graph's receivedDateTime has whole seconds: compare at that precision.
                if floor is not None and received is not None and received < floor.replace(microsecond=0):
                    continue
                if received is not None and (high is None or received > high):
                    high = received
                items.append(InboundItem(cursor.mailbox, str(message["id"]), "delta", folder=cursor.folder))
            items = await self._not_processed(items, report)
            if inline and self._inline is not None:
                await self._process_inline(items, report)
            else:
                await self._enqueue(items)
                report.enqueued += len(items)
            link = page.next_link or page.delta_link
            if page.next_link is None and seen is not None:
                if seen >= self._filter_cap:
                    await self._past_the_cap(cursor, floor, oldest, report)
                seen = oldest = None
            # Saved after every page: a crash resumes mid-round instead of starting over.
            await self._state.put(DeltaCursor(cursor.mailbox, cursor.folder, link, high, floor, seen, oldest))
            if page.next_link is None:
                return
        report.more = True
        log.warning("delta round for a %s folder stopped after %d pages; continues next round", cursor.folder, limit)

    async def _not_processed(self, items: list[InboundItem], report: DeltaReport) -> list[InboundItem]:
        """The items the ledger has no final outcome for (a failed lookup keeps its item: the processor decides)."""
        ledger = self._ledger
        if ledger is None or not items:
            return items
        gate = asyncio.Semaphore(LEDGER_LOOKUPS_IN_FLIGHT)

        async def done(item: InboundItem) -> bool:
            if ledger.known_final(item.mailbox, item.message_id):
                return True
            async with gate:
                try:
                    entry = await ledger.get(item.mailbox, item.message_id)
                except Exception as exc:  # storage hiccup: enqueue it, the processor checks again
                    log.debug("ledger lookup before enqueue failed (%s)", type(exc).__name__)
                    return False
            return entry is not None and entry.outcome.terminal

        known = await asyncio.gather(*(done(i) for i in items))
        report.already_processed += sum(known)
        return [item for item, seen in zip(items, known, strict=True) if not seen]

    async def _enqueue(self, items: Sequence[InboundItem]) -> None:
        payloads = [i.to_json() for i in items]
        for start in range(0, len(payloads), ENQUEUE_CHUNK):
            await self._queue.send_many(INBOUND_QUEUE, payloads[start:start + ENQUEUE_CHUNK])

    async def _process_inline(self, items: Sequence[InboundItem], report: DeltaReport) -> None:
        """A hot mailbox's page: processed here, at most ``inline_gate`` messages at a time in the whole process
        (the Graph adapter's per-mailbox semaphore keeps its requests at 4). Whatever fails goes to the inbound
        queue, where the normal retries and poison handling apply; the page's cursor is saved only after that, so a
        crash re-reads the page (the ledger dedupes)."""
        assert self._inline is not None
        process = self._inline()
        gate = self._inline_gate
        failed: list[InboundItem] = []

        async def one(item: InboundItem) -> None:
            async with gate:
                try:
                    await process(item)
                    report.processed += 1
                except Exception as exc:
                    log.warning("hot mailbox: a message processed inline failed (%s); queued for the normal retries",
                                exc.__class__.__name__)
                    failed.append(item)

        await asyncio.gather(*(one(i) for i in items))
        if failed:
            await self._enqueue(failed)
            report.enqueued += len(failed)

    async def _past_the_cap(self, cursor: DeltaCursor, floor: datetime | None, oldest: datetime | None,
                            report: DeltaReport) -> None:
        """The first round reached Graph's 5,000-message cap for ``$filter``: it reported the newest ones
        (``$orderby=receivedDateTime desc``); list the older rest (received from the floor up to the oldest reported
        second, which is included: the ledger dedupes) and enqueue it like delta items."""
        if oldest is None:
            return
        log.warning("delta round for a %s folder reached Graph's %d-message cap; listing the older messages",
                    cursor.folder, self._filter_cap)
        batch: list[str] = []
        async for message in self._graph.list_messages(cursor.mailbox, cursor.folder, received_after=floor,
                                                       received_before=oldest + timedelta(seconds=1)):
            if not message.get("id"):
                continue
            batch.append(InboundItem(cursor.mailbox, str(message["id"]), "delta", folder=cursor.folder).to_json())
            if len(batch) >= ENQUEUE_CHUNK:
                await self._queue.send_many(INBOUND_QUEUE, batch)
                report.backfilled += len(batch)
                batch = []
        if batch:
            await self._queue.send_many(INBOUND_QUEUE, batch)
            report.backfilled += len(batch)
        report.enqueued += report.backfilled

    # -- per mailbox ----------------------------------------------------------------------------------------

    async def sync_mailbox(self, address: str, folders: Sequence[str] | None = None, *,
                           inline: bool = False) -> list[DeltaReport]:
        """Delta rounds for the mailbox's watched folders (only those named in ``folders``, when given).

        ``inline`` (hot mailbox): the rounds process what they find; a folder without a cursor yet starts
        HOT_FIRST_ROUND_SLACK back (its round must list the messages whose notifications it replaces)."""
        config = await self._mailboxes.get_mailbox(address)
        if config is None:
            return []
        org = await self._mailboxes.get_org_settings()
        reports: list[DeltaReport] = []
        wanted = {f.lower() for f in folders} if folders is not None else None
        for folder in watched_folders(config, org):
            if wanted is not None and folder.lower() not in wanted:
                continue
            try:
                start_from = config.process_email_received_after
                if inline and start_from is None:
                    start_from = self._clock() - HOT_FIRST_ROUND_SLACK
                reports.append(await self.run_round(config.address, folder, start_from=start_from, inline=inline))
            except GraphNotFound as exc:  # a mapped folder was deleted: report, keep the other folders going
                reports.append(DeltaReport(config.address, folder, error=f"{exc.status} {exc.code}"))
            except GraphError as exc:
                if exc.transient:
                    raise  # the queue trigger's retry handles it
                reports.append(DeltaReport(config.address, folder, error=f"{exc.status} {exc.code}"))
        return reports

    async def handle_sync_item(self, item: MailboxSyncItem) -> list[DeltaReport]:
        """One mailbox-sync item, under the mailbox's delta lease: two rounds for the same mailbox at once would
        read the same pages and enqueue every message twice. An item that finds the mailbox busy: the timer's is
        dropped (the running round covers it); a lifecycle event's or an admin's comes back later (its round must
        start after the event)."""
        try:
            async with exclusive(self._leases, delta_lease(item.mailbox), owner=self._owner, duration=DELTA_LEASE,
                                 purpose=item.reason):
                return await self._handle_sync_item(item)
        except JobBusy as busy:
            if item.reason == "timer":
                log.info("delta catch-up item dropped: %s", busy)
                return []
            # A hot mailbox's request comes back soon: the running round may have started before its messages came.
            delay = HOT_BUSY_RETRY_SECONDS if item.reason == "hot" else BUSY_RETRY_SECONDS
            log.info("mailbox sync item (%s) retried in %d s: %s", item.reason, delay, busy)
            await self._queue.send_many(MAILBOX_SYNC_QUEUE, [item.to_json()], delay_seconds=delay)
            return []

    async def _handle_sync_item(self, item: MailboxSyncItem) -> list[DeltaReport]:
        if self._subscriptions is not None:
            if item.reason == "subscriptionRemoved":
                await self._subscriptions.recreate(item.mailbox, item.subscription_id)
            elif item.reason == "reauthorizationRequired" and item.subscription_id:
                await self._subscriptions.reauthorize(item.mailbox, item.subscription_id)
        # A lifecycle event concerns one subscription, i.e. one folder: only that folder can have missed mail.
        reports = await self.sync_mailbox(item.mailbox, [item.folder] if item.folder else None,
                                          inline=item.reason == "hot")
        if item.reason == "hot" and any(r.more for r in reports):
            # The rest of a hot folder's backlog: another round right away (after this one's lease is released).
            await self._queue.send_many(MAILBOX_SYNC_QUEUE, [item.to_json()])
        if self._category is not None and item.reason in ("timer", "manual"):
            try:
                await self._category.search(item.mailbox)
            except Exception as exc:  # never undoes the delta rounds above; the next search covers the window
                log.warning("track by category: search failed (%s)", exc.__class__.__name__)
        return reports

    async def fan_out(self, *, reason: str = "timer", only: Sequence[str] | None = None, wait: float = 0.0,
                      on_wait: Callable[[str], None] | None = None) -> int:
        """One sync item per watched mailbox (or per mailbox in ``only``) on the mailbox-sync queue: the timer, and
        ``emailrouter catch-up``. Under the fan-out lease, so an admin's catch-up and the timer do not enqueue every
        mailbox twice."""
        async with exclusive(self._leases, JOB_DELTA_FANOUT, owner=self._owner, wait=wait, on_wait=on_wait,
                             purpose=reason):
            org = await self._mailboxes.get_org_settings()
            wanted = {a.strip().lower() for a in only} if only is not None else None
            items = [MailboxSyncItem(m.address, reason).to_json()  # type: ignore[arg-type]
                     for m in await self._mailboxes.list_mailboxes()
                     if watched_folders(m, org) and (wanted is None or m.address in wanted)]
            for start in range(0, len(items), ENQUEUE_CHUNK):
                await self._queue.send_many(MAILBOX_SYNC_QUEUE, items[start:start + ENQUEUE_CHUNK])
            return len(items)

    async def sync_all(self, addresses: Sequence[str] | None = None) -> list[DeltaReport]:
        """Run rounds in this process for many mailboxes (CLI / tests), a bounded number at a time."""
        if addresses is None:
            org = await self._mailboxes.get_org_settings()
            addresses = [m.address for m in await self._mailboxes.list_mailboxes() if watched_folders(m, org)]
        gate = asyncio.Semaphore(self._concurrency)

        async def one(address: str) -> list[DeltaReport]:
            async with gate:
                return await self.sync_mailbox(address)

        results = await asyncio.gather(*(one(a) for a in addresses))
        return [r for reports in results for r in reports]

    # -- backfill -------------------------------------------------------------------------------------------

    async def backfill(self, mailbox: str, since: datetime,
                       progress: Callable[[int], None] | None = None, *, reevaluate: Sequence[str] = (),
                       requested_at: datetime | None = None) -> BackfillReport:
        report = BackfillReport(mailbox, since)
        config = await self._mailboxes.get_mailbox(mailbox)
        if config is None:
            report.error = "not a configured mailbox"
            return report
        org = await self._mailboxes.get_org_settings()
        folders = watched_folders(config, org)
        if not folders:
            report.error = "the router does not read this mailbox (incoming method or approval)"
            return report
        stamp = (requested_at or self._clock()).astimezone(UTC).isoformat() if reevaluate else ""
        for folder in folders:
            report.folders.append(folder)
            batch: list[str] = []
            async for message in self._graph.list_messages(config.address, folder, received_after=since):
                if not message.get("id"):
                    continue
                batch.append(InboundItem(config.address, str(message["id"]), "backfill", folder=folder,
                                         reevaluate=",".join(reevaluate), requested_at=stamp).to_json())
                if len(batch) >= ENQUEUE_CHUNK:
                    await self._queue.send_many(INBOUND_QUEUE, batch)
                    report.enqueued += len(batch)
                    batch = []
                    if progress is not None:
                        progress(report.enqueued)
            if batch:
                await self._queue.send_many(INBOUND_QUEUE, batch)
                report.enqueued += len(batch)
                if progress is not None:
                    progress(report.enqueued)
        return report


# ------------------------------------------------------------------------------------------------ wiring


def delta_service_for(container: Container, *, role: str = "router") -> DeltaService:
    from core.adapters.inbound_state import InboundState
    from core.services.jobs import lease_store_for
    from core.services.subscriptions import service_for

    try:
        subscriptions: SubscriptionService | None = service_for(container, role=f"{role}-lifecycle")
    except Exception as exc:  # e.g. WEBHOOK_BASE_URL unset: delta still works, lifecycle recreation does not
        log.warning("subscriptions unavailable for lifecycle handling: %s", exc.__class__.__name__)
        subscriptions = None
    change_type = container.settings.raw("DELTA_CHANGE_TYPE").strip().lower()
    if change_type not in ("created", "all"):
        raise ValueError(f"App setting 'DELTA_CHANGE_TYPE' must be created or all, got {change_type!r}")
    from core.services.category_tracking import category_tracker_for

    def inline() -> InlineProcessor:
        from core.services.inbound import processor_for

        return processor_for(container).process

    return DeltaService(container.graph, InboundState.for_container(container).delta, container.work_queue,
                        container.mailbox_directory,
                        subscriptions=subscriptions, change_type=None if change_type == "all" else change_type,
                        category=category_tracker_for(container), leases=lease_store_for(container),
                        owner=new_owner(role), inline=inline, inline_gate=container.hot_inline_gate,
                        ledger=container.processed_ledger)


async def backfill(container: Container, mailbox: str, since: datetime,
                   progress: Callable[[int], None] | None = None, *,
                   reevaluate: Sequence[str] = ()) -> BackfillReport:
    """Explicit history import for one mailbox (admin CLI): every message received after ``since`` in the
    mailbox's watched folders becomes an ``InboundItem(source="backfill")``. Idempotent: a message the router has
    decided before is left as it was (tracked ones stay one CRM email), except that ``reevaluate`` (skipped, failed)
    lets those earlier outcomes be decided again with today's settings."""
    return await delta_service_for(container, role="cli").backfill(mailbox, since, progress, reevaluate=reevaluate)
