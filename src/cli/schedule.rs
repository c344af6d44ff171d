//! `tidepool schedule list | pause | resume`: the schedules of the projects
//! and their state in the store (which every node reads), changed directly
//! in the store like `tidepool user` and `tidepool key`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use chrono::Utc;
use clap::{Args, Subcommand};

use super::serve::ConfigArgs;
use tidepool::project::{LoadOptions, load_projects};
use tidepool::server::scheduler::{Loaded, loaded_schedules};

/// `tidepool schedule …`.
#[derive(Subcommand)]
pub enum ScheduleCommand {
    /// List the schedules: next fire time, paused, the last tick and its run.
    List(ListArgs),
    /// Pause a schedule on every node (its ticks neither run nor count as missed).
    Pause(TargetArgs),
    /// Resume a paused schedule, from now (the pause's ticks are not caught up).
    Resume(TargetArgs),
}

/// Where the projects are.
#[derive(Args)]
pub struct ProjectsArg {
    /// The folder of projects (default: the config's `projects`).
    #[arg(long, env = "TIDEPOOL_PROJECTS")]
    projects: Option<PathBuf>,
}

/// `schedule list`.
#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    dirs: ProjectsArg,
    #[command(flatten)]
    cfg: ConfigArgs,
}

/// `schedule pause|resume PROJECT JOB NAME`.
#[derive(Args)]
pub struct TargetArgs {
    /// The project (any case).
    project: String,
    /// The job (any case).
    job: String,
    /// The schedule's name (any case; `schedule-1` … for unnamed ones).
    name: String,
    /// The project's instance, where two instances have the same project ID.
    #[arg(long)]
    instance: Option<String>,
    #[command(flatten)]
    dirs: ProjectsArg,
    #[command(flatten)]
    cfg: ConfigArgs,
}

/// Runs a `schedule` command.
pub fn schedule(cmd: ScheduleCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ScheduleCommand::List(args) => list(args),
        ScheduleCommand::Pause(args) => set_paused(args, true),
        ScheduleCommand::Resume(args) => set_paused(args, false),
    }
}

fn projects(
    dirs: &ProjectsArg,
    cfg: &ConfigArgs,
) -> anyhow::Result<tidepool::project::LoadOutcome> {
    let c = cfg.load()?;
    let dir = dirs.projects.clone().unwrap_or(c.projects.clone());
    let data_dir = std::path::absolute(&c.data_dir).unwrap_or(c.data_dir.clone());
    let loaded = load_projects(&dir, &LoadOptions { data_dir });
    for p in &loaded.problems {
        eprintln!("warning: {p}");
    }
    Ok(loaded)
}

fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let loaded = projects(&args.dirs, &args.cfg)?;
    let (_, store, rt) = args.cfg.open_store()?;
    let states = rt.block_on(store.schedule_states(None))?;
    println!(
        "{:<12} {:<16} {:<16} {:<14} {:<18} {:<18} {:<6} {:<25} last tick",
        "instance", "project", "job", "name", "cron", "timezone", "paused", "next"
    );
    for l in loaded_schedules(&loaded, None) {
        let state = states.iter().find(|s| s.key == l.key);
        let next = tidepool::project::next_after(l.schedule, Utc::now())
            .map(|t| t.with_timezone(&l.schedule.timezone).to_rfc3339())
            .unwrap_or_else(|| "never".into());
        let last = state.and_then(|s| s.last.as_ref()).map_or("-".into(), |t| {
            let run = t.run_id.map(|r| format!(" run {r}")).unwrap_or_default();
            format!(
                "{} {}{run}",
                t.tick_at.with_timezone(&l.schedule.timezone).to_rfc3339(),
                t.outcome.as_str()
            )
        });
        println!(
            "{:<12} {:<16} {:<16} {:<14} {:<18} {:<18} {:<6} {:<25} {last}",
            l.key.instance,
            l.key.project_id,
            l.key.job_id,
            l.key.name,
            l.schedule.cron,
            l.schedule.timezone.name(),
            if state.is_some_and(|s| s.paused) {
                "yes"
            } else {
                "no"
            },
            next
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn set_paused(args: TargetArgs, paused: bool) -> anyhow::Result<ExitCode> {
    let loaded = projects(&args.dirs, &args.cfg)?;
    let all = loaded_schedules(&loaded, args.instance.as_deref());
    let found: Vec<&Loaded<'_>> = all
        .iter()
        .filter(|l| {
            l.key.project_id.eq_ignore_ascii_case(&args.project)
                && l.key.job_id.eq_ignore_ascii_case(&args.job)
                && l.key.name.eq_ignore_ascii_case(&args.name)
        })
        .collect();
    let l = match found.as_slice() {
        [one] => one,
        [] => bail!(
            "no schedule {:?} of job {:?} in project {:?} (see `tidepool schedule list`)",
            args.name,
            args.job,
            args.project
        ),
        _ => bail!("that schedule is in several instances: give --instance"),
    };
    let (_, store, rt) = args.cfg.open_store()?;
    rt.block_on(store.set_schedule_paused(&l.key, paused, Utc::now()))?;
    println!(
        "{} {}/{}/{} ({})",
        if paused { "paused" } else { "resumed" },
        l.key.project_id,
        l.key.job_id,
        l.key.name,
        l.key.instance
    );
    Ok(ExitCode::SUCCESS)
}
