"""Invoice documents as PDF, written by hand: PDF 1.4, the standard Helvetica fonts (no embedding),
uncompressed content streams and a byte-exact cross-reference table. No dependency.

Every amount is printed exactly as the JSON invoice carries it (docs/contracts.md §4-5); nothing
here does arithmetic on money, so the PDF can never disagree with the API.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from schemas.catalog import Project
from schemas.invoice import Invoice
from services.billing.domain import FLAG_SUBSIDY_CAPPED, FLAG_UNKNOWN_PROJECT

PAGE_WIDTH, PAGE_HEIGHT = 595, 842  # A4 in points
MARGIN_LEFT, MARGIN_RIGHT = 50, 545
TOP, BOTTOM = 792, 70
ROW_HEIGHT = 15

REGULAR, BOLD = "F1", "F2"

# Advance widths of Helvetica (Adobe's AFM, 1/1000 em) for printable ASCII; the bold face differs
# little for the digits, spaces and points that alignment depends on.
_WIDTHS_32_126 = (
    [278, 278, 355, 556, 556, 889, 667, 191, 333, 333, 389, 584, 278, 333, 278, 278]
    + [556] * 10
    + [278, 278, 584, 584, 584, 556, 1015]
    + [667, 667, 722, 722, 667, 611, 778, 722, 278, 500, 667, 556, 833]
    + [722, 778, 667, 778, 722, 667, 611, 722, 667, 944, 667, 667, 611]
    + [278, 278, 278, 469, 556, 333]
    + [556, 556, 500, 556, 556, 278, 556, 556, 222, 222, 500, 222, 833]
    + [556, 556, 556, 556, 333, 500, 278, 556, 500, 722, 500, 500, 500]
    + [334, 260, 334, 584]
)
HELVETICA_WIDTHS = {chr(32 + index): width for index, width in enumerate(_WIDTHS_32_126)}


def text_width(text: str, size: float) -> float:
    return sum(HELVETICA_WIDTHS.get(char, 556) for char in text) * size / 1000


def pdf_string(text: str) -> bytes:
    """A PDF literal string in WinAnsiEncoding: `\\`, `(` and `)` escaped; characters the standard
    fonts cannot show become `?`."""
    encoded = text.encode("cp1252", errors="replace")
    escaped = bytearray(b"(")
    for byte in encoded:
        if byte in b"\\()":
            escaped += b"\\" + bytes([byte])
        elif byte < 32 or byte == 127:
            escaped += b"?"
        else:
            escaped.append(byte)
    escaped += b")"
    return bytes(escaped)


def fit(text: str, size: float, width: float) -> str:
    """`text` cut (with an ellipsis) so that it fits `width` points."""
    if text_width(text, size) <= width:
        return text
    while text and text_width(text + "...", size) > width:
        text = text[:-1]
    return text + "..."


def wrap(text: str, size: float, width: float) -> list[str]:
    """`text` broken at spaces into lines that fit `width` points (a long word is cut)."""
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if current and text_width(candidate, size) > width:
            lines.append(current)
            candidate = word
        current = candidate
    lines.append(current)
    return [fit(line, size, width) for line in lines]


@dataclass
class Page:
    ops: list[bytes] = field(default_factory=list)

    def text(self, x: float, y: float, text: str, size: float = 10, font: str = REGULAR) -> None:
        self.ops.append(
            b"BT /%s %s Tf %s %s Td %s Tj ET"
            % (font.encode(), number(size), number(x), number(y), pdf_string(text))
        )

    def text_right(
        self, right: float, y: float, text: str, size: float = 10, font: str = REGULAR
    ) -> None:
        self.text(right - text_width(text, size), y, text, size, font)

    def rule(self, y: float, x0: float = MARGIN_LEFT, x1: float = MARGIN_RIGHT) -> None:
        self.ops.append(b"0.5 w %s %s m %s %s l S" % (number(x0), number(y), number(x1), number(y)))

    def shade(self, x: float, y: float, width: float, height: float) -> None:
        self.ops.append(
            b"q 0.93 g %s %s %s %s re f Q" % (number(x), number(y), number(width), number(height))
        )

    def content(self) -> bytes:
        return b"\n".join(self.ops) + b"\n"


def number(value: float) -> bytes:
    """A PDF number without exponent or needless digits."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return (text if text not in ("", "-0") else "0").encode()


# Columns of the line table: (heading, x of its left edge or right edge, alignment)
COLUMNS = (
    ("GPU model", 50, "left"),
    ("GPU-hours", 250, "right"),
    ("Rate HKD/GPU-h", 335, "right"),
    ("Subsidised", 352, "left"),
    ("For period", 410, "left"),
    ("Amount HKD", 545, "right"),
)


def percent(rate: Decimal) -> str:
    value = (rate * 100).normalize()
    return f"{value:f}%"


def period_span(period: str) -> str:
    year, month = (int(part) for part in period.split("-"))
    first = dt.date(year, month, 1)
    following = dt.date(year + month // 12, month % 12 + 1, 1)
    last = following - dt.timedelta(days=1)
    return f"{first:%d %b %Y} to {last:%d %b %Y} (Hong Kong time)"


class Layout:
    """Pages filled from the top; `need(height)` starts a new page when the current one is full."""

    def __init__(self, invoice: Invoice) -> None:
        self.invoice = invoice
        self.pages: list[Page] = []
        self.y = 0.0
        self.new_page()

    @property
    def page(self) -> Page:
        return self.pages[-1]

    def new_page(self) -> None:
        self.pages.append(Page())
        self.y = TOP
        if len(self.pages) > 1:
            self.page.text(MARGIN_LEFT, self.y, f"Invoice {self.invoice.invoice_id} (continued)", 9)
            self.y -= 2 * ROW_HEIGHT

    def need(self, height: float) -> None:
        if self.y - height < BOTTOM:
            self.new_page()

    def down(self, height: float = ROW_HEIGHT) -> None:
        self.y -= height


def table_heading(layout: Layout) -> None:
    page = layout.page
    page.shade(MARGIN_LEFT - 4, layout.y - 4, MARGIN_RIGHT - MARGIN_LEFT + 8, ROW_HEIGHT)
    for heading, x, align in COLUMNS:
        if align == "right":
            page.text_right(x, layout.y, heading, 9, BOLD)
        else:
            page.text(x, layout.y, heading, 9, BOLD)
    layout.down(ROW_HEIGHT + 3)


def invoice_pdf(
    invoice: Invoice | Mapping[str, Any],
    project: Project | None = None,
    *,
    issuer: str = "gpumeter",
    generated_at: dt.datetime | None = None,
) -> bytes:
    """The invoice as a PDF a billing team can send as it is: header, one row per line, list price,
    subsidy (scheme, rate, cap remaining) and the amount payable.

    `project` (from the catalog) adds the project's name and its subsidy approval; without it the
    PDF shows what the invoice itself says. The output depends only on the arguments.
    """
    if not isinstance(invoice, Invoice):
        invoice = Invoice.model_validate(invoice)
    layout = Layout(invoice)
    page = layout.page

    page.text(MARGIN_LEFT, layout.y, "INVOICE", 22, BOLD)
    page.text_right(MARGIN_RIGHT, layout.y + 4, fit(issuer, 12, 300), 12, BOLD)
    layout.down(14)
    page.text_right(MARGIN_RIGHT, layout.y, "GPU compute usage", 9)
    if invoice.status == "draft":
        page.text(MARGIN_LEFT, layout.y - 2, "DRAFT - amounts may still change", 10, BOLD)
    layout.down(26)

    label_x, value_x = MARGIN_LEFT, MARGIN_LEFT + 95
    project_text = invoice.project_id
    facts = [
        ("Invoice", invoice.invoice_id),
        ("Project", project_text),
    ]
    if project is not None:
        facts.append(("Project name", project.name))
    facts += [
        ("Period", f"{invoice.period}, {period_span(invoice.period)}"),
        ("Status", invoice.status),
        ("Currency", invoice.currency),
    ]
    if generated_at is not None:
        facts.append(("Issued", generated_at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")))
    for label, value in facts:
        page.text(label_x, layout.y, label, 10, BOLD)
        page.text(value_x, layout.y, fit(value, 10, MARGIN_RIGHT - value_x), 10)
        layout.down()
    layout.down(10)

    table_heading(layout)
    if not invoice.lines:
        layout.page.text(MARGIN_LEFT, layout.y, "No usage in this period.", 10)
        layout.down()
    for line in invoice.lines:
        if layout.y - ROW_HEIGHT < BOTTOM:
            layout.new_page()
            table_heading(layout)
        page = layout.page
        page.text(MARGIN_LEFT, layout.y, fit(line.gpu_model, 10, 135), 10)
        page.text_right(250, layout.y, line.gpu_hours, 10)
        page.text_right(
            335, layout.y, line.rate_hkd if line.rate_hkd is not None else "no rate", 10
        )
        page.text(352, layout.y, "yes" if line.subsidised else "no", 10)
        page.text(
            410,
            layout.y,
            f"{line.adjustment_for_period} (late)" if line.adjustment_for_period else "-",
            10,
        )
        page.text_right(
            545, layout.y, line.amount_hkd if line.amount_hkd is not None else "not priced", 10
        )
        layout.down()
    layout.page.rule(layout.y + ROW_HEIGHT - 4)
    layout.down(6)

    subsidy = project.subsidy if project is not None else None
    subsidy_label = "Subsidy"
    if subsidy is not None:
        subsidy_label = f"Subsidy ({subsidy.scheme}, {percent(subsidy.rate)} of subsidised usage)"
    totals = [
        ("List price (gross)", invoice.gross_hkd, REGULAR),
        (subsidy_label, f"- {invoice.subsidy_hkd}", REGULAR),
        ("Amount payable (HKD)", invoice.net_hkd, BOLD),
    ]
    layout.need(len(totals) * (ROW_HEIGHT + 4) + 8 * ROW_HEIGHT)
    page = layout.page
    for label, amount, font in totals:
        if font == BOLD:
            page.shade(300, layout.y - 5, MARGIN_RIGHT - 296, ROW_HEIGHT + 4)
        page.text_right(430, layout.y, fit(label, 10, 380), 10, font)
        page.text_right(MARGIN_RIGHT, layout.y, amount, 11 if font == BOLD else 10, font)
        layout.down(ROW_HEIGHT + 4)
    layout.down(12)

    page.text(MARGIN_LEFT, layout.y, "Subsidy", 11, BOLD)
    layout.down()
    notes = subsidy_notes(invoice, project)
    for note in notes:
        for text in wrap(note, 10, MARGIN_RIGHT - MARGIN_LEFT):
            if layout.y - ROW_HEIGHT < BOTTOM:
                layout.new_page()
            layout.page.text(MARGIN_LEFT, layout.y, text, 10)
            layout.down()

    for number_, page in enumerate(layout.pages, start=1):
        page.text(
            MARGIN_LEFT,
            40,
            "Amounts in HKD, rounded half up to the cent per line (CONTRACTS section 4).",
            8,
        )
        page.text_right(
            MARGIN_RIGHT, 40, f"{invoice.invoice_id}  page {number_} of {len(layout.pages)}", 8
        )
    return assemble(layout.pages, title=f"Invoice {invoice.invoice_id}", author=issuer)


def subsidy_notes(invoice: Invoice, project: Project | None) -> list[str]:
    notes = []
    subsidy = project.subsidy if project is not None else None
    if subsidy is not None:
        notes.append(
            f"Scheme: {subsidy.scheme}, rate {subsidy.rate}"
            f" ({percent(subsidy.rate)} of the list price of subsidised usage)."
        )
        notes.append(
            f"Approved subsidy: {subsidy.cap_hkd} HKD, valid {subsidy.valid_from}"
            f" to {subsidy.valid_to} (Hong Kong dates)."
        )
    elif FLAG_UNKNOWN_PROJECT in invoice.flags:
        notes.append("Project not in the catalog: invoiced at list price without subsidy.")
    elif project is not None:
        notes.append("No subsidy approved for this project.")
    notes.append(f"Subsidy on this invoice: {invoice.subsidy_hkd} HKD.")
    if invoice.subsidy_cap_remaining_hkd is not None:
        notes.append(f"Cap remaining after this invoice: {invoice.subsidy_cap_remaining_hkd} HKD.")
    if FLAG_SUBSIDY_CAPPED in invoice.flags:
        notes.append("The subsidy is limited by the remaining approved amount (cap reached).")
    if any(line.amount_hkd is None for line in invoice.lines):
        notes.append("Some usage has no rate card yet; it is listed but not priced.")
    return notes


def assemble(pages: list[Page], *, title: str, author: str) -> bytes:
    """Objects, then the xref table with each object's byte offset, then the trailer."""
    # 1 catalog, 2 page tree, 3 Helvetica, 4 Helvetica-Bold, 5 info, then (page, content) pairs
    first_page = 6
    page_ids = [first_page + 2 * index for index in range(len(pages))]
    objects: list[bytes] = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [%s] /Count %d >>"
        % (b" ".join(b"%d 0 R" % page_id for page_id in page_ids), len(pages)),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica-Bold /Encoding /WinAnsiEncoding >>",
        b"<< /Title %s /Author %s /Producer (gpumeter) >>"
        % (pdf_string(title), pdf_string(author)),
    ]
    for page_id, page in zip(page_ids, pages, strict=True):
        content = page.content()
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d]"
            b" /Resources << /Font << /%s 3 0 R /%s 4 0 R >> >> /Contents %d 0 R >>"
            % (PAGE_WIDTH, PAGE_HEIGHT, REGULAR.encode(), BOLD.encode(), page_id + 1)
        )
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content))

    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for object_id, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (object_id, body)
    xref_at = len(out)
    out += b"xref\n0 %d\n" % (len(objects) + 1)
    out += b"0000000000 65535 f \n"
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info 5 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref_at,
    )
    return bytes(out)
