"""PDF invoices written by hand: a valid PDF 1.4 file whose text shows the JSON invoice's figures
exactly."""

from __future__ import annotations

import re

from schemas.catalog import Project
from schemas.invoice import Invoice
from services.billing.pdf import invoice_pdf, pdf_string

INVOICE = {
    "invoice_id": "INV-2026-11-hkgai-llm",
    "project_id": "hkgai-llm",
    "period": "2026-11",
    "currency": "HKD",
    "status": "finalized",
    "lines": [
        {
            "gpu_model": "H800",
            "gpu_hours": "1234.567891",
            "rate_hkd": "26.00",
            "subsidised": True,
            "amount_hkd": "32098.77",
            "adjustment_for_period": None,
        },
        {
            "gpu_model": "H800",
            "gpu_hours": "10.000000",
            "rate_hkd": "26.00",
            "subsidised": True,
            "amount_hkd": "260.00",
            "adjustment_for_period": "2026-10",
        },
        {
            "gpu_model": "A100",
            "gpu_hours": "3.500000",
            "rate_hkd": "18.50",
            "subsidised": False,
            "amount_hkd": "64.75",
            "adjustment_for_period": None,
        },
    ],
    "gross_hkd": "32423.52",
    "subsidy_hkd": "22651.14",
    "net_hkd": "9772.38",
    "subsidy_cap_remaining_hkd": "29977348.86",
    "flags": [],
}
PROJECT = Project.model_validate(
    {
        "id": "hkgai-llm",
        "name": "Hong Kong Generative AI R&D Centre - LLM",
        "subsidy": {
            "scheme": "AISS",
            "rate": "0.70",
            "cap_hkd": "30000000.00",
            "valid_from": "2026-01-01",
            "valid_to": "2026-12-31",
        },
    }
)


def xref_offsets(pdf: bytes) -> dict[int, int]:
    """Object number -> byte offset, read from the file's cross-reference table."""
    startxref = int(re.search(rb"startxref\s+(\d+)\s+%%EOF\s*$", pdf).group(1))
    assert pdf[startxref:].startswith(b"xref")
    header = re.match(rb"xref\r?\n(\d+) (\d+)\r?\n", pdf[startxref:])
    first, count = int(header.group(1)), int(header.group(2))
    table = pdf[startxref + header.end() :]
    offsets = {}
    for index in range(count):
        entry = table[index * 20 : (index + 1) * 20]
        assert len(entry) == 20 and entry.endswith((b" \n", b"\r\n")), entry
        offset, generation, kind = entry[:10], entry[11:16], entry[17:18]
        if kind == b"n":
            assert generation == b"00000"
            offsets[first + index] = int(offset)
    assert table[count * 20 :].startswith(b"trailer")
    size = int(re.search(rb"/Size (\d+)", table[count * 20 :]).group(1))
    assert size == first + count
    return offsets


def unescape(literal: bytes) -> str:
    out = bytearray()
    index = 0
    while index < len(literal):
        byte = literal[index]
        if byte == 0x5C:  # backslash: the next byte stands for itself
            index += 1
            out.append(literal[index])
        else:
            out.append(byte)
        index += 1
    return out.decode("cp1252")


def shown_text(pdf: bytes) -> list[str]:
    """Every string the content streams show with Tj, in order."""
    texts = []
    for stream in re.findall(rb"stream\n(.*?)\nendstream", pdf, re.S):
        for literal in re.findall(rb"\(((?:\\.|[^\\()])*)\) Tj", stream, re.S):
            texts.append(unescape(literal))
    return texts


def test_a_pdf_starts_with_the_version_header_and_every_xref_offset_points_at_its_object() -> None:
    pdf = invoice_pdf(INVOICE, PROJECT, issuer="Cyberport AISC")

    assert pdf.startswith(b"%PDF-1.4\n")
    assert pdf.rstrip().endswith(b"%%EOF")
    offsets = xref_offsets(pdf)
    assert len(offsets) >= 7
    for number, offset in offsets.items():
        assert pdf[offset:].startswith(b"%d 0 obj" % number), (number, pdf[offset : offset + 20])
    for match in re.finditer(rb"/Length (\d+) >>\nstream\n", pdf):
        end = match.end() + int(match.group(1))
        assert pdf[end:].startswith(b"\nendstream")


def test_the_text_shows_the_invoice_exactly_as_the_json_has_it() -> None:
    texts = shown_text(invoice_pdf(INVOICE, PROJECT))
    joined = "\n".join(texts)

    for value in ("INV-2026-11-hkgai-llm", "hkgai-llm", PROJECT.name, "finalized", "HKD"):
        assert value in texts, value
    assert any(text.startswith("2026-11, 01 Nov 2026 to 30 Nov 2026") for text in texts)
    for line in INVOICE["lines"]:
        for key in ("gpu_model", "gpu_hours", "rate_hkd", "amount_hkd"):
            assert line[key] in texts, (key, line[key])
    assert "2026-10 (late)" in texts
    assert INVOICE["gross_hkd"] in texts
    assert f"- {INVOICE['subsidy_hkd']}" in texts
    assert INVOICE["net_hkd"] in texts
    assert "Amount payable (HKD)" in texts
    assert "Subsidy (AISS, 70% of subsidised usage)" in texts
    assert "rate 0.70" in joined and "30000000.00 HKD" in joined
    assert f"Cap remaining after this invoice: {INVOICE['subsidy_cap_remaining_hkd']} HKD." in texts


def test_parentheses_and_backslashes_in_names_are_escaped() -> None:
    project = PROJECT.model_copy(update={"name": r"Lab (A) \ B)("})
    invoice = {**INVOICE, "lines": [{**INVOICE["lines"][0], "gpu_model": r"H800 (MIG 1g\10gb)"}]}

    pdf = invoice_pdf(invoice, project)

    assert rb"(Lab \(A\) \\ B\)\() Tj" in pdf
    assert rb"(H800 \(MIG 1g\\10gb\)) Tj" in pdf
    texts = shown_text(pdf)
    assert r"Lab (A) \ B)(" in texts and r"H800 (MIG 1g\10gb)" in texts
    for number, offset in xref_offsets(pdf).items():
        assert pdf[offset:].startswith(b"%d 0 obj" % number)


def test_characters_the_standard_fonts_lack_become_question_marks() -> None:
    assert pdf_string("香港 AI") == b"(?? AI)"
    assert pdf_string("café") == b"(caf\xe9)"


def test_a_long_invoice_continues_on_more_pages_with_a_correct_xref() -> None:
    lines = [
        {
            "gpu_model": f"MODEL-{index:03d}",
            "gpu_hours": f"{index}.000000",
            "rate_hkd": "1.00",
            "subsidised": False,
            "amount_hkd": f"{index}.00",
            "adjustment_for_period": None,
        }
        for index in range(1, 121)
    ]
    invoice = {**INVOICE, "lines": lines}

    pdf = invoice_pdf(invoice, None)

    pages = int(re.search(rb"/Type /Pages /Kids \[[^\]]*\] /Count (\d+)", pdf).group(1))
    assert pages >= 3
    assert len(re.findall(rb"/Type /Page ", pdf)) == pages
    texts = shown_text(pdf)
    assert all(f"MODEL-{index:03d}" in texts for index in range(1, 121))
    assert any(f"page {pages} of {pages}" in text for text in texts)
    for number, offset in xref_offsets(pdf).items():
        assert pdf[offset:].startswith(b"%d 0 obj" % number)


def test_the_same_invoice_gives_the_same_bytes_from_a_dict_or_a_model() -> None:
    assert invoice_pdf(INVOICE, PROJECT) == invoice_pdf(Invoice.model_validate(INVOICE), PROJECT)


def test_a_draft_says_so_and_an_unsubsidised_project_gets_no_subsidy_lines() -> None:
    invoice = {
        **INVOICE,
        "status": "draft",
        "subsidy_hkd": "0.00",
        "net_hkd": INVOICE["gross_hkd"],
        "subsidy_cap_remaining_hkd": None,
    }
    project = PROJECT.model_copy(update={"subsidy": None})

    texts = shown_text(invoice_pdf(invoice, project))

    assert "DRAFT - amounts may still change" in texts
    assert "No subsidy approved for this project." in texts
    assert not any(text.startswith("Cap remaining") for text in texts)
