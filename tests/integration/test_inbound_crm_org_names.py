"""The inbound CRM gateway against the strict emulator: names come from the org's metadata, not constants.

The emulator refuses every navigation name its reference data does not declare (400 0x80048d19), so these tests
fail if the router spells a name itself. A variant org (a relationship renamed away, concurrency off) shows that
an undeclared relationship is left out instead of failing the email, and the cache reads metadata once.
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("emulators.dataverse.testing", reason="Dataverse emulator package not present")

from core.adapters.dataverse import DataverseClient
from core.domain.inbound import InboundContext, PlannedAttachment, TrackEmail, plan_inbound
from core.domain.model import CrmRecordRef, CrmTable
from core.services.inbound_crm import AttachmentRejected, DataverseInboundCrm, StaleReference, WriteOutcome
from core.services.org_schema import OrgSchemaCache, read_org_schema
from emulators.common.tls import ensure_tls
from emulators.dataverse.seed import demo_user_id
from emulators.dataverse.service import OrgVariant
from emulators.dataverse.testing import RunningDataverse, start_dataverse
from tests.unit.domain.factories import NOW, addr, message, org, user_mailbox

pytestmark = pytest.mark.integration

ALICE = CrmRecordRef(CrmTable.SYSTEMUSER, uuid.UUID(demo_user_id("alice")))
FIONA = CrmRecordRef(CrmTable.CONTACT, uuid.UUID("c0ffee00-0000-4000-8000-00000000c001"))
FABRIKAM = CrmRecordRef(CrmTable.ACCOUNT, uuid.UUID("c0ffee00-0000-4000-8000-00000000ac01"))


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tls")


@pytest.fixture(scope="module")
def dataverse(tls_dir: Path) -> Iterator[RunningDataverse]:
    # No identity: the gateway's behaviour, not auth, is under test (auth has its own tests). Lenient mode on
    # purpose: one module runs the way real Dataverse treats read-only columns (ignored, not refused).
    server = start_dataverse(tls_dir, None, strict=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def client(dataverse: RunningDataverse, tls_dir: Path) -> AsyncIterator[DataverseClient]:
    async def token() -> str:
        return "unused"

    dataverse.state.dv.variant = OrgVariant()
    verify = ssl.create_default_context(cafile=str(ensure_tls(tls_dir).bundle))
    dv = DataverseClient(dataverse.api_url, token, verify=verify)
    try:
        yield dv
    finally:
        await dv.close()
        dataverse.state.dv.variant = OrgVariant()


def _mailbox_id(dataverse: RunningDataverse) -> uuid.UUID:
    from emulators.dataverse.schema import ENTITIES

    rows = dataverse.store.find(ENTITIES["mailbox"], "_regardingobjectid_value", str(ALICE.id))
    return uuid.UUID(rows[0]["mailboxid"])


def _plan(dataverse: RunningDataverse, **changes: Any) -> TrackEmail:
    ctx = InboundContext(mailbox=user_mailbox(address="alice@contoso.com", owner=ALICE,
                                              mailbox_id=_mailbox_id(dataverse)),
                         org=org(), now=NOW, directory={})
    plan = plan_inbound(message(internet_message_id=f"<{uuid.uuid4()}@fabrikam.example>",
                                to=(addr("alice@contoso.com"),)),
                        ctx)
    assert isinstance(plan, TrackEmail)
    return replace(plan, owner=ALICE, **changes)


def _row(dataverse: RunningDataverse, activity_id: uuid.UUID) -> dict[str, Any]:
    from emulators.dataverse.schema import ENTITIES

    row = dataverse.store.get(ENTITIES["email"], str(activity_id))
    assert row is not None
    return row


async def test_metadata_gives_the_declared_names(client: DataverseClient) -> None:
    schema = await read_org_schema(client)
    assert schema.from_org
    assert schema.nav("email", "receivingmailboxid", "mailbox") == "ReceivingMailboxId_Email"
    assert schema.nav("email", "correlatedactivityid", "email") == "CorrelatedActivityId_Email"
    assert schema.nav("email", "acceptingentityid", "systemuser") is None  # ambiguous: one name, two targets
    assert schema.nav("activityparty", "partyid", "contact") == "partyid_contact"
    assert schema.entity_set("usersettings") == "usersettingscollection"
    assert schema.concurrency_enabled("email") is True


async def test_tracked_email_binds_receiving_mailbox_owner_and_correlation(
        client: DataverseClient, dataverse: RunningDataverse) -> None:
    crm = DataverseInboundCrm(client)
    first = _plan(dataverse, regarding=FIONA)
    assert await crm.write(first) is WriteOutcome.CREATED
    # a reply correlated to the first: regarding copied through the annotation a fresh lookup returns
    found = await DataverseInboundCrm(client).lookup([], replace_keys(first))
    known = found.correlation.by_message_id[first.message_id]
    assert known.regarding == FIONA and known.regarding_nav == "regardingobjectid_contact_email"
    reply = _plan(dataverse, regarding=known.regarding, regarding_nav=known.regarding_nav,
                  parent_activity_id=known.activity_id, correlated_activity_id=known.activity_id,
                  accepting_entity=ALICE)
    assert await crm.write(reply) is WriteOutcome.CREATED
    row = _row(dataverse, reply.activity_id)
    assert row["_receivingmailboxid_value"] == str(_mailbox_id(dataverse))
    assert row["_ownerid_value"] == str(ALICE.id)
    assert row["_correlatedactivityid_value"] == row["_parentactivityid_value"] == str(first.activity_id)
    assert row["_regardingobjectid_value"] == str(FIONA.id)
    assert row.get("_acceptingentityid_value") is None  # never bound through an ambiguous name


def replace_keys(plan: TrackEmail) -> Any:
    from core.domain.correlation import CorrelationKeys

    return CorrelationKeys((plan.message_id,), (), ())


async def test_a_relationship_the_org_does_not_declare_is_left_out(
        client: DataverseClient, dataverse: RunningDataverse) -> None:
    dataverse.state.dv.variant = OrgVariant(nav_renames={("email", "ReceivingMailboxId_Email"): "",
                                                         ("email", "CorrelatedActivityId_Email"): ""})
    cache = OrgSchemaCache(client)
    crm = DataverseInboundCrm(client, schema=cache)
    plan = _plan(dataverse, correlated_activity_id=uuid.uuid4())
    assert await crm.write(plan) is WriteOutcome.CREATED
    assert _row(dataverse, plan.activity_id).get("_receivingmailboxid_value") is None
    again = _plan(dataverse)
    assert await crm.write(again) is WriteOutcome.CREATED
    assert cache.reads == 1  # metadata read once, then cached


async def test_bind_to_a_deleted_record_is_a_stale_reference(
        client: DataverseClient, dataverse: RunningDataverse) -> None:
    gone = CrmRecordRef(CrmTable.ACCOUNT, uuid.uuid4())
    with pytest.raises(StaleReference, match="does not exist in account entity"):
        await DataverseInboundCrm(client).write(_plan(dataverse, regarding=gone))


async def test_oversized_attachment_without_content_id_is_dropped_not_the_email(
        client: DataverseClient, dataverse: RunningDataverse) -> None:
    from emulators.dataverse.schema import ENTITIES

    org_row = dataverse.store.all(ENTITIES["organization"])[0]
    limit = int(org_row["maxuploadfilesize"])
    plan = _plan(dataverse)
    small = PlannedAttachment(uuid.uuid4(), "small.txt", "text/plain", b"ok", None, False)
    big = PlannedAttachment(uuid.uuid4(), "big.bin", "application/octet-stream", b"x" * (limit + 10), None, False)
    with pytest.raises(AttachmentRejected) as caught:
        await DataverseInboundCrm(client).write(replace(plan, attachments=(small, big)))
    assert caught.value.filename == "big.bin"  # failed part carried no Content-ID: the largest is blamed
    assert dataverse.store.get(ENTITIES["email"], str(plan.activity_id)) is None  # rolled back, to be re-planned



async def test_every_email_enabled_table_of_the_org_resolves_addresses(
        client: DataverseClient, dataverse: RunningDataverse) -> None:
    """Filter 3 covers the org's email-enabled tables (IsActivityParty, Email-format columns from the metadata), not
    five hard-coded ones: mail from a facility's address (equipment: BusinessOwned, no statecode) resolves to it and
    is tracked under "email-enabled records", its party bound through the org's partyid_equipment."""
    from core.domain.correlation import CorrelationKeys
    from core.domain.model import TrackingFilter
    from emulators.dataverse.seed import apply_seed

    schema = await read_org_schema(client)
    tables = {t.logical_name: t for t in schema.email_enabled}
    assert set(tables) == {"account", "contact", "equipment", "lead", "queue", "systemuser"}
    room = tables["equipment"]
    assert (room.entity_set, room.primary_name, room.email_columns, room.owned, room.has_state) == (
        "equipments", "name", ("emailaddress",), False, False)
    assert tables["contact"].email_columns == ("emailaddress1", "emailaddress2", "emailaddress3")
    assert tables["contact"].owned and tables["contact"].has_state

    room_id = str(uuid.uuid4())
    apply_seed(dataverse.state.dv, {"equipments": [{"equipmentid": room_id, "name": "Board room",
                                                    "emailaddress": "boardroom@contoso.com"}]})
    crm = DataverseInboundCrm(client)
    assert [t.table for t in await crm.party_tables()] == ["systemuser", "queue", "contact", "account", "lead",
                                                           "equipment"]
    found = await crm.lookup(["boardroom@contoso.com"], CorrelationKeys((), (), ()))
    (candidate,) = found.directory["boardroom@contoso.com"]
    assert candidate.record == CrmRecordRef("equipment", uuid.UUID(room_id))
    assert candidate.display_name == "Board room" and candidate.owner is None and candidate.is_active

    ctx = InboundContext(mailbox=user_mailbox(address="alice@contoso.com", owner=ALICE,
                                              mailbox_id=_mailbox_id(dataverse),
                                              tracking_filter=TrackingFilter.FROM_EMAIL_ENABLED_RECORDS),
                         org=org(), now=NOW, directory=found.directory)
    plan = plan_inbound(message(internet_message_id=f"<{uuid.uuid4()}@contoso.com>",
                                from_=addr("boardroom@contoso.com", "Board room"), to=(addr("alice@contoso.com"),)),
                        ctx)
    assert isinstance(plan, TrackEmail), plan
    assert any("filter 3: sender resolves to an email-enabled equipment" in d.why for d in plan.decisions)
    assert await crm.write(replace(plan, owner=ALICE)) is WriteOutcome.CREATED
    from emulators.dataverse.schema import ENTITIES

    parties = dataverse.store.find(ENTITIES["activityparty"], "_activityid_value", str(plan.activity_id))
    sender = next(p for p in parties if p["participationtypemask"] == 1)
    assert sender["_partyid_value"] == room_id
