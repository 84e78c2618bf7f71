"""``plan_inbound``: one normalised message + everything looked up for it -> a plan (Skip or TrackEmail).

The service does: normalise -> :func:`inbound_lookups` (what to query: addresses, correlation keys - one query per
table) -> query -> :func:`plan_inbound` -> apply the plan (:func:`plan_email_row` & co. give the Dataverse bodies).
Each step appends a :class:`Decision` so an admin can ask later why a message was or was not tracked (issue 5
"decision record").

Step order (docs/tracking-rules.md): mailbox gates -> forward unwrap (sinks) -> skip rules -> direction -> parties
-> correlation -> tracking filter / folder -> owner -> regarding -> body and attachments -> auto-create contact.
"""

from __future__ import annotations

import html
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final, Literal

from core.domain.category import category_trackable, has_category
from core.domain.correlation import (
    Correlation,
    CorrelationKeys,
    CorrelationLookup,
    CorrelationMethod,
    KnownEmail,
    conversation_index_key,
    correlate,
    correlation_keys,
)
from core.domain.filtering import decide_tracking
from core.domain.forward import NotUnwrapped, Unwrapped, unwrap_forwarded
from core.domain.identity import activity_id_for, attachment_id_for, canonical_message_id, contact_id_for
from core.domain.model import (
    ApprovalStatus,
    Base64Content,
    CrmRecordRef,
    CrmTable,
    FolderKind,
    InboundMethod,
    MailboxConfig,
    MailboxKind,
    MailMessage,
    OrgEmailSettings,
)
from core.domain.org_schema import DOCUMENTED, OrgSchema
from core.domain.owner import choose_owner
from core.domain.parties import (
    Direction,
    PartyDirectory,
    ResolvedParties,
    ResolvedParty,
    addresses_to_look_up,
    party_addresses,
    resolve_parties,
)
from core.domain.sanitize import sanitize_html, text_to_html
from core.domain.skip import first_skip_reason

__all__ = [
    "EMAIL_SUBJECT_MAX",
    "MESSAGEID_MAX",
    "Decision",
    "InboundContext",
    "InboundLookups",
    "InboundPlan",
    "MailboxIndex",
    "NewContact",
    "OmittedAttachment",
    "PlannedAttachment",
    "Skip",
    "TrackEmail",
    "already_in_crm",
    "decision_record",
    "explain",
    "explain_record",
    "inbound_lookups",
    "mailbox_index",
    "plan_attachment_rows",
    "plan_contact_row",
    "plan_email_row",
    "plan_inbound",
    "plan_state_patch",
    "unbound_relationships",
    "with_own_message_id",
]

EMAIL_SUBJECT_MAX: Final = 800  # email.subject String 800 (dv-ref §2.1)
MESSAGEID_MAX: Final = 320  # email.messageid String 320 (dv-ref §2.1)
ADDRESSUSED_MAX: Final = 320  # activityparty.addressused String 320 (dv-ref §2.2)
CONTACT_NAME_MAX: Final = 50  # contact.firstname / lastname String 50 (contact.md)
CONTACT_EMAIL_MAX: Final = 100  # contact.emailaddress1 String 100 (contact.md)

# State/status pairs (dv-ref §2.4): Received {1,4} for incoming mail, Sent {1,3} for mail from Sent Items.
RECEIVED: Final = (1, 4)
SENT: Final = (1, 3)

# Navigation property names are the org's (core.domain.org_schema.OrgSchema, read from EntityDefinitions): the row
# builders below take the schema as a value and bind only what the org declares. The deep-insert collection name is
# the one-to-many relationship's ReferencedEntityNavigationPropertyName (email.md).
NAV_PARTIES: Final = "email_activity_parties"


@dataclass(frozen=True, slots=True)
class Decision:
    step: str
    outcome: str
    why: str


@dataclass(frozen=True)
class InboundContext:
    """Everything the planner needs besides the message; all plain data, ``now`` passed in (no clock reads)."""

    mailbox: MailboxConfig  # the mailbox the message was seen in (a user's, a queue's, or a forward sink)
    org: OrgEmailSettings
    now: datetime
    directory: PartyDirectory = field(default_factory=dict)
    correlation: CorrelationLookup = field(default_factory=CorrelationLookup.empty)
    forward_users: Mapping[str, MailboxConfig] = field(default_factory=dict)
    known_mailboxes: Sequence[MailboxConfig] = ()
    # Track by category: the org's tracking category when this message came as a user's request
    # (InboundItem source "category" while TrackCategorizedItems is on); "" otherwise.
    requested_category: str = ""

    def mailboxes_by_owner(self) -> Mapping[CrmRecordRef, MailboxConfig]:
        return mailbox_index(self.known_mailboxes).by_owner

    def queue_addresses(self) -> frozenset[str]:
        return mailbox_index(self.known_mailboxes).queue_addresses


@dataclass(frozen=True, slots=True)
class MailboxIndex:
    """Lookups over the org's known mailboxes that the planner (and the processor) need for every message."""

    known: Sequence[MailboxConfig]
    by_owner: Mapping[CrmRecordRef, MailboxConfig]
    queue_addresses: frozenset[str]
    forward_users: Mapping[str, MailboxConfig]  # address -> config of the users/queues whose inbound is Forward


_last_index: MailboxIndex | None = None


def mailbox_index(known: Sequence[MailboxConfig]) -> MailboxIndex:
    """The :class:`MailboxIndex` of ``known``. Every message of a process is planned against the same snapshot tuple
    of known mailboxes (the processor refreshes it on a TTL), and these were rebuilt from it for every message: O(org
    mailboxes) per email, twice for the owner map (CPU; 10,000 mailboxes in the scale target). The index of the last
    tuple is kept and reused while the very same tuple comes in (a tuple of frozen configs: same input, same
    index); any other sequence gets a fresh one. The maps are read-only views."""
    global _last_index
    last = _last_index
    if last is not None and last.known is known:
        return last
    index = MailboxIndex(
        known=known,
        by_owner=MappingProxyType({m.owner: m for m in known if m.owner is not None}),
        queue_addresses=frozenset(m.address for m in known if m.kind is MailboxKind.QUEUE),
        forward_users=MappingProxyType({m.address: m for m in known if m.inbound_method is InboundMethod.FORWARD}),
    )
    if isinstance(known, tuple):
        _last_index = index
    return index


@dataclass(frozen=True, slots=True)
class InboundLookups:
    """What the service must query before planning: ``message`` is the message that will be tracked (the unwrapped
    original for a sink), ``addresses`` go to one query per party table, ``keys`` to the correlation lookup."""

    message: MailMessage | None
    addresses: frozenset[str]
    keys: CorrelationKeys


@dataclass(frozen=True, slots=True)
class PlannedAttachment:
    attachment_id: uuid.UUID
    filename: str
    mimetype: str
    content: bytes
    content_id: str | None
    is_inline: bool


@dataclass(frozen=True, slots=True)
class OmittedAttachment:
    filename: str
    size: int
    reason: str


@dataclass(frozen=True, slots=True)
class NewContact:
    """A contact to create for an unknown sender (crm-ref §8 "Automatically create records")."""

    contact_id: uuid.UUID
    email: str
    first_name: str
    last_name: str
    owner: CrmRecordRef | None


@dataclass(frozen=True)
class Skip:
    stage: Literal["mailbox", "unwrap", "skip_rule", "filter"]
    code: str
    why: str
    decisions: tuple[Decision, ...]
    wrapper_graph_id: str | None = None
    original: MailMessage | None = None  # the forwarded original, when the message was an unwrapped wrapper


@dataclass(frozen=True)
class TrackEmail:
    activity_id: uuid.UUID
    message_id: str
    graph_id: str
    mailbox_address: str
    receiving_mailbox_id: uuid.UUID | None
    direction: Direction
    subject: str
    description: str
    parties: ResolvedParties
    regarding: CrmRecordRef | None
    owner: CrmRecordRef | None
    accepting_entity: CrmRecordRef | None
    parent_activity_id: uuid.UUID | None
    correlation_method: CorrelationMethod
    tracking_token: str | None
    actual_end: datetime
    sent_on: datetime | None
    conversation_index: str | None
    in_reply_to: str | None
    state_code: int
    status_code: int
    priority_code: int
    attachments: tuple[PlannedAttachment, ...]
    omitted_attachments: tuple[OmittedAttachment, ...]
    new_contact: NewContact | None
    notifications: int  # email.notifications: 0 None, 1 attachments not all saved (dv-ref §2.1)
    is_duplicate_sender_unresolved: bool
    wrapper_graph_id: str | None
    delete_wrapper: bool
    decisions: tuple[Decision, ...]
    original: MailMessage | None = None  # the forwarded original, when the message was an unwrapped wrapper
    # The CRM email this one correlated to (email.correlatedactivityid, as SSS sets it; audit 1c #21).
    correlated_activity_id: uuid.UUID | None = None
    # The navigation property the correlated email's regarding was bound through
    # (Microsoft.Dynamics.CRM.associatednavigationproperty): binding the copy through the same name is exact.
    regarding_nav: str | None = None
    # What normalisation left out that the CRM email would hold (listed in its description, ``notifications``).
    dropped: tuple[str, ...] = ()


InboundPlan = Skip | TrackEmail


# ------------------------------------------------------------------------------------------------ lookups


def _unwrap(message: MailMessage, context: InboundContext) -> Unwrapped | NotUnwrapped | None:
    if context.mailbox.kind is not MailboxKind.FORWARD_SINK:
        return None
    return unwrap_forwarded(message, context.mailbox, context.forward_users, trust=context.org.wrapper_trust)


def inbound_lookups(message: MailMessage, context: InboundContext) -> InboundLookups:
    """The queries to run before :func:`plan_inbound` (directory and correlation fields of ``context`` unused)."""
    unwrapped = _unwrap(message, context)
    if isinstance(unwrapped, NotUnwrapped):
        return InboundLookups(None, frozenset(), CorrelationKeys())
    target = unwrapped.original if isinstance(unwrapped, Unwrapped) else message
    keys = with_own_message_id(correlation_keys(target, context.org), target)
    return InboundLookups(target, frozenset(addresses_to_look_up(target)), keys)


def with_own_message_id(keys: CorrelationKeys, message: MailMessage) -> CorrelationKeys:
    """The loop guard SSS relies on: the message's own Message-ID is looked up with the correlation keys (the same
    ``messageid`` query, no extra request). A CRM email that has it already *is* this message - typically the CRM
    email the router sent, whose Sent Items copy or forwarded copy comes back (:func:`already_in_crm`)."""
    if not message.internet_message_id:
        return keys
    try:
        own = canonical_message_id(message.internet_message_id)
    except ValueError:
        return keys
    if own in keys.message_ids:
        return keys
    return replace(keys, message_ids=(*keys.message_ids, own))


def already_in_crm(plan: TrackEmail, lookup: CorrelationLookup) -> KnownEmail | None:
    """The CRM email that already has this plan's Message-ID (looked up by :func:`with_own_message_id`), if any:
    the message is then tracked already and nothing is written."""
    return lookup.by_message_id.get(plan.message_id)


# ------------------------------------------------------------------------------------------------ helpers


def _mailbox_gate(mailbox: MailboxConfig) -> tuple[str, str] | None:
    """Reasons a mailbox's own mail is not processed at all (crm-ref §2.1-§2.3)."""
    if not mailbox.enabled_for_incoming:
        return "disabled", f"{mailbox.address} is not enabled for incoming email"
    if mailbox.kind is MailboxKind.FORWARD_SINK:
        return None
    method = mailbox.inbound_method
    if method is InboundMethod.NONE:
        return "inbound_none", "incoming method is None"
    if method is InboundMethod.OUTLOOK:
        return "inbound_outlook", "incoming method is Outlook: the Outlook client tracks this user's mail"
    if method is InboundMethod.FORWARD:
        return "inbound_forward", "incoming method is Forward Mailbox: mail is tracked through the sink"
    return None


def _requested_category(message: MailMessage, context: InboundContext) -> str:
    """The tracking category when the user asked for this message (track by category) and may: the request came
    from the category search, the mailbox is one whose users may ask (core/domain/category.py), and the message,
    as fetched now, still carries the category (a user who removed it again has withdrawn the request)."""
    name = context.requested_category
    if name and category_trackable(context.mailbox) and has_category(message.categories, name):
        return name
    return ""


def _approval_gate(mailbox: MailboxConfig, org: OrgEmailSettings) -> tuple[str, str] | None:
    required = (org.require_approval_for_queue_email if mailbox.kind is MailboxKind.QUEUE
                else org.require_approval_for_user_email)
    if required and mailbox.approval is not ApprovalStatus.APPROVED:
        return "not_approved", f"email address {mailbox.address} is not approved ({mailbox.approval.name})"
    return None


def _base64_size(size: int) -> int:
    # maxuploadfilesize applies to the base64 size (dv-ref §3).
    return 4 * math.ceil(size / 3)


def _human_size(size: int) -> str:
    return f"{size / 1_048_576:.1f} MB" if size >= 1_048_576 else f"{math.ceil(size / 1024)} KB"


def _plan_attachments(message: MailMessage, activity_id: uuid.UUID, org: OrgEmailSettings
                      ) -> tuple[tuple[PlannedAttachment, ...], tuple[OmittedAttachment, ...]]:
    kept: list[PlannedAttachment] = []
    omitted: list[OmittedAttachment] = []
    for index, attachment in enumerate(message.attachments):
        content = attachment.content
        # Without content: an Outlook item, or a file listed by metadata only (the processor downloads only what
        # fits the limit, so a missing file over the limit is "too large", not "unavailable").
        size = len(content) if content is not None else attachment.size
        too_large = _base64_size(size) > org.max_attachment_bytes
        if content is None and (attachment.is_item or not too_large):
            what = "attached Outlook item" if attachment.is_item else "content not available"
            omitted.append(OmittedAttachment(attachment.name, attachment.size, f"{what}, not saved"))
            continue
        if content is None or too_large:
            omitted.append(OmittedAttachment(
                attachment.name, size,
                f"larger than the organisation's attachment limit of {_human_size(org.max_attachment_bytes)}"))
            continue
        kept.append(PlannedAttachment(
            attachment_id=attachment_id_for(activity_id, index, attachment.name),
            filename=attachment.name[:255],
            mimetype=attachment.content_type[:256],
            content=content,
            content_id=attachment.content_id,
            is_inline=attachment.is_inline,
        ))
    return tuple(kept), tuple(omitted)


# Normalisation notes (MailMessage.truncations) about what CRM stores of the email: shown on the email itself.
# Notes about headers the email row does not keep (References, categories, Thread-Index, Date) stay in the
# decision record only.
_VISIBLE_NOTES: Final = frozenset({"attachment", "attachments", "message/rfc822", "body", "subject", "from",
                                   "sender", "toRecipients", "ccRecipients", "bccRecipients", "To", "Cc", "Bcc",
                                   "From", "Sender"})


def visible_drops(truncations: Sequence[str]) -> tuple[str, ...]:
    """The normalisation notes that change what the CRM email holds (see :data:`_VISIBLE_NOTES`). Pure."""
    return tuple(n for n in truncations if n.split(":", 1)[0].split(" ", 1)[0] in _VISIBLE_NOTES)


def notifications_for(omitted: Sequence[OmittedAttachment], drops: Sequence[str]) -> int:
    """``email.notifications`` (email.md): 1 = not all attachments could be saved, 2 = truncated body, 0 = none.
    One value only: a missing attachment is named first (the description lists both)."""
    if omitted or any(d.startswith(("attachment", "message/rfc822")) for d in drops):
        return 1
    if any(d.startswith("body") for d in drops):
        return 2
    return 0


def _description(message: MailMessage, omitted: Sequence[OmittedAttachment], drops: Sequence[str] = ()) -> str:
    if message.body_html is not None:
        body = sanitize_html(message.body_html)
    else:
        body = text_to_html(message.body_text or "")
    items = [f"<li>{html.escape(o.filename)} ({_human_size(o.size)}): {html.escape(o.reason)}</li>" for o in omitted]
    items += [f"<li>{html.escape(d)}</li>" for d in drops]
    if items:
        title = "attachments not saved in CRM" if omitted and not drops else "not everything of this message is " \
            "in CRM"
        body += f"<hr><p>Email Router: {title}:</p><ul>{''.join(items)}</ul>"
    return body


def _split_name(display: str, address: str) -> tuple[str, str]:
    display = " ".join(display.replace('"', "").split())
    if "," in display:  # "Last, First"
        last, _, first = display.partition(",")
        return first.strip()[:CONTACT_NAME_MAX], last.strip()[:CONTACT_NAME_MAX] or address[:CONTACT_NAME_MAX]
    if " " in display:
        first, _, last = display.rpartition(" ")
        return first[:CONTACT_NAME_MAX], last[:CONTACT_NAME_MAX]
    return "", (display or address.partition("@")[0])[:CONTACT_NAME_MAX]


def _new_contact(parties: ResolvedParties, mailbox: MailboxConfig, direction: Direction,
                 org: OrgEmailSettings, owner: CrmRecordRef | None) -> NewContact | None:
    sender = parties.sender
    if (not mailbox.auto_create_contacts or mailbox.kind is not MailboxKind.USER
            or direction is not Direction.INCOMING or sender is None or sender.record is not None
            or sender.ambiguous or org.is_internal(sender.address.address)
            or len(sender.address.address) > CONTACT_EMAIL_MAX):  # the contact could not hold the address
        return None
    first, last = _split_name(sender.address.name, sender.address.address)
    return NewContact(contact_id_for(sender.address.address), sender.address.address, first, last, owner)


def _bind_sender_to(parties: ResolvedParties, contact: NewContact) -> ResolvedParties:
    ref = CrmRecordRef(CrmTable.CONTACT, contact.contact_id)
    return ResolvedParties(tuple(
        replace(p, record=ref, owner=contact.owner)
        if p.record is None and p.address.address == contact.email and not p.ambiguous else p
        for p in parties.parties))


# ------------------------------------------------------------------------------------------------ the planner


def plan_inbound(message: MailMessage, context: InboundContext) -> InboundPlan:
    org = context.org
    decisions: list[Decision] = []
    original: MailMessage | None = None

    def skip(stage: Literal["mailbox", "unwrap", "skip_rule", "filter"], code: str, why: str,
             wrapper_graph_id: str | None = None) -> Skip:
        decisions.append(Decision(stage, f"skip:{code}", why))
        return Skip(stage, code, why, tuple(decisions), wrapper_graph_id, original)

    gate = _mailbox_gate(context.mailbox)
    if gate is not None:
        return skip("mailbox", *gate)
    decisions.append(Decision("mailbox", "ok", f"{context.mailbox.kind.value} mailbox {context.mailbox.address}"))

    tracking_mailbox = context.mailbox
    wrapper_graph_id: str | None = None
    truncations = message.truncations  # the whole fetched message's, nested original included
    unwrapped = _unwrap(message, context)
    if isinstance(unwrapped, NotUnwrapped):
        return skip("unwrap", unwrapped.code.value, unwrapped.why, message.graph_id)
    if isinstance(unwrapped, Unwrapped):
        message, tracking_mailbox, wrapper_graph_id = (unwrapped.original, unwrapped.tracking_mailbox,
                                                       unwrapped.wrapper_graph_id)
        original = message
        decisions.append(Decision("unwrap", "ok", f"forwarded by {tracking_mailbox.address}; tracked for them"))
    approval = _approval_gate(tracking_mailbox, org)
    if approval is not None:
        return skip("mailbox", *approval, wrapper_graph_id=wrapper_graph_id)

    requested = _requested_category(message, context)
    if requested:
        decisions.append(Decision("request", "category", f"the user gave the message the Outlook category "
                                  f"{requested!r}: tracked whatever the tracking filter and the folder"))
    reason = first_skip_reason(message, tracking_mailbox, org, queue_addresses=context.queue_addresses(),
                               manual=bool(requested))
    if reason is not None:
        return skip("skip_rule", reason.code.value, reason.why, wrapper_graph_id)
    decisions.append(Decision("skip_rule", "none", "no skip rule matched"))
    internet_message_id = message.internet_message_id or ""  # non-empty: the NO_MESSAGE_ID skip rule ran

    direction = Direction.OUTGOING if message.folder.kind is FolderKind.SENT_ITEMS else Direction.INCOMING
    decisions.append(Decision("direction", direction.value,
                              "tracked from the user's Sent Items" if direction is Direction.OUTGOING
                              else "received mail"))

    parties = resolve_parties(party_addresses(message, direction), context.directory, org,
                              tracking_user=tracking_mailbox.owner)
    decisions.append(Decision("parties", f"{len(parties.parties)} parties, {len(parties.unresolved)} unresolved",
                              "sender: " + (_describe(parties.sender) if parties.sender else "none")))

    correlation: Correlation = correlate(message, context.correlation, org)
    decisions.append(Decision("correlation", correlation.method.value,
                              f"matched {correlation.key} -> email {correlation.matched.activity_id}"
                              if correlation.matched else "no known conversation"))

    tracking = decide_tracking(message, tracking_mailbox, parties=parties, correlation=correlation,
                               direction=direction, org=org, mailboxes_by_owner=context.mailboxes_by_owner(),
                               requested_category=requested)
    for evaluation in tracking.evaluations:
        decisions.append(Decision("filter", "accept" if evaluation.accepted else "reject",
                                  f"{evaluation.entity.table} {evaluation.entity.id}: {evaluation.why}"))
    if not tracking.tracked:
        return skip("filter", "not_accepted", tracking.why, wrapper_graph_id)
    decisions.append(Decision("filter", f"tracked:{tracking.via}", tracking.why))

    owner = choose_owner(tracking_mailbox, parties=parties, correlation=correlation, org=org)
    decisions.append(Decision("owner", str(owner.owner.id) if owner.owner else "application user", owner.rule))

    regarding = tracking.folder_regarding or correlation.regarding
    decisions.append(Decision(
        "regarding", f"{regarding.table} {regarding.id}" if regarding else "none",
        "folder mapping" if tracking.folder_regarding else
        ("copied from the correlated email (crm-ref §6.1)" if regarding else "no folder mapping or correlation")))

    activity_id = activity_id_for(internet_message_id)
    attachments, omitted = _plan_attachments(message, activity_id, org)
    for item in omitted:
        decisions.append(Decision("attachments", "omitted", f"{item.filename}: {item.reason}"))

    new_contact = _new_contact(parties, tracking_mailbox, direction, org, owner.owner)
    if new_contact is not None:
        parties = _bind_sender_to(parties, new_contact)
        decisions.append(Decision("auto_create", "contact", f"unknown sender {new_contact.email}"))

    message_id = canonical_message_id(internet_message_id)
    if len(message_id) > MESSAGEID_MAX:
        decisions.append(Decision("messageid", "truncated", f"Message-ID longer than {MESSAGEID_MAX} characters"))
    state = SENT if direction is Direction.OUTGOING else RECEIVED
    actual_end = ((message.sent_at if direction is Direction.OUTGOING else message.received_at)
                  or message.received_at or message.sent_at or context.now)
    for note in truncations:
        decisions.append(Decision("normalize", "truncated", note))
    drops = visible_drops(truncations)

    return TrackEmail(
        activity_id=activity_id,
        message_id=message_id[:MESSAGEID_MAX],
        graph_id=message.graph_id,
        mailbox_address=tracking_mailbox.address,
        receiving_mailbox_id=(context.mailbox.mailbox_id if context.mailbox.kind is not MailboxKind.FORWARD_SINK
                              else tracking_mailbox.mailbox_id),
        direction=direction,
        subject=message.subject[:EMAIL_SUBJECT_MAX],
        description=_description(message, omitted, drops),
        parties=parties,
        regarding=regarding,
        owner=owner.owner,
        accepting_entity=tracking.accepting_entity,
        parent_activity_id=correlation.parent_activity_id,
        correlation_method=correlation.method,
        tracking_token=correlation.tracking_token,
        actual_end=actual_end,
        sent_on=message.sent_at,
        conversation_index=conversation_index_key(message.conversation_index) if message.conversation_index else None,
        in_reply_to=canonical_message_id(message.in_reply_to)[:MESSAGEID_MAX] if message.in_reply_to else None,
        state_code=state[0],
        status_code=state[1],
        priority_code=message.importance.crm_priority,
        attachments=attachments,
        omitted_attachments=omitted,
        new_contact=new_contact,
        notifications=notifications_for(omitted, drops),
        dropped=drops,
        is_duplicate_sender_unresolved=parties.sender_is_duplicate_unresolved,
        wrapper_graph_id=wrapper_graph_id,
        delete_wrapper=wrapper_graph_id is not None and context.mailbox.delete_after_processing,
        decisions=tuple(decisions),
        original=original,
        correlated_activity_id=correlation.matched.activity_id if correlation.matched is not None else None,
        regarding_nav=(correlation.matched.regarding_nav if correlation.matched is not None
                       and not tracking.folder_regarding and regarding == correlation.regarding else None),
    )


def _describe(party: ResolvedParty | None) -> str:
    if party is None:
        return "none"
    if party.record is None:
        return f"{party.address.address} unresolved" + (" (several matches)" if party.ambiguous else "")
    return f"{party.address.address} -> {party.record.table} {party.record.id}"


# ------------------------------------------------------------------------------------------------ outputs


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _bind(row: dict[str, Any], schema: OrgSchema, entity: str, attribute: str, target: CrmRecordRef | str,
          record_id: uuid.UUID | None = None, *, nav: str | None = None) -> bool:
    """Add ``<nav>@odata.bind`` when the org declares the relationship; report whether it did. An undeclared
    relationship is left out (the row stays valid) instead of failing the whole change set with 0x80048d19."""
    table = target.table if isinstance(target, CrmRecordRef) else target
    rid = target.id if isinstance(target, CrmRecordRef) else record_id
    name = nav or schema.nav(entity, attribute, table)
    path = schema.bind_path(table, rid) if rid is not None else None
    if isinstance(target, CrmRecordRef) and target.entity_set_override:
        path = target.bind_path
    if name is None or path is None:
        return False
    row[f"{name}@odata.bind"] = path
    return True


def _party_row(party: ResolvedParty, schema: OrgSchema) -> dict[str, Any]:
    row: dict[str, Any] = {"participationtypemask": int(party.mask),
                           "addressused": party.address.address[:ADDRESSUSED_MAX]}
    if party.record is not None:
        _bind(row, schema, "activityparty", "partyid", party.record)
    return row


def plan_email_row(plan: TrackEmail, schema: OrgSchema = DOCUMENTED, *,
                   include_read_only_columns: bool = False) -> dict[str, Any]:
    """The ``POST /emails`` body (dv-ref §2.5): client-set ``activityid``, deep-inserted parties, binds.

    Every bind goes through the navigation property ``schema`` says the org declares; a relationship it does not
    declare is simply not bound. ``acceptingentityid`` is declared under ONE name for queue and systemuser
    (email.md), which :meth:`OrgSchema.nav` treats as ambiguous: the router leaves it to the platform.

    Created Open/Draft; the state change to Received/Sent is a separate PATCH (:func:`plan_state_patch`) because
    state/status in the create POST is NOT VERIFIED (dv-ref §2.4). ``conversationindex``, ``inreplyto`` and
    ``senton`` are read-only in the reference (email.md): only sent when ``include_read_only_columns``
    (an org/emulator that accepts them); ``correlationmethod`` is system-only and never sent.
    """
    row: dict[str, Any] = {
        "activityid": str(plan.activity_id),
        "subject": plan.subject,
        "description": plan.description,
        "directioncode": plan.direction.directioncode,
        "messageid": plan.message_id,
        "actualend": _iso(plan.actual_end),
        "prioritycode": plan.priority_code,
        NAV_PARTIES: [_party_row(p, schema) for p in plan.parties.parties],
    }
    if plan.tracking_token:
        row["trackingtoken"] = plan.tracking_token
    if plan.notifications:
        row["notifications"] = plan.notifications
    if plan.is_duplicate_sender_unresolved:
        row["isduplicatesenderunresolved"] = True
    if plan.regarding is not None:
        _bind(row, schema, "email", "regardingobjectid", plan.regarding, nav=plan.regarding_nav)
    if plan.owner is not None:
        _bind(row, schema, "email", "ownerid", plan.owner)
    if plan.parent_activity_id is not None:
        _bind(row, schema, "email", "parentactivityid", "email", plan.parent_activity_id)
    if plan.correlated_activity_id is not None:
        _bind(row, schema, "email", "correlatedactivityid", "email", plan.correlated_activity_id)
    if plan.receiving_mailbox_id is not None:
        _bind(row, schema, "email", "receivingmailboxid", "mailbox", plan.receiving_mailbox_id)
    if plan.accepting_entity is not None:
        _bind(row, schema, "email", "acceptingentityid", plan.accepting_entity)
    if include_read_only_columns:
        if plan.conversation_index:
            row["conversationindex"] = plan.conversation_index
        if plan.in_reply_to:
            row["inreplyto"] = plan.in_reply_to
        if plan.sent_on is not None:
            row["senton"] = _iso(plan.sent_on)
    return row


def unbound_relationships(plan: TrackEmail, schema: OrgSchema) -> list[str]:
    """The links of ``plan`` the org declares no navigation property for (logged; a doctor finding)."""
    wanted: list[tuple[str, str, str]] = []
    if plan.regarding is not None and plan.regarding_nav is None:
        wanted.append(("email", "regardingobjectid", plan.regarding.table))
    if plan.owner is not None:
        wanted.append(("email", "ownerid", plan.owner.table))
    if plan.parent_activity_id is not None:
        wanted.append(("email", "parentactivityid", "email"))
    if plan.correlated_activity_id is not None:
        wanted.append(("email", "correlatedactivityid", "email"))
    if plan.receiving_mailbox_id is not None:
        wanted.append(("email", "receivingmailboxid", "mailbox"))
    # acceptingentityid is left out on purpose where the org declares it ambiguously (every documented org): not a gap
    wanted += [("activityparty", "partyid", p.record.table) for p in plan.parties.parties if p.record is not None]
    return sorted({f"{e}.{a}->{t}" for e, a, t in wanted if schema.nav(e, a, t) is None})


def plan_state_patch(plan: TrackEmail) -> dict[str, int]:
    """``PATCH /emails(<id>)`` after the create: Received {1,4} or Sent {1,3} (dv-ref §2.4)."""
    return {"statecode": plan.state_code, "statuscode": plan.status_code}


def plan_attachment_rows(plan: TrackEmail, schema: OrgSchema = DOCUMENTED) -> list[dict[str, Any]]:
    """``POST /activitymimeattachments`` bodies (dv-ref §3), each with a deterministic id; created before the
    state change (completed email is read-only)."""
    rows: list[dict[str, Any]] = []
    for attachment in plan.attachments:
        row: dict[str, Any] = {
            "activitymimeattachmentid": str(attachment.attachment_id),
            "objecttypecode": "email",
            "filename": attachment.filename,
            "mimetype": attachment.mimetype,
            "body": Base64Content(attachment.content),  # streamed into the request (memory: no encoded copy)
        }
        if attachment.content_id:
            row["attachmentcontentid"] = attachment.content_id[:250]
        # objectid_email (activitymimeattachment.md); an attachment that can't be tied to its email is useless,
        # so an org without that relationship gets none (unbound_relationships reports it).
        if _bind(row, schema, "activitymimeattachment", "objectid", "email", plan.activity_id):
            rows.append(row)
    return rows


def plan_contact_row(plan: TrackEmail, schema: OrgSchema = DOCUMENTED) -> dict[str, Any] | None:
    contact = plan.new_contact
    if contact is None:
        return None
    row: dict[str, Any] = {"contactid": str(contact.contact_id), "emailaddress1": contact.email,
                           "lastname": contact.last_name}
    if contact.first_name:
        row["firstname"] = contact.first_name
    if contact.owner is not None:
        _bind(row, schema, "contact", "ownerid", contact.owner)
    return row


def decision_record(message: MailMessage, plan: InboundPlan) -> dict[str, Any]:
    """A JSON-able record for the decisions table (issue 5: "message id, mailbox, each decision and why").

    ``from`` / ``subject`` / ``receivedAt`` describe the mail the decision was about (for a forward wrapper that was
    unwrapped: the original, with ``trackedFor`` = the forwarding user) so an admin can find it by what users see.
    """
    about = plan.original or message
    record: dict[str, Any] = {
        "internetMessageId": message.internet_message_id,
        "mailbox": message.mailbox,
        "graphId": message.graph_id,
        "outcome": "tracked" if isinstance(plan, TrackEmail) else f"skipped:{plan.stage}:{plan.code}",
        "from": about.originator.address if about.originator else "",
        "subject": about.subject[:EMAIL_SUBJECT_MAX],
        "receivedAt": _iso(about.received_at) if about.received_at else None,
        "decisions": [{"step": d.step, "outcome": d.outcome, "why": d.why} for d in plan.decisions],
    }
    if plan.original is not None:
        record["trackedFor"] = plan.original.mailbox
        record["originalInternetMessageId"] = plan.original.internet_message_id
    if isinstance(plan, TrackEmail):
        record["activityId"] = str(plan.activity_id)
        # Counted: what the CRM email lacks (attachments left out or past the cap, a truncated or re-decoded body).
        record["incomplete"] = {"omittedAttachments": len(plan.omitted_attachments), "dropped": len(plan.dropped),
                                "notifications": plan.notifications}
    truncations = [d.why for d in plan.decisions if d.step == "normalize"]
    if truncations:
        record["truncations"] = len(truncations)
    return record


def _trail(head: str, decisions: Sequence[Decision]) -> str:
    return "\n".join([head] + [f"  {d.step:<12} {d.outcome:<24} {d.why}" for d in decisions])


def explain(plan: InboundPlan) -> str:
    """The decision trail as text, one step per line (admin CLI ``explain``)."""
    head = (f"TRACKED as email {plan.activity_id}" if isinstance(plan, TrackEmail)
            else f"NOT TRACKED ({plan.stage}: {plan.code}) - {plan.why}")
    return _trail(head, plan.decisions)


def explain_record(record: Mapping[str, Any]) -> str:
    """The same trail from a stored decision record (:func:`decision_record`, or the processor's records of
    messages it could not fetch or write): the outcome line, then one line per step."""
    raw = record.get("decisions")
    decisions = [Decision(str(d.get("step", "")), str(d.get("outcome", "")), str(d.get("why", "")))
                 for d in raw if isinstance(d, Mapping)] if isinstance(raw, list) else []
    outcome = str(record.get("outcome") or "")
    kind, _, code = outcome.partition(":")
    why = decisions[-1].why if decisions else ""
    if outcome == "tracked":
        head = f"TRACKED as email {record.get('activityId', '')}"
    elif kind == "already_tracked":
        head = f"ALREADY IN CRM as email {record.get('activityId', '')} - {record.get('note', '')}".rstrip(" -")
    elif kind == "skipped":
        stage, _, reason = code.partition(":")
        head = f"NOT TRACKED ({stage}: {reason}) - {why}" if reason else f"NOT TRACKED ({stage}) - {why}"
    elif kind == "failed":
        head = f"FAILED ({code}) - {why}"
    elif kind == "gone":
        head = f"NOT TRACKED (gone) - {why}"
    else:
        head = f"{outcome or 'unknown outcome'}"
    return _trail(head, decisions)
