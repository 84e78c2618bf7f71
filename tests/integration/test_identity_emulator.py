"""msal (unchanged) and the production MsalTokenProvider against the identity emulator over real TLS."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import msal
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from kiota_abstractions.authentication import BaseBearerTokenAuthenticationProvider
from kiota_abstractions.method import Method
from kiota_abstractions.request_information import RequestInformation

from core.adapters.auth import (
    AuthError,
    MsalAccessTokenProvider,
    MsalTokenProvider,
    dataverse_token_provider,
    graph_access_token_provider,
    graph_token_provider,
)
from core.config import Settings
from emulators.common import demo
from emulators.common.server import RunningServer, free_port
from emulators.common.tls import TlsMaterial, client_env, ensure_tls
from emulators.common.tokens import InvalidToken, TokenValidator
from emulators.identity.testing import demo_seed, make_client_certificate, start_identity

pytestmark = pytest.mark.integration

GRAPH = "https://graph.microsoft.com"
GRAPH_SCOPE = f"{GRAPH}/.default"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsMaterial]:
    material = ensure_tls(tmp_path_factory.mktemp("tls"))
    # msal's requests session honours REQUESTS_CA_BUNDLE; httpx (JWKS fetch) honours SSL_CERT_FILE
    with pytest.MonkeyPatch.context() as mp:
        for name, value in client_env(material).items():
            mp.setenv(name, value)
        yield material


@pytest.fixture(scope="module")
def client_cert() -> tuple[str, str]:
    return make_client_certificate()


@pytest.fixture(scope="module")
def identity(tls: TlsMaterial, client_cert: tuple[str, str]) -> Iterator[RunningServer]:
    server = start_identity(tls.ca_cert.parent, seed=demo_seed(certificates=[client_cert[1]]))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def short_identity(tls: TlsMaterial) -> Iterator[RunningServer]:
    server = start_identity(tls.ca_cert.parent, token_lifetime_s=1)
    yield server
    server.stop()


def issued(server: RunningServer) -> int:
    return int(httpx.get(f"{server.url}/_emulator/tokens").json()["total"])  # trusts SSL_CERT_FILE


@pytest.fixture
def counts(identity: RunningServer) -> None:
    httpx.delete(f"{identity.url}/_emulator/tokens")


def authority(server: RunningServer) -> str:
    return f"{server.url}/{demo.TENANT_ID}"


def graph_validator(server: RunningServer, **kw: Any) -> TokenValidator:
    return TokenValidator(identity_url=server.url, audiences=[GRAPH], tenant_id=demo.TENANT_ID, **kw)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- msal itself ------------------------------------------------------------------------------------------
def test_msal_secret_token_validates_and_is_cached(identity: RunningServer, tls: TlsMaterial, counts: None) -> None:
    app = msal.ConfidentialClientApplication(
        demo.APP_CLIENT_ID, client_credential=demo.APP_CLIENT_SECRET, authority=authority(identity),
        instance_discovery=False,
    )
    first = app.acquire_token_for_client(scopes=[GRAPH_SCOPE])
    assert first.get("token_source") == "identity_provider", first.get("error_description")
    second = app.acquire_token_for_client(scopes=[GRAPH_SCOPE])
    assert second["token_source"] == "cache" and second["access_token"] == first["access_token"]
    assert issued(identity) == 1
    # JWKS fetched over TLS: trusted via SSL_CERT_FILE, and via an explicit bundle
    for validator in (graph_validator(identity), graph_validator(identity, ca_bundle=str(tls.bundle))):
        token = validator.validate(f"Bearer {first['access_token']}")
        assert token.app_id == demo.APP_CLIENT_ID and token.object_id == demo.APP_OBJECT_ID
        assert token.roles == frozenset(demo.GRAPH_APP_ROLES)


def thumbprint_sha1_hex(cert_pem: str) -> str:
    return x509.load_pem_x509_certificate(cert_pem.encode()).fingerprint(hashes.SHA1()).hex()


@pytest.mark.parametrize("form", ["thumbprint", "public_certificate"])
def test_msal_certificate_credential(identity: RunningServer, client_cert: tuple[str, str], form: str) -> None:
    key_pem, cert_pem = client_cert
    credential = ({"private_key": key_pem, "thumbprint": thumbprint_sha1_hex(cert_pem)} if form == "thumbprint"
                  else {"private_key": key_pem, "public_certificate": cert_pem})
    app = msal.ConfidentialClientApplication(demo.APP_CLIENT_ID, client_credential=credential,
                                             authority=authority(identity), instance_discovery=False)
    result = app.acquire_token_for_client(scopes=[GRAPH_SCOPE])
    assert "access_token" in result, result.get("error_description")
    claims = graph_validator(identity).validate(f"Bearer {result['access_token']}").claims
    assert claims["azpacr"] == "2"


def test_msal_with_instance_discovery_answered_by_the_emulator(identity: RunningServer) -> None:
    app = msal.ConfidentialClientApplication(
        demo.APP_CLIENT_ID, client_credential=demo.APP_CLIENT_SECRET, authority=authority(identity),
        instance_discovery=f"{identity.url}/common/discovery/instance",
    )
    assert "access_token" in app.acquire_token_for_client(scopes=[GRAPH_SCOPE])
    unvalidated = msal.ConfidentialClientApplication(
        demo.APP_CLIENT_ID, client_credential=demo.APP_CLIENT_SECRET,
        authority=f"{identity.url}/{demo.TENANT_DOMAIN}", validate_authority=False,
    )
    assert "access_token" in unvalidated.acquire_token_for_client(scopes=[GRAPH_SCOPE])


@pytest.mark.parametrize(
    ("client_id", "secret", "scope", "error", "code"),
    [
        (demo.APP_CLIENT_ID, "wrong-secret", GRAPH_SCOPE, "invalid_client", 7000215),
        ("00000000-0000-0000-0000-000000000000", demo.APP_CLIENT_SECRET, GRAPH_SCOPE, "unauthorized_client", 700016),
        (demo.APP_CLIENT_ID, demo.APP_CLIENT_SECRET, f"{GRAPH}/Mail.Read", "invalid_scope", 1002012),
    ],
)
def test_msal_sees_documented_errors(identity: RunningServer, client_id: str, secret: str, scope: str, error: str,
                                     code: int) -> None:
    app = msal.ConfidentialClientApplication(client_id, client_credential=secret, authority=authority(identity),
                                             instance_discovery=False)
    result = app.acquire_token_for_client(scopes=[scope])
    assert "access_token" not in result
    assert result["error"] == error
    assert result["error_codes"] == [code]


def test_dataverse_audience_rejected_by_graph_validator(identity: RunningServer) -> None:
    app = msal.ConfidentialClientApplication(demo.APP_CLIENT_ID, client_credential=demo.APP_CLIENT_SECRET,
                                             authority=authority(identity), instance_discovery=False)
    org = "https://127.0.0.1:8443"
    token = app.acquire_token_for_client(scopes=[f"{org}/.default"])["access_token"]
    with pytest.raises(InvalidToken) as info:
        graph_validator(identity).validate(f"Bearer {token}")
    assert info.value.reason == "wrong audience"
    dataverse = TokenValidator(identity_url=identity.url, audiences=[org], tenant_id=demo.TENANT_ID)
    assert dataverse.validate(f"Bearer {token}").roles == frozenset()


def test_tampered_emulator_token_rejected(identity: RunningServer) -> None:
    app = msal.ConfidentialClientApplication(demo.APP_CLIENT_ID, client_credential=demo.APP_CLIENT_SECRET,
                                             authority=authority(identity), instance_discovery=False)
    token = app.acquire_token_for_client(scopes=[GRAPH_SCOPE])["access_token"]
    header, payload, signature = token.split(".")
    flipped = signature[:-4] + ("AAAA" if not signature.endswith("AAAA") else "BBBB")
    with pytest.raises(InvalidToken) as info:
        graph_validator(identity).validate(f"Bearer {header}.{payload}.{flipped}")
    assert info.value.reason == "bad signature"


def test_short_lived_token_expires(short_identity: RunningServer) -> None:
    app = msal.ConfidentialClientApplication(demo.APP_CLIENT_ID, client_credential=demo.APP_CLIENT_SECRET,
                                             authority=authority(short_identity), instance_discovery=False)
    result = app.acquire_token_for_client(scopes=[GRAPH_SCOPE])
    assert result["expires_in"] == 1
    exp = jwt.decode(result["access_token"], options={"verify_signature": False})["exp"]
    validator = graph_validator(short_identity, clock=lambda: exp + 0.5)  # judge it half a second after expiry
    with pytest.raises(InvalidToken) as info:
        validator.validate(f"Bearer {result['access_token']}")
    assert info.value.reason == "expired"


# --- MsalTokenProvider ------------------------------------------------------------------------------------
def test_provider_caches_then_refreshes_after_expiry(identity: RunningServer, counts: None) -> None:
    clock = FakeClock()
    provider = MsalTokenProvider(client_id=demo.APP_CLIENT_ID, authority=authority(identity), scope=GRAPH_SCOPE,
                                 client_secret=demo.APP_CLIENT_SECRET, clock=clock)
    first = provider.get_token()
    assert provider.get_token() == first
    clock.now += 3000  # still before the refresh point (3600 s lifetime - 300 s margin)
    assert provider.get_token() == first
    assert issued(identity) == 1
    # Past the provider's refresh point, so it asks msal again; msal judges by the real clock, on which
    # the token is fresh, and answers from its own cache: the identity provider sees no extra request.
    # (test_provider_refreshes_short_lived_tokens proves the refresh that does reach the provider.)
    clock.now += 400
    assert provider.get_token() == first
    assert issued(identity) == 1


def test_provider_refreshes_short_lived_tokens(short_identity: RunningServer) -> None:
    """1-second tokens: msal never serves them from its cache, the provider refreshes at half-life."""
    clock = FakeClock()
    provider = MsalTokenProvider(client_id=demo.APP_CLIENT_ID, authority=authority(short_identity),
                                 scope=GRAPH_SCOPE, client_secret=demo.APP_CLIENT_SECRET, clock=clock)
    before = issued(short_identity)
    first = provider.get_token()
    assert provider.get_token() == first  # cached by the provider
    assert issued(short_identity) == before + 1
    clock.now += 1  # past half the lifetime
    second = provider.get_token()
    assert second != first
    assert issued(short_identity) == before + 2


def test_provider_refresh_on_the_real_clock(short_identity: RunningServer) -> None:
    provider = MsalTokenProvider(client_id=demo.APP_CLIENT_ID, authority=authority(short_identity),
                                 scope=GRAPH_SCOPE, client_secret=demo.APP_CLIENT_SECRET)
    first = provider.get_token()
    deadline = time.monotonic() + 15
    while provider.get_token() == first:
        assert time.monotonic() < deadline, "token never refreshed"
        time.sleep(0.05)
    fresh = provider.get_token()
    assert graph_validator(short_identity).validate(f"Bearer {fresh}").app_id == demo.APP_CLIENT_ID


def test_provider_with_certificate_file(identity: RunningServer, client_cert: tuple[str, str],
                                        tmp_path: Path) -> None:
    pem = tmp_path / "client.pem"
    pem.write_text(client_cert[0] + client_cert[1])
    provider = MsalTokenProvider(client_id=demo.APP_CLIENT_ID, authority=authority(identity), scope=GRAPH_SCOPE,
                                 certificate_path=pem)
    assert provider.certificate is not None
    assert provider.certificate.thumbprint_sha1 == thumbprint_sha1_hex(client_cert[1]).upper()
    token = graph_validator(identity).validate(f"Bearer {provider.get_token()}")
    assert token.claims["azpacr"] == "2"


async def test_async_callers_share_one_request(identity: RunningServer, counts: None) -> None:
    provider = MsalTokenProvider(client_id=demo.APP_CLIENT_ID, authority=authority(identity), scope=GRAPH_SCOPE,
                                 client_secret=demo.APP_CLIENT_SECRET)
    tokens = await asyncio.gather(*(provider.get_token_async() for _ in range(25)))
    assert len(set(tokens)) == 1
    assert issued(identity) == 1
    assert await provider.get_token_async() == tokens[0]


def test_provider_errors_are_auth_errors_without_secrets(identity: RunningServer) -> None:
    provider = MsalTokenProvider(client_id=demo.APP_CLIENT_ID, authority=authority(identity), scope=GRAPH_SCOPE,
                                 client_secret="very-secret-wrong-value")
    with pytest.raises(AuthError) as info:
        provider.get_token()
    assert info.value.code == "invalid_client"
    assert "AADSTS7000215" in info.value.description
    assert "very-secret-wrong-value" not in str(info.value) and "very-secret" not in repr(provider)


def test_unreachable_authority(tls: TlsMaterial) -> None:
    provider = MsalTokenProvider(client_id=demo.APP_CLIENT_ID, authority=f"https://127.0.0.1:{free_port()}/t",
                                 scope=GRAPH_SCOPE, client_secret=demo.APP_CLIENT_SECRET, timeout_s=5)
    with pytest.raises(AuthError) as info:
        provider.get_token()
    assert info.value.code == "authority_unreachable"


def test_provider_rejects_bad_configuration() -> None:
    with pytest.raises(AuthError, match="invalid_configuration"):
        MsalTokenProvider(client_id="x", authority="https://login.example/t", scope=GRAPH_SCOPE)
    with pytest.raises(AuthError, match="invalid_configuration"):
        MsalTokenProvider(client_id="x", authority="http://login.example/t", scope=GRAPH_SCOPE, client_secret="s")


# --- kiota provider and factories -------------------------------------------------------------------------
async def test_kiota_provider_only_serves_allowed_hosts(identity: RunningServer, counts: None) -> None:
    provider = MsalTokenProvider(client_id=demo.APP_CLIENT_ID, authority=authority(identity), scope=GRAPH_SCOPE,
                                 client_secret=demo.APP_CLIENT_SECRET)
    kiota = MsalAccessTokenProvider(provider, allowed_hosts=["graph.local.example"])
    assert await kiota.get_authorization_token("https://evil.example/v1.0/users") == ""
    assert issued(identity) == 0  # no token was even requested for the foreign host
    token = await kiota.get_authorization_token("https://graph.local.example/v1.0/users")
    assert graph_validator(identity).validate(f"Bearer {token}").app_id == demo.APP_CLIENT_ID
    with pytest.raises(AuthError, match="insecure_url"):
        await kiota.get_authorization_token("http://graph.local.example/v1.0/users")
    assert kiota.get_allowed_hosts_validator().get_allowed_hosts() == ["graph.local.example"]

    auth = BaseBearerTokenAuthenticationProvider(kiota)
    for url, expect_header in (("https://graph.local.example/v1.0/me", True), ("https://evil.example/x", False)):
        request = RequestInformation(Method.GET, url)
        await auth.authenticate_request(request)
        assert request.headers.contains("Authorization") is expect_header


def test_factories_from_settings(identity: RunningServer, client_cert: tuple[str, str], tmp_path: Path) -> None:
    env = {
        "GRAPH_TENANT_ID": demo.TENANT_ID, "GRAPH_CLIENT_ID": demo.APP_CLIENT_ID,
        "GRAPH_CLIENT_SECRET": demo.APP_CLIENT_SECRET, "GRAPH_AUTHORITY_HOST": identity.url,
        "GRAPH_BASE_URL": "https://127.0.0.1:1/v1.0", "DATAVERSE_URL": "https://127.0.0.1:8443",
    }
    settings = Settings(env)
    graph = graph_token_provider(settings)
    assert graph is graph_token_provider(Settings(dict(env)))  # one provider (and cache) per process
    assert graph_validator(identity).validate(f"Bearer {graph.get_token()}").audience == GRAPH
    dataverse = dataverse_token_provider(settings)
    claims = jwt.decode(dataverse.get_token(), options={"verify_signature": False})
    assert claims["aud"] == "https://127.0.0.1:8443"
    kiota = graph_access_token_provider(settings)
    assert kiota.get_allowed_hosts_validator().get_allowed_hosts() == ["127.0.0.1"]

    pem = tmp_path / "dv.pem"
    pem.write_text(client_cert[0] + client_cert[1])
    cert_settings = Settings({**env, "DATAVERSE_CLIENT_CERTIFICATE_PATH": str(pem)})
    cert_provider = dataverse_token_provider(cert_settings)
    assert cert_provider is not dataverse and cert_provider.certificate is not None
    assert jwt.decode(cert_provider.get_token(), options={"verify_signature": False})["azpacr"] == "2"


# --- CLI --------------------------------------------------------------------------------------------------
def _wait_healthy(url: str, process: subprocess.Popen[bytes], ca: Path) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            raise AssertionError(f"emulator exited with {process.returncode}: {process.stderr.read().decode()}")  # type: ignore[union-attr]
        try:
            trust = ssl.create_default_context(cafile=ca)
            body: dict[str, Any] = httpx.get(f"{url}/_emulator/health", verify=trust, timeout=2).json()
            return body
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_cli_serves_seed_and_keeps_signing_key(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ca = ensure_tls(state).ca_cert  # the CLI reuses the CA/server certificate it finds there
    seed_file = tmp_path / "seed.json"
    seed_file.write_text(json.dumps(demo_seed(secrets=["cli-secret"])))
    kids = []
    for _ in range(2):
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "emulators.identity", "--port", str(port), "--tls-dir", str(state),
             "--seed", str(seed_file), "--token-lifetime", "120", "--log-level", "WARNING"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ},
        )
        try:
            url = f"https://127.0.0.1:{port}"
            health = _wait_healthy(url, process, ca)
            assert health["status"] == "ok" and health["token_lifetime_s"] == 120
            response = httpx.post(
                f"{url}/{demo.TENANT_ID}/oauth2/v2.0/token", verify=ssl.create_default_context(cafile=ca),
                data={"grant_type": "client_credentials", "client_id": demo.APP_CLIENT_ID,
                      "client_secret": "cli-secret", "scope": GRAPH_SCOPE},
            )
            assert response.status_code == 200 and response.json()["expires_in"] == 120
            kids.append(jwt.get_unverified_header(response.json()["access_token"])["kid"])
        finally:
            process.terminate()
            process.wait(timeout=15)
    assert kids[0] == kids[1]  # the key file survived the restart, so earlier tokens stay valid
    assert (state / "identity-signing-key.pem").stat().st_mode & 0o777 == 0o600


def test_cli_rejects_bad_seed(tmp_path: Path) -> None:
    seed_file = tmp_path / "seed.json"
    seed_file.write_text(json.dumps({"tenants": []}))
    result = subprocess.run(
        [sys.executable, "-m", "emulators.identity", "--port", str(free_port()), "--tls-dir", str(tmp_path),
         "--seed", str(seed_file)], cwd=ROOT, capture_output=True, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert b"seed.tenants" in result.stderr
