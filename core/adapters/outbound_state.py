"""Table-backed outbound state: the ledger (``OutboundLedger``) and the per-mailbox outbound status.

Ledger table ``<prefix>Outbound`` (``core.names.OUTBOUND_TABLE``):

* one entity per CRM email: PartitionKey = activity id, RowKey = ``state``; the phase reached, attempts,
  lease owner/expiry, draft id + internetMessageId, last error. Written only ETag-conditionally
  (``insert`` / ``update(etag)``): that is what makes the lease safe between workers.
* the active index: PartitionKey = ``active``, RowKey = activity id; one small entity per email the pipeline
  is working on (enqueued, retry due time). One partition query gives the scan its de-duplication set and the
  reaper its sweep list; entries are removed when the email is Sent or Failed.
* the finished index: PartitionKey ``done<YYYYMMDD>`` (UTC day), RowKey = inverted milliseconds + activity id; one
  entity each time an email ends ``done`` (marked Sent in CRM) or ``failed``, with the sender and the reason. What
  ``emailrouter outbound list`` and the status page read for a time window, without scanning the ledger. Written
  after the state row, best effort (a lost index row costs a line in a listing, never an email); emails that
  finished before the index existed are still found by :meth:`TableOutboundLedger.list_failed` (a scan).

Mailbox status table ``<prefix>MailboxStatus``: the mailbox's one status row (PartitionKey ``mailbox``, RowKey =
the key-encoded address, shared with the inbound pipeline and the health probe, each merging its own columns);
outbound writes ``LastOutbound*``: last error (reason, time, email id) and last success — what the admin CLI shows.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from core.domain.records import ActiveMarker, LedgerConflict, Phase
from core.domain.records import OutboundLedgerEntry as LedgerEntry
from core.names import MAILBOX_STATUS_TABLE, OUTBOUND_TABLE

from .storage import (
    EntityAlreadyExistsError,
    EntityNotFoundError,
    EtagMismatchError,
    StorageAccount,
    TableStore,
    day_partitions,
    encode_key,
    inverted_time_key,
)

__all__ = ["TableMailboxOutboundStatus", "TableOutboundLedger", "entry_from_entity", "entry_to_entity"]

_log = logging.getLogger("emailrouter.outbound")

STATE_ROW: Final = "state"
ACTIVE_PARTITION: Final = "active"
FINISHED_PREFIX: Final = "done"  # + YYYYMMDD: the finished index (module doc)
STATUS_PARTITION: Final = "mailbox"  # the same row as inbound and health (one row per mailbox)
_MAX_TEXT: Final = 4000  # error texts are bounded; Table properties allow 32 K characters


def _put_time(entity: dict[str, Any], name: str, value: datetime | None) -> None:
    # Absent rather than null: with a replace-mode update an absent property is removed, which is the point.
    if value is not None:
        entity[name] = value


def _time(entity: Mapping[str, Any], name: str) -> datetime | None:
    value = entity.get(name)
    return value if isinstance(value, datetime) else None


def entry_to_entity(entry: LedgerEntry) -> dict[str, Any]:
    entity: dict[str, Any] = {
        "PartitionKey": entry.email_id, "RowKey": STATE_ROW, "Phase": entry.phase.value,
        "SenderMailbox": entry.sender_mailbox, "Attempts": entry.attempts, "Owner": entry.owner,
        "DraftId": entry.draft_id, "InternetMessageId": entry.internet_message_id,
        "DraftComplete": entry.draft_complete, "LastError": entry.last_error[:_MAX_TEXT],
        "LastErrorCode": entry.last_error_code[:200],
    }
    _put_time(entity, "LeaseUntil", entry.lease_until)
    _put_time(entity, "ClaimedAt", entry.claimed_at)
    _put_time(entity, "SendAttemptedAt", entry.send_attempted_at)
    _put_time(entity, "NotBefore", entry.not_before)
    _put_time(entity, "UpdatedAt", entry.updated_at)
    return entity


def entry_from_entity(entity: Mapping[str, Any]) -> LedgerEntry:
    try:
        phase = Phase(str(entity.get("Phase", "")))
    except ValueError:
        phase = Phase.RETRY  # unknown (newer writer?): treat as "decide again", never as sent
    return LedgerEntry(
        email_id=str(entity["PartitionKey"]),
        sender_mailbox=str(entity.get("SenderMailbox", "")),
        phase=phase,
        attempts=int(entity.get("Attempts", 0) or 0),
        owner=str(entity.get("Owner", "")),
        lease_until=_time(entity, "LeaseUntil"),
        claimed_at=_time(entity, "ClaimedAt"),
        draft_id=str(entity.get("DraftId", "")),
        internet_message_id=str(entity.get("InternetMessageId", "")),
        draft_complete=bool(entity.get("DraftComplete", False)),
        send_attempted_at=_time(entity, "SendAttemptedAt"),
        not_before=_time(entity, "NotBefore"),
        last_error=str(entity.get("LastError", "")),
        last_error_code=str(entity.get("LastErrorCode", "")),
        updated_at=_time(entity, "UpdatedAt"),
    )


class TableOutboundLedger:
    """``core.services.outbound.OutboundLedger`` over Azure Tables."""

    def __init__(self, account: StorageAccount | None = None, *, table: TableStore | None = None) -> None:
        if table is None:
            if account is None:
                raise ValueError("give a storage account or a table")
            table = account.table(OUTBOUND_TABLE)
        self._table = table

    async def get(self, email_id: str) -> tuple[LedgerEntry, str] | None:
        try:
            entity = await self._table.get(email_id, STATE_ROW)
        except EntityNotFoundError:
            return None
        return entry_from_entity(entity), str(entity.etag or "")

    async def put(self, entry: LedgerEntry, *, etag: str | None) -> str:
        entity = entry_to_entity(entry)
        try:
            if etag is None:
                new_etag = await self._table.insert(entity)
            else:
                new_etag = await self._table.update(entity, etag=etag, mode="replace")
        except (EntityAlreadyExistsError, EtagMismatchError, EntityNotFoundError) as exc:
            raise LedgerConflict(str(exc)) from exc
        if entry.phase in (Phase.DONE, Phase.FAILED):
            await self._index_finished(entry)
        return new_etag

    async def _index_finished(self, entry: LedgerEntry) -> None:
        at = entry.updated_at or datetime.now(UTC)
        try:
            await self._table.upsert({
                "PartitionKey": f"{FINISHED_PREFIX}{at.astimezone(UTC):%Y%m%d}",
                "RowKey": f"{inverted_time_key(at)}-{entry.email_id}", "EmailId": entry.email_id,
                "SenderMailbox": entry.sender_mailbox, "Phase": entry.phase.value, "Attempts": entry.attempts,
                "LastError": entry.last_error[:_MAX_TEXT], "LastErrorCode": entry.last_error_code[:200],
                "InternetMessageId": entry.internet_message_id[:1024], "At": at,
            }, mode="replace")
        except Exception as exc:  # the state row is written: the email is safe, only a listing line is lost
            _log.warning("outbound: finished-index row for %s not written (%s)", entry.email_id, type(exc).__name__)

    async def list_finished(self, since: datetime, until: datetime | None = None, *, failed_only: bool = False,
                            on_day: Callable[[int, int], None] | None = None) -> AsyncIterator[dict[str, Any]]:
        """Finished-index rows (emails that ended done or failed) in [since, until], newest first."""
        until = until or datetime.now(UTC)
        days = day_partitions(since, until, FINISHED_PREFIX)
        query = "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi"
        params: dict[str, Any] = {"lo": inverted_time_key(until), "hi": f"{int(inverted_time_key(since)) + 1:013d}"}
        if failed_only:
            query += " and Phase eq @phase"
            params["phase"] = Phase.FAILED.value
        for n, day in enumerate(days, start=1):
            async for entity in self._table.query(query, parameters={**params, "pk": day}):
                yield {k: v for k, v in entity.items() if k not in ("PartitionKey", "RowKey")}
            if on_day is not None:
                on_day(n, len(days))

    async def oldest_finished_day(self) -> str | None:
        """The oldest finished-index day partition (``doneYYYYMMDD``), or None (one range read)."""
        return await self._table.first_partition(FINISHED_PREFIX, FINISHED_PREFIX + "~")

    async def expire_finished_day(self, day: str, limit: int) -> tuple[int, bool]:
        """Delete up to ``limit`` rows of one finished-index day partition. Returns (deleted, more left)."""
        return await self._table.delete_where("PartitionKey eq @pk", parameters={"pk": day}, limit=limit)

    async def mark_active(self, marker: ActiveMarker) -> None:
        entity: dict[str, Any] = {"PartitionKey": ACTIVE_PARTITION, "RowKey": marker.email_id,
                                  "SenderMailbox": marker.sender_mailbox}
        _put_time(entity, "EnqueuedAt", marker.enqueued_at)
        _put_time(entity, "NotBefore", marker.not_before)
        _put_time(entity, "UpdatedAt", marker.updated_at)
        await self._table.upsert(entity, mode="replace")

    async def list_active(self) -> Sequence[ActiveMarker]:
        return [ActiveMarker(email_id=str(e["RowKey"]), sender_mailbox=str(e.get("SenderMailbox", "")),
                             enqueued_at=_time(e, "EnqueuedAt"), not_before=_time(e, "NotBefore"),
                             updated_at=_time(e, "UpdatedAt"))
                async for e in self._table.list_partition(ACTIVE_PARTITION)]

    async def clear_active(self, email_id: str) -> None:
        await self._table.delete(ACTIVE_PARTITION, email_id)

    async def list_failed(self, *, limit: int = 1000) -> list[LedgerEntry]:
        """Failed emails with their reasons, for the admin CLI."""
        out: list[LedgerEntry] = []
        async for entity in self._table.query("RowKey eq @row and Phase eq @phase",
                                              parameters={"row": STATE_ROW, "phase": Phase.FAILED.value}):
            out.append(entry_from_entity(entity))
            if len(out) >= limit:
                break
        return out


class TableMailboxOutboundStatus:
    """``core.services.outbound.OutboundStatusSink`` over the MailboxStatus table (merge: other pipelines keep
    their own rows and columns)."""

    def __init__(self, account: StorageAccount | None = None, *, table: TableStore | None = None) -> None:
        if table is None:
            if account is None:
                raise ValueError("give a storage account or a table")
            table = account.table(MAILBOX_STATUS_TABLE)
        self._table = table

    async def record_failure(self, mailbox: str, email_id: str, reason: str, at: datetime) -> None:
        await self._table.upsert({
            "PartitionKey": STATUS_PARTITION, "RowKey": encode_key(mailbox.lower()), "Mailbox": mailbox.lower(),
            "LastOutboundError": reason[:_MAX_TEXT], "LastOutboundErrorAt": at,
            "LastOutboundErrorEmailId": email_id,
        }, mode="merge")

    async def record_sent(self, mailbox: str, email_id: str, at: datetime) -> None:
        await self._table.upsert({
            "PartitionKey": STATUS_PARTITION, "RowKey": encode_key(mailbox.lower()), "Mailbox": mailbox.lower(),
            "LastOutboundSentAt": at, "LastOutboundSentEmailId": email_id,
        }, mode="merge")

    async def get(self, mailbox: str) -> dict[str, Any] | None:
        try:
            return dict(await self._table.get(STATUS_PARTITION, encode_key(mailbox.lower())))
        except EntityNotFoundError:
            return None
