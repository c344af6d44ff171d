"""What bench/pg.py and bench/mysql.py share: the reference job, the data
files, the tidepool runs of every variant and the results table."""
import csv, shutil, subprocess, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
BIN = REPO / "target" / "release" / "tidepool"
THREADS = (1, 2, 4)

JOB = """[origin]
connection = "src"
[destination]
connection = "db"
[[stages]]
table = "{table}"
action = "{action}"
fields = [
  {{ column = "id", origin = "Id", match = true }},
  {{ column = "full_name", template = "{full_name}" }},
  {{ column = "email", origin = "Email", transform = "lower" }},
  {{ column = "company", origin = "Company", transform = "null_if_blank" }},
  {{ column = "country", origin = "Country" }},
  {{ column = "amount", origin = "Amount" }},
]
"""


def timed(cmd):
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def build():
    OUT.mkdir(exist_ok=True)
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=REPO, check=True)


def contacts(n):
    """The reference file of `n` rows (generated once)."""
    src = OUT / f"contacts-{n}.csv"
    if not src.exists():
        subprocess.run([sys.executable, HERE / "gen_contacts.py", str(n), src], check=True)
    return src


def mapped(src, out, blank_company):
    """The reference file already mapped to the six columns (written once)."""
    if not out.exists():
        with open(src, newline="") as f, open(out, "w", newline="") as g:
            w = csv.writer(g)
            for r in csv.DictReader(f):
                w.writerow([r["Id"], r["FirstName"] + " " + r["LastName"], r["Email"].lower(),
                            r["Company"] or blank_company, r["Country"], r["Amount"]])
    return out


class Tidepool:
    """A project whose `db` connection is the destination, with the jobs
    `insert`, `upsert` and `older` (insert with other full names)."""

    def __init__(self, name, src, db_connection, table):
        self.name = name
        self.proj = OUT / f"{name}-projects" / name
        shutil.rmtree(self.proj.parent, ignore_errors=True)
        (self.proj / "jobs").mkdir(parents=True)
        (self.proj / "project.toml").write_text(
            f'id = "{name}"\n[connections.src]\nkind = "csv"\npath = "{src}"\n[connections.db]\n{db_connection}\n')
        template = "@@ORG:FirstName@@ @@ORG:LastName@@"
        for job, action, full_name in (("insert", "insert", template),
                                       ("upsert", "update/insert", template),
                                       ("older", "insert", "@@ORG:LastName@@, @@ORG:FirstName@@")):
            (self.proj / "jobs" / f"{job}.toml").write_text(
                JOB.format(table=table, action=action, full_name=full_name))

    def cmd(self, job, *extra):
        return [BIN, "run", self.name, job, "--projects", self.proj.parent,
                "--data-dir", OUT / f"{self.name}-data", "--logging-level", "0", *map(str, extra)]

    def variants(self, n, reset):
        """Times insert into an empty table, update/insert with half the rows
        present holding the same values (bench.md's workload: a re-sync) and
        with other values (every match a real write), each at every
        threadCount in THREADS."""
        results = []
        for t in THREADS:
            reset()
            results.append((f"tidepool insert, threadCount {t}", n, timed(self.cmd("insert", "--threads", t))))
        for label, preload in (("half present", "insert"), ("half present changed", "older")):
            for t in THREADS:
                reset()
                subprocess.run(self.cmd(preload, "--end-after-row", n // 2), check=True, stdout=subprocess.DEVNULL)
                results.append((f"tidepool update/insert, {label}, threadCount {t}", n,
                                timed(self.cmd("upsert", "--threads", t))))
        return results


def report(results):
    """Prints the table and returns rows/s by route."""
    print(f"\n{'route':<62} {'rows':>9} {'seconds':>8} {'rows/s':>10}")
    for route, rows, secs in results:
        print(f"{route:<62} {rows:>9} {secs:>8.2f} {rows / secs:>10.0f}")
    return {r: rows / s for r, rows, s in results}


def upsert_ratios(rate):
    """Prints upsert time / insert time for both upsert variants."""
    ins = {t: rate[f"tidepool insert, threadCount {t}"] for t in THREADS}
    for label, note in (("half present", " (target <= 2)"),
                        ("half present changed", " (present half changed: every match rewritten)")):
        ups = {t: rate[f"tidepool update/insert, {label}, threadCount {t}"] for t in THREADS}
        print(f"upsert time / insert time, {label}: "
              + ", ".join(f"{t} thread(s) {ins[t] / ups[t]:.2f}" for t in THREADS) + note)
    return ins
