"""The secret-free credential end to end: a user-assigned managed identity as federated identity credential.

Production code, unchanged: ``graph_token_provider`` / ``dataverse_token_provider`` built from settings with
``GRAPH_MANAGED_IDENTITY_CLIENT_ID``; azure-identity's ``ManagedIdentityCredential`` finds the platform endpoint
through ``IDENTITY_ENDPOINT`` + ``IDENTITY_HEADER`` (as on App Service / Functions) and msal sends that token as
the client assertion. The identity emulator plays both the platform endpoint and Entra, over TLS; the app
registration has no secret at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest

from core.adapters.auth import AuthError, dataverse_token_provider, graph_token_provider
from core.config import Settings
from emulators.common import demo
from emulators.common.server import RunningServer
from emulators.common.tls import TlsMaterial, client_env, ensure_tls
from emulators.common.tokens import TokenValidator
from emulators.identity.testing import federated_seed, start_identity

pytestmark = pytest.mark.integration

GRAPH = "https://graph.microsoft.com"
DATAVERSE = "https://contoso.crm.example"
RESOURCE_TENANT = "c0ffee00-0000-4000-8000-0000000000f2"  # the Dataverse org's tenant (cross-tenant setup)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsMaterial]:
    material = ensure_tls(tmp_path_factory.mktemp("tls"))
    with pytest.MonkeyPatch.context() as mp:
        for name, value in client_env(material).items():
            mp.setenv(name, value)
        yield material


@pytest.fixture(scope="module")
def identity(tls: TlsMaterial) -> Iterator[RunningServer]:
    server = start_identity(tls.ca_cert.parent)
    yield server
    server.stop()


def load_seed(server: RunningServer, **overrides: Any) -> None:
    # The multi-tenant app's service principal in the resource tenant: it may redeem the home tenant's assertion.
    seed = federated_seed(server.url, extra_tenants=[{"id": RESOURCE_TENANT, "domains": ["fabrikam.example"]}],
                          extra_apps=[{"client_id": demo.APP_CLIENT_ID, "tenant_id": RESOURCE_TENANT,
                                       "object_id": "c0ffee00-0000-4000-8000-0000000000f3"}], **overrides)
    httpx.post(f"{server.url}/_emulator/seed", json=seed).raise_for_status()
    httpx.delete(f"{server.url}/_emulator/tokens").raise_for_status()


@pytest.fixture(autouse=True)
def _fresh_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.adapters import auth

    monkeypatch.setattr(auth, "_providers", {})  # one provider per configuration per process: start clean


@pytest.fixture
def platform(identity: RunningServer, monkeypatch: pytest.MonkeyPatch) -> RunningServer:
    """The hosting platform's managed identity environment, as App Service sets it for the app."""
    load_seed(identity)
    monkeypatch.setenv("IDENTITY_ENDPOINT", f"{identity.url}/msi/token")
    monkeypatch.setenv("IDENTITY_HEADER", demo.MANAGED_IDENTITY_HEADER)
    return identity


def settings(server: RunningServer, **extra: str) -> Settings:
    return Settings({
        "GRAPH_TENANT_ID": demo.TENANT_ID, "GRAPH_CLIENT_ID": demo.APP_CLIENT_ID,
        "GRAPH_MANAGED_IDENTITY_CLIENT_ID": demo.MANAGED_IDENTITY_CLIENT_ID,
        "GRAPH_AUTHORITY_HOST": server.url, "DATAVERSE_URL": DATAVERSE, **extra,
    })


def counts(server: RunningServer) -> dict[str, Any]:
    return dict(httpx.get(f"{server.url}/_emulator/tokens").json())


def test_graph_token_through_the_federated_credential(platform: RunningServer) -> None:
    provider = graph_token_provider(settings(platform))
    assert provider.client_assertion is not None and "assertion" in repr(provider)
    token = provider.get_token()
    identity = TokenValidator(identity_url=platform.url, audiences=[GRAPH], tenant_id=demo.TENANT_ID).validate(
        f"Bearer {token}")
    assert identity.app_id == demo.APP_CLIENT_ID
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["azpacr"] == "2" and "Mail.ReadWrite" in claims["roles"]
    seen = counts(platform)
    assert seen["by_managed_identity"] == {demo.MANAGED_IDENTITY_CLIENT_ID: 1}
    assert seen["by_app"] == {demo.APP_CLIENT_ID: 1}


def test_dataverse_token_same_tenant_and_cross_tenant(platform: RunningServer) -> None:
    token = dataverse_token_provider(settings(platform)).get_token()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert (claims["aud"], claims["tid"], claims["appid"]) == (DATAVERSE, demo.TENANT_ID, demo.APP_CLIENT_ID)

    cross = dataverse_token_provider(settings(platform, DATAVERSE_TENANT_ID=RESOURCE_TENANT)).get_token()
    claims = jwt.decode(cross, options={"verify_signature": False})
    assert (claims["aud"], claims["tid"]) == (DATAVERSE, RESOURCE_TENANT)
    TokenValidator(identity_url=platform.url, audiences=[DATAVERSE], tenant_id=RESOURCE_TENANT).validate(
        f"Bearer {cross}")
    assert counts(platform)["by_app_resource"][demo.APP_CLIENT_ID] == {DATAVERSE.lower(): 2}


def test_the_secret_is_not_needed_and_a_stale_one_is_never_sent(platform: RunningServer) -> None:
    stale = "@Microsoft.KeyVault(SecretUri=https://kv-x.vault.azure.net/secrets/graph-client-secret/)"
    provider = graph_token_provider(settings(platform, GRAPH_CLIENT_SECRET=stale))
    assert provider.get_token()
    assert counts(platform)["requests"] == 1  # one token request, with the assertion (a secret would be refused)


def test_a_credential_for_another_identity_is_refused_with_entras_code(identity: RunningServer,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    load_seed(identity, federated_credentials=[{
        "name": "someone-else", "issuer": f"{identity.url}/{demo.TENANT_ID}/v2.0",
        "subject": "c0ffee00-0000-4000-8000-0000000000ff", "audiences": [demo.TOKEN_EXCHANGE_AUDIENCE]}])
    monkeypatch.setenv("IDENTITY_ENDPOINT", f"{identity.url}/msi/token")
    monkeypatch.setenv("IDENTITY_HEADER", demo.MANAGED_IDENTITY_HEADER)
    with pytest.raises(AuthError) as err:
        graph_token_provider(settings(identity)).get_token()
    assert err.value.code == "invalid_client" and "AADSTS700213" in err.value.description


def test_no_platform_endpoint_is_a_clear_auth_error(identity: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    load_seed(identity)
    monkeypatch.setenv("IDENTITY_ENDPOINT", f"{identity.url}/msi/token")
    monkeypatch.setenv("IDENTITY_HEADER", "not-the-platform-secret")
    with pytest.raises(AuthError) as err:
        graph_token_provider(settings(identity)).get_token()
    assert err.value.code == "managed_identity_unavailable"
    assert demo.MANAGED_IDENTITY_CLIENT_ID in str(err.value)
    assert counts(identity)["requests"] == 0  # nothing reached the token endpoint
