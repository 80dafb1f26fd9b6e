"""The Faust application: topics, tables, agents, timers and pages around metering's stages.

The work is in services/metering/stages.py (usage -> node states and partials; partials -> sums),
which usage messages are counted around rebalances in services/metering/offsets.py, and Faust's
fixes in services/metering/transport.py. Thin on purpose (STYLE.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import UTC, datetime
from typing import Any, cast

from faust.web.base import BlueprintManager
from prometheus_client import generate_latest

from services.common.auth import auth_error_response
from services.common.oidc import AuthError
from services.metering import domain
from services.metering.metrics import MeteringMetrics
from services.metering.offsets import UsageOffsets
from services.metering.sender import DirectSender
from services.metering.settings import DEAD_LETTER_MAX_BYTES, MeteringSettings
from services.metering.stages import SumsStage, UsageLimits, UsageStage, UsageTopics
from services.metering.transport import (
    Consumer,
    FixState,
    ListedEndOffsets,
    MeteringApp,
    broker_urls,
    register,
)

log = logging.getLogger(__name__)

# A usage partition whose consumer has fetched past the next offset metering is due to process,
# with no progress for this long while no rebalance is under way, is read again from that offset.
# Faust's getmany drops records it has already taken from the consumer when the flow stops, the
# generation changes or the partition is not active at that instant (all three happen around an
# assignment); the consumer's position is then past them and nothing reads them again until a
# later message reveals the gap, which in a quiet partition never comes. Seen as a worker that
# took over two partitions and left 130 of their messages uncounted for good (position 240,
# processed to 104).
STALL_S = 5.0


def left_inactive(
    assigned: Any, active: Any, topic: str, since: dict[Any, float], now: float, after_s: float
) -> list[Any]:
    """Partitions of `topic` assigned but not fetched (not in Faust's active set) for `after_s`;
    `since` holds when each was first seen so and is kept current."""
    inactive = {tp for tp in assigned if tp.topic == topic and tp not in active}
    for tp in list(since):
        if tp not in inactive:
            del since[tp]
    for tp in inactive:
        since.setdefault(tp, now)
    return sorted((tp for tp in inactive if now - since[tp] >= after_s), key=lambda tp: tp[1])


class RecoveryClock:
    """How long the worker has been rebalancing or recovering tables, from plain observations."""

    def __init__(self) -> None:
        self.since: float | None = None

    def observe(self, recovering: bool, now: float) -> float | None:
        if not recovering:
            self.since = None
            return None
        if self.since is None:
            self.since = now
        return now - self.since


# The exit status of a worker that left a rebalance it could not finish (sysexits' EX_SOFTWARE).
STUCK_EXIT_STATUS = 70


def exit_stuck(recovering_s: float) -> None:
    """Leave at once: a rebalance waiting for good on a commit to a partitioned broker (seen on
    Apache Kafka, Faust's `Timer commit is overlapping`) counts nothing, and a clean stop would
    wait on the same commit. Like a SIGKILL, which metering survives exactly (offsets are
    committed after outputs): the supervisor, docker-compose or Kubernetes starts it again, and the
    new member joins a fresh rebalance."""
    log.critical(
        "rebalancing or recovering tables for %.0f s (RECOVERY_UNHEALTHY_S): exiting with status "
        "%d to be restarted",
        recovering_s,
        STUCK_EXIT_STATUS,
    )
    logging.shutdown()
    os._exit(STUCK_EXIT_STATUS)


def consumer_of(app: MeteringApp) -> Consumer:
    """The app's consumer: metering's (services/metering/transport.py), chosen by the broker URL."""
    return cast(Consumer, app.consumer)


def create_app(settings: MeteringSettings) -> MeteringApp:
    register()
    topics = settings.topics
    rebalance_s = settings.kafka_rebalance_timeout_ms / 1000
    app = MeteringApp(
        settings.faust_id,
        broker=broker_urls(settings.kafka_bootstrap_servers),
        store="memory://",
        datadir=settings.data_dir,
        autodiscover=False,
        topic_partitions=settings.internal_partitions,
        topic_allow_declare=True,
        topic_disable_leader=False,
        consumer_auto_offset_reset="earliest",
        broker_rebalance_timeout=rebalance_s,
        broker_max_poll_interval=max(rebalance_s, 10.0),
        broker_session_timeout=settings.kafka_session_timeout_ms / 1000,
        broker_request_timeout=settings.kafka_request_timeout_ms / 1000,
        broker_credentials=settings.kafka_security.faust_credentials(),
        broker_heartbeat_interval=settings.kafka_heartbeat_interval_ms / 1000,
        broker_commit_interval=1.0,
        producer_acks=-1,
        topic_replication_factor=settings.kafka_replication_factor,
        producer_max_request_size=DEAD_LETTER_MAX_BYTES,
        web_enabled=True,
        web_host=settings.http_host,
        web_port=settings.http_port,
        web_in_thread=False,
        table_cleanup_interval=3600.0,
        table_standby_replicas=settings.table_standby_replicas,
        # Big fetches and buffers: the consumer must never pause partitions for a full buffer.
        stream_buffer_maxsize=max(4096, settings.batch_max * 4),
        broker_max_poll_records=settings.batch_max,
        consumer_max_fetch_size=8 * 1024 * 1024,
        producer_linger=0.02,
        producer_max_batch_size=1024 * 1024,
    )
    metrics = MeteringMetrics()
    end_offsets = ListedEndOffsets(
        settings.kafka_bootstrap_servers, settings.kafka_broker, settings.kafka_security
    )
    fixes = app.fixes = FixState(end_offsets, settings.fetch_max_wait_ms)
    # Only /healthz and /metrics (below) are served: none of Faust's own pages, which serve any
    # project's table contents (/table/...), route key look-ups (/router/...), the topology and
    # statistics. (Its settings turn most off, but a status page at "/" takes the statistics' place.)
    app.web.blueprints = BlueprintManager()
    sender = DirectSender(app)
    fixes.after_flush.append(sender.check)

    def raw_topic(name: str, partitions: int | None = None) -> Any:
        """A topic of bytes in and out: metering encodes and decodes its records itself."""
        return app.topic(name, value_serializer="raw", key_serializer="raw", partitions=partitions)

    internal = settings.internal_partitions
    usage_topic = raw_topic(topics.usage, settings.usage_partitions)
    dlq_topic = raw_topic(topics.usage_dlq)
    node_hourly_topic = raw_topic(topics.node_hourly, internal)
    node_minutely_topic = raw_topic(topics.node_minutely, internal)
    node_job_hourly_topic = raw_topic(topics.node_job_hourly, internal)
    node_completeness_topic = raw_topic(settings.node_completeness_topic, internal)
    hourly_topic = raw_topic(topics.hourly)
    jobs_hourly_topic = raw_topic(topics.jobs_hourly)
    cluster_topic = raw_topic(topics.cluster_minutely)
    signals_topic = raw_topic(topics.node_signals)
    completeness_topic = raw_topic(topics.completeness)
    fixes.stream_topics.update(
        topic.get_topic_name()
        for topic in (
            usage_topic,
            node_hourly_topic,
            node_minutely_topic,
            node_job_hourly_topic,
            node_completeness_topic,
        )
    )

    # Node states are JSON bytes made here (the stdlib's C encoder): Faust's own JSON serializer
    # took half the time of writing them. Records written before read the same.
    node_state = app.Table("node-state", key_type=str, partitions=settings.usage_partitions)
    node_state.changelog_topic = node_state.changelog_topic.derive(value_serializer="raw")  # type: ignore[assignment]
    hour_totals = app.Table("hour-totals", key_type=str, partitions=settings.internal_partitions)
    job_totals = app.Table("job-totals", key_type=str, partitions=settings.internal_partitions)
    minute_totals = app.Table(
        "minute-totals", key_type=str, partitions=settings.internal_partitions
    )
    hour_completeness = app.Table(
        "hour-completeness", key_type=str, partitions=settings.internal_partitions
    )

    # Which usage messages are counted around rebalances and restarts (services/metering/offsets.py).
    offsets = UsageOffsets(
        fixes.held,
        fixes.sought_at_assignment,
        fixes.earliest_starts,
        committed_of=lambda tp: consumer_of(app).committed_offset(tp),
        on_read_again=metrics.reseeks.inc,
    )

    def publish_dead_letter(key: bytes | None, value: bytes) -> None:
        dlq_topic.send_soon(key=key, value=value)

    usage = UsageStage(
        states=node_state.data,
        sender=sender,
        topics=UsageTopics(
            node_state_changelog=node_state.changelog_topic.get_topic_name(),
            node_hourly=node_hourly_topic.get_topic_name(),
            node_minutely=node_minutely_topic.get_topic_name(),
            node_job_hourly=node_job_hourly_topic.get_topic_name(),
            node_completeness=node_completeness_topic.get_topic_name(),
            signals=signals_topic.get_topic_name(),
            partitions=settings.internal_partitions,
        ),
        limits=UsageLimits(
            hour_retention_s=settings.hour_retention_s,
            minute_retention_s=settings.minute_retention_s,
            max_gpus_per_node=settings.max_gpus_per_node,
            max_hour_keys_per_node=settings.max_hour_keys_per_node,
        ),
        offsets=offsets,
        metrics=metrics,
        publish_dead_letter=publish_dead_letter,
    )

    async def write_dirty_states() -> None:
        usage.queue_dirty_states()
        await sender.send()

    fixes.before_flush.append(write_dirty_states)
    # Per usage partition: (the offset due next, since when) while the consumer is past it.
    stalls: dict[int, tuple[int, float]] = {}

    async def on_assigned(app_: Any, assigned: Any, **kwargs: Any) -> None:
        metrics.usage_partitions.set(sum(1 for tp in assigned if tp.topic == topics.usage))
        stalls.clear()
        usage.on_assigned()
        await sender.send()

    async def on_recovered(app_: Any, **kwargs: Any) -> None:
        # Sent when this assignment's tables are restored (Faust's own `completed` event is set
        # once and never cleared, so it cannot tell a later assignment's recovery apart).
        usage.recovered = True

    app.on_partitions_assigned.connect(on_assigned)  # type: ignore[arg-type]
    app.on_rebalance_complete.connect(on_recovered)  # type: ignore[arg-type]

    def emit_hourly(key: str, record: dict[str, Any]) -> None:
        total = domain.hourly_total(key, record)
        hourly_topic.send_soon(key=key.encode(), value=total.model_dump_json().encode())
        metrics.hourly_updates.inc()

    def emit_job_hourly(key: str, record: dict[str, Any]) -> None:
        total = domain.job_hourly_total(key, record)
        jobs_hourly_topic.send_soon(key=key.encode(), value=total.model_dump_json().encode())

    def emit_minute(key: str, record: dict[str, Any]) -> None:
        minute = domain.cluster_minute(key, record)
        cluster_topic.send_soon(
            key=minute.minute_start.isoformat().encode(), value=minute.model_dump_json().encode()
        )

    def emit_completeness(key: str, record: dict[str, Any]) -> None:
        completeness = domain.hour_completeness(key, record)
        completeness_topic.send_soon(
            key=key.encode(), value=completeness.model_dump_json().encode()
        )

    hour_sums = SumsStage(
        "hourly",
        hour_totals,
        merge=domain.merge_partial,
        emit=emit_hourly,
        epoch_of=domain.hour_of_key,
        retention_s=settings.table_retention_s,
        expire_every=500,
        metrics=metrics,
    )
    job_sums = SumsStage(
        "jobs",
        job_totals,
        merge=domain.merge_partial,
        emit=emit_job_hourly,
        epoch_of=domain.hour_of_key,
        retention_s=settings.table_retention_s,
        expire_every=500,
        metrics=metrics,
    )
    minute_sums = SumsStage(
        "minutely",
        minute_totals,
        merge=domain.merge_partial,
        emit=emit_minute,
        epoch_of=int,
        retention_s=4 * settings.minute_retention_s,
        expire_every=100,
        metrics=metrics,
    )
    completeness_sums = SumsStage(
        "completeness",
        hour_completeness,
        merge=domain.merge_completeness,
        emit=emit_completeness,
        epoch_of=domain.hour_epoch,
        retention_s=settings.table_retention_s,
        expire_every=500,
        metrics=metrics,
    )

    @app.agent(usage_topic)
    async def meter_usage(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_max, within=settings.batch_within_s):
            # Synchronous: no commit can interleave with a half-applied batch.
            usage.process([event.message for event in events], datetime.now(UTC))
            await sender.send()  # this batch's partials and signals, before its offsets are acked
            await perform_seeks()

    inactive_since: dict[Any, float] = {}

    def resume_forgotten_partitions(consumer: Consumer, now: float) -> None:
        """Fetch again a usage partition that Faust left out of its fetches (its "active"
        partitions) with no rebalance or recovery under way: seen on Apache Kafka after a
        broker fault, a partition whose lag grew for minutes while the others were counted.
        Faust pauses partitions for a rebalance, a table recovery or a full stream buffer and
        resumes them after; one it failed to resume is never fetched again."""
        active = consumer.fetched_partitions()
        for tp in left_inactive(
            consumer.assignment(), active, topics.usage, inactive_since, now, 2 * STALL_S
        ):
            log.warning(
                "usage partition %d: not fetched for %.0f s with no rebalance under way "
                "(%s); fetching it again",
                tp.partition,
                now - inactive_since[tp],
                consumer.why_not_fetched(tp),
            )
            metrics.stalls.inc()
            consumer.fetch_again(tp)
            inactive_since.pop(tp, None)

    async def perform_seeks() -> None:
        while offsets.seeks_due:
            tp, offset = offsets.seeks_due.pop(0)
            await app.consumer.seek(tp, offset)

    @app.timer(1.0)
    async def notice_stalled_partitions() -> None:
        """Read a usage partition again when its consumer has fetched past what metering is due
        to process next and nothing has reached the stream for STALL_S (see STALL_S)."""
        consumer = consumer_of(app)
        flowing = consumer.flow_active
        recovering_s = recovering_for()
        if recovering_s is not None and recovering_s >= settings.recovery_unhealthy_s:
            exit_stuck(recovering_s)
        if recovering_s is not None or not flowing:
            stalls.clear()
            return
        offsets.read_unsought_again()  # a partition that went quiet after its early messages
        now = time.monotonic()
        resume_forgotten_partitions(consumer, now)
        for tp in consumer.assignment():
            if tp.topic != topics.usage:
                continue
            if offsets.given_up(tp):
                continue  # given up on: the next message reports the gap (UsageStage.process)
            due = offsets.offset_due(tp)
            try:
                position = await asyncio.wait_for(consumer.position(tp), 2.0)
            except Exception as error:  # noqa: BLE001 - checked again in a second
                log.debug("usage partition %d: no position (%r)", tp.partition, error)
                continue
            if due is None or position is None or position <= due:
                stalls.pop(tp.partition, None)
                continue
            seen = stalls.get(tp.partition)
            if seen is None or seen[0] != due:
                stalls[tp.partition] = (due, now)
            elif now - seen[1] >= STALL_S:
                log.warning(
                    "usage partition %d: offsets %d..%d were fetched but have not reached the "
                    "stream for %.0f s; reading them again from %d",
                    tp.partition,
                    due,
                    position - 1,
                    now - seen[1],
                    due,
                )
                metrics.stalls.inc()
                stalls[tp.partition] = (due, now)
                offsets.read_again(tp, due)
        await perform_seeks()

    @app.agent(node_hourly_topic)
    async def sum_hours(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_max, within=settings.batch_within_s):
            hour_sums.process([event.message for event in events])

    @app.agent(node_job_hourly_topic)
    async def sum_jobs(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_max, within=settings.batch_within_s):
            job_sums.process([event.message for event in events])

    @app.agent(node_minutely_topic)
    async def sum_minutes(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_max, within=settings.batch_within_s):
            minute_sums.process([event.message for event in events])

    @app.agent(node_completeness_topic)
    async def track_completeness(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_max, within=settings.batch_within_s):
            completeness_sums.process([event.message for event in events])

    @app.task
    async def ask_the_broker() -> None:
        """Which end offsets table recovery takes, known before the first recovery needs it."""
        metrics.fetched_end_offsets.set(0 if await end_offsets.exact() else 1)

    @app.timer(1.0)
    async def resend_when_idle() -> None:
        # No usage arrives after an assignment (an idle centre, silent nodes): re-send anyway.
        # Not from a state still being restored: a re-send from a stale node state, with the
        # flag then cleared, left a node's last partial unsent until it sent again.
        in_recovery = app.in_recovery
        if usage.resend_due() and not app.rebalancing and not in_recovery:
            usage.resend_all()
            await sender.send()

    @app.timer(settings.node_expiry_check_s)
    async def forget_silent_nodes() -> None:
        """Bounded state: nodes silent past the retention are forgotten (UsageStage.forget_silent)."""
        if app.rebalancing or app.in_recovery or not usage.recovered:
            return
        active = {tp.partition for tp in app.consumer.assignment() if tp.topic == topics.usage}
        if usage.forget_silent(active, settings.table_retention_s):
            await sender.send()

    recovery = RecoveryClock()

    def recovering_for() -> float | None:
        """Seconds since a rebalance or a table recovery began (None: none under way). Observed
        every second by the stall timer and at each /healthz."""
        return recovery.observe(bool(app.rebalancing or app.in_recovery), time.monotonic())

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        report: dict[str, Any] = {
            "status": "ok",
            "service": "metering",
            "app_id": settings.faust_id,
        }
        idle_s = time.monotonic() - usage.progress_at
        recovering_s = recovering_for()
        if recovering_s is not None and recovering_s >= settings.recovery_unhealthy_s:
            # A rebalance that never ends (seen on Apache Kafka after a broker was partitioned off:
            # Faust's rebalance waited on a commit for good) must not read as healthy, or no
            # liveness probe restarts the worker.
            report.update(
                status="stuck",
                detail=f"rebalancing or recovering tables for {recovering_s:.0f} s",
            )
            return web.json(report, status=503)
        recovering = recovering_s is not None
        if idle_s >= settings.stall_unhealthy_s and not recovering:
            try:
                lag = await measure_lag()
            except Exception as error:  # noqa: BLE001 - no reading is no evidence of a stall
                log.debug("consumer lag unavailable: %r", error)
                lag = {}
            behind = {p: n for p, n in lag.items() if n > 0}
            if behind:
                report.update(
                    status="stalled",
                    detail=(
                        f"nothing processed for {idle_s:.0f} s while usage partitions have lag: "
                        + ", ".join(f"{p}: {n}" for p, n in sorted(behind.items()))
                    ),
                    lag=behind,
                )
                return web.json(report, status=503)
        return web.json(report)

    async def measure_lag() -> dict[int, int]:
        """Uncommitted usage messages per assigned partition, also set on the lag gauge."""
        consumer = consumer_of(app)
        partitions = [tp for tp in consumer.assignment() if tp.topic == topics.usage]
        metrics.consumer_lag.clear()
        lag: dict[int, int] = {}
        for tp in partitions:
            # Faust keeps the offsets it committed, without a public getter.
            committed = consumer.committed_offset(tp)
            if committed is None:
                committed = await consumer.position(tp) or 0
            # The highwater of the last fetch: free, and right on Tansu too (its ListOffsets is not).
            highwater = consumer.highwater(tp)
            if highwater is not None:
                lag[tp.partition] = max(highwater - committed, 0)
                metrics.consumer_lag.labels(str(tp.partition)).set(lag[tp.partition])
        return lag

    authenticator = settings.authenticator() if settings.metrics_require_token else None

    @app.page("/metrics")
    async def prometheus(web: Any, request: Any) -> Any:
        if authenticator is not None:
            try:
                await authenticator.identify(request.headers.get("Authorization"))
            except AuthError as exc:
                status, body, headers = auth_error_response(exc)
                return web.json(body, status=status, headers=headers or None)
        metrics.samples_per_second.set(metrics.counted_rate())
        try:
            await measure_lag()
        except Exception as error:  # noqa: BLE001 - a scrape during a rebalance still answers
            log.debug("consumer lag unavailable: %r", error)
        return web.bytes(
            generate_latest(metrics.registry), content_type="text/plain; version=0.0.4"
        )

    return app
