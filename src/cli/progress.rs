//! A progress line on a terminal (nothing when stderr is not one).

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tidepool::engine::{Counters, JobReport, RunObserver};
use tidepool::project::JobId;

/// Shows rows/s and the counters of the job that is running.
pub struct Progress {
    bar: Option<ProgressBar>,
    started: Mutex<Instant>,
}

impl Progress {
    /// A progress line, if `wanted` and stderr is a terminal.
    pub fn new(wanted: bool) -> Self {
        let bar = (wanted && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template("{spinner} {prefix} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        Progress {
            bar,
            started: Mutex::new(Instant::now()),
        }
    }

    /// Removes the line before the summary is printed.
    pub fn clear(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl RunObserver for Progress {
    fn job_started(&self, job: &JobId) {
        *self.started.lock().expect("progress lock") = Instant::now();
        if let Some(b) = &self.bar {
            b.set_prefix(job.0.clone());
            b.set_message("opening connections");
        }
    }

    fn progress(&self, _job: &JobId, c: &Counters) {
        if let Some(b) = &self.bar {
            let secs = self
                .started
                .lock()
                .expect("progress lock")
                .elapsed()
                .as_secs_f64();
            let rate = if secs > 0.0 {
                c.total_rows as f64 / secs
            } else {
                0.0
            };
            b.set_message(format!(
                "{} rows ({rate:.0} rows/s): {} ins, {} upd, {} del, {} err, {} skip, {} ign",
                c.total_rows, c.inserts, c.updates, c.deletes, c.errors, c.skips, c.ignores
            ));
        }
    }

    fn job_finished(&self, _report: &JobReport) {}
}
