//! The worker's config file (`worker.toml`): typed, with defaults, validated at load.
//!
//! Later stages (decoder, operations, metrics) add their own tables next to the code that uses
//! them; unknown keys are refused so a typo never silently falls back to a default.

use std::path::Path;

use anyhow::{Result, bail};
use framelink_common::config_file;
use framelink_common::wire;
use framelink_common::kafka_config::KafkaConfig;
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
    /// What to do with each frame.
    #[serde(default)]
    pub worker: ProcessingConfig,
    /// Motion events.
    #[serde(default)]
    pub motion: crate::motion::MotionConfig,
    /// `/metrics` and `/healthz`.
    #[serde(default)]
    pub http: HttpConfig,
    /// Which backend runs the ops (CPU or GPU) and GPU batching.
    #[serde(default)]
    pub gpu: crate::gpu::GpuConfig,
    /// The beat `framelink-console` shows this worker by (`heartbeat_s`, `topic`).
    #[serde(default)]
    pub heartbeat: framelink_common::heartbeat::HeartbeatConfig,
    /// Large-image jobs' tiles (`enabled`, `topic`, `results_topic`, `jobs_topic`).
    #[serde(default)]
    pub tiles: crate::tile::TilesConfig,
    /// The ONNX Runtime library, execution provider and batching of `detect:` ops.
    #[serde(default)]
    pub inference: crate::infer::InferenceConfig,
    /// The models `detect:NAME` runs, one `[models.NAME]` table each.
    #[serde(default)]
    pub models: std::collections::BTreeMap<String, crate::infer::ModelConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessingConfig {
    /// Worker id in result headers and client ids. Default: $HOSTNAME.
    pub id: Option<String>,
    /// Operations, e.g. `resize:1280x720,grayscale,blur:1.5,sobel`. Default `` (re-encode only).
    #[serde(default)]
    pub pipeline: String,
    /// Processing threads; 0 = one per core. Default 0.
    #[serde(default)]
    pub threads: usize,
    /// Refuse images above this many pixels before decoding (decompression bombs). Default 50 M.
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
    /// Quality of the result JPEGs. Default 85.
    #[serde(default = "default_quality")]
    pub jpeg_quality: u8,
    /// Publish motion events only, no result images. Default false.
    #[serde(default)]
    pub events_only: bool,
    /// A pipeline of only `rotate`, `crop` and `grayscale` transforms frames in the DCT domain
    /// where that is exact (lossless: no decode, no encode, the source's quality; see
    /// docs/worker.md), and the empty pipeline (a plain re-encode) requantises them there to
    /// `jpeg_quality`. `false`: such frames are decoded and encoded (on their YUV planes, a
    /// leading crop's region, or RGB). Default true.
    #[serde(default = "default_true")]
    pub dct_transforms: bool,
    /// `blur`, `sharpen` and a plain re-encode of 4:2:0 JPEG frames run on their YUV planes,
    /// with the planes' own definitions, on either backend (see docs/worker.md). `false`: the
    /// RGB definitions, which large-image tiles compute. Default true.
    #[serde(default = "default_true")]
    pub plane_ops: bool,
    /// `at-least-once` (default) or `exactly-once` (Kafka transactions; see docs/worker.md).
    #[serde(default)]
    pub delivery: Delivery,
    /// Exactly-once: how often the open transaction is committed, in ms. Default 500. Readers
    /// with `isolation.level=read_committed` see results at most this much later.
    #[serde(default = "default_transaction_ms")]
    pub transaction_ms: u64,
}

/// `worker.delivery`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Delivery {
    /// Offsets commit after the outputs are acknowledged; a crash can repeat outputs.
    #[default]
    AtLeastOnce,
    /// Outputs and offsets commit together in a Kafka transaction.
    ExactlyOnce,
}

impl TryFrom<String> for Delivery {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "at-least-once" => Ok(Delivery::AtLeastOnce),
            "exactly-once" => Ok(Delivery::ExactlyOnce),
            _ => Err(format!("{s:?} is not \"at-least-once\" or \"exactly-once\"")),
        }
    }
}

impl Delivery {
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::AtLeastOnce => "at-least-once",
            Delivery::ExactlyOnce => "exactly-once",
        }
    }
}

fn default_transaction_ms() -> u64 {
    500
}

fn default_max_pixels() -> u64 {
    50_000_000
}
fn default_quality() -> u8 {
    85
}

impl Default for ProcessingConfig {
    fn default() -> Self {
        framelink_common::config_file::from_toml_str("").expect("defaults")
    }
}

impl ProcessingConfig {
    pub fn thread_count(&self) -> usize {
        if self.threads > 0 { self.threads } else { std::thread::available_parallelism().map_or(2, |n| n.get()) }
    }

    pub fn pipeline_ops(&self) -> Result<crate::ops::Pipeline> {
        crate::ops::Pipeline::parse(&self.pipeline).map_err(|e| anyhow::anyhow!("config key `worker.pipeline`: {e}"))
    }
}

/// `[http]`: `listen`, the address of `/metrics` and `/healthz`; empty turns it off. Default
/// `127.0.0.1:9465` (the agent's is 9464, so both fit on one host).
pub type HttpConfig = framelink_common::http::HttpConfig<9465>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Consumer group shared by the fleet. Default `framelink-workers`.
    #[serde(default = "default_group")]
    pub group_id: String,
    /// Frame topics to consume; a name starting with `^` is a regular expression (fan-in of
    /// many sites: `^frames\\..*`). Default `["frames"]`.
    #[serde(default = "default_topics")]
    pub topics: Vec<String>,
    /// Where a new group starts: `earliest` (default) or `latest`.
    #[serde(default = "default_reset")]
    pub auto_offset_reset: String,
    /// Static group membership (KIP-345, `group.instance.id` = `<group_id>-<worker id>`): a
    /// worker restarted with the same `worker.id` takes its partitions back at once, without a
    /// rebalance. Applies when `worker.id` is set (the systemd unit and the Kubernetes manifests
    /// set it); without it the worker joins dynamically. A member that stops cleanly stays in
    /// the group until `session_timeout_ms` passes (static members do not leave on close).
    /// Default true.
    #[serde(default = "default_true")]
    pub static_membership: bool,
    /// How long the group waits for a silent member before giving its partitions to others
    /// (librdkafka's `session.timeout.ms`, default 45 000; lowered so the partitions of a
    /// worker that never comes back move within seconds). 6 000 – 300 000. Default 10 000.
    #[serde(default = "default_session_timeout_ms")]
    pub session_timeout_ms: u64,
}

fn default_true() -> bool {
    true
}
fn default_session_timeout_ms() -> u64 {
    10_000
}

fn default_reset() -> String {
    "earliest".into()
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self { group_id: default_group(), topics: default_topics(), auto_offset_reset: default_reset(), static_membership: true, session_timeout_ms: default_session_timeout_ms() }
    }
}

#[derive(Debug, Clone, Deserialize)]
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
    wire::defaults::WORKER_GROUP.into()
}
fn default_topics() -> Vec<String> {
    vec![wire::defaults::FRAMES_TOPIC.into()]
}
fn default_results() -> String {
    wire::defaults::RESULTS_TOPIC.into()
}
fn default_events() -> String {
    wire::defaults::EVENTS_TOPIC.into()
}
fn default_dlq() -> String {
    wire::defaults::DLQ_TOPIC.into()
}

/// A loaded and validated worker config.
pub type Validated = config_file::Validated<WorkerConfig>;

impl WorkerConfig {
    /// Loads `path` with `FRAMELINK__` environment overrides and validates it.
    pub fn load(path: &Path) -> Result<Validated> {
        config_file::load_validated(path, Self::validate)
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
            for pattern in self.consumer.topics.iter().filter(|t| t.starts_with('^')) {
                let re = regex::Regex::new(pattern).map_err(|e| anyhow::anyhow!("config key `consumer.topics`: {pattern:?} is not a regular expression: {e}"))?;
                if re.is_match(topic) {
                    bail!("config key `{key}`: {topic:?} matches the input pattern {pattern:?} (the worker would consume its own output)");
                }
            }
        }
        if !matches!(self.consumer.auto_offset_reset.as_str(), "earliest" | "latest") {
            bail!("config key `consumer.auto_offset_reset`: {:?} is not `earliest` or `latest`", self.consumer.auto_offset_reset);
        }
        if !(6_000..=300_000).contains(&self.consumer.session_timeout_ms) {
            bail!("config key `consumer.session_timeout_ms`: {} is not from 6000 to 300000 (the broker's group.min/max.session.timeout.ms defaults)", self.consumer.session_timeout_ms);
        }
        let t = &self.tiles;
        if t.enabled {
            for (key, topic) in [("tiles.topic", &t.topic), ("tiles.results_topic", &t.results_topic), ("tiles.jobs_topic", &t.jobs_topic)] {
                if topic.is_empty() {
                    bail!("config key `{key}`: must not be empty");
                }
            }
            if t.results_topic == t.topic || self.consumer.topics.contains(&t.results_topic) {
                bail!("config key `tiles.results_topic`: {:?} is also an input topic (the worker would consume its own output)", t.results_topic);
            }
            if [&o.results_topic, &o.events_topic, &o.dlq_topic].contains(&&t.topic) {
                bail!("config key `tiles.topic`: {:?} is also an output topic (the worker would consume its own output)", t.topic);
            }
        }
        let pipeline = self.worker.pipeline_ops()?;
        self.inference.validate().map_err(anyhow::Error::msg)?;
        crate::infer::config::validate_models(&pipeline, &self.models).map_err(anyhow::Error::msg)?;
        if !(1..=100).contains(&self.worker.jpeg_quality) {
            bail!("config key `worker.jpeg_quality`: {} is not from 1 to 100", self.worker.jpeg_quality);
        }
        if !(10..=60_000).contains(&self.worker.transaction_ms) {
            bail!("config key `worker.transaction_ms`: {} is not from 10 to 60000", self.worker.transaction_ms);
        }
        self.gpu.validate().map_err(anyhow::Error::msg)?;
        if self.worker.max_pixels == 0 {
            bail!("config key `worker.max_pixels`: must be at least 1");
        }
        self.http.addr()?;
        self.heartbeat.validate().map_err(anyhow::Error::msg)?;
        let kafka = self.kafka.validate("kafka")?;
        Ok(Validated { config: self, kafka })
    }
}
