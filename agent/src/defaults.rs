//! Defaults of a config section, for the stages' `Default` impls: a section with every key
//! left out, so each default is written once, in the serde attributes next to the key.
//!
//! A leaf: it imports no stage. The stages take their defaults from here and `config`, which
//! gathers their sections into `agent.toml`, imports the stages, so imports run one way.

use framelink_common::config_file;
use serde::de::DeserializeOwned;

/// The section `_name` with every key at its default (an empty table); the name is for the
/// reader of the call.
pub fn section<T: DeserializeOwned>(_name: &str) -> T {
    config_file::from_toml_str("").expect("every key of this section has a default")
}
