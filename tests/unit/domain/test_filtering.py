from __future__ import annotations

import uuid
from typing import Any

import pytest

from core.domain.correlation import Correlation, CorrelationMethod, KnownEmail
from core.domain.filtering import decide_tracking
from core.domain.model import CrmTable, Folder, FolderKind, InboundMethod, MailboxKind, PartyCandidate, TrackingFilter
from core.domain.parties import Direction, party_addresses, resolve_parties

from .factories import ALICE, BOB, CASE, SUPPORT_Q, addr, directory, message, org, queue_mailbox, ref, user_mailbox

F = TrackingFilter
REPLY = Correlation(CorrelationMethod.IN_REPLY_TO, KnownEmail(uuid.UUID(int=1)))
NO_CORRELATION = Correlation(CorrelationMethod.NONE)

SENDERS = {
    "contact": "carol@fabrikam.com",
    "account": "info@fabrikam.com",
    "lead": "lead@prospect.com",
    "user": "bob@contoso.com",
    "custom": "thing@custom.example",
    "unknown": "nobody@nowhere.com",
}


def _directory() -> dict[str, list[PartyCandidate]]:
    d = directory()
    d["thing@custom.example"] = [PartyCandidate(ref("new_widget", 900))]
    return d


@pytest.mark.parametrize(
    ("tracking_filter", "sender", "correlation", "tracked"),
    [
        (F.ALL, "unknown", NO_CORRELATION, True),
        (F.NONE, "contact", REPLY, False),
        (F.REPLIES_TO_CRM_EMAIL, "contact", NO_CORRELATION, False),
        (F.REPLIES_TO_CRM_EMAIL, "unknown", REPLY, True),
        (F.FROM_LEADS_CONTACTS_ACCOUNTS, "contact", NO_CORRELATION, True),
        (F.FROM_LEADS_CONTACTS_ACCOUNTS, "account", NO_CORRELATION, True),
        (F.FROM_LEADS_CONTACTS_ACCOUNTS, "lead", NO_CORRELATION, True),
        (F.FROM_LEADS_CONTACTS_ACCOUNTS, "user", NO_CORRELATION, False),
        (F.FROM_LEADS_CONTACTS_ACCOUNTS, "custom", NO_CORRELATION, False),
        (F.FROM_LEADS_CONTACTS_ACCOUNTS, "unknown", REPLY, False),
        (F.FROM_EMAIL_ENABLED_RECORDS, "user", NO_CORRELATION, True),
        (F.FROM_EMAIL_ENABLED_RECORDS, "custom", NO_CORRELATION, True),
        (F.FROM_EMAIL_ENABLED_RECORDS, "unknown", NO_CORRELATION, False),
    ],
)
def test_every_filter_value_for_the_receiving_user(tracking_filter: TrackingFilter, sender: str,
                                                   correlation: Correlation, tracked: bool) -> None:
    m = message(from_=addr(SENDERS[sender]))
    parties = resolve_parties(party_addresses(m, Direction.INCOMING), _directory(), org())
    decision = decide_tracking(m, user_mailbox(tracking_filter=tracking_filter), parties=parties,
                               correlation=correlation, direction=Direction.INCOMING, org=org(),
                               mailboxes_by_owner={})
    assert decision.tracked is tracked
    assert decision.accepting_entity == (ALICE if tracked else None)
    assert decision.evaluations[0].tracking_filter is tracking_filter


BOB_BOX = user_mailbox(address="bob@contoso.com", owner=BOB, tracking_filter=F.ALL)
QUEUE_BOX = queue_mailbox()


@pytest.mark.parametrize(
    ("to", "boxes", "org_overrides", "accepting"),
    [
        # Alice (filter 4) rejects; Bob on To accepts under his own filter (crm-ref §5.2)
        (("alice@contoso.com", "bob@contoso.com"), [BOB_BOX], {}, BOB),
        # the queue on To accepts
        (("alice@contoso.com", "support@contoso.com"), [QUEUE_BOX], {}, SUPPORT_Q),
        # recipients without a mailbox config, or with incoming None / disabled, do not vote
        (("alice@contoso.com", "bob@contoso.com"), [], {}, None),
        (("alice@contoso.com", "bob@contoso.com"),
         [user_mailbox(address="bob@contoso.com", owner=BOB, inbound_method=InboundMethod.NONE)], {}, None),
        (("alice@contoso.com", "bob@contoso.com"),
         [user_mailbox(address="bob@contoso.com", owner=BOB, enabled_for_incoming=False)], {}, None),
        # UseFilteringMethodOfSyncingMailboxOnlyForCorrelation: only the receiving mailbox's filter counts
        (("alice@contoso.com", "bob@contoso.com"), [BOB_BOX], {"use_syncing_mailbox_filter_only": True}, None),
    ],
)
def test_any_resolved_user_or_queue_recipient_may_accept(to: tuple[str, ...], boxes: list[Any],
                                                         org_overrides: dict[str, Any], accepting: Any) -> None:
    m = message(from_=addr("nobody@nowhere.com"), to=tuple(addr(a) for a in to))
    parties = resolve_parties(party_addresses(m, Direction.INCOMING), directory(), org())
    decision = decide_tracking(m, user_mailbox(tracking_filter=F.NONE), parties=parties,
                               correlation=NO_CORRELATION, direction=Direction.INCOMING, org=org(**org_overrides),
                               mailboxes_by_owner={b.owner: b for b in boxes})
    assert decision.accepting_entity == accepting
    assert decision.tracked is (accepting is not None)


def test_folder_level_tracking_wins_over_the_filter() -> None:
    m = message(folder=Folder(FolderKind.OTHER, "orders"), from_=addr("nobody@nowhere.com"))
    mailbox = user_mailbox(tracking_filter=F.NONE, folder_regarding={"orders": CASE})
    parties = resolve_parties(party_addresses(m, Direction.INCOMING), directory(), org())
    decision = decide_tracking(m, mailbox, parties=parties, correlation=NO_CORRELATION,
                               direction=Direction.INCOMING, org=org(), mailboxes_by_owner={})
    assert (decision.tracked, decision.via, decision.folder_regarding, decision.accepting_entity) == (
        True, "folder", CASE, ALICE)


def test_folder_mapping_is_ignored_for_queues() -> None:
    m = message(folder=Folder(FolderKind.OTHER, "orders"), mailbox="support@contoso.com")
    mailbox = queue_mailbox(tracking_filter=F.NONE, folder_regarding={"orders": CASE})
    parties = resolve_parties(party_addresses(m, Direction.INCOMING), directory(), org())
    decision = decide_tracking(m, mailbox, parties=parties, correlation=NO_CORRELATION,
                               direction=Direction.INCOMING, org=org(), mailboxes_by_owner={})
    assert decision.via != "folder" and not decision.tracked
    assert mailbox.kind is MailboxKind.QUEUE


@pytest.mark.parametrize(("recipient", "tracked"), [("carol@fabrikam.com", True), ("nobody@nowhere.com", False)])
def test_sent_items_filter_2_looks_at_recipients(recipient: str, tracked: bool) -> None:
    m = message(folder=Folder(FolderKind.SENT_ITEMS, "s"), from_=addr("alice@contoso.com"), to=(addr(recipient),))
    parties = resolve_parties(party_addresses(m, Direction.OUTGOING), directory(), org())
    decision = decide_tracking(m, user_mailbox(tracking_filter=F.FROM_LEADS_CONTACTS_ACCOUNTS), parties=parties,
                               correlation=NO_CORRELATION, direction=Direction.OUTGOING, org=org(),
                               mailboxes_by_owner={})
    assert decision.tracked is tracked
    assert CrmTable.CONTACT in {p.record.table for p in parties.parties if p.record} or not tracked
