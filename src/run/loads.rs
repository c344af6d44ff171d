//! What a job carried across runs, as its report shows it: the incremental
//! mark before and after, and the dropped files it took (tidepool's
//! addition to the run's answer; the Starfish Results contract is unchanged).

use serde::{Deserialize, Serialize};

/// A job's incremental mark in one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = highWater)]
#[serde(rename_all = "camelCase")]
pub struct HighWaterReport {
    /// The origin field the mark is taken from.
    pub field: String,
    /// The mark the run started from (none: the first run, or after a reset).
    pub before: Option<String>,
    /// The largest value among the rows that landed, or the mark before when none did.
    pub after: Option<String>,
    /// Whether `after` was kept for the next run (not on a failure or a preview).
    pub kept: bool,
}

/// What became of one dropped file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum FileStatus {
    /// All its rows were committed and it is recorded as processed.
    Processed,
    /// Read in a preview: nothing recorded, moved or deleted.
    Previewed,
    /// Not all its rows were committed (the job stopped, or a row window):
    /// the next run reads it again.
    Incomplete,
    /// It could not be read.
    Failed,
    /// Still being written (modified within the settle time): left for a later run.
    Waiting,
}

/// One dropped file of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = droppedFile)]
#[serde(rename_all = "camelCase")]
pub struct FileReport {
    /// The file's name in the drop folder.
    pub name: String,
    /// Rows read from it.
    pub rows: u64,
    /// What became of it.
    pub status: FileStatus,
    /// Where it was moved, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<String>,
    /// Why it failed, or why moving or deleting it did.
    pub error: Option<String>,
}

/// A job's incremental mark and dropped files in one run (in `GET /v1/Runs/{id}`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = jobLoad)]
#[serde(rename_all = "camelCase")]
pub struct JobLoad {
    /// The job.
    #[serde(rename = "jobID")]
    pub job_id: String,
    /// Its mark, if its origin is incremental.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_water: Option<HighWaterReport>,
    /// The files it took (or left waiting), if its origin is a file drop.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileReport>,
    /// Files past `max_files`, or already processed, that the run did not list.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub files_not_listed: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl JobLoad {
    /// Whether there is anything to show.
    pub fn is_empty(&self) -> bool {
        self.high_water.is_none() && self.files.is_empty() && self.files_not_listed == 0
    }
}
