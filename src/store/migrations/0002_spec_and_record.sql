-- A job becomes an immutable spec, written once at submit, plus a small record of its current state that
-- the job engine's writer updates once per group commit (the per-job event log is unchanged).
-- Rows written by 0001 keep their whole body in `spec` with `record` NULL; the job engine converts them
-- when the store opens.
-- Portable SQL (SQLite and PostgreSQL): RENAME COLUMN and ADD COLUMN with a constant default.

ALTER TABLE jobs RENAME COLUMN body TO spec;
ALTER TABLE jobs ADD COLUMN record TEXT;
ALTER TABLE jobs ADD COLUMN last_seq BIGINT NOT NULL DEFAULT 0;
