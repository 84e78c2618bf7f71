"""Graph emulator over real HTTPS with real tokens from the identity emulator (httpx clients).

The msgraph-sdk suite is tests/integration/test_graph_emulator_sdk.py; this one covers the wire
contract in detail: auth and roles, folders, messages and queries, sending, attachments, upload
sessions, delta, subscriptions and notifications, rules, $batch, throttling, faults, SMTP.
"""

from __future__ import annotations

import asyncio
import base64
import email
import os
import smtplib
import ssl
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import msal
import pytest

from emulators.common import demo
from emulators.common.server import RunningServer
from emulators.common.tls import ensure_tls
from emulators.graph.testing import RunningGraph, WebhookReceiver, start_graph, start_webhook_receiver
from emulators.identity.testing import demo_seed, start_identity

pytestmark = pytest.mark.integration

READER_ID = "c0ffee00-0000-4000-8000-0000000000b1"  # Mail.Read only
NOROLE_ID = "c0ffee00-0000-4000-8000-0000000000c1"  # User.Read.All only
SECRET = "test-secret-for-emulator-only"
DOMAIN = demo.TENANT_DOMAIN
ALICE, BOB, SINK = f"alice@{DOMAIN}", f"bob@{DOMAIN}", f"crm-sink@{DOMAIN}"
FAST = {"missed_after_s": 0.3, "sweep_interval_s": 0.1, "notification_retry_base_s": 0.1,
        "min_subscription_minutes": 0, "validation_timeout_s": 3.0}


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("graph-tls")


@pytest.fixture(scope="module")
def bundle(tls_dir: Path) -> Iterator[ssl.SSLContext]:
    """An SSL context trusting the local CA (httpx 0.28 deprecates verify=<path>); env vars for msal."""
    tls = ensure_tls(tls_dir)
    saved = {k: os.environ.get(k) for k in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")}
    os.environ["REQUESTS_CA_BUNDLE"] = os.environ["SSL_CERT_FILE"] = str(tls.bundle)
    yield ssl.create_default_context(cafile=str(tls.bundle))
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def identity(tls_dir: Path, bundle: ssl.SSLContext) -> Iterator[RunningServer]:
    seed = demo_seed()
    base = seed["apps"][0]
    for client_id, roles in ((READER_ID, ["Mail.Read"]), (NOROLE_ID, ["User.Read.All"])):
        seed["apps"].append({**base, "client_id": client_id, "object_id": client_id.replace("b1", "b2"),
                             "display_name": client_id, "secrets": [SECRET], "certificates": [],
                             "roles": {demo.GRAPH_RESOURCE: roles}})
    server = start_identity(tls_dir, seed=seed)
    yield server
    server.stop()


_tokens: dict[str, str] = {}


def token_for(identity_url: str, client_id: str = demo.APP_CLIENT_ID, secret: str = demo.APP_CLIENT_SECRET) -> str:
    key = f"{identity_url}|{client_id}"
    if key not in _tokens:
        app = msal.ConfidentialClientApplication(client_id, authority=f"{identity_url}/{demo.TENANT_ID}",
                                                 client_credential=secret, instance_discovery=False)
        result = app.acquire_token_for_client(scopes=["https://graph.microsoft.com/.default"])
        assert "access_token" in result, result
        _tokens[key] = result["access_token"]
    return _tokens[key]


@pytest.fixture
def graph(tls_dir: Path, identity: RunningServer) -> Iterator[RunningGraph]:
    g = start_graph(tls_dir, identity.url, **FAST)
    yield g
    g.stop()


@pytest.fixture
def client(graph: RunningGraph, identity: RunningServer, bundle: ssl.SSLContext) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=graph.base_url, verify=bundle, timeout=30,
                      headers={"Authorization": f"Bearer {token_for(identity.url)}"}) as c:
        yield c


@pytest.fixture
def emu(graph: RunningGraph, bundle: ssl.SSLContext) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{graph.url}/_emulator", verify=bundle, timeout=30) as c:
        yield c


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    r = start_webhook_receiver()
    yield r
    r.stop()


def send(client: httpx.Client, sender: str, to: list[str], subject: str = "hello", **extra: Any) -> httpx.Response:
    message = {"subject": subject, "body": {"contentType": "html", "content": f"<p>{subject}</p>"},
               "toRecipients": [{"emailAddress": {"address": a}} for a in to], **extra}
    return client.post(f"/users/{sender}/sendMail", json={"message": message, "saveToSentItems": True})


def inbox(client: httpx.Client, user: str, **params: str) -> list[dict[str, Any]]:
    r = client.get(f"/users/{user}/mailFolders/inbox/messages", params={"$top": "100", **params})
    assert r.status_code == 200, r.text
    return list(r.json()["value"])


def deliver(emu: httpx.Client, raw: bytes, to: list[str], sender: str = "ext@example.org") -> dict[str, Any]:
    r = emu.post("/deliver", json={"from": sender, "to": to, "raw": base64.b64encode(raw).decode()})
    assert r.status_code == 202, r.text
    return dict(r.json())


def external_mail(subject: str = "external", **headers: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Erin External <erin@example.org>"
    msg["To"] = ALICE
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{time.time_ns()}@example.org>"
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content("plain body")
    msg.add_alternative("<p>html body</p>", subtype="html")
    return msg.as_bytes()


def expiry(minutes: float = 60) -> str:
    return (datetime.now(UTC) + timedelta(minutes=minutes)).isoformat()


# -- auth -----------------------------------------------------------------------------------------

def test_no_token_and_bad_token_are_401_with_graph_error_shape(graph: RunningGraph, bundle: ssl.SSLContext) -> None:
    r = httpx.get(f"{graph.base_url}/users/{ALICE}/messages", verify=bundle, headers={"client-request-id": "abc"})
    assert r.status_code == 401
    err = r.json()["error"]
    assert err["code"] == "InvalidAuthenticationToken"
    assert set(err["innerError"]) == {"date", "request-id", "client-request-id"}
    assert err["innerError"]["client-request-id"] == "abc" == r.headers["client-request-id"]
    assert r.headers["request-id"] == err["innerError"]["request-id"]
    assert "Bearer" in r.headers["www-authenticate"]
    r = httpx.get(f"{graph.base_url}/users/{ALICE}/messages", verify=bundle,
                  headers={"Authorization": "Bearer not.a.jwt"})
    assert r.status_code == 401


def test_missing_role_is_403(graph: RunningGraph, identity: RunningServer, bundle: ssl.SSLContext) -> None:
    reader = {"Authorization": f"Bearer {token_for(identity.url, READER_ID, SECRET)}"}
    norole = {"Authorization": f"Bearer {token_for(identity.url, NOROLE_ID, SECRET)}"}
    assert httpx.get(f"{graph.base_url}/users/{ALICE}/messages", headers=reader, verify=bundle).status_code == 200
    r = httpx.post(f"{graph.base_url}/users/{ALICE}/sendMail", headers=reader, verify=bundle,
                   json={"message": {"subject": "x", "toRecipients": [{"emailAddress": {"address": BOB}}]}})
    assert r.status_code == 403
    err = r.json()["error"]
    assert (err["code"], err["message"]) == ("ErrorAccessDenied", "Access is denied. Check credentials and try again.")
    r = httpx.get(f"{graph.base_url}/users/{ALICE}/messages", headers=norole, verify=bundle)
    assert r.status_code == 403
    r = httpx.get(f"{graph.base_url}/users/{ALICE}/mailFolders/inbox/messageRules", headers=reader, verify=bundle)
    assert r.status_code == 403  # MailboxSettings.Read(Write) needed


def test_application_access_policy_scopes_mailboxes(client: httpx.Client, emu: httpx.Client) -> None:
    assert emu.post("/access-policy", json={"app_id": demo.APP_CLIENT_ID, "allowed": [ALICE]}).status_code == 200
    assert client.get(f"/users/{ALICE}/messages").status_code == 200
    r = client.get(f"/users/{BOB}/messages")
    assert r.status_code == 403 and r.json()["error"]["code"] == "ErrorAccessDenied"
    assert emu.post("/access-policy", json={"app_id": demo.APP_CLIENT_ID, "allowed": None}).status_code == 200
    assert client.get(f"/users/{BOB}/messages").status_code == 200


def test_users_by_id_upn_and_filter(client: httpx.Client) -> None:
    alice = client.get(f"/users/{ALICE.upper()}", params={"$select": "id,mail"}).json()
    assert alice["mail"] == ALICE and "displayName" not in alice
    assert client.get(f"/users/{alice['id']}").json()["userPrincipalName"] == ALICE
    found = client.get("/users", params={"$filter": f"mail eq '{BOB}'"}).json()["value"]
    assert [u["userPrincipalName"] for u in found] == [BOB]
    r = client.get("/users/nobody@contoso.example/messages")
    assert r.status_code == 404 and r.json()["error"]["code"] == "ErrorInvalidUser"
    r = client.get("/me/messages")
    assert r.status_code == 400


# -- folders and messages ---------------------------------------------------------------------------

def test_folders_well_known_child_and_create(client: httpx.Client) -> None:
    top = client.get(f"/users/{ALICE}/mailFolders").json()["value"]
    names = {f["displayName"] for f in top}
    assert {"Inbox", "Drafts", "Sent Items", "Deleted Items", "Junk Email", "Archive"} <= names
    inbox_id = client.get(f"/users/{ALICE}/mailFolders('Inbox')").json()["id"]
    assert client.get(f"/users/{ALICE}/mailFolders/inbox").json()["id"] == inbox_id
    r = client.post(f"/users/{ALICE}/mailFolders/inbox/childFolders", json={"displayName": "Projects"})
    assert r.status_code == 201
    child = r.json()
    assert child["parentFolderId"] == inbox_id
    assert client.post(f"/users/{ALICE}/mailFolders/inbox/childFolders",
                       json={"displayName": "projects"}).status_code == 409
    kids = client.get(f"/users/{ALICE}/mailFolders/{inbox_id}/childFolders").json()["value"]
    assert [k["id"] for k in kids] == [child["id"]]
    nested = client.get(f"/users/{ALICE}/mailFolders/inbox/childFolders/{child['id']}/messages")
    assert nested.status_code == 200 and nested.json()["value"] == []


def test_list_filter_select_orderby_paging(client: httpx.Client, emu: httpx.Client) -> None:
    messages = [{"folder": "inbox", "subject": f"m{i:02d}", "from": "x@example.org", "to": [ALICE],
                 "receivedDateTime": f"2024-01-{i + 1:02d}T10:00:00Z", "isRead": i % 2 == 0,
                 "internetMessageId": f"<m{i}@example.org>"} for i in range(15)]
    emu.post("/seed", json={"users": [{"userPrincipalName": ALICE, "messages": messages}]}).raise_for_status()
    page = client.get(f"/users/{ALICE}/mailFolders/inbox/messages", params={"$top": "4", "$select": "subject"}).json()
    assert [m["subject"] for m in page["value"]] == ["m14", "m13", "m12", "m11"]
    assert set(page["value"][0]) == {"@odata.etag", "id", "subject"}
    seen = [m["subject"] for m in page["value"]]
    while "@odata.nextLink" in page:
        link = page["@odata.nextLink"]
        assert link.startswith(client.base_url.scheme + "://")
        page = client.get(link).json()
        seen += [m["subject"] for m in page["value"]]
    assert seen == [f"m{i:02d}" for i in range(14, -1, -1)]
    ge = inbox(client, ALICE, **{"$filter": "receivedDateTime ge 2024-01-10T00:00:00Z and isRead eq false",
                                 "$orderby": "receivedDateTime asc"})
    assert [m["subject"] for m in ge] == ["m09", "m11", "m13"]
    one = inbox(client, ALICE, **{"$filter": "internetMessageId eq '<m3@example.org>'"})
    assert [m["subject"] for m in one] == ["m03"]
    plain = client.get(f"/users/{ALICE}/messages/{one[0]['id']}").json()
    assert "internetMessageHeaders" not in plain and plain["isDraft"] is False
    with_headers = client.get(f"/users/{ALICE}/messages/{one[0]['id']}",
                              params={"$select": "internetMessageHeaders,subject"}).json()
    assert "internetMessageHeaders" in with_headers
    bad = client.get(f"/users/{ALICE}/messages", params={"$filter": "subject eq"})
    assert bad.status_code == 400


def test_patch_move_copy_delete_and_immutable_ids(client: httpx.Client, emu: httpx.Client) -> None:
    deliver(emu, external_mail("move me"), [ALICE])
    msg = inbox(client, ALICE)[0]
    immutable = client.get(f"/users/{ALICE}/messages/{msg['id']}",
                           headers={"Prefer": 'IdType="ImmutableId"'}).json()["id"]
    r = client.patch(f"/users/{ALICE}/messages/{msg['id']}", json={"isRead": True, "categories": ["CRM"]})
    assert r.status_code == 200
    patched = r.json()
    assert patched["isRead"] is True and patched["categories"] == ["CRM"]
    assert patched["changeKey"] != msg["changeKey"] and patched["@odata.etag"] != msg["@odata.etag"]
    assert client.patch(f"/users/{ALICE}/messages/{msg['id']}", json={"subject": "x"}).status_code == 400
    r = client.post(f"/users/{ALICE}/messages/{msg['id']}/move", json={"destinationId": "archive"})
    assert r.status_code == 201
    moved = r.json()
    assert moved["id"] != msg["id"]  # REST ids change on move
    archive_id = client.get(f"/users/{ALICE}/mailFolders/archive").json()["id"]
    assert moved["parentFolderId"] == archive_id
    same = client.get(f"/users/{ALICE}/messages/{immutable}", headers={"Prefer": 'IdType="ImmutableId"'}).json()
    assert same["id"] == immutable and same["parentFolderId"] == archive_id
    r = client.post(f"/users/{ALICE}/messages/{moved['id']}/copy", json={"destinationId": "inbox"})
    assert r.status_code == 201 and r.json()["subject"] == "move me"
    assert client.delete(f"/users/{ALICE}/messages/{moved['id']}").status_code == 204
    assert client.get(f"/users/{ALICE}/messages/{moved['id']}").status_code == 404


def test_mime_value_and_body_content_type(client: httpx.Client, emu: httpx.Client) -> None:
    deliver(emu, external_mail("mime", X_Test="kept"), [ALICE])
    msg = inbox(client, ALICE)[0]
    raw = client.get(f"/users/{ALICE}/messages/{msg['id']}/$value")
    assert raw.status_code == 200 and b"X-Test: kept" in raw.content and raw.content.startswith(b"Received:")
    text = client.get(f"/users/{ALICE}/messages/{msg['id']}", params={"$select": "body"},
                      headers={"Prefer": 'outlook.body-content-type="text"'})
    assert text.json()["body"] == {"contentType": "text", "content": "html body"}
    assert "outlook.body-content-type" in text.headers["preference-applied"]


# -- sending --------------------------------------------------------------------------------------

def test_send_mail_local_external_sent_items(client: httpx.Client, emu: httpx.Client) -> None:
    r = send(client, ALICE, [BOB, "partner@example.org"], "quote",
             internetMessageHeaders=[{"name": "x-crm-tracking", "value": "CRM:0001"}])
    assert r.status_code == 202 and r.content == b""
    got = inbox(client, BOB, **{"$select": "subject,internetMessageId,internetMessageHeaders,from,isDraft"})
    assert [m["subject"] for m in got] == ["quote"]
    headers = {h["name"].lower(): h["value"] for h in got[0]["internetMessageHeaders"]}
    assert headers["x-crm-tracking"] == "CRM:0001" and headers["message-id"] == got[0]["internetMessageId"]
    assert got[0]["from"]["emailAddress"]["address"] == ALICE
    sent = client.get(f"/users/{ALICE}/mailFolders/sentitems/messages").json()["value"]
    assert [m["internetMessageId"] for m in sent] == [got[0]["internetMessageId"]]
    assert sent[0]["conversationId"] == client.get(f"/users/{BOB}/messages/{got[0]['id']}").json()["conversationId"]
    out = emu.get("/outbox").json()
    assert [(o["to"], o["subject"]) for o in out] == [(["partner@example.org"], "quote")]
    eml = Path(out[0]["eml"]).read_bytes()
    assert b"x-crm-tracking: CRM:0001" in eml and got[0]["internetMessageId"].encode() in eml
    r = client.post(f"/users/{ALICE}/sendMail", json={"Message": {"subject": "nosave", "toRecipients": [
        {"emailAddress": {"address": BOB}}]}, "SaveToSentItems": False})
    assert r.status_code == 202
    assert len(client.get(f"/users/{ALICE}/mailFolders/sentitems/messages").json()["value"]) == 1
    assert emu.delete("/outbox").status_code == 204 and emu.get("/outbox").json() == []


def test_custom_header_limits_and_bad_recipients(client: httpx.Client) -> None:
    r = send(client, ALICE, [BOB], internetMessageHeaders=[{"name": "In-Reply-To", "value": "<a@b>"}])
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "InvalidInternetMessageHeader"
    assert "should start with 'x-' or 'X-'" in r.json()["error"]["message"]
    r = send(client, ALICE, [BOB], internetMessageHeaders=[{"name": f"x-h{i}", "value": "v"} for i in range(6)])
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidInternetMessageHeaderCollection"
    assert send(client, ALICE, ["not-an-address"]).status_code == 400
    assert send(client, ALICE, []).status_code == 400


def test_unknown_local_recipient_gets_ndr(client: httpx.Client) -> None:
    assert send(client, ALICE, [f"ghost@{DOMAIN}"], "to nobody").status_code == 202
    ndr = inbox(client, ALICE)
    assert [m["subject"] for m in ndr] == ["Undeliverable: to nobody"]


def test_draft_then_send_and_reply_threading(client: httpx.Client) -> None:
    r = client.post(f"/users/{ALICE}/messages", headers={"Prefer": 'IdType="ImmutableId"'}, json={
        "subject": "proposal", "body": {"contentType": "text", "content": "see attached"},
        "toRecipients": [{"emailAddress": {"address": BOB}}],
        "attachments": [{"@odata.type": "#microsoft.graph.fileAttachment", "name": "a.txt",
                         "contentType": "text/plain", "contentBytes": base64.b64encode(b"hello").decode()}]})
    assert r.status_code == 201
    draft = r.json()
    assert draft["isDraft"] is True and draft["internetMessageId"].startswith("<")
    assert draft["hasAttachments"] is True and draft["conversationId"]
    assert client.post(f"/users/{ALICE}/messages/{draft['id']}/send").status_code == 202
    sent = client.get(f"/users/{ALICE}/messages/{draft['id']}", headers={"Prefer": 'IdType="ImmutableId"'}).json()
    assert sent["isDraft"] is False and sent["internetMessageId"] == draft["internetMessageId"]
    assert sent["parentFolderId"] == client.get(f"/users/{ALICE}/mailFolders/sentitems").json()["id"]
    got = inbox(client, BOB)[0]
    assert got["internetMessageId"] == draft["internetMessageId"] and got["hasAttachments"] is True
    # Bob replies: In-Reply-To through the MAPI property (graph.md §7.3), same conversation, child index
    reply = client.post(f"/users/{BOB}/messages", json={
        "subject": "RE: proposal", "toRecipients": [{"emailAddress": {"address": ALICE}}],
        "singleValueExtendedProperties": [{"id": "String 0x1042", "value": got["internetMessageId"]}]}).json()
    assert reply["conversationId"] == got["conversationId"]
    parent_index = base64.b64decode(got["conversationIndex"])
    child = base64.b64decode(reply["conversationIndex"])
    assert child[:len(parent_index)] == parent_index and len(child) == len(parent_index) + 5
    assert client.post(f"/users/{BOB}/messages/{reply['id']}/send").status_code == 202
    back = inbox(client, ALICE, **{"$select": "subject,conversationId,internetMessageHeaders"})
    assert back[0]["conversationId"] == got["conversationId"]
    hdrs = {h["name"].lower(): h["value"] for h in back[0]["internetMessageHeaders"]}
    assert hdrs["in-reply-to"] == got["internetMessageId"] and "thread-index" in hdrs
    ext = client.get(f"/users/{ALICE}/messages/{back[0]['id']}", params={
        "$expand": "singleValueExtendedProperties($filter=id eq 'String 0x1042' or id eq 'String 0x1039')"}).json()
    assert {"id": "String 0x1042", "value": got["internetMessageId"]} in ext["singleValueExtendedProperties"]


# -- attachments --------------------------------------------------------------------------------

def test_file_and_item_attachments(client: httpx.Client, emu: httpx.Client) -> None:
    inner = EmailMessage()
    inner["From"] = "orig@example.org"
    inner["To"] = ALICE
    inner["Subject"] = "the original"
    inner["Message-ID"] = "<orig-1@example.org>"
    inner["X-Orig"] = "yes"
    inner.set_content("original body")
    outer = EmailMessage()
    outer["From"] = "fwd@example.org"
    outer["To"] = ALICE
    outer["Subject"] = "FW: the original"
    outer.set_content("see attached")
    outer.add_attachment(b"PDFDATA", maintype="application", subtype="pdf", filename="doc.pdf")
    outer.add_attachment(inner)
    deliver(emu, outer.as_bytes(), [ALICE])
    msg = inbox(client, ALICE)[0]
    assert msg["hasAttachments"] is True
    expanded = client.get(f"/users/{ALICE}/messages/{msg['id']}", params={"$expand": "attachments"}).json()
    kinds = {a["@odata.type"]: a for a in expanded["attachments"]}
    pdf = kinds["#microsoft.graph.fileAttachment"]
    assert base64.b64decode(pdf["contentBytes"]) == b"PDFDATA" and pdf["name"] == "doc.pdf" and pdf["size"] == 7
    item_id = kinds["#microsoft.graph.itemAttachment"]["id"]
    value = client.get(f"/users/{ALICE}/messages/{msg['id']}/attachments/{pdf['id']}/$value")
    assert value.content == b"PDFDATA" and value.headers["content-type"].startswith("application/pdf")
    item = client.get(f"/users/{ALICE}/messages/{msg['id']}/attachments/{item_id}",
                      params={"$expand": "microsoft.graph.itemAttachment/item"}).json()
    assert item["item"]["@odata.type"] == "#microsoft.graph.message" and item["item"]["id"] == ""
    assert item["item"]["internetMessageId"] == "<orig-1@example.org>"
    # attachment-get example 3: the expanded item has default properties only; headers only when $select'ed
    assert "internetMessageHeaders" not in item["item"]
    selected = client.get(f"/users/{ALICE}/messages/{msg['id']}/attachments/{item_id}", params={
        "$expand": "microsoft.graph.itemAttachment/item($select=internetMessageId,internetMessageHeaders)"}).json()
    assert set(selected["item"]) == {"@odata.type", "id", "internetMessageId", "internetMessageHeaders"}
    assert {"name": "X-Orig", "value": "yes"} in selected["item"]["internetMessageHeaders"]
    # $value of an item attachment that is a message: its MIME, headers included
    mime = client.get(f"/users/{ALICE}/messages/{msg['id']}/attachments/{item_id}/$value").content
    assert b"the original" in mime and b"X-Orig: yes" in mime


def test_upload_session_protocol(client: httpx.Client, bundle: ssl.SSLContext) -> None:
    draft = client.post(f"/users/{ALICE}/messages", json={"subject": "big"}).json()
    data = os.urandom(3 * 1024 * 1024 + 123)
    r = client.post(f"/users/{ALICE}/messages/{draft['id']}/attachments/createUploadSession",
                    json={"AttachmentItem": {"attachmentType": "file", "name": "big.bin", "size": len(data)}})
    assert r.status_code == 201
    session = r.json()
    assert session["nextExpectedRanges"] == ["0-"] and "authtoken=" in session["uploadUrl"]
    octet = {"Content-Type": "application/octet-stream"}
    with httpx.Client(verify=bundle) as raw:  # pre-authenticated URL: no bearer token
        chunk = 2 * 1024 * 1024
        # Content-Type: application/octet-stream is required (outlook-large-attachments)
        r = raw.put(session["uploadUrl"], content=data[:chunk],
                    headers={"Content-Range": f"bytes 0-{chunk - 1}/{len(data)}"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalidRequest"
        r = raw.put(session["uploadUrl"], content=data[:chunk],
                    headers={**octet, "Content-Range": f"bytes 0-{chunk - 1}/{len(data)}"})
        # the Learn example: {"ExpirationDateTime": ..., "nextExpectedRanges": ["2097152"]}
        assert r.status_code == 200 and r.json()["nextExpectedRanges"] == [f"{chunk}"], r.text
        assert "ExpirationDateTime" in r.json()
        r = raw.put(session["uploadUrl"], content=data[:10],
                    headers={**octet, "Content-Range": f"bytes 0-9/{len(data)}"})
        assert r.status_code == 416
        r = raw.put(session["uploadUrl"], content=data[chunk:],
                    headers={**octet, "Content-Range": f"bytes {chunk}-{len(data) - 1}/{len(data)}"})
        assert r.status_code == 201 and "attachments('" in r.headers["location"]
    atts = client.get(f"/users/{ALICE}/messages/{draft['id']}/attachments").json()["value"]
    assert [(a["name"], a["size"]) for a in atts] == [("big.bin", len(data))]
    too_big = {"@odata.type": "#microsoft.graph.fileAttachment", "name": "x",
               "contentBytes": base64.b64encode(data).decode()}
    assert client.post(f"/users/{ALICE}/messages/{draft['id']}/attachments", json=too_big).status_code == 413


# -- delta ------------------------------------------------------------------------------------

def test_delta_rounds_paging_removed_and_410(client: httpx.Client, emu: httpx.Client) -> None:
    for i in range(5):
        deliver(emu, external_mail(f"d{i}"), [ALICE])
    url = f"/users/{ALICE}/mailFolders/inbox/messages/delta()"
    pages, ids, link = 0, [], None
    page = client.get(url, params={"$select": "subject,receivedDateTime"},
                      headers={"Prefer": "odata.maxpagesize=2"}).json()
    while True:
        pages += 1
        ids += [m["id"] for m in page["value"]]
        assert all(set(m) <= {"@odata.type", "@odata.etag", "id", "subject", "receivedDateTime"}
                   for m in page["value"])
        if "@odata.deltaLink" in page:
            link = page["@odata.deltaLink"]
            break
        page = client.get(page["@odata.nextLink"]).json()
    assert pages == 3 and len(set(ids)) == 5
    assert "$deltatoken=" in link and link.startswith("https://")
    empty = client.get(link).json()
    assert empty["value"] == [] and "@odata.deltaLink" in empty
    # changes: one new, one read, one deleted, one moved out
    deliver(emu, external_mail("d-new"), [ALICE])
    client.patch(f"/users/{ALICE}/messages/{ids[0]}", json={"isRead": True}).raise_for_status()
    client.delete(f"/users/{ALICE}/messages/{ids[1]}").raise_for_status()
    client.post(f"/users/{ALICE}/messages/{ids[2]}/move", json={"destinationId": "archive"}).raise_for_status()
    items, page = [], client.get(empty["@odata.deltaLink"]).json()
    while True:  # the page size chosen on the first request (2) still applies
        items += page["value"]
        if "@odata.deltaLink" in page:
            break
        page = client.get(page["@odata.nextLink"]).json()
    removed = {m["id"] for m in items if "@removed" in m}
    present = {m.get("subject") for m in items if "@removed" not in m}
    assert removed == {ids[1], ids[2]}
    assert all(m["@removed"] == {"reason": "deleted"} for m in items if "@removed" in m)
    assert "d-new" in present and len(present) == 2
    created_only = client.get(f"/users/{ALICE}/mailFolders/inbox/messages/delta",
                              params={"changeType": "created", "$filter": "receivedDateTime ge 2000-01-01T00:00:00Z"})
    assert created_only.status_code == 200
    gone = client.get(url, params={"$deltatoken": "not-a-token"})
    assert gone.status_code == 410 and gone.json()["error"]["code"] == "syncStateNotFound"
    assert "$deltatoken=" in gone.headers["location"]
    bad = client.get(url, params={"$filter": "isRead eq false"})
    assert bad.status_code == 400


# -- subscriptions and notifications ------------------------------------------------------------

def subscribe(client: httpx.Client, receiver: WebhookReceiver, resource: str, **extra: Any) -> httpx.Response:
    body = {"changeType": "created,updated,deleted", "notificationUrl": f"{receiver.url}/notify?code=fn-key&x=1",
            "lifecycleNotificationUrl": f"{receiver.url}/lifecycle", "resource": resource,
            "expirationDateTime": expiry(), "clientState": "s3cret", **extra}
    return client.post("/subscriptions", json=body)


def test_subscription_handshake_notifications_and_shapes(client: httpx.Client, emu: httpx.Client,
                                                         receiver: WebhookReceiver, graph: RunningGraph) -> None:
    alice_id = client.get(f"/users/{ALICE}").json()["id"]
    r = subscribe(client, receiver, f"users/{alice_id}/mailFolders('Inbox')/messages")
    assert r.status_code == 201, r.text
    sub = r.json()
    assert len(receiver.validations) == 2 and receiver.validations[0].startswith("Validation: ")
    doc_keys = {"@odata.context", "id", "resource", "applicationId", "changeType", "clientState", "notificationUrl",
                "notificationQueryOptions", "lifecycleNotificationUrl",
                "expirationDateTime", "creatorId", "includeResourceData", "latestSupportedTlsVersion",
                "encryptionCertificate", "encryptionCertificateId", "notificationUrlAppId"}
    assert set(sub) == doc_keys and sub["clientState"] == "s3cret"
    # subscription-list: "the clientState property value is not returned for security purposes"
    listed = [s for s in client.get("/subscriptions").json()["value"] if s["id"] == sub["id"]]
    assert len(listed) == 1 and listed[0]["clientState"] is None
    assert sub["applicationId"] == demo.APP_CLIENT_ID and sub["creatorId"] == demo.APP_OBJECT_ID
    assert sub["latestSupportedTlsVersion"] == "v1_2" and sub["expirationDateTime"].endswith("Z")
    deliver(emu, external_mail("notify me"), [ALICE])
    assert receiver.wait_for(lambda r: len(r.notifications) >= 1)
    note = receiver.notifications[0]
    assert set(note) == {"id", "subscriptionId", "subscriptionExpirationDateTime", "clientState", "changeType",
                         "resource", "tenantId", "resourceData"}
    assert note["subscriptionId"] == sub["id"] and note["changeType"] == "created" and note["clientState"] == "s3cret"
    assert note["tenantId"] == demo.TENANT_ID
    data = note["resourceData"]
    assert set(data) == {"@odata.type", "@odata.id", "@odata.etag", "id"}
    assert data["@odata.type"] == "#Microsoft.Graph.Message"
    assert note["resource"] == data["@odata.id"] == f"Users/{alice_id}/Messages/{data['id']}"
    assert data["@odata.etag"].startswith('W/"')
    path, query, _ = receiver.posts[0]
    assert path == "/notify" and parse_qs(query) == {"code": ["fn-key"], "x": ["1"]}
    message = client.get(f"/users/{ALICE}/messages/{data['id']}").json()
    assert message["subject"] == "notify me"
    client.patch(f"/users/{ALICE}/messages/{data['id']}", json={"isRead": True}).raise_for_status()
    assert receiver.wait_for(lambda r: any(n["changeType"] == "updated" for n in r.notifications))
    client.delete(f"/users/{ALICE}/messages/{data['id']}").raise_for_status()
    assert receiver.wait_for(lambda r: any(n["changeType"] == "deleted" for n in r.notifications))
    # mail to Bob does not reach Alice's subscription
    count = len(receiver.notifications)
    send(client, ALICE, [BOB]).raise_for_status()
    time.sleep(0.3)
    assert len(receiver.notifications) == count


def test_subscription_validation_failures(client: httpx.Client, receiver: WebhookReceiver) -> None:
    res = f"users/{ALICE}/messages"
    receiver.validation_mode = "forbidden"
    r = subscribe(client, receiver, res)
    assert r.status_code == 400 and r.json()["error"]["code"] == "ValidationError"
    assert "'Forbidden'" in r.json()["error"]["message"]
    receiver.validation_mode = "encoded"
    assert subscribe(client, receiver, res).status_code == 400
    receiver.validation_mode = "slow"
    receiver.slow_s = 6.0  # validation_timeout_s is 3 s in these tests
    r = subscribe(client, receiver, res)
    assert r.status_code == 400 and r.json()["error"] == r.json()["error"] | {
        "code": "InvalidRequest", "message": "Subscription validation request timed out."}
    receiver.validation_mode = "ok"
    r = subscribe(client, receiver, res, notificationUrl="http://example.org/hook")
    assert r.status_code == 400
    r = subscribe(client, receiver, res, expirationDateTime=expiry(20000))
    assert r.status_code == 400 and r.json()["error"]["code"] == "ExtensionError"
    assert r.json()["error"]["message"] == "Subscription expiration can only be 10070 minutes in the future."
    assert subscribe(client, receiver, res, clientState="x" * 129).status_code == 400
    assert subscribe(client, receiver, "me/messages").status_code == 400
    assert subscribe(client, receiver, res, changeType="moved").status_code == 400
    assert client.get("/subscriptions").json()["value"] == []


def test_subscription_renew_reauthorize_list_delete(client: httpx.Client, receiver: WebhookReceiver) -> None:
    sub = subscribe(client, receiver, f"users/{ALICE}/messages").json()
    new_expiry = expiry(3000)
    r = client.patch(f"/subscriptions/{sub['id']}", json={"expirationDateTime": new_expiry})
    assert r.status_code == 200 and set(r.json()) == set(sub)
    assert r.json()["expirationDateTime"][:19] == new_expiry[:19]
    assert client.post(f"/subscriptions/{sub['id']}/reauthorize").status_code == 204
    assert [s["id"] for s in client.get("/subscriptions").json()["value"]] == [sub["id"]]
    assert client.get(f"/subscriptions/{sub['id']}").json()["id"] == sub["id"]
    assert client.delete(f"/subscriptions/{sub['id']}").status_code == 204
    assert client.get(f"/subscriptions/{sub['id']}").status_code == 404


def test_failed_notifications_are_retried(client: httpx.Client, emu: httpx.Client,
                                          receiver: WebhookReceiver) -> None:
    subscribe(client, receiver, f"users/{ALICE}/mailFolders/inbox/messages").raise_for_status()
    receiver.status = 500
    deliver(emu, external_mail("retry"), [ALICE])
    assert receiver.wait_for(lambda r: len(r.posts) >= 2)  # first attempt and at least one retry
    receiver.status = 202
    assert receiver.wait_for(lambda r: len(r.notifications) == 1)


def test_dropped_notifications_lead_to_missed_and_duplicates(client: httpx.Client, emu: httpx.Client,
                                                             receiver: WebhookReceiver) -> None:
    sub = subscribe(client, receiver, f"users/{ALICE}/mailFolders/inbox/messages").json()
    assert emu.post("/notification-faults", json={"action": "drop", "count": 1}).status_code == 201
    deliver(emu, external_mail("dropped"), [ALICE])
    assert receiver.wait_for(lambda r: any(x["lifecycleEvent"] == "missed" for x in r.lifecycle))
    assert receiver.notifications == []
    event = receiver.lifecycle[0]
    assert set(event) == {"subscriptionId", "subscriptionExpirationDateTime", "tenantId", "clientState",
                          "lifecycleEvent"}
    assert event["subscriptionId"] == sub["id"] and event["clientState"] == "s3cret"
    emu.post("/notification-faults", json={"action": "duplicate", "count": 1}).raise_for_status()
    deliver(emu, external_mail("twice"), [ALICE])
    assert receiver.wait_for(lambda r: len(r.notifications) == 2)
    assert receiver.notifications[0]["resourceData"]["id"] == receiver.notifications[1]["resourceData"]["id"]


def test_expiry_deletes_silently_and_reauthorization_follows_the_token_cadence(
        tls_dir: Path, identity: RunningServer, bundle: ssl.SSLContext, receiver: WebhookReceiver) -> None:
    cadence = {"reauthorize_interval_s": 1.0, "reauthorize_repeat_s": 0.5, "reauthorize_pause_after_s": 1.0}
    g = start_graph(tls_dir, identity.url, smtp=False, **{**FAST, **cadence})
    try:
        c = httpx.Client(base_url=g.base_url, verify=bundle, headers={
            "Authorization": f"Bearer {token_for(identity.url)}"})
        e = httpx.Client(base_url=f"{g.url}/_emulator", verify=bundle)
        # plain expiry: Graph deletes the subscription; no lifecycle event is documented for it
        soon = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
        short = subscribe(c, receiver, f"users/{ALICE}/messages", expirationDateTime=soon).json()
        deadline = time.monotonic() + 20
        while c.get(f"/subscriptions/{short['id']}").status_code != 404 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get(f"/subscriptions/{short['id']}").status_code == 404
        # one token lifetime after creation: reauthorizationRequired, repeated while unanswered
        sub = subscribe(c, receiver, f"users/{ALICE}/mailFolders('inbox')/messages").json()

        def challenges(r: WebhookReceiver) -> int:
            return sum(x["lifecycleEvent"] == "reauthorizationRequired" and x["subscriptionId"] == sub["id"]
                       for x in r.lifecycle)

        assert receiver.wait_for(lambda r: challenges(r) >= 2)
        # unanswered past the grace: change notifications pause, the changes are lost (delta catches up)
        assert receiver.wait_for(lambda r: g.emulator.notifier._paused(
            next(s for subs in g.emulator.notifier._subs.values() for s in subs if s.id == sub["id"])))
        before = g.emulator.notifier.paused_dropped
        deliver(e, external_mail("while paused"), [ALICE])
        # the notifier handles store events on its own thread: wait for the drop, never assume it already happened
        assert receiver.wait_for(lambda _r: g.emulator.notifier.paused_dropped == before + 1)
        # one PATCH answers the challenge (renewing also reauthorizes): notifications flow again (no new challenge
        # from here on, so the check below does not race the next one)
        assert e.post("/config", json={"reauthorize_interval_s": None}).status_code == 200
        assert c.patch(f"/subscriptions/{sub['id']}", json={"expirationDateTime": expiry(90)}).status_code == 200
        receiver.clear()
        deliver(e, external_mail("after renew"), [ALICE])
        assert receiver.wait_for(lambda r: any(n["subscriptionId"] == sub["id"] for n in r.notifications))
        assert not any(x["lifecycleEvent"] == "subscriptionRemoved" for x in receiver.lifecycle)
        r = e.post("/lifecycle", json={"subscriptionId": sub["id"], "event": "missed"})
        assert r.status_code == 202
        assert receiver.wait_for(lambda r: sum(x["lifecycleEvent"] == "missed" for x in r.lifecycle) == 1)
        e.close()
        c.close()
    finally:
        g.stop()


# -- rules --------------------------------------------------------------------------------------

def test_forward_as_attachment_rule_over_smtp(client: httpx.Client, graph: RunningGraph) -> None:
    rule = {"displayName": "to CRM", "sequence": 1, "isEnabled": True, "conditions": {},
            "actions": {"forwardAsAttachmentTo": [{"emailAddress": {"address": SINK}}],
                        "stopProcessingRules": True}}
    r = client.post(f"/users/{ALICE}/mailFolders/inbox/messageRules", json=rule)
    assert r.status_code == 201
    assert [x["displayName"] for x in client.get(f"/users/{ALICE}/mailFolders/inbox/messageRules").json()["value"]] \
        == ["to CRM"]
    raw = external_mail("customer question", X_Customer="42")
    assert graph.smtp_port is not None
    with smtplib.SMTP("127.0.0.1", graph.smtp_port, timeout=30) as smtp:
        smtp.sendmail("erin@example.org", [ALICE], raw)
    original = inbox(client, ALICE, **{"$select": "subject,internetMessageId"})[0]
    wrappers = inbox(client, SINK, **{"$select": "subject,from,hasAttachments"})
    assert [w["subject"] for w in wrappers] == ["FW: customer question"]
    assert wrappers[0]["from"]["emailAddress"]["address"] == ALICE and wrappers[0]["hasAttachments"] is True
    atts = client.get(f"/users/{SINK}/messages/{wrappers[0]['id']}/attachments",
                      params={"$expand": "microsoft.graph.itemAttachment/item"}).json()["value"]
    assert [a["@odata.type"] for a in atts] == ["#microsoft.graph.itemAttachment"]
    item = atts[0]["item"]
    assert item["internetMessageId"] == original["internetMessageId"]
    assert item["from"]["emailAddress"]["address"] == "erin@example.org"
    assert "internetMessageHeaders" not in item  # default properties only (graph.md §6.1)
    mime = client.get(f"/users/{SINK}/messages/{wrappers[0]['id']}/attachments/{atts[0]['id']}/$value").content
    parsed = email.message_from_bytes(mime)
    assert parsed["X-Customer"] == "42" and parsed["Received"] and parsed["Message-ID"] == item["internetMessageId"]
    with smtplib.SMTP("127.0.0.1", graph.smtp_port, timeout=30) as smtp:
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            smtp.sendmail("erin@example.org", [f"ghost@{DOMAIN}"], raw)


def test_move_and_delete_rules_in_sequence(client: httpx.Client, emu: httpx.Client) -> None:
    folder = client.post(f"/users/{BOB}/mailFolders/inbox/childFolders", json={"displayName": "Invoices"}).json()
    client.post(f"/users/{BOB}/mailFolders/inbox/messageRules", json={
        "displayName": "spam", "sequence": 1, "conditions": {"senderContains": ["spam"]},
        "actions": {"delete": True, "stopProcessingRules": True}}).raise_for_status()
    created = client.post(f"/users/{BOB}/mailFolders/inbox/messageRules", json={
        "displayName": "invoices", "sequence": 2, "conditions": {"subjectContains": ["invoice"]},
        "actions": {"moveToFolder": folder["id"], "markAsRead": True}}).json()
    deliver(emu, external_mail("Invoice 7"), [BOB])
    spam = external_mail("invoice from spammer").replace(b"erin@example.org", b"spam@example.org")
    deliver(emu, spam, [BOB])
    deliver(emu, external_mail("hello"), [BOB])
    assert [m["subject"] for m in inbox(client, BOB)] == ["hello"]
    moved = client.get(f"/users/{BOB}/mailFolders/{folder['id']}/messages").json()["value"]
    assert [(m["subject"], m["isRead"]) for m in moved] == [("Invoice 7", True)]
    deleted = client.get(f"/users/{BOB}/mailFolders/deleteditems/messages").json()["value"]
    assert [m["subject"] for m in deleted] == ["invoice from spammer"]
    r = client.patch(f"/users/{BOB}/mailFolders/inbox/messageRules/{created['id']}", json={"isEnabled": False})
    assert r.status_code == 200 and r.json()["isEnabled"] is False
    assert client.delete(f"/users/{BOB}/mailFolders/inbox/messageRules/{created['id']}").status_code == 204


# -- $batch, throttling, faults, emulator endpoints ---------------------------------------------------

def test_json_batch(client: httpx.Client, emu: httpx.Client) -> None:
    deliver(emu, external_mail("batched"), [ALICE])
    mid = inbox(client, ALICE)[0]["id"]
    body = {"requests": [
        {"id": "1", "method": "GET", "url": f"/users/{ALICE}/messages/{mid}?$select=subject"},
        {"id": "2", "method": "PATCH", "url": f"/users/{ALICE}/messages/{mid}", "dependsOn": ["1"],
         "headers": {"Content-Type": "application/json"}, "body": {"isRead": True}},
        {"id": "3", "method": "GET", "url": f"/users/{ALICE}/messages/does-not-exist"},
        {"id": "4", "method": "GET", "url": f"/users/{ALICE}/messages", "dependsOn": ["3"]},
    ]}
    r = client.post("/$batch", json=body)
    assert r.status_code == 200
    by_id = {x["id"]: x for x in r.json()["responses"]}
    assert by_id["1"]["status"] == 200 and by_id["1"]["body"]["subject"] == "batched"
    assert by_id["2"]["status"] == 200 and by_id["2"]["body"]["isRead"] is True
    assert by_id["3"]["status"] == 404 and by_id["4"]["status"] == 424
    too_many = {"requests": [{"id": str(i), "method": "GET", "url": "/users"} for i in range(21)]}
    assert client.post("/$batch", json=too_many).status_code == 400
    dup = {"requests": [{"id": "a", "method": "GET", "url": "/users"}, {"id": "A", "method": "GET", "url": "/users"}]}
    assert client.post("/$batch", json=dup).status_code == 400


def test_fault_injection_and_request_log(client: httpx.Client, emu: httpx.Client) -> None:
    r = emu.post("/faults", json={"method": "GET", "path": "/messages$", "status": 503, "retry_after": 2, "count": 1})
    assert r.status_code == 201
    fault_id = r.json()["id"]
    assert any(f["id"] == fault_id for f in emu.get("/faults").json()["value"])
    first = client.get(f"/users/{ALICE}/messages")
    assert first.status_code == 503 and first.headers["retry-after"] == "2"
    assert first.json()["error"]["code"] == "ServiceNotAvailable"
    assert client.get(f"/users/{ALICE}/messages").status_code == 200
    assert emu.get("/faults").json()["value"] == []
    emu.post("/faults", json={"path": "/mailFolders", "status": 429, "error_code": "TooManyRequests"})
    assert client.get(f"/users/{ALICE}/mailFolders").status_code == 429
    assert emu.delete("/faults").status_code == 204
    assert client.get(f"/users/{ALICE}/mailFolders").status_code == 200
    log = emu.get("/requests").json()["value"]
    assert [e["status"] for e in log][-4:] == [503, 200, 429, 200]
    assert set(log[-1]) == {"method", "path", "status", "ms", "at", "app"} and log[-1]["app"] == demo.APP_CLIENT_ID
    assert emu.delete("/requests").status_code == 204


def test_mailbox_budget_and_concurrency_throttling(
        tls_dir: Path, identity: RunningServer, bundle: ssl.SSLContext) -> None:
    g = start_graph(tls_dir, identity.url, smtp=False, budget_requests=3, budget_window_s=600)
    try:
        headers = {"Authorization": f"Bearer {token_for(identity.url)}"}
        with httpx.Client(base_url=g.base_url, verify=bundle, headers=headers) as c:
            assert [c.get(f"/users/{ALICE}/messages").status_code for _ in range(3)] == [200, 200, 200]
            r = c.get(f"/users/{ALICE}/messages")
            assert r.status_code == 429 and r.json()["error"]["code"] == "ApplicationThrottled"
            assert 0 < int(r.headers["retry-after"]) <= 600
            assert c.get(f"/users/{BOB}/messages").status_code == 200  # budgets are per mailbox
    finally:
        g.stop()
    g = start_graph(tls_dir, identity.url, smtp=False)
    try:
        httpx.post(f"{g.url}/_emulator/faults", verify=bundle,
                   json={"path": "/messages$", "latency_ms": 1500}).raise_for_status()

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=g.base_url, verify=bundle, headers=headers, timeout=30) as ac:
                return list(await asyncio.gather(*(ac.get(f"/users/{ALICE}/messages") for _ in range(8))))

        statuses = sorted(r.status_code for r in asyncio.run(burst()))
        assert statuses.count(200) >= 4 and 429 in statuses  # 4 concurrent requests per app and mailbox
    finally:
        g.stop()


def test_reset_seed_health_and_smtp_inbound(client: httpx.Client, emu: httpx.Client, graph: RunningGraph) -> None:
    health = emu.get("/health").json()
    assert health["status"] == "ok" and health["smtpPort"] == graph.smtp_port
    r = emu.post("/seed", json={"domains": ["fabrikam.example"], "users": [
        {"userPrincipalName": "zoe@fabrikam.example", "displayName": "Zoe",
         "messages": [{"folder": "inbox", "subject": "seeded", "from": "a@example.org"}]}]})
    assert r.status_code == 200 and "zoe@fabrikam.example" in r.json()["users"]
    assert [m["subject"] for m in inbox(client, "zoe@fabrikam.example")] == ["seeded"]
    msg = EmailMessage()
    msg["From"] = "x@example.org"
    msg["To"] = "zoe@fabrikam.example"
    msg["Subject"] = "=?utf-8?q?caf=C3=A9?="
    msg.set_content("hi")
    with smtplib.SMTP("127.0.0.1", graph.smtp_port or 0, timeout=30) as smtp:
        smtp.send_message(msg)
    assert [m["subject"] for m in inbox(client, "zoe@fabrikam.example")] == ["café", "seeded"]
    assert emu.post("/reset").status_code == 200
    assert client.get("/users/zoe@fabrikam.example").status_code == 404
    assert client.get(f"/users/{ALICE}").status_code == 200


def test_next_links_are_absolute_on_own_base(client: httpx.Client, emu: httpx.Client) -> None:
    for i in range(3):
        deliver(emu, external_mail(f"p{i}"), [ALICE])
    page = client.get(f"/users/{ALICE}/messages", params={"$top": "2"}).json()
    parts = urlsplit(page["@odata.nextLink"])
    assert f"{parts.scheme}://{parts.netloc}" == str(client.base_url).rsplit("/v1.0", 1)[0]
    assert parse_qs(parts.query)["$skip"] == ["2"]
