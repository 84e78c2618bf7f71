"""Our DataverseClient against the Dataverse emulator over TLS, with msal tokens from the identity emulator.

Every operation the router uses: create with deep insert, query by email address across tables, batch with
change set rollback, PATCH with ETag (412), SendEmail, tracking tokens, and 429 from the emulator's fault API
retried honouring Retry-After. Skipped only when the emulator package is not there.
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

pytest.importorskip("emulators.dataverse.testing", reason="Dataverse emulator package not present")

from core.adapters.auth import MsalTokenProvider
from core.adapters.dataverse import (
    AttachmentTooLargeError,
    BadRequestError,
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
from core.adapters.retry import RetryPolicy
from emulators.common import demo
from emulators.common.tls import TlsMaterial, client_env, ensure_tls
from emulators.dataverse.testing import start_dataverse
from emulators.identity.testing import start_identity
from tests.fakes import Clock

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsMaterial]:
    material = ensure_tls(tmp_path_factory.mktemp("tls"))
    # msal (requests) honours REQUESTS_CA_BUNDLE; httpx reads SSL_CERT_FILE when a client is built.
    with pytest.MonkeyPatch.context() as mp:
        for name, value in client_env(material).items():
            mp.setenv(name, value)
        yield material


@pytest.fixture(scope="module")
def stack(tls: TlsMaterial) -> Iterator[tuple[Any, Any]]:
    identity = start_identity(tls.ca_cert.parent)
    try:
        dataverse = start_dataverse(tls.ca_cert.parent, identity.url)
        try:
            yield identity, dataverse
        finally:
            dataverse.stop()
    finally:
        identity.stop()


@pytest.fixture(scope="module")
def tokens(stack: tuple[Any, Any]) -> MsalTokenProvider:
    identity, dataverse = stack
    return MsalTokenProvider(
        client_id=demo.APP_CLIENT_ID,
        authority=f"{identity.url}/{demo.TENANT_ID}",
        scope=f"{dataverse.url.rstrip('/')}/.default",
        client_secret=demo.APP_CLIENT_SECRET,
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def client(stack: tuple[Any, Any], tokens: MsalTokenProvider, clock: Clock) -> AsyncIterator[DataverseClient]:
    _, dataverse = stack
    dv = DataverseClient(
        dataverse.api_url, tokens.get_token_async, sleep=clock.sleep, clock=clock.monotonic,
        retry_policy=RetryPolicy(max_retries=3, max_retry_after=30.0),
    )
    try:
        yield dv
    finally:
        await dv.close()


@pytest.fixture
async def emulator(stack: tuple[Any, Any], tls: TlsMaterial) -> AsyncIterator[httpx.AsyncClient]:
    """Plain HTTP client for the emulator's own test endpoints (faults, request log)."""
    _, dataverse = stack
    context = ssl.create_default_context(cafile=tls.bundle)
    async with httpx.AsyncClient(base_url=dataverse.url, verify=context) as http:
        yield http


def unique_address(tag: str) -> str:
    return f"{tag}.{uuid.uuid4().hex[:10]}@fabrikam.example"


async def make_contact(client: DataverseClient, address: str, **extra: Any) -> str:
    result = await client.create("contacts", {"lastname": "Test", "emailaddress1": address, **extra})
    assert isinstance(result, str)
    return result


# ------------------------------------------------------------------------------------------------ basics


async def test_whoami_over_tls_with_msal_tokens(client: DataverseClient) -> None:
    me = await client.whoami()
    assert uuid.UUID(me["UserId"]) and uuid.UUID(me["OrganizationId"])


async def test_create_email_with_deep_insert_and_client_id(client: DataverseClient) -> None:
    me = (await client.whoami())["UserId"]
    contact_id = await make_contact(client, unique_address("sender"))
    activity_id = str(uuid.uuid4())
    body = {
        "activityid": activity_id,
        "subject": "Re: Order 1234",
        "description": "<p>Hello</p>",
        "directioncode": False,
        "messageid": f"<{uuid.uuid4().hex}@fabrikam.example>",
        "regardingobjectid_contact_email@odata.bind": f"/contacts({contact_id})",
        "email_activity_parties": [
            {"participationtypemask": 1, "partyid_contact@odata.bind": f"/contacts({contact_id})"},
            {"participationtypemask": 2, "partyid_systemuser@odata.bind": f"/systemusers({me})"},
            {"participationtypemask": 3, "addressused": "someone@external.example"},
        ],
    }
    created = await client.create("emails", body, return_representation=True, select=["activityid"])
    assert isinstance(created, dict) and created["activityid"] == activity_id
    assert created["@odata.etag"].startswith('W/"')

    row = await client.get(
        "emails", activity_id, select=["subject", "directioncode", "_regardingobjectid_value"],
        expand="email_activity_parties($select=participationtypemask,addressused,_partyid_value)",
    )
    assert row["_regardingobjectid_value"] == contact_id
    parties = sorted((p["participationtypemask"], p.get("_partyid_value"), p.get("addressused"))
                     for p in row["email_activity_parties"])
    assert [(m, pid) for m, pid, _ in parties] == [(1, contact_id), (2, me), (3, None)]
    assert parties[2][2] == "someone@external.example"

    # The same create again (a redelivered work item, or a repeated request): "already done".
    with pytest.raises(DuplicateRecordError):
        await client.create("emails", body)


async def test_bind_to_a_missing_record_is_refused_with_the_real_text(client: DataverseClient) -> None:
    # Status NOT VERIFIED: the emulator defaults to the stricter 400 (the gateway treats 400 and 404 with this
    # text as a stale reference).
    with pytest.raises(BadRequestError, match="A record with the specified key values does not exist in contact"):
        await client.create("emails", {
            "subject": "x",
            "regardingobjectid_contact_email@odata.bind": f"/contacts({uuid.uuid4()})",
        })


async def test_list_pages_through_next_links(client: DataverseClient) -> None:
    tag = uuid.uuid4().hex[:8]
    for n in range(5):
        await make_contact(client, unique_address(f"page{n}"), firstname=tag)
    rows = [r async for r in client.list("contacts", select=["firstname"], filter=f"firstname eq '{tag}'",
                                         page_size=2)]
    assert len(rows) == 5
    assert len([r async for r in client.list("contacts", filter=f"firstname eq '{tag}'", top=3)]) == 3


# ------------------------------------------------------------------------------------------------ lookups


async def test_find_records_by_email_across_tables_in_one_request(
    client: DataverseClient, emulator: httpx.AsyncClient
) -> None:
    first, second, nobody = unique_address("first"), unique_address("second"), unique_address("nobody")
    c1 = await make_contact(client, first)
    c2 = await client.create("contacts", {"lastname": "Two", "emailaddress2": second})
    account = await client.create("accounts", {"name": "Fabrikam", "emailaddress1": first})
    await emulator.delete("/_emulator/requests")
    found = await client.find_records_by_email([first.upper(), second, nobody])
    log = (await emulator.get("/_emulator/requests")).json()["value"]
    assert [(e["method"], e["path"].rsplit("/", 1)[-1]) for e in log] == [("POST", "$batch")]  # one round trip
    assert {r["contactid"] for r in found["contacts"]} == {c1, c2}
    assert [r["accountid"] for r in found["accounts"]] == [account]
    assert found["leads"] == [] and found["queues"] == []


# ------------------------------------------------------------------------------------------------ $batch


async def test_change_set_is_atomic(client: DataverseClient) -> None:
    tag = uuid.uuid4().hex[:8]
    with pytest.raises(BadRequestError) as caught:
        await client.execute_batch([ChangeSet([
            BatchRequest("POST", "contacts", {"lastname": tag, "emailaddress1": unique_address("atomic")}),
            BatchRequest("POST", "contacts", {"lastname": tag, "nosuchcolumn": 1}),
        ])])
    assert caught.value.batch_responses is not None
    assert [r async for r in client.list("contacts", select=["lastname"], filter=f"lastname eq '{tag}'")] == []


async def test_change_set_with_content_id_reference(client: DataverseClient) -> None:
    contact_id = str(uuid.uuid4())
    responses = await client.execute_batch([
        ChangeSet([
            BatchRequest("POST", "contacts", {"contactid": contact_id, "lastname": "Ref"}, content_id="1",
                         idempotent=True),
            BatchRequest("PATCH", "$1", {"firstname": "Patched"}, content_id="2"),
        ]),
        BatchRequest("GET", f"contacts({contact_id})?$select=firstname"),
    ])
    assert [r.status for r in responses][:2] == [204, 204]
    assert responses[0].entity_id == contact_id
    assert responses[2].json()["firstname"] == "Patched"


async def test_continue_on_error_returns_every_response(client: DataverseClient) -> None:
    responses = await client.execute_batch(
        [BatchRequest("GET", f"contacts({uuid.uuid4()})"), BatchRequest("GET", "WhoAmI")],
        continue_on_error=True,
    )
    assert [r.status for r in responses] == [404, 200]


# ------------------------------------------------------------------------------------------------ updates


async def test_patch_with_etag_and_412(client: DataverseClient) -> None:
    contact_id = await make_contact(client, unique_address("etag"))
    etag = (await client.get("contacts", contact_id, select=["lastname"]))["@odata.etag"]
    new_etag = await client.update("contacts", contact_id, {"firstname": "Claimed"}, if_match=etag,
                                   return_etag=True)
    assert new_etag and new_etag != etag
    with pytest.raises(PreconditionFailedError):
        await client.update("contacts", contact_id, {"firstname": "Late"}, if_match=etag)
    assert (await client.get("contacts", contact_id, select=["firstname"]))["firstname"] == "Claimed"


async def test_update_never_creates_unless_upsert(client: DataverseClient) -> None:
    missing = str(uuid.uuid4())
    with pytest.raises(NotFoundError):
        await client.update("contacts", missing, {"lastname": "Ghost"})
    await client.update("contacts", missing, {"lastname": "Upserted"}, upsert=True)
    assert (await client.get("contacts", missing, select=["lastname"]))["lastname"] == "Upserted"
    with pytest.raises(DuplicateRecordError):
        await client.update("contacts", missing, {"lastname": "Again"}, if_none_match="*")
    await client.delete("contacts", missing)
    await client.delete("contacts", missing)  # already gone: fine
    with pytest.raises(NotFoundError):
        await client.get("contacts", missing)


# ------------------------------------------------------------------------------------------------ actions


async def test_send_email_issue_send_false_records_it_as_sent(client: DataverseClient) -> None:
    me = (await client.whoami())["UserId"]
    contact_id = await make_contact(client, unique_address("to"))
    email_id = await client.create("emails", {
        "subject": "Quote",
        "directioncode": True,
        "email_activity_parties": [
            {"participationtypemask": 1, "partyid_systemuser@odata.bind": f"/systemusers({me})"},
            {"participationtypemask": 2, "partyid_contact@odata.bind": f"/contacts({contact_id})"},
        ],
    })
    assert isinstance(email_id, str)
    result = await client.send_email(email_id, False)
    assert result["Subject"].startswith("Quote")
    row = await client.get("emails", email_id, select=["statecode", "statuscode"])
    assert (row["statecode"], row["statuscode"]) == (1, 3)


async def test_get_tracking_token(client: DataverseClient) -> None:
    first = await client.get_tracking_token("Hello")
    second = await client.get_tracking_token("Hello")
    assert first and second and first != second


# ------------------------------------------------------------------------------------------------ throttling


async def _fault(emulator: httpx.AsyncClient, **fault: Any) -> None:
    response = await emulator.post("/_emulator/faults", json=fault)
    assert response.status_code < 300, response.text


async def test_429_is_retried_honouring_retry_after(
    client: DataverseClient, emulator: httpx.AsyncClient, clock: Clock
) -> None:
    await _fault(emulator, method="GET", path="WhoAmI", status=429, retry_after=2, count=1, error_code="0x80072322")
    me = await client.whoami()
    assert me["UserId"]
    assert clock.slept == [2.0]


async def test_429_beyond_the_bound_goes_to_the_caller(
    client: DataverseClient, emulator: httpx.AsyncClient, clock: Clock
) -> None:
    await _fault(emulator, method="GET", path="WhoAmI", status=429, retry_after=120, count=1, error_code="0x80072326")
    with pytest.raises(ThrottledError) as caught:
        await client.whoami()
    assert (caught.value.retry_after, caught.value.reason) == (120.0, "concurrency")
    assert clock.slept == []
    with pytest.raises(ThrottledError) as paused:  # the application user is paused until Retry-After: nothing sent
        await client.whoami()
    assert paused.value.code == "client_pacing"
    clock.now += 120
    assert (await client.whoami())["UserId"]  # the fault was used up


async def test_503_is_retried_for_reads_but_not_for_a_create_without_id(
    client: DataverseClient, emulator: httpx.AsyncClient, clock: Clock
) -> None:
    await _fault(emulator, method="GET", path="WhoAmI", status=503, count=1)
    assert (await client.whoami())["UserId"]
    assert len(clock.slept) == 1
    await _fault(emulator, method="POST", path="contacts$", status=503, count=1)
    await emulator.delete("/_emulator/requests")
    with pytest.raises(TransientError):
        await client.create("contacts", {"lastname": "NoId"})
    log = (await emulator.get("/_emulator/requests")).json()["value"]
    assert [e["method"] for e in log] == ["POST"]  # sent once: a repeat could create it twice
    contact_id = str(uuid.uuid4())
    await _fault(emulator, method="POST", path="contacts$", status=503, count=1)
    assert await client.create("contacts", {"contactid": contact_id, "lastname": "WithId"}) == contact_id


# ------------------------------------------------------------------------------------------------ limits, identity


async def test_attachment_over_the_org_limit(client: DataverseClient) -> None:
    [org] = [r async for r in client.list("organizations", select=["maxuploadfilesize"])]
    too_big = "A" * (int(org["maxuploadfilesize"]) + 4)  # base64 text, counted as stored (reference §3)
    with pytest.raises(AttachmentTooLargeError) as caught:
        await client.create("emails", {
            "subject": "big",
            "email_activity_mime_attachment": [
                {"filename": "big.bin", "mimetype": "application/octet-stream", "body": too_big,
                 "objecttypecode": "email"},
            ],
        })
    assert caught.value.code == "0x80044a02"


async def test_impersonation_makes_the_user_the_creator(client: DataverseClient) -> None:
    me = (await client.whoami())["UserId"]
    users = [u async for u in client.list("systemusers", select=["systemuserid", "azureactivedirectoryobjectid"])]
    user = next(u for u in users if u["systemuserid"] != me and u.get("azureactivedirectoryobjectid"))
    by_oid = await client.create("contacts", {"lastname": "AsUser"},
                                 impersonate=Impersonation.by_object_id(user["azureactivedirectoryobjectid"]))
    by_id = await client.create("contacts", {"lastname": "AsUser"},
                                impersonate=Impersonation.by_systemuser_id(user["systemuserid"]))
    for contact_id in (by_oid, by_id):
        assert isinstance(contact_id, str)
        row = await client.get("contacts", contact_id, select=["_createdby_value", "_createdonbehalfby_value"])
        assert (row["_createdby_value"], row["_createdonbehalfby_value"]) == (user["systemuserid"], me)


# ------------------------------------------------------------------------------------------------ application users


async def test_application_user_pool_spreads_requests_within_each_budget(
    stack: tuple[Any, Any], tokens: MsalTokenProvider, emulator: httpx.AsyncClient, tls: TlsMaterial
) -> None:
    """Two application users, each with a budget of 5 requests per minute in the emulator: the pool sends 10 without
    a single 429 (5 through each, WhoAmI says who), and refuses the 11th itself (client-side pacing), sending
    nothing, instead of collecting a 429."""
    from core.adapters.dataverse_pool import ServiceProtectionBudget
    from emulators.dataverse.seed import ROUTER_APP_PRIVILEGES

    identity, dataverse = stack
    second_app, second_user = str(uuid.uuid4()), str(uuid.uuid4())
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=tls.bundle)) as http:
        (await http.post(f"{identity.url}/_emulator/apps", json={"apps": [{
            "client_id": second_app, "tenant_id": demo.TENANT_ID, "display_name": "pool 2",
            "object_id": str(uuid.uuid4()), "secrets": ["pool-2-secret"], "certificates": [], "roles": {}}]})
         ).raise_for_status()
    (await emulator.post("/_emulator/seed", json={"systemusers": [{
        "systemuserid": second_user, "firstname": "# Email Router", "lastname": "2", "applicationid": second_app,
        "accessmode": 4, "privileges": list(ROUTER_APP_PRIVILEGES)}]})).raise_for_status()
    second = MsalTokenProvider(client_id=second_app, authority=f"{identity.url}/{demo.TENANT_ID}",
                               scope=f"{dataverse.url.rstrip('/')}/.default", client_secret="pool-2-secret")
    (await emulator.post("/_emulator/limits", json={"requests": 5, "window_s": 60})).raise_for_status()
    await emulator.delete("/_emulator/requests")
    pool = DataverseClient(dataverse.api_url, [tokens.get_token_async, second.get_token_async],
                           user_names=["first", "second"],
                           budget=ServiceProtectionBudget(requests=5, window_s=60, headroom=1.0),
                           retry_policy=RetryPolicy(max_retries=3, max_retry_after=30.0))
    try:
        callers = [(await pool.whoami())["UserId"] for _ in range(10)]
        with pytest.raises(ThrottledError) as refused:
            await pool.whoami()
        log = (await emulator.get("/_emulator/requests")).json()["value"]
    finally:
        await pool.close()
        await emulator.post("/_emulator/limits", json={"reset": True})
    assert callers.count(second_user) == 5 and len(set(callers)) == 2
    assert refused.value.code == "client_pacing" and refused.value.retry_after > 30
    assert len(log) == 10 and {e["status"] for e in log} == {200}
    assert {k: v["sent"] for k, v in pool.pool.stats().items()} == {"first": 5, "second": 5}
