"""OData query option parsing: a ``$filter`` tokenizer + precedence-climbing parser, ``$select``, ``$orderby``,
``$expand`` (with nested options) and ``Prefer`` header parsing.

The parser produces a small AST (dataclasses below); ``query.py`` compiles it to SQL for a given table. Keeping the
two apart lets the unit tests check parsing as a plain table of cases.

Grammar (subset of OData 4.0 ABNF that Dataverse accepts), lowest precedence first::

    or  := and ('or' and)*
    and := eq ('and' eq)*
    eq  := rel (('eq'|'ne') rel)*
    rel := unary (('gt'|'ge'|'lt'|'le') unary | 'in' '(' literal (',' literal)* ')')*
    unary := 'not' unary | primary
    primary := '(' or ')' | literal | func '(' args ')' | path ['/' ('any'|'all') '(' [var ':' or] ')']
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from .errors import DataverseError

__all__ = [
    "And", "Cmp", "ExpandItem", "Func", "In", "Lambda", "Literal", "Node", "Not", "Or", "OrderItem", "Prefer", "Prop",
    "parse_expand", "parse_filter", "parse_orderby", "parse_prefer", "parse_select", "tokenize",
]


# ---- AST ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Literal:
    value: Any
    kind: str  # string | int | decimal | bool | null | guid | datetime


@dataclass(frozen=True)
class Prop:
    path: tuple[str, ...]  # ("subject",) or ("p", "addressused") inside a lambda


@dataclass(frozen=True)
class Cmp:
    op: str  # eq ne gt ge lt le
    left: Node
    right: Node


@dataclass(frozen=True)
class And:
    left: Node
    right: Node


@dataclass(frozen=True)
class Or:
    left: Node
    right: Node


@dataclass(frozen=True)
class Not:
    expr: Node


@dataclass(frozen=True)
class Func:
    name: str  # contains startswith endswith tolower toupper
    args: tuple[Node, ...]


@dataclass(frozen=True)
class In:
    prop: Prop
    values: tuple[Literal, ...]
    negate: bool = False


@dataclass(frozen=True)
class Lambda:
    kind: str  # any | all
    nav: str
    var: str | None  # None only for the argument-less ``nav/any()``
    expr: Node | None


Node = Literal | Prop | Cmp | And | Or | Not | Func | In | Lambda


# ---- tokenizer ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Token:
    kind: str  # str num guid date ident op punct
    text: str
    pos: int
    value: Any = None


_GUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}(?![\w-])")
_DATE_RE = re.compile(
    r"\d{4}-\d{2}-\d{2}(?:T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,7})?)?(?:Z|[+-]\d{2}:\d{2})?)?(?![\w:.-])"
)
_NUM_RE = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[mMdDfFlL]?(?![\w])")
_IDENT_RE = re.compile(r"[A-Za-z_$@][\w.$@]*")
_KEYWORD_OPS = {"eq", "ne", "gt", "ge", "lt", "le", "and", "or", "not", "in"}


def _syntax(text: str, pos: int, what: str) -> DataverseError:
    return DataverseError.syntax(f"Syntax error: {what} at position {pos} in '{text}'.")


def tokenize(text: str) -> list[Token]:
    toks: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        if c == "'":
            j, buf = i + 1, []
            while True:
                if j >= n:
                    # Dataverse reports the end of the text as the position of an unterminated literal (§7.1).
                    raise DataverseError.syntax(f"There is an unterminated literal at position {n} in '{text}'.")
                if text[j] == "'":
                    if j + 1 < n and text[j + 1] == "'":
                        buf.append("'")
                        j += 2
                        continue
                    break
                buf.append(text[j])
                j += 1
            toks.append(Token("str", text[i:j + 1], i, "".join(buf)))
            i = j + 1
            continue
        if c in "(),/:[]=":
            toks.append(Token("punct", c, i))
            i += 1
            continue
        m = _GUID_RE.match(text, i)
        if m:
            toks.append(Token("guid", m.group(0), i, m.group(0).lower()))
            i = m.end()
            continue
        m = _DATE_RE.match(text, i)
        if m:
            toks.append(Token("date", m.group(0), i, m.group(0)))
            i = m.end()
            continue
        m = _NUM_RE.match(text, i)
        if m:
            raw = m.group(0).rstrip("mMdDfFlL")
            val: int | float = float(raw) if any(ch in raw for ch in ".eE") else int(raw)
            toks.append(Token("num", m.group(0), i, val))
            i = m.end()
            continue
        m = _IDENT_RE.match(text, i)
        if m:
            word = m.group(0)
            kind = "op" if word in _KEYWORD_OPS else "ident"
            toks.append(Token(kind, word, i, word))
            i = m.end()
            continue
        raise _syntax(text, i, f"unexpected character '{c}'")
    return toks


def normalize_datetime(text: str) -> str:
    """Stored/compared form: UTC ``YYYY-MM-DDTHH:MM:SSZ`` (string order = time order)."""
    raw = text.strip()
    if raw.endswith("Z"):
        raw = raw[:-1] + "+00:00"
    if len(raw) == 10:
        raw += "T00:00:00+00:00"
    try:
        parsed = dt.datetime.fromisoformat(raw)
    except ValueError as exc:
        raise DataverseError.bad_request(
            f"Cannot convert the literal '{text}' to the expected type 'Edm.DateTimeOffset'.") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- parser -------------------------------------------------------------------------------------------------------
class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = tokenize(text)
        self.i = 0
        self.vars: list[str] = []

    def peek(self, offset: int = 0) -> Token | None:
        j = self.i + offset
        return self.toks[j] if j < len(self.toks) else None

    def at(self, kind: str, text: str | None = None, offset: int = 0) -> bool:
        t = self.peek(offset)
        return t is not None and t.kind == kind and (text is None or t.text == text)

    def take(self, kind: str, text: str | None = None) -> Token:
        t = self.peek()
        if t is None or t.kind != kind or (text is not None and t.text != text):
            pos = t.pos if t else len(self.text)
            raise _syntax(self.text, pos, f"expected {text or kind}")
        self.i += 1
        return t

    def parse(self) -> Node:
        if not self.toks:
            raise _syntax(self.text, 0, "empty expression")
        node = self.or_()
        if self.peek() is not None:
            t = self.peek()
            assert t is not None
            raise _syntax(self.text, t.pos, f"unexpected '{t.text}'")
        return node

    def or_(self) -> Node:
        left = self.and_()
        while self.at("op", "or"):
            self.i += 1
            left = Or(left, self.and_())
        return left

    def and_(self) -> Node:
        left = self.eq()
        while self.at("op", "and"):
            self.i += 1
            left = And(left, self.eq())
        return left

    def eq(self) -> Node:
        left = self.rel()
        while self.at("op", "eq") or self.at("op", "ne"):
            op = self.take("op").text
            left = Cmp(op, left, self.rel())
        return left

    def rel(self) -> Node:
        left = self.unary()
        while True:
            t = self.peek()
            if t is not None and t.kind == "op" and t.text in ("gt", "ge", "lt", "le"):
                self.i += 1
                left = Cmp(t.text, left, self.unary())
            elif t is not None and t.kind == "op" and t.text == "in":
                self.i += 1
                if not isinstance(left, Prop):
                    raise _syntax(self.text, t.pos, "'in' needs a property on the left")
                self.take("punct", "(")
                values = [self.literal()]
                while self.at("punct", ","):
                    self.i += 1
                    values.append(self.literal())
                self.take("punct", ")")
                left = In(left, tuple(values))
            else:
                return left

    def unary(self) -> Node:
        if self.at("op", "not"):
            self.i += 1
            return Not(self.unary())
        return self.primary()

    def literal(self) -> Literal:
        t = self.peek()
        if t is None:
            raise _syntax(self.text, len(self.text), "expected a literal")
        self.i += 1
        if t.kind == "str":
            return Literal(t.value, "string")
        if t.kind == "num":
            return Literal(t.value, "int" if isinstance(t.value, int) else "decimal")
        if t.kind == "guid":
            return Literal(t.value, "guid")
        if t.kind == "date":
            return Literal(normalize_datetime(t.value), "datetime")
        if t.kind == "ident" and t.text in ("true", "false"):
            return Literal(t.text == "true", "bool")
        if t.kind == "ident" and t.text == "null":
            return Literal(None, "null")
        if t.kind == "ident" and t.text.lower() == "guid" and self.at("str"):
            # Legacy form guid'...'
            s = self.take("str").value
            try:
                return Literal(str(uuid.UUID(s)), "guid")
            except ValueError as exc:
                raise _syntax(self.text, t.pos, "bad guid literal") from exc
        self.i -= 1
        raise _syntax(self.text, t.pos, f"unexpected '{t.text}'")

    def primary(self) -> Node:
        t = self.peek()
        if t is None:
            raise _syntax(self.text, len(self.text), "unexpected end of expression")
        if t.kind == "punct" and t.text == "(":
            self.i += 1
            node = self.or_()
            self.take("punct", ")")
            return node
        if t.kind in ("str", "num", "guid", "date") or (t.kind == "ident" and t.text in ("true", "false", "null")):
            return self.literal()
        if t.kind == "ident" and t.text.lower() == "guid" and self.at("str", offset=1):
            return self.literal()
        if t.kind == "ident" and self.at("punct", "(", offset=1):
            return self.call()
        if t.kind == "ident":
            return self.path()
        raise _syntax(self.text, t.pos, f"unexpected '{t.text}'")

    def call(self) -> Node:
        name_tok = self.take("ident")
        name = name_tok.text
        self.take("punct", "(")
        short = name.rsplit(".", 1)[-1]
        if "." in name:
            # Dataverse query functions take named parameters: Microsoft.Dynamics.CRM.In(PropertyName='x',...)
            params: dict[str, Any] = {}
            while not self.at("punct", ")"):
                key = self.take("ident").text
                self.take("punct", "=")
                if self.at("punct", "["):
                    self.i += 1
                    items: list[Literal] = []
                    while not self.at("punct", "]"):
                        items.append(self.literal())
                        if self.at("punct", ","):
                            self.i += 1
                    self.take("punct", "]")
                    params[key] = items
                else:
                    params[key] = self.literal()
                if self.at("punct", ","):
                    self.i += 1
            self.take("punct", ")")
            return self.query_function(short, params, name_tok.pos)
        args: list[Node] = []
        while not self.at("punct", ")"):
            args.append(self.or_())
            if self.at("punct", ","):
                self.i += 1
            elif not self.at("punct", ")"):
                t = self.peek()
                raise _syntax(self.text, t.pos if t else len(self.text), "expected ',' or ')'")
        self.take("punct", ")")
        lname = name.lower()
        arity = {"contains": 2, "startswith": 2, "endswith": 2, "tolower": 1, "toupper": 1}
        if lname not in arity:
            raise DataverseError.bad_request(f"An unknown function with name '{name}' was found.", code="0x80060888")
        if len(args) != arity[lname]:
            raise _syntax(self.text, name_tok.pos, f"{name} takes {arity[lname]} arguments")
        return Func(lname, tuple(args))

    def query_function(self, name: str, params: dict[str, Any], pos: int) -> Node:
        prop_lit = params.get("PropertyName")
        if not isinstance(prop_lit, Literal) or prop_lit.kind != "string":
            raise _syntax(self.text, pos, f"{name} needs PropertyName")
        prop = Prop((prop_lit.value,))
        if name in ("In", "NotIn"):
            vals = params.get("PropertyValues")
            if not isinstance(vals, list) or not vals:
                raise _syntax(self.text, pos, f"{name} needs PropertyValues")
            return In(prop, tuple(vals), negate=name == "NotIn")
        if name in ("Between", "NotBetween"):
            vals = params.get("PropertyValues")
            if not isinstance(vals, list) or len(vals) != 2:
                raise _syntax(self.text, pos, f"{name} needs two PropertyValues")
            node: Node = And(Cmp("ge", prop, vals[0]), Cmp("le", prop, vals[1]))
            return Not(node) if name == "NotBetween" else node
        if name in ("Null", "NotNull"):
            return Cmp("eq" if name == "Null" else "ne", prop, Literal(None, "null"))
        raise DataverseError.bad_request(f"An unknown function with name 'Microsoft.Dynamics.CRM.{name}' was found.",
                                         code="0x80060888")

    def path(self) -> Node:
        parts = [self.take("ident").text]
        while self.at("punct", "/"):
            self.i += 1
            t = self.take("ident")
            if t.text in ("any", "all") and self.at("punct", "("):
                return self.lambda_(tuple(parts), t.text)
            parts.append(t.text)
        return Prop(tuple(parts))

    def lambda_(self, nav: tuple[str, ...], kind: str) -> Node:
        self.take("punct", "(")
        if len(nav) != 1:
            raise _syntax(self.text, self.peek().pos if self.peek() else 0, "nested lambda paths are not supported")
        if kind == "any" and self.at("punct", ")"):
            self.i += 1
            return Lambda("any", nav[0], None, None)
        var = self.take("ident").text
        self.take("punct", ":")
        self.vars.append(var)
        try:
            body = self.or_()
        finally:
            self.vars.pop()
        self.take("punct", ")")
        return Lambda(kind, nav[0], var, body)


def parse_filter(text: str) -> Node:
    return _Parser(text).parse()


# ---- $select / $orderby / $expand ---------------------------------------------------------------------------------
def parse_select(text: str | None) -> list[str] | None:
    if text is None or not text.strip():
        return None
    return [s.strip() for s in text.split(",") if s.strip()]


@dataclass(frozen=True)
class OrderItem:
    key: str
    desc: bool = False


def parse_orderby(text: str | None) -> list[OrderItem]:
    if not text:
        return []
    items: list[OrderItem] = []
    for part in text.split(","):
        bits = part.strip().split()
        if not bits or len(bits) > 2 or (len(bits) == 2 and bits[1].lower() not in ("asc", "desc")):
            raise DataverseError.syntax(f"Syntax error in $orderby: '{text}'.")
        items.append(OrderItem(bits[0], len(bits) == 2 and bits[1].lower() == "desc"))
    return items


@dataclass
class ExpandItem:
    nav: str
    options: dict[str, str] = field(default_factory=dict)


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside parentheses and quotes."""
    out, depth, buf, quoted = [], 0, [], False
    for ch in text:
        if ch == "'":
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
        if ch == sep and depth == 0 and not quoted:
            out.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    if depth != 0:
        raise DataverseError.syntax(f"Unbalanced parentheses in '{text}'.")
    out.append("".join(buf))
    return [o.strip() for o in out if o.strip()]


def parse_expand(text: str | None) -> list[ExpandItem]:
    if not text:
        return []
    items: list[ExpandItem] = []
    for part in _split_top(text, ","):
        if "(" in part:
            nav, rest = part.split("(", 1)
            if not rest.endswith(")"):
                raise DataverseError.syntax(f"Syntax error in $expand: '{part}'.")
            opts: dict[str, str] = {}
            for opt in _split_top(rest[:-1], ";"):
                if "=" not in opt:
                    raise DataverseError.syntax(f"Syntax error in $expand option '{opt}'.")
                k, v = opt.split("=", 1)
                opts[k.strip()] = v.strip()
            items.append(ExpandItem(nav.strip(), opts))
        else:
            items.append(ExpandItem(part.strip()))
    if len(items) > 15:
        raise DataverseError.bad_request("The number of $expand exceeded the maximum of 15.")
    return items


# ---- Prefer ---------------------------------------------------------------------------------------------------------
@dataclass
class Prefer:
    return_representation: bool = False
    maxpagesize: int | None = None
    annotations: tuple[str, ...] = ()
    continue_on_error: bool = False


def _split_preferences(header: str) -> list[str]:
    """Split a Prefer header on commas outside double quotes (include-annotations lists several, quoted)."""
    out, buf, quoted = [], [], False
    for ch in header:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            out.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    out.append("".join(buf))
    return [o.strip() for o in out if o.strip()]


def parse_prefer(values: list[str]) -> Prefer:
    p = Prefer()
    for header in values:
        for raw in _split_preferences(header):
            item = raw.strip()
            low = item.lower()
            if low == "return=representation":
                p.return_representation = True
            elif low.startswith("odata.maxpagesize="):
                try:
                    p.maxpagesize = int(item.split("=", 1)[1].strip().strip('"'))
                except ValueError:
                    raise DataverseError.bad_request(f"Invalid Prefer header '{item}'.") from None
            elif low.startswith("odata.include-annotations="):
                val = item.split("=", 1)[1].strip().strip('"')
                p.annotations = tuple(a.strip() for a in val.split(",") if a.strip())
            elif low in ("odata.continue-on-error", "odata.continue-on-error=true"):
                p.continue_on_error = True
    return p
