"""The README's first command, as a user runs it: `gpumeter up` shows invoices growing and an alert
firing, and Ctrl-C (SIGINT) leaves no process behind."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.processes import REPO_ROOT, StopWaiting, wait_until


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("broker", ["tansu", "kafka"])
def test_gpumeter_up_runs_the_centre_and_ctrl_c_stops_every_process(
    broker: str, tmp_path: Path
) -> None:
    log_path = tmp_path / "up.log"
    env = {
        k: v for k, v in os.environ.items() if k not in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL")
    }
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpumeter",
                "up",
                "--data-dir",
                str(tmp_path / "var"),
                "--nodes",
                "4",
                "--speed",
                "3600",
                "--start=-1d",
                "--partitions",
                "4",
                "--broker",
                broker,
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def output() -> str:
        text = log_path.read_text(errors="replace")
        if process.poll() is not None:
            raise StopWaiting(f"gpumeter up exited with {process.returncode}:\n{text[-3000:]}")
        return text

    try:
        wait_until(
            lambda: re.search(r"[1-9]\d* draft invoices .* gross HK\$[1-9]", output()),
            150,
            interval_s=1,
            what="invoices in the live view",
        )
        # and the centre's allocation per hour, as a ratio of the fleet's GPUs
        wait_until(
            lambda: re.search(r"allocation \d+\.\d% last hour \(last [1-9]\d* h", output()),
            60,
            interval_s=1,
            what="the allocation ratio in the live view",
        )
        wait_until(
            lambda: "ALERT FIRING: CentreAllocation" in output(),
            150,
            interval_s=1,
            what="the centre allocation alert in the live view",
        )
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)
    text = log_path.read_text(errors="replace")
    assert process.returncode == 0, text[-3000:]
    assert "stopped: no process left behind" in text
    # on the broker asked for
    named = "Tansu (in memory)" if broker == "tansu" else "Apache Kafka on 127.0.0.1:"
    assert f"broker: {named}" in text, text[:3000]
    # and it ends by pointing to the web dashboard and the API
    assert re.search(r"web dashboard http://127\.0\.0\.1:\d+/dashboard#token=\S+", text)
    assert re.search(r"billing API   http://127\.0\.0\.1:\d+/v1", text)
    ports = [int(p) for p in re.findall(r"healthy on http://127\.0\.0\.1:(\d+)", text)]
    assert len(ports) == 3
    assert not any(listening(port) for port in ports)
    leftovers = subprocess.run(
        ["pgrep", "-f", str(tmp_path / "var")], capture_output=True, text=True
    )
    assert leftovers.stdout.strip() == "", f"processes left behind: {leftovers.stdout}"
