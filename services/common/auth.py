"""Bearer tokens with roles, shared by every HTTP service (billing, alerts).

API_TOKENS holds `TOKEN=ROLE` pairs separated by commas; roles are `admin`, `billing` and
`project:<id>`. A project token reads its own project only.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.common.oidc import AuthError, OidcVerifier

Role = str  # "admin", "billing" or "project:<id>"
ROLE_ADMIN = "admin"
ROLE_BILLING = "billing"
PROJECT_ROLE_PREFIX = "project:"


def is_role(role: str) -> bool:
    """`admin`, `billing` or `project:<id>` with a non-empty id."""
    return role in (ROLE_ADMIN, ROLE_BILLING) or (
        role.startswith(PROJECT_ROLE_PREFIX) and len(role) > len(PROJECT_ROLE_PREFIX)
    )


def parse_api_tokens(text: str) -> dict[str, Role]:
    """`token1=admin,token2=billing,token3=project:hkgai-llm` -> {token: role}; lists every error."""
    tokens: dict[str, Role] = {}
    errors = []
    for index, entry in enumerate(part.strip() for part in text.split(",")):
        if not entry:
            continue
        token, separator, role = (piece.strip() for piece in entry.partition("="))
        if not separator or not token or not role:
            errors.append(f"entry {index + 1}: expected TOKEN=ROLE")
            continue
        if not is_role(role):
            errors.append(
                f"entry {index + 1}: unknown role {role!r} (admin, billing, project:<id>)"
            )
            continue
        if token in tokens:
            errors.append(f"entry {index + 1}: token appears twice")
            continue
        tokens[token] = role
    if errors:
        raise ValueError("API_TOKENS: " + "; ".join(errors))
    return tokens


@dataclass(frozen=True)
class Identity:
    """Who called: their role, and a subject for the audit trail (`token:<n>` for the n-th entry
    of API_TOKENS, which names no person; `oidc:<sub>` for a signed-in person)."""

    role: Role
    subject: str


class Authenticator:
    """One bearer check for every HTTP service: API_TOKENS first (every entry compared in constant
    time), then, where OIDC is configured, a JWT from the identity provider. Raises AuthError."""

    def __init__(self, tokens: dict[str, Role], oidc: OidcVerifier | None = None) -> None:
        self.tokens = dict(tokens)
        self.oidc = oidc
        self._subjects = {token: f"token:{n}" for n, token in enumerate(tokens, start=1)}

    async def identify(self, authorization: bytes | str | None) -> Identity:
        from services.common.oidc import AuthError

        if isinstance(authorization, str):
            authorization = authorization.encode("latin-1", "replace")
        scheme, _, offered = (authorization or b"").partition(b" ")
        offered = offered.strip()
        if scheme.lower() != b"bearer" or not offered:
            raise AuthError(401, "send Authorization: Bearer TOKEN")
        # Every configured token is compared, each in constant time: where a match stopped the
        # loop would tell a caller how far its guess got.
        token = None
        for candidate in self.tokens:
            if secrets.compare_digest(candidate.encode(), offered) and token is None:
                token = candidate
        if token is not None:
            return Identity(self.tokens[token], self._subjects[token])
        if self.oidc is not None and offered.count(b".") == 2:
            verified = await self.oidc.verify(offered.decode("ascii", "replace"))
            return Identity(verified.role, verified.subject)
        raise AuthError(401, "unknown token")


AUTH_ERROR_NAMES = {401: "unauthorized", 403: "forbidden"}
RETRY_AFTER_S = 5  # the identity provider's keys were unreachable: try again soon


def auth_error_response(exc: AuthError) -> tuple[int, dict[str, str], dict[str, str]]:
    """The HTTP answer to a refused bearer token, for every service (docs/access.md): its status,
    the `{"error", "detail"}` body, and headers: `WWW-Authenticate: Bearer` with 401,
    `Retry-After` with 503 (the identity provider unreachable)."""
    headers: dict[str, str] = {}
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    elif exc.status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    body = {"error": AUTH_ERROR_NAMES.get(exc.status, "unavailable"), "detail": exc.detail}
    return exc.status, body, headers


def project_of(role: Role) -> str | None:
    """The project a `project:<id>` role is limited to; None for roles that read every project."""
    return role.removeprefix(PROJECT_ROLE_PREFIX) if role.startswith(PROJECT_ROLE_PREFIX) else None


MIN_TOKEN_CHARS = 32
# Tokens that ship in examples and defaults (compose's and k8s' placeholders among them).
KNOWN_TOKENS = frozenset(
    {
        "change-me-admin",
        "change-me-billing",
        "change-me",
        "changeme",
        "admin",
        "billing",
        "secret",
        "password",
        "token",
        "test",
    }
)


def weak_tokens(tokens: dict[str, Role]) -> list[str]:
    """Why each weak token is weak, naming its role and place, never the token itself."""
    reasons = []
    for index, (token, role) in enumerate(tokens.items(), start=1):
        if token.lower() in KNOWN_TOKENS:
            reasons.append(f"entry {index} ({role}) is a well-known default")
        elif len(token) < MIN_TOKEN_CHARS:
            reasons.append(
                f"entry {index} ({role}) has {len(token)} characters (at least {MIN_TOKEN_CHARS})"
            )
    return reasons
