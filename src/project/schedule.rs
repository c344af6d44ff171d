//! Schedules of a job (`[[schedules]]` in its file): when the server starts
//! a run of it by itself, with which parameters, and what it does about
//! missed ticks and runs that are still going.
//!
//! Fire times are computed by [`next_after`], a pure function of the
//! schedule and a clock reading, so that the daylight-saving rules can be
//! tested at real transitions. They follow Vixie cron: a fixed-time schedule
//! whose local time falls in a spring-forward gap fires once, right after the
//! gap; in a fall-back repeat it fires once (the first pass); a schedule that
//! fires every N seconds, minutes or hours follows real elapsed time.

use std::collections::BTreeSet;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use serde::Deserialize;
use toml::Spanned;

use crate::run::MAX_THREADS;

/// The longest schedule name (it is part of the API's paths).
const MAX_NAME: usize = 64;
/// The longest job argument a schedule may give.
const MAX_ARGUMENT: usize = 64 * 1024;
/// The most schedules a job may have.
const MAX_SCHEDULES: usize = 32;
/// The most missed ticks counted one by one after a long downtime (past it,
/// the count says "at least").
pub const MAX_COUNTED: u64 = 10_000;

/// What to do about ticks that came due while no node ran the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Missed ticks are recorded as missed; the next tick to come fires.
    #[default]
    None,
    /// One run for the missed ticks (the latest of them), at once.
    Last,
}

/// What to do at a tick while the job still has a run queued or running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Record the tick as skipped; no run.
    #[default]
    Skip,
    /// Queue the run anyway (it runs once the job's limit lets it).
    Queue,
}

/// One `[[schedules]]` entry of a job, checked.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Unique in its job; `schedule-<n>` (1-based, in file order) if not given.
    pub name: String,
    /// The cron expression as written (5 fields, or 6 with seconds first).
    pub cron: String,
    /// The IANA time zone the expression is read in.
    pub timezone: Tz,
    /// The run's job argument.
    pub argument: String,
    /// The run's first origin row (1-based).
    pub begin_at_row: u64,
    /// The run's last origin row, if any.
    pub end_after_row: Option<u64>,
    /// The run's writer threads.
    pub thread_count: usize,
    /// The run's logging level (0 to 3).
    pub logging_level: u8,
    /// Whether the run continues with the job's chain.
    pub chain_jobs: bool,
    /// Where the run's result is POSTed, if anywhere.
    pub web_hook_url: Option<String>,
    /// Missed ticks after downtime.
    pub catch_up: CatchUp,
    /// A tick while the job is still going.
    pub overlap: Overlap,
    /// The entry's line in its job file.
    pub line: usize,
    parsed: Cron,
}

/// A `[[schedules]]` entry as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSchedule {
    name: Option<Spanned<String>>,
    cron: Spanned<String>,
    timezone: Option<Spanned<String>>,
    #[serde(default)]
    argument: String,
    begin_at_row: Option<Spanned<i64>>,
    end_after_row: Option<Spanned<i64>>,
    thread_count: Option<Spanned<i64>>,
    logging_level: Option<Spanned<i64>>,
    #[serde(default)]
    chain_jobs: bool,
    web_hook_url: Option<Spanned<String>>,
    #[serde(default)]
    catch_up: CatchUp,
    #[serde(default)]
    overlap: Overlap,
}

/// Parses a cron expression: 5 fields (minute first) or 6 (seconds first);
/// the reason if it is not one.
pub fn parse_cron(expr: &str) -> Result<Cron, String> {
    let fields = expr.split_whitespace().count();
    let nickname = expr.trim_start().starts_with('@');
    if !nickname && !(5..=6).contains(&fields) {
        return Err(format!(
            "cron {expr:?} has {fields} fields: give 5 (minute hour day month weekday) or 6 (second first)"
        ));
    }
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| format!("cron {expr:?}: {e}"))
}

/// Checks a job's schedules; each problem is a line and a reason.
pub(super) fn check(
    raw: Vec<Spanned<RawSchedule>>,
    line_of: &dyn Fn(usize) -> usize,
) -> Result<Vec<Schedule>, Vec<(usize, String)>> {
    let mut problems = Vec::new();
    let mut out = Vec::new();
    if raw.len() > MAX_SCHEDULES {
        let line = line_of(raw[MAX_SCHEDULES].span().start);
        problems.push((
            line,
            format!("a job may have at most {MAX_SCHEDULES} schedules"),
        ));
    }
    let mut names = BTreeSet::new();
    for (i, entry) in raw.into_iter().enumerate() {
        let line = line_of(entry.span().start);
        let mut at =
            |span: std::ops::Range<usize>, m: String| problems.push((line_of(span.start), m));
        let r = entry.into_inner();
        let name = match &r.name {
            Some(n) => {
                let s = n.get_ref();
                let ok = !s.is_empty()
                    && s.len() <= MAX_NAME
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
                if !ok {
                    at(
                        n.span(),
                        format!(
                            "schedule name {s:?} must be 1 to {MAX_NAME} of A-Z, a-z, 0-9, '-', '_', '.'"
                        ),
                    );
                }
                s.clone()
            }
            None => format!("schedule-{}", i + 1),
        };
        if !names.insert(name.to_ascii_lowercase()) {
            at(
                r.name.as_ref().map_or(0..0, |n| n.span()),
                format!("schedule name {name:?} is used twice in this job"),
            );
        }
        let parsed = match parse_cron(r.cron.get_ref()) {
            Ok(c) => Some(c),
            Err(m) => {
                at(r.cron.span(), m);
                None
            }
        };
        let timezone = match &r.timezone {
            None => Some(Tz::UTC),
            Some(t) => match t.get_ref().parse::<Tz>() {
                Ok(tz) => Some(tz),
                Err(_) => {
                    at(
                        t.span(),
                        format!(
                            "timezone {:?} is not an IANA time zone name (such as \"Europe/Berlin\" or \"UTC\")",
                            t.get_ref()
                        ),
                    );
                    None
                }
            },
        };
        let mut number = |v: &Option<Spanned<i64>>, key: &str, min: i64, max: i64| -> Option<i64> {
            let v = v.as_ref()?;
            let n = *v.get_ref();
            if n < min || n > max {
                at(v.span(), format!("{key} must be {min} to {max}, not {n}"));
                return None;
            }
            Some(n)
        };
        let begin_at_row = number(&r.begin_at_row, "begin_at_row", 1, i64::MAX).unwrap_or(1) as u64;
        let end_after_row =
            number(&r.end_after_row, "end_after_row", 1, i64::MAX).map(|n| n as u64);
        let thread_count =
            number(&r.thread_count, "thread_count", 1, MAX_THREADS as i64).unwrap_or(1) as usize;
        let logging_level = number(&r.logging_level, "logging_level", 0, 3).unwrap_or(0) as u8;
        if let (Some(end), Some(v)) = (end_after_row, &r.end_after_row)
            && end < begin_at_row
        {
            at(
                v.span(),
                format!(
                    "end_after_row ({end}) must not be less than begin_at_row ({begin_at_row})"
                ),
            );
        }
        if r.argument.len() > MAX_ARGUMENT {
            problems.push((
                line,
                format!("argument is longer than {MAX_ARGUMENT} bytes"),
            ));
        }
        let web_hook_url = r.web_hook_url.as_ref().and_then(|u| {
            let ok = is_http_url(u.get_ref());
            if !ok {
                problems.push((
                    line_of(u.span().start),
                    format!(
                        "web_hook_url must be an absolute http or https URL, not {:?}",
                        u.get_ref()
                    ),
                ));
            }
            ok.then(|| u.get_ref().clone())
        });
        let (Some(parsed), Some(timezone)) = (parsed, timezone) else {
            continue;
        };
        let s = Schedule {
            name,
            cron: r.cron.get_ref().clone(),
            timezone,
            argument: r.argument,
            begin_at_row,
            end_after_row,
            thread_count,
            logging_level,
            chain_jobs: r.chain_jobs,
            web_hook_url,
            catch_up: r.catch_up,
            overlap: r.overlap,
            line,
            parsed,
        };
        if next_after(&s, Utc::now()).is_none() {
            problems.push((
                line_of(r.cron.span().start),
                format!("cron {:?} never fires", s.cron),
            ));
        }
        out.push(s);
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// `http://host…` or `https://host…` with a host (the API's rule for webhooks).
fn is_http_url(u: &str) -> bool {
    let rest = u
        .strip_prefix("http://")
        .or_else(|| u.strip_prefix("https://"));
    rest.is_some_and(|r| {
        let host = r.split(['/', '?', '#']).next().unwrap_or("");
        !host.is_empty() && !host.contains(char::is_whitespace)
    })
}

/// The first fire time of `s` strictly after `after` (None: it never fires again).
///
/// Croner searches in real time and applies the OCPS rules, which are
/// Vixie cron's: a fixed-time expression in a spring-forward gap fires right
/// after the gap, once in a fall-back repeat; an interval fires by elapsed
/// time. The tests below pin that down at real transitions.
pub fn next_after(s: &Schedule, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let local = s.timezone.from_utc_datetime(&after.naive_utc());
    let next = s.parsed.find_next_occurrence(&local, false).ok()?;
    Some(next.with_timezone(&Utc))
}

/// The latest fire time of `s` at or before `at`, if one is after `after`.
fn latest_due(s: &Schedule, after: DateTime<Utc>, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let mut latest = next_after(s, after)?;
    if latest > at {
        return None;
    }
    // A backward search jumps over a long downtime at once. Its answer is
    // only a hint: in a repeated hour it may land on a pass the forward
    // search (the rule) skips, so the forward search goes on from just before it.
    let local = s.timezone.from_utc_datetime(&at.naive_utc());
    if let Ok(hint) = s.parsed.find_previous_occurrence(&local, true) {
        let hint = hint.with_timezone(&Utc);
        if hint > latest
            && let Some(n) = next_after(s, (hint - chrono::Duration::seconds(1)).max(after))
            && n <= at
        {
            latest = n;
        }
    }
    // Forward to the last one at or before `at` (a step or two, normally).
    let mut steps = 0;
    while let Some(n) = next_after(s, latest) {
        if n > at || steps >= MAX_COUNTED {
            break;
        }
        latest = n;
        steps += 1;
    }
    Some(latest)
}

/// Ticks that came due without a run, counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissedTicks {
    /// The first of them.
    pub first: DateTime<Utc>,
    /// The last of them (the tick recorded for them all).
    pub last: DateTime<Utc>,
    /// How many (at most [`MAX_COUNTED`]).
    pub count: u64,
}

/// A tick to fire now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DueTick {
    /// The tick.
    pub at: DateTime<Utc>,
    /// How many ticks the run stands for: 1, or more for a catch-up run.
    pub covers: u64,
    /// A catch-up run (`catch_up = "last"` after downtime).
    pub catch_up: bool,
}

/// What a scheduler does about one schedule at a clock reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TickPlan {
    /// Ticks to record as missed (no run).
    pub missed: Option<MissedTicks>,
    /// The tick to fire.
    pub fire: Option<DueTick>,
}

/// How late a tick may be and still fire as itself: the scheduler was
/// watching when it came due and only woke (or reached the store) late.
pub const LATE_LIMIT: chrono::Duration = chrono::Duration::seconds(60);
/// A tick due this long before the scheduler started still counts as on time
/// (another node was about to fire it).
pub const START_GRACE: chrono::Duration = chrono::Duration::seconds(1);

/// What to do at `now` for schedule `s` whose ticks up to `since` are dealt
/// with, by a scheduler that has been watching since `watching`.
///
/// A tick that came due while the scheduler was watching fires (only the
/// latest, if several came due at once: the others are missed). Ticks that
/// came due before it started (downtime) are missed, or with `catch_up =
/// "last"` the latest of them fires once for them all.
pub fn plan(
    s: &Schedule,
    since: DateTime<Utc>,
    now: DateTime<Utc>,
    watching: DateTime<Utc>,
) -> TickPlan {
    let Some(latest) = latest_due(s, since, now) else {
        return TickPlan::default();
    };
    let on_time = latest >= watching - START_GRACE && now - latest <= LATE_LIMIT;
    let (mut first, mut count, mut last) = (None, 0u64, None);
    let mut at = since;
    while let Some(t) = next_after(s, at) {
        if t >= latest || count >= MAX_COUNTED {
            break;
        }
        first.get_or_insert(t);
        last = Some(t);
        count += 1;
        at = t;
    }
    let earlier = first
        .zip(last)
        .map(|(first, last)| MissedTicks { first, last, count });
    if on_time {
        return TickPlan {
            missed: earlier,
            fire: Some(DueTick {
                at: latest,
                covers: 1,
                catch_up: false,
            }),
        };
    }
    let all = MissedTicks {
        first: earlier.map_or(latest, |m| m.first),
        last: latest,
        count: (count + 1).min(MAX_COUNTED),
    };
    match s.catch_up {
        CatchUp::None => TickPlan {
            missed: Some(all),
            fire: None,
        },
        CatchUp::Last => TickPlan {
            missed: None,
            fire: Some(DueTick {
                at: latest,
                covers: all.count,
                catch_up: true,
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(cron: &str, tz: &str) -> Schedule {
        Schedule {
            name: "s".into(),
            cron: cron.into(),
            timezone: tz.parse().unwrap(),
            argument: String::new(),
            begin_at_row: 1,
            end_after_row: None,
            thread_count: 1,
            logging_level: 0,
            chain_jobs: false,
            web_hook_url: None,
            catch_up: CatchUp::None,
            overlap: Overlap::Skip,
            line: 1,
            parsed: parse_cron(cron).unwrap(),
        }
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// The next `n` fire times after `from`, in UTC.
    fn fires(s: &Schedule, from: &str, n: usize) -> Vec<String> {
        let mut at = utc(from);
        let mut out = Vec::new();
        for _ in 0..n {
            at = next_after(s, at).expect("fires");
            out.push(at.format("%Y-%m-%dT%H:%M:%SZ").to_string());
        }
        out
    }

    #[test]
    fn five_and_six_fields_parse_and_others_say_why() {
        assert!(parse_cron("*/15 * * * *").is_ok());
        assert!(parse_cron("*/2 * * * * *").is_ok());
        assert!(parse_cron("0 30 2 * * MON-FRI").is_ok());
        assert!(parse_cron("@daily").is_ok());
        let e = parse_cron("* * * *").unwrap_err();
        assert!(e.contains("4 fields"), "{e}");
        let e = parse_cron("0 0 0 * * * 2030").unwrap_err();
        assert!(e.contains("7 fields"), "{e}");
        assert!(parse_cron("61 * * * *").is_err());
        assert!(parse_cron("* * * * * banana").is_err());
    }

    #[test]
    fn six_fields_fire_every_two_seconds() {
        let s = sched("*/2 * * * * *", "UTC");
        assert_eq!(
            fires(&s, "2026-01-01T00:00:00Z", 3),
            [
                "2026-01-01T00:00:02Z",
                "2026-01-01T00:00:04Z",
                "2026-01-01T00:00:06Z"
            ]
        );
    }

    #[test]
    fn new_york_spring_gap_fixed_time_fires_once_right_after_the_gap() {
        // 2026-03-08: 02:00 EST jumps to 03:00 EDT; 02:30 does not exist.
        let s = sched("30 2 * * *", "America/New_York");
        assert_eq!(
            fires(&s, "2026-03-07T00:00:00Z", 3),
            [
                "2026-03-07T07:30:00Z", // 02:30 EST
                "2026-03-08T07:00:00Z", // 03:00 EDT, right after the gap
                "2026-03-09T06:30:00Z", // 02:30 EDT
            ]
        );
    }

    #[test]
    fn new_york_fall_back_fixed_time_fires_once() {
        // 2026-11-01: 02:00 EDT falls back to 01:00 EST; 01:30 happens twice.
        let s = sched("30 1 * * *", "America/New_York");
        assert_eq!(
            fires(&s, "2026-10-31T12:00:00Z", 2),
            ["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"]
        );
    }

    #[test]
    fn new_york_every_15_minutes_follows_elapsed_time() {
        let s = sched("*/15 * * * *", "America/New_York");
        // Spring: 01:45 EST, then 03:00 EDT, 15 real minutes later.
        assert_eq!(
            fires(&s, "2026-03-08T06:30:00Z", 3),
            [
                "2026-03-08T06:45:00Z",
                "2026-03-08T07:00:00Z",
                "2026-03-08T07:15:00Z"
            ]
        );
        // Autumn: through both passes of 01:xx, every 15 real minutes.
        assert_eq!(
            fires(&s, "2026-11-01T05:30:00Z", 6),
            [
                "2026-11-01T05:45:00Z", // 01:45 EDT
                "2026-11-01T06:00:00Z", // 01:00 EST
                "2026-11-01T06:15:00Z",
                "2026-11-01T06:30:00Z",
                "2026-11-01T06:45:00Z",
                "2026-11-01T07:00:00Z", // 02:00 EST
            ]
        );
    }

    #[test]
    fn berlin_spring_and_autumn() {
        // 2026-03-29 02:00 CET jumps to 03:00 CEST; 2026-10-25 03:00 CEST falls back to 02:00 CET.
        let fixed = sched("30 2 * * *", "Europe/Berlin");
        assert_eq!(
            fires(&fixed, "2026-03-28T00:00:00Z", 3),
            [
                "2026-03-28T01:30:00Z", // 02:30 CET
                "2026-03-29T01:00:00Z", // 03:00 CEST, right after the gap
                "2026-03-30T00:30:00Z", // 02:30 CEST
            ]
        );
        assert_eq!(
            fires(&fixed, "2026-10-24T12:00:00Z", 2),
            ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]
        );
        let every = sched("*/15 * * * *", "Europe/Berlin");
        assert_eq!(
            fires(&every, "2026-03-29T00:30:00Z", 3),
            [
                "2026-03-29T00:45:00Z", // 01:45 CET
                "2026-03-29T01:00:00Z", // 03:00 CEST
                "2026-03-29T01:15:00Z"
            ]
        );
        assert_eq!(
            fires(&every, "2026-10-25T00:30:00Z", 4),
            [
                "2026-10-25T00:45:00Z", // 02:45 CEST
                "2026-10-25T01:00:00Z", // 02:00 CET
                "2026-10-25T01:15:00Z",
                "2026-10-25T01:30:00Z"
            ]
        );
    }

    fn at(s: &str) -> DateTime<Utc> {
        utc(s)
    }

    #[test]
    fn plan_fires_a_tick_due_while_watching_and_counts_the_ones_skipped_over() {
        let s = sched("*/2 * * * * *", "UTC");
        let w = at("2026-01-01T00:00:00Z");
        // Nothing due yet.
        assert_eq!(
            plan(&s, w, at("2026-01-01T00:00:01Z"), w),
            TickPlan::default()
        );
        let p = plan(&s, w, at("2026-01-01T00:00:02.5Z"), w);
        assert_eq!(
            p.fire.map(|f| (f.at, f.covers, f.catch_up)),
            Some((at("2026-01-01T00:00:02Z"), 1, false))
        );
        assert_eq!(p.missed, None);
        // Woke late past three ticks: the latest fires, the two before it are missed.
        let p = plan(&s, w, at("2026-01-01T00:00:06.1Z"), w);
        assert_eq!(p.fire.map(|f| f.at), Some(at("2026-01-01T00:00:06Z")));
        assert_eq!(
            p.missed,
            Some(MissedTicks {
                first: at("2026-01-01T00:00:02Z"),
                last: at("2026-01-01T00:00:04Z"),
                count: 2
            })
        );
    }

    #[test]
    fn plan_after_downtime_follows_catch_up() {
        let mut s = sched("*/2 * * * * *", "UTC");
        let since = at("2026-01-01T00:00:00Z");
        let started = at("2026-01-01T00:00:09.5Z");
        let now = at("2026-01-01T00:00:09.7Z");
        let p = plan(&s, since, now, started);
        assert_eq!(p.fire, None);
        assert_eq!(
            p.missed,
            Some(MissedTicks {
                first: at("2026-01-01T00:00:02Z"),
                last: at("2026-01-01T00:00:08Z"),
                count: 4
            })
        );
        s.catch_up = CatchUp::Last;
        let p = plan(&s, since, now, started);
        assert_eq!(p.missed, None);
        assert_eq!(
            p.fire,
            Some(DueTick {
                at: at("2026-01-01T00:00:08Z"),
                covers: 4,
                catch_up: true
            })
        );
        // A tick due a moment before the start is on time (another node was firing it).
        let p = plan(
            &s,
            since,
            at("2026-01-01T00:00:08.7Z"),
            at("2026-01-01T00:00:08.5Z"),
        );
        assert_eq!(
            p.fire.map(|f| (f.at, f.catch_up)),
            Some((at("2026-01-01T00:00:08Z"), false))
        );
        assert_eq!(p.missed.map(|m| m.count), Some(3));
    }

    #[test]
    fn plan_across_a_repeated_hour_counts_real_ticks() {
        // New York falls back at 06:00Z: 01:00-01:59 happens twice.
        let mut every = sched("*/15 * * * *", "America/New_York");
        every.catch_up = CatchUp::Last;
        let now = at("2026-11-01T07:05:00Z");
        let p = plan(&every, at("2026-11-01T05:00:00Z"), now, now);
        // 05:15Z to 07:00Z every 15 real minutes: 8 ticks, one catch-up run.
        assert_eq!(
            p.fire,
            Some(DueTick {
                at: at("2026-11-01T07:00:00Z"),
                covers: 8,
                catch_up: true
            })
        );
        let fixed = sched("30 1 * * *", "America/New_York");
        let p = plan(&fixed, at("2026-10-31T12:00:00Z"), now, now);
        // 01:30 once (the first pass, 05:30Z), missed.
        assert_eq!(
            p.missed,
            Some(MissedTicks {
                first: at("2026-11-01T05:30:00Z"),
                last: at("2026-11-01T05:30:00Z"),
                count: 1
            })
        );
    }

    #[test]
    fn schedules_load_with_defaults_and_bad_ones_say_where() {
        let parse = |toml: &str| {
            #[derive(Deserialize)]
            struct F {
                schedules: Vec<Spanned<RawSchedule>>,
            }
            let f: F = toml::from_str(toml).unwrap();
            check(f.schedules, &|off| toml[..off].matches('\n').count() + 1)
        };
        let ok = parse("[[schedules]]\ncron = \"0 6 * * *\"\n[[schedules]]\nname = \"nightly\"\ncron = \"0 2 * * *\"\ntimezone = \"Europe/Berlin\"\nargument = \"x\"\nthread_count = 4\ncatch_up = \"last\"\noverlap = \"queue\"\n").unwrap();
        assert_eq!(ok[0].name, "schedule-1");
        assert_eq!(
            (
                ok[0].timezone,
                ok[0].catch_up,
                ok[0].overlap,
                ok[0].thread_count
            ),
            (Tz::UTC, CatchUp::None, Overlap::Skip, 1)
        );
        assert_eq!(
            (
                ok[1].name.as_str(),
                ok[1].timezone,
                ok[1].catch_up,
                ok[1].overlap,
                ok[1].thread_count
            ),
            (
                "nightly",
                Tz::Europe__Berlin,
                CatchUp::Last,
                Overlap::Queue,
                4
            )
        );
        let bad = parse("[[schedules]]\ncron = \"0 6 * *\"\n[[schedules]]\ncron = \"0 6 * * *\"\ntimezone = \"Mars/Olympus\"\nthread_count = 0\n[[schedules]]\nname = \"a b\"\ncron = \"0 0 30 2 *\"\n").unwrap_err();
        let lines: Vec<usize> = bad.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, [2, 5, 6, 8, 9], "{bad:?}");
        assert!(bad[0].1.contains("4 fields"), "{bad:?}");
        assert!(bad[1].1.contains("Mars/Olympus"), "{bad:?}");
        assert!(bad[2].1.contains("thread_count must be 1 to 64"), "{bad:?}");
        assert!(bad[3].1.contains("\"a b\""), "{bad:?}");
        assert!(bad[4].1.contains("never fires"), "{bad:?}");
    }
}
