"""Pure metering logic: dedup, hour and minute attribution, per-node partials and cross-node sums.

Exactly-once without transactions rests on three facts:
- each node's dedup cursors and its partial totals live in ONE state record, so a crash can never
  persist one without the other;
- partials are cumulative and carry `samples` as their revision: for a given partition the counted
  samples grow monotonically, so a higher count always means a later, complete state;
- the cross-node sum keeps each node's latest partial and replaces it only by a higher revision, so
  re-delivery and replay give the same totals.

Exact sums, fast: a number in a sample means the decimal its JSON text wrote (the shortest repr of
the float). Nearly every real value has at most 9 decimals, so it is held as an integer count of
1e-9 units and products as integers at the product's scale (Python ints do not overflow). A value
with more decimals goes to a Decimal remainder kept beside the integers, computed in a context wide
enough never to round. The strings written out are the exact sums either way.
"""

from __future__ import annotations

import base64
import decimal
import enum
import hashlib
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from schemas.metering import (
    ClusterMinute,
    HourCompleteness,
    HourlyTotal,
    JobHourlyTotal,
    NodeSignal,
)
from schemas.usage import UsageEvent

# Bounded dedup memory, O(GPUs): a re-delivery (agent spool replay, worker restart) repeats the
# newest few samples, recognised by id among the last RECENT_IDS_PER_GPU; an older one is
# recognised by the time it covers: each GPU keeps the stretches of time its counted samples
# covered over the retention (one stretch while its agent reports without a gap, a new one after
# a gap, at most COVERED_RUNS_PER_GPU). A sample older than the GPU's newest whose interval lies
# in a counted stretch is a duplicate (that time is counted); one outside every stretch is out of
# order (dead-lettered). Samples of one stretch meet within RUN_JOIN_S (agents' clocks jitter).
RECENT_IDS_PER_GPU = 32
COVERED_RUNS_PER_GPU = 64
RUN_JOIN_S = 1
# Recent ids are kept as 64-bit digests: the state record stays small (it is written every batch),
# and a collision could only turn an out-of-order dead letter into a duplicate, never count twice.
ID_DIGEST_BYTES = 8
IDLE_UTIL_PCT = 5.0
# Bounds on one node's state, so that no writer can grow it without limit or push its record past
# the producer's request size (every commit would then fail): GPUs per node, and hour keys
# (project x model x hour within the retention) per node. Beyond them samples are dead-lettered.
MAX_GPUS_PER_NODE = 64
MAX_HOUR_KEYS_PER_NODE = 1024
ZERO = Decimal(0)
HOUR = 3600
MINUTE = 60

# Fixed-point scales (powers of ten): inputs and times in 1e-9, util x interval / 100 in 1e-20,
# power x interval in 1e-18.
S_IN = 9
S_UTIL = 20
S_ENERGY = 18
_IN = 10**S_IN
_HOUR_N = HOUR * _IN
_MINUTE_N = MINUTE * _IN
_FAST_LIMIT = 1e5  # below this a double's spacing is far finer than 1e-9: the check below is exact
# Wide enough for any pair of doubles (5e-324 .. 1.8e308 and their products): never rounds.
EXACT = decimal.Context(prec=2000, traps=[decimal.Inexact, decimal.InvalidOperation])
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class Outcome(enum.Enum):
    COUNTED = "counted"
    DUPLICATE = "duplicate"
    OUT_OF_ORDER = "out_of_order"
    BEYOND_RETENTION = "beyond_retention"
    TOO_MANY_GPUS = "too_many_gpus"
    TOO_MANY_HOUR_KEYS = "too_many_hour_keys"


def to_decimal(value: float) -> Decimal:
    """The decimal the JSON text meant: repr() of a float round-trips the shortest decimal."""
    return Decimal(repr(value))


def scaled(value: float) -> int | None:
    """`value` as an integer count of 1e-9 when its decimal has at most 9 places, else None.

    n / 1e9 is the double nearest to n x 1e-9; below 1e5 at most one 9-place decimal lies within
    half a spacing of `value`, so equality means repr(value) is exactly n x 1e-9."""
    if 0 <= value < _FAST_LIMIT:
        n = round(value * 1e9)
        if n / 1e9 == value:
            return n
    return None


def plain(n: int, scale: int) -> str:
    """n x 10^-scale as a plain decimal string without trailing zeros."""
    sign = "-" if n < 0 else ""
    whole, fraction = divmod(abs(n), 10**scale)
    digits = f"{fraction:0{scale}d}".rstrip("0")
    return f"{sign}{whole}.{digits}" if digits else f"{sign}{whole}"


def exact_text(n: int, scale: int, extra: Decimal | None) -> str:
    if extra is None:
        return plain(n, scale)
    return format(EXACT.add(Decimal(plain(n, scale)), extra), "f")


def split_decimal(text: str, scale: int) -> tuple[int, Decimal | None]:
    """A stored decimal back into (integer at scale, remainder): the inverse of exact_text."""
    value = Decimal(text)
    units = EXACT.scaleb(value, scale)
    if units == units.to_integral_value():
        return int(units), None
    return 0, value


def epoch_ns(moment: datetime) -> int:
    """Exact nanoseconds since the epoch of an aware datetime (RFC 3339 holds microseconds)."""
    return ((moment - _EPOCH) // _MICROSECOND) * 1000


def id_digest(event_id: str) -> bytes:
    return hashlib.blake2b(event_id.encode(), digest_size=ID_DIGEST_BYTES).digest()


def _holds_digest(ring: bytearray, digest: bytes) -> bool:
    return any(
        ring[i : i + ID_DIGEST_BYTES] == digest for i in range(0, len(ring), ID_DIGEST_BYTES)
    )


_ISO: dict[int, str] = {}


def iso(epoch_s: int) -> str:
    text = _ISO.get(epoch_s)
    if text is None:
        text = datetime.fromtimestamp(epoch_s, UTC).isoformat()
        if len(_ISO) > 100_000:
            _ISO.clear()
        _ISO[epoch_s] = text
    return text


@dataclass(slots=True)
class SampleView:
    """The facts of a sample that aggregation needs, as exact integers where they fit.

    `interval_n`, `util_n`, `power_n` are 1e-9 units, or None when the value has more than 9
    decimals; then `decimals` holds (interval, util, power) as exact Decimals instead."""

    node: str
    gpu_key: str
    event_id: str
    end_n: int
    start_n: int | None
    interval_n: int | None
    util_n: int | None
    power_n: int | None
    decimals: tuple[Decimal, Decimal, Decimal] | None
    project_id: str | None
    gpu_model: str
    util_pct: float
    xid_errors: int
    gpu_uuid: str
    job_id: str | None = None

    @classmethod
    def of(cls, event: UsageEvent) -> SampleView:
        data = event.data
        return cls.make(
            node=data.node,
            source=event.source,
            event_id=event.id,
            end_n=epoch_ns(event.time),
            interval_s=data.interval_s,
            project_id=data.project_id,
            gpu_model=data.gpu_model,
            util_pct=data.util_pct,
            power_w=data.power_w,
            xid_errors=data.xid_errors,
            gpu_uuid=data.gpu_uuid,
            job_id=data.job_id,
        )

    @classmethod
    def make(
        cls,
        *,
        node: str,
        source: str,
        event_id: str,
        end_n: int,
        interval_s: float,
        project_id: str | None,
        gpu_model: str,
        util_pct: float,
        power_w: float,
        xid_errors: int,
        gpu_uuid: str,
        job_id: str | None = None,
    ) -> SampleView:
        interval_n, util_n, power_n = scaled(interval_s), scaled(util_pct), scaled(power_w)
        decimals = None
        start_n = None
        if interval_n is None or util_n is None or power_n is None:
            decimals = (to_decimal(interval_s), to_decimal(util_pct), to_decimal(power_w))
            interval_n = util_n = power_n = None
        else:
            start_n = end_n - interval_n
        return cls(
            node,
            f"{source}|{gpu_uuid}",
            event_id,
            end_n,
            start_n,
            interval_n,
            util_n,
            power_n,
            decimals,
            project_id,
            gpu_model,
            float(util_pct),
            xid_errors,
            gpu_uuid,
            job_id,
        )

    def start_or_about(self) -> int:
        """The interval's start in 1e-9 s: exact on the fast path, else to within 1e-9 s."""
        if self.start_n is not None:
            return self.start_n
        assert self.decimals is not None
        return self.end_n - int(EXACT.scaleb(self.decimals[0], S_IN))

    def bucket(self, width_s: int) -> int:
        """Start (epoch s) of the half-open bucket [b, b + width) in which the interval starts."""
        if self.start_n is not None:
            return (self.start_n // (width_s * _IN)) * width_s
        assert self.decimals is not None
        start = EXACT.subtract(EXACT.scaleb(Decimal(self.end_n), -S_IN), self.decimals[0])
        return (
            int((start // width_s) * width_s)
            if start >= 0
            else int(-((-start) // width_s) * width_s)
        )

    def contributions(self) -> tuple[Decimal, Decimal, Decimal]:
        """(gpu_s, util_s, energy_J) of a sample outside the fast path, exactly."""
        assert self.decimals is not None
        interval, util, power = self.decimals
        return (
            interval,
            EXACT.divide(EXACT.multiply(util, interval), Decimal(100)),
            EXACT.multiply(power, interval),
        )


def _add_extra(extra: list[Decimal] | None, values: tuple[Decimal, ...]) -> list[Decimal]:
    if extra is None:
        return list(values)
    return [EXACT.add(a, b) for a, b in zip(extra, values, strict=True)]


# Scales of the sums: an hour is [gpu_s, util_s, energy_J]; a minute [online_s, alloc_s, util_s,
# energy_J].
_HOUR_SCALES = (S_IN, S_UTIL, S_ENERGY)
_HOUR_NAMES = ("gpu_s", "util_s", "energy_J")
_MINUTE_SCALES = (S_IN, S_IN, S_UTIL, S_ENERGY)
_MINUTE_NAMES = ("online_s", "alloc_s", "util_s", "energy_J")
_JOB_SCALES = (S_IN, S_UTIL, S_ENERGY, S_IN)
_JOB_NAMES = ("gpu_s", "util_s", "energy_J", "idle_s")


@dataclass(slots=True)
class GpuCursor:
    """Where one GPU's counting stands: its newest counted end, the digests of its recent sample
    ids, and the stretches of time counted (see RECENT_IDS_PER_GPU)."""

    end_n: int
    ids: bytearray
    runs: list[list[int]]  # [[start_n, end_n], ...], oldest first


@dataclass(slots=True)
class HourSums:
    """One project/model/hour of one node: sums at the scales of _HOUR_SCALES, `extra` None or
    the exact Decimal remainders (gpu_s, util_s, energy_J) of samples with more than 9 decimals."""

    gpu_n: int = 0
    util_n: int = 0
    energy_n: int = 0
    samples: int = 0
    extra: list[Decimal] | None = None

    def texts(self) -> list[str]:
        """gpu_s, util_s, energy_J as exact decimal strings."""
        return _sum_texts([self.gpu_n, self.util_n, self.energy_n], self.extra, _HOUR_SCALES)


@dataclass(slots=True)
class JobSums:
    """One project/job/model/hour of one node: like HourSums, with the GPU-seconds allocated at
    under IDLE_UTIL_PCT utilization (`idle_n`); `extra` holds (gpu_s, util_s, energy_J, idle_s)."""

    gpu_n: int = 0
    util_n: int = 0
    energy_n: int = 0
    idle_n: int = 0
    samples: int = 0
    extra: list[Decimal] | None = None

    def texts(self) -> list[str]:
        """gpu_s, util_s, energy_J, idle_s as exact decimal strings."""
        ints = [self.gpu_n, self.util_n, self.energy_n, self.idle_n]
        return _sum_texts(ints, self.extra, _JOB_SCALES)


@dataclass(slots=True)
class MinuteSums:
    """One minute of one node: bitmasks of its GPUs online and allocated (bit = position in
    NodeState.gpus), sums at the scales of _MINUTE_SCALES, XID errors, samples, and `extra` None
    or the exact remainders (online_s, alloc_s, util_s, energy_J)."""

    gpus: int = 0
    alloc: int = 0
    online_n: int = 0
    alloc_n: int = 0
    util_n: int = 0
    energy_n: int = 0
    xid: int = 0
    samples: int = 0
    extra: list[Decimal] | None = None

    def texts(self) -> list[str]:
        """online_s, alloc_s, util_s, energy_J as exact decimal strings."""
        ints = [self.online_n, self.alloc_n, self.util_n, self.energy_n]
        return _sum_texts(ints, self.extra, _MINUTE_SCALES)


@dataclass(slots=True)
class LastSample:
    """A GPU's newest sample, as the node's signal (idle GPUs, XID) reads it."""

    end_n: int
    project_id: str | None
    util_pct: float
    xid: int


def _load_sums(texts: list[str], scales: tuple[int, ...]) -> tuple[list[int], list[Decimal] | None]:
    ints: list[int] = []
    extra: list[Decimal] | None = None
    for position, (text, scale) in enumerate(zip(texts, scales, strict=True)):
        units, rest = split_decimal(text, scale)
        ints.append(units)
        if rest is not None:
            extra = extra or [ZERO] * len(scales)
            extra[position] = rest
    return ints, extra


def _sum_texts(ints: list[int], extra: list[Decimal] | None, scales: tuple[int, ...]) -> list[str]:
    return [
        exact_text(n, scale, None if extra is None else extra[i])
        for i, (n, scale) in enumerate(zip(ints, scales, strict=True))
    ]


class NodeState:
    """Everything metering knows about one node: JSON-able, stored as one changelog record.

    Record (all decimals as strings, so old and new records read the same):
    gpus:    gpu_key -> {"t": last counted end (s), "ids": recent id digests, base64,
             "runs": [[start (s), end (s)], ...] stretches of time counted, oldest first}
    hours:   "project|model|hour_iso" -> [gpu_s, util_gpu_s, energy_J, samples]
    jobs:    "project|job|model|hour_iso" -> [gpu_s, util_gpu_s, energy_J, idle_gpu_s, samples]
    minutes: minute_epoch(str) -> {"gpus": bitmask of GPUs online (bit = position in gpus),
             "alloc": bitmask of GPUs allocated, "online_s", "alloc_s", "util_s", "energy_J",
             "xid", "samples"}
    In memory: GpuCursor, HourSums and MinuteSums (integers at the scales above, exact remainders
    beside them), and a LastSample per GPU.
    """

    def __init__(self, record: dict[str, Any] | None = None) -> None:
        record = record or {}
        self.gpus: dict[str, GpuCursor] = {
            key: GpuCursor(
                split_decimal(cursor["t"], S_IN)[0],
                bytearray(base64.b64decode(cursor["ids"])),
                [
                    [split_decimal(start, S_IN)[0], split_decimal(end, S_IN)[0]]
                    for start, end in cursor.get("runs", ())
                ],
            )
            for key, cursor in record.get("gpus", {}).items()
        }
        self.gpu_bits = {key: 1 << position for position, key in enumerate(self.gpus)}
        self.hours: dict[str, HourSums] = {}
        for key, t in record.get("hours", {}).items():
            ints, extra = _load_sums(t[:3], _HOUR_SCALES)
            self.hours[key] = HourSums(ints[0], ints[1], ints[2], t[3], extra)
        self.jobs: dict[str, JobSums] = {}
        for key, j in record.get("jobs", {}).items():
            ints, extra = _load_sums(j[:4], _JOB_SCALES)
            self.jobs[key] = JobSums(ints[0], ints[1], ints[2], ints[3], j[4], extra)
        self.minutes: dict[str, MinuteSums] = {}
        for key, m in record.get("minutes", {}).items():
            ints, extra = _load_sums([m[name] for name in _MINUTE_NAMES], _MINUTE_SCALES)
            online_n, alloc_n, util_n, energy_n = ints
            self.minutes[key] = MinuteSums(
                m["gpus"],
                m["alloc"],
                online_n,
                alloc_n,
                util_n,
                energy_n,
                m["xid"],
                m["samples"],
                extra,
            )
        self.max_end_n = split_decimal(record.get("max_end_s", "0"), S_IN)[0]
        self.last_samples: dict[str, LastSample] = {
            gpu: LastSample(split_decimal(end, S_IN)[0], project, float(util), xid)
            for gpu, (end, project, util, xid) in record.get("last", {}).items()
        }
        # Completeness: hour epoch -> whether the node's newest sample has passed the hour's end.
        self.online_hours: dict[int, bool] = {
            int(hour): through for hour, through in record.get("online_hours", {}).items()
        }
        # Counted samples ever: the node's revision for its completeness facts (only grows).
        self.counted: int = record.get("counted", 0)
        # A node whose state was forgotten (silent past the retention, see `forgotten`) keeps only
        # its newest end: no sample of an hour up to that one counts again, since the cross-node
        # sums still hold the old state's partials for those hours, of higher revisions.
        self.floor_n = split_decimal(record.get("floor_s", "0"), S_IN)[0]
        self._floor_hour = (self.floor_n // _HOUR_N) * HOUR if self.floor_n else None
        self._changed_hours: set[int] = set()
        # Written forms of hours and minutes no sample touched since the last record: a state is
        # written at every commit, and most of its 15 minutes and hours have not changed.
        self._hour_texts: dict[str, list[Any]] = {}
        self._job_texts: dict[str, list[Any]] = {}
        self._minute_texts: dict[str, dict[str, Any]] = {}
        # (interval start, hour, minute key, hour ISO) of the last sample applied
        self._buckets: tuple[Any, int, str, str] = (None, 0, "", "")

    def to_record(self) -> dict[str, Any]:
        return {
            "gpus": {
                key: {
                    "t": plain(c.end_n, S_IN),
                    "ids": base64.b64encode(c.ids).decode(),
                    "runs": [[plain(start, S_IN), plain(end, S_IN)] for start, end in c.runs],
                }
                for key, c in self.gpus.items()
            },
            "hours": {key: self._hour_record(key) for key in self.hours},
            "jobs": {key: self._job_record(key) for key in self.jobs},
            "minutes": {key: self._minute_record(key) for key in self.minutes},
            "max_end_s": plain(self.max_end_n, S_IN),
            "last": {
                gpu: [plain(last.end_n, S_IN), last.project_id, repr(last.util_pct), last.xid]
                for gpu, last in self.last_samples.items()
            },
            "online_hours": {str(hour): through for hour, through in self.online_hours.items()},
            "counted": self.counted,
            **({"floor_s": plain(self.floor_n, S_IN)} if self.floor_n else {}),
        }

    def forgotten(self) -> dict[str, Any]:
        """The record that replaces this state once the node is silent past the retention: its
        newest end only (as `floor_s`), a few dozen bytes instead of the whole state."""
        return {"floor_s": plain(max(self.max_end_n, self.floor_n), S_IN)}

    def _hour_record(self, key: str) -> list[Any]:
        record = self._hour_texts.get(key)
        if record is None:
            sums = self.hours[key]
            record = self._hour_texts[key] = [*sums.texts(), sums.samples]
        return record

    def _job_record(self, key: str) -> list[Any]:
        record = self._job_texts.get(key)
        if record is None:
            sums = self.jobs[key]
            record = self._job_texts[key] = [*sums.texts(), sums.samples]
        return record

    def _minute_record(self, key: str) -> dict[str, Any]:
        record = self._minute_texts.get(key)
        if record is None:
            sums = self.minutes[key]
            record = self._minute_texts[key] = {
                "gpus": sums.gpus,
                "alloc": sums.alloc,
                **dict(zip(_MINUTE_NAMES, sums.texts(), strict=True)),
                "xid": sums.xid,
                "samples": sums.samples,
            }
        return record

    @property
    def max_end_s(self) -> Decimal:
        return Decimal(plain(self.max_end_n, S_IN))

    def apply(
        self,
        sample: SampleView,
        hour_retention_s: int,
        touched_hours: set[str],
        touched_minutes: set[str],
        max_gpus: int = MAX_GPUS_PER_NODE,
        max_hour_keys: int = MAX_HOUR_KEYS_PER_NODE,
        touched_jobs: set[str] | None = None,
    ) -> Outcome:
        end_n = sample.end_n
        cursor = self.gpus.get(sample.gpu_key)
        if cursor is not None and end_n <= cursor.end_n:
            if _holds_digest(cursor.ids, id_digest(sample.event_id)):
                return Outcome.DUPLICATE
            start = sample.start_or_about()
            for run_start, run_end in reversed(cursor.runs):
                if run_start <= start and end_n <= run_end:
                    return Outcome.DUPLICATE  # that time is counted: a redelivery
            return Outcome.OUT_OF_ORDER
        start_n = sample.start_n
        buckets = self._buckets
        if start_n is not None and start_n == buckets[0]:
            hour, minute_key, hour_iso = buckets[1], buckets[2], buckets[3]
        else:  # a node's samples of one round share their buckets: computed once per round
            hour = sample.bucket(HOUR)
            minute_key, hour_iso = str(sample.bucket(MINUTE)), iso(hour)
            if start_n is not None:
                self._buckets = (start_n, hour, minute_key, hour_iso)
        if self.max_end_n - hour * _IN > hour_retention_s * _IN:
            return Outcome.BEYOND_RETENTION
        if self._floor_hour is not None and hour <= self._floor_hour:
            return Outcome.BEYOND_RETENTION  # an hour of the forgotten state
        project_id = sample.project_id
        key = job_key = ""
        if project_id is not None:
            key = f"{project_id}|{sample.gpu_model}|{hour_iso}"
            if key not in self.hours and len(self.hours) >= max_hour_keys:
                return Outcome.TOO_MANY_HOUR_KEYS
            # The job's own totals: bounded like the hours (a node runs few jobs an hour).
            job_key = f"{project_id}|{sample.job_id or ''}|{sample.gpu_model}|{hour_iso}"
            if job_key not in self.jobs and len(self.jobs) >= max_hour_keys:
                return Outcome.TOO_MANY_HOUR_KEYS
        if cursor is None:
            if len(self.gpus) >= max_gpus:
                return Outcome.TOO_MANY_GPUS
            cursor = self.gpus[sample.gpu_key] = GpuCursor(0, bytearray(), [])
            self.gpu_bits[sample.gpu_key] = 1 << (len(self.gpus) - 1)
        runs = cursor.runs
        start = start_n if start_n is not None else sample.start_or_about()
        if runs and runs[-1][0] <= start <= runs[-1][1] + RUN_JOIN_S * _IN:
            runs[-1][1] = end_n
        else:
            runs.append([start, end_n])
            if len(runs) > COVERED_RUNS_PER_GPU:
                del runs[0]
        cursor.end_n = end_n
        ids = cursor.ids
        ids += id_digest(sample.event_id)
        if len(ids) > RECENT_IDS_PER_GPU * ID_DIGEST_BYTES:
            del ids[:ID_DIGEST_BYTES]
        if end_n > self.max_end_n:
            self.max_end_n = end_n
        self.counted += 1
        if hour not in self.online_hours:
            self.online_hours[hour] = False
            self._changed_hours.add(hour)

        interval = sample.interval_n
        fast = interval is not None
        if interval is not None:
            gpu_s = interval
            util_s = sample.util_n * interval  # type: ignore[operator]
            energy = sample.power_n * interval  # type: ignore[operator]
        else:
            gpu_s = util_s = energy = 0
            exact = sample.contributions()
        if project_id is not None:
            hour_sums = self.hours.get(key)
            if hour_sums is None:
                hour_sums = self.hours[key] = HourSums()
            self._hour_texts.pop(key, None)
            hour_sums.gpu_n += gpu_s
            hour_sums.util_n += util_s
            hour_sums.energy_n += energy
            hour_sums.samples += 1
            if not fast:
                hour_sums.extra = _add_extra(hour_sums.extra, exact)
            touched_hours.add(key)
            job_sums = self.jobs.get(job_key)
            if job_sums is None:
                job_sums = self.jobs[job_key] = JobSums()
            self._job_texts.pop(job_key, None)
            idle = sample.util_pct < IDLE_UTIL_PCT
            job_sums.gpu_n += gpu_s
            job_sums.util_n += util_s
            job_sums.energy_n += energy
            if idle:
                job_sums.idle_n += gpu_s
            job_sums.samples += 1
            if not fast:
                job_sums.extra = _add_extra(job_sums.extra, (*exact, exact[0] if idle else ZERO))
            if touched_jobs is not None:
                touched_jobs.add(job_key)

        minute = self.minutes.get(minute_key)
        if minute is None:
            minute = self.minutes[minute_key] = MinuteSums()
        self._minute_texts.pop(minute_key, None)
        gpu_bit = self.gpu_bits[sample.gpu_key]
        minute.gpus |= gpu_bit
        minute.online_n += gpu_s
        if project_id is not None:
            minute.alloc |= gpu_bit
            minute.alloc_n += gpu_s
        minute.util_n += util_s
        minute.energy_n += energy
        minute.xid += sample.xid_errors
        minute.samples += 1
        if not fast:
            allocated = exact[0] if project_id is not None else ZERO
            minute.extra = _add_extra(minute.extra, (exact[0], allocated, exact[1], exact[2]))
        touched_minutes.add(minute_key)

        last = self.last_samples.get(sample.gpu_uuid)
        if last is None:
            self.last_samples[sample.gpu_uuid] = LastSample(
                end_n, project_id, sample.util_pct, sample.xid_errors
            )
        else:
            last.end_n = end_n
            last.project_id = project_id
            last.util_pct = sample.util_pct
            last.xid = sample.xid_errors
        return Outcome.COUNTED

    def expire(self, hour_retention_s: int, minute_retention_s: int) -> None:
        """Drop buckets that can no longer change: bounded state as time goes on."""
        latest = self.max_end_n // _IN
        for key in [k for k in self.hours if latest - hour_of_key(k) > hour_retention_s + HOUR]:
            del self.hours[key]
            self._hour_texts.pop(key, None)
        for key in [k for k in self.jobs if latest - hour_of_key(k) > hour_retention_s + HOUR]:
            del self.jobs[key]
            self._job_texts.pop(key, None)
        for key in [k for k in self.minutes if latest - int(k) > minute_retention_s]:
            del self.minutes[key]
            self._minute_texts.pop(key, None)
        for hour in [h for h in self.online_hours if latest - h > hour_retention_s + HOUR]:
            del self.online_hours[hour]
            self._changed_hours.discard(hour)
        # GPUs silent longer than the retention: nothing of theirs can change any more. A sample
        # of one arriving later is beyond the retention anyway.
        oldest_n = self.max_end_n - (hour_retention_s + HOUR) * _IN
        for gpu_uuid in [g for g, last in self.last_samples.items() if last.end_n < oldest_n]:
            del self.last_samples[gpu_uuid]
        silent = [k for k, cursor in self.gpus.items() if cursor.end_n < oldest_n]
        if silent:
            self._forget_gpus(silent)
        for cursor in self.gpus.values():
            runs = cursor.runs
            while runs and runs[0][1] < oldest_n:
                del runs[0]

    def _forget_gpus(self, keys: list[str]) -> None:
        """Drop GPUs' cursors; the minutes' GPU bitmasks (bit = position in `gpus`) are renumbered."""
        old_positions = {key: position for position, key in enumerate(self.gpus)}
        for key in keys:
            del self.gpus[key]
        moved = {old_positions[key]: new for new, key in enumerate(self.gpus)}
        self.gpu_bits = {key: 1 << position for position, key in enumerate(self.gpus)}

        def renumber(mask: int) -> int:
            renumbered = 0
            while mask:
                low = mask & -mask
                position = moved.get(low.bit_length() - 1)
                if position is not None:
                    renumbered |= 1 << position
                mask ^= low
            return renumbered

        for minute in self.minutes.values():
            minute.gpus = renumber(minute.gpus)
            minute.alloc = renumber(minute.alloc)
        self._minute_texts.clear()

    def completeness_facts(self, everything: bool = False) -> dict[str, dict[str, Any]]:
        """This node's facts for the hours whose completeness changed since the last call (or all):
        hour ISO -> {"through": newest sample ends at or after the hour's end, "rev": counted}."""
        for hour, through in self.online_hours.items():
            if not through and self.max_end_n >= (hour + HOUR) * _IN:
                self.online_hours[hour] = True
                self._changed_hours.add(hour)
        hours = self.online_hours if everything else self._changed_hours
        facts = {iso(h): {"through": self.online_hours[h], "rev": self.counted} for h in hours}
        self._changed_hours = set()
        return facts

    def recent_ids(self, gpu_key: str) -> int:
        return len(self.gpus[gpu_key].ids) // ID_DIGEST_BYTES

    def hour_sums(self, key: str) -> tuple[Decimal, Decimal, Decimal, int]:
        """(gpu_s, util_s, energy_J, samples) of one hour key, exact."""
        partial = self.hour_partial(key)
        return (
            Decimal(partial["gpu_s"]),
            Decimal(partial["util_s"]),
            Decimal(partial["energy_J"]),
            partial["samples"],
        )

    def hour_partial(self, key: str) -> dict[str, Any]:
        sums = self.hours[key]
        return {**dict(zip(_HOUR_NAMES, sums.texts(), strict=True)), "samples": sums.samples}

    def job_partial(self, key: str) -> dict[str, Any]:
        sums = self.jobs[key]
        return {**dict(zip(_JOB_NAMES, sums.texts(), strict=True)), "samples": sums.samples}

    def minute_partial(self, key: str) -> dict[str, Any]:
        sums = self.minutes[key]
        return {
            "gpus": sums.gpus.bit_count(),
            "alloc": sums.alloc.bit_count(),
            **dict(zip(_MINUTE_NAMES, sums.texts(), strict=True)),
            "xid": sums.xid,
            "samples": sums.samples,
        }

    def signal(self, node: str) -> NodeSignal:
        latest = self.max_end_n
        idle: dict[str, str] = {}
        xid_gpus = []
        xid_total = 0
        for gpu_uuid, last in self.last_samples.items():
            if last.end_n != latest:
                continue  # only the newest round describes the node now
            if last.project_id is not None and last.util_pct < IDLE_UTIL_PCT:
                idle[gpu_uuid] = last.project_id
            if last.xid:
                xid_gpus.append(gpu_uuid)
                xid_total += last.xid
        return NodeSignal(
            node=node,
            last_sample_time=_EPOCH + timedelta(microseconds=latest // 1000),
            gpus=len(self.last_samples),
            idle_allocated_gpus=sorted(idle),
            idle_projects=idle,
            xid_errors=xid_total,
            xid_gpus=sorted(xid_gpus),
        )


def exact_sum(texts: Any) -> Decimal:
    """The exact sum of decimal strings (the default context would round beyond 28 digits)."""
    total = ZERO
    for text in texts:
        total = EXACT.add(total, Decimal(text))
    return total


def partition_of(key: str, partitions: int) -> int:
    """The cross-node sums' partition of a key: stable across processes and workers."""
    return zlib.crc32(key.encode()) % partitions


def hour_epoch(hour_iso: str) -> int:
    return int(datetime.fromisoformat(hour_iso).timestamp())


def hour_of_key(key: str) -> int:
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
    energy_j = exact_sum(p["energy_J"] for p in nodes)
    samples = sum(p["samples"] for p in nodes)
    return HourlyTotal(
        project_id=project_id,
        gpu_model=gpu_model,
        hour_start=datetime.fromisoformat(hour_iso),
        gpu_seconds=exact_sum(p["gpu_s"] for p in nodes),
        util_gpu_seconds=exact_sum(p["util_s"] for p in nodes),
        energy_wh=(energy_j / HOUR).quantize(Decimal("0.000001")),
        samples=samples,
        revision=samples,
    )


def job_hourly_total(key: str, record: dict[str, Any]) -> JobHourlyTotal:
    project_id, job_id, gpu_model, hour_iso = key.split("|")
    nodes = record["nodes"].values()
    energy_j = exact_sum(p["energy_J"] for p in nodes)
    samples = sum(p["samples"] for p in nodes)
    return JobHourlyTotal(
        project_id=project_id,
        job_id=job_id or None,
        gpu_model=gpu_model,
        hour_start=datetime.fromisoformat(hour_iso),
        gpu_seconds=exact_sum(p["gpu_s"] for p in nodes),
        util_gpu_seconds=exact_sum(p["util_s"] for p in nodes),
        idle_gpu_seconds=exact_sum(p["idle_s"] for p in nodes),
        energy_wh=(energy_j / HOUR).quantize(Decimal("0.000001")),
        nodes=len(record["nodes"]),
        samples=samples,
        revision=samples,
    )


def cluster_minute(minute_key: str, record: dict[str, Any]) -> ClusterMinute:
    nodes = record["nodes"].values()
    online_s = exact_sum(p["online_s"] for p in nodes)
    alloc_s = exact_sum(p["alloc_s"] for p in nodes)
    util_s = exact_sum(p["util_s"] for p in nodes)
    energy_j = exact_sum(p["energy_J"] for p in nodes)
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
