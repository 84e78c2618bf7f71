"""Inbound SMTP for the Graph emulator: smtplib against a real SmtpListener whose deliver() parses and stores."""

from __future__ import annotations

import base64
import smtplib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from typing import Any

import pytest

from emulators.graph.mime import MimeLimits, MimeRejected, parse_message
from emulators.graph.smtp import SmtpListener, SmtpRelayError, relay

pytestmark = pytest.mark.integration

DOMAIN = "contoso.com"
SMALL = MimeLimits(max_bytes=64 * 1024)  # limits for small@contoso.com, to exercise an over-limit rejection


@dataclass
class Mailstore:
    delivered: list[tuple[str, list[str], dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def accepts(self, address: str) -> bool:
        return address.lower().endswith("@" + DOMAIN) and not address.lower().startswith("nobody@")

    def deliver(self, envelope_from: str, rcpts: list[str], raw: bytes) -> None:
        if "boom@contoso.com" in rcpts:
            raise RuntimeError("store unavailable")
        parsed = parse_message(raw, limits=SMALL if "small@contoso.com" in rcpts else MimeLimits())
        with self.lock:
            self.delivered.append((envelope_from, rcpts, parsed))

    def last(self) -> dict[str, Any]:
        with self.lock:
            return self.delivered[-1][2]


@pytest.fixture
def store() -> Mailstore:
    return Mailstore()


@pytest.fixture
def listener(store: Mailstore) -> Iterator[SmtpListener]:
    smtp = SmtpListener("127.0.0.1", 0, accepts_recipient=store.accepts, deliver=store.deliver)
    smtp.start()
    try:
        yield smtp
    finally:
        smtp.stop()


def send(listener: SmtpListener, raw: bytes, rcpts: list[str] | None = None, sender: str = "ext@fabrikam.com") -> None:
    with smtplib.SMTP("127.0.0.1", listener.port, timeout=30) as client:
        refused = client.sendmail(sender, rcpts or [f"alice@{DOMAIN}"], raw)
        assert refused == {}


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


def test_port_zero_binds_a_free_port_and_advertises_extensions(listener: SmtpListener) -> None:
    assert listener.port > 0
    with smtplib.SMTP("127.0.0.1", listener.port, timeout=30) as client:
        code, _ = client.ehlo()
        assert code == 250
        assert client.has_extn("size") and int(client.esmtp_features["size"]) == 150 * 1024 * 1024
        assert client.has_extn("8bitmime") and client.has_extn("smtputf8")


def test_plain_text(listener: SmtpListener, store: Mailstore) -> None:
    raw = crlf("From: Ext <ext@fabrikam.com>\nTo: alice@contoso.com\nSubject: plain\n"
               "Message-ID: <p1@fabrikam.com>\n\nHello Alice\n")
    send(listener, raw, rcpts=["alice@contoso.com", "bob@contoso.com"])
    envelope_from, rcpts, parsed = store.delivered[-1]
    assert envelope_from == "ext@fabrikam.com"
    assert rcpts == ["alice@contoso.com", "bob@contoso.com"]
    assert parsed["subject"] == "plain"
    assert parsed["internetMessageId"] == "<p1@fabrikam.com>"
    assert parsed["body"] == {"contentType": "text", "content": "Hello Alice\r\n"}


def test_html_only(listener: SmtpListener, store: Mailstore) -> None:
    send(listener, crlf("From: ext@fabrikam.com\nTo: alice@contoso.com\nSubject: html\n"
                        "Content-Type: text/html; charset=utf-8\n\n<p>Hello <b>Alice</b></p>\n"))
    parsed = store.last()
    assert parsed["body"]["contentType"] == "html"
    assert "<b>Alice</b>" in parsed["body"]["content"]
    assert parsed["bodyPreview"] == "Hello Alice"


def test_multipart_alternative_with_attachment_and_inline_image(listener: SmtpListener, store: Mailstore) -> None:
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF"
    png = b"\x89PNG\r\n\x1a\n" + b"\x00IHDR" + bytes(100)
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["From"] = "Ext <ext@fabrikam.com>"
    msg["To"] = "alice@contoso.com"
    msg["Subject"] = "Quarterly report"
    msg.set_content("Report attached.\n")
    msg.add_alternative('<p>Report attached.</p><img src="cid:chart@fabrikam">\n', subtype="html")
    msg.get_payload()[1].add_related(png, "image", "png", cid="<chart@fabrikam>", filename="chart.png",
                                     disposition="inline")
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="report Q1.pdf")
    send(listener, msg.as_bytes())
    parsed = store.last()
    assert parsed["body"]["contentType"] == "html"
    assert "cid:chart@fabrikam" in parsed["body"]["content"]
    assert parsed["bodyPreview"] == "Report attached."
    chart, report = parsed["attachments"]
    assert (chart["name"], chart["isInline"], chart["contentId"], chart["contentType"]) == (
        "chart.png", True, "chart@fabrikam", "image/png")
    assert base64.b64decode(chart["contentBytes"]) == png
    assert (report["name"], report["isInline"], report["size"]) == ("report Q1.pdf", False, len(pdf))
    assert base64.b64decode(report["contentBytes"]) == pdf
    assert parsed["hasAttachments"] is True


@pytest.mark.parametrize(("subject_header", "from_header", "subject", "name"), [
    ("=?UTF-8?B?R3LDvMOfZSBhdXMgS8O2bG4g4pyT?=", "=?UTF-8?Q?J=C3=B6rg_M=C3=BCller?= <jm@fabrikam.com>",
     "Grüße aus Köln ✓", "Jörg Müller"),
    ("=?ISO-8859-1?Q?R=E9union_=E0_Paris?=", "=?ISO-8859-1?Q?Fran=E7ois?= <fr@fabrikam.com>",
     "Réunion à Paris", "François"),
    ("=?Shift_JIS?B?g2WDWINngsyMj5a8?=", "=?Shift_JIS?B?jlKTYw==?= <yamada@fabrikam.jp>", "テストの件名", "山田"),
    ("=?ISO-2022-JP?B?GyRCJUYlOSVIGyhC?=", "=?ISO-2022-JP?B?GyRCOzNFRBsoQg==?= <y@fabrikam.jp>", "テスト", "山田"),
])
def test_rfc2047_subjects_and_names(listener: SmtpListener, store: Mailstore, subject_header: str,
                                    from_header: str, subject: str, name: str) -> None:
    send(listener, crlf(f"From: {from_header}\nTo: alice@contoso.com\nSubject: {subject_header}\n\nbody\n"))
    parsed = store.last()
    assert parsed["subject"] == subject
    assert parsed["from"]["emailAddress"]["name"] == name


def test_smtputf8_raw_utf8_headers(listener: SmtpListener, store: Mailstore) -> None:
    raw = crlf("From: Zoë <zoë@fabrikam.com>\nTo: alice@contoso.com\nSubject: Grüße roh\n"
               "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\nGrüße\n")
    with smtplib.SMTP("127.0.0.1", listener.port, timeout=30) as client:
        client.ehlo()
        client.sendmail("zoë@fabrikam.com", ["alice@contoso.com"], raw, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    parsed = store.last()
    assert store.delivered[-1][0] == "zoë@fabrikam.com"
    assert parsed["subject"] == "Grüße roh"
    assert parsed["from"]["emailAddress"] == {"name": "Zoë", "address": "zoë@fabrikam.com"}
    assert parsed["body"]["content"].strip() == "Grüße"


def test_forwarded_message_rfc822_is_an_item_attachment(listener: SmtpListener, store: Mailstore) -> None:
    original = crlf(
        "Received: from mail.example.org by mx.fabrikam.com; Mon, 4 Mar 2024 09:00:01 +0000\n"
        "From: Customer <customer@example.org>\nTo: ext@fabrikam.com\nCc: other@example.org\n"
        "Subject: Order 4711\nDate: Mon, 04 Mar 2024 09:00:00 +0000\nMessage-ID: <order-4711@example.org>\n"
        "In-Reply-To: <quote-17@fabrikam.com>\nReferences: <rfq-1@example.org> <quote-17@fabrikam.com>\n"
        "Thread-Index: AQHabc123456789012345678901234\n"
        "Content-Type: multipart/mixed; boundary=INNER\n\n"
        "--INNER\nContent-Type: text/plain\n\nPlease ship.\n"
        "--INNER\nContent-Type: application/pdf\nContent-Disposition: attachment; filename=po.pdf\n"
        "Content-Transfer-Encoding: base64\n\nJVBERi0xLjQK\n--INNER--\n")
    wrapper = crlf("From: Ext <ext@fabrikam.com>\nTo: sink@contoso.com\nSubject: FW: Order 4711\n"
                   "Content-Type: multipart/mixed; boundary=OUTER\n\n"
                   "--OUTER\nContent-Type: text/plain\n\nforwarded as attachment\n"
                   "--OUTER\nContent-Type: message/rfc822\nContent-Disposition: attachment; filename=\"Order.eml\"\n\n"
                   ) + original + b"\r\n--OUTER--\r\n"
    send(listener, wrapper, rcpts=["sink@contoso.com"])
    parsed = store.last()
    (att,) = parsed["attachments"]
    assert att["@odata.type"] == "#microsoft.graph.itemAttachment"
    assert att["name"] == "Order 4711" and att["contentType"] == "message/rfc822"
    item = att["item"]
    assert item["internetMessageId"] == "<order-4711@example.org>"
    assert item["inReplyTo"] == "<quote-17@fabrikam.com>"
    assert item["references"] == ["<rfq-1@example.org>", "<quote-17@fabrikam.com>"]
    assert item["from"]["emailAddress"]["address"] == "customer@example.org"
    assert item["ccRecipients"][0]["emailAddress"]["address"] == "other@example.org"
    names = [h["name"] for h in item["internetMessageHeaders"]]
    assert names[:3] == ["Received", "From", "To"]
    assert item["body"]["content"].strip() == "Please ship."
    assert [a["name"] for a in item["attachments"]] == ["po.pdf"]
    assert item["hasAttachments"] is True


def test_broken_message_still_lands(listener: SmtpListener, store: Mailstore) -> None:
    raw = (b"From: ext@fabrikam.com\r\nTo: alice@contoso.com\r\nThis header line has no colon\r\n"
           b"Subject: =?utf-8?b?YnJva2VuIOKckw?=\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
           b"--B\r\nContent-Type: text/plain; charset=x-does-not-exist\r\n\r\ncaf\xe9 au lait\r\n"
           b"--B\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n"
           b"Content-Disposition: attachment; filename=bad.png\r\n\r\niVBORw0KGgo%%%%AAAA*\r\n")  # no end boundary
    send(listener, raw)
    parsed = store.last()
    assert parsed["subject"] == "broken ✓"
    assert parsed["body"]["content"].strip() == "café au lait"
    (att,) = parsed["attachments"]
    assert att["name"] == "bad.png"
    assert base64.b64decode(att["contentBytes"]).startswith(b"\x89PNG")


def test_unparseable_message_is_rejected_with_554(listener: SmtpListener, store: Mailstore) -> None:
    with smtplib.SMTP("127.0.0.1", listener.port, timeout=30) as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("ext@fabrikam.com", ["alice@contoso.com"], b"\x00\x01binary junk, no headers\r\n")
        assert info.value.smtp_code == 554
        assert info.value.smtp_error.startswith(b"5.6.0 not an RFC 5322 message")
        # The session and the listener survive the rejection.
        assert client.sendmail("ext@fabrikam.com", ["alice@contoso.com"], crlf("Subject: after\n\nok\n")) == {}
    assert store.last()["subject"] == "after"


def test_over_limit_message_is_rejected_with_554(listener: SmtpListener, store: Mailstore,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    raw = crlf("From: ext@fabrikam.com\nSubject: big\n\n" + ("x" * 998 + "\n") * 100)
    with smtplib.SMTP("127.0.0.1", listener.port, timeout=30) as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("ext@fabrikam.com", ["small@contoso.com"], raw)
    assert info.value.smtp_code == 554
    assert b"exceeds the limit of 65536 bytes" in info.value.smtp_error
    assert any("exceeds the limit" in r.getMessage() for r in caplog.records)
    assert store.delivered == []


def test_smtp_size_limit_answers_552() -> None:
    seen: list[bytes] = []
    smtp = SmtpListener("127.0.0.1", 0, accepts_recipient=lambda _a: True,
                        deliver=lambda _f, _r, raw: seen.append(raw), max_message_bytes=10_000)
    with smtp:
        with smtplib.SMTP("127.0.0.1", smtp.port, timeout=30) as client:
            client.ehlo()
            assert int(client.esmtp_features["size"]) == 10_000
            with pytest.raises(smtplib.SMTPException):
                client.sendmail("a@x.com", ["b@y.com"], crlf("Subject: big\n\n" + "y" * 20_000))
    assert seen == []


def test_unknown_recipient_gets_550(listener: SmtpListener, store: Mailstore) -> None:
    with smtplib.SMTP("127.0.0.1", listener.port, timeout=30) as client:
        refused = client.sendmail("ext@fabrikam.com", ["alice@contoso.com", "nobody@contoso.com"],
                                  crlf("Subject: partly\n\nbody\n"))
        assert refused == {"nobody@contoso.com": (550, b"5.1.1 Recipient address rejected: User unknown")}
        with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
            client.sendmail("ext@fabrikam.com", ["someone@elsewhere.org"], crlf("Subject: x\n\nbody\n"))
        assert info.value.recipients["someone@elsewhere.org"][0] == 550
    assert store.delivered[-1][1] == ["alice@contoso.com"]


def test_deliver_failure_is_temporary_451_and_listener_survives(listener: SmtpListener, store: Mailstore) -> None:
    with smtplib.SMTP("127.0.0.1", listener.port, timeout=30) as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("ext@fabrikam.com", ["boom@contoso.com"], crlf("Subject: x\n\nbody\n"))
        assert info.value.smtp_code == 451
        assert info.value.smtp_error.startswith(b"4.3.0")
    send(listener, crlf("Subject: still alive\n\nbody\n"))
    assert store.last()["subject"] == "still alive"


def test_concurrent_clients_all_delivered(listener: SmtpListener, store: Mailstore) -> None:
    def worker(n: int) -> None:
        for i in range(5):
            send(listener, crlf(f"From: ext@fabrikam.com\nSubject: c{n}-{i}\n\nbody\n"))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(p["subject"] for _f, _r, p in store.delivered) == sorted(
        f"c{n}-{i}" for n in range(6) for i in range(5))


def test_relay_to_a_smarthost(listener: SmtpListener, store: Mailstore) -> None:
    raw = crlf("From: alice@contoso.com\nTo: bob@contoso.com\nSubject: relayed\n\nvia smarthost\n")
    relay("127.0.0.1", listener.port, "alice@contoso.com", ["bob@contoso.com"], raw, timeout=10)
    envelope_from, rcpts, parsed = store.delivered[-1]
    assert (envelope_from, rcpts, parsed["subject"]) == ("alice@contoso.com", ["bob@contoso.com"], "relayed")
    with pytest.raises(SmtpRelayError) as info:
        relay("127.0.0.1", listener.port, "alice@contoso.com", ["bob@contoso.com", "nobody@contoso.com"], raw)
    assert info.value.refused["nobody@contoso.com"][0] == 550
    with pytest.raises(SmtpRelayError):
        relay("127.0.0.1", listener.port, "alice@contoso.com", ["x@elsewhere.org"], raw)


def test_stop_releases_the_port(store: Mailstore) -> None:
    smtp = SmtpListener("127.0.0.1", 0, accepts_recipient=store.accepts, deliver=store.deliver)
    smtp.start()
    port = smtp.port
    smtp.stop()
    again = SmtpListener("127.0.0.1", port, accepts_recipient=store.accepts, deliver=store.deliver)
    again.start()
    try:
        assert again.port == port
        send(again, crlf("Subject: reborn\n\nbody\n"))
    finally:
        again.stop()
    assert store.last()["subject"] == "reborn"


def test_mime_rejected_from_deliver_is_passed_through(store: Mailstore) -> None:
    def reject(_f: str, _r: list[str], _raw: bytes) -> None:
        raise MimeRejected("policy says no\r\nInjected: line")

    smtp = SmtpListener("127.0.0.1", 0, accepts_recipient=lambda _a: True, deliver=reject)
    with smtp, smtplib.SMTP("127.0.0.1", smtp.port, timeout=30) as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("a@x.com", ["b@contoso.com"], crlf("Subject: x\n\nbody\n"))
        assert info.value.smtp_code == 554
        assert info.value.smtp_error == b"5.6.0 policy says no Injected: line"
