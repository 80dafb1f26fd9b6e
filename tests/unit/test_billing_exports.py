"""FOCUS export rows, subsidy ratios and period completeness, over plain values."""

from __future__ import annotations

import csv
import datetime as dt
import io
from decimal import Decimal

from schemas.catalog import Project, Subsidy
from schemas.invoice import CreditNote, CreditNoteLine, Invoice, InvoiceLine
from services.billing import domain
from services.billing.export import FOCUS_COLUMNS, focus_csv, focus_rows, invoices_csv

UTC = dt.UTC
PROJECTS = {
    "hkgai-llm": Project(
        id="hkgai-llm",
        name="LLM",
        subsidy=Subsidy(
            scheme="AISS",
            rate=Decimal("0.70"),
            cap_hkd=Decimal("1000.00"),
            valid_from=dt.date(2026, 1, 1),
            valid_to=dt.date(2026, 12, 31),
        ),
    )
}
INVOICE = Invoice(
    invoice_id="INV-2026-12-hkgai-llm",
    project_id="hkgai-llm",
    period="2026-12",
    status="draft",
    lines=[
        InvoiceLine(
            gpu_model="H800",
            gpu_hours="1.500000",
            rate_hkd="26.00",
            subsidised=True,
            amount_hkd="39.00",
        ),
        InvoiceLine(
            gpu_model="B200", gpu_hours="2.000000", rate_hkd=None, subsidised=True, amount_hkd=None
        ),
        InvoiceLine(
            gpu_model="H800",
            gpu_hours="0.333333",
            rate_hkd="26.00",
            subsidised=True,
            amount_hkd="8.67",
            adjustment_for_period="2026-11",
        ),
    ],
    gross_hkd="47.67",
    subsidy_hkd="33.37",
    net_hkd="14.30",
    subsidy_cap_remaining_hkd="966.63",
    flags=["unpriced_usage"],
)


def test_focus_rows_carry_usage_adjustments_and_the_subsidy_as_a_credit_summing_to_net() -> None:
    rows = focus_rows(INVOICE, PROJECTS, "HK GPU Centre")

    assert [row["ChargeCategory"] for row in rows] == ["Usage", "Usage", "Adjustment", "Credit"]
    assert sum(Decimal(row["BilledCost"]) for row in rows) == Decimal(INVOICE.net_hkd)
    usage = rows[0]
    assert usage["BillingPeriodStart"] == "2026-11-30T16:00:00Z"  # 2026-12-01 00:00 HKT
    assert usage["BillingPeriodEnd"] == "2026-12-31T16:00:00Z"
    assert (usage["ListUnitPrice"], usage["PricingQuantity"], usage["PricingUnit"]) == (
        "26.00",
        "1.500000",
        "GPU-Hours",
    )
    assert usage["SubAccountId"] == "hkgai-llm" and usage["SubAccountName"] == "LLM"
    assert rows[1]["x_Unpriced"] == "true" and rows[1]["BilledCost"] == "0.00"
    adjustment = rows[2]
    assert adjustment["ChargeClass"] == "Correction"
    assert adjustment["ChargePeriodStart"] == "2026-10-31T16:00:00Z"
    assert adjustment["x_AdjustmentForPeriod"] == "2026-11"
    credit = rows[3]
    assert (credit["BilledCost"], credit["ListCost"], credit["x_SubsidyScheme"]) == (
        "-33.37",
        "0.00",
        "AISS",
    )


def test_focus_csv_has_the_focus_header_and_no_credit_row_without_subsidy() -> None:
    unsubsidised = INVOICE.model_copy(
        update={"project_id": "walk-in", "subsidy_hkd": "0.00", "net_hkd": "47.67"}
    )
    text = focus_csv([unsubsidised], PROJECTS, "gpumeter")
    rows = list(csv.DictReader(io.StringIO(text)))

    assert text.splitlines()[0].split(",") == FOCUS_COLUMNS
    assert "Credit" not in {row["ChargeCategory"] for row in rows}
    assert rows[0]["BillingAccountName"] == "walk-in"
    assert sum(Decimal(row["BilledCost"]) for row in rows) == Decimal("47.67")


def test_subsidy_ratio_never_reaches_one_before_the_cap_and_is_zero_for_a_zero_cap() -> None:
    assert domain.subsidy_used_ratio(Decimal("999.99"), Decimal("1000.00")) == Decimal("0.999990")
    assert domain.subsidy_used_ratio(Decimal("99999999.99"), Decimal("100000000.00")) == Decimal(
        "0.999999"
    )
    assert domain.subsidy_used_ratio(Decimal("1000.00"), Decimal("1000.00")) == 1
    assert domain.subsidy_used_ratio(Decimal("0.00"), Decimal("0.00")) == 0


def test_a_period_is_incomplete_before_unknown_and_complete_only_when_every_hour_is() -> None:
    hour = dt.datetime(2026, 11, 1, 16, tzinfo=UTC)
    complete = domain.HourStatus(hour, True)
    unknown = domain.HourStatus(hour + dt.timedelta(hours=1), None)
    incomplete = domain.HourStatus(hour + dt.timedelta(hours=2), False, 3, 2, ("node-07",))

    assert domain.PeriodCompleteness("2026-11", (complete,)).status == "complete"
    assert domain.PeriodCompleteness("2026-11", (complete, unknown)).status == "unknown"
    mixed = domain.PeriodCompleteness("2026-11", (complete, unknown, incomplete))
    assert mixed.status == "incomplete"
    assert (mixed.complete_count, mixed.incomplete, mixed.unknown) == (1, [incomplete], [unknown])
    assert domain.PeriodCompleteness("2026-11", ()).status == "complete"


NOTE = CreditNote(
    credit_note_id="CN-INV-2026-11-hkgai-llm-1",
    credit_note_number="AISC-CN-2026-000007",
    invoice_id="INV-2026-11-hkgai-llm",
    invoice_number="AISC-2026-000031",
    project_id="hkgai-llm",
    period="2026-11",
    issued_on=dt.date(2026, 12, 5),
    reason="=rate card corrected",  # a formula-looking reason is neutralised in CSV
    lines=[
        CreditNoteLine(
            line_no=2,
            gpu_model="H800",
            gpu_hours="10.000000",
            rate_hkd="26.00",
            subsidised=True,
            amount_hkd="260.00",
        )
    ],
    gross_hkd="260.00",
    subsidy_hkd="182.00",
    net_hkd="78.00",
    created_by="token:1",
)


def test_a_credit_note_follows_its_invoice_in_csv_as_negative_amounts() -> None:
    invoice = INVOICE.model_copy(
        update={"invoice_id": NOTE.invoice_id, "period": "2026-11", "status": "finalized"}
    )
    rows = list(csv.DictReader(io.StringIO(invoices_csv([invoice], [NOTE]))))
    credit = [row for row in rows if row["status"] == "credit_note"]
    assert [(r["record"], r["amount_hkd"], r["credited_line"]) for r in credit] == [
        ("credit_line", "-260.00", "2"),
        ("credit_gross", "-260.00", ""),
        ("credit_subsidy", "-182.00", ""),
        ("credit_net", "-78.00", ""),
    ]
    assert {r["document_number"] for r in credit} == {"AISC-CN-2026-000007"}
    assert rows.index(credit[0]) > max(
        i for i, r in enumerate(rows) if r["status"] != "credit_note"
    )


def test_focus_corrections_of_a_credit_note_sum_to_minus_its_net() -> None:
    rows = list(
        csv.DictReader(io.StringIO(focus_csv([], PROJECTS, "Cyberport AISC", credit_notes=[NOTE])))
    )
    assert {row["ChargeClass"] for row in rows} == {"Correction"}
    assert [row["ChargeCategory"] for row in rows] == ["Usage", "Credit"]
    assert sum(Decimal(row["BilledCost"]) for row in rows) == -Decimal(NOTE.net_hkd)
    assert rows[0]["ChargePeriodStart"] == "2026-10-31T16:00:00Z"  # November in Hong Kong
    assert rows[0]["BillingPeriodStart"] == "2026-11-30T16:00:00Z"  # issued in December
    assert rows[0]["ConsumedQuantity"] == "-10.000000"
    assert "AISC-2026-000031" in rows[0]["ChargeDescription"]
    assert rows[0]["ChargeDescription"].endswith("=rate card corrected")
