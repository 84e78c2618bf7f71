"""The inbound pipeline end to end over the emulators + Azurite, with the real adapters and services.

Mail comes in over SMTP; Graph POSTs real change notifications to a loopback receiver; their bodies go through the
webhook service onto the Azurite queue; the test drains the queue through the processor (as the queue trigger
does) and asserts on the Dataverse emulator's store. Calls per tracked email are counted from the emulators'
request logs.
"""

from __future__ import annotations

import asyncio
import smtplib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from email.message import EmailMessage
from typing import Any

import httpx
import pytest

pytest.importorskip("emulators.graph.testing", reason="Graph emulator package not present")
pytest.importorskip("emulators.dataverse.testing", reason="Dataverse emulator package not present")

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from core.adapters.storage import QueueBrowser
from core.bootstrap import Container
from core.config import Settings
from core.domain.hot_mailboxes import HotMailboxes
from core.domain.identity import activity_id_for
from core.domain.model import (
    CrmRecordRef,
    CrmTable,
    InboundMethod,
    MailboxConfig,
    MailboxKind,
    OrgEmailSettings,
    TrackingFilter,
    WrapperTrustPolicy,
)
from core.names import INBOUND_QUEUE, MAILBOX_SYNC_QUEUE
from core.services.delta import DeltaReport, delta_service_for
from core.services.inbound import processor_for
from core.services.subscriptions import service_for
from core.services.webhook import handle_change_notifications, handle_lifecycle_notifications
from core.work_items import MailboxSyncItem
from emulators.common import demo
from emulators.common.server import RunningServer, start_in_thread
from emulators.common.tls import TlsMaterial, client_env, ensure_tls
from emulators.dataverse.seed import demo_seed as dataverse_demo_seed
from emulators.dataverse.seed import demo_user_id
from emulators.dataverse.testing import RunningDataverse, start_dataverse
from emulators.graph.seed import default_seed as graph_demo_seed
from emulators.graph.testing import RunningGraph, start_graph
from emulators.identity.testing import start_identity
from local.azurite import Azurite
from tests.fakes import StaticMailboxDirectory

pytestmark = pytest.mark.integration

DOMAIN = demo.TENANT_DOMAIN
ERIN_ID = "c0ffee00-0000-4000-8000-00000000e210"
KEY = "test-function-key"


def ref(local: str) -> CrmRecordRef:
    return CrmRecordRef(CrmTable.SYSTEMUSER, uuid.UUID(demo_user_id(local)))


ERIN = CrmRecordRef(CrmTable.SYSTEMUSER, uuid.UUID(ERIN_ID))
SINK = f"crm-sink@{DOMAIN}"


def mailboxes() -> list[MailboxConfig]:
    def user(local: str, method: InboundMethod, owner: CrmRecordRef | None = None, **kw: Any) -> MailboxConfig:
        return MailboxConfig(f"{local}@{DOMAIN}", MailboxKind.USER, owner=owner or ref(local),
                             inbound_method=method, tracking_filter=TrackingFilter.ALL, **kw)

    return [
        user("alice", InboundMethod.INDIVIDUAL),
        user("erin", InboundMethod.INDIVIDUAL, ERIN),
        user("bob", InboundMethod.FORWARD, forward_sink_address=SINK),
        user("carol", InboundMethod.OUTLOOK),
        user("dave", InboundMethod.NONE),
        MailboxConfig(SINK, MailboxKind.FORWARD_SINK, delete_after_processing=True),
    ]


ORG = OrgEmailSettings(
    internal_domains=frozenset({DOMAIN}),
    # The Graph emulator does not stamp X-MS-Exchange-Organization-AuthAs (an Exchange transport header).
    wrapper_trust=WrapperTrustPolicy(require_internal_auth=False),
    max_attachment_bytes=5_242_880,
)


# ------------------------------------------------------------------------------------------------ receiver


@dataclass
class Receiver:
    """Our webhook's stand-in: answers Graph's validation handshake, keeps every POST body for the test to feed
    through the real webhook service (which needs the test's event loop and storage clients)."""

    server: RunningServer | None = None
    bodies: list[tuple[str, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    validating: int = 0
    most_validating: int = 0  # the most validation handshakes answered at once (subscription create pacing)

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return self.server.url

    def take(self) -> list[tuple[str, bytes]]:
        with self.lock:
            out, self.bodies = self.bodies, []
        return out


def start_receiver() -> Receiver:
    receiver = Receiver()

    async def endpoint(request: Request) -> Response:
        token = request.query_params.get("validationToken")
        if token is not None:
            with receiver.lock:
                receiver.validating += 1
                receiver.most_validating = max(receiver.most_validating, receiver.validating)
            await asyncio.sleep(0.05)  # a webhook takes a moment: concurrent handshakes overlap
            with receiver.lock:
                receiver.validating -= 1
            return PlainTextResponse(token)
        if request.query_params.get("code") != KEY:
            return Response(status_code=401)
        with receiver.lock:
            receiver.bodies.append((request.url.path, await request.body()))
        return Response(status_code=202)

    app = Starlette(routes=[Route("/graph/notifications", endpoint, methods=["POST"]),
                            Route("/graph/lifecycle", endpoint, methods=["POST"])])
    receiver.server = start_in_thread(app)
    return receiver


# ------------------------------------------------------------------------------------------------ fixtures


@dataclass
class Env:
    tls: TlsMaterial
    identity: RunningServer
    graph: RunningGraph
    dataverse: RunningDataverse
    receiver: Receiver


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tls = ensure_tls(tmp_path_factory.mktemp("tls"))
    graph_seed = graph_demo_seed()
    graph_seed.setdefault("users", []).append({"id": "c0ffee00-0000-4000-8000-000000000120",
                                               "userPrincipalName": f"erin@{DOMAIN}", "displayName": "Erin"})
    dv_seed = dataverse_demo_seed()
    dv_seed["systemusers"].append({"systemuserid": ERIN_ID, "firstname": "Erin", "lastname": "Evans",
                                   "internalemailaddress": f"erin@{DOMAIN}", "incomingemaildeliverymethod": 2,
                                   "outgoingemaildeliverymethod": 2, "emailrouteraccessapproval": 1})
    with pytest.MonkeyPatch.context() as mp:
        for name, value in client_env(tls).items():
            mp.setenv(name, value)
        identity = start_identity(tls.ca_cert.parent)
        graph = start_graph(tls.ca_cert.parent, identity.url, seed=graph_seed, missed_after_s=0.5)
        dataverse = start_dataverse(tls.ca_cert.parent, identity.url, seed=dv_seed)
        receiver = start_receiver()
        try:
            yield Env(tls, identity, graph, dataverse, receiver)
        finally:
            receiver.server.stop()  # type: ignore[union-attr]
            dataverse.stop()
            graph.stop()
            identity.stop()


class Pipeline:
    def __init__(self, env: Env, container: Container) -> None:
        self.env = env
        self.c = container
        self.http = httpx.AsyncClient(verify=str(env.tls.bundle), timeout=30)
        self.hot: HotMailboxes | None = None  # the webhook's hot-mailbox switch (off unless a test sets it)
        self.sync_reports: list[DeltaReport] = []

    # -- emulator helpers ---------------------------------------------------------------------------------

    async def emu(self, which: str, method: str, path: str, body: Any = None) -> Any:
        base = self.env.graph.url if which == "graph" else self.env.dataverse.url
        response = await self.http.request(method, f"{base}/_emulator/{path}", json=body)
        response.raise_for_status()
        return response.json() if response.content else None

    async def clear_logs(self) -> None:
        await self.emu("graph", "DELETE", "requests")
        await self.emu("dataverse", "DELETE", "requests")

    async def pipeline_calls(self) -> tuple[int, int]:
        """Graph and Dataverse requests since ``clear_logs`` made by the pipeline (the processor uses only
        ``$batch`` against Dataverse; the test's own reads are plain GETs and are left out)."""
        g = await self.emu("graph", "GET", "requests")
        d = await self.emu("dataverse", "GET", "requests")
        return len(g["value"]), sum(1 for r in d["value"] if "$batch" in r["path"])

    def smtp(self, sender: str, to: list[str], subject: str, *, body: str = "Hello from outside",
             attachment: bytes | None = None, headers: dict[str, str] | None = None) -> str:
        msg = EmailMessage()
        mid = f"<{uuid.uuid4().hex}@fabrikam.example>"
        msg["From"], msg["To"], msg["Subject"], msg["Message-ID"] = sender, ", ".join(to), subject, mid
        for name, value in (headers or {}).items():
            msg[name] = value
        msg.set_content(body)
        if attachment is not None:
            msg.add_attachment(attachment, maintype="application", subtype="octet-stream", filename="big.bin")
        port = self.env.graph.smtp_port
        assert port is not None
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.send_message(msg)
        return mid

    # -- the pipeline -------------------------------------------------------------------------------------

    async def subscribe(self) -> dict[str, Any]:
        report = await service_for(self.c).reconcile()
        return report.as_dict()

    async def pump_webhooks(self) -> None:
        for path, body in self.env.receiver.take():
            if path.endswith("lifecycle"):
                result = await handle_lifecycle_notifications(
                    body, directory=self.c.subscription_directory, queue=self.c.work_queue,
                    tenant_id=demo.TENANT_ID, max_bytes=1_048_576)
            else:
                result = await handle_change_notifications(
                    body, directory=self.c.subscription_directory, queue=self.c.work_queue,
                    tenant_id=demo.TENANT_ID, max_bytes=1_048_576, hot=self.hot)
            assert result.status == 202, result

    async def drain(self, done: Callable[[], Awaitable[bool]], *, within: float = 60.0) -> None:
        """Run the pipeline (webhook -> queue -> processor / mailbox sync) until ``done()`` or the deadline."""
        processor = processor_for(self.c)
        inbound = QueueBrowser(self.c.storage, INBOUND_QUEUE)
        sync = QueueBrowser(self.c.storage, MAILBOX_SYNC_QUEUE)
        deadline = time.monotonic() + within
        quiet_rounds = 0
        while time.monotonic() < deadline:
            await self.pump_webhooks()
            items = await inbound.receive(32, visibility_timeout=5)
            syncs = await sync.receive(8, visibility_timeout=5)
            for s in syncs:
                self.sync_reports += await delta_service_for(self.c).handle_sync_item(
                    MailboxSyncItem.from_json(s.content))
                await sync.delete(s)

            async def run(item: Any) -> None:
                await processor.handle_message(item.content, dequeue_count=item.dequeue_count or 1)
                await inbound.delete(item)

            await asyncio.gather(*(run(i) for i in items))
            if not items and not syncs:
                quiet_rounds += 1
                if quiet_rounds >= 3 and await done():  # nothing in flight for a moment, and the goal is met
                    return
            else:
                quiet_rounds = 0
            await asyncio.sleep(0.2)
        raise AssertionError("pipeline did not settle before the deadline")


@pytest.fixture
async def pipeline(env: Env, azurite: Azurite) -> AsyncIterator[Pipeline]:
    settings = Settings({
        "AzureWebJobsStorage": azurite.connection_string,
        "TABLE_PREFIX": f"t{uuid.uuid4().hex[:10]}",
        "GRAPH_TENANT_ID": demo.TENANT_ID, "GRAPH_CLIENT_ID": demo.APP_CLIENT_ID,
        "GRAPH_CLIENT_SECRET": demo.APP_CLIENT_SECRET, "GRAPH_AUTHORITY_HOST": env.identity.url,
        "GRAPH_BASE_URL": env.graph.base_url, "DATAVERSE_URL": env.dataverse.url,
        "WEBHOOK_BASE_URL": env.receiver.base_url, "WEBHOOK_FUNCTION_KEY": KEY,
        "SUBSCRIPTION_CREATE_CONCURRENCY": "2",
    })
    container = Container(settings)
    container.mailbox_directory = StaticMailboxDirectory(mailboxes(), ORG)  # type: ignore[attr-defined]
    p = Pipeline(env, container)
    await p.emu("graph", "POST", "reset")
    await p.emu("dataverse", "POST", "reset")
    env.receiver.take()
    for queue in (INBOUND_QUEUE, MAILBOX_SYNC_QUEUE):
        browser = QueueBrowser(container.storage, queue)
        for _ in range(20):
            left = await browser.receive(32, visibility_timeout=1)
            if not left:
                break
            for item in left:
                await browser.delete(item)
    try:
        yield p
    finally:
        await p.http.aclose()
        await container.graph.close()
        await container.dataverse.close()
        await container.storage.close()


async def dv_get(p: Pipeline, path: str) -> Any:
    response = await p.c.dataverse._request("GET", path, idempotent=True)
    return response.json()


async def email_rows(p: Pipeline) -> list[dict[str, Any]]:
    data = await dv_get(p, "emails?$select=activityid,subject,messageid,statecode,statuscode,_ownerid_value,"
                           "notifications,description&$expand=email_activity_parties($select=participationtypemask,"
                           "addressused,_partyid_value),email_activity_mime_attachment($select=filename)")
    return list(data["value"])


# ------------------------------------------------------------------------------------------------ tests


async def test_smtp_to_individual_mailbox_becomes_one_crm_email_and_calls_are_counted(pipeline: Pipeline) -> None:
    p = pipeline
    report = await p.subscribe()
    assert report["created"] == 3 and not report["failed"]  # alice, erin, crm-sink inboxes
    await p.clear_logs()

    n = 6
    ids = [p.smtp("fiona@fabrikam.example", [f"alice@{DOMAIN}"], f"Order {i}") for i in range(n)]

    async def all_there() -> bool:
        return len(await email_rows(p)) >= n

    await p.drain(all_there)
    rows = await email_rows(p)
    assert sorted(r["activityid"] for r in rows) == sorted(str(activity_id_for(m)) for m in ids)
    for row in rows:
        assert (row["statecode"], row["statuscode"]) == (1, 4)
        assert row["_ownerid_value"] == demo_user_id("alice")
        assert sorted(pt["participationtypemask"] for pt in row["email_activity_parties"]) == [1, 2]
    graph_calls, dv_calls = await p.pipeline_calls()
    print(f"\ncalls per tracked email: graph={graph_calls / n:.2f} dataverse={dv_calls / n:.2f}")
    assert graph_calls / n <= 1.2
    assert dv_calls / n <= 2.0


async def rows_for(p: Pipeline, mid: str) -> list[dict[str, Any]]:
    return [r for r in await email_rows(p) if r["activityid"] == str(activity_id_for(mid))]


def has_row(p: Pipeline, mid: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return bool(await rows_for(p, mid))
    return check


async def test_forward_mailbox_user_is_tracked_for_that_user_and_the_wrapper_deleted(pipeline: Pipeline) -> None:
    p = pipeline
    await p.c.graph.create_inbox_rule(f"bob@{DOMAIN}", {
        "displayName": "to CRM", "sequence": 1, "isEnabled": True, "conditions": {},
        "actions": {"forwardAsAttachmentTo": [{"emailAddress": {"address": SINK}}]}})
    await p.subscribe()
    mid = p.smtp("gus@example.org", [f"bob@{DOMAIN}"], "Quote request")

    await p.drain(has_row(p, mid))

    (row,) = await rows_for(p, mid)
    assert row["_ownerid_value"] == demo_user_id("bob")
    parties = {(pt["participationtypemask"], pt["_partyid_value"]) for pt in row["email_activity_parties"]}
    assert (1, "c0ffee00-0000-4000-8000-00000000c002") in parties  # Gus, resolved by his first address
    sink_items = [m async for m in p.c.graph.list_messages(SINK, "inbox")]
    assert sink_items == []  # the wrapper was deleted after processing


async def test_decided_wrappers_move_to_processed_and_undeliverable_ones_aside(pipeline: Pipeline) -> None:
    """Without DeleteAfterProcessing the sink keeps only undecided mail in its Inbox: a tracked wrapper goes to
    Inbox/Processed (created on first use), mail that is no forward to Inbox/Undeliverable; a moved wrapper keeps
    its immutable id, so its decision (and `reprocess`) still find it."""
    from dataclasses import replace

    p = pipeline
    p.c.mailbox_directory = StaticMailboxDirectory([  # type: ignore[attr-defined]
        replace(m, delete_after_processing=False) for m in mailboxes()], ORG)
    await p.c.graph.create_inbox_rule(f"bob@{DOMAIN}", {
        "displayName": "to CRM", "sequence": 1, "isEnabled": True, "conditions": {},
        "actions": {"forwardAsAttachmentTo": [{"emailAddress": {"address": SINK}}]}})
    await p.subscribe()
    tracked = p.smtp("gus@example.org", [f"bob@{DOMAIN}"], "Quote request 2")
    stray = p.smtp("sam@unknown.example", [SINK], "Hello sink")  # mailed to the sink directly: no forward

    async def both_decided() -> bool:
        if not await rows_for(p, tracked):
            return False
        return not [m async for m in p.c.graph.list_messages(SINK, "inbox")]

    await p.drain(both_decided)
    folders = {f["displayName"]: f["id"] for f in await p.c.graph.list_mail_folders(SINK, "inbox")}
    assert {"Processed", "Undeliverable"} <= set(folders)
    processed = [m async for m in p.c.graph.list_messages(SINK, folders["Processed"])]
    aside = [m async for m in p.c.graph.list_messages(SINK, folders["Undeliverable"])]
    assert len(processed) == 1 and len(aside) == 1
    moved = await p.c.graph.get_message(SINK, str(processed[0]["id"]), with_attachments=False)
    assert "Quote request 2" in moved["subject"]
    stray_moved = await p.c.graph.get_message(SINK, str(aside[0]["id"]), with_attachments=False)
    assert stray_moved["internetMessageId"] == stray


async def test_outlook_and_none_users_get_no_row_with_the_reason_recorded(pipeline: Pipeline) -> None:
    from core.adapters.inbound_state import InboundState
    from core.work_items import InboundItem

    p = pipeline
    await p.subscribe()
    mids = {who: p.smtp("fiona@fabrikam.example", [f"{who}@{DOMAIN}"], f"For {who}") for who in ("carol", "dave")}
    # Nobody subscribes to these mailboxes; a stale notification (method changed a minute ago) is simulated.
    for who in mids:
        async for message in p.c.graph.list_messages(f"{who}@{DOMAIN}", "inbox"):
            await p.c.work_queue.send_many(INBOUND_QUEUE, [
                InboundItem(f"{who}@{DOMAIN}", message["id"], "notification", folder="inbox").to_json()])
            graph_id = message["id"]
        async def recorded(who: str = who, graph_id: str = graph_id) -> bool:
            return await InboundState.for_container(p.c).decisions.get(f"{who}@{DOMAIN}", graph_id) is not None

        await p.drain(recorded)
        record = await InboundState.for_container(p.c).decisions.get(f"{who}@{DOMAIN}", graph_id)
        assert record is not None
        expected = "inbound_outlook" if who == "carol" else "inbound_none"
        assert record["outcome"] == f"skipped:mailbox:{expected}"
    assert not [r for r in await email_rows(p) if r["activityid"] in {str(activity_id_for(m)) for m in mids.values()}]


async def test_message_to_two_tracked_users_is_one_email_with_both_parties(pipeline: Pipeline) -> None:
    p = pipeline
    await p.subscribe()
    mid = p.smtp("lena@prospect.example", [f"alice@{DOMAIN}", f"erin@{DOMAIN}"], "Hello both")

    async def both_processed() -> bool:
        state_rows = await rows_for(p, mid)
        from core.adapters.inbound_state import InboundState
        decisions = await InboundState.for_container(p.c).decisions.find_by_internet_message_id(mid)
        return bool(state_rows) and len(decisions) == 2

    await p.drain(both_processed)
    (row,) = await rows_for(p, mid)
    recipients = {pt["_partyid_value"] for pt in row["email_activity_parties"] if pt["participationtypemask"] == 2}
    assert recipients == {demo_user_id("alice"), ERIN_ID}


async def test_redelivered_and_duplicated_notifications_still_make_one_email(pipeline: Pipeline) -> None:
    p = pipeline
    await p.subscribe()
    await p.emu("graph", "POST", "notification-faults", {"action": "duplicate", "probability": 1.0, "count": 5})
    mid = p.smtp("fiona@fabrikam.example", [f"alice@{DOMAIN}"], "Twice")
    for _ in range(300):  # bounded wait for the first POST (polled, no timing assertion)
        if p.env.receiver.bodies:
            break
        await asyncio.sleep(0.1)
    bodies = list(p.env.receiver.bodies)
    p.env.receiver.bodies.extend(bodies)  # and Graph redelivers the same POST once more

    await p.drain(has_row(p, mid))
    assert len(await rows_for(p, mid)) == 1


async def test_dropped_notification_is_recovered_by_delta(pipeline: Pipeline) -> None:
    p = pipeline
    await p.subscribe()
    await p.emu("graph", "POST", "notification-faults", {"action": "drop", "probability": 1.0, "count": 1})
    mid = p.smtp("fiona@fabrikam.example", [f"alice@{DOMAIN}"], "Lost notification")
    # The emulator follows a dropped notification with a `missed` lifecycle event -> mailbox sync -> delta.
    await p.drain(has_row(p, mid), within=180)
    assert len(await rows_for(p, mid)) == 1


async def test_attachment_over_the_org_limit_is_left_out_with_a_note(pipeline: Pipeline) -> None:
    p = pipeline
    await p.emu("dataverse", "POST", "seed", {"organization": {"settings": {"maxuploadfilesize": 100_000}}})
    await p.subscribe()
    mid = p.smtp("fiona@fabrikam.example", [f"alice@{DOMAIN}"], "Big file", attachment=b"x" * 200_000)

    await p.drain(has_row(p, mid))
    (row,) = await rows_for(p, mid)
    assert row["email_activity_mime_attachment"] == []
    assert row["notifications"] == 1 and "big.bin" in row["description"]


async def test_graph_and_dataverse_throttling_is_survived(pipeline: Pipeline) -> None:
    p = pipeline
    await p.subscribe()
    await p.emu("graph", "POST", "faults", {"method": "GET", "path": "/messages/", "status": 429,
                                            "retry_after": 3, "count": 2})
    await p.emu("dataverse", "POST", "faults", {"method": "POST", "path": "\\$batch", "status": 429,
                                                "retry_after": 1, "count": 3})
    mid = p.smtp("fiona@fabrikam.example", [f"alice@{DOMAIN}"], "Busy day")

    await p.drain(has_row(p, mid), within=90)
    assert len(await rows_for(p, mid)) == 1
    graph_log = (await p.emu("graph", "GET", "requests"))["value"]
    dataverse_log = (await p.emu("dataverse", "GET", "requests"))["value"]
    assert sum(1 for r in graph_log if r["status"] == 429) == 2  # the faults really fired
    assert sum(1 for r in dataverse_log if r["status"] == 429) == 3


async def test_subscription_creates_keep_validation_handshakes_few(pipeline: Pipeline) -> None:
    p = pipeline
    users = ("alice", "erin", "bob", "carol", "dave", "support")
    p.c.mailbox_directory = StaticMailboxDirectory([  # type: ignore[attr-defined]
        MailboxConfig(f"{u}@{DOMAIN}", MailboxKind.USER, owner=ref("alice"), inbound_method=InboundMethod.INDIVIDUAL,
                      track_sent_items=True) for u in users], ORG)
    p.env.receiver.most_validating = 0
    report = await p.subscribe()
    assert report["created"] == 12 and not report["failed"]
    # SUBSCRIPTION_CREATE_CONCURRENCY=2: two creates in flight, each validated URL by URL
    assert 1 <= p.env.receiver.most_validating <= 2
    creates = [r for r in (await p.emu("graph", "GET", "requests"))["value"]
               if r["method"] == "POST" and r["path"].endswith("/subscriptions")]
    assert len(creates) == 12  # direct POSTs (Prefer: IdType applies to the request it is sent with)


async def test_two_reconciles_at_once_make_one_subscription_per_watched_folder(pipeline: Pipeline) -> None:
    """The issue's start-up race (the launcher's reconcile and the timer's at the same second), as two processes:
    two containers over the same storage and Graph. One run holds the reconcile lease, the other waits for it and
    then finds nothing to do."""
    p = pipeline
    users = ("alice", "erin", "bob", "carol", "dave", "support")
    configs = StaticMailboxDirectory([
        MailboxConfig(f"{u}@{DOMAIN}", MailboxKind.USER, owner=ref("alice"), inbound_method=InboundMethod.INDIVIDUAL,
                      track_sent_items=u in ("alice", "erin")) for u in users], ORG)
    p.c.mailbox_directory = configs  # type: ignore[attr-defined]
    other = Container(p.c.settings)
    other.mailbox_directory = configs  # type: ignore[attr-defined]
    try:
        timer, admin = await asyncio.gather(service_for(p.c, role="timer").reconcile(wait=120),
                                            service_for(other, role="cli").reconcile(wait=120))
    finally:
        await other.graph.close()
        await other.dataverse.close()
        await other.storage.close()
    assert sorted((timer.created, admin.created)) == [0, 8] and not timer.failed and not admin.failed
    in_graph = [s["resource"].lower() for s in await p.c.graph.list_subscriptions()]
    assert len(in_graph) == len(set(in_graph)) == 8  # one per mailbox folder: 6 inboxes + 2 sent items folders
    records = [(r.mailbox, r.folder) async for r in p.c.subscription_directory.list()]
    assert len(records) == len(set(records)) == 8


async def test_duplicate_subscriptions_are_removed_by_the_next_reconcile(pipeline: Pipeline) -> None:
    """Duplicates made anyway (here: two runs without the lease, as before this fix) are deleted in Graph."""
    from core.services.subscriptions import SubscriptionService

    p = pipeline
    service = service_for(p.c)
    unguarded = [SubscriptionService(p.c.graph, p.c.subscription_directory, p.c.mailbox_directory,
                                     service._options) for _ in range(2)]
    await asyncio.gather(*(s.reconcile() for s in unguarded))
    assert len(await p.c.graph.list_subscriptions()) == 6  # alice, erin, crm-sink: two each
    report = await service.reconcile()
    assert report.duplicates == 3 and report.deleted == 3 and report.created == 0
    in_graph = [s["resource"].lower() for s in await p.c.graph.list_subscriptions()]
    assert len(in_graph) == len(set(in_graph)) == 3


async def test_a_reauthorization_challenge_is_one_patch_and_a_delta_of_that_folder(pipeline: Pipeline) -> None:
    from dataclasses import replace

    p = pipeline
    alice = f"alice@{DOMAIN}"
    p.c.mailbox_directory = StaticMailboxDirectory([  # type: ignore[attr-defined]
        replace(m, track_sent_items=m.address == alice) for m in mailboxes()], ORG)
    await p.subscribe()
    records = [r async for r in p.c.subscription_directory.list()]
    sent = next(r for r in records if r.mailbox == alice and r.folder == "sentitems")

    async def challenge() -> None:
        await p.clear_logs()
        await p.emu("graph", "POST", "lifecycle", {"subscriptionId": sent.id, "event": "reauthorizationRequired"})

        async def handled() -> bool:
            log = (await p.emu("graph", "GET", "requests"))["value"]
            return any("/delta" in r["path"] for r in log)

        await p.drain(handled)

    # just created: the challenge is answered by the fresh authorisation, no write; the folder is caught up
    await challenge()
    log = (await p.emu("graph", "GET", "requests"))["value"]
    assert not [r for r in log if "/subscriptions" in r["path"]]
    deltas = [r["path"] for r in log if "/delta" in r["path"]]
    assert deltas and all("sentitems" in path.lower() for path in deltas)  # that folder only, not the Inbox
    # renewed a day ago: exactly one PATCH (renewing reauthorizes), never POST .../reauthorize
    await p.c.subscription_directory.put(replace(sent, expires=sent.expires - timedelta(days=1)))
    await challenge()
    log = (await p.emu("graph", "GET", "requests"))["value"]
    writes = [(r["method"], r["path"]) for r in log if "/subscriptions" in r["path"]]
    assert writes == [("PATCH", f"/v1.0/subscriptions/{sent.id}")]
    (renewed,) = [r async for r in p.c.subscription_directory.list() if r.id == sent.id]
    assert renewed.expires > sent.expires


async def test_attachments_are_listed_by_metadata_and_only_kept_ones_downloaded(pipeline: Pipeline) -> None:
    p = pipeline
    await p.emu("dataverse", "POST", "seed", {"organization": {"settings": {"maxuploadfilesize": 100_000}}})
    await p.subscribe()
    await p.clear_logs()
    msg = EmailMessage()
    mid = f"<{uuid.uuid4().hex}@fabrikam.example>"
    msg["From"], msg["To"], msg["Subject"], msg["Message-ID"] = ("fiona@fabrikam.example", f"alice@{DOMAIN}",
                                                                  "Three files", mid)
    msg.set_content("see attached")
    msg.add_alternative('<p>chart: <img src="cid:chart1"></p>', subtype="html")
    msg.get_payload()[1].add_related(b"\x89PNG small", maintype="image", subtype="png", cid="<chart1>")
    msg.add_attachment(b"a" * 500, maintype="text", subtype="plain", filename="a.txt")
    msg.add_attachment(b"b" * 700, maintype="application", subtype="pdf", filename="b.pdf")
    msg.add_attachment(b"x" * 200_000, maintype="application", subtype="octet-stream", filename="big.bin")
    port = p.env.graph.smtp_port
    assert port is not None
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.send_message(msg)

    await p.drain(has_row(p, mid))
    (row,) = await rows_for(p, mid)
    names = sorted(a["filename"] for a in row["email_activity_mime_attachment"])
    assert len(names) == 3 and {"a.txt", "b.pdf"} <= set(names) and "big.bin" in row["description"]
    log = (await p.emu("graph", "GET", "requests"))["value"]
    reads = [(r["method"], r["path"].rsplit("/", 2)[-2:]) for r in log if r["method"] == "GET" or "$batch" in r["path"]]
    # one GET of the message (attachment metadata only) and one $batch for the three small files; never big.bin
    assert len([r for r in log if "$batch" in r["path"]]) == 1, reads
    assert not [r for r in log if "/attachments" in r["path"]], reads


async def test_track_by_category_tracks_a_skipped_mail_once_in_any_folder(pipeline: Pipeline) -> None:
    """Track by category over the emulators: erin's filter (replies to CRM email) skips a new mail; she moves it to
    a folder of her own and gives it the category (what Outlook does, here through Graph); the delta timer's
    fan-out runs her mailbox's search, which sends it through the pipeline: one CRM email owned by erin. The
    router's "tracked" category (the same name, as SSS uses) brings the message back in the next search, where the
    ledger ends it: nothing enqueued, nothing written."""
    from core.adapters.inbound_state import InboundState
    from core.services.category_tracking import category_tracker_for
    from core.settings.rows import RouterSettings

    p = pipeline
    tag = "Tracked to Dynamics 365"
    erin_address = f"erin@{DOMAIN}"
    boxes = [replace(m, tracking_filter=TrackingFilter.REPLIES_TO_CRM_EMAIL) if m.address == erin_address else m
             for m in mailboxes()]
    p.c.mailbox_directory = StaticMailboxDirectory(  # type: ignore[attr-defined]
        boxes, ORG, RouterSettings(track_categorized_items=True, track_category_name=tag, tracked_category=tag))
    await p.subscribe()
    mid = p.smtp("nora@northwind.example", [erin_address], "Partnership offer")
    graph_ids: list[str] = []

    async def skipped() -> bool:
        graph_ids[:] = [m["id"] async for m in p.c.graph.list_messages(erin_address, "inbox")]
        state = InboundState.for_container(p.c)
        return bool(graph_ids) and await state.ledger.get(erin_address, graph_ids[0]) is not None

    await p.drain(skipped)
    assert await rows_for(p, mid) == []
    entry = await InboundState.for_container(p.c).ledger.get(erin_address, graph_ids[0])
    assert entry is not None and entry.outcome.value == "skipped"

    # Erin, in Outlook: moves the mail to her own folder and gives it the category.
    from core.adapters.auth import graph_token_provider

    token = await graph_token_provider(p.c.settings).get_token_async()
    headers = {"Authorization": f"Bearer {token}", "Prefer": 'IdType="ImmutableId"'}
    base = f"{p.env.graph.base_url}/users/{erin_address}"
    folder = (await p.http.post(f"{base}/mailFolders", json={"displayName": "Partners"}, headers=headers)).json()
    moved = (await p.http.post(f"{base}/messages/{graph_ids[0]}/move", json={"destinationId": folder["id"]},
                               headers=headers)).json()
    assert moved["id"] == graph_ids[0]  # an immutable id survives the move: the ledger still knows the message
    await p.c.graph.set_categories(erin_address, moved["id"], [tag])

    # The delta timer fans out; erin's mailbox-sync item runs her delta rounds and her category search.
    await delta_service_for(p.c).fan_out()
    await p.drain(has_row(p, mid))
    (row,) = await rows_for(p, mid)
    assert row["_ownerid_value"] == ERIN_ID
    record = await InboundState.for_container(p.c).decisions.get(erin_address, moved["id"])
    assert record is not None and record["source"] == "category"
    assert any(d["outcome"] == "tracked:category" for d in record["decisions"])

    # The next search finds the message again (it still carries the category, now also the router's "tracked"
    # one): one Graph request, nothing enqueued, nothing written.
    await p.clear_logs()
    report = await category_tracker_for(p.c).search(erin_address, force=True)
    assert report is not None and (report.found, report.known, report.enqueued) == (1, 1, 0), report
    graph_calls, dv_calls = await p.pipeline_calls()
    assert (graph_calls, dv_calls) == (1, 0)
    await p.drain(has_row(p, mid))
    assert len(await rows_for(p, mid)) == 1


async def test_a_hot_mailbox_is_worked_by_delta_rounds_within_graphs_mailbox_concurrency(pipeline: Pipeline) -> None:
    """Past the threshold the webhook stops asking one fetch per notification: the folder's delta round, under the
    mailbox's lease, processes the messages itself. Every mail is tracked once and Graph never answered a
    MailboxConcurrency 429 (the emulator enforces 4 concurrent requests per mailbox)."""
    p = pipeline
    await p.subscribe()
    p.hot = HotMailboxes(threshold=3, delay_s=1)
    await p.clear_logs()
    mids = [p.smtp("fiona@fabrikam.example", [f"alice@{DOMAIN}"], f"Busy {n}") for n in range(16)]

    async def all_tracked() -> bool:
        return all([await rows_for(p, mid) for mid in mids])

    await p.drain(all_tracked, within=120)
    assert [len(await rows_for(p, mid)) for mid in mids] == [1] * len(mids)
    hot_rounds = [r for r in p.sync_reports if r.processed]
    assert hot_rounds and sum(r.processed for r in hot_rounds) >= 16 - 3 - sum(r.enqueued for r in hot_rounds)
    graph_log = (await p.emu("graph", "GET", "requests"))["value"]
    assert not [r for r in graph_log if r["status"] == 429]
