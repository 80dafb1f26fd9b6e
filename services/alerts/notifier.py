"""Delivers outbox rows to receivers in order, one independent loop per receiver.

A receiver that is down holds back only its own rows: they are retried with capped exponential
backoff, and stay in PostgreSQL across restarts until delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import httpx
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from schemas.alert import AlertEvent
from services.alerts import payloads
from services.alerts.config import ReceiverConfig
from services.alerts.domain import Route, route
from services.alerts.metrics import AlertsMetrics
from services.alerts.store import DB_ERRORS, OutboxRow, Store

log = logging.getLogger(__name__)


class DeliveryError(Exception):
    def __init__(self, detail: str, *, retriable: bool, http_status: int | None = None) -> None:
        super().__init__(detail)
        self.retriable = retriable
        self.http_status = http_status


class Sender(Protocol):
    async def send(self, row: OutboxRow) -> None: ...


class HttpSender:
    """Webhook, Alertmanager, Slack and PagerDuty: one POST per state change."""

    def __init__(
        self,
        config: ReceiverConfig,
        client: httpx.AsyncClient,
        external_url: str,
        alertmanager_ttl: timedelta = timedelta(minutes=4),
    ) -> None:
        self.config = config
        self.client = client
        self.external_url = external_url
        self.alertmanager_ttl = alertmanager_ttl

    def request(self, event: AlertEvent, now: datetime) -> tuple[str, Any]:
        config = self.config
        if config.type == "webhook":
            body: Any = payloads.webhook_body(
                event, receiver=config.name, external_url=self.external_url
            )
            return config.url, body
        if config.type == "alertmanager":
            return f"{config.url}/api/v2/alerts", [self.alertmanager_alert(event, now)]
        if config.type == "slack":
            return config.url, payloads.slack_body(event, external_url=self.external_url)
        assert config.routing_key is not None
        return config.url, payloads.pagerduty_body(
            event, routing_key=config.routing_key, external_url=self.external_url
        )

    def alertmanager_alert(self, event: AlertEvent, now: datetime) -> dict[str, Any]:
        # Firing: valid for a while, renewed by the re-send loop. Resolved: ended, never in the future.
        ends_at = min(event.ends_at, now) if event.ends_at else now + self.alertmanager_ttl
        return payloads.alertmanager_alert(event, external_url=self.external_url, ends_at=ends_at)

    async def post(self, url: str, body: Any, idempotency_key: str | None = None) -> None:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        try:
            response = await self.client.post(url, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}", retriable=True) from None
        if response.is_success:
            return
        # Other 4xx: the receiver refuses this request and would refuse it again (bad payload,
        # unknown hook, revoked key), so it is not retried, but recorded as rejected.
        retriable = response.status_code in (408, 425, 429) or response.status_code >= 500
        raise DeliveryError(
            f"HTTP {response.status_code}: {response.text[:500]}",
            retriable=retriable,
            http_status=response.status_code,
        )

    async def send(self, row: OutboxRow) -> None:
        url, body = self.request(row.event, datetime.now(UTC))
        await self.post(url, body, idempotency_key=f"{row.fingerprint}-{row.seq}")


class KafkaSender:
    """alerts.v1: the AlertEvent JSON, keyed by fingerprint."""

    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic

    async def send(self, row: OutboxRow) -> None:
        try:
            await self.producer.send_and_wait(
                self.topic, key=row.fingerprint.encode(), value=row.event.model_dump_json().encode()
            )
        except KafkaError as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}", retriable=True) from None


class Notifier:
    def __init__(
        self,
        store: Store,
        senders: dict[str, Sender],
        metrics: AlertsMetrics,
        *,
        backoff_initial_s: float,
        backoff_max_s: float,
        poll_interval_s: float,
    ) -> None:
        self.store = store
        self.senders = senders
        self.metrics = metrics
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.poll_interval_s = poll_interval_s
        self._wake = {name: asyncio.Event() for name in senders}
        self._stop = asyncio.Event()

    def wake(self) -> None:
        for event in self._wake.values():
            event.set()

    def stop(self) -> None:
        self._stop.set()
        self.wake()

    def backoff(self, failures: int) -> float:
        return float(min(self.backoff_initial_s * 2 ** (failures - 1), self.backoff_max_s))

    async def run(self) -> None:
        await asyncio.gather(*(self._deliver(name) for name in self.senders), self._gauge())

    async def _sleep(self, seconds: float, wake: asyncio.Event | None = None) -> None:
        waiters = [asyncio.ensure_future(self._stop.wait())]
        if wake is not None:
            waiters.append(asyncio.ensure_future(wake.wait()))
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _deliver(self, name: str) -> None:
        sender, wake = self.senders[name], self._wake[name]
        failures = 0
        while not self._stop.is_set():
            wake.clear()
            try:
                rows = await self.store.undelivered(name)
            except DB_ERRORS as exc:
                log.warning("outbox read for %s failed: %s", name, exc)
                await self._sleep(self.poll_interval_s)
                continue
            if not rows:
                await self._sleep(self.poll_interval_s, wake)
                continue
            for row in rows:
                if self._stop.is_set():
                    return
                try:
                    await sender.send(row)
                except DeliveryError as exc:
                    with contextlib.suppress(*DB_ERRORS):
                        await self.store.mark_failed(
                            row.seq,
                            str(exc),
                            rejected=not exc.retriable,
                            http_status=exc.http_status,
                        )
                    if not exc.retriable:
                        self.rejected(name, row, exc)
                        continue
                    failures += 1
                    delay = self.backoff(failures)
                    self.metrics.notifications_failed.labels(name, "retry").inc()
                    log.warning(
                        "receiver %s failed (%s); retry %d in %.1f s", name, exc, failures, delay
                    )
                    await self._sleep(delay)
                    break  # re-read: the same row is first again
                try:
                    await self.store.mark_delivered(row.seq)
                except DB_ERRORS as exc:
                    log.warning("could not mark notification %s delivered: %s", row.seq, exc)
                    break
                failures = 0
                self.metrics.notifications_sent.labels(name).inc()

    def rejected(self, name: str, row: OutboxRow, exc: DeliveryError) -> None:
        """A notification refused for good: counted, logged, and kept listed in the outbox."""
        status = str(exc.http_status) if exc.http_status is not None else "none"
        self.metrics.notifications_failed.labels(name, "rejected").inc()
        self.metrics.notifications_rejected.labels(name, status).inc()
        log.error(
            "receiver %s rejected notification %s (%s %s, fingerprint %s) for good, not retried;"
            " listed at GET /v1/notifications/rejected: %s",
            name,
            row.seq,
            row.event.rule,
            row.status,
            row.fingerprint,
            exc,
        )

    async def _gauge(self) -> None:
        while not self._stop.is_set():
            try:
                depths = await self.store.outbox_depths()
            except DB_ERRORS:
                depths = None
            if depths is not None:
                for name in self.senders:
                    self.metrics.outbox_depth.labels(name).set(depths.get(name, 0))
            await self._sleep(max(self.poll_interval_s, 1.0))


async def resend_to_alertmanagers(
    store: Store,
    senders: Sequence[HttpSender],
    routes: Sequence[Route],
    metrics: AlertsMetrics,
    *,
    interval_s: float,
    resolved_within_s: float,
    stopped: Callable[[], bool],
) -> None:
    """Alertmanager expires alerts at endsAt: renew firing ones, repeat resolved ones a while."""
    while not stopped():
        await asyncio.sleep(interval_s)
        try:
            depths = await store.outbox_depths()
            snapshot = await store.alertmanager_snapshot(resolved_within_s)
        except DB_ERRORS as exc:
            log.warning("alertmanager re-send skipped: %s", exc)
            continue
        now = datetime.now(UTC)
        for sender in senders:
            name = sender.config.name
            if depths.get(name):
                continue  # state changes still queued: they go first, in order
            alerts = [
                sender.alertmanager_alert(event, now)
                for event, _ in snapshot
                if name in route(routes, event.labels)
                and (event.status == "firing" or sender.config.send_resolved)
            ]
            if not alerts:
                continue
            try:
                await sender.post(f"{sender.config.url}/api/v2/alerts", alerts)
                metrics.alertmanager_resends.labels(name, "ok").inc()
            except DeliveryError as exc:
                metrics.alertmanager_resends.labels(name, "failed").inc()
                log.warning("alertmanager %s re-send failed: %s", name, exc)
