"""App-only access tokens for Microsoft Graph and Dataverse, via MSAL's client-credentials flow.

One :class:`MsalTokenProvider` per (authority, client, scope, credential) per process (see the factory
helpers): it owns one long-lived ``msal.ConfidentialClientApplication`` (whose token cache it reuses)
and keeps the current token itself, so the hot path is a comparison, not a call into msal.

- Secret, certificate or federated (managed identity) credential. A certificate is a PEM file holding the
  private key and the certificate; the certificate is handed to msal as ``public_certificate`` so msal signs
  the client assertion with the SHA-256 thumbprint (``x5t#S256``, PS256) and sends ``x5c`` (subject
  name/issuer auth works too). For AD FS authorities (``https://host/adfs``) msal itself falls back to
  SHA-1/RS256. The secret-free path: a user-assigned managed identity configured as a *federated identity
  credential* on the app registration (learn.microsoft.com/entra/workload-id/workload-identity-federation-
  config-app-trust-managed-identity). azure-identity's ``ManagedIdentityCredential`` gets the identity's
  token for ``api://AzureADTokenExchange`` from the hosting platform (App Service / Functions:
  ``IDENTITY_ENDPOINT`` + ``IDENTITY_HEADER``), and msal sends it as the client assertion
  (``client_credential={"client_assertion": callable}``, called only when msal needs a new app token).
  Works for Graph and Dataverse, cross-tenant included (a multi-tenant app redeems the assertion in the
  resource tenant).
- Instance discovery: msal validates an authority by asking ``login.microsoftonline.com`` about it.
  That only makes sense for Microsoft's own cloud hosts; for any other host (AD FS for Dynamics 365
  on-premises, a sovereign cloud msal does not list, a corporate proxy, the local identity emulator)
  the check would fail or leave the network, so it is turned off (``instance_discovery=False``). The
  tenant's OpenID configuration is still fetched from the authority itself, over TLS.
- Refresh before expiry: a token is reused until ``refresh_margin_s`` (at most half its lifetime)
  before it expires, then a new one is requested. msal treats tokens with < 5 minutes left as expired,
  so a refresh at that point really reaches the identity provider.
- Errors become :class:`AuthError` (code + the identity platform's description); no secret, assertion
  or token ever appears in a message or log line.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from kiota_abstractions.authentication import AccessTokenProvider, AllowedHostsValidator

from core.config import ClientCredential, Settings

if TYPE_CHECKING:
    import msal

__all__ = [
    "WELL_KNOWN_AUTHORITY_HOSTS",
    "AuthError",
    "CertificateCredential",
    "ManagedIdentityAssertion",
    "MsalAccessTokenProvider",
    "MsalTokenProvider",
    "dataverse_token_provider",
    "dataverse_token_providers",
    "graph_access_token_provider",
    "graph_token_provider",
]

log = logging.getLogger(__name__)

# Microsoft cloud login hosts msal's instance discovery knows (msal/authority.py WELL_KNOWN_AUTHORITY_HOSTS).
WELL_KNOWN_AUTHORITY_HOSTS: Final = frozenset(
    {
        "login.microsoftonline.com",
        "login.microsoft.com",
        "login.windows.net",
        "sts.windows.net",
        "login.chinacloudapi.cn",
        "login.partner.microsoftonline.cn",
        "login.microsoftonline.de",
        "login-us.microsoftonline.com",
        "login.microsoftonline.us",
        "login.usgovcloudapi.net",
        "login.sovcloud-identity.fr",
        "login.sovcloud-identity.de",
        "login.sovcloud-identity.sg",
    }
)
_LOOPBACK_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


class AuthError(RuntimeError):
    """A token could not be obtained. ``code`` is the OAuth error (or a local code such as
    ``authority_unreachable``); ``description`` is the identity platform's text, never a credential."""

    def __init__(self, code: str, description: str) -> None:
        super().__init__(f"{code}: {description}")
        self.code = code
        self.description = description


@dataclass(frozen=True)
class CertificateCredential:
    """A client certificate: PEM private key + PEM certificate, and its thumbprints (hex, for logs/portal)."""

    private_key_pem: str
    certificate_pem: str
    thumbprint_sha1: str
    thumbprint_sha256: str

    @classmethod
    def from_pem_file(cls, path: str | Path, passphrase: bytes | None = None) -> CertificateCredential:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization

        data = Path(path).read_bytes()
        try:
            key = serialization.load_pem_private_key(data, password=passphrase)
            cert = x509.load_pem_x509_certificate(data)
        except (ValueError, TypeError) as exc:
            # the exception text from cryptography never contains key material
            raise AuthError("invalid_certificate", f"{path} must hold a PEM private key and certificate: {exc}") \
                from None
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode("ascii")
        return cls(
            private_key_pem=key_pem,
            certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            thumbprint_sha1=cert.fingerprint(hashes.SHA1()).hex().upper(),  # noqa: S303 - the portal shows SHA-1
            thumbprint_sha256=cert.fingerprint(hashes.SHA256()).hex().upper(),
        )

    def as_msal_credential(self) -> dict[str, str]:
        return {"private_key": self.private_key_pem, "public_certificate": self.certificate_pem}


class ManagedIdentityAssertion:
    """A client assertion source for msal: the user-assigned managed identity's token for the token-exchange
    audience (``api://AzureADTokenExchange``), fetched through azure-identity from the hosting platform.

    Callable with no arguments, as msal wants. The credential is built on first call (it reads the
    platform's environment then) and caches the identity's token until shortly before it expires.
    """

    def __init__(self, client_id: str, audience: str = "api://AzureADTokenExchange") -> None:
        if not client_id:
            raise AuthError("invalid_configuration", "the managed identity's client id is required")
        self.client_id = client_id
        self.scope = f"{audience.rstrip('/')}/.default"
        self._credential: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ManagedIdentityAssertion(client_id={self.client_id!r}, scope={self.scope!r})"

    def __call__(self) -> str:
        from azure.core.exceptions import ClientAuthenticationError

        with self._lock:
            if self._credential is None:
                from azure.identity import ManagedIdentityCredential  # deferred: import cost

                self._credential = ManagedIdentityCredential(client_id=self.client_id)
            credential = self._credential
        try:
            return str(credential.get_token(self.scope).token)
        except ClientAuthenticationError as exc:  # CredentialUnavailableError derives from it
            # azure-identity's message names the platform and the reason, never a token
            raise AuthError("managed_identity_unavailable",
                            f"no token for {self.scope} from managed identity {self.client_id}: {exc.message}") \
                from None

    def close(self) -> None:
        if self._credential is not None:
            self._credential.close()


@dataclass(frozen=True)
class _CachedToken:
    value: str
    refresh_at: float  # on the provider's clock


def _needs_instance_discovery(authority: str) -> bool:
    host = (urlsplit(authority).hostname or "").lower()
    return host in WELL_KNOWN_AUTHORITY_HOSTS


class MsalTokenProvider:
    """Client-credentials tokens for one scope (``<resource>/.default``), cached and refreshed before expiry.

    ``get_token()`` is thread-safe (one msal call at a time; others wait and reuse its token);
    ``await get_token_async()`` runs msal in a worker thread and is single-flight per event loop.
    The msal application is built on first use, because building it already fetches the authority's
    OpenID configuration: constructing a provider never does I/O.
    """

    def __init__(
        self,
        *,
        client_id: str,
        authority: str,
        scope: str,
        client_secret: str | None = None,
        certificate: CertificateCredential | None = None,
        certificate_path: str | Path | None = None,
        client_assertion: Callable[[], str] | None = None,
        refresh_margin_s: float = 300.0,
        timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if certificate is None and certificate_path:
            certificate = CertificateCredential.from_pem_file(certificate_path)
        if certificate is None and not client_secret and client_assertion is None:
            raise AuthError("invalid_configuration",
                            "a client secret, a client certificate or a client assertion source is required")
        if not authority.lower().startswith("https://"):
            raise AuthError("invalid_configuration", "the authority must be an https URL")
        self.client_id = client_id
        self.authority = authority.rstrip("/")
        self.scope = scope
        self.certificate = certificate
        self.client_assertion = client_assertion
        self._secret = client_secret
        self._refresh_margin_s = refresh_margin_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._app: msal.ConfidentialClientApplication | None = None
        self._cached: _CachedToken | None = None
        self._lock = threading.Lock()
        self._inflight: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Future[str]] = (
            weakref.WeakKeyDictionary()
        )

    def __repr__(self) -> str:  # never the secret
        kind = "assertion" if self.client_assertion else "certificate" if self.certificate else "secret"
        return f"MsalTokenProvider(client_id={self.client_id!r}, authority={self.authority!r}, scope={self.scope!r}, " \
               f"credential={kind})"

    # --- public -------------------------------------------------------------------------------------------
    def get_token(self, *, claims_challenge: str | None = None) -> str:
        """A valid access token. ``claims_challenge`` (from a CAE 401) bypasses every cache."""
        if claims_challenge is None:
            cached = self._cached
            if cached is not None and self._clock() < cached.refresh_at:
                return cached.value
        with self._lock:
            if claims_challenge is None:
                cached = self._cached
                if cached is not None and self._clock() < cached.refresh_at:
                    return cached.value  # another thread refreshed while we waited
            return self._acquire(claims_challenge)

    async def get_token_async(self) -> str:
        cached = self._cached
        if cached is not None and self._clock() < cached.refresh_at:
            return cached.value
        loop = asyncio.get_running_loop()
        pending = self._inflight.get(loop)
        if pending is None or pending.done():
            pending = asyncio.ensure_future(asyncio.to_thread(self.get_token))
            self._inflight[loop] = pending
        # shield: one caller being cancelled must not cancel the fetch the others are waiting for
        return await asyncio.shield(pending)

    def invalidate(self) -> None:
        """Forget the current token (e.g. after a 401 that says it was revoked); msal's cache may still hold it."""
        self._cached = None

    # --- internals ----------------------------------------------------------------------------------------
    def _msal_app(self) -> msal.ConfidentialClientApplication:
        if self._app is None:
            import msal  # deferred: keeps `import function_app` cheap

            credential: str | dict[str, Any]
            if self.client_assertion is not None:
                credential = {"client_assertion": self.client_assertion}
            elif self.certificate is not None:
                credential = self.certificate.as_msal_credential()
            else:
                credential = self._secret or ""
            try:
                self._app = msal.ConfidentialClientApplication(
                    self.client_id,
                    client_credential=credential,
                    authority=self.authority,
                    instance_discovery=_needs_instance_discovery(self.authority),
                    timeout=self._timeout_s,
                    token_cache=msal.TokenCache(),
                )
            except ValueError as exc:  # msal's authority validation / discovery failures
                raise AuthError("invalid_authority", str(exc)) from None
            except OSError as exc:  # requests' ConnectionError/Timeout/SSLError derive from OSError
                raise AuthError("authority_unreachable", f"{type(exc).__name__} contacting {self.authority}") \
                    from None
        return self._app

    def _acquire(self, claims_challenge: str | None) -> str:
        app = self._msal_app()
        started = self._clock()
        try:
            result: dict[str, Any] = app.acquire_token_for_client(
                scopes=[self.scope], claims_challenge=claims_challenge
            )
        except OSError as exc:
            raise AuthError("authority_unreachable", f"{type(exc).__name__} contacting {self.authority}") from None
        except ValueError as exc:
            raise AuthError("invalid_response", str(exc)) from None
        if "access_token" not in result:
            code = str(result.get("error", "unknown_error"))
            description = str(result.get("error_description", "no description"))
            log.warning("token request for %s (client %s) failed: %s", self.scope, self.client_id, code)
            raise AuthError(code, description)
        expires_in = float(result.get("expires_in", 0))
        margin = min(self._refresh_margin_s, expires_in / 2)
        refresh_at = started + expires_in - margin
        if "refresh_on" in result:  # the identity provider asked for an earlier proactive refresh
            refresh_at = min(refresh_at, started + (float(result["refresh_on"]) - time.time()))
        self._cached = _CachedToken(result["access_token"], refresh_at)
        log.debug("token for %s from %s, expires in %.0fs", self.scope, result.get("token_source", "?"), expires_in)
        return str(result["access_token"])


def _decode_claims(claims: str) -> str:
    """kiota passes a CAE claims challenge base64-encoded; msal wants the JSON text."""
    try:
        return base64.b64decode(claims + "=" * (-len(claims) % 4), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return claims  # already JSON


class MsalAccessTokenProvider(AccessTokenProvider):
    """kiota ``AccessTokenProvider`` over :class:`MsalTokenProvider` for msgraph-sdk
    (``BaseBearerTokenAuthenticationProvider(MsalAccessTokenProvider(...))``).

    Tokens go only to ``allowed_hosts`` (bare host names, e.g. the Graph base URL's host): any other host
    gets ``""`` so kiota sends no Authorization header, as kiota's own Azure provider does. A token is
    never sent over plain http except to a loopback host.
    """

    def __init__(self, token_provider: MsalTokenProvider, allowed_hosts: list[str]) -> None:
        self._provider = token_provider
        self._validator = AllowedHostsValidator(allowed_hosts)

    async def get_authorization_token(
        self, uri: str, additional_authentication_context: dict[str, Any] | None = None
    ) -> str:
        if not self._validator.is_url_host_valid(uri):
            return ""
        parts = urlsplit(uri)
        if parts.scheme != "https" and (parts.hostname or "").lower() not in _LOOPBACK_HOSTS:
            raise AuthError("insecure_url", "refusing to send a bearer token over plain http")
        claims = (additional_authentication_context or {}).get("claims")
        if claims:
            return await asyncio.to_thread(self._provider.get_token, claims_challenge=_decode_claims(str(claims)))
        return await self._provider.get_token_async()

    def get_allowed_hosts_validator(self) -> AllowedHostsValidator:
        return self._validator


# --- factories (one provider per configuration per process, so the token cache is shared) -----------------
_providers: dict[tuple[str, ...], MsalTokenProvider] = {}
_providers_lock = threading.Lock()


def _credential_key(credential: ClientCredential) -> tuple[str, ...]:
    # A digest of the secret, never the secret itself: a rotated secret gets a new provider.
    if credential.managed_identity_client_id:
        return ("managed_identity", credential.managed_identity_client_id.lower(), credential.federated_audience)
    if credential.certificate_path:
        return ("certificate", credential.certificate_path)
    return ("secret", hashlib.sha256(credential.secret.encode()).hexdigest())


def _shared_provider(client_id: str, authority: str, scope: str, credential: ClientCredential) -> MsalTokenProvider:
    key = (client_id.lower(), authority.rstrip("/").lower(), scope, *_credential_key(credential))
    with _providers_lock:
        provider = _providers.get(key)
        if provider is None:
            assertion = None
            if credential.managed_identity_client_id:  # its own identity token cache: one fetch a day per API
                assertion = ManagedIdentityAssertion(credential.managed_identity_client_id,
                                                     credential.federated_audience or "api://AzureADTokenExchange")
            provider = MsalTokenProvider(
                client_id=client_id,
                authority=authority,
                scope=scope,
                client_secret=credential.secret or None,
                certificate_path=credential.certificate_path or None,
                client_assertion=assertion,
            )
            _providers[key] = provider
        return provider


def graph_token_provider(settings: Settings) -> MsalTokenProvider:
    """Tokens for Microsoft Graph (GRAPH_* settings): managed identity (federated credential) > certificate > secret."""
    return _shared_provider(settings.graph_client_id, settings.graph_authority, settings.graph_scope,
                            settings.graph_credential)


def graph_access_token_provider(settings: Settings) -> MsalAccessTokenProvider:
    """The kiota provider for msgraph-sdk; tokens only for the host of GRAPH_BASE_URL."""
    host = urlsplit(settings.graph_base_url).hostname or ""
    return MsalAccessTokenProvider(graph_token_provider(settings), allowed_hosts=[host])


def dataverse_token_provider(settings: Settings) -> MsalTokenProvider:
    """Tokens for Dataverse (DATAVERSE_* settings, falling back to the Graph app's where empty)."""
    return _shared_provider(settings.dataverse_client_id, settings.dataverse_authority, settings.dataverse_scope,
                            settings.dataverse_credential)


def dataverse_token_providers(settings: Settings) -> list[tuple[str, MsalTokenProvider]]:
    """(client id, token provider) per application user of the Dataverse pool (``DATAVERSE_CLIENT_IDS``)."""
    return [(client_id, _shared_provider(client_id, settings.dataverse_authority, settings.dataverse_scope,
                                         credential))
            for client_id, credential in settings.dataverse_app_users]
