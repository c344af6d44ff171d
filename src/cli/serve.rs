//! `tidepool serve`, `tidepool user add`, `tidepool key create`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;

use tidepool::api;
use tidepool::server::{ServerConfig, Service, StoreLocation};
use tidepool::store::{PgStoreOptions, PostgresStore, Role, SqliteStore, Store, UserRecord};

/// Where the server's settings come from: a file, then flags.
#[derive(Args)]
pub struct ConfigArgs {
    /// A TOML config file (see the README for its keys).
    #[arg(long, env = "TIDEPOOL_CONFIG")]
    config: Option<PathBuf>,
    /// Where runs and the store keep their files.
    #[arg(long, env = "TIDEPOOL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The store: sqlite:PATH (one node; default <data-dir>/tidepool.sqlite)
    /// or postgres://USER@HOST:PORT/DATABASE (any number of nodes).
    #[arg(long, env = "TIDEPOOL_STORE")]
    store: Option<String>,
}

impl ConfigArgs {
    pub(super) fn load(&self) -> anyhow::Result<ServerConfig> {
        let mut c = match &self.config {
            Some(p) => ServerConfig::from_file(p)?,
            None => ServerConfig::default(),
        };
        if let Some(d) = &self.data_dir {
            c.data_dir = d.clone();
        }
        if let Some(s) = &self.store {
            c.store = Some(s.clone());
        }
        Ok(c)
    }

    /// The settings, the store they name, and a runtime to use it on.
    pub(super) fn open_store(
        &self,
    ) -> anyhow::Result<(ServerConfig, Arc<dyn Store>, tokio::runtime::Runtime)> {
        let c = self.load()?;
        let rt = runtime()?;
        let store = rt.block_on(connect_store(&c))?;
        Ok((c, store, rt))
    }
}

/// Opens the store the settings name (a PostgreSQL store is migrated to this
/// binary's schema on the way).
async fn connect_store(c: &ServerConfig) -> anyhow::Result<Arc<dyn Store>> {
    let location = c.store_location()?;
    let named = || format!("cannot open the store {}", location.redacted());
    Ok(match &location {
        StoreLocation::Sqlite(path) => Arc::new(SqliteStore::open(path).with_context(named)?),
        StoreLocation::Postgres(url) => Arc::new(
            PostgresStore::connect(
                url,
                PgStoreOptions {
                    node_id: Some(c.node_name()),
                    ..PgStoreOptions::default()
                },
            )
            .await
            .with_context(named)?,
        ),
    })
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Address to listen on (default 127.0.0.1:8080).
    #[arg(long, env = "TIDEPOOL_LISTEN")]
    listen: Option<SocketAddr>,
    /// The folder of projects (default ./projects).
    #[arg(long, env = "TIDEPOOL_PROJECTS")]
    projects: Option<PathBuf>,
    /// Runs executing at once.
    #[arg(long)]
    workers: Option<usize>,
    /// Runs that may wait before ExecuteJobAsync answers 503.
    #[arg(long)]
    queue_size: Option<u64>,
    /// The largest request body, in bytes.
    #[arg(long)]
    body_limit: Option<usize>,
    /// Seconds ExecuteJob waits before answering 202 with the run as it stands (0: no limit).
    #[arg(long)]
    execute_job_wait_secs: Option<u64>,
    /// Signing secret for completion webhooks (Standard Webhooks).
    #[arg(long, env = "TIDEPOOL_WEBHOOK_SECRET")]
    webhook_secret: Option<String>,
    /// Serve without users on a non-loopback address.
    #[arg(long)]
    insecure: bool,
    /// Connections open at once (default: from the open-file limit).
    #[arg(long)]
    max_connections: Option<usize>,
    /// This node's name in a shared store (default HOST:PORT).
    #[arg(long, env = "TIDEPOOL_NODE_ID")]
    node_id: Option<String>,
    /// Seconds a node holds a run without renewing it before another node
    /// takes it over (default 15).
    #[arg(long)]
    lease_secs: Option<u64>,
}

#[derive(Args)]
pub struct UserAddArgs {
    /// The user name.
    name: String,
    /// A role in an instance, as INSTANCE:ROLE (Owner, Full, ReadOnly, Metrics); repeat for
    /// more. `*:Metrics` reads every instance's /metrics series.
    #[arg(long = "instance", required = true)]
    instances: Vec<String>,
    /// The instance used when a request names none (default: the first --instance).
    #[arg(long)]
    primary: Option<String>,
    #[command(flatten)]
    cfg: ConfigArgs,
}

#[derive(Args)]
pub struct KeyCreateArgs {
    /// The user the key acts as.
    user: String,
    /// A label to recognise the key by.
    #[arg(long, default_value = "")]
    label: String,
    #[command(flatten)]
    cfg: ConfigArgs,
}

#[derive(Args)]
pub struct UserRemoveArgs {
    /// The user name.
    name: String,
    #[command(flatten)]
    cfg: ConfigArgs,
}

#[derive(Args)]
pub struct UserPasswdArgs {
    /// The user name.
    name: String,
    #[command(flatten)]
    cfg: ConfigArgs,
}

#[derive(Args)]
pub struct KeyListArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
}

#[derive(Args)]
pub struct KeyRevokeArgs {
    /// The key's ID as `tidepool key list` prints it, or the key itself.
    key: String,
    #[command(flatten)]
    cfg: ConfigArgs,
}

/// How `key list` shows a key: the start of its hash (the key is never kept).
const KEY_ID_LEN: usize = 12;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TIDEPOOL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut c = args.cfg.load()?;
    if let Some(l) = args.listen {
        c.listen = l;
    }
    if let Some(p) = args.projects {
        c.projects = p;
    }
    if let Some(w) = args.workers {
        c.workers = w;
    }
    if let Some(q) = args.queue_size {
        c.queue_size = q;
    }
    if let Some(b) = args.body_limit {
        c.body_limit = b;
    }
    if let Some(w) = args.execute_job_wait_secs {
        c.execute_job_wait_secs = w;
    }
    if args.webhook_secret.is_some() {
        c.webhooks.secret = args.webhook_secret;
    }
    c.insecure |= args.insecure;
    if args.max_connections.is_some() {
        c.max_connections = args.max_connections;
    }
    if args.node_id.is_some() {
        c.node_id = args.node_id;
    }
    if let Some(l) = args.lease_secs {
        c.lease_secs = l;
    }
    c.lease()?;
    let open_files = super::listen::raise_open_file_limit();
    let limits = super::listen::Limits::new(&c, open_files)?;
    std::fs::create_dir_all(&c.data_dir)
        .with_context(|| format!("cannot create the data directory {}", c.data_dir.display()))?;
    let location = c.store_location()?;
    let rt = runtime()?;
    let store_location = location.clone();
    let served = rt.block_on(async move {
        api::metrics_handle();
        let store = connect_store(&c).await?;
        let svc = Service::new(c.clone(), store).await?;
        if svc.open {
            if !c.listen.ip().is_loopback() && !c.insecure {
                bail!(
                    "no users are configured and {} is not a loopback address: add one with `tidepool user add`, or pass --insecure to serve without authentication",
                    c.listen
                );
            }
            tracing::warn!("no users are configured: the API is open to anyone who can reach {}", c.listen);
        }
        let loaded = svc.projects();
        tracing::info!(
            "serving {} project(s) from {} ({} not loaded); store {}; node {}",
            loaded.projects.len(),
            c.projects.display(),
            loaded.problems.len(),
            location.redacted(),
            svc.node_id()
        );
        let listener = tokio::net::TcpListener::bind(c.listen)
            .await
            .with_context(|| format!("cannot listen on {}", c.listen))?;
        svc.start();
        reload_on_change(&svc);
        tracing::info!("listening on http://{}", c.listen);
        tracing::info!(
            "open-file limit {}; at most {} connections; header read {:?}, idle {:?}, body read {:?}; headers up to {} bytes",
            open_files.map_or_else(|| "unlimited".to_owned(), |n| n.to_string()),
            limits.max_connections,
            limits.header_read,
            limits.idle,
            limits.body_read,
            limits.max_header_bytes
        );
        let app = api::app(api::AppState::new(svc.clone()));
        let stopping = svc.clone();
        let drain = std::time::Duration::from_secs(c.shutdown_grace_secs);
        super::listen::serve(listener, app, limits, drain, async move {
            shutdown_signal().await;
            tracing::info!("stopping: no new runs; waiting for running ones");
            stopping.shutdown().await;
        })
        .await;
        Ok(ExitCode::SUCCESS)
    });
    // Every task has ended once the runtime is down, so nothing writes after
    // this: leave the store in one file with an empty log.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    if let StoreLocation::Sqlite(path) = &store_location
        && let Err(e) = SqliteStore::empty_log(path, std::time::Duration::from_secs(3))
    {
        tracing::warn!("the store's log was not emptied at exit: {e}");
    }
    served
}

/// Projects reload on SIGHUP and when a file under the projects folder changes.
fn reload_on_change(svc: &Arc<Service>) {
    tokio::spawn(
        svc.clone()
            .watch_projects(std::time::Duration::from_secs(2)),
    );
    #[cfg(unix)]
    if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        let svc = svc.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the projects");
                let s = svc.clone();
                let _ = tokio::task::spawn_blocking(move || s.reload_projects()).await;
            }
        });
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

pub fn user_add(args: UserAddArgs) -> anyhow::Result<ExitCode> {
    let mut grants = Vec::new();
    for g in &args.instances {
        let (inst, role) = g
            .rsplit_once(':')
            .with_context(|| format!("--instance {g:?}: write INSTANCE:ROLE, e.g. acme:Owner"))?;
        let role: Role = role.parse()?;
        if inst == api::auth::ALL_INSTANCES && role != Role::Metrics {
            bail!("--instance {g:?}: {inst} (every instance) goes with the Metrics role only");
        }
        grants.push((inst.to_owned(), role));
    }
    let primary = args.primary.clone().unwrap_or_else(|| grants[0].0.clone());
    let hash = read_password_hash(&args.name)?;
    let (_, store, rt) = args.cfg.open_store()?;
    let existed = rt.block_on(store.user(&args.name))?.is_some();
    rt.block_on(store.put_user(UserRecord {
        name: args.name.clone(),
        password_hash: hash,
        primary_instance: primary.clone(),
        grants,
    }))?;
    if existed {
        println!(
            "user {} replaced (primary instance {primary}); its bearer tokens are revoked (a running server stops accepting them within 5 s)",
            args.name
        );
    } else {
        println!("user {} saved (primary instance {primary})", args.name);
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads a password from TIDEPOOL_PASSWORD or one line of standard input,
/// and hashes it.
fn read_password_hash(name: &str) -> anyhow::Result<String> {
    let password = match std::env::var("TIDEPOOL_PASSWORD") {
        Ok(p) => p,
        Err(_) => {
            eprintln!("password for {name} (one line on standard input):");
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    if password.len() < 8 {
        bail!("the password must be at least 8 characters");
    }
    Ok(api::auth::hash_password(&password)?)
}

pub fn user_passwd(args: UserPasswdArgs) -> anyhow::Result<ExitCode> {
    let (_, store, rt) = args.cfg.open_store()?;
    if rt.block_on(store.user(&args.name))?.is_none() {
        bail!("no user {:?}: add it with `tidepool user add`", args.name);
    }
    let hash = read_password_hash(&args.name)?;
    if !rt.block_on(store.set_password(&args.name, &hash))? {
        bail!("no user {:?}", args.name);
    }
    println!(
        "password of {} changed; its bearer tokens are revoked (a running server stops accepting them within 5 s; API keys stay)",
        args.name
    );
    Ok(ExitCode::SUCCESS)
}

pub fn key_create(args: KeyCreateArgs) -> anyhow::Result<ExitCode> {
    let (_, store, rt) = args.cfg.open_store()?;
    if rt.block_on(store.user(&args.user))?.is_none() {
        bail!(
            "no user {:?}: add it first with `tidepool user add`",
            args.user
        );
    }
    let key = api::auth::new_secret("tpk_");
    rt.block_on(store.put_api_key(&api::auth::digest(&key), &args.user, &args.label))?;
    println!("{key}");
    eprintln!("this key is shown once; send it as X-API-Key: <key>");
    Ok(ExitCode::SUCCESS)
}

pub fn user_remove(args: UserRemoveArgs) -> anyhow::Result<ExitCode> {
    let (_, store, rt) = args.cfg.open_store()?;
    if !rt.block_on(store.remove_user(&args.name))? {
        bail!("no user {:?}", args.name);
    }
    println!(
        "user {} removed, with its API keys and tokens (a running server stops accepting them within 5 s)",
        args.name
    );
    Ok(ExitCode::SUCCESS)
}

pub fn key_list(args: KeyListArgs) -> anyhow::Result<ExitCode> {
    let (_, store, rt) = args.cfg.open_store()?;
    let keys = rt.block_on(store.api_keys())?;
    println!("{:<KEY_ID_LEN$}  {:<20}  label", "id", "user");
    for k in keys {
        println!(
            "{:<KEY_ID_LEN$}  {:<20}  {}",
            &k.key_hash[..KEY_ID_LEN.min(k.key_hash.len())],
            k.user,
            k.label
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn key_revoke(args: KeyRevokeArgs) -> anyhow::Result<ExitCode> {
    let (_, store, rt) = args.cfg.open_store()?;
    let hash = if args.key.starts_with("tpk_") {
        api::auth::digest(&args.key)
    } else {
        let id = args.key.to_ascii_lowercase();
        if id.len() < 8 {
            bail!(
                "give at least 8 characters of the key's ID (see `tidepool key list`), or the key itself"
            );
        }
        let found: Vec<String> = rt
            .block_on(store.api_keys())?
            .into_iter()
            .map(|k| k.key_hash)
            .filter(|h| h.starts_with(&id))
            .collect();
        match found.as_slice() {
            [one] => one.clone(),
            [] => bail!(
                "no API key has the ID {:?} (see `tidepool key list`)",
                args.key
            ),
            _ => bail!(
                "{} keys start with {:?}: give more of the ID",
                found.len(),
                args.key
            ),
        }
    };
    if !rt.block_on(store.remove_api_key(&hash))? {
        bail!("no such API key (see `tidepool key list`)");
    }
    println!(
        "key {} revoked (a running server stops accepting it within 5 s)",
        &hash[..KEY_ID_LEN]
    );
    Ok(ExitCode::SUCCESS)
}
