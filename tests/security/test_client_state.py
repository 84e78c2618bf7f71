"""The webhook's clientState comparison is constant-time (issue 10).

Not measured by timing (noisy, and speed belongs to the benchmark): the code path is inspected by replacing
``hmac.compare_digest`` with a spy. The decision must come from compare_digest — a spy that always says "equal"
makes a wrong clientState pass, one that always says "different" makes the right one fail — and a comparison is
spent for unknown subscriptions and wrong types too, so neither leaks through timing.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from core import notifications
from core.notifications import Rejection, SubscriptionInfo, check_change_notification, check_lifecycle_notification
from core.services.webhook import handle_change_notifications
from core.work_items import InboundItem, MailboxSyncItem
from tests.fakes import FakeSubscriptionDirectory, FakeWorkQueue

TENANT = "c0ffee00-0000-4000-8000-000000000001"
SECRET = "cs-" + "s3cr3t" * 8
SUB = SubscriptionInfo(id="sub-1", mailbox="alice@contoso.example", folder="inbox", client_state=SECRET,
                       tenant_id=TENANT)
LOOKUP: Callable[[str], SubscriptionInfo | None] = {SUB.id: SUB}.get


def item(client_state: Any = SECRET, sub_id: str = SUB.id, **extra: Any) -> dict[str, Any]:
    return {"subscriptionId": sub_id, "clientState": client_state, "tenantId": TENANT, "changeType": "created",
            "resourceData": {"id": "M1"}, "lifecycleEvent": "missed", **extra}


class Spy:
    def __init__(self, verdict: bool | None = None) -> None:
        self.calls: list[tuple[Any, Any]] = []
        self.verdict = verdict
        self.real = hmac.compare_digest

    def __call__(self, a: Any, b: Any) -> bool:
        self.calls.append((a, b))
        real = self.real(a, b)
        return real if self.verdict is None else self.verdict


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spy]:
    s = Spy()
    # core.notifications calls hmac.compare_digest through the module attribute: patch it there.
    monkeypatch.setattr(notifications.hmac, "compare_digest", s)
    yield s


def test_matching_client_state_goes_through_compare_digest(spy: Spy) -> None:
    assert isinstance(check_change_notification(item(), LOOKUP, TENANT), InboundItem)
    assert len(spy.calls) == 1
    a, b = spy.calls[0]
    assert isinstance(a, bytes) and isinstance(b, bytes)  # bytes: compare_digest is constant-time for these
    assert SECRET.encode() in (a, b)


@pytest.mark.parametrize("wrong", ["", "x", SECRET[:-1], SECRET + "x", SECRET.upper(), "é" * 10, SECRET[::-1]])
def test_wrong_client_state_goes_through_compare_digest(spy: Spy, wrong: str) -> None:
    outcome = check_change_notification(item(wrong), LOOKUP, TENANT)
    assert isinstance(outcome, Rejection) and outcome.reason == "clientState mismatch"
    assert len(spy.calls) == 1 and SECRET.encode() in spy.calls[0]


@pytest.mark.parametrize("wrong_type", [None, 0, 1.5, True, [SECRET], {"v": SECRET}])
def test_wrong_types_still_spend_a_comparison(spy: Spy, wrong_type: Any) -> None:
    outcome = check_change_notification(item(wrong_type), LOOKUP, TENANT)
    assert isinstance(outcome, Rejection) and outcome.reason == "clientState mismatch"
    assert len(spy.calls) == 1


def test_unknown_subscription_still_spends_a_comparison(spy: Spy) -> None:
    outcome = check_change_notification(item(sub_id="someone-elses"), LOOKUP, TENANT)
    assert isinstance(outcome, Rejection) and outcome.reason == "unknown subscription"
    assert len(spy.calls) == 1
    assert spy.calls[0][0] != SECRET.encode()  # the expected side is a dummy: no stored secret is used


def test_the_verdict_comes_from_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    always_equal = Spy(verdict=True)
    monkeypatch.setattr(notifications.hmac, "compare_digest", always_equal)
    assert isinstance(check_change_notification(item("definitely wrong"), LOOKUP, TENANT), InboundItem)
    assert isinstance(check_lifecycle_notification(item("definitely wrong"), LOOKUP, TENANT), MailboxSyncItem)
    never_equal = Spy(verdict=False)
    monkeypatch.setattr(notifications.hmac, "compare_digest", never_equal)
    assert isinstance(check_change_notification(item(), LOOKUP, TENANT), Rejection)
    assert isinstance(check_lifecycle_notification(item(), LOOKUP, TENANT), Rejection)


def test_the_webhook_service_uses_the_same_path(spy: Spy) -> None:
    body = json.dumps({"value": [item(), item("wrong"), item(sub_id="nope")]}).encode()
    queue = FakeWorkQueue()
    result = asyncio.run(handle_change_notifications(body, directory=FakeSubscriptionDirectory([SUB]), queue=queue,
                                                     tenant_id=TENANT, max_bytes=1 << 20))
    assert result.status == 202 and result.accepted == 1
    assert len(spy.calls) == 3


def test_no_plain_equality_on_the_secret_in_the_source() -> None:
    """Belt and braces: nothing in core.notifications compares client_state with == / !=."""
    import inspect
    import re

    source = inspect.getsource(notifications)
    assert not re.search(r"client_state\s*[!=]=|[!=]=\s*\w*\.?client_state", source)
    assert "compare_digest" in source
