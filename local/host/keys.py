"""Function keys: the master key (admin level), host keys and per-function keys (function level).

The real host keeps keys in blob storage or files; locally they come from the ``Keys`` section of
local.settings.json, or, when that is absent, from a JSON file under ``.local/`` generated on first
run (same shape as the section). Keys never go to the log above DEBUG.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["AUTH_ADMIN", "AUTH_ANONYMOUS", "AUTH_FUNCTION", "HostKeys", "generate_key", "load_or_create_keys"]

log = logging.getLogger("Host.Keys")

AUTH_ANONYMOUS = "anonymous"
AUTH_FUNCTION = "function"
AUTH_ADMIN = "admin"


def generate_key() -> str:
    # Same alphabet/length class as the host's generated keys (URL-safe, ~40 chars).
    return secrets.token_urlsafe(30)


@dataclass(frozen=True)
class HostKeys:
    master: str
    host: Mapping[str, str] = field(default_factory=dict)
    functions: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    @property
    def default_function_key(self) -> str:
        """The host key named ``default`` (what WEBHOOK_FUNCTION_KEY is set to by the stack)."""
        return self.host.get("default") or next(iter(self.host.values()), self.master)

    def authorize(self, level: str, function_name: str | None, presented: str | None) -> bool:
        """Is ``presented`` enough for ``level``? Master > host keys > the function's own keys."""
        if level == AUTH_ANONYMOUS:
            return True
        if not presented:
            return False
        if _eq(presented, self.master):
            return True
        if level == AUTH_ADMIN:
            return False
        candidates = list(self.host.values())
        if function_name is not None:
            candidates += list(self.functions.get(function_name, {}).values())
        # Compare against every candidate (no early exit) so timing does not reveal which matched.
        matched = False
        for key in candidates:
            matched |= _eq(presented, key)
        return matched

    def to_json(self) -> dict[str, Any]:
        functions = {k: dict(v) for k, v in self.functions.items()}
        return {"master": self.master, "host": dict(self.host), "functions": functions}


def _eq(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _from_mapping(doc: Mapping[str, Any], source: str) -> HostKeys:
    master = doc.get("master")
    if not isinstance(master, str) or not master:
        raise ValueError(f"{source}: 'master' key missing or empty")
    host = doc.get("host") or {}
    functions = doc.get("functions") or {}
    if not isinstance(host, dict) or not isinstance(functions, dict):
        raise ValueError(f"{source}: 'host' and 'functions' must be objects")
    return HostKeys(
        master=master,
        host={str(k): str(v) for k, v in host.items()},
        functions={str(f): {str(k): str(v) for k, v in (ks or {}).items()} for f, ks in functions.items()},
    )


def load_or_create_keys(configured: Mapping[str, Any] | None, keys_file: Path) -> HostKeys:
    """Keys from local.settings.json ``Keys`` if present; else from ``keys_file``, created if missing."""
    if configured:
        return _from_mapping(configured, "local.settings.json Keys")
    if keys_file.exists():
        return _from_mapping(json.loads(keys_file.read_text()), str(keys_file))
    keys = HostKeys(master=generate_key(), host={"default": generate_key()})
    keys_file.parent.mkdir(parents=True, exist_ok=True)
    # Created 0600 from the start: the file holds credentials.
    fd = os.open(keys_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(keys.to_json(), fh, indent=2)
    log.warning("Generated function keys (none configured) into %s", keys_file)
    return keys
