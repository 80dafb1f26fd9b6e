"""The alerts service's settings, read once from the environment."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ApiTokenSettings, CommonSettings

REPO_ROOT = Path(__file__).resolve().parents[2]


class AlertsSettings(ApiTokenSettings):
    # API_TOKENS (ApiTokenSettings): the same TOKEN=ROLE pairs as billing's: admin and billing read
    # every alert, a project token only its project's (label `project`); none, 401 to everyone.
    model_config = SettingsConfigDict(**CommonSettings.model_config, populate_by_name=True)

    database_url: str
    http_port: int = 8082
    rules_file: Path = Field(Path("deploy/alert-rules.yaml"), validation_alias="ALERT_RULES_FILE")
    # A cluster minute is evaluated once a minute this much later than its end has been seen.
    alert_minute_lateness_s: float = Field(60.0, ge=0)
    # Sub-minute evaluation: allocation, utilization and power are also evaluated on the minute
    # in progress, as metering's cumulative record grows (off: whole minutes only, as before).
    alert_sub_minute: bool = True
    # ... once that minute's online GPUs reach this share of the last complete minute's.
    alert_sub_minute_min_gpus_ratio: float = Field(0.95, gt=0, le=1)
    # How often silent nodes are looked for (processing clock).
    alert_absence_check_interval_s: float = Field(5.0, gt=0)
    # How often topic end offsets are read for the pipeline rules (dead-letter rate, metering lag).
    alert_pipeline_check_interval_s: float = Field(5.0, gt=0)
    # The dead-letter rate is measured over windows this long (and scaled to a minute).
    alert_dead_letter_window_s: float = Field(60.0, gt=0)
    # Usage input counts as flowing while gpu.usage.v1 grew within this long (metering lag rule).
    alert_input_active_s: float = Field(120.0, gt=0)
    alert_notify_backoff_initial_s: float = Field(1.0, gt=0)
    alert_notify_backoff_max_s: float = Field(300.0, gt=0)
    alert_notify_timeout_s: float = Field(10.0, gt=0)
    alert_outbox_poll_interval_s: float = Field(1.0, gt=0)
    # Alertmanager forgets a firing alert after its endsAt: re-send active ones this often.
    alertmanager_resend_interval_s: float = Field(60.0, gt=0)
    # Resolved alerts are re-sent to Alertmanager for this long after they resolve.
    alertmanager_resolved_resend_s: float = Field(300.0, ge=0)
    # pipeline.notifications_rejected counts notifications refused for good within this window.
    alert_rejected_window_s: float = Field(3600.0, gt=0)
    # pipeline.internal_errors and billing.dead_letters count the dead letters appended to
    # gpu.usage.dlq.v1 and billing.dlq.v1 within this window (by their Kafka timestamps).
    alert_dead_letter_count_window_s: float = Field(3600.0, gt=0)
    # Nodes silent this long are forgotten, with their alerts (a firing one resolved first), in
    # memory and in PostgreSQL; delivered or refused notifications older than this are deleted.
    alert_node_retention_s: float = Field(7 * 86400.0, gt=0)
    # How often that cleanup runs, and how many nodes (or notifications) one transaction deletes.
    alert_cleanup_interval_s: float = Field(300.0, gt=0)
    alert_cleanup_batch: int = Field(1000, ge=1)
    alert_external_url: str | None = None
    # GET /v1/alerts lists resolved alerts that changed within this window.
    alert_recent_s: float = Field(86400.0, gt=0)

    @property
    def consumer_group(self) -> str:
        return self.group("alerts")

    @property
    def rules_path(self) -> Path:
        if self.rules_file.is_absolute() or self.rules_file.exists():
            return self.rules_file
        return REPO_ROOT / self.rules_file

    @property
    def external_url(self) -> str:
        return self.alert_external_url or f"http://{self.http_host}:{self.http_port}"

    def receiver_env(self, name: str) -> str | None:
        """Receiver URLs and keys named in the rules file (`url_env`), read here like all config."""
        value = os.environ.get(name)
        return value if value else None
