"""Composition root: consumer -> evaluator -> store (state + outbox) -> notifier, plus the API.

One asyncio loop runs it all: the Kafka consumer (getmany batches), the notifier's receiver loops,
the Alertmanager re-send loop and uvicorn. Run one replica: the evaluator sees every partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Generator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import uvicorn
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from pydantic import ValidationError

from schemas.billing import SlurmHold, SubsidyUsage, UnpricedUsage
from schemas.metering import ClusterMinute, NodeSignal
from services.alerts.api import create_api
from services.alerts.config import KAFKA_RECEIVER, AlertConfig
from services.alerts.dead_letters import DeadLetterReader
from services.alerts.domain import DEAD_LETTER_SOURCES, Evaluator, StateChange, route
from services.alerts.metrics import AlertsMetrics
from services.alerts.notifier import (
    HttpSender,
    KafkaSender,
    Notifier,
    Sender,
    resend_to_alertmanagers,
)
from services.alerts.settings import AlertsSettings
from services.alerts.store import DB_ERRORS, Store
from services.common.db import retry_db
from services.common.kafka_admin import ensure_topics

log = logging.getLogger(__name__)

# Partition counts used if this service creates the topics first (metering's defaults).
CLUSTER_MINUTELY_PARTITIONS = 1
NODE_SIGNALS_PARTITIONS = 4
ALERTS_PARTITIONS = 1
BILLING_SIGNALS_PARTITIONS = 4  # billing's default; compacted, latest value per key
END_OFFSETS_TIMEOUT_S = 5.0


class EndOffsets:
    """Summed end offsets of topics, read without joining a group or fetching any message.

    The pipeline rules need only how many samples and dead letters were appended, so the dead
    letters themselves (up to megabytes each) are never read. A missing topic counts as 0.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        metadata_max_age_ms: int,
        topics: list[str],
        security: dict[str, Any] | None = None,
    ) -> None:
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers,
            enable_auto_commit=False,
            metadata_max_age_ms=metadata_max_age_ms,
            **(security or {}),
        )
        self.topics = topics

    async def start(self) -> None:
        await self.consumer.start()
        # A consumer that neither subscribes nor is assigned asks the broker for the metadata of
        # no topic: Tansu then answers with every topic, Apache Kafka with none, so
        # partitions_for_topic knew nothing on Kafka and the pipeline rules saw no partition.
        # Name the topics to follow (aiokafka has no public call for it); missing ones are
        # picked up at each metadata refresh.
        await self.consumer._client.set_topics(self.topics)

    async def stop(self) -> None:
        await self.consumer.stop()

    async def read(self, topics: list[str]) -> dict[str, int]:
        partitions = [
            TopicPartition(topic, partition)
            for topic in topics
            for partition in sorted(self.consumer.partitions_for_topic(topic) or ())
        ]
        totals = dict.fromkeys(topics, 0)
        if partitions:
            ends = await asyncio.wait_for(
                self.consumer.end_offsets(partitions), END_OFFSETS_TIMEOUT_S
            )
            for partition, end in ends.items():
                totals[partition.topic] += end
        return totals


class _Server(uvicorn.Server):
    """uvicorn inside our loop: signals are ours, not uvicorn's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class AlertsService:
    def __init__(self, settings: AlertsSettings, config: AlertConfig) -> None:
        self.settings = settings
        self.config = config
        self.metrics = AlertsMetrics()
        self.stopping = asyncio.Event()
        self.ready = False
        self.database_ok = True
        self.consumer: AIOKafkaConsumer | None = None
        self.dead_letters: DeadLetterReader | None = None
        self._dead_letter_gauges: set[tuple[str, str]] = set()

    def stop(self) -> None:
        self.stopping.set()

    def health(self) -> dict[str, Any]:
        assignment = self.consumer.assignment() if self.consumer is not None else set()
        return {
            "status": "ok" if self.ready and not self.stopping.is_set() else "starting",
            "assigned_partitions": len(assignment),
            "receivers": sorted(self.config.receivers),
            "disabled_receivers": self.config.disabled,
            "database": "ok" if self.database_ok else "unavailable, retrying",
            "dead_letters": "reading"
            if self.dead_letters is None or not self.dead_letters.caught_up
            else "caught up",
        }

    def receivers_for(self, change: StateChange) -> list[str]:
        names = [KAFKA_RECEIVER]
        for name in route(self.config.routes, change.labels):
            receiver = self.config.receivers.get(name)
            if receiver is not None and (change.status == "firing" or receiver.send_resolved):
                names.append(name)
        return names

    async def run(self) -> None:
        settings, topics = self.settings, self.settings.topics
        for name, why in sorted(self.config.disabled.items()):
            log.warning("receiver %s is disabled: %s", name, why)
        store = await Store.connect(settings.database_url)
        applied = await store.migrate()
        if applied:
            log.info("applied migrations %s", ", ".join(applied))
        await ensure_topics(
            settings.kafka_bootstrap_servers,
            security=settings.kafka_security.aiokafka(),
            topics={
                topics.cluster_minutely: CLUSTER_MINUTELY_PARTITIONS,
                topics.node_signals: NODE_SIGNALS_PARTITIONS,
                topics.alerts: ALERTS_PARTITIONS,
                topics.billing_signals: BILLING_SIGNALS_PARTITIONS,
            },
            compacted={topics.billing_signals},
            replication_factor=settings.kafka_replication_factor,
        )
        loaded = await store.load()
        evaluator = Evaluator(
            self.config.rules,
            started_at=datetime.now(UTC),
            minute_lateness=timedelta(seconds=settings.alert_minute_lateness_s),
            dead_letter_window=timedelta(seconds=settings.alert_dead_letter_window_s),
            input_active_for=timedelta(seconds=settings.alert_input_active_s),
            dead_letter_count_window=timedelta(seconds=settings.alert_dead_letter_count_window_s),
            partial_min_gpus_ratio=Decimal(str(settings.alert_sub_minute_min_gpus_ratio))
            if settings.alert_sub_minute
            else None,
            states=loaded.states,
            pending_minutes=loaded.pending_minutes,
            watermark=loaded.watermark,
            nodes=loaded.nodes,
        )
        producer = AIOKafkaProducer(**settings.kafka_options(), acks="all")
        await producer.start()
        client = httpx.AsyncClient(timeout=settings.alert_notify_timeout_s)
        ttl = timedelta(seconds=4 * settings.alertmanager_resend_interval_s)
        http_senders = {
            name: HttpSender(receiver, client, settings.external_url, ttl)
            for name, receiver in self.config.receivers.items()
        }
        senders: dict[str, Sender] = {
            KAFKA_RECEIVER: KafkaSender(
                producer,
                topics.alerts,
                bootstrap_servers=settings.kafka_bootstrap_servers,
                client_options=settings.kafka_security.aiokafka(),
            ),
            **http_senders,
        }
        notifier = Notifier(
            store,
            senders,
            self.metrics,
            backoff_initial_s=settings.alert_notify_backoff_initial_s,
            backoff_max_s=settings.alert_notify_backoff_max_s,
            poll_interval_s=settings.alert_outbox_poll_interval_s,
        )
        self.consumer = AIOKafkaConsumer(
            topics.cluster_minutely,
            topics.node_signals,
            topics.billing_signals,
            group_id=settings.consumer_group,
            **settings.consumer_kwargs(),
        )
        await self.consumer.start()
        offsets = EndOffsets(
            settings.kafka_bootstrap_servers,
            metadata_max_age_ms=int(max(1.0, 4 * settings.alert_pipeline_check_interval_s) * 1000),
            topics=[topics.usage, topics.usage_dlq, topics.billing_dlq],
            security=settings.kafka_security.aiokafka(),
        )
        await offsets.start()
        dead_letters = DeadLetterReader(
            settings.kafka_bootstrap_servers,
            {topics.usage_dlq: "metering", topics.billing_dlq: "billing"},
            timedelta(seconds=settings.alert_dead_letter_count_window_s),
            offsets.consumer.partitions_for_topic,
            lambda source, reason, at, now, detail: evaluator.record_dead_letter(
                source, reason, at, now, detail
            ),
            self.metrics,
            security=settings.kafka_security.aiokafka(),
        )
        await dead_letters.start()
        self.dead_letters = dead_letters
        api = create_api(
            store,
            self.metrics,
            recent_s=settings.alert_recent_s,
            health=self.health,
            authenticator=settings.authenticator(),
            metrics_require_token=settings.metrics_require_token,
        )
        server = _Server(
            uvicorn.Config(
                api,
                host=settings.http_host,
                port=settings.http_port,
                log_level="warning",
                lifespan="off",
            )
        )
        alertmanagers = [s for s in http_senders.values() if s.config.type == "alertmanager"]
        tasks = [
            asyncio.create_task(self._consume(evaluator, store, notifier, offsets), name="consume"),
            asyncio.create_task(self._read_dead_letters(dead_letters), name="dead-letters"),
            asyncio.create_task(notifier.run(), name="notifier"),
            asyncio.create_task(server.serve(), name="http"),
            asyncio.create_task(self.stopping.wait(), name="stop"),
        ]
        if alertmanagers:
            tasks.append(
                asyncio.create_task(
                    resend_to_alertmanagers(
                        store,
                        alertmanagers,
                        self.config.routes,
                        self.metrics,
                        interval_s=settings.alertmanager_resend_interval_s,
                        resolved_within_s=settings.alertmanager_resolved_resend_s,
                        stopped=self.stopping.is_set,
                    ),
                    name="alertmanager-resend",
                )
            )
        self.ready = True
        log.info(
            "alerts service up: %d rules, receivers %s, http port %d",
            len(self.config.rules),
            ", ".join(senders),
            settings.http_port,
        )
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            self.stopping.set()
            notifier.stop()
            server.should_exit = True
            for task in tasks:
                if task.get_name() not in ("http", "notifier"):
                    task.cancel()
            await asyncio.wait(tasks, timeout=10)
            with contextlib.suppress(KafkaError):
                await self.consumer.stop()
            with contextlib.suppress(KafkaError):
                await dead_letters.stop()
            with contextlib.suppress(KafkaError):
                await offsets.stop()
            with contextlib.suppress(KafkaError):
                await producer.stop()
            await client.aclose()
            await store.close()
            log.info("alerts service stopped")

    async def _consume(
        self, evaluator: Evaluator, store: Store, notifier: Notifier, offsets: EndOffsets
    ) -> None:
        assert self.consumer is not None
        consumer, settings, topics = self.consumer, self.settings, self.settings.topics
        interval_s = min(
            settings.alert_absence_check_interval_s, settings.alert_pipeline_check_interval_s
        )
        next_absence_check = time.monotonic() + settings.alert_absence_check_interval_s
        next_pipeline_check = time.monotonic()
        next_cleanup = time.monotonic() + settings.alert_cleanup_interval_s
        retention = timedelta(seconds=settings.alert_node_retention_s)
        late_seen = evaluator.late_minutes
        partial_seen = evaluator.partial_evaluations
        while not self.stopping.is_set():
            timeout_ms = int(max(50, min(500, interval_s * 1000)))
            batch = await consumer.getmany(timeout_ms=timeout_ms, max_records=1000)
            received_at = datetime.now(UTC)
            changes: list[StateChange] = []
            for partition, messages in batch.items():
                for message in messages:
                    changes.extend(self._handle(evaluator, partition.topic, message, received_at))
            # Minutes are ingested for the whole batch first, then evaluated in minute order:
            # complete ones, then the newest revision of each minute still in progress.
            changes.extend(evaluator.evaluate_minutes())
            if time.monotonic() >= next_absence_check:
                changes.extend(evaluator.check_absence(datetime.now(UTC)))
                next_absence_check = time.monotonic() + settings.alert_absence_check_interval_s
            if time.monotonic() >= next_pipeline_check:
                next_pipeline_check = time.monotonic() + settings.alert_pipeline_check_interval_s
                try:
                    ends = await offsets.read([topics.usage, topics.usage_dlq])
                except (KafkaError, TimeoutError) as exc:
                    log.warning("could not read topic end offsets: %s", exc)
                else:
                    changes.extend(
                        evaluator.on_offsets(
                            datetime.now(UTC), ends[topics.usage], ends[topics.usage_dlq]
                        )
                    )
                changes.extend(await self._check_rejections(evaluator, store, notifier))
                changes.extend(self._check_dead_letters(evaluator))
            if time.monotonic() >= next_cleanup:
                # One batch of nodes per pass, written with this batch; more passes at once while
                # batches come back full, so a flood is cleared without stopping the input.
                expired = len(evaluator.nodes)
                changes.extend(
                    evaluator.expire_nodes(
                        datetime.now(UTC), retention, limit=settings.alert_cleanup_batch
                    )
                )
                expired -= len(evaluator.nodes)
                outbox_deleted = await self._delete_finished_outbox(store)
                full = settings.alert_cleanup_batch
                if expired < full and outbox_deleted < full:
                    next_cleanup = time.monotonic() + settings.alert_cleanup_interval_s
                self.metrics.nodes_known.set(len(evaluator.nodes))
                self.metrics.series_known.set(len(evaluator.states))
            dirty = evaluator.drain()
            notifications = [(name, c) for c in changes for name in self.receivers_for(c)]
            if dirty or notifications:
                await self._apply(store, dirty, evaluator.watermark, notifications)
                if dirty.nodes_removed:
                    self.metrics.rows_removed.labels("alert_nodes").inc(len(dirty.nodes_removed))
                if dirty.states_removed:
                    self.metrics.rows_removed.labels("alert_states").inc(len(dirty.states_removed))
            if batch:
                try:
                    await consumer.commit()
                except CommitFailedError as exc:
                    log.warning(
                        "offset commit failed (a rebalance); input will be replayed: %s", exc
                    )
            for change in changes:
                self.metrics.state_changes.labels(change.rule, change.status).inc()
                log.info("%s %s %s", change.status, change.rule, change.labels)
            for rule, count in evaluator.evaluations.items():
                self.metrics.evaluations.labels(rule).inc(count)
            evaluator.evaluations.clear()
            if evaluator.late_minutes > late_seen:
                self.metrics.late_minutes.inc(evaluator.late_minutes - late_seen)
                late_seen = evaluator.late_minutes
            if evaluator.partial_evaluations > partial_seen:
                self.metrics.partial_minutes.inc(evaluator.partial_evaluations - partial_seen)
                partial_seen = evaluator.partial_evaluations
            if notifications:
                notifier.wake()

    async def _read_dead_letters(self, reader: DeadLetterReader) -> None:
        """Count the dead letters' reasons as they arrive; look for new partitions now and then."""
        interval_s = self.settings.alert_pipeline_check_interval_s
        next_discovery = time.monotonic()
        while not self.stopping.is_set():
            if time.monotonic() >= next_discovery:
                next_discovery = time.monotonic() + interval_s
                try:
                    await reader.discover(datetime.now(UTC))
                except (KafkaError, TimeoutError) as exc:
                    log.warning("could not look for dead-letter partitions: %s", exc)
            await reader.poll(timeout_ms=int(max(50, min(500, interval_s * 1000))))

    def _check_dead_letters(self, evaluator: Evaluator) -> list[StateChange]:
        """Dead letters per reason in the window: the gauges and the rules, once the window has
        been refilled from the topics (after a start-up), never from part of it."""
        if self.dead_letters is None or not self.dead_letters.caught_up:
            return []
        now = datetime.now(UTC)
        shown: set[tuple[str, str]] = set()
        for source in DEAD_LETTER_SOURCES:
            for reason, count in evaluator.dead_letters[source].counts(now).items():
                self.metrics.dead_letters_recent.labels(source, reason).set(count)
                shown.add((source, reason))
        for gone_source, gone_reason in self._dead_letter_gauges - shown:
            self.metrics.dead_letters_recent.labels(gone_source, gone_reason).set(0)
        self._dead_letter_gauges |= shown
        return evaluator.on_dead_letter_counts(now)

    async def _delete_finished_outbox(self, store: Store) -> int:
        try:
            deleted = await store.delete_finished_outbox(
                older_than_s=self.settings.alert_node_retention_s,
                limit=self.settings.alert_cleanup_batch,
            )
        except DB_ERRORS as exc:
            log.warning("could not delete old notifications: %s", exc)
            return 0
        if deleted:
            self.metrics.rows_removed.labels("alert_outbox").inc(deleted)
        return deleted

    async def _check_rejections(
        self, evaluator: Evaluator, store: Store, notifier: Notifier
    ) -> list[StateChange]:
        """Notifications refused for good in the window, per receiver: the gauge and the rule."""
        try:
            counts = await store.rejected_counts(
                within_s=self.settings.alert_rejected_window_s,
                excluding_rules=evaluator.rejection_rules,
            )
        except DB_ERRORS as exc:
            log.warning("could not read rejected notifications: %s", exc)
            return []
        for name in notifier.senders:
            count = counts.get(name)
            self.metrics.notifications_rejected_recent.labels(name).set(
                count.rejected if count else 0
            )
        return evaluator.on_rejections(datetime.now(UTC), counts)

    async def _apply(
        self,
        store: Store,
        dirty: Any,
        watermark: Any,
        notifications: list[tuple[str, StateChange]],
    ) -> None:
        """Write a batch's effects, waiting out PostgreSQL restarts and outages: the input is
        not committed until the write is, and the write is idempotent (upserts, and outbox rows
        keyed by their change), so a write retried after an unacknowledged commit adds nothing."""

        def failed(_exc: BaseException) -> None:
            self.database_ok = False
            self.metrics.database_errors.inc()

        await retry_db(
            lambda: store.apply(dirty, watermark, notifications),
            "alerts batch write",
            max_backoff_s=10.0,
            initial_backoff_s=0.5,
            on_retry=failed,
        )
        if not self.database_ok:
            log.info("database write succeeded again")
        self.database_ok = True

    def _handle(
        self, evaluator: Evaluator, topic: str, message: ConsumerRecord, received_at: datetime
    ) -> list[StateChange]:
        topics = self.settings.topics
        try:
            if topic == topics.cluster_minutely:
                evaluator.ingest_cluster_minute(ClusterMinute.model_validate_json(message.value))
                changes = []
            elif topic == topics.billing_signals:
                if message.value is None:
                    return []  # a tombstone: the key is gone, nothing to observe
                payload = json.loads(message.value)
                kind = payload.get("kind") if isinstance(payload, dict) else None
                if kind == "subsidy_usage":
                    changes = evaluator.on_billing_signal(SubsidyUsage.model_validate(payload))
                elif kind == "unpriced_usage":
                    changes = evaluator.on_billing_signal(UnpricedUsage.model_validate(payload))
                elif kind == "slurm_hold":
                    changes = evaluator.on_billing_signal(SlurmHold.model_validate(payload))
                else:
                    # A kind this release does not know (billing may add some): not an error.
                    self.metrics.input_messages.labels(topic, "ignored").inc()
                    return []
            else:
                changes = evaluator.on_node_signal(
                    NodeSignal.model_validate_json(message.value), received_at
                )
        except (ValidationError, ValueError, TypeError) as exc:
            # Metering's output is trusted but checked: a bad message is counted and skipped.
            self.metrics.input_messages.labels(topic, "invalid").inc()
            log.warning(
                "skipped invalid message %s[%d]@%d: %s",
                topic,
                message.partition,
                message.offset,
                str(exc)[:300],
            )
            return []
        self.metrics.input_messages.labels(topic, "ok").inc()
        return changes
