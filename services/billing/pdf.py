"""Invoices and credit notes as PDF documents, laid out with fpdf2.

Text is set in a CJK TrueType font found on the machine (Debian's fonts-wqy-microhei, installed by
scripts/ensure-system-packages.sh; `PDF_FONT_PATH` names another), embedded as a subset, so project
names and addresses in Chinese print as they are. Without such a font the documents fall back to
the standard Helvetica font and characters it lacks print as "?" (one warning in the log).

Every amount is printed as the JSON document carries it, only grouped by thousands: nothing here
does arithmetic on money, so a PDF can never disagree with the API. The output depends only on the
arguments (and the font file).
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Protocol

from fontTools.ttLib import TTCollection, TTFont, TTLibError
from fpdf import FPDF, FontFace, TextMode, XPos, YPos
from fpdf.enums import TableBordersLayout, TableCellFillMode, TextEmphasis
from fpdf.fonts import SubsetMap, TTFFont

from schemas.catalog import Project
from schemas.invoice import CreditNote, Invoice
from services.billing.domain import FLAG_SUBSIDY_CAPPED, FLAG_UNKNOWN_PROJECT

log = logging.getLogger(__name__)

FONT_PATH_ENV = "PDF_FONT_PATH"
# Searched in this order after $PDF_FONT_PATH. All cover Traditional Chinese (all of Big5);
# in a collection the Hong Kong face is taken where there is one (see `_pick_face`).
FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",  # fonts-wqy-microhei (1.6 MB package)
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",  # fonts-noto-cjk
    "/usr/share/fonts/truetype/arphic/uming.ttc",  # fonts-arphic-uming
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",  # fonts-wqy-zenhei
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",  # fonts-droid-fallback
)
# A font is taken only if it has these (Hong Kong, as in a project name).
FONT_PROBE = "香港中心"
FACE_PREFERENCE = ("HK", "TC", "TW")

FAMILY = "doc"
FALLBACK_FAMILY = "helvetica"
CORE_ENCODING = "windows-1252"

PAGE_MARGIN = 15.0  # mm
LINE_H = 4.6  # mm per line of 9 pt text
LINE_WIDTH = 0.12  # mm: rules, and the outline of bold text
INK = (20, 20, 20)
GREY = (95, 95, 95)
SHADE = (232, 236, 240)
DRAFT_RED = (170, 20, 20)
HKT_NAME = "Asia/Hong_Kong"
FIXED_DATE = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)  # creation date of drafts


@dataclass(frozen=True)
class Issuer:
    """The centre as the issuer of a document: printed at the top of every invoice."""

    name: str
    address: tuple[str, ...] = ()
    business_registration: str | None = None
    email: str | None = None

    @classmethod
    def from_settings(cls, settings: _IssuerSettings) -> Issuer:
        return cls(
            name=settings.issuer_name,
            address=tuple(settings.issuer_address_lines),
            business_registration=settings.issuer_business_registration or None,
            email=settings.issuer_email or None,
        )


class _IssuerSettings(Protocol):
    @property
    def issuer_name(self) -> str: ...
    @property
    def issuer_address_lines(self) -> Sequence[str]: ...
    @property
    def issuer_business_registration(self) -> str | None: ...
    @property
    def issuer_email(self) -> str | None: ...


# --- the font ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DocumentFont:
    path: str
    face: int
    name: str
    codepoints: frozenset[int]


def _pick_face(path: str) -> tuple[int, str, frozenset[int]] | None:
    """(face index, face name, code points) of the face of `path` to use, or None when it cannot
    be read or lacks Chinese."""
    try:
        if path.lower().endswith((".ttc", ".otc")):
            faces = list(TTCollection(path, lazy=True).fonts)
        else:
            faces = [TTFont(path, lazy=True)]
        named = [
            (index, str(face["name"].getDebugName(4) or "")) for index, face in enumerate(faces)
        ]
        ranked = sorted(
            named,
            key=lambda item: next(
                (rank for rank, tag in enumerate(FACE_PREFERENCE) if item[1].endswith(tag)),
                len(FACE_PREFERENCE),
            ),
        )
        for index, name in ranked:
            if "mono" in name.lower() and len(ranked) > 1:
                continue
            cmap = faces[index].getBestCmap() or {}
            if all(ord(char) in cmap for char in FONT_PROBE):
                return index, name, frozenset(cmap)
    except (OSError, TTLibError, KeyError, AssertionError) as exc:
        log.warning("PDF font %s cannot be read: %r", path, exc)
    return None


@functools.cache
def document_font() -> DocumentFont | None:
    """The CJK font documents are set in, found once per process; None (with one warning) when
    there is none."""
    override = os.environ.get(FONT_PATH_ENV, "").strip()
    candidates = ([override] if override else []) + list(FONT_CANDIDATES)
    for path in candidates:
        if not Path(path).is_file():
            if path == override:
                log.warning("%s=%s: no such file; searching the usual places", FONT_PATH_ENV, path)
            continue
        picked = _pick_face(path)
        if picked is not None:
            index, name, codepoints = picked
            return DocumentFont(path, index, name, codepoints)
    log.warning(
        "no font with Chinese characters found (set %s or install fonts-wqy-microhei): PDF"
        " documents use Helvetica and print Chinese as '?'",
        FONT_PATH_ENV,
    )
    return None


@functools.cache
def _font_template(path: str, face: int) -> TTFFont:
    document = FPDF()
    document.add_font(FAMILY, "", path, collection_font_number=face)
    font = document.fonts[FAMILY]
    assert isinstance(font, TTFFont)
    return font


# --- formatting -------------------------------------------------------------------------------


def grouped(value: str | Decimal, places: int | None = None) -> str:
    """`value` with thousands separators: `places` decimals, or as many as it has."""
    try:
        number = Decimal(value)
    except InvalidOperation:
        return str(value)
    if places is not None:
        return f"{number:,.{places}f}"
    return f"{number:,f}"


def money(value: str | Decimal) -> str:
    return grouped(value, 2)


def long_date(day: dt.date) -> str:
    return f"{day.day} {day:%B %Y}"


def period_name(period: str) -> str:
    year, month = (int(part) for part in period.split("-"))
    return f"{dt.date(year, month, 1):%B %Y}"


def percent(rate: Decimal) -> str:
    return f"{(rate * 100).normalize():f}%"


# --- the document -----------------------------------------------------------------------------


class _Document(FPDF):
    """An A4 page set up for one document: fonts, margins, running header and "Page n of m"."""

    def __init__(self, *, title: str, reference: str, issuer: Issuer, created: dt.datetime):
        super().__init__(orientation="portrait", unit="mm", format="A4")
        self.reference = reference
        self.issuer_name = issuer.name
        self.font = document_font()
        self.core_fonts_encoding = CORE_ENCODING
        if self.font is not None:
            self._add_document_font(self.font)
            self.family = FAMILY
        else:
            self.family = FALLBACK_FAMILY
        self.set_margins(PAGE_MARGIN, PAGE_MARGIN, PAGE_MARGIN)
        self.set_auto_page_break(True, margin=20)
        self.set_line_width(LINE_WIDTH)
        self.set_draw_color(*INK)
        self.set_text_color(*INK)
        self.set_creation_date(created)
        self.set_title(title)
        self.set_author(issuer.name)
        self.set_creator("gpumeter")
        self.set_lang("en-HK")
        self.set_font(self.family, "", 9)

    def _add_document_font(self, font: DocumentFont) -> None:
        """The font, parsed once per process: reading the ~50,000 glyph metrics of a CJK face
        takes most of a short document's time. Each document gets its own copy with its own
        subset and its own fontTools font (fpdf2 subsets that one in place when writing)."""
        try:
            template = _font_template(font.path, font.face)
            copied = copy.copy(template)
            copied.i = len(self.fonts) + 1
            copied.subset = SubsetMap(copied)
            copied.missing_glyphs = []
            copied.biggest_size_pt = 0
            copied.ttfont = TTFont(
                font.path, fontNumber=font.face, lazy=True, recalcTimestamp=False
            )
            self.fonts[FAMILY] = copied
        except (AttributeError, TypeError) as exc:  # fpdf2's internals changed: load it anew
            log.warning("cannot reuse the parsed PDF font (%r): loading it for each document", exc)
            self.fonts.pop(FAMILY, None)
            self.add_font(FAMILY, "", font.path, collection_font_number=font.face)

    def set_font(self, family: str | None = None, style: Any = "", size: float = 0) -> None:
        if self.font is None or (family or self.font_family) != FAMILY:
            super().set_font(family, style, size)
            return
        # The CJK fonts have no bold face: bold is the regular face with its outlines stroked
        # as well as filled, so the advance widths (and the wrapping) stay the face's own, and
        # only one font is loaded and embedded.
        letters = (style.style if isinstance(style, TextEmphasis) else str(style)).upper()
        super().set_font(family, letters.replace("B", ""), size)
        self.text_mode = TextMode.FILL_STROKE if "B" in letters else TextMode.FILL

    def t(self, text: str) -> str:
        """`text` with what the font cannot show replaced by "?"."""
        text = " ".join(text.split()) if "\n" not in text else text
        if self.font is not None:
            known = self.font.codepoints
            return "".join(c if ord(c) in known or c == "\n" else "?" for c in text)
        return text.encode(CORE_ENCODING, errors="replace").decode(CORE_ENCODING)

    def lines(self, x: float, width: float, rows: Iterable[tuple[str, str, float]]) -> None:
        """Left-aligned lines of (text, style, size) in a column, wrapped to `width`."""
        for text, style, size in rows:
            self.set_font(self.family, style, size)
            self.set_x(x)
            self.multi_cell(
                width, size * 0.5, self.t(text), new_x=XPos.LEFT, new_y=YPos.NEXT, align="L"
            )
        self.set_font(self.family, "", 9)

    def pairs(
        self, x: float, label_width: float, value_width: float, rows: Iterable[tuple[str, str]]
    ) -> None:
        """Label: value rows, labels in grey, values wrapped in their own column."""
        for label, value in rows:
            top = self.get_y()
            self.set_xy(x, top)
            self.set_text_color(*GREY)
            self.set_font(self.family, "", 9)
            self.multi_cell(label_width, LINE_H, self.t(label), new_y=YPos.NEXT)
            below_label = self.get_y()
            self.set_xy(x + label_width, top)
            self.set_text_color(*INK)
            self.set_font(self.family, "B", 9)
            self.multi_cell(value_width, LINE_H, self.t(value), align="R", new_y=YPos.NEXT)
            self.set_y(max(below_label, self.get_y()))
        self.set_font(self.family, "", 9)

    def header(self) -> None:
        if self.page_no() > 1:
            self.set_font(self.family, "", 8)
            self.set_text_color(*GREY)
            self.cell(0, 5, self.t(f"{self.issuer_name} · {self.reference} (continued)"), align="L")
            self.set_text_color(*INK)
            self.ln(8)

    def footer(self) -> None:
        self.set_y(-13)
        self.set_font(self.family, "", 8)
        self.set_text_color(*GREY)
        width = self.w - self.l_margin - self.r_margin
        self.cell(width * 0.7, 5, self.t(f"{self.issuer_name} · {self.reference}"), align="L")
        self.cell(width * 0.3, 5, f"Page {self.page_no()} of {{nb}}", align="R")
        self.set_text_color(*INK)

    @property
    def width(self) -> float:
        return self.w - self.l_margin - self.r_margin


def _top(
    doc: _Document,
    issuer: Issuer,
    title: str,
    details: list[tuple[str, str]],
    project_id: str,
    project: Project | None,
) -> None:
    """Issuer and title, then the bill-to block beside the document's details."""
    doc.add_page()
    top = doc.get_y()
    issuer_rows = [(issuer.name, "B", 12.0)]
    issuer_rows += [(line, "", 9.0) for line in issuer.address]
    if issuer.business_registration:
        issuer_rows.append((f"BR No. {issuer.business_registration}", "", 9.0))
    if issuer.email:
        issuer_rows.append((issuer.email, "", 9.0))
    doc.lines(doc.l_margin, doc.width * 0.55, issuer_rows)
    below_issuer = doc.get_y()

    doc.set_xy(doc.l_margin + doc.width * 0.55, top)
    doc.set_font(doc.family, "B", 20)
    doc.set_line_width(0.35)  # the outline that makes (emulated) bold: heavier at this size
    doc.multi_cell(doc.width * 0.45, 9, doc.t(title), align="R", new_y=YPos.NEXT)
    doc.set_line_width(LINE_WIDTH)
    doc.set_font(doc.family, "", 9)
    doc.set_y(max(below_issuer, doc.get_y()) + 4)
    doc.line(doc.l_margin, doc.get_y(), doc.l_margin + doc.width, doc.get_y())
    doc.ln(5)

    top = doc.get_y()
    left_width = doc.width * 0.48
    doc.set_text_color(*GREY)
    doc.lines(doc.l_margin, left_width, [("BILL TO", "B", 8.0)])
    doc.set_text_color(*INK)
    name = project.name if project is not None else project_id
    bill = [(name, "B", 10.5)]
    bill_to = project.bill_to if project is not None else None
    if bill_to is not None:
        if bill_to.contact:
            bill.append((f"Attn: {bill_to.contact}", "", 9.0))
        bill += [(line, "", 9.0) for line in bill_to.address]
        if bill_to.email:
            bill.append((bill_to.email, "", 9.0))
    bill.append((f"Project ID: {project_id}", "", 9.0))
    if bill_to is not None and bill_to.purchase_order:
        bill.append((f"PO: {bill_to.purchase_order}", "B", 9.0))
    doc.lines(doc.l_margin, left_width, bill)
    below_bill = doc.get_y()

    doc.set_y(top)
    right_x = doc.l_margin + doc.width * 0.5
    right_width = doc.width * 0.5
    doc.pairs(right_x, 32, right_width - 32, details)
    doc.set_y(max(below_bill, doc.get_y()) + 6)


def _data_table(
    doc: _Document,
    headings: Sequence[str],
    col_widths: Sequence[float],
    text_align: Sequence[str],
    rows: Iterable[Sequence[str]],
) -> None:
    """A table with a shaded heading row that fpdf2 repeats on each new page."""
    with doc.table(
        col_widths=tuple(col_widths),
        width=doc.width,
        text_align=tuple(text_align),
        borders_layout=TableBordersLayout.HORIZONTAL_LINES,
        # Bold is set on the heading row itself: fpdf2 checks a headings style's emphasis
        # against the fonts added, and bold here is not a font of its own (see set_font).
        headings_style=FontFace(fill_color=SHADE),
        line_height=LINE_H,
        padding=(1.2, 1.5),
        repeat_headings=1,
        v_align="TOP",
    ) as table:
        table.row([doc.t(heading) for heading in headings], style=FontFace(emphasis="BOLD"))
        for row in rows:
            table.row([doc.t(cell) for cell in row])


def _line_table(doc: _Document, rows: list[tuple[str, str, str, str, str]]) -> None:
    """One row per line; fpdf2 repeats the headings on each new page."""
    doc.set_font(doc.family, "", 9)
    _data_table(
        doc,
        ("GPU model", "GPU-hours", "Rate (HKD/GPU-hour)", "Subsidised", "Amount (HKD)"),
        (64, 30, 32, 22, 32),
        ("LEFT", "RIGHT", "RIGHT", "CENTER", "RIGHT"),
        rows,
    )
    doc.ln(4)


def _line_cells(
    gpu_model: str,
    gpu_hours: str,
    rate_hkd: str | None,
    subsidised: bool,
    amount_hkd: str | None,
    adjustment_for_period: str | None,
    prefix: str = "",
) -> tuple[str, str, str, str, str]:
    description = prefix + gpu_model
    if adjustment_for_period:
        description += f"\nadjustment for {adjustment_for_period}"
    return (
        description,
        grouped(gpu_hours),
        money(rate_hkd) if rate_hkd is not None else "no rate",
        "yes" if subsidised else "no",
        money(amount_hkd) if amount_hkd is not None else "not charged",
    )


def _totals(doc: _Document, rows: list[tuple[str, str, str, bool]]) -> None:
    """Right-hand totals: (label, note under it, amount, emphasised)."""
    width = doc.width * 0.68
    doc.set_font(doc.family, "", 9)
    with doc.table(
        col_widths=(width - 34, 34),
        width=width,
        align="RIGHT",
        first_row_as_headings=False,
        text_align=("LEFT", "RIGHT"),
        borders_layout=TableBordersLayout.HORIZONTAL_LINES,
        cell_fill_mode=TableCellFillMode.NONE,
        line_height=LINE_H,
        padding=(1.4, 1.5),
        v_align="TOP",
    ) as table:
        for label, note, amount, strong in rows:
            style = FontFace(emphasis="BOLD", fill_color=SHADE) if strong else None
            row = table.row(style=style)
            text = doc.t(label) + (f"\n{doc.t(note)}" if note else "")
            row.cell(text)
            row.cell(doc.t(amount))
    doc.ln(5)


def _notes(doc: _Document, notes: list[str]) -> None:
    if not notes:
        return
    doc.set_font(doc.family, "", 8.5)
    for note in notes:
        doc.set_x(doc.l_margin)
        doc.multi_cell(doc.width, 4.2, doc.t(note), align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        doc.ln(1)


def _midnight(day: dt.date | None) -> dt.datetime:
    if day is None:
        return FIXED_DATE
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone(dt.timedelta(hours=8)))


def _output(doc: _Document) -> bytes:
    return bytes(doc.output())


@dataclass(frozen=True)
class JobLine:
    """One job of the invoice's annex (services.billing.domain.JobUsage, as printed)."""

    job_id: str
    gpu_models: str
    gpu_hours: str
    mean_util_pct: str
    idle_gpu_hours: str
    energy_kwh: str
    list_cost_hkd: str


def _job_annex(doc: _Document, jobs: Sequence[JobLine], period: str) -> None:
    """The jobs that used the period's GPU-hours, on pages of their own after the invoice."""
    doc.add_page()
    doc.set_font(doc.family, "B", 12)
    doc.cell(doc.width, 8, doc.t(f"Annex: jobs in {period}"), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    doc.set_font(doc.family, "", 8.5)
    doc.multi_cell(
        doc.width,
        LINE_H,
        doc.t(
            "GPU-hours each job used in the billing period, with its mean utilization, the"
            " GPU-hours allocated at under 5% utilization, measured GPU energy, and the hours at"
            " list price (before any subsidy). For information: the invoice's lines are what is"
            " charged, including any adjustments for earlier periods."
        ),
        new_x=XPos.LMARGIN,
        new_y=YPos.NEXT,
    )
    doc.ln(2)
    _data_table(
        doc,
        (
            "Job",
            "GPU models",
            "GPU-hours",
            "Mean util.",
            "Idle GPU-hours",
            "Energy kWh",
            "List price HKD",
        ),
        (36, 26, 24, 18, 24, 20, 26),
        ("LEFT", "LEFT", "RIGHT", "RIGHT", "RIGHT", "RIGHT", "RIGHT"),
        (
            (
                job.job_id,
                job.gpu_models,
                grouped(job.gpu_hours),
                job.mean_util_pct,
                grouped(job.idle_gpu_hours),
                grouped(job.energy_kwh),
                money(job.list_cost_hkd),
            )
            for job in jobs
        ),
    )


def invoice_pdf(
    invoice: Invoice | Mapping[str, Any],
    project: Project | None = None,
    *,
    issuer: Issuer,
    jobs: Sequence[JobLine] = (),
) -> bytes:
    """The invoice as a PDF to send to the project as it is: issuer, bill-to, one row per line,
    the list price, what the subsidy scheme pays (with its approved and remaining amounts) and
    the amount payable by the project. A draft says it is not a demand for payment.

    `project` (from the catalog) adds the project's name, its bill-to address and its subsidy
    approval; without it the PDF shows what the invoice itself says. `jobs` (the period's per-job
    usage) adds an annex listing them.
    """
    if not isinstance(invoice, Invoice):
        invoice = Invoice.model_validate(invoice)
    draft = invoice.status == "draft"
    period = f"{period_name(invoice.period)} ({HKT_NAME})"
    reference = (
        f"Invoice {invoice.invoice_number}"
        if invoice.invoice_number and not draft
        else f"Draft invoice {period_name(invoice.period)}"
    )
    doc = _Document(
        title=reference, reference=reference, issuer=issuer, created=_midnight(invoice.issued_on)
    )

    details: list[tuple[str, str]] = []
    if draft:
        details.append(("Status", "Draft"))
    else:
        details.append(("Invoice number", invoice.invoice_number or "not assigned"))
        if invoice.issued_on is not None:
            details.append(("Issue date", long_date(invoice.issued_on)))
        if invoice.due_on is not None:
            details.append(("Due date", long_date(invoice.due_on)))
    details += [("Billing period", period), ("Currency", invoice.currency)]
    _top(doc, issuer, "DRAFT INVOICE" if draft else "INVOICE", details, invoice.project_id, project)

    if draft:
        doc.set_font(doc.family, "B", 11)
        doc.set_text_color(*DRAFT_RED)
        doc.set_draw_color(*DRAFT_RED)
        doc.multi_cell(
            doc.width,
            6,
            doc.t(
                "DRAFT INVOICE — not a demand for payment. The figures may change until the"
                " invoice is finalized and numbered."
            ),
            border=1,
            padding=2,
            new_x=XPos.LMARGIN,
            new_y=YPos.NEXT,
        )
        doc.set_text_color(*INK)
        doc.set_draw_color(*INK)
        doc.set_font(doc.family, "", 9)
        doc.ln(5)

    rows = [
        _line_cells(
            line.gpu_model,
            line.gpu_hours,
            line.rate_hkd,
            line.subsidised,
            line.amount_hkd,
            line.adjustment_for_period,
        )
        for line in invoice.lines
    ]
    if rows:
        _line_table(doc, rows)
    else:
        doc.multi_cell(doc.width, LINE_H, "No GPU usage in this period.", new_y=YPos.NEXT)
        doc.ln(4)

    payer = project.name if project is not None else invoice.project_id
    subsidy = project.subsidy if project is not None else None
    totals = [("List price (gross)", "", money(invoice.gross_hkd), False)]
    if subsidy is not None or Decimal(invoice.subsidy_hkd) != 0:
        scheme = f"{subsidy.scheme} subsidy scheme" if subsidy is not None else "subsidy scheme"
        facts = []
        if subsidy is not None:
            facts.append(f"{percent(subsidy.rate)} of the list price of subsidised usage")
            facts.append(f"Approved amount: HKD {money(subsidy.cap_hkd)}")
        if invoice.subsidy_cap_remaining_hkd is not None:
            facts.append(
                f"Remaining after this invoice: HKD {money(invoice.subsidy_cap_remaining_hkd)}"
            )
        totals.append((f"Payable by {scheme}", "\n".join(facts), money(invoice.subsidy_hkd), False))
    totals.append((f"Amount payable by {payer} (HKD)", "", money(invoice.net_hkd), True))
    _totals(doc, totals)

    notes = []
    if not draft and invoice.due_on is not None and Decimal(invoice.net_hkd) > 0:
        number = (
            f", quoting invoice number {invoice.invoice_number}" if invoice.invoice_number else ""
        )
        notes.append(
            f"Please pay HKD {money(invoice.net_hkd)} by {long_date(invoice.due_on)}{number}."
        )
    if FLAG_SUBSIDY_CAPPED in invoice.flags:
        notes.append(
            "The subsidy is limited by the remaining approved amount: the approved amount is"
            " used up by this invoice."
        )
    if FLAG_UNKNOWN_PROJECT in invoice.flags:
        notes.append("This project has no subsidy on record: usage is invoiced at list price.")
    elif project is not None and subsidy is None:
        notes.append("No subsidy is approved for this project.")
    if any(line.amount_hkd is None for line in invoice.lines):
        notes.append(
            "GPU models without a rate yet are listed with their hours but are not charged on"
            " this invoice."
        )
    notes.append(
        "Amounts are in Hong Kong dollars; each line is rounded half up to the cent. Hours are"
        f" GPU-hours used in the billing period, {HKT_NAME} time."
    )
    if jobs:
        notes.append(f"The jobs that used these GPU-hours are listed in the annex ({len(jobs)}).")
    _notes(doc, notes)
    if jobs:
        _job_annex(doc, jobs, period_name(invoice.period))
    return _output(doc)


def credit_note_pdf(
    note: CreditNote | Mapping[str, Any],
    project: Project | None = None,
    *,
    issuer: Issuer,
) -> bytes:
    """The credit note as a PDF: which invoice it credits and why, the credited lines, the list
    price credited, the subsidy returned to the scheme's approved amount and the net credited to
    the project."""
    if not isinstance(note, CreditNote):
        note = CreditNote.model_validate(note)
    period = f"{period_name(note.period)} ({HKT_NAME})"
    reference = f"Credit note {note.credit_note_number}"
    doc = _Document(
        title=reference, reference=reference, issuer=issuer, created=_midnight(note.issued_on)
    )
    details = [
        ("Credit note number", note.credit_note_number),
        ("Issue date", long_date(note.issued_on)),
    ]
    if note.invoice_number:
        details.append(("Credits invoice", note.invoice_number))
    details += [("Billing period", period), ("Currency", note.currency)]
    _top(doc, issuer, "CREDIT NOTE", details, note.project_id, project)

    credited = (
        f"Credits invoice {note.invoice_number} (period {period})."
        if note.invoice_number
        else f"Credits the invoice for the period {period}."
    )
    doc.lines(
        doc.l_margin,
        doc.width,
        [(credited, "B", 9.5), (f"Reason: {note.reason}", "", 9.5)],
    )
    doc.ln(4)

    rows = [
        _line_cells(
            line.gpu_model,
            line.gpu_hours,
            line.rate_hkd,
            line.subsidised,
            line.amount_hkd,
            line.adjustment_for_period,
            prefix=f"Invoice line {line.line_no}: ",
        )
        for line in note.lines
    ]
    if rows:
        _line_table(doc, rows)

    payer = project.name if project is not None else note.project_id
    subsidy = project.subsidy if project is not None else None
    totals = [("List price credited", "", money(note.gross_hkd), False)]
    if subsidy is not None or Decimal(note.subsidy_hkd) != 0:
        scheme = f"{subsidy.scheme} subsidy scheme" if subsidy is not None else "subsidy scheme"
        totals.append(
            (
                f"Subsidy returned to the {scheme}",
                "added back to the project's remaining approved amount",
                money(note.subsidy_hkd),
                False,
            )
        )
    totals.append((f"Net credited to {payer} (HKD)", "", money(note.net_hkd), True))
    _totals(doc, totals)
    _notes(
        doc,
        [
            "This credit note reduces the amount of the invoice it credits by the net amount"
            " credited. Amounts are in Hong Kong dollars."
        ],
    )
    return _output(doc)
