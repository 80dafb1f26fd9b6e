"""A fast path for well-formed usage messages; anything else goes through schemas.codec.

The checks here accept only a subset of what `schemas.codec.decode_usage_event` accepts. An event
that fails any of them is handed to the codec, which either accepts it after all or raises the
typed error with its reason and detail, so dead letters are the same whichever path decided.

Two layers: msgspec decodes a whole message straight into typed structs (parsing and type checks in
C, about half the cost of `json.loads` alone); a message it does not accept in full, or with any
event failing the checks after it, is decoded again by the general path below, event by event.
msgspec earns its place here: decoding is the largest share of metering's CPU per sample.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from schemas.codec import InvalidUsage, decode_usage_event, decode_usage_message
from schemas.usage import (
    MAX_FUTURE_SKEW_S,
    MAX_GPU_INDEX,
    MAX_INTERVAL_S,
    MAX_MEM_MIB,
    MAX_MESSAGE_BYTES,
    MAX_POWER_W,
    MAX_TEMP_C,
    MAX_XID_ERRORS,
    MIN_EVENT_TIME,
    MIN_TEMP_C,
    TEXT_RULE,
    USAGE_EVENT_TYPE,
)
from services.metering.domain import SampleView, epoch_ns, scaled

_MIN_END_N = epoch_ns(MIN_EVENT_TIME)
_text_ok = TEXT_RULE.fullmatch

# RFC 3339 with an explicit offset and at most microseconds: the form both parsers agree on.
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)", re.ASCII)
_TEXT_FIELDS = ("node", "gpu_uuid", "gpu_model")
_COUNT_FIELDS = (
    ("gpu_index", MAX_GPU_INDEX),
    ("mem_used_mib", MAX_MEM_MIB),
    ("mem_total_mib", MAX_MEM_MIB),
    ("xid_errors", MAX_XID_ERRORS),
)


_Text = Annotated[str, msgspec.Meta(min_length=1)]
_Mem = Annotated[int, msgspec.Meta(ge=0, le=MAX_MEM_MIB)]


class _Data(msgspec.Struct):
    # Presence, types, non-empty texts and bounded counts are checked by msgspec, in C; texts'
    # characters and the float bounds below, in Python.
    node: _Text
    gpu_uuid: _Text
    gpu_index: Annotated[int, msgspec.Meta(ge=0, le=MAX_GPU_INDEX)]
    gpu_model: _Text
    interval_s: int | float  # an int is decided by the codec: kept apart to send it there
    project_id: str | None
    job_id: str | None
    util_pct: int | float
    mem_used_mib: _Mem
    mem_total_mib: _Mem
    power_w: int | float
    temp_c: Annotated[int, msgspec.Meta(ge=MIN_TEMP_C, le=MAX_TEMP_C)]
    xid_errors: Annotated[int, msgspec.Meta(ge=0, le=MAX_XID_ERRORS)]


class _Event(msgspec.Struct):
    specversion: Literal["1.0"]
    id: _Text
    source: _Text
    type: Literal["io.gpumeter.gpu.usage.v1"]
    time: str
    data: _Data
    subject: str | None = None
    datacontenttype: str | None = None


_ONE = msgspec.json.Decoder(_Event)
_MANY = msgspec.json.Decoder(list[_Event])


@dataclass
class DecodedSamples:
    samples: list[SampleView]
    errors: list[InvalidUsage]


def decode_samples(raw: bytes | None, *, now: datetime, key: bytes | None) -> DecodedSamples:
    """Like `decode_usage_message`, but returns the samples' aggregation views directly.

    Whole-message problems raise the codec's errors; per-event problems are returned.
    """
    document: Any = None
    if raw is not None and 0 < len(raw) <= MAX_MESSAGE_BYTES:
        samples = _all_well_formed(raw, key, now.timestamp())
        if samples is not None:
            return DecodedSamples(samples, [])
        try:
            document = json.loads(raw, parse_constant=_not_finite)
        except (ValueError, RecursionError):  # the codec says which, below
            document = None
    if not isinstance(document, dict | list) or document == []:
        decoded = decode_usage_message(raw, now=now, key=key)  # raises the message's error
        return DecodedSamples([SampleView.of(e) for e in decoded.events], decoded.errors)
    node = key.decode("utf-8", "replace") if key else None
    now_s = now.timestamp()
    batch = isinstance(document, list)
    items = document if batch else [document]
    result = DecodedSamples([], [])
    times: dict[str, int] = {}  # a node's batch shares one time: parse it once
    for index, item in enumerate(items):
        view = _well_formed(item, node, now_s, times)
        if view is None:
            try:
                event = decode_usage_event(item, now=now, index=index if batch else None, node=node)
            except InvalidUsage as error:
                result.errors.append(error)
                continue
            view = SampleView.of(event)
        result.samples.append(view)
    return result


def _not_finite(name: str) -> Any:
    raise ValueError(name)


def _texts_ok(event_id: str, source: str, subject: str | None, data: Any, seen: set[str]) -> bool:
    """Every text of an event by TEXT_RULE; `seen` holds texts of the message already checked
    (a node's batch shares its node, source and GPU model)."""
    for text in (event_id, source, subject, data.node, data.gpu_uuid, data.gpu_model):
        if text is not None and text not in seen:
            if _text_ok(text) is None:
                return False
            seen.add(text)
    for text in (data.project_id, data.job_id):
        if text is not None and text not in seen:
            if _text_ok(text) is None:
                return False
            seen.add(text)
    return True


def _all_well_formed(raw: bytes, key: bytes | None, now_s: float) -> list[SampleView] | None:
    """Every event's view when msgspec takes the whole message and each event passes; else None."""
    try:
        events = [_ONE.decode(raw)] if raw[:1] == b"{" else _MANY.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if not events:
        return None
    node = key.decode("utf-8", "replace") if key else None
    times: dict[str, int] = {}
    seen: set[str] = set()
    samples = []
    last_interval, interval_n = None, None
    for event in events:
        data = event.data
        interval, util, power = data.interval_s, data.util_pct, data.power_w
        if (
            type(interval) is not float
            or type(util) is not float
            or type(power) is not float
            or not (
                0 < interval <= MAX_INTERVAL_S and 0 <= util <= 100 and 0 <= power <= MAX_POWER_W
            )
            or (node is not None and data.node != node)
            or not _texts_ok(event.id, event.source, event.subject, data, seen)
        ):
            return None
        end_n = _time_ns(event.time, times)
        if end_n is None or end_n < _MIN_END_N or end_n / 1e9 - now_s > MAX_FUTURE_SKEW_S:
            return None
        if interval != last_interval:  # a node's samples share their interval: scaled once
            last_interval, interval_n = interval, scaled(interval)
        util_n, power_n = scaled(util), scaled(power)
        if interval_n is None or util_n is None or power_n is None:
            view = SampleView.make(  # more than 9 decimals: the exact Decimal path
                node=data.node,
                source=event.source,
                event_id=event.id,
                end_n=end_n,
                interval_s=interval,
                project_id=data.project_id,
                gpu_model=data.gpu_model,
                util_pct=util,
                power_w=power,
                xid_errors=data.xid_errors,
                gpu_uuid=data.gpu_uuid,
                job_id=data.job_id,
            )
        else:
            gpu_uuid = data.gpu_uuid
            view = SampleView(
                data.node,
                f"{event.source}|{gpu_uuid}",
                event.id,
                end_n,
                end_n - interval_n,
                interval_n,
                util_n,
                power_n,
                None,
                data.project_id,
                data.gpu_model,
                util,
                data.xid_errors,
                gpu_uuid,
                data.job_id,
            )
        samples.append(view)
    return samples


def _time_ns(time_text: str, times: dict[str, int]) -> int | None:
    """The event time in epoch nanoseconds, parsed once per message; None if not plain RFC 3339."""
    end_n = times.get(time_text)
    if end_n is None:
        if _RFC3339.fullmatch(time_text) is None:
            return None
        try:
            end_n = epoch_ns(datetime.fromisoformat(time_text))
        except (ValueError, OverflowError):
            return None
        times[time_text] = end_n
    return end_n


def _well_formed(
    item: Any, node: str | None, now_s: float, times: dict[str, int]
) -> SampleView | None:
    """The sample's view when every check passes; None sends the event to the codec."""
    if type(item) is not dict:
        return None
    if item.get("specversion") != "1.0" or item.get("type") != USAGE_EVENT_TYPE:
        return None
    event_id, source, time_text = item.get("id"), item.get("source"), item.get("time")
    if type(event_id) is not str or not event_id or type(source) is not str or not source:
        return None
    for optional in ("subject", "datacontenttype"):
        value = item.get(optional)
        if value is not None and type(value) is not str:
            return None
    if type(time_text) is not str:
        return None
    end_n = _time_ns(time_text, times)
    if end_n is None:
        return None
    data = item.get("data")
    if type(data) is not dict:
        return None
    for name in _TEXT_FIELDS:
        value = data.get(name)
        if type(value) is not str or _text_ok(value) is None:
            return None
    for name, high in _COUNT_FIELDS:
        value = data.get(name)
        if type(value) is not int or not 0 <= value <= high:
            return None
    temp = data.get("temp_c")
    if type(temp) is not int or not MIN_TEMP_C <= temp <= MAX_TEMP_C:
        return None
    for text in (event_id, source, item.get("subject")):
        if text is not None and _text_ok(text) is None:
            return None
    if "project_id" not in data or "job_id" not in data:
        return None
    project_id, job_id = data["project_id"], data["job_id"]
    for text in (project_id, job_id):
        if text is not None and (type(text) is not str or _text_ok(text) is None):
            return None
    interval, util, power = data.get("interval_s"), data.get("util_pct"), data.get("power_w")
    if type(interval) is not float or type(util) is not float or type(power) is not float:
        return None
    if not (0 < interval <= MAX_INTERVAL_S and 0 <= util <= 100 and 0 <= power <= MAX_POWER_W):
        return None
    if node is not None and data["node"] != node:
        return None
    if end_n < _MIN_END_N or end_n / 1e9 - now_s > MAX_FUTURE_SKEW_S:
        return None
    return SampleView.make(
        node=data["node"],
        source=source,
        event_id=event_id,
        end_n=end_n,
        interval_s=interval,
        project_id=project_id,
        gpu_model=data["gpu_model"],
        util_pct=util,
        power_w=power,
        xid_errors=data["xid_errors"],
        gpu_uuid=data["gpu_uuid"],
        job_id=job_id,
    )
