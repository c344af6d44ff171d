//! JavaScript fields (QuickJS through rquickjs).
//!
//! A script field is an expression (`row.FirstName + " " + row.LastName`) or a
//! function body with `return`. It sees the origin row as `row`, the
//! variables as `vars` and, in jobs that need them, the row's stage results as
//! `stages` (`stages[1].action`, `stages["upsert contacts"].values.Id`); an
//! operation also sees `event` (the moment, the stage, the error, the query).
//! A token written inside a script (`@@ORG:Name@@`, `@@VAR:Name@@`,
//! `@@STG:1,#Action@@`) becomes `row["Name"]` / `vars["Name"]` /
//! `stages[1].action`, so a value is always data, never source text. Scripts are compiled once per run, in one runtime
//! per writer thread (a QuickJS runtime cannot cross threads), with a time
//! limit per call and a memory limit per runtime: a script that loops, grows
//! without end or throws is a row error with its message and line, never a
//! hang or a crash. Scripts have no file system, network or process access.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use rquickjs::{Context, Ctx, Exception, Function, Object, Persistent, Runtime};

use crate::template::{Part, Template, TemplateError, Token};
use crate::value::{Row, Value, ValueRef};

/// Why a host helper failed: the host's own error, kept whole behind the
/// trait; its text becomes the exception the script sees (`xrefRead: …`).
pub type HostError = Box<dyn std::error::Error + Send + Sync>;

/// Why a script cannot be compiled or run. The text is what a row error or a
/// failed job says.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// A token written in the script does not parse.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// QuickJS itself failed (creating a runtime, passing a value in or out).
    #[error(transparent)]
    Engine(#[from] rquickjs::Error),
    /// The script is not valid JavaScript: the message and line QuickJS gave.
    #[error("{0}")]
    Compile(String),
    /// The helpers every script sees did not load.
    #[error("the script prelude failed: {0}")]
    Prelude(#[source] rquickjs::Error),
    /// The script called `gotoNextRow()`: the rest of the row is skipped.
    /// Its text is [`SKIP_ROW`], which callers that keep text compare with.
    #[error("{}", SKIP_ROW)]
    SkipRow,
    /// The call ran longer than the time limit.
    #[error("the script ran longer than {} ms and was stopped", .0.as_millis())]
    TimedOut(std::time::Duration),
    /// The script threw: its message and line.
    #[error("the script failed: {0}")]
    Threw(String),
    /// QuickJS failed while the script ran (out of memory, too deep).
    #[error("the script failed: {0}")]
    Failed(#[source] rquickjs::Error),
    /// The script's value cannot be turned into a row value.
    #[error("the script's value cannot be written: {0}")]
    Unwritable(#[source] rquickjs::Error),
}

impl ScriptError {
    /// Whether the script called `gotoNextRow()` (not a failure: the row is skipped).
    pub fn is_skip_row(&self) -> bool {
        matches!(self, ScriptError::SkipRow)
    }
}

/// What scripts may reach outside themselves: the persisted cross-reference
/// lists (`xrefRead`/`xrefWrite`) and lookups against a project's connections
/// (`lookup`). One host serves every runtime of a job's run.
pub trait ScriptHost: Send + Sync {
    /// The value `key` maps to in cross-reference list `list`, if any.
    fn xref_read(&self, list: &str, key: &str) -> Result<Option<String>, HostError>;
    /// Maps `key` to `value` in `list` (kept when the job ends, unless previewing).
    fn xref_write(&self, list: &str, key: &str, value: &str) -> Result<(), HostError>;
    /// `field` of the first row of `table` in `connection` whose columns equal
    /// `criteria`; NULL when none does.
    fn lookup(
        &self,
        connection: &str,
        table: &str,
        field: &str,
        criteria: &[(String, Value)],
    ) -> Result<Value, HostError>;
}

/// One earlier stage's result for a row, as scripts see it in `stages`.
#[derive(Debug, Clone, Copy)]
pub struct StageView<'a> {
    /// The stage's name.
    pub name: &'a str,
    /// What the stage did (`Insert`, `Update`, …); `None`: it has not run.
    pub action: Option<&'static str>,
    /// The stage's column names.
    pub columns: &'a [String],
    /// The values the stage wrote, in column order, once it ran.
    pub values: Option<&'a [Value]>,
}

/// What one call of a script sees.
pub struct CallInput<'a> {
    /// The origin's field names.
    pub columns: &'a [String],
    /// The fields of `row` the script reads (indices into `columns`).
    pub read: &'a [usize],
    /// The origin row.
    pub row: &'a Row,
    /// The row's stages so far (`stages`); `None`: the script gets none.
    pub stages: Option<&'a [StageView<'a>]>,
    /// An operation's `event` (a JSON object), or `None` for fields.
    pub event: Option<&'a serde_json::Value>,
}

/// What a script's `gotoNextRow()` turns into: the rest of the row is skipped.
pub const SKIP_ROW: &str = "\u{1}tidepool: goto next row";

/// Helpers every script sees: Starfish's row control, and a VBScript-style
/// prelude for people porting formulas.
const PRELUDE: &str = r#"
"use strict";
const __tpSkip = "\u0001tidepool: goto next row";
var returnValue = null;
function gotoNextRow() { throw __tpSkip; }
function __tpText(v) { return v === null || v === undefined ? "" : String(v); }
function varToken(name) { return "@" + "@VAR:" + name + "@" + "@"; }
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

/// The sources a script may mean, as functions `(row, vars, stages, event) => value`:
/// an expression, or a function body (tried in this order; with `return` only
/// the body).
pub fn function_sources(script: &str) -> Result<Vec<String>, TemplateError> {
    let template = Template::parse(script)?;
    let mut body = String::with_capacity(script.len() + 16);
    let mut lexer = Lexer::default();
    for part in &template.parts {
        let expr = match part {
            Part::Literal(s) => {
                lexer.feed(s);
                body.push_str(s);
                continue;
            }
            Part::Token(Token::Origin(n)) => {
                format!("row[{}]", serde_json::to_string(n).unwrap_or_default())
            }
            Part::Token(Token::Variable(n)) => {
                format!("vars[{}]", serde_json::to_string(n).unwrap_or_default())
            }
            Part::Token(Token::StageAction(n)) => format!("(stages[{n}] && stages[{n}].action)"),
        };
        // Inside a string the value is spliced in as text (as Starfish does),
        // still by concatenation, never as source.
        match lexer.state() {
            Lexed::Code => body.push_str(&expr),
            Lexed::Quoted(q) => body.push_str(&format!("{q} + __tpText({expr}) + {q}")),
            Lexed::Backtick => body.push_str(&format!("${{__tpText({expr})}}")),
            Lexed::Comment => {
                if let Part::Token(t) = part {
                    body.push_str(&t.to_string().replace("@@", "@ @"));
                }
            }
        }
    }
    // The header has a line of its own; `exception` takes one off line numbers.
    let as_body = format!("(function(row, vars, stages, event) {{ \"use strict\";\n{body}\n}})");
    if body.contains("return") {
        return Ok(vec![as_body]);
    }
    Ok(vec![
        format!("(function(row, vars, stages, event) {{ \"use strict\"; return (\n{body}\n);}})"),
        as_body,
    ])
}

/// Where a point of a script is, lexically.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lexed {
    Code,
    /// In a string with this quote.
    Quoted(char),
    /// In a template literal's text.
    Backtick,
    Comment,
}

/// A small JavaScript lexer: enough to tell code from strings and comments
/// (regular expression literals are read as code).
#[derive(Debug, Default)]
struct Lexer {
    /// Open template literals and `${` blocks: `true` for a template literal's text.
    stack: Vec<bool>,
    /// Braces open in the innermost `${` block.
    braces: Vec<usize>,
    quote: Option<char>,
    line_comment: bool,
    block_comment: bool,
    escaped: bool,
    prev: char,
}

impl Lexer {
    fn state(&self) -> Lexed {
        if self.line_comment || self.block_comment {
            Lexed::Comment
        } else if let Some(q) = self.quote {
            Lexed::Quoted(q)
        } else if self.stack.last() == Some(&true) {
            Lexed::Backtick
        } else {
            Lexed::Code
        }
    }

    fn feed(&mut self, text: &str) {
        for c in text.chars() {
            let prev = std::mem::replace(&mut self.prev, c);
            if self.line_comment {
                self.line_comment = c != '\n';
                continue;
            }
            if self.block_comment {
                if prev == '*' && c == '/' {
                    self.block_comment = false;
                    self.prev = ' ';
                }
                continue;
            }
            if self.escaped {
                self.escaped = false;
                self.prev = ' ';
                continue;
            }
            if let Some(q) = self.quote {
                match c {
                    '\\' => self.escaped = true,
                    c if c == q || c == '\n' => self.quote = None,
                    _ => {}
                }
                continue;
            }
            if self.stack.last() == Some(&true) {
                match c {
                    '\\' => self.escaped = true,
                    '`' => {
                        self.stack.pop();
                    }
                    '{' if prev == '$' => {
                        self.stack.push(false);
                        self.braces.push(0);
                    }
                    _ => {}
                }
                continue;
            }
            match c {
                '\'' | '"' => self.quote = Some(c),
                '`' => self.stack.push(true),
                '/' if prev == '/' => self.line_comment = true,
                '*' if prev == '/' => {
                    self.block_comment = true;
                    self.prev = ' ';
                }
                '{' => {
                    if let Some(b) = self.braces.last_mut() {
                        *b += 1;
                    }
                }
                '}' => match self.braces.last_mut() {
                    Some(0) => {
                        self.braces.pop();
                        self.stack.pop();
                    }
                    Some(b) => *b -= 1,
                    None => {}
                },
                _ => {}
            }
        }
    }
}

/// Whether a script reads the row's stage results (then the engine runs the
/// job's rows one at a time, stage after stage, on the writer threads).
pub fn reads_stages(script: &str) -> bool {
    script.contains("stages") || script.contains("@@STG:")
}

/// Compiles a field's script in `ctx`: the first of its readings that compiles.
fn compile<'js>(ctx: &Ctx<'js>, script: &str) -> Result<Function<'js>, ScriptError> {
    let mut first_error = None;
    for src in function_sources(script)? {
        match ctx.eval::<Function, _>(src.as_str()) {
            Ok(f) => return Ok(f),
            Err(rquickjs::Error::Exception) => {
                let e = exception(ctx);
                first_error.get_or_insert(ScriptError::Compile(e));
            }
            Err(e) => {
                first_error.get_or_insert(ScriptError::Engine(e));
            }
        }
    }
    Err(first_error.unwrap_or_else(|| ScriptError::Compile("the script does not compile".into())))
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
pub fn check(script: &str) -> Result<(), ScriptError> {
    let rt = Runtime::new()?;
    // A script can close the function it is wrapped in (`1); while (true) {…`)
    // and so run while it compiles: the default limits bound that too.
    let limits = ScriptLimits::default();
    rt.set_memory_limit(limits.memory);
    rt.set_max_stack_size(1024 * 1024);
    let deadline = Instant::now() + limits.time;
    rt.set_interrupt_handler(Some(Box::new(move || Instant::now() > deadline)));
    let ctx = Context::full(&rt)?;
    ctx.with(|ctx| {
        ctx.eval::<(), _>(PRELUDE)?;
        compile(&ctx, script).map(|_| ())
    })
}

/// The scripts of one run, compiled in one runtime (one per thread).
pub struct ScriptRuntime {
    // Fields drop in order: the saved values before the context, the context
    // before the runtime (QuickJS asserts that nothing outlives its runtime).
    functions: Vec<Persistent<Function<'static>>>,
    vars: Persistent<Object<'static>>,
    ctx: Context,
    _rt: Runtime,
    limits: ScriptLimits,
    deadline: Rc<Cell<Option<Instant>>>,
    logged: Rc<RefCell<Vec<String>>>,
}

/// Turns a Rust error into a JavaScript exception the script can catch.
fn throw(ctx: &Ctx, message: String) -> rquickjs::Error {
    Exception::throw_message(ctx, &message)
}

/// Registers the helpers that reach the host: `xrefRead`, `xrefWrite`, `lookup`.
fn register_host<'js>(ctx: &Ctx<'js>, host: Arc<dyn ScriptHost>) -> rquickjs::Result<()> {
    let h = host.clone();
    let xref_read = Function::new(
        ctx.clone(),
        move |ctx: Ctx<'js>, list: rquickjs::Coerced<String>, key: rquickjs::Coerced<String>| {
            h.xref_read(&list.0, &key.0)
                .map_err(|e| throw(&ctx, format!("xrefRead: {e}")))
        },
    )?;
    let h = host.clone();
    let xref_write = Function::new(
        ctx.clone(),
        move |ctx: Ctx<'js>,
              list: rquickjs::Coerced<String>,
              key: rquickjs::Coerced<String>,
              value: rquickjs::Value<'js>| {
            let value = match from_js(&ctx, value) {
                Ok(Value::Null) => {
                    return Err(throw(&ctx, "xrefWrite: the value is null".into()));
                }
                Ok(v) => v.to_text(),
                Err(e) => return Err(throw(&ctx, format!("xrefWrite: {e}"))),
            };
            h.xref_write(&list.0, &key.0, &value)
                .map_err(|e| throw(&ctx, format!("xrefWrite: {e}")))
        },
    )?;
    let lookup = Function::new(
        ctx.clone(),
        move |ctx: Ctx<'js>,
              connection: rquickjs::Coerced<String>,
              table: rquickjs::Coerced<String>,
              field: rquickjs::Coerced<String>,
              criteria: rquickjs::Value<'js>| {
            let Some(criteria) = criteria.into_object().filter(|o| !o.is_array()) else {
                return Err(throw(
                    &ctx,
                    "lookup: the criteria must be an object, e.g. {Email: row.Email}".into(),
                ));
            };
            let mut pairs = Vec::new();
            for prop in criteria.props::<String, rquickjs::Value>() {
                let (k, v) = prop?;
                let v = from_js(&ctx, v).map_err(|e| throw(&ctx, format!("lookup: {e}")))?;
                pairs.push((k, v));
            }
            if pairs.is_empty() {
                return Err(throw(
                    &ctx,
                    "lookup: give at least one criterion, e.g. {Email: row.Email}".into(),
                ));
            }
            let v = host
                .lookup(&connection.0, &table.0, &field.0, &pairs)
                .map_err(|e| throw(&ctx, format!("lookup: {e}")))?;
            to_js(&ctx, v.as_ref())
        },
    )?;
    let g = ctx.globals();
    g.set("xrefRead", xref_read)?;
    g.set("xrefWrite", xref_write)?;
    g.set("lookup", lookup)?;
    Ok(())
}

impl ScriptRuntime {
    /// Compiles `scripts` (in order; [`ScriptRuntime::call`] takes their index)
    /// with `variables` as `vars`, under `limits`; `host` gives the helpers
    /// that reach outside (none: those helpers are not defined).
    pub fn new(
        scripts: &[String],
        variables: &BTreeMap<String, Value>,
        limits: ScriptLimits,
        host: Option<Arc<dyn ScriptHost>>,
    ) -> Result<Self, ScriptError> {
        let rt = Runtime::new()?;
        rt.set_memory_limit(limits.memory);
        rt.set_max_stack_size(1024 * 1024);
        let deadline: Rc<Cell<Option<Instant>>> = Rc::new(Cell::new(None));
        let d = deadline.clone();
        let compiling = deadline.clone();
        rt.set_interrupt_handler(Some(Box::new(move || {
            d.get().is_some_and(|t| Instant::now() > t)
        })));
        let ctx = Context::full(&rt)?;
        let logged: Rc<RefCell<Vec<String>>> = Rc::default();
        let sink = logged.clone();
        let (functions, vars) = ctx.with(|ctx| -> Result<_, ScriptError> {
            // log(message): into the run's log, at Low, with the row's number.
            let log = Function::new(ctx.clone(), move |msg: rquickjs::Coerced<String>| {
                let mut l = sink.borrow_mut();
                if l.len() < 10_000 {
                    l.push(msg.0);
                }
            })?;
            ctx.globals().set("log", log)?;
            if let Some(h) = host {
                register_host(&ctx, h)?;
            }
            ctx.eval::<(), _>(PRELUDE).map_err(ScriptError::Prelude)?;
            let mut fs = Vec::with_capacity(scripts.len());
            // Compiling can run code (see `check`): under the time limit too.
            compiling.set(Some(Instant::now() + limits.time));
            let compiled = scripts.iter().try_for_each(|s| {
                fs.push(Persistent::save(&ctx, compile(&ctx, s)?));
                Ok::<_, ScriptError>(())
            });
            compiling.set(None);
            compiled?;
            let vars = Object::new(ctx.clone())?;
            for (k, v) in variables {
                vars.set(k.as_str(), to_js(&ctx, v.as_ref())?)?;
            }
            Ok((fs, Persistent::save(&ctx, vars)))
        })?;
        Ok(ScriptRuntime {
            _rt: rt,
            ctx,
            functions,
            vars,
            limits,
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

    /// Sets `returnValue` (what another thread's scripts left).
    pub fn set_return_value(&self, v: &Value) {
        self.ctx.with(|ctx| {
            if let Ok(js) = to_js(&ctx, v.as_ref()) {
                let _ = ctx.globals().set("returnValue", js);
            }
        })
    }

    /// Sets variables in `vars` (what other threads' scripts changed).
    pub fn set_vars(&self, vars: &BTreeMap<String, Value>) {
        self.ctx.with(|ctx| {
            let Ok(obj) = self.vars.clone().restore(&ctx) else {
                return;
            };
            for (k, v) in vars {
                if let Ok(js) = to_js(&ctx, v.as_ref()) {
                    let _ = obj.set(k.as_str(), js);
                }
            }
        })
    }

    /// Every variable in `vars` now.
    pub fn vars(&self) -> BTreeMap<String, Value> {
        self.ctx.with(|ctx| {
            let mut out = BTreeMap::new();
            if let Ok(vars) = self.vars.clone().restore(&ctx) {
                for (k, v) in vars.props::<String, rquickjs::Value>().flatten() {
                    if let Ok(v) = from_js(&ctx, v) {
                        out.insert(k, v);
                    }
                }
            }
            out
        })
    }

    /// The variables whose value the scripts changed from `initial`.
    pub fn changed_vars(&self, initial: &BTreeMap<String, Value>) -> BTreeMap<String, Value> {
        let mut now = self.vars();
        now.retain(|k, v| initial.get(k) != Some(v));
        now
    }

    /// What scripts passed to `log()` since the last call of this.
    pub fn take_logs(&self) -> Vec<String> {
        std::mem::take(&mut *self.logged.borrow_mut())
    }

    /// Calls script `index` with `input`.
    pub fn call(&self, index: usize, input: &CallInput) -> Result<Value, ScriptError> {
        self.ctx.with(|ctx| {
            let f = self.functions[index].clone().restore(&ctx)?;
            let vars = self.vars.clone().restore(&ctx)?;
            let obj = Object::new(ctx.clone())?;
            for &i in input.read {
                let Some(name) = input.columns.get(i) else {
                    continue;
                };
                obj.set(name.as_str(), to_js(&ctx, input.row.get(i))?)?;
            }
            let stages = match input.stages {
                Some(st) => stages_js(&ctx, st)?,
                None => rquickjs::Value::new_undefined(ctx.clone()),
            };
            let event = match input.event {
                Some(ev) => ctx.json_parse(ev.to_string())?,
                None => rquickjs::Value::new_undefined(ctx.clone()),
            };
            self.deadline.set(Some(Instant::now() + self.limits.time));
            let result: Result<rquickjs::Value, _> = f.call((obj, vars, stages, event));
            self.deadline.set(None);
            match result {
                Ok(v) => from_js(&ctx, v),
                Err(rquickjs::Error::Exception) => {
                    let e = exception(&ctx);
                    if e == SKIP_ROW {
                        Err(ScriptError::SkipRow)
                    } else if e.contains("interrupted") {
                        Err(ScriptError::TimedOut(self.limits.time))
                    } else {
                        Err(ScriptError::Threw(e))
                    }
                }
                Err(e) => Err(ScriptError::Failed(e)),
            }
        })
    }
}

/// `stages`: each stage by 1-based number and by name, as
/// `{name, action, values: {column: value}}`.
fn stages_js<'js>(ctx: &Ctx<'js>, stages: &[StageView]) -> rquickjs::Result<rquickjs::Value<'js>> {
    let all = Object::new(ctx.clone())?;
    for (i, st) in stages.iter().enumerate() {
        let o = Object::new(ctx.clone())?;
        o.set("name", st.name)?;
        match st.action {
            Some(a) => o.set("action", a)?,
            None => o.set("action", rquickjs::Value::new_null(ctx.clone()))?,
        }
        let values = Object::new(ctx.clone())?;
        if let Some(vals) = st.values {
            for (c, v) in st.columns.iter().zip(vals) {
                values.set(c.as_str(), to_js(ctx, v.as_ref())?)?;
            }
        }
        o.set("values", values)?;
        all.set((i + 1) as u32, o.clone())?;
        all.set(st.name, o)?;
    }
    Ok(all.into_value())
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

fn from_js<'js>(ctx: &Ctx<'js>, v: rquickjs::Value<'js>) -> Result<Value, ScriptError> {
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
        return Ok(Value::Text(s.to_string()?));
    }
    match ctx.json_stringify(v) {
        Ok(Some(s)) => Ok(Value::Text(s.to_string()?)),
        Ok(None) => Ok(Value::Null),
        Err(e) => Err(ScriptError::Unwritable(e)),
    }
}

/// Limits on a job's scripts: a call that runs longer, or a runtime that grows
/// larger, fails (the row, or the job for job-wide operations).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScriptLimits {
    /// The longest one call may run (`script_time_limit_ms`, default 1000).
    pub time: std::time::Duration,
    /// The most memory one runtime may use (`script_memory_limit_mb`, default 64).
    pub memory: usize,
}

impl Default for ScriptLimits {
    fn default() -> Self {
        ScriptLimits {
            time: std::time::Duration::from_millis(1000),
            memory: 64 * 1024 * 1024,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(script: &str, cols: &[&str], vals: Vec<Value>) -> Result<Value, ScriptError> {
        let vars: BTreeMap<String, Value> = [("JobArgument".to_owned(), Value::from("arg"))]
            .into_iter()
            .collect();
        let rt = ScriptRuntime::new(&[script.to_owned()], &vars, ScriptLimits::default(), None)?;
        let cols: Vec<String> = cols.iter().map(|c| c.to_string()).collect();
        let read: Vec<usize> = (0..cols.len()).collect();
        let row = Row::from_values(vals);
        rt.call(
            0,
            &CallInput {
                columns: &cols,
                read: &read,
                row: &row,
                stages: None,
                event: None,
            },
        )
    }

    /// What `script` returns; a failure fails the test with its message.
    fn value(script: &str, cols: &[&str], vals: Vec<Value>) -> Value {
        run(script, cols, vals).unwrap_or_else(|e| panic!("{script}: {e}"))
    }

    #[test]
    fn expressions_bodies_and_tokens() {
        assert_eq!(
            value(
                "row.First + ' ' + @@ORG:Last@@",
                &["First", "Last"],
                vec!["Ann".into(), "Lee".into()]
            ),
            Value::from("Ann Lee")
        );
        assert_eq!(
            value(
                "const n = row.n * 2;\nreturn n + 1;",
                &["n"],
                vec![Value::Int(20)]
            ),
            Value::Int(41)
        );
        assert_eq!(
            value("@@VAR:JobArgument@@.toUpperCase()", &[], vec![]),
            Value::from("ARG")
        );
        // A value full of quotes stays data.
        assert_eq!(
            value("@@ORG:x@@", &["x"], vec![Value::from("\"); evil(); (\"")]),
            Value::from("\"); evil(); (\"")
        );
        // Inside strings and template literals a token is spliced in as text,
        // still as data; in comments it is left alone.
        let evil = || vec![Value::from("it's \"x\" `${1}`"), Value::Null];
        assert_eq!(
            value("'a @@ORG:x@@ b'", &["x", "n"], evil()),
            Value::from("a it's \"x\" `${1}` b")
        );
        assert_eq!(
            value(
                "\"<@@ORG:x@@|@@ORG:n@@>\" // @@ORG:x@@",
                &["x", "n"],
                evil()
            ),
            Value::from("<it's \"x\" `${1}`|>")
        );
        assert_eq!(
            value(
                "`${'q'} @@ORG:x@@ ${`in @@ORG:n@@!`}` /* @@ORG:x@@ */",
                &["x", "n"],
                evil()
            ),
            Value::from("q it's \"x\" `${1}` in !")
        );
        assert_eq!(
            value(
                "'\\'' + \"@@VAR:JobArgument@@\" + varToken('A')",
                &[],
                vec![]
            ),
            Value::from("'arg@@VAR:A@@")
        );
        assert_eq!(value("null", &[], vec![]), Value::Null);
        assert_eq!(value("({a: 1})", &[], vec![]), Value::from("{\"a\":1}"));
        assert_eq!(value("1.5", &[], vec![]), Value::Float(1.5));
        assert_eq!(
            value(
                "UCase(Left(row.a, 2)) + Mid('abcdef', 2, 3) + Right('xyz', 2) + Len(null) + IIf(IsBlank(' '), 'b', 'n')",
                &["a"],
                vec!["hello".into()]
            ),
            Value::from("HEbcdyz0b")
        );
        assert_eq!(
            value(
                "formatDate('2024-02-29T13:05:09Z', 'dd/MM/yyyy HH:mm')",
                &[],
                vec![]
            ),
            Value::from("29/02/2024 13:05")
        );
        assert_eq!(
            value("CInt('41.6') + CDbl('0.5')", &[], vec![]),
            Value::Float(42.5)
        );
        assert_eq!(
            value(
                "LCase(' AbC ') + '|' + Trim('  x  ') + '|' + CStr(null) + CStr(7) + '|' + (Now().length >= 20)",
                &[],
                vec![]
            ),
            Value::from(" abc |x|7|true")
        );
        let e = run("skipIfBlank(row.a)", &["a"], vec!["  ".into()]).unwrap_err();
        assert!(e.is_skip_row(), "{e}");
        assert_eq!(e.to_string(), SKIP_ROW);
    }

    #[test]
    fn runaway_scripts_are_stopped() {
        let e = run("while (true) {}", &[], vec![]).unwrap_err();
        assert!(matches!(e, ScriptError::TimedOut(_)), "{e:?}");
        assert_eq!(
            e.to_string(),
            "the script ran longer than 1000 ms and was stopped"
        );
        let e = run(
            "let a = []; while (true) { a.push(new Array(100000).fill(1)); }",
            &[],
            vec![],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("the script failed"), "{e}");
        let e = run("const x = 1;\nthrow new Error('nope ' + x);", &[], vec![]).unwrap_err();
        assert!(matches!(e, ScriptError::Threw(_)), "{e:?}");
        let e = e.to_string();
        assert!(e.contains("nope 1") && e.contains("line 2"), "{e}");
        let e = run("require('fs')", &[], vec![]).unwrap_err().to_string();
        assert!(e.contains("require"), "{e}");
    }

    #[test]
    fn a_script_that_escapes_its_function_cannot_run_forever_while_compiling() {
        // The body closes the wrapper's function, loops, and opens a function
        // the wrapper's tail closes again.
        let escape = "}); while (true) {} ; (function(){";
        // Before the limits, each of these never returned.
        assert!(check(escape).is_err());
        assert!(run(escape, &[], vec![]).is_err());
        let grow = "}); let a = []; while (true) a.push(new Array(1e5).fill(1)); (function(){";
        assert!(check(grow).is_err());
        assert!(run(grow, &[], vec![]).is_err());
    }

    #[test]
    fn compile_errors_name_the_line() {
        let e = check("row.a +\n+ )").unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        assert!(check("row.a + 1").is_ok());
        // A bad token is the template's error, word for word.
        let e = check("@@ORG@@ + 1").unwrap_err();
        assert!(matches!(e, ScriptError::Template(_)), "{e:?}");
        assert!(
            e.to_string().starts_with("token @@ORG@@ has no kind"),
            "{e}"
        );
    }
}
