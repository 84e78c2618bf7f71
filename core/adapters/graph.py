"""Microsoft Graph mail adapter over msgraph-sdk (kiota request adapter), returning plain JSON.

Why raw JSON: the functional core decides on plain data (``core.domain.normalize`` reads Graph's
JSON shape), so we use the SDK's request builders, authentication and transport, and take the
native response (``NativeResponseHandler``) instead of kiota models.

Retries: the SDK's RetryHandler also re-sends POSTs (a retried ``send`` can send twice), so every
request here switches it off and this adapter decides: idempotent requests (GET, PATCH, DELETE) are
retried in-process only for short waits (``Retry-After`` <= ``max_inline_wait``); anything longer
raises ``GraphThrottled`` carrying ``retry_after`` so the caller re-enqueues with a visibility
delay instead of blocking a worker. POSTs are never retried here.

Concurrency: Outlook allows 4 concurrent requests per app per mailbox; a per-mailbox semaphore keeps
this instance inside that limit.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from core.domain.model import LOOP_MARKER_PROPERTY

if TYPE_CHECKING:  # msgraph is heavy (~1.5 s to import): only imported when a client is built
    import httpx
    from kiota_abstractions.authentication import AccessTokenProvider
    from kiota_abstractions.request_information import RequestInformation

log = logging.getLogger("emailrouter.graph")

__all__ = [
    "ATTACHMENT_METADATA",
    "MESSAGE_SELECT",
    "AttachmentContents",
    "DeltaPage",
    "GraphAccessDenied",
    "GraphError",
    "GraphMailClient",
    "GraphNotFound",
    "GraphSyncStateNotFound",
    "GraphThrottled",
    "GraphTransient",
    "MailboxUserIds",
]

# Everything the processor reads, fetched once per message (reference/graph.md §6).
MESSAGE_SELECT: tuple[str, ...] = (
    "id", "internetMessageId", "internetMessageHeaders", "conversationId", "conversationIndex", "subject",
    "body", "bodyPreview", "from", "sender", "toRecipients", "ccRecipients", "bccRecipients", "replyTo",
    "receivedDateTime", "sentDateTime", "createdDateTime", "lastModifiedDateTime", "hasAttachments",
    "importance", "isDraft", "isRead", "parentFolderId", "categories", "changeKey",
)
DELTA_SELECT: tuple[str, ...] = ("id", "internetMessageId", "receivedDateTime", "isDraft", "parentFolderId")
# Attachments listed with the message by metadata only (no contentBytes): every property is declared on the
# base type microsoft.graph.attachment. Content is fetched afterwards only for attachments CRM will keep.
ATTACHMENT_METADATA: tuple[str, ...] = ("id", "name", "contentType", "size", "isInline")
# Codes Graph/Exchange use when a delta sync state is gone (delta-query-overview; errors; 3P variants), compared
# case-insensitively: every one restarts the round.
DELTA_RESET_CODES: frozenset[str] = frozenset({"syncstatenotfound", "syncstateinvalid", "resyncrequired"})
# Upload-session byte ranges: "keep each byte range less than 4 MB" (outlook-large-attachments).
UPLOAD_CHUNK_BYTES = 3 * 1024 * 1024
GRAPH_BATCH_ITEMS = 20
# Read in the same GET as the message: In-Reply-To / References as MAPI properties (they are not in the Sent Items
# copy's internetMessageHeaders, which do not exist there) and the router's own loop-marker property.
MESSAGE_EXTENDED_PROPERTIES: tuple[str, ...] = ("String 0x1042", "String 0x1039", LOOP_MARKER_PROPERTY)


MailboxUserIds = Callable[[str], Awaitable[str | None]]
"""Mailbox address -> its Entra object id (the settings row's ``GraphUserId``), or None when unknown."""


class GraphError(Exception):
    def __init__(self, status: int, code: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"Graph {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:
        return False


class GraphThrottled(GraphError):
    @property
    def transient(self) -> bool:
        return True


class GraphTransient(GraphError):
    @property
    def transient(self) -> bool:
        return True


class GraphNotFound(GraphError):
    pass


class GraphAccessDenied(GraphError):
    pass


class GraphSyncStateNotFound(GraphError):
    """The delta token expired or is unknown (410 syncStateNotFound): start a new round."""


def _error_from(status: int, body: bytes, headers: Mapping[str, str]) -> GraphError:
    code, message = "unknown", ""
    try:
        err = json.loads(body or b"{}").get("error", {})
        code = str(err.get("code") or code)
        message = str(err.get("message") or "")[:500]
    except (ValueError, AttributeError):
        message = body[:200].decode("utf-8", "replace")
    retry_after: float | None = None
    raw_retry = headers.get("retry-after")
    if raw_retry:
        try:
            retry_after = max(0.0, float(raw_retry))
        except ValueError:
            retry_after = None
    if status == 429 or code in ("ErrorSubmissionQuotaExceeded", "ApplicationThrottled", "MailboxConcurrency"):
        return GraphThrottled(status, code, message, retry_after=retry_after if retry_after is not None else 5.0)
    if status in (500, 502, 503, 504) or code in ("ErrorServerBusy", "ServiceNotAvailable"):
        return GraphTransient(status, code, message, retry_after=retry_after)
    if status == 410 or code.lower() in DELTA_RESET_CODES:
        return GraphSyncStateNotFound(status, code, message)
    if status == 404 or code in ("ErrorItemNotFound", "ResourceNotFound"):
        return GraphNotFound(status, code, message)
    if status in (401, 403):
        return GraphAccessDenied(status, code, message)
    return GraphError(status, code, message, retry_after=retry_after)


async def _read_into(response: httpx.Response, size_hint: int) -> bytearray:
    """The response body in one buffer, preallocated to ``size_hint`` (grown if the body is longer, cut to its
    length in place)."""
    buffer = bytearray(max(0, size_hint))
    view = memoryview(buffer)
    length = 0
    async for chunk in response.aiter_bytes():
        end = length + len(chunk)
        if end > len(buffer):
            view.release()
            buffer.extend(bytes(end - len(buffer)))
            view = memoryview(buffer)
        view[length:end] = chunk
        length = end
    view.release()
    del buffer[length:]
    return buffer


@dataclass
class DeltaPage:
    messages: list[dict[str, Any]]
    removed: list[str]
    next_link: str | None
    delta_link: str | None


@dataclass
class AttachmentContents:
    """Attachments with their content (Graph JSON; ``contentBytes`` base64 text, or bytes when read raw) and the
    number of Graph requests it took."""

    attachments: list[dict[str, Any]]
    requests: int


@dataclass
class _Stats:
    requests: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


class GraphMailClient:
    """The Graph calls the router makes, as plain JSON in and out."""

    def __init__(
        self,
        base_url: str,
        token_provider: AccessTokenProvider,
        *,
        user_ids: MailboxUserIds | None = None,
        http_client: httpx.AsyncClient | None = None,
        per_mailbox_concurrency: int = 4,
        max_inline_wait: float = 2.0,
        max_inline_retries: int = 2,
        timeout: float = 60.0,
    ) -> None:
        import httpx as _httpx
        from kiota_abstractions.authentication import BaseBearerTokenAuthenticationProvider
        from msgraph import GraphRequestAdapter, GraphServiceClient
        from msgraph_core import GraphClientFactory

        from core.adapters.http_pool import cheap_readable_checks

        self._timeout = timeout
        self._token_provider = token_provider
        self._download: _httpx.AsyncClient | None = None  # plain client for streamed downloads (no middleware)
        # a given client's own transport (tests: a MockTransport), taken before the SDK wraps it in its middleware
        self._download_transport = getattr(http_client, "_transport", None) if http_client is not None else None
        client = cheap_readable_checks(  # CPU: core/adapters/http_pool.py
            http_client or _httpx.AsyncClient(timeout=_httpx.Timeout(timeout, connect=15.0)))
        client = GraphClientFactory.create_with_custom_middleware(_middleware(), client=client)
        self._adapter = GraphRequestAdapter(BaseBearerTokenAuthenticationProvider(token_provider), client=client)
        self._adapter.base_url = base_url.rstrip("/")
        self._client = GraphServiceClient(request_adapter=self._adapter)
        self._base_url = base_url.rstrip("/")
        self._per_mailbox = per_mailbox_concurrency
        self._locks: dict[str, asyncio.Semaphore] = {}
        self._max_inline_wait = max_inline_wait
        self._max_inline_retries = max_inline_retries
        self._user_ids = user_ids
        self.stats = _Stats()

    @property
    def sdk(self) -> Any:
        """The underlying GraphServiceClient (for request builders)."""
        return self._client

    def _mailbox_lock(self, mailbox: str) -> asyncio.Semaphore:
        key = mailbox.lower()
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Semaphore(self._per_mailbox)
        return lock

    # -- transport -----------------------------------------------------------------------------

    def _prepare(self, ri: RequestInformation, headers: Mapping[str, str] | None) -> RequestInformation:
        # The native response back (no kiota models); there is no RetryHandler in the chain (_middleware) to switch
        # off: this adapter decides on retries itself.
        ri.add_request_options([_native_response_option()])
        for name, value in (headers or {}).items():
            ri.headers.try_add(name, value)
        return ri

    async def _user_path(self, mailbox: str) -> str | None:
        """The ``/users/{...}`` segment for a mailbox named by its address, when its Entra object id is known.

        Graph documents ``/users/{id | userPrincipalName}`` only; a primary SMTP address that differs from the UPN
        fails (audit graph-fidelity #3). The settings sync resolves each mailbox to its object id
        (``GraphUserId``); every path is built with the address and redirected here, in one place."""
        if self._user_ids is None or "@" not in mailbox:
            return None
        user_id = await self._user_ids(mailbox)
        if not user_id or user_id.lower() == mailbox.lower():
            return None
        return quote(user_id, safe="@")

    async def _send(
        self,
        kind: str,
        mailbox: str | None,
        build: Any,
        *,
        idempotent: bool,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes, Mapping[str, str]]:
        attempt = 0
        user_path = await self._user_path(mailbox) if mailbox else None
        while True:
            ri = self._prepare(build(), headers)
            if user_path is not None and mailbox is not None:
                ri.url = _with_user_path(ri.url, mailbox, user_path)
            lock = self._mailbox_lock(mailbox) if mailbox else None
            self.stats.requests += 1
            self.stats.by_kind[kind] = self.stats.by_kind.get(kind, 0) + 1
            try:
                if lock is not None:
                    async with lock:
                        response = await self._adapter.send_primitive_async(ri, "bytes", {})
                else:
                    response = await self._adapter.send_primitive_async(ri, "bytes", {})
            except Exception as exc:  # connection errors, timeouts: transient by nature
                if _is_transport_error(exc):
                    err: GraphError = GraphTransient(0, exc.__class__.__name__, "transport error")
                else:
                    raise
            else:
                status = response.status_code
                body = response.content
                hdrs = {k.lower(): v for k, v in response.headers.items()}
                if status < 400:
                    return status, body, hdrs
                err = _error_from(status, body, hdrs)
            wait = err.retry_after if err.retry_after is not None else 0.5 * (attempt + 1)
            if idempotent and err.transient and attempt < self._max_inline_retries and wait <= self._max_inline_wait:
                attempt += 1
                log.info("graph %s transient %s (%s); retry %d in %.1fs", kind, err.status, err.code, attempt, wait)
                await asyncio.sleep(wait)
                continue
            raise err

    def _raw(self, method: str, url: str, body: Any = None, *, accept: str = "application/json") -> Any:
        from kiota_abstractions.method import Method
        from kiota_abstractions.request_information import RequestInformation

        def build() -> RequestInformation:
            ri = RequestInformation()
            ri.http_method = Method[method]
            ri.url = url if url.startswith("http") else f"{self._base_url}{url}"
            ri.headers.try_add("Accept", accept)
            if body is not None:
                ri.set_stream_content(json.dumps(body).encode(), "application/json")
            return ri

        return build

    @staticmethod
    def _json(body: bytes) -> dict[str, Any]:
        return json.loads(body) if body else {}

    def _user(self, mailbox: str) -> Any:
        return self._client.users.by_user_id(mailbox)

    # -- messages ------------------------------------------------------------------------------

    async def get_message(self, mailbox: str, message_id: str, *, with_attachments: bool = True) -> dict[str, Any]:
        """One GET: the fields the processor needs, headers and MESSAGE_EXTENDED_PROPERTIES included, attachments
        listed by metadata (their content is fetched separately, only when CRM will keep it:
        :meth:`get_attachment_contents`)."""
        url = f"/users/{quote(mailbox)}/messages/{quote(message_id, safe='')}?{_message_query(with_attachments)}"
        _, body, _ = await self._send(
            "get_message", mailbox, self._raw("GET", url), idempotent=True,
            headers={"Prefer": 'IdType="ImmutableId", outlook.body-content-type="html"'},
        )
        return self._json(body)

    async def get_attachment_mime(self, mailbox: str, message_id: str, attachment_id: str) -> bytes:
        """The raw MIME of an attached message (``.../attachments/{id}/$value``, documented for item attachments
        that are messages): every header of a forwarded original, which the expanded item does not carry."""
        url = (f"/users/{quote(mailbox)}/messages/{quote(message_id, safe='')}/attachments/"
               f"{quote(attachment_id, safe='')}/$value")
        _, body, _ = await self._send("get_attachment_mime", mailbox, self._raw("GET", url, accept="*/*"),
                                      idempotent=True)
        return body

    async def get_attachment(self, mailbox: str, message_id: str, attachment_id: str) -> dict[str, Any]:
        """One attachment with its content (a fileAttachment's ``contentBytes``, ``contentId``)."""
        _, body, _ = await self._send("get_attachment", mailbox, self._raw("GET", self._attachment_url(
            mailbox, message_id, attachment_id)), idempotent=True, headers={"Prefer": 'IdType="ImmutableId"'})
        return self._json(body)

    async def get_attachment_value(self, mailbox: str, message_id: str, attachment_id: str, *,
                                   size_hint: int = 0) -> bytearray:
        """The raw bytes of a file attachment (``.../$value``): no base64 JSON for large files.

        Streamed into one buffer sized from ``size_hint`` (the attachment's listed size), so the content is held
        once: reading it whole (``response.content``) holds the chunks and their join, twice its size, at the
        peak. The plain client has no SDK middleware; auth, the per-mailbox limit and inline retries are as for
        every other request here."""
        import httpx as _httpx

        url = self._base_url + self._attachment_url(mailbox, message_id, attachment_id) + "/$value"
        user_path = await self._user_path(mailbox)
        if user_path is not None:
            url = _with_user_path(url, mailbox, user_path)
        if self._download is None:
            self._download = _httpx.AsyncClient(timeout=_httpx.Timeout(self._timeout, connect=15.0),
                                                transport=self._download_transport)
        attempt = 0
        while True:
            self.stats.requests += 1
            self.stats.by_kind["get_attachment_value"] = self.stats.by_kind.get("get_attachment_value", 0) + 1
            token = await self._token_provider.get_authorization_token(url)
            try:
                async with self._mailbox_lock(mailbox), self._download.stream(
                        "GET", url, headers={"Authorization": f"Bearer {token}", "Accept": "*/*"}) as response:
                    if response.status_code < 400:
                        return await _read_into(response, size_hint)
                    body = await response.aread()
                    err = _error_from(response.status_code, body,
                                      {k.lower(): v for k, v in response.headers.items()})
            except _httpx.TransportError as exc:
                err = GraphTransient(0, exc.__class__.__name__, "transport error")
            wait = err.retry_after if err.retry_after is not None else 0.5 * (attempt + 1)
            if err.transient and attempt < self._max_inline_retries and wait <= self._max_inline_wait:
                attempt += 1
                await asyncio.sleep(wait)
                continue
            raise err

    async def get_attachment_contents(self, mailbox: str, message_id: str, attachments: Sequence[Mapping[str, Any]],
                                      *, batch_bytes: int = 4 * 1024 * 1024) -> AttachmentContents:
        """The listed file attachments with their content, in the order given.

        Inline attachments and small ones are read as JSON (``contentBytes`` + ``contentId``): one direct GET for a
        single one, else sequential JSON ``$batch`` requests (dependsOn chains: one request at a time in the
        mailbox, as the per-mailbox semaphore assumes) of at most ``batch_bytes`` together. A large non-inline file
        is read raw through ``$value`` (memory: no base64 JSON) and returned with ``contentBytes`` as bytes. A batch
        item that fails is fetched again directly, so errors surface exactly as for a direct call.
        """
        out: dict[str, dict[str, Any]] = {}
        requests = 0
        small: list[Mapping[str, Any]] = []
        for meta in attachments:
            size = int(meta.get("size") or 0)
            if size > batch_bytes and not meta.get("isInline"):
                requests += 1
                data = await self.get_attachment_value(mailbox, message_id, str(meta["id"]), size_hint=size)
                out[str(meta["id"])] = {**meta, "contentBytes": data}
            else:
                small.append(meta)
        groups: list[list[Mapping[str, Any]]] = []
        total = 0
        for meta in small:
            size = int(meta.get("size") or 0)
            if not groups or len(groups[-1]) >= GRAPH_BATCH_ITEMS or total + size > batch_bytes:
                groups.append([])
                total = 0
            groups[-1].append(meta)
            total += size
        for group in groups:
            requests += 1
            if len(group) == 1:
                out[str(group[0]["id"])] = await self.get_attachment(mailbox, message_id, str(group[0]["id"]))
                continue
            chain = [{"id": str(n), "method": "GET", "url": self._attachment_url(mailbox, message_id, str(meta["id"])),
                      "headers": {"Prefer": 'IdType="ImmutableId"'}, **({"dependsOn": [str(n - 1)]} if n else {})}
                     for n, meta in enumerate(group)]
            responses = await self.batch(chain, mailbox=mailbox)
            for meta, response in zip(group, responses, strict=True):
                body = response.get("body")
                if int(response.get("status") or 0) == 200 and isinstance(body, dict):
                    out[str(meta["id"])] = body
                else:
                    requests += 1
                    out[str(meta["id"])] = await self.get_attachment(mailbox, message_id, str(meta["id"]))
        return AttachmentContents([out[str(meta["id"])] for meta in attachments], requests)

    @staticmethod
    def _attachment_url(mailbox: str, message_id: str, attachment_id: str) -> str:
        return (f"/users/{quote(mailbox)}/messages/{quote(message_id, safe='')}/attachments/"
                f"{quote(attachment_id, safe='')}")

    async def get_mime(self, mailbox: str, message_id: str) -> bytes:
        url = f"/users/{quote(mailbox)}/messages/{quote(message_id, safe='')}/$value"
        _, body, _ = await self._send("get_mime", mailbox, self._raw("GET", url, accept="*/*"), idempotent=True)
        return body

    async def set_categories(self, mailbox: str, message_id: str, categories: Sequence[str]) -> None:
        url = f"/users/{quote(mailbox)}/messages/{quote(message_id, safe='')}"
        await self._send("patch_message", mailbox, self._raw("PATCH", url, {"categories": list(categories)}),
                         idempotent=True)

    async def delete_message(self, mailbox: str, message_id: str) -> None:
        url = f"/users/{quote(mailbox)}/messages/{quote(message_id, safe='')}"
        try:
            await self._send("delete_message", mailbox, self._raw("DELETE", url), idempotent=True)
        except GraphNotFound:
            pass  # already gone: deleting is idempotent for us

    async def move_message(self, mailbox: str, message_id: str, destination_id: str) -> dict[str, Any]:
        """``POST .../messages/{id}/move``: the moved message (its immutable id is the same, its REST id is not)."""
        url = f"/users/{quote(mailbox)}/messages/{quote(message_id, safe='')}/move"
        request = self._raw("POST", url, {"destinationId": destination_id})
        _, body, _ = await self._send("move_message", mailbox, request, idempotent=True,
                                      headers={"Prefer": 'IdType="ImmutableId"'})
        return self._json(body)

    async def ensure_child_folder(self, mailbox: str, parent: str, display_name: str) -> str:
        """The id of ``parent``'s child folder named ``display_name`` (case-insensitive), created when missing
        (``POST .../mailFolders/{parent}/childFolders``; a 409 from a concurrent create is answered by looking
        again)."""
        def find(folders: Sequence[Mapping[str, Any]]) -> str | None:
            wanted = display_name.strip().lower()
            return next((str(f["id"]) for f in folders if str(f.get("displayName", "")).strip().lower() == wanted
                         and f.get("id")), None)

        found = find(await self.list_mail_folders(mailbox, parent))
        if found is not None:
            return found
        url = f"/users/{quote(mailbox)}/mailFolders/{quote(parent, safe='')}/childFolders"
        try:
            _, body, _ = await self._send("create_folder", mailbox, self._raw("POST", url,
                                                                              {"displayName": display_name}),
                                          idempotent=False)
        except GraphError as exc:
            if exc.status != 409:
                raise
            again = find(await self.list_mail_folders(mailbox, parent))
            if again is None:
                raise
            return again
        return str(self._json(body)["id"])

    async def find_messages_by_internet_id(
        self, mailbox: str, internet_message_id: str, *, folder: str | None = None
    ) -> list[dict[str, Any]]:
        escaped = internet_message_id.replace("'", "''")
        base = f"/users/{quote(mailbox)}" + (f"/mailFolders/{quote(folder)}" if folder else "")
        url = (f"{base}/messages?$filter=internetMessageId eq '{quote(escaped, safe='')}'"
               f"&$select=id,internetMessageId,isDraft,parentFolderId,sentDateTime&$top=10")
        _, body, _ = await self._send("find_message", mailbox, self._raw("GET", url), idempotent=True,
                                      headers={"Prefer": 'IdType="ImmutableId"'})
        return list(self._json(body).get("value", []))

    async def list_messages(
        self, mailbox: str, folder: str, *, received_after: datetime | None = None,
        received_before: datetime | None = None, page_size: int = 50,
    ) -> AsyncIterator[dict[str, Any]]:
        """Messages in a folder, newest first, optionally received in [after, before) (backfill)."""
        url = (f"/users/{quote(mailbox)}/mailFolders/{quote(folder)}/messages"
               f"?$select=id,receivedDateTime&$top={page_size}")
        window = [f"receivedDateTime ge {_stamp(received_after)}"] if received_after is not None else []
        if received_before is not None:
            window.append(f"receivedDateTime lt {_stamp(received_before)}")
        if window:
            # $orderby on the property the $filter names (Graph wants them to match)
            url += "&$filter=" + quote(" and ".join(window), safe="") + "&$orderby=" + quote(
                "receivedDateTime desc", safe="")
        async for message in self._message_pages("list_messages", mailbox, url):
            yield message

    async def _message_pages(self, kind: str, mailbox: str, url: str) -> AsyncIterator[dict[str, Any]]:
        """Every message of a listing, page after page (``@odata.nextLink`` as Graph gives it), immutable ids."""
        next_url: str | None = url
        while next_url:
            _, body, _ = await self._send(kind, mailbox, self._raw("GET", next_url), idempotent=True,
                                          headers={"Prefer": 'IdType="ImmutableId"'})
            page = self._json(body)
            for message in page.get("value", []):
                yield message
            next_url = page.get("@odata.nextLink")

    async def list_categorized_messages(self, mailbox: str, category: str, *, since: datetime,
                                        page_size: int = 100) -> AsyncIterator[dict[str, Any]]:
        """Messages in any folder of the mailbox that carry ``category`` and changed at or after ``since`` (track by
        category): ``/users/{id}/messages`` with ``$filter=lastModifiedDateTime ge ... and categories/any(c:c eq
        '...')`` (core/domain/category.py), only what the search needs, immutable ids as everywhere else."""
        from core.domain.category import category_filter

        url = (f"/users/{quote(mailbox)}/messages?$filter={quote(category_filter(category, since), safe='')}"
               f"&$select=id,parentFolderId,lastModifiedDateTime,categories&$top={page_size}")
        async for message in self._message_pages("category_search", mailbox, url):
            yield message

    async def well_known_folder_ids(self, mailbox: str, names: Sequence[str]) -> dict[str, str]:
        """Folder id -> well-known name (``inbox``, ``sentitems``, ...) for the names given, in one JSON batch;
        a name the mailbox does not have is left out."""
        requests = [{"id": str(n), "method": "GET",
                     "url": f"/users/{quote(mailbox)}/mailFolders/{quote(name, safe='')}?$select=id"}
                    for n, name in enumerate(names, start=1)]
        found: dict[str, str] = {}
        for start in range(0, len(requests), GRAPH_BATCH_ITEMS):
            chunk = requests[start:start + GRAPH_BATCH_ITEMS]
            for request, response in zip(chunk, await self.batch(chunk, mailbox=mailbox), strict=True):
                folder_id = (response.get("body") or {}).get("id") if int(response.get("status") or 0) == 200 \
                    else None
                if folder_id:
                    found[str(folder_id)] = names[int(request["id"]) - 1]
        return found

    # -- delta ---------------------------------------------------------------------------------

    async def delta_page(
        self, mailbox: str, folder: str, link: str | None, *, received_after: datetime | None = None,
        page_size: int = 100, change_type: str | None = None,
    ) -> DeltaPage:
        """One page of a delta round: from ``link`` (next/delta link) or a new round for the folder.

        A new round asks ``$orderby=receivedDateTime desc`` (with ``$filter`` Graph returns at most 5,000 messages:
        the newest ones, not an arbitrary 5,000) and ``changeType`` (e.g. ``created``: later rounds skip updates such
        as read flags); Graph encodes both into the links it returns."""
        if link:
            url = link
        else:
            url = f"/users/{quote(mailbox)}/mailFolders/{quote(folder)}/messages/delta?$select=" + ",".join(
                DELTA_SELECT)
            if received_after is not None:
                url += "&$filter=" + quote(f"receivedDateTime ge {_stamp(received_after)}", safe="")
            url += "&$orderby=" + quote("receivedDateTime desc", safe="")
            if change_type:
                url += f"&changeType={quote(change_type, safe='')}"
        _, body, _ = await self._send(
            "delta", mailbox, self._raw("GET", url), idempotent=True,
            headers={"Prefer": f'IdType="ImmutableId", odata.maxpagesize={page_size}'},
        )
        page = self._json(body)
        messages, removed = [], []
        for item in page.get("value", []):
            if "@removed" in item:
                removed.append(str(item.get("id", "")))
            else:
                messages.append(item)
        return DeltaPage(messages, removed, page.get("@odata.nextLink"), page.get("@odata.deltaLink"))

    # -- subscriptions -------------------------------------------------------------------------

    async def create_subscription(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """A direct POST with ``Prefer: IdType="ImmutableId"``: the header "only applies to the request it is
        included with" (outlook-immutable-id), and honouring it inside a ``$batch`` item is not documented."""
        _, resp, _ = await self._send("create_subscription", None, self._raw("POST", "/subscriptions", dict(body)),
                                      idempotent=False, headers={"Prefer": 'IdType="ImmutableId"'})
        return self._json(resp)

    async def renew_subscription(self, subscription_id: str, expires: datetime) -> dict[str, Any]:
        body = {"expirationDateTime": expires.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
        _, resp, _ = await self._send(
            "renew_subscription", None, self._raw("PATCH", f"/subscriptions/{quote(subscription_id)}", body),
            idempotent=True)
        return self._json(resp)

    async def reauthorize_subscription(self, subscription_id: str) -> None:
        await self._send("reauthorize_subscription", None,
                         self._raw("POST", f"/subscriptions/{quote(subscription_id)}/reauthorize"), idempotent=True)

    async def delete_subscription(self, subscription_id: str) -> None:
        try:
            await self._send("delete_subscription", None,
                             self._raw("DELETE", f"/subscriptions/{quote(subscription_id)}"), idempotent=True)
        except GraphNotFound:
            pass

    async def list_subscriptions(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        next_url: str | None = "/subscriptions"
        while next_url:
            _, body, _ = await self._send("list_subscriptions", None, self._raw("GET", next_url), idempotent=True)
            page = self._json(body)
            out.extend(page.get("value", []))
            next_url = page.get("@odata.nextLink")
        return out

    async def batch(self, requests: Sequence[Mapping[str, Any]], *, mailbox: str | None = None
                    ) -> list[dict[str, Any]]:
        """JSON $batch (<= 20 requests); returns the responses ordered like the requests (Graph answers in any
        order). ``mailbox``: all items address that mailbox, so the batch takes one of its concurrency slots."""
        if len(requests) > GRAPH_BATCH_ITEMS:
            raise ValueError("a Graph JSON batch holds at most 20 requests")
        items = list(requests)
        user_path = await self._user_path(mailbox) if mailbox else None
        if user_path is not None and mailbox is not None:
            # The outer /$batch URL names no mailbox: each item's /users/<address> becomes the object id too.
            items = [{**r, "url": _with_user_path(str(r["url"]), mailbox, user_path)} if "url" in r else dict(r)
                     for r in items]
        _, body, _ = await self._send("batch", mailbox, self._raw("POST", "/$batch", {"requests": items}),
                                      idempotent=False)
        responses = {str(r.get("id")): r for r in self._json(body).get("responses", [])}
        return [responses.get(str(r["id"]), {"id": r["id"], "status": 0}) for r in requests]

    # -- sending -------------------------------------------------------------------------------

    async def create_draft(self, mailbox: str, message: Mapping[str, Any]) -> dict[str, Any]:
        """POST a draft (never retried here: a retry could create a second draft)."""
        _, body, _ = await self._send(
            "create_draft", mailbox, self._raw("POST", f"/users/{quote(mailbox)}/messages", dict(message)),
            idempotent=False, headers={"Prefer": 'IdType="ImmutableId"'},
        )
        return self._json(body)

    async def add_attachment(self, mailbox: str, message_id: str, attachment: Mapping[str, Any]) -> dict[str, Any]:
        url = f"/users/{quote(mailbox)}/messages/{quote(message_id, safe='')}/attachments"
        _, body, _ = await self._send("add_attachment", mailbox, self._raw("POST", url, dict(attachment)),
                                      idempotent=False)
        return self._json(body)

    async def upload_large_attachment(
        self, mailbox: str, message_id: str, *, name: str, content_type: str, data: bytes,
        is_inline: bool = False, content_id: str | None = None, chunk_size: int = UPLOAD_CHUNK_BYTES,
    ) -> None:
        """Attachments of 3-150 MB through an upload session (reference/graph.md §6.1; outlook-large-attachments):
        ``AttachmentItem`` carries ``isInline``/``contentId`` (a large ``cid:`` image stays inline), each PUT
        ``Content-Type: application/octet-stream`` and a byte range under 4 MB."""
        url = (f"/users/{quote(mailbox)}/messages/{quote(message_id, safe='')}/attachments/"
               "createUploadSession")
        item: dict[str, Any] = {"attachmentType": "file", "name": name, "size": len(data),
                                "contentType": content_type, "isInline": is_inline}
        if content_id:
            item["contentId"] = content_id
        session_body = {"AttachmentItem": item}
        _, body, _ = await self._send("upload_session", mailbox, self._raw("POST", url, session_body),
                                      idempotent=False)
        upload_url = self._json(body)["uploadUrl"]
        import httpx as _httpx

        # The upload URL is pre-authenticated: no bearer token may be sent to it (documented).
        async with _httpx.AsyncClient(timeout=120) as raw:
            start = 0
            while start < len(data):
                chunk = data[start:start + chunk_size]
                end = start + len(chunk) - 1
                resp = await raw.put(upload_url, content=chunk, headers={
                    "Content-Type": "application/octet-stream", "Content-Range": f"bytes {start}-{end}/{len(data)}",
                    "Content-Length": str(len(chunk))})
                if resp.status_code >= 400:
                    raise _error_from(resp.status_code, resp.content, {k.lower(): v for k, v in resp.headers.items()})
                start = end + 1

    async def send_draft(self, mailbox: str, draft_id: str) -> None:
        url = f"/users/{quote(mailbox)}/messages/{quote(draft_id, safe='')}/send"
        await self._send("send", mailbox, self._raw("POST", url), idempotent=False)

    async def send_mail(self, mailbox: str, message: Mapping[str, Any], *, save_to_sent_items: bool = True) -> None:
        body = {"message": dict(message), "saveToSentItems": save_to_sent_items}
        await self._send("send_mail", mailbox, self._raw("POST", f"/users/{quote(mailbox)}/sendMail", body),
                         idempotent=False)

    # -- directory and rules -------------------------------------------------------------------

    async def get_user(self, mailbox: str) -> dict[str, Any]:
        url = f"/users/{quote(mailbox)}?$select=id,userPrincipalName,mail,displayName"
        _, body, _ = await self._send("get_user", mailbox, self._raw("GET", url), idempotent=True)
        return self._json(body)

    async def get_mail_folder(self, mailbox: str, folder: str) -> dict[str, Any]:
        """A folder by id or well-known name (GraphNotFound otherwise: display names are not accepted)."""
        url = f"/users/{quote(mailbox)}/mailFolders/{quote(folder, safe='')}?$select=id,displayName,parentFolderId"
        _, body, _ = await self._send("get_folder", mailbox, self._raw("GET", url), idempotent=True)
        return self._json(body)

    async def list_mail_folders(self, mailbox: str, parent: str | None = None) -> list[dict[str, Any]]:
        """The top-level folders of a mailbox, or the child folders of ``parent`` (every page)."""
        base = f"/users/{quote(mailbox)}/mailFolders"
        if parent is not None:
            base += f"/{quote(parent, safe='')}/childFolders"
        next_url: str | None = f"{base}?$select=id,displayName,parentFolderId,childFolderCount&$top=100"
        out: list[dict[str, Any]] = []
        while next_url:
            _, body, _ = await self._send("list_folders", mailbox, self._raw("GET", next_url), idempotent=True)
            page = self._json(body)
            out.extend(page.get("value", []))
            next_url = page.get("@odata.nextLink")
        return out

    async def find_user_ids(self, addresses: Sequence[str]) -> dict[str, str]:
        """Address -> Entra object id, for mailboxes named by an SMTP address (needs User.Read.All).

        First ``mail eq`` / ``userPrincipalName eq`` (a default directory filter); addresses not found then by
        ``proxyAddresses/any(...)`` (an alias), an advanced query: ``ConsistencyLevel: eventual`` + ``$count``.
        Both as JSON batches of 20. Addresses that match no user, or several, are left out."""
        found: dict[str, str] = {}
        wanted = sorted({a.strip().lower() for a in addresses if a and "@" in a})

        def by_mail(address: str) -> dict[str, Any]:
            value = address.replace("'", "''")
            where = quote(f"mail eq '{value}' or userPrincipalName eq '{value}'", safe="")
            return {"method": "GET", "url": f"/users?$filter={where}&$select=id,mail,userPrincipalName"}

        def by_proxy(address: str) -> dict[str, Any]:
            value = address.replace("'", "''")
            where = quote(f"proxyAddresses/any(p:p eq 'smtp:{value}')", safe="")
            return {"method": "GET", "url": f"/users?$filter={where}&$count=true&$select=id",
                    "headers": {"ConsistencyLevel": "eventual"}}

        for lookup in (by_mail, by_proxy):
            pending = [a for a in wanted if a not in found]
            for start in range(0, len(pending), 20):
                chunk = pending[start:start + 20]
                responses = await self.batch([{"id": str(n), **lookup(a)} for n, a in enumerate(chunk, start=1)])
                for address, response in zip(chunk, responses, strict=True):
                    users = (response.get("body") or {}).get("value") if int(response.get("status") or 0) == 200 \
                        else None
                    if isinstance(users, list) and len(users) == 1 and users[0].get("id"):
                        found[address] = str(users[0]["id"])
        return found

    async def list_inbox_rules(self, mailbox: str) -> list[dict[str, Any]]:
        url = f"/users/{quote(mailbox)}/mailFolders/inbox/messageRules"
        _, body, _ = await self._send("list_rules", mailbox, self._raw("GET", url), idempotent=True)
        return list(self._json(body).get("value", []))

    async def create_inbox_rule(self, mailbox: str, rule: Mapping[str, Any]) -> dict[str, Any]:
        url = f"/users/{quote(mailbox)}/mailFolders/inbox/messageRules"
        _, body, _ = await self._send("create_rule", mailbox, self._raw("POST", url, dict(rule)), idempotent=False)
        return self._json(body)

    async def delete_inbox_rule(self, mailbox: str, rule_id: str) -> None:
        url = f"/users/{quote(mailbox)}/mailFolders/inbox/messageRules/{quote(rule_id, safe='')}"
        try:
            await self._send("delete_rule", mailbox, self._raw("DELETE", url), idempotent=True)
        except GraphNotFound:
            pass

    async def close(self) -> None:
        http = getattr(self._adapter, "_http_client", None)
        if http is not None:
            await http.aclose()
        if self._download is not None:
            await self._download.aclose()
            self._download = None


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _with_user_path(url: str, mailbox: str, user_segment: str) -> str:
    """``.../users/<address>[/...|?...]`` -> ``.../users/<object id>...`` in the path only (next and delta links
    from Graph already carry the id and are left alone)."""
    path, sep, query = url.partition("?")
    path = _user_path_pattern(mailbox).sub(lambda _: f"/users/{user_segment}", path, count=1)
    return f"{path}{sep}{query}"


@functools.lru_cache(maxsize=4096)
def _user_path_pattern(mailbox: str) -> re.Pattern[str]:
    """The ``/users/<address>`` segment of a mailbox, as every URL here spells it (compiled once per mailbox, not
    per request: CPU)."""
    names = "|".join(re.escape(n) for n in {quote(mailbox), quote(mailbox, safe="@"), mailbox})
    return re.compile(rf"/users/(?:{names})(?=/|$)", flags=re.IGNORECASE)


@functools.cache
def _message_query(with_attachments: bool) -> str:
    """The query of :meth:`GraphMailClient.get_message`: MESSAGE_SELECT, the extended properties and (optionally)
    the attachments' metadata. The same text for every message, so built once per process (CPU)."""
    wanted = " or ".join(f"id eq '{p}'" for p in MESSAGE_EXTENDED_PROPERTIES)
    expand = [f"singleValueExtendedProperties($filter={wanted})"]
    if with_attachments:
        expand.insert(0, f"attachments($select={','.join(ATTACHMENT_METADATA)})")
    return "$select=" + ",".join(MESSAGE_SELECT) + "&$expand=" + quote(",".join(expand), safe="$=,'()")


def _is_transport_error(exc: BaseException) -> bool:
    import httpx as _httpx

    return isinstance(exc, _httpx.TransportError | asyncio.TimeoutError)


@functools.cache
def _native_response_option() -> Any:
    """One ``ResponseHandlerOption(NativeResponseHandler())`` for every request: both are stateless (the handler
    returns the httpx response as it is), so building a pair per request was allocation for nothing."""
    from kiota_abstractions.native_response_handler import NativeResponseHandler
    from kiota_http.middleware.options import ResponseHandlerOption

    return ResponseHandlerOption(NativeResponseHandler())


def _middleware() -> list[Any]:
    """The SDK's middleware chain, built from kiota's and msgraph_core's own handlers, less the ones that do
    nothing for this adapter (CPU: each handler opens a tracing span, and three of them re-parse the whole URL on
    every request; the message GET's URL is ~700 characters, which httpx and urllib3 parse character by character
    in Python, ~0.3 ms CPU per request together).

    Kept, in the default order: RedirectHandler, ParametersNameDecodingHandler (re-parsing only when a parameter
    name really changes), UserAgentHandler, GraphTelemetryHandler (the same headers, with the Graph-host check read
    from the URL httpx has already parsed). Left out:

    * RetryHandler: every request switched it off (it re-sends POSTs); this adapter retries itself (module
      docstring), so its only effect was work.
    * UrlReplaceHandler: rewrites ``/users/TokenToReplace`` to ``/me``, a placeholder only kiota's ``/me``
      request builders produce; every URL here is built from a mailbox address or object id, or is a link Graph
      returned. It re-parsed every URL to replace nothing.
    * HeadersInspectionHandler, BodyInspectionHandler: act only when a request asks for inspection through their
      options; none does.
    """
    from kiota_http.middleware import ParametersNameDecodingHandler, RedirectHandler, UserAgentHandler
    from msgraph_core.middleware import GraphTelemetryHandler

    class _ParametersNameDecoding(ParametersNameDecodingHandler):  # type: ignore[misc]
        """The same decoding; the request URL is replaced (httpx re-parses it) only when the decoded query differs.
        The base class replaced it whenever the query held any ``%`` (every value with a space in it)."""

        async def send(self, request: httpx.Request, transport: httpx.AsyncBaseTransport) -> httpx.Response:
            options = self._get_current_options(request)
            query = request.url.query.decode("utf-8")
            if options and options.enabled and "%" in query and options.characters_to_decode:
                decoded = self.decode_uri_encoded_string(query, options.characters_to_decode)
                if decoded != query:
                    request.url = request.url.copy_with(query=decoded.encode("utf-8"))
            return await super(ParametersNameDecodingHandler, self).send(request, transport)

    class _Telemetry(GraphTelemetryHandler):  # type: ignore[misc]
        """The same telemetry headers on Graph hosts; the base class re-parsed the URL's text with urllib3 for
        its scheme and host, which httpx has already parsed (and normalised: lowercase, default port dropped, as
        ``str(url)`` handed to urllib3 was) on the request."""

        def is_graph_url(self, url: httpx.URL) -> bool:
            return f"{url.scheme}://{url.netloc.decode('ascii')}" in _graph_endpoints()

    return [RedirectHandler(), _ParametersNameDecoding(), UserAgentHandler(), _Telemetry()]


@functools.cache
def _graph_endpoints() -> frozenset[str]:
    from msgraph_core._enums import NationalClouds

    return frozenset(item.value for item in NationalClouds)
