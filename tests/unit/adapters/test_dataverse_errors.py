"""Error mapping from status + Dataverse error body (reference §6, §7), as a table of documented cases."""

from __future__ import annotations

import email.utils
import json
import time

import httpx
import pytest

from core.adapters.dataverse import (
    AttachmentTooLargeError,
    AuthError,
    BadRequestError,
    DataverseError,
    DuplicateRecordError,
    NotFoundError,
    PreconditionFailedError,
    ThrottledError,
    TransientError,
    _transport_error,
    classify_failure,
    map_error,
    parse_retry_after,
)
from core.adapters.retry import FailureKind


def body(code: str, message: str = "m") -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


@pytest.mark.parametrize(
    ("status", "payload", "headers", "create_only", "expected", "code"),
    [
        # duplicate key: status undocumented (412 likely) -> the code decides
        (412, body("0x80040237", "Cannot insert duplicate key"), {}, False, DuplicateRecordError, "0x80040237"),
        (500, body("0x80040237"), {}, False, DuplicateRecordError, "0x80040237"),
        # duplicate detection: shown as 500 or listed under 412
        (500, body("0x80040333"), {}, False, DuplicateRecordError, "0x80040333"),
        # signed decimal form of the duplicate key code (-2147220937)
        (412, body("-2147220937"), {}, False, DuplicateRecordError, "0x80040237"),
        # If-None-Match: * on an existing record
        (412, body("", "A record with matching key values already exists."), {}, True, DuplicateRecordError, ""),
        # ETag mismatch
        (412, body("", "The version of the existing record doesn't match the RowVersion property provided."), {},
         False, PreconditionFailedError, ""),
        # 404s: record, set, bind target
        (404, body("", "account With Id = 00000000-0000-0000-0000-000000000001 Does Not Exist"), {}, False,
         NotFoundError, ""),
        (404, body("0x8006088a", "Resource not found for the segment 'Account'."), {}, False, NotFoundError,
         "0x8006088a"),
        # attachments
        (400, body("0x80044a02", "Attachment file size is too big."), {}, False, AttachmentTooLargeError,
         "0x80044a02"),
        (413, b"", {}, False, AttachmentTooLargeError, ""),
        # service protection
        (429, body("0x80072322"), {"Retry-After": "12"}, False, ThrottledError, "0x80072322"),
        (429, body("0x80072321"), {"Retry-After": "1"}, False, ThrottledError, "0x80072321"),
        (429, body("0x80072326"), {}, False, ThrottledError, "0x80072326"),
        # auth
        (401, b"", {}, False, AuthError, ""),
        (403, body("0x80040220", "CannotActOnBehalfOfAnotherUser"), {}, False, AuthError, "0x80040220"),
        # client errors
        (400, body("0x0", "Could not find a property named 'Name' on type 'Microsoft.Dynamics.CRM.account'."), {},
         False, BadRequestError, "0x0"),
        (400, body("0x80048d19", "Error identified in Payload"), {}, False, BadRequestError, "0x80048d19"),
        (405, b"", {}, False, BadRequestError, ""),
        # transient
        (500, body("0x80040216", "An unexpected error occurred."), {}, False, TransientError, "0x80040216"),
        (502, b"<html>bad gateway</html>", {}, False, TransientError, ""),
        (503, b"", {"Retry-After": "3"}, False, TransientError, ""),
        (504, b"", {}, False, TransientError, ""),
        (408, b"", {}, False, TransientError, ""),
        # not implemented is permanent
        (501, b"", {}, False, DataverseError, ""),
    ],
)
def test_map_error(
    status: int, payload: bytes, headers: dict[str, str], create_only: bool, expected: type, code: str
) -> None:
    error = map_error(status, payload, headers, create_only=create_only)
    assert type(error) is expected
    assert (error.status, error.code) == (status, code)


def test_throttled_error_exposes_retry_after_and_reason() -> None:
    message = "Number of requests exceeded the limit of 6000 over time window of 300 seconds."
    error = map_error(429, body("0x80072322", message), {"retry-after": "12.5"})
    assert isinstance(error, ThrottledError)
    assert (error.retry_after, error.reason, error.retryable) == (12.5, "request_count", True)
    assert "6000" in error.message
    assert map_error(429, body("0x80072321"), {}).reason == "execution_time"  # type: ignore[attr-defined]
    assert map_error(429, body("0x80072326"), {}).reason == "concurrency"  # type: ignore[attr-defined]
    assert map_error(429, b"", {}).reason == "unknown"  # type: ignore[attr-defined]


def test_retryable_flags() -> None:
    assert map_error(401, b"").retryable  # a fresh token may fix it
    assert not map_error(403, b"").retryable
    assert not map_error(412, b"").retryable
    assert map_error(503, b"").retryable


def test_inner_error_message_is_used_when_the_message_is_empty() -> None:
    payload = json.dumps({"error": {"code": "0x1", "message": "", "innererror": {"message": "inner"}}}).encode()
    assert map_error(400, payload).message == "inner"


def test_request_id_is_kept_for_support() -> None:
    assert map_error(400, b"", {"REQ_ID": "abc"}).request_id == "abc"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("5", 5.0), ("0.5", 0.5), ("-3", 0.0), (None, None), ("", None), ("soon", None)],
)
def test_parse_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_http_date() -> None:
    future = email.utils.formatdate(time.time() + 120, usegmt=True)
    parsed = parse_retry_after(future)
    assert parsed is not None and 100 < parsed <= 121


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (ThrottledError(429, retry_after=2.0), FailureKind.THROTTLED),
        (TransientError(503), FailureKind.TRANSIENT),
        (TransientError(0, sent=False), FailureKind.NOT_SENT),
        (PreconditionFailedError(412), FailureKind.PERMANENT),
        (AuthError(401), FailureKind.PERMANENT),
        (ValueError("bug"), FailureKind.PERMANENT),
    ],
)
def test_classify_failure(error: BaseException, kind: FailureKind) -> None:
    assert classify_failure(error)[0] is kind


@pytest.mark.parametrize(
    ("exc", "sent"),
    [
        (httpx.ConnectError("refused"), False),
        (httpx.ConnectTimeout("slow"), False),
        (httpx.PoolTimeout("busy"), False),
        (httpx.ReadTimeout("slow"), True),
        (httpx.RemoteProtocolError("Server disconnected without sending a response."), True),
    ],
)
def test_transport_errors_know_whether_the_request_left(exc: httpx.TransportError, sent: bool) -> None:
    error = _transport_error(exc)
    assert isinstance(error, TransientError) and error.sent is sent and error.status == 0
