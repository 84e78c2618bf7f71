"""Plain data the pure decisions work on: the normalised mail message, CRM references, mailbox and org settings.

Everything here is a frozen dataclass or an enum; nothing performs I/O. The services fill these from Graph,
Dataverse and the settings table, then hand them to the decision functions in this package.

CRM numbers (delivery methods, filter values, participation masks, state/status) are the documented values of
``/work/shared/reference/crm-email-behaviour.md`` (abbreviated "crm-ref") and ``dataverse.md`` ("dv-ref").
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum, StrEnum
from types import MappingProxyType
from typing import ClassVar, Final, TypeVar

__all__ = [
    "LOOP_MARKER_HEADER",
    "LOOP_MARKER_PROPERTY",
    "Address",
    "ApprovalStatus",
    "Attachment",
    "Base64Content",
    "CrmRecordRef",
    "CrmTable",
    "Folder",
    "FolderKind",
    "Headers",
    "Importance",
    "InboundMethod",
    "MailMessage",
    "MailboxConfig",
    "MailboxKind",
    "OrgEmailSettings",
    "OutboundMethod",
    "PartyCandidate",
    "QueueOwnerFallback",
    "TrackingFilter",
    "WrapperTrustPolicy",
    "entity_set_for",
    "frozen_mapping",
]

# Our outbound loop marker: every message the router sends carries this `x-` header with the CRM activity id
# (graph.md §7.3: custom headers must start with "x-"). Inbound skips any message that carries it, because the CRM
# email already exists (it is the one we sent). Shared by skip.py and outbound.py.
LOOP_MARKER_HEADER: Final = "x-emailrouter-activityid"
# The same marker as a named MAPI property on the draft. Exchange keeps a sent draft's properties on its Sent Items
# copy, but that copy has no internetMessageHeaders ("internet headers just do not exist on the copy in Sent Items",
# microsoft-graph-docs#2716): the property is how the router recognises its own mail there, read in the same GET
# (singleValueExtendedProperties, documented id form "String {guid} Name <name>"). The GUID is ours (a uuid5).
LOOP_MARKER_PROPERTY: Final = "String {8357d2be-790e-54ef-96fb-b42b84262542} Name x-emailrouter-activityid"


_K = TypeVar("_K")
_V = TypeVar("_V")


def frozen_mapping(data: Mapping[_K, _V] | None = None) -> Mapping[_K, _V]:
    """A read-only copy, so a frozen dataclass holding a mapping is really immutable."""
    return MappingProxyType(dict(data or {}))


# --------------------------------------------------------------------------------------------------------------
# Mail side
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox address. ``address`` is lower-cased (matching is case-insensitive in practice: Exchange and
    Dataverse both compare addresses case-insensitively, dv-ref §4.1 "strings case-insensitive")."""

    name: str
    address: str

    @staticmethod
    def of(name: str | None, address: str) -> Address:
        return Address(name=(name or "").strip(), address=address.strip().lower())

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]

    @property
    def local_part(self) -> str:
        return self.address.rpartition("@")[0]


class FolderKind(StrEnum):
    INBOX = "inbox"
    SENT_ITEMS = "sentitems"
    JUNK = "junkemail"
    DRAFTS = "drafts"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Folder:
    kind: FolderKind
    folder_id: str = ""


class Importance(StrEnum):
    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"

    @property
    def crm_priority(self) -> int:
        # email.prioritycode: 0 Low, 1 Normal, 2 High (dv-ref §2.1)
        return {Importance.LOW: 0, Importance.NORMAL: 1, Importance.HIGH: 2}[self]


@dataclass(frozen=True, slots=True)
class Headers:
    """Internet message headers in arrival order, looked up case-insensitively (RFC 5322 field names are
    case-insensitive)."""

    items: tuple[tuple[str, str], ...] = ()

    def get(self, name: str) -> str | None:
        wanted = name.lower()
        for key, value in self.items:
            if key.lower() == wanted:
                return value
        return None

    def get_all(self, name: str) -> tuple[str, ...]:
        wanted = name.lower()
        return tuple(value for key, value in self.items if key.lower() == wanted)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True, slots=True, eq=False)
class Base64Content:
    """Bytes that go to Dataverse base64-encoded (an attachment's ``body``) without the encoded text ever being held
    whole: the ``$batch`` encoder streams :meth:`chunks` into the request, so a 25 MB attachment costs its 25 MB
    and a few MB of buffers, not 25 + 33 (base64) + 33 (JSON) + 33 (request) MB. ``str()`` gives the whole text
    (tests, small bodies)."""

    data: bytes
    CHUNK: ClassVar[int] = 3 * 1024 * 1024  # a multiple of 3: the chunks' encodings concatenate to the whole one

    def __len__(self) -> int:
        """Length of the base64 text."""
        return 4 * ((len(self.data) + 2) // 3)

    def chunks(self) -> Iterator[bytes]:
        view = memoryview(self.data)
        for start in range(0, len(view), self.CHUNK):
            yield base64.b64encode(view[start:start + self.CHUNK])

    def __str__(self) -> str:
        return base64.b64encode(self.data).decode("ascii")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Base64Content):
            return self.data == other.data
        if isinstance(other, str):
            return str(self) == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.data)


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file attachment (``content`` = decoded bytes, or None when not fetched) or an item attachment
    (``item`` = the attached message, e.g. a message forwarded as an attachment to a sink mailbox)."""

    name: str
    content_type: str
    size: int
    is_inline: bool = False
    content_id: str | None = None
    content: bytes | None = None
    item: MailMessage | None = None

    @property
    def is_item(self) -> bool:
        return self.item is not None


@dataclass(frozen=True, slots=True)
class MailMessage:
    """A normalised Exchange message (graph.md §6). Addresses are lower-cased; ``truncations`` lists what the
    normaliser cut off to stay bounded (recorded on the decision trail)."""

    mailbox: str
    graph_id: str
    folder: Folder
    internet_message_id: str | None
    subject: str
    from_: Address | None
    sender: Address | None = None
    to: tuple[Address, ...] = ()
    cc: tuple[Address, ...] = ()
    bcc: tuple[Address, ...] = ()
    reply_to: tuple[Address, ...] = ()
    sent_at: datetime | None = None
    received_at: datetime | None = None
    headers: Headers = field(default_factory=Headers)
    body_html: str | None = None
    body_text: str | None = None
    importance: Importance = Importance.NORMAL
    is_draft: bool = False
    conversation_id: str | None = None
    conversation_index: bytes | None = None
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    attachments: tuple[Attachment, ...] = ()
    truncations: tuple[str, ...] = ()
    loop_marker: str | None = None  # LOOP_MARKER_HEADER or LOOP_MARKER_PROPERTY: the router sent this message

    @property
    def originator(self) -> Address | None:
        """The address the mail is *from*: From, else Sender (crm-ref §7 resolves the sender to one record)."""
        return self.from_ or self.sender

    def recipients(self) -> tuple[Address, ...]:
        return self.to + self.cc + self.bcc


# --------------------------------------------------------------------------------------------------------------
# CRM side
# --------------------------------------------------------------------------------------------------------------


class CrmTable(StrEnum):
    """Logical names of the email-enabled tables the router resolves against (crm-ref §7). Custom email-enabled
    tables are allowed as plain strings in :class:`CrmRecordRef`."""

    SYSTEMUSER = "systemuser"
    QUEUE = "queue"
    CONTACT = "contact"
    ACCOUNT = "account"
    LEAD = "lead"
    EQUIPMENT = "equipment"
    TEAM = "team"
    BUSINESSUNIT = "businessunit"
    EMAIL = "email"
    MAILBOX = "mailbox"


# Entity set names (dv-ref §4.2/§12). Custom tables: NOT VERIFIED — the default "<logical>s" is only a guess, so a
# custom table's set must be passed explicitly via CrmRecordRef.entity_set.
_ENTITY_SETS: Final[Mapping[str, str]] = MappingProxyType({
    "systemuser": "systemusers",
    "queue": "queues",
    "contact": "contacts",
    "account": "accounts",
    "lead": "leads",
    "equipment": "equipments",
    "team": "teams",
    "businessunit": "businessunits",
    "email": "emails",
    "mailbox": "mailboxes",
    "incident": "incidents",
    "opportunity": "opportunities",
})


def entity_set_for(table: str) -> str:
    return _ENTITY_SETS.get(table, f"{table}s")


@dataclass(frozen=True, slots=True)
class CrmRecordRef:
    """A reference to a Dataverse row: logical table name + id."""

    table: str
    id: uuid.UUID
    entity_set_override: str | None = None

    @property
    def entity_set(self) -> str:
        return self.entity_set_override or entity_set_for(self.table)

    @property
    def bind_path(self) -> str:
        """The ``@odata.bind`` value, e.g. ``/contacts(<id>)`` (dv-ref §2.3, §2.5)."""
        return f"/{self.entity_set}({self.id})"


@dataclass(frozen=True, slots=True)
class PartyCandidate:
    """One row that carries an address (dv-ref §4.2: contacts/accounts/leads emailaddress1-3, systemusers
    internalemailaddress, queues emailaddress). ``owner`` feeds the owner walk (crm-ref §7)."""

    record: CrmRecordRef
    owner: CrmRecordRef | None = None
    is_active: bool = True
    is_disabled_user: bool = False
    display_name: str = ""


class InboundMethod(IntEnum):
    """``incomingemaildeliverymethod`` (crm-ref §2.1/§2.2): 0 None, 1 Outlook, 2 SSS/Email Router, 3 Forward."""

    NONE = 0
    OUTLOOK = 1
    INDIVIDUAL = 2
    FORWARD = 3


class OutboundMethod(IntEnum):
    """``outgoingemaildeliverymethod`` (crm-ref §2.1): 0 None, 1 Outlook, 2 SSS/Email Router (= this router)."""

    NONE = 0
    OUTLOOK = 1
    ROUTER = 2


class TrackingFilter(IntEnum):
    """``incomingemailfilteringmethod`` (crm-ref §5.1)."""

    ALL = 0
    REPLIES_TO_CRM_EMAIL = 1
    FROM_LEADS_CONTACTS_ACCOUNTS = 2
    FROM_EMAIL_ENABLED_RECORDS = 3
    NONE = 4


class ApprovalStatus(IntEnum):
    """``emailrouteraccessapproval`` (crm-ref §2.1): only Approved addresses send/receive when approval is
    required (crm-ref §2.3)."""

    EMPTY = 0
    APPROVED = 1
    PENDING = 2
    REJECTED = 3


class SssStatus(StrEnum):
    """Whether Server-Side Synchronization also serves a mailbox in one direction (audit dataverse-fidelity #12).

    The router's mailboxes use delivery method 2, "Server-Side Synchronization or Email Router" (mailbox.md): the
    same value SSS uses. SSS only processes a mailbox that has an email server profile; it then syncs the direction
    that is enabled and has passed Test & Enable (status Success). Both would then act on the same mail.
    """

    NONE = "none"  # no email server profile (or the direction is not SSS/router): SSS leaves this direction alone
    CONFIGURED = "configured"  # a profile, but not enabled/tested for this direction: a Test & Enable would start SSS
    ACTIVE = "active"  # a profile, enabled and tested: SSS processes this direction too


class MailboxKind(StrEnum):
    """A user's mailbox, a queue's mailbox, or a forward (sink) mailbox that only collects forwarded copies
    (crm-ref §3: a sink has no regarding user/queue and outgoing None)."""

    USER = "user"
    QUEUE = "queue"
    FORWARD_SINK = "forward_sink"


@dataclass(frozen=True)
class MailboxConfig:
    """A mailbox as the pipeline sees it (settings table, filled from CRM mailbox/systemuser/queue rows)."""

    address: str
    kind: MailboxKind
    owner: CrmRecordRef | None = None  # the systemuser or queue the mailbox belongs to; None for sinks
    mailbox_id: uuid.UUID | None = None  # CRM mailbox row (email.receivingmailboxid)
    inbound_method: InboundMethod = InboundMethod.NONE
    outbound_method: OutboundMethod = OutboundMethod.NONE
    tracking_filter: TrackingFilter = TrackingFilter.REPLIES_TO_CRM_EMAIL
    track_sent_items: bool = False  # AutoTrackSentFolderItems (crm-ref §5.3), per mailbox here
    folder_regarding: Mapping[str, CrmRecordRef] = field(default_factory=frozen_mapping)
    auto_create_contacts: bool = False  # personal option "Automatically create records" (crm-ref §8)
    process_email_received_after: datetime | None = None  # the greater of profile/mailbox dates (crm-ref §2.4)
    forward_sink_address: str | None = None  # for InboundMethod.FORWARD users
    delete_after_processing: bool = False  # processanddeleteemails (sinks and queues only, crm-ref §2.1)
    enabled_for_incoming: bool = True
    enabled_for_outgoing: bool = True
    approval: ApprovalStatus = ApprovalStatus.APPROVED
    queue_owner: CrmRecordRef | None = None  # ownerid of the queue row, for the queue owner fallback
    sss_incoming: SssStatus = SssStatus.NONE  # Server-Side Synchronization on this mailbox (CRM sync, #12)
    sss_outgoing: SssStatus = SssStatus.NONE  # ACTIVE: the router does not send for it (both would send)
    # Entra object id (or UPN) Graph addresses the mailbox by: Graph documents /users/{id | userPrincipalName}
    # only, and a primary SMTP address can differ from the UPN. None = not resolved (the address is used).
    graph_user_id: str | None = None

    @property
    def graph_user(self) -> str:
        """What goes into a Graph path or subscription resource for this mailbox."""
        return self.graph_user_id or self.address

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", self.address.strip().lower())
        if self.forward_sink_address is not None:
            object.__setattr__(self, "forward_sink_address", self.forward_sink_address.strip().lower())
        if not isinstance(self.folder_regarding, MappingProxyType):
            object.__setattr__(self, "folder_regarding", frozen_mapping(self.folder_regarding))


class QueueOwnerFallback(StrEnum):
    """Who owns a queue's email when the owner walk finds no eligible recipient. NOT VERIFIED: crm-ref §7 describes
    the walk but not the case where it finds nobody, so it is a setting."""

    QUEUE_OWNER = "queue_owner"
    APPLICATION_USER = "application_user"  # leave ownerid unset: Dataverse makes the calling app user the owner


@dataclass(frozen=True)
class WrapperTrustPolicy:
    """How the router decides that a forwarded wrapper in a sink really came from inside the tenant (forward.py).

    Exchange stamps ``X-MS-Exchange-Organization-AuthAs`` (``Internal`` for mail submitted by a mailbox of the
    organisation, ``Anonymous`` for mail from the internet) and strips incoming copies of organisation headers at
    the boundary. NOT VERIFIED against a live tenant, hence every name and value is configurable and the check can
    be turned off (e.g. an emulator that does not stamp it).
    """

    require_internal_auth: bool = True
    auth_as_header: str = "X-MS-Exchange-Organization-AuthAs"
    internal_auth_values: frozenset[str] = frozenset({"internal"})
    # Authentication-Results (RFC 8601) verdicts that mark a wrapper as spoofed even when the auth header is absent.
    authentication_results_header: str = "Authentication-Results"
    failing_verdicts: frozenset[str] = frozenset({"spf=fail", "dkim=fail", "dmarc=fail", "compauth=fail"})


@dataclass(frozen=True)
class OrgEmailSettings:
    """Organisation-wide settings (crm-ref §6.2, §7, §10; dv-ref §4.2) plus router-specific knobs."""

    # Tracking token (crm-ref §6.2): prefix history list, digits. Token = prefix + 1 legacy online/offline digit +
    # user-number digits + counter digits ("4 character prefix and a 7-digit identifier" by default).
    tracking_prefixes: tuple[str, ...] = ("CRM:",)
    use_tracking_token: bool = True
    tracking_user_digits: int = 3  # trackingtokeniddigits
    tracking_counter_digits: int = 3  # "Digits for incremental message counter" (column not confirmed)
    # Correlation switches (crm-ref §6.2, §10).
    use_correlation: bool = True  # emailcorrelationenabled: header-based correlation
    ignore_conversation_index_and_in_reply_to: bool = False  # IgnoreConversationIndexAndInReplyToForCorrelation
    use_references: bool = True  # router extension: also match References (Odoo, last 32 ids)
    do_not_correlate_forwards_as_replies: bool = False  # DoNotCorrelateForwardedEmailsAsReplies
    forward_subject_prefixes: tuple[str, ...] = ("fw:", "fwd:")
    # Filtering (crm-ref §5.2).
    use_syncing_mailbox_filter_only: bool = False  # UseFilteringMethodOfSyncingMailboxOnlyForCorrelation
    # Internal email (crm-ref §5.2).
    ignore_internal_email: bool = False  # organization.ignoreinternalemail
    do_not_ignore_internal_email_to_queues: bool = True  # DoNotIgnoreInternalEmailToQueues
    internal_domains: frozenset[str] = frozenset()
    # Party resolution (crm-ref §7).
    unresolve_if_multiple_match: bool = False  # unresolveemailaddressifmultiplematch
    resolve_for_inactive_entities: bool = False  # ResolveForInactiveEntities
    # Attachments: maxuploadfilesize, applied to the base64 size (dv-ref §3).
    max_attachment_bytes: int = 5_242_880
    # Never-log list (crm-ref §14, HubSpot): addresses and whole domains the router never tracks.
    never_log_addresses: frozenset[str] = frozenset()
    never_log_domains: frozenset[str] = frozenset()
    # Outbound (dv-ref §2.2): unresolved recipients allowed on send.
    allow_unresolved_parties_on_send: bool = False
    max_subject_length_on_mail_server: int = 255  # MaximumSubjectLengthOnMailServer (crm-ref §6.2)
    # Approval (crm-ref §2.3): on by default.
    require_approval_for_user_email: bool = True
    require_approval_for_queue_email: bool = True
    queue_owner_fallback: QueueOwnerFallback = QueueOwnerFallback.QUEUE_OWNER
    wrapper_trust: WrapperTrustPolicy = field(default_factory=WrapperTrustPolicy)
    # Auto-reply detection: headers beyond the RFC 3834 set that also count as "automatic". Off by default because
    # newsletters and ticket systems set them on mail users do want tracked (see docs/tracking-rules.md).
    treat_auto_response_suppress_as_auto_reply: bool = False
    treat_precedence_bulk_as_auto_reply: bool = False
    # Queue items for tracked incoming email (OrgDbOrgSettings of the same names; core/domain/queue_items.py).
    create_queue_items_for_accepting_queue_recipients: bool = True
    create_queue_item_for_synchronizing_mailbox: bool = True
    create_additional_queue_items_for_already_tracked_email: bool = False  # SSSCreateAdditionalQueueItems...

    def __post_init__(self) -> None:
        object.__setattr__(self, "internal_domains", frozenset(d.lower() for d in self.internal_domains))
        object.__setattr__(self, "never_log_addresses", frozenset(a.lower() for a in self.never_log_addresses))
        object.__setattr__(self, "never_log_domains", frozenset(d.lower() for d in self.never_log_domains))

    @property
    def token_digits(self) -> int:
        return 1 + self.tracking_user_digits + self.tracking_counter_digits

    def is_internal(self, address: str) -> bool:
        return address.rpartition("@")[2].lower() in self.internal_domains
