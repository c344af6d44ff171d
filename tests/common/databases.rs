//! The SQL databases tests write to, each in a place of its own (a SQLite
//! file, a PostgreSQL schema, a MariaDB database) dropped at the end, so
//! tests run in parallel.

use mysql::prelude::Queryable;

use super::sql_destination::{ServerDestination, SqlDestination, Watcher};

/// The local PostgreSQL (`TIDEPOOL_TEST_PG_URL` to change it).
pub fn pg_url() -> String {
    std::env::var("TIDEPOOL_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The local MariaDB server, without a database (`TIDEPOOL_TEST_MYSQL_URL`).
pub fn mysql_base_url() -> String {
    std::env::var("TIDEPOOL_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

/// A new connection to the MariaDB server.
pub fn mysql_admin() -> mysql::Conn {
    mysql::Conn::new(mysql::Opts::from_url(&mysql_base_url()).unwrap())
        .expect("MariaDB must be running on 127.0.0.1:3306 (see .ci/run)")
}

fn pg_connect() -> postgres::Client {
    postgres::Client::connect(&pg_url(), postgres::NoTls)
        .expect("PostgreSQL must be running on 127.0.0.1:5432 (see .ci/run)")
}

/// A PostgreSQL schema of its own, dropped at the end. SQL given to
/// [`PgSchema::exec`] and [`PgSchema::rows`] may name it `S.`; unqualified
/// names find it too (it is first on the search path).
pub struct PgSchema {
    /// The schema's name.
    pub name: String,
    /// The test's own connection.
    pub admin: postgres::Client,
}

impl PgSchema {
    /// Creates the schema.
    pub fn new() -> Self {
        let mut admin = pg_connect();
        let name = format!("tp_{}", uuid::Uuid::new_v4().simple());
        admin
            .batch_execute(&format!("CREATE SCHEMA {name}; SET search_path TO {name}"))
            .unwrap();
        PgSchema { name, admin }
    }

    /// The application name of the sessions of [`ServerDestination::killable_connection`].
    fn app(&self) -> String {
        format!("tp_kill_{}", &self.name[3..15])
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let _ = self
            .admin
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name));
    }
}

impl SqlDestination for PgSchema {
    fn label(&self) -> &'static str {
        "PostgreSQL"
    }
    fn connection(&self) -> String {
        format!("kind = \"postgres\"\nurl = \"{}\"", pg_url())
    }
    fn table(&self, name: &str) -> String {
        format!("{}.{name}", self.name)
    }
    fn exec(&mut self, sql: &str) {
        let sql = sql.replace("S.", &format!("{}.", self.name));
        self.admin.batch_execute(&sql).unwrap();
    }
    fn rows(&mut self, sql: &str) -> Vec<String> {
        let sql = sql.replace("S.", &format!("{}.", self.name));
        let answer = self.admin.simple_query(&sql).unwrap();
        answer
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

impl ServerDestination for PgSchema {
    fn upstream(&self) -> &'static str {
        "127.0.0.1:5432"
    }
    fn refused_message(&self) -> &'static str {
        "cannot open postgres database postgres://postgres@127.0.0.1:1/test"
    }
    fn killable_connection(&self) -> String {
        // Its own application_name, so only this test's sessions are cut.
        let url = pg_url();
        let sep = if url.contains('?') { '&' } else { '?' };
        format!(
            "kind = \"postgres\"\nurl = \"{url}{sep}application_name={}\"",
            self.app()
        )
    }
    fn watcher(&self) -> Box<dyn Watcher> {
        Box::new(PgWatcher {
            client: pg_connect(),
            schema: self.name.clone(),
            app: self.app(),
        })
    }
    fn kill_batch(&self) -> u32 {
        200
    }
    fn gone_plan(&self) -> (i64, i64) {
        (500, 5000)
    }
    fn gone_messages(&self) -> &'static [&'static str] {
        // The retry may find the proxy refusing before it finds the link gone.
        &["connection was lost", "cannot open"]
    }
    fn origin_rows(&mut self) -> (String, i64, u32) {
        let query = "SELECT i AS id, 'n' || i AS name FROM generate_series(1, 3000000) i";
        (query.into(), 3_000_000, 1000)
    }
    fn origin_cut_message(&self) -> Option<&'static str> {
        Some("connection was lost")
    }
}

struct PgWatcher {
    client: postgres::Client,
    schema: String,
    app: String,
}

impl Watcher for PgWatcher {
    fn count(&mut self, name: &str) -> i64 {
        let sql = format!("SELECT count(*) FROM {}.{name}", self.schema);
        self.client.query_one(&sql, &[]).unwrap().get(0)
    }
    fn blocked(&mut self) -> i64 {
        // Outside a transaction, so each poll reads fresh activity.
        self.client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE application_name = $1 AND wait_event_type = 'Lock'",
                &[&self.app],
            )
            .unwrap()
            .get(0)
    }
    fn cut(&mut self) -> usize {
        let killed: i64 = self
            .client
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE application_name = $1 AND pid <> pg_backend_pid()",
                &[&self.app],
            )
            .unwrap()
            .get(0);
        killed as usize
    }
}

/// A MariaDB database of its own, dropped at the end.
pub struct MariaDb {
    /// The database's name.
    pub name: String,
    /// The test's own connection, using the database.
    pub admin: mysql::Conn,
}

impl MariaDb {
    /// Creates the database.
    pub fn new() -> Self {
        let mut admin = mysql_admin();
        let name = format!("tp_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
        admin.query_drop(format!("CREATE DATABASE {name}")).unwrap();
        admin.query_drop(format!("USE {name}")).unwrap();
        MariaDb { name, admin }
    }

    /// The URL of the database.
    pub fn url(&self) -> String {
        format!("{}/{}", mysql_base_url(), self.name)
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        let _ = self
            .admin
            .query_drop(format!("DROP DATABASE {}", self.name));
    }
}

impl SqlDestination for MariaDb {
    fn label(&self) -> &'static str {
        "MariaDB"
    }
    fn connection(&self) -> String {
        format!("kind = \"mariadb\"\nurl = \"{}\"", self.url())
    }
    fn table(&self, name: &str) -> String {
        name.to_owned()
    }
    fn text_type(&self) -> &'static str {
        "varchar(50)"
    }
    fn exec(&mut self, sql: &str) {
        for stmt in sql.split(';').filter(|s| !s.trim().is_empty()) {
            self.admin.query_drop(stmt).unwrap();
        }
    }
    fn rows(&mut self, sql: &str) -> Vec<String> {
        let rows: Vec<mysql::Row> = self.admin.query(sql).unwrap();
        rows.into_iter()
            .map(|r| {
                r.unwrap()
                    .into_iter()
                    .map(|v| match v {
                        mysql::Value::NULL => "∅".to_owned(),
                        mysql::Value::Bytes(b) => String::from_utf8_lossy(&b).into_owned(),
                        other => other.as_sql(true).trim_matches('\'').to_owned(),
                    })
                    .collect::<Vec<_>>()
                    .join("|")
            })
            .collect()
    }
    fn notes_a_missing_index(&self) -> bool {
        true
    }
}

impl ServerDestination for MariaDb {
    fn upstream(&self) -> &'static str {
        "127.0.0.1:3306"
    }
    fn refused_message(&self) -> &'static str {
        "cannot open mysql database mysql://root@127.0.0.1:1/"
    }
    fn through(&self, port: u16) -> String {
        // Without prefer_socket=false the driver moves to the server's Unix
        // socket, around the proxy.
        let url = self
            .url()
            .replace(self.upstream(), &format!("127.0.0.1:{port}"));
        format!("kind = \"mariadb\"\nurl = \"{url}?prefer_socket=false\"")
    }
    fn watcher(&self) -> Box<dyn Watcher> {
        Box::new(MariaWatcher {
            conn: mysql_admin(),
            db: self.name.clone(),
            admin_id: self.admin.connection_id(),
        })
    }
    fn kill_batch(&self) -> u32 {
        50
    }
    fn gone_plan(&self) -> (i64, i64) {
        (200, 3000)
    }
    fn gone_messages(&self) -> &'static [&'static str] {
        &["connection was lost"]
    }
    fn origin_rows(&mut self) -> (String, i64, u32) {
        self.exec(
            "CREATE TABLE src(id integer PRIMARY KEY, name text);
             CREATE TABLE d(i integer);
             INSERT INTO d VALUES (0),(1),(2),(3),(4),(5),(6),(7),(8),(9);
             INSERT INTO src SELECT n, concat('n', n) FROM (
               SELECT 1 + a.i + 10*b.i + 100*c.i + 1000*e.i + 10000*g.i + 100000*h.i AS n
               FROM d a, d b, d c, d e, d g, (SELECT 0 AS i UNION SELECT 1 UNION SELECT 2) h) x",
        );
        // Slow enough on the SQLite side that the cut lands mid-stream.
        ("SELECT id, name FROM src ORDER BY id".into(), 300_000, 100)
    }
    fn origin_cut_message(&self) -> Option<&'static str> {
        None
    }
}

struct MariaWatcher {
    conn: mysql::Conn,
    db: String,
    admin_id: u32,
}

impl Watcher for MariaWatcher {
    fn count(&mut self, name: &str) -> i64 {
        let sql = format!("SELECT count(*) FROM {}.{name}", self.db);
        let n: Option<Option<i64>> = self.conn.query_first(sql).unwrap();
        n.flatten().unwrap_or(0)
    }
    fn blocked(&mut self) -> i64 {
        // A statement of tidepool's running for a second or more: with the
        // test's row lock held it is waiting on it. (INNODB_TRX was tried
        // first; MariaDB 10.11 did not always list the waiting transaction.)
        let sql = format!(
            "SELECT count(*) FROM information_schema.PROCESSLIST
             WHERE db = '{}' AND id NOT IN (CONNECTION_ID(), {})
               AND command IN ('Query', 'Execute') AND time >= 1",
            self.db, self.admin_id
        );
        let n: Option<Option<i64>> = self.conn.query_first(sql).unwrap();
        n.flatten().unwrap_or(0)
    }
    fn cut(&mut self) -> usize {
        let ids: Vec<u64> = self
            .conn
            .query(format!(
                "SELECT id FROM information_schema.PROCESSLIST WHERE db = '{}' AND id NOT IN (CONNECTION_ID(), {})",
                self.db, self.admin_id
            ))
            .unwrap();
        for id in &ids {
            let _ = self.conn.query_drop(format!("KILL {id}"));
        }
        ids.len()
    }
}

/// A SQLite file of its own. The fault scenarios do not apply: an embedded
/// file has no server to refuse, no connection to kill and no link to take
/// down.
pub struct SqliteFile {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    conn: rusqlite::Connection,
}

impl SqliteFile {
    /// Creates the file.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dest.sqlite");
        let conn = rusqlite::Connection::open(&path).unwrap();
        SqliteFile {
            _dir: dir,
            path,
            conn,
        }
    }
}

impl SqlDestination for SqliteFile {
    fn label(&self) -> &'static str {
        "SQLite"
    }
    fn connection(&self) -> String {
        format!("kind = \"sqlite\"\npath = {:?}", self.path)
    }
    fn table(&self, name: &str) -> String {
        name.to_owned()
    }
    fn exec(&mut self, sql: &str) {
        self.conn.execute_batch(sql).unwrap();
    }
    fn rows(&mut self, sql: &str) -> Vec<String> {
        super::rows(&self.conn, sql)
    }
}
