"""GraphMailClient on the wire (httpx.MockTransport behind the real msgraph-sdk middleware): the exact requests the
router sends for delta, attachments, upload sessions and subscriptions, and how it reads Graph's delta resets."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import pytest

from core.adapters.graph import GraphMailClient, GraphSyncStateNotFound, GraphThrottled

BASE = "https://graph.test/v1.0"


class _Tokens:
    async def get_authorization_token(self, uri: str, additional_authentication_context: Any = None) -> str:
        return "token"

    def get_allowed_hosts_validator(self) -> Any:
        from kiota_abstractions.authentication import AllowedHostsValidator

        return AllowedHostsValidator(["graph.test"])


class Wire:
    """Records every request; ``answer(request)`` returns the response."""

    def __init__(self, answer: Callable[[httpx.Request], httpx.Response]) -> None:
        self.requests: list[httpx.Request] = []
        self._answer = answer

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        return self._answer(request)


def client(wire: Wire) -> GraphMailClient:
    return GraphMailClient(BASE, _Tokens(), http_client=httpx.AsyncClient(transport=httpx.MockTransport(wire)))


def query(request: httpx.Request) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(str(request.url)).query).items()}


async def test_a_new_delta_round_orders_newest_first_and_asks_only_for_created() -> None:
    wire = Wire(lambda r: httpx.Response(200, json={"value": [], "@odata.deltaLink": f"{BASE}/d?$deltatoken=x"}))
    graph = client(wire)
    await graph.delta_page("u@x.com", "inbox", None, received_after=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
                           change_type="created")
    await graph.delta_page("u@x.com", "inbox", f"{BASE}/d?$deltatoken=x")
    first, later = wire.requests
    q = query(first)
    assert q["$orderby"] == "receivedDateTime desc" and q["changeType"] == "created"
    assert q["$filter"] == "receivedDateTime ge 2026-01-02T03:04:05Z"
    assert str(later.url) == f"{BASE}/d?$deltatoken=x"  # links are followed as Graph gave them
    await graph.close()


@pytest.mark.parametrize("code", ["syncStateNotFound", "SyncStateNotFound", "resyncRequired", "ResyncRequired",
                                  "syncStateInvalid", "SyncStateInvalid"])
async def test_delta_reset_codes_are_recognised_whatever_their_case(code: str) -> None:
    status = 400 if code.lower() == "syncstateinvalid" else 410
    wire = Wire(lambda r: httpx.Response(status, json={"error": {"code": code, "message": "reset"}}))
    graph = client(wire)
    with pytest.raises(GraphSyncStateNotFound):
        await graph.delta_page("u@x.com", "inbox", f"{BASE}/d?$deltatoken=x")
    await graph.close()


async def test_the_message_lists_attachments_by_metadata_and_contents_come_apart() -> None:
    small = [{"id": f"s{n}", "name": f"s{n}.txt", "size": 10, "isInline": n == 0} for n in range(3)]
    big = {"id": "big", "name": "big.bin", "size": 5 * 1024 * 1024, "isInline": False}

    def answer(request: httpx.Request) -> httpx.Response:
        path = unquote(urlsplit(str(request.url)).path)
        if path.endswith("/$batch"):
            body = json.loads(request.content)
            return httpx.Response(200, json={"responses": [
                {"id": r["id"], "status": 200, "body": {"id": r["url"].rsplit("/", 1)[1], "contentId": "c",
                                                        "contentBytes": base64.b64encode(b"x").decode()}}
                for r in reversed(body["requests"])]})
        if path.endswith("/$value"):
            return httpx.Response(200, content=b"B" * big["size"], headers={"Content-Type": "application/pdf"})
        return httpx.Response(200, json={"id": "m1", "attachments": []})

    wire = Wire(answer)
    graph = client(wire)
    await graph.get_message("u@x.com", "m1")
    assert query(wire.requests[0])["$expand"].startswith("attachments($select=id,name,contentType,size,isInline),")
    got = await graph.get_attachment_contents("u@x.com", "m1", [*small, big])
    assert got.requests == 2  # one raw $value for the big file, one $batch for the three small ones
    assert [a["id"] for a in got.attachments] == ["s0", "s1", "s2", "big"]
    assert got.attachments[3]["contentBytes"] == b"B" * big["size"]
    value, batch = wire.requests[1:]
    assert unquote(value.url.path).endswith("/attachments/big/$value") and value.headers["accept"] == "*/*"
    items = json.loads(batch.content)["requests"]
    assert [r.get("dependsOn") for r in items] == [None, ["0"], ["1"]]  # one at a time in the mailbox
    assert all(r["method"] == "GET" and "/attachments/s" in r["url"] for r in items)
    await graph.close()


async def test_large_uploads_send_octet_stream_ranges_under_4_mb_with_inline_fields(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("createUploadSession"):
            return httpx.Response(201, json={"uploadUrl": "https://outlook.test/upload?authtoken=t"})
        end, total = request.headers["content-range"].split("-")[1].split("/")
        return httpx.Response(201 if int(end) + 1 == int(total) else 200, json={})

    wire = Wire(answer)
    graph = client(wire)
    real_client = httpx.AsyncClient
    # the pre-authenticated upload URL is PUT to with a plain client of its own (no bearer token): route it too
    monkeypatch.setattr(httpx, "AsyncClient",
                        lambda **kw: real_client(transport=httpx.MockTransport(wire), **kw))
    data = b"z" * (7 * 1024 * 1024 + 5)
    await graph.upload_large_attachment("u@x.com", "d1", name="img.png", content_type="image/png", data=data,
                                        is_inline=True, content_id="img1")
    session, *puts = wire.requests
    item = json.loads(session.content)["AttachmentItem"]
    assert item["isInline"] is True and item["contentId"] == "img1" and item["size"] == len(data)
    assert [len(p.content) for p in puts] == [3 * 1024 * 1024, 3 * 1024 * 1024, 1024 * 1024 + 5]
    assert all(p.headers["content-type"] == "application/octet-stream" and "authorization" not in p.headers
               for p in puts)
    await graph.close()


async def test_subscriptions_are_created_by_direct_post_with_immutable_ids() -> None:
    wire = Wire(lambda r: httpx.Response(201, json={"id": "s1"}))
    graph = client(wire)
    assert (await graph.create_subscription({"resource": "users/x/messages"}))["id"] == "s1"
    (request,) = wire.requests
    assert request.method == "POST" and request.url.path == "/v1.0/subscriptions"
    assert request.headers["prefer"] == 'IdType="ImmutableId"'
    await graph.close()


async def test_a_throttled_subscription_create_is_not_retried_inline() -> None:
    wire = Wire(lambda r: httpx.Response(429, headers={"Retry-After": "3"},
                                         json={"error": {"code": "TooManyRequests", "message": "later"}}))
    graph = client(wire)
    with pytest.raises(GraphThrottled) as caught:
        await graph.create_subscription({"resource": "users/x/messages"})
    assert caught.value.retry_after == 3.0 and len(wire.requests) == 1
    await graph.close()
