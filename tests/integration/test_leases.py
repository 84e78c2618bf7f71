"""Leases as ETag-guarded table rows against Azurite: of many runs racing for a lease exactly one gets it, an expired
lease is taken over by exactly one run, and a run whose lease was taken over can neither renew nor release it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from core.adapters.leases import TableLeaseStore
from core.adapters.storage import StorageAccount
from core.config import Settings
from core.domain.leases import JOB_RECONCILE, LeaseHeld, LeaseLost
from core.names import LEASES_TABLE
from local.azurite import Azurite

pytestmark = pytest.mark.integration


class Time:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def accounts(azurite: Azurite) -> AsyncIterator[list[StorageAccount]]:
    """Eight storage clients on one set of tables: eight processes racing."""
    settings = Settings({"AzureWebJobsStorage": azurite.connection_string, "TABLE_PREFIX": f"t{uuid.uuid4().hex[:12]}"})
    made = [StorageAccount.from_settings(settings) for _ in range(8)]
    try:
        yield made
    finally:
        for account in made:
            await account.close()


async def test_of_many_racing_runs_exactly_one_gets_the_lease(accounts: list[StorageAccount]) -> None:
    time = Time()
    stores = [TableLeaseStore(a.table(LEASES_TABLE), clock=time) for a in accounts]
    await stores[0].get("warm-up")  # create the table once, outside the race

    async def attempt(n: int) -> str | None:
        try:
            await stores[n].acquire(JOB_RECONCILE, f"run-{n}", timedelta(seconds=60), purpose="all mailboxes")
        except LeaseHeld:
            return None
        return f"run-{n}"

    winners = [w for w in await asyncio.gather(*(attempt(n) for n in range(8))) if w]
    assert len(winners) == 1
    holder = await stores[3].get(JOB_RECONCILE)
    assert holder is not None and holder.owner == winners[0] and holder.purpose == "all mailboxes"
    assert [lease.name for lease in await stores[5].list_held("job/")] == [JOB_RECONCILE]


async def test_an_expired_lease_is_taken_over_once_and_the_old_holder_cannot_renew_or_release_it(
        accounts: list[StorageAccount]) -> None:
    time = Time()
    stores = [TableLeaseStore(a.table(LEASES_TABLE), clock=time) for a in accounts]
    old = await stores[0].acquire(JOB_RECONCILE, "crashed", timedelta(seconds=30))
    time.now += timedelta(seconds=31)  # the holder stopped renewing

    async def attempt(n: int) -> str | None:
        try:
            await stores[n].acquire(JOB_RECONCILE, f"run-{n}", timedelta(seconds=30))
        except LeaseHeld:
            return None
        return f"run-{n}"

    winners = [w for w in await asyncio.gather(*(attempt(n) for n in range(1, 8))) if w]
    assert len(winners) == 1
    with pytest.raises(LeaseLost):
        await stores[0].renew(old, timedelta(seconds=30))
    await stores[0].release(old)  # a stale release leaves the new holder's lease alone
    holder = await stores[0].get(JOB_RECONCILE)
    assert holder is not None and holder.owner == winners[0]


async def test_renew_extends_and_release_frees(accounts: list[StorageAccount]) -> None:
    time = Time()
    store = TableLeaseStore(accounts[0].table(LEASES_TABLE), clock=time)
    lease = await store.acquire("delta/a@x.example", "run-a", timedelta(seconds=30))
    time.now += timedelta(seconds=20)
    lease = await store.renew(lease, timedelta(seconds=30))
    time.now += timedelta(seconds=20)  # 40 s after acquiring: alive only because it was renewed
    with pytest.raises(LeaseHeld):
        await store.acquire("delta/a@x.example", "run-b", timedelta(seconds=30))
    await store.release(lease)
    again = await store.acquire("delta/a@x.example", "run-b", timedelta(seconds=30))
    assert again.owner == "run-b"
