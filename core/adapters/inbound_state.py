"""Azure Table state of the inbound pipeline: processed ledger, decision records, delta links, mailbox status,
poison log. Implements the ports of ``core.services.inbound`` and ``core.services.delta``.

Keys: mailbox addresses and folder ids go through ``encode_key`` (reversible); Graph message ids are hashed
(``hash_key``: bounded, and Graph ids contain ``/`` and ``+``); the readable id is kept as a property.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from core.names import (
    DECISIONS_TABLE,
    DELTA_STATE_TABLE,
    MAILBOX_STATUS_TABLE,
    POISON_LOG_TABLE,
    PROCESSED_TABLE,
)
from core.services.delta import DeltaCursor
from core.services.inbound import LedgerEntry, LedgerOutcome

from .storage import EntityNotFoundError, StorageAccount, TableStore, encode_key, hash_key, join_text, split_text

if TYPE_CHECKING:
    from core.bootstrap import Container

__all__ = [
    "InboundState",
    "TableDecisionLog",
    "TableDeltaState",
    "TableLedger",
    "TableMailboxStatus",
    "TablePoisonLog",
]

_MAX_RECORD_CHARS = 400_000  # a decision record above this is cut (the entity limit is 1 MiB)


def _mailbox_key(mailbox: str) -> str:
    return encode_key(mailbox.strip().lower())


def _now() -> datetime:
    return datetime.now(UTC)


class TableLedger:
    """``ProcessedLedger``: PartitionKey = mailbox, RowKey = hash of the Graph message id."""

    def __init__(self, table: TableStore) -> None:
        self._table = table

    async def get(self, mailbox: str, graph_id: str) -> LedgerEntry | None:
        try:
            e = await self._table.get(_mailbox_key(mailbox), hash_key(graph_id))
        except EntityNotFoundError:
            return None
        try:
            outcome = LedgerOutcome(str(e.get("Outcome", "")))
        except ValueError:
            return None
        return LedgerEntry(mailbox=mailbox, graph_id=graph_id, outcome=outcome,
                           activity_id=str(e.get("ActivityId", "")),
                           internet_message_id=str(e.get("InternetMessageId", "")),
                           attempts=int(e.get("Attempts", 0) or 0), reason=str(e.get("Reason", "")),
                           at=e.get("At"))

    async def put(self, entry: LedgerEntry) -> None:
        await self._table.upsert({
            "PartitionKey": _mailbox_key(entry.mailbox), "RowKey": hash_key(entry.graph_id),
            "GraphId": entry.graph_id[:1024], "Outcome": entry.outcome.value, "ActivityId": entry.activity_id,
            "InternetMessageId": entry.internet_message_id[:1024], "Attempts": entry.attempts,
            "Reason": entry.reason[:1024], "At": entry.at or _now(),
        }, mode="replace")


class TableDecisionLog:
    """``DecisionLog``: the latest decision record per (mailbox, message); searchable by InternetMessageId."""

    def __init__(self, table: TableStore) -> None:
        self._table = table

    async def record(self, mailbox: str, graph_id: str, record: Mapping[str, Any]) -> None:
        text = json.dumps(record, default=str, separators=(",", ":"))[:_MAX_RECORD_CHARS]
        await self._table.upsert({
            "PartitionKey": _mailbox_key(mailbox), "RowKey": hash_key(graph_id), "GraphId": graph_id[:1024],
            "InternetMessageId": str(record.get("internetMessageId") or "")[:1024],
            "ActivityId": str(record.get("activityId") or ""), "Outcome": str(record.get("outcome", ""))[:256],
            "At": _now(), **split_text("Record", text),
        }, mode="replace")

    async def get(self, mailbox: str, graph_id: str) -> dict[str, Any] | None:
        try:
            e = await self._table.get(_mailbox_key(mailbox), hash_key(graph_id))
        except EntityNotFoundError:
            return None
        return dict(json.loads(join_text(e, "Record")))

    async def find_by_internet_message_id(self, internet_message_id: str) -> list[dict[str, Any]]:
        """Every mailbox's record of one message (admin ``explain``; a scan, fine for an admin command)."""
        out: list[dict[str, Any]] = []
        async for e in self._table.query("InternetMessageId eq @mid", parameters={"mid": internet_message_id}):
            out.append(dict(json.loads(join_text(e, "Record"))))
        return out

    async def list_mailbox(self, mailbox: str) -> list[dict[str, Any]]:
        return [dict(json.loads(join_text(e, "Record")))
                async for e in self._table.list_partition(_mailbox_key(mailbox))]


class TableMailboxStatus:
    """``MailboxStatusLog``: merges ``Inbound*`` properties into the mailbox's status row (other pipelines and the
    settings sync keep their own properties in the same row)."""

    PARTITION = "mailbox"

    def __init__(self, table: TableStore) -> None:
        self._table = table

    async def record_failure(self, mailbox: str, *, code: str, reason: str, permanent: bool) -> None:
        await self._table.upsert({
            "PartitionKey": self.PARTITION, "RowKey": _mailbox_key(mailbox), "Mailbox": mailbox.lower(),
            "InboundLastErrorCode": code[:256], "InboundLastError": reason[:1024],
            "InboundLastErrorPermanent": permanent, "InboundLastErrorAt": _now(),
        }, mode="merge")

    async def record_sync(self, mailbox: str, *, ok: bool, detail: str = "") -> None:
        props: dict[str, Any] = {"PartitionKey": self.PARTITION, "RowKey": _mailbox_key(mailbox),
                                 "Mailbox": mailbox.lower()}
        if ok:
            props["InboundLastSyncAt"] = _now()
        else:
            props.update(InboundLastSyncError=detail[:1024], InboundLastSyncErrorAt=_now())
        await self._table.upsert(props, mode="merge")

    async def get(self, mailbox: str) -> dict[str, Any] | None:
        try:
            return dict(await self._table.get(self.PARTITION, _mailbox_key(mailbox)))
        except EntityNotFoundError:
            return None


class TablePoisonLog:
    """``PoisonLog``: why a message went to a poison queue (the admin CLI shows it next to the message)."""

    def __init__(self, table: TableStore) -> None:
        self._table = table

    async def record(self, *, queue: str, message: str, dequeue_count: int, reason: str) -> None:
        now = _now()
        # Newest first within the queue's partition: inverted ticks, then a random suffix against collisions.
        inverted = 10**13 - int(now.timestamp() * 1000)
        await self._table.upsert({
            "PartitionKey": queue, "RowKey": f"{inverted:013d}-{uuid.uuid4().hex[:8]}",
            "MessageHash": hash_key(message), "Message": message[:30_000], "DequeueCount": dequeue_count,
            "Reason": reason[:2048], "At": now,
        }, mode="replace")

    async def list(self, queue: str) -> list[dict[str, Any]]:
        return [dict(e) async for e in self._table.list_partition(queue)]


class TableDeltaState:
    """``DeltaStateStore``: per (mailbox, folder) the delta link of the current round and the high-water mark."""

    def __init__(self, table: TableStore) -> None:
        self._table = table

    async def get(self, mailbox: str, folder: str) -> DeltaCursor | None:
        try:
            e = await self._table.get(_mailbox_key(mailbox), encode_key(folder))
        except EntityNotFoundError:
            return None
        seen = e.get("InitialSeen")
        return DeltaCursor(mailbox=mailbox, folder=folder, link=join_text(e, "Link") or None,
                           high_water=e.get("HighWater"), round_started=e.get("RoundStarted"),
                           initial_seen=int(seen) if seen is not None else None,
                           initial_oldest=e.get("InitialOldest"))

    async def put(self, cursor: DeltaCursor) -> None:
        entity: dict[str, Any] = {
            "PartitionKey": _mailbox_key(cursor.mailbox), "RowKey": encode_key(cursor.folder), "At": _now(),
            **split_text("Link", cursor.link or ""),
        }
        if cursor.high_water is not None:
            entity["HighWater"] = cursor.high_water
        if cursor.round_started is not None:
            entity["RoundStarted"] = cursor.round_started
        if cursor.initial_seen is not None:
            entity["InitialSeen"] = cursor.initial_seen
        if cursor.initial_oldest is not None:
            entity["InitialOldest"] = cursor.initial_oldest
        await self._table.upsert(entity, mode="replace")

    async def delete(self, mailbox: str, folder: str) -> None:
        await self._table.delete(_mailbox_key(mailbox), encode_key(folder))


@dataclass(frozen=True)
class InboundState:
    ledger: TableLedger
    decisions: TableDecisionLog
    status: TableMailboxStatus
    poison: TablePoisonLog
    delta: TableDeltaState

    @classmethod
    def from_account(cls, account: StorageAccount) -> InboundState:
        return cls(
            ledger=TableLedger(account.table(PROCESSED_TABLE)),
            decisions=TableDecisionLog(account.table(DECISIONS_TABLE)),
            status=TableMailboxStatus(account.table(MAILBOX_STATUS_TABLE)),
            poison=TablePoisonLog(account.table(POISON_LOG_TABLE)),
            delta=TableDeltaState(account.table(DELTA_STATE_TABLE)),
        )

    @classmethod
    def for_container(cls, container: Container) -> InboundState:
        return cls.from_account(container.storage)
