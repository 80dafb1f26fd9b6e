"""The invoice engine (docs/contracts.md §4) against a tiny reference written from the
contract's words."""

from __future__ import annotations

import ast
import datetime as dt
from decimal import ROUND_HALF_UP, Decimal, localcontext
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.catalog import Project, RateCard, Subsidy
from services.billing import domain
from services.billing.domain import Pricing, UsageHour, build_invoice

UTC = dt.UTC
HKT = dt.timezone(dt.timedelta(hours=8))  # Hong Kong has kept UTC+8 without DST since 1979
PERIODS = ["2026-11", "2026-12", "2027-01"]


# --- reference: the contract, read literally, with high-precision Decimal instead of Fraction ---


def ref_hk_date(hour: dt.datetime) -> dt.date:
    return hour.astimezone(HKT).date()


def ref_rate(cards: list[RateCard], model: str, day: dt.date) -> Decimal | None:
    candidates = [c for c in cards if c.gpu_model == model and c.effective_from <= day]
    if not candidates:
        return None
    return max(candidates, key=lambda c: c.effective_from).hkd_per_gpu_hour


def ref_round(value: Decimal, places: str) -> Decimal:
    return value.quantize(Decimal(places), rounding=ROUND_HALF_UP)


def ref_invoice(
    project_id: str,
    period: str,
    hours: list[UsageHour],
    cards: list[RateCard],
    project: Project | None,
    subsidy_used_before: Decimal,
) -> dict:
    with localcontext() as ctx:
        ctx.prec = 120
        groups: dict[tuple, Decimal] = {}
        for hour in hours:
            day = ref_hk_date(hour.hour_start)
            hour_period = f"{day.year:04d}-{day.month:02d}"
            subsidised = bool(
                project
                and project.subsidy
                and project.subsidy.valid_from <= day <= project.subsidy.valid_to
            )
            key = (
                hour.gpu_model,
                ref_rate(cards, hour.gpu_model, day),
                subsidised,
                None if hour_period == period else hour_period,
            )
            groups[key] = groups.get(key, Decimal(0)) + hour.gpu_seconds
        lines = []
        for (model, rate, subsidised, adjustment), seconds in groups.items():
            amount = None if rate is None else ref_round(seconds * rate / 3600, "0.01")
            lines.append(
                {
                    "gpu_model": model,
                    "gpu_hours": str(ref_round(seconds / 3600, "0.000001")),
                    "rate_hkd": None if rate is None else str(rate),
                    "subsidised": subsidised,
                    "amount_hkd": None if amount is None else str(amount),
                    "adjustment_for_period": adjustment,
                }
            )
        gross = sum((Decimal(x["amount_hkd"]) for x in lines if x["amount_hkd"]), Decimal("0.00"))
        subsidy = Decimal("0.00")
        remaining = None
        if project is not None and project.subsidy is not None:
            subsidised_sum = sum(
                (Decimal(x["amount_hkd"]) for x in lines if x["subsidised"] and x["amount_hkd"]),
                Decimal("0.00"),
            )
            cap_remaining = project.subsidy.cap_hkd - subsidy_used_before
            subsidy = min(ref_round(subsidised_sum * project.subsidy.rate, "0.01"), cap_remaining)
            remaining = cap_remaining - subsidy
        return {
            "lines": sorted(lines, key=lambda x: sorted_key(x)),
            "gross_hkd": str(ref_round(gross, "0.01")),
            "subsidy_hkd": str(ref_round(subsidy, "0.01")),
            "net_hkd": str(ref_round(gross - subsidy, "0.01")),
            "subsidy_cap_remaining_hkd": None
            if remaining is None
            else str(ref_round(remaining, "0.01")),
            "unknown": project is None,
            "unpriced": any(x["rate_hkd"] is None for x in lines),
        }


def sorted_key(line: dict) -> tuple:
    return tuple(str(v) for v in line.values())


def engine_view(invoice: domain.ComputedInvoice) -> dict:
    document = invoice.document()
    lines = [line.model_dump() for line in document.lines]
    return {
        "lines": sorted(lines, key=sorted_key),
        "gross_hkd": document.gross_hkd,
        "subsidy_hkd": document.subsidy_hkd,
        "net_hkd": document.net_hkd,
        "subsidy_cap_remaining_hkd": document.subsidy_cap_remaining_hkd,
        "unknown": domain.FLAG_UNKNOWN_PROJECT in document.flags,
        "unpriced": domain.FLAG_UNPRICED_USAGE in document.flags,
    }


# --- strategies ----------------------------------------------------------------------------------

MODELS = ["H800", "A100", "MI300X"]
START = dt.datetime(2026, 10, 31, 16, tzinfo=UTC)  # 2026-11-01 00:00 HKT
HOURS_IN_RANGE = 92 * 24  # through January 2027 (HK)


def money_values(max_cents: int) -> st.SearchStrategy[Decimal]:
    return st.integers(0, max_cents).map(lambda cents: Decimal(cents).scaleb(-2))


dates = st.dates(dt.date(2026, 9, 1), dt.date(2027, 2, 28))
rate_cards = st.lists(
    st.builds(
        RateCard,
        gpu_model=st.sampled_from(MODELS[:2]),
        hkd_per_gpu_hour=money_values(5000),
        effective_from=dates,
    ),
    max_size=5,
    unique_by=lambda c: (c.gpu_model, c.effective_from),
)


@st.composite
def subsidies(draw: st.DrawFn) -> Subsidy:
    valid_from = draw(dates)
    return Subsidy(
        scheme="AISS",
        rate=draw(
            st.sampled_from([Decimal("0.70"), Decimal("0.90")])
            | st.integers(1, 100).map(lambda pct: Decimal(pct).scaleb(-2))
        ),
        cap_hkd=draw(money_values(400_000)),
        valid_from=valid_from,
        valid_to=draw(st.dates(valid_from, dt.date(2027, 3, 31))),
    )


projects = st.none() | st.builds(
    Project, id=st.just("p1"), name=st.just("P1"), subsidy=st.none() | subsidies()
)
usage_hours = st.lists(
    st.builds(
        UsageHour,
        gpu_model=st.sampled_from(MODELS),
        hour_start=st.integers(0, HOURS_IN_RANGE - 1).map(lambda h: START + dt.timedelta(hours=h)),
        gpu_seconds=st.integers(0, 3_600_000).map(lambda ms: Decimal(ms).scaleb(-3)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(cards=rate_cards, project=projects, hours=usage_hours)
def test_invoices_of_consecutive_months_match_the_reference(
    cards: list[RateCard], project: Project | None, hours: list[UsageHour]
) -> None:
    pricing = Pricing.of(cards, [project] if project else [])
    used_engine = used_reference = Decimal("0.00")
    for period in PERIODS:
        in_period = [h for h in hours if domain.period_of(h.hour_start) == period]
        engine = build_invoice("p1", period, in_period, pricing, used_engine)
        reference = ref_invoice("p1", period, in_period, cards, project, used_reference)
        assert engine_view(engine) == reference
        used_engine += engine.subsidy_hkd
        used_reference += Decimal(reference["subsidy_hkd"])


@settings(max_examples=200, deadline=None)
@given(
    cards=rate_cards,
    project=projects,
    hours=usage_hours,
    finalized=st.sets(st.sampled_from(PERIODS[:2])),
)
def test_late_usage_of_finalized_months_lands_on_the_next_open_invoice_as_adjustments(
    cards: list[RateCard], project: Project | None, hours: list[UsageHour], finalized: set[str]
) -> None:
    plan = domain.assign_usage(hours, frozenset(finalized))
    for hour in hours:
        target = ref_hk_date(hour.hour_start).strftime("%Y-%m")
        while target in finalized:
            target = PERIODS[PERIODS.index(target) + 1]
        assert hour in plan[target]
    assert sum(len(v) for v in plan.values()) == len(hours)
    pricing = Pricing.of(cards, [project] if project else [])
    for period, carried in plan.items():
        engine = build_invoice("p1", period, carried, pricing, Decimal("0.00"))
        assert engine_view(engine) == ref_invoice("p1", period, carried, cards, project, Decimal(0))
        for line in engine.lines:
            assert line.adjustment_for_period is None or line.adjustment_for_period in finalized


@given(st.integers(-(10**9), 10**9), st.integers(0, 6))
def test_round_half_up_matches_decimal_rounding(units: int, places: int) -> None:
    value = Decimal(units).scaleb(-(places + 1))
    assert domain.round_half_up(value, places) == value.quantize(
        Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP
    )


# --- named cases ---------------------------------------------------------------------------------

H800 = RateCard(
    gpu_model="H800", hkd_per_gpu_hour=Decimal("26.00"), effective_from=dt.date(2026, 1, 1)
)


def aiss(
    rate: str,
    cap: str,
    valid_from: dt.date = dt.date(2026, 1, 1),
    valid_to: dt.date = dt.date(2027, 12, 31),
) -> Project:
    subsidy = Subsidy(
        scheme="AISS",
        rate=Decimal(rate),
        cap_hkd=Decimal(cap),
        valid_from=valid_from,
        valid_to=valid_to,
    )
    return Project(id="hkgai-llm", name="LLM", subsidy=subsidy)


def hours_at(
    first: dt.datetime, count: int, seconds: str = "3600", model: str = "H800"
) -> list[UsageHour]:
    return [UsageHour(model, first + dt.timedelta(hours=i), Decimal(seconds)) for i in range(count)]


def test_cap_exhausted_mid_month_limits_the_subsidy_and_leaves_nothing_for_later_months() -> None:
    # given a 100.00 cap and 10 GPU-hours at 26.00 in November (uncapped subsidy 182.00)
    pricing = Pricing.of([H800], [aiss("0.70", "100.00")])
    november = build_invoice(
        "hkgai-llm",
        "2026-11",
        hours_at(dt.datetime(2026, 11, 10, tzinfo=UTC), 10),
        pricing,
        Decimal("0.00"),
    )
    # then the cap is the subsidy, and nothing remains
    assert (november.gross_hkd, november.subsidy_hkd, november.net_hkd) == (
        Decimal("260.00"),
        Decimal("100.00"),
        Decimal("160.00"),
    )
    assert november.subsidy_cap_remaining_hkd == Decimal("0.00")
    assert domain.FLAG_SUBSIDY_CAPPED in november.flags
    # and December, with the cap used up, gets none
    december = build_invoice(
        "hkgai-llm",
        "2026-12",
        hours_at(dt.datetime(2026, 12, 10, tzinfo=UTC), 1),
        pricing,
        november.subsidy_hkd,
    )
    assert (december.subsidy_hkd, december.net_hkd) == (Decimal("0.00"), Decimal("26.00"))


def test_cap_runs_out_across_months() -> None:
    # given a 200.00 cap: November takes 182.00, December's 91.00 is cut to the 18.00 left
    pricing = Pricing.of([H800], [aiss("0.70", "200.00")])
    november = build_invoice(
        "hkgai-llm",
        "2026-11",
        hours_at(dt.datetime(2026, 11, 3, tzinfo=UTC), 10),
        pricing,
        Decimal("0.00"),
    )
    december = build_invoice(
        "hkgai-llm",
        "2026-12",
        hours_at(dt.datetime(2026, 12, 3, tzinfo=UTC), 5),
        pricing,
        november.subsidy_hkd,
    )
    january = build_invoice(
        "hkgai-llm",
        "2027-01",
        hours_at(dt.datetime(2027, 1, 3, tzinfo=UTC), 5),
        pricing,
        november.subsidy_hkd + december.subsidy_hkd,
    )
    assert november.document().subsidy_hkd == "182.00"
    assert november.document().subsidy_cap_remaining_hkd == "18.00"
    assert (december.document().subsidy_hkd, december.document().net_hkd) == ("18.00", "112.00")
    assert december.document().subsidy_cap_remaining_hkd == "0.00"
    assert (january.document().subsidy_hkd, january.document().net_hkd) == ("0.00", "130.00")


def test_exceptional_rate_of_090_pays_nine_tenths_of_list_price() -> None:
    pricing = Pricing.of([H800], [aiss("0.90", "3000000.00")])
    invoice = build_invoice(
        "hkgai-llm",
        "2026-11",
        hours_at(dt.datetime(2026, 11, 5, tzinfo=UTC), 100),
        pricing,
        Decimal(0),
    )
    document = invoice.document()
    assert (document.gross_hkd, document.subsidy_hkd, document.net_hkd) == (
        "2600.00",
        "2340.00",
        "260.00",
    )
    assert document.subsidy_cap_remaining_hkd == "2997660.00"


def test_rate_change_mid_month_splits_the_line_at_hong_kong_midnight() -> None:
    # given 24.00 from 2026-11-15 (HK), i.e. from 2026-11-14T16:00Z
    cheaper = RateCard(
        gpu_model="H800", hkd_per_gpu_hour=Decimal("24.00"), effective_from=dt.date(2026, 11, 15)
    )
    pricing = Pricing.of([H800, cheaper], [aiss("0.70", "1000000.00")])
    hours = hours_at(
        dt.datetime(2026, 11, 14, 14, tzinfo=UTC), 4
    )  # 14Z, 15Z old rate; 16Z, 17Z new
    invoice = build_invoice("hkgai-llm", "2026-11", hours, pricing, Decimal(0)).document()
    assert [(line.rate_hkd, line.gpu_hours, line.amount_hkd) for line in invoice.lines] == [
        ("24.00", "2.000000", "48.00"),
        ("26.00", "2.000000", "52.00"),
    ]
    assert (invoice.gross_hkd, invoice.subsidy_hkd, invoice.net_hkd) == ("100.00", "70.00", "30.00")


def test_samples_at_the_month_boundary_belong_to_the_hour_their_interval_starts_in() -> None:
    # given 10 s samples on the last UTC day of November, around HK midnight of 1 December
    stamped = {
        "15:59:59": dt.datetime(2026, 11, 30, 15, 59, 59, tzinfo=UTC),
        "16:00:00": dt.datetime(2026, 11, 30, 16, 0, 0, tzinfo=UTC),
        "16:00:10": dt.datetime(2026, 11, 30, 16, 0, 10, tzinfo=UTC),
    }
    hours = {name: domain.hour_of_sample(time, 10.0) for name, time in stamped.items()}
    # then the first two are November's (HK), the third December's
    assert hours["15:59:59"] == hours["16:00:00"] == dt.datetime(2026, 11, 30, 15, tzinfo=UTC)
    assert hours["16:00:10"] == dt.datetime(2026, 11, 30, 16, tzinfo=UTC)
    assert [domain.period_of(h) for h in hours.values()] == ["2026-11", "2026-11", "2026-12"]
    # and with an approval ending 30 November, only the November hour is subsidised
    pricing = Pricing.of([H800], [aiss("0.70", "1000.00", valid_to=dt.date(2026, 11, 30))])
    usage = [
        UsageHour("H800", hours["15:59:59"], Decimal("20")),  # two samples in hour 15Z
        UsageHour("H800", hours["16:00:10"], Decimal("10")),
    ]
    plan = domain.assign_usage(usage, frozenset())
    november = build_invoice(
        "hkgai-llm", "2026-11", plan["2026-11"], pricing, Decimal(0)
    ).document()
    december = build_invoice(
        "hkgai-llm", "2026-12", plan["2026-12"], pricing, Decimal(0)
    ).document()
    assert [(ln.gpu_hours, ln.subsidised, ln.amount_hkd) for ln in november.lines] == [
        ("0.005556", True, "0.14")  # 20 s * 26.00 / 3600 = 0.1444...
    ]
    assert [(ln.gpu_hours, ln.subsidised, ln.amount_hkd) for ln in december.lines] == [
        ("0.002778", False, "0.07")  # 10 s * 26.00 / 3600 = 0.0722...
    ]
    assert domain.period_bounds("2026-12") == (
        dt.datetime(2026, 11, 30, 16, tzinfo=UTC),
        dt.datetime(2026, 12, 31, 16, tzinfo=UTC),
    )


def test_unknown_project_is_invoiced_without_subsidy_and_flagged() -> None:
    pricing = Pricing.of([H800], [aiss("0.70", "1000.00")])
    invoice = build_invoice(
        "stranger",
        "2026-11",
        hours_at(dt.datetime(2026, 11, 2, tzinfo=UTC), 2),
        pricing,
        Decimal(0),
    ).document()
    assert (invoice.gross_hkd, invoice.subsidy_hkd, invoice.net_hkd) == ("52.00", "0.00", "52.00")
    assert invoice.subsidy_cap_remaining_hkd is None
    assert invoice.flags == [domain.FLAG_UNKNOWN_PROJECT]
    assert invoice.invoice_id == "INV-2026-11-stranger"


def test_model_without_rate_gets_a_line_without_amount_and_a_flag() -> None:
    pricing = Pricing.of([H800], [aiss("0.70", "1000.00")])
    usage = hours_at(dt.datetime(2026, 11, 2, tzinfo=UTC), 1) + hours_at(
        dt.datetime(2026, 11, 2, tzinfo=UTC), 3, "1800", model="MI300X"
    )
    invoice = build_invoice("hkgai-llm", "2026-11", usage, pricing, Decimal(0))
    document = invoice.document()
    assert [(ln.gpu_model, ln.gpu_hours, ln.rate_hkd, ln.amount_hkd) for ln in document.lines] == [
        ("H800", "1.000000", "26.00", "26.00"),
        ("MI300X", "1.500000", None, None),
    ]
    assert (document.gross_hkd, document.subsidy_hkd) == ("26.00", "18.20")
    assert invoice.has_unpriced_usage and domain.FLAG_UNPRICED_USAGE in document.flags


def test_amounts_come_from_exact_seconds_not_from_the_hours_shown() -> None:
    # 22 s at 9.00 is exactly 0.055 -> 0.06; the shown 0.006111 h would give 0.054999 -> 0.05
    card = RateCard(
        gpu_model="Ascend 910B",
        hkd_per_gpu_hour=Decimal("9.00"),
        effective_from=dt.date(2026, 1, 1),
    )
    invoice = build_invoice(
        "x",
        "2026-11",
        [UsageHour("Ascend 910B", dt.datetime(2026, 11, 2, tzinfo=UTC), Decimal("22"))],
        Pricing.of([card], []),
        Decimal(0),
    ).document()
    assert (invoice.lines[0].gpu_hours, invoice.lines[0].amount_hkd) == ("0.006111", "0.06")


def test_late_usage_for_a_finalized_month_is_an_adjustment_line_naming_it() -> None:
    pricing = Pricing.of([H800], [aiss("0.70", "1000.00")])
    late = UsageHour("H800", dt.datetime(2026, 11, 30, 15, tzinfo=UTC), Decimal("1800"))
    current = UsageHour("H800", dt.datetime(2026, 12, 2, tzinfo=UTC), Decimal("3600"))
    plan = domain.assign_usage([late, current], frozenset({"2026-11"}))
    assert list(plan) == ["2026-12"]
    document = build_invoice(
        "hkgai-llm", "2026-12", plan["2026-12"], pricing, Decimal(0)
    ).document()
    assert [(ln.adjustment_for_period, ln.gpu_hours, ln.amount_hkd) for ln in document.lines] == [
        (None, "1.000000", "26.00"),
        ("2026-11", "0.500000", "13.00"),
    ]
    assert (document.gross_hkd, document.subsidy_hkd, document.net_hkd) == (
        "39.00",
        "27.30",
        "11.70",
    )


@pytest.mark.parametrize("bad", ["2026-13", "2026-1", "26-11", "2026-00", "2026-11-01", ""])
def test_periods_are_validated(bad: str) -> None:
    with pytest.raises(domain.InvalidPeriod):
        domain.parse_period(bad)
    assert domain.next_period("2026-12") == "2027-01"


def test_domain_imports_nothing_that_does_io() -> None:
    tree = ast.parse(Path(domain.__file__).read_text())
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert imported <= {
        "__future__",
        "datetime",
        "re",
        "collections",
        "dataclasses",
        "decimal",
        "fractions",
        "zoneinfo",
        "schemas",
    }


# --- credit notes -------------------------------------------------------------------------------


def finalized(invoice: domain.ComputedInvoice) -> domain.ComputedInvoice:
    return domain.ComputedInvoice(**{**invoice.__dict__, "status": "finalized"})


@given(wrong=rate_cards, corrected=rate_cards, project=projects, hours=usage_hours, data=st.data())
@settings(max_examples=300)
def test_invoices_minus_credit_notes_equal_the_arithmetic_of_the_corrected_catalog(
    wrong: list[RateCard],
    corrected: list[RateCard],
    project: Project | None,
    hours: list[UsageHour],
    data: st.DataObject,
) -> None:
    """A month finalized with a wrong catalog, credited (in one note or line by line, in any
    order), its hours charged again with the corrected catalog on the next invoice: list price,
    subsidy and net charged overall equal the contract arithmetic with the corrected catalog, and
    the cap is as if the wrong invoice never was."""
    period = PERIODS[0]
    own = [hour for hour in hours if ref_hk_date(hour.hour_start).strftime("%Y-%m") == period]
    projects_ = [project] if project else []
    invoice = finalized(build_invoice("p1", period, own, Pricing.of(wrong, projects_), Decimal(0)))
    rate = project.subsidy.rate if project and project.subsidy else None

    # credited in whole, or line by line in a random order, each note at most once per line
    numbers = list(range(1, len(invoice.lines) + 1))
    if not numbers:
        with pytest.raises(domain.CreditRefused):
            domain.plan_credit(invoice, None, [], Decimal(0), rate)
        return
    by_lines = data.draw(st.booleans())
    order = data.draw(st.permutations(numbers)) if by_lines else None
    credited: list[int] = []
    notes = []
    for step in [[n] for n in order] if order else [None]:
        note = domain.plan_credit(
            invoice, step, credited, sum((n.subsidy_hkd for n in notes), Decimal(0)), rate
        )
        credited.extend(n for n, _line in note.lines)
        notes.append(note)
        assert note.subsidy_hkd >= 0 and note.net_hkd == note.gross_hkd - note.subsidy_hkd
    assert sorted(credited) == numbers
    with pytest.raises(domain.CreditRefused):
        domain.plan_credit(invoice, None, credited, Decimal(0), rate)

    credit_gross = sum((n.gross_hkd for n in notes), Decimal(0))
    credit_subsidy = sum((n.subsidy_hkd for n in notes), Decimal(0))
    assert credit_gross == invoice.gross_hkd and credit_subsidy == invoice.subsidy_hkd

    # the corrected charge: the same hours as adjustments on the next month's invoice
    pricing = Pricing.of(corrected, projects_)
    used_before = invoice.subsidy_hkd - credit_subsidy
    recharged = build_invoice("p1", PERIODS[1], own, pricing, used_before)
    reference = build_invoice("p1", period, own, pricing, Decimal(0))
    assert all(line.adjustment_for_period == period for line in recharged.lines)
    for total in ("gross_hkd", "subsidy_hkd", "net_hkd", "subsidy_cap_remaining_hkd"):
        overall = getattr(invoice, total) or Decimal(0)
        overall += getattr(recharged, total) or Decimal(0)
        if total != "subsidy_cap_remaining_hkd":
            overall -= {"gross_hkd": credit_gross, "subsidy_hkd": credit_subsidy}.get(
                total, credit_gross - credit_subsidy
            )
            assert overall == getattr(reference, total), total
        else:
            assert getattr(recharged, total) == getattr(reference, total)


# --- subsidy forecast ---------------------------------------------------------------------------


def test_the_cap_runs_out_at_the_trailing_burn_unless_the_approval_ends_first() -> None:
    today = dt.date(2026, 12, 6)
    project = Project(
        id="p1",
        name="P1",
        subsidy=Subsidy(
            scheme="AISS",
            rate=Decimal("0.70"),
            cap_hkd=Decimal("10000.00"),
            valid_from=dt.date(2026, 1, 1),
            valid_to=dt.date(2027, 3, 31),
        ),
    )
    pricing = Pricing.of(
        [
            RateCard(
                gpu_model="H800",
                hkd_per_gpu_hour=Decimal("26.00"),
                effective_from=dt.date(2026, 1, 1),
            )
        ],
        [project],
    )
    # 7 days of 10 GPU-hours a day: 260.00 a day at list, 182.00 of subsidy a day
    week = [("H800", today - dt.timedelta(days=d), Decimal(36000)) for d in range(1, 8)]
    burn = domain.subsidised_burn(week, project, pricing)
    assert burn == Decimal(182)
    found = domain.subsidy_forecast(
        Decimal("10000.00"), Decimal("4540.00"), burn, today, dt.date(2027, 3, 31)
    )
    # 5,460.00 left / 182 a day = 30 days
    assert (found.burn_hkd_per_day, found.days_left, found.exhausted_on) == (
        Decimal(182),
        30,
        dt.date(2027, 1, 5),
    )
    # a part day left counts as a day: 5,460.01 left lasts into a 31st day
    partial = domain.subsidy_forecast(
        Decimal("10000.00"), Decimal("4539.99"), burn, today, dt.date(2027, 3, 31)
    )
    assert partial.days_left == 31
    ends_first = domain.subsidy_forecast(
        Decimal("10000.00"), Decimal("4540.00"), burn, today, dt.date(2026, 12, 31)
    )
    assert (ends_first.exhausted_on, ends_first.days_left) == (None, None)
    idle = domain.subsidy_forecast(
        Decimal("10000.00"), Decimal("0"), Decimal(0), today, dt.date(2027, 3, 31)
    )
    assert idle.exhausted_on is None
    used_up = domain.subsidy_forecast(
        Decimal("100.00"), Decimal("100.00"), Decimal(0), today, dt.date(2027, 3, 31)
    )
    assert (used_up.exhausted_on, used_up.days_left) == (today, 0)
    # usage outside the approval window or without a rate burns nothing
    outside = [("H800", dt.date(2025, 12, 30), Decimal(36000)), ("B200", today, Decimal(36000))]
    assert domain.subsidised_burn(outside, project, pricing) == 0
