"""The OData query subset Graph mail supports: $filter, $select, $expand, $orderby, Prefer.

``$filter`` is parsed into a small AST once and evaluated against Graph-shaped dicts. Operators and
property names are case-insensitive (Graph accepts ``hasAttachments eq true AND importance eq 'High'``),
string comparisons are case-insensitive as in Exchange, and a literal that looks like a date-time is
compared as a date-time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .util import GraphError, parse_dt

__all__ = ["Prefer", "check_filter", "check_orderby_against_filter", "compile_filter", "filter_properties",
           "parse_expand", "parse_orderby", "parse_prefer", "split_top_level"]

_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<lp>\()|(?P<rp>\))|(?P<comma>,)"
    r"|(?P<dt>\d{4}-\d{2}-\d{2}(?:T[0-9:.]+(?:Z|[+-]\d{2}:\d{2})?)?)"
    r"|(?P<num>-?\d+(?:\.\d+)?)|(?P<name>[A-Za-z_@$][\w./@$:-]*))"
)
_COMPARE = {"eq", "ne", "gt", "ge", "lt", "le"}
_FUNCS = {"contains", "startswith", "endswith"}

Node = Callable[[Mapping[str, Any]], Any]


def _bad(detail: str) -> GraphError:
    return GraphError(400, "ErrorInvalidUrlQueryFilter",
                      f"The query filter contains one or more invalid nodes. {detail}")


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise _bad(f"Unexpected character at {pos}.")
        kind = m.lastgroup or ""
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    return tokens


def lookup(obj: Mapping[str, Any], path: str) -> Any:
    """``from/emailAddress/address`` against a dict, property names case-insensitive."""
    current: Any = obj
    for part in path.split("/"):
        if not isinstance(current, Mapping):
            return None
        if part in current:
            current = current[part]
            continue
        lowered = part.lower()
        current = next((v for k, v in current.items() if k.lower() == lowered), None)
    return current


def _coerce_pair(a: Any, b: Any) -> tuple[Any, Any]:
    if isinstance(a, datetime) or isinstance(b, datetime):
        try:
            a = a if isinstance(a, datetime) else parse_dt(str(a))
            b = b if isinstance(b, datetime) else parse_dt(str(b))
        except ValueError:
            return str(a), str(b)
        return a, b
    if isinstance(a, str) and isinstance(b, str):
        return a.casefold(), b.casefold()
    return a, b


def _compare(op: str, a: Any, b: Any) -> bool:
    if a is None or b is None:
        return (a is None and b is None) if op == "eq" else (a is not b) if op == "ne" else False
    a, b = _coerce_pair(a, b)
    try:
        if op == "eq":
            return bool(a == b)
        if op == "ne":
            return bool(a != b)
        if op == "gt":
            return bool(a > b)
        if op == "ge":
            return bool(a >= b)
        if op == "lt":
            return bool(a < b)
        return bool(a <= b)
    except TypeError:
        return False


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens = tokens
        self.i = 0
        # What the expression names, in textual order, for the schema check (:func:`check_filter`):
        # ("property", path) | ("any", collection path) | ("element", collection path, path inside the element).
        self.names: list[tuple[str, ...]] = []
        self.scope: dict[str, str] = {}  # lambda variable -> the collection it ranges over

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise _bad("Unexpected end of expression.")
        self.i += 1
        return tok

    def keyword(self, word: str) -> bool:
        tok = self.peek()
        if tok and tok[0] == "name" and tok[1].lower() == word:
            self.i += 1
            return True
        return False

    def parse(self) -> Node:
        node = self.or_expr()
        if self.peek() is not None:
            raise _bad(f"Unexpected token {self.peek()[1]!r}.")  # type: ignore[index]
        return node

    def or_expr(self) -> Node:
        node = self.and_expr()
        while self.keyword("or"):
            left, right = node, self.and_expr()
            node = (lambda lf, rf: lambda o: bool(lf(o)) or bool(rf(o)))(left, right)
        return node

    def and_expr(self) -> Node:
        node = self.not_expr()
        while self.keyword("and"):
            left, right = node, self.not_expr()
            node = (lambda lf, rf: lambda o: bool(lf(o)) and bool(rf(o)))(left, right)
        return node

    def not_expr(self) -> Node:
        if self.keyword("not"):
            inner = self.not_expr()
            return lambda o: not inner(o)
        return self.comparison()

    def comparison(self) -> Node:
        left = self.operand()
        tok = self.peek()
        if tok and tok[0] == "name" and tok[1].lower() in _COMPARE:
            self.i += 1
            op = tok[1].lower()
            right = self.operand()
            return lambda o: _compare(op, left(o), right(o))
        return left

    def operand(self) -> Node:
        kind, text = self.take()
        if kind == "lp":
            node = self.or_expr()
            if self.take()[0] != "rp":
                raise _bad("Missing ')'.")
            return node
        if kind == "str":
            value = text[1:-1].replace("''", "'")
            return lambda o: value
        if kind == "dt":
            try:
                dt_value = parse_dt(text)
            except ValueError:
                raise _bad(f"Invalid date-time {text!r}.") from None
            return lambda o: dt_value
        if kind == "num":
            num: float | int = float(text) if "." in text else int(text)
            return lambda o: num
        if kind == "name":
            low = text.lower()
            if low == "true":
                return lambda o: True
            if low == "false":
                return lambda o: False
            if low == "null":
                return lambda o: None
            nxt = self.peek()
            if low.endswith("/any") and nxt and nxt[0] == "lp":
                return self.any_lambda(text[: -len("/any")])
            if low in _FUNCS and nxt and nxt[0] == "lp":
                self.i += 1
                first = self.or_expr()
                if self.take()[0] != "comma":
                    raise _bad(f"{text} needs two arguments.")
                second = self.or_expr()
                if self.take()[0] != "rp":
                    raise _bad("Missing ')'.")

                def func(o: Mapping[str, Any], f: str = low, a: Node = first, b: Node = second) -> bool:
                    x, y = a(o), b(o)
                    if not isinstance(x, str) or not isinstance(y, str):
                        return False
                    x, y = x.casefold(), y.casefold()
                    return y in x if f == "contains" else x.startswith(y) if f == "startswith" else x.endswith(y)

                return func
            head, _, rest = text.partition("/")
            if head in self.scope:
                self.names.append(("element", self.scope[head], rest))
            else:
                self.names.append(("property", text))
            return lambda o: lookup(o, text)
        raise _bad(f"Unexpected token {text!r}.")


    def any_lambda(self, collection: str) -> Node:
        """``proxyAddresses/any(p:p eq 'smtp:x')``: true when the body holds for one element (``p`` is bound to
        it; ``p/address`` reaches into an element object)."""
        self.take()  # (
        kind, text = self.take()
        m = re.fullmatch(r"([A-Za-z_]\w*):([A-Za-z_][\w./@$:-]*)", text) if kind == "name" else None
        if m is None:
            raise _bad("any() needs a lambda 'x:x ...'.")
        var = m.group(1)
        self.names.append(("any", collection))
        self.tokens.insert(self.i, ("name", m.group(2)))
        outer = self.scope.get(var)
        self.scope[var] = collection
        body = self.or_expr()
        if outer is None:
            del self.scope[var]
        else:
            self.scope[var] = outer
        if self.take()[0] != "rp":
            raise _bad("Missing ')'.")

        def any_of(o: Mapping[str, Any]) -> bool:
            items = lookup(o, collection)
            if not isinstance(items, list):
                return False
            return any(bool(body({**o, var: item})) for item in items)

        return any_of


def compile_filter(text: str, entity_type: str | None = None) -> Node:
    """``$filter`` text -> a predicate over Graph-shaped dicts. With ``entity_type`` (a type of Graph's v1.0
    metadata, e.g. ``message``) every property it names must be declared on that type, as Graph answers
    otherwise (:func:`check_filter`)."""
    parser = _Parser(_tokenize(text))
    node = parser.parse()
    if entity_type is not None:
        check_filter(parser.names, entity_type)
    return node


def filter_properties(text: str) -> list[str]:
    """The top-level properties a ``$filter`` names, in order of first appearance (a lambda counts as its
    collection), lower-cased: what Graph compares ``$orderby`` against (InefficientFilter)."""
    parser = _Parser(_tokenize(text))
    parser.parse()
    seen: list[str] = []
    for name in parser.names:
        if name[0] in ("property", "any") and name[1].lower() not in seen:
            seen.append(name[1].lower())
    return seen


def _unknown(name: str, type_name: str) -> GraphError:
    return GraphError(400, "RequestBroker--ParseUri",
                      f"Could not find a property named '{name}' on type 'microsoft.graph.{type_name}'.")


def _resolve(meta: Any, type_name: str, path: str) -> str:
    """The declared type of ``path`` (``from/emailAddress/address``) on ``type_name``: each segment must be a
    property (case-insensitive, as Graph matches them) of the complex type before it; no step through a
    collection (that needs ``any``)."""
    current = type_name
    declared = ""
    for segment in path.split("/"):
        if declared.startswith("Collection("):
            raise _bad(f"The property '{segment}' cannot be reached through the collection before it; use any().")
        if current.startswith("Edm.") or current not in meta.types:
            raise _unknown(segment, current)
        props = {k.lower(): v for k, v in meta.properties(current).items()}
        spec = props.get(segment.lower())
        if spec is None:
            raise _unknown(segment, current)
        declared = str(spec["type"])
        inner = declared[len("Collection("):-1] if declared.startswith("Collection(") else declared
        current = inner.removeprefix("graph.")
    return declared


def check_filter(names: list[tuple[str, ...]], entity_type: str) -> None:
    """Refuse what Graph refuses about the properties of a ``$filter`` (400): an undeclared property, ``any`` over a
    property that is no collection, a lambda body that reaches into a collection of primitives."""
    from .metadata import load_metadata

    meta = load_metadata()
    for name in names:
        if name[0] == "property":
            _resolve(meta, entity_type, name[1])
        elif name[0] == "any":
            declared = _resolve(meta, entity_type, name[1])
            if not declared.startswith("Collection("):
                raise _bad(f"The any() operator needs a collection; '{name[1]}' is {declared}.")
        else:  # inside a lambda: the element itself (a primitive) or a property of it (a complex element)
            element = _resolve(meta, entity_type, name[1])[len("Collection("):-1]
            if name[2]:
                _resolve(meta, element.removeprefix("graph."), name[2])
            elif not element.startswith("Edm."):
                raise _bad(f"The elements of '{name[1]}' are {element}; compare one of their properties.")


def check_orderby_against_filter(filter_text: str | None, order: list[tuple[str, bool]]) -> None:
    """List messages: "Properties that appear in $orderby must also appear in $filter", "in the same order", and
    "before any properties that aren't" - else 400 ``InefficientFilter`` (Graph, List messages)."""
    if not filter_text or not order:
        return
    wanted = [path.lower() for path, _ in order]
    if filter_properties(filter_text)[:len(wanted)] != wanted:
        raise GraphError(400, "InefficientFilter", "The restriction or sort order is too complex for this operation.")


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside parentheses and quotes (``$expand=a($filter=x eq 'a,b'),b``)."""
    parts: list[str] = []
    depth, quoted, start = 0, False, 0
    for i, ch in enumerate(text):
        if ch == "'":
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
        elif not quoted and depth == 0 and ch == sep:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


_EXPAND_ITEM = re.compile(r"^(?P<name>[^()]+?)\s*(?:\((?P<opts>.*)\))?$", re.S)


def parse_expand(text: str | None) -> dict[str, dict[str, str]]:
    """``attachments,singleValueExtendedProperties($filter=...)`` -> {lower name: {option: value}}."""
    result: dict[str, dict[str, str]] = {}
    if not text:
        return result
    for item in split_top_level(text):
        m = _EXPAND_ITEM.match(item)
        if not m:
            raise GraphError(400, "BadRequest", f"Invalid $expand item {item!r}.")
        opts: dict[str, str] = {}
        for opt in split_top_level(m.group("opts") or "", ";"):
            key, _, value = opt.partition("=")
            opts[key.strip().lower()] = value.strip()
        result[m.group("name").strip().lower()] = opts
    return result


def parse_orderby(text: str | None) -> list[tuple[str, bool]]:
    """``receivedDateTime desc,subject`` -> [(path, descending)]."""
    order: list[tuple[str, bool]] = []
    for part in split_top_level(text or ""):
        bits = part.split()
        if not bits or len(bits) > 2 or (len(bits) == 2 and bits[1].lower() not in ("asc", "desc")):
            raise GraphError(400, "BadRequest", f"Invalid $orderby clause {part!r}.")
        order.append((bits[0], len(bits) == 2 and bits[1].lower() == "desc"))
    return order


@dataclass(frozen=True)
class Prefer:
    immutable_id: bool = False
    max_page_size: int | None = None
    body_content_type: str | None = None  # "text" | "html"


_PREF = re.compile(r'\s*([\w.-]+)\s*(?:=\s*("[^"]*"|[^,;\s]*))?')


def parse_prefer(values: list[str]) -> Prefer:
    """All ``Prefer`` headers (SDKs merge them with commas; several headers are allowed too)."""
    immutable, page, body_type = False, None, None
    for value in values:
        for part in value.split(","):
            m = _PREF.match(part)
            if not m:
                continue
            name, raw = m.group(1).lower(), (m.group(2) or "").strip('"')
            if name == "idtype":
                immutable = raw.lower() == "immutableid"
            elif name == "odata.maxpagesize":
                try:
                    page = max(1, int(raw))
                except ValueError:
                    pass
            elif name == "outlook.body-content-type" and raw.lower() in ("text", "html"):
                body_type = raw.lower()
    return Prefer(immutable, page, body_type)
