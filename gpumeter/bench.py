"""`make bench`: throughput figures on this machine, printed (never asserted).

(a) a raw aiokafka consume-and-decode loop over the usage topic: the practical ceiling;
(b) the metering service end to end on the same data: from an empty group to hourly totals that
    hold every sample, with one worker process and then with one per core (WORKER_PROCESSES);
(c) latency at a steady rate (default 15,000 GPUs at 1 Hz): from a round's first sample produced to
    the hourly total that includes the whole round, p50/p99, and the RSS of all the service's
    processes holding that many GPUs (one worker per core unless --steady-processes says).
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

from gpumeter.kafkabroker import KAFKA_VERSION, KafkaCluster
from gpumeter.localstack import TansuBroker, free_port
from services.agent.simulator import FleetConfig, FleetSimulator, usage_event
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


def produce_usage(bootstrap: str, nodes: int, rounds: int) -> tuple[str, int]:
    """A fleet's rounds on the usage topic of a new prefix; returns the prefix and samples."""
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    topic = f"{prefix}gpu.usage.v1"
    asyncio.run(ensure_topics(bootstrap, {topic: 8}))
    return prefix, asyncio.run(produce_fleet(bootstrap, topic, nodes, rounds))


def start_metering(
    bootstrap: str, prefix: str, workdir: Path, processes: int = 1
) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {
        **os.environ,
        "WORKER_PROCESSES": str(processes),
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
    return process, port


def counted_samples(metrics_text: str) -> float:
    """Samples counted, summed over a supervisor's worker processes (label `process`)."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics_text.splitlines()
        if line.startswith("gpumeter_metering_samples_total{") and 'outcome="counted"' in line
    )


def metering_end_to_end(
    bootstrap: str, prefix: str, samples: int, workdir: Path, processes: int = 1
) -> tuple[float, float]:
    """Samples/s from the first counted sample to the last, and the RSS of all its processes."""
    process, port = start_metering(bootstrap, prefix, workdir, processes)
    try:
        first = None
        with httpx.Client(timeout=5) as client:
            while True:
                time.sleep(0.1)
                if process.poll() is not None:
                    raise SystemExit(f"metering exited; see {workdir / 'metering.log'}")
                try:
                    counted = counted_samples(client.get(f"http://127.0.0.1:{port}/metrics").text)
                except httpx.HTTPError:
                    continue
                if counted and first is None:
                    first = (time.perf_counter(), counted)
                if counted >= samples:
                    assert first is not None
                    elapsed = time.perf_counter() - first[0]
                    rss = tree_rss_mb(process.pid)
                    return (counted - first[1]) / elapsed if elapsed else float("inf"), rss
    finally:
        process.terminate()
        process.wait(40)


TEMPLATE_AT = datetime(2000, 1, 1, tzinfo=UTC)
TEMPLATE_EPOCH = str(int(TEMPLATE_AT.timestamp()))
TEMPLATE_TIME = "2000-01-01T00:00:00Z"


def fleet_message(node: str, at: datetime) -> str:
    """One node's round for the steady bench: 8 busy GPUs in one project, 1 s samples."""
    events = [
        usage_event(
            node=node,
            gpu_uuid=f"GPU-{node}-{g}",
            gpu_index=g,
            gpu_model="H800",
            at=at,
            interval_s=1.0,
            project_id="bench",
            job_id="slurm:1",
            util_pct=90.0,
            mem_used_mib=1000,
            power_w=500.0,
            temp_c=50,
            xid_errors=0,
        )
        for g in range(8)
    ]
    return json.dumps(events)


async def steady_latency(
    bootstrap: str, prefix: str, gpus: int, seconds: int, warmup: int = 0
) -> tuple[list[float], int]:
    """Rounds of `gpus` samples (8 per node message) once a second with event times at real time,
    all in one project; returns the latency of each round after the first `warmup` ones (the same
    load, sent first so that the worker has joined its group and met every node) and the rounds
    measured."""
    nodes = max(1, gpus // 8)
    usage, hourly = f"{prefix}gpu.usage.v1", f"{prefix}metering.usage.hourly.v1"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=1 << 20)
    # A short fetch wait: Tansu answers a held fetch only at its next poll (~115 ms median at
    # aiokafka's default 500 ms), which would be the watcher's delay, not metering's.
    consumer = AIOKafkaConsumer(
        hourly,
        bootstrap_servers=bootstrap,
        auto_offset_reset="latest",
        group_id=None,
        fetch_max_wait_ms=50,
    )
    await producer.start()
    await consumer.start()
    sent_at: dict[int, float] = {}  # round -> monotonic time its first sample was produced
    needed: dict[int, tuple[str, int]] = {}  # round -> (hourly key, samples that include it)
    cumulative: dict[str, int] = {}
    latencies: dict[int, float] = {}

    async def watch() -> None:
        seen: dict[str, int] = {}
        while True:
            batch = await consumer.getmany(timeout_ms=100)
            now = time.monotonic()
            for records in batch.values():
                for record in records:
                    total = json.loads(record.value)
                    key = record.key.decode()
                    seen[key] = max(seen.get(key, 0), total["samples"])
            for r in [r for r, (key, n) in needed.items() if seen.get(key, 0) >= n]:
                latencies[r] = now - sent_at.pop(r)
                del needed[r]

    # Each node's message is built once with a stand-in time: the load generator shares the
    # machine's two cores with the worker and the broker, so a round costs it only a substitution.
    templates = [
        (node, fleet_message(node, TEMPLATE_AT)) for node in map("node-{:05d}".format, range(nodes))
    ]
    watcher = asyncio.create_task(watch())
    try:
        await asyncio.sleep(1.0)
        started = time.monotonic()
        first_at = datetime.now(UTC).replace(microsecond=0)
        for r in range(warmup + seconds):
            await asyncio.sleep(max(0.0, started + r - time.monotonic()))
            at = first_at + timedelta(seconds=r)  # one round a second of event time, ids unique
            key = f"bench|H800|{at.replace(minute=0, second=0).isoformat()}"
            epoch, iso = str(int(at.timestamp())), at.isoformat().replace("+00:00", "Z")
            sent_at[r] = time.monotonic()
            for node, template in templates:
                value = template.replace(TEMPLATE_EPOCH, epoch).replace(TEMPLATE_TIME, iso)
                await producer.send(usage, key=node.encode(), value=value.encode())
            cumulative[key] = cumulative.get(key, 0) + nodes * 8
            needed[r] = (key, cumulative[key])
        await producer.flush()
        deadline = time.monotonic() + 30
        while needed and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
    finally:
        watcher.cancel()
        await producer.stop()
        await consumer.stop()
    measured = [latency for r, latency in sorted(latencies.items()) if r >= warmup]
    return measured, seconds


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and its children (a supervisor and its workers)."""
    total = rss_mb(pid)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if parent == pid:
                total += rss_mb(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return total


def wait_healthy(port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("metering did not become healthy")


def latency_line(latencies: list[float], rounds: int) -> str:
    if not latencies:
        return f"no round completed of {rounds}"
    ordered = sorted(latencies)
    p50 = ordered[len(ordered) // 2]
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"sample produced -> hourly total p50 {p50 * 1000:,.0f} ms, p99 {p99 * 1000:,.0f} ms"
        f" ({len(latencies)} of {rounds} rounds seen)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=480)
    parser.add_argument(
        "--processes",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes for the second run of (b) (default: one per core)",
    )
    parser.add_argument(
        "--steady-processes",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes for (c) (default: one per core)",
    )
    parser.add_argument("--steady-gpus", type=int, default=15_000)
    parser.add_argument("--steady-seconds", type=int, default=60)
    parser.add_argument("--steady-warmup", type=int, default=10)
    parser.add_argument(
        "--broker",
        choices=("tansu", "kafka", "both"),
        default="tansu",
        help="the local broker when KAFKA_BOOTSTRAP_SERVERS names none: Tansu (the default), "
        "Apache Kafka (one KRaft node), or both, one after the other, for the record",
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="gpumeter-bench-"))
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        print(f"=== broker: {external} (KAFKA_BOOTSTRAP_SERVERS)", flush=True)
        run_all(external, args, workdir)
        return
    for kind in ("tansu", "kafka") if args.broker == "both" else (args.broker,):
        broker: TansuBroker | KafkaCluster
        if kind == "kafka":
            broker = KafkaCluster(workdir / "kafka").start()
            print(f"=== broker: Apache Kafka {KAFKA_VERSION}, one KRaft node", flush=True)
        else:
            broker = TansuBroker(workdir / "tansu.log").start()
            print("=== broker: Tansu (in memory)", flush=True)
        try:
            run_all(broker.bootstrap_servers, args, workdir)
        finally:
            broker.stop()


def run_all(bootstrap: str, args: argparse.Namespace, workdir: Path) -> None:
    """(a), (b) and (c) on the broker at `bootstrap`."""
    print(f"producing {args.nodes} nodes x 8 GPUs x {args.rounds} rounds ...", flush=True)
    prefix, samples = produce_usage(bootstrap, args.nodes, args.rounds)
    print(f"produced {samples:,} samples in {samples // 8:,} batched messages", flush=True)
    ceiling = asyncio.run(raw_ceiling(bootstrap, f"{prefix}gpu.usage.v1", samples))
    print(f"(a) raw aiokafka consume + JSON decode: {ceiling:,.0f} samples/s", flush=True)
    rate, rss = metering_end_to_end(bootstrap, prefix, samples, workdir)
    print(
        f"(b) metering end to end, 1 worker process: {rate:,.0f} samples/s"
        f"  (RSS {rss:.0f} MB; ratio to (a) {rate / ceiling:.2f})",
        flush=True,
    )
    if args.processes > 1:
        # The same data again under a new prefix: a fresh group and fresh internal topics.
        prefix, samples = produce_usage(bootstrap, args.nodes, args.rounds)
        rate, rss = metering_end_to_end(bootstrap, prefix, samples, workdir, args.processes)
        print(
            f"(b) metering end to end, {args.processes} worker processes"
            f" (WORKER_PROCESSES={args.processes}): {rate:,.0f} samples/s"
            f"  (RSS {rss:.0f} MB in all; ratio to (a) {rate / ceiling:.2f})",
            flush=True,
        )
    if args.steady_seconds:
        steady_prefix = f"bench{uuid.uuid4().hex[:6]}."
        asyncio.run(ensure_topics(bootstrap, {f"{steady_prefix}gpu.usage.v1": 8}))
        process, port = start_metering(bootstrap, steady_prefix, workdir, args.steady_processes)
        try:
            wait_healthy(port)
            latencies, rounds = asyncio.run(
                steady_latency(
                    bootstrap,
                    steady_prefix,
                    args.steady_gpus,
                    args.steady_seconds,
                    args.steady_warmup,
                )
            )
            rss = tree_rss_mb(process.pid)
        finally:
            process.terminate()
            process.wait(40)
        print(
            f"(c) steady {args.steady_gpus:,} GPUs at 1 Hz for {rounds} s,"
            f" {args.steady_processes} worker process(es): "
            + latency_line(latencies, rounds)
            + f" after {args.steady_warmup} s at the same rate"
            + f"  (RSS {rss:.0f} MB)"
        )


if __name__ == "__main__":
    main()
