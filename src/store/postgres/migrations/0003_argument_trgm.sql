-- Version 3: the run list's text search (`q`) through a trigram index on the
-- argument, lower-cased as the query writes it. pg_trgm ships with
-- PostgreSQL (contrib); where it is missing or the role may not create it,
-- the migration still succeeds without the index and searches scan.
DO $$
BEGIN
  CREATE EXTENSION IF NOT EXISTS pg_trgm;
EXCEPTION WHEN insufficient_privilege OR undefined_file OR feature_not_supported THEN
  RAISE WARNING 'pg_trgm is not available (%): the run list''s text search scans', SQLERRM;
END
$$;
DO $$
DECLARE
  ops text;
BEGIN
  SELECT format('%I.gin_trgm_ops', n.nspname) INTO ops
    FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
   WHERE e.extname = 'pg_trgm';
  IF ops IS NOT NULL THEN
    EXECUTE format('CREATE INDEX IF NOT EXISTS runs_argument_trgm ON runs USING gin (lower(argument) %s)', ops);
  END IF;
END
$$;
