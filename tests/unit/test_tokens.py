"""TokenValidator (emulators/common/tokens.py) against tokens signed like the identity emulator signs them."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest

from emulators.common.tokens import AccessToken, InvalidToken, TokenValidator
from emulators.identity.keys import SigningKey

IDENTITY = "https://127.0.0.1:9999"
TENANT = "c0ffee00-0000-4000-8000-000000000001"
GRAPH = "https://graph.microsoft.com"
NOW = 1_700_000_000.0


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture(scope="module")
def other_key() -> SigningKey:
    return SigningKey.generate()


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_token(key: SigningKey, *, kid: str | None = None, alg: str = "RS256", **overrides: Any) -> str:
    claims: dict[str, Any] = {
        "aud": GRAPH, "iss": f"{IDENTITY}/{TENANT}/v2.0", "tid": TENANT, "appid": "app-1", "azp": "app-1",
        "oid": "sp-1", "roles": ["Mail.Send", "Mail.ReadWrite"], "iat": int(NOW), "nbf": int(NOW),
        "exp": int(NOW) + 60, "ver": "2.0",
    }
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key.private_key, algorithm=alg, headers={"kid": kid or key.kid, "x5t": kid or key.kid})


def validator(key: SigningKey, clock: Clock, **kw: Any) -> TokenValidator:
    kw.setdefault("audiences", [GRAPH])
    return TokenValidator(identity_url=IDENTITY, jwks={"keys": [key.jwk()]}, clock=clock, **kw)


def test_valid_token_yields_identity_and_roles(key: SigningKey) -> None:
    token = make_token(key)
    result = validator(key, Clock(), tenant_id=TENANT).validate(f"Bearer {token}")
    assert isinstance(result, AccessToken)
    assert (result.app_id, result.tenant_id, result.object_id, result.audience) == ("app-1", TENANT, "sp-1", GRAPH)
    assert result.roles == frozenset({"Mail.Send", "Mail.ReadWrite"})
    assert result.claims["ver"] == "2.0"


def test_token_without_roles_has_empty_roles(key: SigningKey) -> None:
    result = validator(key, Clock()).validate(f"Bearer {make_token(key, roles=None)}")
    assert result.roles == frozenset()


def test_bearer_scheme_is_case_insensitive(key: SigningKey) -> None:
    assert validator(key, Clock()).validate(f"bearer {make_token(key)}").app_id == "app-1"


@pytest.mark.parametrize(
    ("header", "reason"),
    [(None, "missing token"), ("", "missing token"), ("Basic abc", "malformed authorization header"),
     ("Bearer", "malformed authorization header"), ("Bearer not-a-jwt", "malformed token")],
)
def test_missing_or_malformed_header(key: SigningKey, header: str | None, reason: str) -> None:
    with pytest.raises(InvalidToken) as info:
        validator(key, Clock()).validate(header)
    assert info.value.reason == reason


def test_expired_token_rejected_and_expiry_rechecked_on_cached_tokens(key: SigningKey) -> None:
    clock = Clock()
    v = validator(key, clock)
    token = make_token(key, exp=int(NOW) + 1)
    assert v.validate(f"Bearer {token}").app_id == "app-1"  # now cached
    clock.now = NOW + 1
    with pytest.raises(InvalidToken) as info:
        v.validate(f"Bearer {token}")
    assert info.value.reason == "expired"


def test_leeway_tolerates_small_clock_skew(key: SigningKey) -> None:
    clock = Clock(NOW + 61)
    token = make_token(key)
    assert validator(key, clock, leeway_s=5).validate(f"Bearer {token}").app_id == "app-1"
    with pytest.raises(InvalidToken, match="expired"):
        validator(key, clock).validate(f"Bearer {token}")


def test_not_yet_valid(key: SigningKey) -> None:
    with pytest.raises(InvalidToken) as info:
        validator(key, Clock()).validate(f"Bearer {make_token(key, nbf=int(NOW) + 30)}")
    assert info.value.reason == "not yet valid"


def test_wrong_audience(key: SigningKey) -> None:
    token = make_token(key, aud="https://127.0.0.1:8443")
    with pytest.raises(InvalidToken) as info:
        validator(key, Clock()).validate(f"Bearer {token}")
    assert info.value.reason == "wrong audience"


def test_audience_compared_without_trailing_slash_or_case(key: SigningKey) -> None:
    token = make_token(key, aud="https://127.0.0.1:8443/")
    v = validator(key, Clock(), audiences=["HTTPS://127.0.0.1:8443"])
    assert v.validate(f"Bearer {token}").audience == "https://127.0.0.1:8443/"


def test_wrong_tenant(key: SigningKey) -> None:
    other = "c0ffee00-0000-4000-8000-00000000ffff"
    token = make_token(key, tid=other, iss=f"{IDENTITY}/{other}/v2.0")
    assert validator(key, Clock()).validate(f"Bearer {token}").tenant_id == other  # no tenant pinned
    with pytest.raises(InvalidToken) as info:
        validator(key, Clock(), tenant_id=TENANT).validate(f"Bearer {token}")
    assert info.value.reason == "wrong tenant"


def test_issuer_must_be_the_identity_url_and_match_tid(key: SigningKey) -> None:
    for iss in ("https://login.microsoftonline.com/" + TENANT + "/v2.0", f"{IDENTITY}/other-tenant/v2.0"):
        with pytest.raises(InvalidToken) as info:
            validator(key, Clock()).validate(f"Bearer {make_token(key, iss=iss)}")
        assert info.value.reason == "wrong issuer"


def test_tampered_payload_rejected(key: SigningKey) -> None:
    header, payload, signature = make_token(key).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["roles"] = ["Mail.ReadWrite", "Mail.Send", "Directory.ReadWrite.All"]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidToken) as info:
        validator(key, Clock()).validate(f"Bearer {header}.{forged}.{signature}")
    assert info.value.reason == "bad signature"


def test_token_signed_by_another_key_with_our_kid_rejected(key: SigningKey, other_key: SigningKey) -> None:
    token = make_token(other_key, kid=key.kid)
    with pytest.raises(InvalidToken) as info:
        validator(key, Clock()).validate(f"Bearer {token}")
    assert info.value.reason == "bad signature"


def test_unknown_kid_rejected_with_static_jwks(key: SigningKey, other_key: SigningKey) -> None:
    with pytest.raises(InvalidToken) as info:
        validator(key, Clock()).validate(f"Bearer {make_token(other_key)}")
    assert info.value.reason == "unknown signing key"


def test_symmetric_and_unsigned_tokens_rejected(key: SigningKey) -> None:
    claims = {"aud": GRAPH, "iss": f"{IDENTITY}/{TENANT}/v2.0", "tid": TENANT, "appid": "x", "exp": NOW + 60}
    hs = jwt.encode(claims, "x" * 32, algorithm="HS256", headers={"kid": key.kid})
    none = jwt.encode(claims, None, algorithm="none", headers={"kid": key.kid})
    for token in (hs, none):
        with pytest.raises(InvalidToken) as info:
            validator(key, Clock()).validate(f"Bearer {token}")
        assert info.value.reason == "unsupported algorithm"


def test_token_without_app_id_rejected(key: SigningKey) -> None:
    with pytest.raises(InvalidToken, match="malformed token"):
        validator(key, Clock()).validate(f"Bearer {make_token(key, appid=None, azp=None)}")


def test_cached_validation_is_not_fooled_by_a_different_validator(key: SigningKey) -> None:
    """The per-token cache belongs to one validator: another audience set must re-check."""
    token = make_token(key)
    assert validator(key, Clock()).validate(f"Bearer {token}").app_id == "app-1"
    with pytest.raises(InvalidToken, match="wrong audience"):
        validator(key, Clock(), audiences=["https://127.0.0.1:8443"]).validate(f"Bearer {token}")


def test_jwks_fetch_failure_is_an_invalid_token_not_a_crash(key: SigningKey) -> None:
    # nothing listens on port 9 of loopback; the validator must answer "keys unavailable", not raise httpx errors
    v = TokenValidator(identity_url="https://127.0.0.1:9", audiences=[GRAPH], clock=Clock())
    with pytest.raises(InvalidToken) as info:
        v.validate(f"Bearer {make_token(key)}")
    assert info.value.reason == "signing keys unavailable"
    # immediately again: no second fetch (it would fail the same way), same answer
    with pytest.raises(InvalidToken) as info:
        v.validate(f"Bearer {make_token(key)}")
    assert info.value.reason == "signing keys unavailable"


def test_many_validations_use_the_cache(key: SigningKey, monkeypatch: pytest.MonkeyPatch) -> None:
    v = validator(key, Clock(time.time()))
    token = make_token(key, iat=int(time.time()), nbf=int(time.time()), exp=int(time.time()) + 600)
    v.validate(f"Bearer {token}")
    calls = 0
    real_decode = jwt.decode

    def counting_decode(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting_decode)
    for _ in range(1000):
        v.validate(f"Bearer {token}")
    assert calls == 0
