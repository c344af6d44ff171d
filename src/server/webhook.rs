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

pub mod policy;

/// Deliveries tried at once.
const PARALLEL: usize = 16;

/// Sends due webhooks until the server stops.
pub async fn deliver_loop(svc: Arc<Service>) {
    let cfg = svc.config.webhooks.clone();
    let client = match client(&cfg) {
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
        metrics::counter!("tidepool_webhook_attempts_total", "instance" => key.instance.clone(), "outcome" => "refused")
            .increment(1);
        let _ = svc.store.record_attempt(key, a, WebhookNext::GiveUp).await;
    };
    let (status_code, error) = match check_target(&d.url, cfg) {
        Err(refused) => return give_up(refused.to_string()).await,
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
    let outcome = if delivered { "delivered" } else { "failed" };
    metrics::counter!("tidepool_webhook_attempts_total", "instance" => d.key.instance.clone(), "outcome" => outcome)
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

/// What the URL parser says of a URL it cannot read.
pub type UrlError = <reqwest::Url as std::str::FromStr>::Err;

/// Why a webhook is not sent to its URL at all.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The URL does not parse.
    #[error("bad webhook URL: {0}")]
    BadUrl(#[source] UrlError),
    /// The URL has no host (`data:`, `file:///`).
    #[error("the webhook URL has no host")]
    NoHost,
    /// The address policy refuses the host.
    #[error(transparent)]
    Refused(#[from] Refused),
}

/// Checks a webhook URL before anything is sent: its host when it is an IP
/// address (see [`policy`]), or a metadata service's host name. Other host
/// names are checked by [`PolicyResolver`] as they are resolved for the
/// connection.
pub fn check_target(url: &str, cfg: &WebhookConfig) -> Result<(), TargetError> {
    let u = reqwest::Url::parse(url).map_err(TargetError::BadUrl)?;
    // The URL parser has already turned 2852039166 or 0xa9.0xfe.0xa9.0xfe
    // into 169.254.169.254.
    let host = u.host_str().ok_or(TargetError::NoHost)?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let refusal = match bare.parse::<IpAddr>() {
        Ok(ip) => policy::judge(ip, cfg).map(|r| r.to_string()),
        Err(_) => policy::judge_host(host),
    };
    match refusal {
        Some(why) => Err(Refused(why).into()),
        None => Ok(()),
    }
}

/// The client webhooks are sent with: every address it connects to passes
/// [`PolicyResolver`]; redirects are not followed (a 3xx is a failed attempt),
/// and proxies from the environment are not used, so that the address judged
/// is the receiver's and not a proxy's.
fn client(cfg: &WebhookConfig) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .dns_resolver(PolicyResolver { cfg: cfg.clone() })
        .timeout(Duration::from_secs_f64(cfg.timeout_secs))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(concat!("tidepool/", env!("CARGO_PKG_VERSION")))
        .build()
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
            if let Some(why) = policy::judge_host(&host) {
                return Err(Box::new(Refused(why)) as Box<dyn std::error::Error + Send + Sync>);
            }
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut why = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match policy::judge(a.ip(), &cfg) {
                    Some(r) => {
                        why.get_or_insert_with(|| r.of_host(&host));
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
    fn urls_are_judged_before_anything_is_sent() {
        let open = WebhookConfig::default();
        for (url, says) in [
            (
                "http://169.254.169.254/latest/meta-data",
                "a cloud metadata address",
            ),
            (
                "http://2852039166/",
                "169.254.169.254 is a cloud metadata address",
            ),
            (
                "http://0xa9.0xfe.0xa9.0xfe/",
                "169.254.169.254 is a cloud metadata address",
            ),
            ("http://[fd00:ec2::254]/", "a cloud metadata address"),
            (
                "https://[64:ff9b::a9fe:a9fe]:8443/x",
                "carries 169.254.169.254",
            ),
            (
                "http://[::ffff:169.254.169.254]/",
                "carries 169.254.169.254",
            ),
            (
                "http://metadata.google.internal/computeMetadata/v1/",
                "cloud metadata host name",
            ),
            ("http://0.0.0.0:8080/", "an unspecified address"),
        ] {
            let e = check_target(url, &open).expect_err(url).to_string();
            assert!(
                e.starts_with("refused by the webhook address policy: "),
                "{e}"
            );
            assert!(e.contains(says), "{url}: {e}");
        }
        for url in [
            "http://127.0.0.1:9/",
            "http://[::1]/",
            "https://example.com/hook",
        ] {
            if let Err(e) = check_target(url, &open) {
                panic!("{url}: {e}");
            }
        }
        let shared = WebhookConfig {
            block_private: true,
            ..WebhookConfig::default()
        };
        let e = check_target("http://[::ffff:127.0.0.1]/", &shared)
            .unwrap_err()
            .to_string();
        assert!(e.contains("carries 127.0.0.1, a loopback address"), "{e}");
        assert_eq!(
            check_target("not a url", &open).unwrap_err().to_string(),
            "bad webhook URL: relative URL without a base"
        );
        assert_eq!(
            check_target("data:text/plain,x", &open)
                .unwrap_err()
                .to_string(),
            "the webhook URL has no host"
        );
    }

    /// A receiver's redirect is an answer, not an instruction: the client
    /// does not follow it to the address it names.
    #[tokio::test]
    async fn redirects_are_not_followed() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let hits = Arc::new(AtomicUsize::new(0));
        let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target_addr = target.local_addr().unwrap();
        let counted = hits.clone();
        let target_app = axum::Router::new().fallback(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async { "reached" }
        });
        let redirecting = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let redirecting_addr = redirecting.local_addr().unwrap();
        let location = format!("http://{target_addr}/");
        let redirect_app = axum::Router::new().fallback(move || {
            let location = location.clone();
            async move {
                (
                    axum::http::StatusCode::TEMPORARY_REDIRECT,
                    [("location", location)],
                )
            }
        });
        let servers = [
            tokio::spawn(async move { axum::serve(target, target_app).await }),
            tokio::spawn(async move { axum::serve(redirecting, redirect_app).await }),
        ];
        let c = client(&WebhookConfig::default()).unwrap();
        let resp = c
            .post(format!("http://{redirecting_addr}/hook"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 307);
        assert_eq!(hits.load(Ordering::SeqCst), 0, "the redirect was followed");
        // The target itself answers (so a followed redirect would have counted).
        let direct = c
            .get(format!("http://{target_addr}/"))
            .send()
            .await
            .unwrap();
        assert_eq!(direct.text().await.unwrap(), "reached");
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        for s in servers {
            s.abort();
        }
    }

    /// The resolver judges every address a name resolves to.
    #[tokio::test]
    async fn names_are_judged_as_they_resolve() {
        let shared = WebhookConfig {
            block_private: true,
            ..WebhookConfig::default()
        };
        let c = client(&shared).unwrap();
        // localhost resolves to loopback only: refused before any connection.
        let e = c.get("http://localhost:9/").send().await.unwrap_err();
        let mut refused = None;
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            if let Some(r) = s.downcast_ref::<Refused>() {
                refused = Some(r.to_string());
            }
            source = s.source();
        }
        let refused = refused.expect("refused by the resolver");
        assert!(refused.contains("localhost is "), "{refused}");
        assert!(refused.contains("a loopback address"), "{refused}");
        let e = c
            .get("http://metadata.google.internal./")
            .send()
            .await
            .unwrap_err();
        assert!(
            format!("{e:?}").contains("cloud metadata host name"),
            "{e:?}"
        );
    }
}
