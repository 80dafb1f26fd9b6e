"""Alert latency end to end: usage samples -> metering -> cluster minutes -> alerts -> a webhook.

    python -m gpumeter.bench_alerts [--nodes 1875] [--gpus 8] [--crossings 3]

Starts a Tansu broker and an embedded PostgreSQL (or uses KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL),
the metering service and the alerts service with one allocation rule (>= 0.90, clears below 0.85,
`for: 0`) and the service's default settings otherwise (sub-minute evaluation on, one minute of
lateness), and a local HTTP receiver. It produces one 1-second sample per GPU per second (a batch
per node, keyed by node) with event times at real time: allocation sits at 50% and is switched to
100% for whole minutes, `--crossings` times, each followed by a minute at 50%. `--nodes` x
`--gpus` is the target sample rate: 1875 x 8 = 15,000 samples/s.

It prints, for firing and for resolved, p50/p99 of three delays, all on this machine's clock:
- crossing -> notification: from sending the first sample past the threshold (the first sample
  of the crossing minute) to the webhook receiving the notification;
- metering's share: from that sample to metering producing the first cluster-minute record that
  shows the crossing and covers enough of the centre to be evaluated (the alerts service's guard:
  at least 95% of the GPUs of the last complete minute; here every GPU reports every second);
- the alerts service's share: from that record's production (its Kafka timestamp) to the
  notification received.
It also prints the sample rate the producer sustained and how many samples metering had counted
when production stopped (metering's sustained rate). Figures are printed, never asserted.

The alerts service evaluates the minute in progress as metering's cumulative record grows, so a
crossing at the start of a minute is noticed once metering has counted the centre's first samples
of that minute; before sub-minute evaluation it waited for the whole minute (about 60 s more).
If metering cannot keep up with the rate, its share grows without bound over the run: compare a
rate metering sustains (e.g. `--nodes 125`, 1,000 samples/s) with the target.
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
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from gpumeter.localstack import EmbeddedPostgres, TansuBroker, free_port
from services.agent.simulator import usage_event

REPO_ROOT = Path(__file__).resolve().parents[2]
MINUTE_S = 60
THRESHOLD, CLEAR = 0.90, 0.85
GUARD = 0.95  # the alerts service's default ALERT_SUB_MINUTE_MIN_GPUS_RATIO

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
            def do_POST(self) -> None:
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
    """One 1-second sample per GPU per second at real time; allocation 100% in the chosen minutes.

    A sample stamped `t` covers (t - 1, t] and belongs to the minute containing t - 1, so the
    first sample of minute m is stamped m + 1 s.
    """

    def __init__(self, nodes: int, gpus: int, high_minutes: set[int]) -> None:
        self.nodes = [f"bench-node-{n:04d}" for n in range(nodes)]
        self.gpus = gpus
        self.high_minutes = high_minutes  # epoch minute numbers with 100% allocation
        self.first_sample_sent: dict[int, float] = {}  # sample time (epoch s) -> wall time sent
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
                high = (second - 1) // MINUTE_S in self.high_minutes
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


@dataclass(frozen=True)
class MinuteRecord:
    produced: float  # Kafka timestamp (metering's producer), epoch seconds
    minute: int  # epoch minute number
    allocation_ratio: float
    gpus_online: int


async def read_cluster_minutes(bootstrap: str, topic: str) -> list[MinuteRecord]:
    """Every record metering wrote to the cluster-minute topic, in topic order per partition."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        # A bare consumer has no topic's metadata on Apache Kafka: ask for this one.
        await consumer._client.set_topics([topic])
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        if not partitions:
            return []
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records: list[MinuteRecord] = []
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
            for messages in batch.values():
                for message in messages:
                    value = json.loads(message.value)
                    records.append(
                        MinuteRecord(
                            message.timestamp / 1000,
                            int(datetime.fromisoformat(value["minute_start"]).timestamp())
                            // MINUTE_S,
                            float(value["allocation_ratio"]),
                            int(value["gpus_online"]),
                        )
                    )
        return records
    finally:
        await consumer.stop()


def deciding_record(
    records: list[MinuteRecord], minute: int, gpus: int, firing: bool
) -> MinuteRecord | None:
    """The first record of `minute` that shows the crossing and that the alerts service evaluates."""
    for record in records:
        if record.minute != minute or record.gpus_online < GUARD * gpus:
            continue
        if (record.allocation_ratio >= THRESHOLD) if firing else (record.allocation_ratio < CLEAR):
            return record
    return None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpumeter.bench_alerts", description=__doc__)
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
        metering_url = f"http://127.0.0.1:{metering_port}/metrics"
        counted_when_done = counted_samples(httpx.get(metering_url, timeout=5).text)
        expected = 2 * args.crossings
        deadline = time.time() + 180
        while time.time() < deadline:
            with receiver.lock:
                if len(receiver.received) >= expected:
                    break
            time.sleep(1)
        counted = counted_samples(httpx.get(metering_url, timeout=5).text)
        records = asyncio.run(
            read_cluster_minutes(bootstrap, f"{prefix}metering.cluster.minutely.v1")
        )
    report(args, load, receiver, high, produced_s, (counted_when_done, counted), records)
    return 0


def counted_samples(metering_metrics: str) -> float:
    return next(
        (
            float(line.split()[-1])
            for line in metering_metrics.splitlines()
            if line.startswith('gpumeter_metering_samples_total{outcome="counted"}')
        ),
        0.0,
    )


def report(
    args: argparse.Namespace,
    load: Load,
    receiver: Receiver,
    high: set[int],
    produced_s: float,
    counted: tuple[float, float],
    records: list[MinuteRecord],
) -> None:
    gpus = args.nodes * args.gpus
    delays: dict[str, tuple[list[float], list[float], list[float]]] = {
        "firing": ([], [], []),
        "resolved": ([], [], []),
    }
    with receiver.lock:
        received = list(receiver.received)
    for arrived, status, starts_at, ends_at in received:
        firing = status == "firing"
        # starts_at (firing) and ends_at (resolved) are the start of the crossing minute
        minute_start = int(datetime.fromisoformat(starts_at if firing else ends_at).timestamp())
        minute = minute_start // MINUTE_S
        crossing_sample = minute_start + 1
        if (minute in high if firing else minute - 1 in high) and (
            crossing_sample in load.first_sample_sent
        ):
            sent = load.first_sample_sent[crossing_sample]
            total, metering, alerts = delays[status]
            total.append(arrived - sent)
            record = deciding_record(records, minute, gpus, firing)
            if record is not None:
                metering.append(record.produced - sent)
                alerts.append(arrived - record.produced)
    rate = load.samples / produced_s
    when_done, at_end = counted
    print(f"produced {load.samples} samples in {produced_s:.0f} s: {rate:.0f} samples/s sustained")
    print(f"producer rounds that started late (could not keep 1 Hz): {load.late_rounds}")
    print(
        f"metering had counted {when_done:.0f} samples when production stopped "
        f"({when_done / produced_s:.0f} samples/s), {at_end:.0f} at the end"
    )
    for name, (total, metering, alerts) in delays.items():
        if not total:
            print(f"{name}: no notification matched a crossing (expected {args.crossings})")
            continue
        print(
            f"{name}: {len(total)}/{args.crossings} notifications; crossing -> notification "
            f"{_p50_p99(total)}; metering's share (sample -> minute record) {_p50_p99(metering)}; "
            f"alerts' share (minute record -> notification) {_p50_p99(alerts)}"
        )


def _p50_p99(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"p50 {statistics.median(values):.1f} s, p99 {percentile(values, 0.99):.1f} s"


if __name__ == "__main__":
    sys.exit(main())
