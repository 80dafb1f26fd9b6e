"""Dead letters by reason, and nodes forgotten after the retention, with the real alerts service,
the real broker and a real PostgreSQL.

Dead letters are produced by these tests on gpu.usage.dlq.v1 and billing.dlq.v1 in the format
metering and billing write (schemas.codec.dead_letter); the count window, the node retention and
the cleanup interval are shortened through the environment.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from schemas.codec import dead_letter
from schemas.metering import NodeSignal
from tests.fixtures.alerts import ONCALL
from tests.fixtures.alerts import alerts_env as shared_env
from tests.fixtures.kafka import produce, read_topic
from tests.fixtures.processes import wait_until
from tests.integration.test_alerts_service import DEFAULT_RULES, service

RULES = ("MeteringInternalErrors", "BillingDeadLetters")


@pytest.fixture
def alerts_env(
    bootstrap_servers: str, database_url: str, topic_prefix: str, http_port: int
) -> dict[str, str]:
    return shared_env(
        bootstrap_servers,
        database_url,
        topic_prefix,
        http_port,
        ALERT_OUTBOX_POLL_INTERVAL_S="0.2",
        ALERT_ABSENCE_CHECK_INTERVAL_S="0.2",
        ALERT_PIPELINE_CHECK_INTERVAL_S="0.2",
    )


def letter(reason: str, detail: str, topic: str) -> tuple[bytes, bytes]:
    value = dead_letter(reason, detail=detail, raw=b'{"x": 1}', topic=topic, partition=0, offset=7)
    return b"node-1", value.model_dump_json().encode()


def api_alerts(http_port: int, status: str = "all") -> dict[str, dict[str, Any]]:
    response = httpx.get(
        f"http://127.0.0.1:{http_port}/v1/alerts?status={status}", headers=ONCALL, timeout=5
    )
    return {a["rule"]: a for a in response.json()["alerts"] if a["rule"] in RULES}


def published(bootstrap: str, topic: str, until: Any) -> list[dict[str, Any]]:
    """The alerts.v1 events of the dead-letter rules, in order, once `until(events)` holds."""

    def ours(messages: list[Any]) -> list[dict[str, Any]]:
        events = [json.loads(m.value) for m in messages]
        return [e for e in events if e["rule"] in RULES]

    return ours(read_topic(bootstrap, topic, lambda messages: until(ours(messages)), 60))


def statuses(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["rule"], e["status"]) for e in events]


def test_an_internal_error_and_a_billing_dead_letter_fire_and_resolve_after_the_window(
    alerts_env: dict[str, str],
    tmp_path: Path,
    http_port: int,
    bootstrap_servers: str,
    topic_prefix: str,
):
    # given a count window of 4 s
    env = {**alerts_env, "ALERT_DEAD_LETTER_COUNT_WINDOW_S": "4"}
    alerts = service(env, tmp_path, http_port).start()
    usage_dlq = f"{topic_prefix}gpu.usage.dlq.v1"
    billing_dlq = f"{topic_prefix}billing.dlq.v1"
    try:
        # when metering dead-letters one sample as internal_error (and one as not_json), and
        # billing one hourly record it could not store
        produce(
            bootstrap_servers,
            usage_dlq,
            [
                letter("not_json", "Expecting value", f"{topic_prefix}gpu.usage.v1"),
                letter("internal_error", "KeyError: 'gpu'", f"{topic_prefix}gpu.usage.v1"),
            ],
        )
        produce(
            bootstrap_servers,
            billing_dlq,
            [letter("refused_by_database", "numeric overflow", "metering.usage.hourly.v1")],
        )
        # then both alerts fire: in GET /v1/alerts ...
        firing = wait_until(
            lambda: len(api_alerts(http_port, "firing")) == 2 and api_alerts(http_port, "firing"),
            30,
            what="both dead-letter alerts firing in the API",
        )
        internal, billing = firing["MeteringInternalErrors"], firing["BillingDeadLetters"]
        assert internal["labels"]["severity"] == "warning"
        assert float(internal["last_value"]) == 1  # the not_json letter is not an internal error
        assert "KeyError: 'gpu'" in internal["annotations"]["summary"]
        assert billing["labels"]["severity"] == "critical"
        assert "(refused_by_database: 1)" in billing["annotations"]["summary"]
        assert "in no invoice" in billing["annotations"]["summary"]
        # ... and on alerts.v1
        alerts_topic = f"{topic_prefix}alerts.v1"
        events = published(bootstrap_servers, alerts_topic, lambda events: len(events) >= 2)
        assert sorted(statuses(events)) == [
            ("BillingDeadLetters", "firing"),
            ("MeteringInternalErrors", "firing"),
        ]

        # when no more letters come for the window, both resolve, once each
        events = published(bootstrap_servers, alerts_topic, lambda events: len(events) >= 4)
        assert sorted(statuses(events[2:])) == [
            ("BillingDeadLetters", "resolved"),
            ("MeteringInternalErrors", "resolved"),
        ]
        resolved = api_alerts(http_port, "resolved")
        assert set(resolved) == set(RULES)
        metrics = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=5).text
        assert re.search(
            r'alerts_dead_letters_read_total\{outcome="counted",reason="internal_error",'
            r'source="metering"\} 1\.0',
            metrics,
        ), metrics
    finally:
        alerts.stop()


def test_a_restart_neither_forgets_letters_in_the_window_nor_fires_again_for_older_ones(
    alerts_env: dict[str, str],
    tmp_path: Path,
    http_port: int,
    bootstrap_servers: str,
    database_url: str,
    topic_prefix: str,
):
    # given a billing dead letter appended before the service starts, within a 30 s window: long
    # enough that a start, a stop and a second start fit in it on a loaded 2-core machine (with
    # 12 s the window sometimes passed during the restart, in a full `make test`, and the alert
    # rightly resolved before the test looked for it still firing)
    billing_dlq = f"{topic_prefix}billing.dlq.v1"
    produce(bootstrap_servers, billing_dlq, [letter("not_json", "Expecting value", "x")])
    env = {**alerts_env, "ALERT_DEAD_LETTER_COUNT_WINDOW_S": "30"}
    alerts = service(env, tmp_path, http_port).start()
    alerts_topic = f"{topic_prefix}alerts.v1"
    try:
        # then the service reads it at start-up and fires
        events = published(bootstrap_servers, alerts_topic, lambda events: len(events) >= 1)
        assert statuses(events) == [("BillingDeadLetters", "firing")]
        # when it restarts within the window, it goes on firing without a second notification
        alerts.stop()
        alerts.start()
        wait_until(
            lambda: "BillingDeadLetters" in api_alerts(http_port, "firing"), 10, what="firing"
        )
        # and resolves once, when the window has passed
        events = published(bootstrap_servers, alerts_topic, lambda events: len(events) >= 2)
        assert statuses(events) == [
            ("BillingDeadLetters", "firing"),
            ("BillingDeadLetters", "resolved"),
        ]
        # when it restarts after the window, the old letter fires nothing
        alerts.kill()
        alerts.start()
        wait_until(
            lambda: (
                httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=5).json()["dead_letters"]
                == "caught up"
            ),
            10,
            what="dead letters read",
        )
        with pytest.raises(AssertionError):
            wait_until(lambda: len(kafka_outbox(database_url)) > 2, 3, what="no new notification")
        assert api_alerts(http_port, "firing") == {}
    finally:
        alerts.stop()


def kafka_outbox(database_url: str) -> list[str]:
    async def run() -> list[str]:
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch(
                "SELECT status FROM alert_outbox WHERE receiver = 'kafka' ORDER BY seq"
            )
            return [r["status"] for r in rows]
        finally:
            await conn.close()

    return asyncio.run(run())


def row_counts(database_url: str) -> dict[str, int]:
    async def run() -> dict[str, int]:
        conn = await asyncpg.connect(database_url)
        try:
            return {
                table: await conn.fetchval(f"SELECT count(*) FROM {table}")
                for table in ("alert_nodes", "alert_states", "alert_outbox")
            }
        finally:
            await conn.close()

    return asyncio.run(run())


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# 10,000 for the figures in the report; fewer by default, notifications being sent one by one.
FLOOD_NODES = int(os.environ.get("GPUMETER_ALERTS_FLOOD_NODES", "2000"))


def test_a_flood_of_fake_nodes_resolves_their_node_silent_and_leaves_no_row_after_the_retention(
    alerts_env: dict[str, str],
    tmp_path: Path,
    http_port: int,
    bootstrap_servers: str,
    database_url: str,
    topic_prefix: str,
):
    # given NodeSilent at 2 s of silence, a 20 s retention and a cleanup every second
    rules = tmp_path / "rules.yaml"
    rules.write_text(DEFAULT_RULES.read_text().replace("threshold: 120", "threshold: 2"))
    env = {
        **alerts_env,
        "ALERT_RULES_FILE": str(rules),
        "ALERT_NODE_RETENTION_S": "20",
        "ALERT_CLEANUP_INTERVAL_S": "1",
        "ALERT_CLEANUP_BATCH": "1000",
    }
    alerts = service(env, tmp_path, http_port).start()
    assert alerts.process is not None
    pid = alerts.process.pid
    rss_before = rss_mib(pid)
    try:
        # when fake nodes send three signals each and fall silent
        topic = f"{topic_prefix}metering.node.signals.v1"
        now = datetime.now(UTC)
        messages = [
            (
                f"fake-{i:05}".encode(),
                NodeSignal(node=f"fake-{i:05}", last_sample_time=now, gpus=8).model_dump_json(),
            )
            for i in range(FLOOD_NODES)
        ]
        produce(bootstrap_servers, topic, [(k, v.encode()) for k, v in messages] * 3)
        # then every one fires NodeSilent
        peak = wait_until(
            lambda: (c := row_counts(database_url))["alert_states"] == FLOOD_NODES and c,
            120,
            what="NodeSilent firing for every fake node",
        )
        rss_peak = rss_mib(pid)
        assert peak["alert_nodes"] == FLOOD_NODES
        # and once the retention has passed, every one resolved and nothing is left of them
        wait_until(
            lambda: (
                row_counts(database_url) == {"alert_nodes": 0, "alert_states": 0, "alert_outbox": 0}
            ),
            240,
            what="nodes, alerts and notifications forgotten",
        )
        rss_after = rss_mib(pid)
        outbox_deleted = 2 * FLOOD_NODES  # a firing and a resolved one per node (kafka receiver)
        metrics = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=5).text
        assert f'alerts_rows_removed_total{{table="alert_nodes"}} {FLOOD_NODES}.0' in metrics
        assert f'alerts_rows_removed_total{{table="alert_states"}} {FLOOD_NODES}.0' in metrics
        assert f'alerts_rows_removed_total{{table="alert_outbox"}} {outbox_deleted}.0' in metrics
        resolved = (
            f'alerts_state_changes_total{{rule="NodeSilent",status="resolved"}} {FLOOD_NODES}.0'
        )
        assert resolved in metrics
        assert "alerts_nodes_known 0.0" in metrics
        print(
            f"{FLOOD_NODES} fake nodes: rows at peak {peak}; RSS MiB before {rss_before:.1f},"
            f" peak {rss_peak:.1f}, after expiry {rss_after:.1f}"
        )
    finally:
        alerts.stop()
