"""Enforcement of a used-up subsidy on a real Slurm (tests/fixtures/slurm.py): a project whose
catalog says `on_cap_exhausted: hold` has its Slurm account held once its cap is used up, so a new
GPU job pends (AssocGrpGRESMinutes), and released when a new approval makes room, so the job runs;
every step audited. Dry run (the default) decides and audits without touching Slurm."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal

import asyncpg
import pytest

from schemas.metering import HourlyTotal
from services.billing import catalog as catalog_files
from services.billing import service, store
from services.billing.enforcement import Sacctmgr, enforce
from tests.fixtures.processes import wait_until
from tests.fixtures.slurm import SlurmCluster

NOV = dt.datetime(2026, 11, 10, 2, tzinfo=dt.UTC)
CATALOG = """
version: 2
currency: HKD
rate_cards:
  - {gpu_model: H800, hkd_per_gpu_hour: "26.00", effective_from: 2026-01-01}
projects:
  - id: hkgai-vision
    name: Vision
    on_cap_exhausted: hold
    subsidy: {scheme: AISS, rate: "0.70", cap_hkd: "%s", valid_from: 2026-01-01, valid_to: 2026-12-31}
  - id: hkgai-llm
    name: LLM (notify only)
    subsidy: {scheme: AISS, rate: "0.70", cap_hkd: "10.00", valid_from: 2026-01-01, valid_to: 2026-12-31}
"""


def usage(project: str) -> HourlyTotal:
    return HourlyTotal(
        project_id=project,
        gpu_model="H800",
        hour_start=NOV,
        gpu_seconds=Decimal(36000),  # 10 h: 260.00, subsidy 182.00 uncapped
        util_gpu_seconds=Decimal(0),
        energy_wh=Decimal(0),
        samples=1,
        revision=1,
    )


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    await store.migrate(database_url)
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


@pytest.fixture
def lifted(slurm: SlurmCluster) -> Iterator[SlurmCluster]:
    """The cluster, with any limit enforcement set lifted after the test (a failed one too)."""
    yield slurm
    slurm.limit_gpu_minutes("hkgai-vision", -1)


async def test_a_used_up_cap_holds_new_jobs_and_a_new_approval_releases_them(
    lifted: SlurmCluster, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    slurm = lifted
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf_path))  # sacctmgr's cluster
    sacctmgr = Sacctmgr(slurm.bin["sacctmgr"])
    # Given both projects used up their 10.00 caps; only hkgai-vision's policy is hold
    await catalog_files.apply_catalog(conn, catalog_files.parse_catalog(CATALOG % "10.00"))
    await service.apply_hourly_batch(conn, [usage("hkgai-vision"), usage("hkgai-llm")])

    # When enforcement runs, then the account is held and that is audited
    [held] = await enforce(conn, sacctmgr, actor="system")
    assert (held.project_id, held.held, held.dry_run) == ("hkgai-vision", True, False)
    assert "cap 10.00 HKD used up" in held.reason
    assert await enforce(conn, sacctmgr) == []  # nothing changed: nothing done again
    # and a new GPU job of that account pends for its GPU-minutes limit; the other account runs
    pending = slurm.submit("hkgai-vision", 1, 30)
    wait_until(
        lambda: slurm.job(pending).get("Reason") == "AssocGrpGRESMinutes",
        30,
        what="the held account's job pending for its GPU-minutes limit",
    )
    assert slurm.job(pending)["JobState"] == "PENDING"
    slurm.wait_state(slurm.submit("hkgai-llm", 1, 30), "RUNNING")

    # When a new approval raises the cap, then enforcement lifts the hold and the job runs
    await catalog_files.apply_catalog(conn, catalog_files.parse_catalog(CATALOG % "100000.00"))
    [released] = await enforce(conn, sacctmgr)
    assert (released.project_id, released.held) == ("hkgai-vision", False)
    slurm.wait_state(pending, "RUNNING", timeout_s=60)

    trail = [
        (row["action"], row["subject"], json.loads(row["details"])["dry_run"])
        for row in reversed(await store.audit_rows(conn))
        if row["action"].startswith("slurm.")
    ]
    assert trail == [
        ("slurm.hold", "hkgai-vision", False),
        ("slurm.release", "hkgai-vision", False),
    ]
    # and on-call heard of both: the hold signal for the alerts service says released now
    signal = await conn.fetchval(
        "SELECT payload::text FROM billing_signals WHERE key = 'slurm_hold|hkgai-vision'"
    )
    assert json.loads(signal)["held"] is False


async def test_a_dry_run_decides_and_audits_without_touching_slurm(
    slurm: SlurmCluster, conn: asyncpg.Connection
) -> None:
    await catalog_files.apply_catalog(conn, catalog_files.parse_catalog(CATALOG % "10.00"))
    await service.apply_hourly_batch(conn, [usage("hkgai-vision")])
    [action] = await enforce(conn, None)
    assert (action.project_id, action.held, action.dry_run) == ("hkgai-vision", True, True)
    [entry] = [r for r in await store.audit_rows(conn) if r["action"] == "slurm.hold"]
    assert json.loads(entry["details"])["dry_run"] is True
    # Slurm was not touched: a job of the account runs
    slurm.wait_state(slurm.submit("hkgai-vision", 1, 5), "RUNNING")
