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


class Project(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    name: str = Field(min_length=1)
    subsidy: Subsidy | None = None


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid")

    currency: Literal["HKD"]
    rate_cards: list[RateCard] = Field(default_factory=list)
    projects: list[Project] = Field(default_factory=list)

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
