"""A redelivery of samples counted hours ago is a duplicate, not disorder, with bounded state."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from services.metering import domain
from tests.unit.test_metering_domain import RETENTION, view

T0 = datetime(2026, 11, 28, 0, 0, 10, tzinfo=UTC)
GPU = "/nodes/n1|GPU-1"


def run_for(state: domain.NodeState, first: int, last: int) -> list[domain.SampleView]:
    samples = [view(T0 + timedelta(seconds=10 * i)) for i in range(first, last)]
    for sample in samples:
        assert state.apply(sample, RETENTION, set(), set()) is domain.Outcome.COUNTED
        state.expire(RETENTION, 900)
    return samples


def test_two_hundred_samples_sent_hours_earlier_are_duplicates_also_after_a_restart() -> None:
    state = domain.NodeState()
    sent = run_for(state, 0, 4 * 360)  # four hours of one GPU
    redelivered = sent[100:300]  # about three and a half hours old
    assert Counter(state.apply(s, RETENTION, set(), set()) for s in redelivered) == {
        domain.Outcome.DUPLICATE: 200
    }
    restored = domain.NodeState(json.loads(json.dumps(state.to_record())))
    assert Counter(restored.apply(s, RETENTION, set(), set()) for s in redelivered) == {
        domain.Outcome.DUPLICATE: 200
    }
    assert len(state.gpus[GPU].runs) == 1  # one stretch: the agent never paused


def test_a_late_sample_for_time_never_counted_is_still_out_of_order() -> None:
    state = domain.NodeState()
    run_for(state, 0, 360)
    run_for(state, 720, 1080)  # an hour's gap in between
    in_gap = view(T0 + timedelta(seconds=10 * 500))
    before_all = view(T0 - timedelta(seconds=10))
    in_first = view(T0 + timedelta(seconds=10 * 200))
    outcomes = [state.apply(s, RETENTION, set(), set()) for s in (in_gap, before_all, in_first)]
    assert outcomes == [
        domain.Outcome.OUT_OF_ORDER,
        domain.Outcome.OUT_OF_ORDER,
        domain.Outcome.DUPLICATE,
    ]
    assert len(state.gpus[GPU].runs) == 2


def test_jittered_sampling_stays_one_stretch_and_gaps_are_bounded() -> None:
    state = domain.NodeState()
    at = T0
    for i in range(500):
        interval = 10.0 + (0.4 if i % 2 else -0.4)
        at += timedelta(seconds=10)
        state.apply(view(at, interval=interval), RETENTION, set(), set())
    assert len(state.gpus[GPU].runs) == 1
    for _ in range(300):  # an agent that keeps pausing: a stretch per burst, but bounded
        at += timedelta(seconds=60)
        state.apply(view(at), RETENTION, set(), set())
    assert len(state.gpus[GPU].runs) == domain.COVERED_RUNS_PER_GPU


def test_stretches_older_than_the_retention_are_dropped() -> None:
    state = domain.NodeState()
    run_for(state, 0, 10)
    run_for(state, 100, 110)
    later = T0 + timedelta(seconds=RETENTION + 2 * 3600 + 2000)
    state.apply(view(later), RETENTION, set(), set())
    state.expire(RETENTION, 900)
    assert [len(c.runs) for c in state.gpus.values()] == [1]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=60, unique=True))
def test_any_redelivery_of_counted_samples_counts_nothing_more(order: list[int]) -> None:
    """However often and in whatever order counted samples come again, totals do not move."""
    state = domain.NodeState()
    sent = run_for(state, 0, 301)
    key = "p1|H800|2026-11-28T00:00:00+00:00"
    before = state.hour_sums(key)
    outcomes = {state.apply(sent[i], RETENTION, set(), set()) for i in order}
    assert outcomes == {domain.Outcome.DUPLICATE}
    assert state.hour_sums(key) == before
