-- Projects whose drafts lag behind the ledger: the consumer marks them in the transaction that
-- changes their usage; the draft drainer rebuilds them (from the earliest usage period marked)
-- and deletes the mark only if it was not marked again meanwhile (version).
CREATE TABLE dirty_projects (
    project_id  text        PRIMARY KEY,
    from_period text        NOT NULL CHECK (from_period ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'),
    version     bigint      NOT NULL DEFAULT 1,
    marked_at   timestamptz NOT NULL DEFAULT now()
);
