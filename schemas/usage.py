"""The usage sample CloudEvent of docs/contracts.md §1."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt, StrictStr

from schemas.identity import USAGE_EVENT_TYPE, usage_event_id

__all__ = ["USAGE_EVENT_TYPE", "UsageData", "UsageEvent", "usage_event_id"]

MAX_INTERVAL_S = 3600.0
MAX_FUTURE_SKEW_S = 300.0
MAX_MESSAGE_BYTES = 1024 * 1024

# Texts (source, id, subject, node, GPU uuid, project and job ids, GPU model): 1 to 256 printable
# ASCII characters (space to tilde) other than `|`, the separator of metering's keys. See
# docs/contracts.md.
MAX_TEXT_CHARS = 256
TEXT_CHARS = r"[\x20-\x7b\x7d\x7e]"
TEXT_PATTERN = (
    f"^{TEXT_CHARS}{{1,{MAX_TEXT_CHARS}}}$"  # JSON Schema and pydantic: `$` ends the text
)
TEXT_RULE = re.compile(f"{TEXT_CHARS}{{1,{MAX_TEXT_CHARS}}}")  # Python: with fullmatch only
# Physical bounds of the readings, far beyond any GPU made: a value outside them is a broken or
# hostile writer, never a measurement.
MAX_GPU_INDEX = 1023
MAX_MEM_MIB = 1 << 24  # 16 TiB
MAX_POWER_W = 10_000.0
MIN_TEMP_C, MAX_TEMP_C = -100, 200
MAX_XID_ERRORS = 1_000_000
# The earliest event time taken at all; what is older than the retention is refused by metering.
MIN_EVENT_TIME = datetime(2000, 1, 1, tzinfo=UTC)

StrictFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Text = Annotated[StrictStr, Field(min_length=1, max_length=MAX_TEXT_CHARS, pattern=TEXT_PATTERN)]


class UsageData(BaseModel):
    """One GPU's readings over one sampling interval."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    node: Text
    gpu_uuid: Text
    gpu_index: StrictInt = Field(ge=0, le=MAX_GPU_INDEX)
    gpu_model: Text
    interval_s: StrictFloat
    project_id: Text | None
    job_id: Text | None
    util_pct: StrictFloat
    mem_used_mib: StrictInt = Field(ge=0, le=MAX_MEM_MIB)
    mem_total_mib: StrictInt = Field(ge=0, le=MAX_MEM_MIB)
    power_w: StrictFloat = Field(ge=0, le=MAX_POWER_W)
    temp_c: StrictInt = Field(ge=MIN_TEMP_C, le=MAX_TEMP_C)
    xid_errors: StrictInt = Field(ge=0, le=MAX_XID_ERRORS)


class UsageEvent(BaseModel):
    """A CloudEvents 1.0 envelope (structured JSON mode) around UsageData."""

    model_config = ConfigDict(extra="allow", frozen=True)

    specversion: Literal["1.0"]
    id: Text
    source: Text
    type: Literal["io.gpumeter.gpu.usage.v1"]
    subject: Text | None = None
    time: AwareDatetime
    datacontenttype: StrictStr | None = "application/json"
    data: UsageData

    @property
    def identity(self) -> tuple[str, str]:
        """CloudEvents identity: source + id."""
        return (self.source, self.id)
