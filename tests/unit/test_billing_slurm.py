"""Slurm's accounting as billing reads it (services/billing/slurm.py), on plain values."""

from __future__ import annotations

import asyncio
import datetime as dt
from decimal import Decimal
from pathlib import Path

import pytest

from services.billing.slurm import SacctError, parse_sacct, reconcile, sacct_jobs

UTC = dt.UTC
# What sacct -X -P -n --format=JobID,Account,User,AllocTRES,Elapsed,Start,End,State printed on the
# test cluster (Slurm 22.05), plus a job with no GPUs
SACCT = """1|hkgai-llm|root|billing=1,cpu=1,gres/gpu=2,node=1|00:00:03|2026-12-06T16:39:27|2026-12-06T16:39:30|COMPLETED
2|hkgai-vision|root|billing=1,cpu=1,gres/gpu=1,node=1|00:00:06|2026-12-06T16:39:27|Unknown|RUNNING
3|hkgai-llm|alice|billing=1,cpu=1,node=1|00:01:00|2026-12-06T16:00:00|2026-12-06T16:01:00|CANCELLED by 0
"""
HOUR = dt.datetime(2026, 12, 6, 16, tzinfo=UTC)
NOW = dt.datetime(2026, 12, 6, 16, 39, 40, tzinfo=UTC)


def test_sacct_lines_become_jobs_with_their_gpus_and_times() -> None:
    jobs = parse_sacct(SACCT, UTC)
    assert [(j.job_id, j.account, j.user, j.gpus, j.state) for j in jobs] == [
        ("1", "hkgai-llm", "root", 2, "COMPLETED"),
        ("2", "hkgai-vision", "root", 1, "RUNNING"),
        ("3", "hkgai-llm", "alice", 0, "CANCELLED"),
    ]
    assert jobs[1].end is None  # still running: counted up to now
    end = HOUR + dt.timedelta(hours=1)
    assert [j.gpu_seconds_within(HOUR, end, NOW) for j in jobs] == [6, 13, 0]
    with pytest.raises(SacctError, match="expected 8 fields"):
        parse_sacct("1|x\n", UTC)


def test_differences_beyond_the_tolerance_are_named_by_kind() -> None:
    jobs = parse_sacct(SACCT, UTC)
    metered = {
        ("hkgai-llm", "slurm:1"): Decimal(6),  # exact
        ("hkgai-vision", "slurm:2"): Decimal(2),  # the agent missed 11 of 13 GPU-seconds
        ("hkgai-llm", "slurm:77"): Decimal(600),  # Slurm never had it
        ("hkgai-llm", "interactive"): Decimal(600),  # not a Slurm job id: not reconciled
    }
    end = HOUR + dt.timedelta(hours=1)
    found = reconcile(metered, jobs, HOUR, end, NOW, Decimal(2), Decimal(5))
    assert [(d.job_id, d.kind) for d in found] == [
        ("2", "hours_differ"),
        ("77", "missing_in_slurm"),
    ]
    # within the tolerance: nothing; charged to another project: named
    assert (
        reconcile(
            {("hkgai-llm", "slurm:1"): Decimal(5)},
            jobs[:1],
            HOUR,
            end,
            NOW,
            Decimal(50),
            Decimal(0),
        )
        == []
    )
    moved = reconcile(
        {("other", "slurm:1"): Decimal(6)}, jobs[:1], HOUR, end, NOW, Decimal(2), Decimal(5)
    )
    assert [d.kind for d in moved] == ["project_differs"]


def test_sacct_that_cannot_run_or_fails_is_a_clear_error(tmp_path: Path) -> None:
    end = HOUR + dt.timedelta(hours=1)
    with pytest.raises(SacctError, match="No such file"):
        asyncio.run(sacct_jobs(str(tmp_path / "no-sacct"), HOUR, end))
    failing = tmp_path / "sacct"
    failing.write_text(
        "#!/bin/sh\necho 'sacct: error: Problem talking to the database' >&2\nexit 1\n"
    )
    failing.chmod(0o755)
    with pytest.raises(SacctError, match="Problem talking to the database"):
        asyncio.run(sacct_jobs(str(failing), HOUR, end))


def test_hold_is_decided_by_the_cap_or_the_budget_and_only_for_a_hold_policy() -> None:
    from schemas.catalog import Project, Subsidy
    from services.billing.enforcement import decide

    subsidy = Subsidy(
        scheme="AISS",
        rate=Decimal("0.70"),
        cap_hkd=Decimal("100.00"),
        valid_from=dt.date(2026, 1, 1),
        valid_to=dt.date(2026, 12, 31),
    )
    hold = Project(
        id="p", name="P", subsidy=subsidy, on_cap_exhausted="hold", budget_hkd=Decimal(50)
    )
    assert (
        decide(hold.model_copy(update={"on_cap_exhausted": "notify"}), Decimal(100), Decimal(0))
        is None
    )
    assert decide(hold, Decimal("99.99"), Decimal("49.99")).hold is False  # type: ignore[union-attr]
    capped = decide(hold, Decimal(100), Decimal(0))
    assert capped is not None and capped.hold and "cap 100.00 HKD used up" in capped.reason
    over_budget = decide(hold, Decimal(0), Decimal(50))
    assert over_budget is not None and over_budget.hold and "budget 50" in over_budget.reason
