//! Who is calling: bearer tokens from `POST /token`, API keys, users and their
//! roles per instance. Secrets are kept as hashes only.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use axum::http::{HeaderMap, header};
use sha2::Digest;

use crate::project::DEFAULT_INSTANCE;
use crate::server::Service;
use crate::store::{Role, StoreError, UserRecord};

/// A caller whose credentials checked out.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The user (none in open mode).
    pub user: Option<String>,
    /// The instance used when a request names none.
    pub primary: String,
    grants: HashMap<String, Role>,
    open: bool,
}

impl Caller {
    /// The caller of a server without users: owner of every instance.
    pub fn open() -> Self {
        Caller {
            user: None,
            primary: DEFAULT_INSTANCE.to_owned(),
            grants: HashMap::new(),
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
        Caller {
            user: Some(user.name),
            primary: user.primary_instance,
            grants: user.grants.into_iter().collect(),
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

/// An argon2 hash of a password.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = *uuid::Uuid::new_v4().as_bytes();
    argon2::Argon2::default()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
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
/// [`CREDENTIAL_TTL`]; a token's expiry is exact.
#[derive(Default)]
pub struct CredentialCache {
    entries: Mutex<HashMap<String, (Caller, Instant)>>,
}

impl CredentialCache {
    fn get(&self, key: &str) -> Option<Caller> {
        let entries = self.entries.lock().ok()?;
        entries
            .get(key)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(c, _)| c.clone())
    }

    fn put(&self, key: String, caller: Caller, until: Instant) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if entries.len() >= CREDENTIAL_CACHE_MAX {
            let now = Instant::now();
            entries.retain(|_, (_, u)| *u > now);
            if entries.len() >= CREDENTIAL_CACHE_MAX {
                entries.clear();
            }
        }
        entries.insert(key, (caller, until));
    }
}

/// Checks the request's credentials.
pub async fn authenticate(svc: &Service, headers: &HeaderMap) -> Result<Caller, AuthError> {
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
    svc.credentials.put(cache_key, caller.clone(), until);
    Ok(caller)
}
