"""SQLite state of the Graph emulator: directory, folders, messages, attachments, rules, subscriptions,
per-folder change log (delta), delta sync states and the outbox.

One connection guarded by a re-entrant lock: the API runs on the event loop, SMTP deliveries arrive on
the listener thread, and SQLite statements here take microseconds, so a single writer is both simple
and fast. WAL mode for file databases lets a second process (an inspector) read while we write.

Every mutation of a message appends to ``changes`` (a global sequence, per folder): that log drives
delta queries, and the same mutation is published as :class:`ChangeEvent` to listeners (the
notification dispatcher) after the transaction commits.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .util import change_key, format_dt, new_id, now_utc

__all__ = ["WELL_KNOWN", "ChangeEvent", "Folder", "MessageRow", "Store", "User"]

# Well-known folder names (lower case) -> display names, in the order Outlook lists them.
WELL_KNOWN: dict[str, str] = {
    "inbox": "Inbox", "drafts": "Drafts", "sentitems": "Sent Items", "deleteditems": "Deleted Items",
    "junkemail": "Junk Email", "archive": "Archive", "outbox": "Outbox",
}
_ROOT = "msgfolderroot"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (id TEXT PRIMARY KEY, upn TEXT NOT NULL UNIQUE COLLATE NOCASE,
    mail TEXT COLLATE NOCASE, display_name TEXT, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS addresses (address TEXT PRIMARY KEY COLLATE NOCASE, user_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS folders (id TEXT PRIMARY KEY, user_id TEXT NOT NULL, parent_id TEXT,
    well_known TEXT, display_name TEXT NOT NULL, hidden INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS folders_user ON folders(user_id, well_known);
CREATE TABLE IF NOT EXISTS messages (iid TEXT PRIMARY KEY, rid TEXT NOT NULL UNIQUE, user_id TEXT NOT NULL,
    folder_id TEXT NOT NULL, ord INTEGER NOT NULL, imid TEXT, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS messages_folder ON messages(folder_id, ord);
CREATE INDEX IF NOT EXISTS messages_user_imid ON messages(user_id, imid);
CREATE TABLE IF NOT EXISTS raw_mime (iid TEXT PRIMARY KEY, raw BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS attachments (id TEXT PRIMARY KEY, iid TEXT NOT NULL, ord INTEGER NOT NULL,
    meta TEXT NOT NULL, content BLOB);
CREATE INDEX IF NOT EXISTS attachments_iid ON attachments(iid, ord);
CREATE TABLE IF NOT EXISTS rules (id TEXT PRIMARY KEY, user_id TEXT NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS subscriptions (id TEXT PRIMARY KEY, user_id TEXT NOT NULL, app_id TEXT NOT NULL,
    data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS subscriptions_user ON subscriptions(user_id);
CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, folder_id TEXT NOT NULL,
    iid TEXT NOT NULL, rid TEXT NOT NULL, kind TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS changes_folder ON changes(folder_id, seq);
CREATE TABLE IF NOT EXISTS delta_states (token TEXT PRIMARY KEY, created REAL NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, data TEXT NOT NULL);
"""
_TABLES = ("meta", "users", "addresses", "folders", "messages", "raw_mime", "attachments", "rules",
           "subscriptions", "changes", "delta_states", "outbox")


# GET /users returns these without $select (user resource, "Properties" note on default properties).
USER_DEFAULT_PROPS: tuple[str, ...] = (
    "businessPhones", "displayName", "givenName", "jobTitle", "mail", "mobilePhone", "officeLocation",
    "preferredLanguage", "surname", "userPrincipalName", "id",
)


@dataclass(frozen=True)
class User:
    id: str
    upn: str
    mail: str
    display_name: str
    data: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def proxy_addresses(self) -> list[str]:
        """Exchange's proxyAddresses: ``SMTP:`` (upper case) marks the primary address, ``smtp:`` the others."""
        given = [str(p) for p in self.data.get("proxyAddresses") or []]
        others = [p for p in given if p.split(":", 1)[-1].lower() != self.mail.lower()]
        return [f"SMTP:{self.mail}", *others]

    def filter_view(self) -> dict[str, Any]:
        """Every property a directory ``$filter`` may test (also those not returned by default)."""
        return {**self.data, "id": self.id, "userPrincipalName": self.upn, "mail": self.mail,
                "displayName": self.display_name, "proxyAddresses": self.proxy_addresses}

    def to_graph(self, select: list[str] | None = None) -> dict[str, Any]:
        """A user as ``GET /users`` returns it: the default properties, or ``id`` + those ``$select``ed."""
        view = self.filter_view()
        if select is None:
            return {name: view.get(name, [] if name == "businessPhones" else None) for name in USER_DEFAULT_PROPS}
        wanted = {s.lower() for s in select}
        return {"id": self.id, **{k: v for k, v in view.items() if k.lower() in wanted and k != "id"}}


@dataclass(frozen=True)
class Folder:
    id: str
    user_id: str
    parent_id: str | None
    well_known: str | None
    display_name: str
    hidden: bool = False


@dataclass
class MessageRow:
    iid: str  # immutable id (stable across moves)
    rid: str  # REST id (changes on move, as Exchange's default ids do)
    user_id: str
    folder_id: str
    ord: int
    data: dict[str, Any]

    def id_for(self, immutable: bool) -> str:
        return self.iid if immutable else self.rid


@dataclass(frozen=True)
class ChangeEvent:
    user_id: str
    folder_id: str
    iid: str
    rid: str
    kind: str  # created | updated | deleted
    change_key: str
    move: bool = False  # one half of a move (deleted in the source, created in the destination)


Listener = Callable[[list[ChangeEvent]], None]


class Store:
    def __init__(self, path: str = ":memory:") -> None:
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        if path != ":memory:":
            self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)
        self._listeners: list[Listener] = []
        self._pending: list[ChangeEvent] = []
        self._depth = 0
        self._ord = self._scalar("SELECT COALESCE(MAX(ord), 0) FROM messages") or 0
        self._user_cache: dict[str, User] = {}
        self._folder_cache: dict[tuple[str, str], Folder] = {}

    # -- infrastructure -------------------------------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A (nestable) transaction; change events are published once the outermost one commits."""
        with self._lock:
            self._depth += 1
            if self._depth == 1:
                self._conn.execute("BEGIN")
            try:
                yield self._conn
            except BaseException:
                self._depth -= 1
                if self._depth == 0:
                    self._conn.execute("ROLLBACK")
                    self._pending.clear()
                raise
            self._depth -= 1
            if self._depth > 0:
                return
            self._conn.execute("COMMIT")
            events, self._pending = self._pending, []
        if events:
            for listener in self._listeners:
                listener(events)

    def _scalar(self, sql: str, *args: Any) -> Any:
        with self._lock:
            row = self._conn.execute(sql, args).fetchone()
        return row[0] if row else None

    def _rows(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def reset(self) -> None:
        with self.tx() as c:
            for table in _TABLES:
                c.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed table names
        self._user_cache.clear()
        self._folder_cache.clear()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- tenant --------------------------------------------------------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        with self.tx() as c:
            c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        raw = self._scalar("SELECT value FROM meta WHERE key = ?", key)
        return json.loads(raw) if raw is not None else default

    def domains(self) -> list[str]:
        return [str(d).lower() for d in self.get_meta("domains", [])]

    def add_domains(self, domains: Iterable[str]) -> None:
        current = self.domains()
        for d in domains:
            if d.lower() not in current:
                current.append(d.lower())
        self.set_meta("domains", current)

    # -- directory -----------------------------------------------------------------------------
    def add_user(self, *, upn: str, display_name: str = "", mail: str | None = None, user_id: str | None = None,
                 proxy_addresses: Iterable[str] = (), extra: dict[str, Any] | None = None) -> User:
        import uuid

        uid = user_id or str(uuid.uuid4())
        mail = mail or upn
        data = dict(extra or {})
        proxies = [p for p in proxy_addresses]
        if proxies:
            data["proxyAddresses"] = proxies
        with self.tx() as c:
            c.execute("INSERT OR REPLACE INTO users(id, upn, mail, display_name, data) VALUES (?,?,?,?,?)",
                      (uid, upn, mail, display_name or upn.split("@")[0], json.dumps(data)))
            for addr in {upn, mail, *(p.split(":", 1)[-1] for p in proxies)}:
                c.execute("INSERT OR REPLACE INTO addresses(address, user_id) VALUES (?, ?)", (addr, uid))
            self._ensure_folders(uid)
        self._user_cache.clear()
        user = self.get_user(uid)
        assert user is not None
        return user

    def _user_from_row(self, row: sqlite3.Row) -> User:
        return User(row["id"], row["upn"], row["mail"] or row["upn"], row["display_name"] or "",
                    json.loads(row["data"]))

    def get_user(self, key: str) -> User | None:
        """By object id or UPN, case-insensitively: the two keys Graph documents for ``/users/{id |
        userPrincipalName}``. Other addresses of the mailbox (primary SMTP when it differs from the UPN, aliases)
        are not keys (``user_by_address`` is the mail transport's lookup)."""
        cache_key = key.lower()
        cached = self._user_cache.get(cache_key)
        if cached is not None:
            return cached
        rows = self._rows("SELECT * FROM users WHERE id = ? COLLATE NOCASE OR upn = ?", key, key)
        if not rows:
            return None
        user = self._user_from_row(rows[0])
        if len(self._user_cache) > 10_000:
            self._user_cache.clear()
        self._user_cache[cache_key] = user
        return user

    def user_by_address(self, address: str) -> User | None:
        """The mailbox an SMTP address (UPN, primary SMTP or any proxy address) delivers to."""
        uid = self._scalar("SELECT user_id FROM addresses WHERE address = ?", address.strip())
        return self.get_user(uid) if uid else None

    def list_users(self) -> list[User]:
        return [self._user_from_row(r) for r in self._rows("SELECT * FROM users ORDER BY upn")]

    # -- folders -------------------------------------------------------------------------------
    def _ensure_folders(self, user_id: str) -> None:
        with self.tx() as c:
            existing = {r["well_known"] for r in c.execute(
                "SELECT well_known FROM folders WHERE user_id = ? AND well_known IS NOT NULL", (user_id,))}
            if _ROOT not in existing:
                c.execute("INSERT INTO folders(id, user_id, parent_id, well_known, display_name, hidden) "
                          "VALUES (?,?,?,?,?,1)", (new_id("folder"), user_id, None, _ROOT, "Top of Information Store"))
            root = c.execute("SELECT id FROM folders WHERE user_id = ? AND well_known = ?",
                             (user_id, _ROOT)).fetchone()["id"]
            for name, display in WELL_KNOWN.items():
                if name not in existing:
                    c.execute("INSERT INTO folders(id, user_id, parent_id, well_known, display_name) "
                              "VALUES (?,?,?,?,?)", (new_id("folder"), user_id, root, name, display))

    @staticmethod
    def _folder_from_row(row: sqlite3.Row) -> Folder:
        return Folder(row["id"], row["user_id"], row["parent_id"], row["well_known"], row["display_name"],
                      bool(row["hidden"]))

    def folder(self, user_id: str, ref: str) -> Folder | None:
        """By id or well-known name (case-insensitive, ``Inbox``/``inbox``)."""
        key = (user_id, ref)
        cached = self._folder_cache.get(key)
        if cached is not None:
            return cached
        low = ref.lower()
        if low in WELL_KNOWN or low == _ROOT:
            rows = self._rows("SELECT * FROM folders WHERE user_id = ? AND well_known = ?", user_id, low)
        else:
            rows = self._rows("SELECT * FROM folders WHERE user_id = ? AND id = ?", user_id, ref)
        if not rows:
            return None
        folder = self._folder_from_row(rows[0])
        self._folder_cache[key] = folder
        return folder

    def folder_by_id(self, folder_id: str) -> Folder | None:
        rows = self._rows("SELECT * FROM folders WHERE id = ?", folder_id)
        return self._folder_from_row(rows[0]) if rows else None

    def child_folders(self, user_id: str, parent_id: str | None) -> list[Folder]:
        if parent_id is None:
            root = self.folder(user_id, _ROOT)
            parent_id = root.id if root else None
        return [self._folder_from_row(r) for r in self._rows(
            "SELECT * FROM folders WHERE user_id = ? AND parent_id = ? AND hidden = 0 ORDER BY rowid",
            user_id, parent_id)]

    def create_folder(self, user_id: str, parent_id: str | None, display_name: str) -> Folder:
        if parent_id is None:
            root = self.folder(user_id, _ROOT)
            parent_id = root.id if root else None
        fid = new_id("folder")
        with self.tx() as c:
            c.execute("INSERT INTO folders(id, user_id, parent_id, well_known, display_name) VALUES (?,?,?,?,?)",
                      (fid, user_id, parent_id, None, display_name))
        folder = self.folder_by_id(fid)
        assert folder is not None
        return folder

    def folder_counts(self, folder_id: str) -> tuple[int, int, int]:
        """(total, unread, child folder count)."""
        with self._lock:
            total = 0
            unread = 0
            for r in self._conn.execute("SELECT data FROM messages WHERE folder_id = ?", (folder_id,)):
                total += 1
                if not json.loads(r[0]).get("isRead", False):
                    unread += 1
            children = self._conn.execute("SELECT COUNT(*) FROM folders WHERE parent_id = ?", (folder_id,)).fetchone()
        return total, unread, int(children[0])

    # -- messages ------------------------------------------------------------------------------
    def _change(self, c: sqlite3.Connection, row: MessageRow, folder_id: str, rid: str, kind: str,
                move: bool = False) -> None:
        c.execute("INSERT INTO changes(folder_id, iid, rid, kind) VALUES (?,?,?,?)", (folder_id, row.iid, rid, kind))
        self._pending.append(ChangeEvent(row.user_id, folder_id, row.iid, rid, kind,
                                         str(row.data.get("changeKey", "")), move))

    @staticmethod
    def _row(r: sqlite3.Row) -> MessageRow:
        return MessageRow(r["iid"], r["rid"], r["user_id"], r["folder_id"], r["ord"], json.loads(r["data"]))

    def insert_message(self, user_id: str, folder_id: str, data: dict[str, Any], *, raw: bytes | None = None,
                       attachments: Iterable[dict[str, Any]] = ()) -> MessageRow:
        now = format_dt(now_utc())
        data = dict(data)
        data.setdefault("createdDateTime", now)
        data["lastModifiedDateTime"] = now
        data["changeKey"] = change_key()
        with self.tx() as c:
            self._ord += 1
            row = MessageRow(new_id("immutable"), new_id("message"), user_id, folder_id, self._ord, data)
            for att in attachments:
                self._insert_attachment(c, row.iid, att)
            data["hasAttachments"] = self._has_visible_attachments(c, row.iid)
            c.execute("INSERT INTO messages(iid, rid, user_id, folder_id, ord, imid, data) VALUES (?,?,?,?,?,?,?)",
                      (row.iid, row.rid, user_id, folder_id, row.ord, data.get("internetMessageId"),
                       json.dumps(data)))
            if raw is not None:
                c.execute("INSERT INTO raw_mime(iid, raw) VALUES (?, ?)", (row.iid, raw))
            self._change(c, row, folder_id, row.rid, "created")
        return row

    def get_message(self, user_id: str, message_id: str) -> MessageRow | None:
        with self._lock:
            r = self._conn.execute("SELECT * FROM messages WHERE rid = ?", (message_id,)).fetchone()
            if r is None:
                r = self._conn.execute("SELECT * FROM messages WHERE iid = ?", (message_id,)).fetchone()
        if r is None or r["user_id"] != user_id:
            return None
        return self._row(r)

    def get_message_by_iid(self, iid: str) -> MessageRow | None:
        rows = self._rows("SELECT * FROM messages WHERE iid = ?", iid)
        return self._row(rows[0]) if rows else None

    def list_messages(self, user_id: str, folder_id: str | None = None) -> list[MessageRow]:
        if folder_id is None:
            rows = self._rows("SELECT * FROM messages WHERE user_id = ? ORDER BY ord", user_id)
        else:
            rows = self._rows("SELECT * FROM messages WHERE folder_id = ? ORDER BY ord", folder_id)
        return [self._row(r) for r in rows]

    def find_by_internet_id(self, user_id: str, internet_ids: Iterable[str]) -> list[MessageRow]:
        ids = [i for i in internet_ids if i]
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        return [self._row(r) for r in self._rows(
            f"SELECT * FROM messages WHERE user_id = ? AND imid IN ({marks}) ORDER BY ord",  # noqa: S608
            user_id, *ids)]

    def update_message(self, row: MessageRow, changes: dict[str, Any]) -> MessageRow:
        """Apply property changes; a new changeKey and lastModifiedDateTime each time (as Exchange)."""
        data = {**row.data, **changes}
        data["changeKey"] = change_key()
        data["lastModifiedDateTime"] = format_dt(now_utc())
        with self.tx() as c:
            data["hasAttachments"] = self._has_visible_attachments(c, row.iid)
            c.execute("UPDATE messages SET data = ?, imid = ? WHERE iid = ?",
                      (json.dumps(data), data.get("internetMessageId"), row.iid))
            row = MessageRow(row.iid, row.rid, row.user_id, row.folder_id, row.ord, data)
            self._change(c, row, row.folder_id, row.rid, "updated")
        return row

    def move_message(self, row: MessageRow, folder_id: str, changes: dict[str, Any] | None = None) -> MessageRow:
        """Move to another folder: the REST id changes, the immutable id stays (documented Graph behaviour)."""
        if folder_id == row.folder_id and not changes:
            return row
        data = {**row.data, **(changes or {})}
        data["changeKey"] = change_key()
        data["lastModifiedDateTime"] = format_dt(now_utc())
        new_rid = new_id("message") if folder_id != row.folder_id else row.rid
        with self.tx() as c:
            self._ord += 1
            c.execute("UPDATE messages SET rid = ?, folder_id = ?, ord = ?, data = ? WHERE iid = ?",
                      (new_rid, folder_id, self._ord, json.dumps(data), row.iid))
            moved = MessageRow(row.iid, new_rid, row.user_id, folder_id, self._ord, data)
            if folder_id != row.folder_id:
                self._change(c, moved, row.folder_id, row.rid, "deleted", move=True)
                self._change(c, moved, folder_id, new_rid, "created", move=True)
            else:
                self._change(c, moved, folder_id, new_rid, "updated")
        return moved

    def delete_message(self, row: MessageRow) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM messages WHERE iid = ?", (row.iid,))
            c.execute("DELETE FROM raw_mime WHERE iid = ?", (row.iid,))
            c.execute("DELETE FROM attachments WHERE iid = ?", (row.iid,))
            self._change(c, row, row.folder_id, row.rid, "deleted")

    def raw_mime(self, iid: str) -> bytes | None:
        raw = self._scalar("SELECT raw FROM raw_mime WHERE iid = ?", iid)
        return bytes(raw) if raw is not None else None

    # -- attachments ---------------------------------------------------------------------------
    def _insert_attachment(self, c: sqlite3.Connection, iid: str, att: dict[str, Any],
                           content: bytes | None = None) -> str:
        import base64

        meta = dict(att)
        aid = new_id("attachment")
        meta.pop("id", None)
        if content is None and meta.get("contentBytes") is not None:
            content = base64.b64decode(meta["contentBytes"])
        meta.pop("contentBytes", None)
        if content is not None:
            meta["size"] = len(content)
        meta.setdefault("lastModifiedDateTime", format_dt(now_utc()))
        ord_ = (c.execute("SELECT COALESCE(MAX(ord), 0) FROM attachments WHERE iid = ?", (iid,)).fetchone()[0]) + 1
        c.execute("INSERT INTO attachments(id, iid, ord, meta, content) VALUES (?,?,?,?,?)",
                  (aid, iid, ord_, json.dumps(meta), content))
        return aid

    @staticmethod
    def _has_visible_attachments(c: sqlite3.Connection, iid: str) -> bool:
        # hasAttachments excludes inline attachments (graph.md §6)
        for r in c.execute("SELECT meta FROM attachments WHERE iid = ?", (iid,)):
            if not json.loads(r[0]).get("isInline", False):
                return True
        return False

    def add_attachment(self, row: MessageRow, att: dict[str, Any], content: bytes | None = None) -> str:
        with self.tx() as c:
            aid = self._insert_attachment(c, row.iid, att, content)
        self.update_message(row, {})
        return aid

    def list_attachments(self, iid: str) -> list[tuple[str, dict[str, Any], bytes | None]]:
        return [(r["id"], json.loads(r["meta"]), bytes(r["content"]) if r["content"] is not None else None)
                for r in self._rows("SELECT * FROM attachments WHERE iid = ? ORDER BY ord", iid)]

    def get_attachment(self, iid: str, aid: str) -> tuple[str, dict[str, Any], bytes | None] | None:
        rows = self._rows("SELECT * FROM attachments WHERE iid = ? AND id = ?", iid, aid)
        if not rows:
            return None
        r = rows[0]
        return r["id"], json.loads(r["meta"]), bytes(r["content"]) if r["content"] is not None else None

    def delete_attachment(self, row: MessageRow, aid: str) -> bool:
        with self.tx() as c:
            n = c.execute("DELETE FROM attachments WHERE iid = ? AND id = ?", (row.iid, aid)).rowcount
        if n:
            self.update_message(row, {})
        return bool(n)

    def copy_attachments(self, src_iid: str, dst_iid: str) -> None:
        with self.tx() as c:
            for _aid, meta, content in self.list_attachments(src_iid):
                self._insert_attachment(c, dst_iid, meta, content)

    # -- rules ---------------------------------------------------------------------------------
    def list_rules(self, user_id: str) -> list[dict[str, Any]]:
        rules = [json.loads(r["data"]) for r in self._rows("SELECT data FROM rules WHERE user_id = ?", user_id)]
        return sorted(rules, key=lambda r: (int(r.get("sequence") or 0), r["id"]))

    def put_rule(self, user_id: str, rule: dict[str, Any]) -> None:
        with self.tx() as c:
            c.execute("INSERT OR REPLACE INTO rules(id, user_id, data) VALUES (?,?,?)",
                      (rule["id"], user_id, json.dumps(rule)))

    def delete_rule(self, user_id: str, rule_id: str) -> bool:
        with self.tx() as c:
            return bool(c.execute("DELETE FROM rules WHERE user_id = ? AND id = ?", (user_id, rule_id)).rowcount)

    # -- subscriptions -------------------------------------------------------------------------
    def put_subscription(self, sub: dict[str, Any]) -> None:
        with self.tx() as c:
            c.execute("INSERT OR REPLACE INTO subscriptions(id, user_id, app_id, data) VALUES (?,?,?,?)",
                      (sub["id"], sub["_userId"], sub["applicationId"], json.dumps(sub)))

    def get_subscription(self, sub_id: str) -> dict[str, Any] | None:
        raw = self._scalar("SELECT data FROM subscriptions WHERE id = ?", sub_id)
        return json.loads(raw) if raw else None

    def list_subscriptions(self, app_id: str | None = None) -> list[dict[str, Any]]:
        if app_id is None:
            rows = self._rows("SELECT data FROM subscriptions ORDER BY rowid")
        else:
            rows = self._rows("SELECT data FROM subscriptions WHERE app_id = ? ORDER BY rowid", app_id)
        return [json.loads(r[0]) for r in rows]

    def update_subscription(self, sub_id: str, change: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        """Read-modify-write one subscription atomically; ``change`` edits it in place and returns whether to
        save. Returns the (possibly changed) subscription, or None when it does not exist."""
        with self.tx() as c:
            sub = self.get_subscription(sub_id)
            if sub is not None and change(sub):
                c.execute("UPDATE subscriptions SET data = ? WHERE id = ?", (json.dumps(sub), sub_id))
            return sub

    def count_subscriptions(self, user_id: str) -> int:
        return int(self._scalar("SELECT COUNT(*) FROM subscriptions WHERE user_id = ?", user_id) or 0)

    def delete_subscription(self, sub_id: str) -> bool:
        with self.tx() as c:
            return bool(c.execute("DELETE FROM subscriptions WHERE id = ?", (sub_id,)).rowcount)

    # -- change log and delta states ------------------------------------------------------------
    def max_seq(self) -> int:
        return int(self._scalar("SELECT COALESCE(MAX(seq), 0) FROM changes") or 0)

    def changes(self, folder_id: str, after: int, upto: int) -> list[tuple[int, str, str, str]]:
        """(seq, iid, rid, kind) for one folder, after < seq <= upto, in order."""
        return [(r["seq"], r["iid"], r["rid"], r["kind"]) for r in self._rows(
            "SELECT seq, iid, rid, kind FROM changes WHERE folder_id = ? AND seq > ? AND seq <= ? ORDER BY seq",
            folder_id, after, upto)]

    def save_delta_state(self, state: dict[str, Any]) -> str:
        # url-safe and opaque; the state itself stays server-side, like Exchange's sync state
        token = os.urandom(24).hex()
        with self.tx() as c:
            c.execute("INSERT INTO delta_states(token, created, data) VALUES (?,?,?)",
                      (token, time.time(), json.dumps(state)))
        return token

    def load_delta_state(self, token: str, ttl_s: float) -> dict[str, Any] | None:
        rows = self._rows("SELECT created, data FROM delta_states WHERE token = ?", token)
        if not rows or time.time() - float(rows[0]["created"]) > ttl_s:
            return None
        return dict(json.loads(rows[0]["data"]))

    def expire_delta_states(self, ttl_s: float) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM delta_states WHERE created < ?", (time.time() - ttl_s,))

    # -- outbox --------------------------------------------------------------------------------
    def add_outbox(self, entry: dict[str, Any]) -> None:
        with self.tx() as c:
            c.execute("INSERT INTO outbox(data) VALUES (?)", (json.dumps(entry),))

    def list_outbox(self) -> list[dict[str, Any]]:
        return [json.loads(r[0]) for r in self._rows("SELECT data FROM outbox ORDER BY id")]

    def clear_outbox(self) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM outbox")
