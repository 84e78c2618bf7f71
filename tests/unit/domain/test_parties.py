from __future__ import annotations

from typing import Any

import pytest

from core.domain.model import CrmTable, PartyCandidate
from core.domain.parties import (
    Direction,
    ParticipationType,
    addresses_to_look_up,
    party_addresses,
    resolve_parties,
)

from .factories import ALICE, BOB, CAROL_CONTACT, FABRIKAM_ACCOUNT, LEAD, addr, directory, message, org, ref

P = ParticipationType


def test_party_addresses_roles_and_order() -> None:
    m = message(to=(addr("alice@contoso.com"), addr("alice@contoso.com"), addr("bob@contoso.com")),
                cc=(addr("alice@contoso.com"),), bcc=(addr("x@y.com"),))
    roles = [(mask, a.address) for mask, a in party_addresses(m, Direction.INCOMING)]
    assert roles == [(P.SENDER, "carol@fabrikam.com"), (P.TO, "alice@contoso.com"), (P.TO, "bob@contoso.com"),
                     (P.CC, "alice@contoso.com"), (P.BCC, "x@y.com")]


def test_sender_falls_back_to_sender_field_then_mailbox_for_sent_items() -> None:
    assert party_addresses(message(from_=None, sender=addr("d@x.com")), Direction.INCOMING)[0][1].address == "d@x.com"
    assert party_addresses(message(from_=None), Direction.OUTGOING)[0][1].address == "alice@contoso.com"
    assert party_addresses(message(from_=None), Direction.INCOMING)[0][0] is P.TO


def test_addresses_to_look_up_is_one_set() -> None:
    m = message(sender=addr("assistant@fabrikam.com"), cc=(addr("bob@contoso.com"),))
    assert addresses_to_look_up(m) == {"carol@fabrikam.com", "assistant@fabrikam.com", "alice@contoso.com",
                                       "bob@contoso.com"}


DUPLICATE = "shared@fabrikam.com"


def _dir_with_duplicates() -> dict[str, list[PartyCandidate]]:
    d = directory()
    d[DUPLICATE] = [PartyCandidate(ref(CrmTable.LEAD, 301)), PartyCandidate(ref(CrmTable.CONTACT, 102)),
                    PartyCandidate(ref(CrmTable.CONTACT, 101)), PartyCandidate(ref(CrmTable.ACCOUNT, 201))]
    d["user-and-contact@contoso.com"] = [PartyCandidate(ref(CrmTable.CONTACT, 150), owner=ALICE),
                                         PartyCandidate(BOB)]
    d["inactive@fabrikam.com"] = [PartyCandidate(ref(CrmTable.CONTACT, 160), is_active=False)]
    d["disabled@contoso.com"] = [PartyCandidate(ref(CrmTable.SYSTEMUSER, 70), is_disabled_user=True)]
    return d


@pytest.mark.parametrize(
    ("mask", "address", "org_overrides", "tracking_user", "expected"),
    [
        # sender: table order systemuser > contact > account > lead (crm-ref §7)
        (P.SENDER, "carol@fabrikam.com", {}, None, [CAROL_CONTACT]),
        (P.SENDER, DUPLICATE, {}, None, [ref(CrmTable.CONTACT, 101)]),  # two contacts -> lowest id
        (P.SENDER, DUPLICATE, {"unresolve_if_multiple_match": True}, None, [None]),
        (P.SENDER, "user-and-contact@contoso.com", {}, None, [BOB]),  # systemuser first...
        (P.SENDER, "user-and-contact@contoso.com", {}, ALICE, [ref(CrmTable.CONTACT, 150)]),  # ...unless owned
        (P.SENDER, "nobody@nowhere.com", {}, None, [None]),
        (P.SENDER, "inactive@fabrikam.com", {}, None, [None]),
        (P.SENDER, "inactive@fabrikam.com", {"resolve_for_inactive_entities": True}, None, [ref("contact", 160)]),
        (P.SENDER, "disabled@contoso.com", {"resolve_for_inactive_entities": True}, None, [None]),
        # To/Cc: every matching record listed, or unresolved when the org says so
        (P.TO, DUPLICATE, {}, None, [ref("contact", 101), ref("contact", 102), ref("account", 201),
                                     ref("lead", 301)]),
        (P.CC, DUPLICATE, {"unresolve_if_multiple_match": True}, None, [None]),
        (P.TO, "info@fabrikam.com", {"unresolve_if_multiple_match": True}, None, [FABRIKAM_ACCOUNT]),
        (P.BCC, "lead@prospect.com", {}, None, [LEAD]),
        (P.TO, "nobody@nowhere.com", {}, None, [None]),
    ],
)
def test_resolve_parties(mask: ParticipationType, address: str, org_overrides: dict[str, Any],
                         tracking_user: Any, expected: list[Any]) -> None:
    resolved = resolve_parties([(mask, addr(address))], _dir_with_duplicates(), org(**org_overrides),
                               tracking_user=tracking_user)
    assert [p.record for p in resolved.parties] == expected
    assert all(p.mask is mask and p.address.address == address for p in resolved.parties)
    ambiguous = expected == [None] and org_overrides.get("unresolve_if_multiple_match") and address == DUPLICATE
    assert all(p.ambiguous == bool(ambiguous) for p in resolved.parties)


def test_resolved_parties_views() -> None:
    m = message(to=(addr("bob@contoso.com"),), cc=(addr("alice@contoso.com"),), bcc=(addr("nobody@x.com"),))
    resolved = resolve_parties(party_addresses(m, Direction.INCOMING), directory(), org())
    assert resolved.sender is not None and resolved.sender.record == CAROL_CONTACT
    assert resolved.sender.owner == BOB
    assert [p.record for p in resolved.recipients()] == [BOB, ALICE, None]
    assert [p.address.address for p in resolved.unresolved] == ["nobody@x.com"]
    assert not resolved.sender_is_duplicate_unresolved
