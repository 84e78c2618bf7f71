"""ASP.NET Core route templates as the Functions host understands them, compiled to regexes.

Supported: literal segments (case-insensitive), ``{name}``, ``{name?}`` (optional, trailing),
``{name=default}``, ``{*rest}`` / ``{**rest}`` (catch-all, last), parameters mixed with literals in a
segment (``{file}.{ext}``) and the inline constraints int, long, bool, guid, alpha, double, float,
decimal, datetime, min/max/range, length/minlength/maxlength and regex(...). An unknown constraint is
ignored with a warning (the real host would refuse to index the function).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["CompiledRoute", "RouteTemplateError", "compile_route"]

log = logging.getLogger("Host.Routes")

Check = Callable[[str], bool]


class RouteTemplateError(ValueError):
    pass


@dataclass(frozen=True)
class _Param:
    name: str
    group: str
    optional: bool
    default: str | None
    catch_all: bool
    checks: tuple[Check, ...]


@dataclass(frozen=True)
class CompiledRoute:
    template: str
    regex: re.Pattern[str]
    params: tuple[_Param, ...] = field(default_factory=tuple)
    literal_segments: int = 0

    @property
    def precedence(self) -> tuple[int, int, int]:
        """Sort key: more literal segments first, then fewer optional/catch-all parameters."""
        optional = sum(1 for p in self.params if p.optional or p.default is not None)
        catch_all = sum(1 for p in self.params if p.catch_all)
        return (-self.literal_segments, catch_all, optional)

    def match(self, path: str) -> dict[str, str] | None:
        """Route values for ``path`` (already URL-decoded, without the route prefix), or None."""
        m = self.regex.fullmatch(path.strip("/"))
        if not m:
            return None
        values: dict[str, str] = {}
        for p in self.params:
            raw = m.group(p.group)
            if raw is None or raw == "":
                if p.default is not None:
                    values[p.name] = p.default
                continue
            if not all(check(raw) for check in p.checks):
                return None
            values[p.name] = raw
        return values


def _int_range(lo: int, hi: int) -> Check:
    def check(v: str) -> bool:
        try:
            return lo <= int(v) <= hi
        except ValueError:
            return False

    return check


def _is_float(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return v.strip().lower() not in ("nan", "inf", "-inf", "infinity", "-infinity")


def _is_guid(v: str) -> bool:
    try:
        uuid.UUID(v)
    except ValueError:
        return False
    return True


def _is_datetime(v: str) -> bool:
    try:
        dt.datetime.fromisoformat(v)
    except ValueError:
        return False
    return True


def _constraint(name: str, arg: str | None) -> Check | None:
    n = name.lower()
    simple: dict[str, Check] = {
        "int": _int_range(-(2**31), 2**31 - 1),
        "long": _int_range(-(2**63), 2**63 - 1),
        "bool": lambda v: v.lower() in ("true", "false"),
        "guid": _is_guid,
        "alpha": lambda v: re.fullmatch(r"[A-Za-z]+", v) is not None,
        "double": _is_float,
        "float": _is_float,
        "decimal": _is_float,
        "datetime": _is_datetime,
    }
    if n in simple and arg is None:
        return simple[n]
    if arg is None:
        return None
    nums = [a.strip() for a in arg.split(",")]
    try:
        if n == "min":
            lo = int(nums[0])
            return lambda v: _int_range(lo, 2**63)(v)
        if n == "max":
            hi = int(nums[0])
            return lambda v: _int_range(-(2**63), hi)(v)
        if n == "range":
            return _int_range(int(nums[0]), int(nums[1]))
        if n == "length":
            lo = int(nums[0])
            hi = int(nums[1]) if len(nums) > 1 else lo
            return lambda v: lo <= len(v) <= hi
        if n == "minlength":
            lo = int(nums[0])
            return lambda v: len(v) >= lo
        if n == "maxlength":
            hi = int(nums[0])
            return lambda v: len(v) <= hi
    except (ValueError, IndexError) as exc:
        raise RouteTemplateError(f"bad arguments for route constraint {name}({arg})") from exc
    if n == "regex":
        pattern = re.compile(arg, re.IGNORECASE)
        return lambda v: pattern.search(v) is not None
    return None


_PARAM = re.compile(r"\{([^{}]*(?:\([^)]*\))?[^{}]*)\}")
_CONSTRAINT = re.compile(r":(\w+)(?:\(((?:[^()]|\([^)]*\))*)\))?")


def _parse_param(body: str, index: int, template: str) -> _Param:
    catch_all = body.startswith("*")
    body = body.lstrip("*")
    optional = body.endswith("?")
    body = body.rstrip("?")
    default: str | None = None
    if "=" in body and "(" not in body.split("=", 1)[0]:
        body, default = body.split("=", 1)
    name, _, constraint_text = body.partition(":")
    if not name or not re.fullmatch(r"[A-Za-z_][\w]*", name):
        raise RouteTemplateError(f"invalid route parameter {{{body}}} in {template!r}")
    checks: list[Check] = []
    if constraint_text:
        for m in _CONSTRAINT.finditer(":" + constraint_text):
            check = _constraint(m.group(1), m.group(2))
            if check is None:
                log.warning("Route %r: constraint %r is not supported locally and is ignored", template, m.group(0))
            else:
                checks.append(check)
    return _Param(name, f"p{index}", optional, default, catch_all, tuple(checks))


def compile_route(template: str) -> CompiledRoute:
    segments = [s for s in template.strip("/").split("/") if s != ""]
    parts: list[tuple[str, bool]] = []  # (regex of the segment, segment may be absent)
    params: list[_Param] = []
    literals = 0
    for pos, seg in enumerate(segments):
        pieces: list[str] = []
        last = 0
        seg_params: list[_Param] = []
        for m in _PARAM.finditer(seg):
            pieces.append(re.escape(seg[last : m.start()]))
            p = _parse_param(m.group(1), len(params) + len(seg_params), template)
            if p.catch_all and pos != len(segments) - 1:
                raise RouteTemplateError(f"catch-all parameter must be last in {template!r}")
            pieces.append(f"(?P<{p.group}>.*)" if p.catch_all else f"(?P<{p.group}>[^/]+)")
            seg_params.append(p)
            last = m.end()
        pieces.append(re.escape(seg[last:]))
        if not seg_params:
            literals += 1
        whole_param = len(seg_params) == 1 and _PARAM.fullmatch(seg) is not None
        may_be_absent = whole_param and (
            seg_params[0].optional or seg_params[0].default is not None or seg_params[0].catch_all
        )
        if whole_param and seg_params[0].catch_all:
            pieces = [f"(?P<{seg_params[0].group}>.*)"]
        parts.append(("".join(pieces), may_be_absent))
        params += seg_params
    # Optional segments may only be absent at the end: once one is absent all later ones are too,
    # which nesting the groups expresses: a(?:/b(?:/c)?)?
    regex = ""
    closing = ""
    for i, (piece, may_be_absent) in enumerate(parts):
        sep = "" if i == 0 else "/"
        if may_be_absent:
            regex += f"(?:{sep}{piece}"
            closing += ")?"
        else:
            if closing:
                raise RouteTemplateError(f"an optional parameter must be at the end of {template!r}")
            regex += sep + piece
    regex += closing
    return CompiledRoute(template, re.compile(regex, re.IGNORECASE | re.DOTALL), tuple(params), literals)
