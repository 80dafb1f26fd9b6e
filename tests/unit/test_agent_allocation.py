"""GPU -> job -> project: Slurm through a fake `scontrol` on PATH, and the prolog job-mapping dir."""

from __future__ import annotations

import os
import stat
import textwrap
from pathlib import Path

import pytest

from services.agent.allocation import (
    AllocationError,
    FileProjectLookup,
    Job,
    JobMapDirSource,
    ScontrolProjectLookup,
    SlurmSource,
    allocation_for,
    choose_job,
    expand_hostlist,
    gpu_indexes_from_gres,
)

SHOW_JOBS = """\
JobId=123456 JobName=pretrain UserId=alice(1001) GroupId=alice(1001) MCS_label=N/A Priority=4294 Nice=0 Account=hkgai-llm QOS=normal JobState=RUNNING Reason=None Dependency=(null) RunTime=01:00:00 TimeLimit=2-00:00:00 SubmitTime=2026-11-28T00:00:00 StartTime=2026-11-28T01:00:00 Partition=gpu NodeList=node-[016-017] BatchHost=node-016 NumNodes=2 NumCPUs=128 TRES=cpu=128,mem=1T,node=2,billing=128,gres/gpu=12 JOB_GRES=gpu:h800:12 Nodes=node-016 CPU_IDs=0-63 Mem=512000 GRES=gpu:h800:8(IDX:0-7) Nodes=node-017 CPU_IDs=0-31 Mem=256000 GRES=gpu:h800:4(IDX:0-3) MinCPUsNode=1 Command=/home/alice/train.sh --big run
JobId=123470 JobName=eval UserId=bob(1002) Account=cuhk-med-ai QOS=normal JobState=RUNNING Reason=None StartTime=2026-11-28T01:30:00 NodeList=node-017 BatchHost=node-017 NumNodes=1 JOB_GRES=gpu:h800:2 Nodes=node-017 CPU_IDs=32-47 Mem=64000 GRES=gres/gpu:h800:2(IDX:4,6)
JobId=123471 JobName=shared Account=hku-vision-lab JobState=RUNNING StartTime=2026-11-28T01:40:00 NodeList=node-017 NumNodes=1 Nodes=node-017 CPU_IDs=48 Mem=8000 GRES=gpu:h800:1(IDX:6)
JobId=123480 JobName=queued Account=polyu-climate JobState=PENDING Reason=Resources NodeList=(null) NumNodes=1
JobId=123481 JobName=elsewhere Account=cityu-bio JobState=RUNNING NodeList=node-018 NumNodes=1 Nodes=node-018 CPU_IDs=0 Mem=8000 GRES=gpu:h800:8(IDX:0-7)
"""


@pytest.fixture
def fake_scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An `scontrol` first on PATH that prints canned output and logs its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "jobs.txt").write_text(SHOW_JOBS)
    script = bin_dir / "scontrol"
    script.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            echo "$@" >> {tmp_path}/calls.txt
            if [ "$1 $2" != "show job" ]; then echo "bad call" >&2; exit 1; fi
            if [ -f {tmp_path}/down ]; then echo "slurm_load_jobs error" >&2; exit 1; fi
            cat {tmp_path}/jobs.txt
            """
        )
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def test_slurm_maps_this_nodes_gpus_to_running_jobs_and_their_accounts(fake_scontrol: Path) -> None:
    jobs = SlurmSource("node-017").jobs_by_device()

    assert allocation_for(jobs, "0") == allocation_for(jobs, "3")
    assert (allocation_for(jobs, "0").project_id, allocation_for(jobs, "0").job_id) == (
        "hkgai-llm",
        "slurm:123456",
    )
    assert allocation_for(jobs, "4").job_id == "slurm:123470"
    assert allocation_for(jobs, "5").job_id is None  # not allocated
    assert allocation_for(jobs, "7").project_id is None  # node-016's index 7 is not ours
    calls = (fake_scontrol / "calls.txt").read_text().split()
    assert calls == ["show", "job", "-d", "--oneliner"]


def test_a_gpu_shared_by_several_jobs_is_attributed_to_the_lowest_job_id(
    fake_scontrol: Path,
) -> None:
    jobs = SlurmSource("node-017").jobs_by_device()

    assert sorted(job.job_id for job in jobs["6"]) == ["123470", "123471"]
    assert allocation_for(jobs, "6").job_id == "slurm:123470"
    assert choose_job([Job("99", "b"), Job("100", "a"), Job("100_7", "c")]) == Job("99", "b")


def test_a_failing_scontrol_is_an_allocation_error(fake_scontrol: Path) -> None:
    (fake_scontrol / "down").write_text("")
    with pytest.raises(AllocationError, match="slurm_load_jobs"):
        SlurmSource("node-017").jobs_by_device()
    with pytest.raises(AllocationError):
        SlurmSource("node-017", scontrol=str(fake_scontrol / "missing")).jobs_by_device()


def test_hostlists_and_gres_index_lists_expand_like_slurm() -> None:
    assert expand_hostlist("node-[016-018,020],login1") == [
        "node-016",
        "node-017",
        "node-018",
        "node-020",
        "login1",
    ]
    assert gpu_indexes_from_gres("gres/gpu:h800:4(IDX:0-3)") == [0, 1, 2, 3]
    assert gpu_indexes_from_gres("gpu:2(IDX:0,2),gpu:a100:1(IDX:5)") == [0, 2, 5]
    assert gpu_indexes_from_gres("gpu(IDX:N/A)") == []


def write_map(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)


def test_the_job_mapping_directory_names_jobs_per_gpu_and_mig_instance(tmp_path: Path) -> None:
    projects = tmp_path / "projects.txt"
    projects.write_text(
        "# job project\n123456 hkgai-llm\n123470 cuhk-med-ai\n123471 hku-vision-lab\n"
    )
    mapping = tmp_path / "dcgm-job-map"
    write_map(mapping, {"0": "123456\n", "3": "123471\n123470\n", "2.1": "123471\n", "4": "\n"})
    source = JobMapDirSource(mapping, FileProjectLookup(projects))

    jobs = source.jobs_by_device()

    assert allocation_for(jobs, "0").project_id == "hkgai-llm"
    assert allocation_for(jobs, "3").job_id == "slurm:123470"  # shared: the lowest job id
    assert allocation_for(jobs, "2.1").project_id == "hku-vision-lab"
    assert allocation_for(jobs, "2.0").job_id is None
    assert allocation_for(jobs, "0.3").job_id == "slurm:123456"  # a MIG slice of a mapped GPU
    assert allocation_for(jobs, "4").job_id is None  # epilog emptied it


def test_the_job_mapping_directory_asks_scontrol_once_per_job_for_its_account(
    fake_scontrol: Path,
) -> None:
    mapping = fake_scontrol / "map"
    write_map(mapping, {"0": "123456\n", "1": "123456\n", "6": "123471\n"})
    source = JobMapDirSource(mapping, ScontrolProjectLookup())

    first = source.jobs_by_device()
    second = source.jobs_by_device()

    assert first == second
    assert allocation_for(first, "1").project_id == "hkgai-llm"
    assert allocation_for(first, "6").project_id == "hku-vision-lab"
    calls = (fake_scontrol / "calls.txt").read_text().splitlines()
    assert calls == ["show job --oneliner 123456,123471"]


def test_no_mapping_directory_yet_means_nothing_is_allocated(tmp_path: Path) -> None:
    source = JobMapDirSource(tmp_path / "absent", FileProjectLookup(tmp_path / "p.txt"))
    assert source.jobs_by_device() == {}
