//! Completion webhooks: the outbox in the store, delivered at least once with
//! exponential backoff, through restarts, signed per Standard Webhooks.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use chrono::Local;
use hmac::{KeyInit, Mac};

use super::{Service, WebhookConfig};
use crate::store::{WebhookAttempt, WebhookDue, WebhookNext};

/// Deliveries tried at once.
const PARALLEL: usize = 16;

/// Sends due webhooks until the server stops.
pub async fn deliver_loop(svc: Arc<Service>) {
    let cfg = svc.config.webhooks.clone();
    let client = match reqwest::Client::builder()
        .dns_resolver(PolicyResolver { cfg: cfg.clone() })
        .timeout(Duration::from_secs_f64(cfg.timeout_secs))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("tidepool/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("webhooks disabled: cannot build an HTTP client: {e}");
            return;
        }
    };
    loop {
        if svc.is_stopping() {
            return;
        }
        match svc
            .store
            .due_webhooks(Local::now().fixed_offset(), PARALLEL)
            .await
        {
            Ok(due) if !due.is_empty() => {
                let mut set = tokio::task::JoinSet::new();
                for d in due {
                    let (svc, client, cfg) = (svc.clone(), client.clone(), cfg.clone());
                    set.spawn(async move { deliver(&svc, &client, &cfg, d).await });
                }
                while set.join_next().await.is_some() {}
                continue;
            }
            Ok(_) => {}
            Err(e) => tracing::error!("reading the webhook outbox: {e}"),
        }
        tokio::select! {
            _ = svc.webhooks_due.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

async fn deliver(svc: &Service, client: &reqwest::Client, cfg: &WebhookConfig, d: WebhookDue) {
    let attempt = d.attempts + 1;
    let now = Local::now().fixed_offset();
    // A refusal by the address policy is final, not retried.
    let key = &d.key;
    let give_up = |refused: String| async move {
        let a = WebhookAttempt {
            attempt,
            at: now,
            status_code: None,
            error: Some(refused),
        };
        metrics::counter!("tidepool_webhook_attempts_total", "outcome" => "refused").increment(1);
        let _ = svc.store.record_attempt(key, a, WebhookNext::GiveUp).await;
    };
    let (status_code, error) = match check_target(&d.url, cfg) {
        Err(refused) => return give_up(refused).await,
        Ok(()) => {
            let msg_id = format!("msg_{}", d.key.run_id.simple());
            let ts = now.timestamp();
            let mut req = client
                .post(&d.url)
                .header("content-type", "application/json")
                .header("webhook-id", &msg_id)
                .header("webhook-timestamp", ts.to_string())
                .header("x-tidepool-run-id", d.key.run_id.to_string())
                .header("x-tidepool-attempt", attempt.to_string());
            if let Some(secret) = &cfg.secret {
                req = req.header("webhook-signature", sign(secret, &msg_id, ts, &d.body));
            }
            match req.body(d.body.clone()).send().await {
                Ok(resp) if resp.status().is_success() => (Some(resp.status().as_u16()), None),
                Ok(resp) => (
                    Some(resp.status().as_u16()),
                    Some(format!("the receiver answered HTTP {}", resp.status())),
                ),
                Err(e) => {
                    // The resolver's refusal is among the error's sources.
                    let mut refusal = None;
                    let mut reason = e.to_string();
                    let mut source = std::error::Error::source(&e);
                    while let Some(s) = source {
                        if let Some(r) = s.downcast_ref::<Refused>() {
                            refusal = Some(r.to_string());
                        }
                        reason = format!("{reason}: {s}");
                        source = s.source();
                    }
                    if let Some(refused) = refusal {
                        return give_up(refused).await;
                    }
                    (None, Some(format!("cannot deliver: {reason}")))
                }
            }
        }
    };
    let delivered = error.is_none();
    let next = if delivered {
        WebhookNext::Delivered
    } else {
        let wait = backoff(cfg, attempt);
        let give_up_at =
            d.created_at + chrono::Duration::milliseconds((cfg.max_retry_hours * 3.6e6) as i64);
        let next_at = now + chrono::Duration::milliseconds((wait.as_secs_f64() * 1000.0) as i64);
        if next_at > give_up_at {
            WebhookNext::GiveUp
        } else {
            WebhookNext::RetryAt(next_at)
        }
    };
    metrics::counter!("tidepool_webhook_attempts_total", "outcome" => if delivered { "delivered" } else { "failed" })
        .increment(1);
    if let Some(e) = &error {
        tracing::warn!(run = %d.key, attempt, "webhook to {}: {e}", d.url);
    }
    let a = WebhookAttempt {
        attempt,
        at: now,
        status_code,
        error,
    };
    if let Err(e) = svc.store.record_attempt(&d.key, a, next).await {
        tracing::error!(run = %d.key, "recording a webhook attempt: {e}");
    }
}

/// The wait before attempt `attempt + 1`: first, then doubling, capped.
pub fn backoff(cfg: &WebhookConfig, attempt: u32) -> Duration {
    let secs = cfg.first_retry_secs * 2f64.powi(attempt.saturating_sub(1).min(30) as i32);
    Duration::from_secs_f64(secs.min(cfg.max_retry_interval_secs).max(0.0))
}

/// The Standard Webhooks signature: `v1,` + base64(HMAC-SHA256(key, "id.ts.body")),
/// the key being the base64 after `whsec_`, or the secret's bytes as they are.
pub fn sign(secret: &str, msg_id: &str, ts: i64, body: &str) -> String {
    let key = secret
        .strip_prefix("whsec_")
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec());
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).expect("HMAC takes any key length");
    mac.update(format!("{msg_id}.{ts}.{body}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!("v1,{sig}")
}

/// A host the webhook address policy refuses (all its addresses are refused).
#[derive(Debug, thiserror::Error)]
#[error("refused by the webhook address policy: {0}")]
pub struct Refused(String);

/// Checks a webhook URL, and its host when it is an IP address: link-local
/// (cloud metadata) is refused unless allowed; loopback and private ranges
/// when `block_private` is set. Host names are checked by [`PolicyResolver`]
/// as they are resolved for the connection.
pub fn check_target(url: &str, cfg: &WebhookConfig) -> Result<(), String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("bad webhook URL: {e}"))?;
    let host = u.host_str().ok_or("the webhook URL has no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>()
        && let Some(why) = refused(ip, cfg)
    {
        return Err(Refused(format!("{ip} is {why}")).to_string());
    }
    Ok(())
}

/// Resolves webhook hosts and keeps only the addresses the policy allows, so
/// the address checked is the address connected to: a name that resolves
/// to a public address for a check and to a private one for the connection
/// (DNS rebinding) gets nowhere.
struct PolicyResolver {
    cfg: WebhookConfig,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let cfg = self.cfg.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut why = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match refused(a.ip(), &cfg) {
                    Some(w) => {
                        why.get_or_insert_with(|| format!("{host} is {} ({w})", a.ip()));
                        false
                    }
                    None => true,
                })
                .collect();
            if allowed.is_empty() {
                let why = why.unwrap_or_else(|| format!("{host} has no address"));
                return Err(Box::new(Refused(why)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

fn refused(ip: IpAddr, cfg: &WebhookConfig) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    };
    if link_local && !cfg.allow_link_local {
        return Some("link-local (cloud metadata lives there)");
    }
    if cfg.block_private {
        let private = match ip {
            IpAddr::V4(v4) => {
                v4.is_loopback()
                    || v4.is_private()
                    || v4.is_unspecified()
                    || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64)
            }
            IpAddr::V6(v6) => {
                v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xfe00) == 0xfc00
            }
        };
        if private {
            return Some("loopback or private, and block_private is set");
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let cfg = WebhookConfig {
            first_retry_secs: 2.0,
            max_retry_interval_secs: 10.0,
            ..WebhookConfig::default()
        };
        let w: Vec<u64> = (1..=5).map(|a| backoff(&cfg, a).as_secs()).collect();
        assert_eq!(w, [2, 4, 8, 10, 10]);
    }

    #[test]
    fn policy_refuses_link_local_always_and_private_on_request() {
        let open = WebhookConfig::default();
        assert!(refused("169.254.169.254".parse().unwrap(), &open).is_some());
        assert!(refused("127.0.0.1".parse().unwrap(), &open).is_none());
        let shared = WebhookConfig {
            block_private: true,
            ..WebhookConfig::default()
        };
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "::1",
            "fd00::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(refused(ip.parse().unwrap(), &shared).is_some(), "{ip}");
        }
        assert!(refused("93.184.216.34".parse().unwrap(), &shared).is_none());
    }
}
