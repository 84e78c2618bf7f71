"""Track by category: find the mail users gave the tracking category and send it through the inbound pipeline.

Runs per mailbox with the delta catch-up (the ``mailbox_sync`` queue's ``timer`` items, fanned out every
``DELTA_CATCHUP_SCHEDULE``), so it spreads over the instances like delta rounds do and needs no timer or queue
message of its own. For each mailbox that takes part (core/domain/category.py) while ``TrackCategorizedItems`` is on,
at most every ``TrackCategoryIntervalMinutes``:

1. one Graph query (more only when over 100 messages match): messages in any folder that carry the category and
   changed since the last search (``lastModifiedDateTime ge <watermark - 5 min>``);
2. for each, the processed ledger says whether it is work (:func:`category_request_wanted`): mail the router
   tracked already (its own "tracked" category makes it show up) or a request answered already is left alone;
3. the rest becomes ``InboundItem(source="category")`` with the folder it is in (well-known folder ids are looked
   up once per mailbox and process, one JSON batch), and the watermark moves to this search's start. A failed search
   keeps the watermark: the next one covers the same window.

Why a query and not a change notification: a message subscription with ``changeType=updated`` notifies every read
flag, flag, move and category change of every message (the router would fetch each to see whether the category
came); Graph documents ``$filter`` on a subscription's resource but not a lambda over ``categories`` there, nor which
change type a message entering such a filter reports. The query is documented (List messages supports ``$filter``;
the lambda over a collection of strings is Graph's documented ``any`` syntax) and costs one request per mailbox per
interval whatever the mailbox does. The costs are in docs/admin-guide.md ("Track by category").
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Protocol

from core.domain.category import CATEGORY_SOURCE, category_trackable, has_category, search_since
from core.names import INBOUND_QUEUE
from core.ports import MailboxDirectory, WorkQueue
from core.services.delta import DeltaCursor, DeltaStateStore
from core.services.inbound import LedgerEntry, LedgerOutcome, ProcessedLedger
from core.work_items import InboundItem

if TYPE_CHECKING:
    from core.bootstrap import Container

__all__ = [
    "WATERMARK_ROW",
    "CategoryGateway",
    "CategoryReport",
    "CategoryTracker",
    "category_due",
    "category_request_wanted",
    "category_tracker_for",
]

log = logging.getLogger("emailrouter.category")

# The watermark lives in the DeltaState table next to the mailbox's delta cursors, under a key no folder id has.
WATERMARK_ROW: Final = "~category"
WELL_KNOWN_FOLDERS: Final = ("inbox", "sentitems", "drafts", "junkemail")
# The delta fan-out and the queue do not run to the second: a search due "now" may arrive a little early.
DUE_TOLERANCE: Final = timedelta(seconds=60)
ENQUEUE_CHUNK: Final = 64


class CategoryGateway(Protocol):
    """``core.adapters.graph.GraphMailClient`` fits."""

    def list_categorized_messages(self, mailbox: str, category: str, *, since: datetime,
                                  page_size: int = 100) -> AsyncIterator[dict[str, Any]]: ...

    async def well_known_folder_ids(self, mailbox: str, names: Sequence[str]) -> dict[str, str]: ...


def category_request_wanted(entry: LedgerEntry | None) -> bool:
    """Whether a categorised message found by the search is work (pure). Never again: mail the router tracked or
    found in CRM already (this is how the router's own "tracked" category never loops), and mail a category request
    was made for already (answered, or in flight). Everything else - never seen, or skipped / failed / not found /
    retrying in automatic processing - is evaluated as the user's request."""
    if entry is None:
        return True
    if entry.outcome in (LedgerOutcome.TRACKED, LedgerOutcome.ALREADY_TRACKED):
        return False
    return entry.source != CATEGORY_SOURCE


def category_due(watermark: datetime | None, now: datetime, interval_minutes: int) -> bool:
    """``TrackCategoryIntervalMinutes`` spaces the searches of a mailbox (pure)."""
    return watermark is None or now - watermark >= timedelta(minutes=interval_minutes) - DUE_TOLERANCE


@dataclass
class CategoryReport:
    mailbox: str
    since: datetime
    found: int = 0  # messages the query returned
    known: int = 0  # of those, already tracked or already requested
    enqueued: int = 0
    error: str = ""


class CategoryTracker:
    def __init__(self, graph: CategoryGateway, ledger: ProcessedLedger, queue: WorkQueue,
                 mailboxes: MailboxDirectory, watermarks: DeltaStateStore, *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC), page_size: int = 100) -> None:
        self._graph = graph
        self._ledger = ledger
        self._queue = queue
        self._mailboxes = mailboxes
        self._watermarks = watermarks
        self._clock = clock
        self._page_size = page_size
        self._folders: dict[str, dict[str, str]] = {}  # mailbox -> folder id -> well-known name

    async def search(self, address: str, *, force: bool = False) -> CategoryReport | None:
        """One search of one mailbox; None when the feature is off, the mailbox takes no part or it is not due
        (``force``: whatever the interval). Graph errors are reported, not raised: the watermark stays."""
        router = await self._mailboxes.get_router_settings()
        if not router.track_categorized_items:
            return None
        mailbox = await self._mailboxes.get_mailbox(address)
        if mailbox is None or not category_trackable(mailbox):
            return None
        now = self._clock()
        cursor = await self._watermarks.get(mailbox.address, WATERMARK_ROW)
        watermark = cursor.high_water if cursor is not None else None
        if not force and not category_due(watermark, now, router.track_category_interval_minutes):
            return None
        name = router.track_category_name
        report = CategoryReport(mailbox.address, search_since(watermark, now))
        items: list[str] = []
        try:
            async for message in self._graph.list_categorized_messages(mailbox.address, name, since=report.since,
                                                                       page_size=self._page_size):
                graph_id = str(message.get("id") or "")
                if not graph_id or not has_category(message.get("categories") or (), name):
                    continue
                report.found += 1
                if not category_request_wanted(await self._ledger.get(mailbox.address, graph_id)):
                    report.known += 1
                    continue
                folder = await self._folder(mailbox.address, str(message.get("parentFolderId") or ""))
                items.append(InboundItem(mailbox.address, graph_id, CATEGORY_SOURCE, folder=folder).to_json())
        except Exception as exc:
            if not _is_service_error(exc):
                raise
            report.error = f"{type(exc).__name__} {getattr(exc, 'status', '')} {getattr(exc, 'code', '')}".strip()
            log.warning("track by category: the search of a mailbox failed (%s); the next search covers the window",
                        report.error)
            return report
        for start in range(0, len(items), ENQUEUE_CHUNK):
            await self._queue.send_many(INBOUND_QUEUE, items[start:start + ENQUEUE_CHUNK])
        report.enqueued = len(items)
        await self._watermarks.put(DeltaCursor(mailbox.address, WATERMARK_ROW, None, high_water=now))
        if report.enqueued:
            log.info("track by category: %d message(s) of a mailbox enqueued (%d found, %d already done)",
                     report.enqueued, report.found, report.known)
        return report

    async def _folder(self, mailbox: str, folder_id: str) -> str:
        """The work item's folder: a well-known name (the rules need Sent Items, Junk, Drafts, Inbox) or the id."""
        if not folder_id:
            return "unknown"  # not a well-known folder (Graph always returns parentFolderId when selected)
        names = self._folders.get(mailbox)
        if names is None:
            names = self._folders[mailbox] = await self._graph.well_known_folder_ids(mailbox, WELL_KNOWN_FOLDERS)
        return names.get(folder_id, folder_id)


def _is_service_error(exc: BaseException) -> bool:
    from core.adapters.graph import GraphError

    return isinstance(exc, GraphError)


def category_tracker_for(container: Container) -> CategoryTracker:
    from core.adapters.inbound_state import InboundState

    state = InboundState.for_container(container)
    return CategoryTracker(container.graph, state.ledger, container.work_queue, container.mailbox_directory,
                           state.delta)
