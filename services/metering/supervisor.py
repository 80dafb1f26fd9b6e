"""Several metering workers on one host, behind one /healthz and /metrics.

A metering worker is one Python process: it uses one core, whatever the host has. Workers scale
by partitions (Faust shares the usage topic's partitions across a consumer group), so a host with
N cores runs N workers. `WORKER_PROCESSES=N` makes `python -m services.metering` do that itself:
this supervisor starts N workers in the same group, each on a private HTTP port, restarts one
that exits (the group rebalances; the others keep counting), and serves the usual endpoints on
HTTP_PORT: /healthz is ok when every worker answers ok, /metrics holds every worker's metrics with
a `process` label (sum them over `process`) and the supervisor's own.

Workers keep no standby copies of each other's tables unless TABLE_STANDBY_REPLICAS says so.
Workers die with the supervisor (Linux parent-death signal), so a supervisor killed by SIGKILL
leaves no orphan still holding partitions.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from services.common.http import free_port, serve_health_and_metrics
from services.metering.settings import MeteringSettings

log = logging.getLogger("gpumeter.metering.supervisor")

RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
STOP_TIMEOUT_S = 30.0
SCRAPE_TIMEOUT_S = 5.0
_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> Any:
    def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the supervisor died before the signal was armed
            os._exit(1)

    return die_with_parent


@dataclass
class Worker:
    index: int
    port: int
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def merge_expositions(texts: list[tuple[str, str]]) -> str:
    """Prometheus text expositions of several processes as one: every sample gains a `process`
    label, each family's HELP and TYPE lines appear once and its samples stay together.
    Plain string work: the worker scrape is frequent, and parsing it costs the host's cores."""
    order: list[str] = []
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = defaultdict(list)
    for process, text in texts:
        family = ""
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    if family not in headers:
                        headers[family] = []
                        order.append(family)
                    if line not in headers[family]:
                        headers[family].append(line)
                continue
            space = line.find(" ")
            brace = line.find("{", 0, space if space != -1 else len(line))
            if brace != -1:
                line = f'{line[: brace + 1]}process="{process}",{line[brace + 1 :]}'
            else:
                line = f'{line[:space]}{{process="{process}"}}{line[space:]}'
            if family not in headers:
                headers[family] = []
                order.append(family)
            samples[family].append(line)
    out: list[str] = []
    for family in order:
        out.extend(headers[family])
        out.extend(samples[family])
    return "\n".join(out) + "\n" if out else ""


class Supervisor:
    def __init__(self, settings: MeteringSettings) -> None:
        self.settings = settings
        self.host = "127.0.0.1"
        self.workers = [
            Worker(index, free_port(self.host)) for index in range(settings.worker_processes)
        ]
        self.stopping = threading.Event()
        self.registry = CollectorRegistry()
        self.restarts = Counter(
            "gpumeter_metering_worker_restarts",
            "Metering workers restarted by the supervisor after they exited",
            registry=self.registry,
        )
        self.running = Gauge(
            "gpumeter_metering_workers_running",
            "Metering worker processes running under the supervisor",
            registry=self.registry,
        )

    def start_worker(self, worker: Worker) -> None:
        env = {
            **os.environ,
            "WORKER_PROCESSES": "1",
            "HTTP_HOST": self.host,
            "HTTP_PORT": str(worker.port),
        }
        # Standby copies of one host's workers' tables kept on the same host protect against
        # nothing a restart does not, and each doubled a worker's memory at 15,000 GPUs (701 MB
        # in all for two workers against 318 MB without): none unless asked for.
        env.setdefault("TABLE_STANDBY_REPLICAS", "0")
        worker.process = subprocess.Popen(
            [sys.executable, "-m", "services.metering"],
            env=env,
            preexec_fn=_die_with(os.getpid()) if sys.platform == "linux" else None,
        )
        worker.started_at = time.monotonic()
        log.info(
            "metering worker %d started (pid %d, port %d)",
            worker.index,
            worker.process.pid,
            worker.port,
        )

    def metrics(self) -> bytes:
        texts = []
        with httpx.Client(timeout=SCRAPE_TIMEOUT_S) as client:
            for worker in self.workers:
                try:
                    response = client.get(f"http://{self.host}:{worker.port}/metrics")
                except httpx.HTTPError:
                    continue  # a worker starting or restarting: its series come back with it
                texts.append((str(worker.index), response.text))
        return generate_latest(self.registry) + merge_expositions(texts).encode()

    def health(self) -> dict[str, Any]:
        report = []
        with httpx.Client(timeout=SCRAPE_TIMEOUT_S) as client:
            for worker in self.workers:
                status = "down"
                if worker.running:
                    try:
                        response = client.get(f"http://{self.host}:{worker.port}/healthz")
                        status = "ok" if response.status_code == 200 else "starting"
                    except httpx.HTTPError:
                        status = "starting"
                report.append(
                    {
                        "process": worker.index,
                        "pid": worker.process.pid if worker.process else None,
                        "port": worker.port,
                        "status": status,
                        "restarts": worker.restarts,
                    }
                )
        ok = all(entry["status"] == "ok" for entry in report)
        return {
            "status": "ok" if ok else "degraded",
            "service": "metering",
            "app_id": self.settings.faust_id,
            "workers": report,
        }

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        server = serve_health_and_metrics(
            self.settings.http_host,
            self.settings.http_port,
            self.registry,
            self.health,
            self.metrics,
        )
        log.info(
            "metering supervisor on %s:%d running %d workers",
            self.settings.http_host,
            self.settings.http_port,
            len(self.workers),
        )
        try:
            for worker in self.workers:
                self.start_worker(worker)
            due: dict[int, float] = {}
            while not self.stopping.wait(0.2):
                self.running.set(sum(worker.running for worker in self.workers))
                for worker in self.workers:
                    if worker.process is None or worker.running:
                        continue
                    if worker.index not in due:
                        code = worker.process.returncode
                        # A worker that ran a while before exiting starts again at once; one
                        # that keeps failing at start-up waits longer each time.
                        quick = time.monotonic() - worker.started_at < 60
                        step = min(worker.restarts if quick else 0, len(RESTART_BACKOFF_S) - 1)
                        delay = RESTART_BACKOFF_S[step] if quick else 0.0
                        log.warning(
                            "metering worker %d (pid %d) exited with %s; restarting in %.0f s",
                            worker.index,
                            worker.process.pid,
                            code,
                            delay,
                        )
                        due[worker.index] = time.monotonic() + delay
                    if time.monotonic() >= due[worker.index]:
                        del due[worker.index]
                        worker.restarts += 1
                        self.restarts.inc()
                        self.start_worker(worker)
        finally:
            self.stop_workers()
            server.shutdown()
        return 0

    def stop_workers(self) -> None:
        for worker in self.workers:
            if worker.running:
                assert worker.process is not None
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for worker in self.workers:
            if worker.process is None:
                continue
            try:
                worker.process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("metering worker %d did not stop in time: killed", worker.index)
                worker.process.kill()
                worker.process.wait()
        self.running.set(0)


def run_supervised(settings: MeteringSettings) -> int:
    return Supervisor(settings).run()
