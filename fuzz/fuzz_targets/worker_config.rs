#![no_main]
//! `worker_config`: the check, its byte scheme and its seeds are in fuzz/checks/worker.rs.

#[path = "../checks/worker.rs"]
#[allow(dead_code)]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::worker_config(data));
