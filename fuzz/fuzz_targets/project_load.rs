//! The project loader on text: `project.toml`, then each job file, separated
//! by NUL bytes (which TOML text cannot hold). Nothing is read from disk.
#![no_main]

use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use tidepool::project::{LoadOptions, load_project_text};

/// More job files than this add nothing a fuzzer could not reach with fewer.
const MAX_JOBS: usize = 4;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0);
    let Some(Ok(project)) = parts.next().map(std::str::from_utf8) else {
        return;
    };
    let mut jobs = Vec::new();
    for (i, part) in parts.take(MAX_JOBS).enumerate() {
        let Ok(text) = std::str::from_utf8(part) else {
            return;
        };
        // The seeds' job names, so their `next = …` chains resolve.
        let name = ["contacts", "countries", "j", "k"][i];
        jobs.push((
            PathBuf::from(format!("/fuzz/projects/p/jobs/{name}.toml")),
            text.to_owned(),
        ));
    }
    let opts = LoadOptions {
        data_dir: PathBuf::from("/fuzz/data"),
    };
    match load_project_text(Path::new("/fuzz/projects/p"), project, jobs, &opts) {
        Ok(p) => assert!(!p.id.0.is_empty()),
        Err(problems) => assert!(!problems.is_empty(), "a refusal names its problems"),
    }
});
