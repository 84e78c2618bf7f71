"""The ``/api/status`` page: a :class:`core.services.status.StatusReport` as one server-rendered HTML document.

Plain HTML and inline CSS, no JavaScript, no external resources (the page is served with a CSP that forbids
both). Every value that comes from data — addresses, error texts, skip reasons, ids — goes through
:func:`html.escape`; the only markup is the literal template text below.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from datetime import datetime

from core.services.status import StatusReport

__all__ = ["HEADERS", "MAX_HEALTHY_ROWS", "render_status_page", "render_unavailable_page"]

MAX_HEALTHY_ROWS = 200  # failing and unknown mailboxes are always listed; healthy ones up to this many

HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the function key may be in the URL (?code=)
    "X-Frame-Options": "DENY",
}

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5rem;color:#1b1b1b;background:#fff}
h1{font-size:1.4rem;margin:0 0 .2rem} h2{font-size:1.1rem;margin:1.6rem 0 .5rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9rem} th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;
vertical-align:top} th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
.failing{color:#a4262c;font-weight:600} .ok{color:#107c10} .unknown{color:#8a6d00} .muted{color:#666}
.cards{display:flex;gap:1rem;flex-wrap:wrap} .card{border:1px solid #ddd;border-radius:4px;padding:.5rem 1rem}
.card b{display:block;font-size:1.4rem} .err{max-width:48rem;word-break:break-word}
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else ""


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, id_: str, empty: str) -> str:
    body = "".join("<tr>" + "".join(rows_cell for rows_cell in row) + "</tr>" for row in rows)
    if not body:
        return f'<p id="{_e(id_)}" class="muted">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return f'<table id="{_e(id_)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _td(value: object, cls: str = "") -> str:
    return f'<td class="{_e(cls)}">{_e(value)}</td>' if cls else f"<td>{_e(value)}</td>"


def _card(label: str, value: object, id_: str, cls: str = "") -> str:
    return f'<div class="card" id="{_e(id_)}"><b class="{_e(cls)}">{_e(value)}</b>{_e(label)}</div>'


def _page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>{body}</body></html>\n")


def render_status_page(report: StatusReport, *, version: str = "") -> str:
    minutes = int(report.window.total_seconds() // 60)
    window = "hour" if minutes == 60 else f"{minutes} minutes"
    health = report.by_health
    parts = [f"<h1>Email Router status</h1><p class=\"muted\">at {_e(_when(report.at))}"
             + (f" &middot; version {_e(version)}" if version else "") + " &middot; read-only</p>"]

    parts.append("<h2>Mailboxes</h2><div class=\"cards\">"
                 + _card("mailboxes", len(report.mailboxes), "mailboxes-total")
                 + _card("failing", health.get("failing", 0), "mailboxes-failing",
                         "failing" if health.get("failing") else "ok")
                 + _card("ok", health.get("ok", 0), "mailboxes-ok", "ok")
                 + _card("pending (being set up)", health.get("pending", 0), "mailboxes-pending", "unknown")
                 + _card("not probed yet", health.get("unknown", 0), "mailboxes-unknown")
                 + (_card("ignored settings rows", report.ignored_rows, "ignored-rows", "failing")
                    if report.ignored_rows else "")
                 + "</div>")
    shown = [m for m in report.mailboxes if m.health != "ok"]
    healthy = [m for m in report.mailboxes if m.health == "ok"]
    shown += healthy[:MAX_HEALTHY_ROWS]
    parts.append(_table(
        ("mailbox", "kind", "inbound", "outbound", "health", "last probe", "last error", "last inbound error",
         "last outbound error"),
        ([_td(m.address), _td(m.kind), _td(m.inbound), _td(m.outbound), _td(m.health, m.health),
          _td(m.last_probe), f'<td class="err">{_e(m.last_error or m.pending)}</td>',
          f'<td class="err">{_e(m.inbound_error)}'
          + (f' <span class="muted">({_e(m.inbound_error_at)})</span>' if m.inbound_error_at else "") + "</td>",
          f'<td class="err">{_e(m.outbound_error)}'
          + (f' <span class="muted">({_e(m.outbound_error_at)})</span>' if m.outbound_error_at else "") + "</td>"]
         for m in shown),
        id_="mailboxes", empty="no mailboxes configured yet (run `emailrouter sync-crm`)"))
    if len(healthy) > MAX_HEALTHY_ROWS:
        parts.append(f"<p class=\"muted\">and {len(healthy) - MAX_HEALTHY_ROWS} more healthy mailboxes "
                     "(`emailrouter mailbox list`)</p>")

    c = report.counts
    parts.append(f"<h2>Inbound mail in the last {_e(window)}</h2><div class=\"cards\">"
                 + _card("tracked", c.get("tracked", 0), "count-tracked", "ok")
                 + _card("already in CRM", c.get("already_tracked", 0), "count-already-tracked")
                 + _card("skipped", c.get("skipped", 0), "count-skipped")
                 + _card("failed", c.get("failed", 0), "count-failed", "failing" if c.get("failed") else "")
                 + _card("gone before processing", c.get("gone", 0), "count-gone")
                 + "</div><h3>Top skip reasons</h3>")
    parts.append(_table(("reason", "count", "example"),
                        ([_td(code), _td(n, "num"), f'<td class="err">{_e(why)}</td>']
                         for code, n, why in report.skip_reasons),
                        id_="skip-reasons", empty="nothing skipped"))

    parts.append("<h2>Queues</h2>")
    parts.append(_table(("queue", "waiting", "poison"),
                        ([_td(q), _td("-" if n is None else n, "num"),
                          _td("-" if report.poison.get(q + "-poison") is None else report.poison[q + "-poison"],
                              "num failing" if report.poison.get(q + "-poison") else "num")]
                         for q, n in report.queues.items()),
                        id_="queues", empty="no queues"))

    o = report.outbound_window
    parts.append("<h2>Outbound</h2><div class=\"cards\">"
                 + _card("sending now", report.outbound_in_flight, "outbound-in-flight")
                 + _card(f"sent in the last {window}", o.get("done", 0), "outbound-sent", "ok")
                 + _card(f"failed in the last {window}", o.get("failed", 0), "outbound-failed",
                         "failing" if o.get("failed") else "")
                 + "</div><h3>Failures of the last day</h3>")
    parts.append(_table(("when", "sender", "CRM email", "attempts", "reason"),
                        ([_td(_when(f.at)), _td(f.sender), _td(f.email_id), _td(f.attempts, "num"),
                          f'<td class="err">{_e(f.reason)}</td>'] for f in report.outbound_failures),
                        id_="outbound-failures", empty="no outbound failures"))

    parts.append("<h2>Last runs</h2>")
    parts.append(_table(("job", "last run", "detail"),
                        ([_td(name), _td(info.get("LastRunOn") or info.get("At") or ""),
                          _td("; ".join(f"{k}={v}" for k, v in sorted(info.items())
                                        if k not in ("LastRunOn", "At", "Timestamp"))[:300])]
                         for name, info in sorted(report.last_runs.items())),
                        id_="last-runs", empty="no runs recorded yet"))
    return _page("Email Router status", "".join(parts))


def render_unavailable_page(reason: str) -> str:
    return _page("Email Router status", "<h1>Email Router status</h1>"
                 f"<p class=\"failing\" id=\"unavailable\">Status unavailable: {_e(reason)}</p>")
