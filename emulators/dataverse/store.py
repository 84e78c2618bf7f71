"""SQLite row store: one table per entity, each row a JSON document plus id/parent/sequence/version columns.

Why JSON rows instead of real columns: the entity registry (``schema.py``) is the single source of truth and queries
are compiled to ``json_extract`` expressions, so adding a column never needs a migration. Hot lookup columns
(Message-ID, email addresses, status, application id) get expression indexes so the router's per-message queries stay
O(log n) even with a large state directory.

Transactions: ``transaction()`` opens BEGIN/COMMIT (or a SAVEPOINT when nested), which is what makes deep inserts
and ``$batch`` change sets atomic. Counters (row sequence, row version) are process-wide and only ever increase, like
Dataverse's ``versionnumber``; gaps after a rollback are harmless.
"""

# SQL is assembled only from registry table names and schema column keys, never from request text;
# every request value is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .schema import ENTITIES, EntityDef

__all__ = ["Row", "Store", "fold"]

Row = dict[str, Any]

# Indexed JSON keys per table: (key, folded?) - folded keys are case-insensitive strings.
_INDEXES: dict[str, tuple[tuple[str, bool], ...]] = {
    "email": (("messageid", True), ("statuscode", False), ("trackingtoken", True), ("modifiedon", False)),
    "activityparty": (("addressused", True), ("_partyid_value", False)),
    "contact": (("emailaddress1", True), ("emailaddress2", True), ("emailaddress3", True)),
    "account": (("emailaddress1", True), ("emailaddress2", True), ("emailaddress3", True)),
    "lead": (("emailaddress1", True), ("emailaddress2", True), ("emailaddress3", True)),
    "systemuser": (("internalemailaddress", True), ("applicationid", False), ("azureactivedirectoryobjectid", False)),
    "queue": (("emailaddress", True),),
    "mailbox": (("emailaddress", True), ("_regardingobjectid_value", False)),
}


def fold(value: Any) -> Any:
    """Case-insensitive comparison key (Dataverse's default collation is case-insensitive); non-strings pass."""
    return value.casefold() if isinstance(value, str) else value


def table_name(logical: str) -> str:
    return f"e_{logical}"


class Store:
    def __init__(self, path: str | Path = ":memory:") -> None:
        self.path = str(path)
        # One connection shared by the event loop thread; check_same_thread=False lets tests read it directly.
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.create_function("dv_fold", 1, fold, deterministic=True)
        self.lock = threading.RLock()
        self._depth = 0
        if self.path != ":memory:":
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
        self._create_schema()
        self.seq = self._max("seq")
        self.version = max(self._max("version"), 1000)

    # ---- schema ------------------------------------------------------------------------------------------------
    def _create_schema(self) -> None:
        for ent in ENTITIES.values():
            t = table_name(ent.logical_name)
            self.db.execute(
                f'CREATE TABLE IF NOT EXISTS "{t}" (id TEXT PRIMARY KEY, parent TEXT, seq INTEGER NOT NULL, '
                "version INTEGER NOT NULL, data TEXT NOT NULL)"
            )
            self.db.execute(f'CREATE INDEX IF NOT EXISTS "{t}_parent" ON "{t}"(parent)')
            self.db.execute(f'CREATE INDEX IF NOT EXISTS "{t}_seq" ON "{t}"(seq)')
            for key, folded in _INDEXES.get(ent.logical_name, ()):
                expr = f"json_extract(data, '$.{key}')"
                if folded:
                    expr = f"dv_fold({expr})"
                self.db.execute(f'CREATE INDEX IF NOT EXISTS "{t}_{key}" ON "{t}"({expr})')

    def _max(self, col: str) -> int:
        best = 0
        for ent in ENTITIES.values():
            row = self.db.execute(f'SELECT MAX({col}) FROM "{table_name(ent.logical_name)}"').fetchone()
            if row and row[0] is not None:
                best = max(best, int(row[0]))
        return best

    def close(self) -> None:
        self.db.close()

    def clear(self) -> None:
        with self.lock:
            for ent in ENTITIES.values():
                self.db.execute(f'DELETE FROM "{table_name(ent.logical_name)}"')

    # ---- transactions --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Atomic unit; nests with savepoints (a change set inside a batch, a deep insert inside a change set)."""
        with self.lock:
            name = f"sp{self._depth}"
            if self._depth == 0:
                self.db.execute("BEGIN")
            else:
                self.db.execute(f"SAVEPOINT {name}")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if self._depth == 0:
                    self.db.execute("ROLLBACK")
                else:
                    self.db.execute(f"ROLLBACK TO {name}")
                    self.db.execute(f"RELEASE {name}")
                raise
            else:
                self._depth -= 1
                if self._depth == 0:
                    self.db.execute("COMMIT")
                else:
                    self.db.execute(f"RELEASE {name}")

    def next_version(self) -> int:
        self.version += 1
        return self.version

    # ---- rows ----------------------------------------------------------------------------------------------------
    def get(self, ent: EntityDef, rid: str) -> Row | None:
        cur = self.db.execute(f'SELECT data, version FROM "{table_name(ent.logical_name)}" WHERE id = ?', (rid,))
        hit = cur.fetchone()
        if hit is None:
            return None
        row: Row = json.loads(hit[0])
        row["versionnumber"] = hit[1]
        return row

    def exists(self, ent: EntityDef, rid: str) -> bool:
        cur = self.db.execute(f'SELECT 1 FROM "{table_name(ent.logical_name)}" WHERE id = ?', (rid,))
        return cur.fetchone() is not None

    def insert(self, ent: EntityDef, rid: str, row: Row, parent: str | None = None) -> int:
        """Insert; raises ``sqlite3.IntegrityError`` on a duplicate id (the caller maps it to 0x80040237)."""
        self.seq += 1
        version = self.next_version()
        row["versionnumber"] = version
        self.db.execute(
            f'INSERT INTO "{table_name(ent.logical_name)}"(id, parent, seq, version, data) VALUES (?,?,?,?,?)',
            (rid, parent, self.seq, version, json.dumps(row, separators=(",", ":"))),
        )
        return version

    def replace(self, ent: EntityDef, rid: str, row: Row) -> int:
        version = self.next_version()
        row["versionnumber"] = version
        self.db.execute(
            f'UPDATE "{table_name(ent.logical_name)}" SET data = ?, version = ? WHERE id = ?',
            (json.dumps(row, separators=(",", ":")), version, rid),
        )
        return version

    def delete(self, ent: EntityDef, rid: str) -> bool:
        cur = self.db.execute(f'DELETE FROM "{table_name(ent.logical_name)}" WHERE id = ?', (rid,))
        return cur.rowcount > 0

    def children(self, ent: EntityDef, parent: str) -> list[Row]:
        cur = self.db.execute(
            f'SELECT data, version FROM "{table_name(ent.logical_name)}" WHERE parent = ? ORDER BY seq', (parent,)
        )
        return [_load(d, v) for d, v in cur.fetchall()]

    def delete_children(self, ent: EntityDef, parent: str) -> None:
        self.db.execute(f'DELETE FROM "{table_name(ent.logical_name)}" WHERE parent = ?', (parent,))

    def find(self, ent: EntityDef, key: str, value: Any) -> list[Row]:
        """Rows whose JSON ``key`` equals ``value`` (case-insensitively for strings)."""
        expr = f"json_extract(data, '$.{key}')"
        if isinstance(value, str):
            expr, value = f"dv_fold({expr})", fold(value)
        cur = self.db.execute(
            f'SELECT data, version FROM "{table_name(ent.logical_name)}" WHERE {expr} = ? ORDER BY seq', (value,)
        )
        return [_load(d, v) for d, v in cur.fetchall()]

    def all(self, ent: EntityDef) -> list[Row]:
        cur = self.db.execute(f'SELECT data, version FROM "{table_name(ent.logical_name)}" ORDER BY seq')
        return [_load(d, v) for d, v in cur.fetchall()]

    def count(self, ent: EntityDef) -> int:
        cur = self.db.execute(f'SELECT COUNT(*) FROM "{table_name(ent.logical_name)}"')
        return int(cur.fetchone()[0])

    def select(self, sql: str, params: Iterable[Any]) -> list[tuple[Any, ...]]:
        return self.db.execute(sql, tuple(params)).fetchall()


def _load(data: str, version: int) -> Row:
    row: Row = json.loads(data)
    row["versionnumber"] = version
    return row
