-- A notification a receiver refused for good (a 4xx other than 408, 425, 429) stays listed, with
-- the HTTP status it was refused with: GET /v1/notifications/rejected and the
-- pipeline.notifications_rejected signal read it, across restarts.
ALTER TABLE alert_outbox ADD COLUMN rejected_status integer;

UPDATE alert_outbox SET rejected_status = substring(last_error from '^HTTP (\d{3})')::integer
    WHERE rejected_at IS NOT NULL;

CREATE INDEX alert_outbox_rejected ON alert_outbox (rejected_at) WHERE rejected_at IS NOT NULL;
