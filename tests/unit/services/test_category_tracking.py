"""Track by category over fakes of our own ports: the search (which found messages become work, the watermark, the
interval, errors) and the processor (a request re-evaluates skipped mail once; never loops on the router's own
"tracked" category, never duplicates)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pytest

from core.adapters.graph import GraphThrottled
from core.domain.category import FIRST_LOOKBACK, WATERMARK_SLACK
from core.domain.model import InboundMethod, TrackingFilter
from core.names import INBOUND_QUEUE
from core.services.category_tracking import (
    WATERMARK_ROW,
    CategoryTracker,
    category_due,
    category_request_wanted,
)
from core.services.inbound import LedgerEntry, LedgerOutcome
from core.settings.rows import RouterSettings
from core.work_items import InboundItem
from tests.fakes import StaticMailboxDirectory
from tests.unit.services.test_delta_catchup import FakeState
from tests.unit.services.test_inbound_processor import (
    ALICE,
    BOB,
    NOW,
    FakeLedger,
    World,
    graph_message,
    item,
    user,
)

TAG = "Tracked to Dynamics 365"
ON = RouterSettings(track_categorized_items=True)


# ------------------------------------------------------------------------------------------------ pure rules


@pytest.mark.parametrize(("entry", "wanted"), [
    (None, True),
    (LedgerEntry("a", "g", LedgerOutcome.SKIPPED, source="notification"), True),  # the user asks again
    (LedgerEntry("a", "g", LedgerOutcome.FAILED, source="delta"), True),
    (LedgerEntry("a", "g", LedgerOutcome.RETRYING, source="notification"), True),
    (LedgerEntry("a", "g", LedgerOutcome.TRACKED, source="notification"), False),  # the router's own category
    (LedgerEntry("a", "g", LedgerOutcome.ALREADY_TRACKED), False),
    (LedgerEntry("a", "g", LedgerOutcome.SKIPPED, source="category"), False),  # answered once
    (LedgerEntry("a", "g", LedgerOutcome.RETRYING, source="category"), False),  # in flight
])
def test_which_found_messages_are_work(entry: LedgerEntry | None, wanted: bool) -> None:
    assert category_request_wanted(entry) is wanted


def test_the_interval_spaces_searches_with_a_tolerance() -> None:
    assert category_due(None, NOW, 5)
    assert not category_due(NOW - timedelta(minutes=3), NOW, 5)
    assert category_due(NOW - timedelta(minutes=4, seconds=30), NOW, 5)  # the fan-out ran a little early


# ------------------------------------------------------------------------------------------------ the search


class FakeGraph:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.searches: list[tuple[str, str, datetime]] = []
        self.folder_lookups = 0
        self.fail: Exception | None = None

    async def list_categorized_messages(self, mailbox: str, category: str, *, since: datetime,
                                        page_size: int = 100) -> AsyncIterator[dict[str, Any]]:
        self.searches.append((mailbox, category, since))
        if self.fail is not None:
            raise self.fail
        for message in self.messages:
            yield message

    async def well_known_folder_ids(self, mailbox: str, names: Sequence[str]) -> dict[str, str]:
        self.folder_lookups += 1
        return {"id-inbox": "inbox", "id-sent": "sentitems"}


class Queue:
    def __init__(self) -> None:
        self.items: list[InboundItem] = []

    async def send_many(self, queue: str, messages: Sequence[str], *, delay_seconds: int = 0) -> None:
        assert queue == INBOUND_QUEUE
        self.items.extend(InboundItem.from_json(m) for m in messages)


def found(graph_id: str, folder: str = "id-projects", categories: Sequence[str] = (TAG,)) -> dict[str, Any]:
    return {"id": graph_id, "parentFolderId": folder, "categories": list(categories),
            "lastModifiedDateTime": "2026-03-02T11:59:00Z"}


class Search:
    def __init__(self, router: RouterSettings = ON, mailboxes: Sequence[Any] | None = None) -> None:
        self.graph, self.ledger, self.queue, self.marks = FakeGraph(), FakeLedger(), Queue(), FakeState()
        self.now = NOW
        self.directory = StaticMailboxDirectory(
            mailboxes if mailboxes is not None else [user("alice@contoso.com", ALICE)], router=router)
        self.tracker = CategoryTracker(self.graph, self.ledger, self.queue, self.directory, self.marks,
                                       clock=lambda: self.now)


async def test_found_messages_become_category_items_with_their_folder() -> None:
    s = Search()
    s.graph.messages = [found("g1"), found("g2", "id-sent"), found("g3", "id-inbox")]
    report = await s.tracker.search("alice@contoso.com")

    assert report is not None and (report.found, report.enqueued, report.error) == (3, 3, "")
    assert [(i.message_id, i.source, i.folder) for i in s.queue.items] == [
        ("g1", "category", "id-projects"), ("g2", "category", "sentitems"), ("g3", "category", "inbox")]
    assert s.graph.searches == [("alice@contoso.com", TAG, NOW - FIRST_LOOKBACK)]
    assert s.marks.cursors[("alice@contoso.com", WATERMARK_ROW)].high_water == NOW
    assert s.graph.folder_lookups == 1  # once per mailbox and process


async def test_the_routers_own_tracked_mail_and_answered_requests_are_not_work_again() -> None:
    s = Search()
    s.ledger.entries[("alice@contoso.com", "tracked")] = LedgerEntry("alice@contoso.com", "tracked",
                                                                    LedgerOutcome.TRACKED, source="notification")
    s.ledger.entries[("alice@contoso.com", "asked")] = LedgerEntry("alice@contoso.com", "asked",
                                                                  LedgerOutcome.SKIPPED, source="category")
    s.ledger.entries[("alice@contoso.com", "skipped")] = LedgerEntry("alice@contoso.com", "skipped",
                                                                    LedgerOutcome.SKIPPED, source="notification")
    s.graph.messages = [found("tracked"), found("asked"), found("skipped")]
    report = await s.tracker.search("alice@contoso.com")
    assert report is not None and (report.found, report.known, report.enqueued) == (3, 2, 1)
    assert [i.message_id for i in s.queue.items] == ["skipped"]


async def test_the_next_search_starts_before_the_last_one_and_waits_for_the_interval() -> None:
    s = Search()
    await s.tracker.search("alice@contoso.com")
    s.now = NOW + timedelta(minutes=2)
    assert await s.tracker.search("alice@contoso.com") is None  # TrackCategoryIntervalMinutes = 5
    s.now = NOW + timedelta(minutes=5)
    await s.tracker.search("alice@contoso.com")
    assert s.graph.searches[-1][2] == NOW - WATERMARK_SLACK


async def test_a_failed_search_keeps_the_watermark() -> None:
    s = Search()
    await s.tracker.search("alice@contoso.com")
    s.graph.fail = GraphThrottled(429, "TooManyRequests", "slow down")
    s.now = NOW + timedelta(minutes=5)
    report = await s.tracker.search("alice@contoso.com")
    assert report is not None and "429" in report.error
    assert s.marks.cursors[("alice@contoso.com", WATERMARK_ROW)].high_water == NOW  # the window is searched again


@pytest.mark.parametrize(("router", "mailbox"), [
    (RouterSettings(), user("alice@contoso.com", ALICE)),  # off by default
    (ON, user("alice@contoso.com", ALICE, inbound_method=InboundMethod.FORWARD)),
])
async def test_nothing_is_searched_when_off_or_for_a_mailbox_that_takes_no_part(router: RouterSettings,
                                                                               mailbox: Any) -> None:
    s = Search(router, [mailbox])
    assert await s.tracker.search("alice@contoso.com") is None
    assert s.graph.searches == []


# ------------------------------------------------------------------------------------------------ the processor


def _world() -> World:
    w = World(router=ON)
    w.mailboxes = [user("alice@contoso.com", ALICE, tracking_filter=TrackingFilter.NONE),
                   user("bob@contoso.com", BOB)]
    return w


async def test_a_skipped_message_is_tracked_once_when_the_user_asks() -> None:
    w = _world()
    w.mail.messages[("alice@contoso.com", "g1")] = graph_message("g1")
    processor = w.processor()
    first = await processor.process(item("alice@contoso.com", "g1"))
    assert first.outcome.startswith("skipped:filter")  # filter 4: no email messages

    w.mail.messages[("alice@contoso.com", "g1")] = graph_message("g1", categories=[TAG])  # the user's category
    asked = await processor.process(item("alice@contoso.com", "g1", source="category", folder="id-projects"))
    assert asked.outcome == "tracked" and len(w.crm.emails) == 1
    entry = w.ledger.entries[("alice@contoso.com", "g1")]
    assert entry.outcome is LedgerOutcome.TRACKED and entry.source == "category"
    again = await processor.process(item("alice@contoso.com", "g1", source="category", folder="id-projects"))
    assert again.outcome == "duplicate_item" and w.crm.writes == 1


async def test_the_routers_tracked_category_never_loops() -> None:
    """TrackedCategory = the request category (as with SSS): the router tags what it tracked, the search finds the
    tag, the ledger says tracked - nothing more, no second write, no second PATCH."""
    w = _world()
    w.router = replace(ON, tracked_category=TAG)
    w.mailboxes[0] = user("alice@contoso.com", ALICE)  # filter: all
    w.mail.messages[("alice@contoso.com", "g1")] = graph_message("g1")
    processor = w.processor()
    assert (await processor.process(item("alice@contoso.com", "g1"))).outcome == "tracked"
    assert w.mail.categories[("alice@contoso.com", "g1")] == [TAG]
    assert not category_request_wanted(w.ledger.entries[("alice@contoso.com", "g1")])
    repeat = await processor.process(item("alice@contoso.com", "g1", source="category"))
    assert repeat.outcome == "duplicate_item"
    assert sum(1 for c in w.mail.calls if c[0] == "set_categories") == 1 and w.crm.writes == 1


async def test_a_request_for_mail_in_crm_already_is_not_written_again() -> None:
    w = _world()
    w.mail.messages[("alice@contoso.com", "g1")] = graph_message("g1", categories=[TAG])
    await w.processor().process(item("alice@contoso.com", "g1", source="category", folder="id-projects"))
    w.ledger.entries.clear()  # the ledger lost it; the deterministic activity id still finds the email
    result = await w.processor().process(item("alice@contoso.com", "g1", source="category", folder="id-projects"))
    assert result.outcome == "already_tracked" and len(w.crm.emails) == 1


async def test_with_the_setting_off_a_category_item_is_an_ordinary_one() -> None:
    w = _world()
    w.router = RouterSettings()
    w.mail.messages[("alice@contoso.com", "g1")] = graph_message("g1", categories=[TAG])
    result = await w.processor().process(item("alice@contoso.com", "g1", source="category", folder="id-projects"))
    assert result.outcome == "skipped:skip_rule:folder_not_tracked" and not w.crm.emails


async def test_a_request_for_failed_mail_starts_its_retries_afresh() -> None:
    w = _world()
    w.mail.messages[("alice@contoso.com", "g1")] = graph_message("g1", categories=[TAG])
    w.ledger.entries[("alice@contoso.com", "g1")] = LedgerEntry("alice@contoso.com", "g1", LedgerOutcome.FAILED,
                                                               attempts=20, source="notification")
    w.mail.fail["get_message"].append(GraphThrottled(429, "TooManyRequests", "slow down"))
    first = await w.processor().process(item("alice@contoso.com", "g1", source="category", folder="id-projects"))
    assert first.outcome == "retry"  # attempt 1 of a new request, not "retries exhausted"
    assert (await w.processor().process(item("alice@contoso.com", "g1", source="category"))).outcome == "tracked"
