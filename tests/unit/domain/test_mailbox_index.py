"""core.domain.inbound.mailbox_index: the per-snapshot lookups, built once per tuple of known mailboxes."""

from __future__ import annotations

from dataclasses import replace

from core.domain.inbound import mailbox_index
from core.domain.model import InboundMethod, MailboxKind

from .factories import queue_mailbox, ref, user_mailbox


def test_same_lookups_as_built_per_message() -> None:
    alice = user_mailbox(address="alice@contoso.example", owner=ref("systemuser", 1))
    bob = user_mailbox(address="bob@contoso.example", owner=ref("systemuser", 2), inbound_method=InboundMethod.FORWARD)
    support = queue_mailbox(address="support@contoso.example")
    known = (alice, bob, support)
    index = mailbox_index(known)
    assert dict(index.by_owner) == {m.owner: m for m in known if m.owner is not None}
    assert index.queue_addresses == frozenset(m.address for m in known if m.kind is MailboxKind.QUEUE)
    assert dict(index.forward_users) == {"bob@contoso.example": bob}


def test_reused_for_the_same_tuple_rebuilt_for_another() -> None:
    alice = user_mailbox(address="alice@contoso.example", owner=ref("systemuser", 1))
    known = (alice,)
    assert mailbox_index(known) is mailbox_index(known)
    changed = (replace(alice, owner=ref("systemuser", 9)),)  # e.g. backfill's replaced copies, or a refresh
    assert dict(mailbox_index(changed).by_owner) == {ref("systemuser", 9): changed[0]}
    listed = [alice]  # a mutable sequence is never kept
    first = mailbox_index(listed)
    listed.append(user_mailbox(address="carol@contoso.example", owner=ref("systemuser", 3)))
    assert len(mailbox_index(listed).by_owner) == 2 and len(first.by_owner) == 1
