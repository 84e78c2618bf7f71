"""MIME <-> Graph message conversion for the Graph emulator (inbound SMTP, `$value`, outbox .eml files).

`parse_message` turns RFC 5322 bytes into the dict shape Graph returns for a message (reference/graph.md §6,
§6.1); `build_mime` does the reverse for messages the emulator sends. Both lean on the stdlib `email` package:
parsing uses the `compat32` policy on purpose, because it keeps raw header text (`raw_items`) and decodes broken
base64/quoted-printable bodies leniently, while `policy.default`'s header parser is slow on hostile headers and
raises on some malformed ones. Header *decoding* (RFC 2047, raw 8-bit/SMTPUTF8 text) and charset fallbacks are
done here so that one bad header or charset never loses the rest of the message.

Building uses `policy.SMTP` (or `SMTPUTF8` when an address needs it), so RFC 2047/2231 encoding and folding come
from the stdlib. Body parts are written as base64 of the exact UTF-8 text so a parse of the result returns the
body byte-for-byte (quoted-printable/`set_content(str)` would normalise line endings and add a final newline).

Limits and rejection rules are described in docs/graph-mime-smtp.md and `MimeLimits`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
import secrets
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import policy as email_policy
from email.errors import HeaderParseError, MessageError
from email.generator import BytesGenerator
from email.header import Header, decode_header
from email.headerregistry import Address
from email.message import EmailMessage, Message, MIMEPart
from email.parser import BytesParser
from email.utils import format_datetime, getaddresses, parsedate_to_datetime
from html.parser import HTMLParser
from io import BytesIO
from typing import Any

__all__ = [
    "DEFAULT_LIMITS",
    "MimeLimits",
    "MimeRejected",
    "ThreadIndex",
    "build_mime",
    "decode_header_value",
    "html_to_text",
    "iter_attachments",
    "make_message_id",
    "make_thread_index",
    "parse_message",
    "parse_thread_index",
]

log = logging.getLogger(__name__)

FILE_ATTACHMENT = "#microsoft.graph.fileAttachment"
ITEM_ATTACHMENT = "#microsoft.graph.itemAttachment"
GRAPH_MESSAGE = "#microsoft.graph.message"
EMULATOR_DOMAIN = "emulator.local"


class MimeRejected(Exception):
    """The input is refused (empty, not an email, over a limit). `reason` is safe to show in an SMTP reply."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class MimeLimits:
    """Bounds that keep every parse finite in time and memory.

    max_bytes: 150 MB is Exchange Online's largest message (attachments via upload sessions, graph.md §6.1).
    max_header_bytes: 256 KB is Exchange Online's header size limit (graph.md §7.3), for the top-level header block.
    max_parts: every MIME entity counts (containers, leaves, attached messages); checked before parsing by counting
        delimiter lines of declared boundaries, so a hostile message cannot make the parser build millions of objects.
    max_mime_depth: nesting of multiparts and attached messages; the stdlib parser and generator recurse per level.
    max_item_depth: itemAttachment nesting; a deeper attached message is kept as a fileAttachment (.eml).
    max_references: References ids kept (the first, the root, plus the most recent ones).
    """

    max_bytes: int = 150 * 1024 * 1024
    max_header_bytes: int = 256 * 1024
    max_parts: int = 1000
    max_mime_depth: int = 100
    max_item_depth: int = 8
    max_references: int = 100


DEFAULT_LIMITS = MimeLimits()

# Headers whose presence marks input as an Internet message; a header block with none of them is "not an email".
_KNOWN_HEADERS = frozenset({
    "from", "sender", "to", "cc", "bcc", "reply-to", "subject", "date", "message-id", "mime-version",
    "content-type", "received", "return-path", "in-reply-to", "references", "delivered-to",
})
_HEADER_LINE = re.compile(rb"^[\x21-\x39\x3b-\x7e]+:")
_MSGID = re.compile(r"<[^<>\s]*>")
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([QqBb])\?([^?]*)\?=")
_BETWEEN_WORDS = re.compile(r"(=\?[^?\s]+\?[QqBb]\?[^?]*\?=)[ \t\r\n]+(?==\?[^?\s]+\?[QqBb]\?[^?]*\?=)")
_BOUNDARY_PARAM = re.compile(rb"""boundary\s*=\s*(?:"([^"\r\n]{1,200})"|([^\s;"]{1,200}))""", re.IGNORECASE)
_DELIMITER_LINE = re.compile(rb"^--([^\r\n]{1,210})", re.MULTILINE)
_WS = re.compile(r"\s+")

# Labels mail software uses that Python does not know, or whose superset is what senders really mean (the same
# choices browsers make in the WHATWG Encoding Standard: latin-1/ascii labels decode as windows-1252, etc.).
_CHARSET_ALIASES = {
    "iso-8859-1": "cp1252", "iso8859-1": "cp1252", "latin1": "cp1252", "latin-1": "cp1252", "l1": "cp1252",
    "windows-1252": "cp1252", "x-sjis": "cp932", "shift_jis": "cp932", "shift-jis": "cp932", "sjis": "cp932",
    "windows-31j": "cp932", "ms_kanji": "cp932", "gb2312": "gb18030", "gbk": "gb18030", "x-gbk": "gb18030",
    "ks_c_5601-1987": "cp949", "euc-kr": "cp949", "iso-8859-8-i": "iso-8859-8", "utf8": "utf-8",
    "unicode-1-1-utf-7": "utf-7", "x-mac-roman": "mac-roman", "tis-620": "cp874", "iso-8859-11": "cp874",
}
_UNLABELLED = frozenset({"", "us-ascii", "ascii", "ansi_x3.4-1968", "x-unknown", "unknown-8bit", "unknown", "default"})


# --------------------------------------------------------------------------------------------------------------
# decoding helpers


def _decode_bytes(data: bytes, charset: str | None) -> str:
    """Decode with the declared charset; unknown/absent labels try UTF-8 then windows-1252. Never raises."""
    label = (charset or "").strip().strip("\"'").lower()
    if label in _UNLABELLED:
        # Undeclared or "ascii" 8-bit text is UTF-8 far more often than anything else today.
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("cp1252", "replace")
    codec = _CHARSET_ALIASES.get(label, label)
    try:
        return data.decode(codec, "replace")
    except (LookupError, ValueError):
        # Unknown label or a bytes-to-bytes codec (e.g. "zlib", which bytes.decode refuses with LookupError).
        return _decode_bytes(data, None)


def _unescape_surrogates(value: str) -> str:
    """compat32 keeps raw 8-bit header bytes as surrogate escapes; turn them into text (UTF-8, else cp1252)."""
    if value.isascii():
        return value
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace").decode("utf-8")
    return _decode_bytes(raw, None)


def _b_decode(text: str) -> bytes:
    """Lenient RFC 2047 'B' decoding: ignore junk characters, repair padding, drop a dangling sextet."""
    clean = re.sub(r"[^A-Za-z0-9+/]", "", text)
    if len(clean) % 4 == 1:
        clean = clean[:-1]
    clean += "=" * (-len(clean) % 4)
    try:
        return base64.b64decode(clean)
    except (binascii.Error, ValueError):
        return b""


def _decode_words_leniently(value: str) -> str:
    """RFC 2047 decoding that never raises: used when `email.header.decode_header` cannot be.

    decode_header raises on broken base64 and re-encodes raw non-ASCII text with 'raw-unicode-escape', which
    garbles SMTPUTF8 headers that also contain encoded words, so those inputs come here.
    """
    value = _BETWEEN_WORDS.sub(r"\1", value)  # whitespace between adjacent encoded words is not content

    def one(match: re.Match[str]) -> str:
        charset, enc, text = match.group(1).split("*", 1)[0], match.group(2).upper(), match.group(3)
        if enc == "B":
            data = _b_decode(text)
        else:
            data = binascii.a2b_qp(text.encode("ascii", "replace"), header=True)
        return _decode_bytes(data, charset)

    return _ENCODED_WORD.sub(one, value)


def _unfold(value: str) -> str:
    return re.sub(r"\r?\n(?=[ \t])", "", value).replace("\r", "").replace("\n", "")


def decode_header_value(value: Any) -> str:
    """Header value as text: unfolded, raw 8-bit bytes decoded, RFC 2047 words decoded. Never raises."""
    text = _unescape_surrogates(_unfold(str(value))).strip()
    if "=?" not in text:
        return text
    if not text.isascii():
        return _decode_words_leniently(text)
    try:
        parts = decode_header(text)
    except (HeaderParseError, ValueError, LookupError, binascii.Error):
        return _decode_words_leniently(text)
    out: list[str] = []
    for chunk, charset in parts:
        out.append(_decode_bytes(chunk, charset) if isinstance(chunk, bytes) else chunk)
    return "".join(out)


def _recipients(values: Iterable[str]) -> list[dict[str, Any]]:
    """Address header values -> Graph recipients; groups are flattened, broken entries kept as well as possible."""
    unfolded = [_unescape_surrogates(_unfold(str(v))) for v in values]
    result: list[dict[str, Any]] = []
    for name, address in getaddresses(unfolded):
        if not name and not address:
            continue  # e.g. "undisclosed-recipients:;"
        address = address.strip()  # never decoded: RFC 2047 §5 forbids encoded words in an addr-spec
        result.append({"emailAddress": {"name": decode_header_value(name) if name else "", "address": address}})
    return result


def _graph_datetime(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # RFC 5322 "-0000": the zone is unknown, UTC is the best reading
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _first_msgid(value: str | None) -> str | None:
    if not value:
        return None
    match = _MSGID.search(value)
    if match and len(match.group(0)) > 2:
        return match.group(0)
    token = value.strip().split()[0] if value.strip() else ""
    return f"<{token.strip('<>')}>" if token.strip("<>") else None


def _references(value: str | None, cap: int) -> list[str]:
    if not value:
        return []
    ids = [m for m in _MSGID.findall(value) if len(m) > 2] or [f"<{t.strip('<>')}>" for t in value.split()]
    if len(ids) > cap:
        # RFC 5322 §3.6.4: keep the first (the thread root) and the most recent ones.
        ids = ids[:1] + ids[-(cap - 1):] if cap > 1 else ids[-cap:]
    return ids


def _importance(headers: Mapping[str, str]) -> str:
    """Importance, else X-Priority (1-2 high, 4-5 low), else X-MSMail-Priority, else Priority (RFC 2156)."""
    value = headers.get("importance", "").strip().lower()
    if value in ("low", "normal", "high"):
        return value
    match = re.match(r"\s*([1-5])", headers.get("x-priority", ""))
    if match:
        return {"1": "high", "2": "high", "3": "normal", "4": "low", "5": "low"}[match.group(1)]
    value = headers.get("x-msmail-priority", "").strip().lower()
    if value in ("low", "normal", "high"):
        return value
    value = headers.get("priority", "").strip().lower()
    return {"urgent": "high", "non-urgent": "low"}.get(value, "normal")


# --------------------------------------------------------------------------------------------------------------
# HTML -> text (body previews and the text/plain alternative of outgoing mail)

_BLOCK_TAGS = frozenset({
    "p", "div", "br", "li", "tr", "table", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "hr",
    "pre", "section", "article", "header", "footer", "dd", "dt", "address",
})
_SKIP_TAGS = frozenset({"script", "style", "head", "title", "template"})


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self._skip = 0
        self._pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP_TAGS:
            self._skip += 1
        elif tag in _BLOCK_TAGS:
            self.chunks.append("\n")
            self._pre += tag == "pre"

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self._skip = max(0, self._skip - 1)
        elif tag in _BLOCK_TAGS:
            self.chunks.append("\n")
            if tag == "pre":
                self._pre = max(0, self._pre - 1)

    def handle_data(self, data: str) -> None:
        if not self._skip:
            # Outside <pre>, HTML collapses whitespace runs (including newlines) to one space.
            self.chunks.append(data if self._pre else _WS.sub(" ", data))


def html_to_text(html: str) -> str:
    """Readable plain text from HTML: drops script/style/head, block elements become line breaks."""
    parser = _TextExtractor()
    try:
        parser.feed(html)
        parser.close()
    except (AssertionError, ValueError):  # very old HTMLParser bugs on pathological markup; keep what we have
        pass
    lines = [line.strip() for line in "".join(parser.chunks).split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _preview(text: str) -> str:
    # Bounded: only the start of the text can reach the 255-character preview.
    return " ".join(text[:65536].split())[:255]


# --------------------------------------------------------------------------------------------------------------
# parsing


def _check_limits(raw: bytes, limits: MimeLimits) -> bytes:
    """Cheap checks before the stdlib parser runs; returns the input with a repaired top-level header block."""
    if not raw or not raw.strip():
        raise MimeRejected("empty message")
    if len(raw) > limits.max_bytes:
        raise MimeRejected(f"message size {len(raw)} exceeds the limit of {limits.max_bytes} bytes")
    end = _header_end(raw, limits.max_header_bytes + 4)
    if end is None:
        if len(raw) > limits.max_header_bytes:
            raise MimeRejected(f"header block exceeds the limit of {limits.max_header_bytes} bytes")
        end = len(raw)
    elif end > limits.max_header_bytes:
        raise MimeRejected(f"header block exceeds the limit of {limits.max_header_bytes} bytes")
    head, names = _repair_header_block(raw[:end])
    if not names & _KNOWN_HEADERS:
        raise MimeRejected("not an RFC 5322 message: no recognisable header fields")
    raw = head + raw[end:]
    # Count delimiter lines of the boundaries the message declares: an upper bound on the parts the parser
    # would create, found without building them.
    boundaries = {m.group(1) or m.group(2) for m in _BOUNDARY_PARAM.finditer(raw)}
    if len(boundaries) > limits.max_parts:
        raise MimeRejected(f"more than {limits.max_parts} MIME parts")
    if boundaries:
        count = 0
        for match in _DELIMITER_LINE.finditer(raw):
            token = match.group(1).rstrip(b" \t")
            if token in boundaries or (token.endswith(b"--") and token[:-2] in boundaries):
                count += 1
        # Each part has an opening delimiter; each multipart adds one closing delimiter.
        if count > 2 * limits.max_parts:
            raise MimeRejected(f"more than {limits.max_parts} MIME parts")
    return raw


def _header_end(raw: bytes, search_limit: int) -> int | None:
    """Offset just past the blank line that ends the top-level header block (None if not found in range)."""
    window = raw[:search_limit]
    candidates = [i for i in (window.find(b"\r\n\r\n"), window.find(b"\n\n")) if i >= 0]
    if raw.startswith((b"\r\n", b"\n")):
        return 0
    if not candidates:
        return None
    i = min(candidates)
    return i + (4 if window[i:i + 4] == b"\r\n\r\n" else 2)


def _repair_header_block(head: bytes) -> tuple[bytes, set[str]]:
    """Drop top-level header lines that are neither `name:` fields nor continuations.

    The stdlib parser would end the header block at such a line and push every later header (often Content-Type)
    into the body; dropping the one bad line keeps the rest of the message intact, which is what "best effort"
    means for a mail store.
    """
    kept: list[bytes] = []
    names: set[str] = set()
    lines = head.splitlines(keepends=True)
    for index, line in enumerate(lines):
        if not line.strip():
            kept.append(line)
            continue
        if line[:1] in (b" ", b"\t"):
            if kept:
                kept.append(line)
            continue
        if index == 0 and line.startswith(b"From "):
            kept.append(line)  # mbox envelope line; the parser keeps it as the unixfrom
            continue
        if _HEADER_LINE.match(line):
            kept.append(line)
            names.add(line.split(b":", 1)[0].decode("ascii").lower())
        else:
            log.debug("dropping malformed header line (%d bytes)", len(line))
    return b"".join(kept), names


def _structure_stats(msg: Message) -> tuple[int, int]:
    """(number of entities, maximum depth), iteratively, so hostile nesting cannot exhaust the stack."""
    count, deepest = 0, 0
    stack: list[tuple[Message, int]] = [(msg, 0)]
    while stack:
        part, depth = stack.pop()
        count += 1
        deepest = max(deepest, depth)
        if not part.is_multipart():
            continue  # a leaf: its payload is not needed here (and decoding it can fail on a hostile charset)
        payload = part.get_payload()
        if isinstance(payload, list):
            stack.extend((p, depth + 1) for p in payload if isinstance(p, Message))
    return count, deepest


def _flatten(msg: Message) -> bytes:
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=email_policy.compat32.clone(linesep="\r\n")).flatten(msg)
    return out.getvalue()


def _stable_id(*parts: bytes) -> str:
    digest = hashlib.sha256(b"\0".join(parts)).digest()
    return base64.urlsafe_b64encode(digest[:24]).decode("ascii")


@dataclass
class _Walk:
    limits: MimeLimits
    item_depth: int
    sent: str | None
    html: str | None = None
    text: str | None = None
    alt_text: str | None = None
    attachments: list[dict[str, Any]] = field(default_factory=list)
    unnamed: int = 0

    @property
    def has_body(self) -> bool:
        return self.html is not None or self.text is not None


def _content_type(part: Message) -> str:
    try:
        return part.get_content_type()
    except (ValueError, TypeError, IndexError):
        return "application/octet-stream"


def _disposition(part: Message) -> str | None:
    try:
        return part.get_content_disposition()
    except (ValueError, TypeError, IndexError, HeaderParseError):
        return None


def _filename(part: Message) -> str:
    try:
        name = part.get_filename()
    except (ValueError, TypeError, LookupError, IndexError, HeaderParseError):
        name = None
    if not name:
        return ""
    return decode_header_value(name).replace("/", "_").replace("\\", "_").strip()


def _content_id(part: Message) -> str | None:
    value = part.get("Content-ID")
    if value is None:
        return None
    cid = decode_header_value(value).strip().strip("<>").strip()
    return cid or None


def _payload_bytes(part: Message) -> bytes:
    try:
        data = part.get_payload(decode=True)
    except (ValueError, TypeError, LookupError, binascii.Error, MessageError):
        data = None
    if isinstance(data, bytes):
        return data
    payload = part.get_payload()
    if isinstance(payload, str):
        return payload.encode("ascii", "surrogateescape")
    return b""


def _part_text(part: Message) -> str:
    try:
        charset = part.get_content_charset()
    except (ValueError, TypeError, LookupError, UnicodeError):
        charset = None
    return _decode_bytes(_payload_bytes(part), charset)


def _ext_for(ctype: str) -> str:
    return {"text/plain": ".txt", "text/html": ".htm", "message/rfc822": ".eml", "text/calendar": ".ics"}.get(
        ctype, ".bin" if not ctype.startswith("image/") else "." + ctype.split("/", 1)[1].split("+")[0])


def _walk(part: Message, path: str, st: _Walk, *, body_allowed: bool, in_related: bool) -> None:
    ctype = _content_type(part)
    payload = part.get_payload()
    if ctype in ("message/rfc822", "message/global") and isinstance(payload, list) and payload:
        _attach_message(part, payload[0], path, st)
        return
    if isinstance(payload, list) and ctype.startswith("message/"):
        # message/delivery-status, external-body, partial...: the stdlib parsed them into header blocks; Exchange
        # shows them as attachments, so keep their bytes as one file.
        try:
            data = b"".join(_flatten(p) for p in payload if isinstance(p, Message))
        except (RecursionError, ValueError, LookupError, UnicodeError, MessageError):
            data = b""
        _attach_file(part, ctype, _filename(part), _disposition(part), path, st, in_related=in_related, data=data)
        return
    if isinstance(payload, list):
        _walk_multipart(part, payload, ctype, path, st, body_allowed=body_allowed, in_related=in_related)
        return
    maintype = ctype.split("/", 1)[0]
    if maintype == "multipart":
        ctype = "text/plain"  # multipart without a usable boundary: the stdlib kept it as one text blob
    disposition = _disposition(part)
    filename = _filename(part)
    if (body_allowed and not st.has_body and ctype in ("text/plain", "text/html")
            and disposition != "attachment" and not filename):
        if ctype == "text/html":
            st.html = _part_text(part)
        else:
            st.text = _part_text(part)
        return
    _attach_file(part, ctype, filename, disposition, path, st, in_related=in_related)


def _walk_multipart(part: Message, children: list[Any], ctype: str, path: str, st: _Walk, *,
                    body_allowed: bool, in_related: bool) -> None:
    subs = [c for c in children if isinstance(c, Message)]
    subtype = ctype.split("/", 1)[1] if "/" in ctype else "mixed"
    if subtype == "alternative" and subs:
        chosen_index = _choose_alternative(subs)
        for i, child in enumerate(subs):
            if _content_type(child) == "text/plain" and st.alt_text is None and i != chosen_index:
                st.alt_text = _part_text(child)
        _walk(subs[chosen_index], f"{path}.{chosen_index + 1}", st, body_allowed=body_allowed, in_related=in_related)
        return
    if subtype == "related" and subs:
        root_index = 0
        start = part.get_param("start")
        if isinstance(start, str):
            wanted = start.strip().strip("<>")
            root_index = next((i for i, c in enumerate(subs) if _content_id(c) == wanted), 0)
        _walk(subs[root_index], f"{path}.{root_index + 1}", st, body_allowed=body_allowed, in_related=in_related)
        for i, child in enumerate(subs):
            if i != root_index:
                _walk(child, f"{path}.{i + 1}", st, body_allowed=False, in_related=True)
        return
    # mixed, signed, report, digest and unknown subtypes: the first body-like leaf is the body, the rest attach.
    for i, child in enumerate(subs):
        _walk(child, f"{path}.{i + 1}", st, body_allowed=body_allowed, in_related=in_related)


def _choose_alternative(subs: list[Message]) -> int:
    """RFC 2046 §5.1.4: the last alternative is the richest; prefer HTML (possibly inside related), then text."""
    best_text = None
    for i in range(len(subs) - 1, -1, -1):
        ctype = _content_type(subs[i])
        if ctype == "text/html":
            return i
        if ctype == "multipart/related" and isinstance(subs[i].get_payload(), list):
            return i
        if ctype == "text/plain" and best_text is None:
            best_text = i
    return best_text if best_text is not None else len(subs) - 1


def _modified(part: Message, st: _Walk) -> str | None:
    value = part.get_param("modification-date", header="content-disposition")
    parsed = _parse_date(value) if isinstance(value, str) else None
    return _graph_datetime(parsed) if parsed else st.sent


def _attach_file(part: Message, ctype: str, filename: str, disposition: str | None, path: str, st: _Walk, *,
                 in_related: bool, data: bytes | None = None) -> None:
    if data is None:
        data = _payload_bytes(part)
    cid = _content_id(part)
    # Inline = referenced from the body by Content-ID: a part of multipart/related, or one marked inline.
    is_inline = cid is not None and disposition != "attachment" and (in_related or disposition == "inline")
    if not filename:
        st.unnamed += 1
        filename = f"ATT{st.unnamed:05d}{_ext_for(ctype)}"
    st.attachments.append({
        "@odata.type": FILE_ATTACHMENT,
        "id": _stable_id(path.encode(), filename.encode("utf-8", "replace"), hashlib.sha256(data).digest()),
        "name": filename,
        "contentType": ctype,
        "size": len(data),
        "isInline": is_inline,
        "contentId": cid,
        "contentBytes": base64.b64encode(data).decode("ascii"),
        "lastModifiedDateTime": _modified(part, st),
    })


def _attach_message(part: Message, inner: Message, path: str, st: _Walk) -> None:
    try:
        data = _flatten(inner)
    except (RecursionError, ValueError, LookupError, UnicodeError, MessageError):
        log.info("attached message at %s could not be serialised; kept without content", path)
        data = b""
    if st.item_depth + 1 > st.limits.max_item_depth:
        # Too deep to expand: keep the attached message as an .eml file (what Outlook shows for it anyway).
        subject = decode_header_value(inner.get("Subject", "")) or "attached message"
        name = _filename(part) or f"{subject[:200]}.eml"
        _attach_file(part, "message/rfc822", name, "attachment", path, st, in_related=False, data=data)
        return
    item = _convert(inner, data, st.item_depth + 1, st.limits)
    item = {"@odata.type": GRAPH_MESSAGE, "id": "", **item}
    st.attachments.append({
        "@odata.type": ITEM_ATTACHMENT,
        "id": _stable_id(path.encode(), b"item", hashlib.sha256(data).digest()),
        "name": item["subject"] or _filename(part) or "Untitled",
        "contentType": "message/rfc822",
        "size": len(data),
        "isInline": False,
        "lastModifiedDateTime": _modified(part, st),
        "item": item,
    })


def _convert(msg: Message, raw: bytes, item_depth: int, limits: MimeLimits) -> dict[str, Any]:
    header_pairs = [(str(name), decode_header_value(value)) for name, value in msg.raw_items()]
    first: dict[str, str] = {}
    for name, value in header_pairs:
        first.setdefault(name.lower(), value)

    def raw_values(name: str) -> list[str]:
        return [str(v) for k, v in msg.raw_items() if k.lower() == name]

    sent = _graph_datetime(_parse_date(first.get("date")))
    st = _Walk(limits=limits, item_depth=item_depth, sent=sent)
    _walk(msg, "1", st, body_allowed=True, in_related=False)

    if st.html is not None:
        body = {"contentType": "html", "content": st.html}
        preview_source = st.alt_text if st.alt_text is not None else html_to_text(st.html[:1_000_000])
    else:
        body = {"contentType": "text", "content": st.text or ""}
        preview_source = st.text or ""

    from_list = _recipients(raw_values("from"))
    sender_list = _recipients(raw_values("sender"))
    message_id = _first_msgid(first.get("message-id"))
    if message_id is None:
        # Derived from the bytes, not random: a message delivered to several local recipients (one SMTP
        # transaction, or the same bytes re-parsed) gets one id, as Exchange assigns it once at the first hop.
        message_id = f"<{hashlib.sha256(raw).hexdigest()[:32]}@{EMULATOR_DOMAIN}>"
    thread_index = first.get("thread-index")
    return {
        "internetMessageId": message_id,
        "subject": first.get("subject", ""),
        "from": from_list[0] if from_list else None,
        "sender": (sender_list or from_list or [None])[0],
        "toRecipients": _recipients(raw_values("to")),
        "ccRecipients": _recipients(raw_values("cc")),
        "bccRecipients": _recipients(raw_values("bcc")),
        "replyTo": _recipients(raw_values("reply-to")),
        "sentDateTime": sent,
        "internetMessageHeaders": [{"name": n, "value": v} for n, v in header_pairs],
        "body": body,
        "bodyPreview": _preview(preview_source),
        "importance": _importance(first),
        "inReplyTo": _first_msgid(first.get("in-reply-to")),
        "references": _references(first.get("references"), limits.max_references),
        "conversationIndex": _normalise_thread_index(thread_index),
        "hasAttachments": any(not a["isInline"] for a in st.attachments),
        "attachments": st.attachments,
    }


def _normalise_thread_index(value: str | None) -> str | None:
    if not value:
        return None
    try:
        data = base64.b64decode(re.sub(r"\s", "", value), validate=True)
    except (binascii.Error, ValueError):
        return None
    return base64.b64encode(data).decode("ascii") if len(data) >= 22 else None


def parse_message(raw: bytes, *, limits: MimeLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """RFC 5322 bytes -> Graph-message-shaped dict (see the module docstring and docs/graph-mime-smtp.md).

    Raises only MimeRejected (empty input, not an email, over a limit); anything else malformed is decoded
    best-effort.
    """
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise MimeRejected("message must be bytes")
    raw = _check_limits(bytes(raw), limits)
    try:
        msg = BytesParser(policy=email_policy.compat32).parsebytes(raw)
    except RecursionError as exc:
        raise MimeRejected(f"MIME nesting deeper than {limits.max_mime_depth} levels") from exc
    count, depth = _structure_stats(msg)
    if count > limits.max_parts:
        raise MimeRejected(f"more than {limits.max_parts} MIME parts")
    if depth > limits.max_mime_depth:
        raise MimeRejected(f"MIME nesting deeper than {limits.max_mime_depth} levels")
    if msg.defects:
        log.debug("parsed with defects: %s", [type(d).__name__ for d in msg.defects])
    try:
        return _convert(msg, raw, 0, limits)
    except RecursionError as exc:  # defensive: depth is checked above, but the caller's stack may be deep
        raise MimeRejected("message structure too deep to process") from exc
    except (ValueError, LookupError) as exc:  # the stdlib refusing a hostile part (e.g. a NUL in a charset name)
        raise MimeRejected(f"undecodable MIME part: {type(exc).__name__}") from exc


# --------------------------------------------------------------------------------------------------------------
# building

# Headers build_mime writes from the message structure; copies in internetMessageHeaders are ignored.
_MANAGED = frozenset({
    "from", "sender", "to", "cc", "bcc", "reply-to", "subject", "date", "message-id", "mime-version",
    "content-type", "content-transfer-encoding", "content-disposition", "content-id", "content-length",
    "in-reply-to", "references", "thread-index", "importance",
})
# Structural headers that extra_headers may not override.
_FORBIDDEN_EXTRA = frozenset({
    "message-id", "date", "mime-version", "content-type", "content-transfer-encoding", "content-disposition",
    "content-id", "content-length",
})
_HEADER_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]+$")


def _clean(value: Any) -> str:
    # CR/LF in a value from the API would inject headers; the policy refuses them, we neutralise them.
    return re.sub(r"[\r\n]+", " ", str(value))


def _address_of(recipient: Any) -> tuple[str, str] | None:
    if not isinstance(recipient, Mapping):
        return None
    email_address = recipient.get("emailAddress")
    if not isinstance(email_address, Mapping):
        return None
    name = _clean(email_address.get("name") or "").strip()
    address = _clean(email_address.get("address") or "").strip()
    if not address:
        return None
    return name, address


def _to_address(name: str, address: str) -> Address | None:
    try:
        return Address(display_name=name, addr_spec=address)
    except (ValueError, HeaderParseError, IndexError):
        pass
    local, at, domain = address.rpartition("@")
    if at and local and domain:
        try:
            return Address(display_name=name, username=local, domain=domain)
        except (ValueError, HeaderParseError, IndexError):
            pass
    log.warning("skipping an unusable address in an outgoing message")
    return None


def _addresses(recipients: Any) -> list[Address]:
    result: list[Address] = []
    items = [recipients] if isinstance(recipients, Mapping) else (recipients or [])
    for recipient in items:
        pair = _address_of(recipient)
        if pair is not None and (address := _to_address(*pair)) is not None:
            result.append(address)
    return result


_ATEXT_PHRASE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]*$")


def _address_list(addresses: Sequence[Address], *, utf8: bool) -> str:
    """An address header value, encoded and folded here (one address per line).

    Not left to policy.default: its folder (CPython 3.11) can put the separating comma inside an encoded word when
    a non-ASCII display name needs folding, which merges two recipients into one. The value is stored with
    `set_raw` and generated with refold_source="none", so nothing refolds it.
    """
    rendered: list[str] = []
    for address in addresses:
        name, spec = address.display_name, address.addr_spec
        if not name:
            rendered.append(spec)
        elif name.isascii() or utf8:
            if _ATEXT_PHRASE.match(name) and "=?" not in name and name.strip() == name:
                rendered.append(f"{name} <{spec}>")
            else:
                quoted = name.replace("\\", "\\\\").replace('"', '\\"')
                rendered.append(f'"{quoted}" <{spec}>')
        else:
            encoded = Header(name, "utf-8", maxlinelen=76).encode(linesep="\r\n")
            rendered.append(f"{encoded} <{spec}>")
    return ",\r\n ".join(rendered)


def _text_part(content: str, subtype: str) -> MIMEPart:
    part = MIMEPart(policy=email_policy.SMTP)
    # Bytes + base64 keep the text exact (set_content(str) rewrites line endings and appends a newline).
    part.set_content(content.encode("utf-8", "replace"), "text", subtype, cte="base64")
    part.set_param("charset", "utf-8")
    return part


def _container(subtype: str, parts: Sequence[MIMEPart]) -> MIMEPart:
    container = MIMEPart(policy=email_policy.SMTP)
    container["Content-Type"] = f"multipart/{subtype}"
    for part in parts:
        container.attach(part)
    return container


def _decode_content_bytes(value: Any) -> bytes:
    if not value:
        return b""
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("attachment contentBytes is not valid base64") from exc


def _file_part(att: Mapping[str, Any]) -> MIMEPart:
    data = _decode_content_bytes(att.get("contentBytes"))
    ctype = str(att.get("contentType") or "application/octet-stream").split(";", 1)[0].strip().lower()
    if not re.fullmatch(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+", ctype) or ctype.startswith("multipart/"):
        ctype = "application/octet-stream"
    name = _clean(att.get("name") or "").strip() or None
    disposition = "inline" if att.get("isInline") else "attachment"
    cid = _clean(att.get("contentId") or "").strip().strip("<>")
    if att.get("isInline") and not cid:
        # An inline part is only findable by Content-ID; invent a stable one rather than lose the inline flag.
        cid = f"{hashlib.sha256(data).hexdigest()[:16]}@{EMULATOR_DOMAIN}"
    part = MIMEPart(policy=email_policy.SMTP)
    if ctype in ("message/rfc822", "message/global"):
        # RFC 2046 forbids base64 for message/*: carry the attached message verbatim (no re-parse, no recursion).
        part["Content-Type"] = ctype
        part["Content-Transfer-Encoding"] = "7bit" if data.isascii() else "8bit"
        part.set_payload(data.decode("ascii", "surrogateescape"))
        part.add_header("Content-Disposition", disposition, **({"filename": name} if name else {}))
        if cid:
            part["Content-ID"] = f"<{cid}>"
        return part
    maintype, subtype = ctype.split("/", 1)
    part.set_content(data, maintype, subtype, disposition=disposition, filename=name,
                     cid=f"<{cid}>" if cid else None)
    return part


def _item_part(att: Mapping[str, Any], date: datetime, depth: int) -> MIMEPart:
    item = att.get("item")
    if not isinstance(item, Mapping):
        raise ValueError("itemAttachment without an item")
    item_date = date
    if isinstance(item.get("sentDateTime"), str):
        try:
            item_date = datetime.fromisoformat(item["sentDateTime"].replace("Z", "+00:00"))
        except ValueError:
            item_date = date
    inner = _build(item, message_id=str(item.get("internetMessageId") or make_message_id(EMULATOR_DOMAIN)),
                   date=item_date, extra_headers=(), depth=depth + 1)
    part = MIMEPart(policy=email_policy.SMTP)
    part.set_content(inner, disposition="attachment")
    name = _clean(att.get("name") or item.get("subject") or "").strip()
    if name:
        part.set_param("filename", name if name.lower().endswith(".eml") else f"{name}.eml",
                       header="Content-Disposition")
    return part


def _build(message: Mapping[str, Any], *, message_id: str, date: datetime, extra_headers: Sequence[tuple[str, str]],
           depth: int) -> EmailMessage:
    if depth > DEFAULT_LIMITS.max_item_depth:
        raise ValueError(f"item attachments nested deeper than {DEFAULT_LIMITS.max_item_depth} levels")
    addresses = [
        a for key in ("from", "sender", "toRecipients", "ccRecipients", "replyTo")
        for a in _addresses(message.get(key))
    ]
    needs_utf8 = any(not a.addr_spec.isascii() for a in addresses)
    pol = email_policy.SMTPUTF8 if needs_utf8 else email_policy.SMTP
    msg = EmailMessage(policy=pol)

    extra_names: set[str] = set()
    for name, value in extra_headers:
        if not _HEADER_NAME.match(name) or name.lower() in _FORBIDDEN_EXTRA:
            raise ValueError(f"extra header {name!r} is not allowed")
        msg[name] = _clean(value)
        extra_names.add(name.lower())

    def put(name: str, value: Any) -> None:
        if name.lower() not in extra_names:
            msg[name] = value

    def put_text(name: str, value: str) -> None:
        """An unstructured header (Subject). Text that looks like an encoded word, or is not ASCII, is encoded
        here as base64 encoded words of the literal text: Exchange shows a subject literally, and CPython 3.11.7's
        folder would decode a CRLF out of a literal '=?..?=' and write it raw (CVE-2024-6923)."""
        if name.lower() in extra_names:
            return
        if "=?" in value or not value.isascii():
            msg.set_raw(name, Header(value, "utf-8", header_name=name).encode(linesep="\r\n"))
        else:
            msg[name] = value

    def put_addresses(name: str, values: list[Address]) -> None:
        if name.lower() not in extra_names:
            msg.set_raw(name, _address_list(values, utf8=needs_utf8))

    from_ = _addresses(message.get("from"))
    sender = _addresses(message.get("sender"))
    if from_:
        put_addresses("From", from_[:1])
    if sender and (not from_ or sender[0].addr_spec.lower() != from_[0].addr_spec.lower()):
        put_addresses("Sender", sender[:1])
    for key, header in (("toRecipients", "To"), ("ccRecipients", "Cc"), ("replyTo", "Reply-To")):
        values = _addresses(message.get(key))
        if values:
            put_addresses(header, values)
    subject = _clean(message.get("subject") or "")
    put_text("Subject", subject)
    if date.tzinfo is None:
        date = date.replace(tzinfo=UTC)
    msg["Date"] = format_datetime(date)
    msg["Message-ID"] = _clean(message_id)
    if message.get("inReplyTo"):
        put("In-Reply-To", _clean(message["inReplyTo"]))
    references = [_clean(r) for r in (message.get("references") or []) if r]
    if references:
        put("References", " ".join(references))
    if message.get("conversationIndex"):
        put("Thread-Index", _clean(message["conversationIndex"]))
    importance = str(message.get("importance") or "normal").lower()
    if importance in ("low", "high"):
        put("Importance", importance)
    for header in message.get("internetMessageHeaders") or []:
        if not isinstance(header, Mapping):
            continue
        name, value = str(header.get("name") or ""), header.get("value")
        if name.lower() in _MANAGED or name.lower() in extra_names:
            continue
        if not _HEADER_NAME.match(name):
            raise ValueError(f"invalid header name {name!r}")
        msg[name] = _clean(value if value is not None else "")

    root = _body_tree(message, date, depth)
    msg["MIME-Version"] = "1.0"
    for name, value in root.items():
        msg[name] = value
    msg.set_payload(root.get_payload())
    return msg


def _body_tree(message: Mapping[str, Any], date: datetime, depth: int) -> MIMEPart:
    body = message.get("body") if isinstance(message.get("body"), Mapping) else {}
    content = str(body.get("content") or "")
    is_html = str(body.get("contentType") or "text").lower() == "html"
    inline: list[MIMEPart] = []
    regular: list[MIMEPart] = []
    for att in message.get("attachments") or []:
        if not isinstance(att, Mapping):
            continue
        kind = str(att.get("@odata.type") or FILE_ATTACHMENT).lower()
        if kind == ITEM_ATTACHMENT.lower():
            regular.append(_item_part(att, date, depth))
        elif kind == FILE_ATTACHMENT.lower():
            (inline if att.get("isInline") else regular).append(_file_part(att))
        else:
            raise ValueError(f"unsupported attachment type {att.get('@odata.type')!r}")
    if is_html:
        root = _container("alternative", [_text_part(html_to_text(content), "plain"), _text_part(content, "html")])
        if inline:
            root = _container("related", [root, *inline])  # Outlook's layout: related(alternative(text, html), cids)
    else:
        root = _text_part(content, "plain")
        regular = inline + regular  # a text body cannot reference cids; keep them as inline parts of the mix
    if regular:
        root = _container("mixed", [root, *regular])
    return root


def build_mime(message: Mapping[str, Any], *, message_id: str, date: datetime,
               extra_headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """Graph-shaped message dict -> RFC 5322 bytes (CRLF line endings). Bcc is never written as a header.

    Raises ValueError for input the Graph API would refuse with 400 (bad contentBytes, invalid header names,
    structural extra_headers, item nesting deeper than MimeLimits.max_item_depth).
    """
    msg = _build(message, message_id=message_id, date=date, extra_headers=extra_headers, depth=0)
    out = BytesIO()
    # refold_source="none": address headers are pre-folded (see _address_list); other headers are header
    # objects, which the policy folds as usual.
    BytesGenerator(out, mangle_from_=False, policy=msg.policy.clone(refold_source="none")).flatten(msg)
    return out.getvalue()


# --------------------------------------------------------------------------------------------------------------
# Message-ID and Exchange Thread-Index


def make_message_id(domain: str) -> str:
    """A new RFC 5322 msg-id with angle brackets, e.g. `<3F2504E04F8911D39A0C0305E82C3301@contoso.com>`."""
    return f"<{uuid.uuid4().hex.upper()}@{domain.strip().strip('<>@') or EMULATOR_DOMAIN}>"


# Thread-Index / PidTagConversationIndex, as specified in [MS-OXOMSG] §2.2.1.3 "PidTagConversationIndex Property":
#   header block, 22 bytes: 1 reserved byte (0x01), 5 bytes = the high-order 40 bits of the current FILETIME
#     (100 ns ticks since 1601-01-01 UTC, i.e. FILETIME >> 24), big-endian, then a 16-byte GUID that identifies
#     the conversation;
#   one 5-byte child block per reply (a 40-bit big-endian word): bit 39 DeltaCode, bits 38..8 TimeDelta, bits 7..4
#     a random number, bits 3..0 a sequence count. TimeDelta is the reply time minus the header time: when that
#     difference fits in 49 bits (about 1.7 years of ticks), DeltaCode is 0 and TimeDelta holds bits 48..18 of it;
#     otherwise DeltaCode is 1 and TimeDelta holds bits 53..23.
# Header: base64 of the bytes (RFC 2045 alphabet), the form Outlook/Exchange put in the Thread-Index header.
_FILETIME_EPOCH = datetime(1601, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class ThreadIndex:
    """A decoded Thread-Index: conversation start time (40-bit resolution), GUID, and reply times."""

    timestamp: datetime
    guid: uuid.UUID
    child_times: tuple[datetime, ...]


def _filetime(now: datetime) -> int:
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    delta = now.astimezone(UTC) - _FILETIME_EPOCH
    return (delta.days * 86_400 + delta.seconds) * 10_000_000 + delta.microseconds * 10


def _from_filetime(ticks: int) -> datetime:
    return _FILETIME_EPOCH + timedelta(microseconds=ticks // 10)


def _decode_index(value: str) -> bytes | None:
    try:
        data = base64.b64decode(re.sub(r"\s", "", value), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(data) < 22 or (len(data) - 22) % 5:
        return None
    return data


def parse_thread_index(value: str) -> ThreadIndex:
    """Decode a Thread-Index header value; ValueError if it is not one."""
    data = _decode_index(value)
    if data is None:
        raise ValueError("not a Thread-Index value")
    header_ticks = int.from_bytes(data[1:6], "big") << 24
    children: list[datetime] = []
    for offset in range(22, len(data), 5):
        word = int.from_bytes(data[offset:offset + 5], "big")
        delta_code, time_delta = word >> 39, (word >> 8) & 0x7FFF_FFFF
        delta = time_delta << (23 if delta_code else 18)
        children.append(_from_filetime(header_ticks + delta))
    return ThreadIndex(_from_filetime(header_ticks), uuid.UUID(bytes=bytes(data[6:22])), tuple(children))


def make_thread_index(parent: str | None, now: datetime) -> str:
    """A Thread-Index for a new conversation (parent None or unreadable) or for a reply to `parent`."""
    ticks = _filetime(now)
    parent_bytes = _decode_index(parent) if parent else None
    if parent_bytes is None:
        header = bytes([1]) + ((ticks >> 24) & 0xFF_FFFF_FFFF).to_bytes(5, "big") + uuid.uuid4().bytes
        return base64.b64encode(header).decode("ascii")
    header_ticks = int.from_bytes(parent_bytes[1:6], "big") << 24
    delta = max(0, ticks - header_ticks)
    if delta < (1 << 49):
        word = (delta >> 18) & 0x7FFF_FFFF
    else:
        word = (1 << 31) | ((delta >> 23) & 0x7FFF_FFFF)
    child = ((word << 8) | secrets.randbits(8)).to_bytes(5, "big")
    return base64.b64encode(parent_bytes + child).decode("ascii")


def iter_attachments(message: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every attachment of a parsed message, including those of attached messages (depth-first)."""
    stack = list(reversed(message.get("attachments") or []))
    while stack:
        att = stack.pop()
        yield att
        item = att.get("item")
        if isinstance(item, Mapping):
            stack.extend(reversed(item.get("attachments") or []))
