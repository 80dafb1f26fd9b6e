"""What the alerts service must not forget across a restart, as a real process against the real
broker and PostgreSQL: notifications a receiver refused for good (a real HTTP server answering
400 and 404), and a series in the middle of its keep_firing_for.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpumeter.localstack import free_port
from schemas.metering import NodeSignal
from tests.fixtures.alerts import ONCALL
from tests.fixtures.alerts import alerts_env as shared_env
from tests.fixtures.kafka import produce_json, read_topic
from tests.fixtures.processes import wait_until
from tests.integration.test_alerts_service import Receiver, produce_minutes, service

T0 = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


class RefusingReceiver:
    """An HTTP server on 127.0.0.1 answering every POST with the status set for its path."""

    def __init__(self, statuses: dict[str, int]) -> None:
        self.port = free_port()
        self.statuses = statuses
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.requests.append((self.path, json.loads(body)))
                reply = b'{"error": "refused by the test"}'
                self.send_response(receiver.statuses.get(self.path, 404))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def count(self, path: str) -> int:
        with self.lock:
            return sum(1 for p, _ in self.requests if p == path)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


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
    )


@pytest.fixture
def refusing() -> Iterator[RefusingReceiver]:
    server = RefusingReceiver({"/hook": 400, "/slack": 404})
    yield server
    server.stop()


def metric(http_port: int, name: str, labels: dict[str, str]) -> float | None:
    text = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def rejected(http_port: int, **params: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"http://127.0.0.1:{http_port}/v1/notifications/rejected",
        params=params,
        headers=ONCALL,
        timeout=5,
    )
    response.raise_for_status()
    return list(response.json()["notifications"])


def firing(http_port: int) -> dict[tuple[str, str], dict[str, Any]]:
    alerts = httpx.get(
        f"http://127.0.0.1:{http_port}/v1/alerts?status=firing", headers=ONCALL, timeout=5
    ).json()
    return {(a["rule"], a["labels"].get("receiver", "")): a for a in alerts["alerts"]}


def outbox_attempts(database_url: str) -> list[tuple[str, int, int | None]]:
    async def run() -> list[tuple[str, int, int | None]]:
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch(
                "SELECT receiver, attempts, rejected_status FROM alert_outbox"
                " WHERE receiver <> 'kafka' ORDER BY seq"
            )
            return [(r["receiver"], r["attempts"], r["rejected_status"]) for r in rows]
        finally:
            await conn.close()

    return asyncio.run(run())


def test_a_receiver_answering_4xx_is_not_retried_and_its_rejections_stay_visible_after_a_restart(
    alerts_env: dict[str, str],
    refusing: RefusingReceiver,
    tmp_path: Path,
    http_port: int,
    database_url: str,
    bootstrap_servers: str,
    topic_prefix: str,
):
    # given the shipped rules, the webhook answering 400 and Slack answering 404
    env = {
        **alerts_env,
        "ALERT_WEBHOOK_URL": refusing.url("/hook"),
        "SLACK_WEBHOOK_URL": refusing.url("/slack"),
        "ALERT_PIPELINE_CHECK_INTERVAL_S": "0.2",
    }
    alerts = service(env, tmp_path, http_port).start()
    try:
        # when CentreAllocationHigh (a warning: webhook and Slack) fires
        produce_minutes(bootstrap_servers, topic_prefix, 0, ["0.92"] * 7)

        # then both rejections are listed by the API, with their status, newest first
        def centre_rejections() -> list[dict[str, Any]]:
            rows = [r for r in rejected(http_port) if r["rule"] == "CentreAllocationHigh"]
            return rows if len(rows) == 2 else []

        rows = wait_until(centre_rejections, 30, what="two rejections listed")
        assert {(r["receiver"], r["http_status"], r["status"]) for r in rows} == {
            ("webhook", 400, "firing"),
            ("slack", 404, "firing"),
        }
        assert all(r["attempts"] == 1 and r["rejected_at"] for r in rows)
        assert all(r["error"].startswith(f"HTTP {r['http_status']}: ") for r in rows)
        assert {r["labels"]["alertname"] for r in rows} == {"CentreAllocationHigh"}
        assert rejected(http_port, receiver="slack", within_s="3600")[0]["receiver"] == "slack"

        # and NotificationsRejected fires once per refusing receiver: in the API and on alerts.v1
        # (its own notifications, refused too, are not counted: it stays at 1 per receiver)
        def both_fire() -> dict[tuple[str, str], dict[str, Any]]:
            active = firing(http_port)
            keys = {("NotificationsRejected", "webhook"), ("NotificationsRejected", "slack")}
            return active if keys <= set(active) else {}

        active = wait_until(both_fire, 30, what="NotificationsRejected firing for both")
        summary = active[("NotificationsRejected", "slack")]["annotations"]["summary"]
        assert "refused 1 notifications" in summary and "HTTP 404" in summary
        messages = read_topic(
            bootstrap_servers,
            f"{topic_prefix}alerts.v1",
            lambda ms: sum(json.loads(m.value)["rule"] == "NotificationsRejected" for m in ms) >= 2,
            20,
        )
        assert {json.loads(m.value)["rule"] for m in messages} == {
            "CentreAllocationHigh",
            "NotificationsRejected",
        }

        # and each receiver refused 3 notifications (one CentreAllocationHigh, two
        # NotificationsRejected), each asked once: counted per receiver and status
        wait_until(
            lambda: refusing.count("/hook") == 3 and refusing.count("/slack") == 3,
            30,
            what="three notifications at each receiver",
        )
        wait_until(
            lambda: (
                len(outbox_attempts(database_url)) == 6
                and all(status for _, _, status in outbox_attempts(database_url))
            ),
            20,
            what="all six rejections recorded",
        )
        rejected_total = "alerts_notifications_rejected_total"
        assert metric(http_port, rejected_total, {"receiver": "webhook", "status": "400"}) == 3
        assert metric(http_port, rejected_total, {"receiver": "slack", "status": "404"}) == 3
        # and the gauge leaves NotificationsRejected's own out
        recent = "alerts_notifications_rejected_recent"
        wait_until(
            lambda: metric(http_port, recent, {"receiver": "webhook"}) == 1,
            10,
            what="recent rejections gauge",
        )

        # then none is retried: with 0.1-0.5 s backoff a retry would come within a second
        with pytest.raises(AssertionError):
            wait_until(lambda: len(refusing.requests) > 6, 3, what="no retry")
        assert [attempts for _, attempts, _ in outbox_attempts(database_url)] == [1] * 6

        # when the service restarts
        alerts.stop()
        alerts.start()
        # then the rejections are still listed, the alert still fires, and nothing is sent again
        assert len(rejected(http_port)) == 6
        wait_until(
            lambda: metric(http_port, recent, {"receiver": "slack"}) == 1,
            10,
            what="gauge read from the database after the restart",
        )
        assert {("NotificationsRejected", "webhook"), ("NotificationsRejected", "slack")} <= set(
            firing(http_port)
        )
        with pytest.raises(AssertionError):
            wait_until(lambda: len(refusing.requests) > 6, 3, what="nothing sent again")
    finally:
        alerts.stop()


def node_signal(at: datetime, idle: bool) -> tuple[str, dict[str, Any]]:
    gpus = {"GPU-a": "hkgai-llm"} if idle else {}
    value = NodeSignal(
        node="node-017",
        last_sample_time=at,
        gpus=8,
        idle_allocated_gpus=sorted(gpus),
        idle_projects=gpus,
    )
    return "node-017", value.model_dump(mode="json")


def test_a_sigkill_in_the_middle_of_keep_firing_for_resolves_when_it_would_have_without_one(
    alerts_env: dict[str, str],
    tmp_path: Path,
    http_port: int,
    bootstrap_servers: str,
    topic_prefix: str,
):
    # given the shipped rules (GpuAllocatedIdle: for 30m, keep_firing_for 15m) and a webhook
    receiver = Receiver().start()
    alerts = service({**alerts_env, "ALERT_WEBHOOK_URL": receiver.url}, tmp_path, http_port)
    alerts.start()
    topic = f"{topic_prefix}metering.node.signals.v1"

    def idle_alerts() -> list[dict[str, Any]]:
        return [
            body["alerts"][0]
            for body in receiver.bodies
            if body["alerts"][0]["labels"]["alertname"] == "GpuAllocatedIdle"
        ]

    try:
        # when a GPU is idle for 31 event-time minutes, then busy for a minute and back to idle
        idle = [node_signal(T0 + step * MINUTE, idle=True) for step in range(31)]
        flap = [node_signal(T0 + 31 * MINUTE, idle=False), node_signal(T0 + 32 * MINUTE, True)]
        produce_json(bootstrap_servers, topic, idle + flap)
        wait_until(idle_alerts, 30, what="GpuAllocatedIdle firing")
        # and then busy from minute 33, and the service is killed 7 minutes into it
        produce_json(bootstrap_servers, topic, [node_signal(T0 + 33 * MINUTE, idle=False)])

        def keeping() -> bool:
            alert = firing(http_port).get(("GpuAllocatedIdle", ""))
            return bool(alert) and alert["keep_firing_since"] == "2026-11-28T02:33:00Z"

        wait_until(keeping, 30, what="keep_firing_since stored")
        produce_json(bootstrap_servers, topic, [node_signal(T0 + 40 * MINUTE, idle=False)])
        alerts.kill()  # minute 40 seen or not: then replayed, from the committed offsets
        alerts.start()
        # and it stays busy past minute 48, 15 minutes after it became busy
        busy = [node_signal(T0 + step * MINUTE, idle=False) for step in (44, 47, 48, 49)]
        produce_json(bootstrap_servers, topic, busy)
        # then it fired once and resolved once, at 02:48, as without the restart
        wait_until(lambda: len(idle_alerts()) >= 2, 30, what="GpuAllocatedIdle resolved")
        alerts_seen = idle_alerts()
        assert [(a["status"], a["startsAt"]) for a in alerts_seen] == [
            ("firing", "2026-11-28T02:30:00Z"),
            ("resolved", "2026-11-28T02:30:00Z"),
        ]
        assert alerts_seen[1]["endsAt"] == "2026-11-28T02:48:00Z"
        assert alerts_seen[0]["labels"]["project"] == "hkgai-llm"
    finally:
        alerts.stop()
        receiver.stop()
