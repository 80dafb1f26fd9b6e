"""Delivery to Kafka with kafka-python, through the on-disk spool.

The sampling loop only ever writes to the spool (`Delivery.submit`), so a slow or absent broker never
delays a sample. One sender thread sends the spool's oldest records in order, one CloudEvents batch
per node per round keyed by the node id, with acks=all and an idempotent producer, and removes a
record only once the broker acknowledged it. After a failure it discards the producer and starts
over from the oldest unacknowledged record: a sample may go out twice (same CloudEvents id, dropped
by metering) but never out of order and never not at all.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from kafka import KafkaProducer
from kafka.errors import KafkaError, MessageSizeTooLargeError
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.agent.spool import Spool, SpoolCorrupt, SpoolRecord

log = logging.getLogger(__name__)


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.samples_sent = Counter(
            "gpumeter_agent_samples_sent_total",
            "Samples acknowledged by the broker (re-deliveries after a failure included)",
            registry=self.registry,
        )
        self.samples_spooled = Counter(
            "gpumeter_agent_samples_spooled_total",
            "Samples written to the on-disk spool (every sample passes through it)",
            registry=self.registry,
        )
        self.samples_dropped = Counter(
            "gpumeter_agent_samples_dropped_total",
            "Samples that will never be sent, by reason (spool_full, spool_corrupt, too_large)",
            ["reason"],
            registry=self.registry,
        )
        self.send_failures = Counter(
            "gpumeter_agent_send_failures_total",
            "Send attempts that failed and will be retried from the spool, by error",
            ["reason"],
            registry=self.registry,
        )
        self.read_errors = Counter(
            "gpumeter_agent_read_errors_total",
            "Sampling rounds in which a reader or allocation source failed, by source",
            ["source"],
            registry=self.registry,
        )
        self.rounds = Counter(
            "gpumeter_agent_rounds_total", "Sampling rounds", registry=self.registry
        )
        self.spool_bytes = Gauge(
            "gpumeter_agent_spool_bytes", "Bytes waiting in the spool", registry=self.registry
        )
        self.spool_samples = Gauge(
            "gpumeter_agent_spool_samples", "Samples waiting in the spool", registry=self.registry
        )
        self.spool_max_bytes = Gauge(
            "gpumeter_agent_spool_max_bytes", "The spool's bound", registry=self.registry
        )
        self.broker_up = Gauge(
            "gpumeter_agent_broker_up",
            "1 while the last send was acknowledged, 0 while the broker is unreachable",
            registry=self.registry,
        )


class Producer(Protocol):
    def send(self, topic: str, value: bytes, key: bytes) -> Any: ...

    def close(self, timeout: float | None = None) -> None: ...


def kafka_producer_factory(bootstrap_servers: str, timeout_ms: int) -> Callable[[], Producer]:
    """An idempotent, acks=all producer whose every wait is bounded by `timeout_ms`."""

    def create() -> Producer:
        producer: Producer = KafkaProducer(
            bootstrap_servers=bootstrap_servers.split(","),
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            max_in_flight_requests_per_connection=5,
            request_timeout_ms=timeout_ms,
            delivery_timeout_ms=timeout_ms + 1000,
            max_block_ms=timeout_ms,
            bootstrap_timeout_ms=timeout_ms,
            reconnect_backoff_max_ms=1000,
        )
        return producer

    return create


class Delivery:
    def __init__(
        self,
        spool: Spool,
        topic: str,
        metrics: AgentMetrics,
        producer_factory: Callable[[], Producer],
        *,
        ack_timeout_s: float = 15.0,
        batch_records: int = 64,
        backoff_s: tuple[float, float] = (0.5, 10.0),
    ) -> None:
        self.spool = spool
        self.topic = topic
        self.metrics = metrics
        self.producer_factory = producer_factory
        self.ack_timeout_s = ack_timeout_s
        self.batch_records = batch_records
        self.backoff_s = backoff_s
        self._producer: Producer | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flushing = threading.Event()  # set by close(): retry now instead of backing off
        self._thread = threading.Thread(target=self._run, name="agent-sender", daemon=True)
        self._broker_up: bool | None = None
        self._full_since: float | None = None
        metrics.spool_max_bytes.set(spool.max_bytes)
        self._update_gauges()

    @property
    def broker_up(self) -> bool | None:
        return self._broker_up

    def start(self) -> Delivery:
        self._thread.start()
        return self

    def submit(self, per_node: dict[str, list[dict[str, Any]]]) -> None:
        """Spool one round (one message per node); never waits for the broker."""
        messages = [(node, events) for node, events in per_node.items() if events]
        samples = sum(len(events) for _, events in messages)
        if messages:
            if self.spool.append(messages):
                self.metrics.samples_spooled.inc(samples)
                self._full_since = None
            else:
                self.metrics.samples_dropped.labels("spool_full").inc(samples)
                if self._full_since is None:
                    self._full_since = time.monotonic()
                    log.error(
                        "spool is full (%d bytes): keeping the oldest samples and dropping new "
                        "ones until the broker takes them",
                        self.spool.bytes,
                    )
        self._update_gauges()
        self._wake.set()

    def close(self, flush_timeout_s: float) -> bool:
        """Send what the spool holds for up to `flush_timeout_s`, then stop. True if it drained."""
        deadline = time.monotonic() + flush_timeout_s
        self._flushing.set()
        self._wake.set()
        while len(self.spool) and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.05)
        drained = len(self.spool) == 0
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(self.ack_timeout_s + 5)
        self._discard_producer()
        if not drained:
            log.warning(
                "stopping with %d samples spooled in %s; they go out on the next start",
                self.spool.samples,
                self.spool.directory,
            )
        return drained

    def _run(self) -> None:
        backoff = self.backoff_s[0]
        while not self._stop.is_set():
            self._wake.clear()
            try:
                records = self.spool.peek(self.batch_records)
            except SpoolCorrupt as exc:
                log.error("dropping an unreadable spool record: %s", exc)
                self.spool.remove_through(exc.entry.seq)
                self.metrics.samples_dropped.labels("spool_corrupt").inc(exc.entry.samples)
                continue
            if not records:
                self._update_gauges()
                self._wake.wait(1.0)
                continue
            if self._send(records):
                backoff = self.backoff_s[0]
            elif self._flushing.is_set():
                self._stop.wait(self.backoff_s[0])
            else:
                self._flushing.wait(backoff)
                backoff = min(backoff * 2, self.backoff_s[1])

    def _send(self, records: list[SpoolRecord]) -> bool:
        """Send records in order; remove the acknowledged prefix. False after any failure."""
        try:
            if self._producer is None:
                self._producer = self.producer_factory()
            producer = self._producer
            futures = [
                [
                    producer.send(self.topic, key=key.encode(), value=value)
                    for key, value in record.messages
                ]
                for record in records
            ]
        except (KafkaError, OSError) as exc:
            self._failed(exc)
            return False
        deadline = time.monotonic() + self.ack_timeout_s
        acknowledged: SpoolRecord | None = None
        sent = 0
        failure: Exception | None = None
        for record, record_futures in zip(records, futures, strict=True):
            try:
                for future in record_futures:
                    future.get(timeout=max(0.1, deadline - time.monotonic()))
            except MessageSizeTooLargeError as exc:
                if acknowledged is None:  # it can never go; do not let it block the rest
                    log.error("broker refused record %d as too large: %s", record.seq, exc)
                    self.spool.remove_through(record.seq)
                    self.metrics.samples_dropped.labels("too_large").inc(record.samples)
                failure = exc
                break
            except (KafkaError, OSError) as exc:
                failure = exc
                break
            acknowledged = record
            sent += record.samples
        if acknowledged is not None:
            self.spool.remove_through(acknowledged.seq)
            self.metrics.samples_sent.inc(sent)
        self._update_gauges()
        if failure is not None:
            self._failed(failure)
            return False
        if self._broker_up is False:
            log.info(
                "broker acknowledges again; %d samples still spooled go out in order",
                self.spool.samples,
            )
        self._broker_up = True
        self.metrics.broker_up.set(1)
        return True

    def _failed(self, exc: BaseException) -> None:
        self.metrics.send_failures.labels(type(exc).__name__).inc()
        if self._broker_up is not False:
            log.warning(
                "broker unreachable (%s: %s); spooling to %s until it is back",
                type(exc).__name__,
                exc,
                self.spool.directory,
            )
        self._broker_up = False
        self.metrics.broker_up.set(0)
        # A fresh producer after a failure: no half-expired batches or stale sequence numbers
        # that could reorder a retry; the resend starts from the oldest unacknowledged record.
        self._discard_producer()

    def _discard_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=0)
            except (KafkaError, OSError) as exc:
                log.debug("closing the producer: %s", exc)

    def _update_gauges(self) -> None:
        self.metrics.spool_bytes.set(self.spool.bytes)
        self.metrics.spool_samples.set(self.spool.samples)
