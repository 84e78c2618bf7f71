"""Outbound, the pure parts (issue 6): build the Graph message for a CRM Pending Send email, order the scan fairly
across senders, and the outbound state machine.

CRM states (dv-ref §2.4): Pending Send {1,6} -> Sending {1,7} -> Sent {1,3}; Failed {0,8} is Open (editable,
retryable by the user, crm-ref §11).
"""

from __future__ import annotations

import base64
import re
import uuid
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from email.errors import HeaderParseError
from email.header import decode_header
from enum import StrEnum
from typing import Any, Final

from core.domain.correlation import find_tracking_tokens
from core.domain.model import (
    LOOP_MARKER_HEADER,
    LOOP_MARKER_PROPERTY,
    ApprovalStatus,
    CrmRecordRef,
    Importance,
    MailboxConfig,
    MailboxKind,
    OrgEmailSettings,
    OutboundMethod,
)
from core.domain.parties import ParticipationType

__all__ = [
    "GRAPH_INLINE_LIMIT",
    "GRAPH_UPLOAD_SESSION_MAX",
    "MAX_RECIPIENTS",
    "AdminRetry",
    "Claimed",
    "CrmOutboundEmail",
    "InvalidTransition",
    "LargeAttachment",
    "OutboundAttachment",
    "OutboundEvent",
    "OutboundMessage",
    "OutboundParty",
    "OutboundRejected",
    "OutboundState",
    "OutboundStatus",
    "PendingEmail",
    "PermanentFailure",
    "ReaperCheck",
    "RejectCode",
    "SendSucceeded",
    "TransientFailure",
    "build_outbound_message",
    "fair_order",
    "next_state",
]

GRAPH_INLINE_LIMIT: Final = 3 * 1024 * 1024  # < 3 MB in one POST; 3-150 MB through an upload session (graph.md §6.1)
GRAPH_UPLOAD_SESSION_MAX: Final = 150 * 1024 * 1024
MAX_RECIPIENTS: Final = 500  # To+Cc+Bcc per message in Exchange Online (graph.md §6)

# C0 controls, DEL, and the Unicode line separators: any of them in a header value could split or fold a header.
_FORBIDDEN_IN_HEADER: Final = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
_ADDRESS: Final = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                             r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$")


# ------------------------------------------------------------------------------------------------ input data


@dataclass(frozen=True, slots=True)
class OutboundParty:
    """A party row of the CRM email: ``address`` = the resolved record's address or ``addressused``."""

    mask: ParticipationType
    record: CrmRecordRef | None
    address: str | None
    name: str = ""


@dataclass(frozen=True, slots=True)
class OutboundAttachment:
    attachment_id: uuid.UUID
    filename: str
    mimetype: str
    size: int
    content: bytes | None = None  # loaded by the service for small attachments; large ones are streamed
    content_id: str | None = None
    is_inline: bool = False


@dataclass(frozen=True, slots=True)
class CrmOutboundEmail:
    activity_id: uuid.UUID
    subject: str
    description_html: str
    parties: tuple[OutboundParty, ...]
    attachments: tuple[OutboundAttachment, ...] = ()
    importance: Importance = Importance.NORMAL
    tracking_token: str | None = None
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()

    @property
    def sender(self) -> OutboundParty | None:
        return next((p for p in self.parties if p.mask is ParticipationType.SENDER), None)


@dataclass(frozen=True, slots=True)
class LargeAttachment:
    """Uploaded through ``createUploadSession`` after the draft exists (graph.md §6.1)."""

    attachment_id: uuid.UUID
    name: str
    content_type: str
    size: int
    is_inline: bool
    content_id: str | None


@dataclass(frozen=True)
class OutboundMessage:
    graph_message: dict[str, Any]  # body of POST /users/{sender}/messages (draft), then /send
    large_attachments: tuple[LargeAttachment, ...]
    sender_address: str
    loop_marker: str


class RejectCode(StrEnum):
    SENDER_NOT_ROUTER = "sender_not_router"
    SENDER_MISMATCH = "sender_mismatch"
    HEADER_INJECTION = "header_injection"
    INVALID_ADDRESS = "invalid_address"
    UNRESOLVED_RECIPIENT = "unresolved_recipient"
    NO_RECIPIENTS = "no_recipients"
    TOO_MANY_RECIPIENTS = "too_many_recipients"
    ATTACHMENT_TOO_LARGE = "attachment_too_large"
    ATTACHMENT_MISSING = "attachment_missing"


@dataclass(frozen=True, slots=True)
class OutboundRejected:
    """A permanent reason not to send: the email goes to Failed with this reason (issue 6 "Failures")."""

    code: RejectCode
    why: str


# ------------------------------------------------------------------------------------------------ building


_ENCODED_WORD: Final = re.compile(r"=\?[^?\s]{1,40}\?[bBqQ]\?[^?\s]{0,2000}\?=")


def _has_forbidden(value: str) -> bool:
    """Control characters (CR/LF above all) in a header-bound value, literally or inside an RFC 2047 encoded word:
    a downstream MIME writer that decodes and refolds such a word would write the line break raw (CPython < 3.11.10,
    CVE-2024-6923), so neither form is sent."""
    if _FORBIDDEN_IN_HEADER.search(value) is not None:
        return True
    for word in _ENCODED_WORD.findall(value):
        try:
            decoded = "".join(part.decode(charset or "ascii", "replace") if isinstance(part, bytes) else part
                              for part, charset in decode_header(word))
        except (ValueError, LookupError, HeaderParseError):
            continue  # not decodable: inert text
        if _FORBIDDEN_IN_HEADER.search(decoded) is not None:
            return True
    return False


def _subject_with_token(subject: str, token: str | None, org: OrgEmailSettings) -> str:
    """Keep the token CRM's SendEmail put in the subject; if it is missing, append it, truncating the subject so
    subject + token fit MaximumSubjectLengthOnMailServer (crm-ref §6.2: if the token alone is too long, none)."""
    if not token or token in find_tracking_tokens(subject, org) or token in subject:
        return subject
    limit = org.max_subject_length_on_mail_server
    suffix = f" {token}"
    if len(suffix) >= limit:
        return subject
    return subject[: limit - len(suffix)].rstrip() + suffix


def _check_sender(email: CrmOutboundEmail, sender: MailboxConfig, org: OrgEmailSettings) -> OutboundRejected | None:
    if (sender.kind is MailboxKind.FORWARD_SINK or sender.outbound_method is not OutboundMethod.ROUTER
            or not sender.enabled_for_outgoing):
        return OutboundRejected(RejectCode.SENDER_NOT_ROUTER,
                                f"{sender.address} is not a router-outbound mailbox enabled for outgoing email")
    required = (org.require_approval_for_queue_email if sender.kind is MailboxKind.QUEUE
                else org.require_approval_for_user_email)
    if required and sender.approval is not ApprovalStatus.APPROVED:
        return OutboundRejected(RejectCode.SENDER_NOT_ROUTER, f"{sender.address} is not approved")
    party = email.sender
    if party is None or party.record is None or party.record != sender.owner:
        return OutboundRejected(RejectCode.SENDER_MISMATCH,
                                "the email's From is not the owner of the sending mailbox (only the email's own "
                                "sender mailbox may send it)")
    return None


def _recipients(email: CrmOutboundEmail, org: OrgEmailSettings
                ) -> tuple[dict[str, list[dict[str, Any]]], OutboundRejected | None]:
    fields = {ParticipationType.TO: "toRecipients", ParticipationType.CC: "ccRecipients",
              ParticipationType.BCC: "bccRecipients"}
    result: dict[str, list[dict[str, Any]]] = {name: [] for name in fields.values()}
    count = 0
    for party in email.parties:
        field_name = fields.get(party.mask)
        if field_name is None:
            continue
        if party.record is None and not org.allow_unresolved_parties_on_send:
            return result, OutboundRejected(
                RejectCode.UNRESOLVED_RECIPIENT,
                f"unresolved recipient {party.address!r} and allowunresolvedpartiesonemailsend is off")
        address = (party.address or "").strip()
        if not address:
            # dv-ref §2.2: "parties must still have an email address"
            return result, OutboundRejected(RejectCode.INVALID_ADDRESS, "a recipient has no email address")
        if _has_forbidden(address) or _has_forbidden(party.name):
            return result, OutboundRejected(RejectCode.HEADER_INJECTION,
                                            "control characters in a recipient name or address")
        if len(address) > 320 or not _ADDRESS.match(address):
            return result, OutboundRejected(RejectCode.INVALID_ADDRESS, f"invalid recipient address {address!r}")
        entry: dict[str, Any] = {"emailAddress": {"address": address}}
        if party.name:
            entry["emailAddress"]["name"] = party.name
        result[field_name].append(entry)
        count += 1
    if count == 0:
        return result, OutboundRejected(RejectCode.NO_RECIPIENTS, "the email has no recipients")
    if count > MAX_RECIPIENTS:
        return result, OutboundRejected(RejectCode.TOO_MANY_RECIPIENTS, f"{count} recipients > {MAX_RECIPIENTS}")
    return result, None


def build_outbound_message(email: CrmOutboundEmail, sender: MailboxConfig, org: OrgEmailSettings, *,
                           inline_limit: int = GRAPH_INLINE_LIMIT) -> OutboundMessage | OutboundRejected:
    rejected = _check_sender(email, sender, org)
    if rejected is not None:
        return rejected
    if _has_forbidden(email.subject) or (email.tracking_token and _has_forbidden(email.tracking_token)):
        return OutboundRejected(RejectCode.HEADER_INJECTION, "control characters in the subject")
    for message_id in (email.in_reply_to, *email.references):
        if message_id and _has_forbidden(message_id):
            return OutboundRejected(RejectCode.HEADER_INJECTION, "control characters in In-Reply-To/References")
    recipients, rejected = _recipients(email, org)
    if rejected is not None:
        return rejected

    inline: list[dict[str, Any]] = []
    large: list[LargeAttachment] = []
    for attachment in email.attachments:
        if _has_forbidden(attachment.filename) or _has_forbidden(attachment.mimetype):
            return OutboundRejected(RejectCode.HEADER_INJECTION, "control characters in an attachment name or type")
        size = len(attachment.content) if attachment.content is not None else attachment.size
        if size > GRAPH_UPLOAD_SESSION_MAX:
            return OutboundRejected(RejectCode.ATTACHMENT_TOO_LARGE,
                                    f"{attachment.filename}: {size} bytes > Graph's 150 MB upload limit")
        if size < inline_limit:
            if attachment.content is None:
                return OutboundRejected(RejectCode.ATTACHMENT_MISSING, f"{attachment.filename}: content not loaded")
            item: dict[str, Any] = {
                "@odata.type": "#microsoft.graph.fileAttachment",
                "name": attachment.filename,
                "contentType": attachment.mimetype,
                "contentBytes": base64.b64encode(attachment.content).decode("ascii"),
                "isInline": attachment.is_inline,
            }
            if attachment.content_id:
                item["contentId"] = attachment.content_id
            inline.append(item)
        else:
            large.append(LargeAttachment(attachment.attachment_id, attachment.filename, attachment.mimetype, size,
                                         attachment.is_inline, attachment.content_id))

    marker = str(email.activity_id)
    message: dict[str, Any] = {
        "subject": _subject_with_token(email.subject, email.tracking_token, org),
        "body": {"contentType": "HTML", "content": email.description_html},
        "importance": email.importance.value,
        **recipients,
        # Loop marker (graph.md §7.3: custom headers must start with "x-", at most 5 per message).
        "internetMessageHeaders": [{"name": LOOP_MARKER_HEADER, "value": marker}],
    }
    if inline:
        message["attachments"] = inline
    # In-Reply-To/References cannot be set as internet headers (graph.md §7.3: names must start with "x-"); the
    # MAPI properties 0x1042/0x1039 are the documented third-party route (NOT VERIFIED on Exchange Online).
    # The marker again as a MAPI property: the Sent Items copy keeps it, though it has no internet headers.
    extended: list[dict[str, str]] = [{"id": LOOP_MARKER_PROPERTY, "value": marker}]
    if email.in_reply_to:
        extended.append({"id": "String 0x1042", "value": email.in_reply_to})
        references = [*email.references]
        if email.in_reply_to not in references:
            references.append(email.in_reply_to)
        extended.append({"id": "String 0x1039", "value": " ".join(references[-32:])})
    message["singleValueExtendedProperties"] = extended
    return OutboundMessage(message, tuple(large), sender.address, marker)


# ------------------------------------------------------------------------------------------------ fairness


@dataclass(frozen=True, slots=True)
class PendingEmail:
    activity_id: uuid.UUID
    sender: Hashable  # the sending systemuser/queue (a CrmRecordRef in practice)
    modified_on: datetime


def fair_order(pending: Sequence[PendingEmail], *, per_sender_cap: int) -> list[PendingEmail]:
    """Round-robin across senders: each sender's emails keep their own order (oldest first), senders take turns
    starting with the one whose oldest email waited longest, and no sender gets more than ``per_sender_cap`` per
    scan. So a sender with 1,000 pending emails delays another sender's single email by at most one email, never by
    a whole scan (the CRM 2011 router's "first 5 users x first 5 emails" starved heavy senders, crm-ref §12)."""
    if per_sender_cap < 1:
        raise ValueError("per_sender_cap must be >= 1")
    queues: OrderedDict[Hashable, list[PendingEmail]] = OrderedDict()
    for email in sorted(pending, key=lambda e: (e.modified_on, str(e.activity_id))):
        queues.setdefault(email.sender, []).append(email)
    ordered: list[PendingEmail] = []
    for turn in range(per_sender_cap):
        took = False
        for emails in queues.values():
            if turn < len(emails):
                ordered.append(emails[turn])
                took = True
        if not took:
            break
    return ordered


# ------------------------------------------------------------------------------------------------ state machine


class OutboundStatus(StrEnum):
    PENDING_SEND = "pending_send"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"

    @property
    def crm(self) -> tuple[int, int]:
        """(statecode, statuscode), dv-ref §2.4."""
        return {
            OutboundStatus.PENDING_SEND: (1, 6),
            OutboundStatus.SENDING: (1, 7),
            OutboundStatus.SENT: (1, 3),
            OutboundStatus.FAILED: (0, 8),
        }[self]


@dataclass(frozen=True, slots=True)
class OutboundState:
    status: OutboundStatus
    delivery_attempts: int = 0  # email.deliveryattempts
    claimed_at: datetime | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Claimed:
    at: datetime


@dataclass(frozen=True, slots=True)
class SendSucceeded:
    pass


@dataclass(frozen=True, slots=True)
class TransientFailure:
    reason: str
    max_attempts: int


@dataclass(frozen=True, slots=True)
class PermanentFailure:
    reason: str


@dataclass(frozen=True, slots=True)
class ReaperCheck:
    now: datetime
    timeout: timedelta
    max_attempts: int


@dataclass(frozen=True, slots=True)
class AdminRetry:
    """The user/admin sends a Failed email again (Failed is Open and retryable, crm-ref §11)."""


OutboundEvent = Claimed | SendSucceeded | TransientFailure | PermanentFailure | ReaperCheck | AdminRetry


class InvalidTransition(ValueError):
    def __init__(self, state: OutboundState, event: OutboundEvent) -> None:
        super().__init__(f"{type(event).__name__} is not allowed in state {state.status.value}")
        self.state = state
        self.event = event


def _failed_or_retry(state: OutboundState, reason: str, max_attempts: int) -> OutboundState:
    attempts = state.delivery_attempts + 1
    if attempts >= max_attempts:
        return OutboundState(OutboundStatus.FAILED, attempts, None, f"gave up after {attempts} attempts: {reason}")
    return OutboundState(OutboundStatus.PENDING_SEND, attempts, None, reason)


def next_state(current: OutboundState, event: OutboundEvent) -> OutboundState:
    """Pending Send -(claim)-> Sending -(sent)-> Sent; Sending -(transient)-> Pending Send (attempts+1) or Failed
    when attempts are exhausted; Sending -(permanent)-> Failed; Sending past the timeout -(reaper)-> Pending Send
    (a crashed worker; counts as an attempt so a message that always crashes the worker ends Failed);
    Failed -(admin retry)-> Pending Send. Anything else raises :class:`InvalidTransition`."""
    status = current.status
    if isinstance(event, Claimed) and status is OutboundStatus.PENDING_SEND:
        return replace(current, status=OutboundStatus.SENDING, claimed_at=event.at, reason=None)
    if isinstance(event, SendSucceeded) and status is OutboundStatus.SENDING:
        return OutboundState(OutboundStatus.SENT, current.delivery_attempts + 1, None, None)
    if isinstance(event, TransientFailure) and status is OutboundStatus.SENDING:
        return _failed_or_retry(current, event.reason, event.max_attempts)
    if isinstance(event, PermanentFailure) and status is OutboundStatus.SENDING:
        return OutboundState(OutboundStatus.FAILED, current.delivery_attempts + 1, None, event.reason)
    if isinstance(event, ReaperCheck) and status is OutboundStatus.SENDING:
        if current.claimed_at is None or event.now - current.claimed_at >= event.timeout:
            return _failed_or_retry(current, "stuck in Sending past the timeout", event.max_attempts)
        return current
    if isinstance(event, ReaperCheck):
        return current  # the reaper only ever touches Sending
    if isinstance(event, AdminRetry) and status is OutboundStatus.FAILED:
        return OutboundState(OutboundStatus.PENDING_SEND, 0, None, None)
    raise InvalidTransition(current, event)
