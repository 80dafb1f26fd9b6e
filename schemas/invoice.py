"""Invoice documents (docs/contracts.md §5), as served by the API and published on
billing.invoices.v1."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class InvoiceLine(BaseModel):
    gpu_model: str
    gpu_hours: str  # exact sum(interval_s)/3600, shown to 6 decimals
    rate_hkd: str | None  # None: no rate card for this model (unpriced)
    subsidised: bool
    amount_hkd: str | None
    adjustment_for_period: str | None = None


class Invoice(BaseModel):
    invoice_id: str
    project_id: str
    period: str
    currency: Literal["HKD"] = "HKD"
    status: Literal["draft", "finalized"]
    lines: list[InvoiceLine]
    gross_hkd: str
    subsidy_hkd: str
    net_hkd: str
    subsidy_cap_remaining_hkd: str | None
    flags: list[str] = []
