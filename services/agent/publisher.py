"""Delivery to Kafka with kafka-python: one CloudEvents batch per node per round, keyed by node."""

from __future__ import annotations

import json
import logging
from typing import Any

from kafka import KafkaProducer
from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger(__name__)


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.samples_sent = Counter(
            "gpumeter_agent_samples_sent_total",
            "Samples acknowledged by the broker",
            registry=self.registry,
        )
        self.samples_failed = Counter(
            "gpumeter_agent_samples_failed_total",
            "Samples whose send failed",
            ["reason"],
            registry=self.registry,
        )
        self.rounds = Counter(
            "gpumeter_agent_rounds_total", "Sampling rounds", registry=self.registry
        )


class Publisher:
    def __init__(self, bootstrap_servers: str, topic: str, metrics: AgentMetrics) -> None:
        self.topic = topic
        self.metrics = metrics
        self.producer = KafkaProducer(
            bootstrap_servers=bootstrap_servers.split(","),
            acks="all",
            enable_idempotence=True,
            linger_ms=20,
            retries=2**31 - 1,
            max_in_flight_requests_per_connection=5,
        )

    def publish(self, per_node: dict[str, list[dict[str, Any]]]) -> None:
        for node, events in per_node.items():
            count = len(events)
            future = self.producer.send(
                self.topic, key=node.encode(), value=json.dumps(events).encode()
            )
            future.add_callback(lambda _meta, n=count: self.metrics.samples_sent.inc(n))
            future.add_errback(lambda exc, n=count: self._failed(exc, n))

    def _failed(self, exc: Exception, count: int) -> None:
        self.metrics.samples_failed.labels(type(exc).__name__).inc(count)
        log.error("send failed for %d samples: %s", count, exc)

    def flush(self, timeout_s: float | None = None) -> None:
        self.producer.flush(timeout_s)

    def close(self) -> None:
        self.producer.flush()
        self.producer.close()
