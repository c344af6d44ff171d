//! ExecuteJob/ExecuteJobAsync bodies as `application/x-www-form-urlencoded`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "request.rs"]
mod request;

fuzz_target!(|body: &[u8]| request::decode("application/x-www-form-urlencoded", body));
