//! Projects reloaded while the server runs (`POST /v1/Projects/reload`,
//! SIGHUP, or a change under the projects folder), and the projects that did
//! not load, with their problems, for the API to show.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::Service;
use crate::project::{DEFAULT_INSTANCE, LoadOptions, LoadOutcome, load_projects};

/// A project folder that did not load.
#[derive(Debug, Clone, PartialEq)]
pub struct FailedProject {
    /// Its ID as `project.toml` says it, or else the folder's name.
    pub id: String,
    /// Its instance as `project.toml` says it, or else the default one.
    pub instance: String,
    /// Its problems, `file:line: reason` as `tidepool validate` prints them.
    pub errors: Vec<String>,
}

impl Service {
    /// Loads the projects again and swaps them in at once: a run that has
    /// started keeps the version it started with; later runs get the new one.
    pub fn reload_projects(&self) -> Arc<LoadOutcome> {
        let loaded = Arc::new(load_projects(
            &self.config.projects,
            &LoadOptions {
                data_dir: std::path::absolute(&self.config.data_dir)
                    .unwrap_or(self.config.data_dir.clone()),
            },
        ));
        for p in &loaded.problems {
            tracing::warn!("project not loaded: {p}");
        }
        tracing::info!(
            "projects reloaded: {} loaded, {} problem(s)",
            loaded.projects.len(),
            loaded.problems.len()
        );
        *self.projects.write().expect("projects lock") = loaded.clone();
        loaded
    }

    /// The project folders that did not load, with their problems.
    pub fn failed_projects(&self) -> Vec<FailedProject> {
        failed_projects(&self.config.projects, &self.projects())
    }

    /// Reloads the projects whenever a file under the projects folder
    /// changes (checked every `every`), until the server stops.
    pub async fn watch_projects(self: Arc<Self>, every: Duration) {
        let mut seen = tree_stamp(&self.config.projects);
        loop {
            tokio::time::sleep(every).await;
            if self.is_stopping() {
                return;
            }
            let root = self.config.projects.clone();
            let now = tokio::task::spawn_blocking(move || tree_stamp(&root))
                .await
                .unwrap_or_default();
            if now != seen {
                seen = now;
                let svc = self.clone();
                let _ = tokio::task::spawn_blocking(move || svc.reload_projects()).await;
            }
        }
    }
}

/// Every file's path, size and modification time below `root` (bounded walk).
fn tree_stamp(root: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    const MAX_FILES: usize = 10_000;
    let mut out = Vec::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                dirs.push(e.path());
            } else if out.len() < MAX_FILES {
                out.push((e.path(), meta.len(), meta.modified().ok()));
            }
        }
    }
    out.sort();
    out
}

/// Groups the problems of a load by project folder (the first folder below `root`).
pub fn failed_projects(root: &Path, loaded: &LoadOutcome) -> Vec<FailedProject> {
    let mut out: Vec<(PathBuf, FailedProject)> = Vec::new();
    for p in &loaded.problems {
        let rel = p.file.strip_prefix(root).unwrap_or(&p.file);
        let Some(first) = rel.components().next() else {
            continue;
        };
        let dir = root.join(first);
        if !dir.is_dir() {
            continue;
        }
        match out.iter_mut().find(|(d, _)| *d == dir) {
            Some((_, f)) => f.errors.push(p.to_string()),
            None => {
                let (id, instance) = declared_ids(&dir);
                out.push((
                    dir,
                    FailedProject {
                        id,
                        instance,
                        errors: vec![p.to_string()],
                    },
                ));
            }
        }
    }
    out.into_iter().map(|(_, f)| f).collect()
}

/// The `id` and `instance` a project folder's `project.toml` declares, as far
/// as it can be read; else the folder's name and the default instance.
fn declared_ids(dir: &Path) -> (String, String) {
    let folder = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let table = std::fs::read_to_string(dir.join("project.toml"))
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok());
    let field = |name: &str| {
        table
            .as_ref()
            .and_then(|t| t.get(name))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    (
        field("id").unwrap_or(folder),
        field("instance").unwrap_or_else(|| DEFAULT_INSTANCE.to_owned()),
    )
}
