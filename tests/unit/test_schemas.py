"""The codec turns every class of bad input of docs/contracts.md §1 into its own typed error."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from schemas import codec
from schemas.jsonschema import SCHEMA_DIR, render
from tests.fixtures.factories import usage

NOW = datetime(2026, 11, 28, 2, 0, 30, tzinfo=UTC)


def sample(**data_overrides: object) -> dict:
    event = usage(
        "node-017",
        3,
        datetime(2026, 11, 28, 2, 0, 10, tzinfo=UTC),
        gpu_uuid="GPU-1",
        util_pct=87.5,
        mem_used_mib=61234,
        power_w=512.3,
        temp_c=61,
    )
    event["data"].update(data_overrides)
    return event


def test_a_valid_single_event_and_a_batch_decode_to_the_same_samples() -> None:
    single = codec.decode_usage_message(json.dumps(sample()).encode(), now=NOW)
    batch = codec.decode_usage_message(json.dumps([sample()]).encode(), now=NOW)
    assert single.events == batch.events
    assert single.events[0].data.util_pct == 87.5
    assert single.events[0].time == datetime(2026, 11, 28, 2, 0, 10, tzinfo=UTC)


def test_the_contract_example_event_is_valid() -> None:
    example = {
        "specversion": "1.0",
        "id": "node-017/GPU-5d1c0f3e-7a2b-4c1d-9e8f-0a1b2c3d4e5f/1795830000",
        "source": "/nodes/node-017",
        "type": "io.gpumeter.gpu.usage.v1",
        "subject": "GPU-5d1c0f3e-7a2b-4c1d-9e8f-0a1b2c3d4e5f",
        "time": "2026-11-28T02:00:10Z",
        "datacontenttype": "application/json",
        "data": {
            "node": "node-017",
            "gpu_uuid": "GPU-5d1c0f3e-7a2b-4c1d-9e8f-0a1b2c3d4e5f",
            "gpu_index": 3,
            "gpu_model": "H800",
            "interval_s": 10.0,
            "project_id": "hkgai-llm",
            "job_id": "slurm:123456",
            "util_pct": 87.5,
            "mem_used_mib": 61234,
            "mem_total_mib": 81559,
            "power_w": 512.3,
            "temp_c": 61,
            "xid_errors": 0,
        },
    }
    decoded = codec.decode_usage_message(json.dumps(example).encode(), now=NOW, key=b"node-017")
    assert not decoded.errors and len(decoded.events) == 1


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"\xff\xfe not json", codec.NotJson),
        (b'{"truncated": ', codec.NotJson),
        (b"x" * (1024 * 1024 + 1), codec.TooLarge),
        (b"[]", codec.NotCloudEvent),
    ],
)
def test_whole_message_problems_raise_their_typed_error(raw: bytes, error: type) -> None:
    with pytest.raises(error):
        codec.decode_usage_message(raw, now=NOW)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda e: e.pop("specversion"), "not_cloudevent"),
        (lambda e: e.update(type="io.gpumeter.gpu.usage.v2"), "unknown_type"),
        (lambda e: e["data"].pop("gpu_model"), "invalid_field"),
        (lambda e: e["data"].update(util_pct="87.5"), "invalid_field"),
        (lambda e: e["data"].update(gpu_index=True), "invalid_field"),
        (lambda e: e["data"].update(util_pct=100.5), "util_out_of_range"),
        (lambda e: e["data"].update(util_pct=-1), "util_out_of_range"),
        (lambda e: e["data"].update(interval_s=0), "interval_out_of_range"),
        (lambda e: e["data"].update(interval_s=3600.5), "interval_out_of_range"),
        (lambda e: e.update(time="2026-11-28T02:05:31Z"), "time_in_future"),
        (lambda e: e.update(time="yesterday"), "invalid_field"),
        (lambda e: e.update(time="2026-11-28T02:00:10"), "invalid_field"),
    ],
)
def test_each_bad_event_gets_its_reason_and_its_good_neighbours_survive(
    mutate, reason: str
) -> None:
    bad = sample()
    mutate(bad)
    good = sample(gpu_uuid="GPU-2")
    decoded = codec.decode_usage_message(json.dumps([good, bad]).encode(), now=NOW)
    assert [e.data.gpu_uuid for e in decoded.events] == ["GPU-2"]
    assert [e.reason for e in decoded.errors] == [reason]
    assert decoded.errors[0].detail.startswith("event[1]: ")


def test_a_sample_exactly_five_minutes_ahead_is_still_accepted() -> None:
    event = sample()
    event["time"] = "2026-11-28T02:05:30Z"
    assert codec.decode_usage_message(json.dumps(event).encode(), now=NOW).events


def test_a_message_keyed_by_another_node_is_refused() -> None:
    decoded = codec.decode_usage_message(json.dumps(sample()).encode(), now=NOW, key=b"node-018")
    assert [e.reason for e in decoded.errors] == ["key_mismatch"]


def test_dead_letters_carry_the_original_bytes_in_base64() -> None:
    letter = codec.dead_letter(
        "not_json", detail="x", raw=b"\x00abc", topic="t", partition=2, offset=9
    )
    assert letter.raw == "AGFiYw==" and letter.partition == 2 and letter.offset == 9


def test_checked_in_json_schemas_match_the_models() -> None:
    """Run `python -m schemas.jsonschema` after changing a model."""
    for filename, text in render().items():
        assert (SCHEMA_DIR / filename).read_text() == text, f"{filename} drifted from its model"
