"""Bytes <-> models for usage samples, with one typed error per class of bad input (CONTRACTS §1)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from schemas.dead_letter import DeadLetter
from schemas.usage import (
    MAX_FUTURE_SKEW_S,
    MAX_INTERVAL_S,
    MAX_MESSAGE_BYTES,
    USAGE_EVENT_TYPE,
    UsageEvent,
)

CLOUDEVENT_REQUIRED = ("specversion", "id", "source", "type")


class InvalidUsage(Exception):
    """A message, or one event in a batch, that cannot be counted. `reason` is machine-readable."""

    reason = "invalid"

    def __init__(self, detail: str, index: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail if index is None else f"event[{index}]: {detail}"
        self.index = index


class TooLarge(InvalidUsage):
    reason = "too_large"


class NotJson(InvalidUsage):
    reason = "not_json"


class NotCloudEvent(InvalidUsage):
    reason = "not_cloudevent"


class UnknownType(InvalidUsage):
    reason = "unknown_type"


class InvalidField(InvalidUsage):
    reason = "invalid_field"


class UtilOutOfRange(InvalidUsage):
    reason = "util_out_of_range"


class IntervalOutOfRange(InvalidUsage):
    reason = "interval_out_of_range"


class TimeInFuture(InvalidUsage):
    reason = "time_in_future"


class KeyMismatch(InvalidUsage):
    reason = "key_mismatch"


@dataclass
class DecodedMessage:
    events: list[UsageEvent]
    errors: list[InvalidUsage]


def decode_usage_message(
    raw: bytes, *, now: datetime | None = None, key: bytes | None = None
) -> DecodedMessage:
    """Decode one Kafka message value: a single event or a CloudEvents JSON batch.

    A whole-message problem (size, JSON) raises; per-event problems are returned beside the good
    events so one bad sample never costs its neighbours.
    """
    if len(raw) > MAX_MESSAGE_BYTES:
        raise TooLarge(f"message is {len(raw)} bytes; the limit is {MAX_MESSAGE_BYTES}")
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotJson(f"not JSON: {exc}") from None
    now = now or datetime.now(UTC)
    expected_node = key.decode("utf-8", "replace") if key else None
    if isinstance(document, list):
        if not document:
            raise NotCloudEvent("empty batch")
        items: list[tuple[int | None, Any]] = list(enumerate(document))
    else:
        items = [(None, document)]
    decoded = DecodedMessage(events=[], errors=[])
    for index, item in items:
        try:
            decoded.events.append(
                decode_usage_event(item, now=now, index=index, node=expected_node)
            )
        except InvalidUsage as error:
            decoded.errors.append(error)
    return decoded


def decode_usage_event(
    item: Any, *, now: datetime, index: int | None = None, node: str | None = None
) -> UsageEvent:
    if not isinstance(item, dict) or any(name not in item for name in CLOUDEVENT_REQUIRED):
        raise NotCloudEvent(
            f"not a CloudEvent: needs the attributes {', '.join(CLOUDEVENT_REQUIRED)}", index
        )
    if item.get("type") != USAGE_EVENT_TYPE:
        raise UnknownType(f"unknown type {item.get('type')!r}; expected {USAGE_EVENT_TYPE}", index)
    data = item.get("data")
    if isinstance(data, dict):
        # Range checks first: they have reasons of their own, sharper than a generic field error.
        util = data.get("util_pct")
        if isinstance(util, int | float) and not isinstance(util, bool) and not 0 <= util <= 100:
            raise UtilOutOfRange(f"util_pct {util} is outside [0, 100]", index)
        interval = data.get("interval_s")
        if (
            isinstance(interval, int | float)
            and not isinstance(interval, bool)
            and not 0 < interval <= MAX_INTERVAL_S
        ):
            raise IntervalOutOfRange(
                f"interval_s {interval} is outside (0, {MAX_INTERVAL_S:g}]", index
            )
    try:
        event = UsageEvent.model_validate(item)
    except ValidationError as exc:
        raise InvalidField(_describe(exc), index) from None
    if event.time - now > timedelta(seconds=MAX_FUTURE_SKEW_S):
        raise TimeInFuture(
            f"time {event.time.isoformat()} is more than {MAX_FUTURE_SKEW_S:g} s ahead of {now.isoformat()}",
            index,
        )
    if node is not None and event.data.node != node:
        raise KeyMismatch(f"message key {node!r} differs from data.node {event.data.node!r}", index)
    return event


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"])
        parts.append(f"{location}: {error['msg']}")
    return "; ".join(parts)


def encode_usage_batch(events: list[UsageEvent]) -> bytes:
    """CloudEvents batch format (application/cloudevents-batch+json)."""
    return ("[" + ",".join(e.model_dump_json(exclude_none=False) for e in events) + "]").encode()


def dead_letter(
    error: InvalidUsage | str,
    *,
    detail: str = "",
    raw: bytes,
    topic: str,
    partition: int,
    offset: int,
) -> DeadLetter:
    reason = error if isinstance(error, str) else error.reason
    return DeadLetter(
        reason=reason,
        detail=detail if isinstance(error, str) else error.detail,
        topic=topic,
        partition=partition,
        offset=offset,
        raw=base64.b64encode(raw).decode("ascii"),
    )
