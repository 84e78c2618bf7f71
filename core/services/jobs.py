"""Run a job at most once at a time across every instance and every admin's CLI (``core.domain.leases``).

:func:`exclusive` holds a lease for the duration of a ``async with`` block: it acquires (waiting up to ``wait``
seconds for a running holder to finish), renews the lease in the background every third of its duration while the
block runs, and releases it at the end. A run that does not get the lease in time raises :class:`JobBusy`, whose
message names the holder: the CLI prints it, a timer logs it and returns (its next occurrence runs the job).

The lease is the guard against concurrent runs; the jobs themselves stay idempotent, so a lease that lapses (a
holder that hung past its renewals) costs duplicate work at worst, and the per-mailbox leases (subscription
creates, delta rounds) still stop the duplicates that matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final, Protocol

from core.domain.leases import Lease, LeaseHeld, LeaseLost, describe_holder, renew_interval

if TYPE_CHECKING:
    from core.bootstrap import Container

__all__ = ["DEFAULT_LEASE", "JobBusy", "LeaseStore", "exclusive", "lease_store_for"]

log = logging.getLogger("emailrouter.jobs")

DEFAULT_LEASE: Final = timedelta(seconds=60)


class LeaseStore(Protocol):
    """``core.adapters.leases.TableLeaseStore``; tests use an in-memory one."""

    async def acquire(self, name: str, owner: str, duration: timedelta, *, purpose: str = "") -> Lease: ...

    async def renew(self, lease: Lease, duration: timedelta) -> Lease: ...

    async def release(self, lease: Lease) -> None: ...

    async def get(self, name: str) -> Lease | None: ...

    async def list_held(self, prefix: str = "") -> list[Lease]: ...


class JobBusy(Exception):
    """Another run holds the job's lease; the message says who and since when."""

    def __init__(self, holder: Lease, now: datetime, *, waited: float = 0.0) -> None:
        text = describe_holder(holder, now)
        if waited > 0:
            text += f" (waited {int(waited)} s)"
        super().__init__(text)
        self.holder = holder


async def _heartbeat(store: LeaseStore, box: list[Lease], duration: timedelta,
                     sleep: Callable[[float], Awaitable[None]]) -> None:
    while True:
        await sleep(renew_interval(duration))
        try:
            box[0] = await store.renew(box[0], duration)
        except LeaseLost:
            log.warning("lease %s was lost while the job ran (it lapsed and another run took it); finishing this run",
                        box[0].name)
            return
        except Exception as exc:  # storage hiccup: try again at the next beat, the lease has two beats of slack
            log.warning("renewing lease %s failed (%s); retrying", box[0].name, type(exc).__name__)


@contextlib.asynccontextmanager
async def exclusive(store: LeaseStore | None, name: str, *, owner: str, duration: timedelta = DEFAULT_LEASE,
                    wait: float = 0.0, purpose: str = "", poll: float = 2.0,
                    on_wait: Callable[[str], None] | None = None,
                    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> AsyncIterator[Lease | None]:
    """Hold lease ``name`` while the block runs (``store`` None: no lease, e.g. a unit test's single process).

    ``wait``: seconds to wait for a holder to finish before :class:`JobBusy`; ``on_wait(message)`` is told once
    when the wait starts (the CLI prints it)."""
    if store is None:
        yield None
        return
    started = clock()
    told = False
    while True:
        try:
            lease = await store.acquire(name, owner, duration, purpose=purpose)
            break
        except LeaseHeld as held:
            waited = (clock() - started).total_seconds()
            if waited >= wait:
                raise JobBusy(held.holder, clock(), waited=waited) from None
            if not told and on_wait is not None:
                on_wait(describe_holder(held.holder, clock()) + f"; waiting up to {int(wait)} s")
                told = True
            await sleep(min(poll, max(0.1, wait - waited)))
    box = [lease]
    beat = asyncio.ensure_future(_heartbeat(store, box, duration, sleep))
    try:
        yield lease
    finally:
        beat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beat
        try:
            await store.release(box[0])
        except Exception as exc:  # it expires by itself; the job's result stands
            log.warning("releasing lease %s failed (%s); it expires in %s", name, type(exc).__name__, duration)


def lease_store_for(container: Container) -> LeaseStore:
    from core.adapters.leases import TableLeaseStore
    from core.names import LEASES_TABLE

    return TableLeaseStore(container.storage.table(LEASES_TABLE))
