#!/usr/bin/env python3
"""The reference benchmark of bench.md, CSV -> SQLite, side by side in one run.

    python3 bench/run.py [--rows 1000000] [--memory-rows 5000000] [--skip-python]

Times `sqlite3 .import` of the raw file, a hand-written Python loader, dlt (if
installed), and tidepool: insert into an empty table (threadCount 1 and 4; with
full_name as a script field; with country by a lookup(); with an after_row
operation writing an xref entry) and update/insert into a table that already
holds half the rows (threadCount 1 and 4). Prints rows/s, peak memory and the ratios; absolute times drift on a shared
machine, ratios from one run hold.
"""
import argparse, os, shutil, sqlite3, subprocess, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
BIN = REPO / "target" / "release" / "tidepool"

PROJECT = """id = "bench"
[connections.src]
kind = "csv"
path = "{csv}"
[connections.db]
kind = "sqlite"
path = "${{DATA_DIR}}/bench.sqlite"
journal_mode = "wal"
synchronous = "normal"
init_sql = ["CREATE TABLE IF NOT EXISTS contacts(id INTEGER PRIMARY KEY, full_name TEXT, email TEXT, company TEXT, country TEXT, amount REAL)",
            "CREATE TABLE IF NOT EXISTS countries(code TEXT PRIMARY KEY, name TEXT)",
            "INSERT OR IGNORE INTO countries VALUES ('FR', 'France'), ('US', 'United States'), ('DE', 'Germany')"]
"""

JOB = """batch_size = 5000
[origin]
connection = "src"
[destination]
connection = "db"
[[stages]]
table = "contacts"
action = "{action}"
fields = [
  {{ column = "id", origin = "Id", type = "integer", match = true }},
  {{ column = "full_name", template = "@@ORG:FirstName@@ @@ORG:LastName@@" }},
  {{ column = "email", origin = "Email", transform = "lower" }},
  {{ column = "company", origin = "Company", transform = "null_if_blank" }},
  {{ column = "country", origin = "Country" }},
  {{ column = "amount", origin = "Amount", type = "number" }},
]
"""


def peak_rss(cmd):
    """Runs cmd and returns (seconds, peak RSS MiB) using wait4 on the child."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    secs = time.perf_counter() - t0
    if status != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{p.stderr.read().decode()}")
    return secs, usage.ru_maxrss / 1024


def make_csv(rows):
    path = OUT / f"contacts-{rows}.csv"
    if not path.exists():
        print(f"generating {path.name} ...", flush=True)
        subprocess.run([sys.executable, HERE / "gen_contacts.py", str(rows), path], check=True)
    return path


def setup_project(csv):
    proj = OUT / "projects" / "bench"
    shutil.rmtree(OUT / "projects", ignore_errors=True)
    (proj / "jobs").mkdir(parents=True)
    (proj / "project.toml").write_text(PROJECT.format(csv=csv))
    (proj / "jobs" / "insert.toml").write_text(JOB.format(action="insert"))
    (proj / "jobs" / "upsert.toml").write_text(JOB.format(action="update/insert"))
    # The same job with full_name as a JavaScript field instead of a template.
    script = JOB.format(action="insert").replace(
        'template = "@@ORG:FirstName@@ @@ORG:LastName@@"', 'script = "row.FirstName + \' \' + row.LastName"')
    (proj / "jobs" / "insert_js.toml").write_text(script)
    # Country's name by a lookup in another table (cached per run) ...
    lookup = JOB.format(action="insert").replace(
        'origin = "Country" }', 'script = "lookup(\'db\', \'countries\', \'name\', {code: row.Country}) || row.Country" }')
    (proj / "jobs" / "insert_lookup.toml").write_text(lookup)
    # ... and an operation after each row keeping an xref entry (rows then go one at a time).
    xref = JOB.format(action="insert").replace(
        "[origin]", '[[operations]]\nwhen = "after_row"\nscript = "xrefWrite(\'contacts\', row.Id, \'C-\' + row.Id)"\n[origin]')
    (proj / "jobs" / "insert_xref.toml").write_text(xref)


def tidepool(job, data, *extra):
    return [BIN, "run", "bench", job, "--projects", OUT / "projects", "--data-dir", data,
            "--logging-level", "0", *extra]


def fresh(data):
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--memory-rows", type=int, default=5_000_000,
                    help="rows for the memory-flatness run (0 to skip)")
    ap.add_argument("--skip-python", action="store_true", help="skip the Python peers")
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    print("building tidepool (release) ...", flush=True)
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=REPO, check=True)
    n = args.rows
    csv = make_csv(n)
    setup_project(csv)
    data = OUT / "data"
    results = []  # (route, rows, seconds, peak MiB)

    raw = OUT / "raw.sqlite"
    if shutil.which("sqlite3"):
        raw.unlink(missing_ok=True)
        secs, mem = peak_rss(["sqlite3", raw, ".import --csv " + str(csv) + " raw"])
        results.append(("sqlite3 .import (raw, no mapping)", n, secs, mem))
        raw.unlink(missing_ok=True)
    else:
        print("sqlite3 not installed: apt-get install sqlite3 for the .import reference")

    if not args.skip_python:
        db = OUT / "py.sqlite"
        db.unlink(missing_ok=True)
        secs, mem = peak_rss([sys.executable, HERE / "peer_py_sqlite.py", csv, db])
        results.append(("Python csv + executemany (mapped)", n, secs, mem))
        db.unlink(missing_ok=True)
        try:
            import dlt  # noqa: F401
            m = min(n, 200_000)
            small = make_csv(m)
            db = OUT / "dlt.sqlite"
            db.unlink(missing_ok=True)
            secs, mem = peak_rss([sys.executable, HERE / "peer_dlt_sqlite.py", small, db])
            results.append(("dlt 1.x sqlalchemy (mapped)", m, secs, mem))
        except ImportError:
            print("dlt not installed (pip install 'dlt[sqlalchemy]'): its row is skipped")

    for threads in (1, 4):
        fresh(data)
        secs, mem = peak_rss(tidepool("insert", data, "--threads", str(threads)))
        results.append((f"tidepool insert, threadCount {threads}", n, secs, mem))
        check = sqlite3.connect(data / "bench.sqlite").execute("select count(*) from contacts").fetchone()[0]
        assert check == n, f"{check} rows landed, expected {n}"
    fresh(data)
    secs, mem = peak_rss(tidepool("insert_js", data))
    results.append(("tidepool insert, full_name as a script field", n, secs, mem))
    fresh(data)
    secs, mem = peak_rss(tidepool("insert_lookup", data))
    results.append(("tidepool insert, country by lookup() (run cache)", n, secs, mem))
    fresh(data)
    secs, mem = peak_rss(tidepool("insert_xref", data))
    results.append(("tidepool insert, after_row xrefWrite (row by row)", n, secs, mem))
    for threads in (1, 4):
        fresh(data)
        subprocess.run(tidepool("insert", data, "--end-after-row", str(n // 2)), check=True,
                       stdout=subprocess.DEVNULL)
        secs, mem = peak_rss(tidepool("upsert", data, "--threads", str(threads)))
        results.append((f"tidepool update/insert, half present, threadCount {threads}", n, secs, mem))

    if args.memory_rows:
        big = make_csv(args.memory_rows)
        setup_project(big)
        fresh(data)
        secs, mem = peak_rss(tidepool("insert", data))
        results.append(("tidepool insert (memory check)", args.memory_rows, secs, mem))
        setup_project(csv)
    shutil.rmtree(data, ignore_errors=True)

    print()
    print(f"{'route':<58} {'rows':>9} {'seconds':>8} {'rows/s':>10} {'peak MiB':>9}")
    for route, rows, secs, mem in results:
        print(f"{route:<58} {rows:>9} {secs:>8.2f} {rows / secs:>10.0f} {mem:>9.1f}")
    rate = {r: rows / secs for r, rows, secs, _ in results}
    tp = rate["tidepool insert, threadCount 1"]
    print()
    if "sqlite3 .import (raw, no mapping)" in rate:
        print(f"tidepool insert / sqlite3 .import rows/s: {tp / rate['sqlite3 .import (raw, no mapping)']:.2f}x (target >= 2x)")
    if "Python csv + executemany (mapped)" in rate:
        print(f"tidepool insert / hand-written Python:    {tp / rate['Python csv + executemany (mapped)']:.2f}x")
    if "dlt 1.x sqlalchemy (mapped)" in rate:
        print(f"tidepool insert / dlt:                     {tp / rate['dlt 1.x sqlalchemy (mapped)']:.1f}x (target >= 50x)")
    js = rate["tidepool insert, full_name as a script field"]
    print(f"script field / template rows/s:            {js / tp:.2f} (target >= 0.5)")
    print(f"lookup field / template rows/s:            {rate['tidepool insert, country by lookup() (run cache)'] / tp:.2f}")
    print(f"after_row operation / template rows/s:     {rate['tidepool insert, after_row xrefWrite (row by row)'] / tp:.2f}")
    up = rate["tidepool update/insert, half present, threadCount 1"]
    print(f"upsert time / insert time:                 {tp / up:.2f} (target <= 2)")
    mems = {r: m for r, _, _, m in results}
    if args.memory_rows:
        print(f"peak memory {args.memory_rows} rows / {n} rows:          "
              f"{mems['tidepool insert (memory check)'] / mems['tidepool insert, threadCount 1']:.2f} (flat is ~1)")


if __name__ == "__main__":
    main()
