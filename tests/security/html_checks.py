"""An independent judge of sanitised HTML: parses the output (stdlib HTMLParser, not nh3) and lists anything a
browser could execute or that leaves the page (scripts, handlers, dangerous URLs, frames, forms, refresh)."""

from __future__ import annotations

from html.parser import HTMLParser

FORBIDDEN_TAGS = frozenset({
    "script", "style", "iframe", "frame", "frameset", "object", "embed", "applet", "form", "input", "button",
    "select", "textarea", "meta", "link", "base", "svg", "math", "template", "noscript", "xml", "portal",
})
URL_ATTRIBUTES = frozenset({"href", "src", "action", "formaction", "background", "poster", "lowsrc", "dynsrc",
                            "xlink:href", "data", "codebase", "cite", "longdesc", "srcset", "ping"})
SAFE_SCHEMES = ("http:", "https:", "mailto:", "cid:")


def _scheme_ok(value: str) -> bool:
    compact = "".join(ch for ch in value if ch > " ").lower()
    if ":" not in compact.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]:
        return True  # relative URL / fragment
    return compact.startswith(SAFE_SCHEMES)


class _Judge(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.problems: list[str] = []
        self.tags: list[str] = []
        self.links: list[tuple[str, str, str]] = []  # (tag, attribute, value)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag in FORBIDDEN_TAGS:
            self.problems.append(f"<{tag}>")
        for name, value in attrs:
            if name.startswith("on"):
                self.problems.append(f"<{tag} {name}=...>")
            if name in URL_ATTRIBUTES and value is not None:
                self.links.append((tag, name, value))
                if not _scheme_ok(value):
                    self.problems.append(f"<{tag} {name}={value[:40]!r}>")
            if name == "style" and value and any(v in value.lower() for v in ("expression(", "url(", "behavior",
                                                                               "javascript:", "@import")):
                self.problems.append(f"<{tag} style={value[:40]!r}>")
            if name == "http-equiv":
                self.problems.append(f"<{tag} http-equiv>")

    handle_startendtag = handle_starttag


def judge(html_text: str) -> _Judge:
    j = _Judge()
    j.feed(html_text)
    j.close()
    return j


def dangerous_parts(html_text: str) -> list[str]:
    """What in ``html_text`` a browser could run or use to leave the page; empty when safe."""
    return judge(html_text).problems
