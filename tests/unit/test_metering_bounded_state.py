"""One node's metering state stays bounded whatever a writer sends: GPUs and hour keys have a
maximum, GPUs silent past the retention are forgotten, and the record stays far below the
producer's request size."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from services.metering import domain
from tests.unit.test_metering_domain import RETENTION, view

T0 = datetime(2026, 11, 28, 1, 0, tzinfo=UTC)
REQUEST_BYTES = 1024 * 1024  # the producer's default max request size


def test_a_flood_of_gpu_ids_on_one_node_keeps_at_most_the_maximum_and_dead_letters_the_rest() -> (
    None
):
    state = domain.NodeState()
    outcomes: Counter[domain.Outcome] = Counter()
    for n in range(20_000):
        outcome = state.apply(
            view(T0 + timedelta(seconds=n % 50), gpu=f"GPU-fake-{n}"), RETENTION, set(), set()
        )
        outcomes[outcome] += 1
    assert outcomes[domain.Outcome.COUNTED] == domain.MAX_GPUS_PER_NODE
    assert outcomes[domain.Outcome.TOO_MANY_GPUS] == 20_000 - domain.MAX_GPUS_PER_NODE
    assert len(state.gpus) == domain.MAX_GPUS_PER_NODE
    record = json.dumps(state.to_record())
    assert len(record) < REQUEST_BYTES / 10, len(record)


def test_a_flood_of_project_ids_keeps_at_most_the_maximum_hour_keys() -> None:
    state = domain.NodeState()
    outcomes: Counter[domain.Outcome] = Counter()
    for n in range(3000):
        at = T0 + timedelta(seconds=10 * (n + 1))
        outcomes[state.apply(view(at, project=f"p{n}"), RETENTION, set(), set())] += 1
    assert len(state.hours) == domain.MAX_HOUR_KEYS_PER_NODE
    assert outcomes[domain.Outcome.TOO_MANY_HOUR_KEYS] == 3000 - domain.MAX_HOUR_KEYS_PER_NODE
    assert len(json.dumps(state.to_record())) < REQUEST_BYTES / 4


def test_gpus_silent_past_the_retention_are_forgotten_and_make_room() -> None:
    state = domain.NodeState()
    for g in range(domain.MAX_GPUS_PER_NODE):
        assert (
            state.apply(view(T0, gpu=f"old-{g}"), RETENTION, set(), set()) is domain.Outcome.COUNTED
        )
    # one GPU keeps reporting for longer than the retention; the others fell silent at T0
    at = T0
    while at < T0 + timedelta(seconds=RETENTION + 2 * 3600):
        at += timedelta(minutes=10)
        state.apply(view(at, gpu="old-0"), RETENTION, set(), set())
        state.expire(RETENTION, 15 * 60)
    assert list(state.gpus) == ["/nodes/n1|old-0"]
    assert list(state.last_samples) == ["old-0"]
    # and a new GPU now counts
    later = at + timedelta(seconds=10)
    assert state.apply(view(later, gpu="new"), RETENTION, set(), set()) is domain.Outcome.COUNTED


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=7), min_size=1, max_size=40), st.integers(0, 7))
def test_forgetting_gpus_keeps_every_minutes_online_gpus(gpus: list[int], silent: int) -> None:
    """The minutes' GPU bitmasks are by position in the GPU table: renumbered when a GPU goes,
    they still count and name the same GPUs."""
    state = domain.NodeState()
    for i, g in enumerate(gpus):
        state.apply(view(T0 + timedelta(seconds=i), gpu=f"G{g}"), RETENTION, set(), set())
    before = {
        k: sorted(k2 for k2, bit in state.gpu_bits.items() if m.gpus & bit)
        for k, m in state.minutes.items()
    }
    gone = f"/nodes/n1|G{silent}"
    if gone not in state.gpus:
        return
    state._forget_gpus([gone])
    after = {
        k: sorted(k2 for k2, bit in state.gpu_bits.items() if m.gpus & bit)
        for k, m in state.minutes.items()
    }
    assert after == {k: [g for g in names if g != gone] for k, names in before.items()}
    # the record reads back to the same state
    again = domain.NodeState(json.loads(json.dumps(state.to_record())))
    assert again.to_record() == state.to_record()


def test_a_forgotten_node_keeps_only_its_newest_end_and_never_counts_those_hours_again() -> None:
    state = domain.NodeState()
    first = [view(T0 + timedelta(seconds=10 * i), node="n1") for i in range(1, 100)]
    for sample in first:
        state.apply(sample, RETENTION, set(), set())
    record = state.forgotten()
    assert len(json.dumps(record)) < 60, record
    again = domain.NodeState(json.loads(json.dumps(record)))
    # a redelivered sample of the forgotten hours is refused, as the sums hold those hours
    assert again.apply(first[5], RETENTION, set(), set()) is domain.Outcome.BEYOND_RETENTION
    # a sample of a later hour counts, and the floor survives the next record
    later = view(T0 + timedelta(hours=9), node="n1")
    assert again.apply(later, RETENTION, set(), set()) is domain.Outcome.COUNTED
    kept = domain.NodeState(json.loads(json.dumps(again.to_record())))
    other_gpu = view(T0 + timedelta(seconds=60), node="n1", gpu="GPU-9")
    assert kept.apply(other_gpu, RETENTION, set(), set()) is domain.Outcome.BEYOND_RETENTION
