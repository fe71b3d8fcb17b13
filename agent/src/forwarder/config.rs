//! `[forwarder]`: the producer's limits and the link policy's knobs, with their defaults and
//! the checks a config file must pass.

use anyhow::Result;
use bytesize::ByteSize;
use serde::Deserialize;

/// `[forwarder]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwarderConfig {
    /// Kafka topic for frames. Default `frames`.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Largest frame sent; larger ones are refused before produce and counted. Must not
    /// exceed the topic's / broker's `max.message.bytes`. Default 1 MiB (Kafka's default).
    #[serde(default = "default_max_message")]
    pub max_message_bytes: ByteSize,
    /// Memory librdkafka may hold for frames not yet acknowledged; beyond it frames are
    /// spooled. Default 32 MiB.
    #[serde(default = "default_queue")]
    pub queue_max_bytes: ByteSize,
    /// librdkafka's delivery timeout; a frame not acknowledged in time is spooled (not lost).
    /// Default 30000.
    #[serde(default = "default_timeout")]
    pub message_timeout_ms: u64,
    /// A frame unacknowledged this long is copied to the spool at once instead of waiting in
    /// memory for `message_timeout_ms`; with no acknowledgement at all for this long the link
    /// is judged stalled (down). Catches links that drop packets silently, which librdkafka
    /// notices only at its timeouts. Below `message_timeout_ms`; 0 turns it off. Default 5000.
    #[serde(default = "default_stall_timeout")]
    pub stall_timeout_ms: u64,
    /// librdkafka `linger.ms`. Default 5.
    #[serde(default = "default_linger")]
    pub linger_ms: u64,
    /// New frames first, spool back-filled beside them. Default false (strict per-camera order).
    #[serde(default)]
    pub live_first: bool,
    /// With `live_first`: spooled frames sent per second. Default 10.
    #[serde(default = "default_backfill")]
    pub backfill_fps: f64,
    /// Spooled frames in flight at once while draining. Default 32.
    #[serde(default = "default_drain_window")]
    pub drain_window: usize,
    /// Bytes of spooled frames in flight at once while draining (the first frame goes whatever
    /// its size). librdkafka's idempotent producer sends at most 5 requests of up to 1 MB
    /// (`batch.size`) at a time; frames beyond those wait in its queue while its broker thread
    /// polls without sleeping until a request completes (librdkafka 2.12.1: 580 µs of CPU per
    /// 1080p frame instead of 60–100). Requests are not always full: 2 MiB stayed clear of
    /// that where 4 MiB did not. Default 2 MiB.
    #[serde(default = "default_drain_window_bytes")]
    pub drain_window_bytes: ByteSize,
    /// First retry delay after a failed drain attempt; doubles to `retry_max_ms`, ±25 % jitter.
    /// Default 500.
    #[serde(default = "default_retry_min")]
    pub retry_min_ms: u64,
    /// Default 15000.
    #[serde(default = "default_retry_max")]
    pub retry_max_ms: u64,
}

fn default_topic() -> String {
    framelink_common::wire::defaults::FRAMES_TOPIC.into()
}
fn default_max_message() -> ByteSize {
    ByteSize::mib(1)
}
fn default_queue() -> ByteSize {
    ByteSize::mib(32)
}
fn default_timeout() -> u64 {
    30_000
}
fn default_stall_timeout() -> u64 {
    5_000
}
fn default_linger() -> u64 {
    5
}
fn default_backfill() -> f64 {
    10.0
}
fn default_drain_window() -> usize {
    32
}
fn default_drain_window_bytes() -> ByteSize {
    ByteSize::mib(2)
}
fn default_retry_min() -> u64 {
    500
}
fn default_retry_max() -> u64 {
    15_000
}

impl Default for ForwarderConfig {
    fn default() -> Self {
        crate::config::defaults("forwarder")
    }
}

impl ForwarderConfig {
    pub fn validate(&self) -> Result<()> {
        use anyhow::bail;
        if self.topic.is_empty() {
            bail!("config key `forwarder.topic`: must not be empty");
        }
        if self.max_message_bytes.as_u64() < 1024 || self.max_message_bytes.as_u64() > 1_000_000_000 {
            bail!("config key `forwarder.max_message_bytes`: {} is not from 1 KiB to 1 GB", self.max_message_bytes);
        }
        if self.queue_max_bytes.as_u64() < self.max_message_bytes.as_u64() {
            bail!("config key `forwarder.queue_max_bytes`: must be at least `max_message_bytes`");
        }
        if self.message_timeout_ms < 1000 {
            bail!("config key `forwarder.message_timeout_ms`: must be at least 1000");
        }
        if self.stall_timeout_ms != 0 && !(200..self.message_timeout_ms).contains(&self.stall_timeout_ms) {
            bail!("config key `forwarder.stall_timeout_ms`: must be 0 (off) or from 200 to below `message_timeout_ms` ({})", self.message_timeout_ms);
        }
        if self.drain_window == 0 {
            bail!("config key `forwarder.drain_window`: must be at least 1");
        }
        if self.drain_window_bytes.as_u64() < 1024 {
            bail!("config key `forwarder.drain_window_bytes`: {} is below 1 KiB", self.drain_window_bytes);
        }
        // Written so that NaN fails too.
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        if !(self.backfill_fps > 0.0) {
            bail!("config key `forwarder.backfill_fps`: must be above 0");
        }
        if self.retry_min_ms == 0 || self.retry_max_ms < self.retry_min_ms {
            bail!("config key `forwarder.retry_max_ms`: must be ≥ `retry_min_ms` ≥ 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(toml: &str) -> Result<()> {
        framelink_common::config_file::from_toml_str::<ForwarderConfig>(toml)?.validate()
    }

    #[test]
    fn stall_timeout_is_off_or_below_the_message_timeout() {
        with("").unwrap();
        with("stall_timeout_ms = 0").unwrap();
        with("message_timeout_ms = 10000\nstall_timeout_ms = 9999").unwrap();
        for bad in ["message_timeout_ms = 10000\nstall_timeout_ms = 10000", "stall_timeout_ms = 100"] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains("`forwarder.stall_timeout_ms`"), "{e}");
        }
    }
}
