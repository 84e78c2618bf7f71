"""The queue-item port of the inbound pipeline (``QueueItemGateway``) and its Dataverse implementation.

Writes are ``POST queueitems`` with the navigation names queueitem.md declares for its lookups: ``objectid_email``
(relationship ``Email_QueueItem``) and ``queueid`` (``queue_entries``), and a client-chosen ``queueitemid``
(writable on create) so that a repeat is a duplicate key: 412 ``0x80040237`` = the item is already there. All the
items of one email go in one ``$batch`` with ``odata.continue-on-error``: one refused item (an inactive queue, a
missing privilege) does not hold back the others, and never the email, which is already written.

Why not ``AddToQueue``: it "moves" a record from a source queue to a destination queue (AddToQueueRequest), has no
client-chosen id, and its behaviour when the record already sits in the destination queue is not documented; the
plain create with a deterministic id is idempotent by construction.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

from core.adapters.dataverse import DataverseError, DuplicateRecordError, NotFoundError, map_error
from core.adapters.odata import BatchRequest, eq
from core.domain.queue_items import QueueItemPlan

if TYPE_CHECKING:
    from core.adapters.dataverse import DataverseClient

__all__ = ["DataverseQueueItems", "QueueItemGateway", "QueueItemResult", "TrackedEmailQueues"]

log = logging.getLogger("emailrouter.inbound.queueitems")

NAV_OBJECT_EMAIL: Final = "objectid_email"  # queueitem.md: Email_QueueItem, ReferencingEntityNavigationPropertyName
NAV_QUEUE: Final = "queueid"  # queueitem.md: queue_entries


@dataclass(frozen=True)
class TrackedEmailQueues:
    """What CRM holds for an email that was already tracked: the mailbox that received it (the router binds its
    own mailbox id) and the queues that already have an item for it."""

    receiving_mailbox_id: uuid.UUID | None
    queues: frozenset[uuid.UUID]


@dataclass
class QueueItemResult:
    created: list[uuid.UUID] = field(default_factory=list)  # queue ids
    existing: list[uuid.UUID] = field(default_factory=list)
    refused: dict[uuid.UUID, str] = field(default_factory=dict)  # queue id -> reason (logged, recorded)


class QueueItemGateway(Protocol):
    async def tracked_email_queues(self, email_id: uuid.UUID) -> TrackedEmailQueues: ...

    async def create_queue_items(self, items: Sequence[QueueItemPlan]) -> QueueItemResult:
        """Create the items (idempotent). Transient failures raise (the caller retries the whole message);
        permanent refusals of single items are returned in ``refused``."""
        ...


def _uuid(value: object) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value)) if value else None
    except ValueError:
        return None


def queue_item_body(item: QueueItemPlan) -> dict[str, Any]:
    return {
        "queueitemid": str(item.queue_item_id),
        f"{NAV_OBJECT_EMAIL}@odata.bind": f"/emails({item.email_id})",
        f"{NAV_QUEUE}@odata.bind": item.queue.bind_path,
    }


class DataverseQueueItems:
    """:class:`QueueItemGateway` over :class:`core.adapters.dataverse.DataverseClient`."""

    def __init__(self, client: DataverseClient) -> None:
        self._client = client

    async def tracked_email_queues(self, email_id: uuid.UUID) -> TrackedEmailQueues:
        email = await self._client.get("emails", email_id, select=["activityid", "_receivingmailboxid_value"])
        queues: set[uuid.UUID] = set()
        async for row in self._client.list("queueitems", select=["queueitemid", "_queueid_value"],
                                           filter=eq("_objectid_value", email_id)):
            queue_id = _uuid(row.get("_queueid_value"))
            if queue_id is not None:
                queues.add(queue_id)
        return TrackedEmailQueues(_uuid(email.get("_receivingmailboxid_value")), frozenset(queues))

    async def create_queue_items(self, items: Sequence[QueueItemPlan]) -> QueueItemResult:
        result = QueueItemResult()
        if not items:
            return result
        requests = [BatchRequest("POST", "queueitems", queue_item_body(item), idempotent=True) for item in items]
        responses = await self._client.execute_batch(requests, continue_on_error=True)
        for item, response in zip(items, responses, strict=False):
            queue_id = item.queue.id
            if response.ok:
                result.created.append(queue_id)
                continue
            error = map_error(response.status, response.body, response.headers)
            if isinstance(error, DuplicateRecordError):
                result.existing.append(queue_id)
            elif error.retryable:
                raise error
            else:
                why = "the queue or the email no longer exists" if isinstance(error, NotFoundError) else \
                    f"Dataverse {error.status} {error.code} {error.message[:200]}".rstrip()
                result.refused[queue_id] = why
        if len(responses) < len(items):  # a batch cut short: the rest is unknown, so retry the message
            raise DataverseError(503, "", "the queue item batch answered fewer parts than requests")
        return result
