//! MySQL and MariaDB: an origin that streams a query, a destination with all
//! five stage actions, set-based per batch.
//!
//! Inserts are multi-row `INSERT … VALUES (…), (…)`. The other actions load the
//! batch into a session-local staging table with the target's column types (so
//! the server converts and checks every value once), then find the matching
//! rows with one join and write with one `UPDATE … JOIN`, `DELETE … JOIN` or
//! `INSERT … SELECT`, so every row's outcome is exact. Match fields compare
//! with `<=>` (NULL matches NULL, as in SQLite). The session runs in strict
//! mode: a value that does not fit its column is an error, never a silent
//! truncation.

mod config;
mod destination;
mod origin;
mod types;

pub use config::MysqlConfig;

use super::sql_destination::SqlDestination;
use super::{
    ALL_ACTIONS, Capabilities, Connector, ConnectorError, Destination, DestinationRequest,
    Lookup, Origin, OriginInput, OriginRequest,
};

impl Connector for MysqlConfig {
    fn target(&self) -> super::Target<'_> {
        super::Target::Address(&self.url)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            actions: ALL_ACTIONS,
            origin: OriginInput::Query,
            needs_table: true,
            max_writers: None,
            batch_size: 5_000,
        }
    }

    fn open_origin(&self, req: &OriginRequest) -> Result<Box<dyn Origin>, ConnectorError> {
        origin::open(self, req)
    }

    fn open_lookup(&self, _base_dir: &std::path::Path) -> Result<Box<dyn Lookup>, ConnectorError> {
        origin::open_lookup(self)
    }

    fn open_destination(
        &self,
        req: &DestinationRequest,
    ) -> Result<Box<dyn Destination>, ConnectorError> {
        SqlDestination::<destination::MysqlSession>::open(self, req)
    }
}
