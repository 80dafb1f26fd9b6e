"""Kafka adapter: hourly totals and hour completeness in, ledger (with dirty-project marks for the
draft drainer) and watermarks updated, offsets committed after.

At-least-once delivery plus revision-guarded upserts gives an exactly-once effect: offsets are
committed only after the database transaction that applied the batch has committed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata
from pydantic import ValidationError

from schemas.codec import dead_letter
from schemas.metering import HourCompleteness, HourlyTotal, JobHourlyTotal
from services.billing import metrics, service, store
from services.billing.background import BackgroundLoop
from services.billing.settings import BillingSettings

log = logging.getLogger(__name__)


# The hours billing takes, as UTC instants: those of the periods 2000-01 to 2999-12 in Hong Kong.
HOURS_BILLED = (
    dt.datetime(1999, 12, 31, 16, tzinfo=dt.UTC),
    dt.datetime(2999, 12, 31, 16, tzinfo=dt.UTC),
)


class BadHourlyRecord(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def refused(exc: ValidationError, reason: str) -> BadHourlyRecord:
    """A record pydantic refused: `not_json` when it is not JSON at all, else `reason`, with
    every field's problem in the detail."""
    json_broken = any(error["type"] == "json_invalid" for error in exc.errors())
    detail = "; ".join(
        f"{'.'.join(str(p) for p in error['loc']) or 'value'}: {error['msg']}"
        for error in exc.errors()
    )
    return BadHourlyRecord("not_json" if json_broken else reason, detail)


def decode_hourly(value: bytes) -> HourlyTotal:
    """One message value -> HourlyTotal, or BadHourlyRecord naming what is wrong."""
    try:
        total = HourlyTotal.model_validate_json(value)
    except ValidationError as exc:
        raise refused(exc, "invalid_record") from None
    hour = total.hour_start
    if hour.utcoffset():  # another offset: to UTC (a +00:00 instant is kept as parsed, no copy)
        hour = hour.astimezone(dt.UTC)
        total = total.model_copy(update={"hour_start": hour})
    if hour.minute or hour.second or hour.microsecond:
        raise BadHourlyRecord("invalid_record", f"hour_start {hour.isoformat()} is not on an hour")
    if not HOURS_BILLED[0] <= hour < HOURS_BILLED[1]:
        # Outside the periods the API can name (2000-01..2999-12), and near the ends of time a
        # conversion to Asia/Hong_Kong overflows: such usage could be in no invoice.
        raise BadHourlyRecord(
            "invalid_record",
            f"hour_start {hour.isoformat()} is outside the periods 2000-01..2999-12 (Hong Kong)",
        )
    if total.gpu_seconds < 0 or total.util_gpu_seconds < 0 or total.energy_wh < 0:
        raise BadHourlyRecord("invalid_record", "negative total")
    return total


def decode_job_hourly(value: bytes) -> JobHourlyTotal:
    """One metering.usage.jobs.hourly.v1 value -> JobHourlyTotal, or BadHourlyRecord."""
    try:
        total = JobHourlyTotal.model_validate_json(value)
    except ValidationError as exc:
        raise refused(exc, "invalid_job_record") from None
    hour = total.hour_start.astimezone(dt.UTC)
    if hour.minute or hour.second or hour.microsecond:
        raise BadHourlyRecord(
            "invalid_job_record", f"hour_start {hour.isoformat()} is not on an hour"
        )
    if not HOURS_BILLED[0] <= hour < HOURS_BILLED[1]:
        raise BadHourlyRecord(
            "invalid_job_record",
            f"hour_start {hour.isoformat()} is outside the periods 2000-01..2999-12 (Hong Kong)",
        )
    sums = (total.gpu_seconds, total.util_gpu_seconds, total.idle_gpu_seconds, total.energy_wh)
    if any(value < 0 for value in sums) or total.idle_gpu_seconds > total.gpu_seconds:
        raise BadHourlyRecord("invalid_job_record", "negative total, or idle beyond allocated")
    return total.model_copy(update={"hour_start": hour})


def decode_completeness(value: bytes) -> HourCompleteness:
    """One metering.completeness.v1 value -> HourCompleteness, or BadHourlyRecord."""
    try:
        record = HourCompleteness.model_validate_json(value)
    except ValidationError as exc:
        json_broken = any(error["type"] == "json_invalid" for error in exc.errors())
        raise BadHourlyRecord(
            "not_json" if json_broken else "invalid_completeness", str(exc.errors()[0]["msg"])
        ) from None
    hour = record.hour_start.astimezone(dt.UTC)
    if hour.minute or hour.second or hour.microsecond:
        raise BadHourlyRecord(
            "invalid_completeness", f"hour_start {hour.isoformat()} is not on an hour"
        )
    return record.model_copy(update={"hour_start": hour})


class HourlyConsumer(BackgroundLoop):
    task_name = "billing-hourly-consumer"

    """Reads settings.topics.hourly and settings.topics.completeness in the `billing` group until
    stop() is called."""

    def __init__(
        self,
        settings: BillingSettings,
        store_: store.Store,
        on_ledger_changed: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store_
        self.on_ledger_changed = on_ledger_changed  # wakes the draft drainer
        super().__init__()
        self.assigned = asyncio.Event()

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(
            self.settings.topics.hourly,
            self.settings.topics.completeness,
            self.settings.topics.jobs_hourly,
            group_id=self.settings.consumer_group,
            **self.settings.consumer_kwargs(),
        )
        self.dead_letters = AIOKafkaProducer(**self.settings.kafka_options(), acks="all")
        await self.dead_letters.start()
        try:
            await consumer.start()
        except BaseException:
            await self.dead_letters.stop()
            raise
        log.info(
            "consuming %s and %s as group %s",
            self.settings.topics.hourly,
            self.settings.topics.completeness,
            self.settings.consumer_group,
        )
        try:
            while not self._stopping.is_set():
                batches = await consumer.getmany(
                    timeout_ms=500, max_records=self.settings.consumer_max_records
                )
                if consumer.assignment():
                    self.assigned.set()
                if not batches:
                    continue
                await self.apply([record for records in batches.values() for record in records])
                await self.commit(consumer, batches)
        finally:
            await consumer.stop()
            await self.dead_letters.stop()

    async def dead_letter(self, record: ConsumerRecord, reason: str, detail: str) -> None:
        """A record billing cannot apply, to billing.dlq.v1 before its offset is committed: its
        usage is in no invoice, and on-call and the dashboard must see that."""
        metrics.BAD_MESSAGES.labels(reason=reason).inc()
        log.error(
            "dead-lettered %s[%d]@%d: %s: %s",
            record.topic,
            record.partition,
            record.offset,
            reason,
            detail,
        )
        letter = dead_letter(
            reason,
            detail=detail,
            raw=record.value or b"",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
        )
        await self.dead_letters.send_and_wait(
            self.settings.topics.billing_dlq,
            key=record.key,
            value=letter.model_dump_json().encode(),
        )

    async def apply(self, records: list[ConsumerRecord]) -> None:
        totals: list[HourlyTotal] = []
        total_records: list[ConsumerRecord] = []
        watermarks: list[HourCompleteness] = []
        watermark_records: list[ConsumerRecord] = []
        jobs: list[JobHourlyTotal] = []
        job_records: list[ConsumerRecord] = []
        for record in records:
            if record.value is None:
                continue  # tombstone on a compacted topic: nothing to bill
            try:
                if record.topic == self.settings.topics.completeness:
                    watermarks.append(decode_completeness(record.value))
                    watermark_records.append(record)
                elif record.topic == self.settings.topics.jobs_hourly:
                    jobs.append(decode_job_hourly(record.value))
                    job_records.append(record)
                else:
                    totals.append(decode_hourly(record.value))
                    total_records.append(record)
            except BadHourlyRecord as exc:
                await self.dead_letter(record, exc.reason, exc.detail)
        if totals:
            await self.apply_totals(totals, total_records)
        if jobs:
            try:
                await service.with_db_retry(
                    self.store,
                    lambda conn: store.upsert_job_hours(conn, jobs),
                    "upsert_job_hours",
                    self.settings.db_retry_max_backoff_s,
                )
            except asyncpg.PostgresError as exc:  # a value out of a column's range
                for record in job_records:
                    await self.dead_letter(record, "refused_by_database", repr(exc))
        if watermarks:
            try:
                await service.with_db_retry(
                    self.store,
                    lambda conn: service.apply_completeness_batch(conn, watermarks),
                    "apply_completeness_batch",
                    self.settings.db_retry_max_backoff_s,
                )
            except asyncpg.PostgresError as exc:  # a value out of a column's range
                for record in watermark_records:
                    await self.dead_letter(record, "refused_by_database", repr(exc))

    async def apply_totals(
        self, totals: list[HourlyTotal], records: list[ConsumerRecord] | None = None
    ) -> None:
        """Upsert the ledger and mark the touched projects dirty; the drainer rebuilds drafts."""
        started = time.perf_counter()
        try:
            hours_changed = await service.with_db_retry(
                self.store,
                lambda conn: service.ingest_hourly_batch(conn, totals),
                "apply_hourly_batch",
                self.settings.db_retry_max_backoff_s,
            )
        except asyncpg.PostgresError as exc:
            # A value the database refuses (say, out of a column's range) must not block the rest.
            log.warning("batch refused (%r); applying its %d records one by one", exc, len(totals))
            hours_changed = 0
            for index, total in enumerate(totals):
                try:
                    hours_changed += await service.with_db_retry(
                        self.store,
                        lambda conn, total=total: service.ingest_hourly_batch(conn, [total]),  # type: ignore[misc]
                        "apply_hourly_record",
                        self.settings.db_retry_max_backoff_s,
                    )
                except asyncpg.PostgresError as record_exc:
                    detail = f"{total.key}: {record_exc!r}"
                    if records is None:  # no Kafka record behind it (a direct call)
                        metrics.BAD_MESSAGES.labels(reason="refused_by_database").inc()
                        log.error("hourly record refused by the database: %s", detail)
                    else:
                        await self.dead_letter(records[index], "refused_by_database", detail)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        metrics.LAST_BATCH_TIMESTAMP.set(time.time())
        metrics.HOURLY_RECORDS.labels(outcome="applied").inc(hours_changed)
        metrics.HOURLY_RECORDS.labels(outcome="unchanged").inc(len(totals) - hours_changed)
        if hours_changed and self.on_ledger_changed:
            self.on_ledger_changed()

    async def commit(
        self, consumer: AIOKafkaConsumer, batches: dict[TopicPartition, list[ConsumerRecord]]
    ) -> None:
        offsets = {
            partition: OffsetAndMetadata(records[-1].offset + 1, "")
            for partition, records in batches.items()
            if records
        }
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:
            # A rebalance took the partition: its next owner re-applies the batch, which changes nothing.
            metrics.OFFSET_COMMIT_FAILURES.inc()
            log.warning("offset commit failed (%r); the batch will be delivered again", exc)
