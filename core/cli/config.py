"""Where the CLI gets its app settings (same names as the Function App), lowest to highest precedence:

1. ``.local/stack.json`` of a running local stack (found in the current directory or a parent): storage, identity,
   Graph, Dataverse endpoints and the demo credentials; its CA bundle is trusted (``REQUESTS_CA_BUNDLE`` and
   ``SSL_CERT_FILE``; the bundle holds the system CAs too).
2. ``--settings FILE``, else ``./local.settings.json``: its ``Values`` (as Core Tools reads them).
3. The environment (as Core Tools: the environment beats ``local.settings.json``).

Against a deployment in Azure: ``az login``, then ``--settings .azure/<env>/emailrouter.settings.json`` (written by
the azd postprovision hook: the storage endpoints, table prefix, tenant/app ids and URLs, no secret) or the same
names in the environment. Storage is then reached with ``DefaultAzureCredential`` (the signed-in operator, who
holds the queue and table data roles the template grants to ``principalId``); leave
``AzureWebJobsStorage__clientId`` out, it selects the app's managed identity, which exists only in Azure.
:func:`describe_sources` words what was (not) found, so a missing setting says whether no local stack is running
or nothing is configured.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.config import SETTINGS

__all__ = ["ConfigSourceError", "azure_error_hint", "describe_sources", "find_stack_file", "load_values",
           "stack_values"]

_CA_VARS = ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")
_NAMES = frozenset(s.name for s in SETTINGS) | frozenset(_CA_VARS)


class ConfigSourceError(RuntimeError):
    pass


def find_stack_file(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        candidate = folder / ".local" / "stack.json"
        if candidate.is_file():
            return candidate
    return None


def stack_values(doc: Mapping[str, Any]) -> dict[str, str]:
    """App settings from a running stack's ``stack.json`` (pure)."""
    if not doc.get("running"):
        return {}
    storage, identity, app = doc.get("storage") or {}, doc.get("identity") or {}, doc.get("app") or {}
    graph, dataverse = doc.get("graph") or {}, doc.get("dataverse") or {}
    pairs = {
        "AzureWebJobsStorage": storage.get("connection_string"),
        "GRAPH_TENANT_ID": identity.get("tenant_id"),
        "GRAPH_AUTHORITY_HOST": identity.get("url"),
        "GRAPH_CLIENT_ID": app.get("client_id"),
        "GRAPH_CLIENT_SECRET": app.get("client_secret"),
        "GRAPH_BASE_URL": graph.get("base_url"),
        "DATAVERSE_URL": dataverse.get("url"),
        "REQUESTS_CA_BUNDLE": doc.get("ca_bundle"),
        "SSL_CERT_FILE": doc.get("ca_bundle"),
    }
    functions = doc.get("functions") or {}
    if functions.get("base_url"):
        pairs["WEBHOOK_BASE_URL"] = functions["base_url"]
        # Graph's validation handshake must pass the host's function-key check, as in Azure.
        pairs["WEBHOOK_FUNCTION_KEY"] = functions.get("function_key")
    return {k: str(v) for k, v in pairs.items() if v}


def _file_values(path: Path) -> dict[str, str]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigSourceError(f"cannot read settings file {path}: {exc}") from exc
    values = doc.get("Values") if isinstance(doc, dict) else None
    if not isinstance(values, dict):
        raise ConfigSourceError(f"{path} has no \"Values\" object")
    return {str(k): str(v) for k, v in values.items() if v is not None}


def load_values(
    settings_file: Path | None, cwd: Path, environ: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """(values, source per name). Raises :class:`ConfigSourceError` for an unreadable explicit file."""
    values: dict[str, str] = {}
    sources: dict[str, str] = {}

    def layer(new: Mapping[str, str], source: str) -> None:
        for name, value in new.items():
            if value != "":
                values[name] = value
                sources[name] = source

    stack_file = find_stack_file(cwd)
    if stack_file is not None:
        try:
            layer(stack_values(json.loads(stack_file.read_text(encoding="utf-8"))), str(stack_file))
        except (OSError, ValueError):
            pass  # a stale or half-written stack file is not a reason to fail
    file = settings_file or (cwd / "local.settings.json")
    if settings_file is not None or file.is_file():
        layer(_file_values(file), str(file))
    layer({k: v for k, v in environ.items() if k in _NAMES}, "environment")
    # A machine-wide CA bundle in the environment must not shadow the stack's bundle (a superset: system CAs + the
    # local CA) while the stack's endpoints are the ones in use.
    if stack_file is not None and any(sources.get(n) == str(stack_file) for n in ("GRAPH_BASE_URL", "DATAVERSE_URL")):
        bundle = stack_values(json.loads(stack_file.read_text(encoding="utf-8"))).get("SSL_CERT_FILE")
        if bundle:
            for name in _CA_VARS:
                values[name], sources[name] = bundle, str(stack_file)
    return values, sources


DEPLOYMENT_HINT = (
    "For a deployment in Azure: `az login`, then `emailrouter --settings .azure/<env>/emailrouter.settings.json ...` "
    "(written by `azd provision`; docs/deploy.md, \"The CLI against your deployment\")."
)


def describe_sources(settings_file: Path | None, cwd: Path, environ: Mapping[str, str]) -> str:
    """Where the CLI looked for its settings and what it found, worded for the error about a missing setting:
    "no local stack running" (none here, or one set up but stopped) is told apart from "nothing configured"."""
    lines: list[str] = []
    stack_file = find_stack_file(cwd)
    running = False
    if stack_file is None:
        lines.append(f"No local stack is running (no .local/stack.json in {cwd} or its parents; `make run` starts "
                     "one).")
    else:
        try:
            running = bool(json.loads(stack_file.read_text(encoding="utf-8")).get("running"))
        except (OSError, ValueError):
            running = False
        if running:
            lines.append(f"Using the local stack described by {stack_file}.")
        else:
            lines.append(f"A local stack is set up in {stack_file.parent.parent} but not running (`make run` starts "
                         "it).")
    file = settings_file or (cwd / "local.settings.json")
    if settings_file is not None:
        lines.append(f"Settings file: {settings_file}.")
    elif file.is_file():
        lines.append(f"Settings file: {file}.")
    else:
        lines.append("No settings file (no --settings FILE, no ./local.settings.json).")
    in_env = sorted(name for name in _NAMES if environ.get(name) and name not in _CA_VARS)
    lines.append(f"App settings in the environment: {', '.join(in_env)}." if in_env
                 else "No app settings in the environment.")
    if not running and settings_file is None and not file.is_file() and not in_env:
        lines.insert(0, "Not configured: there is nothing to connect to.")
    lines.append(DEPLOYMENT_HINT)
    return "\n".join(lines)


def azure_error_hint(exc: BaseException) -> str:
    """What to do about an Azure SDK failure against a deployment (sign-in or data-plane role), or ''."""
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError

    if isinstance(exc, ClientAuthenticationError):
        return ("Sign in with `az login` (DefaultAzureCredential); the settings must not name "
                "AzureWebJobsStorage__clientId outside Azure.")
    if isinstance(exc, HttpResponseError) and exc.status_code == 403:
        return ("Your account lacks a data role on the storage account: the template grants Storage Queue/Table "
                "Data Contributor to its principalId (the deployer); role assignments take a few minutes.")
    return ""
