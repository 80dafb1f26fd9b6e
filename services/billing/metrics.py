"""Prometheus metrics of the billing service, in a registry of its own (one per process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

HOURLY_RECORDS = Counter(
    "billing_hourly_records_total",
    "Hourly total records read from the hourly topic, by outcome",
    ["outcome"],  # applied (ledger row changed), unchanged (stale or replayed revision)
    registry=REGISTRY,
)
BAD_MESSAGES = Counter(
    "billing_bad_messages_total",
    "Hourly or completeness records billing could not decode or store, by reason (each one sent to billing.dlq.v1)",
    ["reason"],
    registry=REGISTRY,
)
BATCH_SECONDS = Histogram(
    "billing_batch_seconds",
    "Time to apply one consumer batch to the ledger and invoices",
    registry=REGISTRY,
)
DB_RETRIES = Counter(
    "billing_db_retries_total",
    "Database operations retried after a connection failure",
    ["operation"],
    registry=REGISTRY,
)
OFFSET_COMMIT_FAILURES = Counter(
    "billing_offset_commit_failures_total",
    "Offset commits that failed (the batch is delivered again; applying it again changes nothing)",
    registry=REGISTRY,
)
INVOICES_RECOMPUTED = Counter(
    "billing_draft_invoices_changed_total",
    "Draft invoices rewritten because their figures changed",
    registry=REGISTRY,
)
INVOICES_PUBLISHED = Counter(
    "billing_invoices_published_total",
    "Finalized invoices published on the invoices topic",
    registry=REGISTRY,
)
PERIODS_FINALIZED = Counter(
    "billing_periods_finalized_total", "Periods finalized", registry=REGISTRY
)
UNPRICED_DRAFTS = Gauge(
    "billing_unpriced_draft_invoices",
    "Draft invoices with usage of a GPU model that has no rate card (they cannot be finalized)",
    registry=REGISTRY,
)
LAST_BATCH_TIMESTAMP = Gauge(
    "billing_last_batch_timestamp_seconds",
    "Unix time of the last batch applied",
    registry=REGISTRY,
)
