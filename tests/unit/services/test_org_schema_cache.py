"""OrgSchemaCache: one metadata read for concurrent callers, parsed from the documented response shapes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from core.adapters.odata import BatchRequest, BatchResponse
from core.services.org_schema import OrgSchemaCache, parse_schema, schema_requests


def _ok(payload: Any) -> BatchResponse:
    return BatchResponse(200, {"Content-Type": "application/json"}, json.dumps(payload).encode())


class FakeMetadata:
    def __init__(self) -> None:
        self.calls = 0

    async def execute_batch(self, requests: Sequence[BatchRequest], *, continue_on_error: bool = False
                            ) -> list[BatchResponse]:
        self.calls += 1
        await asyncio.sleep(0.01)
        out = [_ok({"value": [{"LogicalName": "email", "EntitySetName": "emails",
                                "IsOptimisticConcurrencyEnabled": False}]})]
        for request in requests[1:]:
            rows = []
            if "LogicalName='email'" in request.url:
                rows = [{"SchemaName": "mailbox_email_ReceivingMailboxId", "ReferencingAttribute": "receivingmailboxid",
                         "ReferencedEntity": "mailbox", "ReferencingEntityNavigationPropertyName": "Custom_Nav"}]
            out.append(_ok({"value": rows}))
        return out


def test_requests_ask_only_for_what_the_router_binds() -> None:
    requests = schema_requests()
    assert requests[0].url.startswith("EntityDefinitions?")
    assert all(r.method == "GET" for r in requests)
    assert any("ManyToOneRelationships" in r.url and "receivingmailboxid" in r.url for r in requests)


async def test_concurrent_callers_share_one_read_and_get_the_orgs_names() -> None:
    fake = FakeMetadata()
    cache = OrgSchemaCache(fake)
    schemas = await asyncio.gather(*(cache.get() for _ in range(8)))
    assert fake.calls == 1 and cache.reads == 1
    schema = schemas[0]
    assert schema.from_org and schema.nav("email", "receivingmailboxid", "mailbox") == "Custom_Nav"
    assert schema.concurrency_enabled("email") is False
    assert schema.entity_set("email") == "emails" and schema.entity_set("contact") is None


def test_parse_raises_the_typed_error_of_a_failed_part() -> None:
    failed = BatchResponse(404, {"Content-Type": "application/json"},
                           b'{"error":{"code":"0x80040217","message":"Could not find entity"}}')
    try:
        parse_schema([failed])
    except Exception as exc:
        assert "Could not find entity" in str(exc)
    else:
        raise AssertionError("a failed metadata read must raise")


def test_email_enabled_tables_come_from_the_metadata_bounded() -> None:
    from core.services.org_schema import (
        MAX_EMAIL_TABLES,
        email_table_candidates,
        email_table_requests,
        parse_email_tables,
    )

    definitions = [
        {"LogicalName": "new_agent", "EntitySetName": "new_agents", "IsActivityParty": True,
         "PrimaryIdAttribute": "new_agentid", "PrimaryNameAttribute": "new_name", "OwnershipType": "UserOwned"},
        {"LogicalName": "equipment", "EntitySetName": "equipments", "IsActivityParty": True,
         "PrimaryIdAttribute": "equipmentid", "PrimaryNameAttribute": "name", "OwnershipType": "BusinessOwned"},
        {"LogicalName": "opportunity", "EntitySetName": "opportunities", "IsActivityParty": True,
         "PrimaryIdAttribute": "opportunityid", "PrimaryNameAttribute": "name", "OwnershipType": "UserOwned"},
        {"LogicalName": "email", "EntitySetName": "emails", "IsActivityParty": False,
         "PrimaryIdAttribute": "activityid"},
    ]
    candidates = email_table_candidates([_ok({"value": definitions})])
    assert [c["LogicalName"] for c in candidates] == ["equipment", "new_agent", "opportunity"]
    requests = email_table_requests(candidates)
    assert len(requests) == 6 and requests[0].url.startswith(
        "EntityDefinitions(LogicalName='equipment')/Attributes/Microsoft.Dynamics.CRM.StringAttributeMetadata?")
    answers = [
        _ok({"value": [{"LogicalName": "emailaddress", "FormatName": {"Value": "Email"}},
                       {"LogicalName": "name", "FormatName": {"Value": "Text"}}]}), _ok({"value": []}),
        _ok({"value": [{"LogicalName": "new_email", "FormatName": {"Value": "Email"}},
                       {"LogicalName": "new_backup", "FormatName": {"Value": "Email"}}]}),
        _ok({"value": [{"LogicalName": "statecode"}]}),
        _ok({"value": [{"LogicalName": "name", "FormatName": {"Value": "Text"}}]}),  # no email column: not searched
        _ok({"value": [{"LogicalName": "statecode"}]}),
    ]
    tables = parse_email_tables(candidates, answers)
    assert [(t.logical_name, t.email_columns, t.owned, t.has_state) for t in tables] == [
        ("equipment", ("emailaddress",), False, False), ("new_agent", ("new_backup", "new_email"), True, True)]
    many = [{**definitions[0], "LogicalName": f"new_t{i:03d}"} for i in range(MAX_EMAIL_TABLES + 5)]
    assert len(email_table_candidates([_ok({"value": many})])) == MAX_EMAIL_TABLES


def test_party_tables_are_the_orgs_email_enabled_tables() -> None:
    from dataclasses import replace

    from core.domain.org_schema import DOCUMENTED, EmailEnabledTable
    from core.services.inbound_crm import PARTY_TABLES, party_tables_for

    assert party_tables_for(DOCUMENTED) == PARTY_TABLES  # before the org's metadata is read
    org = replace(DOCUMENTED, from_org=True, email_enabled=(
        EmailEnabledTable("systemuser", "systemusers", "systemuserid", "fullname",
                          ("internalemailaddress", "personalemailaddress"), False, False),
        EmailEnabledTable("contact", "contacts", "contactid", "fullname",
                          ("emailaddress1", "emailaddress2", "emailaddress3"), True, True),
        EmailEnabledTable("new_agent", "new_agentset", "new_agentid", "new_name", ("new_email",), True, True),
    ))
    tables = party_tables_for(org)
    assert [t.table for t in tables] == ["systemuser", "contact", "new_agent"]  # no lead/account/queue in this org
    assert tables[0].address_columns == ("internalemailaddress",)  # a user's personal address is not theirs
    assert tables[2].entity_set == "new_agentset" and tables[2].select == ("new_agentid", "new_name", "new_email",
                                                                          "_ownerid_value", "statecode")
