"""Outbound scan (fairness, de-duplication, who is left alone) and reaper, with fakes of our ports."""

from __future__ import annotations

import uuid
from datetime import timedelta

from core.domain.model import OutboundMethod
from core.domain.outbound import OutboundStatus
from core.names import OUTBOUND_QUEUE
from core.services.outbound import LedgerEntry, OutboundSettings, Phase
from core.work_items import OutboundItem
from tests.unit.services.test_outbound import Harness
from tests.unit.services.test_outbound_fakes import T0, outbound_email, router_mailbox, user_ref


def _items(h: Harness) -> list[OutboundItem]:
    assert all(q == OUTBOUND_QUEUE for q, _, _ in h.queue.sent)
    return [OutboundItem.from_json(m) for m, _ in h.queue.drain()]


async def test_a_heavy_sender_does_not_starve_a_light_one() -> None:
    h = Harness(settings=OutboundSettings(per_sender_cap=5))
    heavy = [h.crm.add(outbound_email(1, n=i), user_ref(1), modified_on=T0 + timedelta(seconds=i))
             for i in range(200)]
    light = h.crm.add(outbound_email(2, n=999), user_ref(2), modified_on=T0 + timedelta(hours=1))
    result = await h.service().scan()
    items = _items(h)
    assert result.seen == 201 and result.enqueued == 6
    # The light sender's single email is in the first scan, right after the heavy sender's oldest one.
    assert [i.email_id for i in items[:2]] == [str(heavy[0].email.activity_id), str(light.email.activity_id)]
    assert {i.sender_mailbox for i in items} == {"user1@contoso.example", "user2@contoso.example"}
    # The heavy sender gets its oldest five, in order.
    assert [i.email_id for i in items if i.sender_mailbox == "user1@contoso.example"] == [
        str(r.email.activity_id) for r in heavy[:5]]


async def test_the_next_scan_skips_what_is_in_flight_and_takes_the_next_emails() -> None:
    h = Harness(settings=OutboundSettings(per_sender_cap=5))
    heavy = [h.crm.add(outbound_email(1, n=i), user_ref(1), modified_on=T0 + timedelta(seconds=i))
             for i in range(12)]
    await h.service().scan()
    first = _items(h)
    h.clock.advance(seconds=15)
    second_result = await h.service().scan()
    second = _items(h)
    assert second_result.in_flight == 5
    assert [i.email_id for i in second] == [str(r.email.activity_id) for r in heavy[5:10]]
    assert not {i.email_id for i in first} & {i.email_id for i in second}


async def test_an_enqueued_but_unclaimed_email_is_enqueued_again_after_requeue_after() -> None:
    h = Harness()
    row = h.add()
    await h.service().scan()
    assert len(_items(h)) == 1
    h.clock.advance(seconds=60)
    await h.service().scan()
    assert _items(h) == []
    h.clock.advance(minutes=5)
    await h.service().scan()
    assert [i.email_id for i in _items(h)] == [str(row.email.activity_id)]


async def test_a_duplicate_work_item_from_two_scans_is_harmless() -> None:
    h = Harness()
    row = h.add()
    await h.service().scan()
    h.clock.advance(minutes=6)
    await h.service().scan()
    items = _items(h)
    assert len(items) == 2
    outcomes = [(await h.service(f"w{n}").process(i)).outcome.value for n, i in enumerate(items)]
    assert outcomes == ["sent", "skipped"] and len(h.mail.sent_for(row.email.activity_id)) == 1


async def test_outlook_none_and_unknown_senders_are_left_alone() -> None:
    h = Harness(mailboxes=[router_mailbox(1), router_mailbox(2, outbound_method=OutboundMethod.OUTLOOK),
                           router_mailbox(3, outbound_method=OutboundMethod.NONE),
                           router_mailbox(4, enabled_for_outgoing=False)])
    mine = h.add(sender=1)
    for sender in (2, 3, 4, 5):
        h.add(sender=sender)
    result = await h.service().scan()
    assert [i.email_id for i in _items(h)] == [str(mine.email.activity_id)]
    assert result.not_router == 4


async def test_an_email_waiting_for_its_retry_is_not_enqueued_again_by_the_scan() -> None:
    # The sender re-enqueued it with a visibility delay of Retry-After; the scan only steps in when that item
    # seems lost (OUTBOUND_REQUEUE_AFTER_SECONDS after it was due).
    h = Harness()
    row = h.add()
    await h.service().scan()
    _items(h)
    from core.adapters.graph import GraphThrottled

    h.mail.faults.fail("create_draft", GraphThrottled(429, "TooManyRequests", "slow down", retry_after=300))
    await h.process(row)
    assert [d for _, d in h.queue.drain()] == [300]
    h.clock.advance(seconds=301)
    await h.service().scan()
    assert _items(h) == []
    h.clock.advance(minutes=5)
    await h.service().scan()
    assert [i.email_id for i in _items(h)] == [str(row.email.activity_id)]


async def test_no_router_mailboxes_means_no_crm_query() -> None:
    h = Harness(mailboxes=[])
    h.add()
    result = await h.service().scan()
    assert result.seen == 0 and h.crm.faults.calls["list"] == 0


# ------------------------------------------------------------------------------------------------ reaper


def _sending(h: Harness, *, claimed_minutes_ago: float, attempts: int = 0, phase: Phase = Phase.CLAIMED,
             lease_minutes: float = -1) -> tuple[uuid.UUID, LedgerEntry]:
    row = h.add()
    row.statecode, row.statuscode = OutboundStatus.SENDING.crm
    row.modified_on = h.clock.now - timedelta(minutes=claimed_minutes_ago)
    entry = LedgerEntry(str(row.email.activity_id), "user1@contoso.example", phase, attempts=attempts,
                        owner="dead", claimed_at=row.modified_on,
                        lease_until=h.clock.now + timedelta(minutes=lease_minutes))
    h.ledger.entries[entry.email_id] = (entry, 1)
    return row.email.activity_id, entry


async def test_reaper_returns_stuck_emails_to_pending_send_and_counts_an_attempt() -> None:
    h = Harness()
    stuck, _ = _sending(h, claimed_minutes_ago=20)
    fresh, _ = _sending(h, claimed_minutes_ago=5)
    leased, _ = _sending(h, claimed_minutes_ago=20, lease_minutes=3)
    result = await h.service("reaper").reap()
    assert result.returned == 1
    assert h.crm.emails[stuck].status is OutboundStatus.PENDING_SEND
    assert h.ledger.entry(stuck).attempts == 1 and h.ledger.entry(stuck).phase is Phase.RETRY
    assert "stuck in Sending" in h.ledger.entry(stuck).last_error
    assert h.crm.emails[fresh].status is OutboundStatus.SENDING
    assert h.crm.emails[leased].status is OutboundStatus.SENDING


async def test_reaper_fails_an_email_that_keeps_getting_stuck() -> None:
    h = Harness(settings=OutboundSettings(max_attempts=3))
    stuck, _ = _sending(h, claimed_minutes_ago=20, attempts=2)
    result = await h.service("reaper").reap()
    assert result.failed == 1 and h.crm.emails[stuck].status is OutboundStatus.FAILED
    assert h.status.failures and "gave up after 3 attempts" in h.status.failures[0][2]


async def test_reaper_finishes_what_the_ledger_proves_was_sent() -> None:
    h = Harness()
    sent, _ = _sending(h, claimed_minutes_ago=1, phase=Phase.SENT)
    result = await h.service("reaper").reap()
    assert result.finished == 1 and h.crm.emails[sent].status is OutboundStatus.SENT
    assert h.mail.outbox == []


async def test_reaper_leaves_other_systems_sending_emails_alone() -> None:
    h = Harness(mailboxes=[router_mailbox(2)])
    row = h.add(sender=1)  # not a router sender, no ledger entry
    row.statecode, row.statuscode = OutboundStatus.SENDING.crm
    row.modified_on = h.clock.now - timedelta(hours=5)
    await h.service("reaper").reap()
    assert row.status is OutboundStatus.SENDING


async def test_reaper_sweep_finishes_sent_emails_crm_no_longer_shows_as_sending() -> None:
    # The ledger says sent, CRM does not (e.g. someone re-opened it to Draft after the send): the sweep closes that
    # editable copy of an already sent mail by marking it Sent.
    h = Harness()
    row = h.add()
    row.statecode, row.statuscode = 0, 1
    key = str(row.email.activity_id)
    h.ledger.entries[key] = (LedgerEntry(key, "user1@contoso.example", Phase.SENT, internet_message_id="<x@y>"), 1)
    from core.services.outbound import ActiveMarker

    h.ledger.markers[key] = ActiveMarker(key, "user1@contoso.example", h.clock.now, None, h.clock.now)
    assert (await h.service().reap()).finished == 0  # too recent
    h.clock.advance(minutes=20)
    await h.service().reap()
    assert row.status is OutboundStatus.SENT
    assert key not in h.ledger.markers
