-- Version 4: schedules' pause state and the ticks they fired. A tick is
-- unique per schedule and fire time across every node; its run is queued in
-- the same transaction.
CREATE TABLE schedules (
  instance   text NOT NULL,
  project_id text NOT NULL,
  job_id     text NOT NULL,
  name       text NOT NULL,
  paused     bool NOT NULL DEFAULT false,
  since      timestamptz NOT NULL,
  last_tick  timestamptz,
  PRIMARY KEY (instance, project_id, job_id, name)
);
CREATE TABLE schedule_ticks (
  instance    text NOT NULL,
  project_id  text NOT NULL,
  job_id      text NOT NULL,
  name        text NOT NULL,
  tick_at     timestamptz NOT NULL,
  outcome     text NOT NULL,
  run_id      uuid,
  covers      bigint NOT NULL,
  first_tick  timestamptz NOT NULL,
  catch_up    bool NOT NULL,
  reason      text,
  node_id     text,
  recorded_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (instance, project_id, job_id, name, tick_at)
);
CREATE INDEX schedule_ticks_run ON schedule_ticks (instance, run_id) WHERE run_id IS NOT NULL;
