"""OData ``$batch`` (multipart/mixed) as Dataverse implements it (``reference/dataverse.md`` §5).

- Parts are ``application/http`` requests; a nested ``multipart/mixed`` part is a change set, run in one SQLite
  transaction (savepoint) and rolled back as a whole when any of its requests fails.
- ``Content-ID`` values are referenced as ``$n`` in URLs and ``@odata.bind`` values within the same change set.
- Without ``Prefer: odata.continue-on-error`` processing stops at the first failure and the response holds only that
  failure (top-level status = the failure's status); with it every part gets a response and the status is 200.
- A failed change set answers with the single failing response (OData 4.0 §11.7.4; Dataverse's exact shape is NOT
  VERIFIED), not with one part per request.
- At most 1000 requests (change set members counted individually); no nested batches; no GET in a change set.
"""

from __future__ import annotations

import http
import re
import uuid
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from .errors import DataverseError
from .odata import parse_prefer
from .schema import EntityDef, entity_by_set
from .service import API_PATH, ApiRequest, ApiResponse, Caller, Dataverse

__all__ = ["MAX_BATCH_REQUESTS", "handle_batch", "parse_multipart"]

MAX_BATCH_REQUESTS = 1000
_ENTITY_ID = re.compile(r"/(?P<set>[A-Za-z_]\w*)\((?P<id>[0-9a-fA-F-]{36})\)$")


@dataclass
class Part:
    headers: dict[str, str]
    body: bytes
    children: list[Part] = field(default_factory=list)  # change set members

    @property
    def is_changeset(self) -> bool:
        return self.headers.get("content-type", "").lower().startswith("multipart/mixed")


def _boundary(content_type: str) -> str | None:
    m = re.search(r'boundary\s*=\s*"?([^";]+)"?', content_type, re.I)
    return m.group(1).strip() if m else None


def _split_head(raw: bytes) -> tuple[dict[str, str], bytes]:
    """Split a MIME/HTTP header block from its body (CRLF or LF line ends)."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        idx = raw.find(sep)
        if idx >= 0:
            head, body = raw[:idx], raw[idx + len(sep):]
            break
    else:
        head, body = raw, b""
    headers: dict[str, str] = {}
    for line in head.decode("utf-8", "replace").splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return headers, body


def parse_multipart(body: bytes, boundary: str) -> list[Part]:
    delim = b"--" + boundary.encode()
    chunks = body.split(delim)
    parts: list[Part] = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break  # closing delimiter
        # The CRLF after a delimiter and the CRLF before the next one belong to the delimiters (RFC 2046).
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk[1:] if chunk.startswith(b"\n") else chunk
        chunk = chunk[:-2] if chunk.endswith(b"\r\n") else chunk[:-1] if chunk.endswith(b"\n") else chunk
        headers, content = _split_head(chunk)
        part = Part(headers, content)
        if part.is_changeset:
            inner = _boundary(headers.get("content-type", ""))
            if not inner:
                raise DataverseError.bad_request("A change set part has no boundary.")
            part.children = parse_multipart(content, inner)
            if any(c.is_changeset for c in part.children):
                raise DataverseError.bad_request("Change sets cannot be nested.")
        parts.append(part)
    return parts


def _inner_request(part: Part, outer: ApiRequest) -> ApiRequest:
    raw = part.body.lstrip(b"\r\n")
    nl = raw.find(b"\n")
    first = (raw[:nl] if nl >= 0 else raw).decode("utf-8", "replace").strip()
    bits = first.split()
    if len(bits) < 2:
        raise DataverseError.bad_request("A batch part does not contain an HTTP request line.")
    # METHOD SP URL [SP HTTP/1.1]; tolerate unencoded spaces inside the URL.
    has_version = len(bits) > 2 and bits[-1].upper().startswith("HTTP/")
    method, target = bits[0].upper(), " ".join(bits[1:-1] if has_version else bits[1:])
    rest = raw[nl + 1:] if nl >= 0 else b""
    if rest.startswith((b"\r\n", b"\n")):
        headers, body = {}, rest.lstrip(b"\r\n")  # no headers at all
    else:
        headers, body = _split_head(rest)
    url = urlsplit(target)
    path = url.path
    if API_PATH in path:
        path = path.split(API_PATH, 1)[1]
    return ApiRequest(method=method, path=unquote(path.lstrip("/")), query=url.query, headers=headers,
                      body=body.strip(b"\r\n"), base_url=outer.base_url)


def _render(resp: ApiResponse, content_id: str | None) -> str:
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if content_id is not None:
        lines.append(f"Content-ID: {content_id}")
    lines.append("")
    try:
        reason = http.HTTPStatus(resp.status).phrase
    except ValueError:
        reason = ""
    lines.append(f"HTTP/1.1 {resp.status} {reason}".rstrip())
    headers = dict(resp.headers)
    if resp.status == 204 and "OData-EntityId" in headers:
        headers.setdefault("Location", headers["OData-EntityId"])  # §5: a 204 create in a batch has both
    if resp.status == 200 and headers.get("Content-Type", "").startswith("application/json"):
        headers["Content-Type"] = "application/json; odata.metadata=minimal; odata.streaming=true"
    for k, v in headers.items():
        lines.append(f"{k}: {v}")
    lines.append("")
    lines.append(resp.body.decode("utf-8", "replace"))
    return "\r\n".join(lines)


def _entity_ref(resp: ApiResponse) -> tuple[EntityDef, str] | None:
    loc = resp.headers.get("OData-EntityId")
    if not loc:
        try:
            import json

            body = json.loads(resp.body or b"{}")
            ctx = body.get("@odata.context", "")
            set_name = ctx.split("#", 1)[1].split("(")[0].split("/")[0] if "#" in ctx else ""
            ent = entity_by_set(set_name)
            if ent is not None and body.get(ent.primary_id):
                return ent, str(body[ent.primary_id])
        except (ValueError, AttributeError, IndexError):
            return None
        return None
    m = _ENTITY_ID.search(loc)
    if not m:
        return None
    ent = entity_by_set(m.group("set"))
    return (ent, m.group("id").lower()) if ent is not None else None


class _Rollback(Exception):
    def __init__(self, response: ApiResponse, content_id: str | None) -> None:
        super().__init__("change set failed")
        self.response = response
        self.content_id = content_id


def handle_batch(dv: Dataverse, req: ApiRequest, caller: Caller) -> ApiResponse:
    boundary = _boundary(req.header("content-type") or "")
    if not (req.header("content-type") or "").lower().startswith("multipart/mixed") or not boundary:
        raise DataverseError.bad_request(
            "The $batch request must have Content-Type multipart/mixed with a boundary (JSON batch is not supported).")
    parts = parse_multipart(req.body, boundary)
    total = sum(len(p.children) if p.is_changeset else 1 for p in parts)
    if total > MAX_BATCH_REQUESTS:
        raise DataverseError.bad_request(
            f"The number of requests in the batch ({total}) exceeds the maximum of {MAX_BATCH_REQUESTS}.",
            code="0x8005f103")
    continue_on_error = parse_prefer([req.header("prefer") or ""]).continue_on_error
    out_boundary = f"batchresponse_{uuid.uuid4()}"
    rendered: list[str] = []
    failure: str | None = None
    failure_status = 200
    for part in parts:
        if part.is_changeset:
            cs_boundary = f"changesetresponse_{uuid.uuid4()}"
            refs: dict[str, tuple[EntityDef, str]] = {}
            responses: list[str] = []
            try:
                with dv.store.transaction():
                    for member in part.children:
                        cid = member.headers.get("content-id")
                        inner = _inner_request(member, req)
                        if inner.method == "GET":
                            raise _Rollback(ApiResponse.error(DataverseError.bad_request(
                                "GET requests are not allowed in a change set.")), cid)
                        if inner.path.startswith("$batch"):
                            raise _Rollback(ApiResponse.error(DataverseError.bad_request(
                                "Nested $batch requests are not supported.")), cid)
                        resp = dv.dispatch(inner, caller, refs)
                        if resp.status >= 400:
                            raise _Rollback(resp, cid)
                        if cid is not None:
                            ref = _entity_ref(resp)
                            if ref is not None:
                                refs[f"${cid}"] = ref
                        responses.append(f"--{cs_boundary}\r\n{_render(resp, cid)}")
            except _Rollback as rb:
                # One plain application/http part, no changesetresponse wrapper; real responses carry no Content-ID
                # (microsoft/powerapps-tools#574, #100) unless the emulator is told to echo it.
                text = _render(rb.response, rb.content_id if dv.options.echo_content_id_on_failure else None)
                if not continue_on_error:
                    failure, failure_status = text, rb.response.status
                    break
                rendered.append(f"--{out_boundary}\r\n{text}")
                continue
            body = "\r\n".join(responses) + f"\r\n--{cs_boundary}--"
            rendered.append(f"--{out_boundary}\r\nContent-Type: multipart/mixed; boundary={cs_boundary}\r\n\r\n{body}")
            continue
        inner = _inner_request(part, req)
        if inner.path.startswith("$batch"):
            resp = ApiResponse.error(DataverseError.bad_request("Nested $batch requests are not supported."))
        else:
            resp = dv.dispatch(inner, caller, {})
        text = _render(resp, part.headers.get("content-id"))
        if resp.status >= 400 and not continue_on_error:
            failure, failure_status = text, resp.status
            break
        rendered.append(f"--{out_boundary}\r\n{text}")
    if failure is not None:
        rendered = [f"--{out_boundary}\r\n{failure}"]
    payload = "\r\n".join(rendered) + f"\r\n--{out_boundary}--\r\n"
    return ApiResponse(failure_status if failure is not None else 200,
                       {"Content-Type": f"multipart/mixed; boundary={out_boundary}", "OData-Version": "4.0"},
                       payload.encode())
