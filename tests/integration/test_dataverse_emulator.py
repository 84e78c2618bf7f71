"""Dataverse emulator over TLS with msal tokens from the identity emulator (issue 4 "Tests that must exist")."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import re
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msal
import pytest

from emulators.common import demo
from emulators.common.server import RunningServer
from emulators.common.tls import TlsMaterial, client_env, ensure_tls
from emulators.dataverse.schema import ENTITIES
from emulators.dataverse.seed import APP_USER_ID, demo_user_id
from emulators.dataverse.testing import RunningDataverse, start_dataverse
from emulators.identity.testing import start_identity

pytestmark = pytest.mark.integration

ODATA_HEADERS = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0",
                 "If-None-Match": "null"}


def _ssl(tls: TlsMaterial) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls.bundle))


@dataclass
class Stack:
    tls: TlsMaterial
    identity: RunningServer
    dataverse: RunningDataverse

    def token(self) -> str:
        app = msal.ConfidentialClientApplication(
            demo.APP_CLIENT_ID, client_credential=demo.APP_CLIENT_SECRET,
            authority=f"{self.identity.url}/{demo.TENANT_ID}", instance_discovery=False, verify=str(self.tls.bundle))
        result = app.acquire_token_for_client(scopes=[f"{self.dataverse.url}/.default"])
        assert "access_token" in result, result
        return str(result["access_token"])


class Api:
    """A minimal OData client for the tests (the product's own client is tested elsewhere)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.base = stack.dataverse.api_url
        self.http = httpx.Client(verify=_ssl(stack.tls), timeout=30,
                                 headers={**ODATA_HEADERS, "Authorization": f"Bearer {stack.token()}"})

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, *, json_body: Any = None, headers: dict[str, str] | None = None,
                content: bytes | None = None, params: dict[str, str] | None = None) -> httpx.Response:
        url = path if path.startswith("https://") else f"{self.base}/{path.lstrip('/')}"
        return self.http.request(method, url, json=json_body, headers=headers, content=content, params=params)

    def emulator(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return httpx.request(method, f"{self.stack.dataverse.url}/_emulator/{path}", verify=_ssl(self.stack.tls),
                             content=json.dumps(body).encode() if body is not None else None, timeout=30)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tls_dir: Path = tmp_path_factory.mktemp("tls")
    tls = ensure_tls(tls_dir)
    # requests (msal, the Power Platform SDK) lets REQUESTS_CA_BUNDLE override a session's own `verify`, so the
    # local CA must be trusted through the environment, as the stack does for every process it starts.
    saved = {k: os.environ.get(k) for k in client_env(tls)}
    os.environ.update(client_env(tls))
    identity = start_identity(tls_dir)
    dataverse = start_dataverse(tls_dir, identity.url)
    try:
        yield Stack(tls, identity, dataverse)
    finally:
        dataverse.stop()
        identity.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def api(stack: Stack) -> Iterator[Api]:
    client = Api(stack)
    assert client.emulator("POST", "reset").status_code == 200
    try:
        yield client
    finally:
        client.close()


# =====================================================================================================================
# helpers
# =====================================================================================================================
ALICE = demo_user_id("alice")
CAROL = demo_user_id("carol")
DAVE = demo_user_id("dave")
FIONA = "c0ffee00-0000-4000-8000-00000000c001"
GUS = "c0ffee00-0000-4000-8000-00000000c002"
FABRIKAM = "c0ffee00-0000-4000-8000-00000000ac01"
LENA = "c0ffee00-0000-4000-8000-000000001e01"
SUPPORT_QUEUE = "c0ffee00-0000-4000-8000-0000000000e1"


def _email_body(sender_bind: str, to_bind: str, **extra: Any) -> dict[str, Any]:
    return {"subject": "Quarterly numbers", "description": "<p>hi</p>", **extra,
            "email_activity_parties": [
                {"participationtypemask": 1, "partyid_systemuser@odata.bind": sender_bind},
                {"participationtypemask": 2, "partyid_contact@odata.bind": to_bind}]}


def _error(resp: httpx.Response) -> tuple[int, str, str]:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) >= {"code", "message"}
    return resp.status_code, body["error"]["code"], body["error"]["message"]


def _created_id(resp: httpx.Response) -> str:
    assert resp.status_code == 204, resp.text
    return resp.headers["OData-EntityId"].rsplit("(", 1)[1].rstrip(")")


# =====================================================================================================================
# create / deep insert / retrieve
# =====================================================================================================================
def test_create_email_with_deep_insert_regarding_owner_and_unresolved_party(api: Api) -> None:
    activity_id = str(uuid.uuid4())
    body = {
        "activityid": activity_id, "subject": "Re: Order 1234", "description": "<html><body>Hello</body></html>",
        "directioncode": False, "messageid": "<CH2PR21MB1463D383@example.outlook.com>",
        "actualend": "2026-11-20T09:15:00Z",
        "regardingobjectid_contact_email@odata.bind": f"/contacts({FIONA})",
        "ownerid_email@odata.bind": f"/systemusers({ALICE})",
        "email_activity_parties": [
            {"participationtypemask": 1, "partyid_contact@odata.bind": f"/contacts({FIONA})"},
            {"participationtypemask": 2, "partyid_systemuser@odata.bind": f"/systemusers({ALICE})"},
            {"participationtypemask": 3, "addressused": "someone@external.example"}],
        "email_activity_mime_attachment": [
            {"filename": "a.pdf", "mimetype": "application/pdf", "body": base64.b64encode(b"%PDF-1").decode(),
             "objecttypecode": "email"}],
    }
    resp = api.request("POST", "emails", json_body=body)
    assert resp.status_code == 204
    assert resp.headers["OData-EntityId"] == f"{api.base}/emails({activity_id})"
    got = api.request("GET", f"emails({activity_id})", params={
        "$select": "subject,directioncode,_regardingobjectid_value,_ownerid_value,statecode,statuscode,"
                   "attachmentcount,_emailsender_value",
        "$expand": "email_activity_parties($select=participationtypemask,addressused,_partyid_value),"
                   "email_activity_mime_attachment($select=filename,filesize)"},
        headers={"Prefer": 'odata.include-annotations="Microsoft.Dynamics.CRM.lookuplogicalname"'})
    assert got.status_code == 200, got.text
    email = got.json()
    assert email["@odata.etag"].startswith('W/"')
    assert email["_regardingobjectid_value"] == FIONA
    assert email["_regardingobjectid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] == "contact"
    assert email["_ownerid_value"] == ALICE
    assert (email["statecode"], email["statuscode"], email["attachmentcount"]) == (0, 1, 1)
    assert email["_emailsender_value"] == FIONA
    parties = {p["participationtypemask"]: p for p in email["email_activity_parties"]}
    assert parties[1]["_partyid_value"] == FIONA and parties[1]["addressused"] == "fiona@fabrikam.example"
    assert parties[2]["_partyid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] == "systemuser"
    assert parties[3]["_partyid_value"] is None and parties[3]["addressused"] == "someone@external.example"
    assert email["email_activity_mime_attachment"][0]["filesize"] == 6
    # activityparties is a read-only set queryable on its own
    ap = api.request("GET", "activityparties", params={"$filter": f"_activityid_value eq {activity_id}"})
    assert len(ap.json()["value"]) == 3
    assert api.request("POST", "activityparties", json_body={"addressused": "x@y"}).status_code == 405


def test_create_with_return_representation_and_select(api: Api) -> None:
    resp = api.request("POST", "contacts", params={"$select": "fullname,emailaddress1"},
                       json_body={"firstname": "Nina", "lastname": "New", "emailaddress1": "nina@new.example"},
                       headers={"Prefer": "return=representation"})
    assert resp.status_code == 201
    assert resp.headers["Preference-Applied"] == "return=representation"
    assert "OData-EntityId" not in resp.headers
    body = resp.json()
    assert body["@odata.context"].endswith("$metadata#contacts(fullname,emailaddress1)/$entity")
    assert body["fullname"] == "Nina New" and set(body) == {"@odata.context", "@odata.etag", "fullname",
                                                           "emailaddress1", "contactid"}


def test_bind_errors(api: Api) -> None:
    missing = str(uuid.uuid4())
    status, code, message = _error(api.request("POST", "emails", json_body=_email_body(
        f"/systemusers({ALICE})", f"/contacts({missing})")))
    # the real text; the status is NOT VERIFIED and defaults to the stricter 400 (Options.missing_bind_status)
    assert (status, code) == (400, "0x80040217")
    assert message == "A record with the specified key values does not exist in contact entity"
    status, code, message = _error(api.request("POST", "emails", json_body={
        "subject": "x", "regardingobjectid_nonsense@odata.bind": f"/contacts({FIONA})"}))
    assert (status, code) == (400, "0x80048d19") and "undeclared property 'regardingobjectid_nonsense'" in message
    status, code, message = _error(api.request("POST", "emails", json_body={"subject": "x", "Subject": "y"}))
    assert (status, code, message) == (400, "0x0", "Could not find a property named 'Subject' on type "
                                                    "'Microsoft.Dynamics.CRM.email'.")
    # party masks: 8/9 are platform-maintained, and nothing at all is not a party
    for bad in ({"participationtypemask": 9, "addressused": "x@y"}, {"participationtypemask": 2}):
        resp = api.request("POST", "emails", json_body={"subject": "x", "email_activity_parties": [bad]})
        assert resp.status_code == 400
    # nothing of a failed deep insert is left behind
    assert api.stack.dataverse.store.count(ENTITIES["email"]) == 0


def test_duplicate_key(api: Api) -> None:
    rid = str(uuid.uuid4())
    assert api.request("POST", "emails", json_body={"activityid": rid, "subject": "a"}).status_code == 204
    status, code, message = _error(api.request("POST", "emails", json_body={"activityid": rid, "subject": "a"}))
    assert (status, code, message) == (412, "0x80040237", "A record with matching key values already exists.")
    inner = api.request("POST", "emails", json_body={"activityid": rid, "subject": "a"}).json()["error"]["innererror"]
    assert inner["message"] == "Cannot insert duplicate key."


def test_unknown_set_and_wrong_method(api: Api) -> None:
    assert _error(api.request("GET", "Contacts")) == (404, "0x8006088a",
                                                      "Resource not found for the segment 'Contacts'.")
    status, code, message = _error(api.request("POST", "WhoAmI"))
    assert (status, code) == (404, "") and message.startswith("No HTTP resource was found")
    who = api.request("GET", "WhoAmI").json()
    assert who["UserId"] == APP_USER_ID
    status, _code, message = _error(api.request("GET", "contacts", params={"$filter": "lastname eq 'O'Bryan'"}))
    assert status == 400 and message == "There is an unterminated literal at position 21 in 'lastname eq 'O'Bryan''."


# =====================================================================================================================
# queries
# =====================================================================================================================
def test_query_by_email_address_across_tables(api: Api) -> None:
    def lookup(set_name: str, columns: list[str], address: str) -> list[dict[str, Any]]:
        flt = " or ".join(f"{c} eq '{address}'" for c in columns)
        resp = api.request("GET", set_name, params={"$filter": flt})
        assert resp.status_code == 200, resp.text
        return list(resp.json()["value"])

    assert [c["contactid"] for c in lookup("contacts", ["emailaddress1", "emailaddress2", "emailaddress3"],
                                           "GUS.GRAY@fabrikam.example")] == [GUS]
    assert [a["accountid"] for a in lookup("accounts", ["emailaddress1"], "Info@Fabrikam.example")] == [FABRIKAM]
    assert [x["leadid"] for x in lookup("leads", ["emailaddress1"], "lena@prospect.example")] == [LENA]
    assert [u["systemuserid"] for u in lookup("systemusers", ["internalemailaddress"],
                                              "alice@contoso.example")] == [ALICE]
    assert [q["queueid"] for q in lookup("queues", ["emailaddress"], "SUPPORT@contoso.example")] == [SUPPORT_QUEUE]
    assert lookup("contacts", ["emailaddress1"], "nobody@nowhere.example") == []
    # '+' must be percent-encoded (%2B) to survive the query string, as on the real service
    api.request("POST", "contacts", json_body={"lastname": "Plus", "emailaddress1": "a+b@x.com"})
    resp = api.request("GET", "contacts?$filter=emailaddress1%20eq%20'a%2Bb@x.com'")
    assert len(resp.json()["value"]) == 1


def test_paging_with_maxpagesize_and_count(api: Api) -> None:
    for i in range(7):
        api.request("POST", "contacts", json_body={"lastname": f"Page{i}", "emailaddress1": f"p{i}@page.example"})
    seen: list[str] = []
    url: str | None = f"{api.base}/contacts?$select=lastname&$filter=endswith(emailaddress1,'@page.example')" \
                      "&$orderby=lastname desc&$count=true"
    pages = 0
    while url and pages < 10:
        resp = api.request("GET", url, headers={"Prefer": "odata.maxpagesize=3"})
        assert resp.status_code == 200
        body = resp.json()
        assert body["@odata.count"] == 7
        assert len(body["value"]) <= 3
        seen += [r["lastname"] for r in body["value"]]
        url = body.get("@odata.nextLink")
        pages += 1
    assert pages == 3
    assert seen == [f"Page{i}" for i in range(6, -1, -1)]
    top = api.request("GET", "contacts", params={"$top": "2", "$filter": "endswith(emailaddress1,'@page.example')"})
    assert len(top.json()["value"]) == 2 and "@odata.nextLink" not in top.json()
    assert api.request("GET", "contacts", params={"$skip": "2"}).status_code == 400


def test_pending_send_query_with_lambda_and_expand(api: Api) -> None:
    ids = []
    for sender in (ALICE, CAROL):
        resp = api.request("POST", "emails", json_body=_email_body(f"/systemusers({sender})", f"/contacts({FIONA})"))
        ids.append(_created_id(resp))
        assert api.request("POST", f"emails({ids[-1]})/Microsoft.Dynamics.CRM.SendEmail",
                           json_body={"IssueSend": True}).status_code == 200
    resp = api.request("GET", "emails", params={
        "$select": "activityid,subject,statuscode,_ownerid_value",
        "$filter": f"statuscode eq 6 and email_activity_parties/any(p:p/participationtypemask eq 1 and "
                   f"p/_partyid_value eq {ALICE})",
        "$expand": "email_activity_parties($select=participationtypemask,addressused,_partyid_value)",
        "$orderby": "modifiedon asc"}, headers={"Prefer": "odata.maxpagesize=50"})
    assert resp.status_code == 200, resp.text
    rows = resp.json()["value"]
    assert [r["activityid"] for r in rows] == [ids[0]]
    assert {p["participationtypemask"] for p in rows[0]["email_activity_parties"]} == {1, 2}


# =====================================================================================================================
# update / etags / state
# =====================================================================================================================
def test_patch_etags_upsert_and_conditional_errors(api: Api) -> None:
    rid = _created_id(api.request("POST", "contacts", json_body={"lastname": "Etag"}))
    first = api.request("GET", f"contacts({rid})", params={"$select": "lastname"}).json()["@odata.etag"]
    assert api.request("PATCH", f"contacts({rid})", json_body={"firstname": "Eve"},
                       headers={"If-Match": first}).status_code == 204
    status, code, message = _error(api.request("PATCH", f"contacts({rid})", json_body={"firstname": "Old"},
                                               headers={"If-Match": first}))
    assert (status, code) == (412, "") and message == ("The version of the existing record doesn't match the "
                                                       "RowVersion property provided.")
    second = api.request("GET", f"contacts({rid})").json()
    assert second["fullname"] == "Eve Etag" and second["@odata.etag"] != first
    assert api.request("GET", f"contacts({rid})", headers={"If-None-Match": second["@odata.etag"]}).status_code == 304
    missing = str(uuid.uuid4())
    assert _error(api.request("PATCH", f"contacts({missing})", json_body={"lastname": "x"},
                              headers={"If-Match": "*"})) == (404, "", f"contact With Id = {missing} Does Not Exist")
    assert _error(api.request("PATCH", f"contacts({rid})", json_body={"lastname": "x"},
                              headers={"If-None-Match": "*"})) == (
        412, "", "A record with matching key values already exists.")
    # upsert: PATCH on a missing id creates it (204), and with representation 201
    up = api.request("PATCH", f"contacts({missing})", json_body={"lastname": "Upserted"},
                     headers={"Prefer": "return=representation"})
    assert up.status_code == 201 and up.json()["contactid"] == missing
    assert api.request("DELETE", f"contacts({missing})").status_code == 204
    assert api.request("DELETE", f"contacts({missing})").status_code == 404


def test_state_rules_and_read_only_columns(api: Api) -> None:
    rid = _created_id(api.request("POST", "emails", json_body={"subject": "tracked", "directioncode": False}))
    status, code, _ = _error(api.request("PATCH", f"emails({rid})", json_body={"statecode": 0, "statuscode": 4}))
    assert (status, code) == (400, "0x80040203")
    assert api.request("PATCH", f"emails({rid})", json_body={"statecode": 1, "statuscode": 4}).status_code == 204
    # Completed email is read-only except for state changes
    assert api.request("PATCH", f"emails({rid})", json_body={"subject": "changed"}).status_code == 400
    assert api.request("POST", "activitymimeattachments", json_body={
        "objectid_email@odata.bind": f"/emails({rid})", "filename": "late.txt", "body": "eA=="}).status_code == 400
    assert api.request("PATCH", f"emails({rid})", json_body={"statecode": 2, "statuscode": 5}).status_code == 204
    # statuscode alone implies its state
    assert api.request("PATCH", f"emails({rid})", json_body={"statuscode": 8}).status_code == 204
    row = api.request("GET", f"emails({rid})", params={"$select": "statecode,statuscode"}).json()
    assert (row["statecode"], row["statuscode"]) == (0, 8)
    # strict mode rejects read-only columns; lenient ignores them
    assert api.request("POST", "emails", json_body={"subject": "x", "inreplyto": "<a@b>"}).status_code == 400
    assert api.emulator("POST", "options", {"strict": False}).status_code == 200
    try:
        lenient = api.request("POST", "emails", json_body={"subject": "x", "inreplyto": "<a@b>"})
        got = api.request("GET", f"emails({_created_id(lenient)})", params={"$select": "inreplyto"}).json()
        assert got["inreplyto"] is None
    finally:
        api.emulator("POST", "options", {"strict": True})


def test_attachment_size_limit(api: Api) -> None:
    api.emulator("POST", "seed", {"organization": {"settings": {"maxuploadfilesize": 16}}})
    rid = _created_id(api.request("POST", "emails", json_body={"subject": "att"}))
    ok = base64.b64encode(b"x" * 12).decode()  # 16 base64 characters: exactly the limit
    too_big = base64.b64encode(b"x" * 13).decode()  # 20 characters
    assert api.request("POST", "activitymimeattachments", json_body={
        "objectid_email@odata.bind": f"/emails({rid})", "filename": "ok.bin", "body": ok}).status_code == 204
    assert _error(api.request("POST", "activitymimeattachments", json_body={
        "objectid_email@odata.bind": f"/emails({rid})", "filename": "big.bin", "body": too_big})) == (
        400, "0x80044a02", "Attachment file size is too big.")
    body = api.request("GET", f"emails({rid})", params={"$select": "attachmentcount"}).json()
    assert body["attachmentcount"] == 1


# =====================================================================================================================
# $batch
# =====================================================================================================================
def _batch(parts: list[str], boundary: str = "batch_AAA") -> bytes:
    return ("".join(f"--{boundary}\r\n{p}\r\n" for p in parts) + f"--{boundary}--\r\n").encode()


def _http_part(method: str, url: str, body: Any = None, content_id: str | None = None) -> str:
    head = "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
    if content_id:
        head += f"Content-ID: {content_id}\r\n"
    req = f"{method} {url} HTTP/1.1\r\n"
    if body is not None:
        req += "Content-Type: application/json; type=entry\r\n\r\n" + json.dumps(body)
    else:
        req += "\r\n"
    return head + "\r\n" + req


def _changeset(parts: list[str], boundary: str = "changeset_BBB") -> str:
    inner = "".join(f"--{boundary}\r\n{p}\r\n" for p in parts) + f"--{boundary}--"
    return f"Content-Type: multipart/mixed; boundary={boundary}\r\n\r\n{inner}"


def test_batch_changeset_commits_with_content_id_references(api: Api) -> None:
    body = _batch([_changeset([
        _http_part("POST", "/api/data/v9.2/accounts", {"name": "Batch Co"}, "1"),
        _http_part("POST", f"{api.base}/contacts", {"lastname": "Batch", "parentcustomerid_account@odata.bind": "$1"},
                   "2"),
        _http_part("PATCH", "$1", {"primarycontactid@odata.bind": "$2"}, "3"),
    ]), _http_part("GET", "accounts?$select=name&$filter=name eq 'Batch Co'")])
    resp = api.request("POST", "$batch", content=body,
                       headers={"Content-Type": "multipart/mixed; boundary=batch_AAA"})
    assert resp.status_code == 200, resp.text
    text = resp.text
    assert resp.headers["Content-Type"].startswith("multipart/mixed; boundary=batchresponse_")
    assert text.count("HTTP/1.1 204 No Content") == 3 and "HTTP/1.1 200 OK" in text
    assert "changesetresponse_" in text and "Content-ID: 1" in text and "Location: " in text
    accounts = api.request("GET", "accounts", params={"$filter": "name eq 'Batch Co'",
                                                      "$select": "_primarycontactid_value"}).json()["value"]
    assert len(accounts) == 1 and accounts[0]["_primarycontactid_value"] is not None


def test_batch_changeset_rolls_back_when_second_operation_fails(api: Api) -> None:
    body = _batch([_changeset([
        _http_part("POST", "contacts", {"lastname": "Rollback", "emailaddress1": "rb@x.example"}, "1"),
        _http_part("POST", "emails", _email_body(f"/systemusers({ALICE})", f"/contacts({uuid.uuid4()})"), "2"),
    ])])
    resp = api.request("POST", "$batch", content=body,
                       headers={"Content-Type": 'multipart/mixed; boundary="batch_AAA"'})
    assert resp.status_code == 400
    assert "HTTP/1.1 400 Bad Request" in resp.text and '"code":"0x80040217"' in resp.text
    # one plain application/http part, no changesetresponse wrapper and no Content-ID (real captured shape)
    assert "changesetresponse" not in resp.text and "Content-ID" not in resp.text
    found = api.request("GET", "contacts", params={"$filter": "emailaddress1 eq 'rb@x.example'"}).json()["value"]
    assert found == []


def test_batch_continue_on_error_and_forward_reference(api: Api) -> None:
    body = _batch([
        _http_part("POST", "contacts", {"lastname": "First"}),
        _http_part("POST", "contacts", {"lastname": "Bad", "nosuchcolumn": 1}),
        _changeset([_http_part("PATCH", "$1", {"lastname": "x"}, "2")]),
        _http_part("POST", "contacts", {"lastname": "Third"}),
    ])
    headers = {"Content-Type": "multipart/mixed; boundary=batch_AAA"}
    resp = api.request("POST", "$batch", content=body, headers={**headers, "Prefer": "odata.continue-on-error"})
    assert resp.status_code == 200
    assert resp.text.count("HTTP/1.1 204 No Content") == 2 and resp.text.count("HTTP/1.1 400 Bad Request") == 2
    assert "Content-ID Reference: '$1' does not exist in the batch context." in resp.text
    names = {c["lastname"] for c in api.request("GET", "contacts", params={"$select": "lastname"}).json()["value"]}
    assert {"First", "Third"} <= names and "Bad" not in names
    # without continue-on-error processing stops at the failure
    stop = api.request("POST", "$batch", content=body.replace(b"First", b"Again").replace(b"Third", b"Never"),
                       headers=headers)
    assert stop.status_code == 400 and stop.text.count("HTTP/1.1") == 1
    names = {c["lastname"] for c in api.request("GET", "contacts", params={"$select": "lastname"}).json()["value"]}
    assert "Again" in names and "Never" not in names


def test_batch_limit(api: Api) -> None:
    body = _batch([_http_part("GET", "WhoAmI") for _ in range(1001)])
    resp = api.request("POST", "$batch", content=body, headers={"Content-Type": "multipart/mixed; boundary=batch_AAA"})
    assert resp.status_code == 400 and "1000" in resp.json()["error"]["message"]


# =====================================================================================================================
# SendEmail / tracking tokens
# =====================================================================================================================
def test_send_email_router_user_goes_pending_send_with_tracking_token(api: Api) -> None:
    rid = _created_id(api.request("POST", "emails", json_body=_email_body(f"/systemusers({ALICE})",
                                                                          f"/contacts({FIONA})")))
    resp = api.request("POST", f"emails({rid})/Microsoft.Dynamics.CRM.SendEmail",
                       json_body={"IssueSend": True, "TrackingToken": None})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["@odata.context"].endswith("$metadata#Microsoft.Dynamics.CRM.SendEmailResponse")
    token = body["Subject"].rsplit(" ", 1)[1]
    assert re.fullmatch(r"CRM:0\d{3}\d{3}", token), token
    row = api.request("GET", f"emails({rid})", params={"$select": "subject,statecode,statuscode,trackingtoken"}).json()
    assert (row["statecode"], row["statuscode"], row["trackingtoken"]) == (1, 6, token)
    assert row["subject"] == f"Quarterly numbers {token}"
    # the per-user counter advances; the org prefix and digits drive the format
    api.emulator("POST", "seed", {"organization": {"settings": {"trackingprefix": "TKN#", "trackingtokeniddigits": 5}}})
    nxt = api.request("POST", "GetTrackingTokenEmail", json_body={"Subject": "x"}).json()["TrackingToken"]
    assert re.fullmatch(r"TKN#0\d{5}\d{3}", nxt)
    # a sent email cannot be sent again
    assert api.request("POST", f"emails({rid})/Microsoft.Dynamics.CRM.SendEmail",
                       json_body={"IssueSend": True}).status_code == 400


def test_send_email_non_router_users(api: Api) -> None:
    dave_mail = _created_id(api.request("POST", "emails", json_body=_email_body(f"/systemusers({DAVE})",
                                                                                f"/contacts({FIONA})")))
    # outgoing method None: stays Pending Send by default (the documented reading, NOT VERIFIED); "error" is an option
    api.emulator("POST", "options", {"sendemail_outcome": {"0": "error", "1": "pending", "2": "pending"}})
    try:
        status, _code, message = _error(api.request(
            "POST", f"emails({dave_mail})/Microsoft.Dynamics.CRM.SendEmail", json_body={"IssueSend": True}))
        assert status == 400 and "outgoing email delivery method" in message
    finally:
        api.emulator("POST", "options", {"sendemail_outcome": {"0": "pending", "1": "pending", "2": "pending"}})
    none_mail = _created_id(api.request("POST", "emails", json_body=_email_body(f"/systemusers({DAVE})",
                                                                               f"/contacts({FIONA})")))
    assert api.request("POST", f"emails({none_mail})/Microsoft.Dynamics.CRM.SendEmail",
                       json_body={"IssueSend": True}).status_code == 200
    row = api.request("GET", f"emails({none_mail})", params={"$select": "statecode,statuscode"}).json()
    assert (row["statecode"], row["statuscode"]) == (1, 6)
    # IssueSend false records it as sent, whatever the method
    resp = api.request("POST", f"emails({dave_mail})/Microsoft.Dynamics.CRM.SendEmail",
                       json_body={"IssueSend": False, "TrackingToken": "CRM:0001999"})
    assert resp.status_code == 200 and resp.json()["Subject"] == "Quarterly numbers CRM:0001999"
    row = api.request("GET", f"emails({dave_mail})", params={"$select": "statecode,statuscode,senton"}).json()
    assert (row["statecode"], row["statuscode"]) == (1, 3) and row["senton"]
    # unresolved recipients need allowunresolvedpartiesonemailsend
    body = _email_body(f"/systemusers({ALICE})", f"/contacts({FIONA})")
    body["email_activity_parties"][1] = {"participationtypemask": 2, "addressused": "stranger@else.example"}
    rid = _created_id(api.request("POST", "emails", json_body=body))
    assert api.request("POST", f"emails({rid})/Microsoft.Dynamics.CRM.SendEmail",
                       json_body={"IssueSend": True}).status_code == 400
    api.emulator("POST", "seed", {"organization": {"settings": {"allowunresolvedpartiesonemailsend": True}}})
    assert api.request("POST", f"emails({rid})/Microsoft.Dynamics.CRM.SendEmail",
                       json_body={"IssueSend": True}).status_code == 200


# =====================================================================================================================
# auth, impersonation, service protection, faults
# =====================================================================================================================
def test_auth_required_and_app_user_required(api: Api) -> None:
    anon = httpx.get(f"{api.base}/contacts", verify=_ssl(api.stack.tls))
    assert anon.status_code == 401 and "error" in anon.json()
    forged = httpx.get(f"{api.base}/contacts", verify=_ssl(api.stack.tls),
                       headers={"Authorization": "Bearer not.a.jwt"})
    assert forged.status_code == 401
    api.emulator("POST", "seed", {"systemusers": [{"systemuserid": APP_USER_ID, "applicationid": str(uuid.uuid4())}]})
    assert _error(api.request("GET", "contacts")) == (403, "0x80072560",
                                                      "The user is not a member of the organization.")


def test_impersonation(api: Api) -> None:
    alice_oid = api.request("GET", f"systemusers({ALICE})", params={"$select": "azureactivedirectoryobjectid"}).json()[
        "azureactivedirectoryobjectid"]
    resp = api.request("POST", "contacts", json_body={"lastname": "Impersonated"},
                       headers={"CallerObjectId": alice_oid, "Prefer": "return=representation"})
    assert resp.status_code == 201
    row = resp.json()
    assert row["_ownerid_value"] == ALICE and row["_createdby_value"] == ALICE
    assert row["_createdonbehalfby_value"] == APP_USER_ID
    legacy = api.request("POST", "contacts", json_body={"lastname": "Legacy"},
                         headers={"MSCRMCallerID": CAROL, "Prefer": "return=representation"}).json()
    assert legacy["_ownerid_value"] == CAROL
    assert api.request("GET", "WhoAmI", headers={"MSCRMCallerID": CAROL}).json()["UserId"] == CAROL
    api.emulator("POST", "seed", {"systemusers": [{"systemuserid": APP_USER_ID, "privileges": []}]})
    assert _error(api.request("POST", "contacts", json_body={"lastname": "x"}, headers={"CallerObjectId": alice_oid})
                  ) == (403, "0x8004a110", "User does not have the privilege to act on behalf another user.")


def test_service_protection_request_count(api: Api) -> None:
    api.emulator("POST", "limits", {"requests": 3})
    try:
        statuses = [api.request("GET", "WhoAmI").status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        resp = api.request("GET", "WhoAmI")
        status, code, message = _error(resp)
        assert (status, code) == (429, "0x80072322")
        assert message == "Number of requests exceeded the limit of 3 over time window of 300 seconds."
        assert int(resp.headers["Retry-After"]) >= 1
    finally:
        api.emulator("POST", "limits", {"reset": True})


def test_service_protection_counts_the_authenticated_user(api: Api) -> None:
    """The stricter reading (NOT VERIFIED): impersonating other users does not give the application user their
    budgets; ``per: effective`` switches to counting the impersonated user. Debug headers show what is left."""
    alice_oid = api.request("GET", f"systemusers({ALICE})", params={"$select": "azureactivedirectoryobjectid"}).json()[
        "azureactivedirectoryobjectid"]
    api.emulator("POST", "limits", {"requests": 3})
    try:
        first = api.request("GET", "WhoAmI")
        assert first.headers["x-ms-ratelimit-burst-remaining-xrm-requests"] == "2"
        assert int(first.headers["x-ms-ratelimit-time-remaining-xrm-requests"]) > 0
        statuses = [api.request("GET", "WhoAmI", headers={"CallerObjectId": alice_oid}).status_code,
                    api.request("GET", "WhoAmI", headers={"MSCRMCallerID": CAROL}).status_code,
                    api.request("GET", "WhoAmI", headers={"MSCRMCallerID": CAROL}).status_code]
        assert statuses == [200, 200, 429]
        assert api.emulator("POST", "limits", {"per": "effective"}).json()["per"] == "effective"
        statuses = [api.request("GET", "WhoAmI", headers={"MSCRMCallerID": CAROL}).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        assert api.request("GET", "WhoAmI").status_code == 200  # the application user's own budget is untouched
    finally:
        api.emulator("POST", "limits", {"reset": True})
    assert api.emulator("GET", "limits").json()["per"] == "caller"


def test_service_protection_execution_time(api: Api) -> None:
    api.emulator("POST", "limits", {"execution_ms": 50})
    api.emulator("POST", "faults", {"method": "GET", "path": "WhoAmI", "latency_ms": 60, "count": 1})
    try:
        assert api.request("GET", "WhoAmI").status_code == 200  # took >= 60 ms of the 50 ms budget
        resp = api.request("GET", "WhoAmI")
        assert _error(resp)[:2] == (429, "0x80072321") and "Retry-After" in resp.headers
    finally:
        api.emulator("POST", "limits", {"reset": True})


def test_service_protection_concurrency(api: Api) -> None:
    api.emulator("POST", "limits", {"concurrent": 1})
    api.emulator("POST", "faults", {"method": "GET", "path": "contacts", "latency_ms": 1500, "count": 1})
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(api.request, "GET", "contacts")
            for _ in range(200):  # wait (bounded) until the slow request is inside the emulator
                if api.emulator("GET", "health").json()["in_flight"] == 1:
                    break
                time.sleep(0.01)
            resp = api.request("GET", "WhoAmI")
            assert _error(resp) == (429, "0x80072326", "Number of concurrent requests exceeded the limit of 1.")
            assert slow.result(timeout=30).status_code == 200
    finally:
        api.emulator("POST", "limits", {"reset": True})


def test_fault_injection_and_request_log(api: Api) -> None:
    api.emulator("DELETE", "requests")
    created = api.emulator("POST", "faults", {"method": "POST", "path": "/emails$", "status": 429, "retry_after": 7,
                                              "count": 2})
    assert created.status_code == 201
    first = api.request("POST", "emails", json_body={"subject": "x"})
    assert first.status_code == 429 and first.headers["Retry-After"] == "7"
    assert first.json()["error"]["code"] == "0x80072322"
    assert api.request("POST", "emails", json_body={"subject": "x"}).status_code == 429
    assert api.request("POST", "emails", json_body={"subject": "x"}).status_code == 204
    api.emulator("POST", "faults", {"path": "contacts", "status": 503})
    assert api.request("GET", "contacts").status_code == 503
    assert api.emulator("DELETE", "faults").status_code == 204
    assert api.request("GET", "contacts").status_code == 200
    log = api.emulator("GET", "requests").json()["value"]
    assert [(e["method"], e["status"]) for e in log] == [("POST", 429), ("POST", 429), ("POST", 204), ("GET", 503),
                                                         ("GET", 200)]
    assert all(e["caller"] == demo.APP_CLIENT_ID and e["ms"] >= 0 for e in log)


# =====================================================================================================================
# metadata, settings tables, persistence
# =====================================================================================================================
def test_metadata_and_settings_tables(api: Api) -> None:
    md = api.request("GET", "EntityDefinitions", params={
        "$select": "LogicalName,EntitySetName,PrimaryIdAttribute", "$filter": "LogicalName eq 'usersettings'"}).json()
    assert md["value"] == [{"LogicalName": "usersettings", "EntitySetName": "usersettingscollection",
                            "PrimaryIdAttribute": "systemuserid", "MetadataId": md["value"][0]["MetadataId"]}]
    one = api.request("GET", "EntityDefinitions(LogicalName='email')",
                      params={"$select": "IsOptimisticConcurrencyEnabled"}).json()
    assert one["IsOptimisticConcurrencyEnabled"] is True
    csdl = api.request("GET", "$metadata")
    assert csdl.status_code == 200 and '<EntitySet Name="emails" EntityType="mscrm.email"/>' in csdl.text
    us = api.request("GET", f"usersettingscollection({ALICE})", params={"$select": "incomingemailfilteringmethod"})
    assert us.json()["incomingemailfilteringmethod"] == 2
    org = api.request("GET", "organizations", params={"$select": "maxuploadfilesize,trackingprefix"}).json()["value"]
    assert org[0]["maxuploadfilesize"] == 5242880
    # creating a user provisions its mailbox and usersettings; delivery methods stay in step
    new_user = str(uuid.uuid4())
    api.request("POST", "systemusers", json_body={"systemuserid": new_user, "firstname": "Neo", "lastname": "User",
                                                  "internalemailaddress": "neo@contoso.example",
                                                  "outgoingemaildeliverymethod": 0})
    mbx = api.request("GET", "mailboxes", params={"$filter": f"_regardingobjectid_value eq {new_user}"}).json()["value"]
    assert len(mbx) == 1 and mbx[0]["emailaddress"] == "neo@contoso.example"
    api.request("PATCH", f"systemusers({new_user})", json_body={"outgoingemaildeliverymethod": 2})
    mbx_row = api.request("GET", f"mailboxes({mbx[0]['mailboxid']})").json()
    assert mbx_row["outgoingemaildeliverymethod"] == 2
    assert api.request("GET", f"usersettingscollection({new_user})").status_code == 200


def test_state_persists_in_state_dir(stack: Stack, tmp_path: Path) -> None:
    tls_dir = stack.tls.ca_cert.parent
    first = start_dataverse(tls_dir, stack.identity.url, state_dir=tmp_path / "state")
    try:
        client = httpx.Client(verify=_ssl(stack.tls))
        app = msal.ConfidentialClientApplication(
            demo.APP_CLIENT_ID, client_credential=demo.APP_CLIENT_SECRET,
            authority=f"{stack.identity.url}/{demo.TENANT_ID}", instance_discovery=False,
            verify=str(stack.tls.bundle))
        token = app.acquire_token_for_client(scopes=[f"{first.url}/.default"])["access_token"]
        resp = client.post(f"{first.api_url}/contacts", json={"lastname": "Durable"},
                           headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 204
        client.close()
    finally:
        first.stop()
    second = start_dataverse(tls_dir, stack.identity.url, state_dir=tmp_path / "state")
    try:
        rows = second.store.find(ENTITIES["contact"], "lastname", "durable")
        assert len(rows) == 1
    finally:
        second.stop()


# =====================================================================================================================
# schema from Microsoft's entity reference: declared names only, limits, read-only columns, variant orgs
# =====================================================================================================================
@pytest.mark.parametrize("nav", [
    "receivingmailboxid",  # the router's old constant: email declares ReceivingMailboxId_Email (audit 1a #1)
    "receivingmailboxid_email",  # nav names are case-sensitive
    "receivingmailboxid_mailbox_email",  # the old emulator's derived pattern
    "acceptingentityid_systemuser",  # a third-party generator's hard-coded name, not metadata (audit 1a #2)
    "correlatedactivityid",  # declared as CorrelatedActivityId_Email
    "ownerid",  # email's owner relationship declares ownerid_email
])
def test_undeclared_navigation_names_are_refused(api: Api, nav: str) -> None:
    target = "/mailboxes(00000000-0000-0000-0000-000000000001)" if "mailbox" in nav else f"/systemusers({ALICE})"
    status, code, message = _error(api.request("POST", "emails", json_body={
        "subject": "x", f"{nav}@odata.bind": target}))
    assert (status, code) == (400, "0x80048d19")
    assert f"An undeclared property '{nav}' which only has property annotations in the payload" in message


def test_declared_navigation_names_bind(api: Api) -> None:
    mailbox = api.request("GET", "mailboxes", params={"$select": "mailboxid", "$top": "1"}).json()["value"][0]
    first = str(uuid.uuid4())
    assert api.request("POST", "emails", json_body={"activityid": first, "subject": "first"}).status_code == 204
    resp = api.request("POST", "emails", json_body={
        "subject": "declared", "ReceivingMailboxId_Email@odata.bind": f"/mailboxes({mailbox['mailboxid']})",
        "CorrelatedActivityId_Email@odata.bind": f"/emails({first})",
        "parentactivityid@odata.bind": f"/emails({first})",
        "ownerid_email@odata.bind": f"/systemusers({ALICE})",
        "regardingobjectid_contact_email@odata.bind": f"/contacts({FIONA})"})
    assert resp.status_code == 204, resp.text
    rid = resp.headers["OData-EntityId"].rsplit("(", 1)[1].rstrip(")")
    row = api.request("GET", f"emails({rid})", headers={
        "Prefer": 'odata.include-annotations="Microsoft.Dynamics.CRM.lookuplogicalname"'}).json()
    assert row["_receivingmailboxid_value"] == mailbox["mailboxid"]
    assert row["_correlatedactivityid_value"] == first and row["_ownerid_value"] == ALICE


def test_string_length_and_read_only_columns_from_the_reference(api: Api) -> None:
    rows = api.request("GET", "mailboxes", params={"$select": "mailboxid", "$top": "1"}).json()["value"]
    mailbox = rows[0]["mailboxid"]
    status, code, message = _error(api.request("PATCH", f"mailboxes({mailbox})",
                                               json_body={"lastsyncerror": "e" * 2049}))
    assert (status, code) == (400, "0x80044331") and "maximum allowed length of '2048'" in message
    assert api.request("PATCH", f"mailboxes({mailbox})", json_body={"lastsyncerror": "e" * 2048}).status_code == 204
    for column, value in (("mailboxstatus", 1), ("transientfailurecount", 0)):
        status, code, message = _error(api.request("PATCH", f"mailboxes({mailbox})", json_body={column: value}))
        assert status == 400 and "IsValidForUpdate = false" in message
    # senton is read-only, and a PATCH to Sent does not invent it (email.md)
    rid = str(uuid.uuid4())
    assert api.request("POST", "emails", json_body={"activityid": rid, "subject": "s"}).status_code == 204
    assert _error(api.request("PATCH", f"emails({rid})", json_body={"senton": "2024-01-01T00:00:00Z"}))[0] == 400
    assert api.request("PATCH", f"emails({rid})", json_body={"statecode": 1, "statuscode": 3}).status_code == 204
    assert api.request("GET", f"emails({rid})", params={"$select": "senton"}).json()["senton"] is None
    # Completed email is read-only
    status, _code, message = _error(api.request("PATCH", f"emails({rid})", json_body={"subject": "changed"}))
    assert status == 400 and "read-only" in message


def test_lenient_mode_ignores_read_only_columns_like_dataverse(api: Api) -> None:
    assert api.emulator("POST", "options", {"strict": False}).status_code == 200
    try:
        mailbox = api.request("GET", "mailboxes", params={"$select": "mailboxid", "$top": "1"}).json()["value"][0]
        mid = mailbox["mailboxid"]
        before = api.request("GET", f"mailboxes({mid})", params={"$select": "mailboxstatus"}).json()["mailboxstatus"]
        assert api.request("PATCH", f"mailboxes({mid})", json_body={"mailboxstatus": 2}).status_code == 204
        after = api.request("GET", f"mailboxes({mid})", params={"$select": "mailboxstatus"}).json()["mailboxstatus"]
        assert after == before
    finally:
        api.emulator("POST", "options", {"strict": True})


def test_entity_definitions_many_to_one_relationships(api: Api) -> None:
    body = api.request("GET", "EntityDefinitions(LogicalName='email')", params={
        "$select": "IsOptimisticConcurrencyEnabled,EntitySetName",
        "$expand": "ManyToOneRelationships($select=SchemaName,ReferencingAttribute,ReferencedEntity,"
                   "ReferencingEntityNavigationPropertyName;$filter=ReferencingAttribute eq 'receivingmailboxid' or "
                   "ReferencingAttribute eq 'acceptingentityid')"}).json()
    assert body["IsOptimisticConcurrencyEnabled"] is True and body["EntitySetName"] == "emails"
    rels = {(r["SchemaName"], r["ReferencingEntityNavigationPropertyName"]) for r in body["ManyToOneRelationships"]}
    assert rels == {("mailbox_email_ReceivingMailboxId", "ReceivingMailboxId_Email"),
                    ("email_acceptingentity_queue", "acceptingentityid"),
                    ("email_acceptingentity_systemuser", "acceptingentityid")}
    direct = api.request("GET", "EntityDefinitions(LogicalName='activitymimeattachment')/ManyToOneRelationships",
                         params={"$select": "ReferencingEntityNavigationPropertyName",
                                 "$filter": "ReferencedEntity eq 'email'"}).json()["value"]
    assert [r["ReferencingEntityNavigationPropertyName"] for r in direct] == ["objectid_email"]
    csdl = api.request("GET", "$metadata").text
    assert '<NavigationProperty Name="ReceivingMailboxId_Email" Type="mscrm.mailbox"' in csdl
    assert 'Name="receivingmailboxid"' not in csdl


def test_variant_org_switches(api: Api) -> None:
    rid = str(uuid.uuid4())
    assert api.request("POST", "emails", json_body={"activityid": rid, "subject": "v"}).status_code == 204
    variant = {"concurrency_off": ["email"],
               "nav_renames": [{"entity": "email", "nav": "ReceivingMailboxId_Email", "to": ""}]}
    assert api.emulator("POST", "variant", variant).json() == variant
    try:
        one = api.request("GET", "EntityDefinitions(LogicalName='email')", params={
            "$select": "IsOptimisticConcurrencyEnabled", "$expand": "ManyToOneRelationships($select="
            "ReferencingEntityNavigationPropertyName;$filter=ReferencingAttribute eq 'receivingmailboxid')"}).json()
        assert one["IsOptimisticConcurrencyEnabled"] is False and one["ManyToOneRelationships"] == []
        etag = api.request("GET", f"emails({rid})").headers["ETag"]
        status, code, _m = _error(api.request("PATCH", f"emails({rid})", json_body={"subject": "w"},
                                              headers={"If-Match": etag}))
        assert (status, code) == (400, "0x8006088d")
        status, code, _m = _error(api.request("POST", "emails", json_body={
            "subject": "x", "ReceivingMailboxId_Email@odata.bind": "/mailboxes(00000000-0000-0000-0000-000000000001)"}))
        assert (status, code) == (400, "0x80048d19")
    finally:
        api.emulator("POST", "variant", {"reset": True})
    assert api.request("GET", "EntityDefinitions(LogicalName='email')", params={
        "$select": "IsOptimisticConcurrencyEnabled"}).json()["IsOptimisticConcurrencyEnabled"] is True


def test_failed_change_set_can_echo_content_id_when_configured(api: Api) -> None:
    body = _batch([_changeset([
        _http_part("POST", "emails", {"subject": "x", "receivingmailboxid@odata.bind": "/mailboxes(x)"}, "7")])])
    headers = {"Content-Type": 'multipart/mixed; boundary="batch_AAA"'}
    assert "Content-ID" not in api.request("POST", "$batch", content=body, headers=headers).text
    api.emulator("POST", "options", {"echo_content_id_on_failure": True})
    try:
        assert "Content-ID: 7" in api.request("POST", "$batch", content=body, headers=headers).text
    finally:
        api.emulator("POST", "options", {"echo_content_id_on_failure": False})


def test_queue_item_title_is_copied_from_the_email_subject(api: Api) -> None:
    """queueitem.md (current layout), Title: "This value is copied from the record that was assigned to the queue"."""
    support = api.request("GET", "queues", params={"$select": "queueid", "$top": "1"}).json()["value"][0]["queueid"]
    email = str(uuid.uuid4())
    created = api.request("POST", "emails", json_body={"activityid": email, "subject": "Printer on fire"})
    assert created.status_code == 204
    resp = api.request("POST", "queueitems", json_body={
        "objectid_email@odata.bind": f"/emails({email})", "queueid@odata.bind": f"/queues({support})"})
    assert resp.status_code == 204, resp.text
    rows = api.request("GET", "queueitems", params={"$filter": f"_objectid_value eq {email}",
                                                     "$select": "title"}).json()["value"]
    assert [r["title"] for r in rows] == ["Printer on fire"]
    # the names the older page lacked come from the current page: an undeclared one is refused
    status, code, _ = _error(api.request("POST", "queueitems", json_body={
        "objectid@odata.bind": f"/emails({email})", "queueid@odata.bind": f"/queues({support})"}))
    assert (status, code) == (400, "0x80048d19")


def test_generated_tables_keep_their_page_limits(api: Api) -> None:
    # account.md: name MaxLength 160; systemuser.md: fullname and isemailaddressapprovedbyo365admin are read-only
    status, code, message = _error(api.request("POST", "accounts", json_body={"name": "n" * 161}))
    assert (status, code) == (400, "0x80044331") and "maximum allowed length of '160'" in message
    status, _code, message = _error(api.request("PATCH", f"systemusers({ALICE})",
                                                json_body={"isemailaddressapprovedbyo365admin": True}))
    assert status == 400 and "IsValidForUpdate = false" in message
    # lead/opportunity/incident binds are the Dynamics 365 pages' names
    lead = _created_id(api.request("POST", "leads", json_body={"lastname": "Page", "subject": "From the CE page",
                                                               "ownerid@odata.bind": f"/systemusers({ALICE})"}))
    resp = api.request("POST", "emails", json_body={
        "subject": "about a lead", "regardingobjectid_lead_email@odata.bind": f"/leads({lead})"})
    assert resp.status_code == 204, resp.text
    status, code, _ = _error(api.request("POST", "incidents", json_body={
        "title": "t", "customerid@odata.bind": f"/contacts({FIONA})"}))
    assert (status, code) == (400, "0x80048d19")
    assert api.request("POST", "incidents", json_body={
        "title": "t", "customerid_contact@odata.bind": f"/contacts({FIONA})"}).status_code == 204
