#!/usr/bin/env python3
"""CSV -> PostgreSQL, the reference workload, side by side with psql \\copy.

    python3 bench/pg.py [--rows 1000000] [--url postgres://postgres@127.0.0.1:5432/test]

Times, in one run: `psql \\copy` of the raw 10-column file into a table typed
like the file and keyed by id (the reference of bench.md, where it runs ~1.3x
slower than the mapped columns), the same into an all-text table without a key
(printed for comparison), and of the already mapped 6 columns (the bulk-loader
floor); dlt's postgres destination if installed; and tidepool with the
connector's default batch size: insert into an empty table and update/insert
with half the rows present, threadCount 1, 2 and 4 (bench.md's workload: the
present half holds the same values, as in a re-sync), and update/insert where
the present half holds other values, so every match is a real write. Prints
rows/s and ratios.
"""
import argparse, csv, os, shutil, subprocess, sys, time
from pathlib import Path
from urllib.parse import urlparse

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
BIN = REPO / "target" / "release" / "tidepool"
SCHEMA = "tidepool_bench"

PROJECT = """id = "pgbench"
[connections.src]
kind = "csv"
path = "{csv}"
[connections.pg]
kind = "postgres"
url = "{url}"
"""
JOB = """[origin]
connection = "src"
[destination]
connection = "pg"
[[stages]]
table = "{schema}.contacts"
action = "{action}"
fields = [
  {{ column = "id", origin = "Id", match = true }},
  {{ column = "full_name", template = "@@ORG:FirstName@@ @@ORG:LastName@@" }},
  {{ column = "email", origin = "Email", transform = "lower" }},
  {{ column = "company", origin = "Company", transform = "null_if_blank" }},
  {{ column = "country", origin = "Country" }},
  {{ column = "amount", origin = "Amount" }},
]
"""


def psql(url, sql):
    subprocess.run(["psql", url, "-q", "-v", "ON_ERROR_STOP=1", "-c", sql], check=True,
                   stdout=subprocess.DEVNULL)


def reset(url):
    psql(url, f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA}; "
              f"CREATE TABLE {SCHEMA}.contacts(id integer PRIMARY KEY, full_name text, email text, "
              f"company text, country text, amount numeric(12,2)); "
              f"CREATE TABLE {SCHEMA}.raw(id integer PRIMARY KEY, first text, last text, email text, "
              f"company text, phone text, city text, country text, created timestamp, amount numeric(12,2)); "
              f"CREATE TABLE {SCHEMA}.raw_text(id integer, first text, last text, email text, company text, "
              f"phone text, city text, country text, created text, amount text)")


def timed(cmd):
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--url", default="postgres://postgres@127.0.0.1:5432/test")
    args = ap.parse_args()
    n, url = args.rows, args.url
    OUT.mkdir(exist_ok=True)
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=REPO, check=True)
    src = OUT / f"contacts-{n}.csv"
    if not src.exists():
        subprocess.run([sys.executable, HERE / "gen_contacts.py", str(n), src], check=True)
    mapped = OUT / f"contacts-{n}-mapped.csv"
    if not mapped.exists():
        with open(src, newline="") as f, open(mapped, "w", newline="") as g:
            w = csv.writer(g)
            for r in csv.DictReader(f):
                w.writerow([r["Id"], r["FirstName"] + " " + r["LastName"], r["Email"].lower(),
                            r["Company"], r["Country"], r["Amount"]])
    proj = OUT / "pgprojects" / "pgbench"
    shutil.rmtree(proj.parent, ignore_errors=True)
    (proj / "jobs").mkdir(parents=True)
    (proj / "project.toml").write_text(PROJECT.format(csv=src, url=url))
    (proj / "jobs" / "insert.toml").write_text(JOB.format(schema=SCHEMA, action="insert"))
    (proj / "jobs" / "upsert.toml").write_text(JOB.format(schema=SCHEMA, action="update/insert"))
    # The same rows with other values in full_name, for the changed-values variant.
    (proj / "jobs" / "older.toml").write_text(JOB.format(schema=SCHEMA, action="insert").replace(
        "@@ORG:FirstName@@ @@ORG:LastName@@", "@@ORG:LastName@@, @@ORG:FirstName@@"))
    tp = lambda job, *extra: [BIN, "run", "pgbench", job, "--projects", proj.parent,
                              "--data-dir", OUT / "pgdata", "--logging-level", "0", *extra]
    results = []
    reset(url)
    results.append(("psql \\copy, raw file (10 columns)", n,
                    timed(["psql", url, "-q", "-c", f"\\copy {SCHEMA}.raw FROM '{src}' CSV HEADER"])))
    results.append(("psql \\copy, raw file, all text, no key", n,
                    timed(["psql", url, "-q", "-c", f"\\copy {SCHEMA}.raw_text FROM '{src}' CSV HEADER"])))
    results.append(("psql \\copy, already mapped (6 columns)", n,
                    timed(["psql", url, "-q", "-c", f"\\copy {SCHEMA}.contacts FROM '{mapped}' CSV"])))
    for threads in (1, 2, 4):
        reset(url)
        results.append((f"tidepool insert, threadCount {threads}", n, timed(tp("insert", "--threads", str(threads)))))
    for threads in (1, 2, 4):
        reset(url)
        subprocess.run(tp("insert", "--end-after-row", str(n // 2)), check=True, stdout=subprocess.DEVNULL)
        results.append((f"tidepool update/insert, half present, threadCount {threads}", n,
                        timed(tp("upsert", "--threads", str(threads)))))
    for threads in (1, 2, 4):
        reset(url)
        subprocess.run(tp("older", "--end-after-row", str(n // 2)), check=True, stdout=subprocess.DEVNULL)
        results.append((f"tidepool update/insert, half present changed, threadCount {threads}", n,
                        timed(tp("upsert", "--threads", str(threads)))))
    try:
        import dlt  # noqa: F401
        import psycopg2  # noqa: F401
        m = min(n, 200_000)
        small = OUT / f"contacts-{m}.csv"
        if not small.exists():
            subprocess.run([sys.executable, HERE / "gen_contacts.py", str(m), small], check=True)
        results.append(("dlt postgres (mapped)", m, timed([sys.executable, HERE / "peer_dlt_postgres.py", small, url])))
    except ImportError:
        print("dlt[postgres] not installed: its row is skipped")
    psql(url, f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    print(f"\n{'route':<58} {'rows':>9} {'seconds':>8} {'rows/s':>10}")
    for route, rows, secs in results:
        print(f"{route:<58} {rows:>9} {secs:>8.2f} {rows / secs:>10.0f}")
    rate = {r: rows / s for r, rows, s in results}
    raw = rate["psql \\copy, raw file (10 columns)"]
    raw_text = rate["psql \\copy, raw file, all text, no key"]
    pre = rate["psql \\copy, already mapped (6 columns)"]
    ins = {t: rate[f"tidepool insert, threadCount {t}"] for t in (1, 2, 4)}
    ups = {t: rate[f"tidepool update/insert, half present, threadCount {t}"] for t in (1, 2, 4)}
    changed = {t: rate[f"tidepool update/insert, half present changed, threadCount {t}"] for t in (1, 2, 4)}
    best = max(ins.values())
    print(f"\ntidepool insert / psql \\copy raw (keyed, typed like the file): "
          + ", ".join(f"{t} thread(s) {ins[t] / raw:.2f}x" for t in ins) + " (target >= 1.0x)")
    print(f"tidepool insert / psql \\copy raw into an all-text table without a key: {best / raw_text:.2f}x (best)")
    print(f"tidepool insert / psql \\copy mapped: {best / pre:.2f}x (best)")
    print("upsert time / insert time: "
          + ", ".join(f"{t} thread(s) {ins[t] / ups[t]:.2f}" for t in ins) + " (target <= 2)")
    print("upsert time / insert time, present half changed (every match rewritten): "
          + ", ".join(f"{t} thread(s) {ins[t] / changed[t]:.2f}" for t in ins))
    if "dlt postgres (mapped)" in rate:
        print(f"tidepool insert / dlt:               {best / rate['dlt postgres (mapped)']:.1f}x (target >= 15x)")


if __name__ == "__main__":
    main()
