#!/usr/bin/env python3
"""The cluster benchmark: tidepool nodes sharing one PostgreSQL database.

    python3 bench/cluster.py [--seconds 6] [--rounds 2] [--connections 64] [--runs 1000]
                             [--pg postgres://postgres@127.0.0.1:5432] [--default-lease]
                             [--only accept,completed,failover] [--no-build]

Every scenario gets a fresh PostgreSQL database (tidepool_cluster_bench_*).
1. Accept path (`--workers 0`: accept-only nodes; every run is committed
   before `started: true`), loaded by wrk with a fresh runID per request:
   one node; three nodes, each loaded by its own wrk at once (the connections
   split between them); the bare ceiling (bench/pg_ceiling.rs: axum + group
   commit into PostgreSQL); tidepool on its embedded SQLite store, for reference.
   `--rounds` times, interleaved, each ratio against its own round's ceiling
   (the machine is shared and noisy), with the median ratios.
2. Completed runs/s of a tiny job (3 CSV rows upserted into a table) with
   1, 2 and 3 nodes: `--runs` runs submitted across the nodes, timed until
   none is Queued or Running. The destination is a SQLite file per node (the
   store's own cost) or a PostgreSQL table (each run connects to PostgreSQL);
   tidepool on its SQLite store for reference.
3. Failover: a run held mid-write (its destination table locked by us) on a
   node that is then killed (-9) while two others run; the time until another
   node ends it (Failed), and with `rerun_on_node_loss = true` until another
   node runs it again. `--lease-secs` (3) and, with `--default-lease`, 15.
Prints a table and writes bench/out/cluster.json. Needs wrk and psql.
"""
import argparse, http.client, json, os, re, shutil, socket, statistics, subprocess, sys, tempfile, threading, time
import urllib.error, urllib.request, uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
BIN = REPO / "target" / "release" / "tidepool"
CEILING = REPO / "target" / "release" / "examples" / "pg_ceiling"
DB_PREFIX = "tidepool_cluster_bench_"

LUA = r"""
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
local function guid()
  return string.format("%08x-%04x-4%03x-%04x-%012x", math.random(0, 0xffffffff), math.random(0, 0xffff),
    math.random(0, 0xfff), math.random(0x8000, 0xbfff), math.random(0, 0xffffffffffff))
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  return wrk.format(nil, "/v1/ExecuteJobAsync", nil,
    '{"runID":"' .. guid() .. '","projectID":"tiny","jobID":"load"}')
end
"""

PROJECT = """id = "tiny"
[connections.src]
kind = "csv"
path = "in.csv"
[connections.db]
{db}
"""
JOB = """{extra}[origin]
connection = "src"
[destination]
connection = "db"
[[stages]]
table = "{table}"
action = "{action}"
fields = [{{ column = "id", origin = "id", match = true }}, {{ column = "name", origin = "name" }}]
"""


# ---------------------------------------------------------------- helpers

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port, path, timeout=10):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return r.read().decode()


def poll(what, cond, deadline_s, every=0.05):
    """Calls `cond` until it returns something truthy; fails after `deadline_s`."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            v = cond()
            if v:
                return v
        except (OSError, urllib.error.URLError, http.client.HTTPException, ValueError):
            pass
        if time.monotonic() > end:
            raise RuntimeError(f"timed out after {deadline_s} s waiting for {what}")
        time.sleep(every)


def psql(url, sql):
    return subprocess.run(["psql", url, "-qAt", "-v", "ON_ERROR_STOP=1", "-c", sql], check=True,
                          capture_output=True, text=True).stdout.strip()


class Bench:
    """The temporary root, the database server's URL and the processes started."""

    def __init__(self, args):
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="tidepool-cluster-bench-"))
        self.procs = []
        self.lua = self.root / "guid.lua"
        self.lua.write_text(LUA)
        self.src_csv = "id,name\n1,a\n2,b\n3,c\n"

    def fresh_db(self, name):
        """A new, empty database; returns its URL."""
        db = DB_PREFIX + name
        admin = f"{self.args.pg}/postgres"
        psql(admin, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        psql(admin, f"CREATE DATABASE {db}")
        return f"{self.args.pg}/{db}"

    def drop_dbs(self):
        admin = f"{self.args.pg}/postgres"
        for db in psql(admin, f"SELECT datname FROM pg_database WHERE datname LIKE '{DB_PREFIX}%'").split():
            psql(admin, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")

    def projects(self, name, db_toml, table, extra=""):
        """A projects folder with project `tiny` and its job `load`."""
        proj = self.root / name / "tiny"
        (proj / "jobs").mkdir(parents=True, exist_ok=True)
        (proj / "project.toml").write_text(PROJECT.format(db=db_toml))
        (proj / "jobs" / "load.toml").write_text(JOB.format(table=table, action="update/insert", extra=extra))
        (proj / "in.csv").write_text(self.src_csv)
        return proj.parent

    def node(self, scenario, n, projects, workers, store=None, lease=None):
        """Starts `tidepool serve` (node `n{n}` of `store`, or on SQLite) and
        waits until it answers; returns (process, port, log path)."""
        port = free_port()
        data = self.root / scenario / f"data-n{n}"
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        cmd = [BIN, "serve", "--listen", f"127.0.0.1:{port}", "--workers", str(workers),
               "--queue-size", "100000000", "--data-dir", data, "--projects", projects]
        if store:
            cmd += ["--store", store, "--node-id", f"n{n}"]
        if lease:
            cmd += ["--lease-secs", str(lease)]
        log = self.root / scenario / f"node-n{n}.log"
        p = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                             env={**os.environ, "TIDEPOOL_LOG": os.environ.get("TIDEPOOL_LOG", "warn")})
        self.procs.append(p)
        def up():
            if p.poll() is not None:
                raise RuntimeError("exited")
            return get(port, "/healthz", 1)
        try:
            poll(f"node n{n} of {scenario} to answer /healthz", up, 30)
        except RuntimeError:
            raise RuntimeError(f"node n{n} of {scenario} did not start "
                               f"(exit {p.poll()}):\n{tail(log)}") from None
        return p, port, log

    def ceiling(self, url):
        port = free_port()
        log = self.root / "ceiling.log"
        p = subprocess.Popen([CEILING, f"127.0.0.1:{port}", url], stdout=open(log, "w"), stderr=subprocess.STDOUT)
        self.procs.append(p)
        poll("pg_ceiling to answer", lambda: p.poll() is None and get(port, "/healthz", 1), 30)
        return p, port, log

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []


def tail(log, n=30):
    try:
        return "\n".join(Path(log).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ---------------------------------------------------------------- 1. accept path

def wrk_start(port, seconds, conns, script, threads):
    return subprocess.Popen(["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", script,
                             f"http://127.0.0.1:{port}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wrk_result(p):
    out, err = p.communicate()
    if p.returncode != 0:
        raise RuntimeError(f"wrk failed: {err}")

    def lat(q):
        m = re.search(rf"\s{q}%\s+([\d.]+)(us|ms|s)", out)
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50_ms": lat(50),
            "p99_ms": lat(99), "requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "not_2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": errors.group(1) if errors else ""}


def load(ports, b):
    """wrk on every port at once, the connections split between them; the
    summed rate, the worst p50/p99 and the counts."""
    a = b.args
    conns = max(1, a.connections // len(ports))
    threads = 2 if len(ports) == 1 else 1
    ps = [wrk_start(port, a.seconds, max(conns, threads), b.lua, threads) for port in ports]
    rs = [wrk_result(p) for p in ps]
    return {"rps": sum(r["rps"] for r in rs), "p50_ms": max(r["p50_ms"] for r in rs),
            "p99_ms": max(r["p99_ms"] for r in rs), "requests": sum(r["requests"] for r in rs),
            "not_2xx": sum(r["not_2xx"] for r in rs), "per_node": rs,
            "connections": conns * len(ports), "wrk": f"{len(ports)} x wrk -t{threads} -c{conns}"}


def recorded(url, table):
    """The rows in `table` and the transactions that wrote them (distinct
    xmin: rows are only inserted here), so the runs per commit."""
    rows, commits = psql(url, f"SELECT count(*), count(DISTINCT xmin::text) FROM {table}").split("|")
    return {"recorded": int(rows), "commits": int(commits)}


def accept_pg(b, nodes):
    url = b.fresh_db(f"accept{nodes}")
    projects = b.projects("accept-projects", 'kind = "sqlite"\npath = "${DATA_DIR}/tiny.sqlite"', "t")
    started = [b.node(f"accept-pg{nodes}", n, projects, 0, store=url) for n in range(1, nodes + 1)]
    try:
        r = load([port for _, port, _ in started], b)
        r.update(recorded(url, "runs"))
    finally:
        b.stop_all()
    r["logs"] = [str(log) for _, _, log in started]
    return r


def accept_ceiling(b):
    url = b.fresh_db("ceiling")
    _, port, _ = b.ceiling(url)
    try:
        r = load([port], b)
        r.update(recorded(url, "ceiling_runs"))
    finally:
        b.stop_all()
    return r


def accept_sqlite(b):
    projects = b.projects("accept-projects", 'kind = "sqlite"\npath = "${DATA_DIR}/tiny.sqlite"', "t")
    _, port, _ = b.node("accept-sqlite", 1, projects, 0)
    try:
        r = load([port], b)
        r["recorded"] = json.loads(get(port, "/healthz"))["queued"]
    finally:
        b.stop_all()
    return r


# ---------------------------------------------------------------- 2. completed runs/s

def submit(ports, total, per_port_conns=4):
    """POSTs `total` runs spread evenly over `ports` on keep-alive
    connections; returns the run IDs accepted (200)."""
    accepted, failures, lock = [], [], threading.Lock()
    slots = [(port, c) for port in ports for c in range(per_port_conns)]
    share = [total // len(slots) + (1 if i < total % len(slots) else 0) for i in range(len(slots))]

    def worker(port, count):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        for _ in range(count):
            rid = str(uuid.uuid4())
            body = json.dumps({"runID": rid, "projectID": "tiny", "jobID": "load"})
            conn.request("POST", "/v1/ExecuteJobAsync", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            text = resp.read()
            if resp.status == 200:
                mine.append(rid)
            else:
                with lock:
                    failures.append((resp.status, text[:200]))
        conn.close()
        with lock:
            accepted.extend(mine)

    ts = [threading.Thread(target=worker, args=(port, n)) for (port, _), n in zip(slots, share)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if failures:
        raise RuntimeError(f"{len(failures)} submissions refused, e.g. {failures[0]}")
    return accepted


def runs(port, status, limit=1):
    return json.loads(get(port, f"/v1/Runs?status={status}&limit={limit}"))["runs"]


def count_status(port, status):
    n, cursor = 0, ""
    while True:
        page = json.loads(get(port, f"/v1/Runs?status={status}&limit=500" + (f"&cursor={cursor}" if cursor else "")))
        n += len(page["runs"])
        cursor = page.get("nextCursor")
        if not cursor:
            return n


SQLITE_DEST = ('kind = "sqlite"\npath = "${DATA_DIR}/tiny.sqlite"\njournal_mode = "wal"\n'
               'init_sql = ["CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, name TEXT)"]')


def completed(b, nodes, workers, store, dest):
    """Submits --runs tiny runs across `nodes` nodes; runs/s until every one
    has ended. `store` and `dest` are "pg" or "sqlite" (a SQLite destination
    is a file in each node's data folder; a PostgreSQL one is a table in the
    store's database, the same three rows for every run)."""
    name = f"completed-{store}{nodes}-{dest}"
    url = b.fresh_db(name.replace("-", "_")) if "pg" in (store, dest) else None
    if dest == "pg":
        psql(url, "CREATE TABLE tiny_t(id integer PRIMARY KEY, name text)")
        projects = b.projects(f"{name}-projects", f'kind = "postgres"\nurl = "{url}"', "tiny_t")
    else:
        projects = b.projects(f"{name}-projects", SQLITE_DEST, "t")
    started = [b.node(name, n, projects, workers, store=url if store == "pg" else None)
               for n in range(1, nodes + 1)]
    ports = [port for _, port, _ in started]
    try:
        t0 = time.perf_counter()
        ids = submit(ports, b.args.runs)
        submitted = time.perf_counter() - t0
        # Queued first, then Running: a run moves Queued -> Running -> ended, so
        # none can slip between the two looks.
        poll(f"every run of {name} to end",
             lambda: not runs(ports[0], "Queued") and not runs(ports[0], "Running"), 600, every=0.05)
        secs = time.perf_counter() - t0
        complete = count_status(ports[0], "Complete")
        failed = count_status(ports[0], "Failed")
    finally:
        b.stop_all()
    return {"nodes": nodes, "workers_per_node": workers, "runs": len(ids), "complete": complete, "failed": failed,
            "seconds": secs, "submit_seconds": submitted, "runs_per_s": len(ids) / secs,
            "logs": [str(log) for _, _, log in started]}


# ---------------------------------------------------------------- 3. failover

class TableLock:
    """A psql session holding an exclusive lock on a table: writes into it wait."""

    def __init__(self, url, table):
        self.p = subprocess.Popen(["psql", url, "-qAt", "-v", "ON_ERROR_STOP=1"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.p.stdin.write(f"BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE; SELECT 'locked';\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline().strip()
        if line != "locked":
            raise RuntimeError(f"could not lock {table}: {line} {self.p.stderr.read()}")

    def release(self):
        if self.p.poll() is None:
            self.p.stdin.write("COMMIT;\n\\q\n")
            self.p.stdin.flush()
            self.p.wait(10)


def run_detail(port, rid):
    return json.loads(get(port, f"/v1/Runs/{rid}", timeout=2))


def failover(b, lease, rerun):
    """A run held on node 1 (the only node when it is claimed); nodes 2 and 3
    start; node 1 is killed (-9); the time until node 2 sees the run ended, or
    (rerun) running again."""
    name = f"failover-l{lease}-{'rerun' if rerun else 'fail'}"
    url = b.fresh_db(name.replace("-", "_"))
    psql(url, "CREATE TABLE slow_t(id integer PRIMARY KEY, name text)")
    extra = "rerun_on_node_loss = true\n" if rerun else ""
    projects = b.projects(f"{name}-projects", f'kind = "postgres"\nurl = "{url}"', "slow_t", extra=extra)
    lock = TableLock(url, "slow_t")
    try:
        p1, port1, log1 = b.node(name, 1, projects, 2, store=url, lease=lease)
        rid = str(uuid.uuid4())
        conn = http.client.HTTPConnection("127.0.0.1", port1, timeout=10)
        conn.request("POST", "/v1/ExecuteJobAsync", json.dumps({"runID": rid, "projectID": "tiny", "jobID": "load"}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"the slow run was refused: {resp.status} {resp.read()[:200]}")
        # Running on node 1 and waiting for our lock.
        before = poll("the slow run to be Running on n1",
                      lambda: (d := run_detail(port1, rid))["status"] == "Running" and d, 30)
        poll("the slow run to wait on the table lock",
             lambda: psql(url, "SELECT count(*) FROM pg_locks WHERE NOT granted") != "0", 30)
        others = [b.node(name, n, projects, 2, store=url, lease=lease) for n in (2, 3)]
        port2 = others[0][1]
        p1.kill()
        t_kill = time.monotonic()
        p1.wait()
        seen, t_requeued, t_ended, t_taken, last = set(), None, None, None, None
        deadline = t_kill + lease * 4 + 60
        while time.monotonic() < deadline:
            try:
                d = run_detail(port2, rid)
            except (OSError, urllib.error.URLError, http.client.HTTPException, ValueError):
                time.sleep(0.05)
                continue
            now, last = time.monotonic(), d
            seen.add(d["status"])
            if d["status"] == "Queued" and t_requeued is None:
                t_requeued = now
            if d["status"] in ("Complete", "Failed", "Cancelled"):
                t_ended = now
                break
            if rerun and d["status"] == "Running" and moved(before, d):
                t_taken = now
                break
            time.sleep(0.05)
        r = {"lease_secs": lease, "rerun_on_node_loss": rerun, "statuses_seen": sorted(seen),
             "kill_to_ended_s": t_ended - t_kill if t_ended else None,
             "kill_to_requeued_s": t_requeued - t_kill if t_requeued else None,
             "kill_to_taken_over_s": t_taken - t_kill if t_taken else None,
             "final": {k: last.get(k) for k in ("status", "error", "node", "requeues")} if last else None,
             "logs": [str(log1)] + [str(log) for _, _, log in others]}
        if rerun and t_taken:
            # Let the rerun finish now, to see it end.
            lock.release()
            d = poll("the rerun to end", lambda: (x := run_detail(port2, rid))["status"] in
                     ("Complete", "Failed", "Cancelled") and x, 60)
            r["rerun_final"] = {k: d.get(k) for k in ("status", "error", "node", "requeues")}
        return r
    finally:
        lock.release()
        b.stop_all()


def moved(before, now):
    """Whether the run is no longer node 1's first attempt: a new start
    time, another node, or a requeue counted."""
    for k in ("startTime", "node", "requeues"):
        if k in now and now.get(k) != before.get(k):
            return True
    return False


# ---------------------------------------------------------------- main

# The completed-runs scenarios: (store, destination, nodes).
COMPLETED = [("pg", "sqlite", 1), ("pg", "sqlite", 2), ("pg", "sqlite", 3),
             ("pg", "pg", 1), ("pg", "pg", 3), ("sqlite", "sqlite", 1)]

def fmt(v, spec):
    """`v` formatted, or a dash as wide as the spec says."""
    if v is None:
        width = re.search(r"\d+", spec)
        return "-".rjust(int(width.group(0)) if width else 1)
    return format(v, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=6, help="wrk duration per accept scenario")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections per scenario (split over nodes)")
    ap.add_argument("--runs", type=int, default=1000, help="tiny runs per completed-runs scenario")
    ap.add_argument("--workers", type=int, default=4, help="workers per node in the completed-runs scenarios")
    ap.add_argument("--rounds", type=int, default=2, help="accept scenarios repeated, interleaved (median ratios)")
    ap.add_argument("--lease-secs", type=int, default=3)
    ap.add_argument("--default-lease", action="store_true", help="also run failover with the default 15 s lease")
    ap.add_argument("--pg", default="postgres://postgres@127.0.0.1:5432", help="the PostgreSQL server (no database)")
    ap.add_argument("--only", default="accept,completed,failover", help="comma-separated parts to run")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    for tool in ("wrk", "psql"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (apt-get install wrk postgresql-client)")
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "tidepool", "--examples"],
                       cwd=REPO, check=True)
    OUT.mkdir(exist_ok=True)
    parts = set(args.only.split(","))
    b = Bench(args)
    res = {"machine": {"cores": os.cpu_count(), "note": "wrk, the nodes and PostgreSQL share the cores"},
           "args": vars(args)}
    t_start = time.perf_counter()
    try:
        if "accept" in parts:
            res["accept"] = {"rounds": []}
            for k in range(args.rounds):
                res["accept"]["rounds"].append({key: scenario(f"accept {key}, round {k + 1}", f) for key, f in (
                    ("ceiling_pg", lambda: accept_ceiling(b)), ("tidepool_pg_1", lambda: accept_pg(b, 1)),
                    ("tidepool_pg_3", lambda: accept_pg(b, 3)), ("tidepool_sqlite_1", lambda: accept_sqlite(b)))})
        if "completed" in parts:
            res["completed"] = {}
            for store, dest, n in COMPLETED:
                res["completed"][f"{store}_store_{n}_{dest}_dest"] = scenario(
                    f"completed {store} store, {n} node(s), {dest} destination",
                    lambda: completed(b, n, args.workers, store, dest))
        if "failover" in parts:
            res["failover"] = {}
            leases = [args.lease_secs] + ([15] if args.default_lease else [])
            for lease in leases:
                for rerun in (False, True):
                    key = f"lease{lease}_{'rerun' if rerun else 'fail'}"
                    res["failover"][key] = scenario(f"failover {key}", lambda: failover(b, lease, rerun))
    finally:
        b.stop_all()
    res["total_seconds"] = time.perf_counter() - t_start
    report(res)
    (OUT / "cluster.json").write_text(json.dumps(res, indent=2, default=str))
    results = [v for part in ("completed", "failover") for v in res.get(part, {}).values()]
    results += [v for rnd in res.get("accept", {}).get("rounds", []) for v in rnd.values()]
    if all("error" not in v for v in results):
        b.drop_dbs()
        shutil.rmtree(b.root, ignore_errors=True)
    else:
        print(f"\nsome scenario failed: node logs kept under {b.root}")


def scenario(name, f):
    """Runs one scenario; a failure is recorded (with node logs), not fatal."""
    print(f"... {name}", file=sys.stderr, flush=True)
    try:
        return f()
    except Exception as e:  # noqa: BLE001 - reported in the table and the JSON
        print(f"    {name} failed: {e}", file=sys.stderr, flush=True)
        return {"error": str(e)}


ACCEPT_ROWS = (("ceiling_pg", "ceiling: axum + PG group commit"),
               ("tidepool_pg_1", "tidepool PG, 1 node"),
               ("tidepool_pg_3", "tidepool PG, 3 nodes (sum, worst)"),
               ("tidepool_sqlite_1", "tidepool SQLite, 1 node"))


def report_accept(res):
    """The accept table, a block per round; each ratio against its round's
    ceiling, and with several rounds the median ratios."""
    rounds = res["accept"]["rounds"]
    print(f"\naccept path, POST /v1/ExecuteJobAsync, {res['args']['seconds']} s per row, "
          f"{res['args']['connections']} connections in all (3 nodes: split between 3 wrk)")
    print(f"{'':<34}{'runs/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'not 2xx':>9}{'recorded':>10}"
          f"{'runs/commit':>12}{'/ceiling':>10}")
    ratios = {key: [] for key, _ in ACCEPT_ROWS}
    for k, acc in enumerate(rounds):
        if len(rounds) > 1:
            print(f"round {k + 1}")
        ceil = acc.get("ceiling_pg", {}).get("rps")
        for key, label in ACCEPT_ROWS:
            r = acc.get(key, {})
            if "error" in r:
                print(f"{label:<34}failed: {r['error'][:300]}")
                continue
            ratio = r["rps"] / ceil if ceil else None
            if ratio is not None:
                ratios[key].append(ratio)
            per_commit = r["recorded"] / r["commits"] if r.get("commits") else None
            print(f"{label:<34}{r['rps']:>10,.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['not_2xx']:>9}"
                  f"{r['recorded']:>10}{fmt(per_commit, '>12.1f')}{fmt(ratio, '>10.2f')}")
    if len(rounds) > 1:
        med = {key: statistics.median(v) for key, v in ratios.items() if v}
        res["accept"]["median_ratio_to_ceiling"] = med
        print("median / ceiling over the rounds: " + ", ".join(
            f"{label} {med[key]:.2f}" for key, label in ACCEPT_ROWS[1:] if key in med))


def report(res):
    cores = res["machine"]["cores"]
    print(f"\n== tidepool cluster benchmark ({cores} cores shared by wrk, the nodes and PostgreSQL) ==")
    if res.get("accept"):
        report_accept(res)
    comp = res.get("completed")
    if comp:
        print("\ncompleted tiny runs (3 CSV rows upserted into a table), runs submitted across the nodes")
        print(f"{'':<34}{'runs':>7}{'complete':>9}{'failed':>7}{'seconds':>9}{'runs/s':>9}{'/1 node':>9}")
        for store, dest, n in COMPLETED:
            key = f"{store}_store_{n}_{dest}_dest"
            label = f"{store.replace('pg', 'PG').replace('sqlite', 'SQLite')} store, {n} node{'s' if n > 1 else ''}, " \
                    f"{dest.replace('pg', 'PG').replace('sqlite', 'SQLite')} dest"
            one = comp.get(f"{store}_store_1_{dest}_dest", {}).get("runs_per_s")
            r = comp.get(key, {})
            if "error" in r:
                print(f"{label:<34}failed: {r['error'][:300]}")
                continue
            ratio = r["runs_per_s"] / one if one else None
            print(f"{label:<34}{r['runs']:>7}{r['complete']:>9}{r['failed']:>7}{r['seconds']:>9.2f}"
                  f"{r['runs_per_s']:>9,.0f}{fmt(ratio, '>9.2f')}")
    fo = res.get("failover")
    if fo:
        print("\nfailover: the node holding a run killed -9; seen from a surviving node, polled every 50 ms "
              "(a Queued shorter than that is not seen)")
        print(f"{'':<34}{'kill->ended s':>14}{'kill->queued s':>15}{'kill->taken over s':>19}  final")
        for key, r in fo.items():
            if "error" in r:
                print(f"{key:<34}failed: {r['error'][:300]}")
                continue
            final = r.get("rerun_final") or r.get("final") or {}
            where = f" on {final['node']}" if final.get("node") else ""
            again = f" (requeues {final['requeues']})" if final.get("requeues") else ""
            print(f"{key:<34}{fmt(r['kill_to_ended_s'], '>14.2f')}{fmt(r['kill_to_requeued_s'], '>15.2f')}"
                  f"{fmt(r['kill_to_taken_over_s'], '>19.2f')}  {final.get('status')}{where}{again}"
                  f"{': ' + final['error'][:70] if final.get('error') else ''}")
    print(f"\n({res['total_seconds']:.0f} s in all; results in bench/out/cluster.json)")


if __name__ == "__main__":
    main()
