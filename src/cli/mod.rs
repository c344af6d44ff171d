//! The command line: `tidepool run` and `tidepool validate`.

mod graph;
mod incremental;
mod listen;
mod progress;
mod record;
mod schedule;
mod serve;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use tidepool::engine::{self, CancelToken, LogLevel, RunId, RunReport, RunRequest, RunStatus};
use tidepool::project::{LoadOptions, LoadOutcome, RunGraph, load_projects};
use tidepool::server::StoreLocation;

/// tidepool: read rows from an origin, map them, write them into a destination.
#[derive(Parser)]
#[command(name = "tidepool", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a job (and, with --chain, the jobs after it) and print what it did.
    Run(RunArgs),
    /// Check every project: files, connections, fields, chains. Exits 1 on problems.
    Validate(ValidateArgs),
    /// Serve the v1 job API (ExecuteJobAsync, ExecuteJob, Results, Webhook, token).
    Serve(serve::ServeArgs),
    /// Manage API users.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage API keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// List, pause and resume the jobs' schedules (in the store every node reads).
    #[command(subcommand)]
    Schedule(schedule::ScheduleCommand),
    /// Incremental loads: reset a job's high-water mark.
    #[command(subcommand)]
    Incremental(IncrementalCommand),
}

#[derive(Subcommand)]
enum IncrementalCommand {
    /// Forget a job's high-water mark: its next run reads everything.
    Reset(incremental::ResetArgs),
}

#[derive(Subcommand)]
enum UserCommand {
    /// Add (or replace) a user; the password is read from TIDEPOOL_PASSWORD or standard input.
    /// Replacing a user revokes its bearer tokens.
    Add(serve::UserAddArgs),
    /// Remove a user, with its API keys and tokens.
    Remove(serve::UserRemoveArgs),
    /// Change a user's password and revoke its bearer tokens (API keys stay);
    /// the password is read like `user add`'s.
    Passwd(serve::UserPasswdArgs),
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create an API key for a user and print it once.
    Create(serve::KeyCreateArgs),
    /// List the API keys: ID (the start of the key's hash), user, label.
    List(serve::KeyListArgs),
    /// Revoke an API key, by the ID `key list` prints or by the key itself.
    Revoke(serve::KeyRevokeArgs),
}

#[derive(Args)]
struct Dirs {
    /// The folder of projects.
    #[arg(long, env = "TIDEPOOL_PROJECTS", default_value = "projects")]
    projects: PathBuf,
    /// Where runs keep their files (`${DATA_DIR}` in project files).
    #[arg(long, env = "TIDEPOOL_DATA_DIR", default_value = "tidepool-data")]
    data_dir: PathBuf,
}

#[derive(Args)]
struct RunArgs {
    /// The project's ID.
    project: String,
    /// The job's ID.
    job: String,
    #[command(flatten)]
    dirs: Dirs,
    /// The job argument (`@@VAR:JobArgument@@`).
    #[arg(long, default_value = "")]
    argument: String,
    /// Start processing at this origin row (1-based).
    #[arg(long, default_value_t = 1)]
    begin_at_row: u64,
    /// Stop after this origin row (inclusive).
    #[arg(long)]
    end_after_row: Option<u64>,
    /// Writers into the destination, each with its own connection.
    #[arg(long, visible_alias = "thread-count", default_value_t = 1)]
    threads: usize,
    /// Log detail: 0 none, 1 start/end/errors, 2 stage summaries, 3 every row.
    #[arg(long, default_value_t = 1)]
    logging_level: u64,
    /// Run the jobs that depend on this one after it (its `next` jobs, the
    /// jobs that need it, and so on), in parallel where they may; the graph is
    /// shown first.
    #[arg(long, visible_alias = "chain-jobs")]
    chain: bool,
    /// Do everything but write: database work is rolled back, files are untouched.
    #[arg(long)]
    preview: bool,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// The run's ID (a GUID); a new one by default.
    #[arg(long)]
    run_id: Option<uuid::Uuid>,
    /// Record the run in this store (sqlite:PATH or postgres://…), where the
    /// server shows it (a PostgreSQL store also keeps the jobs' variables);
    /// default: <data-dir>/tidepool.sqlite if it exists.
    #[arg(long, env = "TIDEPOOL_STORE")]
    store: Option<String>,
    /// Do not record the run in any store.
    #[arg(long, conflicts_with = "store")]
    no_record: bool,
    /// Forget the job's incremental mark first: the run reads everything.
    #[arg(long, conflicts_with = "preview")]
    reset_incremental: bool,
}

#[derive(Args)]
struct ValidateArgs {
    /// The folder of projects (default: --projects, or ./projects).
    dir: Option<PathBuf>,
    #[command(flatten)]
    dirs: Dirs,
    /// Check the files only; do not open connections.
    #[arg(long)]
    no_connect: bool,
    /// Also print each project's job graph (by levels).
    #[arg(long)]
    graph: bool,
}

/// Runs the command line; the exit code is 0 for success, 1 for a failed run
/// or invalid projects, 2 for a usage or set-up error.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Validate(args) => validate(args),
        Command::Serve(args) => serve::serve(args),
        Command::User(UserCommand::Add(args)) => serve::user_add(args),
        Command::User(UserCommand::Remove(args)) => serve::user_remove(args),
        Command::User(UserCommand::Passwd(args)) => serve::user_passwd(args),
        Command::Key(KeyCommand::Create(args)) => serve::key_create(args),
        Command::Key(KeyCommand::List(args)) => serve::key_list(args),
        Command::Key(KeyCommand::Revoke(args)) => serve::key_revoke(args),
        Command::Schedule(cmd) => schedule::schedule(cmd),
        Command::Incremental(IncrementalCommand::Reset(args)) => incremental::reset(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn load(projects: &Path, data_dir: &Path) -> LoadOutcome {
    load_projects(
        projects,
        &LoadOptions {
            data_dir: absolute(data_dir),
        },
    )
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&args.dirs.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            args.dirs.data_dir.display()
        )
    })?;
    let loaded = load(&args.dirs.projects, &args.dirs.data_dir);
    let Some(project) = loaded.project(&args.project) else {
        for p in &loaded.problems {
            eprintln!("{p}");
        }
        let known: Vec<&str> = loaded.projects.iter().map(|p| p.id.0.as_str()).collect();
        bail!(
            "no project {:?} loaded from {} (loaded: {}); run `tidepool validate` for details",
            args.project,
            args.dirs.projects.display(),
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        );
    };
    let mut req = RunRequest::new(&project.id.0, &args.job);
    req.run_id = args.run_id.map(RunId).unwrap_or_default();
    req.argument = args.argument;
    req.begin_at_row = args.begin_at_row;
    req.end_after_row = args.end_after_row;
    req.thread_count = args.threads;
    req.logging_level = LogLevel::from_number(args.logging_level);
    req.chain_jobs = args.chain;
    req.preview = args.preview;

    // A preview writes nothing, its record included.
    let location = record::store_location(
        args.store.as_deref(),
        &args.dirs.data_dir,
        args.no_record || args.preview,
    )?;
    // A shared store also holds the jobs' variables and xref lists: it must
    // open. The embedded one only records the run: it may fail, said.
    let recorder = match location {
        Some(loc @ StoreLocation::Postgres(_)) => Some(record::Recorder::open(loc)?),
        Some(loc) => {
            let shown = loc.redacted();
            record::Recorder::open(loc)
                .inspect_err(|e| {
                    eprintln!("warning: the run will not be recorded in {shown}: {e:#}")
                })
                .ok()
        }
        None => None,
    };
    let kept = recorder.as_ref().and_then(|r| r.kept_state());
    if args.reset_incremental {
        incremental::reset_job(project, &args.job, kept.clone())?;
    }
    if args.chain
        && !args.json
        && let Some(graph) = RunGraph::of(project, &args.job, true)
    {
        for line in graph::levels_text("graph of the run", &graph) {
            println!("{line}");
        }
        println!();
    }
    let observer = progress::Progress::new(!args.json);
    let report = engine::run_with_state(project, &req, &CancelToken::new(), &observer, kept)?;
    observer.clear();
    if let Some(recorder) = &recorder {
        // The run happened: a record that fails is said, not fatal.
        if let Err(e) = record::record(recorder, project, &req, &report) {
            eprintln!(
                "warning: the run was not recorded in {}: {e:#}",
                recorder.location.redacted()
            );
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, args.preview);
        incremental::print_loads(&report);
        if !args.preview {
            print_resume_hint(project, &report, args.chain);
        }
    }
    Ok(if report.status == RunStatus::Complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_report(report: &RunReport, preview: bool) {
    let headers = [
        "job", "status", "rows", "inserts", "updates", "deletes", "errors", "skips", "ignores",
        "time",
    ];
    let mut rows: Vec<Vec<String>> = vec![headers.iter().map(|h| h.to_string()).collect()];
    for j in &report.jobs {
        let c = &j.counters;
        rows.push(vec![
            j.job_id.0.clone(),
            j.status.to_string(),
            c.total_rows.to_string(),
            c.inserts.to_string(),
            c.updates.to_string(),
            c.deletes.to_string(),
            c.errors.to_string(),
            c.skips.to_string(),
            c.ignores.to_string(),
            format!("{:.3}s", j.run_time.as_secs_f64()),
        ]);
    }
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    println!(
        "run {}: {}{}",
        report.run_id,
        report.status,
        if preview {
            " (preview: nothing was written)"
        } else {
            ""
        }
    );
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, cell)| {
                if i < 2 {
                    format!("{cell:<w$}", w = widths[i])
                } else {
                    format!("{cell:>w$}", w = widths[i])
                }
            })
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    const SHOWN: usize = 20;
    let entries: Vec<_> = report
        .jobs
        .iter()
        .flat_map(|j| j.log.iter())
        .filter(|e| {
            let started = format!("job {} started", e.job_id);
            let ended = format!("job {} ended", e.job_id);
            !e.message.starts_with(&started) && !e.message.starts_with(&ended)
        })
        .collect();
    for e in entries.iter().take(SHOWN) {
        println!("  {}: {}", e.job_id, e.message);
    }
    if entries.len() > SHOWN {
        println!(
            "  … {} more log entries (use --json to see them all)",
            entries.len() - SHOWN
        );
    }
    for j in &report.jobs {
        if let Some(v) = &j.return_value {
            println!("  {}: returnValue = {v}", j.job_id);
        }
    }
    if let Some(e) = &report.error {
        println!("error: {e}");
    }
}

/// Where a failed run can go on from, the way the API's rerun from the
/// failure would: its one failed job, at its first row not committed, when
/// the job's origin is ordered.
fn print_resume_hint(project: &tidepool::project::Project, report: &RunReport, chain: bool) {
    let mut failed = report.jobs.iter().filter(|j| j.status.stopped_short());
    let (Some(job), None) = (failed.next(), failed.next()) else {
        return;
    };
    let Some(row) = job.resume_at_row else {
        return;
    };
    let Some(spec) = project.jobs.get(&job.job_id) else {
        return;
    };
    match engine::origin_order(project, spec) {
        Ok(()) => println!(
            "job {} stopped before origin row {row}: to go on from there, run `tidepool run {} {} --begin-at-row {row}{}` with the run's other options",
            job.job_id,
            project.id,
            job.job_id,
            if chain { " --chain" } else { "" }
        ),
        Err(why) => println!(
            "job {} stopped before origin row {row}, but it cannot go on from there ({why}): run it again whole",
            job.job_id
        ),
    }
}

fn validate(args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let dir = args.dir.unwrap_or(args.dirs.projects);
    if !dir.is_dir() {
        bail!("{} is not a folder of projects", dir.display());
    }
    let loaded = load(&dir, &args.dirs.data_dir);
    let mut problems = loaded.problems.clone();
    let mut notes = Vec::new();
    if !args.no_connect {
        for p in &loaded.projects {
            let check = engine::check_connections(p);
            problems.extend(check.problems);
            notes.extend(check.notes);
        }
    }
    for p in &problems {
        println!("{p}");
    }
    for n in &notes {
        println!("note: {n}");
    }
    if args.graph {
        for p in &loaded.projects {
            let heading = format!("project {}, job graph", p.id);
            for line in graph::levels_text(&heading, &RunGraph::whole(p)) {
                println!("{line}");
            }
        }
    }
    let jobs: usize = loaded.projects.iter().map(|p| p.jobs.len()).sum();
    if problems.is_empty() {
        println!(
            "ok: {} project(s), {jobs} job(s) in {}",
            loaded.projects.len(),
            dir.display()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{} problem(s)", problems.len());
        Ok(ExitCode::from(1))
    }
}
