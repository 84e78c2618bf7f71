"""Queue items for tracked email (pure): which queues a tracked email must appear in, as CRM does.

Server-Side Synchronization creates queue items while it processes incoming mail, under three organisation
settings (power-platform ``admin/create-queue-items-from-synchronized-email-messages.md``):

* ``CreateQueueItemsForAcceptingQueueRecipients`` (default on): "a queue item for each resolved queue recipient
  during incoming email processing";
* ``CreateQueueItemForSynchronizingMailbox`` (default on): the queue whose mailbox is processing the email gets an
  item even when it is not a recipient (a distribution list member, a Bcc);
* ``SSSCreateAdditionalQueueItemsForAlreadyTrackedEmail`` (default off): when the email was already tracked from
  another mailbox, the processing queue still gets its item.

The router mirrors them (org settings ``CreateQueueItemsForAcceptingQueueRecipients``,
``CreateQueueItemForSynchronizingMailbox``, ``CreateAdditionalQueueItemsForAlreadyTrackedEmail``). The
``AutoRouteToOwnerQueue`` extra (an item in the owner's default queue) is not supported.

Each item gets a deterministic ``queueitemid`` (uuid5 of email + queue; ``QueueItemId`` is writable on create per
queueitem.md): a repeat after a crash or a redelivery is a duplicate key (412 ``0x80040237``) = already there.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from .model import CrmRecordRef, CrmTable, MailboxConfig, MailboxKind, OrgEmailSettings
from .parties import Direction, ResolvedParties

__all__ = ["QUEUE_ITEM_NAMESPACE", "QueueItemPlan", "QueueItemReason", "plan_queue_items", "queue_item_id_for"]

# Frozen: every queue item id already written to CRM depends on it. uuid5(NAMESPACE_URL,
# "urn:email-router-d365:queueitem").
QUEUE_ITEM_NAMESPACE: Final = uuid.UUID("2f72e1e4-e040-5c9f-91bb-894fc27ba44a")


class QueueItemReason(StrEnum):
    SYNCHRONIZING_MAILBOX = "synchronizing_mailbox"  # the queue whose mailbox tracked the email
    QUEUE_RECIPIENT = "queue_recipient"  # a queue among the resolved recipients


@dataclass(frozen=True, slots=True)
class QueueItemPlan:
    queue_item_id: uuid.UUID
    queue: CrmRecordRef
    email_id: uuid.UUID
    reason: QueueItemReason


def queue_item_id_for(email_id: uuid.UUID, queue_id: uuid.UUID) -> uuid.UUID:
    return uuid.uuid5(QUEUE_ITEM_NAMESPACE, f"{email_id}\n{queue_id}")


def plan_queue_items(
    *,
    email_id: uuid.UUID,
    direction: Direction,
    parties: ResolvedParties,
    mailbox: MailboxConfig,
    org: OrgEmailSettings,
    already_tracked: bool = False,
    created_by_this_mailbox: bool = True,
    existing_queues: Collection[uuid.UUID] = (),
) -> tuple[QueueItemPlan, ...]:
    """The queue items to create for one tracked email, in a stable order (synchronizing queue first).

    ``already_tracked``: the email existed before this write. Then ``created_by_this_mailbox`` tells an earlier,
    interrupted attempt of the same mailbox (every item is still due) from another mailbox having tracked it first
    (only the synchronizing queue's item, and only with ``CreateAdditionalQueueItemsForAlreadyTrackedEmail``).
    ``existing_queues``: queues that already hold an item for this email (made by the router or anyone else):
    never a second one.
    """
    if direction is not Direction.INCOMING:
        return ()  # SSS creates queue items "during incoming email processing"
    wanted: dict[uuid.UUID, QueueItemReason] = {}
    own_queue = mailbox.owner if mailbox.kind is MailboxKind.QUEUE and mailbox.owner is not None else None
    first_write = not already_tracked or created_by_this_mailbox
    if own_queue is not None and (
            (first_write and org.create_queue_item_for_synchronizing_mailbox)
            or (already_tracked and not created_by_this_mailbox
                and org.create_additional_queue_items_for_already_tracked_email)):
        wanted[own_queue.id] = QueueItemReason.SYNCHRONIZING_MAILBOX
    if first_write and org.create_queue_items_for_accepting_queue_recipients:
        for party in parties.recipients():
            if party.record is not None and party.record.table == CrmTable.QUEUE:
                wanted.setdefault(party.record.id, QueueItemReason.QUEUE_RECIPIENT)
    skip = set(existing_queues)
    return tuple(QueueItemPlan(queue_item_id_for(email_id, queue_id), CrmRecordRef(CrmTable.QUEUE, queue_id),
                               email_id, reason)
                 for queue_id, reason in wanted.items() if queue_id not in skip)
