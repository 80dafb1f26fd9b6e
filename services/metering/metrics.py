"""Metering's Prometheus metrics (served at /metrics)."""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

RATE_WINDOW_S = 10.0


class MeteringMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.samples = Counter(
            "gpumeter_metering_samples_total",
            "Samples seen, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "gpumeter_metering_dead_letters_total",
            "Messages or events dead-lettered",
            ["reason"],
            registry=self.registry,
        )
        self.messages = Counter(
            "gpumeter_metering_messages_total", "Usage messages consumed", registry=self.registry
        )
        self.offset_gaps = Counter(
            "gpumeter_metering_usage_offset_gaps_total",
            "Usage messages the stream skipped over and never read again (offsets never seen)",
            registry=self.registry,
        )
        self.reseeks = Counter(
            "gpumeter_metering_usage_reseeks_total",
            "Times a usage partition was read again because the stream skipped offsets (past "
            "the committed one after an assignment, or within a run)",
            registry=self.registry,
        )
        self.stalls = Counter(
            "gpumeter_metering_usage_stalls_total",
            "Times a usage partition's stream stopped short of messages its consumer had already "
            "fetched, and the partition was read again from the first one not processed",
            registry=self.registry,
        )
        self.nodes_forgotten = Counter(
            "gpumeter_metering_nodes_forgotten_total",
            "Nodes silent past the retention whose state was reduced to its newest end "
            "(forgotten), or deleted after the sums' retention (deleted)",
            ["stage"],
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "gpumeter_metering_batch_seconds",
            "Time to process one batch",
            ["stage"],
            registry=self.registry,
        )
        self.event_lag = Gauge(
            "gpumeter_metering_event_lag_seconds",
            "Processing time minus newest sample time in the last batch",
            registry=self.registry,
        )
        self.hourly_updates = Counter(
            "gpumeter_metering_hourly_updates_total",
            "Hourly totals written",
            registry=self.registry,
        )
        self.nodes = Gauge(
            "gpumeter_metering_nodes", "Nodes held in state by this worker", registry=self.registry
        )
        self.consumer_lag = Gauge(
            "gpumeter_metering_consumer_lag",
            "Usage messages not yet committed, per assigned partition (highwater - committed)",
            ["partition"],
            registry=self.registry,
        )
        self.usage_partitions = Gauge(
            "gpumeter_metering_usage_partitions",
            "Usage partitions assigned to this worker (0 while it has none, e.g. before it joined)",
            registry=self.registry,
        )
        self.fetched_end_offsets = Gauge(
            "gpumeter_metering_fetched_end_offsets",
            "1 when table recovery corrects ListOffsets' end offsets by a fetch (Tansu, or a "
            "broker not known to be Apache Kafka), 0 on Apache Kafka; unset until the broker "
            "was asked",
            registry=self.registry,
        )
        self.samples_per_second = Gauge(
            "gpumeter_metering_samples_per_second",
            f"Samples counted per second over the last {RATE_WINDOW_S:g} s",
            registry=self.registry,
        )
        self._counted_total = 0
        self._counted_history: deque[tuple[float, int]] = deque()

    def record_counted(self, samples: int) -> None:
        self._counted_total += samples
        now = time.monotonic()
        self._counted_history.append((now, self._counted_total))
        while len(self._counted_history) > 2 and now - self._counted_history[1][0] > RATE_WINDOW_S:
            self._counted_history.popleft()

    def counted_rate(self) -> float:
        if not self._counted_history:
            return 0.0
        since, counted_then = self._counted_history[0]
        if len(self._counted_history) == 1:
            counted_then = 0
        elapsed = time.monotonic() - since
        return (self._counted_total - counted_then) / elapsed if elapsed > 0 else 0.0
