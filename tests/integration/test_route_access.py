"""Every route of every service refuses an anonymous caller, proved by walking the services' own
OpenAPI documents against the running processes (billing, alerts, metering), with /metrics closed
(METRICS_REQUIRE_TOKEN). The route table in docs/access.md must list exactly the routes the
services serve, with the role each needs: every route is called with a token of each role, a
static one (API_TOKENS) and a signed-in person's (OIDC), and must refuse exactly the roles the
table does not name."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpumeter.localstack import free_port
from tests.fixtures.alerts import alerts_env
from tests.fixtures.billing import billing_process
from tests.fixtures.metering import metering_process
from tests.fixtures.oidc import IdentityProvider
from tests.fixtures.processes import REPO_ROOT, ServiceProcess

ACCESS_DOC = REPO_ROOT / "docs" / "access.md"
PROJECT, OTHER_PROJECT = "hkgai-llm", "hku-vision-lab"  # both in the sample catalog
# One static token per role; the admin's is also the token the refusals must never echo.
TOKENS = {
    "admin": "route-walk-admin-token-of-forty-chars-xx",
    "billing": "route-walk-billing-token-of-forty-chars-",
    f"project:{PROJECT}": "route-walk-own-project-token-forty-chars",
    f"project:{OTHER_PROJECT}": "route-walk-other-project-token-forty-chr",
}
TOKEN = TOKENS["admin"]
# The groups that give a signed-in person each role (tests/fixtures/oidc.py's OIDC_ROLE_MAP).
GROUPS = {
    "admin": ["aisc-admins"],
    "billing": ["aisc-finance"],
    f"project:{PROJECT}": [f"aisc-project-{PROJECT}"],
    f"project:{OTHER_PROJECT}": [f"aisc-project-{OTHER_PROJECT}"],
}
# Every request names PROJECT wherever a route takes a project: its path or its query.
PATH_VALUES = {
    "invoice_id": f"INV-2026-11-{PROJECT}",
    "credit_note_id": f"CN-INV-2026-11-{PROJECT}-1",
    "period": "2026-11",
    "project_id": PROJECT,
}
QUERY_VALUES = {"period": "2026-11", "project_id": PROJECT}
# parameters that name the project asked for
PROJECT_PARAMETERS = {"invoice_id", "project_id", "credit_note_id"}

Route = tuple[str, str, str]  # (service, METHOD, path)


def documented_routes() -> dict[Route, str]:
    """(service, METHOD, path) -> role, from the route table of docs/access.md."""
    rows = re.findall(
        r"^\| (billing|alerts|metering) \| (GET|POST|PUT|PATCH|DELETE) \| `([^`]+)` \| ([^|]+) \|$",
        ACCESS_DOC.read_text(),
        flags=re.MULTILINE,
    )
    return {(service, method, path): role.strip() for service, method, path, role in rows}


def allowed_roles(route: Route, text: str) -> tuple[set[str], bool] | None:
    """What the table's role column lets call `route`: None for an open route; else the roles
    (`project` for any project's) and whether a project's caller is held to its own project."""
    if text == "open":
        return None
    if text == "open, or any with `METRICS_REQUIRE_TOKEN`":
        return {"admin", "billing", "project"}, False  # these services set METRICS_REQUIRE_TOKEN
    if found := re.fullmatch(r"any(?: \(a project: [^)]+\))?", text):
        return {"admin", "billing", "project"}, "(a project:" in found.group(0)
    roles = {role.strip() for role in text.split(",")}
    assert roles <= {"admin", "billing"}, f"docs/access.md, {route}: role {text!r} not understood"
    return roles, False


def expected_allowed(role: str, allowed: tuple[set[str], bool], names_project: bool) -> bool:
    roles, own_only = allowed
    if not role.startswith("project:"):
        return role in roles
    # another project's caller is refused where the request names a project, not where the
    # route only narrows what it shows (an alerts list: that project's alerts only)
    return "project" in roles and (role == f"project:{PROJECT}" or not (own_only and names_project))


@pytest.fixture
def services(
    idp: IdentityProvider,
    database_url: str,
    bootstrap_servers: str,
    topic_prefix: str,
    http_port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[dict[str, int]]:
    closed = {
        "API_TOKENS": ",".join(f"{token}={role}" for role, token in TOKENS.items()),
        "METRICS_REQUIRE_TOKEN": "true",
        **idp.env(),
    }
    alerts_port = free_port()
    alerts = ServiceProcess(
        "services.alerts",
        alerts_env(bootstrap_servers, database_url, topic_prefix, alerts_port, **closed),
        tmp_path / "alerts.log",
        http_port=alerts_port,
    )
    billing = billing_process(
        bootstrap_servers,
        database_url,
        topic_prefix,
        http_port,
        tmp_path / "billing.log",
        monkeypatch,
        **closed,
    )
    metering = metering_process(
        bootstrap_servers, topic_prefix, tmp_path / "metering.log", env=closed
    )
    started = [alerts.start(), billing.start(), metering.start()]
    yield {"billing": http_port, "alerts": alerts_port, "metering": metering.http_port}
    for service in started:
        service.stop()


def served_routes(ports: dict[str, int]) -> dict[Route, dict[str, Any]]:
    """Each route served -> its OpenAPI operation."""
    routes = {}
    for service in ("billing", "alerts"):
        document = httpx.get(f"http://127.0.0.1:{ports[service]}/openapi.json", timeout=10).json()
        for path, operations in document["paths"].items():
            for method, operation in operations.items():
                routes[(service, method.upper(), path)] = operation
    # Metering is a Faust app: its two pages, checked by hand below
    return routes | {("metering", "GET", "/healthz"): {}, ("metering", "GET", "/metrics"): {}}


def call(ports: dict[str, int], route: Route, headers: dict, body: Any = None) -> httpx.Response:
    service, method, path = route
    url = f"http://127.0.0.1:{ports[service]}" + re.sub(
        r"\{(\w+)\}", lambda m: PATH_VALUES[m.group(1)], path
    )
    return httpx.request(method, url, params=QUERY_VALUES, headers=headers, json=body, timeout=10)


def test_every_route_is_documented_and_refuses_an_anonymous_caller(
    services: dict[str, int], idp: IdentityProvider
) -> None:
    served = served_routes(services)
    documented = documented_routes()
    # The docs list every route served, and nothing that is not served
    assert set(served) == set(documented), (
        f"undocumented: {sorted(set(served) - set(documented))}; "
        f"documented but not served: {sorted(set(documented) - set(served))}"
    )
    expired = {"Authorization": f"Bearer {idp.token(['aisc-admins'], exp=int(time.time()) - 90)}"}
    callers = {
        "anonymous": {},
        "a wrong scheme": {"Authorization": f"Basic {TOKEN}"},
        "an unknown token": {"Authorization": "Bearer not-a-token-of-this-deployment"},
        "an expired sign-on token": expired,
    }
    for route in sorted(served):
        if documented[route] == "open":
            assert call(services, route, {}).status_code in (200, 503), route
            continue
        for who, headers in callers.items():
            response = call(services, route, headers)
            assert response.status_code == 401, (route, who, response.status_code, response.text)
            assert response.headers.get("www-authenticate") == "Bearer", (route, who)
            assert TOKEN not in response.text


def test_every_route_refuses_exactly_the_roles_the_table_does_not_name(
    services: dict[str, int], idp: IdentityProvider
) -> None:
    served = served_routes(services)
    documented = documented_routes()
    assert set(served) == set(documented)  # proved, with what differs, by the test above
    admin = {"Authorization": f"Bearer {TOKEN}"}
    billing = f"http://127.0.0.1:{services['billing']}"
    # A request body that is valid, so that a handler gets to check the role (a bad one is a 4xx
    # for every role): the catalog as it is, applied again unchanged; a credit note for an
    # invoice that does not exist (404 for an admin).
    catalog = httpx.get(f"{billing}/v1/catalog", headers=admin, timeout=10).raise_for_status()
    bodies = {
        ("billing", "PUT", "/v1/catalog"): catalog.json(),
        ("billing", "POST", "/v1/invoices/{invoice_id}/credit-notes"): {"reason": "route walk"},
    }
    callers = {
        f"{role} ({kind})": (role, {"Authorization": f"Bearer {token}"})
        for role in TOKENS
        for kind, token in (
            ("API_TOKENS", TOKENS[role]),
            ("OIDC", idp.token(GROUPS[role], sub=f"route-walk-{role}")),
        )
    }
    for route in sorted(served):
        operation = served[route]
        assert "requestBody" not in operation or route in bodies, f"{route}: give it a body"
        allowed = allowed_roles(route, documented[route])
        parameters = {parameter["name"] for parameter in operation.get("parameters", [])}
        names_project = bool(parameters & PROJECT_PARAMETERS)
        for who, (role, headers) in callers.items():
            response = call(services, route, headers, bodies.get(route))
            answer = (route, who, response.status_code, response.text[:300])
            if allowed is None or expected_allowed(role, allowed, names_project):
                assert response.status_code not in (401, 403), answer
            else:
                assert response.status_code == 403, answer
                assert TOKENS[role] not in response.text
