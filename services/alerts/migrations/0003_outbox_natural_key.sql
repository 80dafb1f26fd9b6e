-- One outbox row per receiver and notification: a notification is its alert's fingerprint and
-- status and the event time it was made for (a repeat has a later one). A batch written again
-- after its commit went unacknowledged (PostgreSQL restarted, a connection dropped) then queues
-- nothing twice. Rows from before this have no notified_at, and stay as they are.
ALTER TABLE alert_outbox ADD COLUMN notified_at timestamptz;

CREATE UNIQUE INDEX alert_outbox_notification
    ON alert_outbox (receiver, fingerprint, status, notified_at);
