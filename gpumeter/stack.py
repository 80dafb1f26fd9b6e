"""`gpumeter up`: broker, database, services and a simulated fleet on this machine, in one command.

Everything lives under one data directory (default ./var) that can simply be deleted.
KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL name existing servers instead.

However the stack process ends (Ctrl-C, SIGTERM, SIGHUP from a closing terminal, a broken pipe on
its stdout, an exception, SIGKILL), nothing it started stays behind: every child carries the
marker GPUMETER_STACK=<data directory> in its environment, and a guardian process in a session of
its own (gpumeter.guardian) stops every marked process when the stack's pipe to it closes. A lock
on the data directory keeps a second stack off it; a stack that finds processes an earlier one
left (its guardian killed too) stops them before it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx

from gpumeter.kafkabroker import KAFKA_VERSION, KafkaCluster
from gpumeter.localstack import EmbeddedPostgres, TansuBroker, free_port
from gpumeter.processes import STACK_ENV, stop_marked
from schemas.topics import Topics
from services.agent.spool import spooled_files
from services.common.auth import MIN_TOKEN_CHARS

REPO_ROOT = Path(__file__).resolve().parents[1]
HKT = ZoneInfo("Asia/Hong_Kong")


@dataclass
class StackOptions:
    data_dir: Path = Path("var")
    fleet: bool = True
    # About the Cyberport centre's scale; at 120x a day of history takes 12 minutes (~2,600
    # samples/s on 2 cores), then the fleet runs in real time. --speed/--start/--nodes change it.
    nodes: int = 165
    speed: float = 120.0
    start: str = "-1d"
    interval_s: float = 60.0
    partitions: int = 8
    duration_s: float | None = None  # stop by itself after this long (used by tests and demos)
    catalog: Path = REPO_ROOT / "deploy" / "catalog.sample.yaml"
    rules: Path = REPO_ROOT / "deploy" / "alert-rules.yaml"
    topic_prefix: str = ""  # isolates a run on a shared broker (the fault drill)
    # The local broker when KAFKA_BOOTSTRAP_SERVERS names none: "tansu" (in memory, starts in
    # well under a second) or "kafka" (Apache Kafka in KRaft mode, `kafka_nodes` of them; with
    # `kafka_netns` each in a network namespace of its own, which the fault drill can cut off).
    broker: str = "tansu"
    kafka_nodes: int = 1
    kafka_netns: bool = False
    # The address the agents use, given the broker's: the fault drill puts a proxy in between.
    agent_bootstrap: Callable[[str], str] | None = None
    agent_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Resolved once, where the options are read: children run in other working directories
        # (PostgreSQL's is its data directory, the services' the repository root).
        self.data_dir = Path(self.data_dir).resolve()
        self.catalog = Path(self.catalog).resolve()
        self.rules = Path(self.rules).resolve()


class StackBusy(SystemExit):
    """Another stack holds the data directory."""


class WebhookInbox:
    """A local receiver for the generic webhook, so the demo can show alerts arriving. With a
    `record` file, every notification is also appended to it as one JSON line (what on-call would
    have received, kept across runs on the same data directory)."""

    def __init__(self, record: Path | None = None) -> None:
        self.received: list[dict[str, Any]] = []
        self.idempotency_keys: list[str | None] = []  # per request, beside `received`
        self.record = record
        self._lock = threading.Lock()
        inbox = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                inbox.idempotency_keys.append(self.headers.get("Idempotency-Key"))
                try:
                    payload = json.loads(body)
                except json.JSONDecodeError:
                    payload = {"raw": body.decode(errors="replace")}
                inbox.received.append(payload)
                if inbox.record is not None:
                    with inbox._lock, open(inbox.record, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(payload, separators=(",", ":")) + "\n")
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                return

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/alerts"


@dataclass
class Stack:
    options: StackOptions
    children: dict[str, subprocess.Popen] = field(default_factory=dict)
    launches: dict[str, tuple[list[str], int | None, dict[str, str] | None]] = field(
        default_factory=dict
    )
    broker: TansuBroker | None = None
    kafka: KafkaCluster | None = None
    postgres: EmbeddedPostgres | None = None
    ports: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    admin_token: str = ""
    billing_token: str = ""
    guardian: subprocess.Popen | None = None
    lock: Any = None
    env_fleet_start: str = ""

    @property
    def logs(self) -> Path:
        return self.options.data_dir / "logs"

    def start(self) -> None:
        opts = self.options
        opts.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        set_transcript(self.logs / "stack.log")
        self.take_data_dir()
        say(f"data directory: {opts.data_dir} (delete it to start afresh)")
        self.start_guardian()

        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if not bootstrap and opts.broker == "kafka":
            bootstrap = self.start_kafka()
        elif not bootstrap:
            began = say_waiting("broker: starting Tansu")
            self.broker = TansuBroker(self.logs / "tansu.log").start()
            assert self.broker.process is not None
            self.guard(self.broker.process, signal.SIGTERM, tier=1)
            bootstrap = self.broker.bootstrap_servers
            say(f"broker: Tansu (in memory) on {bootstrap} ({time.monotonic() - began:.1f} s)")
        else:
            say(f"broker: {bootstrap} (from KAFKA_BOOTSTRAP_SERVERS)")
        database_url = os.environ.get("DATABASE_URL")
        if not database_url:
            began = say_waiting(f"database: starting PostgreSQL in {opts.data_dir / 'pgdata'}")
            self.postgres = EmbeddedPostgres(opts.data_dir / "pgdata")
            self.postgres.on_spawn = lambda process: self.guard(process, signal.SIGINT, tier=1)
            self.postgres.start()
            asyncio.run(create_database(self.postgres.dsn(), "gpumeter"))
            database_url = self.postgres.dsn("gpumeter")
            say(
                f"database: embedded PostgreSQL on {database_url} "
                f"({time.monotonic() - began:.1f} s)"
            )
        else:
            say(f"database: {database_url} (from DATABASE_URL)")

        self.admin_token, self.billing_token = load_tokens(opts.data_dir / "api-tokens.json")
        self.inbox = WebhookInbox(self.logs / "notifications.jsonl")
        self.env = {
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "DATABASE_URL": database_url,
            "KAFKA_REBALANCE_TIMEOUT_MS": "3000",
            "KAFKA_REPLICATION_FACTOR": str(min(self.kafka.size, 3) if self.kafka else 1),
            "USAGE_PARTITIONS": str(opts.partitions),
            "API_TOKENS": f"{self.admin_token}=admin,{self.billing_token}=billing",
            "ALERT_RULES_FILE": str(opts.rules),
            "ALERT_WEBHOOK_URL": self.inbox.url,
            "PYTHONUNBUFFERED": "1",
        }
        if opts.topic_prefix:
            self.env["TOPIC_PREFIX"] = opts.topic_prefix
        # Each service creates the topics it writes, with their settings.
        topics = Topics(opts.topic_prefix)
        say(f"topics: {', '.join(topics.public())}")

        self.run_once(
            "catalog",
            [sys.executable, "-m", "services.billing", "catalog", "apply", str(opts.catalog)],
        )
        # Ports are picked just before their services bind them: a free port handed out earlier
        # can be taken meanwhile as the local port of an outgoing connection (the broker's, the
        # database's), and the service then fails to bind.
        self.ports.update(billing=free_port(), metering=free_port(), alerts=free_port())
        self.spawn(
            "metering",
            [sys.executable, "-m", "services.metering"],
            http_port=self.ports["metering"],
        )
        self.spawn(
            "billing",
            [sys.executable, "-m", "services.billing"],
            http_port=self.ports["billing"],
            extra_env={"ALERTS_URL": f"http://127.0.0.1:{self.ports['alerts']}"},  # dashboard
        )
        self.spawn(
            "alerts", [sys.executable, "-m", "services.alerts"], http_port=self.ports["alerts"]
        )
        for name in ("metering", "billing", "alerts"):
            self.wait_healthy(name)
        if opts.fleet:
            self.ports["agent"] = free_port()
            self.spawn(
                "agent",
                [sys.executable, "-m", "services.agent", "--simulate"],
                extra_env={
                    "AGENT_HTTP_PORT": str(self.ports["agent"]),
                    "AGENT_SIM_NODES": str(opts.nodes),
                    "AGENT_SIM_SPEED": str(opts.speed),
                    "AGENT_SIM_START": self.fleet_start(),
                    "AGENT_INTERVAL_S": str(opts.interval_s),
                    "AGENT_SPOOL_DIR": str(self.fresh_fleet_spool()),
                    **(
                        {"KAFKA_BOOTSTRAP_SERVERS": opts.agent_bootstrap(bootstrap)}
                        if opts.agent_bootstrap
                        else {}
                    ),
                    **opts.agent_env,
                },
            )
            say(
                f"simulated fleet: {opts.nodes} nodes x 8 H800 from {self.env_fleet_start} "
                f"({opts.start}) at {opts.speed:g}x"
            )
        else:
            say(
                f"no simulated fleet: point agents or any Kafka client at {bootstrap}, topic {topics.usage}"
            )
        self.print_directions()

    def start_kafka(self) -> str:
        """Apache Kafka on this machine, fresh each run like Tansu: its data directory is wiped,
        the fleet replays its history (see `fleet_start`) and metering rebuilds the same totals."""
        opts = self.options
        began = say_waiting(
            f"broker: starting Apache Kafka {KAFKA_VERSION} ({opts.kafka_nodes} node"
            f"{'s' if opts.kafka_nodes != 1 else ''}, KRaft; the jars are fetched once)"
        )
        kafka_dir = opts.data_dir / "kafka"
        shutil.rmtree(kafka_dir, ignore_errors=True)
        self.kafka = KafkaCluster(
            kafka_dir,
            size=opts.kafka_nodes,
            netns=opts.kafka_netns,
            on_spawn=lambda process: self.guard(process, signal.SIGTERM, tier=1),
        )
        self.kafka.start()
        bootstrap = self.kafka.bootstrap_servers
        say(f"broker: Apache Kafka on {bootstrap} ({time.monotonic() - began:.1f} s)")
        return bootstrap

    def take_data_dir(self) -> None:
        """Lock the data directory for this stack, and stop what an earlier one left running."""
        path = self.options.data_dir / "stack.lock"
        lock = open(path, "a+")  # noqa: SIM115 - held for the stack's lifetime
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise StackBusy(
                f"another gpumeter up (pid {holder}) is running on {self.options.data_dir}; "
                "stop it first, or give this one another --data-dir"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self.lock = lock
        marker = str(self.options.data_dir)
        left = stop_marked(marker, grace_s=10.0)
        if left:
            say(
                f"stopped {len(left)} processes an earlier run on this data directory left "
                f"behind ({', '.join(sorted({p.name for p in left}))})"
            )
        # Inherited by every process started from here on, grandchildren included.
        os.environ[STACK_ENV] = marker

    def start_guardian(self) -> None:
        log = open(self.logs / "guardian.log", "ab")  # noqa: SIM115 - owned by the child
        self.guardian = subprocess.Popen(
            [sys.executable, "-m", "gpumeter.guardian", str(self.options.data_dir)],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            start_new_session=True,
        )

    def guard(self, process: subprocess.Popen, sig: int, tier: int) -> None:
        """Tell the guardian how to stop this process group: tier 0 (services) before tier 1."""
        if self.guardian is None or self.guardian.stdin is None:
            return
        with contextlib.suppress(OSError):
            self.guardian.stdin.write(f"group {process.pid} {int(sig)} {tier}\n".encode())
            self.guardian.stdin.flush()

    def fleet_start(self) -> str:
        """The simulated fleet's start as a time, kept in the data directory: a later run with the
        same --start, --nodes and --interval continues the same fleet from the same start, so the
        seeded simulator makes the very same samples again (the broker is memory-only) and the
        invoices it rebuilds are the ones the ledger already holds, to the cent."""
        opts = self.options
        record = opts.data_dir / "fleet.json"
        wanted = {"start": opts.start, "nodes": opts.nodes, "interval_s": opts.interval_s}
        kept: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            kept = json.loads(record.read_text())
        if {k: kept.get(k) for k in wanted} == wanted and kept.get("start_time"):
            start_time = str(kept["start_time"])
            say(
                f"simulated fleet: continuing the fleet of an earlier run from {start_time} "
                f"(the same samples again, then new ones; delete {record} for a new start)"
            )
        else:
            start_time = resolve_start(opts.start)
            record.write_text(json.dumps({**wanted, "start_time": start_time}))
        self.env_fleet_start = start_time
        return start_time

    def fresh_fleet_spool(self) -> Path:
        """The simulated fleet's spool, emptied: the broker is memory-only and the fleet replays
        its history from this run's start, so what an earlier run had not delivered is generated
        again (same seeded samples, same ids) and would only arrive out of order before it."""
        spool = self.options.data_dir / "agent-spool"
        if spool.exists():
            left = sum(1 for _ in spooled_files(spool))
            shutil.rmtree(spool)
            if left:
                say(
                    f"simulated fleet: an earlier run left {left} undelivered rounds in {spool}; "
                    "this run generates them again"
                )
        return spool

    def run_once(self, name: str, command: list[str]) -> None:
        env = {**os.environ, **self.env}
        say_waiting(f"{name}: running {' '.join(command[1:])}")
        result = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
        (self.logs / f"{name}.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise SystemExit(f"{name} failed:\n{result.stdout}{result.stderr}")
        say(
            f"{name}: {result.stdout.strip().splitlines()[-1] if result.stdout.strip() else 'done'}"
        )

    def spawn(
        self,
        name: str,
        command: list[str],
        http_port: int | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.launches[name] = (command, http_port, extra_env)
        env = {**os.environ, **self.env, **(extra_env or {})}
        if http_port:
            env["HTTP_PORT"] = str(http_port)
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        self.children[name] = subprocess.Popen(
            command,
            env=env,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.guard(self.children[name], signal.SIGTERM, tier=0)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a child's whole process group (SIGKILL: a crash, no cleanup) and reap it."""
        child = self.children[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, sig)
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(5)

    def respawn(self, name: str) -> None:
        """Start a child again exactly as it was started, and wait for /healthz if it has one."""
        command, http_port, extra_env = self.launches[name]
        self.spawn(name, command, http_port=http_port, extra_env=extra_env)
        if http_port:
            self.wait_healthy(name)

    def wait_healthy(self, name: str, timeout_s: float = 90.0) -> None:
        began = time.monotonic()
        deadline = began + timeout_s
        url = f"http://127.0.0.1:{self.ports[name]}/healthz"
        said = began
        say(f"{name}: waiting for {url} to answer 200")
        while time.monotonic() < deadline:
            if time.monotonic() - said >= 10:
                said = time.monotonic()
                say(
                    f"{name}: still waiting for /healthz ({said - began:.0f} s of {timeout_s:g}; "
                    f"log {self.logs / (name + '.log')})"
                )
            if self.children[name].poll() is not None:
                raise SystemExit(f"{name} exited; see {self.logs / (name + '.log')}")
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    say(f"{name}: healthy on http://127.0.0.1:{self.ports[name]}")
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit(
            f"{name} not healthy after {timeout_s} s; see {self.logs / (name + '.log')}"
        )

    def print_directions(self) -> None:
        api = f"http://127.0.0.1:{self.ports['billing']}"
        period = datetime.now(HKT).strftime("%Y-%m")
        say("")
        say(f"dashboard     {api}/dashboard#token={self.billing_token}")
        say(f"billing API   {api}   (OpenAPI: {api}/openapi.json)")
        say(f"admin token   {self.admin_token}")
        say(f"billing token {self.billing_token}")
        say(
            f"try:          curl -H 'Authorization: Bearer {self.billing_token}' '{api}/v1/invoices?period={period}'"
        )
        say(
            f"alerts API    http://127.0.0.1:{self.ports['alerts']}/v1/alerts   (the same tokens:"
            f" curl -H 'Authorization: Bearer {self.billing_token}' ...)"
        )
        say(f"metrics       /metrics on every service; logs in {self.logs}")
        say("Ctrl-C stops everything.")
        say("")

    def watch(self) -> None:
        """Show how the centre is doing until Ctrl-C (or the duration runs out): a live rich view
        on a terminal, plain progress lines otherwise (logs, CI)."""
        started = time.monotonic()
        view = LiveView(self) if sys.stdout.isatty() else None
        seen_alerts = 0
        try:
            while (
                self.options.duration_s is None
                or time.monotonic() - started < self.options.duration_s
            ):
                if output_lost():
                    raise OutputClosed("standard output closed (broken pipe); stopping")
                self.check_children()
                snapshot = self.snapshot()
                if view is not None:
                    view.update(snapshot)
                else:
                    say(plain_line(snapshot))
                while seen_alerts < len(self.inbox.received):
                    payload = self.inbox.received[seen_alerts]
                    seen_alerts += 1
                    for alert in payload.get("alerts", []):
                        line = (
                            f"    ALERT {alert.get('status', '?').upper()}: "
                            f"{alert.get('labels', {}).get('alertname')} "
                            f"{alert.get('annotations', {}).get('summary', '')} "
                            f"[since {alert.get('startsAt', '?')}]"
                        )
                        if view is not None:
                            view.events.append(line.strip())
                        else:
                            say(line)
                time.sleep(2 if view is not None else 5)
        finally:
            if view is not None:
                view.close()
            api = f"http://127.0.0.1:{self.ports['billing']}"
            say(f"web dashboard {api}/dashboard#token={self.billing_token}")
            tokens = self.options.data_dir / "api-tokens.json"
            say(f"billing API   {api}/v1   (OpenAPI: {api}/openapi.json; tokens in {tokens})")

    def check_children(self) -> None:
        for name, child in self.children.items():
            if child.poll() is not None and (name != "agent" or child.returncode != 0):
                log = self.logs / (name + ".log")
                raise SystemExit(
                    f"{name} exited with {child.returncode}; see {log}; its last lines:\n"
                    + log_tail(log)
                )

    def snapshot(self) -> dict[str, Any]:
        """What the services say now, through their public APIs and /metrics."""
        simulated_time = self.simulated_time()
        # The period the fleet is in: a fleet replaying last month fills last month's invoices.
        when = datetime.now(HKT)
        with contextlib.suppress(ValueError, TypeError):
            when = datetime.fromisoformat(str(simulated_time)).astimezone(HKT)
        period = when.strftime("%Y-%m")
        snap: dict[str, Any] = {"period": period, "at": time.strftime("%H:%M:%S"), "invoices": []}
        if simulated_time is not None:
            snap["simulated_time"] = simulated_time
        headers = {"Authorization": f"Bearer {self.billing_token}"}
        try:
            response = httpx.get(
                f"http://127.0.0.1:{self.ports['billing']}/v1/invoices",
                params={"period": period},
                headers=headers,
                timeout=5,
            )
            if response.status_code == 200:
                body = response.json()
                snap["invoices"] = body if isinstance(body, list) else body.get("invoices", [])
        except httpx.HTTPError as exc:
            snap["billing_error"] = str(exc)
        snap["allocation"], snap["cap"] = self.dashboard_figures(period, headers)
        metrics = scrape(f"http://127.0.0.1:{self.ports['metering']}/metrics")
        counted = sum(
            v
            for k, v in metrics.items()
            if k.startswith("gpumeter_metering_samples_total") and 'outcome="counted"' in k
        )
        now = time.monotonic()
        previous = getattr(self, "_previous_counted", None)
        snap["samples_per_s"] = (counted - previous[1]) / (now - previous[0]) if previous else 0.0
        self._previous_counted = (now, counted)
        snap["samples_counted"] = counted
        snap["lag"] = sum(
            v for k, v in metrics.items() if k.startswith("gpumeter_metering_consumer_lag")
        )
        try:
            alerts = httpx.get(
                f"http://127.0.0.1:{self.ports['alerts']}/v1/alerts",
                params={"status": "firing"},
                headers={"Authorization": f"Bearer {self.billing_token}"},
                timeout=5,
            ).json()
            snap["active_alerts"] = alerts.get("alerts", []) if isinstance(alerts, dict) else alerts
        except (httpx.HTTPError, ValueError):
            snap["active_alerts"] = []
        return snap

    def simulated_time(self) -> str | None:
        """Where the simulated fleet's clock is (its /healthz), if it runs."""
        if "agent" in self.ports and "agent" in self.children:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                found = (
                    httpx.get(f"http://127.0.0.1:{self.ports['agent']}/healthz", timeout=2)
                    .json()
                    .get("simulated_time")
                )
                return str(found) if found else None
        return None

    def dashboard_figures(
        self, period: str, headers: dict[str, str]
    ) -> tuple[list[tuple[str, float]], dict[str, tuple[Decimal, Decimal]]]:
        """From billing's dashboard API: the centre's allocation ratio per hour of the period
        (allocated GPUs on average / GPUs in the fleet), and each subsidised project's cap and
        what of it is used."""
        base = f"http://127.0.0.1:{self.ports['billing']}/dashboard/api"
        allocation: list[tuple[str, float]] = []
        cap: dict[str, tuple[Decimal, Decimal]] = {}
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, ArithmeticError):
            centre = httpx.get(
                f"{base}/centre", params={"period": period}, headers=headers, timeout=5
            ).json()
            hours = centre["hours"]
            gpus = self.options.nodes * 8 if self.options.fleet else 0
            if not gpus:
                gpus = 8 * max((h.get("nodes_online") or 0 for h in hours), default=0)
            if gpus:
                allocation = [
                    (h["hour_start"], float(Decimal(h["allocated_gpus"]) / gpus)) for h in hours
                ]
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, ArithmeticError):
            projects = httpx.get(f"{base}/cap", headers=headers, timeout=5).json()["projects"]
            cap = {
                p["project_id"]: (Decimal(p["cap_hkd"]), Decimal(p["used_hkd"])) for p in projects
            }
        return allocation, cap

    def stop(self) -> None:
        """Stop everything: the guardian does it (services first, then database and broker), the
        same way it would if this process had died; then check nothing marked is left."""
        if self.guardian is None:
            return
        say("stopping: services first, then the database and the broker")
        began = time.monotonic()
        with contextlib.suppress(OSError):
            assert self.guardian.stdin is not None
            self.guardian.stdin.close()
        try:
            self.guardian.wait(60)
        except subprocess.TimeoutExpired:
            say("the guardian did not finish in 60 s; stopping what is left myself")
        # Our own children: reap them (the guardian stopped them, it is not their parent).
        brokers = [
            self.broker and self.broker.process,
            *(self.kafka.processes if self.kafka else []),
        ]
        for child in [*self.children.values(), *brokers]:
            if child:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(5)
        if self.postgres and self.postgres.process:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.postgres.process.wait(5)
        left = stop_marked(str(self.options.data_dir), grace_s=5.0)
        if self.kafka is not None:
            self.kafka.remove_network()  # its nodes' namespaces and bridge, once they are gone
        self.guardian = None
        if left:
            say(f"stopped: {len(left)} processes needed a second try ({left})")
        else:
            say(f"stopped: no process left behind ({time.monotonic() - began:.1f} s)")
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def scrape(url: str) -> dict[str, float]:
    """Prometheus text format -> {series: value}; empty when the endpoint does not answer."""
    try:
        text = httpx.get(url, timeout=3).text
    except httpx.HTTPError:
        return {}
    series: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                series[name] = float(value)
            except ValueError:
                continue
    return series


def totals(snapshot: dict[str, Any]) -> tuple[Decimal, Decimal]:
    gross = sum((Decimal(i["gross_hkd"]) for i in snapshot["invoices"]), Decimal(0))
    subsidy = sum((Decimal(i["subsidy_hkd"]) for i in snapshot["invoices"]), Decimal(0))
    return gross, subsidy


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], low: float = 0.5, high: float = 1.0) -> str:
    """One character per value, from `low` (or less) to `high` (or more)."""
    span = high - low
    return "".join(
        SPARKS[min(len(SPARKS) - 1, max(0, int((v - low) / span * len(SPARKS))))] for v in values
    )


def allocation_line(snapshot: dict[str, Any], hours: int = 48) -> str:
    points = snapshot.get("allocation") or []
    if not points:
        return "allocation: no hours yet"
    # The newest hour is still filling up (its ratio only grows): show the hours before it.
    done = points[:-1] or points
    recent = [ratio for _hour, ratio in done[-hours:]]
    return (
        f"allocation {recent[-1]:.1%} last hour (last {len(recent)} h, 50%..100%: "
        f"{sparkline(recent)})"
    )


def cap_used(snapshot: dict[str, Any], project_id: str) -> str:
    found = (snapshot.get("cap") or {}).get(project_id)
    if not found or not found[0]:
        return "-"
    cap, used = found
    return f"{used / cap:.1%}"


def waiting_for(snapshot: dict[str, Any]) -> str | None:
    """What the centre's figures still wait for, in words; None once invoices show."""
    if snapshot.get("billing_error"):
        return f"waiting for the billing API ({snapshot['billing_error']})"
    if not snapshot.get("samples_counted"):
        return "waiting for metering to count the first samples from the agents"
    if not snapshot["invoices"]:
        return (
            f"waiting for billing's first draft invoices (metering counted "
            f"{snapshot['samples_counted']:,.0f} samples; hourly totals follow)"
        )
    return None


def plain_line(snapshot: dict[str, Any]) -> str:
    gross, subsidy = totals(snapshot)
    waiting = waiting_for(snapshot)
    pipeline = (
        f"{snapshot['samples_per_s']:,.0f} samples/s, lag {snapshot['lag']:,.0f}, "
        f"{len(snapshot['active_alerts'])} alerts firing{fleet_clock(snapshot)}"
    )
    if waiting:
        return f"[{snapshot['at']}] {waiting}; {pipeline}"
    return (
        f"[{snapshot['at']}] {allocation_line(snapshot, 12)}; "
        f"{len(snapshot['invoices'])} draft invoices for {snapshot['period']}: "
        f"gross HK${gross:,.2f}, subsidy HK${subsidy:,.2f}, net HK${gross - subsidy:,.2f}; "
        f"{pipeline}"
    )


def fleet_clock(snapshot: dict[str, Any]) -> str:
    """Where the simulated fleet's clock is, when it runs: a replay or catch-up shows as such."""
    found = snapshot.get("simulated_time")
    if not found:
        return ""
    try:
        return f"; fleet at {datetime.fromisoformat(str(found)).astimezone(UTC):%Y-%m-%d %H:%M} UTC"
    except ValueError:
        return f"; fleet at {found}"


class LiveView:
    """The rich terminal view: spend and subsidy per project, pipeline rate and lag, alerts."""

    def __init__(self, stack: Stack) -> None:
        from rich.console import Console
        from rich.live import Live

        self.stack = stack
        self.events: list[str] = []
        self.live = Live(console=Console(), refresh_per_second=2, transient=False)
        self.live.start()

    def update(self, snapshot: dict[str, Any]) -> None:
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table

        gross, subsidy = totals(snapshot)
        header = (
            f"[b]{snapshot['period']}[/b]  simulated time {snapshot.get('simulated_time', '-')}  "
            f"samples/s {snapshot['samples_per_s']:,.0f}  counted {snapshot['samples_counted']:,.0f}  "
            f"lag {snapshot['lag']:,.0f}\n"
            f"{allocation_line(snapshot)}\n"
            f"gross HK${gross:,.2f}  subsidy HK${subsidy:,.2f}  net HK${gross - subsidy:,.2f}"
        )
        waiting = waiting_for(snapshot)
        if waiting:
            header += f"\n[yellow]{waiting}[/yellow]"
        table = Table(title="draft invoices", expand=True)
        columns = (
            "project",
            "gross HK$",
            "subsidy HK$",
            "net HK$",
            "cap remaining HK$",
            "cap used",
        )
        for column in columns:
            table.add_column(column, justify="left" if column == "project" else "right")
        for invoice in sorted(snapshot["invoices"], key=lambda i: -Decimal(i["gross_hkd"])):
            table.add_row(
                invoice["project_id"],
                invoice["gross_hkd"],
                invoice["subsidy_hkd"],
                invoice["net_hkd"],
                invoice.get("subsidy_cap_remaining_hkd") or "-",
                cap_used(snapshot, invoice["project_id"]),
            )
        alerts = Table(title="alerts firing", expand=True)
        alerts.add_column("alert")
        alerts.add_column("labels")
        for alert in snapshot["active_alerts"][:10]:
            labels = alert.get("labels", {})
            alerts.add_row(
                str(labels.get("alertname", alert.get("rule", "?"))),
                ", ".join(f"{k}={v}" for k, v in labels.items() if k != "alertname"),
            )
        recent = "\n".join(self.events[-5:]) or "no notifications yet"
        self.live.update(
            Group(
                Panel(header, title="gpumeter"),
                table,
                alerts,
                Panel(recent, title="webhook notifications"),
            )
        )

    def close(self) -> None:
        self.live.stop()


class OutputClosed(Exception):
    """Nobody reads the stack's output any more (the pipe to `tee` or the terminal is gone)."""


_transcript: Any = None
_output_lost = False


def set_transcript(path: Path) -> None:
    """Everything the stack says also goes to this file (it outlives a closed terminal)."""
    global _transcript
    if _transcript is not None:
        _transcript.close()
    _transcript = open(path, "a", encoding="utf-8")  # noqa: SIM115 - module lifetime


def output_lost() -> bool:
    return _output_lost


def say(text: str) -> None:
    """Print a line; never raises. A broken pipe or a closed terminal makes stdout /dev/null
    (and `output_lost()` true, which ends the watch loop); the transcript still gets the line."""
    global _output_lost
    if _transcript is not None:
        with contextlib.suppress(OSError, ValueError):
            _transcript.write(f"{time.strftime('%H:%M:%S')} {text}\n")
            _transcript.flush()
    if _output_lost:
        return
    try:
        print(text, flush=True)
    except (OSError, ValueError):
        _output_lost = True
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - also for the interpreter's exit


def say_waiting(text: str) -> float:
    """Say what is being waited for now; returns the time it began."""
    say(f"{text} ...")
    return time.monotonic()


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a service's log, indented, for an error that names the log."""
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"  ({error.strerror})"
    return "\n".join("  " + line for line in text.splitlines()[-lines:]) or "  (empty)"


def load_tokens(path: Path) -> tuple[str, str]:
    tokens: dict[str, str] = {}
    if path.exists():
        tokens = json.loads(path.read_text())
        if min(len(tokens.get("admin", "")), len(tokens.get("billing", ""))) < MIN_TOKEN_CHARS:
            say(f"{path}: tokens from an older run are too short for the services; new ones made")
            path.unlink()
            tokens = {}
    if not tokens:
        tokens = {"admin": secrets.token_urlsafe(32), "billing": secrets.token_urlsafe(32)}
        # Private from its creation: written first and restricted after, it was readable by
        # anyone on the host in between.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(tokens))
    return tokens["admin"], tokens["billing"]


async def create_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def run(options: StackOptions) -> int:
    """The first command: start, watch until told to stop, stop. Exit status 0 when stopped by a
    signal or the duration, 1 when something failed (said above, and in logs/stack.log)."""
    stack = Stack(options)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        if stopping:
            say(f"{signal.Signals(signum).name}: already stopping, please wait")
            return
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    status = 0
    try:
        stack.start()
        stack.watch()
    except KeyboardInterrupt as exc:
        say(f"{exc.args[0] if exc.args else 'SIGINT'}: stopping")
    except OutputClosed as exc:
        say(str(exc))
    except StackBusy as exc:
        say(str(exc))
        return 1
    except SystemExit as exc:
        say(f"error: {exc.code}")
        status = 1
    except Exception as exc:  # noqa: BLE001 - the stack's last word: said, then it stops
        say(f"error: {type(exc).__name__}: {exc}")
        import traceback

        say(traceback.format_exc().rstrip())
        status = 1
    finally:
        stopping = True
        stack.stop()
    return status


def resolve_start(text: str) -> str:
    """--start (ISO time, or an offset from now such as -1d) as an ISO time in UTC."""
    from services.agent.__main__ import parse_when

    return parse_when(text, datetime.now(UTC)).isoformat()
