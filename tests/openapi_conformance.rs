//! The server against its own OpenAPI document: tests/schemathesis.py starts
//! the real binary on a free loopback port with a real user and API key, and
//! runs schemathesis (all phases, all checks, a small bounded budget) on it.
//! Any request the document allows that the server refuses, any answer the
//! document does not describe, fails this test.

use std::path::Path;
use std::process::Command;

#[test]
fn the_server_answers_as_its_openapi_document_says() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let installed = Command::new("python3")
        .args(["-c", "import schemathesis"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        installed,
        "schemathesis is not installed: pip install schemathesis==4.32.5 (CI installs it in .ci/run)"
    );
    let out = Command::new("python3")
        .arg(root.join("tests/schemathesis.py"))
        .args(["--bin", env!("CARGO_BIN_EXE_tidepool")])
        .args(["--max-examples", "10", "--max-time", "30"])
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "schemathesis found the server and its OpenAPI document disagreeing ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("Stateful"),
        "schemathesis did not run its phases:\n{stdout}\n{stderr}"
    );
}
