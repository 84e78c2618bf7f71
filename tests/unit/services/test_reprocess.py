"""Which messages ``emailrouter reprocess`` puts back on the queue (pure), and the work item it uses."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from core.adapters.inbound_state import DecisionHit
from core.services.reprocess import reprocess_items
from core.work_items import InboundItem, InvalidWorkItem

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def hit(graph_id: str, kind: str, minutes_ago: int, *, mailbox: str = "erin@x.example", folder: str = "inbox"
        ) -> DecisionHit:
    outcome = {"skipped": "skipped:filter:not_accepted", "failed": "failed:crm_rejected"}.get(kind, kind)
    return DecisionHit(at=NOW - timedelta(minutes=minutes_ago), mailbox=mailbox, graph_id=graph_id, outcome=outcome,
                       kind=kind, code="", why="", sender="nora@northwind.example", subject="s",
                       internet_message_id=f"<{graph_id}@x>", tracked_for="", activity_id="", source="delta",
                       folder=folder)


def test_only_messages_whose_latest_decision_is_asked_for_are_queued() -> None:
    hits = [  # newest first, as the index answers
        hit("g1", "tracked", 1), hit("g1", "skipped", 60),  # skipped, then tracked: left alone
        hit("g2", "skipped", 5, folder="sentitems"),
        hit("g3", "failed", 6),
        hit("g4", "gone", 7),
        hit("g2", "skipped", 90),  # an older decision of g2: counted once
    ]
    planned = reprocess_items(hits, ("skipped",), NOW)
    assert [(h.graph_id, i.folder) for h, i in planned] == [("g2", "sentitems")]
    item = planned[0][1]
    assert item.source == "reprocess" and item.reevaluates == {"skipped"} and item.requested_at == NOW.isoformat()
    both = reprocess_items(hits, ("failed", "skipped"), NOW)
    assert [h.graph_id for h, _ in both] == ["g2", "g3"]
    assert both[0][1].reevaluate == "skipped,failed"


def test_the_work_item_round_trips_and_plain_items_stay_as_they_were() -> None:
    item = InboundItem("a@x", "g1", "reprocess", folder="inbox", reevaluate="skipped", requested_at=NOW.isoformat())
    assert InboundItem.from_json(item.to_json()) == item
    plain = InboundItem("a@x", "g1", "delta", folder="inbox")
    assert "reevaluate" not in plain.to_json() and InboundItem.from_json(plain.to_json()) == plain
    with pytest.raises(InvalidWorkItem, match="reevaluate"):
        InboundItem.from_json(item.to_json().replace('"skipped"', '"tracked"'))
