-- Version 4: the dropped files each job has processed (file drops), by
-- name, size and modification time; a run records a file once all its rows
-- are committed, fenced by its lease like the other kept state.
CREATE TABLE IF NOT EXISTS processed_files (
  project      TEXT NOT NULL,
  job          TEXT NOT NULL,
  name         TEXT NOT NULL,
  size         BIGINT NOT NULL,
  modified_ns  BIGINT NOT NULL,
  processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (project, job, name)
);
