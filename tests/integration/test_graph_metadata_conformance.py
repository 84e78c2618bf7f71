"""Every property the Graph emulator returns is declared in Microsoft Graph's v1.0 metadata (DESIGN §5 "emulator
strictness"): for each resource kind the router reads - messages (as fetched, listed, in delta), attachments
(file, item, the expanded item), mail folders, inbox rules, subscriptions, users, upload sessions, change and
lifecycle notifications - the JSON is walked against ``emulators/graph/metadata/graph-v1.0.json`` (extracted from
msgraph-metadata ``schemas/v1.0-Prod.csdl`` by ``emulators/graph/metadata/extract.py``): property names
(including inherited ones), ``@odata.type`` derivation, primitive kinds, enum members and non-nullable values.

OData annotations (``@odata.*``, ``item@odata.context``) are not properties. ``resourceData`` is the one open
type that declares nothing (its ``id`` is documented as a dynamic property), so only there are undeclared names
allowed.
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator, Iterator
from email.message import EmailMessage
from typing import Any

import httpx
import pytest

from core.adapters.graph import DELTA_SELECT, MESSAGE_SELECT
from emulators.common import demo
from emulators.graph.app import GraphEmulator, create_app
from emulators.graph.config import GraphConfig
from emulators.graph.metadata import Metadata, load_metadata
from emulators.graph.testing import WebhookReceiver, start_webhook_receiver

pytestmark = pytest.mark.integration

ALICE, BOB = f"alice@{demo.TENANT_DOMAIN}", f"bob@{demo.TENANT_DOMAIN}"
EXTENDED = "singleValueExtendedProperties($filter=id eq 'String 0x1042' or id eq 'String 0x1039')"
_GUID = re.compile(r"^[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})$")


def _local(name: str) -> str:
    return name.split(".")[-1] if name.startswith(("graph.", "microsoft.graph.", "#microsoft.graph.")) else name


def violations(meta: Metadata, value: Any, type_name: str, path: str = "$", nullable: bool = True) -> list[str]:
    """What in ``value`` is not declared for ``type_name`` (a metadata type name or an Edm/Collection type)."""
    if value is None:
        return [] if nullable else [f"{path}: null for a non-nullable {type_name}"]
    if type_name.startswith("Collection("):
        if not isinstance(value, list):
            return [f"{path}: {type(value).__name__} for {type_name}"]
        inner = type_name[len("Collection("):-1]
        return [v for i, item in enumerate(value) for v in violations(meta, item, inner, f"{path}[{i}]", False)]
    if type_name.startswith("Edm."):
        return _primitive(value, type_name, path)
    local = _local(type_name)
    if local in meta.enums:
        ok = isinstance(value, str) and all(p.strip() in meta.enums[local] for p in value.split(","))
        return [] if ok else [f"{path}: {value!r} is not a member of {local} {meta.enums[local]}"]
    if not isinstance(value, dict):
        return [f"{path}: {type(value).__name__} for {local}"]
    if local in meta.types and meta.types[local].open and not meta.properties(local):
        return []  # an open type that declares nothing (resourceData): its content is dynamic by definition
    actual = local
    if "@odata.type" in value:
        actual = _local(str(value["@odata.type"]))
        if actual.lower() == "message" and local == "outlookItem":
            actual = "message"
        if actual not in meta.types or not meta.derives_from(actual, local):
            return [f"{path}: @odata.type {value['@odata.type']} is not a {local}"]
    properties, navigation = meta.properties(actual), meta.navigation(actual)
    out: list[str] = []
    for key, item in value.items():
        if "@" in key:
            continue  # annotations (@odata.etag, item@odata.context, @removed) are not properties
        if key in properties:
            spec = properties[key]
            out += violations(meta, item, spec["type"], f"{path}.{key}", spec["nullable"])
        elif key in navigation:
            out += violations(meta, item, navigation[key]["type"], f"{path}.{key}")
        else:
            out.append(f"{path}.{key}: not declared on {actual}")
    return out


def _primitive(value: Any, edm: str, path: str) -> list[str]:
    ok = {
        "Edm.String": lambda v: isinstance(v, str),
        "Edm.Boolean": lambda v: isinstance(v, bool),
        "Edm.Int32": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "Edm.Int64": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "Edm.Guid": lambda v: isinstance(v, str) and bool(_GUID.match(v)),
        "Edm.DateTimeOffset": lambda v: isinstance(v, str) and bool(_DATETIME.match(v)),
        "Edm.Binary": lambda v: isinstance(v, str) and _is_base64(v),
    }.get(edm, lambda v: True)(value)
    return [] if ok else [f"{path}: {value!r} is not an {edm}"]


def _is_base64(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
    except ValueError:
        return False
    return True


def assert_declared(meta: Metadata, value: Any, type_name: str) -> None:
    found = violations(meta, value, type_name)
    assert not found, "\n".join(found)


def body_of(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code < 300, response.text
    data = response.json()
    return {k: v for k, v in data.items() if k != "@odata.context"} if isinstance(data, dict) else data


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def meta() -> Metadata:
    return load_metadata()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    r = start_webhook_receiver()
    yield r
    r.stop()


@pytest.fixture
async def emulator() -> AsyncIterator[GraphEmulator]:
    emu = GraphEmulator(GraphConfig(auth=False, min_subscription_minutes=0))
    emu.start()
    yield emu
    emu.stop()
    emu.mail.close()


@pytest.fixture
async def client(emulator: GraphEmulator) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(emulator.config, emulator))
    async with httpx.AsyncClient(transport=transport, base_url="https://graph.test/v1.0") as c:
        yield c


def _delivered(emulator: GraphEmulator) -> None:
    inner = EmailMessage()
    inner["From"], inner["To"], inner["Subject"] = "orig@example.org", ALICE, "the original"
    inner["Message-ID"], inner["Auto-Submitted"] = "<orig-1@example.org>", "auto-replied"
    inner.set_content("original")
    outer = EmailMessage()
    outer["From"], outer["To"], outer["Subject"] = "Erin <erin@example.org>", ALICE, "RE: question"
    outer["Message-ID"], outer["In-Reply-To"] = "<reply-1@example.org>", "<q-1@example.org>"
    outer["Importance"] = "high"
    outer.set_content("plain")
    outer.add_alternative("<p>html <img src='cid:logo@x'></p>", subtype="html")
    outer.get_payload()[1].add_related(b"PNG", maintype="image", subtype="png", cid="<logo@x>")
    outer.add_attachment(b"PDFDATA", maintype="application", subtype="pdf", filename="doc.pdf")
    outer.add_attachment(inner)
    emulator.mail.deliver_inbound("erin@example.org", [ALICE], outer.as_bytes())


# ------------------------------------------------------------------------------------------------ the test


async def test_messages_attachments_and_folders_are_declared(meta: Metadata, emulator: GraphEmulator,
                                                             client: httpx.AsyncClient) -> None:
    _delivered(emulator)
    prefer = {"Prefer": 'IdType="ImmutableId", outlook.body-content-type="html"'}
    listed = body_of(await client.get(f"/users/{ALICE}/mailFolders/inbox/messages"))["value"]
    assert listed
    for message in listed:
        assert_declared(meta, message, "message")
    mid = listed[0]["id"]
    full = body_of(await client.get(f"/users/{ALICE}/messages/{mid}", headers=prefer, params={
        "$select": ",".join(MESSAGE_SELECT), "$expand": f"attachments,{EXTENDED}"}))
    assert {a["@odata.type"] for a in full["attachments"]} == {"#microsoft.graph.fileAttachment",
                                                              "#microsoft.graph.itemAttachment"}
    assert full["internetMessageHeaders"] and full["singleValueExtendedProperties"]
    assert_declared(meta, full, "message")
    every = ",".join(sorted({"uniqueBody", "webLink", "flag", "inferenceClassification", *MESSAGE_SELECT}))
    assert_declared(meta, body_of(await client.get(f"/users/{ALICE}/messages/{mid}", params={"$select": every})),
                    "message")

    attachments = body_of(await client.get(f"/users/{ALICE}/messages/{mid}/attachments"))["value"]
    for attachment in attachments:
        assert_declared(meta, attachment, "attachment")
    item = next(a for a in attachments if a["@odata.type"].endswith("itemAttachment"))
    for expand in ("microsoft.graph.itemAttachment/item",
                   "microsoft.graph.itemAttachment/item($select=internetMessageHeaders,subject;$expand=attachments)"):
        expanded = body_of(await client.get(f"/users/{ALICE}/messages/{mid}/attachments/{item['id']}",
                                            params={"$expand": expand}))
        assert expanded["item"]["@odata.type"] == "#microsoft.graph.message"
        assert_declared(meta, expanded, "attachment")

    for folder in body_of(await client.get(f"/users/{ALICE}/mailFolders"))["value"]:
        assert_declared(meta, folder, "mailFolder")
    assert_declared(meta, body_of(await client.get(f"/users/{ALICE}/mailFolders/inbox")), "mailFolder")


async def test_drafts_sent_items_delta_and_upload_sessions_are_declared(meta: Metadata, emulator: GraphEmulator,
                                                                        client: httpx.AsyncClient) -> None:
    draft = body_of(await client.post(f"/users/{ALICE}/messages", json={
        "subject": "CRM:0001 quote", "body": {"contentType": "html", "content": "<p>quote</p>"},
        "toRecipients": [{"emailAddress": {"address": BOB, "name": "Bob"}}],
        "internetMessageHeaders": [{"name": "x-emailrouter-activityid", "value": "1"}],
        "singleValueExtendedProperties": [{"id": "String 0x1042", "value": "<q-1@example.org>"}]}))
    assert_declared(meta, draft, "message")
    session = body_of(await client.post(f"/users/{ALICE}/messages/{draft['id']}/attachments/createUploadSession",
                                        json={"AttachmentItem": {"attachmentType": "file", "name": "big.bin",
                                                                 "size": 4 * 1024 * 1024}}))
    assert_declared(meta, session, "uploadSession")
    assert (await client.post(f"/users/{ALICE}/messages/{draft['id']}/send")).status_code == 202
    found = body_of(await client.get(f"/users/{ALICE}/messages", params={
        "$filter": f"internetMessageId eq '{draft['internetMessageId']}'",
        "$select": "id,internetMessageId,isDraft,parentFolderId,sentDateTime"}))["value"]
    assert found and all(not violations(meta, m, "message") for m in found)
    delta = body_of(await client.get(f"/users/{BOB}/mailFolders/inbox/messages/delta",
                                     params={"$select": ",".join(DELTA_SELECT)}))
    assert delta["value"]
    for message in delta["value"]:
        assert_declared(meta, message, "message")


async def test_rules_users_subscriptions_and_notifications_are_declared(
        meta: Metadata, emulator: GraphEmulator, client: httpx.AsyncClient, receiver: WebhookReceiver) -> None:
    rule = body_of(await client.post(f"/users/{ALICE}/mailFolders/inbox/messageRules", json={
        "displayName": "to CRM", "sequence": 1, "isEnabled": True, "conditions": {},
        "actions": {"forwardAsAttachmentTo": [{"emailAddress": {"address": BOB}}]}}))
    assert_declared(meta, rule, "messageRule")
    for listed in body_of(await client.get(f"/users/{ALICE}/mailFolders/inbox/messageRules"))["value"]:
        assert_declared(meta, listed, "messageRule")
    assert_declared(meta, body_of(await client.get(f"/users/{ALICE}")), "user")
    assert_declared(meta, body_of(await client.get(f"/users/{ALICE}", params={
        "$select": "id,mail,userPrincipalName,proxyAddresses,displayName"})), "user")
    for user in body_of(await client.get("/users", params={"$filter": f"mail eq '{ALICE}'"}))["value"]:
        assert_declared(meta, user, "user")

    user_id = body_of(await client.get(f"/users/{ALICE}"))["id"]
    sub = body_of(await client.post("/subscriptions", json={
        "changeType": "created", "notificationUrl": f"{receiver.url}/notify",
        "lifecycleNotificationUrl": f"{receiver.url}/lifecycle", "clientState": "s3cret",
        "resource": f"users/{user_id}/mailFolders('inbox')/messages",
        "expirationDateTime": _soon(), "latestSupportedTlsVersion": "v1_2"}))
    assert_declared(meta, sub, "subscription")
    for listed in body_of(await client.get("/subscriptions"))["value"]:
        assert_declared(meta, listed, "subscription")
    assert_declared(meta, body_of(await client.get(f"/subscriptions/{sub['id']}")), "subscription")
    renewed = body_of(await client.patch(f"/subscriptions/{sub['id']}", json={"expirationDateTime": _soon(90)}))
    assert_declared(meta, renewed, "subscription")

    _delivered(emulator)
    assert receiver.wait_for(lambda r: bool(r.notifications))
    emulator.notifier.fire_lifecycle(emulator.store.get_subscription(sub["id"]) or {}, "reauthorizationRequired")
    assert receiver.wait_for(lambda r: bool(r.lifecycle))
    for path, _query, posted in receiver.posts:
        assert_declared(meta, posted, "changeNotificationCollection")
        assert path in ("/notify", "/lifecycle")


def _soon(minutes: int = 60) -> str:
    from datetime import UTC, datetime, timedelta

    return (datetime.now(UTC) + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_the_checker_catches_undeclared_names_types_and_enum_values(meta: Metadata) -> None:
    """The walker is not vacuous: each kind of deviation is reported."""
    assert violations(meta, {"id": "x", "sizeInBytes": 0}, "mailFolder") == [
        "$.sizeInBytes: not declared on mailFolder"]
    assert violations(meta, {"importance": "urgent"}, "message")
    assert violations(meta, {"isRead": "yes"}, "message")
    assert violations(meta, {"from": {"emailAddress": {"address": "a@b", "kind": "x"}}}, "message")
    assert violations(meta, {"@odata.type": "#microsoft.graph.mailFolder"}, "attachment")
    assert violations(meta, {"id": "x", "size": None}, "fileAttachment")  # size is Nullable="false"
    assert not violations(meta, {"resourceData": {"id": "x", "@odata.type": "#Microsoft.Graph.Message"}},
                          "changeNotification")
    assert meta.source["repository"] == "microsoftgraph/msgraph-metadata"
    assert meta.source["path"] == "schemas/v1.0-Prod.csdl" and len(meta.source["commit"]) == 40
