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
