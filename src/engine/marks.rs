//! Resetting a job's incremental mark: its next run reads everything again.

use std::sync::Arc;

use super::state::{JobState, KeptState, StateError};
use crate::project::Project;
use crate::project::incremental::{HIGH_WATER, HIGH_WATER_TYPE};

/// Why a job's mark cannot be reset.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    /// The project has no such job.
    #[error("project {project:?} has no job {job:?}")]
    UnknownJob {
        /// The project.
        project: String,
        /// The job asked for.
        job: String,
    },
    /// The job's origin keeps no mark.
    #[error("job {0:?} has no incremental origin (origin.incremental)")]
    NotIncremental(String),
    /// The kept state cannot be read or written.
    #[error("the job's kept state: {0}")]
    State(#[from] StateError),
}

/// Forgets the mark of `job` (matched ignoring case) in `kept`, or (None) in
/// the project's data dir's `state.sqlite`; the mark it had, if any.
pub fn reset_incremental(
    project: &Project,
    job: &str,
    kept: Option<Arc<dyn KeptState>>,
) -> Result<Option<String>, ResetError> {
    let found = project
        .jobs
        .values()
        .find(|j| j.id.0.eq_ignore_ascii_case(job))
        .ok_or_else(|| ResetError::UnknownJob {
            project: project.id.0.clone(),
            job: job.to_owned(),
        })?;
    if found.origin.incremental.is_none() {
        return Err(ResetError::NotIncremental(found.id.0.clone()));
    }
    let kept: Arc<dyn KeptState> = match kept {
        Some(k) => k,
        None => Arc::new(JobState::open(&project.data_dir)?),
    };
    let before = kept
        .load(&project.id.0, &found.id.0)?
        .remove(HIGH_WATER)
        .filter(|m| !m.is_empty());
    kept.forget(&project.id.0, &found.id.0, &[HIGH_WATER, HIGH_WATER_TYPE])?;
    Ok(before)
}
