//! Every key of `ConsoleConfig` is documented in `configs/console.toml` (commented-out keys
//! count), once, and every key documented there exists; the shipped configs load and validate.
//! How the keys are found: `agent/tests/support/config_keys.rs` (shared with the agent's test).

#[path = "../../../agent/tests/support/config_keys.rs"]
mod config_keys;

use framelink_common::config_file::from_toml_str;
use framelink_console::config::ConsoleConfig;

#[test]
fn every_console_key_is_documented_in_the_example_config() {
    let parse = |doc: &str| from_toml_str::<ConsoleConfig>(doc).map(drop).map_err(|e| e.to_string());
    let n = config_keys::check(&parse, "../configs/console.toml");
    println!("{n} keys, all documented");
    assert!(n > 20, "only {n} keys found");
}

#[test]
fn the_shipped_console_configs_validate() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for f in ["configs/console.toml", "configs/demo/console.toml"] {
        let text = std::fs::read_to_string(root.join(f)).unwrap();
        let c: ConsoleConfig = from_toml_str(&text).unwrap_or_else(|e| panic!("{f}: {e}"));
        // TLS files of the examples exist on a deployed host, not here: check the rest.
        let mut c = c;
        c.kafka.tls = Default::default();
        c.kafka.security_protocol = Default::default();
        let v = c.validate(&|_| None).unwrap_or_else(|e| panic!("{f}: {e:#}"));
        assert!(v.addr.ip().is_loopback(), "{f}: the shipped configs bind loopback");
    }
}
