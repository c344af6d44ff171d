//! The PostgreSQL connector against the real local server, each test in its
//! own schema so tests run in parallel.

mod common;

use common::databases::{PgSchema as Schema, pg_url as url};
use common::sql_destination::{self as scenario, SqlDestination};
use common::{Fixture, request};
use tidepool::engine::{LogLevel, RunStatus};

fn project(s: &Schema) -> String {
    format!(
        "[connections.src]\nkind = \"csv\"\npath = \"in.csv\"\n[connections.pg]\nkind = \"postgres\"\nurl = \"{}\"\n[connections.out]\nkind = \"csv\"\npath = \"${{DATA_DIR}}/out.csv\"\n[variables]\nSchema = \"{}\"\n",
        url(),
        s.name
    )
}

/// A job from the CSV `src` into `people`, id matched.
fn people_job(s: &Schema, action: &str, extra: &str) -> String {
    scenario::people_job_into("pg", &s.table("people"), action, "", extra)
}

/// Table `people` with Ann, Bob and Cy.
fn people(s: &mut Schema) {
    scenario::people(s, "PRIMARY KEY");
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

// The stage-action table and the fault scenarios every SQL destination runs
// (tests/common/sql_destination.rs).

#[test]
fn every_stage_action_counts_exactly() {
    scenario::every_stage_action_counts_exactly(Schema::new);
}

#[test]
fn a_refused_connection_fails_the_job_clearly() {
    scenario::a_refused_connection_fails_the_job_clearly(&Schema::new());
}

#[test]
fn a_connection_killed_mid_run_is_retried_and_nothing_is_lost() {
    scenario::a_connection_killed_mid_run_is_retried_and_nothing_is_lost(&mut Schema::new());
}

#[test]
fn an_origin_cut_mid_stream_fails_the_job_and_counts_only_what_landed() {
    scenario::an_origin_cut_mid_stream_fails_the_job_and_counts_only_what_landed(&mut Schema::new());
}

#[test]
fn a_database_gone_for_good_fails_the_job_after_its_retries() {
    scenario::a_database_gone_for_good_fails_the_job_after_its_retries(&mut Schema::new());
}
