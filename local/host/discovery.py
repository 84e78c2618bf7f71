"""Index the app through azure.functions' own metadata, as the Python worker does for the real host.

The worker imports the script file, finds the ``FunctionApp``, calls ``get_functions()`` and sends
each function's raw binding JSON to the host, which then builds triggers from it. Here the same
JSON is parsed into small specs; ``%SETTING%`` expressions are resolved from app settings at
indexing, like the host. A function whose bindings the local host cannot honour is reported as a
function error (listed, not run) instead of silently ignored.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import azure.functions as func

from .config import BindingExpressionError, resolve_app_setting_expressions
from .keys import AUTH_ADMIN, AUTH_ANONYMOUS, AUTH_FUNCTION
from .routes import CompiledRoute, RouteTemplateError, compile_route
from .schedule import Schedule, ScheduleError, parse_schedule

__all__ = [
    "FunctionSpec",
    "HttpTriggerSpec",
    "IndexResult",
    "OutputSpec",
    "QueueTriggerSpec",
    "TimerTriggerSpec",
    "TriggerKind",
    "find_app",
    "index_app",
    "load_app_module",
]

log = logging.getLogger("Host.Indexing")

DEFAULT_CONNECTION = "AzureWebJobsStorage"


class TriggerKind(StrEnum):
    HTTP = "httpTrigger"
    QUEUE = "queueTrigger"
    TIMER = "timerTrigger"


@dataclass(frozen=True)
class HttpTriggerSpec:
    route: CompiledRoute
    methods: frozenset[str] | None  # None: every method
    auth_level: str


@dataclass(frozen=True)
class QueueTriggerSpec:
    queue_name: str
    connection: str  # the app setting name (not its value)


@dataclass(frozen=True)
class TimerTriggerSpec:
    schedule: Schedule
    run_on_startup: bool
    use_monitor: bool


@dataclass(frozen=True)
class OutputSpec:
    name: str  # parameter name, or "$return"
    type: str  # "queue" | "http"
    queue_name: str | None = None
    connection: str | None = None


@dataclass
class FunctionSpec:
    name: str
    kind: TriggerKind
    trigger_param: str
    trigger: HttpTriggerSpec | QueueTriggerSpec | TimerTriggerSpec
    outputs: list[OutputSpec]
    user_function: Callable[..., Any]
    is_async: bool
    parameters: list[inspect.Parameter]
    bindings: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class IndexResult:
    functions: list[FunctionSpec]
    errors: dict[str, str]  # function name -> why it is not running (like the host's function errors)


def load_app_module(module_name: str, script_root: Path) -> Any:
    """Import the app module with the script root first on sys.path (the worker's layout)."""
    root = str(script_root)
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(module_name)


def find_app(module: Any) -> func.FunctionApp:
    apps = [v for v in vars(module).values() if isinstance(v, func.FunctionApp)]
    if len(apps) != 1:
        raise RuntimeError(
            f"{module.__name__}: expected exactly one azure.functions.FunctionApp at module level, found {len(apps)}"
        )
    return apps[0]


def _lower(value: Any) -> str:
    return str(value).lower() if value is not None else ""


def _resolve(value: Any, environ: Mapping[str, str]) -> str:
    return resolve_app_setting_expressions(str(value), environ)


def _http_trigger(b: Mapping[str, Any], name: str, env: Mapping[str, str]) -> HttpTriggerSpec:
    route = _resolve(b.get("route") or name, env)
    methods = b.get("methods")
    level = _lower(b.get("authLevel") or AUTH_FUNCTION)
    if level not in (AUTH_ANONYMOUS, AUTH_FUNCTION, AUTH_ADMIN):
        raise ValueError(f"unsupported authLevel {b.get('authLevel')!r}")
    return HttpTriggerSpec(
        route=compile_route(route),
        methods=frozenset(str(m).upper() for m in methods) if methods else None,
        auth_level=level,
    )


def _queue_name(raw: Any, env: Mapping[str, str]) -> str:
    name = _resolve(raw, env)
    # The host normalises nothing here but rejects invalid names; do the same up front.
    if not (3 <= len(name) <= 63) or name != name.lower() or not all(c.isalnum() or c == "-" for c in name):
        raise ValueError(f"invalid queue name {name!r} (3-63 lowercase letters, digits and dashes)")
    return name


def index_app(app: func.FunctionApp, environ: Mapping[str, str] | None = None) -> IndexResult:
    """Turn the app's functions into specs. Call once: ``get_functions()`` may not be called twice."""
    env = os.environ if environ is None else environ
    functions: list[FunctionSpec] = []
    errors: dict[str, str] = {}
    for fn in app.get_functions():
        name = fn.get_function_name()
        bindings = [json.loads(raw) for raw in fn.get_raw_bindings()]
        disabled = env.get(f"AzureWebJobs.{name}.Disabled", "").lower() in ("1", "true")
        if disabled:
            log.info("Function '%s' is disabled by AzureWebJobs.%s.Disabled", name, name)
            continue
        try:
            functions.append(_spec(name, bindings, fn.get_user_function(), env))
        except (BindingExpressionError, RouteTemplateError, ScheduleError, ValueError) as exc:
            errors[name] = str(exc)
            log.error("Function '%s' cannot run locally: %s", name, exc)
    return IndexResult(functions, errors)


def _spec(
    name: str, bindings: list[dict[str, Any]], user_fn: Callable[..., Any], env: Mapping[str, str]
) -> FunctionSpec:
    triggers = [b for b in bindings if str(b.get("type", "")).endswith("Trigger")]
    if len(triggers) != 1:
        raise ValueError(f"expected exactly one trigger binding, found {len(triggers)}")
    tb = triggers[0]
    ttype = str(tb["type"])
    trigger: HttpTriggerSpec | QueueTriggerSpec | TimerTriggerSpec
    if ttype == TriggerKind.HTTP:
        trigger = _http_trigger(tb, name, env)
    elif ttype == TriggerKind.QUEUE:
        trigger = QueueTriggerSpec(_queue_name(tb["queueName"], env), str(tb.get("connection") or DEFAULT_CONNECTION))
    elif ttype == TriggerKind.TIMER:
        if tb.get("useMonitor"):
            log.debug("Function '%s': useMonitor is ignored locally (no schedule monitor)", name)
        trigger = TimerTriggerSpec(
            schedule=parse_schedule(_resolve(tb["schedule"], env)),
            run_on_startup=bool(tb.get("runOnStartup", False)),
            use_monitor=bool(tb.get("useMonitor", True)),
        )
    else:
        raise ValueError(f"trigger type {ttype!r} is not supported by the local host")

    outputs: list[OutputSpec] = []
    for b in bindings:
        if b is tb:
            continue
        btype, direction = str(b.get("type")), _lower(b.get("direction"))
        if direction != "out":
            raise ValueError(f"input binding {btype!r} ({b.get('name')}) is not supported by the local host")
        if btype == "queue":
            outputs.append(
                OutputSpec(
                    name=str(b["name"]),
                    type="queue",
                    queue_name=_queue_name(b["queueName"], env),
                    connection=str(b.get("connection") or DEFAULT_CONNECTION),
                )
            )
        elif btype == "http":
            outputs.append(OutputSpec(name=str(b["name"]), type="http"))
        else:
            raise ValueError(f"output binding {btype!r} is not supported by the local host")

    params = list(inspect.signature(user_fn).parameters.values())
    known = {str(tb["name"]), "context"} | {o.name for o in outputs}
    unknown = [p.name for p in params if p.name not in known]
    if unknown:
        raise ValueError(f"parameters {unknown} match no binding (the worker would refuse to load the function)")
    return FunctionSpec(
        name=name,
        kind=TriggerKind(ttype),
        trigger_param=str(tb["name"]),
        trigger=trigger,
        outputs=outputs,
        user_function=user_fn,
        is_async=inspect.iscoroutinefunction(user_fn),
        parameters=params,
        bindings=bindings,
    )
