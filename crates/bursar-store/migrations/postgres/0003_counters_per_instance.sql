-- Counters per bucket and instance (ARCHITECTURE.md, "Several instances"): each
-- instance's writer adds to its own rows only, so batches of different instances never
-- wait on each other's counter rows, and a bucket's use is the sum of its rows. An
-- instance's row is also its use for the leases (it replaces lease_use). Rows written
-- before this migration keep the nil instance, which is never a live one.
ALTER TABLE counters ADD COLUMN instance UUID NOT NULL DEFAULT '00000000-0000-0000-0000-000000000000';
ALTER TABLE counters DROP CONSTRAINT counters_pkey;
ALTER TABLE counters ADD PRIMARY KEY (bucket, instance);
ALTER TABLE counters ALTER COLUMN instance DROP DEFAULT;
DROP TABLE lease_use;
