"""The Table-backed outbound ledger on Azurite honours the same contract as the unit tests' fake."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from core.adapters.outbound_state import TableMailboxOutboundStatus, TableOutboundLedger
from core.adapters.storage import StorageAccount
from core.services.outbound import ActiveMarker, LedgerConflict, LedgerEntry, Phase
from local.azurite import Azurite

pytestmark = pytest.mark.integration


async def test_ledger_writes_are_conditional_and_round_trip(azurite: Azurite) -> None:
    async with StorageAccount(connection_string=azurite.connection_string,
                              table_prefix=f"obs{uuid.uuid4().hex[:8]}") as account:
        ledger = TableOutboundLedger(account)
        now = datetime(2030, 1, 1, tzinfo=UTC)
        entry = LedgerEntry(str(uuid.uuid4()), "alice@contoso.example", Phase.CLAIMED, attempts=2, owner="w1",
                            lease_until=now + timedelta(minutes=5), claimed_at=now)
        etag = await ledger.put(entry, etag=None)
        with pytest.raises(LedgerConflict):
            await ledger.put(entry, etag=None)
        drafted = replace(entry, phase=Phase.DRAFT, draft_id="AAMk/x+y==", internet_message_id="<a@b>",
                          lease_until=None)
        etag2 = await ledger.put(drafted, etag=etag)
        with pytest.raises(LedgerConflict):
            await ledger.put(replace(drafted, phase=Phase.SENT), etag=etag)  # stale etag: lost lease
        got = await ledger.get(entry.email_id)
        assert got is not None and got[1] == etag2
        assert got[0] == drafted  # lease_until removed (replace mode), everything else intact
        assert await ledger.get(str(uuid.uuid4())) is None

        await ledger.put(replace(drafted, phase=Phase.FAILED, last_error="403"), etag=etag2)
        assert [e.email_id for e in await ledger.list_failed()] == [entry.email_id]

        await ledger.mark_active(ActiveMarker(entry.email_id, "alice@contoso.example", now, now, now))
        assert [m.email_id for m in await ledger.list_active()] == [entry.email_id]
        await ledger.clear_active(entry.email_id)
        await ledger.clear_active(entry.email_id)  # idempotent
        assert await ledger.list_active() == []

        status = TableMailboxOutboundStatus(account)
        await status.record_failure("Alice@Contoso.example", entry.email_id, "denied", now)
        await status.record_sent("alice@contoso.example", "other", now)
        row = await status.get("alice@contoso.example")
        assert row is not None and row["LastOutboundError"] == "denied" and row["LastOutboundSentEmailId"] == "other"
