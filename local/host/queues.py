"""Queue triggers and queue output bindings on Azure Storage (Azurite), with host.json semantics.

Listener loop (the WebJobs QueueListener, simplified to one instance):
- fetch up to ``batchSize`` messages, invisible for 10 minutes while they run (the host's value),
  renewed at half-time for long runs; a host crash therefore leaves them to reappear later;
- fetch again only when in-flight messages drop to ``newBatchThreshold`` or below; re-poll at once
  while messages keep coming, back off exponentially (100 ms doubling) up to ``maxPollingInterval``
  when the queue is empty; an output binding writing to a watched queue wakes its listener;
- success: delete. Failure: if ``dequeueCount >= maxDequeueCount`` copy the stored content (still
  encoded) to ``<queue>-poison`` (created if missing) and delete, else make the message visible again
  after ``visibilityTimeout``. A message dequeued more often than allowed (crashes) goes straight to poison;
- ``messageEncoding`` base64 (default) or none; a base64 message that does not decode fails its
  invocation (and so, eventually, lands in poison), like the real host's decoding failure.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import azure.functions as func
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.functions.queue import QueueMessage as FunctionsQueueMessage
from azure.storage.queue import QueueClient, QueueMessage

from .config import QueuesOptions
from .discovery import FunctionSpec, OutputSpec, QueueTriggerSpec
from .invoke import Invoker

__all__ = ["MessageDecodeError", "QueueListener", "QueueOutputWriter", "StorageClients", "connection_string_for"]

log = logging.getLogger("Host.Queues")

MIN_POLL = 0.1
POISON_SUFFIX = "-poison"


class MessageDecodeError(ValueError):
    pass


def connection_string_for(setting: str, environ: Mapping[str, str] | None = None) -> str:
    """The host looks up connection ``X`` as app setting ``X``, then ``AzureWebJobsX``."""
    env = os.environ if environ is None else environ
    for name in (setting, f"AzureWebJobs{setting}"):
        value = env.get(name)
        if value:
            return value
    raise ValueError(f"storage connection {setting!r}: app setting {setting!r} is not set")


class StorageClients:
    """One QueueClient per (connection, queue); queues created once, as the host does on first use."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._env = environ
        self._clients: dict[tuple[str, str], QueueClient] = {}
        self._created: set[tuple[str, str]] = set()

    def client(self, connection: str, queue: str) -> QueueClient:
        key = (connection, queue)
        if key not in self._clients:
            # No encode/decode policy: the host handles the encoding itself (base64 or none) so the
            # poison copy can carry the stored content unchanged.
            self._clients[key] = QueueClient.from_connection_string(connection_string_for(connection, self._env), queue)
        return self._clients[key]

    async def ensure_queue(self, connection: str, queue: str) -> QueueClient:
        client = self.client(connection, queue)
        if (connection, queue) not in self._created:
            try:
                await asyncio.to_thread(client.create_queue)
                log.info("Created queue '%s'", queue)
            except ResourceExistsError:
                pass
            self._created.add((connection, queue))
        return client

    def close(self) -> None:
        for c in self._clients.values():
            c.close()


def encode_message(value: str | bytes, encoding: str) -> str:
    data = value.encode("utf-8") if isinstance(value, str) else value
    if encoding == "base64":
        return base64.b64encode(data).decode("ascii")
    return data.decode("utf-8")


def decode_message(content: str, encoding: str) -> bytes:
    if encoding == "none":
        return content.encode("utf-8")
    try:
        return base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MessageDecodeError(
            "message content is not valid base64 (host.json messageEncoding is 'base64'; enqueue with "
            "TextBase64EncodePolicy or set messageEncoding to 'none')"
        ) from exc


def _flatten(value: Any) -> list[str | bytes]:
    """A queue output value -> message bodies: str/bytes/QueueMessage, or an iterable of them."""
    if isinstance(value, str | bytes):
        return [value]
    if isinstance(value, func.QueueMessage):
        return [value.get_body()]
    if isinstance(value, Iterable):
        items: list[str | bytes] = []
        for item in value:
            if isinstance(item, str | bytes):
                items.append(item)
            elif isinstance(item, func.QueueMessage):
                items.append(item.get_body())
            else:
                raise TypeError(f"invalid data type in output queue message list: {type(item).__name__}")
        return items
    raise TypeError(f"unsupported queue output type: {type(value).__name__}")


class QueueOutputWriter:
    def __init__(self, storage: StorageClients, options: QueuesOptions) -> None:
        self._storage = storage
        self._options = options
        self._watchers: dict[str, list[QueueListener]] = {}

    def watch(self, queue: str, listener: QueueListener) -> None:
        self._watchers.setdefault(queue, []).append(listener)

    async def write(self, out: OutputSpec, value: Any) -> None:
        assert out.queue_name is not None and out.connection is not None
        client = await self._storage.ensure_queue(out.connection, out.queue_name)
        for body in _flatten(value):
            await asyncio.to_thread(client.send_message, encode_message(body, self._options.message_encoding))
        # Like the host's SharedQueueWatcher: a listener on this queue polls now instead of backing off.
        for listener in self._watchers.get(out.queue_name, []):
            listener.wake()


@dataclass
class _Lease:
    message: QueueMessage
    pop_receipt: str


class QueueListener:
    def __init__(
        self,
        spec: FunctionSpec,
        storage: StorageClients,
        options: QueuesOptions,
        invoker: Invoker,
    ) -> None:
        assert isinstance(spec.trigger, QueueTriggerSpec)
        self.spec = spec
        self.trigger: QueueTriggerSpec = spec.trigger
        self._storage = storage
        self._options = options
        self._invoker = invoker
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._inflight: dict[asyncio.Task[None], _Lease] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._client: QueueClient | None = None

    @property
    def queue(self) -> str:
        return self.trigger.queue_name

    async def start(self) -> None:
        self._client = await self._storage.ensure_queue(self.trigger.connection, self.queue)
        self._loop_task = asyncio.create_task(self._poll_loop(), name=f"queue-listener:{self.spec.name}")

    def wake(self) -> None:
        self._wake.set()

    def stop_polling(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._slot_freed.set()

    async def drain(self, deadline: float) -> None:
        """Wait for in-flight messages until ``deadline`` (loop time); release the unfinished ones."""
        loop = asyncio.get_running_loop()
        if self._loop_task is not None:
            await asyncio.gather(self._loop_task, return_exceptions=True)
        pending = set(self._inflight)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=max(0.0, deadline - loop.time()))
        for task in pending:
            lease = self._inflight.pop(task, None)
            task.cancel()
            if lease is not None:
                # Visible again right away: another host instance (or the next local run) takes it.
                await self._set_visibility(lease, 0, quiet=True)
        if pending:
            log.warning("'%s': %d message(s) unfinished at shutdown were released", self.spec.name, len(pending))

    async def _poll_loop(self) -> None:
        assert self._client is not None
        delay = MIN_POLL
        while not self._stopping.is_set():
            while len(self._inflight) > self._options.new_batch_threshold and not self._stopping.is_set():
                self._slot_freed.clear()
                await self._slot_freed.wait()
            if self._stopping.is_set():
                break
            try:
                messages = await asyncio.to_thread(self._receive)
            except Exception as exc:  # storage hiccup: keep listening, like the host
                log.warning("'%s': polling queue '%s' failed: %s", self.spec.name, self.queue, type(exc).__name__)
                messages = []
            if messages:
                delay = MIN_POLL
                for msg in messages:
                    lease = _Lease(msg, msg.pop_receipt or "")
                    task = asyncio.create_task(self._process(lease), name=f"queue-message:{msg.id}")
                    self._inflight[task] = lease
                    task.add_done_callback(self._done)
                continue
            # Randomised exponential backoff, as the host's polling strategy, capped at maxPollingInterval.
            delay = min(self._options.max_polling_interval, delay * 2) * random.uniform(0.8, 1.0)
            delay = max(MIN_POLL, delay)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
                delay = MIN_POLL
            except TimeoutError:
                pass

    def _receive(self) -> list[QueueMessage]:
        assert self._client is not None
        free = self._options.batch_size
        pages = self._client.receive_messages(
            messages_per_page=free, max_messages=free, visibility_timeout=self._options.lease_seconds
        )
        return list(pages)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task, None)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("'%s': message handling crashed", self.spec.name, exc_info=task.exception())

    async def _process(self, lease: _Lease) -> None:
        msg = lease.message
        count = int(msg.dequeue_count or 1)
        if count > self._options.max_dequeue_count:
            # Dequeued more often than allowed without completing (e.g. the host crashed mid-run).
            await self._poison(lease)
            return
        renew = asyncio.create_task(self._renew(lease))
        try:
            succeeded = await self._invoke(lease, count)
        except Exception:
            # A host-side failure must not strand the message for 10 minutes: count it as a failed try.
            log.exception("'%s': handling message %s failed in the host", self.spec.name, msg.id)
            succeeded = False
        finally:
            renew.cancel()
            await asyncio.gather(renew, return_exceptions=True)
        if succeeded:
            await self._delete(lease)
        elif count >= self._options.max_dequeue_count:
            await self._poison(lease)
        else:
            await self._set_visibility(lease, int(self._options.visibility_timeout))

    async def _invoke(self, lease: _Lease, count: int) -> bool:
        msg = lease.message
        log_fn = logging.getLogger(f"Function.{self.spec.name}")
        try:
            body = decode_message(msg.content or "", self._options.message_encoding)
        except MessageDecodeError as exc:
            log_fn.error("Executed 'Functions.%s' (Failed, Id=-) binding error: %s", self.spec.name, exc)
            return False
        # The worker's converter builds azure.functions.queue.QueueMessage (it carries dequeue_count etc.).
        qm = FunctionsQueueMessage(
            id=msg.id,
            body=body,
            dequeue_count=count,
            expiration_time=msg.expires_on,
            insertion_time=msg.inserted_on,
            time_next_visible=msg.next_visible_on,
            pop_receipt=lease.pop_receipt,
        )
        result = await self._invoker.invoke(self.spec, qm, reason=f"New queue message detected on '{self.queue}'.")
        return result.succeeded

    async def _renew(self, lease: _Lease) -> None:
        while True:
            await asyncio.sleep(self._options.lease_seconds / 2)
            await self._set_visibility(lease, self._options.lease_seconds, quiet=True)

    async def _set_visibility(self, lease: _Lease, seconds: int, *, quiet: bool = False) -> None:
        assert self._client is not None
        try:
            updated = await asyncio.to_thread(
                self._client.update_message, lease.message.id, lease.pop_receipt, visibility_timeout=seconds
            )
            lease.pop_receipt = updated.pop_receipt or lease.pop_receipt
        except ResourceNotFoundError:
            if not quiet:
                log.warning("'%s': message %s vanished before it could be released", self.spec.name, lease.message.id)

    async def _delete(self, lease: _Lease) -> None:
        assert self._client is not None
        try:
            await asyncio.to_thread(self._client.delete_message, lease.message.id, lease.pop_receipt)
        except ResourceNotFoundError:
            # The lease expired and someone else took it: the host logs and moves on too.
            log.warning("'%s': message %s was gone at delete (lease lost)", self.spec.name, lease.message.id)

    async def _poison(self, lease: _Lease) -> None:
        poison_name = self.queue + POISON_SUFFIX
        log.warning(
            "Message has reached MaxDequeueCount of %d. Moving message to queue '%s'.",
            self._options.max_dequeue_count, poison_name,
        )
        poison = await self._storage.ensure_queue(self.trigger.connection, poison_name)
        # Stored content as-is (still encoded), so the poison queue's own trigger decodes it the same way.
        await asyncio.to_thread(poison.send_message, lease.message.content or "")
        await self._delete(lease)
