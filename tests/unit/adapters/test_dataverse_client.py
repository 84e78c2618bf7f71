"""DataverseClient over a scripted HTTP fake (httpx.MockTransport) serving documented Dataverse responses.

These pin what goes on the wire (headers §1, Prefer, conditions, impersonation) and the retry rules without
a network or a clock; the behaviour against a full Web API is covered by tests/integration against the
Dataverse emulator.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from urllib.parse import unquote

import httpx
import pytest

from core.adapters.dataverse import (
    AuthError,
    BatchRequest,
    ChangeSet,
    DataverseClient,
    DuplicateRecordError,
    Impersonation,
    NotFoundError,
    PreconditionFailedError,
    ThrottledError,
    TransientError,
)
from core.adapters.odata import encode_batch
from core.adapters.retry import RetryPolicy
from core.config import Settings
from tests.fakes import Clock

ORG = "https://org.example"
API = f"{ORG}/api/data/v9.2"
EMAIL_ID = "2f6c1c6e-5d2b-5f4e-9a8e-1d0c9b7a6e51"
USER_OID = "4026be43-6b69-e111-8f65-78e7d1620f5e"

Handler = Callable[[httpx.Request], httpx.Response]
MakeClient = Callable[..., "DataverseClient"]


class FakeServer:
    """Replies from a list of handlers in order (the last one repeats) and records every request."""

    def __init__(self, *handlers: Handler) -> None:
        self.handlers = list(handlers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        handler = self.handlers.pop(0) if len(self.handlers) > 1 else self.handlers[0]
        return handler(request)


def reply(status: int, payload: object | None = None, headers: dict[str, str] | None = None) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        content = json.dumps(payload).encode() if payload is not None else b""
        hdrs = {"OData-Version": "4.0", **(headers or {})}
        if payload is not None:
            hdrs.setdefault("Content-Type", "application/json; odata.metadata=minimal")
        return httpx.Response(status, content=content, headers=hdrs)

    return handler


def error(status: int, code: str = "", message: str = "", headers: dict[str, str] | None = None) -> Handler:
    return reply(status, {"error": {"code": code, "message": message}}, headers)


def fail_with(exc: Exception) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tokens() -> list[str]:
    return []


@pytest.fixture
def make_client(clock: Clock, tokens: list[str]) -> MakeClient:

    async def token() -> str:
        tokens.append(f"tok{len(tokens)}")
        return tokens[-1]

    def make(server: FakeServer, **kwargs: object) -> DataverseClient:
        client = DataverseClient(
            API, token, transport=httpx.MockTransport(server), sleep=clock.sleep, clock=clock.monotonic,
            retry_policy=RetryPolicy(max_retries=3, max_retry_after=30.0, jitter=False),
            **kwargs,  # type: ignore[arg-type]
        )
        return client

    return make


# ------------------------------------------------------------------------------------------------ headers


async def test_create_sends_documented_headers_and_parses_odata_entityid(
    make_client: MakeClient, tokens: list[str]
) -> None:
    server = FakeServer(reply(204, headers={"OData-EntityId": f"{API}/accounts(7eb682f1-ca75-e511-80d4-00155d2a68d1)"}))
    client = make_client(server)
    new_id = await client.create("accounts", {"name": "Sample Account"})
    await client.close()
    assert new_id == "7eb682f1-ca75-e511-80d4-00155d2a68d1"
    [req] = server.requests
    assert (req.method, str(req.url)) == ("POST", f"{API}/accounts")
    assert req.headers["OData-MaxVersion"] == "4.0" and req.headers["OData-Version"] == "4.0"
    assert req.headers["Accept"] == "application/json"
    assert req.headers["Content-Type"] == "application/json; charset=utf-8"
    assert req.headers["Authorization"] == f"Bearer {tokens[0]}"
    assert "Prefer" not in req.headers and "If-None-Match" not in req.headers
    assert json.loads(req.content) == {"name": "Sample Account"}


async def test_create_with_representation_and_select(make_client: MakeClient) -> None:
    body = {"@odata.context": f"{API}/$metadata#emails(activityid)/$entity", "@odata.etag": 'W/"536530"',
            "activityid": EMAIL_ID}
    server = FakeServer(reply(201, body, {"Preference-Applied": "return=representation"}))
    client = make_client(server)
    result = await client.create("emails", {"activityid": EMAIL_ID, "subject": "s"}, return_representation=True,
                                 select=["activityid"])
    await client.close()
    assert result == body
    [req] = server.requests
    assert req.headers["Prefer"] == "return=representation"
    assert req.url.params["$select"] == "activityid"


async def test_impersonation_headers(make_client: MakeClient) -> None:
    server = FakeServer(reply(204, headers={"OData-EntityId": f"{API}/emails({EMAIL_ID})"}))
    client = make_client(server)
    await client.create("emails", {"subject": "s"}, impersonate=Impersonation.by_object_id(USER_OID))
    await client.create("emails", {"subject": "s"}, impersonate=Impersonation.by_systemuser_id(USER_OID))
    await client.close()
    assert server.requests[0].headers["CallerObjectId"] == USER_OID
    assert "MSCRMCallerID" not in server.requests[0].headers
    assert server.requests[1].headers["MSCRMCallerID"] == USER_OID
    with pytest.raises(ValueError):
        Impersonation()
    with pytest.raises(ValueError):
        Impersonation.by_object_id("not-a-guid")


async def test_get_sends_if_none_match_null_and_options(make_client: MakeClient) -> None:
    server = FakeServer(reply(200, {"activityid": EMAIL_ID, "statecode": 0}))
    client = make_client(server)
    row = await client.get(
        "emails", EMAIL_ID, select=["statecode"], expand="email_activity_parties($select=addressused)",
        annotations="Microsoft.Dynamics.CRM.lookuplogicalname",
    )
    await client.close()
    assert row["statecode"] == 0
    [req] = server.requests
    assert req.url.path == f"/api/data/v9.2/emails({EMAIL_ID})"
    assert req.headers["If-None-Match"] == "null"
    assert req.headers["Prefer"] == 'odata.include-annotations="Microsoft.Dynamics.CRM.lookuplogicalname"'
    assert req.url.params["$expand"] == "email_activity_parties($select=addressused)"


async def test_get_missing_raises_not_found(make_client: MakeClient) -> None:
    server = FakeServer(error(404, "", f"email With Id = {EMAIL_ID} Does Not Exist"))
    client = make_client(server)
    with pytest.raises(NotFoundError):
        await client.get("emails", EMAIL_ID)
    await client.close()
    assert len(server.requests) == 1  # 404 is never retried


# ------------------------------------------------------------------------------------------------ paging


async def test_list_follows_next_link_with_the_same_prefer(make_client: MakeClient) -> None:
    next_link = f"{API}/contacts?$select=fullname&$skiptoken=%3Ccookie%20pagenumber=%222%22%20/%3E"
    server = FakeServer(
        reply(200, {"value": [{"fullname": "a"}, {"fullname": "b"}], "@odata.nextLink": next_link}),
        reply(200, {"value": [{"fullname": "c"}]}),
    )
    client = make_client(server)
    rows = [r["fullname"] async for r in client.list("contacts", select=["fullname"], filter="statecode eq 0",
                                                      page_size=2)]
    await client.close()
    assert rows == ["a", "b", "c"]
    first, second = server.requests
    assert first.headers["Prefer"] == "odata.maxpagesize=2"
    assert unquote(first.url.params["$filter"]) == "statecode eq 0"
    assert str(second.url) == next_link  # used unchanged
    assert second.headers["Prefer"] == "odata.maxpagesize=2"


async def test_list_enforces_top_even_when_paging(make_client: MakeClient) -> None:
    server = FakeServer(reply(200, {"value": [{"n": 1}, {"n": 2}], "@odata.nextLink": f"{API}/contacts?$skiptoken=x"}))
    client = make_client(server)
    rows = [r async for r in client.list("contacts", top=1, page_size=2)]
    await client.close()
    assert rows == [{"n": 1}] and len(server.requests) == 1


# ------------------------------------------------------------------------------------------------ update


async def test_update_defaults_to_if_match_star_and_returns_etag(make_client: MakeClient) -> None:
    server = FakeServer(reply(204, headers={"ETag": 'W/"12"'}))
    client = make_client(server)
    etag = await client.update("emails", EMAIL_ID, {"statecode": 1, "statuscode": 4})
    await client.close()
    assert etag == 'W/"12"'
    [req] = server.requests
    assert (req.method, req.headers["If-Match"]) == ("PATCH", "*")


async def test_update_etag_mismatch_and_upsert_modes(make_client: MakeClient) -> None:
    server = FakeServer(
        error(412, "", "The version of the existing record doesn't match the RowVersion property provided."),
        reply(204),
        error(412, "", "A record with matching key values already exists."),
        reply(200, {"@odata.etag": 'W/"13"', "activityid": EMAIL_ID}),
    )
    client = make_client(server)
    with pytest.raises(PreconditionFailedError):
        await client.update("emails", EMAIL_ID, {"statuscode": 7}, if_match='W/"11"')
    assert await client.update("emails", EMAIL_ID, {"subject": "s"}, upsert=True) is None
    with pytest.raises(DuplicateRecordError):
        await client.update("emails", EMAIL_ID, {"subject": "s"}, if_none_match="*")
    assert await client.update("emails", EMAIL_ID, {"statuscode": 7}, if_match='W/"12"', return_etag=True) == 'W/"13"'
    await client.close()
    claim, upsert, create_only, with_etag = server.requests
    assert claim.headers["If-Match"] == 'W/"11"'
    assert "If-Match" not in upsert.headers and "If-None-Match" not in upsert.headers
    assert create_only.headers["If-None-Match"] == "*" and "If-Match" not in create_only.headers
    assert with_etag.headers["Prefer"] == "return=representation"
    assert with_etag.url.params["$select"] == "activityid"


async def test_delete_of_a_missing_record_succeeds(make_client: MakeClient) -> None:
    server = FakeServer(error(404, "", "Does Not Exist"))
    client = make_client(server)
    await client.delete("emails", EMAIL_ID)
    await client.close()
    assert server.requests[0].method == "DELETE"


# ------------------------------------------------------------------------------------------------ retries


async def test_429_is_retried_after_retry_after_even_for_post(
    make_client: MakeClient, clock: Clock, tokens: list[str]
) -> None:
    server = FakeServer(
        error(429, "0x80072322", "Number of requests exceeded the limit of 6000 over time window of 300 seconds.",
              {"Retry-After": "7"}),
        reply(204, headers={"OData-EntityId": f"{API}/emails({EMAIL_ID})"}),
    )
    client = make_client(server)
    assert await client.create("emails", {"subject": "no id"}) == EMAIL_ID
    await client.close()
    assert clock.slept == [7.0]
    assert len(server.requests) == 2
    # a token is fetched per attempt so a refreshed token is used after a wait
    assert len(tokens) == 2


async def test_long_retry_after_is_handed_to_the_caller(make_client: MakeClient, clock: Clock) -> None:
    server = FakeServer(error(429, "0x80072321", "Combined execution time …", {"Retry-After": "300"}))
    client = make_client(server)
    with pytest.raises(ThrottledError) as caught:
        await client.get("emails", EMAIL_ID)
    await client.close()
    assert caught.value.retry_after == 300.0 and caught.value.reason == "execution_time"
    assert clock.slept == [] and len(server.requests) == 1


async def test_post_without_client_id_is_not_repeated_on_503(make_client: MakeClient, clock: Clock) -> None:
    server = FakeServer(error(503, "", "Service Unavailable"))
    client = make_client(server)
    with pytest.raises(TransientError):
        await client.create("emails", {"subject": "no id"})
    await client.close()
    assert len(server.requests) == 1 and clock.slept == []


async def test_post_with_client_id_is_repeated_and_duplicate_means_done(make_client: MakeClient, clock: Clock) -> None:
    # First attempt applied but its response lost (timeout); the repetition reports the duplicate key.
    server = FakeServer(
        fail_with(httpx.ReadTimeout("lost")),
        error(412, "0x80040237", "Cannot insert duplicate key."),
    )
    client = make_client(server)
    with pytest.raises(DuplicateRecordError):
        await client.create("emails", {"activityid": EMAIL_ID, "subject": "s"})
    await client.close()
    assert len(server.requests) == 2 and len(clock.slept) == 1


async def test_connect_errors_are_repeated_for_any_request(make_client: MakeClient) -> None:
    server = FakeServer(
        fail_with(httpx.ConnectError("refused")),
        reply(200, {"Subject": "s CRM:0001"}),
    )
    client = make_client(server)
    assert await client.send_email(EMAIL_ID, True) == {"Subject": "s CRM:0001"}
    await client.close()
    assert len(server.requests) == 2


async def test_conditional_patch_is_not_repeated_on_timeout_but_if_match_star_is(make_client: MakeClient) -> None:
    server = FakeServer(fail_with(httpx.ReadTimeout("lost")))
    client = make_client(server)
    with pytest.raises(TransientError):
        await client.update("emails", EMAIL_ID, {"statuscode": 7}, if_match='W/"5"')
    assert len(server.requests) == 1
    server.handlers = [fail_with(httpx.ReadTimeout("lost")), reply(204)]
    await client.update("emails", EMAIL_ID, {"statuscode": 3})
    await client.close()
    assert len(server.requests) == 3


async def test_get_gives_up_after_max_retries(make_client: MakeClient, clock: Clock) -> None:
    server = FakeServer(error(503, headers={"Retry-After": "1"}))
    client = make_client(server)
    with pytest.raises(TransientError):
        await client.get("emails", EMAIL_ID)
    await client.close()
    assert len(server.requests) == 4 and clock.slept == [1.0, 1.0, 1.0]


async def test_auth_errors_are_not_retried_here(make_client: MakeClient) -> None:
    server = FakeServer(error(401, "", "InvalidAuthTicket"))
    client = make_client(server)
    with pytest.raises(AuthError) as caught:
        await client.whoami()
    await client.close()
    assert caught.value.retryable and len(server.requests) == 1


# ------------------------------------------------------------------------------------------------ $batch


def batch_reply(parts: list[tuple[int, dict[str, str], object | None]], status: int = 200) -> Handler:
    """A batch response built with our encoder's mirror image: each part an application/http response."""

    def handler(request: httpx.Request) -> httpx.Response:
        boundary = "batchresponse_1"
        chunks = []
        for code, headers, payload in parts:
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            body = json.dumps(payload) if payload is not None else ""
            chunks.append(
                f"--{boundary}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
                f"HTTP/1.1 {code} X\r\n{head}\r\n{body}\r\n"
            )
        text = "".join(chunks) + f"--{boundary}--\r\n"
        return httpx.Response(status, content=text.encode(),
                              headers={"Content-Type": f"multipart/mixed; boundary={boundary}"})

    return handler


async def test_execute_batch_posts_multipart_and_decodes(make_client: MakeClient) -> None:
    server = FakeServer(batch_reply([
        (204, {"OData-EntityId": f"{API}/emails({EMAIL_ID})"}, None),
        (200, {"Content-Type": "application/json"}, {"UserId": USER_OID}),
    ]))
    client = make_client(server)
    responses = await client.execute_batch(
        [ChangeSet([BatchRequest("POST", "emails", {"activityid": EMAIL_ID}, idempotent=True)]),
         BatchRequest("GET", "WhoAmI")],
        impersonate=Impersonation.by_object_id(USER_OID),
    )
    await client.close()
    assert responses[0].entity_id == EMAIL_ID and responses[1].json() == {"UserId": USER_OID}
    [req] = server.requests
    assert str(req.url) == f"{API}/$batch"
    assert req.headers["Content-Type"].startswith('multipart/mixed; boundary="batch_')
    assert req.headers["If-None-Match"] == "null" and "Prefer" not in req.headers
    assert b"POST /api/data/v9.2/emails HTTP/1.1" in req.content
    assert f"CallerObjectId: {USER_OID}".encode() in req.content  # on every operation


async def test_failed_batch_raises_the_operation_error_with_all_responses(
    make_client: MakeClient, clock: Clock
) -> None:
    server = FakeServer(batch_reply([(412, {"Content-Type": "application/json"},
                                      {"error": {"code": "0x80040237", "message": "Cannot insert duplicate key."}})],
                                    status=400))
    client = make_client(server)
    with pytest.raises(DuplicateRecordError) as caught:
        await client.execute_batch([ChangeSet([BatchRequest("POST", "emails", {"activityid": EMAIL_ID})])])
    await client.close()
    assert caught.value.batch_responses is not None and caught.value.batch_responses[0].status == 412
    assert clock.slept == []  # an operation's failure is the answer, not a reason to resend the batch


async def test_continue_on_error_returns_every_response(make_client: MakeClient) -> None:
    server = FakeServer(batch_reply([(404, {}, {"error": {"code": "", "message": "x"}}), (200, {}, {"value": []})]))
    client = make_client(server)
    responses = await client.execute_batch([BatchRequest("GET", "emails"), BatchRequest("GET", "contacts")],
                                           continue_on_error=True)
    await client.close()
    assert [r.ok for r in responses] == [False, True]
    assert server.requests[0].headers["Prefer"] == "odata.continue-on-error"


async def test_batch_is_repeated_on_503_only_when_every_operation_is_safe(make_client: MakeClient) -> None:
    ok = batch_reply([(204, {}, None)])
    server = FakeServer(error(503), ok)
    client = make_client(server)
    await client.execute_batch([ChangeSet([BatchRequest("POST", "emails", {"activityid": EMAIL_ID}, idempotent=True)])])
    assert len(server.requests) == 2
    server.handlers = [error(503), ok]
    with pytest.raises(TransientError):
        await client.execute_batch([ChangeSet([BatchRequest("POST", "emails", {"subject": "no id"})])])
    await client.close()
    assert len(server.requests) == 3


# ------------------------------------------------------------------------------------------------ lookups


async def test_find_records_by_email_is_one_batch_with_a_get_per_table(make_client: MakeClient) -> None:
    contact = {"contactid": str(uuid.uuid4()), "emailaddress1": "A@x.example"}
    server = FakeServer(batch_reply([
        (200, {}, {"value": []}),
        (200, {}, {"value": []}),
        (200, {}, {"value": [contact]}),
        (200, {}, {"value": []}),
        (200, {}, {"value": []}),
    ]))
    client = make_client(server)
    found = await client.find_records_by_email(["a@x.example", "A@X.example", " ", "o'b@y.example"])
    await client.close()
    assert found["contacts"] == [contact]
    assert set(found) == {"systemusers", "queues", "contacts", "accounts", "leads"}
    [req] = server.requests  # one round trip
    text = req.content.decode()
    gets = [line for line in text.split("\r\n") if line.startswith("GET ")]
    assert len(gets) == 5
    contacts_get = unquote(next(g for g in gets if "/contacts?" in g))
    expected = "Microsoft.Dynamics.CRM.In(PropertyName='emailaddress2',PropertyValues=['a@x.example','o''b@y.example'])"
    assert expected in contacts_get


async def test_find_records_by_email_without_addresses_makes_no_call(make_client: MakeClient) -> None:
    server = FakeServer(reply(500))
    client = make_client(server)
    tables = ("systemusers", "queues", "contacts", "accounts", "leads")
    assert await client.find_records_by_email([]) == {t: [] for t in tables}
    await client.close()
    assert server.requests == []


# ------------------------------------------------------------------------------------------------ actions


async def test_send_email_and_tracking_token_and_whoami(make_client: MakeClient) -> None:
    server = FakeServer(
        reply(200, {"Subject": "Hello CRM:0001001"}),
        reply(200, {"TrackingToken": "CRM:0001002"}),
        reply(200, {"UserId": USER_OID, "BusinessUnitId": USER_OID, "OrganizationId": USER_OID}),
        reply(200, {"ShouldDeliver": True, "ReasonCode": 0}),
    )
    client = make_client(server)
    assert (await client.send_email(EMAIL_ID, False))["Subject"].endswith("CRM:0001001")
    assert await client.get_tracking_token("Hello") == "CRM:0001002"
    assert (await client.whoami())["UserId"] == USER_OID
    checked = await client.execute_function("CheckIncomingEmail", {"MessageId": "<a@b>", "Subject": "it's"})
    assert checked["ShouldDeliver"]
    await client.close()
    send, token, who, fn = server.requests
    assert send.url.path == f"/api/data/v9.2/emails({EMAIL_ID})/Microsoft.Dynamics.CRM.SendEmail"
    assert json.loads(send.content) == {"IssueSend": False}  # TrackingToken omitted = null = generate one
    assert token.url.path == "/api/data/v9.2/GetTrackingTokenEmail"
    assert json.loads(token.content) == {"Subject": "Hello"}
    assert (who.method, who.url.path) == ("GET", "/api/data/v9.2/WhoAmI")
    assert fn.url.path == "/api/data/v9.2/CheckIncomingEmail(MessageId=@p1,Subject=@p2)"
    assert (fn.url.params["@p1"], fn.url.params["@p2"]) == ("'<a@b>'", "'it''s'")


def test_from_settings_uses_the_configured_api_base() -> None:
    async def token() -> str:
        return "t"

    settings = Settings({"DATAVERSE_URL": "https://contoso.crm.dynamics.com/", "DATAVERSE_API_VERSION": "v9.2"})
    client = DataverseClient.from_settings(settings, token)
    assert client.api_base == "https://contoso.crm.dynamics.com/api/data/v9.2"
    with pytest.raises(ValueError):
        DataverseClient("contoso", token)


def test_encode_batch_is_what_the_client_sends() -> None:
    # guard: the client relies on encode_batch producing the boundary it announces
    content_type, body = encode_batch([BatchRequest("GET", "WhoAmI")], api_path="/api/data/v9.2")
    boundary = content_type.split('boundary="')[1].rstrip('"')
    assert body.startswith(f"--{boundary}\r\n".encode()) and body.endswith(f"--{boundary}--\r\n".encode())


# ------------------------------------------------------------------------------------------------ affinity, dop hint


async def test_affinity_cookies_are_not_sent_back(make_client: MakeClient) -> None:
    # Dataverse sets ARRAffinity cookies; keeping them pins every request to one web server (api-limits.md).
    server = FakeServer(reply(200, {"value": []}, {"Set-Cookie": "ARRAffinity=abc; Path=/; HttpOnly; Secure"}))
    async with make_client(server) as client:
        await client.get("contacts", "00000000-0000-0000-0000-000000000001")
        await client.get("contacts", "00000000-0000-0000-0000-000000000001")
    assert all("cookie" not in r.headers for r in server.requests)


async def test_dop_hint_caps_requests_in_flight(make_client: MakeClient) -> None:
    in_flight = 0
    peak = 0
    gate = asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await gate.wait()
        in_flight -= 1
        return httpx.Response(200, json={"value": []}, headers={"x-ms-dop-hint": "2"})

    async def token() -> str:
        return "t"

    client = DataverseClient(API, token, transport=httpx.MockTransport(slow), max_connections=10)
    async with client:
        assert client.in_flight_limit == 10
        first = asyncio.ensure_future(client.get("contacts", "00000000-0000-0000-0000-000000000001"))
        await asyncio.sleep(0.01)
        gate.set()
        await first
        assert client.in_flight_limit == 2  # the org's hint, below the pool size
        gate.clear()
        calls = [asyncio.ensure_future(client.get("contacts", "00000000-0000-0000-0000-000000000001"))
                 for _ in range(6)]
        await asyncio.sleep(0.05)
        assert in_flight == 2
        gate.set()
        await asyncio.gather(*calls)
    assert peak == 2
