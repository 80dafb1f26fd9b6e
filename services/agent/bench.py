"""What the agent costs on a node: one agent process, 8 simulated GPUs sampled at 1 Hz, sent to a
broker through the spool; prints the CPU share of one core and the peak resident memory.

    python -m services.agent.bench [--seconds 20] [--bootstrap HOST:PORT]

Without --bootstrap a local Tansu broker is started for the run (gpumeter.localstack). Linux only
(reads /proc). The simulator stands in for NVML, whose calls cost about the same few microseconds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 1e6


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def rss_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_MB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.agent.bench", description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--bootstrap", default="", help="an existing broker; default: start Tansu")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="gpumeter-agent-bench-"))
    broker = None
    bootstrap = args.bootstrap
    if not bootstrap:
        from gpumeter.localstack import TansuBroker

        broker = TansuBroker(work / "tansu.log").start()
        bootstrap = broker.bootstrap_servers
    from gpumeter.localstack import free_port

    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "TOPIC_PREFIX": f"bench{int(time.time())}.",
        "AGENT_HTTP_PORT": str(free_port()),
        "AGENT_SPOOL_DIR": str(work / "spool"),
        "AGENT_SIM_NODES": "1",
        "AGENT_SIM_GPUS_PER_NODE": "8",
        "AGENT_INTERVAL_S": "1",
        "AGENT_SIM_SPEED": "1",
        "AGENT_SIM_START": (datetime.now(UTC) - timedelta(seconds=1)).isoformat(),
        "LOG_LEVEL": "WARNING",
    }
    agent = subprocess.Popen(
        [sys.executable, "-m", "services.agent", "--simulate"],
        env=env,
        stdout=open(work / "agent.log", "ab"),  # noqa: SIM115 - owned by the child
        stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(3.0)  # start-up (imports, first connection) is not the steady state we measure
        start_cpu, start_wall = cpu_seconds(agent.pid), time.monotonic()
        peak_rss = rss_mb(agent.pid)
        while time.monotonic() - start_wall < args.seconds:
            time.sleep(0.5)
            if agent.poll() is not None:
                print(f"agent exited early; see {work / 'agent.log'}", file=sys.stderr)
                return 1
            peak_rss = max(peak_rss, rss_mb(agent.pid))
        cpu = cpu_seconds(agent.pid) - start_cpu
        wall = time.monotonic() - start_wall
        metrics = httpx.get(f"http://127.0.0.1:{env['AGENT_HTTP_PORT']}/metrics").text
        sent = next(
            line.split()[-1]
            for line in metrics.splitlines()
            if line.startswith("gpumeter_agent_samples_sent_total ")
        )
    finally:
        agent.terminate()
        agent.wait(30)
        if broker is not None:
            broker.stop()
    print(
        f"agent, 8 simulated GPUs at 1 Hz for {wall:.0f} s: "
        f"CPU {100 * cpu / wall:.1f}% of one core, peak RSS {peak_rss:.0f} MB, "
        f"{float(sent):.0f} samples acknowledged"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
