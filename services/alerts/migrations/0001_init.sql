-- Alert series state, the durable notification outbox, and the evaluator's progress.
CREATE TABLE alert_states (
    fingerprint      text PRIMARY KEY,
    rule             text NOT NULL,
    labels           jsonb NOT NULL,
    annotations      jsonb NOT NULL DEFAULT '{}'::jsonb,
    status           text NOT NULL CHECK (status IN ('inactive', 'pending', 'firing', 'resolved')),
    pending_since    timestamptz,
    starts_at        timestamptz,
    ends_at          timestamptz,
    last_value       numeric,
    last_observed_at timestamptz,
    last_active_at   timestamptz,
    last_notified_at timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX alert_states_status ON alert_states (status, updated_at);

-- One row per state change per receiver, written in the transaction of the state change.
CREATE TABLE alert_outbox (
    seq          bigserial PRIMARY KEY,
    receiver     text NOT NULL,
    fingerprint  text NOT NULL,
    status       text NOT NULL CHECK (status IN ('firing', 'resolved')),
    event        jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    attempts     integer NOT NULL DEFAULT 0,
    last_error   text,
    delivered_at timestamptz,
    rejected_at  timestamptz
);
CREATE INDEX alert_outbox_undelivered ON alert_outbox (receiver, seq)
    WHERE delivered_at IS NULL AND rejected_at IS NULL;

-- Cluster minutes seen but not yet complete (latest revision of each).
CREATE TABLE alert_cluster_minutes (
    minute_start timestamptz PRIMARY KEY,
    revision     integer NOT NULL,
    payload      jsonb NOT NULL
);

CREATE TABLE alert_watermark (
    id                    integer PRIMARY KEY CHECK (id = 1),
    max_minute_seen       timestamptz,
    last_evaluated_minute timestamptz
);

CREATE TABLE alert_nodes (
    node             text PRIMARY KEY,
    last_received_at timestamptz NOT NULL,
    last_sample_time timestamptz NOT NULL
);
