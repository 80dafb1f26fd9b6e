"""alerts.v1 carries each alert change once, even when the alerts service was killed after the
broker took a notification and before the outbox row was marked delivered (seen in the three-node
Kafka drill): the real broker, the real PostgreSQL, the real notifier loop."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from services.alerts.domain import Dirty, StateChange, Watermark
from services.alerts.metrics import AlertsMetrics
from services.alerts.notifier import OUTBOX_HEADER, KafkaSender, Notifier
from services.alerts.store import Store
from services.common.kafka_admin import ensure_topics

T0 = datetime(2026, 12, 6, 2, 0, tzinfo=UTC)


def change(fingerprint: str, status: str = "firing") -> StateChange:
    return StateChange(
        fingerprint=fingerprint,
        rule="CentreAllocationHigh",
        status=status,  # type: ignore[arg-type]
        labels={"alertname": "CentreAllocationHigh"},
        annotations={"summary": "high"},
        starts_at=T0,
        ends_at=None if status == "firing" else T0 + timedelta(minutes=5),
        value=Decimal("0.93"),
        repeat=False,
        notified_at=T0 if status == "firing" else T0 + timedelta(minutes=5),
    )


async def records_on(bootstrap: str, topic: str) -> list[tuple[bytes, bytes]]:
    """(key, outbox id) of every record on the topic."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    found: list[tuple[bytes, bytes]] = []
    try:
        idle = 0
        while idle < 3:
            batches = await consumer.getmany(timeout_ms=1000)
            idle = 0 if batches else idle + 1
            for records in batches.values():
                for r in records:
                    header = dict(r.headers or ()).get(OUTBOX_HEADER, b"")
                    found.append((r.key or b"", bytes(header)))
    finally:
        await consumer.stop()
    return found


async def deliver_until_idle(store: Store, sender: KafkaSender) -> None:
    notifier = Notifier(
        store,
        {"kafka": sender},
        AlertsMetrics(),
        backoff_initial_s=0.1,
        backoff_max_s=0.5,
        poll_interval_s=0.1,
    )
    task = asyncio.create_task(notifier.run())
    for _ in range(300):
        if not await store.undelivered("kafka"):
            break
        await asyncio.sleep(0.1)
    notifier.stop()
    await task


def test_a_notification_sent_before_a_kill_is_not_sent_again_after_the_restart(
    bootstrap_servers: str, database_url: str, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}alerts.v1"

    async def run() -> tuple[list[tuple[bytes, bytes]], list[int]]:
        await ensure_topics(bootstrap_servers, {topic: 2})
        store = await Store.connect(database_url)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, acks="all")
        await producer.start()
        try:
            await store.migrate()
            # Given three alert changes queued for alerts.v1
            await store.apply(
                Dirty(),
                Watermark(),
                [
                    ("kafka", change("a" * 16)),
                    ("kafka", change("b" * 16)),
                    ("kafka", change("c" * 16)),
                ],
            )
            rows = await store.undelivered("kafka")
            assert len(rows) == 3
            # and a process that sent the first two and was killed before marking them delivered
            before_kill = KafkaSender(producer, topic, bootstrap_servers=bootstrap_servers)
            await before_kill.send(rows[0])
            await before_kill.send(rows[1])
            # When the restarted service delivers its outbox
            restarted = KafkaSender(producer, topic, bootstrap_servers=bootstrap_servers)
            await deliver_until_idle(store, restarted)
            # and a mark that failed in that process sends nothing again either
            await restarted.send(rows[2])
            left = [r.seq for r in await store.undelivered("kafka")]
            return await records_on(bootstrap_servers, topic), left
        finally:
            await producer.stop()
            await store.close()

    records, undelivered = asyncio.run(run())
    # Then each change is on alerts.v1 exactly once, keyed by its fingerprint, and all are delivered
    assert sorted(key for key, _ in records) == [b"a" * 16, b"b" * 16, b"c" * 16]
    assert len({header for _, header in records}) == 3
    assert undelivered == []


def test_the_same_change_queued_again_later_is_sent_again(
    bootstrap_servers: str, database_url: str, topic_prefix: str
) -> None:
    """A repeat of an alert (a new outbox row for the same fingerprint and status) is a new
    notification: the read-back skips rows, not fingerprints."""
    topic = f"{topic_prefix}alerts.v1"

    async def run() -> list[tuple[bytes, bytes]]:
        await ensure_topics(bootstrap_servers, {topic: 1})
        store = await Store.connect(database_url)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, acks="all")
        await producer.start()
        try:
            await store.migrate()
            await store.apply(Dirty(), Watermark(), [("kafka", change("d" * 16))])
            await deliver_until_idle(
                store, KafkaSender(producer, topic, bootstrap_servers=bootstrap_servers)
            )
            repeat = change("d" * 16)
            repeat = StateChange(
                **{**repeat.__dict__, "repeat": True, "notified_at": T0 + timedelta(hours=4)}
            )
            await store.apply(Dirty(), Watermark(), [("kafka", repeat)])
            await deliver_until_idle(
                store, KafkaSender(producer, topic, bootstrap_servers=bootstrap_servers)
            )
            return await records_on(bootstrap_servers, topic)
        finally:
            await producer.stop()
            await store.close()

    records = asyncio.run(run())
    assert [key for key, _ in records] == [b"d" * 16, b"d" * 16]
    assert len({header for _, header in records}) == 2
