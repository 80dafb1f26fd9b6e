"""The catalog file (docs/contracts.md §3): rate cards, projects, subsidy approvals."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RateCard(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gpu_model: str = Field(min_length=1)
    hkd_per_gpu_hour: Decimal = Field(ge=0, decimal_places=2)
    effective_from: dt.date


class Subsidy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scheme: str = Field(min_length=1)
    rate: Decimal = Field(gt=0, le=1)
    cap_hkd: Decimal = Field(ge=0, decimal_places=2)
    valid_from: dt.date
    valid_to: dt.date

    @model_validator(mode="after")
    def _window_is_ordered(self) -> Subsidy:
        if self.valid_to < self.valid_from:
            raise ValueError("valid_to is before valid_from")
        return self


class BillTo(BaseModel):
    """Who an invoice is addressed to (catalog version 2): printed as the bill-to block."""

    model_config = ConfigDict(extra="forbid")

    contact: str | None = Field(None, min_length=1, max_length=200)
    email: str | None = Field(None, min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+$")
    address: list[str] = Field(default_factory=list, max_length=8)
    purchase_order: str | None = Field(None, min_length=1, max_length=100)

    @model_validator(mode="after")
    def _address_lines(self) -> BillTo:
        for line in self.address:
            if not line.strip() or len(line) > 200:
                raise ValueError("address lines are 1 to 200 characters, not blank")
        return self


class Project(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    name: str = Field(min_length=1)
    subsidy: Subsidy | None = None
    bill_to: BillTo | None = None  # catalog version 2
    # Catalog version 2: what happens when the subsidy cap is used up or `budget_hkd` (the
    # project's net charges, all periods, drafts included) is reached: `notify` (alerts only) or
    # `hold` (its Slurm account may start no new GPU job until a new approval or budget).
    on_cap_exhausted: Literal["notify", "hold"] = "notify"
    budget_hkd: Decimal | None = Field(None, ge=0, decimal_places=2)


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # 1: the original file (docs/contracts.md §3); 2 adds projects' `bill_to`.
    version: Literal[1, 2] = 1
    currency: Literal["HKD"]
    rate_cards: list[RateCard] = Field(default_factory=list)
    projects: list[Project] = Field(default_factory=list)

    @model_validator(mode="after")
    def _additions_need_their_version(self) -> Catalog:
        with_bill_to = [
            p.id
            for p in self.projects
            if p.bill_to is not None or p.on_cap_exhausted != "notify" or p.budget_hkd is not None
        ]
        if with_bill_to and self.version < 2:
            raise ValueError(
                f"bill_to, on_cap_exhausted and budget_hkd (projects {', '.join(with_bill_to[:5])})"
                " need `version: 2` in the catalog"
            )
        return self

    @model_validator(mode="after")
    def _keys_are_unique(self) -> Catalog:
        seen_cards = set()
        for card in self.rate_cards:
            key = (card.gpu_model, card.effective_from)
            if key in seen_cards:
                raise ValueError(
                    f"rate card {card.gpu_model} from {card.effective_from} appears twice"
                )
            seen_cards.add(key)
        project_ids = [p.id for p in self.projects]
        duplicates = sorted({p for p in project_ids if project_ids.count(p) > 1})
        if duplicates:
            raise ValueError(f"project ids appear twice: {', '.join(duplicates)}")
        return self
