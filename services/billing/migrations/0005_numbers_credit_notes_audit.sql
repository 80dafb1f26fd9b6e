-- Invoice numbers, credit notes, the audit trail, and the bill-to of catalog version 2.

-- Catalog version 2: who a project's invoices are addressed to (contact, email, address, PO).
ALTER TABLE projects ADD COLUMN bill_to jsonb;

-- Numbers assigned at finalization, gapless per calendar year (Asia/Hong_Kong) of the issue date:
-- a counter row per (kind, year), incremented in the finalizing transaction, so a rolled-back
-- finalization gives its numbers back.
CREATE TABLE document_numbers (
    kind text    NOT NULL CHECK (kind IN ('invoice', 'credit_note')),
    year integer NOT NULL CHECK (year BETWEEN 2000 AND 2999),
    last integer NOT NULL CHECK (last >= 1),
    PRIMARY KEY (kind, year)
);

ALTER TABLE invoices
    ADD COLUMN invoice_number text UNIQUE,
    ADD COLUMN issued_on      date,
    ADD COLUMN due_on         date,
    ADD CONSTRAINT invoices_numbered_when_finalized_now CHECK (
        invoice_number IS NULL OR (status = 'finalized' AND issued_on IS NOT NULL
                                   AND due_on IS NOT NULL AND due_on >= issued_on));

-- A finalized invoice never changes (now including its number and dates): only its publication
-- time may be set.
CREATE OR REPLACE FUNCTION forbid_finalized_invoice_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status = 'finalized' THEN
        IF TG_OP = 'UPDATE'
           AND (NEW.invoice_id, NEW.project_id, NEW.period, NEW.status, NEW.gross_hkd,
                NEW.subsidy_hkd, NEW.net_hkd, NEW.subsidy_cap_remaining_hkd, NEW.flags,
                NEW.has_unpriced_usage, NEW.finalized_at, NEW.invoice_number, NEW.issued_on,
                NEW.due_on)
               IS NOT DISTINCT FROM
               (OLD.invoice_id, OLD.project_id, OLD.period, OLD.status, OLD.gross_hkd,
                OLD.subsidy_hkd, OLD.net_hkd, OLD.subsidy_cap_remaining_hkd, OLD.flags,
                OLD.has_unpriced_usage, OLD.finalized_at, OLD.invoice_number, OLD.issued_on,
                OLD.due_on) THEN
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

-- Which invoice line each billed hour was charged on (null for invoices finalized before this
-- migration: those are credited in whole only).
ALTER TABLE billed_usage ADD COLUMN line_no integer;

CREATE TABLE credit_notes (
    credit_note_id     text          PRIMARY KEY,
    credit_note_number text          NOT NULL UNIQUE,
    invoice_id         text          NOT NULL REFERENCES invoices (invoice_id),
    project_id         text          NOT NULL,
    period             text          NOT NULL,
    issued_on          date          NOT NULL,
    reason             text          NOT NULL CHECK (length(reason) BETWEEN 1 AND 2000),
    gross_hkd          numeric(18,2) NOT NULL CHECK (gross_hkd >= 0),
    subsidy_hkd        numeric(18,2) NOT NULL CHECK (subsidy_hkd >= 0),
    net_hkd            numeric(18,2) NOT NULL,
    created_by         text          NOT NULL,
    created_at         timestamptz   NOT NULL DEFAULT now()
);
CREATE INDEX credit_notes_invoice ON credit_notes (invoice_id);
CREATE INDEX credit_notes_project ON credit_notes (project_id);

CREATE TABLE credit_note_lines (
    credit_note_id        text          NOT NULL REFERENCES credit_notes (credit_note_id),
    invoice_id            text          NOT NULL,
    line_no               integer       NOT NULL,   -- the invoice line credited
    gpu_model             text          NOT NULL,
    gpu_seconds           numeric       NOT NULL,
    rate_hkd              numeric(18,2),
    subsidised            boolean       NOT NULL,
    amount_hkd            numeric(18,2),
    adjustment_for_period text,
    PRIMARY KEY (credit_note_id, line_no),
    UNIQUE (invoice_id, line_no)                     -- a line is credited at most once
);

-- The hours a credit note released: unbilled again, so the corrected charge is invoiced on the
-- project's next open invoice as an adjustment naming the period.
CREATE TABLE credited_usage (
    credit_note_id text        NOT NULL REFERENCES credit_notes (credit_note_id),
    invoice_id     text        NOT NULL,
    project_id     text        NOT NULL,
    gpu_model      text        NOT NULL,
    hour_start     timestamptz NOT NULL,
    gpu_seconds    numeric     NOT NULL,
    PRIMARY KEY (credit_note_id, gpu_model, hour_start)
);
CREATE INDEX credited_usage_hour ON credited_usage (project_id, gpu_model, hour_start);

-- Who did what: every state-changing action, append-only.
CREATE TABLE audit_log (
    audit_id bigserial   PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor    text        NOT NULL CHECK (length(actor) BETWEEN 1 AND 300),
    action   text        NOT NULL,
    subject  text,
    details  jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_at ON audit_log (at);

CREATE FUNCTION forbid_change_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME
        USING ERRCODE = 'integrity_constraint_violation';
END;
$$;

CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION forbid_change_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION forbid_change_append_only();
CREATE TRIGGER credit_notes_append_only BEFORE UPDATE OR DELETE ON credit_notes
    FOR EACH ROW EXECUTE FUNCTION forbid_change_append_only();
CREATE TRIGGER credit_note_lines_append_only BEFORE UPDATE OR DELETE ON credit_note_lines
    FOR EACH ROW EXECUTE FUNCTION forbid_change_append_only();
CREATE TRIGGER credited_usage_append_only BEFORE UPDATE OR DELETE ON credited_usage
    FOR EACH ROW EXECUTE FUNCTION forbid_change_append_only();
