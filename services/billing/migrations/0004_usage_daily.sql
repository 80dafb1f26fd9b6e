-- The ledger summed per Asia/Hong_Kong day: what draft invoices are built from. Rate, subsidy and
-- period depend only on an hour's HK date (docs/contracts.md §4), so invoices come out identical
-- from 24 times fewer rows. The statement that upserts usage_hourly applies each changed hour's
-- revision delta (new minus old, read with RETURNING OLD) to its day, so a row always equals the
-- sum of the hourly rows it covers and replaying the hourly topic changes nothing.

DO $$
BEGIN
    -- RETURNING OLD (PostgreSQL 18) is how the ledger upsert reads the row it replaces.
    IF current_setting('server_version_num')::integer < 180000 THEN
        RAISE EXCEPTION 'billing needs PostgreSQL 18 or later (this is %)', version();
    END IF;
END;
$$;

CREATE TABLE usage_daily (
    project_id  text    NOT NULL,
    gpu_model   text    NOT NULL,
    hk_date     date    NOT NULL,   -- the Asia/Hong_Kong date of the hours summed
    gpu_seconds numeric NOT NULL,   -- sum of usage_hourly.gpu_seconds of those hours
    hours_used  integer NOT NULL,   -- how many of them have gpu_seconds <> 0: none, no invoice line
    PRIMARY KEY (project_id, gpu_model, hk_date)
) WITH (fillfactor = 80);  -- room for in-place (HOT) updates: every ingested hour updates its day

INSERT INTO usage_daily (project_id, gpu_model, hk_date, gpu_seconds, hours_used)
SELECT project_id, gpu_model, (hour_start AT TIME ZONE 'Asia/Hong_Kong')::date,
       sum(gpu_seconds), count(*) FILTER (WHERE gpu_seconds <> 0)
FROM usage_hourly
GROUP BY 1, 2, 3;

-- Metering revises an hour many times while it is current: leave room on new ledger pages for
-- those revisions to be updated in place (HOT, no index writes).
ALTER TABLE usage_hourly SET (fillfactor = 90);
