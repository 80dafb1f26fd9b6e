"""The Faust application: decode, call the pure domain, write. Thin on purpose (STYLE.md)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import defaultdict, deque
from datetime import UTC, datetime
from typing import Any, cast

from faust.web.base import BlueprintManager
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from schemas.codec import InvalidUsage, dead_letter, from_binary_mode
from services.metering import domain
from services.metering.fast_decode import decode_samples
from services.metering.offsets import UsageOffsets
from services.metering.sender import DirectSender
from services.metering.settings import DEAD_LETTER_MAX_BYTES, MeteringSettings
from services.metering.transport import (
    Consumer,
    FixState,
    ListedEndOffsets,
    MeteringApp,
    broker_urls,
    register,
)

log = logging.getLogger(__name__)

MAX_DEAD_LETTER_RAW = 2 * 1024 * 1024
RATE_WINDOW_S = 10.0
SIGNAL_EVERY_S = 5
# Outcomes of applying a sample that are dead-lettered (a duplicate is only counted in a metric).
DEAD_LETTER_OUTCOMES = frozenset(
    {
        domain.Outcome.OUT_OF_ORDER,
        domain.Outcome.BEYOND_RETENTION,
        domain.Outcome.TOO_MANY_GPUS,
        domain.Outcome.TOO_MANY_HOUR_KEYS,
    }
)
# A usage partition whose consumer has fetched past the next offset metering is due to process,
# with no progress for this long while no rebalance is under way, is read again from that offset.
# Faust's getmany drops records it has already taken from the consumer when the flow stops, the
# generation changes or the partition is not active at that instant (all three happen around an
# assignment); the consumer's position is then past them and nothing reads them again until a
# later message reveals the gap, which in a quiet partition never comes. Seen as a worker that
# took over two partitions and left 130 of their messages uncounted for good (position 240,
# processed to 104).
STALL_S = 5.0


class MeteringMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.samples = Counter(
            "gpumeter_metering_samples_total",
            "Samples seen, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "gpumeter_metering_dead_letters_total",
            "Messages or events dead-lettered",
            ["reason"],
            registry=self.registry,
        )
        self.messages = Counter(
            "gpumeter_metering_messages_total", "Usage messages consumed", registry=self.registry
        )
        self.offset_gaps = Counter(
            "gpumeter_metering_usage_offset_gaps_total",
            "Usage messages the stream skipped over and never read again (offsets never seen)",
            registry=self.registry,
        )
        self.reseeks = Counter(
            "gpumeter_metering_usage_reseeks_total",
            "Times a usage partition was read again because the stream skipped offsets (past "
            "the committed one after an assignment, or within a run)",
            registry=self.registry,
        )
        self.stalls = Counter(
            "gpumeter_metering_usage_stalls_total",
            "Times a usage partition's stream stopped short of messages its consumer had already "
            "fetched, and the partition was read again from the first one not processed",
            registry=self.registry,
        )
        self.nodes_forgotten = Counter(
            "gpumeter_metering_nodes_forgotten_total",
            "Nodes silent past the retention whose state was reduced to its newest end "
            "(forgotten), or deleted after the sums' retention (deleted)",
            ["stage"],
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "gpumeter_metering_batch_seconds",
            "Time to process one batch",
            ["stage"],
            registry=self.registry,
        )
        self.event_lag = Gauge(
            "gpumeter_metering_event_lag_seconds",
            "Processing time minus newest sample time in the last batch",
            registry=self.registry,
        )
        self.hourly_updates = Counter(
            "gpumeter_metering_hourly_updates_total",
            "Hourly totals written",
            registry=self.registry,
        )
        self.nodes = Gauge(
            "gpumeter_metering_nodes", "Nodes held in state by this worker", registry=self.registry
        )
        self.consumer_lag = Gauge(
            "gpumeter_metering_consumer_lag",
            "Usage messages not yet committed, per assigned partition (highwater - committed)",
            ["partition"],
            registry=self.registry,
        )
        self.usage_partitions = Gauge(
            "gpumeter_metering_usage_partitions",
            "Usage partitions assigned to this worker (0 while it has none, e.g. before it joined)",
            registry=self.registry,
        )
        self.fetched_end_offsets = Gauge(
            "gpumeter_metering_fetched_end_offsets",
            "1 when table recovery corrects ListOffsets' end offsets by a fetch (Tansu, or a "
            "broker not known to be Apache Kafka), 0 on Apache Kafka; unset until the broker "
            "was asked",
            registry=self.registry,
        )
        self.samples_per_second = Gauge(
            "gpumeter_metering_samples_per_second",
            f"Samples counted per second over the last {RATE_WINDOW_S:g} s",
            registry=self.registry,
        )
        self._counted_total = 0
        self._counted_history: deque[tuple[float, int]] = deque()

    def record_counted(self, samples: int) -> None:
        self._counted_total += samples
        now = time.monotonic()
        self._counted_history.append((now, self._counted_total))
        while len(self._counted_history) > 2 and now - self._counted_history[1][0] > RATE_WINDOW_S:
            self._counted_history.popleft()

    def counted_rate(self) -> float:
        if not self._counted_history:
            return 0.0
        since, counted_then = self._counted_history[0]
        if len(self._counted_history) == 1:
            counted_then = 0
        elapsed = time.monotonic() - since
        return (self._counted_total - counted_then) / elapsed if elapsed > 0 else 0.0


class PartialOutbox:
    """Per-node partials batched per destination partition: one message per partition and batch
    (in chunks), instead of one per key and node. The partition is a function of the key alone,
    so every partial of one key meets in one worker's sums."""

    CHUNK = 2000

    def __init__(self, sender: DirectSender, topic: str, partitions: int) -> None:
        self.sender = sender
        self.topic = topic
        self.partitions = partitions
        self.entries: dict[int, list[Any]] = defaultdict(list)

    def add(self, key: str, node: str, partial: dict[str, Any]) -> None:
        self.entries[domain.partition_of(key, self.partitions)].append([key, node, partial])

    def send(self) -> None:
        for partition, entries in self.entries.items():
            for i in range(0, len(entries), self.CHUNK):
                self.sender.add(
                    self.topic, None, json.dumps(entries[i : i + self.CHUNK]).encode(), partition
                )
        self.entries.clear()


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


def expire_sums(table: Any, newest_epoch: int, retention_s: int, epoch_of: Any) -> None:
    """Forget the sums of keys older than `retention_s` before the newest, with a tombstone each.

    A tombstone is a record whose value is null: sent with the `raw` serializer, as Faust's own
    `del table[key]` does. Sent with the table's JSON serializer, None became the bytes `null`,
    which a restore from the changelog loads as a key whose value is None, not as a deletion: the
    next expiry then crashed the agent on it, again at every restart (seen on Apache Kafka in the
    three-node drill, after a node was partitioned off). Such keys, restored from a changelog
    written before, are dropped here too."""
    for key in [k for k in table.data if newest_epoch - epoch_of(k) > retention_s]:
        record = table.data.pop(key)
        if isinstance(record, dict):
            table.send_changelog(record.get("p"), key, None, value_serializer="raw")


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
    app.gpumeter_metrics = metrics  # type: ignore[attr-defined]
    # Only /healthz and /metrics (below) are served: none of Faust's own pages, which serve any
    # project's table contents (/table/...), route key look-ups (/router/...), the topology and
    # statistics. (Its settings turn most off, but a status page at "/" takes the statistics' place.)
    app.web.blueprints = BlueprintManager()
    sender = DirectSender(app)
    fixes.after_flush.append(sender.check)

    usage_topic = app.topic(
        topics.usage,
        value_serializer="raw",
        key_serializer="raw",
        partitions=settings.usage_partitions,
    )
    dlq_topic = app.topic(topics.usage_dlq, value_serializer="raw", key_serializer="raw")
    node_hourly_topic = app.topic(
        topics.node_hourly,
        value_serializer="raw",
        key_serializer="raw",
        partitions=settings.internal_partitions,
    )
    node_minutely_topic = app.topic(
        topics.node_minutely,
        value_serializer="raw",
        key_serializer="raw",
        partitions=settings.internal_partitions,
    )
    hourly_topic = app.topic(topics.hourly, value_serializer="raw", key_serializer="raw")
    cluster_topic = app.topic(topics.cluster_minutely, value_serializer="raw", key_serializer="raw")
    signals_topic = app.topic(topics.node_signals, value_serializer="raw", key_serializer="raw")
    node_completeness_topic = app.topic(
        settings.node_completeness_topic,
        value_serializer="raw",
        key_serializer="raw",
        partitions=settings.internal_partitions,
    )
    completeness_topic = app.topic(
        topics.completeness, value_serializer="raw", key_serializer="raw"
    )
    fixes.stream_topics.update(
        topic.get_topic_name()
        for topic in (usage_topic, node_hourly_topic, node_minutely_topic, node_completeness_topic)
    )

    # Node states are JSON bytes made here (the stdlib's C encoder): Faust's own JSON serializer
    # took half the time of writing them. Records written before read the same.
    node_state = app.Table("node-state", key_type=str, partitions=settings.usage_partitions)
    node_state.changelog_topic = node_state.changelog_topic.derive(value_serializer="raw")  # type: ignore[assignment]
    hour_totals = app.Table("hour-totals", key_type=str, partitions=settings.internal_partitions)
    minute_totals = app.Table(
        "minute-totals", key_type=str, partitions=settings.internal_partitions
    )
    hour_completeness = app.Table(
        "hour-completeness", key_type=str, partitions=settings.internal_partitions
    )

    # Partials are cumulative, so re-sending them is always safe. After every assignment, each
    # node's partials are re-sent once from its restored state: outputs lost between a state write
    # and a crash reach the sums even from a node that never sends again.
    resend = {"pending": True, "recovered": False}

    # Parsed node states, so a batch does not re-parse its record; the table stays the truth.
    live_states: dict[str, domain.NodeState] = {}
    # Per node in the table: (newest end in 1e-9 s, changelog partition or None, forgotten?), for
    # forgetting nodes silent past the retention (see forget_silent_nodes).
    newest: dict[str, tuple[int, int | None, bool]] = {}

    # Nodes whose state changed since it was last written, with their partition. States are written
    # when the producer is flushed, which Faust does before every offset commit (and on rebalance
    # and stop): one changelog record per node and commit, not per batch, and never an offset
    # committed past a state that was not written.
    dirty_states: dict[str, int] = {}

    node_state_changelog = node_state.changelog_topic.get_topic_name()

    def queue_dirty_states() -> None:
        # Synchronous: no batch can be applied between reading the live states and clearing the
        # dirty set (a batch applied in between would be marked clean without being written).
        for node, partition in dirty_states.items():
            state = live_states[node]
            # The record names its changelog partition: a node forgotten after a restart is
            # written to the partition it was restored from.
            record_dict = {**state.to_record(), "partition": partition}
            newest[node] = (max(state.max_end_n, state.floor_n), partition, False)
            record = json.dumps(record_dict, separators=(",", ":")).encode()
            node_state.data[node] = record
            # The table's key serializer is JSON: keys are written as Faust would write them.
            sender.add(node_state_changelog, json.dumps(node).encode(), record, partition)
        dirty_states.clear()

    async def write_dirty_states() -> None:
        queue_dirty_states()
        await sender.send()

    fixes.before_flush.append(write_dirty_states)

    # Node signals: sent when what alerts read changes (idle GPUs, XID), else every
    # SIGNAL_EVERY_S of event time, so a 1 Hz fleet does not send a signal per node and second.
    signal_sent: dict[str, tuple[int, Any]] = {}

    def signal_due(node: str, state: domain.NodeState, signal: Any) -> bool:
        facts = (signal.idle_projects, signal.xid_errors, signal.gpus)
        previous = signal_sent.get(node)
        if (
            previous is None
            or previous[1] != facts
            or state.max_end_n - previous[0] >= SIGNAL_EVERY_S * 10**9
        ):
            signal_sent[node] = (state.max_end_n, facts)
            return True
        return False

    # Which usage messages are counted around rebalances and restarts (services/metering/offsets.py).
    offsets = UsageOffsets(
        fixes.held,
        fixes.sought_at_assignment,
        fixes.earliest_starts,
        committed_of=lambda tp: consumer_of(app).committed_offset(tp),
        on_read_again=metrics.reseeks.inc,
    )
    # Per usage partition: (the offset due next, since when) while the consumer is past it.
    stalls: dict[int, tuple[int, float]] = {}

    async def on_assigned(app_: Any, assigned: Any, **kwargs: Any) -> None:
        metrics.usage_partitions.set(sum(1 for tp in assigned if tp.topic == topics.usage))
        offsets.reset()  # the streams restart from the committed offsets
        stalls.clear()
        # Queue the dirty states and drop the live ones in one step, then send: a batch applied
        # while the states were being sent would otherwise be dropped with live_states unwritten.
        queue_dirty_states()
        signal_sent.clear()
        live_states.clear()
        newest.clear()
        resend["pending"] = True
        resend["recovered"] = False
        await sender.send()

    async def on_recovered(app_: Any, **kwargs: Any) -> None:
        # Sent when this assignment's tables are restored (Faust's own `completed` event is set
        # once and never cleared, so it cannot tell a later assignment's recovery apart).
        resend["recovered"] = True

    app.on_partitions_assigned.connect(on_assigned)  # type: ignore[arg-type]
    app.on_rebalance_complete.connect(on_recovered)  # type: ignore[arg-type]

    partitions = settings.internal_partitions
    hour_out = PartialOutbox(sender, node_hourly_topic.get_topic_name(), partitions)
    minute_out = PartialOutbox(sender, node_minutely_topic.get_topic_name(), partitions)
    completeness_out = PartialOutbox(sender, node_completeness_topic.get_topic_name(), partitions)
    signals_topic_name = signals_topic.get_topic_name()

    def queue_partials(
        node: str, state: domain.NodeState, hours: Any, minutes: Any, everything: bool
    ) -> None:
        for key in hours:
            if key in state.hours:
                hour_out.add(key, node, state.hour_partial(key))
        for key in minutes:
            if key in state.minutes:
                minute_out.add(key, node, state.minute_partial(key))
        for hour_iso, fact in state.completeness_facts(everything=everything).items():
            completeness_out.add(hour_iso, node, fact)

    def send_partials() -> None:
        hour_out.send()
        minute_out.send()
        completeness_out.send()

    def resend_all() -> None:
        """Re-send every node's partials from the state this worker holds (active or standby:
        any copy of a node's state is one of its real states, and the sums keep the newest)."""
        resend["pending"] = False
        for node, record in list(node_state.data.items()):
            state = live_states.get(node) or domain.NodeState(json.loads(record))
            queue_partials(node, state, state.hours, state.minutes, everything=True)
        send_partials()

    def send_dead_letter(error: InvalidUsage | str, detail: str, event: Any) -> None:
        message = event.message
        raw = message.value or b""  # a tombstone's value is None
        if len(raw) > MAX_DEAD_LETTER_RAW:
            # Keep the dead letter producible: beyond this the broker would refuse it and stop us.
            detail = (
                f"{detail} (raw truncated to the first {MAX_DEAD_LETTER_RAW} of {len(raw)} bytes)"
            )
            raw = raw[:MAX_DEAD_LETTER_RAW]
        letter = dead_letter(
            error,
            detail=detail,
            raw=raw,
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
        )
        metrics.dead_letters.labels(letter.reason).inc()
        dlq_topic.send_soon(key=message.key, value=letter.model_dump_json().encode())

    def internal_error(error: Exception, event: Any, failed: set[int]) -> None:
        """A message whose handling raised what no check foresaw: a dead letter with reason
        `internal_error` (once per message), never a crashed agent and a lost batch."""
        message = event.message
        if id(event) in failed:
            return
        failed.add(id(event))
        detail = f"{type(error).__name__}: {error}"
        detail = detail if len(detail) <= 1000 else detail[:997] + "..."
        log.error(
            "usage partition %d offset %d: unexpected %s; dead-lettered as internal_error",
            message.partition,
            message.offset,
            type(error).__name__,
            exc_info=error,
        )
        send_dead_letter("internal_error", detail, event)

    # When a usage batch was last processed: /healthz reports a stream that stopped with lag.
    progress = {"at": time.monotonic()}

    outcome_details = {
        domain.Outcome.TOO_MANY_GPUS: (
            f"the node already has {settings.max_gpus_per_node} GPUs in state "
            "(MAX_GPUS_PER_NODE); a GPU silent past the retention makes room"
        ),
        domain.Outcome.TOO_MANY_HOUR_KEYS: (
            f"the node already has {settings.max_hour_keys_per_node} project/model/hour totals "
            "within the retention (MAX_HOUR_KEYS_PER_NODE)"
        ),
    }

    def process_usage(events: list[Any]) -> None:
        started = time.perf_counter()
        progress["at"] = time.monotonic()
        if resend["pending"] and resend["recovered"]:
            resend_all()
        offsets.read_unsought_again()
        now = datetime.now(UTC)
        by_node: dict[str, list[tuple[domain.SampleView, Any]]] = defaultdict(list)
        failed: set[int] = set()  # events already dead-lettered as internal_error
        metrics.messages.inc(len(events))
        for event in events:
            message = event.message
            admitted = offsets.admit(message.tp, message.offset)
            if admitted is None:
                continue  # it comes again after a seek
            if admitted.lost_from is not None:
                metrics.offset_gaps.inc(message.offset - admitted.lost_from)
            try:
                value = message.value
                if message.headers:  # binary content mode: the event rebuilt from its headers
                    binary = from_binary_mode(message.headers, value)
                    if binary is not None:
                        value = json.dumps(binary, separators=(",", ":")).encode()
                decoded = decode_samples(value, now=now, key=message.key)
            except InvalidUsage as error:
                send_dead_letter(error, error.detail, event)
                continue
            except Exception as error:  # noqa: BLE001 - see internal_error
                internal_error(error, event, failed)
                continue
            for bad in decoded.errors:
                send_dead_letter(bad, bad.detail, event)
            for sample in decoded.samples:
                by_node[sample.node].append((sample, event))
        newest = None
        counted_outcome = domain.Outcome.COUNTED
        counted = 0
        outcomes: dict[domain.Outcome, int] = defaultdict(int)
        for node, samples in by_node.items():
            state = live_states.get(node)
            if state is None:
                record = node_state.data.get(node)
                state = live_states[node] = domain.NodeState(json.loads(record) if record else None)
            touched_hours: set[str] = set()
            touched_minutes: set[str] = set()
            for sample, event in samples:
                try:
                    outcome = state.apply(
                        sample,
                        settings.hour_retention_s,
                        touched_hours,
                        touched_minutes,
                        settings.max_gpus_per_node,
                        settings.max_hour_keys_per_node,
                    )
                except Exception as error:  # noqa: BLE001 - see internal_error
                    internal_error(error, event, failed)
                    continue
                if outcome is counted_outcome:
                    counted += 1
                    continue
                outcomes[outcome] += 1
                if outcome in DEAD_LETTER_OUTCOMES:
                    send_dead_letter(
                        outcome.value,
                        f"sample {sample.event_id} of {sample.gpu_key}: "
                        + outcome_details.get(outcome, outcome.value.replace("_", " ")),
                        event,
                    )
            queue_partials(node, state, touched_hours, touched_minutes, everything=False)
            signal = state.signal(node)
            if signal_due(node, state, signal):
                sender.add(signals_topic_name, node.encode(), signal.model_dump_json().encode())
            newest = max(newest or signal.last_sample_time, signal.last_sample_time)
            state.expire(settings.hour_retention_s, settings.minute_retention_s)
            dirty_states[node] = samples[-1][1].message.partition
        send_partials()
        outcomes[counted_outcome] += counted
        for outcome, count in outcomes.items():
            metrics.samples.labels(outcome.value).inc(count)
        metrics.record_counted(counted)
        if newest is not None:
            metrics.event_lag.set((now - newest).total_seconds())
        metrics.nodes.set(max(len(node_state.data), len(live_states)))
        metrics.batch_seconds.labels("usage").observe(time.perf_counter() - started)

    def merge_partials(
        events: list[Any], table: Any, merge: Any = domain.merge_partial
    ) -> set[str]:
        touched: set[str] = set()
        changed_keys: dict[str, int] = {}
        for event in events:
            message = event.message
            for key, node, partial in json.loads(message.value):
                record, changed = merge(table.data.get(key), node, partial)
                if changed:
                    record["p"] = message.partition
                    table.data[key] = record
                    changed_keys[key] = message.partition
                touched.add(key)
        # One changelog write per changed key and batch: a record holds every node's partial.
        for key, partition in changed_keys.items():
            table.send_changelog(partition, key, table.data[key])
        return touched

    batches = {"hour": 0, "minute": 0, "completeness": 0}

    @app.agent(usage_topic)
    async def meter_usage(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_max, within=settings.batch_within_s):
            process_usage(events)  # synchronous: no commit can interleave with a half-applied batch
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
        flowing = getattr(consumer, "flow_active", True)
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
                continue  # given up on: the next message reports the gap (process_usage)
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
            started = time.perf_counter()
            touched = merge_partials(events, hour_totals)
            for key in touched:
                total = domain.hourly_total(key, hour_totals.data[key])
                hourly_topic.send_soon(key=key.encode(), value=total.model_dump_json().encode())
                metrics.hourly_updates.inc()
            batches["hour"] += 1
            if batches["hour"] % 500 == 0 and touched:
                newest = max(domain._hour_of_key(k) for k in touched)
                expire_sums(hour_totals, newest, settings.table_retention_s, domain._hour_of_key)
            metrics.batch_seconds.labels("hourly").observe(time.perf_counter() - started)

    @app.agent(node_minutely_topic)
    async def sum_minutes(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_max, within=settings.batch_within_s):
            started = time.perf_counter()
            touched = merge_partials(events, minute_totals)
            for key in touched:
                minute = domain.cluster_minute(key, minute_totals.data[key])
                cluster_topic.send_soon(
                    key=minute.minute_start.isoformat().encode(),
                    value=minute.model_dump_json().encode(),
                )
            batches["minute"] += 1
            if batches["minute"] % 100 == 0 and touched:
                expire_sums(
                    minute_totals,
                    max(int(k) for k in touched),
                    4 * settings.minute_retention_s,
                    int,
                )
            metrics.batch_seconds.labels("minutely").observe(time.perf_counter() - started)

    @app.agent(node_completeness_topic)
    async def track_completeness(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_max, within=settings.batch_within_s):
            started = time.perf_counter()
            touched = merge_partials(events, hour_completeness, domain.merge_completeness)
            for key in touched:
                completeness = domain.hour_completeness(key, hour_completeness.data[key])
                completeness_topic.send_soon(
                    key=key.encode(), value=completeness.model_dump_json().encode()
                )
            batches["completeness"] += 1
            if batches["completeness"] % 500 == 0 and touched:
                newest = max(domain.hour_epoch(k) for k in touched)
                expire_sums(
                    hour_completeness, newest, settings.table_retention_s, domain.hour_epoch
                )
            metrics.batch_seconds.labels("completeness").observe(time.perf_counter() - started)

    @app.task
    async def ask_the_broker() -> None:
        """Which end offsets table recovery takes, known before the first recovery needs it."""
        metrics.fetched_end_offsets.set(0 if await end_offsets.exact() else 1)

    @app.timer(1.0)
    async def resend_when_idle() -> None:
        # No usage arrives after an assignment (an idle centre, silent nodes): re-send anyway.
        # Not from a state still being restored: a re-send from a stale node state, with the
        # flag then cleared, left a node's last partial unsent until it sent again.
        in_recovery = getattr(app, "in_recovery", False)
        if resend["pending"] and resend["recovered"] and not app.rebalancing and not in_recovery:
            resend_all()
            await sender.send()

    @app.timer(settings.node_expiry_check_s)
    async def forget_silent_nodes() -> None:
        """Nodes silent for longer than the retention (behind the newest node of this worker's
        partitions) are forgotten: their state record is replaced by a few dozen bytes (their
        newest end, so no hour of theirs counts twice), and that is deleted outright after the
        cross-node sums' retention. A flood of fake node ids costs bounded state."""
        if app.rebalancing or getattr(app, "in_recovery", False) or not resend["recovered"]:
            return
        # Only nodes of this worker's active usage partitions: the table also holds standby
        # copies of other workers' nodes, whose changelog partitions their owners write.
        active = {tp.partition for tp in app.consumer.assignment() if tp.topic == topics.usage}
        for node, raw in list(node_state.data.items()):
            if node not in newest:
                try:
                    record = json.loads(raw)
                    state = domain.NodeState(record)
                except Exception:  # noqa: BLE001 - an unreadable record is left alone
                    continue
                forgotten = "floor_s" in record and "gpus" not in record
                end = max(state.max_end_n, state.floor_n)
                newest[node] = (end, record.get("partition"), forgotten)
        mine = {node: entry for node, entry in newest.items() if entry[1] in active}
        if not mine:
            return
        latest = max(end for end, _, _ in mine.values())
        silent_n = latest - (settings.hour_retention_s + 3600) * 10**9
        gone_n = latest - settings.table_retention_s * 10**9
        changed = 0
        for node, (end, partition, forgotten) in mine.items():
            if partition is None or node in dirty_states or end >= silent_n:
                continue
            key = json.dumps(node).encode()
            if end < gone_n:
                del node_state.data[node]
                sender.add(node_state_changelog, key, None, partition)
                del newest[node]
                metrics.nodes_forgotten.labels("deleted").inc()
            elif not forgotten:
                live = live_states.pop(node, None)
                state = live or domain.NodeState(json.loads(node_state.data[node]))
                record = {**state.forgotten(), "partition": partition}
                value = json.dumps(record, separators=(",", ":")).encode()
                node_state.data[node] = value
                sender.add(node_state_changelog, key, value, partition)
                signal_sent.pop(node, None)
                newest[node] = (end, partition, True)
                metrics.nodes_forgotten.labels("forgotten").inc()
            else:
                continue
            changed += 1
        if changed:
            log.info("forgot %d nodes silent for longer than the retention", changed)
            await sender.send()

    recovery = RecoveryClock()

    def recovering_for() -> float | None:
        """Seconds since a rebalance or a table recovery began (None: none under way). Observed
        every second by the stall timer and at each /healthz."""
        return recovery.observe(
            bool(app.rebalancing or getattr(app, "in_recovery", False)), time.monotonic()
        )

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        report: dict[str, Any] = {
            "status": "ok",
            "service": "metering",
            "app_id": settings.faust_id,
        }
        idle_s = time.monotonic() - progress["at"]
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
            from services.common.oidc import AuthError

            try:
                await authenticator.identify(request.headers.get("Authorization"))
            except AuthError as exc:
                headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
                return web.json(
                    {
                        "error": "unauthorized" if exc.status == 401 else "forbidden",
                        "detail": exc.detail,
                    },
                    status=exc.status,
                    headers=headers,
                )
        metrics.samples_per_second.set(metrics.counted_rate())
        try:
            await measure_lag()
        except Exception as error:  # noqa: BLE001 - a scrape during a rebalance still answers
            log.debug("consumer lag unavailable: %r", error)
        return web.bytes(
            generate_latest(metrics.registry), content_type="text/plain; version=0.0.4"
        )

    return app
