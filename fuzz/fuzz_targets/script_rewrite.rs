//! A script's tokens rewritten into JavaScript (`row["…"]`, `vars["…"]`,
//! `stages[n]`) and the function sources it is compiled from. QuickJS itself
//! is not run here: one runtime per input would cost more than the rewrite.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidepool::script::{function_sources, reads_stages};

fuzz_target!(|script: &str| {
    let _ = reads_stages(script);
    let Ok(sources) = function_sources(script) else {
        return;
    };
    assert!(!sources.is_empty());
    for s in &sources {
        assert!(
            s.starts_with("(function(row, vars, stages, event) {"),
            "{s:?}"
        );
    }
});
