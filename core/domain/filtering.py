"""The tracking filter: does anybody want this email in CRM? (crm-ref §5.1-§5.3)

* Folder-level tracking first: mail in a folder mapped to a record is tracked with that record as Regarding,
  "regardless of the filtering options configured" (crm-ref §5.3); user mailboxes only (not queues, crm-ref §4).
* Otherwise the receiving mailbox's owner and every resolved user/queue recipient is asked, in that order (owner,
  then To, Cc, Bcc), under ITS OWN ``incomingemailfilteringmethod``; the first that accepts is the accepting entity
  (``email.acceptingentityid``, crm-ref §5.2). ``UseFilteringMethodOfSyncingMailboxOnlyForCorrelation`` limits this
  to the receiving mailbox.
* A recipient counts only when it has a mailbox whose incoming method is not None ("Incoming method None -> no
  incoming processing", crm-ref §5.2) and is enabled for incoming email.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from core.domain.correlation import Correlation
from core.domain.model import (
    CrmRecordRef,
    CrmTable,
    InboundMethod,
    MailboxConfig,
    MailboxKind,
    MailMessage,
    OrgEmailSettings,
    TrackingFilter,
)
from core.domain.parties import Direction, ResolvedParties, ResolvedParty

__all__ = [
    "CUSTOMER_TABLES",
    "FilterEvaluation",
    "TrackingDecision",
    "accepts",
    "decide_tracking",
]

CUSTOMER_TABLES: Final = frozenset({CrmTable.LEAD, CrmTable.CONTACT, CrmTable.ACCOUNT})  # filter value 2


@dataclass(frozen=True, slots=True)
class FilterEvaluation:
    entity: CrmRecordRef
    tracking_filter: TrackingFilter
    accepted: bool
    why: str


@dataclass(frozen=True, slots=True)
class TrackingDecision:
    tracked: bool
    via: Literal["folder", "category", "filter", "none"]
    accepting_entity: CrmRecordRef | None
    folder_regarding: CrmRecordRef | None
    why: str
    evaluations: tuple[FilterEvaluation, ...] = ()


def _counterparts(parties: ResolvedParties, direction: Direction) -> tuple[ResolvedParty, ...]:
    """Whose record the "from ..." filters look at. Incoming: the sender (crm-ref §5.1 "messages from ...").
    Outgoing (Sent Items with AutoTrackSentFolderItems): SSS "scans Sent Items with the user's filtering method"
    (crm-ref §5.3) without saying how "from" reads for the user's own mail; we read it as "with": the recipients.
    NOT VERIFIED against SSS; documented in docs/tracking-rules.md."""
    if direction is Direction.OUTGOING:
        return parties.recipients()
    sender = parties.sender
    return (sender,) if sender is not None else ()


def accepts(tracking_filter: TrackingFilter, *, parties: ResolvedParties, correlation: Correlation,
            direction: Direction) -> tuple[bool, str]:
    """One entity's verdict under its own filter value (crm-ref §5.1), with the reason."""
    if tracking_filter is TrackingFilter.ALL:
        return True, "filter 0: all email messages"
    if tracking_filter is TrackingFilter.NONE:
        return False, "filter 4: no email messages"
    if tracking_filter is TrackingFilter.REPLIES_TO_CRM_EMAIL:
        if correlation.found:
            return True, f"filter 1: reply to a CRM email (matched by {correlation.method.value})"
        return False, "filter 1: not a reply to a CRM email"
    records = [p.record for p in _counterparts(parties, direction) if p.record is not None]
    who = "recipient" if direction is Direction.OUTGOING else "sender"
    if tracking_filter is TrackingFilter.FROM_LEADS_CONTACTS_ACCOUNTS:
        customer = next((r for r in records if r.table in CUSTOMER_TABLES), None)
        if customer is not None:
            return True, f"filter 2: {who} resolves to a {customer.table}"
        return False, f"filter 2: {who} does not resolve to a lead, contact or account"
    if records:
        return True, f"filter 3: {who} resolves to an email-enabled {records[0].table}"
    return False, f"filter 3: {who} does not resolve to any CRM record"


def _may_receive(config: MailboxConfig) -> bool:
    return config.enabled_for_incoming and config.inbound_method is not InboundMethod.NONE


def decide_tracking(message: MailMessage, mailbox: MailboxConfig, *, parties: ResolvedParties,
                    correlation: Correlation, direction: Direction, org: OrgEmailSettings,
                    mailboxes_by_owner: Mapping[CrmRecordRef, MailboxConfig],
                    requested_category: str = "") -> TrackingDecision:
    """Tracked or not, by whom, and why. ``mailbox`` is the mailbox the mail is tracked for (for a forward sink:
    the forwarding user's mailbox). ``requested_category``: the user gave the message this Outlook category (track
    by category): tracked for the mailbox's owner "regardless of the filtering options configured" (SSS)."""
    folder_id = message.folder.folder_id
    if mailbox.kind is MailboxKind.USER and folder_id and folder_id in mailbox.folder_regarding:
        regarding = mailbox.folder_regarding[folder_id]
        return TrackingDecision(True, "folder", mailbox.owner, regarding,
                                f"folder-level tracking: folder {folder_id!r} is mapped to {regarding.table} "
                                f"{regarding.id}")
    if requested_category:
        return TrackingDecision(True, "category", mailbox.owner, None,
                                f"the user asked for it with the Outlook category {requested_category!r} (manual "
                                "tracking: the tracking filter does not apply)")

    entities: list[tuple[CrmRecordRef, TrackingFilter]] = []
    if mailbox.owner is not None:
        entities.append((mailbox.owner, mailbox.tracking_filter))
    if not org.use_syncing_mailbox_filter_only:
        for party in parties.recipients():
            record = party.record
            if record is None or record.table not in (CrmTable.SYSTEMUSER, CrmTable.QUEUE):
                continue
            if any(record == e for e, _ in entities):
                continue
            config = mailboxes_by_owner.get(record)
            if config is not None and _may_receive(config):
                entities.append((record, config.tracking_filter))

    evaluations: list[FilterEvaluation] = []
    for entity, tracking_filter in entities:
        ok, why = accepts(tracking_filter, parties=parties, correlation=correlation, direction=direction)
        evaluations.append(FilterEvaluation(entity, tracking_filter, ok, why))
        if ok:
            return TrackingDecision(True, "filter", entity, None, f"accepted by {entity.table} {entity.id}: {why}",
                                    tuple(evaluations))
    why = "no user or queue accepted the email (SSS NoCorrelationMatch)"
    if not entities:
        why = "no user or queue with incoming processing is party to the email"
    return TrackingDecision(False, "none", None, None, why, tuple(evaluations))
