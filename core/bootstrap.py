"""Composition root: builds the real adapters from app settings, lazily, once per process.

Triggers call ``get_container()`` inside the function body (never at import). Each component is
built on first use, so a function that only needs storage never builds a Graph client (msgraph-sdk
costs ~1.5 s to import) and a missing Dataverse setting only fails the functions that need it, with
the setting's name. Tests call ``set_container()`` with fakes, or build a Container over emulators.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING

from core.config import Settings, get_settings

if TYPE_CHECKING:
    from core.adapters.dataverse import DataverseClient
    from core.adapters.graph import GraphMailClient
    from core.adapters.inbound_state import RememberingLedger
    from core.adapters.state import SubscriptionTable
    from core.adapters.storage import StorageAccount
    from core.domain.hot_mailboxes import HotMailboxes
    from core.settings import TableMailboxDirectory

__all__ = ["Container", "StorageWorkQueue", "get_container", "quiet_request_logs", "set_container"]


class StorageWorkQueue:
    """``core.ports.WorkQueue`` over Azure Storage queues (base64, as the Functions host reads them)."""

    def __init__(self, account: StorageAccount) -> None:
        self._account = account
        self._senders: dict[str, object] = {}

    def _sender(self, queue: str):  # type: ignore[no-untyped-def]
        sender = self._senders.get(queue)
        if sender is None:
            sender = self._senders[queue] = self._account.queue_sender(queue)
        return sender

    async def send_many(self, queue: str, messages: Sequence[str], *, delay_seconds: int = 0) -> None:
        await self._sender(queue).send_many(list(messages), visibility_delay=delay_seconds or None)


class Container:
    """The wired application: settings plus lazily-built adapters."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        quiet_request_logs(HTTP_CLIENT_LOGGERS)

    @cached_property
    def storage(self) -> StorageAccount:
        from core.adapters.storage import StorageAccount

        if not self.settings.flag("AZURE_SDK_HTTP_LOGS"):
            quiet_request_logs((SDK_REQUEST_LOGGER,))
        return StorageAccount.from_settings(self.settings)

    @cached_property
    def work_queue(self) -> StorageWorkQueue:
        return StorageWorkQueue(self.storage)

    @cached_property
    def subscription_directory(self) -> SubscriptionTable:
        from core.adapters.state import SubscriptionTable

        return SubscriptionTable(self.storage)

    @cached_property
    def mailbox_directory(self) -> TableMailboxDirectory:
        from core.settings import TableMailboxDirectory

        return TableMailboxDirectory.from_account(self.storage)

    async def close(self) -> None:
        """Close the clients this container built (and only those: nothing is built just to be closed)."""
        for name in ("graph", "dataverse", "storage"):
            client = self.__dict__.get(name)
            if client is not None:
                await client.close()

    @cached_property
    def hot_mailboxes(self) -> HotMailboxes:
        """This process's notification rates per mailbox folder (the webhook's hot-mailbox switch)."""
        from core.domain.hot_mailboxes import HotMailboxes

        s = self.settings
        return HotMailboxes(threshold=s.integer("HOT_MAILBOX_NOTIFICATIONS_PER_MINUTE", minimum=0),
                            delay_s=float(s.integer("HOT_MAILBOX_DELTA_DELAY_SECONDS", minimum=1)))

    @cached_property
    def processed_ledger(self) -> RememberingLedger:
        """The processed ledger, with the memory of what this process finished that the processor writes and delta
        rounds read (one per process: both must share it)."""
        from core.adapters.inbound_state import FinalOutcomes, InboundState, RememberingLedger

        return RememberingLedger(InboundState.for_container(self).ledger, FinalOutcomes())

    @cached_property
    def hot_inline_gate(self) -> asyncio.Semaphore:
        """Messages all hot-mailbox delta rounds of this process work at once (each holds its attachments)."""
        return asyncio.Semaphore(self.settings.integer("HOT_MAILBOX_INLINE_CONCURRENCY", minimum=1))

    @cached_property
    def graph(self) -> GraphMailClient:
        from core.adapters.auth import graph_access_token_provider
        from core.adapters.graph import GraphMailClient

        s = self.settings

        async def graph_user_id(address: str) -> str | None:
            # Graph names a mailbox by object id or UPN; the settings row has the id the CRM sync resolved.
            mailbox = await self.mailbox_directory.get_mailbox(address)
            return mailbox.graph_user_id if mailbox is not None else None

        return GraphMailClient(s.graph_base_url, graph_access_token_provider(s), user_ids=graph_user_id)

    @cached_property
    def dataverse(self) -> DataverseClient:
        from core.adapters.auth import dataverse_token_providers
        from core.adapters.dataverse import DataverseClient
        from core.adapters.dataverse_pool import ServiceProtectionBudget

        s = self.settings
        users = dataverse_token_providers(s)  # the application-user pool (one user unless DATAVERSE_CLIENT_IDS)
        return DataverseClient(s.dataverse_api_base, [p.get_token_async for _, p in users],
                               user_names=[client_id for client_id, _ in users],
                               budget=ServiceProtectionBudget(**s.dataverse_budget_values()))


# Loggers that write one INFO record per HTTP request. The Functions worker ships INFO to Application Insights
# (paid per GB, and a record formatted on the message's CPU for every call):
# * httpx (Graph, Dataverse): "HTTP Request: GET https://...?$filter=... 200 OK", full URL included - Dataverse
#   lookups carry mail addresses in their $filter, which core/adapters/dataverse.py keeps to DEBUG for that reason;
# * azure-core's HttpLoggingPolicy (storage): URL and headers, about eight records per tracked email;
#   AZURE_SDK_HTTP_LOGS=true keeps it for a diagnosis.
HTTP_CLIENT_LOGGERS = ("httpx", "httpcore")
SDK_REQUEST_LOGGER = "azure.core.pipeline.policies.http_logging_policy"


def quiet_request_logs(names: Sequence[str]) -> None:
    """Warnings and errors only for these loggers; one with a level of its own (a developer's DEBUG) is left alone."""
    for name in names:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


_lock = threading.Lock()
_container: Container | None = None


def get_container() -> Container:
    global _container
    if _container is None:
        with _lock:
            if _container is None:
                _container = Container()
    return _container


def set_container(container: Container | None) -> None:
    """Replace the process container (tests, the local host after settings changes)."""
    global _container
    with _lock:
        _container = container
