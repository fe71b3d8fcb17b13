#![no_main]
//! `wire_headers`: the check, its byte scheme and its seeds are in fuzz/checks/common.rs.

#[path = "../checks/common.rs"]
#[allow(dead_code)]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::wire_headers(data));
