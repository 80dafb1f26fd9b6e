"""Metering outputs: hourly totals and cluster minutes (docs/contracts.md §2)."""

from __future__ import annotations

from decimal import Decimal

from pydantic import AwareDatetime, BaseModel, Field


class HourlyTotal(BaseModel):
    """Cumulative totals of one (project, GPU model, hour). Totals, not increments."""

    project_id: str
    gpu_model: str
    hour_start: AwareDatetime
    gpu_seconds: Decimal
    util_gpu_seconds: Decimal
    energy_wh: Decimal
    samples: int = Field(ge=0)
    revision: int = Field(ge=0)

    @property
    def key(self) -> str:
        return hourly_key(self.project_id, self.gpu_model, self.hour_start.isoformat())


def hourly_key(project_id: str, gpu_model: str, hour_start_iso: str) -> str:
    return f"{project_id}|{gpu_model}|{hour_start_iso}"


class JobHourlyTotal(BaseModel):
    """Cumulative totals of one (project, job, GPU model, hour) on metering.usage.jobs.hourly.v1
    (compacted, keyed `project_id|job_id|gpu_model|hour_start`; job_id empty for samples of an
    allocation with no job). Totals, not increments, with the same exactness rules as
    HourlyTotal: summed over a project's jobs they equal its hourly totals."""

    project_id: str
    job_id: str | None
    gpu_model: str
    hour_start: AwareDatetime
    gpu_seconds: Decimal
    util_gpu_seconds: Decimal
    idle_gpu_seconds: Decimal = Field(
        description="GPU-seconds allocated at under 5% utilization (the sample's util_pct)"
    )
    energy_wh: Decimal
    nodes: int = Field(ge=0, description="nodes the job ran on in that hour")
    samples: int = Field(ge=0)
    revision: int = Field(ge=0)

    @property
    def key(self) -> str:
        return (
            f"{self.project_id}|{self.job_id or ''}|{self.gpu_model}|{self.hour_start.isoformat()}"
        )


class ClusterMinute(BaseModel):
    """Centre-wide utilization of one minute (UTC), cumulative as samples arrive."""

    minute_start: AwareDatetime
    nodes_reporting: int
    gpus_online: int
    gpus_allocated: int
    online_gpu_seconds: Decimal
    allocated_gpu_seconds: Decimal
    allocation_ratio: Decimal
    mean_util_pct: Decimal
    mean_power_w: Decimal
    xid_errors: int
    revision: int


class NodeSignal(BaseModel):
    """Per-node facts the alerts service needs: last seen, GPUs idle inside allocations, XIDs."""

    node: str
    last_sample_time: AwareDatetime
    gpus: int
    idle_allocated_gpus: list[str] = Field(
        default_factory=list,
        description="GPU uuids allocated to a project with util below the idle threshold in the latest sample",
    )
    idle_projects: dict[str, str] = Field(
        default_factory=dict, description="gpu uuid -> project_id"
    )
    xid_errors: int = 0
    xid_gpus: list[str] = Field(default_factory=list)


class HourCompleteness(BaseModel):
    """Whether every node that was online in an hour has reported through its end (a watermark
    billing shows before a period is finalized). On metering.completeness.v1, key = hour ISO."""

    hour_start: AwareDatetime
    nodes_online: int = Field(ge=0, description="nodes that sent any sample in this hour")
    nodes_through: int = Field(
        ge=0, description="of those, nodes whose newest sample ends at or after the hour's end"
    )
    missing_nodes: list[str] = Field(default_factory=list)
    complete: bool
    revision: int = Field(ge=0)
