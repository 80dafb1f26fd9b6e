"""Single sign-on tokens on the real services: billing (API and dashboard data) and alerts as
processes, a stand-in OIDC provider over HTTP, a real broker and PostgreSQL. A signed-in person gets
their groups' role; a project's person reads nothing of another project's, whichever the route."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gpumeter.localstack import free_port
from tests.fixtures.alerts import alerts_env
from tests.fixtures.billing import billing_process, hourly, produce_hourly
from tests.fixtures.oidc import IdentityProvider
from tests.fixtures.processes import ServiceProcess, wait_until

UTC = dt.UTC
STATIC = "static-admin-token-of-forty-characters-x"


@pytest.fixture
def services(
    idp: IdentityProvider,
    database_url: str,
    bootstrap_servers: str,
    topic_prefix: str,
    http_port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[int, int]]:
    alerts_port = free_port()
    alerts = ServiceProcess(
        "services.alerts",
        alerts_env(bootstrap_servers, database_url, topic_prefix, alerts_port, **idp.env()),
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
        API_TOKENS=f"{STATIC}=admin",
        ALERTS_URL=f"http://127.0.0.1:{alerts_port}",
        **idp.env(),
    )
    alerts.start()
    billing.start()
    yield http_port, alerts_port
    billing.stop()
    alerts.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_sign_on_tokens_read_by_role_and_never_across_projects(
    services: tuple[int, int], idp: IdentityProvider, bootstrap_servers: str, topic_prefix: str
) -> None:
    billing_port, alerts_port = services
    hour = dt.datetime(2026, 11, 12, 1, tzinfo=UTC)
    produce_hourly(
        bootstrap_servers,
        f"{topic_prefix}metering.usage.hourly.v1",
        [hourly("hkgai-llm", hour, "3600", 1), hourly("hku-vision-lab", hour, "1800", 1, "H100")],
    )
    admin = bearer(idp.token(["aisc-admins"], sub="carol"))
    finance = bearer(idp.token(["aisc-finance"], sub="dave"))
    llm = bearer(idp.token(["aisc-project-hkgai-llm"], sub="erin"))
    expired = bearer(idp.token(["aisc-admins"], exp=int(time.time()) - 120))
    with httpx.Client(base_url=f"http://127.0.0.1:{billing_port}", timeout=10) as client:
        every = wait_until(
            lambda: (
                r.json()["invoices"]
                if (r := client.get("/v1/invoices?period=2026-11", headers=finance)).status_code
                == 200
                and len(r.json()["invoices"]) == 2
                else None
            ),
            timeout_s=60,
        )
        assert {i["project_id"] for i in every} == {"hkgai-llm", "hku-vision-lab"}
        own = client.get("/v1/invoices?period=2026-11", headers=llm).json()["invoices"]
        assert [i["invoice_id"] for i in own] == ["INV-2026-11-hkgai-llm"]
        assert client.get("/v1/invoices/INV-2026-11-hkgai-llm.pdf", headers=llm).status_code == 200

        # Another project's data, by every route that reads it, and an invoice that does not
        # exist: the same refusal, so it tells nothing
        other = [
            "/v1/invoices/INV-2026-11-hku-vision-lab",
            "/v1/invoices/INV-2026-11-hku-vision-lab.csv",
            "/v1/invoices/INV-2026-11-hku-vision-lab.pdf",
            "/v1/invoices/INV-2026-10-hku-vision-lab",  # no such invoice
            "/v1/invoices?period=2026-11&project_id=hku-vision-lab",
            "/v1/projects/hku-vision-lab/usage?period=2026-11",
            "/v1/subsidy/report?period=2026-11",
            "/v1/exports/focus?period=2026-11",
            "/dashboard/api/centre?period=2026-11",
            "/dashboard/api/cap",
            "/dashboard/api/alerts",
        ]
        for path in other:
            response = client.get(path, headers=llm)
            assert response.status_code == 403, (path, response.text)
            assert response.json()["error"] == "forbidden"

        # Only admins change anything; an expired token is refused before its body is read
        assert client.post("/v1/periods/2026-11/finalize", headers=finance).status_code == 403
        put = client.put(
            "/v1/catalog", headers={**expired, "Content-Type": "application/yaml"}, content=b"x"
        )
        assert put.status_code == 401 and "expired" in put.json()["detail"]
        assert client.post("/v1/periods/2026-11/finalize", headers=admin).status_code == 200

        # The dashboard's alerts panel passes the signed-in person's token on to the alerts API
        panel = client.get("/dashboard/api/alerts", headers=finance)
        assert panel.status_code == 200, panel.text
        assert client.get("/dashboard/api/info", headers=llm).status_code == 200

    with httpx.Client(base_url=f"http://127.0.0.1:{alerts_port}", timeout=10) as client:
        assert client.get("/v1/alerts", headers=finance).status_code == 200
        assert client.get("/v1/alerts", headers=llm).status_code == 200
        assert client.get("/v1/alerts", headers=expired).status_code == 401
        no_role = bearer(idp.token(["staff"]))
        assert client.get("/v1/alerts", headers=no_role).status_code == 403
