//! A job's `retry = { attempts = 3, wait_secs = 30, backoff = 2.0 }`: how a
//! run that failed because a connection could not be reached is run again.

use std::time::Duration;

use serde::Deserialize;

/// The most attempts a job's `retry` may ask for.
pub const MAX_ATTEMPTS: u32 = 20;
/// The longest wait `wait_secs` may ask for (a day).
pub const MAX_WAIT_SECS: f64 = 86_400.0;
/// The largest `backoff` factor.
pub const MAX_BACKOFF: f64 = 10.0;

/// How a run of the job is tried again after it fails for a job-level,
/// transient reason (a connection unreachable or lost past its batch retries).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Tries in all, the first one included (`attempts = 3`: the first try
    /// and up to two more); 1 to [`MAX_ATTEMPTS`].
    pub attempts: u32,
    /// The wait before the second try.
    pub wait: Duration,
    /// Each later wait is the one before times this (1 to [`MAX_BACKOFF`]).
    pub backoff: f64,
}

impl RetryPolicy {
    /// The wait before try `next` (2 for the first retry): `wait_secs ×
    /// backoff^(next-2)`, at most a day.
    pub fn wait_before(&self, next: u32) -> Duration {
        let factor = self.backoff.powi(next.saturating_sub(2).min(64) as i32);
        let secs = (self.wait.as_secs_f64() * factor).min(MAX_WAIT_SECS);
        Duration::from_secs_f64(secs)
    }
}

/// `retry = { … }` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetry {
    attempts: u32,
    #[serde(default)]
    wait_secs: Option<f64>,
    #[serde(default)]
    backoff: Option<f64>,
}

impl RawRetry {
    /// The policy, or what is wrong with it.
    pub(crate) fn check(&self) -> Result<RetryPolicy, String> {
        if self.attempts == 0 || self.attempts > MAX_ATTEMPTS {
            return Err(format!(
                "retry.attempts must be 1 to {MAX_ATTEMPTS} (tries in all, the first included)"
            ));
        }
        let wait = self.wait_secs.unwrap_or(30.0);
        if !(wait.is_finite() && (0.0..=MAX_WAIT_SECS).contains(&wait)) {
            return Err(format!("retry.wait_secs must be 0 to {MAX_WAIT_SECS}"));
        }
        let backoff = self.backoff.unwrap_or(2.0);
        if !(backoff.is_finite() && (1.0..=MAX_BACKOFF).contains(&backoff)) {
            return Err(format!("retry.backoff must be 1.0 to {MAX_BACKOFF}"));
        }
        Ok(RetryPolicy {
            attempts: self.attempts,
            wait: Duration::from_secs_f64(wait),
            backoff,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(t: &str) -> Result<RetryPolicy, String> {
        #[derive(Deserialize)]
        struct Doc {
            retry: RawRetry,
        }
        toml::from_str::<Doc>(t)
            .map_err(|e| e.message().to_owned())?
            .retry
            .check()
    }

    #[test]
    fn waits_grow_by_the_backoff_and_ranges_are_checked() {
        let p = raw("retry = { attempts = 3, wait_secs = 30, backoff = 2.0 }").unwrap();
        assert_eq!(p.attempts, 3);
        assert_eq!(p.wait_before(2), Duration::from_secs(30));
        assert_eq!(p.wait_before(3), Duration::from_secs(60));
        assert_eq!(p.wait_before(4), Duration::from_secs(120));
        let d = raw("retry = { attempts = 2 }").unwrap();
        assert_eq!((d.wait, d.backoff), (Duration::from_secs(30), 2.0));
        let big = raw("retry = { attempts = 20, wait_secs = 86400, backoff = 10 }").unwrap();
        assert_eq!(big.wait_before(20), Duration::from_secs(86_400));
        assert!(
            raw("retry = { attempts = 0 }")
                .unwrap_err()
                .contains("1 to 20")
        );
        assert!(raw("retry = { attempts = 21 }").is_err());
        assert!(
            raw("retry = { attempts = 2, wait_secs = -1 }")
                .unwrap_err()
                .contains("wait_secs")
        );
        assert!(
            raw("retry = { attempts = 2, backoff = 0.5 }")
                .unwrap_err()
                .contains("backoff")
        );
        assert!(raw("retry = { attempts = 2, tries = 1 }").is_err());
    }
}
