"""The HTTP triggers as the worker calls them (get_user_function), with our ports faked."""

from __future__ import annotations

import json
from collections.abc import Iterator

import azure.functions as func
import pytest

from core.bootstrap import Container, set_container
from core.config import Settings
from core.names import INBOUND_QUEUE
from core.notifications import SubscriptionInfo
from tests.fakes import FakeSubscriptionDirectory, FakeWorkQueue
from tests.function_index import indexed_functions

TENANT = "c0ffee00-0000-4000-8000-000000000001"
SUB = SubscriptionInfo(id="s1", mailbox="a@contoso.example", folder="inbox", client_state="k" * 48,
                       tenant_id=TENANT)


class FakeContainer(Container):
    def __init__(self) -> None:
        super().__init__(Settings(env={"GRAPH_TENANT_ID": TENANT}))
        self.__dict__["work_queue"] = FakeWorkQueue()
        self.__dict__["subscription_directory"] = FakeSubscriptionDirectory([SUB])


@pytest.fixture
def container() -> Iterator[FakeContainer]:
    c = FakeContainer()
    set_container(c)
    yield c
    set_container(None)


def _functions() -> dict[str, object]:
    import function_app

    return indexed_functions(function_app.app)


FUNCS = _functions()


def _call(name: str, req: func.HttpRequest):  # type: ignore[no-untyped-def]
    return FUNCS[name].get_user_function()(req)  # type: ignore[attr-defined]


def test_webhooks_require_function_key() -> None:
    for name in ("graph_notifications", "graph_lifecycle"):
        trigger = FUNCS[name].get_trigger()  # type: ignore[attr-defined]
        assert trigger.auth_level == func.AuthLevel.FUNCTION
    assert FUNCS["health"].get_trigger().auth_level == func.AuthLevel.ANONYMOUS  # type: ignore[attr-defined]


async def test_validation_handshake_echoes_decoded_token(container: FakeContainer) -> None:
    req = func.HttpRequest("POST", "http://h/api/graph/notifications", params={"validationToken": "a b<c>&"},
                           body=b"")
    resp = await _call("graph_notifications", req)
    assert resp.status_code == 200
    assert resp.mimetype == "text/plain"
    assert resp.get_body() == b"a b<c>&"


async def test_notification_accepted_202(container: FakeContainer) -> None:
    body = json.dumps({"value": [{"subscriptionId": "s1", "clientState": "k" * 48, "changeType": "created",
                                  "tenantId": TENANT, "resourceData": {"id": "M1"}}]}).encode()
    resp = await _call("graph_notifications", func.HttpRequest("POST", "http://h/api/graph/notifications",
                                                               body=body))
    assert resp.status_code == 202
    assert len(container.work_queue.messages[INBOUND_QUEUE]) == 1


async def test_garbage_400(container: FakeContainer) -> None:
    resp = await _call("graph_notifications", func.HttpRequest("POST", "http://h/api/graph/notifications",
                                                               body=b"{nope"))
    assert resp.status_code == 400


def test_health_reports_configuration_without_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPH_CLIENT_SECRET", "super-secret-value")
    monkeypatch.setenv("GRAPH_TENANT_ID", "t")
    monkeypatch.setenv("GRAPH_CLIENT_ID", "c")
    resp = FUNCS["health"].get_user_function()(func.HttpRequest("GET", "http://h/api/health", body=b""))  # type: ignore[attr-defined]
    body = json.loads(resp.get_body())
    assert body["configured"]["graph"] is True
    assert "super-secret-value" not in resp.get_body().decode()


def test_health_names_unresolved_key_vault_references(monkeypatch: pytest.MonkeyPatch) -> None:
    reference = "@Microsoft.KeyVault(SecretUri=https://kv-x.vault.azure.net/secrets/graph-client-secret/)"
    for name, value in {"GRAPH_TENANT_ID": "t", "GRAPH_CLIENT_ID": "c", "GRAPH_CLIENT_SECRET": reference,
                        "WEBHOOK_BASE_URL": "https://app/api", "WEBHOOK_FUNCTION_KEY": reference}.items():
        monkeypatch.setenv(name, value)
    resp = FUNCS["health"].get_user_function()(func.HttpRequest("GET", "http://h/api/health", body=b""))  # type: ignore[attr-defined]
    body = json.loads(resp.get_body())
    assert body["status"] == "degraded"
    assert {"GRAPH_CLIENT_SECRET", "WEBHOOK_FUNCTION_KEY"} <= set(body["unresolved"])
    assert body["configured"]["graph"] is False and body["configured"]["webhooks"] is False
    assert "Key Vault reference not resolved" in body["reason"]
    assert "vault.azure.net" not in resp.get_body().decode()
