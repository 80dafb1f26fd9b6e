"""Alert state changes on alerts.v1 (docs/contracts.md §6)."""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, BaseModel


class AlertEvent(BaseModel):
    fingerprint: str
    rule: str
    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: AwareDatetime
    ends_at: AwareDatetime | None = None
    value: float | None = None
