"""Compile a parsed ``$filter``/``$orderby`` to SQL over the JSON row store and run paged queries.

Semantics chosen to match Dataverse (which turns OData into SQL Server queries):
- string comparisons are case-insensitive (``dv_fold`` = ``str.casefold`` on both sides);
- ``eq null`` / ``ne null`` become ``IS NULL`` / ``IS NOT NULL``; other comparisons with a null column are false
  (SQL three-valued logic, like FetchXML ``ne``, which does not return nulls);
- paging is keyset-based (order values + insertion sequence in ``$skiptoken``), like Dataverse's paging cookie, so
  rows changing state between pages are neither repeated nor skipped.
"""

# SQL is assembled only from registry table names and schema column keys, never from request text;
# every request value is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from .errors import DataverseError
from .odata import And, Cmp, Func, In, Lambda, Literal, Node, Not, Or, OrderItem, Prop, normalize_datetime
from .schema import (
    BOOL,
    DATETIME,
    DECIMAL,
    ENTITIES,
    GUID,
    INT,
    LOOKUP,
    MEMO,
    MONEY,
    OPTIONSET,
    STATE,
    STATUS,
    STRING,
    Column,
    EntityDef,
)
from .store import Row, Store, fold, table_name

__all__ = ["CompiledFilter", "PageResult", "compile_filter", "run_query"]

_NUMERIC = (INT, DECIMAL, MONEY, OPTIONSET, STATE, STATUS)
_TEXT = (STRING, MEMO)
_SQL_OPS = {"eq": "=", "ne": "!=", "gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_OP_NAMES = {"eq": "Equal", "ne": "NotEqual", "gt": "GreaterThan", "ge": "GreaterThanOrEqual", "lt": "LessThan",
             "le": "LessThanOrEqual"}


@dataclass
class CompiledFilter:
    sql: str
    params: list[Any]


@dataclass
class _Scope:
    ent: EntityDef
    alias: str


@dataclass
class _Operand:
    sql: str
    params: list[Any]
    col: Column | None  # set when the operand is a property


class _Compiler:
    def __init__(self, ent: EntityDef, alias: str) -> None:
        self.root = _Scope(ent, alias)
        self.vars: dict[str, _Scope] = {}
        self.n = 0

    # -- operands --
    def prop(self, p: Prop) -> _Operand:
        scope, path = self.root, p.path
        if len(path) == 2 and path[0] in self.vars:
            scope, path = self.vars[path[0]], path[1:]
        if len(path) != 1:
            raise DataverseError.bad_request(
                f"Navigation paths in $filter are not supported by the emulator: '{'/'.join(p.path)}'.")
        key = path[0]
        col = scope.ent.column_for_key(key)
        if col is None:
            raise DataverseError.unknown_property(key, scope.ent.logical_name)
        return _Operand(f"json_extract({scope.alias}.data, '$.{col.value_key}')", [], col)

    def operand(self, node: Node) -> _Operand:
        if isinstance(node, Prop):
            return self.prop(node)
        if isinstance(node, Func) and node.name in ("tolower", "toupper"):
            # Comparisons are case-insensitive already, so case mapping is the identity for matching purposes.
            return self.operand(node.args[0])
        if isinstance(node, Literal):
            return _Operand("?", [node.value], None)
        sql, params = self.bool_expr(node)
        return _Operand(f"({sql})", params, Column("_", BOOL))

    # -- literal conversion to the column's type --
    def convert(self, col: Column, lit: Literal, op: str) -> Any:
        t, kind, v = col.type, lit.kind, lit.value
        edm = {"string": "Edm.String", "int": "Edm.Int32", "decimal": "Edm.Decimal", "bool": "Edm.Boolean",
               "guid": "Edm.Guid", "datetime": "Edm.DateTimeOffset"}.get(kind, "Edm.String")
        bad = DataverseError.bad_request(
            "A binary operator with incompatible types was detected. Found operand types "
            f"'{_edm(col)}' and '{edm}' for operator kind '{_OP_NAMES.get(op, op)}'.", code="0x80060888")
        if t in _TEXT:
            if kind not in ("string",):
                raise bad
            return fold(v)
        if t in (GUID, LOOKUP):
            if kind in ("guid", "string"):
                return str(v).lower()
            raise bad
        if t in _NUMERIC:
            if kind in ("int", "decimal"):
                return v
            raise bad
        if t == BOOL:
            if kind == "bool":
                return 1 if v else 0
            if kind == "int" and v in (0, 1):
                return v
            raise bad
        if t == DATETIME:
            if kind in ("datetime", "string"):
                return normalize_datetime(str(v))
            raise bad
        return v

    # -- boolean expressions --
    def bool_expr(self, node: Node) -> tuple[str, list[Any]]:
        if isinstance(node, And):
            a, pa = self.bool_expr(node.left)
            b, pb = self.bool_expr(node.right)
            return f"({a} AND {b})", pa + pb
        if isinstance(node, Or):
            a, pa = self.bool_expr(node.left)
            b, pb = self.bool_expr(node.right)
            return f"({a} OR {b})", pa + pb
        if isinstance(node, Not):
            a, pa = self.bool_expr(node.expr)
            return f"(NOT COALESCE({a}, 0))", pa
        if isinstance(node, Cmp):
            return self.compare(node)
        if isinstance(node, Func):
            return self.func(node)
        if isinstance(node, In):
            opnd = self.prop(node.prop)
            assert opnd.col is not None
            values = [self.convert(opnd.col, _query_function_value(opnd.col, v), "eq") for v in node.values]
            expr = f"dv_fold({opnd.sql})" if opnd.col.type in _TEXT else opnd.sql
            marks = ",".join("?" for _ in values)
            neg = "NOT " if node.negate else ""
            return f"({expr} {neg}IN ({marks}))", values
        if isinstance(node, Lambda):
            return self.lambda_(node)
        if isinstance(node, Prop):
            opnd = self.prop(node)
            if opnd.col is None or opnd.col.type != BOOL:
                raise DataverseError.bad_request("The $filter expression must evaluate to a single boolean value.")
            return f"({opnd.sql} = 1)", []
        if isinstance(node, Literal) and node.kind == "bool":
            return ("1" if node.value else "0"), []
        raise DataverseError.bad_request("The $filter expression must evaluate to a single boolean value.")

    def compare(self, node: Cmp) -> tuple[str, list[Any]]:
        op = node.op
        left, right = node.left, node.right
        if isinstance(left, Literal) and not isinstance(right, Literal):
            # Normalise "literal op property" to "property op' literal".
            left, right = right, left
            op = {"gt": "lt", "ge": "le", "lt": "gt", "le": "ge"}.get(op, op)
        lo = self.operand(left)
        if isinstance(right, Literal):
            if right.kind == "null":
                if op not in ("eq", "ne"):
                    return "0", []
                return f"({lo.sql} IS {'NOT ' if op == 'ne' else ''}NULL)", lo.params
            if lo.col is None:
                raise DataverseError.bad_request("Comparisons between two literals are not supported.")
            value = self.convert(lo.col, right, op)
            lhs = f"dv_fold({lo.sql})" if lo.col.type in _TEXT else lo.sql
            return f"({lhs} {_SQL_OPS[op]} ?)", [*lo.params, value]
        ro = self.operand(right)
        lhs = f"dv_fold({lo.sql})" if lo.col is not None and lo.col.type in _TEXT else lo.sql
        rhs = f"dv_fold({ro.sql})" if ro.col is not None and ro.col.type in _TEXT else ro.sql
        return f"({lhs} {_SQL_OPS[op]} {rhs})", [*lo.params, *ro.params]

    def func(self, node: Func) -> tuple[str, list[Any]]:
        if node.name not in ("contains", "startswith", "endswith"):
            raise DataverseError.bad_request(f"The function '{node.name}' does not return a boolean value.")
        target, needle = node.args
        opnd = self.operand(target)
        if not isinstance(needle, Literal) or needle.kind != "string":
            raise DataverseError.bad_request(f"The second argument of {node.name} must be a string literal.")
        if opnd.col is None or opnd.col.type not in _TEXT:
            raise DataverseError.bad_request(f"{node.name} is only supported on string columns.")
        text = fold(needle.value).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = {"contains": f"%{text}%", "startswith": f"{text}%", "endswith": f"%{text}"}[node.name]
        return f"(dv_fold({opnd.sql}) LIKE ? ESCAPE '\\')", [*opnd.params, pattern]

    def lambda_(self, node: Lambda) -> tuple[str, list[Any]]:
        outer = self.root  # lambdas are evaluated against the queried table (no nested lambdas)
        nav = outer.ent.collections.get(node.nav)
        if nav is None:
            raise DataverseError.unknown_property(node.nav, outer.ent.logical_name)
        child = ENTITIES[nav.target]
        self.n += 1
        alias = f"l{self.n}"
        base = f'SELECT 1 FROM "{table_name(child.logical_name)}" {alias} WHERE {alias}.parent = {outer.alias}.id'
        if node.expr is None or node.var is None:
            return f"EXISTS ({base})", []
        self.vars[node.var] = _Scope(child, alias)
        try:
            inner, params = self.bool_expr(node.expr)
        finally:
            del self.vars[node.var]
        if node.kind == "any":
            return f"EXISTS ({base} AND {inner})", params
        return f"NOT EXISTS ({base} AND NOT COALESCE({inner}, 0))", params


def _query_function_value(col: Column, lit: Literal) -> Literal:
    """Dataverse query functions take PropertyValues as strings (['6','7']) whatever the column type."""
    if lit.kind != "string":
        return lit
    if col.type in _NUMERIC:
        try:
            return Literal(int(lit.value), "int")
        except ValueError:
            try:
                return Literal(float(lit.value), "decimal")
            except ValueError:
                return lit
    if col.type == BOOL and lit.value.lower() in ("true", "false", "1", "0"):
        return Literal(lit.value.lower() in ("true", "1"), "bool")
    return lit


def _edm(col: Column) -> str:
    from .schema import EDM_TYPES

    return EDM_TYPES.get(col.type, "Edm.String")


def compile_filter(ent: EntityDef, node: Node, alias: str = "t0") -> CompiledFilter:
    sql, params = _Compiler(ent, alias).bool_expr(node)
    return CompiledFilter(sql, params)


@dataclass
class PageResult:
    rows: list[Row]
    next_token: str | None
    count: int | None


def _order_terms(ent: EntityDef, order: list[OrderItem], alias: str) -> list[tuple[str, bool]]:
    terms: list[tuple[str, bool]] = []
    for item in order:
        col = ent.column_for_key(item.key)
        if col is None:
            raise DataverseError.unknown_property(item.key, ent.logical_name)
        expr = f"json_extract({alias}.data, '$.{col.value_key}')"
        # Sentinels make NULL sort first ascending (as SQL Server does) and keep keyset comparisons NULL-free.
        if col.type in _NUMERIC or col.type == BOOL:
            expr = f"COALESCE({expr}, -1e308)"
        else:
            expr = f"COALESCE(dv_fold({expr}), '')"
        terms.append((expr, item.desc))
    return terms


def _encode_token(values: list[Any], seq: int) -> str:
    raw = json.dumps({"v": values, "s": seq}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str) -> tuple[list[Any], int]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        return list(data["v"]), int(data["s"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataverseError.bad_request("The $skiptoken value is not valid.") from exc


def run_query(
    store: Store,
    ent: EntityDef,
    *,
    where: Node | None = None,
    order: list[OrderItem] | None = None,
    limit: int | None = None,
    skiptoken: str | None = None,
    count: bool = False,
    parent: str | None = None,
) -> PageResult:
    alias = "t0"
    clauses: list[str] = []
    params: list[Any] = []
    if where is not None:
        cf = compile_filter(ent, where, alias)
        clauses.append(cf.sql)
        params += cf.params
    if parent is not None:
        clauses.append(f"{alias}.parent = ?")
        params.append(parent)
    table = f'"{table_name(ent.logical_name)}" {alias}'
    base_where = " AND ".join(clauses) if clauses else "1"
    total = None
    if count:
        total = int(store.select(f"SELECT COUNT(*) FROM {table} WHERE {base_where}", params)[0][0])
    terms = _order_terms(ent, order or [], alias)
    page_clauses, page_params = list(clauses), list(params)
    if skiptoken:
        values, seq = _decode_token(skiptoken)
        if len(values) != len(terms):
            raise DataverseError.bad_request("The $skiptoken value does not match the query.")
        ors: list[str] = []
        keys = [*terms, (f"{alias}.seq", False)]
        vals = [*values, seq]
        for i, (expr, desc) in enumerate(keys):
            eqs = [f"{keys[j][0]} = ?" for j in range(i)]
            cmp = f"{expr} {'<' if desc else '>'} ?"
            ors.append("(" + " AND ".join([*eqs, cmp]) + ")")
            page_params += [*vals[:i], vals[i]]
        page_clauses.append("(" + " OR ".join(ors) + ")")
    order_sql = ", ".join([f"{e} {'DESC' if d else 'ASC'}" for e, d in terms] + [f"{alias}.seq ASC"])
    select_terms = "".join(f", {e}" for e, _ in terms)
    sql = (
        f"SELECT {alias}.data, {alias}.version, {alias}.seq{select_terms} FROM {table} "
        f"WHERE {' AND '.join(page_clauses) if page_clauses else '1'} ORDER BY {order_sql}"
    )
    if limit is not None:
        sql += f" LIMIT {int(limit) + 1}"
    fetched = store.select(sql, page_params)
    next_token = None
    if limit is not None and len(fetched) > limit:
        fetched = fetched[:limit]
        last = fetched[-1]
        next_token = _encode_token(list(last[3:]), int(last[2]))
    rows: list[Row] = []
    for rec in fetched:
        row = json.loads(rec[0])
        row["versionnumber"] = rec[1]
        rows.append(row)
    return PageResult(rows, next_token, total)
