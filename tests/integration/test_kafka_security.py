"""Kafka over TLS and SASL, the way a production cluster requires it: a real Apache Kafka with SSL
and SASL_SSL listeners (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512), a CA made in the test, and each of
gpumeter's client libraries (aiokafka for billing, alerts and the admin helper; kafka-python for
the agent) configured from the same settings. A wrong CA, a wrong password and a plaintext client
are refused."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from kafka.errors import KafkaError as KafkaPythonError

from gpumeter.kafkabroker import KafkaCluster
from services.agent.publisher import kafka_producer_factory
from services.common.kafka_admin import broker_kind, ensure_topics
from services.common.settings import CommonSettings
from tests.fixtures.secure_kafka import USERS
from tests.fixtures.tls import TestCA


def settings(cluster: KafkaCluster, ca: TestCA, protocol: str, **env: str) -> CommonSettings:
    return CommonSettings(
        kafka_bootstrap_servers=cluster.secure_bootstrap_servers(
            "SASL_SSL" if protocol.startswith("SASL") else "SSL"
        ),
        kafka_security_protocol=protocol,
        kafka_ssl_cafile=str(ca.cert_path),
        **env,
    )


async def round_trip(options: dict, topic: str, admin_options: dict) -> list[bytes]:
    """Create the topic, produce two records and read them back, every client with `options`."""
    await ensure_topics(options["bootstrap_servers"], {topic: 1}, security=admin_options)
    producer = AIOKafkaProducer(**options, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"one")
        await producer.send_and_wait(topic, b"two")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic, **options, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        got: list[bytes] = []
        async with asyncio.timeout(30):
            while len(got) < 2:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    got.extend(r.value for r in records)
        return got
    finally:
        await consumer.stop()


def test_tls_alone_carries_records_and_the_broker_is_told_apart_over_it(
    secure_kafka: tuple[KafkaCluster, TestCA],
) -> None:
    cluster, ca = secure_kafka
    s = settings(cluster, ca, "SSL")
    topic = f"tls-{uuid.uuid4().hex[:6]}"
    got = asyncio.run(round_trip(s.kafka_options(), topic, s.kafka_security.aiokafka()))
    assert got == [b"one", b"two"]
    kind = asyncio.run(
        broker_kind(s.kafka_bootstrap_servers, ssl_context=s.kafka_security.ssl_context())
    )
    assert kind == "kafka"


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_over_tls_carries_records_with_each_mechanism(
    secure_kafka: tuple[KafkaCluster, TestCA], mechanism: str
) -> None:
    cluster, ca = secure_kafka
    s = settings(
        cluster,
        ca,
        "SASL_SSL",
        kafka_sasl_mechanism=mechanism,
        kafka_sasl_username="billing",
        kafka_sasl_password=USERS["billing"],
    )
    topic = f"sasl-{mechanism.lower()}-{uuid.uuid4().hex[:6]}"
    got = asyncio.run(round_trip(s.kafka_options(), topic, s.kafka_security.aiokafka()))
    assert got == [b"one", b"two"]


def test_the_agents_producer_sends_over_sasl_ssl(
    secure_kafka: tuple[KafkaCluster, TestCA],
) -> None:
    cluster, ca = secure_kafka
    s = settings(
        cluster,
        ca,
        "SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="metering",
        kafka_sasl_password=USERS["metering"],
    )
    topic = f"agent-{uuid.uuid4().hex[:6]}"
    asyncio.run(
        ensure_topics(s.kafka_bootstrap_servers, {topic: 1}, security=s.kafka_security.aiokafka())
    )
    producer = kafka_producer_factory(
        s.kafka_bootstrap_servers, 10000, security=s.kafka_security.aiokafka()
    )()
    try:
        metadata = producer.send(topic, b"sample").get(timeout=30)
    finally:
        producer.close()
    assert metadata.offset == 0


def test_a_wrong_password_a_wrong_ca_and_a_plaintext_client_are_refused(
    secure_kafka: tuple[KafkaCluster, TestCA], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cluster, ca = secure_kafka
    topic = f"refused-{uuid.uuid4().hex[:6]}"

    async def produce(options: dict) -> None:
        producer = AIOKafkaProducer(**options, request_timeout_ms=5000, acks="all")
        try:
            await producer.start()
            await producer.send_and_wait(topic, b"x")
        finally:
            await producer.stop()

    wrong_password = settings(
        cluster,
        ca,
        "SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-256",
        kafka_sasl_username="billing",
        kafka_sasl_password="not-the-password",
    )
    with pytest.raises(KafkaError):
        asyncio.run(produce(wrong_password.kafka_options()))
    # aiokafka gives up bootstrapping; why is in its log
    assert "SaslAuthenticationFailed" in caplog.text and "invalid credentials" in caplog.text
    caplog.clear()

    other_ca = TestCA(tmp_path / "other", name="another CA")
    wrong_ca = CommonSettings(
        kafka_bootstrap_servers=cluster.secure_bootstrap_servers("SSL"),
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=str(other_ca.cert_path),
    )
    with pytest.raises((KafkaError, OSError)):
        asyncio.run(produce(wrong_ca.kafka_options()))
    assert "certificate verify failed" in caplog.text

    # A client that speaks no TLS to the TLS listener gets no answer it can use
    with pytest.raises((KafkaError, OSError)):
        asyncio.run(produce({"bootstrap_servers": cluster.secure_bootstrap_servers("SSL")}))
    # and the agent's kafka-python producer with a wrong password cannot deliver
    agent = kafka_producer_factory(
        cluster.secure_bootstrap_servers("SASL_SSL"),
        3000,
        security=wrong_password.kafka_security.aiokafka(),
    )
    with pytest.raises(KafkaPythonError):
        agent().send(topic, b"x").get(timeout=10)
