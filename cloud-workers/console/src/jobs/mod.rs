//! Large-image jobs: an uploaded image is cut into tiles with a halo
//! ([`framelink_common::tiling`]), the tiles go to the workers through Kafka, and the processed
//! cores are stitched here into a result bit-identical to running the pipeline on the whole
//! image.
//!
//! ```text
//! POST /api/jobs ─► decode ─► plan ─► jobs topic (record: queuing) ─► tiles topic ─► record: running
//!                                                                        │ workers (group)
//! GET …/result ◄─ stitched ◄─ results reader ◄─ tile-results topic ◄─────┘
//! ```
//!
//! Nothing lives only in memory: a job's state is on the compacted jobs topic and its tiles'
//! results on the tile-results topic, so a restarted console reads the jobs back, then the
//! results from where each job's results began, and carries on. Duplicates (at-least-once
//! workers) are counted and ignored. A job expires `expire_after_s` after it was created: its
//! memory is freed and a tombstone replaces its record (workers then skip its remaining tiles).

pub mod api;
pub mod image_io;
pub mod kafka;
pub mod state;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, bail};
use framelink_common::shutdown::Shutdown;
use framelink_common::tile_wire::JobStatus;
use framelink_common::wire;
use serde::Deserialize;

/// `[jobs]`: the large-image job API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    /// Serve `/api/jobs` (and create the jobs' topics when missing). Default true.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Tiles for the workers. Default `framelink.tiles`.
    #[serde(default = "default_tiles")]
    pub tiles_topic: String,
    /// Processed tiles from the workers. Default `framelink.tiles.results`.
    #[serde(default = "default_results")]
    pub results_topic: String,
    /// Each job's state (compacted). Default `framelink.jobs`.
    #[serde(default = "default_jobs")]
    pub jobs_topic: String,
    /// Partitions of the tiles and tile-results topics when the console creates them (the
    /// most workers that share a job). Default 12.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Largest upload accepted, bytes. Default 1 GiB.
    #[serde(default = "default_upload")]
    pub max_upload_bytes: u64,
    /// Largest image accepted, pixels (checked from the file's header before decoding).
    /// Default 268 435 456 (16384x16384).
    #[serde(default = "default_pixels")]
    pub max_pixels: u64,
    /// Memory for the results of jobs held at once (their stitched images), bytes; an upload
    /// that would go above it is refused with 503 until jobs expire. Default 4 GiB.
    #[serde(default = "default_held")]
    pub max_held_bytes: u64,
    /// Tile size when the upload does not say. Default 512.
    #[serde(default = "default_tile")]
    pub default_tile: u32,
    /// The largest tile record (pixels + headers); keep it under the tiles topic's
    /// `max.message.bytes` (Kafka's default 1 048 588). Default 1 000 000.
    #[serde(default = "default_record")]
    pub max_record_bytes: u64,
    /// A job (its status and result) is forgotten this long after it was created, seconds.
    /// Default 3600.
    #[serde(default = "default_expire")]
    pub expire_after_s: u64,
}

fn yes() -> bool {
    true
}
fn default_tiles() -> String {
    wire::defaults::TILES_TOPIC.into()
}
fn default_results() -> String {
    wire::defaults::TILE_RESULTS_TOPIC.into()
}
fn default_jobs() -> String {
    wire::defaults::JOBS_TOPIC.into()
}
fn default_partitions() -> i32 {
    12
}
fn default_upload() -> u64 {
    1 << 30
}
fn default_pixels() -> u64 {
    16384 * 16384
}
fn default_held() -> u64 {
    4 << 30
}
fn default_tile() -> u32 {
    512
}
fn default_record() -> u64 {
    1_000_000
}
fn default_expire() -> u64 {
    3600
}

impl Default for JobsConfig {
    fn default() -> Self {
        framelink_common::config_file::from_toml_str("").expect("defaults")
    }
}

impl JobsConfig {
    pub fn validate(&self) -> Result<()> {
        for (key, topic) in [("jobs.tiles_topic", &self.tiles_topic), ("jobs.results_topic", &self.results_topic), ("jobs.jobs_topic", &self.jobs_topic)] {
            if topic.trim().is_empty() {
                bail!("config key `{key}`: must not be empty");
            }
        }
        if self.tiles_topic == self.results_topic || self.tiles_topic == self.jobs_topic || self.results_topic == self.jobs_topic {
            bail!("config keys `jobs.tiles_topic`, `jobs.results_topic`, `jobs.jobs_topic`: must be three different topics");
        }
        if !(1..=1000).contains(&self.partitions) {
            bail!("config key `jobs.partitions`: {} is not from 1 to 1000", self.partitions);
        }
        if !(16..=8192).contains(&self.default_tile) {
            bail!("config key `jobs.default_tile`: {} is not from 16 to 8192", self.default_tile);
        }
        if self.max_record_bytes < 64 * 1024 {
            bail!("config key `jobs.max_record_bytes`: {} is below 65536 (not even a 128x128 tile fits)", self.max_record_bytes);
        }
        if self.max_pixels == 0 || self.max_upload_bytes == 0 || self.max_held_bytes == 0 {
            bail!("config keys `jobs.max_pixels`, `jobs.max_upload_bytes`, `jobs.max_held_bytes`: must be at least 1");
        }
        if self.expire_after_s < 60 {
            bail!("config key `jobs.expire_after_s`: {} is below 60", self.expire_after_s);
        }
        Ok(())
    }
}

/// The jobs' reader thread: creates the topics, reads the jobs back, fails those a restart
/// interrupted while queuing, then stitches tile results until `shutdown`. Kafka calls that
/// are async run on `rt`.
pub fn run_reader(kafka: Arc<kafka::JobsKafka>, jobs: Arc<Mutex<state::Jobs>>, shutdown: Shutdown, rt: tokio::runtime::Handle) {
    rt.block_on(kafka.ensure_topics());
    loop {
        match kafka.restore(&jobs, &shutdown) {
            Ok(n) => {
                tracing::info!(records = n, jobs = jobs.lock().expect("jobs lock").len(), "Jobs read back from Kafka.");
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "Cannot read the jobs back from Kafka yet; retrying (the job API answers 503 meanwhile).");
                if shutdown.wait_timeout(Duration::from_secs(2)) {
                    return;
                }
            }
        }
    }
    let now = framelink_common::heartbeat::now_ms();
    // Jobs that expired while the console was away go first (their results are not re-read).
    let expired = jobs.lock().expect("jobs lock").expire(now, kafka.cfg.expire_after_s * 1000);
    for id in &expired {
        tracing::info!(job = id, "Job expired.");
        rt.block_on(api::write_logged(&kafka, &jobs, id));
    }
    let lost: Vec<String> = {
        let mut j = jobs.lock().expect("jobs lock");
        let ids: Vec<String> = j.list_ids().into_iter().filter(|id| j.get(id).is_some_and(|x| x.record.status == JobStatus::Queuing)).collect();
        ids.into_iter().filter(|id| j.end(id, JobStatus::Failed, "the console stopped before every tile was queued; upload the image again".into(), now).is_some()).collect()
    };
    for id in &lost {
        tracing::warn!(job = id, "A job the console was still queuing when it stopped: failed.");
        rt.block_on(api::write_logged(&kafka, &jobs, id));
    }
    let (k, j, h) = (kafka.clone(), jobs.clone(), rt.clone());
    let finish = move |id: String| {
        let (k, j) = (k.clone(), j.clone());
        h.spawn(async move { api::write_logged(&k, &j, &id).await });
    };
    let j = jobs.clone();
    let ready = move || j.lock().expect("jobs lock").restored = true;
    if let Err(e) = kafka.read_results(&jobs, &shutdown, &finish, &ready) {
        panic!("reading tile results failed: {e:#}");
    }
}
