"""Invoice documents (docs/contracts.md §5), as served by the API and published on
billing.invoices.v1."""

from __future__ import annotations

import datetime as dt
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
    # Assigned at finalization (docs/contracts.md §5, invoice numbers): gapless per calendar year
    # of the issue date, e.g. AISC-2026-000123; null on drafts. The invoice_id never changes.
    invoice_number: str | None = None
    issued_on: dt.date | None = None  # Asia/Hong_Kong date of finalization
    due_on: dt.date | None = None  # issued_on + the payment terms


class CreditNoteLine(BaseModel):
    """One credited line: the invoice line it credits (`line_no`, 1-based) and what it credits,
    as positive figures (the credit note's total is subtracted from what the invoice charged)."""

    line_no: int
    gpu_model: str
    gpu_hours: str
    rate_hkd: str | None
    subsidised: bool
    amount_hkd: str | None
    adjustment_for_period: str | None = None


class CreditNote(BaseModel):
    """A credit against a finalized invoice, in whole or by lines (docs/contracts.md §5)."""

    credit_note_id: str
    credit_note_number: str  # gapless per calendar year, e.g. AISC-CN-2026-000004
    invoice_id: str
    invoice_number: str | None
    project_id: str
    period: str
    currency: Literal["HKD"] = "HKD"
    issued_on: dt.date
    reason: str
    lines: list[CreditNoteLine]
    gross_hkd: str  # list price credited
    subsidy_hkd: str  # subsidy credited: returned to the project's cap
    net_hkd: str  # what the project is credited
    created_by: str
