"""Retention against Azurite and the Graph emulator: expired decision records go with their index rows, newer
decisions stay, ledger rows go only once delta can no longer report their messages, the outbound finished index
is trimmed, old processed forward wrappers are deleted, and one run never deletes more than its budget."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from core.adapters import inbound_state
from core.adapters.inbound_state import InboundState, message_id_key
from core.adapters.outbound_state import TableOutboundLedger
from core.adapters.storage import hash_key
from core.bootstrap import Container
from core.config import Settings
from core.names import DECISION_INDEX_TABLE, DECISIONS_TABLE, OUTBOUND_TABLE, PROCESSED_TABLE
from core.services.delta import DeltaCursor
from core.services.inbound import LedgerEntry, LedgerOutcome
from core.services.outbound import LedgerEntry as OutboundEntry
from core.services.outbound import Phase
from core.services.retention import retention_service_for
from local.azurite import Azurite
from tests.unit.settings.localstack import DOMAIN, LocalStack, start_local_stack

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC)
OLD = NOW - timedelta(days=40)
RECENT = NOW - timedelta(days=1)
ALICE, BOB, SINK = f"alice@{DOMAIN}", f"bob@{DOMAIN}", f"crm-sink@{DOMAIN}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, azurite: Azurite) -> Iterator[LocalStack]:
    yield from start_local_stack(tmp_path_factory.mktemp("tls"), azurite)


@pytest.fixture
async def container(stack: LocalStack) -> AsyncIterator[Container]:
    c = Container(Settings({**stack.fresh_values(), "RETENTION_MAX_DELETES": "5000"}))
    try:
        yield c
    finally:
        await c.graph.close()
        await c.storage.close()


async def _decide(state: InboundState, monkeypatch: pytest.MonkeyPatch, at: datetime, mailbox: str, graph_id: str,
                  mid: str) -> None:
    monkeypatch.setattr(inbound_state, "_now", lambda: at)
    await state.decisions.record(mailbox, graph_id, {"mailbox": mailbox, "graphId": graph_id, "internetMessageId": mid,
                                                     "outcome": "skipped:filter:not_accepted", "decisions": []})
    await state.ledger.put(LedgerEntry(mailbox, graph_id, LedgerOutcome.SKIPPED, internet_message_id=mid, at=at))


async def _rows(container: Container, logical: str) -> list[dict[str, Any]]:
    return [dict(e) async for e in container.storage.table(logical).query("PartitionKey ne @x",
                                                                            parameters={"x": ""})]


async def test_expired_records_go_newer_ones_and_delta_reachable_ledger_rows_stay(
        container: Container, stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = container.mailbox_directory
    for address in (ALICE, BOB):
        await directory.set_overrides(address, {"Kind": "user", "OwnerId": str(uuid.uuid4()), "Inbound": "individual"})
    await directory.set_overrides(SINK, {"Kind": "forward_sink"})
    state = InboundState.for_container(container)
    await _decide(state, monkeypatch, OLD, ALICE, "g-old", "<old@x.example>")
    await _decide(state, monkeypatch, RECENT, ALICE, "g-new", "<new@x.example>")
    await _decide(state, monkeypatch, OLD, ALICE, "g-again", "<again@x.example>")  # decided again yesterday:
    await _decide(state, monkeypatch, RECENT, ALICE, "g-again", "<again@x.example>")  # its record stays
    await _decide(state, monkeypatch, OLD, BOB, "g-bob", "<bob@x.example>")
    monkeypatch.undo()
    # Bob's inbox delta round has not seen mail since 50 days ago: a restarted round would read from there, so his
    # 40-day-old ledger row must stay; Alice's round is current.
    await state.delta.put(DeltaCursor(BOB, "inbox", "link", high_water=NOW - timedelta(days=50),
                                      round_started=NOW - timedelta(days=60)))
    await state.delta.put(DeltaCursor(ALICE, "inbox", "link", high_water=NOW - timedelta(minutes=5),
                                      round_started=NOW - timedelta(days=60)))
    outbound = TableOutboundLedger(container.storage)
    for email, at in ((str(uuid.uuid4()), OLD), (str(uuid.uuid4()), RECENT)):
        await outbound.put(OutboundEntry(email, ALICE, Phase.DONE, updated_at=at), etag=None)
    stack.graph_emulator("POST", "seed", {"users": [{"userPrincipalName": SINK, "folders": [
        {"displayName": "Processed", "parent": "inbox"}], "messages": [
        {"folder": "Processed", "subject": "FW: old", "from": ALICE, "to": [SINK],
         "receivedDateTime": OLD.strftime("%Y-%m-%dT%H:%M:%SZ")},
        {"folder": "Processed", "subject": "FW: new", "from": ALICE, "to": [SINK],
         "receivedDateTime": RECENT.strftime("%Y-%m-%dT%H:%M:%SZ")},
        {"folder": "inbox", "subject": "FW: not decided yet", "from": ALICE, "to": [SINK],
         "receivedDateTime": OLD.strftime("%Y-%m-%dT%H:%M:%SZ")}]}]})

    report = await retention_service_for(container, role="test").run()

    assert (report.decisions, report.wrappers, report.outbound_rows) == (2, 1, 1), report.to_json()
    assert report.ledger_rows == 1 and BOB in report.ledger_held and not report.more
    records = {(r["GraphId"]) for r in await _rows(container, DECISIONS_TABLE)}
    assert records == {"g-new", "g-again"}
    index = await _rows(container, DECISION_INDEX_TABLE)
    assert not [r for r in index if r["PartitionKey"] == message_id_key("<old@x.example>")]
    assert [r for r in index if r["PartitionKey"] == message_id_key("<again@x.example>")]  # still explainable
    assert all(r["PartitionKey"] >= f"t{RECENT:%Y%m%d}" for r in index if r["PartitionKey"].startswith("t"))
    ledger = {(r["PartitionKey"], r["RowKey"]) for r in await _rows(container, PROCESSED_TABLE)}
    assert (inbound_state._mailbox_key(ALICE), hash_key("g-old")) not in ledger
    assert (inbound_state._mailbox_key(BOB), hash_key("g-bob")) in ledger  # delta could still report it
    done = [r for r in await _rows(container, OUTBOUND_TABLE) if str(r["PartitionKey"]).startswith("done")]
    assert [r["PartitionKey"] for r in done] == [f"done{RECENT:%Y%m%d}"]
    subjects = sorted([m["subject"] async for m in _messages(container, SINK)])
    assert subjects == ["FW: new", "FW: not decided yet"]  # the Inbox (not decided yet) is never touched

    again = retention_service_for(container, role="test")
    assert not await again.due()  # the delta catch-up timer runs it every RetentionIntervalMinutes
    assert (await again.run()).deleted == 0  # nothing left to do


async def _messages(container: Container, mailbox: str) -> AsyncIterator[dict[str, Any]]:
    folders = [f for f in await container.graph.list_mail_folders(mailbox, "inbox") if f["displayName"] == "Processed"]
    for folder in ["inbox", *(f["id"] for f in folders)]:
        async for message in container.graph.list_messages(mailbox, folder):
            yield await container.graph.get_message(mailbox, str(message["id"]), with_attachments=False)


async def test_one_run_deletes_at_most_its_budget_and_the_next_continues(
        container: Container, stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> None:
    state = InboundState.for_container(container)
    await container.mailbox_directory.set_overrides(ALICE, {"Kind": "user", "OwnerId": str(uuid.uuid4()),
                                                            "Inbound": "individual"})
    for n in range(6):
        await _decide(state, monkeypatch, OLD, ALICE, f"g{n}", f"<m{n}@x.example>")
    monkeypatch.undo()
    small = Container(Settings({**stack.values, "TABLE_PREFIX": container.storage.table_prefix,
                                "RETENTION_MAX_DELETES": "5"}))
    try:
        first = await retention_service_for(small, role="test").run()
        assert first.deleted <= 5 and first.more
        total = first.deleted
        for _ in range(10):
            report = await retention_service_for(small, role="test").run()
            assert report.deleted <= 5
            total += report.deleted
            if not report.more:
                break
    finally:
        await small.graph.close()
        await small.storage.close()
    # Everything went, five at a time (a run that stops half-way through a record finishes it next time).
    for logical in (DECISIONS_TABLE, DECISION_INDEX_TABLE, PROCESSED_TABLE):
        assert not await _rows(container, logical), logical
    assert total >= 6 * 4  # records, their Message-ID and time rows, ledger rows
