"""Ports: the small Protocols the services use for I/O. Adapters implement them; tests fake them.

Pipeline-specific ports live next to their service (e.g. the inbound CRM gateway); the ones shared
by several services are here.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from .notifications import SubscriptionInfo

if TYPE_CHECKING:
    from .domain.model import MailboxConfig, OrgEmailSettings
    from .settings.rows import RouterSettings

__all__ = ["MailboxDirectory", "SubscriptionDirectory", "WorkQueue"]


class WorkQueue(Protocol):
    """Enqueue work items (JSON strings) on a named queue."""

    async def send_many(self, queue: str, messages: Sequence[str], *, delay_seconds: int = 0) -> None: ...


class SubscriptionDirectory(Protocol):
    """Our Graph subscriptions by id (what the webhook checks notifications against)."""

    async def get_many(self, subscription_ids: Collection[str]) -> Mapping[str, SubscriptionInfo]: ...


class MailboxDirectory(Protocol):
    """Effective mailbox and org settings (CRM values with admin Table overrides applied).

    Implemented by the settings service (issue 7) over Azure Tables with a short cache; tests use an
    in-memory one. Lookups are by mailbox address, case-insensitive.
    """

    async def get_mailbox(self, address: str) -> MailboxConfig | None: ...

    async def list_mailboxes(self) -> Sequence[MailboxConfig]: ...

    async def get_org_settings(self) -> OrgEmailSettings: ...

    async def get_router_settings(self) -> RouterSettings:
        """Router-only admin knobs from the OrgSettings table (categories, outbound attempts, ...)."""
        ...
