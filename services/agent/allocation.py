"""Which job, and so which project, holds each GPU of this node.

Sources return a mapping from device key ("3", or "3.1" for GPU instance 1 of GPU 3; see
`GpuReading.device_key`) to the jobs on that device:

- `SlurmSource`: `scontrol show job -d --oneliner`, running jobs whose per-node detail names this
  node; GPU indexes from the GRES `IDX:` list (`gpu:h800:4(IDX:0-3)`, `gres/gpu:4(IDX:0,2-3)`);
  project = the Slurm Account.
- `JobMapDirSource`: the directory Slurm prolog/epilog scripts keep for dcgm-exporter's HPC job
  mapping: one file per GPU index (or `2.0` per MIG instance, or named by GPU/MIG UUID), each
  holding job ids one per line; the project of a job comes from a `ProjectLookup` (scontrol, or a
  file of `job_id project_id` lines).

A sample names exactly one project. When several jobs share a GPU (sharding, MPS, oversubscribe)
`choose_job` takes the job with the lowest job id: Slurm assigns ids in submission order, so that is
the longest-standing claim on the GPU; the rule needs no state, gives the same answer on every node
and after a restart, and does not flip while the jobs run. No job: project_id and job_id are null.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

JOB_ID_PREFIX = "slurm:"


@dataclass(frozen=True)
class Job:
    job_id: str  # Slurm's id, without prefix
    project_id: str | None


@dataclass(frozen=True)
class Allocation:
    project_id: str | None
    job_id: str | None  # "slurm:<id>"


UNALLOCATED = Allocation(None, None)


class AllocationError(Exception):
    """The allocation source could not be read this round."""


class AllocationSource(Protocol):
    def jobs_by_device(self) -> dict[str, list[Job]]: ...


def job_sort_key(job_id: str) -> tuple[int, int, str]:
    """Numeric ids in numeric order ("99" before "100"); array/het suffixes and others after."""
    head = re.match(r"\d+", job_id)
    if head:
        rest = job_id[head.end() :]
        return (0, int(head.group()), rest)
    return (1, 0, job_id)


def choose_job(jobs: Iterable[Job]) -> Job | None:
    """The one job a shared GPU's sample is attributed to: the lowest job id."""
    ordered = sorted(jobs, key=lambda job: job_sort_key(job.job_id))
    return ordered[0] if ordered else None


def allocation_for(
    jobs_by_device: dict[str, list[Job]], device_key: str, uuid: str | None = None
) -> Allocation:
    """A MIG instance not mapped on its own falls back to its parent GPU's jobs."""
    jobs = jobs_by_device.get(device_key) or (jobs_by_device.get(uuid) if uuid else None)
    if not jobs and "." in device_key:
        jobs = jobs_by_device.get(device_key.split(".", 1)[0])
    job = choose_job(jobs or [])
    if job is None:
        return UNALLOCATED
    return Allocation(job.project_id, f"{JOB_ID_PREFIX}{job.job_id}")


def expand_ranges(text: str) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6]."""
    numbers: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            low, high = part.split("-", 1)
            numbers.extend(range(int(low), int(high) + 1))
        else:
            numbers.append(int(part))
    return numbers


def expand_hostlist(expression: str) -> list[str]:
    """Slurm hostlists: 'gpu-[017-018,020],login1' -> ['gpu-017', 'gpu-018', 'gpu-020', 'login1']."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", expression):
        match = re.match(r"^(.*?)\[([^\]]*)\](.*)$", item)
        if not match:
            hosts.append(item)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            if "-" in part:
                low, high = part.split("-", 1)
                width = len(low)
                for number in range(int(low), int(high) + 1):
                    hosts.extend(expand_hostlist(f"{prefix}{number:0{width}d}{suffix}"))
            else:
                hosts.extend(expand_hostlist(f"{prefix}{part}{suffix}"))
    return hosts


GRES_GPU = re.compile(r"(?:gres/)?gpu(?::[^:(,]+)*\(IDX:([^)]*)\)")


def gpu_indexes_from_gres(gres: str) -> list[int]:
    """'gpu:h800:4(IDX:0-3)' or 'gres/gpu:4(IDX:0,2-3),gres/shard:...' -> GPU indexes."""
    indexes: list[int] = []
    for match in GRES_GPU.finditer(gres):
        if match.group(1).strip() and match.group(1).strip() != "N/A":
            indexes.extend(expand_ranges(match.group(1)))
    return indexes


def _fields(line: str) -> list[tuple[str, str]]:
    """A --oneliner record as (key, value) pairs, in order (keys repeat per node detail)."""
    return re.findall(r"(?:^|\s)([A-Za-z_:/]+)=(\S*)", line)


def parse_scontrol_jobs(output: str, node: str) -> dict[str, list[Job]]:
    """`scontrol show job -d --oneliner` -> this node's running jobs per GPU index."""
    by_device: dict[str, list[Job]] = {}
    for line in output.splitlines():
        fields = _fields(line)
        if not fields:
            continue
        first = dict(fields)
        if first.get("JobState") != "RUNNING" or "JobId" not in first:
            continue
        account = first.get("Account") or None
        job = Job(first["JobId"], account if account != "(null)" else None)
        detail_nodes: list[str] | None = None
        for key, value in fields:
            if key == "Nodes":
                detail_nodes = expand_hostlist(value)
            elif key in ("GRES", "GRES_IDX") and detail_nodes is not None and node in detail_nodes:
                for index in gpu_indexes_from_gres(value):
                    by_device.setdefault(str(index), []).append(job)
    return by_device


def parse_accounts(output: str) -> dict[str, str | None]:
    """`scontrol show job --oneliner` (any jobs, any state) -> {job id: account}."""
    accounts: dict[str, str | None] = {}
    for line in output.splitlines():
        fields = dict(_fields(line))
        if "JobId" in fields:
            account = fields.get("Account") or None
            accounts[fields["JobId"]] = account if account != "(null)" else None
    return accounts


Runner = Callable[[list[str]], str]


def run_command(argv: list[str], timeout_s: float = 10.0) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AllocationError(f"{argv[0]}: {exc}") from exc
    if done.returncode != 0:
        raise AllocationError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


class SlurmSource:
    def __init__(self, node: str, scontrol: str = "scontrol", runner: Runner = run_command):
        self.node = node
        self.scontrol = scontrol
        self.runner = runner

    def jobs_by_device(self) -> dict[str, list[Job]]:
        return parse_scontrol_jobs(
            self.runner([self.scontrol, "show", "job", "-d", "--oneliner"]), self.node
        )


class ProjectLookup(Protocol):
    def projects(self, job_ids: set[str]) -> dict[str, str | None]: ...


class ScontrolProjectLookup:
    """Account of each job via scontrol, remembered: a job's account does not change."""

    def __init__(self, scontrol: str = "scontrol", runner: Runner = run_command) -> None:
        self.scontrol = scontrol
        self.runner = runner
        self.known: dict[str, str | None] = {}

    def projects(self, job_ids: set[str]) -> dict[str, str | None]:
        missing = sorted(job_ids - self.known.keys(), key=job_sort_key)
        if missing:
            output = self.runner([self.scontrol, "show", "job", "--oneliner", ",".join(missing)])
            self.known.update(parse_accounts(output))
            if len(self.known) > 10000:  # finished jobs: forget the oldest half
                for job_id in sorted(self.known, key=job_sort_key)[:5000]:
                    del self.known[job_id]
        return {job_id: self.known.get(job_id) for job_id in job_ids}


class FileProjectLookup:
    """A file of `job_id project_id` lines (blank lines and # comments ignored), re-read on change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime: float | None = None
        self._table: dict[str, str] = {}

    def projects(self, job_ids: set[str]) -> dict[str, str | None]:
        try:
            mtime = self.path.stat().st_mtime
        except OSError as exc:
            raise AllocationError(f"job project file {self.path}: {exc}") from exc
        if mtime != self._mtime:
            table = {}
            for line in self.path.read_text().splitlines():
                parts = line.split("#", 1)[0].split()
                if len(parts) >= 2:
                    table[parts[0]] = parts[1]
            self._table, self._mtime = table, mtime
        return {job_id: self._table.get(job_id) for job_id in job_ids}


class JobMapDirSource:
    def __init__(self, directory: Path, lookup: ProjectLookup) -> None:
        self.directory = directory
        self.lookup = lookup

    def jobs_by_device(self) -> dict[str, list[Job]]:
        job_ids_by_device: dict[str, list[str]] = {}
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return {}  # no job has run since boot: prolog creates the directory
        except OSError as exc:
            raise AllocationError(f"job map {self.directory}: {exc}") from exc
        for name in names:
            if name.startswith("."):
                continue
            try:
                text = (self.directory / name).read_text()
            except (FileNotFoundError, IsADirectoryError):
                continue  # epilog removed it while we listed
            ids = [line.strip() for line in text.splitlines() if line.strip()]
            if ids:
                job_ids_by_device[name] = ids
        wanted = {job_id for ids in job_ids_by_device.values() for job_id in ids}
        projects = self.lookup.projects(wanted) if wanted else {}
        return {
            device: [Job(job_id, projects.get(job_id)) for job_id in ids]
            for device, ids in job_ids_by_device.items()
        }


class NoAllocation:
    def jobs_by_device(self) -> dict[str, list[Job]]:
        return {}
