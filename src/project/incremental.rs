//! Incremental loads and file drops as a job file writes them, under
//! `[origin]`: `incremental = { field = "modified_at" }`, and for a file
//! origin whose path ends in a pattern (`path = "inbox/*.csv"`) the keys
//! `after`, `settle_secs` and `max_files`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::connector::{ConnectionConfig, OriginInput};

/// The kept variable that holds a job's high-water mark.
pub const HIGH_WATER: &str = "HighWater";
/// The kept variable that says how the mark compares (`integer`, `number`, `text`).
pub const HIGH_WATER_TYPE: &str = "HighWaterType";
/// How long a dropped file must stay unchanged before a run takes it, by default.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(5);
/// Files a run takes on at most, by default (the rest wait for the next run).
pub const DEFAULT_MAX_FILES: usize = 1000;
/// The largest `max_files` a job may set.
pub const MAX_FILES_LIMIT: usize = 100_000;

/// `incremental = { field = "…", initial = … }`: the job keeps the largest
/// value of `field` among the rows that landed, as `@@VAR:HighWater@@`.
#[derive(Debug, Clone, PartialEq)]
pub struct Incremental {
    /// The origin field whose largest value is the mark (a timestamp or a growing key).
    pub field: String,
    /// The mark bound while none is kept (first run, after a reset); with
    /// none, `@@VAR:HighWater@@` is NULL then.
    pub initial: Option<String>,
}

/// What a run does with a dropped file once all its rows are committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterFile {
    /// Leave it where it is (it is recorded as processed).
    Keep,
    /// Move it into this folder (created if missing; a name taken gets a suffix).
    MoveTo(PathBuf),
    /// Delete it.
    Delete,
}

/// A file origin that names a folder and a pattern: each run takes the files
/// not processed before.
#[derive(Debug, Clone, PartialEq)]
pub struct FileDrop {
    /// The folder (relative paths: to the project's folder).
    pub folder: PathBuf,
    /// The file-name pattern (`*` any run of characters, `?` one character).
    pub pattern: String,
    /// What happens to a file once all its rows are committed.
    pub after: AfterFile,
    /// A file modified more recently than this is still being written: it
    /// waits for a later run.
    pub settle: Duration,
    /// Files a run takes on at most; the rest wait for the next run.
    pub max_files: usize,
}

/// `incremental = { … }` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIncremental {
    field: String,
    initial: Option<toml::Value>,
}

/// The origin keys of this module, as written.
pub(super) struct RawKeys<'a> {
    pub(super) incremental: Option<&'a RawIncremental>,
    pub(super) after: Option<&'a toml::Value>,
    pub(super) settle_secs: Option<&'a toml::Value>,
    pub(super) max_files: Option<&'a toml::Value>,
    /// `origin.path`, as written.
    pub(super) path: Option<&'a str>,
    /// `origin.query`, as written.
    pub(super) query: Option<&'a str>,
}

/// Whether a file name holds a pattern character.
pub fn is_pattern(name: &str) -> bool {
    name.contains(['*', '?'])
}

/// Whether `name` matches `pattern` (`*`: any run of characters, `?`: one).
pub fn matches(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // The classic two-pointer match with one star to go back to.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Splits a path whose last component is a pattern into folder and pattern.
pub fn split_pattern(path: &Path) -> Option<(PathBuf, String)> {
    let name = path.file_name()?.to_str()?;
    if !is_pattern(name) {
        return None;
    }
    let folder = path.parent().map(Path::to_owned).unwrap_or_default();
    Some((folder, name.to_owned()))
}

/// Checks the origin's incremental and file-drop keys against its connection;
/// the problems, each a sentence about the `[origin]` table.
pub(super) fn check(
    keys: &RawKeys<'_>,
    conn: Option<&ConnectionConfig>,
) -> Result<(Option<Incremental>, Option<FileDrop>), Vec<String>> {
    let mut problems = Vec::new();
    let incremental = keys.incremental.and_then(|raw| {
        incremental(raw, keys.query, conn)
            .map_err(|e| problems.push(e))
            .ok()
    });
    let path = keys
        .path
        .map(PathBuf::from)
        .or_else(|| conn.and_then(|c| c.connector().file_path().map(Path::to_owned)));
    let pattern = path.as_deref().and_then(split_pattern);
    let drop = match pattern {
        Some((folder, pattern)) => {
            if conn.is_some_and(|c| c.capabilities().origin != OriginInput::File) {
                problems.push(format!(
                    "origin: the path pattern {pattern:?} needs a file connection (csv, json)"
                ));
            }
            drop_keys(keys, folder, pattern)
                .map_err(|e| problems.extend(e))
                .ok()
        }
        None => {
            for (key, set) in [
                ("after", keys.after.is_some()),
                ("settle_secs", keys.settle_secs.is_some()),
                ("max_files", keys.max_files.is_some()),
            ] {
                if set {
                    problems.push(format!(
                        "origin.{key} is for a file drop: give the origin a path whose file name is a pattern, such as \"inbox/*.csv\""
                    ));
                }
            }
            None
        }
    };
    if problems.is_empty() {
        Ok((incremental, drop))
    } else {
        Err(problems)
    }
}

fn incremental(
    raw: &RawIncremental,
    query: Option<&str>,
    conn: Option<&ConnectionConfig>,
) -> Result<Incremental, String> {
    if raw.field.trim().is_empty() {
        return Err("origin.incremental.field must name an origin field".into());
    }
    let initial = match &raw.initial {
        None => None,
        Some(toml::Value::String(s)) => Some(s.clone()),
        Some(toml::Value::Integer(i)) => Some(i.to_string()),
        Some(toml::Value::Float(f)) => Some(f.to_string()),
        Some(toml::Value::Datetime(d)) => Some(d.to_string()),
        Some(other) => {
            return Err(format!(
                "origin.incremental.initial must be text, a number or a date, not {}",
                other.type_str()
            ));
        }
    };
    // A database origin filters in its query; a query without the mark would
    // read every row on every run.
    let sql = conn.is_some_and(|c| matches!(c.kind(), "sqlite" | "postgres" | "mysql"));
    if sql && !query.is_some_and(|q| q.to_ascii_lowercase().contains("@@var:highwater@@")) {
        return Err(format!(
            "origin.incremental: the query must filter on the mark, e.g. WHERE (@@VAR:HighWater@@ IS NULL OR {f} > @@VAR:HighWater@@) ORDER BY {f}",
            f = raw.field
        ));
    }
    Ok(Incremental {
        field: raw.field.clone(),
        initial,
    })
}

fn drop_keys(
    keys: &RawKeys<'_>,
    folder: PathBuf,
    pattern: String,
) -> Result<FileDrop, Vec<String>> {
    let mut problems = Vec::new();
    let after = match keys.after {
        None => AfterFile::Keep,
        Some(toml::Value::String(s)) if s == "delete" => AfterFile::Delete,
        Some(toml::Value::String(s)) if s == "keep" => AfterFile::Keep,
        Some(toml::Value::Table(t)) if t.len() == 1 && t.contains_key("move_to") => {
            match t.get("move_to") {
                Some(toml::Value::String(dir)) if !dir.trim().is_empty() => {
                    AfterFile::MoveTo(PathBuf::from(dir))
                }
                _ => {
                    problems.push("origin.after.move_to must be a folder path".into());
                    AfterFile::Keep
                }
            }
        }
        Some(_) => {
            problems.push(
                "origin.after must be \"delete\", \"keep\" or { move_to = \"folder/\" }".into(),
            );
            AfterFile::Keep
        }
    };
    let settle = match keys.settle_secs {
        None => DEFAULT_SETTLE,
        Some(v) => match v.as_float().or(v.as_integer().map(|i| i as f64)) {
            Some(s) if (0.0..=86_400.0).contains(&s) => Duration::from_secs_f64(s),
            _ => {
                problems.push("origin.settle_secs must be a number of seconds, 0 to 86400".into());
                DEFAULT_SETTLE
            }
        },
    };
    let max_files = match keys.max_files {
        None => DEFAULT_MAX_FILES,
        Some(v) => match v.as_integer() {
            Some(n) if n >= 1 && n as usize <= MAX_FILES_LIMIT => n as usize,
            _ => {
                problems.push(format!(
                    "origin.max_files must be a whole number, 1 to {MAX_FILES_LIMIT}"
                ));
                DEFAULT_MAX_FILES
            }
        },
    };
    if is_pattern(&folder.to_string_lossy()) {
        problems.push(format!(
            "origin: only the file name may be a pattern, not the folder {}",
            folder.display()
        ));
    }
    if problems.is_empty() {
        Ok(FileDrop {
            folder,
            pattern,
            after,
            settle,
            max_files,
        })
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_names() {
        assert!(matches("*.csv", "a.csv"));
        assert!(matches("*.csv", ".csv"));
        assert!(!matches("*.csv", "a.csv.tmp"));
        assert!(matches("orders-??.csv", "orders-01.csv"));
        assert!(!matches("orders-??.csv", "orders-1.csv"));
        assert!(matches("a*b*c", "aXXbYYc"));
        assert!(!matches("a*b*c", "aXXbYY"));
        assert!(matches("*", "anything"));
        assert!(is_pattern("*.csv") && !is_pattern("a.csv"));
        assert_eq!(
            split_pattern(Path::new("inbox/*.csv")),
            Some((PathBuf::from("inbox"), "*.csv".to_owned()))
        );
        assert_eq!(split_pattern(Path::new("inbox/a.csv")), None);
    }

    fn keys<'a>(after: Option<&'a toml::Value>, max: Option<&'a toml::Value>) -> RawKeys<'a> {
        RawKeys {
            incremental: None,
            after,
            settle_secs: None,
            max_files: max,
            path: Some("in/*.csv"),
            query: None,
        }
    }

    #[test]
    fn drop_keys_are_checked() {
        let mv: toml::Value =
            toml::from_str::<toml::Table>("a = { move_to = \"done\" }").unwrap()["a"].clone();
        let (_, d) = check(&keys(Some(&mv), None), None).unwrap();
        let d = d.unwrap();
        assert_eq!(d.after, AfterFile::MoveTo("done".into()));
        assert_eq!((d.settle, d.max_files), (DEFAULT_SETTLE, DEFAULT_MAX_FILES));
        let bad = toml::Value::String("shred".into());
        let e = check(&keys(Some(&bad), Some(&toml::Value::Integer(0))), None).unwrap_err();
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].contains("origin.after must be"), "{e:?}");
        assert!(e[1].contains("origin.max_files"), "{e:?}");
        let mut no_pattern = keys(Some(&bad), None);
        no_pattern.path = Some("in/a.csv");
        let e = check(&no_pattern, None).unwrap_err();
        assert!(e[0].contains("origin.after is for a file drop"), "{e:?}");
    }
}
