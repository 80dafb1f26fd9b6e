"""PostgreSQL adapter (asyncpg): migrations, the hourly ledger, catalog tables and invoices.

Functions take a connection so that callers decide the transaction; rows come back as domain values.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import Iterable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg

from schemas.catalog import BillTo, Project, RateCard, Subsidy
from schemas.metering import HourCompleteness, HourlyTotal, JobHourlyTotal
from services.billing.domain import (
    HONG_KONG,
    ComputedInvoice,
    ComputedLine,
    HourStatus,
    PeriodCompleteness,
    Pricing,
    UsageHour,
    period_bounds,
)
from services.common.db import RETRYABLE_DB_ERRORS as RETRYABLE_DB_ERRORS  # store.RETRYABLE_...
from services.common.db import apply_migrations
from services.common.retry import retry

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
MIGRATION_LOCK_ID = 0x6270_6D01  # pg advisory lock: one migrator at a time
WRITE_LOCK_ID = 0x6270_6D02  # serializes ledger, invoice and finalization writes

# A connection of its own or one lent by the pool (asyncpg hands out a proxy of the connection).
Connection: TypeAlias = "asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any]"


# --- migrations ----------------------------------------------------------------------------------


def migration_files() -> list[tuple[str, str]]:
    """(version, sql) in order; the version is the file name without .sql."""
    return [(path.stem, path.read_text()) for path in sorted(MIGRATIONS_DIR.glob("[0-9]*.sql"))]


async def migrate(dsn: str) -> list[str]:
    """Apply the migrations not yet recorded in schema_migrations; returns the versions applied."""
    conn = await asyncpg.connect(dsn)
    try:
        return await apply_migrations(
            conn, MIGRATIONS_DIR, "schema_migrations", MIGRATION_LOCK_ID, "billing"
        )
    finally:
        await conn.close()


async def migrate_with_retry(dsn: str, attempts: int = 60, delay_s: float = 1.0) -> list[str]:
    """migrate(), waiting for a database that is still starting."""
    return await retry(
        lambda: migrate(dsn),
        "migrations: database not ready",
        RETRYABLE_DB_ERRORS,
        attempts=attempts,
        initial_s=delay_s,
        factor=1.0,
    )


# --- connection pool -----------------------------------------------------------------------------


class Store:
    """A connection pool; opened by the composition root, never at import time."""

    def __init__(self, dsn: str, max_size: int = 5) -> None:
        self.dsn = dsn
        self.max_size = max_size
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> Store:
        self._pool = await asyncpg.create_pool(
            self.dsn, min_size=0, max_size=self.max_size, command_timeout=60
        )
        return self

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def acquire(self) -> Any:
        if self._pool is None:
            raise RuntimeError("store is not open")
        return self._pool.acquire()

    async def ping(self, timeout_s: float = 2.0) -> bool:
        try:
            async with asyncio.timeout(timeout_s), self.acquire() as conn:
                await conn.fetchval("SELECT 1")
            return True
        except (*RETRYABLE_DB_ERRORS, asyncpg.PostgresError):
            return False


async def lock_writes(conn: Connection) -> None:
    """Take the billing write lock for the current transaction."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", WRITE_LOCK_ID)


# --- ledger --------------------------------------------------------------------------------------


def latest_revisions(totals: Iterable[HourlyTotal]) -> list[HourlyTotal]:
    """Keep, per natural key, the record with the highest revision (one statement may not hit a row twice)."""
    best: dict[tuple[str, str, dt.datetime], HourlyTotal] = {}
    for total in totals:
        key = (total.project_id, total.gpu_model, total.hour_start)
        found = best.get(key)
        if found is None or total.revision > found.revision:
            best[key] = total
    return list(best.values())


# One statement, so atomic without a transaction of its own: upsert the hours (only a higher
# revision replaces a row), add each changed hour's delta (new minus old, from RETURNING OLD, which
# reads the row version the upsert replaced, even one committed concurrently) to its HK day, and,
# when $9, mark the projects whose usage changed dirty from the earliest usage period changed.
# Totals with deltas: a replay changes no hour, so it adds nothing. Day and mark rows are written in
# key order, one lock order for concurrent batches.
INGEST_HOURLY = """
WITH changed AS (
    INSERT INTO usage_hourly AS u (project_id, gpu_model, hour_start, gpu_seconds,
                                   util_gpu_seconds, energy_wh, samples, revision)
    SELECT project_id, gpu_model, hour_start, gpu_seconds::numeric, util_gpu_seconds::numeric,
           energy_wh::numeric, samples, revision
    FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[], $6::text[],
                $7::integer[], $8::bigint[])
        AS b(project_id, gpu_model, hour_start, gpu_seconds, util_gpu_seconds, energy_wh,
             samples, revision)
    ON CONFLICT (project_id, gpu_model, hour_start) DO UPDATE SET
        gpu_seconds = EXCLUDED.gpu_seconds,
        util_gpu_seconds = EXCLUDED.util_gpu_seconds,
        energy_wh = EXCLUDED.energy_wh,
        samples = EXCLUDED.samples,
        revision = EXCLUDED.revision,
        updated_at = now()
    WHERE u.revision < EXCLUDED.revision
    RETURNING new.project_id, new.gpu_model, new.hour_start,
              new.gpu_seconds - COALESCE(old.gpu_seconds, 0) AS seconds_delta,
              (new.gpu_seconds <> 0)::integer
                  - COALESCE((old.gpu_seconds <> 0)::integer, 0) AS hours_used_delta
),
days AS (
    INSERT INTO usage_daily AS d (project_id, gpu_model, hk_date, gpu_seconds, hours_used)
    SELECT project_id, gpu_model, (hour_start AT TIME ZONE 'Asia/Hong_Kong')::date,
           sum(seconds_delta), sum(hours_used_delta)
    FROM changed GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (project_id, gpu_model, hk_date) DO UPDATE SET
        gpu_seconds = d.gpu_seconds + EXCLUDED.gpu_seconds,
        hours_used = d.hours_used + EXCLUDED.hours_used
),
marks AS (
    INSERT INTO dirty_projects AS p (project_id, from_period)
    SELECT project_id, to_char(min(hour_start) AT TIME ZONE 'Asia/Hong_Kong', 'YYYY-MM')
    FROM changed WHERE $9::boolean GROUP BY 1 ORDER BY 1
    ON CONFLICT (project_id) DO UPDATE SET
        from_period = LEAST(p.from_period, EXCLUDED.from_period),
        version = p.version + 1,
        marked_at = now()
)
SELECT count(*) FROM changed
"""


async def ingest_hourly(
    conn: Connection, totals: Sequence[HourlyTotal], mark_dirty: bool = True
) -> int:
    """Upsert hourly totals into the ledger and its daily sums (and, with `mark_dirty`, mark the
    projects whose usage changed for the draft drainer) in one statement; returns the hours changed.
    """
    rows = latest_revisions(totals)
    if not rows:
        return 0
    changed: int = await conn.fetchval(
        INGEST_HOURLY,
        [r.project_id for r in rows],
        [r.gpu_model for r in rows],
        [r.hour_start for r in rows],
        # amounts as exact decimal text: asyncpg's binary numeric encoding costs more per value
        [str(r.gpu_seconds) for r in rows],
        [str(r.util_gpu_seconds) for r in rows],
        [str(r.energy_wh) for r in rows],
        [r.samples for r in rows],
        [r.revision for r in rows],
        mark_dirty,
    )
    return changed


async def upsert_hourly(conn: Connection, totals: Sequence[HourlyTotal]) -> int:
    """ingest_hourly() without dirty marks; returns the hours changed."""
    return await ingest_hourly(conn, totals, mark_dirty=False)


def _billed(project_filter: str) -> str:
    """Per (project, model, hour): what finalized invoices charged, less what credit notes
    released (those hours are unbilled again: the corrected charge goes on the next invoice)."""
    return f"""
    SELECT project_id, gpu_model, hour_start, sum(gpu_seconds) AS billed FROM (
        SELECT project_id, gpu_model, hour_start, gpu_seconds
        FROM billed_usage WHERE {project_filter}
        UNION ALL
        SELECT project_id, gpu_model, hour_start, -gpu_seconds
        FROM credited_usage WHERE {project_filter}
    ) charged GROUP BY 1, 2, 3"""


UNBILLED_USAGE = f"""
SELECT u.gpu_model, u.hour_start, u.gpu_seconds - COALESCE(b.billed, 0) AS unbilled
FROM usage_hourly u
LEFT JOIN ({_billed("project_id = $1")}) b USING (project_id, gpu_model, hour_start)
WHERE u.project_id = $1 AND u.gpu_seconds <> COALESCE(b.billed, 0)
ORDER BY u.hour_start, u.gpu_model
"""


# The same per Asia/Hong_Kong day, each day stamped with its first hour: rate, subsidy and period
# depend only on the HK date, so invoices come out identical from 24 times fewer rows.
UNBILLED_USAGE_DAILY = f"""
SELECT gpu_model, (date_trunc('day', hour_start AT TIME ZONE 'Asia/Hong_Kong')
                   AT TIME ZONE 'Asia/Hong_Kong') AS hour_start, sum(unbilled) AS unbilled
FROM ({UNBILLED_USAGE}) hourly
GROUP BY 1, 2 ORDER BY 2, 1
"""


async def unbilled_usage(
    conn: Connection, project_id: str, per_day: bool = False
) -> list[UsageHour]:
    """Per hour (or summed per HK day), the ledger's GPU-seconds not yet on a finalized invoice."""
    rows = await conn.fetch(UNBILLED_USAGE_DAILY if per_day else UNBILLED_USAGE, project_id)
    return [UsageHour(r["gpu_model"], r["hour_start"], r["unbilled"]) for r in rows]


# The same for many projects at once (drafts rebuilt in bulk).
UNBILLED_USAGE_MANY = f"""
SELECT u.project_id, u.gpu_model, u.hour_start, u.gpu_seconds - COALESCE(b.billed, 0) AS unbilled
FROM usage_hourly u
LEFT JOIN ({_billed("project_id = ANY($1::text[])")}) b USING (project_id, gpu_model, hour_start)
WHERE u.project_id = ANY($1::text[]) AND u.gpu_seconds <> COALESCE(b.billed, 0)
"""

UNBILLED_USAGE_MANY_HOURLY = f"{UNBILLED_USAGE_MANY} ORDER BY 1, 3, 2"

# The same per HK day, from usage_daily. Billed usage exists only for hours of finalized periods
# (finalizing P bills hours of P and late hours of earlier finalized periods), so a day of an open
# period is unbilled as a whole and is read from its daily row (when any of its hours has usage).
UNBILLED_DAILY_OPEN = """
SELECT project_id, gpu_model, hk_date, gpu_seconds AS unbilled
FROM usage_daily
WHERE project_id = ANY($1::text[]) AND hours_used > 0
"""

# With finalized periods ($2/$3: their first and end HK dates; $4/$5: the same as instants), their
# days are left out of the daily rows, and their hours are read from the ledger minus what was
# billed, per hour (a day's totals may agree while its hours differ), summed per HK day.
UNBILLED_DAILY_WITH_CLOSED = f"""
{UNBILLED_DAILY_OPEN}
  AND NOT EXISTS (SELECT 1 FROM unnest($2::date[], $3::date[]) AS c(first_day, end_day)
                  WHERE hk_date >= c.first_day AND hk_date < c.end_day)
UNION ALL
SELECT u.project_id, u.gpu_model, (u.hour_start AT TIME ZONE 'Asia/Hong_Kong')::date,
       sum(u.gpu_seconds - COALESCE(b.billed, 0))
FROM unnest($4::timestamptz[], $5::timestamptz[]) AS c(period_start, period_end)
JOIN usage_hourly u ON u.project_id = ANY($1::text[])
                   AND u.hour_start >= c.period_start AND u.hour_start < c.period_end
LEFT JOIN ({_billed("project_id = ANY($1::text[])")}) b USING (project_id, gpu_model, hour_start)
WHERE u.gpu_seconds <> COALESCE(b.billed, 0)
GROUP BY 1, 2, 3
"""


def _per_project(days_query: str) -> str:
    # One row per project with its days as arrays (by day, then model): far fewer rows to decode.
    return f"""
SELECT project_id, array_agg(gpu_model ORDER BY hk_date, gpu_model) AS gpu_models,
       array_agg(hk_date ORDER BY hk_date, gpu_model) AS hk_dates,
       array_agg(unbilled ORDER BY hk_date, gpu_model) AS unbilled
FROM ({days_query}) days
GROUP BY project_id
"""


UNBILLED_USAGE_MANY_DAILY = _per_project(UNBILLED_DAILY_OPEN)
UNBILLED_USAGE_MANY_DAILY_WITH_CLOSED = _per_project(UNBILLED_DAILY_WITH_CLOSED)

_hk_midnights: dict[dt.date, dt.datetime] = {}


def hk_midnight(day: dt.date) -> dt.datetime:
    """00:00 in Asia/Hong_Kong of `day`, as an aware UTC instant (memoized: days repeat)."""
    found = _hk_midnights.get(day)
    if found is None:
        found = dt.datetime(day.year, day.month, day.day, tzinfo=HONG_KONG).astimezone(dt.UTC)
        if len(_hk_midnights) >= 65536:
            _hk_midnights.clear()
        _hk_midnights[day] = found
    return found


async def unbilled_usage_many(
    conn: Connection, project_ids: Sequence[str], per_day: bool = False
) -> dict[str, list[UsageHour]]:
    """unbilled_usage() of many projects in one query: project -> its hours (or HK days, each
    stamped with its HK midnight)."""
    usage: dict[str, list[UsageHour]] = {project_id: [] for project_id in project_ids}
    if not project_ids:
        return usage
    if not per_day:
        for r in await conn.fetch(UNBILLED_USAGE_MANY_HOURLY, list(project_ids)):
            usage[r["project_id"]].append(UsageHour(r["gpu_model"], r["hour_start"], r["unbilled"]))
        return usage
    closed = sorted(await finalized_periods(conn))
    if closed:
        bounds = [period_bounds(period) for period in closed]
        rows = await conn.fetch(
            UNBILLED_USAGE_MANY_DAILY_WITH_CLOSED,
            list(project_ids),
            [start.astimezone(HONG_KONG).date() for start, _end in bounds],
            [end.astimezone(HONG_KONG).date() for _start, end in bounds],
            [start for start, _end in bounds],
            [end for _start, end in bounds],
        )
    else:
        rows = await conn.fetch(UNBILLED_USAGE_MANY_DAILY, list(project_ids))
    midnights = _hk_midnights
    for project_id, gpu_models, hk_dates, unbilled in rows:
        usage[project_id] = [
            UsageHour(gpu_model, midnights.get(day) or hk_midnight(day), gpu_seconds)
            for gpu_model, day, gpu_seconds in zip(gpu_models, hk_dates, unbilled, strict=True)
        ]
    return usage


REBUILD_USAGE_DAILY = """
INSERT INTO usage_daily AS d (project_id, gpu_model, hk_date, gpu_seconds, hours_used)
SELECT project_id, gpu_model, (hour_start AT TIME ZONE 'Asia/Hong_Kong')::date,
       sum(gpu_seconds), count(*) FILTER (WHERE gpu_seconds <> 0)
FROM usage_hourly
GROUP BY 1, 2, 3
ON CONFLICT (project_id, gpu_model, hk_date) DO UPDATE SET
    gpu_seconds = EXCLUDED.gpu_seconds, hours_used = EXCLUDED.hours_used
WHERE (d.gpu_seconds, d.hours_used) IS DISTINCT FROM (EXCLUDED.gpu_seconds, EXCLUDED.hours_used)
"""


async def rebuild_usage_daily(conn: Connection) -> None:
    """Recompute every daily sum from the ledger (as migration 0004 does); for bulk loads that
    bypass ingest_hourly(), run while nothing ingests (ingestion takes no write lock)."""
    await conn.execute(REBUILD_USAGE_DAILY)


async def usage_rows(
    conn: Connection,
    project_id: str,
    start: dt.datetime | None,
    end: dt.datetime | None,
    limit: int,
) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT gpu_model, hour_start, gpu_seconds, util_gpu_seconds, energy_wh, samples, revision"
        " FROM usage_hourly WHERE project_id = $1"
        " AND ($2::timestamptz IS NULL OR hour_start >= $2)"
        " AND ($3::timestamptz IS NULL OR hour_start < $3)"
        " ORDER BY hour_start, gpu_model LIMIT $4",
        project_id,
        start,
        end,
        limit,
    )


async def billable_project_ids(conn: Connection) -> list[str]:
    rows = await conn.fetch(
        "SELECT project_id FROM usage_daily UNION SELECT project_id FROM invoices ORDER BY 1"
    )
    return [row["project_id"] for row in rows]


# --- dirty projects (drafts behind the ledger) ---------------------------------------------------


async def dirty_projects(conn: Connection, limit: int | None = None) -> list[tuple[str, str, int]]:
    """(project_id, earliest usage period, version) of the projects marked dirty."""
    rows = await conn.fetch(
        "SELECT project_id, from_period, version FROM dirty_projects ORDER BY project_id LIMIT $1",
        limit,
    )
    return [(row["project_id"], row["from_period"], row["version"]) for row in rows]


async def has_dirty_projects(conn: Connection) -> bool:
    value: bool = await conn.fetchval("SELECT EXISTS (SELECT 1 FROM dirty_projects)")
    return value


async def clear_dirty(conn: Connection, marks: Sequence[tuple[str, str, int]]) -> None:
    """Delete the marks as read; a project marked again since (a new version) stays dirty."""
    if not marks:
        return
    await conn.execute(
        "DELETE FROM dirty_projects d USING unnest($1::text[], $2::bigint[]) AS x(project_id, version)"
        " WHERE d.project_id = x.project_id AND d.version = x.version",
        [project_id for project_id, _period, _version in marks],
        [version for _project_id, _period, version in marks],
    )


# --- catalog -------------------------------------------------------------------------------------


async def rate_cards(conn: Connection) -> list[RateCard]:
    rows = await conn.fetch(
        "SELECT gpu_model, hkd_per_gpu_hour, effective_from FROM rate_cards"
        " ORDER BY gpu_model, effective_from"
    )
    return [RateCard(**dict(row)) for row in rows]


async def projects(conn: Connection) -> list[Project]:
    rows = await conn.fetch("SELECT * FROM projects ORDER BY project_id")
    return [project_from_row(row) for row in rows]


def project_from_row(row: asyncpg.Record) -> Project:
    subsidy = None
    if row["subsidy_scheme"] is not None:
        subsidy = Subsidy(
            scheme=row["subsidy_scheme"],
            rate=row["subsidy_rate"],
            cap_hkd=row["subsidy_cap_hkd"],
            valid_from=row["subsidy_valid_from"],
            valid_to=row["subsidy_valid_to"],
        )
    bill_to = None if row["bill_to"] is None else BillTo.model_validate_json(row["bill_to"])
    return Project(
        id=row["project_id"],
        name=row["name"],
        subsidy=subsidy,
        bill_to=bill_to,
        on_cap_exhausted=row["on_cap_exhausted"],
        budget_hkd=row["budget_hkd"],
    )


async def load_pricing(conn: Connection) -> Pricing:
    return Pricing.of(await rate_cards(conn), await projects(conn))


async def upsert_rate_card(conn: Connection, card: RateCard) -> None:
    await conn.execute(
        "INSERT INTO rate_cards (gpu_model, effective_from, hkd_per_gpu_hour) VALUES ($1, $2, $3)"
        " ON CONFLICT (gpu_model, effective_from) DO UPDATE"
        " SET hkd_per_gpu_hour = EXCLUDED.hkd_per_gpu_hour, updated_at = now()",
        card.gpu_model,
        card.effective_from,
        card.hkd_per_gpu_hour,
    )


async def delete_rate_card(conn: Connection, card: RateCard) -> None:
    await conn.execute(
        "DELETE FROM rate_cards WHERE gpu_model = $1 AND effective_from = $2",
        card.gpu_model,
        card.effective_from,
    )


async def upsert_project(conn: Connection, project: Project) -> None:
    subsidy = project.subsidy
    await conn.execute(
        "INSERT INTO projects (project_id, name, subsidy_scheme, subsidy_rate, subsidy_cap_hkd,"
        " subsidy_valid_from, subsidy_valid_to, bill_to, on_cap_exhausted, budget_hkd)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10)"
        " ON CONFLICT (project_id) DO UPDATE SET name = EXCLUDED.name,"
        " subsidy_scheme = EXCLUDED.subsidy_scheme, subsidy_rate = EXCLUDED.subsidy_rate,"
        " subsidy_cap_hkd = EXCLUDED.subsidy_cap_hkd, subsidy_valid_from = EXCLUDED.subsidy_valid_from,"
        " subsidy_valid_to = EXCLUDED.subsidy_valid_to, bill_to = EXCLUDED.bill_to,"
        " on_cap_exhausted = EXCLUDED.on_cap_exhausted, budget_hkd = EXCLUDED.budget_hkd,"
        " updated_at = now()",
        project.id,
        project.name,
        subsidy.scheme if subsidy else None,
        subsidy.rate if subsidy else None,
        subsidy.cap_hkd if subsidy else None,
        subsidy.valid_from if subsidy else None,
        subsidy.valid_to if subsidy else None,
        None if project.bill_to is None else project.bill_to.model_dump_json(),
        project.on_cap_exhausted,
        project.budget_hkd,
    )


async def delete_project(conn: Connection, project_id: str) -> None:
    await conn.execute("DELETE FROM projects WHERE project_id = $1", project_id)


# --- periods -------------------------------------------------------------------------------------


async def finalized_periods(conn: Connection) -> frozenset[str]:
    rows = await conn.fetch("SELECT period FROM finalized_periods")
    return frozenset(row["period"] for row in rows)


async def insert_finalized_period(conn: Connection, period: str, forced: bool) -> None:
    await conn.execute(
        "INSERT INTO finalized_periods (period, forced) VALUES ($1, $2)", period, forced
    )


# --- invoices ------------------------------------------------------------------------------------


# Each invoice's subsidy less what credit notes returned to the cap (docs/contracts.md §5).
NET_SUBSIDIES = """
SELECT i.project_id, i.period, i.status, i.subsidy_hkd - COALESCE(c.credited, 0) AS subsidy_hkd
FROM invoices i
LEFT JOIN (SELECT invoice_id, sum(subsidy_hkd) AS credited FROM credit_notes GROUP BY 1) c
    USING (invoice_id)
"""


async def invoice_subsidies_many(
    conn: Connection, project_ids: Sequence[str]
) -> dict[str, dict[str, tuple[str, Decimal]]]:
    """project -> period -> (status, subsidy_hkd less what credit notes returned) of the
    projects' stored invoices."""
    found: dict[str, dict[str, tuple[str, Decimal]]] = {
        project_id: {} for project_id in project_ids
    }
    if not project_ids:
        return found
    rows = await conn.fetch(
        f"{NET_SUBSIDIES} WHERE i.project_id = ANY($1::text[])", list(project_ids)
    )
    for row in rows:
        found[row["project_id"]][row["period"]] = (row["status"], row["subsidy_hkd"])
    return found


async def load_invoices(
    conn: Connection,
    *,
    invoice_ids: Sequence[str] | None = None,
    period: str | None = None,
    project_id: str | None = None,
    status: str | None = None,
    unpublished_only: bool = False,
) -> list[ComputedInvoice]:
    heads = await conn.fetch(
        "SELECT * FROM invoices WHERE ($1::text[] IS NULL OR invoice_id = ANY($1))"
        " AND ($2::text IS NULL OR period = $2) AND ($3::text IS NULL OR project_id = $3)"
        " AND ($4::text IS NULL OR status = $4)"
        " AND (NOT $5 OR (status = 'finalized' AND published_at IS NULL))"
        " ORDER BY period, project_id",
        None if invoice_ids is None else list(invoice_ids),
        period,
        project_id,
        status,
        unpublished_only,
    )
    if not heads:
        return []
    line_rows = await conn.fetch(
        "SELECT * FROM invoice_lines WHERE invoice_id = ANY($1) ORDER BY invoice_id, line_no",
        [head["invoice_id"] for head in heads],
    )
    lines: dict[str, list[ComputedLine]] = {head["invoice_id"]: [] for head in heads}
    for row in line_rows:
        lines[row["invoice_id"]].append(
            ComputedLine(
                gpu_model=row["gpu_model"],
                rate_hkd=row["rate_hkd"],
                subsidised=row["subsidised"],
                adjustment_for_period=row["adjustment_for_period"],
                gpu_seconds=row["gpu_seconds"],
                amount_hkd=row["amount_hkd"],
            )
        )
    return [
        ComputedInvoice(
            invoice_id=head["invoice_id"],
            project_id=head["project_id"],
            period=head["period"],
            status=head["status"],
            lines=tuple(lines[head["invoice_id"]]),
            gross_hkd=head["gross_hkd"],
            subsidy_hkd=head["subsidy_hkd"],
            net_hkd=head["net_hkd"],
            subsidy_cap_remaining_hkd=head["subsidy_cap_remaining_hkd"],
            flags=tuple(head["flags"]),
            invoice_number=head["invoice_number"],
            issued_on=head["issued_on"],
            due_on=head["due_on"],
        )
        for head in heads
    ]


async def load_invoice(conn: Connection, invoice_id: str) -> ComputedInvoice | None:
    found = await load_invoices(conn, invoice_ids=[invoice_id])
    return found[0] if found else None


async def save_draft_invoices(
    conn: Connection, invoices: Sequence[ComputedInvoice]
) -> list[ComputedInvoice]:
    """Write each draft that differs from the stored one, with a few statements; returns those
    that changed. A finalized invoice is never overwritten."""
    if not invoices:
        return []
    stored = {
        found.invoice_id: found
        for found in await load_invoices(conn, invoice_ids=[i.invoice_id for i in invoices])
    }
    changed = []
    for invoice in invoices:
        current = stored.get(invoice.invoice_id)
        if current == invoice:
            continue
        if current is not None and current.status == "finalized":
            raise RuntimeError(f"invoice {invoice.invoice_id} is finalized")  # caller bug
        changed.append(invoice)
    if not changed:
        return []
    await conn.executemany(
        "INSERT INTO invoices (invoice_id, project_id, period, status, gross_hkd, subsidy_hkd,"
        " net_hkd, subsidy_cap_remaining_hkd, flags, has_unpriced_usage)"
        " VALUES ($1, $2, $3, 'draft', $4, $5, $6, $7, $8, $9)"
        " ON CONFLICT (invoice_id) DO UPDATE SET gross_hkd = EXCLUDED.gross_hkd,"
        " subsidy_hkd = EXCLUDED.subsidy_hkd, net_hkd = EXCLUDED.net_hkd,"
        " subsidy_cap_remaining_hkd = EXCLUDED.subsidy_cap_remaining_hkd, flags = EXCLUDED.flags,"
        " has_unpriced_usage = EXCLUDED.has_unpriced_usage, updated_at = now()",
        [
            (
                invoice.invoice_id,
                invoice.project_id,
                invoice.period,
                invoice.gross_hkd,
                invoice.subsidy_hkd,
                invoice.net_hkd,
                invoice.subsidy_cap_remaining_hkd,
                list(invoice.flags),
                invoice.has_unpriced_usage,
            )
            for invoice in changed
        ],
    )
    changed_ids = [invoice.invoice_id for invoice in changed]
    await conn.execute("DELETE FROM invoice_lines WHERE invoice_id = ANY($1::text[])", changed_ids)
    lines = [
        (invoice.invoice_id, line_no, line)
        for invoice in changed
        for line_no, line in enumerate(invoice.lines, start=1)
    ]
    if lines:
        await conn.execute(
            "INSERT INTO invoice_lines (invoice_id, line_no, gpu_model, gpu_seconds, rate_hkd,"
            " subsidised, amount_hkd, adjustment_for_period)"
            " SELECT * FROM unnest($1::text[], $2::integer[], $3::text[], $4::numeric[],"
            " $5::numeric[], $6::boolean[], $7::numeric[], $8::text[])",
            [invoice_id for invoice_id, _no, _line in lines],
            [line_no for _id, line_no, _line in lines],
            [line.gpu_model for _id, _no, line in lines],
            [line.gpu_seconds for _id, _no, line in lines],
            [line.rate_hkd for _id, _no, line in lines],
            [line.subsidised for _id, _no, line in lines],
            [line.amount_hkd for _id, _no, line in lines],
            [line.adjustment_for_period for _id, _no, line in lines],
        )
    return changed


async def finalize_invoice(
    conn: Connection,
    invoice: ComputedInvoice,
    billed: Sequence[tuple[UsageHour, int]],
    extra_flags: Sequence[str],
    numbering: tuple[str, dt.date, dt.date],
) -> None:
    """Freeze a draft with its number, issue and due dates, and record, per hour, the GPU-seconds
    it charged and on which of its lines (1-based)."""
    await conn.executemany(
        "INSERT INTO billed_usage (invoice_id, project_id, gpu_model, hour_start, gpu_seconds,"
        " line_no) VALUES ($1, $2, $3, $4, $5, $6)",
        [
            (
                invoice.invoice_id,
                invoice.project_id,
                hour.gpu_model,
                hour.hour_start,
                hour.gpu_seconds,
                line_no,
            )
            for hour, line_no in billed
        ],
    )
    number, issued_on, due_on = numbering
    await conn.execute(
        "UPDATE invoices SET status = 'finalized', finalized_at = now(), updated_at = now(),"
        " flags = flags || $2::text[], invoice_number = $3, issued_on = $4, due_on = $5"
        " WHERE invoice_id = $1 AND status = 'draft'",
        invoice.invoice_id,
        list(extra_flags),
        number,
        issued_on,
        due_on,
    )


async def mark_published(conn: Connection, invoice_id: str) -> None:
    await conn.execute(
        "UPDATE invoices SET published_at = now() WHERE invoice_id = $1 AND published_at IS NULL",
        invoice_id,
    )


async def invoice_updated_at(conn: Connection, invoice_id: str) -> dt.datetime | None:
    value: dt.datetime | None = await conn.fetchval(
        "SELECT updated_at FROM invoices WHERE invoice_id = $1", invoice_id
    )
    return value


async def count_unpriced_drafts(conn: Connection) -> int:
    value: int = await conn.fetchval(
        "SELECT count(*) FROM invoices WHERE status = 'draft' AND has_unpriced_usage"
    )
    return value


async def subsidy_used_through(conn: Connection, project_id: str, period: str) -> Decimal:
    """Sum of the subsidy of a project's invoices up to and including `period`, less what credit
    notes returned."""
    value: Decimal = await conn.fetchval(
        f"SELECT COALESCE(sum(subsidy_hkd), 0) FROM ({NET_SUBSIDIES}) n"
        " WHERE project_id = $1 AND period <= $2",
        project_id,
        period,
    )
    return value


# --- billing signals (outbox of billing.signals.v1) ----------------------------------------------


async def subsidy_usage_rows(conn: Connection) -> list[asyncpg.Record]:
    """Per subsidised project: scheme, cap and the subsidy of all its invoices, drafts included."""
    return await conn.fetch(
        "SELECT p.project_id, p.subsidy_scheme, p.subsidy_cap_hkd,"
        " COALESCE(sum(i.subsidy_hkd), 0) AS used_hkd"
        f" FROM projects p LEFT JOIN ({NET_SUBSIDIES}) i USING (project_id)"
        " WHERE p.subsidy_scheme IS NOT NULL"
        " GROUP BY p.project_id, p.subsidy_scheme, p.subsidy_cap_hkd ORDER BY p.project_id"
    )


async def usage_days(
    conn: Connection, project_ids: Sequence[str], first_day: dt.date, end_day: dt.date
) -> dict[str, list[tuple[str, dt.date, Decimal]]]:
    """project -> (gpu_model, HK date, gpu_seconds) of its usage on days [first_day, end_day)."""
    found: dict[str, list[tuple[str, dt.date, Decimal]]] = {p: [] for p in project_ids}
    rows = await conn.fetch(
        "SELECT project_id, gpu_model, hk_date, gpu_seconds FROM usage_daily"
        " WHERE project_id = ANY($1::text[]) AND hk_date >= $2 AND hk_date < $3",
        list(project_ids),
        first_day,
        end_day,
    )
    for row in rows:
        found[row["project_id"]].append((row["gpu_model"], row["hk_date"], row["gpu_seconds"]))
    return found


async def unpriced_usage_rows(conn: Connection) -> list[asyncpg.Record]:
    """Per (GPU model, open invoice period): unpriced GPU-seconds and the projects that used them."""
    return await conn.fetch(
        "SELECT l.gpu_model, i.period, sum(l.gpu_seconds) AS gpu_seconds,"
        " array_agg(DISTINCT i.project_id ORDER BY i.project_id) AS projects"
        " FROM invoice_lines l JOIN invoices i USING (invoice_id)"
        " WHERE l.rate_hkd IS NULL AND i.status = 'draft'"
        " GROUP BY l.gpu_model, i.period ORDER BY 1, 2"
    )


async def signal_payloads(conn: Connection) -> dict[str, tuple[str, str]]:
    """key -> (kind, payload JSON text) of every stored signal."""
    rows = await conn.fetch("SELECT key, kind, payload::text AS payload FROM billing_signals")
    return {row["key"]: (row["kind"], row["payload"]) for row in rows}


async def upsert_signals(
    conn: Connection, signals: Sequence[tuple[str, str, str]], as_of: dt.datetime
) -> int:
    """(key, kind, payload JSON) rows; a changed payload becomes a new, unpublished version."""
    if not signals:
        return 0
    changed = await conn.fetch(
        "INSERT INTO billing_signals AS s (key, kind, payload, as_of)"
        " SELECT key, kind, payload::jsonb, $4 FROM unnest($1::text[], $2::text[], $3::text[])"
        "   AS t(key, kind, payload)"
        " ON CONFLICT (key) DO UPDATE SET payload = EXCLUDED.payload, as_of = EXCLUDED.as_of,"
        " version = s.version + 1 WHERE s.payload IS DISTINCT FROM EXCLUDED.payload"
        " RETURNING key",
        [key for key, _kind, _payload in signals],
        [kind for _key, kind, _payload in signals],
        [payload for _key, _kind, payload in signals],
        as_of,
    )
    return len(changed)


async def pending_signals(conn: Connection, limit: int = 1000) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT key, payload::text AS payload, as_of, version FROM billing_signals"
        " WHERE version > published_version ORDER BY key LIMIT $1",
        limit,
    )


async def mark_signal_published(conn: Connection, key: str, version: int) -> None:
    await conn.execute(
        "UPDATE billing_signals SET published_version = GREATEST(published_version, $2)"
        " WHERE key = $1",
        key,
        version,
    )


# --- hour completeness (metering.completeness.v1) ------------------------------------------------


async def upsert_completeness(conn: Connection, records: Sequence[HourCompleteness]) -> int:
    """Keep the highest revision per hour; returns how many hours changed."""
    best: dict[dt.datetime, HourCompleteness] = {}
    for record in records:
        hour = record.hour_start.astimezone(dt.UTC)
        if hour not in best or record.revision > best[hour].revision:
            best[hour] = record
    if not best:
        return 0
    rows = list(best.values())
    changed = await conn.fetch(
        "INSERT INTO hour_completeness AS c"
        " (hour_start, nodes_online, nodes_through, missing_nodes, complete, revision)"
        " SELECT h, o, t, ARRAY(SELECT jsonb_array_elements_text(m::jsonb)), c, r"
        " FROM unnest($1::timestamptz[], $2::integer[], $3::integer[], $4::text[],"
        "             $5::boolean[], $6::bigint[]) AS x(h, o, t, m, c, r)"
        " ON CONFLICT (hour_start) DO UPDATE SET nodes_online = EXCLUDED.nodes_online,"
        " nodes_through = EXCLUDED.nodes_through, missing_nodes = EXCLUDED.missing_nodes,"
        " complete = EXCLUDED.complete, revision = EXCLUDED.revision, updated_at = now()"
        " WHERE c.revision < EXCLUDED.revision RETURNING hour_start",
        [r.hour_start for r in rows],
        [r.nodes_online for r in rows],
        [r.nodes_through for r in rows],
        [json.dumps(r.missing_nodes) for r in rows],
        [r.complete for r in rows],
        [r.revision for r in rows],
    )
    return len(changed)


async def period_completeness(conn: Connection, period: str) -> PeriodCompleteness:
    """Every hour of `period` with usage, with metering's completeness record when there is one."""
    start, end = period_bounds(period)
    rows = await conn.fetch(
        "SELECT u.hour_start, c.complete, c.nodes_online, c.nodes_through, c.missing_nodes"
        " FROM (SELECT DISTINCT hour_start FROM usage_hourly"
        "       WHERE hour_start >= $1 AND hour_start < $2 AND gpu_seconds > 0) u"
        " LEFT JOIN hour_completeness c USING (hour_start) ORDER BY u.hour_start",
        start,
        end,
    )
    return PeriodCompleteness(
        period,
        tuple(
            HourStatus(
                hour_start=row["hour_start"],
                complete=row["complete"],
                nodes_online=row["nodes_online"],
                nodes_through=row["nodes_through"],
                missing_nodes=tuple(row["missing_nodes"] or ()),
            )
            for row in rows
        ),
    )


# --- document numbers, credit notes, audit trail -------------------------------------------------


async def next_document_number(conn: Connection, kind: str, year: int) -> int:
    """The next number of `kind` ('invoice' or 'credit_note') in `year`: gapless, because the
    counter row is incremented in the caller's transaction (a rollback gives the number back) and
    stays locked until it ends."""
    value: int = await conn.fetchval(
        "INSERT INTO document_numbers AS d (kind, year, last) VALUES ($1, $2, 1)"
        " ON CONFLICT (kind, year) DO UPDATE SET last = d.last + 1 RETURNING last",
        kind,
        year,
    )
    return value


async def finalized_line_numbers(conn: Connection, invoice_id: str) -> dict[int, list[UsageHour]]:
    """line_no -> the hours a finalized invoice charged on that line (empty when the invoice
    predates line numbers on billed hours)."""
    rows = await conn.fetch(
        "SELECT line_no, gpu_model, hour_start, gpu_seconds FROM billed_usage"
        " WHERE invoice_id = $1 AND line_no IS NOT NULL ORDER BY line_no, hour_start, gpu_model",
        invoice_id,
    )
    found: dict[int, list[UsageHour]] = {}
    for row in rows:
        found.setdefault(row["line_no"], []).append(
            UsageHour(row["gpu_model"], row["hour_start"], row["gpu_seconds"])
        )
    return found


async def billed_hours(conn: Connection, invoice_id: str) -> list[UsageHour]:
    rows = await conn.fetch(
        "SELECT gpu_model, hour_start, gpu_seconds FROM billed_usage WHERE invoice_id = $1"
        " ORDER BY hour_start, gpu_model",
        invoice_id,
    )
    return [UsageHour(r["gpu_model"], r["hour_start"], r["gpu_seconds"]) for r in rows]


async def credited_lines(conn: Connection, invoice_id: str) -> dict[int, str]:
    """line_no -> the credit note that credited it, for one invoice."""
    rows = await conn.fetch(
        "SELECT line_no, credit_note_id FROM credit_note_lines WHERE invoice_id = $1", invoice_id
    )
    return {row["line_no"]: row["credit_note_id"] for row in rows}


async def credited_subsidy(conn: Connection, invoice_id: str) -> Decimal:
    value: Decimal = await conn.fetchval(
        "SELECT COALESCE(sum(subsidy_hkd), 0) FROM credit_notes WHERE invoice_id = $1", invoice_id
    )
    return value


async def insert_credit_note(
    conn: Connection,
    note: dict[str, Any],
    lines: Sequence[dict[str, Any]],
    released: Sequence[UsageHour],
) -> None:
    await conn.execute(
        "INSERT INTO credit_notes (credit_note_id, credit_note_number, invoice_id, project_id,"
        " period, issued_on, reason, gross_hkd, subsidy_hkd, net_hkd, created_by)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        note["credit_note_id"],
        note["credit_note_number"],
        note["invoice_id"],
        note["project_id"],
        note["period"],
        note["issued_on"],
        note["reason"],
        note["gross_hkd"],
        note["subsidy_hkd"],
        note["net_hkd"],
        note["created_by"],
    )
    await conn.executemany(
        "INSERT INTO credit_note_lines (credit_note_id, invoice_id, line_no, gpu_model,"
        " gpu_seconds, rate_hkd, subsidised, amount_hkd, adjustment_for_period)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        [
            (
                note["credit_note_id"],
                note["invoice_id"],
                line["line_no"],
                line["gpu_model"],
                line["gpu_seconds"],
                line["rate_hkd"],
                line["subsidised"],
                line["amount_hkd"],
                line["adjustment_for_period"],
            )
            for line in lines
        ],
    )
    await conn.executemany(
        "INSERT INTO credited_usage (credit_note_id, invoice_id, project_id, gpu_model,"
        " hour_start, gpu_seconds) VALUES ($1, $2, $3, $4, $5, $6)",
        [
            (
                note["credit_note_id"],
                note["invoice_id"],
                note["project_id"],
                hour.gpu_model,
                hour.hour_start,
                hour.gpu_seconds,
            )
            for hour in released
        ],
    )


async def credit_note_rows(
    conn: Connection,
    *,
    credit_note_id: str | None = None,
    invoice_id: str | None = None,
    period: str | None = None,
    project_id: str | None = None,
) -> list[tuple[asyncpg.Record, list[asyncpg.Record]]]:
    """Credit notes (head, lines) matching every filter given, oldest first."""
    heads = await conn.fetch(
        "SELECT c.*, i.invoice_number FROM credit_notes c JOIN invoices i USING (invoice_id)"
        " WHERE ($1::text IS NULL OR c.credit_note_id = $1)"
        " AND ($2::text IS NULL OR c.invoice_id = $2) AND ($3::text IS NULL OR c.period = $3)"
        " AND ($4::text IS NULL OR c.project_id = $4) ORDER BY c.created_at, c.credit_note_id",
        credit_note_id,
        invoice_id,
        period,
        project_id,
    )
    if not heads:
        return []
    line_rows = await conn.fetch(
        "SELECT * FROM credit_note_lines WHERE credit_note_id = ANY($1::text[])"
        " ORDER BY credit_note_id, line_no",
        [head["credit_note_id"] for head in heads],
    )
    lines: dict[str, list[asyncpg.Record]] = {head["credit_note_id"]: [] for head in heads}
    for row in line_rows:
        lines[row["credit_note_id"]].append(row)
    return [(head, lines[head["credit_note_id"]]) for head in heads]


async def record_audit(
    conn: Connection, actor: str, action: str, subject: str | None, details: dict[str, Any]
) -> None:
    """Append one entry to the audit trail (in the caller's transaction: it is kept exactly
    when the action it records is)."""
    await conn.execute(
        "INSERT INTO audit_log (actor, action, subject, details) VALUES ($1, $2, $3, $4::jsonb)",
        actor,
        action,
        subject,
        json.dumps(details, default=str, ensure_ascii=False),
    )


async def audit_rows(
    conn: Connection,
    *,
    action: str | None = None,
    since: dt.datetime | None = None,
    before_id: int | None = None,
    limit: int = 100,
) -> list[asyncpg.Record]:
    """Audit entries, newest first; `before_id` pages back."""
    return await conn.fetch(
        "SELECT audit_id, at, actor, action, subject, details::text AS details FROM audit_log"
        " WHERE ($1::text IS NULL OR action = $1) AND ($2::timestamptz IS NULL OR at >= $2)"
        " AND ($3::bigint IS NULL OR audit_id < $3) ORDER BY audit_id DESC LIMIT $4",
        action,
        since,
        before_id,
        limit,
    )


# --- per-job usage -------------------------------------------------------------------------------


async def upsert_job_hours(conn: Connection, totals: Sequence[JobHourlyTotal]) -> int:
    """Upsert per-job hourly totals, each only to a higher revision; returns the rows changed."""
    latest: dict[tuple[str, str, str, dt.datetime], JobHourlyTotal] = {}
    for total in totals:
        key = (total.project_id, total.job_id or "", total.gpu_model, total.hour_start)
        if key not in latest or latest[key].revision < total.revision:
            latest[key] = total
    if not latest:
        return 0
    rows = list(latest.values())
    result: str = await conn.execute(
        "INSERT INTO usage_jobs_hourly AS u (project_id, job_id, gpu_model, hour_start,"
        " gpu_seconds, util_gpu_seconds, idle_gpu_seconds, energy_wh, nodes, samples, revision)"
        " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[],"
        " $5::numeric[], $6::numeric[], $7::numeric[], $8::numeric[], $9::integer[],"
        " $10::integer[], $11::bigint[])"
        " ON CONFLICT (project_id, job_id, gpu_model, hour_start) DO UPDATE SET"
        " gpu_seconds = EXCLUDED.gpu_seconds, util_gpu_seconds = EXCLUDED.util_gpu_seconds,"
        " idle_gpu_seconds = EXCLUDED.idle_gpu_seconds, energy_wh = EXCLUDED.energy_wh,"
        " nodes = EXCLUDED.nodes, samples = EXCLUDED.samples, revision = EXCLUDED.revision,"
        " updated_at = now() WHERE u.revision < EXCLUDED.revision",
        [t.project_id for t in rows],
        [t.job_id or "" for t in rows],
        [t.gpu_model for t in rows],
        [t.hour_start for t in rows],
        [t.gpu_seconds for t in rows],
        [t.util_gpu_seconds for t in rows],
        [t.idle_gpu_seconds for t in rows],
        [t.energy_wh for t in rows],
        [t.nodes for t in rows],
        [t.samples for t in rows],
        [t.revision for t in rows],
    )
    return int(result.rsplit(" ", 1)[-1])


async def job_days(
    conn: Connection, project_ids: Sequence[str] | None, start: dt.datetime, end: dt.datetime
) -> list[asyncpg.Record]:
    """Per (project, job, model, Hong Kong date) in [start, end): GPU-, utilized and idle
    GPU-seconds, energy, hours with usage, first and last hour; all projects when None."""
    return await conn.fetch(
        "SELECT project_id, job_id, gpu_model,"
        " (hour_start AT TIME ZONE 'Asia/Hong_Kong')::date AS hk_date,"
        " sum(gpu_seconds) AS gpu_seconds, sum(util_gpu_seconds) AS util_gpu_seconds,"
        " sum(idle_gpu_seconds) AS idle_gpu_seconds, sum(energy_wh) AS energy_wh,"
        " max(nodes) AS nodes, min(hour_start) AS first_hour, max(hour_start) AS last_hour"
        " FROM usage_jobs_hourly"
        " WHERE ($1::text[] IS NULL OR project_id = ANY($1)) AND hour_start >= $2"
        " AND hour_start < $3 GROUP BY 1, 2, 3, 4",
        None if project_ids is None else list(project_ids),
        start,
        end,
    )


async def metered_jobs(
    conn: Connection, start: dt.datetime, end: dt.datetime
) -> dict[tuple[str, str], Decimal]:
    """(project_id, job_id) -> GPU-seconds metered in hours [start, end)."""
    rows = await conn.fetch(
        "SELECT project_id, job_id, sum(gpu_seconds) AS gpu_seconds FROM usage_jobs_hourly"
        " WHERE hour_start >= $1 AND hour_start < $2 GROUP BY 1, 2",
        start,
        end,
    )
    return {(row["project_id"], row["job_id"]): row["gpu_seconds"] for row in rows}


# --- enforcement ---------------------------------------------------------------------------------


async def project_spend(conn: Connection) -> dict[str, tuple[Decimal, Decimal]]:
    """project -> (subsidy used, net charged): every invoice, drafts included, credit notes
    deducted."""
    rows = await conn.fetch(
        "SELECT i.project_id, sum(i.subsidy_hkd - COALESCE(c.subsidy, 0)) AS subsidy,"
        " sum(i.net_hkd - COALESCE(c.net, 0)) AS net FROM invoices i LEFT JOIN ("
        "  SELECT invoice_id, sum(subsidy_hkd) AS subsidy, sum(net_hkd) AS net"
        "  FROM credit_notes GROUP BY 1) c USING (invoice_id) GROUP BY 1"
    )
    return {row["project_id"]: (row["subsidy"], row["net"]) for row in rows}


async def enforcement_states(conn: Connection) -> dict[str, asyncpg.Record]:
    rows = await conn.fetch("SELECT * FROM enforcement_state")
    return {row["project_id"]: row for row in rows}


async def set_enforcement_state(
    conn: Connection, project_id: str, held: bool, reason: str, dry_run: bool
) -> None:
    await conn.execute(
        "INSERT INTO enforcement_state (project_id, held, reason, dry_run) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (project_id) DO UPDATE SET held = $2, reason = $3, dry_run = $4,"
        " since = now()",
        project_id,
        held,
        reason,
        dry_run,
    )
