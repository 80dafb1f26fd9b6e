"""`gpumeter up`: broker, database, services and a simulated fleet on this machine, in one command.

Everything lives under one data directory (default ./var) that can simply be deleted. Ctrl-C stops
every child process. KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL name existing servers instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx

from gpumeter.localstack import EmbeddedPostgres, TansuBroker, free_port
from schemas.topics import Topics

REPO_ROOT = Path(__file__).resolve().parents[1]
HKT = ZoneInfo("Asia/Hong_Kong")


@dataclass
class StackOptions:
    data_dir: Path = Path("var")
    fleet: bool = True
    nodes: int = 8
    speed: float = 1800.0
    start: str = "-2d"
    interval_s: float = 60.0
    partitions: int = 8
    duration_s: float | None = None  # stop by itself after this long (used by tests and demos)
    catalog: Path = REPO_ROOT / "deploy" / "catalog.sample.yaml"
    rules: Path = REPO_ROOT / "deploy" / "alert-rules.yaml"


class WebhookInbox:
    """A local receiver for the generic webhook, so the demo can show alerts arriving."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        inbox = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    inbox.received.append(json.loads(body))
                except json.JSONDecodeError:
                    inbox.received.append({"raw": body.decode(errors="replace")})
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
    broker: TansuBroker | None = None
    postgres: EmbeddedPostgres | None = None
    ports: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    admin_token: str = ""
    billing_token: str = ""

    @property
    def logs(self) -> Path:
        return self.options.data_dir / "logs"

    def start(self) -> None:
        opts = self.options
        opts.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        say(f"data directory: {opts.data_dir.resolve()} (delete it to start afresh)")

        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if not bootstrap:
            self.broker = TansuBroker(self.logs / "tansu.log").start()
            bootstrap = self.broker.bootstrap_servers
            say(f"broker: Tansu (in memory) on {bootstrap}")
        else:
            say(f"broker: {bootstrap} (from KAFKA_BOOTSTRAP_SERVERS)")
        database_url = os.environ.get("DATABASE_URL")
        if not database_url:
            self.postgres = EmbeddedPostgres(opts.data_dir / "pgdata").start()
            asyncio.run(create_database(self.postgres.dsn(), "gpumeter"))
            database_url = self.postgres.dsn("gpumeter")
            say(f"database: embedded PostgreSQL on {database_url}")
        else:
            say(f"database: {database_url} (from DATABASE_URL)")

        self.admin_token, self.billing_token = load_tokens(opts.data_dir / "api-tokens.json")
        self.inbox = WebhookInbox()
        self.ports = {
            "billing": free_port(),
            "metering": free_port(),
            "alerts": free_port(),
            "agent": free_port(),
        }
        self.env = {
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "DATABASE_URL": database_url,
            "KAFKA_REBALANCE_TIMEOUT_MS": "3000",
            "USAGE_PARTITIONS": str(opts.partitions),
            "API_TOKENS": f"{self.admin_token}=admin,{self.billing_token}=billing",
            "ALERT_RULES_FILE": str(opts.rules),
            "ALERT_WEBHOOK_URL": self.inbox.url,
            "PYTHONUNBUFFERED": "1",
        }
        topics = Topics()  # each service creates the topics it writes, with their settings
        say(f"topics: {', '.join(topics.public())}")

        self.run_once(
            "catalog",
            [sys.executable, "-m", "services.billing", "catalog", "apply", str(opts.catalog)],
        )
        self.spawn(
            "metering",
            [sys.executable, "-m", "services.metering"],
            http_port=self.ports["metering"],
        )
        self.spawn(
            "billing", [sys.executable, "-m", "services.billing"], http_port=self.ports["billing"]
        )
        self.spawn(
            "alerts", [sys.executable, "-m", "services.alerts"], http_port=self.ports["alerts"]
        )
        for name in ("metering", "billing", "alerts"):
            self.wait_healthy(name)
        if opts.fleet:
            self.spawn(
                "agent",
                [sys.executable, "-m", "services.agent", "--simulate"],
                extra_env={
                    "AGENT_HTTP_PORT": str(self.ports["agent"]),
                    "AGENT_SIM_NODES": str(opts.nodes),
                    "AGENT_SIM_SPEED": str(opts.speed),
                    "AGENT_SIM_START": opts.start,
                    "AGENT_INTERVAL_S": str(opts.interval_s),
                },
            )
            say(
                f"simulated fleet: {opts.nodes} nodes x 8 H800 from {opts.start} at {opts.speed:g}x"
            )
        else:
            say(
                f"no simulated fleet: point agents or any Kafka client at {bootstrap}, topic {topics.usage}"
            )
        self.print_directions()

    def run_once(self, name: str, command: list[str]) -> None:
        env = {**os.environ, **self.env}
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

    def wait_healthy(self, name: str, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{self.ports[name]}/healthz"
        while time.monotonic() < deadline:
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
        say(f"billing API   {api}   (OpenAPI: {api}/openapi.json)")
        say(f"admin token   {self.admin_token}")
        say(f"billing token {self.billing_token}")
        say(
            f"try:          curl -H 'Authorization: Bearer {self.billing_token}' '{api}/v1/invoices?period={period}'"
        )
        say(f"alerts API    http://127.0.0.1:{self.ports['alerts']}/v1/alerts")
        say(f"metrics       /metrics on every service; logs in {self.logs}")
        say("Ctrl-C stops everything.")
        say("")

    def watch(self) -> None:
        """Print how the centre is doing until Ctrl-C (or the duration runs out)."""
        api = f"http://127.0.0.1:{self.ports['billing']}"
        headers = {"Authorization": f"Bearer {self.billing_token}"}
        started = time.monotonic()
        seen_alerts = 0
        while (
            self.options.duration_s is None or time.monotonic() - started < self.options.duration_s
        ):
            for name, child in self.children.items():
                if child.poll() is not None and (name != "agent" or child.returncode != 0):
                    raise SystemExit(
                        f"{name} exited with {child.returncode}; see {self.logs / (name + '.log')}"
                    )
            periods = sorted({datetime.now(HKT).strftime("%Y-%m")})
            try:
                invoices: list[dict[str, Any]] = []
                for period in periods:
                    response = httpx.get(
                        f"{api}/v1/invoices", params={"period": period}, headers=headers, timeout=5
                    )
                    if response.status_code == 200:
                        body = response.json()
                        invoices.extend(
                            body if isinstance(body, list) else body.get("invoices", [])
                        )
                gross = sum(Decimal(i["gross_hkd"]) for i in invoices)
                subsidy = sum(Decimal(i["subsidy_hkd"]) for i in invoices)
                say(
                    f"[{time.strftime('%H:%M:%S')}] {len(invoices)} draft invoices for {','.join(periods)}: "
                    f"gross HK${gross:,.2f}, subsidy HK${subsidy:,.2f}, net HK${gross - subsidy:,.2f}"
                )
            except httpx.HTTPError as exc:
                say(f"billing API not answering: {exc}")
            while seen_alerts < len(self.inbox.received):
                payload = self.inbox.received[seen_alerts]
                seen_alerts += 1
                for alert in payload.get("alerts", []):
                    say(
                        f"    ALERT {alert.get('status', '?').upper()}: {alert.get('labels', {}).get('alertname')} "
                        f"{alert.get('annotations', {}).get('summary', '')}"
                    )
            time.sleep(5)

    def stop(self) -> None:
        for name in ("agent", "alerts", "billing", "metering"):
            child = self.children.get(name)
            if child is not None:
                try:
                    os.killpg(child.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for child in self.children.values():
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait(5)
        if self.postgres:
            self.postgres.stop()
        if self.broker:
            self.broker.stop()
        say("stopped: no process left behind")


def say(text: str) -> None:
    print(text, flush=True)


def load_tokens(path: Path) -> tuple[str, str]:
    if path.exists():
        tokens = json.loads(path.read_text())
    else:
        tokens = {"admin": secrets.token_urlsafe(18), "billing": secrets.token_urlsafe(18)}
        path.write_text(json.dumps(tokens))
        path.chmod(0o600)
    return tokens["admin"], tokens["billing"]


async def create_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def run(options: StackOptions) -> int:
    stack = Stack(options)
    interrupted = False

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start()
        stack.watch()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        stack.stop()
    del interrupted
    return 0


def now_utc() -> datetime:
    return datetime.now(UTC)
