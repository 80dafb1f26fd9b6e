"""Bearer tokens with roles, shared by every HTTP service (billing, alerts).

API_TOKENS holds `TOKEN=ROLE` pairs separated by commas; roles are `admin`, `billing` and
`project:<id>`. A project token reads its own project only.
"""

from __future__ import annotations

import secrets

Role = str  # "admin", "billing" or "project:<id>"
ROLE_ADMIN = "admin"
ROLE_BILLING = "billing"
PROJECT_ROLE_PREFIX = "project:"


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
        if role not in (ROLE_ADMIN, ROLE_BILLING) and not (
            role.startswith(PROJECT_ROLE_PREFIX) and len(role) > len(PROJECT_ROLE_PREFIX)
        ):
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


def role_of(tokens: dict[str, Role], offered: bytes) -> Role | None:
    """The role of the token offered, or None. Every configured token is compared, each in
    constant time: where a match stopped the loop would tell a caller how far its guess got."""
    found: Role | None = None
    for token, role in tokens.items():
        if secrets.compare_digest(token.encode(), offered) and found is None:
            found = role
    return found


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
