"""FinalOutcomes / RememberingLedger: which ledger writes delta rounds may skip without a read."""

from __future__ import annotations

from typing import Any

from core.adapters.inbound_state import FinalOutcomes, RememberingLedger
from core.domain.records import InboundLedgerEntry, LedgerOutcome
from tests.unit.services.test_inbound_processor import FakeLedger


def ledger(capacity: int = 10) -> RememberingLedger:
    table: Any = FakeLedger()  # the table adapter's get/put, in memory
    return RememberingLedger(table, FinalOutcomes(capacity))


async def test_final_outcomes_are_remembered_and_a_retry_is_not() -> None:
    led = ledger()
    await led.put(InboundLedgerEntry("A@x.com", "m1", LedgerOutcome.TRACKED))
    await led.put(InboundLedgerEntry("a@x.com", "m2", LedgerOutcome.RETRYING))
    assert led.known_final("a@x.com", "m1") and not led.known_final("a@x.com", "m2")
    assert not led.known_final("b@x.com", "m1")  # per mailbox
    # an outcome that stops being final is forgotten (e.g. a re-evaluation that now waits for a retry)
    await led.put(InboundLedgerEntry("a@x.com", "m1", LedgerOutcome.RETRYING))
    assert not led.known_final("a@x.com", "m1")
    assert (await led.get("a@x.com", "m1")) is not None  # reads go to the ledger


def test_the_memory_keeps_the_newest_pairs_only() -> None:
    memory = FinalOutcomes(capacity=3)
    for n in range(5):
        memory.remember("a@x.com", f"m{n}")
    memory.remember("a@x.com", "m2")  # touched again: newest
    memory.remember("a@x.com", "m5")
    assert len(memory) == 3
    assert [memory.final("a@x.com", f"m{n}") for n in range(6)] == [False, False, True, False, True, True]
