-- Version 2: the nodes of a cluster, and the index takeovers scan.
CREATE TABLE nodes (
  node_id      text PRIMARY KEY,
  address      text NOT NULL,
  version      text NOT NULL,
  started_at   timestamptz NOT NULL,
  heartbeat_at timestamptz NOT NULL,
  running      int NOT NULL DEFAULT 0,
  workers      int NOT NULL DEFAULT 0,
  draining     bool NOT NULL DEFAULT false,
  stopped      bool NOT NULL DEFAULT false
);
CREATE INDEX runs_leases ON runs (lease_until) WHERE status = 'Running';
