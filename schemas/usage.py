"""The usage sample CloudEvent of CONTRACTS §1."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt, StrictStr

from schemas.identity import USAGE_EVENT_TYPE, usage_event_id

__all__ = ["USAGE_EVENT_TYPE", "UsageData", "UsageEvent", "usage_event_id"]

MAX_INTERVAL_S = 3600.0
MAX_FUTURE_SKEW_S = 300.0
MAX_MESSAGE_BYTES = 1024 * 1024

StrictFloat = Annotated[float, Field(strict=True)]


class UsageData(BaseModel):
    """One GPU's readings over one sampling interval."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    node: StrictStr = Field(min_length=1)
    gpu_uuid: StrictStr = Field(min_length=1)
    gpu_index: StrictInt = Field(ge=0)
    gpu_model: StrictStr = Field(min_length=1)
    interval_s: StrictFloat
    project_id: StrictStr | None
    job_id: StrictStr | None
    util_pct: StrictFloat
    mem_used_mib: StrictInt = Field(ge=0)
    mem_total_mib: StrictInt = Field(ge=0)
    power_w: StrictFloat = Field(ge=0)
    temp_c: StrictInt
    xid_errors: StrictInt = Field(ge=0)


class UsageEvent(BaseModel):
    """A CloudEvents 1.0 envelope (structured JSON mode) around UsageData."""

    model_config = ConfigDict(extra="allow", frozen=True)

    specversion: Literal["1.0"]
    id: StrictStr = Field(min_length=1)
    source: StrictStr = Field(min_length=1)
    type: Literal["io.gpumeter.gpu.usage.v1"]
    subject: StrictStr | None = None
    time: AwareDatetime
    datacontenttype: StrictStr | None = "application/json"
    data: UsageData

    @property
    def identity(self) -> tuple[str, str]:
        """CloudEvents identity: source + id."""
        return (self.source, self.id)
