"""A seeded, deterministic fleet: nodes x 8 GPUs, jobs arriving and leaving per project, diurnal load,
GPUs idling inside allocations, occasional XID errors and silent nodes. Pure: no I/O, no clock."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from schemas.identity import USAGE_EVENT_TYPE, usage_event_id

HKT = ZoneInfo("Asia/Hong_Kong")
DEFAULT_PROJECTS = {
    "hkgai-llm": 30,
    "hku-vision-lab": 8,
    "cuhk-med-ai": 8,
    "hkust-robotics": 6,
    "polyu-climate": 5,
    "cityu-bio": 4,
    "hkpc-manufacturing": 6,
    "startup-finllm": 5,
    "startup-cantonese-asr": 4,
    "startup-legaltech": 3,
    "gov-digital-policy": 8,
    "commercial-partner": 5,
}
JOB_SIZES = (1, 2, 4, 8, 8, 8)  # GPUs; most large-model jobs take whole nodes
MEM_TOTAL_MIB = 81559


@dataclass
class Job:
    job_id: str
    project_id: str
    node: str
    gpu_indexes: list[int]
    ends_at: datetime
    util_mean: float  # an idle allocation has a mean under 5%


@dataclass
class Node:
    name: str
    gpu_model: str
    gpu_uuids: list[str]
    jobs: dict[int, Job] = field(default_factory=dict)  # gpu index -> job
    silent_until: datetime | None = None


@dataclass
class FleetConfig:
    nodes: int = 8
    gpus_per_node: int = 8
    gpu_model: str = "H800"
    seed: int = 7
    interval_s: float = 10.0
    target_allocation: float = 0.92
    mean_job_hours: float = 6.0
    idle_job_share: float = 0.04
    xid_per_gpu_hour: float = 0.002
    silence_per_node_day: float = 0.0
    silence_minutes: float = 5.0
    projects: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PROJECTS))


class FleetSimulator:
    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.random = random.Random(config.seed)
        self.nodes = [
            Node(
                name=f"node-{n:03d}",
                gpu_model=config.gpu_model,
                gpu_uuids=[self._uuid() for _ in range(config.gpus_per_node)],
            )
            for n in range(1, config.nodes + 1)
        ]
        self.job_counter = 0

    def _uuid(self) -> str:
        h = f"{self.random.getrandbits(128):032x}"
        return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    @property
    def total_gpus(self) -> int:
        return self.config.nodes * self.config.gpus_per_node

    def allocated_gpus(self) -> int:
        return sum(len(node.jobs) for node in self.nodes)

    def _target(self, at: datetime) -> float:
        """Diurnal load: a little lower in the small hours of Hong Kong, never far from target."""
        hour = at.astimezone(HKT).hour + at.minute / 60
        swing = 0.04 * math.cos((hour - 15) / 24 * 2 * math.pi)
        return min(1.0, self.config.target_allocation + swing)

    def _schedule(self, at: datetime) -> None:
        for node in self.nodes:
            for index, job in list(node.jobs.items()):
                if job.ends_at <= at:
                    del node.jobs[index]
        projects = list(self.config.projects)
        weights = list(self.config.projects.values())
        attempts = 0
        while self.allocated_gpus() < self._target(at) * self.total_gpus and attempts < 50:
            attempts += 1
            size = min(self.random.choice(JOB_SIZES), self.config.gpus_per_node)
            free_nodes = [n for n in self.nodes if self.config.gpus_per_node - len(n.jobs) >= size]
            if not free_nodes:
                continue
            node = (
                free_nodes[0]
                if size == self.config.gpus_per_node
                else self.random.choice(free_nodes)
            )
            free = [i for i in range(self.config.gpus_per_node) if i not in node.jobs][:size]
            self.job_counter += 1
            hours = self.random.expovariate(1 / self.config.mean_job_hours)
            idle = self.random.random() < self.config.idle_job_share
            job = Job(
                job_id=f"slurm:{100000 + self.job_counter}",
                project_id=self.random.choices(projects, weights)[0],
                node=node.name,
                gpu_indexes=free,
                ends_at=at + timedelta(hours=max(hours, 0.25)),
                util_mean=self.random.uniform(0.5, 3.0) if idle else self.random.uniform(60, 97),
            )
            for index in free:
                node.jobs[index] = job

    def round(self, at: datetime) -> dict[str, list[dict]]:
        """One sampling round ending at `at`: CloudEvent dicts per reporting node."""
        self._schedule(at)
        interval = self.config.interval_s
        per_node: dict[str, list[dict]] = {}
        for node in self.nodes:
            if node.silent_until is not None and at < node.silent_until:
                continue
            node.silent_until = None
            p_silence = self.config.silence_per_node_day * interval / 86400
            if p_silence and self.random.random() < p_silence:
                node.silent_until = at + timedelta(minutes=self.config.silence_minutes)
                continue
            events = []
            for index, uuid in enumerate(node.gpu_uuids):
                job = node.jobs.get(index)
                if job is None:
                    util = round(self.random.uniform(0, 1.0), 1)
                else:
                    util = round(min(100.0, max(0.0, self.random.gauss(job.util_mean, 3))), 1)
                xid = (
                    1
                    if self.random.random() < self.config.xid_per_gpu_hour * interval / 3600
                    else 0
                )
                events.append(
                    usage_event(
                        node=node.name,
                        gpu_uuid=uuid,
                        gpu_index=index,
                        gpu_model=node.gpu_model,
                        at=at,
                        interval_s=interval,
                        project_id=job.project_id if job else None,
                        job_id=job.job_id if job else None,
                        util_pct=util,
                        mem_used_mib=int(MEM_TOTAL_MIB * (0.2 + util / 125)) if job else 0,
                        power_w=round(90 + 6 * util + self.random.uniform(-5, 5), 1),
                        temp_c=int(35 + util * 0.3),
                        xid_errors=xid,
                    )
                )
            per_node[node.name] = events
        return per_node


def usage_event(
    *,
    node: str,
    gpu_uuid: str,
    gpu_index: int,
    gpu_model: str,
    at: datetime,
    interval_s: float,
    project_id: str | None,
    job_id: str | None,
    util_pct: float,
    mem_used_mib: int,
    power_w: float,
    temp_c: int,
    xid_errors: int,
    mem_total_mib: int = MEM_TOTAL_MIB,
) -> dict:
    """A usage CloudEvent (docs/contracts.md §1) as a JSON-ready dict; its id is stable across
    retries."""
    return {
        "specversion": "1.0",
        "id": usage_event_id(node, gpu_uuid, at),
        "source": f"/nodes/{node}",
        "type": USAGE_EVENT_TYPE,
        "subject": gpu_uuid,
        "time": at.isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": {
            "node": node,
            "gpu_uuid": gpu_uuid,
            "gpu_index": gpu_index,
            "gpu_model": gpu_model,
            "interval_s": float(interval_s),
            "project_id": project_id,
            "job_id": job_id,
            "util_pct": float(util_pct),
            "mem_used_mib": mem_used_mib,
            "mem_total_mib": mem_total_mib,
            "power_w": float(power_w),
            "temp_c": temp_c,
            "xid_errors": xid_errors,
        },
    }


def aligned(at: datetime, interval_s: float) -> datetime:
    """The interval boundary at or before `at`, so sample times are predictable."""
    epoch = at.timestamp()
    return datetime.fromtimestamp(epoch - epoch % interval_s, at.tzinfo)
