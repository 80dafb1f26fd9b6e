"""Kafka security settings that are missing or contradict each other are refused when the settings
are read, before any client is made; no broker is needed to prove it, only a CA file to name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.common.settings import CommonSettings
from tests.fixtures.tls import TestCA


@pytest.fixture(autouse=True)
def no_kafka_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what each case passes: a KAFKA_* setting of the shell running the tests would mix in."""
    for name in [name for name in os.environ if name.startswith("KAFKA_")]:
        monkeypatch.delenv(name)


def test_missing_or_contradictory_security_settings_are_refused_at_start_up(
    tmp_path: Path,
) -> None:
    ca = TestCA(tmp_path / "ca")
    cases = [
        ({"kafka_security_protocol": "SASL_SSL"}, "KAFKA_SASL_MECHANISM: required"),
        (
            {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "PLAIN"},
            "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD: required",
        ),
        (
            {"kafka_sasl_username": "x"},
            "KAFKA_SASL_\\*: set, but KAFKA_SECURITY_PROTOCOL is PLAINTEXT",
        ),
        ({"kafka_ssl_cafile": str(ca.cert_path)}, "KAFKA_SSL_\\*: set, but"),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_cafile": str(tmp_path / "missing.pem")},
            "KAFKA_SSL_CAFILE: cannot be read",
        ),
        ({"kafka_security_protocol": "TLS"}, "kafka_security_protocol"),
    ]
    for env, message in cases:
        with pytest.raises(ValidationError, match=message):
            CommonSettings(**env)
    # The password never appears in the error
    with pytest.raises(ValidationError) as caught:
        CommonSettings(kafka_sasl_password="hunter2-secret")
    assert "hunter2-secret" not in str(caught.value)
