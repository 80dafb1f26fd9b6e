"""PDF invoices and credit notes (fpdf2): the text read back with pypdf says what a Hong Kong
finance office needs, Chinese included, and every page renders with poppler's pdftoppm.

The font (fonts-wqy-microhei) and pdftoppm (poppler-utils) come from
scripts/ensure-system-packages.sh, which `make test` runs: without them these tests fail.
"""

from __future__ import annotations

import io
import logging
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pypdf import PdfReader

from schemas.catalog import Project
from schemas.invoice import CreditNote, Invoice
from services.billing import pdf as pdf_module
from services.billing.pdf import Issuer, credit_note_pdf, document_font, invoice_pdf
from services.billing.settings import BillingSettings

PROJECT_NAME = "香港生成式人工智能研發中心"
ISSUER = Issuer(
    name="Cyberport AI Supercomputing Centre",
    address=("100 Cyberport Road", "Pok Fu Lam, Hong Kong"),
    business_registration="12345678-000-11-26-4",
    email="billing@aisc.example.hk",
)
LINE = {
    "gpu_model": "H800",
    "gpu_hours": "1234567.891234",
    "rate_hkd": "26.00",
    "subsidised": True,
    "amount_hkd": "32098765.43",
    "adjustment_for_period": None,
}
INVOICE = {
    "invoice_id": "INV-2026-11-hkgai-llm",
    "project_id": "hkgai-llm",
    "period": "2026-11",
    "currency": "HKD",
    "status": "finalized",
    "lines": [
        LINE,
        {
            **LINE,
            "gpu_hours": "10.000000",
            "amount_hkd": "260.00",
            "adjustment_for_period": "2026-10",
        },
        {
            "gpu_model": "A100",
            "gpu_hours": "3.500000",
            "rate_hkd": None,
            "subsidised": False,
            "amount_hkd": None,
            "adjustment_for_period": None,
        },
    ],
    "gross_hkd": "32099025.43",
    "subsidy_hkd": "1234567.89",
    "net_hkd": "30864457.54",
    "subsidy_cap_remaining_hkd": "0.00",
    "flags": ["subsidy_capped", "unpriced_usage"],
    "invoice_number": "AISC-2026-000123",
    "issued_on": "2026-12-01",
    "due_on": "2026-12-31",
}
PROJECT = Project.model_validate(
    {
        "id": "hkgai-llm",
        "name": PROJECT_NAME,
        "subsidy": {
            "scheme": "AISS",
            "rate": "0.70",
            "cap_hkd": "30000000.00",
            "valid_from": "2026-01-01",
            "valid_to": "2026-12-31",
        },
        "bill_to": {
            "contact": "陳大文 (Finance Office)",
            "email": "ap@hkgai.example.hk",
            "address": ["香港九龍深水埗大南街 123 號 5 樓", "Sham Shui Po, Kowloon, Hong Kong"],
            "purchase_order": "PO-2026-0457",
        },
    }
)
CREDIT_NOTE = {
    "credit_note_id": "CN-2026-11-hkgai-llm-1",
    "credit_note_number": "AISC-CN-2026-000004",
    "invoice_id": "INV-2026-11-hkgai-llm",
    "invoice_number": "AISC-2026-000123",
    "project_id": "hkgai-llm",
    "period": "2026-11",
    "currency": "HKD",
    "issued_on": "2026-12-15",
    "reason": "GPU node 17 was faulty from 3 to 5 November",
    "lines": [{**INVOICE["lines"][1], "line_no": 2}],
    "gross_hkd": "260.00",
    "subsidy_hkd": "182.00",
    "net_hkd": "78.00",
    "created_by": "alice@aisc.example.hk",
}


@pytest.fixture(autouse=True)
def cjk_font() -> None:
    assert document_font() is not None, (
        "no font with Traditional Chinese found: run scripts/ensure-system-packages.sh as root"
        " (installs fonts-wqy-microhei) or set PDF_FONT_PATH"
    )


@pytest.fixture
def pdftoppm() -> str:
    found = shutil.which("pdftoppm")
    assert found, (
        "pdftoppm is missing: run scripts/ensure-system-packages.sh as root (poppler-utils)"
    )
    return found


@pytest.fixture
def no_cjk_font(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv(pdf_module.FONT_PATH_ENV, "/nonexistent/font.ttf")
    monkeypatch.setattr(pdf_module, "FONT_CANDIDATES", ())
    pdf_module.document_font.cache_clear()
    yield
    pdf_module.document_font.cache_clear()


def pages(pdf: bytes) -> list[str]:
    return [page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages]


def text(pdf: bytes) -> str:
    return "\n".join(pages(pdf))


def flat(value: str) -> str:
    """Whitespace (line breaks of wrapped text included) as single spaces."""
    return " ".join(value.split())


def big_invoice(count: int = 200) -> dict:
    lines = [
        {**LINE, "gpu_model": f"MODEL-{index:03d}", "amount_hkd": f"{index}.00"}
        for index in range(1, count + 1)
    ]
    return {**INVOICE, "lines": lines}


def test_an_invoice_has_the_issuer_its_number_dates_and_the_bill_to_block() -> None:
    shown = text(invoice_pdf(INVOICE, PROJECT, issuer=ISSUER))

    for expected in (
        "Cyberport AI Supercomputing Centre",
        "100 Cyberport Road",
        "Pok Fu Lam, Hong Kong",
        "BR No. 12345678-000-11-26-4",
        "billing@aisc.example.hk",
        "INVOICE",
        "AISC-2026-000123",
        "Issue date",
        "1 December 2026",
        "Due date",
        "31 December 2026",
        "November 2026 (Asia/Hong_Kong)",
        "HKD",
        PROJECT_NAME,
        "陳大文 (Finance Office)",
        "香港九龍深水埗大南街 123 號 5 樓",
        "Sham Shui Po, Kowloon, Hong Kong",
        "ap@hkgai.example.hk",
        "PO: PO-2026-0457",
        "hkgai-llm",
    ):
        assert expected in shown, expected
    assert "DRAFT" not in shown
    assert "??" not in shown


def test_the_lines_and_totals_carry_thousands_separators_and_the_subsidy_is_a_payer() -> None:
    shown = flat(text(invoice_pdf(INVOICE, PROJECT, issuer=ISSUER)))

    assert "H800 1,234,567.891234 26.00 yes 32,098,765.43" in shown
    assert "adjustment for 2026-10" in shown
    assert "A100 3.500000 no rate no not charged" in shown
    assert "List price (gross) 32,099,025.43" in shown
    assert "Payable by AISS subsidy scheme" in shown
    assert "1,234,567.89" in shown
    assert "Approved amount: HKD 30,000,000.00" in shown
    assert "Remaining after this invoice: HKD 0.00" in shown
    assert f"Amount payable by {PROJECT_NAME} (HKD) 30,864,457.54" in shown
    assert "The subsidy is limited by the remaining approved amount" in shown


def test_no_internal_references_are_printed() -> None:
    shown = text(invoice_pdf(INVOICE, PROJECT, issuer=ISSUER))
    shown += text(credit_note_pdf(CREDIT_NOTE, PROJECT, issuer=ISSUER))

    assert "INV-" not in shown
    assert "CN-2026-11" not in shown
    assert "CONTRACTS" not in shown
    for flag in ("subsidy_capped", "unpriced_usage", "unknown_project"):
        assert flag not in shown


def test_without_a_catalog_entry_or_a_subsidy_the_totals_are_gross_and_payable() -> None:
    invoice = {
        **INVOICE,
        "subsidy_hkd": "0.00",
        "net_hkd": INVOICE["gross_hkd"],
        "subsidy_cap_remaining_hkd": None,
        "flags": ["unknown_project"],
    }

    shown = flat(text(invoice_pdf(invoice, None, issuer=Issuer(name="AISC"))))

    assert "List price (gross) 32,099,025.43" in shown
    assert "Amount payable by hkgai-llm (HKD) 32,099,025.43" in shown
    assert "Payable by" not in shown.replace("Amount payable by", "")
    assert "BR No." not in shown and "PO:" not in shown
    assert "Project ID: hkgai-llm" in shown

    plain = PROJECT.model_copy(update={"subsidy": None, "bill_to": None})
    shown = flat(text(invoice_pdf({**invoice, "flags": []}, plain, issuer=ISSUER)))
    assert f"{PROJECT_NAME} Project ID: hkgai-llm" in shown
    assert "No subsidy is approved for this project." in shown


def test_a_200_line_invoice_runs_over_pages_with_the_heading_on_each() -> None:
    pdf = invoice_pdf(big_invoice(), PROJECT, issuer=ISSUER)
    shown = pages(pdf)

    count = len(shown)
    assert count >= 4
    for number, page in enumerate(shown, start=1):
        assert f"Page {number} of {count}" in page
        assert "AISC-2026-000123" in page
        if number < count:
            assert "GPU model GPU-hours" in flat(page), number
    assert "Page 1 of" in shown[0]
    everything = text(pdf)
    assert all(f"MODEL-{index:03d} " in everything for index in range(1, 201))


def test_a_draft_says_it_is_not_a_demand_for_payment_and_has_no_number() -> None:
    draft = {
        **INVOICE,
        "status": "draft",
        "invoice_number": None,
        "issued_on": None,
        "due_on": None,
    }

    shown = flat(text(invoice_pdf(draft, PROJECT, issuer=ISSUER)))

    assert "DRAFT INVOICE — not a demand for payment" in shown
    assert "Invoice number" not in shown and "Due date" not in shown
    assert "Please pay" not in shown


def test_a_credit_note_names_the_invoice_it_credits_and_what_goes_back_to_whom() -> None:
    shown = flat(text(credit_note_pdf(CREDIT_NOTE, PROJECT, issuer=ISSUER)))

    for expected in (
        "CREDIT NOTE",
        "AISC-CN-2026-000004",
        "15 December 2026",
        "Credits invoice AISC-2026-000123 (period November 2026 (Asia/Hong_Kong))",
        "Reason: GPU node 17 was faulty from 3 to 5 November",
        "Invoice line 2: H800",
        "10.000000 26.00 yes 260.00",
        "List price credited 260.00",
        "Subsidy returned to the AISS subsidy scheme",
        "182.00",
        f"Net credited to {PROJECT_NAME} (HKD) 78.00",
        "PO: PO-2026-0457",
        "Cyberport AI Supercomputing Centre",
    ):
        assert expected in shown, expected


def test_the_same_arguments_give_the_same_bytes() -> None:
    first = invoice_pdf(INVOICE, PROJECT, issuer=ISSUER)

    assert invoice_pdf(Invoice.model_validate(INVOICE), PROJECT, issuer=ISSUER) == first
    note = credit_note_pdf(CREDIT_NOTE, PROJECT, issuer=ISSUER)
    assert credit_note_pdf(CreditNote.model_validate(CREDIT_NOTE), PROJECT, issuer=ISSUER) == note
    assert b"/CreationDate (D:20261201000000+08'00')" in first


def test_reusing_the_parsed_font_gives_what_loading_it_anew_gives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reused = invoice_pdf(INVOICE, PROJECT, issuer=ISSUER)

    def unusable(path: str, face: int) -> None:
        raise AttributeError("as if fpdf2 had changed")

    monkeypatch.setattr(pdf_module, "_font_template", unusable)
    assert invoice_pdf(INVOICE, PROJECT, issuer=ISSUER) == reused


def test_every_page_renders(pdftoppm: str, tmp_path: Path) -> None:
    documents = {
        "invoice": invoice_pdf(big_invoice(), PROJECT, issuer=ISSUER),
        "credit-note": credit_note_pdf(CREDIT_NOTE, PROJECT, issuer=ISSUER),
    }
    for name, pdf in documents.items():
        source = tmp_path / f"{name}.pdf"
        source.write_bytes(pdf)
        count = len(PdfReader(io.BytesIO(pdf)).pages)
        done = subprocess.run(
            [pdftoppm, "-r", "50", "-png", str(source), str(tmp_path / name)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert not re.search(r"(?i)error", done.stderr), done.stderr
        rendered = sorted(tmp_path.glob(f"{name}-*.png"))
        assert len(rendered) == count, rendered
        for png in rendered:
            data = png.read_bytes()
            assert data.startswith(b"\x89PNG"), png
            width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
            assert (width, height) == (414, 585), (png, width, height)  # A4 at 50 dpi
            assert len(data) > 3000, (png, len(data))  # more than a blank page


def test_characters_the_font_lacks_print_as_question_marks() -> None:
    project = PROJECT.model_copy(update={"name": "唔該 \U0001f600 Lab"})

    shown = text(invoice_pdf(INVOICE, project, issuer=ISSUER))

    assert "唔該 ? Lab" in shown


def test_without_a_cjk_font_it_falls_back_to_helvetica_and_warns_once(
    no_cjk_font: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="services.billing.pdf"):
        first = invoice_pdf(INVOICE, PROJECT, issuer=ISSUER)
        invoice_pdf(INVOICE, PROJECT, issuer=ISSUER)

    shown = flat(text(first))
    assert "?????????????" in shown  # the project name
    assert "Amount payable by" in shown and "30,864,457.54" in shown
    assert "DRAFT INVOICE — not a demand for payment" in flat(
        text(invoice_pdf({**INVOICE, "status": "draft"}, PROJECT, issuer=ISSUER))
    )
    warnings = [r for r in caplog.records if "no font with Chinese" in r.getMessage()]
    assert len(warnings) == 1


def test_the_issuer_comes_from_the_billing_settings() -> None:
    settings = BillingSettings(
        issuer_name="Cyberport AISC",
        issuer_address="100 Cyberport Road | Pok Fu Lam\nHong Kong",
        issuer_business_registration="12345678",
        issuer_email="billing@aisc.example.hk",
    )

    assert Issuer.from_settings(settings) == Issuer(
        name="Cyberport AISC",
        address=("100 Cyberport Road", "Pok Fu Lam", "Hong Kong"),
        business_registration="12345678",
        email="billing@aisc.example.hk",
    )
    assert Issuer.from_settings(BillingSettings()).address == ()


def test_long_names_wrap_inside_their_cells() -> None:
    project = PROJECT.model_copy(update={"name": PROJECT_NAME * 6})
    invoice = {**INVOICE, "lines": [{**LINE, "gpu_model": "H800-SXM5-80GB " * 8}]}

    pdf = invoice_pdf(invoice, project, issuer=ISSUER)

    assert flat(text(pdf)).replace(" ", "").count(PROJECT_NAME * 6) >= 1
