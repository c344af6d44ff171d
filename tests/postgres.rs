//! The PostgreSQL connector against the real local server, each test in its
//! own schema so tests run in parallel.

mod common;

use common::{Fixture, request};
use tidepool::engine::{LogLevel, RunStatus};

fn url() -> String {
    std::env::var("TIDEPOOL_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A schema of its own, dropped at the end.
struct Schema {
    name: String,
    admin: postgres::Client,
}

impl Schema {
    fn new() -> Self {
        let mut admin = postgres::Client::connect(&url(), postgres::NoTls)
            .expect("PostgreSQL must be running on 127.0.0.1:5432 (see .ci/run)");
        let name = format!("tp_{}", uuid::Uuid::new_v4().simple());
        admin
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .unwrap();
        Schema { name, admin }
    }

    fn exec(&mut self, sql: &str) {
        let sql = sql.replace("S.", &format!("{}.", self.name));
        self.admin.batch_execute(&sql).unwrap();
    }

    fn rows(&mut self, sql: &str) -> Vec<String> {
        let sql = sql.replace("S.", &format!("{}.", self.name));
        self.admin
            .simple_query(&sql)
            .unwrap()
            .into_iter()
            .filter_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => Some(
                    (0..r.len())
                        .map(|i| r.get(i).unwrap_or("∅").to_owned())
                        .collect::<Vec<_>>()
                        .join("|"),
                ),
                _ => None,
            })
            .collect()
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let _ = self
            .admin
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name));
    }
}

fn project(s: &Schema) -> String {
    format!(
        "[connections.src]\nkind = \"csv\"\npath = \"in.csv\"\n[connections.pg]\nkind = \"postgres\"\nurl = \"{}\"\n[connections.out]\nkind = \"csv\"\npath = \"${{DATA_DIR}}/out.csv\"\n[variables]\nSchema = \"{}\"\n",
        url(),
        s.name
    )
}

fn people_job(s: &Schema, action: &str, extra: &str) -> String {
    format!(
        r#"
[origin]
connection = "src"
[destination]
connection = "pg"
[[stages]]
table = "{}.people"
action = "{action}"
{extra}
fields = [
  {{ column = "id", origin = "id", match = true }},
  {{ column = "name", origin = "name" }},
  {{ column = "city", origin = "city" }},
]
"#,
        s.name
    )
}

fn people(s: &mut Schema) {
    s.exec(
        "CREATE TABLE S.people(id integer PRIMARY KEY, name text, city text);
         INSERT INTO S.people VALUES (1,'Ann','Oslo'), (2,'Bob','Rome'), (3,'Cy','Lima');",
    );
}

#[test]
fn every_stage_action_counts_exactly() {
    let cases: [(&str, &str, [u64; 5], &[&str]); 5] = [
        (
            "update",
            "",
            [0, 2, 0, 0, 2],
            &["1|Ann|Oslo", "2|Bobby|Rome", "3|Cy|Lima"],
        ),
        ("delete", "", [0, 0, 2, 0, 2], &["1|Ann|Oslo"]),
        (
            "update/insert",
            "",
            [2, 2, 0, 0, 0],
            &[
                "1|Ann|Oslo",
                "2|Bobby|Rome",
                "3|Cy|Lima",
                "4|Dan|Kyiv",
                "5|Eve|Pisa",
            ],
        ),
        (
            "skip/insert",
            "",
            [2, 0, 0, 2, 0],
            &[
                "1|Ann|Oslo",
                "2|Bob|Rome",
                "3|Cy|Lima",
                "4|Dan|Kyiv",
                "5|Eve|Pisa",
            ],
        ),
        (
            "update/insert",
            "update_on_difference = true",
            [2, 1, 0, 1, 0],
            &[
                "1|Ann|Oslo",
                "2|Bobby|Rome",
                "3|Cy|Lima",
                "4|Dan|Kyiv",
                "5|Eve|Pisa",
            ],
        ),
    ];
    for (action, extra, expected, table) in cases {
        let mut s = Schema::new();
        people(&mut s);
        let f = Fixture::new();
        f.project("p", &project(&s), &[("j", &people_job(&s, action, extra))]);
        f.write(
            "projects/p/in.csv",
            "id,name,city\n2,Bobby,Rome\n3,Cy,Lima\n4,Dan,Kyiv\n5,Eve,Pisa\n",
        );
        let r = f.run(&request("p", "j"));
        assert_eq!(r.status, RunStatus::Complete, "{action}: {:?}", r.error);
        let c = r.counters;
        assert_eq!(
            [c.inserts, c.updates, c.deletes, c.skips, c.ignores],
            expected,
            "{action} {extra}"
        );
        assert_eq!((c.total_rows, c.errors), (4, 0));
        assert_eq!(
            s.rows("SELECT * FROM S.people ORDER BY id"),
            table,
            "{action} {extra}"
        );
    }
}

#[test]
fn inserts_go_through_copy_and_a_bad_value_costs_only_its_row() {
    let mut s = Schema::new();
    s.exec("CREATE TABLE S.m(id integer PRIMARY KEY, amount numeric(12,2), seen timestamptz, tag uuid, doc jsonb, ok boolean, day date)");
    let f = Fixture::new();
    let job = format!(
        r#"
[origin]
connection = "src"
[destination]
connection = "pg"
[[stages]]
table = "{0}.m"
action = "insert"
fields = [
  {{ column = "id", origin = "id" }},
  {{ column = "amount", origin = "amount" }},
  {{ column = "seen", origin = "seen" }},
  {{ column = "tag", origin = "tag" }},
  {{ column = "doc", origin = "doc" }},
  {{ column = "ok", origin = "ok" }},
  {{ column = "day", origin = "day" }},
]
"#,
        s.name
    );
    let back = format!(
        "[origin]\nconnection = \"pg\"\nquery = \"SELECT id, amount, seen, tag, doc, ok, day FROM {0}.m WHERE id >= @@VAR:JobArgument@@ ORDER BY id\"\n[destination]\nconnection = \"out\"\n[[stages]]\naction = \"insert\"\nfields = [{{ column = \"id\", origin = \"id\" }}, {{ column = \"amount\", origin = \"amount\" }}, {{ column = \"seen\", origin = \"seen\" }}, {{ column = \"tag\", origin = \"tag\" }}, {{ column = \"doc\", origin = \"doc\" }}, {{ column = \"ok\", origin = \"ok\" }}, {{ column = \"day\", origin = \"day\" }}]\n",
        s.name
    );
    f.project("p", &project(&s), &[("load", &job), ("back", &back)]);
    f.write(
        "projects/p/in.csv",
        "id,amount,seen,tag,doc,ok,day\n\
         1,12.50,2024-04-20T11:06:49.638407-05:00,0b5bd1c9-7c2e-4f2e-9a51-3c4f7d0e8a11,\"{\"\"a\"\": [1, 2]}\",true,2024-02-29\n\
         2,abc,2024-04-20T11:06:49Z,0b5bd1c9-7c2e-4f2e-9a51-3c4f7d0e8a12,{},false,2024-03-01\n\
         3,99999999.99,,,,,\n\
         4,0.10,2024-01-01 00:00:00+02,not-a-uuid,{},yes,2024-01-01\n",
    );
    let mut req = request("p", "load");
    req.logging_level = LogLevel::Low;
    let r = f.run(&req);
    let c = r.counters;
    assert_eq!(
        (c.total_rows, c.inserts, c.errors),
        (4, 2, 2),
        "{:?}",
        r.jobs[0].log
    );
    let errs = common::row_messages(&r);
    assert!(
        errs[0].contains("row 2") && errs[0].contains("numeric") && errs[0].contains("amount"),
        "{errs:?}"
    );
    assert!(
        errs[1].contains("row 4") && errs[1].contains("uuid"),
        "{errs:?}"
    );
    s.exec("SET TIME ZONE 'UTC'");
    assert_eq!(
        s.rows("SELECT id, amount, seen, tag, doc, ok, day FROM S.m ORDER BY id"),
        [
            "1|12.50|2024-04-20 16:06:49.638407+00|0b5bd1c9-7c2e-4f2e-9a51-3c4f7d0e8a11|{\"a\": [1, 2]}|t|2024-02-29",
            "3|99999999.99|∅|∅|∅|∅|∅",
        ]
    );
    // Back out through an origin query with a bound token: types read exactly.
    let mut req = request("p", "back");
    req.argument = "1".into();
    let r = f.run(&req);
    assert_eq!(r.counters.inserts, 2, "{:?}", r.error);
    let out = std::fs::read_to_string(f.data.join("out.csv")).unwrap();
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("id,amount,seen,tag,doc,ok,day"));
    let first = lines.next().unwrap();
    assert!(first.starts_with("1,12.50,2024-04-20 "), "{first}");
    assert!(
        first.contains(
            "0b5bd1c9-7c2e-4f2e-9a51-3c4f7d0e8a11,\"{\"\"a\"\": [1, 2]}\",true,2024-02-29"
        ),
        "{first}"
    );
    assert_eq!(lines.next(), Some("3,99999999.99,,,,,"));
}

#[test]
fn threads_give_the_same_table_and_counts() {
    let mut csv = String::from("id,name,city\n");
    for i in 1..=3000 {
        csv.push_str(&format!("{i},n{i},c{}\n", i % 7));
    }
    let mut outcomes = Vec::new();
    for threads in [1, 4] {
        let mut s = Schema::new();
        people(&mut s);
        let f = Fixture::new();
        let job =
            people_job(&s, "update/insert", "").replace("[origin]", "batch_size = 100\n[origin]");
        f.project("p", &project(&s), &[("j", &job)]);
        f.write("projects/p/in.csv", &csv);
        let mut req = request("p", "j");
        req.thread_count = threads;
        let r = f.run(&req);
        assert_eq!(r.status, RunStatus::Complete, "{:?}", r.error);
        outcomes.push((
            r.counters,
            s.rows("SELECT md5(string_agg(id || name || city, ',' ORDER BY id)) FROM S.people"),
        ));
    }
    assert_eq!((outcomes[0].0.inserts, outcomes[0].0.updates), (2997, 3));
    assert_eq!(outcomes[0], outcomes[1]);
}

#[test]
fn duplicate_keys_in_one_batch_are_replayed_in_order() {
    let mut s = Schema::new();
    people(&mut s);
    let f = Fixture::new();
    f.project(
        "p",
        &project(&s),
        &[("j", &people_job(&s, "update/insert", ""))],
    );
    f.write("projects/p/in.csv", "id,name,city\n9,first,x\n9,second,y\n");
    let r = f.run(&request("p", "j"));
    assert_eq!(
        (r.counters.inserts, r.counters.updates, r.counters.errors),
        (1, 1, 0)
    );
    assert_eq!(
        s.rows("SELECT * FROM S.people WHERE id = 9"),
        ["9|second|y"]
    );
}

#[test]
fn a_refused_connection_fails_the_job_clearly() {
    let s = Schema::new();
    let f = Fixture::new();
    let proj = project(&s).replace("127.0.0.1:5432", "127.0.0.1:1");
    f.project("p", &proj, &[("j", &people_job(&s, "insert", ""))]);
    f.write("projects/p/in.csv", "id,name,city\n1,a,b\n");
    let r = f.run(&request("p", "j"));
    assert_eq!(r.status, RunStatus::Failed);
    let e = r.error.unwrap();
    assert!(
        e.contains("cannot open postgres database postgres://postgres@127.0.0.1:1/test"),
        "{e}"
    );
}

#[test]
fn a_connection_killed_mid_run_is_retried_and_nothing_is_lost() {
    let mut s = Schema::new();
    people(&mut s);
    let f = Fixture::new();
    let job = people_job(&s, "update/insert", "").replace(
        "[origin]",
        "batch_size = 200\nretry_wait_ms = 100\n[origin]",
    );
    // Its own application_name, so only this test's connection is cut.
    let app = format!("tp_kill_{}", &s.name[3..15]);
    let proj = project(&s).replace("/test\"", &format!("/test?application_name={app}\""));
    f.project("p", &proj, &[("j", &job)]);
    let csv = common::people_csv(200_000);
    f.write("projects/p/in.csv", &csv);
    let schema = s.name.clone();
    // Once rows are landing, cut tidepool's connection.
    let killer = common::when_count_passes(
        || postgres::Client::connect(&url(), postgres::NoTls).unwrap(),
        move |c| {
            c.query_one(&format!("SELECT count(*) FROM {schema}.people"), &[])
                .unwrap()
                .get(0)
        },
        2000,
        move |c| {
            c.query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE application_name = $1 AND pid <> pg_backend_pid()",
                &[&app],
            )
            .unwrap()
            .get::<_, i64>(0)
        },
    );
    let mut req = request("p", "j");
    req.logging_level = LogLevel::Medium;
    let r = f.run(&req);
    let killed = killer.join().unwrap().unwrap_or(0);
    assert_eq!(r.status, RunStatus::Complete, "{:?}", r.error);
    let c = r.counters;
    assert_eq!(
        (c.total_rows, c.inserts + c.updates, c.errors),
        (200_000, 200_000, 0)
    );
    assert_eq!(s.rows("SELECT count(*) FROM S.people"), ["200000"]);
    assert!(killed > 0, "the test did not manage to cut the connection");
    let log: Vec<&str> = r.jobs[0].log.iter().map(|e| e.message.as_str()).collect();
    assert!(
        log.iter().any(|m| m.contains("connection was lost")),
        "{log:#?}"
    );
}

#[test]
fn upsert_without_a_unique_index_takes_the_general_path() {
    let mut s = Schema::new();
    s.exec(
        "CREATE TABLE S.people(id integer, name text, city text);
         INSERT INTO S.people VALUES (1,'Ann','Oslo'), (2,'Bob','Rome'), (3,'Cy','Lima');",
    );
    let f = Fixture::new();
    let job = people_job(&s, "update/insert", "update_on_difference = true");
    f.project("p", &project(&s), &[("j", &job)]);
    f.write(
        "projects/p/in.csv",
        "id,name,city\n2,Bobby,Rome\n3,Cy,Lima\n4,Dan,Kyiv\n",
    );
    let mut req = request("p", "j");
    req.logging_level = LogLevel::Low;
    let r = f.run(&req);
    let note = format!(
        "no index on {}.people starts with a match field (id)",
        s.name
    );
    assert!(
        r.jobs[0].log.iter().any(|e| e.message.contains(&note)),
        "{:?}",
        r.jobs[0].log
    );
    let c = r.counters;
    assert_eq!(
        (c.inserts, c.updates, c.skips, c.errors),
        (1, 1, 1, 0),
        "{:?}",
        r.error
    );
    assert_eq!(
        s.rows("SELECT * FROM S.people ORDER BY id"),
        ["1|Ann|Oslo", "2|Bobby|Rome", "3|Cy|Lima", "4|Dan|Kyiv"]
    );
}

#[test]
fn unchanged_rows_count_as_updates_and_are_rewritten_only_where_it_shows() {
    let mut s = Schema::new();
    s.exec(
        "CREATE TABLE S.plain(id integer PRIMARY KEY, name text, amount numeric, doc json);
         INSERT INTO S.plain VALUES (1,'Ann',1.0,'{\"a\":1}'), (2,'Bob',2.50,'{}'), (3,'Cy',3,'[]');
         CREATE TABLE S.watched (LIKE S.plain INCLUDING ALL);
         INSERT INTO S.watched SELECT * FROM S.plain;
         CREATE TABLE S.audit(id integer);
         CREATE FUNCTION S.note() RETURNS trigger LANGUAGE plpgsql
           AS $$BEGIN INSERT INTO S.audit VALUES (NEW.id); RETURN NEW; END$$;
         CREATE TRIGGER note AFTER UPDATE ON S.watched FOR EACH ROW EXECUTE FUNCTION S.note();",
    );
    let job = |table: &str, extra: &str| {
        format!(
            "[origin]\nconnection = \"src\"\n[destination]\nconnection = \"pg\"\n[[stages]]\ntable = \"{}.{table}\"\naction = \"update/insert\"\n{extra}\nfields = [{{ column = \"id\", origin = \"id\", match = true }}, {{ column = \"name\", origin = \"name\" }}, {{ column = \"amount\", origin = \"amount\" }}, {{ column = \"doc\", origin = \"doc\" }}]\n",
            s.name
        )
    };
    let f = Fixture::new();
    f.project(
        "p",
        &project(&s),
        &[
            ("plain", &job("plain", "")),
            ("watched", &job("watched", "")),
            ("diff", &job("plain", "update_on_difference = true")),
        ],
    );
    // Row 1 changes only the numeric's scale, row 3 only the json's text,
    // row 2 nothing at all; row 4 is new.
    f.write(
        "projects/p/in.csv",
        "id,name,amount,doc\n1,Ann,1.00,\"{\"\"a\"\":1}\"\n2,Bob,2.50,{}\n3,Cy,3,[ ]\n4,Dan,4,{}\n",
    );
    let before = s.rows("SELECT id, xmin FROM S.plain ORDER BY id");
    for j in ["plain", "watched"] {
        let r = f.run(&request("p", j));
        let c = r.counters;
        assert_eq!(
            (c.inserts, c.updates, c.skips, c.errors),
            (1, 3, 0, 0),
            "{j}: {:?}",
            r.error
        );
    }
    let after = s.rows("SELECT id, xmin FROM S.plain ORDER BY id");
    // Counted as an update, but the unchanged row was not rewritten...
    assert_eq!(after[1], before[1]);
    assert_ne!(after[0], before[0]);
    assert_ne!(after[2], before[2]);
    let want = [
        "1|Ann|1.00|{\"a\":1}",
        "2|Bob|2.50|{}",
        "3|Cy|3|[ ]",
        "4|Dan|4|{}",
    ];
    assert_eq!(s.rows("SELECT * FROM S.plain ORDER BY id"), want);
    assert_eq!(s.rows("SELECT * FROM S.watched ORDER BY id"), want);
    // ...except where a trigger would see the difference.
    assert_eq!(
        s.rows("SELECT string_agg(id::text, ',' ORDER BY id) FROM S.audit"),
        ["1,2,3"]
    );
    // update_on_difference compares json too: now nothing differs.
    let r = f.run(&request("p", "diff"));
    let c = r.counters;
    assert_eq!(
        (c.inserts, c.updates, c.skips, c.errors),
        (0, 0, 4, 0),
        "{:?}",
        r.error
    );
}

#[test]
fn upserts_switching_between_changed_and_unchanged_stretches_stay_exact() {
    // Changed rows make the writer stop comparing first; unchanged ones
    // (seen when it samples again) make it compare again.
    let mut s = Schema::new();
    s.exec(
        "CREATE TABLE S.people(id integer PRIMARY KEY, name text, city text);
         INSERT INTO S.people SELECT i, 'old' || i, 'c' FROM generate_series(1, 1000) i;
         INSERT INTO S.people SELECT i, 'n' || i, 'c' FROM generate_series(1001, 1500) i;",
    );
    let csv = common::people_csv(2000);
    let f = Fixture::new();
    let job = people_job(&s, "update/insert", "").replace("[origin]", "batch_size = 100\n[origin]");
    f.project("p", &project(&s), &[("j", &job)]);
    f.write("projects/p/in.csv", &csv);
    let r = f.run(&request("p", "j"));
    let c = r.counters;
    assert_eq!(
        (c.inserts, c.updates, c.skips, c.errors),
        (500, 1500, 0, 0),
        "{:?}",
        r.error
    );
    assert_eq!(
        s.rows("SELECT count(*) FROM S.people WHERE name = 'n' || id AND city = 'c'"),
        ["2000"]
    );
}

#[test]
fn new_rows_that_break_another_key_or_a_type_cost_only_their_row() {
    // New rows first go in as one COPY; one that breaks the email key or
    // does not fit a column sends the batch the long way, row by row.
    let mut s = Schema::new();
    s.exec(
        "CREATE TABLE S.people(id integer PRIMARY KEY, name text, email text UNIQUE, age integer);
         INSERT INTO S.people VALUES (1, 'Ann', 'ann@x', 30);",
    );
    let job = format!(
        "[origin]\nconnection = \"src\"\n[destination]\nconnection = \"pg\"\n[[stages]]\ntable = \"{}.people\"\naction = \"update/insert\"\nfields = [{{ column = \"id\", origin = \"id\", match = true }}, {{ column = \"name\", origin = \"name\" }}, {{ column = \"email\", origin = \"email\" }}, {{ column = \"age\", origin = \"age\" }}]\n",
        s.name
    );
    let f = Fixture::new();
    f.project("p", &project(&s), &[("j", &job)]);
    f.write(
        "projects/p/in.csv",
        "id,name,email,age\n2,Bob,bob@x,40\n3,Cy,ann@x,50\n4,Dan,dan@x,abc\n1,Ann2,ann@x,31\n",
    );
    let mut req = request("p", "j");
    req.logging_level = LogLevel::Low;
    let r = f.run(&req);
    let c = r.counters;
    assert_eq!(
        (c.inserts, c.updates, c.errors),
        (1, 1, 2),
        "{:?}",
        r.jobs[0].log
    );
    let errs = common::row_messages(&r);
    assert!(
        errs[0].contains("row 2") && errs[0].contains("people_email_key"),
        "{errs:?}"
    );
    assert!(
        errs[1].contains("row 3") && errs[1].contains("integer"),
        "{errs:?}"
    );
    assert_eq!(
        s.rows("SELECT * FROM S.people ORDER BY id"),
        ["1|Ann2|ann@x|31", "2|Bob|bob@x|40"]
    );
}

#[test]
fn a_deferred_unique_key_takes_the_full_path() {
    // A deferred key is checked only at commit: new-looking batches must
    // not be tried as plain COPY against it.
    let mut s = Schema::new();
    s.exec(
        "CREATE TABLE S.people(id integer, name text, city text,
           CONSTRAINT people_id UNIQUE (id) DEFERRABLE INITIALLY DEFERRED);
         INSERT INTO S.people VALUES (1, 'Ann', 'Oslo');",
    );
    let f = Fixture::new();
    let job = people_job(&s, "update/insert", "").replace("[origin]", "batch_size = 2\n[origin]");
    f.project("p", &project(&s), &[("j", &job)]);
    f.write(
        "projects/p/in.csv",
        "id,name,city\n10,a,x\n11,b,x\n1,Anna,Oslo\n12,c,x\n",
    );
    let r = f.run(&request("p", "j"));
    let c = r.counters;
    assert_eq!((c.inserts, c.updates, c.errors), (3, 1, 0), "{:?}", r.error);
    assert_eq!(
        s.rows("SELECT * FROM S.people ORDER BY id"),
        ["1|Anna|Oslo", "10|a|x", "11|b|x", "12|c|x"]
    );
}

#[test]
fn scripts_look_up_values_with_typed_criteria() {
    let mut s = Schema::new();
    people(&mut s);
    s.exec(
        "CREATE TABLE S.accounts(num integer, region text, tag uuid, balance numeric(12,2));
         INSERT INTO S.accounts VALUES (2, 'eu', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 10.50),
                                       (3, NULL, 'b0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 7.25);",
    );
    let f = Fixture::new();
    let job = format!(
        r#"
[origin]
connection = "src"
[destination]
connection = "pg"
[[stages]]
table = "{0}.people"
action = "update"
fields = [
  {{ column = "id", origin = "id", match = true }},
  {{ column = "name", script = "lookup('pg', '{0}.accounts', 'tag', {{num: row.id, region: row.city === 'Lima' ? null : 'eu'}})" }},
  {{ column = "city", script = "String(lookup('pg', '{0}.accounts', 'balance', {{num: Number(row.id)}}))" }},
]
"#,
        s.name
    );
    f.project("p", &project(&s), &[("j", &job)]);
    f.write(
        "projects/p/in.csv",
        "id,name,city\n2,x,Rome\n3,y,Lima\n1,z,Oslo\n",
    );
    let mut req = request("p", "j");
    req.logging_level = LogLevel::Medium;
    let r = f.run(&req);
    assert_eq!(r.status, RunStatus::Complete, "{:?}", r.error);
    assert_eq!(r.jobs[0].counters.updates, 3);
    assert_eq!(
        s.rows("SELECT id, name, city FROM S.people ORDER BY id"),
        [
            "1|∅|null",
            "2|a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11|10.50",
            "3|b0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11|7.25"
        ]
    );
}

#[test]
fn an_origin_cut_mid_stream_fails_the_job_and_counts_only_what_landed() {
    let s = Schema::new();
    let f = Fixture::new();
    let app = format!("tp_origin_{}", &s.name[3..15]);
    let proj = format!(
        "[connections.pg]\nkind = \"postgres\"\nurl = \"{}?application_name={app}\"\n[connections.db]\nkind = \"sqlite\"\npath = \"${{DATA_DIR}}/out.sqlite\"\n",
        url()
    );
    let job = "batch_size = 1000\n[origin]\nconnection = \"pg\"\nquery = \"SELECT i AS id, 'n' || i AS name FROM generate_series(1, 3000000) i\"\n[destination]\nconnection = \"db\"\n[[stages]]\ntable = \"people\"\naction = \"insert\"\nfields = [{ column = \"id\", origin = \"id\" }, { column = \"name\", origin = \"name\" }]\n";
    f.project("p", &proj, &[("j", job)]);
    let db = f.data.join("out.sqlite");
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("CREATE TABLE people(id integer PRIMARY KEY, name text)")
        .unwrap();
    // Once the first rows have landed (the origin is streaming and the
    // writer has committed), cut the origin's connection.
    let landed_db = db.clone();
    let killer = common::when_count_passes(
        move || {
            let c = rusqlite::Connection::open(&landed_db).unwrap();
            c.busy_timeout(std::time::Duration::from_millis(50))
                .unwrap();
            (
                c,
                postgres::Client::connect(&url(), postgres::NoTls).unwrap(),
            )
        },
        |(lite, _)| {
            // Busy while the writer commits: count as nothing yet.
            lite.query_row("SELECT count(*) FROM people", [], |r| r.get(0))
                .unwrap_or(0)
        },
        0,
        move |(_, pg)| {
            pg.query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
                &[&app],
            )
            .unwrap()
            .get::<_, i64>(0)
        },
    );
    let r = f.run(&request("p", "j"));
    assert_eq!(
        killer.join().unwrap(),
        Some(1),
        "the test did not cut the origin"
    );
    assert_eq!(r.status, RunStatus::Failed);
    let e = r.error.clone().unwrap_or_default();
    assert!(
        e.contains("origin \"pg\"") && e.contains("connection was lost"),
        "{e}"
    );
    let landed: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT count(*) FROM people", [], |r| r.get(0))
        .unwrap();
    let c = r.counters;
    assert!(landed > 0 && landed < 3_000_000, "{landed}");
    assert_eq!(c.inserts as i64, landed, "counted = landed");
    assert!(
        e.contains(&format!("the {landed} rows read before it were processed")),
        "{e}"
    );
    assert_eq!(c.errors, 1, "the job error");
}

#[test]
fn a_database_gone_for_good_fails_the_job_after_its_retries() {
    const BATCH: i64 = 500;
    let mut s = Schema::new();
    people(&mut s);
    let proxy = common::Proxy::start("127.0.0.1:5432");
    let f = Fixture::new();
    let job = people_job(&s, "update/insert", "").replace(
        "[origin]",
        &format!("batch_size = {BATCH}\nretry_attempts = 2\nretry_wait_ms = 50\n[origin]"),
    );
    let proj = project(&s).replace("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port));
    f.project("p", &proj, &[("j", &job)]);
    let csv = common::people_csv(200_000);
    f.write("projects/p/in.csv", &csv);
    let schema = s.name.clone();
    let down = common::when_count_passes(
        || postgres::Client::connect(&url(), postgres::NoTls).unwrap(),
        move |c| {
            c.query_one(&format!("SELECT count(*) FROM {schema}.people"), &[])
                .unwrap()
                .get(0)
        },
        5000,
        move |_| proxy.take_down(),
    );
    let mut req = request("p", "j");
    req.logging_level = LogLevel::Medium;
    let r = f.run(&req);
    assert!(
        down.join().unwrap().is_some(),
        "the test did not take the database down"
    );
    assert_eq!(
        r.status,
        RunStatus::Failed,
        "{:?} {:?}",
        r.counters,
        r.error
    );
    let e = r.error.clone().unwrap_or_default();
    assert!(
        e.contains("connection was lost") || e.contains("cannot open"),
        "{e}"
    );
    let landed: i64 = s.rows("SELECT count(*) FROM S.people")[0].parse().unwrap();
    let c = r.counters;
    // A batch whose COMMIT was on its way when the link went down may have
    // landed without the answer reaching us: at most that one batch.
    let uncounted = landed - (c.inserts + c.updates) as i64;
    assert!(
        uncounted == 0 || uncounted == BATCH,
        "{landed} landed, {c:?}"
    );
    assert!(
        c.total_rows < 200_000 && c.errors == 1,
        "{c:?} {:?}",
        r.jobs[0].log
    );
    assert!(e.contains("gave up after 2 retries"), "{e}");
}
