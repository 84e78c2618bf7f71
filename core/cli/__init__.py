"""``emailrouter``: the admin CLI (console script ``emailrouter = "core.cli:main"``).

Thin shell: parse arguments, build the same ``Container`` the functions use (from the environment,
``local.settings.json`` or a running local stack — see ``core.cli.config``), call the settings / health / inbound
services, print rich tables or ``--json``. Exit codes: 0 ok, 1 error (message on stderr), 2 usage error or a
command not available in this build.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="emailrouter", description="Email Router for Dynamics 365: admin CLI")
    p.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    p.add_argument("--settings", type=Path, help="local.settings.json-style file (default ./local.settings.json)")
    sub = p.add_subparsers(dest="command", required=True)

    mailbox = sub.add_parser("mailbox", help="mailbox settings and health").add_subparsers(dest="action",
                                                                                          required=True)
    mailbox.add_parser("list", help="every mailbox with its effective settings and health")
    show = mailbox.add_parser("show", help="one mailbox: each setting with its source (override/crm/default)")
    show.add_argument("address")
    setp = mailbox.add_parser("set", help="write admin overrides (\"\" clears one; CRM value applies again)")
    setp.add_argument("address")
    from core.settings.rows import FIELDS

    for spec in FIELDS:
        if spec.cli:
            setp.add_argument(spec.cli, dest=f"field_{spec.name}", metavar="VALUE", help=spec.help)
    setp.add_argument("--kind", dest="field_Kind", metavar="VALUE", help="user | queue | forward_sink")
    setp.add_argument("--owner-id", dest="field_OwnerId", metavar="GUID", help="systemuserid / queueid")
    test = mailbox.add_parser("test", help="probe the mailbox now (Graph, subscription, CRM) and record the result")
    test.add_argument("address")

    settings = sub.add_parser("settings", help="org settings").add_subparsers(dest="action", required=True)
    get = settings.add_parser("get", help="all org settings, or one KEY")
    get.add_argument("key", nargs="?")
    sset = settings.add_parser("set", help="set the admin Value of KEY (\"\" clears it)")
    sset.add_argument("key")
    sset.add_argument("value")

    sub.add_parser("sync-crm", help="copy delivery methods and org settings from CRM now")

    subs = sub.add_parser("subscriptions", help="Graph subscriptions").add_subparsers(dest="action", required=True)
    subs.add_parser("list")
    subs.add_parser("reconcile", help="create/renew/delete subscriptions now")

    poison = sub.add_parser("poison", help="poison queues").add_subparsers(dest="action", required=True)
    plist = poison.add_parser("list", help="messages in the poison queues, with the recorded reason")
    plist.add_argument("queue", nargs="?", help="inbound-mail, outbound-mail, mailbox-sync (default: all)")
    replay = poison.add_parser("replay", help="move a poisoned message back to its queue")
    replay.add_argument("id", nargs="?")
    replay.add_argument("--all", action="store_true")
    replay.add_argument("--queue", help="only this queue")
    discard = poison.add_parser("discard", help="delete a poisoned message")
    discard.add_argument("id")
    discard.add_argument("--queue", help="only this queue")

    backfill = sub.add_parser("backfill", help="feed historical mail through the normal pipeline (idempotent)")
    backfill.add_argument("address")
    backfill.add_argument("--since", required=True, help="ISO date, e.g. 2024-01-31")

    rules = sub.add_parser("forward-rules", help="Exchange inbox rules forwarding as attachment to a sink")
    rules.add_argument("action", choices=["deploy", "remove"])
    rules.add_argument("--users", help="comma-separated addresses (default: every forward-mailbox user)")
    rules.add_argument("--sink", help="sink address (deploy: required unless the users' ForwardSink is set)")

    explain = sub.add_parser("explain", help="the recorded decision path of one message")
    explain.add_argument("message_id", help="Internet Message-ID, e.g. <abc@x>")

    sub.add_parser("status", help="one screen: mailbox health, queues, poison, last runs")

    doctor = sub.add_parser("doctor", help="check the org after deploying: metadata, privileges, Server-Side Sync, "
                                           "settings; --sandbox also writes and deletes throw-away records")
    doctor.add_argument("--sandbox", action="store_true",
                        help="create one throw-away email, exercise every bind and the outbound state path, delete it")
    doctor.add_argument("--mailbox", help="router mailbox for the Graph draft check (default: the first router-"
                                          "outbound mailbox in the settings table)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(argv) if argv is not None else None)
    from .commands import CliError, NotAvailableError, run

    try:
        return asyncio.run(run(args, cwd=Path.cwd(), environ=os.environ))
    except NotAvailableError as exc:
        print(f"emailrouter: {exc}", file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"emailrouter: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
