"""Billing signals and pipeline health on plain values: subsidy cap, unpriced usage, dead-letter
rate and metering lag."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from schemas.billing import SlurmHold, SubsidyUsage, UnpricedUsage
from schemas.metering import ClusterMinute
from services.alerts import config
from services.alerts.domain import Evaluator, Rule

T0 = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)
MINUTE = timedelta(minutes=1)
DEFAULT_RULES = Path(__file__).resolve().parents[2] / "deploy" / "alert-rules.yaml"
SHIPPED = {rule.name: rule for rule in config.load(DEFAULT_RULES, lambda name: None).rules}


def subsidy(project: str, ratio: str, at: datetime) -> SubsidyUsage:
    return SubsidyUsage(
        project_id=project,
        scheme="hku-research",
        cap_hkd=Decimal(1000),
        used_hkd=Decimal(ratio) * 1000,
        used_ratio=Decimal(ratio),
        as_of=at,
    )


def unpriced(hours: str, at: datetime, period: str = "2026-11") -> UnpricedUsage:
    return UnpricedUsage(
        gpu_model="NVIDIA B200", period=period, gpu_hours=Decimal(hours), projects=["p1"], as_of=at
    )


def names(changes) -> list[tuple[str, str, str]]:
    return [
        (c.rule, c.status, c.labels.get("project", c.labels.get("gpu_model", ""))) for c in changes
    ]


def test_subsidy_use_past_80_and_100_percent_fires_warning_then_critical_per_project():
    evaluator = Evaluator(
        [SHIPPED["SubsidyCapNearlyUsed"], SHIPPED["SubsidyCapUsedUp"]], started_at=T0
    )
    assert evaluator.on_billing_signal(subsidy("p1", "0.79", T0)) == []
    assert evaluator.on_billing_signal(subsidy("p2", "0.50", T0)) == []
    warning = evaluator.on_billing_signal(subsidy("p1", "0.80", T0 + MINUTE))
    assert names(warning) == [("SubsidyCapNearlyUsed", "firing", "p1")]
    assert warning[0].labels["severity"] == "warning"
    assert (
        warning[0].annotations["summary"].startswith("Project p1 has used 80% of its hku-research")
    )
    critical = evaluator.on_billing_signal(subsidy("p1", "1.00", T0 + 2 * MINUTE))
    assert names(critical) == [("SubsidyCapUsedUp", "firing", "p1")]
    # a raised cap: both resolve; hysteresis keeps the warning firing at 0.77
    assert names(evaluator.on_billing_signal(subsidy("p1", "0.77", T0 + 3 * MINUTE))) == [
        ("SubsidyCapUsedUp", "resolved", "p1")
    ]
    assert names(evaluator.on_billing_signal(subsidy("p1", "0.70", T0 + 4 * MINUTE))) == [
        ("SubsidyCapNearlyUsed", "resolved", "p1")
    ]


def test_an_older_subsidy_signal_replayed_after_a_newer_one_changes_nothing():
    evaluator = Evaluator([SHIPPED["SubsidyCapNearlyUsed"]], started_at=T0)
    evaluator.on_billing_signal(subsidy("p1", "0.90", T0 + MINUTE))
    assert evaluator.on_billing_signal(subsidy("p1", "0.10", T0)) == []
    assert evaluator.on_billing_signal(subsidy("p1", "0.90", T0 + MINUTE)) == []


def test_unpriced_usage_fires_per_model_and_period_and_resolves_when_priced():
    evaluator = Evaluator([SHIPPED["UnpricedGpuModel"]], started_at=T0)
    fired = evaluator.on_billing_signal(unpriced("3.25", T0))
    assert names(fired) == [("UnpricedGpuModel", "firing", "NVIDIA B200")]
    assert fired[0].labels["period"] == "2026-11"
    assert fired[0].annotations["summary"] == (
        "3.25 GPU-hours on NVIDIA B200 in 2026-11 have no rate card (projects: p1)"
    )
    assert evaluator.on_billing_signal(unpriced("7", T0 + MINUTE)) == []  # still firing, no repeat
    other_period = evaluator.on_billing_signal(unpriced("1", T0 + MINUTE, period="2026-12"))
    assert [c.labels["period"] for c in other_period] == ["2026-12"]
    resolved = evaluator.on_billing_signal(unpriced("0", T0 + 2 * MINUTE))
    assert [(c.status, c.labels["period"]) for c in resolved] == [("resolved", "2026-11")]


DEAD_LETTERS = SHIPPED["DeadLetterRateHigh"]


def test_dead_letters_over_100_a_minute_for_five_windows_fire_and_resolve_below_20():
    evaluator = Evaluator([DEAD_LETTERS], started_at=T0)
    changes = evaluator.on_offsets(T0, usage_end=0, dead_letter_end=1000)  # a baseline only
    total = 1000
    for window in range(1, 6):
        total += 150  # 150 a minute
        changes += evaluator.on_offsets(T0 + window * MINUTE, 0, total)
        if window < 5:
            assert changes == []
    assert [(c.rule, c.status, c.value) for c in changes] == [
        ("DeadLetterRateHigh", "firing", Decimal("150.0"))
    ]
    assert changes[0].starts_at == T0 + 5 * MINUTE
    # 50 a minute: above the clear level, still firing; 10 a minute: resolved
    assert evaluator.on_offsets(T0 + 6 * MINUTE, 0, total + 50) == []
    resolved = evaluator.on_offsets(T0 + 7 * MINUTE, 0, total + 60)
    assert [(c.status, c.value) for c in resolved] == [("resolved", Decimal("10.0"))]


def test_the_dead_letter_rate_is_scaled_to_a_minute_and_readings_inside_a_window_wait():
    evaluator = Evaluator([Rule(**{**DEAD_LETTERS.__dict__, "for_": timedelta(0)})], started_at=T0)
    evaluator.on_offsets(T0, 0, 0)
    assert evaluator.on_offsets(T0 + 30 * SECOND, 0, 500) == []  # window not over yet
    [fired] = evaluator.on_offsets(T0 + 90 * SECOND, 0, 600)
    assert fired.value == Decimal("400.0")  # 600 letters in 90 s


def test_a_dead_letter_burst_shorter_than_five_minutes_does_not_fire():
    evaluator = Evaluator([DEAD_LETTERS], started_at=T0)
    evaluator.on_offsets(T0, 0, 0)
    ends = [1000, 2000, 3000, 4000, 4005, 5005]
    changes = [
        change
        for window, end in enumerate(ends, start=1)
        for change in evaluator.on_offsets(T0 + window * MINUTE, 0, end)
    ]
    assert changes == []


LAG = SHIPPED["MeteringLagging"]


def cluster_minute(start: datetime) -> ClusterMinute:
    return ClusterMinute(
        minute_start=start,
        nodes_reporting=1,
        gpus_online=8,
        gpus_allocated=0,
        online_gpu_seconds=Decimal(480),
        allocated_gpu_seconds=Decimal(0),
        allocation_ratio=Decimal(0),
        mean_util_pct=Decimal(0),
        mean_power_w=Decimal(0),
        xid_errors=0,
        revision=1,
    )


def lag_run(evaluator: Evaluator, first_s: int, last_s: int, usage_grows: bool = True):
    """A reading every 10 s from T0 + first_s to T0 + last_s; usage grows 10 a second if asked."""
    changes = []
    for second in range(first_s, last_s + 1, 10):
        usage_end = 1000 + (second * 10 if usage_grows else 0)
        changes += evaluator.on_offsets(T0 + second * SECOND, usage_end, 0)
    return changes


def test_an_idle_centre_with_an_old_newest_minute_never_fires_metering_lag():
    evaluator = Evaluator([LAG], started_at=T0)
    evaluator.ingest_cluster_minute(cluster_minute(T0 - 60 * MINUTE))
    assert lag_run(evaluator, 0, 900, usage_grows=False) == []


def test_metering_lag_over_five_minutes_for_two_fires_while_usage_arrives_and_resolves():
    evaluator = Evaluator([LAG], started_at=T0 - 60 * MINUTE)
    evaluator.ingest_cluster_minute(cluster_minute(T0 - 60 * MINUTE))
    # usage is first seen growing at T0 + 10 s and metering publishes nothing newer: the lag counts
    # from then, not from the hour-old minute; over 300 s from T0 + 320 s, for 2 min: T0 + 440 s
    assert lag_run(evaluator, 0, 430) == []
    [fired] = lag_run(evaluator, 440, 440)
    assert (fired.rule, fired.status, fired.starts_at) == (
        "MeteringLagging",
        "firing",
        T0 + 440 * SECOND,
    )
    assert fired.value == 430
    # metering catches up: the newest minute is the current one
    evaluator.ingest_cluster_minute(cluster_minute(T0 + 7 * MINUTE))
    [resolved] = lag_run(evaluator, 450, 450)
    assert (resolved.status, resolved.value) == ("resolved", Decimal(0))


def test_metering_lag_resolves_when_usage_stops_arriving():
    evaluator = Evaluator([Rule(**{**LAG.__dict__, "for_": timedelta(0)})], started_at=T0)
    assert [c.status for c in lag_run(evaluator, 0, 320)] == ["firing"]
    # no growth for longer than the input-active window (2 min): the lag no longer counts
    quiet = [
        c
        for second in range(330, 500, 10)
        for c in evaluator.on_offsets(T0 + second * SECOND, 99_999, 0)
    ]
    assert [c.status for c in quiet] == ["resolved"]


def test_strict_operators_are_accepted_in_the_rules_file():
    document = {
        "rules": [
            {"name": "Unpriced", "signal": "billing.unpriced_gpu_hours", "op": ">", "threshold": 0}
        ]
    }
    [rule] = config.parse(document, lambda name: None).rules
    assert rule.breaches(Decimal("0.01")) and not rule.breaches(Decimal(0))


def forecast(project: str, ratio: str, days_left: int | None, at: datetime) -> SubsidyUsage:
    return subsidy(project, ratio, at).model_copy(
        update={
            "burn_hkd_per_day": Decimal(40),
            "days_left": days_left,
            "exhausted_on": None
            if days_left is None
            else (at + days_left * timedelta(days=1)).date(),
            "approval_ends_on": datetime(2027, 6, 30).date(),
        }
    )


def test_a_fast_burner_is_warned_of_exhaustion_before_the_80_percent_rule_fires():
    evaluator = Evaluator(
        [SHIPPED["SubsidyCapExhaustionSoon"], SHIPPED["SubsidyCapNearlyUsed"]], started_at=T0
    )
    assert evaluator.on_billing_signal(forecast("p1", "0.40", 45, T0)) == []
    soon = evaluator.on_billing_signal(forecast("p1", "0.50", 25, T0 + MINUTE))
    assert names(soon) == [("SubsidyCapExhaustionSoon", "firing", "p1")]  # at 50% used
    assert soon[0].annotations["summary"] == (
        "Project p1's hku-research subsidy runs out around 2026-12-23 (25 days) at 40 HKD/day;"
        " its approval ends 2027-06-30"
    )
    # hysteresis: 33 days still fires; the burn slowing (no forecast) resolves it
    assert evaluator.on_billing_signal(forecast("p1", "0.50", 33, T0 + 2 * MINUTE)) == []
    assert names(evaluator.on_billing_signal(forecast("p1", "0.51", None, T0 + 3 * MINUTE))) == [
        ("SubsidyCapExhaustionSoon", "resolved", "p1")
    ]
    # a signal from before the forecast existed never fires it
    assert evaluator.on_billing_signal(subsidy("p2", "0.10", T0)) == []


def test_a_held_slurm_account_fires_and_its_release_resolves():
    evaluator = Evaluator([SHIPPED["SlurmAccountHeld"]], started_at=T0)

    def hold(held: bool, at: datetime, dry_run: bool = False) -> SlurmHold:
        return SlurmHold(
            project_id="p1", held=held, dry_run=dry_run, reason="AISS subsidy cap used up", as_of=at
        )

    fired = evaluator.on_billing_signal(hold(True, T0))
    assert names(fired) == [("SlurmAccountHeld", "firing", "p1")]
    assert (
        fired[0]
        .annotations["summary"]
        .startswith("Slurm account p1 is held (applied to Slurm): AISS subsidy cap used up")
    )
    assert names(evaluator.on_billing_signal(hold(False, T0 + MINUTE))) == [
        ("SlurmAccountHeld", "resolved", "p1")
    ]
