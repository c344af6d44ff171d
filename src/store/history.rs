//! Run history for the console: the run list (filtered, newest first, paged
//! by cursor from an index), each run's log line by line, and its row errors.

use async_trait::async_trait;
use base64::Engine as _;
use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize};

use super::{NewRun, RunEnd, RunKey, StoreError, Submitted};
use crate::run::RunStatus;

/// Where a page of the run list starts: just after this run, in the order
/// (accepted time, instance, run ID), newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunCursor {
    /// The accepted time of the last run shown, in Unix milliseconds.
    pub accepted_ms: i64,
    /// Its instance.
    pub instance: String,
    /// Its run ID.
    pub run_id: String,
}

impl RunCursor {
    /// The opaque text a client sends back.
    pub fn encode(&self) -> String {
        let raw = format!("{}|{}|{}", self.accepted_ms, self.run_id, self.instance);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    }

    /// Reads what [`RunCursor::encode`] wrote; `None` for anything else.
    pub fn decode(text: &str) -> Option<Self> {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text.trim())
            .ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let mut parts = raw.splitn(3, '|');
        let accepted_ms = parts.next()?.parse().ok()?;
        let run_id = parts.next()?.to_owned();
        let instance = parts.next()?.to_owned();
        Some(RunCursor {
            accepted_ms,
            instance,
            run_id,
        })
    }
}

/// Which runs to list.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    /// The instances to look in; `None` for every instance (open mode).
    pub instances: Option<Vec<String>>,
    /// Only this project.
    pub project_id: Option<String>,
    /// Only runs whose first job is this.
    pub job_id: Option<String>,
    /// Only runs in this status.
    pub status: Option<RunStatus>,
    /// Accepted at or after.
    pub since: Option<DateTime<FixedOffset>>,
    /// Accepted at or before.
    pub until: Option<DateTime<FixedOffset>>,
    /// Text the argument contains (case-insensitive).
    pub text: Option<String>,
    /// Start after this run.
    pub after: Option<RunCursor>,
    /// At most this many.
    pub limit: usize,
}

/// A run as the list shows it.
#[derive(Debug, Clone)]
pub struct RunListed {
    /// Its key.
    pub key: RunKey,
    /// The project.
    pub project_id: String,
    /// The first job.
    pub job_id: String,
    /// Its status.
    pub status: RunStatus,
    /// When it was accepted.
    pub accepted_at: DateTime<FixedOffset>,
    /// When a worker took it.
    pub started_at: Option<DateTime<FixedOffset>>,
    /// When it ended.
    pub finished_at: Option<DateTime<FixedOffset>>,
    /// The job argument (its first 500 characters).
    pub argument: String,
    /// Per-job results (API-owned JSON), once running.
    pub results_json: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// Where the next page starts if this is the last run of a page.
    pub cursor: RunCursor,
}

/// One stored log line of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredLogLine {
    /// 1-based position in the run's log.
    pub seq: u64,
    /// When (ISO 8601).
    pub time: String,
    /// 1 = Low, 2 = Medium, 3 = High.
    pub level: u8,
    /// The job.
    pub job: String,
    /// The origin row, if about one.
    pub row: Option<u64>,
    /// What happened.
    pub message: String,
}

/// One stored row error of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRowError {
    /// 1-based position among the run's kept row errors.
    pub seq: u64,
    /// The job.
    pub job: String,
    /// The origin row.
    pub row: u64,
    /// The stage (1-based; 0 = reading the row or its batch).
    pub stage: usize,
    /// The stage's name, if the error is a stage's.
    pub stage_name: Option<String>,
    /// What went wrong.
    pub message: String,
    /// The row's origin values, by column.
    pub values: Vec<(String, String)>,
}

/// How many row errors a job had and how many were kept.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RowErrorTotals {
    /// Row errors counted.
    pub total: u64,
    /// Row errors kept (the rest were over the cap).
    pub kept: u64,
}

/// What a run left for the console to page through, saved when it ends.
#[derive(Debug, Clone, Default)]
pub struct RunDetails {
    /// The log, in order (`seq` is ignored and given anew).
    pub log: Vec<StoredLogLine>,
    /// The row errors kept, in order (`seq` is ignored and given anew).
    pub row_errors: Vec<StoredRowError>,
    /// Row errors counted over the jobs.
    pub totals: RowErrorTotals,
}

/// Run history: the list, logs and row errors.
#[async_trait]
pub trait RunHistory: Send + Sync + 'static {
    /// Runs matching `filter`, newest first, at most `filter.limit + 1` (one
    /// more than asked tells the caller a next page exists).
    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunListed>, StoreError>;
    /// Records a run that ran elsewhere (`tidepool run`) as ended, with its
    /// start time; it is never queued, so no worker takes it, and no webhook
    /// is sent. `Duplicate`/`Conflict` if its key is taken.
    async fn record_ended(
        &self,
        run: NewRun,
        started_at: DateTime<FixedOffset>,
        end: RunEnd,
    ) -> Result<Submitted, StoreError>;
    /// Saves a run's log lines and row errors (replacing any saved before).
    async fn save_details(&self, key: &RunKey, details: RunDetails) -> Result<(), StoreError>;
    /// Log lines after `after_seq`, at `max_level` or below, at most `limit`.
    async fn log_lines(
        &self,
        key: &RunKey,
        max_level: u8,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredLogLine>, StoreError>;
    /// Row errors after `after_seq`, at most `limit`, and the totals.
    async fn row_errors(
        &self,
        key: &RunKey,
        after_seq: u64,
        limit: usize,
    ) -> Result<(Vec<StoredRowError>, RowErrorTotals), StoreError>;
    /// Appends log lines of a Running run held under `epoch` while it goes,
    /// after those saved so far (`seq` is ignored and given anew, following
    /// on); false if the run is not held under `epoch` any more (nothing
    /// written; a store for one node may not check). [`RunHistory::save_details`]
    /// at the run's end replaces them.
    async fn append_log(
        &self,
        key: &RunKey,
        epoch: i64,
        lines: &[StoredLogLine],
    ) -> Result<bool, StoreError>;
}

/// Test bodies both stores run, each on a store its own module opens.
#[cfg(test)]
pub(crate) mod shared_tests {
    use super::*;
    use crate::store::Store;

    /// A time `ms` milliseconds after a fixed instant.
    pub(crate) fn at(ms: i64) -> DateTime<FixedOffset> {
        DateTime::from_timestamp_millis(1_790_000_000_000 + ms)
            .unwrap_or_default()
            .fixed_offset()
    }

    /// A run of `instance` with `argument`, accepted at `at(ms)`.
    pub(crate) fn run_of(instance: &str, argument: &str, ms: i64) -> NewRun {
        let key = RunKey {
            instance: instance.into(),
            run_id: uuid::Uuid::new_v4(),
        };
        NewRun {
            fingerprint: key.run_id.to_string(),
            key,
            project_id: "p".into(),
            job_id: "j".into(),
            request_json: serde_json::json!({ "argument": argument, "threadCount": 1 }).to_string(),
            webhook_url: None,
            accepted_at: at(ms),
        }
    }

    /// The runs of `instance` whose text holds `text`, `limit` a page.
    pub(crate) fn search(text: &str, instance: &str, limit: usize) -> RunFilter {
        RunFilter {
            instances: Some(vec![instance.into()]),
            text: Some(text.into()),
            limit,
            ..RunFilter::default()
        }
    }

    /// Every run `filter` finds, read a page of `filter.limit` at a time
    /// through the cursor.
    pub(crate) async fn all_pages<S: RunHistory>(store: &S, filter: &RunFilter) -> Vec<RunKey> {
        let mut f = filter.clone();
        let mut seen = Vec::new();
        loop {
            let page = store.list_runs(&f).await.unwrap();
            let more = page.len() > f.limit;
            seen.extend(page.iter().take(f.limit).map(|r| r.key.clone()));
            if !more {
                return seen;
            }
            f.after = Some(page[f.limit - 1].cursor.clone());
        }
    }

    /// Text search pages with a cursor, each match once and newest first,
    /// within a project too, and never beyond the caller's instances.
    pub(crate) async fn text_search_pages_with_a_cursor_and_keeps_to_its_instances<S>(store: &S)
    where
        S: Store + RunHistory,
    {
        let mut mine = Vec::new();
        for i in 0..30i64 {
            let arg = if i % 3 == 0 {
                "weekly summary"
            } else {
                "daily REPORT-x"
            };
            let mut run = run_of(if i % 5 == 0 { "other" } else { "default" }, arg, i);
            if i % 4 == 0 {
                run.project_id = "q".into();
            }
            if run.key.instance == "default" && i % 3 != 0 {
                mine.push((run.key.clone(), run.project_id.clone()));
            }
            store.submit(run).await.unwrap();
        }
        mine.reverse();
        let seen = all_pages(store, &search("y report", "default", 4)).await;
        let want: Vec<RunKey> = mine.iter().map(|(k, _)| k.clone()).collect();
        assert_eq!(seen, want, "every match once, newest first");
        let mut in_q = search("Y REPORT", "default", 50);
        in_q.project_id = Some("q".into());
        let found: Vec<RunKey> = store
            .list_runs(&in_q)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.key)
            .collect();
        let want: Vec<RunKey> = mine
            .iter()
            .filter(|(_, p)| p == "q")
            .map(|(k, _)| k.clone())
            .collect();
        assert!(!want.is_empty());
        assert_eq!(found, want);
        let nobody = RunFilter {
            instances: Some(Vec::new()),
            ..search("report", "default", 50)
        };
        assert!(store.list_runs(&nobody).await.unwrap().is_empty());
        let others = store
            .list_runs(&search("y rep", "other", 50))
            .await
            .unwrap();
        assert_eq!(others.len(), 4);
        assert!(others.iter().all(|r| r.key.instance == "other"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_reads_back_and_junk_does_not() {
        let c = RunCursor {
            accepted_ms: 1_700_000_000_123,
            instance: "acme|x".into(),
            run_id: "6f1c0a52-0000-4000-8000-000000000001".into(),
        };
        assert_eq!(RunCursor::decode(&c.encode()), Some(c));
        assert_eq!(RunCursor::decode("not a cursor"), None);
        assert_eq!(RunCursor::decode(""), None);
    }
}
