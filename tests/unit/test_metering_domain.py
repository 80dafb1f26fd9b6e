"""Metering's pure logic: window boundaries, dedup, and totals that replay to the same numbers."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.codec import decode_usage_event
from services.metering import domain
from tests.fixtures.factories import usage

RETENTION = 6 * 3600


def view(
    at: datetime,
    *,
    gpu: str = "GPU-1",
    node: str = "n1",
    interval: float = 10.0,
    project: str | None = "p1",
    util: float = 50.0,
) -> domain.SampleView:
    event = usage(
        node,
        0,
        at,
        gpu_uuid=gpu,
        interval_s=interval,
        project_id=project,
        job_id="j" if project else None,
        util_pct=util,
        mem_used_mib=1,
        power_w=100.0,
        temp_c=40,
    )
    return domain.SampleView.of(decode_usage_event(event, now=at + timedelta(days=1)))


def apply_all(state: domain.NodeState, samples: list[domain.SampleView]) -> list[domain.Outcome]:
    return [state.apply(s, RETENTION, set(), set()) for s in samples]


def test_a_sample_belongs_to_the_hour_in_which_its_interval_starts() -> None:
    """docs/contracts.md §4: 16:00:00Z (10 s) is the 15:00 hour (November HK), 16:00:10Z the
    16:00 hour."""
    state = domain.NodeState()
    base = datetime(2026, 11, 30, 15, 59, 59, tzinfo=UTC)
    apply_all(
        state,
        [
            view(base),
            view(base + timedelta(seconds=1), gpu="GPU-2"),
            view(base + timedelta(seconds=11), gpu="GPU-3"),
        ],
    )
    assert sorted(state.hours) == [
        "p1|H800|2026-11-30T15:00:00+00:00",
        "p1|H800|2026-11-30T16:00:00+00:00",
    ]
    assert state.hours["p1|H800|2026-11-30T15:00:00+00:00"].samples == 2
    assert state.hours["p1|H800|2026-11-30T16:00:00+00:00"].samples == 1


def test_a_redelivered_sample_is_a_duplicate_and_an_unseen_older_one_is_out_of_order() -> None:
    state = domain.NodeState()
    t = datetime(2026, 11, 28, 2, 0, 10, tzinfo=UTC)
    outcomes = apply_all(
        state, [view(t), view(t + timedelta(seconds=10)), view(t), view(t - timedelta(seconds=10))]
    )
    assert outcomes == [
        domain.Outcome.COUNTED,
        domain.Outcome.COUNTED,
        domain.Outcome.DUPLICATE,
        domain.Outcome.OUT_OF_ORDER,
    ]
    assert state.hour_sums("p1|H800|2026-11-28T02:00:00+00:00")[:2] == (Decimal(20), Decimal(10))


def test_unallocated_samples_count_for_utilization_but_never_for_billing() -> None:
    state = domain.NodeState()
    t = datetime(2026, 11, 28, 2, 0, 10, tzinfo=UTC)
    apply_all(state, [view(t, project=None, util=2.0), view(t, gpu="GPU-2")])
    assert list(state.hours) == ["p1|H800|2026-11-28T02:00:00+00:00"]
    minute = state.minute_partial(next(iter(state.minutes)))
    assert minute["gpus"] == 2 and minute["alloc"] == 1 and Decimal(minute["online_s"]) == 20


def test_dedup_memory_stays_bounded_per_gpu() -> None:
    state = domain.NodeState()
    t = datetime(2026, 11, 28, 0, 0, 10, tzinfo=UTC)
    apply_all(state, [view(t + timedelta(seconds=10 * i)) for i in range(1000)])
    state.expire(RETENTION, 900)
    assert state.recent_ids("/nodes/n1|GPU-1") == domain.RECENT_IDS_PER_GPU
    assert len(state.minutes) <= 16


def test_hourly_sums_keep_the_latest_partial_per_node_whatever_the_delivery_order() -> None:
    partials = [
        {"gpu_s": str(10 * n), "util_s": "0", "energy_J": "0", "samples": n} for n in range(1, 6)
    ]
    in_order, record = None, None
    for p in partials:
        in_order, _ = domain.merge_partial(in_order, "n1", p)
    shuffled = partials * 2
    random.Random(3).shuffle(shuffled)
    for p in shuffled:
        record, _ = domain.merge_partial(record, "n1", p)
    key = "p1|H800|2026-11-28T02:00:00+00:00"
    assert domain.hourly_total(key, record) == domain.hourly_total(key, in_order)
    assert domain.hourly_total(key, record).gpu_seconds == Decimal(50)


@settings(max_examples=60, deadline=None)
@given(
    intervals=st.lists(
        st.sampled_from([0.5, 1.0, 10.0, 15.0, 60.0, 3600.0]), min_size=1, max_size=40
    ),
    redeliver=st.lists(st.integers(min_value=0, max_value=39), max_size=20),
)
def test_totals_equal_the_sum_of_distinct_samples_however_often_they_are_delivered(
    intervals, redeliver
) -> None:
    t = datetime(2026, 11, 28, 0, 0, 0, tzinfo=UTC)
    samples = []
    for interval in intervals:
        t += timedelta(seconds=interval)
        samples.append(view(t, interval=interval))
    deliveries = list(samples)
    for index in redeliver:
        if index < len(samples):
            position = min(len(deliveries), deliveries.index(samples[index]) + 1)
            deliveries.insert(position, samples[index])
    state = domain.NodeState()
    apply_all(state, deliveries)
    counted = sum(state.hour_sums(key)[0] for key in state.hours)
    assert counted == sum(Decimal(repr(i)) for i in intervals)
    assert sum(totals.samples for totals in state.hours.values()) == len(intervals)


def test_cluster_minute_allocation_ratio_is_allocated_over_online_gpu_seconds() -> None:
    state = domain.NodeState()
    t = datetime(2026, 11, 28, 2, 0, 10, tzinfo=UTC)
    touched: set[str] = set()
    for gpu in range(10):
        state.apply(
            view(t, gpu=f"GPU-{gpu}", project="p1" if gpu < 9 else None), RETENTION, set(), touched
        )
    record, _ = domain.merge_partial(None, "n1", state.minute_partial(touched.pop()))
    minute = domain.cluster_minute(
        str(int(datetime(2026, 11, 28, 2, 0, tzinfo=UTC).timestamp())), record
    )
    assert minute.allocation_ratio == Decimal("0.9000")
    assert minute.gpus_online == 10 and minute.gpus_allocated == 9


def test_an_hour_is_complete_once_every_node_online_in_it_has_reported_past_its_end() -> None:
    # Given two nodes that both sent samples in the 02:00 hour
    hour = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)
    hour_iso = hour.isoformat()
    a, b = domain.NodeState(), domain.NodeState()
    apply_all(a, [view(hour + timedelta(seconds=10), node="a")])
    apply_all(b, [view(hour + timedelta(seconds=10), node="b", project=None)])
    record = None
    for node, state in (("a", a), ("b", b)):
        for key, fact in state.completeness_facts().items():
            assert key == hour_iso
            record, _ = domain.merge_completeness(record, node, fact)
    assert record is not None
    # Then neither has reported through 03:00 yet: the hour is incomplete, both nodes missing
    first = domain.hour_completeness(hour_iso, record)
    assert (first.nodes_online, first.nodes_through, first.complete) == (2, 0, False)
    assert first.missing_nodes == ["a", "b"]

    # When node a sends a sample ending exactly at 03:00 (it belongs to 02:00, ends at the hour end)
    apply_all(a, [view(hour + timedelta(hours=1), node="a")])
    for fact in a.completeness_facts().values():
        record, _ = domain.merge_completeness(record, "a", fact)
    second = domain.hour_completeness(hour_iso, record)
    assert (second.nodes_through, second.missing_nodes, second.complete) == (1, ["b"], False)
    assert second.revision > first.revision

    # When node b, unallocated, sends a sample of the next hour, and an old fact of a is re-delivered
    apply_all(b, [view(hour + timedelta(hours=1, seconds=10), node="b", project=None)])
    facts = b.completeness_facts()
    assert set(facts) == {hour_iso, (hour + timedelta(hours=1)).isoformat()}
    record, _ = domain.merge_completeness(record, "b", facts[hour_iso])
    record, changed = domain.merge_completeness(record, "a", {"through": False, "rev": 1})
    # Then the hour is complete and the stale fact changed nothing
    assert not changed
    third = domain.hour_completeness(hour_iso, record)
    assert (third.nodes_online, third.nodes_through, third.complete) == (2, 2, True)
    assert third.missing_nodes == []


def test_completeness_facts_survive_the_state_record_and_are_sent_only_when_they_change() -> None:
    hour = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)
    state = domain.NodeState()
    apply_all(state, [view(hour + timedelta(seconds=10 * i)) for i in range(1, 4)])
    assert list(state.completeness_facts()) == [hour.isoformat()]
    apply_all(state, [view(hour + timedelta(seconds=50))])
    assert state.completeness_facts() == {}  # still online, still not through: nothing new
    restored = domain.NodeState(json.loads(json.dumps(state.to_record())))
    assert restored.completeness_facts(everything=True) == {
        hour.isoformat(): {"through": False, "rev": 4}
    }


def test_a_redelivery_after_a_restart_from_the_state_record_is_still_a_duplicate() -> None:
    t = datetime(2026, 11, 28, 2, 0, 10, tzinfo=UTC)
    state = domain.NodeState()
    apply_all(state, [view(t), view(t + timedelta(seconds=10))])
    restored = domain.NodeState(json.loads(json.dumps(state.to_record())))
    assert apply_all(restored, [view(t), view(t - timedelta(seconds=10))]) == [
        domain.Outcome.DUPLICATE,
        domain.Outcome.OUT_OF_ORDER,
    ]


_awkward = st.one_of(
    st.floats(min_value=0, max_value=100, allow_nan=False),  # any double: often 15+ decimals
    st.integers(min_value=0, max_value=10**6).map(lambda n: n / 10**4),  # <= 4 decimals
    st.sampled_from([0.0, 0.1, 33.333333333333336, 66.66666666666667, 99.99999999, 1e-10]),
)


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from([1.0, 10.0, 0.5, 2.5, 0.123456789, 0.1234567891, 7.000000001]),
            _awkward,
            st.floats(min_value=0, max_value=2000, allow_nan=False),
        ),
        min_size=1,
        max_size=40,
    ),
    restore_at=st.integers(min_value=0, max_value=40),
)
def test_sums_are_exact_decimals_of_the_json_text_whatever_the_floats(
    rows: list[tuple[float, float, float]], restore_at: int
) -> None:
    """Integer fast path and Decimal remainder together equal the exact decimal reference, also
    when the state is written to its record and read back in the middle."""
    from decimal import localcontext

    state = domain.NodeState()
    t = datetime(2026, 11, 28, 2, 10, 0, tzinfo=UTC)  # every interval inside the 02:00 hour
    expected = [Decimal(0), Decimal(0), Decimal(0)]
    with localcontext() as ctx:
        ctx.prec = 2000  # the reference must not round either
        for i, (interval, util, power) in enumerate(rows):
            if i == restore_at:
                state = domain.NodeState(json.loads(json.dumps(state.to_record())))
            t += timedelta(seconds=1)
            sample = domain.SampleView.make(
                node="n1",
                source="/nodes/n1",
                event_id=f"e{i}",
                end_n=domain.epoch_ns(t),
                interval_s=interval,
                project_id="p1",
                gpu_model="H800",
                util_pct=util,
                power_w=power,
                xid_errors=0,
                gpu_uuid="GPU-1",
            )
            assert state.apply(sample, RETENTION, set(), set()) == domain.Outcome.COUNTED
            d_interval, d_util, d_power = (Decimal(repr(v)) for v in (interval, util, power))
            expected[0] += d_interval
            expected[1] += d_util * d_interval / 100
            expected[2] += d_power * d_interval
    (key,) = state.hours
    assert state.hour_sums(key)[:3] == tuple(expected)
    minute_online = sum(Decimal(state.minute_partial(k)["online_s"]) for k in state.minutes)
    assert minute_online == expected[0]


def test_scaled_accepts_only_values_whose_decimal_fits_nine_places() -> None:
    assert domain.scaled(10.0) == 10 * 10**9
    assert domain.scaled(0.1) == 10**8
    assert domain.scaled(512.345) == 512_345_000_000
    assert domain.scaled(0.123456789) == 123_456_789
    assert domain.scaled(0.1234567891) is None
    assert domain.scaled(66.66666666666667) is None
    assert domain.plain(domain.scaled(0.1) or 0, 9) == "0.1"


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.integers(min_value=1, max_value=900),  # seconds since the previous sample
            st.sampled_from(["GPU-1", "GPU-2"]),
            st.sampled_from([0.5, 10.0, 33.333333333333336]),
            st.booleans(),  # write the record after this sample (as a commit would)
        ),
        min_size=1,
        max_size=60,
    )
)
def test_a_record_written_between_samples_equals_one_built_from_scratch(steps) -> None:
    # Written hours and minutes are kept until a sample changes them: a record written at any
    # point must still be exactly the state's, as if nothing had been kept.
    t = datetime(2026, 11, 28, 0, 0, 0, tzinfo=UTC)
    state = domain.NodeState()
    samples = []
    for gap, gpu, util, write in steps:
        t += timedelta(seconds=gap)
        samples.append(view(t, gpu=gpu, util=util))
        state.apply(samples[-1], RETENTION, set(), set())
        state.expire(RETENTION, 15 * 60)
        if write:
            assert state.to_record() == from_scratch(samples).to_record()
    assert state.to_record() == from_scratch(samples).to_record()


def from_scratch(samples: list[domain.SampleView]) -> domain.NodeState:
    state = domain.NodeState()
    for sample in samples:
        state.apply(sample, RETENTION, set(), set())
        state.expire(RETENTION, 15 * 60)
    return state


# --- per-job totals ------------------------------------------------------------------------------

JOB_T0 = datetime(2026, 11, 30, 15, 0, 10, tzinfo=UTC)


def job_sample(
    i: int, gpu: int, job: str | None, util: float, interval: float = 10.0
) -> domain.SampleView:
    return domain.SampleView.make(
        node="n1",
        source="/nodes/n1",
        event_id=f"e{i}-{gpu}",
        end_n=domain.epoch_ns(JOB_T0 + timedelta(seconds=10 * i)),
        interval_s=interval,
        project_id=None if job is None else "p1",
        gpu_model="H800",
        util_pct=util,
        power_w=300.0,
        xid_errors=0,
        gpu_uuid=f"GPU-{gpu}",
        job_id=job,
    )


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["slurm:1", "slurm:2", None]),
            st.sampled_from([0.0, 4.99, 5.0, 87.5]),
            st.sampled_from([10.0, 0.1, 1e-10 + 9.9]),
        ),
        min_size=1,
        max_size=60,
    )
)
def test_job_totals_sum_to_the_projects_hourly_totals_and_count_idle_time_exactly(
    rows: list[tuple[str | None, float, float]],
) -> None:
    state = domain.NodeState()
    jobs: set[str] = set()
    for i, (job, util, interval) in enumerate(rows):
        sample = job_sample(i, i % 4, job, util, interval)
        assert (
            state.apply(sample, RETENTION, set(), set(), touched_jobs=jobs)
            == domain.Outcome.COUNTED
        )
    restored = domain.NodeState(json.loads(json.dumps(state.to_record())))  # survives a record
    for node_state in (state, restored):
        totals = defaultdict(Decimal)
        for key in node_state.jobs:
            for name, value in node_state.job_partial(key).items():
                totals[name] += Decimal(value)
        hours = defaultdict(Decimal)
        for key in node_state.hours:
            for name, value in node_state.hour_partial(key).items():
                hours[name] += Decimal(value)
        for name in ("gpu_s", "util_s", "energy_J", "samples"):
            assert totals[name] == hours[name], name
        allocated = [(u, iv) for job, u, iv in rows if job is not None]
        assert totals["idle_s"] == sum(
            (Decimal(repr(iv)) for u, iv in allocated if u < 5), Decimal(0)
        )
    assert jobs == set(state.jobs)
    assert all(key.count("|") == 3 for key in state.jobs)
