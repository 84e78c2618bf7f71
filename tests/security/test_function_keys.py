"""Function keys are enforced on every non-public HTTP trigger (issue 10).

Statically: every HTTP trigger function_app indexes is FUNCTION level except an explicit allow-list of public
ones (health), and none is ADMIN level (admin-level functions accept only the master key: a surprise for
operators). Dynamically (local host + Azurite): a request without a key, or with a wrong one, gets 401 on every
protected route; the host key gets through; the admin API refuses anonymous callers.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest
import requests

from emulators.common import demo
from local.stack import Stack
from tests.fuzz.webhook_support import indexed_functions

PUBLIC = {"health"}  # anonymous by design: returns version + which settings are configured, never values


def http_functions() -> dict[str, dict[str, Any]]:
    """name -> the httpTrigger binding as the worker reports it to the host."""
    out: dict[str, dict[str, Any]] = {}
    for name, fn in indexed_functions().items():
        for binding in json.loads(fn.get_function_json())["bindings"]:
            if binding.get("type") == "httpTrigger":
                out[name] = binding
    return out


def test_there_are_http_functions_to_check() -> None:
    names = set(http_functions())
    assert {"health", "graph_notifications", "graph_lifecycle"} <= names


def test_only_the_public_allow_list_is_anonymous() -> None:
    for name, binding in http_functions().items():
        level = str(binding.get("authLevel", "")).lower()
        if name in PUBLIC:
            assert level == "anonymous", name
        else:
            assert level == "function", f"{name} has authLevel {level!r}; expected 'function'"


def test_trigger_objects_agree_with_the_bindings() -> None:
    for name, fn in indexed_functions().items():
        trigger = fn.get_trigger()
        if getattr(trigger, "get_binding_name", lambda: "")() != "httpTrigger":
            continue
        assert trigger.auth_level != func.AuthLevel.ADMIN, f"{name} is admin level"
        assert (trigger.auth_level == func.AuthLevel.ANONYMOUS) == (name in PUBLIC), name


def test_no_http_route_collides_with_the_host_admin_api() -> None:
    for name, binding in http_functions().items():
        route = str(binding.get("route") or name).lstrip("/").lower()
        assert not route.startswith(("admin", "runtime", "webhooks")), f"{name}: route {route!r} is reserved"


# ------------------------------------------------------------------------------------------ through the host

@pytest.fixture(scope="module")
def host(azurite: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The local Functions host alone (the stack driver with only ``functions``), over the session's Azurite; its
    timers never fire (no schedules), as nothing here is for them."""
    values = {"AzureWebJobsStorage": azurite.connection_string, "GRAPH_TENANT_ID": demo.TENANT_ID,
              "TABLE_PREFIX": "keys" + uuid.uuid4().hex[:8]}
    with Stack(Path(tmp_path_factory.mktemp("keyhost")), services=["functions"], host_values=values,
               host_grace=5, timers=False) as h:
        yield h


def _concrete(route: str) -> str:
    """A URL path for a route template: parameters get a plausible value."""
    return re.sub(r"\{[^}]*\}", "x", route)


@pytest.mark.integration
def test_protected_routes_answer_401_without_a_valid_key(host: Stack) -> None:
    checked = 0
    for name, binding in http_functions().items():
        methods = [m.upper() for m in (binding.get("methods") or ["GET", "POST"])]
        url = f"{host.functions_root}/api/{_concrete(str(binding.get('route') or name))}"
        for method in methods:
            anonymous = requests.request(method, url, data=b"{}", timeout=10)
            if name in PUBLIC:
                assert anonymous.status_code != 401, name
                continue
            assert anonymous.status_code == 401, (name, method, anonymous.status_code)
            for wrong in ({"params": {"code": "wrong"}}, {"headers": {"x-functions-key": host.function_key[:-1]}},
                          {"params": {"code": ""}}, {"headers": {"x-functions-key": host.function_key + " "}}):
                r = requests.request(method, url, data=b"{}", timeout=10, **wrong)  # type: ignore[arg-type]
                assert r.status_code == 401, (name, method, wrong)
            ok = requests.request(method, url, data=b'{"value": []}', params={"code": host.function_key}, timeout=10)
            assert ok.status_code not in (401, 403, 404, 500), (name, method, ok.status_code,
                                                                 host.log_tail("functions"))
            checked += 1
    assert checked >= 2


@pytest.mark.integration
def test_health_is_public_and_admin_api_is_not(host: Stack) -> None:
    assert requests.get(f"{host.functions_root}/api/health", timeout=10).status_code == 200
    assert requests.get(f"{host.functions_root}/admin/host/status", timeout=10).status_code == 401
    assert requests.get(f"{host.functions_root}/admin/host/status", params={"code": host.function_key}, timeout=10
                        ).status_code == 401  # a function-level key is not enough for admin APIs
    assert requests.get(f"{host.functions_root}/admin/host/status", params={"code": host.admin_key}, timeout=10
                        ).status_code == 200
