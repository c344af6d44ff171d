#!/usr/bin/env python3
"""Writes fuzz/seeds/<target>/ from the repository's tests and sample files.

Run from the repository root; the seeds are committed, so this only needs
running again when the tests grow new shapes worth seeding.
"""
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = os.path.join(ROOT, "fuzz", "seeds")
GUID = "5b6a3c1e-8f2d-4c7a-9e1b-0d2f4a6c8e10"


def read(path):
    with open(os.path.join(ROOT, path), "rb") as f:
        return f.read()


def write(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def raw_strings(path):
    """The r#"…"# literals of a Rust test file."""
    return re.findall(r'r#"(.*?)"#', read(path).decode(), re.S)


def requests():
    full = {"runID": GUID, "projectID": "demo", "jobID": "contacts", "chainJobs": True,
            "loggingLevel": "2", "argument": "x", "beginAtRow": "1", "endAfterRow": "10",
            "threadCount": "4", "webHookURL": "http://127.0.0.1:9/hook", "instance": "default"}
    jsons = [
        {"runID": GUID, "projectID": "demo", "jobID": "contacts"},
        full,
        {"RUNID": GUID, "projectid": "demo", "JobId": "contacts", "beginAtRow": 5, "endAfterRow": 4},
        {"runID": "123", "projectID": "demo", "jobID": "contacts", "loggingLevel": -1},
        {"runID": GUID, "projectID": "demo", "jobID": "contacts", "webHookURL": "not a url",
         "chainJobs": "TRUE", "threadCount": 1e3, "argument": None},
    ]
    for i, body in enumerate(jsons):
        write("request_json", f"body{i}.json", json.dumps(body))
    write("request_json", "truncated.json", '{"runID": ')
    write("request_json", "nested.json", "[" * 200 + "]" * 200)
    write("request_json", "bad_utf8.json", b'{\xff\xfe}')

    xml = [s for s in raw_strings("tests/api.rs") if s.lstrip().startswith("<")]
    xml.append(
        f'<?xml version="1.0" encoding="utf-8"?><a:execJobRequest xmlns:a="urn:x" '
        f'xmlns:i="http://www.w3.org/2001/XMLSchema-instance"><a:runID>{GUID}</a:runID>'
        '<a:projectID>demo</a:projectID><a:jobID>con&#116;acts</a:jobID><!-- c -->'
        '<a:argument><![CDATA[<x>&amp;]]> &lt;&#x41;&gt;</a:argument>'
        '<a:instance i:nil="true"/><a:beginAtRow/></a:execJobRequest>')
    xml.append("<x><runID>1</x>")
    for i, body in enumerate(xml):
        write("request_xml", f"body{i}.xml", body.replace("{id}", GUID))
    write("request_xml", "bad_utf8.xml", b"<\xff>")

    forms = [
        f"runID={GUID}&projectID=demo&jobID=contacts",
        f"RUNID={GUID}&projectid=demo&jobid=contacts&chainJobs=true&loggingLevel=3"
        "&argument=a%20b%2Bc&beginAtRow=2&endAfterRow=9&threadCount=2"
        "&webHookURL=http%3A%2F%2F127.0.0.1%3A9%2F&instance=blue",
        "runID=x&runID=y&projectID=&jobID=%ZZ",
    ]
    for i, body in enumerate(forms):
        write("request_form", f"body{i}.txt", body)
    write("request_form", "bad_utf8.txt", b"runID=%ff&projectID=\xfe")

    hooks = [
        'projectid=demo&JOBID=contacts\n{"event":"x"}',
        "projectid=demo\nx",
        "ProjectId=demo&jobid=contacts&instance=blue\nline one\nline two",
        "projectid=&jobid=%41\n",
    ]
    for i, body in enumerate(hooks):
        write("webhook_body", f"hook{i}.txt", body)


def projects():
    demo = read("projects/demo/project.toml")
    jobs = [read("projects/demo/jobs/contacts.toml"), read("projects/demo/jobs/countries.toml")]
    write("project_load", "demo.toml", b"\0".join([demo] + jobs))
    n = 0
    for test in ("tests/validate.rs", "tests/scripts.rs", "tests/engine.rs", "tests/cli.rs"):
        if not os.path.exists(os.path.join(ROOT, test)):
            continue
        strings = raw_strings(test)
        project_texts = [s for s in strings if "[connections" in s]
        job_texts = [s for s in strings if "[origin]" in s or "[[stages]]" in s]
        for p in project_texts[:2]:
            for j in job_texts[:8]:
                write("project_load", f"test{n}.toml", f"{p}\0{j}")
                n += 1
    # Every token, template and script field kind in one job.
    write("project_load", "kinds.toml", (
        '[connections.src]\nkind = "csv"\npath = "in.csv"\n'
        '[connections.db]\nkind = "sqlite"\npath = "${DATA_DIR}/t.sqlite"\n'
        '\0'
        'next = "countries"\nbatch_size = 10\nscript_time_limit_ms = 5\n'
        '[origin]\nconnection = "db"\nquery = "SELECT * FROM t WHERE a = \'@@VAR:JobArgument@@\'"\n'
        '[destination]\nconnection = "db"\n'
        '[[stages]]\ntable = "t"\naction = "update/insert"\nfields = [\n'
        '  { column = "id", origin = "id", match = true, type = "integer" },\n'
        '  { column = "a", template = "@@ORG:a@@ @@VAR:RunID@@" },\n'
        '  { column = "b", value = 3 },\n'
        '  { column = "c", function = "now" },\n'
        '  { column = "d", script = "row.a + @@ORG:b@@" },\n]\n'
        '[[operations]]\nwhen = "before_stage"\nstage = 1\nscript = "log(1)"\n'
        '\0'
        '[origin]\nconnection = "src"\n[destination]\nconnection = "db"\n'
        '[[stages]]\ntable = "t"\naction = "insert"\nfields = [{ column = "x", origin = "x" }]\n'))


    # When jobs run: schedules, a retry, an incremental mark, a file drop and
    # a graph (next as a list, needs).
    write("project_load", "when.toml", (
        'max_parallel_jobs = 2\n[connections.src]\nkind = "csv"\npath = "inbox/*.csv"\n'
        '[connections.db]\nkind = "sqlite"\npath = "${DATA_DIR}/t.sqlite"\n'
        '\0'
        'next = ["countries", "j"]\n'
        'retry = { attempts = 3, wait_secs = 30, backoff = 2.0 }\n'
        '[[schedules]]\nname = "weeknights"\ncron = "30 2 * * MON-FRI"\n'
        'timezone = "Europe/Berlin"\ncatch_up = "last"\noverlap = "queue"\nargument = "x"\n'
        '[[schedules]]\ncron = "*/2 * * * * *"\n'
        '[origin]\nconnection = "src"\nafter = { move_to = "done/" }\nsettle_secs = 1\nmax_files = 10\n'
        'incremental = { field = "modified_at" }\n'
        '[destination]\nconnection = "db"\n'
        '[[stages]]\ntable = "t"\naction = "update/insert"\n'
        'fields = [{ column = "id", origin = "id", match = true }]\n'
        '\0'
        '[origin]\nconnection = "db"\nquery = "SELECT * FROM t WHERE m > @@VAR:HighWater@@ ORDER BY id"\n'
        'incremental = { field = "m" }\n'
        '[destination]\nconnection = "db"\n'
        '[[stages]]\ntable = "u"\naction = "insert"\nfields = [{ column = "x", origin = "x" }]\n'
        '\0'
        'next = "k"\n'
        '[origin]\nconnection = "src"\n[destination]\nconnection = "db"\n'
        '[[stages]]\ntable = "v"\naction = "insert"\nfields = [{ column = "x", origin = "x" }]\n'
        '\0'
        'needs = ["countries", "j"]\n'
        '[origin]\nconnection = "src"\n[destination]\nconnection = "db"\n'
        '[[stages]]\ntable = "w"\naction = "delete"\nfields = [{ column = "x", origin = "x", match = true }]\n'))


def origins():
    contacts = read("projects/demo/data/contacts.csv").split(b"\n")
    sample = b"\n".join(contacts[:6]) + b"\n"
    write("csv_origin", "contacts.csv", b"\x00" + sample)
    write("csv_origin", "semicolon_noheader.csv", b"\x09" + sample.replace(b",", b";"))
    write("csv_origin", "quoted.csv", b"\x00" + b'id,name\n1,"a ""b"",\nc"\n2,x,extra\n3\n')
    write("csv_origin", "bom.csv", b"\x00\xef\xbb\xbfid,name\r\n1,\xc3\xa9\r\n2,\xff\r\n")
    write("csv_origin", "cp1252.csv", b"\x10id,name\n1,caf\xe9\n")
    write("csv_origin", "utf16.csv", b"\x20" + "id,name\n1,é\n".encode("utf-16le"))
    rows = [{"id": 1, "name": "Ann", "city": "Oslo", "amount": 2.5},
            {"ID": "2", "Name": None, "tags": [1, {"a": True}]}, 3, "x"]
    write("json_origin", "array.json", b"\x00" + json.dumps(rows).encode())
    write("json_origin", "lines.jsonl",
          b"\x01" + b"\n".join(json.dumps(r).encode() for r in rows) + b"\n\n{bad\n")
    write("json_origin", "array_forced.json", b"\x02[{\"id\": 1e400}, {}]")
    write("json_origin", "lines_forced.json", b"\x03{\"id\": \"\\ud800\"}\r\n[]")


def templates_and_scripts():
    templates = [
        "Dear @@ORG:FirstName@@ @@ORG:LastName@@",
        "Hi @@ORG:First Name@@, arg=@@var:JobArgument@@!",
        "@@STG:2,#Action@@",
        "SELECT * FROM t WHERE a = '@@VAR:JobArgument@@' AND b = @@VAR:jobargument@@ AND c = 'lit'",
        "x = @@VAR:Nope@@ @@ORG:a@@",
        "@@ORG:x", "@@FOO:x@@", "@@STG:0,#Action@@", "@@ORG@@",
    ]
    for i, t in enumerate(templates):
        write("template", f"t{i}.txt", t)
    scripts = [s for s in re.findall(r'script = "((?:[^"\\]|\\.)*)"', read("tests/scripts.rs").decode())]
    scripts += [
        "row.FirstName + ' ' + @@ORG:LastName@@",
        "'Dear @@ORG:Name@@' + `x ${@@VAR:Arg@@ + `@@STG:1,#Action@@`} y` // @@ORG:c@@\n/* @@VAR:d@@ */ return 1",
        "if (@@STG:1,#Action@@ === 'Insert') { return \"@@VAR:RunID@@\" } return null",
        "/re'@@ORG:x@@/.test(row.a)",
    ]
    for i, s in enumerate(dict.fromkeys(scripts)):
        write("script_rewrite", f"s{i}.js", s.encode().decode("unicode_escape").encode())


if __name__ == "__main__":
    requests()
    projects()
    origins()
    templates_and_scripts()
