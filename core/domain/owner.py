"""Who owns the CRM email (crm-ref §7 "Owner", issue 5 "Owner").

* User mailbox (individual or forward): the mailbox's user. The forwarding user keeps ownership of mail that
  reached CRM through the sink (issue 5: "owner and security kept").
* Queue mailbox (a queue cannot own an email; ``ownerid`` is systemuser/team, dv-ref §2.3) - the documented walk:
  1. correlated to an existing email -> prefer a recipient user who owns that email;
  2. else the sender resolves to a contact/account/lead whose owner is a recipient user -> that owner;
  3. else the first recipient user in To, Cc, Bcc order;
  4. nobody eligible -> :class:`QueueOwnerFallback` (NOT VERIFIED: the reference does not say; default = the
     queue's own owner, the alternative leaves ownerid unset so the application user owns it).
"""

from __future__ import annotations

from dataclasses import dataclass

from core.domain.correlation import Correlation
from core.domain.filtering import CUSTOMER_TABLES
from core.domain.model import CrmRecordRef, CrmTable, MailboxConfig, MailboxKind, OrgEmailSettings, QueueOwnerFallback
from core.domain.parties import ResolvedParties

__all__ = ["OwnerDecision", "choose_owner"]


@dataclass(frozen=True, slots=True)
class OwnerDecision:
    owner: CrmRecordRef | None  # None = leave ownerid unset (the calling application user owns it)
    rule: str


def _recipient_users(parties: ResolvedParties) -> list[CrmRecordRef]:
    users: list[CrmRecordRef] = []
    for party in parties.recipients():
        if party.record is not None and party.record.table == CrmTable.SYSTEMUSER and party.record not in users:
            users.append(party.record)
    return users


def choose_owner(mailbox: MailboxConfig, *, parties: ResolvedParties, correlation: Correlation,
                 org: OrgEmailSettings) -> OwnerDecision:
    if mailbox.kind is MailboxKind.USER:
        if mailbox.owner is not None:
            return OwnerDecision(mailbox.owner, "the mailbox's user owns mail tracked from their mailbox")
        return OwnerDecision(None, "user mailbox without a CRM user: application user owns it")
    if mailbox.kind is MailboxKind.FORWARD_SINK:
        # plan_inbound tracks unwrapped mail for the forwarding user's mailbox, never for the sink itself.
        return OwnerDecision(None, "forward sink has no owner of its own")

    users = _recipient_users(parties)
    if correlation.matched is not None and correlation.matched.owner in users:
        return OwnerDecision(correlation.matched.owner, "queue: recipient who owns the correlated email")
    sender = parties.sender
    if (sender is not None and sender.record is not None and sender.record.table in CUSTOMER_TABLES
            and sender.owner in users):
        return OwnerDecision(sender.owner, f"queue: recipient who owns the sender's {sender.record.table}")
    if users:
        return OwnerDecision(users[0], "queue: first recipient user in To, Cc, Bcc order")
    if org.queue_owner_fallback is QueueOwnerFallback.QUEUE_OWNER and mailbox.queue_owner is not None:
        return OwnerDecision(mailbox.queue_owner, "queue: no recipient user; the queue's owner (setting)")
    return OwnerDecision(None, "queue: no recipient user; application user owns it (setting)")
