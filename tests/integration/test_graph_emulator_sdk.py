"""msgraph-sdk (the pinned version) against the Graph emulator, with real tokens from msal + the identity emulator.

Every Graph operation the router performs goes through the SDK's request builders, serialisation, auth
provider and default middleware (retry handler included), as in production: only the base URL and the
credentials differ (reference/graph.md §10.1).
"""

# The emulators run on their own threads, so the short blocking control calls (/_emulator, the receiver's
# polls) cannot starve them; only the SDK calls under test need the event loop.
# ruff: noqa: ASYNC212

from __future__ import annotations

import asyncio
import base64
import os
import ssl
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import msal
import pytest
from kiota_abstractions.authentication import (
    AccessTokenProvider,
    AllowedHostsValidator,
    BaseBearerTokenAuthenticationProvider,
)
from kiota_abstractions.base_request_configuration import RequestConfiguration
from msgraph import GraphServiceClient
from msgraph.generated.models.body_type import BodyType
from msgraph.generated.models.email_address import EmailAddress
from msgraph.generated.models.file_attachment import FileAttachment
from msgraph.generated.models.internet_message_header import InternetMessageHeader
from msgraph.generated.models.item_attachment import ItemAttachment
from msgraph.generated.models.item_body import ItemBody
from msgraph.generated.models.message import Message
from msgraph.generated.models.o_data_errors.o_data_error import ODataError
from msgraph.generated.models.recipient import Recipient
from msgraph.generated.models.subscription import Subscription
from msgraph.generated.users.item.mail_folders.item.messages.delta.delta_request_builder import DeltaRequestBuilder
from msgraph.generated.users.item.messages.item.attachments.item.attachment_item_request_builder import (
    AttachmentItemRequestBuilder,
)
from msgraph.generated.users.item.messages.item.message_item_request_builder import MessageItemRequestBuilder
from msgraph.generated.users.item.send_mail.send_mail_post_request_body import SendMailPostRequestBody
from msgraph.graph_request_adapter import GraphRequestAdapter
from msgraph_core import GraphClientFactory

from emulators.common import demo
from emulators.common.server import RunningServer
from emulators.common.tls import ensure_tls
from emulators.graph.testing import RunningGraph, WebhookReceiver, start_graph, start_webhook_receiver
from emulators.identity.testing import start_identity

pytestmark = [
    pytest.mark.integration,
    # msgraph-sdk 1.65's own request builders use its deprecated configuration classes internally
    pytest.mark.filterwarnings("ignore:This class is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:GetQueryParameters is deprecated:DeprecationWarning"),
]

DOMAIN = demo.TENANT_DOMAIN
ALICE, BOB, SINK = f"alice@{DOMAIN}", f"bob@{DOMAIN}", f"crm-sink@{DOMAIN}"


class MsalTokenProvider(AccessTokenProvider):
    """The production shape (graph.md §10.1): msal client credentials, off the event loop."""

    def __init__(self, app: msal.ConfidentialClientApplication, hosts: list[str]) -> None:
        self._app = app
        self._hosts = AllowedHostsValidator(hosts)
        self.calls = 0

    async def get_authorization_token(self, uri: str, additional_authentication_context: dict[str, Any] | None = None
                                      ) -> str:
        if not self._hosts.is_url_host_valid(uri):
            return ""
        self.calls += 1
        result = await asyncio.to_thread(self._app.acquire_token_for_client,
                                         scopes=["https://graph.microsoft.com/.default"])
        if "access_token" not in result:
            raise RuntimeError(result.get("error_description") or result.get("error"))
        return str(result["access_token"])

    def get_allowed_hosts_validator(self) -> AllowedHostsValidator:
        return self._hosts


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("graph-sdk-tls")
    tls = ensure_tls(path)
    saved = {k: os.environ.get(k) for k in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")}
    os.environ["REQUESTS_CA_BUNDLE"] = os.environ["SSL_CERT_FILE"] = str(tls.bundle)  # msal's requests session
    yield path
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def identity(tls_dir: Path) -> Iterator[RunningServer]:
    server = start_identity(tls_dir)
    yield server
    server.stop()


@pytest.fixture
def graph(tls_dir: Path, identity: RunningServer) -> Iterator[RunningGraph]:
    g = start_graph(tls_dir, identity.url, missed_after_s=0.3, sweep_interval_s=0.1, min_subscription_minutes=0)
    yield g
    g.stop()


@pytest.fixture
def ssl_ctx(tls_dir: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ensure_tls(tls_dir).bundle))


@pytest.fixture
async def sdk(graph: RunningGraph, identity: RunningServer, ssl_ctx: ssl.SSLContext
              ) -> AsyncIterator[GraphServiceClient]:
    app = msal.ConfidentialClientApplication(demo.APP_CLIENT_ID, authority=f"{identity.url}/{demo.TENANT_ID}",
                                             client_credential=demo.APP_CLIENT_SECRET, instance_discovery=False)
    http = GraphClientFactory.create_with_default_middleware(
        client=httpx.AsyncClient(verify=ssl_ctx, http2=False, timeout=httpx.Timeout(60, connect=30)))
    adapter = GraphRequestAdapter(BaseBearerTokenAuthenticationProvider(MsalTokenProvider(app, ["127.0.0.1"])),
                                  client=http)
    adapter.base_url = graph.base_url
    yield GraphServiceClient(request_adapter=adapter)
    await http.aclose()


@pytest.fixture
def emu(graph: RunningGraph, ssl_ctx: ssl.SSLContext) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{graph.url}/_emulator", verify=ssl_ctx, timeout=30) as c:
        yield c


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    r = start_webhook_receiver()
    yield r
    r.stop()


def deliver(emu: httpx.Client, raw: bytes, to: list[str]) -> None:
    r = emu.post("/deliver", json={"from": "erin@example.org", "to": to, "raw": base64.b64encode(raw).decode()})
    assert r.status_code == 202, r.text


def mail(subject: str, *, attach: bytes | None = None, forward: EmailMessage | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Erin <erin@example.org>"
    msg["To"] = ALICE
    msg["Subject"] = subject
    msg["X-Source"] = "sdk-test"
    msg.set_content(f"{subject} body")
    if attach is not None:
        msg.add_attachment(attach, maintype="application", subtype="octet-stream", filename="data.bin")
    if forward is not None:
        msg.add_attachment(forward)
    return msg.as_bytes()


async def test_get_message_select_expand_attachments_and_mime(sdk: GraphServiceClient, emu: httpx.Client) -> None:
    original = EmailMessage()
    original["From"] = "orig@example.org"
    original["To"] = ALICE
    original["Subject"] = "original"
    original["Message-ID"] = "<orig@example.org>"
    original.set_content("inner")
    deliver(emu, mail("with attachments", attach=b"\x00\x01binary", forward=original), [ALICE])
    user = sdk.users.by_user_id(ALICE)
    listing = await user.mail_folders.by_mail_folder_id("inbox").messages.get()
    assert listing is not None and listing.value is not None and len(listing.value) == 1
    mid = listing.value[0].id
    assert mid is not None
    rc = RequestConfiguration(query_parameters=MessageItemRequestBuilder.MessageItemRequestBuilderGetQueryParameters(
        select=["id", "subject", "internetMessageId", "internetMessageHeaders", "from", "body", "conversationIndex"],
        expand=["attachments"]))
    rc.headers.add("Prefer", 'outlook.body-content-type="text"')
    msg = await user.messages.by_message_id(mid).get(rc)
    assert msg is not None and msg.subject == "with attachments"
    assert msg.from_ is not None and msg.from_.email_address is not None
    assert msg.from_.email_address.address == "erin@example.org"
    assert msg.body is not None and msg.body.content_type == BodyType.Text
    assert any(h.name == "X-Source" and h.value == "sdk-test" for h in msg.internet_message_headers or [])
    assert isinstance(msg.conversation_index, bytes) and len(msg.conversation_index) >= 22
    files = [a for a in msg.attachments or [] if isinstance(a, FileAttachment)]
    items = [a for a in msg.attachments or [] if isinstance(a, ItemAttachment)]
    assert [f.content_bytes for f in files] == [b"\x00\x01binary"] and len(items) == 1
    arc = RequestConfiguration(
        query_parameters=AttachmentItemRequestBuilder.AttachmentItemRequestBuilderGetQueryParameters(
            expand=["microsoft.graph.itemAttachment/item"]))
    item_id = items[0].id
    assert item_id is not None
    item = await user.messages.by_message_id(mid).attachments.by_attachment_id(item_id).get(arc)
    assert isinstance(item, ItemAttachment) and isinstance(item.item, Message)
    assert item.item.internet_message_id == "<orig@example.org>"
    mime = await user.messages.by_message_id(mid).content.get()
    assert mime is not None and b"with attachments" in mime
    atts = await user.messages.by_message_id(mid).attachments.get()
    assert atts is not None and {type(a) for a in atts.value or []} == {FileAttachment, ItemAttachment}
    patched = await user.messages.by_message_id(mid).patch(Message(is_read=True, categories=["Tracked"]))
    assert patched is not None and patched.is_read is True and patched.categories == ["Tracked"]


async def test_delta_to_delta_link_then_only_new_changes(sdk: GraphServiceClient, emu: httpx.Client) -> None:
    for i in range(5):
        deliver(emu, mail(f"delta {i}"), [ALICE])
    folder = sdk.users.by_user_id(ALICE).mail_folders.by_mail_folder_id("inbox")
    rc = RequestConfiguration(query_parameters=DeltaRequestBuilder.DeltaRequestBuilderGetQueryParameters(
        select=["id", "subject", "internetMessageId"]))
    rc.headers.add("Prefer", 'IdType="ImmutableId"')
    rc.headers.add("Prefer", "odata.maxpagesize=2")
    page = await folder.messages.delta.get(rc)
    seen: list[str] = []
    pages = 0
    while True:
        assert page is not None
        pages += 1
        seen += [m.subject or "" for m in page.value or []]
        if page.odata_delta_link:
            delta_link = page.odata_delta_link
            break
        assert page.odata_next_link
        page = await folder.messages.delta.with_url(page.odata_next_link).get()
    assert pages == 3 and sorted(seen) == [f"delta {i}" for i in range(5)]
    deliver(emu, mail("delta new"), [ALICE])
    later = await folder.messages.delta.with_url(delta_link).get()
    assert later is not None and [m.subject for m in later.value or []] == ["delta new"]
    assert later.odata_delta_link and later.odata_delta_link != delta_link
    doomed = (later.value or [])[0].id
    assert doomed is not None
    await sdk.users.by_user_id(ALICE).messages.by_message_id(doomed).delete()
    gone = await folder.messages.delta.with_url(later.odata_delta_link).get()
    assert gone is not None and [(m.id, m.additional_data.get("@removed")) for m in gone.value or []] == [
        (doomed, {"reason": "deleted"})]
    with pytest.raises(ODataError) as err:
        await folder.messages.delta.with_url(delta_link.split("$deltatoken=")[0] + "$deltatoken=bogus").get()
    assert err.value.response_status_code == 410 and err.value.error is not None
    assert err.value.error.code == "syncStateNotFound"


async def test_subscription_lifecycle_via_sdk(sdk: GraphServiceClient, emu: httpx.Client,
                                              receiver: WebhookReceiver) -> None:
    alice = await sdk.users.by_user_id(ALICE).get()
    assert alice is not None and alice.id
    created = await sdk.subscriptions.post(Subscription(
        change_type="created,updated", notification_url=f"{receiver.url}/notify?code=abc",
        lifecycle_notification_url=f"{receiver.url}/lifecycle",
        resource=f"users/{ALICE}/mailFolders('Inbox')/messages",
        expiration_date_time=datetime.now(UTC) + timedelta(days=2), client_state="secret",
        latest_supported_tls_version="v1_2"))
    assert created is not None and created.id and created.application_id == demo.APP_CLIENT_ID
    assert len(receiver.validations) == 2
    deliver(emu, mail("watched"), [ALICE])
    assert receiver.wait_for(lambda r: len(r.notifications) == 1)
    note = receiver.notifications[0]
    assert note["subscriptionId"] == created.id and note["clientState"] == "secret"
    assert note["resource"].startswith(f"Users/{alice.id}/Messages/")
    msg = await sdk.users.by_user_id(ALICE).messages.by_message_id(note["resourceData"]["id"]).get()
    assert msg is not None and msg.subject == "watched"
    renewed = await sdk.subscriptions.by_subscription_id(created.id).patch(
        Subscription(expiration_date_time=datetime.now(UTC) + timedelta(days=3)))
    assert renewed is not None and renewed.expiration_date_time is not None
    assert created.expiration_date_time is not None and renewed.expiration_date_time > created.expiration_date_time
    await sdk.subscriptions.by_subscription_id(created.id).reauthorize.post()
    listed = await sdk.subscriptions.get()
    assert listed is not None and [s.id for s in listed.value or []] == [created.id]
    assert emu.post("/notification-faults", json={"action": "drop", "count": 1}).status_code == 201
    deliver(emu, mail("dropped"), [ALICE])
    assert receiver.wait_for(lambda r: [x["lifecycleEvent"] for x in r.lifecycle] == ["missed"])
    assert len(receiver.notifications) == 1
    await sdk.subscriptions.by_subscription_id(created.id).delete()
    with pytest.raises(ODataError) as err:
        await sdk.subscriptions.by_subscription_id(created.id).get()
    assert err.value.response_status_code == 404


async def test_send_mail_and_draft_send(sdk: GraphServiceClient, emu: httpx.Client) -> None:
    alice = sdk.users.by_user_id(ALICE)
    await alice.send_mail.post(SendMailPostRequestBody(message=Message(
        subject="from sdk", body=ItemBody(content="<p>x</p>", content_type=BodyType.Html),
        to_recipients=[Recipient(email_address=EmailAddress(address=BOB)),
                       Recipient(email_address=EmailAddress(address="partner@example.org"))],
        internet_message_headers=[InternetMessageHeader(name="X-Crm-Track", value="abc")],
        attachments=[FileAttachment(name="a.txt", content_type="text/plain", content_bytes=b"hello")]),
        save_to_sent_items=True))
    bob_inbox = await sdk.users.by_user_id(BOB).mail_folders.by_mail_folder_id("inbox").messages.get()
    assert bob_inbox is not None and [m.subject for m in bob_inbox.value or []] == ["from sdk"]
    assert bob_inbox.value is not None and bob_inbox.value[0].has_attachments is True
    sent = await alice.mail_folders.by_mail_folder_id("sentitems").messages.get()
    assert sent is not None and [m.subject for m in sent.value or []] == ["from sdk"]
    assert [o["to"] for o in emu.get("/outbox").json()] == [["partner@example.org"]]
    rc = RequestConfiguration()
    rc.headers.add("Prefer", 'IdType="ImmutableId"')
    draft = await alice.messages.post(Message(subject="draft", to_recipients=[
        Recipient(email_address=EmailAddress(address=BOB))], body=ItemBody(content="d", content_type=BodyType.Text)),
        rc)
    assert draft is not None and draft.id and draft.is_draft is True and draft.internet_message_id
    await alice.messages.by_message_id(draft.id).attachments.post(
        FileAttachment(name="b.txt", content_type="text/plain", content_bytes=b"world"))
    await alice.messages.by_message_id(draft.id).send.post()
    after = await alice.messages.by_message_id(draft.id).get(rc)
    assert after is not None and after.is_draft is False
    got = await sdk.users.by_user_id(BOB).messages.get()
    assert got is not None
    assert draft.internet_message_id in {m.internet_message_id for m in got.value or []}


async def test_retry_after_honoured_by_sdk_retry_handler(sdk: GraphServiceClient, emu: httpx.Client) -> None:
    r = emu.post("/faults", json={"method": "GET", "path": "/mailFolders/inbox$", "status": 429, "retry_after": 1,
                                  "count": 2})
    assert r.status_code == 201
    emu.delete("/requests")
    folder = await sdk.users.by_user_id(ALICE).mail_folders.by_mail_folder_id("inbox").get()
    assert folder is not None and folder.display_name == "Inbox"
    log = [e for e in emu.get("/requests").json()["value"] if e["path"].endswith("/mailFolders/inbox")]
    assert [e["status"] for e in log] == [429, 429, 200]


async def test_errors_surface_as_odata_errors(sdk: GraphServiceClient, emu: httpx.Client) -> None:
    with pytest.raises(ODataError) as err:
        await sdk.users.by_user_id(ALICE).messages.by_message_id("AAMkAGnope=").get()
    assert err.value.response_status_code == 404 and err.value.error is not None
    assert err.value.error.code == "ErrorItemNotFound"
    assert err.value.error.inner_error is not None and err.value.error.inner_error.request_id
    emu.post("/access-policy", json={"app_id": demo.APP_CLIENT_ID, "allowed": [BOB]}).raise_for_status()
    with pytest.raises(ODataError) as err:
        await sdk.users.by_user_id(ALICE).messages.get()
    assert err.value.response_status_code == 403 and err.value.error is not None
    assert err.value.error.code == "ErrorAccessDenied"


async def test_forward_as_attachment_rule_via_sdk(sdk: GraphServiceClient, emu: httpx.Client) -> None:
    from msgraph.generated.models.message_rule import MessageRule
    from msgraph.generated.models.message_rule_actions import MessageRuleActions

    rule = await sdk.users.by_user_id(ALICE).mail_folders.by_mail_folder_id("inbox").message_rules.post(MessageRule(
        display_name="forward to CRM", sequence=1, is_enabled=True,
        actions=MessageRuleActions(forward_as_attachment_to=[Recipient(email_address=EmailAddress(address=SINK))],
                                   stop_processing_rules=True)))
    assert rule is not None and rule.id
    deliver(emu, mail("for the CRM"), [ALICE])
    sink = await sdk.users.by_user_id(SINK).mail_folders.by_mail_folder_id("inbox").messages.get()
    assert sink is not None and sink.value and sink.value[0].id
    wrapper_id = sink.value[0].id
    atts = await sdk.users.by_user_id(SINK).messages.by_message_id(wrapper_id).attachments.get()
    assert atts is not None and atts.value and isinstance(atts.value[0], ItemAttachment) and atts.value[0].id
    arc = RequestConfiguration(
        query_parameters=AttachmentItemRequestBuilder.AttachmentItemRequestBuilderGetQueryParameters(
            expand=["microsoft.graph.itemAttachment/item"]))
    item = await sdk.users.by_user_id(SINK).messages.by_message_id(wrapper_id).attachments.by_attachment_id(
        atts.value[0].id).get(arc)
    assert isinstance(item, ItemAttachment) and isinstance(item.item, Message)
    assert item.item.subject == "for the CRM"
    assert not item.item.internet_message_headers  # default properties only: headers need $select or $value
    # .../attachments/{id}/$value (not generated as a builder for attachments): the SDK's own adapter, raw bytes
    from kiota_abstractions.method import Method
    from kiota_abstractions.request_information import RequestInformation

    ri = RequestInformation()
    ri.http_method = Method.GET
    ri.url = f"{sdk.request_adapter.base_url}/users/{SINK}/messages/{wrapper_id}/attachments/{atts.value[0].id}/$value"
    mime = await sdk.request_adapter.send_primitive_async(ri, "bytes", {})
    assert mime is not None and b"X-Source: sdk-test" in mime
