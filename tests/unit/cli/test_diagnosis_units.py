"""Pure parts of the diagnosis commands: ``--since`` parsing, the decision trail from a stored record, the index's
time keys, and the status page's escaping."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from core.adapters.inbound_state import TableDecisionLog, message_id_key
from core.adapters.storage import day_partitions, inverted_time_key
from core.cli.diagnose import parse_since
from core.cli.registry import UsageError
from core.domain.inbound import explain_record
from core.services.status import MailboxLine, StatusReport
from core.status_page import render_status_page

NOW = datetime(2024, 5, 2, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("text", "expected"), [
    ("30m", NOW - timedelta(minutes=30)), ("2h", NOW - timedelta(hours=2)), ("7d", NOW - timedelta(days=7)),
    ("2w", NOW - timedelta(weeks=2)), ("2024-05-01", datetime(2024, 5, 1, tzinfo=UTC)),
])
def test_parse_since(text: str, expected: datetime) -> None:
    assert parse_since(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "3x", "2099-01-01", "2000-01-01"])
def test_parse_since_refuses(text: str) -> None:
    with pytest.raises(UsageError):
        parse_since(text, NOW)


def test_explain_record_reads_every_outcome() -> None:
    steps = [{"step": "mailbox", "outcome": "ok", "why": "user mailbox a@x"},
             {"step": "filter", "outcome": "skip:not_accepted", "why": "no CRM record accepted it"}]
    skipped = explain_record({"outcome": "skipped:filter:not_accepted", "decisions": steps})
    assert skipped.splitlines()[0] == "NOT TRACKED (filter: not_accepted) - no CRM record accepted it"
    assert "mailbox" in skipped.splitlines()[1] and "user mailbox a@x" in skipped.splitlines()[1]
    assert explain_record({"outcome": "tracked", "activityId": "abc", "decisions": steps}).startswith(
        "TRACKED as email abc")
    assert explain_record({"outcome": "failed:crm_rejected", "decisions": [
        {"step": "processing", "outcome": "crm_rejected", "why": "Dataverse 400"}]}).startswith(
        "FAILED (crm_rejected) - Dataverse 400")
    assert explain_record({"outcome": "skipped:mailbox:unknown", "decisions": [
        {"step": "mailbox", "outcome": "skip:mailbox:unknown", "why": "not configured"}]}).startswith(
        "NOT TRACKED (mailbox: unknown) - not configured")
    assert explain_record({"outcome": "gone:gone", "decisions": []}).startswith("NOT TRACKED (gone)")


def test_time_keys_sort_newest_first_and_cover_a_window() -> None:
    older, newer = inverted_time_key(NOW - timedelta(seconds=1)), inverted_time_key(NOW)
    assert newer < older and len(newer) == 13
    assert day_partitions(NOW - timedelta(days=2), NOW, "t") == ["t20240502", "t20240501", "t20240430"]
    assert message_id_key("<A@b.example>") == message_id_key("a@b.example ")


def test_index_rows_point_to_the_record_and_carry_what_a_search_filters() -> None:
    record = {"internetMessageId": "<wrapper@x>", "originalInternetMessageId": "<orig@y>", "mailbox": "sink@x",
              "outcome": "skipped:filter:not_accepted", "from": "nora@n.example", "subject": "Hi",
              "trackedFor": "bob@x",
              "decisions": [{"step": "filter", "outcome": "skip:not_accepted", "why": "nobody accepted"}]}
    rows = TableDecisionLog._index_rows("sink@x", "g1", record, NOW)
    time_row, *mid_rows = rows
    assert time_row["PartitionKey"] == "t20240502" and time_row["Kind"] == "skipped"
    assert time_row["Code"] == "not_accepted" and time_row["Why"] == "nobody accepted"
    assert time_row["TrackedFor"] == "bob@x" and time_row["From"] == "nora@n.example"
    assert {r["PartitionKey"] for r in mid_rows} == {message_id_key("<wrapper@x>"), message_id_key("<orig@y>")}
    assert all(r["Mailbox"] == "sink@x" and r["GraphId"] == "g1" for r in rows)


def test_status_page_escapes_everything_from_data() -> None:
    hostile = "<img src=x onerror=alert(1)>&\"'"
    report = StatusReport(at=NOW, window=timedelta(hours=1), mailboxes=[MailboxLine(
        address="a@x", kind="user", inbound="individual", outbound="router", health="failing", last_probe="",
        last_error=hostile, pending="", inbound_error=hostile, inbound_error_at="", outbound_error="",
        outbound_error_at="")],
        skip_reasons=[(hostile, 1, hostile)], counts={"skipped": 1})
    page = render_status_page(report)
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;&amp;&quot;&#x27;" in page
    assert "<script" not in page
