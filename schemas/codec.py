"""Bytes <-> models for usage samples, with one typed error per class of bad input
(docs/contracts.md §1)."""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from schemas.dead_letter import DeadLetter
from schemas.usage import (
    MAX_FUTURE_SKEW_S,
    MAX_GPU_INDEX,
    MAX_INTERVAL_S,
    MAX_MEM_MIB,
    MAX_MESSAGE_BYTES,
    MAX_POWER_W,
    MAX_TEMP_C,
    MAX_TEXT_CHARS,
    MAX_XID_ERRORS,
    MIN_EVENT_TIME,
    MIN_TEMP_C,
    TEXT_RULE,
    USAGE_EVENT_TYPE,
    UsageEvent,
)

CLOUDEVENT_REQUIRED = ("specversion", "id", "source", "type")
# The texts of an event and of its data, checked against TEXT_RULE (None is allowed where the
# model allows it; a wrong type is the model's to report).
EVENT_TEXTS = ("id", "source", "subject")
DATA_TEXTS = ("node", "gpu_uuid", "gpu_model", "project_id", "job_id")
# Every number of the data with its physical bounds.
DATA_BOUNDS: dict[str, tuple[float, float]] = {
    "gpu_index": (0, MAX_GPU_INDEX),
    "interval_s": (0, MAX_INTERVAL_S),
    "util_pct": (0, 100),
    "mem_used_mib": (0, MAX_MEM_MIB),
    "mem_total_mib": (0, MAX_MEM_MIB),
    "power_w": (0, MAX_POWER_W),
    "temp_c": (MIN_TEMP_C, MAX_TEMP_C),
    "xid_errors": (0, MAX_XID_ERRORS),
}


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


class EmptyMessage(InvalidUsage):
    reason = "empty"


class Tombstone(InvalidUsage):
    reason = "tombstone"


class TooDeep(InvalidUsage):
    reason = "too_deep"


class NumberOutOfRange(InvalidUsage):
    reason = "number_out_of_range"


class TimeOutOfRange(InvalidUsage):
    reason = "time_out_of_range"


class InvalidText(InvalidUsage):
    reason = "invalid_text"


def _reject_constant(name: str) -> Any:
    raise NumberOutOfRange(f"{name} is not a finite number")


def load_json(raw: bytes | None) -> Any:
    """A message value as JSON, or the typed error of why it is not one a consumer can take:
    a tombstone, an empty value, too large, not JSON (invalid UTF-8 included), nested past the
    parser's depth, or holding a number that is not finite or has more digits than Python reads."""
    if raw is None:
        raise Tombstone("a tombstone (null value): usage messages always carry events")
    if not raw:
        raise EmptyMessage("an empty message")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise TooLarge(f"message is {len(raw)} bytes; the limit is {MAX_MESSAGE_BYTES}")
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotJson(f"not JSON: {exc}") from None
    except RecursionError:
        raise TooDeep("nested too deeply for a usage event") from None
    except ValueError as exc:  # an integer of more digits than int() takes
        raise NumberOutOfRange(f"a number out of range: {exc}") from None


CE_HEADER_PREFIX = "ce_"


def _header_items(headers: Any) -> list[tuple[str, bytes | None]]:
    items = headers.items() if isinstance(headers, dict) else (headers or ())
    out = []
    for name, value in items:
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        out.append((str(name), value))
    return out


def from_binary_mode(headers: Any, raw: bytes | None) -> dict[str, Any] | None:
    """The event of a message in the CloudEvents Kafka binding's binary content mode (attributes
    in `ce_*` headers, `content-type` for datacontenttype, the data as the value), in the shape
    of a structured-mode event; None when the message is not in binary mode (no
    `ce_specversion` header). Its data must be JSON."""
    attributes: dict[str, Any] = {}
    content_type = None
    for name, value in _header_items(headers):
        lowered = name.lower()
        if lowered.startswith(CE_HEADER_PREFIX) or lowered == "content-type":
            try:
                text = (value or b"").decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidText(f"header {name!r} is not UTF-8") from None
            if lowered == "content-type":
                content_type = text
            else:
                attributes[lowered[len(CE_HEADER_PREFIX) :]] = text
    if "specversion" not in attributes:
        return None
    if content_type is not None:
        media = content_type.split(";")[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise NotJson(f"binary-mode data of content type {content_type!r}: only JSON is taken")
        attributes["datacontenttype"] = content_type
    attributes["data"] = load_json(raw)
    return attributes


def describe_text(value: str) -> str:
    """Why a text breaks TEXT_RULE, without echoing a long or hostile value whole."""
    if not value:
        return "is empty"
    if len(value) > MAX_TEXT_CHARS:
        return f"has {len(value)} characters; at most {MAX_TEXT_CHARS}"
    for position, char in enumerate(value):
        if TEXT_RULE.fullmatch(char) is None:
            return f"has {char!r} at position {position}: only printable ASCII other than '|'"
    return "is not allowed"


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a huge integer"
    return text if len(text) <= 40 else text[:37] + "..."


def check_event(item: dict[str, Any], data: dict[str, Any], index: int | None) -> None:
    """The checks with reasons of their own, before the model's: finite numbers within physical
    bounds, texts by TEXT_RULE."""
    for name in ("util_pct", "interval_s"):  # their reasons are older than the general bound
        value = data.get(name)
        if isinstance(value, float) and not math.isfinite(value):
            raise NumberOutOfRange(f"{name} is {value}, not a finite number", index)
    util = data.get("util_pct")
    if isinstance(util, int | float) and not isinstance(util, bool) and not 0 <= util <= 100:
        raise UtilOutOfRange(f"util_pct {_short(util)} is outside [0, 100]", index)
    interval = data.get("interval_s")
    if (
        isinstance(interval, int | float)
        and not isinstance(interval, bool)
        and not 0 < interval <= MAX_INTERVAL_S
    ):
        raise IntervalOutOfRange(
            f"interval_s {_short(interval)} is outside (0, {MAX_INTERVAL_S:g}]", index
        )
    for name, (low, high) in DATA_BOUNDS.items():
        value = data.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise NumberOutOfRange(f"{name} is {value}, not a finite number", index)
        if not low <= value <= high:
            raise NumberOutOfRange(f"{name} {_short(value)} is outside [{low:g}, {high:g}]", index)
    when = item.get("time")
    if isinstance(when, str) and when[:4].isdigit() and int(when[:4]) < MIN_EVENT_TIME.year:
        raise TimeOutOfRange(f"time {_short(when)} is before {MIN_EVENT_TIME.isoformat()}", index)
    for where, names, prefix in ((item, EVENT_TEXTS, ""), (data, DATA_TEXTS, "data.")):
        for name in names:
            value = where.get(name)
            if isinstance(value, str) and TEXT_RULE.fullmatch(value) is None:
                raise InvalidText(f"{prefix}{name} {describe_text(value)}", index)


@dataclass
class DecodedMessage:
    events: list[UsageEvent]
    errors: list[InvalidUsage]


def decode_usage_message(
    raw: bytes | None, *, now: datetime | None = None, key: bytes | None = None
) -> DecodedMessage:
    """Decode one Kafka message value: a single event or a CloudEvents JSON batch.

    A whole-message problem (size, JSON) raises; per-event problems are returned beside the good
    events so one bad sample never costs its neighbours.
    """
    document = load_json(raw)
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
        # Checks with reasons of their own first: sharper than a generic field error.
        check_event(item, data, index)
    try:
        event = UsageEvent.model_validate(item)
    except ValidationError as exc:
        raise InvalidField(_describe(exc), index) from None
    if event.time < MIN_EVENT_TIME:
        raise TimeOutOfRange(
            f"time {event.time.isoformat()} is before {MIN_EVENT_TIME.isoformat()}", index
        )
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
