"""The fault drill at CI size: the whole stack with a small simulated fleet, each service killed
with SIGKILL and restarted, the agents' link cut, PostgreSQL restarted; every invoice still equals
what the samples imply, to the cent, and every alert state change was delivered once.

Once on Tansu, and once on a three-node Apache Kafka cluster (RF 3, min.insync.replicas 2), where
the drill also SIGKILLs the leader of the busiest gpu.usage.v1 partition and of a metering
changelog partition, restarts each, and cuts one node off in its network namespace for 20 s
(docs/scaling.md, "The three-node drill")."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.processes import REPO_ROOT


@pytest.mark.parametrize("broker", ["tansu", "kafka x3"])
def test_the_fault_drill_loses_nothing_counts_nothing_twice_and_notifies_once(
    tmp_path: Path, broker: str
) -> None:
    # Given the local broker and database (the drill restarts PostgreSQL, so it starts its own)
    env = {
        k: v for k, v in os.environ.items() if k not in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL")
    }
    data_dir = tmp_path / "drill"

    # When the drill runs at a size that fits CI
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpumeter.drill",
            "--nodes",
            "4",
            "--partitions",
            "4",
            "--outage-s",
            "10",
            "--settle-s",
            "5",
            "--stable-s",
            "15",
            "--progress-s",
            "5",
            "--data-dir",
            str(data_dir),
            *(
                ["--broker", "kafka", "--kafka-nodes", "3", "--isolate-s", "20"]
                if broker == "kafka x3"
                else []
            ),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # a guard against a hang, not a timing assertion
    )
    output = result.stdout + result.stderr

    # Then it passes, and its report says so in numbers
    assert result.returncode == 0, output[-6000:]
    assert "RESULT: PASS" in output
    assert re.search(
        r"lost: 0, double-counted: 0, duplicate notifications: 0, mismatches: 0", output
    ), output[-4000:]
    assert re.search(r"invoices: ([1-9]\d*) expected, \1 served", output), output[-4000:]
    for step in ("SIGKILL metering", "SIGKILL billing", "SIGKILL alerts", "cut the agents' link"):
        assert step in output
    assert "restart PostgreSQL" in output
    if broker == "kafka x3":
        assert re.search(r"SIGKILL Kafka node \d, leader of the busiest usage partition", output)
        assert re.search(r"SIGKILL Kafka node \d, leader of a metering changelog partition", output)
        assert re.search(r"isolate Kafka node \d from clients and the quorum for 20 s", output)
        assert re.search(r"is led by node \d now", output)
    # And it leaves no process behind
    leftovers = subprocess.run(["pgrep", "-f", str(data_dir)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", f"processes left behind: {leftovers.stdout}"
