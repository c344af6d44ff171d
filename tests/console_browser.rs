//! The console in a real browser: `tidepool serve` (the binary) on a free
//! loopback port, users made with `tidepool user add`, and
//! tests/browser/test_console.py driving Debian's chromium through Playwright
//! (log in, start the demo, its row errors, cancel a long run, a ReadOnly user,
//! another instance's user). Screenshots of every page (1280 and 390 px wide)
//! are left in a folder whose path the test prints.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Fixture;

const PASSWORD: &str = "console test password";

/// The browser pieces CI installs (see .ci/run); missing ones fail with how to get them.
fn browser_prerequisites() -> PathBuf {
    let chromium = std::env::var_os("TIDEPOOL_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        chromium.exists(),
        "the console browser test needs Debian's chromium at {}: apt-get install -y chromium \
         (or set TIDEPOOL_CHROMIUM)",
        chromium.display()
    );
    let playwright = Command::new("python3")
        .args(["-c", "import playwright.sync_api"])
        .output();
    assert!(
        playwright.is_ok_and(|o| o.status.success()),
        "the console browser test needs Playwright for Python: python3 -m pip install playwright \
         (its own browser download is not needed: the test drives {})",
        chromium.display()
    );
    chromium
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tidepool(data: &Path, args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .env("TIDEPOOL_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tidepool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The demo project as in the repository, and (if `slow`) `slow`: enough rows
/// in tiny batches that a run is still going when the test cancels it.
fn projects(f: &Fixture, slow: bool) {
    let src = common::repo_projects().join("demo");
    for rel in [
        "project.toml",
        "jobs/contacts.toml",
        "jobs/countries.toml",
        "data/contacts.csv",
    ] {
        f.write(
            &format!("projects/demo/{rel}"),
            std::fs::read(src.join(rel)).unwrap(),
        );
    }
    if !slow {
        return;
    }
    let mut csv = String::from("id,name\n");
    for i in 1..=2_000_000 {
        csv.push_str(&format!("{i},n{i}\n"));
    }
    f.project(
        "slow",
        "[connections.src]\nkind = \"csv\"\npath = \"in.csv\"\n[connections.db]\nkind = \"sqlite\"\npath = \"${DATA_DIR}/slow.sqlite\"\ninit_sql = [\"CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, name TEXT)\"]\n",
        &[(
            "load",
            "batch_size = 10\n[origin]\nconnection = \"src\"\n[destination]\nconnection = \"db\"\n[[stages]]\ntable = \"t\"\naction = \"update/insert\"\nfields = [{ column = \"id\", origin = \"id\", match = true }, { column = \"name\", origin = \"name\" }]\n",
        )],
    );
    f.write("projects/slow/in.csv", csv);
}

fn wait_up(base: &str, server: &mut Server) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = base.trim_start_matches("http://");
    while Instant::now() < deadline {
        if let Some(status) = server.0.try_wait().unwrap() {
            panic!("tidepool serve exited: {status}");
        }
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("tidepool serve did not listen on {base}");
}

fn serve(f: &Fixture) -> (Server, String) {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = Server(
        Command::new(env!("CARGO_BIN_EXE_tidepool"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(&f.data)
            .arg("--projects")
            .arg(&f.projects)
            .env("TIDEPOOL_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tidepool serve"),
    );
    wait_up(&base, &mut server);
    (server, base)
}

/// Runs the browser script in `mode` ("open" or "users") against `base`.
fn browse(chromium: &Path, base: &str, shots: &Path, mode: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/test_console.py");
    let out = Command::new("python3")
        .arg(&script)
        .env("TIDEPOOL_URL", base)
        .env("TIDEPOOL_SHOTS", shots)
        .env("TIDEPOOL_PASSWORD", PASSWORD)
        .env("TIDEPOOL_CHROMIUM", chromium)
        .env("TIDEPOOL_MODE", mode)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the browser test ({mode}) failed ({}):\n{stdout}\n{stderr}\nscreenshots so far: {}",
        out.status,
        shots.display()
    );
    assert!(stdout.contains(": OK"), "{stdout}");
}

#[test]
fn the_console_in_chromium() {
    let chromium = browser_prerequisites();
    // Kept after the test so a reviewer can look at them.
    let shots = tempfile::Builder::new()
        .prefix("tidepool-console-screenshots-")
        .tempdir()
        .unwrap()
        .keep();
    println!("console screenshots: {}", shots.display());

    // Without users (loopback only): no login.
    let open = Fixture::new();
    projects(&open, false);
    let (server, base) = serve(&open);
    browse(&chromium, &base, &shots, "open");
    drop(server);

    let f = Fixture::new();
    projects(&f, true);
    tidepool(
        &f.data,
        &["user", "add", "ann", "--instance", "default:Owner"],
    );
    tidepool(
        &f.data,
        &["user", "add", "rita", "--instance", "default:ReadOnly"],
    );
    tidepool(
        &f.data,
        &["user", "add", "otto", "--instance", "other:Owner"],
    );
    let (_server, base) = serve(&f);
    browse(&chromium, &base, &shots, "users");
}
