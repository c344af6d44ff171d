//! PostgreSQL: an origin that streams a query, a destination with all five
//! stage actions, set-based per batch.
//!
//! Inserts go through `COPY … FROM STDIN`. The other actions copy the batch
//! into a session-local staging table and run one statement per action over
//! it (`UPDATE … FROM`, `DELETE … USING`, `INSERT … SELECT`), each returning
//! the staging row numbers it touched, so every row's outcome is exact. Values
//! travel as text and the server converts them to each column's type, so
//! numerics stay exact and dates keep their zones; a value that does not fit
//! its column fails the batch, which the engine then replays row by row.
//! An update whose values equal the row's (as text) still counts as an update
//! but is not rewritten when the table has nothing (trigger, rule, policy,
//! child, publication) that would see the difference. Where a unique index
//! is exactly the match columns, an upsert batch after one that matched
//! nothing is first tried as a plain `COPY` (in a savepoint; a broken key
//! means something matched, and the batch goes the full way).

mod config;
mod destination;
mod origin;
mod types;

pub use config::PostgresConfig;

use super::sql_destination::SqlDestination;
use super::{
    ALL_ACTIONS, Capabilities, Connector, ConnectorError, Destination, DestinationRequest,
    Lookup, Origin, OriginInput, OriginRequest,
};

impl Connector for PostgresConfig {
    fn target(&self) -> super::Target<'_> {
        super::Target::Address(&self.url)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            actions: ALL_ACTIONS,
            origin: OriginInput::Query,
            needs_table: true,
            max_writers: None,
            batch_size: 10_000,
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
        SqlDestination::<destination::PostgresSession>::open(self, req)
    }
}
