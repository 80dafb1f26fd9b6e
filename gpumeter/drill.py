"""`python -m gpumeter.drill` (or `gpumeter drill`): the fault drill.

The whole local stack with the simulated fleet, then, one after the other: metering, billing and
alerts each killed with SIGKILL and restarted; the agents' link to the broker cut for `--outage-s`
through a TCP proxy (they spool on disk meanwhile); PostgreSQL restarted. On a cluster of three
Apache Kafka nodes (`--broker kafka --kafka-nodes 3`: replication factor 3, min.insync.replicas=2,
acks=all) it also SIGKILLs the leader of gpu.usage.v1's busiest partition and of a metering
changelog partition and restarts each, then cuts one node off from clients and the controller
quorum for `--isolate-s`, and reports what each fault did to metering's lag. Then the fleet stops,
the pipeline drains, and the drill checks the outcome against what the samples imply:

- every invoice (GET /v1/invoices) equals, to the cent, the invoice docs/contracts.md §4 gives for
  the distinct valid samples on gpu.usage.v1 and the catalog in the database (computed with
  billing's own engine, services/billing/domain.py, so the drill checks the pipeline, not a second
  copy of the arithmetic);
- every sample the simulated fleet produced reached the broker (the fleet is seeded, so the drill
  regenerates it) and none is left in the agents' spool;
- every alert state change (fingerprint, status, startsAt) reached the webhook exactly once and is
  on alerts.v1, and every state GET /v1/alerts shows was notified.

It prints each step with a timestamp as it happens and a report at the end; exit status 0 only if
nothing was lost, nothing was counted twice and no notification was duplicated (1 otherwise, 2 if
the drill itself could not run).

Repeat notifications (`repeat_interval`) are removed from the drill's copy of the alert rules: a
repeat re-sends the same (fingerprint, status, startsAt), so with repeats on, a duplicate could not
be told from a repeat.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import yaml
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import ConsumerRecord, TopicPartition

from gpumeter.cli import kafka_node_count
from gpumeter.proxy import KafkaProxyGroup
from gpumeter.stack import REPO_ROOT, Stack, StackOptions, create_database, scrape
from schemas.codec import InvalidUsage, decode_usage_message
from schemas.topics import Topics
from services.agent.simulator import FleetConfig, FleetSimulator, aligned
from services.agent.spool import spooled_events, spooled_files
from services.billing import domain
from services.billing.store import load_pricing

SERVICES = ("metering", "billing", "alerts")
BEYOND_RETENTION = timedelta(hours=6)  # metering's hour_retention_s: older than a node's newest


@dataclass
class DrillOptions:
    nodes: int = 8
    speed: float = 1800.0
    interval_s: float = 60.0
    start: str | None = None  # None: far enough back that the fleet is still replaying at the end
    partitions: int = 8
    outage_s: float = 60.0
    postgres_down_s: float = 5.0  # how long PostgreSQL stays down in its restart
    settle_s: float = 20.0  # how long the stack runs before the first fault and between faults
    drain_timeout_s: float = 600.0
    stable_s: float = 30.0  # numbers unchanged this long (with metering lag 0): drained
    progress_s: float = 10.0
    data_dir: Path | None = None
    keep: bool = False
    broker: str = "tansu"  # or "kafka": Apache Kafka in KRaft mode, `kafka_nodes` of them
    kafka_nodes: int = 1  # 3 or more: the leader kills and the isolation below run too
    isolate_s: float = 60.0  # how long one Kafka node is cut off from clients and the quorum


@dataclass
class FaultEffect:
    """What a broker fault did to the pipeline: metering's lag (messages behind) at its peak and
    how long after the fault ended it was back at its level before; the agents' failed sends and
    spool (samples waiting for the broker) at their peak."""

    fault: str
    lag_before: float = 0.0
    lag_peak: float = 0.0
    caught_up_s: float | None = None  # None: not back within the wait
    send_failures: float = 0.0
    spool_peak: int = 0

    def line(self) -> str:
        back = (
            f"{self.caught_up_s:.1f} s" if self.caught_up_s is not None else "not within the wait"
        )
        return (
            f"{self.fault}: metering lag {self.lag_before:.0f} before, peak {self.lag_peak:.0f}, "
            f"back {back} after it ended; agents: {self.send_failures:.0f} failed sends, "
            f"spool peak {self.spool_peak} samples"
        )


@dataclass
class Step:
    at_s: float
    text: str
    took_s: float | None = None


@dataclass
class Findings:
    """What the checks found; `failures` is what makes the drill fail."""

    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    lost: int = 0
    double_counted: int = 0
    duplicate_notifications: int = 0
    mismatches: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.lines.append(text)

    def fail(self, text: str) -> None:
        self.failures.append(text)


@dataclass
class UsageFacts:
    """Facts about gpu.usage.v1, read back whole after the fleet stopped."""

    messages: int = 0
    events: int = 0
    distinct: int = 0
    duplicates: int = 0
    invalid: Counter[str] = field(default_factory=Counter)
    out_of_order: int = 0
    beyond_retention: int = 0
    ids: set[tuple[str, str]] = field(default_factory=set)
    # (project, gpu_model, hour) -> GPU-seconds of allocated samples, as metering should count them
    gpu_seconds: dict[tuple[str, str, datetime], Decimal] = field(
        default_factory=lambda: defaultdict(Decimal)
    )
    first_time: datetime | None = None
    last_time: datetime | None = None


def say(text: str) -> None:
    print(text, flush=True)


class Drill:
    def __init__(self, options: DrillOptions) -> None:
        self.options = options
        self.started = time.monotonic()
        self.steps: list[Step] = []
        self.proxy: KafkaProxyGroup | None = None
        self.effects: list[FaultEffect] = []
        self.stack: Stack | None = None
        self.sim_start: datetime | None = None
        self.agent_metrics: dict[str, float] = {}
        self.spool_left = 0
        self.spool_ids: set[tuple[str, str]] = set()  # (source, id) of what the agents left spooled
        self.findings = Findings()
        self.topics = Topics()
        self.data_dir: Path
        self.notes: list[str] = []
        self.crashes: list[str] = []  # services that exited on their own (restarted, reported)
        self.down: set[str] = set()  # exited on their own, noted, not restarted yet

    # --- output -----------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def step(self, text: str) -> Step:
        step = Step(self.elapsed(), text)
        self.steps.append(step)
        say(f"[{time.strftime('%H:%M:%S')} +{step.at_s:6.1f}s] {text}")
        return step

    def progress(self, text: str) -> None:
        say(f"[{time.strftime('%H:%M:%S')} +{self.elapsed():6.1f}s]     {text}")

    # --- the run ----------------------------------------------------------------------------

    def run(self) -> int:
        opts = self.options
        try:
            self.prepare()
            self.start_stack()
            self.run_for(opts.settle_s, "let it run")
            for name in SERVICES:
                self.kill_and_restart(name)
                self.run_for(opts.settle_s, "let it run")
            self.cut_link()
            self.run_for(opts.settle_s, "let it run")
            self.restart_postgres()
            self.run_for(opts.settle_s, "let it run")
            if self.cluster_faults:
                self.kill_leader(self.topics.usage, "the busiest usage partition")
                self.run_for(opts.settle_s, "let it run")
                self.kill_leader("-changelog", "a metering changelog partition")
                self.run_for(opts.settle_s, "let it run")
                self.isolate_broker()
                self.run_for(opts.settle_s, "let it run")
            self.stop_fleet()
            facts = self.check_usage()
            self.check_invoices(facts)
            self.check_alerts()
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - reported, then everything stops
            self.step(f"the drill could not go on: {type(exc).__name__}: {exc}")
            traceback.print_exc()
            self.shutdown(keep=True)
            say(f"RESULT: DRILL FAILED TO RUN (logs and data kept in {self.data_dir})")
            return 2
        passed = not self.findings.failures
        self.shutdown(keep=self.options.keep or not passed)
        self.report(passed)
        return 0 if passed else 1

    @property
    def groups(self) -> list[str]:
        """The consumer groups of the pipeline after the agents: metering's and billing's."""
        return [f"{self.topics.prefix}gpumeter-metering", f"{self.topics.prefix}billing"]

    @property
    def cluster_faults(self) -> bool:
        """Broker faults need a cluster that survives one node's loss: three Kafka nodes."""
        return (
            self.options.broker == "kafka"
            and self.options.kafka_nodes >= 3
            and not os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        )

    def prepare(self) -> None:
        opts = self.options
        if opts.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="gpumeter-drill-"))
        else:
            self.data_dir = opts.data_dir
            if self.data_dir.exists() and any(self.data_dir.iterdir()):
                raise SystemExit(f"{self.data_dir} is not empty: the drill needs a fresh directory")
            self.data_dir.mkdir(parents=True, exist_ok=True)
        prefix = ""
        if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
            prefix = f"drill{uuid.uuid4().hex[:8]}."  # a shared broker: topics of our own
            self.notes.append(f"existing broker: topics, groups and app ids prefixed {prefix}")
        self.topics = Topics(prefix)
        database_url = os.environ.get("DATABASE_URL")
        if database_url:
            name = f"drill_{uuid.uuid4().hex[:10]}"
            base = database_url.rsplit("/", 1)[0]
            asyncio.run(create_database(f"{base}/postgres", name))
            os.environ["DATABASE_URL"] = f"{base}/{name}"
            self.notes.append(f"existing PostgreSQL: fresh database {name}; it is not restarted")
        rules = yaml.safe_load((REPO_ROOT / "deploy" / "alert-rules.yaml").read_text())
        for rule in rules.get("rules", []):
            rule.pop("repeat_interval", None)
        rules_path = self.data_dir / "alert-rules.drill.yaml"
        rules_path.write_text(yaml.safe_dump(rules, sort_keys=False))
        # Start far enough back that the fleet still replays (faster than real time) at the end,
        # so the link cut meets a full stream of samples.
        now = datetime.now(UTC)
        if opts.start is None:
            planned_s = 5 * opts.settle_s + opts.outage_s + 150
            if self.cluster_faults:  # two leader kills and an isolation, each settled after
                planned_s += 5 * opts.settle_s + opts.isolate_s + 60
            self.sim_start = aligned(
                now - timedelta(seconds=planned_s * opts.speed * 1.5), opts.interval_s
            )
        else:
            from services.agent.__main__ import parse_when

            self.sim_start = aligned(parse_when(opts.start, now), opts.interval_s)

    def start_stack(self) -> None:
        opts = self.options
        assert self.sim_start is not None
        broker = "Tansu" if opts.broker == "tansu" else f"Apache Kafka x{opts.kafka_nodes}"
        self.step(
            f"start the stack on {broker}: {opts.nodes} simulated nodes x 8 GPUs from "
            f"{self.sim_start.isoformat()} at {opts.speed:g}x, agents behind a TCP proxy"
        )

        def through_proxy(bootstrap: str) -> str:
            self.proxy = KafkaProxyGroup(bootstrap).start()
            return self.proxy.bootstrap_servers

        self.stack = Stack(
            StackOptions(
                data_dir=self.data_dir,
                nodes=opts.nodes,
                speed=opts.speed,
                start=self.sim_start.isoformat(),
                interval_s=opts.interval_s,
                partitions=opts.partitions,
                rules=self.data_dir / "alert-rules.drill.yaml",
                topic_prefix=self.topics.prefix,
                broker=opts.broker,
                kafka_nodes=opts.kafka_nodes,
                kafka_netns=self.cluster_faults,
                agent_bootstrap=through_proxy,
                agent_env={
                    "AGENT_SPOOL_DIR": str(self.data_dir / "agent-spool"),
                    "AGENT_SHUTDOWN_FLUSH_S": "120",
                },
            )
        )
        began = time.monotonic()
        self.stack.start()
        assert self.proxy is not None
        self.step(
            f"stack up in {time.monotonic() - began:.1f} s; agents -> proxy "
            f"{self.proxy.bootstrap_servers} -> broker {self.stack.env['KAFKA_BOOTSTRAP_SERVERS']}"
        ).took_s = time.monotonic() - began

    def run_for(
        self,
        seconds: float,
        what: str,
        until: Callable[[], bool] | None = None,
        watch: FaultEffect | None = None,
    ) -> None:
        """Let the stack run, printing progress; checks that no child died on its own."""
        if seconds <= 0:
            return
        self.step(f"{what} for {seconds:g} s")
        deadline = time.monotonic() + seconds
        next_progress = time.monotonic() + self.options.progress_s
        while time.monotonic() < deadline:
            self.supervise()
            if until is not None and until():
                return
            if watch is not None:
                self.observe(watch)
            if time.monotonic() >= next_progress:
                self.progress(self.status_line())
                next_progress += self.options.progress_s
            time.sleep(0.5)

    def supervise(self, restart: bool = True) -> None:
        """Restart a service that exited on its own, as systemd or Kubernetes would, and note it:
        the drill goes on to check the money, and the report names the crash."""
        assert self.stack is not None
        for name in SERVICES:
            child = self.stack.children[name]
            if child.poll() is None or (not restart and name in self.down):
                continue
            if name in self.down:  # noted when it exited; now is the time to restart it
                self.step(f"restart {name}, which exited on its own")
                self.down.discard(name)
                self.stack.respawn(name)
                continue
            log = self.stack.logs / f"{name}.log"
            last_error = last_exception_line(log)
            self.crashes.append(
                f"{name} exited on its own with status {child.returncode} at "
                f"+{self.elapsed():.0f} s ({last_error}); see {log}"
            )
            self.step(
                f"{name} EXITED ON ITS OWN (status {child.returncode}: {last_error}); "
                + ("restarting it as a supervisor would" if restart else "restarted later")
            )
            if restart:
                self.down.discard(name)
                self.stack.respawn(name)
            else:
                self.down.add(name)
        agent = self.stack.children.get("agent")
        if agent is not None and agent.poll() is not None:
            raise SystemExit(f"the simulated fleet exited with {agent.returncode}")

    def wait_healthy(self, name: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.supervise()
            assert self.stack is not None
            with contextlib.suppress(httpx.HTTPError):
                url = f"http://127.0.0.1:{self.stack.ports[name]}/healthz"
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        raise SystemExit(f"{name} not healthy after {timeout_s:g} s")

    def status_line(self) -> str:
        assert self.stack is not None
        agent = self.agent_health()
        lag = metering_lag(self.stack)
        return (
            f"fleet at {str(agent.get('simulated_time', '-'))[:19]}, "
            f"spooled {agent.get('spool_samples', '-')}, broker up {agent.get('broker_up', '-')}; "
            f"metering lag {lag if lag is not None else '-'}; "
            f"{len(self.stack.inbox.received)} webhook notifications"
        )

    def agent_health(self) -> dict[str, Any]:
        assert self.stack is not None
        try:
            body = httpx.get(
                f"http://127.0.0.1:{self.stack.ports['agent']}/healthz", timeout=2
            ).json()
            return body if isinstance(body, dict) else {}
        except (httpx.HTTPError, ValueError):
            return {}

    def kill_and_restart(self, name: str) -> None:
        assert self.stack is not None
        pid = self.stack.children[name].pid
        step = self.step(f"SIGKILL {name} (pid {pid})")
        self.stack.kill(name, signal.SIGKILL)
        began = time.monotonic()
        self.stack.respawn(name)
        step.took_s = time.monotonic() - began
        self.step(
            f"{name} restarted (pid {self.stack.children[name].pid}), healthy after "
            f"{step.took_s:.1f} s"
        )

    def cut_link(self) -> None:
        assert self.proxy is not None
        before = self.agent_health()
        step = self.step(
            f"cut the agents' link to the broker for {self.options.outage_s:g} s "
            f"(fleet at {str(before.get('simulated_time', '-'))[:19]})"
        )
        self.proxy.cut()
        began = time.monotonic()
        deadline = began + self.options.outage_s
        next_progress = began + min(self.options.progress_s, 5.0)
        peak = 0
        while time.monotonic() < deadline:
            time.sleep(0.5)
            if time.monotonic() >= next_progress:
                agent = self.agent_health()
                peak = max(peak, int(agent.get("spool_samples") or 0))
                self.progress(
                    f"link cut {time.monotonic() - began:.0f} s: agents spooled "
                    f"{agent.get('spool_samples', '-')} samples, broker up {agent.get('broker_up')}"
                )
                next_progress += min(self.options.progress_s, 5.0)
        agent = self.agent_health()
        peak = max(peak, int(agent.get("spool_samples") or 0))
        self.proxy.restore()
        step.took_s = time.monotonic() - began
        self.step(
            f"link restored after {step.took_s:.1f} s; {agent.get('spool_samples')} samples "
            f"spooled (peak {peak}); waiting for the agents to deliver them"
        )
        began = time.monotonic()
        deadline = began + max(120.0, self.options.outage_s * 3)
        backlog = max(peak // 10, self.options.nodes * 8 * 64)
        while time.monotonic() < deadline:
            agent = self.agent_health()
            if agent.get("broker_up") and int(agent.get("spool_samples") or 0) <= backlog:
                break
            time.sleep(1)
        self.step(
            f"agents delivering again after {time.monotonic() - began:.1f} s "
            f"(spool {agent.get('spool_samples')} samples, broker up {agent.get('broker_up')})"
        )

    # --- broker faults (a three-node Kafka) -------------------------------------------------------

    def kill_leader(self, topic: str, what: str) -> None:
        """SIGKILL the Kafka node leading the partition of `topic` (a name, or a suffix like
        "-changelog" for the first such topic of this run) with the most messages, let the stack
        run without it, then start it again on its data."""
        assert self.stack is not None and self.stack.kafka is not None
        kafka = self.stack.kafka
        found = asyncio.run(busiest_partition(kafka.bootstrap_servers, topic, self.topics.prefix))
        if found is None:
            raise SystemExit(f"no partition of a topic {topic!r} to kill the leader of")
        name, partition, leader, messages = found
        step = self.step(
            f"SIGKILL Kafka node {leader}, leader of {what} ({name}[{partition}], "
            f"{messages:,} messages)"
        )
        effect = self.watch_fault(f"leader of {what} killed")
        began = time.monotonic()
        kafka.kill_node(leader)
        self.run_for(self.options.settle_s, f"run without node {leader}", watch=effect)
        self.leadership_moved(name, partition, leader, began)
        kafka.start_node(leader)
        self.progress(f"Kafka node {leader} started again on its data")
        step.took_s = time.monotonic() - began
        self.fault_over(effect)

    def isolate_broker(self) -> None:
        """Cut one Kafka node (the busiest usage partition's leader) off from every client, broker
        and controller, both ways, for `isolate_s` (its network namespace's link down: a network
        partition), then heal it."""
        assert self.stack is not None and self.stack.kafka is not None
        kafka = self.stack.kafka
        found = asyncio.run(
            busiest_partition(kafka.bootstrap_servers, self.topics.usage, self.topics.prefix)
        )
        node = found[2] if found is not None else kafka.nodes[0].node_id
        seconds = self.options.isolate_s
        step = self.step(f"isolate Kafka node {node} from clients and the quorum for {seconds:g} s")
        effect = self.watch_fault(f"node {node} isolated {seconds:g} s")
        began = time.monotonic()
        kafka.isolate(node)
        self.run_for(seconds, f"node {node} isolated", watch=effect)
        if found is not None:
            self.leadership_moved(found[0], found[1], node, began)
        kafka.reconnect(node)
        step.took_s = time.monotonic() - began
        self.progress(f"Kafka node {node} reconnected after {step.took_s:.1f} s")
        self.fault_over(effect)

    def leadership_moved(self, topic: str, partition: int, away_from: int, since: float) -> None:
        """The other nodes must have moved the partition's leadership off the failed node (or
        the fault did nothing a client would notice): waits up to 30 s more, then fails."""
        assert self.stack is not None and self.stack.kafka is not None
        others = ",".join(
            f"{n.host}:{n.port}" for n in self.stack.kafka.nodes if n.node_id != away_from
        )
        deadline = time.monotonic() + 30
        leader: int | None = away_from
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                leader = asyncio.run(partition_leader(others, topic, partition))
            if leader is not None and leader != away_from:
                self.progress(
                    f"{topic}[{partition}] is led by node {leader} now "
                    f"(checked {time.monotonic() - since:.1f} s after the fault began)"
                )
                return
            time.sleep(1)
        self.findings.fail(
            f"{topic}[{partition}] was still led by node {away_from} (or by none) after it failed: "
            "the fault did not take effect"
        )

    def watch_fault(self, fault: str) -> FaultEffect:
        assert self.stack is not None
        effect = FaultEffect(fault, lag_before=metering_lag(self.stack) or 0.0)
        self.agent_metrics = scrape(f"http://127.0.0.1:{self.stack.ports['agent']}/metrics")
        effect.send_failures = -agent_send_failures(self.agent_metrics)
        self.effects.append(effect)
        return effect

    def observe(self, effect: FaultEffect) -> None:
        assert self.stack is not None
        lag = metering_lag(self.stack)
        effect.lag_peak = max(effect.lag_peak, lag or 0.0)
        spool = self.agent_health().get("spool_samples")
        effect.spool_peak = max(effect.spool_peak, int(spool or 0))

    def fault_over(self, effect: FaultEffect) -> None:
        """Wait (bounded) until metering's lag is back where it was before the fault."""
        assert self.stack is not None
        began = time.monotonic()
        target = max(effect.lag_before, self.options.nodes * 8.0)  # one round of the fleet
        wait_s = max(120.0, self.options.isolate_s * 2)
        next_progress = began + self.options.progress_s
        while time.monotonic() - began < wait_s:
            self.supervise()
            self.observe(effect)
            lag = metering_lag(self.stack)
            if lag is not None and lag <= target:
                effect.caught_up_s = time.monotonic() - began
                break
            if time.monotonic() >= next_progress:
                self.progress(
                    f"waiting up to {wait_s:g} s for metering's lag to be back at {target:.0f}: "
                    + self.status_line()
                )
                next_progress += self.options.progress_s
            time.sleep(0.5)
        metrics = scrape(f"http://127.0.0.1:{self.stack.ports['agent']}/metrics")
        effect.send_failures += agent_send_failures(metrics)
        self.step(f"after the fault: {effect.line()}")

    def restart_postgres(self) -> None:
        assert self.stack is not None
        postgres = self.stack.postgres
        if postgres is None:
            self.step("PostgreSQL is external (DATABASE_URL): not restarted")
            return
        step = self.step(f"restart PostgreSQL (port {postgres.port}, same data directory)")
        began = time.monotonic()
        postgres.stop()
        self.progress(
            f"PostgreSQL stopped after {time.monotonic() - began:.1f} s; down for "
            f"{self.options.postgres_down_s:g} s"
        )
        down_until = time.monotonic() + self.options.postgres_down_s
        while time.monotonic() < down_until:
            self.supervise(restart=False)
            time.sleep(0.2)
        postgres.start()  # same port, same data directory
        self.progress("PostgreSQL started again")
        time.sleep(2)  # let a service that is going to fall over on the restart do so
        for name in ("billing", "alerts"):
            self.wait_healthy(name)
        step.took_s = time.monotonic() - began
        self.step(f"PostgreSQL back and billing, alerts healthy after {step.took_s:.1f} s")

    def stop_fleet(self) -> None:
        assert self.stack is not None
        self.agent_metrics = scrape(f"http://127.0.0.1:{self.stack.ports['agent']}/metrics")
        agent = self.agent_health()
        step = self.step(
            f"stop the fleet (SIGTERM; fleet at {str(agent.get('simulated_time', '-'))[:19]}, "
            f"{agent.get('spool_samples')} samples spooled)"
        )
        began = time.monotonic()
        self.stack.kill("agent", signal.SIGTERM)
        spool = self.data_dir / "agent-spool"
        self.spool_left = sum(samples for _, samples in spooled_files(spool))
        self.spool_ids = {(e["source"], e["id"]) for e in spooled_events(spool)}
        step.took_s = time.monotonic() - began
        self.step(
            f"fleet stopped after {step.took_s:.1f} s (exit {self.stack.children['agent'].returncode}); "
            f"{self.spool_left} samples left in its spool"
        )
        del self.stack.children["agent"]

    # --- checks -----------------------------------------------------------------------------

    def check_usage(self) -> UsageFacts:
        assert self.stack is not None
        bootstrap = self.stack.env["KAFKA_BOOTSTRAP_SERVERS"]
        step = self.step(f"read {self.topics.usage} back whole")
        began = time.monotonic()
        facts = UsageFacts()
        gpu_cursor: dict[tuple[str, str], datetime] = {}
        node_newest: dict[str, datetime] = {}

        def take(record: ConsumerRecord) -> None:
            facts.messages += 1
            now = datetime.fromtimestamp(record.timestamp / 1000, UTC)
            try:
                decoded = decode_usage_message(record.value, now=now, key=record.key)
            except InvalidUsage as whole:
                facts.invalid[whole.reason] += 1
                return
            for bad in decoded.errors:
                facts.invalid[bad.reason] += 1
            for event in decoded.events:
                facts.events += 1
                identity = event.identity
                if identity in facts.ids:
                    facts.duplicates += 1
                    continue
                data = event.data
                end = event.time.astimezone(UTC)
                newest = node_newest.get(data.node)
                if newest is not None and newest - end > BEYOND_RETENTION:
                    facts.beyond_retention += 1
                    continue
                gpu = (data.node, data.gpu_uuid)
                cursor = gpu_cursor.get(gpu)
                if cursor is not None and end <= cursor:
                    facts.out_of_order += 1
                    continue
                gpu_cursor[gpu] = end
                node_newest[data.node] = max(newest or end, end)
                facts.ids.add(identity)
                facts.first_time = min(facts.first_time or end, end)
                facts.last_time = max(facts.last_time or end, end)
                if data.project_id is not None:
                    hour = domain.hour_of_sample(end, data.interval_s)
                    facts.gpu_seconds[(data.project_id, data.gpu_model, hour)] += Decimal(
                        str(data.interval_s)
                    )

        asyncio.run(read_topic(bootstrap, self.topics.usage, take, self.progress))
        facts.distinct = len(facts.ids)
        dead = Counter[str]()

        def take_dead_letter(record: ConsumerRecord) -> None:
            try:
                dead[str(json.loads(record.value).get("reason"))] += 1
            except (ValueError, AttributeError):
                dead["unreadable"] += 1

        asyncio.run(read_topic(bootstrap, self.topics.usage_dlq, take_dead_letter))
        step.took_s = time.monotonic() - began
        self.step(
            f"{facts.events:,} samples in {facts.messages:,} messages: {facts.distinct:,} "
            f"distinct, {facts.duplicates:,} duplicates ({step.took_s:.1f} s)"
        )
        f = self.findings
        sent = int(self.agent_metrics.get("gpumeter_agent_samples_sent_total", 0))
        dropped = {
            k.split('reason="')[1].rstrip('"}'): int(v)
            for k, v in self.agent_metrics.items()
            if k.startswith("gpumeter_agent_samples_dropped_total{")
        }
        failures = sum(
            int(v)
            for k, v in self.agent_metrics.items()
            if k.startswith("gpumeter_agent_send_failures_total{")
        )
        f.note(
            f"samples: {facts.events:,} on {self.topics.usage} (agents acknowledged {sent:,} "
            f"before the stop; {failures} failed sends retried), {facts.distinct:,} distinct, "
            f"{facts.duplicates:,} duplicates (same source+id, counted once)"
        )
        invalid = sum(facts.invalid.values()) + facts.out_of_order + facts.beyond_retention
        f.note(
            f"invalid samples: {invalid} ({dict(facts.invalid) or 'none'}; out of order "
            f"{facts.out_of_order}, beyond retention {facts.beyond_retention}); dead letters on "
            f"{self.topics.usage_dlq}: {sum(dead.values())} {dict(dead) if dead else ''}".rstrip()
        )
        if invalid:
            f.fail(f"{invalid} samples of the simulated fleet are invalid or out of order")
        if any(dropped.values()):
            f.lost += sum(dropped.values())
            f.fail(f"the agents dropped samples: {dropped}")
        if self.spool_left:
            f.lost += self.spool_left
            f.fail(f"{self.spool_left} samples were left in the agents' spool")
        self.check_fleet(facts)
        return facts

    def check_fleet(self, facts: UsageFacts) -> None:
        """The fleet is seeded: regenerate it and check every sample it made reached the broker."""
        assert self.sim_start is not None
        if facts.last_time is None:
            self.findings.fail("no samples at all reached the broker")
            return
        opts = self.options
        config = FleetConfig(nodes=opts.nodes, interval_s=opts.interval_s)  # the agent's defaults
        fleet = FleetSimulator(config)
        step = timedelta(seconds=opts.interval_s)
        at = self.sim_start + step
        expected = 0
        missing: list[str] = []
        spooled = 0  # missing on the broker, but in the spool: counted in spool_left already
        while at <= facts.last_time:
            for events in fleet.round(at).values():
                for event in events:
                    expected += 1
                    identity = (event["source"], event["id"])
                    if identity in facts.ids:
                        continue
                    if identity in self.spool_ids:
                        spooled += 1
                    else:
                        missing.append(event["id"])
            at += step
        extra = facts.distinct - (expected - len(missing) - spooled)
        self.findings.note(
            f"simulated fleet: {expected:,} samples generated from {self.sim_start:%Y-%m-%d %H:%M} "
            f"to {facts.last_time:%Y-%m-%d %H:%M} UTC; missing on the broker {len(missing) + spooled}"
            f" ({spooled} of them still in the agents' spool, {len(missing)} nowhere), "
            f"unexpected {extra}; {self.spool_left} left in the agents' spool"
        )
        if missing:
            self.findings.lost += len(missing)
            self.findings.fail(
                f"{len(missing)} samples the fleet produced are neither on the broker nor in the "
                "agents' spool, e.g. " + ", ".join(missing[:5])
            )
        if extra:
            self.findings.fail(f"{extra} samples on the broker that the fleet never produced")

    def check_invoices(self, facts: UsageFacts) -> None:
        assert self.stack is not None
        stack = self.stack
        pricing = asyncio.run(read_pricing(stack.env["DATABASE_URL"]))
        expected = expected_invoices(facts, pricing)
        periods = sorted({period for period, _ in expected} | open_periods(self.sim_start))
        step = self.step(
            f"wait for billing to drain: {len(expected)} invoices expected over "
            f"{', '.join(periods)} (timeout {self.options.drain_timeout_s:g} s)"
        )
        began = time.monotonic()
        deadline = began + self.options.drain_timeout_s
        last_signature: str | None = None
        stable_since = time.monotonic()
        next_progress = began + self.options.progress_s
        mismatches: list[str] = []
        served: dict[tuple[str, str], dict[str, Any]] = {}
        while True:
            self.supervise()
            served = self.served_invoices(periods)
            mismatches = compare_invoices(expected, served)
            lag = metering_lag(stack)
            signature = json.dumps(sorted(served.items()), sort_keys=True, default=str)
            if signature != last_signature:
                last_signature, stable_since = signature, time.monotonic()
            now = time.monotonic()
            if not mismatches:
                break
            # Unchanged numbers mean a drained pipeline only when every stage has committed all
            # it has read: metering's inner stages (partials, sums) and billing can stand still
            # for tens of seconds after a broker fault (a commit waiting out a request timeout)
            # with the usage partitions' lag already 0. (Tansu cannot say: None, as before.)
            behind = asyncio.run(groups_lag(stack.env["KAFKA_BOOTSTRAP_SERVERS"], self.groups))
            if lag == 0 and not behind and now - stable_since >= self.options.stable_s:
                self.progress(
                    f"numbers unchanged for {self.options.stable_s:g} s with lag 0"
                    + ("" if behind is None else " and every metering and billing offset committed")
                )
                break
            if now >= deadline:
                self.progress("drain timeout reached")
                break
            if now >= next_progress:
                self.progress(
                    f"metering lag {lag if lag is not None else '-'}; metering and billing "
                    f"groups behind by {behind if behind is not None else '-'}; "
                    f"{len(served)} invoices served, {len(mismatches)} differ from the samples so far"
                )
                next_progress += self.options.progress_s
            time.sleep(1)
        step.took_s = time.monotonic() - began
        self.step(
            f"billing checked after {step.took_s:.1f} s: {len(served)} invoices served, "
            f"{len(mismatches)} mismatches"
        )
        # Once the pipeline has drained (or the wait ran out): read earlier, the hourly totals of a
        # metering still catching up after a fault differed from the samples by the thousand.
        self.compare_hourly(facts)
        f = self.findings
        gross = sum((Decimal(i["gross_hkd"]) for i in served.values()), Decimal(0))
        subsidy = sum((Decimal(i["subsidy_hkd"]) for i in served.values()), Decimal(0))
        hours = sum(facts.gpu_seconds.values(), Decimal(0)) / 3600
        f.note(
            f"invoices: {len(expected)} expected, {len(served)} served for {', '.join(periods)}; "
            f"{hours:,.2f} allocated GPU-hours; gross HK${gross:,.2f}, subsidy HK${subsidy:,.2f}, "
            f"net HK${gross - subsidy:,.2f}"
        )
        f.note(f"invoice mismatches: {len(mismatches)}")
        for mismatch in mismatches:
            f.note(f"    {mismatch}")
        ledger = asyncio.run(ledger_day_differences(stack.env["DATABASE_URL"]))
        f.note(f"ledger: daily sums that differ from their hourly rows: {len(ledger)}")
        for difference in ledger[:10]:
            f.note(f"    {difference}")
        if ledger:
            f.fail(f"{len(ledger)} days of billing's ledger differ from the hours they sum")
        f.mismatches = mismatches
        if mismatches:
            f.fail(f"{len(mismatches)} invoices differ from what the samples imply")
            for key, document in expected.items():
                got = served.get(key)
                if got is None or Decimal(got["gross_hkd"]) < Decimal(document["gross_hkd"]):
                    f.lost += 1
                elif Decimal(got["gross_hkd"]) > Decimal(document["gross_hkd"]):
                    f.double_counted += 1
            f.double_counted += sum(1 for key in served if key not in expected)

    def compare_hourly(self, facts: UsageFacts) -> None:
        """Diagnosis, not a verdict: metering's hourly totals against the samples (which stage)."""
        assert self.stack is not None
        latest: dict[str, dict[str, Any]] = {}

        def take(record: ConsumerRecord) -> None:
            if record.value is None:
                return
            value = json.loads(record.value)
            key = record.key.decode() if record.key else ""
            if key not in latest or value.get("revision", 0) >= latest[key].get("revision", 0):
                latest[key] = value

        asyncio.run(read_topic(self.stack.env["KAFKA_BOOTSTRAP_SERVERS"], self.topics.hourly, take))
        totals: dict[tuple[str, str, datetime], Decimal] = {}
        for value in latest.values():
            hour = datetime.fromisoformat(value["hour_start"]).astimezone(UTC)
            totals[(value["project_id"], value["gpu_model"], hour)] = Decimal(
                str(value["gpu_seconds"])
            )
        differ = [
            key
            for key in set(totals) | set(facts.gpu_seconds)
            if totals.get(key, Decimal(0)) != facts.gpu_seconds.get(key, Decimal(0))
        ]
        self.findings.note(
            f"metering hourly totals ({self.topics.hourly}): {len(totals)} hours, "
            f"{len(differ)} differ from the samples"
            + (
                ", e.g. "
                + "; ".join(
                    f"{p}|{m}|{h:%Y-%m-%dT%H}: {totals.get((p, m, h), 0)} s vs "
                    f"{facts.gpu_seconds.get((p, m, h), 0)} s"
                    for p, m, h in sorted(differ)[:3]
                )
                if differ
                else ""
            )
        )

    def served_invoices(self, periods: list[str]) -> dict[tuple[str, str], dict[str, Any]]:
        assert self.stack is not None
        served: dict[tuple[str, str], dict[str, Any]] = {}
        for period in periods:
            try:
                response = httpx.get(
                    f"http://127.0.0.1:{self.stack.ports['billing']}/v1/invoices",
                    params={"period": period},
                    headers={"Authorization": f"Bearer {self.stack.billing_token}"},
                    timeout=10,
                )
            except httpx.HTTPError:
                continue
            if response.status_code != 200:
                continue
            for invoice in response.json().get("invoices", []):
                served[(invoice["period"], invoice["project_id"])] = invoice
        return served

    def check_alerts(self) -> None:
        assert self.stack is not None
        stack = self.stack
        bootstrap = stack.env["KAFKA_BOOTSTRAP_SERVERS"]
        step = self.step("wait for the alert outbox to drain, then compare notifications")
        began = time.monotonic()
        on_topic_before = asyncio.run(read_alert_events(bootstrap, self.topics.alerts))
        api_states = self.api_alert_states()
        deadline = began + 120
        seen, stable_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            self.supervise()
            metrics = scrape(f"http://127.0.0.1:{stack.ports['alerts']}/metrics")
            depth = sum(v for k, v in metrics.items() if k.startswith("alerts_outbox_depth{"))
            if len(stack.inbox.received) != seen:
                seen, stable_since = len(stack.inbox.received), time.monotonic()
            if metrics and depth == 0 and time.monotonic() - stable_since >= 5:
                break
            time.sleep(1)
        received = list(stack.inbox.received)
        keys = list(stack.inbox.idempotency_keys[: len(received)])
        on_topic_after = asyncio.run(read_alert_events(bootstrap, self.topics.alerts))
        step.took_s = time.monotonic() - began

        delivered: Counter[tuple[str, str, str]] = Counter()
        idempotency: dict[tuple[str, str, str], set[str | None]] = defaultdict(set)
        for body, key in zip(received, keys, strict=True):
            for alert in body.get("alerts", []):
                change = (
                    str(alert.get("fingerprint")),
                    str(alert.get("status")),
                    normal_time(str(alert.get("startsAt"))),
                )
                delivered[change] += 1
                idempotency[change].add(key)
        published = Counter(on_topic_after)
        f = self.findings
        webhook_duplicates = {c: n for c, n in delivered.items() if n > 1}
        topic_duplicates = {c: n for c, n in published.items() if n > 1}
        lost_webhook = sorted(set(on_topic_before) - set(delivered))
        lost_topic = sorted(set(delivered) - set(published))
        unnotified = sorted(set(api_states) - set(delivered))
        statuses = Counter(status for _, status, _ in delivered)
        f.note(
            f"alert state changes: {len(delivered)} ({statuses.get('firing', 0)} firing, "
            f"{statuses.get('resolved', 0)} resolved) in {len(received)} webhook requests; "
            f"{len(published)} on {self.topics.alerts}"
        )
        f.note(
            f"alert notifications: webhook lost {len(lost_webhook)}, duplicated "
            f"{len(webhook_duplicates)}; {self.topics.alerts} lost {len(lost_topic)}, duplicated "
            f"{len(topic_duplicates)}; GET /v1/alerts shows {len(api_states)} firing or resolved "
            f"states, {len(unnotified)} never notified"
        )
        for change, count in sorted(webhook_duplicates.items()):
            same_key = len(idempotency[change]) == 1
            f.note(
                f"    webhook duplicate x{count}: {change}"
                + (" (same Idempotency-Key: a redelivery)" if same_key else " (different keys)")
            )
        for change, count in sorted(topic_duplicates.items()):
            f.note(f"    {self.topics.alerts} duplicate x{count}: {change}")
        for change in lost_webhook[:10]:
            f.note(f"    on {self.topics.alerts} but never at the webhook: {change}")
        for change in lost_topic[:10]:
            f.note(f"    at the webhook but not on {self.topics.alerts}: {change}")
        for change in unnotified[:10]:
            f.note(f"    GET /v1/alerts state never notified: {change}")
        duplicates = sum(n - 1 for n in webhook_duplicates.values()) + sum(
            n - 1 for n in topic_duplicates.values()
        )
        f.duplicate_notifications += duplicates
        lost = len(lost_webhook) + len(lost_topic) + len(unnotified)
        f.lost += lost
        if duplicates:
            f.fail(f"{duplicates} duplicate alert notifications")
        if lost:
            f.fail(f"{lost} alert state changes not delivered everywhere")
        self.step(
            f"alerts checked after {step.took_s:.1f} s: {len(delivered)} state changes, "
            f"{lost} lost, {duplicates} duplicated"
        )

    def api_alert_states(self) -> set[tuple[str, str, str]]:
        assert self.stack is not None
        response = httpx.get(
            f"http://127.0.0.1:{self.stack.ports['alerts']}/v1/alerts",
            params={"status": "all", "limit": 5000},
            headers={"Authorization": f"Bearer {self.stack.billing_token}"},
            timeout=10,
        )
        states = set()
        for alert in response.json().get("alerts", []):
            if alert["status"] in ("firing", "resolved") and alert.get("starts_at"):
                states.add((alert["fingerprint"], alert["status"], normal_time(alert["starts_at"])))
        return states

    # --- the end ----------------------------------------------------------------------------

    def shutdown(self, keep: bool) -> None:
        if self.stack is not None:
            self.step("stop the stack")
            with contextlib.suppress(Exception):
                self.stack.stop()
        if self.proxy is not None:
            self.proxy.stop()
        if not keep and self.options.data_dir is None and hasattr(self, "data_dir"):
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def report(self, passed: bool) -> None:
        f = self.findings
        say("")
        say("=" * 78)
        say("gpumeter fault drill: report")
        say("=" * 78)
        opts = self.options
        say(
            f"fleet: {opts.nodes} nodes x 8 GPUs, {opts.interval_s:g} s samples, {opts.speed:g}x "
            f"from {self.sim_start:%Y-%m-%d %H:%M} UTC; link outage {opts.outage_s:g} s"
        )
        say(
            "broker: "
            + (
                "Tansu"
                if opts.broker == "tansu"
                else f"Apache Kafka, {opts.kafka_nodes} node{'s' if opts.kafka_nodes != 1 else ''}"
            )
            + (
                " (external, KAFKA_BOOTSTRAP_SERVERS)"
                if os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
                else ""
            )
        )
        for note in self.notes:
            say(f"note: {note}")
        for crash in self.crashes:
            say(f"WARNING: {crash}")
        say("what was done (seconds from the start):")
        for step in self.steps:
            took = f" [{step.took_s:.1f} s]" if step.took_s is not None else ""
            say(f"  +{step.at_s:6.1f}  {step.text}{took}")
        if self.effects:
            say("what each broker fault did:")
            for effect in self.effects:
                say(f"  {effect.line()}")
        say("what was found:")
        for line in f.lines:
            say(f"  {line}")
        say(
            f"lost: {f.lost}, double-counted: {f.double_counted}, duplicate notifications: "
            f"{f.duplicate_notifications}, mismatches: {len(f.mismatches)}"
        )
        for failure in f.failures:
            say(f"FAILED: {failure}")
        if not passed:
            say(f"logs and data kept in {self.data_dir}")
        say(
            "RESULT: PASS"
            if passed
            else "RESULT: FAIL"
            + f" ({len(f.failures)} problem{'s' if len(f.failures) != 1 else ''})"
        )


# --- helpers ----------------------------------------------------------------------------------


def last_exception_line(log: Path) -> str:
    """The last line of a log that names an exception, for the report."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    for line in reversed(lines):
        if line and not line.startswith(" ") and ("Error" in line or "Exception" in line):
            return line.strip()[:200]
    return lines[-1].strip()[:200] if lines else "empty log"


def metering_lag(stack: Stack) -> float | None:
    metrics = scrape(f"http://127.0.0.1:{stack.ports['metering']}/metrics")
    if not metrics:
        return None
    return sum(v for k, v in metrics.items() if k.startswith("gpumeter_metering_consumer_lag"))


def agent_send_failures(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("gpumeter_agent_send_failures_total"))


async def busiest_partition(
    bootstrap: str, topic: str, prefix: str
) -> tuple[str, int, int, int] | None:
    """(topic, partition, leader node id, messages) of the partition with the most messages of
    `topic`, or of the topics of this run ending in `topic` when it starts with "-"."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        # Every topic's metadata, fetched for this call (the client's own cluster view holds only
        # the topics it follows, which for this consumer is none on Apache Kafka).
        cluster = await consumer._client.fetch_all_metadata()
        names = cluster.topics()
        if topic.startswith("-"):
            wanted = sorted(n for n in names if n.endswith(topic) and n.startswith(prefix))
        else:
            wanted = [topic] if topic in names else []
        partitions = [
            TopicPartition(name, p)
            for name in wanted
            for p in sorted(cluster.partitions_for_topic(name) or ())
        ]
        if not partitions:
            return None
        ends = await consumer.end_offsets(partitions)
        tp = max(partitions, key=lambda tp: (ends[tp], -tp.partition))
        leader = cluster.leader_for_partition(tp)
        if leader is None or leader < 0:
            return None
        return tp.topic, tp.partition, int(leader), int(ends[tp])
    finally:
        await consumer.stop()


async def groups_lag(bootstrap: str, groups: list[str]) -> int | None:
    """Messages the consumer groups have not committed yet, over every partition they committed
    on; None when the broker cannot say (Tansu answers OffsetFetch in a form aiokafka's admin
    client cannot read)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    try:
        await admin.start()
        await consumer.start()
        behind = 0
        for group in groups:
            committed = await admin.list_consumer_group_offsets(group)
            ends = await consumer.end_offsets(list(committed))
            behind += sum(
                max(0, ends[tp] - meta.offset) for tp, meta in committed.items() if meta.offset >= 0
            )
        return behind
    except Exception:  # noqa: BLE001 - a broker that cannot answer now: not drained
        return None
    finally:
        await consumer.stop()
        await admin.close()


async def partition_leader(bootstrap: str, topic: str, partition: int) -> int | None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        cluster = await consumer._client.fetch_all_metadata()
        leader = cluster.leader_for_partition(TopicPartition(topic, partition))
        return None if leader is None or leader < 0 else int(leader)
    finally:
        await consumer.stop()


def normal_time(text: str) -> str:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC).isoformat()


def open_periods(since: datetime | None) -> set[str]:
    """Every HK month from `since` to now: an invoice in any of them is checked."""
    now = datetime.now(UTC)
    period = domain.period_of(since or now)
    found = {period}
    while period < domain.period_of(now):
        period = domain.next_period(period)
        found.add(period)
    return found


LEDGER_DAY_DIFFERENCES = """
SELECT coalesce(d.project_id, h.project_id) AS project_id,
       coalesce(d.gpu_model, h.gpu_model) AS gpu_model,
       coalesce(d.hk_date, h.hk_date) AS hk_date,
       d.gpu_seconds AS daily, h.gpu_seconds AS hourly
FROM usage_daily d
FULL JOIN (
    SELECT project_id, gpu_model, (hour_start AT TIME ZONE 'Asia/Hong_Kong')::date AS hk_date,
           sum(gpu_seconds) AS gpu_seconds
    FROM usage_hourly GROUP BY 1, 2, 3
) h USING (project_id, gpu_model, hk_date)
WHERE d.gpu_seconds IS DISTINCT FROM h.gpu_seconds
ORDER BY 1, 2, 3
"""


async def ledger_day_differences(database_url: str) -> list[str]:
    """Billing's daily sums (what drafts are built from) against the hourly ledger rows."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(LEDGER_DAY_DIFFERENCES)
    finally:
        await conn.close()
    return [
        f"{r['project_id']} {r['gpu_model']} {r['hk_date']}: daily {r['daily']} GPU-s, "
        f"hours {r['hourly']} GPU-s"
        for r in rows
    ]


async def read_pricing(database_url: str) -> domain.Pricing:
    conn = await asyncpg.connect(database_url)
    try:
        return await load_pricing(conn)
    finally:
        await conn.close()


def expected_invoices(
    facts: UsageFacts, pricing: domain.Pricing
) -> dict[tuple[str, str], dict[str, Any]]:
    """The invoices docs/contracts.md §4 gives for these samples: billing's own engine, periods in
    order so that each project's subsidy cap carries over."""
    usage: dict[str, dict[str, list[domain.UsageHour]]] = defaultdict(lambda: defaultdict(list))
    for (project_id, gpu_model, hour), seconds in facts.gpu_seconds.items():
        usage[project_id][domain.period_of(hour)].append(domain.UsageHour(gpu_model, hour, seconds))
    documents: dict[tuple[str, str], dict[str, Any]] = {}
    for project_id, by_period in usage.items():
        used = Decimal("0.00")
        for period in sorted(by_period):
            invoice = domain.build_invoice(
                project_id, period, by_period[period], pricing, subsidy_used_before=used
            )
            used += invoice.subsidy_hkd
            documents[(period, project_id)] = invoice.document().model_dump(mode="json")
    return documents


COMPARED = (
    "status",
    "flags",
    "lines",
    "gross_hkd",
    "subsidy_hkd",
    "net_hkd",
    "subsidy_cap_remaining_hkd",
)


def compare_invoices(
    expected: dict[tuple[str, str], dict[str, Any]],
    served: dict[tuple[str, str], dict[str, Any]],
) -> list[str]:
    problems = []
    for key in sorted(set(expected) | set(served)):
        want, got = expected.get(key), served.get(key)
        name = f"INV-{key[0]}-{key[1]}"
        if got is None:
            assert want is not None
            problems.append(f"{name}: missing (expected gross {want['gross_hkd']})")
            continue
        if want is None:
            problems.append(f"{name}: not implied by any sample (gross {got['gross_hkd']})")
            continue
        differences = [
            f"{field_name} {got.get(field_name)!r} != {want[field_name]!r}"
            for field_name in COMPARED
            if field_name != "lines" and got.get(field_name) != want[field_name]
        ]
        got_lines = [
            {k: line.get(k) for k in want_line}
            for line, want_line in zip(got.get("lines", []), want["lines"], strict=False)
        ]
        if len(got.get("lines", [])) != len(want["lines"]) or got_lines != want["lines"]:
            differences.append(f"lines {got.get('lines')} != {want['lines']}")
        if differences:
            problems.append(f"{name}: " + "; ".join(differences))
    return problems


async def read_topic(
    bootstrap: str,
    topic: str,
    take: Callable[[ConsumerRecord], None],
    progress: Callable[[str], None] | None = None,
    idle_s: float = 3.0,
) -> int:
    """Every record of `topic` from the start to its end, handed to `take` in partition order."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    await consumer.start()
    count = 0
    last_record = time.monotonic()
    next_progress = time.monotonic() + 10
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            for records in batch.values():
                for record in records:
                    take(record)
                    count += 1
            if batch:
                last_record = time.monotonic()
            if progress is not None and time.monotonic() >= next_progress:
                progress(f"{count:,} messages read")
                next_progress += 10
            assigned = consumer.assignment()
            caught_up = bool(assigned)
            for tp in assigned:
                highwater = consumer.highwater(tp)
                if highwater is None or await consumer.position(tp) < highwater:
                    caught_up = False
            idle = time.monotonic() - last_record
            if (caught_up and idle >= 1.0) or idle >= idle_s * 5:
                return count
    finally:
        await consumer.stop()


async def read_alert_events(bootstrap: str, topic: str) -> list[tuple[str, str, str]]:
    changes: list[tuple[str, str, str]] = []

    def take(record: ConsumerRecord) -> None:
        event = json.loads(record.value)
        changes.append((event["fingerprint"], event["status"], normal_time(event["starts_at"])))

    await read_topic(bootstrap, topic, take)
    return changes


def parse_args(argv: list[str] | None) -> DrillOptions:
    parser = argparse.ArgumentParser(
        prog="python -m gpumeter.drill",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--nodes", type=int, default=8, help="simulated nodes (8 GPUs each)")
    parser.add_argument("--speed", type=float, default=1800.0, help="simulated s per real s")
    parser.add_argument("--interval", type=float, default=60.0, help="sampling interval (s)")
    parser.add_argument(
        "--start",
        default=None,
        help="simulated start (ISO or offset like -7d); default: far enough back that the fleet "
        "replays faster than real time throughout",
    )
    parser.add_argument("--partitions", type=int, default=8, help="partitions of gpu.usage.v1")
    parser.add_argument("--outage-s", type=float, default=60.0, help="how long the link is cut")
    parser.add_argument(
        "--postgres-down-s",
        type=float,
        default=5.0,
        help="how long PostgreSQL stays down when it is restarted",
    )
    parser.add_argument(
        "--settle-s", type=float, default=20.0, help="running time before and between faults"
    )
    parser.add_argument("--drain-timeout-s", type=float, default=600.0)
    parser.add_argument(
        "--stable-s",
        type=float,
        default=30.0,
        help="invoices unchanged this long with metering lag 0 count as drained",
    )
    parser.add_argument("--progress-s", type=float, default=10.0, help="progress line interval")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="new or empty; default: a temporary one"
    )
    parser.add_argument("--keep", action="store_true", help="keep logs and data after a pass")
    parser.add_argument(
        "--broker",
        choices=("tansu", "kafka"),
        default="tansu",
        help="the local broker: Tansu (in memory) or Apache Kafka (KRaft)",
    )
    parser.add_argument(
        "--kafka-nodes",
        type=kafka_node_count,
        default=1,
        help="Kafka nodes; 3 adds the broker faults: the leaders of the busiest usage partition "
        "and of a changelog partition killed, one node isolated",
    )
    parser.add_argument(
        "--isolate-s", type=float, default=60.0, help="how long one Kafka node is isolated"
    )
    args = parser.parse_args(argv)
    if args.isolate_s <= 0:
        parser.error(f"--isolate-s {args.isolate_s:g}: give a positive number of seconds")
    return DrillOptions(
        nodes=args.nodes,
        speed=args.speed,
        interval_s=args.interval,
        start=args.start,
        partitions=args.partitions,
        outage_s=args.outage_s,
        postgres_down_s=args.postgres_down_s,
        settle_s=args.settle_s,
        drain_timeout_s=args.drain_timeout_s,
        stable_s=args.stable_s,
        progress_s=args.progress_s,
        data_dir=args.data_dir,
        keep=args.keep,
        broker=args.broker,
        kafka_nodes=args.kafka_nodes,
        isolate_s=args.isolate_s,
    )


def main(argv: list[str] | None = None) -> int:
    drill = Drill(parse_args(argv))

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        return drill.run()
    except KeyboardInterrupt:
        drill.shutdown(keep=True)
        say("RESULT: INTERRUPTED")
        return 130


if __name__ == "__main__":
    sys.exit(main())
