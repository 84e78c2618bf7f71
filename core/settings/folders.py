"""Tracked folders (folder-level tracking) name their folders by Graph folder id: resolve what an admin typed.

Graph's ``mailFolders/{x}`` accepts a folder id or a well-known name only (mailfolder resource), and incoming
messages carry ``parentFolderId`` as an id, so a display name saved in ``TrackedFolders`` would fail at the
subscription (404) and never match a message. :func:`resolve_folder` turns a well-known name, an id, a display name
or a display-name path (``Inbox/Projects/2026``) into the folder id when the setting is written
(``emailrouter mailbox set --folders``). Rows edited directly in the Table must hold ids.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Protocol

from core.adapters.graph import GraphError

__all__ = ["FolderDirectory", "FolderNotResolved", "resolve_folder", "resolve_tracked_folders"]

MAX_FOLDERS_WALKED: Final = 2000  # a display-name search walks at most this many folders


class FolderNotResolved(ValueError):
    """The text names no folder, or more than one (the message says which and what to type instead)."""


class FolderDirectory(Protocol):
    """The Graph reads folder resolution needs (``core.adapters.graph.GraphMailClient``)."""

    async def get_mail_folder(self, mailbox: str, folder: str) -> dict[str, Any]: ...

    async def list_mail_folders(self, mailbox: str, parent: str | None = None) -> list[dict[str, Any]]: ...


async def _by_reference(graph: FolderDirectory, mailbox: str, ref: str) -> dict[str, Any] | None:
    """The folder when ``ref`` is an id or a well-known name; None when Graph does not know it as such."""
    try:
        return await graph.get_mail_folder(mailbox, ref)
    except GraphError as exc:
        if exc.transient or exc.status not in (400, 404):
            raise
        return None


async def _children(graph: FolderDirectory, mailbox: str, parent: str | None) -> list[dict[str, Any]]:
    return [f for f in await graph.list_mail_folders(mailbox, parent) if f.get("id")]


def _named(folders: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [f for f in folders if str(f.get("displayName") or "").casefold() == name.casefold()]


async def resolve_folder(graph: FolderDirectory, mailbox: str, text: str) -> str:
    """The folder id for an id, a well-known name, a unique display name or a ``/``-separated display-name path."""
    text = text.strip()
    if not text:
        raise FolderNotResolved("an empty folder name")
    found = await _by_reference(graph, mailbox, text)
    if found is not None:
        return str(found["id"])
    parts = [p.strip() for p in text.strip("/").split("/") if p.strip()]
    if len(parts) > 1:
        first = await _by_reference(graph, mailbox, parts[0])
        level = [first] if first is not None else _named(await _children(graph, mailbox, None), parts[0])
        for part in parts[1:]:
            if len(level) != 1:
                break
            level = _named(await _children(graph, mailbox, str(level[0]["id"])), part)
        if len(level) == 1:
            return str(level[0]["id"])
        raise FolderNotResolved(f"no single folder at the path {text!r}" if level else f"no folder {text!r}")
    # one display name: search the whole folder tree, breadth first
    matches: list[dict[str, Any]] = []
    queue: list[str | None] = [None]
    walked = 0
    while queue and walked < MAX_FOLDERS_WALKED:
        children = await _children(graph, mailbox, queue.pop(0))
        walked += len(children)
        matches.extend(_named(children, text))
        queue.extend(str(f["id"]) for f in children if f.get("childFolderCount") != 0)
    if len(matches) == 1:
        return str(matches[0]["id"])
    if matches:
        raise FolderNotResolved(f"{len(matches)} folders are named {text!r}: give the path (e.g. Inbox/{text}) "
                                "or the folder id")
    raise FolderNotResolved(f"no folder named {text!r} in the mailbox")


async def resolve_tracked_folders(graph: FolderDirectory, mailbox: str, folders: Mapping[str, str]
                                  ) -> dict[str, str]:
    """``{"folder name, path or id": "table:guid"}`` -> ``{"folder id": "table:guid"}``. The Inbox is refused:
    it is always watched (mapping it would subscribe to it twice)."""
    inbox = await _by_reference(graph, mailbox, "inbox")
    out: dict[str, str] = {}
    for text, record in folders.items():
        folder_id = await resolve_folder(graph, mailbox, text)
        if inbox is not None and folder_id == inbox.get("id"):
            raise FolderNotResolved(f"{text!r} is the Inbox, which is always tracked; map a folder below it")
        if folder_id in out:
            raise FolderNotResolved(f"{text!r} names a folder already in the list")
        out[folder_id] = record
    return out
