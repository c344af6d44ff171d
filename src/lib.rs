#![warn(missing_docs)]
//! tidepool: a data-integration job server.
//!
//! A project folder defines connections and jobs ([`project`]); a run reads
//! rows from an origin, maps them and writes them through ordered stages into
//! a destination ([`engine`]); each kind of connection is one file in
//! [`connector`]. What a run is made of as it is submitted, recorded and
//! answered (request, per-job results, answer, status) is plain data in
//! [`run`]. The binary's `run` and `validate` commands live in `cli`.

pub mod api;
pub mod connector;
pub mod engine;
pub mod project;
pub mod run;
pub mod script;
pub mod server;
pub mod store;
pub mod template;
pub mod value;

pub use engine::{
    CancelToken, Counters, JobReport, LogLevel, RunId, RunObserver, RunReport, RunRequest,
    RunStatus,
};
pub use project::{LoadOptions, Project, load_projects};
