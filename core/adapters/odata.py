"""Pure OData v4 helpers for the Dataverse Web API: literals, filters, query strings, ``$batch`` multipart.

Nothing here does I/O; everything is tested against the documented examples in
``reference/dataverse.md`` (§4 query syntax, §5 ``$batch``).

Query strings: parameter values are percent-encoded by us (spaces as ``%20``, never ``+``), because the
reference asks for ``+ & / ? @ = $ , : ;`` inside values to be encoded, and form-style encoders turn a space
into ``+`` which OData reads as a literal plus.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from core.domain.model import Base64Content

__all__ = [
    "BatchDecodeError",
    "BatchRequest",
    "BatchResponse",
    "ChangeSet",
    "and_",
    "build_query",
    "decode_batch_response",
    "encode_batch",
    "encode_batch_segments",
    "entity_path",
    "eq",
    "format_guid",
    "in_",
    "literal",
    "or_",
    "parse_entity_id",
]

# ---------------------------------------------------------------------------------------------------------
# literals and filters
# ---------------------------------------------------------------------------------------------------------

_GUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def format_guid(value: str | uuid.UUID) -> str:
    """A GUID as Dataverse writes it (lowercase, hyphenated). Raises ValueError on anything else.

    Validating here keeps caller-supplied ids from smuggling path segments into a URL.
    """
    text = str(value)
    if not _GUID_RE.match(text):
        raise ValueError(f"not a GUID: {text!r}")
    return text.lower()


def literal(value: object) -> str:
    """An OData literal for a Python value: strings quoted (``'`` doubled), GUIDs and numbers bare."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "true" if value else "false"
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime in an OData filter: attach a timezone (UTC)")
        return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    raise TypeError(f"no OData literal for {type(value).__name__}")


def eq(column: str, value: object) -> str:
    return f"{column} eq {literal(value)}"


def in_(column: str, values: Iterable[object]) -> str:
    """``Microsoft.Dynamics.CRM.In`` (one condition instead of an or-chain; shorter URLs, same semantics).

    Values are always sent as strings (the function's PropertyValues is a collection of strings).
    """
    items = ",".join(literal(v if isinstance(v, str) else str(v)) for v in values)
    return f"Microsoft.Dynamics.CRM.In(PropertyName={literal(column)},PropertyValues=[{items}])"


def and_(*conditions: str | None) -> str:
    parts = [c for c in conditions if c]
    return " and ".join(f"({c})" if len(parts) > 1 else c for c in parts)


def or_(*conditions: str | None) -> str:
    parts = [c for c in conditions if c]
    return " or ".join(f"({c})" if len(parts) > 1 else c for c in parts)


# ---------------------------------------------------------------------------------------------------------
# query strings and paths
# ---------------------------------------------------------------------------------------------------------

# Characters left readable in query values: OData punctuation that has no meaning in a URL query.
_QUERY_SAFE = "()'*"


def _csv(value: str | Sequence[str] | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return ",".join(value)


def build_query(
    *,
    select: str | Sequence[str] | None = None,
    filter: str | None = None,
    orderby: str | Sequence[str] | None = None,
    top: int | None = None,
    expand: str | Sequence[str] | None = None,
    count: bool = False,
    extra: Mapping[str, str] | None = None,
) -> str:
    """The query string (without ``?``) for the system query options given, percent-encoded.

    ``$skip`` does not exist in Dataverse (paging is by ``@odata.nextLink``), so it is not offered.
    """
    options: list[tuple[str, str]] = []
    if (s := _csv(select)) is not None:
        options.append(("$select", s))
    if filter:
        options.append(("$filter", filter))
    if (o := _csv(orderby)) is not None:
        options.append(("$orderby", o))
    if top is not None:
        if top < 0:
            raise ValueError("$top must be >= 0")
        options.append(("$top", str(top)))
    if (e := _csv(expand)) is not None:
        options.append(("$expand", e))
    if count:
        options.append(("$count", "true"))
    for key, value in (extra or {}).items():
        options.append((key, value))
    return "&".join(f"{key}={quote(value, safe=_QUERY_SAFE)}" for key, value in options)


def entity_path(entity_set: str, record_id: str | uuid.UUID | None = None) -> str:
    """``emails`` or ``emails(<guid>)``; the id is validated as a GUID."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", entity_set):
        raise ValueError(f"not an entity set name: {entity_set!r}")
    if record_id is None:
        return entity_set
    return f"{entity_set}({format_guid(record_id)})"


_ENTITY_ID_RE = re.compile(r"\(([0-9a-fA-F-]{36})\)\s*$")


def parse_entity_id(url: str) -> str:
    """The GUID at the end of an ``OData-EntityId`` / ``Location`` URL (``.../accounts(<guid>)``)."""
    match = _ENTITY_ID_RE.search(url)
    if not match:
        raise ValueError(f"no record id in {url!r}")
    return format_guid(match.group(1))


# ---------------------------------------------------------------------------------------------------------
# $batch (multipart/mixed, reference §5)
# ---------------------------------------------------------------------------------------------------------

CRLF = "\r\n"


@dataclass(frozen=True)
class BatchRequest:
    """One operation inside a ``$batch``.

    ``url`` is relative to the API base (``emails``, ``emails(<id>)?$select=subject``), absolute, or a
    Content-ID reference (``$1``) to an earlier request of the same change set. ``content_id`` is required to
    be referenced. ``idempotent`` marks a POST that carries a client-chosen primary key, which makes a
    repeated batch safe (see core/adapters/retry.py).
    """

    method: str
    url: str
    body: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    content_id: str | None = None
    idempotent: bool = False

    @property
    def safe_to_repeat(self) -> bool:
        method = self.method.upper()
        if method in ("GET", "DELETE", "PUT"):
            return True
        if method == "PATCH":
            etag = {k.lower(): v for k, v in self.headers.items()}.get("if-match")
            return etag in (None, "*")
        return self.idempotent


@dataclass(frozen=True)
class ChangeSet:
    """Requests applied atomically: all succeed or all are rolled back. No GETs allowed (reference §5)."""

    requests: Sequence[BatchRequest]

    def __post_init__(self) -> None:
        if not self.requests:
            raise ValueError("an empty change set")
        for req in self.requests:
            if req.method.upper() == "GET":
                raise ValueError("GET is not allowed inside a change set")


@dataclass(frozen=True)
class BatchResponse:
    """One operation's response from a ``$batch``. ``in_changeset`` says which change set (0-based) it was in."""

    status: int
    headers: Mapping[str, str]  # keys lower-cased
    body: bytes
    content_id: str | None = None
    in_changeset: int | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        return json.loads(self.body) if self.body.strip() else None

    @property
    def entity_id(self) -> str | None:
        """The created record's id (from ``OData-EntityId``/``Location`` or a representation body)."""
        for name in ("odata-entityid", "location"):
            if value := self.headers.get(name):
                try:
                    return parse_entity_id(value)
                except ValueError:
                    continue
        return None


class BatchDecodeError(ValueError):
    """The ``$batch`` response could not be parsed as multipart/mixed."""


def _request_target(url: str, api_path: str) -> str:
    if url.startswith("$") or url.startswith("https://") or url.startswith("http://"):
        return url
    return f"{api_path.rstrip('/')}/{url.lstrip('/')}"


Segment = str | Base64Content


def _encode_operation(req: BatchRequest, api_path: str, common_headers: Mapping[str, str]) -> list[Segment]:
    """One operation's text; a :class:`~core.domain.model.Base64Content` value in the body stays a separate segment
    (between the JSON text around it) so the request can stream it."""
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if req.content_id is not None:
        lines.append(f"Content-ID: {req.content_id}")
    lines.append("")
    lines.append(f"{req.method.upper()} {_request_target(req.url, api_path)} HTTP/1.1")
    headers = {**common_headers, **req.headers}
    if req.body is not None:
        # "type=entry" is what the documented examples send for an entity body.
        headers.setdefault("Content-Type", "application/json; type=entry")
    for name, value in headers.items():
        lines.append(f"{name}: {value}")
    lines.append("")
    head = CRLF.join(lines) + CRLF
    if req.body is None:
        return [head]
    found: list[Base64Content] = []
    marker = f"b64-{uuid.uuid4().hex}-"

    def stand_in(value: object) -> str:
        if isinstance(value, Base64Content):
            found.append(value)
            return f"{marker}{len(found) - 1}"
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")

    text = json.dumps(req.body, separators=(",", ":"), ensure_ascii=False, default=stand_in)
    segments: list[Segment] = [head]
    for n, content in enumerate(found):
        before, _, text = text.partition(f"{marker}{n}")
        segments += [before, content]  # the JSON quotes around the stand-in frame the base64 text
    segments.append(text)
    return segments


def encode_batch_segments(
    items: Sequence[BatchRequest | ChangeSet],
    *,
    api_path: str,
    boundary: str | None = None,
    common_headers: Mapping[str, str] | None = None,
) -> tuple[str, list[bytes | Base64Content]]:
    """A ``$batch`` body as segments: UTF-8 bytes, and attachment contents to be base64-encoded as they are sent
    (``DataverseClient.execute_batch`` streams them; :func:`encode_batch` joins everything)."""
    if not items:
        raise ValueError("an empty batch")
    total = sum(len(i.requests) if isinstance(i, ChangeSet) else 1 for i in items)
    if total > 1000:
        raise ValueError(f"a batch holds at most 1000 operations, got {total}")
    common = dict(common_headers or {})
    batch_boundary = boundary or f"batch_{uuid.uuid4()}"
    out: list[Segment] = []

    def line(text: str) -> None:
        out.append(text + CRLF)

    for item in items:
        line(f"--{batch_boundary}")
        if isinstance(item, ChangeSet):
            cs_boundary = f"changeset_{uuid.uuid4()}"
            line(f'Content-Type: multipart/mixed; boundary="{cs_boundary}"')
            line("")
            for n, req in enumerate(item.requests, start=1):
                # Content-ID is required on change set members; number them if the caller did not.
                if req.content_id is None:
                    req = BatchRequest(req.method, req.url, req.body, req.headers, str(n), req.idempotent)
                line(f"--{cs_boundary}")
                out += _encode_operation(req, api_path, common)
                out.append(CRLF)
            line(f"--{cs_boundary}--")
        else:
            out += _encode_operation(item, api_path, common)
            out.append(CRLF)
    line(f"--{batch_boundary}--")
    segments: list[bytes | Base64Content] = []
    pending: list[str] = []
    for segment in out:
        if isinstance(segment, Base64Content):
            segments += ["".join(pending).encode("utf-8"), segment]
            pending = []
        else:
            pending.append(segment)
    segments.append("".join(pending).encode("utf-8"))
    return f'multipart/mixed; boundary="{batch_boundary}"', segments


def encode_batch(
    items: Sequence[BatchRequest | ChangeSet],
    *,
    api_path: str,
    boundary: str | None = None,
    common_headers: Mapping[str, str] | None = None,
) -> tuple[str, bytes]:
    """Encode a ``$batch`` body. Returns (Content-Type header value, body bytes).

    ``api_path`` is the path of the API base (``/api/data/v9.2``) used for relative request lines, as in the
    documented example ``POST /api/data/v9.2/tasks HTTP/1.1``. ``common_headers`` go on every operation.
    """
    content_type, segments = encode_batch_segments(items, api_path=api_path, boundary=boundary,
                                                   common_headers=common_headers)
    return content_type, b"".join(s if isinstance(s, bytes) else b"".join(s.chunks()) for s in segments)


_BOUNDARY_RE = re.compile(r'boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)


def _boundary_of(content_type: str) -> str:
    match = _BOUNDARY_RE.search(content_type)
    if not match:
        raise BatchDecodeError(f"no boundary in Content-Type {content_type!r}")
    return match.group(1) or match.group(2)


def _split_head(block: bytes) -> tuple[list[str], bytes]:
    """Split header lines from the rest at the first empty line (CRLF or bare LF tolerated)."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        idx = block.find(sep)
        if idx != -1:
            head, rest = block[:idx], block[idx + len(sep):]
            break
    else:
        head, rest = block, b""
    lines = [ln.rstrip("\r") for ln in head.decode("utf-8", "replace").split("\n") if ln.strip()]
    return lines, rest


def _parse_headers(lines: Iterable[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


def _parts(body: bytes, boundary: str) -> list[bytes]:
    delimiter = b"--" + boundary.encode("utf-8")
    chunks = body.split(delimiter)
    if len(chunks) < 2:
        raise BatchDecodeError(f"boundary {boundary!r} not found in the body")
    parts: list[bytes] = []
    for chunk in chunks[1:]:  # chunks[0] is the preamble
        if chunk.startswith(b"--"):
            break  # closing delimiter
        # Drop the line break that ends the delimiter line and the one that precedes the next delimiter.
        if chunk.startswith(b"\r\n"):
            chunk = chunk[2:]
        elif chunk.startswith(b"\n"):
            chunk = chunk[1:]
        if chunk.endswith(b"\r\n"):
            chunk = chunk[:-2]
        elif chunk.endswith(b"\n"):
            chunk = chunk[:-1]
        parts.append(chunk)
    return parts


def _decode_http_part(part: bytes, changeset: int | None) -> BatchResponse:
    mime_lines, payload = _split_head(part)
    mime = _parse_headers(mime_lines)
    head_lines, body = _split_head(payload)
    if not head_lines or not head_lines[0].upper().startswith("HTTP/"):
        raise BatchDecodeError(f"no HTTP status line in a batch part: {head_lines[:1]!r}")
    try:
        status = int(head_lines[0].split()[1])
    except (IndexError, ValueError):
        raise BatchDecodeError(f"bad status line {head_lines[0]!r}") from None
    headers = _parse_headers(head_lines[1:])
    content_id = mime.get("content-id") or headers.get("content-id")
    return BatchResponse(status, headers, body.strip(b"\r\n"), content_id, changeset)


def decode_batch_response(content_type: str, body: bytes) -> list[BatchResponse]:
    """Decode a ``$batch`` response (``--batchresponse_…`` parts, change sets nested), in request order."""
    responses: list[BatchResponse] = []
    changeset_index = 0
    for part in _parts(body, _boundary_of(content_type)):
        mime_lines, payload = _split_head(part)
        mime = _parse_headers(mime_lines)
        part_type = mime.get("content-type", "")
        if part_type.lower().startswith("multipart/mixed"):
            for inner in _parts(payload, _boundary_of(part_type)):
                responses.append(_decode_http_part(inner, changeset_index))
            changeset_index += 1
        else:
            responses.append(_decode_http_part(part, None))
    return responses
