"""The settings tables as a cached ``core.ports.MailboxDirectory`` plus the write methods the CLI uses.

Reads: one query of each table per TTL (default 30 s, so an edited row takes effect within a minute without
restarts), shared by every lookup in the process; a refresh is single-flight. A row that fails validation is
reported (WARNING, once per new problem) and the last good configuration of that mailbox stays in force. If the
table cannot be read at all, the previous snapshot keeps serving (stale beats a stopped pipeline) and the next
lookup tries again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

from core.names import MAILBOXES_TABLE, ORG_SETTINGS_TABLE

from .rows import (
    MAILBOX_PARTITION,
    ORG_PARTITION,
    OrgParseResult,
    RouterSettings,
    RowError,
    normalise_address,
    org_key,
    parse_mailbox_row,
    parse_org_rows,
    parse_override_changes,
    row_key,
)

if TYPE_CHECKING:
    from core.adapters.storage import Entity, StorageAccount
    from core.domain.model import MailboxConfig, OrgEmailSettings

__all__ = ["RowStore", "SettingsUnavailableError", "TableMailboxDirectory"]

_log = logging.getLogger("emailrouter.settings")


class RowStore(Protocol):
    """The part of ``core.adapters.storage.TableStore`` the settings services use (faked in unit tests)."""

    def list_partition(self, partition_key: str) -> AsyncIterator[Entity]: ...

    async def get(self, partition_key: str, row_key: str, *, select: Sequence[str] | None = None) -> Entity: ...

    async def upsert(self, entity: Mapping[str, Any], *, mode: Literal["merge", "replace"] = "merge") -> str: ...

    async def delete(self, partition_key: str, row_key: str, *, etag: str | None = None) -> None: ...


class SettingsUnavailableError(RuntimeError):
    """The settings tables could not be read and there is no earlier snapshot to serve."""


@dataclass(frozen=True)
class _Snapshot:
    loaded_at: float
    mailboxes: Mapping[str, MailboxConfig]
    errors: tuple[RowError, ...]
    org: OrgParseResult
    read_at: datetime = field(default_factory=lambda: datetime.now(UTC))  # wall clock, for fresh_since


class TableMailboxDirectory:
    """``MailboxDirectory`` over the Mailboxes and OrgSettings tables, with a TTL cache and last-good fallback."""

    def __init__(
        self,
        mailboxes: RowStore,
        org: RowStore,
        *,
        ttl_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_seconds < 0:
            raise ValueError("ttl_seconds must be >= 0")
        self._mailboxes = mailboxes
        self._org = org
        self._ttl = ttl_seconds
        self._clock = clock
        self._snapshot: _Snapshot | None = None
        self._last_snapshot: _Snapshot | None = None  # survives invalidate(): the fallback when storage fails
        self._last_good: dict[str, MailboxConfig] = {}
        self._reported: set[str] = set()
        self._lock = asyncio.Lock()

    @classmethod
    def from_account(cls, account: StorageAccount, **kwargs: Any) -> TableMailboxDirectory:
        return cls(account.table(MAILBOXES_TABLE), account.table(ORG_SETTINGS_TABLE), **kwargs)

    # -- MailboxDirectory ----------------------------------------------------------------------------------

    async def get_mailbox(self, address: str) -> MailboxConfig | None:
        snapshot = await self._current()
        return snapshot.mailboxes.get(address.strip().lower())

    async def list_mailboxes(self) -> Sequence[MailboxConfig]:
        snapshot = await self._current()
        return list(snapshot.mailboxes.values())

    async def get_org_settings(self) -> OrgEmailSettings:
        return (await self._current()).org.org

    # -- extras --------------------------------------------------------------------------------------------

    async def get_router_settings(self) -> RouterSettings:
        return (await self._current()).org.router

    async def get_org_result(self) -> OrgParseResult:
        return (await self._current()).org

    async def row_errors(self) -> Sequence[RowError]:
        """Rows currently ignored (mailbox and org), with reasons."""
        snapshot = await self._current()
        return [*snapshot.errors, *snapshot.org.errors]

    def invalidate(self) -> None:
        """Forget the snapshot: the next lookup reads the tables (after our own writes)."""
        self._snapshot = None

    async def refresh(self) -> None:
        self.invalidate()
        await self._current()

    async def fresh_since(self, moment: datetime) -> None:
        """Make sure the settings in use were read after ``moment`` (a re-evaluation asked for after an admin's
        change must not be decided with the settings cached before it)."""
        snapshot = self._snapshot
        if snapshot is None or snapshot.read_at < moment:
            await self.refresh()

    async def _current(self) -> _Snapshot:
        snapshot = self._snapshot
        if snapshot is not None and self._clock() - snapshot.loaded_at < self._ttl:
            return snapshot
        async with self._lock:
            snapshot = self._snapshot
            if snapshot is not None and self._clock() - snapshot.loaded_at < self._ttl:
                return snapshot  # another task refreshed while we waited
            try:
                fresh = await self._load()
            except Exception as exc:
                stale = self._last_snapshot
                if stale is None:
                    raise SettingsUnavailableError(f"settings tables unreadable: {exc}") from exc
                _log.warning("settings tables unreadable (%s); serving the previous snapshot", type(exc).__name__)
                return stale
            self._snapshot = fresh
            return fresh

    async def _load(self) -> _Snapshot:
        previous_org = self._last_snapshot.org.values if self._last_snapshot else None
        org_rows = [row async for row in self._org.list_partition(ORG_PARTITION)]
        org = parse_org_rows(org_rows, previous_org)
        mailboxes: dict[str, MailboxConfig] = {}
        errors: list[RowError] = []
        async for entity in self._mailboxes.list_partition(MAILBOX_PARTITION):
            parsed = parse_mailbox_row(entity, org.router)
            if isinstance(parsed, RowError):
                errors.append(parsed)
                good = self._last_good.get(parsed.address)
                if good is not None:
                    mailboxes[good.address] = good  # the previous good value stays in force
                continue
            mailboxes[parsed.address] = parsed
        self._last_good = dict(mailboxes)
        self._report([*errors, *org.errors])
        snapshot = _Snapshot(self._clock(), mailboxes, tuple(errors), org)
        self._last_snapshot = snapshot
        return snapshot

    def _report(self, errors: Sequence[RowError]) -> None:
        current = {str(e) for e in errors}
        for text in sorted(current - self._reported):
            _log.warning("settings row ignored: %s", text)
        self._reported = current

    # -- rows (CLI) ----------------------------------------------------------------------------------------

    async def get_row(self, address: str) -> Entity | None:
        from core.adapters.storage import EntityNotFoundError

        try:
            return await self._mailboxes.get(MAILBOX_PARTITION, row_key(address))
        except EntityNotFoundError:
            return None

    async def list_rows(self) -> list[Entity]:
        return [row async for row in self._mailboxes.list_partition(MAILBOX_PARTITION)]

    async def set_overrides(self, address: str, changes: Mapping[str, object | None]) -> MailboxConfig:
        """Write admin overrides (``None``/``""`` clears one). Validated first: a change that would make the row
        invalid is refused with ``ValueError`` and nothing is written. Creates the row for an address CRM does not
        know (e.g. a forward sink configured only here)."""
        clean = normalise_address(address)
        columns = parse_override_changes(changes)
        existing = await self.get_row(clean)
        merged: dict[str, Any] = dict(existing or {})
        merged.update({"PartitionKey": MAILBOX_PARTITION, "RowKey": row_key(clean), "Address": clean, **columns})
        org = await self.get_org_result()
        parsed = parse_mailbox_row(merged, org.router)
        if isinstance(parsed, RowError):
            raise ValueError("; ".join(parsed.reasons))
        await self._mailboxes.upsert(
            {"PartitionKey": MAILBOX_PARTITION, "RowKey": row_key(clean), "Address": clean, **columns},
            mode="merge",
        )
        self.invalidate()
        return parsed

    async def delete_row(self, address: str) -> None:
        await self._mailboxes.delete(MAILBOX_PARTITION, row_key(normalise_address(address)))
        self.invalidate()

    async def list_org_rows(self) -> list[Entity]:
        return [row async for row in self._org.list_partition(ORG_PARTITION)]

    async def set_org_value(self, key: str, value: str | None) -> str:
        """Write the admin ``Value`` of an org setting (validated; ``None``/``""`` clears it). Returns the stored
        text."""
        spec = org_key(key)
        text = "" if value is None else str(value).strip()
        if text:
            spec.parse(text)  # ValueError -> refused, nothing written
        await self._org.upsert({"PartitionKey": ORG_PARTITION, "RowKey": spec.key, "Value": text}, mode="merge")
        self.invalidate()
        return text
