from __future__ import annotations

import uuid
from typing import Any

import pytest

from core.domain.correlation import Correlation, CorrelationMethod, KnownEmail
from core.domain.model import MailboxKind, QueueOwnerFallback
from core.domain.owner import choose_owner
from core.domain.parties import Direction, party_addresses, resolve_parties

from .factories import ALICE, BOB, addr, directory, message, org, queue_mailbox, ref, user_mailbox

NONE = Correlation(CorrelationMethod.NONE)
TO_QUEUE = ("support@contoso.com",)


def _owner(mailbox: Any, *, sender: str = "nobody@nowhere.com", to: tuple[str, ...] = TO_QUEUE,
           cc: tuple[str, ...] = (), correlation: Correlation = NONE, **org_overrides: Any) -> Any:
    m = message(from_=addr(sender), to=tuple(addr(a) for a in to), cc=tuple(addr(a) for a in cc))
    parties = resolve_parties(party_addresses(m, Direction.INCOMING), directory(), org())
    return choose_owner(mailbox, parties=parties, correlation=correlation, org=org(**org_overrides)).owner


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # queue walk 1: a recipient owning the correlated email
        ({"to": ("support@contoso.com", "alice@contoso.com", "bob@contoso.com"),
          "correlation": Correlation(CorrelationMethod.IN_REPLY_TO, KnownEmail(uuid.UUID(int=5), owner=BOB))}, BOB),
        # ...not a recipient -> ignored, next rules
        ({"to": ("support@contoso.com", "alice@contoso.com"),
          "correlation": Correlation(CorrelationMethod.IN_REPLY_TO, KnownEmail(uuid.UUID(int=5), owner=BOB))}, ALICE),
        # queue walk 2: the sender's contact is owned by a recipient (carol's contact is owned by Bob)
        ({"sender": "carol@fabrikam.com", "to": ("support@contoso.com", "alice@contoso.com"),
          "cc": ("bob@contoso.com",)}, BOB),
        # queue walk 3: first recipient user in To, Cc order
        ({"to": ("support@contoso.com",), "cc": ("bob@contoso.com", "alice@contoso.com")}, BOB),
        # queue walk 4: nobody -> fallback setting
        ({}, BOB),  # queue_owner of the factory queue
        ({"queue_owner_fallback": QueueOwnerFallback.APPLICATION_USER}, None),
    ],
)
def test_queue_owner_walk(kwargs: dict[str, Any], expected: Any) -> None:
    assert _owner(queue_mailbox(), **kwargs) == expected


@pytest.mark.parametrize(
    ("mailbox", "expected"),
    [
        (user_mailbox(), ALICE),  # the receiving user, whoever is on To
        (user_mailbox(owner=ref("systemuser", 77)), ref("systemuser", 77)),
        (user_mailbox(owner=None), None),
        (user_mailbox(kind=MailboxKind.FORWARD_SINK, owner=None), None),
    ],
)
def test_user_mailbox_owner(mailbox: Any, expected: Any) -> None:
    assert _owner(mailbox, sender="carol@fabrikam.com", to=("bob@contoso.com",)) == expected
