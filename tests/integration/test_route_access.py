"""Every route of every service refuses an anonymous caller, proved by walking the services' own
OpenAPI documents against the running processes (billing, alerts, metering), with /metrics closed
(METRICS_REQUIRE_TOKEN). The route table in docs/access.md must list exactly the routes the
services serve, with the role each needs."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gpumeter.localstack import free_port
from tests.fixtures.alerts import alerts_env
from tests.fixtures.billing import billing_process
from tests.fixtures.oidc import IdentityProvider
from tests.fixtures.processes import REPO_ROOT, ServiceProcess
from tests.integration.test_metering import metering_process

ACCESS_DOC = REPO_ROOT / "docs" / "access.md"
TOKEN = "route-walk-admin-token-of-forty-chars-xx"
SAMPLE_CATALOG = REPO_ROOT / "deploy" / "catalog.sample.yaml"
PATH_VALUES = {
    "invoice_id": "INV-2026-11-hkgai-llm",
    "period": "2026-11",
    "project_id": "hkgai-llm",
}
QUERY_VALUES = {"period": "2026-11"}


def documented_routes() -> dict[tuple[str, str, str], str]:
    """(service, METHOD, path) -> role, from the route table of docs/access.md."""
    rows = re.findall(
        r"^\| (billing|alerts|metering) \| (GET|POST|PUT|PATCH|DELETE) \| `([^`]+)` \| ([^|]+) \|$",
        ACCESS_DOC.read_text(),
        flags=re.MULTILINE,
    )
    return {(service, method, path): role.strip() for service, method, path, role in rows}


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
    closed = {"API_TOKENS": f"{TOKEN}=admin", "METRICS_REQUIRE_TOKEN": "true", **idp.env()}
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


def served_routes(ports: dict[str, int]) -> set[tuple[str, str, str]]:
    routes = set()
    for service in ("billing", "alerts"):
        document = httpx.get(f"http://127.0.0.1:{ports[service]}/openapi.json", timeout=10).json()
        for path, operations in document["paths"].items():
            routes |= {(service, method.upper(), path) for method in operations}
    # Metering is a Faust app: its two pages, checked by hand below
    return routes | {("metering", "GET", "/healthz"), ("metering", "GET", "/metrics")}


def call(ports: dict[str, int], route: tuple[str, str, str], headers: dict) -> httpx.Response:
    service, method, path = route
    url = f"http://127.0.0.1:{ports[service]}" + re.sub(
        r"\{(\w+)\}", lambda m: PATH_VALUES[m.group(1)], path
    )
    return httpx.request(method, url, params=QUERY_VALUES, headers=headers, timeout=10)


def test_every_route_is_documented_and_refuses_an_anonymous_caller(
    services: dict[str, int], idp: IdentityProvider
) -> None:
    served = served_routes(services)
    documented = documented_routes()
    # The docs list every route served, and nothing that is not served
    assert served == set(documented), (
        f"undocumented: {sorted(served - set(documented))}; "
        f"documented but not served: {sorted(set(documented) - served)}"
    )
    expired = {"Authorization": f"Bearer {idp.token(['aisc-admins'], exp=int(time.time()) - 90)}"}
    callers = {
        "anonymous": {},
        "a wrong scheme": {"Authorization": f"Basic {TOKEN}"},
        "an unknown token": {"Authorization": "Bearer not-a-token-of-this-deployment"},
        "an expired sign-on token": expired,
    }
    checked = 0
    for route in sorted(served):
        if route[2] == "/healthz":
            assert call(services, route, {}).status_code in (200, 503), route
            continue
        for who, headers in callers.items():
            response = call(services, route, headers)
            assert response.status_code == 401, (route, who, response.status_code, response.text)
            assert response.headers.get("www-authenticate") == "Bearer", (route, who)
            assert TOKEN not in response.text
            checked += 1
        # and a valid token gets past authentication (whatever the route then answers)
        allowed = call(services, route, {"Authorization": f"Bearer {TOKEN}"})
        assert allowed.status_code != 401, (route, allowed.text)
    assert checked == 4 * (len(served) - 3)  # every route but the three /healthz
