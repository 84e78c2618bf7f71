"""Dataverse Web API client (OData v4 over httpx): the router's only way into Dynamics 365.

Thin on purpose (reference/dataverse.md §10: the official SDK pulls in pandas, rewrites values, cannot send
per-request headers and does not retry 429). One ``httpx.AsyncClient`` per client instance, HTTP/1.1 keep-alive.

* Headers follow reference §1: ``Accept``, ``OData-MaxVersion``/``OData-Version`` 4.0 everywhere,
  ``If-None-Match: null`` on reads (defeats caching of expanded collections), ``Prefer`` per call,
  ``If-Match``/``If-None-Match`` for conditional writes, ``CallerObjectId``/``MSCRMCallerID`` per call
  (:class:`Impersonation`).
* Errors are typed from status + the ``{"error":{"code","message"}}`` body (:func:`map_error`).
* Retries (see core/adapters/retry.py and docs/adapters.md): 429 is retried for any request, honouring
  ``Retry-After`` up to ``RetryPolicy.max_retry_after``; transient failures only for idempotent requests.
  A POST counts as idempotent only when it carries a client-chosen primary key, so a repeated create ends in
  success or :class:`DuplicateRecordError`, which callers treat as "already done".
* TLS: ``verify=True`` (default) makes httpx read ``SSL_CERT_FILE`` at construction, which is how a corporate
  or the local emulator CA is trusted; production and local runs differ only in the base URL and credentials.
"""

from __future__ import annotations

import asyncio
import builtins
import email.utils
import http.cookiejar
import json
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final
from urllib.parse import urlsplit

import httpx

from core.adapters.dataverse_pool import ApplicationUserPool, PacingWait, ServiceProtectionBudget
from core.adapters.http_pool import cheap_readable_checks
from core.adapters.odata import (
    BatchRequest,
    BatchResponse,
    ChangeSet,
    and_,
    build_query,
    decode_batch_response,
    encode_batch_segments,
    entity_path,
    format_guid,
    in_,
    literal,
    or_,
    parse_entity_id,
)
from core.adapters.retry import FailureKind, RetryPolicy, Sleep, retry_async
from core.domain.model import Base64Content

if TYPE_CHECKING:
    from core.config import Settings

__all__ = [
    "DEFAULT_ADDRESS_TABLES",
    "PRIMARY_KEYS",
    "AddressTable",
    "AttachmentTooLargeError",
    "AuthError",
    "BadRequestError",
    "BatchRequest",
    "BatchResponse",
    "ChangeSet",
    "DataverseClient",
    "DataverseError",
    "DuplicateRecordError",
    "Impersonation",
    "NotFoundError",
    "PreconditionFailedError",
    "ThrottledError",
    "TokenProvider",
    "TransientError",
    "classify_failure",
    "map_error",
]

_log = logging.getLogger(__name__)

TokenProvider = Callable[[], Awaitable[str]]

USER_AGENT: Final = "email-router-d365/0.1 (+httpx)"
# Dataverse rejects more than 52 concurrent requests per user per web server (reference §7.2): stay below.
DEFAULT_MAX_CONNECTIONS: Final = 32
DEFAULT_TIMEOUT: Final = httpx.Timeout(connect=5.0, read=60.0, write=30.0, pool=10.0)

# Primary key column per entity set, for the tables the router writes. Used to recognise a create that
# carries a client-chosen id (safe to repeat) and to pick a cheap $select for representations.
PRIMARY_KEYS: Final[Mapping[str, str]] = {
    "emails": "activityid",
    "activitypointers": "activityid",
    "activitymimeattachments": "activitymimeattachmentid",
    "contacts": "contactid",
    "accounts": "accountid",
    "leads": "leadid",
    "systemusers": "systemuserid",
    "queues": "queueid",
    "mailboxes": "mailboxid",
    "opportunities": "opportunityid",
    "incidents": "incidentid",
    "organizations": "organizationid",
    "usersettingscollection": "systemuserid",
}

# Documented error codes (reference §3, §6, §7).
DUPLICATE_KEY_CODE: Final = "0x80040237"  # "Cannot insert duplicate key" (-2147220937)
DUPLICATE_DETECTED_CODE: Final = "0x80040333"  # duplicate detection rule matched
ATTACHMENT_TOO_LARGE_CODE: Final = "0x80044a02"  # "Attachment file size is too big." (-2147202558)
THROTTLE_REASONS: Final[Mapping[str, str]] = {
    "0x80072322": "request_count",  # 6000 requests / 300 s
    "0x80072321": "execution_time",  # 20 min combined execution / 300 s
    "0x80072326": "concurrency",  # 52 concurrent requests
}


# ---------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------


class DataverseError(Exception):
    """A Dataverse request failed. ``status`` 0 = no HTTP response (network). ``code`` is the hex error code
    (lower-case, ``0x…``) or ``""`` — the reference notes it is often empty."""

    retryable: ClassVar[bool] = False

    def __init__(
        self,
        status: int,
        code: str = "",
        message: str = "",
        *,
        retry_after: float | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"Dataverse {status or 'network'} {code or '-'}: {message}".rstrip(": "))
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.request_id = request_id
        # Set by execute_batch when the error came from one operation of a batch.
        self.batch_responses: builtins.list[BatchResponse] | None = None


class BadRequestError(DataverseError):
    """400/405/…: the request is wrong (bad column, payload, literal). Permanent."""


class AttachmentTooLargeError(BadRequestError):
    """``0x80044a02`` (or 413): an attachment exceeds ``organization.maxuploadfilesize``. Permanent."""


class AuthError(DataverseError):
    """401 (token missing/expired/wrong audience) or 403 (no privilege, ``CannotActOnBehalfOfAnotherUser``).

    A 401 is worth one later attempt with a fresh token (``retryable``); a 403 is permanent.
    """

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        return self.status == 401


class NotFoundError(DataverseError):
    """404: the record, entity set, action — or a bind target of a create — does not exist."""


class PreconditionFailedError(DataverseError):
    """412: the ``If-Match`` ETag no longer matches (someone else changed or claimed the record)."""


class DuplicateRecordError(DataverseError):
    """The record already exists (duplicate key ``0x80040237``, duplicate detection ``0x80040333``, or 412 to
    ``If-None-Match: *``). For a create with a client-chosen id this means "already done"."""


class ThrottledError(DataverseError):
    """429 service protection. ``retry_after`` seconds (from ``Retry-After``); ``reason`` is one of
    ``request_count``, ``execution_time``, ``concurrency`` or ``unknown``."""

    retryable = True

    def __init__(
        self,
        status: int = 429,
        code: str = "",
        message: str = "",
        *,
        retry_after: float | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(status, code, message, retry_after=retry_after, request_id=request_id)
        self.reason = THROTTLE_REASONS.get(code, "unknown")


class TransientError(DataverseError):
    """5xx, 408, timeouts, connection failures. ``sent`` is False when the request provably never reached the
    server (connect error, pool timeout), which makes it safe to repeat even when not idempotent."""

    retryable = True

    def __init__(
        self,
        status: int = 0,
        code: str = "",
        message: str = "",
        *,
        retry_after: float | None = None,
        request_id: str | None = None,
        sent: bool = True,
    ) -> None:
        super().__init__(status, code, message, retry_after=retry_after, request_id=request_id)
        self.sent = sent


def _normalise_code(raw: object) -> str:
    """Error codes arrive as hex (``0x80040237``) or signed decimal (``-2147220937``); return lower hex."""
    if raw is None:
        return ""
    text = str(raw).strip()
    if not text:
        return ""
    try:
        value = int(text, 16) if text.lower().startswith("0x") else int(text)
    except ValueError:
        return text  # symbolic codes such as "CannotActOnBehalfOfAnotherUser" are kept as they are
    return f"0x{value & 0xFFFFFFFF:08x}" if value else "0x0"


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds (possibly fractional) or an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_body(body: bytes) -> tuple[str, str]:
    try:
        data = json.loads(body) if body else None
    except ValueError:
        return "", body[:200].decode("utf-8", "replace")
    if not isinstance(data, dict):
        return "", ""
    err = data.get("error")
    if not isinstance(err, dict):
        return "", str(data.get("message", ""))
    message = str(err.get("message") or "")
    inner = err.get("innererror")
    if not message and isinstance(inner, dict):
        message = str(inner.get("message") or "")
    return _normalise_code(err.get("code")), message


def map_error(
    status: int,
    body: bytes,
    headers: Mapping[str, str] | None = None,
    *,
    create_only: bool = False,
) -> DataverseError:
    """The typed error for a failed response. Pure (tested as a table in tests/unit/adapters).

    The error *code* wins over the status where the reference documents one (duplicate key, attachment size,
    service protection), because the status of some of them is undocumented or varies (§6: duplicate
    detection shows as 500 or 412). ``create_only`` = the request carried ``If-None-Match: *``, so a 412
    means the record already exists.
    """
    lower = {k.lower(): v for k, v in (headers or {}).items()}
    code, message = _error_body(body)
    retry_after = parse_retry_after(lower.get("retry-after"))
    request_id = lower.get("req_id") or lower.get("x-ms-service-request-id")
    kwargs: dict[str, Any] = {"retry_after": retry_after, "request_id": request_id}

    if code in (DUPLICATE_KEY_CODE, DUPLICATE_DETECTED_CODE):
        return DuplicateRecordError(status, code, message, **kwargs)
    if code == ATTACHMENT_TOO_LARGE_CODE or status == 413:
        return AttachmentTooLargeError(status, code, message, **kwargs)
    if status == 429 or code in THROTTLE_REASONS:
        return ThrottledError(status, code, message, **kwargs)
    if status == 412:
        if create_only:
            return DuplicateRecordError(status, code, message, **kwargs)
        return PreconditionFailedError(status, code, message, **kwargs)
    if status == 404:
        return NotFoundError(status, code, message, **kwargs)
    if status in (401, 403):
        return AuthError(status, code, message, **kwargs)
    if status == 408 or (status >= 500 and status != 501):
        return TransientError(status, code, message, **kwargs)
    if 400 <= status < 500:
        return BadRequestError(status, code, message, **kwargs)
    return DataverseError(status, code, message, **kwargs)


def classify_failure(exc: BaseException) -> tuple[FailureKind, float | None]:
    """How the retry policy sees an exception raised by a request attempt."""
    if isinstance(exc, ThrottledError):
        return FailureKind.THROTTLED, exc.retry_after
    if isinstance(exc, TransientError):
        return (FailureKind.TRANSIENT if exc.sent else FailureKind.NOT_SENT), exc.retry_after
    return FailureKind.PERMANENT, None


def _transport_error(exc: httpx.TransportError) -> TransientError:
    # Connect failures and pool timeouts happen before any byte of the request is sent.
    not_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    return TransientError(0, "", f"{type(exc).__name__}: {exc}", sent=not not_sent)


# ---------------------------------------------------------------------------------------------------------
# request options
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Impersonation:
    """Run a request as another user (reference §9). Prefer the Entra object id (``CallerObjectId``); the
    legacy ``MSCRMCallerID`` takes a systemuserid. The app user needs ``prvActOnBehalfOfAnotherUser``."""

    caller_object_id: str | None = None
    systemuser_id: str | None = None

    def __post_init__(self) -> None:
        if bool(self.caller_object_id) == bool(self.systemuser_id):
            raise ValueError("give exactly one of caller_object_id or systemuser_id")

    @classmethod
    def by_object_id(cls, object_id: str | uuid.UUID) -> Impersonation:
        return cls(caller_object_id=format_guid(object_id))

    @classmethod
    def by_systemuser_id(cls, systemuser_id: str | uuid.UUID) -> Impersonation:
        return cls(systemuser_id=format_guid(systemuser_id))

    def headers(self) -> dict[str, str]:
        if self.caller_object_id:
            return {"CallerObjectId": self.caller_object_id}
        return {"MSCRMCallerID": str(self.systemuser_id)}


@dataclass(frozen=True)
class AddressTable:
    """A table searched by email address: its set, the address columns, the columns returned and an optional
    extra filter (e.g. ``statecode eq 0``)."""

    entity_set: str
    address_columns: tuple[str, ...]
    select: tuple[str, ...]
    filter: str | None = None


# SSS resolves senders in this order (reference crm-email-behaviour.md); the caller applies the order, the
# lookup only returns rows per table.
DEFAULT_ADDRESS_TABLES: Final[tuple[AddressTable, ...]] = (
    AddressTable(
        "systemusers",
        ("internalemailaddress",),
        ("systemuserid", "fullname", "internalemailaddress", "azureactivedirectoryobjectid", "isdisabled"),
    ),
    AddressTable("queues", ("emailaddress",), ("queueid", "name", "emailaddress")),
    AddressTable(
        "contacts",
        ("emailaddress1", "emailaddress2", "emailaddress3"),
        ("contactid", "fullname", "emailaddress1", "emailaddress2", "emailaddress3", "statecode"),
    ),
    AddressTable(
        "accounts",
        ("emailaddress1", "emailaddress2", "emailaddress3"),
        ("accountid", "name", "emailaddress1", "emailaddress2", "emailaddress3", "statecode"),
    ),
    AddressTable(
        "leads",
        ("emailaddress1", "emailaddress2", "emailaddress3"),
        ("leadid", "fullname", "emailaddress1", "emailaddress2", "emailaddress3", "statecode"),
    ),
)

# Addresses per inner GET: keeps each URL far below the 64 KB limit of a batch operation (reference §5).
_ADDRESSES_PER_QUERY: Final = 100


def _prefer(*items: str | None) -> str | None:
    values = [i for i in items if i]
    return ",".join(values) if values else None


def _annotations(value: str | None) -> str | None:
    return f'odata.include-annotations="{value}"' if value else None


# ---------------------------------------------------------------------------------------------------------
# the client
# ---------------------------------------------------------------------------------------------------------


class _InFlightLimit:
    """Caps this client's requests in flight at its connection pool size (each application user of the pool also
    has its own cap: ``core.adapters.dataverse_pool``)."""

    def __init__(self, ceiling: int) -> None:
        self.limit = max(1, ceiling)
        self._active = 0
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._active < self.limit)
            self._active += 1

    async def __aexit__(self, *exc_info: object) -> None:
        async with self._changed:
            self._active -= 1
            self._changed.notify_all()


def _no_cookies() -> http.cookiejar.CookieJar:
    """A jar that stores nothing: Dataverse sets ARR affinity cookies, and following them pins every request of
    this client to one web server (api-limits.md recommends disabling affinity for service-to-service load)."""
    return http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


class DataverseClient:
    """Async Dataverse Web API client. Create one per process/event loop and reuse it (connection pool).

    ``api_base`` is the Web API root, e.g. ``https://contoso.crm.dynamics.com/api/data/v9.2``. ``token`` is
    an async callable returning a bearer token for the org's ``/.default`` scope, or a sequence of them: an
    application-user pool (one per application user; requests are spread across them and each is paced to
    ``budget``, see ``core.adapters.dataverse_pool``). It is called for every attempt so refreshed tokens are
    picked up.
    """

    def __init__(
        self,
        api_base: str,
        token: TokenProvider | Sequence[TokenProvider],
        *,
        budget: ServiceProtectionBudget | None = None,
        user_names: Sequence[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        verify: ssl.SSLContext | bool = True,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        retry_policy: RetryPolicy | None = None,
        sleep: Sleep = asyncio.sleep,
        transport: httpx.AsyncBaseTransport | None = None,
        user_agent: str = USER_AGENT,
    ) -> None:
        parts = urlsplit(api_base)
        if parts.scheme not in ("https", "http") or not parts.netloc:
            raise ValueError(f"api_base must be an absolute URL, got {api_base!r}")
        self.api_base = api_base.rstrip("/")
        self._api_path = parts.path.rstrip("/")
        tokens = [token] if callable(token) else list(token)
        names = list(user_names) if user_names is not None else [f"user{n}" for n in range(len(tokens))]
        if len(names) != len(tokens):
            raise ValueError("user_names must name every token provider")
        self.retry_policy = retry_policy or RetryPolicy()
        self._sleep = sleep
        self.pool = ApplicationUserPool(list(zip(names, tokens, strict=True)), budget, clock=clock, sleep=sleep,
                                        max_wait_s=self.retry_policy.max_retry_after)
        self._in_flight = _InFlightLimit(max_connections)
        self._http = httpx.AsyncClient(
            cookies=_no_cookies(),
            verify=verify,
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
            headers={
                "Accept": "application/json",
                "OData-MaxVersion": "4.0",
                "OData-Version": "4.0",
                "User-Agent": user_agent,
            },
            follow_redirects=False,
        )
        cheap_readable_checks(self._http)  # CPU: core/adapters/http_pool.py

    async def close(self) -> None:
        await self._http.aclose()

    @property
    def in_flight_limit(self) -> int:
        """Requests this client lets run at once: the connection pool size, or the application users' own caps
        (each lowered by the org's ``x-ms-dop-hint``) when those are lower."""
        return min(self._in_flight.limit, sum(u.pacer.limit for u in self.pool.users))

    async def __aenter__(self) -> DataverseClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- plumbing --------------------------------------------------------------------------------------

    def _url(self, path: str, query: str = "") -> str:
        url = path if path.startswith(("https://", "http://")) else f"{self.api_base}/{path}"
        return f"{url}?{query}" if query else url

    async def _request(
        self,
        method: str,
        path: str,
        *,
        query: str = "",
        body: Mapping[str, Any] | None = None,
        content: bytes | Callable[[], AsyncIterator[bytes]] | None = None,
        headers: Mapping[str, str] | None = None,
        impersonate: Impersonation | None = None,
        idempotent: bool,
        create_only: bool = False,
        batch: bool = False,
    ) -> httpx.Response:
        url = self._url(path, query)
        request_headers: dict[str, str] = {}
        if method == "GET":
            request_headers["If-None-Match"] = "null"
        if body is not None:
            request_headers["Content-Type"] = "application/json; charset=utf-8"
            content = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if impersonate is not None:
            request_headers.update(impersonate.headers())
        request_headers.update(headers or {})

        async def attempt() -> httpx.Response:
            throttled: set[str] = set()
            while True:
                try:
                    async with self.pool.lease(exclude=throttled) as user:
                        token = await user.token()
                        async with self._in_flight:
                            started = time.perf_counter()  # the exchange only: waits above are ours, not the server's
                            try:
                                response = await self._http.request(
                                    method, url, content=content() if callable(content) else content,
                                    headers={**request_headers, "Authorization": f"Bearer {token}"},
                                )
                            except httpx.TransportError as exc:
                                user.pacer.finished((time.perf_counter() - started) * 1000)
                                raise _transport_error(exc) from exc
                        user.pacer.finished((time.perf_counter() - started) * 1000,
                                            response.headers.get("x-ms-ratelimit-time-remaining-xrm-requests"))
                        user.pacer.hint(response.headers.get("x-ms-dop-hint"))
                        if response.status_code == 429:
                            error = map_error(429, response.content, response.headers, create_only=create_only)
                            user.pacer.throttle(error.retry_after)
                            _log.warning("Dataverse 429 for application user %s (%s); paused %.0f s", user.name,
                                         getattr(error, "reason", "unknown"), user.pacer.paused_for)
                            throttled.add(user.name)
                            if len(throttled) < len(self.pool) and self.pool.available_now(exclude=throttled):
                                continue  # another application user has budget now: send through it at once
                            raise error
                except PacingWait as wait:
                    raise ThrottledError(0, "client_pacing", str(wait), retry_after=wait.wait) from None
                break
            # URLs can hold addresses (filters): DEBUG only.
            _log.debug("%s %s -> %d (%.0f ms)", method, url, response.status_code,
                       (time.perf_counter() - started) * 1000)
            if response.status_code < 400:
                return response
            if batch and response.headers.get("content-type", "").lower().startswith("multipart/"):
                return response  # an operation inside the batch failed: decoded by execute_batch
            raise map_error(response.status_code, response.content, response.headers, create_only=create_only)

        return await retry_async(
            attempt,
            policy=self.retry_policy,
            classify=classify_failure,
            idempotent=idempotent,
            sleep=self._sleep,
            describe=f"Dataverse {method} {path.split('?')[0].split('(')[0]}",
        )

    # -- CRUD ------------------------------------------------------------------------------------------

    async def create(
        self,
        entity_set: str,
        body: Mapping[str, Any],
        *,
        return_representation: bool = False,
        select: Sequence[str] | None = None,
        impersonate: Impersonation | None = None,
        idempotent: bool | None = None,
        suppress_duplicate_detection: bool | None = None,
    ) -> str | dict[str, Any]:
        """Create a record (deep insert allowed). Returns its id, or the representation when asked.

        ``idempotent=None`` decides from the body: a create that carries its primary key (``PRIMARY_KEYS``)
        is safe to repeat — a repetition fails with :class:`DuplicateRecordError` instead of creating twice.
        """
        if idempotent is None:
            key = PRIMARY_KEYS.get(entity_set)
            idempotent = key is not None and bool(body.get(key))
        headers: dict[str, str] = {}
        if return_representation:
            headers["Prefer"] = "return=representation"
        if suppress_duplicate_detection is not None:
            headers["MSCRM.SuppressDuplicateDetection"] = "true" if suppress_duplicate_detection else "false"
        query = build_query(select=select) if (select and return_representation) else ""
        response = await self._request(
            "POST", entity_path(entity_set), query=query, body=body, headers=headers,
            impersonate=impersonate, idempotent=idempotent,
        )
        data: dict[str, Any] | None = response.json() if response.content.strip() else None
        if return_representation and data is not None:
            return data
        for header in ("OData-EntityId", "Location"):
            if value := response.headers.get(header):
                return parse_entity_id(value)
        key = PRIMARY_KEYS.get(entity_set)
        if data is not None and key and data.get(key):
            return format_guid(data[key])
        raise DataverseError(response.status_code, "", "create succeeded but returned no record id")

    async def get(
        self,
        entity_set: str,
        record_id: str | uuid.UUID,
        *,
        select: Sequence[str] | None = None,
        expand: str | Sequence[str] | None = None,
        annotations: str | None = None,
        impersonate: Impersonation | None = None,
    ) -> dict[str, Any]:
        """Retrieve one record; :class:`NotFoundError` if it does not exist."""
        response = await self._request(
            "GET", entity_path(entity_set, record_id), query=build_query(select=select, expand=expand),
            headers=_header("Prefer", _prefer(_annotations(annotations))), impersonate=impersonate,
            idempotent=True,
        )
        data: dict[str, Any] = response.json()
        return data

    async def list(
        self,
        entity_set: str,
        *,
        select: Sequence[str] | None = None,
        filter: str | None = None,
        orderby: str | Sequence[str] | None = None,
        top: int | None = None,
        expand: str | Sequence[str] | None = None,
        page_size: int | None = None,
        annotations: str | None = None,
        impersonate: Impersonation | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Rows matching the query, following ``@odata.nextLink`` page by page (lazily).

        ``page_size`` goes out as ``Prefer: odata.maxpagesize`` (≤ 5000). Dataverse ignores ``$top`` when a
        page size is set, so ``top`` is also enforced here.
        """
        if page_size is not None and not 0 < page_size <= 5000:
            raise ValueError("page_size must be within 1..5000")
        prefer = _prefer(f"odata.maxpagesize={page_size}" if page_size else None, _annotations(annotations))
        headers = _header("Prefer", prefer)
        path: str = entity_path(entity_set)
        query = build_query(select=select, filter=filter, orderby=orderby, top=top, expand=expand)
        yielded = 0
        while True:
            response = await self._request(
                "GET", path, query=query, headers=headers, impersonate=impersonate, idempotent=True
            )
            data = response.json()
            for row in data.get("value", []):
                if top is not None and yielded >= top:
                    return
                yielded += 1
                yield row
            next_link = data.get("@odata.nextLink")
            if not next_link or (top is not None and yielded >= top):
                return
            path, query = next_link, ""  # used unchanged, with the same Prefer (reference §4.1)

    async def update(
        self,
        entity_set: str,
        record_id: str | uuid.UUID,
        body: Mapping[str, Any],
        *,
        if_match: str | None = None,
        if_none_match: str | None = None,
        upsert: bool = False,
        return_etag: bool = False,
        impersonate: Impersonation | None = None,
    ) -> str | None:
        """PATCH a record; returns the new ETag when the server tells it (``return_etag`` asks for it).

        * default: ``If-Match: *`` so an update never creates (missing → :class:`NotFoundError`);
        * ``if_match=<etag>``: optimistic concurrency, mismatch → :class:`PreconditionFailedError`;
        * ``upsert=True``: no condition, creates the record with this id if absent;
        * ``if_none_match="*"``: create-only upsert, existing → :class:`DuplicateRecordError`.

        Repeated on transient failures only without a specific ETag: after a lost response, repeating an
        ETag-conditional PATCH would report our own success as a 412.
        """
        headers: dict[str, str] = {}
        if if_match is not None:
            headers["If-Match"] = if_match
        elif not upsert and if_none_match is None:
            headers["If-Match"] = "*"
        if if_none_match is not None:
            headers["If-None-Match"] = if_none_match
        query = ""
        if return_etag:
            headers["Prefer"] = "return=representation"
            key = PRIMARY_KEYS.get(entity_set)
            query = build_query(select=[key]) if key else ""
        response = await self._request(
            "PATCH", entity_path(entity_set, record_id), query=query, body=body, headers=headers,
            impersonate=impersonate, idempotent=headers.get("If-Match") in (None, "*"),
            create_only=if_none_match == "*",
        )
        etag: str | None = response.headers.get("ETag")
        if etag:
            return etag
        if response.content.strip():
            value = response.json().get("@odata.etag")
            return str(value) if value else None
        return None

    async def delete(
        self,
        entity_set: str,
        record_id: str | uuid.UUID,
        *,
        if_match: str | None = None,
        impersonate: Impersonation | None = None,
    ) -> None:
        """Delete a record. Succeeds when it is already gone (Azure SDK rule for ``delete_``)."""
        headers = _header("If-Match", if_match)
        try:
            await self._request(
                "DELETE", entity_path(entity_set, record_id), headers=headers, impersonate=impersonate,
                idempotent=if_match in (None, "*"),
            )
        except NotFoundError:
            return

    # -- $batch ----------------------------------------------------------------------------------------

    async def execute_batch(
        self,
        requests: Sequence[BatchRequest | ChangeSet],
        *,
        continue_on_error: bool = False,
        impersonate: Impersonation | None = None,
    ) -> builtins.list[BatchResponse]:
        """Send a multipart ``$batch`` (reference §5) and return one response per operation, in order.

        Without ``continue_on_error`` Dataverse stops at the first failure (a failed change set is rolled
        back); that failure is raised as its typed error, with every decoded response in
        ``error.batch_responses``. With ``continue_on_error`` all responses are returned and the caller checks
        ``BatchResponse.ok``. The batch is repeated on transient failures only if every operation is
        idempotent (see :attr:`BatchRequest.safe_to_repeat`).
        """
        flat = [r for item in requests for r in (item.requests if isinstance(item, ChangeSet) else [item])]
        common = impersonate.headers() if impersonate else None
        content_type, segments = encode_batch_segments(requests, api_path=self._api_path, common_headers=common)
        headers = {"Content-Type": content_type, "If-None-Match": "null"}
        if continue_on_error:
            headers["Prefer"] = "odata.continue-on-error"
        payload: bytes | Callable[[], AsyncIterator[bytes]]
        if len(segments) == 1:
            payload = segments[0]  # type: ignore[assignment]  # no attachment content: one bytes segment
        else:
            # Attachment contents are base64-encoded chunk by chunk as the request is sent (memory: one raw copy
            # of each attachment, never its encoded text); Content-Length is known, so nothing is chunk-encoded.
            headers["Content-Length"] = str(sum(len(s) for s in segments))

            def payload() -> AsyncIterator[bytes]:
                return _stream(segments)
        response = await self._request(
            "POST", "$batch", content=payload, headers=headers, impersonate=impersonate,
            idempotent=all(r.safe_to_repeat for r in flat), batch=True,
        )
        responses = decode_batch_response(response.headers.get("content-type", ""), response.content)
        if not continue_on_error:
            for part in responses:
                if not part.ok:
                    error = map_error(part.status, part.body, part.headers)
                    error.batch_responses = responses
                    raise error
        return responses

    # -- actions and functions -------------------------------------------------------------------------

    async def execute_action(
        self,
        name: str,
        body: Mapping[str, Any] | None = None,
        *,
        entity_set: str | None = None,
        record_id: str | uuid.UUID | None = None,
        idempotent: bool = False,
        impersonate: Impersonation | None = None,
    ) -> dict[str, Any] | None:
        """Call an action: unbound (``POST /<name>``), or bound to a record/collection
        (``POST /<set>(<id>)/Microsoft.Dynamics.CRM.<name>``). Returns the response body, None on 204."""
        if entity_set is None:
            path = name
        else:
            path = f"{entity_path(entity_set, record_id)}/Microsoft.Dynamics.CRM.{name}"
        response = await self._request(
            "POST", path, body=body or {}, impersonate=impersonate, idempotent=idempotent
        )
        if response.status_code == 204 or not response.content.strip():
            return None
        data: dict[str, Any] = response.json()
        return data

    async def execute_function(
        self, name: str, parameters: Mapping[str, object] | None = None, *, impersonate: Impersonation | None = None
    ) -> dict[str, Any]:
        """Call an unbound function with parameter aliases: ``Fn(A=@p1)?@p1=<literal>``."""
        params = dict(parameters or {})
        aliases = {f"@p{n}": literal(v) for n, v in enumerate(params.values(), start=1)}
        signature = ",".join(f"{k}={alias}" for k, alias in zip(params, aliases, strict=True))
        path = f"{name}({signature})" if params else name
        response = await self._request(
            "GET", path, query=build_query(extra=aliases), impersonate=impersonate, idempotent=True
        )
        data: dict[str, Any] = response.json()
        return data

    async def whoami(self) -> dict[str, Any]:
        """``WhoAmI``: ``{"UserId", "BusinessUnitId", "OrganizationId"}`` of the calling (application) user."""
        response = await self._request("GET", "WhoAmI", idempotent=True)
        data: dict[str, Any] = response.json()
        return data

    async def retrieve_user_privileges(self, user_id: str | uuid.UUID) -> builtins.list[dict[str, Any]]:
        """``systemusers(<id>)/Microsoft.Dynamics.CRM.RetrieveUserPrivileges()``: the user's privileges through
        roles and teams, as RolePrivilege objects (``PrivilegeName``, ``Depth``, ``PrivilegeId``, ...)."""
        path = f"{entity_path('systemusers', user_id)}/Microsoft.Dynamics.CRM.RetrieveUserPrivileges()"
        response = await self._request("GET", path, idempotent=True)
        data = response.json() or {}
        return list(data.get("RolePrivileges") or [])

    async def send_email(
        self,
        email_id: str | uuid.UUID,
        issue_send: bool,
        *,
        tracking_token: str | None = None,
        impersonate: Impersonation | None = None,
    ) -> dict[str, Any]:
        """``SendEmail`` bound to an email (reference §8). ``issue_send=False`` records it as sent without
        sending. ``tracking_token=None`` lets Dataverse generate one. Never repeated on transient failures."""
        body: dict[str, Any] = {"IssueSend": issue_send}
        if tracking_token is not None:
            body["TrackingToken"] = tracking_token
        result = await self.execute_action(
            "SendEmail", body, entity_set="emails", record_id=email_id, impersonate=impersonate
        )
        return result or {}

    async def get_tracking_token(self, subject: str = "") -> str:
        """``GetTrackingTokenEmail``: a fresh tracking token. Repeating it only skips a counter value."""
        result = await self.execute_action("GetTrackingTokenEmail", {"Subject": subject}, idempotent=True)
        token = (result or {}).get("TrackingToken")
        if not isinstance(token, str):
            raise DataverseError(200, "", "GetTrackingTokenEmail returned no TrackingToken")
        return token

    # -- lookups ---------------------------------------------------------------------------------------

    async def find_records_by_email(
        self,
        addresses: Iterable[str],
        *,
        tables: Sequence[AddressTable] = DEFAULT_ADDRESS_TABLES,
        impersonate: Impersonation | None = None,
    ) -> dict[str, builtins.list[dict[str, Any]]]:
        """Rows whose address columns match any of ``addresses``, per entity set (raw rows, no decision).

        One round trip: a single ``$batch`` with one GET per table (``Microsoft.Dynamics.CRM.In`` per address
        column, or-ed), instead of one request per table — 1 call instead of 5 towards the "≤ 1.5 Dataverse
        calls per tracked email" target. Dataverse compares strings case-insensitively; so do we when
        de-duplicating the input.
        """
        unique: dict[str, str] = {}
        for address in addresses:
            cleaned = address.strip()
            if cleaned:
                unique.setdefault(cleaned.casefold(), cleaned)
        result: dict[str, builtins.list[dict[str, Any]]] = {t.entity_set: [] for t in tables}
        if not unique or not tables:
            return result
        values = builtins.list(unique.values())
        chunks = [values[i:i + _ADDRESSES_PER_QUERY] for i in range(0, len(values), _ADDRESSES_PER_QUERY)]
        plan: builtins.list[tuple[str, BatchRequest]] = []
        for table in tables:
            for chunk in chunks:
                condition = or_(*(in_(column, chunk) for column in table.address_columns))
                query = build_query(select=table.select, filter=and_(condition, table.filter))
                plan.append((table.entity_set, BatchRequest("GET", f"{entity_path(table.entity_set)}?{query}")))
        responses = await self.execute_batch([req for _, req in plan], impersonate=impersonate)
        for (entity_set, _), response in zip(plan, responses, strict=True):
            data = response.json() or {}
            result[entity_set].extend(data.get("value", []))
            next_link = data.get("@odata.nextLink")
            while next_link:  # rare: more matches than one page
                page = (await self._request("GET", next_link, impersonate=impersonate, idempotent=True)).json()
                result[entity_set].extend(page.get("value", []))
                next_link = page.get("@odata.nextLink")
        return result

    @classmethod
    def from_settings(cls, settings: Settings, token: TokenProvider, **kwargs: Any) -> DataverseClient:
        """Build from :class:`core.config.Settings` (``DATAVERSE_URL`` + ``DATAVERSE_API_VERSION``)."""
        return cls(settings.dataverse_api_base, token, **kwargs)


async def _stream(segments: Sequence[bytes | Base64Content]) -> AsyncIterator[bytes]:
    for segment in segments:
        if isinstance(segment, bytes):
            yield segment
        else:
            for chunk in segment.chunks():
                yield chunk


def _header(name: str, value: str | None) -> dict[str, str]:
    return {name: value} if value else {}
