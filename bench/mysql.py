#!/usr/bin/env python3
"""CSV -> MariaDB/MySQL, the reference workload, side by side with LOAD DATA.

    python3 bench/mysql.py [--rows 1000000]

Times, in one run: `LOAD DATA LOCAL INFILE` of the raw 10-column file and of the
already mapped 6 columns (the bulk-loader floor), and tidepool with the
connector's default batch size (see common.py for its variants).
Needs the `mariadb` (or `mysql`) client and local_infile allowed by the server.
"""
import argparse, shutil, subprocess, sys

from common import OUT, THREADS, Tidepool, build, contacts, mapped, report, timed, upsert_ratios

DB = "tidepool_bench"


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
    build()
    src = contacts(n)
    pre_mapped = mapped(src, OUT / f"contacts-{n}-mapped-crlf.csv", "\\N")
    tp = Tidepool("mybench", src, f'kind = "mariadb"\nurl = "mysql://root@127.0.0.1:3306/{DB}"', "contacts")
    results = []
    reset()
    results.append(("LOAD DATA LOCAL INFILE, raw file (10 columns)", n, timed(load("raw", src, True))))
    results.append(("LOAD DATA LOCAL INFILE, already mapped (6 columns)", n, timed(load("contacts", pre_mapped, False))))
    results += tp.variants(n, reset)
    sql(f"DROP DATABASE IF EXISTS {DB}")
    rate = report(results)
    raw = rate["LOAD DATA LOCAL INFILE, raw file (10 columns)"]
    pre = rate["LOAD DATA LOCAL INFILE, already mapped (6 columns)"]
    ins = {t: rate[f"tidepool insert, threadCount {t}"] for t in THREADS}
    print(f"\ntidepool insert / LOAD DATA raw:    "
          + ", ".join(f"{t} thread(s) {ins[t] / raw:.2f}x" for t in ins))
    print(f"tidepool insert / LOAD DATA mapped: {max(ins.values()) / pre:.2f}x (best)")
    upsert_ratios(rate)


if __name__ == "__main__":
    main()
