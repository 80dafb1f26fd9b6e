-- Sub-minute evaluation: GPUs online in the last complete minute, the yardstick a minute still
-- being filled must reach before it is evaluated.
ALTER TABLE alert_watermark ADD COLUMN last_evaluated_gpus_online integer;
