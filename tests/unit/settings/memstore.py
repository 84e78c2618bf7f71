"""An in-memory ``core.settings.store.RowStore`` (a fake of our own port, for unit tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Literal

from core.adapters.storage import Entity, EntityNotFoundError


class MemoryRowStore:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], dict[str, Any]] = {}
        self.fail_reads: Exception | None = None
        self.writes = 0

    def put(self, entity: Mapping[str, Any]) -> None:
        self.rows[(entity["PartitionKey"], entity["RowKey"])] = dict(entity)

    async def list_partition(self, partition_key: str) -> AsyncIterator[Entity]:
        if self.fail_reads is not None:
            raise self.fail_reads
        for (pk, _), row in sorted(self.rows.items()):
            if pk == partition_key:
                yield Entity(row)

    async def get(self, partition_key: str, row_key: str, *, select: Sequence[str] | None = None) -> Entity:
        row = self.rows.get((partition_key, row_key))
        if row is None:
            raise EntityNotFoundError(f"no {partition_key}/{row_key}")
        return Entity(row)

    async def upsert(self, entity: Mapping[str, Any], *, mode: Literal["merge", "replace"] = "merge") -> str:
        self.writes += 1
        key = (entity["PartitionKey"], entity["RowKey"])
        if mode == "merge" and key in self.rows:
            self.rows[key].update(entity)
        else:
            self.rows[key] = dict(entity)
        return "etag"

    async def delete(self, partition_key: str, row_key: str, *, etag: str | None = None) -> None:
        self.rows.pop((partition_key, row_key), None)
