"""Pure parts of the Graph emulator: OData parsing, path normalisation, threading, limits, store changes."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest

from emulators.graph.api import normalise_segments
from emulators.graph.conversation import child_index, conversation_id_for, new_conversation_index
from emulators.graph.limits import FaultRegistry, MailboxLimits
from emulators.graph.mail import validate_custom_headers
from emulators.graph.odata import compile_filter, parse_expand, parse_orderby, parse_prefer, split_top_level
from emulators.graph.store import Store
from emulators.graph.util import GraphError, format_dt7, parse_dt

MSG = {"subject": "Quarterly Report", "isRead": False, "importance": "high", "hasAttachments": True,
       "receivedDateTime": "2024-03-01T10:00:00Z", "from": {"emailAddress": {"address": "A@Example.org"}}}


@pytest.mark.parametrize(("expr", "expected"), [
    ("isRead eq false", True),
    ("isRead eq true", False),
    ("receivedDateTime ge 2024-03-01T00:00:00Z and receivedDateTime lt 2024-03-02T00:00:00Z", True),
    ("receivedDateTime gt 2024-03-01T10:00:00Z", False),
    ("hasAttachments eq true AND importance eq 'High'", True),
    ("from/emailAddress/address eq 'a@example.org'", True),
    ("subject eq 'x' or (isRead eq false and not (importance eq 'low'))", True),
    ("contains(subject, 'report')", True),
    ("startswith(subject, 'Annual')", False),
    ("subject eq 'it''s'", False),
])
def test_filter_evaluation(expr: str, expected: bool) -> None:
    assert compile_filter(expr)(MSG) is expected


@pytest.mark.parametrize("expr", ["subject eq", "(isRead eq true", "subject eq 'x' and", "a eq ~"])
def test_filter_rejects_malformed_input(expr: str) -> None:
    with pytest.raises(GraphError) as err:
        compile_filter(expr)
    assert err.value.status == 400


def test_expand_orderby_prefer_and_split() -> None:
    expand = parse_expand("attachments,singleValueExtendedProperties($filter=id eq 'String 0x1042' or id eq 'a,b')")
    assert set(expand) == {"attachments", "singlevalueextendedproperties"}
    assert "0x1042" in expand["singlevalueextendedproperties"]["$filter"]
    assert parse_orderby("receivedDateTime desc, subject") == [("receivedDateTime", True), ("subject", False)]
    prefer = parse_prefer(['IdType="ImmutableId", odata.maxpagesize=50', 'outlook.body-content-type="text"'])
    assert (prefer.immutable_id, prefer.max_page_size, prefer.body_content_type) == (True, 50, "text")
    assert split_top_level("a(b,c),'d,e',f") == ["a(b,c)", "'d,e'", "f"]


def test_segment_normalisation() -> None:
    assert normalise_segments(["users", "u%40x.com", "mailFolders('Inbox')", "messages", "delta()"]) == [
        "users", "u@x.com", "mailFolders", "Inbox", "messages", "delta"]
    assert normalise_segments(["users", "u", "mailFolders", "a", "childFolders", "b", "childFolders", "c",
                               "messages"]) == ["users", "u", "mailFolders", "c", "messages"]
    assert normalise_segments(["users", "u", "mailFolders", "inbox", "messages", "m%3D", "attachments"]) == [
        "users", "u", "messages", "m=", "attachments"]


def test_conversation_index_layout() -> None:
    now = datetime(2024, 5, 1, tzinfo=UTC)
    root = new_conversation_index(now)
    assert len(root) == 22 and root[0] == 1
    child = child_index(root, now + timedelta(minutes=5))
    grandchild = child_index(child, now + timedelta(minutes=9))
    assert child[:22] == root and len(child) == 27 and len(grandchild) == 32
    assert conversation_id_for(root) == conversation_id_for(grandchild)
    assert conversation_id_for(root) != conversation_id_for(new_conversation_index(now))
    delta_ticks = int.from_bytes(child[22:26], "big") & 0x7FFF_FFFF
    assert delta_ticks > 0  # 5 minutes = 3e9 ticks >> 18 ≈ 11444


def test_mailbox_limits_budget_and_concurrency() -> None:
    limits = MailboxLimits(budget=3, window_s=600, concurrency=2)
    limits.acquire("app", "mbx")
    limits.acquire("app", "mbx")
    with pytest.raises(GraphError) as err:
        limits.acquire("app", "mbx")
    assert err.value.status == 429 and "MailboxConcurrency" in err.value.message
    limits.release("app", "mbx")
    limits.acquire("app", "mbx")  # third request of the budget
    limits.release("app", "mbx")
    limits.release("app", "mbx")
    with pytest.raises(GraphError) as err:
        limits.acquire("app", "mbx")
    assert err.value.status == 429 and int(err.value.headers["Retry-After"]) > 0
    limits.acquire("app", "other-mailbox")


def test_fault_registry_count_and_method() -> None:
    faults = FaultRegistry()
    fault = faults.add({"method": "get", "path": "/messages$", "status": 503, "count": 2})
    assert faults.match("POST", "/v1.0/users/u/messages") is None
    assert faults.match("GET", "/v1.0/users/u/messages") is fault
    assert faults.match("GET", "/v1.0/users/u/messages/x") is None
    assert faults.match("GET", "/v1.0/users/u/messages") is fault
    assert faults.match("GET", "/v1.0/users/u/messages") is None and faults.list() == []
    with pytest.raises(GraphError):
        faults.add({"path": "("})


def test_custom_header_validation() -> None:
    assert validate_custom_headers([{"name": "X-A", "value": "1"}]) == [{"name": "X-A", "value": "1"}]
    with pytest.raises(GraphError) as err:
        validate_custom_headers([{"name": "References", "value": "<a@b>"}])
    assert err.value.code == "InvalidInternetMessageHeader"
    with pytest.raises(GraphError) as err:
        validate_custom_headers([{"name": f"x-{i}", "value": ""} for i in range(6)])
    assert err.value.code == "InvalidInternetMessageHeaderCollection"


def test_dates_round_trip_seven_digits() -> None:
    value = parse_dt("2022-01-01T21:42:18.2257768Z")
    assert value == datetime(2022, 1, 1, 21, 42, 18, 225776, tzinfo=UTC)
    assert format_dt7(value) == "2022-01-01T21:42:18.2257760Z"
    assert parse_dt("2030-01-01T00:00:00+00:00").year == 2030


def test_store_move_keeps_immutable_id_and_logs_changes() -> None:
    store = Store()
    events: list[str] = []
    store.add_listener(lambda evs: events.extend(f"{e.kind}{'*' if e.move else ''}" for e in evs))
    user = store.add_user(upn="u@example.org")
    inbox, archive = store.folder(user.id, "Inbox"), store.folder(user.id, "archive")
    assert inbox is not None and archive is not None and inbox.id != archive.id
    row = store.insert_message(user.id, inbox.id, {"subject": "s"}, attachments=[
        {"@odata.type": "#microsoft.graph.fileAttachment", "name": "a", "contentBytes": base64.b64encode(b"x").decode(),
         "isInline": True}])
    assert row.data["hasAttachments"] is False  # inline attachments do not count
    moved = store.move_message(row, archive.id)
    assert moved.iid == row.iid and moved.rid != row.rid
    assert store.get_message(user.id, row.iid) is not None and store.get_message(user.id, row.rid) is None
    assert events == ["created", "deleted*", "created*"]
    assert [c[3] for c in store.changes(inbox.id, 0, store.max_seq())] == ["created", "deleted"]
    assert store.get_user("U@EXAMPLE.ORG") == user


def test_subscription_limits_slide_per_app_and_tenant() -> None:
    from emulators.graph.limits import SubscriptionLimits

    now = [100.0]
    limits = SubscriptionLimits(20.0, writes_per_app=2, writes_per_tenant=3, requests_per_app=4,
                                requests_per_tenant=100, clock=lambda: now[0])
    limits.check("a", "POST")
    now[0] += 5
    limits.check("a", "PATCH")
    with pytest.raises(GraphError) as err:
        limits.check("a", "DELETE")
    assert err.value.status == 429 and err.value.headers["Retry-After"] == "15"  # the oldest write leaves at 120
    limits.check("a", "GET")  # reads count only against the "any request" budget
    limits.check("b", "POST")  # the tenant's third write
    with pytest.raises(GraphError):
        limits.check("c", "POST")  # tenant writes exhausted for every app
    limits.check("a", "GET")
    with pytest.raises(GraphError):
        limits.check("a", "GET")  # app a: 4 requests of any kind (the refused DELETE did not count)
    now[0] += 15.0  # the first write slides out of the window
    limits.check("a", "POST")
