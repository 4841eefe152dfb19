-- Several instances on one database (ARCHITECTURE.md, "Several instances").

-- Every instance (process) that ever served the database. A live one holds a session
-- advisory lock on its id; one found without it is closed, and its writer, should it
-- come back, fails closed.
CREATE TABLE instances (
    id UUID PRIMARY KEY,
    started_at_ms BIGINT NOT NULL,
    closed BOOLEAN NOT NULL DEFAULT FALSE
);

-- Per bucket and instance: the lease granted (net of what was given back), changed only
-- under the bucket's advisory lock ...
CREATE TABLE leases (
    bucket TEXT NOT NULL,
    instance UUID NOT NULL,
    amount BIGINT NOT NULL,
    PRIMARY KEY (bucket, instance)
);
-- ... and the use (held + spent) of the entries that instance wrote, changed only by its
-- writer, in the same transaction as the entries. A live instance may still add at most
-- amount - used.
CREATE TABLE lease_use (
    bucket TEXT NOT NULL,
    instance UUID NOT NULL,
    used BIGINT NOT NULL,
    PRIMARY KEY (bucket, instance)
);

-- Holds not finished yet. Finishing one (settle, void, expire) first claims its row
-- (claimed_by: the instance): whichever instance claims it finishes it, exactly once.
-- The row goes with the commit of the finish entry; the claim of an instance that died
-- before that commit can be taken again.
CREATE TABLE open_holds (
    auth UUID PRIMARY KEY,
    claimed_by UUID
);
INSERT INTO open_holds (auth)
SELECT h.auth FROM ledger h
WHERE h.kind = 1
  AND NOT EXISTS (SELECT 1 FROM ledger f WHERE f.auth = h.auth AND f.kind IN (2, 4, 5));
