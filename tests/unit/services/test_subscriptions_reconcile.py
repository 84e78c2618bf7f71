"""Subscription reconcile: the pure plan as a table of cases, and the service over fakes of our ports."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

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
    def __init__(self) -> None:
        self.subs: dict[str, dict[str, Any]] = {}
        self.batches: list[list[Mapping[str, Any]]] = []
        self.throttle_next = 0
        self.n = 0

    async def batch(self, requests: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        assert len(requests) <= 20
        self.batches.append(list(requests))
        out = []
        for r in requests:
            if self.throttle_next:
                self.throttle_next -= 1
                out.append({"id": r["id"], "status": 429, "headers": {"Retry-After": "0"}})
                continue
            if r["method"] == "POST":
                if "bad" in r["body"]["resource"]:
                    out.append({"id": r["id"], "status": 403, "body": {"error": {"code": "ErrorAccessDenied"}}})
                    continue
                self.n += 1
                sid = f"s{self.n}"
                self.subs[sid] = {"id": sid, **r["body"]}
                out.append({"id": r["id"], "status": 201, "body": self.subs[sid]})
            elif r["method"] == "PATCH":
                sid = r["url"].rsplit("/", 1)[1]
                if sid not in self.subs:
                    out.append({"id": r["id"], "status": 404, "body": {"error": {"code": "ResourceNotFound"}}})
                    continue
                self.subs[sid].update(r["body"])
                out.append({"id": r["id"], "status": 200, "body": self.subs[sid]})
            else:
                self.subs.pop(r["url"].rsplit("/", 1)[1], None)
                out.append({"id": r["id"], "status": 204})
        return out

    async def list_subscriptions(self) -> list[dict[str, Any]]:
        return list(self.subs.values())

    async def reauthorize_subscription(self, subscription_id: str) -> None:
        raise AssertionError("not used")

    async def renew_subscription(self, subscription_id: str, expires: datetime) -> dict[str, Any]:
        raise AssertionError("not used")


class FakeStore:
    def __init__(self) -> None:
        self.records: dict[str, SubscriptionRecord] = {}

    async def put(self, record: SubscriptionRecord) -> None:
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


def service(graph: FakeGraph, store: FakeStore, mailboxes: list[MailboxConfig],
            status: FakeSyncStatus | None = None) -> SubscriptionService:
    options = SubscriptionOptions(URL, URL.replace("notifications", "lifecycle"), "tid")
    return SubscriptionService(graph, store, StaticMailboxDirectory(mailboxes), options, status=status,
                               clock=lambda: NOW)


async def test_reconcile_creates_in_batches_of_20_with_secret_client_states_and_is_idempotent() -> None:
    graph, store = FakeGraph(), FakeStore()
    mailboxes = [mbx(f"u{i}@x.com") for i in range(45)]
    report = await service(graph, store, mailboxes).reconcile()

    assert report.created == 45 and not report.failed
    assert [len(b) for b in graph.batches] == [20, 20, 5]
    states = {r.client_state for r in store.records.values()}
    assert len(states) == 45 and all(len(s) >= 43 for s in states)  # >= 32 random bytes each
    body = graph.batches[0][0]["body"]
    assert body["notificationUrl"] == URL and body["lifecycleNotificationUrl"].endswith("lifecycle?code=k")
    assert body["changeType"] == "created" and body["resource"] == "users/u0@x.com/mailFolders('inbox')/messages"

    again = await service(graph, store, mailboxes).reconcile()
    assert (again.created, again.deleted, again.unchanged) == (0, 0, 45)


async def test_reconcile_records_per_mailbox_failures_and_retries_throttled_items() -> None:
    graph, store, status = FakeGraph(), FakeStore(), FakeSyncStatus()
    graph.throttle_next = 2
    report = await service(graph, store, [mbx("a@x.com"), mbx("b@x.com"), mbx("bad@x.com")], status).reconcile()
    assert report.created == 2
    assert report.failed == [("bad@x.com", "inbox", "create: HTTP 403 ErrorAccessDenied")]
    assert ("bad@x.com", False, "subscription inbox: create: HTTP 403 ErrorAccessDenied") in status.rows


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
    assert len(seen) == 3 and all(total == 45 for _, total in seen)  # one call per batch of 20 requests
    assert done == sorted(done) and done[-1] == 45
