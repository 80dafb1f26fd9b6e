"""Receiver body shapes: Alertmanager webhook v4, Alertmanager API v2, Slack, PagerDuty v2."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx

from schemas.alert import AlertEvent
from services.alerts import payloads
from services.alerts.config import ReceiverConfig
from services.alerts.notifier import HttpSender

STARTS = datetime(2026, 11, 28, 2, 5, tzinfo=UTC)
ENDS = datetime(2026, 11, 28, 2, 9, tzinfo=UTC)
EXTERNAL = "http://alerts.local:8082"

FIRING = AlertEvent(
    fingerprint="0123456789abcdef",
    rule="CentreAllocationHigh",
    status="firing",
    labels={"alertname": "CentreAllocationHigh", "severity": "warning", "team": "platform"},
    annotations={"summary": "Centre GPU allocation at 0.92", "runbook": "https://rb/x"},
    starts_at=STARTS,
    value=0.92,
)
RESOLVED = FIRING.model_copy(update={"status": "resolved", "ends_at": ENDS, "value": 0.8})


def test_webhook_body_is_alertmanager_webhook_version_4():
    body = payloads.webhook_body(FIRING, receiver="webhook", external_url=EXTERNAL)
    assert set(body) == {
        "version",
        "groupKey",
        "truncatedAlerts",
        "status",
        "receiver",
        "groupLabels",
        "commonLabels",
        "commonAnnotations",
        "externalURL",
        "alerts",
    }
    assert body["version"] == "4"
    assert body["status"] == "firing"
    assert body["receiver"] == "webhook"
    assert body["groupLabels"] == {"alertname": "CentreAllocationHigh"}
    assert body["groupKey"] == '{}:{alertname="CentreAllocationHigh"}'
    assert body["commonLabels"] == FIRING.labels
    assert body["commonAnnotations"] == FIRING.annotations
    assert body["externalURL"] == EXTERNAL
    assert body["truncatedAlerts"] == 0
    [alert] = body["alerts"]
    assert alert == {
        "status": "firing",
        "labels": FIRING.labels,
        "annotations": FIRING.annotations,
        "startsAt": "2026-11-28T02:05:00Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": f"{EXTERNAL}/v1/alerts?fingerprint=0123456789abcdef",
        "fingerprint": "0123456789abcdef",
    }


def test_resolved_webhook_body_carries_the_end_time():
    body = payloads.webhook_body(RESOLVED, receiver="webhook", external_url=EXTERNAL)
    assert body["status"] == "resolved"
    assert body["alerts"][0]["status"] == "resolved"
    assert body["alerts"][0]["endsAt"] == "2026-11-28T02:09:00Z"


def sender(kind: str, **extra: str) -> HttpSender:
    config = ReceiverConfig(name=kind, type=kind, url="http://receiver:9", **extra)  # type: ignore[arg-type]
    return HttpSender(config, httpx.AsyncClient(), EXTERNAL, alertmanager_ttl=timedelta(minutes=4))


def test_alertmanager_gets_a_list_of_alerts_on_api_v2_with_a_future_end_while_firing():
    now = datetime(2026, 11, 28, 3, 0, tzinfo=UTC)
    url, body = sender("alertmanager").request(FIRING, now)
    assert url == "http://receiver:9/api/v2/alerts"
    assert body == [
        {
            "labels": FIRING.labels,
            "annotations": FIRING.annotations,
            "startsAt": "2026-11-28T02:05:00Z",
            "endsAt": "2026-11-28T03:04:00Z",
            "generatorURL": f"{EXTERNAL}/v1/alerts?fingerprint=0123456789abcdef",
        }
    ]


def test_alertmanager_resolved_alert_ends_in_the_past():
    now = datetime(2026, 11, 28, 3, 0, tzinfo=UTC)
    _, body = sender("alertmanager").request(RESOLVED, now)
    assert body[0]["endsAt"] == "2026-11-28T02:09:00Z"
    _, early = sender("alertmanager").request(RESOLVED, ENDS - timedelta(minutes=1))
    assert early[0]["endsAt"] == "2026-11-28T02:08:00Z"  # never in the future: that would re-fire


def test_slack_body_has_text_and_blocks():
    body = payloads.slack_body(FIRING, external_url=EXTERNAL)
    assert body["text"] == "[FIRING] CentreAllocationHigh: Centre GPU allocation at 0.92"
    assert body["blocks"][0]["type"] == "section"
    assert body["blocks"][0]["text"]["type"] == "mrkdwn"
    assert "severity=warning" in body["blocks"][0]["text"]["text"]
    assert "<https://rb/x|Runbook>" in body["blocks"][1]["elements"][0]["text"]
    assert payloads.slack_body(RESOLVED, external_url=EXTERNAL)["text"].startswith("[RESOLVED]")


def test_slack_escapes_every_label_and_annotation_value_so_none_can_mention_or_link():
    # given an alert whose labels and annotations carry Slack control sequences
    hostile = FIRING.model_copy(
        update={
            "labels": {
                "alertname": "CentreAllocationHigh",
                "severity": "<!here>",
                "project": "<!channel> & <@U123|boss>",
                "gpu": "<https://evil.example|click>",
            },
            "annotations": {
                "summary": "AT&T <!everyone> > 5%",
                "runbook": "https://rb/x?a=1&b=<2>|evil",
            },
        }
    )
    # when it is put into a Slack message
    body = payloads.slack_body(hostile, external_url=EXTERNAL)
    section = body["blocks"][0]["text"]["text"]
    links = body["blocks"][1]["elements"][0]["text"]
    # then &, < and > of every value are entities, in the fallback text and in the blocks
    assert body["text"] == "[FIRING] CentreAllocationHigh: AT&amp;T &lt;!everyone&gt; &gt; 5%"
    assert "(&lt;!here&gt;)" in section
    assert "project=&lt;!channel&gt; &amp; &lt;@U123|boss&gt;" in section
    assert "gpu=&lt;https://evil.example|click&gt;" in section
    assert "severity=&lt;!here&gt;" in section
    assert "<https://rb/x?a=1&amp;b=&lt;2&gt;%7Cevil|Runbook>" in links
    # and no `<` is left but those of the two links this service makes
    everything = body["text"] + section + links
    assert everything.count("<") == 2 and everything.count(">") == 2
    assert "<!" not in everything and "<@" not in everything


def test_pagerduty_trigger_and_resolve_share_the_fingerprint_as_dedup_key():
    _, trigger = sender("pagerduty", routing_key="R0UT1NG").request(FIRING, STARTS)
    assert trigger["routing_key"] == "R0UT1NG"
    assert trigger["event_action"] == "trigger"
    assert trigger["dedup_key"] == FIRING.fingerprint
    assert trigger["payload"]["summary"] == "Centre GPU allocation at 0.92"
    assert trigger["payload"]["severity"] == "warning"
    assert trigger["payload"]["source"] == "gpumeter"
    assert trigger["payload"]["timestamp"] == "2026-11-28T02:05:00Z"
    assert trigger["payload"]["group"] == "platform"
    assert trigger["links"] == [{"href": "https://rb/x", "text": "Runbook"}]
    _, resolve = sender("pagerduty", routing_key="R0UT1NG").request(RESOLVED, ENDS)
    assert resolve == {
        "routing_key": "R0UT1NG",
        "event_action": "resolve",
        "dedup_key": FIRING.fingerprint,
    }


def test_pagerduty_severity_outside_its_set_becomes_error():
    event = FIRING.model_copy(
        update={"labels": {**FIRING.labels, "severity": "page", "node": "n7"}}
    )
    body = payloads.pagerduty_body(event, routing_key="k", external_url=EXTERNAL)
    assert body["payload"]["severity"] == "error"
    assert body["payload"]["source"] == "n7"
