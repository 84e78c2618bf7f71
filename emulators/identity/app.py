"""Local Microsoft identity platform (Entra ID v2.0 endpoints) for the client-credentials flow.

Serves exactly what msal's ``ConfidentialClientApplication`` uses for app-only tokens, so production
code runs unchanged against it: tenant discovery (OpenID configuration), instance discovery, the JWKS
and ``/oauth2/v2.0/token`` with a client secret (form or HTTP Basic), a certificate-signed client
assertion, or a federated assertion (a managed identity's token, checked against the app registration's
federated identity credentials). Errors use the identity platform's JSON shape and AADSTS codes.

It also plays the hosting platform's managed identity endpoint, as App Service / Azure Functions expose it
to the app (``IDENTITY_ENDPOINT`` + ``IDENTITY_HEADER``, api-version 2019-08-01): ``GET /msi/token`` —
what azure-identity's ``ManagedIdentityCredential`` (through msal's ``ManagedIdentityClient``) calls there.
Emulator-only endpoints live under ``/_emulator/``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import hmac
import logging
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qs, unquote_plus, urlsplit

import jwt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .keys import SigningKey
from .seed import (
    AppRegistration,
    FederatedCredential,
    ManagedIdentity,
    Seed,
    SeedError,
    Tenant,
    demo_seed,
    normalise_resource,
    parse_seed,
)

__all__ = ["IdentityConfig", "IdentityState", "create_app"]

log = logging.getLogger("emulators.identity")

JWT_BEARER: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_DEFAULT_SUFFIX: Final = "/.default"
_MULTI_TENANT_ALIASES: Final = frozenset({"common", "organizations"})
# Algorithms msal uses for client assertions: RS256 with an x5t (SHA-1) header, PS256 with x5t#S256.
_ASSERTION_ALGORITHMS: Final = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]


@dataclass
class IdentityConfig:
    seed: Mapping[str, Any] | None = None  # None = demo_seed()
    token_lifetime_s: int = 3600
    signing_key: SigningKey | None = None  # None = a fresh in-memory key
    clock: Callable[[], float] = time.time
    public_url: str | None = None  # base URL for metadata and "iss"; None = taken from each request


@dataclass
class IdentityState:
    """Mutable emulator state: the parsed seed and the issuance counters (thread-safe via ``lock``)."""

    seed: Seed
    signing_key: SigningKey
    default_lifetime_s: int
    clock: Callable[[], float]
    public_url: str | None
    issued_by_app: Counter[str] = field(default_factory=Counter)
    issued_by_app_resource: dict[str, Counter[str]] = field(default_factory=dict)
    issued_by_identity: Counter[str] = field(default_factory=Counter)  # platform endpoint, by identity client id
    token_requests: int = 0  # every POST to a token endpoint, issued or refused
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def token_lifetime_s(self) -> int:
        return self.seed.token_lifetime_s or self.default_lifetime_s

    def count_issued(self, client_id: str, resource: str) -> None:
        with self.lock:
            self.issued_by_app[client_id] += 1
            self.issued_by_app_resource.setdefault(client_id, Counter())[resource] += 1


class OAuthError(Exception):
    """An identity-platform error response: ``error`` (OAuth code), AADSTS number and message."""

    def __init__(self, status: int, error: str, code: int, message: str) -> None:
        super().__init__(f"AADSTS{code}: {message}")
        self.status = status
        self.error = error
        self.code = code
        self.message = message


def _base_url(request: Request, state: IdentityState) -> str:
    if state.public_url:
        return state.public_url.rstrip("/")
    return f"{request.url.scheme}://{request.url.netloc}"


def _error_response(request: Request, state: IdentityState, err: OAuthError) -> JSONResponse:
    now = dt.datetime.fromtimestamp(state.clock(), dt.UTC)
    timestamp = now.strftime("%Y-%m-%d %H:%M:%SZ")
    trace_id = str(uuid.uuid4())
    correlation_id = request.headers.get("client-request-id") or str(uuid.uuid4())
    body = {
        "error": err.error,
        "error_description": (
            f"AADSTS{err.code}: {err.message} Trace ID: {trace_id} Correlation ID: {correlation_id} "
            f"Timestamp: {timestamp}"
        ),
        "error_codes": [err.code],
        "timestamp": timestamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": f"{_base_url(request, state)}/error?code={err.code}",
    }
    log.info("token request refused: %s AADSTS%s", err.error, err.code)
    return JSONResponse(
        body, status_code=err.status,
        headers={"x-ms-request-id": trace_id, "client-request-id": correlation_id, "Cache-Control": "no-store"},
    )


def _resolve_tenant(state: IdentityState, tenant_segment: str) -> Tenant:
    tenant = state.seed.tenant(tenant_segment)
    if tenant is None:
        raise OAuthError(
            400, "invalid_request", 90002,
            f"Tenant '{tenant_segment}' not found. Check to make sure you have the correct tenant ID and are "
            "signing into the correct cloud.",
        )
    return tenant


# --- metadata ---------------------------------------------------------------------------------------------
def _openid_configuration(base: str, tenant_segment: str, tenant_id: str | None) -> dict[str, Any]:
    # Like Entra ID: endpoints use the tenant GUID for a known tenant, "common" stays "common" and the
    # issuer then carries the literal "{tenantid}" placeholder.
    segment = tenant_id or tenant_segment
    issuer_tenant = tenant_id or "{tenantid}"
    return {
        "token_endpoint": f"{base}/{segment}/oauth2/v2.0/token",
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
        "jwks_uri": f"{base}/{segment}/discovery/v2.0/keys",
        "response_modes_supported": ["query", "fragment", "form_post"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "issuer": f"{base}/{issuer_tenant}/v2.0",
        "request_uri_parameter_supported": False,
        "userinfo_endpoint": f"{base}/oidc/userinfo",
        "authorization_endpoint": f"{base}/{segment}/oauth2/v2.0/authorize",
        "device_authorization_endpoint": f"{base}/{segment}/oauth2/v2.0/devicecode",
        "http_logout_supported": True,
        "frontchannel_logout_supported": True,
        "end_session_endpoint": f"{base}/{segment}/oauth2/v2.0/logout",
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nbf", "tid", "oid", "azp", "roles", "ver"],
        "tenant_region_scope": "WW",
        "cloud_instance_name": "local.emulator",
        "cloud_graph_host_name": "graph.windows.net",
        "msgraph_host": "graph.microsoft.com",
    }


def _state(request: Request) -> IdentityState:
    state: IdentityState = request.app.state.identity
    return state


async def openid_configuration(request: Request) -> JSONResponse:
    state = _state(request)
    segment = request.path_params["tenant"]
    if segment.lower() in _MULTI_TENANT_ALIASES:
        tenant_id = None
    else:
        try:
            tenant_id = _resolve_tenant(state, segment).id
        except OAuthError as err:
            return _error_response(request, state, err)
    return JSONResponse(_openid_configuration(_base_url(request, state), segment, tenant_id))


async def keys(request: Request) -> JSONResponse:
    state = _state(request)
    segment = request.path_params["tenant"]
    issuer = None
    if segment.lower() not in _MULTI_TENANT_ALIASES:
        tenant = state.seed.tenant(segment)
        if tenant is None:
            return _error_response(request, state, _resolve_tenant_error(segment))
        issuer = f"{_base_url(request, state)}/{tenant.id}/v2.0"
    return JSONResponse({"keys": [state.signing_key.jwk(issuer)]}, headers={"Cache-Control": "max-age=86400"})


def _resolve_tenant_error(segment: str) -> OAuthError:
    return OAuthError(400, "invalid_request", 90002, f"Tenant '{segment}' not found.")


async def instance_discovery(request: Request) -> JSONResponse:
    """``/common/discovery/instance``: answers msal when it is pointed here via ``instance_discovery=<url>``."""
    state = _state(request)
    base = _base_url(request, state)
    authorization_endpoint = request.query_params.get("authorization_endpoint", "")
    parts = urlsplit(authorization_endpoint)
    ours = urlsplit(base)
    path = [p for p in parts.path.split("/") if p]
    # msal builds this URL from the authority's host name without its port, so compare host names only
    if parts.scheme != "https" or (parts.hostname or "").lower() != (ours.hostname or "").lower() or not path:
        return _error_response(
            request, state,
            OAuthError(400, "invalid_instance", 50049, "Unknown or invalid instance."),
        )
    tenant_segment = path[0]
    host = ours.netloc
    return JSONResponse(
        {
            "tenant_discovery_endpoint": f"{base}/{tenant_segment}/v2.0/.well-known/openid-configuration",
            "api-version": "1.1",
            "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}],
        }
    )


# --- token endpoint ---------------------------------------------------------------------------------------
def _form(body: bytes) -> dict[str, str]:
    parsed = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    return {k: v[0] for k, v in parsed.items()}


def _basic_credentials(header: str | None) -> tuple[str, str] | None:
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise OAuthError(401, "invalid_client", 7000216, "Malformed Basic authorization header.") from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise OAuthError(401, "invalid_client", 7000216, "Malformed Basic authorization header.")
    # RFC 6749 §2.3.1: both parts are form-urlencoded before base64 (msal does this)
    return unquote_plus(client_id), unquote_plus(secret)


def _check_secret(app: AppRegistration, secret: str) -> None:
    if not any(hmac.compare_digest(secret.encode(), s.encode()) for s in app.secrets):
        raise OAuthError(
            401, "invalid_client", 7000215,
            "Invalid client secret provided. Ensure the secret being sent in the request is the client secret "
            f"value, not the client secret ID, for a secret added to app '{app.client_id}'.",
        )


def _malformed() -> OAuthError:
    return OAuthError(401, "invalid_client", 50027, "JWT token is invalid or malformed.")


def _check_assertion(app: AppRegistration, assertion: str, audiences: set[str], now: float) -> None:
    try:
        header = jwt.get_unverified_header(assertion)
    except jwt.PyJWTError:
        raise _malformed() from None
    alg = header.get("alg")
    if alg not in _ASSERTION_ALGORITHMS:
        raise OAuthError(
            401, "invalid_client", 5002738, f"Invalid JWT token. '{alg}' is not a supported signature algorithm."
        )
    x5t, x5t_s256 = header.get("x5t"), header.get("x5t#S256")
    registered = app.certificate_by_thumbprint(
        x5t=x5t if isinstance(x5t, str) else None, x5t_s256=x5t_s256 if isinstance(x5t_s256, str) else None
    )
    if registered is None:
        raise OAuthError(
            401, "invalid_client", 700027,
            "Client assertion failed signature validation. [Reason - The key was not found., "
            f"Thumbprint of key used by client: '{x5t_s256 or x5t or ''}']",
        )
    try:
        claims: dict[str, Any] = jwt.decode(
            assertion, registered.certificate.public_key(), algorithms=[alg],  # type: ignore[arg-type]
            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_aud": False,
                     "require": ["aud", "iss", "sub", "exp"]},
        )
    except jwt.InvalidSignatureError:
        raise OAuthError(
            401, "invalid_client", 700027, "Client assertion failed signature validation. [Reason - The provided "
            "signature value did not match the expected signature value.]",
        ) from None
    except jwt.PyJWTError:
        raise OAuthError(401, "invalid_client", 50027, "JWT token is invalid or malformed.") from None
    if claims.get("iss") != app.client_id or claims.get("sub") != app.client_id:
        raise OAuthError(
            401, "invalid_client", 700021, "Client assertion application identifier doesn't match 'client_id' "
            "parameter.",
        )
    aud = claims.get("aud")
    if not isinstance(aud, str) or aud.rstrip("/").lower() not in audiences:
        raise OAuthError(401, "invalid_client", 50012, "Client assertion audience claim does not match Realm issuer.")
    try:
        exp = float(claims["exp"])
        nbf = float(claims.get("nbf", 0))
    except (TypeError, ValueError):
        raise OAuthError(401, "invalid_client", 50027, "JWT token is invalid or malformed.") from None
    if now >= exp or now < nbf - 300:  # 5 minutes of clock skew accepted before nbf, like Entra ID
        raise OAuthError(401, "invalid_client", 700024, "Client assertion is not within its valid time range.")


def _is_federated(app: AppRegistration, assertion: str) -> bool:
    """A client assertion is federated (workload identity federation) unless the app signed it itself: signed with
    one of its registered certificates, or claiming the app as issuer (RFC 7523 §3 client authentication)."""
    try:
        header = jwt.get_unverified_header(assertion)
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise _malformed() from None
    x5t, x5t_s256 = header.get("x5t"), header.get("x5t#S256")
    if app.certificate_by_thumbprint(x5t=x5t if isinstance(x5t, str) else None,
                                     x5t_s256=x5t_s256 if isinstance(x5t_s256, str) else None) is not None:
        return False
    return claims.get("iss") != app.client_id


def _no_match(code: int, what: str, value: str) -> OAuthError:
    return OAuthError(
        401, "invalid_client", code,
        f"No matching federated identity record found for presented assertion {what} '{value}'. Check your "
        "federated identity credential Subject, Audience and Issuer against the presented assertion. "
        "https://learn.microsoft.com/entra/workload-id/workload-identity-federation",
    )


def _check_federated_assertion(state: IdentityState, base: str, credentials: tuple[FederatedCredential, ...],
                               assertion: str, now: float) -> None:
    """Workload identity federation, as strict as Entra: the assertion's issuer, subject (case-sensitive) and
    audience must match one federated identity credential of the app registration; its signature must verify
    with the issuer's published keys; it must be within its validity period."""
    try:
        header = jwt.get_unverified_header(assertion)
        claims: dict[str, Any] = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise _malformed() from None
    iss, sub, aud = claims.get("iss"), claims.get("sub"), claims.get("aud")
    if not isinstance(iss, str) or not isinstance(sub, str) or aud is None or "exp" not in claims:
        raise _malformed()
    if not credentials:
        raise OAuthError(
            401, "invalid_client", 70021,
            f"No matching federated identity record found for presented assertion. Assertion Issuer: '{iss}'. "
            f"Assertion Subject: '{sub}'. Assertion Audience: '{aud}'. "
            "https://learn.microsoft.com/entra/workload-id/workload-identity-federation",
        )
    same_issuer = [c for c in credentials if c.issuer == iss]
    if not same_issuer:
        raise _no_match(700211, "issuer", iss)
    # The issuer's signing keys: only the tenants this emulator serves publish keys here (no network egress).
    own_issuers = {f"{base}/{tenant.id}/v2.0" for tenant in state.seed.tenants.values()}
    if iss not in own_issuers:
        raise OAuthError(401, "invalid_client", 50166, f"Request to External OIDC endpoint failed. Issuer: '{iss}'.")
    if header.get("alg") != "RS256" or header.get("kid") != state.signing_key.kid:
        raise OAuthError(401, "invalid_client", 700027, "Client assertion failed signature validation. "
                         "[Reason - The key was not found.]")
    try:
        jwt.decode(assertion, state.signing_key.private_key.public_key(), algorithms=["RS256"],
                   options={"verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_aud": False})
    except jwt.InvalidSignatureError:
        raise OAuthError(401, "invalid_client", 700027, "Client assertion failed signature validation. [Reason - "
                         "The provided signature value did not match the expected signature value.]") from None
    except jwt.PyJWTError:
        raise _malformed() from None
    same_subject = [c for c in same_issuer if c.subject == sub]
    if not same_subject:
        if any(c.subject.lower() == sub.lower() for c in same_issuer):
            raise OAuthError(
                401, "invalid_client", 7002138,
                f"No matching federated identity record found for presented assertion subject '{sub}'. The subject "
                "matches with case-insensitive comparison, but not with case-sensitive comparison. Check your "
                "federated identity credential Subject, Audience and Issuer against the presented assertion.",
            )
        raise _no_match(700213, "subject", sub)
    presented = [aud] if isinstance(aud, str) else list(aud) if isinstance(aud, list) else []
    if not any(a in c.audiences for c in same_subject for a in presented):
        raise _no_match(700212, "audience", ", ".join(str(a) for a in presented))
    try:
        exp = float(claims["exp"])
        nbf = float(claims.get("nbf", 0))
    except (TypeError, ValueError):
        raise _malformed() from None
    if now >= exp or now < nbf - 300:
        raise OAuthError(401, "invalid_client", 700024, "Client assertion is not within its valid time range.")


def _resource_from_scope(state: IdentityState, scope: str | None) -> str:
    if scope is None:
        raise OAuthError(400, "invalid_request", 900144, "The request body must contain the following parameter: "
                         "'scope'.")
    scopes = scope.split()
    if len(scopes) != 1:
        raise OAuthError(
            400, "invalid_scope", 70011, f"The provided value for the input parameter 'scope' is not valid. "
            f"The scope {scope} is not valid. Client credential flows must request exactly one "
            "'<resource>/.default' scope.",
        )
    only = scopes[0]
    if not only.endswith(_DEFAULT_SUFFIX) or len(only) == len(_DEFAULT_SUFFIX):
        raise OAuthError(
            400, "invalid_scope", 1002012, f"The provided value for scope {only} is not valid. Client credential "
            "flows must have a scope value with /.default suffixed to the resource identifier (application ID URI).",
        )
    resource = only[: -len(_DEFAULT_SUFFIX)]
    if not state.seed.resource_known(resource):
        raise OAuthError(
            400, "invalid_resource", 500011, f"The resource principal named {resource} was not found in the tenant. "
            "This can happen if the application has not been installed by the administrator of the tenant.",
        )
    return resource


def _issue(state: IdentityState, base: str, tenant: Tenant, app: AppRegistration, resource: str,
           auth_method: str) -> dict[str, Any]:
    now = state.clock()
    lifetime = state.token_lifetime_s
    issued_at = int(now)
    issuer = f"{base}/{tenant.id}/v2.0"
    claims: dict[str, Any] = {
        "aud": resource.rstrip("/"),
        "iss": issuer,
        "iat": issued_at,
        "nbf": issued_at,
        "exp": math.ceil(now + lifetime),  # never shorter than the advertised lifetime
        "aio": str(uuid.uuid4()),
        "appid": app.client_id,
        "appidacr": auth_method,
        "azp": app.client_id,
        "azpacr": auth_method,
        "idp": issuer,
        "idtyp": "app",
        "oid": app.object_id,
        "sub": app.object_id,
        "tid": tenant.id,
        "uti": uuid.uuid4().hex,
        "jti": str(uuid.uuid4()),
        "ver": "2.0",
    }
    roles = app.roles_for(resource)
    if roles:
        claims["roles"] = sorted(roles)
    key = state.signing_key
    token = jwt.encode(claims, key.private_key, algorithm="RS256", headers={"kid": key.kid, "x5t": key.kid})
    state.count_issued(app.client_id, normalise_resource(resource))
    log.debug("issued token for app %s, resource %s, lifetime %ss", app.client_id, resource, lifetime)
    return {"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": token}


async def token(request: Request) -> JSONResponse:
    state = _state(request)
    with state.lock:
        state.token_requests += 1
    try:
        return JSONResponse(await _token(request, state), headers={"Cache-Control": "no-store", "Pragma": "no-cache"})
    except OAuthError as err:
        return _error_response(request, state, err)


async def _token(request: Request, state: IdentityState) -> dict[str, Any]:
    segment = request.path_params["tenant"]
    if segment.lower() in _MULTI_TENANT_ALIASES:
        raise OAuthError(
            400, "invalid_request", 50059, "No tenant-identifying information found in either the request or "
            "implied by any provided credentials.",
        )
    tenant = _resolve_tenant(state, segment)
    form = _form(await request.body())

    grant_type = form.get("grant_type")
    if not grant_type:
        raise OAuthError(400, "invalid_request", 900144, "The request body must contain the following parameter: "
                         "'grant_type'.")
    if grant_type != "client_credentials":
        raise OAuthError(400, "unsupported_grant_type", 70003, f"The app requested an unsupported grant type "
                         f"'{grant_type}'.")

    basic = _basic_credentials(request.headers.get("authorization"))
    client_id = form.get("client_id") or (basic[0] if basic else None)
    assertion = form.get("client_assertion")
    assertion_type = form.get("client_assertion_type")
    if not client_id and assertion:
        try:  # RFC 7521 §4.2: client_id may be omitted when the assertion identifies the client
            client_id = str(jwt.decode(assertion, options={"verify_signature": False}).get("iss", ""))
        except jwt.PyJWTError:
            raise OAuthError(401, "invalid_client", 50027, "JWT token is invalid or malformed.") from None
    if not client_id:
        raise OAuthError(400, "invalid_request", 900144, "The request body must contain the following parameter: "
                         "'client_id'.")
    if basic and basic[0] != client_id:
        raise OAuthError(401, "invalid_client", 7000216, "The client_id in the request body and in the "
                         "Authorization header differ.")

    app = state.seed.app(tenant.id, client_id)
    if app is None:
        raise OAuthError(
            400, "unauthorized_client", 700016,
            f"Application with identifier '{client_id}' was not found in the directory '{tenant.display_name}'. "
            "This can happen if the application has not been installed by the administrator of the tenant or "
            "consented to by any user in the tenant. You may have sent your authentication request to the wrong "
            "tenant.",
        )

    secret = form.get("client_secret")
    if secret is None and basic:
        secret = basic[1]
    if assertion is not None or assertion_type is not None:
        if secret is not None:
            raise OAuthError(401, "invalid_client", 7000216, "Only one client credential may be presented: "
                             "'client_assertion' or 'client_secret'.")
        if assertion_type != JWT_BEARER:
            raise OAuthError(401, "invalid_client", 7000219, f"'client_assertion_type' must be '{JWT_BEARER}'.")
        base = _base_url(request, state)
        if _is_federated(app, assertion or ""):
            _check_federated_assertion(state, base, state.seed.federated_credentials(app.client_id),
                                       assertion or "", state.clock())
        else:
            audiences = {
                f"{base}/{tenant.id}/oauth2/v2.0/token".lower(),
                f"{base}/{segment}/oauth2/v2.0/token".lower(),
                f"{base}/{tenant.id}/v2.0".lower(),
            }
            _check_assertion(app, assertion or "", audiences, state.clock())
        auth_method = "2"
    elif secret is not None:
        _check_secret(app, secret)
        auth_method = "1"
    else:
        raise OAuthError(401, "invalid_client", 7000216, "'client_assertion', 'client_secret' or 'request' is "
                         "required for the 'client_credentials' grant type.")

    resource = _resource_from_scope(state, form.get("scope"))
    return _issue(state, _base_url(request, state), tenant, app, resource, auth_method)


# --- the hosting platform's managed identity endpoint (App Service / Functions) -------------------------------
MANAGED_IDENTITY_API_VERSION: Final = "2019-08-01"


def _platform_error(status: int, message: str) -> JSONResponse:
    # App Service's shape (msal reads "statusCode" and "message" from any non-token answer)
    return JSONResponse({"statusCode": status, "message": message, "correlationId": str(uuid.uuid4())},
                        status_code=status)


async def managed_identity_token(request: Request) -> JSONResponse:
    """``GET {IDENTITY_ENDPOINT}?api-version=2019-08-01&resource=R[&client_id=C]`` with ``X-IDENTITY-HEADER``.

    Answers as App Service does: ``{"access_token", "expires_on" (epoch seconds, as text), "resource",
    "token_type", "client_id"}``. The token is issued by the identity's tenant (``iss`` =
    ``<authority>/<tenant>/v2.0``, ``sub`` = ``oid`` = the identity's principal id, ``aud`` = the resource).
    """
    state = _state(request)
    expected = state.seed.managed_identity_header
    presented = request.headers.get("x-identity-header")
    if expected is None:
        return _platform_error(404, "Managed identity is not enabled on this app.")
    if presented is None or not hmac.compare_digest(presented.encode(), expected.encode()):
        return _platform_error(401, "The X-IDENTITY-HEADER header is missing or invalid.")
    params = request.query_params
    if params.get("api-version") != MANAGED_IDENTITY_API_VERSION:
        return _platform_error(400, f"Unsupported api-version '{params.get('api-version')}'; use "
                                    f"'{MANAGED_IDENTITY_API_VERSION}'.")
    resource = params.get("resource", "").strip()
    if not resource:
        return _platform_error(400, "The 'resource' parameter is required.")
    selectors = [k for k in ("client_id", "object_id", "mi_res_id") if params.get(k)]
    if len(selectors) > 1:
        return _platform_error(400, "Specify at most one of client_id, object_id and mi_res_id.")
    identity: ManagedIdentity | None = None
    if params.get("client_id"):
        identity = state.seed.managed_identity(params["client_id"])
    elif params.get("object_id"):
        identity = next((m for m in state.seed.managed_identities.values()
                         if m.principal_id.lower() == params["object_id"].lower()), None)
    if identity is None:  # no system-assigned identity is modelled; a resource id can't be matched
        return _platform_error(400, "Unable to load the proper Managed Identity.")
    if not state.seed.resource_known(resource):
        return _platform_error(400, f"The resource principal named {resource} was not found in the tenant.")
    return JSONResponse(_issue_for_identity(state, _base_url(request, state), identity, resource),
                        headers={"Cache-Control": "no-store"})


def _issue_for_identity(state: IdentityState, base: str, identity: ManagedIdentity, resource: str) -> dict[str, Any]:
    now = state.clock()
    lifetime = state.token_lifetime_s
    issued_at = int(now)
    expires_on = math.ceil(now + lifetime)
    issuer = f"{base}/{identity.tenant_id}/v2.0"
    claims = {
        "aud": resource.rstrip("/"), "iss": issuer, "iat": issued_at, "nbf": issued_at, "exp": expires_on,
        "aio": str(uuid.uuid4()), "appid": identity.client_id, "appidacr": "2", "azp": identity.client_id,
        "azpacr": "2", "idp": issuer, "idtyp": "app", "oid": identity.principal_id, "sub": identity.principal_id,
        "tid": identity.tenant_id, "uti": uuid.uuid4().hex, "ver": "2.0",
    }
    key = state.signing_key
    token = jwt.encode(claims, key.private_key, algorithm="RS256", headers={"kid": key.kid, "x5t": key.kid})
    with state.lock:
        state.issued_by_identity[identity.client_id] += 1
    log.debug("issued managed identity token for %s, resource %s", identity.client_id, resource)
    return {"access_token": token, "expires_on": str(expires_on), "resource": resource, "token_type": "Bearer",
            "client_id": identity.client_id}


# --- emulator-only endpoints ------------------------------------------------------------------------------
async def health(request: Request) -> JSONResponse:
    state = _state(request)
    return JSONResponse(
        {"status": "ok", "service": "identity", "tenants": len(state.seed.tenants), "apps": len(state.seed.apps),
         "kid": state.signing_key.kid, "token_lifetime_s": state.token_lifetime_s}
    )


async def tokens_issued(request: Request) -> JSONResponse:
    state = _state(request)
    with state.lock:
        body = {
            "total": sum(state.issued_by_app.values()),
            "by_app": dict(state.issued_by_app),
            "by_app_resource": {app: dict(c) for app, c in state.issued_by_app_resource.items()},
            "by_managed_identity": dict(state.issued_by_identity),
            "requests": state.token_requests,
        }
    return JSONResponse(body)


async def reset_tokens_issued(request: Request) -> JSONResponse:
    state = _state(request)
    with state.lock:
        state.issued_by_app.clear()
        state.issued_by_app_resource.clear()
        state.issued_by_identity.clear()
        state.token_requests = 0
    return JSONResponse({"total": 0, "by_app": {}, "by_app_resource": {}, "by_managed_identity": {}, "requests": 0})


async def replace_seed(request: Request) -> JSONResponse:
    state = _state(request)
    try:
        document = await request.json()
        seed = parse_seed(document)
    except (ValueError, SeedError) as exc:
        return JSONResponse({"error": "invalid_seed", "error_description": str(exc)}, status_code=400)
    with state.lock:
        state.seed = seed
    return JSONResponse({"status": "ok", "tenants": len(seed.tenants), "apps": len(seed.apps)})


async def add_apps(request: Request) -> JSONResponse:
    """``POST /_emulator/apps`` ``{"apps": [<app as in the seed>, ...]}``: register more app registrations in the
    seeded tenants (an existing (tenant, client id) is replaced); the rest of the seed is kept."""
    state = _state(request)
    try:
        document = await request.json()
        raw_apps = document.get("apps") if isinstance(document, dict) else None
        if not isinstance(raw_apps, list):
            raise SeedError("body.apps must be a list")
        with state.lock:
            tenants = [{"id": t.id, "domains": list(t.domains), "display_name": t.display_name}
                       for t in state.seed.tenants.values()]
        added = parse_seed({"tenants": tenants, "apps": raw_apps})
    except (ValueError, SeedError) as exc:
        return JSONResponse({"error": "invalid_seed", "error_description": str(exc)}, status_code=400)
    with state.lock:
        state.seed = dataclasses.replace(state.seed, apps={**state.seed.apps, **added.apps})
        count = len(state.seed.apps)
    return JSONResponse({"status": "ok", "added": len(added.apps), "apps": count})


def create_app(config: IdentityConfig | None = None) -> Starlette:
    """The identity emulator as a Starlette app (serve it over TLS: msal only accepts https authorities)."""
    config = config or IdentityConfig()
    state = IdentityState(
        seed=parse_seed(config.seed if config.seed is not None else demo_seed()),
        signing_key=config.signing_key or SigningKey.generate(),
        default_lifetime_s=config.token_lifetime_s,
        clock=config.clock,
        public_url=config.public_url,
    )
    routes = [
        Route("/_emulator/health", health, methods=["GET"]),
        Route("/_emulator/tokens", tokens_issued, methods=["GET"]),
        Route("/_emulator/tokens", reset_tokens_issued, methods=["DELETE"]),
        Route("/_emulator/seed", replace_seed, methods=["POST"]),
        Route("/_emulator/apps", add_apps, methods=["POST"]),
        Route("/common/discovery/instance", instance_discovery, methods=["GET"]),
        Route("/{tenant}/v2.0/.well-known/openid-configuration", openid_configuration, methods=["GET"]),
        Route("/{tenant}/.well-known/openid-configuration", openid_configuration, methods=["GET"]),
        Route("/{tenant}/discovery/v2.0/keys", keys, methods=["GET"]),
        Route("/{tenant}/discovery/keys", keys, methods=["GET"]),
        Route("/{tenant}/oauth2/v2.0/token", token, methods=["POST"]),
        Route("/msi/token", managed_identity_token, methods=["GET"]),
    ]
    app = Starlette(routes=routes)
    app.state.identity = state
    return app
