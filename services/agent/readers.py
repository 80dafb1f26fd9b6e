"""GPU readers: NVML (through `pynvml`, the nvidia-ml-py package) and a dcgm-exporter scraper.

Both return one `GpuReading` per GPU, or per MIG instance, at the moment they are called; the agent
calls them on interval boundaries. What the numbers mean:

- `util_pct`: the device's "GPU busy" share as NVML / DCGM_FI_DEV_GPU_UTIL report it (NVML averages
  it over its own short sample period, 1/6 s to 1 s, so a sample is a reading, not an interval
  mean; dcgm-exporter does the same).
- `power_w`: with NVML, the average over the interval from the total-energy counter where the GPU
  has one (Volta and later), otherwise the instantaneous draw; with DCGM, DCGM_FI_DEV_POWER_USAGE.
- `xid_errors`: with NVML, XID critical-error events received since the last reading (an NVML event
  set, drained without waiting); where events are not supported, the increase of the volatile
  uncorrected ECC error count, which catches the memory XIDs (48, 63, 64, 94, 95) and nothing else.
  dcgm-exporter only exposes the *last* XID code (DCGM_FI_DEV_XID_ERRORS), so the scraper reports 1
  when that code changed to a non-zero value since the previous scrape: a lower bound.

MIG instances: NVML and DCGM report memory per instance but utilization, power and temperature
only for the whole GPU. A MIG instance reports its parent's `util_pct` and `temp_c`, and the
parent's power times the instance's share of the GPU's memory. We chose the parent's utilization
over 0 because 0 would raise the "allocated but idle" alert on every busy MIG job and the busy
share of the physical GPU is the closest honest figure; it is an upper bound for a single instance.
Its `gpu_model` names the profile ("H800 MIG 1g.10gb") so a rate card can price slices apart from
whole GPUs, and `gpu_index` is the parent's index.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

MIB = 1024 * 1024
DCGM_BLANK = 2**62  # DCGM reports "no value" as huge sentinels (e.g. 9223372036854775794)


@dataclass(frozen=True)
class GpuReading:
    index: int
    uuid: str
    model: str
    util_pct: float
    mem_used_mib: int
    mem_total_mib: int
    power_w: float
    temp_c: int
    xid_errors: int
    mig_instance: int | None = None  # GPU instance id when this reading is a MIG instance
    hostname: str | None = None

    @property
    def device_key(self) -> str:
        """How job-mapping files name the device: "3", or "3.1" for GPU instance 1 of GPU 3."""
        return str(self.index) if self.mig_instance is None else f"{self.index}.{self.mig_instance}"


class GpuReader(Protocol):
    def read(self) -> list[GpuReading]: ...

    def close(self) -> None: ...


class ReaderError(Exception):
    """The GPUs could not be read this round (driver gone, exporter down)."""


def gpu_model_name(name: str) -> str:
    """Rate cards say "H800": drop the vendor prefix NVML and DCGM put in front."""
    for prefix in ("NVIDIA ", "Tesla "):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name.strip() or "unknown"


def clamp_pct(value: float) -> float:
    return float(min(100.0, max(0.0, value)))


class NvmlReader:
    """Reads every GPU through NVML. `nvml` is the pynvml module; tests pass a fake one."""

    def __init__(
        self, nvml: ModuleType | Any | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if nvml is None:
            try:
                nvml = importlib.import_module("pynvml")
            except ImportError as exc:
                raise ReaderError(
                    "NVML reader needs the nvidia-ml-py package (module pynvml): "
                    "pip install nvidia-ml-py"
                ) from exc
        self.nvml = nvml
        self.clock = clock
        self._energy: dict[str, tuple[int, float]] = {}  # uuid -> (mJ, clock) at last reading
        self._ecc: dict[str, int] = {}
        self._event_set: Any = None
        self._events_supported: set[str] = set()
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise ReaderError(f"NVML init failed: {exc}") from exc
        self._register_xid_events()

    def _register_xid_events(self) -> None:
        nvml = self.nvml
        try:
            self._event_set = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as exc:
            log.info("NVML event sets unavailable (%s): counting XIDs from ECC counters", exc)
            return
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = nvml.nvmlDeviceGetUUID(handle)
            try:
                nvml.nvmlDeviceRegisterEvents(
                    handle, nvml.nvmlEventTypeXidCriticalError, self._event_set
                )
                self._events_supported.add(uuid)
            except nvml.NVMLError as exc:
                log.info("GPU %d: no XID events (%s): using ECC counters", index, exc)

    def _drain_xid_events(self) -> dict[tuple[str, int | None], int]:
        """XID events since the last call, per (GPU uuid, GPU instance id or None)."""
        counts: dict[tuple[str, int | None], int] = {}
        if self._event_set is None or not self._events_supported:
            return counts
        nvml = self.nvml
        while True:
            try:
                event = nvml.nvmlEventSetWait_v2(self._event_set, 0)
            except nvml.NVMLError as exc:
                if getattr(exc, "value", None) != nvml.NVML_ERROR_TIMEOUT:
                    log.warning("reading NVML events: %s", exc)
                break
            uuid = nvml.nvmlDeviceGetUUID(event.device)
            instance = getattr(event, "gpuInstanceId", None)
            key = (uuid, instance if isinstance(instance, int) and instance < 0xFFFF else None)
            counts[key] = counts.get(key, 0) + 1
        return counts

    def _ecc_delta(self, uuid: str, handle: Any) -> int:
        nvml = self.nvml
        try:
            total = int(
                nvml.nvmlDeviceGetTotalEccErrors(
                    handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC
                )
            )
        except nvml.NVMLError:
            return 0
        previous = self._ecc.get(uuid)
        self._ecc[uuid] = total
        return max(0, total - previous) if previous is not None else 0

    def _power_w(self, uuid: str, handle: Any) -> float:
        nvml = self.nvml
        now = self.clock()
        try:
            energy_mj = int(nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        except nvml.NVMLError:
            energy_mj = None
        if energy_mj is not None:
            previous = self._energy.get(uuid)
            self._energy[uuid] = (energy_mj, now)
            if previous is not None and now > previous[1] and energy_mj >= previous[0]:
                return round((energy_mj - previous[0]) / 1000 / (now - previous[1]), 1)
        try:
            return round(nvml.nvmlDeviceGetPowerUsage(handle) / 1000, 1)
        except nvml.NVMLError:
            return 0.0

    def read(self) -> list[GpuReading]:
        nvml = self.nvml
        try:
            xids = self._drain_xid_events()
            readings: list[GpuReading] = []
            for index in range(nvml.nvmlDeviceGetCount()):
                readings.extend(self._read_gpu(index, xids))
            return readings
        except nvml.NVMLError as exc:
            raise ReaderError(f"NVML read failed: {exc}") from exc

    def _read_gpu(self, index: int, xids: dict[tuple[str, int | None], int]) -> list[GpuReading]:
        nvml = self.nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        uuid = nvml.nvmlDeviceGetUUID(handle)
        model = gpu_model_name(nvml.nvmlDeviceGetName(handle))
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        if uuid in self._events_supported:
            xid = sum(n for (gpu, _), n in xids.items() if gpu == uuid)
        else:
            xid = self._ecc_delta(uuid, handle)
        gpu = GpuReading(
            index=index,
            uuid=uuid,
            model=model,
            util_pct=clamp_pct(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
            mem_used_mib=int(memory.used // MIB),
            mem_total_mib=int(memory.total // MIB),
            power_w=self._power_w(uuid, handle),
            temp_c=int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
            xid_errors=xid,
        )
        instances = self._mig_instances(handle, gpu, xids)
        return instances if instances else [gpu]

    def _mig_instances(
        self, handle: Any, gpu: GpuReading, xids: dict[tuple[str, int | None], int]
    ) -> list[GpuReading]:
        nvml = self.nvml
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        except nvml.NVMLError:
            return []  # no MIG on this GPU model
        if current != nvml.NVML_DEVICE_MIG_ENABLE:
            return []
        instances = []
        for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except nvml.NVMLError:
                continue  # an empty slot
            instance_id = int(nvml.nvmlDeviceGetGpuInstanceId(mig))
            memory = nvml.nvmlDeviceGetMemoryInfo(mig)
            mem_total_mib = int(memory.total // MIB)
            share = mem_total_mib / gpu.mem_total_mib if gpu.mem_total_mib else 0.0
            # nvmlDeviceGetName on a MIG handle says e.g. "NVIDIA H800 MIG 1g.10gb"
            name = gpu_model_name(nvml.nvmlDeviceGetName(mig))
            if " MIG " not in name:
                name = f"{gpu.model} MIG {name}"
            own_xids = xids.get((gpu.uuid, instance_id), 0)
            whole_gpu_xids = xids.get((gpu.uuid, None), 0)
            instances.append(
                replace(
                    gpu,
                    uuid=nvml.nvmlDeviceGetUUID(mig),
                    model=name,
                    mem_used_mib=int(memory.used // MIB),
                    mem_total_mib=mem_total_mib,
                    power_w=round(gpu.power_w * share, 1),
                    xid_errors=own_xids + whole_gpu_xids,
                    mig_instance=instance_id,
                )
            )
        return instances

    def close(self) -> None:
        nvml = self.nvml
        try:
            if self._event_set is not None:
                nvml.nvmlEventSetFree(self._event_set)
            nvml.nvmlShutdown()
        except nvml.NVMLError as exc:
            log.debug("NVML shutdown: %s", exc)


DCGM_FIELDS = {
    "DCGM_FI_DEV_GPU_UTIL": "util",
    "DCGM_FI_DEV_FB_USED": "fb_used",
    "DCGM_FI_DEV_FB_FREE": "fb_free",
    "DCGM_FI_DEV_FB_RESERVED": "fb_reserved",
    "DCGM_FI_DEV_POWER_USAGE": "power",
    "DCGM_FI_DEV_GPU_TEMP": "temp",
    "DCGM_FI_DEV_XID_ERRORS": "xid_last",
}


@dataclass
class _DcgmDevice:
    index: int
    uuid: str
    model: str
    hostname: str | None
    instance: int | None
    profile: str | None
    values: dict[str, float]


def parse_dcgm_metrics(text: str) -> list[_DcgmDevice]:
    """dcgm-exporter's Prometheus page -> one entry per GPU or MIG instance, in index order.

    Labels: gpu, UUID, modelName, hostname (dcgm-exporter >= 3.3) or Hostname (older), and
    GPU_I_ID / GPU_I_PROFILE on MIG instances.
    """
    devices: dict[tuple[int, int | None], _DcgmDevice] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            field = DCGM_FIELDS.get(sample.name)
            if field is None or "gpu" not in sample.labels:
                continue
            labels = sample.labels
            instance = int(labels["GPU_I_ID"]) if labels.get("GPU_I_ID", "") != "" else None
            key = (int(labels["gpu"]), instance)
            device = devices.get(key)
            if device is None:
                device = devices[key] = _DcgmDevice(
                    index=key[0],
                    uuid=labels.get("UUID", f"gpu-{key[0]}"),
                    model=gpu_model_name(labels.get("modelName", "unknown")),
                    hostname=labels.get("hostname") or labels.get("Hostname") or None,
                    instance=instance,
                    profile=labels.get("GPU_I_PROFILE") or None,
                    values={},
                )
            if abs(sample.value) < DCGM_BLANK:
                device.values[field] = sample.value
    return [devices[key] for key in sorted(devices, key=lambda k: (k[0], k[1] if k[1] else -1))]


class DcgmReader:
    """Scrapes a dcgm-exporter endpoint (default http://127.0.0.1:9400/metrics)."""

    def __init__(self, url: str, timeout_s: float = 5.0, client: httpx.Client | None = None):
        self.url = url
        import httpx  # only the dcgm reader needs it: keeps the NVML agent's memory down

        self._http_error = httpx.HTTPError
        self.client = client or httpx.Client(timeout=timeout_s)
        self._last_xid: dict[str, float] = {}

    def read(self) -> list[GpuReading]:
        try:
            response = self.client.get(self.url)
            response.raise_for_status()
        except self._http_error as exc:
            raise ReaderError(f"dcgm-exporter {self.url}: {exc}") from exc
        devices = parse_dcgm_metrics(response.text)
        parents = {d.index: d for d in devices if d.instance is None}
        readings = []
        for device in devices:
            parent = parents.get(device.index, device)
            values = {**parent.values, **device.values} if device.instance is not None else {}
            values = values or device.values
            used = int(values.get("fb_used", 0))
            total = used + int(values.get("fb_free", 0)) + int(values.get("fb_reserved", 0))
            power = float(values.get("power", 0.0))
            uuid = device.uuid
            model = device.model
            if device.instance is not None:
                parent_total = int(parent.values.get("fb_used", 0)) + int(
                    parent.values.get("fb_free", 0)
                )
                parent_total += int(parent.values.get("fb_reserved", 0))
                share = total / parent_total if parent is not device and parent_total else 1.0
                power = power * min(1.0, share) if "power" not in device.values else power
                uuid = f"{device.uuid}:gi{device.instance}"  # the exporter names only the parent
                model = f"{device.model} MIG {device.profile or device.instance}"
            readings.append(
                GpuReading(
                    index=device.index,
                    uuid=uuid,
                    model=model,
                    util_pct=clamp_pct(values.get("util", 0.0)),
                    mem_used_mib=used,
                    mem_total_mib=total,
                    power_w=round(max(0.0, power), 1),
                    temp_c=int(values.get("temp", 0)),
                    xid_errors=self._xid_change(uuid, values.get("xid_last")),
                    mig_instance=device.instance,
                    hostname=device.hostname,
                )
            )
        return readings

    def _xid_change(self, uuid: str, last_code: float | None) -> int:
        if last_code is None:
            return 0
        previous = self._last_xid.get(uuid)
        self._last_xid[uuid] = last_code
        return 1 if previous is not None and last_code != previous and last_code != 0 else 0

    def close(self) -> None:
        self.client.close()
