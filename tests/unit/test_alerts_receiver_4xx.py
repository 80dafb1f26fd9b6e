"""A receiver that refuses a notification for good (a 4xx): not retried, but counted, logged and
alerted on (pipeline.notifications_rejected)."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import cast

import httpx
import pytest

from schemas.alert import AlertEvent
from services.alerts import config, domain
from services.alerts.config import ReceiverConfig
from services.alerts.domain import Evaluator, RejectedCount, Rule
from services.alerts.metrics import AlertsMetrics
from services.alerts.notifier import DeliveryError, HttpSender, Notifier
from services.alerts.store import OutboxRow, Store

T0 = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)
DEFAULT_RULES = Path(__file__).resolve().parents[2] / "deploy" / "alert-rules.yaml"
EVENT = AlertEvent(
    fingerprint="0123456789abcdef",
    rule="CentreAllocationHigh",
    status="firing",
    labels={"alertname": "CentreAllocationHigh", "severity": "warning"},
    annotations={"summary": "high"},
    starts_at=T0,
)


def answer(status: int) -> DeliveryError | None:
    """POST through an HttpSender to a transport answering `status`; the error it raises."""

    async def run() -> DeliveryError | None:
        transport = httpx.MockTransport(lambda request: httpx.Response(status, text="nope"))
        async with httpx.AsyncClient(transport=transport) as client:
            receiver = ReceiverConfig(name="webhook", type="webhook", url="http://hook/x")
            try:
                await HttpSender(receiver, client, "http://alerts").post("http://hook/x", {})
            except DeliveryError as exc:
                return exc
        return None

    return asyncio.run(run())


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 413, 422])
def test_a_4xx_is_a_rejection_for_good_with_its_status(status: int):
    error = answer(status)
    assert error is not None
    assert (error.retriable, error.http_status) == (False, status)
    assert str(error) == f"HTTP {status}: nope"


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503])
def test_timeouts_too_early_too_many_and_5xx_are_retried(status: int):
    error = answer(status)
    assert error is not None
    assert (error.retriable, error.http_status) == (True, status)


def test_a_2xx_is_delivered():
    assert answer(204) is None


def test_a_rejection_is_counted_per_receiver_and_status_and_logged_at_error(
    caplog: pytest.LogCaptureFixture,
):
    metrics = AlertsMetrics()
    notifier = Notifier(
        cast(Store, None),  # not touched by `rejected`
        {},
        metrics,
        backoff_initial_s=1,
        backoff_max_s=1,
        poll_interval_s=1,
    )
    row = OutboxRow(7, "slack", EVENT.fingerprint, "firing", EVENT, 0)
    with caplog.at_level(logging.ERROR, logger="services.alerts.notifier"):
        notifier.rejected(
            "slack", row, DeliveryError("HTTP 404: no_service", retriable=False, http_status=404)
        )
    sample = metrics.registry.get_sample_value
    labels = {"receiver": "slack", "status": "404"}
    assert sample("alerts_notifications_rejected_total", labels) == 1
    assert (
        sample("alerts_notifications_failed_total", {"receiver": "slack", "reason": "rejected"})
        == 1
    )
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    message = record.getMessage()
    for part in (
        "slack",
        "7",
        "CentreAllocationHigh",
        EVENT.fingerprint,
        "HTTP 404",
        "/v1/notifications/rejected",
    ):
        assert part in message


REJECTED = Rule(
    name="NotificationsRejected",
    signal=domain.NOTIFICATIONS_REJECTED,
    op=">",
    threshold=Decimal(0),
    labels={"severity": "warning"},
    annotations={"summary": "{receiver} refused {value} (HTTP {http_status})"},
)


def test_rejected_notifications_fire_one_alert_per_receiver_and_resolve_once_out_of_the_window():
    evaluator = Evaluator([REJECTED], started_at=T0)
    assert evaluator.rejection_rules == ["NotificationsRejected"]
    # given no rejection, then one by slack
    assert evaluator.on_rejections(T0, {}) == []
    fired = evaluator.on_rejections(T0 + timedelta(seconds=5), {"slack": RejectedCount(1, 404)})
    assert [(c.status, c.labels, c.annotations["summary"]) for c in fired] == [
        (
            "firing",
            {"alertname": "NotificationsRejected", "severity": "warning", "receiver": "slack"},
            "slack refused 1 (HTTP 404)",
        )
    ]
    # when more are rejected, by slack and the webhook: one more alert, for the webhook
    more = {"slack": RejectedCount(3, 404), "webhook": RejectedCount(1, 400)}
    changes = evaluator.on_rejections(T0 + timedelta(seconds=10), more)
    assert [(c.status, c.labels["receiver"]) for c in changes] == [("firing", "webhook")]
    # when slack's have left the window: slack's resolves, the webhook's goes on
    changes = evaluator.on_rejections(T0 + timedelta(hours=1), {"webhook": RejectedCount(1, 400)})
    assert [(c.status, c.labels["receiver"]) for c in changes] == [("resolved", "slack")]
    changes = evaluator.on_rejections(T0 + timedelta(hours=2), {})
    assert [(c.status, c.labels["receiver"]) for c in changes] == [("resolved", "webhook")]


def test_a_firing_rejection_alert_survives_a_restart_without_a_second_notification():
    evaluator = Evaluator([REJECTED], started_at=T0)
    evaluator.on_rejections(T0, {"slack": RejectedCount(1, 404)})
    states = list(evaluator.drain().states.values())
    restarted = Evaluator([REJECTED], started_at=T0 + timedelta(minutes=1), states=states)
    assert (
        restarted.on_rejections(T0 + timedelta(minutes=1), {"slack": RejectedCount(1, 404)}) == []
    )
    resolved = restarted.on_rejections(T0 + timedelta(hours=1), {})
    assert [c.status for c in resolved] == ["resolved"]


def test_the_default_rules_alert_on_rejected_notifications():
    rules = {r.name: r for r in config.load(DEFAULT_RULES, lambda name: None).rules}
    rule = rules["NotificationsRejected"]
    assert (rule.signal, rule.op, rule.threshold) == ("pipeline.notifications_rejected", ">", 0)
    assert rule.labels["severity"] == "warning"
    assert "{receiver}" in rule.annotations["summary"]
