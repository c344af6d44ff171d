//! JavaScript fields (QuickJS through rquickjs).
//!
//! A script field is an expression (`row.FirstName + " " + row.LastName`) or a
//! function body with `return`. It sees the origin row as `row` and the
//! variables as `vars`; a token written inside it (`@@ORG:Name@@`,
//! `@@VAR:Name@@`) becomes `row["Name"]` / `vars["Name"]`, so a value is always
//! data, never source text. Scripts are compiled once per run, in one runtime
//! per writer thread (a QuickJS runtime cannot cross threads), with a time
//! limit per call and a memory limit per runtime: a script that loops, grows
//! without end or throws is a row error with its message and line, never a
//! hang or a crash. Scripts have no file system, network or process access.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use std::cell::RefCell;

use rquickjs::{Context, Ctx, Function, Object, Persistent, Runtime};

use crate::project::template::{Part, Template, Token};
use crate::value::{Row, Value, ValueRef};

/// What a script's `gotoNextRow()` turns into: the rest of the row is skipped.
pub const SKIP_ROW: &str = "\u{1}tidepool: goto next row";

/// Helpers every script sees: Starfish's row control, and a VBScript-style
/// prelude for people porting formulas.
const PRELUDE: &str = r#"
"use strict";
const __tpSkip = "\u0001tidepool: goto next row";
var returnValue = null;
function gotoNextRow() { throw __tpSkip; }
function isBlank(v) { return v === null || v === undefined || String(v).trim() === ""; }
function skipIfBlank(v) { if (isBlank(v)) gotoNextRow(); return v; }
function UCase(s) { return s == null ? s : String(s).toUpperCase(); }
function LCase(s) { return s == null ? s : String(s).toLowerCase(); }
function Trim(s) { return s == null ? s : String(s).trim(); }
function Left(s, n) { return s == null ? s : String(s).substring(0, n); }
function Right(s, n) { if (s == null) return s; s = String(s); return s.substring(Math.max(0, s.length - n)); }
function Mid(s, start, len) { if (s == null) return s; s = String(s); return len === undefined ? s.substring(start - 1) : s.substring(start - 1, start - 1 + len); }
function Len(s) { return s == null ? 0 : String(s).length; }
function IIf(c, a, b) { return c ? a : b; }
function IsBlank(v) { return isBlank(v); }
function CStr(v) { return v == null ? "" : String(v); }
function CInt(v) { const n = Math.round(Number(v)); if (Number.isNaN(n)) throw new Error("CInt: " + v + " is not a number"); return n; }
function CDbl(v) { const n = Number(v); if (Number.isNaN(n)) throw new Error("CDbl: " + v + " is not a number"); return n; }
function Now() { return new Date().toISOString(); }
function formatDate(v, pattern) {
  const d = v instanceof Date ? v : new Date(v);
  if (Number.isNaN(d.getTime())) throw new Error("formatDate: " + v + " is not a date");
  const p = (n, w) => String(n).padStart(w, "0");
  return String(pattern || "yyyy-MM-dd")
    .replace(/yyyy/g, d.getUTCFullYear()).replace(/MM/g, p(d.getUTCMonth() + 1, 2))
    .replace(/dd/g, p(d.getUTCDate(), 2)).replace(/HH/g, p(d.getUTCHours(), 2))
    .replace(/mm/g, p(d.getUTCMinutes(), 2)).replace(/ss/g, p(d.getUTCSeconds(), 2));
}
"#;

/// The longest one call of a script may run.
pub const TIME_LIMIT: Duration = Duration::from_millis(1000);
/// The most memory one runtime (one writer thread) may use.
pub const MEMORY_LIMIT: usize = 64 * 1024 * 1024;

/// The sources a field's script may mean, as functions `(row, vars) => value`:
/// an expression, or a function body (tried in this order; with `return` only
/// the body).
pub fn function_sources(script: &str) -> Result<Vec<String>, String> {
    let template = Template::parse(script)?;
    let mut body = String::with_capacity(script.len() + 16);
    for part in &template.parts {
        match part {
            Part::Literal(s) => body.push_str(s),
            Part::Token(Token::Origin(n)) => body.push_str(&format!(
                "row[{}]",
                serde_json::to_string(n).unwrap_or_default()
            )),
            Part::Token(Token::Variable(n)) => body.push_str(&format!(
                "vars[{}]",
                serde_json::to_string(n).unwrap_or_default()
            )),
            Part::Token(t) => return Err(format!("{t} cannot be used in a script")),
        }
    }
    // The header has a line of its own; `exception` takes one off line numbers.
    let as_body = format!("(function(row, vars) {{ \"use strict\";\n{body}\n}})");
    if body.contains("return") {
        return Ok(vec![as_body]);
    }
    Ok(vec![
        format!("(function(row, vars) {{ \"use strict\"; return (\n{body}\n);}})"),
        as_body,
    ])
}

/// Compiles a field's script in `ctx`: the first of its readings that compiles.
fn compile<'js>(ctx: &Ctx<'js>, script: &str) -> Result<Function<'js>, String> {
    let mut first_error = None;
    for src in function_sources(script)? {
        match ctx.eval::<Function, _>(src.as_str()) {
            Ok(f) => return Ok(f),
            Err(rquickjs::Error::Exception) => {
                let e = exception(ctx);
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    Err(first_error.unwrap_or_else(|| "the script does not compile".into()))
}

/// The message and line of the exception pending in `ctx`.
fn exception(ctx: &Ctx) -> String {
    let v = ctx.catch();
    if let Some(e) = v.as_exception() {
        let msg = e.message().unwrap_or_else(|| "exception".into());
        // QuickJS stacks read "at … (eval_script:LINE:COLUMN)".
        let line = e.stack().and_then(|st| {
            st.lines().find_map(|l| {
                let after = l.split_once("eval_script:")?.1;
                let mut nums = after.trim_end_matches(')').split(':');
                // The function's header line comes before the script's first.
                let line = nums.next()?.parse::<u32>().ok()?.saturating_sub(1).max(1);
                Some(match nums.next().and_then(|c| c.parse::<u32>().ok()) {
                    Some(c) => format!("line {line}, column {c}"),
                    None => format!("line {line}"),
                })
            })
        });
        match line {
            Some(l) => format!("{msg} ({l})"),
            None => msg,
        }
    } else if let Some(s) = v.as_string().and_then(|s| s.to_string().ok()) {
        s
    } else {
        format!("{v:?}")
    }
}

/// Compiles a script once to tell whether it is valid JavaScript.
pub fn check(script: &str) -> Result<(), String> {
    let rt = Runtime::new().map_err(|e| e.to_string())?;
    let ctx = Context::full(&rt).map_err(|e| e.to_string())?;
    ctx.with(|ctx| {
        ctx.eval::<(), _>(PRELUDE).map_err(|e| e.to_string())?;
        compile(&ctx, script).map(|_| ())
    })
}

/// The scripts of one run, compiled in one runtime (one per writer thread).
pub struct ScriptRuntime {
    // Fields drop in order: the saved values before the context, the context
    // before the runtime (QuickJS asserts that nothing outlives its runtime).
    functions: Vec<Persistent<Function<'static>>>,
    vars: Persistent<Object<'static>>,
    ctx: Context,
    _rt: Runtime,
    deadline: Rc<Cell<Option<Instant>>>,
    logged: Rc<RefCell<Vec<String>>>,
}

impl ScriptRuntime {
    /// Compiles `scripts` (field scripts, in order) with `variables` as `vars`.
    pub fn new(scripts: &[String], variables: &BTreeMap<String, Value>) -> Result<Self, String> {
        let rt = Runtime::new().map_err(|e| e.to_string())?;
        rt.set_memory_limit(MEMORY_LIMIT);
        rt.set_max_stack_size(1024 * 1024);
        let deadline: Rc<Cell<Option<Instant>>> = Rc::new(Cell::new(None));
        let d = deadline.clone();
        rt.set_interrupt_handler(Some(Box::new(move || {
            d.get().is_some_and(|t| Instant::now() > t)
        })));
        let ctx = Context::full(&rt).map_err(|e| e.to_string())?;
        let logged: Rc<RefCell<Vec<String>>> = Rc::default();
        let sink = logged.clone();
        let (functions, vars) = ctx.with(|ctx| -> Result<_, String> {
            // log(message): into the run's log, at Low, with the row's number.
            let log = Function::new(ctx.clone(), move |msg: rquickjs::Coerced<String>| {
                let mut l = sink.borrow_mut();
                if l.len() < 10_000 {
                    l.push(msg.0);
                }
            })
            .map_err(|e| e.to_string())?;
            ctx.globals().set("log", log).map_err(|e| e.to_string())?;
            if let Err(e) = ctx.eval::<(), _>(PRELUDE) {
                return Err(format!("the script prelude failed: {e}"));
            }
            let mut fs = Vec::with_capacity(scripts.len());
            for s in scripts {
                let f = compile(&ctx, s)?;
                fs.push(Persistent::save(&ctx, f));
            }
            let vars = Object::new(ctx.clone()).map_err(|e| e.to_string())?;
            for (k, v) in variables {
                vars.set(
                    k.as_str(),
                    to_js(&ctx, v.as_ref()).map_err(|e| e.to_string())?,
                )
                .map_err(|e| e.to_string())?;
            }
            Ok((fs, Persistent::save(&ctx, vars)))
        })?;
        Ok(ScriptRuntime {
            _rt: rt,
            ctx,
            functions,
            vars,
            deadline,
            logged,
        })
    }

    /// What the scripts left in `returnValue` (null: nothing).
    pub fn return_value(&self) -> Option<Value> {
        self.ctx.with(|ctx| {
            let v: rquickjs::Value = ctx.globals().get("returnValue").ok()?;
            match from_js(&ctx, v) {
                Ok(Value::Null) | Err(_) => None,
                Ok(v) => Some(v),
            }
        })
    }

    /// The variables whose value the scripts changed from `initial`.
    pub fn changed_vars(&self, initial: &BTreeMap<String, Value>) -> BTreeMap<String, Value> {
        self.ctx.with(|ctx| {
            let mut out = BTreeMap::new();
            let Ok(vars) = self.vars.clone().restore(&ctx) else {
                return out;
            };
            for (k, v) in vars.props::<String, rquickjs::Value>().flatten() {
                if let Ok(v) = from_js(&ctx, v)
                    && initial.get(&k) != Some(&v)
                {
                    out.insert(k, v);
                }
            }
            out
        })
    }

    /// What scripts passed to `log()` since the last call of this.
    pub fn take_logs(&self) -> Vec<String> {
        std::mem::take(&mut *self.logged.borrow_mut())
    }

    /// Calls script `index` for a row whose field names are `columns`; the
    /// script's `row` holds the fields at `read`.
    pub fn call(
        &self,
        index: usize,
        columns: &[String],
        read: &[usize],
        row: &Row,
    ) -> Result<Value, String> {
        self.ctx.with(|ctx| {
            let f = self.functions[index]
                .clone()
                .restore(&ctx)
                .map_err(|e| e.to_string())?;
            let vars = self.vars.clone().restore(&ctx).map_err(|e| e.to_string())?;
            let obj = Object::new(ctx.clone()).map_err(|e| e.to_string())?;
            for &i in read {
                let Some(name) = columns.get(i) else { continue };
                obj.set(
                    name.as_str(),
                    to_js(&ctx, row.get(i)).map_err(|e| e.to_string())?,
                )
                .map_err(|e| e.to_string())?;
            }
            self.deadline.set(Some(Instant::now() + TIME_LIMIT));
            let result: Result<rquickjs::Value, _> = f.call((obj, vars));
            self.deadline.set(None);
            match result {
                Ok(v) => from_js(&ctx, v),
                Err(rquickjs::Error::Exception) => {
                    let e = exception(&ctx);
                    if e == SKIP_ROW {
                        Err(SKIP_ROW.to_owned())
                    } else if e.contains("interrupted") {
                        Err(format!(
                            "the script ran longer than {} ms and was stopped",
                            TIME_LIMIT.as_millis()
                        ))
                    } else {
                        Err(format!("the script failed: {e}"))
                    }
                }
                Err(e) => Err(format!("the script failed: {e}")),
            }
        })
    }
}

fn to_js<'js>(ctx: &Ctx<'js>, v: ValueRef) -> rquickjs::Result<rquickjs::Value<'js>> {
    use rquickjs::IntoJs;
    match v {
        ValueRef::Null => Ok(rquickjs::Value::new_null(ctx.clone())),
        ValueRef::Bool(b) => b.into_js(ctx),
        ValueRef::Int(i) => {
            if let Ok(small) = i32::try_from(i) {
                small.into_js(ctx)
            } else {
                (i as f64).into_js(ctx)
            }
        }
        ValueRef::Float(f) => f.into_js(ctx),
        ValueRef::Text(s) => s.into_js(ctx),
    }
}

fn from_js<'js>(ctx: &Ctx<'js>, v: rquickjs::Value<'js>) -> Result<Value, String> {
    if v.is_null() || v.is_undefined() {
        return Ok(Value::Null);
    }
    if let Some(b) = v.as_bool() {
        return Ok(Value::Bool(b));
    }
    if let Some(i) = v.as_int() {
        return Ok(Value::Int(i as i64));
    }
    if let Some(f) = v.as_float() {
        return Ok(if f.fract() == 0.0 && f.abs() < 9.0e15 {
            Value::Int(f as i64)
        } else {
            Value::Float(f)
        });
    }
    if let Some(s) = v.as_string() {
        return s.to_string().map(Value::Text).map_err(|e| e.to_string());
    }
    match ctx.json_stringify(v) {
        Ok(Some(s)) => s.to_string().map(Value::Text).map_err(|e| e.to_string()),
        Ok(None) => Ok(Value::Null),
        Err(e) => Err(format!("the script's value cannot be written: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(script: &str, cols: &[&str], vals: Vec<Value>) -> Result<Value, String> {
        let vars: BTreeMap<String, Value> = [("JobArgument".to_owned(), Value::from("arg"))]
            .into_iter()
            .collect();
        let rt = ScriptRuntime::new(&[script.to_owned()], &vars)?;
        let cols: Vec<String> = cols.iter().map(|c| c.to_string()).collect();
        let read: Vec<usize> = (0..cols.len()).collect();
        rt.call(0, &cols, &read, &Row::from_values(vals))
    }

    #[test]
    fn expressions_bodies_and_tokens() {
        assert_eq!(
            run(
                "row.First + ' ' + @@ORG:Last@@",
                &["First", "Last"],
                vec!["Ann".into(), "Lee".into()]
            ),
            Ok(Value::from("Ann Lee"))
        );
        assert_eq!(
            run(
                "const n = row.n * 2;\nreturn n + 1;",
                &["n"],
                vec![Value::Int(20)]
            ),
            Ok(Value::Int(41))
        );
        assert_eq!(
            run("@@VAR:JobArgument@@.toUpperCase()", &[], vec![]),
            Ok(Value::from("ARG"))
        );
        // A value full of quotes stays data.
        assert_eq!(
            run("@@ORG:x@@", &["x"], vec![Value::from("\"); evil(); (\"")]),
            Ok(Value::from("\"); evil(); (\""))
        );
        assert_eq!(run("null", &[], vec![]), Ok(Value::Null));
        assert_eq!(run("({a: 1})", &[], vec![]), Ok(Value::from("{\"a\":1}")));
        assert_eq!(run("1.5", &[], vec![]), Ok(Value::Float(1.5)));
        assert_eq!(
            run(
                "UCase(Left(row.a, 2)) + Mid('abcdef', 2, 3) + Right('xyz', 2) + Len(null) + IIf(IsBlank(' '), 'b', 'n')",
                &["a"],
                vec!["hello".into()]
            ),
            Ok(Value::from("HEbcdyz0b"))
        );
        assert_eq!(
            run(
                "formatDate('2024-02-29T13:05:09Z', 'dd/MM/yyyy HH:mm')",
                &[],
                vec![]
            ),
            Ok(Value::from("29/02/2024 13:05"))
        );
        assert_eq!(
            run("CInt('41.6') + CDbl('0.5')", &[], vec![]),
            Ok(Value::Float(42.5))
        );
        assert_eq!(
            run("skipIfBlank(row.a)", &["a"], vec!["  ".into()]),
            Err(SKIP_ROW.to_owned())
        );
    }

    #[test]
    fn runaway_scripts_are_stopped() {
        let e = run("while (true) {}", &[], vec![]).unwrap_err();
        assert!(e.contains("longer than"), "{e}");
        let e = run(
            "let a = []; while (true) { a.push(new Array(100000).fill(1)); }",
            &[],
            vec![],
        )
        .unwrap_err();
        assert!(e.contains("the script failed"), "{e}");
        let e = run("const x = 1;\nthrow new Error('nope ' + x);", &[], vec![]).unwrap_err();
        assert!(e.contains("nope 1") && e.contains("line 2"), "{e}");
        let e = run("require('fs')", &[], vec![]).unwrap_err();
        assert!(e.contains("require"), "{e}");
    }

    #[test]
    fn compile_errors_name_the_line() {
        let e = check("row.a +\n+ )").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        assert!(check("row.a + 1").is_ok());
    }
}
