//! Progress lines on a terminal (nothing when stderr is not one): one per
//! running job, since the jobs of a graph may run at once.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tidepool::engine::{Counters, JobReport, RunObserver};
use tidepool::project::JobId;

/// Shows rows/s and the counters of each job that is running.
pub struct Progress {
    lines: Option<MultiProgress>,
    /// Each running job's line and when it started.
    jobs: Mutex<HashMap<JobId, (ProgressBar, Instant)>>,
}

impl Progress {
    /// Progress lines, if `wanted` and stderr is a terminal.
    pub fn new(wanted: bool) -> Self {
        Progress {
            lines: (wanted && std::io::stderr().is_terminal()).then(MultiProgress::new),
            jobs: Mutex::new(HashMap::new()),
        }
    }

    /// Removes the lines before the summary is printed.
    pub fn clear(&self) {
        for (_, (bar, _)) in self.jobs.lock().expect("progress lock").drain() {
            bar.finish_and_clear();
        }
        if let Some(lines) = &self.lines {
            let _ = lines.clear();
        }
    }
}

impl RunObserver for Progress {
    fn job_started(&self, job: &JobId) {
        let Some(lines) = &self.lines else { return };
        let bar = lines.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        bar.set_prefix(job.0.clone());
        bar.set_message("opening connections");
        self.jobs
            .lock()
            .expect("progress lock")
            .insert(job.clone(), (bar, Instant::now()));
    }

    fn progress(&self, job: &JobId, c: &Counters) {
        let jobs = self.jobs.lock().expect("progress lock");
        let Some((bar, started)) = jobs.get(job) else {
            return;
        };
        let secs = started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            c.total_rows as f64 / secs
        } else {
            0.0
        };
        bar.set_message(format!(
            "{} rows ({rate:.0} rows/s): {} ins, {} upd, {} del, {} err, {} skip, {} ign",
            c.total_rows, c.inserts, c.updates, c.deletes, c.errors, c.skips, c.ignores
        ));
    }

    fn job_finished(&self, report: &JobReport) {
        // The job's line goes; the summary after the run lists every job.
        if let Some((bar, _)) = self
            .jobs
            .lock()
            .expect("progress lock")
            .remove(&report.job_id)
        {
            bar.finish_and_clear();
        }
    }
}
