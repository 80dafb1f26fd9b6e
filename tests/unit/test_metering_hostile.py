"""What a careless or hostile writer sends is dead-lettered with a reason of its own by the real
decode path, and no input at all makes an exception other than the codec's escape it."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.codec import InvalidUsage
from services.metering.domain import NodeState, Outcome
from services.metering.fast_decode import decode_samples
from tests.fixtures.hostile import event, hostile_messages

NOW = datetime(2026, 11, 28, 3, 0, tzinfo=UTC)
AT = NOW - timedelta(minutes=5)
RETENTION_S = 7 * 24 * 3600


def reasons(raw: bytes | None, key: bytes = b"node-h") -> list[str]:
    try:
        decoded = decode_samples(raw, now=NOW, key=key)
    except InvalidUsage as error:
        return [error.reason]
    return [error.reason for error in decoded.errors] + ["counted"] * len(decoded.samples)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [(raw, reason) for _, raw, reason in hostile_messages("node-h", AT)],
    ids=[what for what, _, _ in hostile_messages("node-h", AT)],
)
def test_each_hostile_message_gets_one_dead_letter_with_its_own_reason(
    raw: bytes | None, reason: str
) -> None:
    assert reasons(raw) == [reason]


def test_a_hostile_event_in_a_batch_costs_only_itself() -> None:
    bad = event("node-h", 1, AT, project_id="x|y")
    batch = [event("node-h", 0, AT), bad, event("node-h", 2, AT)]
    assert sorted(reasons(json.dumps(batch).encode())) == ["counted", "counted", "invalid_text"]


def test_the_text_rule_takes_what_agents_send() -> None:
    model = event("node-h", 0, AT, gpu_model="NVIDIA H800 80GB HBM3", job_id="slurm:123456")
    model["id"] = "node-017/GPU-5d1c0f3e-7a2b-4c1d-9e8f-0a1b2c3d4e5f/1795830000"
    assert reasons(json.dumps(model).encode()) == ["counted"]


def accounted(raw: bytes | None) -> None:
    """The decode-and-apply path on `raw`: every event counted, duplicate or a typed error."""
    try:
        decoded = decode_samples(raw, now=NOW, key=b"node-h")
    except InvalidUsage:
        return
    state = NodeState(None)
    for sample in decoded.samples:
        outcome = state.apply(sample, RETENTION_S, set(), set())
        assert isinstance(outcome, Outcome)
    state.signal("node-h")
    # the state a worker writes reads back (an OverflowError here stopped metering on reload)
    NodeState(json.loads(json.dumps(state.to_record())))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_random_bytes_never_raise_anything_but_the_codecs_errors(raw: bytes) -> None:
    accounted(raw)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)
PATHS = [
    ("id",),
    ("source",),
    ("time",),
    ("type",),
    ("specversion",),
    ("subject",),
    ("data",),
    *[("data", name) for name in event("n", 0, AT)["data"]],
]


def mutate(sample: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    sample = copy.deepcopy(sample)
    target = sample
    for name in path[:-1]:
        target = target[name] if isinstance(target.get(name), dict) else {}
    target[path[-1]] = value
    return sample


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.sampled_from(PATHS), JSON_VALUES, st.booleans()), min_size=1, max_size=5),
    st.booleans(),
)
def test_mutated_events_and_batches_are_each_accounted_for(
    mutations: list[tuple[tuple[str, ...], Any, bool]], as_batch: bool
) -> None:
    events = []
    for gpu, (path, value, delete) in enumerate(mutations):
        sample = event("node-h", gpu, AT)
        if delete and len(path) == 2:
            sample["data"].pop(path[1], None)
        elif delete:
            sample.pop(path[0], None)
        else:
            sample = mutate(sample, path, value)
        events.append(sample)
    raw = json.dumps(events if as_batch else events[0]).encode()
    accounted(raw)
    if as_batch:
        got = reasons(raw)
        assert len(got) in (1, len(events))  # one whole-message error, or one outcome per event
