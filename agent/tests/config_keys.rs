//! Every key of `AgentConfig` is documented in `configs/agent.toml` (commented-out keys count),
//! once, and every key documented there exists. How the keys are found: `support/config_keys.rs`.

mod support {
    pub mod config_keys;
}

use framelink_agent::config::AgentConfig;
use framelink_common::config_file::from_toml_str;

#[test]
fn every_agent_key_is_documented_in_the_example_config() {
    let parse = |doc: &str| from_toml_str::<AgentConfig>(doc).map(drop).map_err(|e| e.to_string());
    let n = support::config_keys::check(&parse, "configs/agent.toml");
    println!("{n} keys, all documented");
    // The walk itself must work: the agent has far more keys than a broken probe would find.
    assert!(n > 40, "only {n} keys found");
}
