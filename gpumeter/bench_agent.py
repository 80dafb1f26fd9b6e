"""What the agent costs on a node, and how fast it replays a backlog.

    python -m gpumeter.bench_agent [--seconds 20] [--bootstrap HOST:PORT]
    python -m gpumeter.bench_agent --replay [--nodes 8] [--rounds 3200] [--compression none|gzip]

The first: one agent process, 8 simulated GPUs sampled at 1 Hz, sent to a broker through the spool;
prints the CPU share of one core and the peak resident memory.

--replay: a spool filled with `--rounds` rounds of `--nodes` simulated nodes x 8 GPUs (what an
outage leaves behind), drained into the broker by the agent's sender; prints samples per second
and how many times the production rate of the drill's fleet (8 nodes at 1800x, 60 s samples) and of
`make run` (165 nodes at 120x) that is.

Without --bootstrap a local Tansu broker is started for the run (gpumeter.localstack). Linux only
(reads /proc). The simulator stands in for NVML, whose calls cost about the same few microseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
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


# Samples per second the simulated fleets produce: nodes x 8 GPUs x speed / interval.
PRODUCTION_RATES = {"the drill's fleet": 8 * 8 * 1800 / 60, "make run's fleet": 165 * 8 * 120 / 60}


def replay(bootstrap: str, work: Path, nodes: int, rounds: int, compression: str | None) -> None:
    """Fill a spool as an outage would, then time the sender draining it into the broker."""
    from services.agent.publisher import AgentMetrics, Delivery, kafka_producer_factory
    from services.agent.simulator import FleetConfig, FleetSimulator, aligned
    from services.agent.spool import Spool
    from services.common.kafka_admin import ensure_topics

    topic = f"bench{int(time.time())}.gpu.usage.v1"
    asyncio.run(ensure_topics(bootstrap, {topic: 8}))
    fleet = FleetSimulator(FleetConfig(nodes=nodes, interval_s=60.0))
    at = aligned(datetime.now(UTC) - timedelta(days=60), 60.0)
    spool = Spool(work / "spool", 1 << 40, fsync=False)
    for _ in range(rounds):
        at += timedelta(seconds=60)
        spool.append([(node, events) for node, events in fleet.round(at).items() if events])
    samples, spool_bytes = spool.samples, spool.bytes
    metrics = AgentMetrics()
    factory = (
        kafka_producer_factory(bootstrap, 10000)
        if compression is None
        else kafka_producer_factory(
            bootstrap, 10000, compression=None if compression == "none" else compression
        )
    )
    factory().close()  # connect and fetch metadata once: not part of the replay
    delivery = Delivery(spool, topic, metrics, factory)
    start_cpu, start_wall = time.process_time(), time.monotonic()
    delivery.start()
    while len(spool):
        time.sleep(0.01)
    wall, cpu = time.monotonic() - start_wall, time.process_time() - start_cpu
    delivery.close(0)
    sent = metrics.registry.get_sample_value("gpumeter_agent_samples_sent_total") or 0
    rate = samples / wall
    print(
        f"replay of {samples:,} spooled samples ({nodes} nodes x 8 GPUs x {rounds} rounds, "
        f"{spool_bytes / 1e6:.0f} MB): {wall:.1f} s, {rate:,.0f} samples/s, agent CPU "
        f"{cpu:.1f} s ({1e6 * cpu / samples:.1f} us per sample); {sent:,.0f} acknowledged"
    )
    for name, produced in PRODUCTION_RATES.items():
        print(f"  {rate / produced:.1f}x {name} production ({produced:,.0f} samples/s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpumeter.bench_agent",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--bootstrap", default="", help="an existing broker; default: start Tansu")
    parser.add_argument("--replay", action="store_true", help="time the replay of a backlog")
    parser.add_argument("--nodes", type=int, default=8, help="--replay: simulated nodes")
    parser.add_argument("--rounds", type=int, default=3200, help="--replay: spooled rounds")
    parser.add_argument(
        "--compression",
        choices=("none", "gzip"),
        default=None,
        help="--replay: the producer's compression; default: the agent's",
    )
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="gpumeter-agent-bench-"))
    broker = None
    bootstrap = args.bootstrap
    if not bootstrap:
        from gpumeter.localstack import TansuBroker

        broker = TansuBroker(work / "tansu.log").start()
        bootstrap = broker.bootstrap_servers
    if args.replay:
        try:
            replay(bootstrap, work, args.nodes, args.rounds, args.compression)
        finally:
            if broker is not None:
                broker.stop()
            shutil.rmtree(work, ignore_errors=True)
        return 0
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
