"""keep_firing_for: a firing alert resolves only once its condition has been false that long."""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from schemas.metering import ClusterMinute, NodeSignal
from services.alerts import config, domain
from services.alerts.domain import Evaluator, Rule, StateChange

T0 = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
SAMPLE = timedelta(seconds=10)
DEFAULT_RULES = Path(__file__).resolve().parents[2] / "deploy" / "alert-rules.yaml"

IDLE = Rule(
    name="GpuAllocatedIdle",
    signal=domain.GPU_IDLE,
    op=">=",
    threshold=Decimal(1),
    for_=timedelta(minutes=30),
    keep_firing_for=timedelta(minutes=15),
    labels={"severity": "warning"},
)


def node_signal(at: datetime, idle: bool) -> NodeSignal:
    gpus = {"GPU-a": "p1"} if idle else {}
    return NodeSignal(
        node="n1",
        last_sample_time=at,
        gpus=8,
        idle_allocated_gpus=sorted(gpus),
        idle_projects=gpus,
    )


def feed_gpu(evaluator: Evaluator, start: datetime, pattern: list[bool]) -> list[StateChange]:
    """One node signal per 10 s sample from `start`, idle or busy as `pattern` says."""
    changes = []
    for index, idle in enumerate(pattern):
        at = start + index * SAMPLE
        changes += evaluator.on_node_signal(node_signal(at, idle), received_at=T0)
    return changes


IDLE_31_MIN = [True] * (31 * 6)


def test_a_gpu_oscillating_between_idle_and_busy_fires_once_and_resolves_once():
    # given a GPU idle long enough to fire
    evaluator = Evaluator([IDLE], started_at=T0)
    changes = feed_gpu(evaluator, T0, IDLE_31_MIN)
    assert [c.status for c in changes] == ["firing"]
    starts_at = changes[0].starts_at
    # when it flips between idle and busy every sample for 40 minutes (each busy stretch far
    # shorter than keep_firing_for), then works for 20 minutes
    oscillating = [index % 2 == 0 for index in range(40 * 6 + 1)]  # ends idle
    after = T0 + len(IDLE_31_MIN) * SAMPLE
    changes += feed_gpu(evaluator, after, oscillating)
    busy_from = after + len(oscillating) * SAMPLE
    changes += feed_gpu(evaluator, busy_from, [False] * (20 * 6))
    # then exactly one firing and one resolve, the resolve 15 min after the first busy sample of
    # the stretch that lasted
    assert [(c.status, c.starts_at, c.repeat) for c in changes] == [
        ("firing", starts_at, False),
        ("resolved", starts_at, False),
    ]
    assert changes[1].ends_at == busy_from + 15 * MINUTE


def test_without_keep_firing_for_one_busy_sample_resolves_thirty_minutes_of_idling():
    evaluator = Evaluator([replace(IDLE, keep_firing_for=timedelta(0))], started_at=T0)
    changes = feed_gpu(evaluator, T0, [*IDLE_31_MIN, False, True])
    assert [c.status for c in changes] == ["firing", "resolved"]
    assert changes[1].ends_at == T0 + len(IDLE_31_MIN) * SAMPLE  # the busy sample's time


def test_a_condition_false_for_longer_than_keep_firing_for_resolves_and_must_wait_for_again():
    evaluator = Evaluator([IDLE], started_at=T0)
    changes = feed_gpu(evaluator, T0, IDLE_31_MIN)
    first_busy = T0 + len(IDLE_31_MIN) * SAMPLE
    # when busy for 14 min 50 s: still firing; then one more sample (15 min): resolved
    changes += feed_gpu(evaluator, first_busy, [False] * (15 * 6))
    assert [c.status for c in changes] == ["firing"]
    changes += feed_gpu(evaluator, first_busy + 15 * MINUTE, [False])
    assert [(c.status, c.ends_at) for c in changes[1:]] == [("resolved", first_busy + 15 * MINUTE)]
    # when idle again, it is a new alert: it needs its 30 minutes of `for` again
    idle_again = first_busy + 16 * MINUTE
    changes += feed_gpu(evaluator, idle_again, [True] * (29 * 6))
    assert len(changes) == 2
    changes += feed_gpu(evaluator, idle_again + 29 * MINUTE, [True] * (2 * 6))
    assert [(c.status, c.starts_at) for c in changes[2:]] == [("firing", idle_again + 30 * MINUTE)]


def test_keep_firing_for_does_not_keep_a_pending_alert_pending():
    # given a GPU idle for 20 of its 30 minutes of `for`, then busy for one sample
    evaluator = Evaluator([IDLE], started_at=T0)
    pattern = [True] * (20 * 6) + [False] + [True] * (20 * 6)
    # then `for` starts again after the busy sample: nothing fires in the 40 minutes
    assert feed_gpu(evaluator, T0, pattern) == []
    [state] = evaluator.states.values()
    assert state.status == "pending"
    assert state.pending_since == T0 + (20 * 6 + 1) * SAMPLE


def test_a_repeat_interval_still_applies_while_the_condition_holds():
    rule = replace(IDLE, repeat_interval=timedelta(hours=1))
    evaluator = Evaluator([rule], started_at=T0)
    # idle 31 min, busy 1 sample (kept firing), idle for another 70 min
    changes = feed_gpu(evaluator, T0, [*IDLE_31_MIN, False, *[True] * (70 * 6)])
    assert [(c.status, c.repeat) for c in changes] == [("firing", False), ("firing", True)]
    assert changes[0].starts_at == changes[1].starts_at


# cluster minutes: hysteresis and keep_firing_for together ---------------------------------------
HIGH = Rule(
    name="CentreAllocationHigh",
    signal="cluster.allocation_ratio",
    op=">=",
    threshold=Decimal("0.90"),
    clear_threshold=Decimal("0.85"),
    for_=timedelta(minutes=5),
    keep_firing_for=timedelta(minutes=3),
)


def cluster_minute(index: int, ratio: str, seconds: int = 60) -> ClusterMinute:
    online = Decimal(80 * seconds)
    return ClusterMinute(
        minute_start=T0 + index * MINUTE,
        nodes_reporting=10,
        gpus_online=80,
        gpus_allocated=int(Decimal(ratio) * 80),
        online_gpu_seconds=online,
        allocated_gpu_seconds=Decimal(ratio) * online,
        allocation_ratio=Decimal(ratio),
        mean_util_pct=Decimal(50),
        mean_power_w=Decimal(400),
        xid_errors=0,
        revision=seconds,
    )


def run_minutes(ratios: list[str], rule: Rule = HIGH) -> list[StateChange]:
    evaluator = Evaluator([rule], started_at=T0)
    changes = []
    for index, ratio in enumerate([*ratios, "0", "0"]):  # two more: every given minute complete
        changes += evaluator.on_cluster_minute(cluster_minute(index, ratio))
    return changes


def test_a_value_between_the_clear_threshold_and_the_threshold_counts_as_still_firing():
    # given a firing alert (minutes 0-4), then values below the clear threshold for 2 minutes
    # broken by minutes between 0.85 and 0.90 (firing side of the hysteresis), then 3 below
    ratios = ["0.91"] * 5 + ["0.80", "0.87", "0.80", "0.80", "0.86", "0.80", "0.80", "0.80"]
    changes = run_minutes(ratios)
    # then one firing, and one resolve 3 min after the start of the last stretch below 0.85
    assert [(c.status, c.starts_at, c.ends_at) for c in changes] == [
        ("firing", T0 + 5 * MINUTE, None),
        ("resolved", T0 + 5 * MINUTE, T0 + 13 * MINUTE),
    ]


def test_without_keep_firing_for_hysteresis_alone_resolves_on_the_first_minute_below_clear():
    ratios = ["0.91"] * 5 + ["0.87", "0.80", "0.91"]
    changes = run_minutes(ratios, replace(HIGH, keep_firing_for=timedelta(0)))
    assert [(c.status, c.ends_at) for c in changes] == [
        ("firing", None),
        ("resolved", T0 + 6 * MINUTE),
    ]


def test_keep_firing_for_shorter_than_one_minute_resolves_on_the_first_whole_minute_below():
    changes = run_minutes(
        ["0.91"] * 5 + ["0.80"], replace(HIGH, keep_firing_for=timedelta(seconds=30))
    )
    assert [(c.status, c.ends_at) for c in changes] == [
        ("firing", None),
        ("resolved", T0 + 5 * MINUTE + timedelta(seconds=30)),
    ]


def test_the_minute_so_far_and_the_whole_minute_give_the_same_resolve():
    # given sub-minute evaluation, and minute 7 (the third below 0.85) seen after 30 s, then whole
    ratios = ["0.91"] * 5 + ["0.80", "0.80"]
    evaluator = Evaluator([HIGH], started_at=T0, partial_min_gpus_ratio=Decimal("0.95"))
    changes = []
    for index, ratio in enumerate(ratios):
        changes += evaluator.on_cluster_minute(cluster_minute(index, ratio))
    changes += evaluator.on_cluster_minute(cluster_minute(7, "0.80", seconds=30))
    assert [c.status for c in changes] == ["firing"]  # 2 min 30 s below: still kept
    changes += evaluator.on_cluster_minute(cluster_minute(7, "0.80", seconds=60))
    # then it resolves once minute 7 has been seen whole, with the whole-minute ends_at
    assert [(c.status, c.ends_at) for c in changes[1:]] == [("resolved", T0 + 8 * MINUTE)]
    assert run_minutes([*ratios, "0.80"])[1].ends_at == T0 + 8 * MINUTE


# restarts -------------------------------------------------------------------------------------
def test_a_restart_in_the_middle_of_keep_firing_for_goes_on_from_where_it_was():
    # given a firing idle GPU that has been busy for 10 of its 15 minutes
    evaluator = Evaluator([IDLE], started_at=T0)
    feed_gpu(evaluator, T0, IDLE_31_MIN)
    first_busy = T0 + len(IDLE_31_MIN) * SAMPLE
    feed_gpu(evaluator, first_busy, [False] * (10 * 6))
    [written] = evaluator.drain().states.values()
    assert written.keep_firing_since == first_busy
    # when the service restarts from what was written
    restarted = Evaluator([IDLE], started_at=T0, states=[copy.deepcopy(written)])
    # then idle again within the 15 minutes is the same alert, and nothing is sent
    assert feed_gpu(restarted, first_busy + 10 * MINUTE, [True, False]) == []
    # and busy for 15 minutes from there resolves it, once
    again = first_busy + 10 * MINUTE + SAMPLE
    changes = feed_gpu(restarted, again, [False] * (15 * 6 + 1))
    assert [(c.status, c.ends_at) for c in changes] == [("resolved", again + 15 * MINUTE)]


SILENT = Rule(
    name="NodeSilent",
    signal=domain.NODE_SILENCE,
    op=">=",
    threshold=Decimal(120),
    keep_firing_for=timedelta(minutes=5),
)


def test_a_processing_clock_series_writes_its_keep_firing_clock_when_it_starts_and_stops():
    # given a silent node, firing
    evaluator = Evaluator([SILENT], started_at=T0)
    evaluator.on_node_signal(node_signal(T0, idle=False), received_at=T0)
    assert [c.status for c in evaluator.check_absence(T0 + timedelta(seconds=130))] == ["firing"]
    evaluator.drain()
    # when it is heard again: the keep_firing_for clock starts, and is written
    back = T0 + timedelta(seconds=200)
    assert evaluator.on_node_signal(node_signal(back, idle=False), received_at=back) == []
    [written] = evaluator.drain().states.values()
    assert (written.status, written.keep_firing_since) == ("firing", back)
    # when nothing moves on the next ticks, nothing is written
    assert evaluator.check_absence(back + timedelta(seconds=5)) == []
    assert not evaluator.drain()
    # when it falls silent again for the threshold, the clock stops (written), the alert goes on
    assert evaluator.check_absence(back + timedelta(seconds=125)) == []
    [written] = evaluator.drain().states.values()
    assert (written.status, written.keep_firing_since) == ("firing", None)


# the rules file ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "seconds"), [("15m", 900), ("1h30m", 5400), (90, 90), ("0s", 0)])
def test_keep_firing_for_takes_the_duration_syntax_of_for(text: str | int, seconds: int):
    document = {
        "rules": [
            {"name": "R", "signal": "gpu.idle_allocated", "threshold": 1, "keep_firing_for": text}
        ]
    }
    [rule] = config.parse(document, lambda name: None).rules
    assert rule.keep_firing_for.total_seconds() == seconds


def test_a_bad_keep_firing_for_is_reported_with_the_other_problems():
    document = {
        "rules": [
            {"name": "R", "signal": "gpu.idle_allocated", "threshold": 1, "keep_firing_for": "15"},
            {"name": "S", "signal": "gpu.idle_allocated", "threshold": 1, "keep_firing_for": "5x"},
            {"name": "T", "signal": "cluster.nope", "threshold": 1, "keep_firing_for": "-5m"},
        ]
    }
    with pytest.raises(config.ConfigError) as raised:
        config.parse(document, lambda name: None)
    problems = "\n".join(raised.value.problems)
    assert "rule S: keep_firing_for: not a duration" in problems
    assert "rule T: keep_firing_for: not a duration" in problems
    assert "unknown signal 'cluster.nope'" in problems
    assert "rule R" not in problems


def test_the_default_rules_keep_idle_gpus_and_xid_errors_firing_and_nothing_else():
    rules = {r.name: r for r in config.load(DEFAULT_RULES, lambda name: None).rules}
    kept = {name: r.keep_firing_for for name, r in rules.items() if r.keep_firing_for}
    assert kept == {
        "GpuAllocatedIdle": timedelta(minutes=15),
        "GpuXidError": timedelta(minutes=15),
    }
