"""Activity parties: which addresses play which role, and which CRM rows they resolve to (crm-ref §7, dv-ref §2.2).

The service looks every address up ONCE per table (``addresses_to_look_up`` -> one ``$filter`` per table, issue 5
"lookups batched") and passes the result in as a plain :data:`PartyDirectory`; resolution itself is pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Final

from core.domain.model import Address, CrmRecordRef, CrmTable, MailMessage, OrgEmailSettings, PartyCandidate

__all__ = [
    "SENDER_TABLE_ORDER",
    "Direction",
    "ParticipationType",
    "PartyDirectory",
    "ResolvedParties",
    "ResolvedParty",
    "addresses_to_look_up",
    "party_addresses",
    "resolve_parties",
]

PartyDirectory = Mapping[str, Sequence[PartyCandidate]]  # lower-cased address -> every row carrying it


class ParticipationType(IntEnum):
    """``activityparty.participationtypemask`` values an email uses (dv-ref §2.2); 8/9 are platform-owned."""

    SENDER = 1
    TO = 2
    CC = 3
    BCC = 4


class Direction(StrEnum):
    INCOMING = "incoming"
    OUTGOING = "outgoing"

    @property
    def directioncode(self) -> bool:
        # email.directioncode: True = Outgoing, False = Incoming (dv-ref §2.1; crm-ref §13 item 12 warns about
        # snippets that get this backwards).
        return self is Direction.OUTGOING


# crm-ref §7: the sender resolves to exactly one record, in this table order; queues and custom email-enabled
# tables come last ("other email-enabled tables (queues, custom)").
SENDER_TABLE_ORDER: Final[tuple[str, ...]] = (
    CrmTable.SYSTEMUSER,
    CrmTable.CONTACT,
    CrmTable.ACCOUNT,
    CrmTable.LEAD,
    CrmTable.EQUIPMENT,
    CrmTable.TEAM,
    CrmTable.BUSINESSUNIT,
    CrmTable.QUEUE,
)


def _table_rank(table: str) -> tuple[int, str]:
    try:
        return (SENDER_TABLE_ORDER.index(table), table)
    except ValueError:
        return (len(SENDER_TABLE_ORDER), table)  # custom tables: after the known ones, by name (deterministic)


@dataclass(frozen=True, slots=True)
class ResolvedParty:
    """One party row: ``record`` None = unresolved (kept as ``addressused`` only, dv-ref §2.2)."""

    mask: ParticipationType
    address: Address
    record: CrmRecordRef | None
    owner: CrmRecordRef | None = None  # owner of the resolved record (feeds the owner walk)
    ambiguous: bool = False  # several rows matched and the org leaves such addresses unresolved


@dataclass(frozen=True, slots=True)
class ResolvedParties:
    parties: tuple[ResolvedParty, ...]

    @property
    def sender(self) -> ResolvedParty | None:
        return next((p for p in self.parties if p.mask is ParticipationType.SENDER), None)

    def recipients(self) -> tuple[ResolvedParty, ...]:
        """To, then Cc, then Bcc (the owner walk's order, crm-ref §7)."""
        order = (ParticipationType.TO, ParticipationType.CC, ParticipationType.BCC)
        return tuple(p for mask in order for p in self.parties if p.mask is mask)

    @property
    def unresolved(self) -> tuple[ResolvedParty, ...]:
        return tuple(p for p in self.parties if p.record is None)

    @property
    def sender_is_duplicate_unresolved(self) -> bool:
        """email.isduplicatesenderunresolved (crm-ref §11)."""
        sender = self.sender
        return sender is not None and sender.ambiguous


def party_addresses(message: MailMessage, direction: Direction) -> list[tuple[ParticipationType, Address]]:
    """Who plays which role. Sender = From, else Sender (crm-ref §7 "Sender resolves to exactly one record");
    for mail from the user's own Sent Items the message's From (else the mailbox) is the sender. Bcc is included
    when the message shows it (only the sender's copy does). Duplicates within one role are dropped; an address on
    both To and Cc keeps both rows, as CRM does."""
    result: list[tuple[ParticipationType, Address]] = []
    origin = message.originator
    if origin is None and direction is Direction.OUTGOING and message.mailbox:
        # A Sent Items copy without From (seen on some delegate-sent items) was sent by the mailbox itself.
        origin = Address.of("", message.mailbox)
    if origin is not None:
        result.append((ParticipationType.SENDER, origin))
    for mask, addresses in ((ParticipationType.TO, message.to), (ParticipationType.CC, message.cc),
                            (ParticipationType.BCC, message.bcc)):
        seen: set[str] = set()
        for address in addresses:
            if address.address not in seen:
                seen.add(address.address)
                result.append((mask, address))
    return result


def addresses_to_look_up(message: MailMessage) -> set[str]:
    """Every address whose CRM rows the planner needs: one query per table for all of them."""
    found = {a.address for a in message.recipients()}
    for address in (message.from_, message.sender):
        if address is not None:
            found.add(address.address)
    return found


def _eligible(candidates: Sequence[PartyCandidate], org: OrgEmailSettings) -> list[PartyCandidate]:
    # crm-ref §7: disabled users are always excluded; inactive records only with ResolveForInactiveEntities.
    kept = [c for c in candidates if not c.is_disabled_user and (c.is_active or org.resolve_for_inactive_entities)]
    # Deterministic order: table rank, then id (the directory's order is whatever the queries returned).
    kept.sort(key=lambda c: (_table_rank(c.record.table), str(c.record.id)))
    unique: list[PartyCandidate] = []
    seen: set[CrmRecordRef] = set()
    for candidate in kept:
        if candidate.record not in seen:
            seen.add(candidate.record)
            unique.append(candidate)
    return unique


def _resolve_sender(address: Address, candidates: list[PartyCandidate], org: OrgEmailSettings,
                    tracking_user: CrmRecordRef | None) -> ResolvedParty:
    if not candidates:
        return ResolvedParty(ParticipationType.SENDER, address, None)
    # crm-ref §7 (draft doc): "SystemUser will be first unless the tracking user is ALSO the owner of the
    # duplicated record" -> records the tracking user owns win over the table order.
    if tracking_user is not None:
        owned = [c for c in candidates if c.owner == tracking_user and c.record.table != CrmTable.SYSTEMUSER]
        if owned:
            candidates = owned
    first_table = candidates[0].record.table
    same_table = [c for c in candidates if c.record.table == first_table]
    if len(same_table) > 1 and org.unresolve_if_multiple_match:
        # email.isduplicatesenderunresolved: "sender ... is unresolved in case of multiple match" (crm-ref §11).
        return ResolvedParty(ParticipationType.SENDER, address, None, ambiguous=True)
    chosen = same_table[0]
    return ResolvedParty(ParticipationType.SENDER, address, chosen.record, owner=chosen.owner)


def resolve_parties(addresses: Sequence[tuple[ParticipationType, Address]], directory: PartyDirectory,
                    org: OrgEmailSettings, *, tracking_user: CrmRecordRef | None = None) -> ResolvedParties:
    """Resolve each (role, address) against ``directory``.

    * Sender: exactly one record, by :data:`SENDER_TABLE_ORDER`; several rows of that table -> the lowest id
      (deterministic), or unresolved when ``unresolve_if_multiple_match``.
    * To/Cc/Bcc: "every matching email-enabled record is listed" (crm-ref §7): one party row per record, all with
      the same ``addressused``; with ``unresolve_if_multiple_match`` and several rows -> one unresolved row.
    * No match -> unresolved row (``addressused`` only).
    """
    parties: list[ResolvedParty] = []
    for mask, address in addresses:
        candidates = _eligible(directory.get(address.address, ()), org)
        if mask is ParticipationType.SENDER:
            parties.append(_resolve_sender(address, candidates, org, tracking_user))
            continue
        if not candidates:
            parties.append(ResolvedParty(mask, address, None))
        elif len(candidates) > 1 and org.unresolve_if_multiple_match:
            parties.append(ResolvedParty(mask, address, None, ambiguous=True))
        else:
            parties.extend(ResolvedParty(mask, address, c.record, owner=c.owner) for c in candidates)
    return ResolvedParties(tuple(parties))
