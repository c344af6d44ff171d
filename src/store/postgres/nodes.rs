//! The nodes of the cluster, as their heartbeats left them (by the store's clock).

use super::{PostgresStore, local};
use crate::store::{NodeInfo, NodeRecord, StoreError};

impl PostgresStore {
    pub(super) async fn heartbeat_pg(&self, node: &NodeInfo) -> Result<(), StoreError> {
        let conn = self.conn().await?;
        let running = i32::try_from(node.running).unwrap_or(i32::MAX);
        let workers = i32::try_from(node.workers).unwrap_or(i32::MAX);
        conn.execute(
            &conn.prepare_cached("INSERT INTO nodes (node_id, address, version, started_at, heartbeat_at, running,
               workers, draining, stopped)
             VALUES ($1, $2, $3, $4, now(), $5, $6, $7, false)
             ON CONFLICT (node_id) DO UPDATE SET address = excluded.address,
               version = excluded.version, started_at = excluded.started_at,
               heartbeat_at = now(), running = excluded.running, workers = excluded.workers,
               draining = excluded.draining, stopped = false").await?,
            &[
                &node.node_id,
                &node.address,
                &node.version,
                &node.started_at,
                &running,
                &workers,
                &node.draining,
            ],
        )
        .await?;
        Ok(())
    }

    pub(super) async fn node_stopped_pg(&self, node_id: &str) -> Result<(), StoreError> {
        let conn = self.conn().await?;
        conn.execute(
            &conn
                .prepare_cached("UPDATE nodes SET stopped = true WHERE node_id = $1")
                .await?,
            &[&node_id],
        )
        .await?;
        Ok(())
    }

    pub(super) async fn forget_nodes_pg(
        &self,
        silent_for: std::time::Duration,
    ) -> Result<u64, StoreError> {
        let conn = self.conn().await?;
        let n = conn
            .execute(
                "DELETE FROM nodes WHERE heartbeat_at < now() - make_interval(secs => $1)",
                &[&silent_for.as_secs_f64()],
            )
            .await?;
        Ok(n)
    }

    pub(super) async fn nodes_pg(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                &conn
                    .prepare_cached(
                        "SELECT node_id, address, version, started_at, running, workers, draining,
                   heartbeat_at, extract(epoch FROM now() - heartbeat_at)::float8, stopped
                 FROM nodes ORDER BY node_id",
                    )
                    .await?,
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| NodeRecord {
                info: NodeInfo {
                    node_id: r.get(0),
                    address: r.get(1),
                    version: r.get(2),
                    started_at: local(r.get(3)),
                    running: r.get::<_, i32>(4).max(0) as u32,
                    workers: r.get::<_, i32>(5).max(0) as u32,
                    draining: r.get(6),
                },
                heartbeat_at: local(r.get(7)),
                silent_secs: r.get(8),
                stopped: r.get(9),
            })
            .collect())
    }
}
