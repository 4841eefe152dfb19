-- A threshold alerts once per bucket and level, whichever instance sees it crossed
-- first (instances judge levels on the use of all of them; ARCHITECTURE.md, "Several
-- instances"). Duplicates raised before are kept once, the first.
DELETE FROM alerts a USING alerts b
WHERE a.reason = 'threshold' AND b.reason = 'threshold'
  AND a.bucket = b.bucket AND a.level = b.level AND a.id > b.id;
CREATE UNIQUE INDEX alerts_once ON alerts (bucket, level) WHERE reason = 'threshold';
