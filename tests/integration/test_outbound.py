"""Outbound end to end over the emulators (identity, Graph, Dataverse) and Azurite, services driven directly with
the real adapters: DataverseOutboundCrm, GraphMailClient, the Table ledger, the storage work queue.

The mailbox directory is the in-memory one of tests/fakes.py (the settings tables are another pipeline's job);
everything else is the production wiring from ``core.bootstrap.Container``.
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from core.adapters.outbound_state import TableMailboxOutboundStatus, TableOutboundLedger
from core.bootstrap import Container
from core.config import Settings
from core.domain.correlation import CorrelationKeys
from core.domain.identity import outbound_activity_id
from core.domain.model import ApprovalStatus, CrmRecordRef, MailboxConfig, MailboxKind, OutboundMethod
from core.names import OUTBOUND_QUEUE
from core.services.inbound_crm import DataverseInboundCrm
from core.services.outbound import OutboundService, OutboundSettings, Phase, SendOutcome
from core.services.outbound_crm import DataverseOutboundCrm
from core.work_items import OutboundItem
from emulators.common import demo
from emulators.common.tls import TlsMaterial, client_env, ensure_tls
from emulators.dataverse.seed import demo_user_id
from emulators.dataverse.testing import RunningDataverse, start_dataverse
from emulators.graph.testing import RunningGraph, start_graph
from emulators.identity.testing import start_identity
from local.azurite import Azurite
from tests.fakes import StaticMailboxDirectory

pytestmark = pytest.mark.integration

FIONA = "c0ffee00-0000-4000-8000-00000000c001"  # demo contact fiona@fabrikam.example (external)


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsMaterial]:
    material = ensure_tls(tmp_path_factory.mktemp("tls"))
    with pytest.MonkeyPatch.context() as mp:
        for name, value in client_env(material).items():
            mp.setenv(name, value)
        yield material


@pytest.fixture(scope="module")
def emulators(tls: TlsMaterial) -> Iterator[tuple[RunningGraph, RunningDataverse]]:
    identity = start_identity(tls.ca_cert.parent)
    graph = dataverse = None
    try:
        graph = start_graph(tls.ca_cert.parent, identity.url, smtp=False)
        dataverse = start_dataverse(tls.ca_cert.parent, identity.url)
        yield graph, dataverse
    finally:
        if dataverse is not None:
            dataverse.stop()
        if graph is not None:
            graph.stop()
        identity.stop()


TABLE_PREFIX = f"ob{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def container(emulators: tuple[RunningGraph, RunningDataverse], azurite: Azurite,
                    tls: TlsMaterial) -> AsyncIterator[Container]:
    """The production composition root over the emulators; per test, because its clients belong to the test's
    event loop."""
    graph, dataverse = emulators
    c = Container(Settings({
        "AzureWebJobsStorage": azurite.connection_string, "TABLE_PREFIX": TABLE_PREFIX,
        "GRAPH_TENANT_ID": demo.TENANT_ID, "GRAPH_CLIENT_ID": demo.APP_CLIENT_ID,
        "GRAPH_CLIENT_SECRET": demo.APP_CLIENT_SECRET, "GRAPH_AUTHORITY_HOST": graph.emulator.config.identity_url,
        "GRAPH_BASE_URL": graph.base_url, "DATAVERSE_URL": dataverse.url,
    }))
    try:
        yield c
    finally:
        await c.graph.close()
        await c.dataverse.close()
        await c.storage.close()


def _mailbox(local: str, method: OutboundMethod = OutboundMethod.ROUTER) -> MailboxConfig:
    return MailboxConfig(address=f"{local}@{demo.TENANT_DOMAIN}", kind=MailboxKind.USER,
                         owner=CrmRecordRef("systemuser", uuid.UUID(demo_user_id(local))),
                         outbound_method=method, approval=ApprovalStatus.APPROVED)


DIRECTORY = StaticMailboxDirectory([_mailbox("alice"), _mailbox("bob"), _mailbox("carol", OutboundMethod.OUTLOOK)])


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(container: Container, clock: Clock) -> OutboundService:
    return OutboundService(
        crm=DataverseOutboundCrm(container.dataverse), ledger=TableOutboundLedger(container.storage),
        directory=DIRECTORY, mail=container.graph, queue=container.work_queue,
        status=TableMailboxOutboundStatus(container.storage),
        settings=OutboundSettings(per_sender_cap=5), clock=clock,
    )


@pytest.fixture
async def graph_admin(emulators: tuple[RunningGraph, RunningDataverse], tls: TlsMaterial
                      ) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=emulators[0].url, verify=ssl.create_default_context(
            cafile=tls.bundle)) as http:
        yield http


@pytest.fixture
async def dataverse_admin(emulators: tuple[RunningGraph, RunningDataverse], tls: TlsMaterial
                          ) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=emulators[1].url, verify=ssl.create_default_context(
            cafile=tls.bundle)) as http:
        yield http


async def crm_send(container: Container, sender: str, *, subject: str, cc_user: str | None = None) -> uuid.UUID:
    """What a CRM user does: an email with parties, then SendEmail(IssueSend=true) -> Pending Send + token."""
    parties: list[dict[str, Any]] = [
        {"participationtypemask": 1, "partyid_systemuser@odata.bind": f"/systemusers({demo_user_id(sender)})"},
        {"participationtypemask": 2, "partyid_contact@odata.bind": f"/contacts({FIONA})"},
    ]
    if cc_user:
        parties.append({"participationtypemask": 3,
                        "partyid_systemuser@odata.bind": f"/systemusers({demo_user_id(cc_user)})"})
    dv = container.dataverse
    email_id = str(await dv.create("emails", {"subject": subject, "description": f"<p>{subject}</p>",
                                              "email_activity_parties": parties}))
    await dv.send_email(email_id, True)
    return uuid.UUID(email_id)


async def crm_email(container: Container, email_id: uuid.UUID) -> dict[str, Any]:
    return await container.dataverse.get("emails", email_id, select=[
        "statecode", "statuscode", "messageid", "subject", "deliveryattempts", "trackingtoken", "senton"])


async def outbox_for(graph_admin: httpx.AsyncClient, subject: str) -> list[dict[str, Any]]:
    response = await graph_admin.get("/_emulator/outbox")
    response.raise_for_status()
    return [m for m in response.json() if subject in str(m.get("subject"))]


async def test_a_router_users_crm_email_is_sent_as_that_user_and_marked_sent(
        container: Container, service: OutboundService, graph_admin: httpx.AsyncClient) -> None:
    subject = f"Quote {uuid.uuid4().hex[:8]}"
    email_id = await crm_send(container, "alice", subject=subject, cc_user="carol")
    before = await crm_email(container, email_id)
    assert (before["statecode"], before["statuscode"]) == (1, 6) and before["trackingtoken"]

    scan = await service.scan()
    mine = [i for i in scan.items if i.email_id == str(email_id)]
    assert [i.sender_mailbox for i in mine] == ["alice@contoso.example"]
    # The work item really travels through the storage queue, base64 as the Functions host reads it.
    browser = container.storage.queue_browser(OUTBOUND_QUEUE)
    received = [q for q in await browser.receive(32) if q.json().get("scan_id") == scan.scan_id]
    assert [q.json()["email_id"] for q in received] == [i.email_id for i in scan.items]
    for queued in received:
        result = await service.handle(queued.content)
        if queued.json()["email_id"] == str(email_id):
            assert result.outcome is SendOutcome.SENT, result.reason
        await browser.delete(queued)
    await browser.close()

    [sent] = await outbox_for(graph_admin, subject)
    assert sent["from"].lower().endswith("alice@contoso.example")
    assert before["trackingtoken"] in sent["subject"]
    after = await crm_email(container, email_id)
    assert (after["statecode"], after["statuscode"]) == (1, 3)
    # Marked Sent by a status-only change, never re-opened: no messageid (for received email only) and no
    # delivery-attempt count (a Completed email is read-only) in CRM. Date Sent is the platform's (the emulator's
    # default leaves it empty, see Options.senton_on_sent_status).
    assert after["messageid"] is None and not after["deliveryattempts"]
    entry = await TableOutboundLedger(container.storage).get(str(email_id))
    assert entry is not None and entry[0].phase is Phase.DONE and entry[0].attempts == 1
    # The Message-ID was chosen before the draft existed, names the CRM email, and Exchange (here the
    # emulator, per Graph's "updatable only if isDraft") kept it.
    mid = entry[0].internet_message_id
    assert mid == sent["messageId"] and outbound_activity_id(mid) == email_id
    graph = container.graph
    copies = await graph.find_messages_by_internet_id("alice@contoso.example", mid, folder="sentitems")
    assert len(copies) == 1 and copies[0]["isDraft"] is False
    inbox = await graph.find_messages_by_internet_id("carol@contoso.example", mid, folder="inbox")
    assert len(inbox) == 1  # the internal recipient got it in their Inbox
    # A reply (In-Reply-To = that Message-ID) correlates to this CRM email although CRM has no messageid for it.
    lookup = await DataverseInboundCrm(container.dataverse).lookup([], CorrelationKeys(message_ids=(mid,)))
    assert lookup.correlation.by_message_id[mid].activity_id == email_id


async def test_a_sender_using_outlook_is_left_alone(container: Container, service: OutboundService) -> None:
    email_id = await crm_send(container, "carol", subject=f"Outlook {uuid.uuid4().hex[:8]}")
    scan = await service.scan()
    assert str(email_id) not in {i.email_id for i in scan.items}
    forged = await service.process(OutboundItem(str(email_id), "carol@contoso.example"))
    assert forged.outcome is SendOutcome.SKIPPED
    state = await crm_email(container, email_id)
    assert (state["statecode"], state["statuscode"]) == (1, 6)


async def test_a_crash_after_the_send_is_finished_without_a_second_send(
        container: Container, service: OutboundService, graph_admin: httpx.AsyncClient,
        dataverse_admin: httpx.AsyncClient) -> None:
    subject = f"Crash {uuid.uuid4().hex[:8]}"
    email_id = await crm_send(container, "alice", subject=subject)
    graph = container.graph
    real_send = graph.send_draft

    async def send_then_break_crm(mailbox: str, draft_id: str) -> None:
        await real_send(mailbox, draft_id)
        # Right after Exchange took the message, Dataverse fails the next write to this email once.
        response = await dataverse_admin.post("/_emulator/faults", json={
            "method": "PATCH", "path": f"emails\\({email_id}\\)", "status": 503, "count": 1})
        assert response.status_code == 201

    graph.send_draft = send_then_break_crm  # type: ignore[method-assign]
    try:
        first = await service.process(OutboundItem(str(email_id), "alice@contoso.example"))
    finally:
        graph.send_draft = real_send  # type: ignore[method-assign]
    assert first.outcome is SendOutcome.FINISH_PENDING
    second = await service.process(OutboundItem(str(email_id), "alice@contoso.example"))
    assert second.outcome is SendOutcome.FINISHED
    assert len(await outbox_for(graph_admin, subject)) == 1
    state = await crm_email(container, email_id)
    assert state["statuscode"] == 3


async def test_graph_503_on_send_delivers_exactly_once(
        container: Container, service: OutboundService, clock: Clock, graph_admin: httpx.AsyncClient) -> None:
    subject = f"Busy {uuid.uuid4().hex[:8]}"
    email_id = await crm_send(container, "alice", subject=subject)
    response = await graph_admin.post("/_emulator/faults", json={
        "method": "POST", "path": "/send$", "status": 503, "count": 1})
    assert response.status_code == 201
    item = OutboundItem(str(email_id), "alice@contoso.example")
    first = await service.process(item)
    assert first.outcome is SendOutcome.RETRY, first.reason
    state = await crm_email(container, email_id)
    assert (state["statecode"], state["statuscode"]) == (1, 6)
    clock.now += timedelta(seconds=first.requeue_delay or 0)
    second = await service.process(item)
    assert second.outcome is SendOutcome.SENT, second.reason
    assert len(await outbox_for(graph_admin, subject)) == 1
    entry = await TableOutboundLedger(container.storage).get(str(email_id))
    assert entry is not None and entry[0].attempts == 2


async def test_a_heavy_sender_does_not_starve_a_light_one(
        container: Container, service: OutboundService, graph_admin: httpx.AsyncClient) -> None:
    tag = uuid.uuid4().hex[:8]
    heavy = [await crm_send(container, "bob", subject=f"Bulk {tag} {n}") for n in range(12)]
    light = await crm_send(container, "alice", subject=f"Single {tag}")
    scan = await service.scan()
    ids = [i.email_id for i in scan.items]
    assert str(light) in ids[:2]  # right at the front, though twelve older emails wait
    assert len([i for i in ids if i in {str(h) for h in heavy}]) == 5  # per-sender cap
    result = await service.process(OutboundItem(str(light), "alice@contoso.example"))
    assert result.outcome is SendOutcome.SENT
    assert len(await outbox_for(graph_admin, f"Single {tag}")) == 1


async def test_a_permanent_failure_ends_failed_with_a_reason(
        container: Container, service: OutboundService, graph_admin: httpx.AsyncClient) -> None:
    email_id = await crm_send(container, "alice", subject=f"Denied {uuid.uuid4().hex[:8]}")
    # An application access policy that no longer covers alice: Graph answers 403 for her mailbox.
    policy = await graph_admin.post("/_emulator/access-policy", json={
        "app_id": demo.APP_CLIENT_ID, "allowed": ["bob@contoso.example"]})
    assert policy.status_code < 300
    try:
        result = await service.process(OutboundItem(str(email_id), "alice@contoso.example"))
    finally:
        await graph_admin.post("/_emulator/access-policy", json={"app_id": demo.APP_CLIENT_ID, "allowed": None})
    assert result.outcome is SendOutcome.FAILED
    state = await crm_email(container, email_id)
    assert (state["statecode"], state["statuscode"]) == (0, 8) and state["deliveryattempts"] == 1
    entry = await TableOutboundLedger(container.storage).get(str(email_id))
    assert entry is not None and entry[0].phase is Phase.FAILED and "403" in entry[0].last_error
    status = await TableMailboxOutboundStatus(container.storage).get("alice@contoso.example")
    assert status is not None and status["LastOutboundErrorEmailId"] == str(email_id)
    assert "may not send" in status["LastOutboundError"]
