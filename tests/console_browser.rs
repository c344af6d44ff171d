//! The console in a real browser: `tidepool serve` (the binary) on a free
//! loopback port, users made with `tidepool user add`, and
//! tests/browser/test_console.py driving Debian's chromium through Playwright
//! (log in, start the demo, its row errors, cancel a long run, a ReadOnly user,
//! another instance's user). Screenshots of every page (1280 and 390 px wide)
//! are left in a folder whose path the test prints.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Fixture, Server};

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

fn tidepool(data: &Path, args: &[&str]) {
    common::tidepool_cli_ok(data, args, PASSWORD);
}

/// The demo project as in the repository, and (if `slow`) `slow`: enough rows
/// in tiny batches that a run is still going when the test cancels it.
fn projects(f: &Fixture, slow: bool) {
    f.copy_demo();
    if slow {
        f.slow_project(2_000_000);
    }
}

/// `tidepool serve` on the fixture, answering.
fn serve(f: &Fixture) -> (Server, String) {
    let server = f.serve().start();
    let base = server.base.clone();
    (server, base)
}

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
