"""Graph emulator limits and orderings that real Exchange Online imposes (audit graph-fidelity rows 6-12, 15, 21),
over real HTTPS with real tokens: `$batch` concurrency and `dependsOn`, the subscription service's write limits,
delta `$filter` cap / order / `$orderby` / `changeType`, evicted delta tokens, large-attachment PUT rules and
slow-endpoint throttling of notifications. The lifecycle cadence is in tests/integration/test_graph_emulator.py.
"""
# The fixtures (identity emulator, TLS, webhook receiver) are the main emulator suite's, imported by name: their
# parameters shadow the imports by design.
# ruff: noqa: F811

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest

from emulators.common.server import RunningServer
from emulators.graph.testing import RunningGraph, WebhookReceiver, start_graph
from tests.integration.test_graph_emulator import (  # noqa: F401  (fixtures shared with the main emulator suite)
    ALICE,
    BOB,
    FAST,
    READER_ID,
    SECRET,
    bundle,
    deliver,
    identity,
    receiver,
    subscribe,
    tls_dir,
    token_for,
)

pytestmark = pytest.mark.integration


def _graph(tls_dir: Path, identity: RunningServer, **options: Any) -> RunningGraph:
    return start_graph(tls_dir, identity.url, smtp=False, **{**FAST, "shuffle_seed": 7, **options})


@pytest.fixture
def strict(tls_dir: Path, identity: RunningServer) -> Iterator[RunningGraph]:
    g = _graph(tls_dir, identity)
    yield g
    g.stop()


def _clients(g: RunningGraph, identity: RunningServer, bundle: ssl.SSLContext,
             client_id: str | None = None) -> tuple[httpx.Client, httpx.Client]:
    token = token_for(identity.url) if client_id is None else token_for(identity.url, client_id, SECRET)
    return (httpx.Client(base_url=g.base_url, verify=bundle, timeout=30, headers={"Authorization": f"Bearer {token}"}),
            httpx.Client(base_url=f"{g.url}/_emulator", verify=bundle, timeout=30))


def _mail(subject: str, received: datetime) -> bytes:
    msg = EmailMessage()
    msg["From"] = "erin@example.org"
    msg["To"] = ALICE
    msg["Subject"] = subject
    msg["Date"] = received.strftime("%a, %d %b %Y %H:%M:%S +0000")
    msg["Message-ID"] = f"<{subject}.{os.urandom(4).hex()}@example.org>"
    msg.set_content(subject)
    return msg.as_bytes()


# -- $batch -----------------------------------------------------------------------------------------


def test_batch_items_run_concurrently_depends_on_runs_them_in_order(
        strict: RunningGraph, identity: RunningServer, bundle: ssl.SSLContext) -> None:
    c, e = _clients(strict, identity, bundle)
    # every GET of a message list takes 300 ms: six parallel items on one mailbox exceed Outlook's four concurrent
    # requests (429 MailboxConcurrency); the same six chained with dependsOn run one at a time and all succeed
    assert e.post("/faults", json={"method": "GET", "path": "/messages$", "status": 0, "latency_ms": 300}
                  ).status_code == 201
    url = f"/users/{ALICE}/messages"
    parallel = [{"id": str(n), "method": "GET", "url": url} for n in range(1, 7)]
    r = c.post("/$batch", json={"requests": parallel})
    assert r.status_code == 200
    statuses = [x["status"] for x in r.json()["responses"]]
    assert statuses.count(200) == 4 and statuses.count(429) == 2, statuses
    chained = [{"id": str(n), "method": "GET", "url": url, **({"dependsOn": [str(n - 1)]} if n > 1 else {})}
               for n in range(1, 7)]
    r = c.post("/$batch", json={"requests": chained})
    assert [x["status"] for x in r.json()["responses"]] == [200] * 6
    # a failed dependency fails its dependants with 424
    failing = [{"id": "a", "method": "GET", "url": f"/users/{ALICE}/messages/nope"},
               {"id": "b", "method": "GET", "url": url, "dependsOn": ["a"]},
               {"id": "c", "method": "GET", "url": url, "dependsOn": ["b"]}]
    by_id = {x["id"]: x["status"] for x in c.post("/$batch", json={"requests": failing}).json()["responses"]}
    assert by_id == {"a": 404, "b": 424, "c": 424}
    # dependsOn must name an earlier request (no forward references, no cycles)
    forward = [{"id": "1", "method": "GET", "url": url, "dependsOn": ["2"]}, {"id": "2", "method": "GET", "url": url}]
    assert c.post("/$batch", json={"requests": forward}).status_code == 400
    c.close()
    e.close()


def test_batch_responses_come_back_in_another_order(strict: RunningGraph, identity: RunningServer,
                                                    bundle: ssl.SSLContext) -> None:
    c, e = _clients(strict, identity, bundle)
    requests = [{"id": str(n), "method": "GET", "url": f"/users/{ALICE if n % 2 else BOB}"} for n in range(1, 21)]
    responses = c.post("/$batch", json={"requests": requests}).json()["responses"]
    ids = [x["id"] for x in responses]
    assert sorted(ids, key=int) == [str(n) for n in range(1, 21)]
    assert ids != sorted(ids, key=int)  # matched by id, never by position (json-batching)
    c.close()
    e.close()


# -- subscription service limits --------------------------------------------------------------------


def test_subscription_writes_are_limited_per_app_and_per_tenant(
        tls_dir: Path, identity: RunningServer, bundle: ssl.SSLContext, receiver: WebhookReceiver) -> None:
    g = _graph(tls_dir, identity, subscription_writes_per_app=3, subscription_writes_per_tenant=4)
    try:
        app, e = _clients(g, identity, bundle)
        reader, _ = _clients(g, identity, bundle, READER_ID)
        subs = [subscribe(app, receiver, f"users/{ALICE}/messages").json() for _ in range(2)]
        assert app.patch(f"/subscriptions/{subs[0]['id']}", json={}).status_code == 200  # third write
        r = subscribe(app, receiver, f"users/{ALICE}/messages")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text
        assert app.get("/subscriptions").status_code == 200  # reads are not writes
        # inside a batch each item is throttled on its own
        batch = [{"id": "1", "method": "DELETE", "url": f"/subscriptions/{subs[1]['id']}"}]
        item = app.post("/$batch", json={"requests": batch}).json()["responses"][0]
        assert item["status"] == 429 and "Retry-After" in item["headers"]
        # the tenant's 2,000 (here 4) writes span every app: one more write for another app, then 429
        assert subscribe(reader, receiver, f"users/{ALICE}/messages").status_code == 201
        assert subscribe(reader, receiver, f"users/{ALICE}/messages").status_code == 429
        for client in (app, reader, e):
            client.close()
    finally:
        g.stop()


# -- delta ------------------------------------------------------------------------------------------


def _delta(c: httpx.Client, first: str, **params: str) -> tuple[list[dict[str, Any]], str]:
    items: list[dict[str, Any]] = []
    r = c.get(first, params=params or None, headers={"Prefer": "odata.maxpagesize=3"})
    while True:
        assert r.status_code == 200, r.text
        body = r.json()
        items.extend(body["value"])
        if "@odata.deltaLink" in body:
            return items, body["@odata.deltaLink"]
        r = c.get(body["@odata.nextLink"], headers={"Prefer": "odata.maxpagesize=3"})


def test_delta_filter_caps_results_order_is_not_guaranteed_without_orderby(
        strict: RunningGraph, identity: RunningServer, bundle: ssl.SSLContext) -> None:
    c, e = _clients(strict, identity, bundle)
    assert e.post("/config", json={"delta_filter_cap": 5}).status_code == 200
    start = datetime.now(UTC) - timedelta(hours=2)
    messages = [{"subject": f"m{n}", "from": "erin@example.org", "to": [ALICE],
                 "receivedDateTime": (start + timedelta(minutes=n)).strftime("%Y-%m-%dT%H:%M:%SZ")} for n in range(8)]
    assert e.post("/seed", json={"users": [{"userPrincipalName": ALICE, "messages": messages}]}).status_code == 200
    url = f"/users/{ALICE}/mailFolders/inbox/messages/delta"
    since = (start - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    select = "id,receivedDateTime,subject"
    newest_first, _ = _delta(c, url, **{"$select": select, "$filter": f"receivedDateTime ge {since}",
                                        "$orderby": "receivedDateTime desc"})
    received = [m["receivedDateTime"] for m in newest_first]
    assert len(received) == 5 and received == sorted(received, reverse=True)  # the cap keeps the newest five
    unordered, _ = _delta(c, url, **{"$select": select, "$filter": f"receivedDateTime ge {since}"})
    received = [m["receivedDateTime"] for m in unordered]
    assert len(received) == 5 and received != sorted(received, reverse=True)
    everything, _ = _delta(c, url, **{"$select": select})
    assert len(everything) == len(c.get(f"/users/{ALICE}/mailFolders/inbox/messages",
                                        params={"$top": "100"}).json()["value"])  # no $filter: no cap
    r = c.get(url, params={"$orderby": "subject"})
    assert r.status_code == 400
    c.close()
    e.close()


def test_delta_change_type_created_is_kept_in_the_links(strict: RunningGraph, identity: RunningServer,
                                                        bundle: ssl.SSLContext) -> None:
    c, e = _clients(strict, identity, bundle)
    for n in range(2):
        deliver(e, _mail(f"old{n}", datetime.now(UTC)), [ALICE])
    url = f"/users/{ALICE}/mailFolders/inbox/messages/delta"
    first, created_link = _delta(c, url, **{"$select": "id,subject", "changeType": "created"})
    _, all_link = _delta(c, url, **{"$select": "id,subject"})
    assert first, "the initial round lists the folder's messages as created"
    c.patch(f"/users/{ALICE}/messages/{first[0]['id']}", json={"isRead": True}).raise_for_status()
    new = deliver(e, _mail("fresh", datetime.now(UTC)), [ALICE])["delivered"][0]
    projects = c.post(f"/users/{ALICE}/mailFolders", json={"displayName": "Projects"}).json()
    moved = c.post(f"/users/{ALICE}/messages/{first[1]['id']}/move", json={"destinationId": projects["id"]}).json()
    created, _ = _delta(c, created_link)  # the link carries changeType=created: no updates, no removals
    assert [m["id"] for m in created] == [new["id"]]
    changed, _ = _delta(c, all_link)
    assert {m["id"] for m in changed if "@removed" not in m} == {first[0]["id"], new["id"]}
    assert any("@removed" in m for m in changed)
    # a message moved into a folder is reported there as created (emulator's reading; see docs/inbound.md)
    _, projects_link = _delta(c, f"/users/{ALICE}/mailFolders/{projects['id']}/messages/delta",
                              **{"changeType": "created"})
    again = c.post(f"/users/{ALICE}/messages/{moved['id']}/move", json={"destinationId": "inbox"}).json()
    back = c.post(f"/users/{ALICE}/messages/{again['id']}/move", json={"destinationId": projects["id"]}).json()
    moved_in, _ = _delta(c, projects_link)
    assert [m["id"] for m in moved_in] == [back["id"]]
    c.close()
    e.close()


def test_evicted_delta_tokens_answer_a_reset_code(strict: RunningGraph, identity: RunningServer,
                                                  bundle: ssl.SSLContext) -> None:
    c, e = _clients(strict, identity, bundle)
    _, link = _delta(c, f"/users/{ALICE}/mailFolders/inbox/messages/delta")
    assert e.post("/config", json={"delta_evict_probability": 1.0}).status_code == 200
    codes = set()
    for _ in range(12):
        r = c.get(link)
        assert r.status_code == 410 and "$deltatoken=" in r.headers["location"]
        codes.add(r.json()["error"]["code"])
    assert codes <= {"syncStateNotFound", "resyncRequired", "SyncStateInvalid"} and len(codes) >= 2
    assert e.post("/config", json={"delta_evict_probability": 0.0}).status_code == 200
    assert c.get(link).status_code == 200
    assert e.post("/config", json={"no_such_setting": 1}).status_code == 400
    c.close()
    e.close()


# -- large attachments ------------------------------------------------------------------------------


def test_upload_byte_ranges_must_be_smaller_than_4_mb(strict: RunningGraph, identity: RunningServer,
                                                      bundle: ssl.SSLContext) -> None:
    c, e = _clients(strict, identity, bundle)
    draft = c.post(f"/users/{ALICE}/messages", json={"subject": "big"}).json()
    data = os.urandom(4_000_000 + 10)
    session = c.post(f"/users/{ALICE}/messages/{draft['id']}/attachments/createUploadSession",
                     json={"AttachmentItem": {"attachmentType": "file", "name": "big.bin", "size": len(data)}}).json()
    octet = {"Content-Type": "application/octet-stream"}
    with httpx.Client(verify=bundle) as raw:
        r = raw.put(session["uploadUrl"], content=data[:4_000_000],
                    headers={**octet, "Content-Range": f"bytes 0-3999999/{len(data)}"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalidRange"
        r = raw.put(session["uploadUrl"], content=data[:3_999_999],
                    headers={**octet, "Content-Range": f"bytes 0-3999998/{len(data)}"})
        assert r.status_code == 200 and r.json()["nextExpectedRanges"] == ["3999999"]
    c.close()
    e.close()


# -- slow notification endpoints --------------------------------------------------------------------


def test_slow_endpoints_are_throttled_then_dropped_with_missed(
        tls_dir: Path, identity: RunningServer, bundle: ssl.SSLContext, receiver: WebhookReceiver) -> None:
    g = _graph(tls_dir, identity, slow_endpoint_throttling=True, slow_min_notifications=3,
               slow_notification_ms=100.0, slow_delay_s=600.0, notification_batch_max=1)
    try:
        c, e = _clients(g, identity, bundle)
        sub = subscribe(c, receiver, f"users/{ALICE}/mailFolders('inbox')/messages", changeType="created").json()
        receiver.notify_delay_s = 0.3  # every answer is "slow" (> slow_notification_ms)
        for n in range(3):
            deliver(e, _mail(f"slow{n}", datetime.now(UTC)), [ALICE])
            assert receiver.wait_for(lambda r, n=n: len(r.notifications) == n + 1)
        # 100 % slow after the minimum count: >= 15 % -> dropped, and the app hears `missed`
        receiver.notify_delay_s = 0.0
        deliver(e, _mail("dropped", datetime.now(UTC)), [ALICE])
        assert receiver.wait_for(lambda r: any(x["lifecycleEvent"] == "missed" and x["subscriptionId"] == sub["id"]
                                               for x in r.lifecycle))
        assert len(receiver.notifications) == 3 and g.emulator.notifier.slow_dropped == 1
        # between 10 % and 15 % slow: flagged, notifications held back by slow_delay_s (10 minutes)
        stats = g.emulator.notifier._slow[sub["notificationUrl"]]
        stats.total, stats.slow = 100, 12
        deliver(e, _mail("delayed", datetime.now(UTC)), [ALICE])
        assert receiver.wait_for(lambda r: g.emulator.notifier.pending_count() == 1)
        assert len(receiver.notifications) == 3
        c.close()
        e.close()
    finally:
        g.stop()
