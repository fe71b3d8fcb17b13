//! Every key of `WorkerConfig` is documented in `configs/worker.toml` (commented-out keys
//! count), once, and every key documented there exists. How the keys are found:
//! `agent/tests/support/config_keys.rs` (shared with the agent's test).

#[path = "../../agent/tests/support/config_keys.rs"]
mod config_keys;

use framelink_common::config_file::from_toml_str;
use framelink_worker::config::WorkerConfig;

#[test]
fn every_worker_key_is_documented_in_the_example_config() {
    let parse = |doc: &str| from_toml_str::<WorkerConfig>(doc).map(drop).map_err(|e| e.to_string());
    let n = config_keys::check(&parse, "configs/worker.toml");
    println!("{n} keys, all documented");
    // The walk itself must work: the worker has far more keys than a broken probe would find.
    assert!(n > 30, "only {n} keys found");
}
