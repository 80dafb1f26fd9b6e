"""Prometheus metrics of the alerts service, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class AlertsMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.notifications_sent = Counter(
            "alerts_notifications_sent",
            "Notifications a receiver accepted",
            ["receiver"],
            registry=r,
        )
        self.notifications_failed = Counter(
            "alerts_notifications_failed",
            "Failed deliveries: retry (will be retried) or rejected (4xx, given up)",
            ["receiver", "reason"],
            registry=r,
        )
        self.notifications_rejected = Counter(
            "alerts_notifications_rejected",
            "Notifications a receiver refused for good (HTTP 4xx other than 408, 425, 429): not"
            " retried, listed at GET /v1/notifications/rejected",
            ["receiver", "status"],
            registry=r,
        )
        self.notifications_rejected_recent = Gauge(
            "alerts_notifications_rejected_recent",
            "Notifications refused for good within ALERT_REJECTED_WINDOW_S, read from the database"
            " (so kept across restarts); those of the rules that report rejections left out",
            ["receiver"],
            registry=r,
        )
        self.outbox_depth = Gauge(
            "alerts_outbox_depth", "Notifications waiting for delivery", ["receiver"], registry=r
        )
        self.evaluations = Counter(
            "alerts_evaluations", "Observations evaluated against a rule", ["rule"], registry=r
        )
        self.state_changes = Counter(
            "alerts_state_changes",
            "Notifications caused (firing, resolved)",
            ["rule", "status"],
            registry=r,
        )
        self.input_messages = Counter(
            "alerts_input_messages", "Input messages consumed", ["topic", "outcome"], registry=r
        )
        self.late_minutes = Counter(
            "alerts_late_cluster_minutes",
            "Cluster minute revisions that arrived after their minute was evaluated",
            registry=r,
        )
        self.partial_minutes = Counter(
            "alerts_partial_cluster_minute_evaluations",
            "Revisions of a minute still in progress evaluated (sub-minute evaluation)",
            registry=r,
        )
        self.database_errors = Counter(
            "alerts_database_write_errors",
            "Batch writes to PostgreSQL that failed and were retried",
            registry=r,
        )
        self.dead_letters_read = Counter(
            "alerts_dead_letters_read",
            "Dead letters read from gpu.usage.dlq.v1 and billing.dlq.v1, by reason (within the"
            " count window or older: outcome counted or old)",
            ["source", "reason", "outcome"],
            registry=r,
        )
        self.dead_letters_recent = Gauge(
            "alerts_dead_letters_recent",
            "Dead letters appended within ALERT_DEAD_LETTER_COUNT_WINDOW_S, by source and reason",
            ["source", "reason"],
            registry=r,
        )
        self.rows_removed = Counter(
            "alerts_rows_removed",
            "Rows the periodic cleanup deleted (nodes silent past ALERT_NODE_RETENTION_S, their"
            " alerts, finished notifications older than it), by table",
            ["table"],
            registry=r,
        )
        self.nodes_known = Gauge(
            "alerts_nodes_known", "Nodes the alerts service remembers (last seen)", registry=r
        )
        self.series_known = Gauge(
            "alerts_series_known", "Alert series the alerts service holds in memory", registry=r
        )
        self.alertmanager_resends = Counter(
            "alerts_alertmanager_resends",
            "Periodic re-sends of active alerts to Alertmanager",
            ["receiver", "outcome"],
            registry=r,
        )
