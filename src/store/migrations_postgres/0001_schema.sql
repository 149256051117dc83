-- The PostgreSQL schema: the one the SQLite migrations 0001-0003 (src/store/migrations) end with, in one
-- step (there were never PostgreSQL databases of the older shapes). Same column types as SQLite so the row
-- mapping is the same: `terminal` is an INTEGER 0/1, bodies are TEXT, times are integer millis.
-- `record` is NULL only for rows of the legacy one-body format, which PostgreSQL never had; the column
-- stays nullable so `legacy_jobs` means the same on both.
-- Job ids compare bytewise (COLLATE "C"), as in SQLite, whatever the database's locale: the `(created_ms,
-- id)` cursor of `list_jobs` orders the same on both stores.

CREATE TABLE jobs (
    id          TEXT COLLATE "C" PRIMARY KEY,
    state       TEXT NOT NULL,
    terminal    INTEGER NOT NULL,
    workflow    TEXT NOT NULL,
    priority    INTEGER NOT NULL,
    created_ms  BIGINT NOT NULL,
    updated_ms  BIGINT NOT NULL,
    ended_ms    BIGINT,
    request_id  TEXT,
    spec        TEXT NOT NULL,
    record      TEXT,
    last_seq    BIGINT NOT NULL DEFAULT 0,
    tenant      TEXT NOT NULL DEFAULT ''
);
CREATE INDEX jobs_created ON jobs (created_ms DESC, id DESC);
CREATE INDEX jobs_unfinished ON jobs (terminal, created_ms);
CREATE INDEX jobs_ended ON jobs (terminal, ended_ms);
CREATE INDEX jobs_tenant_created ON jobs (tenant, created_ms DESC, id DESC);

CREATE TABLE job_labels (
    job_id  TEXT COLLATE "C" NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    key     TEXT NOT NULL,
    value   TEXT NOT NULL,
    PRIMARY KEY (job_id, key)
);
CREATE INDEX job_labels_kv ON job_labels (key, value);

CREATE TABLE job_events (
    job_id   TEXT COLLATE "C" NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq      BIGINT NOT NULL,
    time_ms  BIGINT NOT NULL,
    body     TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);

CREATE TABLE idempotency (
    tenant        TEXT NOT NULL DEFAULT '',
    request_id    TEXT NOT NULL,
    request_hash  TEXT NOT NULL,
    job_id        TEXT COLLATE "C" NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    PRIMARY KEY (tenant, request_id)
);
-- SQLite finds a job's keys by scanning; PostgreSQL's cascade and `delete_finished_before` want an index.
CREATE INDEX idempotency_job ON idempotency (job_id);

CREATE TABLE job_artifacts (
    job_id  TEXT COLLATE "C" NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    sha256  TEXT NOT NULL,
    PRIMARY KEY (job_id, sha256)
);
CREATE INDEX job_artifacts_sha ON job_artifacts (sha256);

CREATE TABLE machines (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    state       TEXT NOT NULL,
    created_ms  BIGINT NOT NULL,
    updated_ms  BIGINT NOT NULL,
    body        TEXT NOT NULL
);

CREATE TABLE api_keys (
    prefix         TEXT PRIMARY KEY,
    secret_sha256  TEXT NOT NULL,
    tenant         TEXT NOT NULL,
    role           TEXT NOT NULL,
    created_ms     BIGINT NOT NULL,
    expires_ms     BIGINT,
    revoked_ms     BIGINT
);
