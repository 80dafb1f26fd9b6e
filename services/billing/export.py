"""Invoice documents as CSV rows: one row per line, then gross, subsidy and net rows."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable

from schemas.invoice import Invoice

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
]


def invoice_rows(invoice: Invoice) -> list[list[str]]:
    head = [invoice.invoice_id, invoice.project_id, invoice.period, invoice.status]
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
        ]
        for line in invoice.lines
    ]
    for record, amount in (
        ("gross", invoice.gross_hkd),
        ("subsidy", invoice.subsidy_hkd),
        ("net", invoice.net_hkd),
    ):
        rows.append([*head, record, "", "", "", "", amount, ""])
    return rows


def invoices_csv(invoices: Iterable[Invoice]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for invoice in invoices:
        writer.writerows(invoice_rows(invoice))
    return buffer.getvalue()
