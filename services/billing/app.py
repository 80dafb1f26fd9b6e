"""Composition root: builds the billing service's parts from settings and runs them in one loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

import uvicorn

from services.billing import store
from services.billing.api import create_api
from services.billing.consumer import HourlyConsumer
from services.billing.drainer import DraftDrainer
from services.billing.enforcement import Enforcer
from services.billing.publisher import InvoicePublisher
from services.billing.settings import BillingSettings
from services.common.kafka_admin import ensure_topics

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the service stops all its parts on SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def ensure_billing_topics(settings: BillingSettings) -> None:
    """Create the topics billing reads and writes, where missing (brokers create none on a
    produce or a subscribe)."""
    await ensure_topics(
        settings.kafka_bootstrap_servers,
        {
            settings.topics.hourly: settings.topic_partitions,
            settings.topics.jobs_hourly: settings.topic_partitions,
            settings.topics.invoices: settings.topic_partitions,
            settings.topics.billing_signals: settings.topic_partitions,
            settings.topics.completeness: settings.topic_partitions,
            settings.topics.billing_dlq: settings.topic_partitions,
        },
        compacted={
            settings.topics.hourly,
            settings.topics.jobs_hourly,
            settings.topics.billing_signals,
            settings.topics.completeness,
        },
        replication_factor=settings.kafka_replication_factor,
        security=settings.kafka_security.aiokafka(),
    )


async def run(settings: BillingSettings) -> None:
    """Migrate, create topics, then serve the API, consume hourly totals and completeness, and
    publish invoices and billing signals."""
    await store.migrate_with_retry(settings.database_url)
    await ensure_billing_topics(settings)
    store_ = await store.Store(settings.database_url, settings.database_pool_size).open()
    publisher = InvoicePublisher(settings, store_)
    drainer = DraftDrainer(settings, store_, on_invoices_changed=publisher.wake)
    consumer = HourlyConsumer(settings, store_, on_ledger_changed=drainer.wake)
    enforcer = Enforcer(settings, store_) if settings.enforcement_mode != "off" else None

    def health() -> dict[str, object]:
        return {"consumer": consumer.alive, "drainer": drainer.alive, "publisher": publisher.alive}

    api = create_api(settings, store_, on_finalized=publisher.wake, health=health)
    server = _Server(
        uvicorn.Config(
            api,
            host=settings.http_host,
            port=settings.http_port,
            log_level=settings.log_level.lower(),
            access_log=False,
            lifespan="off",
        )
    )
    loop = asyncio.get_running_loop()

    def request_stop(signum: int) -> None:
        log.info("signal %d: stopping", signum)
        server.should_exit = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, request_stop, signum)
    publisher.start()
    drainer.start()
    consumer.start()
    if enforcer is not None:
        enforcer.start()
    try:
        await server.serve()
    finally:
        if enforcer is not None:
            await enforcer.stop()
        await consumer.stop()
        await drainer.stop()
        await publisher.stop()
        await store_.close()
        log.info("billing stopped")
