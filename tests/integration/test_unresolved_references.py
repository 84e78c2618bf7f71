"""An unresolved Key Vault reference is never used as a value: not as the client secret sent to the identity
platform, not as the ``?code=`` of the notification URLs handed to Graph.

The subscription-reconcile timer function runs for real (its body, through ``get_container()``) against the
identity emulator, the Graph emulator and Azurite, once with working settings (the control: tokens are
requested, subscriptions are created with the key in their URLs) and once per setting left as the literal
``@Microsoft.KeyVault(...)`` text App Service puts there when it cannot resolve the reference. The emulators'
request logs prove the literal never left the process.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

pytest.importorskip("emulators.graph.testing", reason="Graph emulator package not present")

from azure.functions.timer import TimerRequest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from core.bootstrap import Container, set_container
from core.config import Settings, UnresolvedReferenceError
from core.domain.model import CrmRecordRef, CrmTable, InboundMethod, MailboxConfig, MailboxKind, TrackingFilter
from emulators.common import demo
from emulators.common.server import RunningServer, start_in_thread
from emulators.common.tls import TlsMaterial, client_env, ensure_tls
from emulators.graph.testing import RunningGraph, start_graph
from emulators.identity.testing import start_identity
from local.azurite import Azurite
from tests.fakes import StaticMailboxDirectory
from tests.function_index import indexed_functions

pytestmark = pytest.mark.integration

KEY = "a-real-function-key"
REFERENCE = "@Microsoft.KeyVault(SecretUri=https://kv-emailrouter.vault.azure.net/secrets/{}/)"


@dataclass
class Receiver:
    server: RunningServer | None = None
    queries: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def start_receiver() -> Receiver:
    receiver = Receiver()

    async def endpoint(request: Request) -> Response:
        with receiver.lock:
            receiver.queries.append(request.url.query)
        token = request.query_params.get("validationToken")
        return PlainTextResponse(token) if token is not None else Response(status_code=202)

    app = Starlette(routes=[Route("/api/graph/notifications", endpoint, methods=["POST"]),
                            Route("/api/graph/lifecycle", endpoint, methods=["POST"])])
    receiver.server = start_in_thread(app, lifespan="off")
    return receiver


@dataclass
class Env:
    tls: TlsMaterial
    identity: RunningServer
    graph: RunningGraph
    receiver: Receiver


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tls = ensure_tls(tmp_path_factory.mktemp("tls"))
    with pytest.MonkeyPatch.context() as mp:
        for name, value in client_env(tls).items():
            mp.setenv(name, value)
        identity = start_identity(tls.ca_cert.parent)
        graph = start_graph(tls.ca_cert.parent, identity.url, smtp=False)
        receiver = start_receiver()
        try:
            yield Env(tls, identity, graph, receiver)
        finally:
            receiver.server.stop()  # type: ignore[union-attr]
            graph.stop()
            identity.stop()


def reset(env: Env) -> None:
    with httpx.Client() as http:  # trusts SSL_CERT_FILE (the module fixture sets it)
        http.post(f"{env.graph.url}/_emulator/reset").raise_for_status()
        http.delete(f"{env.graph.url}/_emulator/requests").raise_for_status()
        http.delete(f"{env.identity.url}/_emulator/tokens").raise_for_status()
    with env.receiver.lock:
        env.receiver.queries.clear()


def seen(env: Env) -> tuple[int, list[str]]:
    """(token requests at the identity platform, every Graph request as 'METHOD path?query' + body)."""
    with httpx.Client() as http:  # trusts SSL_CERT_FILE (the module fixture sets it)
        tokens = http.get(f"{env.identity.url}/_emulator/tokens").json()["requests"]
        log = http.get(f"{env.graph.url}/_emulator/requests").json()["value"]
    return int(tokens), [str(entry) for entry in log]


def settings(env: Env, azurite: Azurite, **overrides: str) -> Settings:
    values = {
        "AzureWebJobsStorage": azurite.connection_string, "TABLE_PREFIX": f"t{uuid.uuid4().hex[:10]}",
        "GRAPH_TENANT_ID": demo.TENANT_ID, "GRAPH_CLIENT_ID": demo.APP_CLIENT_ID,
        "GRAPH_CLIENT_SECRET": demo.APP_CLIENT_SECRET, "GRAPH_AUTHORITY_HOST": env.identity.url,
        "GRAPH_BASE_URL": env.graph.base_url, "DATAVERSE_URL": "https://org.crm.example",
        "WEBHOOK_BASE_URL": f"{env.receiver.server.url}/api", "WEBHOOK_FUNCTION_KEY": KEY,  # type: ignore[union-attr]
    }
    values.update(overrides)
    return Settings(values)


ALICE = MailboxConfig(f"alice@{demo.TENANT_DOMAIN}", MailboxKind.USER,
                      owner=CrmRecordRef(CrmTable.SYSTEMUSER, uuid.UUID("c0ffee00-0000-4000-8000-00000000a11c")),
                      inbound_method=InboundMethod.INDIVIDUAL, tracking_filter=TrackingFilter.ALL)


async def run_reconcile_function(container: Container) -> None:
    """The subscription_reconcile timer function's own body, as the Functions host calls it."""
    import function_app

    container.mailbox_directory = StaticMailboxDirectory([ALICE])  # type: ignore[attr-defined]
    set_container(container)
    try:
        function = indexed_functions(function_app.app)["subscription_reconcile"]
        await function.get_user_function()(TimerRequest(past_due=False))  # type: ignore[attr-defined]
    finally:
        set_container(None)
        for name in ("graph", "storage"):
            if name in container.__dict__:
                await container.__dict__[name].close()


@pytest.fixture(autouse=True)
def _fresh_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.adapters import auth

    monkeypatch.setattr(auth, "_providers", {})


async def test_control_working_settings_reach_both_services(env: Env, azurite: Azurite) -> None:
    reset(env)
    await run_reconcile_function(Container(settings(env, azurite)))
    tokens, graph_requests = seen(env)
    assert tokens >= 1
    assert any("subscriptions" in r for r in graph_requests), graph_requests
    with env.receiver.lock:
        assert env.receiver.queries and all(f"code={KEY}" in q or "validationToken" in q
                                            for q in env.receiver.queries)


@pytest.mark.parametrize("name", ["GRAPH_CLIENT_SECRET", "WEBHOOK_FUNCTION_KEY"])
async def test_an_unresolved_reference_fails_the_function_and_is_never_sent(env: Env, azurite: Azurite,
                                                                              name: str) -> None:
    reset(env)
    literal = REFERENCE.format(name.lower().replace("_", "-"))
    with pytest.raises(UnresolvedReferenceError) as err:
        await run_reconcile_function(Container(settings(env, azurite, **{name: literal})))
    assert err.value.setting == name
    assert "Key Vault reference not resolved" in str(err.value)
    tokens, graph_requests = seen(env)
    assert tokens == 0, "the identity platform was asked for a token"
    assert graph_requests == [], "Graph was called"
    with env.receiver.lock:
        assert env.receiver.queries == []
