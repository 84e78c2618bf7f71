"""Bearer-token validation shared by the Graph and Dataverse emulators.

The emulators must accept exactly the tokens the local identity emulator issues and reject everything a
real resource would reject (bad signature, wrong audience/issuer/tenant, expired). They also must serve
well over 1,000 requests/s, so validation is cached twice:

- signing keys: the JWKS is fetched lazily from ``{identity_url}/common/discovery/v2.0/keys`` and the
  parsed public keys are kept; an unknown ``kid`` triggers at most one refetch per ``_REFETCH_INTERVAL_S``
  (key rollover of a restarted emulator) so a flood of forged tokens cannot turn into a flood of fetches
  (a failed fetch is retried after ~1 s: the identity emulator may simply not be up yet);
- results: a token string that validated once maps to its :class:`AccessToken`, so repeat calls cost a
  dict lookup plus an expiry comparison (expiry is re-checked on every call, never cached).
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
import jwt

__all__ = ["AccessToken", "InvalidToken", "TokenValidator"]

_REFETCH_INTERVAL_S: Final = 30.0
# The identity emulator may start after a resource emulator: retry a failed fetch soon, but not per request.
_RETRY_AFTER_FAILURE_S: Final = 1.0
_MAX_CACHED_TOKENS: Final = 50_000
_ALGORITHMS: Final = ["RS256"]


class InvalidToken(Exception):
    """The bearer token is missing or must be rejected; ``reason`` says why (safe to log, never the token)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class AccessToken:
    app_id: str
    tenant_id: str
    object_id: str
    audience: str
    roles: frozenset[str]
    claims: Mapping[str, Any] = field(repr=False)


def _normalise_url(value: str) -> str:
    return value.strip().rstrip("/").lower()


def _ssl_context(ca_bundle: str | None) -> ssl.SSLContext | bool:
    """Trust ``ca_bundle`` if given, else the bundle the environment names (as requests/httpx users expect)."""
    path = ca_bundle or os.environ.get("SSL_CERT_FILE") or os.environ.get("REQUESTS_CA_BUNDLE")
    if path:
        return ssl.create_default_context(cafile=path)
    return True


class TokenValidator:
    """Validates ``Authorization: Bearer <jwt>`` headers against the identity emulator's signing keys.

    ``audiences``: accepted ``aud`` values (compared without trailing slash, case-insensitively).
    ``tenant_id``: if given, only tokens of that tenant pass. ``jwks``: a JWKS document to use instead
    of fetching one (tests, or an emulator wired in-process). ``clock``/``leeway_s`` exist so tests can
    prove expiry handling without sleeping.
    """

    def __init__(
        self,
        *,
        identity_url: str,
        audiences: Collection[str],
        tenant_id: str | None = None,
        ca_bundle: str | None = None,
        jwks: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
        leeway_s: float = 0.0,
    ) -> None:
        self._identity_url = identity_url.rstrip("/")
        self._issuer_prefix = _normalise_url(self._identity_url) + "/"
        self._audiences = frozenset(_normalise_url(a) for a in audiences)
        self._tenant_id = tenant_id.lower() if tenant_id else None
        self._ca_bundle = ca_bundle
        self._clock = clock
        self._leeway_s = leeway_s
        self._keys: dict[str, Any] = {}
        self._keys_lock = threading.Lock()
        self._last_fetch: float | None = None
        self._last_fetch_failed = False
        self._static_jwks = jwks is not None
        if jwks is not None:
            self._keys = self._parse_jwks(jwks)
        # token string -> (validated token, exp, nbf); plain dict: single get/set are atomic under the GIL
        self._cache: dict[str, tuple[AccessToken, float, float]] = {}
        self._cache_lock = threading.Lock()

    # --- public -------------------------------------------------------------------------------------------
    def validate(self, authorization_header: str | None) -> AccessToken:
        token = self._bearer(authorization_header)
        now = self._clock()
        cached = self._cache.get(token)
        if cached is not None:
            access, exp, nbf = cached
            self._check_times(now, exp, nbf)
            return access
        access, exp, nbf = self._validate_uncached(token)
        self._check_times(now, exp, nbf)
        self._remember(token, (access, exp, nbf), now)
        return access

    # --- internals ----------------------------------------------------------------------------------------
    @staticmethod
    def _bearer(header: str | None) -> str:
        if not header:
            raise InvalidToken("missing token")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise InvalidToken("malformed authorization header")
        return token

    def _check_times(self, now: float, exp: float, nbf: float) -> None:
        if now >= exp + self._leeway_s:
            raise InvalidToken("expired")
        if now + self._leeway_s < nbf:
            raise InvalidToken("not yet valid")

    def _validate_uncached(self, token: str) -> tuple[AccessToken, float, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("malformed token") from None
        if header.get("alg") not in _ALGORITHMS:
            raise InvalidToken("unsupported algorithm")
        kid = header.get("kid") or header.get("x5t")
        if not isinstance(kid, str):
            raise InvalidToken("unknown signing key")
        key = self._key_for(kid)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=_ALGORITHMS,
                # times, audience and issuer are checked below with our clock and our normalisation
                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_aud": False,
                         "verify_iss": False},
            )
        except jwt.InvalidSignatureError:
            raise InvalidToken("bad signature") from None
        except jwt.PyJWTError:
            raise InvalidToken("malformed token") from None

        try:
            exp = float(claims["exp"])
            nbf = float(claims.get("nbf", claims.get("iat", 0)))
        except (KeyError, TypeError, ValueError):
            raise InvalidToken("malformed token") from None
        aud = claims.get("aud")
        if not isinstance(aud, str) or _normalise_url(aud) not in self._audiences:
            raise InvalidToken("wrong audience")
        tid = claims.get("tid")
        if not isinstance(tid, str) or not tid:
            raise InvalidToken("wrong tenant")
        if self._tenant_id is not None and tid.lower() != self._tenant_id:
            raise InvalidToken("wrong tenant")
        iss = claims.get("iss")
        if not isinstance(iss, str) or _normalise_url(iss) != f"{self._issuer_prefix}{tid.lower()}/v2.0":
            raise InvalidToken("wrong issuer")
        app_id = claims.get("appid") or claims.get("azp")
        if not isinstance(app_id, str) or not app_id:
            raise InvalidToken("malformed token")
        roles = claims.get("roles") or []
        if not isinstance(roles, list):
            raise InvalidToken("malformed token")
        access = AccessToken(
            app_id=app_id,
            tenant_id=tid,
            object_id=str(claims.get("oid", "")),
            audience=aud,
            roles=frozenset(str(r) for r in roles),
            claims=claims,
        )
        return access, exp, nbf

    def _key_for(self, kid: str) -> Any:
        key = self._keys.get(kid)
        if key is not None:
            return key
        if self._static_jwks:
            raise InvalidToken("unknown signing key")
        with self._keys_lock:
            key = self._keys.get(kid)
            if key is not None:  # another thread fetched while we waited
                return key
            now = time.monotonic()
            if self._last_fetch is not None:
                interval = _RETRY_AFTER_FAILURE_S if self._last_fetch_failed else _REFETCH_INTERVAL_S
                if now - self._last_fetch < interval:
                    raise InvalidToken("signing keys unavailable" if self._last_fetch_failed else "unknown signing key")
            self._last_fetch = now
            self._last_fetch_failed = True  # until the fetch below succeeds
            fetched = self._fetch_keys()
            self._last_fetch_failed = False
            self._keys = {**self._keys, **fetched}
            key = self._keys.get(kid)
        if key is None:
            raise InvalidToken("unknown signing key")
        return key

    def _fetch_keys(self) -> dict[str, Any]:
        url = f"{self._identity_url}/common/discovery/v2.0/keys"
        try:
            response = httpx.get(url, verify=_ssl_context(self._ca_bundle), timeout=10.0)
            response.raise_for_status()
            return self._parse_jwks(response.json())
        except (httpx.HTTPError, ValueError):
            raise InvalidToken("signing keys unavailable") from None

    @staticmethod
    def _parse_jwks(jwks: Mapping[str, Any]) -> dict[str, Any]:
        keys: dict[str, Any] = {}
        for entry in jwks.get("keys", []):
            if entry.get("kty") != "RSA":
                continue
            try:
                public_key = jwt.PyJWK(dict(entry), algorithm="RS256").key
            except jwt.PyJWTError:
                continue
            for name in ("kid", "x5t"):
                if isinstance(entry.get(name), str):
                    keys[entry[name]] = public_key
        return keys

    def _remember(self, token: str, entry: tuple[AccessToken, float, float], now: float) -> None:
        if len(self._cache) >= _MAX_CACHED_TOKENS:
            with self._cache_lock:
                if len(self._cache) >= _MAX_CACHED_TOKENS:
                    live = {t: e for t, e in self._cache.items() if e[1] > now}
                    if len(live) >= _MAX_CACHED_TOKENS // 2:  # mostly live tokens: drop the oldest half
                        live = dict(list(live.items())[len(live) // 2 :])
                    self._cache = live
        self._cache[token] = entry
