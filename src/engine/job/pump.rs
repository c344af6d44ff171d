//! The reader/writer pump: the reader thread reads the origin into batches,
//! the writer threads write them; the calling thread tells observers the
//! live counters until the writers are done.

use std::sync::atomic::Ordering;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::{PROGRESS_EVERY, RowState, Shared, Writer};
use crate::connector::{ConnectorError, Flow, Origin};
use crate::engine::{RunObserver, RunRequest};

/// How the pump ended: the origin's read, and the errors writers met finishing.
pub(super) struct Pumped {
    pub(super) read_result: Result<(), ConnectorError>,
    pub(super) finish_errors: Vec<String>,
    /// The first of the finishing errors means a connection was unreachable.
    pub(super) finish_unreachable: bool,
}

/// Reads the origin through the writers, one writer per thread.
pub(super) fn pump(
    shared: &Shared<'_>,
    origin: Box<dyn Origin>,
    writers: Vec<Writer>,
    req: &RunRequest,
    observer: &dyn RunObserver,
) -> Pumped {
    let (tx, rx) = crossbeam_channel::bounded::<Vec<RowState>>(writers.len() * 2);
    let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
    // Processed batches go back to the reader to be freed there: the rows were
    // allocated on its thread, and freeing them there keeps the writers free for
    // writing (cross-thread frees cost the writer a fifth of its time).
    let (trash_tx, trash_rx) = crossbeam_channel::unbounded::<Vec<RowState>>();
    std::thread::scope(|s| {
        let reader = s.spawn(move || read_rows(shared, origin, req, &tx, &trash_rx));
        let handles: Vec<_> = writers
            .into_iter()
            .map(|w| {
                let rx = rx.clone();
                let done = done_tx.clone();
                let trash = trash_tx.clone();
                s.spawn(move || write_batches(shared, w, &rx, done, &trash))
            })
            .collect();
        drop(rx);
        drop(done_tx);
        drop(trash_tx);
        while let Err(RecvTimeoutError::Timeout) = done_rx.recv_timeout(PROGRESS_EVERY) {
            observer.committed(&shared.job.id, shared.mark.next());
            observer.progress(&shared.job.id, &shared.counters.snapshot());
        }
        let read_result = reader
            .join()
            .unwrap_or_else(|_| Err(ConnectorError::Io("the reader thread panicked".into())));
        let mut finish_unreachable = None;
        let finish_errors: Vec<String> = handles
            .into_iter()
            .filter_map(|h| match h.join() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => {
                    finish_unreachable.get_or_insert(super::resume::is_unreachable(&e));
                    Some(e.to_string())
                }
                Err(_) => {
                    finish_unreachable.get_or_insert(false);
                    Some("a writer thread panicked".into())
                }
            })
            .collect();
        Pumped {
            read_result,
            finish_errors,
            finish_unreachable: finish_unreachable.unwrap_or(false),
        }
    })
}

/// The reader thread: reads the origin (from `begin_at_row`, up to
/// `end_after_row`) into batches for the writers, until the job stops.
fn read_rows(
    shared: &Shared<'_>,
    mut origin: Box<dyn Origin>,
    req: &RunRequest,
    tx: &Sender<Vec<RowState>>,
    trash_rx: &Receiver<Vec<RowState>>,
) -> Result<(), ConnectorError> {
    let begin = super::resume::first_row(shared.job, req);
    let (batch_size, end) = (shared.job.batch_size, req.end_after_row);
    // Script fields of stages mapped ahead run here, in the reader's own runtime.
    let js = shared.runtime().ok().flatten();
    let mut n: u64 = 0;
    let mut batch = Vec::with_capacity(batch_size);
    let mut stopped = false;
    let res = origin.read(&mut |r| {
        if shared.stopping() {
            stopped = true;
            return Flow::Stop;
        }
        n += 1;
        if n < begin {
            return Flow::Continue;
        }
        batch.push(shared.new_row(n, r, js.as_ref()));
        if batch.len() >= batch_size {
            trash_rx.try_iter().for_each(drop);
            if tx
                .send(std::mem::replace(
                    &mut batch,
                    Vec::with_capacity(batch_size),
                ))
                .is_err()
            {
                return Flow::Stop;
            }
        }
        if end.is_some_and(|e| n >= e) {
            Flow::Stop
        } else {
            Flow::Continue
        }
    });
    if !batch.is_empty() && !stopped {
        let _ = tx.send(batch);
    }
    shared.keep_return_value(js.as_ref());
    res
}

/// A writer thread: writes the batches it receives until the reader is done,
/// then finishes its connections. `done` is dropped when it has written all.
fn write_batches(
    shared: &Shared<'_>,
    mut w: Writer,
    rx: &Receiver<Vec<RowState>>,
    done: Sender<()>,
    trash: &Sender<Vec<RowState>>,
) -> Result<(), ConnectorError> {
    // A QuickJS runtime stays on its thread: one per writer.
    let js = match shared.runtime() {
        Ok(rt) => rt,
        Err(e) => {
            let mut h = shared.halted.lock().expect("halt lock");
            h.get_or_insert(e.to_string());
            shared.stop.store(true, Ordering::SeqCst);
            None
        }
    };
    for batch in rx.iter() {
        if shared.stopping() {
            continue; // drain, so the reader never blocks
        }
        let mut rows = batch;
        shared.process_batch(&mut w, js.as_ref(), &mut rows);
        let _ = trash.send(rows);
    }
    shared.keep_return_value(js.as_ref());
    drop(done);
    w.finish()
}
