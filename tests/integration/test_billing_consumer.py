"""The hourly consumer on the real broker and PostgreSQL, run in-process on the test's loop."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from gpumeter.localstack import EmbeddedPostgres
from schemas.metering import HourlyTotal
from services.billing import catalog as catalog_files
from services.billing import metrics, store
from services.billing.app import ensure_billing_topics
from services.billing.consumer import HourlyConsumer
from services.billing.drainer import DraftDrainer
from services.billing.settings import BillingSettings

UTC = dt.UTC
CATALOG = """
currency: HKD
rate_cards:
  - {gpu_model: H800, hkd_per_gpu_hour: "26.00", effective_from: 2026-01-01}
  - {gpu_model: A100, hkd_per_gpu_hour: "13.00", effective_from: 2026-01-01}
projects:
  - id: hkgai-llm
    name: LLM
    subsidy: {scheme: AISS, rate: "0.70", cap_hkd: "30000000.00", valid_from: 2026-01-01, valid_to: 2026-12-31}
"""


def hourly(
    hour: dt.datetime, gpu_seconds: str, revision: int, gpu_model: str = "H800"
) -> HourlyTotal:
    return HourlyTotal(
        project_id="hkgai-llm",
        gpu_model=gpu_model,
        hour_start=hour,
        gpu_seconds=Decimal(gpu_seconds),
        util_gpu_seconds=Decimal(gpu_seconds),
        energy_wh=Decimal("100"),
        samples=revision,
        revision=revision,
    )


async def eventually(
    check: Callable[[], Awaitable[Any]], timeout_s: float = 30.0, what: str = ""
) -> Any:
    """Poll an async predicate with a deadline (the consumer shares this loop, so no time.sleep)."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await check()
            if last:
                return last
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            last = exc
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@pytest.fixture
async def billing(
    database_url: str, bootstrap_servers: str, topic_prefix: str
) -> AsyncIterator[tuple[BillingSettings, store.Store, AIOKafkaProducer]]:
    settings = BillingSettings(
        database_url=database_url,
        kafka_bootstrap_servers=bootstrap_servers,
        topic_prefix=topic_prefix,
        kafka_rebalance_timeout_ms=3000,
        db_retry_max_backoff_s=0.5,
    )
    await store.migrate(database_url)
    await catalog_files.apply_catalog(database_url, catalog_files.parse_catalog(CATALOG))
    await ensure_billing_topics(settings)
    store_ = await store.Store(database_url).open()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers)
    await producer.start()
    yield settings, store_, producer
    await producer.stop()
    await store_.close()


class ConsumerAndDrainer:
    """The consumer (ledger and dirty marks) with the drainer that rebuilds drafts, as app.py
    wires them."""

    def __init__(self, settings: BillingSettings, store_: store.Store) -> None:
        self.drainer = DraftDrainer(settings, store_)
        self.consumer = HourlyConsumer(settings, store_, on_ledger_changed=self.drainer.wake)

    def start(self) -> ConsumerAndDrainer:
        self.drainer.start()
        self.consumer.start()
        return self

    @property
    def alive(self) -> bool:
        return self.consumer.alive and self.drainer.alive

    async def stop(self) -> None:
        await self.consumer.stop()
        await self.drainer.stop()


async def send(producer: AIOKafkaProducer, topic: str, totals: list[HourlyTotal]) -> None:
    for total in totals:
        await producer.send(topic, key=total.key.encode(), value=total.model_dump_json().encode())
    await producer.flush()


async def invoice_figures(store_: store.Store, invoice_id: str) -> tuple[str, ...] | None:
    async with store_.acquire() as conn:
        found = await store.load_invoice(conn, invoice_id)
    if found is None:
        return None
    doc = found.document()
    return (doc.gross_hkd, doc.subsidy_hkd, doc.net_hkd, *(line.gpu_hours for line in doc.lines))


async def test_consumer_turns_hourly_totals_into_exact_invoices_and_skips_bad_messages(
    billing: tuple[BillingSettings, store.Store, AIOKafkaProducer],
) -> None:
    settings, store_, producer = billing
    topic = settings.topics.hourly
    bad_before = bad_messages("not_json"), bad_messages("invalid_record")
    hour = dt.datetime(2026, 11, 20, 3, tzinfo=UTC)
    # given totals (with an older revision after a newer one), a broken message and a bad record
    await producer.send_and_wait(topic, key=b"junk", value=b"{not json")
    await producer.send_and_wait(topic, key=b"junk", value=b'{"project_id": "x"}')
    await send(
        producer,
        topic,
        [
            hourly(hour, "1800", 1),
            hourly(hour, "3600", 2),
            hourly(hour, "1000", 1),  # stale: revision 1 < 2
            hourly(hour + dt.timedelta(hours=1), "1234.5", 1),
            hourly(hour, "2700", 1, gpu_model="A100"),
        ],
    )
    consumer = ConsumerAndDrainer(settings, store_).start()
    try:
        # then A100: 0.75 h -> 9.75; H800: (3600 + 1234.5) s = 1.342917 h, 34.9158.. -> 34.92
        expected = ("44.67", "31.27", "13.40", "0.750000", "1.342917")
        figures = await eventually(
            lambda: invoice_figures(store_, "INV-2026-11-hkgai-llm"),
            what="the November invoice",
        )
        figures = await eventually(
            lambda: _equal(invoice_figures(store_, "INV-2026-11-hkgai-llm"), expected),
            what=f"invoice figures {expected}, last {figures}",
        )
        assert (bad_messages("not_json"), bad_messages("invalid_record")) == (
            bad_before[0] + 1,
            bad_before[1] + 1,
        )
        assert consumer.alive
    finally:
        await consumer.stop()


def db_retries() -> float:
    value = metrics.REGISTRY.get_sample_value(
        "billing_db_retries_total", {"operation": "apply_hourly_batch"}
    )
    return value or 0.0


async def _true(value: bool) -> bool:
    return value


def bad_messages(reason: str) -> float:
    value = metrics.REGISTRY.get_sample_value("billing_bad_messages_total", {"reason": reason})
    return value or 0.0


async def _equal(value: Awaitable[Any], expected: Any) -> bool:
    return (await value) == expected


async def test_no_update_is_lost_while_postgresql_restarts(
    billing: tuple[BillingSettings, store.Store, AIOKafkaProducer],
    postgres_server: EmbeddedPostgres,
) -> None:
    settings, store_, producer = billing
    topic = settings.topics.hourly
    first_hour = dt.datetime(2026, 11, 2, tzinfo=UTC)
    hours = [first_hour + dt.timedelta(hours=i) for i in range(6)]
    consumer = ConsumerAndDrainer(settings, store_).start()
    try:
        await send(producer, topic, [hourly(h, "600", 1) for h in hours])
        await eventually(
            lambda: _equal(
                invoice_figures(store_, "INV-2026-11-hkgai-llm"),
                ("26.00", "18.20", "7.80", "1.000000"),
            ),
            what="the first revisions",
        )

        # when PostgreSQL goes down (the first half of postgres_server.restart()) while totals
        # keep arriving, and comes back only after the consumer has failed to write them
        assert postgres_server is not None, "this test needs the embedded PostgreSQL it restarts"
        retries_before = db_retries()
        await asyncio.to_thread(postgres_server.stop)
        try:
            for revision in range(2, 10):
                await send(
                    producer, topic, [hourly(h, str(600 * revision), revision) for h in hours]
                )
            await eventually(
                lambda: _true(db_retries() > retries_before), what="a failed write being retried"
            )
        finally:
            await asyncio.to_thread(postgres_server.start)

        # then every hour ends at its last revision, and the invoice matches: 6 * 5400 s = 9 h
        expected = ("234.00", "163.80", "70.20", "9.000000")
        await eventually(
            lambda: _equal(invoice_figures(store_, "INV-2026-11-hkgai-llm"), expected),
            timeout_s=45,
            what=f"invoice {expected} after the restart",
        )
        async with store_.acquire() as conn:
            revisions = await conn.fetch("SELECT revision FROM usage_hourly ORDER BY hour_start")
        assert [row["revision"] for row in revisions] == [9] * 6
        assert consumer.alive
    finally:
        await consumer.stop()


async def test_records_billing_cannot_decode_or_store_go_to_its_dead_letter_topic(
    billing: tuple[BillingSettings, store.Store, AIOKafkaProducer],
) -> None:
    settings, store_, producer = billing
    topic = settings.topics.hourly
    hour = dt.datetime(2026, 11, 21, 3, tzinfo=UTC)
    # given a broken message, a bad record, one the database refuses (samples past its integer
    # column) and a good one
    refused = hourly(hour, "1800", 1).model_copy(update={"samples": 3_000_000_000})
    await producer.send_and_wait(topic, key=b"junk", value=b"{not json")
    await producer.send_and_wait(topic, key=b"junk", value=b'{"project_id": "x"}')
    await send(producer, topic, [refused, hourly(hour + dt.timedelta(hours=1), "3600", 1)])
    consumer = ConsumerAndDrainer(settings, store_).start()
    try:
        # then each of the three is one dead letter on billing.dlq.v1, with its bytes
        letters = await eventually(
            lambda: _dead_letters(settings, 3), what="three billing dead letters"
        )
        assert sorted(letter["reason"] for letter in letters) == [
            "invalid_record",
            "not_json",
            "refused_by_database",
        ]
        not_json = next(letter for letter in letters if letter["reason"] == "not_json")
        assert base64.b64decode(not_json["raw"]) == b"{not json"
        assert not_json["topic"] == topic
        # and the good record is applied; the consumer goes on
        assert consumer.alive
    finally:
        await consumer.stop()


async def _dead_letters(settings: BillingSettings, at_least: int) -> list[dict] | None:
    consumer = AIOKafkaConsumer(
        settings.topics.billing_dlq,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        batches = await consumer.getmany(timeout_ms=2000)
        letters = [json.loads(r.value) for records in batches.values() for r in records]
    finally:
        await consumer.stop()
    return letters if len(letters) >= at_least else None
