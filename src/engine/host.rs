//! What a job's scripts reach outside themselves: the project's cross-reference
//! lists and lookups against its connections, shared by the run's threads.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::state::{KeptState, StateError};
use crate::connector::{ConnectionConfig, ConnectorError, Lookup};
use crate::project::Project;
use crate::script::{self, ScriptHost};
use crate::value::Value;

/// Cross-reference writes kept in memory before they go to the kept state.
const XREF_FLUSH_EVERY: usize = 10_000;
/// Lookup answers cached per run; past this the cache starts again.
const LOOKUP_CACHE_MAX: usize = 1_000_000;
/// Cross-reference entries a run keeps in memory after reading or keeping them.
const XREF_CACHE_MAX: usize = 100_000;

/// Why a script's `xrefRead`, `xrefWrite` or `lookup` failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RunHostError {
    /// A thread panicked while it held the lists or the lookups.
    #[error("the {0} lock is poisoned")]
    Poisoned(&'static str),
    /// The state file that keeps the cross-reference lists failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// `lookup` named a connection the project does not have.
    #[error("the project has no connection {name:?}; it has: {known}")]
    NoConnection {
        /// The connection asked for.
        name: String,
        /// The project's connections, comma-separated.
        known: String,
    },
    /// The lookup's connection cannot be opened.
    #[error("connection {name:?}: {source}")]
    Open {
        /// The connection.
        name: String,
        /// Why it cannot be opened.
        source: ConnectorError,
    },
    /// The lookup's query failed.
    #[error(transparent)]
    Lookup(ConnectorError),
}

/// A job run's [`ScriptHost`].
pub(crate) struct RunHost {
    project: String,
    base_dir: PathBuf,
    connections: BTreeMap<String, ConnectionConfig>,
    preview: bool,
    xref: Mutex<Xref>,
    lookups: Mutex<Lookups>,
}

#[derive(Default)]
struct Xref {
    /// The run's kept state; `None` when it cannot be opened (then lists live for the run only).
    state: Option<Arc<dyn KeptState>>,
    /// Written by this run, not yet kept.
    pending: HashMap<(String, String), String>,
    /// Read from the kept state by this run.
    read: HashMap<(String, String), Option<String>>,
}

#[derive(Default)]
struct Lookups {
    open: HashMap<String, Box<dyn Lookup>>,
    cache: HashMap<String, Value>,
    calls: u64,
    cached: u64,
}

impl RunHost {
    /// A host for one job run of `project`, keeping xref lists in `state`;
    /// in preview nothing is kept. Without a state, lists live for the run only.
    pub(crate) fn new(
        project: &Project,
        preview: bool,
        state: Option<&Arc<dyn KeptState>>,
    ) -> Self {
        let state = state.cloned();
        RunHost {
            project: project.id.0.clone(),
            base_dir: project.dir.clone(),
            connections: project.connections.clone(),
            preview,
            xref: Mutex::new(Xref {
                state,
                ..Xref::default()
            }),
            lookups: Mutex::default(),
        }
    }

    /// Keeps this run's cross-reference writes (nothing in preview).
    pub(crate) fn flush(&self) -> Result<(), RunHostError> {
        let mut x = self
            .xref
            .lock()
            .map_err(|_| RunHostError::Poisoned("xref"))?;
        Self::flush_locked(&self.project, self.preview, &mut x)
    }

    fn flush_locked(project: &str, preview: bool, x: &mut Xref) -> Result<(), RunHostError> {
        if preview || x.pending.is_empty() {
            return Ok(());
        }
        let Some(state) = x.state.as_ref() else {
            return Ok(());
        };
        let entries: Vec<(&str, &str, &str)> = x
            .pending
            .iter()
            .map(|((l, k), v)| (l.as_str(), k.as_str(), v.as_str()))
            .collect();
        state.xref_put(project, &entries)?;
        let pending = std::mem::take(&mut x.pending);
        if x.read.len() + pending.len() > XREF_CACHE_MAX {
            x.read.clear();
        }
        if pending.len() <= XREF_CACHE_MAX {
            for (k, v) in pending {
                x.read.insert(k, Some(v));
            }
        }
        Ok(())
    }

    /// Lookups made and answered from the cache, for the log.
    pub(crate) fn lookup_stats(&self) -> (u64, u64) {
        self.lookups
            .lock()
            .map(|l| (l.calls, l.cached))
            .unwrap_or_default()
    }

    fn open_lookup(&self, connection: &str) -> Result<Box<dyn Lookup>, RunHostError> {
        let conn = self
            .connections
            .get(connection)
            .ok_or_else(|| RunHostError::NoConnection {
                name: connection.to_owned(),
                known: self
                    .connections
                    .keys()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        conn.connector()
            .open_lookup(&self.base_dir)
            .map_err(|source| RunHostError::Open {
                name: connection.to_owned(),
                source,
            })
    }
}

impl ScriptHost for RunHost {
    fn xref_read(&self, list: &str, key: &str) -> Result<Option<String>, script::HostError> {
        let mut x = self
            .xref
            .lock()
            .map_err(|_| RunHostError::Poisoned("xref"))?;
        let k = (list.to_owned(), key.to_owned());
        if let Some(v) = x.pending.get(&k) {
            return Ok(Some(v.clone()));
        }
        if let Some(v) = x.read.get(&k) {
            return Ok(v.clone());
        }
        let v = match &x.state {
            Some(s) => s
                .xref_get(&self.project, list, key)
                .map_err(RunHostError::from)?,
            None => None,
        };
        if x.read.len() >= XREF_CACHE_MAX {
            x.read.clear();
        }
        x.read.insert(k, v.clone());
        Ok(v)
    }

    fn xref_write(&self, list: &str, key: &str, value: &str) -> Result<(), script::HostError> {
        let mut x = self
            .xref
            .lock()
            .map_err(|_| RunHostError::Poisoned("xref"))?;
        x.pending
            .insert((list.to_owned(), key.to_owned()), value.to_owned());
        if x.pending.len() >= XREF_FLUSH_EVERY {
            Self::flush_locked(&self.project, self.preview, &mut x)?;
        }
        Ok(())
    }

    fn lookup(
        &self,
        connection: &str,
        table: &str,
        field: &str,
        criteria: &[(String, Value)],
    ) -> Result<Value, script::HostError> {
        let mut key = format!("{connection}\u{1f}{table}\u{1f}{field}");
        for (k, v) in criteria {
            key.push('\u{1f}');
            key.push_str(k);
            key.push('=');
            match v {
                Value::Null => key.push('\u{0}'),
                v => v.push_text(&mut key),
            }
        }
        let mut l = self
            .lookups
            .lock()
            .map_err(|_| RunHostError::Poisoned("lookup"))?;
        l.calls += 1;
        if let Some(v) = l.cache.get(&key) {
            let v = v.clone();
            l.cached += 1;
            return Ok(v);
        }
        // A connection lost between lookups is opened again once.
        let mut attempt = 0;
        let found = loop {
            if !l.open.contains_key(connection) {
                let opened = self.open_lookup(connection)?;
                l.open.insert(connection.to_owned(), opened);
            }
            let lk = l.open.get_mut(connection).expect("opened above");
            match lk.find(table, field, criteria) {
                Err(ConnectorError::Lost(e)) if attempt == 0 => {
                    attempt += 1;
                    l.open.remove(connection);
                    tracing::debug!("lookup connection {connection:?} lost ({e}); reopening");
                }
                Err(e) => return Err(RunHostError::Lookup(e).into()),
                Ok(v) => break v.unwrap_or(Value::Null),
            }
        };
        if l.cache.len() >= LOOKUP_CACHE_MAX {
            l.cache.clear();
        }
        l.cache.insert(key, found.clone());
        Ok(found)
    }
}
