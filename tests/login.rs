//! `POST /token` under attack: bounded password checks, the same work for
//! unknown users, backoff per user and per address, tokens revoked with a
//! password change or the user. Through the router where it can be, through
//! the real binary for memory and for changes made by the CLI.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use common::{Fixture, Server};
use serde_json::Value;
use tidepool::api;
use tidepool::server::{ServerConfig, Service};
use tidepool::store::{Role, SqliteStore, Store, UserRecord};
use tower::ServiceExt;

const FORM: &str = "application/x-www-form-urlencoded";

struct Api {
    _f: Fixture,
    svc: api::AppState,
}

struct Answer {
    status: StatusCode,
    retry_after: Option<u64>,
    body: Value,
}

fn user(name: &str, password: &str) -> UserRecord {
    UserRecord {
        name: name.into(),
        password_hash: api::auth::hash_password(password).unwrap(),
        primary_instance: "default".into(),
        grants: vec![("default".into(), Role::Owner)],
    }
}

async fn api_with(tweak: impl FnOnce(&mut ServerConfig)) -> Api {
    let f = Fixture::new();
    let mut config = ServerConfig {
        data_dir: f.data.clone(),
        projects: f.projects.clone(),
        workers: 1,
        ..ServerConfig::default()
    };
    tweak(&mut config);
    let store = Arc::new(SqliteStore::open(&f.data.join("tidepool.sqlite")).unwrap());
    store.put_user(user("ann", "ann-secret-1")).await.unwrap();
    let svc = Service::new(config, store).await.unwrap();
    Api {
        _f: f,
        svc: api::AppState::new(svc),
    }
}

impl Api {
    async fn send(&self, req: Request<Body>) -> Answer {
        let resp = api::app(self.svc.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().parse().unwrap());
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Answer {
            status,
            retry_after,
            body,
        }
    }

    /// `POST /token`, from `peer` if given (the server inserts it for real connections).
    async fn login_from(&self, peer: Option<&str>, name: &str, password: &str) -> Answer {
        let mut req = Request::post("/token")
            .header("content-type", FORM)
            .body(Body::from(format!(
                "grant_type=password&username={name}&password={password}"
            )))
            .unwrap();
        if let Some(p) = peer {
            let addr: SocketAddr = p.parse().unwrap();
            req.extensions_mut().insert(ConnectInfo(addr));
        }
        self.send(req).await
    }

    async fn login(&self, name: &str, password: &str) -> Answer {
        self.login_from(None, name, password).await
    }

    async fn token(&self, name: &str, password: &str) -> String {
        let a = self.login(name, password).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        a.body["access_token"].as_str().unwrap().to_owned()
    }

    async fn projects_status(&self, token: &str) -> StatusCode {
        let req = Request::get("/v1/Projects")
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap();
        self.send(req).await.status
    }
}

fn assert_invalid_grant(a: &Answer) {
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    assert_eq!(a.body["error"], "invalid_grant");
}

fn assert_backoff(a: &Answer) -> u64 {
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.body);
    assert_eq!(a.body["error"], "too_many_attempts", "{}", a.body);
    let secs = a.retry_after.expect("a 429 carries Retry-After");
    assert!(secs >= 1, "Retry-After {secs}");
    secs
}

/// Polls `attempt` until it answers 200, for at most 60 s.
async fn until_ok<F, Fut>(mut attempt: F) -> Answer
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Answer>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let a = attempt().await;
        if a.status == StatusCode::OK || Instant::now() > deadline {
            return a;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_known_users_cost_one_password_check_each_and_answer_alike() {
    let a = api_with(|_| {}).await;
    let logins = &a.svc.logins;
    let before = logins.password_checks();
    let known = a.login("ann", "wrong-password").await;
    assert_invalid_grant(&known);
    assert_eq!(logins.password_checks(), before + 1);
    let unknown = a.login("nobody", "wrong-password").await;
    assert_invalid_grant(&unknown);
    assert_eq!(logins.password_checks(), before + 2);
    assert_eq!(known.body, unknown.body);
    assert_eq!(known.retry_after, None);
    a.token("ann", "ann-secret-1").await;
    assert_eq!(logins.password_checks(), before + 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_failing_too_often_gets_429_without_a_check_until_the_backoff_ends() {
    let a = api_with(|c| {
        c.login.max_failures = 3;
        c.login.backoff_secs = 1;
    })
    .await;
    let logins = &a.svc.logins;
    for _ in 0..3 {
        assert_invalid_grant(&a.login("ann", "wrong-password").await);
    }
    let checks = logins.password_checks();
    // Even the right password waits out the backoff, and costs no argon2.
    let refused = a.login("ann", "ann-secret-1").await;
    assert_backoff(&refused);
    assert_eq!(logins.password_checks(), checks);
    // An unknown name is refused the same way: no telling names apart.
    for _ in 0..3 {
        assert_invalid_grant(&a.login("ghost", "wrong-password").await);
    }
    assert_backoff(&a.login("ghost", "wrong-password").await);
    // Another user is not affected.
    assert_invalid_grant(&a.login("bob", "wrong-password").await);

    // After the backoff, the right password works...
    let ok = until_ok(|| a.login("ann", "ann-secret-1")).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    // ...and a success starts the count again: two more failures are not refused.
    for _ in 0..2 {
        assert_invalid_grant(&a.login("ann", "wrong-password").await);
    }
    a.token("ann", "ann-secret-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_failing_too_often_gets_429_for_any_user() {
    let a = api_with(|c| {
        c.login.max_failures = 3;
        c.login.backoff_secs = 1;
    })
    .await;
    let guesser = Some("127.0.0.9:40000");
    for name in ["u1", "u2", "u3"] {
        assert_invalid_grant(&a.login_from(guesser, name, "wrong-password").await);
    }
    // A new name from the same address (another port too) is refused...
    let refused = a
        .login_from(Some("127.0.0.9:40001"), "ann", "ann-secret-1")
        .await;
    assert_backoff(&refused);
    // ...another address is not.
    let other = a
        .login_from(Some("127.0.0.10:40000"), "ann", "ann-secret-1")
        .await;
    assert_eq!(other.status, StatusCode::OK, "{}", other.body);
    // Once the backoff ends, the address may log in again.
    let ok = until_ok(|| a.login_from(guesser, "ann", "ann-secret-1")).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_run_at_most_login_checks_at_once_and_the_rest_get_429_busy() {
    let a = Arc::new(
        api_with(|c| {
            c.login.checks = 1;
            c.login.wait_ms = 0;
            c.login.max_failures = 1_000_000;
        })
        .await,
    );
    let logins = &a.svc.logins;
    let before = logins.password_checks();
    // Many at once: each answered 400 (checked) or 429 (no check free).
    let burst: Vec<_> = (0..16)
        .map(|i| {
            let a = a.clone();
            tokio::spawn(async move { a.login(&format!("u{i}"), "wrong-password").await })
        })
        .collect();
    let mut checked = 0;
    for t in burst {
        let r = t.await.unwrap();
        match r.status {
            StatusCode::BAD_REQUEST => checked += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(r.body["error"], "temporarily_unavailable", "{}", r.body);
                assert_eq!(r.retry_after, Some(1));
            }
            s => panic!("{s}: {}", r.body),
        }
    }
    assert_eq!(logins.password_checks() - before, checked);
    assert_eq!(logins.checks_running_peak(), 1);

    // While one check runs, another attempt is answered 429 at once. (If the
    // first ends before the second arrives, try again.)
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let first = {
            let a = a.clone();
            tokio::spawn(async move { a.login("ann", "wrong-password").await })
        };
        while logins.checks_running() == 0 && !first.is_finished() {
            tokio::task::yield_now().await;
        }
        let second = a.login("ann", "wrong-password").await;
        assert_invalid_grant(&first.await.unwrap());
        if second.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(second.body["error"], "temporarily_unavailable");
            break;
        }
        assert_invalid_grant(&second);
        assert!(Instant::now() < deadline, "never saw a busy 429");
    }
    assert_eq!(logins.checks_running_peak(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_change_or_removal_revokes_tokens_at_once_in_this_process() {
    let a = api_with(|_| {}).await;
    let store = a.svc.store.clone();
    let token = a.token("ann", "ann-secret-1").await;
    // Used, and so remembered by the credential cache.
    assert_eq!(a.projects_status(&token).await, StatusCode::OK);
    let new_hash = api::auth::hash_password("ann-secret-2").unwrap();
    assert!(store.set_password("ann", &new_hash).await.unwrap());
    assert_eq!(a.projects_status(&token).await, StatusCode::UNAUTHORIZED);
    assert_invalid_grant(&a.login("ann", "ann-secret-1").await);
    assert!(!store.set_password("nobody", &new_hash).await.unwrap());

    // Replacing the user (`tidepool user add` again) revokes too.
    let token = a.token("ann", "ann-secret-2").await;
    assert_eq!(a.projects_status(&token).await, StatusCode::OK);
    store.put_user(user("ann", "ann-secret-3")).await.unwrap();
    assert_eq!(a.projects_status(&token).await, StatusCode::UNAUTHORIZED);

    // So does removing the user.
    let token = a.token("ann", "ann-secret-3").await;
    assert_eq!(a.projects_status(&token).await, StatusCode::OK);
    assert!(store.remove_user("ann").await.unwrap());
    assert_eq!(a.projects_status(&token).await, StatusCode::UNAUTHORIZED);
    assert_invalid_grant(&a.login("ann", "ann-secret-3").await);
}

// ---- through the real binary ----

fn tidepool(f: &Fixture, args: &[&str], password: &str) -> std::process::Output {
    common::tidepool_cli(&f.data, args, password)
}

fn add_user(f: &Fixture, name: &str, password: &str) {
    common::tidepool_cli_ok(
        &f.data,
        &["user", "add", name, "--instance", "default:Owner"],
        password,
    );
}

/// `tidepool serve` with `config` as its config file, answering.
async fn serve(f: &Fixture, config: &str) -> (Server, String) {
    let server = f.serve().config(config).start_async().await;
    let base = server.base.clone();
    (server, base)
}

async fn post_token(client: &reqwest::Client, base: &str, name: &str, password: &str) -> u16 {
    client
        .post(format!("{base}/token"))
        .header("content-type", FORM)
        .body(format!(
            "grant_type=password&username={name}&password={password}"
        ))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn token_of(client: &reqwest::Client, base: &str, name: &str, password: &str) -> String {
    let v: Value = client
        .post(format!("{base}/token"))
        .header("content-type", FORM)
        .body(format!(
            "grant_type=password&username={name}&password={password}"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token: {v}"))
        .to_owned()
}

async fn projects_status(client: &reqwest::Client, base: &str, token: &str) -> u16 {
    client
        .get(format!("{base}/v1/Projects"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// A `/proc/<pid>/status` figure in kB.
fn proc_status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_wrong_passwords_keep_memory_bounded_and_healthz_up() {
    let f = Fixture::new();
    add_user(&f, "ann", "ann-secret-1");
    let out = tidepool(
        &f,
        &["user", "add", "scraper", "--instance", "*:Metrics"],
        "scraper-secret-1",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Backoff out of the way: this is about concurrency.
    let (server, base) = serve(
        &f,
        "[login]\nchecks = 2\nwait_ms = 3000\nmax_failures = 1000000\n",
    )
    .await;
    let pid = server.pid();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    // /metrics needs a credential once users exist; this login is one check.
    let scrape = token_of(&client, &base, "scraper", "scraper-secret-1").await;
    let done = Arc::new(AtomicUsize::new(0));
    let burst: Vec<_> = (0..200)
        .map(|i| {
            let (client, base, done) = (client.clone(), base.clone(), done.clone());
            // Half a known user, half unknown names.
            let name = if i % 2 == 0 {
                "ann".to_owned()
            } else {
                format!("nobody{i}")
            };
            tokio::spawn(async move {
                let s = post_token(&client, &base, &name, "wrong-password").await;
                done.fetch_add(1, Ordering::SeqCst);
                s
            })
        })
        .collect();
    // /healthz answers while password checks are going.
    let mut healthz_during_burst = 0;
    while done.load(Ordering::SeqCst) < 200 {
        let r = client.get(format!("{base}/healthz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        if done.load(Ordering::SeqCst) < 200 {
            healthz_during_burst += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut denied = 0;
    let mut busy = 0;
    for t in burst {
        match t.await.unwrap() {
            400 => denied += 1,
            429 => busy += 1,
            s => panic!("a wrong password answered {s}"),
        }
    }
    assert!(healthz_during_burst > 0);
    assert!(denied > 0, "no password was checked at all");
    // Each 400 ran exactly one argon2 check; no 429 ran any.
    let metrics = client
        .get(format!("{base}/metrics"))
        .bearer_auth(&scrape)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let checks: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tidepool_password_checks_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no password check counter in {metrics}"));
    assert_eq!(checks, denied + 1, "the scraper's login and one per 400");
    let peak_mb = proc_status_kb(pid, "VmHWM") / 1024;
    let threads = proc_status_kb(pid, "Threads");
    eprintln!(
        "200 concurrent wrong passwords: {denied} checked (400), {busy} busy (429); \
         peak RSS {peak_mb} MB, {threads} threads; /healthz answered {healthz_during_burst} times meanwhile"
    );
    assert!(peak_mb < 400, "peak RSS {peak_mb} MB");
    // The server still logs people in.
    token_of(&client, &base, "ann", "ann-secret-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_revoked_by_the_cli_stop_working_within_the_cache_ttl() {
    let f = Fixture::new();
    add_user(&f, "ann", "ann-secret-1");
    let (_server, base) = serve(&f, "").await;
    let client = reqwest::Client::new();
    // Polls until the token is refused; the docs promise 5 s, the deadline is generous.
    let until_refused = |token: String| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let s = projects_status(&client, &base, &token).await;
                if s == 401 {
                    return;
                }
                assert_eq!(s, 200);
                assert!(Instant::now() < deadline, "the revoked token still works");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    // `user add` again replaces the user and revokes its tokens.
    let token = token_of(&client, &base, "ann", "ann-secret-1").await;
    assert_eq!(projects_status(&client, &base, &token).await, 200);
    let out = tidepool(
        &f,
        &["user", "add", "ann", "--instance", "default:Owner"],
        "ann-secret-1",
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("replaced"));
    until_refused(token).await;

    let token = token_of(&client, &base, "ann", "ann-secret-1").await;
    assert_eq!(projects_status(&client, &base, &token).await, 200);
    let out = tidepool(&f, &["user", "passwd", "ann"], "ann-secret-2");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("tokens are revoked"));
    until_refused(token).await;
    assert_eq!(post_token(&client, &base, "ann", "ann-secret-1").await, 400);

    let token = token_of(&client, &base, "ann", "ann-secret-2").await;
    assert_eq!(projects_status(&client, &base, &token).await, 200);
    let out = tidepool(&f, &["user", "remove", "ann"], "");
    assert!(out.status.success());
    until_refused(token).await;

    let out = tidepool(&f, &["user", "passwd", "ann"], "ann-secret-3");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no user \"ann\""));
}
