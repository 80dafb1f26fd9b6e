"""GPU readers against a fake pynvml with known values and a canned dcgm-exporter page."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from schemas.codec import decode_usage_event
from services.agent.allocation import Job
from services.agent.readers import DcgmReader, NvmlReader, ReaderError
from services.agent.sampler import NodeSampler
from tests.fixtures.fake_nvml import FakeGpu, FakeMig, FakeNvml
from tests.fixtures.processes import REPO_ROOT

UUID_0 = "GPU-5d1c0f3e-7a2b-4c1d-9e8f-0a1b2c3d4e50"
UUID_1 = "GPU-5d1c0f3e-7a2b-4c1d-9e8f-0a1b2c3d4e51"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_nvml_readings_carry_the_values_nvml_reports_in_contract_units() -> None:
    nvml = FakeNvml(
        [
            FakeGpu(
                UUID_0,
                util_pct=87,
                mem_used_mib=61234,
                power_mw=512_300,
                temp_c=61,
            ),
            FakeGpu(UUID_1, name="NVIDIA H100 80GB HBM3", util_pct=3, mem_total_mib=81559),
        ]
    )

    readings = NvmlReader(nvml=nvml).read()

    first, second = readings
    assert (first.index, first.uuid, first.model) == (0, UUID_0, "H800")
    assert (first.util_pct, first.mem_used_mib, first.mem_total_mib) == (87.0, 61234, 81559)
    assert (first.power_w, first.temp_c, first.xid_errors) == (512.3, 61, 0)
    assert (second.index, second.model, second.util_pct) == (1, "H100 80GB HBM3", 3.0)


def test_power_is_the_interval_average_from_the_energy_counter_when_the_gpu_has_one() -> None:
    gpu = FakeGpu(UUID_0, power_mw=700_000, energy_mj=5_000_000)
    clock = Clock()
    reader = NvmlReader(nvml=FakeNvml([gpu]), clock=clock)
    assert reader.read()[0].power_w == 700.0  # no earlier reading: the instantaneous draw

    clock.now += 10
    gpu.energy_mj = 5_000_000 + 4_000_000  # 4 kJ in 10 s

    assert reader.read()[0].power_w == 400.0


def test_xid_critical_error_events_are_counted_per_gpu_since_the_last_reading() -> None:
    nvml = FakeNvml([FakeGpu(UUID_0), FakeGpu(UUID_1)])
    reader = NvmlReader(nvml=nvml)
    nvml.xid(1, code=79)
    nvml.xid(1, code=48)

    assert [r.xid_errors for r in reader.read()] == [0, 2]
    assert [r.xid_errors for r in reader.read()] == [0, 0]


def test_without_xid_events_the_reader_counts_new_uncorrected_ecc_errors() -> None:
    gpu = FakeGpu(UUID_0, ecc_uncorrected=5, xid_events_supported=False)
    reader = NvmlReader(nvml=FakeNvml([gpu]))
    assert reader.read()[0].xid_errors == 0  # errors from before the agent started are not new

    gpu.ecc_uncorrected = 7

    assert reader.read()[0].xid_errors == 2
    assert reader.read()[0].xid_errors == 0


def test_mig_instances_report_their_memory_the_parents_util_and_a_memory_share_of_power() -> None:
    gpu = FakeGpu(
        UUID_0,
        util_pct=90,
        mem_total_mib=80000,
        power_mw=400_000,
        mig_enabled=True,
        migs=[
            FakeMig("MIG-aaaa", 1, "NVIDIA H800 MIG 3g.40gb", 30000, 40000),
            None,
            FakeMig("MIG-bbbb", 2, "NVIDIA H800 MIG 1g.10gb", 100, 10000),
        ],
    )
    nvml = FakeNvml([gpu])
    reader = NvmlReader(nvml=nvml)
    nvml.xid(0, gpu_instance_id=2)

    big, small = reader.read()

    assert (big.uuid, big.model, big.index, big.device_key) == (
        "MIG-aaaa",
        "H800 MIG 3g.40gb",
        0,
        "0.1",
    )
    assert (big.mem_used_mib, big.mem_total_mib, big.util_pct, big.power_w) == (
        30000,
        40000,
        90.0,
        200.0,
    )
    assert (small.device_key, small.power_w, small.xid_errors, big.xid_errors) == (
        "0.2",
        50.0,
        1,
        0,
    )


def test_an_nvml_failure_is_a_reader_error_and_a_missing_pynvml_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nvml = FakeNvml([FakeGpu(UUID_0)])
    reader = NvmlReader(nvml=nvml)
    nvml.failure = 15  # NVML_ERROR_GPU_IS_LOST
    with pytest.raises(ReaderError):
        reader.read()
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(ReaderError, match="nvidia-ml-py"):
        NvmlReader()


def test_the_nvml_reader_finds_pynvml_in_sys_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([FakeGpu(UUID_0, util_pct=42)]))
    assert NvmlReader().read()[0].util_pct == 42.0


DCGM_PAGE = """\
# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-aaaa",pci_bus_id="00000000:18:00.0",device="nvidia0",modelName="NVIDIA H800",HOST="node-017",DCGM_FI_DRIVER_VERSION="535.129.03"} 87
DCGM_FI_DEV_GPU_UTIL{gpu="1",UUID="GPU-bbbb",pci_bus_id="00000000:2A:00.0",device="nvidia1",modelName="NVIDIA H800",HOST="node-017",DCGM_FI_DRIVER_VERSION="535.129.03"} 0
# HELP DCGM_FI_DEV_FB_FREE Framebuffer memory free (in MiB).
# TYPE DCGM_FI_DEV_FB_FREE gauge
DCGM_FI_DEV_FB_FREE{gpu="0",UUID="GPU-aaaa",device="nvidia0",modelName="NVIDIA H800",HOST="node-017"} 20325
DCGM_FI_DEV_FB_FREE{gpu="1",UUID="GPU-bbbb",device="nvidia1",modelName="NVIDIA H800",HOST="node-017"} 81559
# HELP DCGM_FI_DEV_FB_USED Framebuffer memory used (in MiB).
# TYPE DCGM_FI_DEV_FB_USED gauge
DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-aaaa",device="nvidia0",modelName="NVIDIA H800",HOST="node-017"} 61234
DCGM_FI_DEV_FB_USED{gpu="1",UUID="GPU-bbbb",device="nvidia1",modelName="NVIDIA H800",HOST="node-017"} 0
# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).
# TYPE DCGM_FI_DEV_POWER_USAGE gauge
DCGM_FI_DEV_POWER_USAGE{gpu="0",UUID="GPU-aaaa",device="nvidia0",modelName="NVIDIA H800",HOST="node-017"} 512.345
DCGM_FI_DEV_POWER_USAGE{gpu="1",UUID="GPU-bbbb",device="nvidia1",modelName="NVIDIA H800",HOST="node-017"} 71.2
# HELP DCGM_FI_DEV_GPU_TEMP GPU temperature (in C).
# TYPE DCGM_FI_DEV_GPU_TEMP gauge
DCGM_FI_DEV_GPU_TEMP{gpu="0",UUID="GPU-aaaa",device="nvidia0",modelName="NVIDIA H800",HOST="node-017"} 61
DCGM_FI_DEV_GPU_TEMP{gpu="1",UUID="GPU-bbbb",device="nvidia1",modelName="NVIDIA H800",HOST="node-017"} 33
# HELP DCGM_FI_DEV_XID_ERRORS Value of the last XID error encountered.
# TYPE DCGM_FI_DEV_XID_ERRORS gauge
DCGM_FI_DEV_XID_ERRORS{gpu="0",UUID="GPU-aaaa",device="nvidia0",modelName="NVIDIA H800",HOST="node-017",err_code="0",err_msg="No Error"} XID
DCGM_FI_DEV_XID_ERRORS{gpu="1",UUID="GPU-bbbb",device="nvidia1",modelName="NVIDIA H800",HOST="node-017",err_code="0",err_msg="No Error"} 0
"""


def dcgm_page(host_label: str, last_xid: str) -> str:
    return DCGM_PAGE.replace("HOST", host_label).replace("} XID", "} " + last_xid)


class Exporter:
    def __init__(self) -> None:
        self.page = ""
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = exporter.page.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"


@pytest.fixture
def exporter() -> Iterator[Exporter]:
    exporter = Exporter()
    yield exporter
    exporter.server.shutdown()


@pytest.mark.parametrize("host_label", ["hostname", "Hostname"])
def test_the_dcgm_scraper_reads_each_gpu_with_either_spelling_of_the_host_label(
    exporter: Exporter, host_label: str
) -> None:
    exporter.page = dcgm_page(host_label, "0")

    first, second = DcgmReader(exporter.url).read()

    assert (first.index, first.uuid, first.model, first.hostname) == (
        0,
        "GPU-aaaa",
        "H800",
        "node-017",
    )
    assert (first.util_pct, first.mem_used_mib, first.mem_total_mib) == (87.0, 61234, 81559)
    assert (first.power_w, first.temp_c, first.xid_errors) == (512.3, 61, 0)
    assert (second.index, second.util_pct, second.mem_used_mib, second.power_w) == (1, 0.0, 0, 71.2)


def test_the_dcgm_scraper_counts_a_change_of_the_last_xid_code_as_an_error(
    exporter: Exporter,
) -> None:
    reader = DcgmReader(exporter.url)
    exporter.page = dcgm_page("hostname", "13")
    assert reader.read()[0].xid_errors == 0  # an old error: it happened before we looked
    exporter.page = dcgm_page("hostname", "79")
    assert reader.read()[0].xid_errors == 1
    assert reader.read()[0].xid_errors == 0


def test_an_unreachable_exporter_is_a_reader_error() -> None:
    with pytest.raises(ReaderError):
        DcgmReader("http://127.0.0.1:9/metrics", timeout_s=1).read()


class FixedJobs:
    def jobs_by_device(self) -> dict[str, list[Job]]:
        return {"0": [Job("123456", "hkgai-llm")]}


def test_a_sampler_round_is_one_contract_event_per_gpu_named_after_the_node(
    exporter: Exporter,
) -> None:
    exporter.page = dcgm_page("hostname", "0")
    at = datetime(2026, 11, 28, 2, 0, 10, tzinfo=UTC)

    per_node = NodeSampler(None, DcgmReader(exporter.url), FixedJobs(), 10.0).round(at)

    assert list(per_node) == ["node-017"]
    events = [decode_usage_event(e, now=at) for e in per_node["node-017"]]
    assert events[0].id == "node-017/GPU-aaaa/1795831210"
    assert (events[0].data.project_id, events[0].data.job_id) == ("hkgai-llm", "slurm:123456")
    assert (events[1].data.project_id, events[1].data.job_id) == (None, None)


def test_once_prints_one_round_of_real_readings_as_json(exporter: Exporter) -> None:
    exporter.page = dcgm_page("Hostname", "0")
    env = {
        **os.environ,
        "AGENT_READER": "dcgm",
        "AGENT_DCGM_URL": exporter.url,
        "AGENT_NODE": "gpu-node-9",
    }

    done = subprocess.run(
        [sys.executable, "-m", "services.agent", "--once"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    per_node = json.loads(done.stdout)
    assert [e["data"]["gpu_uuid"] for e in per_node["gpu-node-9"]] == ["GPU-aaaa", "GPU-bbbb"]
    assert all(e["source"] == "/nodes/gpu-node-9" for e in per_node["gpu-node-9"])
