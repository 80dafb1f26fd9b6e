"""Per-job hourly records as billing's consumer takes them from metering.usage.jobs.hourly.v1:
whatever a writer puts on the topic, a record is either a JobHourlyTotal billing can store or a
named refusal (dead-lettered by the consumer), never an exception of another kind."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.billing.consumer import BadHourlyRecord, decode_job_hourly

GOOD = {
    "project_id": "hkgai-llm",
    "job_id": "slurm:7",
    "gpu_model": "H800",
    "hour_start": "2026-11-30T15:00:00+00:00",
    "gpu_seconds": "7200",
    "util_gpu_seconds": "3600",
    "idle_gpu_seconds": "0",
    "energy_wh": "600.5",
    "nodes": 1,
    "samples": 720,
    "revision": 720,
}


def test_a_good_record_is_taken_with_its_hour_in_utc() -> None:
    record = {**GOOD, "hour_start": "2026-11-30T23:00:00+08:00"}
    total = decode_job_hourly(json.dumps(record).encode())
    assert total.hour_start.isoformat() == "2026-11-30T15:00:00+00:00"
    assert total.job_id == "slurm:7"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"hour_start": "2026-11-30T15:30:00+00:00"}, "invalid_job_record"),
        ({"hour_start": "1999-01-01T00:00:00+00:00"}, "invalid_job_record"),
        ({"gpu_seconds": "-1"}, "invalid_job_record"),
        ({"idle_gpu_seconds": "7201"}, "invalid_job_record"),  # idle beyond allocated
        ({"samples": -1}, "invalid_job_record"),
        ({"gpu_seconds": "NaN"}, "invalid_job_record"),
        ({"nodes": "many"}, "invalid_job_record"),
    ],
)
def test_impossible_records_are_refused_with_a_reason(change: dict, reason: str) -> None:
    with pytest.raises(BadHourlyRecord) as refused:
        decode_job_hourly(json.dumps({**GOOD, **change}).encode())
    assert refused.value.reason == reason


@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_bytes_are_a_record_or_a_named_refusal(raw: bytes) -> None:
    try:
        decode_job_hourly(raw)
    except BadHourlyRecord as refused:
        assert refused.reason in {"not_json", "invalid_job_record"}
