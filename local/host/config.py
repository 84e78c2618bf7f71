"""local.settings.json (Core Tools format) and host.json (the subset the local host honours).

Unknown keys are ignored in both files, as the real host and Core Tools do.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BindingExpressionError",
    "HostConfig",
    "HostConfigError",
    "LocalSettings",
    "QueuesOptions",
    "apply_values",
    "load_host_json",
    "load_local_settings",
    "parse_timespan",
    "resolve_app_setting_expressions",
]

log = logging.getLogger("Host.Config")


class HostConfigError(ValueError):
    """host.json or local.settings.json is invalid in a way the real host would also refuse."""


class BindingExpressionError(ValueError):
    """A ``%NAME%`` binding expression names an app setting that is not set."""

    def __init__(self, name: str) -> None:
        super().__init__(f"'%{name}%' does not resolve to a value (app setting {name!r} is not set)")
        self.setting = name


# --------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class LocalSettings:
    """What Core Tools reads from local.settings.json, plus the ``Keys`` section this host defines."""

    path: Path | None
    values: Mapping[str, str] = field(default_factory=dict)
    local_http_port: int | None = None
    connection_strings: Mapping[str, str] = field(default_factory=dict)
    keys: Mapping[str, Any] | None = None  # {"master": str, "host": {name: key}, "functions": {fn: {name: key}}}


def load_local_settings(path: Path | None) -> LocalSettings:
    """Parse local.settings.json; a missing file is an empty settings set (Core Tools only warns)."""
    if path is None or not path.exists():
        return LocalSettings(path=None)
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))  # Core Tools tolerates a BOM
    except json.JSONDecodeError as exc:
        raise HostConfigError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise HostConfigError(f"{path}: the top level must be an object")
    if doc.get("IsEncrypted"):
        # Core Tools decrypts with a machine key; that cannot work here, so say so instead of guessing.
        raise HostConfigError(f"{path}: IsEncrypted=true is not supported by the local host")
    raw_values = doc.get("Values") or {}
    values = {str(k): "" if v is None else str(v) for k, v in raw_values.items()}
    host_section = doc.get("Host") or {}
    port = host_section.get("LocalHttpPort")
    conn = {str(k): str(v) for k, v in (doc.get("ConnectionStrings") or {}).items()}
    keys = doc.get("Keys")
    if keys is not None and not isinstance(keys, dict):
        raise HostConfigError(f"{path}: 'Keys' must be an object")
    return LocalSettings(
        path=path, values=values, local_http_port=int(port) if port else None, connection_strings=conn, keys=keys
    )


def apply_values(values: Mapping[str, str], environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Copy ``Values`` into the environment; like Core Tools, a variable already set wins.

    Returns the names that were skipped (names only: values may be secrets).
    """
    env = os.environ if environ is None else environ
    skipped = []
    for name, value in values.items():
        if name in env:
            skipped.append(name)
            continue
        env[name] = value
    return skipped


_EXPR = re.compile(r"%([^%\s]+)%")


def resolve_app_setting_expressions(text: str, environ: Mapping[str, str] | None = None) -> str:
    """Replace each ``%NAME%`` by the app setting NAME, as the host does for binding properties."""
    env = os.environ if environ is None else environ

    def _sub(m: re.Match[str]) -> str:
        name = m.group(1)
        value = env.get(name)
        if value is None:
            raise BindingExpressionError(name)
        return value

    return _EXPR.sub(_sub, text)


# --------------------------------------------------------------------------------------------- host.json

_TIMESPAN = re.compile(r"^(?:(?P<d>\d+)\.)?(?P<h>\d{1,2}):(?P<m>\d{1,2}):(?P<s>\d{1,2}(?:\.\d+)?)$")


def parse_timespan(text: str) -> float:
    """Parse a .NET TimeSpan (``[d.]hh:mm:ss[.fff]``) into seconds."""
    m = _TIMESPAN.match(text.strip())
    if not m:
        raise HostConfigError(f"not a TimeSpan (expected [d.]hh:mm:ss[.fff]): {text!r}")
    days = int(m.group("d") or 0)
    return days * 86400 + int(m.group("h")) * 3600 + int(m.group("m")) * 60 + float(m.group("s"))


@dataclass(frozen=True)
class QueuesOptions:
    """``extensions.queues`` with the documented defaults (Storage extension 5.x)."""

    batch_size: int = 16
    new_batch_threshold: int = 8
    max_polling_interval: float = 60.0
    visibility_timeout: float = 0.0
    max_dequeue_count: int = 5
    message_encoding: str = "base64"
    # Not a host.json setting: how long a running message stays invisible (renewed at half-time). The real host
    # uses a fixed 10 minutes; ``python -m local.host --lease-seconds`` shortens it so a test that SIGKILLs the
    # host does not wait 10 minutes for the message to come back.
    lease_seconds: int = 600


@dataclass(frozen=True)
class HostConfig:
    route_prefix: str = "api"
    queues: QueuesOptions = field(default_factory=QueuesOptions)
    function_timeout: float | None = None
    log_level: int = logging.INFO


_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "information": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "none": logging.CRITICAL + 10,
}


def _ci(mapping: Mapping[str, Any], key: str) -> Any:
    """Case-insensitive lookup: the host binds host.json through .NET configuration, which ignores case."""
    for k, v in mapping.items():
        if k.lower() == key.lower():
            return v
    return None


def _queues(section: Mapping[str, Any]) -> QueuesOptions:
    batch = _ci(section, "batchSize")
    batch_size = 16 if batch is None else int(batch)
    if not 1 <= batch_size <= 32:
        raise HostConfigError(f"extensions.queues.batchSize must be between 1 and 32, got {batch_size}")
    threshold = _ci(section, "newBatchThreshold")
    # Default batchSize/2: the documented N*batchSize/2 with N=1 core (what a local run models).
    new_batch_threshold = batch_size // 2 if threshold is None else int(threshold)
    if new_batch_threshold < 0:
        raise HostConfigError("extensions.queues.newBatchThreshold must not be negative")
    poll = _ci(section, "maxPollingInterval")
    max_poll = 60.0 if poll is None else _seconds(poll)
    if max_poll < 0.1:
        raise HostConfigError("extensions.queues.maxPollingInterval must be at least 00:00:00.1")
    vis = _ci(section, "visibilityTimeout")
    dequeue = _ci(section, "maxDequeueCount")
    max_dequeue = 5 if dequeue is None else int(dequeue)
    if max_dequeue < 1:
        raise HostConfigError("extensions.queues.maxDequeueCount must be at least 1")
    encoding = str(_ci(section, "messageEncoding") or "base64").lower()
    if encoding not in ("base64", "none"):
        raise HostConfigError(f"extensions.queues.messageEncoding must be 'base64' or 'none', got {encoding!r}")
    return QueuesOptions(
        batch_size=batch_size,
        new_batch_threshold=new_batch_threshold,
        max_polling_interval=max_poll,
        visibility_timeout=0.0 if vis is None else _seconds(vis),
        max_dequeue_count=max_dequeue,
        message_encoding=encoding,
    )


def _seconds(value: Any) -> float:
    # The host accepts a TimeSpan string; maxPollingInterval also accepts plain milliseconds.
    if isinstance(value, int | float):
        return float(value) / 1000.0
    return parse_timespan(str(value))


def load_host_json(script_root: Path) -> HostConfig:
    path = script_root / "host.json"
    if not path.exists():
        log.warning("No host.json in %s: using the host defaults", script_root)
        return HostConfig()
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise HostConfigError(f"{path}: not valid JSON ({exc})") from exc
    if str(_ci(doc, "version") or "") != "2.0":
        raise HostConfigError(f"{path}: 'version' must be \"2.0\" (the only schema the v4 host accepts)")
    extensions = _ci(doc, "extensions") or {}
    http = _ci(extensions, "http") or {}
    prefix = _ci(http, "routePrefix")
    timeout = _ci(doc, "functionTimeout")
    level_name = _ci(_ci(_ci(doc, "logging") or {}, "logLevel") or {}, "default")
    return HostConfig(
        route_prefix="api" if prefix is None else str(prefix).strip("/"),
        queues=_queues(_ci(extensions, "queues") or {}),
        # -1 means "unbounded" on dedicated plans; treat it as no timeout.
        function_timeout=None if timeout in (None, "-1", -1) else parse_timespan(str(timeout)),
        log_level=_LEVELS.get(str(level_name).lower(), logging.INFO) if level_name else logging.INFO,
    )
