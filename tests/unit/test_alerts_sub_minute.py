"""Sub-minute evaluation on plain values: the minute in progress, its coverage guard, `for`,
hysteresis, replays, and agreement with whole-minute evaluation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from schemas.metering import ClusterMinute
from services.alerts.domain import Evaluator, Rule, Watermark

T0 = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
GPUS = 80
GUARD = Decimal("0.95")

HIGH = Rule(
    name="CentreAllocationHigh",
    signal="cluster.allocation_ratio",
    op=">=",
    threshold=Decimal("0.90"),
    clear_threshold=Decimal("0.85"),
    for_=timedelta(minutes=5),
    labels={"severity": "warning"},
    annotations={"summary": "allocation {value}"},
)
HIGH_NOW = Rule(**{**HIGH.__dict__, "name": "AllocationHighNow", "for_": timedelta(0)})


def so_far(
    index: int, ratio: str, seconds: float = 60, gpus: int = GPUS, revision: int | None = None
) -> ClusterMinute:
    """Minute `index`'s cumulative record after `seconds` of it, `gpus` GPUs having reported."""
    online = Decimal(gpus) * Decimal(str(seconds))
    return ClusterMinute(
        minute_start=T0 + index * MINUTE,
        nodes_reporting=gpus // 8,
        gpus_online=gpus,
        gpus_allocated=int(Decimal(ratio) * gpus),
        online_gpu_seconds=online,
        allocated_gpu_seconds=Decimal(ratio) * online,
        allocation_ratio=Decimal(ratio),
        mean_util_pct=Decimal("50"),
        mean_power_w=(Decimal(300) * online / 60).quantize(Decimal("0.1")),
        xid_errors=0,
        revision=revision if revision is not None else int(gpus * seconds),
    )


def evaluator(rules: list[Rule], *, sub_minute: bool = True, reference: int | None = GPUS):
    """An evaluator that has already evaluated the complete minute before T0 (`reference` GPUs)."""
    watermark = (
        Watermark(T0 - MINUTE, T0 - MINUTE, reference) if reference is not None else Watermark()
    )
    return Evaluator(
        rules,
        started_at=T0,
        minute_lateness=MINUTE,
        partial_min_gpus_ratio=GUARD if sub_minute else None,
        watermark=watermark,
    )


def feed(ev: Evaluator, records: list[ClusterMinute]):
    return [change for record in records for change in ev.on_cluster_minute(record)]


def test_a_crossing_in_the_minute_in_progress_fires_before_the_minute_completes():
    # given a `for: 0` rule and a complete minute of 80 GPUs before it
    ev = evaluator([HIGH_NOW])
    # when the minute so far (5 s, every GPU) is at 0.95
    changes = ev.on_cluster_minute(so_far(0, "0.95", seconds=5))
    # then it fires at once, starting at the minute's start
    assert [(c.status, c.starts_at, c.value) for c in changes] == [("firing", T0, Decimal("0.95"))]
    assert ev.watermark.last_evaluated_minute == T0 - MINUTE  # the minute itself is still held


def test_a_minute_that_has_barely_started_does_not_fire_until_it_covers_the_centre():
    ev = evaluator([HIGH_NOW])
    # when one node of ten (8 of 80 GPUs) has reported, all allocated
    assert ev.on_cluster_minute(so_far(0, "1.00", seconds=3, gpus=8)) == []
    # and 75 of 80 GPUs (under 95%) have reported
    assert ev.on_cluster_minute(so_far(0, "0.99", seconds=4, gpus=75)) == []
    # then it fires once 76 of 80 (95%) have
    changes = ev.on_cluster_minute(so_far(0, "0.98", seconds=5, gpus=76))
    assert [c.status for c in changes] == ["firing"]


def test_without_a_complete_minute_to_compare_with_nothing_is_evaluated_until_one_completes():
    ev = evaluator([HIGH_NOW], reference=None)
    assert ev.on_cluster_minute(so_far(0, "0.95", seconds=30)) == []
    assert ev.on_cluster_minute(so_far(1, "0.95", seconds=30)) == []
    # minute 0 completes once minute 2 is seen (one minute of lateness): whole-minute evaluation
    changes = ev.on_cluster_minute(so_far(2, "0.95", seconds=30))
    assert [(c.status, c.starts_at) for c in changes] == [("firing", T0)]
    assert ev.watermark.last_evaluated_gpus_online == GPUS


def test_a_held_minute_that_does_not_cover_enough_holds_back_later_minutes():
    ev = evaluator([HIGH_NOW])
    # minute 0 so far covers 40 of 80 GPUs (some nodes' samples are late); minute 1 covers all
    ev.on_cluster_minute(so_far(0, "0.50", seconds=60, gpus=40))
    assert ev.on_cluster_minute(so_far(1, "0.99", seconds=10)) == []
    # once minute 0 covers enough, both are evaluated, in minute order
    changes = ev.on_cluster_minute(so_far(0, "0.50", seconds=60, gpus=80))
    assert [(c.status, c.starts_at) for c in changes] == [("firing", T0 + MINUTE)]


def test_for_five_minutes_counts_from_the_first_breaching_minute_and_fires_on_its_fifth_full_minute():
    ev = evaluator([HIGH])
    changes = []
    for index in range(4):
        for seconds in (20, 40, 60):
            changes += ev.on_cluster_minute(so_far(index, "0.93", seconds))
    changes += ev.on_cluster_minute(so_far(4, "0.93", seconds=20))
    changes += ev.on_cluster_minute(so_far(4, "0.93", seconds=59))
    assert changes == []  # four minutes and 59 s of breaching data: still pending
    [state] = ev.states.values()
    assert (state.status, state.pending_since) == ("pending", T0)
    # when the fifth minute has been seen whole (before it is complete)
    changes = ev.on_cluster_minute(so_far(4, "0.93", seconds=60))
    # then it fires, with the same starts_at whole-minute evaluation gives
    assert [(c.status, c.starts_at) for c in changes] == [("firing", T0 + 5 * MINUTE)]


def test_a_minute_in_progress_after_a_partly_seen_minute_keeps_the_for_clock_running():
    ev = evaluator([HIGH])
    changes = []
    # each minute seen only up to 50 s before the next one starts being evaluated
    for index in range(6):
        changes += ev.on_cluster_minute(so_far(index, "0.93", seconds=50))
    assert [(c.status, c.starts_at) for c in changes] == [("firing", T0 + 5 * MINUTE)]


def test_a_dip_in_the_minute_so_far_resets_pending_as_a_whole_minute_dip_does():
    ev = evaluator([HIGH])
    for index in range(3):
        ev.on_cluster_minute(so_far(index, "0.93"))
    ev.on_cluster_minute(so_far(3, "0.89", seconds=30))
    [state] = ev.states.values()
    assert state.status == "inactive"
    ev.on_cluster_minute(so_far(3, "0.91", seconds=60))  # the minute recovers: pending anew
    assert (state.status, state.pending_since) == ("pending", T0 + 3 * MINUTE)


def test_oscillation_between_86_and_92_within_and_across_minutes_sends_one_notification():
    ev = evaluator([HIGH])
    changes = []
    for index in range(5):
        changes += ev.on_cluster_minute(so_far(index, "0.92"))
    for index in range(5, 45):
        # the cumulative value of each minute swings between 0.86 and 0.92 as it fills up
        for step, seconds in enumerate((10, 20, 30, 40, 50, 60)):
            ratio = "0.86" if (index + step) % 2 else "0.92"
            changes += ev.on_cluster_minute(so_far(index, ratio, seconds))
    assert [c.status for c in changes] == ["firing"]
    assert [s.status for s in ev.states.values()] == ["firing"]


def test_a_drop_below_clear_in_the_minute_so_far_resolves_at_the_start_of_that_minute():
    ev = evaluator([HIGH_NOW])
    feed(ev, [so_far(0, "0.95"), so_far(1, "0.95")])
    changes = ev.on_cluster_minute(so_far(2, "0.50", seconds=2))
    assert [(c.status, c.ends_at) for c in changes] == [("resolved", T0 + 2 * MINUTE)]
    # and the minute's complete evaluation, later, changes nothing
    assert feed(ev, [so_far(2, "0.50"), so_far(3, "0.50"), so_far(4, "0.50")]) == []


def test_revisions_and_the_complete_minute_after_a_later_minute_was_observed_change_nothing():
    ev = evaluator([HIGH_NOW])
    feed(ev, [so_far(0, "0.95", seconds=58), so_far(1, "0.95", seconds=5)])
    # minute 0's last revision (below clear) arrives after minute 1 was evaluated: event time
    # does not go back, neither for it nor when minute 0 completes
    assert ev.on_cluster_minute(so_far(0, "0.10", seconds=60)) == []
    assert ev.on_cluster_minute(so_far(2, "0.95", seconds=5)) == []
    assert [s.status for s in ev.states.values()] == ["firing"]


def test_a_shrunken_centre_pauses_sub_minute_evaluation_until_its_first_minute_completes():
    ev = evaluator([HIGH_NOW])
    # 20 of 80 GPUs go away: the minute so far never reaches 95% of the last complete minute
    assert ev.on_cluster_minute(so_far(0, "0.99", gpus=60)) == []
    assert ev.on_cluster_minute(so_far(1, "0.99", gpus=60)) == []
    # minute 0 completes (minute 2 seen): evaluated whole, and 60 GPUs become the yardstick
    changes = ev.on_cluster_minute(so_far(2, "0.99", seconds=5, gpus=60))
    assert [(c.status, c.starts_at) for c in changes] == [("firing", T0)]
    assert ev.watermark.last_evaluated_gpus_online == 60
    assert ev.on_cluster_minute(so_far(3, "0.10", seconds=5, gpus=60))[0].status == "resolved"


def test_counts_are_evaluated_on_complete_minutes_only_and_power_is_scaled_to_the_seconds_seen():
    few_gpus = Rule(name="FewGpus", signal="cluster.gpus_online", op="<", threshold=Decimal(80))
    power = Rule(name="PowerHigh", signal="cluster.mean_power_w", op=">=", threshold=Decimal(20000))
    ev = evaluator([few_gpus, power])
    # when 76 GPUs (enough to evaluate) have reported 15 s at 300 W each: 22,800 W
    changes = ev.on_cluster_minute(so_far(0, "0.5", seconds=15, gpus=76))
    # then power fires on its scaled value and the GPU count waits for the complete minute
    assert [(c.rule, c.value) for c in changes] == [("PowerHigh", Decimal("22800.0"))]
    changes = feed(ev, [so_far(0, "0.5", seconds=60, gpus=76), so_far(1, "0.5"), so_far(2, "0.5")])
    assert [(c.rule, c.status) for c in changes] == [("FewGpus", "firing")]


def test_replaying_the_same_records_gives_the_same_state_changes():
    records = [
        so_far(index, ratio, seconds)
        for index, ratio in enumerate(["0.80", "0.93", "0.95", "0.97", "0.91", "0.92", "0.84"] * 3)
        for seconds in (5, 30, 60)
    ]
    first = feed(evaluator([HIGH, HIGH_NOW]), records)
    second = feed(evaluator([HIGH, HIGH_NOW]), records)
    assert first == second and len(first) >= 4


def test_redelivered_records_after_a_restart_change_nothing():
    records = [so_far(index, "0.95", seconds) for index in range(7) for seconds in (10, 60)]
    ev = evaluator([HIGH, HIGH_NOW])
    changes = feed(ev, records)
    # a restart restores states, held minutes and watermark (as the store does), not the memo
    restored = Evaluator(
        [HIGH, HIGH_NOW],
        started_at=T0,
        minute_lateness=MINUTE,
        partial_min_gpus_ratio=GUARD,
        states=ev.states.values(),
        pending_minutes=ev.pending_minutes.values(),
        watermark=ev.watermark,
    )
    assert len(changes) == 2 and feed(restored, records) == []


@given(st.lists(st.sampled_from(["0.80", "0.86", "0.88", "0.90", "0.92", "0.97"]), max_size=30))
def test_minutes_that_fill_up_at_a_steady_value_give_the_same_notifications_as_whole_minutes(
    ratios: list[str],
):
    """Sub-minute evaluation changes when a notification is sent, not what it says."""
    rules = [HIGH, HIGH_NOW]
    tail = ["0.00"] * 3  # the first tail minute is complete in whole-minute mode
    whole = feed(
        evaluator(rules, sub_minute=False), [so_far(i, r) for i, r in enumerate(ratios + tail)]
    )
    partial = feed(
        evaluator(rules),
        [so_far(i, r, s) for i, r in enumerate(ratios + tail) for s in (1, 20, 45, 60)],
    )
    assert partial == whole
