"""CloudEvents Kafka binding, binary content mode, as the official Python SDK produces it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from cloudevents.core.bindings.kafka import to_binary
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from schemas.codec import InvalidUsage, from_binary_mode
from services.metering.fast_decode import decode_samples
from tests.fixtures.hostile import event

NOW = datetime(2026, 11, 28, 3, 0, tzinfo=UTC)
AT = NOW - timedelta(minutes=5)


def sdk_binary(sample: dict, **overrides: object) -> tuple[list[tuple[str, bytes]], bytes]:
    attributes = {k: v for k, v in sample.items() if k != "data"}
    attributes["time"] = datetime.fromisoformat(attributes["time"].replace("Z", "+00:00"))
    attributes.update(overrides)
    message = to_binary(CloudEvent(attributes=attributes, data=sample["data"]), JSONFormat())
    return list(message.headers.items()), message.value


def test_an_sdk_binary_mode_message_decodes_as_its_structured_twin() -> None:
    sample = event("node-b", 0, AT)
    headers, value = sdk_binary(sample)
    assert any(name == "ce_specversion" for name, _ in headers)
    rebuilt = from_binary_mode(headers, value)
    assert rebuilt is not None
    binary = decode_samples(json.dumps(rebuilt).encode(), now=NOW, key=b"node-b")
    structured = decode_samples(json.dumps(sample).encode(), now=NOW, key=b"node-b")
    assert not binary.errors and binary.samples == structured.samples


def test_a_message_without_ce_headers_is_not_binary_mode() -> None:
    sample = event("node-b", 0, AT)
    assert from_binary_mode([], json.dumps(sample).encode()) is None
    assert from_binary_mode([("content-type", b"application/cloudevents+json")], b"{}") is None


@pytest.mark.parametrize(
    ("headers", "value", "reason"),
    [
        ([("ce_specversion", b"1.0"), ("content-type", b"text/plain")], b"hi", "not_json"),
        ([("ce_specversion", b"1.0"), ("ce_id", b"\xff\xfe")], b"{}", "invalid_text"),
        ([("ce_specversion", b"1.0")], b"", "empty"),
        ([("ce_specversion", b"1.0")], None, "tombstone"),
    ],
)
def test_bad_binary_mode_messages_have_reasons(
    headers: list, value: bytes | None, reason: str
) -> None:
    with pytest.raises(InvalidUsage) as caught:
        from_binary_mode(headers, value)
    assert caught.value.reason == reason


def test_binary_mode_attributes_get_the_same_checks() -> None:
    sample = event("node-b", 0, AT)
    headers, value = sdk_binary(sample, source="/nodes/a|b")
    rebuilt = from_binary_mode(headers, value)
    decoded = decode_samples(json.dumps(rebuilt).encode(), now=NOW, key=b"node-b")
    assert [e.reason for e in decoded.errors] == ["invalid_text"] and not decoded.samples
