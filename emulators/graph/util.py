"""Small shared pieces: Graph errors, opaque ids, timestamps, JSON responses."""

from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = [
    "GraphError",
    "GraphResponse",
    "change_key",
    "error_body",
    "format_dt",
    "format_dt7",
    "json_response",
    "new_id",
    "now_utc",
    "parse_dt",
]


class GraphError(Exception):
    """An error Graph would answer with ``{"error": {"code", "message", "innerError"}}``."""

    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


@dataclass
class GraphResponse:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    media_type: str | None = None

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> GraphResponse:
    # separators without spaces: smaller bodies, and json.dumps is measurably faster this way
    return GraphResponse(status, json.dumps(data, separators=(",", ":")).encode(), dict(headers or {}),
                         "application/json; odata.metadata=minimal; odata.streaming=true; IEEE754Compatible=false;"
                         " charset=utf-8")


def error_body(code: str, message: str, request_id: str, client_request_id: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "innerError": {
        "date": format_dt(now_utc()), "request-id": request_id, "client-request-id": client_request_id}}}


# Exchange REST ids are url-safe base64 with padding ("AAMkAD...AAA="): the padding and the '-'/'_'
# characters make clients percent-encode ids in paths, which is exactly what we want exercised.
_ID_PREFIXES = {"message": b"\x00\x00\x1b\x00", "immutable": b"\x00\x00\x1a\x00", "folder": b"\x00\x01\x2e\x00",
                "attachment": b"\x00\x00\x1b\x01", "rule": b"\x00\x00\x00\x0a"}


def new_id(kind: str = "message", size: int = 40) -> str:
    return base64.urlsafe_b64encode(_ID_PREFIXES.get(kind, b"\x00\x00") + os.urandom(size)).decode()


def change_key() -> str:
    return "CQAAABYAAAA" + base64.b64encode(os.urandom(21)).decode()


def now_utc() -> datetime:
    return datetime.now(UTC)


def format_dt(value: datetime) -> str:
    """Message timestamps: whole seconds with ``Z`` (what Graph returns for receivedDateTime etc.)."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_dt7(value: datetime) -> str:
    """Subscription timestamps: 7 fractional digits with ``Z`` (Graph's subscription payloads)."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"


_FRACTION = re.compile(r"\.(\d+)")


def parse_dt(value: str) -> datetime:
    """ISO 8601 as Graph accepts it: ``Z`` or offsets, 0-7+ fractional digits, date-only."""
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    text = _FRACTION.sub(lambda m: "." + m.group(1)[:6].ljust(6, "0"), text, count=1)
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def plus(value: datetime, seconds: float) -> datetime:
    return value + timedelta(seconds=seconds)
