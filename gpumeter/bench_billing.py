"""Billing benchmark: `python -m gpumeter.bench_billing [--projects N] [--db-projects N]`.

Prints (never asserts) the invoice engine's time for N projects x 31 days x 24 hours x 3 GPU models,
the bulk recompute of those drafts from PostgreSQL, the ledger's upsert rate alone, the consumer's
ingest rate (upsert + dirty marks) with the draft drainer running and the time until the drafts
have caught up, and the single-invoice API latency. Starts its own embedded PostgreSQL unless DATABASE_URL is set.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import shutil
import statistics
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import asyncpg
import httpx
import uvicorn

from schemas.catalog import Project, RateCard, Subsidy
from schemas.metering import HourlyTotal
from services.billing import domain, service, store
from services.billing.api import create_api
from services.billing.drainer import DraftDrainer
from services.billing.settings import BillingSettings

PERIOD = "2026-12"  # 31 days
MODELS = ("H800", "A100", "H100")
RATES = {"H800": Decimal("26.00"), "A100": Decimal("13.00"), "H100": Decimal("28.00")}


def catalog(projects: int) -> tuple[list[RateCard], list[Project]]:
    cards = [
        RateCard(gpu_model=model, hkd_per_gpu_hour=rate, effective_from=dt.date(2026, 1, 1))
        for model, rate in RATES.items()
    ]
    subsidy = Subsidy(
        scheme="AISS",
        rate=Decimal("0.70"),
        cap_hkd=Decimal("2000000.00"),
        valid_from=dt.date(2026, 1, 1),
        valid_to=dt.date(2026, 12, 31),
    )
    return cards, [
        Project(id=project_id(n), name=f"Project {n}", subsidy=subsidy) for n in range(projects)
    ]


def project_id(n: int) -> str:
    return f"p{n:05d}"


def period_hours() -> list[dt.datetime]:
    start, end = domain.period_bounds(PERIOD)
    return [
        start + dt.timedelta(hours=h) for h in range(int((end - start).total_seconds()) // 3600)
    ]


def gpu_seconds(n: int, hour_index: int, model_index: int) -> Decimal:
    # Deterministic, uneven usage with fractional seconds (10 s samples on up to 8 GPUs).
    return Decimal((n * 7 + hour_index * 13 + model_index * 29) % 2880) + Decimal("0.5")


def bench_engine(projects: int) -> None:
    cards, catalog_projects = catalog(projects)
    pricing = domain.Pricing.of(cards, catalog_projects)
    hours = period_hours()
    usage = {
        project_id(n): [
            domain.UsageHour(model, hour, gpu_seconds(n, h, m))
            for h, hour in enumerate(hours)
            for m, model in enumerate(MODELS)
        ]
        for n in range(projects)
    }
    started = time.perf_counter()
    gross = Decimal(0)
    for pid, hours_used in usage.items():
        gross += domain.build_invoice(pid, PERIOD, hours_used, pricing, Decimal(0)).gross_hkd
    elapsed = time.perf_counter() - started
    rows = projects * len(hours) * len(MODELS)
    print(
        f"engine: {projects} invoices from {rows:,} hourly rows in {elapsed:.2f} s"
        f" ({rows / elapsed:,.0f} rows/s; gross {gross} HKD)"
    )


async def load_usage(conn: asyncpg.Connection, projects: int) -> int:
    hours = period_hours()
    records = [
        (project_id(n), model, hour, gpu_seconds(n, h, m), Decimal(0), Decimal(0), 360, 1)
        for n in range(projects)
        for h, hour in enumerate(hours)
        for m, model in enumerate(MODELS)
    ]
    await conn.copy_records_to_table(
        "usage_hourly",
        records=records,
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
    await store.rebuild_usage_daily(conn)  # COPY bypasses the ingest statement that keeps it
    return len(records)


async def bench_database(dsn: str, projects: int, api_requests: int) -> None:
    await store.migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        cards, catalog_projects = catalog(projects)
        for card in cards:
            await store.upsert_rate_card(conn, card)
        for project in catalog_projects:
            await store.upsert_project(conn, project)

        started = time.perf_counter()
        rows = await load_usage(conn, projects)
        print(
            f"load: {rows:,} hourly rows by COPY, daily sums rebuilt,"
            f" in {time.perf_counter() - started:.2f} s"
        )

        started = time.perf_counter()
        async with conn.transaction():
            await store.lock_writes(conn)
            changed = await service.recompute_all_drafts(conn)
        elapsed = time.perf_counter() - started
        print(
            f"bulk recompute from database: {len(changed)} draft invoices in {elapsed:.2f} s"
            f" ({elapsed / max(len(changed), 1) * 1000:.2f} ms per invoice)"
        )

        # Ledger ingest: new revisions of the latest hour of every (project, model), in
        # consumer-sized batches of 1000. Upsert alone first, then the consumer's path (upsert and
        # dirty marks) with the draft drainer running on the same loop, as in the service.
        last_hour = period_hours()[-1]

        def updates(revisions: range) -> list[HourlyTotal]:
            return [
                HourlyTotal(
                    project_id=project_id(n),
                    gpu_model=model,
                    hour_start=last_hour,
                    gpu_seconds=Decimal(3000 + revision),
                    util_gpu_seconds=Decimal(1800),
                    energy_wh=Decimal(700),
                    samples=360,
                    revision=revision,
                )
                for revision in revisions
                for n in range(projects)
                for model in MODELS
            ]

        upserts = updates(range(2, 3))
        started = time.perf_counter()
        for offset in range(0, len(upserts), 1000):
            async with conn.transaction():
                await store.upsert_hourly(conn, upserts[offset : offset + 1000])
        elapsed = time.perf_counter() - started
        print(
            f"ledger upsert alone: {len(upserts):,} hourly updates in {elapsed:.2f} s"
            f" ({len(upserts) / elapsed:,.0f}/s)"
        )
        async with conn.transaction():  # bring the drafts up to date with revision 2
            await store.lock_writes(conn)
            await service.recompute_all_drafts(conn)
    finally:
        await conn.close()
    await bench_ingest(dsn, updates(range(3, 6)))
    await bench_api(dsn, projects, api_requests)


async def bench_ingest(dsn: str, updates: list[HourlyTotal]) -> None:
    """The consumer's path: ledger upsert plus dirty marks per batch, the drainer running."""
    settings = BillingSettings(database_url=dsn)
    store_ = await store.Store(dsn, 5).open()
    drainer = DraftDrainer(settings, store_).start()
    try:
        started = time.perf_counter()
        for offset in range(0, len(updates), 1000):
            batch = updates[offset : offset + 1000]
            async with store_.acquire() as conn:
                await service.ingest_hourly_batch(conn, batch)
            drainer.wake()
        ingested = time.perf_counter() - started
        async with store_.acquire() as conn:
            while await store.has_dirty_projects(conn):
                await asyncio.sleep(0.01)
        caught_up = time.perf_counter() - started
        print(
            f"ledger ingest (upsert + dirty marks, drainer running): {len(updates):,} hourly"
            f" updates in {ingested:.2f} s ({len(updates) / ingested:,.0f}/s); drafts caught up"
            f" {caught_up:.2f} s after the first batch ({caught_up - ingested:.2f} s after the last)"
        )
        async with store_.acquire() as conn, conn.transaction():
            await store.lock_writes(conn)
            stale = await service.recompute_all_drafts(conn)
        print(f"  check: a full recompute after catching up changed {len(stale)} drafts (expect 0)")
    finally:
        await drainer.stop()
        await store_.close()


async def bench_api(dsn: str, projects: int, requests: int) -> None:
    settings = BillingSettings(
        database_url=dsn, api_tokens={"bench": "admin"}, allow_insecure_tokens=True, http_port=0
    )
    store_ = await store.Store(dsn, 5).open()
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_api(settings, store_),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="off",
            access_log=False,
        )
    )
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.05)
        latencies = []
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer bench"}
        ) as client:
            for index in range(requests):
                invoice_id = domain.invoice_id(PERIOD, project_id(index % projects))
                started = time.perf_counter()
                response = await client.get(f"/v1/invoices/{invoice_id}")
                latencies.append(time.perf_counter() - started)
                response.raise_for_status()
        latencies.sort()
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        print(
            f"API GET /v1/invoices/{{id}}: {requests} requests, median"
            f" {statistics.median(latencies) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"
        )
    finally:
        server.should_exit = True
        await serving
        await store_.close()


def _free_port() -> int:
    from gpumeter.localstack import free_port

    return free_port()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--projects", type=int, default=2000, help="projects for the pure engine")
    parser.add_argument(
        "--db-projects", type=int, default=2000, help="projects loaded into PostgreSQL"
    )
    parser.add_argument("--api-requests", type=int, default=2000)
    args = parser.parse_args()
    bench_engine(args.projects)
    external = os.environ.get("DATABASE_URL")
    if external:
        asyncio.run(bench_database(external, args.db_projects, args.api_requests))
        return
    from gpumeter.localstack import EmbeddedPostgres

    data_root = Path(tempfile.mkdtemp(prefix="gpumeter-bench-"))
    postgres = EmbeddedPostgres(data_root / "pgdata").start()
    try:
        asyncio.run(bench_database(postgres.dsn(), args.db_projects, args.api_requests))
    finally:
        postgres.stop()
        shutil.rmtree(data_root, ignore_errors=True)


if __name__ == "__main__":
    main()
