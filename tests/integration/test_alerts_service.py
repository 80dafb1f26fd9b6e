"""The alerts service as a real process against the real broker and PostgreSQL.

Receivers are real HTTP servers on 127.0.0.1 started by the tests; cluster minutes carry event-time
stamps, so a 5-minute `for` passes in seconds.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from gpumeter.localstack import EmbeddedPostgres, free_port
from gpumeter.stack import create_database
from schemas.metering import ClusterMinute, NodeSignal
from tests.fixtures.alerts import ONCALL, PROJECT_TOKEN
from tests.fixtures.alerts import alerts_env as shared_env
from tests.fixtures.kafka import produce_json, read_topic
from tests.fixtures.processes import REPO_ROOT, ServiceProcess, wait_until

T0 = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
DEFAULT_RULES = REPO_ROOT / "deploy" / "alert-rules.yaml"


class Receiver:
    """An HTTP server on 127.0.0.1 that records every JSON body POSTed to it, in arrival order."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.requests: list[dict[str, Any]] = []
        self.server: ThreadingHTTPServer | None = None
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": json.loads(body)}
                    )
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r["body"] for r in self.requests]

    def statuses(self) -> list[str]:
        return [body["status"] for body in self.bodies]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


@pytest.fixture
def alerts_env(
    bootstrap_servers: str, database_url: str, topic_prefix: str, http_port: int
) -> dict[str, str]:
    return shared_env(
        bootstrap_servers,
        database_url,
        topic_prefix,
        http_port,
        ALERT_NOTIFY_BACKOFF_INITIAL_S="0.1",
        ALERT_NOTIFY_BACKOFF_MAX_S="0.5",
        ALERT_OUTBOX_POLL_INTERVAL_S="0.2",
        ALERT_ABSENCE_CHECK_INTERVAL_S="0.2",
    )


def service(env: dict[str, str], tmp_path: Path, http_port: int) -> ServiceProcess:
    return ServiceProcess("services.alerts", env, tmp_path / "alerts.log", http_port=http_port)


def minute(index: int, ratio: str, revision: int = 1) -> tuple[str, dict]:
    start = T0 + index * MINUTE
    value = ClusterMinute(
        minute_start=start,
        nodes_reporting=10,
        gpus_online=80,
        gpus_allocated=int(Decimal(ratio) * 80),
        online_gpu_seconds=Decimal(4800),
        allocated_gpu_seconds=Decimal(ratio) * 4800,
        allocation_ratio=Decimal(ratio),
        mean_util_pct=Decimal("55.5"),
        mean_power_w=Decimal("410"),
        xid_errors=0,
        revision=revision,
    )
    return start.isoformat(), value.model_dump(mode="json")


def produce_minutes(bootstrap: str, prefix: str, first: int, ratios: list[str]) -> None:
    messages = [minute(first + offset, ratio) for offset, ratio in enumerate(ratios)]
    produce_json(bootstrap, f"{prefix}metering.cluster.minutely.v1", messages)


def outbox(database_url: str, receiver: str = "webhook") -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch(
                "SELECT seq, status, attempts, delivered_at FROM alert_outbox WHERE receiver = $1"
                " ORDER BY seq",
                receiver,
            )
            return [dict(r) for r in rows]
        finally:
            await conn.close()

    return asyncio.run(run())


def all_delivered(database_url: str, receiver: str, count: int) -> bool:
    rows = outbox(database_url, receiver)
    return len(rows) == count and all(r["delivered_at"] is not None for r in rows)


def test_allocation_above_90_percent_for_five_minutes_fires_and_resolves_below_85(
    alerts_env: dict[str, str],
    receiver: Receiver,
    tmp_path: Path,
    http_port: int,
    database_url: str,
    bootstrap_servers: str,
    topic_prefix: str,
):
    # given the shipped rules with the webhook pointed at a local receiver
    alerts = service({**alerts_env, "ALERT_WEBHOOK_URL": receiver.url}, tmp_path, http_port).start()
    try:
        # when allocation is >= 0.90 for five event-time minutes, with oscillation above 0.85
        produce_minutes(
            bootstrap_servers, topic_prefix, 0, ["0.80", "0.92", "0.93", "0.95", "0.91"]
        )
        produce_minutes(
            bootstrap_servers, topic_prefix, 5, ["0.92", "0.86", "0.92", "0.86", "0.88"]
        )
        # then exactly one firing notification, shaped like Alertmanager's webhook v4
        wait_until(lambda: receiver.bodies, 30, what="firing notification")
        body = receiver.bodies[0]
        assert receiver.requests[0]["path"] == "/hook"
        assert body["version"] == "4"
        assert body["status"] == "firing"
        assert body["receiver"] == "webhook"
        assert body["groupLabels"] == {"alertname": "CentreAllocationHigh"}
        [alert] = body["alerts"]
        assert alert["labels"] == {
            "alertname": "CentreAllocationHigh",
            "severity": "warning",
            "team": "platform",
        }
        assert alert["startsAt"] == "2026-11-28T02:06:00Z"
        assert alert["endsAt"] == "0001-01-01T00:00:00Z"
        assert "at 0.92 " in alert["annotations"]["summary"]
        assert len(alert["fingerprint"]) == 16

        # when it drops below 0.85
        produce_minutes(bootstrap_servers, topic_prefix, 10, ["0.84", "0.70", "0.70"])
        # then one resolved notification, and nothing else
        wait_until(lambda: len(receiver.bodies) >= 2, 30, what="resolved notification")
        assert receiver.statuses() == ["firing", "resolved"]
        resolved = receiver.bodies[1]["alerts"][0]
        assert resolved["endsAt"] == "2026-11-28T02:10:00Z"
        assert resolved["fingerprint"] == alert["fingerprint"]
        assert wait_until(lambda: all_delivered(database_url, "kafka", 2), 20, what="alerts.v1")

        # and the state changes are on alerts.v1, keyed by fingerprint
        messages = read_topic(
            bootstrap_servers, f"{topic_prefix}alerts.v1", lambda m: len(m) >= 2, 20
        )
        events = [json.loads(m.value) for m in messages]
        assert [e["status"] for e in events] == ["firing", "resolved"]
        assert {m.key.decode() for m in messages} == {alert["fingerprint"]}

        # and the API lists the resolved alert to on-call; /metrics counts the deliveries
        url = f"http://127.0.0.1:{http_port}/v1/alerts"
        api = httpx.get(url, headers=ONCALL, timeout=5).json()
        assert [(a["rule"], a["status"]) for a in api["alerts"]] == [
            ("CentreAllocationHigh", "resolved")
        ]
        # but to no one without a known token, and not to a project token (the centre's alert
        # carries no project of its own)
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic eA=="}):
            refused = httpx.get(url, headers=headers, timeout=5)
            assert refused.status_code == 401, headers
            assert refused.json()["error"] == "unauthorized"
            assert refused.headers["WWW-Authenticate"] == "Bearer"
        mine = httpx.get(url, headers={"Authorization": f"Bearer {PROJECT_TOKEN}"}, timeout=5)
        assert mine.status_code == 200 and mine.json()["alerts"] == []
        bad = httpx.get(f"{url}?status=nope", headers=ONCALL, timeout=5)
        assert bad.status_code == 400 and bad.json()["error"] == "invalid_request"
        metrics = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=5).text
        assert 'alerts_notifications_sent_total{receiver="webhook"} 2.0' in metrics
        assert (
            'alerts_state_changes_total{rule="CentreAllocationHigh",status="firing"} 1.0' in metrics
        )

        # and SIGTERM stops it cleanly
        alerts.stop()
        assert alerts.process is not None and alerts.process.returncode == 0
    finally:
        alerts.stop()


def test_a_receiver_that_is_down_gets_every_change_once_in_order_and_blocks_no_other_receiver(
    alerts_env: dict[str, str],
    receiver: Receiver,
    tmp_path: Path,
    http_port: int,
    database_url: str,
    bootstrap_servers: str,
    topic_prefix: str,
):
    # given two webhooks, one of them down (nothing listens on its port)
    down = Receiver()
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        DEFAULT_RULES.read_text()
        .replace(
            "  - name: alertmanager\n",
            "  - name: down\n    type: webhook\n    url_env: DOWN_URL\n  - name: alertmanager\n",
        )
        .replace("receivers: [webhook, alertmanager]", "receivers: [webhook, down]")
    )
    env = {
        **alerts_env,
        "ALERT_RULES_FILE": str(rules),
        "ALERT_WEBHOOK_URL": receiver.url,
        "DOWN_URL": down.url,
    }
    alerts = service(env, tmp_path, http_port).start()
    try:
        # when the alert fires, resolves, fires and resolves again
        produce_minutes(
            bootstrap_servers,
            topic_prefix,
            0,
            ["0.95"] * 5 + ["0.50"] + ["0.95"] * 5 + ["0.50", "0.50", "0.50"],
        )
        # then the receiver that is up has all four at once, while the other one keeps failing
        wait_until(lambda: len(receiver.bodies) >= 4, 30, what="four notifications")
        wait_until(lambda: outbox(database_url, "down")[0]["attempts"] >= 3, 20, what="retries")
        assert receiver.statuses() == ["firing", "resolved", "firing", "resolved"]
        assert all(r["delivered_at"] is None for r in outbox(database_url, "down"))

        # when the receiver comes up
        down.start()
        try:
            # then it gets every change once, in order
            wait_until(lambda: all_delivered(database_url, "down", 4), 20, what="down delivered")
            assert down.statuses() == ["firing", "resolved", "firing", "resolved"]
            assert [b["alerts"][0]["startsAt"] for b in down.bodies] == [
                "2026-11-28T02:05:00Z",
                "2026-11-28T02:05:00Z",
                "2026-11-28T02:11:00Z",
                "2026-11-28T02:11:00Z",
            ]
            keys = [r["headers"]["Idempotency-Key"] for r in down.requests]
            assert len(set(keys)) == 4
            metrics = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=5).text
            assert 'alerts_notifications_failed_total{reason="retry",receiver="down"}' in metrics
        finally:
            down.stop()
    finally:
        alerts.stop()


def test_sigkill_and_restart_lose_no_notification_and_duplicate_none(
    alerts_env: dict[str, str],
    tmp_path: Path,
    http_port: int,
    database_url: str,
    bootstrap_servers: str,
    topic_prefix: str,
):
    receiver = Receiver().start()
    env = {**alerts_env, "ALERT_WEBHOOK_URL": receiver.url}
    alerts = service(env, tmp_path, http_port).start()
    try:
        # given a firing alert, delivered
        produce_minutes(bootstrap_servers, topic_prefix, 0, ["0.92"] * 7)
        wait_until(lambda: all_delivered(database_url, "webhook", 1), 30, what="firing delivered")

        # when the service is killed and the allocation drops while it is dead
        alerts.kill()
        produce_minutes(bootstrap_servers, topic_prefix, 7, ["0.80", "0.80", "0.80"])
        alerts.start()
        # then the restarted service resolves it exactly once
        wait_until(lambda: all_delivered(database_url, "webhook", 2), 30, what="resolved delivered")
        assert receiver.statuses() == ["firing", "resolved"]

        # when the receiver is down, the alert fires again, and the service is killed mid-run
        receiver.stop()
        produce_minutes(bootstrap_servers, topic_prefix, 10, ["0.95"] * 7)
        wait_until(lambda: len(outbox(database_url)) == 3, 30, what="third state change stored")
        produce_minutes(bootstrap_servers, topic_prefix, 17, ["0.50", "0.50", "0.50"])
        alerts.kill()
        # and restarts, and the receiver comes back on the same address
        alerts.start()
        receiver = Receiver(receiver.port).start()
        # then every change arrives once, in order
        wait_until(lambda: all_delivered(database_url, "webhook", 4), 30, what="all delivered")
        assert receiver.statuses() == ["firing", "resolved"]
        statuses = [r["status"] for r in outbox(database_url)]
        assert statuses == ["firing", "resolved", "firing", "resolved"]
        assert [b["alerts"][0]["startsAt"] for b in receiver.bodies] == ["2026-11-28T02:15:00Z"] * 2
    finally:
        alerts.stop()
        receiver.stop()


def test_a_node_that_stops_sending_fires_node_silent_and_resolves_when_it_returns(
    alerts_env: dict[str, str],
    receiver: Receiver,
    tmp_path: Path,
    http_port: int,
    bootstrap_servers: str,
    topic_prefix: str,
):
    # given a node-silent window of 2 s instead of 2 min
    rules = tmp_path / "rules.yaml"
    rules.write_text(DEFAULT_RULES.read_text().replace("threshold: 120", "threshold: 2"))
    env = {**alerts_env, "ALERT_RULES_FILE": str(rules), "ALERT_WEBHOOK_URL": receiver.url}
    alerts = service(env, tmp_path, http_port).start()
    topic = f"{topic_prefix}metering.node.signals.v1"

    def heartbeat() -> None:
        signal = NodeSignal(node="node-017", last_sample_time=datetime.now(UTC), gpus=8)
        produce_json(bootstrap_servers, topic, [("node-017", signal.model_dump(mode="json"))])

    try:
        # when the node reports once and then falls silent
        heartbeat()
        wait_until(lambda: receiver.bodies, 30, what="node-silent firing")
        [alert] = receiver.bodies[0]["alerts"]
        assert (alert["status"], alert["labels"]["alertname"], alert["labels"]["node"]) == (
            "firing",
            "NodeSilent",
            "node-017",
        )
        assert alert["labels"]["severity"] == "critical"
        # then, when it reports again, the alert resolves
        heartbeat()
        wait_until(lambda: len(receiver.bodies) >= 2, 30, what="node-silent resolved")
        assert receiver.statuses() == ["firing", "resolved"]
    finally:
        alerts.stop()


def test_alertmanager_slack_and_pagerduty_receivers_get_their_own_shapes_by_route(
    alerts_env: dict[str, str],
    receiver: Receiver,
    tmp_path: Path,
    http_port: int,
    bootstrap_servers: str,
    topic_prefix: str,
):
    # given every receiver of the shipped rules pointed at one local server, on separate paths
    base = f"http://127.0.0.1:{receiver.port}"
    env = {
        **alerts_env,
        "ALERTMANAGER_URL": f"{base}/am",
        "SLACK_WEBHOOK_URL": f"{base}/slack",
        "PAGERDUTY_EVENTS_URL": f"{base}/pd",
        "PAGERDUTY_ROUTING_KEY": "test-routing-key",
        "ALERTMANAGER_RESEND_INTERVAL_S": "0.5",
    }
    alerts = service(env, tmp_path, http_port).start()

    def posts(path: str) -> list[Any]:
        with receiver.lock:
            return [r["body"] for r in receiver.requests if r["path"] == path]

    try:
        # when allocation sits at 0.98: the critical rule fires after 2 min, the warning after 5
        produce_minutes(bootstrap_servers, topic_prefix, 0, ["0.98"] * 7)
        wait_until(lambda: len(posts("/slack")) >= 2, 30, what="slack messages")
        # then PagerDuty gets a trigger for the critical alert only, deduplicated by fingerprint
        [trigger] = posts("/pd")
        assert trigger["event_action"] == "trigger"
        assert trigger["routing_key"] == "test-routing-key"
        assert trigger["payload"]["severity"] == "critical"
        assert trigger["payload"]["class"] == "CentreAllocationCritical"
        # and Slack gets both, critical first (event time order)
        assert [m["text"].split(":")[0] for m in posts("/slack")] == [
            "[FIRING] CentreAllocationCritical",
            "[FIRING] CentreAllocationHigh",
        ]
        # and Alertmanager gets /api/v2/alerts lists, re-sent with endsAt in the future
        wait_until(
            lambda: any(len(body) == 2 for body in posts("/am/api/v2/alerts")), 20, what="re-send"
        )
        resend = next(body for body in posts("/am/api/v2/alerts") if len(body) == 2)
        now = datetime.now(UTC)
        for alert in resend:
            assert set(alert) == {"labels", "annotations", "startsAt", "endsAt", "generatorURL"}
            assert datetime.fromisoformat(alert["endsAt"]) > now

        # when allocation drops
        produce_minutes(bootstrap_servers, topic_prefix, 7, ["0.50"] * 3)
        # then PagerDuty gets a resolve with the same dedup key, and Alertmanager ended alerts
        wait_until(lambda: len(posts("/pd")) >= 2, 30, what="pagerduty resolve")
        resolve = posts("/pd")[1]
        assert resolve == {
            "routing_key": "test-routing-key",
            "event_action": "resolve",
            "dedup_key": trigger["dedup_key"],
        }
        wait_until(
            lambda: any(
                a["endsAt"] == "2026-11-28T02:07:00Z" for b in posts("/am/api/v2/alerts") for a in b
            ),
            20,
            what="alertmanager resolved",
        )
        # and Slack hears both resolve, in rule order within the minute
        wait_until(lambda: len(posts("/slack")) >= 4, 20, what="slack resolved")
        assert [m["text"].split(":")[0] for m in posts("/slack")][2:] == [
            "[RESOLVED] CentreAllocationHigh",
            "[RESOLVED] CentreAllocationCritical",
        ]
    finally:
        alerts.stop()


def minute_so_far(index: int, ratio: str, seconds: int, gpus: int = 80) -> tuple[str, dict]:
    """Metering's cumulative record of minute `index` after `seconds`, `gpus` GPUs reporting."""
    start = T0 + index * MINUTE
    online = Decimal(gpus * seconds)
    value = ClusterMinute(
        minute_start=start,
        nodes_reporting=gpus // 8,
        gpus_online=gpus,
        gpus_allocated=int(Decimal(ratio) * gpus),
        online_gpu_seconds=online,
        allocated_gpu_seconds=Decimal(ratio) * online,
        allocation_ratio=Decimal(ratio),
        mean_util_pct=Decimal("55.5"),
        mean_power_w=Decimal("410"),
        xid_errors=0,
        revision=gpus * seconds,
    )
    return start.isoformat(), value.model_dump(mode="json")


def watermark(database_url: str) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        conn = await asyncpg.connect(database_url)
        try:
            row = await conn.fetchrow("SELECT * FROM alert_watermark WHERE id = 1")
            held = await conn.fetch("SELECT minute_start, revision FROM alert_cluster_minutes")
            return {**(dict(row) if row else {}), "held": {r[0]: r[1] for r in held}}
        finally:
            await conn.close()

    return asyncio.run(run())


def test_the_minute_in_progress_fires_before_it_completes_once_it_covers_the_centre(
    alerts_env: dict[str, str],
    receiver: Receiver,
    tmp_path: Path,
    http_port: int,
    database_url: str,
    bootstrap_servers: str,
    topic_prefix: str,
):
    # given the shipped rules (>= 0.90 for 5 min) and three whole minutes at 0.92, the first complete
    env = {**alerts_env, "ALERT_WEBHOOK_URL": receiver.url}
    alerts = service(env, tmp_path, http_port).start()
    topic = f"{topic_prefix}metering.cluster.minutely.v1"
    try:
        produce_minutes(bootstrap_servers, topic_prefix, 0, ["0.92"] * 3)
        wait_until(
            lambda: watermark(database_url).get("last_evaluated_gpus_online") == 80,
            30,
            what="first complete minute stored",
        )
        # when the service is killed and restarted (the yardstick comes back from the database)
        alerts.kill()
        alerts.start()
        produce_minutes(bootstrap_servers, topic_prefix, 3, ["0.92"])
        # and the fifth minute has barely started: one node of ten, at 0.10 (would reset `for`)
        produce_json(bootstrap_servers, topic, [minute_so_far(4, "0.10", 10, gpus=8)])
        minute_4 = T0 + 4 * MINUTE
        wait_until(
            lambda: watermark(database_url)["held"].get(minute_4) == 80, 30, what="minute 4 held"
        )
        assert receiver.bodies == []
        # and then covers every GPU, first for 30 s, then for its whole 60 s
        produce_json(bootstrap_servers, topic, [minute_so_far(4, "0.92", 30)])
        wait_until(
            lambda: watermark(database_url)["held"].get(minute_4) == 2400, 30, what="30 s seen"
        )
        assert receiver.bodies == []  # 4 min 30 s of breaching data: still pending
        produce_json(bootstrap_servers, topic, [minute_so_far(4, "0.92", 60)])
        # then it fires while minute 4 is still in progress (no later minute was ever produced),
        # with the startsAt whole-minute evaluation gives
        wait_until(lambda: receiver.bodies, 30, what="firing notification")
        [alert] = receiver.bodies[0]["alerts"]
        assert (alert["status"], alert["startsAt"]) == ("firing", "2026-11-28T02:05:00Z")
        assert watermark(database_url)["last_evaluated_minute"] < minute_4
        metrics = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=5).text
        assert "alerts_partial_cluster_minute_evaluations_total" in metrics
        assert len(receiver.bodies) == 1
    finally:
        alerts.stop()


def test_postgresql_down_and_back_loses_no_change_and_sends_none_twice(
    alerts_env: dict[str, str],
    receiver: Receiver,
    tmp_path: Path,
    http_port: int,
    bootstrap_servers: str,
    topic_prefix: str,
):
    # given the service on a PostgreSQL of its own, which the test stops and starts again
    postgres = EmbeddedPostgres(tmp_path / "pgdata").start()
    try:
        asyncio.run(create_database(postgres.dsn(), "alerts"))
        env = {
            **alerts_env,
            "DATABASE_URL": postgres.dsn("alerts"),
            "ALERT_WEBHOOK_URL": receiver.url,
        }
        alerts = service(env, tmp_path, http_port).start()
        try:
            produce_minutes(bootstrap_servers, topic_prefix, 0, ["0.92"] * 7)
            wait_until(lambda: receiver.statuses() == ["firing"], 30, what="firing notification")
            # when PostgreSQL stops, and the allocation drops while it is down
            postgres.stop()
            produce_minutes(bootstrap_servers, topic_prefix, 7, ["0.70", "0.70", "0.70"])

            def retrying() -> bool:
                metrics = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=5).text
                return "alerts_database_write_errors_total 0.0" not in metrics

            wait_until(retrying, 30, what="a failed database write, retried")
            health = httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=5).json()
            assert health["database"] == "unavailable, retrying"
            assert alerts.process is not None and alerts.process.poll() is None
            # then, once it is back, the change is notified, once
            postgres.start()
            wait_until(lambda: receiver.statuses() == ["firing", "resolved"], 60, what="resolved")
            health = httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=5).json()
            assert health["database"] == "ok"
            produce_minutes(bootstrap_servers, topic_prefix, 10, ["0.70", "0.70"])
            wait_until(lambda: alerts.healthy(), 10, what="healthy after more input")
            assert receiver.statuses() == ["firing", "resolved"]
            alerts.stop()
            assert alerts.process.returncode == 0
        finally:
            alerts.stop()
    finally:
        postgres.stop()
