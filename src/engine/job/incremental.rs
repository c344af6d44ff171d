//! Incremental loads: the job's high-water mark. The mark kept from the last
//! completed run is bound as `@@VAR:HighWater@@`; the run keeps the largest
//! value of the incremental field among the rows that landed (no row error),
//! compared by type: numbers numerically, dates and timestamps as instants,
//! other text as text. An origin that cannot filter by itself (a file, an
//! HTTP resource) has its rows at or below the mark dropped as they are read.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};

use super::drops::DropRun;
use super::{JobError, RowState, RunLog};
use crate::connector::{ConnectorError, Flow, Origin, OriginInput, RowRead};
use crate::engine::LogLevel;
use crate::project::incremental::{HIGH_WATER, HIGH_WATER_TYPE};
use crate::project::{Job, Project};
use crate::run::HighWaterReport;
use crate::value::{Value, ValueRef};

/// What hears of the rows that landed: the mark, and the file drop's progress.
#[derive(Default)]
pub(super) struct Landing {
    pub(super) high_water: Option<Arc<HighWater>>,
    pub(super) drop: Option<Arc<DropRun>>,
}

impl Landing {
    /// Hears of a batch's rows once they are accounted (committed, or row errors).
    pub(super) fn landed(&self, rows: &[RowState]) {
        if let Some(h) = &self.high_water {
            h.landed(rows);
        }
        if let Some(d) = &self.drop {
            d.landed(rows);
        }
    }
}

/// A job's mark in one run: where it started, and the largest value landed.
pub(super) struct HighWater {
    field: String,
    /// The mark kept from the last completed run.
    before: Option<Value>,
    /// What the run compares and binds while no mark is kept (`initial`).
    start: Option<Value>,
    /// The field's index among the origin's fields.
    index: OnceLock<usize>,
    /// The largest value among the rows that landed.
    best: Mutex<Option<Value>>,
    /// The engine drops rows at or below the mark (origins that cannot filter).
    filter_rows: bool,
}

impl HighWater {
    /// The job's mark, if its origin is incremental: binds it (typed as it was
    /// kept) as `HighWater` in `variables`, or `initial`, or nothing (NULL).
    pub(super) fn open(
        project: &Project,
        job: &Job,
        variables: &mut BTreeMap<String, Value>,
        log: &mut RunLog<'_>,
    ) -> Option<Arc<HighWater>> {
        let inc = job.origin.incremental.as_ref()?;
        let ty = variables.remove(HIGH_WATER_TYPE).map(|v| v.to_text());
        let before = match variables.remove(HIGH_WATER) {
            Some(v) if !v.is_null() && !v.to_text().is_empty() => {
                Some(typed(&v.to_text(), ty.as_deref()))
            }
            _ => None,
        };
        let start = before
            .clone()
            .or_else(|| inc.initial.as_deref().map(|i| typed(i, None)));
        if let Some(v) = &start {
            variables.insert(HIGH_WATER.into(), v.clone());
        }
        let conn = project.connections.get(&job.origin.connection);
        let filter_rows = conn
            .is_some_and(|c| c.capabilities().origin == OriginInput::File || c.kind() == "http");
        log.push(
            LogLevel::Low,
            None,
            match (&before, &start) {
                (Some(b), _) => format!("incremental: {} above the mark {}", inc.field, b),
                (None, Some(s)) => format!(
                    "incremental: no mark kept yet; {} above the initial value {s}",
                    inc.field
                ),
                (None, None) => format!(
                    "incremental: no mark kept yet for {}; @@VAR:HighWater@@ is NULL (the query reads everything)",
                    inc.field
                ),
            },
        );
        Some(Arc::new(HighWater {
            field: inc.field.clone(),
            before,
            start,
            index: OnceLock::new(),
            best: Mutex::new(None),
            filter_rows,
        }))
    }

    /// Finds the field among the origin's fields (exactly, else ignoring case).
    pub(super) fn bind_field(&self, columns: &[String]) -> Result<(), JobError> {
        let i = columns
            .iter()
            .position(|c| *c == self.field)
            .or_else(|| {
                columns
                    .iter()
                    .position(|c| c.eq_ignore_ascii_case(&self.field))
            })
            .ok_or_else(|| {
                JobError::Load(format!(
                    "origin.incremental.field {:?} is not among the origin's fields: {}",
                    self.field,
                    columns.join(", ")
                ))
            })?;
        let _ = self.index.set(i);
        Ok(())
    }

    /// Whether a row read is at or below the mark and must be dropped (for
    /// origins that cannot filter by themselves).
    pub(super) fn drops(&self, row: &RowRead) -> bool {
        let (Some(mark), Ok(values), Some(&i)) = (&self.start, row, self.index.get()) else {
            return false;
        };
        if !self.filter_rows {
            return false;
        }
        let v = values.get(i);
        !matches!(v, ValueRef::Null) && compare(v, mark.as_ref()) != Ordering::Greater
    }

    /// Takes the largest value of the rows of a batch that landed.
    pub(super) fn landed(&self, rows: &[RowState]) {
        let Some(&i) = self.index.get() else { return };
        let mut top: Option<ValueRef<'_>> = None;
        for r in rows.iter().filter(|r| r.processed && r.error.is_none()) {
            let v = r.values.get(i);
            if matches!(v, ValueRef::Null) {
                continue;
            }
            if top.is_none_or(|t| compare(v, t) == Ordering::Greater) {
                top = Some(v);
            }
        }
        let Some(top) = top else { return };
        let mut best = self.best.lock().expect("high water lock");
        if best
            .as_ref()
            .is_none_or(|b| compare(top, b.as_ref()) == Ordering::Greater)
        {
            *best = Some(top.to_owned());
        }
    }

    /// The mark after the run: the largest of the mark before and the values landed.
    fn after(&self) -> Option<Value> {
        let best = self.best.lock().expect("high water lock").clone();
        match (&self.before, best) {
            (Some(b), Some(n)) if compare(n.as_ref(), b.as_ref()) != Ordering::Greater => {
                Some(b.clone())
            }
            (_, Some(n)) => Some(n),
            (b, None) => b.clone(),
        }
    }

    /// The variables that keep the new mark, when rows landed.
    pub(super) fn to_keep(&self) -> BTreeMap<String, String> {
        let best = self.best.lock().expect("high water lock").is_some();
        match self.after() {
            Some(v) if best => BTreeMap::from([
                (HIGH_WATER.to_owned(), v.to_text()),
                (HIGH_WATER_TYPE.to_owned(), type_name(&v).to_owned()),
            ]),
            _ => BTreeMap::new(),
        }
    }

    /// The mark as the run's report shows it; `kept`: the new mark was saved.
    pub(super) fn report(&self, kept: bool, log: &mut RunLog<'_>) -> HighWaterReport {
        let before = self.before.as_ref().map(Value::to_text);
        let after = self.after().map(|v| v.to_text());
        log.push(
            LogLevel::Low,
            None,
            format!(
                "incremental: HighWater {} -> {}{}",
                before.as_deref().unwrap_or("(none)"),
                after.as_deref().unwrap_or("(none)"),
                if kept { ", kept" } else { ", not kept" }
            ),
        );
        HighWaterReport {
            field: self.field.clone(),
            before,
            after,
            kept,
        }
    }
}

/// An origin whose rows at or below the mark are dropped as they are read.
struct Filtered {
    inner: Box<dyn Origin>,
    mark: Arc<HighWater>,
}

impl Origin for Filtered {
    fn columns(&self) -> &[String] {
        self.inner.columns()
    }

    fn read(&mut self, sink: &mut dyn FnMut(RowRead) -> Flow) -> Result<(), ConnectorError> {
        let mark = &self.mark;
        self.inner.read(&mut |r| {
            if mark.drops(&r) {
                Flow::Continue
            } else {
                sink(r)
            }
        })
    }
}

/// The origin as the pump reads it: filtered by the mark when the origin
/// cannot filter by itself (a file drop filters each file itself).
pub(super) fn filtered(
    origin: Box<dyn Origin>,
    mark: Option<&Arc<HighWater>>,
    drop: Option<&Arc<DropRun>>,
) -> Box<dyn Origin> {
    match mark {
        Some(m) if m.filter_rows && drop.is_none() => Box::new(Filtered {
            inner: origin,
            mark: Arc::clone(m),
        }),
        _ => origin,
    }
}

/// A kept mark's text as the value it was, so a database compares it as such.
fn typed(text: &str, ty: Option<&str>) -> Value {
    match ty {
        Some("integer") | None if text.trim().parse::<i64>().is_ok() => {
            Value::Int(text.trim().parse().unwrap_or_default())
        }
        Some("number") | None if text.trim().parse::<f64>().is_ok_and(f64::is_finite) => {
            Value::Float(text.trim().parse().unwrap_or_default())
        }
        _ => Value::Text(text.to_owned()),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Int(_) => "integer",
        Value::Float(_) => "number",
        _ => "text",
    }
}

/// A value as the mark compares it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Key<'a> {
    Int(i64),
    Float(f64),
    Instant(DateTime<Utc>),
    Text(&'a str),
}

fn key<'a>(v: ValueRef<'a>) -> Key<'a> {
    match v {
        ValueRef::Null => Key::Text(""),
        ValueRef::Bool(b) => Key::Int(b as i64),
        ValueRef::Int(i) => Key::Int(i),
        ValueRef::Float(f) => Key::Float(f),
        ValueRef::Text(s) => {
            let t = s.trim();
            if let Ok(i) = t.parse::<i64>() {
                Key::Int(i)
            } else if let Some(at) = instant(t) {
                Key::Instant(at)
            } else if let Ok(f) = t.parse::<f64>()
                && f.is_finite()
            {
                Key::Float(f)
            } else {
                Key::Text(s)
            }
        }
    }
}

/// Reads a date or timestamp as databases write them: RFC 3339, or
/// `YYYY-MM-DD[ HH:MM:SS[.f]][+zz[:zz]]` (no zone: taken as UTC).
fn instant(t: &str) -> Option<DateTime<Utc>> {
    if !t.as_bytes().first().is_some_and(u8::is_ascii_digit) || t.len() < 10 {
        return None;
    }
    if let Ok(d) = DateTime::parse_from_rfc3339(t) {
        return Some(d.to_utc());
    }
    for f in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z"] {
        if let Ok(d) = DateTime::parse_from_str(t, f) {
            return Some(d.to_utc());
        }
    }
    for f in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(d) = NaiveDateTime::parse_from_str(t, f) {
            return Some(d.and_utc());
        }
    }
    NaiveDate::parse_from_str(t, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|d| d.and_utc())
}

/// Compares two values by type: numbers numerically, dates and timestamps
/// as instants, anything else (or a mix) as text.
fn compare(a: ValueRef<'_>, b: ValueRef<'_>) -> Ordering {
    match (key(a), key(b)) {
        (Key::Int(x), Key::Int(y)) => x.cmp(&y),
        (Key::Int(_) | Key::Float(_), Key::Int(_) | Key::Float(_)) => {
            let f = |k| match k {
                Key::Int(i) => i as f64,
                Key::Float(f) => f,
                _ => 0.0,
            };
            f(key(a)).total_cmp(&f(key(b)))
        }
        (Key::Instant(x), Key::Instant(y)) => x.cmp(&y),
        _ => a.to_text().cmp(&b.to_text()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmp(a: &Value, b: &Value) -> Ordering {
        compare(a.as_ref(), b.as_ref())
    }

    #[test]
    fn values_compare_by_type() {
        let t = |s: &str| Value::Text(s.into());
        // Numbers numerically, as text or not.
        assert_eq!(cmp(&t("10"), &t("9")), Ordering::Greater);
        assert_eq!(cmp(&Value::Int(10), &t("9.5")), Ordering::Greater);
        assert_eq!(cmp(&Value::Float(2.5), &Value::Int(3)), Ordering::Less);
        // Timestamps as instants, whatever their zone or separator.
        assert_eq!(
            cmp(&t("2024-01-01 10:00:00+02"), &t("2024-01-01T09:00:00Z")),
            Ordering::Less
        );
        assert_eq!(
            cmp(&t("2024-01-01 10:00:00.5"), &t("2024-01-01 10:00:00")),
            Ordering::Greater
        );
        assert_eq!(
            cmp(&t("2024-01-02"), &t("2024-01-01 23:59:59")),
            Ordering::Greater
        );
        // Other text as text.
        assert_eq!(cmp(&t("b"), &t("abc")), Ordering::Greater);
    }

    #[test]
    fn a_kept_mark_is_bound_as_the_type_it_had() {
        assert_eq!(typed("42", Some("integer")), Value::Int(42));
        assert_eq!(typed("42", Some("text")), Value::Text("42".into()));
        assert_eq!(typed("1.5", None), Value::Float(1.5));
        assert_eq!(
            typed("2024-01-01 10:00:00", None),
            Value::Text("2024-01-01 10:00:00".into())
        );
        assert_eq!(type_name(&Value::Int(1)), "integer");
    }
}
