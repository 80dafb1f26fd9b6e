"""OpenID Connect bearer tokens against a stand-in provider over real HTTP (keys made here): one
valid token per role, and every kind of forgery or misuse refused with the status it deserves."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import time
from typing import Any

import pytest
from pydantic import ValidationError

from services.billing.settings import BillingSettings
from services.common import oidc
from services.common.auth import Authenticator, Identity
from services.common.oidc import AuthError, OidcConfig, OidcVerifier, parse_role_map
from tests.fixtures.oidc import AUDIENCE, ROLE_MAP, IdentityProvider


def verifier(idp: IdentityProvider, **overrides: Any) -> OidcVerifier:
    config = {
        "issuer": idp.issuer,
        "audience": AUDIENCE,
        "jwks_url": idp.jwks_url,
        "role_map": parse_role_map(ROLE_MAP),
        "jwks_refresh_min_s": 0.0,
        **overrides,
    }
    return OidcVerifier(OidcConfig(**config))


def identify(authenticator: Authenticator, token: str) -> Identity:
    return asyncio.run(authenticator.identify(f"Bearer {token}"))


def refused(authenticator: Authenticator, token: str) -> AuthError:
    with pytest.raises(AuthError) as caught:
        identify(authenticator, token)
    return caught.value


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """header.claims.signature; with no signature, header.claims. (the trailing dot kept)."""
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}.{b64(signature)}"


def test_a_valid_token_gives_the_role_its_groups_map_to(idp: IdentityProvider) -> None:
    auth = Authenticator({}, verifier(idp))
    assert identify(auth, idp.token(["aisc-admins"])) == Identity("admin", "oidc:alice")
    assert identify(auth, idp.token(["aisc-finance"], sub="bob")).role == "billing"
    assert (
        identify(auth, idp.token(["staff", "aisc-project-hkgai-llm"])).role == "project:hkgai-llm"
    )
    # admin over billing over a project; a single string claim counts as one group
    assert identify(auth, idp.token(["aisc-project-x", "aisc-finance"])).role == "billing"
    assert identify(auth, idp.token("aisc-admins")).role == "admin"
    # An elliptic-curve key signs as well
    idp.add_key("ec-1", "ES256")
    assert identify(auth, idp.token(["aisc-finance"], kid="ec-1", alg="ES256")).role == "billing"


def test_a_nested_claim_such_as_keycloaks_realm_roles_can_carry_the_groups(
    idp: IdentityProvider,
) -> None:
    auth = Authenticator({}, verifier(idp, roles_claim="realm_access.roles"))
    token = idp.token(None, realm_access={"roles": ["aisc-admins"]})
    assert identify(auth, token).role == "admin"


@pytest.mark.parametrize(
    ("case", "status", "detail"),
    [
        ("expired", 401, "expired"),
        ("not yet valid", 401, "not valid yet"),
        ("wrong audience", 401, "another audience"),
        ("wrong issuer", 401, "another issuer"),
        ("no expiry", 401, "does not verify"),
        ("unknown kid", 401, "signing key is unknown"),
        ("alg none", 401, "algorithm"),
        ("HS256 with the public key", 401, "algorithm"),
        ("tampered claims", 401, "does not verify"),
        ("no groups", 403, "no gpumeter role"),
        ("unmapped groups", 403, "no gpumeter role"),
        ("two projects", 403, "several projects"),
        ("garbage", 401, "unknown token"),
        ("three garbage parts", 401, "not a valid bearer token"),
    ],
)
def test_a_bad_token_is_refused_with_its_reason(
    idp: IdentityProvider, case: str, status: int, detail: str
) -> None:
    auth = Authenticator({}, verifier(idp, leeway_s=5.0))
    now = int(time.time())
    claims = {"iss": idp.issuer, "aud": AUDIENCE, "sub": "mallory", "groups": ["aisc-admins"]}
    claims |= {"iat": now, "exp": now + 300}
    if case == "expired":
        token = idp.token(["aisc-admins"], exp=now - 60)
    elif case == "not yet valid":
        token = idp.token(["aisc-admins"], nbf=now + 120)
    elif case == "wrong audience":
        token = idp.token(["aisc-admins"], aud="another-service")
    elif case == "wrong issuer":
        token = idp.token(["aisc-admins"], iss="https://evil.example")
    elif case == "no expiry":
        token = idp.token(["aisc-admins"], exp=None)
    elif case == "unknown kid":
        idp.add_key("never-published", publish=False)
        token = idp.token(["aisc-admins"], kid="never-published")
    elif case == "alg none":
        token = handmade({"alg": "none", "kid": "rsa-1"}, claims)
    elif case == "HS256 with the public key":
        # The classic confusion: a verifier that lets the token pick HS256 would check this HMAC
        # with the RSA public key as the secret, and everyone has the public key.
        signing_input = handmade({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}, claims)[:-1]
        signature = hmac.new(idp.public_pem("rsa-1"), signing_input.encode(), hashlib.sha256)
        token = signing_input + "." + b64(signature.digest())
    elif case == "tampered claims":
        header, _, signature = idp.token(["aisc-project-a"]).split(".")
        token = f"{header}.{b64(json.dumps(claims).encode())}.{signature}"
    elif case == "no groups":
        token = idp.token(None)
    elif case == "unmapped groups":
        token = idp.token(["staff", "aisc-project-"])
    elif case == "two projects":
        token = idp.token(["aisc-project-a", "aisc-project-b"])
    elif case == "garbage":
        token = "not-a-jwt"
    else:
        token = "a.b.c"
    error = refused(auth, token)
    assert (error.status, detail in error.detail) == (status, True), error.detail
    assert token not in error.detail


def test_keys_are_cached_and_fetched_again_when_the_provider_rotates_them(
    idp: IdentityProvider,
) -> None:
    oidc = verifier(idp)
    auth = Authenticator({}, oidc)

    async def run() -> list[int]:
        fetches = []
        await auth.identify(f"Bearer {idp.token(['aisc-admins'])}")
        await auth.identify(f"Bearer {idp.token(['aisc-admins'])}")
        fetches.append(idp.jwks_hits)  # once for both
        idp.add_key("rsa-2")  # the provider rotates: a new key, published
        who = await auth.identify(f"Bearer {idp.token(['aisc-finance'], kid='rsa-2')}")
        assert who.role == "billing"
        fetches.append(idp.jwks_hits)  # fetched again for the unknown kid
        await auth.identify(f"Bearer {idp.token(['aisc-finance'], kid='rsa-2')}")
        fetches.append(idp.jwks_hits)
        return fetches

    assert asyncio.run(run()) == [1, 2, 2]


def test_made_up_key_ids_cannot_make_gpumeter_hammer_the_provider(idp: IdentityProvider) -> None:
    auth = Authenticator({}, verifier(idp, jwks_refresh_min_s=60.0))
    idp.add_key("unpublished", publish=False)

    async def run() -> int:
        await auth.identify(f"Bearer {idp.token(['aisc-admins'])}")
        for _ in range(20):
            with pytest.raises(AuthError):
                await auth.identify(f"Bearer {idp.token(['aisc-admins'], kid='unpublished')}")
        return idp.jwks_hits

    assert asyncio.run(run()) == 1


def test_the_keys_are_found_through_the_issuers_discovery_document(idp: IdentityProvider) -> None:
    auth = Authenticator({}, verifier(idp, jwks_url=""))
    assert identify(auth, idp.token(["aisc-admins"])).role == "admin"
    assert (idp.discovery_hits, idp.jwks_hits) == (1, 1)


def test_an_unreachable_provider_answers_503_not_401(idp: IdentityProvider) -> None:
    auth = Authenticator({}, verifier(idp, jwks_url=idp.issuer + "/missing"))
    assert refused(auth, idp.token(["aisc-admins"])).status == 503


def test_static_tokens_work_beside_oidc_and_name_their_entry(idp: IdentityProvider) -> None:
    auth = Authenticator({"a" * 40: "admin", "b" * 40: "project:p1"}, verifier(idp))
    assert identify(auth, "b" * 40) == Identity("project:p1", "token:2")
    assert refused(auth, "c" * 40).status == 401
    # No OIDC configured: a JWT is just an unknown token
    assert refused(Authenticator({}), idp.token(["aisc-admins"])).detail == "unknown token"


def test_oidc_settings_are_checked_at_start_up(
    idp: IdentityProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ALLOW_INSECURE_TOKENS", raising=False)
    monkeypatch.setenv("DATABASE_URL", "postgresql://localhost/x")
    monkeypatch.setenv("OIDC_ISSUER", idp.issuer)
    with pytest.raises(ValidationError, match="OIDC_AUDIENCE: required"):
        BillingSettings()
    monkeypatch.setenv("OIDC_AUDIENCE", AUDIENCE)
    with pytest.raises(ValidationError, match="OIDC_ROLE_MAP: required"):
        BillingSettings()
    monkeypatch.setenv("OIDC_ROLE_MAP", "aisc-admins=root")
    with pytest.raises(ValidationError, match="unknown role 'root'"):
        BillingSettings()
    monkeypatch.setenv("OIDC_ROLE_MAP", ROLE_MAP)
    monkeypatch.setenv("OIDC_ALGORITHMS", "RS256,HS256")
    with pytest.raises(ValidationError, match="HS256 not accepted; asymmetric only"):
        BillingSettings()
    monkeypatch.setenv("OIDC_ALGORITHMS", "RS256")
    monkeypatch.setenv("OIDC_ISSUER", "http://idp.example.org/realms/aisc")
    with pytest.raises(ValidationError, match="OIDC_ISSUER: https:// required"):
        BillingSettings()
    monkeypatch.setenv("OIDC_ISSUER", idp.issuer)  # http to 127.0.0.1 is fine
    auth = BillingSettings().authenticator()
    assert identify(auth, idp.token(["aisc-project-p9"])).role == "project:p9"


def test_a_token_must_use_the_algorithm_its_key_declares(idp: IdentityProvider) -> None:
    """A key published for RS256 does not verify an RS384 token, though both are allowed."""
    idp.declared_alg["rsa-1"] = "RS256"
    auth = Authenticator({}, verifier(idp, algorithms=("RS256", "RS384")))
    assert identify(auth, idp.token(["aisc-admins"])).role == "admin"
    error = refused(auth, idp.token(["aisc-admins"], alg="RS384"))
    assert (error.status, error.detail) == (401, "the token's algorithm does not match its key")


def test_a_token_naming_another_key_types_algorithm_is_refused_not_a_crash(
    idp: IdentityProvider,
) -> None:
    """An ES256 header on an RSA key's id: 401, never the key library's TypeError (a 500)."""
    auth = Authenticator({}, verifier(idp))  # RS256 and ES256 allowed; rsa-1 names no alg
    idp.add_key("ec-1", "ES256", publish=False)
    forged = idp.token(["aisc-admins"], kid="ec-1", alg="ES256")
    header, claims, signature = forged.split(".")
    rsa_header = b64(json.dumps({"alg": "ES256", "kid": "rsa-1", "typ": "JWT"}).encode())
    error = refused(auth, f"{rsa_header}.{claims}.{signature}")
    assert (error.status, error.detail) == (401, "the token's algorithm does not match its key")
    # The same key, naming no alg in its JWKS entry, still verifies its own RS256 tokens.
    assert "rsa-1" not in idp.declared_alg
    assert identify(auth, idp.token(["aisc-admins"])).role == "admin"


@pytest.mark.parametrize(
    "error", [TypeError("Expecting a PEM-formatted key."), binascii.Error("Incorrect padding")]
)
def test_any_error_the_jose_library_lets_through_is_a_401(
    idp: IdentityProvider, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    """Not only PyJWTError: whatever else decoding a hostile token raises is the caller's fault."""

    def decode(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise error

    auth = Authenticator({}, verifier(idp))
    monkeypatch.setattr(oidc.jwt, "decode", decode)
    error_seen = refused(auth, idp.token(["aisc-admins"]))
    assert (error_seen.status, error_seen.detail) == (
        401,
        f"the token does not verify ({type(error).__name__})",
    )
