#!/usr/bin/env python3
"""The run list at scale: GET /v1/Runs?limit=50 against a store of 1,000,000 runs.

    python3 bench/runs_list.py [--runs 1000000] [--requests 200] [--no-build]

1. `tidepool serve` starts once on an empty data dir (it creates the store and
   its indexes) and stops.
2. The runs are inserted straight into that SQLite file in one transaction,
   with realistic rows: two instances (90 % / 10 %), 8 projects x 3 jobs,
   ~92 % Complete, 5 % Failed, 2 % Cancelled, a few Running and Queued, an
   argument, per-job results and the stored answer, accepted every ~5 s over
   about two months.
   The store's triggers fill the run list's text index (`runs_text`, FTS5
   trigram) as the rows go in, as they do for runs tidepool writes.
3. The real binary serves that store (open mode: the list reads every
   instance); each query is asked `--requests` times over one kept-alive
   connection and the latency (client side, loopback) is printed: p50, p99, max.
Target: < 20 ms for limit=50.

    python3 bench/runs_list.py --before OLD_BINARY

compares with a tidepool from before the text index: the store is made and
filled by OLD_BINARY (no index), timed with it, then opened by the current
binary, which indexes the runs in the background: how long it takes to answer
/healthz and to complete the index is printed, then the same queries again.
"""
import argparse, base64, hashlib, http.client, json, random, shutil, socket, sqlite3, subprocess
import sys, tempfile, time, uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = REPO / "target" / "release" / "tidepool"

PROJECT = """id = "p{n}"
[connections.src]
kind = "csv"
path = "in.csv"
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(data, projects, port):
    p = subprocess.Popen([BIN, "serve", "--listen", f"127.0.0.1:{port}", "--workers", "0",
                          "--data-dir", data, "--projects", projects],
                         env={"TIDEPOOL_LOG": "error", "PATH": "/usr/bin:/bin"})
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/healthz")
            if c.getresponse().status == 200:
                return p
        except OSError:
            time.sleep(0.1)
    p.kill()
    sys.exit("the server did not start")


def ts(t):
    return t.isoformat(timespec="microseconds")


def rows(n, t0):
    rnd = random.Random(42)
    statuses = ["Complete"] * 92 + ["Failed"] * 5 + ["Cancelled"] * 2 + ["Running"]
    words = ["nightly", "hourly", "backfill", "customer", "invoice", "eu", "us", "retry", "manual"]
    for i in range(n):
        instance = "acme" if rnd.random() < 0.1 else "default"
        project = f"p{rnd.randrange(8)}"
        job = f"j{rnd.randrange(3)}"
        status = "Queued" if i >= n - 20 else rnd.choice(statuses)
        accepted = t0 + timedelta(seconds=i * 5 + rnd.random())
        started = accepted + timedelta(milliseconds=rnd.randrange(5, 500))
        total = rnd.randrange(0, 200_000)
        errors = rnd.randrange(0, 5)
        secs = total / 50_000 + 0.05
        ended = started + timedelta(seconds=secs)
        run_id = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
        arg = f"{rnd.choice(words)}-{rnd.choice(words)}-{rnd.randrange(10_000)}"
        req = {"runID": run_id, "projectID": project, "jobID": job, "chainJobs": False,
               "loggingLevel": 0, "argument": arg, "beginAtRow": 1, "endAfterRow": None,
               "threadCount": 1, "webHookURL": None, "instance": None}
        result = {"runID": run_id, "startTime": ts(started), "runTime": f"00:00:{secs:010.7f}",
                  "status": status, "totalRows": total, "inserts": total - errors, "updates": 0,
                  "deletes": 0, "errors": errors, "skips": 0, "ignores": 0, "jobID": job}
        running = status in ("Queued", "Running")
        results = None if status == "Queued" else json.dumps([result])
        response = None if running else json.dumps(
            {**{k: v for k, v in result.items() if k != "jobID"}, "error": None,
             "returnValue": None, "results": [result], "log": []})
        yield (instance, run_id, project, job, json.dumps(req),
               hashlib.sha256(run_id.encode()).hexdigest(), status, ts(accepted),
               None if status == "Queued" else ts(started), None if running else ts(ended),
               results, response, "job j0: origin failed" if status == "Failed" else None,
               int(accepted.timestamp() * 1000))


def text_index_pending(db):
    """Whether the store's text index is still being filled in (None: it has none)."""
    c = sqlite3.connect(db)
    try:
        return c.execute("SELECT EXISTS (SELECT 1 FROM runs_text_backfill)").fetchone()[0] == 1
    except sqlite3.OperationalError:
        return None
    finally:
        c.close()


def fill(db, n):
    c = sqlite3.connect(db)
    # The store's text-index trigger reads requests through tidepool's
    # tp_text() (packed requests); the plain texts written here read as is.
    c.create_function("tp_text", 1, lambda x: x, deterministic=True)
    c.execute("PRAGMA synchronous=OFF")
    t0 = datetime.now(timezone.utc) - timedelta(seconds=n * 5)
    t = time.perf_counter()
    c.execute("BEGIN")
    c.executemany("""INSERT INTO runs (instance, run_id, project_id, job_id, request, fingerprint,
        status, accepted_at, started_at, finished_at, results, response, error, accepted_ms)
        VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)""", rows(n, t0))
    c.execute("COMMIT")
    c.close()
    return time.perf_counter() - t, t0


def timed(conn, path, times):
    lat, body = [], None
    for _ in range(times):
        t = time.perf_counter()
        conn.request("GET", path)
        r = conn.getresponse()
        data = r.read()
        lat.append((time.perf_counter() - t) * 1000)
        if r.status not in (200, 400):
            sys.exit(f"{path}: {r.status} {data[:300]!r}")
        body = json.loads(data)
    lat.sort()
    return lat[len(lat) // 2], lat[int(len(lat) * 0.99) - 1], lat[-1], body


def cursor_at(db, offset):
    """The cursor after the run at `offset` in the list's order (newest first)."""
    c = sqlite3.connect(db)
    ms, inst, rid = c.execute(
        "SELECT accepted_ms, instance, run_id FROM runs ORDER BY accepted_ms DESC, instance DESC, run_id DESC "
        "LIMIT 1 OFFSET ?", (offset,)).fetchone()
    c.close()
    raw = f"{ms}|{rid}|{inst}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


CASES = [
    ("first page", "/v1/Runs?limit=50"),
    ("cursor 10,000 runs deep", "/v1/Runs?limit=50&cursor={deep}"),
    ("cursor 500,000 runs deep", "/v1/Runs?limit=50&cursor={mid}"),
    ("status=Failed", "/v1/Runs?limit=50&status=Failed"),
    ("status=Failed, deep cursor", "/v1/Runs?limit=50&status=Failed&cursor={mid}"),
    ("project=p3", "/v1/Runs?limit=50&project=p3"),
    ("project=p3&job=j1", "/v1/Runs?limit=50&project=p3&job=j1"),
    ("status=Queued (20 runs)", "/v1/Runs?limit=50&status=Queued"),
    ("since/until: one day, far back", "/v1/Runs?limit=50&since={since}&until={until}"),
    ("instance=acme", "/v1/Runs?limit=50&instance=acme"),
    # Text: every argument is word-word-number (9 words).
    ("q=backfill-eu (common text)", "/v1/Runs?limit=50&q=backfill-eu"),
    ("q=nightly (common word)", "/v1/Runs?limit=50&q=nightly"),
    ("q=eu-us-1234 (rare text)", "/v1/Runs?limit=50&q=eu-us-1234"),
    ("q=-1234 (rare, ~100 runs)", "/v1/Runs?limit=50&q=-1234"),
    ("q=zzz (no run)", "/v1/Runs?limit=50&q=zzz"),
    ("q=nightly, deep cursor", "/v1/Runs?limit=50&q=nightly&cursor={mid}"),
    ("q=eu-us-1234&instance=acme", "/v1/Runs?limit=50&q=eu-us-1234&instance=acme"),
    ("q=50 (2 chars: scans)", "/v1/Runs?limit=50&q=50"),
    ("q=zz (2 chars, no run: scans)", "/v1/Runs?limit=50&q=zz"),
]


def run_cases(port, params, requests):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    print(f"GET /v1/Runs against the real binary, {requests} requests each, "
          f"one connection (ms: p50 / p99 / max)")
    for name, path in CASES:
        path = path.format(**params)
        # The slow ones (a scan: up to its 3 s budget) are asked fewer times.
        t = time.perf_counter()
        timed(conn, path, 1)
        times = requests if time.perf_counter() - t < 0.2 else max(5, requests // 20)
        p50, p99, mx, body = timed(conn, path, times)
        got = f"{len(body['runs'])} runs" if "runs" in body else body.get("error")
        print(f"  {name:34} {p50:8.2f} {p99:8.2f} {mx:8.2f}   ({got}, n={times})", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1_000_000)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--bin", help="the tidepool binary (default: target/release/tidepool, built first)")
    ap.add_argument("--before", help="a tidepool binary from before the text index, to compare with")
    args = ap.parse_args()
    global BIN
    if args.bin:
        BIN = Path(args.bin)
    elif not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=REPO, check=True)
    current = BIN
    root = Path(tempfile.mkdtemp(prefix="tidepool-runs-bench-"))
    data, projects = root / "data", root / "projects"
    for n in range(8):
        (projects / f"p{n}" / "jobs").mkdir(parents=True)
        (projects / f"p{n}" / "project.toml").write_text(PROJECT.format(n=n))
    try:
        if args.before:
            BIN = Path(args.before)
        port = free_port()
        p = serve(data, projects, port)
        p.terminate(); p.wait()
        db = data / "tidepool.sqlite"
        secs, t0 = fill(db, args.runs)
        size = db.stat().st_size / 1e6
        indexed = "no text index" if text_index_pending(db) is None else "with its text index"
        print(f"store: {args.runs:,} runs inserted in {secs:.0f} s ({size:,.0f} MB, {indexed})")
        w0 = t0 + timedelta(seconds=args.runs * 5 / 3)
        params = {
            "mid": cursor_at(db, args.runs // 2),
            "deep": cursor_at(db, 10_000),
            "since": quote(w0.isoformat().replace("+00:00", "Z")),
            "until": quote((w0 + timedelta(days=1)).isoformat().replace("+00:00", "Z")),
        }
        port = free_port()
        p = serve(data, projects, port)
        try:
            if args.before:
                print(f"before ({BIN}):")
            run_cases(port, params, args.requests)
        finally:
            p.terminate(); p.wait()
        if args.before:
            BIN = current
            port = free_port()
            t = time.perf_counter()
            p = serve(data, projects, port)
            try:
                print(f"after ({BIN}): answered /healthz {time.perf_counter() - t:.2f} s after start")
                deadline = time.time() + 1800
                while text_index_pending(db) and time.time() < deadline:
                    time.sleep(0.5)
                print(f"  the text index of {args.runs:,} runs was complete "
                      f"{time.perf_counter() - t:.0f} s after start "
                      f"({db.stat().st_size / 1e6:,.0f} MB)")
                run_cases(port, params, args.requests)
            finally:
                p.terminate(); p.wait()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
