"""`python -m services.agent` runs the node agent: NVML or dcgm-exporter readings of this node's GPUs,
attributed to Slurm jobs, sent to Kafka through an on-disk spool. `--simulate` drives a simulated
fleet instead.

--once      print one round of samples as JSON and exit (nothing is sent)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from services.agent.allocation import (
    AllocationSource,
    FileProjectLookup,
    JobMapDirSource,
    NoAllocation,
    ProjectLookup,
    ScontrolProjectLookup,
    SlurmSource,
)
from services.agent.publisher import AgentMetrics, Delivery, kafka_producer_factory
from services.agent.readers import DcgmReader, GpuReader, NvmlReader, ReaderError
from services.agent.sampler import NodeSampler
from services.agent.settings import AgentSettings
from services.agent.simulator import FleetConfig, FleetSimulator, aligned
from services.agent.spool import Spool, SpoolLocked
from services.common.http import serve_health_and_metrics

log = logging.getLogger("gpumeter.agent")
Round = tuple[datetime, dict[str, list[dict]]]
DEFAULT_SPOOL_DIR = "/var/spool/gpumeter-agent"
SIM_BACKLOG_SAMPLES = 20000  # flat-out simulation waits for the broker beyond this many spooled


def parse_when(text: str, now: datetime) -> datetime:
    """ISO time, or an offset from now such as '-6h', '-30d', '+10m'."""
    match = re.fullmatch(r"([+-]\d+(?:\.\d+)?)([smhd])", text.strip())
    if match:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return now + timedelta(seconds=float(match.group(1)) * unit)
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        raise ValueError(f"{text!r} has no timezone offset")
    return when.astimezone(UTC)


class SimulatedRounds:
    """Simulated time stepping by the interval at `speed` x real time, never ahead of the clock."""

    def __init__(self, settings: AgentSettings) -> None:
        self.config = FleetConfig(
            nodes=settings.agent_sim_nodes,
            gpus_per_node=settings.agent_sim_gpus_per_node,
            seed=settings.agent_sim_seed,
            interval_s=settings.agent_interval_s,
            target_allocation=settings.agent_sim_target_allocation,
            silence_per_node_day=settings.agent_sim_silence_per_node_day,
        )
        self.fleet = FleetSimulator(self.config)
        self.speed = settings.agent_sim_speed
        now = datetime.now(UTC)
        start = parse_when(settings.agent_sim_start, now) if settings.agent_sim_start else now
        self.time = aligned(start, self.config.interval_s)
        self.until = parse_when(settings.agent_sim_until, now) if settings.agent_sim_until else None
        self.step = timedelta(seconds=self.config.interval_s)
        self._real_start, self._sim_start = time.monotonic(), self.time
        self.finished = False

    def first(self) -> Round:
        at = self.time + self.step
        return at, self.fleet.round(at)

    def next(self, stop: threading.Event) -> Round | None:
        at = self.time + self.step
        if self.until is not None and at > self.until:
            self.finished = True
            return None
        # Never run ahead of the real clock: metering rejects samples from the future.
        wall_now = datetime.now(UTC)
        if at > wall_now:
            if stop.wait((at - wall_now).total_seconds()):
                return None
        elif self.speed > 0:
            due = self._real_start + (at - self._sim_start).total_seconds() / self.speed
            delay = due - time.monotonic()
            if delay > 0 and stop.wait(delay):
                return None
        self.time = at
        return at, self.fleet.round(at)

    def describe(self) -> dict[str, Any]:
        return {"simulated_time": self.time.isoformat()}


class RealRounds:
    """Rounds on wall-clock boundaries of the interval (…:00, :10, :20 for 10 s)."""

    def __init__(self, sampler: NodeSampler, interval_s: float, metrics: AgentMetrics) -> None:
        self.sampler = sampler
        self.interval_s = interval_s
        self.metrics = metrics
        self.last: datetime | None = None
        self.finished = False
        self._allocation_errors = 0

    def first(self) -> Round:
        at = aligned(datetime.now(UTC), self.interval_s)
        return at, self.sampler.round(at)

    def next(self, stop: threading.Event) -> Round | None:
        while True:
            at = aligned(datetime.now(UTC), self.interval_s) + timedelta(seconds=self.interval_s)
            if self.last is not None and at <= self.last:
                at = self.last + timedelta(seconds=self.interval_s)
            if stop.wait(max(0.0, (at - datetime.now(UTC)).total_seconds())):
                return None
            self.last = at
            try:
                per_node = self.sampler.round(at)
            except ReaderError as exc:
                log.error("no samples for %s: %s", at.isoformat(), exc)
                self.metrics.read_errors.labels("reader").inc()
                continue
            new_errors = self.sampler.allocation_errors - self._allocation_errors
            if new_errors:
                self.metrics.read_errors.labels("allocation").inc(new_errors)
                self._allocation_errors = self.sampler.allocation_errors
            return at, per_node

    def describe(self) -> dict[str, Any]:
        return {"last_round": self.last.isoformat() if self.last else None}


def build_sampler(settings: AgentSettings) -> NodeSampler:
    hostname = socket.gethostname().split(".")[0]
    node = settings.agent_node or None
    reader: GpuReader
    if settings.agent_reader == "dcgm":
        reader = DcgmReader(settings.agent_dcgm_url)
    else:
        reader = NvmlReader()
        node = node or hostname
    allocation: AllocationSource
    if settings.agent_allocation == "slurm":
        allocation = SlurmSource(node or hostname, settings.agent_scontrol)
    elif settings.agent_allocation == "jobmap":
        lookup: ProjectLookup = (
            FileProjectLookup(Path(settings.agent_job_projects_file))
            if settings.agent_job_projects_file
            else ScontrolProjectLookup(settings.agent_scontrol)
        )
        allocation = JobMapDirSource(Path(settings.agent_job_map_dir), lookup)
    else:
        allocation = NoAllocation()
    return NodeSampler(node, reader, allocation, settings.agent_interval_s, hostname)


def simulation_spool_dir(settings: AgentSettings) -> Path:
    """The spool of a simulated fleet without AGENT_SPOOL_DIR: named after the fleet and topic, so
    that a simulation killed with samples spooled replays them when it starts again (a fresh
    temporary directory each start would leave them behind for good)."""
    identity = "|".join(
        str(part)
        for part in (
            settings.topics.usage,
            settings.agent_sim_nodes,
            settings.agent_sim_gpus_per_node,
            settings.agent_sim_seed,
            settings.agent_interval_s,
        )
    )
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"gpumeter-agent-sim-{digest}"


def open_spool(settings: AgentSettings, simulation: bool) -> Spool:
    """AGENT_SPOOL_DIR, or the simulation's own directory, or the system default; locked."""
    bound, fsync = settings.agent_spool_max_bytes, settings.agent_spool_fsync
    if not simulation:
        return Spool(Path(settings.agent_spool_dir or DEFAULT_SPOOL_DIR), bound, fsync)
    try:
        return Spool(simulation_spool_dir(settings), bound, fsync)
    except SpoolLocked as exc:  # the same simulated fleet runs twice: this one spools apart
        directory = Path(tempfile.mkdtemp(prefix="gpumeter-agent-spool-"))
        log.warning("%s; spooling to %s instead", exc, directory)
        return Spool(directory, bound, fsync)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.agent", description=__doc__)
    parser.add_argument(
        "--simulate", action="store_true", help="run a simulated fleet instead of reading GPUs"
    )
    parser.add_argument("--once", action="store_true", help="print one round as JSON and exit")
    args = parser.parse_args(argv)
    settings = AgentSettings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s agent %(message)s"
    )
    if settings.log_level.upper() != "DEBUG":
        # kafka-python logs every refused reconnect; the sender reports outages once, itself.
        logging.getLogger("kafka").setLevel(logging.CRITICAL)
    metrics = AgentMetrics()
    rounds: SimulatedRounds | RealRounds
    sampler: NodeSampler | None = None
    try:
        if args.simulate:
            rounds = SimulatedRounds(settings)
        else:
            sampler = build_sampler(settings)
            rounds = RealRounds(sampler, settings.agent_interval_s, metrics)
        if args.once:
            json.dump(rounds.first()[1], sys.stdout, indent=2)
            print()
            return 0
    except ReaderError as exc:
        log.error("%s", exc)
        return 2
    finally:
        if args.once and sampler is not None:
            sampler.close()

    simulation_spool = args.simulate and not settings.agent_spool_dir
    try:
        spool = open_spool(settings, simulation_spool)
    except SpoolLocked as exc:
        log.error("%s", exc)
        return 2
    spool_dir = spool.directory
    timeout_ms = settings.agent_kafka_timeout_ms
    delivery = Delivery(
        spool,
        settings.topics.usage,
        metrics,
        kafka_producer_factory(
            settings.kafka_bootstrap_servers,
            timeout_ms,
            security=settings.kafka_security.aiokafka(),
        ),
        ack_timeout_s=timeout_ms / 1000 + 5,
    ).start()
    stop = threading.Event()
    serve_health_and_metrics(
        settings.http_host,
        settings.agent_http_port,
        metrics.registry,
        lambda: {
            "status": "ok",
            "service": "agent",
            **rounds.describe(),
            "broker_up": delivery.broker_up,
            "spool_samples": spool.samples,
            "spool_bytes": spool.bytes,
        },
    )

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "%s, spool %s (at most %d bytes), sending to %s",
        f"simulating {settings.agent_sim_nodes} nodes" if args.simulate else "reading GPUs",
        spool_dir,
        settings.agent_spool_max_bytes,
        settings.topics.usage,
    )
    progress_at = time.monotonic()
    while not stop.is_set():
        if isinstance(rounds, SimulatedRounds) and rounds.speed <= 0:
            # Flat out, simulated time is free: wait for the broker rather than fill the spool.
            while spool.samples > SIM_BACKLOG_SAMPLES and not stop.wait(0.05):
                pass
        produced = rounds.next(stop)
        if produced is None:
            break
        delivery.submit(produced[1])
        metrics.rounds.inc()
        if time.monotonic() - progress_at > 10:
            progress_at = time.monotonic()
            log.info("at %s; %d samples spooled", json.dumps(rounds.describe()), spool.samples)
    if rounds.finished:
        log.info("simulation reached its end; sending what is spooled")
        while spool.samples and not stop.wait(0.2):
            pass
    drained = delivery.close(settings.agent_shutdown_flush_s)
    if sampler is not None:
        sampler.close()
    spool.close()
    if simulation_spool and drained:
        shutil.rmtree(spool_dir, ignore_errors=True)
    log.info("stopped; %s", json.dumps(rounds.describe()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
