"""The queue-item port of the inbound pipeline (``QueueItemGateway``) and its Dataverse implementation.

Writes are ``POST queueitems`` binding the lookups through the navigation names the org declares (OrgSchema; the
reference's queueitem.md gives ``objectid_email`` for ``Email_QueueItem`` and ``queueid`` for ``queue_entries``), and
a client-chosen ``queueitemid``
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
from typing import TYPE_CHECKING, Any, Protocol

from core.adapters.dataverse import DataverseError, DuplicateRecordError, NotFoundError, map_error
from core.adapters.odata import BatchRequest, eq
from core.domain.org_schema import DOCUMENTED, OrgSchema
from core.domain.queue_items import QueueItemPlan

if TYPE_CHECKING:
    from core.adapters.dataverse import DataverseClient
    from core.services.org_schema import OrgSchemaSource

__all__ = ["DataverseQueueItems", "QueueItemGateway", "QueueItemResult", "TrackedEmailQueues", "UndeclaredRelationship",
           "queue_item_body"]

log = logging.getLogger("emailrouter.inbound.queueitems")



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


class UndeclaredRelationship(Exception):
    """The org declares no navigation property for a queueitem lookup the router binds."""


def queue_item_body(item: QueueItemPlan, schema: OrgSchema = DOCUMENTED) -> dict[str, Any]:
    """The create body, every name from the org (pure)."""
    object_nav = schema.nav("queueitem", "objectid", "email")
    queue_nav = schema.nav("queueitem", "queueid", "queue")
    email_path = schema.bind_path("email", item.email_id)
    queue_path = schema.bind_path("queue", item.queue.id)
    if not (object_nav and queue_nav and email_path and queue_path):
        raise UndeclaredRelationship("the org declares no navigation property (or entity set) for queueitem."
                                     "objectid -> email or queueitem.queueid -> queue")
    return {"queueitemid": str(item.queue_item_id), f"{object_nav}@odata.bind": email_path,
            f"{queue_nav}@odata.bind": queue_path}


class DataverseQueueItems:
    """:class:`QueueItemGateway` over :class:`core.adapters.dataverse.DataverseClient`."""

    def __init__(self, client: DataverseClient, *, schema: OrgSchemaSource | None = None) -> None:
        from core.services.org_schema import OrgSchemaCache

        self._client = client
        self._schema = schema if schema is not None else OrgSchemaCache(client)

    async def tracked_email_queues(self, email_id: uuid.UUID) -> TrackedEmailQueues:
        schema = await self._schema.get()
        email = await self._client.get(schema.entity_set("email") or "emails", email_id,
                                       select=["activityid", "_receivingmailboxid_value"])
        queues: set[uuid.UUID] = set()
        async for row in self._client.list(schema.entity_set("queueitem") or "queueitems",
                                           select=["queueitemid", "_queueid_value"],
                                           filter=eq("_objectid_value", email_id)):
            queue_id = _uuid(row.get("_queueid_value"))
            if queue_id is not None:
                queues.add(queue_id)
        return TrackedEmailQueues(_uuid(email.get("_receivingmailboxid_value")), frozenset(queues))

    async def create_queue_items(self, items: Sequence[QueueItemPlan]) -> QueueItemResult:
        result = QueueItemResult()
        if not items:
            return result
        schema = await self._schema.get()
        try:
            bodies = [queue_item_body(item, schema) for item in items]
        except UndeclaredRelationship as exc:
            for item in items:
                result.refused[item.queue.id] = str(exc)
            return result
        entity_set = schema.entity_set("queueitem") or "queueitems"
        requests = [BatchRequest("POST", entity_set, body, idempotent=True) for body in bodies]
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
                gone = isinstance(error, NotFoundError) or "does not exist" in error.message.lower()
                why = "the queue or the email no longer exists" if gone else \
                    f"Dataverse {error.status} {error.code} {error.message[:200]}".rstrip()
                result.refused[queue_id] = why
        if len(responses) < len(items):  # a batch cut short: the rest is unknown, so retry the message
            raise DataverseError(503, "", "the queue item batch answered fewer parts than requests")
        return result
