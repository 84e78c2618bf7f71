"""Job leases (core.services.jobs.exclusive) over the in-memory lease store: one run at a time, a losing run waits
or is told who holds the job, the lease is renewed while the job runs and released after."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from core.domain.leases import JOB_RECONCILE, Lease, describe_holder
from core.services.jobs import JobBusy, exclusive
from tests.fakes import MemoryLeaseStore


class Time:
    """A clock that sleeping advances (no wall-clock waits)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        await asyncio.sleep(0)


async def test_a_second_run_is_told_who_holds_the_job() -> None:
    time = Time()
    store = MemoryLeaseStore(time)
    async with exclusive(store, JOB_RECONCILE, owner="timer@host-a:1:aa", clock=time, sleep=time.sleep,
                         purpose="all mailboxes"):
        time.now += timedelta(seconds=12)
        with pytest.raises(JobBusy) as busy:
            async with exclusive(store, JOB_RECONCILE, owner="cli@laptop:2:bb", clock=time, sleep=time.sleep):
                raise AssertionError("must not run")
    text = str(busy.value)
    assert "another subscription reconcile is running (all mailboxes): timer@host-a:1:aa" in text
    assert "started 12 s ago" in text
    assert store.rows == {}  # released after the block


async def test_a_waiting_run_goes_ahead_when_the_holder_finishes() -> None:
    time = Time()
    store = MemoryLeaseStore(time)
    told: list[str] = []
    order: list[str] = []

    async def first() -> None:
        async with exclusive(store, JOB_RECONCILE, owner="a", clock=time, sleep=time.sleep):
            order.append("a starts")
            for _ in range(5):
                await time.sleep(1)
            order.append("a ends")

    async def second() -> None:
        await asyncio.sleep(0)
        async with exclusive(store, JOB_RECONCILE, owner="b", wait=120, on_wait=told.append, clock=time,
                             sleep=time.sleep, poll=1):
            order.append("b runs")

    await asyncio.gather(first(), second())
    assert order == ["a starts", "a ends", "b runs"]
    assert len(told) == 1 and "waiting up to 120 s" in told[0]


async def test_the_lease_is_renewed_while_the_job_runs_and_a_lapsed_one_can_be_taken_over() -> None:
    time = Time()
    store = MemoryLeaseStore(time)
    duration = timedelta(seconds=30)
    async with exclusive(store, JOB_RECONCILE, owner="a", duration=duration, clock=time, sleep=time.sleep):
        for _ in range(10):  # 100 s of work: without renewal the 30 s lease would have lapsed
            await time.sleep(10)
        held = store.rows[JOB_RECONCILE]
        assert held.until > time.now  # type: ignore[attr-defined]
        with pytest.raises(JobBusy):
            async with exclusive(store, JOB_RECONCILE, owner="b", clock=time, sleep=time.sleep):
                pass
    # A crashed holder (no release, no renewal): its lease lapses and the next run takes it.
    crashed = await store.acquire(JOB_RECONCILE, "crashed", duration)
    time.now += duration + timedelta(seconds=1)
    async with exclusive(store, JOB_RECONCILE, owner="b", clock=time, sleep=time.sleep) as lease:
        assert lease is not None and lease.owner == "b"
    await store.release(crashed)  # a late release by the old holder does not remove the new one's lease
    assert store.acquired[-1] == "b"


async def test_no_store_means_no_lease() -> None:
    async with exclusive(None, JOB_RECONCILE, owner="x") as lease:
        assert lease is None


def test_describe_holder_names_the_job_and_the_time_left() -> None:
    at = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
    holder = Lease("subscribe/a@x.com/inbox", "timer@h:1:a", at, at + timedelta(seconds=60))
    assert describe_holder(holder, at + timedelta(seconds=15)) == (
        "another subscription create for a@x.com/inbox is running: timer@h:1:a, started 15 s ago; its lease expires "
        "in 45 s unless renewed")
