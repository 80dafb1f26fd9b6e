"""Kafka adapter: the reasons of the dead letters on gpu.usage.dlq.v1 and billing.dlq.v1.

No consumer group and no committed offsets: each partition is read from the first letter appended
within the count window (ListOffsets by timestamp), at start-up and whenever a partition appears,
and each letter is counted by its Kafka timestamp. So after a restart the window is refilled with
the letters that belong in it, and a letter older than the window is never counted again (never
re-fires a resolved alert). Only the reason, the timestamp and a short detail of each letter are
kept (letters carry up to megabytes of original bytes); the counting is ReasonWindow's (domain).
`caught_up` is true once every partition has been read up to where it ended when it was found:
before that the window is still being refilled, and the rules must not see it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from services.alerts.domain import DeadLetterSource, reason_name
from services.alerts.metrics import AlertsMetrics

log = logging.getLogger(__name__)

OFFSETS_TIMEOUT_S = 10.0
FETCH_MAX_BYTES = 8 * 1024 * 1024  # a letter is up to ~2.7 MiB (2 MiB of raw, base64)
MAX_REASON_LABELS = 64  # distinct reason label values in the metrics; more are `other`

# (source, reason, appended at, received at, detail) -> counted (inside the window)
OnLetter = Callable[[DeadLetterSource, str, datetime, datetime, str], bool]


def parse_letter(value: bytes | None) -> tuple[str, str]:
    """(reason, detail) of a dead letter; one that is not a DeadLetter object is `unreadable`."""
    try:
        letter = json.loads(value) if value else None
    except ValueError:
        letter = None
    if not isinstance(letter, dict):
        return reason_name(None), ""
    detail = letter.get("detail")
    return reason_name(letter.get("reason")), detail if isinstance(detail, str) else ""


def appended_at(record: ConsumerRecord, received_at: datetime) -> datetime:
    """The letter's Kafka timestamp (when its producer appended it); none: when it was read."""
    if record.timestamp is None or record.timestamp < 0:
        return received_at
    return datetime.fromtimestamp(record.timestamp / 1000, UTC)


class DeadLetterReader:
    def __init__(
        self,
        bootstrap_servers: str,
        sources: Mapping[str, DeadLetterSource],  # topic -> source
        window: timedelta,
        partitions_for: Callable[[str], set[int] | None],
        on_letter: OnLetter,
        metrics: AlertsMetrics,
        security: Mapping[str, Any] | None = None,
    ) -> None:
        self.sources = dict(sources)
        self.window = window
        # Discovery reads another client's metadata (one without assignments, so it knows every
        # topic): this consumer asking for a topic that does not exist yet could create it.
        self.partitions_for = partitions_for
        self.on_letter = on_letter
        self.metrics = metrics
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            fetch_max_bytes=FETCH_MAX_BYTES,
            **(security or {}),
        )
        self.assigned: set[TopicPartition] = set()
        self._targets: dict[TopicPartition, int] = {}  # where a partition ended when found
        self._reason_labels: set[str] = set()
        self.caught_up = False

    async def start(self) -> None:
        await self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop()

    async def discover(self, now: datetime) -> None:
        """Assign partitions that appeared, from the first letter within the window."""
        found = {
            TopicPartition(topic, partition)
            for topic in self.sources
            for partition in self.partitions_for(topic) or ()
        }
        new = found - self.assigned
        if not new:
            self._check_caught_up()
            return
        positions = {tp: await self.consumer.position(tp) for tp in self.assigned}
        since_ms = int((now - self.window).timestamp() * 1000)
        starts = await asyncio.wait_for(
            self.consumer.offsets_for_times(dict.fromkeys(new, since_ms)), OFFSETS_TIMEOUT_S
        )
        ends = await asyncio.wait_for(self.consumer.end_offsets(list(new)), OFFSETS_TIMEOUT_S)
        self.consumer.assign(sorted(self.assigned | new))
        for tp, position in positions.items():
            self.consumer.seek(tp, position)
        for tp in sorted(new):
            start = starts.get(tp)
            # Tansu answers a time after the last letter with offset 0 and timestamp -1
            if start is None or start.timestamp < 0:
                self.consumer.seek(tp, ends[tp])
            else:
                self.consumer.seek(tp, start.offset)
                if ends[tp] > start.offset:
                    self._targets[tp] = ends[tp]
        self.assigned |= new
        log.info(
            "reading dead letters of %s from %s",
            ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(new)),
            (now - self.window).isoformat(),
        )
        self._check_caught_up()

    def _check_caught_up(self) -> None:
        if not self._targets:
            self.caught_up = True

    async def poll(self, timeout_ms: int = 500) -> int:
        """Read one batch and count it; returns how many letters were read."""
        if not self.assigned:
            await asyncio.sleep(timeout_ms / 1000)
            return 0
        batch = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=500)
        received_at = datetime.now(UTC)
        read = 0
        for tp, records in batch.items():
            source = self.sources[tp.topic]
            for record in records:
                reason, detail = parse_letter(record.value)
                counted = self.on_letter(
                    source, reason, appended_at(record, received_at), received_at, detail
                )
                self.metrics.dead_letters_read.labels(
                    source, self._label(reason), "counted" if counted else "old"
                ).inc()
                read += 1
            target = self._targets.get(tp)
            if target is not None and records and records[-1].offset + 1 >= target:
                del self._targets[tp]
        self._check_caught_up()
        return read

    def _label(self, reason: str) -> str:
        if reason in self._reason_labels or len(self._reason_labels) < MAX_REASON_LABELS:
            self._reason_labels.add(reason)
            return reason
        return "other"
