"""Azure Storage adapters: queues (send, browse poison queues) and tables (typed, etag-aware entity store).

Built from :class:`core.config.Settings` exactly like the Functions host finds its storage: a connection
string in ``AzureWebJobsStorage``, or identity-based endpoints (``AzureWebJobsStorage__queueServiceUri``,
``__tableServiceUri``, optional ``__clientId`` of a user-assigned managed identity). Locally the connection
string points at Azurite; nothing else differs.

* **Queue encoding.** The Functions host reads queue messages as base64 by default (host.json
  ``messageEncoding``); the storage SDK sends raw text unless told otherwise — messages sent raw end up in the
  poison queue (style-anchors §8). :class:`QueueSender` therefore always uses ``TextBase64EncodePolicy``.
  :class:`QueueBrowser` reads without a decode policy and decodes itself, so a message that was *not* base64
  (the classic poison cause) is still readable and can be moved back correctly encoded.
* **Tables.** :class:`TableStore` maps the SDK's exceptions to ours (not found, already exists, etag
  mismatch), creates its table once per process, and refuses values beyond Azure Table limits with a clear
  :class:`EntityTooLargeError` (see :func:`split_text` to store long text across properties).
* **Lifetime.** One :class:`StorageAccount` per process/event loop; it owns the service clients (one
  connection pool each) and, when it created it, the credential. ``await account.close()`` at shutdown.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import json
import logging
import math
import os
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import quote, unquote

from azure.core import MatchConditions
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import EdmType, EntityProperty, UpdateMode
from azure.data.tables.aio import TableClient, TableServiceClient
from azure.storage.queue import TextBase64EncodePolicy
from azure.storage.queue.aio import QueueClient, QueueServiceClient

from core.names import POISON_SUFFIX, table_name

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential

    from core.config import Settings

__all__ = [
    "MAX_ENTITY_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_PROPERTY_BYTES",
    "Entity",
    "EntityAlreadyExistsError",
    "EntityNotFoundError",
    "EntityTooLargeError",
    "EtagMismatchError",
    "InvalidKeyError",
    "MessageTooLargeError",
    "QueueBrowser",
    "QueueItem",
    "QueueSendError",
    "QueueSender",
    "StorageAccount",
    "StorageError",
    "TableStore",
    "decode_key",
    "encode_key",
    "entity_size",
    "hash_key",
    "join_text",
    "split_text",
    "validate_entity",
]

_log = logging.getLogger(__name__)

# Azure Table limits (learn.microsoft.com "Understanding the Table service data model").
MAX_PROPERTY_BYTES: Final = 64 * 1024  # a String (UTF-16) or Binary property
MAX_ENTITY_BYTES: Final = 1024 * 1024  # the whole entity
MAX_KEY_CHARS: Final = 1024  # PartitionKey / RowKey
# Entity group transactions: at most 100 operations on one partition, a payload of at most 4 MiB.
MAX_TRANSACTION_OPS: Final = 100
MAX_TRANSACTION_BYTES: Final = 4 * 1024 * 1024 - 64 * 1024  # headroom for the multipart framing
MAX_CUSTOM_PROPERTIES: Final = 252  # 255 including PartitionKey, RowKey, Timestamp
# Azure Queue limit: 64 KiB per message *after* base64, i.e. 48 KiB of UTF-8 text.
MAX_MESSAGE_BYTES: Final = 64 * 1024
MAX_VISIBILITY_DELAY_S: Final = 7 * 24 * 3600

# Characters Azure Tables forbids in PartitionKey/RowKey.
_FORBIDDEN_KEY_CHARS: Final = frozenset("/\\#?") | frozenset(chr(c) for c in (*range(0x20), *range(0x7F, 0xA0)))


_PROXY_VARIABLES: Final = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def _transport_options() -> dict[str, Any]:
    """The service clients' transport. azure-core's aiohttp transport trusts the environment by default, and aiohttp
    then looks up proxy variables and reads ``~/.netrc`` (in a worker thread) for *every* request: about 1 ms of CPU
    per storage call, a third of its cost (measured, docs/proof.md "router CPU"). With no proxy variable set there
    is nothing to find, so the lookup is switched off; with one set, the SDK default (honour it) stays."""
    if any(os.environ.get(name) or os.environ.get(name.lower()) for name in _PROXY_VARIABLES):
        return {}
    from azure.core.pipeline.transport import AioHttpTransport

    return {"transport": AioHttpTransport(use_env_settings=False)}


# ---------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------


class StorageError(Exception):
    """Base of the storage adapters' errors (the SDK's original error is chained as ``__cause__``)."""


class EntityNotFoundError(StorageError, KeyError):
    """No entity with that PartitionKey/RowKey (or the table is missing)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "entity not found"


class EntityAlreadyExistsError(StorageError):
    """An insert found the key taken."""


class EtagMismatchError(StorageError):
    """HTTP 412: the entity changed since the ETag given was read (optimistic concurrency lost)."""


class EntityTooLargeError(StorageError, ValueError):
    """A value or the whole entity exceeds Azure Table limits (64 KiB per property, 1 MiB per entity)."""


class InvalidKeyError(StorageError, ValueError):
    """A PartitionKey/RowKey contains a forbidden character or is too long (see :func:`encode_key`)."""


class MessageTooLargeError(StorageError, ValueError):
    """A queue message exceeds 64 KiB once base64-encoded."""


class QueueSendError(StorageError):
    """Some messages of a ``send_many`` failed; ``failed`` maps input index -> exception."""

    def __init__(self, failed: Mapping[int, BaseException], total: int) -> None:
        first = next(iter(failed.values()))
        super().__init__(f"{len(failed)} of {total} queue messages failed to send (first: {first!r})")
        self.failed = dict(failed)


# ---------------------------------------------------------------------------------------------------------
# pure helpers: keys and sizes
# ---------------------------------------------------------------------------------------------------------


def encode_key(value: str) -> str:
    """A reversible PartitionKey/RowKey for arbitrary text: ``%`` and forbidden characters percent-encoded.

    Message-IDs, addresses and folder ids may contain ``/`` or ``#``. Raises :class:`InvalidKeyError` when the
    result exceeds 1 KiB — use :func:`hash_key` for unbounded input.
    """
    # UTF-8 percent-encoding (as in URLs) so urllib.parse.unquote / decode_key reverses it exactly.
    out = "".join(quote(ch, safe="") if ch in _FORBIDDEN_KEY_CHARS or ch == "%" else ch for ch in value)
    if len(out) > MAX_KEY_CHARS:
        raise InvalidKeyError(f"key of {len(out)} characters exceeds {MAX_KEY_CHARS}; hash it instead")
    return out


def decode_key(key: str) -> str:
    """The original text of a key made by :func:`encode_key`."""
    return unquote(key)


def hash_key(value: str) -> str:
    """A fixed-length key (hex SHA-256 of the UTF-8 text) for unbounded values such as Message-IDs."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def inverted_time_key(at: dt.datetime) -> str:
    """A RowKey prefix that sorts newest first: 13 digits of (10^13 - Unix milliseconds)."""
    return f"{10**13 - int(at.timestamp() * 1000):013d}"


def day_partitions(since: dt.datetime, until: dt.datetime, prefix: str) -> list[str]:
    """``<prefix><YYYYMMDD>`` for every UTC day from ``until`` back to ``since`` (newest first)."""
    day, first = until.astimezone(dt.UTC).date(), since.astimezone(dt.UTC).date()
    out: list[str] = []
    while day >= first:
        out.append(f"{prefix}{day:%Y%m%d}")
        day -= dt.timedelta(days=1)
    return out


def _utf16_units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _value_size(value: object) -> int:
    """Bytes a property value takes, per the service's documented entity-size formula."""
    if isinstance(value, EntityProperty):
        value = value.value
    if value is None:
        return 0
    if isinstance(value, bool):
        return 1
    if isinstance(value, int | float | dt.datetime):
        return 8
    if isinstance(value, uuid.UUID):
        return 16
    if isinstance(value, bytes | bytearray):
        return 4 + len(value)
    return 4 + 2 * _utf16_units(str(value))


def entity_size(entity: Mapping[str, Any]) -> int:
    """Approximate stored size: 4 + keys + Σ(8 + 2·len(name) + value size), as documented by Azure."""
    size = 4 + 2 * _utf16_units(str(entity.get("PartitionKey", ""))) + 2 * _utf16_units(str(entity.get("RowKey", "")))
    for name, value in entity.items():
        if name in ("PartitionKey", "RowKey"):
            continue
        size += 8 + 2 * len(name) + _value_size(value)
    return size


def validate_entity(entity: Mapping[str, Any]) -> None:
    """Raise :class:`InvalidKeyError` / :class:`EntityTooLargeError` before the service would reject it."""
    for key_name in ("PartitionKey", "RowKey"):
        key = entity.get(key_name)
        if not isinstance(key, str):
            raise InvalidKeyError(f"{key_name} must be a string, got {type(key).__name__}")
        if len(key) > MAX_KEY_CHARS:
            raise InvalidKeyError(f"{key_name} of {len(key)} characters exceeds {MAX_KEY_CHARS}")
        bad = sorted({repr(ch) for ch in key if ch in _FORBIDDEN_KEY_CHARS})
        if bad:
            raise InvalidKeyError(f"{key_name} contains forbidden characters {', '.join(bad)}; use encode_key()")
    custom = [n for n in entity if n not in ("PartitionKey", "RowKey", "Timestamp")]
    if len(custom) > MAX_CUSTOM_PROPERTIES:
        raise EntityTooLargeError(f"{len(custom)} properties exceed the limit of {MAX_CUSTOM_PROPERTIES}")
    for name in custom:
        value = entity[name]
        raw = value.value if isinstance(value, EntityProperty) else value
        if isinstance(raw, str) and 2 * _utf16_units(raw) > MAX_PROPERTY_BYTES:
            raise EntityTooLargeError(
                f"property {name!r} is {2 * _utf16_units(raw)} bytes as UTF-16 (limit {MAX_PROPERTY_BYTES}); "
                "use split_text()"
            )
        if isinstance(raw, bytes | bytearray) and len(raw) > MAX_PROPERTY_BYTES:
            raise EntityTooLargeError(f"property {name!r} is {len(raw)} bytes (limit {MAX_PROPERTY_BYTES})")
    size = entity_size(entity)
    if size > MAX_ENTITY_BYTES:
        raise EntityTooLargeError(f"entity is about {size} bytes (limit {MAX_ENTITY_BYTES})")


_CHUNK_UNITS: Final = MAX_PROPERTY_BYTES // 2 - 16  # UTF-16 code units per part, a little headroom


def split_text(name: str, text: str, *, max_units: int = _CHUNK_UNITS) -> dict[str, Any]:
    """Spread ``text`` over ``name``, ``name__1``, ``name__2``… (each within the 64 KiB property limit) plus
    ``name__parts`` = the count, so :func:`join_text` never picks up stale parts of a longer earlier value.

    Never splits a surrogate pair. The whole entity must still fit in 1 MiB (validated on write).
    """
    if max_units < 2:
        raise ValueError("max_units must be >= 2")
    parts: list[str] = []
    current: list[str] = []
    units = 0
    for ch in text:
        width = 2 if ord(ch) > 0xFFFF else 1
        if units + width > max_units:
            parts.append("".join(current))
            current, units = [], 0
        current.append(ch)
        units += width
    parts.append("".join(current))
    out: dict[str, Any] = {name: parts[0], f"{name}__parts": len(parts)}
    for n, part in enumerate(parts[1:], start=1):
        out[f"{name}__{n}"] = part
    return out


def join_text(entity: Mapping[str, Any], name: str) -> str:
    """Reassemble a value written by :func:`split_text` (or a plain single property)."""
    count = int(entity.get(f"{name}__parts", 1) or 1)
    first = entity.get(name, "")
    return str(first or "") + "".join(str(entity.get(f"{name}__{n}", "")) for n in range(1, count))


# ---------------------------------------------------------------------------------------------------------
# account
# ---------------------------------------------------------------------------------------------------------

# (endpoint, resource) pairs already created in this process: creation is attempted once, not per call.
_ENSURED: set[tuple[str, str]] = set()


class StorageAccount:
    """The storage account: lazily-built table and queue service clients sharing one credential."""

    def __init__(
        self,
        *,
        connection_string: str | None = None,
        table_endpoint: str | None = None,
        queue_endpoint: str | None = None,
        credential: AsyncTokenCredential | None = None,
        owns_credential: bool = False,
        table_prefix: str = "emailrouter",
    ) -> None:
        if not connection_string and not (table_endpoint or queue_endpoint):
            raise ValueError("give a connection string or service endpoints")
        if not connection_string and credential is None:
            raise ValueError("identity-based endpoints need a credential")
        self._conn = connection_string
        self._table_endpoint = table_endpoint
        self._queue_endpoint = queue_endpoint
        self._credential = credential
        self._owns_credential = owns_credential
        self.table_prefix = table_prefix
        self._tables: TableServiceClient | None = None
        self._queues: QueueServiceClient | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> StorageAccount:
        """As the Functions host does: the connection string if set, else the identity-based endpoints with a
        managed identity (``__clientId`` = user-assigned) or the default credential chain."""
        settings.require_storage()
        prefix = settings.table_prefix
        if settings.storage_connection_string:
            return cls(connection_string=settings.storage_connection_string, table_prefix=prefix)
        # Imported here: azure.identity is only needed in identity mode and costs import time.
        from azure.identity.aio import DefaultAzureCredential, ManagedIdentityCredential

        credential: AsyncTokenCredential
        if settings.storage_client_id:
            credential = ManagedIdentityCredential(client_id=settings.storage_client_id)
        else:
            credential = DefaultAzureCredential()
        return cls(
            table_endpoint=settings.storage_table_uri,
            queue_endpoint=settings.storage_queue_uri,
            credential=credential,
            owns_credential=True,
            table_prefix=prefix,
        )

    @property
    def table_service(self) -> TableServiceClient:
        if self._tables is None:
            if self._conn:
                self._tables = TableServiceClient.from_connection_string(self._conn, **_transport_options())
            else:
                if not self._table_endpoint or self._credential is None:
                    raise ValueError("no table endpoint configured (AzureWebJobsStorage__tableServiceUri)")
                self._tables = TableServiceClient(self._table_endpoint, credential=self._credential,
                                                  **_transport_options())
        return self._tables

    @property
    def queue_service(self) -> QueueServiceClient:
        if self._queues is None:
            if self._conn:
                self._queues = QueueServiceClient.from_connection_string(self._conn, **_transport_options())
            else:
                if not self._queue_endpoint or self._credential is None:
                    raise ValueError("no queue endpoint configured (AzureWebJobsStorage__queueServiceUri)")
                self._queues = QueueServiceClient(self._queue_endpoint, credential=self._credential,
                                                  **_transport_options())
        return self._queues

    def table(self, logical_name: str) -> TableStore:
        """The store for a logical table (``core.names.*_TABLE``); the real name carries ``TABLE_PREFIX``."""
        return TableStore(self, table_name(self.table_prefix, logical_name))

    def queue_sender(self, queue_name: str, *, max_concurrency: int = 16) -> QueueSender:
        return QueueSender(self, queue_name, max_concurrency=max_concurrency)

    def queue_browser(self, queue_name: str) -> QueueBrowser:
        return QueueBrowser(self, queue_name)

    async def close(self) -> None:
        if self._tables is not None:
            await self._tables.close()
            self._tables = None
        if self._queues is not None:
            await self._queues.close()
            self._queues = None
        if self._owns_credential and self._credential is not None:
            await self._credential.close()

    async def __aenter__(self) -> StorageAccount:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


# ---------------------------------------------------------------------------------------------------------
# queues
# ---------------------------------------------------------------------------------------------------------


def _message_text(message: str | Mapping[str, Any]) -> str:
    if isinstance(message, str):
        return message
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False, default=str)


def _check_message_size(text: str) -> None:
    encoded = 4 * math.ceil(len(text.encode("utf-8")) / 3)
    if encoded > MAX_MESSAGE_BYTES:
        raise MessageTooLargeError(
            f"queue message is {encoded} bytes as base64 (limit {MAX_MESSAGE_BYTES}); enqueue a reference instead"
        )


def _delay_seconds(delay: float | dt.timedelta | None) -> int | None:
    if delay is None:
        return None
    seconds = delay.total_seconds() if isinstance(delay, dt.timedelta) else float(delay)
    if seconds < 0:
        raise ValueError("visibility delay must be >= 0")
    # Whole seconds only (the service's unit); round up so "not before N s" holds.
    return min(MAX_VISIBILITY_DELAY_S, math.ceil(seconds))


class QueueSender:
    """Sends work items to one queue, base64-encoded the way the Functions host reads them."""

    def __init__(self, account: StorageAccount, queue_name: str, *, max_concurrency: int = 16) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.queue_name = queue_name
        self._max_concurrency = max_concurrency
        self._client: QueueClient = account.queue_service.get_queue_client(
            queue_name, message_encode_policy=TextBase64EncodePolicy()
        )

    async def ensure_queue(self) -> None:
        """Create the queue if missing; attempted once per process."""
        key = (self._client.url, "")
        if key in _ENSURED:
            return
        try:
            await self._client.create_queue()
        except ResourceExistsError:
            pass
        _ENSURED.add(key)

    async def send(
        self,
        message: str | Mapping[str, Any],
        *,
        visibility_delay: float | dt.timedelta | None = None,
        time_to_live: int | None = None,
    ) -> str:
        """Enqueue one message (text, or a mapping sent as compact JSON). Returns the message id.

        ``visibility_delay`` hides the message for that long (whole seconds, ≤ 7 days): the way pipelines
        wait out a long ``Retry-After`` without holding a worker. ``time_to_live=-1`` = never expires.
        """
        text = _message_text(message)
        _check_message_size(text)
        await self.ensure_queue()
        delay = _delay_seconds(visibility_delay)
        try:
            sent = await self._client.send_message(text, visibility_timeout=delay, time_to_live=time_to_live)
        except ResourceNotFoundError:
            # Deleted since we created it (e.g. an admin reset): create again, once, and resend.
            _ENSURED.discard((self._client.url, ""))
            await self.ensure_queue()
            sent = await self._client.send_message(text, visibility_timeout=delay, time_to_live=time_to_live)
        return str(sent.id)

    async def send_many(
        self,
        messages: Iterable[str | Mapping[str, Any]],
        *,
        visibility_delay: float | dt.timedelta | None = None,
    ) -> list[str]:
        """Enqueue many messages concurrently (at most ``max_concurrency`` in flight); ids in input order.

        Every message is attempted; if any failed, :class:`QueueSendError` names them after all finished, so
        a webhook can answer 5xx and let the sender redeliver (work items are idempotent).
        """
        items = list(messages)
        for item in items:  # refuse the whole call before sending anything
            _check_message_size(_message_text(item))
        if not items:
            return []
        await self.ensure_queue()
        gate = asyncio.Semaphore(self._max_concurrency)

        async def one(item: str | Mapping[str, Any]) -> str:
            async with gate:
                return await self.send(item, visibility_delay=visibility_delay)

        results = await asyncio.gather(*(one(i) for i in items), return_exceptions=True)
        failed = {n: r for n, r in enumerate(results) if isinstance(r, BaseException)}
        if failed:
            raise QueueSendError(failed, len(items))
        return [str(r) for r in results]

    async def close(self) -> None:
        await self._client.close()


@dataclass(frozen=True)
class QueueItem:
    """A message read from a queue. ``encoding`` says how ``content`` was stored: ``base64`` (as the Functions
    host expects) or ``raw`` (not valid base64 text — e.g. sent without the encode policy)."""

    id: str
    content: str
    encoding: Literal["base64", "raw"]
    dequeue_count: int | None
    inserted_on: dt.datetime | None
    expires_on: dt.datetime | None
    pop_receipt: str | None = None  # set by receive(); needed to delete

    def json(self) -> Any:
        return json.loads(self.content)


def _decode_content(raw: str | None) -> tuple[str, Literal["base64", "raw"]]:
    text = raw or ""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True).decode("utf-8"), "base64"
    except (binascii.Error, UnicodeError, ValueError):
        return text, "raw"


class QueueBrowser:
    """Inspect and repair a queue, typically ``<name>-poison``: peek, receive, delete, move back."""

    def __init__(self, account: StorageAccount, queue_name: str) -> None:
        self.queue_name = queue_name
        self._account = account
        # No decode policy (the SDK default passes content through): we decode ourselves so non-base64
        # messages are readable instead of an error.
        self._client: QueueClient = account.queue_service.get_queue_client(queue_name)

    def _item(self, msg: Any, with_receipt: bool) -> QueueItem:
        content, encoding = _decode_content(msg.content)
        return QueueItem(
            id=str(msg.id),
            content=content,
            encoding=encoding,
            dequeue_count=msg.dequeue_count,
            inserted_on=msg.inserted_on,
            expires_on=msg.expires_on,
            pop_receipt=msg.pop_receipt if with_receipt else None,
        )

    async def peek(self, max_messages: int = 32) -> list[QueueItem]:
        """Up to 32 visible messages, without changing them. An absent queue is empty."""
        try:
            messages = await self._client.peek_messages(max_messages=min(32, max_messages))
        except ResourceNotFoundError:
            return []
        return [self._item(m, with_receipt=False) for m in messages]

    async def receive(self, max_messages: int = 32, *, visibility_timeout: int = 60) -> list[QueueItem]:
        """Take up to ``max_messages`` messages for ``visibility_timeout`` seconds (then they reappear unless
        deleted or moved)."""
        out: list[QueueItem] = []
        try:
            async for msg in self._client.receive_messages(
                messages_per_page=min(32, max_messages), max_messages=max_messages,
                visibility_timeout=visibility_timeout,
            ):
                out.append(self._item(msg, with_receipt=True))
        except ResourceNotFoundError:
            return []
        return out

    async def delete(self, item: QueueItem) -> None:
        """Delete a received message. Already gone counts as deleted."""
        if item.pop_receipt is None:
            raise ValueError("only received messages (with a pop receipt) can be deleted")
        try:
            await self._client.delete_message(item.id, item.pop_receipt)
        except ResourceNotFoundError:
            return

    def origin_queue(self) -> str:
        if not self.queue_name.endswith(POISON_SUFFIX):
            raise ValueError(f"{self.queue_name!r} is not a poison queue; name the target queue")
        return self.queue_name[: -len(POISON_SUFFIX)]

    async def move_back(self, item: QueueItem, *, to_queue: str | None = None) -> str:
        """Re-send ``item`` (base64, as the host expects — which also repairs a raw message) to ``to_queue``
        (default: the queue this poison queue belongs to), then delete it here. Returns the new message id.

        Send first, delete second: a crash in between leaves a duplicate work item, never a lost one.
        """
        sender = QueueSender(self._account, to_queue or self.origin_queue())
        try:
            new_id = await sender.send(item.content)
        finally:
            await sender.close()
        await self.delete(item)
        return new_id

    async def close(self) -> None:
        await self._client.close()


# ---------------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------------


class Entity(dict[str, Any]):
    """A table entity as a plain dict (``PartitionKey``, ``RowKey`` and properties) plus its ``etag`` and
    ``timestamp`` (service metadata, kept off the dict so a read entity can be written back as is)."""

    def __init__(
        self, values: Mapping[str, Any], *, etag: str | None = None, timestamp: dt.datetime | None = None
    ) -> None:
        super().__init__(values)
        self.etag = etag
        self.timestamp = timestamp


def _to_entity(raw: Any) -> Entity:
    values = {k: (v.value if isinstance(v, EntityProperty) else v) for k, v in raw.items()}
    metadata = getattr(raw, "metadata", {}) or {}
    return Entity(values, etag=metadata.get("etag"), timestamp=metadata.get("timestamp"))


def _for_write(entity: Mapping[str, Any]) -> dict[str, Any]:
    validate_entity(entity)
    out: dict[str, Any] = {}
    for name, value in entity.items():
        if name == "Timestamp":
            continue  # service-owned
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**31) <= value < 2**31:
            value = EntityProperty(value, EdmType.INT64)  # the SDK sends plain ints as Int32 only
        out[name] = value
    return out


def _etag_of(metadata: Mapping[str, Any]) -> str:
    return str(metadata.get("etag", ""))


def _is_412(exc: HttpResponseError) -> bool:
    return isinstance(exc, ResourceModifiedError) or exc.status_code == 412


class TableStore:
    """Generic entity store over one Azure Table (Azure SDK verbs; errors raised, never ``None``)."""

    def __init__(self, account: StorageAccount, name: str) -> None:
        self.name = name
        self._client: TableClient = account.table_service.get_table_client(name)
        self._service = account.table_service

    async def ensure_table(self) -> None:
        """Create the table if missing; attempted once per process."""
        key = (self._service.url, self.name)
        if key in _ENSURED:
            return
        await self._service.create_table_if_not_exists(self.name)
        _ENSURED.add(key)

    async def get(self, partition_key: str, row_key: str, *, select: Sequence[str] | None = None) -> Entity:
        """The entity, or :class:`EntityNotFoundError`."""
        await self.ensure_table()
        try:
            raw = await self._client.get_entity(partition_key, row_key, select=list(select) if select else None)
        except ResourceNotFoundError as exc:
            raise EntityNotFoundError(f"{self.name}: no entity ({partition_key!r}, {row_key!r})") from exc
        return _to_entity(raw)

    async def upsert(self, entity: Mapping[str, Any], *, mode: Literal["merge", "replace"] = "merge") -> str:
        """Insert or update unconditionally (merge keeps other properties; replace drops them). New ETag."""
        await self.ensure_table()
        meta = await self._client.upsert_entity(_for_write(entity), mode=_mode(mode))
        return _etag_of(meta)

    async def upsert_many(self, entities: Iterable[Mapping[str, Any]], *,
                          mode: Literal["merge", "replace"] = "merge") -> int:
        """Upsert many entities in entity group transactions: one request per partition and up to
        ``MAX_TRANSACTION_OPS`` entities (and ``MAX_TRANSACTION_BYTES``) instead of one request each. Two writes of
        one key are folded first (a transaction may name an entity only once): merges combine in order, a replace
        keeps the last. Each transaction is atomic; a failed one raises (the ones before it are written). Returns the
        number of entities written."""
        folded: dict[tuple[str, str], dict[str, Any]] = {}
        for entity in entities:
            row = _for_write(entity)
            key = (row["PartitionKey"], row["RowKey"])
            folded[key] = {**folded[key], **row} if mode == "merge" and key in folded else row
        if not folded:
            return 0
        await self.ensure_table()
        by_partition: dict[str, list[dict[str, Any]]] = {}
        for (partition, _), row in folded.items():
            by_partition.setdefault(partition, []).append(row)
        update = _mode(mode)
        for rows in by_partition.values():
            chunk: list[dict[str, Any]] = []
            size = 0
            for row in rows:
                row_size = entity_size(row)
                if chunk and (len(chunk) >= MAX_TRANSACTION_OPS or size + row_size > MAX_TRANSACTION_BYTES):
                    await self._transact(chunk, update)
                    chunk, size = [], 0
                chunk.append(row)
                size += row_size
            await self._transact(chunk, update)
        return len(folded)

    async def _transact(self, rows: Sequence[dict[str, Any]], mode: UpdateMode) -> None:
        if len(rows) == 1:  # a transaction of one is a plain upsert with extra framing
            await self._client.upsert_entity(rows[0], mode=mode)
            return
        await self._client.submit_transaction([("upsert", row, {"mode": mode}) for row in rows])

    async def insert(self, entity: Mapping[str, Any]) -> str:
        """Insert; :class:`EntityAlreadyExistsError` if the key is taken. Returns the ETag."""
        await self.ensure_table()
        try:
            meta = await self._client.create_entity(_for_write(entity))
        except ResourceExistsError as exc:
            raise EntityAlreadyExistsError(
                f"{self.name}: entity ({entity.get('PartitionKey')!r}, {entity.get('RowKey')!r}) exists"
            ) from exc
        return _etag_of(meta)

    async def insert_if_absent(self, entity: Mapping[str, Any]) -> bool:
        """Insert unless present: True = inserted now, False = it was already there (not an error: the
        processed-ledger and claim records use this as their "first writer wins" primitive)."""
        try:
            await self.insert(entity)
        except EntityAlreadyExistsError:
            return False
        return True

    async def update(
        self,
        entity: Mapping[str, Any],
        *,
        etag: str | None = None,
        mode: Literal["merge", "replace"] = "merge",
    ) -> str:
        """Update an existing entity. With ``etag``: only if unchanged since (else :class:`EtagMismatchError`);
        without: unconditionally. Missing → :class:`EntityNotFoundError`. Returns the new ETag."""
        await self.ensure_table()
        kwargs: dict[str, Any] = {}
        if etag is not None:
            kwargs = {"etag": etag, "match_condition": MatchConditions.IfNotModified}
        try:
            meta = await self._client.update_entity(_for_write(entity), mode=_mode(mode), **kwargs)
        except ResourceNotFoundError as exc:
            raise EntityNotFoundError(
                f"{self.name}: no entity ({entity.get('PartitionKey')!r}, {entity.get('RowKey')!r})"
            ) from exc
        except HttpResponseError as exc:
            if _is_412(exc):
                raise EtagMismatchError(f"{self.name}: entity changed since etag {etag}") from exc
            raise
        return _etag_of(meta)

    async def delete(self, partition_key: str, row_key: str, *, etag: str | None = None) -> None:
        """Delete; succeeds if already gone. With ``etag``: only if unchanged (else :class:`EtagMismatchError`)."""
        await self.ensure_table()
        kwargs: dict[str, Any] = {}
        if etag is not None:
            kwargs = {"etag": etag, "match_condition": MatchConditions.IfNotModified}
        try:
            await self._client.delete_entity(partition_key, row_key, **kwargs)
        except ResourceNotFoundError:
            return
        except HttpResponseError as exc:
            if _is_412(exc):
                raise EtagMismatchError(f"{self.name}: entity changed since etag {etag}") from exc
            raise

    async def query(
        self,
        filter: str,
        *,
        parameters: Mapping[str, Any] | None = None,
        select: Sequence[str] | None = None,
        page_size: int | None = None,
    ) -> AsyncIterator[Entity]:
        """Entities matching an OData filter. Put values in ``parameters`` (``"PartitionKey eq @pk"``) so the
        SDK quotes them — never format user data into the filter string."""
        await self.ensure_table()
        pages = self._client.query_entities(
            filter, parameters=dict(parameters or {}), select=list(select) if select else None,
            results_per_page=page_size,
        )
        async for raw in pages:
            yield _to_entity(raw)

    async def list_partition(self, partition_key: str) -> AsyncIterator[Entity]:
        async for entity in self.query("PartitionKey eq @pk", parameters={"pk": partition_key}):
            yield entity

    async def first_partition(self, lo: str, hi: str) -> str | None:
        """The lowest PartitionKey in ``[lo, hi)``: entities are kept in PartitionKey order, so this is one short
        range read (retention finds its oldest day partition this way, without a scan)."""
        async with contextlib.aclosing(self.query("PartitionKey ge @lo and PartitionKey lt @hi",
                                                  parameters={"lo": lo, "hi": hi}, select=["PartitionKey"],
                                                  page_size=1)) as found:
            async for entity in found:
                return str(entity["PartitionKey"])
        return None

    async def delete_where(self, filter: str, *, parameters: Mapping[str, Any] | None = None, limit: int
                           ) -> tuple[int, bool]:
        """Delete at most ``limit`` entities matching ``filter`` (only their keys are read). Returns (deleted, more
        match): the bounded unit of a clean-up that continues next run."""
        deleted = 0
        async with contextlib.aclosing(self.query(filter, parameters=parameters, select=["PartitionKey", "RowKey"],
                                                  page_size=max(1, min(1000, limit + 1)))) as found:
            async for entity in found:
                if deleted >= limit:
                    return deleted, True
                await self.delete(str(entity["PartitionKey"]), str(entity["RowKey"]))
                deleted += 1
        return deleted, False

    async def close(self) -> None:
        await self._client.close()


def _mode(mode: str) -> UpdateMode:
    if mode == "merge":
        return UpdateMode.MERGE
    if mode == "replace":
        return UpdateMode.REPLACE
    raise ValueError(f"mode must be 'merge' or 'replace', got {mode!r}")
