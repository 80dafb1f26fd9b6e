"""`make bench`: throughput figures on this machine, printed (never asserted).

(a) a raw aiokafka consume-and-decode loop over the usage topic: the practical ceiling;
(b) the metering service end to end on the same data: from an empty group to hourly totals that
    hold every sample.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from gpumeter.localstack import TansuBroker, free_port
from services.agent.simulator import FleetConfig, FleetSimulator
from services.common.kafka_admin import ensure_topics

REPO_ROOT = Path(__file__).resolve().parents[1]


async def produce_fleet(bootstrap: str, topic: str, nodes: int, rounds: int) -> int:
    fleet = FleetSimulator(FleetConfig(nodes=nodes, interval_s=10.0, target_allocation=1.0))
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=2)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    samples = 0
    try:
        for i in range(1, rounds + 1):
            for node, events in fleet.round(start + timedelta(seconds=10 * i)).items():
                samples += len(events)
                await producer.send(topic, key=node.encode(), value=json.dumps(events).encode())
        await producer.flush()
    finally:
        await producer.stop()
    return samples


async def raw_ceiling(bootstrap: str, topic: str, samples: int) -> float:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        group_id=f"bench-raw-{uuid.uuid4().hex[:6]}",
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=64 << 20,
        rebalance_timeout_ms=3000,
    )
    await consumer.start()
    seen = 0
    started = None
    try:
        while seen < samples:
            batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
            if started is None and batch:
                started = time.perf_counter()
            for records in batch.values():
                for record in records:
                    seen += len(json.loads(record.value))
    finally:
        await consumer.stop()
    return samples / (time.perf_counter() - (started or time.perf_counter()))


def metering_end_to_end(
    bootstrap: str, prefix: str, samples: int, workdir: Path
) -> tuple[float, float]:
    port = free_port()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "TOPIC_PREFIX": prefix,
        "HTTP_PORT": str(port),
        "KAFKA_REBALANCE_TIMEOUT_MS": "3000",
        "USAGE_PARTITIONS": "8",
        "LOG_LEVEL": "WARNING",
    }
    log = open(workdir / "metering.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "services.metering"],
        env=env,
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        counted_re = 'gpumeter_metering_samples_total{outcome="counted"} '
        first = None
        while True:
            time.sleep(0.05)
            if process.poll() is not None:
                raise SystemExit(f"metering exited; see {workdir / 'metering.log'}")
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except httpx.HTTPError:
                continue
            counted = 0.0
            for line in text.splitlines():
                if line.startswith(counted_re):
                    counted = float(line.split()[-1])
            if counted and first is None:
                first = (time.perf_counter(), counted)
            if counted >= samples:
                assert first is not None
                elapsed = time.perf_counter() - first[0]
                rss = rss_mb(process.pid)
                return (counted - first[1]) / elapsed if elapsed else float("inf"), rss
    finally:
        process.terminate()
        process.wait(20)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=120)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="gpumeter-bench-"))
    broker = None
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        broker = TansuBroker(workdir / "tansu.log").start()
        bootstrap = broker.bootstrap_servers
    try:
        prefix = f"bench{uuid.uuid4().hex[:6]}."
        topic = f"{prefix}gpu.usage.v1"
        asyncio.run(ensure_topics(bootstrap, {topic: 8}))
        print(f"producing {args.nodes} nodes x 8 GPUs x {args.rounds} rounds ...", flush=True)
        samples = asyncio.run(produce_fleet(bootstrap, topic, args.nodes, args.rounds))
        print(f"produced {samples:,} samples in {samples // 8:,} batched messages", flush=True)
        ceiling = asyncio.run(raw_ceiling(bootstrap, topic, samples))
        print(f"(a) raw aiokafka consume + JSON decode: {ceiling:,.0f} samples/s", flush=True)
        rate, rss = metering_end_to_end(bootstrap, prefix, samples, workdir)
        print(f"(b) metering end to end:                {rate:,.0f} samples/s  (RSS {rss:.0f} MB)")
        print(f"    ratio (b)/(a): {rate / ceiling:.2f}")
    finally:
        if broker:
            broker.stop()


if __name__ == "__main__":
    main()
