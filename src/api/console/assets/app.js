// tidepool console: a small vanilla single-page app over the JSON API.
// Pages live in the URL fragment (#/runs?status=Failed) so every view and
// filter is linkable; all data comes from /v1/* and /console/*.
"use strict";

// ---------- small helpers ----------

/** Builds an element; children are nodes or text (never parsed as HTML). */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}
function append(el, children) {
  for (const c of [children].flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
/** Replaces an element's children; null, false and undefined are left out. */
function setKids(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}
function svgEl(tag, attrs) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  return el;
}

const numberFormat = new Intl.NumberFormat("en-US");
function num(n) {
  return n === null || n === undefined || Number.isNaN(n) ? "–" : numberFormat.format(Math.round(n));
}
function numCell(n, cls) {
  const zero = n === 0 ? " zero" : "";
  return h("td", { class: "num" + zero + (cls && n > 0 ? " " + cls : "") }, num(n));
}

/** Parses the API's times (ISO 8601, up to 7 fractional digits). */
function parseTime(s) {
  if (!s) return null;
  const t = Date.parse(String(s).replace(/(\.\d{3})\d+/, "$1"));
  return Number.isNaN(t) ? null : new Date(t);
}
function exactTime(d) {
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  const off = -d.getTimezoneOffset();
  const sign = off >= 0 ? "+" : "-";
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)} ` +
    `UTC${sign}${pad(Math.floor(Math.abs(off) / 60))}:${pad(Math.abs(off) % 60)}`;
}
function relTime(d) {
  const secs = Math.round((Date.now() - d.getTime()) / 1000);
  const a = Math.abs(secs);
  let text;
  if (a < 5) return "just now";
  if (a < 60) text = `${a} s`;
  else if (a < 3600) text = `${Math.floor(a / 60)} min`;
  else if (a < 86400) text = `${Math.floor(a / 3600)} h ${Math.floor((a % 3600) / 60)} min`;
  else if (a < 86400 * 30) text = `${Math.floor(a / 86400)} d`;
  else return d.toLocaleDateString();
  return secs >= 0 ? `${text} ago` : `in ${text}`;
}
/** A time shown relative, exact on hover (and to screen readers). */
function timeEl(s) {
  const d = parseTime(s);
  if (!d) return h("span", { class: "muted" }, "–");
  return h("time", { datetime: d.toISOString(), title: exactTime(d), "data-rel": "1" }, relTime(d));
}
setInterval(() => {
  for (const t of document.querySelectorAll("time[data-rel]")) t.textContent = relTime(new Date(t.getAttribute("datetime")));
}, 15000);

/** .NET TimeSpan text ("00:01:02.5000000", "1.02:03:04") to milliseconds. */
function timespanMs(s) {
  const m = /^(?:(\d+)\.)?(\d+):(\d+):(\d+)(?:\.(\d+))?$/.exec(String(s || ""));
  if (!m) return null;
  const frac = m[5] ? Number("0." + m[5]) : 0;
  return ((Number(m[1] || 0) * 24 + Number(m[2])) * 3600 + Number(m[3]) * 60 + Number(m[4]) + frac) * 1000;
}
function duration(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return "–";
  if (ms < 1000) return `${(ms / 1000).toFixed(3)} s`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  const s = Math.round(ms / 1000);
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
}

const STATUSES = ["Queued", "Running", "Complete", "Failed", "Cancelled"];
function badge(status, why) {
  const s = STATUSES.includes(status) ? status : "Queued";
  return h("span", { class: "badge " + s, title: why || null }, status || "?");
}
function isLive(status) { return status === "Queued" || status === "Running"; }

function newRunId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
  const x = [...b].map((v) => v.toString(16).padStart(2, "0")).join("");
  return `${x.slice(0, 8)}-${x.slice(8, 12)}-${x.slice(12, 16)}-${x.slice(16, 20)}-${x.slice(20)}`;
}

// ---------- the API ----------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

/** Calls the API; state-changing calls carry the CSRF header. 401 goes to the login page. */
async function api(path, opts = {}) {
  const method = opts.method || "GET";
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-Tidepool-Csrf"] = "1";
  if (opts.body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: opts.body !== undefined ? JSON.stringify(opts.body) : undefined,
  });
  let data = null;
  const text = await resp.text();
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = text; }
  if (resp.status === 401 && !opts.noLoginRedirect) {
    goLogin();
    throw new ApiError(401, "please log in");
  }
  if (!resp.ok) {
    const msg = (data && (data.error || data.error_description)) || (typeof data === "string" && data) || resp.statusText;
    throw new ApiError(resp.status, msg);
  }
  return data;
}
function qs(params) {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") p.set(k, v);
  const s = p.toString();
  return s ? "?" + s : "";
}

let me = { user: null, roles: {}, open: true, known: false };
async function loadMe() {
  try {
    const m = await api("/console/me", { noLoginRedirect: true });
    me = { user: m.user || null, roles: m.roles || {}, open: !!m.open, known: true };
  } catch (e) {
    if (e.status === 401) me = { user: null, roles: {}, open: false, known: true, anonymous: true };
    // A server without /console/me: assume open; the API still decides every request.
    else me = { user: null, roles: {}, open: true, known: false };
  }
  renderWho();
}
function canWrite(instance) {
  if (me.open || !me.known) return true;
  const role = me.roles[instance || "default"];
  return role === "Owner" || role === "Full";
}
function renderWho() {
  const who = document.getElementById("who");
  setKids(who);
  if (me.user) {
    const roles = Object.entries(me.roles).map(([i, r]) => `${i}: ${r}`).join(", ");
    append(who, [h("span", { title: roles }, me.user, h("span", { class: "hide-sm" }, roles ? ` · ${roles}` : "")),
      h("button", { type: "button", onclick: logout }, "Log out")]);
  } else if (me.open && me.known) {
    append(who, h("span", { title: "No users are configured; the server answers loopback only." }, "open mode"));
  }
}
async function logout() {
  try { await api("/console/logout", { method: "POST", noLoginRedirect: true }); } catch (_) { /* gone anyway */ }
  me = { user: null, roles: {}, open: false, known: true, anonymous: true };
  renderWho();
  location.hash = "#/login";
}
function goLogin() {
  const here = location.hash.startsWith("#/login") ? "#/runs" : location.hash || "#/runs";
  location.hash = "#/login" + qs({ next: here });
}

// ---------- routing ----------

let navSeq = 0;
let cleanups = [];
function onCleanup(fn) { cleanups.push(fn); }

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query] = raw.split("?");
  return { parts: path.split("/").filter(Boolean).map(decodeURIComponent), params: new URLSearchParams(query || "") };
}
function setNav(name) {
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav === name) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
}

async function route() {
  for (const fn of cleanups) { try { fn(); } catch (_) { /* ignore */ } }
  cleanups = [];
  const nav = ++navSeq;
  const { parts, params } = parseHash();
  const main = document.getElementById("main");
  const mount = (...nodes) => {
    if (nav !== navSeq) return false;
    setKids(main, ...nodes.flat());
    return true;
  };
  const ctx = { nav, params, mount, alive: () => nav === navSeq };
  try {
    // The login page shows no page links: none of them would answer yet.
    document.body.classList.toggle("on-login", parts[0] === "login");
    if (parts[0] === "login") { setNav(""); return loginPage(ctx); }
    if (me.anonymous && !me.open) { goLogin(); return; }
    if (!parts.length || parts[0] === "runs") {
      setNav("runs");
      return parts[1] ? runPage(ctx, parts[1]) : runsPage(ctx);
    }
    if (parts[0] === "projects") {
      setNav("projects");
      if (parts[2] === "jobs" && parts[3]) return jobPage(ctx, parts[1], parts[3]);
      return parts[1] ? projectPage(ctx, parts[1]) : projectsPage(ctx);
    }
    if (parts[0] === "health") { setNav("health"); return healthPage(ctx); }
    mount(h("h1", {}, "Not found"), h("p", {}, "There is no such page. ", h("a", { href: "#/runs" }, "Runs")));
  } catch (e) {
    if (e.status !== 401) mount(h("div", { class: "error", role: "alert" }, e.message || String(e)));
  }
}

// ---------- runs ----------

const RUN_FILTERS = ["project", "job", "status", "since", "until", "q"];

/** A datetime-local value (local time) to RFC 3339 for the API. */
function toRfc3339(v) {
  const d = v ? new Date(v) : null;
  return d && !Number.isNaN(d.getTime()) ? d.toISOString() : undefined;
}

function runLink(run, label, cls) {
  const p = { project: run.projectID || undefined, instance: run.instance && run.instance !== "default" ? run.instance : undefined };
  return h("a", { href: `#/runs/${encodeURIComponent(run.runID)}${qs(p)}`, class: cls || "mono", title: run.runID }, label || String(run.runID).slice(0, 8));
}

function runRow(run) {
  const c = run.counters || {};
  const ms = run.durationMs ?? null;
  return h("tr", { "data-run": run.runID },
    h("td", { class: "badgecell" }, badge(run.status, run.error)),
    h("td", { class: "hide-sm" }, runLink(run)),
    h("td", {}, runLink(run, `${run.projectID || ""} / ${run.jobID || ""}`, "plain")),
    h("td", { class: "arg hide-sm mono", title: run.argument || "" }, run.argument || ""),
    h("td", { class: "when" }, timeEl(run.accepted || run.started)),
    h("td", { class: "num hide-sm" }, isLive(run.status) && ms === null ? "…" : duration(ms)),
    numCell(c.totalRows),
    numCellHide(c.inserts),
    numCellHide(c.updates),
    numCell(c.errors, "errs"),
    h("td", { class: "num hide-sm" }, run.rowsPerSec ? num(run.rowsPerSec) : "–"));
}
function valueText(v) {
  if (v === null || v === undefined) return h("i", { class: "muted" }, "null");
  if (v === "") return h("i", { class: "muted" }, "empty");
  return String(v);
}
function numCellHide(n) {
  const td = numCell(n);
  td.classList.add("hide-sm");
  return td;
}

function runsTable(runs, opts = {}) {
  const head = h("tr", {},
    h("th", {}, "Status"), h("th", { class: "hide-sm" }, "Run"), h("th", {}, "Project / job"),
    h("th", { class: "hide-sm" }, "Argument"), h("th", {}, "Accepted"),
    h("th", { class: "num hide-sm" }, "Duration"), h("th", { class: "num" }, "Rows"),
    h("th", { class: "num hide-sm" }, "Inserts"), h("th", { class: "num hide-sm" }, "Updates"),
    h("th", { class: "num" }, "Errors"), h("th", { class: "num hide-sm" }, "Rows/s"));
  const body = h("tbody", {});
  fillRuns(body, runs, opts.empty);
  return { table: h("div", { class: "scroll" }, h("table", { class: "runs", "aria-label": opts.label || "Runs" }, h("thead", {}, head), body)), body };
}
function fillRuns(body, runs, empty) {
  // Live updates re-render the rows: keep the keyboard focus where it was.
  const active = document.activeElement;
  const row = active && active.closest ? active.closest("tr[data-run]") : null;
  const at = row && body.contains(row) ? [...row.querySelectorAll("a, button")].indexOf(active) : -1;
  setKids(body, ...(runs.length ? runs.map(runRow)
    : [h("tr", {}, h("td", { colspan: 11, class: "muted" }, empty || "No runs match."))]));
  if (at >= 0) {
    const again = [...body.querySelectorAll("tr[data-run]")].find((r) => r.dataset.run === row.dataset.run);
    const el = again && again.querySelectorAll("a, button")[at];
    if (el) el.focus({ preventScroll: true });
  }
}

async function projectsList() {
  try { return await api("/v1/Projects"); } catch (e) { if (e.status === 401) throw e; return []; }
}

async function runsPage(ctx) {
  const p = ctx.params;
  const projects = await projectsList();
  const filters = Object.fromEntries(RUN_FILTERS.map((k) => [k, p.get(k) || ""]));
  const field = (name, label, input, cls) => h("label", { class: cls }, label, input);
  const projectSel = h("select", { name: "project" }, h("option", { value: "" }, "All projects"),
    projects.filter((x) => x.projectID).map((x) => h("option", { value: x.projectID, selected: x.projectID === filters.project }, x.projectID)));
  const jobs = [...new Set(projects.flatMap((x) => (x.jobs || []).map((j) => j.jobID)))];
  const jobInput = h("input", { name: "job", value: filters.job, list: "joblist", placeholder: "any", autocomplete: "off" });
  const statusSel = h("select", { name: "status" }, h("option", { value: "" }, "Any status"),
    STATUSES.map((s) => h("option", { value: s, selected: s === filters.status }, s)));
  const since = h("input", { type: "datetime-local", name: "since", value: filters.since });
  const until = h("input", { type: "datetime-local", name: "until", value: filters.until });
  const text = h("input", { type: "search", name: "q", value: filters.q, placeholder: "text in the argument" });
  const active = RUN_FILTERS.filter((k) => filters[k]).length;
  const form = h("form", { class: "filters", role: "search", "aria-label": "Filter runs" },
    field("project", "Project", projectSel), field("job", "Job", jobInput),
    h("datalist", { id: "joblist" }, jobs.map((j) => h("option", { value: j }))),
    field("status", "Status", statusSel), field("since", "Since", since), field("until", "Until", until),
    field("q", "Argument contains", text, "grow"),
    h("div", { class: "buttons" }, h("button", { type: "submit", class: "primary" }, "Filter"),
      h("button", { type: "button", onclick: () => { location.hash = "#/runs"; } }, "Clear")));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const next = {};
    for (const k of RUN_FILTERS) next[k] = form.elements[k].value.trim();
    location.hash = "#/runs" + qs(next);
  });
  // A select changing is a filter change: apply at once.
  for (const s of [projectSel, statusSel]) s.addEventListener("change", () => form.requestSubmit());

  const status = h("p", { class: "sub", "aria-live": "polite" });
  const { table, body } = runsTable([], { empty: "Loading…" });
  const pager = h("div", { class: "pager" });
  const box = h("details", { class: "filterbox", open: active > 0 || window.innerWidth > 720 },
    h("summary", {}, active ? `Filters (${active} set)` : "Filters"), form);
  ctx.mount(h("div", { class: "pagehead" }, h("div", {}, h("h1", {}, "Runs"), status)), box, table, pager);

  const query = {
    project: filters.project, job: filters.job, status: filters.status, q: filters.q,
    since: toRfc3339(filters.since), until: toRfc3339(filters.until), limit: 50, cursor: p.get("cursor") || undefined,
  };
  let timer = null, shown = null;
  onCleanup(() => clearTimeout(timer));
  async function load() {
    let data;
    try {
      data = await api("/v1/Runs" + qs(query));
    } catch (e) {
      if (!ctx.alive()) return;
      fillRuns(body, [], e.status === 404 ? "This server has no run history API (GET /v1/Runs)." : e.message);
      return;
    }
    if (!ctx.alive()) return;
    const runs = data.runs || [];
    const seen = JSON.stringify(runs);
    if (seen !== shown) fillRuns(body, runs);
    shown = seen;
    const live = runs.filter((r) => isLive(r.status)).length;
    status.textContent = `${num(runs.length)} run${runs.length === 1 ? "" : "s"} on this page` +
      (live ? ` · ${live} going, updating live` : "") + (query.cursor ? " · older runs" : "");
    setKids(pager);
    append(pager, [
      query.cursor ? h("a", { class: "button", href: "#/runs" + qs({ ...filters }) }, "← Newest") : null,
      data.nextCursor ? h("a", { class: "button", href: "#/runs" + qs({ ...filters, cursor: data.nextCursor }) }, "Older →") : null]);
    // Live: the first page is re-read while anything on it is going (new runs appear on top too).
    if (live || !query.cursor) timer = setTimeout(load, live ? 1500 : 5000);
  }
  await load();
}

// ---------- a run ----------

function levelName(l) {
  return l || "";
}
/** How important a line is; the log's Low/Medium/High are the loggingLevel a line needs (Low = 1 = most important). */
function levelRank(l) {
  return { Low: 3, Medium: 2, High: 1, 1: 3, 2: 2, 3: 1 }[l] ?? 3;
}

async function runPage(ctx, id) {
  const p = ctx.params;
  const inst = p.get("instance") || undefined;
  const iq = qs({ instance: inst });
  const base = `/v1/Runs/${encodeURIComponent(id)}`;
  let detail;
  try {
    detail = await api(base + iq);
  } catch (e) {
    if (e.status === 404) {
      ctx.mount(h("h1", {}, "Run not found"), h("p", {}, `There is no run ${id} that you may see. `, h("a", { href: "#/runs" }, "All runs")));
      return;
    }
    throw e;
  }
  // The run's list entry: its project, instance and argument (the run's answer has none of them).
  let summary = null;
  async function findSummary(d) {
    const job = d.results && d.results[0] && d.results[0].jobID;
    const t = parseTime(d.startTime);
    if (!job || !t) return null;
    try {
      const until = new Date(t.getTime() + 1000).toISOString();
      const page = await api("/v1/Runs" + qs({ job, until, instance: inst, project: p.get("project") || undefined, limit: 100 }));
      return (page.runs || []).find((r) => r.runID === d.runID) || null;
    } catch (e) {
      if (e.status === 401) throw e;
      return null;
    }
  }
  summary = await findSummary(detail);
  const head = h("div", { class: "pagehead" });
  const jobsBox = h("div", { class: "jobs", "aria-live": "off" });
  const failure = h("div");
  const request = h("section", { "aria-label": "Request" });
  const errorsBox = h("section", { id: "row-errors", tabindex: "-1", "aria-label": "Row errors" });
  const logBox = h("section", { "aria-label": "Log" });
  const hooksBox = h("section", { "aria-label": "Webhook attempts" });
  ctx.mount(head, failure, h("h2", {}, "Jobs"), jobsBox, request, errorsBox, logBox, hooksBox);

  const series = {}; // job -> [{t, rps}]
  const cards = {}; // job -> {update(result, rps)}
  let lastStatus = null;

  function projectOf(d) {
    return d.projectID || (d.request && d.request.projectID) || (summary && summary.projectID) || p.get("project") || "";
  }
  function render(d) {
    detail = d;
    const project = projectOf(d);
    const firstJob = (d.request && d.request.jobID) || d.jobID || (d.results && d.results[0] && d.results[0].jobID) || "";
    const instance = d.instance || (d.request && d.request.instance) || (summary && summary.instance) || inst || "default";
    const write = canWrite(instance);
    const actions = h("div", { class: "actions" });
    if (write && isLive(d.status)) {
      append(actions, h("button", { type: "button", class: "danger", onclick: () => cancelRun(actions) }, "Cancel run"));
    }
    if (write && project && firstJob && (d.request || summary)) {
      append(actions, h("button", { type: "button", title: "A new run of this job with the same argument (and chain)",
        onclick: () => runAgain(d, project, firstJob, instance, actions) }, "Run again"));
    }
    const resumable = (d.results || []).find((r) => r.status !== "Complete" && r.resumeAtRow);
    if (write && d.status === "Failed" && resumable) {
      append(actions, h("button", { type: "button", title: `A new run from row ${resumable.resumeAtRow} of job ${resumable.jobID}, the first row not committed (then its chain)`,
        onclick: () => rerunFromFailure(d, project, instance, actions) }, "Rerun from failure"));
    }
    const started = parseTime(d.startTime);
    setKids(head, 
      h("div", {},
        h("h1", {}, badge(d.status), " ", project ? h("a", { href: `#/projects/${encodeURIComponent(project)}` }, project) : "", project ? " / " : "",
          project && firstJob ? h("a", { href: `#/projects/${encodeURIComponent(project)}/jobs/${encodeURIComponent(firstJob)}` }, firstJob) : firstJob),
        h("div", { class: "sub" }, h("span", { class: "mono" }, d.runID), " · started ", started ? timeEl(d.startTime) : "–",
          " · ", h("span", { "data-duration": "1" }, runDuration(d)), instance !== "default" ? ` · instance ${instance}` : "")),
      actions);
    setKids(failure, d.error ? h("div", { class: "error", role: "alert" }, d.error) : "");
    renderJobs(d);
    renderRequest(d);
    renderHooks(d);
  }

  function runDuration(d) {
    const ms = timespanMs(d.runTime);
    const t0 = parseTime(d.startTime);
    if (isLive(d.status) && t0 && !ms) return d.status === "Queued" ? "waiting" : `running for ${duration(Date.now() - t0.getTime())}`;
    return duration(ms);
  }
  function expectedRows(d) {
    const r = d.request || {};
    if (r.endAfterRow) return r.endAfterRow - (r.beginAtRow || 1) + 1;
    return null;
  }
  function renderJobs(d) {
    const results = d.results && d.results.length ? d.results : [];
    const seen = new Set();
    for (const r of results) {
      seen.add(r.jobID);
      if (!cards[r.jobID]) { cards[r.jobID] = jobCard(r.jobID); jobsBox.append(cards[r.jobID].el); }
      const c = r.counters || r;
      const ms = timespanMs(r.runTime);
      const avg = ms > 0 ? (c.totalRows || 0) / (ms / 1000) : null;
      cards[r.jobID].update(r.status, c, isLive(r.status) ? lastRate(r.jobID) : avg, expectedRows(d));
    }
    for (const [job, card] of Object.entries(cards)) if (!seen.has(job)) { card.el.remove(); delete cards[job]; }
  }
  function lastRate(job) {
    const s = series[job];
    return s && s.length ? s[s.length - 1].rps : null;
  }

  function jobCard(job) {
    const names = [["totalRows", "Rows"], ["inserts", "Inserts"], ["updates", "Updates"], ["deletes", "Deletes"],
      ["skips", "Skips"], ["ignores", "Ignores"], ["errors", "Errors"]];
    const vals = {};
    const counters = h("div", { class: "counters" }, names.map(([k, label]) => {
      vals[k] = h("b", {}, "0");
      const more = k === "errors"
        ? h("button", { type: "button", class: "linkish", hidden: true, onclick: showErrors, "data-errors-link": "1" }, "see rows") : null;
      return h("div", { class: "counter", "data-counter": k }, vals[k], h("span", {}, label, more ? " " : "", more));
    }));
    const badgeSlot = h("span");
    const fill = h("i");
    const bar = h("div", { class: "bar", role: "progressbar", "aria-label": `${job} progress` }, fill);
    const rate = h("span");
    const pct = h("span");
    const chart = svgEl("svg", { class: "chart", viewBox: "0 0 120 40", preserveAspectRatio: "none", role: "img", "aria-label": `${job} rows per second over time` });
    const line = svgEl("polyline", { points: "" });
    chart.append(line);
    const el = h("div", { class: "card", "data-job": job }, h("h3", {}, badgeSlot, h("span", { class: "mono" }, job)),
      counters, bar, h("div", { class: "rate" }, rate, pct), chart);
    return {
      el,
      update(status, c, rps, expected) {
        setKids(badgeSlot, badge(status));
        for (const [k] of names) vals[k].textContent = num(c[k] || 0);
        vals.errors.parentElement.classList.toggle("errs", (c.errors || 0) > 0);
        const link = el.querySelector("[data-errors-link]");
        link.hidden = !(c.errors > 0);
        bar.className = "bar " + (status || "");
        const total = c.totalRows || 0;
        let fraction = null;
        if (!isLive(status)) fraction = 1;
        else if (c.expectedRows) fraction = total / c.expectedRows;
        else if (expected) fraction = total / expected;
        if (fraction === null) {
          bar.classList.add("indeterminate");
          bar.removeAttribute("aria-valuenow");
          pct.textContent = status === "Queued" ? "waiting for a worker" : "rows so far";
        } else {
          const f = Math.max(0, Math.min(1, fraction));
          fill.style.width = `${(f * 100).toFixed(1)}%`;
          bar.setAttribute("aria-valuenow", String(Math.round(f * 100)));
          pct.textContent = isLive(status) ? `${Math.round(f * 100)} %` : status;
        }
        rate.textContent = rps !== null && rps !== undefined ? `${num(rps)} rows/s${isLive(status) ? "" : " average"}` : "– rows/s";
        const pts = series[job] || [];
        // The chart is there while the run goes (so nothing moves when points arrive) and after, if it has points.
        chart.classList.toggle("hidden", !isLive(status) && pts.length < 2);
        if (pts.length > 1) {
          const t0 = pts[0].t, t1 = pts[pts.length - 1].t, max = Math.max(1, ...pts.map((q) => q.rps));
          line.setAttribute("points", pts.map((q) => `${(((q.t - t0) / Math.max(1, t1 - t0)) * 120).toFixed(2)},${(38 - (q.rps / max) * 36).toFixed(2)}`).join(" "));
          chart.setAttribute("aria-label", `${job}: peak ${num(max)} rows per second`);
          chart.querySelector("title")?.remove();
          chart.prepend(Object.assign(svgEl("title"), { textContent: `peak ${num(max)} rows/s` }));
        }
      },
    };
  }

  function showErrors() {
    errorsBox.scrollIntoView({ behavior: "smooth", block: "start" });
    errorsBox.focus({ preventScroll: true });
  }

  function renderRequest(d) {
    const r = d.request || (summary ? { argument: summary.argument, partial: true, chainJobs: (d.results || []).length > 1 } : null);
    if (!r) { setKids(request); return; }
    if (r.partial) {
      setKids(request, h("h2", {}, "Request"), h("div", { class: "card" }, h("dl", { class: "kv" },
        h("dt", {}, "Argument"), h("dd", { class: "mono" }, r.argument ? r.argument : h("span", { class: "muted" }, "(empty)")),
        h("dt", {}, "Accepted"), h("dd", {}, timeEl(summary.accepted)),
        h("dt", {}, "Chain"), h("dd", {}, r.chainJobs ? "yes" : "first job only"),
        h("dt", {}, "Row window, threads"), h("dd", { class: "muted" }, "not recorded by this server"))));
      return;
    }
    const win = `${num(r.beginAtRow || 1)} – ${r.endAfterRow ? num(r.endAfterRow) : "end"}`;
    setKids(request, h("h2", {}, "Request"), h("div", { class: "card" }, h("dl", { class: "kv" },
      h("dt", {}, "Argument"), h("dd", { class: "mono" }, r.argument ? r.argument : h("span", { class: "muted" }, "(empty)")),
      h("dt", {}, "Row window"), h("dd", {}, win),
      h("dt", {}, "Threads"), h("dd", {}, num(r.threadCount || 1)),
      h("dt", {}, "Log level"), h("dd", {}, String(r.loggingLevel ?? "")),
      h("dt", {}, "Chain"), h("dd", {}, r.chainJobs || r.chain ? "yes: the job's next jobs run after it" : "no"),
      r.webHookURL ? [h("dt", {}, "Webhook"), h("dd", { class: "mono" }, r.webHookURL)] : null)));
  }

  function renderHooks(d) {
    const a = d.webhookAttempts || [];
    if (!a.length) { setKids(hooksBox); return; }
    setKids(hooksBox, h("h2", {}, "Webhook attempts"), h("div", { class: "scroll" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", { class: "num" }, "#"), h("th", {}, "Time"), h("th", { class: "num" }, "HTTP status"), h("th", {}, "Error"))),
      h("tbody", {}, a.map((x) => h("tr", {}, h("td", { class: "num" }, x.attempt), h("td", { class: "when" }, timeEl(x.time)),
        h("td", { class: "num" }, x.statusCode ?? "–"), h("td", {}, x.error || "")))))));
  }

  async function cancelRun(actions) {
    for (const b of actions.querySelectorAll("button")) b.disabled = true;
    try {
      await api(`${base}/cancel${iq}`, { method: "POST" });
      await refresh();
    } catch (e) {
      setKids(failure, h("div", { class: "error", role: "alert" }, `Cancel failed: ${e.message}`));
      for (const b of actions.querySelectorAll("button")) b.disabled = false;
    }
  }
  async function runAgain(d, project, job, instance, actions) {
    // The recorded request when the server gives it; else the list entry's argument,
    // and the chain if the run went past its first job.
    const r = d.request || { argument: summary ? summary.argument : "", chainJobs: (d.results || []).length > 1 };
    const body = {
      runID: newRunId(), projectID: project, jobID: job, argument: r.argument || "",
      beginAtRow: r.beginAtRow || 1, threadCount: r.threadCount || 1, loggingLevel: r.loggingLevel ?? 1,
      chainJobs: !!(r.chainJobs ?? r.chain), instance: instance === "default" ? undefined : instance,
    };
    if (r.endAfterRow) body.endAfterRow = r.endAfterRow;
    if (r.webHookURL) body.webHookURL = r.webHookURL;
    for (const b of actions.querySelectorAll("button")) b.disabled = true;
    try {
      const out = await api("/v1/ExecuteJobAsync", { method: "POST", body });
      location.hash = `#/runs/${out.runID}` + qs({ project, instance: body.instance });
    } catch (e) {
      setKids(failure, h("div", { class: "error", role: "alert" }, `Could not start: ${e.message}`));
      for (const b of actions.querySelectorAll("button")) b.disabled = false;
    }
  }

  async function rerunFromFailure(d, project, instance, actions) {
    for (const b of actions.querySelectorAll("button")) b.disabled = true;
    const inst = instance === "default" ? undefined : instance;
    try {
      const out = await api(`/v1/Runs/${encodeURIComponent(d.runID)}/rerun` + qs({ from: "failure", instance: inst }), { method: "POST" });
      location.hash = `#/runs/${out.runID}` + qs({ project, instance: inst });
    } catch (e) {
      setKids(failure, h("div", { class: "error", role: "alert" }, `Could not rerun: ${e.message}`));
      for (const b of actions.querySelectorAll("button")) b.disabled = false;
    }
  }

  /** Whether an error message names this origin column or quotes its value. */
  function blames(message, column, value) {
    const m = String(message || "").toLowerCase();
    return m.includes(`"${String(column).toLowerCase()}"`) || (value !== null && value !== undefined && value !== "" && m.includes(`"${String(value).toLowerCase()}"`));
  }
  function stageLabel(x) {
    if (x.stage === 0) return "reading";
    if (x.stage === undefined || x.stage === null) return "";
    return x.stageName ? `${x.stage}: ${x.stageName}` : String(x.stage);
  }
  /** The row's origin values in the origin's column order. */
  function orderedValues(x) {
    const v = x.values || {};
    const cols = Array.isArray(x.columns) && x.columns.length ? x.columns : Object.keys(v);
    return cols.map((c) => [c, v[c]]);
  }

  // Row errors, with the origin values of each row.
  async function loadErrors() {
    let data = null;
    try {
      data = await api(`${base}/errors${qs({ instance: inst, limit: 200 })}`);
    } catch (e) {
      if (e.status !== 404) { setKids(errorsBox, h("h2", {}, "Row errors"), h("div", { class: "error" }, e.message)); return; }
    }
    if (!ctx.alive()) return;
    let errors, total, note = null, next = null;
    if (data) {
      errors = data.errors || []; total = data.total ?? errors.length; next = data.nextCursor;
      if (data.truncated) note = `Only the first ${num(data.kept)} of ${num(total)} row errors were kept.`;
    } else {
      // A server without the errors API: the log's lines about a row.
      errors = (detail.rowErrors || (detail.log || []).filter((l) => l.row && levelRank(l.level) >= 3))
        .map((l) => ({ job: l.job || l.jobID, row: l.row, message: l.message, values: l.values }));
      total = errors.length;
    }
    const body = h("tbody", {});
    const addRows = (list) => append(body, list.map((x) => h("tr", {},
      h("td", { class: "mono hide-sm" }, x.job || x.jobID || ""), h("td", { class: "num" }, num(x.row)), h("td", { class: "hide-sm" }, stageLabel(x)),
      h("td", {}, x.message || ""),
      h("td", {}, h("div", { class: "values" }, orderedValues(x).map(([k, v]) =>
        h("span", { class: blames(x.message, k, v) ? "bad" : null }, h("b", {}, k), " ", valueText(v))))))));
    addRows(errors);
    const more = h("div", { class: "pager" });
    const setMore = (cursor) => setKids(more, cursor ? h("button", { type: "button", onclick: async () => {
      const d2 = await api(`${base}/errors${qs({ instance: inst, limit: 200, cursor })}`);
      addRows(d2.errors || []); setMore(d2.nextCursor);
    } }, "More row errors") : "");
    setMore(next);
    if (!total) {
      setKids(errorsBox, h("h2", {}, "Row errors"), h("p", { class: "muted" }, isLive(detail.status) ? "None so far." : "None."));
      return;
    }
    setKids(errorsBox, h("h2", {}, `Row errors (${num(total)})`), note ? h("div", { class: "note" }, note) : "",
      h("div", { class: "scroll" }, h("table", { "aria-label": "Row errors" },
        h("thead", {}, h("tr", {}, h("th", { class: "hide-sm" }, "Job"), h("th", { class: "num" }, "Row"), h("th", { class: "hide-sm" }, "Stage"), h("th", {}, "Message"), h("th", {}, "Origin values"))),
        body)), more);
  }

  // The log: level filter and paging.
  // `last`: the seq of the last line shown; `gen` drops answers of a log shown before a reset.
  const logState = { level: p.get("level") || "", cursor: null, done: false, fallback: false, body: null, count: 0, last: 0, gen: 0, busy: false, again: false };
  /** Lines a running run's log shows as they come; past it, "More log lines" pages on. */
  const LIVE_LOG_MAX = 5000;
  function logLevelOk(l) {
    return levelRank(l.level) >= (logState.level ? levelRank(logState.level) : 0);
  }
  function logRow(l) {
    const lvl = levelName(l.level);
    return h("tr", {}, h("td", { class: "when" }, timeEl(l.time)), h("td", {}, h("span", { class: "lvl " + lvl }, lvl)),
      h("td", { class: "mono hide-sm" }, l.job || l.jobID || ""), h("td", { class: "msg" }, l.row && !/^row \d/.test(l.message) ? h("span", { class: "muted" }, `row ${num(l.row)}: `) : "", l.message));
  }
  async function loadLog(reset) {
    if (reset) {
      logState.cursor = null; logState.done = false; logState.count = 0; logState.last = 0; logState.gen++;
      logState.body = h("tbody", {});
      const sel = h("select", { "aria-label": "Log level", onchange: (ev) => { logState.level = ev.target.value; loadLog(true); } },
        [["", "All lines"], ["2", "Low and Medium (no per-row lines)"], ["1", "Low: start, end, row errors"]]
          .map(([v, t]) => h("option", { value: v, selected: v === logState.level }, t)));
      logState.more = h("div", { class: "pager" });
      setKids(logBox, h("div", { class: "tabs" }, h("h2", { class: "inline" }, "Log"), h("label", { class: "inline" }, "Level", sel)),
        h("div", { class: "scroll" }, h("table", { class: "log", "aria-label": "Log" },
          h("thead", {}, h("tr", {}, h("th", {}, "Time"), h("th", {}, "Level"), h("th", { class: "hide-sm" }, "Job"), h("th", {}, "Message"))), logState.body)),
        logState.more);
    }
    let lines = [];
    if (!logState.fallback) {
      try {
        const data = await api(`${base}/log${qs({ instance: inst, level: logState.level, limit: 200, cursor: logState.cursor })}`);
        lines = data.lines || [];
        logState.cursor = data.nextCursor || null;
        logState.done = !logState.cursor;
      } catch (e) {
        if (e.status !== 404) { append(logState.body, h("tr", {}, h("td", { colspan: 4, class: "error" }, e.message))); return; }
        logState.fallback = true;
      }
    }
    if (logState.fallback) {
      const all = (detail.log || []).filter(logLevelOk);
      lines = all.slice(logState.count, logState.count + 200);
      logState.done = logState.count + lines.length >= all.length;
    }
    if (!ctx.alive()) return;
    logState.count += lines.length;
    if (lines.length && lines[lines.length - 1].seq) logState.last = lines[lines.length - 1].seq;
    append(logState.body, lines.map(logRow));
    if (!logState.count) {
      const why = isLive(detail.status) ? "No log lines yet: they appear here as the run makes them." : "No log lines at this level.";
      append(logState.body, h("tr", { "data-empty": "1" }, h("td", { colspan: 4, class: "muted" }, why)));
    }
    showLogPager();
  }
  function showLogPager() {
    setKids(logState.more, logState.done ? "" : h("button", { type: "button", onclick: () => loadLog(false) }, "More log lines"),
      h("span", { class: "sub" }, `${num(logState.count)} lines shown`));
  }
  /** While the run goes: the lines stored since the last shown, when the whole log so far is shown. */
  async function tailLog() {
    if (!logState.body || logState.fallback || !logState.done || !isLive(detail.status)) return;
    if (logState.busy) { logState.again = true; return; }
    logState.busy = true;
    const gen = logState.gen;
    try {
      const data = await api(`${base}/log${qs({ instance: inst, level: logState.level, limit: 200, cursor: logState.last || undefined })}`);
      if (!ctx.alive() || gen !== logState.gen) return;
      const lines = (data.lines || []).filter((l) => l.seq > logState.last);
      if (lines.length) {
        logState.body.querySelector("[data-empty]")?.remove();
        append(logState.body, lines.map(logRow));
        logState.count += lines.length;
        logState.last = lines[lines.length - 1].seq;
      }
      if (data.nextCursor) {
        // More are stored already: follow on, or past the live bound leave them to the pager.
        if (logState.count < LIVE_LOG_MAX) logState.again = true;
        else { logState.done = false; logState.cursor = String(logState.last); }
      }
      showLogPager();
    } catch (_) { /* the next event tries again */ } finally {
      logState.busy = false;
      if (logState.again && gen === logState.gen) { logState.again = false; tailLog(); }
    }
  }

  async function refresh() {
    try {
      const d = await api(base + iq);
      if (!ctx.alive()) return;
      const ended = isLive(lastStatus) && !isLive(d.status);
      render(d);
      lastStatus = d.status;
      if (ended) { loadErrors(); loadLog(true); }
    } catch (_) { /* keep what is shown; the next tick tries again */ }
  }

  // Live: SSE from /events; polling if the server has none.
  function follow() {
    if (!isLive(detail.status)) return;
    let opened = false, polling = null, refreshSoon = null;
    const es = new EventSource(`${base}/events${iq}`);
    onCleanup(() => { es.close(); clearInterval(polling); clearTimeout(refreshSoon); });
    const later = () => { clearTimeout(refreshSoon); refreshSoon = setTimeout(refresh, 150); };
    es.onopen = () => { opened = true; };
    es.addEventListener("counters", (ev) => {
      const x = JSON.parse(ev.data);
      const job = x.job || x.jobID;
      (series[job] = series[job] || []).push({ t: Date.now(), rps: x.rowsPerSec || 0 });
      if (series[job].length > 120) series[job].shift();
      const dur = head.querySelector("[data-duration]");
      if (dur) dur.textContent = runDuration(detail);
      if (!cards[job]) { later(); return; }
      cards[job].update(x.status || "Running", x.counters || {}, x.rowsPerSec, expectedRows(detail));
    });
    es.addEventListener("status", later);
    // New log lines: shown as they are stored (also on each counters tick, past the stream's own bound).
    es.addEventListener("log", () => tailLog());
    es.addEventListener("counters", () => tailLog());
    es.addEventListener("end", () => { es.close(); refresh(); });
    es.onerror = () => {
      if (opened && es.readyState !== EventSource.CLOSED) return; // the browser reconnects by itself
      es.close();
      if (polling) return;
      // No events endpoint: poll the run, and work out rows/s from the counters.
      let prev = null;
      polling = setInterval(async () => {
        await refresh();
        if (!isLive(detail.status)) { clearInterval(polling); return; }
        tailLog();
        for (const r of detail.results || []) {
          const now = Date.now(), rows = (r.counters || r).totalRows || 0;
          if (prev && prev.job === r.jobID) {
            const rps = ((rows - prev.rows) * 1000) / Math.max(1, now - prev.t);
            (series[r.jobID] = series[r.jobID] || []).push({ t: now, rps });
            if (series[r.jobID].length > 120) series[r.jobID].shift();
            cards[r.jobID]?.update(r.status, r.counters || r, rps, expectedRows(detail));
          }
          prev = { job: r.jobID, rows, t: now };
        }
      }, 1000);
    };
  }

  render(detail);
  lastStatus = detail.status;
  follow();
  await Promise.all([loadErrors(), loadLog(true)]);
}

// ---------- projects and jobs ----------

async function projectsPage(ctx) {
  const list = await api("/v1/Projects");
  const cards = (list || []).map((pr) => {
    const id = pr.projectID || pr.name;
    const failed = pr.loaded === false;
    return h("div", { class: "card" },
      h("h3", {}, failed ? h("span", { class: "badge Failed" }, "Not loaded") : null,
        h("a", { href: `#/projects/${encodeURIComponent(id)}` }, id)),
      pr.name && pr.name !== id ? h("div", { class: "sub" }, pr.name) : null,
      pr.instance && pr.instance !== "default" ? h("div", { class: "sub" }, `instance ${pr.instance}`) : null,
      failed ? h("div", { class: "error" }, (pr.errors || []).join("\n")) : null,
      (pr.jobs || []).length ? h("ul", {}, pr.jobs.map((j) => h("li", {},
        h("a", { href: `#/projects/${encodeURIComponent(id)}/jobs/${encodeURIComponent(j.jobID)}` }, j.jobID),
        j.name ? h("span", { class: "muted" }, ` – ${j.name}`) : "", j.next ? h("span", { class: "muted" }, ` → ${j.next}`) : ""))) : null);
  });
  ctx.mount(h("div", { class: "pagehead" }, h("h1", {}, "Projects"), reloadButton()),
    cards.length ? h("div", { class: "grid2" }, cards) : h("p", { class: "muted" }, "No projects that you may see."));
}
function reloadButton() {
  const writer = me.open || !me.known || Object.values(me.roles).some((r) => r === "Owner" || r === "Full");
  if (!writer) return null;
  const out = h("span", { class: "sub", "aria-live": "polite" });
  return h("div", { class: "actions" }, out, h("button", { type: "button", onclick: async (ev) => {
    ev.target.disabled = true;
    try { await api("/v1/Projects/reload", { method: "POST" }); route(); } catch (e) { out.textContent = e.status === 404 ? "this server cannot reload projects" : e.message; ev.target.disabled = false; }
  } }, "Reload projects"));
}

function describe(v) {
  if (v === null || v === undefined) return h("span", { class: "muted" }, "–");
  if (typeof v !== "object") return String(v);
  return h("dl", { class: "kv" }, Object.entries(v).filter(([, x]) => x !== null && x !== undefined && x !== "")
    .map(([k, x]) => [h("dt", {}, k), h("dd", { class: typeof x === "string" && x.includes("\n") ? "mono" : "" },
      typeof x === "object" ? (Array.isArray(x) ? x.join(", ") : JSON.stringify(x)) : String(x))]));
}
function fieldsTable(fields) {
  const from = (f) => f.origin ? h("span", {}, h("span", { class: "muted" }, "origin "), h("code", {}, f.origin))
    : f.template ? h("span", {}, h("span", { class: "muted" }, "template "), h("code", {}, f.template))
      : f.value !== undefined ? h("span", {}, h("span", { class: "muted" }, "value "), h("code", {}, JSON.stringify(f.value)))
        : f.function ? h("span", {}, h("span", { class: "muted" }, "function "), h("code", {}, f.function))
          : f.script ? h("span", {}, h("span", { class: "muted" }, "script "), h("code", {}, f.script)) : h("span", { class: "muted" }, "–");
  const transform = (t) => Array.isArray(t) ? t.join(" → ") : t || "";
  return h("div", { class: "scroll" }, h("table", { "aria-label": "Field mappings" },
    h("thead", {}, h("tr", {}, h("th", {}, "Column"), h("th", {}, "From"), h("th", {}, "Type"), h("th", { class: "hide-sm" }, "Transform"), h("th", {}, "Match"))),
    h("tbody", {}, fields.map((f) => h("tr", {}, h("td", { class: "mono" }, f.column || f.name || ""), h("td", {}, from(f)),
      h("td", {}, f.type || ""), h("td", { class: "hide-sm" }, transform(f.transform)), h("td", {}, f.match ? "✓ key" : ""))))));
}
function stagesView(stages) {
  if (!Array.isArray(stages)) return h("p", { class: "muted" }, `${num(stages || 0)} stage(s)`);
  return stages.map((s, i) => h("div", { class: "card stage" },
    h("h3", {}, h("span", { class: "pill" }, `stage ${i + 1}`), s.name || "", s.action ? h("span", { class: "pill" }, s.action) : "",
      s.table ? h("span", { class: "muted" }, `→ ${s.table}`) : ""),
    s.condition || s.when ? h("p", { class: "sub" }, "when ", h("code", {}, s.condition || s.when)) : null,
    Array.isArray(s.fields) && s.fields.length ? fieldsTable(s.fields) : null));
}
/** The jobs each job of `jobs` starts after (its needs, and the jobs whose next names it). */
function jobEdges(jobs) {
  const known = new Set(jobs.map((j) => j.jobID));
  const edges = [];
  const add = (from, to) => {
    if (known.has(from) && known.has(to) && !edges.some((e) => e.from === from && e.to === to)) edges.push({ from, to });
  };
  for (const j of jobs) {
    for (const n of j.nextJobs || (j.next ? [j.next] : [])) add(j.jobID, n);
    for (const n of j.needs || []) add(n, j.jobID);
  }
  return edges;
}
/**
 * A job graph as an SVG: one column per level (a job one level after the
 * last job it waits for), an arrow per edge, each job a link to its page.
 * `order` lists the jobs shown in an order where a job comes after those it waits for.
 */
function graphView(projectId, jobs, order, label) {
  const shown = new Set(order);
  const edges = jobEdges(jobs).filter((e) => shown.has(e.from) && shown.has(e.to));
  const level = {};
  for (const id of order) {
    level[id] = Math.max(0, ...edges.filter((e) => e.to === id && e.from in level).map((e) => level[e.from] + 1));
  }
  const columns = [];
  for (const id of order) (columns[level[id]] = columns[level[id]] || []).push(id);
  const W = 150, H = 34, GX = 56, GY = 14, PAD = 6;
  const at = {};
  columns.forEach((col, x) => col.forEach((id, y) => { at[id] = { x: PAD + x * (W + GX), y: PAD + y * (H + GY) }; }));
  const width = PAD * 2 + columns.length * W + (columns.length - 1) * GX;
  const height = PAD * 2 + Math.max(...columns.map((c) => c.length)) * (H + GY) - GY;
  const svg = svgEl("svg", { class: "jobgraph", viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-label": label });
  svg.append(Object.assign(svgEl("title"), { textContent: label }));
  const marker = svgEl("marker", { id: "arrowhead", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" });
  marker.append(svgEl("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "head" }));
  const defs = svgEl("defs");
  defs.append(marker);
  svg.append(defs);
  for (const e of edges) {
    const a = at[e.from], b = at[e.to];
    const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2, mid = (x1 + x2) / 2;
    const path = svgEl("path", { class: "edge", d: `M ${x1} ${y1} C ${mid} ${y1}, ${mid} ${y2}, ${x2 - 1} ${y2}`, "marker-end": "url(#arrowhead)" });
    path.append(Object.assign(svgEl("title"), { textContent: `${e.to} starts after ${e.from}` }));
    svg.append(path);
  }
  for (const id of order) {
    const link = svgEl("a", { href: `#/projects/${encodeURIComponent(projectId)}/jobs/${encodeURIComponent(id)}`, class: "node", "data-job": id });
    link.append(svgEl("rect", { x: at[id].x, y: at[id].y, width: W, height: H, rx: 6 }));
    const text = svgEl("text", { x: at[id].x + W / 2, y: at[id].y + H / 2 + 4, "text-anchor": "middle" });
    text.textContent = id.length > 20 ? id.slice(0, 19) + "…" : id;
    link.append(text);
    svg.append(link);
  }
  return h("div", { class: "scroll" }, svg);
}
function chainView(projectId, job, jobs) {
  const chain = job.chain || [job.jobID];
  if (chain.length === 1) return h("span", { class: "muted" }, "none (no job depends on this one)");
  return h("div", { class: "chain" }, graphView(projectId, jobs, chain, `Jobs a chained run of ${job.jobID} executes`));
}
function jobList(projectId, ids) {
  if (!ids || !ids.length) return h("span", { class: "muted" }, "–");
  return ids.map((id, i) => [i ? ", " : "", h("a", { href: `#/projects/${encodeURIComponent(projectId)}/jobs/${encodeURIComponent(id)}` }, id)]);
}

async function loadProject(id) {
  const pr = await api(`/v1/Projects/${encodeURIComponent(id)}`);
  return pr;
}

async function projectPage(ctx, id) {
  let pr;
  try { pr = await loadProject(id); } catch (e) {
    if (e.status !== 404) throw e;
    ctx.mount(h("h1", {}, "Project not found"), h("div", { class: "error" }, e.message), h("a", { href: "#/projects" }, "All projects"));
    return;
  }
  const pid = pr.projectID || id;
  const jobs = pr.jobs || [];
  ctx.mount(h("div", { class: "pagehead" }, h("div", {}, h("h1", {}, pid), h("div", { class: "sub" }, pr.name || "", pr.instance ? ` · instance ${pr.instance}` : ""))),
    pr.loaded === false ? h("div", { class: "error" }, (pr.errors || []).join("\n")) : null,
    h("h2", {}, "Jobs"),
    h("div", { class: "scroll" }, h("table", { "aria-label": "Jobs" },
      h("thead", {}, h("tr", {}, h("th", {}, "Job"), h("th", {}, "Name"), h("th", {}, "Next"), h("th", {}, "Needs"), h("th", { class: "num" }, "Stages"))),
      h("tbody", {}, jobs.map((j) => h("tr", { "data-job": j.jobID },
        h("td", {}, h("a", { href: `#/projects/${encodeURIComponent(pid)}/jobs/${encodeURIComponent(j.jobID)}` }, j.jobID)),
        h("td", {}, j.name || ""), h("td", { class: "next" }, jobList(pid, j.nextJobs || (j.next ? [j.next] : []))),
        h("td", { class: "needs" }, jobList(pid, j.needs)),
        h("td", { class: "num" }, Array.isArray(j.stages) ? j.stages.length : j.stages ?? "")))))),
    jobs.length > 1 ? [h("h2", {}, "Job graph"),
      h("p", { class: "sub" }, "A chained run starts at a job and runs every job that depends on it; jobs of one column run in parallel once the jobs they wait for completed."),
      graphView(pid, jobs, (pr.levels || [jobs.map((j) => j.jobID)]).flat(), `Job graph of ${pid}`)] : null,
    h("h2", {}, "Last runs"), await lastRuns({ project: pid }, 10));
}

async function lastRuns(filter, limit) {
  try {
    const data = await api("/v1/Runs" + qs({ ...filter, limit }));
    return runsTable(data.runs || [], { empty: "No runs yet.", label: "Last runs" }).table;
  } catch (e) {
    if (e.status === 401) throw e;
    return h("p", { class: "muted" }, e.status === 404 ? "This server keeps no run history list." : e.message);
  }
}

async function jobPage(ctx, projectId, jobId) {
  let pr;
  try { pr = await loadProject(projectId); } catch (e) {
    if (e.status !== 404) throw e;
    ctx.mount(h("h1", {}, "Project not found"), h("div", { class: "error" }, e.message));
    return;
  }
  const pid = pr.projectID || projectId;
  const jobs = pr.jobs || [];
  const job = jobs.find((j) => j.jobID.toLowerCase() === jobId.toLowerCase());
  if (!job) {
    ctx.mount(h("h1", {}, "Job not found"), h("p", {}, `Project ${pid} has no job ${jobId}. `, h("a", { href: `#/projects/${encodeURIComponent(pid)}` }, pid)));
    return;
  }
  const instance = pr.instance || "default";
  const runs = await lastRuns({ project: pid, job: job.jobID }, 10);
  const startBox = canWrite(instance) ? startForm(pid, job, instance) : h("p", { class: "note" }, "Your role here is read-only: you can look at this job and its runs, not start it.");
  ctx.mount(
    h("div", { class: "pagehead" }, h("div", {},
      h("h1", {}, h("a", { href: `#/projects/${encodeURIComponent(pid)}` }, pid), " / ", job.jobID),
      h("div", { class: "sub" }, job.name || ""))),
    h("h2", {}, "Start"), startBox,
    job.origin === undefined && job.destination === undefined ? null : h("div", { class: "grid2 spaced" },
      h("div", { class: "card" }, h("h3", {}, "Origin"), describe(job.origin)),
      h("div", { class: "card" }, h("h3", {}, "Destination"), describe(job.destination))),
    h("h2", {}, "Chain"), chainView(pid, job, jobs),
    h("p", { class: "sub" }, "Next: ", jobList(pid, job.nextJobs || (job.next ? [job.next] : [])), " · Needs: ", jobList(pid, job.needs)),
    h("h2", {}, "Stages and field mappings"), stagesView(job.stageDetails ?? job.stages),
    h("h2", {}, "Last runs"), runs);
}

function startForm(projectId, job, instance) {
  const out = h("div", { "aria-live": "polite" });
  const input = (attrs) => h("input", attrs);
  const form = h("form", { class: "form", "aria-label": "Start this job" },
    h("label", { class: "wide" }, "Argument", h("textarea", { name: "argument", rows: 2, placeholder: "@@VAR:JobArgument@@ (optional)" })),
    h("label", {}, "Begin at row", input({ name: "beginAtRow", type: "number", min: 1, value: 1 })),
    h("label", {}, "End after row", input({ name: "endAfterRow", type: "number", min: 1, placeholder: "all" })),
    h("label", {}, "Threads", input({ name: "threadCount", type: "number", min: 1, max: 64, value: 1 })),
    h("label", {}, "Log level", h("select", { name: "loggingLevel" },
      [["0", "0: nothing"], ["1", "1: start, end, errors"], ["2", "2: + summaries"], ["3", "3: + every row"]]
        .map(([v, t]) => h("option", { value: v, selected: v === "1" }, t)))),
    h("label", { class: "check" }, h("input", { type: "checkbox", name: "chainJobs", checked: (job.chain || []).length > 1 || !!job.next }), "Run the chain (the jobs after it)"),
    h("div", { class: "buttons" },
      h("button", { type: "submit", class: "primary" }, "Start run"),
      h("button", { type: "button", onclick: () => preview(form, projectId, job, instance, out) }, "Preview"),
      h("span", { class: "sub" }, "Preview shows the first rows as they would be written; it writes nothing.")));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = form.elements;
    const body = {
      runID: newRunId(), projectID: projectId, jobID: job.jobID, argument: f.argument.value,
      beginAtRow: Number(f.beginAtRow.value || 1), threadCount: Number(f.threadCount.value || 1),
      loggingLevel: Number(f.loggingLevel.value), chainJobs: f.chainJobs.checked,
    };
    if (f.endAfterRow.value) body.endAfterRow = Number(f.endAfterRow.value);
    if (instance !== "default") body.instance = instance;
    const btn = form.querySelector("button[type=submit]");
    btn.disabled = true;
    try {
      const r = await api("/v1/ExecuteJobAsync", { method: "POST", body });
      location.hash = `#/runs/${r.runID}` + qs({ project: projectId, instance: body.instance });
    } catch (e) {
      setKids(out, h("div", { class: "error", role: "alert" }, `Could not start: ${e.message}`));
      btn.disabled = false;
    }
  });
  return h("div", {}, form, out);
}

async function preview(form, projectId, job, instance, out) {
  setKids(out, h("p", { class: "muted" }, "Previewing…"));
  let data;
  try {
    data = await api("/v1/Preview", { method: "POST", body: {
      projectID: projectId, jobID: job.jobID, argument: form.elements.argument.value, rows: 20,
      instance: instance === "default" ? undefined : instance } });
  } catch (e) {
    setKids(out, h("div", { class: "error", role: "alert" }, e.status === 404 && /endpoint/.test(e.message)
      ? "This server has no preview API (POST /v1/Preview)." : `Preview failed: ${e.message}`));
    return;
  }
  const rows = data.rows || [];
  const body = h("tbody", {});
  const chips = (cols, values) => h("div", { class: "values" }, (cols && cols.length ? cols : Object.keys(values || {}))
    .map((k) => h("span", {}, h("b", {}, k), " ", valueText((values || {})[k]))));
  for (const r of rows) {
    const stages = r.stages && r.stages.length ? r.stages : [{}];
    stages.forEach((st, i) => body.append(h("tr", {},
      h("td", { class: "num" }, i ? "" : num(r.row)),
      h("td", {}, st.stage ?? ""),
      h("td", {}, st.action ? h("span", { class: "pill action-" + st.action }, st.action) : ""),
      h("td", {}, st.values ? chips(st.columns, st.values) : "",
        !i && r.origin ? h("details", { class: "origin" }, h("summary", {}, "origin row"), chips(r.columns, r.origin)) : ""),
      h("td", { class: r.error ? "errs" : "" }, i ? "" : r.error || ""))));
  }
  const c = data.counters || {};
  const summary = ["inserts", "updates", "deletes", "skips", "ignores", "errors"].filter((k) => c[k]).map((k) => `${num(c[k])} ${k}`).join(", ");
  setKids(out, h("h2", {}, `Preview: first ${num(rows.length)} rows (nothing written)`),
    summary ? h("p", { class: "sub" }, `Would do: ${summary}.`) : null,
    data.error ? h("div", { class: "error", role: "alert" }, data.error) : null,
    h("div", { class: "scroll" }, h("table", { "aria-label": "Preview" },
      h("thead", {}, h("tr", {}, h("th", { class: "num" }, "Row"), h("th", {}, "Stage"), h("th", {}, "Action"), h("th", {}, "Values as written"), h("th", {}, "Error"))),
      body)));
}

// ---------- health ----------

async function healthPage(ctx) {
  let hz, err = null;
  try { hz = await api("/healthz"); } catch (e) { err = e; hz = null; }
  // Nodes: once the cluster API exists (asked once per visit, not every refresh).
  if (ctx.nodesApi !== false) {
    try { ctx.nodes = await api("/v1/Nodes"); ctx.nodesApi = true; } catch (_) { ctx.nodes = null; ctx.nodesApi = false; }
  }
  const nodes = ctx.nodes;
  let scheds = null;
  try { scheds = await api("/v1/Schedules"); } catch (_) { scheds = null; }
  const ok = hz && hz.status === "ok";
  ctx.mount(h("div", { class: "pagehead" }, h("h1", {}, "Health")),
    h("div", { class: "grid2 health" }, h("div", { class: "card" },
      h("h3", {}, h("span", { class: "badge " + (ok ? "Complete" : "Failed") }, ok ? "OK" : "Unavailable"), "Server"),
      err ? h("div", { class: "error" }, err.message) : h("dl", { class: "kv" },
        h("dt", {}, "Queued runs"), h("dd", {}, num(hz.queued)),
        h("dt", {}, "Running now"), h("dd", {}, num(hz.running)),
        h("dt", {}, "Stopping"), h("dd", {}, hz.stopping ? "yes: taking no new runs" : "no")))),
    nodes && Array.isArray(nodes.nodes) && nodes.nodes.length ? nodesTable(nodes) : null,
    scheds && Array.isArray(scheds.schedules) && scheds.schedules.length ? schedulesTable(scheds.schedules, ctx) : null);
  const t = setTimeout(() => { if (ctx.alive()) healthPage(ctx); }, 5000);
  onCleanup(() => clearTimeout(t));
}

// The nodes sharing the store: one on the embedded store, several on PostgreSQL.
const NODE_BADGE = { active: "Complete", draining: "Cancelled", stopped: "Queued", lost: "Failed" };
function nodesTable(list) {
  const rows = list.nodes.map((n) => h("tr", { "data-node": n.nodeId },
    h("td", { class: "badgecell" }, h("span", { class: "badge " + (NODE_BADGE[n.state] || "Queued") }, n.state)),
    h("td", { class: "mono" }, n.nodeId, n.thisNode ? h("span", { class: "muted" }, " (this node)") : null),
    h("td", { class: "mono" }, n.address),
    h("td", { class: "num" }, `${num(n.running)} / ${num(n.workers)}`),
    h("td", { class: "num", title: n.heartbeatAt }, n.silentSecs < 1 ? "just now" : `${Math.round(n.silentSecs)} s ago`),
    h("td", { title: n.startedAt }, new Date(n.startedAt).toLocaleString()),
    h("td", { class: "mono" }, n.version)));
  return [h("h2", {}, "Nodes"),
    h("p", { class: "muted" }, `A node silent for ${list.leaseSecs} s is lost; its runs are taken over by the others.`),
    h("div", { class: "scroll" }, h("table", { id: "nodes" },
      h("thead", {}, h("tr", {}, h("th", {}, "State"), h("th", {}, "Node"), h("th", {}, "Address"),
        h("th", { class: "num" }, "Running / workers"), h("th", { class: "num" }, "Heartbeat"), h("th", {}, "Started"), h("th", {}, "Version"))),
      h("tbody", {}, rows)))];
}

// The jobs' schedules: next fire time, the last tick, pause and resume.
const TICK_BADGE = { queued: "Complete", skipped: "Cancelled", missed: "Failed" };
function schedulesTable(list, ctx) {
  const toggle = async (s, btn) => {
    btn.disabled = true;
    const path = ["/v1/Schedules", s.projectID, s.jobID, s.name].map((p, i) => i ? encodeURIComponent(p) : p).join("/");
    try { await api(`${path}/${s.paused ? "resume" : "pause"}`, { method: "POST" }); } catch (e) { btn.title = e.message; }
    if (ctx.alive()) healthPage(ctx);
  };
  const rows = list.map((s) => {
    const last = s.lastTick;
    const btn = canWrite(s.instance) ? h("button", { type: "button" }, s.paused ? "Resume" : "Pause") : null;
    if (btn) btn.addEventListener("click", () => toggle(s, btn));
    return h("tr", { "data-schedule": `${s.projectID}/${s.jobID}/${s.name}` },
      h("td", { class: "mono" }, `${s.projectID} / ${s.jobID} / ${s.name}`),
      h("td", { class: "mono", title: `catch_up ${s.catchUp}, overlap ${s.overlap}` }, `${s.cron} (${s.timezone})`),
      h("td", {}, s.paused ? h("span", { class: "badge Queued" }, "paused") : (s.nextFireTimes[0] ? timeEl(s.nextFireTimes[0]) : "never")),
      h("td", {}, last ? [h("span", { class: "badge " + (TICK_BADGE[last.outcome] || "Queued"), title: last.reason || "" }, last.outcome),
        " ", timeEl(last.tick), last.runID ? [" ", h("a", { href: `#/runs/${encodeURIComponent(last.runID)}${qs({ project: s.projectID, instance: s.instance })}` }, "run")] : null] : "–"),
      h("td", {}, btn));
  });
  return [h("h2", {}, "Schedules"),
    h("div", { class: "scroll" }, h("table", { id: "schedules" },
      h("thead", {}, h("tr", {}, h("th", {}, "Project / job / schedule"), h("th", {}, "Cron"), h("th", {}, "Next"), h("th", {}, "Last tick"), h("th", {}, ""))),
      h("tbody", {}, rows)))];
}

// ---------- login ----------

async function loginPage(ctx) {
  if (me.open && me.known) { location.hash = "#/runs"; return; }
  const next = ctx.params.get("next") || "#/runs";
  const msg = h("div", { "aria-live": "assertive" });
  const user = h("input", { name: "user", autocomplete: "username", required: true, autofocus: true });
  const pass = h("input", { name: "password", type: "password", autocomplete: "current-password", required: true });
  const form = h("form", { "aria-label": "Log in" }, h("h1", {}, "Log in to tidepool"),
    h("label", {}, "User", user), h("label", {}, "Password", pass), msg,
    h("button", { type: "submit", class: "primary" }, "Log in"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    setKids(msg);
    try {
      await api("/console/login", { method: "POST", body: { user: user.value, password: pass.value }, noLoginRedirect: true });
    } catch (e) {
      setKids(msg, h("div", { class: "error", role: "alert" }, e.status === 401 || e.status === 400 ? "The user name or password is incorrect." : e.message));
      return;
    }
    await loadMe();
    location.hash = next.startsWith("#/") && !next.startsWith("#/login") ? next : "#/runs";
  });
  ctx.mount(h("div", { class: "login" }, form));
  user.focus();
}

// ---------- start ----------

window.addEventListener("hashchange", route);
(async () => {
  await loadMe();
  if (!location.hash) history.replaceState(null, "", "#/runs");
  route();
})();
