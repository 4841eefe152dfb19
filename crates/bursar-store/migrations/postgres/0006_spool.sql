-- An instance's local spool (ARCHITECTURE.md, "The spool"): batch n of spool id lands
-- with its mark in one transaction, so a batch never lands twice, whenever the
-- instance dies.
CREATE TABLE spool_marks (
    spool uuid PRIMARY KEY,
    landed bigint NOT NULL
);

-- Names this database, so a spool lands only into the store it was written for.
CREATE TABLE store_identity (id text PRIMARY KEY);
INSERT INTO store_identity (id) VALUES (md5(random()::text || clock_timestamp()::text));
