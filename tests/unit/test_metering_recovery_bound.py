"""A metering worker stuck in a rebalance says so and leaves, instead of reading healthy for good
(seen on Apache Kafka in the three-node drill: Faust's rebalance waited on a commit to a
partitioned broker, and /healthz skipped its stall check all the while)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from services.metering.app import STUCK_EXIT_STATUS, RecoveryClock
from services.metering.settings import MeteringSettings


def test_the_clock_runs_from_the_first_observation_of_a_rebalance_and_resets_after_it() -> None:
    clock = RecoveryClock()
    assert clock.observe(False, 10.0) is None
    assert clock.observe(True, 11.0) == 0.0
    assert clock.observe(True, 311.5) == 300.5
    # A rebalance that ended and a new one that began: counted from the new one
    assert clock.observe(False, 312.0) is None
    assert clock.observe(True, 400.0) == 0.0
    assert clock.observe(True, 401.0) == 1.0


def test_a_stuck_worker_exits_with_its_own_status_and_says_why() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "from services.metering.app import exit_stuck; exit_stuck(301.4)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == STUCK_EXIT_STATUS == 70
    assert "rebalancing or recovering tables for 301 s" in done.stderr


def test_the_request_timeout_is_bounded_and_not_below_the_session_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert MeteringSettings().kafka_request_timeout_ms == 30000  # Faust's own default is 90 s
    monkeypatch.setenv("KAFKA_SESSION_TIMEOUT_MS", "45000")
    with pytest.raises(ValidationError, match="KAFKA_REQUEST_TIMEOUT_MS .* must not be below"):
        MeteringSettings()
    monkeypatch.setenv("KAFKA_REQUEST_TIMEOUT_MS", "45000")
    assert MeteringSettings().kafka_request_timeout_ms == 45000


def test_a_usage_partition_left_unfetched_is_named_after_the_wait_and_only_then() -> None:
    from collections import namedtuple

    from services.metering.app import left_inactive

    TP = namedtuple("TP", "topic partition")
    usage = [TP("gpu.usage.v1", p) for p in range(3)]
    other = TP("metering.internal.node-hourly.v2", 0)
    since: dict = {}
    assigned = {*usage, other}
    # Partition 1 and an internal partition left out of the fetches: only usage ones are watched
    active = {usage[0], usage[2]}
    assert left_inactive(assigned, active, "gpu.usage.v1", since, 100.0, 10.0) == []
    assert left_inactive(assigned, active, "gpu.usage.v1", since, 109.9, 10.0) == []
    assert left_inactive(assigned, active, "gpu.usage.v1", since, 110.0, 10.0) == [usage[1]]
    # Fetched again in between: the wait starts over
    assert left_inactive(assigned, set(usage), "gpu.usage.v1", since, 111.0, 10.0) == []
    assert left_inactive(assigned, active, "gpu.usage.v1", since, 112.0, 10.0) == []
    assert left_inactive(assigned, active, "gpu.usage.v1", since, 122.0, 10.0) == [usage[1]]
    # Revoked: forgotten
    assert left_inactive({usage[0]}, {usage[0]}, "gpu.usage.v1", since, 130.0, 10.0) == []
    assert since == {}
