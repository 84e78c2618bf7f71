"""Queue items for tracked email: the pure plan (core/domain/queue_items.py) and the inbound processor's use of the
queue-item port, over fakes. Once per email per queue, also under redelivery and a crash between the email write
and the queue items."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pytest

from core.adapters.dataverse import TransientError
from core.domain.identity import activity_id_for
from core.domain.model import (
    Address,
    ApprovalStatus,
    CrmRecordRef,
    CrmTable,
    InboundMethod,
    MailboxConfig,
    MailboxKind,
    OrgEmailSettings,
    PartyCandidate,
    TrackingFilter,
)
from core.domain.parties import Direction, ParticipationType, ResolvedParties, ResolvedParty
from core.domain.queue_items import QueueItemReason, plan_queue_items, queue_item_id_for
from core.services.inbound import InboundProcessor
from core.services.queue_items_crm import QueueItemResult, TrackedEmailQueues, queue_item_body
from tests.fakes import StaticMailboxDirectory
from tests.unit.services.test_inbound_processor import ALICE, CAROL, NOW, World, graph_message, item, user

SUPPORT = CrmRecordRef(CrmTable.QUEUE, uuid.UUID(int=700))
SALES = CrmRecordRef(CrmTable.QUEUE, uuid.UUID(int=701))
EMAIL = uuid.UUID(int=42)


def queue_mailbox(address: str, queue: CrmRecordRef) -> MailboxConfig:
    return MailboxConfig(address=address, kind=MailboxKind.QUEUE, owner=queue, mailbox_id=uuid.UUID(int=queue.id.int
                         + 9000), inbound_method=InboundMethod.INDIVIDUAL, tracking_filter=TrackingFilter.ALL,
                         approval=ApprovalStatus.APPROVED)


def parties(*recipients: CrmRecordRef | None) -> ResolvedParties:
    rows = [ResolvedParty(ParticipationType.SENDER, Address("", "carol@fabrikam.com"), CAROL)]
    rows += [ResolvedParty(ParticipationType.TO, Address("", f"r{n}@contoso.com"), r)
             for n, r in enumerate(recipients)]
    return ResolvedParties(tuple(rows))


# ------------------------------------------------------------------------------------------------ pure


def test_a_queue_mailbox_gets_its_item_and_queue_recipients_theirs_with_deterministic_ids() -> None:
    items = plan_queue_items(email_id=EMAIL, direction=Direction.INCOMING, parties=parties(SALES, ALICE, SALES),
                             mailbox=queue_mailbox("support@contoso.com", SUPPORT), org=OrgEmailSettings())
    assert [(i.queue, i.reason) for i in items] == [(SUPPORT, QueueItemReason.SYNCHRONIZING_MAILBOX),
                                                    (SALES, QueueItemReason.QUEUE_RECIPIENT)]
    assert items[0].queue_item_id == queue_item_id_for(EMAIL, SUPPORT.id) != queue_item_id_for(EMAIL, SALES.id)
    assert queue_item_body(items[1]) == {"queueitemid": str(items[1].queue_item_id),
                                         "objectid_email@odata.bind": f"/emails({EMAIL})",
                                         "queueid@odata.bind": f"/queues({SALES.id})"}


def test_a_user_mailbox_only_adds_items_for_queue_recipients() -> None:
    alice = user("alice@contoso.com", ALICE)
    assert [i.queue for i in plan_queue_items(email_id=EMAIL, direction=Direction.INCOMING,
                                              parties=parties(SUPPORT, ALICE), mailbox=alice,
                                              org=OrgEmailSettings())] == [SUPPORT]
    assert plan_queue_items(email_id=EMAIL, direction=Direction.INCOMING, parties=parties(ALICE), mailbox=alice,
                            org=OrgEmailSettings()) == ()
    # outgoing mail tracked from Sent Items: SSS makes queue items "during incoming email processing" only
    assert plan_queue_items(email_id=EMAIL, direction=Direction.OUTGOING, parties=parties(SUPPORT), mailbox=alice,
                            org=OrgEmailSettings()) == ()


@pytest.mark.parametrize(("recipients", "synchronizing", "expected"), [
    (False, True, [SUPPORT]), (True, False, [SALES]), (False, False, []),
])
def test_the_org_switches(recipients: bool, synchronizing: bool, expected: list[CrmRecordRef]) -> None:
    org = OrgEmailSettings(create_queue_items_for_accepting_queue_recipients=recipients,
                           create_queue_item_for_synchronizing_mailbox=synchronizing)
    items = plan_queue_items(email_id=EMAIL, direction=Direction.INCOMING, parties=parties(SALES),
                             mailbox=queue_mailbox("support@contoso.com", SUPPORT), org=org)
    assert [i.queue for i in items] == expected


def test_an_email_another_mailbox_tracked_first() -> None:
    base = {"email_id": EMAIL, "direction": Direction.INCOMING, "parties": parties(SALES),
            "mailbox": queue_mailbox("support@contoso.com", SUPPORT)}
    # SSS default: nothing more for the queue that sees it second
    assert plan_queue_items(**base, org=OrgEmailSettings(), already_tracked=True,
                            created_by_this_mailbox=False) == ()
    extra = OrgEmailSettings(create_additional_queue_items_for_already_tracked_email=True)
    assert [i.queue for i in plan_queue_items(**base, org=extra, already_tracked=True,
                                              created_by_this_mailbox=False)] == [SUPPORT]
    # our own interrupted attempt: everything still due, minus what exists (made by anyone)
    assert [i.queue for i in plan_queue_items(**base, org=OrgEmailSettings(), already_tracked=True,
                                              created_by_this_mailbox=True, existing_queues={SUPPORT.id})] == [SALES]


# ------------------------------------------------------------------------------------------------ processor


@dataclass
class FakeQueueItems:
    """``QueueItemGateway`` over an in-memory queueitem table keyed by id (a repeat is a duplicate)."""

    items: dict[uuid.UUID, tuple[uuid.UUID, uuid.UUID]] = field(default_factory=dict)  # id -> (email, queue)
    receiving: dict[uuid.UUID, uuid.UUID | None] = field(default_factory=dict)  # email -> receiving mailbox
    fail_create: list[Exception] = field(default_factory=list)
    refuse: set[uuid.UUID] = field(default_factory=set)  # queues whose items are refused
    creates: int = 0

    async def tracked_email_queues(self, email_id: uuid.UUID) -> TrackedEmailQueues:
        return TrackedEmailQueues(self.receiving.get(email_id),
                                  frozenset(q for e, q in self.items.values() if e == email_id))

    async def create_queue_items(self, items: Sequence[object]) -> QueueItemResult:
        self.creates += 1
        if self.fail_create:
            raise self.fail_create.pop(0)
        result = QueueItemResult()
        for plan in items:
            queue_id = plan.queue.id  # type: ignore[attr-defined]
            if queue_id in self.refuse:
                result.refused[queue_id] = "Dataverse 403 0x80040220 no privilege"
            elif plan.queue_item_id in self.items:  # type: ignore[attr-defined]
                result.existing.append(queue_id)
            else:
                self.items[plan.queue_item_id] = (plan.email_id, queue_id)  # type: ignore[attr-defined]
                result.created.append(queue_id)
        return result


@dataclass
class QueueWorld(World):
    queue_items: FakeQueueItems = field(default_factory=FakeQueueItems)

    def __post_init__(self) -> None:
        self.crm.directory["support@contoso.com"] = (PartyCandidate(SUPPORT),)
        self.crm.directory["sales@contoso.com"] = (PartyCandidate(SALES),)
        self.mailboxes = [*self.mailboxes, queue_mailbox("support@contoso.com", SUPPORT),
                          queue_mailbox("sales@contoso.com", SALES)]

    def processor(self) -> InboundProcessor:
        return replace(super().processor(), queue_items=self.queue_items)


async def test_queue_mail_lands_in_the_queue_once_also_under_redelivery() -> None:
    w = QueueWorld()
    w.mail.messages[("support@contoso.com", "g1")] = graph_message("g1", to=("support@contoso.com",))
    first = await w.processor().process(item("support@contoso.com", "g1"))
    assert first.outcome == "tracked"
    email = activity_id_for("<m1@fabrikam.com>")
    assert list(w.queue_items.items.values()) == [(email, SUPPORT.id)]
    assert "queue items created in 1 queue(s)" in w.decisions.records[("support@contoso.com", "g1")]["note"]
    w.ledger.entries.clear()  # the processed ledger lost it: the write is a duplicate now
    w.queue_items.receiving[email] = uuid.UUID(int=SUPPORT.id.int + 9000)
    again = await w.processor().process(item("support@contoso.com", "g1"))
    assert again.outcome == "already_tracked"
    assert list(w.queue_items.items.values()) == [(email, SUPPORT.id)]
    assert w.queue_items.creates == 1  # the existing item was read, nothing created twice


async def test_a_crash_between_the_email_and_its_queue_items_is_repaired_by_the_retry() -> None:
    w = QueueWorld()
    w.mail.messages[("support@contoso.com", "g1")] = graph_message("g1", to=("support@contoso.com",
                                                                           "sales@contoso.com"))
    w.queue_items.fail_create.append(TransientError(503, "", "Dataverse busy"))
    first = await w.processor().process(item("support@contoso.com", "g1"))
    assert first.outcome.startswith("retry")
    email = activity_id_for("<m1@fabrikam.com>")
    assert email in w.crm.emails and w.queue_items.items == {}
    w.queue_items.receiving[email] = uuid.UUID(int=SUPPORT.id.int + 9000)  # our write bound this mailbox
    second = await w.processor().process(item("support@contoso.com", "g1"))
    assert second.outcome == "already_tracked"
    assert sorted(q for _, q in w.queue_items.items.values()) == [SUPPORT.id, SALES.id]


async def test_a_user_mailbox_tracking_mail_to_a_queue_puts_it_in_that_queue() -> None:
    w = QueueWorld()
    w.mail.messages[("alice@contoso.com", "g1")] = graph_message("g1", to=("alice@contoso.com",
                                                                         "support@contoso.com"))
    assert (await w.processor().process(item("alice@contoso.com", "g1"))).outcome == "tracked"
    assert [q for _, q in w.queue_items.items.values()] == [SUPPORT.id]
    # the queue's own mailbox sees the same message later: already tracked by alice's mailbox, no extra item
    w.mail.messages[("support@contoso.com", "g2")] = graph_message("g2", to=("alice@contoso.com",
                                                                           "support@contoso.com"))
    w.queue_items.receiving[activity_id_for("<m1@fabrikam.com>")] = uuid.UUID(int=ALICE.id.int + 9000)
    assert (await w.processor().process(item("support@contoso.com", "g2"))).outcome == "already_tracked"
    assert len(w.queue_items.items) == 1


async def test_mail_without_queues_costs_no_queue_item_request() -> None:
    w = QueueWorld()
    w.mail.messages[("alice@contoso.com", "g1")] = graph_message("g1")
    result = await w.processor().process(item("alice@contoso.com", "g1"))
    assert result.outcome == "tracked" and w.queue_items.creates == 0
    assert result.crm_requests == 2  # lookup + write, as before


async def test_a_refused_queue_item_never_fails_the_tracked_email() -> None:
    w = QueueWorld()
    w.queue_items.refuse.add(SUPPORT.id)
    w.mail.messages[("support@contoso.com", "g1")] = graph_message("g1", to=("support@contoso.com",))
    result = await w.processor().process(item("support@contoso.com", "g1"))
    assert result.outcome == "tracked"
    assert "queue items refused" in w.decisions.records[("support@contoso.com", "g1")]["note"]


def test_world_processor_is_still_the_plain_one() -> None:
    # The base World (other tests) keeps running without the queue-item port.
    assert World().processor().queue_items is None
    assert NOW.year == 2026 and isinstance(StaticMailboxDirectory, type)
