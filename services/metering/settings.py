"""Metering settings, read once from the environment."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pydantic import Field, model_validator

from services.common.settings import ApiTokenSettings

# Producer and DLQ topic limit: a dead letter of a 1 MiB+ message, base64'd, fits.
DEAD_LETTER_MAX_BYTES = 3 * 1024 * 1024
# The usage topic's message limit. Messages over 1 MiB (MAX_MESSAGE_BYTES) are dead-lettered as
# too_large (docs/contracts.md), so the broker must accept them: Apache Kafka's default refuses
# anything over 1 MiB at the produce, and the writer would get a broker error instead. Over this
# the broker refuses (a dead letter keeps at most 2 MiB of the raw bytes).
USAGE_TOPIC_MAX_BYTES = 2 * 1024 * 1024


class MeteringSettings(ApiTokenSettings):
    """API_TOKENS and OIDC_* matter to metering only with METRICS_REQUIRE_TOKEN: its only routes
    are /healthz (always open, for probes) and /metrics."""

    app_id: str = "gpumeter-metering"
    http_port: int = 8081
    # Worker processes on this host, each using one core (see services/metering/supervisor.py).
    worker_processes: int = Field(1, ge=1)
    # Copies of other workers' tables each worker keeps warm for a fast takeover (Faust's
    # standby replicas); each costs memory and changelog reading in every worker.
    table_standby_replicas: int = Field(1, ge=0)
    usage_partitions: int = 8
    internal_partitions: int = 4
    batch_max: int = 5000
    # How long a batch may wait to fill; each of the pipeline's hops (usage -> partials -> sums)
    # waits up to this long. At 15,000 samples/s 0.2 s cost ~0.2 s of p50 sample -> hourly total.
    batch_within_s: float = 0.05
    # CPython's default (700) promotes every in-flight batch into the oldest generation; full
    # collections over every node's state then ran about once a second at 15,000 GPUs (60-80 ms
    # each, nothing collected). Node states are trees freed by reference counting.
    gc_gen0_threshold: int = 50_000
    # How long the broker may hold a fetch with nothing new (Faust fixes 1,500 ms). Every hop of
    # the pipeline (usage -> partials -> sums) waits for a fetch; Tansu answers a held fetch only
    # at its next poll (~115 ms median at 500 ms, ~5 ms at 50 ms), Kafka as soon as data arrives.
    fetch_max_wait_ms: int = 50
    # /healthz answers 503 when usage partitions have had lag this long with nothing processed.
    stall_unhealthy_s: float = Field(60.0, gt=0)
    # /healthz answers 503 when a rebalance or a table recovery has lasted this long: a worker
    # stuck in one counts nothing and must be restarted (by the supervisor or a liveness probe).
    recovery_unhealthy_s: float = Field(300.0, gt=0)
    # How long one request to a broker may take (Faust's default is 90 s). A request to a broker
    # cut off by a partition holds whatever waits on it (a commit, and a rebalance behind it) this
    # long. Not below KAFKA_SESSION_TIMEOUT_MS (Faust refuses it).
    kafka_request_timeout_ms: int = Field(30000, ge=1000)
    hour_retention_s: int = 6 * 3600  # how late a node's sample may be, relative to its newest one
    minute_retention_s: int = 15 * 60
    # Bounds on one node's state (see services/metering/domain.py): beyond them, dead letters.
    max_gpus_per_node: int = Field(64, ge=1)
    # How often nodes silent past the retention are looked for and forgotten.
    node_expiry_check_s: float = Field(60.0, gt=0)
    max_hour_keys_per_node: int = Field(1024, ge=1)
    table_retention_s: int = 35 * 24 * 3600  # cross-node sums kept for late updates
    # Where Faust keeps its per-app directory. Tables are in memory (their changelogs are the
    # truth), so nothing lasting is written there; the default is the system's temporary
    # directory, not the current one (every app id would leave a directory in the checkout, and a
    # container's working directory may not be writable).
    data_dir: str = Field(
        default_factory=lambda: str(Path(tempfile.gettempdir()) / "gpumeter-faust")
    )

    @model_validator(mode="after")
    def _request_outlasts_session(self) -> MeteringSettings:
        if self.kafka_request_timeout_ms < self.kafka_session_timeout_ms:
            raise ValueError(
                f"KAFKA_REQUEST_TIMEOUT_MS ({self.kafka_request_timeout_ms}) must not be below "
                f"KAFKA_SESSION_TIMEOUT_MS ({self.kafka_session_timeout_ms})"
            )
        return self

    @property
    def node_completeness_topic(self) -> str:
        """Internal: per-node completeness facts keyed by hour, for the cross-node merge."""
        return self.topics.name("metering.internal.node-completeness.v2")

    @property
    def faust_id(self) -> str:
        return self.group(self.app_id)

    def internal_topics(self) -> dict[str, int]:
        """Faust's own topics, created up front: a group joining while topics appear waits 30 s on Tansu."""
        return {
            f"{self.faust_id}-__assignor-__leader": 1,
            f"{self.faust_id}-node-state-changelog": self.usage_partitions,
            f"{self.faust_id}-hour-totals-changelog": self.internal_partitions,
            f"{self.faust_id}-job-totals-changelog": self.internal_partitions,
            f"{self.faust_id}-minute-totals-changelog": self.internal_partitions,
            f"{self.faust_id}-hour-completeness-changelog": self.internal_partitions,
        }

    def all_topics(self) -> dict[str, int]:
        topics = self.topics
        return {
            topics.usage: self.usage_partitions,
            topics.usage_dlq: self.internal_partitions,
            topics.hourly: self.internal_partitions,
            topics.cluster_minutely: 1,
            topics.node_hourly: self.internal_partitions,
            topics.node_minutely: self.internal_partitions,
            topics.node_job_hourly: self.internal_partitions,
            topics.jobs_hourly: self.internal_partitions,
            topics.node_signals: self.internal_partitions,
            topics.completeness: self.internal_partitions,
            self.node_completeness_topic: self.internal_partitions,
            **self.internal_topics(),
        }

    def compacted_topics(self) -> set[str]:
        return {
            self.topics.hourly,
            self.topics.jobs_hourly,
            self.topics.completeness,
            *(t for t in self.internal_topics() if t.endswith("-changelog")),
        }
