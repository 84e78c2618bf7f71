"""Mailbox health against the emulators: a mailbox outside the app's access policy is reported failing in the
status table and in the CRM mailbox record, backs off, and recovers by itself once access is granted."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from core.adapters.auth import graph_token_provider
from core.adapters.state import SubscriptionRecord, SubscriptionTable
from core.bootstrap import Container
from core.config import Settings
from core.names import MAILBOX_STATUS_TABLE, MAILBOXES_TABLE, ORG_SETTINGS_TABLE
from core.settings.crm_sync import CrmSyncService
from core.settings.health import Health, MailboxHealthService, token_roles
from core.settings.rows import row_key
from core.settings.store import TableMailboxDirectory
from emulators.common import demo
from emulators.dataverse.seed import demo_user_id
from local.azurite import Azurite
from tests.unit.settings.localstack import DOMAIN, LocalStack, start_local_stack

pytestmark = pytest.mark.integration

ALICE = f"alice@{DOMAIN}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, azurite: Azurite) -> Iterator[LocalStack]:
    yield from start_local_stack(tmp_path_factory.mktemp("tls"), azurite)


@pytest.fixture
async def container(stack: LocalStack) -> AsyncIterator[Container]:
    c = Container(Settings(stack.fresh_values()))
    try:
        yield c
    finally:
        await c.close()
        stack.graph_emulator("POST", "access-policy", {"app_id": demo.APP_CLIENT_ID, "allowed": None})


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


async def test_unreadable_mailbox_fails_backs_off_and_recovers(stack: LocalStack, container: Container) -> None:
    storage = container.storage
    await CrmSyncService(container.dataverse, storage.table(MAILBOXES_TABLE), storage.table(ORG_SETTINGS_TABLE)).run()
    directory = TableMailboxDirectory.from_account(storage, ttl_seconds=0)
    await directory.set_org_value("AlertSender", f"dave@{DOMAIN}")
    await directory.set_org_value("AlertRecipients", f"carol@{DOMAIN}")
    subscriptions = SubscriptionTable(storage)
    clock = Clock()
    await subscriptions.put(SubscriptionRecord(id="sub-alice", mailbox=ALICE, folder="inbox", client_state="x",
                                               tenant_id=demo.TENANT_ID, resource=f"users/{ALICE}/messages",
                                               expires=clock.now + timedelta(days=2)))
    tokens = graph_token_provider(container.settings)

    async def roles() -> frozenset[str]:
        return token_roles(await tokens.get_token_async())

    status = storage.table(MAILBOX_STATUS_TABLE)
    health = MailboxHealthService(directory, container.graph, container.dataverse, subscriptions, status,
                                  roles=roles, clock=clock)
    alice_mailbox = (await directory.get_mailbox(ALICE))
    assert alice_mailbox is not None and alice_mailbox.mailbox_id is not None
    mailbox_id = alice_mailbox.mailbox_id

    # Alice is outside the app's scope (RBAC for Applications): reading and drafting are denied.
    stack.graph_emulator("POST", "access-policy", {"app_id": demo.APP_CLIENT_ID,
                                                   "allowed": [f"{u}@{DOMAIN}" for u in ("bob", "dave", "carol")]})
    outcomes = {o.address: o for o in await health.probe_due()}
    alice = outcomes[ALICE]
    assert alice.health is Health.FAILING and alice.incoming is Health.FAILING and alice.outgoing is Health.FAILING
    assert {c.name for c in alice.checks if not c.ok} == {"graph_read", "graph_send"}
    assert alice.alert and "failing" in alice.alert
    row = await status.get("mailbox", row_key(ALICE))
    assert row["Health"] == "failing" and row["Failures"] == 1 and "access denied" in row["LastError"]
    assert "failing" in row["LastAlert"]
    crm = stack.dv("GET", f"mailboxes({mailbox_id})?$select=incomingemailstatus,outgoingemailstatus,"
                          "lastsyncerror,lastsyncerrorcode").json()
    assert (crm["incomingemailstatus"], crm["outgoingemailstatus"]) == (2, 2)
    assert "graph_read" in crm["lastsyncerror"] and crm["lastsyncerrorcode"] == 403
    # The alert email went out through Graph from the configured sender.
    alerts = [m async for m in container.graph.list_messages(f"carol@{DOMAIN}", "inbox")]
    assert alerts, "the alert email reached the admin"

    # Back-off: not re-probed before the first step (15 min), then the step doubles.
    clock.now += timedelta(minutes=10)
    assert ALICE not in {o.address for o in await health.probe_due()}
    clock.now += timedelta(minutes=6)
    second = {o.address: o for o in await health.probe_due()}[ALICE]
    assert second.health is Health.FAILING and second.state.failures == 2 and second.alert is None
    assert second.state.next_probe == clock.now + timedelta(minutes=30)

    # Access granted: the next due probe recovers by itself, with an alert and CRM updated.
    stack.graph_emulator("POST", "access-policy", {"app_id": demo.APP_CLIENT_ID, "allowed": None})
    clock.now += timedelta(minutes=29)
    assert ALICE not in {o.address for o in await health.probe_due()}
    clock.now += timedelta(minutes=2)
    third = {o.address: o for o in await health.probe_due()}[ALICE]
    assert third.health is Health.OK and third.state.failures == 0
    assert third.alert == f"{ALICE} changed from failing to ok"
    row = await status.get("mailbox", row_key(ALICE))
    assert row["Health"] == "ok" and row["LastError"] == ""
    crm = stack.dv("GET", f"mailboxes({mailbox_id})?$select=incomingemailstatus,outgoingemailstatus,"
                          "lastsyncerror").json()
    assert (crm["incomingemailstatus"], crm["outgoingemailstatus"]) == (1, 1)
    assert not crm["lastsyncerror"]
    # The send probe left no draft behind.
    assert [m async for m in container.graph.list_messages(ALICE, "drafts")] == []


async def test_unapproved_user_fails_crm_check(stack: LocalStack, container: Container) -> None:
    storage = container.storage
    await CrmSyncService(container.dataverse, storage.table(MAILBOXES_TABLE), storage.table(ORG_SETTINGS_TABLE)).run()
    directory = TableMailboxDirectory.from_account(storage, ttl_seconds=0)
    stack.dv("PATCH", f"systemusers({demo_user_id('alice')})", {"emailrouteraccessapproval": 2})
    try:
        health = MailboxHealthService(directory, container.graph, container.dataverse, SubscriptionTable(storage),
                                      storage.table(MAILBOX_STATUS_TABLE), clock=Clock())
        outcome = await health.probe(ALICE)
        crm_check = next(c for c in outcome.checks if c.name == "crm_owner")
        assert not crm_check.ok and "not approved (pending)" in crm_check.detail
        sub_check = next(c for c in outcome.checks if c.name == "subscription")
        # No reconcile has run since the mailbox was set up: the subscription is pending, not a failure; the
        # mailbox is failing for its approval alone.
        assert not sub_check.ok and sub_check.pending and "waiting for the first subscription" in sub_check.detail
        assert outcome.health is Health.FAILING and "subscription" not in (outcome.alert or "")
    finally:
        stack.dv("PATCH", f"systemusers({demo_user_id('alice')})", {"emailrouteraccessapproval": 1})


def seed_dataverse(stack: LocalStack, seed: dict[str, object]) -> None:
    """The emulator's seed endpoint: sets columns the Web API does not let an app write (a profile binding)."""
    response = httpx.post(f"{stack.dataverse.url}/_emulator/seed", json=seed, verify=stack.ssl(), timeout=30)
    assert response.status_code == 200, response.text


async def test_crm_test_and_enable_is_answered_by_one_run_of_the_health_timer(stack: LocalStack,
                                                                              container: Container) -> None:
    """The round trip of CRM's Test & Enable: the request column set over the Web API (what the button does), one
    run of the job, then the results and the cleared request on the mailbox record - for a router mailbox, a
    mailbox the router does not serve, and not at all for a mailbox that has an email server profile (SSS's)."""
    from core.settings.test_requests import crm_test_service_for

    storage = container.storage
    await CrmSyncService(container.dataverse, storage.table(MAILBOXES_TABLE), storage.table(ORG_SETTINGS_TABLE)).run()
    await SubscriptionTable(storage).put(SubscriptionRecord(
        id="sub-alice-te", mailbox=ALICE, folder="inbox", client_state="x", tenant_id=demo.TENANT_ID,
        resource=f"users/{ALICE}/messages", expires=datetime.now(UTC) + timedelta(days=2)))

    def mailbox_of(user: str) -> str:
        return str(stack.dv("GET", f"systemusers({demo_user_id(user)})?$select=_defaultmailbox_value")
                   .json()["_defaultmailbox_value"])

    alice, carol, bob = mailbox_of("alice"), mailbox_of("carol"), mailbox_of("bob")
    columns = ("testemailconfigurationscheduled,incomingemailstatus,outgoingemailstatus,testmailboxaccesscompletedon,"
               "lastsyncerror,lastsyncerrorcode")
    profile = stack.dv("POST", "emailserverprofiles", {"name": "Exchange Online (TE test)", "servertype": 4})
    profile_id = profile.headers["OData-EntityId"].rsplit("(", 1)[1].rstrip(")")
    seed: dict[str, object] = {"systemusers": [{"systemuserid": demo_user_id("bob"), "mailbox": {
        "_emailserverprofile_value": profile_id, "incomingemailstatus": 0}}]}
    seed_dataverse(stack, seed)
    try:
        for mailbox_id in (alice, carol, bob):  # the Test & Enable button
            stack.dv("PATCH", f"mailboxes({mailbox_id})", {"testemailconfigurationscheduled": True,
                                                           "incomingemailstatus": 0, "outgoingemailstatus": 0})

        report = await crm_test_service_for(container).run()

        assert report.found == 3 and set(report.answered) == {ALICE, f"carol@{DOMAIN}"}, report.to_json()
        assert [d.action.value for d in report.waiting] == ["leave_to_sss"]
        answered = stack.dv("GET", f"mailboxes({alice})?$select={columns}").json()
        assert answered["testemailconfigurationscheduled"] is False
        assert (answered["incomingemailstatus"], answered["outgoingemailstatus"]) == (1, 1)
        assert answered["testmailboxaccesscompletedon"] and not answered["lastsyncerror"]
        not_served = stack.dv("GET", f"mailboxes({carol})?$select={columns}").json()
        assert not_served["testemailconfigurationscheduled"] is False
        assert (not_served["incomingemailstatus"], not_served["outgoingemailstatus"]) == (0, 0)
        assert "neither incoming nor outgoing" in not_served["lastsyncerror"]
        sss = stack.dv("GET", f"mailboxes({bob})?$select={columns}").json()
        assert sss["testemailconfigurationscheduled"] is True and sss["incomingemailstatus"] == 0  # untouched
        row = await storage.table(MAILBOX_STATUS_TABLE).get("mailbox", row_key(ALICE))
        assert row["CrmTestAnsweredOn"] and row["Health"] == "ok"

        # A failing mailbox is answered too: Failure and the reason, request cleared.
        stack.graph_emulator("POST", "access-policy", {"app_id": demo.APP_CLIENT_ID,
                                                       "allowed": [f"{u}@{DOMAIN}" for u in ("bob", "carol")]})
        stack.dv("PATCH", f"mailboxes({alice})", {"testemailconfigurationscheduled": True})
        again = await crm_test_service_for(container).run()
        assert again.answered == {ALICE: "failing"}, again.to_json()
        failed = stack.dv("GET", f"mailboxes({alice})?$select={columns}").json()
        assert failed["testemailconfigurationscheduled"] is False
        assert (failed["incomingemailstatus"], failed["outgoingemailstatus"]) == (2, 2)
        assert "graph_read" in failed["lastsyncerror"] and failed["lastsyncerrorcode"] == 403

        # Answered requests are gone from the query; only bob's (SSS's) is still pending.
        assert (await crm_test_service_for(container).run()).found == 1
    finally:
        stack.graph_emulator("POST", "access-policy", {"app_id": demo.APP_CLIENT_ID, "allowed": None})
        for mailbox_id in (alice, carol, bob):
            stack.dv("PATCH", f"mailboxes({mailbox_id})", {"testemailconfigurationscheduled": False})
        reset: dict[str, object] = {"systemusers": [{"systemuserid": demo_user_id("bob"),
                                                     "mailbox": {"_emailserverprofile_value": None}}]}
        seed_dataverse(stack, reset)
