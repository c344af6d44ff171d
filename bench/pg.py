#!/usr/bin/env python3
"""CSV -> PostgreSQL, the reference workload, side by side with psql \\copy.

    python3 bench/pg.py [--rows 1000000] [--url postgres://postgres@127.0.0.1:5432/test]

Times, in one run: `psql \\copy` of the raw 10-column file into a table typed
like the file and keyed by id (the reference of bench.md, where it runs ~1.3x
slower than the mapped columns), the same into an all-text table without a key
(printed for comparison), and of the already mapped 6 columns (the bulk-loader
floor); dlt's postgres destination if installed; and tidepool with the
connector's default batch size (see common.py for its variants). Prints rows/s
and ratios.
"""
import argparse, subprocess, sys

from common import HERE, OUT, THREADS, Tidepool, build, contacts, mapped, report, timed, upsert_ratios

SCHEMA = "tidepool_bench"


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--url", default="postgres://postgres@127.0.0.1:5432/test")
    args = ap.parse_args()
    n, url = args.rows, args.url
    build()
    src = contacts(n)
    pre_mapped = mapped(src, OUT / f"contacts-{n}-mapped.csv", "")
    tp = Tidepool("pgbench", src, f'kind = "postgres"\nurl = "{url}"', f"{SCHEMA}.contacts")
    results = []
    reset(url)
    copy = lambda table, path, header: ["psql", url, "-q", "-c",
                                        f"\\copy {SCHEMA}.{table} FROM '{path}' CSV{' HEADER' if header else ''}"]
    results.append(("psql \\copy, raw file (10 columns)", n, timed(copy("raw", src, True))))
    results.append(("psql \\copy, raw file, all text, no key", n, timed(copy("raw_text", src, True))))
    results.append(("psql \\copy, already mapped (6 columns)", n, timed(copy("contacts", pre_mapped, False))))
    results += tp.variants(n, lambda: reset(url))
    try:
        import dlt  # noqa: F401
        import psycopg2  # noqa: F401
        m = min(n, 200_000)
        results.append(("dlt postgres (mapped)", m,
                        timed([sys.executable, HERE / "peer_dlt_postgres.py", contacts(m), url])))
    except ImportError:
        print("dlt[postgres] not installed: its row is skipped")
    psql(url, f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    rate = report(results)
    raw = rate["psql \\copy, raw file (10 columns)"]
    raw_text = rate["psql \\copy, raw file, all text, no key"]
    pre = rate["psql \\copy, already mapped (6 columns)"]
    ins = {t: rate[f"tidepool insert, threadCount {t}"] for t in THREADS}
    best = max(ins.values())
    print(f"\ntidepool insert / psql \\copy raw (keyed, typed like the file): "
          + ", ".join(f"{t} thread(s) {ins[t] / raw:.2f}x" for t in ins) + " (target >= 1.0x)")
    print(f"tidepool insert / psql \\copy raw into an all-text table without a key: {best / raw_text:.2f}x (best)")
    print(f"tidepool insert / psql \\copy mapped: {best / pre:.2f}x (best)")
    upsert_ratios(rate)
    if "dlt postgres (mapped)" in rate:
        print(f"tidepool insert / dlt:               {best / rate['dlt postgres (mapped)']:.1f}x (target >= 15x)")


if __name__ == "__main__":
    main()
