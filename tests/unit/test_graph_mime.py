"""emulators.graph.mime: MIME <-> Graph message dicts, Thread-Index, hostile inputs."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.policy import default as default_policy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulators.graph import mime
from emulators.graph.mime import MimeLimits, MimeRejected, build_mime, parse_message

WHEN = datetime(2024, 3, 5, 14, 30, 0, tzinfo=UTC)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


def headers_of(parsed: dict[str, Any]) -> dict[str, str]:
    return {h["name"].lower(): h["value"] for h in parsed["internetMessageHeaders"]}


# ---------------------------------------------------------------------------------------------------------------
# header decoding


@pytest.mark.parametrize(("raw", "expected"), [
    ("=?UTF-8?B?R3LDvMOfZSBhdXMgS8O2bG4=?=", "Grüße aus Köln"),
    ("=?utf-8?q?Caf=C3=A9_cr=C3=A8me?=", "Café crème"),
    ("=?ISO-8859-1?Q?Re=3A_R=E9union_=E0_Paris?=", "Re: Réunion à Paris"),
    ("=?Shift_JIS?B?g2WDWINn?=", "テスト"),
    ("=?x-sjis?B?g2WDWINn?=", "テスト"),  # a label Python lacks, mapped to cp932
    ("=?ISO-2022-JP?B?GyRCJUYlOSVIGyhC?=", "テスト"),
    ("Hello =?utf-8?q?W=C3=B6rld?= !", "Hello Wörld !"),
    ("=?utf-8?q?a?= \r\n =?utf-8?q?b?=", "ab"),  # whitespace between adjacent encoded words is dropped
    ("=?utf-8?b?w7Z?=", "ö"),  # missing padding
    ("=?utf-8?b?w7*Z?= x", "ö x"),  # junk character inside base64
    ("=?x-no-such-charset?q?caf=C3=A9?=", "café"),  # unknown charset: UTF-8 guess
    ("=?bogus?q?caf=E9?=", "café"),  # unknown charset, not UTF-8: windows-1252
    ("plain\r\n folded value", "plain folded value"),
])
def test_header_decoding(raw: str, expected: str) -> None:
    assert mime.decode_header_value(raw) == expected


def test_raw_utf8_headers_are_decoded_even_next_to_encoded_words() -> None:
    raw = crlf("From: Jörg <j@example.de>\nSubject: Grüße =?utf-8?q?und_Tsch=C3=BCss?=\n\nbody\n")
    parsed = parse_message(raw)
    assert parsed["subject"] == "Grüße und Tschüss"
    assert parsed["from"] == {"emailAddress": {"name": "Jörg", "address": "j@example.de"}}


def test_raw_latin1_header_falls_back_to_windows_1252() -> None:
    raw = b"From: a@example.com\r\nSubject: caf\xe9\r\n\r\nbody\r\n"
    assert parse_message(raw)["subject"] == "café"


def test_addresses_groups_names_and_broken_entries() -> None:
    raw = crlf(
        "From: =?utf-8?q?M=C3=BCller=2C_J=C3=B6rg?= <jm@example.de>\n"
        "To: Team: a@example.com, \"Doe, John\" <jd@example.com>;, c@example.com\n"
        "Cc: undisclosed-recipients:;\n"
        "Bcc: =?ISO-8859-1?Q?Andr=E9?= <andre@example.fr>\n"
        "Reply-To: not an address\n"
        "Sender: Assistant <assistant@example.de>\n"
        "Subject: x\n\nbody\n")
    parsed = parse_message(raw)
    assert parsed["from"]["emailAddress"] == {"name": "Müller, Jörg", "address": "jm@example.de"}
    assert parsed["sender"]["emailAddress"] == {"name": "Assistant", "address": "assistant@example.de"}
    assert [r["emailAddress"]["address"] for r in parsed["toRecipients"]] == [
        "a@example.com", "jd@example.com", "c@example.com"]
    assert parsed["toRecipients"][1]["emailAddress"]["name"] == "Doe, John"
    assert parsed["ccRecipients"] == []
    assert parsed["bccRecipients"] == [{"emailAddress": {"name": "André", "address": "andre@example.fr"}}]
    assert parsed["replyTo"], "an unparseable address is kept as well as possible, not dropped"


@pytest.mark.parametrize(("headers", "expected"), [
    ("Importance: High", "high"),
    ("Importance: low", "low"),
    ("Importance: normal\nX-Priority: 1", "normal"),  # Importance wins
    ("X-Priority: 1 (Highest)", "high"),
    ("X-Priority: 2", "high"),
    ("X-Priority: 3", "normal"),
    ("X-Priority: 5 (Lowest)", "low"),
    ("X-MSMail-Priority: Low", "low"),
    ("Priority: urgent", "high"),
    ("Priority: non-urgent", "low"),
    ("Importance: bogus", "normal"),
    ("", "normal"),
])
def test_importance_mapping(headers: str, expected: str) -> None:
    head = f"{headers}\n" if headers else ""
    raw = crlf(f"From: a@example.com\nSubject: x\n{head}\nbody\n")
    assert parse_message(raw)["importance"] == expected


def test_ids_dates_and_threading_headers() -> None:
    index = mime.make_thread_index(None, WHEN)
    refs = " ".join(f"<r{i}@example.com>" for i in range(150))
    raw = crlf(
        "From: a@example.com\nSubject: Re: x\nMessage-ID: <abc@example.com>\n"
        "Date: Tue, 05 Mar 2024 15:30:00 +0100\n"
        "In-Reply-To: <r149@example.com> (Bob's message)\n"
        f"References: {refs}\nThread-Index: {index}\n\nbody\n")
    parsed = parse_message(raw)
    assert parsed["internetMessageId"] == "<abc@example.com>"
    assert parsed["sentDateTime"] == "2024-03-05T14:30:00Z"
    assert parsed["inReplyTo"] == "<r149@example.com>"
    assert len(parsed["references"]) == 100
    assert parsed["references"][0] == "<r0@example.com>"  # the thread root is kept
    assert parsed["references"][-1] == "<r149@example.com>"
    assert parsed["conversationIndex"] == index


def test_missing_message_id_is_generated_deterministically() -> None:
    raw = crlf("From: a@example.com\nSubject: no id\nDate: not a date\n\nbody\n")
    first, second = parse_message(raw), parse_message(raw)
    assert re.fullmatch(r"<[0-9a-f]{32}@emulator\.local>", first["internetMessageId"])
    assert first["internetMessageId"] == second["internetMessageId"]
    assert first["sentDateTime"] is None
    assert first["subject"] == "no id"
    assert parse_message(crlf("From: a@example.com\n\nx\n"))["subject"] == ""


def test_message_id_without_brackets_gets_them() -> None:
    parsed = parse_message(crlf("From: a@example.com\nMessage-ID: bare@example.com\n\nx\n"))
    assert parsed["internetMessageId"] == "<bare@example.com>"


def test_headers_are_all_kept_in_order_and_decoded() -> None:
    raw = crlf("Received: from a by b\nReceived: from c by d\nFrom: a@example.com\n"
               "Subject: =?utf-8?q?h=C3=A9?=\nX-Custom: one\n  two\n\nbody\n")
    parsed = parse_message(raw)
    assert [(h["name"], h["value"]) for h in parsed["internetMessageHeaders"]] == [
        ("Received", "from a by b"), ("Received", "from c by d"), ("From", "a@example.com"),
        ("Subject", "hé"), ("X-Custom", "one  two")]


# ---------------------------------------------------------------------------------------------------------------
# bodies and attachments


def test_text_only_body_and_preview() -> None:
    text = "Hello   there,\n\n  this is\ta test. " + "x" * 400
    parsed = parse_message(crlf(f"From: a@example.com\nSubject: t\n\n{text}"))
    assert parsed["body"]["contentType"] == "text"
    assert parsed["body"]["content"].startswith("Hello   there,")
    assert parsed["bodyPreview"].startswith("Hello there, this is a test. xxx")
    assert len(parsed["bodyPreview"]) == 255
    assert parsed["hasAttachments"] is False
    assert parsed["attachments"] == []


def test_multipart_alternative_prefers_html_and_previews_the_text_part() -> None:
    raw = crlf(
        "From: a@example.com\nSubject: alt\nMIME-Version: 1.0\n"
        'Content-Type: multipart/alternative; boundary="ALT"\n\n'
        "--ALT\nContent-Type: text/plain; charset=utf-8\n\nPlain   version\n"
        "--ALT\nContent-Type: text/html; charset=utf-8\n\n<html><body><p>HTML <b>version</b></p></body></html>\n"
        "--ALT--\n")
    parsed = parse_message(raw)
    assert parsed["body"]["contentType"] == "html"
    assert "<b>version</b>" in parsed["body"]["content"]
    assert parsed["bodyPreview"] == "Plain version"
    assert parsed["attachments"] == []


def test_html_only_preview_is_derived_from_html() -> None:
    raw = crlf("From: a@example.com\nSubject: h\nContent-Type: text/html; charset=utf-8\n\n"
               "<html><head><style>p {color: red}</style><title>T</title></head>"
               "<body><p>First&nbsp;line</p><script>evil()</script><div>Second &amp; last</div></body></html>")
    parsed = parse_message(raw)
    assert parsed["body"]["contentType"] == "html"
    assert parsed["bodyPreview"] == "First line Second & last"  # nbsp collapses too


def test_charsets_and_transfer_encodings() -> None:
    latin = "Grüße".encode("iso-8859-1")
    raw = (b"From: a@example.com\r\nSubject: c\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
           b"--B\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
           + latin + b"\r\n"
           b"--B\r\nContent-Type: text/plain; charset=shift_jis\r\nContent-Transfer-Encoding: base64\r\n"
           b"Content-Disposition: attachment; filename=\"=?utf-8?b?44OG44K544OI?=.txt\"\r\n\r\n"
           + base64.b64encode("テスト".encode("shift_jis")) + b"\r\n--B--\r\n")
    parsed = parse_message(raw)
    assert parsed["body"]["content"].strip() == "Grüße"
    (att,) = parsed["attachments"]
    assert att["name"] == "テスト.txt"
    assert base64.b64decode(att["contentBytes"]).decode("shift_jis") == "テスト"


def test_rfc2231_filename_and_unnamed_parts() -> None:
    raw = crlf(
        "From: a@example.com\nSubject: f\nContent-Type: multipart/mixed; boundary=B\n\n"
        "--B\nContent-Type: text/plain\n\nbody\n"
        "--B\nContent-Type: application/pdf\nContent-Disposition: attachment; filename*=utf-8''r%C3%A9sum%C3%A9.pdf\n"
        "Content-Transfer-Encoding: base64\n\nJVBERi0xLjQK\n"
        "--B\nContent-Type: text/plain\n\nsecond text part (Exchange makes it ATT00001.txt)\n"
        "--B--\n")
    parsed = parse_message(raw)
    names = [a["name"] for a in parsed["attachments"]]
    assert names == ["résumé.pdf", "ATT00001.txt"]
    assert base64.b64decode(parsed["attachments"][0]["contentBytes"]) == b"%PDF-1.4\n"
    assert parsed["attachments"][0]["size"] == 9
    assert parsed["hasAttachments"] is True


def test_inline_images_in_related_are_inline_and_do_not_count_as_attachments() -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
    raw = crlf(
        "From: a@example.com\nSubject: img\nContent-Type: multipart/related; boundary=R\n\n"
        "--R\nContent-Type: text/html; charset=utf-8\n\n<p>logo:<img src=\"cid:logo@x\"></p>\n"
        "--R\nContent-Type: image/png\nContent-ID: <logo@x>\nContent-Transfer-Encoding: base64\n\n"
        f"{b64(png)}\n"
        "--R\nContent-Type: image/gif\nContent-Transfer-Encoding: base64\n\nR0lGODlh\n"  # related but no cid
        "--R--\n")
    parsed = parse_message(raw)
    logo, other = parsed["attachments"]
    assert logo["isInline"] is True and logo["contentId"] == "logo@x"
    assert base64.b64decode(logo["contentBytes"]) == png
    assert logo["name"] == "ATT00001.png"
    assert other["isInline"] is False and other["contentId"] is None
    assert parsed["hasAttachments"] is True
    only_inline = parse_message(raw.split(b"--R\r\nContent-Type: image/gif")[0] + b"--R--\r\n")
    assert only_inline["hasAttachments"] is False


def test_attachment_ids_are_stable_and_unique() -> None:
    raw = crlf(
        "From: a@example.com\nSubject: ids\nContent-Type: multipart/mixed; boundary=B\n\n"
        "--B\nContent-Type: text/plain\n\nbody\n"
        "--B\nContent-Type: application/octet-stream\nContent-Disposition: attachment; filename=a.bin\n\nsame\n"
        "--B\nContent-Type: application/octet-stream\nContent-Disposition: attachment; filename=a.bin\n\nsame\n"
        "--B--\n")
    one, two = parse_message(raw), parse_message(raw)
    ids = [a["id"] for a in one["attachments"]]
    assert ids == [a["id"] for a in two["attachments"]]
    assert len(set(ids)) == 2


def _forward(original: bytes, subject: str = "Fw: original") -> bytes:
    return (crlf(f"From: fwd@example.com\nTo: sink@contoso.com\nSubject: {subject}\n"
                 "Content-Type: multipart/mixed; boundary=F\n\n"
                 "--F\nContent-Type: text/plain\n\nsee attached\n"
                 "--F\nContent-Type: message/rfc822\nContent-Disposition: attachment\n\n")
            + original + b"\r\n--F--\r\n")


def test_forwarded_message_becomes_an_item_attachment_with_its_headers() -> None:
    original = crlf(
        "Received: from mx.example.com\nFrom: Alice <alice@example.com>\nTo: bob@contoso.com\n"
        "Subject: =?utf-8?q?Angebot_f=C3=BCr_Q2?=\nMessage-ID: <orig-1@example.com>\n"
        "In-Reply-To: <root@example.com>\nReferences: <root@example.com>\n"
        "Date: Mon, 04 Mar 2024 09:00:00 +0000\nContent-Type: text/html; charset=utf-8\n\n<p>Offer</p>\n")
    parsed = parse_message(_forward(original))
    assert parsed["body"]["content"].strip() == "see attached"
    (att,) = parsed["attachments"]
    assert att["@odata.type"] == "#microsoft.graph.itemAttachment"
    assert att["name"] == "Angebot für Q2"
    assert att["contentType"] == "message/rfc822"
    assert att["isInline"] is False and att["size"] > 0
    item = att["item"]
    assert item["@odata.type"] == "#microsoft.graph.message"
    assert item["internetMessageId"] == "<orig-1@example.com>"
    assert item["inReplyTo"] == "<root@example.com>"
    assert item["from"]["emailAddress"] == {"name": "Alice", "address": "alice@example.com"}
    assert item["sentDateTime"] == "2024-03-04T09:00:00Z"
    assert headers_of(item)["received"] == "from mx.example.com"
    assert item["body"] == {"contentType": "html", "content": "<p>Offer</p>\r\n"}
    assert parsed["hasAttachments"] is True


def test_broken_message_is_parsed_best_effort() -> None:
    raw = (b"From: a@example.com\r\nThis line has no colon\r\nSubject: broken\r\n"
           b"Content-Type: multipart/mixed; boundary=B\r\n\r\n"
           b"--B\r\nContent-Type: text/plain; charset=no-such-charset\r\n\r\ncaf\xc3\xa9\r\n"
           b"--B\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
           b"Content-Disposition: attachment; filename=x.pdf\r\n\r\nJVBERi0x!!!LjQK=\r\n"
           b"--B\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n"
           b"Content-Disposition: attachment; filename=q.txt\r\n\r\nbad =ZZ soft=\r\n")  # no closing boundary
    parsed = parse_message(raw)
    assert parsed["subject"] == "broken"  # the header after the colon-less line survives
    assert parsed["body"]["content"].strip() == "café"
    names = [a["name"] for a in parsed["attachments"]]
    assert names == ["x.pdf", "q.txt"]
    assert base64.b64decode(parsed["attachments"][0]["contentBytes"]).startswith(b"%PDF-1")


def test_delivery_status_and_external_body_are_file_attachments() -> None:
    raw = crlf(
        "From: postmaster@example.com\nSubject: Undeliverable\n"
        "Content-Type: multipart/report; report-type=delivery-status; boundary=R\n\n"
        "--R\nContent-Type: text/plain\n\nDelivery failed.\n"
        "--R\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.example.com\n\n"
        "Final-Recipient: rfc822; gone@example.com\nStatus: 5.1.1\n"
        "--R\nContent-Type: message/external-body; access-type=URL; URL=\"http://example.com/x\"\n\n"
        "Content-Type: application/pdf\n\n"
        "--R--\n")
    parsed = parse_message(raw)
    assert parsed["body"]["content"].strip() == "Delivery failed."
    status, external = parsed["attachments"]
    assert status["contentType"] == "message/delivery-status"
    assert b"Status: 5.1.1" in base64.b64decode(status["contentBytes"])
    assert external["contentType"] == "message/external-body"  # never fetched: nothing to follow


def test_multipart_without_boundary_is_kept_as_text() -> None:
    raw = crlf("From: a@example.com\nSubject: nb\nContent-Type: multipart/mixed\n\njust text\n")
    parsed = parse_message(raw)
    assert parsed["body"]["content"].strip() == "just text"


# ---------------------------------------------------------------------------------------------------------------
# rejection and hostile input (assert on results and caps, never on time)


@pytest.mark.parametrize(("raw", "reason"), [
    (b"", "empty"),
    (b"   \r\n\r\n", "empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not an RFC 5322 message"),
    (b'{"subject": "json is not mail"}', "not an RFC 5322 message"),
    (b"just some words\r\nand more words\r\n", "not an RFC 5322 message"),
])
def test_rejects_what_is_not_mail(raw: bytes, reason: str) -> None:
    with pytest.raises(MimeRejected) as info:
        parse_message(raw)
    assert reason in info.value.reason


def test_size_limit() -> None:
    raw = crlf("From: a@example.com\nSubject: big\n\n" + "x" * 5000)
    with pytest.raises(MimeRejected, match="exceeds the limit of 4096 bytes"):
        parse_message(raw, limits=MimeLimits(max_bytes=4096))
    assert parse_message(raw)["subject"] == "big"


def test_huge_header_is_rejected() -> None:
    raw = crlf("From: a@example.com\nX-Junk: " + "y " * 200_000 + "\nSubject: s\n\nbody\n")
    with pytest.raises(MimeRejected, match="header block exceeds"):
        parse_message(raw)
    no_body = crlf("From: a@example.com\nX-Junk: " + "y" * 300_000)
    with pytest.raises(MimeRejected, match="header block exceeds"):
        parse_message(no_body)


def test_one_megabyte_subject() -> None:
    subject = "S" * (1024 * 1024)
    raw = crlf(f"From: a@example.com\nSubject: {subject}\n\nbody\n")
    with pytest.raises(MimeRejected, match="header block"):
        parse_message(raw)
    parsed = parse_message(raw, limits=MimeLimits(max_header_bytes=2 * 1024 * 1024))
    assert parsed["subject"] == subject
    assert parsed["bodyPreview"] == "body"


def test_ten_thousand_recipients() -> None:
    to = ", ".join(f"u{i}@ex.io" for i in range(10_000))
    parsed = parse_message(crlf(f"From: a@example.com\nTo: {to}\nSubject: many\n\nbody\n"))
    assert len(parsed["toRecipients"]) == 10_000
    assert parsed["toRecipients"][9999]["emailAddress"]["address"] == "u9999@ex.io"


def _nested_multipart(levels: int) -> bytes:
    head = "".join(f'Content-Type: multipart/mixed; boundary="b{i}"\n\n--b{i}\n' for i in range(levels))
    tail = "".join(f"\n--b{i}--\n" for i in reversed(range(levels)))
    return crlf(f"From: a@example.com\nSubject: deep\n{head}Content-Type: text/plain\n\ninnermost{tail}")


def test_deep_multipart_nesting_100_levels_is_accepted_deeper_is_rejected() -> None:
    parsed = parse_message(_nested_multipart(100))
    assert parsed["body"]["content"].strip() == "innermost"
    with pytest.raises(MimeRejected, match="nesting"):
        parse_message(_nested_multipart(150))
    with pytest.raises(MimeRejected, match="more than 1000 MIME parts"):
        parse_message(_nested_multipart(3000))  # refused by the delimiter count, before the parser runs
    with pytest.raises(MimeRejected, match="nesting"):
        parse_message(_nested_messages(3000))  # no boundaries: the stdlib parser's recursion is caught cleanly


def _nested_messages(levels: int, *, same_id: bool = False) -> bytes:
    raw = crlf("From: a@example.com\nSubject: level 0\nMessage-ID: <loop@example.com>\n\ninnermost body\n")
    for level in range(1, levels + 1):
        msgid = "<loop@example.com>" if same_id else f"<m{level}@example.com>"
        raw = crlf(f"From: a@example.com\nSubject: level {level}\nMessage-ID: {msgid}\n"
                   f"References: {msgid}\nContent-Type: message/rfc822\n\n") + raw
    return raw


def _item_chain(parsed: dict[str, Any]) -> list[dict[str, Any]]:
    chain: list[dict[str, Any]] = []
    current = parsed
    while current["attachments"]:
        (att,) = current["attachments"]
        chain.append(att)
        if "item" not in att:
            break
        current = att["item"]
    return chain


def test_deep_message_nesting_caps_item_attachments_at_8() -> None:
    parsed = parse_message(_nested_messages(99))
    chain = _item_chain(parsed)
    assert [a["@odata.type"] for a in chain] == ["#microsoft.graph.itemAttachment"] * 8 + [
        "#microsoft.graph.fileAttachment"]
    eml = chain[-1]
    assert eml["contentType"] == "message/rfc822" and eml["name"].endswith(".eml")
    assert b"innermost body" in base64.b64decode(eml["contentBytes"])


def test_message_loops_by_reference_are_bounded() -> None:
    # Every level claims the same Message-ID and references itself: nothing is resolved, so nothing loops.
    parsed = parse_message(_nested_messages(60, same_id=True))
    chain = _item_chain(parsed)
    assert len(chain) == 9
    assert all(a["item"]["internetMessageId"] == "<loop@example.com>" for a in chain[:8])
    assert parsed["references"] == ["<loop@example.com>"]


def test_too_many_parts_rejected_before_parsing() -> None:
    parts = "".join(f"--B\nContent-Type: text/plain\n\npart {i}\n" for i in range(1200))
    raw = crlf(f"From: a@example.com\nSubject: parts\nContent-Type: multipart/mixed; boundary=B\n\n{parts}--B--\n")
    with pytest.raises(MimeRejected, match="more than 1000 MIME parts"):
        parse_message(raw)
    parsed = parse_message(raw, limits=MimeLimits(max_parts=5000))
    assert len(parsed["attachments"]) == 1199


def test_too_many_parts_counted_after_parsing_too() -> None:
    # message/rfc822 parts need no boundary, so only the post-parse count sees them.
    with pytest.raises(MimeRejected, match="more than 20 MIME parts"):
        parse_message(_nested_messages(30), limits=MimeLimits(max_parts=20))


# ---------------------------------------------------------------------------------------------------------------
# Thread-Index


def test_new_thread_index_layout() -> None:
    value = mime.make_thread_index(None, WHEN)
    data = base64.b64decode(value)
    assert len(data) == 22 and data[0] == 1
    decoded = mime.parse_thread_index(value)
    # 40-bit resolution: the header keeps FILETIME >> 24, i.e. ~1.68 s granularity.
    assert timedelta(0) <= WHEN - decoded.timestamp < timedelta(seconds=1.7)
    assert decoded.child_times == ()
    assert mime.make_thread_index(None, WHEN) != value  # a new GUID per conversation


def test_reply_thread_index_appends_child_blocks() -> None:
    root = mime.make_thread_index(None, WHEN)
    reply = mime.make_thread_index(root, WHEN + timedelta(minutes=5))
    reply2 = mime.make_thread_index(reply, WHEN + timedelta(hours=2))
    assert base64.b64decode(reply)[:22] == base64.b64decode(root)
    assert len(base64.b64decode(reply2)) == 32
    decoded = mime.parse_thread_index(reply2)
    assert decoded.guid == mime.parse_thread_index(root).guid
    # Child deltas are kept at 2^18 ticks (~26 ms) resolution, relative to the (truncated) header time.
    assert abs(decoded.child_times[0] - (WHEN + timedelta(minutes=5))) < timedelta(seconds=2)
    assert abs(decoded.child_times[1] - (WHEN + timedelta(hours=2))) < timedelta(seconds=2)


def test_thread_index_long_delta_uses_delta_code_1() -> None:
    root = mime.make_thread_index(None, WHEN)
    later = WHEN + timedelta(days=3 * 365)
    reply = mime.make_thread_index(root, later)
    child = base64.b64decode(reply)[22:]
    assert child[0] & 0x80  # DeltaCode bit
    assert abs(mime.parse_thread_index(reply).child_times[0] - later) < timedelta(seconds=2)


def test_thread_index_bad_input() -> None:
    with pytest.raises(ValueError):
        mime.parse_thread_index("not base64!")
    with pytest.raises(ValueError):
        mime.parse_thread_index(b64(b"\x01" * 23))  # not 22 + 5n bytes
    assert len(base64.b64decode(mime.make_thread_index("garbage", WHEN))) == 22  # unreadable parent: new thread
    raw = crlf("From: a@example.com\nThread-Index: %%%\n\nx\n")
    assert parse_message(raw)["conversationIndex"] is None


def test_make_message_id() -> None:
    value = mime.make_message_id("contoso.com")
    assert re.fullmatch(r"<[0-9A-F]{32}@contoso\.com>", value)
    assert value != mime.make_message_id("contoso.com")


# ---------------------------------------------------------------------------------------------------------------
# building


def _msg(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "subject": "Hello",
        "from": {"emailAddress": {"name": "Alice", "address": "alice@contoso.com"}},
        "toRecipients": [{"emailAddress": {"name": "Bob", "address": "bob@example.com"}}],
        "body": {"contentType": "text", "content": "hi"},
    }
    base.update(extra)
    return base


def test_build_writes_headers_and_omits_bcc() -> None:
    index = mime.make_thread_index(None, WHEN)
    raw = build_mime(_msg(
        subject="Grüße", bccRecipients=[{"emailAddress": {"name": "", "address": "secret@example.com"}}],
        ccRecipients=[{"emailAddress": {"name": "Carol", "address": "carol@example.com"}}],
        replyTo=[{"emailAddress": {"name": "", "address": "replies@contoso.com"}}],
        inReplyTo="<p@example.com>", references=["<r@example.com>", "<p@example.com>"], conversationIndex=index,
        importance="high", internetMessageHeaders=[{"name": "x-crm-tracking-id", "value": "CRM:0001"},
                                                   {"name": "Subject", "value": "ignored copy"}],
    ), message_id="<id-1@contoso.com>", date=WHEN, extra_headers=[("Received", "from a by b")])
    assert b"secret@example.com" not in raw
    assert raw.isascii()
    assert b"=?utf-8?" in raw
    msg = message_from_bytes(raw, policy=default_policy)
    assert raw.startswith(b"Received: from a by b\r\n")
    assert msg["Message-ID"] == "<id-1@contoso.com>"
    assert msg["Subject"] == "Grüße"
    assert msg["Cc"] == "Carol <carol@example.com>"
    assert msg["Reply-To"] == "replies@contoso.com"
    assert msg["In-Reply-To"] == "<p@example.com>"
    assert msg["References"] == "<r@example.com> <p@example.com>"
    assert msg["Thread-Index"] == index
    assert msg["Importance"] == "high"
    assert msg["x-crm-tracking-id"] == "CRM:0001"
    assert msg.get_all("Subject") == ["Grüße"]
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"] == "Tue, 05 Mar 2024 14:30:00 +0000"
    assert msg.get_content_type() == "text/plain"
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")


def test_build_normal_importance_writes_no_header() -> None:
    raw = build_mime(_msg(importance="normal"), message_id="<a@b>", date=WHEN)
    assert b"Importance" not in raw


def test_build_html_gets_a_text_alternative() -> None:
    raw = build_mime(_msg(body={"contentType": "html", "content": "<p>Hi <b>Bob</b></p><p>Second</p>"}),
                     message_id="<a@b>", date=WHEN)
    msg = message_from_bytes(raw, policy=default_policy)
    assert msg.get_content_type() == "multipart/alternative"
    plain, html = msg.get_payload()
    assert plain.get_content() == "Hi Bob\n\nSecond"
    assert html.get_content() == "<p>Hi <b>Bob</b></p><p>Second</p>"


def test_build_neutralises_header_injection() -> None:
    raw = build_mime(_msg(subject="Hi\r\nBcc: victim@example.com"), message_id="<a@b>", date=WHEN)
    msg = message_from_bytes(raw, policy=default_policy)
    assert msg["Bcc"] is None
    assert "victim@example.com" in msg["Subject"]


def test_build_rejects_invalid_input() -> None:
    with pytest.raises(ValueError, match="base64"):
        build_mime(_msg(attachments=[{"@odata.type": mime.FILE_ATTACHMENT, "name": "a", "contentBytes": "%%"}]),
                   message_id="<a@b>", date=WHEN)
    with pytest.raises(ValueError, match="not allowed"):
        build_mime(_msg(), message_id="<a@b>", date=WHEN, extra_headers=[("Content-Type", "text/html")])
    with pytest.raises(ValueError, match="invalid header name"):
        build_mime(_msg(internetMessageHeaders=[{"name": "x bad", "value": "v"}]), message_id="<a@b>", date=WHEN)


def test_build_inline_without_content_id_gets_one() -> None:
    att = {"@odata.type": mime.FILE_ATTACHMENT, "name": "i.png", "contentType": "image/png", "isInline": True,
           "contentBytes": b64(b"\x89PNG")}
    parsed = parse_message(build_mime(_msg(body={"contentType": "html", "content": "<p>x</p>"}, attachments=[att]),
                                      message_id="<a@b>", date=WHEN))
    (got,) = parsed["attachments"]
    assert got["isInline"] is True and got["contentId"].endswith("@emulator.local")


def test_build_keeps_a_message_rfc822_file_attachment_verbatim() -> None:
    inner = crlf("From: x@example.com\nSubject: inner\n\ninner body\n")
    att = {"@odata.type": mime.FILE_ATTACHMENT, "name": "inner.eml", "contentType": "message/rfc822",
           "contentBytes": b64(inner)}
    raw = build_mime(_msg(attachments=[att]), message_id="<a@b>", date=WHEN)
    assert inner in raw
    (got,) = parse_message(raw)["attachments"]
    assert got["@odata.type"] == mime.ITEM_ATTACHMENT and got["item"]["subject"] == "inner"


# ---------------------------------------------------------------------------------------------------------------
# round trip


def test_round_trip_full_message() -> None:
    png, pdf = b"\x89PNG\r\n\x1a\n\x00\x01", b"%PDF-1.7\n\x00\xff binary"
    original = _msg(
        subject="Angebot – 見積もり",
        body={"contentType": "html", "content": "<p>Hi</p>\r\n<img src=\"cid:logo\">\n"},
        ccRecipients=[{"emailAddress": {"name": "Zoë \"Z\" O'Neil", "address": "zoe@example.com"}}],
        attachments=[
            {"@odata.type": mime.FILE_ATTACHMENT, "name": "logo.png", "contentType": "image/png",
             "isInline": True, "contentId": "logo", "contentBytes": b64(png)},
            {"@odata.type": mime.FILE_ATTACHMENT, "name": "Prüfbericht 2024.pdf", "contentType": "application/pdf",
             "isInline": False, "contentBytes": b64(pdf)},
            {"@odata.type": mime.ITEM_ATTACHMENT, "name": "Original",
             "item": _msg(subject="Original", inReplyTo="<root@example.com>",
                          internetMessageId="<orig@example.com>",
                          internetMessageHeaders=[{"name": "X-Original-Tag", "value": "kept"}],
                          body={"contentType": "html", "content": "<b>original</b>"})},
        ],
    )
    parsed = parse_message(build_mime(original, message_id="<rt@contoso.com>", date=WHEN))
    assert parsed["subject"] == original["subject"]
    assert parsed["internetMessageId"] == "<rt@contoso.com>"
    assert parsed["from"] == original["from"]
    assert parsed["toRecipients"] == original["toRecipients"]
    assert parsed["ccRecipients"] == original["ccRecipients"]
    assert parsed["body"] == original["body"]
    assert parsed["bodyPreview"] == "Hi"
    logo, report, item = parsed["attachments"]
    assert (logo["name"], logo["isInline"], logo["contentId"]) == ("logo.png", True, "logo")
    assert base64.b64decode(logo["contentBytes"]) == png
    assert (report["name"], report["isInline"], base64.b64decode(report["contentBytes"])) == (
        "Prüfbericht 2024.pdf", False, pdf)
    assert item["@odata.type"] == mime.ITEM_ATTACHMENT and item["name"] == "Original"
    assert item["item"]["internetMessageId"] == "<orig@example.com>"
    assert item["item"]["inReplyTo"] == "<root@example.com>"
    assert headers_of(item["item"])["x-original-tag"] == "kept"
    assert item["item"]["body"] == {"contentType": "html", "content": "<b>original</b>"}
    assert parsed["hasAttachments"] is True


# Display names: the RFC 5322 phrase semantics collapse whitespace runs, so generate names without them.
_name = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Zs")), max_size=12).map(str.strip)
_names = st.lists(_name, min_size=1, max_size=3).map(" ".join)
_local = st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,10}[a-z0-9]", fullmatch=True).filter(lambda s: ".." not in s)
_address = st.builds(lambda local, d: f"{local}@{d}.example", _local, st.from_regex(r"[a-z]{1,10}", fullmatch=True))
_recipient = st.builds(lambda n, a: {"emailAddress": {"name": n, "address": a}}, _names, _address)
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)
_subject = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=120).map(
    lambda s: " ".join(s.split()))
_filename = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"), blacklist_characters="/\\"),
                    min_size=1, max_size=40).map(lambda s: " ".join(s.split())).filter(bool)
_file = st.builds(
    lambda name, data, inline, cid: {"@odata.type": mime.FILE_ATTACHMENT, "name": name,
                                     "contentType": "application/octet-stream", "isInline": inline,
                                     "contentId": f"c{cid}@x" if inline else None, "contentBytes": b64(data)},
    _filename, st.binary(max_size=300), st.booleans(), st.integers(0, 10**6))


def _item_attachment(subject: str) -> dict[str, Any]:
    return {"@odata.type": mime.ITEM_ATTACHMENT, "name": subject,
            "item": _msg(subject=subject, body={"contentType": "html", "content": "<i>inner</i>"},
                         internetMessageHeaders=[{"name": "X-Inner", "value": subject or "none"}])}


@st.composite
def _messages(draw: st.DrawFn) -> dict[str, Any]:
    files = draw(st.lists(_file, max_size=4))
    items = [_item_attachment(s) for s in draw(st.lists(_subject.filter(bool), max_size=2))]
    return {
        "subject": draw(_subject),
        "from": draw(_recipient),
        "toRecipients": draw(st.lists(_recipient, min_size=1, max_size=4)),
        "ccRecipients": draw(st.lists(_recipient, max_size=3)),
        "body": {"contentType": draw(st.sampled_from(["html", "text"])), "content": draw(_text)},
        "importance": draw(st.sampled_from(["low", "normal", "high"])),
        "attachments": files + items,
    }


def _norm(name: str) -> str:
    return " ".join(name.split())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_messages())
def test_round_trip_property(message: dict[str, Any]) -> None:
    raw = build_mime(message, message_id="<prop@contoso.com>", date=WHEN)
    parsed = parse_message(raw)
    assert parsed["subject"] == message["subject"]
    assert parsed["importance"] == message["importance"]
    for key in ("toRecipients", "ccRecipients"):
        assert [(_norm(r["emailAddress"]["name"]), r["emailAddress"]["address"]) for r in parsed[key]] == [
            (_norm(r["emailAddress"]["name"]), r["emailAddress"]["address"]) for r in message[key]]
    assert parsed["from"]["emailAddress"]["address"] == message["from"]["emailAddress"]["address"]
    assert parsed["body"] == message["body"]
    files = [a for a in message["attachments"] if a["@odata.type"] == mime.FILE_ATTACHMENT]
    items = [a for a in message["attachments"] if a["@odata.type"] == mime.ITEM_ATTACHMENT]
    got_files = [a for a in parsed["attachments"] if a["@odata.type"] == mime.FILE_ATTACHMENT]
    got_items = [a for a in parsed["attachments"] if a["@odata.type"] == mime.ITEM_ATTACHMENT]
    # build_mime groups inline parts before regular ones (multipart/related), so compare as multisets.
    want = sorted((f["name"], f["contentBytes"], f["isInline"], f["contentId"]) for f in files)
    have = sorted((f["name"], f["contentBytes"], f["isInline"], f["contentId"]) for f in got_files)
    assert have == want
    assert [i["name"] for i in got_items] == [i["name"] for i in items]
    for got, sent in zip(got_items, items, strict=True):
        assert got["item"]["subject"] == sent["item"]["subject"]
        assert headers_of(got["item"])["x-inner"] == sent["item"]["internetMessageHeaders"][0]["value"]
        assert got["item"]["body"] == sent["item"]["body"]
    assert parsed["hasAttachments"] == any(not a.get("isInline") for a in message["attachments"])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_parse_never_raises_anything_but_mime_rejected(raw: bytes) -> None:
    try:
        parsed = parse_message(b"From: a@example.com\r\n" + raw)
    except MimeRejected:
        return
    assert isinstance(parsed["body"]["content"], str)
    assert len(parsed["bodyPreview"]) <= 255


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([
    b"Content-Type: multipart/mixed; boundary=B\r\n", b"--B\r\n", b"--B--\r\n", b"\r\n",
    b"Content-Type: message/rfc822\r\n", b"Content-Transfer-Encoding: base64\r\n", b"=?utf-8?b?w7Z?=\r\n",
    b"Content-Type: text/html; charset=bogus\r\n", b"Subject: =?x?q?=ZZ?=\r\n", b"\xff\xfe\x00garbage\r\n",
    b"Content-Disposition: attachment; filename*=bad''%ZZ\r\n", b"Content-ID: <a>\r\n",
]), max_size=40))
def test_parse_structured_garbage(chunks: list[bytes]) -> None:
    try:
        parsed = parse_message(b"From: a@example.com\r\nSubject: g\r\n" + b"".join(chunks))
    except MimeRejected:
        return
    assert parsed["subject"] is not None
    for att in mime.iter_attachments(parsed):
        assert att["size"] >= 0
