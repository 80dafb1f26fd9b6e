-- Per-job hourly totals from metering.usage.jobs.hourly.v1: which jobs spent a project's hours,
-- their utilization, idle time (allocated at under 5%) and energy. A row only moves to a higher
-- revision, as in usage_hourly; invoices are computed from usage_hourly alone.
CREATE TABLE usage_jobs_hourly (
    project_id       text        NOT NULL,
    job_id           text        NOT NULL,   -- '' for an allocation with no job id
    gpu_model        text        NOT NULL,
    hour_start       timestamptz NOT NULL,
    gpu_seconds      numeric     NOT NULL CHECK (gpu_seconds >= 0),
    util_gpu_seconds numeric     NOT NULL CHECK (util_gpu_seconds >= 0),
    idle_gpu_seconds numeric     NOT NULL CHECK (idle_gpu_seconds >= 0),
    energy_wh        numeric     NOT NULL CHECK (energy_wh >= 0),
    nodes            integer     NOT NULL CHECK (nodes >= 0),
    samples          integer     NOT NULL CHECK (samples >= 0),
    revision         bigint      NOT NULL CHECK (revision >= 0),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, job_id, gpu_model, hour_start)
) WITH (fillfactor = 90);
CREATE INDEX usage_jobs_hourly_project_hour ON usage_jobs_hourly (project_id, hour_start);
