"""Tracked-folder resolution over a fake folder tree: ids and well-known names pass, names and paths become ids."""

from __future__ import annotations

from typing import Any

import pytest

from core.adapters.graph import GraphNotFound
from core.settings.folders import FolderNotResolved, resolve_folder, resolve_tracked_folders

# id -> (display name, parent id); "inbox" is the well-known name of id "I"
TREE = {"I": ("Inbox", None), "S": ("Sent Items", None), "P": ("Projects", "I"), "Y": ("2026", "P"),
        "A": ("Archive", None), "P2": ("Projects", "A")}
WELL_KNOWN = {"inbox": "I", "sentitems": "S", "archive": "A"}


class FakeFolders:
    def __init__(self) -> None:
        self.listings = 0

    async def get_mail_folder(self, mailbox: str, folder: str) -> dict[str, Any]:
        folder_id = WELL_KNOWN.get(folder.lower(), folder)
        if folder_id not in TREE:
            raise GraphNotFound(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        return {"id": folder_id, "displayName": TREE[folder_id][0]}

    async def list_mail_folders(self, mailbox: str, parent: str | None = None) -> list[dict[str, Any]]:
        self.listings += 1
        return [{"id": k, "displayName": name, "childFolderCount": sum(p == k for _, p in TREE.values())}
                for k, (name, p) in TREE.items() if p == parent]


@pytest.mark.parametrize(("text", "expected"), [
    ("P", "P"), ("inbox", "I"), ("SentItems", "S"), ("2026", "Y"), ("inbox/projects", "P"),
    ("Inbox/Projects/2026", "Y"), ("Archive/Projects", "P2"), ("/Inbox/Projects/", "P"),
])
async def test_ids_well_known_names_unique_names_and_paths_resolve(text: str, expected: str) -> None:
    assert await resolve_folder(FakeFolders(), "a@x.com", text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("Projects", "2 folders are named 'Projects'"), ("Nothing", "no folder named 'Nothing'"),
    ("Inbox/Nothing", "no folder 'Inbox/Nothing'"), (" ", "empty"),
])
async def test_ambiguous_and_unknown_names_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(FolderNotResolved) as caught:
        await resolve_folder(FakeFolders(), "a@x.com", text)
    assert message in str(caught.value)


async def test_the_inbox_itself_cannot_be_mapped_and_keys_become_ids() -> None:
    folders = FakeFolders()
    assert await resolve_tracked_folders(folders, "a@x.com", {"2026": "account:1", "Archive": "incident:2"}) == {
        "Y": "account:1", "A": "incident:2"}
    with pytest.raises(FolderNotResolved, match="always tracked"):
        await resolve_tracked_folders(folders, "a@x.com", {"Inbox": "account:1"})
    with pytest.raises(FolderNotResolved, match="already in the list"):
        await resolve_tracked_folders(folders, "a@x.com", {"Y": "account:1", "2026": "account:2"})
