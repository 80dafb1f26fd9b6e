"""Invoice documents as CSV: our own layout (one row per line, then gross, subsidy and net rows)
and the FinOps FOCUS cost and usage columns."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal

from schemas.catalog import Project
from schemas.invoice import CreditNote, Invoice
from services.billing.domain import JobUsage, money, period_bounds

# OWASP "CSV Injection": a cell a spreadsheet may read as a formula starts with one of these (the
# full-width forms too, which some spreadsheets fold to ASCII). Such a cell gets a leading `'`.
FORMULA_STARTS = frozenset("=+-@\t\r\uff1d\uff0b\uff0d\uff20")
# A plain decimal number such as a credit `-12.50` is a value, not a formula: it stays as it is.
PLAIN_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?")
# What of an invoice id or a period may reach a file name or a Content-Disposition header.
UNSAFE_FILE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")
MAX_FILE_NAME_CHARS = 200
# RFC 4180's CRLF: the csv module quotes a cell holding any character of the line end, so with `\n`
# alone a bare CR in a name went out unquoted and a reader split the row there.
CSV_LINE_END = "\r\n"


def csv_cell(text: str) -> str:
    """`text` as a CSV cell that no spreadsheet evaluates: OWASP's leading `'` on a cell that could
    start a formula, unless it is a plain number."""
    if text and text[0] in FORMULA_STARTS and not PLAIN_NUMBER.fullmatch(text):
        return "'" + text
    return text


def safe_file_name(stem: str) -> str:
    """`stem` (an invoice id, `focus-<period>`) as a file name for a header or a file system: only
    ASCII letters, digits, `.`, `_` and `-`, so no quote, CR/LF or path separator; never `.`-led."""
    name = UNSAFE_FILE_NAME_CHARS.sub("_", stem)[:MAX_FILE_NAME_CHARS]
    return "_" + name[1:] if name.startswith(".") or not name else name


CSV_COLUMNS = [
    "invoice_id",
    "project_id",
    "period",
    "status",
    "record",
    "gpu_model",
    "gpu_hours",
    "rate_hkd",
    "subsidised",
    "amount_hkd",
    "adjustment_for_period",
    "document_number",  # the invoice's number (finalized), or the credit note's
    "credited_line",  # on a credit note's rows: the invoice line it credits
    "job_id",  # on the job annex's rows (record `job`): the job
]


def invoice_rows(invoice: Invoice) -> list[list[str]]:
    head = [invoice.invoice_id, invoice.project_id, invoice.period, invoice.status]
    number = invoice.invoice_number or ""
    rows = [
        [
            *head,
            "line",
            line.gpu_model,
            line.gpu_hours,
            line.rate_hkd or "",
            "true" if line.subsidised else "false",
            line.amount_hkd or "",
            line.adjustment_for_period or "",
            number,
            "",
            "",
        ]
        for line in invoice.lines
    ]
    for record, amount in (
        ("gross", invoice.gross_hkd),
        ("subsidy", invoice.subsidy_hkd),
        ("net", invoice.net_hkd),
    ):
        rows.append([*head, record, "", "", "", "", amount, "", number, "", ""])
    return rows


def job_rows(invoice: Invoice, jobs: Iterable[JobUsage]) -> list[list[str]]:
    """The invoice's job annex: one row per job of its period (record `job`), its GPU models,
    GPU-hours and list price (for information: the lines above are what is charged)."""
    head = [invoice.invoice_id, invoice.project_id, invoice.period, invoice.status]
    return [
        [
            *head,
            "job",
            " ".join(job.gpu_models),
            job.usage.gpu_hours,
            "",
            "",
            money(job.usage.list_cost_hkd),
            "",
            invoice.invoice_number or "",
            "",
            job.job_id,
        ]
        for job in jobs
    ]


def negated(amount: str | None) -> str:
    """A credited amount as it reduces what was charged: `-12.50` (`0.00` stays `0.00`)."""
    if not amount:
        return ""
    value = -Decimal(amount)
    return str(value if value else Decimal(amount))


def credit_note_rows(note: CreditNote) -> list[list[str]]:
    """A credit note's rows, beneath its invoice: each credited line and the totals, as negative
    amounts (what they take off the invoice), status `credit_note`."""
    head = [note.invoice_id, note.project_id, note.period, "credit_note"]
    number = note.credit_note_number
    rows = [
        [
            *head,
            "credit_line",
            line.gpu_model,
            line.gpu_hours,
            line.rate_hkd or "",
            "true" if line.subsidised else "false",
            negated(line.amount_hkd),
            line.adjustment_for_period or "",
            number,
            str(line.line_no),
            "",
        ]
        for line in note.lines
    ]
    for record, amount in (
        ("credit_gross", note.gross_hkd),
        ("credit_subsidy", note.subsidy_hkd),
        ("credit_net", note.net_hkd),
    ):
        rows.append([*head, record, "", "", "", "", negated(amount), "", number, "", ""])
    return rows


def invoices_csv(
    invoices: Iterable[Invoice],
    credit_notes: Iterable[CreditNote] = (),
    jobs: Mapping[str, Iterable[JobUsage]] | None = None,
) -> str:
    """Invoices, each followed by its job annex (`jobs` by invoice id, when given) and the credit
    notes against it."""
    by_invoice: dict[str, list[CreditNote]] = {}
    for note in credit_notes:
        by_invoice.setdefault(note.invoice_id, []).append(note)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=CSV_LINE_END)
    writer.writerow(CSV_COLUMNS)
    for invoice in invoices:
        writer.writerows([csv_cell(cell) for cell in row] for row in invoice_rows(invoice))
        annex = (jobs or {}).get(invoice.invoice_id, ())
        writer.writerows([csv_cell(cell) for cell in row] for row in job_rows(invoice, annex))
        for note in by_invoice.get(invoice.invoice_id, []):
            writer.writerows([csv_cell(cell) for cell in row] for row in credit_note_rows(note))
    return buffer.getvalue()


# --- FinOps FOCUS cost export ---------------------------------------------------------------------

FOCUS_COLUMNS = [
    "BillingAccountId",
    "BillingAccountName",
    "SubAccountId",
    "SubAccountName",
    "InvoiceId",
    "InvoiceIssuerName",
    "ProviderName",
    "PublisherName",
    "BillingCurrency",
    "BillingPeriodStart",
    "BillingPeriodEnd",
    "ChargePeriodStart",
    "ChargePeriodEnd",
    "ChargeCategory",
    "ChargeClass",
    "ChargeFrequency",
    "ChargeDescription",
    "ServiceCategory",
    "ServiceName",
    "ResourceType",
    "SkuId",
    "ListUnitPrice",
    "ContractedUnitPrice",
    "PricingQuantity",
    "PricingUnit",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ListCost",
    "ContractedCost",
    "BilledCost",
    "EffectiveCost",
    "x_InvoiceStatus",
    "x_GpuModel",
    "x_Subsidised",
    "x_SubsidyScheme",
    "x_AdjustmentForPeriod",
    "x_Unpriced",
    "x_Flags",
]
FOCUS_UNIT = "GPU-Hours"
ZERO = "0.00"


def focus_time(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# The columns of a FOCUS row that describe no resource or SKU: a subsidy (Credit) row's.
NO_RESOURCE = {
    "ResourceType": "",
    "SkuId": "",
    "ListUnitPrice": "",
    "ContractedUnitPrice": "",
    "PricingQuantity": "",
    "PricingUnit": "",
    "ConsumedQuantity": "",
    "ConsumedUnit": "",
    "x_GpuModel": "",
    "x_Subsidised": "",
    "x_AdjustmentForPeriod": "",
    "x_Unpriced": "false",
}


def focus_common(
    project_id: str,
    project: Project | None,
    invoice_id: str,
    provider_name: str,
    currency: str,
    billing_period: str,
    status: str,
) -> dict[str, str]:
    """The columns every FOCUS row of one document shares."""
    billing_start, billing_end = period_bounds(billing_period)
    return {
        "BillingAccountId": project_id,
        "BillingAccountName": project.name if project else project_id,
        "SubAccountId": project_id,
        "SubAccountName": project.name if project else project_id,
        "InvoiceId": invoice_id,
        "InvoiceIssuerName": provider_name,
        "ProviderName": provider_name,
        "PublisherName": provider_name,
        "BillingCurrency": currency,
        "BillingPeriodStart": focus_time(billing_start),
        "BillingPeriodEnd": focus_time(billing_end),
        "ServiceCategory": "Compute",
        "ServiceName": "GPU Compute",
        "x_InvoiceStatus": status,
    }


def focus_rows(
    invoice: Invoice, projects: Mapping[str, Project], provider_name: str
) -> list[dict[str, str]]:
    """FOCUS rows of one invoice: a Usage (or Adjustment, for late usage of a finalized period) row
    per line and a Credit row for the subsidy, so that BilledCost sums to the invoice's net."""
    project = projects.get(invoice.project_id)
    scheme = project.subsidy.scheme if project and project.subsidy else ""
    billing_start, billing_end = period_bounds(invoice.period)
    common = {
        **focus_common(
            invoice.project_id,
            project,
            invoice.invoice_id,
            provider_name,
            invoice.currency,
            invoice.period,
            invoice.status,
        ),
        "x_Flags": ",".join(invoice.flags),
    }
    rows = []
    for line in invoice.lines:
        charge_start, charge_end = period_bounds(line.adjustment_for_period or invoice.period)
        cost = line.amount_hkd or ZERO
        rate_text = f"{line.rate_hkd} {invoice.currency}/GPU-hour" if line.rate_hkd else "no rate"
        subsidy_text = f", subsidised ({scheme})" if line.subsidised else ""
        correction = (
            f" (late usage of {line.adjustment_for_period})" if line.adjustment_for_period else ""
        )
        rows.append(
            {
                **common,
                "ChargePeriodStart": focus_time(charge_start),
                "ChargePeriodEnd": focus_time(charge_end),
                "ChargeCategory": "Adjustment" if line.adjustment_for_period else "Usage",
                "ChargeClass": "Correction" if line.adjustment_for_period else "",
                "ChargeFrequency": "Usage-Based",
                "ChargeDescription": (
                    f"{line.gpu_model} GPU-hours at {rate_text}{subsidy_text}{correction}"
                ),
                "ResourceType": "GPU",
                "SkuId": line.gpu_model,
                "ListUnitPrice": line.rate_hkd or "",
                "ContractedUnitPrice": line.rate_hkd or "",
                "PricingQuantity": line.gpu_hours,
                "PricingUnit": FOCUS_UNIT,
                "ConsumedQuantity": line.gpu_hours,
                "ConsumedUnit": FOCUS_UNIT,
                "ListCost": cost,
                "ContractedCost": cost,
                "BilledCost": cost,
                "EffectiveCost": cost,
                "x_GpuModel": line.gpu_model,
                "x_Subsidised": "true" if line.subsidised else "false",
                "x_SubsidyScheme": scheme if line.subsidised else "",
                "x_AdjustmentForPeriod": line.adjustment_for_period or "",
                "x_Unpriced": "false" if line.rate_hkd else "true",
            }
        )
    subsidy = Decimal(invoice.subsidy_hkd)
    if subsidy:
        credit = str(-subsidy)
        rows.append(
            {
                **common,
                "ChargePeriodStart": focus_time(billing_start),
                "ChargePeriodEnd": focus_time(billing_end),
                "ChargeCategory": "Credit",
                "ChargeClass": "",
                "ChargeFrequency": "Recurring",
                "ChargeDescription": (
                    f"{scheme or 'Subsidy'} subsidy of subsidised GPU usage;"
                    f" cap remaining {invoice.subsidy_cap_remaining_hkd} {invoice.currency}"
                ),
                **NO_RESOURCE,
                "ListCost": ZERO,
                "ContractedCost": credit,
                "BilledCost": credit,
                "EffectiveCost": credit,
                "x_SubsidyScheme": scheme,
            }
        )
    return rows


def focus_credit_note_rows(
    note: CreditNote, projects: Mapping[str, Project], provider_name: str
) -> list[dict[str, str]]:
    """FOCUS rows of a credit note: ChargeClass `Correction` rows that reverse the credited lines
    (negative costs, the charge period of the invoice credited) and the subsidy credited (a
    positive Credit correction), so that BilledCost sums to minus the note's net."""
    project = projects.get(note.project_id)
    scheme = project.subsidy.scheme if project and project.subsidy else ""
    issued_period = f"{note.issued_on.year:04d}-{note.issued_on.month:02d}"
    credited_start, credited_end = period_bounds(note.period)
    common = {
        **focus_common(
            note.project_id,
            project,
            note.credit_note_id,
            provider_name,
            note.currency,
            issued_period,
            "credit_note",
        ),
        "ChargeClass": "Correction",
        "x_Flags": "",
    }
    rows = []
    for line in note.lines:
        charge_start, charge_end = period_bounds(line.adjustment_for_period or note.period)
        cost = negated(line.amount_hkd) or ZERO
        quantity = negated(line.gpu_hours)
        rows.append(
            {
                **common,
                "ChargePeriodStart": focus_time(charge_start),
                "ChargePeriodEnd": focus_time(charge_end),
                "ChargeCategory": "Adjustment" if line.adjustment_for_period else "Usage",
                "ChargeFrequency": "Usage-Based",
                "ChargeDescription": (
                    f"Credit note {note.credit_note_number} for invoice"
                    f" {note.invoice_number or note.invoice_id}, line {line.line_no}"
                    f" ({line.gpu_model}): {note.reason}"
                ),
                "ResourceType": "GPU",
                "SkuId": line.gpu_model,
                "ListUnitPrice": line.rate_hkd or "",
                "ContractedUnitPrice": line.rate_hkd or "",
                "PricingQuantity": quantity,
                "PricingUnit": FOCUS_UNIT,
                "ConsumedQuantity": quantity,
                "ConsumedUnit": FOCUS_UNIT,
                "ListCost": cost,
                "ContractedCost": cost,
                "BilledCost": cost,
                "EffectiveCost": cost,
                "x_GpuModel": line.gpu_model,
                "x_Subsidised": "true" if line.subsidised else "false",
                "x_SubsidyScheme": scheme if line.subsidised else "",
                "x_AdjustmentForPeriod": line.adjustment_for_period or "",
                "x_Unpriced": "false" if line.rate_hkd else "true",
            }
        )
    if Decimal(note.subsidy_hkd):
        rows.append(
            {
                **common,
                "ChargePeriodStart": focus_time(credited_start),
                "ChargePeriodEnd": focus_time(credited_end),
                "ChargeCategory": "Credit",
                "ChargeFrequency": "Recurring",
                "ChargeDescription": (
                    f"{scheme or 'Subsidy'} subsidy returned to the cap by credit note"
                    f" {note.credit_note_number}"
                ),
                **NO_RESOURCE,
                "ListCost": ZERO,
                "ContractedCost": note.subsidy_hkd,
                "BilledCost": note.subsidy_hkd,
                "EffectiveCost": note.subsidy_hkd,
                "x_SubsidyScheme": scheme,
            }
        )
    return rows


def focus_csv(
    invoices: Iterable[Invoice],
    projects: Mapping[str, Project],
    provider_name: str,
    credit_notes: Iterable[CreditNote] = (),
) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, FOCUS_COLUMNS, lineterminator=CSV_LINE_END)
    writer.writeheader()
    for invoice in invoices:
        writer.writerows(
            {column: csv_cell(value) for column, value in row.items()}
            for row in focus_rows(invoice, projects, provider_name)
        )
    for note in credit_notes:
        writer.writerows(
            {column: csv_cell(value) for column, value in row.items()}
            for row in focus_credit_note_rows(note, projects, provider_name)
        )
    return buffer.getvalue()


# --- efficiency per project ------------------------------------------------------------------------

EFFICIENCY_COLUMNS = [
    "project_id",
    "gpu_hours",
    "idle_gpu_hours",
    "idle_share_pct",
    "mean_util_pct",
    "energy_kwh",
    "list_cost_hkd",
    "idle_list_cost_hkd",
    "unpriced_models",
]


def records_csv(columns: Sequence[str], records: Iterable[Mapping[str, object]]) -> str:
    """One row per record, in `columns` order (lists joined by spaces, None empty), every cell
    safe from spreadsheet formulas."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=CSV_LINE_END)
    writer.writerow(columns)
    for record in records:
        row = []
        for column in columns:
            value = record.get(column)
            if isinstance(value, list):
                value = " ".join(str(item) for item in value)
            row.append(csv_cell("" if value is None else str(value)))
        writer.writerow(row)
    return buffer.getvalue()


def efficiency_csv_text(projects: Iterable[Mapping[str, object]]) -> str:
    """One row per project of the efficiency report (GET /v1/efficiency)."""
    return records_csv(EFFICIENCY_COLUMNS, projects)


RECONCILIATION_COLUMNS = [
    "job_id",
    "project_id",
    "kind",
    "metered_gpu_hours",
    "slurm_gpu_hours",
    "detail",
]


def reconciliation_csv_text(differences: Iterable[Mapping[str, object]]) -> str:
    """The jobs where gpumeter and Slurm's accounting differ (GET /v1/reconciliation)."""
    return records_csv(RECONCILIATION_COLUMNS, differences)
