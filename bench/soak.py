#!/usr/bin/env python3
"""The soak benchmark: many tiny runs through POST /v1/ExecuteJobAsync, and
how big the data folder gets over time.

    python3 bench/soak.py [--runs 1000000] [--retention-minutes M] [--workers 4]

Starts `tidepool serve` (release build) with a tiny job (3 CSV rows upserted
into SQLite) and pushes `--runs` runs through it from a Python loader
(keep-alive connections; the queue is kept under `--max-queued` so that the
figures are those of a server that keeps up, not of a growing queue). Every
`--every` seconds it prints runs accepted and ended, the queue, and the size
of the data folder (the store file, its write-ahead log, the rest). At the
end it waits for the queue to empty and prints the sizes once the server is
idle, and again after SIGTERM.

Retention: by default the server's own (`retention_days`, 30: every run of the
soak is kept, which is the worst case for size). `--retention-minutes M` sets
`retention_days = M / 1440` in the server's config file (retention_days takes
fractions) to watch the size go flat once runs older than M minutes are
deleted; with it, the script also waits one retention window after the last
run and prints the size once more.
"""
import argparse, http.client, json, os, re, shutil, signal, socket, subprocess, sys, tempfile
import threading, time, uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = REPO / "target" / "release" / "tidepool"

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


def mb(n):
    return f"{n / 1e6:,.1f} MB"


def sizes(data):
    """(whole folder, store file, its WAL) in bytes."""
    def size(p):
        try:
            return p.stat().st_size if p.is_file() else 0
        except FileNotFoundError:  # a log that went away meanwhile
            return 0
    total = sum(size(p) for p in data.iterdir())
    return total, size(data / "tidepool.sqlite"), size(data / "tidepool.sqlite-wal")


class Server:
    def __init__(self, port):
        self.port = port

    def get(self, path):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            c.request("GET", path)
            return c.getresponse().read().decode()
        finally:
            c.close()

    def health(self):
        return json.loads(self.get("/healthz"))

    def ended(self):
        m = self.get("/metrics")
        return int(sum(float(v) for v in re.findall(r'tidepool_runs_total\{[^}]*\} ([\d.e+]+)', m)))

    def purged(self):
        m = re.search(r"tidepool_runs_purged_total(?:\{[^}]*\})? ([\d.e+]+)", self.get("/metrics"))
        return int(float(m.group(1))) if m else 0


class Loader:
    """Threads posting runs over keep-alive connections, pausing while the
    queue is over `max_queued`."""

    def __init__(self, port, total, connections, max_queued):
        self.port, self.total, self.max_queued = port, total, max_queued
        self.lock = threading.Lock()
        self.sent = self.accepted = self.refused = 0
        self.queue_full = threading.Event()
        self.threads = [threading.Thread(target=self.work, daemon=True) for _ in range(connections)]

    def take(self):
        with self.lock:
            if self.sent >= self.total:
                return False
            self.sent += 1
            return True

    def work(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while self.take():
            while self.queue_full.is_set():
                time.sleep(0.05)
            body = json.dumps({"runID": str(uuid.uuid4()), "projectID": "tiny", "jobID": "load"})
            for attempt in range(20):
                try:
                    conn.request("POST", "/v1/ExecuteJobAsync", body, {"content-type": "application/json"})
                    r = conn.getresponse()
                    answer = r.read()
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                    time.sleep(0.1)
                    continue
                if r.status == 503:  # queue full: the same run again shortly
                    time.sleep(0.1)
                    continue
                with self.lock:
                    if r.status == 200 and json.loads(answer).get("started"):
                        self.accepted += 1
                    else:
                        self.refused += 1
                break

    def start(self):
        for t in self.threads:
            t.start()

    def alive(self):
        return any(t.is_alive() for t in self.threads)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1_000_000)
    ap.add_argument("--retention-minutes", type=float, default=None,
                    help="retention_days = M / 1440 (default: the server's 30 days)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--max-queued", type=int, default=5000)
    ap.add_argument("--every", type=float, default=10.0, help="seconds between two lines")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--bin", type=Path, default=None,
                    help="a tidepool binary to use instead of building the release one")
    args = ap.parse_args()
    binary = args.bin or BIN
    if args.bin is None:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=REPO, check=True)

    root = Path(tempfile.mkdtemp(prefix="tidepool-soak-"))
    proj = root / "projects" / "tiny"
    (proj / "jobs").mkdir(parents=True)
    (proj / "project.toml").write_text(PROJECT)
    (proj / "jobs" / "load.toml").write_text(JOB)
    (proj / "in.csv").write_text("id,name\n1,a\n2,b\n3,c\n")
    data = root / "data"
    config = root / "serve.toml"
    config.write_text("" if args.retention_minutes is None
                      else f"retention_days = {args.retention_minutes / 1440!r}\n")
    port = free_port()
    srv = subprocess.Popen([binary, "serve", "--config", config, "--listen", f"127.0.0.1:{port}",
                            "--workers", str(args.workers), "--data-dir", data, "--projects", root / "projects"],
                           env={**os.environ, "TIDEPOOL_LOG": "warn"})
    server = Server(port)
    for _ in range(200):
        try:
            server.health()
            break
        except OSError:
            time.sleep(0.05)
    else:
        sys.exit("the server did not start")

    retention = ("30 days (default)" if args.retention_minutes is None
                 else f"{args.retention_minutes:g} min")
    print(f"soak: {args.runs:,} tiny runs, {args.workers} workers, retention {retention}, data in {data}")
    print(f"{'time':>7} {'accepted':>10} {'ended':>10} {'queued':>7} {'purged':>10} "
          f"{'folder':>11} {'store':>11} {'wal':>11}")
    loader = Loader(port, args.runs, args.connections, args.max_queued)
    t0 = time.monotonic()
    peak = [0]

    def line():
        h = server.health()
        loader.queue_full.set() if h["queued"] > args.max_queued else loader.queue_full.clear()
        total, store, wal = sizes(data)
        peak[0] = max(peak[0], total)
        print(f"{time.monotonic() - t0:6.0f}s {loader.accepted:>10,} {server.ended():>10,} {h['queued']:>7,} "
              f"{server.purged():>10,} {mb(total):>11} {mb(store):>11} {mb(wal):>11}", flush=True)
        return h

    try:
        loader.start()
        last = 0.0
        while True:
            time.sleep(0.25)
            h = server.health()
            loader.queue_full.set() if h["queued"] > args.max_queued else loader.queue_full.clear()
            peak[0] = max(peak[0], sizes(data)[0])
            if time.monotonic() - last >= args.every:
                last = time.monotonic()
                line()
            if not loader.alive() and h["queued"] == 0 and h["running"] == 0:
                break
        secs = time.monotonic() - t0
        ended = server.ended()
        # Idle: the writer truncates the log once writes pause.
        time.sleep(2)
        h = line()
        total, store, wal = sizes(data)
        print(f"done: {loader.accepted:,} accepted ({loader.refused} refused), {ended:,} ended in {secs:.0f} s "
              f"({ended / secs:,.0f} runs/s); peak folder {mb(peak[0])}; idle: folder {mb(total)}, "
              f"store {mb(store)}, WAL {mb(wal)} ({store / max(ended, 1):,.0f} store bytes per run ended)")
        if args.retention_minutes is not None:
            window = args.retention_minutes * 60
            print(f"waiting one retention window ({window:.0f} s) and a sweep ...", flush=True)
            deadline = time.monotonic() + window + 120
            while time.monotonic() < deadline and server.purged() < ended:
                time.sleep(min(args.every, 5))
                line()
            total, store, wal = sizes(data)
            free = subprocess.run(["sqlite3", data / "tidepool.sqlite", "PRAGMA freelist_count"],
                                  capture_output=True, text=True).stdout.strip() if shutil.which("sqlite3") else "?"
            print(f"after retention: {server.purged():,} runs deleted; folder {mb(total)}, store {mb(store)}, "
                  f"WAL {mb(wal)}, free pages in the store {free} (reused by new runs)")
    finally:
        srv.send_signal(signal.SIGTERM)
        srv.wait()
    total, store, wal = sizes(data)
    print(f"after SIGTERM: folder {mb(total)}, store {mb(store)}, WAL {mb(wal)}; peak folder {mb(peak[0])} "
          f"(target: under 1,000 MB at any point)")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
