#![no_main]
//! `spool_record`: the check, its byte scheme and its seeds are in fuzz/checks/agent.rs.

#[path = "../checks/agent.rs"]
#[allow(dead_code)]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::spool_record(data));
