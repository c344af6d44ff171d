#!/usr/bin/env python3
"""Holds the server to its OpenAPI document: schemathesis, all phases
(examples, coverage, fuzzing, stateful) and all checks, against the real
binary on a free loopback port, authenticated with an API key of a real user.

    python3 tests/schemathesis.py [--bin target/debug/tidepool] [--max-examples 10] [--max-time 40]

Exits 0 when schemathesis finds nothing, 1 when it finds failures, 2 when it
cannot run (schemathesis missing, the server does not start). tests/openapi_conformance.rs
runs it with a small budget; bench/schemathesis.sh with a large one.

Nothing leaves loopback: the server's HTTP(S)_PROXY points at a closed
loopback port, so the completion webhooks of the runs the fuzzer starts (to
whatever URL it made up) are never sent anywhere, not even to DNS.

Loaded by schemathesis as its hooks file (SCHEMATHESIS_HOOKS), this file
teaches it the one rule a JSON schema cannot state (see `map_body`).
"""

import os
import sys

# Run as a script, this file's folder comes first on sys.path, and this file
# is named like the package it drives: look for that package elsewhere.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

import argparse
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

VERSION = "4.32.5"  # the version CI installs (.ci/run)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "schemathesis.toml")


# Loopback is reached directly, whatever proxy the environment names.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tidepool(binary, data, *args, password=None):
    env = dict(os.environ, TIDEPOOL_PASSWORD=password or "")
    out = subprocess.run(
        [binary, *args, "--data-dir", data], env=env, capture_output=True, text=True, timeout=60
    )
    if out.returncode != 0:
        sys.exit(f"schemathesis.py: tidepool {' '.join(args)} failed: {out.stderr}")
    return out.stdout


def api_key(binary, data):
    """A user who owns the demo's instance, and an API key for it."""
    tidepool(binary, data, "user", "add", "fuzzer", "--instance", "default:Owner", password="fuzz-pass")
    out = tidepool(binary, data, "key", "create", "fuzzer", "--label", "schemathesis")
    keys = [w for w in out.split() if w.startswith("tpk_")]
    if not keys:
        sys.exit(f"schemathesis.py: no API key in {out!r}")
    return keys[0]


def start_server(binary, data, log):
    """Starts `tidepool serve` on a free port; (process, base URL)."""
    env = dict(os.environ)
    closed = f"http://127.0.0.1:{free_port()}"
    for name in PROXY_VARS:
        env[name] = closed
    env["NO_PROXY"] = env["no_proxy"] = ""
    for _ in range(3):  # another process may take the port between the pick and the bind
        port = free_port()
        proc = subprocess.Popen(
            [binary, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data,
             "--projects", os.path.join(ROOT, "projects"), "--execute-job-wait-secs", "2"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with DIRECT.open(base + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return proc, base
            except OSError:
                time.sleep(0.1)
        stop(proc)
    sys.exit(f"schemathesis.py: the server did not start; its log is {log.name}")


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "debug", "tidepool"))
    ap.add_argument("--max-examples", type=int, default=10)
    ap.add_argument("--max-time", type=int, default=40, help="seconds for the whole schemathesis run")
    ap.add_argument("--seed", default="20261201", help="'random' for a new one each run")
    ap.add_argument("--workers", default="2")
    ap.add_argument("--report", help="a directory for the JUnit and NDJSON reports")
    ap.add_argument("--phases", default="examples,coverage,fuzzing,stateful")
    args = ap.parse_args()

    try:
        import schemathesis  # noqa: F401 (only whether it is there)
    except ImportError:
        print(
            "schemathesis is not installed: pip install schemathesis=="
            + VERSION
            + " (this test runs it as python3 -m schemathesis.cli)",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="tidepool-st-") as tmp:
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        key = api_key(args.bin, data)
        with open(os.path.join(tmp, "server.log"), "w") as log:
            proc, base = start_server(args.bin, data, log)
            try:
                cmd = [
                    sys.executable, "-m", "schemathesis.cli",
                    "--config-file", CONFIG, "run", base + "/openapi.json",
                    "--phases", args.phases,
                    "--checks", "all",
                    "--max-examples", str(args.max_examples),
                    "--max-time", str(args.max_time),
                    "--workers", args.workers,
                    "--request-timeout", "10",
                    "--no-color",
                ]
                if args.seed != "random":
                    cmd += ["--seed", args.seed]
                if args.report:
                    cmd += ["--report", "junit,ndjson,har", "--report-dir", args.report]
                env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
                env.update(TIDEPOOL_ST_KEY=key, SCHEMATHESIS_HOOKS=os.path.abspath(__file__))
                t0 = time.monotonic()
                code = subprocess.run(cmd, env=env, cwd=tmp).returncode
                print(f"schemathesis.py: st exited {code} after {time.monotonic() - t0:.1f} s")
            finally:
                stop(proc)
            if code != 0:
                log.flush()
                with open(log.name) as f:
                    tail = f.readlines()[-20:]
                print("schemathesis.py: the server's last log lines:\n" + "".join(tail), file=sys.stderr)
    return 1 if code else 0


if __name__ == "__main__":
    sys.exit(main())
else:
    import schemathesis

    def _row(v):
        """A row number as the server reads it, or None if it is blank or not one."""
        if isinstance(v, bool):
            return None
        if isinstance(v, int):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, str) and v.isascii() and v.isdigit():
            return int(v)
        return None

    @schemathesis.hook
    def map_body(context, body):
        """endAfterRow must not be less than beginAtRow: a rule between two
        fields, which the document states in words and a JSON schema cannot.
        A generated pair that breaks it is swapped, so a valid request stays valid."""
        if isinstance(body, dict):
            begin, end = _row(body.get("beginAtRow")), _row(body.get("endAfterRow"))
            if begin is not None and end is not None and end < begin:
                body["beginAtRow"], body["endAfterRow"] = body["endAfterRow"], body["beginAtRow"]
        return body

    import base64
    import re

    _CURSOR = re.compile(r"^[A-Za-z0-9_-]*$")

    @schemathesis.hook
    def map_query(context, query):
        """GET /v1/Runs's `cursor` is a nextCursor as the server gave it:
        base64url of what the server wrote, which a JSON schema can only state
        as its alphabet. A generated cursor of that alphabet is encoded into
        one the server could have given (so a valid request stays valid); one
        outside it is left as it is (an invalid request stays invalid)."""
        if (
            isinstance(query, dict)
            and context.operation.path == "/v1/Runs"
            and isinstance(query.get("cursor"), str)
            and query["cursor"].strip()
            and _CURSOR.match(query["cursor"])
        ):
            raw = f"{len(query['cursor'])}|{query['cursor']}|default".encode()
            query["cursor"] = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        return query

    # The DataContract XML answers, read back into the JSON shape the
    # document's schemas describe, so they are checked (and their runIDs
    # followed) like the JSON ones. Element types come from the wire types.
    import xml.etree.ElementTree as ET

    _NIL = "{http://www.w3.org/2001/XMLSchema-instance}nil"
    _INTEGERS = {"totalRows", "inserts", "updates", "deletes", "errors", "skips", "ignores",
                 "row", "attempt", "statusCode"}
    _BOOLEANS = {"started": {"true": True, "false": False}}
    _LISTS = {"results", "log", "webhookAttempts"}

    def _local(el):
        return el.tag.rsplit("}", 1)[-1]

    def _value(el):
        name = _local(el)
        if el.get(_NIL) == "true":
            return None
        if name in _LISTS:
            return [_object(c) for c in el]
        text = el.text or ""
        if name in _INTEGERS:
            return int(text)
        if name in _BOOLEANS:
            return _BOOLEANS[name][text]
        return text

    def _object(el):
        return {_local(c): _value(c) for c in el}

    @schemathesis.deserializer("application/xml")
    def xml_answer(ctx, response):
        root = ET.fromstring(response.content)
        if _local(root).startswith("ArrayOf"):
            return [_object(c) for c in root]
        return _object(root)
