"""``emailrouter``: the admin CLI (console script ``emailrouter = "core.cli:main"``).

Thin shell: parse arguments, check them, build the same ``Container`` the functions use (from the environment,
``local.settings.json`` or a running local stack — see ``core.cli.config``), call the services, print rich tables or
``--json``.

Conventions (az / gh style):

* Global options work before or after the command: ``--json`` (machine-readable output on stdout; progress bars
  and prompts go to stderr) and ``--settings FILE``. ``--version`` prints the package version.
* Every group and command has ``--help``; options list their allowed values.
* Bulk or destructive commands (``forward-rules deploy|remove``, ``poison replay --all``, ``poison discard``,
  ``mailbox set --enabled false``) show what they will change and ask; ``--yes`` skips the question, ``--dry-run``
  only shows. Without a terminal on stdin they refuse to run unless ``--yes`` is given.
* Long operations show a progress bar on stderr (only when stderr is a terminal, never with ``--json``).

Exit codes:

====  ==========================================================================================================
0     success
1     the command ran and failed (an error, a failing mailbox test, a failed item, a declined confirmation)
2     usage: unknown command or option, bad or missing argument, a destructive command without ``--yes`` and no
      terminal to ask — always before anything was changed
3     unavailable: a required app setting is missing, a service (storage, Graph, Dataverse) cannot be reached, or
      the command is not available in this build
130   interrupted (Ctrl-C)
====  ==========================================================================================================

Adding a command: write an async handler in a module of this package, register it with
``core.cli.registry.command`` (see that module's docstring for the pattern and the errors to raise), and add the
module to :data:`COMMAND_MODULES` below.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

__all__ = ["COMMAND_MODULES", "build_parser", "main", "version"]

# Modules whose import registers commands (``core.cli.registry.command``); one line per module.
COMMAND_MODULES: tuple[str, ...] = (
    "core.cli.commands",
    "core.cli.diagnose",
    "core.cli.doctor",
)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("email-router-d365")
    except PackageNotFoundError:  # running from a source tree that was not pip-installed
        from core.config import VERSION

        return VERSION


def _global_options(defaults: bool) -> argparse.ArgumentParser:
    """``--json`` / ``--settings``, accepted on the top-level parser and on every subcommand. Sub-parsers use
    SUPPRESS as default so a value given before the command is not reset by the subcommand's parser."""
    common = argparse.ArgumentParser(add_help=False)
    options = common.add_argument_group("global options")
    options.add_argument("--json", action="store_true", default=False if defaults else argparse.SUPPRESS,
                         help="machine-readable JSON on stdout")
    options.add_argument("--settings", type=Path, metavar="FILE", default=None if defaults else argparse.SUPPRESS,
                         help="local.settings.json-style file (default ./local.settings.json)")
    return common


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=36)


def build_parser() -> argparse.ArgumentParser:
    from .registry import COMMANDS, GROUPS

    for module in COMMAND_MODULES:
        importlib.import_module(module)
    common = _global_options(defaults=False)
    parser = argparse.ArgumentParser(
        prog="emailrouter", parents=[_global_options(defaults=True)], formatter_class=_formatter,
        description="Email Router for Dynamics 365: admin CLI",
        epilog="exit codes: 0 ok, 1 failed, 2 usage, 3 not configured / unavailable\n"
               "run `emailrouter COMMAND --help` for a command's options")
    parser.add_argument("--version", action="version", version=f"emailrouter {version()}")
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}
    for path, spec in sorted(COMMANDS.items(), key=lambda item: item[0]):
        if len(path) == 1:
            sub = top.add_parser(path[0], help=spec.help, description=_wrap(spec.description or spec.help),
                                 parents=[common], formatter_class=_formatter,
                                 epilog=_examples(spec.examples))
        else:
            if path[0] not in groups:
                info = GROUPS.get(path[0])
                group_parser = top.add_parser(path[0], help=info.help if info else "",
                                              description=_wrap(info.description or info.help) if info else None,
                                              parents=[common], formatter_class=_formatter)
                groups[path[0]] = group_parser.add_subparsers(dest="action", required=True, metavar="ACTION")
            sub = groups[path[0]].add_parser(path[1], help=spec.help,
                                             description=_wrap(spec.description or spec.help),
                                             parents=[common], formatter_class=_formatter,
                                             epilog=_examples(spec.examples))
        if spec.arguments is not None:
            spec.arguments(sub)
        if spec.destructive:
            sub.add_argument("--yes", "-y", action="store_true", help="do it without asking")
            sub.add_argument("--dry-run", action="store_true", help="only show what would change")
        sub.set_defaults(_command=path)
    return parser


def _wrap(text: str | None) -> str | None:
    return textwrap.fill(text, 100) if text else text


def _examples(examples: Sequence[str]) -> str | None:
    return "examples:\n" + "\n".join(f"  {e}" for e in examples) if examples else None


def main(argv: Sequence[str] | None = None) -> int:
    from .registry import COMMANDS, CliError

    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    for name in ("yes", "dry_run"):
        if not hasattr(args, name):
            setattr(args, name, False)
    spec = COMMANDS[args._command]
    from .commands import run

    try:
        if spec.validate is not None:
            spec.validate(args)
        return asyncio.run(run(spec, args, cwd=Path.cwd(), environ=os.environ))
    except CliError as exc:
        label = {2: "usage", 3: "unavailable"}.get(exc.exit_code, "error")
        print(f"emailrouter: {label}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
