"""`python -m services.agent` runs the node agent; `--simulate` drives a simulated fleet instead of NVML.

--once      print one round of samples as JSON and exit
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from services.agent.publisher import AgentMetrics, Publisher
from services.agent.settings import AgentSettings
from services.agent.simulator import FleetConfig, FleetSimulator, aligned
from services.common.http import serve_health_and_metrics

log = logging.getLogger("gpumeter.agent")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.agent", description=__doc__)
    parser.add_argument(
        "--simulate", action="store_true", help="run a simulated fleet (the default for now)"
    )
    parser.add_argument("--once", action="store_true", help="print one round as JSON and exit")
    args = parser.parse_args(argv)
    settings = AgentSettings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s agent %(message)s"
    )

    config = FleetConfig(
        nodes=settings.agent_sim_nodes,
        seed=settings.agent_sim_seed,
        interval_s=settings.agent_interval_s,
        target_allocation=settings.agent_sim_target_allocation,
        silence_per_node_day=settings.agent_sim_silence_per_node_day,
    )
    fleet = FleetSimulator(config)
    now = datetime.now(UTC)
    sim_time = aligned(
        parse_when(settings.agent_sim_start, now) if settings.agent_sim_start else now,
        config.interval_s,
    )
    until = parse_when(settings.agent_sim_until, now) if settings.agent_sim_until else None
    if args.once:
        json.dump(fleet.round(sim_time), sys.stdout, indent=2)
        print()
        return 0

    metrics = AgentMetrics()
    state: dict[str, Any] = {"sim_time": sim_time, "running": True}
    serve_health_and_metrics(
        settings.http_host,
        settings.agent_http_port,
        metrics.registry,
        lambda: {
            "status": "ok",
            "service": "agent",
            "simulated_time": state["sim_time"].isoformat(),
        },
    )
    publisher = Publisher(settings.kafka_bootstrap_servers, settings.topics.usage, metrics)

    def stop(signum: int, frame: object) -> None:
        state["running"] = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    step = timedelta(seconds=config.interval_s)
    real_start, sim_start = time.monotonic(), sim_time
    log.info(
        "simulating %d nodes x %d GPUs from %s at %gx",
        config.nodes,
        config.gpus_per_node,
        sim_time.isoformat(),
        settings.agent_sim_speed,
    )
    progress_at = time.monotonic()
    while state["running"] and (until is None or sim_time <= until):
        sim_time += step
        # Never run ahead of the real clock: metering rejects samples from the future.
        wall_now = datetime.now(UTC)
        if sim_time > wall_now:
            time.sleep((sim_time - wall_now).total_seconds())
        elif settings.agent_sim_speed > 0:
            due = real_start + (sim_time - sim_start).total_seconds() / settings.agent_sim_speed
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        publisher.publish(fleet.round(sim_time))
        metrics.rounds.inc()
        state["sim_time"] = sim_time
        if time.monotonic() - progress_at > 10:
            progress_at = time.monotonic()
            log.info(
                "simulated time %s, %d/%d GPUs allocated",
                sim_time.isoformat(),
                fleet.allocated_gpus(),
                fleet.total_gpus,
            )
    publisher.close()
    log.info("stopped at simulated time %s", sim_time.isoformat())
    return 0


if __name__ == "__main__":
    sys.exit(main())
