//! What the store keeps for retries of a run: the attempts it made before
//! the current one, and where the next attempt starts (both API-owned JSON).

use std::time::Duration;

/// A run put back in the queue as its next attempt.
#[derive(Debug, Clone)]
pub struct RetryLater {
    /// The run is not claimed before this much time has passed (by the store's clock).
    pub wait: Duration,
    /// Every attempt made so far, the one that just ended included (API-owned JSON).
    pub attempts_json: String,
    /// Where the next attempt starts (API-owned JSON).
    pub next_json: String,
}

/// A run's retry record.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RetryState {
    /// The attempts made before the current one (API-owned JSON); None: none.
    pub attempts_json: Option<String>,
    /// Where the next (or current) attempt starts (API-owned JSON); None: the request's start.
    pub next_json: Option<String>,
}
