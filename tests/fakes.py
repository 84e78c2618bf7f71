"""Fakes of our own ports (never of foreign APIs: those are emulated)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence

from core.notifications import SubscriptionInfo


class FakeWorkQueue:
    def __init__(self) -> None:
        self.messages: dict[str, list[str]] = defaultdict(list)
        self.fail_with: Exception | None = None

    async def send_many(self, queue: str, messages: Sequence[str], *, delay_seconds: int = 0) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.messages[queue].extend(messages)


class FakeSubscriptionDirectory:
    def __init__(self, subs: Sequence[SubscriptionInfo] = ()) -> None:
        self.subs = {s.id: s for s in subs}
        self.lookups = 0

    async def get_many(self, subscription_ids: Collection[str]) -> Mapping[str, SubscriptionInfo]:
        self.lookups += 1
        return {i: self.subs[i] for i in subscription_ids if i in self.subs}


class Clock:
    """An injectable ``sleep`` that records the waits asked for instead of waiting (tests never depend on
    wall-clock speed)."""

    def __init__(self) -> None:
        self.slept: list[float] = []
        self.now = 1000.0  # what ``monotonic`` says: moves only when something sleeps

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += max(0.0, seconds)

    def monotonic(self) -> float:
        return self.now


class StaticMailboxDirectory:
    """In-memory ``core.ports.MailboxDirectory``."""

    def __init__(self, mailboxes=(), org=None, router=None) -> None:  # type: ignore[no-untyped-def]
        from core.domain.model import OrgEmailSettings
        from core.settings.rows import RouterSettings

        self.mailboxes = {m.address.lower(): m for m in mailboxes}
        self.org = org or OrgEmailSettings()
        self.router = router or RouterSettings()

    async def get_mailbox(self, address: str):  # type: ignore[no-untyped-def]
        return self.mailboxes.get(address.lower())

    async def list_mailboxes(self):  # type: ignore[no-untyped-def]
        return list(self.mailboxes.values())

    async def get_org_settings(self):  # type: ignore[no-untyped-def]
        return self.org

    async def get_router_settings(self):  # type: ignore[no-untyped-def]
        return self.router


class MemoryLeaseStore:
    """In-memory ``core.services.jobs.LeaseStore`` with the table store's semantics (first writer wins, an expired
    lease can be taken over, renew/release only by the holder of the current version)."""

    def __init__(self, clock=None) -> None:  # type: ignore[no-untyped-def]
        from datetime import UTC, datetime

        self.clock = clock or (lambda: datetime.now(UTC))
        self.rows: dict[str, object] = {}
        self.version = 0
        self.acquired: list[str] = []  # owners in the order they got a lease

    def _stamp(self) -> str:
        self.version += 1
        return str(self.version)

    async def acquire(self, name, owner, duration, *, purpose=""):  # type: ignore[no-untyped-def]
        from core.domain.leases import Lease, LeaseHeld

        now = self.clock()
        current = self.rows.get(name)
        if current is not None and current.held(now) and current.owner != owner:  # type: ignore[attr-defined]
            raise LeaseHeld(current)  # type: ignore[arg-type]
        lease = Lease(name, owner, now, now + duration, purpose, self._stamp())
        self.rows[name] = lease
        self.acquired.append(owner)
        return lease

    async def renew(self, lease, duration):  # type: ignore[no-untyped-def]
        from dataclasses import replace

        from core.domain.leases import LeaseLost

        current = self.rows.get(lease.name)
        if current is None or current.etag != lease.etag:  # type: ignore[attr-defined]
            raise LeaseLost(lease.name)
        renewed = replace(lease, until=self.clock() + duration, etag=self._stamp())
        self.rows[lease.name] = renewed
        return renewed

    async def release(self, lease) -> None:  # type: ignore[no-untyped-def]
        current = self.rows.get(lease.name)
        if current is not None and current.etag == lease.etag:  # type: ignore[attr-defined]
            del self.rows[lease.name]

    async def get(self, name):  # type: ignore[no-untyped-def]
        return self.rows.get(name)

    async def list_held(self, prefix=""):  # type: ignore[no-untyped-def]
        now = self.clock()
        return [lease for name, lease in self.rows.items() if name.startswith(prefix) and lease.held(now)]  # type: ignore[attr-defined]
