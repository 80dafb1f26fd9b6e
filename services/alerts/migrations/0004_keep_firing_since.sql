-- keep_firing_for counts from the first observation on which a firing alert's condition no longer
-- held (Prometheus's KeepFiringSince); kept here so a restart in the middle of it goes on from it.
ALTER TABLE alert_states ADD COLUMN keep_firing_since timestamptz;

-- A series kept firing by the earlier release (which counted from the last time the condition
-- held) goes on from then, instead of starting the wait again.
UPDATE alert_states SET keep_firing_since = last_active_at
    WHERE status = 'firing' AND last_active_at IS NOT NULL AND last_observed_at > last_active_at;
