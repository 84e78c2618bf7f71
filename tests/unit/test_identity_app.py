"""Identity emulator endpoints, in-process (Starlette TestClient): metadata, token endpoint, errors, seed."""

from __future__ import annotations

import base64
import re
import time
import uuid
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from emulators.common import demo
from emulators.common.tokens import InvalidToken, TokenValidator
from emulators.identity.app import JWT_BEARER, IdentityConfig, create_app
from emulators.identity.keys import SigningKey
from emulators.identity.seed import SeedError, demo_seed, parse_seed
from emulators.identity.testing import make_client_certificate

with warnings.catch_warnings():  # starlette 1.x warns its TestClient prefers "httpx2"; httpx (pinned) works
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

BASE = "http://testserver"
TOKEN_URL = f"/{demo.TENANT_ID}/oauth2/v2.0/token"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def client_cert() -> tuple[str, str]:
    return make_client_certificate()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(client_cert: tuple[str, str], clock: Clock) -> TestClient:
    seed = demo_seed(certificates=[client_cert[1]])
    return TestClient(create_app(IdentityConfig(seed=seed, token_lifetime_s=600, clock=clock)))


def secret_form(**overrides: str | None) -> dict[str, str]:
    form: dict[str, str | None] = {
        "grant_type": "client_credentials", "client_id": demo.APP_CLIENT_ID,
        "client_secret": demo.APP_CLIENT_SECRET, "scope": GRAPH_SCOPE,
    }
    form.update(overrides)
    return {k: v for k, v in form.items() if v is not None}


def assert_aad_error(response: Any, status: int, error: str, code: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) >= {"error", "error_description", "error_codes", "timestamp", "trace_id", "correlation_id"}
    assert body["error"] == error
    assert body["error_codes"] == [code]
    assert body["error_description"].startswith(f"AADSTS{code}: ")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", body["timestamp"])
    uuid.UUID(body["trace_id"])
    return body


def thumbprint(cert_pem: str, algorithm: hashes.HashAlgorithm) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    return base64.urlsafe_b64encode(cert.fingerprint(algorithm)).rstrip(b"=").decode()


def assertion(key_pem: str, cert_pem: str, *, alg: str = "RS256", sha256: bool = False, **claims: Any) -> str:
    now = time.time()
    payload: dict[str, Any] = {
        "aud": f"{BASE}/{demo.TENANT_ID}/oauth2/v2.0/token", "iss": demo.APP_CLIENT_ID,
        "sub": demo.APP_CLIENT_ID, "exp": int(now) + 600, "iat": int(now), "jti": str(uuid.uuid4()),
    }
    payload.update(claims)
    headers = ({"x5t#S256": thumbprint(cert_pem, hashes.SHA256())} if sha256
               else {"x5t": thumbprint(cert_pem, hashes.SHA1())})
    return jwt.encode(payload, serialization.load_pem_private_key(key_pem.encode(), None),  # type: ignore[arg-type]
                      algorithm=alg, headers=headers)


def assertion_form(token: str, **overrides: str) -> dict[str, str]:
    form = {"grant_type": "client_credentials", "client_id": demo.APP_CLIENT_ID, "scope": GRAPH_SCOPE,
            "client_assertion_type": JWT_BEARER, "client_assertion": token}
    form.update(overrides)
    return form


# --- metadata ---------------------------------------------------------------------------------------------
def test_openid_configuration_by_tenant_id_and_domain(client: TestClient) -> None:
    for segment in (demo.TENANT_ID, demo.TENANT_DOMAIN):
        cfg = client.get(f"/{segment}/v2.0/.well-known/openid-configuration").json()
        assert cfg["issuer"] == f"{BASE}/{demo.TENANT_ID}/v2.0"
        assert cfg["token_endpoint"] == f"{BASE}/{demo.TENANT_ID}/oauth2/v2.0/token"
        assert cfg["jwks_uri"] == f"{BASE}/{demo.TENANT_ID}/discovery/v2.0/keys"
        assert cfg["authorization_endpoint"] == f"{BASE}/{demo.TENANT_ID}/oauth2/v2.0/authorize"
        assert "private_key_jwt" in cfg["token_endpoint_auth_methods_supported"]


def test_openid_configuration_common_keeps_placeholder(client: TestClient) -> None:
    cfg = client.get("/common/v2.0/.well-known/openid-configuration").json()
    assert cfg["issuer"] == f"{BASE}/{{tenantid}}/v2.0"
    assert cfg["token_endpoint"] == f"{BASE}/common/oauth2/v2.0/token"


def test_openid_configuration_unknown_tenant(client: TestClient) -> None:
    response = client.get("/nosuch.example/v2.0/.well-known/openid-configuration")
    assert_aad_error(response, 400, "invalid_request", 90002)


def test_jwks_publishes_signing_key_with_certificate(client: TestClient) -> None:
    for path in ("/common/discovery/v2.0/keys", f"/{demo.TENANT_ID}/discovery/v2.0/keys"):
        (entry,) = client.get(path).json()["keys"]
        assert entry["kty"] == "RSA" and entry["use"] == "sig"
        assert entry["kid"] == entry["x5t"]
        der = base64.b64decode(entry["x5c"][0])
        cert = x509.load_der_x509_certificate(der)
        expected_x5t = base64.urlsafe_b64encode(cert.fingerprint(hashes.SHA1())).rstrip(b"=").decode()
        assert entry["x5t"] == expected_x5t


def test_instance_discovery_answers_for_own_host_only(client: TestClient) -> None:
    https_client = TestClient(create_app(), base_url="https://testserver")
    body = https_client.get("/common/discovery/instance", params={
        "authorization_endpoint": f"https://testserver/{demo.TENANT_ID}/oauth2/v2.0/authorize"}).json()
    assert body["tenant_discovery_endpoint"] == (
        f"https://testserver/{demo.TENANT_ID}/v2.0/.well-known/openid-configuration")
    foreign = https_client.get("/common/discovery/instance", params={
        "authorization_endpoint": f"https://login.example.org/{demo.TENANT_ID}/oauth2/v2.0/authorize"})
    assert_aad_error(foreign, 400, "invalid_instance", 50049)


# --- token endpoint: success ------------------------------------------------------------------------------
def test_secret_in_form_issues_documented_token(client: TestClient, clock: Clock) -> None:
    response = client.post(TOKEN_URL, data=secret_form())
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"token_type", "expires_in", "ext_expires_in", "access_token"}
    assert body["token_type"] == "Bearer" and body["expires_in"] == 600 and body["ext_expires_in"] == 600
    header = jwt.get_unverified_header(body["access_token"])
    assert header["alg"] == "RS256" and header["kid"] == header["x5t"]
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["aud"] == "https://graph.microsoft.com"
    assert claims["iss"] == f"{BASE}/{demo.TENANT_ID}/v2.0"
    assert claims["tid"] == demo.TENANT_ID
    assert claims["appid"] == claims["azp"] == demo.APP_CLIENT_ID
    assert claims["oid"] == demo.APP_OBJECT_ID
    assert sorted(claims["roles"]) == sorted(demo.GRAPH_APP_ROLES)
    assert claims["ver"] == "2.0" and claims["azpacr"] == "1"
    assert claims["uti"] and claims["jti"]
    assert claims["nbf"] <= clock.now < claims["exp"] and claims["exp"] - clock.now >= 600


def test_dataverse_scope_gives_org_audience_without_roles(client: TestClient) -> None:
    body = client.post(TOKEN_URL, data=secret_form(scope="https://127.0.0.1:8443/.default")).json()
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["aud"] == "https://127.0.0.1:8443"
    assert "roles" not in claims


def test_secret_via_http_basic(client: TestClient) -> None:
    secret = "p@ss:word+/="  # characters that must be form-encoded inside Basic credentials
    seeded = TestClient(create_app(IdentityConfig(seed=demo_seed(secrets=[secret]))))
    basic = base64.b64encode(f"{quote_plus(demo.APP_CLIENT_ID)}:{quote_plus(secret)}".encode()).decode()
    response = seeded.post(TOKEN_URL, data=secret_form(client_secret=None, client_id=None),
                           headers={"Authorization": f"Basic {basic}"})
    assert response.status_code == 200, response.text


def test_token_validates_with_token_validator(client: TestClient) -> None:
    token = client.post(TOKEN_URL, data=secret_form()).json()["access_token"]
    jwks = client.get("/common/discovery/v2.0/keys").json()
    validator = TokenValidator(identity_url=BASE, audiences=["https://graph.microsoft.com"],
                               tenant_id=demo.TENANT_ID, jwks=jwks)
    assert validator.validate(f"Bearer {token}").roles == frozenset(demo.GRAPH_APP_ROLES)
    with pytest.raises(InvalidToken, match="wrong audience"):
        TokenValidator(identity_url=BASE, audiences=["https://127.0.0.1:8443"], jwks=jwks).validate(f"Bearer {token}")


def test_token_expires_per_clock(client: TestClient, clock: Clock) -> None:
    short = TestClient(create_app(IdentityConfig(seed=demo_seed(token_lifetime_s=1), clock=clock)))
    body = short.post(TOKEN_URL, data=secret_form()).json()
    assert body["expires_in"] == 1
    jwks = short.get("/common/discovery/v2.0/keys").json()
    validator = TokenValidator(identity_url=BASE, audiences=["https://graph.microsoft.com"], jwks=jwks, clock=clock)
    validator.validate(f"Bearer {body['access_token']}")
    clock.now += 2
    with pytest.raises(InvalidToken) as info:
        validator.validate(f"Bearer {body['access_token']}")
    assert info.value.reason == "expired"


@pytest.mark.parametrize(("alg", "sha256"), [("RS256", False), ("PS256", True)])
def test_certificate_assertion_accepted(client: TestClient, client_cert: tuple[str, str], alg: str,
                                        sha256: bool) -> None:
    token = assertion(*client_cert, alg=alg, sha256=sha256)
    response = client.post(TOKEN_URL, data=assertion_form(token))
    assert response.status_code == 200, response.text
    claims = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
    assert claims["azpacr"] == "2"


def test_assertion_without_client_id_uses_its_issuer(client: TestClient, client_cert: tuple[str, str]) -> None:
    form = assertion_form(assertion(*client_cert))
    del form["client_id"]
    assert client.post(TOKEN_URL, data=form).status_code == 200


# --- token endpoint: errors -------------------------------------------------------------------------------
def test_wrong_secret_is_invalid_client_401(client: TestClient) -> None:
    response = client.post(TOKEN_URL, data=secret_form(client_secret="nope"),
                           headers={"client-request-id": "11111111-2222-3333-4444-555555555555"})
    body = assert_aad_error(response, 401, "invalid_client", 7000215)
    assert "Invalid client secret provided" in body["error_description"]
    assert body["correlation_id"] == "11111111-2222-3333-4444-555555555555"
    assert "nope" not in response.text


def test_unknown_client_is_unauthorized_client(client: TestClient) -> None:
    response = client.post(TOKEN_URL, data=secret_form(client_id="00000000-0000-0000-0000-000000000000"))
    body = assert_aad_error(response, 400, "unauthorized_client", 700016)
    assert "was not found in the directory" in body["error_description"]


def test_missing_credential(client: TestClient) -> None:
    assert_aad_error(client.post(TOKEN_URL, data=secret_form(client_secret=None)), 401, "invalid_client", 7000216)


@pytest.mark.parametrize(
    ("scope", "status", "error", "code"),
    [
        ("https://graph.microsoft.com/Mail.Read", 400, "invalid_scope", 1002012),
        ("/.default", 400, "invalid_scope", 1002012),
        (f"{GRAPH_SCOPE} https://127.0.0.1:8443/.default", 400, "invalid_scope", 70011),
        (None, 400, "invalid_request", 900144),
    ],
)
def test_bad_scope(client: TestClient, scope: str | None, status: int, error: str, code: int) -> None:
    assert_aad_error(client.post(TOKEN_URL, data=secret_form(scope=scope)), status, error, code)


def test_resource_allow_list(clock: Clock) -> None:
    strict = TestClient(create_app(IdentityConfig(seed=demo_seed(resources=["https://graph.microsoft.com"]))))
    assert strict.post(TOKEN_URL, data=secret_form()).status_code == 200
    response = strict.post(TOKEN_URL, data=secret_form(scope="https://other.example/.default"))
    assert_aad_error(response, 400, "invalid_resource", 500011)


def test_grant_type_errors(client: TestClient) -> None:
    response = client.post(TOKEN_URL, data=secret_form(grant_type="password"))
    assert_aad_error(response, 400, "unsupported_grant_type", 70003)
    assert_aad_error(client.post(TOKEN_URL, data=secret_form(grant_type=None)), 400, "invalid_request", 900144)


def test_tenant_errors(client: TestClient) -> None:
    assert_aad_error(client.post("/common/oauth2/v2.0/token", data=secret_form()), 400, "invalid_request", 50059)
    assert_aad_error(client.post("/nosuch.example/oauth2/v2.0/token", data=secret_form()), 400,
                     "invalid_request", 90002)
    # the tenant's domain works like its id
    assert client.post(f"/{demo.TENANT_DOMAIN}/oauth2/v2.0/token", data=secret_form()).status_code == 200


def test_assertion_with_unregistered_certificate(client: TestClient) -> None:
    stranger = make_client_certificate("stranger")
    response = client.post(TOKEN_URL, data=assertion_form(assertion(*stranger)))
    assert_aad_error(response, 401, "invalid_client", 700027)


def test_assertion_signed_by_wrong_key(client: TestClient, client_cert: tuple[str, str]) -> None:
    stranger_key, _ = make_client_certificate("stranger")
    token = assertion(stranger_key, client_cert[1])  # our registered thumbprint, someone else's key
    assert_aad_error(client.post(TOKEN_URL, data=assertion_form(token)), 401, "invalid_client", 700027)


@pytest.mark.parametrize(
    ("claims", "code"),
    [
        ({"exp": int(time.time()) - 10}, 700024),
        ({"aud": "https://login.microsoftonline.com/x/oauth2/v2.0/token"}, 50012),
        ({"iss": "someone-else", "sub": "someone-else"}, 700021),
    ],
)
def test_assertion_claims_checked(client: TestClient, client_cert: tuple[str, str], claims: dict[str, Any],
                                  code: int) -> None:
    token = assertion(*client_cert, **claims)
    assert_aad_error(client.post(TOKEN_URL, data=assertion_form(token)), 401, "invalid_client", code)


def test_assertion_type_and_double_credentials(client: TestClient, client_cert: tuple[str, str]) -> None:
    token = assertion(*client_cert)
    wrong_type = assertion_form(token, client_assertion_type="urn:example:other")
    assert_aad_error(client.post(TOKEN_URL, data=wrong_type), 401, "invalid_client", 7000219)
    both = assertion_form(token, client_secret=demo.APP_CLIENT_SECRET)
    assert_aad_error(client.post(TOKEN_URL, data=both), 401, "invalid_client", 7000216)


def test_garbage_assertion(client: TestClient) -> None:
    assert_aad_error(client.post(TOKEN_URL, data=assertion_form("not.a.jwt")), 401, "invalid_client", 50027)


# --- emulator endpoints -----------------------------------------------------------------------------------
def test_health(client: TestClient) -> None:
    body = client.get("/_emulator/health").json()
    assert body["status"] == "ok" and body["apps"] == 1 and body["token_lifetime_s"] == 600


def test_token_counts_and_reset(client: TestClient) -> None:
    client.post(TOKEN_URL, data=secret_form())
    client.post(TOKEN_URL, data=secret_form(scope="https://127.0.0.1:8443/.default"))
    client.post(TOKEN_URL, data=secret_form(client_secret="wrong"))  # refused: not counted
    counts = client.get("/_emulator/tokens").json()
    assert counts["total"] == 2
    assert counts["by_app"] == {demo.APP_CLIENT_ID: 2}
    assert counts["by_app_resource"][demo.APP_CLIENT_ID] == {"https://graph.microsoft.com": 1,
                                                            "https://127.0.0.1:8443": 1}
    assert client.delete("/_emulator/tokens").json()["total"] == 0
    assert client.get("/_emulator/tokens").json()["total"] == 0


def test_replace_seed(client: TestClient) -> None:
    new = demo_seed(client_id="11111111-0000-4000-8000-000000000001", secrets=["s2"])
    assert client.post("/_emulator/seed", json=new).status_code == 200
    ok = client.post(TOKEN_URL, data=secret_form(client_id="11111111-0000-4000-8000-000000000001",
                                                 client_secret="s2"))
    assert ok.status_code == 200
    assert_aad_error(client.post(TOKEN_URL, data=secret_form()), 400, "unauthorized_client", 700016)
    bad = client.post("/_emulator/seed", json={"tenants": []})
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_seed"


# --- seed and key ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({}, "seed.tenants"),
        ({"tenants": [{"id": "t1"}], "apps": [{"client_id": "a", "tenant_id": "t2", "object_id": "o"}]},
         "not a seeded tenant"),
        ({"tenants": [{"id": "t1"}], "apps": [{"client_id": "a", "tenant_id": "t1"}]}, "object_id"),
        ({"tenants": [{"id": "t1"}], "apps": [{"client_id": "a", "tenant_id": "t1", "object_id": "o",
                                               "certificates": ["not pem"]}]}, "certificates[0]"),
        ({"tenants": [{"id": "t1"}], "apps": [{"client_id": "a", "tenant_id": "t1", "object_id": "o"},
                                              {"client_id": "A", "tenant_id": "t1", "object_id": "o"}]}, "twice"),
        ({"tenants": [{"id": "t1"}], "token_lifetime_s": 0}, "token_lifetime_s"),
    ],
)
def test_seed_errors_name_the_field(document: dict[str, Any], message: str) -> None:
    with pytest.raises(SeedError, match=re.escape(message)):
        parse_seed(document)


def test_demo_seed_overrides() -> None:
    seed = parse_seed(demo_seed(roles={"https://graph.microsoft.com/": ["Mail.Read"]}, token_lifetime_s=5))
    app = seed.app(demo.TENANT_ID, demo.APP_CLIENT_ID)
    assert app is not None
    assert app.roles_for("https://graph.microsoft.com") == frozenset({"Mail.Read"})
    assert seed.token_lifetime_s == 5
    assert seed.tenant(demo.TENANT_DOMAIN.upper()) is not None
    assert parse_seed(demo_seed()).app(demo.TENANT_ID, demo.APP_CLIENT_ID) is not None  # defaults untouched


def test_signing_key_persists(tmp_path: Path) -> None:
    path = tmp_path / "state" / "identity-signing-key.pem"
    first = SigningKey.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    again = SigningKey.load_or_create(path)
    assert again.kid == first.kid
    assert again.jwk()["n"] == first.jwk()["n"]
