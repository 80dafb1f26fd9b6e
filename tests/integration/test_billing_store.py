"""Ledger, catalog, invoices and finalization against a real PostgreSQL (one database per test)."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from schemas.metering import HourlyTotal
from services.billing import catalog as catalog_files
from services.billing import service, store

UTC = dt.UTC

CATALOG = """
currency: HKD
rate_cards:
  - {gpu_model: H800, hkd_per_gpu_hour: "26.00", effective_from: 2026-01-01}
  - {gpu_model: A100, hkd_per_gpu_hour: "13.00", effective_from: 2026-01-01}
projects:
  - id: hkgai-llm
    name: LLM
    subsidy: {scheme: AISS, rate: "0.70", cap_hkd: "200.00", valid_from: 2026-01-01, valid_to: 2026-12-31}
  - id: commercial-partner
    name: No subsidy
"""


def hourly(
    hour: dt.datetime,
    gpu_seconds: str,
    revision: int,
    project_id: str = "hkgai-llm",
    gpu_model: str = "H800",
) -> HourlyTotal:
    return HourlyTotal(
        project_id=project_id,
        gpu_model=gpu_model,
        hour_start=hour,
        gpu_seconds=Decimal(gpu_seconds),
        util_gpu_seconds=Decimal(gpu_seconds) / 2,
        energy_wh=Decimal("1.5"),
        samples=revision,
        revision=revision,
    )


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    await store.migrate(database_url)
    connection = await asyncpg.connect(database_url)
    await catalog_files.apply_catalog(connection, catalog_files.parse_catalog(CATALOG))
    yield connection
    await connection.close()


async def invoice_doc(conn: asyncpg.Connection, invoice_id: str) -> dict:
    found = await store.load_invoice(conn, invoice_id)
    assert found is not None, invoice_id
    return found.document().model_dump()


async def test_migrations_are_recorded_and_apply_once(database_url: str) -> None:
    first = await store.migrate(database_url)
    second = await store.migrate(database_url)
    assert first == [version for version, _sql in store.migration_files()]
    assert second == []


async def test_applying_the_same_catalog_twice_changes_nothing(
    database_url: str, tmp_path: Path
) -> None:
    await store.migrate(database_url)
    path = tmp_path / "catalog.yaml"
    path.write_text(CATALOG)
    catalog = catalog_files.load_catalog_file(path)

    first = await catalog_files.apply_catalog(database_url, catalog)
    connection = await asyncpg.connect(database_url)
    try:
        stamps = await connection.fetch("SELECT * FROM projects ORDER BY project_id")
        second = await catalog_files.apply_catalog(connection, catalog)
        assert await connection.fetch("SELECT * FROM projects ORDER BY project_id") == stamps
        assert await catalog_files.read_catalog(connection) == catalog.model_copy(
            update={
                "rate_cards": sorted(catalog.rate_cards, key=lambda c: c.gpu_model),
                "projects": sorted(catalog.projects, key=lambda p: p.id),
            }
        )
    finally:
        await connection.close()

    assert sorted(first.added) == [
        "project commercial-partner",
        "project hkgai-llm",
        "rate card A100 from 2026-01-01",
        "rate card H800 from 2026-01-01",
    ]
    assert not second.any and second.unchanged == 4
    assert second.summary() == "catalog unchanged (4 entries)"

    # and a changed rate is reported as changed, a missing entry kept unless pruned
    path.write_text(CATALOG.replace('"13.00"', '"14.00"').replace("  - {gpu_model: H800", "  #"))
    third = await catalog_files.apply_catalog(database_url, catalog_files.load_catalog_file(path))
    assert (third.changed, third.removed) == (["rate card A100 from 2026-01-01"], [])
    pruned = await catalog_files.apply_catalog(
        database_url, catalog_files.load_catalog_file(path), prune=True
    )
    assert pruned.removed == ["rate card H800 from 2026-01-01"]


def test_a_bad_catalog_file_names_every_bad_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(CATALOG.replace('"26.00"', '"lots"').replace('rate: "0.70"', 'rate: "1.70"'))
    with pytest.raises(catalog_files.CatalogError) as caught:
        catalog_files.load_catalog_file(path)
    assert caught.value.errors[0].startswith("rate_cards[0].hkd_per_gpu_hour:")
    assert caught.value.errors[1].startswith("projects[0].subsidy.rate:")
    assert str(path) in str(caught.value)
    with pytest.raises(catalog_files.CatalogError, match="not valid YAML"):
        catalog_files.parse_catalog("currency: [HKD")
    with pytest.raises(catalog_files.CatalogError, match="cannot read"):
        catalog_files.load_catalog_file(tmp_path / "missing.yaml")


async def test_ledger_keeps_the_highest_revision_and_replay_changes_no_invoice(
    conn: asyncpg.Connection,
) -> None:
    hour = dt.datetime(2026, 11, 10, 2, tzinfo=UTC)
    # given revision 2 of an hour (1.5 GPU-hours) and another hour
    batch = [hourly(hour, "5400", 2), hourly(hour + dt.timedelta(hours=1), "3600", 1)]
    result = await service.apply_hourly_batch(conn, batch)
    assert result.hours_changed == 2
    assert result.invoices_changed == ["INV-2026-11-hkgai-llm"]
    before = await invoice_doc(conn, "INV-2026-11-hkgai-llm")
    stamp = await store.invoice_updated_at(conn, "INV-2026-11-hkgai-llm")
    # 2.5 h * 26.00 = 65.00; subsidy 45.50; cap left 154.50
    assert (before["gross_hkd"], before["subsidy_hkd"], before["net_hkd"]) == (
        "65.00",
        "45.50",
        "19.50",
    )
    assert before["subsidy_cap_remaining_hkd"] == "154.50"

    # when an older revision and a replay of the same batch arrive
    stale = await service.apply_hourly_batch(conn, [hourly(hour, "9999", 1)])
    replay = await service.apply_hourly_batch(conn, batch)
    # then nothing changes, not even the invoice's update time
    assert (stale.hours_changed, replay.hours_changed) == (0, 0)
    assert await invoice_doc(conn, "INV-2026-11-hkgai-llm") == before
    assert await store.invoice_updated_at(conn, "INV-2026-11-hkgai-llm") == stamp
    row = await conn.fetchrow(
        "SELECT gpu_seconds, revision FROM usage_hourly WHERE hour_start = $1", hour
    )
    assert (row["gpu_seconds"], row["revision"]) == (Decimal("5400"), 2)

    # and a higher revision replaces the total (not adds to it)
    await service.apply_hourly_batch(conn, [hourly(hour, "7200", 3)])
    after = await invoice_doc(conn, "INV-2026-11-hkgai-llm")
    assert (after["gross_hkd"], after["lines"][0]["gpu_hours"]) == ("78.00", "3.000000")


async def test_subsidy_cap_carries_into_later_months_when_an_earlier_one_grows(
    conn: asyncpg.Connection,
) -> None:
    # given December with 5 h (uncapped subsidy 91.00) before November has any usage
    await service.apply_hourly_batch(
        conn, [hourly(dt.datetime(2026, 12, 5, tzinfo=UTC), "18000", 1)]
    )
    assert (await invoice_doc(conn, "INV-2026-12-hkgai-llm"))["subsidy_hkd"] == "91.00"
    # when November gets 10 h (subsidy 182.00 of the 200.00 cap)
    await service.apply_hourly_batch(
        conn, [hourly(dt.datetime(2026, 11, 5, tzinfo=UTC), "36000", 1)]
    )
    # then December is recomputed with only 18.00 of cap left
    december = await invoice_doc(conn, "INV-2026-12-hkgai-llm")
    assert (december["subsidy_hkd"], december["net_hkd"]) == ("18.00", "112.00")
    assert "subsidy_capped" in december["flags"]


async def test_finalized_invoices_never_change_and_late_usage_becomes_an_adjustment(
    conn: asyncpg.Connection,
) -> None:
    november_hour = dt.datetime(2026, 11, 30, 15, tzinfo=UTC)  # HK 23:00, 30 November
    await service.apply_hourly_batch(conn, [hourly(november_hour, "3600", 1)])
    result = await service.finalize_period(conn, "2026-11")
    assert result.invoice_ids == ["INV-2026-11-hkgai-llm"] and not result.forced
    frozen = await invoice_doc(conn, "INV-2026-11-hkgai-llm")
    assert (frozen["status"], frozen["gross_hkd"], frozen["subsidy_hkd"]) == (
        "finalized",
        "26.00",
        "18.20",
    )

    # when the hour's total grows by half an hour after finalization
    await service.apply_hourly_batch(conn, [hourly(november_hour, "5400", 2)])
    # then November is unchanged and December carries an adjustment for November
    assert await invoice_doc(conn, "INV-2026-11-hkgai-llm") == frozen
    december = await invoice_doc(conn, "INV-2026-12-hkgai-llm")
    assert december["status"] == "draft"
    assert december["lines"] == [
        {
            "gpu_model": "H800",
            "gpu_hours": "0.500000",
            "rate_hkd": "26.00",
            "subsidised": True,
            "amount_hkd": "13.00",
            "adjustment_for_period": "2026-11",
        }
    ]
    # 13.00 * 0.70 = 9.10, cap left 200.00 - 18.20 - 9.10
    assert (december["subsidy_hkd"], december["subsidy_cap_remaining_hkd"]) == ("9.10", "172.70")

    # and once December is finalized, more late November usage goes to January
    await service.finalize_period(conn, "2026-12")
    await service.apply_hourly_batch(conn, [hourly(november_hour, "7200", 3)])
    january = await invoice_doc(conn, "INV-2027-01-hkgai-llm")
    assert [(ln["adjustment_for_period"], ln["gpu_hours"]) for ln in january["lines"]] == [
        ("2026-11", "0.500000")
    ]
    assert (await invoice_doc(conn, "INV-2026-12-hkgai-llm"))["gross_hkd"] == "13.00"

    # and the database itself refuses to change a finalized invoice
    with pytest.raises(asyncpg.IntegrityConstraintViolationError):
        await conn.execute(
            "UPDATE invoices SET net_hkd = 0 WHERE invoice_id = 'INV-2026-11-hkgai-llm'"
        )
    with pytest.raises(asyncpg.IntegrityConstraintViolationError):
        await conn.execute("DELETE FROM invoice_lines WHERE invoice_id = 'INV-2026-11-hkgai-llm'")
    with pytest.raises(service.PeriodAlreadyFinalized):
        await service.finalize_period(conn, "2026-11")


async def test_finalization_refuses_unpriced_usage_unless_forced(conn: asyncpg.Connection) -> None:
    hour = dt.datetime(2026, 11, 3, tzinfo=UTC)
    await service.apply_hourly_batch(
        conn,
        [
            hourly(hour, "3600", 1),
            hourly(hour, "3600", 1, project_id="unknown-lab", gpu_model="MI300X"),
        ],
    )
    stranger = await invoice_doc(conn, "INV-2026-11-unknown-lab")
    assert stranger["flags"] == ["unknown_project", "unpriced_usage"]
    assert stranger["lines"][0]["amount_hkd"] is None

    with pytest.raises(service.UnpricedUsage) as refused:
        await service.finalize_period(conn, "2026-11")
    assert refused.value.unpriced == {"INV-2026-11-unknown-lab": ["MI300X"]}
    assert (await invoice_doc(conn, "INV-2026-11-hkgai-llm"))["status"] == "draft"

    forced = await service.finalize_period(conn, "2026-11", force=True)
    assert forced.forced and len(forced.invoice_ids) == 2
    stranger = await invoice_doc(conn, "INV-2026-11-unknown-lab")
    assert stranger["status"] == "finalized"
    assert "finalized_with_unpriced_usage" in stranger["flags"]


async def test_a_catalog_change_recomputes_drafts_but_not_finalized_invoices(
    conn: asyncpg.Connection,
) -> None:
    await service.apply_hourly_batch(
        conn,
        [
            hourly(dt.datetime(2026, 10, 3, tzinfo=UTC), "3600", 1),
            hourly(dt.datetime(2026, 11, 3, tzinfo=UTC), "3600", 1),
        ],
    )
    await service.finalize_period(conn, "2026-10")
    cheaper = catalog_files.parse_catalog(CATALOG.replace('"26.00"', '"20.00"'))
    changes = await catalog_files.apply_catalog(conn, cheaper)
    assert changes.invoices_changed == ["INV-2026-11-hkgai-llm"]
    assert (await invoice_doc(conn, "INV-2026-10-hkgai-llm"))["gross_hkd"] == "26.00"
    assert (await invoice_doc(conn, "INV-2026-11-hkgai-llm"))["gross_hkd"] == "20.00"


async def test_bulk_daily_usage_matches_the_per_project_query(conn: asyncpg.Connection) -> None:
    # given usage around HK midnight, late usage of a finalized period, and hours of 1975 when
    # Hong Kong kept summer time (UTC+9: HK days start at 15:00 UTC, not 16:00)
    await service.apply_hourly_batch(
        conn,
        [
            hourly(dt.datetime(2026, 10, 31, 15, tzinfo=UTC), "3600", 1),
            hourly(dt.datetime(2026, 10, 31, 16, tzinfo=UTC), "1800", 1),
            hourly(dt.datetime(2026, 11, 4, 2, tzinfo=UTC), "900", 1, project_id="other"),
        ],
    )
    await service.finalize_period(conn, "2026-10", force=True)
    await service.apply_hourly_batch(
        conn, [hourly(dt.datetime(2026, 10, 31, 15, tzinfo=UTC), "5400", 2)]
    )
    ids = ["hkgai-llm", "other", "nobody"]
    fast = await store.unbilled_usage_many(conn, ids, per_day=True)
    assert {pid: await store.unbilled_usage(conn, pid, per_day=True) for pid in ids} == fast
    assert [hour.gpu_seconds for hour in fast["hkgai-llm"]] == [Decimal("1800"), Decimal("1800")]

    await service.apply_hourly_batch(
        conn,
        [
            hourly(dt.datetime(1975, 7, 1, 14, tzinfo=UTC), "60", 1, project_id="old"),
            hourly(dt.datetime(1975, 7, 1, 15, tzinfo=UTC), "120", 1, project_id="old"),
        ],
    )
    old = await store.unbilled_usage_many(conn, ["old"], per_day=True)
    assert old["old"] == await store.unbilled_usage(conn, "old", per_day=True)
    assert len(old["old"]) == 2  # two HK days, not one UTC+8 day


async def test_ingest_marks_projects_dirty_and_the_drain_rebuilds_their_drafts(
    conn: asyncpg.Connection,
) -> None:
    hour = dt.datetime(2026, 11, 10, 2, tzinfo=UTC)
    # when a batch is only ingested, the ledger changes and the project is marked, drafts wait
    assert await service.ingest_hourly_batch(conn, [hourly(hour, "3600", 1)]) == 1
    assert await service.ingest_hourly_batch(
        conn, [hourly(dt.datetime(2026, 12, 1, tzinfo=UTC), "3600", 1)]
    )
    assert await store.load_invoice(conn, "INV-2026-11-hkgai-llm") is None
    assert [(p, f) for p, f, _v in await store.dirty_projects(conn)] == [("hkgai-llm", "2026-11")]
    # a replay marks nothing
    async with conn.transaction():
        await store.clear_dirty(conn, await store.dirty_projects(conn))
    assert await service.ingest_hourly_batch(conn, [hourly(hour, "3600", 1)]) == 0
    assert not await store.has_dirty_projects(conn)

    # then the drain rebuilds the drafts from the earliest period marked and clears the mark
    assert await service.ingest_hourly_batch(conn, [hourly(hour, "7200", 2)]) == 1
    assert await service.drain_dirty_projects(conn) == [
        "INV-2026-11-hkgai-llm",
        "INV-2026-12-hkgai-llm",
    ]
    assert not await store.has_dirty_projects(conn)
    assert (await invoice_doc(conn, "INV-2026-11-hkgai-llm"))["gross_hkd"] == "52.00"
    assert await service.drain_dirty_projects(conn) == []

    # and a project marked again after the drain read its mark keeps the new mark
    assert await service.ingest_hourly_batch(conn, [hourly(hour, "9000", 3)]) == 1
    marks = await store.dirty_projects(conn)
    await service.ingest_hourly_batch(conn, [hourly(hour, "10800", 4)])
    async with conn.transaction():
        await store.clear_dirty(conn, marks)
    assert await store.has_dirty_projects(conn)


async def test_finalization_and_catalog_changes_first_rebuild_dirty_projects(
    conn: asyncpg.Connection,
) -> None:
    november = dt.datetime(2026, 11, 10, 2, tzinfo=UTC)
    await service.ingest_hourly_batch(conn, [hourly(november, "3600", 1)])
    # a catalog change rebuilds every draft and clears the marks
    cheaper = catalog_files.parse_catalog(CATALOG.replace('"26.00"', '"20.00"'))
    changes = await catalog_files.apply_catalog(conn, cheaper)
    assert changes.invoices_changed == ["INV-2026-11-hkgai-llm"]
    assert not await store.has_dirty_projects(conn)
    # a finalization never acts on drafts behind the ledger
    await service.ingest_hourly_batch(conn, [hourly(november, "7200", 2)])
    result = await service.finalize_period(conn, "2026-11")
    assert result.invoice_ids == ["INV-2026-11-hkgai-llm"]
    assert (await invoice_doc(conn, "INV-2026-11-hkgai-llm"))["gross_hkd"] == "40.00"
    assert not await store.has_dirty_projects(conn)
