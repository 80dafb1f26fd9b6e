"""Kafka adapter: publishes finalized invoices from the invoices table (an outbox) on the topic."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from services.billing import service, store
from services.billing.settings import BillingSettings

log = logging.getLogger(__name__)


class InvoicePublisher:
    """Sends every finalized, unpublished invoice to settings.topics.invoices (key: invoice id).

    Finalization by the API wakes it; finalization by the CLI is picked up on the next interval.
    """

    def __init__(self, settings: BillingSettings, store_: store.Store) -> None:
        self.settings = settings
        self.store = store_
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> InvoicePublisher:
        self._task = asyncio.create_task(self.run(), name="billing-invoice-publisher")
        return self

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def run(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap_servers, acks="all"
        )
        await producer.start()
        topic = self.settings.topics.invoices

        async def send(key: str, value: bytes) -> None:
            await producer.send_and_wait(topic, key=key.encode(), value=value)

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
                except (KafkaError, asyncpg.PostgresError) as exc:
                    # Keep the outbox loop alive: the invoices stay unpublished and are retried.
                    log.warning("publishing invoices failed (%r); retrying", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.publish_interval_s)
        finally:
            await producer.stop()
