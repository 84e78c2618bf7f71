"""Azure Table state of the inbound pipeline: processed ledger, decision records, delta links, mailbox status,
poison log. Implements the ports of ``core.services.inbound`` and ``core.services.delta`` (records from
``core.domain.records``: adapters never import a service).

Keys: mailbox addresses and folder ids go through ``encode_key`` (reversible); Graph message ids are hashed
(``hash_key``: bounded, and Graph ids contain ``/`` and ``+``); the readable id is kept as a property.

Decision records (``Decisions``: PartitionKey = mailbox, RowKey = hash of the Graph id, the latest record per
message) are found through the ``DecisionIndex`` table, written with each record, so that no admin search scans
the whole record table:

* time rows: PartitionKey ``t<YYYYMMDD>`` (UTC day of the decision), RowKey = inverted milliseconds + a hash of
  (mailbox, Graph id) — newest first, and a time window is a RowKey range inside one partition per day. They carry
  what a search filters and a list shows (mailbox, forwarding user, from, subject, outcome, reason) and point to
  the record. ``explain --mailbox/--from/--subject/--since``, ``skipped list`` and the status page's last-hour
  counts read them; records without an Internet Message-ID are found this way too.
* Message-ID rows: PartitionKey ``m<hash of the Message-ID without <> lower-cased>``, RowKey = mailbox + Graph id
  hash; ``explain <Message-ID>`` is one partition read. A forward wrapper is indexed under its own Message-ID and
  the original's.

Records written before the index existed are still read: ``explain <Message-ID>`` falls back to the old filter
over ``Decisions`` when the index has no entry for that Message-ID. Retention (``core.services.retention``) works
through the oldest day partitions (:meth:`TableDecisionLog.expire_day`): each expired record goes with its
Message-ID rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from core.domain.records import DeltaCursor, LedgerOutcome
from core.domain.records import InboundLedgerEntry as LedgerEntry
from core.names import (
    DECISION_INDEX_TABLE,
    DECISIONS_TABLE,
    DELTA_STATE_TABLE,
    MAILBOX_STATUS_TABLE,
    POISON_LOG_TABLE,
    PROCESSED_TABLE,
)

from .storage import (
    EntityNotFoundError,
    StorageAccount,
    TableStore,
    day_partitions,
    decode_key,
    encode_key,
    hash_key,
    inverted_time_key,
    join_text,
    split_text,
)

__all__ = [
    "DecisionHit",
    "FinalOutcomes",
    "InboundState",
    "RememberingLedger",
    "TableDecisionLog",
    "TableDeltaState",
    "TableLedger",
    "TableMailboxStatus",
    "TablePoisonLog",
]

_MAX_RECORD_CHARS = 400_000  # a decision record above this is cut (the entity limit is 1 MiB)


class _HasStorage(Protocol):
    @property
    def storage(self) -> StorageAccount: ...


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
                           at=e.get("At"), source=str(e.get("Source", "") or ""))

    async def expire(self, mailbox: str, before: datetime, limit: int) -> tuple[int, bool]:
        """Delete up to ``limit`` of the mailbox's entries written before ``before`` (one partition query).
        Returns (deleted, more left)."""
        return await self._table.delete_where("PartitionKey eq @pk and At lt @before",
                                              parameters={"pk": _mailbox_key(mailbox), "before": before}, limit=limit)

    async def put(self, entry: LedgerEntry) -> None:
        await self._table.upsert({
            "PartitionKey": _mailbox_key(entry.mailbox), "RowKey": hash_key(entry.graph_id),
            "GraphId": entry.graph_id[:1024], "Outcome": entry.outcome.value, "ActivityId": entry.activity_id,
            "InternetMessageId": entry.internet_message_id[:1024], "Attempts": entry.attempts,
            "Reason": entry.reason[:1024], "At": entry.at or _now(), "Source": entry.source[:32],
        }, mode="replace")


class FinalOutcomes:
    """The (mailbox, Graph id) pairs this process wrote a final ledger outcome for, newest ``capacity`` kept.

    Delta rounds re-report mail that notifications brought minutes ago; this lets a round leave those out without
    a ledger read each. Only a shortcut: a pair not remembered (another instance processed it, or it was evicted)
    is asked of the ledger as before. Keys are 16-byte BLAKE2 digests (a few MB at the default capacity); a false
    match would take a collision of 128-bit digests."""

    def __init__(self, capacity: int = 50_000) -> None:
        self._capacity = max(1, capacity)
        self._keys: dict[bytes, None] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(mailbox: str, graph_id: str) -> bytes:
        return hashlib.blake2b(f"{mailbox.strip().lower()}\n{graph_id}".encode(), digest_size=16).digest()

    def remember(self, mailbox: str, graph_id: str) -> None:
        key = self._key(mailbox, graph_id)
        with self._lock:
            self._keys.pop(key, None)
            self._keys[key] = None
            while len(self._keys) > self._capacity:
                del self._keys[next(iter(self._keys))]

    def forget(self, mailbox: str, graph_id: str) -> None:
        with self._lock:
            self._keys.pop(self._key(mailbox, graph_id), None)

    def final(self, mailbox: str, graph_id: str) -> bool:
        return self._key(mailbox, graph_id) in self._keys

    def __len__(self) -> int:
        return len(self._keys)


class RememberingLedger:
    """A ledger whose writes also note final outcomes in :class:`FinalOutcomes` (and drop a pair that is no longer
    final). Reads always go to the ledger."""

    def __init__(self, ledger: TableLedger, memory: FinalOutcomes) -> None:
        self._ledger = ledger
        self._memory = memory

    async def get(self, mailbox: str, graph_id: str) -> LedgerEntry | None:
        return await self._ledger.get(mailbox, graph_id)

    async def put(self, entry: LedgerEntry) -> None:
        await self._ledger.put(entry)
        if entry.outcome.terminal:
            self._memory.remember(entry.mailbox, entry.graph_id)
        else:
            self._memory.forget(entry.mailbox, entry.graph_id)

    def known_final(self, mailbox: str, graph_id: str) -> bool:
        return self._memory.final(mailbox, graph_id)


def message_id_key(internet_message_id: str) -> str:
    """The index partition of a Message-ID: the same for ``<a@b>``, ``a@b`` and any letter case."""
    return "m" + hash_key(internet_message_id.strip().strip("<>").strip().lower())


@dataclass(frozen=True)
class DecisionHit:
    """One index row: enough to list or filter a decision; ``get`` on the log returns the whole record."""

    at: datetime
    mailbox: str
    graph_id: str
    outcome: str  # as in the record: tracked | already_tracked | skipped:<stage>:<code> | failed:<code> | gone:gone
    kind: str  # tracked | already_tracked | skipped | failed | gone
    code: str  # the reason code (skip code, failure code); "" when tracked
    why: str
    sender: str
    subject: str
    internet_message_id: str
    tracked_for: str  # the forwarding user, for mail unwrapped in a forward sink
    activity_id: str
    source: str
    folder: str = ""  # the folder the work item named (well-known name or id); "" = not recorded (older rows)

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "mailbox": self.mailbox, "graph_id": self.graph_id, "outcome": self.outcome,
                "kind": self.kind, "reason": self.code, "why": self.why, "from": self.sender, "subject": self.subject,
                "internet_message_id": self.internet_message_id, "tracked_for": self.tracked_for,
                "activity_id": self.activity_id, "source": self.source, "folder": self.folder}

    @staticmethod
    def from_entity(e: Mapping[str, Any]) -> DecisionHit:
        at = e.get("At")
        return DecisionHit(
            at=at if isinstance(at, datetime) else datetime.fromtimestamp(0, UTC),
            mailbox=str(e.get("Mailbox", "")), graph_id=str(e.get("GraphId", "")), outcome=str(e.get("Outcome", "")),
            kind=str(e.get("Kind", "")), code=str(e.get("Code", "")), why=str(e.get("Why", "")),
            sender=str(e.get("From", "")), subject=str(e.get("Subject", "")),
            internet_message_id=str(e.get("InternetMessageId", "")), tracked_for=str(e.get("TrackedFor", "")),
            activity_id=str(e.get("ActivityId", "")), source=str(e.get("Source", "")),
            folder=str(e.get("Folder", "")))


def _kind_and_code(outcome: str) -> tuple[str, str]:
    kind, _, rest = outcome.partition(":")
    if kind == "skipped":
        return kind, rest.rpartition(":")[2] or rest  # skipped:<stage>:<code> -> code; skipped:mailbox:unknown too
    return kind, rest if kind != "gone" else "gone"


class TableDecisionLog:
    """``DecisionLog``: the latest decision record per (mailbox, message), plus the search index (module doc)."""

    def __init__(self, table: TableStore, index: TableStore | None = None) -> None:
        self._table = table
        self._index = index

    async def record(self, mailbox: str, graph_id: str, record: Mapping[str, Any]) -> None:
        text = json.dumps(record, default=str, separators=(",", ":"))[:_MAX_RECORD_CHARS]
        at = _now()
        writes = [self._table.upsert({
            "PartitionKey": _mailbox_key(mailbox), "RowKey": hash_key(graph_id), "GraphId": graph_id[:1024],
            "InternetMessageId": str(record.get("internetMessageId") or "")[:1024],
            "ActivityId": str(record.get("activityId") or ""), "Outcome": str(record.get("outcome", ""))[:256],
            "At": at, **split_text("Record", text),
        }, mode="replace")]
        if self._index is not None:
            rows = self._index_rows(mailbox, graph_id, record, at)
            writes.extend(self._index.upsert(row, mode="replace") for row in rows)
        await asyncio.gather(*writes)

    @staticmethod
    def _index_rows(mailbox: str, graph_id: str, record: Mapping[str, Any], at: datetime) -> list[dict[str, Any]]:
        outcome = str(record.get("outcome", ""))[:256]
        kind, code = _kind_and_code(outcome)
        steps = record.get("decisions")
        why = str(steps[-1].get("why", "")) if isinstance(steps, list) and steps and isinstance(steps[-1], Mapping) \
            else ""
        mids = [str(m) for m in (record.get("internetMessageId"), record.get("originalInternetMessageId")) if m]
        pointer = {"Mailbox": mailbox.strip().lower(), "GraphId": graph_id[:1024], "At": at}
        rows: list[dict[str, Any]] = [{
            "PartitionKey": f"t{at:%Y%m%d}",
            "RowKey": f"{inverted_time_key(at)}-{hash_key(mailbox + chr(10) + graph_id)[:16]}",
            **pointer, "Outcome": outcome, "Kind": kind, "Code": code[:256], "Why": why[:1024],
            "From": str(record.get("from") or "")[:320], "Subject": str(record.get("subject") or "")[:400],
            "InternetMessageId": (mids[-1] if mids else "")[:1024],
            "TrackedFor": str(record.get("trackedFor") or "").lower()[:320],
            "ActivityId": str(record.get("activityId") or ""), "Source": str(record.get("source") or "")[:64],
            "Folder": str(record.get("folder") or "")[:1024],
        }]
        row_key = f"{_mailbox_key(mailbox)}|{hash_key(graph_id)}"
        for mid in dict.fromkeys(mids):
            rows.append({"PartitionKey": message_id_key(mid), "RowKey": row_key, **pointer})
        return rows

    async def get(self, mailbox: str, graph_id: str) -> dict[str, Any] | None:
        try:
            e = await self._table.get(_mailbox_key(mailbox), hash_key(graph_id))
        except EntityNotFoundError:
            return None
        return dict(json.loads(join_text(e, "Record")))

    async def find_by_internet_message_id(self, internet_message_id: str) -> list[dict[str, Any]]:
        """Every mailbox's record of one message (admin ``explain``): one index partition; records from before the
        index existed are found by the old filter over the record table (a scan, only when the index has none)."""
        out: list[dict[str, Any]] = []
        if self._index is not None:
            async for e in self._index.list_partition(message_id_key(internet_message_id)):
                record = await self.get(str(e.get("Mailbox", "")), str(e.get("GraphId", "")))
                if record is not None:
                    out.append(record)
            if out:
                return out
        core = internet_message_id.strip().strip("<>").strip()
        async for e in self._table.query("InternetMessageId eq @a or InternetMessageId eq @b",
                                         parameters={"a": f"<{core}>", "b": core}):
            out.append(dict(json.loads(join_text(e, "Record"))))
        return out

    async def search(self, since: datetime, until: datetime | None = None, *, mailbox: str | None = None,
                     kind: str | None = None, on_day: Callable[[int, int], None] | None = None
                     ) -> AsyncIterator[DecisionHit]:
        """Index rows decided in [since, until], newest first: one RowKey-range query per UTC day, filtered by
        mailbox (the processing mailbox or the forwarding user) and outcome kind on the server."""
        if self._index is None:
            return
        until = until or _now()
        days = day_partitions(since, until, "t")
        clauses = ["PartitionKey eq @pk", "RowKey ge @lo", "RowKey lt @hi"]
        params: dict[str, Any] = {"lo": inverted_time_key(until), "hi": f"{int(inverted_time_key(since)) + 1:013d}"}
        if mailbox:
            # The SDK substitutes whitespace-separated "@name" words: keep the ")" apart from the parameter.
            clauses.append("(Mailbox eq @mb or TrackedFor eq @mb )")
            params["mb"] = mailbox.strip().lower()
        if kind:
            clauses.append("Kind eq @kind")
            params["kind"] = kind
        for n, day in enumerate(days, start=1):
            async for e in self._index.query(" and ".join(clauses), parameters={**params, "pk": day}):
                yield DecisionHit.from_entity(e)
            if on_day is not None:
                on_day(n, len(days))

    async def list_mailbox(self, mailbox: str) -> list[dict[str, Any]]:
        return [dict(json.loads(join_text(e, "Record")))
                async for e in self._table.list_partition(_mailbox_key(mailbox))]

    # -- retention ------------------------------------------------------------------------------------------

    async def oldest_day(self) -> str | None:
        """The oldest index day partition (``tYYYYMMDD``), or None: time partitions sort after the Message-ID
        ones (``m...``), so one range read finds it."""
        if self._index is None:
            return None
        return await self._index.first_partition("t", "u")

    async def expire_day(self, day: str, before: datetime, limit: int) -> tuple[int, int, bool]:
        """Work through one index day partition (decided before ``before``): each decision record whose latest
        decision is older goes with its Message-ID index rows; the time row goes in any case (a newer decision of
        the same message has its own). At most ``limit`` deletions. Returns (records, index rows, more left)."""
        assert self._index is not None
        index = self._index
        records = index_rows = 0
        async with contextlib.aclosing(index.list_partition(day)) as rows:
            async for row in rows:
                # Deleted in this order (Message-ID rows, record, time row) so that a run that stops half-way
                # leaves the time row, and the next run finds the rest through it (deletes are idempotent).
                mailbox, graph_id = str(row.get("Mailbox", "")), str(row.get("GraphId", ""))
                record = None
                if mailbox and graph_id:
                    try:
                        record = await self._table.get(_mailbox_key(mailbox), hash_key(graph_id))
                    except EntityNotFoundError:
                        record = None
                at = record.get("At") if record is not None else None
                if record is not None and isinstance(at, datetime) and at < before:
                    try:
                        doc = json.loads(join_text(record, "Record"))
                    except ValueError:
                        doc = {}
                    mids = {str(m) for m in (record.get("InternetMessageId"), doc.get("internetMessageId"),
                                             doc.get("originalInternetMessageId")) if m}
                    pointer = f"{_mailbox_key(mailbox)}|{hash_key(graph_id)}"
                    for mid in sorted(mids):
                        if records + index_rows >= limit:
                            return records, index_rows, True
                        await index.delete(message_id_key(mid), pointer)
                        index_rows += 1
                    if records + index_rows >= limit:
                        return records, index_rows, True
                    await self._table.delete(_mailbox_key(mailbox), hash_key(graph_id))
                    records += 1
                if records + index_rows >= limit:
                    return records, index_rows, True
                await index.delete(day, str(row["RowKey"]))
                index_rows += 1
        return records, index_rows, False

    async def expire_unindexed(self, before: datetime, limit: int) -> tuple[int, bool]:
        """Records written before the index existed (no time row points at them) and older than ``before``: a
        filtered scan of the record table, bounded by ``limit``. Run only once every older index day is gone."""
        return await self._table.delete_where("At lt @before", parameters={"before": before}, limit=limit)


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

    def _row(self, mailbox: str) -> dict[str, Any]:
        return {"PartitionKey": self.PARTITION, "RowKey": _mailbox_key(mailbox), "Mailbox": mailbox.lower()}

    async def record_sync(self, mailbox: str, *, ok: bool, detail: str = "") -> None:
        props = self._row(mailbox)
        if ok:
            props["InboundLastSyncAt"] = _now()
        else:
            props.update(InboundLastSyncError=detail[:1024], InboundLastSyncErrorAt=_now())
        await self._table.upsert(props, mode="merge")

    async def record_synced(self, mailboxes: Sequence[str]) -> None:
        """``record_sync(ok=True)`` for many mailboxes in table transactions (one partition holds every row)."""
        now = _now()
        await self._table.upsert_many([{**self._row(m), "InboundLastSyncAt": now} for m in mailboxes], mode="merge")

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
        await self._table.upsert({
            "PartitionKey": queue, "RowKey": f"{inverted_time_key(now)}-{uuid.uuid4().hex[:8]}",
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
        await self._table.upsert(self._entity(cursor), mode="replace")

    @staticmethod
    def _entity(cursor: DeltaCursor) -> dict[str, Any]:
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
        return entity

    async def put_if_absent(self, cursor: DeltaCursor) -> bool:
        """Write the cursor unless the folder has one: one conditional insert (no read first, no race with a
        delta round that wrote its own cursor a moment ago). True = written."""
        return await self._table.insert_if_absent(self._entity(cursor))

    async def delete(self, mailbox: str, folder: str) -> None:
        await self._table.delete(_mailbox_key(mailbox), encode_key(folder))

    async def list_mailbox(self, mailbox: str) -> list[DeltaCursor]:
        """Every folder's cursor of one mailbox (one partition read)."""
        out: list[DeltaCursor] = []
        async for e in self._table.list_partition(_mailbox_key(mailbox)):
            folder = decode_key(str(e.get("RowKey", "")))
            cursor = await self.get(mailbox, folder)
            if cursor is not None:
                out.append(cursor)
        return out


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
            decisions=TableDecisionLog(account.table(DECISIONS_TABLE), account.table(DECISION_INDEX_TABLE)),
            status=TableMailboxStatus(account.table(MAILBOX_STATUS_TABLE)),
            poison=TablePoisonLog(account.table(POISON_LOG_TABLE)),
            delta=TableDeltaState(account.table(DELTA_STATE_TABLE)),
        )

    @classmethod
    def for_container(cls, container: _HasStorage) -> InboundState:
        """From the composition root (``core.bootstrap.Container``), or anything else holding a storage account."""
        return cls.from_account(container.storage)
