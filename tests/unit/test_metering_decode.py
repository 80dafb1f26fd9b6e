"""The fast decode path decides exactly as the codec does: same samples, same dead-letter reasons."""

from __future__ import annotations

import copy
import dataclasses
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas.codec import InvalidUsage, decode_usage_message
from services.metering.domain import SampleView
from services.metering.fast_decode import decode_samples
from tests.fixtures.factories import usage

NOW = datetime(2026, 11, 28, 3, 0, tzinfo=UTC)


def good(gpu: int = 0, **data: Any) -> dict:
    event = usage(
        "node-1",
        gpu,
        NOW - timedelta(minutes=5),
        gpu_uuid=f"GPU-{gpu}",
        project_id="p1",
        util_pct=55.5,
        mem_used_mib=1,
        mem_total_mib=2,
        power_w=300.25,
        temp_c=40,
    )
    event["data"].update(data)
    return event


def mutated(path: tuple[str, ...], value: Any) -> dict:
    event = copy.deepcopy(good())
    target = event
    for name in path[:-1]:
        target = target[name]
    if value is KeyError:
        target.pop(path[-1], None)
    else:
        target[path[-1]] = value
    return event


VARIANTS = [
    good(),
    good(project_id=None, job_id=None),
    good(interval_s=10),  # an int where a float is expected: the codec decides
    good(util_pct=100),
    good(util_pct=100.5),
    good(util_pct=-0.5),
    good(util_pct=True),
    good(interval_s=0.0),
    good(interval_s=3600.0),
    good(interval_s=3600.5),
    good(power_w=-1.0),
    good(gpu_index=-1),
    good(gpu_index=1.0),
    good(xid_errors=True),
    good(node="node-2"),
    good(node=""),
    good(gpu_model=None),
    good(temp_c="40"),
    good(extra_field="ignored"),
    good(util_pct=55.1234567891),  # more than 9 decimals: exact Decimal path
    good(power_w=0.1 + 0.2),
    good(interval_s=9.9999999999),
    good(mem_used_mib=-1),
    good(gpu_uuid=""),
    mutated(("time",), "2026-11-28T02:55:00+08:00"),
    mutated(("time",), "2026-11-28T02:55:00.123456Z"),
    mutated(("time",), "2026-11-28T02:55:00.1234567Z"),
    mutated(("time",), "2026-11-28 02:55:00Z"),
    mutated(("time",), "2026-11-28T02:55:00"),
    mutated(("time",), "2026-11-28T03:20:00Z"),
    mutated(("time",), 1795830000),
    mutated(("time",), "2026-13-28T02:55:00Z"),
    mutated(("specversion",), "0.3"),
    mutated(("type",), "io.gpumeter.gpu.usage.v9"),
    mutated(("id",), ""),
    mutated(("id",), KeyError),
    mutated(("source",), 7),
    mutated(("subject",), 7),
    mutated(("subject",), None),
    mutated(("datacontenttype",), None),
    mutated(("data",), "not an object"),
    mutated(("data", "project_id"), KeyError),
    mutated(("data", "job_id"), 3),
    mutated(("data", "mem_total_mib"), KeyError),
    "a string",
    {"hello": "world"},
]


def outcome(decode: Any, raw: bytes) -> tuple[Any, ...]:
    try:
        decoded = decode(raw)
    except InvalidUsage as error:
        return ("raised", error.reason, error.detail)
    return (
        "decoded",
        [dataclasses.asdict(sample) for sample in decoded[0]],
        [(error.reason, error.detail) for error in decoded[1]],
    )


def by_codec(raw: bytes) -> tuple[list[SampleView], list[InvalidUsage]]:
    decoded = decode_usage_message(raw, now=NOW, key=b"node-1")
    return [SampleView.of(e) for e in decoded.events], decoded.errors


def by_fast_path(raw: bytes) -> tuple[list[SampleView], list[InvalidUsage]]:
    decoded = decode_samples(raw, now=NOW, key=b"node-1")
    return decoded.samples, decoded.errors


@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_the_fast_path_decodes_each_event_as_the_codec_does_alone_and_in_a_batch(
    variant: int,
) -> None:
    event = VARIANTS[variant]
    for raw in (json.dumps(event).encode(), json.dumps([good(1), event, good(2)]).encode()):
        assert outcome(by_fast_path, raw) == outcome(by_codec, raw)


@pytest.mark.parametrize(
    "raw", [b"not json", b"[]", b"\xff\xfe", b"[" + b" " * (1024 * 1024) + b"]", b"null", b"3"]
)
def test_the_fast_path_rejects_whole_messages_with_the_codecs_reason(raw: bytes) -> None:
    assert outcome(by_fast_path, raw) == outcome(by_codec, raw)


def test_well_formed_messages_take_the_struct_decoder_and_decode_as_the_codec_does() -> None:
    # The fast layer must be the one that decides ordinary traffic (else it is dead code that
    # merely costs a failed parse), and decide it exactly as the codec would.
    from services.metering.fast_decode import _all_well_formed

    for raw in (
        json.dumps(good()).encode(),
        json.dumps([good(g) for g in range(8)]).encode(),
        json.dumps([good(1, project_id=None, job_id=None), good(2, util_pct=0.0)]).encode(),
        json.dumps([good(1), good(2, interval_s=5.0), good(3), good(4, util_pct=1e-10)]).encode(),
    ):
        samples = _all_well_formed(raw, b"node-1", NOW.timestamp())
        assert samples is not None
        assert [dataclasses.asdict(s) for s in samples] == outcome(by_codec, raw)[1]
    # Anything it does not take in full is left to the general path.
    assert _all_well_formed(json.dumps([good(1), good(interval_s=10)]).encode(), None, 0.0) is None


def test_the_struct_decoder_accepts_exactly_the_contracts_event_type() -> None:
    from typing import get_args, get_type_hints

    from schemas.usage import USAGE_EVENT_TYPE
    from services.metering.fast_decode import _Event

    assert get_args(get_type_hints(_Event)["type"]) == (USAGE_EVENT_TYPE,)
