"""Kafka adapter: publishes from the database outboxes: finalized invoices on the invoices topic,
billing signals (subsidy usage, unpriced usage) on the billing signals topic."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from services.billing import service, store
from services.billing.background import BackgroundLoop
from services.billing.settings import BillingSettings

log = logging.getLogger(__name__)


class InvoicePublisher(BackgroundLoop):
    task_name = "billing-invoice-publisher"

    """Sends every finalized, unpublished invoice to settings.topics.invoices (key: invoice id).

    Also sends pending billing signals to settings.topics.billing_signals. Finalization by the API
    and consumer batches wake it; changes made by the CLI are picked up on the next interval.
    """

    def __init__(self, settings: BillingSettings, store_: store.Store) -> None:
        self.settings = settings
        self.store = store_
        super().__init__()

    async def run(self) -> None:
        producer = AIOKafkaProducer(**self.settings.kafka_options(), acks="all")
        await producer.start()
        topic = self.settings.topics.invoices
        signals_topic = self.settings.topics.billing_signals

        async def send(key: str, value: bytes) -> None:
            await producer.send_and_wait(topic, key=key.encode(), value=value)

        async def send_signal(key: str, value: bytes) -> None:
            await producer.send_and_wait(signals_topic, key=key.encode(), value=value)

        try:
            while not self._stopping.is_set():
                self._wake.clear()
                try:
                    published = await service.with_db_retry(
                        self.store,
                        lambda conn: service.publish_pending(conn, send),
                        "publish_invoices",
                        self.settings.db_retry_max_backoff_s,
                    )
                    if published:
                        log.info("published %d finalized invoices on %s", published, topic)
                    signals = await service.with_db_retry(
                        self.store,
                        lambda conn: service.publish_signals(conn, send_signal),
                        "publish_signals",
                        self.settings.db_retry_max_backoff_s,
                    )
                    if signals:
                        log.info("published %d billing signals on %s", signals, signals_topic)
                except (KafkaError, asyncpg.PostgresError) as exc:
                    # Keep the outbox loop alive: the invoices stay unpublished and are retried.
                    log.warning("publishing failed (%r); retrying", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.publish_interval_s)
        finally:
            await producer.stop()
