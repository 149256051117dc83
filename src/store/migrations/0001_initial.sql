-- Jobs, their event logs, idempotency keys, artifact references and machines.
-- Portable SQL (SQLite now, PostgreSQL later): no AUTOINCREMENT, no JSON operators, integer millis.

CREATE TABLE jobs (
    id          TEXT PRIMARY KEY,
    state       TEXT NOT NULL,
    terminal    INTEGER NOT NULL,
    workflow    TEXT NOT NULL,
    priority    INTEGER NOT NULL,
    created_ms  BIGINT NOT NULL,
    updated_ms  BIGINT NOT NULL,
    ended_ms    BIGINT,
    request_id  TEXT,
    body        TEXT NOT NULL
);
CREATE INDEX jobs_created ON jobs (created_ms DESC, id DESC);
CREATE INDEX jobs_unfinished ON jobs (terminal, created_ms);
CREATE INDEX jobs_ended ON jobs (terminal, ended_ms);

CREATE TABLE job_labels (
    job_id  TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    key     TEXT NOT NULL,
    value   TEXT NOT NULL,
    PRIMARY KEY (job_id, key)
);
CREATE INDEX job_labels_kv ON job_labels (key, value);

CREATE TABLE job_events (
    job_id   TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq      BIGINT NOT NULL,
    time_ms  BIGINT NOT NULL,
    body     TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);

CREATE TABLE idempotency (
    request_id    TEXT PRIMARY KEY,
    request_hash  TEXT NOT NULL,
    job_id        TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE
);

CREATE TABLE job_artifacts (
    job_id  TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
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
