"""How a command joins the ``emailrouter`` CLI, and what every command shares (output, errors, confirmation).

A command is an async handler registered with :func:`command`::

    from core.cli.registry import Out, command

    @command("skipped", "list", help="recently skipped mail with the reason",
             arguments=lambda p: p.add_argument("--mailbox", help="only this mailbox"))
    async def skipped_list(container, args, out: Out) -> int:
        ...
        out.emit(data, render)
        return 0

``command("doctor")`` is a top-level command; ``command("mailbox", "list")`` a subcommand of the ``mailbox`` group
(declare the group's help once with :func:`group`). The module holding the handler must be listed in
``core.cli.COMMAND_MODULES`` so the parser imports it. Handlers receive the wired ``Container`` (built after the
arguments were parsed and checked by ``validate``), the parsed ``args`` and an :class:`Out`; they return the exit
code and raise :class:`CliError` (exit 1), :class:`UsageError` (2) or :class:`UnavailableError` (3) with a message
for the admin. Global options (``--json``, ``--settings``) are added to every parser by ``core.cli``, so they work
before or after the command. Bulk or destructive commands take ``destructive=True``: they get ``--yes`` and
``--dry-run`` and call :func:`confirm` with the list of what they are about to change.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = [
    "COMMANDS",
    "GROUPS",
    "CliError",
    "Command",
    "NotAvailableError",
    "Out",
    "UnavailableError",
    "UsageError",
    "command",
    "confirm",
    "group",
]

Handler = Callable[[Any, argparse.Namespace, "Out"], Awaitable[int]]


class CliError(Exception):
    """The command ran and failed; a clear, user-facing message (exit 1)."""

    exit_code = 1


class UsageError(CliError):
    """Bad or missing arguments, found before anything was changed (exit 2, like argparse's own errors)."""

    exit_code = 2


class UnavailableError(CliError):
    """Not configured, a service unreachable, or a command missing from this build (exit 3)."""

    exit_code = 3


NotAvailableError = UnavailableError  # the earlier name


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]
    handler: Handler
    help: str
    description: str = ""
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    validate: Callable[[argparse.Namespace], None] | None = None  # pure checks, run before any configuration
    destructive: bool = False
    examples: tuple[str, ...] = ()


@dataclass(frozen=True)
class Group:
    name: str
    help: str
    description: str = ""


COMMANDS: dict[tuple[str, ...], Command] = {}
GROUPS: dict[str, Group] = {}


def group(name: str, help: str, description: str = "") -> None:
    GROUPS[name] = Group(name, help, description)


def command(*path: str, help: str, description: str = "",
            arguments: Callable[[argparse.ArgumentParser], None] | None = None,
            validate: Callable[[argparse.Namespace], None] | None = None, destructive: bool = False,
            examples: Iterable[str] = ()) -> Callable[[Handler], Handler]:
    if not 1 <= len(path) <= 2:
        raise ValueError("a command is NAME or GROUP NAME")

    def register(handler: Handler) -> Handler:
        if path in COMMANDS:
            raise ValueError(f"emailrouter {' '.join(path)} is registered twice")
        COMMANDS[path] = Command(path, handler, help, description, arguments, validate, destructive,
                                 tuple(examples))
        return handler

    return register


# ------------------------------------------------------------------------------------------------ output


@dataclass
class Out:
    """Where a command's result goes: a rich rendering on stdout, or JSON (``--json``; progress and prompts then go
    to stderr so stdout stays parseable)."""

    json: bool
    console: Console = field(init=False)

    def __post_init__(self) -> None:
        self.console = Console(stderr=self.json, soft_wrap=False, width=max(100, Console().width))

    def emit(self, data: Any, render: Callable[[Console], None]) -> None:
        if self.json:
            print(json.dumps(data, indent=2, default=str, sort_keys=True))
        else:
            render(self.console)

    def progress(self) -> Progress:
        """A progress bar on stderr's terminal; silent with ``--json`` and when stderr is not a terminal."""
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=Console(stderr=True), disable=self.json, transient=True)


def confirm(args: argparse.Namespace, out: Out, action: str, items: list[str], *,
            stdin: TextIO | None = None) -> bool:
    """Before a bulk or destructive change: show what will change; ``--dry-run`` stops here (False), ``--yes``
    goes ahead, a terminal is asked, anything else is refused (:class:`UsageError`, nothing changed)."""
    stdin = stdin if stdin is not None else sys.stdin
    err = Console(stderr=True, soft_wrap=True)
    shown = items[:50]
    if not args.dry_run and not getattr(args, "yes", False) and not _is_tty(stdin):
        raise UsageError(f"{action}: {len(items)} item(s) would change; input is not a terminal, so pass --yes to "
                         "go ahead (or --dry-run to only list them)")
    if args.dry_run or not args.yes:
        target = out.console if args.dry_run and not out.json else err
        target.print(f"{action}: {len(items)} item(s)")
        for item in shown:
            target.print(f"  {item}", markup=False)
        if len(items) > len(shown):
            target.print(f"  ... and {len(items) - len(shown)} more")
    if args.dry_run:
        if out.json:
            print(json.dumps({"dry_run": True, "action": action, "items": items}, indent=2, sort_keys=True))
        return False
    if args.yes:
        return True
    err.print("Proceed? [y/N] ", end="")
    answer = stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        raise CliError(f"{action}: not confirmed; nothing changed")
    return True


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
