"""Skip rules: mail the router never tracks, whatever the tracking filter says.

An ordered list of small rules, first match wins (Odoo's routing / EspoCRM's ``AutoReplyDetector``, style-anchors
§3-§4). Every skip carries a code and a human reason for the decision record. The order puts the cheapest and most
certain rules first; documented in docs/tracking-rules.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from core.domain.model import (
    LOOP_MARKER_HEADER,
    FolderKind,
    MailboxConfig,
    MailboxKind,
    MailMessage,
    OrgEmailSettings,
)

__all__ = [
    "SKIP_RULES",
    "SkipCode",
    "SkipReason",
    "first_skip_reason",
    "is_internal_message",
]


class SkipCode(StrEnum):
    DRAFT = "draft"
    JUNK = "junk"
    FOLDER_NOT_TRACKED = "folder_not_tracked"
    OWN_OUTBOUND = "own_outbound"
    NO_MESSAGE_ID = "no_message_id"
    BOUNCE = "bounce"
    AUTO_REPLY = "auto_reply"
    NEVER_LOG = "never_log"
    TOO_OLD = "too_old"
    INTERNAL = "internal"


@dataclass(frozen=True, slots=True)
class SkipReason:
    code: SkipCode
    why: str


@dataclass(frozen=True, slots=True)
class _SkipInput:
    message: MailMessage
    mailbox: MailboxConfig
    org: OrgEmailSettings
    queue_addresses: frozenset[str]
    # The user asked for this message (track by category): SSS tracks manually tracked mail whatever folder it is
    # in, so the folder rules do not apply; every other rule does.
    manual: bool = False


SkipRule = Callable[[_SkipInput], SkipReason | None]


def _draft(s: _SkipInput) -> SkipReason | None:
    if s.message.is_draft or s.message.folder.kind is FolderKind.DRAFTS:
        return SkipReason(SkipCode.DRAFT, "the message is a draft (not sent or received yet)")
    return None


def _junk(s: _SkipInput) -> SkipReason | None:
    if s.message.folder.kind is FolderKind.JUNK and not s.manual:
        return SkipReason(SkipCode.JUNK, "the message is in the Junk Email folder")
    return None


def _folder(s: _SkipInput) -> SkipReason | None:
    # crm-ref §5.3: only mail directly in Inbox is auto-evaluated; subfolders only through folder-level tracking
    # (not for queues, crm-ref §4); Sent Items only with AutoTrackSentFolderItems.
    folder = s.message.folder
    mapped = s.mailbox.kind is MailboxKind.USER and folder.folder_id in s.mailbox.folder_regarding
    if folder.kind is FolderKind.INBOX or mapped or s.manual:
        return None
    if folder.kind is FolderKind.SENT_ITEMS:
        if s.mailbox.track_sent_items and s.mailbox.kind is MailboxKind.USER:
            return None
        return SkipReason(SkipCode.FOLDER_NOT_TRACKED, "Sent Items are not tracked for this mailbox")
    return SkipReason(SkipCode.FOLDER_NOT_TRACKED,
                      f"folder {folder.kind.value} {folder.folder_id!r} is neither Inbox nor a tracked folder")


def _own_outbound(s: _SkipInput) -> SkipReason | None:
    # The header travels with delivered copies (and a forwarded original's MIME); the Sent Items copy has no
    # internet headers, only the marker property (the normaliser puts either into loop_marker).
    marker = s.message.loop_marker or s.message.headers.get(LOOP_MARKER_HEADER)
    if marker is not None:
        return SkipReason(SkipCode.OWN_OUTBOUND,
                          f"sent by this router for CRM email {marker.strip()[:64]} (loop marker)")
    return None


def _no_message_id(s: _SkipInput) -> SkipReason | None:
    if not s.message.internet_message_id or not s.message.internet_message_id.strip("<> \t"):
        return SkipReason(SkipCode.NO_MESSAGE_ID,
                          "no Internet Message-ID: the email cannot be tracked exactly once")
    return None


_REPORT_TYPE: Final = re.compile(r"report-type\s*=\s*\"?([a-z-]+)", re.IGNORECASE)
_BOUNCE_LOCALPARTS: Final = frozenset({"mailer-daemon", "postmaster"})


def _bounce(s: _SkipInput) -> SkipReason | None:
    """A delivery report, recognised by its evidence, never by the sender's name alone: people write from
    postmaster@ too (a mail admin answering a customer), and that mail is tracked like any other.

    Evidence: ``Content-Type: multipart/report`` (RFC 6522; report-type delivery-status = non-delivery report,
    RFC 3464, disposition-notification = read receipt, RFC 8098); Exchange's ``X-MS-Exchange-Message-Is-Ndr``;
    ``X-Failed-Recipients`` (Exim, Postfix); or a mailer-daemon/postmaster sender with the null reverse path
    (``Return-Path: <>``) that RFC 5321 §4.5.5 requires of non-delivery notifications."""
    headers = s.message.headers
    content_type = (headers.get("Content-Type") or "").lower()
    if content_type.startswith("multipart/report"):
        match = _REPORT_TYPE.search(content_type)
        kind = match.group(1) if match else "unknown"
        return SkipReason(SkipCode.BOUNCE, f"delivery report (multipart/report; report-type={kind})")
    if headers.get("X-MS-Exchange-Message-Is-Ndr") is not None:
        return SkipReason(SkipCode.BOUNCE, "Exchange non-delivery report (X-MS-Exchange-Message-Is-Ndr)")
    if headers.get("X-Failed-Recipients") is not None:
        return SkipReason(SkipCode.BOUNCE, "non-delivery report (X-Failed-Recipients)")
    origin = s.message.originator
    return_path = (headers.get("Return-Path") or "").strip()
    if origin is not None and origin.local_part in _BOUNCE_LOCALPARTS and return_path == "<>":
        return SkipReason(SkipCode.BOUNCE, f"sent by {origin.local_part} with the null reverse path "
                                           "(Return-Path: <>) of a non-delivery notice")
    return None


def _auto_reply(s: _SkipInput) -> SkipReason | None:
    headers = s.message.headers
    auto_submitted = headers.get("Auto-Submitted")
    # RFC 3834 §5: any value other than "no" marks automatic mail (auto-replied, auto-generated, ...).
    if auto_submitted is not None and auto_submitted.strip().lower().split(";")[0].strip() != "no":
        return SkipReason(SkipCode.AUTO_REPLY, f"Auto-Submitted: {auto_submitted.strip()[:40]}")
    for name in ("X-Autoreply", "X-Autorespond"):  # EspoCRM's DefaultAutoReplyDetector (style-anchors §4)
        if headers.get(name) is not None:
            return SkipReason(SkipCode.AUTO_REPLY, f"{name} header present")
    precedence = (headers.get("Precedence") or "").strip().lower()
    if precedence == "auto_reply":
        return SkipReason(SkipCode.AUTO_REPLY, "Precedence: auto_reply")
    if s.org.treat_precedence_bulk_as_auto_reply and precedence in ("bulk", "junk", "list"):
        return SkipReason(SkipCode.AUTO_REPLY, f"Precedence: {precedence} (org treats bulk mail as automatic)")
    if s.org.treat_auto_response_suppress_as_auto_reply:
        suppress = headers.get("X-Auto-Response-Suppress")
        if suppress is not None and suppress.strip():
            return SkipReason(SkipCode.AUTO_REPLY, f"X-Auto-Response-Suppress: {suppress.strip()[:40]}")
    return None


def _never_log(s: _SkipInput) -> SkipReason | None:
    # Any participant on the list stops tracking (HubSpot "never log" semantics, crm-ref §14): the point of the
    # list is privacy (e.g. HR, legal), so one listed party is enough.
    message = s.message
    participants = [a for a in (message.from_, message.sender) if a is not None] + list(message.recipients())
    for party in participants:
        if party.address in s.org.never_log_addresses:
            return SkipReason(SkipCode.NEVER_LOG, f"{party.address} is on the never-log list")
        if party.domain in s.org.never_log_domains:
            return SkipReason(SkipCode.NEVER_LOG, f"domain {party.domain} is on the never-log list")
    return None


def _too_old(s: _SkipInput) -> SkipReason | None:
    # crm-ref §2.4 "Process Email From" (the greater of profile and mailbox dates; the service passes that, or the
    # high-water mark, as process_email_received_after). crm-ref §5.3: moving old mail back does not reprocess it.
    cutoff = s.mailbox.process_email_received_after
    when = s.message.received_at or s.message.sent_at
    if cutoff is not None and when is not None and when < cutoff:
        return SkipReason(SkipCode.TOO_OLD, f"received {when.isoformat()} before {cutoff.isoformat()}")
    return None


def is_internal_message(message: MailMessage, org: OrgEmailSettings) -> bool:
    """Sender and every visible recipient are in the org's internal domains."""
    origin = message.originator
    recipients = message.recipients()
    if origin is None or not recipients or not org.internal_domains:
        return False
    return org.is_internal(origin.address) and all(org.is_internal(r.address) for r in recipients)


def _internal(s: _SkipInput) -> SkipReason | None:
    # organization.ignoreinternalemail + DoNotIgnoreInternalEmailToQueues (default true) (crm-ref §5.2).
    if not s.org.ignore_internal_email or not is_internal_message(s.message, s.org):
        return None
    if s.org.do_not_ignore_internal_email_to_queues:
        to_queue = s.mailbox.kind is MailboxKind.QUEUE or any(
            r.address in s.queue_addresses for r in s.message.recipients())
        if to_queue:
            return None
    return SkipReason(SkipCode.INTERNAL, "internal email (sender and all recipients internal) and the org "
                                         "ignores internal email")


# The order is part of the contract (docs/tracking-rules.md "Skip rules").
SKIP_RULES: Final[tuple[tuple[SkipCode, SkipRule], ...]] = (
    (SkipCode.DRAFT, _draft),
    (SkipCode.JUNK, _junk),
    (SkipCode.FOLDER_NOT_TRACKED, _folder),
    (SkipCode.OWN_OUTBOUND, _own_outbound),
    (SkipCode.NO_MESSAGE_ID, _no_message_id),
    (SkipCode.BOUNCE, _bounce),
    (SkipCode.AUTO_REPLY, _auto_reply),
    (SkipCode.NEVER_LOG, _never_log),
    (SkipCode.TOO_OLD, _too_old),
    (SkipCode.INTERNAL, _internal),
)


def first_skip_reason(message: MailMessage, mailbox: MailboxConfig, org: OrgEmailSettings, *,
                      queue_addresses: Sequence[str] | frozenset[str] = frozenset(),
                      manual: bool = False) -> SkipReason | None:
    """The first skip rule that matches, or None when the message may be tracked. ``queue_addresses`` = addresses
    of queue mailboxes (for DoNotIgnoreInternalEmailToQueues); ``manual``: the user asked for this message to be
    tracked (track by category), so the folder rules (Junk Email, folder not tracked) are left out."""
    given = _SkipInput(message, mailbox, org, frozenset(a.lower() for a in queue_addresses), manual)
    for _code, rule in SKIP_RULES:
        reason = rule(given)
        if reason is not None:
            return reason
    return None
