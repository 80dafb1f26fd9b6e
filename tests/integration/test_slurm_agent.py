"""The agent's Slurm source against a real Slurm (tests/fixtures/slurm.py): jobs' GPU indexes and
accounts as `scontrol show job -d --oneliner` reports them, a job that ends, and the fallback to
the last known allocation while the controller cannot be reached."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from services.agent.allocation import (
    AllocationError,
    Job,
    SlurmSource,
    run_command,
)
from services.agent.readers import GpuReading
from services.agent.sampler import NodeSampler
from tests.fixtures.processes import wait_until
from tests.fixtures.slurm import GPUS, SlurmCluster


class FourGpus:
    """The node's four GPUs, always readable: only the allocation is under test here."""

    def read(self) -> list[GpuReading]:
        return [
            GpuReading(
                index=index,
                uuid=f"GPU-{index:08d}",
                model="NVIDIA H800",
                util_pct=50.0,
                mem_used_mib=1024,
                mem_total_mib=81559,
                power_w=300.0,
                temp_c=50,
                xid_errors=0,
            )
            for index in range(GPUS)
        ]

    def close(self) -> None:
        pass


@pytest.fixture
def source(slurm: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> SlurmSource:
    """The agent's source as `AGENT_ALLOCATION=slurm` builds it: this host's short name, scontrol
    from the environment (SLURM_CONF names the test cluster, as it would a site's config)."""
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf_path))
    return SlurmSource(slurm.node, slurm.scontrol_path)


def indexes_of(jobs_by_device: dict[str, list[Job]], job_id: str) -> set[int]:
    return {
        int(device) for device, jobs in jobs_by_device.items() if job_id in {j.job_id for j in jobs}
    }


def attributions(sampler: NodeSampler) -> dict[int, tuple[str | None, str | None]]:
    """GPU index -> (project_id, job_id) of one round's usage events."""
    per_node = sampler.round(datetime.now(UTC))
    return {
        event["data"]["gpu_index"]: (event["data"]["project_id"], event["data"]["job_id"])
        for events in per_node.values()
        for event in events
    }


def test_two_jobs_get_two_gpus_each_billed_to_their_accounts(
    slurm: SlurmCluster, source: SlurmSource
) -> None:
    llm = slurm.submit("hkgai-llm", 2, 120)
    vision = slurm.submit("hkgai-vision", 2, 120)
    llm_fields = slurm.wait_state(llm, "RUNNING")
    vision_fields = slurm.wait_state(vision, "RUNNING")
    # What Slurm says with stand-in device files: typed GRES, contiguous indexes, per node detail.
    assert {llm_fields["GRES"], vision_fields["GRES"]} == {
        "gpu:h800:2(IDX:0-1)",
        "gpu:h800:2(IDX:2-3)",
    }
    # The Slurm user of each job is there too, for a later step to carry.
    assert llm_fields["UserId"] == vision_fields["UserId"] == "root(0)"

    jobs = source.jobs_by_device()
    assert sorted(jobs) == ["0", "1", "2", "3"]
    assert all(len(on_device) == 1 for on_device in jobs.values())
    assert {frozenset(indexes_of(jobs, llm)), frozenset(indexes_of(jobs, vision))} == {
        frozenset({0, 1}),
        frozenset({2, 3}),
    }
    for job_id, account in ((llm, "hkgai-llm"), (vision, "hkgai-vision")):
        for index in indexes_of(jobs, job_id):
            assert jobs[str(index)] == [Job(job_id, account)]

    # And through the sampler: every GPU's usage event names its job and project.
    sampler = NodeSampler(slurm.node, FourGpus(), source, 10.0)
    seen = attributions(sampler)
    for index in indexes_of(jobs, llm):
        assert seen[index] == ("hkgai-llm", f"slurm:{llm}")
    for index in indexes_of(jobs, vision):
        assert seen[index] == ("hkgai-vision", f"slurm:{vision}")
    assert sampler.allocation_errors == 0


def test_a_job_that_ends_leaves_its_gpus_unallocated(
    slurm: SlurmCluster, source: SlurmSource
) -> None:
    short = slurm.submit("hkgai-llm", 2, 6)  # long enough to be seen running under load
    # `--gpus=1` (cons_tres' per-job count) rather than `--gres`: the same GRES detail per node.
    long = slurm.submit("hkgai-vision", 0, 120, "--gpus=1")
    slurm.wait_state(short, "RUNNING")
    slurm.wait_state(long, "RUNNING")
    sampler = NodeSampler(slurm.node, FourGpus(), source, 10.0)
    jobs = source.jobs_by_device()
    short_gpus, long_gpus = indexes_of(jobs, short), indexes_of(jobs, long)
    assert len(short_gpus) == 2 and len(long_gpus) == 1 and not short_gpus & long_gpus
    assert {attributions(sampler)[index] for index in short_gpus} == {
        ("hkgai-llm", f"slurm:{short}")
    }

    ended = slurm.wait_state(short, "COMPLETED")
    assert ended["GRES"] == ""  # a finished job keeps no GPU detail
    jobs = source.jobs_by_device()
    assert not indexes_of(jobs, short)
    assert indexes_of(jobs, long) == long_gpus
    seen = attributions(sampler)
    for index in range(GPUS):
        if index in long_gpus:
            assert seen[index] == ("hkgai-vision", f"slurm:{long}")
        else:
            assert seen[index] == (None, None)

    # Cancelled, the same: nothing of this node is billed to anyone.
    slurm.run("scancel", long)
    slurm.wait_state(long, "CANCELLED")
    assert source.jobs_by_device() == {}
    assert set(attributions(sampler).values()) == {(None, None)}

    # Accounting has the ended job (what a later reconciliation reads).
    def accounted() -> str:
        return slurm.run(
            "sacct", "-X", "-P", "-n", "-j", short, "--format=JobID,Account,User,AllocTRES,State"
        ).strip()

    record = wait_until(lambda: "COMPLETED" in accounted() and accounted(), 20, 0.3, "sacct")
    job_id, account, user, tres, state = record.split("|")
    assert (job_id, account, user, state) == (short, "hkgai-llm", "root", "COMPLETED")
    assert "gres/gpu=2" in tres.split(",")


def test_unreachable_controller_keeps_the_last_allocation(
    slurm: SlurmCluster, source: SlurmSource
) -> None:
    """allocation.py/sampler.py: if the allocation source fails, the round uses the last answer
    it gave (a job's GPUs rarely change within an interval; null would bill nobody)."""
    job = slurm.submit("hkgai-llm", 4, 120)
    slurm.wait_state(job, "RUNNING")
    sampler = NodeSampler(slurm.node, FourGpus(), source, 10.0)
    everything = {index: ("hkgai-llm", f"slurm:{job}") for index in range(GPUS)}
    assert attributions(sampler) == everything

    slurm.stop_controller()
    started = time.monotonic()
    with pytest.raises(AllocationError, match="exited"):
        source.jobs_by_device()
    failed_after_s = time.monotonic() - started
    assert failed_after_s < 10.0  # the agent's own timeout for scontrol
    assert attributions(sampler) == everything
    assert sampler.allocation_errors == 1

    # A config scontrol cannot read: it retries for a minute; the agent's timeout ends the wait.
    quick = SlurmSource(
        slurm.node,
        slurm.scontrol_path,
        runner=lambda argv: run_command(argv, timeout_s=2.0),
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(slurm.root / "missing" / "slurm.conf"))
        with pytest.raises(AllocationError, match="timed out"):
            quick.jobs_by_device()
        sampler.allocation = quick
        assert attributions(sampler) == everything
        assert sampler.allocation_errors == 2
        sampler.allocation = source

    # The controller back: its saved state still has the job on the same GPUs.
    slurm.start_controller()
    wait_until(lambda: source.jobs_by_device(), 30, 0.2, "scontrol answering again")
    assert attributions(sampler) == everything
    assert sampler.allocation_errors == 2


def test_an_account_out_of_gpu_minutes_gets_no_new_job(
    slurm: SlurmCluster, source: SlurmSource
) -> None:
    slurm.limit_gpu_minutes("hkgai-vision", 0)
    held = slurm.submit("hkgai-vision", 1, 60)
    fields = slurm.wait_state(held, "PENDING")
    wait_until(
        lambda: slurm.job(held)["Reason"] == "AssocGrpGRESMinutes",
        15,
        0.2,
        f"job {held} held for its account's GPU minutes ({fields.get('Reason')})",
    )
    # The other account is not held back; the pending job holds no GPU.
    running = slurm.submit("hkgai-llm", 1, 60)
    slurm.wait_state(running, "RUNNING")
    jobs = source.jobs_by_device()
    assert [job.job_id for on_device in jobs.values() for job in on_device] == [running]
