"""Alert rule evaluation: pure functions over plain values (docs/contracts.md §6).

Stream rules run on event time: a cluster minute is evaluated once it is complete (a minute at least
`lateness` later has been seen), so replaying the same minutes gives the same state changes.

Sub-minute evaluation (optional, on in the service): metering re-emits the in-progress minute's
cumulative record after every batch, so the averaging signals (SUB_MINUTE_FIELDS) are also
evaluated on the minute so far, as an observation over [minute start, minute start + covered),
`covered` being the minute's mean GPU-seconds per online GPU. Rules:
- a minute so far counts only once it covers enough of the centre: its online GPUs are at least
  `partial_min_gpus_ratio` of those of the last complete minute (none yet: no partial evaluation);
- held minutes are evaluated in minute order, and the first one that does not cover enough holds
  back the later ones, so no minute is skipped and the `for` clock never jumps;
- a minute is contiguous with the previous one (the `for` clock goes on) when the previous
  observation ended inside the previous minute, however much of it had been seen;
- the pending clock starts at the start of the first breaching minute, as for whole minutes, so a
  decision made on a minute so far and one made on the whole minute give the same starts_at and
  ends_at (minute-aligned); `for: 5m` fires once five minutes of breaching data have been seen;
- once a series has observed a later point in time, earlier revisions (and the minute's complete
  evaluation) change nothing for it: event time never goes back;
- counts (xid_errors, nodes_reporting, gpus_online, gpus_allocated) grow as a minute fills up, so
  a minute so far would under-state them: they are evaluated on complete minutes only;
- replays: the same records give the same notifications, and a redelivered record changes
  nothing. Re-metering the same samples may batch them differently, so the revisions of a minute
  so far may differ; notifications can then differ only where a minute's value so far and its
  whole value lie on different sides of a threshold (starts/ends are minute starts either way).

The absence rule (a silent node) runs on the processing clock, from when each node was last heard.
Billing signals (subsidy used, unpriced usage) run on event time (their `as_of`). Pipeline health
(dead-letter rate, metering lag) runs on the processing clock, from readings of topic end offsets;
so do rejected notifications, from the outbox (a receiver that refused some for good, with a 4xx),
and dead letters by reason (metering's internal_error ones, billing's), counted per reason over a
window of the processing clock (ReasonWindow: memory bounded by buckets x reasons, not letters).

Nodes silent longer than a retention are forgotten (`expire_nodes`) with every series labelled with
them: a firing one (NodeSilent, after days of silence) is resolved first, with ends_at the moment
it is forgotten and a `resolution` annotation saying why, so no receiver keeps it open forever.

Per series (rule + labels) the state machine is Prometheus's: inactive -> pending -> firing after
`for`; while firing, the series stays firing as long as the value stays on the firing side of the
clear threshold (hysteresis). `keep_firing_for` (Prometheus's): a firing series whose value crossed
the clear threshold keeps firing until it has stayed across for that long, counted from the start
of the first observation that crossed (`keep_firing_since`); back on the firing side within that
time, it goes on firing with the same starts_at and sends nothing. It then resolves with ends_at =
keep_firing_since + keep_firing_for, the moment the condition had been false that long (without
keep_firing_for: the start of the observation that crossed, as before), so whole-minute and
minute-so-far evaluation, and a replay, give the same ends_at. A resolved series starts again from
inactive: it needs `for` again to fire.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from schemas.alert import AlertEvent
from schemas.billing import SlurmHold, SubsidyUsage, UnpricedUsage
from schemas.metering import ClusterMinute, NodeSignal

MINUTE = timedelta(minutes=1)

CLUSTER_FIELDS = (
    "allocation_ratio",
    "mean_util_pct",
    "mean_power_w",
    "xid_errors",
    "nodes_reporting",
    "gpus_online",
    "gpus_allocated",
)
# Averages over the GPU-seconds seen so far: meaningful for a minute still being filled.
SUB_MINUTE_FIELDS = ("allocation_ratio", "mean_util_pct", "mean_power_w")
NODE_SILENCE = "node.silence_seconds"  # processing clock
NODE_XID = "node.xid_errors"  # event time, per node
GPU_IDLE = (
    "gpu.idle_allocated"  # event time, per node/gpu/project: 1 while idle inside an allocation
)
SUBSIDY_USED = "billing.subsidy_used_ratio"  # event time (as_of), per project
# event time (as_of), per project: days until the cap runs out at the trailing 7-day burn;
# NO_FORECAST_DAYS when it does not run out before the approval ends (or nothing burns)
SUBSIDY_DAYS_LEFT = "billing.subsidy_days_left"
NO_FORECAST_DAYS = Decimal(100_000)
# event time (as_of), per project: 1 while gpumeter holds its Slurm account (dry run included)
SLURM_HOLD = "billing.slurm_account_held"
UNPRICED_HOURS = "billing.unpriced_gpu_hours"  # event time (as_of), per gpu_model and period
DEAD_LETTER_RATE = "pipeline.dead_letters_per_minute"  # processing clock, whole centre
METERING_LAG = "pipeline.metering_lag_seconds"  # processing clock, whole centre
# processing clock, per receiver: notifications it refused for good (4xx) in a recent window
NOTIFICATIONS_REJECTED = "pipeline.notifications_rejected"
# processing clock, whole centre: metering's internal_error dead letters in a recent window
INTERNAL_ERRORS = "pipeline.internal_errors"
# processing clock, whole centre: billing's dead letters (usage in no invoice) in a recent window
BILLING_DEAD_LETTERS = "billing.dead_letters"
SIGNALS = (
    *(f"cluster.{name}" for name in CLUSTER_FIELDS),
    NODE_SILENCE,
    NODE_XID,
    GPU_IDLE,
    SUBSIDY_USED,
    SUBSIDY_DAYS_LEFT,
    SLURM_HOLD,
    UNPRICED_HOURS,
    DEAD_LETTER_RATE,
    METERING_LAG,
    NOTIFICATIONS_REJECTED,
    INTERNAL_ERRORS,
    BILLING_DEAD_LETTERS,
)

Op = Literal[">=", "<=", ">", "<"]
OPS = (">=", "<=", ">", "<")
Status = Literal["inactive", "pending", "firing", "resolved"]
DeadLetterSource = Literal["metering", "billing"]
DEAD_LETTER_SOURCES: tuple[DeadLetterSource, ...] = ("metering", "billing")


@dataclass(frozen=True)
class Rule:
    name: str
    signal: str
    op: Op
    threshold: Decimal
    clear_threshold: Decimal | None = None  # None: clears as soon as the firing condition fails
    for_: timedelta = timedelta(0)
    keep_firing_for: timedelta = timedelta(0)
    repeat_interval: timedelta | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)

    def breaches(self, value: Decimal) -> bool:
        return _compare(value, self.op, self.threshold)

    def holds(self, value: Decimal) -> bool:
        """While firing: still on the firing side of the clear threshold."""
        clear = self.threshold if self.clear_threshold is None else self.clear_threshold
        return _compare(value, self.op, clear)

    def problems(self) -> list[str]:
        found = []
        if self.signal not in SIGNALS:
            found.append(
                f"rule {self.name}: unknown signal {self.signal!r}; one of {', '.join(SIGNALS)}"
            )
        if self.op not in OPS:
            found.append(f"rule {self.name}: op must be one of {', '.join(OPS)}, not {self.op!r}")
        if self.clear_threshold is not None:
            if self.op in (">=", ">") and self.clear_threshold > self.threshold:
                found.append(
                    f"rule {self.name}: clear_threshold must not be above threshold for '{self.op}'"
                )
            if self.op in ("<=", "<") and self.clear_threshold < self.threshold:
                found.append(
                    f"rule {self.name}: clear_threshold must not be below threshold for '{self.op}'"
                )
        if self.for_ < timedelta(0) or self.keep_firing_for < timedelta(0):
            found.append(f"rule {self.name}: durations must not be negative")
        if self.repeat_interval is not None and self.repeat_interval <= timedelta(0):
            found.append(f"rule {self.name}: repeat_interval must be positive")
        return found


def _compare(value: Decimal, op: str, bound: Decimal) -> bool:
    if op == ">=":
        return value >= bound
    if op == ">":
        return value > bound
    if op == "<=":
        return value <= bound
    return value < bound


def fingerprint(rule_name: str, labels: Mapping[str, str]) -> str:
    """Stable across processes and releases: sha256 of the rule name and the sorted labels."""
    text = "\x00".join([rule_name, *(f"{k}\x01{v}" for k, v in sorted(labels.items()))])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class SeriesState:
    fingerprint: str
    rule: str
    labels: dict[str, str]
    status: Status = "inactive"
    pending_since: datetime | None = None
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    last_value: Decimal | None = None
    last_observed_at: datetime | None = None  # end of the latest observation: replays stop here
    last_active_at: datetime | None = None  # latest time the firing condition held
    # While firing: start of the first observation since then on which it no longer held
    keep_firing_since: datetime | None = None
    last_notified_at: datetime | None = None
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Observation:
    """A value over [start, end): a cluster minute (or the part of it seen so far, `window` being
    the whole minute); or at one instant (start == end)."""

    value: Decimal
    start: datetime
    end: datetime
    context: Mapping[str, str] = field(default_factory=dict)
    window: timedelta | None = None


@dataclass(frozen=True)
class StateChange:
    fingerprint: str
    rule: str
    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: datetime
    ends_at: datetime | None
    value: Decimal
    repeat: bool = False
    # The event time it was notified for: with fingerprint and status, what tells a repeat from
    # the same change written twice.
    notified_at: datetime | None = field(default=None, compare=False)

    def to_event(self) -> AlertEvent:
        return AlertEvent(
            fingerprint=self.fingerprint,
            rule=self.rule,
            status=self.status,
            labels=self.labels,
            annotations=self.annotations,
            starts_at=self.starts_at,
            ends_at=self.ends_at,
            value=float(self.value),
        )


class _Template(dict):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def render_annotations(rule: Rule, labels: Mapping[str, str], obs: Observation) -> dict[str, str]:
    values = _Template({**labels, **obs.context, "value": _show(obs.value)})
    rendered = {}
    for name, template in rule.annotations.items():
        try:
            rendered[name] = template.format_map(values)
        except (ValueError, IndexError, AttributeError):
            rendered[name] = template  # a malformed template is shown as written
    return rendered


def _show(value: Decimal) -> str:
    return format(value.normalize(), "f") if value == value.to_integral_value() else str(value)


def observe(rule: Rule, state: SeriesState, obs: Observation) -> StateChange | None:
    """Advance one series by one observation; return the notification it causes, if any."""
    if state.last_observed_at is not None and obs.end <= state.last_observed_at:
        return None  # seen before: a replay changes nothing
    contiguous = (
        obs.start >= obs.end
        or state.last_observed_at is None
        or obs.start <= state.last_observed_at
        # a windowed observation follows one that ended inside the previous window
        or (obs.window is not None and obs.start - obs.window < state.last_observed_at)
    )
    state.last_observed_at = obs.end
    state.last_value = obs.value
    change: StateChange | None = None

    if state.status == "firing":
        if rule.holds(obs.value):
            state.last_active_at = obs.end
            state.keep_firing_since = None  # back on the firing side: the same alert goes on
            state.annotations = render_annotations(rule, state.labels, obs)
            due = state.last_notified_at is None or (
                rule.repeat_interval is not None
                and obs.end - state.last_notified_at >= rule.repeat_interval
            )
            if due:
                state.last_notified_at = obs.end
                change = _change(state, "firing", obs.value, repeat=True)
            return change
        if state.keep_firing_since is None:
            state.keep_firing_since = obs.start
        if obs.end - state.keep_firing_since < rule.keep_firing_for:
            return None  # kept firing: not false for keep_firing_for yet
        state.status = "resolved"
        state.ends_at = state.keep_firing_since + rule.keep_firing_for
        state.keep_firing_since = None
        state.pending_since = None
        state.last_notified_at = obs.end
        return _change(state, "resolved", obs.value)

    if not rule.breaches(obs.value):
        if state.status == "pending":
            state.status = "inactive"
            state.pending_since = None
        return None

    if state.status != "pending" or state.pending_since is None or not contiguous:
        state.status = "pending"
        state.pending_since = obs.start
    if obs.end - state.pending_since >= rule.for_:
        state.status = "firing"
        state.starts_at = max(obs.start, state.pending_since + rule.for_)
        state.ends_at = None
        state.keep_firing_since = None
        state.last_active_at = obs.end
        state.last_notified_at = obs.end
        state.annotations = render_annotations(rule, state.labels, obs)
        change = _change(state, "firing", obs.value)
    return change


def _change(
    state: SeriesState,
    status: Literal["firing", "resolved"],
    value: Decimal,
    *,
    repeat: bool = False,
) -> StateChange:
    assert state.starts_at is not None
    return StateChange(
        fingerprint=state.fingerprint,
        rule=state.rule,
        status=status,
        labels=dict(state.labels),
        annotations=dict(state.annotations),
        starts_at=state.starts_at,
        ends_at=state.ends_at if status == "resolved" else None,
        value=value,
        repeat=repeat,
        notified_at=state.last_notified_at,
    )


@dataclass
class NodeSeen:
    node: str
    last_received_at: datetime  # processing clock
    last_sample_time: datetime  # event time


@dataclass
class Dirty:
    """What the last steps changed, for the store to write in one transaction."""

    states: dict[str, SeriesState] = field(default_factory=dict)
    minutes_upserted: dict[datetime, ClusterMinute] = field(default_factory=dict)
    minutes_removed: set[datetime] = field(default_factory=set)
    nodes: dict[str, NodeSeen] = field(default_factory=dict)
    watermark_changed: bool = False
    # Forgotten (expire_nodes): deleted before the upserts above are written
    states_removed: set[str] = field(default_factory=set)
    nodes_removed: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(
            self.states
            or self.minutes_upserted
            or self.minutes_removed
            or self.nodes
            or self.watermark_changed
            or self.states_removed
            or self.nodes_removed
        )


@dataclass
class Watermark:
    max_minute_seen: datetime | None = None
    last_evaluated_minute: datetime | None = None
    # GPUs online in the last complete minute: how much a minute so far must cover
    last_evaluated_gpus_online: int | None = None


@dataclass(frozen=True)
class RejectedCount:
    """A receiver's notifications refused for good within the window, and the latest status."""

    rejected: int
    last_status: int | None = None


_REASON = re.compile(r"[a-z][a-z0-9_]{0,63}")
OTHER_REASON = "other"  # past max_reasons distinct reasons in a window
UNREADABLE_REASON = "unreadable"  # a reason that is not a short snake_case name
DETAIL_CHARS = 200


def reason_name(reason: Any) -> str:
    """A dead letter's reason as a bounded label: a short snake_case name, or `unreadable`."""
    return reason if isinstance(reason, str) and _REASON.fullmatch(reason) else UNREADABLE_REASON


class ReasonWindow:
    """Dead letters per reason over the last `window` of the processing clock.

    Counts sit in `buckets` buckets of window / buckets each, so memory is bounded by buckets x
    max_reasons however many letters arrive; a letter counts for `window` to within one bucket.
    Past `max_reasons` distinct reasons in the window, the rest count as `other`. The latest
    detail of each reason is kept (cut to DETAIL_CHARS) for annotations.
    """

    def __init__(self, window: timedelta, *, buckets: int = 60, max_reasons: int = 32) -> None:
        if window <= timedelta(0) or buckets < 1 or max_reasons < 1:
            raise ValueError("window, buckets and max_reasons must be positive")
        self.window = window
        self.bucket_s = window.total_seconds() / buckets
        self.max_reasons = max_reasons
        self._buckets: dict[int, dict[str, int]] = {}
        self._latest: dict[str, tuple[datetime, str]] = {}  # reason -> (at, detail)

    def _index(self, at: datetime) -> int:
        return int(at.timestamp() // self.bucket_s)

    def _prune(self, now: datetime) -> None:
        oldest = self._index(now - self.window)
        for index in [i for i in self._buckets if i <= oldest]:
            del self._buckets[index]
        cutoff = now - self.window
        for reason in [r for r, (at, _) in self._latest.items() if at <= cutoff]:
            del self._latest[reason]

    def add(self, reason: str, at: datetime, now: datetime, detail: str = "") -> bool:
        """Count one letter appended at `at` (a time after `now` counts as now); False if it is
        older than the window, and so not counted."""
        at = min(at, now)
        if at <= now - self.window:
            return False
        self._prune(now)
        reason = reason_name(reason)
        if reason not in self._latest and len(self._latest) >= self.max_reasons:
            reason = OTHER_REASON
        bucket = self._buckets.setdefault(self._index(at), {})
        bucket[reason] = bucket.get(reason, 0) + 1
        latest = self._latest.get(reason)
        if latest is None or at >= latest[0]:
            self._latest[reason] = (at, detail[:DETAIL_CHARS])
        return True

    def counts(self, now: datetime) -> dict[str, int]:
        """Letters per reason within the window, reasons in name order."""
        self._prune(now)
        totals: dict[str, int] = {}
        for bucket in self._buckets.values():
            for reason, count in bucket.items():
                totals[reason] = totals.get(reason, 0) + count
        return dict(sorted(totals.items()))

    def latest_detail(self, reason: str) -> str:
        latest = self._latest.get(reason)
        return latest[1] if latest else ""


def describe_counts(counts: Mapping[str, int]) -> str:
    """`not_json: 2, refused_by_database: 1`: most first, then by name."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{reason}: {count}" for reason, count in ranked)


@dataclass
class PipelineReadings:
    """Processing-clock memory of topic end offsets (in memory only: a restart starts afresh)."""

    usage_end: int | None = None  # sum of gpu.usage.v1 end offsets at the last reading
    input_grew_at: datetime | None = None  # last reading that saw new usage samples
    input_active_since: datetime | None = None  # start of the current run of usage input
    dead_letter_window_start: datetime | None = None
    dead_letter_end_at_start: int | None = None


class Evaluator:
    """Holds every series' state; each `on_*` step returns the notifications it causes."""

    def __init__(
        self,
        rules: Iterable[Rule],
        *,
        started_at: datetime,
        minute_lateness: timedelta = MINUTE,
        dead_letter_window: timedelta = MINUTE,
        input_active_for: timedelta = 2 * MINUTE,
        dead_letter_count_window: timedelta = 60 * MINUTE,
        partial_min_gpus_ratio: Decimal | None = None,
        states: Iterable[SeriesState] = (),
        pending_minutes: Iterable[ClusterMinute] = (),
        watermark: Watermark | None = None,
        nodes: Iterable[NodeSeen] = (),
    ) -> None:
        self.rules = list(rules)
        self.rules_by_name = {rule.name: rule for rule in self.rules}
        self.started_at = started_at
        self.minute_lateness = minute_lateness
        self.dead_letter_window = dead_letter_window
        self.input_active_for = input_active_for
        self.partial_min_gpus_ratio = partial_min_gpus_ratio  # None: whole minutes only
        self._partial_revisions: dict[datetime, int] = {}  # minute -> revision evaluated so far
        self.partial_evaluations = 0
        self.pipeline = PipelineReadings()
        self.dead_letter_count_window = dead_letter_count_window
        # Dead letters per reason, by source: "metering" (gpu.usage.dlq.v1), "billing"
        self.dead_letters = {
            source: ReasonWindow(dead_letter_count_window) for source in DEAD_LETTER_SOURCES
        }
        self.states = {state.fingerprint: state for state in states}
        self.pending_minutes = {_utc(m.minute_start): m for m in pending_minutes}
        self.watermark = watermark or Watermark()
        self.nodes = {seen.node: seen for seen in nodes}
        self.dirty = Dirty()
        self.evaluations: dict[str, int] = {}
        self.late_minutes = 0
        self._series_by_node: dict[tuple[str, str], set[str]] = {}
        for state in self.states.values():
            self._index(state)

    def drain(self) -> Dirty:
        dirty, self.dirty = self.dirty, Dirty()
        return dirty

    # cluster minutes: event time -------------------------------------------------------------
    def on_cluster_minute(self, minute: ClusterMinute) -> list[StateChange]:
        self.ingest_cluster_minute(minute)
        return self.evaluate_minutes()

    def evaluate_minutes(self) -> list[StateChange]:
        """Complete minutes first, then (if enabled) the held minutes so far, all in minute order."""
        return self.evaluate_complete_minutes() + self.evaluate_partial_minutes()

    def ingest_cluster_minute(self, minute: ClusterMinute) -> None:
        """Hold the latest revision of a minute until it is complete.

        A consumer ingests a whole batch before evaluating, so minutes that metering emits out of
        order within one batch are still evaluated in minute order.
        """
        start = _utc(minute.minute_start)
        done = self.watermark.last_evaluated_minute
        if done is not None and start <= done:
            self.late_minutes += 1  # already evaluated: a late revision or a replay
            return
        held = self.pending_minutes.get(start)
        if held is None or minute.revision > held.revision:
            self.pending_minutes[start] = minute
            self.dirty.minutes_upserted[start] = minute
        if self.watermark.max_minute_seen is None or start > self.watermark.max_minute_seen:
            self.watermark.max_minute_seen = start
            self.dirty.watermark_changed = True

    def evaluate_complete_minutes(self) -> list[StateChange]:
        seen = self.watermark.max_minute_seen
        if seen is None:
            return []
        changes: list[StateChange] = []
        for start in sorted(self.pending_minutes):
            if start + MINUTE + self.minute_lateness > seen:
                break
            minute = self.pending_minutes.pop(start)
            self.dirty.minutes_upserted.pop(start, None)
            self.dirty.minutes_removed.add(start)
            self.watermark.last_evaluated_minute = start
            self.watermark.last_evaluated_gpus_online = minute.gpus_online
            self.dirty.watermark_changed = True
            self._partial_revisions.pop(start, None)
            for rule in self.rules:
                if not rule.signal.startswith("cluster."):
                    continue
                value = Decimal(str(getattr(minute, rule.signal.removeprefix("cluster."))))
                obs = Observation(value, start, start + MINUTE, window=MINUTE)
                changes.extend(self._observe(rule, {}, obs))
        return changes

    def evaluate_partial_minutes(self) -> list[StateChange]:
        """Evaluate each held minute's newest revision so far, in minute order (see the module doc).

        A revision is evaluated once; seeing it again (a redelivery) changes nothing, and a
        series that has already observed a later point ignores it.
        """
        if self.partial_min_gpus_ratio is None:
            return []
        rules = [r for r in self.rules if r.signal.removeprefix("cluster.") in SUB_MINUTE_FIELDS]
        changes: list[StateChange] = []
        for start in sorted(self.pending_minutes):
            minute = self.pending_minutes[start]
            if self._partial_revisions.get(start) == minute.revision:
                continue
            covered = self.partial_coverage(minute)
            if covered is None:
                break  # later minutes wait for this one: event time goes forward only
            self._partial_revisions[start] = minute.revision
            self.partial_evaluations += 1
            for rule in rules:
                value = partial_value(minute, rule.signal.removeprefix("cluster."), covered)
                obs = Observation(value, start, start + covered, window=MINUTE)
                changes.extend(self._observe(rule, {}, obs))
        return changes

    def partial_coverage(self, minute: ClusterMinute) -> timedelta | None:
        """How much of its minute a record has seen, or None if it does not cover enough GPUs."""
        reference = self.watermark.last_evaluated_gpus_online
        if self.partial_min_gpus_ratio is None or not reference or minute.gpus_online <= 0:
            return None
        if minute.gpus_online < self.partial_min_gpus_ratio * reference:
            return None
        covered = timedelta(seconds=float(minute.online_gpu_seconds / minute.gpus_online))
        return min(MINUTE, covered) if covered > timedelta(0) else None

    # node signals: event time for idle/XID, processing clock for silence --------------------
    def on_node_signal(self, signal: NodeSignal, received_at: datetime) -> list[StateChange]:
        sample_time = _utc(signal.last_sample_time)
        seen = self.nodes.get(signal.node)
        if seen is None:
            seen = NodeSeen(signal.node, received_at, sample_time)
        else:
            seen = replace(
                seen,
                last_received_at=max(seen.last_received_at, received_at),
                last_sample_time=max(seen.last_sample_time, sample_time),
            )
        self.nodes[signal.node] = seen
        self.dirty.nodes[signal.node] = seen
        self.dirty.nodes_removed.discard(signal.node)  # forgotten and back in the same batch
        node_labels = {"node": signal.node}
        changes: list[StateChange] = []
        for rule in self.rules:
            if rule.signal == NODE_SILENCE:
                obs = Observation(Decimal(0), received_at, received_at)
                changes.extend(self._observe(rule, node_labels, obs, persist_quiet=False))
            elif rule.signal == NODE_XID:
                context = {"xid_gpus": ", ".join(signal.xid_gpus)}
                obs = Observation(Decimal(signal.xid_errors), sample_time, sample_time, context)
                changes.extend(self._observe(rule, node_labels, obs))
            elif rule.signal == GPU_IDLE:
                changes.extend(self._observe_idle(rule, signal, sample_time))
        return changes

    def _observe_idle(self, rule: Rule, signal: NodeSignal, at: datetime) -> list[StateChange]:
        changes: list[StateChange] = []
        idle = set(signal.idle_allocated_gpus)
        touched = set()
        for gpu in sorted(idle):
            labels = {"node": signal.node, "gpu": gpu, "project": signal.idle_projects.get(gpu, "")}
            touched.add(self._fingerprint(rule, labels))
            changes.extend(self._observe(rule, labels, Observation(Decimal(1), at, at)))
        for fp in sorted(self._series_by_node.get((rule.name, signal.node), set()) - touched):
            state = self.states[fp]
            changes.extend(self._observe(rule, state.labels, Observation(Decimal(0), at, at)))
        return changes

    def check_absence(self, now: datetime) -> list[StateChange]:
        """Processing clock: how long each known node has been silent (never before start-up)."""
        changes: list[StateChange] = []
        for node in sorted(self.nodes):
            heard = max(self.nodes[node].last_received_at, self.started_at)
            silence = Decimal(max(0, int((now - heard).total_seconds())))
            for rule in self.rules:
                if rule.signal == NODE_SILENCE:
                    obs = Observation(silence, now, now)
                    changes.extend(self._observe(rule, {"node": node}, obs, persist_quiet=False))
        return changes

    # billing signals: event time (as_of) --------------------------------------------------
    def on_billing_signal(
        self, signal: SubsidyUsage | UnpricedUsage | SlurmHold
    ) -> list[StateChange]:
        """The latest value per key: subsidy used per project; unpriced GPU-hours per model/period."""
        at = _utc(signal.as_of)
        values: dict[str, Decimal]
        if isinstance(signal, SubsidyUsage):
            labels = {"project": signal.project_id}
            context = {
                "scheme": signal.scheme,
                "used_hkd": str(signal.used_hkd),
                "cap_hkd": str(signal.cap_hkd),
                "used_pct": str(round(signal.used_ratio * 100)),
                "burn_hkd_per_day": str(signal.burn_hkd_per_day or 0),
                "exhausted_on": str(signal.exhausted_on or "-"),
                "approval_ends_on": str(signal.approval_ends_on or "-"),
                "days_left": str(signal.days_left if signal.days_left is not None else "-"),
            }
            days_left = NO_FORECAST_DAYS if signal.days_left is None else Decimal(signal.days_left)
            values = {SUBSIDY_USED: signal.used_ratio, SUBSIDY_DAYS_LEFT: days_left}
        elif isinstance(signal, SlurmHold):
            labels = {"project": signal.project_id}
            context = {
                "reason": signal.reason,
                "mode": "dry run: not applied to Slurm" if signal.dry_run else "applied to Slurm",
            }
            values = {SLURM_HOLD: Decimal(1 if signal.held else 0)}
        else:
            labels = {"gpu_model": signal.gpu_model, "period": signal.period}
            context = {"projects": ", ".join(signal.projects)}
            values = {UNPRICED_HOURS: signal.gpu_hours}
        changes: list[StateChange] = []
        for rule in self.rules:
            if rule.signal in values:
                observation = Observation(values[rule.signal], at, at, context)
                changes.extend(self._observe(rule, labels, observation))
        return changes

    # pipeline health: processing clock, from topic end offsets -----------------------------
    def on_offsets(self, now: datetime, usage_end: int, dead_letter_end: int) -> list[StateChange]:
        """One reading of the summed end offsets of gpu.usage.v1 and gpu.usage.dlq.v1.

        Dead letters per minute: offsets gained over a window of the processing clock, scaled to a
        minute. Metering lag: now minus the end of the newest cluster minute seen (or the start of
        the current run of usage input, if later), counted only while usage samples are arriving,
        so an idle, empty centre never fires it.
        """
        readings = self.pipeline
        changes: list[StateChange] = []
        if readings.usage_end is not None and usage_end > readings.usage_end:
            if (
                readings.input_grew_at is None
                or now - readings.input_grew_at > self.input_active_for
            ):
                readings.input_active_since = now
            readings.input_grew_at = now
        readings.usage_end = usage_end  # a smaller value (topic re-created) is a new baseline

        start, start_end = readings.dead_letter_window_start, readings.dead_letter_end_at_start
        if start is None or start_end is None or dead_letter_end < start_end or now < start:
            readings.dead_letter_window_start, readings.dead_letter_end_at_start = (
                now,
                dead_letter_end,
            )
        elif now - start >= self.dead_letter_window:
            letters = dead_letter_end - start_end
            per_minute = Decimal(letters) * 60 / Decimal(str((now - start).total_seconds()))
            obs = Observation(
                per_minute.quantize(Decimal("0.1")), start, now, {"dead_letters": str(letters)}
            )
            for rule in self.rules:
                if rule.signal == DEAD_LETTER_RATE:
                    changes.extend(self._observe(rule, {}, obs, persist_quiet=False))
            readings.dead_letter_window_start, readings.dead_letter_end_at_start = (
                now,
                dead_letter_end,
            )

        lag = Decimal(0)
        active = (
            readings.input_grew_at is not None
            and now - readings.input_grew_at <= self.input_active_for
        )
        if active:
            seen = self.watermark.max_minute_seen
            candidates = [self.started_at, readings.input_active_since]
            if seen is not None:
                candidates.append(seen + MINUTE)
            reference = max(moment for moment in candidates if moment is not None)
            lag = Decimal(max(0, int((now - reference).total_seconds())))
        for rule in self.rules:
            if rule.signal == METERING_LAG:
                obs = Observation(lag, now, now)
                changes.extend(self._observe(rule, {}, obs, persist_quiet=False))
        return changes

    # rejected notifications: processing clock, from the outbox --------------------------------
    @property
    def rejection_rules(self) -> list[str]:
        """Rules that report rejections: their own rejected notifications are not counted."""
        return [rule.name for rule in self.rules if rule.signal == NOTIFICATIONS_REJECTED]

    def on_rejections(
        self, now: datetime, counts: Mapping[str, RejectedCount]
    ) -> list[StateChange]:
        """One reading of the notifications each receiver refused within the window.

        One series per receiver; a receiver missing from `counts` has none left in the window.
        """
        changes: list[StateChange] = []
        for rule in self.rules:
            if rule.signal != NOTIFICATIONS_REJECTED:
                continue
            known = {
                s.labels.get("receiver", "") for s in self.states.values() if s.rule == rule.name
            }
            for receiver in sorted(known | set(counts)):
                count = counts.get(receiver, RejectedCount(0))
                context = {
                    "http_status": "" if count.last_status is None else str(count.last_status)
                }
                obs = Observation(Decimal(count.rejected), now, now, context)
                changes.extend(
                    self._observe(rule, {"receiver": receiver}, obs, persist_quiet=False)
                )
        return changes

    # dead letters by reason: processing clock, from the dead-letter topics ------------------
    def record_dead_letter(
        self, source: DeadLetterSource, reason: str, at: datetime, now: datetime, detail: str = ""
    ) -> bool:
        """Count one dead letter appended at `at`; False if it is older than the window."""
        return self.dead_letters[source].add(reason, at, now, detail)

    def on_dead_letter_counts(self, now: datetime) -> list[StateChange]:
        """One reading of the windows: metering's internal_error letters, billing's letters.

        The caller reads only once it has read the topics up to their ends as of start-up, so a
        window refilled after a restart is whole before a rule sees it.
        """
        window = _show(Decimal(str(self.dead_letter_count_window.total_seconds())))
        metering = self.dead_letters["metering"]
        internal = metering.counts(now).get("internal_error", 0)
        billing_counts = self.dead_letters["billing"].counts(now)
        observations = {
            INTERNAL_ERRORS: Observation(
                Decimal(internal),
                now,
                now,
                {"window_s": window, "detail": metering.latest_detail("internal_error")},
            ),
            BILLING_DEAD_LETTERS: Observation(
                Decimal(sum(billing_counts.values())),
                now,
                now,
                {"window_s": window, "reasons": describe_counts(billing_counts)},
            ),
        }
        changes: list[StateChange] = []
        for rule in self.rules:
            obs = observations.get(rule.signal)
            if obs is not None:
                changes.extend(self._observe(rule, {}, obs, persist_quiet=False))
        return changes

    # bounded tables: nodes silent past the retention are forgotten ---------------------------
    def expire_nodes(self, now: datetime, retention: timedelta, limit: int) -> list[StateChange]:
        """Forget up to `limit` nodes last heard (processing clock) more than `retention` ago,
        with every series labelled with them.

        A firing series is resolved first (ends_at = now, a `resolution` annotation says why), in
        the same batch as the forgetting, so its notification and the deletion are written in one
        transaction; a pending one is dropped. A forgotten node that reports again is a new node.
        """
        cutoff = now - retention
        expired = sorted(n for n, seen in self.nodes.items() if seen.last_received_at < cutoff)
        changes: list[StateChange] = []
        days = _show(Decimal(str(retention.total_seconds())) / 86400)
        for node in expired[:limit]:
            for rule in self.rules:
                for fp in sorted(self._series_by_node.pop((rule.name, node), set())):
                    state = self.states.pop(fp, None)
                    if state is None:
                        continue
                    if state.status == "firing" and state.starts_at is not None:
                        state.status = "resolved"
                        state.ends_at = now
                        state.keep_firing_since = None
                        state.last_notified_at = now
                        state.annotations = {
                            **state.annotations,
                            "resolution": f"node {node} forgotten: silent for more than"
                            f" {days} days (ALERT_NODE_RETENTION_S)",
                        }
                        value = state.last_value if state.last_value is not None else Decimal(0)
                        changes.append(_change(state, "resolved", value))
                    self.dirty.states.pop(fp, None)
                    self.dirty.states_removed.add(fp)
            del self.nodes[node]
            self.dirty.nodes.pop(node, None)
            self.dirty.nodes_removed.add(node)
        if expired:
            # A dict keeps its size after deletions: copies give a flood's memory back.
            self.nodes = dict(self.nodes)
            self.states = dict(self.states)
            self._series_by_node = dict(self._series_by_node)
        return changes

    # one series ------------------------------------------------------------------------------
    def _fingerprint(self, rule: Rule, series_labels: Mapping[str, str]) -> str:
        return fingerprint(rule.name, self._labels(rule, series_labels))

    @staticmethod
    def _labels(rule: Rule, series_labels: Mapping[str, str]) -> dict[str, str]:
        return {"alertname": rule.name, **rule.labels, **series_labels}

    def _observe(
        self,
        rule: Rule,
        series_labels: Mapping[str, str],
        obs: Observation,
        *,
        persist_quiet: bool = True,
    ) -> list[StateChange]:
        labels = self._labels(rule, series_labels)
        fp = fingerprint(rule.name, labels)
        state = self.states.get(fp)
        if state is None:
            if not rule.breaches(obs.value):
                return []  # nothing to remember about a series that never breached
            state = SeriesState(fingerprint=fp, rule=rule.name, labels=labels)
            self.states[fp] = state
            self._index(state)
            self.dirty.states_removed.discard(fp)
        before = _progress(state)
        self.evaluations[rule.name] = self.evaluations.get(rule.name, 0) + 1
        change = observe(rule, state, obs)
        # Processing-clock series are observed every tick: write them only when something moved
        # (the keep_firing_for clock included, so a restart in the middle of it goes on from it).
        if persist_quiet or before != _progress(state):
            self.dirty.states[fp] = state
        return [change] if change else []

    def _index(self, state: SeriesState) -> None:
        node = state.labels.get("node")
        if node is not None:
            self._series_by_node.setdefault((state.rule, node), set()).add(state.fingerprint)


def _progress(state: SeriesState) -> tuple[Any, ...]:
    """What must survive a restart of a series observed on the processing clock."""
    return (state.status, state.pending_since, state.keep_firing_since, state.last_notified_at)


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


def partial_value(minute: ClusterMinute, name: str, covered: timedelta) -> Decimal:
    """A signal of the minute so far; power is energy over the seconds seen, not over 60 s."""
    value = Decimal(str(getattr(minute, name)))
    if name == "mean_power_w" and covered < MINUTE:
        scale = Decimal(MINUTE.total_seconds()) / Decimal(str(covered.total_seconds()))
        return (value * scale).quantize(Decimal("0.1"))
    return value


# routing ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Route:
    receivers: tuple[str, ...]
    match: Mapping[str, str] = field(default_factory=dict)
    match_re: Mapping[str, str] = field(default_factory=dict)
    continue_: bool = False

    def matches(self, labels: Mapping[str, str]) -> bool:
        if any(labels.get(name) != value for name, value in self.match.items()):
            return False
        return all(
            re.fullmatch(pattern, labels.get(name, "")) for name, pattern in self.match_re.items()
        )


def route(routes: Iterable[Route], labels: Mapping[str, str]) -> list[str]:
    """Receivers for an alert, Alertmanager style: first matching route, more while `continue`."""
    chosen: list[str] = []
    for candidate in routes:
        if not candidate.matches(labels):
            continue
        chosen.extend(name for name in candidate.receivers if name not in chosen)
        if not candidate.continue_:
            break
    return chosen


# durations ----------------------------------------------------------------------------------
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: Any) -> timedelta:
    """Prometheus-style durations: '90s', '5m', '1h30m'; a bare number is seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return timedelta(seconds=float(text))
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"not a duration: {text!r}")
    spec = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", spec):
        return timedelta(seconds=float(spec))
    pos, total = 0, 0.0
    for match in _DURATION.finditer(spec):
        if match.start() != pos:
            raise ValueError(f"not a duration: {text!r}")
        total += float(match.group(1)) * _UNIT_S[match.group(2)]
        pos = match.end()
    if pos != len(spec) or pos == 0:
        raise ValueError(f"not a duration: {text!r}")
    return timedelta(seconds=total)
