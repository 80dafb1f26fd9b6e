-- Notifications delivered or refused for good are deleted once older than ALERT_NODE_RETENTION_S
-- (a periodic, batched cleanup); this index finds them without reading the whole outbox.
CREATE INDEX alert_outbox_finished ON alert_outbox (created_at)
    WHERE delivered_at IS NOT NULL OR rejected_at IS NOT NULL;
