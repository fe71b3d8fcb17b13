//! `console.toml`: typed, with defaults, validated at load; unknown keys are refused.
//!
//! Access rule: the console binds 127.0.0.1 by default. Bound anywhere else it refuses to start
//! without a bearer token (`console.token_file`, or the variable `console.token_env` names), so
//! a dashboard is never exposed to a network by accident.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use framelink_common::config_file;
use framelink_common::wire;
use framelink_common::kafka_config::KafkaConfig;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub console: WebConfig,
    #[serde(default)]
    pub topics: Topics,
    #[serde(default)]
    pub lag: LagConfig,
    /// Large-image jobs (`/api/jobs`).
    #[serde(default)]
    pub jobs: crate::jobs::JobsConfig,
}

/// `[console]`: the web listener and what the page shows.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebConfig {
    /// Address of the dashboard, `/api`, `/healthz`, `/metrics`. Default `127.0.0.1:9470`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// A file holding the bearer token (one line). Required, or `token_env`, when `listen` is
    /// not a loopback address.
    pub token_file: Option<PathBuf>,
    /// The environment variable holding the token. Default `FRAMELINK_CONSOLE_TOKEN`.
    #[serde(default = "default_token_env")]
    pub token_env: String,
    /// TLS: a PEM certificate chain and its key; both or neither. Default: plain HTTP.
    pub tls_certificate: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// A device, camera or worker is `stale` after this many of its heartbeat intervals
    /// without a beat. Default 3.
    #[serde(default = "default_stale_beats")]
    pub stale_after_beats: u32,
    /// ... and `offline` after this many seconds. Default 60.
    #[serde(default = "default_offline_s")]
    pub offline_after_s: u64,
    /// Devices and workers silent this long leave the view (their last beat stays in Kafka).
    /// Default 7 days.
    #[serde(default = "default_forget_s")]
    pub forget_after_s: u64,
    /// Thumbnails are at most this wide (DCT-scaled from the latest result). Default 320.
    #[serde(default = "default_thumb_width")]
    pub thumbnail_width: u32,
    /// The page asks for a camera's new thumbnail at most this often, and the live stream
    /// announces new results per camera at most this often, in seconds. Default 2.
    #[serde(default = "default_thumb_refresh")]
    pub thumbnail_refresh_s: u64,
    /// How often the live stream (server-sent events) pushes changes, in ms. Default 1000.
    #[serde(default = "default_push_ms")]
    pub push_interval_ms: u64,
    /// Motion events and dead letters kept for the page. Default 50 each.
    #[serde(default = "default_recent")]
    pub recent: usize,
}

/// `[topics]`: what the console reads. Results, events and the DLQ are read from their ends
/// (live view); heartbeats from the beginning (the fleet's last known state).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topics {
    #[serde(default = "framelink_common::heartbeat::default_topic")]
    pub heartbeats: String,
    /// Result images (thumbnails); "" to show none. Default `frames.processed`.
    #[serde(default = "default_results")]
    pub results: String,
    /// Motion events; "" for none. Default `frames.events`.
    #[serde(default = "default_events")]
    pub events: String,
    /// Dead letters; "" for none. Default `frames.dlq`.
    #[serde(default = "default_dlq")]
    pub dlq: String,
}

/// `[lag]`: the workers' consumer lag, measured by the console itself (committed offsets of the
/// workers' group against the partitions' ends), so it keeps moving when workers stop.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LagConfig {
    /// The workers' consumer group; "" turns lag off. Default `framelink-workers`.
    #[serde(default = "default_group")]
    pub group: String,
    /// The topics the workers consume. Default `["frames"]`.
    #[serde(default = "default_frames")]
    pub topics: Vec<String>,
    /// Seconds between samples. Default 5.
    #[serde(default = "default_lag_interval")]
    pub interval_s: u64,
    /// The chart's window, seconds. Default 900 (15 minutes).
    #[serde(default = "default_window")]
    pub window_s: u64,
}

fn default_listen() -> String {
    "127.0.0.1:9470".into()
}
fn default_token_env() -> String {
    "FRAMELINK_CONSOLE_TOKEN".into()
}
fn default_stale_beats() -> u32 {
    3
}
fn default_offline_s() -> u64 {
    60
}
fn default_forget_s() -> u64 {
    7 * 24 * 3600
}
fn default_thumb_width() -> u32 {
    320
}
fn default_thumb_refresh() -> u64 {
    2
}
fn default_push_ms() -> u64 {
    1000
}
fn default_recent() -> usize {
    50
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
fn default_group() -> String {
    wire::defaults::WORKER_GROUP.into()
}
fn default_frames() -> Vec<String> {
    vec![wire::defaults::FRAMES_TOPIC.into()]
}
fn default_lag_interval() -> u64 {
    5
}
fn default_window() -> u64 {
    900
}

impl Default for WebConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            token_file: None,
            token_env: default_token_env(),
            tls_certificate: None,
            tls_key: None,
            stale_after_beats: default_stale_beats(),
            offline_after_s: default_offline_s(),
            forget_after_s: default_forget_s(),
            thumbnail_width: default_thumb_width(),
            thumbnail_refresh_s: default_thumb_refresh(),
            push_interval_ms: default_push_ms(),
            recent: default_recent(),
        }
    }
}

impl Default for Topics {
    fn default() -> Self {
        Self { heartbeats: framelink_common::heartbeat::default_topic(), results: default_results(), events: default_events(), dlq: default_dlq() }
    }
}

impl Default for LagConfig {
    fn default() -> Self {
        Self { group: default_group(), topics: default_frames(), interval_s: default_lag_interval(), window_s: default_window() }
    }
}

/// A loaded and validated console config, with the token read.
pub struct Validated {
    pub config: ConsoleConfig,
    pub kafka: framelink_common::KafkaSettings,
    pub addr: SocketAddr,
    /// The bearer token, if one is configured.
    pub token: Option<String>,
}

impl ConsoleConfig {
    /// Loads `path` with `FRAMELINK__` environment overrides and validates it.
    pub fn load(path: &Path) -> Result<Validated> {
        config_file::load_validated(path, |c: ConsoleConfig| c.validate(&|k| std::env::var(k).ok()))
    }

    pub fn validate(self, env: &dyn Fn(&str) -> Option<String>) -> Result<Validated> {
        let w = &self.console;
        let addr: SocketAddr = w.listen.parse().with_context(|| format!("config key `console.listen`: {:?} is not an address like 127.0.0.1:9470", w.listen))?;
        let token = match &w.token_file {
            Some(p) => {
                let t = std::fs::read_to_string(p).with_context(|| format!("config key `console.token_file`: cannot read {}", p.display()))?;
                Some(t.trim().to_owned())
            }
            None => env(&w.token_env).map(|t| t.trim().to_owned()),
        };
        if let Some(t) = &token
            && t.len() < 16
        {
            bail!("the console's bearer token (console.token_file or ${}) is {} characters; use at least 16 (e.g. `openssl rand -hex 24`)", w.token_env, t.len());
        }
        if !addr.ip().is_loopback() && token.is_none() {
            bail!(
                "config key `console.listen`: {addr} is reachable from other hosts, and no bearer token is configured: set `console.token_file` or the variable ${} (or bind 127.0.0.1)",
                w.token_env
            );
        }
        match (&w.tls_certificate, &w.tls_key) {
            (Some(c), Some(k)) => {
                for (key, p) in [("console.tls_certificate", c), ("console.tls_key", k)] {
                    if !p.is_file() {
                        bail!("config key `{key}`: {} does not exist", p.display());
                    }
                }
            }
            (None, None) => {}
            _ => bail!("config keys `console.tls_certificate` and `console.tls_key`: set both or neither"),
        }
        if w.stale_after_beats == 0 {
            bail!("config key `console.stale_after_beats`: must be at least 1");
        }
        if !(8..=4096).contains(&w.thumbnail_width) {
            bail!("config key `console.thumbnail_width`: {} is not from 8 to 4096", w.thumbnail_width);
        }
        if !(100..=60_000).contains(&w.push_interval_ms) {
            bail!("config key `console.push_interval_ms`: {} is not from 100 to 60000", w.push_interval_ms);
        }
        if self.topics.heartbeats.trim().is_empty() {
            bail!("config key `topics.heartbeats`: must not be empty (the console's view comes from it)");
        }
        if !self.lag.group.is_empty() && (self.lag.topics.is_empty() || self.lag.interval_s == 0 || self.lag.window_s < self.lag.interval_s) {
            bail!("config keys `lag.topics`, `lag.interval_s`, `lag.window_s`: need at least one topic, interval_s ≥ 1 and window_s ≥ interval_s (or lag.group = \"\" to turn lag off)");
        }
        if self.jobs.enabled {
            self.jobs.validate()?;
        }
        let kafka = self.kafka.validate("kafka")?;
        Ok(Validated { config: self, kafka, addr, token })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml: &str) -> ConsoleConfig {
        let f = tempfile::NamedTempFile::with_suffix(".toml").unwrap();
        std::fs::write(f.path(), toml).unwrap();
        config_file::load_with_env(f.path(), Some(Default::default())).unwrap()
    }

    const KAFKA: &str = "[kafka]\nbrokers = [\"localhost:9092\"]\n";

    #[test]
    fn defaults_bind_loopback_without_a_token() {
        let v = parse(KAFKA).validate(&|_| None).unwrap();
        assert_eq!(v.addr.to_string(), "127.0.0.1:9470");
        assert!(v.token.is_none());
        assert_eq!(v.config.topics.heartbeats, "framelink.heartbeats");
        assert_eq!(v.config.lag.window_s, 900);
    }

    #[test]
    fn a_public_bind_needs_a_token() {
        let c = parse(&format!("{KAFKA}[console]\nlisten = \"0.0.0.0:9470\"\n"));
        let e = c.validate(&|_| None).err().unwrap().to_string();
        assert!(e.contains("console.listen") && e.contains("FRAMELINK_CONSOLE_TOKEN"), "{e}");
        let c = parse(&format!("{KAFKA}[console]\nlisten = \"0.0.0.0:9470\"\n"));
        let v = c.validate(&|k| (k == "FRAMELINK_CONSOLE_TOKEN").then(|| "0123456789abcdef0123".into())).unwrap();
        assert_eq!(v.token.as_deref(), Some("0123456789abcdef0123"));
        let c = parse(&format!("{KAFKA}[console]\nlisten = \"0.0.0.0:9470\"\n"));
        let e = c.validate(&|_| Some("short".into())).err().unwrap().to_string();
        assert!(e.contains("at least 16"), "{e}");
    }

    #[test]
    fn bad_keys_are_named() {
        let e = parse(&format!("{KAFKA}[console]\nlisten = \"nowhere\"\n")).validate(&|_| None).err().unwrap().to_string();
        assert!(e.contains("console.listen"), "{e}");
        let e = parse(&format!("{KAFKA}[console]\ntls_key = \"/nope.pem\"\n")).validate(&|_| None).err().unwrap().to_string();
        assert!(e.contains("tls_certificate"), "{e}");
        let e = parse(&format!("{KAFKA}[lag]\ninterval_s = 0\n")).validate(&|_| None).err().unwrap().to_string();
        assert!(e.contains("lag.interval_s"), "{e}");
    }
}
