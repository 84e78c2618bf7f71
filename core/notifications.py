"""Pure checks of Microsoft Graph change and lifecycle notifications (no I/O).

The webhook trusts nothing in a notification body: each item must name one of *our* subscriptions,
carry that subscription's clientState (compared in constant time) and our tenant id. Valid items
become work items; everything else is a counted, logged rejection with a reason. The mailbox comes
from our subscription record, never from the notification's ``resource`` (Graph may send it with a
user GUID and capitalised segments, reference/graph.md §3.1).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .work_items import InboundItem, MailboxSyncItem

__all__ = [
    "MAX_ITEMS_PER_POST",
    "BadNotificationPayload",
    "Ignored",
    "Rejection",
    "SubscriptionInfo",
    "check_change_notification",
    "check_lifecycle_notification",
    "constant_time_equals",
    "parse_notification_body",
]

MAX_ITEMS_PER_POST = 1000  # Graph batches notifications; far more than this in one POST is not Graph
_MAX_ID = 1024
_CHANGE_TYPES = frozenset({"created", "updated", "deleted"})
_LIFECYCLE_EVENTS = frozenset({"missed", "subscriptionRemoved", "reauthorizationRequired"})


class BadNotificationPayload(ValueError):
    """The body is not a Graph notification collection at all (-> 400)."""


@dataclass(frozen=True)
class SubscriptionInfo:
    """What we stored when we created a subscription."""

    id: str
    mailbox: str
    folder: str
    client_state: str = field(repr=False)
    tenant_id: str


@dataclass(frozen=True)
class Rejection:
    subscription_id: str
    reason: Literal[
        "not an object",
        "missing subscriptionId",
        "unknown subscription",
        "clientState mismatch",
        "tenant mismatch",
        "bad changeType",
        "missing resource id",
        "bad lifecycleEvent",
    ]


@dataclass(frozen=True)
class Ignored:
    """A valid notification we deliberately do nothing with (e.g. a deletion: CRM keeps its copy)."""

    subscription_id: str
    reason: str


def constant_time_equals(expected: str, received: object) -> bool:
    """Compare secrets without leaking their length-prefix through timing (hmac.compare_digest)."""
    if not isinstance(received, str):
        # Still spend a comparison so wrong types take as long as wrong values.
        hmac.compare_digest(expected.encode(), b"")
        return False
    return hmac.compare_digest(expected.encode("utf-8"), received.encode("utf-8", "surrogatepass"))


def _reject_constant(value: str) -> Any:
    raise ValueError(f"invalid JSON constant {value}")


def parse_notification_body(body: bytes, *, max_bytes: int) -> list[Any]:
    """Strictly parse a notification POST body into its ``value`` list.

    Raises ``BadNotificationPayload`` for anything that is not ``{"value": [...]}`` JSON. Size is
    checked by the caller first (413), but checked here again so the function is safe alone.
    """
    if len(body) > max_bytes:
        raise BadNotificationPayload(f"body larger than {max_bytes} bytes")
    try:
        text = body.decode("utf-8")
        data = json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadNotificationPayload(f"not JSON: {exc.__class__.__name__}") from None
    if not isinstance(data, dict) or not isinstance(data.get("value"), list):
        raise BadNotificationPayload("expected an object with a 'value' array")
    items: list[Any] = data["value"]
    if len(items) > MAX_ITEMS_PER_POST:
        raise BadNotificationPayload(f"more than {MAX_ITEMS_PER_POST} notifications in one POST")
    return items


def _common_checks(
    item: Any, lookup: Callable[[str], SubscriptionInfo | None], tenant_id: str
) -> tuple[SubscriptionInfo | None, Rejection | None]:
    if not isinstance(item, dict):
        return None, Rejection("", "not an object")
    sub_id = item.get("subscriptionId")
    if not isinstance(sub_id, str) or not sub_id or len(sub_id) > _MAX_ID:
        return None, Rejection("", "missing subscriptionId")
    sub = lookup(sub_id)
    if sub is None:
        # Still compare something: an attacker should not learn which ids exist from timing.
        constant_time_equals("x" * 32, item.get("clientState"))
        return None, Rejection(sub_id, "unknown subscription")
    if not constant_time_equals(sub.client_state, item.get("clientState")):
        return None, Rejection(sub_id, "clientState mismatch")
    tenant = item.get("tenantId")
    if not isinstance(tenant, str) or tenant.lower() != tenant_id.lower():
        return None, Rejection(sub_id, "tenant mismatch")
    return sub, None


def check_change_notification(
    item: Any, lookup: Callable[[str], SubscriptionInfo | None], tenant_id: str
) -> InboundItem | Rejection | Ignored:
    """One item of a change-notification POST -> an inbound work item, a rejection or an ignore."""
    sub, rejection = _common_checks(item, lookup, tenant_id)
    if rejection is not None:
        return rejection
    assert sub is not None
    change = item.get("changeType")
    if not isinstance(change, str) or change not in _CHANGE_TYPES:
        return Rejection(sub.id, "bad changeType")
    resource_data = item.get("resourceData")
    message_id = resource_data.get("id") if isinstance(resource_data, Mapping) else None
    if not isinstance(message_id, str) or not message_id or len(message_id) > _MAX_ID:
        return Rejection(sub.id, "missing resource id")
    if change == "deleted":
        return Ignored(sub.id, "message deleted in Exchange; the CRM email is kept")
    return InboundItem(
        mailbox=sub.mailbox,
        message_id=message_id,
        source="notification",
        folder=sub.folder,
        subscription_id=sub.id,
        change_type=change,
    )


def check_lifecycle_notification(
    item: Any, lookup: Callable[[str], SubscriptionInfo | None], tenant_id: str
) -> MailboxSyncItem | Rejection:
    """One lifecycle notification -> a mailbox sync work item (missed/removed/reauthorize) or a rejection."""
    sub, rejection = _common_checks(item, lookup, tenant_id)
    if rejection is not None:
        return rejection
    assert sub is not None
    event = item.get("lifecycleEvent")
    if not isinstance(event, str) or event not in _LIFECYCLE_EVENTS:
        return Rejection(sub.id, "bad lifecycleEvent")
    return MailboxSyncItem(mailbox=sub.mailbox, reason=event, subscription_id=sub.id,  # type: ignore[arg-type]
                           folder=sub.folder)
