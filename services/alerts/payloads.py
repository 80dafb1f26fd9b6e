"""Request bodies for each receiver type, built from an AlertEvent. Pure functions."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from schemas.alert import AlertEvent

ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's "not set" for endsAt
PAGERDUTY_SEVERITIES = {"critical", "error", "warning", "info"}


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def generator_url(external_url: str, event: AlertEvent) -> str:
    return f"{external_url.rstrip('/')}/v1/alerts?fingerprint={event.fingerprint}"


def webhook_body(event: AlertEvent, *, receiver: str, external_url: str) -> dict[str, Any]:
    """Alertmanager's webhook payload, version 4, with one alert per state change."""
    alertname = event.labels.get("alertname", event.rule)
    return {
        "version": "4",
        "groupKey": f'{{}}:{{alertname="{alertname}"}}',
        "truncatedAlerts": 0,
        "status": event.status,
        "receiver": receiver,
        "groupLabels": {"alertname": alertname},
        "commonLabels": dict(event.labels),
        "commonAnnotations": dict(event.annotations),
        "externalURL": external_url,
        "alerts": [
            {
                "status": event.status,
                "labels": dict(event.labels),
                "annotations": dict(event.annotations),
                "startsAt": rfc3339(event.starts_at),
                "endsAt": rfc3339(event.ends_at) if event.ends_at else ZERO_TIME,
                "generatorURL": generator_url(external_url, event),
                "fingerprint": event.fingerprint,
            }
        ],
    }


def alertmanager_alert(
    event: AlertEvent, *, external_url: str, ends_at: datetime
) -> dict[str, Any]:
    """One element of the list POSTed to Alertmanager's /api/v2/alerts."""
    return {
        "labels": dict(event.labels),
        "annotations": dict(event.annotations),
        "startsAt": rfc3339(event.starts_at),
        "endsAt": rfc3339(ends_at),
        "generatorURL": generator_url(external_url, event),
    }


def slack_escape(text: str) -> str:
    """Slack's mrkdwn escaping, so that no value can mention (`<!channel>`) or link (`<url>`)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _slack_link(url: str, label: str) -> str:
    # `|` would end the URL of a <url|label> link early.
    return f"<{slack_escape(url).replace('|', '%7C')}|{label}>"


def slack_body(event: AlertEvent, *, external_url: str) -> dict[str, Any]:
    """Slack incoming webhook: a plain `text` fallback plus Block Kit blocks.

    Both are mrkdwn: every label and annotation value (and the rule name) is escaped.
    """
    state = "FIRING" if event.status == "firing" else "RESOLVED"
    rule = slack_escape(event.rule)
    severity = slack_escape(event.labels.get("severity", "none"))
    summary = slack_escape(event.annotations.get("summary", event.rule))
    headline = f"[{state}] {rule}: {summary}"
    labels = ", ".join(
        f"{slack_escape(k)}={slack_escape(v)}" for k, v in sorted(event.labels.items())
    )
    lines = [f"*[{state}] {rule}* ({severity})", summary, f"*Labels:* {labels}"]
    if event.status == "resolved" and event.ends_at:
        lines.append(f"*Resolved at:* {rfc3339(event.ends_at)}")
    else:
        lines.append(f"*Since:* {rfc3339(event.starts_at)}")
    links = [_slack_link(generator_url(external_url, event), "Alert")]
    if event.annotations.get("runbook"):
        links.append(_slack_link(event.annotations["runbook"], "Runbook"))
    return {
        "text": headline,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(lines)}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": " | ".join(links)}]},
        ],
    }


def pagerduty_body(event: AlertEvent, *, routing_key: str, external_url: str) -> dict[str, Any]:
    """PagerDuty Events API v2: trigger while firing, resolve after; the fingerprint dedups."""
    if event.status == "resolved":
        return {
            "routing_key": routing_key,
            "event_action": "resolve",
            "dedup_key": event.fingerprint,
        }
    severity = event.labels.get("severity", "error")
    body: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": event.fingerprint,
        "payload": {
            "summary": event.annotations.get("summary", event.rule)[:1024],
            "source": event.labels.get("node", "gpumeter"),
            "severity": severity if severity in PAGERDUTY_SEVERITIES else "error",
            "timestamp": rfc3339(event.starts_at),
            "class": event.rule,
            "custom_details": {
                "labels": dict(event.labels),
                "annotations": dict(event.annotations),
                "value": event.value,
            },
        },
        "client": "gpumeter alerts",
        "client_url": generator_url(external_url, event),
    }
    if "team" in event.labels:
        body["payload"]["group"] = event.labels["team"]
    if "gpu" in event.labels:
        body["payload"]["component"] = event.labels["gpu"]
    if event.annotations.get("runbook"):
        body["links"] = [{"href": event.annotations["runbook"], "text": "Runbook"}]
    return body
