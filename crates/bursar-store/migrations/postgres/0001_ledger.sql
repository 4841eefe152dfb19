-- Bursar's PostgreSQL store: the same ledger, counters, alerts and catalog as the
-- embedded SQLite store, shared by every instance. The ledger is one hash chain: a
-- writer takes the chain head's row lock once per batch, so entries of all instances
-- are in one total order and `bursar ledger verify` checks them all.

CREATE TABLE dict (
    id BIGSERIAL PRIMARY KEY,
    text TEXT NOT NULL UNIQUE
);

CREATE TABLE chain_head (
    only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
    seq BIGINT NOT NULL,
    hash BYTEA NOT NULL
);
INSERT INTO chain_head (only_row, seq, hash) VALUES (TRUE, 0, decode(repeat('00', 32), 'hex'));

CREATE TABLE ledger (
    seq BIGINT PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    kind SMALLINT NOT NULL,
    auth UUID NOT NULL,
    tenant BIGINT NOT NULL,
    key_id UUID,
    held BIGINT NOT NULL,
    cost BIGINT NOT NULL,
    charge BIGINT NOT NULL,
    model_req BIGINT,
    model_used BIGINT,
    price_version BIGINT,
    in_tok BIGINT NOT NULL,
    cached_tok BIGINT NOT NULL,
    out_tok BIGINT NOT NULL,
    quantity BIGINT NOT NULL,
    latency_ms BIGINT,
    flags INTEGER NOT NULL,
    -- The hold's buckets, tags and idempotency data (compact JSON), on hold entries only.
    detail TEXT,
    -- The hold's Idempotency-Key, to find it once an engine has forgotten it.
    idem TEXT,
    hash BYTEA NOT NULL
);
CREATE INDEX ledger_auth ON ledger (auth);
CREATE INDEX ledger_idempotency ON ledger (tenant, idem) WHERE idem IS NOT NULL;
CREATE INDEX ledger_tenant_at ON ledger (tenant, at_ms);

CREATE TABLE counters (
    bucket TEXT PRIMARY KEY,
    held BIGINT NOT NULL,
    spent BIGINT NOT NULL
);

CREATE TABLE alerts (
    id BIGSERIAL PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    tenant TEXT,
    bucket TEXT NOT NULL,
    level TEXT NOT NULL,
    reason TEXT NOT NULL,
    limit_nanos BIGINT NOT NULL,
    used_nanos BIGINT NOT NULL
);
CREATE INDEX alerts_tenant ON alerts (tenant, id);

CREATE TABLE catalog (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (kind, id)
);
