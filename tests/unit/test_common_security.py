"""What every service shares about refusing callers: one answer to a refused token, settings that
cannot lock out every scrape, and Kafka secrets kept out of logs."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from services.common.auth import auth_error_response
from services.common.kafka_security import KafkaSecurity
from services.common.oidc import AuthError
from services.metering.settings import MeteringSettings

STRONG_TOKEN = "s" * 40


@pytest.mark.parametrize(
    ("status", "error", "headers"),
    [
        (401, "unauthorized", {"WWW-Authenticate": "Bearer"}),
        (403, "forbidden", {}),
        (503, "unavailable", {"Retry-After": "5"}),
    ],
)
def test_a_refused_token_gets_the_status_body_and_headers_docs_access_promises(
    status: int, error: str, headers: dict[str, str]
) -> None:
    answer = auth_error_response(AuthError(status, "why"))
    assert answer == (status, {"error": error, "detail": "why"}, headers)


def test_metrics_behind_a_token_with_no_way_to_get_one_is_refused_at_start_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for variable in ("API_TOKENS", "OIDC_ISSUER"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(ValidationError, match="METRICS_REQUIRE_TOKEN: set, but neither"):
        MeteringSettings(metrics_require_token=True)
    assert MeteringSettings(metrics_require_token=True, api_tokens=f"{STRONG_TOKEN}=admin")
    assert MeteringSettings(metrics_require_token=False)


def test_metering_announces_the_development_switch_at_start_up(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from services.metering import __main__ as metering_main

    class Started(Exception):
        pass

    def stop_before_the_broker(*args: object, **kwargs: object) -> None:
        raise Started

    monkeypatch.setenv("ALLOW_INSECURE_TOKENS", "true")
    monkeypatch.setenv("API_TOKENS", "weakling=admin")
    monkeypatch.setattr(metering_main, "ensure_topics", stop_before_the_broker)
    with caplog.at_level(logging.WARNING), pytest.raises(Started):
        metering_main.main()
    assert "ALLOW_INSECURE_TOKENS is set" in caplog.text
    assert "weakling" not in caplog.text


def test_kafka_passwords_stay_out_of_the_settings_repr() -> None:
    security = KafkaSecurity(
        protocol="SASL_SSL",
        mechanism="SCRAM-SHA-512",
        username="metering",
        password="sasl-secret",
        key_password="key-secret",
    )
    assert "metering" in repr(security)
    assert "sasl-secret" not in repr(security)
    assert "key-secret" not in repr(security)


def test_kafka_python_and_aiokafka_take_the_same_options() -> None:
    """kafka-python ignores ssl_check_hostname beside an ssl_context: the context carries it."""
    from kafka.producer.kafka import KafkaProducer

    options = KafkaSecurity(protocol="SSL", check_hostname=False).aiokafka()
    assert options["ssl_context"].check_hostname is False
    assert set(options) <= set(KafkaProducer.DEFAULT_CONFIG)
