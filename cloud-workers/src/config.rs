//! The worker's config file (`worker.toml`): typed, with defaults, validated at load.
//!
//! Later stages (decoder, operations, metrics) add their own tables next to the code that uses
//! them; unknown keys are refused so a typo never silently falls back to a default.

use std::path::Path;

use anyhow::{Context, Result, bail};
use framelink_common::config_file;
use framelink_common::kafka_config::{KafkaConfig, KafkaSettings};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// How to reach Kafka.
    pub kafka: KafkaConfig,
    /// What to consume.
    #[serde(default)]
    pub consumer: ConsumerConfig,
    /// Where results go.
    #[serde(default)]
    pub output: OutputConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Consumer group shared by the fleet. Default `framelink-workers`.
    #[serde(default = "default_group")]
    pub group_id: String,
    /// Frame topics to consume. Default `["frames"]`.
    #[serde(default = "default_topics")]
    pub topics: Vec<String>,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self { group_id: default_group(), topics: default_topics() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Processed frames. Default `frames.processed`.
    #[serde(default = "default_results")]
    pub results_topic: String,
    /// Events (e.g. motion). Default `frames.events`.
    #[serde(default = "default_events")]
    pub events_topic: String,
    /// Frames that could not be processed, with the reason. Default `frames.dlq`.
    #[serde(default = "default_dlq")]
    pub dlq_topic: String,
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self { results_topic: default_results(), events_topic: default_events(), dlq_topic: default_dlq() }
    }
}

fn default_group() -> String {
    "framelink-workers".into()
}
fn default_topics() -> Vec<String> {
    vec!["frames".into()]
}
fn default_results() -> String {
    "frames.processed".into()
}
fn default_events() -> String {
    "frames.events".into()
}
fn default_dlq() -> String {
    "frames.dlq".into()
}

/// A loaded and validated worker config.
#[derive(Debug)]
pub struct Validated {
    pub config: WorkerConfig,
    pub kafka: KafkaSettings,
}

impl WorkerConfig {
    /// Loads `path` with `FRAMELINK__` environment overrides and validates it.
    pub fn load(path: &Path) -> Result<Validated> {
        let config: WorkerConfig = config_file::load(path)?;
        config.validate().with_context(|| format!("config file {}", path.display()))
    }

    pub fn validate(self) -> Result<Validated> {
        if self.consumer.group_id.is_empty() {
            bail!("config key `consumer.group_id`: must not be empty");
        }
        if self.consumer.topics.is_empty() || self.consumer.topics.iter().any(String::is_empty) {
            bail!("config key `consumer.topics`: give at least one non-empty topic");
        }
        let o = &self.output;
        for (key, topic) in [("output.results_topic", &o.results_topic), ("output.events_topic", &o.events_topic), ("output.dlq_topic", &o.dlq_topic)] {
            if topic.is_empty() {
                bail!("config key `{key}`: must not be empty");
            }
            if self.consumer.topics.contains(topic) {
                bail!("config key `{key}`: {topic:?} is also an input topic (the worker would consume its own output)");
            }
        }
        let kafka = self.kafka.validate("kafka")?;
        Ok(Validated { config: self, kafka })
    }
}
