"""Identity emulator: the platform's managed identity endpoint and workload identity federation, in-process.

The managed identity endpoint answers as App Service / Functions does for ``IDENTITY_ENDPOINT`` +
``IDENTITY_HEADER`` (api-version 2019-08-01); the token endpoint accepts that identity's token as a client
assertion only when it matches a federated identity credential of the app registration exactly, with
Entra's error codes otherwise.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import jwt
import pytest

from emulators.common import demo
from emulators.identity.app import JWT_BEARER, IdentityConfig, create_app
from emulators.identity.keys import SigningKey
from emulators.identity.seed import SeedError, parse_seed
from emulators.identity.testing import federated_seed
from tests.unit.test_identity_app import Clock, assert_aad_error

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

BASE = "http://testserver"
TOKEN_URL = f"/{demo.TENANT_ID}/oauth2/v2.0/token"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"
OTHER_TENANT = "c0ffee00-0000-4000-8000-0000000000f2"
MI_PARAMS = {"api-version": "2019-08-01", "resource": demo.TOKEN_EXCHANGE_AUDIENCE,
             "client_id": demo.MANAGED_IDENTITY_CLIENT_ID}
MI_HEADERS = {"X-IDENTITY-HEADER": demo.MANAGED_IDENTITY_HEADER}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


def _client(seed: dict[str, Any], clock: Clock, key: SigningKey) -> TestClient:
    return TestClient(create_app(IdentityConfig(seed=seed, token_lifetime_s=600, clock=clock, signing_key=key)))


@pytest.fixture
def client(clock: Clock, key: SigningKey) -> TestClient:
    seed = federated_seed(BASE, extra_tenants=[{"id": OTHER_TENANT, "domains": ["fabrikam.example"]}],
                          extra_apps=[{"client_id": demo.APP_CLIENT_ID, "tenant_id": OTHER_TENANT,
                                       "object_id": "c0ffee00-0000-4000-8000-0000000000f3",
                                       "roles": {"https://fabrikam.crm.dynamics.com": []}}])
    return _client(seed, clock, key)


def mi_token(client: TestClient, **params: str) -> str:
    response = client.get("/msi/token", params={**MI_PARAMS, **params}, headers=MI_HEADERS)
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def exchange(client: TestClient, assertion: str, *, tenant: str = demo.TENANT_ID, scope: str = GRAPH_SCOPE) -> Any:
    return client.post(f"/{tenant}/oauth2/v2.0/token", data={
        "grant_type": "client_credentials", "client_id": demo.APP_CLIENT_ID, "scope": scope,
        "client_assertion_type": JWT_BEARER, "client_assertion": assertion})


def forged(key: SigningKey, **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": f"{BASE}/{demo.TENANT_ID}/v2.0", "sub": demo.MANAGED_IDENTITY_PRINCIPAL_ID,
               "aud": demo.TOKEN_EXCHANGE_AUDIENCE, "iat": now, "nbf": now, "exp": now + 600}
    payload.update(claims)
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, key.private_key, algorithm="RS256",
                      headers={"kid": key.kid, "x5t": key.kid})


# --- the platform endpoint ------------------------------------------------------------------------------------
def test_platform_endpoint_answers_like_app_service(client: TestClient, clock: Clock) -> None:
    response = client.get("/msi/token", params=MI_PARAMS, headers=MI_HEADERS)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"access_token", "expires_on", "resource", "token_type", "client_id"}
    assert body["token_type"] == "Bearer" and body["resource"] == demo.TOKEN_EXCHANGE_AUDIENCE
    assert body["client_id"] == demo.MANAGED_IDENTITY_CLIENT_ID
    assert isinstance(body["expires_on"], str) and int(body["expires_on"]) >= clock.now + 600
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["iss"] == f"{BASE}/{demo.TENANT_ID}/v2.0"
    assert claims["sub"] == claims["oid"] == demo.MANAGED_IDENTITY_PRINCIPAL_ID
    assert claims["aud"] == demo.TOKEN_EXCHANGE_AUDIENCE and claims["tid"] == demo.TENANT_ID
    assert claims["appid"] == demo.MANAGED_IDENTITY_CLIENT_ID
    assert client.get("/_emulator/tokens").json()["by_managed_identity"] == {demo.MANAGED_IDENTITY_CLIENT_ID: 1}


@pytest.mark.parametrize(("params", "headers", "status"), [
    ({}, {}, 401),                                                     # no X-IDENTITY-HEADER
    ({}, {"X-IDENTITY-HEADER": "guess"}, 401),                          # wrong secret
    ({"api-version": "2017-09-01"}, MI_HEADERS, 400),                  # the old MSI_ENDPOINT api
    ({"resource": ""}, MI_HEADERS, 400),
    ({"client_id": "c0ffee00-0000-4000-8000-00000000dead"}, MI_HEADERS, 400),  # not assigned to the app
    ({"object_id": demo.MANAGED_IDENTITY_PRINCIPAL_ID}, MI_HEADERS, 400),  # two selectors
])
def test_platform_endpoint_refuses(client: TestClient, params: dict[str, str], headers: dict[str, str],
                                   status: int) -> None:
    response = client.get("/msi/token", params={**MI_PARAMS, **params}, headers=headers)
    assert response.status_code == status
    body = response.json()
    assert body["statusCode"] == status and body["message"] and "access_token" not in body


def test_platform_endpoint_off_without_header_in_seed(clock: Clock, key: SigningKey) -> None:
    seed = federated_seed(BASE)
    seed["managed_identity_header"] = None
    response = _client(seed, clock, key).get("/msi/token", params=MI_PARAMS, headers=MI_HEADERS)
    assert response.status_code == 404


# --- the exchange -------------------------------------------------------------------------------------------------
def test_managed_identity_token_is_the_apps_credential(client: TestClient) -> None:
    response = exchange(client, mi_token(client))
    assert response.status_code == 200, response.text
    claims = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
    assert claims["appid"] == demo.APP_CLIENT_ID and claims["appidacr"] == "2"
    assert claims["aud"] == "https://graph.microsoft.com" and set(claims["roles"]) >= {"Mail.ReadWrite"}


def test_cross_tenant_service_principal_redeems_the_assertion(client: TestClient) -> None:
    response = exchange(client, mi_token(client), tenant=OTHER_TENANT, scope="https://fabrikam.crm.dynamics.com/.default")
    assert response.status_code == 200, response.text
    claims = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
    assert claims["tid"] == OTHER_TENANT and claims["aud"] == "https://fabrikam.crm.dynamics.com"


def test_token_for_another_resource_is_not_an_assertion(client: TestClient) -> None:
    storage_token = mi_token(client, resource="https://storage.azure.com")
    assert_aad_error(exchange(client, storage_token), 401, "invalid_client", 700212)


@pytest.mark.parametrize(("claims", "code"), [
    ({"iss": f"https://login.microsoftonline.com/{demo.TENANT_ID}/v2.0"}, 700211),  # another issuer
    ({"iss": f"{BASE}/{demo.TENANT_ID}/v2.0/"}, 700211),                  # a trailing slash is another issuer
    ({"sub": "c0ffee00-0000-4000-8000-0000000000ff"}, 700213),             # another identity of the tenant
    ({"sub": demo.MANAGED_IDENTITY_PRINCIPAL_ID.upper()}, 7002138),        # subject is case-sensitive
    ({"aud": "api://AzureADTokenExchangeUSGov"}, 700212),
    ({"exp": int(time.time()) - 5}, 700024),
    ({"nbf": int(time.time()) + 3600}, 700024),
    ({"exp": None}, 50027),
])
def test_mismatches_get_entras_codes(client: TestClient, key: SigningKey, claims: dict[str, Any], code: int) -> None:
    assert_aad_error(exchange(client, forged(key, **claims)), 401, "invalid_client", code)


def test_signature_is_verified_with_the_issuers_key(client: TestClient) -> None:
    stranger = SigningKey.generate()
    assert_aad_error(exchange(client, forged(stranger)), 401, "invalid_client", 700027)  # unknown kid
    token = forged(stranger)
    header = jwt.get_unverified_header(mi_token(client))
    tampered = jwt.encode(jwt.decode(token, options={"verify_signature": False}), stranger.private_key,
                          algorithm="RS256", headers={"kid": header["kid"], "x5t": header["kid"]})
    assert_aad_error(exchange(client, tampered), 401, "invalid_client", 700027)  # right kid, wrong key


def test_app_without_federated_credentials_refuses_with_70021(clock: Clock, key: SigningKey) -> None:
    seed = federated_seed(BASE, federated_credentials=[])
    client = _client(seed, clock, key)
    body = assert_aad_error(exchange(client, mi_token(client)), 401, "invalid_client", 70021)
    assert demo.MANAGED_IDENTITY_PRINCIPAL_ID in body["error_description"]


def test_expired_identity_token_is_refused_later(client: TestClient, clock: Clock) -> None:
    token = mi_token(client)
    clock.now += 601
    assert_aad_error(exchange(client, token), 401, "invalid_client", 700024)


def test_request_counter_counts_refusals(client: TestClient, key: SigningKey) -> None:
    client.delete("/_emulator/tokens")
    exchange(client, forged(key, sub="nobody"))
    exchange(client, mi_token(client))
    counts = client.get("/_emulator/tokens").json()
    assert counts["requests"] == 2 and counts["total"] == 1


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s["apps"][0]["federated_credentials"][0].update(audiences=["a", "b"]), "exactly one audience"),
    (lambda s: s["apps"][0]["federated_credentials"].append(dict(s["apps"][0]["federated_credentials"][0])),
     "unique"),
    (lambda s: s["managed_identities"][0].update(tenant_id="nope"), "not a seeded tenant"),
    (lambda s: s.update(managed_identity_header=""), "managed_identity_header"),
    (lambda s: s["apps"].append({**s["apps"][0], "tenant_id": OTHER_TENANT}), "already has them"),
])
def test_seed_errors(change: Any, message: str) -> None:
    seed = federated_seed(BASE, extra_tenants=[{"id": OTHER_TENANT}])
    change(seed)
    with pytest.raises(SeedError, match=message):
        parse_seed(seed)
