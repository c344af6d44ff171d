//! ExecuteJob/ExecuteJobAsync bodies as `application/json`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "request.rs"]
mod request;

fuzz_target!(|body: &[u8]| request::decode("application/json", body));
