"""Outbound refuses to run where it would do harm, with the reason recorded: optimistic concurrency off on email
(audit dataverse-fidelity #11) and a mailbox where Server-Side Synchronization also sends (#12)."""

from __future__ import annotations

from dataclasses import dataclass

from core.domain.model import SssStatus
from core.domain.org_schema import OrgSchema
from core.domain.outbound import OutboundStatus
from core.services.outbound import SSS_REFUSAL, SendOutcome
from tests.unit.services.test_outbound import Harness
from tests.unit.services.test_outbound_fakes import router_mailbox


@dataclass
class StaticSchema:
    schema: OrgSchema

    async def get(self) -> OrgSchema:
        return self.schema


CONCURRENCY_OFF = StaticSchema(OrgSchema(optimistic_concurrency={"email": False}, from_org=True))
CONCURRENCY_ON = StaticSchema(OrgSchema(optimistic_concurrency={"email": True}, from_org=True))


async def test_with_optimistic_concurrency_off_nothing_is_scanned_claimed_or_failed() -> None:
    h = Harness(schema=CONCURRENCY_OFF)
    row = h.add()
    scan = await h.service().scan()
    assert scan.blocked and "optimistic concurrency is off" in scan.blocked and scan.enqueued == 0
    # a work item enqueued before the switch was turned off: left in Pending Send, not claimed, not Failed
    result = await h.process(row)
    assert result.outcome is SendOutcome.SKIPPED and "optimistic concurrency" in result.reason
    assert row.status is OutboundStatus.PENDING_SEND and h.crm.history == [] and h.mail.outbox == []
    # once the org has it on again, the email goes out
    h.schema = CONCURRENCY_ON
    assert (await h.service().scan()).enqueued == 1
    assert (await h.process(row)).outcome is SendOutcome.SENT


async def test_a_mailbox_where_sss_also_sends_is_left_to_sss_with_the_reason_recorded() -> None:
    h = Harness(mailboxes=[router_mailbox(1, sss_outgoing=SssStatus.ACTIVE), router_mailbox(2)])
    mine, theirs = h.add(sender=2), h.add(sender=1)
    scan = await h.service().scan()
    assert [i.email_id for i in scan.items] == [str(mine.email.activity_id)]
    assert scan.sss_refused == {"user1@contoso.example": str(theirs.email.activity_id)}
    assert h.status.failures == [("user1@contoso.example", str(theirs.email.activity_id), SSS_REFUSAL)]
    forged = await h.process(theirs, sender=1)
    assert forged.outcome is SendOutcome.SKIPPED and forged.reason == SSS_REFUSAL
    assert theirs.status is OutboundStatus.PENDING_SEND  # SSS sends it; the router never claimed it


async def test_sss_only_configured_does_not_stop_the_router() -> None:
    h = Harness(mailboxes=[router_mailbox(1, sss_outgoing=SssStatus.CONFIGURED)])
    row = h.add()
    assert (await h.service().scan()).enqueued == 1
    assert (await h.process(row)).outcome is SendOutcome.SENT


async def test_the_reason_is_recorded_also_when_every_router_mailbox_is_left_to_sss() -> None:
    h = Harness(mailboxes=[router_mailbox(1, sss_outgoing=SssStatus.ACTIVE)])
    theirs = h.add(sender=1)
    scan = await h.service().scan()
    assert scan.enqueued == 0 and scan.sss_refused == {"user1@contoso.example": str(theirs.email.activity_id)}
    assert h.status.failures == [("user1@contoso.example", str(theirs.email.activity_id), SSS_REFUSAL)]
