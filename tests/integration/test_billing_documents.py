"""Invoice numbers, credit notes and the audit trail against a real PostgreSQL (one database per
test): numbered at finalization and gapless per year, a wrong finalized invoice corrected by a
credit note with the cap restored and the corrected charge on the next invoice, every change
audited, append-only."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import pytest

from schemas.metering import HourlyTotal
from services.billing import catalog as catalog_files
from services.billing import domain, service, store

UTC = dt.UTC
NOV = dt.datetime(2026, 11, 10, 2, tzinfo=UTC)  # an hour of November in Hong Kong
ISSUED = dt.date(2026, 12, 2)
NUMBERING = service.Numbering("AISC", 30)

CATALOG = """
currency: HKD
rate_cards:
  - {gpu_model: H800, hkd_per_gpu_hour: "%s", effective_from: 2026-01-01}
  - {gpu_model: A100, hkd_per_gpu_hour: "13.00", effective_from: 2026-01-01}
projects:
  - id: hkgai-llm
    name: 香港生成式人工智能研發中心
    subsidy: {scheme: AISS, rate: "0.70", cap_hkd: "%s", valid_from: 2026-01-01, valid_to: 2026-12-31}
  - id: commercial-partner
    name: No subsidy
"""


def catalog(h800_rate: str = "26.00", cap: str = "1000000.00") -> catalog_files.Catalog:
    return catalog_files.parse_catalog(CATALOG % (h800_rate, cap))


def hourly(
    hour: dt.datetime, gpu_seconds: str, project_id: str = "hkgai-llm", gpu_model: str = "H800"
) -> HourlyTotal:
    return HourlyTotal(
        project_id=project_id,
        gpu_model=gpu_model,
        hour_start=hour,
        gpu_seconds=Decimal(gpu_seconds),
        util_gpu_seconds=Decimal(gpu_seconds) / 2,
        energy_wh=Decimal("1.5"),
        samples=1,
        revision=1,
    )


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    await store.migrate(database_url)
    connection = await asyncpg.connect(database_url)
    await catalog_files.apply_catalog(connection, catalog(), actor="cli:setup")
    yield connection
    await connection.close()


async def november_finalized(conn: asyncpg.Connection) -> service.FinalizeResult:
    await service.apply_hourly_batch(
        conn,
        [
            hourly(NOV, "36000"),  # 10 h of H800 at 26.00 = 260.00
            hourly(NOV, "7200", gpu_model="A100"),  # 2 h at 13.00 = 26.00
            hourly(NOV, "3600", project_id="commercial-partner"),
        ],
    )
    return await service.finalize_period(
        conn, "2026-11", actor="token:1", numbering=NUMBERING, issued_on=ISSUED
    )


async def doc(conn: asyncpg.Connection, invoice_id: str) -> dict:
    found = await store.load_invoice(conn, invoice_id)
    assert found is not None, invoice_id
    return found.document().model_dump(mode="json")


async def test_finalized_invoices_are_numbered_gapless_per_year_with_issue_and_due_dates(
    conn: asyncpg.Connection,
) -> None:
    result = await november_finalized(conn)
    assert result.invoice_numbers == ["AISC-2026-000001", "AISC-2026-000002"]
    first = await doc(conn, "INV-2026-11-commercial-partner")  # numbered in project order
    assert (first["invoice_number"], first["issued_on"], first["due_on"]) == (
        "AISC-2026-000001",
        "2026-12-02",
        "2027-01-01",
    )
    assert (await doc(conn, "INV-2026-11-hkgai-llm"))["invoice_number"] == "AISC-2026-000002"

    # a finalization that fails gives its numbers back: the next one continues the sequence
    await service.apply_hourly_batch(conn, [hourly(NOV + dt.timedelta(days=30), "3600")])
    await conn.execute(
        "INSERT INTO usage_hourly VALUES ('hkgai-llm', 'B200', $1, 3600, 0, 0, 1, 1)",
        NOV + dt.timedelta(days=30),
    )
    await service.drain_dirty_projects(conn)
    await conn.execute(
        "INSERT INTO dirty_projects (project_id, from_period) VALUES ('hkgai-llm', '2026-12')"
    )
    with pytest.raises(service.UnpricedUsage):
        await service.finalize_period(conn, "2026-12", numbering=NUMBERING, issued_on=ISSUED)
    december = await service.finalize_period(
        conn, "2026-12", force=True, numbering=NUMBERING, issued_on=dt.date(2027, 1, 3)
    )
    assert december.invoice_numbers == ["AISC-2027-000001"]  # a new year starts at 1

    # a number, once given, never changes
    with pytest.raises(asyncpg.IntegrityConstraintViolationError):
        await conn.execute(
            "UPDATE invoices SET invoice_number = 'AISC-2026-999999'"
            " WHERE invoice_id = 'INV-2026-11-hkgai-llm'"
        )


async def test_concurrent_finalizations_never_share_or_skip_a_number(database_url: str) -> None:
    await store.migrate(database_url)
    conns = [await asyncpg.connect(database_url) for _ in range(3)]
    try:
        await catalog_files.apply_catalog(conns[0], catalog())
        months = ["2026-08", "2026-09", "2026-10"]
        for month in months:
            start, _end = domain.period_bounds(month)
            await service.apply_hourly_batch(
                conns[0], [hourly(start + dt.timedelta(days=3), "3600")]
            )
        await asyncio.gather(
            *(
                service.finalize_period(c, month, numbering=NUMBERING, issued_on=ISSUED)
                for c, month in zip(conns, months, strict=True)
            )
        )
        numbers = sorted(
            r["invoice_number"] for r in await conns[0].fetch("SELECT invoice_number FROM invoices")
        )
        assert numbers == [f"AISC-2026-{n:06d}" for n in (1, 2, 3)]
    finally:
        for c in conns:
            await c.close()


async def test_a_wrong_rate_is_corrected_by_a_credit_note_and_a_charge_on_the_next_invoice(
    conn: asyncpg.Connection,
) -> None:
    # given November finalized at a wrong H800 rate (26.00 instead of 20.00)
    await november_finalized(conn)
    wrong = await doc(conn, "INV-2026-11-hkgai-llm")
    assert (wrong["gross_hkd"], wrong["subsidy_hkd"], wrong["net_hkd"]) == (
        "286.00",
        "200.20",
        "85.80",
    )
    # when the rate card is corrected and the invoice credited in whole
    await catalog_files.apply_catalog(conn, catalog(h800_rate="20.00"), actor="oidc:alice")
    assert await doc(conn, "INV-2026-11-hkgai-llm") == wrong  # a finalized invoice never changes
    note = await service.issue_credit_note(
        conn,
        "INV-2026-11-hkgai-llm",
        "H800 rate card corrected from 26.00 to 20.00",
        actor="oidc:alice",
        numbering=NUMBERING,
        issued_on=dt.date(2026, 12, 5),
    )
    # then the credit note reverses the whole invoice, subsidy included
    assert (note.credit_note_number, note.invoice_number) == (
        "AISC-CN-2026-000001",
        "AISC-2026-000002",
    )
    assert [line.line_no for line in note.lines] == [1, 2]
    assert (note.gross_hkd, note.subsidy_hkd, note.net_hkd) == ("286.00", "200.20", "85.80")
    # and December's draft charges the hours again at the corrected rate, as adjustments for
    # November, with the subsidy's cap restored
    december = await doc(conn, "INV-2026-12-hkgai-llm")
    assert [
        (line["gpu_model"], line["rate_hkd"], line["amount_hkd"], line["adjustment_for_period"])
        for line in december["lines"]
    ] == [("A100", "13.00", "26.00", "2026-11"), ("H800", "20.00", "200.00", "2026-11")]
    assert (december["gross_hkd"], december["subsidy_hkd"], december["net_hkd"]) == (
        "226.00",
        "158.20",
        "67.80",
    )
    assert december["subsidy_cap_remaining_hkd"] == "999841.80"  # 1,000,000 - 158.20
    # so the invoices minus the credit note equal the arithmetic with the corrected catalog
    corrected = domain.build_invoice(
        "hkgai-llm",
        "2026-11",
        [
            domain.UsageHour("H800", NOV, Decimal(36000)),
            domain.UsageHour("A100", NOV, Decimal(7200)),
        ],
        await store.load_pricing(conn),
        Decimal(0),
    )
    charged = Decimal(wrong["net_hkd"]) - Decimal(note.net_hkd) + Decimal(december["net_hkd"])
    assert charged == corrected.net_hkd

    # nothing is credited twice
    with pytest.raises(domain.CreditRefused, match="already credited"):
        await service.issue_credit_note(conn, "INV-2026-11-hkgai-llm", "again", numbering=NUMBERING)


async def test_a_credit_by_lines_returns_that_lines_subsidy_and_the_rest_stays_invoiced(
    conn: asyncpg.Connection,
) -> None:
    await november_finalized(conn)
    # line 2 (H800, 260.00; subsidy 0.70 -> 182.00) was charged to the wrong project
    note = await service.issue_credit_note(
        conn, "INV-2026-11-hkgai-llm", "usage of another project", [2], numbering=NUMBERING
    )
    assert [(line.line_no, line.gpu_model, line.amount_hkd) for line in note.lines] == [
        (2, "H800", "260.00")
    ]
    assert (note.gross_hkd, note.subsidy_hkd, note.net_hkd) == ("260.00", "182.00", "78.00")
    december = await doc(conn, "INV-2026-12-hkgai-llm")
    assert [(line["gpu_model"], line["adjustment_for_period"]) for line in december["lines"]] == [
        ("H800", "2026-11")
    ]
    # then line 1 alone: the invoice's subsidy left, exactly (200.20 - 182.00)
    rest = await service.issue_credit_note(
        conn, "INV-2026-11-hkgai-llm", "A100 hours were a test", [1], numbering=NUMBERING
    )
    assert (rest.gross_hkd, rest.subsidy_hkd, rest.credit_note_number) == (
        "26.00",
        "18.20",
        "AISC-CN-2026-000002",
    )
    with pytest.raises(domain.CreditRefused, match="no line 3"):
        await service.issue_credit_note(conn, "INV-2026-11-hkgai-llm", "x", [3])


async def test_only_a_finalized_invoice_is_credited(conn: asyncpg.Connection) -> None:
    await service.apply_hourly_batch(conn, [hourly(NOV, "3600")])
    with pytest.raises(domain.CreditRefused, match="draft"):
        await service.issue_credit_note(conn, "INV-2026-11-hkgai-llm", "too early")
    with pytest.raises(service.InvoiceNotFound):
        await service.issue_credit_note(conn, "INV-2026-11-nobody", "no such invoice")


async def test_every_change_is_audited_with_who_and_what_and_the_trail_is_append_only(
    conn: asyncpg.Connection,
) -> None:
    await november_finalized(conn)
    await catalog_files.apply_catalog(conn, catalog(h800_rate="20.00"), actor="oidc:alice")
    await catalog_files.apply_catalog(conn, catalog(h800_rate="20.00"), actor="oidc:alice")  # no-op
    await service.issue_credit_note(
        conn, "INV-2026-11-hkgai-llm", "rate corrected", actor="token:1", numbering=NUMBERING
    )
    rows = list(reversed(await store.audit_rows(conn)))
    assert [(r["actor"], r["action"], r["subject"]) for r in rows] == [
        ("cli:setup", "catalog.apply", None),
        ("token:1", "period.finalize", "2026-11"),
        ("oidc:alice", "catalog.apply", None),
        ("token:1", "credit_note.issue", "CN-INV-2026-11-hkgai-llm-1"),
    ]
    change = json.loads(rows[2]["details"])["changes"]
    assert change == [
        {
            "entry": "rate card H800 from 2026-01-01",
            "before": {
                "gpu_model": "H800",
                "hkd_per_gpu_hour": "26.00",
                "effective_from": "2026-01-01",
            },
            "after": {
                "gpu_model": "H800",
                "hkd_per_gpu_hour": "20.00",
                "effective_from": "2026-01-01",
            },
        }
    ]
    finalized = json.loads(rows[1]["details"])
    assert finalized["invoice_numbers"] == ["AISC-2026-000001", "AISC-2026-000002"]
    for statement in (
        "UPDATE audit_log SET actor = 'me'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ):
        with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="append-only"):
            await conn.execute(statement)
    with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="append-only"):
        await conn.execute("DELETE FROM credit_notes")


async def test_a_forced_finalization_is_audited_as_forced(conn: asyncpg.Connection) -> None:
    await service.apply_hourly_batch(conn, [hourly(NOV, "3600", gpu_model="B200")])
    await service.finalize_period(conn, "2026-11", force=True, actor="token:2")
    [entry] = [r for r in await store.audit_rows(conn) if r["action"].startswith("period.")]
    assert (entry["action"], entry["actor"]) == ("period.finalize_forced", "token:2")
    assert json.loads(entry["details"])["unpriced_invoices"] == ["INV-2026-11-hkgai-llm"]


async def test_the_bill_to_of_catalog_version_2_is_kept_and_read_back(
    conn: asyncpg.Connection,
) -> None:
    text = (
        CATALOG % ("26.00", "1000.00")
        + """
  - id: hku-vision-lab
    name: HKU Vision Lab
    bill_to:
      contact: Dr. Chan Tai Man
      email: accounts@hku.example
      address: [Pokfulam Road, Hong Kong]
      purchase_order: PO-2026-0042
"""
    )
    with pytest.raises(catalog_files.CatalogError, match="version: 2"):
        catalog_files.parse_catalog(text)
    await catalog_files.apply_catalog(conn, catalog_files.parse_catalog("version: 2\n" + text))
    read = await catalog_files.read_catalog(conn)
    assert read.version == 2
    [lab] = [p for p in read.projects if p.id == "hku-vision-lab"]
    assert lab.bill_to is not None and lab.bill_to.purchase_order == "PO-2026-0042"
    assert lab.bill_to.address == ["Pokfulam Road", "Hong Kong"]


async def test_the_subsidy_forecast_follows_the_last_seven_days_of_usage(
    conn: asyncpg.Connection,
) -> None:
    await catalog_files.apply_catalog(conn, catalog(cap="5000.00"))
    now = dt.datetime(2026, 11, 20, 4, tzinfo=UTC)  # 12:00 in Hong Kong, 20 November
    # 7 whole days before it, 10 H800 hours a day: 182.00 of subsidy a day; today's usage and
    # last month's do not count
    week = [hourly(dt.datetime(2026, 11, d, 2, tzinfo=UTC), "36000") for d in range(13, 20)]
    older = hourly(dt.datetime(2026, 10, 2, 2, tzinfo=UTC), "36000")
    today = hourly(dt.datetime(2026, 11, 20, 2, tzinfo=UTC), "360000")
    await service.apply_hourly_batch(conn, [*week, older, today])
    forecast = (await service.subsidy_forecasts(conn, now))["hkgai-llm"]
    used = await store.subsidy_used_through(conn, "hkgai-llm", "2026-12")
    assert used == Decimal("3276.00")  # (7 x 260.00 + 260.00 + 2,600.00) x 0.70
    # (5000.00 - 3276.00) / 182 a day = 9.5 -> 10 days
    assert (forecast.burn_hkd_per_day, forecast.days_left) == (Decimal(182), 10)
    assert forecast.exhausted_on == dt.date(2026, 11, 30)
    assert forecast.approval_ends_on == dt.date(2026, 12, 31)
