-- Catalog version 2: a project's policy when its subsidy cap is used up or its budget reached,
-- and what gpumeter last did about it on the project's Slurm account.
ALTER TABLE projects
    ADD COLUMN on_cap_exhausted text NOT NULL DEFAULT 'notify'
        CHECK (on_cap_exhausted IN ('notify', 'hold')),
    ADD COLUMN budget_hkd numeric(18,2) CHECK (budget_hkd >= 0);

CREATE TABLE enforcement_state (
    project_id text        PRIMARY KEY,
    held       boolean     NOT NULL,
    reason     text        NOT NULL,
    dry_run    boolean     NOT NULL,
    since      timestamptz NOT NULL DEFAULT now()
);
