#!/usr/bin/env python3
"""CSV -> MariaDB/MySQL, the reference workload, side by side with LOAD DATA.

    python3 bench/mysql.py [--rows 1000000]

Times, in one run: `LOAD DATA LOCAL INFILE` of the raw 10-column file and of the
already mapped 6 columns (the bulk-loader floor), and tidepool: insert into an
empty table and update/insert with half the rows present, threadCount 1 and 4.
Needs the `mariadb` (or `mysql`) client and local_infile allowed by the server.
"""
import argparse, csv, shutil, subprocess, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
BIN = REPO / "target" / "release" / "tidepool"
DB = "tidepool_bench"

PROJECT = """id = "mybench"
[connections.src]
kind = "csv"
path = "{csv}"
[connections.my]
kind = "mariadb"
url = "mysql://root@127.0.0.1:3306/{db}"
"""
JOB = """[origin]
connection = "src"
[destination]
connection = "my"
[[stages]]
table = "contacts"
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


def client():
    return shutil.which("mariadb") or shutil.which("mysql")


def sql(text):
    subprocess.run([client(), "-h", "127.0.0.1", "-uroot", "--local-infile=1", "-e", text], check=True)


def reset():
    sql(f"DROP DATABASE IF EXISTS {DB}; CREATE DATABASE {DB}; USE {DB}; "
        "CREATE TABLE contacts(id integer PRIMARY KEY, full_name text, email text, company text, "
        "country text, amount decimal(12,2)); "
        "CREATE TABLE raw(id integer, first text, last text, email text, company text, phone text, "
        "city text, country text, created text, amount text)")


def timed(cmd):
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def load(table, path, header):
    ignore = "IGNORE 1 LINES" if header else ""
    return [client(), "-h", "127.0.0.1", "-uroot", "--local-infile=1", DB, "-e",
            f"LOAD DATA LOCAL INFILE '{path}' INTO TABLE {table} FIELDS TERMINATED BY ',' "
            f"OPTIONALLY ENCLOSED BY '\"' LINES TERMINATED BY '\\r\\n' {ignore}"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    n = ap.parse_args().rows
    if not client():
        sys.exit("no mariadb/mysql client installed")
    OUT.mkdir(exist_ok=True)
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=REPO, check=True)
    src = OUT / f"contacts-{n}.csv"
    if not src.exists():
        subprocess.run([sys.executable, HERE / "gen_contacts.py", str(n), src], check=True)
    mapped = OUT / f"contacts-{n}-mapped-crlf.csv"
    if not mapped.exists():
        with open(src, newline="") as f, open(mapped, "w", newline="") as g:
            w = csv.writer(g)
            for r in csv.DictReader(f):
                w.writerow([r["Id"], r["FirstName"] + " " + r["LastName"], r["Email"].lower(),
                            r["Company"] or "\\N", r["Country"], r["Amount"]])
    proj = OUT / "myprojects" / "mybench"
    shutil.rmtree(proj.parent, ignore_errors=True)
    (proj / "jobs").mkdir(parents=True)
    (proj / "project.toml").write_text(PROJECT.format(csv=src, db=DB))
    (proj / "jobs" / "insert.toml").write_text(JOB.format(action="insert"))
    (proj / "jobs" / "upsert.toml").write_text(JOB.format(action="update/insert"))
    tp = lambda job, *extra: [BIN, "run", "mybench", job, "--projects", proj.parent,
                              "--data-dir", OUT / "mydata", "--logging-level", "0", *extra]
    results = []
    reset()
    results.append(("LOAD DATA LOCAL INFILE, raw file (10 columns)", n, timed(load("raw", src, True))))
    results.append(("LOAD DATA LOCAL INFILE, already mapped (6 columns)", n, timed(load("contacts", mapped, False))))
    for threads in (1, 2, 4):
        reset()
        results.append((f"tidepool insert, threadCount {threads}", n, timed(tp("insert", "--threads", str(threads)))))
    for threads in (1, 2, 4):
        reset()
        subprocess.run(tp("insert", "--end-after-row", str(n // 2)), check=True, stdout=subprocess.DEVNULL)
        results.append((f"tidepool update/insert, half present, threadCount {threads}", n,
                        timed(tp("upsert", "--threads", str(threads)))))
    sql(f"DROP DATABASE IF EXISTS {DB}")
    print(f"\n{'route':<58} {'rows':>9} {'seconds':>8} {'rows/s':>10}")
    for route, rows, secs in results:
        print(f"{route:<58} {rows:>9} {secs:>8.2f} {rows / secs:>10.0f}")
    rate = {r: rows / s for r, rows, s in results}
    raw = rate["LOAD DATA LOCAL INFILE, raw file (10 columns)"]
    pre = rate["LOAD DATA LOCAL INFILE, already mapped (6 columns)"]
    ins = {t: rate[f"tidepool insert, threadCount {t}"] for t in (1, 2, 4)}
    ups = {t: rate[f"tidepool update/insert, half present, threadCount {t}"] for t in (1, 2, 4)}
    best = max(ins.values())
    print(f"\ntidepool insert / LOAD DATA raw:    "
          + ", ".join(f"{t} thread(s) {ins[t] / raw:.2f}x" for t in ins))
    print(f"tidepool insert / LOAD DATA mapped: {best / pre:.2f}x (best)")
    print("upsert time / insert time: "
          + ", ".join(f"{t} thread(s) {ins[t] / ups[t]:.2f}" for t in ins) + " (target <= 2)")


if __name__ == "__main__":
    main()
