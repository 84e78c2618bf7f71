"""TableMailboxDirectory: TTL cache with an injectable clock, last-good fallback, overrides written safely."""

from __future__ import annotations

import logging

import pytest

from core.domain.model import InboundMethod, TrackingFilter
from core.settings.store import SettingsUnavailableError, TableMailboxDirectory

from .memstore import MemoryRowStore

UID = "4026be43-6b69-e111-8f65-78e7d1620f5e"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def seeded() -> tuple[MemoryRowStore, MemoryRowStore]:
    mailboxes, org = MemoryRowStore(), MemoryRowStore()
    mailboxes.put({"PartitionKey": "mailbox", "RowKey": "alice@contoso.example", "Address": "alice@contoso.example",
                   "CrmKind": "user", "CrmOwnerId": UID, "CrmInbound": "individual", "CrmFilter": "replies"})
    return mailboxes, org


async def test_edits_take_effect_after_the_ttl() -> None:
    mailboxes, org = seeded()
    clock = Clock()
    directory = TableMailboxDirectory(mailboxes, org, ttl_seconds=30, clock=clock)
    first = await directory.get_mailbox("ALICE@contoso.example")
    assert first is not None and first.tracking_filter is TrackingFilter.REPLIES_TO_CRM_EMAIL
    mailboxes.rows[("mailbox", "alice@contoso.example")]["OverrideFilter"] = "all"
    org.put({"PartitionKey": "org", "RowKey": "IgnoreInternalEmail", "Value": "true"})
    clock.now += 29
    cached = await directory.get_mailbox("alice@contoso.example")
    assert cached is not None and cached.tracking_filter is TrackingFilter.REPLIES_TO_CRM_EMAIL
    assert (await directory.get_org_settings()).ignore_internal_email is False
    clock.now += 2
    fresh = await directory.get_mailbox("alice@contoso.example")
    assert fresh is not None and fresh.tracking_filter is TrackingFilter.ALL
    assert (await directory.get_org_settings()).ignore_internal_email is True


async def test_invalid_edit_is_reported_and_last_good_stays(caplog: pytest.LogCaptureFixture) -> None:
    mailboxes, org = seeded()
    clock = Clock()
    directory = TableMailboxDirectory(mailboxes, org, ttl_seconds=10, clock=clock)
    assert (await directory.get_mailbox("alice@contoso.example")) is not None
    mailboxes.rows[("mailbox", "alice@contoso.example")]["OverrideInbound"] = "pigeon"
    mailboxes.put({"PartitionKey": "mailbox", "RowKey": "new@contoso.example", "Address": "new@contoso.example",
                   "OverrideKind": "user", "OverrideOwnerId": "not-a-guid"})
    clock.now += 11
    with caplog.at_level(logging.WARNING, logger="emailrouter.settings"):
        kept = await directory.get_mailbox("alice@contoso.example")
    assert kept is not None and kept.inbound_method is InboundMethod.INDIVIDUAL
    assert await directory.get_mailbox("new@contoso.example") is None  # never valid: absent
    errors = {e.address: e for e in await directory.row_errors()}
    assert "pigeon" in str(errors["alice@contoso.example"]) and "GUID" in str(errors["new@contoso.example"])
    assert sum("settings row ignored" in r.message for r in caplog.records) == 2
    clock.now += 11  # the same problems are not logged again every refresh
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="emailrouter.settings"):
        await directory.list_mailboxes()
    assert not caplog.records


async def test_storage_failure_serves_previous_snapshot() -> None:
    mailboxes, org = seeded()
    clock = Clock()
    directory = TableMailboxDirectory(mailboxes, org, ttl_seconds=5, clock=clock)
    assert len(await directory.list_mailboxes()) == 1
    mailboxes.fail_reads = ConnectionError("storage down")
    clock.now += 6
    assert len(await directory.list_mailboxes()) == 1
    cold = TableMailboxDirectory(mailboxes, org, clock=clock)
    with pytest.raises(SettingsUnavailableError):
        await cold.list_mailboxes()


async def test_set_overrides_validates_writes_only_overrides_and_invalidates() -> None:
    mailboxes, org = seeded()
    directory = TableMailboxDirectory(mailboxes, org, ttl_seconds=3600, clock=Clock())
    await directory.list_mailboxes()
    config = await directory.set_overrides("alice@contoso.example", {"Inbound": "forward",
                                                                   "ForwardSink": "crm-sink@contoso.example"})
    assert config.inbound_method is InboundMethod.FORWARD
    row = mailboxes.rows[("mailbox", "alice@contoso.example")]
    assert row["CrmInbound"] == "individual" and row["OverrideInbound"] == "forward"
    again = await directory.get_mailbox("alice@contoso.example")  # cache invalidated by our own write
    assert again is not None and again.forward_sink_address == "crm-sink@contoso.example"
    with pytest.raises(ValueError, match="OwnerId"):
        await directory.set_overrides("stranger@contoso.example", {"Inbound": "individual"})
    assert ("mailbox", "stranger@contoso.example") not in mailboxes.rows


async def test_set_org_value_is_validated() -> None:
    mailboxes, org = seeded()
    directory = TableMailboxDirectory(mailboxes, org, clock=Clock())
    await directory.set_org_value("maxattachmentbytes", "1024")
    assert org.rows[("org", "MaxAttachmentBytes")]["Value"] == "1024"
    assert (await directory.get_org_settings()).max_attachment_bytes == 1024
    with pytest.raises(ValueError):
        await directory.set_org_value("MaxAttachmentBytes", "lots")
    with pytest.raises(KeyError):
        await directory.set_org_value("Colour", "red")
