"""Webhook service: Graph notifications in, work items out. Never calls Graph or Dataverse.

Returns the HTTP status the trigger must answer with: 202 when everything valid was enqueued (even
if some items were rejected: Graph must not redeliver forged items), 400 for a body that is not a
notification collection, 413 when too large, 503 when the queue is unavailable so Graph redelivers.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from core.domain.hot_mailboxes import HotMailboxes
from core.names import INBOUND_QUEUE, MAILBOX_SYNC_QUEUE
from core.notifications import (
    BadNotificationPayload,
    Ignored,
    Rejection,
    check_change_notification,
    check_lifecycle_notification,
    parse_notification_body,
)
from core.ports import SubscriptionDirectory, WorkQueue
from core.work_items import InboundItem, MailboxSyncItem

log = logging.getLogger("emailrouter.webhook")

MAX_VALIDATION_TOKEN = 4096


@dataclass
class WebhookResult:
    status: int
    accepted: int = 0
    ignored: int = 0
    delta_requests: int = 0  # hot mailboxes: notifications turned into (or covered by) one delta round
    rejected: list[Rejection] = field(default_factory=list)
    error: str = ""

    @property
    def rejected_by_reason(self) -> dict[str, int]:
        return dict(Counter(r.reason for r in self.rejected))


def validation_response(token: str) -> str | None:
    """The plain-text echo for Graph's validation handshake (already URL-decoded by the host)."""
    if not token or len(token) > MAX_VALIDATION_TOKEN:
        return None
    return token


async def _lookup_all(items: list[object], directory: SubscriptionDirectory) -> dict[str, object]:
    ids = {
        i["subscriptionId"]
        for i in items
        if isinstance(i, dict) and isinstance(i.get("subscriptionId"), str) and 0 < len(i["subscriptionId"]) <= 1024
    }
    return dict(await directory.get_many(ids)) if ids else {}


def _log_rejections(kind: str, rejected: list[Rejection]) -> None:
    for r in rejected:
        # Subscription id and reason only: the item may be forged and carries nothing worth logging.
        log.warning("%s notification rejected: subscription=%s reason=%s", kind, r.subscription_id or "-", r.reason)


async def _checked_items(
    kind: str, body: bytes, directory: SubscriptionDirectory, max_bytes: int
) -> tuple[list[object], dict[str, object]] | WebhookResult:
    """Size and JSON checks, then one lookup of every subscription the POST names (or the error result)."""
    if len(body) > max_bytes:
        return WebhookResult(413, error=f"body larger than {max_bytes} bytes")
    try:
        items = parse_notification_body(body, max_bytes=max_bytes)
    except BadNotificationPayload as exc:
        log.warning("%s notification body rejected: %s", kind, exc)
        return WebhookResult(400, error=str(exc))
    return items, await _lookup_all(items, directory)


async def _enqueue(kind: str, queue: WorkQueue, name: str, work: list[InboundItem] | list[MailboxSyncItem],
                   result: WebhookResult) -> WebhookResult:
    _log_rejections(kind, result.rejected)
    if work:
        try:
            await queue.send_many(name, [w.to_json() for w in work])
        except Exception as exc:  # the queue is down: 5xx so Graph redelivers; nothing is lost
            log.error("enqueue of %d %s items failed: %s", len(work), kind, exc.__class__.__name__)
            return WebhookResult(503, rejected=result.rejected, error="queue unavailable")
    result.accepted = len(work)
    return result


async def handle_change_notifications(
    body: bytes, *, directory: SubscriptionDirectory, queue: WorkQueue, tenant_id: str, max_bytes: int,
    hot: HotMailboxes | None = None, clock: Callable[[], float] = time.monotonic,
) -> WebhookResult:
    """Valid notifications become inbound items; for a hot (mailbox, folder) (``hot``, see
    core/domain/hot_mailboxes.py) they become one delayed delta request per coalescing window instead."""
    checked = await _checked_items("change", body, directory, max_bytes)
    if isinstance(checked, WebhookResult):
        return checked
    items, subs = checked
    result = WebhookResult(202)
    work: list[InboundItem] = []
    deltas: dict[tuple[str, str], MailboxSyncItem] = {}
    seen: set[tuple[str, str]] = set()
    now = clock()
    for item in items:
        outcome = check_change_notification(item, subs.get, tenant_id)  # type: ignore[arg-type]
        if isinstance(outcome, Rejection):
            result.rejected.append(outcome)
        elif isinstance(outcome, Ignored):
            result.ignored += 1
        elif (outcome.mailbox, outcome.message_id) in seen:
            result.ignored += 1  # Graph often sends created+updated together: one fetch is enough
        else:
            seen.add((outcome.mailbox, outcome.message_id))
            route = hot.route(outcome.mailbox, outcome.folder, now) if hot is not None else "fetch"
            if route == "fetch":
                work.append(outcome)
                continue
            result.delta_requests += 1
            key = HotMailboxes.key(outcome.mailbox, outcome.folder)
            if route == "delta" and key not in deltas:
                deltas[key] = MailboxSyncItem(outcome.mailbox, "hot", subscription_id=outcome.subscription_id,
                                              folder=outcome.folder)
    result = await _enqueue("change", queue, INBOUND_QUEUE, work, result)
    if deltas and result.status == 202 and hot is not None:
        try:
            await queue.send_many(MAILBOX_SYNC_QUEUE, [d.to_json() for d in deltas.values()],
                                  delay_seconds=max(1, round(hot.delay_s)))
        except Exception as exc:  # 5xx: Graph redelivers; nothing was marked covered
            log.error("enqueue of %d hot-mailbox delta request(s) failed: %s", len(deltas), exc.__class__.__name__)
            return WebhookResult(503, rejected=result.rejected, error="queue unavailable")
        for d in deltas.values():
            hot.scheduled(d.mailbox, d.folder, now)
            log.info("hot mailbox: notifications for a %s folder go to a delta round in %d s", d.folder or "watched",
                     round(hot.delay_s))
    return result


async def handle_lifecycle_notifications(
    body: bytes, *, directory: SubscriptionDirectory, queue: WorkQueue, tenant_id: str, max_bytes: int
) -> WebhookResult:
    checked = await _checked_items("lifecycle", body, directory, max_bytes)
    if isinstance(checked, WebhookResult):
        return checked
    items, subs = checked
    result = WebhookResult(202)
    work: list[MailboxSyncItem] = []
    seen: set[tuple[str, str]] = set()
    for item in items:
        outcome = check_lifecycle_notification(item, subs.get, tenant_id)  # type: ignore[arg-type]
        if isinstance(outcome, Rejection):
            result.rejected.append(outcome)
        elif (outcome.subscription_id, outcome.reason) in seen:
            result.ignored += 1  # the same event twice in one POST: one PATCH / delta round is enough
        else:
            seen.add((outcome.subscription_id, outcome.reason))
            log.info("lifecycle event %s for subscription %s", outcome.reason, outcome.subscription_id)
            work.append(outcome)
    return await _enqueue("lifecycle", queue, MAILBOX_SYNC_QUEUE, work, result)
