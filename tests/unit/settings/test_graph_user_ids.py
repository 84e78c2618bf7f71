"""Mailboxes resolved to their Entra object id at CRM sync (audit graph-fidelity #3): Graph documents
``/users/{id | userPrincipalName}`` only, and CRM holds the primary SMTP address, which can differ from the UPN."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from core.domain.model import MailboxConfig
from core.settings.crm_sync import CrmSyncService
from core.settings.rows import MAILBOX_PARTITION, parse_graph_user, parse_mailbox_row, row_key
from tests.unit.settings.memstore import MemoryRowStore

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
HANA_ID = "0b5f3c1e-7d2a-4a57-9d8e-0c9e7a6a1f01"


class FakeCrm:
    def __init__(self) -> None:
        self.users = [
            {"systemuserid": "00000000-0000-0000-0000-000000000001", "internalemailaddress": "hana@contoso.example",
             "incomingemaildeliverymethod": 2, "outgoingemaildeliverymethod": 2, "emailrouteraccessapproval": 1},
            {"systemuserid": "00000000-0000-0000-0000-000000000002", "internalemailaddress": "ghost@contoso.example",
             "incomingemaildeliverymethod": 2, "outgoingemaildeliverymethod": 0, "emailrouteraccessapproval": 1},
        ]

    async def list(self, entity_set: str, *, select: Sequence[str] | None = None, filter: str | None = None,
                   page_size: int | None = None) -> AsyncIterator[dict[str, Any]]:
        for row in self.users if entity_set == "systemusers" else []:
            yield row


class FakeDirectory:
    def __init__(self, fail: Exception | None = None) -> None:
        self.asked: list[list[str]] = []
        self.fail = fail

    async def find_user_ids(self, addresses: Sequence[str]) -> dict[str, str]:
        self.asked.append(sorted(addresses))
        if self.fail is not None:
            raise self.fail
        return {a: HANA_ID for a in addresses if a == "hana@contoso.example"}


async def test_sync_resolves_each_new_mailbox_once() -> None:
    mailboxes, org = MemoryRowStore(), MemoryRowStore()
    directory = FakeDirectory()
    sync = CrmSyncService(FakeCrm(), mailboxes, org, users=directory, clock=lambda: NOW)
    report = await sync.run()
    row = mailboxes.rows[(MAILBOX_PARTITION, row_key("hana@contoso.example"))]
    assert row["CrmGraphUserId"] == HANA_ID
    config = parse_mailbox_row(row)
    assert isinstance(config, MailboxConfig) and config.graph_user == HANA_ID
    assert any("ghost@contoso.example: no Entra user" in e for e in report.errors)
    ghost = parse_mailbox_row(mailboxes.rows[(MAILBOX_PARTITION, row_key("ghost@contoso.example"))])
    assert isinstance(ghost, MailboxConfig) and ghost.graph_user == "ghost@contoso.example"  # falls back

    again = await sync.run()
    assert directory.asked == [["ghost@contoso.example", "hana@contoso.example"], ["ghost@contoso.example"]]
    assert not again.changed  # resolved ids are kept, nothing rewritten


async def test_an_admin_override_wins_and_directory_failures_do_not_stop_the_sync() -> None:
    mailboxes, org = MemoryRowStore(), MemoryRowStore()
    sync = CrmSyncService(FakeCrm(), mailboxes, org, users=FakeDirectory(PermissionError("403")), clock=lambda: NOW)
    report = await sync.run()
    assert any("needs User.Read.All" in e for e in report.errors)
    row = mailboxes.rows[(MAILBOX_PARTITION, row_key("hana@contoso.example"))]
    assert "CrmGraphUserId" not in row and row["CrmInbound"] == "individual"
    row["OverrideGraphUserId"] = "Hana.Hill@contoso.example"
    config = parse_mailbox_row(row)
    assert isinstance(config, MailboxConfig) and config.graph_user == "hana.hill@contoso.example"


@pytest.mark.parametrize("value", ["not a user", "a/b@c", ""])
def test_graph_user_must_be_an_object_id_or_a_upn(value: str) -> None:
    with pytest.raises(ValueError):
        parse_graph_user(value)
    assert parse_graph_user(HANA_ID.upper()) == HANA_ID
