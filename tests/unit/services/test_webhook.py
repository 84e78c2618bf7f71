import json

import pytest

from core.domain.hot_mailboxes import HotMailboxes
from core.names import INBOUND_QUEUE, MAILBOX_SYNC_QUEUE
from core.notifications import SubscriptionInfo, constant_time_equals
from core.services.webhook import (
    WebhookResult,
    handle_change_notifications,
    handle_lifecycle_notifications,
    validation_response,
)
from core.work_items import InboundItem, MailboxSyncItem
from tests.fakes import FakeSubscriptionDirectory, FakeWorkQueue

TENANT = "84bd8158-6d4d-4958-8b9f-9d6445542f95"
SUB = SubscriptionInfo(id="sub-1", mailbox="alice@contoso.example", folder="inbox",
                       client_state="s3cr3t-" + "x" * 40, tenant_id=TENANT)


def note(**over: object) -> dict:
    base = {
        "id": "lsgTZMr9KwAAA", "subscriptionId": SUB.id, "subscriptionExpirationDateTime": "2030-03-19T22:11:09.952Z",
        "clientState": SUB.client_state, "changeType": "created",
        "resource": "Users/622eaaff/Messages/AAMkAGUwNjQ4ZjIxAAA=", "tenantId": TENANT,
        "resourceData": {"@odata.type": "#Microsoft.Graph.Message", "@odata.id": "Users/622eaaff/Messages/AAMk=",
                         "@odata.etag": 'W/"CQAAABYAAADk"', "id": "AAMkAGUwNjQ4ZjIxAAA="},
    }
    base.update(over)
    return base


async def run(items: object, *, queue: FakeWorkQueue | None = None, max_bytes: int = 1 << 20):
    q = queue or FakeWorkQueue()
    body = items if isinstance(items, bytes) else json.dumps(items).encode()
    res = await handle_change_notifications(body, directory=FakeSubscriptionDirectory([SUB]), queue=q,
                                            tenant_id=TENANT, max_bytes=max_bytes)
    return res, q


async def test_valid_notification_becomes_inbound_item() -> None:
    res, q = await run({"value": [note()]})
    assert res.status == 202 and res.accepted == 1
    item = InboundItem.from_json(q.messages[INBOUND_QUEUE][0])
    assert item.mailbox == SUB.mailbox and item.message_id == "AAMkAGUwNjQ4ZjIxAAA=" and item.source == "notification"


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"clientState": "wrong"}, "clientState mismatch"),
        ({"clientState": None}, "clientState mismatch"),
        ({"clientState": 12}, "clientState mismatch"),
        ({"subscriptionId": "other"}, "unknown subscription"),
        ({"subscriptionId": None}, "missing subscriptionId"),
        ({"tenantId": "00000000-0000-0000-0000-000000000000"}, "tenant mismatch"),
        ({"changeType": "exploded"}, "bad changeType"),
        ({"resourceData": {}}, "missing resource id"),
        ({"resourceData": "x"}, "missing resource id"),
    ],
)
async def test_invalid_items_are_rejected_and_never_enqueued(override: dict, reason: str) -> None:
    res, q = await run({"value": [note(**override)]})
    assert res.status == 202
    assert [r.reason for r in res.rejected] == [reason]
    assert not q.messages[INBOUND_QUEUE]


async def test_mixed_batch_enqueues_only_valid_and_dedupes_created_updated() -> None:
    items = [note(), note(changeType="updated"), note(clientState="bad"), "junk",
             note(changeType="deleted", resourceData={"id": "gone"})]
    res, q = await run({"value": items})
    assert res.accepted == 1 and res.ignored == 2 and len(res.rejected) == 2
    assert len(q.messages[INBOUND_QUEUE]) == 1


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'{"value": 3}', b'{"value": [NaN]}', b"\xff\xfe"])
async def test_garbage_is_400(body: bytes) -> None:
    res, q = await run(body)
    assert res.status == 400 and not q.messages


async def test_oversize_is_413() -> None:
    res, _ = await run({"value": [note()] * 50}, max_bytes=100)
    assert res.status == 413


async def test_queue_down_is_503_so_graph_redelivers() -> None:
    q = FakeWorkQueue()
    q.fail_with = ConnectionError("down")
    res, _ = await run({"value": [note()]}, queue=q)
    assert res.status == 503


async def test_lifecycle_missed_becomes_sync_item() -> None:
    q = FakeWorkQueue()
    item = note(lifecycleEvent="missed")
    del item["changeType"]
    res = await handle_lifecycle_notifications(json.dumps({"value": [item]}).encode(),
                                               directory=FakeSubscriptionDirectory([SUB]), queue=q,
                                               tenant_id=TENANT, max_bytes=1 << 20)
    assert res.status == 202
    sync = MailboxSyncItem.from_json(q.messages[MAILBOX_SYNC_QUEUE][0])
    assert sync.reason == "missed" and sync.mailbox == SUB.mailbox and sync.folder == SUB.folder


async def test_the_same_lifecycle_event_twice_in_one_post_is_one_sync_item() -> None:
    q = FakeWorkQueue()
    items = []
    for event in ("reauthorizationRequired", "reauthorizationRequired", "missed"):
        item = note(lifecycleEvent=event)
        del item["changeType"]
        items.append(item)
    res = await handle_lifecycle_notifications(json.dumps({"value": items}).encode(),
                                               directory=FakeSubscriptionDirectory([SUB]), queue=q,
                                               tenant_id=TENANT, max_bytes=1 << 20)
    assert res.status == 202 and res.accepted == 2 and res.ignored == 1
    reasons = [MailboxSyncItem.from_json(m).reason for m in q.messages[MAILBOX_SYNC_QUEUE]]
    assert reasons == ["reauthorizationRequired", "missed"]


def test_validation_token_echo() -> None:
    assert validation_response("Validation: Testing client application reachability for subscription Request-Id: "
                               "a<b>&c") == ("Validation: Testing client application reachability for subscription "
                                             "Request-Id: a<b>&c")
    assert validation_response("") is None
    assert validation_response("x" * 10_000) is None


def test_constant_time_equals() -> None:
    assert constant_time_equals("abc", "abc")
    assert not constant_time_equals("abc", "abd")
    assert not constant_time_equals("abc", None)
    assert not constant_time_equals("abc", "\ud800")  # lone surrogate must not crash


# -- hot mailboxes ---------------------------------------------------------------------------------------------


def burst(count: int, start: int = 0) -> dict:
    return {"value": [note(resourceData={"id": f"M{n}"}, resource=f"Users/622eaaff/Messages/M{n}")
                      for n in range(start, start + count)]}


async def run_hot(items: dict, hot: HotMailboxes, now: float, queue: FakeWorkQueue) -> WebhookResult:
    return await handle_change_notifications(json.dumps(items).encode(), directory=FakeSubscriptionDirectory([SUB]),
                                             queue=queue, tenant_id=TENANT, max_bytes=1 << 20, hot=hot,
                                             clock=lambda: now)


async def test_a_hot_mailbox_gets_one_delayed_delta_round_instead_of_a_fetch_per_notification() -> None:

    hot, q = HotMailboxes(threshold=5, delay_s=10), FakeWorkQueue()
    res = await run_hot(burst(12), hot, 100.0, q)
    assert res.status == 202 and res.accepted == 5 and res.delta_requests == 7
    assert [InboundItem.from_json(m).message_id for m in q.messages[INBOUND_QUEUE]] == [f"M{n}" for n in range(5)]
    (sync,) = [MailboxSyncItem.from_json(m) for m in q.messages[MAILBOX_SYNC_QUEUE]]
    assert (sync.mailbox, sync.reason, sync.folder, sync.subscription_id) == (SUB.mailbox, "hot", "inbox", SUB.id)
    # Notifications until the round becomes visible are covered by it; after that a new round is asked for.
    await run_hot(burst(3, start=20), hot, 105.0, q)
    assert len(q.messages[INBOUND_QUEUE]) == 5 and len(q.messages[MAILBOX_SYNC_QUEUE]) == 1
    await run_hot(burst(1, start=30), hot, 111.0, q)
    assert len(q.messages[MAILBOX_SYNC_QUEUE]) == 2


async def test_a_failed_delta_enqueue_answers_503_and_the_redelivery_asks_again() -> None:

    class FailingSyncQueue(FakeWorkQueue):
        async def send_many(self, queue: str, messages, *, delay_seconds: int = 0) -> None:  # type: ignore[no-untyped-def]
            if queue == MAILBOX_SYNC_QUEUE and self.fail_with is not None:
                raise self.fail_with
            await super().send_many(queue, messages, delay_seconds=delay_seconds)

    hot, q = HotMailboxes(threshold=1, delay_s=10), FailingSyncQueue()
    q.fail_with = ConnectionError("queue down")
    assert (await run_hot(burst(3), hot, 0.0, q)).status == 503  # Graph redelivers
    q.fail_with = None
    res = await run_hot(burst(3), hot, 1.0, q)
    assert res.status == 202 and len(q.messages[MAILBOX_SYNC_QUEUE]) == 1
