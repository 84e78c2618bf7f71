"""CRM sync: Server-Side Synchronization also set up on a router mailbox (audit dataverse-fidelity #12) and the
default queues of users and teams (#23)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from core.domain.model import SssStatus
from core.settings.crm_sync import crm_mailboxes, default_queue_ids, sss_findings, sss_status
from core.settings.rows import parse_mailbox_row, row_key

U1, Q1, Q2, MB1, MB2, PROFILE = (str(uuid.uuid4()) for _ in range(6))


def mailbox(mid: str, **over: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"mailboxid": mid, "statecode": 0, "incomingemaildeliverymethod": 2,
                           "outgoingemaildeliverymethod": 2, "enabledforincomingemail": True,
                           "enabledforoutgoingemail": True, "incomingemailstatus": 0, "outgoingemailstatus": 0}
    row.update(over)
    return row


@pytest.mark.parametrize(("over", "incoming", "outgoing"), [
    ({}, SssStatus.NONE, SssStatus.NONE),  # no email server profile: SSS never touches it
    ({"_emailserverprofile_value": PROFILE}, SssStatus.CONFIGURED, SssStatus.CONFIGURED),
    ({"_emailserverprofile_value": PROFILE, "outgoingemailstatus": 1}, SssStatus.CONFIGURED, SssStatus.ACTIVE),
    ({"_emailserverprofile_value": PROFILE, "outgoingemailstatus": 1, "enabledforoutgoingemail": False},
     SssStatus.CONFIGURED, SssStatus.CONFIGURED),
    ({"_emailserverprofile_value": PROFILE, "incomingemailstatus": 1, "outgoingemaildeliverymethod": 0},
     SssStatus.ACTIVE, SssStatus.NONE),  # outgoing None: SSS does not send for it
    ({"_emailserverprofile_value": PROFILE, "outgoingemailstatus": 1, "statecode": 1},
     SssStatus.NONE, SssStatus.NONE),  # an inactive mailbox is processed by nobody
])
def test_sss_status_per_direction(over: dict[str, Any], incoming: SssStatus, outgoing: SssStatus) -> None:
    row = mailbox(MB1, **over)
    assert (sss_status(row, "incoming"), sss_status(row, "outgoing")) == (incoming, outgoing)


def test_the_sync_flags_sss_on_router_mailboxes_and_the_row_carries_it() -> None:
    users = [{"systemuserid": U1, "internalemailaddress": "alice@x.example", "incomingemaildeliverymethod": 2,
              "outgoingemaildeliverymethod": 2, "emailrouteraccessapproval": 1, "_defaultmailbox_value": MB1}]
    mailboxes = [mailbox(MB1, _emailserverprofile_value=PROFILE, outgoingemailstatus=1)]
    found, errors = crm_mailboxes(users, [], mailboxes, [])
    assert not errors
    [alice] = found
    assert (alice.columns["CrmSssOutgoing"], alice.columns["CrmSssIncoming"]) == ("active", "configured")
    findings = sss_findings(found)
    assert any("alice@x.example: Server-Side Synchronization active for outgoing" in f
               and "does not send" in f for f in findings)
    assert any("configured for incoming" in f for f in findings)
    config = parse_mailbox_row({"RowKey": row_key("alice@x.example"), "Address": "alice@x.example", **alice.columns})
    assert not isinstance(config, Exception)
    assert config.sss_outgoing is SssStatus.ACTIVE  # type: ignore[union-attr]
    # an admin who knows better overrides it like any other value
    config = parse_mailbox_row({"RowKey": row_key("alice@x.example"), "Address": "alice@x.example",
                                **alice.columns, "OverrideSssOutgoing": "none"})
    assert config.sss_outgoing is SssStatus.NONE  # type: ignore[union-attr]


def test_default_queues_of_users_and_teams_are_not_mailboxes() -> None:
    users = [{"systemuserid": U1, "internalemailaddress": "alice@x.example", "incomingemaildeliverymethod": 2,
              "outgoingemaildeliverymethod": 2, "_queueid_value": Q1}]
    teams = [{"teamid": str(uuid.uuid4()), "_queueid_value": Q2.upper()}]
    queues = [
        # alice's default queue carries her address: not "address also used by" any more, just skipped
        {"queueid": Q1, "emailaddress": "alice@x.example", "incomingemaildeliverymethod": 2},
        {"queueid": Q2, "emailaddress": "team@x.example", "incomingemaildeliverymethod": 2},
        {"queueid": str(uuid.uuid4()), "emailaddress": "support@x.example", "incomingemaildeliverymethod": 2},
    ]
    assert default_queue_ids(users, teams) == {Q1.lower(), Q2.lower()}
    found, errors = crm_mailboxes(users, queues, [], [], teams)
    assert errors == []
    assert sorted(m.address for m in found) == ["alice@x.example", "support@x.example"]


def test_health_never_writes_test_statuses_to_a_mailbox_with_a_server_profile() -> None:
    from datetime import UTC, datetime

    from core.settings.health import CheckResult, Health, ProbeOutcome, ProbeState, crm_mailbox_update

    outcome = ProbeOutcome("a@x.example", Health.OK, Health.OK, Health.OK, (CheckResult("graph_read", True, ""),),
                           ProbeState())
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert crm_mailbox_update(outcome, now)["outgoingemailstatus"] == 1
    quiet = crm_mailbox_update(outcome, now, statuses=False)
    assert "outgoingemailstatus" not in quiet and "incomingemailstatus" not in quiet
    assert quiet["testmailboxaccesscompletedon"]


async def test_the_health_checks_for_sss_and_concurrency() -> None:
    from dataclasses import dataclass

    from core.domain.model import CrmRecordRef, InboundMethod, MailboxConfig, MailboxKind, OutboundMethod
    from core.domain.org_schema import OrgSchema
    from core.settings.health import MailboxHealthService

    @dataclass
    class Schema:
        schema: OrgSchema

        async def get(self) -> OrgSchema:
            return self.schema

    mailbox = MailboxConfig(address="a@x.example", kind=MailboxKind.USER,
                            owner=CrmRecordRef("systemuser", uuid.uuid4()),
                            inbound_method=InboundMethod.INDIVIDUAL, outbound_method=OutboundMethod.ROUTER,
                            sss_outgoing=SssStatus.ACTIVE, sss_incoming=SssStatus.CONFIGURED)
    service = MailboxHealthService(None, None, None, None, None,  # type: ignore[arg-type]
                                   schema=Schema(OrgSchema(optimistic_concurrency={"email": False})))
    out = await service._check_sss_outgoing(mailbox, None, None)  # type: ignore[arg-type]
    assert not out.ok and "both would send" in out.detail
    inc = await service._check_sss_incoming(mailbox, None, None)  # type: ignore[arg-type]
    assert inc.ok and "Test & Enable" in inc.detail
    conc = await service._check_crm_concurrency(mailbox, None, None)  # type: ignore[arg-type]
    assert not conc.ok and "optimistic concurrency is off" in conc.detail
