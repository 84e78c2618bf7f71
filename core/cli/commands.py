"""The CLI commands: each builds what it needs from the container, calls a service, returns data to print."""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from core.names import (
    ALL_QUEUES,
    MAILBOX_STATUS_TABLE,
    MAILBOXES_TABLE,
    ORG_SETTINGS_TABLE,
    POISON_LOG_TABLE,
    POISON_SUFFIX,
    QUEUES,
)

__all__ = ["RULE_NAME", "CliError", "NotAvailableError", "run"]

RULE_NAME = "Email Router: forward to CRM"


class CliError(Exception):
    """A clear, user-facing failure (exit 1)."""


class NotAvailableError(CliError):
    """The command depends on a module missing from this build (exit 2)."""


class Out:
    def __init__(self, as_json: bool) -> None:
        self.json = as_json
        self.console = Console(stderr=as_json, soft_wrap=False, width=max(100, Console().width))

    def emit(self, data: Any, render: Callable[[Console], None]) -> None:
        if self.json:
            print(json.dumps(data, indent=2, default=str, sort_keys=True))
        else:
            render(self.console)

    def progress(self) -> Progress:
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=self.console,
                        disable=self.json, transient=True)


# ------------------------------------------------------------------------------------------------ wiring


def _container(args: argparse.Namespace, cwd: Path, environ: Mapping[str, str]) -> Any:
    from core.bootstrap import Container
    from core.config import Settings
    from core.settings.store import TableMailboxDirectory

    from .config import ConfigSourceError, load_values

    try:
        values, _ = load_values(args.settings, cwd, environ)
    except ConfigSourceError as exc:
        raise CliError(str(exc)) from exc
    for name in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):  # msal and httpx read these from the process env
        if values.get(name):
            os.environ[name] = values[name]
    container = Container(Settings(values))
    # The inbound services expect ``container.mailbox_directory`` (to be added to Container by the lead).
    if not hasattr(container, "mailbox_directory"):
        container.mailbox_directory = TableMailboxDirectory.from_account(container.storage)  # type: ignore[attr-defined]
    return container


async def _close(container: Any) -> None:
    for name in ("graph", "dataverse", "storage"):
        if name in container.__dict__:  # only what was built
            try:
                await container.__dict__[name].close()
            except Exception as exc:  # closing at exit: the command's result stands; say why at DEBUG
                logging.getLogger("emailrouter.cli").debug("closing %s failed: %s", name, exc.__class__.__name__)


async def run(args: argparse.Namespace, *, cwd: Path, environ: Mapping[str, str]) -> int:
    from core.config import ConfigError

    out = Out(args.json)
    try:
        container = _container(args, cwd, environ)
    except (ConfigError, ValueError) as exc:
        raise CliError(f"{exc} (set it in the environment, local.settings.json or --settings FILE)") from exc
    handler = _HANDLERS[(args.command, getattr(args, "action", None))]
    try:
        return await handler(container, args, out)
    except (ConfigError, ValueError, KeyError) as exc:
        raise CliError(str(exc).strip("'\"")) from exc
    except CliError:
        raise
    except Exception as exc:
        if type(exc).__module__.startswith(("core.adapters", "azure.")):
            raise CliError(f"{type(exc).__name__}: {exc}") from exc
        raise
    finally:
        await _close(container)


def _directory(container: Any) -> Any:
    return container.mailbox_directory


# ------------------------------------------------------------------------------------------------ mailbox


def _config_json(config: Any) -> dict[str, Any]:
    from core.settings.rows import format_value

    return {
        "address": config.address, "kind": config.kind.value,
        "owner": f"{config.owner.table}:{config.owner.id}" if config.owner else None,
        "mailbox_id": str(config.mailbox_id) if config.mailbox_id else None,
        "inbound": config.inbound_method.name.lower(), "outbound": config.outbound_method.name.lower(),
        "filter": config.tracking_filter.name.lower(), "forward_sink": config.forward_sink_address,
        "approval": config.approval.name.lower(), "enabled_incoming": config.enabled_for_incoming,
        "enabled_outgoing": config.enabled_for_outgoing, "delete_after_processing": config.delete_after_processing,
        "track_sent_items": config.track_sent_items, "auto_create_contacts": config.auto_create_contacts,
        "process_email_from": format_value(config.process_email_received_after)
        if config.process_email_received_after else None,
        "tracked_folders": {k: f"{v.table}:{v.id}" for k, v in config.folder_regarding.items()},
    }


async def _status_rows(container: Any) -> dict[str, dict[str, Any]]:
    table = container.storage.table(MAILBOX_STATUS_TABLE)
    return {str(r.get("RowKey")): dict(r) async for r in table.list_partition("mailbox")}


async def mailbox_list(container: Any, args: argparse.Namespace, out: Out) -> int:
    directory = _directory(container)
    mailboxes = sorted(await directory.list_mailboxes(), key=lambda m: m.address)
    errors = await directory.row_errors()
    status = await _status_rows(container)
    from core.settings.rows import row_key

    data = {"mailboxes": [{**_config_json(m), "health": (status.get(row_key(m.address)) or {}).get("Health",
                                                                                                  "unknown")}
                          for m in mailboxes],
            "errors": [{"row": e.row_key, "address": e.address, "reasons": list(e.reasons)} for e in errors]}

    def render(console: Console) -> None:
        table = Table(title=f"{len(mailboxes)} mailboxes")
        for col in ("address", "kind", "inbound", "outbound", "filter", "enabled", "approval", "health"):
            table.add_column(col)
        for m in data["mailboxes"]:
            enabled = "in+out" if m["enabled_incoming"] and m["enabled_outgoing"] else (
                "in" if m["enabled_incoming"] else "out" if m["enabled_outgoing"] else "no")
            table.add_row(m["address"], m["kind"], m["inbound"] + (f" → {m['forward_sink']}" if m["forward_sink"]
                                                                   else ""),
                          m["outbound"], m["filter"], enabled, m["approval"], m["health"])
        console.print(table)
        for e in errors:
            console.print(f"[red]ignored row[/red] {e}")

    out.emit(data, render)
    return 0


async def mailbox_show(container: Any, args: argparse.Namespace, out: Out) -> int:
    from core.settings.rows import FIELDS, RowError, effective_fields, parse_mailbox_row, row_key

    directory = _directory(container)
    row = await directory.get_row(args.address)
    if row is None:
        raise CliError(f"no mailbox {args.address} in the settings table (run `emailrouter sync-crm`?)")
    values, reasons = effective_fields(row)
    parsed = parse_mailbox_row(row, await directory.get_router_settings())
    status = (await _status_rows(container)).get(row_key(args.address), {})
    fields_out = {f.name: {"source": values[f.name].source if f.name in values else "default",
                           "crm": row.get(f"Crm{f.name}") if f.crm else None,
                           "override": row.get(f"Override{f.name}")} for f in FIELDS}
    data = {"address": row.get("Address"), "valid": not isinstance(parsed, RowError), "problems": reasons,
            "effective": None if isinstance(parsed, RowError) else _config_json(parsed), "fields": fields_out,
            "removed_from_crm": bool(row.get("RemovedFromCrm")), "crm_disabled": bool(row.get("CrmDisabled")),
            "health": {k: v for k, v in status.items() if k not in ("PartitionKey", "RowKey")}}

    def render(console: Console) -> None:
        table = Table(title=str(row.get("Address")))
        for col in ("setting", "effective", "source", "CRM", "override"):
            table.add_column(col)
        effective = data["effective"] or {}
        for f in FIELDS:
            info = fields_out[f.name]
            shown = values[f.name].raw if f.name in values else "-"
            table.add_row(f.name, str(shown), info["source"], str(info["crm"] or ""), str(info["override"] or ""))
        console.print(table)
        if reasons or isinstance(parsed, RowError):
            console.print("[red]row ignored:[/red] " + "; ".join(parsed.reasons if isinstance(parsed, RowError)
                                                                 else reasons))
        if row.get("RemovedFromCrm"):
            console.print("[yellow]removed from CRM: disabled[/yellow]")
        if status:
            console.print(f"health: {status.get('Health', 'unknown')}  last probe {status.get('LastProbeOn', '-')}  "
                          f"{status.get('LastError', '')}")
        _ = effective

    out.emit(data, render)
    return 0


async def mailbox_set(container: Any, args: argparse.Namespace, out: Out) -> int:
    changes = {k.removeprefix("field_"): v for k, v in vars(args).items() if k.startswith("field_") and v is not None}
    if not changes:
        raise CliError("nothing to set: give at least one option (see `emailrouter mailbox set --help`)")
    try:
        config = await _directory(container).set_overrides(args.address, changes)
    except ValueError as exc:
        raise CliError(f"not written: {exc}") from exc
    data = {"written": sorted(changes), "effective": _config_json(config)}
    out.emit(data, lambda c: c.print(f"{config.address}: overrides written ({', '.join(sorted(changes))}); "
                                     "effective within the settings cache TTL (≤ 60 s)"))
    return 0


def _health_service(container: Any) -> Any:
    from core.settings.health import health_service_for

    return health_service_for(container)


async def mailbox_test(container: Any, args: argparse.Namespace, out: Out) -> int:
    outcome = await _health_service(container).probe(args.address)

    def render(console: Console) -> None:
        table = Table(title=f"{outcome.address}: {outcome.health.value} (incoming {outcome.incoming.value}, "
                            f"outgoing {outcome.outgoing.value})")
        table.add_column("check")
        table.add_column("result")
        table.add_column("detail")
        for c in outcome.checks:
            table.add_row(c.name, "[green]ok[/green]" if c.ok else "[red]FAIL[/red]", c.detail)
        console.print(table)

    out.emit(outcome.to_json(), render)
    return 0 if outcome.health.value in ("ok", "n/a") else 1


# ------------------------------------------------------------------------------------------------ settings


async def settings_get(container: Any, args: argparse.Namespace, out: Out) -> int:
    from core.settings.rows import ORG_KEYS, format_org_value, org_defaults, org_key

    directory = _directory(container)
    result = await directory.get_org_result()
    rows = {str(r.get("RowKey")): r for r in await directory.list_org_rows()}
    keys = [org_key(args.key)] if args.key else list(ORG_KEYS)
    defaults = org_defaults()
    data = {k.key: {"effective": format_org_value(result.values.get(k.key, defaults[k.key])),
                    "source": result.sources.get(k.key, "default"),
                    "value": (rows.get(k.key) or {}).get("Value"), "crm_value": (rows.get(k.key) or {}).get("CrmValue"),
                    "crm_column": k.crm, "help": k.help} for k in keys}
    problems = [str(e) for e in result.errors]

    def render(console: Console) -> None:
        table = Table(title="org settings")
        for col in ("key", "effective", "source", "Value", "CrmValue", "meaning"):
            table.add_column(col)
        for key, info in data.items():
            table.add_row(key, info["effective"], info["source"], str(info["value"] or ""),
                          str(info["crm_value"] or ""), info["help"])
        console.print(table)
        for p in problems:
            console.print(f"[red]ignored:[/red] {p}")

    out.emit({"settings": data, "errors": problems} if not args.key else data[keys[0].key], render)
    return 0


async def settings_set(container: Any, args: argparse.Namespace, out: Out) -> int:
    try:
        stored = await _directory(container).set_org_value(args.key, args.value)
    except ValueError as exc:
        raise CliError(f"not written: {args.key}: {exc}") from exc
    from core.settings.rows import org_key

    key = org_key(args.key).key
    out.emit({"key": key, "value": stored}, lambda c: c.print(f"{key} = {stored!r}" if stored
                                                              else f"{key}: admin value cleared"))
    return 0


# ------------------------------------------------------------------------------------------------ sync


async def sync_crm(container: Any, args: argparse.Namespace, out: Out) -> int:
    from core.settings.crm_sync import CrmSyncService

    storage = container.storage
    service = CrmSyncService(container.dataverse, storage.table(MAILBOXES_TABLE), storage.table(ORG_SETTINGS_TABLE),
                             storage.table(MAILBOX_STATUS_TABLE))
    with out.progress() as progress:
        task = progress.add_task("reading CRM", total=None)

        def tick(step: str, done: int, total: int) -> None:
            progress.update(task, description=step, completed=done, total=total or None)

        report = await service.run(progress=tick)

    def render(console: Console) -> None:
        console.print(f"added {len(report.added)}, changed {len(report.changed)}, disabled "
                      f"{len(report.disabled)}, unchanged {report.unchanged}, org settings {len(report.org_changed)}")
        for a in report.added:
            console.print(f"  [green]+[/green] {a}")
        for a, cols in report.changed.items():
            console.print(f"  [yellow]~[/yellow] {a}: {', '.join(cols)}")
        for a in report.disabled:
            console.print(f"  [red]-[/red] {a} (removed from CRM: disabled)")
        for e in report.errors:
            console.print(f"  [red]error[/red] {e}")
        for w in report.warnings:
            console.print(f"  [yellow]warning[/yellow] {w}")

    out.emit(report.to_json(), render)
    return 0


# ------------------------------------------------------------------------------------------------ subscriptions


async def subscriptions_list(container: Any, args: argparse.Namespace, out: Out) -> int:
    from core.settings.rows import format_value

    records = [r async for r in container.subscription_directory.list()]
    data = [{"id": r.id, "mailbox": r.mailbox, "folder": r.folder, "expires": format_value(r.expires),
             "resource": r.resource} for r in sorted(records, key=lambda r: (r.mailbox, r.folder))]

    def render(console: Console) -> None:
        table = Table(title=f"{len(data)} subscriptions")
        for col in ("mailbox", "folder", "expires", "id"):
            table.add_column(col)
        for r in data:
            table.add_row(r["mailbox"], r["folder"], r["expires"], r["id"])
        console.print(table)

    out.emit(data, render)
    return 0


async def subscriptions_reconcile(container: Any, args: argparse.Namespace, out: Out) -> int:
    try:
        from core.services.subscriptions import service_for
    except ImportError as exc:
        raise NotAvailableError("subscriptions reconcile is not available in this build") from exc
    report = await service_for(container).reconcile()
    data = report.as_dict()
    out.emit(data, lambda c: c.print(", ".join(f"{k} {v if not isinstance(v, list) else len(v)}"
                                               for k, v in data.items())
                                     + "".join(f"\n  failed {f['mailbox']} {f['folder']}: {f['reason']}"
                                               for f in data["failed"])))
    return 1 if data["failed"] else 0


# ------------------------------------------------------------------------------------------------ poison


def _poison_queues(queue: str | None) -> list[str]:
    if queue is None:
        return [q + POISON_SUFFIX for q in QUEUES]
    name = queue if queue.endswith(POISON_SUFFIX) else queue + POISON_SUFFIX
    if name not in ALL_QUEUES:
        raise CliError(f"unknown queue {queue!r} (known: {', '.join(QUEUES)})")
    return [name]


async def _reasons(container: Any, poison_queue: str) -> dict[str, str]:
    """MessageHash -> recorded reason (PoisonLog rows are partitioned by queue name, poison or origin)."""
    table = container.storage.table(POISON_LOG_TABLE)
    out: dict[str, str] = {}
    for partition in (poison_queue, poison_queue.removesuffix(POISON_SUFFIX)):
        async for row in table.list_partition(partition):
            out.setdefault(str(row.get("MessageHash", "")), str(row.get("Reason", "")))
    return out


async def poison_list(container: Any, args: argparse.Namespace, out: Out) -> int:
    from core.adapters.storage import hash_key

    data: list[dict[str, Any]] = []
    for queue in _poison_queues(args.queue):
        browser = container.storage.queue_browser(queue)
        try:
            items = await browser.peek(32)
        finally:
            await browser.close()
        reasons = await _reasons(container, queue) if items else {}
        for item in items:
            data.append({"queue": queue, "id": item.id, "dequeue_count": item.dequeue_count,
                         "inserted": item.inserted_on, "encoding": item.encoding,
                         "reason": reasons.get(hash_key(item.content)) or "(no reason recorded)",
                         "content": item.content[:500]})

    def render(console: Console) -> None:
        table = Table(title=f"{len(data)} poisoned messages (first 32 per queue)")
        for col in ("queue", "id", "reason", "content"):
            table.add_column(col, overflow="fold")
        for r in data:
            table.add_row(r["queue"], r["id"], r["reason"], r["content"][:120])
        console.print(table)

    out.emit(data, render)
    return 0


async def _take(container: Any, queues: list[str], wanted: str | None, act: Callable[..., Any]) -> list[str]:
    """Receive poison messages (bounded rounds) and apply ``act(browser, item)`` to the wanted one(s)."""
    done: list[str] = []
    for queue in queues:
        browser = container.storage.queue_browser(queue)
        skipped: list[Any] = []
        try:
            for _ in range(200):  # bounded: 200 × 32 messages per queue per run
                items = await browser.receive(32, visibility_timeout=30)
                if not items:
                    break
                for item in items:
                    if wanted is None or item.id == wanted:
                        await act(browser, item)
                        done.append(item.id)
                    else:
                        skipped.append(item)
                if wanted is not None and done:
                    break
        finally:
            await _release(container, queue, skipped)
            await browser.close()
        if wanted is not None and done:
            return done
    return done


async def _release(container: Any, queue: str, items: list[Any]) -> None:
    """Make messages we received but did not act on visible again at once (QueueBrowser has no such verb yet)."""
    if not items:
        return
    client = container.storage.queue_service.get_queue_client(queue)
    try:
        for item in items:
            await client.update_message(item.id, item.pop_receipt, visibility_timeout=0)
    finally:
        await client.close()


async def poison_replay(container: Any, args: argparse.Namespace, out: Out) -> int:
    if not args.all and not args.id:
        raise CliError("give a message ID or --all")

    async def move(browser: Any, item: Any) -> None:
        await browser.move_back(item)

    done = await _take(container, _poison_queues(args.queue), None if args.all else args.id, move)
    if not done and args.id:
        raise CliError(f"no poisoned message with id {args.id}")
    out.emit({"replayed": done}, lambda c: c.print(f"replayed {len(done)} message(s)"))
    return 0


async def poison_discard(container: Any, args: argparse.Namespace, out: Out) -> int:
    async def delete(browser: Any, item: Any) -> None:
        await browser.delete(item)

    done = await _take(container, _poison_queues(args.queue), args.id, delete)
    if not done:
        raise CliError(f"no poisoned message with id {args.id}")
    out.emit({"discarded": done}, lambda c: c.print(f"discarded {args.id}"))
    return 0


# ------------------------------------------------------------------------------------------------ backfill, explain


async def backfill(container: Any, args: argparse.Namespace, out: Out) -> int:
    from core.settings.rows import parse_datetime

    try:
        from core.services.delta import backfill as run_backfill
    except ImportError as exc:
        raise NotAvailableError("backfill is not available in this build") from exc
    since = parse_datetime(args.since)
    with out.progress() as progress:
        task = progress.add_task(f"enqueueing {args.address}", total=None)
        report = await run_backfill(container, args.address, since,
                                    lambda n: progress.update(task, completed=n))
    if report.error:
        raise CliError(f"{args.address}: {report.error}")
    data = {"mailbox": report.mailbox, "since": since, "enqueued": report.enqueued, "folders": report.folders}
    out.emit(data, lambda c: c.print(f"{report.enqueued} message(s) from {', '.join(report.folders)} enqueued; "
                                     "already tracked ones are recognised and skipped"))
    return 0


async def explain(container: Any, args: argparse.Namespace, out: Out) -> int:
    try:
        from core.adapters.inbound_state import InboundState
    except ImportError as exc:
        raise NotAvailableError("explain is not available in this build") from exc
    mid = args.message_id.strip()
    records = await InboundState.for_container(container).decisions.find_by_internet_message_id(mid)
    if not records and not mid.startswith("<"):
        records = await InboundState.for_container(container).decisions.find_by_internet_message_id(f"<{mid}>")
    if not records:
        raise CliError(f"no decision recorded for {mid}")

    def render(console: Console) -> None:
        for record in records:
            console.rule(f"{record.get('mailbox', '')}: {record.get('outcome', '')}")
            console.print_json(json.dumps(record, default=str))

    out.emit(records, render)
    return 0


# ------------------------------------------------------------------------------------------------ forward rules


def _rule_body(sink: str) -> dict[str, Any]:
    return {"displayName": RULE_NAME, "sequence": 1, "isEnabled": True,
            "conditions": {},
            "exceptions": {"fromAddresses": [{"emailAddress": {"address": sink}}]},  # never bounce wrappers back
            "actions": {"forwardAsAttachmentTo": [{"emailAddress": {"address": sink}}], "stopProcessingRules": False}}


def _forwards_to(rule: Mapping[str, Any], sink: str) -> bool:
    targets = (rule.get("actions") or {}).get("forwardAsAttachmentTo") or []
    return [str((t.get("emailAddress") or {}).get("address", "")).lower() for t in targets] == [sink]


async def forward_rules(container: Any, args: argparse.Namespace, out: Out) -> int:
    from core.domain.model import InboundMethod
    from core.settings.rows import normalise_address

    directory = _directory(container)
    if args.users:
        users = [normalise_address(u) for u in args.users.split(",") if u.strip()]
    else:
        users = [m.address for m in await directory.list_mailboxes() if m.inbound_method is InboundMethod.FORWARD]
    if not users:
        raise CliError("no users: pass --users or configure forward-mailbox users first")
    results: list[dict[str, Any]] = []
    with out.progress() as progress:
        task = progress.add_task(f"{args.action} rules", total=len(users))
        for user in users:
            config = await directory.get_mailbox(user)
            sink = normalise_address(args.sink) if args.sink else (config.forward_sink_address if config else None)
            try:
                results.append(await _one_rule(container, directory, args.action, user, sink))
            except CliError as exc:
                results.append({"user": user, "result": "error", "detail": str(exc)})
            except Exception as exc:
                results.append({"user": user, "result": "error", "detail": f"{type(exc).__name__}: {exc}"})
            progress.advance(task)

    def render(console: Console) -> None:
        table = Table(title=f"forward-rules {args.action}")
        for col in ("user", "result", "detail"):
            table.add_column(col)
        for r in results:
            table.add_row(r["user"], r["result"], r.get("detail", ""))
        console.print(table)

    out.emit(results, render)
    return 1 if any(r["result"] == "error" for r in results) else 0


async def _one_rule(container: Any, directory: Any, action: str, user: str, sink: str | None) -> dict[str, Any]:
    graph = container.graph
    existing = [r for r in await graph.list_inbox_rules(user) if r.get("displayName") == RULE_NAME]
    if action == "remove":
        for rule in existing:
            await graph.delete_inbox_rule(user, str(rule["id"]))
        return {"user": user, "result": "removed" if existing else "absent"}
    if not sink:
        raise CliError("no sink: pass --sink")
    note = ""
    from core.domain.model import MailboxKind

    sink_config = await directory.get_mailbox(sink)
    if sink_config is None:
        # Like CRM's "forward mailbox" record: without it the router would not read the sink at all.
        await directory.set_overrides(sink, {"Kind": "forward_sink"})
        note = f"; {sink} configured as the forward mailbox (OverrideKind)"
    elif sink_config.kind is not MailboxKind.FORWARD_SINK:
        raise CliError(f"{sink} is a {sink_config.kind.value} mailbox, not a forward mailbox")
    config = await directory.get_mailbox(user)
    if config is not None and config.forward_sink_address != sink:
        # The sink only unwraps wrappers from users whose ForwardSink is that sink: keep rule and setting in step.
        await directory.set_overrides(user, {"ForwardSink": sink})
        note = f"; OverrideForwardSink set to {sink}"
    if len(existing) == 1 and _forwards_to(existing[0], sink) and existing[0].get("isEnabled", True):
        return {"user": user, "result": "unchanged", "detail": f"forwards to {sink}{note}"}
    for rule in existing:  # wrong target or duplicates: replace (idempotent end state)
        await graph.delete_inbox_rule(user, str(rule["id"]))
    await graph.create_inbox_rule(user, _rule_body(sink))
    return {"user": user, "result": "updated" if existing else "created", "detail": f"forwards to {sink}{note}"}


# ------------------------------------------------------------------------------------------------ status


async def status(container: Any, args: argparse.Namespace, out: Out) -> int:
    from core.settings.rows import row_key

    directory = _directory(container)
    mailboxes = await directory.list_mailboxes()
    rows = await _status_rows(container)
    health = Counter((rows.get(row_key(m.address)) or {}).get("Health", "unknown") for m in mailboxes)
    failing = sorted(m.address for m in mailboxes if (rows.get(row_key(m.address)) or {}).get("Health") == "failing")
    queues: dict[str, int | None] = {}
    service = container.storage.queue_service
    for name in ALL_QUEUES:
        try:
            props = await service.get_queue_client(name).get_queue_properties()
            queues[name] = int(props.approximate_message_count or 0)
        except Exception:
            queues[name] = None  # queue not created yet
    runs: dict[str, Any] = {}
    async for row in container.storage.table(MAILBOX_STATUS_TABLE).list_partition("router"):
        runs[str(row.get("RowKey"))] = {k: v for k, v in row.items() if k not in ("PartitionKey", "RowKey")}
    last_inbound = max((r.get("InboundLastSyncAt") for r in rows.values() if r.get("InboundLastSyncAt")),
                       default=None)
    if last_inbound is not None:
        runs["inbound-last-sync"] = {"LastRunOn": last_inbound}
    data = {"mailboxes": {"total": len(mailboxes), "by_health": dict(health), "failing": failing,
                          "ignored_rows": len(await directory.row_errors())},
            "queues": {q: n for q, n in queues.items() if not q.endswith(POISON_SUFFIX)},
            "poison": {q: n for q, n in queues.items() if q.endswith(POISON_SUFFIX)},
            "last_runs": runs, "at": datetime.now(UTC)}

    def render(console: Console) -> None:
        m = data["mailboxes"]
        console.print(f"[bold]mailboxes[/bold] {m['total']}: " + ", ".join(f"{k} {v}" for k, v in
                                                                          sorted(m["by_health"].items()))
                      + (f"  [red]{m['ignored_rows']} ignored row(s)[/red]" if m["ignored_rows"] else ""))
        for a in failing:
            console.print(f"  [red]failing[/red] {a}: {(rows.get(row_key(a)) or {}).get('LastError', '')}")
        table = Table(title="queues")
        table.add_column("queue")
        table.add_column("depth")
        table.add_column("poison")
        for q in QUEUES:
            depth, poison = queues.get(q), queues.get(q + POISON_SUFFIX)
            table.add_row(q, "-" if depth is None else str(depth),
                          "-" if poison is None else (f"[red]{poison}[/red]" if poison else "0"))
        console.print(table)
        for name, info in sorted(runs.items()):
            console.print(f"last {name}: {info.get('LastRunOn', '-')}")
        if not runs:
            console.print("no runs recorded yet")

    out.emit(data, render)
    return 0


async def _doctor(container: Any, args: argparse.Namespace, out: Out) -> int:
    from .doctor import doctor  # core/cli/doctor.py (issue 13): its own module, registered here

    return await doctor(container, args, out)


_HANDLERS: dict[tuple[str, str | None], Callable[..., Any]] = {
    ("mailbox", "list"): mailbox_list,
    ("mailbox", "show"): mailbox_show,
    ("mailbox", "set"): mailbox_set,
    ("mailbox", "test"): mailbox_test,
    ("settings", "get"): settings_get,
    ("settings", "set"): settings_set,
    ("sync-crm", None): sync_crm,
    ("subscriptions", "list"): subscriptions_list,
    ("subscriptions", "reconcile"): subscriptions_reconcile,
    ("poison", "list"): poison_list,
    ("poison", "replay"): poison_replay,
    ("poison", "discard"): poison_discard,
    ("backfill", None): backfill,
    ("forward-rules", "deploy"): forward_rules,
    ("forward-rules", "remove"): forward_rules,
    ("explain", None): explain,
    ("status", None): status,
    ("doctor", None): _doctor,
}
