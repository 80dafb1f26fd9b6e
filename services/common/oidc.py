"""OpenID Connect bearer tokens (JWTs signed by the centre's identity provider), beside API_TOKENS.

A token is accepted when its signature verifies with a key from the provider's JWKS, under an
asymmetric algorithm the settings allow (never `none`, never HMAC: a public key is public), and
its `iss`, `aud`, `exp` (and `nbf` where set) hold, with `OIDC_LEEWAY_S` of clock skew. The keys
are fetched once and cached; a token naming a key id the cache lacks makes one refetch (the
provider rotated its keys), at most once per `OIDC_JWKS_REFRESH_MIN_S` so that tokens with made-up
key ids cannot make gpumeter hammer the provider; the cache is also refetched after
`OIDC_JWKS_MAX_AGE_S`.

Roles come from one claim (`OIDC_ROLES_CLAIM`, `groups` by default; a dotted path such as
`realm_access.roles` reaches into an object), a string or a list of strings, mapped by
`OIDC_ROLE_MAP`: `GROUP=ROLE` pairs separated by commas, where a GROUP ending in `*` matches by
prefix and a ROLE `project:*` takes the rest of the group's name as the project, for example
`aisc-admins=admin,aisc-finance=billing,aisc-project-*=project:*`. Several matches: admin over
billing over a project; groups naming two different projects are refused (a person acting for one
project at a time, with a token for it).

PyJWT does the JOSE work (signature, algorithms, registered claims): a well-kept library, not ours.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
import jwt

from services.common.auth import PROJECT_ROLE_PREFIX, ROLE_ADMIN, ROLE_BILLING, Role, is_role

log = logging.getLogger(__name__)

# Asymmetric signatures only: an HMAC algorithm here would let anyone holding the provider's public
# key (everyone) sign tokens with it.
ASYMMETRIC_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)


def check_algorithms(algorithms: tuple[str, ...]) -> tuple[str, ...]:
    """OIDC_ALGORITHMS as given, or ValueError naming each one not asymmetric."""
    bad = [a for a in algorithms if a not in ASYMMETRIC_ALGORITHMS]
    if bad:
        raise ValueError(
            f"OIDC_ALGORITHMS: {', '.join(bad)} not accepted; asymmetric only "
            f"({', '.join(ASYMMETRIC_ALGORITHMS)})"
        )
    return algorithms


class AuthError(Exception):
    """A bearer token refused: `status` 401 (not a valid token), 403 (valid, but no role here) or
    503 (the identity provider's keys could not be fetched). `detail` names no secret."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def parse_role_map(text: str) -> dict[str, Role]:
    """`aisc-admins=admin,aisc-project-*=project:*` -> {group pattern: role}; lists every error."""
    mapping: dict[str, Role] = {}
    errors = []
    for index, entry in enumerate(part.strip() for part in text.split(",")):
        if not entry:
            continue
        group, separator, role = (piece.strip() for piece in entry.partition("="))
        if not separator or not group or not role:
            errors.append(f"entry {index + 1}: expected GROUP=ROLE")
            continue
        if not is_role(role):
            errors.append(
                f"entry {index + 1}: unknown role {role!r} (admin, billing, project:<id>)"
            )
            continue
        if role == PROJECT_ROLE_PREFIX + "*" and not group.endswith("*"):
            errors.append(f"entry {index + 1}: project:* needs a GROUP ending in *")
            continue
        mapping[group] = role
    if errors:
        raise ValueError("OIDC_ROLE_MAP: " + "; ".join(errors))
    return mapping


def roles_from(claims: dict[str, Any], claim: str, role_map: dict[str, Role]) -> set[Role]:
    value: Any = claims
    for part in claim.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    groups = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    roles: set[Role] = set()
    for group in (g for g in groups if isinstance(g, str)):
        for pattern, role in role_map.items():
            if pattern.endswith("*"):
                prefix = pattern[:-1]
                rest = group[len(prefix) :]
                if group.startswith(prefix) and rest:
                    roles.add(
                        PROJECT_ROLE_PREFIX + rest if role == PROJECT_ROLE_PREFIX + "*" else role
                    )
            elif group == pattern:
                roles.add(role)
    return roles


def strongest_role(roles: set[Role]) -> Role | None:
    if ROLE_ADMIN in roles:
        return ROLE_ADMIN
    if ROLE_BILLING in roles:
        return ROLE_BILLING
    projects = sorted(r for r in roles if r.startswith(PROJECT_ROLE_PREFIX))
    if len(projects) > 1:
        raise AuthError(403, "the token's groups name several projects; use a token for one")
    return projects[0] if projects else None


@dataclass(frozen=True)
class OidcConfig:
    issuer: str
    audience: str
    jwks_url: str
    roles_claim: str = "groups"
    role_map: dict[str, Role] | None = None
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    leeway_s: float = 30.0
    jwks_refresh_min_s: float = 30.0
    jwks_max_age_s: float = 3600.0
    fetch_timeout_s: float = 5.0


@dataclass(frozen=True)
class Verified:
    role: Role
    subject: str


class OidcVerifier:
    def __init__(self, config: OidcConfig) -> None:
        check_algorithms(config.algorithms)
        self.config = config
        # Each key is bound to one algorithm: the "alg" its JWK names, else its type's default
        # (RS256 for RSA, ES256 for P-256); jwt.decode refuses a token naming another.
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()
        self._jwks_url = config.jwks_url
        self._discovery: dict[str, Any] | None = None

    async def _discovery_document(self, client: httpx.AsyncClient) -> dict[str, Any]:
        if self._discovery is None:
            url = self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
            response = await client.get(url)
            response.raise_for_status()
            document = response.json()
            if not isinstance(document, dict) or document.get("issuer") != self.config.issuer:
                raise ValueError(f"{url} names another issuer")
            self._discovery = document
        return self._discovery

    async def sign_in_endpoints(self) -> dict[str, str]:
        """The provider's authorization and token endpoints, for the dashboard's sign-in."""
        try:
            async with httpx.AsyncClient(timeout=self.config.fetch_timeout_s) as client:
                document = await self._discovery_document(client)
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("identity provider discovery failed (%s): %s", self.config.issuer, exc)
            raise AuthError(503, "the identity provider cannot be reached") from None
        endpoints = {
            key: document[key]
            for key in ("authorization_endpoint", "token_endpoint", "end_session_endpoint")
            if isinstance(document.get(key), str)
        }
        if "authorization_endpoint" not in endpoints or "token_endpoint" not in endpoints:
            raise AuthError(503, "the identity provider names no authorization or token endpoint")
        return endpoints

    async def _discover(self, client: httpx.AsyncClient) -> str:
        """The issuer's `jwks_uri`, from its OpenID configuration document."""
        document = await self._discovery_document(client)
        url = self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise ValueError(f"{url} has no jwks_uri")
        return jwks_uri

    async def _fetch(self) -> None:
        try:
            async with httpx.AsyncClient(timeout=self.config.fetch_timeout_s) as client:
                if not self._jwks_url:
                    self._jwks_url = await self._discover(client)
                response = await client.get(self._jwks_url)
                response.raise_for_status()
                document = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            log.warning(
                "identity provider keys unavailable (%s): %s",
                self._jwks_url or self.config.issuer,
                exc,
            )
            raise AuthError(503, "the identity provider's signing keys are unavailable") from None
        keys: dict[str, jwt.PyJWK] = {}
        for entry in document.get("keys", []) if isinstance(document, dict) else []:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(entry)
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as exc:
                log.info("JWKS key %r skipped: %s", entry.get("kid"), exc)
                continue
            keys[str(entry.get("kid", ""))] = key
        self._keys = keys
        self._fetched_at = time.monotonic()
        log.info("identity provider keys fetched: %d (%s)", len(keys), ", ".join(sorted(keys)))

    async def _key(self, kid: str) -> jwt.PyJWK:
        async with self._lock:
            now = time.monotonic()
            stale = self._fetched_at is None or now - self._fetched_at >= self.config.jwks_max_age_s
            unknown = kid not in self._keys
            may_refresh = (
                self._fetched_at is None or now - self._fetched_at >= self.config.jwks_refresh_min_s
            )
            if stale or (unknown and may_refresh):
                await self._fetch()
        key = self._keys.get(kid)
        if key is None:
            raise AuthError(401, "the token's signing key is unknown")
        return key

    async def verify(self, token: str) -> Verified:
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, TypeError, ValueError):
            raise AuthError(401, "not a valid bearer token") from None
        alg = header.get("alg")
        if alg not in self.config.algorithms:
            raise AuthError(401, f"the token's algorithm {str(alg)[:16]!r} is not accepted")
        kid = str(header.get("kid", ""))
        key = await self._key(kid)
        try:
            # The PyJWK itself, not key.key: PyJWT then verifies with the key's own algorithm and
            # refuses a header naming another (an ES256 header on an RSA key among them).
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.config.audience,
                issuer=self.config.issuer,
                leeway=self.config.leeway_s,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError(401, "the token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise AuthError(401, "the token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError(401, "the token is from another issuer") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError(401, "the token's algorithm does not match its key") from None
        except (jwt.PyJWTError, TypeError, ValueError) as exc:
            # ValueError and TypeError (binascii.Error among them): a malformed token or key that
            # the JOSE library did not wrap in its own error; the caller's fault, never a 500.
            raise AuthError(401, f"the token does not verify ({type(exc).__name__})") from None
        role = strongest_role(
            roles_from(claims, self.config.roles_claim, self.config.role_map or {})
        )
        if role is None:
            raise AuthError(403, f"the token's {self.config.roles_claim} give no gpumeter role")
        return Verified(role, f"oidc:{claims['sub']}")
