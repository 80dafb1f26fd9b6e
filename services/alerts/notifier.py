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


# Each alerts.v1 record carries its outbox row in this header, so that a restart can tell which
# rows it sent before it could mark them delivered.
OUTBOX_HEADER = "gpumeter-outbox"
# How far before a row's creation a send of it may be stamped by the broker (clocks differ).
RECONCILE_CLOCK_SKEW = timedelta(minutes=5)
# A partition read for the reconciliation gives up after this long without a record.
RECONCILE_IDLE_S = 2.0


def outbox_id(row: OutboxRow) -> bytes:
    return f"{row.fingerprint}/{row.status}/{row.seq}".encode()


class KafkaSender:
    """alerts.v1: the AlertEvent JSON, keyed by fingerprint; each alert change once.

    A row is marked delivered after the broker acknowledged it; a process killed between the two,
    a send that timed out after the broker wrote it, or a mark that failed would otherwise send it
    again. So each record carries its row's id in a header, and before the first send of a process
    (and after any failed send) the sender reads alerts.v1 back from shortly before the oldest
    undelivered row was created, and skips the rows it finds there: they are marked delivered
    without a second send. Kafka's idempotent producer does not cover this (a restart is a new
    producer id) and transactions are not available on every broker (Tansu has none)."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        *,
        bootstrap_servers: str | None = None,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.bootstrap_servers = bootstrap_servers
        self.client_options = client_options or {}
        self._reconciled = False
        self._seen: dict[bytes, None] = {}  # ids known to be on the topic, oldest first

    def _remember(self, key: bytes) -> None:
        self._seen[key] = None
        while len(self._seen) > 100_000:
            del self._seen[next(iter(self._seen))]

    async def send(self, row: OutboxRow) -> None:
        key = outbox_id(row)
        if not self._reconciled and self.bootstrap_servers is not None:
            try:
                await self.reconcile(row.created_at)
            except KafkaError as exc:
                raise DeliveryError(f"reading {self.topic} back: {exc}", retriable=True) from None
        if key in self._seen:
            log.info("alert change %s is on %s already: not sent again", key.decode(), self.topic)
            return
        try:
            await self.producer.send_and_wait(
                self.topic,
                key=row.fingerprint.encode(),
                value=row.event.model_dump_json().encode(),
                headers=[(OUTBOX_HEADER, key)],
            )
        except KafkaError as exc:
            self._reconciled = False  # it may have been written all the same
            raise DeliveryError(f"{type(exc).__name__}: {exc}", retriable=True) from None
        self._remember(key)

    async def reconcile(self, since: datetime | None) -> int:
        """Read the topic from shortly before `since` to its end; remember each outbox id on it."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **self.client_options,
        )
        await consumer.start()
        found = 0
        try:
            partitions = [
                TopicPartition(self.topic, p)
                for p in sorted(await self.producer.partitions_for(self.topic) or ())
            ]
            if not partitions:
                self._reconciled = True
                log.info("%s has no partitions yet: no alert change to skip", self.topic)
                return 0
            consumer.assign(partitions)
            starts: dict[Any, int | None] = {tp: None for tp in partitions}
            if since is not None:
                stamp = int((since - RECONCILE_CLOCK_SKEW).timestamp() * 1000)
                try:
                    found_offsets = await consumer.offsets_for_times(
                        {tp: stamp for tp in partitions}
                    )
                    for tp, offset in found_offsets.items():
                        starts[tp] = offset.offset if offset is not None else -1
                except (KafkaError, ValueError, TypeError) as exc:
                    log.info(
                        "no offsets by time on %s (%s): reading it from its start", self.topic, exc
                    )
            ends = await consumer.end_offsets(partitions)
            pending = []
            for tp in partitions:
                start = starts[tp]
                if start == -1:  # nothing written since: nothing to read
                    continue
                if start is None:
                    await consumer.seek_to_beginning(tp)
                else:
                    consumer.seek(tp, start)
                pending.append(tp)
            if not pending:
                self._reconciled = True
                log.info("nothing on %s since %s: no alert change to skip", self.topic, since)
                return 0
            consumer.pause(*[tp for tp in partitions if tp not in pending])
            # Read to the end: past the listed end offset (Tansu's can be short), until a fetch
            # comes back empty.
            while pending:
                batches = await consumer.getmany(*pending, timeout_ms=int(RECONCILE_IDLE_S * 1000))
                for records in batches.values():
                    for record in records:
                        for name, value in record.headers or ():
                            if name == OUTBOX_HEADER:
                                self._remember(bytes(value))
                                found += 1
                done = [
                    tp
                    for tp in pending
                    if tp not in batches and await consumer.position(tp) >= ends[tp]
                ]
                pending = [tp for tp in pending if tp not in done]
                if not batches and not done:
                    break  # nothing more arrives: the listed end is not reachable
        finally:
            await consumer.stop()
        self._reconciled = True
        log.info("read %s back: %d alert changes already on it", self.topic, found)
        return found


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
        # Rows this process delivered but could not mark delivered (the database went away in
        # between): marked on the next pass, never sent again. Seen as a webhook that got one
        # firing twice when PostgreSQL shut down right after the send.
        sent_not_marked: set[int] = set()
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
                    if row.seq not in sent_not_marked:
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
                    sent_not_marked.add(row.seq)
                    log.warning(
                        "could not mark notification %s delivered (%s): marking it again, "
                        "without sending it again",
                        row.seq,
                        exc,
                    )
                    break
                sent_not_marked.discard(row.seq)
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
