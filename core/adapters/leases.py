"""Leases as ETag-guarded Azure Table rows (``Leases`` table; works on Azurite as on Azure).

One row per lease (PartitionKey ``lease``, RowKey = the encoded lease name) with ``Owner``, ``AcquiredAt``,
``Until`` and ``Purpose``. Acquire = insert (first writer wins), or replace an expired row conditionally on the
ETag that was read (two runs that both see it expired: one replace wins with 412 for the other). Renew and release
are conditional on our own ETag too, so a run whose lease lapsed and was taken over can never extend or delete the
new holder's lease.

Expiry compares ``Until`` with this process's clock; the lease durations (minutes) dwarf clock skew between
instances (seconds). A blob lease would serve as well (the Functions host uses blob leases for its own singletons);
a table row keeps everything the router stores in one service and lets ``emailrouter status`` list who holds what.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from core.domain.leases import Lease, LeaseHeld, LeaseLost

from .storage import (
    EntityAlreadyExistsError,
    EntityNotFoundError,
    EtagMismatchError,
    TableStore,
    decode_key,
    encode_key,
)

__all__ = ["TableLeaseStore"]

_PARTITION = "lease"


def _lease(entity: Mapping[str, Any], etag: str | None) -> Lease:
    def when(name: str) -> datetime:
        value = entity.get(name)
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=UTC)
        return datetime.fromtimestamp(0, UTC)

    return Lease(name=decode_key(str(entity.get("RowKey", ""))), owner=str(entity.get("Owner", "")),
                 acquired_at=when("AcquiredAt"), until=when("Until"), purpose=str(entity.get("Purpose", "")),
                 etag=etag or "")


class TableLeaseStore:
    """``core.services.jobs.LeaseStore`` over one table."""

    def __init__(self, table: TableStore, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._table = table
        self._clock = clock

    def _row(self, name: str, owner: str, acquired: datetime, until: datetime, purpose: str) -> dict[str, Any]:
        return {"PartitionKey": _PARTITION, "RowKey": encode_key(name), "Owner": owner[:512], "AcquiredAt": acquired,
                "Until": until, "Purpose": purpose[:512]}

    async def acquire(self, name: str, owner: str, duration: timedelta, *, purpose: str = "") -> Lease:
        """Take the lease for ``duration``; :class:`LeaseHeld` (with the holder) when someone else holds it."""
        for _ in range(3):
            now = self._clock()
            row = self._row(name, owner, now, now + duration, purpose)
            try:
                etag = await self._table.insert(row)
                return Lease(name, owner, now, now + duration, purpose, etag)
            except EntityAlreadyExistsError:
                pass
            try:
                current = await self._table.get(_PARTITION, encode_key(name))
            except EntityNotFoundError:
                continue  # released in between: insert again
            holder = _lease(current, current.etag)
            if holder.held(now) and holder.owner != owner:
                raise LeaseHeld(holder)
            try:
                etag = await self._table.update(row, etag=current.etag, mode="replace")
            except (EtagMismatchError, EntityNotFoundError):
                continue  # another run took (or released) it between our read and write: look again
            return Lease(name, owner, now, now + duration, purpose, etag)
        latest = await self.get(name)
        if latest is not None and latest.owner != owner:
            raise LeaseHeld(latest)
        raise LeaseLost(f"lease {name} kept changing while it was acquired")

    async def renew(self, lease: Lease, duration: timedelta) -> Lease:
        """Extend our lease; :class:`LeaseLost` when it is no longer ours."""
        until = self._clock() + duration
        try:
            etag = await self._table.update(self._row(lease.name, lease.owner, lease.acquired_at, until,
                                                      lease.purpose), etag=lease.etag, mode="replace")
        except (EtagMismatchError, EntityNotFoundError) as exc:
            raise LeaseLost(f"lease {lease.name} is no longer held by {lease.owner}") from exc
        return Lease(lease.name, lease.owner, lease.acquired_at, until, lease.purpose, etag)

    async def release(self, lease: Lease) -> None:
        """Give the lease up (a lease taken over meanwhile is left to its new holder)."""
        try:
            await self._table.delete(_PARTITION, encode_key(lease.name), etag=lease.etag)
        except EtagMismatchError:
            return

    async def get(self, name: str) -> Lease | None:
        """The current row (held or expired), or None."""
        try:
            entity = await self._table.get(_PARTITION, encode_key(name))
        except EntityNotFoundError:
            return None
        return _lease(entity, entity.etag)

    async def list_held(self, prefix: str = "") -> list[Lease]:
        """Leases held now whose name starts with ``prefix`` (one partition read; the table stays small: rows are
        deleted on release, and only a crashed run leaves an expired one behind until the name is used again)."""
        now = self._clock()
        out: list[Lease] = []
        async for entity in self._table.list_partition(_PARTITION):
            lease = _lease(entity, entity.etag)
            if lease.name.startswith(prefix) and lease.held(now):
                out.append(lease)
        return out
