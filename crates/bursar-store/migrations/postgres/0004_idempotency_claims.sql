-- The first use of an Idempotency-Key is claimed here before it is decided, so two
-- instances receiving it at once do not both make a hold (ARCHITECTURE.md, "Several
-- instances"). The instance that claims it decides; the others wait for its hold in the
-- ledger and answer it. A claim is released when its call is denied, and one older than
-- a minute without a hold (its instance died) can be taken over.
CREATE TABLE idempotency_claims (
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,
    instance UUID NOT NULL,
    claimed_at_ms BIGINT NOT NULL,
    PRIMARY KEY (tenant, key)
);
