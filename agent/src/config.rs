//! The agent's config file (`agent.toml`): typed, with defaults, validated at load.
//!
//! Later stages (sources, encoder, spool, metrics) add their own tables next to the code that
//! uses them; unknown keys are refused so a typo never silently falls back to a default.

use std::path::Path;

use anyhow::{Context, Result};
use framelink_common::config_file;
use framelink_common::kafka_config::{KafkaConfig, KafkaSettings};
use framelink_common::wire::{self, header};
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// A config section with every key at its default (an empty table), so defaults are written
/// once, in the serde attributes.
pub fn defaults<T: DeserializeOwned>(_section: &str) -> T {
    config_file::from_toml_str("").expect("every key of this section has a default")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Who this device is.
    pub device: DeviceConfig,
    /// How to reach Kafka.
    pub kafka: KafkaConfig,
    /// Where frames go.
    #[serde(default)]
    pub forwarder: ForwarderConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Device id, first half of every record key (`<device>/<camera>`). Required.
    pub id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwarderConfig {
    /// Kafka topic for frames. Default `frames`.
    #[serde(default = "default_topic")]
    pub topic: String,
}

impl Default for ForwarderConfig {
    fn default() -> Self {
        Self { topic: default_topic() }
    }
}

fn default_topic() -> String {
    "frames".into()
}

/// A loaded and validated agent config.
#[derive(Debug)]
pub struct Validated {
    pub config: AgentConfig,
    pub kafka: KafkaSettings,
}

impl AgentConfig {
    /// Loads `path` with `FRAMELINK__` environment overrides and validates it.
    pub fn load(path: &Path) -> Result<Validated> {
        let config: AgentConfig = config_file::load(path)?;
        config.validate().with_context(|| format!("config file {}", path.display()))
    }

    pub fn validate(self) -> Result<Validated> {
        wire::check_id(header::DEVICE, &self.device.id).context("config key `device.id`")?;
        if self.forwarder.topic.is_empty() {
            anyhow::bail!("config key `forwarder.topic`: must not be empty");
        }
        let kafka = self.kafka.validate("kafka")?;
        Ok(Validated { config: self, kafka })
    }
}
