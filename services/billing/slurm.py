"""Slurm's accounting, read with `sacct`, for reconciling gpumeter's GPU-hours against it.

Slurm knows, per job, the GPUs it allocated (`AllocTRES` gres/gpu) and when it ran; gpumeter
metered what the node agents saw. `sacct_jobs` reads Slurm's side for a window, `reconcile` (pure)
lists every job where the two differ beyond a tolerance, or that only one side knows.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal

SACCT_FORMAT = "JobID,Account,User,AllocTRES,Elapsed,Start,End,State"
# gpumeter's job ids for Slurm jobs (services/agent/allocation.py): slurm:<JobID>
JOB_PREFIX = "slurm:"
GPU_TRES = re.compile(r"(?:^|,)gres/gpu=(\d+)(?:,|$)")


class SacctError(RuntimeError):
    """sacct could not be run, or said something that is not its parsable output."""


@dataclass(frozen=True)
class SlurmJob:
    job_id: str
    account: str
    user: str
    gpus: int
    start: dt.datetime | None
    end: dt.datetime | None  # None: still running
    state: str

    def gpu_seconds_within(self, start: dt.datetime, end: dt.datetime, now: dt.datetime) -> Decimal:
        """Allocated GPUs x the seconds the job ran inside [start, end)."""
        if self.start is None or not self.gpus:
            return Decimal(0)
        ran_from = max(self.start, start)
        ran_to = min(self.end or now, end)
        seconds = max((ran_to - ran_from).total_seconds(), 0)
        return Decimal(self.gpus) * Decimal(int(seconds))


def _slurm_time(text: str, zone: dt.tzinfo) -> dt.datetime | None:
    if text in ("", "Unknown", "None"):
        return None
    return dt.datetime.fromisoformat(text).replace(tzinfo=zone)


def parse_sacct(output: str, zone: dt.tzinfo) -> list[SlurmJob]:
    """`sacct -X -P -n --format=SACCT_FORMAT` output; times in `zone` (sacct prints the
    cluster's local time without an offset)."""
    jobs = []
    for number, line in enumerate(output.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) != 8:
            raise SacctError(f"sacct line {number}: expected 8 fields, got {len(fields)}: {line!r}")
        job_id, account, user, tres, _elapsed, start, end, state = fields
        found = GPU_TRES.search(tres)
        jobs.append(
            SlurmJob(
                job_id=job_id,
                account=account,
                user=user,
                gpus=int(found.group(1)) if found else 0,
                start=_slurm_time(start, zone),
                end=_slurm_time(end, zone),
                state=state.split(" ")[0],
            )
        )
    return jobs


async def sacct_jobs(
    sacct: str, start: dt.datetime, end: dt.datetime, timeout_s: float = 30.0
) -> list[SlurmJob]:
    """Every job (all users) that ran in [start, end), from Slurm's accounting (SLURM_CONF in
    the environment names the cluster). sacct runs with TZ=UTC: it prints times without an
    offset, in the zone it runs in."""
    local = "%Y-%m-%dT%H:%M:%S"
    zone = dt.UTC
    try:
        process = await asyncio.create_subprocess_exec(
            sacct,
            "-X",
            "-P",
            "-n",
            "-a",
            f"--format={SACCT_FORMAT}",
            "-S",
            start.astimezone(zone).strftime(local),
            "-E",
            end.astimezone(zone).strftime(local),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "TZ": "UTC"},
        )
        out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    except (OSError, TimeoutError) as exc:
        raise SacctError(f"{sacct}: {exc!r}") from None
    if process.returncode != 0:
        raise SacctError(
            f"{sacct} exited {process.returncode}: {err.decode(errors='replace')[:500]}"
        )
    return parse_sacct(out.decode(errors="replace"), zone)


@dataclass(frozen=True)
class Difference:
    job_id: str  # Slurm's JobID
    project_id: str | None  # gpumeter's project, else Slurm's account
    kind: str  # missing_in_gpumeter | missing_in_slurm | hours_differ | project_differs
    metered_gpu_seconds: Decimal
    slurm_gpu_seconds: Decimal
    detail: str


def reconcile(
    metered: Mapping[tuple[str, str], Decimal],
    slurm: Iterable[SlurmJob],
    start: dt.datetime,
    end: dt.datetime,
    now: dt.datetime,
    tolerance_pct: Decimal,
    tolerance_gpu_seconds: Decimal,
) -> list[Difference]:
    """`metered`: (project_id, job_id as gpumeter has it) -> GPU-seconds in [start, end).
    A job differs when |metered - slurm| exceeds both the absolute and the relative tolerance
    (the agents sample every few seconds: a job's first and last samples straddle its edges)."""
    by_job: dict[str, tuple[str, Decimal]] = {}
    for (project_id, job_id), seconds in metered.items():
        if job_id.startswith(JOB_PREFIX):
            slurm_id = job_id.removeprefix(JOB_PREFIX)
            previous = by_job.get(slurm_id)
            by_job[slurm_id] = (project_id, seconds + (previous[1] if previous else 0))
    differences = []
    seen = set()
    for job in slurm:
        allocated = job.gpu_seconds_within(start, end, now)
        if not allocated:
            continue
        seen.add(job.job_id)
        found = by_job.get(job.job_id)
        if found is None:
            differences.append(
                Difference(
                    job.job_id,
                    job.account,
                    "missing_in_gpumeter",
                    Decimal(0),
                    allocated,
                    f"Slurm allocated {job.gpus} GPUs ({job.state}); gpumeter metered none",
                )
            )
            continue
        project_id, seconds = found
        gap = abs(seconds - allocated)
        if gap > tolerance_gpu_seconds and gap * 100 > tolerance_pct * allocated:
            differences.append(
                Difference(
                    job.job_id,
                    project_id,
                    "hours_differ",
                    seconds,
                    allocated,
                    f"metered {seconds} GPU-seconds, Slurm allocated {allocated}",
                )
            )
        if project_id != job.account:
            differences.append(
                Difference(
                    job.job_id,
                    project_id,
                    "project_differs",
                    seconds,
                    allocated,
                    f"gpumeter charged project {project_id}; Slurm's account is {job.account}",
                )
            )
    for slurm_id, (project_id, seconds) in sorted(by_job.items()):
        if slurm_id not in seen and seconds > tolerance_gpu_seconds:
            differences.append(
                Difference(
                    slurm_id,
                    project_id,
                    "missing_in_slurm",
                    seconds,
                    Decimal(0),
                    "gpumeter metered this job; Slurm's accounting has no GPUs for it",
                )
            )
    differences.sort(key=lambda d: (d.kind, d.project_id or "", d.job_id))
    return differences
