-- Version 4: retries of a run. A run waiting between two attempts is Queued
-- with a time before which no node claims it; its earlier attempts and where
-- the next one starts are kept with it (API-owned JSON).
ALTER TABLE runs ADD COLUMN IF NOT EXISTS not_before timestamptz;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS attempts text;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS retry_next text;
