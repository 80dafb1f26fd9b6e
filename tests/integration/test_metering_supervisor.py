"""WORKER_PROCESSES: one metering service, several worker processes on a real broker."""

from __future__ import annotations

import os
import signal
from decimal import Decimal
from pathlib import Path

import httpx

from tests.fixtures.kafka import produce
from tests.fixtures.metering import metering_process
from tests.fixtures.processes import wait_until
from tests.integration.test_metering import SteadyProducer, diagnosis, fleet_rounds, hourly_when


def by_process(port: int, series: str, label: str = "") -> dict[str, float]:
    """One series of the supervisor's /metrics per worker process (its `process` label)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(series + "{") and label in line:
            process = line.split('process="', 1)[1].split('"', 1)[0]
            found[process] = float(line.rsplit(" ", 1)[1])
    return found


def counted_by_process(port: int) -> dict[str, float]:
    return by_process(port, "gpumeter_metering_samples_total", 'outcome="counted"')


def metric(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def health(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) has stopped counting too
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_worker_processes_share_the_partitions_and_a_killed_one_is_restarted_exactly(
    bootstrap_servers: str, topic_prefix: str, tmp_path: Path
) -> None:
    # Given the service started with two worker processes
    service = metering_process(bootstrap_servers, topic_prefix, tmp_path / "metering.log")
    service.env["WORKER_PROCESSES"] = "2"
    service.start(timeout_s=90)
    port = service.http_port
    assert port is not None
    topic = f"{topic_prefix}gpu.usage.v1"
    nodes = [f"node-{n}" for n in range(8)]
    try:
        # (once both hold usage partitions: a broker that lets the first member join alone
        # hands it all of them, and it would count everything before the second joins)
        wait_until(
            lambda: (
                len(held := by_process(port, "gpumeter_metering_usage_partitions")) == 2
                and min(held.values()) > 0
            ),
            90,
            what="both worker processes holding usage partitions",
        )
        produce(bootstrap_servers, topic, fleet_rounds(nodes, 1, 100))
        # Then both count, and one /metrics shows each under its own `process` label
        wait_until(
            lambda: len(by := counted_by_process(port)) == 2 and min(by.values()) >= 100,
            90,
            what="both worker processes counting",
        )
        report = health(port)
        assert report["status"] == "ok"
        assert [w["status"] for w in report["workers"]] == ["ok", "ok"]
        # When one worker dies by SIGKILL while samples keep arriving
        victim = report["workers"][0]["pid"]
        producer = SteadyProducer(bootstrap_servers, topic, fleet_rounds(nodes, 100, 241), 0.1)
        producer.start()
        os.kill(victim, signal.SIGKILL)
        producer.finish()
        # Then the supervisor starts it again and the totals hold every sample exactly once
        wait_until(
            lambda: (r := health(port))["status"] == "ok" and r["workers"][0]["pid"] != victim,
            90,
            what="the killed worker restarted and healthy",
        )
        assert health(port)["workers"][0]["restarts"] == 1
        assert metric(port, "gpumeter_metering_worker_restarts_total") == 1.0
        key = "hkgai-llm|H800|2026-11-28T01:00:00+00:00"
        try:
            latest = hourly_when(bootstrap_servers, topic_prefix, {key: 240 * 64})
        except AssertionError as error:
            lag = [
                line
                for line in httpx.get(
                    f"http://127.0.0.1:{port}/metrics", timeout=5
                ).text.splitlines()
                if line.startswith(
                    ("gpumeter_metering_consumer_lag{", "gpumeter_metering_samples_total{")
                )
            ]
            why = diagnosis(bootstrap_servers, topic_prefix, service)
            raise AssertionError(f"{error}\n" + "\n".join(lag) + f"\n{why}") from None
        assert Decimal(latest[key]["gpu_seconds"]) == Decimal(240 * 64 * 10)
        # And a supervisor killed by SIGKILL takes its workers with it: none is left holding
        # partitions
        workers = [w["pid"] for w in health(port)["workers"]]
        assert service.process is not None
        os.kill(service.process.pid, signal.SIGKILL)
        service.process.wait(10)
        wait_until(lambda: not any(alive(pid) for pid in workers), 30, what="workers gone")
    finally:
        service.stop()
