"""Spoofed forward-mailbox wrappers are never tracked as someone else (issue 10).

The sink is a public address: anyone can mail it a message/rfc822 attachment claiming to be "forwarded by Dave".
Wrappers go through the real normaliser (Graph JSON and raw MIME) and plan_inbound for the sink; only a wrapper
that passes every trust rule of core/domain/forward.py is tracked, and then only for the user it came from.
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.domain.inbound import InboundContext, Skip, TrackEmail, plan_inbound
from core.domain.model import (
    CrmRecordRef,
    CrmTable,
    FolderKind,
    InboundMethod,
    MailboxConfig,
    MailboxKind,
    OrgEmailSettings,
    TrackingFilter,
)
from core.domain.normalize import normalize_graph_message, normalize_mime_message

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
SINK = MailboxConfig(address="crm-sink@contoso.example", kind=MailboxKind.FORWARD_SINK, delete_after_processing=True)
OTHER_SINK = "other-sink@contoso.example"


def user(name: str, n: int, **overrides: Any) -> MailboxConfig:
    values: dict[str, Any] = {"address": f"{name}@contoso.example", "kind": MailboxKind.USER,
                              "owner": CrmRecordRef(CrmTable.SYSTEMUSER, uuid.UUID(int=n)),
                              "mailbox_id": uuid.UUID(int=9000 + n), "inbound_method": InboundMethod.FORWARD,
                              "tracking_filter": TrackingFilter.ALL, "forward_sink_address": SINK.address}
    values.update(overrides)
    return MailboxConfig(**values)


DAVE = user("dave", 4)
ERIN = user("erin", 5, forward_sink_address=OTHER_SINK)  # forwards, but to another sink
FRANK = user("frank", 6, inbound_method=InboundMethod.INDIVIDUAL)  # not a forward user
GINA = user("gina", 7, enabled_for_incoming=False)
FORWARD_USERS = {u.address: u for u in (DAVE, ERIN, FRANK, GINA)}
ORG = OrgEmailSettings(internal_domains=frozenset({"contoso.example"}))
CTX = InboundContext(mailbox=SINK, org=ORG, now=NOW, forward_users=FORWARD_USERS)
INTERNAL = {"name": "X-MS-Exchange-Organization-AuthAs", "value": "Internal"}


def original() -> dict[str, Any]:
    return {"subject": "Order 1234", "internetMessageId": f"<{uuid.uuid4()}@fabrikam.example>",
            "from": {"emailAddress": {"address": "carol@fabrikam.example", "name": "Carol"}},
            "toRecipients": [{"emailAddress": {"address": "dave@contoso.example"}}],
            "receivedDateTime": "2026-03-02T11:59:00Z", "body": {"contentType": "html", "content": "<p>hi</p>"}}


def wrapper(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": "wrap-1", "subject": "FW: Order 1234", "internetMessageId": f"<{uuid.uuid4()}@contoso.example>",
        "from": {"emailAddress": {"address": DAVE.address, "name": "Dave"}},
        "sender": {"emailAddress": {"address": DAVE.address, "name": "Dave"}},
        "toRecipients": [{"emailAddress": {"address": SINK.address}}],
        "receivedDateTime": "2026-03-02T12:00:00Z", "internetMessageHeaders": [INTERNAL],
        "attachments": [{"@odata.type": "#microsoft.graph.itemAttachment", "name": "Order 1234",
                         "item": original()}],
    }
    data.update(overrides)
    return data


def plan_for(data: dict[str, Any], folder: FolderKind = FolderKind.INBOX, ctx: InboundContext = CTX) -> Any:
    return plan_inbound(normalize_graph_message(SINK.address, data, folder), ctx)


def test_a_genuine_wrapper_is_tracked_for_its_forwarder() -> None:
    plan = plan_for(wrapper())
    assert isinstance(plan, TrackEmail)
    assert plan.mailbox_address == DAVE.address and plan.owner == DAVE.owner
    assert plan.receiving_mailbox_id == DAVE.mailbox_id and plan.wrapper_graph_id == "wrap-1"


def _from(address: str, name: str = "") -> dict[str, Any]:
    return {"emailAddress": {"address": address, "name": name}}


SPOOFS: dict[str, tuple[dict[str, Any], str]] = {
    "from outside the tenant (AuthAs Anonymous)": (
        {"internetMessageHeaders": [{"name": "X-MS-Exchange-Organization-AuthAs", "value": "Anonymous"}]},
        "external"),
    "no AuthAs header at all": ({"internetMessageHeaders": []}, "external"),
    "AuthAs hidden in another header's value": (
        {"internetMessageHeaders": [{"name": "X-Note", "value": "X-MS-Exchange-Organization-AuthAs: Internal"}]},
        "external"),
    "SPF fails": ({"internetMessageHeaders": [INTERNAL, {"name": "Authentication-Results",
                                                         "value": "spf=fail smtp.mailfrom=contoso.example"}]},
                  "spoofed"),
    "DMARC fails (odd spacing, case)": ({"internetMessageHeaders": [INTERNAL, {
        "name": "authentication-results", "value": "mx.contoso.example;  DMARC=Fail  action=none"}]}, "spoofed"),
    "compauth fails": ({"internetMessageHeaders": [INTERNAL, {"name": "Authentication-Results",
                                                              "value": "compauth=fail reason=000"}]}, "spoofed"),
    "Sender differs from From": ({"sender": _from("mallory@evil.example", "Dave")}, "spoofed"),
    "display name claims Dave": ({"from": _from("mallory@evil.example", "dave@contoso.example"),
                                  "sender": _from("mallory@evil.example")}, "stranger"),
    "homoglyph address": ({"from": _from("d\u0430ve@contoso.example"), "sender": None}, "stranger"),
    "plain mail in the sink": ({"attachments": []}, "no_original"),
    "only a file attached": ({"attachments": [{"@odata.type": "#microsoft.graph.fileAttachment", "name": "a.pdf",
                                               "contentBytes": "JVBERi0="}]}, "no_original"),
    "two originals": ({"attachments": [{"@odata.type": "#microsoft.graph.itemAttachment", "item": original()},
                                       {"@odata.type": "#microsoft.graph.itemAttachment", "item": original()}]},
                      "multiple_originals"),
    "forwarder configured for another sink": ({"from": _from(ERIN.address), "sender": _from(ERIN.address)},
                                              "wrong_sink"),
    "user not on Forward": ({"from": _from(FRANK.address), "sender": _from(FRANK.address)}, "not_forward_user"),
    "user disabled for incoming": ({"from": _from(GINA.address), "sender": _from(GINA.address)}, "user_disabled"),
    "not a forward user at all": ({"from": _from("alice@contoso.example"), "sender": _from("alice@contoso.example")},
                                  "stranger"),
    "no From": ({"from": None, "sender": None}, "no_sender"),
}


@pytest.mark.parametrize("case", sorted(SPOOFS))
def test_spoofed_wrapper_is_not_tracked(case: str) -> None:
    overrides, code = SPOOFS[case]
    plan = plan_for(wrapper(**overrides))
    assert isinstance(plan, Skip), case
    assert plan.stage == "unwrap" and plan.code == code and plan.why.strip(), (case, plan.code, plan.why)


@pytest.mark.parametrize("folder", [FolderKind.JUNK, FolderKind.SENT_ITEMS, FolderKind.OTHER, FolderKind.DRAFTS])
def test_wrappers_outside_the_sink_inbox_are_not_tracked(folder: FolderKind) -> None:
    plan = plan_for(wrapper(), folder)
    assert isinstance(plan, Skip) and plan.code == "not_in_inbox"


def test_forwarder_not_configured_at_all_for_any_sink() -> None:
    ctx = InboundContext(mailbox=SINK, org=ORG, now=NOW, forward_users={})
    plan = plan_for(wrapper(), ctx=ctx)
    assert isinstance(plan, Skip) and plan.code == "stranger"


def test_a_spoofed_mime_wrapper_from_the_internet_is_not_tracked() -> None:
    """The same attack as raw MIME (what arrives over SMTP): no AuthAs stamp, message/rfc822 attached."""
    inner = (b"From: Carol <carol@fabrikam.example>\r\nTo: dave@contoso.example\r\nSubject: Order\r\n"
             b"Message-ID: <inner@fabrikam.example>\r\n\r\nhi\r\n")
    raw = (b"From: Dave <dave@contoso.example>\r\nTo: crm-sink@contoso.example\r\nSubject: FW: Order\r\n"
           b"Message-ID: <w@evil.example>\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
           b"Content-Type: text/plain\r\n\r\nsee attached\r\n--b\r\nContent-Type: message/rfc822\r\n\r\n"
           + inner + b"\r\n--b--\r\n")
    message = normalize_mime_message(SINK.address, raw)
    from dataclasses import replace

    from core.domain.model import Folder

    plan = plan_inbound(replace(message, graph_id="w", folder=Folder(FolderKind.INBOX)), CTX)
    assert isinstance(plan, Skip) and plan.code == "external"
    # ...and an attacker who also forges the organisation header in the MIME is still caught by SPF.
    forged = raw.replace(b"Subject: FW", b"X-MS-Exchange-Organization-AuthAs: Internal\r\n"
                         b"Authentication-Results: mx; spf=fail\r\nSubject: FW")
    message = normalize_mime_message(SINK.address, forged)
    plan = plan_inbound(replace(message, graph_id="w", folder=Folder(FolderKind.INBOX)), CTX)
    assert isinstance(plan, Skip) and plan.code == "spoofed"


def test_an_eml_file_attachment_is_unwrapped_under_the_same_rules() -> None:
    inner = (b"From: carol@fabrikam.example\r\nTo: dave@contoso.example\r\nSubject: Order\r\n"
             b"Message-ID: <eml@fabrikam.example>\r\n\r\nhi\r\n")
    eml = {"@odata.type": "#microsoft.graph.fileAttachment", "name": "Order.eml", "contentType": "message/rfc822",
           "contentBytes": base64.b64encode(inner).decode()}
    assert isinstance(plan_for(wrapper(attachments=[eml])), TrackEmail)
    spoofed = plan_for(wrapper(attachments=[eml], internetMessageHeaders=[]))
    assert isinstance(spoofed, Skip) and spoofed.code == "external"


# ------------------------------------------------------------------------------------------ generated

ADDRESSES = [DAVE.address, ERIN.address, FRANK.address, GINA.address, "alice@contoso.example",
             "mallory@evil.example", "DAVE@contoso.example", " dave@contoso.example "]
HEADER_SETS = [[INTERNAL], [], [{"name": "X-MS-Exchange-Organization-AuthAs", "value": "Anonymous"}],
               [INTERNAL, {"name": "Authentication-Results", "value": "dkim=fail"}],
               [INTERNAL, {"name": "Authentication-Results", "value": "spf=pass dkim=pass dmarc=pass"}],
               [{"name": "x-ms-exchange-organization-authas", "value": " internal "}]]


@pytest.mark.slow
@settings(max_examples=600, deadline=None, derandomize=True, database=None)
@given(from_=st.sampled_from(ADDRESSES), sender=st.sampled_from([*ADDRESSES, None]),
       headers=st.sampled_from(range(len(HEADER_SETS))), n_items=st.integers(0, 2),
       folder=st.sampled_from([FolderKind.INBOX, FolderKind.INBOX, FolderKind.JUNK]))
def test_generated_wrappers_are_tracked_only_for_a_trusted_forwarder(from_: str, sender: str | None, headers: int,
                                                                    n_items: int, folder: FolderKind) -> None:
    attachments = [{"@odata.type": "#microsoft.graph.itemAttachment", "item": original()} for _ in range(n_items)]
    data = wrapper(**{"from": _from(from_), "sender": _from(sender) if sender else None,
                      "internetMessageHeaders": HEADER_SETS[headers], "attachments": attachments})
    plan = plan_for(data, folder)
    origin = from_.strip().lower()
    trusted = (folder is FolderKind.INBOX and (sender is None or sender.strip().lower() == origin)
               and headers in (0, 4, 5) and origin == DAVE.address and n_items == 1)
    if isinstance(plan, TrackEmail):
        assert trusted, "tracked a wrapper that fails a trust rule"
        assert plan.mailbox_address == DAVE.address and plan.owner == DAVE.owner
    else:
        assert not trusted, f"a genuine wrapper was refused: {plan.code} {plan.why}"
        assert plan.stage == "unwrap" and plan.why.strip()
