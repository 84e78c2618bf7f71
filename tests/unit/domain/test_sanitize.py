from __future__ import annotations

import pytest

from core.domain.sanitize import sanitize_html, text_to_html


@pytest.mark.parametrize(
    ("html", "must_not_contain"),
    [
        ("<p>x</p><script>alert(1)</script>", "alert"),
        ("<style>body{display:none}</style><p>x</p>", "display"),
        ('<p onclick="steal()">x</p>', "steal"),
        ('<body onload="steal()"><p>x</p></body>', "onload"),
        ('<img src="x" onerror="steal()">', "onerror"),
        ('<a href="javascript:steal()">x</a>', "javascript"),
        ('<a href="JaVaScRiPt:steal()">x</a>', "steal"),
        ('<img src="data:image/svg+xml;base64,PHN2Zz4=">', "data:"),
        ('<iframe src="https://evil.example"></iframe>', "iframe"),
        ('<form action="https://evil.example"><input name="p"></form>', "form"),
        ('<p style="position:fixed;color:red">x</p>', "position"),
        ("<!-- secret --><p>x</p>", "secret"),
    ],
)
def test_dangerous_content_is_removed(html: str, must_not_contain: str) -> None:
    assert must_not_contain.lower() not in sanitize_html(html).lower()


@pytest.mark.parametrize(
    ("html", "kept"),
    [
        ("<p>Hello <b>bold</b> <i>it</i> <u>u</u></p>", "<b>bold</b>"),
        ('<p style="color:red">x</p>', 'style="color:red"'),
        ('<table border="1"><tr><td colspan="2">cell</td></tr></table>', 'colspan="2"'),
        ("<ul><li>one</li></ul><ol><li>two</li></ol>", "<li>two</li>"),
        ('<a href="https://contoso.com">link</a>', 'href="https://contoso.com"'),
        ('<a href="mailto:a@b.com">m</a>', 'href="mailto:a@b.com"'),
        ('<img src="cid:logo@1" alt="logo">', 'src="cid:logo@1"'),
        ('<img src="https://contoso.com/x.png">', 'src="https://contoso.com/x.png"'),
        ('<font color="red" face="Arial">f</font>', 'face="Arial"'),
        ("<blockquote>q</blockquote><br><hr>", "<blockquote>q</blockquote>"),
    ],
)
def test_ordinary_formatting_is_kept(html: str, kept: str) -> None:
    assert kept in sanitize_html(html)


def test_text_body_is_escaped_with_line_breaks() -> None:
    assert text_to_html("a < b\nc") == "<div>a &lt; b<br>\nc</div>"
