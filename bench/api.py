#!/usr/bin/env python3
"""The API benchmark: POST /v1/ExecuteJobAsync under load, and completed runs/s.

    python3 bench/api.py [--seconds 10] [--connections 64]

1. Accept path: `tidepool serve --workers 0` (an accept-only node: every run is
   recorded, fsync'd, before `started: true`, and none executes), loaded by wrk
   with a fresh runID per request. Prints accepted runs/s and p50/p99 latency.
   The same again with an API key on every request (users configured), so
   each request is also authenticated.
2. Completed runs/s: `tidepool serve --workers 4` with a tiny job (3 CSV rows
   upserted into SQLite); wrk submits for a few seconds, then we wait until
   every accepted run has ended and divide.
Needs wrk (apt-get install wrk).
"""
import argparse, json, os, re, shutil, socket, subprocess, sys, tempfile, time, urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = REPO / "target" / "release" / "tidepool"

LUA = r"""
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
local function guid()
  return string.format("%08x-%04x-4%03x-%04x-%012x", math.random(0, 0xffffffff), math.random(0, 0xffff),
    math.random(0, 0xfff), math.random(0x8000, 0xbfff), math.random(0, 0xffffffffffff))
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("TIDEPOOL_BENCH_KEY")
if key then wrk.headers["X-Api-Key"] = key end
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
kind = "sqlite"
path = "${DATA_DIR}/tiny.sqlite"
journal_mode = "wal"
init_sql = ["CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, name TEXT)"]
"""
JOB = """[origin]
connection = "src"
[destination]
connection = "db"
[[stages]]
table = "t"
action = "update/insert"
fields = [{ column = "id", origin = "id", match = true }, { column = "name", origin = "name" }]
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def start(root, workers, port, key_for=None):
    """Starts a server; with `key_for`, a user of that name and an API key
    (returned in the environment wrk reads) are made first."""
    data = root / f"data-{workers}-{key_for or 'open'}"
    shutil.rmtree(data, ignore_errors=True)
    if key_for:
        subprocess.run([BIN, "user", "add", key_for, "--instance", "default:Full", "--data-dir", data],
                       input="bench-password\n", text=True, check=True, capture_output=True)
        key = subprocess.run([BIN, "key", "create", key_for, "--data-dir", data],
                             capture_output=True, text=True, check=True).stdout.split()[-1]
        os.environ["TIDEPOOL_BENCH_KEY"] = key
    else:
        os.environ.pop("TIDEPOOL_BENCH_KEY", None)
    p = subprocess.Popen([BIN, "serve", "--listen", f"127.0.0.1:{port}", "--workers", str(workers),
                          "--queue-size", "100000000", "--data-dir", data, "--projects", root / "projects"],
                         env={**os.environ, "TIDEPOOL_LOG": "warn"})
    for _ in range(200):
        try:
            get(f"http://127.0.0.1:{port}/healthz")
            return p
        except Exception:
            time.sleep(0.05)
    sys.exit("the server did not start")


def wrk(port, seconds, conns, script):
    out = subprocess.run(["wrk", "-t2", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", script,
                          f"http://127.0.0.1:{port}"], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    def lat(p):
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    return rps, lat(50), lat(99), int(non2xx.group(1)) if non2xx else 0, total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=64)
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install wrk")
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=REPO, check=True)
    root = Path(tempfile.mkdtemp(prefix="tidepool-api-bench-"))
    proj = root / "projects" / "tiny"
    (proj / "jobs").mkdir(parents=True)
    (proj / "project.toml").write_text(PROJECT)
    (proj / "jobs" / "load.toml").write_text(JOB)
    (proj / "in.csv").write_text("id,name\n1,a\n2,b\n3,c\n")
    script = root / "guid.lua"
    script.write_text(LUA)

    port = free_port()
    srv = start(root, 0, port)
    try:
        rps, p50, p99, bad, total = wrk(port, args.seconds, args.connections, script)
        stored = json.loads(get(f"http://127.0.0.1:{port}/healthz"))["queued"]
    finally:
        srv.terminate(); srv.wait()
    print(f"accept path: {rps:,.0f} runs/s accepted, p50 {p50:.2f} ms, p99 {p99:.2f} ms "
          f"({total} requests, {bad} not 2xx, {stored} runs recorded; target >= 20,000/s, p99 < 20 ms)")

    port = free_port()
    srv = start(root, 0, port, key_for="bench")
    try:
        rps, p50, p99, bad, total = wrk(port, args.seconds, args.connections, script)
    finally:
        srv.terminate(); srv.wait()
        os.environ.pop("TIDEPOOL_BENCH_KEY", None)
    print(f"accept path with an API key: {rps:,.0f} runs/s accepted, p50 {p50:.2f} ms, p99 {p99:.2f} ms "
          f"({total} requests, {bad} not 2xx)")

    port = free_port()
    srv = start(root, 4, port)
    try:
        t0 = time.perf_counter()
        wrk(port, 3, 16, script)
        while True:
            h = json.loads(get(f"http://127.0.0.1:{port}/healthz"))
            if h["queued"] == 0 and h["running"] == 0:
                break
            time.sleep(0.05)
        secs = time.perf_counter() - t0
        m = get(f"http://127.0.0.1:{port}/metrics")
        done = sum(float(v) for v in re.findall(r'tidepool_runs_total\{status="\w+"\} ([\d.e+]+)', m))
        complete = float((re.search(r'tidepool_runs_total\{status="Complete"\} ([\d.e+]+)', m) or [0, 0])[1])
    finally:
        srv.terminate(); srv.wait()
    print(f"tiny job: {done:,.0f} runs ended ({complete:,.0f} Complete) in {secs:.1f} s: {done / secs:,.0f} completed runs/s (4 workers)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
