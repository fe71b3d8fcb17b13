//! The spool: frames that could not be delivered yet, on local disk, bounded in bytes.
//!
//! Frames enter the spool only when the link is down or slow (delivery failed or timed out,
//! the producer's memory queue is full, or older frames are still waiting): a healthy link
//! writes no frame to disk, which spares the flash. A frame leaves the spool after Kafka
//! acknowledged it, or when the full policy evicts it.
//!
//! # On disk
//! [`sled_spool::SledSpool`] keeps one file per frame under `<dir>/frames/`, each holding the
//! whole record with a CRC-32 (see [`record`]), and a sled index of those files. The files are
//! the truth and the index a cache: every open indexes any valid frame file the index lacks,
//! so a crash, a lost index or a rebuild cut short loses no frame. A file that holds no valid
//! record is moved to `<dir>/damaged/` and counted, never deleted silently. sled 0.34 neither
//! bounds its files nor gives space back after deletes, which is why frames are not stored in
//! sled (see [`sled_spool`]).
//!
//! # Bounded disk use
//! `max_bytes` bounds what the spool directory occupies on disk: the real allocation
//! (`st_blocks × 512`) of every file in it — frame files, the index, `damaged/` (held to a
//! share of the cap, [`sled_spool::DAMAGED_SHARE`]) and the agent's other files there — not
//! the payload bytes. A frame file's space is given back as soon as it is deleted (a delivered frame's
//! file on a thread of its own, which the cap waits for before it evicts); the index
//! is replaced by a fresh one when the spool empties. When a new frame does not fit,
//! `drop_oldest` evicts the frames that arrived first (arrival order in the spool, not capture
//! time, so a clock step changes nothing), `drop_newest` refuses the new frame, and
//! `decimate` thins new frames past a threshold. The disk's free space binds too: the spool
//! is full once its filesystem has less than `min_free_bytes` free, even below `max_bytes`
//! (the same policy applies; a frame refused only for the disk is `spool_disk_full`). A frame that would not fit even with every
//! frame evicted is refused and evicts nothing; a frame already spooled (same camera and
//! sequence number) is kept once and drops nothing.
//!
//! # Order
//! Keys are `camera \0 seq(be)`, so reads return each camera's frames in sequence order.
//!
//! # Crash safety
//! A frame file is written under a temporary name and renamed, then indexed; every
//! `flush_interval_ms` (and at shutdown) the new files, their directory and the index are
//! flushed. A SIGKILL or power cut loses at most the frames of that window whose files had
//! not reached the disk. A damaged record is skipped, counted and logged; an index sled cannot
//! open is set aside and rebuilt from the files. Damage never stops the agent from starting.
//!
//! # One agent per spool
//! While open, the spool holds an exclusive lock on `<dir>/lock`, which holds its pid: a
//! second agent on the same directory refuses to start with an error naming the directory and
//! that pid, and changes nothing.

mod deleter;
#[cfg(test)]
mod model_tests;
pub mod record;
pub mod sled_spool;

use std::path::PathBuf;

use bytesize::ByteSize;
use serde::Deserialize;

use crate::frame::Frame;
pub use record::SpoolKey;

/// What to do when a new frame does not fit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FullPolicy {
    /// Delete the frames that arrived first to make room. Default.
    #[default]
    DropOldest,
    /// Refuse new frames; keep the oldest.
    DropNewest,
    /// Past `decimate_from` of the cap, keep only 1 in `decimate_keep_one_in` new frames per
    /// camera (by sequence number), so a long outage is covered at a lower frame rate; when
    /// full, evict as `drop_oldest`.
    Decimate,
}

/// `[spool]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Directory of the spool. Default `/var/lib/framelink/spool` (systemd StateDirectory).
    #[serde(default = "default_dir")]
    pub dir: PathBuf,
    /// Disk space the spool may occupy, e.g. `"1 GiB"`, `"200 MB"` or a byte count. Default 1 GiB.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: ByteSize,
    /// `drop_oldest` (default), `drop_newest` or `decimate`.
    #[serde(default)]
    pub when_full: FullPolicy,
    /// For `decimate`: keep 1 frame in N. Default 10.
    #[serde(default = "default_keep_one_in")]
    pub decimate_keep_one_in: u32,
    /// For `decimate`: start thinning at this fraction of `max_bytes`. Default 0.5.
    #[serde(default = "default_decimate_from")]
    pub decimate_from: f64,
    /// Accepted and validated (1 to 64), not used by the spool: it has one index. Default 8.
    #[serde(default = "default_generations")]
    pub generations: u32,
    /// How often spooled frames are flushed to disk (the crash-loss window). Default 200 ms.
    #[serde(default = "default_flush_ms")]
    pub flush_interval_ms: u64,
    /// sled page cache of the index. Default 4 MiB (sled's default is 1 GiB).
    #[serde(default = "default_cache")]
    pub cache: ByteSize,
    /// Free space the spool leaves on its filesystem: below it the spool is full even under
    /// `max_bytes` (the full policy applies), so neither the spool nor the rest of the system
    /// runs the disk out of space. Default 64 MiB.
    #[serde(default = "default_min_free")]
    pub min_free_bytes: ByteSize,
}

fn default_dir() -> PathBuf {
    PathBuf::from("/var/lib/framelink/spool")
}
fn default_max_bytes() -> ByteSize {
    ByteSize::gib(1)
}
fn default_keep_one_in() -> u32 {
    10
}
fn default_decimate_from() -> f64 {
    0.5
}
fn default_generations() -> u32 {
    8
}
fn default_flush_ms() -> u64 {
    200
}
fn default_cache() -> ByteSize {
    ByteSize::mib(4)
}
fn default_min_free() -> ByteSize {
    ByteSize::mib(64)
}

impl Default for SpoolConfig {
    fn default() -> Self {
        crate::defaults::section("spool")
    }
}

impl SpoolConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::bail;
        if self.max_bytes.as_u64() < 4 * 1024 * 1024 {
            bail!("config key `spool.max_bytes`: {} is below the minimum of 4 MiB", self.max_bytes);
        }
        if !(1..=64).contains(&self.generations) {
            bail!("config key `spool.generations`: {} is not from 1 to 64", self.generations);
        }
        if self.decimate_keep_one_in < 2 {
            bail!("config key `spool.decimate_keep_one_in`: must be at least 2");
        }
        if !(0.0..=1.0).contains(&self.decimate_from) {
            bail!("config key `spool.decimate_from`: must be a fraction from 0 to 1");
        }
        if self.flush_interval_ms == 0 || self.flush_interval_ms > 60_000 {
            bail!("config key `spool.flush_interval_ms`: must be from 1 to 60000");
        }
        Ok(())
    }
}

/// Why a frame left the spool without being delivered: [`DropReason::FullOldest`],
/// [`DropReason::FullNewest`], [`DropReason::Decimated`] or [`DropReason::DiskFull`].
pub use crate::drop_reason::DropReason;

/// What happened to a pushed frame and to frames evicted for it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PushOutcome {
    /// The pushed frame is in the spool.
    pub stored: bool,
    /// Why the pushed frame was not stored ([`DropReason::FullNewest`],
    /// [`DropReason::Decimated`] or [`DropReason::DiskFull`]); `None` when stored.
    pub refused: Option<DropReason>,
    /// Records evicted to make room for it, oldest arrival first ([`DropReason::FullOldest`]).
    /// The caller counts them: a record whose frame is being sent right now (a copy of a frame
    /// librdkafka still holds, or a spooled frame in flight) is lost only if that send fails.
    pub evicted: Vec<SpoolKey>,
}

/// A record read back from the spool: the frame, or why it is damaged.
pub type SpoolRead = (SpoolKey, Result<Frame, String>);

/// Counts and sizes, for metrics and health.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpoolStats {
    pub records: u64,
    /// Real allocation of the files under the spool directory, as last measured plus writes
    /// and deletions since.
    pub disk_bytes: u64,
    /// Damaged frame files, index entries and indexes found since the spool was opened.
    pub damaged: u64,
    /// Damaged files deleted from `damaged/` to keep it within its share of the cap.
    pub damaged_pruned: u64,
    /// The cap in force at the last push: `max_bytes`, or less when the disk's free space
    /// (minus `min_free_bytes`) binds.
    pub cap_bytes: u64,
    /// Indexes rebuilt from the frame files while running (after sled refused every write).
    pub index_rebuilt: u64,
}

/// How much one read may return: at most `records` records whose files add up to at most
/// `bytes` — except that with `at_least_one` the first record comes whatever its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadLimit {
    pub records: usize,
    pub bytes: u64,
    pub at_least_one: bool,
}

impl ReadLimit {
    /// At most `n` records, of any size.
    pub fn records(n: usize) -> Self {
        Self { records: n, bytes: u64::MAX, at_least_one: true }
    }

    /// Whether a record of `size` bytes still fits after `taken` records of `taken_bytes`.
    pub fn fits(&self, taken: usize, taken_bytes: u64, size: u64) -> bool {
        taken < self.records && ((taken == 0 && self.at_least_one) || taken_bytes.saturating_add(size) <= self.bytes)
    }
}

/// A bounded, crash-safe store of undelivered frames.
pub trait Spool: Send + Sync {
    /// Stores a frame, applying the full policy.
    fn push(&self, frame: &Frame) -> anyhow::Result<PushOutcome>;
    /// Up to `max` records with keys after `after` (all when `None`), in key order. A record
    /// whose file is damaged is returned as an error (its file moved to `damaged/`); the
    /// caller counts it with `note_damaged` and removes it.
    fn read_after(&self, after: Option<&SpoolKey>, max: usize) -> anyhow::Result<Vec<SpoolRead>> {
        self.read_after_skipping(after, ReadLimit::records(max), &|_| false)
    }
    /// As [`Spool::read_after`] within `limit`, passing over the records `skip` names (frames
    /// the forwarder already holds): their files are not read and they count toward no limit.
    /// The drain reads one frame per acknowledgement while a window of others is in flight;
    /// without this it read the whole window's files again each time (32 reads per frame sent).
    fn read_after_skipping(&self, after: Option<&SpoolKey>, limit: ReadLimit, skip: &dyn Fn(&SpoolKey) -> bool) -> anyhow::Result<Vec<SpoolRead>>;
    /// Deletes a delivered (or damaged) record; false if it was not there.
    fn remove(&self, key: &SpoolKey) -> anyhow::Result<bool>;
    /// Flushes to disk and re-measures disk use.
    fn flush(&self) -> anyhow::Result<()>;
    /// Checks that the spool's disk takes a write again (after an I/O error): writes, syncs and
    /// deletes a small file.
    fn probe(&self) -> anyhow::Result<()>;
    /// Counts a damaged record found while reading (the caller removes it).
    fn note_damaged(&self);
    fn stats(&self) -> SpoolStats;
    /// `stats().records` alone, without measuring the disk (the drain asks after every read).
    fn records(&self) -> u64;
}
