-- Billing signals for the alerts service (an outbox) and metering's hour completeness watermarks.

-- Latest value per key of billing.signals.v1; a row is pending while version > published_version.
CREATE TABLE billing_signals (
    key               text        PRIMARY KEY,
    kind              text        NOT NULL,
    payload           jsonb       NOT NULL,  -- the signal without as_of: a change is a new version
    as_of             timestamptz NOT NULL,
    version           bigint      NOT NULL DEFAULT 1,
    published_version bigint      NOT NULL DEFAULT 0
);
CREATE INDEX billing_signals_pending ON billing_signals (key) WHERE version > published_version;

-- Latest revision of metering.completeness.v1 per hour.
CREATE TABLE hour_completeness (
    hour_start    timestamptz PRIMARY KEY,
    nodes_online  integer     NOT NULL,
    nodes_through integer     NOT NULL,
    missing_nodes text[]      NOT NULL DEFAULT '{}',
    complete      boolean     NOT NULL,
    revision      bigint      NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX usage_hourly_hour ON usage_hourly (hour_start);
CREATE INDEX invoice_lines_unpriced ON invoice_lines (invoice_id) WHERE rate_hkd IS NULL;
