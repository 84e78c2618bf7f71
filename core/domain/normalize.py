"""Graph message JSON (and raw MIME) -> :class:`MailMessage`.

Input is untrusted: anyone on the internet can put anything into a message. The normaliser never crashes on odd
fields (wrong types, bad base64, absurd sizes); it drops what it cannot use and records each cut in
``MailMessage.truncations``. It raises :class:`InvalidMessage` only when the input is unusable as a message at all
(not an object, or no Graph id on a top-level message).

Field sources: graph.md §6 (message resource), §6.1 (fileAttachment ``contentBytes`` base64, itemAttachment
``item`` via ``$expand``), and MAPI ``String 0x1042``/``0x1039`` for In-Reply-To/References when the
``internetMessageHeaders`` do not carry them (graph.md §6 "In-Reply-To/References").
"""

from __future__ import annotations

import base64
import binascii
import email
import email.errors
import email.header
import email.message
import email.utils
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from email import policy
from typing import Any, Final

from core.domain.model import (
    LOOP_MARKER_HEADER,
    LOOP_MARKER_PROPERTY,
    Address,
    Attachment,
    Folder,
    FolderKind,
    Headers,
    Importance,
    MailMessage,
)

__all__ = [
    "LIMITS",
    "InvalidMessage",
    "NormalizeLimits",
    "extract_message_ids",
    "normalize_graph_message",
    "normalize_mime_message",
]


class InvalidMessage(ValueError):
    """The input cannot be treated as a message at all."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NormalizeLimits:
    """Bounds that keep one hostile message from costing unbounded memory/CPU downstream."""

    max_recipients_per_field: Final = 500  # Exchange Online: <= 500 To+Cc+Bcc (graph.md §6)
    max_subject_chars: Final = 2048  # Dataverse keeps 800 (dv-ref §2.1); the plan truncates further
    max_headers: Final = 300
    max_header_name_chars: Final = 200
    max_header_value_chars: Final = 16_384
    max_attachments: Final = 250
    max_nesting_depth: Final = 3  # a forwarded message inside a forwarded message inside the wrapper
    max_references: Final = 100  # correlation looks at the last 32 (Odoo, crm-ref §14)
    max_categories: Final = 50
    max_body_chars: Final = 8_000_000
    max_address_chars: Final = 320  # activityparty.addressused String 320 (dv-ref §2.2)
    max_name_chars: Final = 256
    max_id_chars: Final = 998  # RFC 5322 line length


LIMITS: Final = NormalizeLimits()

_MSG_ID: Final = re.compile(r"<[^<>\s]{1,996}>")
_CONTROL: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_FOLDED: Final = re.compile(r"\r?\n[ \t]*")
# Lone UTF-16 surrogates are valid JSON escapes (\ud800) but not text: UTF-8 encoders (uuid5, nh3, HTTP
# bodies) refuse them. They become U+FFFD here, once, so nothing downstream meets them.
_SURROGATE: Final = re.compile(r"[\ud800-\udfff]")


def _scrub(value: str) -> str:
    return _SURROGATE.sub("\ufffd", value)


class _Notes:
    """Collects truncation notes while walking one message (shared by nested items, bounded itself)."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, note: str) -> None:
        if len(self.items) < 100 and note not in self.items:
            self.items.append(note)


# ------------------------------------------------------------------------------------------------ small parsers


def _str(value: object, limit: int, notes: _Notes, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        notes.add(f"{what}: not a string")
        return None
    if len(value) > limit:
        notes.add(f"{what}: truncated to {limit} characters")
        value = value[:limit]
    return _scrub(value)


def _clean_line(value: str) -> str:
    """Unfold header-ish text and drop control characters (they have no meaning in a subject or a name)."""
    return _scrub(_CONTROL.sub("", _FOLDED.sub(" ", value)).replace("\r", " ").replace("\n", " "))


def _plausible_address(address: str) -> bool:
    local, at, domain = address.rpartition("@")
    return bool(at and local and domain) and not any(c.isspace() or c in "<>\"(),;" for c in address)


def _address(value: object, notes: _Notes, what: str) -> Address | None:
    if not isinstance(value, Mapping):
        return None
    inner = value.get("emailAddress")
    if not isinstance(inner, Mapping):
        return None
    raw = inner.get("address")
    if not isinstance(raw, str) or not raw.strip():
        notes.add(f"{what}: entry without an address dropped")
        return None
    raw = _clean_line(raw).strip()
    if len(raw) > LIMITS.max_address_chars or not _plausible_address(raw):
        notes.add(f"{what}: unusable address dropped")
        return None
    name = inner.get("name")
    name_text = _clean_line(name)[: LIMITS.max_name_chars] if isinstance(name, str) else ""
    return Address.of(name_text, raw)


def _addresses(value: object, notes: _Notes, what: str) -> tuple[Address, ...]:
    if value is None:
        return ()
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        notes.add(f"{what}: not a list")
        return ()
    if len(value) > LIMITS.max_recipients_per_field:
        notes.add(f"{what}: capped at {LIMITS.max_recipients_per_field} recipients")
        value = value[: LIMITS.max_recipients_per_field]
    found: list[Address] = []
    for entry in value:
        address = _address(entry, notes, what)
        if address is not None:
            found.append(address)
    return tuple(found)


def _datetime(value: object, notes: _Notes, what: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 64:
        notes.add(f"{what}: unusable date")
        return None
    text = value.strip()
    # Graph may send 7 fractional digits (.NET ticks); keep microseconds.
    match = re.match(r"^(.*T\d\d:\d\d:\d\d)\.(\d+)(.*)$", text)
    if match:
        text = f"{match.group(1)}.{match.group(2)[:6].ljust(6, '0')}{match.group(3)}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        notes.add(f"{what}: unusable date")
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)  # Graph times are UTC (graph.md §6)


def _b64(value: object, notes: _Notes, what: str, max_decoded: int | None = None) -> bytes | None:
    if isinstance(value, bytes | bytearray):  # already raw: an attachment read through `$value` (no base64)
        if max_decoded is not None and len(value) > max_decoded:
            notes.add(f"{what}: too large, content not kept")
            return None
        return value
    if not isinstance(value, str):
        return None
    if max_decoded is not None and len(value) > (max_decoded * 4) // 3 + 8:
        notes.add(f"{what}: too large, content not kept")
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        notes.add(f"{what}: invalid base64")
        return None


def extract_message_ids(value: str | None, limit: int = LIMITS.max_references) -> tuple[str, ...]:
    """``<a@x> <b@y>`` -> ``("<a@x>", "<b@y>")`` keeping the LAST ``limit`` ids (the newest ancestors). A bare id
    without brackets (some clients) is accepted when it is the only token."""
    if not value:
        return ()
    ids = _MSG_ID.findall(value)
    if not ids:
        bare = value.strip()
        if bare and "@" in bare and not any(c.isspace() for c in bare) and len(bare) <= LIMITS.max_id_chars:
            ids = [f"<{bare.strip('<>')}>"]
    return tuple(ids[-limit:])


def _headers(value: object, notes: _Notes) -> Headers:
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        return Headers()
    if len(value) > LIMITS.max_headers:
        notes.add(f"internetMessageHeaders: capped at {LIMITS.max_headers}")
        value = value[: LIMITS.max_headers]
    pairs: list[tuple[str, str]] = []
    for entry in value:
        if not isinstance(entry, Mapping):
            continue
        name, text = entry.get("name"), entry.get("value")
        if not isinstance(name, str) or not isinstance(text, str) or not name.strip():
            continue
        if len(name) > LIMITS.max_header_name_chars:
            notes.add("internetMessageHeaders: over-long header name dropped")
            continue
        if len(text) > LIMITS.max_header_value_chars:
            notes.add(f"internetMessageHeaders: {name[:40]} value truncated")
            # References lists ancestors oldest first: keep its end (the newest ids), as correlation wants.
            if name.strip().lower() == "references":
                text = text[-LIMITS.max_header_value_chars:]
            else:
                text = text[: LIMITS.max_header_value_chars]
        pairs.append((_scrub(name.strip()), _scrub(text)))
    return Headers(tuple(pairs))


def _extended_property(data: Mapping[str, Any], prop_id: str) -> str | None:
    props = data.get("singleValueExtendedProperties")
    if not isinstance(props, Sequence) or isinstance(props, str | bytes):
        return None
    for entry in props[:50]:
        if isinstance(entry, Mapping) and str(entry.get("id", "")).lower() == prop_id.lower():
            value = entry.get("value")
            return value[: LIMITS.max_header_value_chars] if isinstance(value, str) else None
    return None


def _importance(value: object) -> Importance:
    if isinstance(value, str):
        try:
            return Importance(value.lower())
        except ValueError:
            return Importance.NORMAL
    return Importance.NORMAL


def _categories(value: object, notes: _Notes) -> tuple[str, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        return ()
    if len(value) > LIMITS.max_categories:
        notes.add(f"categories: capped at {LIMITS.max_categories}")
    return tuple(_scrub(c[:255]) for c in value[: LIMITS.max_categories] if isinstance(c, str))


# ------------------------------------------------------------------------------------------------ Graph JSON


def _attachments(value: object, mailbox: str, depth: int, notes: _Notes,
                 attached_mime: Mapping[str, bytes] | None = None) -> tuple[Attachment, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        return ()
    if len(value) > LIMITS.max_attachments:
        notes.add(f"attachments: capped at {LIMITS.max_attachments} ({len(value) - LIMITS.max_attachments} more "
                  "not saved)")
        value = value[: LIMITS.max_attachments]
    found: list[Attachment] = []
    for entry in value:
        if not isinstance(entry, Mapping):
            continue
        attachment = _attachment(entry, mailbox, depth, notes, attached_mime)
        if attachment is not None:
            found.append(attachment)
    return tuple(found)


def _attachment(entry: Mapping[str, Any], mailbox: str, depth: int, notes: _Notes,
                attached_mime: Mapping[str, bytes] | None = None) -> Attachment | None:
    odata_type = str(entry.get("@odata.type", "")).lower()
    name = _clean_line(entry.get("name") if isinstance(entry.get("name"), str) else "")[:255] or "attachment"
    content_type = entry.get("contentType") if isinstance(entry.get("contentType"), str) else None
    raw_size = entry.get("size")
    size = raw_size if isinstance(raw_size, int) and not isinstance(raw_size, bool) and raw_size >= 0 else 0
    is_inline = entry.get("isInline") is True
    content_id = entry.get("contentId") if isinstance(entry.get("contentId"), str) else None
    if content_id is not None:
        content_id = _clean_line(content_id)[:250].strip("<>") or None

    is_item = "itemattachment" in odata_type or ("item" in entry and "contentBytes" not in entry)
    if is_item:
        item_data = entry.get("item")
        item: MailMessage | None = None
        raw = (attached_mime or {}).get(str(entry.get("id") or ""))
        if depth >= LIMITS.max_nesting_depth:
            notes.add(f"attachments: nesting deeper than {LIMITS.max_nesting_depth} not followed")
        elif raw is not None:
            # The attached message's own MIME (its $value): every header of the original, which the expanded item
            # does not carry (graph.md §6.1: default properties only).
            item = _mime(mailbox, raw, depth + 1, notes)
        elif isinstance(item_data, Mapping):
            item = _message(mailbox, item_data, Folder(FolderKind.OTHER), depth + 1, notes, nested=True)
        return Attachment(name=name, content_type=content_type or "message/rfc822", size=size,
                          is_inline=is_inline, content_id=content_id, item=item)
    if "referenceattachment" in odata_type:
        # A cloud link: nothing to store but its name (graph.md §6.1: $value -> 405).
        return Attachment(name=name, content_type=content_type or "application/octet-stream", size=size,
                          is_inline=False, content_id=None)

    content = _b64(entry.get("contentBytes"), notes, f"attachment {name[:40]}")
    if content is not None and size == 0:
        size = len(content)
    media = (content_type or "application/octet-stream").lower()
    nested: MailMessage | None = None
    # A message forwarded by some clients arrives as a message/rfc822 *file* (issue 5: "item attachment (or
    # message/rfc822 part)"); parse it so unwrapping treats both alike.
    if content is not None and (media == "message/rfc822" or name.lower().endswith(".eml")):
        if depth >= LIMITS.max_nesting_depth:
            notes.add(f"attachments: nesting deeper than {LIMITS.max_nesting_depth} not followed")
        else:
            nested = _mime(mailbox, content, depth + 1, notes)
    return Attachment(name=name, content_type=media, size=size, is_inline=is_inline, content_id=content_id,
                      content=content, item=nested)


def _message(mailbox: str, data: Mapping[str, Any], folder: Folder, depth: int, notes: _Notes,
             *, nested: bool, attached_mime: Mapping[str, bytes] | None = None) -> MailMessage:
    graph_id = data.get("id")
    if not nested and (not isinstance(graph_id, str) or not graph_id.strip()):
        raise InvalidMessage("message has no Graph id")
    graph_id_text = graph_id[:1024] if isinstance(graph_id, str) else ""

    headers = _headers(data.get("internetMessageHeaders"), notes)
    internet_id = _str(data.get("internetMessageId"), LIMITS.max_id_chars, notes, "internetMessageId")
    if internet_id is None:
        internet_id = headers.get("Message-ID")
    internet_id = _clean_line(internet_id).strip() if internet_id else None

    subject = _str(data.get("subject"), LIMITS.max_subject_chars, notes, "subject") or ""

    in_reply_to_raw = headers.get("In-Reply-To") or _extended_property(data, "String 0x1042")
    references_raw = headers.get("References") or _extended_property(data, "String 0x1039")
    in_reply_to_ids = extract_message_ids(in_reply_to_raw, limit=1)
    references = extract_message_ids(references_raw)
    if references_raw and len(_MSG_ID.findall(references_raw)) > LIMITS.max_references:
        notes.add(f"references: kept the last {LIMITS.max_references}")

    body_html: str | None = None
    body_text: str | None = None
    body = data.get("body")
    if isinstance(body, Mapping):
        content = _str(body.get("content"), LIMITS.max_body_chars, notes, "body")
        if str(body.get("contentType", "html")).lower() == "text":
            body_text = content
        else:
            body_html = content

    conversation_index = _b64(data.get("conversationIndex"), notes, "conversationIndex", max_decoded=4096)

    parent_folder = data.get("parentFolderId")
    if isinstance(parent_folder, str) and not folder.folder_id:
        folder = Folder(folder.kind, parent_folder[:1024])

    return MailMessage(
        mailbox=mailbox.strip().lower(),
        graph_id=graph_id_text,
        folder=folder,
        internet_message_id=internet_id or None,
        subject=_clean_line(subject),
        from_=_address(data.get("from"), notes, "from"),
        sender=_address(data.get("sender"), notes, "sender"),
        to=_addresses(data.get("toRecipients"), notes, "toRecipients"),
        cc=_addresses(data.get("ccRecipients"), notes, "ccRecipients"),
        bcc=_addresses(data.get("bccRecipients"), notes, "bccRecipients"),
        reply_to=_addresses(data.get("replyTo"), notes, "replyTo"),
        sent_at=_datetime(data.get("sentDateTime"), notes, "sentDateTime"),
        received_at=_datetime(data.get("receivedDateTime"), notes, "receivedDateTime"),
        headers=headers,
        body_html=body_html,
        body_text=body_text,
        importance=_importance(data.get("importance")),
        is_draft=data.get("isDraft") is True,
        conversation_id=_str(data.get("conversationId"), 1024, notes, "conversationId"),
        conversation_index=conversation_index,
        in_reply_to=in_reply_to_ids[0] if in_reply_to_ids else None,
        references=references,
        categories=_categories(data.get("categories"), notes),
        attachments=_attachments(data.get("attachments"), mailbox, depth, notes, attached_mime),
        truncations=(),
        loop_marker=_loop_marker(headers.get(LOOP_MARKER_HEADER) or _extended_property(data, LOOP_MARKER_PROPERTY)),
    )


def normalize_graph_message(mailbox: str, data: Mapping[str, Any], folder_kind: FolderKind,
                            folder_id: str = "", *, attached_mime: Mapping[str, bytes] | None = None) -> MailMessage:
    """Normalise one Graph message (fetched with ``$select`` incl. ``internetMessageHeaders`` and
    ``$expand=attachments``) seen in ``mailbox``'s folder of ``folder_kind``. ``attached_mime``: attachment id ->
    the raw MIME of an attached message (``.../attachments/{id}/$value``), read instead of the expanded item."""
    if not isinstance(data, Mapping):
        raise InvalidMessage("message is not a JSON object")
    notes = _Notes()
    message = _message(mailbox, data, Folder(folder_kind, folder_id), 0, notes, nested=False,
                       attached_mime=attached_mime)
    return _with_notes(message, notes)


def _loop_marker(value: str | None) -> str | None:
    return _clean_line(value).strip()[:64] or None if value else None


def _with_notes(message: MailMessage, notes: _Notes) -> MailMessage:
    return replace(message, truncations=tuple(notes.items))


# ------------------------------------------------------------------------------------------------ MIME


def _decoded_header(raw: object) -> str:
    if raw is None:
        return ""
    try:
        return str(email.header.make_header(email.header.decode_header(str(raw))))
    except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
        return str(raw)


def _mime_addresses(msg: email.message.Message, name: str, notes: _Notes) -> tuple[Address, ...]:
    values = [_decoded_header(v) for v in (msg.get_all(name) or [])]
    pairs = email.utils.getaddresses(values)
    if len(pairs) > LIMITS.max_recipients_per_field:
        notes.add(f"{name}: capped at {LIMITS.max_recipients_per_field} recipients")
        pairs = pairs[: LIMITS.max_recipients_per_field]
    found: list[Address] = []
    for display, raw in pairs:
        raw = _clean_line(raw).strip()
        if raw and len(raw) <= LIMITS.max_address_chars and _plausible_address(raw):
            found.append(Address.of(_clean_line(display)[: LIMITS.max_name_chars], raw))
    return tuple(found)


def _decode_body(content: bytes, charset: str | None, notes: _Notes) -> str:
    """A body part as text. Bytes its charset cannot decode (or an unknown charset) become U+FFFD, with a note:
    the email in CRM shows the body, and says it is not exactly what was sent."""
    name = charset or "utf-8"
    try:
        return content.decode(name)
    except (LookupError, ValueError):  # unknown charset (or a name with a NUL in it), or bytes not in it
        pass
    try:
        text = content.decode(name, errors="replace")
        notes.add(f"body: bytes not valid in its charset {name[:40]!r} replaced")
    except (LookupError, ValueError):
        text = content.decode("utf-8", errors="replace")
        notes.add(f"body: unknown charset {name[:40]!r}, read as UTF-8")
    return text


def _mime(mailbox: str, data: bytes, depth: int, notes: _Notes) -> MailMessage | None:
    try:
        msg = email.message_from_bytes(data, policy=policy.compat32)
        return _from_mime(mailbox, msg, depth, notes)
    except Exception:  # the stdlib parser is lenient, but hostile bytes must never crash us
        notes.add("message/rfc822: unparsable")
        return None


def _from_mime(mailbox: str, msg: email.message.Message, depth: int, notes: _Notes) -> MailMessage:
    raw_headers = msg.items()[: LIMITS.max_headers]
    headers = Headers(tuple(
        (k.strip(), _decoded_header(v)[: LIMITS.max_header_value_chars])
        for k, v in raw_headers if isinstance(k, str) and k.strip() and len(k) <= LIMITS.max_header_name_chars
    ))
    sent_at: datetime | None = None
    date_header = headers.get("Date")
    if date_header:
        try:
            sent_at = email.utils.parsedate_to_datetime(date_header)
            if sent_at.tzinfo is None:
                sent_at = sent_at.replace(tzinfo=UTC)
        except (TypeError, ValueError, IndexError):
            notes.add("Date: unusable date")
    from_list = _mime_addresses(msg, "From", notes)
    sender_list = _mime_addresses(msg, "Sender", notes)

    body_html: str | None = None
    body_text: str | None = None
    attachments: list[Attachment] = []
    beyond_cap = 0
    for part in msg.walk() if msg.is_multipart() else [msg]:
        if part.is_multipart():
            continue
        media = part.get_content_type()
        disposition = (part.get_content_disposition() or "").lower()
        filename = _decoded_header(part.get_filename()) if part.get_filename() else None
        is_body = disposition != "attachment" and filename is None and media in ("text/html", "text/plain")
        if not is_body and len(attachments) >= LIMITS.max_attachments:
            beyond_cap += 1  # counted, not decoded: the note says how many are missing
            continue
        if media == "message/rfc822":
            inner = part.get_payload()
            item = None
            if depth >= LIMITS.max_nesting_depth:
                notes.add(f"attachments: nesting deeper than {LIMITS.max_nesting_depth} not followed")
            elif isinstance(inner, list) and inner and isinstance(inner[0], email.message.Message):
                item = _from_mime(mailbox, inner[0], depth + 1, notes)
            attachments.append(Attachment(name=filename or "message.eml", content_type=media, size=0, item=item))
            continue
        payload = part.get_payload(decode=True)
        content = payload if isinstance(payload, bytes) else b""
        if is_body:
            if (media == "text/html" and body_html is not None) or (media == "text/plain" and body_text is not None):
                continue
            text = _decode_body(content, part.get_content_charset(), notes)
            if len(text) > LIMITS.max_body_chars:
                notes.add(f"body: truncated to {LIMITS.max_body_chars} characters")
                text = text[: LIMITS.max_body_chars]
            if media == "text/html":
                body_html = text
            else:
                body_text = text
            continue
        content_id = part.get("Content-ID")
        attachments.append(Attachment(
            name=_clean_line(filename or "attachment")[:255], content_type=media, size=len(content),
            is_inline=disposition == "inline", content_id=str(content_id).strip().strip("<>") if content_id else None,
            content=content))

    if beyond_cap:
        notes.add(f"attachments: capped at {LIMITS.max_attachments} ({beyond_cap} more not saved)")
    importance_header = (headers.get("Importance") or "").lower()
    thread_index = headers.get("Thread-Index")
    return MailMessage(
        mailbox=mailbox.strip().lower(),
        graph_id="",
        folder=Folder(FolderKind.OTHER),
        internet_message_id=_clean_line(headers.get("Message-ID") or "").strip() or None,
        subject=_clean_line(headers.get("Subject") or "")[: LIMITS.max_subject_chars],
        from_=from_list[0] if from_list else None,
        sender=sender_list[0] if sender_list else None,
        to=_mime_addresses(msg, "To", notes),
        cc=_mime_addresses(msg, "Cc", notes),
        bcc=_mime_addresses(msg, "Bcc", notes),
        reply_to=_mime_addresses(msg, "Reply-To", notes),
        sent_at=sent_at,
        received_at=None,
        headers=headers,
        body_html=body_html,
        body_text=body_text,
        importance=_importance(importance_header),
        in_reply_to=(extract_message_ids(headers.get("In-Reply-To"), limit=1) or (None,))[0],
        references=extract_message_ids(headers.get("References")),
        attachments=tuple(attachments),
        # Thread-Index: the MIME form of the conversation index (PidTagConversationIndex)
        conversation_index=_b64(thread_index.strip(), notes, "Thread-Index", max_decoded=4096) if thread_index
        else None,
        loop_marker=_loop_marker(headers.get(LOOP_MARKER_HEADER)),
    )


def normalize_mime_message(mailbox: str, data: bytes) -> MailMessage:
    """Normalise a raw RFC 5322 message (e.g. an attachment's ``$value``)."""
    if not isinstance(data, bytes | bytearray):
        raise InvalidMessage("MIME input is not bytes")
    notes = _Notes()
    message = _mime(mailbox, bytes(data), 0, notes)
    if message is None:
        raise InvalidMessage("unparsable MIME message")
    return _with_notes(message, notes)
