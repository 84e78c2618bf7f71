"""Delta catch-up, lifecycle handling and backfill over fakes of our ports."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from core.adapters.graph import DeltaPage, GraphSyncStateNotFound
from core.domain.model import CrmRecordRef, CrmTable, InboundMethod, MailboxConfig, MailboxKind
from core.domain.records import InboundLedgerEntry, LedgerOutcome
from core.names import INBOUND_QUEUE, MAILBOX_SYNC_QUEUE
from core.services.delta import LATE_ARRIVAL_SLACK, DeltaCursor, DeltaService
from core.work_items import InboundItem, MailboxSyncItem
from tests.fakes import FakeWorkQueue, StaticMailboxDirectory

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def mbx(address: str, **kw: Any) -> MailboxConfig:
    return MailboxConfig(address, MailboxKind.USER, owner=CrmRecordRef(CrmTable.SYSTEMUSER, uuid.UUID(int=1)),
                         inbound_method=kw.pop("inbound_method", InboundMethod.INDIVIDUAL), **kw)


def msg(gid: str, received: datetime, **kw: Any) -> dict[str, Any]:
    return {"id": gid, "receivedDateTime": received.strftime("%Y-%m-%dT%H:%M:%SZ"), **kw}


class FakeDeltaGraph:
    """Pages by link: link None -> first page of a new round (records the filter), then the scripted pages."""

    def __init__(self) -> None:
        self.rounds: list[list[DeltaPage]] = []
        self.links: dict[str, DeltaPage] = {}
        self.started: list[datetime | None] = []
        self.expired: set[str] = set()
        self.listing: dict[str, list[dict[str, Any]]] = {}
        self.change_types: list[str | None] = []
        self.folders: list[str] = []
        self.listed: list[tuple[datetime | None, datetime | None]] = []

    async def delta_page(self, mailbox: str, folder: str, link: str | None, *,
                         received_after: datetime | None = None, page_size: int = 100,
                         change_type: str | None = None) -> DeltaPage:
        self.folders.append(folder)
        if link is None:
            self.started.append(received_after)
            self.change_types.append(change_type)
            return self.rounds.pop(0)[0] if self.rounds else DeltaPage([], [], None, f"delta-{len(self.started)}")
        assert change_type is None, "the links carry the initial options"
        if link in self.expired:
            raise GraphSyncStateNotFound(410, "syncStateNotFound", "expired")
        return self.links.get(link, DeltaPage([], [], None, link))

    async def list_messages(self, mailbox: str, folder: str, *, received_after: datetime | None = None,
                            received_before: datetime | None = None, page_size: int = 50
                            ) -> AsyncIterator[dict[str, Any]]:
        self.listed.append((received_after, received_before))
        for m in self.listing.get(folder, []):
            received = datetime.fromisoformat(m["receivedDateTime"].replace("Z", "+00:00"))
            if (received_after is None or received >= received_after) and (
                    received_before is None or received < received_before):
                yield m


class FakeState:
    def __init__(self) -> None:
        self.cursors: dict[tuple[str, str], DeltaCursor] = {}

    async def get(self, mailbox: str, folder: str) -> DeltaCursor | None:
        return self.cursors.get((mailbox, folder))

    async def put(self, cursor: DeltaCursor) -> None:
        self.cursors[(cursor.mailbox, cursor.folder)] = cursor


def enqueued(queue: FakeWorkQueue) -> list[str]:
    return [InboundItem.from_json(m).message_id for m in queue.messages[INBOUND_QUEUE]]


async def test_first_round_of_a_new_mailbox_starts_now_and_follows_pages() -> None:
    graph, state, queue = FakeDeltaGraph(), FakeState(), FakeWorkQueue()
    graph.rounds.append([DeltaPage([msg("a", NOW), msg("d", NOW, isDraft=True)], [], "next-1", None)])
    graph.links["next-1"] = DeltaPage([msg("b", NOW + timedelta(minutes=1))], ["gone"], None, "delta-1")
    svc = DeltaService(graph, state, queue, StaticMailboxDirectory([mbx("a@x.com")]), clock=lambda: NOW)

    (report,) = await svc.sync_mailbox("a@x.com")

    assert graph.started == [NOW]  # no history import: only mail from now on
    assert enqueued(queue) == ["a", "b"] and report.pages == 2
    items = [InboundItem.from_json(m) for m in queue.messages[INBOUND_QUEUE]]
    assert {(i.source, i.folder) for i in items} == {("delta", "inbox")}
    cursor = state.cursors[("a@x.com", "inbox")]
    assert cursor.link == "delta-1" and cursor.high_water == NOW + timedelta(minutes=1)


async def test_first_round_starts_at_the_process_from_date_and_ignores_older_changes() -> None:
    graph, state, queue = FakeDeltaGraph(), FakeState(), FakeWorkQueue()
    start = NOW - timedelta(days=3)
    graph.rounds.append([DeltaPage([msg("old", start - timedelta(days=1)), msg("new", NOW)], [], None, "d")])
    svc = DeltaService(graph, state, queue,
                       StaticMailboxDirectory([mbx("a@x.com", process_email_received_after=start)]),
                       clock=lambda: NOW)
    await svc.sync_mailbox("a@x.com")
    assert graph.started == [start] and enqueued(queue) == ["new"]


async def test_next_round_uses_the_saved_delta_link() -> None:
    graph, state, queue = FakeDeltaGraph(), FakeState(), FakeWorkQueue()
    state.cursors[("a@x.com", "inbox")] = DeltaCursor("a@x.com", "inbox", "delta-7", NOW, NOW)
    graph.links["delta-7"] = DeltaPage([msg("c", NOW + timedelta(seconds=5))], [], None, "delta-8")
    svc = DeltaService(graph, state, queue, StaticMailboxDirectory([mbx("a@x.com")]), clock=lambda: NOW)
    await svc.sync_mailbox("a@x.com")
    assert graph.started == [] and enqueued(queue) == ["c"]
    assert state.cursors[("a@x.com", "inbox")].link == "delta-8"


async def test_expired_sync_state_restarts_from_the_high_water_mark() -> None:
    graph, state, queue = FakeDeltaGraph(), FakeState(), FakeWorkQueue()
    mark = NOW - timedelta(hours=5)
    state.cursors[("a@x.com", "inbox")] = DeltaCursor("a@x.com", "inbox", "stale", mark, NOW - timedelta(days=9))
    graph.expired.add("stale")
    graph.rounds.append([DeltaPage([msg("late", mark)], [], None, "fresh")])
    svc = DeltaService(graph, state, queue, StaticMailboxDirectory([mbx("a@x.com")]), clock=lambda: NOW)

    (report,) = await svc.sync_mailbox("a@x.com")

    assert report.restarted
    assert graph.started == [mark - LATE_ARRIVAL_SLACK]
    assert enqueued(queue) == ["late"] and state.cursors[("a@x.com", "inbox")].link == "fresh"


async def test_sent_items_round_only_when_tracked() -> None:
    graph, state, queue = FakeDeltaGraph(), FakeState(), FakeWorkQueue()
    svc = DeltaService(graph, state, queue, StaticMailboxDirectory([mbx("a@x.com", track_sent_items=True)]),
                       clock=lambda: NOW)
    reports = await svc.sync_mailbox("a@x.com")
    assert [r.folder for r in reports] == ["inbox", "sentitems"]


async def test_timer_fans_out_one_sync_item_per_watched_mailbox() -> None:
    queue = FakeWorkQueue()
    directory = StaticMailboxDirectory([mbx("a@x.com"), mbx("b@x.com", inbound_method=InboundMethod.OUTLOOK),
                                        MailboxConfig("sink@x.com", MailboxKind.FORWARD_SINK)])
    svc = DeltaService(FakeDeltaGraph(), FakeState(), queue, directory, clock=lambda: NOW)
    assert await svc.fan_out() == 2
    items = [MailboxSyncItem.from_json(m) for m in queue.messages[MAILBOX_SYNC_QUEUE]]
    assert sorted(i.mailbox for i in items) == ["a@x.com", "sink@x.com"] and {i.reason for i in items} == {"timer"}


class FakeSubscriptions:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    async def recreate(self, mailbox: str, subscription_id: str = "") -> None:
        self.calls.append(("recreate", mailbox, subscription_id))

    async def reauthorize(self, mailbox: str, subscription_id: str) -> None:
        self.calls.append(("reauthorize", mailbox, subscription_id))


async def test_lifecycle_events_resubscribe_then_run_delta() -> None:
    graph, subs = FakeDeltaGraph(), FakeSubscriptions()
    svc = DeltaService(graph, FakeState(), FakeWorkQueue(), StaticMailboxDirectory([mbx("a@x.com")]),
                       subscriptions=subs, clock=lambda: NOW)  # type: ignore[arg-type]
    for reason in ("subscriptionRemoved", "reauthorizationRequired", "missed"):
        reports = await svc.handle_sync_item(MailboxSyncItem("a@x.com", reason, "sub-1"))  # type: ignore[arg-type]
        assert [r.folder for r in reports] == ["inbox"]
    assert subs.calls == [("recreate", "a@x.com", "sub-1"), ("reauthorize", "a@x.com", "sub-1")]
    assert len(graph.started) == 1  # the first round saved its delta link; later rounds continue from it


async def test_a_lifecycle_event_syncs_only_its_subscriptions_folder() -> None:
    graph, subs = FakeDeltaGraph(), FakeSubscriptions()
    directory = StaticMailboxDirectory([mbx("a@x.com", track_sent_items=True)])
    svc = DeltaService(graph, FakeState(), FakeWorkQueue(), directory, subscriptions=subs,  # type: ignore[arg-type]
                       clock=lambda: NOW)
    item = MailboxSyncItem("a@x.com", "reauthorizationRequired", "sub-9", folder="sentitems")
    reports = await svc.handle_sync_item(MailboxSyncItem.from_json(item.to_json()))
    assert [r.folder for r in reports] == ["sentitems"] and set(graph.folders) == {"sentitems"}
    assert subs.calls == [("reauthorize", "a@x.com", "sub-9")]
    reports = await svc.handle_sync_item(MailboxSyncItem("a@x.com", "timer"))
    assert [r.folder for r in reports] == ["inbox", "sentitems"]


async def test_first_round_asks_only_for_created_messages() -> None:
    graph = FakeDeltaGraph()
    svc = DeltaService(graph, FakeState(), FakeWorkQueue(), StaticMailboxDirectory([mbx("a@x.com")]),
                       clock=lambda: NOW)
    await svc.sync_mailbox("a@x.com")
    everything = DeltaService(graph, FakeState(), FakeWorkQueue(), StaticMailboxDirectory([mbx("a@x.com")]),
                              clock=lambda: NOW, change_type=None)
    await everything.sync_mailbox("a@x.com")
    assert graph.change_types == ["created", None]


async def test_a_first_round_at_the_5000_cap_lists_the_older_rest() -> None:
    graph, state, queue = FakeDeltaGraph(), FakeState(), FakeWorkQueue()
    start = NOW - timedelta(days=30)
    # Graph returns the newest messages (ordered by receivedDateTime desc) up to the cap (4 here), in two pages
    newest = [msg(f"n{i}", NOW - timedelta(hours=i)) for i in range(4)]
    graph.rounds.append([DeltaPage(newest[:2], [], "next-1", None)])
    graph.links["next-1"] = DeltaPage(newest[2:], [], None, "delta-1")
    graph.listing["inbox"] = [msg(f"o{i}", NOW - timedelta(days=i + 1)) for i in range(40)] + [newest[3]]
    svc = DeltaService(graph, state, queue,
                       StaticMailboxDirectory([mbx("a@x.com", process_email_received_after=start)]),
                       clock=lambda: NOW, filter_cap=4)

    (report,) = await svc.sync_mailbox("a@x.com")

    oldest_reported = NOW - timedelta(hours=3)
    assert graph.listed == [(start, oldest_reported + timedelta(seconds=1))]
    older = [f"o{i}" for i in range(30)]  # received from the process-from date on
    assert enqueued(queue) == [m["id"] for m in newest] + older + ["n3"]  # the boundary second again: ledger dedupes
    assert report.backfilled == 31
    cursor = state.cursors[("a@x.com", "inbox")]
    assert cursor.link == "delta-1" and cursor.initial_seen is None
    # a later round is not a first round: no listing, however many changes it reports
    graph.links["delta-1"] = DeltaPage([msg(f"x{i}", NOW) for i in range(6)], [], None, "delta-2")
    await svc.sync_mailbox("a@x.com")
    assert len(graph.listed) == 1


async def test_a_first_round_split_over_invocations_still_notices_the_cap() -> None:
    graph, state, queue = FakeDeltaGraph(), FakeState(), FakeWorkQueue()
    page = [msg(f"n{i}", NOW - timedelta(hours=i)) for i in range(2)]
    state.cursors[("a@x.com", "inbox")] = DeltaCursor("a@x.com", "inbox", "next-1", NOW, NOW - timedelta(days=2),
                                                      initial_seen=2, initial_oldest=NOW - timedelta(hours=1))
    graph.links["next-1"] = DeltaPage(page, [], None, "delta-1")
    svc = DeltaService(graph, state, queue, StaticMailboxDirectory([mbx("a@x.com")]), clock=lambda: NOW,
                       filter_cap=4)
    await svc.sync_mailbox("a@x.com")
    assert graph.listed == [(NOW - timedelta(days=2), NOW - timedelta(hours=1) + timedelta(seconds=1))]


async def test_backfill_enqueues_history_as_backfill_items() -> None:
    graph, queue = FakeDeltaGraph(), FakeWorkQueue()
    graph.listing["inbox"] = [msg(f"h{i}", NOW - timedelta(days=i)) for i in range(70)]
    seen: list[int] = []
    svc = DeltaService(graph, FakeState(), queue, StaticMailboxDirectory([mbx("a@x.com")]), clock=lambda: NOW)

    report = await svc.backfill("a@x.com", NOW - timedelta(days=90), progress=seen.append)

    assert report.enqueued == 70 and report.folders == ["inbox"] and seen == [64, 70]
    assert {InboundItem.from_json(m).source for m in queue.messages[INBOUND_QUEUE]} == {"backfill"}


async def test_backfill_refuses_mailboxes_the_router_does_not_read() -> None:
    svc = DeltaService(FakeDeltaGraph(), FakeState(), FakeWorkQueue(),
                       StaticMailboxDirectory([mbx("o@x.com", inbound_method=InboundMethod.OUTLOOK)]))
    report = await svc.backfill("o@x.com", NOW)
    assert report.enqueued == 0 and "does not read" in report.error


async def test_a_busy_mailbox_drops_the_timers_item_and_brings_a_lifecycle_item_back_later() -> None:
    from core.domain.leases import delta_lease
    from tests.fakes import MemoryLeaseStore

    graph, state, queue, leases = FakeDeltaGraph(), FakeState(), FakeWorkQueue(), MemoryLeaseStore()
    service = DeltaService(graph, state, queue, StaticMailboxDirectory([mbx("a@x.com")]), clock=lambda: NOW,
                           leases=leases, owner="worker-2")
    await leases.acquire(delta_lease("a@x.com"), "worker-1", timedelta(minutes=2), purpose="timer")
    assert await service.handle_sync_item(MailboxSyncItem("a@x.com", "timer")) == []
    assert graph.folders == [] and not queue.messages[MAILBOX_SYNC_QUEUE]  # the running round covers it
    missed = MailboxSyncItem("a@x.com", "missed", folder="inbox")
    assert await service.handle_sync_item(missed) == []
    assert graph.folders == [] and queue.messages[MAILBOX_SYNC_QUEUE] == [missed.to_json()]  # comes back later
    await leases.release(leases.rows[delta_lease("a@x.com")])  # type: ignore[arg-type]
    reports = await service.handle_sync_item(missed)
    assert [r.folder for r in reports] == ["inbox"] and delta_lease("a@x.com") not in leases.rows


async def test_the_fan_out_runs_once_at_a_time_and_can_name_mailboxes() -> None:
    from core.domain.leases import JOB_DELTA_FANOUT
    from core.services.jobs import JobBusy
    from tests.fakes import MemoryLeaseStore

    queue, leases = FakeWorkQueue(), MemoryLeaseStore()
    service = DeltaService(FakeDeltaGraph(), FakeState(), queue,
                           StaticMailboxDirectory([mbx("a@x.com"), mbx("b@x.com")]), leases=leases, owner="cli")
    assert await service.fan_out(reason="manual", only=["B@x.com"]) == 1
    assert [MailboxSyncItem.from_json(m) for m in queue.messages[MAILBOX_SYNC_QUEUE]] == [
        MailboxSyncItem("b@x.com", "manual")]
    await leases.acquire(JOB_DELTA_FANOUT, "timer@h:1:a", timedelta(minutes=1))
    try:
        await service.fan_out()
    except JobBusy as busy:
        assert "delta catch-up" in str(busy) and "timer@h:1:a" in str(busy)
    else:
        raise AssertionError("a second fan-out must not run")


# -- hot mailboxes: the round works its messages itself, under the mailbox's lease --------------------------------


class FakeInlineProcessor:
    def __init__(self, fail: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.fail = fail
        self.processed: list[InboundItem] = []
        self.inflight = self.peak = 0

    async def process(self, item: InboundItem) -> None:

        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        await asyncio.sleep(0)
        self.inflight -= 1
        if item.message_id in self.fail:
            raise ValueError("not transient")
        self.processed.append(item)


async def test_a_hot_round_processes_its_messages_inline_and_queues_only_failures() -> None:
    graph, state, queue = FakeDeltaGraph(), FakeState(), FakeWorkQueue()
    graph.rounds.append([DeltaPage([msg(f"m{n}", NOW) for n in range(20)], [], None, "delta-1")])
    processor = FakeInlineProcessor(fail={"m7"})
    svc = DeltaService(graph, state, queue, StaticMailboxDirectory([mbx("sink@x.com")]), clock=lambda: NOW,
                       inline=lambda: processor.process, inline_gate=asyncio.Semaphore(3))

    (report,) = await svc.handle_sync_item(MailboxSyncItem("sink@x.com", "hot", folder="inbox"))

    assert sorted(i.message_id for i in processor.processed) == sorted(f"m{n}" for n in range(20) if n != 7)
    assert {i.source for i in processor.processed} == {"delta"} and processor.peak <= 3
    assert enqueued(queue) == ["m7"]  # the normal retries and poison handling apply to it
    assert (report.processed, report.enqueued) == (19, 1)
    assert state.cursors[("sink@x.com", "inbox")].link == "delta-1"
    # A folder without a cursor looks back far enough to list the messages whose notifications it replaced.
    assert graph.started == [NOW - timedelta(minutes=15)]


async def test_other_rounds_still_enqueue_and_a_busy_hot_request_comes_back_soon() -> None:
    from core.domain.leases import delta_lease
    from core.services.delta import HOT_BUSY_RETRY_SECONDS
    from tests.fakes import MemoryLeaseStore

    class DelayQueue(FakeWorkQueue):
        def __init__(self) -> None:
            super().__init__()
            self.delays: list[int] = []

        async def send_many(self, queue: str, messages, *, delay_seconds: int = 0) -> None:  # type: ignore[no-untyped-def]
            self.delays.append(delay_seconds)
            await super().send_many(queue, messages, delay_seconds=delay_seconds)

    graph, state, queue, leases = FakeDeltaGraph(), FakeState(), DelayQueue(), MemoryLeaseStore()
    graph.rounds.append([DeltaPage([msg("a", NOW)], [], None, "delta-1")])
    processor = FakeInlineProcessor()
    svc = DeltaService(graph, state, queue, StaticMailboxDirectory([mbx("sink@x.com")]), clock=lambda: NOW,
                       inline=lambda: processor.process, leases=leases, owner="worker-2")
    await svc.handle_sync_item(MailboxSyncItem("sink@x.com", "timer"))
    assert enqueued(queue) == ["a"] and processor.processed == []

    await leases.acquire(delta_lease("sink@x.com"), "worker-1", timedelta(minutes=2), purpose="hot")
    hot = MailboxSyncItem("sink@x.com", "hot", folder="inbox")
    assert await svc.handle_sync_item(hot) == []
    assert queue.messages[MAILBOX_SYNC_QUEUE] == [hot.to_json()] and queue.delays[-1] == HOT_BUSY_RETRY_SECONDS


async def test_a_hot_round_stops_at_its_page_limit_and_hands_the_rest_to_a_new_hot_item() -> None:
    from core.services.delta import HOT_MAX_PAGES

    graph, state, queue = FakeDeltaGraph(), FakeState(), FakeWorkQueue()
    graph.rounds.append([DeltaPage([msg("m0", NOW)], [], "next-1", None)])
    for n in range(1, HOT_MAX_PAGES + 2):
        graph.links[f"next-{n}"] = DeltaPage([msg(f"m{n}", NOW)], [], f"next-{n + 1}", None)
    processor = FakeInlineProcessor()
    svc = DeltaService(graph, state, queue, StaticMailboxDirectory([mbx("sink@x.com")]), clock=lambda: NOW,
                       inline=lambda: processor.process)
    hot = MailboxSyncItem("sink@x.com", "hot", folder="inbox")

    (report,) = await svc.handle_sync_item(hot)

    assert report.pages == HOT_MAX_PAGES and report.more and len(processor.processed) == HOT_MAX_PAGES
    assert state.cursors[("sink@x.com", "inbox")].link == f"next-{HOT_MAX_PAGES}"  # the next round starts there
    assert queue.messages[MAILBOX_SYNC_QUEUE] == [hot.to_json()]


class FakeLedger:
    def __init__(self, outcomes: dict[str, LedgerOutcome], broken: set[str] | None = None) -> None:
        self.outcomes = outcomes
        self.broken = broken or set()
        self.asked: list[str] = []
        self.remembered: set[str] = set()

    def known_final(self, mailbox: str, graph_id: str) -> bool:
        return graph_id in self.remembered

    async def get(self, mailbox: str, graph_id: str) -> InboundLedgerEntry | None:
        self.asked.append(graph_id)
        if graph_id in self.broken:
            raise OSError("table unavailable")
        outcome = self.outcomes.get(graph_id)
        return None if outcome is None else InboundLedgerEntry(mailbox, graph_id, outcome)


async def test_a_round_leaves_out_what_the_ledger_has_a_final_outcome_for() -> None:
    graph, state, queue = FakeDeltaGraph(), FakeState(), FakeWorkQueue()
    graph.rounds.append([DeltaPage([msg(g, NOW) for g in ("done", "skipped", "retrying", "new", "unknown")],
                                   [], None, "delta-1")])
    ledger = FakeLedger({"done": LedgerOutcome.TRACKED, "skipped": LedgerOutcome.SKIPPED,
                         "retrying": LedgerOutcome.RETRYING}, broken={"unknown"})
    svc = DeltaService(graph, state, queue, StaticMailboxDirectory([mbx("a@x.com")]), clock=lambda: NOW,
                       ledger=ledger)

    (report,) = await svc.sync_mailbox("a@x.com")

    # notified and processed already: not enqueued again; a retry in progress, a new one and one the ledger could
    # not be asked about go to the processor, whose own ledger check decides
    assert enqueued(queue) == ["retrying", "new", "unknown"]
    assert report.enqueued == 3 and report.already_processed == 2 and sorted(ledger.asked) == sorted(
        ["done", "skipped", "retrying", "new", "unknown"])
    assert state.cursors[("a@x.com", "inbox")].link == "delta-1"


async def test_what_this_process_finished_is_left_out_without_a_ledger_read() -> None:
    graph, state, queue = FakeDeltaGraph(), FakeState(), FakeWorkQueue()
    graph.rounds.append([DeltaPage([msg(g, NOW) for g in ("seen-here", "elsewhere", "new")], [], None, "delta-1")])
    ledger = FakeLedger({"elsewhere": LedgerOutcome.TRACKED})
    ledger.remembered = {"seen-here"}
    svc = DeltaService(graph, state, queue, StaticMailboxDirectory([mbx("a@x.com")]), clock=lambda: NOW,
                       ledger=ledger)

    (report,) = await svc.sync_mailbox("a@x.com")

    assert enqueued(queue) == ["new"] and report.already_processed == 2
    assert sorted(ledger.asked) == ["elsewhere", "new"]  # the remembered one cost no read
