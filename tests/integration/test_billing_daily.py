"""The ledger's daily sums (usage_daily) against the hourly rows they cover, and drafts built from
them against drafts built per hour, on a real PostgreSQL (one database per test)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.metering import HourlyTotal
from services.billing import catalog as catalog_files
from services.billing import domain, service, store

UTC = dt.UTC

CATALOG = """
currency: HKD
rate_cards:
  - {gpu_model: H800, hkd_per_gpu_hour: "26.00", effective_from: 2026-01-01}
  - {gpu_model: H800, hkd_per_gpu_hour: "20.00", effective_from: 2026-11-15}
  - {gpu_model: A100, hkd_per_gpu_hour: "13.00", effective_from: 2026-01-01}
projects:
  - id: hkgai-llm
    name: LLM
    subsidy: {scheme: AISS, rate: "0.70", cap_hkd: "300.00", valid_from: 2026-01-01, valid_to: 2026-11-20}
  - id: commercial-partner
    name: No subsidy
"""

# Hours whose HK dates differ from their UTC dates (HK midnight is 16:00 UTC), around a rate
# change (2026-11-15 HKT), the end of the subsidy window (2026-11-20) and a month boundary.
HOURS = [
    dt.datetime(2026, 11, 14, 15, tzinfo=UTC),  # 2026-11-14 23:00 HKT
    dt.datetime(2026, 11, 14, 16, tzinfo=UTC),  # 2026-11-15 00:00 HKT: the new rate
    dt.datetime(2026, 11, 14, 17, tzinfo=UTC),
    dt.datetime(2026, 11, 20, 15, tzinfo=UTC),  # last subsidised hour
    dt.datetime(2026, 11, 20, 16, tzinfo=UTC),  # 2026-11-21 HKT: no subsidy
    dt.datetime(2026, 11, 30, 15, tzinfo=UTC),  # November's last hour (HK)
    dt.datetime(2026, 11, 30, 16, tzinfo=UTC),  # December's first
]


def hourly(
    hour: dt.datetime,
    gpu_seconds: str | Decimal,
    revision: int,
    project_id: str = "hkgai-llm",
    gpu_model: str = "H800",
) -> HourlyTotal:
    return HourlyTotal(
        project_id=project_id,
        gpu_model=gpu_model,
        hour_start=hour,
        gpu_seconds=Decimal(gpu_seconds),
        util_gpu_seconds=Decimal(0),
        energy_wh=Decimal(0),
        samples=1,
        revision=revision,
    )


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    await store.migrate(database_url)
    connection = await asyncpg.connect(database_url)
    await catalog_files.apply_catalog(connection, catalog_files.parse_catalog(CATALOG))
    yield connection
    await connection.close()


DAILY_MISMATCHES = """
SELECT * FROM (
    SELECT project_id, gpu_model, (hour_start AT TIME ZONE 'Asia/Hong_Kong')::date AS hk_date,
           sum(gpu_seconds) AS gpu_seconds,
           (count(*) FILTER (WHERE gpu_seconds <> 0))::integer AS hours_used
    FROM usage_hourly GROUP BY 1, 2, 3
) hourly
FULL JOIN usage_daily daily USING (project_id, gpu_model, hk_date)
WHERE hourly.gpu_seconds IS DISTINCT FROM daily.gpu_seconds
   OR hourly.hours_used IS DISTINCT FROM daily.hours_used
"""


async def daily_mismatches(conn: asyncpg.Connection) -> list[dict]:
    return [dict(row) for row in await conn.fetch(DAILY_MISMATCHES)]


async def drafts_per_day_and_per_hour(
    conn: asyncpg.Connection, project_ids: list[str]
) -> tuple[list[domain.ComputedInvoice], list[domain.ComputedInvoice]]:
    """Every draft of the projects, built by the engine from the daily and from the hourly reads."""
    pricing = await store.load_pricing(conn)
    finalized = await store.finalized_periods(conn)
    stored = await store.invoice_subsidies_many(conn, project_ids)
    built: dict[bool, list[domain.ComputedInvoice]] = {}
    for per_day in (True, False):
        usage = await store.unbilled_usage_many(conn, project_ids, per_day=per_day)
        built[per_day] = [
            invoice
            for project_id in project_ids
            for invoice in service._rebuild_project(
                project_id, None, usage[project_id], stored[project_id], pricing, finalized
            )[1]
        ]
    return built[True], built[False]


async def test_daily_sums_follow_revisions_replays_and_hk_midnight(
    conn: asyncpg.Connection,
) -> None:
    # given hours on both sides of HK midnight, in one batch with a duplicate of lower revision
    batch = [hourly(hour, "3600", 1) for hour in HOURS] + [hourly(HOURS[0], "1", 0)]
    assert await service.ingest_hourly_batch(conn, batch) == len(HOURS)
    rows = await conn.fetch(
        "SELECT hk_date, gpu_seconds, hours_used FROM usage_daily ORDER BY hk_date"
    )
    assert [(r["hk_date"].isoformat(), r["gpu_seconds"], r["hours_used"]) for r in rows] == [
        ("2026-11-14", Decimal("3600"), 1),
        ("2026-11-15", Decimal("7200"), 2),
        ("2026-11-20", Decimal("3600"), 1),
        ("2026-11-21", Decimal("3600"), 1),
        ("2026-11-30", Decimal("3600"), 1),
        ("2026-12-01", Decimal("3600"), 1),
    ]
    # when the whole topic is replayed, an older revision arrives, and revisions go up and down
    assert await service.ingest_hourly_batch(conn, batch) == 0
    assert await service.ingest_hourly_batch(conn, [hourly(HOURS[1], "99999", 0)]) == 0
    assert await service.ingest_hourly_batch(conn, [hourly(HOURS[1], "5400.25", 2)]) == 1
    assert await service.ingest_hourly_batch(conn, [hourly(HOURS[2], "0", 2)]) == 1
    assert await service.ingest_hourly_batch(conn, [hourly(HOURS[0], "0", 2)]) == 1
    # then each day is the sum of its hours, and a day whose hours are all zero has none in use
    assert await daily_mismatches(conn) == []
    day = await conn.fetchrow(
        "SELECT gpu_seconds, hours_used FROM usage_daily WHERE hk_date = '2026-11-15'"
    )
    assert (day["gpu_seconds"], day["hours_used"]) == (Decimal("5400.25"), 1)
    usage = await store.unbilled_usage_many(conn, ["hkgai-llm"], per_day=True)
    assert [
        hour.hour_start.astimezone(domain.HONG_KONG).date().isoformat()
        for hour in usage["hkgai-llm"]
    ] == [
        "2026-11-15",
        "2026-11-20",
        "2026-11-21",
        "2026-11-30",
        "2026-12-01",
    ]
    # and the drafts built from days are those built from hours
    per_day, per_hour = await drafts_per_day_and_per_hour(conn, ["hkgai-llm"])
    assert per_day == per_hour
    assert {line.rate_hkd for invoice in per_day for line in invoice.lines} == {Decimal("20.00")}


async def test_late_revisions_of_a_finalized_period_are_read_per_hour(
    conn: asyncpg.Connection,
) -> None:
    # given November finalized with usage on both sides of the rate change
    await service.apply_hourly_batch(conn, [hourly(hour, "3600", 1) for hour in HOURS[:3]])
    await service.finalize_period(conn, "2026-11", force=True)
    # when one hour of a finalized day is revised up and another of the same day down by as much
    await service.ingest_hourly_batch(
        conn, [hourly(HOURS[1], "5400", 2), hourly(HOURS[2], "1800", 2)]
    )
    # then the day's total is unchanged but the hours still differ from what was billed: the
    # adjustment read per day equals the one read per hour (a zero line, as per hour)
    assert await daily_mismatches(conn) == []
    usage = await store.unbilled_usage_many(conn, ["hkgai-llm"], per_day=True)
    assert [(hour.hour_start, hour.gpu_seconds) for hour in usage["hkgai-llm"]] == [
        (dt.datetime(2026, 11, 14, 16, tzinfo=UTC), Decimal("0"))
    ]
    per_day, per_hour = await drafts_per_day_and_per_hour(conn, ["hkgai-llm"])
    assert per_day == per_hour
    assert [invoice.invoice_id for invoice in per_day] == ["INV-2026-12-hkgai-llm"]
    # and a late hour of the finalized period becomes an adjustment line at its own rate
    await service.apply_hourly_batch(conn, [hourly(HOURS[0], "7200", 2)])
    per_day, per_hour = await drafts_per_day_and_per_hour(conn, ["hkgai-llm"])
    assert per_day == per_hour
    december = await store.load_invoice(conn, "INV-2026-12-hkgai-llm")
    assert december is not None
    assert [
        (line.adjustment_for_period, line.rate_hkd, line.gpu_seconds) for line in december.lines
    ] == [
        ("2026-11", Decimal("20.00"), Decimal("0")),
        ("2026-11", Decimal("26.00"), Decimal("3600")),
    ]


async def test_concurrent_batches_of_one_day_keep_its_sum_exact(database_url: str) -> None:
    await store.migrate(database_url)
    first = await asyncpg.connect(database_url)
    second = await asyncpg.connect(database_url)
    try:
        # given a batch that holds revision 2 of an hour uncommitted
        await service.ingest_hourly_batch(first, [hourly(HOURS[1], "100", 1)])
        open_batch = first.transaction()
        await open_batch.start()
        await service.ingest_hourly_batch(first, [hourly(HOURS[1], "200", 2)])
        # when another batch revises the same hour and another hour of the same day meanwhile
        racing = asyncio.ensure_future(
            service.ingest_hourly_batch(
                second, [hourly(HOURS[1], "300", 3), hourly(HOURS[2], "50", 1)]
            )
        )
        await asyncio.sleep(0.2)
        assert not racing.done()  # waits for the hour's row
        await open_batch.commit()
        # then the racing batch's delta is taken from the row it replaced: the day is 300 + 50
        assert await racing == 2
        assert await daily_mismatches(first) == []
        assert await first.fetchval("SELECT gpu_seconds FROM usage_daily") == Decimal("350")
    finally:
        await first.close()
        await second.close()


async def test_the_migration_backfills_daily_sums_from_an_existing_ledger(
    database_url: str,
) -> None:
    # given a ledger written before usage_daily existed (rows of 1975, when HK kept summer time,
    # and around today's HK midnight)
    await store.migrate(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("DROP TABLE usage_daily")
        await conn.execute("DELETE FROM schema_migrations WHERE version = '0004_usage_daily'")
        hours = [
            *HOURS,
            dt.datetime(1975, 7, 1, 14, tzinfo=UTC),  # 1975-07-01 23:00 HKST (UTC+9)
            dt.datetime(1975, 7, 1, 15, tzinfo=UTC),  # 1975-07-02 00:00 HKST
        ]
        await conn.copy_records_to_table(
            "usage_hourly",
            records=[
                (project, "H800", hour, Decimal(index * 7 % 5) / 2, Decimal(0), Decimal(0), 1, 1)
                for index, hour in enumerate(hours)
                for project in ("hkgai-llm", "other")
            ],
            columns=[
                "project_id",
                "gpu_model",
                "hour_start",
                "gpu_seconds",
                "util_gpu_seconds",
                "energy_wh",
                "samples",
                "revision",
            ],
        )
        # when the migration runs
        assert await store.migrate(database_url) == ["0004_usage_daily"]
        # then every day holds the sum of its hours, and ingestion goes on from there
        assert await daily_mismatches(conn) == []
        assert (
            await conn.fetchval("SELECT count(*) FROM usage_daily WHERE hk_date < '2000-01-01'")
            == 4
        )
        await service.ingest_hourly_batch(conn, [hourly(HOURS[3], "10", 2, project_id="other")])
        assert await daily_mismatches(conn) == []
        # and rebuilding the sums (after a bulk load) finds nothing to change
        await store.rebuild_usage_daily(conn)
        assert await daily_mismatches(conn) == []
    finally:
        await conn.close()


# --- property: any sequence of batches keeps the daily sums and the drafts exact -------------

hour_strategy = st.sampled_from(HOURS)
batches = st.lists(
    st.lists(
        st.builds(
            hourly,
            hour=hour_strategy,
            gpu_seconds=st.decimals(min_value=0, max_value=36000, places=3),
            revision=st.integers(0, 4),
            project_id=st.sampled_from(["hkgai-llm", "commercial-partner", "unknown"]),
            gpu_model=st.sampled_from(["H800", "A100", "B200"]),
        ),
        min_size=1,
        max_size=12,
    ),
    min_size=1,
    max_size=5,
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batches=batches, finalize_after=st.integers(0, 5), replay=st.booleans())
def test_daily_sums_and_drafts_match_the_hourly_ledger_for_any_batches(
    database_url: str, batches: list[list[HourlyTotal]], finalize_after: int, replay: bool
) -> None:
    asyncio.run(_check_batches(database_url, batches, finalize_after, replay))


async def _check_batches(
    database_url: str, batches: list[list[HourlyTotal]], finalize_after: int, replay: bool
) -> None:
    await store.migrate(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "TRUNCATE usage_hourly, usage_daily, dirty_projects, billed_usage, invoice_lines,"
            " credited_usage, credit_note_lines, credit_notes, invoices, finalized_periods,"
            " billing_signals, document_numbers"
        )
        await catalog_files.apply_catalog(conn, catalog_files.parse_catalog(CATALOG))
        # given batches ingested (November finalized after some of them), then maybe replayed
        for index, batch in enumerate(batches):
            if index == finalize_after:
                await service.finalize_period(conn, "2026-11", force=True)
            await service.ingest_hourly_batch(conn, batch)
        if replay:
            for batch in batches:
                assert await service.ingest_hourly_batch(conn, batch) == 0
        # then the daily sums are the hourly rows', and drafts from days are drafts from hours
        assert await daily_mismatches(conn) == []
        project_ids = ["hkgai-llm", "commercial-partner", "unknown"]
        per_day, per_hour = await drafts_per_day_and_per_hour(conn, project_ids)
        assert per_day == per_hour
        # and draining the marks leaves drafts that a full rebuild does not change
        await service.drain_dirty_projects(conn)
        async with conn.transaction():
            await store.lock_writes(conn)
            assert await service.recompute_all_drafts(conn) == []
    finally:
        await conn.close()
