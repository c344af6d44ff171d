//! ExecuteJob/ExecuteJobAsync bodies as `text/xml; charset=utf-8`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "request.rs"]
mod request;

fuzz_target!(|body: &[u8]| request::decode("text/xml; charset=utf-8", body));
