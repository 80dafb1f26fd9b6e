"""Reconciliation against a real Slurm's accounting (tests/fixtures/slurm.py): GPU-hours per job
as gpumeter metered them beside sacct's allocated gres/gpu x elapsed, over real HTTP from the
billing service. A job whose node's agent was stopped for a while is named, as is one Slurm ran
that gpumeter never saw and one gpumeter metered that Slurm does not know."""

from __future__ import annotations

import datetime as dt
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import asyncpg
import httpx
import pytest

from services.billing.domain import gpu_hours_text
from tests.fixtures.billing import billing_process
from tests.fixtures.processes import ServiceProcess
from tests.fixtures.slurm import SlurmCluster

UTC = dt.UTC
ADMIN = {"Authorization": "Bearer rec-admin"}
PROJECT = {"Authorization": "Bearer rec-project"}
TOKENS = "rec-admin=admin,rec-project=project:hkgai-llm"


@pytest.fixture
def billing(
    slurm: SlurmCluster,
    database_url: str,
    bootstrap_servers: str,
    topic_prefix: str,
    http_port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[ServiceProcess]:
    service = billing_process(
        bootstrap_servers,
        database_url,
        topic_prefix,
        http_port,
        tmp_path / "billing.log",
        monkeypatch,
        API_TOKENS=TOKENS,
        SLURM_SACCT=slurm.bin["sacct"],
        SLURM_CONF=str(slurm.conf_path),
        RECONCILE_TOLERANCE_GPU_SECONDS="5",
    ).start()
    yield service
    service.stop()


def sacct_seconds(slurm: SlurmCluster, job_id: str) -> tuple[dt.datetime, int]:
    """A finished job's start (UTC) and elapsed seconds, from sacct."""
    done = subprocess.run(
        [slurm.bin["sacct"], "-X", "-P", "-n", "-j", job_id, "--format=Start,ElapsedRaw"],
        env={**slurm.env, "TZ": "UTC"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    line = done.stdout.strip()
    start, elapsed = line.split("|")
    return dt.datetime.fromisoformat(start).replace(tzinfo=UTC), int(elapsed)


async def meter(database_url: str, rows: list[tuple[str, str, dt.datetime, Decimal]]) -> None:
    """Per-job hourly totals as billing stores them from metering.usage.jobs.hourly.v1."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.executemany(
            "INSERT INTO usage_jobs_hourly (project_id, job_id, gpu_model, hour_start, gpu_seconds,"
            " util_gpu_seconds, idle_gpu_seconds, energy_wh, nodes, samples, revision)"
            " VALUES ($1, $2, 'H800', $3, $4, 0, 0, 0, 1, 1, 1)",
            rows,
        )
    finally:
        await conn.close()


async def test_jobs_that_differ_from_slurms_accounting_are_named(
    slurm: SlurmCluster, billing: ServiceProcess, database_url: str, http_port: int
) -> None:
    # Given three jobs Slurm ran: two GPUs each for hkgai-llm, one GPU for hkgai-vision
    full = slurm.submit("hkgai-llm", 2, 4)
    gap = slurm.submit("hkgai-llm", 2, 12)
    unseen = slurm.submit("hkgai-vision", 1, 4)
    for job_id in (full, gap, unseen):
        slurm.wait_state(job_id, "COMPLETED", timeout_s=60)
    (start_full, elapsed_full), (start_gap, elapsed_gap) = (
        sacct_seconds(slurm, full),
        sacct_seconds(slurm, gap),
    )
    hour = start_full.replace(minute=0, second=0, microsecond=0)
    # And gpumeter metered the first whole, the second for half its time (its node's agent was
    # stopped a while), the third not at all, and a job Slurm does not know
    await meter(
        database_url,
        [
            ("hkgai-llm", f"slurm:{full}", hour, Decimal(2 * elapsed_full)),
            ("hkgai-llm", f"slurm:{gap}", hour, Decimal(elapsed_gap)),  # 1 of its 2 GPU-times
            ("hkgai-llm", "slurm:999999", hour, Decimal(3600)),
        ],
    )
    assert start_gap.replace(minute=0, second=0, microsecond=0) == hour or elapsed_gap < 60

    # When billing reconciles the hour
    window = {"from": hour.isoformat(), "to": (hour + dt.timedelta(hours=1)).isoformat()}
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as client:
        report = client.get("/v1/reconciliation", params=window, headers=ADMIN)
        assert report.status_code == 200, report.text
        body = report.json()
        csv_text = client.get("/v1/reconciliation.csv", params=window, headers=ADMIN).text
        assert client.get("/v1/reconciliation", headers=PROJECT).status_code == 403

    # Then every difference is named, and the job metered whole is not among them
    found = {(d["job_id"], d["kind"]) for d in body["differences"]}
    assert found == {
        (gap, "hours_differ"),
        (unseen, "missing_in_gpumeter"),
        ("999999", "missing_in_slurm"),
    }, body
    assert body["slurm_jobs"] >= 3 and body["metered_jobs"] == 3
    [differs] = [d for d in body["differences"] if d["kind"] == "hours_differ"]
    assert differs["slurm_gpu_hours"] == gpu_hours_text(Decimal(2 * elapsed_gap))
    assert f"{unseen},hkgai-vision,missing_in_gpumeter," in csv_text


def test_without_slurm_configured_reconciliation_says_so_with_a_404(
    database_url: str,
    bootstrap_servers: str,
    topic_prefix: str,
    http_port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = billing_process(
        bootstrap_servers,
        database_url,
        topic_prefix,
        http_port,
        tmp_path / "billing.log",
        monkeypatch,
        API_TOKENS=TOKENS,
    ).start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as client:
            answer = client.get("/v1/reconciliation", headers=ADMIN)
            bad = client.get("/v1/reconciliation", params={"from": "yesterday"}, headers=ADMIN)
    finally:
        service.stop()
    assert answer.status_code == 404 and answer.json()["error"] == "not_configured"
    assert bad.status_code == 422  # bad input is still refused as such
