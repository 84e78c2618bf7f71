"""Ports: the small Protocols the services use for I/O. Adapters implement them; tests fake them."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Protocol

from .notifications import SubscriptionInfo

__all__ = ["SubscriptionDirectory", "WorkQueue"]


class WorkQueue(Protocol):
    """Enqueue work items (JSON strings) on a named queue."""

    async def send_many(self, queue: str, messages: Sequence[str], *, delay_seconds: int = 0) -> None: ...


class SubscriptionDirectory(Protocol):
    """Our Graph subscriptions by id (what the webhook checks notifications against)."""

    async def get_many(self, subscription_ids: Collection[str]) -> Mapping[str, SubscriptionInfo]: ...
