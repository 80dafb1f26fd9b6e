"""Topic names of docs/contracts.md §2, in one place. A prefix isolates test runs or tenants."""

from __future__ import annotations

from dataclasses import dataclass

USAGE = "gpu.usage.v1"
USAGE_DLQ = "gpu.usage.dlq.v1"
HOURLY = "metering.usage.hourly.v1"
# Per-job hourly totals (a versioned addition to docs/contracts.md §2), compacted.
JOBS_HOURLY = "metering.usage.jobs.hourly.v1"
CLUSTER_MINUTELY = "metering.cluster.minutely.v1"
INVOICES = "billing.invoices.v1"
ALERTS = "alerts.v1"
BILLING_SIGNALS = "billing.signals.v1"
COMPLETENESS = "metering.completeness.v1"
# Internal to metering: per-node partial totals, batched per partition of the cross-node sums
# (v2: a message holds many [key, node, partial] entries; v1 held one partial).
NODE_HOURLY = "metering.internal.node-hourly.v2"
NODE_MINUTELY = "metering.internal.node-minutely.v2"
NODE_JOB_HOURLY = "metering.internal.node-job-hourly.v1"
# Internal to metering: per-node signals (last seen, idle GPUs, XID) the alerts service reads.
NODE_SIGNALS = "metering.node.signals.v1"
# Billing's dead letters: hourly or completeness records it cannot decode or store, with reason,
# detail and the original bytes (the gpu.usage.dlq.v1 format), so no usage is out of every invoice
# unseen.
BILLING_DLQ = "billing.dlq.v1"


@dataclass(frozen=True)
class Topics:
    """Topic names with an optional prefix (empty in production)."""

    prefix: str = ""

    def name(self, base: str) -> str:
        return f"{self.prefix}{base}"

    @property
    def usage(self) -> str:
        return self.name(USAGE)

    @property
    def usage_dlq(self) -> str:
        return self.name(USAGE_DLQ)

    @property
    def hourly(self) -> str:
        return self.name(HOURLY)

    @property
    def jobs_hourly(self) -> str:
        return self.name(JOBS_HOURLY)

    @property
    def node_job_hourly(self) -> str:
        return self.name(NODE_JOB_HOURLY)

    @property
    def cluster_minutely(self) -> str:
        return self.name(CLUSTER_MINUTELY)

    @property
    def invoices(self) -> str:
        return self.name(INVOICES)

    @property
    def alerts(self) -> str:
        return self.name(ALERTS)

    @property
    def completeness(self) -> str:
        return self.name(COMPLETENESS)

    @property
    def billing_signals(self) -> str:
        return self.name(BILLING_SIGNALS)

    @property
    def billing_dlq(self) -> str:
        return self.name(BILLING_DLQ)

    @property
    def node_hourly(self) -> str:
        return self.name(NODE_HOURLY)

    @property
    def node_minutely(self) -> str:
        return self.name(NODE_MINUTELY)

    @property
    def node_signals(self) -> str:
        return self.name(NODE_SIGNALS)

    def public(self) -> list[str]:
        return [
            self.usage,
            self.usage_dlq,
            self.hourly,
            self.jobs_hourly,
            self.cluster_minutely,
            self.invoices,
            self.alerts,
        ]

    def all(self) -> list[str]:
        return [
            *self.public(),
            self.billing_signals,
            self.billing_dlq,
            self.node_hourly,
            self.node_minutely,
            self.node_job_hourly,
            self.node_signals,
        ]
