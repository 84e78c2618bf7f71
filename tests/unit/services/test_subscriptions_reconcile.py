"""Subscription reconcile: the pure plan as a table of cases, and the service over fakes of our ports."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from core.adapters.graph import GraphAccessDenied, GraphNotFound, GraphThrottled
from core.adapters.state import SubscriptionRecord
from core.domain.model import (
    ApprovalStatus,
    CrmRecordRef,
    CrmTable,
    InboundMethod,
    MailboxConfig,
    MailboxKind,
    OrgEmailSettings,
)
from core.services.subscriptions import (
    SubscriptionOptions,
    SubscriptionService,
    WritePacer,
    plan_reconcile,
    resource_for,
    watched_folders,
)
from tests.fakes import StaticMailboxDirectory

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
URL = "https://app.example/api/graph/notifications?code=k"
ORG = OrgEmailSettings()


def mbx(address: str, **kw: Any) -> MailboxConfig:
    values: dict[str, Any] = {"address": address, "kind": MailboxKind.USER,
                              "owner": CrmRecordRef(CrmTable.SYSTEMUSER, uuid.uuid5(uuid.NAMESPACE_DNS, address)),
                              "inbound_method": InboundMethod.INDIVIDUAL}
    values.update(kw)
    return MailboxConfig(**values)


def rec(sid: str, mailbox: str, folder: str = "inbox", expires: timedelta = timedelta(days=2)) -> SubscriptionRecord:
    return SubscriptionRecord(sid, mailbox, folder, "cs", "tid", resource_for(mailbox, folder), NOW + expires)


@pytest.mark.parametrize(("config", "folders"), [
    (mbx("a@x.com"), ("inbox",)),
    (mbx("a@x.com", track_sent_items=True), ("inbox", "sentitems")),
    (mbx("a@x.com", folder_regarding={"F1": CrmRecordRef("incident", uuid.UUID(int=1))}), ("inbox", "F1")),
    (mbx("a@x.com", inbound_method=InboundMethod.NONE), ()),
    (mbx("a@x.com", inbound_method=InboundMethod.OUTLOOK), ()),
    (mbx("a@x.com", inbound_method=InboundMethod.FORWARD, forward_sink_address="s@x.com"), ()),
    (mbx("a@x.com", enabled_for_incoming=False), ()),
    (mbx("a@x.com", approval=ApprovalStatus.PENDING), ()),
    (MailboxConfig("s@x.com", MailboxKind.FORWARD_SINK), ("inbox",)),
    (mbx("q@x.com", kind=MailboxKind.QUEUE, track_sent_items=True), ("inbox",)),
])
def test_watched_folders(config: MailboxConfig, folders: tuple[str, ...]) -> None:
    assert watched_folders(config, ORG) == folders


def test_plan_creates_renews_deletes_and_drops() -> None:
    desired = [("a@x.com", "inbox"), ("b@x.com", "inbox"), ("c@x.com", "inbox")]
    records = [
        rec("keep", "a@x.com"),
        rec("soon", "b@x.com", expires=timedelta(hours=2)),
        rec("unwanted", "z@x.com"),
        rec("vanished", "c@x.com"),
        rec("expired", "a@x.com", expires=-timedelta(minutes=1)),
    ]
    graph = [{"id": s, "notificationUrl": URL} for s in ("keep", "soon", "unwanted", "expired")]
    graph.append({"id": "orphan", "notificationUrl": URL})
    graph.append({"id": "someone-else", "notificationUrl": "https://other.example/hook"})

    plan = plan_reconcile(desired, records, graph, now=NOW, renew_before=timedelta(hours=24), notification_url=URL)

    assert [r.id for r in plan.renew] == ["soon"]
    assert sorted(plan.delete) == ["orphan", "unwanted"]
    assert sorted(r.id for r in plan.drop_records) == ["expired", "vanished"]
    assert plan.create == (("c@x.com", "inbox"),)
    assert plan.keep == 1


def test_plan_without_graph_list_drops_nothing_and_dedupes_records() -> None:
    records = [rec("old", "a@x.com", expires=timedelta(days=1, hours=1)), rec("new", "a@x.com")]
    plan = plan_reconcile([("A@x.com", "Inbox")], records, None, now=NOW, renew_before=timedelta(hours=1),
                          notification_url=URL)
    assert plan.delete == ("old",) and not plan.drop_records and not plan.create


class FakeGraph:
    """Creates are direct POSTs (``create_subscription``); renewals and deletions come in ``$batch`` requests."""

    def __init__(self) -> None:
        self.subs: dict[str, dict[str, Any]] = {}
        self.batches: list[list[Mapping[str, Any]]] = []
        self.creates: list[Mapping[str, Any]] = []
        self.renewals: list[tuple[str, datetime]] = []
        self.throttle_next = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.n = 0

    async def batch(self, requests: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        assert len(requests) <= 20
        self.batches.append(list(requests))
        out = []
        for r in requests:
            assert r["method"] in ("PATCH", "DELETE"), "creates are direct POSTs"
            if self.throttle_next:
                self.throttle_next -= 1
                out.append({"id": r["id"], "status": 429, "headers": {"Retry-After": "0"}})
                continue
            sid = r["url"].rsplit("/", 1)[1]
            if r["method"] == "PATCH":
                if sid not in self.subs:
                    out.append({"id": r["id"], "status": 404, "body": {"error": {"code": "ResourceNotFound"}}})
                    continue
                self.subs[sid].update(r["body"])
                out.append({"id": r["id"], "status": 200, "body": self.subs[sid]})
            else:
                self.subs.pop(sid, None)
                out.append({"id": r["id"], "status": 204})
        return out

    async def create_subscription(self, body: Mapping[str, Any]) -> dict[str, Any]:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0)  # let other creates start, as a real validation round trip would
            self.creates.append(dict(body))
            if self.throttle_next:
                self.throttle_next -= 1
                raise GraphThrottled(429, "TooManyRequests", "slow down", retry_after=0.0)
            if "bad" in body["resource"]:
                raise GraphAccessDenied(403, "ErrorAccessDenied", "no")
            self.n += 1
            sid = f"s{self.n}"
            self.subs[sid] = {"id": sid, **body}
            return dict(self.subs[sid])
        finally:
            self.in_flight -= 1

    async def list_subscriptions(self) -> list[dict[str, Any]]:
        return list(self.subs.values())

    async def renew_subscription(self, subscription_id: str, expires: datetime) -> dict[str, Any]:
        self.renewals.append((subscription_id, expires))
        if subscription_id not in self.subs:
            raise GraphNotFound(404, "ResourceNotFound", "gone")
        self.subs[subscription_id]["expirationDateTime"] = expires.isoformat()
        return dict(self.subs[subscription_id])


class FakeStore:
    def __init__(self) -> None:
        self.records: dict[str, SubscriptionRecord] = {}
        self.batches: list[int] = []

    async def put(self, record: SubscriptionRecord) -> None:
        self.records[record.id] = record

    async def put_many(self, records: Sequence[SubscriptionRecord]) -> None:
        self.batches.append(len(records))
        for record in records:
            self.records[record.id] = record

    async def delete(self, subscription_id: str) -> None:
        self.records.pop(subscription_id, None)

    async def list(self) -> AsyncIterator[SubscriptionRecord]:
        for r in list(self.records.values()):
            yield r


class FakeSyncStatus:
    def __init__(self) -> None:
        self.rows: list[tuple[str, bool, str]] = []

    async def record_sync(self, mailbox: str, *, ok: bool, detail: str = "") -> None:
        self.rows.append((mailbox, ok, detail))

    async def record_synced(self, mailboxes: Sequence[str]) -> None:
        self.rows.extend((m, True, "") for m in mailboxes)


def service(graph: FakeGraph, store: FakeStore, mailboxes: list[MailboxConfig],
            status: FakeSyncStatus | None = None, **options: Any) -> SubscriptionService:
    opts = SubscriptionOptions(URL, URL.replace("notifications", "lifecycle"), "tid", **options)
    return SubscriptionService(graph, store, StaticMailboxDirectory(mailboxes), opts, status=status,
                               clock=lambda: NOW)


async def test_reconcile_creates_by_direct_posts_a_few_at_a_time_with_secret_client_states() -> None:
    graph, store = FakeGraph(), FakeStore()
    mailboxes = [mbx(f"u{i}@x.com") for i in range(45)]
    report = await service(graph, store, mailboxes, create_concurrency=5).reconcile()

    assert report.created == 45 and not report.failed and graph.batches == []
    assert graph.max_in_flight == 5  # never more validation handshakes in flight than the pacing allows
    states = {r.client_state for r in store.records.values()}
    assert len(states) == 45 and all(len(s) >= 43 for s in states)  # >= 32 random bytes each
    body = graph.creates[0]
    assert body["notificationUrl"] == URL and body["lifecycleNotificationUrl"].endswith("lifecycle?code=k")
    assert body["changeType"] == "created" and body["resource"].startswith("users/u")

    again = await service(graph, store, mailboxes).reconcile()
    assert (again.created, again.deleted, again.unchanged) == (0, 0, 45)


async def test_reconcile_records_per_mailbox_failures_and_retries_throttled_creates() -> None:
    graph, store, status = FakeGraph(), FakeStore(), FakeSyncStatus()
    graph.throttle_next = 2
    report = await service(graph, store, [mbx("a@x.com"), mbx("b@x.com"), mbx("bad@x.com")], status,
                           create_concurrency=1).reconcile()
    assert report.created == 2
    assert report.failed == [("bad@x.com", "inbox", "create: HTTP 403 ErrorAccessDenied")]
    assert ("bad@x.com", False, "subscription inbox: create: HTTP 403 ErrorAccessDenied") in status.rows
    assert len(graph.creates) == 5  # two 429s answered by sending the same POST again


async def test_renewals_go_in_batches_and_are_retried_when_throttled() -> None:
    graph, store = FakeGraph(), FakeStore()
    await service(graph, store, [mbx(f"u{i}@x.com") for i in range(25)]).reconcile()
    for record in list(store.records.values()):
        store.records[record.id] = SubscriptionRecord(record.id, record.mailbox, record.folder, record.client_state,
                                                      record.tenant_id, record.resource, NOW + timedelta(hours=1))
    graph.throttle_next = 3
    report = await service(graph, store, [mbx(f"u{i}@x.com") for i in range(25)]).reconcile()
    assert report.renewed == 25 and not report.failed
    assert sorted(len(b) for b in graph.batches) == [3, 5, 20]


async def test_renewal_of_a_subscription_graph_lost_recreates_it() -> None:
    graph, store = FakeGraph(), FakeStore()
    store.records["lost"] = rec("lost", "a@x.com", expires=timedelta(hours=1))
    svc = service(graph, store, [mbx("a@x.com")])
    # Graph's list is unavailable this run, so the record is not dropped up front; the renewal finds out.
    plan = plan_reconcile([("a@x.com", "inbox")], list(store.records.values()), None, now=NOW,
                          renew_before=timedelta(hours=24), notification_url=URL)
    report = await svc.apply(plan, now=NOW)
    assert report.created == 1 and "lost" not in store.records
    assert [r.mailbox for r in store.records.values()] == ["a@x.com"]


async def test_unwanted_subscription_is_deleted() -> None:
    graph, store = FakeGraph(), FakeStore()
    await service(graph, store, [mbx("a@x.com"), mbx("b@x.com")]).reconcile()
    report = await service(graph, store, [mbx("a@x.com")]).reconcile()
    assert report.deleted == 1
    assert [r.mailbox for r in store.records.values()] == ["a@x.com"] and len(graph.subs) == 1


async def test_reconcile_reports_progress_as_requests_complete() -> None:
    graph, store = FakeGraph(), FakeStore()
    seen: list[tuple[int, int]] = []
    report = await service(graph, store, [mbx(f"u{i}@x.com") for i in range(45)]).reconcile(
        progress=lambda done, total: seen.append((done, total)))
    assert report.created == 45
    done = [d for d, _ in seen]
    assert len(seen) == 45 and all(total == 45 for _, total in seen)  # creates are direct POSTs: one call each
    assert done == sorted(done) and done[-1] == 45


async def test_reauthorization_is_one_patch_and_coalesced() -> None:
    graph, store = FakeGraph(), FakeStore()
    await service(graph, store, [mbx("a@x.com")]).reconcile()
    [record] = store.records.values()
    # created moments ago with a full lifetime: the challenge needs no write at all
    report = await service(graph, store, [mbx("a@x.com")]).reauthorize("a@x.com", record.id)
    assert report.unchanged == 1 and graph.renewals == []
    # renewed long ago: exactly one PATCH (renewing also reauthorizes), the record gets the new expiry
    store.records[record.id] = _aged(record, hours=30)
    report = await service(graph, store, [mbx("a@x.com")]).reauthorize("a@x.com", record.id)
    assert report.renewed == 1 and [sid for sid, _ in graph.renewals] == [record.id]
    assert store.records[record.id].expires > NOW + timedelta(days=2)
    # a second challenge right after: coalesced
    await service(graph, store, [mbx("a@x.com")]).reauthorize("a@x.com", record.id)
    assert len(graph.renewals) == 1


async def test_reauthorization_of_a_subscription_graph_lost_subscribes_again() -> None:
    graph, store = FakeGraph(), FakeStore()
    await service(graph, store, [mbx("a@x.com")]).reconcile()
    [record] = store.records.values()
    store.records[record.id] = _aged(record, hours=30)
    graph.subs.clear()
    report = await service(graph, store, [mbx("a@x.com")]).reauthorize("a@x.com", record.id)
    assert report.created == 1 and record.id not in store.records


def _aged(record: SubscriptionRecord, *, hours: int) -> SubscriptionRecord:
    return SubscriptionRecord(record.id, record.mailbox, record.folder, record.client_state, record.tenant_id,
                              record.resource, record.expires - timedelta(hours=hours))


def test_resource_carries_raw_ids() -> None:
    assert resource_for("9f3c1d2e-0000-4000-8000-000000000001", "AAMkAD=") == (
        "users/9f3c1d2e-0000-4000-8000-000000000001/mailFolders('AAMkAD=')/messages")
    assert resource_for("o'brien+x@contoso.com", "inbox") == "users/o'brien+x@contoso.com/mailFolders('inbox')/messages"
    assert resource_for("a#EXT#@x.com", "a/b") == "users/a%23EXT%23@x.com/mailFolders('a%2Fb')/messages"


async def test_write_pacer_keeps_a_sliding_window() -> None:
    now = [0.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    pacer = WritePacer(3, 20.0, clock=lambda: now[0], sleep=sleep)
    await pacer.acquire(2)
    now[0] = 5.0
    await pacer.acquire()
    await pacer.acquire(2)  # two more: wait until both writes made at t=0 left the window (t=20)
    assert slept == [15.0] and now[0] == 20.0
    await pacer.acquire(50)  # more than the whole window: capped, waits for a full window
    assert now[0] == 40.0


# ------------------------------------------------------------------------------------------------ concurrent runs


def leased(graph: FakeGraph, store: FakeStore, mailboxes: list[MailboxConfig], leases: Any, owner: str
           ) -> SubscriptionService:
    opts = SubscriptionOptions(URL, URL.replace("notifications", "lifecycle"), "tid")
    return SubscriptionService(graph, store, StaticMailboxDirectory(mailboxes), opts, clock=lambda: NOW,
                               leases=leases, owner=owner)


async def test_two_reconciles_at_once_make_one_subscription_per_folder() -> None:
    from tests.fakes import MemoryLeaseStore

    graph, store, leases = FakeGraph(), FakeStore(), MemoryLeaseStore()
    mailboxes = [mbx(f"u{i}@x.com", track_sent_items=True) for i in range(6)]
    first, second = await asyncio.gather(
        leased(graph, store, mailboxes, leases, "timer").reconcile(wait=60),
        leased(graph, store, mailboxes, leases, "cli").reconcile(wait=60))
    assert first.created + second.created == 12 and {first.created, second.created} == {0, 12}
    keys = sorted((s["resource"]) for s in graph.subs.values())
    assert len(keys) == len(set(keys)) == 12  # one per mailbox folder in Graph
    assert len(store.records) == 12


async def test_without_the_lease_concurrent_runs_duplicate_and_the_next_run_removes_the_duplicates() -> None:
    graph, store = FakeGraph(), FakeStore()
    mailboxes = [mbx(f"u{i}@x.com") for i in range(3)]
    await asyncio.gather(service(graph, store, mailboxes).reconcile(), service(graph, store, mailboxes).reconcile())
    assert len(graph.subs) == 6  # what the issue saw: two subscriptions per mailbox, every notification twice
    report = await service(graph, store, mailboxes).reconcile()
    assert report.duplicates == 3 and report.deleted == 3 and report.created == 0
    assert sorted(s["resource"] for s in graph.subs.values()) == sorted(resource_for(m.address, "inbox")
                                                                      for m in mailboxes)
    assert report.as_dict()["duplicates_removed"] == 3


async def test_a_lifecycle_resubscribe_waits_for_a_running_reconcile_and_then_finds_nothing_to_do() -> None:
    from core.domain.leases import JOB_RECONCILE
    from core.services.jobs import JobBusy
    from tests.fakes import MemoryLeaseStore

    graph, store, leases = FakeGraph(), FakeStore(), MemoryLeaseStore()
    mailboxes = [mbx("a@x.com")]
    await leases.acquire(JOB_RECONCILE, "timer@h:1:a", timedelta(minutes=5), purpose="all mailboxes")
    lifecycle = leased(graph, store, mailboxes, leases, "lifecycle")
    with pytest.raises(JobBusy, match="timer@h:1:a"):
        await lifecycle.reconcile(only_mailbox="a@x.com", wait=0)
    assert graph.creates == []  # nothing written while another run holds the reconcile


async def test_reconcile_reports_the_mailboxes_it_changed() -> None:
    graph, store = FakeGraph(), FakeStore()
    report = await service(graph, store, [mbx("a@x.com"), mbx("b@x.com")]).reconcile()
    assert report.changed == {"a@x.com", "b@x.com"} and report.full and report.started_at == NOW
    again = await service(graph, store, [mbx("a@x.com")]).reconcile()
    assert again.changed == {"b@x.com"}  # its subscription was deleted


async def test_new_subscription_records_are_written_in_transactions_with_their_sync_marks() -> None:
    graph, store, status = FakeGraph(), FakeStore(), FakeSyncStatus()
    mailboxes = [mbx(f"u{i:03d}@x.com") for i in range(250)]
    report = await service(graph, store, mailboxes, status, create_concurrency=8).reconcile()

    assert report.created == 250 and len(store.records) == 250 and not report.failed
    assert sum(store.batches) == 250 and max(store.batches) <= 100 and len(store.batches) <= 4
    assert sorted(m for m, ok, _ in status.rows if ok) == sorted(m.address for m in mailboxes)


async def test_a_buffered_record_is_written_within_the_flush_interval_while_creates_go_on() -> None:
    graph, store = FakeGraph(), FakeStore()
    release = asyncio.Event()
    original = graph.create_subscription

    async def slow_after_first(body: Mapping[str, Any]) -> dict[str, Any]:
        if graph.creates:  # the second create hangs until the test has seen the first record
            await release.wait()
        return await original(body)

    graph.create_subscription = slow_after_first  # type: ignore[method-assign]
    run = asyncio.create_task(service(graph, store, [mbx("a@x.com"), mbx("b@x.com")],
                                      create_concurrency=1).reconcile())
    for _ in range(100):
        if store.records:
            break
        await asyncio.sleep(0.05)
    assert [r.mailbox for r in store.records.values()] == ["a@x.com"]  # flushed by age, not by the run's end
    release.set()
    report = await run
    assert report.created == 2 and len(store.records) == 2


async def test_a_failed_record_write_reports_the_mailboxes_failed_not_created() -> None:
    graph, store = FakeGraph(), FakeStore()

    async def broken(records: Sequence[SubscriptionRecord]) -> None:
        raise OSError("table unavailable")

    store.put_many = broken  # type: ignore[method-assign]
    report = await service(graph, store, [mbx("a@x.com"), mbx("b@x.com")]).reconcile()
    assert report.created == 0 and len(graph.subs) == 2
    assert sorted(report.failed) == [("a@x.com", "inbox", "record: OSError"), ("b@x.com", "inbox", "record: OSError")]
    # the next run finds them in Graph but not in the table: orphans, deleted, and created again
    fresh = FakeStore()
    again = await service(graph, fresh, [mbx("a@x.com"), mbx("b@x.com")]).reconcile()
    assert again.created == 2 and again.duplicates == 2 and len(graph.subs) == 2 and len(fresh.records) == 2


async def test_renewed_expiries_are_recorded_one_transaction_per_graph_batch() -> None:
    graph, store = FakeGraph(), FakeStore()
    mailboxes = [mbx(f"u{i}@x.com") for i in range(45)]
    await service(graph, store, mailboxes).reconcile()
    for record in list(store.records.values()):
        store.records[record.id] = SubscriptionRecord(record.id, record.mailbox, record.folder, record.client_state,
                                                      record.tenant_id, record.resource, NOW + timedelta(hours=1))
    store.batches.clear()
    report = await service(graph, store, mailboxes).reconcile()
    assert report.renewed == 45 and sorted(store.batches) == [5, 20, 20]
    assert all(r.expires > NOW + timedelta(days=2) for r in store.records.values())
