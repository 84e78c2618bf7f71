"""The CLI's wiring (:func:`run`) and its settings, mailbox, sync, subscription, poison, backfill and forward-rule
commands: each builds what it needs from the container, calls a service, returns data to print. Diagnosis
commands (``explain``, ``skipped``, ``outbound``, ``status``) live in ``core.cli.diagnose``."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from core.names import (
    ALL_QUEUES,
    MAILBOX_STATUS_TABLE,
    POISON_LOG_TABLE,
    POISON_SUFFIX,
    QUEUES,
)

from .registry import (
    CliError,
    Command,
    NotAvailableError,
    Out,
    UnavailableError,
    UsageError,
    command,
    confirm,
    group,
)

__all__ = ["RULE_NAME", "CliError", "NotAvailableError", "run"]

RULE_NAME = "Email Router: forward to CRM"

# ------------------------------------------------------------------------------------------------ wiring

_UNREACHABLE = ("ServiceRequestError", "ConnectError", "ConnectTimeout", "ClientConnectorError",
                "ConnectionRefusedError")


def _container(args: argparse.Namespace, cwd: Path, environ: Mapping[str, str]) -> Any:
    from core.bootstrap import Container
    from core.config import Settings

    from .config import ConfigSourceError, load_values

    try:
        values, _ = load_values(args.settings, cwd, environ)
    except ConfigSourceError as exc:
        raise UsageError(str(exc)) from exc
    for name in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):  # msal and httpx read these from the process env
        if values.get(name):
            os.environ[name] = values[name]
    return Container(Settings(values))


async def _close(container: Any) -> None:
    try:
        await container.close()
    except Exception as exc:  # closing at exit: the command's result stands; say why at DEBUG
        logging.getLogger("emailrouter.cli").debug("closing the clients failed: %s", exc.__class__.__name__)


def _unreachable(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if type(seen).__name__ in _UNREACHABLE or isinstance(seen, ConnectionError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def run(spec: Command, args: argparse.Namespace, *, cwd: Path, environ: Mapping[str, str]) -> int:
    """Build the container and run one command, mapping failures to the documented exit codes."""
    from core.config import ConfigError

    from .config import azure_error_hint, describe_sources

    out = Out(args.json)
    try:
        container = _container(args, cwd, environ)
    except (ConfigError, ValueError) as exc:
        raise UnavailableError(f"{exc}\n{describe_sources(args.settings, cwd, environ)}") from exc
    from core.services.jobs import JobBusy

    try:
        return await spec.handler(container, args, out)
    except CliError:
        raise
    except JobBusy as exc:
        raise CliError(f"{exc}. Nothing was changed by this run: try again when it has finished, or give "
                       "--wait SECONDS") from exc
    except ConfigError as exc:
        raise UnavailableError(f"{exc}\n{describe_sources(args.settings, cwd, environ)}") from exc
    except Exception as exc:
        if _unreachable(exc):
            raise UnavailableError(f"a service could not be reached ({type(exc).__name__}: {exc})") from exc
        if isinstance(exc, ValueError | KeyError):
            raise CliError(str(exc).strip("'\"")) from exc
        if type(exc).__module__.startswith(("core.", "azure.")):
            hint = azure_error_hint(exc)
            raise CliError(f"{type(exc).__name__}: {exc}" + (f"\n{hint}" if hint else "")) from exc
        raise
    finally:
        await _close(container)


def _directory(container: Any) -> Any:
    return container.mailbox_directory


async def _status_rows(container: Any) -> dict[str, dict[str, Any]]:
    table = container.storage.table(MAILBOX_STATUS_TABLE)
    return {str(r.get("RowKey")): dict(r) async for r in table.list_partition("mailbox")}


# ------------------------------------------------------------------------------------------------ mailbox

group("mailbox", "mailbox settings and health",
      "Mailboxes: the router's settings table (copied from CRM, plus admin overrides) and each mailbox's health.")


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
        "graph_user_id": config.graph_user_id,
    }


@command("mailbox", "list", help="every mailbox with its effective settings and health",
         examples=["emailrouter mailbox list", "emailrouter mailbox list --json | jq '.mailboxes[]'"])
async def mailbox_list(container: Any, args: argparse.Namespace, out: Out) -> int:
    from core.settings.rows import row_key

    directory = _directory(container)
    with out.progress() as progress:
        task = progress.add_task("reading mailboxes", total=None)
        mailboxes = sorted(await directory.list_mailboxes(), key=lambda m: m.address)
        errors = await directory.row_errors()
        progress.update(task, description="reading mailbox status", total=len(mailboxes) or None, completed=0)
        status: dict[str, dict[str, Any]] = {}
        async for r in container.storage.table(MAILBOX_STATUS_TABLE).list_partition("mailbox"):
            status[str(r.get("RowKey"))] = dict(r)
            progress.advance(task)

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


_STATUS_LINES = (  # (label, error column, time column) of the mailbox status row, shown by `mailbox show`
    ("health probe", "LastError", "LastProbeOn"),
    ("inbound", "InboundLastError", "InboundLastErrorAt"),
    ("inbound sync", "InboundLastSyncError", "InboundLastSyncErrorAt"),
    ("outbound", "LastOutboundError", "LastOutboundErrorAt"),
)


@command("mailbox", "show", help="one mailbox: each setting with its source, health and last errors",
         arguments=lambda p: p.add_argument("address", help="the mailbox address"),
         examples=["emailrouter mailbox show alice@contoso.com"])
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
        health = Table(title=f"health: {status.get('Health', 'unknown')}")
        for col in ("what", "last error", "when"):
            health.add_column(col, overflow="fold")
        for label, error, when in _STATUS_LINES:
            health.add_row(label, str(status.get(error) or "-"), str(status.get(when) or "-"))
        health.add_row("last sent", "", str(status.get("LastOutboundSentAt") or "-"))
        health.add_row("last inbound sync", "", str(status.get("InboundLastSyncAt") or "-"))
        console.print(health)

    out.emit(data, render)
    return 0


# Allowed values shown in `mailbox set --help` (the parsers accept these, CRM numbers and documented aliases;
# tests/integration/test_cli.py checks each one parses).
SET_METAVARS: dict[str, str] = {
    "Inbound": "{none,outlook,individual,forward}",
    "Outbound": "{none,outlook,router}",
    "Filter": "{all,replies,contacts,email_enabled,none}",
    "Approval": "{empty,approved,pending,rejected}",
    "ForwardSink": "ADDRESS",
    "ProcessEmailFrom": "DATE",
    "TrackedFolders": "JSON",
}
_BOOL_METAVAR = "{true,false}"


def _set_arguments(parser: argparse.ArgumentParser) -> None:
    from core.settings.rows import FIELDS, parse_bool

    parser.add_argument("address", help="the mailbox address (a row is created if the address is new)")
    for spec in FIELDS:
        if spec.cli:
            metavar = _BOOL_METAVAR if spec.parse is parse_bool else SET_METAVARS.get(spec.name, "VALUE")
            parser.add_argument(spec.cli, dest=f"field_{spec.name}", metavar=metavar,
                                help=f'{spec.help}; "" clears the override')
    parser.add_argument("--kind", dest="field_Kind", metavar="{user,queue,forward_sink}",
                        help="whose mailbox this is (rows that exist only in the router)")
    parser.add_argument("--owner-id", dest="field_OwnerId", metavar="GUID", help="systemuserid / queueid")


def _set_changes(args: argparse.Namespace) -> dict[str, str]:
    return {k.removeprefix("field_"): v for k, v in vars(args).items() if k.startswith("field_") and v is not None}


def _validate_set(args: argparse.Namespace) -> None:
    from core.settings.rows import parse_override_changes

    changes = _set_changes(args)
    if not changes:
        raise UsageError("nothing to set: give at least one option (see `emailrouter mailbox set --help`)")
    try:
        parse_override_changes(changes)
    except ValueError as exc:
        raise UsageError(f"not written: {exc}") from exc


def _turns_off(changes: Mapping[str, str]) -> list[str]:
    from core.settings.rows import parse_bool

    off: list[str] = []
    for name in ("Enabled", "EnabledIncoming", "EnabledOutgoing"):
        value = changes.get(name)
        if value:
            try:
                if not parse_bool(value):
                    off.append(name)
            except ValueError:
                pass
    return off


@command("mailbox", "set", help="write admin overrides (\"\" clears one; the CRM value applies again)",
         arguments=_set_arguments, validate=_validate_set, destructive=True,
         description="Write Override* columns of one mailbox row. Values are checked before anything is written. "
                     "Turning a mailbox off (--enabled / --enabled-incoming / --enabled-outgoing false) asks first.",
         examples=["emailrouter mailbox set alice@contoso.com --filter all --track-sent-items true",
                   "emailrouter mailbox set alice@contoso.com --filter \"\"",
                   "emailrouter mailbox set erin@contoso.com --enabled false --yes"])
async def mailbox_set(container: Any, args: argparse.Namespace, out: Out) -> int:
    changes = _set_changes(args)
    if str(changes.get("TrackedFolders") or "").strip():
        changes["TrackedFolders"] = await _folders_by_id(container, args.address, changes["TrackedFolders"])
    off = _turns_off(changes)
    listed = [f"{args.address}: Override{name} = {value!r}" for name, value in sorted(changes.items())]
    if args.dry_run or off:
        action = f"mailbox set ({', '.join(off)} false: the router stops this mailbox's mail)" if off \
            else "mailbox set"
        if not confirm(args, out, action, listed):
            return 0
    try:
        config = await _directory(container).set_overrides(args.address, changes)
    except ValueError as exc:
        raise CliError(f"not written: {exc}") from exc
    hint = _past_mail_hint(config.address, changes)
    data = {"written": sorted(changes), "effective": _config_json(config), "past_mail": hint}

    def render(c: Console) -> None:
        c.print(f"{config.address}: overrides written ({', '.join(sorted(changes))}); effective for new mail within "
                "the settings cache TTL (≤ 60 s)")
        if hint:
            c.print(f"mail decided before keeps its outcome; to apply this change to it: {hint}", highlight=False)

    out.emit(data, render)
    return 0


# Settings whose change can turn an earlier "skipped" into "tracked" (mailbox overrides / org keys).
_DECIDING_FIELDS = frozenset({"Inbound", "Filter", "Approval", "Enabled", "EnabledIncoming", "ForwardSink",
                              "ProcessEmailFrom", "TrackedFolders", "TrackSentItems", "Kind", "OwnerId"})
_DECIDING_ORG_KEYS = frozenset(k.lower() for k in (
    "IgnoreInternalEmail", "DoNotIgnoreInternalEmailToQueues", "InternalDomains", "NeverLogAddresses",
    "NeverLogDomains", "RequireApprovalForUserEmail", "RequireApprovalForQueueEmail",
    "TreatAutoResponseSuppressAsAutoReply", "TreatPrecedenceBulkAsAutoReply", "UseSyncingMailboxFilterOnly",
    "UseCorrelation", "UseTrackingToken", "TrackingPrefixes", "UseReferences", "ResolveForInactiveEntities",
    "UnresolveIfMultipleMatch", "WrapperRequireInternalAuth", "WrapperAuthAsHeader", "WrapperInternalAuthValues",
    "MaxAttachmentBytes", "TrackSentItemsDefault", "DefaultForwardSink"))


def _past_mail_hint(address: str | None, changes: Mapping[str, str] | None = None, key: str | None = None
                    ) -> str | None:
    """The command that applies a settings change to mail the router decided before (None: the change cannot
    change an earlier decision)."""
    if key is not None:
        return "emailrouter reprocess --all --since 7d" if key.lower() in _DECIDING_ORG_KEYS else None
    if changes is not None and not _DECIDING_FIELDS & set(changes):
        return None
    return f"emailrouter reprocess {address} --since 7d"


async def _folders_by_id(container: Any, address: str, raw: str) -> str:
    """TrackedFolders as typed (folder names, paths or ids) -> the same mapping keyed by Graph folder id."""
    from core.settings.folders import FolderNotResolved, resolve_tracked_folders
    from core.settings.rows import format_value, parse_folders

    try:
        typed = {name: f"{ref.table}:{ref.id}" for name, ref in parse_folders(raw).items()}
        resolved = await resolve_tracked_folders(container.graph, address, typed)
    except (FolderNotResolved, ValueError) as exc:
        raise CliError(f"not written: tracked folders: {exc}") from exc
    return str(format_value(parse_folders(resolved)))


def _health_service(container: Any) -> Any:
    from core.settings.health import health_service_for

    return health_service_for(container, role="cli")


def _test_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", nargs="?", help="the mailbox to test (or --all)")
    parser.add_argument("--all", action="store_true", help="test every mailbox, as the Router's Test Access did")
    parser.add_argument("--no-crm-write", dest="crm_write", action="store_false",
                        help="skip the CRM write check (it sets testmailboxaccesscompletedon on the mailbox record)")
    _wait_arguments(parser, 60)


def _validate_test(args: argparse.Namespace) -> None:
    if bool(args.address) == bool(args.all):
        raise UsageError("give one mailbox address or --all")


def _failing_checks(outcome: Any) -> str:
    return "; ".join(f"{c.name}: {c.detail}" for c in outcome.checks if not c.ok)


@command("mailbox", "test", help="probe a mailbox (or --all) now: Graph, subscription, CRM record, CRM write",
         arguments=_test_arguments, validate=_validate_test,
         description="Run the health checks now and record the result (MailboxStatus table and the CRM mailbox "
                     "record). Also checks that the app can write to CRM: it sets testmailboxaccesscompletedon on "
                     "the mailbox record. Exit 1 when a mailbox is failing (pending - e.g. waiting for its first "
                     "subscription - is not a failure).",
         examples=["emailrouter mailbox test alice@contoso.com", "emailrouter mailbox test --all"])
async def mailbox_test(container: Any, args: argparse.Namespace, out: Out) -> int:
    service = _health_service(container)
    if args.all:
        with out.progress() as progress:
            task = progress.add_task("testing mailboxes", total=None)
            outcomes = await service.probe_all(
                crm_write=args.crm_write, progress=lambda done, total: progress.update(task, completed=done,
                                                                                       total=total),
                wait=float(args.wait), on_wait=_say_waiting)
        data: Any = [o.to_json() for o in outcomes]

        def render_all(console: Console) -> None:
            failing = [o for o in outcomes if o.health.value == "failing"]
            table = Table(title=f"{len(outcomes)} mailboxes tested, {len(failing)} failing")
            for col in ("mailbox", "health", "incoming", "outgoing", "failing checks"):
                table.add_column(col, overflow="fold")
            for o in outcomes:
                colour = "red" if o.health.value == "failing" else "green" if o.health.value == "ok" else "white"
                table.add_row(o.address, f"[{colour}]{o.health.value}[/{colour}]", o.incoming.value,
                              o.outgoing.value, _failing_checks(o))
            console.print(table)

        out.emit(data, render_all)
        return 1 if any(o.health.value == "failing" for o in outcomes) else 0

    outcome = await service.probe(args.address, crm_write=args.crm_write)

    def render(console: Console) -> None:
        table = Table(title=f"{outcome.address}: {outcome.health.value} (incoming {outcome.incoming.value}, "
                            f"outgoing {outcome.outgoing.value})")
        table.add_column("check")
        table.add_column("result")
        table.add_column("detail")
        for c in outcome.checks:
            table.add_row(c.name, "[green]ok[/green]" if c.ok else "[yellow]pending[/yellow]" if c.pending
                          else "[red]FAIL[/red]", c.detail)
        console.print(table)

    out.emit(outcome.to_json(), render)
    return 1 if outcome.health.value == "failing" else 0


# ------------------------------------------------------------------------------------------------ settings

group("settings", "org settings (the OrgSettings table)")


@command("settings", "get", help="all org settings, or one KEY, with value, source and meaning",
         arguments=lambda p: p.add_argument("key", nargs="?", help="an OrgSettings key, e.g. MaxAttachmentBytes"))
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


def _settings_set_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("key", help="an OrgSettings key (see `emailrouter settings get`)")
    parser.add_argument("value", help='the admin Value; "" clears it (CRM value or default applies again)')


@command("settings", "set", help="set the admin Value of KEY (\"\" clears it)", arguments=_settings_set_arguments,
         examples=['emailrouter settings set NeverLogDomains "competitor.com, press.example"'])
async def settings_set(container: Any, args: argparse.Namespace, out: Out) -> int:
    try:
        stored = await _directory(container).set_org_value(args.key, args.value)
    except ValueError as exc:
        raise CliError(f"not written: {args.key}: {exc}") from exc
    from core.settings.rows import org_key

    key = org_key(args.key).key
    hint = _past_mail_hint(None, key=key)

    def render(c: Console) -> None:
        c.print(f"{key} = {stored!r}" if stored else f"{key}: admin value cleared")
        if hint:
            c.print(f"mail decided before keeps its outcome; to apply this change to it: {hint}", highlight=False)

    out.emit({"key": key, "value": stored, "past_mail": hint}, render)
    return 0


# ------------------------------------------------------------------------------------------------ sync


def _wait_arguments(parser: argparse.ArgumentParser, default: int = 120) -> None:
    parser.add_argument("--wait", type=int, default=default, metavar="SECONDS",
                        help=f"when the same job is already running (the timer, another admin): wait this long for "
                             f"it to finish, then give up (default {default}; 0 = do not wait)")


def _say_waiting(message: str) -> None:
    Console(stderr=True, soft_wrap=True).print(message, markup=False, highlight=False)


@command("sync-crm", help="copy delivery methods and org settings from CRM now",
         arguments=_wait_arguments,
         description="Read CRM now (as the crm_settings_sync timer does), write the settings tables, and re-probe "
                     "the health of every mailbox that changed. Runs one at a time: when the timer (or another "
                     "admin) is syncing, waits for it (--wait).")
async def sync_crm(container: Any, args: argparse.Namespace, out: Out) -> int:
    from core.settings.crm_sync import sync_now

    with out.progress() as progress:
        task = progress.add_task("reading CRM", total=None)

        def tick(step: str, done: int, total: int) -> None:
            progress.update(task, description=step, completed=done, total=total or None)

        report = await sync_now(container, role="cli", wait=float(args.wait), on_wait=_say_waiting, progress=tick)

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

group("subscriptions", "Graph change-notification subscriptions")


@command("subscriptions", "list", help="the router's Graph subscriptions: mailbox, folder, expiry, id")
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


@command("subscriptions", "reconcile", help="create/renew/delete subscriptions now (needs WEBHOOK_BASE_URL)",
         arguments=_wait_arguments,
         description="Make the Graph subscriptions match the mailbox settings now (as the subscription_reconcile "
                     "timer does): create missing ones, renew expiring ones, delete unwanted and duplicate ones, "
                     "then re-probe the health of the mailboxes that changed. Runs one at a time: when the timer "
                     "(or another admin) is reconciling, waits for it to finish (--wait), then checks again.")
async def subscriptions_reconcile(container: Any, args: argparse.Namespace, out: Out) -> int:
    try:
        from core.services.subscriptions import service_for
    except ImportError as exc:
        raise NotAvailableError("subscriptions reconcile is not available in this build") from exc
    service = service_for(container, role="cli")
    with out.progress() as progress:
        task = progress.add_task("reconciling subscriptions", total=None)
        report = await service.reconcile(
            progress=lambda done, total: progress.update(task, completed=done, total=total or None),
            wait=float(args.wait), on_wait=_say_waiting)
    data = report.as_dict()
    out.emit(data, lambda c: c.print(", ".join(f"{k} {v if not isinstance(v, list) else len(v)}"
                                               for k, v in data.items())
                                     + "".join(f"\n  failed {f['mailbox']} {f['folder']}: {f['reason']}"
                                               for f in data["failed"])))
    return 1 if data["failed"] else 0


def _catch_up_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("addresses", nargs="*", metavar="ADDRESS", help="only these mailboxes (default: every "
                        "mailbox the router reads)")
    _wait_arguments(parser, 60)


@command("catch-up", help="run a delta round for every watched mailbox now (what the delta_catchup timer does)",
         arguments=_catch_up_arguments,
         description="Queue one mailbox-sync item per watched mailbox (or per ADDRESS): each runs a delta round "
                     "that enqueues the mail a missed notification would have brought. Safe to run while the timer "
                     "runs: one fan-out at a time, and one round per mailbox at a time.",
         examples=["emailrouter catch-up", "emailrouter catch-up erin@contoso.com"])
async def catch_up(container: Any, args: argparse.Namespace, out: Out) -> int:
    from core.services.delta import delta_service_for

    service = delta_service_for(container, role="cli")
    count = await service.fan_out(reason="manual", only=args.addresses or None, wait=float(args.wait),
                                  on_wait=_say_waiting)
    if args.addresses and count < len(set(args.addresses)):
        raise CliError(f"{count} of {len(set(args.addresses))} mailbox(es) queued: the others are not read by the "
                       "router (see `emailrouter mailbox show ADDRESS`)")
    out.emit({"enqueued": count}, lambda c: c.print(f"{count} mailbox sync item(s) queued; the mailbox_sync "
                                                    "function runs the delta rounds"))
    return 0


# ------------------------------------------------------------------------------------------------ retention

group("retention", "the router's own records expire: decision records, index and ledger rows, old forward wrappers")


@command("retention", "run", help="delete expired records now (what the delta catch-up timer does hourly)",
         arguments=_wait_arguments,
         description="Delete decision records and their index rows decided more than RetentionDays ago, outbound "
                     "finished-index rows as old, processed-ledger rows that delta can no longer report again, and "
                     "processed forward wrappers older than ProcessedWrapperDays - at most RETENTION_MAX_DELETES per "
                     "run. One run at a time: when the timer is cleaning up, waits for it (--wait).",
         examples=["emailrouter retention run"])
async def retention_run(container: Any, args: argparse.Namespace, out: Out) -> int:
    from core.services.retention import retention_service_for

    with out.progress() as progress:
        progress.add_task("deleting expired records", total=None)
        report = await retention_service_for(container, role="cli").run(wait=float(args.wait), on_wait=_say_waiting)

    def render(console: Console) -> None:
        console.print(f"deleted {report.deleted} (decision records {report.decisions}, index rows "
                      f"{report.index_rows}, outbound index rows {report.outbound_rows}, ledger rows "
                      f"{report.ledger_rows}, forward wrappers {report.wrappers}) older than "
                      f"{report.cutoff:%Y-%m-%d} UTC" + ("; more next run" if report.more else ""))
        for mailbox, until in sorted(report.ledger_held.items()):
            console.print(f"  {mailbox}: ledger rows kept from {until:%Y-%m-%d %H:%M} UTC on (delta could still "
                          "report them again)", highlight=False)
        for error in report.errors:
            console.print(f"  [red]error[/red] {error}", highlight=False)

    out.emit(report.to_json(), render)
    return 1 if report.errors else 0


# ------------------------------------------------------------------------------------------------ poison

group("poison", "poison queues: messages the pipelines gave up on, with the recorded reason")

_QUEUE_HELP = f"one of {', '.join(QUEUES)} (default: all)"


def _poison_queues(queue: str | None) -> list[str]:
    if queue is None:
        return [q + POISON_SUFFIX for q in QUEUES]
    name = queue if queue.endswith(POISON_SUFFIX) else queue + POISON_SUFFIX
    if name not in ALL_QUEUES:
        raise UsageError(f"unknown queue {queue!r} (known: {', '.join(QUEUES)})")
    return [name]


def _validate_queue(args: argparse.Namespace) -> None:
    _poison_queues(args.queue)


async def _reasons(container: Any, poison_queue: str) -> dict[str, str]:
    """MessageHash -> recorded reason (PoisonLog rows are partitioned by queue name, poison or origin)."""
    table = container.storage.table(POISON_LOG_TABLE)
    out: dict[str, str] = {}
    for partition in (poison_queue, poison_queue.removesuffix(POISON_SUFFIX)):
        async for row in table.list_partition(partition):
            out.setdefault(str(row.get("MessageHash", "")), str(row.get("Reason", "")))
    return out


async def _peek(container: Any, queues: list[str]) -> list[dict[str, Any]]:
    from core.adapters.storage import hash_key

    data: list[dict[str, Any]] = []
    for queue in queues:
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
    return data


@command("poison", "list", help="messages in the poison queues (first 32 per queue), with the recorded reason",
         arguments=lambda p: p.add_argument("queue", nargs="?", help=_QUEUE_HELP), validate=_validate_queue)
async def poison_list(container: Any, args: argparse.Namespace, out: Out) -> int:
    data = await _peek(container, _poison_queues(args.queue))

    def render(console: Console) -> None:
        table = Table(title=f"{len(data)} poisoned messages (first 32 per queue)")
        for col in ("queue", "queue message id", "reason", "content"):
            table.add_column(col, overflow="fold")
        for r in data:
            table.add_row(r["queue"], r["id"], r["reason"], r["content"][:120])
        console.print(table)

    out.emit(data, render)
    return 0


async def _queue_depths(container: Any, queues: list[str]) -> dict[str, int | None]:
    depths: dict[str, int | None] = {}
    service = container.storage.queue_service
    for name in queues:
        try:
            props = await service.get_queue_client(name).get_queue_properties()
            depths[name] = int(props.approximate_message_count or 0)
        except Exception:
            depths[name] = None  # queue not created yet
    return depths


async def _take(container: Any, queues: list[str], wanted: str | None, act: Callable[..., Any],
                progress: Callable[[int], None] | None = None) -> list[str]:
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
                        if progress is not None:
                            progress(len(done))
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


def _replay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("queue_message_id", nargs="?", metavar="QUEUE-MESSAGE-ID",
                        help="the queue message id `emailrouter poison list` shows (not an Internet Message-ID)")
    parser.add_argument("--all", action="store_true", help="every message of the poison queue(s)")
    parser.add_argument("--queue", help=_QUEUE_HELP)


def _validate_replay(args: argparse.Namespace) -> None:
    if bool(args.queue_message_id) == bool(args.all):
        raise UsageError("give one QUEUE-MESSAGE-ID or --all")
    _poison_queues(args.queue)


@command("poison", "replay", help="move poisoned message(s) back to their queue to be processed again",
         arguments=_replay_arguments, validate=_validate_replay, destructive=True,
         description="Move one poisoned message (by the queue message id from `poison list`) or --all of them "
                     "back to the queue they came from. --all asks first (--yes to skip, --dry-run to only list).",
         examples=["emailrouter poison replay 6f1c...-queue-message-id",
                   "emailrouter poison replay --all --queue inbound-mail --yes"])
async def poison_replay(container: Any, args: argparse.Namespace, out: Out) -> int:
    queues = _poison_queues(args.queue)
    total: int | None = None
    if args.all:
        depths = await _queue_depths(container, queues)
        listed = [f"{q}: {n} message(s) back to {q.removesuffix(POISON_SUFFIX)}" for q, n in depths.items() if n]
        if not listed and not args.dry_run:
            out.emit({"replayed": []}, lambda c: c.print("the poison queue(s) are empty"))
            return 0
        if not confirm(args, out, "poison replay --all", listed):
            return 0
        total = sum(n or 0 for n in depths.values())
    elif args.dry_run:
        confirm(args, out, "poison replay", [args.queue_message_id])
        return 0

    async def move(browser: Any, item: Any) -> None:
        await browser.move_back(item)

    with out.progress() as progress:
        task = progress.add_task("replaying", total=total)
        done = await _take(container, queues, None if args.all else args.queue_message_id, move,
                           lambda n: progress.update(task, completed=n))
    if not done and args.queue_message_id:
        raise CliError(f"no poisoned message with queue message id {args.queue_message_id}")
    out.emit({"replayed": done}, lambda c: c.print(f"replayed {len(done)} message(s)"))
    return 0


def _discard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("queue_message_id", metavar="QUEUE-MESSAGE-ID",
                        help="the queue message id `emailrouter poison list` shows")
    parser.add_argument("--queue", help=_QUEUE_HELP)


@command("poison", "discard", help="delete a poisoned message for good (asks first)", arguments=_discard_arguments,
         validate=_validate_queue, destructive=True,
         examples=["emailrouter poison discard 6f1c...-queue-message-id --yes"])
async def poison_discard(container: Any, args: argparse.Namespace, out: Out) -> int:
    queues = _poison_queues(args.queue)
    known = {r["id"]: r for r in await _peek(container, queues)}
    item = known.get(args.queue_message_id)
    described = (f"{args.queue_message_id} in {item['queue']}: {item['reason']}" if item
                 else args.queue_message_id)
    if not confirm(args, out, "poison discard (the message is deleted for good)", [described]):
        return 0

    async def delete(browser: Any, found: Any) -> None:
        await browser.delete(found)

    done = await _take(container, [item["queue"]] if item else queues, args.queue_message_id, delete)
    if not done:
        raise CliError(f"no poisoned message with queue message id {args.queue_message_id}")
    out.emit({"discarded": done}, lambda c: c.print(f"discarded {args.queue_message_id}"))
    return 0


# ------------------------------------------------------------------------------------------------ backfill


def _backfill_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", help="the mailbox to read")
    parser.add_argument("--since", required=True, metavar="DATE", help="ISO date, e.g. 2024-01-31")
    parser.add_argument("--reevaluate", action="store_true",
                        help="also decide again the messages the router skipped or failed before (with today's "
                             "settings); without it they are left as they were")


def _validate_backfill(args: argparse.Namespace) -> None:
    from core.settings.rows import parse_datetime

    try:
        parse_datetime(args.since)
    except ValueError as exc:
        raise UsageError(f"--since: {exc}") from exc


@command("backfill", help="feed historical mail through the normal pipeline (idempotent)",
         arguments=_backfill_arguments, validate=_validate_backfill,
         examples=["emailrouter backfill alice@contoso.com --since 2024-01-01"])
async def backfill(container: Any, args: argparse.Namespace, out: Out) -> int:
    from core.settings.rows import parse_datetime

    try:
        from core.services.delta import backfill as run_backfill
    except ImportError as exc:
        raise NotAvailableError("backfill is not available in this build") from exc
    since = parse_datetime(args.since)
    reevaluate = ("skipped", "failed") if args.reevaluate else ()
    with out.progress() as progress:
        task = progress.add_task(f"enqueueing {args.address}", total=None)
        report = await run_backfill(container, args.address, since,
                                    lambda n: progress.update(task, completed=n), reevaluate=reevaluate)
    if report.error:
        raise CliError(f"{args.address}: {report.error}")
    data = {"mailbox": report.mailbox, "since": since, "enqueued": report.enqueued, "folders": report.folders,
            "reevaluate": list(reevaluate)}
    note = ("messages the router skipped or failed before are decided again with today's settings; tracked ones "
            "stay as they are (one CRM email each)" if reevaluate else
            "messages the router has decided before are left as they were: tracked ones stay one CRM email, skipped "
            "ones stay skipped (decide those again with --reevaluate or `emailrouter reprocess`)")
    out.emit(data, lambda c: c.print(f"{report.enqueued} message(s) from {', '.join(report.folders)} enqueued; "
                                     f"{note}"))
    return 0


# ------------------------------------------------------------------------------------------------ reprocess


def _reprocess_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", nargs="?", help="the mailbox (a forward user's address finds the mail unwrapped "
                                                   "for them in the forward mailbox)")
    parser.add_argument("--all", action="store_true", help="every mailbox (after an org setting changed)")
    parser.add_argument("--since", required=True, metavar="WHEN",
                        help="decisions made since: 30m, 2h, 7d, 2w or an ISO date (decision records are kept "
                             "RetentionDays, default 30)")
    parser.add_argument("--outcome", choices=("skipped", "failed", "all"), default="all",
                        help="which earlier outcomes to decide again (default all: skipped and failed)")
    parser.add_argument("--from", dest="sender", metavar="TEXT", help="only mail whose sender's address contains TEXT")
    parser.add_argument("--subject", metavar="TEXT", help="only mail whose subject contains TEXT")


def _validate_reprocess(args: argparse.Namespace) -> None:
    from datetime import UTC, datetime

    from .diagnose import parse_since

    if bool(args.address) == bool(args.all):
        raise UsageError("give one mailbox ADDRESS or --all")
    parse_since(args.since, datetime.now(UTC))


@command("reprocess", help="decide again the mail that was skipped or failed (after a filter or setting change)",
         arguments=_reprocess_arguments, validate=_validate_reprocess, destructive=True,
         description="Find the messages whose latest decision since --since was skipped (or failed) in the decision "
                     "records, and queue each to be decided again through the normal pipeline with today's "
                     "settings: what the new filter accepts is tracked, once (the CRM email id comes from the "
                     "Message-ID, which is looked up in CRM first); tracked mail is never touched. Shows the "
                     "messages and asks first (--yes to skip, --dry-run to only list).",
         examples=["emailrouter reprocess erin@contoso.com --since 7d",
                   "emailrouter reprocess erin@contoso.com --since 2024-05-01 --outcome skipped --yes",
                   "emailrouter reprocess --all --since 24h --dry-run"])
async def reprocess(container: Any, args: argparse.Namespace, out: Out) -> int:
    from datetime import UTC, datetime

    from core.services.reprocess import reprocess as run_reprocess

    from .diagnose import parse_since

    since = parse_since(args.since, datetime.now(UTC))
    outcomes = ("skipped", "failed") if args.outcome == "all" else (args.outcome,)
    mailbox = None if args.all else args.address
    with out.progress() as progress:
        task = progress.add_task("reading decisions", total=None)
        planned = await run_reprocess(container, mailbox, since, outcomes=outcomes, sender=args.sender,
                                      subject=args.subject, dry_run=True,
                                      on_day=lambda d, n: progress.update(task, completed=d, total=n))
    who = mailbox or "every mailbox"
    if not planned.items:
        out.emit(planned.to_json(), lambda c: c.print(f"nothing to decide again: no {' or '.join(outcomes)} mail "
                                                      f"for {who} since {since:%Y-%m-%d %H:%M} UTC"))
        return 0
    listed = [f"{i['decided_at']:%Y-%m-%d %H:%M} {i['tracked_for'] or i['mailbox']}: {i['from']} "
              f"'{i['subject']}' ({i['outcome']})" for i in planned.items]
    if not confirm(args, out, f"reprocess {who}: decide again", listed):
        return 0
    report = await run_reprocess(container, mailbox, since, outcomes=outcomes, sender=args.sender,
                                 subject=args.subject, now=planned.requested_at)
    counts = ", ".join(f"{k} {v}" for k, v in report.by_outcome.most_common())
    follow = f"emailrouter explain --mailbox {mailbox} --since 10m" if mailbox else "emailrouter status"
    out.emit(report.to_json(), lambda c: c.print(
        f"{report.enqueued} message(s) queued to be decided again ({counts}); the inbound processor decides them "
        f"with today's settings within moments. See the result: {follow}", highlight=False))
    return 0


# ------------------------------------------------------------------------------------------------ forward rules

group("forward-rules", "Exchange inbox rules that forward mail as an attachment to a forward mailbox (sink)",
      "The Rule Deployment Wizard, through Graph messageRules: deploy or remove the rule "
      f"\"{RULE_NAME}\" in forward users' mailboxes. Both show the users first and ask.")


def _rules_arguments(deploy: bool) -> Callable[[argparse.ArgumentParser], None]:
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--users", metavar="ADDRESSES",
                            help="comma-separated addresses (default: every mailbox whose Inbound is forward)")
        if deploy:
            parser.add_argument("--sink", metavar="ADDRESS",
                                help="the forward mailbox (default: each user's ForwardSink)")

    return add


def _forwards_to(rule: Mapping[str, Any], sink: str) -> bool:
    targets = (rule.get("actions") or {}).get("forwardAsAttachmentTo") or []
    return [str((t.get("emailAddress") or {}).get("address", "")).lower() for t in targets] == [sink]


def _rule_body(sink: str) -> dict[str, Any]:
    return {"displayName": RULE_NAME, "sequence": 1, "isEnabled": True,
            "conditions": {},
            "exceptions": {"fromAddresses": [{"emailAddress": {"address": sink}}]},  # never bounce wrappers back
            "actions": {"forwardAsAttachmentTo": [{"emailAddress": {"address": sink}}], "stopProcessingRules": False}}


async def _rule_users(directory: Any, args: argparse.Namespace) -> list[str]:
    from core.domain.model import InboundMethod
    from core.settings.rows import normalise_address

    if args.users:
        users = [normalise_address(u) for u in args.users.split(",") if u.strip()]
    else:
        users = [m.address for m in await directory.list_mailboxes() if m.inbound_method is InboundMethod.FORWARD]
    if not users:
        raise CliError("no users: pass --users or configure forward-mailbox users first")
    return users


async def _plan_rule(container: Any, directory: Any, action: str, user: str, sink: str | None) -> dict[str, Any]:
    """What deploy/remove would do for one user (Graph and settings reads only)."""
    existing = [r for r in await container.graph.list_inbox_rules(user) if r.get("displayName") == RULE_NAME]
    plan: dict[str, Any] = {"user": user, "sink": sink, "existing": existing}
    if action == "remove":
        plan["change"] = "remove rule" if existing else None
        return plan
    if not sink:
        raise CliError("no sink: pass --sink")
    from core.domain.model import MailboxKind

    sink_config = await directory.get_mailbox(sink)
    if sink_config is not None and sink_config.kind is not MailboxKind.FORWARD_SINK:
        raise CliError(f"{sink} is a {sink_config.kind.value} mailbox, not a forward mailbox")
    if len(existing) == 1 and _forwards_to(existing[0], sink) and existing[0].get("isEnabled", True):
        plan["change"] = None
    else:
        plan["change"] = f"{'replace' if existing else 'create'} rule forwarding as attachment to {sink}"
    extra = [f"make {sink} the forward mailbox (OverrideKind)"] if sink_config is None else []
    config = await directory.get_mailbox(user)
    if config is not None and config.forward_sink_address != sink:
        extra.append(f"set OverrideForwardSink = {sink}")
    if extra:
        plan["change"] = "; ".join([plan["change"], *extra] if plan["change"] else extra)
    return plan


async def _apply_rule(container: Any, directory: Any, action: str, plan: dict[str, Any]) -> dict[str, Any]:
    from core.domain.model import MailboxKind

    graph, user, sink, existing = container.graph, plan["user"], plan["sink"], plan["existing"]
    if action == "remove":
        for rule in existing:
            await graph.delete_inbox_rule(user, str(rule["id"]))
        return {"user": user, "result": "removed" if existing else "absent"}
    note = ""
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


def _error_detail(exc: Exception) -> str:
    return str(exc) if isinstance(exc, CliError) else f"{type(exc).__name__}: {exc}"


async def _forward_rules(container: Any, args: argparse.Namespace, out: Out, action: str) -> int:
    from core.settings.rows import normalise_address

    directory = _directory(container)
    users = await _rule_users(directory, args)
    plans: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    with out.progress() as progress:
        task = progress.add_task("reading inbox rules", total=len(users))
        for user in users:
            config = await directory.get_mailbox(user)
            sink = getattr(args, "sink", None)
            sink = normalise_address(sink) if sink else (config.forward_sink_address if config else None)
            try:
                plans.append(await _plan_rule(container, directory, action, user, sink))
            except Exception as exc:
                results.append({"user": user, "result": "error", "detail": _error_detail(exc)})
            progress.advance(task)
    changing = [p for p in plans if p["change"]]
    results.extend({"user": p["user"], "result": "unchanged",
                    "detail": f"forwards to {p['sink']}" if action == "deploy" else "no rule"}
                   for p in plans if not p["change"])
    if changing and not confirm(args, out, f"forward-rules {action}",
                                [f"{p['user']}: {p['change']}" for p in changing]):
        return 0
    with out.progress() as progress:
        task = progress.add_task(f"forward-rules {action}", total=len(changing))
        for plan in changing:
            try:
                results.append(await _apply_rule(container, directory, action, plan))
            except Exception as exc:
                results.append({"user": plan["user"], "result": "error", "detail": _error_detail(exc)})
            progress.advance(task)
    if action == "remove":
        for r in results:
            if r["result"] == "unchanged":
                r["result"] = "absent"
    results.sort(key=lambda r: users.index(r["user"]) if r["user"] in users else len(users))

    def render(console: Console) -> None:
        table = Table(title=f"forward-rules {action}")
        for col in ("user", "result", "detail"):
            table.add_column(col)
        for r in results:
            table.add_row(r["user"], r["result"], r.get("detail", ""))
        console.print(table)

    out.emit(results, render)
    return 1 if any(r["result"] == "error" for r in results) else 0


@command("forward-rules", "deploy", help="create or fix the forward-as-attachment rule for forward users",
         arguments=_rules_arguments(deploy=True), destructive=True,
         description="Create the inbox rule that forwards every message as an attachment to the sink (except mail "
                     "from the sink), for the given users or every forward-mailbox user. Shows which users change "
                     "and asks first; a correct rule is left alone.",
         examples=["emailrouter forward-rules deploy --dry-run",
                   "emailrouter forward-rules deploy --users bob@contoso.com --sink crm-sink@contoso.com --yes"])
async def forward_rules_deploy(container: Any, args: argparse.Namespace, out: Out) -> int:
    return await _forward_rules(container, args, out, "deploy")


@command("forward-rules", "remove", help="delete the router's forward rule from users' mailboxes",
         arguments=_rules_arguments(deploy=False), destructive=True,
         examples=["emailrouter forward-rules remove --users bob@contoso.com --yes"])
async def forward_rules_remove(container: Any, args: argparse.Namespace, out: Out) -> int:
    return await _forward_rules(container, args, out, "remove")
