"""Metering's two stages, without Faust: plain messages in, records out through a sender.

- `UsageStage`: usage messages -> per-node state (services/metering/domain.py) -> per-node
  partials of hours, minutes and completeness, node signals and dead letters; node states are
  written at each commit (`queue_dirty_states`), re-sent after an assignment, and forgotten when
  a node is silent past the retention.
- `SumsStage`: per-node partials -> cross-node sums (keep each node's latest partial) -> one
  output per changed key, with the sums' changelog written once per key and batch.

services/metering/app.py wires them to Faust's topics, tables and timers; the tests in
tests/unit/test_metering_stages.py drive them with plain messages and dictionaries.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from schemas.codec import InvalidUsage, dead_letter, from_binary_mode
from services.metering import domain
from services.metering.fast_decode import decode_samples
from services.metering.metrics import MeteringMetrics
from services.metering.offsets import UsageOffsets

log = logging.getLogger(__name__)

MAX_DEAD_LETTER_RAW = 2 * 1024 * 1024
# Node signals are sent when what alerts read changes (idle GPUs, XID), else every SIGNAL_EVERY_S
# of event time, so a 1 Hz fleet does not send a signal per node and second.
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


class Message(Protocol):
    """What the stages read of a Kafka message (Faust's `Message` has these)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Any

    @property
    def tp(self) -> Any: ...


class Sender(Protocol):
    """Records handed to the Kafka client in order (services/metering/sender.py)."""

    def add(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None
    ) -> None: ...


class Table(Protocol):
    """What the sums stage uses of a Faust table: its local data and its changelog."""

    data: MutableMapping[str, Any]

    def send_changelog(
        self, partition: int | None, key: Any, value: Any, *args: Any, **kwargs: Any
    ) -> Any: ...


class PartialOutbox:
    """Per-node partials batched per destination partition: one message per partition and batch
    (in chunks), instead of one per key and node. The partition is a function of the key alone,
    so every partial of one key meets in one worker's sums."""

    CHUNK = 2000

    def __init__(self, sender: Sender, topic: str, partitions: int) -> None:
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


@dataclass(frozen=True)
class UsageLimits:
    hour_retention_s: int
    minute_retention_s: int
    max_gpus_per_node: int
    max_hour_keys_per_node: int


@dataclass(frozen=True)
class UsageTopics:
    """Where the usage stage writes (topic names)."""

    node_state_changelog: str
    node_hourly: str
    node_minutely: str
    node_job_hourly: str
    node_completeness: str
    signals: str
    partitions: int  # of the three partial topics


class UsageStage:
    """Usage messages to node states, partials, signals and dead letters (see the module)."""

    def __init__(
        self,
        *,
        states: MutableMapping[str, bytes],
        sender: Sender,
        topics: UsageTopics,
        limits: UsageLimits,
        offsets: UsageOffsets,
        metrics: MeteringMetrics,
        publish_dead_letter: Callable[[bytes | None, bytes], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.states = states  # node -> its state record (JSON bytes): the table, the truth
        self.sender = sender
        self.topics = topics
        self.limits = limits
        self.offsets = offsets
        self.metrics = metrics
        self.publish_dead_letter = publish_dead_letter
        self.clock = clock
        self.hour_out = PartialOutbox(sender, topics.node_hourly, topics.partitions)
        self.minute_out = PartialOutbox(sender, topics.node_minutely, topics.partitions)
        self.job_out = PartialOutbox(sender, topics.node_job_hourly, topics.partitions)
        self.completeness_out = PartialOutbox(sender, topics.node_completeness, topics.partitions)
        # Parsed node states, so a batch does not re-parse its record; the table stays the truth.
        self.live_states: dict[str, domain.NodeState] = {}
        # Per node in the table: (newest end in 1e-9 s, changelog partition or None, forgotten?),
        # for forgetting nodes silent past the retention (see `forget_silent`).
        self.newest: dict[str, tuple[int, int | None, bool]] = {}
        # Nodes whose state changed since it was last written, with their partition. States are
        # written when the producer is flushed, which Faust does before every offset commit (and
        # on rebalance and stop): one changelog record per node and commit, not per batch, and
        # never an offset committed past a state that was not written.
        self.dirty_states: dict[str, int] = {}
        # Per node, the job keys touched since the last commit. Job totals feed reports, not
        # alerts: their partials go out once per node and commit (with the state records), not
        # once per batch as the hourly ones do. That is what kept per-job totals from costing a
        # fifth of metering's throughput (docs/scaling.md).
        self.dirty_jobs: dict[str, set[str]] = {}
        self.signal_sent: dict[str, tuple[int, Any]] = {}
        # Partials are cumulative, so re-sending them is always safe. After every assignment,
        # each node's partials are re-sent once from its restored state (once the tables are
        # restored): outputs lost between a state write and a crash reach the sums even from a
        # node that never sends again.
        self.resend_pending = True
        self.recovered = False
        # When a usage batch was last processed: /healthz reports a stream that stopped with lag.
        self.progress_at = clock()
        self.outcome_details = {
            domain.Outcome.TOO_MANY_GPUS: (
                f"the node already has {limits.max_gpus_per_node} GPUs in state "
                "(MAX_GPUS_PER_NODE); a GPU silent past the retention makes room"
            ),
            domain.Outcome.TOO_MANY_HOUR_KEYS: (
                f"the node already has {limits.max_hour_keys_per_node} project/model/hour totals "
                "within the retention (MAX_HOUR_KEYS_PER_NODE)"
            ),
        }

    # -- assignments -----------------------------------------------------------------------

    def on_assigned(self) -> None:
        """A new assignment: the streams restart from the committed offsets. The dirty states
        are queued and the live ones dropped in one step (a batch applied between the two would
        be dropped with its state unwritten); the caller then sends."""
        self.offsets.reset()
        self.queue_dirty_states()
        self.signal_sent.clear()
        self.live_states.clear()
        self.newest.clear()
        self.resend_pending = True
        self.recovered = False

    def resend_due(self) -> bool:
        return self.resend_pending and self.recovered

    def resend_all(self) -> None:
        """Re-send every node's partials from the state this worker holds (active or standby:
        any copy of a node's state is one of its real states, and the sums keep the newest)."""
        self.resend_pending = False
        for node, record in list(self.states.items()):
            state = self.live_states.get(node) or domain.NodeState(json.loads(record))
            self._queue_partials(
                node, state, state.hours, state.minutes, everything=True, jobs=state.jobs
            )
        self._send_partials()

    # -- writing states --------------------------------------------------------------------

    def queue_dirty_states(self) -> None:
        """Queue a changelog record of every state changed since the last call, and the per-job
        partials touched since then. Synchronous: no batch can be applied between reading the
        live states and clearing the dirty sets."""
        for node, keys in self.dirty_jobs.items():
            state = self.live_states[node]
            for key in keys:
                if key in state.jobs:
                    self.job_out.add(key, node, state.job_partial(key))
        self.dirty_jobs.clear()
        self.job_out.send()
        for node, partition in self.dirty_states.items():
            state = self.live_states[node]
            # The record names its changelog partition: a node forgotten after a restart is
            # written to the partition it was restored from.
            record_dict = {**state.to_record(), "partition": partition}
            self.newest[node] = (max(state.max_end_n, state.floor_n), partition, False)
            record = json.dumps(record_dict, separators=(",", ":")).encode()
            self.states[node] = record
            # The table's key serializer is JSON: keys are written as Faust would write them.
            self.sender.add(
                self.topics.node_state_changelog, json.dumps(node).encode(), record, partition
            )
        self.dirty_states.clear()

    # -- usage -----------------------------------------------------------------------------

    def process(self, messages: Iterable[Message], now: datetime) -> None:
        """Apply one batch of usage messages. Synchronous: no commit can interleave with a
        half-applied batch."""
        started = time.perf_counter()
        metrics = self.metrics
        self.progress_at = self.clock()
        if self.resend_due():
            self.resend_all()
        self.offsets.read_unsought_again()
        by_node: dict[str, list[tuple[domain.SampleView, Message]]] = defaultdict(list)
        failed: set[int] = set()  # messages already dead-lettered as internal_error
        count = 0
        for message in messages:
            count += 1
            admitted = self.offsets.admit(message.tp, message.offset)
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
                self.dead_letter(error, error.detail, message)
                continue
            except Exception as error:  # noqa: BLE001 - see internal_error
                self.internal_error(error, message, failed)
                continue
            for bad in decoded.errors:
                self.dead_letter(bad, bad.detail, message)
            for sample in decoded.samples:
                by_node[sample.node].append((sample, message))
        metrics.messages.inc(count)
        newest = None
        counted_outcome = domain.Outcome.COUNTED
        counted = 0
        outcomes: dict[domain.Outcome, int] = defaultdict(int)
        limits = self.limits
        for node, samples in by_node.items():
            state = self.live_states.get(node)
            if state is None:
                record = self.states.get(node)
                state = domain.NodeState(json.loads(record) if record else None)
                self.live_states[node] = state
            touched_hours: set[str] = set()
            touched_minutes: set[str] = set()
            touched_jobs: set[str] = set()
            for sample, message in samples:
                try:
                    outcome = state.apply(
                        sample,
                        limits.hour_retention_s,
                        touched_hours,
                        touched_minutes,
                        limits.max_gpus_per_node,
                        limits.max_hour_keys_per_node,
                        touched_jobs,
                    )
                except Exception as error:  # noqa: BLE001 - see internal_error
                    self.internal_error(error, message, failed)
                    continue
                if outcome is counted_outcome:
                    counted += 1
                    continue
                outcomes[outcome] += 1
                if outcome in DEAD_LETTER_OUTCOMES:
                    self.dead_letter(
                        outcome.value,
                        f"sample {sample.event_id} of {sample.gpu_key}: "
                        + self.outcome_details.get(outcome, outcome.value.replace("_", " ")),
                        message,
                    )
            self._queue_partials(node, state, touched_hours, touched_minutes, everything=False)
            if touched_jobs:
                self.dirty_jobs.setdefault(node, set()).update(touched_jobs)
            signal = state.signal(node)
            if self._signal_due(node, state, signal):
                self.sender.add(
                    self.topics.signals, node.encode(), signal.model_dump_json().encode()
                )
            newest = max(newest or signal.last_sample_time, signal.last_sample_time)
            state.expire(limits.hour_retention_s, limits.minute_retention_s)
            self.dirty_states[node] = samples[-1][1].partition
        self._send_partials()
        outcomes[counted_outcome] += counted
        for outcome, number in outcomes.items():
            metrics.samples.labels(outcome.value).inc(number)
        metrics.record_counted(counted)
        if newest is not None:
            metrics.event_lag.set((now - newest).total_seconds())
        metrics.nodes.set(max(len(self.states), len(self.live_states)))
        metrics.batch_seconds.labels("usage").observe(time.perf_counter() - started)

    def _signal_due(self, node: str, state: domain.NodeState, signal: Any) -> bool:
        facts = (signal.idle_projects, signal.xid_errors, signal.gpus)
        previous = self.signal_sent.get(node)
        if (
            previous is None
            or previous[1] != facts
            or state.max_end_n - previous[0] >= SIGNAL_EVERY_S * 10**9
        ):
            self.signal_sent[node] = (state.max_end_n, facts)
            return True
        return False

    def _queue_partials(
        self,
        node: str,
        state: domain.NodeState,
        hours: Iterable[str],
        minutes: Iterable[str],
        everything: bool,
        jobs: Iterable[str] = (),
    ) -> None:
        for key in hours:
            if key in state.hours:
                self.hour_out.add(key, node, state.hour_partial(key))
        for key in jobs:
            if key in state.jobs:
                self.job_out.add(key, node, state.job_partial(key))
        for key in minutes:
            if key in state.minutes:
                self.minute_out.add(key, node, state.minute_partial(key))
        for hour_iso, fact in state.completeness_facts(everything=everything).items():
            self.completeness_out.add(hour_iso, node, fact)

    def _send_partials(self) -> None:
        self.hour_out.send()
        self.job_out.send()  # only resend_all adds to it between commits
        self.minute_out.send()
        self.completeness_out.send()

    # -- dead letters ----------------------------------------------------------------------

    def dead_letter(self, error: InvalidUsage | str, detail: str, message: Message) -> None:
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
        self.metrics.dead_letters.labels(letter.reason).inc()
        self.publish_dead_letter(message.key, letter.model_dump_json().encode())

    def internal_error(self, error: Exception, message: Message, failed: set[int]) -> None:
        """A message whose handling raised what no check foresaw: a dead letter with reason
        `internal_error` (once per message), never a crashed agent and a lost batch."""
        if id(message) in failed:
            return
        failed.add(id(message))
        detail = f"{type(error).__name__}: {error}"
        detail = detail if len(detail) <= 1000 else detail[:997] + "..."
        log.error(
            "usage partition %d offset %d: unexpected %s; dead-lettered as internal_error",
            message.partition,
            message.offset,
            type(error).__name__,
            exc_info=error,
        )
        self.dead_letter("internal_error", detail, message)

    # -- silent nodes ----------------------------------------------------------------------

    def forget_silent(self, active_partitions: set[int], table_retention_s: int) -> int:
        """Nodes silent for longer than the retention (behind the newest node of this worker's
        `active_partitions`) are forgotten: their state record is replaced by a few dozen bytes
        (their newest end, so no hour of theirs counts twice), and that is deleted outright after
        the cross-node sums' retention. A flood of fake node ids costs bounded state. Only nodes
        of active partitions: the table also holds standby copies of other workers' nodes, whose
        changelog partitions their owners write. Returns how many nodes changed."""
        newest = self.newest
        for node, raw in list(self.states.items()):
            if node not in newest:
                try:
                    record = json.loads(raw)
                    state = domain.NodeState(record)
                except Exception:  # noqa: BLE001 - an unreadable record is left alone
                    continue
                forgotten = "floor_s" in record and "gpus" not in record
                end = max(state.max_end_n, state.floor_n)
                newest[node] = (end, record.get("partition"), forgotten)
        mine = {node: entry for node, entry in newest.items() if entry[1] in active_partitions}
        if not mine:
            return 0
        latest = max(end for end, _, _ in mine.values())
        silent_n = latest - (self.limits.hour_retention_s + 3600) * 10**9
        gone_n = latest - table_retention_s * 10**9
        changed = 0
        changelog = self.topics.node_state_changelog
        for node, (end, partition, forgotten) in mine.items():
            if partition is None or node in self.dirty_states or end >= silent_n:
                continue
            key = json.dumps(node).encode()
            if end < gone_n:
                del self.states[node]
                self.sender.add(changelog, key, None, partition)
                del newest[node]
                self.metrics.nodes_forgotten.labels("deleted").inc()
            elif not forgotten:
                live = self.live_states.pop(node, None)
                state = live or domain.NodeState(json.loads(self.states[node]))
                record = {**state.forgotten(), "partition": partition}
                value = json.dumps(record, separators=(",", ":")).encode()
                self.states[node] = value
                self.sender.add(changelog, key, value, partition)
                self.signal_sent.pop(node, None)
                newest[node] = (end, partition, True)
                self.metrics.nodes_forgotten.labels("forgotten").inc()
            else:
                continue
            changed += 1
        if changed:
            log.info("forgot %d nodes silent for longer than the retention", changed)
        return changed


def expire_sums(table: Table, newest_epoch: int, retention_s: int, epoch_of: Any) -> None:
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


class SumsStage:
    """Per-node partials of one kind (hours, minutes or completeness) to cross-node sums.

    `merge(record, node, partial) -> (record, changed)` keeps each node's latest partial;
    `emit(key, record)` writes the sum of a key touched by the batch; every `expire_every`
    batches, keys older than `retention_s` (by `epoch_of(key)`) before the newest touched are
    forgotten (`expire_sums`)."""

    def __init__(
        self,
        name: str,
        table: Table,
        *,
        merge: Callable[[Any, str, Any], tuple[dict[str, Any], bool]],
        emit: Callable[[str, dict[str, Any]], None],
        epoch_of: Callable[[str], int],
        retention_s: int,
        expire_every: int,
        metrics: MeteringMetrics,
    ) -> None:
        self.name = name
        self.table = table
        self.merge = merge
        self.emit = emit
        self.epoch_of = epoch_of
        self.retention_s = retention_s
        self.expire_every = expire_every
        self.metrics = metrics
        self.batches = 0

    def process(self, messages: Iterable[Message]) -> set[str]:
        started = time.perf_counter()
        data = self.table.data
        touched: set[str] = set()
        changed_keys: dict[str, int] = {}
        for message in messages:
            for key, node, partial in json.loads(message.value or b"[]"):
                record, changed = self.merge(data.get(key), node, partial)
                if changed:
                    record["p"] = message.partition
                    data[key] = record
                    changed_keys[key] = message.partition
                touched.add(key)
        # One changelog write per changed key and batch: a record holds every node's partial.
        for key, partition in changed_keys.items():
            self.table.send_changelog(partition, key, data[key])
        for key in touched:
            self.emit(key, data[key])
        self.batches += 1
        if self.batches % self.expire_every == 0 and touched:
            newest = max(self.epoch_of(k) for k in touched)
            expire_sums(self.table, newest, self.retention_s, self.epoch_of)
        self.metrics.batch_seconds.labels(self.name).observe(time.perf_counter() - started)
        return touched
