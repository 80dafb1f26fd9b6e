"""Delivery to Kafka with kafka-python, through the on-disk spool.

The sampling loop only ever writes to the spool (`Delivery.submit`), so a slow or absent broker never
delays a sample. One sender thread takes the spool's oldest records (up to `BATCH_ROUNDS` rounds),
joins each node's events of those rounds into one CloudEvents batch per node (split where it would
pass `MAX_MESSAGE_BYTES`), keyed by the node id, and sends them with acks=all, an idempotent,
gzip-compressing producer. A record is removed only once every message holding its events was
acknowledged. After a failure it discards the producer and starts over from the oldest
unacknowledged record: a sample may go out twice (same CloudEvents id, dropped by metering) but
never out of order and never not at all.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from kafka import KafkaProducer
from kafka.errors import KafkaError, MessageSizeTooLargeError
from prometheus_client import CollectorRegistry, Counter, Gauge

from schemas.usage import MAX_MESSAGE_BYTES as USAGE_MAX_MESSAGE_BYTES
from services.agent.spool import Spool, SpoolCorrupt, SpoolRecord

log = logging.getLogger(__name__)

# Rounds per send. A failure re-sends at most this many rounds of a GPU that may have arrived
# already; metering recognises a re-delivery among each GPU's newest 32 ids
# (RECENT_IDS_PER_GPU in services/metering/domain.py), so one batch never repeats more.
BATCH_ROUNDS = 32
# Half of what metering accepts as one message (1 MiB, docs/contracts.md §1) and of the broker's
# default message.max.bytes, measured before compression.
MAX_MESSAGE_BYTES = USAGE_MAX_MESSAGE_BYTES // 2
# Spool bytes read per send: bounds the agent's memory; under kafka-python 2.x's default 32 MiB
# buffer_memory, so send() never waits for space there (3.x has no such bound).
BATCH_BYTES = 16 * 1024 * 1024


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


def kafka_producer_factory(
    bootstrap_servers: str,
    timeout_ms: int,
    compression: str | None = "gzip",
    security: dict[str, Any] | None = None,
) -> Callable[[], Producer]:
    """An idempotent, acks=all producer whose every wait is bounded by `timeout_ms`.

    gzip (zlib, in C) shrinks the JSON about 20x before kafka-python computes each batch's
    CRC-32C, which it does in pure Python unless the optional crc32c package is installed: on
    uncompressed batches that checksum was most of the agent's CPU per sample."""

    def create() -> Producer:
        producer: Producer = KafkaProducer(
            bootstrap_servers=bootstrap_servers.split(","),
            acks="all",
            enable_idempotence=True,
            compression_type=compression,
            batch_size=MAX_MESSAGE_BYTES,  # a partition's joined messages of one send travel together
            linger_ms=5,
            max_in_flight_requests_per_connection=5,
            request_timeout_ms=timeout_ms,
            delivery_timeout_ms=timeout_ms + 1000,
            max_block_ms=timeout_ms,
            bootstrap_timeout_ms=timeout_ms,
            reconnect_backoff_max_ms=1000,
            **(security or {}),  # TLS and SASL: KafkaSecurity.aiokafka()
        )
        return producer

    return create


@dataclass(frozen=True)
class Message:
    """One Kafka message: a node's events of the records `first`..`last` (indexes in the send)."""

    key: str
    value: bytes
    first: int
    last: int


class _Joining:
    def __init__(self, key: str, first: int) -> None:
        self.key = key
        self.first = self.last = first
        self.parts: list[bytes] = []
        self.size = 2  # the brackets

    def joined_size(self, value: bytes) -> int:
        return self.size + len(value) - 2 + (1 if self.parts else 0)

    def add(self, value: bytes, index: int) -> None:
        self.size = self.joined_size(value)
        self.parts.append(value[1:-1])
        self.last = index

    def message(self) -> Message:
        return Message(self.key, b"[" + b",".join(self.parts) + b"]", self.first, self.last)


def coalesce(records: list[SpoolRecord], max_message_bytes: int) -> list[Message]:
    """Each node's events of consecutive records joined into one CloudEvents batch, in spool
    order, a new message wherever the next round would pass `max_message_bytes` (a round larger
    than that goes alone). Values are spliced as bytes, never parsed: each is a JSON array.
    Sorted by first record, so waiting in send order finds the acknowledged prefix."""
    joining: dict[str, _Joining] = {}
    messages: list[Message] = []
    for index, record in enumerate(records):
        for key, value in record.messages:
            if len(value) <= 2:  # "[]": no events
                continue
            current = joining.get(key)
            if current is not None and current.joined_size(value) > max_message_bytes:
                messages.append(current.message())
                current = None
            if current is None:
                current = joining[key] = _Joining(key, index)
            current.add(value, index)
    messages.extend(current.message() for current in joining.values())
    messages.sort(key=lambda message: message.first)
    return messages


class Delivery:
    def __init__(
        self,
        spool: Spool,
        topic: str,
        metrics: AgentMetrics,
        producer_factory: Callable[[], Producer],
        *,
        ack_timeout_s: float = 15.0,
        batch_rounds: int = BATCH_ROUNDS,
        batch_bytes: int = BATCH_BYTES,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        backoff_s: tuple[float, float] = (0.5, 10.0),
    ) -> None:
        self.spool = spool
        self.topic = topic
        self.metrics = metrics
        self.producer_factory = producer_factory
        self.ack_timeout_s = ack_timeout_s
        self.batch_rounds = batch_rounds
        self.batch_bytes = batch_bytes
        self.max_message_bytes = max_message_bytes
        self.backoff_s = backoff_s
        self._producer: Producer | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flushing = threading.Event()  # set by close(): retry now instead of backing off
        self._thread = threading.Thread(target=self._run, name="agent-sender", daemon=True)
        self._broker_up: bool | None = None
        self._full_since: float | None = None
        self._replay: tuple[float, int] | None = None  # since the broker came back: (when, samples)
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
                records = self.spool.peek(self.batch_rounds, self.batch_bytes)
            except SpoolCorrupt as exc:
                log.error("dropping an unreadable spool record: %s", exc)
                self.spool.remove_through(exc.entry.seq)
                self.metrics.samples_dropped.labels("spool_corrupt").inc(exc.entry.samples)
                continue
            if not records:
                self._update_gauges()
                self._wake.wait(1.0)
                continue
            try:
                sent = self._send(records)
            except Exception as exc:  # the sender must outlive the unforeseen (logged in full)
                log.exception("sending failed unexpectedly; retrying from the spool")
                self._failed(exc)
                sent = False
            if sent:
                backoff = self.backoff_s[0]
            elif self._flushing.is_set():
                self._stop.wait(self.backoff_s[0])
            else:
                self._flushing.wait(backoff)
                backoff = min(backoff * 2, self.backoff_s[1])

    def _send(self, records: list[SpoolRecord]) -> bool:
        """Send the records' events, a node's consecutive rounds joined; remove the records whose
        every message was acknowledged (a prefix). False after a failure of the broker."""
        messages = coalesce(records, self.max_message_bytes)
        if not messages:  # rounds without events: nothing to send
            self.spool.remove_through(records[-1].seq)
            return True
        futures: list[Any] = []
        failure: Exception | None = None
        try:
            if self._producer is None:
                self._producer = self.producer_factory()
            producer = self._producer
            for message in messages:
                futures.append(
                    producer.send(self.topic, key=message.key.encode(), value=message.value)
                )
        except (KafkaError, OSError) as exc:  # the messages from here on were not sent
            failure = exc
        deadline = time.monotonic() + self.ack_timeout_s
        unacknowledged: Message | None = messages[len(futures)] if failure is not None else None
        for message, future in zip(messages, futures, strict=False):
            try:
                future.get(timeout=max(0.1, deadline - time.monotonic()))
            except (KafkaError, OSError) as exc:
                failure, unacknowledged = exc, message
                break
        # Every message before the first unacknowledged one was acknowledged, and messages are
        # ordered by their first record: the records before that one are wholly delivered.
        delivered = len(records) if unacknowledged is None else unacknowledged.first
        if delivered:
            self.spool.remove_through(records[delivered - 1].seq)
            self.metrics.samples_sent.inc(sum(r.samples for r in records[:delivered]))
        if isinstance(failure, MessageSizeTooLargeError) and unacknowledged is not None:
            self._too_large(unacknowledged, records, failure)
            self._update_gauges()
            self._discard_producer()
            return True  # not the broker's absence: go again at once with what is left
        self._update_gauges()
        if failure is not None:
            self._failed(failure)
            return False
        if self._broker_up is False:
            log.info(
                "broker acknowledges again; %d samples still spooled go out in order",
                self.spool.samples,
            )
            self._replay = (time.monotonic(), 0)
        if self._replay is not None:
            began, replayed = self._replay
            self._replay = (began, replayed + sum(r.samples for r in records))
            if not len(self.spool):
                took = max(time.monotonic() - began, 1e-3)
                log.info(
                    "spool drained: %d samples sent in %.1f s since the broker came back "
                    "(%.0f samples/s)",
                    self._replay[1],
                    took,
                    self._replay[1] / took,
                )
                self._replay = None
        self._broker_up = True
        self.metrics.broker_up.set(1)
        return True

    def _too_large(self, message: Message, records: list[SpoolRecord], exc: Exception) -> None:
        """A refused message of several rounds: join fewer from now on. One round of a node that
        can never go: drop its record (the other nodes' events of that round with it), counted."""
        if message.last > message.first:
            self.max_message_bytes = max(1, min(self.max_message_bytes, len(message.value)) // 2)
            log.warning(
                "broker refused a message of %d bytes as too large (%s); joining rounds into "
                "messages of at most %d bytes from now on",
                len(message.value),
                exc,
                self.max_message_bytes,
            )
        else:  # the records before it were delivered and removed: it is the oldest now
            record = records[message.first]
            log.error("broker refused record %d as too large: %s", record.seq, exc)
            self.spool.remove_through(record.seq)
            self.metrics.samples_dropped.labels("too_large").inc(record.samples)

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
