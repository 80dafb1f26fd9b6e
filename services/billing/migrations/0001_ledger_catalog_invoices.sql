-- Billing schema: catalog, hourly usage ledger, invoices, finalized periods.

CREATE TABLE rate_cards (
    gpu_model        text          NOT NULL,
    effective_from   date          NOT NULL,            -- Asia/Hong_Kong date, from 00:00 HKT
    hkd_per_gpu_hour numeric(18,2) NOT NULL CHECK (hkd_per_gpu_hour >= 0),
    updated_at       timestamptz   NOT NULL DEFAULT now(),
    PRIMARY KEY (gpu_model, effective_from)
);

CREATE TABLE projects (
    project_id         text        PRIMARY KEY,
    name               text        NOT NULL,
    subsidy_scheme     text,
    subsidy_rate       numeric     CHECK (subsidy_rate > 0 AND subsidy_rate <= 1),
    subsidy_cap_hkd    numeric(18,2) CHECK (subsidy_cap_hkd >= 0),
    subsidy_valid_from date,
    subsidy_valid_to   date,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CHECK (
        (subsidy_scheme IS NULL AND subsidy_rate IS NULL AND subsidy_cap_hkd IS NULL
         AND subsidy_valid_from IS NULL AND subsidy_valid_to IS NULL)
        OR (subsidy_scheme IS NOT NULL AND subsidy_rate IS NOT NULL AND subsidy_cap_hkd IS NOT NULL
            AND subsidy_valid_from IS NOT NULL AND subsidy_valid_to IS NOT NULL
            AND subsidy_valid_from <= subsidy_valid_to)
    )
);

-- Cumulative totals per (project, GPU model, UTC hour); a row only moves to a higher revision.
CREATE TABLE usage_hourly (
    project_id       text        NOT NULL,
    gpu_model        text        NOT NULL,
    hour_start       timestamptz NOT NULL,
    gpu_seconds      numeric     NOT NULL,
    util_gpu_seconds numeric     NOT NULL,
    energy_wh        numeric     NOT NULL,
    samples          integer     NOT NULL CHECK (samples >= 0),
    revision         bigint      NOT NULL CHECK (revision >= 0),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, gpu_model, hour_start)
);
CREATE INDEX usage_hourly_project_hour ON usage_hourly (project_id, hour_start);

CREATE TABLE finalized_periods (
    period       text        PRIMARY KEY CHECK (period ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'),
    finalized_at timestamptz NOT NULL DEFAULT now(),
    forced       boolean     NOT NULL DEFAULT false
);

CREATE TABLE invoices (
    invoice_id                text          PRIMARY KEY,
    project_id                text          NOT NULL,
    period                    text          NOT NULL CHECK (period ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'),
    status                    text          NOT NULL CHECK (status IN ('draft', 'finalized')),
    gross_hkd                 numeric(18,2) NOT NULL,
    subsidy_hkd               numeric(18,2) NOT NULL,
    net_hkd                   numeric(18,2) NOT NULL,
    subsidy_cap_remaining_hkd numeric(18,2),
    flags                     text[]        NOT NULL DEFAULT '{}',
    has_unpriced_usage        boolean       NOT NULL DEFAULT false,
    created_at                timestamptz   NOT NULL DEFAULT now(),
    updated_at                timestamptz   NOT NULL DEFAULT now(),
    finalized_at              timestamptz,
    published_at              timestamptz,  -- outbox: finalized and not yet on billing.invoices.v1
    UNIQUE (project_id, period)
);
CREATE INDEX invoices_period ON invoices (period);
CREATE INDEX invoices_unpublished ON invoices (period) WHERE status = 'finalized' AND published_at IS NULL;

CREATE TABLE invoice_lines (
    invoice_id            text          NOT NULL REFERENCES invoices (invoice_id) ON DELETE CASCADE,
    line_no               integer       NOT NULL,
    gpu_model             text          NOT NULL,
    gpu_seconds           numeric       NOT NULL,
    rate_hkd              numeric(18,2),
    subsidised            boolean       NOT NULL,
    amount_hkd            numeric(18,2),
    adjustment_for_period text,
    PRIMARY KEY (invoice_id, line_no)
);

-- What each finalized invoice charged, per hour: late usage is the ledger minus this.
CREATE TABLE billed_usage (
    invoice_id  text        NOT NULL REFERENCES invoices (invoice_id),
    project_id  text        NOT NULL,
    gpu_model   text        NOT NULL,
    hour_start  timestamptz NOT NULL,
    gpu_seconds numeric     NOT NULL,
    PRIMARY KEY (invoice_id, gpu_model, hour_start)
);
CREATE INDEX billed_usage_hour ON billed_usage (project_id, gpu_model, hour_start);

-- A finalized invoice never changes: only its publication time may be set.
CREATE FUNCTION forbid_finalized_invoice_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status = 'finalized' THEN
        IF TG_OP = 'UPDATE'
           AND (NEW.invoice_id, NEW.project_id, NEW.period, NEW.status, NEW.gross_hkd,
                NEW.subsidy_hkd, NEW.net_hkd, NEW.subsidy_cap_remaining_hkd, NEW.flags,
                NEW.has_unpriced_usage, NEW.finalized_at)
               IS NOT DISTINCT FROM
               (OLD.invoice_id, OLD.project_id, OLD.period, OLD.status, OLD.gross_hkd,
                OLD.subsidy_hkd, OLD.net_hkd, OLD.subsidy_cap_remaining_hkd, OLD.flags,
                OLD.has_unpriced_usage, OLD.finalized_at) THEN
            RETURN NEW;
        END IF;
        RAISE EXCEPTION 'invoice % is finalized and cannot change', OLD.invoice_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER invoices_finalized_are_frozen
    BEFORE UPDATE OR DELETE ON invoices
    FOR EACH ROW EXECUTE FUNCTION forbid_finalized_invoice_change();

CREATE FUNCTION forbid_finalized_line_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    target text := COALESCE(NEW.invoice_id, OLD.invoice_id);
BEGIN
    IF EXISTS (SELECT 1 FROM invoices WHERE invoice_id = target AND status = 'finalized') THEN
        RAISE EXCEPTION 'invoice % is finalized and its lines cannot change', target
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER invoice_lines_finalized_are_frozen
    BEFORE INSERT OR UPDATE OR DELETE ON invoice_lines
    FOR EACH ROW EXECUTE FUNCTION forbid_finalized_line_change();
