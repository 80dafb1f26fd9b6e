"""Billing facts the alerts service watches, on billing.signals.v1 (latest value per key wins)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Literal

from pydantic import AwareDatetime, BaseModel


class SubsidyUsage(BaseModel):
    """How much of a project's approved subsidy is used, drafts included. Key: f"subsidy|{project_id}"."""

    kind: Literal["subsidy_usage"] = "subsidy_usage"
    project_id: str
    scheme: str
    cap_hkd: Decimal
    used_hkd: Decimal
    used_ratio: Decimal  # used / cap, 0 when the cap is 0
    as_of: AwareDatetime
    # The forecast at the trailing 7-day burn (services/billing/domain.py, subsidy_forecast):
    # absent from signals written before it existed.
    burn_hkd_per_day: Decimal | None = None
    exhausted_on: dt.date | None = None  # None: the cap does not run out before the approval ends
    approval_ends_on: dt.date | None = None
    days_left: int | None = None  # from as_of's Hong Kong date to exhausted_on


class UnpricedUsage(BaseModel):
    """Usage of a GPU model with no rate card in an open period. Key: f"unpriced|{gpu_model}|{period}".
    gpu_hours 0 means the model has been priced since (the alert resolves)."""

    kind: Literal["unpriced_usage"] = "unpriced_usage"
    gpu_model: str
    period: str
    gpu_hours: Decimal
    projects: list[str]
    as_of: AwareDatetime


class SlurmHold(BaseModel):
    """Whether gpumeter holds a project's Slurm account (services/billing/enforcement.py).
    Key: f"slurm_hold|{project_id}"; held False once released."""

    kind: Literal["slurm_hold"] = "slurm_hold"
    project_id: str
    held: bool
    dry_run: bool
    reason: str
    as_of: AwareDatetime
