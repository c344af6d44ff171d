//! Who is calling: bearer tokens from `POST /token`, API keys, users and their
//! roles per instance. Secrets are kept as hashes only.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use axum::http::{HeaderMap, header};
use sha2::Digest;

use super::AppState;
use crate::project::DEFAULT_INSTANCE;
use crate::server::config::LoginConfig;
use crate::store::{Role, StoreError, UserRecord, revocation_epoch};

/// A caller whose credentials checked out.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The user (none in open mode).
    pub user: Option<String>,
    /// The instance used when a request names none.
    pub primary: String,
    grants: HashMap<String, Role>,
    /// Instances whose `/metrics` series the caller reads by the Metrics role
    /// (kept apart from `grants`: that role reads nothing else).
    metrics: BTreeSet<String>,
    open: bool,
}

/// The instance name that, with the Metrics role, stands for every instance.
pub const ALL_INSTANCES: &str = "*";

/// The series of `/metrics` a caller may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsScope {
    /// Every series, the server-wide ones (no `instance` label) included.
    All,
    /// Only the series labelled with one of these instances.
    Instances(BTreeSet<String>),
}

impl Caller {
    /// The caller of a server without users: owner of every instance.
    pub fn open() -> Self {
        Caller {
            user: None,
            primary: DEFAULT_INSTANCE.to_owned(),
            grants: HashMap::new(),
            metrics: BTreeSet::new(),
            open: true,
        }
    }

    /// The caller's role in `instance`, if any.
    pub fn role_in(&self, instance: &str) -> Option<Role> {
        if self.open {
            return Some(Role::Owner);
        }
        self.grants.get(instance).copied()
    }

    /// The instances the caller may read.
    pub fn can_see(&self, instance: &str) -> bool {
        self.role_in(instance).is_some()
    }

    /// What the caller may read of `/metrics`: everything in open mode or
    /// with Metrics on [`ALL_INSTANCES`]; else the series of the instances
    /// it holds Metrics or Owner in; `None` if there are none.
    pub fn metrics_scope(&self) -> Option<MetricsScope> {
        if self.open || self.metrics.contains(ALL_INSTANCES) {
            return Some(MetricsScope::All);
        }
        let owned = self
            .grants
            .iter()
            .filter(|(_, r)| **r == Role::Owner)
            .map(|(i, _)| i.clone());
        let mine: BTreeSet<String> = self.metrics.iter().cloned().chain(owned).collect();
        (!mine.is_empty()).then_some(MetricsScope::Instances(mine))
    }

    /// The instances the caller holds a role in, sorted; `None` when it may
    /// see every instance (open mode).
    pub fn instances(&self) -> Option<Vec<String>> {
        if self.open {
            return None;
        }
        let mut list: Vec<String> = self.grants.keys().cloned().collect();
        list.sort();
        Some(list)
    }

    fn of(user: UserRecord) -> Self {
        let (metrics, grants): (Vec<_>, Vec<_>) = user
            .grants
            .into_iter()
            .partition(|(_, r)| *r == Role::Metrics);
        Caller {
            user: Some(user.name),
            primary: user.primary_instance,
            grants: grants.into_iter().collect(),
            metrics: metrics.into_iter().map(|(i, _)| i).collect(),
            open: false,
        }
    }
}

/// Why a caller was refused (401).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No credentials.
    #[error(
        "authentication required: send Authorization: Bearer <token> (from POST /token) or X-API-Key"
    )]
    Missing,
    /// Credentials that do not check out.
    #[error("invalid or expired credentials")]
    Invalid,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// SHA-256 in hex: how tokens and keys are stored.
pub fn digest(secret: &str) -> String {
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}

/// A new random secret with a prefix (`tpt_` tokens, `tpk_` API keys).
pub fn new_secret(prefix: &str) -> String {
    format!(
        "{prefix}{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Why a password could not be hashed (argon2 refused its parameters or input).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HashError(#[source] argon2::password_hash::Error);

/// An argon2 hash of a password.
pub fn hash_password(password: &str) -> Result<String, HashError> {
    let salt = *uuid::Uuid::new_v4().as_bytes();
    argon2::Argon2::default()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(HashError)
}

/// Whether `password` matches an argon2 hash.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// How long a credential that checked out is believed without asking the
/// store again (never past its token's expiry).
const CREDENTIAL_TTL: Duration = Duration::from_secs(5);
/// Credentials kept at most; past it, expired ones go, then all.
const CREDENTIAL_CACHE_MAX: usize = 10_000;

/// Credentials that checked out recently, so a client's every request does
/// not cost two store reads (that halved the accepted runs/s). A user changed
/// or a key removed with the CLI, from another process, takes effect within
/// [`CREDENTIAL_TTL`]; one revoked through this process's store, at once
/// (entries older than [`revocation_epoch`] are not believed); a token's
/// expiry is exact.
#[derive(Default)]
pub struct CredentialCache {
    entries: Mutex<HashMap<String, CachedCaller>>,
}

struct CachedCaller {
    caller: Caller,
    until: Instant,
    /// The [`revocation_epoch`] before the store was asked.
    epoch: u64,
}

impl CredentialCache {
    fn get(&self, key: &str) -> Option<Caller> {
        let entries = self.entries.lock().ok()?;
        let epoch = revocation_epoch();
        entries
            .get(key)
            .filter(|e| e.until > Instant::now() && e.epoch == epoch)
            .map(|e| e.caller.clone())
    }

    fn put(&self, key: String, entry: CachedCaller) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if entries.len() >= CREDENTIAL_CACHE_MAX {
            let (now, epoch) = (Instant::now(), revocation_epoch());
            entries.retain(|_, e| e.until > now && e.epoch == epoch);
            if entries.len() >= CREDENTIAL_CACHE_MAX {
                entries.clear();
            }
        }
        entries.insert(key, entry);
    }
}

/// Checks the request's credentials.
pub async fn authenticate(svc: &AppState, headers: &HeaderMap) -> Result<Caller, AuthError> {
    if svc.open {
        return Ok(Caller::open());
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| rest.trim().to_owned())
        })
        // The console's session cookie holds a bearer token.
        .or_else(|| super::console::session_token(headers));
    let key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| bearer.clone().filter(|b| b.starts_with("tpk_")));
    let cache_key = match (&key, &bearer) {
        (Some(k), _) => format!("key:{}", digest(k)),
        (None, Some(t)) => format!("token:{}", digest(t)),
        (None, None) => return Err(AuthError::Missing),
    };
    if let Some(caller) = svc.credentials.get(&cache_key) {
        return Ok(caller);
    }
    let epoch = revocation_epoch();
    let mut until = Instant::now() + CREDENTIAL_TTL;
    let user = if let Some(k) = key {
        svc.store.api_key_user(&digest(&k)).await?
    } else {
        let now = chrono::Local::now().fixed_offset();
        let t = bearer.unwrap_or_default();
        svc.store
            .token_user(&digest(&t), now)
            .await?
            .map(|(user, expires)| {
                let left = (expires - now).to_std().unwrap_or_default();
                until = until.min(Instant::now() + left);
                user
            })
    };
    let user = user.ok_or(AuthError::Invalid)?;
    let record = svc.store.user(&user).await?.ok_or(AuthError::Invalid)?;
    let caller = Caller::of(record);
    let entry = CachedCaller {
        caller: caller.clone(),
        until,
        epoch,
    };
    svc.credentials.put(cache_key, entry);
    Ok(caller)
}

/// The hash an unknown user's password is checked against, made with the
/// same parameters as a real one, so that an unknown name costs the same
/// argon2 work as a known one and timing does not tell names apart.
static DUMMY_HASH: LazyLock<String> = LazyLock::new(|| {
    hash_password(&new_secret("dummy_")).expect("argon2 with the default parameters")
});

/// What a password grant came to.
#[derive(Debug)]
pub enum LoginOutcome {
    /// The password matched.
    Granted,
    /// Unknown user or wrong password (the same answer for both).
    Denied,
    /// The user or the address failed too often lately: refused without a
    /// check until this much time has passed.
    Throttled(Duration),
    /// No password check came free within the wait.
    Busy,
    /// The store failed.
    Store(StoreError),
}

/// Bounds `POST /token`: at most [`LoginConfig::checks`] argon2 checks at
/// once (each holds 19 MiB), and backoff for user names and addresses that
/// failed too often. Held by the [`AppState`]; the state is in memory.
pub struct LoginGuard {
    config: LoginConfig,
    checks: Arc<tokio::sync::Semaphore>,
    users: Mutex<Failures>,
    addresses: Mutex<Failures>,
    password_checks: AtomicU64,
    /// Checks running now, and the most there ever were at once.
    running: Arc<(AtomicU64, AtomicU64)>,
}

impl LoginGuard {
    /// A guard with `config`'s limits.
    pub fn new(config: &LoginConfig) -> Self {
        LoginGuard {
            config: config.clone(),
            checks: Arc::new(tokio::sync::Semaphore::new(config.checks.max(1))),
            users: Mutex::new(Failures::default()),
            addresses: Mutex::new(Failures::default()),
            password_checks: AtomicU64::new(0),
            running: Arc::default(),
        }
    }

    /// Password checks running now.
    pub fn checks_running(&self) -> u64 {
        self.running.0.load(Ordering::Relaxed)
    }

    /// The most password checks that ever ran at once.
    pub fn checks_running_peak(&self) -> u64 {
        self.running.1.load(Ordering::Relaxed)
    }

    /// Password checks (argon2, real or against the dummy hash) run so far.
    pub fn password_checks(&self) -> u64 {
        self.password_checks.load(Ordering::Relaxed)
    }

    /// How long `user` or `peer` is still refused, if it is.
    fn throttled(&self, user: &str, peer: Option<&str>) -> Option<Duration> {
        let now = Instant::now();
        let by_user = lock(&self.users).blocked(&digest(user), now);
        let by_peer = peer.and_then(|p| lock(&self.addresses).blocked(p, now));
        by_user.max(by_peer)
    }

    fn record(&self, user: &str, peer: Option<&str>, granted: bool) {
        let now = Instant::now();
        let user = digest(user);
        if granted {
            lock(&self.users).forget(&user);
        } else {
            lock(&self.users).fail(user, now, &self.config);
        }
        // A success does not clear the address: one good account must not
        // reset the count of an address guessing at others.
        if let (false, Some(p)) = (granted, peer) {
            lock(&self.addresses).fail(p.to_owned(), now, &self.config);
        }
    }
}

fn lock(m: &Mutex<Failures>) -> std::sync::MutexGuard<'_, Failures> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How an address is tracked: IPv4 as is, IPv6 by its /64 (what one host
/// usually holds), an IPv4-mapped IPv6 as its IPv4.
fn address_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

/// Checks a password grant under `svc`'s login limits; records the outcome.
pub async fn check_login(
    svc: &AppState,
    user: &str,
    password: String,
    peer: Option<IpAddr>,
) -> LoginOutcome {
    let guard = &svc.logins;
    let peer = peer.map(address_key);
    let peer = peer.as_deref();
    if let Some(left) = guard.throttled(user, peer) {
        metrics::counter!("tidepool_login_refusals_total", "reason" => "backoff").increment(1);
        return LoginOutcome::Throttled(left);
    }
    let wait = Duration::from_millis(guard.config.wait_ms);
    let Ok(Ok(permit)) = tokio::time::timeout(wait, guard.checks.clone().acquire_owned()).await
    else {
        metrics::counter!("tidepool_login_refusals_total", "reason" => "busy").increment(1);
        return LoginOutcome::Busy;
    };
    // Failures recorded while this attempt waited count too.
    if let Some(left) = guard.throttled(user, peer) {
        metrics::counter!("tidepool_login_refusals_total", "reason" => "backoff").increment(1);
        return LoginOutcome::Throttled(left);
    }
    let hash = match svc.store.user(user).await {
        Ok(record) => record.map(|r| r.password_hash),
        Err(e) => return LoginOutcome::Store(e),
    };
    guard.password_checks.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("tidepool_password_checks_total").increment(1);
    // The permit moves into the blocking task: a client that hangs up does
    // not free its check before the argon2 work is done.
    let running = guard.running.clone();
    let granted = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let now = running.0.fetch_add(1, Ordering::Relaxed) + 1;
        running.1.fetch_max(now, Ordering::Relaxed);
        let matched = verify_password(&password, hash.as_deref().unwrap_or(&DUMMY_HASH));
        running.0.fetch_sub(1, Ordering::Relaxed);
        matched && hash.is_some()
    })
    .await
    .unwrap_or(false);
    guard.record(user, peer, granted);
    if granted {
        LoginOutcome::Granted
    } else {
        LoginOutcome::Denied
    }
}

/// Recent failures per user name (its digest) or address, at most
/// [`LoginConfig::tracked_max`] of them.
#[derive(Default)]
struct Failures {
    entries: HashMap<String, Strikes>,
}

struct Strikes {
    /// Failures since `window_start`.
    failures: u32,
    window_start: Instant,
    /// Refusals so far (each twice as long as the one before).
    lockouts: u32,
    blocked_until: Option<Instant>,
    last_seen: Instant,
}

impl Failures {
    fn blocked(&self, key: &str, now: Instant) -> Option<Duration> {
        let until = self.entries.get(key)?.blocked_until?;
        (until > now).then(|| until - now)
    }

    fn forget(&mut self, key: &str) {
        self.entries.remove(key);
    }

    fn fail(&mut self, key: String, now: Instant, config: &LoginConfig) {
        if !self.entries.contains_key(&key) {
            self.make_room(now, config);
        }
        let window = Duration::from_secs(config.window_secs);
        let s = self.entries.entry(key).or_insert(Strikes {
            failures: 0,
            window_start: now,
            lockouts: 0,
            blocked_until: None,
            last_seen: now,
        });
        if now.duration_since(s.window_start) > window {
            // A quiet window after the last refusal forgives the earlier ones.
            if s.blocked_until.is_none_or(|b| now > b + window) {
                s.lockouts = 0;
            }
            s.failures = 0;
            s.window_start = now;
        }
        s.failures += 1;
        s.last_seen = now;
        if s.failures >= config.max_failures.max(1) {
            s.lockouts = s.lockouts.saturating_add(1);
            let doubled = config
                .backoff_secs
                .saturating_mul(1 << (s.lockouts - 1).min(20));
            let secs = doubled.min(config.backoff_max_secs.max(config.backoff_secs));
            s.blocked_until = Some(now + Duration::from_secs(secs));
            s.failures = 0;
            s.window_start = now;
        }
    }

    /// Below the cap: first what no longer matters, then the one seen longest
    /// ago, those not refused before those refused.
    fn make_room(&mut self, now: Instant, config: &LoginConfig) {
        let max = config.tracked_max.max(1);
        if self.entries.len() < max {
            return;
        }
        let window = Duration::from_secs(config.window_secs);
        self.entries.retain(|_, s| {
            s.blocked_until.is_some_and(|b| b > now) || now.duration_since(s.last_seen) <= window
        });
        while self.entries.len() >= max {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, s)| (s.blocked_until.is_some_and(|b| b > now), s.last_seen))
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.entries.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LoginConfig {
        LoginConfig {
            max_failures: 3,
            window_secs: 60,
            backoff_secs: 10,
            backoff_max_secs: 25,
            tracked_max: 2,
            ..LoginConfig::default()
        }
    }

    /// The PHC string up to the salt: algorithm, version, parameters.
    fn params(phc: &str) -> String {
        phc.split('$').take(4).collect::<Vec<_>>().join("$")
    }

    #[test]
    fn the_dummy_hash_costs_what_a_real_one_does() {
        let real = hash_password("a real password").unwrap();
        assert_eq!(params(&DUMMY_HASH), params(&real));
        assert!(
            params(&real).starts_with("$argon2id$v=19$m=19456"),
            "{real}"
        );
        assert!(!verify_password("", &DUMMY_HASH));
    }

    #[test]
    fn refusals_start_after_max_failures_grow_and_are_capped() {
        let c = config();
        let mut f = Failures::default();
        let t0 = Instant::now();
        for _ in 0..2 {
            f.fail("ann".into(), t0, &c);
        }
        assert_eq!(f.blocked("ann", t0), None);
        f.fail("ann".into(), t0, &c);
        assert_eq!(f.blocked("ann", t0), Some(Duration::from_secs(10)));
        let t1 = t0 + Duration::from_secs(11);
        assert_eq!(f.blocked("ann", t1), None);
        for _ in 0..3 {
            f.fail("ann".into(), t1, &c);
        }
        assert_eq!(f.blocked("ann", t1), Some(Duration::from_secs(20)));
        let t2 = t1 + Duration::from_secs(21);
        for _ in 0..3 {
            f.fail("ann".into(), t2, &c);
        }
        assert_eq!(f.blocked("ann", t2), Some(Duration::from_secs(25)));
        // A quiet window after the refusal forgives it.
        let t3 = t2 + Duration::from_secs(25 + 61);
        for _ in 0..3 {
            f.fail("ann".into(), t3, &c);
        }
        assert_eq!(f.blocked("ann", t3), Some(Duration::from_secs(10)));
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let c = config();
        let mut f = Failures::default();
        let t0 = Instant::now();
        f.fail("ann".into(), t0, &c);
        f.fail("ann".into(), t0, &c);
        let later = t0 + Duration::from_secs(61);
        f.fail("ann".into(), later, &c);
        assert_eq!(f.blocked("ann", later), None);
    }

    #[test]
    fn tracking_is_capped_and_forgets_the_oldest_unrefused_first() {
        let c = config();
        let mut f = Failures::default();
        let t0 = Instant::now();
        for _ in 0..3 {
            f.fail("old".into(), t0, &c);
        }
        f.fail("mid".into(), t0 + Duration::from_secs(1), &c);
        f.fail("new".into(), t0 + Duration::from_secs(2), &c);
        assert_eq!(f.entries.len(), 2);
        assert!(f.entries.contains_key("old") && f.entries.contains_key("new"));
        // All refused: the oldest goes.
        for _ in 0..3 {
            f.fail("new".into(), t0 + Duration::from_secs(3), &c);
        }
        f.fail("last".into(), t0 + Duration::from_secs(4), &c);
        assert_eq!(f.entries.len(), 2);
        assert!(f.entries.contains_key("new") && f.entries.contains_key("last"));
    }

    #[test]
    fn ipv6_is_tracked_by_its_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_eq!(address_key(a), "2001:db8:1:2::/64");
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(address_key(mapped), "192.0.2.7");
    }
}
