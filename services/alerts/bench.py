"""Alert latency end to end: usage samples -> metering -> cluster minutes -> alerts -> a webhook.

    python -m services.alerts.bench [--nodes 1875] [--gpus 8] [--crossings 3]

Starts a Tansu broker and an embedded PostgreSQL (or uses KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL),
the metering service and the alerts service with one allocation rule (>= 0.90, clears below 0.85,
`for: 0`), and a local HTTP receiver. It produces one sample per GPU per second (a batch per node,
keyed by node) with event times at real time: allocation sits at 50% and is switched to 100% for
whole minutes, `--crossings` times, each followed by a minute at 50%. It prints p50/p99 from the
production of the first sample past the threshold to the notification received, for firing and
for resolved, and the sample rate actually sustained. Figures are printed, never asserted.

The alert evaluates whole cluster minutes, once the next minute has been seen (lateness 0 here):
a crossing at the start of a minute is notified at best one minute later. The figure is that
minute plus the pipeline's own delay, which is printed separately.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import asyncpg
import httpx
from aiokafka import AIOKafkaProducer

from gpumeter.localstack import EmbeddedPostgres, TansuBroker, free_port
from services.agent.simulator import usage_event

REPO_ROOT = Path(__file__).resolve().parents[2]
MINUTE_S = 60

RULES = """\
rules:
  - name: BenchAllocationHigh
    signal: cluster.allocation_ratio
    op: ">="
    threshold: "0.90"
    clear_threshold: "0.85"
    labels: {severity: warning}
receivers:
  - name: webhook
    type: webhook
    url_env: ALERT_WEBHOOK_URL
routes:
  - receivers: [webhook]
"""


class Receiver:
    """Records (arrival wall time, status, startsAt, endsAt) of every webhook notification."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[tuple[float, str, str, str]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                arrived = time.time()
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with receiver.lock:
                    for alert in body["alerts"]:
                        receiver.received.append(
                            (arrived, alert["status"], alert["startsAt"], alert["endsAt"])
                        )
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def child(module: str, env: dict[str, str], log: Path, port: int) -> Iterator[subprocess.Popen]:
    process = subprocess.Popen(
        [sys.executable, "-m", module],
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        cwd=REPO_ROOT,
        stdout=open(log, "ab"),  # noqa: SIM115 - owned by the child
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{module} exited with {process.returncode}; see {log}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{module} not healthy after 120 s; see {log}")
            time.sleep(0.5)
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def fresh_database(admin_dsn: str) -> str:
    name = f"alerts_bench_{uuid.uuid4().hex[:8]}"

    async def run() -> None:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(run())
    return f"{admin_dsn.rsplit('/', 1)[0]}/{name}"


class Load:
    """One sample per GPU per second at real time; allocation 100% in the chosen minutes."""

    def __init__(self, nodes: int, gpus: int, high_minutes: set[int]) -> None:
        self.nodes = [f"bench-node-{n:04d}" for n in range(nodes)]
        self.gpus = gpus
        self.high_minutes = high_minutes  # epoch minute numbers with 100% allocation
        self.first_sample_sent: dict[int, float] = {}  # epoch second -> wall time sent
        self.samples = 0
        self.late_rounds = 0

    def batch(self, node_index: int, node: str, at: datetime, high: bool) -> bytes:
        events = []
        for gpu in range(self.gpus):
            allocated = high or (node_index * self.gpus + gpu) % 2 == 0  # 50% when not high
            events.append(
                usage_event(
                    node=node,
                    gpu_uuid=f"GPU-{node}-{gpu}",
                    gpu_index=gpu,
                    gpu_model="H800",
                    at=at,
                    interval_s=1.0,
                    project_id="bench-project" if allocated else None,
                    job_id="bench-job" if allocated else None,
                    util_pct=80.0 if allocated else 0.0,
                    mem_used_mib=1000,
                    power_w=300.0,
                    temp_c=50,
                    xid_errors=0,
                )
            )
        return json.dumps(events).encode()

    async def run(self, bootstrap: str, topic: str, until: float) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20, acks=1
        )
        await producer.start()
        try:
            second = int(time.time())
            while second < until:
                delay = second + 1 - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)  # sample time `second` is sent just after it ends
                else:
                    self.late_rounds += 1
                at = datetime.fromtimestamp(second, UTC)
                high = second // MINUTE_S in self.high_minutes
                for index, node in enumerate(self.nodes):
                    await producer.send(
                        topic, key=node.encode(), value=self.batch(index, node, at, high)
                    )
                    if index == 0:
                        self.first_sample_sent[second] = time.time()
                self.samples += len(self.nodes) * self.gpus
                second += 1
            await producer.flush()
        finally:
            await producer.stop()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.alerts.bench", description=__doc__)
    parser.add_argument("--nodes", type=int, default=1875)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--crossings", type=int, default=3)
    parser.add_argument("--usage-partitions", type=int, default=8)
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the broker, database and services started here are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="gpumeter-alerts-bench-"))
    with ExitStack() as stack:
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "")
        if not bootstrap:
            broker = TansuBroker(work / "tansu.log").start()
            stack.callback(broker.stop)
            bootstrap = broker.bootstrap_servers
        admin_dsn = os.environ.get("DATABASE_URL", "")
        if not admin_dsn:
            postgres = EmbeddedPostgres(work / "pgdata").start()
            stack.callback(postgres.stop)
            admin_dsn = postgres.dsn()
        database_url = fresh_database(admin_dsn)
        prefix = f"bench{uuid.uuid4().hex[:6]}."
        receiver = Receiver()
        stack.callback(receiver.stop)
        rules = work / "rules.yaml"
        rules.write_text(RULES)
        common = {
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "TOPIC_PREFIX": prefix,
            "KAFKA_REBALANCE_TIMEOUT_MS": "3000",
            "LOG_LEVEL": "WARNING",
        }
        metering_port, alerts_port = free_port(), free_port()
        stack.enter_context(
            child(
                "services.metering",
                {
                    **common,
                    "HTTP_PORT": str(metering_port),
                    "USAGE_PARTITIONS": str(args.usage_partitions),
                },
                work / "metering.log",
                metering_port,
            )
        )
        stack.enter_context(
            child(
                "services.alerts",
                {
                    **common,
                    "HTTP_PORT": str(alerts_port),
                    "DATABASE_URL": database_url,
                    "ALERT_RULES_FILE": str(rules),
                    "ALERT_WEBHOOK_URL": receiver.url,
                    "ALERT_MINUTE_LATENESS_S": "0",
                    "ALERT_OUTBOX_POLL_INTERVAL_S": "0.2",
                },
                work / "alerts.log",
                alerts_port,
            )
        )
        # A warm-up minute at 50%, then [100%, 50%] minute pairs, then one more minute to resolve.
        first = int(time.time()) // MINUTE_S + 2
        high = {first + 2 * k for k in range(args.crossings)}
        until = (first + 2 * args.crossings + 1) * MINUTE_S + 5
        load = Load(args.nodes, args.gpus, high)
        print(
            f"alerts bench: {args.nodes} nodes x {args.gpus} GPUs at 1 Hz "
            f"({args.nodes * args.gpus} samples/s target), {args.crossings} crossings, "
            f"about {(until - time.time()) / 60:.1f} min; logs in {work}",
            flush=True,
        )
        started = time.time()
        asyncio.run(load.run(bootstrap, f"{prefix}gpu.usage.v1", until))
        produced_s = time.time() - started
        expected = 2 * args.crossings
        deadline = time.time() + 180
        while time.time() < deadline:
            with receiver.lock:
                if len(receiver.received) >= expected:
                    break
            time.sleep(1)
        metrics = httpx.get(f"http://127.0.0.1:{metering_port}/metrics", timeout=5).text
    report(args, load, receiver, high, produced_s, metrics)
    return 0


def report(
    args: argparse.Namespace,
    load: Load,
    receiver: Receiver,
    high: set[int],
    produced_s: float,
    metering_metrics: str,
) -> None:
    firing, resolved, firing_pipeline, resolved_pipeline = [], [], [], []
    with receiver.lock:
        received = list(receiver.received)
    for arrived, status, starts_at, ends_at in received:
        if status == "firing":
            crossing = int(datetime.fromisoformat(starts_at).timestamp())
            if crossing // MINUTE_S in high and crossing in load.first_sample_sent:
                firing.append(arrived - load.first_sample_sent[crossing])
                firing_pipeline.append(arrived - (crossing + MINUTE_S))
        else:
            crossing = int(datetime.fromisoformat(ends_at).timestamp())
            if (crossing // MINUTE_S) - 1 in high and crossing in load.first_sample_sent:
                resolved.append(arrived - load.first_sample_sent[crossing])
                resolved_pipeline.append(arrived - (crossing + MINUTE_S))
    samples_metric = next(
        (
            float(line.split()[-1])
            for line in metering_metrics.splitlines()
            if line.startswith('gpumeter_metering_samples_total{outcome="counted"}')
        ),
        0.0,
    )
    rate = load.samples / produced_s
    print(f"produced {load.samples} samples in {produced_s:.0f} s: {rate:.0f} samples/s sustained")
    print(f"producer rounds that started late (could not keep 1 Hz): {load.late_rounds}")
    print(f"metering counted {samples_metric:.0f} samples (behind if far below those produced)")
    for name, values, pipeline in (
        ("firing", firing, firing_pipeline),
        ("resolved", resolved, resolved_pipeline),
    ):
        if not values:
            print(f"{name}: no notification matched a crossing (expected {args.crossings})")
            continue
        print(
            f"{name}: {len(values)}/{args.crossings} notifications; crossing sample produced -> "
            f"received p50 {statistics.median(values):.1f} s, p99 {percentile(values, 0.99):.1f} s;"
            f" of which after the minute closed p50 {statistics.median(pipeline):.1f} s, "
            f"p99 {percentile(pipeline, 0.99):.1f} s"
        )


if __name__ == "__main__":
    sys.exit(main())
