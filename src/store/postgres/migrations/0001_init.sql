-- tidepool's PostgreSQL store, version 1: runs, the webhook outbox, users,
-- run history, kept job state.
CREATE TABLE runs (
  instance         text NOT NULL,
  run_id           uuid NOT NULL,
  project_id       text NOT NULL,
  job_id           text NOT NULL,
  request          text NOT NULL,
  argument         text NOT NULL DEFAULT '',
  fingerprint      text NOT NULL,
  webhook_url      text,
  status           text NOT NULL,
  accepted_at      timestamptz NOT NULL,
  accepted_ms      bigint NOT NULL,
  started_at       timestamptz,
  finished_at      timestamptz,
  results          text,
  response         text,
  error            text,
  lease_epoch      bigint NOT NULL DEFAULT 0,
  lease_until      timestamptz,
  node_id          text,
  requeues         int NOT NULL DEFAULT 0,
  cancel_requested bool NOT NULL DEFAULT false,
  PRIMARY KEY (instance, run_id)
);
CREATE INDEX runs_queue ON runs (accepted_ms, run_id) WHERE status = 'Queued';
CREATE INDEX runs_running ON runs (instance, project_id, job_id) WHERE status = 'Running';
CREATE INDEX runs_ended ON runs (finished_at) WHERE status IN ('Complete', 'Failed', 'Cancelled');
CREATE INDEX runs_recent_all ON runs (accepted_ms, instance, run_id);
CREATE INDEX runs_recent ON runs (instance, accepted_ms, run_id);
CREATE INDEX runs_recent_status ON runs (instance, status, accepted_ms, run_id);
CREATE INDEX runs_recent_project ON runs (instance, project_id, accepted_ms, run_id);
CREATE INDEX runs_recent_job ON runs (instance, project_id, job_id, accepted_ms, run_id);

CREATE TABLE webhooks (
  instance        text NOT NULL,
  run_id          uuid NOT NULL,
  url             text NOT NULL,
  body            text NOT NULL,
  created_at      timestamptz NOT NULL,
  next_attempt_at timestamptz,
  attempts        int NOT NULL DEFAULT 0,
  state           text NOT NULL DEFAULT 'pending',
  claimed_until   timestamptz,
  PRIMARY KEY (instance, run_id)
);
CREATE INDEX webhooks_due ON webhooks (next_attempt_at) WHERE state = 'pending';
CREATE TABLE webhook_attempts (
  instance    text NOT NULL,
  run_id      uuid NOT NULL,
  attempt     int NOT NULL,
  at          timestamptz NOT NULL,
  status_code int,
  error       text,
  PRIMARY KEY (instance, run_id, attempt)
);

CREATE TABLE users (
  name             text PRIMARY KEY,
  password_hash    text NOT NULL,
  primary_instance text NOT NULL,
  grants           text NOT NULL
);
CREATE TABLE api_keys (
  key_hash  text PRIMARY KEY,
  user_name text NOT NULL,
  label     text NOT NULL
);
CREATE INDEX api_keys_by_user ON api_keys (user_name);
CREATE TABLE tokens (
  token_hash text PRIMARY KEY,
  user_name  text NOT NULL,
  expires_at timestamptz NOT NULL
);
CREATE INDEX tokens_by_user ON tokens (user_name);

CREATE TABLE run_log (
  instance text NOT NULL,
  run_id   uuid NOT NULL,
  seq      bigint NOT NULL,
  time     text NOT NULL,
  level    smallint NOT NULL,
  job      text NOT NULL,
  row_no   bigint,
  message  text NOT NULL,
  PRIMARY KEY (instance, run_id, seq)
);
CREATE TABLE run_row_errors (
  instance   text NOT NULL,
  run_id     uuid NOT NULL,
  seq        bigint NOT NULL,
  job        text NOT NULL,
  row_no     bigint NOT NULL,
  stage      bigint NOT NULL,
  stage_name text,
  message    text NOT NULL,
  origin     text NOT NULL,
  PRIMARY KEY (instance, run_id, seq)
);
CREATE TABLE run_error_totals (
  instance text NOT NULL,
  run_id   uuid NOT NULL,
  total    bigint NOT NULL,
  kept     bigint NOT NULL,
  PRIMARY KEY (instance, run_id)
);

CREATE TABLE job_variables (
  project text NOT NULL,
  job     text NOT NULL,
  name    text NOT NULL,
  value   text,
  PRIMARY KEY (project, job, name)
);
CREATE TABLE xref (
  project text NOT NULL,
  list    text NOT NULL,
  key     text NOT NULL,
  value   text NOT NULL,
  PRIMARY KEY (project, list, key)
);
