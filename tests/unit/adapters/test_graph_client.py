"""GraphMailClient on the wire (httpx.MockTransport): mailboxes addressed by object id, the message GET with its
extended properties, attachment MIME, and the directory lookup the CRM sync uses."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import pytest

from core.adapters.graph import GraphMailClient
from core.domain.model import LOOP_MARKER_PROPERTY

BASE = "https://graph.test/v1.0"
HANA_ID = "0b5f3c1e-7d2a-4a57-9d8e-0c9e7a6a1f01"


class _Tokens:
    async def get_authorization_token(self, uri: str, additional_authentication_context: Any = None) -> str:
        return "token"

    def get_allowed_hosts_validator(self) -> Any:
        from kiota_abstractions.authentication import AllowedHostsValidator

        return AllowedHostsValidator(["graph.test"])


def client(handler: Callable[[httpx.Request], httpx.Response], ids: dict[str, str] | None = None) -> GraphMailClient:
    async def user_ids(address: str) -> str | None:
        return (ids or {}).get(address)

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return GraphMailClient(BASE, _Tokens(), http_client=http, user_ids=user_ids if ids is not None else None)


@pytest.fixture
def seen() -> list[httpx.Request]:
    return []


async def test_paths_use_the_object_id_of_a_resolved_mailbox(seen: list[httpx.Request]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"id": "m1", "value": []})

    graph = client(handler, {"hana@contoso.example": HANA_ID})
    await graph.get_message("hana@contoso.example", "m1")
    await graph.set_categories("hana@contoso.example", "m1", ["Tracked"])
    await graph.get_message("other@contoso.example", "m2")  # not resolved: the address as before
    paths = [unquote(r.url.raw_path.decode()).split("?")[0] for r in seen]
    assert paths == [f"/v1.0/users/{HANA_ID}/messages/m1", f"/v1.0/users/{HANA_ID}/messages/m1",
                     "/v1.0/users/other@contoso.example/messages/m2"]


async def test_message_get_expands_attachments_and_the_extended_properties(seen: list[httpx.Request]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"id": "m1"})

    await client(handler).get_message("alice@contoso.example", "m1")
    query = parse_qs(urlsplit(str(seen[0].url)).query)
    expand = query["$expand"][0]
    assert expand.startswith("attachments($select=id,name,contentType,size,isInline),"
                             "singleValueExtendedProperties($filter=")
    for prop in ("String 0x1042", "String 0x1039", LOOP_MARKER_PROPERTY):
        assert f"id eq '{prop}'" in expand
    assert "internetMessageHeaders" in query["$select"][0].split(",")


async def test_attachment_mime_asks_for_any_content_type(seen: list[httpx.Request]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"From: a@b\r\n\r\nx", headers={"Content-Type": "text/plain"})

    raw = await client(handler).get_attachment_mime("crm-sink@contoso.example", "w1", "a=1")
    assert raw.startswith(b"From: a@b")
    assert seen[0].url.raw_path.decode().endswith("/attachments/a%3D1/$value")
    assert seen[0].headers["accept"] == "*/*"


async def test_find_user_ids_by_mail_then_by_proxy_address(seen: list[httpx.Request]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = json.loads(request.content)
        responses = []
        for req in body["requests"]:
            url = unquote(req["url"])
            if "proxyAddresses" in url:
                assert req["headers"]["ConsistencyLevel"] == "eventual" and "$count=true" in url
                users = [{"id": "alias-id"}] if "h.hill@" in url else []
            elif "hana@" in url:
                users = [{"id": HANA_ID}]
            elif "twins@" in url:
                users = [{"id": "1"}, {"id": "2"}]  # ambiguous: left out
            else:
                users = []
            responses.append({"id": req["id"], "status": 200, "body": {"value": users}})
        return httpx.Response(200, json={"responses": responses})

    found = await client(handler).find_user_ids(
        ["Hana@contoso.example", "h.hill@contoso.example", "twins@contoso.example", "nobody@contoso.example"])
    assert found == {"hana@contoso.example": HANA_ID, "h.hill@contoso.example": "alias-id"}
    assert len(seen) == 2  # one batch by mail/UPN, one by proxy address for those not found
