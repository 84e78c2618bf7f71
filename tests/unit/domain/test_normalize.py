from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.domain.model import FolderKind, Importance
from core.domain.normalize import (
    LIMITS,
    InvalidMessage,
    extract_message_ids,
    normalize_graph_message,
    normalize_mime_message,
)


def graph_message(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": "AAMk-1",
        "internetMessageId": "<m1@fabrikam.com>",
        "subject": "Order 1234",
        "from": {"emailAddress": {"name": "Carol Jones", "address": "Carol@Fabrikam.com"}},
        "sender": {"emailAddress": {"name": "Carol Jones", "address": "carol@fabrikam.com"}},
        "toRecipients": [{"emailAddress": {"name": "Alice", "address": "ALICE@contoso.com"}}],
        "ccRecipients": [],
        "receivedDateTime": "2026-03-02T12:00:00Z",
        "sentDateTime": "2026-03-02T11:59:58.1234567Z",
        "body": {"contentType": "html", "content": "<p>Hi</p>"},
        "importance": "high",
        "isDraft": False,
        "conversationId": "conv-1",
        "conversationIndex": base64.b64encode(bytes(27)).decode(),
        "parentFolderId": "inbox-id",
        "categories": ["Blue"],
        "internetMessageHeaders": [
            {"name": "In-Reply-To", "value": "<p1@contoso.com>"},
            {"name": "References", "value": "<p0@contoso.com> <p1@contoso.com>"},
        ],
    }
    data.update(overrides)
    return data


def test_normalizes_the_documented_fields() -> None:
    m = normalize_graph_message("Alice@Contoso.com", graph_message(), FolderKind.INBOX)
    assert m.mailbox == "alice@contoso.com"
    assert m.folder.kind is FolderKind.INBOX and m.folder.folder_id == "inbox-id"
    assert m.from_ is not None and m.from_.address == "carol@fabrikam.com" and m.from_.name == "Carol Jones"
    assert [a.address for a in m.to] == ["alice@contoso.com"]
    assert m.received_at == datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
    assert m.sent_at == datetime(2026, 3, 2, 11, 59, 58, 123456, tzinfo=UTC)
    assert m.importance is Importance.HIGH
    assert m.conversation_index == bytes(27)
    assert m.in_reply_to == "<p1@contoso.com>"
    assert m.references == ("<p0@contoso.com>", "<p1@contoso.com>")
    assert m.headers.get("in-reply-to") == "<p1@contoso.com>"  # case-insensitive lookup
    assert m.body_html == "<p>Hi</p>" and m.body_text is None
    assert m.truncations == ()


def test_in_reply_to_from_mapi_property_when_headers_lack_it() -> None:
    data = graph_message(internetMessageHeaders=[], singleValueExtendedProperties=[
        {"id": "String 0x1042", "value": "<p9@x.com>"}, {"id": "String 0x1039", "value": "<p8@x.com> <p9@x.com>"}])
    m = normalize_graph_message("alice@contoso.com", data, FolderKind.INBOX)
    assert m.in_reply_to == "<p9@x.com>"
    assert m.references == ("<p8@x.com>", "<p9@x.com>")


def test_file_and_item_attachments() -> None:
    inner = graph_message(id="", internetMessageId="<orig@x.com>", subject="Original")
    data = graph_message(attachments=[
        {"@odata.type": "#microsoft.graph.fileAttachment", "name": "a.pdf", "contentType": "application/pdf",
         "size": 3, "isInline": False, "contentBytes": base64.b64encode(b"pdf").decode()},
        {"@odata.type": "#microsoft.graph.itemAttachment", "name": "Original", "size": 999, "item": inner},
        {"@odata.type": "#microsoft.graph.fileAttachment", "name": "logo.png", "contentType": "image/png",
         "isInline": True, "contentId": "<logo@1>", "contentBytes": base64.b64encode(b"png").decode()},
    ])
    m = normalize_graph_message("alice@contoso.com", data, FolderKind.INBOX)
    pdf, item, logo = m.attachments
    assert pdf.content == b"pdf" and not pdf.is_item
    assert item.item is not None and item.item.internet_message_id == "<orig@x.com>" and item.item.graph_id == ""
    assert logo.is_inline and logo.content_id == "logo@1"


def test_rfc822_file_attachment_becomes_an_item() -> None:
    raw = (b"From: Carol <carol@fabrikam.com>\r\nTo: alice@contoso.com\r\nSubject: Original\r\n"
           b"Message-ID: <orig@fabrikam.com>\r\nDate: Mon, 2 Mar 2026 10:00:00 +0000\r\n"
           b"In-Reply-To: <p1@contoso.com>\r\nContent-Type: text/plain\r\n\r\nbody\r\n")
    data = graph_message(attachments=[{"@odata.type": "#microsoft.graph.fileAttachment", "name": "fw.eml",
                                       "contentType": "message/rfc822",
                                       "contentBytes": base64.b64encode(raw).decode()}])
    m = normalize_graph_message("sink@contoso.com", data, FolderKind.INBOX)
    item = m.attachments[0].item
    assert item is not None
    assert item.internet_message_id == "<orig@fabrikam.com>"
    assert item.from_ is not None and item.from_.address == "carol@fabrikam.com"
    assert item.in_reply_to == "<p1@contoso.com>"
    assert item.body_text is not None and "body" in item.body_text


def test_mime_message_with_html_and_attachment() -> None:
    raw = (b"From: a@x.com\r\nTo: b@y.com, c@y.com\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
           b"Message-ID: <z@x.com>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=BB\r\n\r\n"
           b"--BB\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<b>hi</b>\r\n"
           b"--BB\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=a.pdf\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\ncGRm\r\n--BB--\r\n")
    m = normalize_mime_message("b@y.com", raw)
    assert m.subject == "Grüße"
    assert [a.address for a in m.to] == ["b@y.com", "c@y.com"]
    assert m.body_html is not None and "<b>hi</b>" in m.body_html
    assert m.attachments[0].name == "a.pdf" and m.attachments[0].content == b"pdf"


@pytest.mark.parametrize(
    ("overrides", "note"),
    [
        ({"subject": "x" * 5000}, "subject: truncated"),
        ({"toRecipients": [{"emailAddress": {"address": f"u{i}@x.com"}} for i in range(600)]}, "capped at 500"),
        ({"conversationIndex": "!!not base64!!"}, "conversationIndex: invalid base64"),
        ({"receivedDateTime": "yesterday"}, "receivedDateTime: unusable date"),
        ({"from": {"emailAddress": {"address": "not an address"}}}, "from: unusable address dropped"),
        ({"toRecipients": "alice@contoso.com"}, "toRecipients: not a list"),
        ({"internetMessageHeaders": [{"name": "X", "value": "v"}] * 400}, "internetMessageHeaders: capped"),
    ],
)
def test_odd_fields_are_dropped_and_recorded(overrides: dict[str, Any], note: str) -> None:
    m = normalize_graph_message("alice@contoso.com", graph_message(**overrides), FolderKind.INBOX)
    assert any(note in t for t in m.truncations), m.truncations
    assert len(m.subject) <= LIMITS.max_subject_chars
    assert len(m.to) <= LIMITS.max_recipients_per_field


def test_nesting_is_bounded() -> None:
    data: dict[str, Any] = graph_message(id="")
    for _ in range(LIMITS.max_nesting_depth + 3):
        data = graph_message(id="", attachments=[{"@odata.type": "#microsoft.graph.itemAttachment", "item": data}])
    data["id"] = "top"
    m = normalize_graph_message("alice@contoso.com", data, FolderKind.INBOX)
    depth = 0
    current = m
    while current.attachments and current.attachments[0].item is not None:
        current = current.attachments[0].item
        depth += 1
    assert depth == LIMITS.max_nesting_depth
    assert any("nesting deeper" in t for t in m.truncations)


@pytest.mark.parametrize("data", [None, [], "text", 42])
def test_non_objects_are_invalid(data: Any) -> None:
    with pytest.raises(InvalidMessage, match="not a JSON object"):
        normalize_graph_message("alice@contoso.com", data, FolderKind.INBOX)


@pytest.mark.parametrize("graph_id", [None, "", "   ", 17])
def test_top_level_message_needs_an_id(graph_id: Any) -> None:
    with pytest.raises(InvalidMessage, match="Graph id"):
        normalize_graph_message("alice@contoso.com", graph_message(id=graph_id), FolderKind.INBOX)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ()),
        ("<a@x> <b@y>", ("<a@x>", "<b@y>")),
        ("a@x", ("<a@x>",)),
        ("garbage", ()),
        (" ".join(f"<r{i}@x>" for i in range(150)), tuple(f"<r{i}@x>" for i in range(50, 150))),
    ],
)
def test_extract_message_ids(value: str | None, expected: tuple[str, ...]) -> None:
    assert extract_message_ids(value) == expected


# ---- hostile input: never crash, always bounded ---------------------------------------------------------------

_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=50))
_json = st.recursive(_json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)), max_leaves=30)
_address_obj = st.fixed_dictionaries({"emailAddress": st.fixed_dictionaries(
    {"name": st.one_of(st.none(), st.text(max_size=30)), "address": st.one_of(st.none(), st.text(max_size=40),
                                                                            st.emails())})})
_graph_fields = st.fixed_dictionaries(
    {"id": st.text(min_size=1, max_size=20).filter(str.strip)},
    optional={
        "internetMessageId": st.one_of(_json, st.text(max_size=80)),
        "subject": st.one_of(_json, st.text(max_size=3000)),
        "from": st.one_of(_json, _address_obj),
        "sender": st.one_of(_json, _address_obj),
        "toRecipients": st.one_of(_json, st.lists(st.one_of(_address_obj, _json), max_size=20)),
        "ccRecipients": _json,
        "receivedDateTime": st.one_of(_json, st.datetimes().map(lambda d: d.isoformat())),
        "sentDateTime": _json,
        "body": st.one_of(_json, st.fixed_dictionaries({"contentType": st.sampled_from(["html", "text", "x"]),
                                                        "content": st.text(max_size=200)})),
        "conversationIndex": st.one_of(_json, st.binary(max_size=60).map(lambda b: base64.b64encode(b).decode())),
        "internetMessageHeaders": st.one_of(_json, st.lists(st.fixed_dictionaries(
            {"name": st.text(max_size=30), "value": st.text(max_size=100)}), max_size=30)),
        "attachments": st.one_of(_json, st.lists(st.fixed_dictionaries({
            "@odata.type": st.sampled_from(["#microsoft.graph.fileAttachment", "#microsoft.graph.itemAttachment",
                                            "#microsoft.graph.referenceAttachment", ""]),
            "name": _json, "contentType": st.one_of(st.just("message/rfc822"), _json), "size": _json,
            "contentBytes": st.one_of(_json, st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode())),
            "item": _json}), max_size=4)),
        "importance": _json,
        "isDraft": _json,
        "categories": _json,
        "singleValueExtendedProperties": _json,
    },
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(_graph_fields, st.sampled_from(list(FolderKind)))
def test_hostile_graph_json_never_crashes_and_stays_bounded(data: dict[str, Any], kind: FolderKind) -> None:
    m = normalize_graph_message("alice@contoso.com", data, kind)
    assert len(m.subject) <= LIMITS.max_subject_chars
    assert "\n" not in m.subject and "\r" not in m.subject
    assert all(len(f) <= LIMITS.max_recipients_per_field for f in (m.to, m.cc, m.bcc, m.reply_to))
    assert all(a.address == a.address.lower() and "@" in a.address for a in m.recipients())
    assert len(m.headers) <= LIMITS.max_headers
    assert len(m.attachments) <= LIMITS.max_attachments
    assert len(m.references) <= LIMITS.max_references
    assert m.received_at is None or m.received_at.tzinfo is not None


@settings(max_examples=200)
@given(st.binary(max_size=2000))
def test_hostile_mime_never_crashes(data: bytes) -> None:
    try:
        m = normalize_mime_message("alice@contoso.com", data)
    except InvalidMessage:
        return
    assert len(m.subject) <= LIMITS.max_subject_chars


def test_loop_marker_from_the_header_or_the_sent_items_property() -> None:
    from core.domain.model import LOOP_MARKER_HEADER, LOOP_MARKER_PROPERTY

    header = normalize_graph_message("alice@contoso.com", graph_message(internetMessageHeaders=[
        {"name": LOOP_MARKER_HEADER.upper(), "value": " 1234 "}]), FolderKind.INBOX)
    assert header.loop_marker == "1234"
    # a Sent Items copy: no internetMessageHeaders at all, the draft's MAPI property instead
    sent = graph_message(singleValueExtendedProperties=[{"id": LOOP_MARKER_PROPERTY.lower(), "value": "5678"}])
    del sent["internetMessageHeaders"]
    assert normalize_graph_message("alice@contoso.com", sent, FolderKind.SENT_ITEMS).loop_marker == "5678"
    assert normalize_graph_message("alice@contoso.com", graph_message(), FolderKind.INBOX).loop_marker is None


def test_in_reply_to_and_references_from_mapi_properties_when_headers_are_absent() -> None:
    data = graph_message(singleValueExtendedProperties=[
        {"id": "String 0x1042", "value": "<p9@contoso.com>"},
        {"id": "String 0x1039", "value": "<p8@contoso.com> <p9@contoso.com>"}])
    del data["internetMessageHeaders"]
    message = normalize_graph_message("alice@contoso.com", data, FolderKind.SENT_ITEMS)
    assert message.in_reply_to == "<p9@contoso.com>"
    assert message.references == ("<p8@contoso.com>", "<p9@contoso.com>")


def test_attached_message_is_read_from_its_mime_with_every_header() -> None:
    index = base64.b64encode(bytes(range(22)) + bytes(5)).decode()
    raw = ("From: Erin <erin@example.org>\r\nTo: dave@contoso.com\r\nSubject: Re: quote\r\n"
           "Message-ID: <o1@example.org>\r\nIn-Reply-To: <q1@contoso.com>\r\nAuto-Submitted: auto-replied\r\n"
           f"Thread-Index: {index}\r\nx-emailrouter-activityid: 42\r\nContent-Type: text/plain\r\n\r\nbody").encode()
    wrapper = graph_message(attachments=[
        {"@odata.type": "#microsoft.graph.itemAttachment", "id": "a1", "name": "Re: quote", "size": 10,
         "item": {"@odata.type": "#microsoft.graph.message", "id": "", "subject": "Re: quote"}}])
    message = normalize_graph_message("crm-sink@contoso.com", wrapper, FolderKind.INBOX,
                                      attached_mime={"a1": raw})
    item = message.attachments[0].item
    assert item is not None and item.internet_message_id == "<o1@example.org>"
    assert item.in_reply_to == "<q1@contoso.com>" and item.headers.get("Auto-Submitted") == "auto-replied"
    assert item.conversation_index == base64.b64decode(index) and item.loop_marker == "42"
    without = normalize_graph_message("crm-sink@contoso.com", wrapper, FolderKind.INBOX)
    assert without.attachments[0].item is not None and without.attachments[0].item.in_reply_to is None


def test_attachments_past_the_cap_are_counted() -> None:
    from core.domain.normalize import LIMITS, normalize_graph_message, normalize_mime_message

    files = [{"@odata.type": "#microsoft.graph.fileAttachment", "id": f"a{i}", "name": f"f{i}.txt",
              "contentType": "text/plain", "size": 1, "contentBytes": "eA=="}
             for i in range(LIMITS.max_attachments + 78)]
    graph = normalize_graph_message("a@x.example", {"id": "g1", "attachments": files}, FolderKind.INBOX)
    assert len(graph.attachments) == LIMITS.max_attachments
    assert "attachments: capped at 250 (78 more not saved)" in graph.truncations

    from email.message import EmailMessage

    mime = EmailMessage()
    mime["From"], mime["To"], mime["Subject"], mime["Message-ID"] = "a@x.example", "b@x.example", "many", "<m@x>"
    mime.set_content("body")
    for i in range(LIMITS.max_attachments + 3):
        mime.add_attachment(b"x", maintype="application", subtype="octet-stream", filename=f"f{i}.bin")
    parsed = normalize_mime_message("a@x.example", mime.as_bytes())
    assert len(parsed.attachments) == LIMITS.max_attachments and parsed.body_text == "body\n"
    assert "attachments: capped at 250 (3 more not saved)" in parsed.truncations


def test_an_undecodable_body_is_read_and_noted() -> None:
    from core.domain.normalize import normalize_mime_message

    raw = (b"From: a@x.example\r\nTo: b@x.example\r\nSubject: s\r\nMessage-ID: <m@x>\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\ncaf\xe9 \xff\r\n")
    parsed = normalize_mime_message("a@x.example", raw)
    assert parsed.body_text is not None and parsed.body_text.startswith("caf\ufffd")
    assert any(n.startswith("body: bytes not valid in its charset 'utf-8'") for n in parsed.truncations)
    unknown = raw.replace(b"charset=utf-8", b"charset=x-no-such-charset")
    parsed = normalize_mime_message("a@x.example", unknown)
    assert any("unknown charset 'x-no-such-charset'" in n for n in parsed.truncations)
    fine = normalize_mime_message("a@x.example", raw.replace(b"caf\xe9 \xff", b"cafe"))
    assert not fine.truncations
