"""Table-backed state the pipelines keep (subscriptions, ...), over ``core.adapters.storage.TableStore``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from core.names import SUBSCRIPTIONS_TABLE
from core.notifications import SubscriptionInfo

from .storage import EntityNotFoundError, StorageAccount

__all__ = ["SubscriptionRecord", "SubscriptionTable"]

_SUB_PARTITION = "sub"


@dataclass(frozen=True)
class SubscriptionRecord(SubscriptionInfo):
    """A stored subscription: what the webhook checks plus what reconcile needs."""

    resource: str
    expires: datetime
    change_type: str = "created"

    def to_entity(self) -> dict[str, Any]:
        return {
            "PartitionKey": _SUB_PARTITION, "RowKey": self.id, "Mailbox": self.mailbox, "Folder": self.folder,
            "ClientState": self.client_state, "TenantId": self.tenant_id, "Resource": self.resource,
            "Expires": self.expires, "ChangeType": self.change_type,
        }

    @classmethod
    def from_entity(cls, e: Mapping[str, Any]) -> SubscriptionRecord:
        return cls(id=str(e["RowKey"]), mailbox=str(e["Mailbox"]), folder=str(e.get("Folder", "")),
                   client_state=str(e["ClientState"]), tenant_id=str(e.get("TenantId", "")),
                   resource=str(e.get("Resource", "")), expires=e["Expires"],
                   change_type=str(e.get("ChangeType", "created")))


class SubscriptionTable:
    """Our Graph subscriptions. Implements ``core.ports.SubscriptionDirectory`` with a short cache.

    The webhook looks up every notification's subscription; the cache keeps that off the table for
    bursts (positive answers only: a subscription created a moment ago must be found at once).
    """

    def __init__(self, account: StorageAccount, *, cache_ttl: float = 60.0) -> None:
        self._table = account.table(SUBSCRIPTIONS_TABLE)
        self._ttl = cache_ttl
        self._cache: dict[str, tuple[float, SubscriptionRecord]] = {}

    async def get_many(self, subscription_ids: Collection[str]) -> Mapping[str, SubscriptionInfo]:
        now = time.monotonic()
        found: dict[str, SubscriptionInfo] = {}
        for sid in subscription_ids:
            hit = self._cache.get(sid)
            if hit is not None and hit[0] > now:
                found[sid] = hit[1]
                continue
            try:
                record = SubscriptionRecord.from_entity(await self._table.get(_SUB_PARTITION, sid))
            except EntityNotFoundError:
                continue
            self._cache[sid] = (now + self._ttl, record)
            found[sid] = record
        return found

    async def put(self, record: SubscriptionRecord) -> None:
        await self._table.upsert(record.to_entity(), mode="replace")
        self._cache.pop(record.id, None)

    async def put_many(self, records: Sequence[SubscriptionRecord]) -> None:
        """Many records in table transactions (a reconcile creating thousands of subscriptions)."""
        await self._table.upsert_many([r.to_entity() for r in records], mode="replace")
        for record in records:
            self._cache.pop(record.id, None)

    async def delete(self, subscription_id: str) -> None:
        await self._table.delete(_SUB_PARTITION, subscription_id)
        self._cache.pop(subscription_id, None)

    async def list(self) -> AsyncIterator[SubscriptionRecord]:
        async for entity in self._table.list_partition(_SUB_PARTITION):
            yield SubscriptionRecord.from_entity(entity)
