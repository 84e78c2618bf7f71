"""Diagnosis commands: ``explain`` (why was this mail tracked or not), ``skipped list``, ``outbound list``,
``status``. Searches read the decision and outbound indexes for a time window (``--since``), one partition per day
(see ``core.adapters.inbound_state``), never the whole record table."""

from __future__ import annotations

import argparse
import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.console import Console
from rich.table import Table

from .registry import CliError, Out, UsageError, command, group

__all__ = ["parse_since"]

_RELATIVE = re.compile(r"^\s*(\d+)\s*([mhdw])\s*$", re.IGNORECASE)
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
MAX_WINDOW = timedelta(days=400)


def parse_since(text: str, now: datetime) -> datetime:
    """``30m``, ``2h``, ``7d``, ``2w`` (ago) or an ISO date / date-time (UTC when no zone)."""
    match = _RELATIVE.match(text)
    if match:
        moment = now - timedelta(**{_UNITS[match.group(2).lower()]: int(match.group(1))})
    else:
        from core.settings.rows import parse_datetime

        try:
            moment = parse_datetime(text)
        except ValueError as exc:
            raise UsageError(f"--since {text!r}: use 30m, 2h, 7d, 2w or an ISO date such as 2024-05-01") from exc
    if moment > now:
        raise UsageError(f"--since {text!r} is in the future")
    if now - moment > MAX_WINDOW:
        raise UsageError(f"--since {text!r}: the window is limited to {MAX_WINDOW.days} days")
    return moment


def _window_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--since", default=default, metavar="WHEN",
                        help=f"how far back: 30m, 2h, 7d, 2w or an ISO date (default {default})")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="show at most N")


def _check_window(args: argparse.Namespace) -> None:
    parse_since(args.since, datetime.now(UTC))
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")


def _contains(haystack: str, needle: str | None) -> bool:
    return not needle or needle.lower() in haystack.lower()


# ------------------------------------------------------------------------------------------------ explain


def _explain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("message_id", nargs="?", metavar="MESSAGE-ID",
                        help="the Internet Message-ID (e.g. <abc@mail.example.com>), if you have it")
    parser.add_argument("--mailbox", metavar="ADDRESS",
                        help="the mailbox (or the forward-mailbox user) the mail was in")
    parser.add_argument("--from", dest="sender", metavar="TEXT", help="the sender's address contains TEXT")
    parser.add_argument("--subject", metavar="TEXT", help="the subject contains TEXT (case-insensitive)")
    _window_arguments(parser, "7d")


def _validate_explain(args: argparse.Namespace) -> None:
    _check_window(args)
    if not (args.message_id or args.mailbox or args.sender or args.subject):
        raise UsageError("give a MESSAGE-ID or at least one of --mailbox, --from, --subject")


def _record_matches(record: dict[str, Any], args: argparse.Namespace) -> bool:
    mailbox = (args.mailbox or "").strip().lower()
    if mailbox and mailbox not in (str(record.get("mailbox", "")).lower(), str(record.get("trackedFor", "")).lower()):
        return False
    return _contains(str(record.get("from", "")), args.sender) and _contains(str(record.get("subject", "")),
                                                                             args.subject)


async def _search_records(container: Any, args: argparse.Namespace, out: Out) -> tuple[list[dict[str, Any]], str]:
    from core.adapters.inbound_state import InboundState

    decisions = InboundState.for_container(container).decisions
    limit = args.limit or 10
    if args.message_id:
        records = await decisions.find_by_internet_message_id(args.message_id.strip())
        return [r for r in records if _record_matches(r, args)][:limit], f"Message-ID {args.message_id.strip()}"
    now = datetime.now(UTC)
    since = parse_since(args.since, now)
    records: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    with out.progress() as progress:
        task = progress.add_task("searching decisions", total=None)
        async for hit in decisions.search(since, now, mailbox=args.mailbox,
                                          on_day=lambda d, n: progress.update(task, completed=d, total=n)):
            if (hit.mailbox, hit.graph_id) in seen or not _contains(hit.sender, args.sender) \
                    or not _contains(hit.subject, args.subject):
                continue
            seen.add((hit.mailbox, hit.graph_id))
            record = await decisions.get(hit.mailbox, hit.graph_id)
            if record is not None:
                records.append({**record, "decidedAt": hit.at})
            if len(records) >= limit:
                break
    what = ", ".join(f"{k} {v}" for k, v in (("mailbox", args.mailbox), ("from", args.sender),
                                             ("subject containing", args.subject)) if v)
    return records, f"{what} since {since:%Y-%m-%d %H:%M} UTC"


@command("explain", help="why a message was (or was not) tracked: find it and print the decision trail",
         arguments=_explain_arguments, validate=_validate_explain,
         description="Find the router's decision records by Internet Message-ID, or by mailbox, sender, subject "
                     "and time window, and print each decision step with its reason.",
         examples=["emailrouter explain --mailbox erin@contoso.com --from nora@northwind.example --since 2d",
                   "emailrouter explain --subject \"Quarterly review\"",
                   "emailrouter explain \"<CAF=abc@mail.example.com>\""])
async def explain(container: Any, args: argparse.Namespace, out: Out) -> int:
    from core.domain.inbound import explain_record

    records, searched = await _search_records(container, args, out)
    if not records:
        raise CliError(f"no decision recorded for {searched}. If the mail never reached the router, check that "
                       "the mailbox is subscribed (`emailrouter subscriptions list`), its folder is watched and "
                       "its settings are valid (`emailrouter mailbox show ADDRESS`)")
    data = [{**r, "explanation": explain_record(r)} for r in records]

    def render(console: Console) -> None:
        for r in data:
            who = r.get("mailbox", "")
            if r.get("trackedFor"):
                who = f"{who} (forwarded by {r['trackedFor']})"
            console.rule(f"{who}: {r.get('subject') or '(no subject)'}")
            for label, key in (("from", "from"), ("received", "receivedAt"), ("Message-ID", "internetMessageId"),
                               ("decided", "decidedAt"), ("source", "source")):
                if r.get(key):
                    console.print(f"[dim]{label:<11}[/dim] {r[key]}", markup=True, highlight=False)
            console.print(r["explanation"], markup=False, highlight=False)

    out.emit(data, render)
    return 0


# ------------------------------------------------------------------------------------------------ skipped

group("skipped", "mail the router decided not to track, with the reason")


def _skipped_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mailbox", metavar="ADDRESS", help="only this mailbox (or forward-mailbox user)")
    parser.add_argument("--reason", metavar="CODE", help="only this reason code, e.g. not_accepted, auto_reply")
    _window_arguments(parser, "24h")


@command("skipped", "list", help="recently skipped mail with the reason, and a count per reason",
         arguments=_skipped_arguments, validate=_check_window,
         examples=["emailrouter skipped list --since 2h", "emailrouter skipped list --mailbox erin@contoso.com "
                   "--reason not_accepted"])
async def skipped_list(container: Any, args: argparse.Namespace, out: Out) -> int:
    from core.adapters.inbound_state import InboundState

    now = datetime.now(UTC)
    since = parse_since(args.since, now)
    limit = args.limit or 100
    items: list[dict[str, Any]] = []
    reasons: Counter[str] = Counter()
    decisions = InboundState.for_container(container).decisions
    with out.progress() as progress:
        task = progress.add_task("reading skipped mail", total=None)
        async for hit in decisions.search(since, now, mailbox=args.mailbox, kind="skipped",
                                          on_day=lambda d, n: progress.update(task, completed=d, total=n)):
            if args.reason and hit.code != args.reason:
                continue
            reasons[hit.code] += 1
            if len(items) < limit:
                items.append(hit.to_json())
    data = {"since": since, "count": sum(reasons.values()), "by_reason": dict(reasons.most_common()),
            "items": items}

    def render(console: Console) -> None:
        console.print(f"{data['count']} skipped since {since:%Y-%m-%d %H:%M} UTC: "
                      + (", ".join(f"{code} {n}" for code, n in reasons.most_common()) or "none"))
        if not items:
            return
        table = Table(title=f"newest {len(items)}")
        for col in ("when", "mailbox", "from", "subject", "reason", "why"):
            table.add_column(col, overflow="fold")
        for i in items:
            mailbox = f"{i['tracked_for']} (via {i['mailbox']})" if i["tracked_for"] else i["mailbox"]
            table.add_row(f"{i['at']:%Y-%m-%d %H:%M:%S}", mailbox, i["from"], i["subject"], i["reason"], i["why"])
        console.print(table)

    out.emit(data, render)
    return 0


# ------------------------------------------------------------------------------------------------ outbound

group("outbound", "emails sent from CRM through the router (the Outbound ledger)")


def _outbound_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--failed", action="store_true", help="only emails that ended Failed, with the reason")
    parser.add_argument("--mailbox", metavar="ADDRESS", help="only this sender")
    _window_arguments(parser, "7d")


@command("outbound", "list", help="emails being sent now and those that finished (Sent or Failed), with reasons",
         arguments=_outbound_arguments, validate=_check_window,
         examples=["emailrouter outbound list --failed", "emailrouter outbound list --mailbox alice@contoso.com"])
async def outbound_list(container: Any, args: argparse.Namespace, out: Out) -> int:
    from core.adapters.outbound_state import TableOutboundLedger

    now = datetime.now(UTC)
    since = parse_since(args.since, now)
    limit = args.limit or 100
    sender = (args.mailbox or "").strip().lower()
    ledger = TableOutboundLedger(container.storage)
    items: list[dict[str, Any]] = []
    with out.progress() as progress:
        task = progress.add_task("reading the outbound ledger", total=None)
        if not args.failed:
            for marker in await ledger.list_active():
                if sender and marker.sender_mailbox.lower() != sender:
                    continue
                found = await ledger.get(marker.email_id)
                entry = found[0] if found else None
                items.append({"email_id": marker.email_id, "sender": marker.sender_mailbox,
                              "state": entry.phase.value if entry else "queued",
                              "attempts": entry.attempts if entry else 0,
                              "reason": entry.last_error if entry else "",
                              "at": (entry.updated_at if entry else None) or marker.updated_at or marker.enqueued_at})
                if len(items) >= limit:
                    break
        seen: set[str] = set()
        async for row in ledger.list_finished(since, now, failed_only=args.failed,
                                              on_day=lambda d, n: progress.update(task, completed=d, total=n)):
            email_id = str(row.get("EmailId", ""))
            if email_id in seen or (sender and str(row.get("SenderMailbox", "")).lower() != sender):
                continue
            seen.add(email_id)
            if len(items) >= limit:
                break
            phase = str(row.get("Phase", ""))
            items.append({"email_id": email_id, "sender": str(row.get("SenderMailbox", "")),
                          "state": "sent" if phase == "done" else phase, "attempts": int(row.get("Attempts", 0) or 0),
                          "reason": str(row.get("LastError", "")), "at": row.get("At")})
    data = {"since": since, "failed_only": args.failed, "items": items}

    def render(console: Console) -> None:
        title = f"{len(items)} {'failed ' if args.failed else ''}outbound email(s) since {since:%Y-%m-%d %H:%M} UTC"
        table = Table(title=title)
        for col in ("when", "sender", "CRM email", "state", "attempts", "reason"):
            table.add_column(col, overflow="fold")
        for i in items:
            colour = "red" if i["state"] == "failed" else "green" if i["state"] == "sent" else "yellow"
            table.add_row(f"{i['at']:%Y-%m-%d %H:%M:%S}" if isinstance(i["at"], datetime) else "-", i["sender"],
                          i["email_id"], f"[{colour}]{i['state']}[/{colour}]", str(i["attempts"]), i["reason"])
        console.print(table)

    out.emit(data, render)
    return 0


# ------------------------------------------------------------------------------------------------ status


@command("status", help="one screen: mailbox health, the last hour's mail, queues, poison, outbound failures",
         description="The same snapshot the /api/status page shows, in the terminal.")
async def status(container: Any, args: argparse.Namespace, out: Out) -> int:
    from core.services.status import collect_status

    with out.progress() as progress:
        progress.add_task("reading status", total=None)
        report = await collect_status(container)
    data = report.to_json()

    def render(console: Console) -> None:
        m = data["mailboxes"]
        console.print(f"[bold]mailboxes[/bold] {m['total']}: " + ", ".join(f"{k} {v}" for k, v in
                                                                          sorted(m["by_health"].items()))
                      + (f"  [red]{m['ignored_rows']} ignored row(s)[/red]" if m["ignored_rows"] else ""))
        for line in report.mailboxes:
            if line.health == "failing":
                console.print(f"  [red]failing[/red] {line.address}: {line.last_error}", highlight=False)
            elif line.health == "pending":
                console.print(f"  [yellow]pending[/yellow] {line.address}: {line.pending}", highlight=False)
        c = report.counts
        console.print(f"[bold]last hour[/bold]: tracked {c['tracked']}, already in CRM {c['already_tracked']}, "
                      f"skipped {c['skipped']}, failed {c['failed']}, gone {c['gone']}")
        for code, n, why in report.skip_reasons[:5]:
            console.print(f"  skipped {n} × {code}: {why}", markup=False, highlight=False)
        table = Table(title="queues")
        table.add_column("queue")
        table.add_column("depth")
        table.add_column("poison")
        for q, depth in report.queues.items():
            poison = report.poison.get(q + "-poison")
            table.add_row(q, "-" if depth is None else str(depth),
                          "-" if poison is None else (f"[red]{poison}[/red]" if poison else "0"))
        console.print(table)
        console.print(f"[bold]outbound[/bold]: sending {report.outbound_in_flight}, last hour sent "
                      f"{report.outbound_window.get('done', 0)}, failed {report.outbound_window.get('failed', 0)}")
        for f in report.outbound_failures[:5]:
            console.print(f"  [red]failed[/red] {f.email_id} from {f.sender}: {f.reason}", highlight=False)
        for name, info in sorted(report.last_runs.items()):
            console.print(f"last {name}: {info.get('LastRunOn', '-')}")
        for line in report.running:
            console.print(f"now: {line}", highlight=False)
        if not report.last_runs:
            console.print("no runs recorded yet")

    out.emit(data, render)
    return 0
