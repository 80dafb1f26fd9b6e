"""Signing in to the dashboard with the centre's identity provider, in headless Chromium: the
authorization code flow with PKCE against a stand-in provider over HTTP, the token it returns used
for every request, and a project's person shown only their project."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.billing import billing_process, hourly, produce_hourly
from tests.fixtures.browser import dashboard_dom
from tests.fixtures.oidc import IdentityProvider
from tests.fixtures.processes import wait_until

PERIOD = "2026-11"


@pytest.fixture
def billing(
    idp: IdentityProvider,
    database_url: str,
    bootstrap_servers: str,
    topic_prefix: str,
    http_port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[int]:
    service = billing_process(
        bootstrap_servers,
        database_url,
        topic_prefix,
        http_port,
        tmp_path / "billing.log",
        monkeypatch,
        API_TOKENS="",
        **idp.env(OIDC_CLIENT_ID="gpumeter-dashboard", OIDC_AUDIENCE="gpumeter"),
    ).start()
    hourly_topic = f"{topic_prefix}metering.usage.hourly.v1"
    hour = dt.datetime(2026, 11, 12, 1, tzinfo=dt.UTC)
    produce_hourly(
        bootstrap_servers,
        hourly_topic,
        [hourly("hkgai-llm", hour, "3600", 1), hourly("hku-vision-lab", hour, "1800", 1, "H100")],
    )
    yield http_port
    service.stop()


def test_a_person_signs_in_with_sso_and_sees_what_their_groups_allow(
    billing: int, idp: IdentityProvider, tmp_path: Path
) -> None:
    base = f"http://127.0.0.1:{billing}"
    finance = {"Authorization": f"Bearer {idp.token(['aisc-finance'])}"}
    wait_until(
        lambda: (
            len(
                httpx.get(f"{base}/v1/invoices", params={"period": PERIOD}, headers=finance)
                .json()
                .get("invoices", [])
            )
            == 2
        ),
        60,
        what="two draft invoices",
    )
    # The sign-in settings are public and hold no data
    settings = httpx.get(f"{base}/dashboard/api/sign-in").json()
    assert settings["client_id"] == "gpumeter-dashboard"
    assert settings["authorization_endpoint"] == idp.issuer + "/authorize"

    # When a finance person opens the sign-in link
    idp.person = (["aisc-finance"], "dave")
    dom, address = dashboard_dom(f"{base}/dashboard?login=sso#period={PERIOD}", tmp_path / "a")
    # Then the provider was asked with PKCE, once, and the dashboard shows every project's invoice
    [request] = idp.token_requests
    assert request["grant_type"] == "authorization_code"
    assert request["client_id"] == "gpumeter-dashboard"
    assert request["redirect_uri"] == f"{base}/dashboard"
    assert len(request["code_verifier"]) >= 43
    rows = {row.attrs["data-project"] for row in dom.find("invoice-row")}
    assert rows == {"hkgai-llm", "hku-vision-lab"}
    # and the code is gone from the address bar
    assert address == f"{base}/dashboard#period={PERIOD}"
    assert not dom.one("sign-in").attrs.get("hidden")

    # When a project's person signs in, in another browser
    idp.person = (["aisc-project-hkgai-llm"], "erin")
    dom, _ = dashboard_dom(f"{base}/dashboard?login=sso#period={PERIOD}", tmp_path / "b")
    # Then only that project's invoice is shown, and whose session it is
    assert {row.attrs["data-project"] for row in dom.find("invoice-row")} == {"hkgai-llm"}
    assert dom.one("who").text == "Signed in as erin"

    # And a second visit in the first browser needs no new sign-in: the token was kept
    dom, _ = dashboard_dom(f"{base}/dashboard#period={PERIOD}", tmp_path / "a")
    assert len(idp.token_requests) == 2
    assert {row.attrs["data-project"] for row in dom.find("invoice-row")} == {
        "hkgai-llm",
        "hku-vision-lab",
    }


def test_without_sso_configured_there_is_no_sign_in_button(tmp_path: Path) -> None:
    """The sign-in settings say so when OIDC is off (a billing API without a database is enough
    for this public route)."""
    from fastapi.testclient import TestClient

    from services.billing.api import create_api
    from services.billing.settings import BillingSettings
    from services.billing.store import Store

    settings = BillingSettings(database_url="postgresql://unused/x", api_tokens={})
    with TestClient(create_api(settings, Store(settings.database_url))) as client:
        assert client.get("/dashboard/api/sign-in").json() == {"enabled": False}
