"""Pure metering logic: dedup, hour and minute attribution, per-node partials and cross-node sums.

Exactly-once without transactions rests on three facts:
- each node's dedup cursors and its partial totals live in ONE state record, so a crash can never
  persist one without the other;
- partials are cumulative and carry `samples` as their revision: for a given partition the counted
  samples grow monotonically, so a higher count always means a later, complete state;
- the cross-node sum keeps each node's latest partial and replaces it only by a higher revision, so
  re-delivery and replay give the same totals.
"""

from __future__ import annotations

import base64
import enum
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from schemas.metering import ClusterMinute, HourCompleteness, HourlyTotal, NodeSignal
from schemas.usage import UsageEvent

_MINUTE_DECIMALS = frozenset({"online_s", "alloc_s", "util_s", "energy_J"})
RECENT_IDS_PER_GPU = 128  # bounded dedup memory: O(GPUs), not O(events)
# Recent ids are kept as 64-bit digests: the state record stays small (it is written every batch),
# and a collision could only turn an out-of-order dead letter into a duplicate, never count twice.
ID_DIGEST_BYTES = 8
IDLE_UTIL_PCT = 5.0
ZERO = Decimal(0)
HOUR = 3600
MINUTE = 60


class Outcome(enum.Enum):
    COUNTED = "counted"
    DUPLICATE = "duplicate"
    OUT_OF_ORDER = "out_of_order"
    BEYOND_RETENTION = "beyond_retention"


def to_decimal(value: float) -> Decimal:
    """The decimal the JSON text meant: repr() of a float round-trips the shortest decimal."""
    return Decimal(repr(value))


def interval_start(end: datetime, interval_s: Decimal) -> Decimal:
    """Exact POSIX seconds at which the sampled interval (end - interval_s, end] starts."""
    whole = int(end.replace(microsecond=0).timestamp())
    return Decimal(whole) + Decimal(end.microsecond).scaleb(-6) - interval_s


def bucket_start(start_s: Decimal, width_s: int) -> int:
    """The half-open bucket [b, b + width) containing start_s."""
    return (
        int((start_s // width_s) * width_s)
        if start_s >= 0
        else int(-((-start_s) // width_s) * width_s)
    )


def id_digest(event_id: str) -> bytes:
    return hashlib.blake2b(event_id.encode(), digest_size=ID_DIGEST_BYTES).digest()


def _holds_digest(ring: bytearray, digest: bytes) -> bool:
    return any(
        ring[i : i + ID_DIGEST_BYTES] == digest for i in range(0, len(ring), ID_DIGEST_BYTES)
    )


def iso(epoch_s: int) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat()


@dataclass
class SampleView:
    """The facts of a sample that aggregation needs, decimals made once."""

    node: str
    gpu_key: str
    event_id: str
    end_s: Decimal
    interval_s: Decimal
    project_id: str | None
    gpu_model: str
    util_pct: Decimal
    power_w: Decimal
    xid_errors: int
    gpu_uuid: str

    @classmethod
    def of(cls, event: UsageEvent) -> SampleView:
        data = event.data
        return cls.make(
            node=data.node,
            source=event.source,
            event_id=event.id,
            end=event.time,
            interval_s=data.interval_s,
            project_id=data.project_id,
            gpu_model=data.gpu_model,
            util_pct=data.util_pct,
            power_w=data.power_w,
            xid_errors=data.xid_errors,
            gpu_uuid=data.gpu_uuid,
        )

    @classmethod
    def make(
        cls,
        *,
        node: str,
        source: str,
        event_id: str,
        end: datetime,
        interval_s: float,
        project_id: str | None,
        gpu_model: str,
        util_pct: float,
        power_w: float,
        xid_errors: int,
        gpu_uuid: str,
    ) -> SampleView:
        interval = _interval_decimal(interval_s)
        start = interval_start(end, interval)
        return cls(
            node=node,
            gpu_key=f"{source}|{gpu_uuid}",
            event_id=event_id,
            end_s=start + interval,
            interval_s=interval,
            project_id=project_id,
            gpu_model=gpu_model,
            util_pct=to_decimal(util_pct),
            power_w=to_decimal(power_w),
            xid_errors=xid_errors,
            gpu_uuid=gpu_uuid,
        )


_INTERVALS: dict[float, Decimal] = {}


def _interval_decimal(interval_s: float) -> Decimal:
    """Intervals repeat (agents sample at a fixed period): make each one's Decimal once."""
    decimal = _INTERVALS.get(interval_s)
    if decimal is None:
        decimal = to_decimal(interval_s)
        if len(_INTERVALS) < 1024:
            _INTERVALS[interval_s] = decimal
    return decimal


class NodeState:
    """Everything metering knows about one node: JSON-able, stored as one changelog record.

    gpus:    gpu_key -> {"t": last counted end (str decimal),
                         "ids": digests of the recent event ids, concatenated, base64}
    hours:   "project|model|hour_iso" -> [gpu_s, util_gpu_s, energy_J, samples]
    minutes: minute_epoch(str) -> {"gpus": bitmask of GPUs online (bit = position in gpus),
             "alloc": bitmask of GPUs allocated, "online_s", "alloc_s", "util_s", "energy_J",
             "xid", "samples"}
    """

    def __init__(self, record: dict[str, Any] | None = None) -> None:
        record = record or {}
        # Decimals are kept live in memory and turned into strings only when the record is written.
        self.gpus: dict[str, dict[str, Any]] = {
            key: {"t": Decimal(cursor["t"]), "ids": bytearray(base64.b64decode(cursor["ids"]))}
            for key, cursor in record.get("gpus", {}).items()
        }
        self.gpu_bits = {key: 1 << position for position, key in enumerate(self.gpus)}
        self.hours: dict[str, list[Any]] = {
            key: [Decimal(t[0]), Decimal(t[1]), Decimal(t[2]), t[3]]
            for key, t in record.get("hours", {}).items()
        }
        self.minutes: dict[str, dict[str, Any]] = {
            key: {
                name: (Decimal(v) if name in _MINUTE_DECIMALS else v) for name, v in minute.items()
            }
            for key, minute in record.get("minutes", {}).items()
        }
        self.max_end_s = Decimal(record.get("max_end_s", "0"))
        self.last_samples: dict[str, list[Any]] = record.get("last", {})
        # Completeness: hour epoch -> whether the node's newest sample has passed the hour's end.
        self.online_hours: dict[int, bool] = {
            int(hour): through for hour, through in record.get("online_hours", {}).items()
        }
        # Counted samples ever: the node's revision for its completeness facts (only grows).
        self.counted: int = record.get("counted", 0)
        self._changed_hours: set[int] = set()

    def to_record(self) -> dict[str, Any]:
        return {
            "gpus": {
                key: {"t": str(c["t"]), "ids": base64.b64encode(c["ids"]).decode()}
                for key, c in self.gpus.items()
            },
            "hours": {
                key: [str(t[0]), str(t[1]), str(t[2]), t[3]] for key, t in self.hours.items()
            },
            "minutes": {
                key: {
                    name: (str(v) if name in _MINUTE_DECIMALS else v) for name, v in minute.items()
                }
                for key, minute in self.minutes.items()
            },
            "max_end_s": str(self.max_end_s),
            "last": self.last_samples,
            "online_hours": {str(hour): through for hour, through in self.online_hours.items()},
            "counted": self.counted,
        }

    def apply(
        self,
        sample: SampleView,
        hour_retention_s: int,
        touched_hours: set[str],
        touched_minutes: set[str],
    ) -> Outcome:
        cursor = self.gpus.get(sample.gpu_key)
        if cursor is not None and sample.end_s <= cursor["t"]:
            if _holds_digest(cursor["ids"], id_digest(sample.event_id)):
                return Outcome.DUPLICATE
            return Outcome.OUT_OF_ORDER
        start_s = sample.end_s - sample.interval_s
        hour = bucket_start(start_s, HOUR)
        if self.max_end_s - hour > hour_retention_s:
            return Outcome.BEYOND_RETENTION
        if cursor is None:
            cursor = self.gpus[sample.gpu_key] = {"t": ZERO, "ids": bytearray()}
            self.gpu_bits[sample.gpu_key] = 1 << (len(self.gpus) - 1)
        cursor["t"] = sample.end_s
        ids = cursor["ids"]
        ids += id_digest(sample.event_id)
        if len(ids) > RECENT_IDS_PER_GPU * ID_DIGEST_BYTES:
            del ids[:ID_DIGEST_BYTES]
        if sample.end_s > self.max_end_s:
            self.max_end_s = sample.end_s
        self.counted += 1
        if hour not in self.online_hours:
            self.online_hours[hour] = False
            self._changed_hours.add(hour)

        util_s = sample.util_pct * sample.interval_s / 100
        energy_j = sample.power_w * sample.interval_s
        if sample.project_id is not None:
            key = f"{sample.project_id}|{sample.gpu_model}|{iso(hour)}"
            totals = self.hours.get(key)
            if totals is None:
                totals = self.hours[key] = [ZERO, ZERO, ZERO, 0]
            totals[0] += sample.interval_s
            totals[1] += util_s
            totals[2] += energy_j
            totals[3] += 1
            touched_hours.add(key)

        minute_key = str(bucket_start(start_s, MINUTE))
        minute = self.minutes.get(minute_key)
        if minute is None:
            minute = self.minutes[minute_key] = {
                "gpus": 0,
                "alloc": 0,
                "online_s": ZERO,
                "alloc_s": ZERO,
                "util_s": ZERO,
                "energy_J": ZERO,
                "xid": 0,
                "samples": 0,
            }
        gpu_bit = self.gpu_bits[sample.gpu_key]
        minute["gpus"] |= gpu_bit
        minute["online_s"] += sample.interval_s
        if sample.project_id is not None:
            minute["alloc"] |= gpu_bit
            minute["alloc_s"] += sample.interval_s
        minute["util_s"] += util_s
        minute["energy_J"] += energy_j
        minute["xid"] += sample.xid_errors
        minute["samples"] += 1
        touched_minutes.add(minute_key)

        self.last_samples[sample.gpu_uuid] = [
            str(sample.end_s),
            sample.project_id,
            str(sample.util_pct),
            sample.xid_errors,
        ]
        return Outcome.COUNTED

    def expire(self, hour_retention_s: int, minute_retention_s: int) -> None:
        """Drop buckets that can no longer change: bounded state as time goes on."""
        latest = self.max_end_s
        for key in [k for k in self.hours if latest - _hour_of_key(k) > hour_retention_s + HOUR]:
            del self.hours[key]
        for key in [k for k in self.minutes if latest - int(k) > minute_retention_s]:
            del self.minutes[key]
        for hour in [h for h in self.online_hours if latest - h > hour_retention_s + HOUR]:
            del self.online_hours[hour]
            self._changed_hours.discard(hour)

    def completeness_facts(self, everything: bool = False) -> dict[str, dict[str, Any]]:
        """This node's facts for the hours whose completeness changed since the last call (or all):
        hour ISO -> {"through": newest sample ends at or after the hour's end, "rev": counted}."""
        for hour, through in self.online_hours.items():
            if not through and self.max_end_s >= hour + HOUR:
                self.online_hours[hour] = True
                self._changed_hours.add(hour)
        hours = self.online_hours if everything else self._changed_hours
        facts = {iso(h): {"through": self.online_hours[h], "rev": self.counted} for h in hours}
        self._changed_hours = set()
        return facts

    def recent_ids(self, gpu_key: str) -> int:
        return len(self.gpus[gpu_key]["ids"]) // ID_DIGEST_BYTES

    def hour_partial(self, key: str) -> dict[str, Any]:
        gpu_s, util_s, energy_j, samples = self.hours[key]
        return {
            "gpu_s": str(gpu_s),
            "util_s": str(util_s),
            "energy_J": str(energy_j),
            "samples": samples,
        }

    def minute_partial(self, key: str) -> dict[str, Any]:
        minute = self.minutes[key]
        return {
            "gpus": minute["gpus"].bit_count(),
            "alloc": minute["alloc"].bit_count(),
            "online_s": str(minute["online_s"]),
            "alloc_s": str(minute["alloc_s"]),
            "util_s": str(minute["util_s"]),
            "energy_J": str(minute["energy_J"]),
            "xid": minute["xid"],
            "samples": minute["samples"],
        }

    def signal(self, node: str) -> NodeSignal:
        latest = self.max_end_s
        idle: dict[str, str] = {}
        xid_gpus = []
        xid_total = 0
        for gpu_uuid, (end_s, project_id, util_pct, xid) in self.last_samples.items():
            if Decimal(end_s) != latest:
                continue  # only the newest round describes the node now
            if project_id is not None and Decimal(util_pct) < Decimal(IDLE_UTIL_PCT):
                idle[gpu_uuid] = project_id
            if xid:
                xid_gpus.append(gpu_uuid)
                xid_total += xid
        return NodeSignal(
            node=node,
            last_sample_time=datetime.fromtimestamp(float(latest), UTC),
            gpus=len(self.last_samples),
            idle_allocated_gpus=sorted(idle),
            idle_projects=idle,
            xid_errors=xid_total,
            xid_gpus=sorted(xid_gpus),
        )


def hour_epoch(hour_iso: str) -> int:
    return int(datetime.fromisoformat(hour_iso).timestamp())


def _hour_of_key(key: str) -> int:
    return int(datetime.fromisoformat(key.rsplit("|", 1)[1]).timestamp())


def merge_partial(
    record: dict[str, Any] | None, node: str, partial: dict[str, Any]
) -> tuple[dict[str, Any], bool]:
    """Keep each node's latest partial; a higher `samples` count is a later state. Returns (record, changed)."""
    record = record or {"nodes": {}}
    current = record["nodes"].get(node)
    if current is not None and current["samples"] >= partial["samples"]:
        return record, False
    record["nodes"][node] = partial
    return record, True


def merge_completeness(
    record: dict[str, Any] | None, node: str, fact: dict[str, Any]
) -> tuple[dict[str, Any], bool]:
    """Keep each node's latest completeness fact; its `rev` (samples counted) only grows."""
    record = record or {"nodes": {}}
    current = record["nodes"].get(node)
    if current is not None and current["rev"] >= fact["rev"]:
        return record, False
    record["nodes"][node] = {"through": fact["through"], "rev": fact["rev"]}
    return record, True


def hour_completeness(hour_iso: str, record: dict[str, Any]) -> HourCompleteness:
    nodes = record["nodes"]
    missing = sorted(node for node, fact in nodes.items() if not fact["through"])
    return HourCompleteness(
        hour_start=datetime.fromisoformat(hour_iso),
        nodes_online=len(nodes),
        nodes_through=len(nodes) - len(missing),
        missing_nodes=missing,
        complete=not missing,
        revision=sum(fact["rev"] for fact in nodes.values()),
    )


def hourly_total(key: str, record: dict[str, Any]) -> HourlyTotal:
    project_id, gpu_model, hour_iso = key.split("|")
    nodes = record["nodes"].values()
    energy_j = sum((Decimal(p["energy_J"]) for p in nodes), ZERO)
    samples = sum(p["samples"] for p in nodes)
    return HourlyTotal(
        project_id=project_id,
        gpu_model=gpu_model,
        hour_start=datetime.fromisoformat(hour_iso),
        gpu_seconds=sum((Decimal(p["gpu_s"]) for p in nodes), ZERO),
        util_gpu_seconds=sum((Decimal(p["util_s"]) for p in nodes), ZERO),
        energy_wh=(energy_j / HOUR).quantize(Decimal("0.000001")),
        samples=samples,
        revision=samples,
    )


def cluster_minute(minute_key: str, record: dict[str, Any]) -> ClusterMinute:
    nodes = record["nodes"].values()
    online_s = sum((Decimal(p["online_s"]) for p in nodes), ZERO)
    alloc_s = sum((Decimal(p["alloc_s"]) for p in nodes), ZERO)
    util_s = sum((Decimal(p["util_s"]) for p in nodes), ZERO)
    energy_j = sum((Decimal(p["energy_J"]) for p in nodes), ZERO)
    samples = sum(p["samples"] for p in nodes)
    return ClusterMinute(
        minute_start=datetime.fromtimestamp(int(minute_key), UTC),
        nodes_reporting=len(record["nodes"]),
        gpus_online=sum(p["gpus"] for p in nodes),
        gpus_allocated=sum(p["alloc"] for p in nodes),
        online_gpu_seconds=online_s,
        allocated_gpu_seconds=alloc_s,
        allocation_ratio=(alloc_s / online_s).quantize(Decimal("0.0001")) if online_s else ZERO,
        mean_util_pct=(util_s * 100 / online_s).quantize(Decimal("0.01")) if online_s else ZERO,
        # energy over the minute / 60 s = the centre's mean power draw in that minute
        mean_power_w=(energy_j / MINUTE).quantize(Decimal("0.1")),
        xid_errors=sum(p["xid"] for p in nodes),
        revision=samples,
    )
