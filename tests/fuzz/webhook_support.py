"""Shared pieces of the webhook fuzzing: the fake container, the trigger call and the invariant checker.

The checker is the test's oracle: it knows nothing about the implementation beyond the contract in
``core/services/webhook.py`` (202 / 400 / 413, 503 only when the queue is down) and judges every
enqueued item against the request body it came from.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import azure.functions as func

from core.bootstrap import Container, set_container
from core.config import Settings
from core.names import INBOUND_QUEUE, MAILBOX_SYNC_QUEUE
from core.notifications import SubscriptionInfo
from core.work_items import InboundItem, MailboxSyncItem
from emulators.common import demo
from tests.fakes import FakeSubscriptionDirectory, FakeWorkQueue

TENANT = demo.TENANT_ID
MAX_BODY = 64 * 1024  # the fuzz runs with a small limit so that oversized bodies stay cheap to generate

SUBS: tuple[SubscriptionInfo, ...] = (
    SubscriptionInfo(id="sub-alice-inbox", mailbox="alice@contoso.example", folder="inbox",
                     client_state="cs-alice-" + "a1" * 20, tenant_id=TENANT),
    SubscriptionInfo(id="sub-bob-sent", mailbox="bob@contoso.example", folder="sentitems",
                     client_state="cs-bob-é€\u2028-" + "b2" * 20, tenant_id=TENANT),
    SubscriptionInfo(id="0f8fad5b-d9cb-469f-a165-70867728950e", mailbox="support@contoso.example",
                     folder="inbox", client_state="x" * 128, tenant_id=TENANT),
)
SUBS_BY_ID: Mapping[str, SubscriptionInfo] = {s.id: s for s in SUBS}
ALL_SECRETS: tuple[str, ...] = tuple(s.client_state for s in SUBS)


class FuzzContainer(Container):
    def __init__(self, *, queue_down: bool = False, max_body: int = MAX_BODY) -> None:
        super().__init__(Settings(env={"GRAPH_TENANT_ID": TENANT, "WEBHOOK_MAX_BODY_BYTES": str(max_body)}))
        queue = FakeWorkQueue()
        if queue_down:
            queue.fail_with = ConnectionError("queue service unavailable")
        self.__dict__["work_queue"] = queue
        self.__dict__["subscription_directory"] = FakeSubscriptionDirectory(SUBS)

    @property
    def queue(self) -> FakeWorkQueue:
        return self.__dict__["work_queue"]  # type: ignore[no-any-return]


def indexed_functions() -> dict[str, Any]:
    """function_app's functions by name. ``get_functions()`` may run only once per app object (azure-functions
    1.x), so the index is cached on the app under the attribute tests/function_index.py uses too."""
    import function_app

    app = function_app.app
    cached: dict[str, Any] | None = getattr(app, "_test_function_index", None)
    if cached is None:
        cached = {f.get_function_name(): f for f in app.get_functions()}
        app._test_function_index = cached  # type: ignore[attr-defined]
    return cached


ROUTES = {"graph_notifications": "graph/notifications", "graph_lifecycle": "graph/lifecycle"}


@dataclass
class Outcome:
    status: int
    body: bytes
    mimetype: str | None
    enqueued: dict[str, list[str]] = field(default_factory=dict)


def call_trigger(name: str, body: bytes, *, params: Mapping[str, str] | None = None, queue_down: bool = False,
                 max_body: int = MAX_BODY) -> Outcome:
    """Run one HTTP trigger the way the worker does (get_user_function) with fresh fake ports."""
    container = FuzzContainer(queue_down=queue_down, max_body=max_body)
    set_container(container)
    try:
        req = func.HttpRequest("POST", f"http://127.0.0.1/api/{ROUTES[name]}", headers={"content-type":
                               "application/json"}, params=dict(params or {}), body=body)
        resp = asyncio.run(indexed_functions()[name].get_user_function()(req))
    finally:
        set_container(None)
    return Outcome(resp.status_code, resp.get_body(), resp.mimetype, {k: list(v) for k, v in
                                                                     container.queue.messages.items() if v})


def _lenient_items(body: bytes) -> list[Any]:
    """The body's notifications as any JSON parser would see them (used only to find evidence)."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return []
    value = data.get("value") if isinstance(data, dict) else None
    return value if isinstance(value, list) else []


def _evidence(items: Sequence[Any], sub: SubscriptionInfo, message_id: str | None, lifecycle_event: str | None) -> bool:
    for it in items:
        if not isinstance(it, dict) or it.get("subscriptionId") != sub.id:
            continue
        if it.get("clientState") != sub.client_state:
            continue
        tenant = it.get("tenantId")
        if not isinstance(tenant, str) or tenant.lower() != TENANT.lower():
            continue
        if message_id is not None:
            rd = it.get("resourceData")
            if isinstance(rd, dict) and rd.get("id") == message_id and it.get("changeType") in ("created", "updated"):
                return True
        elif it.get("lifecycleEvent") == lifecycle_event:
            return True
    return False


def check_invariants(name: str, body: bytes, outcome: Outcome, *, queue_down: bool,
                     handshake: str | None = None) -> None:
    """What must hold for ANY request body (the properties of issue 10 "Fuzzing")."""
    status = outcome.status
    if handshake is not None:
        assert status in (200, 400), status
        assert outcome.enqueued == {}
        if status == 200:
            assert outcome.mimetype == "text/plain" and outcome.body == handshake.encode("utf-8")
        return
    for secret in ALL_SECRETS:  # never leak a subscription secret back to the caller
        assert secret.encode("utf-8") not in outcome.body, "a clientState was echoed in a response"
    if queue_down:
        assert status in (202, 400, 413, 503), status
    else:
        assert status in (202, 400, 413), status
    if status != 202:
        assert outcome.enqueued == {}, "nothing may be enqueued for a refused body"
        if status in (400, 413, 503):
            error = json.loads(outcome.body)
            assert isinstance(error.get("error"), str) and error["error"]
    if status == 413:
        assert len(body) > MAX_BODY
    items = _lenient_items(body)
    queue = INBOUND_QUEUE if name == "graph_notifications" else MAILBOX_SYNC_QUEUE
    assert set(outcome.enqueued) <= {queue}, f"enqueued on an unexpected queue: {list(outcome.enqueued)}"
    seen: set[tuple[str, str]] = set()
    for raw in outcome.enqueued.get(queue, []):
        if name == "graph_notifications":
            item = InboundItem.from_json(raw)  # raises InvalidWorkItem if the service enqueued garbage
            sub = SUBS_BY_ID.get(item.subscription_id)
            assert sub is not None, f"enqueued an item for an unknown subscription {item.subscription_id!r}"
            assert (item.mailbox, item.folder, item.source) == (sub.mailbox, sub.folder, "notification")
            assert item.change_type in ("created", "updated")
            assert (item.mailbox, item.message_id) not in seen, "the same message was enqueued twice in one POST"
            seen.add((item.mailbox, item.message_id))
            assert _evidence(items, sub, item.message_id, None), "enqueued without a matching, authentic notification"
        else:
            sync = MailboxSyncItem.from_json(raw)
            sub = SUBS_BY_ID.get(sync.subscription_id)
            assert sub is not None, f"enqueued a sync for an unknown subscription {sync.subscription_id!r}"
            assert sync.mailbox == sub.mailbox
            assert sync.reason in ("missed", "subscriptionRemoved", "reauthorizationRequired")
            assert _evidence(items, sub, None, sync.reason), "enqueued without a matching, authentic notification"


def expected_inbound(items: Sequence[Any]) -> list[tuple[str, str]]:
    """Independent oracle for a well-formed collection: which (mailbox, message id) pairs must be enqueued."""
    out: list[tuple[str, str]] = []
    for it in items:
        if not isinstance(it, dict):
            continue
        sid = it.get("subscriptionId")
        sub = SUBS_BY_ID.get(sid) if isinstance(sid, str) else None
        if sub is None or not isinstance(it.get("clientState"), str) or it["clientState"] != sub.client_state:
            continue
        tenant = it.get("tenantId")
        if not isinstance(tenant, str) or tenant.lower() != TENANT.lower():
            continue
        if not isinstance(it.get("changeType"), str) or it["changeType"] not in ("created", "updated"):
            continue
        rd = it.get("resourceData")
        mid = rd.get("id") if isinstance(rd, dict) else None
        if not isinstance(mid, str) or not mid or len(mid) > 1024:
            continue
        if (sub.mailbox, mid) not in out:
            out.append((sub.mailbox, mid))
    return out


def expected_lifecycle(items: Sequence[Any]) -> list[tuple[str, str]]:
    """One sync item per authentic (subscription, event): the same event twice in one POST is one item."""
    out: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for it in items:
        if not isinstance(it, dict):
            continue
        sid = it.get("subscriptionId")
        sub = SUBS_BY_ID.get(sid) if isinstance(sid, str) else None
        if sub is None or not isinstance(it.get("clientState"), str) or it["clientState"] != sub.client_state:
            continue
        tenant = it.get("tenantId")
        if not isinstance(tenant, str) or tenant.lower() != TENANT.lower():
            continue
        event = it.get("lifecycleEvent")
        if isinstance(event, str) and event in ("missed", "subscriptionRemoved", "reauthorizationRequired") \
                and (sub.id, event) not in seen:
            seen.add((sub.id, event))
            out.append((sub.mailbox, event))
    return out
