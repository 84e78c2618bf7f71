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
