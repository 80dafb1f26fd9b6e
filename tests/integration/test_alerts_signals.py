"""The alerts service against a real Alertmanager, billing's signals, and pipeline health.

Billing signals and usage input are messages these tests produce themselves on the real broker;
processing-clock windows are shortened through the environment and a copy of the rules file.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiokafka import AIOKafkaProducer

from schemas.billing import SubsidyUsage, UnpricedUsage
from schemas.metering import ClusterMinute
from tests.fixtures.alertmanager import Alertmanager, running_alertmanager
from tests.fixtures.alerts import alerts_env as shared_env
from tests.fixtures.kafka import produce, produce_json
from tests.fixtures.processes import wait_until
from tests.integration.test_alerts_service import DEFAULT_RULES, Receiver, service

MINUTE = timedelta(minutes=1)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[Alertmanager]:
    with running_alertmanager(tmp_path / "alertmanager") as server:
        yield server


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
        ALERT_PIPELINE_CHECK_INTERVAL_S="0.2",
    )


def rules_with(tmp_path: Path, changes: dict[str, dict[str, Any]]) -> Path:
    """A copy of the shipped rules file with some fields of some rules changed."""
    document = yaml.safe_load(DEFAULT_RULES.read_text())
    for rule in document["rules"]:
        rule.update(changes.get(rule["name"], {}))
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def cluster_minute(start: datetime, ratio: str) -> tuple[str, dict[str, Any]]:
    value = ClusterMinute(
        minute_start=start,
        nodes_reporting=10,
        gpus_online=80,
        gpus_allocated=int(Decimal(ratio) * 80),
        online_gpu_seconds=Decimal(4800),
        allocated_gpu_seconds=Decimal(ratio) * 4800,
        allocation_ratio=Decimal(ratio),
        mean_util_pct=Decimal("55"),
        mean_power_w=Decimal("400"),
        xid_errors=0,
        revision=1,
    )
    return start.isoformat(), value.model_dump(mode="json")


def firing(receiver: Receiver) -> dict[str, str]:
    """alertname|series label -> latest status, from the webhook bodies in arrival order."""
    latest = {}
    for body in receiver.bodies:
        for alert in body["alerts"]:
            labels = alert["labels"]
            series = labels.get("project") or labels.get("gpu_model") or ""
            latest[f"{labels['alertname']}|{series}"] = alert["status"]
    return latest


def test_allocation_alert_becomes_active_in_a_real_alertmanager_and_resolves_there(
    alerts_env: dict[str, str],
    alertmanager: Alertmanager,
    tmp_path: Path,
    http_port: int,
    bootstrap_servers: str,
    topic_prefix: str,
):
    # given the shipped rules with the alertmanager receiver pointed at a real Alertmanager
    env = {
        **alerts_env,
        "ALERTMANAGER_URL": alertmanager.url,
        "ALERTMANAGER_RESEND_INTERVAL_S": "0.5",
        "ALERTMANAGER_RESOLVED_RESEND_S": "5",
    }
    alerts = service(env, tmp_path, http_port).start()
    topic = f"{topic_prefix}metering.cluster.minutely.v1"
    t0 = datetime.now(UTC).replace(second=0, microsecond=0) - 30 * MINUTE
    try:
        # when allocation is >= 0.90 for five minutes of event time
        ratios = ["0.80", "0.92", "0.93", "0.95", "0.91", "0.92", "0.88", "0.88"]
        produce_json(
            bootstrap_servers,
            topic,
            [cluster_minute(t0 + i * MINUTE, ratio) for i, ratio in enumerate(ratios)],
        )

        # then Alertmanager holds it as active, with our labels and start time
        def active() -> list[dict[str, Any]]:
            return [
                a
                for a in alertmanager.alerts()
                if a["labels"]["alertname"] == "CentreAllocationHigh"
            ]

        [alert] = wait_until(active, 30, what="active alert in Alertmanager")
        assert alert["labels"] == {
            "alertname": "CentreAllocationHigh",
            "severity": "warning",
            "team": "platform",
        }
        assert alert["status"]["state"] == "active"
        assert datetime.fromisoformat(alert["startsAt"]) == t0 + 6 * MINUTE
        # Each re-send renders the summary with the ratio of the latest evaluation (as Prometheus
        # does), so Alertmanager holds whichever minute of the firing stretch was re-sent last.
        shown = re.search(r"allocation at (0\.\d+) ", alert["annotations"]["summary"])
        assert shown is not None, alert["annotations"]
        assert shown.group(1) in ratios[5:], (shown.group(1), ratios[5:])
        assert datetime.fromisoformat(alert["endsAt"]) > datetime.now(UTC)
        # and the periodic re-send keeps it active (Alertmanager would expire it at endsAt)
        first_ends_at = alert["endsAt"]
        wait_until(lambda: active() and active()[0]["endsAt"] != first_ends_at, 10, what="renewal")

        # when allocation falls below 0.85
        produce_json(
            bootstrap_servers,
            topic,
            [cluster_minute(t0 + (8 + i) * MINUTE, "0.70") for i in range(3)],
        )
        # then Alertmanager resolves it: no longer among its active alerts
        wait_until(lambda: not active(), 30, what="alert resolved in Alertmanager")
        groups = httpx.get(f"{alertmanager.url}/api/v2/alerts/groups", timeout=5).json()
        assert all(
            a["labels"]["alertname"] != "CentreAllocationHigh" for g in groups for a in g["alerts"]
        )
    finally:
        alerts.stop()


def test_subsidy_cap_and_unpriced_usage_from_billing_signals_fire_and_resolve(
    alerts_env: dict[str, str],
    receiver: Receiver,
    tmp_path: Path,
    http_port: int,
    bootstrap_servers: str,
    topic_prefix: str,
):
    # given the shipped rules with the webhook pointed at a local receiver
    alerts = service({**alerts_env, "ALERT_WEBHOOK_URL": receiver.url}, tmp_path, http_port).start()
    topic = f"{topic_prefix}billing.signals.v1"
    now = datetime.now(UTC)

    def subsidy(project: str, ratio: str, minutes: int) -> tuple[str, dict[str, Any]]:
        used = Decimal(ratio) * 1000
        value = SubsidyUsage(
            project_id=project,
            scheme="hku-research",
            cap_hkd=Decimal(1000),
            used_hkd=used,
            used_ratio=Decimal(ratio),
            as_of=now + minutes * MINUTE,
        )
        return f"subsidy|{project}", value.model_dump(mode="json")

    def unpriced(hours: str, minutes: int) -> tuple[str, dict[str, Any]]:
        value = UnpricedUsage(
            gpu_model="NVIDIA B200",
            period="2026-11",
            gpu_hours=Decimal(hours),
            projects=["proj-a", "proj-b"],
            as_of=now + minutes * MINUTE,
        )
        return "unpriced|NVIDIA B200|2026-11", value.model_dump(mode="json")

    try:
        # when one project passes 80% and then 100% of its cap, another stays at 50%,
        # and a GPU model has usage but no rate card
        produce_json(
            bootstrap_servers,
            topic,
            [
                subsidy("proj-a", "0.50", 0),
                subsidy("proj-b", "0.50", 0),
                subsidy("proj-a", "0.85", 1),
                unpriced("12.5", 1),
                subsidy("proj-a", "1.02", 2),
            ],
        )
        # then warning and critical subsidy alerts fire for that project, and the unpriced one
        expected = {
            "SubsidyCapNearlyUsed|proj-a": "firing",
            "SubsidyCapUsedUp|proj-a": "firing",
            "UnpricedGpuModel|NVIDIA B200": "firing",
        }
        wait_until(lambda: firing(receiver) == expected, 30, what="three alerts firing")
        alerts_by_name = {
            a["labels"]["alertname"]: a for body in receiver.bodies for a in body["alerts"]
        }
        assert alerts_by_name["SubsidyCapUsedUp"]["labels"] == {
            "alertname": "SubsidyCapUsedUp",
            "severity": "critical",
            "team": "billing",
            "project": "proj-a",
        }
        assert (
            "used 85% of its hku-research subsidy"
            in (alerts_by_name["SubsidyCapNearlyUsed"]["annotations"]["summary"])
        )
        unpriced_alert = alerts_by_name["UnpricedGpuModel"]
        assert unpriced_alert["labels"]["period"] == "2026-11"
        assert unpriced_alert["annotations"]["summary"].startswith("12.5 GPU-hours on NVIDIA B200")
        assert "proj-a, proj-b" in unpriced_alert["annotations"]["summary"]

        # when the cap is raised and the model is priced (0 GPU-hours unpriced)
        produce_json(bootstrap_servers, topic, [subsidy("proj-a", "0.40", 3), unpriced("0", 3)])
        # then all three resolve, each once
        resolved = {name: "resolved" for name in expected}
        wait_until(lambda: firing(receiver) == resolved, 30, what="three alerts resolved")
        assert sorted(receiver.statuses()) == ["firing"] * 3 + ["resolved"] * 3
    finally:
        alerts.stop()


def test_dead_letters_above_the_rate_for_the_window_fire_and_resolve_when_they_stop(
    alerts_env: dict[str, str],
    receiver: Receiver,
    tmp_path: Path,
    http_port: int,
    bootstrap_servers: str,
    topic_prefix: str,
):
    # given 1-second rate windows, a 2-second `for`, and a dead-letter topic that exists
    dlq = f"{topic_prefix}gpu.usage.dlq.v1"
    produce(bootstrap_servers, dlq, [(b"node-1", b"{}")])
    rules = rules_with(tmp_path, {"DeadLetterRateHigh": {"for": "2s"}})
    env = {
        **alerts_env,
        "ALERT_RULES_FILE": str(rules),
        "ALERT_WEBHOOK_URL": receiver.url,
        "ALERT_DEAD_LETTER_WINDOW_S": "1",
    }
    alerts = service(env, tmp_path, http_port).start()
    try:
        # when about 20 letters a second (1,200 a minute) arrive for a few seconds
        with steady_messages(bootstrap_servers, dlq, per_second=20):
            wait_until(lambda: receiver.bodies, 20, what="dead-letter alert firing")
        [alert] = receiver.bodies[0]["alerts"]
        assert alert["labels"]["alertname"] == "DeadLetterRateHigh"
        assert alert["status"] == "firing"
        assert "a minute go to the dead-letter topic" in alert["annotations"]["summary"]
        # then, once they stop, it resolves
        wait_until(lambda: len(receiver.bodies) >= 2, 20, what="dead-letter alert resolved")
        assert receiver.statuses() == ["firing", "resolved"]
    finally:
        alerts.stop()


def test_metering_lag_fires_only_while_usage_arrives_and_resolves_when_metering_catches_up(
    alerts_env: dict[str, str],
    receiver: Receiver,
    tmp_path: Path,
    http_port: int,
    bootstrap_servers: str,
    topic_prefix: str,
):
    # given a lag threshold of 3 s for 1 s, input counted as flowing for 2 s after it grew
    usage = f"{topic_prefix}gpu.usage.v1"
    minutes = f"{topic_prefix}metering.cluster.minutely.v1"
    produce(bootstrap_servers, usage, [(b"node-1", b"{}")])
    rules = rules_with(
        tmp_path,
        {"MeteringLagging": {"threshold": 3, "clear_threshold": 1, "for": "1s"}},
    )
    env = {
        **alerts_env,
        "ALERT_RULES_FILE": str(rules),
        "ALERT_WEBHOOK_URL": receiver.url,
        "ALERT_INPUT_ACTIVE_S": "2",
    }
    alerts = service(env, tmp_path, http_port).start()
    try:
        # when the newest cluster minute is ten minutes old but no usage arrives (an idle centre)
        now = datetime.now(UTC).replace(second=0, microsecond=0)
        produce_json(bootstrap_servers, minutes, [cluster_minute(now - 10 * MINUTE, "0.5")])
        # then nothing fires
        with pytest.raises(AssertionError):
            wait_until(lambda: receiver.bodies, 3, what="no alert while idle")

        # when usage samples arrive and metering publishes nothing newer
        with steady_messages(bootstrap_servers, usage, per_second=5):
            # then the lag alert fires
            wait_until(lambda: receiver.bodies, 20, what="metering lag firing")
            [alert] = receiver.bodies[0]["alerts"]
            assert (alert["labels"]["alertname"], alert["status"]) == ("MeteringLagging", "firing")
            assert alert["labels"]["severity"] == "critical"
            # and when metering publishes the current minute, it resolves
            current = datetime.now(UTC).replace(second=0, microsecond=0)
            produce_json(bootstrap_servers, minutes, [cluster_minute(current, "0.5")])
            wait_until(lambda: len(receiver.bodies) >= 2, 20, what="metering lag resolved")
        assert receiver.statuses() == ["firing", "resolved"]
    finally:
        alerts.stop()


class steady_messages:  # noqa: N801 - used as a context manager, reads like one
    """Produce `per_second` small messages a second to a topic from a thread, until exit."""

    def __init__(self, bootstrap: str, topic: str, per_second: int) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.per_second = per_second
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5)
        await producer.start()
        try:
            while not self.stopping.is_set():
                for _ in range(max(1, self.per_second // 10)):
                    await producer.send(self.topic, key=b"node-1", value=b"{}")
                await producer.flush()
                await asyncio.sleep(0.1)
        finally:
            await producer.stop()

    def __enter__(self) -> steady_messages:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(10)
