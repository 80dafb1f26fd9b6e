"""Edges of the billing service that need no broker or database: tokens, record decoding, CSV."""

from __future__ import annotations

import asyncio
import secrets
from types import SimpleNamespace

import pytest
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import ValidationError

from schemas.invoice import Invoice, InvoiceLine
from services.alerts.settings import AlertsSettings
from services.billing import api
from services.billing.consumer import BadHourlyRecord, decode_hourly
from services.billing.export import invoices_csv
from services.billing.settings import BillingSettings, parse_api_tokens
from services.common import auth

GOOD = (
    b'{"project_id": "p", "gpu_model": "H800", "hour_start": "2026-11-30T23:00:00+08:00",'
    b' "gpu_seconds": "10.5", "util_gpu_seconds": "5", "energy_wh": "1", "samples": 1, "revision": 3}'
)


def test_api_tokens_are_read_from_one_variable_with_every_error_listed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("API_TOKENS", "t1=admin, t2=billing,t3=project:hkgai-llm")
    assert BillingSettings().api_tokens == {
        "t1": "admin",
        "t2": "billing",
        "t3": "project:hkgai-llm",
    }
    with pytest.raises(ValueError) as caught:
        parse_api_tokens("a=root,b,a=admin,c=admin,c=billing,d=project:")
    message = str(caught.value)
    assert "entry 1: unknown role 'root'" in message
    assert "entry 2: expected TOKEN=ROLE" in message
    assert "entry 5: token appears twice" in message
    assert "entry 6: unknown role 'project:'" in message
    assert parse_api_tokens("") == {}


def test_a_bad_api_tokens_setting_is_named_without_echoing_any_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a setting whose second entry is wrong (pydantic echoed the whole value before)
    monkeypatch.setenv("API_TOKENS", "s3cret-admin-token=admin,0ther-secret=superuser")
    with pytest.raises(ValidationError) as caught:
        BillingSettings()
    message = str(caught.value)
    assert "API_TOKENS: entry 2: unknown role 'superuser'" in message
    assert "s3cret-admin-token" not in message and "0ther-secret" not in message
    # and the same for a secret in any other setting, a database URL's password for one
    monkeypatch.setenv("API_TOKENS", "")
    monkeypatch.setenv("HTTP_PORT", "p4ssw0rd")
    with pytest.raises(ValidationError) as caught:
        BillingSettings()
    assert "http_port" in str(caught.value) and "p4ssw0rd" not in str(caught.value)


def test_every_configured_token_is_compared_whichever_matches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given three tokens, and a caller presenting the first
    tokens = {"token-one": "admin", "token-two": "billing", "token-three": "project:p"}

    def request(token: str) -> SimpleNamespace:
        return SimpleNamespace(
            app=SimpleNamespace(state=SimpleNamespace(authenticator=auth.Authenticator(tokens))),
            headers={"authorization": f"Bearer {token}"},
        )

    compared: list[bytes] = []
    real = secrets.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(a)
        return real(a, b)

    monkeypatch.setattr(auth.secrets, "compare_digest", counting)
    offered = HTTPAuthorizationCredentials(scheme="Bearer", credentials="token-one")

    # Then its role comes back after all three were compared, not only the first
    assert asyncio.run(api.principal(request("token-one"), offered)).role == "admin"  # type: ignore[arg-type]
    assert compared == [b"token-one", b"token-two", b"token-three"]
    with pytest.raises(api.ApiError):
        asyncio.run(api.principal(request("x"), offered))  # type: ignore[arg-type]


def test_hourly_records_are_decoded_to_utc_hours() -> None:
    total = decode_hourly(GOOD)
    assert total.hour_start.isoformat() == "2026-11-30T15:00:00+00:00"
    assert (str(total.gpu_seconds), total.revision) == ("10.5", 3)


@pytest.mark.parametrize(
    ("raw", "reason", "detail"),
    [
        (b"{nope", "not_json", ""),
        (b'{"project_id": "p"}', "invalid_record", "gpu_model"),
        (GOOD.replace(b"+08:00", b""), "invalid_record", "hour_start"),
        (GOOD.replace(b"23:00:00", b"23:30:00"), "invalid_record", "not on an hour"),
        (GOOD.replace(b'"10.5"', b'"-1"'), "invalid_record", "negative"),
        (GOOD.replace(b'"10.5"', b'"NaN"'), "invalid_record", "gpu_seconds"),
        (GOOD.replace(b"2026-11-30T23", b"9999-12-31T23"), "invalid_record", "outside"),
        (GOOD.replace(b"2026-11-30T23", b"1999-12-31T23"), "invalid_record", "outside"),
    ],
)
def test_bad_hourly_records_are_named(raw: bytes, reason: str, detail: str) -> None:
    with pytest.raises(BadHourlyRecord) as caught:
        decode_hourly(raw)
    assert caught.value.reason == reason
    assert detail in caught.value.detail


def test_csv_has_one_row_per_line_then_the_totals() -> None:
    invoice = Invoice(
        invoice_id="INV-2026-11-p",
        project_id="p",
        period="2026-11",
        status="draft",
        lines=[
            InvoiceLine(
                gpu_model="H800",
                gpu_hours="1.000000",
                rate_hkd="26.00",
                subsidised=True,
                amount_hkd="26.00",
            ),
            InvoiceLine(
                gpu_model="X",
                gpu_hours="0.500000",
                rate_hkd=None,
                subsidised=False,
                amount_hkd=None,
                adjustment_for_period="2026-10",
            ),
        ],
        gross_hkd="26.00",
        subsidy_hkd="18.20",
        net_hkd="7.80",
        subsidy_cap_remaining_hkd="1.80",
    )
    assert invoices_csv([invoice]).splitlines() == [
        "invoice_id,project_id,period,status,record,gpu_model,gpu_hours,rate_hkd,subsidised,amount_hkd,adjustment_for_period,document_number,credited_line,job_id",
        "INV-2026-11-p,p,2026-11,draft,line,H800,1.000000,26.00,true,26.00,,,,",
        "INV-2026-11-p,p,2026-11,draft,line,X,0.500000,,false,,2026-10,,,",
        "INV-2026-11-p,p,2026-11,draft,gross,,,,,26.00,,,,",
        "INV-2026-11-p,p,2026-11,draft,subsidy,,,,,18.20,,,,",
        "INV-2026-11-p,p,2026-11,draft,net,,,,,7.80,,,,",
    ]


@pytest.mark.parametrize("settings_class", [BillingSettings, AlertsSettings])
def test_a_service_refuses_short_or_default_tokens_unless_development_says_so(
    settings_class: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://db/gpumeter")
    monkeypatch.delenv("ALLOW_INSECURE_TOKENS", raising=False)
    strong = secrets.token_urlsafe(32)

    # A short token and a well-known default are refused, named by place and role only
    monkeypatch.setenv("API_TOKENS", f"{strong}=admin,short-tok=billing,change-me-admin=admin")
    with pytest.raises(ValidationError) as caught:
        settings_class()
    message = str(caught.value)
    assert "entry 2 (billing) has 9 characters (at least 32)" in message
    assert "entry 3 (admin) is a well-known default" in message
    assert "ALLOW_INSECURE_TOKENS=true" in message
    assert strong not in message and "short-tok" not in message

    # Long random tokens start; so do weak ones where development says so
    monkeypatch.setenv("API_TOKENS", f"{strong}=admin")
    assert settings_class().api_tokens == {strong: "admin"}
    monkeypatch.setenv("API_TOKENS", "short-tok=billing")
    monkeypatch.setenv("ALLOW_INSECURE_TOKENS", "true")
    assert settings_class().api_tokens == {"short-tok": "billing"}


def test_the_development_switch_is_announced_without_the_tokens_it_let_through(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    monkeypatch.setenv("ALLOW_INSECURE_TOKENS", "true")
    monkeypatch.setenv("API_TOKENS", "short-one=admin," + "x" * 40 + "=billing")
    settings = BillingSettings()
    with caplog.at_level(logging.WARNING):
        settings.warn_if_insecure(logging.getLogger("test"))
    assert "ALLOW_INSECURE_TOKENS is set (development only)" in caplog.text
    assert "entry 1 (admin) has 9 characters" in caplog.text
    assert "short-one" not in caplog.text
    caplog.clear()
    monkeypatch.setenv("ALLOW_INSECURE_TOKENS", "false")
    monkeypatch.setenv("API_TOKENS", "x" * 40 + "=billing")
    BillingSettings().warn_if_insecure(logging.getLogger("test"))
    assert caplog.text == ""
