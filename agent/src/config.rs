//! The agent's config file (`agent.toml`): one table per stage, each defined next to the code
//! that uses it, all with defaults, validated at load. Unknown keys are refused, so a typo
//! never silently falls back to a default.
//!
//! This module sits above the stages: it imports their tables, and they take their defaults
//! from the leaf module [`crate::defaults`], not from here, so imports run one way.

use std::path::Path;

use anyhow::{Context, Result};
use framelink_common::config_file;
use framelink_common::kafka_config::KafkaConfig;
use framelink_common::wire::{self, header};
use serde::Deserialize;

use crate::encoder::EncoderConfig;
use crate::forwarder::ForwarderConfig;
use crate::http::HttpConfig;
use crate::source::config::{CameraConfig, default_cameras};
use crate::spool::SpoolConfig;

/// [`crate::defaults::section`] under this module's path; a stage imports it from
/// [`crate::defaults`].
pub use crate::defaults::section as defaults;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Who this device is.
    pub device: DeviceConfig,
    /// How to reach Kafka.
    pub kafka: KafkaConfig,
    /// Cameras; default: one synthetic 1280x720 pattern at 10 fps (`synthetic0`).
    #[serde(default = "default_cameras")]
    pub cameras: Vec<CameraConfig>,
    #[serde(default)]
    pub encoder: EncoderConfig,
    #[serde(default)]
    pub spool: SpoolConfig,
    #[serde(default)]
    pub forwarder: ForwarderConfig,
    #[serde(default)]
    pub http: HttpConfig,
    /// The beat `framelink-console` shows the device by (`[heartbeat]`: `heartbeat_s`, `topic`).
    #[serde(default)]
    pub heartbeat: framelink_common::heartbeat::HeartbeatConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Device id, first half of every record key (`<device>/<camera>`). Required.
    pub id: String,
    /// Seconds to wait at shutdown for Kafka to acknowledge frames in flight before they are
    /// spooled. Default 10.
    #[serde(default = "default_grace")]
    pub shutdown_grace_s: u64,
    /// Let the kernel back the agent's memory with transparent huge pages. Default false: the
    /// agent turns them off for itself: 16.7–19.9 MiB median instead of 36–41 at 1080p on a
    /// kernel that uses them for everything (Debian's arm64; see [`crate::huge_pages`]).
    #[serde(default)]
    pub huge_pages: bool,
}

fn default_grace() -> u64 {
    10
}

/// A loaded and validated agent config.
pub type Validated = config_file::Validated<AgentConfig>;

impl AgentConfig {
    /// Loads `path` with `FRAMELINK__` environment overrides and validates it.
    pub fn load(path: &Path) -> Result<Validated> {
        config_file::load_validated(path, Self::validate)
    }

    /// As [`load`](Self::load) for `run`: a certificate outside its validity period by this
    /// device's clock (no RTC before NTP) is a warning, not a refusal to start — capture and
    /// spooling go on and `/healthz` reports the TLS failure; `check-config` still fails on it.
    pub fn load_for_run(path: &Path) -> Result<Validated> {
        config_file::load_validated(path, |c: AgentConfig| c.validate_with(framelink_common::tls_files::ValidityCheck::WarnOnly))
    }

    pub fn validate(self) -> Result<Validated> {
        self.validate_with(framelink_common::tls_files::ValidityCheck::Enforce)
    }

    fn validate_with(self, check: framelink_common::tls_files::ValidityCheck) -> Result<Validated> {
        wire::check_id(header::DEVICE, &self.device.id).context("config key `device.id`")?;
        if self.cameras.is_empty() {
            // `cameras = []`: a drain-only agent that forwards an existing spool.
            tracing::warn!("No cameras configured (cameras = []): the agent only drains its spool.");
        }
        let mut seen = std::collections::HashSet::new();
        for (i, c) in self.cameras.iter().enumerate() {
            c.validate(i)?;
            if !seen.insert(&c.id) {
                anyhow::bail!("config key `cameras[{i}].id`: {:?} is used by another camera", c.id);
            }
        }
        self.encoder.validate()?;
        self.spool.validate()?;
        self.forwarder.validate()?;
        self.http.addr()?;
        self.heartbeat.validate().map_err(anyhow::Error::msg)?;
        let kafka = self.kafka.validate_with("kafka", check)?;
        Ok(Validated { config: self, kafka })
    }
}
