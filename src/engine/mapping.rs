//! Fields compiled against the origin's columns: evaluated once per row and stage.

use std::collections::BTreeMap;

use chrono::{Local, SecondsFormat, Utc};

use crate::connector::{ColumnPlan, RowAction, StagePlan};
use crate::project::{BuiltinFunction, FieldSource, Job, Stage, Transform};
use crate::script::ScriptError;
use crate::template::{Part, Token};
use crate::value::{ConvertError, FieldType, Row, Value};

/// Why a job's fields cannot be compiled, or a row's values worked out.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MappingError {
    /// A field reads an origin field the origin does not have.
    #[error(
        "stage {stage}, column {column:?} (line {line} of {file}): the origin has no field {field:?}; it has: {known}"
    )]
    NoSuchField {
        /// The stage, from 1.
        stage: usize,
        /// The destination column the field fills.
        column: String,
        /// The field's line in the job file.
        line: usize,
        /// The job file's name.
        file: String,
        /// The origin field asked for.
        field: String,
        /// The origin's fields, comma-separated.
        known: String,
    },
    /// A script field evaluated where no script runtime was made.
    #[error("column {0:?}: no script runtime here")]
    NoScriptRuntime(String),
    /// A script field failed for this row.
    #[error("column {column:?}: {source}")]
    Script {
        /// The destination column.
        column: String,
        /// What the script did.
        source: ScriptError,
    },
    /// A script called `gotoNextRow()`: the row is skipped, not failed.
    #[error("{}", crate::script::SKIP_ROW)]
    SkipRow,
    /// The value does not fit the field's `type`.
    #[error("column {column:?}: {source}")]
    Convert {
        /// The destination column.
        column: String,
        /// Why the value does not fit.
        source: ConvertError,
    },
}

/// Which connection a stage writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// The job's destination.
    Destination,
    /// The origin connection (write-back).
    Origin,
}

#[derive(Debug)]
enum Source {
    /// Script number, and the origin columns it reads (all, when it uses `row` dynamically).
    Script(usize, Vec<usize>),
    Origin(usize),
    Constant(Value),
    Template(Vec<Piece>),
    Function(BuiltinFunction),
}

#[derive(Debug)]
enum Piece {
    Text(String),
    Origin(usize),
    Stage(usize),
}

#[derive(Debug)]
struct CompiledField {
    column: String,
    source: Source,
    transforms: Vec<Transform>,
    ty: Option<FieldType>,
}

/// One stage, ready to evaluate rows.
#[derive(Debug)]
pub(crate) struct CompiledStage {
    pub(crate) name: String,
    pub(crate) target: Target,
    /// The stage's index among the stages of its target.
    pub(crate) local: usize,
    /// The stage reads no other stage's outcome, so its values can be worked
    /// out ahead, on the reader thread, while writers write earlier rows.
    pub(crate) premap: bool,
    /// A script of the stage reads the row's stage results (`stages`).
    pub(crate) reads_stages: bool,
    /// The destination columns, in value order.
    pub(crate) columns: Vec<String>,
    fields: Vec<CompiledField>,
}

/// What a field can see of the row being processed.
pub(crate) struct RowContext<'a> {
    pub(crate) number: u64,
    pub(crate) values: &'a Row,
    pub(crate) actions: &'a [Option<RowAction>],
    pub(crate) run_id: &'a str,
    /// The origin's field names, for scripts' `row`.
    pub(crate) columns: &'a [String],
    /// This thread's compiled scripts, where the job has any.
    pub(crate) scripts: Option<&'a crate::script::ScriptRuntime>,
    /// The row's stage results so far, for scripts (in jobs whose scripts read them).
    pub(crate) stages: Option<&'a [crate::script::StageView<'a>]>,
    /// Where a script's `log()` messages go (row number, message).
    pub(crate) log: &'a dyn Fn(u64, String),
}

fn find_column(columns: &[String], name: &str) -> Option<usize> {
    columns
        .iter()
        .position(|c| c == name)
        .or_else(|| columns.iter().position(|c| c.eq_ignore_ascii_case(name)))
}

/// Compiles every stage of `job` against the origin's columns.
/// An origin field the origin does not have is an error naming stage, column and line.
pub(crate) fn compile(
    job: &Job,
    columns: &[String],
    variables: &BTreeMap<String, Value>,
) -> Result<(Vec<CompiledStage>, Vec<String>), MappingError> {
    let mut locals = [0usize; 2];
    let scripts = std::cell::RefCell::new(Vec::new());
    let missing =
        |stage: usize, column: &str, line: usize, field: &str| MappingError::NoSuchField {
            stage,
            column: column.to_owned(),
            line,
            file: job
                .file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            field: field.to_owned(),
            known: columns.join(", "),
        };
    job.stages
        .iter()
        .enumerate()
        .map(|(si, stage)| {
            let target = if stage.use_origin {
                Target::Origin
            } else {
                Target::Destination
            };
            let slot = &mut locals[target as usize];
            let local = *slot;
            *slot += 1;
            let fields = stage
                .fields
                .iter()
                .map(|f| {
                    let source = match &f.source {
                        FieldSource::Origin(name) => Source::Origin(
                            find_column(columns, name)
                                .ok_or_else(|| missing(si + 1, &f.column, f.line, name))?,
                        ),
                        FieldSource::Constant(v) => Source::Constant(v.clone()),
                        FieldSource::Script(src) => {
                            let mut all = scripts.borrow_mut();
                            all.push(src.clone());
                            let read = script_columns(src, columns);
                            Source::Script(all.len() - 1, read)
                        }
                        FieldSource::Function(func) => Source::Function(*func),
                        FieldSource::Template(t) => {
                            let mut pieces = Vec::new();
                            for part in &t.parts {
                                pieces.push(match part {
                                    Part::Literal(s) => Piece::Text(s.clone()),
                                    Part::Token(Token::Origin(name)) => {
                                        Piece::Origin(find_column(columns, name).ok_or_else(
                                            || missing(si + 1, &f.column, f.line, name),
                                        )?)
                                    }
                                    Part::Token(Token::Variable(name)) => {
                                        Piece::Text(lookup_var(variables, name).to_text())
                                    }
                                    Part::Token(Token::StageAction(n)) => Piece::Stage(n - 1),
                                });
                            }
                            // Adjacent text pieces (literals and variables) become one.
                            let mut merged: Vec<Piece> = Vec::with_capacity(pieces.len());
                            for p in pieces {
                                match (merged.last_mut(), p) {
                                    (Some(Piece::Text(a)), Piece::Text(b)) => a.push_str(&b),
                                    (_, p) => merged.push(p),
                                }
                            }
                            match merged.as_slice() {
                                [] => Source::Constant(Value::Text(String::new())),
                                [Piece::Text(s)] => Source::Constant(Value::Text(s.clone())),
                                _ => Source::Template(merged),
                            }
                        }
                    };
                    Ok(CompiledField {
                        column: f.column.clone(),
                        source,
                        transforms: f.transforms.clone(),
                        ty: f.ty,
                    })
                })
                .collect::<Result<Vec<_>, MappingError>>()?;
            // STG tokens need the earlier stages' outcomes: those stages are
            // mapped by the writers; all others ahead, on the reader thread.
            let reads_stages = stage.fields.iter().any(
                |f| matches!(&f.source, FieldSource::Script(s) if crate::script::reads_stages(s)),
            );
            let premap = !reads_stages
                && !fields.iter().any(|f: &CompiledField| {
                    matches!(&f.source, Source::Template(p) if p.iter().any(|p| matches!(p, Piece::Stage(_))))
                });
            Ok(CompiledStage {
                name: stage.name.clone(),
                target,
                local,
                premap,
                reads_stages,
                columns: fields.iter().map(|f| f.column.clone()).collect(),
                fields,
            })
        })
        .collect::<Result<Vec<_>, MappingError>>()
        .map(|stages| (stages, scripts.into_inner()))
}

/// A variable by name, case-insensitively; unknown variables are NULL.
pub(crate) fn lookup_var(variables: &BTreeMap<String, Value>, name: &str) -> Value {
    variables
        .get(name)
        .or_else(|| {
            variables
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        })
        .cloned()
        .unwrap_or(Value::Null)
}

impl CompiledStage {
    /// The stage's values for one row, in column order; an error names the column.
    pub(crate) fn evaluate(
        &self,
        row: &RowContext,
        out: &mut Vec<Value>,
    ) -> Result<(), MappingError> {
        out.clear();
        for f in &self.fields {
            let mut v = match &f.source {
                Source::Script(i, read) => {
                    let rt = row
                        .scripts
                        .ok_or_else(|| MappingError::NoScriptRuntime(f.column.clone()))?;
                    let v = rt.call(
                        *i,
                        &crate::script::CallInput {
                            columns: row.columns,
                            read,
                            row: row.values,
                            stages: row.stages,
                            event: None,
                        },
                    );
                    for m in rt.take_logs() {
                        (row.log)(row.number, m);
                    }
                    v.map_err(|source| {
                        if source.is_skip_row() {
                            MappingError::SkipRow
                        } else {
                            MappingError::Script {
                                column: f.column.clone(),
                                source,
                            }
                        }
                    })?
                }
                Source::Origin(i) => {
                    let r = row.values.get(*i);
                    if f.transforms.is_empty()
                        && let Some(ty) = f.ty
                    {
                        // Convert straight from the borrowed field: no copy first.
                        out.push(r.convert(ty).map_err(|source| MappingError::Convert {
                            column: f.column.clone(),
                            source,
                        })?);
                        continue;
                    }
                    r.to_owned()
                }
                Source::Constant(v) => v.clone(),
                Source::Template(pieces) => {
                    let mut s = String::with_capacity(32);
                    for p in pieces {
                        match p {
                            Piece::Text(t) => s.push_str(t),
                            Piece::Origin(i) => row.values.get(*i).push_text(&mut s),
                            Piece::Stage(n) => {
                                if let Some(Some(a)) = row.actions.get(*n) {
                                    s.push_str(a.as_str());
                                }
                            }
                        }
                    }
                    Value::Text(s)
                }
                Source::Function(func) => function(*func, row),
            };
            for t in &f.transforms {
                v = transform(v, *t);
            }
            if let Some(ty) = f.ty {
                v = v.convert(ty).map_err(|source| MappingError::Convert {
                    column: f.column.clone(),
                    source,
                })?;
            }
            out.push(v);
        }
        Ok(())
    }
}

fn transform(v: Value, t: Transform) -> Value {
    match (t, v) {
        (Transform::NullIfBlank, v) if v.is_blank() => Value::Null,
        (Transform::Trim, Value::Text(s)) => {
            let t = s.trim();
            if t.len() == s.len() {
                Value::Text(s)
            } else {
                Value::Text(t.to_owned())
            }
        }
        (Transform::Lower, Value::Text(mut s)) => {
            if s.is_ascii() {
                s.make_ascii_lowercase();
                Value::Text(s)
            } else {
                Value::Text(s.to_lowercase())
            }
        }
        (Transform::Upper, Value::Text(mut s)) => {
            if s.is_ascii() {
                s.make_ascii_uppercase();
                Value::Text(s)
            } else {
                Value::Text(s.to_uppercase())
            }
        }
        (_, v) => v,
    }
}

fn function(f: BuiltinFunction, row: &RowContext) -> Value {
    match f {
        BuiltinFunction::Now => {
            Value::Text(Local::now().to_rfc3339_opts(SecondsFormat::Millis, false))
        }
        BuiltinFunction::UtcNow => {
            Value::Text(Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true))
        }
        BuiltinFunction::Today => Value::Text(Local::now().format("%Y-%m-%d").to_string()),
        BuiltinFunction::NewGuid => Value::Text(uuid::Uuid::new_v4().to_string()),
        BuiltinFunction::RowNumber => Value::Int(row.number as i64),
        BuiltinFunction::RunId => Value::Text(row.run_id.to_owned()),
    }
}

/// The destination's view of the stages of `target`.
pub(crate) fn plans(stages: &[Stage], target: Target) -> Vec<StagePlan> {
    stages
        .iter()
        .filter(|s| s.use_origin == (target == Target::Origin))
        .map(|s| StagePlan {
            name: s.name.clone(),
            table: s.table.clone(),
            action: s.action,
            omit_blank: s.omit_blank,
            update_on_difference: s.update_on_difference,
            columns: s
                .fields
                .iter()
                .map(|f| ColumnPlan {
                    name: f.column.clone(),
                    is_match: f.is_match,
                    insert_only: f.insert_only,
                    update_only: f.update_only,
                })
                .collect(),
        })
        .collect()
}

/// The indices among `columns` of the origin fields a script reads (all of
/// them when it cannot tell): only those are handed to the script's `row`.
pub(crate) fn script_columns(src: &str, columns: &[String]) -> Vec<usize> {
    script_reads(src)
        .map(|names| {
            names
                .iter()
                .filter_map(|n| find_column(columns, n))
                .collect()
        })
        .unwrap_or_else(|| (0..columns.len()).collect())
}

/// The origin fields a script reads (`row.Name`, `row["Name"]`, `@@ORG:Name@@`),
/// or `None` when it uses `row` in a way that could read any field.
fn script_reads(src: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let bytes = src.as_bytes();
    for (i, _) in src.match_indices("row") {
        // Only the identifier `row`, not `arrow` or `rows`.
        let before = i.checked_sub(1).map(|j| bytes[j] as char);
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$' || c == '.') {
            continue;
        }
        let rest = &src[i + 3..];
        let next = rest.chars().next();
        if next.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        if let Some(r) = rest.strip_prefix('.') {
            let name: String = r
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '$')
                .collect();
            out.push(name);
        } else if let Some(r) = rest.strip_prefix('[') {
            let quote = r.chars().next()?;
            if !matches!(quote, '"' | '\'' | '`') {
                return None;
            }
            let end = r[1..].find(quote)?;
            out.push(r[1..1 + end].to_owned());
        } else {
            return None; // `row` itself is passed around or iterated
        }
    }
    if let Ok(t) = crate::template::Template::parse(src) {
        for tok in t.tokens() {
            if let Token::Origin(n) = tok {
                out.push(n.clone());
            }
        }
    }
    Some(out)
}

/// Origin fields the job reads, for origins without a fixed schema.
pub(crate) fn origin_fields(job: &Job) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |n: &str| {
        if !out.iter().any(|o| o == n) {
            out.push(n.to_owned());
        }
    };
    for s in &job.stages {
        for f in &s.fields {
            match &f.source {
                FieldSource::Origin(n) => add(n),
                FieldSource::Template(t) => {
                    for tok in t.tokens() {
                        if let Token::Origin(n) = tok {
                            add(n);
                        }
                    }
                }
                FieldSource::Script(src) => {
                    for n in script_reads(src).unwrap_or_default() {
                        add(&n);
                    }
                }
                _ => {}
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transforms_apply_in_order() {
        let v = transform(Value::from("  Ana.SMITH@Example.com "), Transform::Trim);
        assert_eq!(
            transform(v, Transform::Lower),
            Value::from("ana.smith@example.com")
        );
        assert_eq!(
            transform(Value::from("  "), Transform::NullIfBlank),
            Value::Null
        );
        assert_eq!(
            transform(Value::from("Ärger"), Transform::Upper),
            Value::from("ÄRGER")
        );
        assert_eq!(transform(Value::Int(3), Transform::Lower), Value::Int(3));
    }
}
