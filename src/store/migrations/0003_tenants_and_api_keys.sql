-- Tenants and API keys. Every job and idempotency key belongs to a tenant (the one of the key that
-- submitted it). Rows written before belong to `default`, the tenant of `auth.mode = "none"` that every
-- call of those versions was: the same deployment without keys still finds its jobs and request ids, and
-- after switching to keys, keys of tenant `default` see them. Request ids are unique per tenant, so the
-- idempotency table is rebuilt with (tenant, request_id) as its key. API keys are stored as a digest of their secret, never in clear, named by a public prefix.
-- Portable SQL (SQLite and PostgreSQL): ADD COLUMN with a constant default, CREATE/DROP/RENAME TABLE.

ALTER TABLE jobs ADD COLUMN tenant TEXT NOT NULL DEFAULT '';
UPDATE jobs SET tenant = 'default';
CREATE INDEX jobs_tenant_created ON jobs (tenant, created_ms DESC, id DESC);

CREATE TABLE idempotency_by_tenant (
    tenant        TEXT NOT NULL DEFAULT '',
    request_id    TEXT NOT NULL,
    request_hash  TEXT NOT NULL,
    job_id        TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    PRIMARY KEY (tenant, request_id)
);
INSERT INTO idempotency_by_tenant (tenant, request_id, request_hash, job_id)
    SELECT 'default', request_id, request_hash, job_id FROM idempotency;
DROP TABLE idempotency;
ALTER TABLE idempotency_by_tenant RENAME TO idempotency;

CREATE TABLE api_keys (
    prefix      TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL,
    tenant      TEXT NOT NULL,
    role        TEXT NOT NULL,
    created_ms  BIGINT NOT NULL,
    expires_ms  BIGINT,
    revoked_ms  BIGINT
);
