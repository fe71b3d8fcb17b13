//! The spool on disk: one file per frame, and a sled index of the files.
//!
//! ```text
//! <spool.dir>/lock        the spool lock (flock); holds the pid of the agent that has it
//! <spool.dir>/frames/     f<file id, 16 hex digits>: one record (see `record`), CRC-checked;
//!                         f<id>.tmp while it is being written
//! <spool.dir>/index-N/    sled: tree `frames`      key (camera \0 seq) -> file id, record size (u64 BE)
//!                               tree `by_arrival`  file id (u64 BE) -> key (eviction order)
//! <spool.dir>/damaged/    files that hold no valid record, kept for inspection
//! ```
//!
//! # Why not the frames inside sled
//! Measured with `cargo run --example sled_probe` (100 values of 200 KB, sled 0.34.7, LowSpace,
//! 4 MiB cache): sled occupied 2.8× the data with 512 KiB segments, 1.7× with 1 MiB, 2.4–3.1×
//! with 2–8 MiB, and *more* after deleting everything (e.g. 55.9 → 62.5 MB). A leaf node
//! holding several large values is rewritten whole (as a blob) on every insert, and old copies
//! stay until sled's GC gets to them. A byte cap cannot be kept on top of that. So sled keeps
//! only the small index (its space use is then a few MiB at most, and the index is recreated
//! when the spool empties), and frame bytes live in plain files that leave with their record:
//! disk use is known exactly (allocated blocks) and given back at once.
//!
//! # The files are the truth, the index a cache
//! A frame file carries the whole record (camera, sequence number, all metadata), so the index
//! can always be recreated from the files, and `open` never deletes a frame file. Every `open`
//! lists `frames/` and reads each file the index does not reference: a valid record is indexed
//! again (a frame not yet acknowledged: delivering it twice is possible, losing it is not);
//! anything else goes to `damaged/`. An index that lost entries (a crash before its flush) or
//! a rebuild cut short (a crash, a kill, a failed start) is thus completed at the next open.
//! If sled cannot open the index at all, it is set aside as `index.damaged` (counted as
//! damaged), a fresh index is filled from the files the same way, and `index.damaged` is
//! deleted once the new index is flushed. `by_arrival` is recreated from `frames` at every
//! open. Older `index-N` directories (left by a crash while the index was being replaced) are
//! deleted: they only point at files.
//!
//! # Writing a frame, and crashes
//! `push` writes the record to `f<id>.tmp`, renames it to `f<id>` and then adds the index
//! entry, so after a crash of the process a file named `f<id>` was written whole. Not after a
//! power cut: the rename can reach the disk before the file's data (ext4 allocates the blocks
//! later, at writeback), so a frame pushed after the last flush can come back as an empty or
//! short `f<id>`, which `open` moves to `damaged/` and counts like any other damaged file
//! (seen in tests/vm/powercut). `flush()` — every `flush_interval_ms` and at shutdown — fsyncs
//! the new files and their directory, then flushes sled (sled's own timer is off), and logs at
//! debug level which frames it made durable ("Spool flushed: these frames are on disk.", one
//! line per flush that had new frames). sled 0.34's flush writes its log with
//! `sync_file_range`, which does not flush the disk's write cache: tests/vm/powercut found the
//! index lacking the entries of the last flush after every cut (`open` restored them from the
//! files; a lost *deletion* would have sent a delivered frame again), so `flush()` fsyncs the
//! index's files and directory after sled's flush. Deletions of delivered frames make the next
//! flush due like writes do. A crash (SIGKILL, power cut) loses at most the frames
//! pushed since the last flush whose files had not reached the disk; every frame file that did
//! comes back at the next open. A left-over `f<id>.tmp` is the write of a frame whose `push`
//! never returned: if it holds a valid record it is renamed to `f<id>` and indexed like any
//! other file; if not (the write was cut short) it is moved to `damaged/`, not deleted.
//!
//! # Damaged files
//! A file that is cut short, fails its CRC, cannot be parsed, is a second copy of a frame
//! already indexed, holds another frame than its index entry names, or does not have a
//! frame file's name is moved to `damaged/` (a name already there gets a `.N` suffix) and
//! counted in [`SpoolStats::damaged`]. `open` finds those the index does not reference;
//! `read_after` finds those it does — frame files the index references are checked when read,
//! not at open: it moves the file and reports the record as damaged, and the caller counts it
//! ([`Spool::note_damaged`]) and removes the index entry. An entry whose file is missing is
//! reported the same way. `damaged/` counts towards `max_bytes`; so that damaged files cannot
//! crowd out frames, it is held to `max_bytes /` [`DAMAGED_SHARE`]: past that its oldest files
//! (by modification time) are deleted, with a warning giving their number.
//!
//! # One agent per spool
//! `open` takes an exclusive `flock` on `<spool.dir>/lock` before it looks at anything else in
//! the directory, writes its pid into the file, and holds the lock until the spool is dropped
//! (after the index is closed). A second opener — another agent, or a second open in the same
//! process, since the lock belongs to the open file — fails with "spool directory <dir> is in
//! use by another framelink-agent (pid N)" and changes nothing. sled failing to take its own
//! lock on the index (a process that skipped the spool lock) is likewise an error ("… is in
//! use by another process"), never damage.
//!
//! # Eviction order
//! `drop_oldest` evicts in order of arrival in the spool: file ids only grow (at open the next
//! id follows the highest among the files, temporary ones included, and the index entries),
//! and `by_arrival` is ordered by them. Capture times play no part, so a clock step does not
//! change what is evicted.
//!
//! # Disk accounting
//! [`SpoolStats::disk_bytes`] is the real allocation (`st_blocks × 512`) of every file under
//! the spool directory: the frame files (measured at open; then each one stat'ed after it is
//! written, again after its fsync — delayed allocation can change it — and before it is
//! deleted), the index, `damaged/`, the lock, and whatever else lies there, such as the
//! agent's sequence files (measured at open and at every flush). Directories themselves are
//! not counted. Whether a new frame fits is judged before it is written, from its length
//! rounded up to 4 KiB.
//!
//! # Deleting delivered frames
//! `remove` (a frame Kafka acknowledged) takes the record out of the index at once and queues
//! its file for the spool's deleting thread ([`super::deleter`]): an `unlink` costs hundreds of
//! microseconds on some disks, time the forwarder's thread needs while it drains. The queued
//! files stay counted until deleted; a push that would be refused, evict or be decimated, a
//! flush, `stats` and an index rebuild first wait for the queue to empty, so no frame is
//! evicted for space that is about to come back. Evicting (`drop_oldest`) deletes on the
//! caller's thread.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

use super::deleter::Deleter;
use super::record::{self, SpoolKey};
use super::{DropReason, FullPolicy, PushOutcome, ReadLimit, Spool, SpoolConfig, SpoolRead, SpoolStats};
use crate::frame::Frame;

/// `damaged/` may occupy at most `max_bytes / DAMAGED_SHARE`; past that its oldest files are
/// deleted.
pub const DAMAGED_SHARE: u64 = 8;

/// Disk space a record of `len` bytes is expected to take (whole 4 KiB blocks), only to judge
/// whether it fits before it is written; what is counted afterwards is its real allocation.
fn predicted(len: u64) -> u64 {
    len.div_ceil(4096) * 4096
}

/// Real allocation of a file: `st_blocks × 512`.
fn allocation(md: &std::fs::Metadata) -> u64 {
    md.blocks() * 512
}

/// Real allocation of the file at `path`; 0 if there is none.
fn allocation_at(path: &Path) -> u64 {
    std::fs::symlink_metadata(path).map_or(0, |md| allocation(&md))
}

/// Real allocation (`st_blocks × 512`) of every file under `dir`; directories themselves are
/// not counted.
pub fn disk_usage(dir: &Path) -> u64 {
    usage_except(dir, &[])
}

/// [`disk_usage`] of `dir` leaving out the directories `skip`.
fn usage_except(dir: &Path, skip: &[&Path]) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                let path = e.path();
                if !skip.contains(&path.as_path()) {
                    stack.push(path);
                }
            } else {
                total += allocation(&md);
            }
        }
    }
    total
}

/// Deletes the oldest files (by modification time) of `<dir>/damaged/` while it holds more
/// than `limit` bytes, with a warning; returns the bytes freed.
/// Returns (files deleted, bytes freed).
fn prune_damaged(dir: &Path, limit: u64) -> (u64, u64) {
    let Ok(entries) = std::fs::read_dir(dir.join("damaged")) else { return (0, 0) };
    let mut files: Vec<_> = entries
        .flatten()
        .filter_map(|e| {
            let md = e.metadata().ok()?;
            md.is_file().then(|| (md.modified().unwrap_or(std::time::UNIX_EPOCH), e.path(), allocation(&md)))
        })
        .collect();
    let mut total: u64 = files.iter().map(|f| f.2).sum();
    if total <= limit {
        return (0, 0);
    }
    files.sort();
    let (mut deleted, mut freed) = (0, 0);
    for (_, path, bytes) in files {
        if total <= limit {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            total -= bytes;
            freed += bytes;
            deleted += 1;
        }
    }
    tracing::warn!(files = deleted, bytes = freed, limit, "The spool's damaged/ outgrew its share of max_bytes: its oldest files were deleted (counted in damaged_pruned).");
    (deleted, freed)
}

/// How long opening the spool waits for sled's lock on the index (see
/// [`SledSpool::open_index_waiting`]): sled's threads can hold it for seconds after a close on
/// a loaded machine (2 s was once too short in CI); only a foreign holder waits it out.
const SLED_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The spool lock: an exclusive `flock` on `<dir>/lock`, held while the file is open.
struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock and writes this process's pid into the file; if another opener holds
    /// it, fails naming the directory and the pid found there, and changes nothing.
    fn acquire(dir: &Path) -> Result<Self> {
        use fs2::FileExt;
        let path = dir.join("lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening the spool lock {}", path.display()))?;
        if let Err(e) = file.try_lock_exclusive() {
            if e.raw_os_error() == fs2::lock_contended_error().raw_os_error() {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = match pid.trim() {
                    "" => "unknown",
                    p => p,
                };
                bail!("spool directory {} is in use by another framelink-agent (pid {pid})", dir.display());
            }
            return Err(e).with_context(|| format!("locking the spool {}", path.display()));
        }
        file.set_len(0)
            .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
            .with_context(|| format!("writing the spool lock {}", path.display()))?;
        Ok(Self { _file: file })
    }
}

/// Whether opening sled failed because another process holds sled's own lock on the index:
/// not damage.
fn is_sled_lock_error(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        let io = match cause.downcast_ref::<sled::Error>() {
            Some(sled::Error::Io(io)) => Some(io),
            _ => cause.downcast_ref::<std::io::Error>(),
        };
        io.is_some_and(|io| io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("could not acquire lock"))
    })
}

/// Whether `e` comes from a full disk (ENOSPC), directly or through sled.
fn is_disk_full(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        let io = match cause.downcast_ref::<sled::Error>() {
            Some(sled::Error::Io(io)) => Some(io),
            _ => cause.downcast_ref::<std::io::Error>(),
        };
        io.is_some_and(|io| io.kind() == std::io::ErrorKind::StorageFull || io.raw_os_error() == Some(28))
    })
}

/// Whether sled itself returned `e` (as opposed to a file of the spool).
fn is_sled_error(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| cause.downcast_ref::<sled::Error>().is_some())
}

/// A key in sled's default tree that [`SledSpool::probe`] writes, to see whether the index
/// takes writes.
const PROBE_KEY: &[u8] = b"probe";

/// Moves a file that holds no valid record to `<dir>/damaged/` (a name already there gets a
/// `.N` suffix); false (logged) if it cannot.
fn move_to_damaged(dir: &Path, path: &Path, why: &str) -> bool {
    let to_dir = dir.join("damaged");
    let name = path.file_name().map_or_else(|| "unnamed".to_owned(), |n| n.to_string_lossy().into_owned());
    let mut to = to_dir.join(&name);
    let mut n = 1;
    while to.exists() {
        to = to_dir.join(format!("{name}.{n}"));
        n += 1;
    }
    match std::fs::create_dir_all(&to_dir).and_then(|()| std::fs::rename(path, &to)) {
        Ok(()) => {
            tracing::error!(file = %path.display(), moved_to = %to.display(), reason = why, "Damaged spool file moved aside.");
            true
        }
        Err(e) => {
            tracing::error!(file = %path.display(), reason = why, error = %e, "Damaged spool file left in place: cannot move it aside.");
            false
        }
    }
}

/// Suffix of a frame file being written.
const TMP_SUFFIX: &str = ".tmp";

/// `f<16 hex digits>`, or the same with [`TMP_SUFFIX`]: (file id, is a temporary file).
fn parse_file_name(name: &std::ffi::OsStr) -> Option<(u64, bool)> {
    let name = name.to_str()?.strip_prefix('f')?;
    let (hex, tmp) = match name.strip_suffix(TMP_SUFFIX) {
        Some(hex) => (hex, true),
        None => (name, false),
    };
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((u64::from_str_radix(hex, 16).ok()?, tmp))
}

/// `camera:first-last,n …` for `keys`, each camera's sequence numbers as sorted ranges.
fn seq_ranges(keys: &[&SpoolKey]) -> String {
    let mut by_camera: std::collections::BTreeMap<&str, Vec<u64>> = std::collections::BTreeMap::new();
    for key in keys {
        if let Some((camera, seq)) = key.parts() {
            by_camera.entry(camera).or_default().push(seq);
        }
    }
    let mut out = Vec::new();
    for (camera, mut seqs) in by_camera {
        seqs.sort_unstable();
        seqs.dedup();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for seq in seqs {
            match ranges.last_mut() {
                Some(r) if r.1 + 1 == seq => r.1 = seq,
                _ => ranges.push((seq, seq)),
            }
        }
        let ranges: Vec<String> = ranges.iter().map(|&(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") }).collect();
        out.push(format!("{camera}:{}", ranges.join(",")));
    }
    out.join(" ")
}

/// What `open` found while making the index cover the frame files.
#[derive(Default)]
struct Reconciled {
    records: u64,
    next_file: u64,
    /// Files indexed again.
    reindexed: u64,
    /// Files moved to `damaged/`.
    damaged: u64,
}

struct Index {
    db: sled::Db,
    frames: sled::Tree,
    by_arrival: sled::Tree,
}

struct Inner {
    index: Index,
    /// The index lives in `index-<gen>`; a new generation replaces it when the spool empties.
    index_gen: u64,
    /// Id of the next frame file. Ids grow with arrival: at open the next id follows the
    /// highest among the files and the index entries, so they keep growing across restarts.
    next_file: u64,
    records: u64,
    /// Real allocation of the frame files: measured at open, then each file's as stat'ed
    /// after writing, again after its fsync, and before deletion.
    file_bytes: u64,
    /// Bytes the index occupied at the last flush.
    index_bytes: u64,
    /// Bytes of every other file under the spool directory (`damaged/`, the lock, the
    /// sequence files, …) at the last flush.
    other_bytes: u64,
    damaged: u64,
    /// Files of `damaged/` deleted to keep it within its share of the cap.
    damaged_pruned: u64,
    /// Files written since the last flush (to fsync), with the allocation counted for each
    /// and the frame each holds.
    unsynced: Vec<(PathBuf, u64, SpoolKey)>,
    /// The cap judged at the last push (see [`SledSpool::cap`]).
    cap: u64,
    /// Indexes rebuilt from the files while running (see [`SledSpool::rebuild_index`]).
    index_rebuilt: u64,
}

pub struct SledSpool {
    cfg: SpoolConfig,
    frames_dir: PathBuf,
    inner: Mutex<Inner>,
    /// Deletes delivered frames' files off the caller's thread (see [`super::deleter`]).
    deleter: Deleter,
    /// Dropped last: released only once the index is closed.
    _lock: DirLock,
}

/// Index value: file id, file size. (Entries written by earlier versions carry a capture
/// time after these 16 bytes; it is ignored.)
fn entry(file_id: u64, size: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&file_id.to_be_bytes());
    v[8..].copy_from_slice(&size.to_be_bytes());
    v
}

fn parse_entry(v: &[u8]) -> Option<(u64, u64)> {
    Some((u64::from_be_bytes(v.get(..8)?.try_into().ok()?), u64::from_be_bytes(v.get(8..16)?.try_into().ok()?)))
}

impl SledSpool {
    fn index_dir(&self, gen_: u64) -> PathBuf {
        self.cfg.dir.join(format!("index-{gen_}"))
    }

    fn file_path(frames_dir: &Path, id: u64) -> PathBuf {
        frames_dir.join(format!("f{id:016x}"))
    }

    fn tmp_path(frames_dir: &Path, id: u64) -> PathBuf {
        frames_dir.join(format!("f{id:016x}{TMP_SUFFIX}"))
    }

    /// [`Self::open_index`], waiting up to [`SLED_LOCK_WAIT`] while sled's own lock on the
    /// index is held. The caller holds the spool's [`DirLock`], so no other agent has the
    /// spool open: a sled lock still held is a spool of this process being closed — sled
    /// releases its lock when the last of its handles goes, which can be one of its background
    /// threads a moment after the `Db` was dropped (seen once as a failed reopen in a test).
    /// Anything else holding it (a tool that opened the index by hand) still fails the open.
    fn open_index_waiting(cfg: &SpoolConfig, dir: &Path) -> Result<Index> {
        let deadline = std::time::Instant::now() + SLED_LOCK_WAIT;
        loop {
            match Self::open_index(cfg, dir) {
                Err(e) if is_sled_lock_error(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                r => return r,
            }
        }
    }

    fn open_index(cfg: &SpoolConfig, dir: &Path) -> Result<Index> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::LowSpace)
            .cache_capacity(cfg.cache.as_u64())
            // Flushed by `flush()`, after the frame files it points to.
            .flush_every_ms(None)
            .open()
            .with_context(|| format!("opening the spool index {}", dir.display()))?;
        let frames = db.open_tree("frames")?;
        let by_arrival = db.open_tree("by_arrival")?;
        Ok(Index { db, frames, by_arrival })
    }

    /// Opens (or creates) the spool. Fails if another opener holds the spool directory, never
    /// on damaged contents: the index is completed (or rebuilt) from the frame files, and files
    /// that hold no valid record are moved to `damaged/`.
    pub fn open(cfg: SpoolConfig) -> Result<Self> {
        std::fs::create_dir_all(&cfg.dir).with_context(|| format!("spool directory {}", cfg.dir.display()))?;
        // Before anything else in the directory is looked at.
        let lock = DirLock::acquire(&cfg.dir)?;
        let frames_dir = cfg.dir.join("frames");
        std::fs::create_dir_all(&frames_dir).with_context(|| format!("spool directory {}", frames_dir.display()))?;
        // The newest index generation is the live one; older ones are leftovers of a crash
        // during replacement. An index only points at files: deleting one loses no frame.
        let mut gens: Vec<u64> = std::fs::read_dir(&cfg.dir)?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("index-")?.parse().ok())
            .collect();
        gens.sort_unstable();
        let index_gen = gens.pop().unwrap_or(0);
        for old in gens {
            let _ = std::fs::remove_dir_all(cfg.dir.join(format!("index-{old}")));
        }
        let index_dir = cfg.dir.join(format!("index-{index_gen}"));
        let aside = cfg.dir.join("index.damaged");
        let mut damaged = 0;
        let index = match Self::open_index_waiting(&cfg, &index_dir) {
            Ok(i) => i,
            Err(e) if is_sled_lock_error(&e) => {
                bail!("spool directory {} is in use by another process: {e:#}", cfg.dir.display())
            }
            // sled writes at open: a full disk is not a damaged index (setting it aside would
            // count damage and cost a rebuild for nothing).
            Err(e) if is_disk_full(&e) => {
                bail!("spool directory {}: the disk is full ({e:#}); free space on it (or move spool.dir) and start again", cfg.dir.display())
            }
            Err(e) => {
                damaged += 1;
                tracing::error!(error = %format!("{e:#}"), "Spool index damaged; setting it aside and indexing the frame files again.");
                let _ = std::fs::remove_dir_all(&aside);
                std::fs::rename(&index_dir, &aside).with_context(|| format!("moving aside {}", index_dir.display()))?;
                Self::open_index(&cfg, &index_dir)?
            }
        };
        let found = Self::reconcile(&index, &cfg.dir, &frames_dir)?;
        // The index now covers every frame file and is on disk: one set aside is of no use.
        if aside.exists() {
            let _ = std::fs::remove_dir_all(&aside);
        }
        damaged += found.damaged;
        if found.reindexed > 0 {
            tracing::warn!(
                files = found.reindexed,
                "Spool files without an index entry were indexed again (written shortly before a crash, or the index was lost)."
            );
        }
        if found.records > 0 {
            tracing::info!(records = found.records, "Spool holds frames from before the start.");
        }
        let (damaged_pruned, _) = prune_damaged(&cfg.dir, cfg.max_bytes.as_u64() / DAMAGED_SHARE);
        let file_bytes = disk_usage(&frames_dir);
        let index_bytes = disk_usage(&index_dir);
        let other_bytes = usage_except(&cfg.dir, &[&frames_dir, &index_dir]);
        let max_bytes = cfg.max_bytes.as_u64();
        Ok(Self {
            cfg,
            frames_dir,
            inner: Mutex::new(Inner {
                index,
                index_gen,
                next_file: found.next_file,
                records: found.records,
                file_bytes,
                index_bytes,
                other_bytes,
                damaged,
                damaged_pruned,
                unsynced: Vec::new(),
                cap: max_bytes,
                index_rebuilt: 0,
            }),
            deleter: Deleter::start().context("starting the spool's deleting thread")?,
            _lock: lock,
        })
    }

    /// Makes the index cover every file in `frames_dir`: a file the index does not reference
    /// is indexed if it holds a valid record, moved to `damaged/` otherwise. `by_arrival`
    /// follows from `frames` and is recreated whole.
    fn reconcile(index: &Index, dir: &Path, frames_dir: &Path) -> Result<Reconciled> {
        // An index of an earlier version orders eviction by capture time in `by_age`.
        let _ = index.db.drop_tree("by_age");
        index.by_arrival.clear()?;
        let mut found = Reconciled::default();
        let mut referenced = BTreeSet::new();
        for item in index.frames.iter() {
            let (k, v) = item.context("reading the spool index")?;
            // A malformed entry is counted: `read_after` reports it as damaged.
            found.records += 1;
            if let Some((id, _)) = parse_entry(&v) {
                index.by_arrival.insert(id.to_be_bytes(), k)?;
                referenced.insert(id);
            }
        }
        found.next_file = referenced.last().map_or(0, |id| id + 1);

        let mut loose = Vec::new();
        let mut strays = Vec::new();
        for e in std::fs::read_dir(frames_dir).with_context(|| format!("listing {}", frames_dir.display()))?.flatten() {
            match parse_file_name(&e.file_name()) {
                Some((id, tmp)) => {
                    found.next_file = found.next_file.max(id + 1);
                    if tmp || !referenced.contains(&id) {
                        loose.push((id, tmp, e.path()));
                    }
                }
                None => strays.push(e.path()),
            }
        }
        loose.sort();
        for (id, tmp, path) in loose {
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    // Left where it is: the next open tries again.
                    tracing::error!(file = %path.display(), error = %e, "Cannot read a spool file.");
                    continue;
                }
            };
            let why = match record::decode_unkeyed(&bytes) {
                Err(e) => e,
                Ok(frame) => {
                    let key = SpoolKey::new(&frame.meta.camera_id, frame.meta.seq);
                    let holder = index.frames.get(&key.0)?.and_then(|v| parse_entry(&v));
                    let final_path = Self::file_path(frames_dir, id);
                    if holder.is_some_and(|(held, _)| Self::file_path(frames_dir, held).exists()) {
                        format!("a second copy of {key}, which is spooled")
                    } else if tmp && final_path.exists() {
                        format!("a temporary file of {key} whose final name is taken")
                    } else {
                        if tmp {
                            std::fs::rename(&path, &final_path).with_context(|| format!("renaming {}", path.display()))?;
                        }
                        match holder {
                            // The entry's own file is gone: this copy takes its place.
                            Some((held, _)) => {
                                index.by_arrival.remove(held.to_be_bytes())?;
                            }
                            None => found.records += 1,
                        }
                        index.frames.insert(&key.0, &entry(id, bytes.len() as u64))?;
                        index.by_arrival.insert(id.to_be_bytes(), key.0)?;
                        found.reindexed += 1;
                        continue;
                    }
                }
            };
            found.damaged += 1;
            move_to_damaged(dir, &path, &why);
        }
        for path in strays {
            found.damaged += 1;
            move_to_damaged(dir, &path, "not a spool file");
        }
        index.db.flush().context("flushing the spool index")?;
        Ok(found)
    }

    /// Bytes on disk, files still queued for deletion included.
    fn disk(&self, inner: &Inner) -> u64 {
        inner.file_bytes + self.deleter.bytes() + inner.index_bytes + inner.other_bytes
    }

    /// The cap now: `max_bytes`, or what the spool occupies plus the filesystem's free space
    /// above `min_free_bytes` if that is less (the disk is shared: logs, other programs, and
    /// sled must be able to write its log — sled 0.34 refuses every write after one ENOSPC).
    fn cap(&self, inner: &Inner) -> u64 {
        let max = self.cfg.max_bytes.as_u64();
        match fs2::statvfs(&self.cfg.dir) {
            // A filesystem without a size (ramfs reports 0 blocks, 0 free) binds nothing.
            Ok(fs) if fs.total_space() > 0 => max.min((self.disk(inner) + fs.available_space()).saturating_sub(self.cfg.min_free_bytes.as_u64())),
            _ => max,
        }
    }

    /// Whether a frame of `size` bytes would be refused, evict or be decimated now.
    fn limits(&self, inner: &Inner, size: u64) -> bool {
        let (max, disk) = (self.cap(inner), self.disk(inner));
        disk + size > max || (self.cfg.when_full == FullPolicy::Decimate && disk as f64 >= self.cfg.decimate_from * max as f64)
    }

    /// Moves a frame file that failed to decode to `damaged/`, keeping the disk accounting.
    fn set_aside(&self, inner: &mut Inner, path: &Path, why: &str) {
        let bytes = allocation_at(path);
        if move_to_damaged(&self.cfg.dir, path, why) {
            inner.file_bytes = inner.file_bytes.saturating_sub(bytes);
            inner.other_bytes += bytes;
            let (pruned, freed) = prune_damaged(&self.cfg.dir, self.cfg.max_bytes.as_u64() / DAMAGED_SHARE);
            inner.damaged_pruned += pruned;
            inner.other_bytes = inner.other_bytes.saturating_sub(freed);
        }
    }

    /// Removes one record by key from the index and deletes its file — `now`, or on the
    /// deleting thread; false if absent.
    fn delete(&self, inner: &mut Inner, key: &[u8], now: bool) -> Result<bool> {
        let Some(v) = inner.index.frames.remove(key)? else { return Ok(false) };
        if let Some((id, _)) = parse_entry(&v) {
            inner.index.by_arrival.remove(id.to_be_bytes())?;
            let path = Self::file_path(&self.frames_dir, id);
            let bytes = allocation_at(&path);
            if !now {
                // Its bytes move to the deleter's count; a flush has nothing to sync in it.
                inner.file_bytes = inner.file_bytes.saturating_sub(bytes);
                inner.unsynced.retain(|(p, _, _)| *p != path);
                self.deleter.delete(path, bytes);
            } else {
                match std::fs::remove_file(&path) {
                    Ok(()) => inner.file_bytes = inner.file_bytes.saturating_sub(bytes),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => tracing::error!(file = %path.display(), error = %e, "Cannot delete spool file."),
                }
            }
        }
        inner.records = inner.records.saturating_sub(1);
        Ok(true)
    }

    /// Deletes the record that arrived first (capture times play no part, so a clock step
    /// changes nothing); returns its camera.
    fn evict_oldest(&self, inner: &mut Inner) -> Result<Option<SpoolKey>> {
        let Some((id, key)) = inner.index.by_arrival.first()? else { return Ok(None) };
        // Now: the space is wanted at once.
        self.delete(inner, &key, true)?;
        // Gone with its record, or pointing at nothing: either way no longer the first.
        inner.index.by_arrival.remove(id)?;
        Ok(Some(SpoolKey(key.to_vec())))
    }

    /// Tests: whether the index refuses a write now.
    #[cfg(test)]
    fn index_refuses_writes(&self) -> bool {
        self.inner.lock().unwrap().index.db.insert(PROBE_KEY, &[]).is_err()
    }

    /// The index refuses writes while the disk takes them (`why`): a new index generation is
    /// filled from the frame files — they are the truth — and replaces it, as `open` would
    /// after a restart. Entries the old index had not flushed are recovered from their files,
    /// deletions it had not flushed were deleted files already.
    fn rebuild_index(&self, why: &anyhow::Error) -> Result<()> {
        let mut inner = self.inner.lock().expect("spool lock");
        // A file still queued for deletion would be indexed again (and sent twice).
        self.deleter.settle();
        tracing::error!(error = %format!("{why:#}"), "The spool index refuses writes though the disk takes them again (sled keeps its first I/O error): rebuilding it from the frame files.");
        let new_gen = inner.index_gen + 1;
        let new_dir = self.index_dir(new_gen);
        let _ = std::fs::remove_dir_all(&new_dir);
        let fresh = Self::open_index(&self.cfg, &new_dir)?;
        let found = match Self::reconcile(&fresh, &self.cfg.dir, &self.frames_dir) {
            Ok(found) => found,
            Err(e) => {
                drop(fresh);
                let _ = std::fs::remove_dir_all(&new_dir);
                return Err(e.context("rebuilding the spool index"));
            }
        };
        let old_dir = self.index_dir(inner.index_gen);
        drop(std::mem::replace(&mut inner.index, fresh)); // closes the old index
        if let Err(e) = std::fs::remove_dir_all(&old_dir) {
            tracing::warn!(dir = %old_dir.display(), error = %e, "Cannot remove the old spool index.");
        }
        inner.index_gen = new_gen;
        inner.records = found.records;
        inner.next_file = inner.next_file.max(found.next_file);
        inner.damaged += found.damaged;
        inner.index_rebuilt += 1;
        inner.file_bytes = disk_usage(&self.frames_dir);
        self.deleter.remeasured();
        inner.index_bytes = disk_usage(&new_dir);
        inner.other_bytes = usage_except(&self.cfg.dir, &[&self.frames_dir, &new_dir]);
        tracing::warn!(records = found.records, damaged = found.damaged, "Spool index rebuilt from the frame files.");
        Ok(())
    }
}

/// fsyncs every regular file directly in `dir`, then `dir` itself.
fn sync_files_in(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            File::open(entry.path())?.sync_all()?;
        }
    }
    File::open(dir)?.sync_all()
}

impl Spool for SledSpool {
    fn push(&self, frame: &Frame) -> Result<PushOutcome> {
        let value = record::encode(frame);
        let size = predicted(value.len() as u64);
        let camera = &frame.meta.camera_id;
        let mut out = PushOutcome::default();
        let mut inner = self.inner.lock().expect("spool lock");
        if self.deleter.busy() && self.limits(&inner, size) {
            // Judged on the space actually free: the queued deletions first.
            self.deleter.settle();
        }
        let max = self.cap(&inner);
        let disk_binds = max < self.cfg.max_bytes.as_u64();
        if disk_binds && inner.cap == self.cfg.max_bytes.as_u64() {
            tracing::warn!(
                cap = max,
                max_bytes = self.cfg.max_bytes.as_u64(),
                min_free_bytes = self.cfg.min_free_bytes.as_u64(),
                "The spool's disk has less free space than spool.max_bytes allows: the spool is full at the lower cap."
            );
        }
        inner.cap = max;
        // A refusal the disk caused, not the configured cap.
        let full = if disk_binds { DropReason::DiskFull } else { DropReason::FullNewest };

        let key = SpoolKey::new(camera, frame.meta.seq);
        if inner.index.frames.contains_key(&key.0)? {
            // Already spooled (a retry of the same frame): that copy stays, nothing is dropped
            // or evicted for it.
            out.stored = true;
            return Ok(out);
        }
        if self.cfg.when_full == FullPolicy::Decimate
            && self.disk(&inner) as f64 >= self.cfg.decimate_from * max as f64
            && !frame.meta.seq.is_multiple_of(self.cfg.decimate_keep_one_in as u64)
        {
            out.refused = Some(DropReason::Decimated);
            return Ok(out);
        }
        if self.disk(&inner) + size > max {
            // Refused without evicting: by drop_newest, or a frame that would not fit even with
            // every frame evicted (the index and the other files stay).
            if self.cfg.when_full == FullPolicy::DropNewest || inner.index_bytes + inner.other_bytes + size > max {
                out.refused = Some(full);
                return Ok(out);
            }
            while self.disk(&inner) + size > max {
                match self.evict_oldest(&mut inner)? {
                    Some(evicted) => out.evicted.push(evicted),
                    None => {
                        // Nothing left to evict (the frame files took less than counted).
                        out.refused = Some(full);
                        return Ok(out);
                    }
                }
            }
        }

        let id = inner.next_file;
        inner.next_file += 1;
        let path = Self::file_path(&self.frames_dir, id);
        let tmp = Self::tmp_path(&self.frames_dir, id);
        if let Err(e) = File::create(&tmp).and_then(|mut f| f.write_all(&value)).and_then(|()| std::fs::rename(&tmp, &path)) {
            // The caller gets the error and still has the frame: the partial file is none.
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("writing spool file {}", path.display()));
        }
        let indexed = inner.index.frames.insert(&key.0, &entry(id, value.len() as u64)).and_then(|_| inner.index.by_arrival.insert(id.to_be_bytes(), key.0.as_slice()));
        if let Err(e) = indexed {
            // Not stored: the caller counts the frame as dropped, so its file must not come
            // back at the next open (or index rebuild) as a spooled frame.
            let _ = inner.index.frames.remove(&key.0);
            let _ = std::fs::remove_file(&path);
            return Err(e).with_context(|| format!("indexing spool file {}", path.display()));
        }
        let bytes = allocation_at(&path);
        inner.unsynced.push((path, bytes, key));
        inner.records += 1;
        inner.file_bytes += bytes;
        out.stored = true;
        Ok(out)
    }

    fn read_after_skipping(&self, after: Option<&SpoolKey>, limit: ReadLimit, skip: &dyn Fn(&SpoolKey) -> bool) -> Result<Vec<SpoolRead>> {
        let mut inner = self.inner.lock().expect("spool lock");
        let iter = match after {
            Some(k) => inner.index.frames.range::<&[u8], _>((std::ops::Bound::Excluded(k.0.as_slice()), std::ops::Bound::Unbounded)),
            None => inner.index.frames.iter(),
        };
        let mut entries = Vec::with_capacity(limit.records.min(1024));
        let mut bytes = 0u64;
        for entry in iter {
            if entries.len() >= limit.records {
                break;
            }
            let (k, v) = entry.context("reading the spool index")?;
            let key = SpoolKey(k.to_vec());
            if skip(&key) {
                continue;
            }
            // A malformed entry (size unknown) is read to be reported as damaged.
            let size = parse_entry(&v).map_or(0, |(_, size)| size);
            if !limit.fits(entries.len(), bytes, size) {
                break;
            }
            bytes += size;
            entries.push((key, v));
        }
        let mut out = Vec::with_capacity(entries.len());
        for (key, v) in entries {
            let frame = match parse_entry(&v) {
                None => Err("malformed index entry".to_owned()),
                Some((id, _)) => {
                    let path = Self::file_path(&self.frames_dir, id);
                    std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display())).and_then(|bytes| {
                        record::decode_owned(&key, bytes.into()).map_err(|e| {
                            // Kept for inspection; the caller counts it and removes the entry.
                            let why = format!("{}: {e}", path.display());
                            self.set_aside(&mut inner, &path, &why);
                            why
                        })
                    })
                }
            };
            out.push((key, frame));
        }
        Ok(out)
    }

    fn remove(&self, key: &SpoolKey) -> Result<bool> {
        let mut inner = self.inner.lock().expect("spool lock");
        let removed = self.delete(&mut inner, &key.0, false)?;
        if removed && inner.records == 0 && inner.index_bytes > 4 * 1024 * 1024 {
            // Empty: start a fresh index so sled gives its space back.
            let old_dir = self.index_dir(inner.index_gen);
            let new_gen = inner.index_gen + 1;
            let fresh = Self::open_index(&self.cfg, &self.index_dir(new_gen))?;
            drop(std::mem::replace(&mut inner.index, fresh)); // closes the old index
            inner.index_gen = new_gen;
            if let Err(e) = std::fs::remove_dir_all(&old_dir) {
                tracing::warn!(dir = %old_dir.display(), error = %e, "Cannot remove the old spool index.");
            }
            inner.index_bytes = disk_usage(&self.index_dir(new_gen));
        }
        Ok(removed)
    }

    fn flush(&self) -> Result<()> {
        let mut inner = self.inner.lock().expect("spool lock");
        // Deletions done before the index that no longer names them is made durable.
        self.deleter.settle();
        let files = std::mem::take(&mut inner.unsynced);
        let mut synced = Vec::with_capacity(files.len());
        for (path, counted, key) in &files {
            // A file already delivered and deleted (or set aside) is fine.
            if let Ok(f) = File::open(path) {
                f.sync_all().with_context(|| format!("syncing {}", path.display()))?;
                // The allocation can change once the data is on disk (delayed allocation).
                let bytes = f.metadata().map_or(*counted, |md| allocation(&md));
                inner.file_bytes = (inner.file_bytes + bytes).saturating_sub(*counted);
                synced.push(key);
            }
        }
        if !files.is_empty() {
            File::open(&self.frames_dir).and_then(|d| d.sync_all()).context("syncing the spool directory")?;
        }
        inner.index.db.flush().context("flushing the spool index")?;
        // sled 0.34 writes its log with sync_file_range, which flushes neither the disk's write
        // cache nor the file's metadata: its files are fsynced too, so that the index
        // (insertions and deletions) survives a power cut, not only a crash (tests/vm/powercut
        // found the last flush's entries missing after every cut).
        let index_dir = self.index_dir(inner.index_gen);
        sync_files_in(&index_dir).with_context(|| format!("syncing the spool index {}", index_dir.display()))?;
        if !synced.is_empty() {
            // What a crash can no longer take (tests/vm/powercut checks it after power cuts).
            tracing::debug!(frames = synced.len(), seqs = %seq_ranges(&synced), "Spool flushed: these frames are on disk.");
        }
        inner.index_bytes = disk_usage(&index_dir);
        inner.other_bytes = usage_except(&self.cfg.dir, &[&self.frames_dir, &index_dir]);
        Ok(())
    }

    fn note_damaged(&self) {
        self.inner.lock().expect("spool lock").damaged += 1;
    }

    fn probe(&self) -> Result<()> {
        let path = self.cfg.dir.join(".probe");
        let result = (|| {
            let mut f = File::create(&path)?;
            std::io::Write::write_all(&mut f, &[0u8; 4096])?;
            f.sync_all()
        })();
        let _ = std::fs::remove_file(&path);
        result.with_context(|| format!("writing {}", path.display()))?;
        // The disk takes writes again; does the index? sled 0.34 keeps the first I/O error of
        // its log writer (ENOSPC, say) and refuses every write after it until it is opened
        // again: the spool could then neither take nor give back a frame until a restart.
        let written = self.inner.lock().expect("spool lock").index.db.insert(PROBE_KEY, &[]).map(drop).map_err(anyhow::Error::from);
        match written.and_then(|()| self.flush()) {
            Ok(()) => Ok(()),
            Err(e) if is_sled_error(&e) => self.rebuild_index(&e),
            Err(e) => Err(e),
        }
    }

    fn records(&self) -> u64 {
        self.inner.lock().expect("spool lock").records
    }

    fn stats(&self) -> SpoolStats {
        let inner = self.inner.lock().expect("spool lock");
        // Exact figures: the queued deletions first (a short queue: under 0.1 s of work).
        self.deleter.settle();
        SpoolStats {
            records: inner.records,
            disk_bytes: self.disk(&inner),
            damaged: inner.damaged,
            damaged_pruned: inner.damaged_pruned,
            cap_bytes: self.cap(&inner),
            index_rebuilt: inner.index_rebuilt,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use framelink_common::FrameMeta;
    use std::collections::BTreeMap;

    fn cfg(dir: &Path, max_mib: u64, policy: FullPolicy) -> SpoolConfig {
        SpoolConfig { dir: dir.to_path_buf(), max_bytes: bytesize::ByteSize::mib(max_mib), when_full: policy, ..SpoolConfig::default() }
    }

    fn frame(camera: &str, seq: u64, len: usize) -> Frame {
        Frame {
            meta: FrameMeta {
                device_id: "d".into(),
                camera_id: camera.into(),
                seq,
                capture_ns: seq,
                width: 8,
                height: 8,
                pixel_format: "RGB24".into(),
                content_type: "image/jpeg".into(),
                clock: Default::default(),
            },
            payload: Bytes::from(vec![(seq % 251) as u8; len]),
        }
    }

    fn drain_all(s: &SledSpool) -> (Vec<Frame>, usize) {
        let (mut out, mut bad) = (Vec::new(), 0);
        loop {
            let batch = s.read_after(None, 16).unwrap();
            if batch.is_empty() {
                return (out, bad);
            }
            for (k, f) in batch {
                match f {
                    Ok(f) => out.push(f),
                    Err(_) => bad += 1,
                }
                assert!(s.remove(&k).unwrap());
            }
        }
    }

    #[test]
    fn frames_come_back_per_camera_in_order_and_space_is_returned() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledSpool::open(cfg(dir.path(), 16, FullPolicy::DropOldest)).unwrap();
        for seq in (0..40).rev() {
            let camera = if seq % 2 == 0 { "a" } else { "b" };
            assert!(s.push(&frame(camera, seq, 150_000)).unwrap().stored);
        }
        assert_eq!(s.stats().records, 40);
        s.flush().unwrap();
        let disk = disk_usage(dir.path());
        assert!((40 * 150_000..=40 * 155_000 + 2 * 1024 * 1024).contains(&disk), "disk {disk}");
        assert!(s.stats().disk_bytes.abs_diff(disk) < 64 * 1024, "tracked {} vs measured {disk}", s.stats().disk_bytes);
        let (got, bad) = drain_all(&s);
        assert_eq!(bad, 0);
        let order: Vec<(String, u64)> = got.iter().map(|f| (f.meta.camera_id.clone(), f.meta.seq)).collect();
        let mut expected = order.clone();
        expected.sort();
        assert_eq!(order, expected, "camera-major, sequence order");
        assert_eq!(got.len(), 40);
        s.flush().unwrap();
        assert_eq!(s.stats().records, 0);
        assert_eq!(disk_usage(&dir.path().join("frames")), 0, "frame space returned at once");
    }

    #[test]
    fn a_full_spool_waits_for_queued_deletions_before_it_evicts() {
        // Room for about four 1 MiB frames beside the index; four delivered and queued for
        // deletion on a stalled deleter, then four new ones pushed: none may be refused or
        // evict another, since the space comes back as soon as the queue is worked off.
        let dir = tempfile::tempdir().unwrap();
        let s = SledSpool::open(cfg(dir.path(), 6, FullPolicy::DropOldest)).unwrap();
        for seq in 0..4 {
            assert!(s.push(&frame("a", seq, 1 << 20)).unwrap().stored);
        }
        let gate = s.deleter.gate();
        let (held_tx, held_rx) = crossbeam_channel::bounded(0);
        let staller = std::thread::spawn(move || {
            let _held = gate.lock().unwrap();
            held_tx.send(()).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(300));
        });
        held_rx.recv().unwrap();
        for seq in 0..4 {
            assert!(s.remove(&SpoolKey::new("a", seq)).unwrap());
        }
        assert!(s.deleter.busy(), "the deletions wait behind the stalled thread");
        for seq in 4..8 {
            let out = s.push(&frame("a", seq, 1 << 20)).unwrap();
            assert!(out.stored && out.evicted.is_empty() && out.refused.is_none(), "frame {seq}: {out:?}");
        }
        staller.join().unwrap();
        assert_eq!(s.stats().records, 4);
        let frames: Vec<_> = std::fs::read_dir(dir.path().join("frames")).unwrap().flatten().collect();
        assert_eq!(frames.len(), 4, "the delivered frames' files are gone");
    }

    /// A frame as `frame` makes it, with its own capture time.
    fn frame_at(camera: &str, seq: u64, len: usize, capture_ns: u64) -> Frame {
        let mut f = frame(camera, seq, len);
        f.meta.capture_ns = capture_ns;
        f
    }

    /// Flips a byte inside frame file 1 (its CRC then fails); its path and new bytes.
    fn damage_file_1(dir: &Path) -> (PathBuf, Vec<u8>) {
        let victim = dir.join("frames/f0000000000000001");
        let mut bytes = std::fs::read(&victim).unwrap();
        bytes[100] ^= 0xff;
        std::fs::write(&victim, &bytes).unwrap();
        (victim, bytes)
    }

    fn push_and_close(dir: &Path, seqs: std::ops::Range<u64>) {
        let s = SledSpool::open(cfg(dir, 16, FullPolicy::DropOldest)).unwrap();
        for seq in seqs {
            assert!(s.push(&frame("a", seq, 100_000)).unwrap().stored);
        }
        s.flush().unwrap();
    }

    #[test]
    fn survives_reopen_reindexes_unindexed_frames_and_moves_damaged_files_aside() {
        let dir = tempfile::tempdir().unwrap();
        push_and_close(dir.path(), 0..10);
        // A complete frame file whose index entry never reached disk (crash inside the
        // flush window), and a file cut short.
        std::fs::write(dir.path().join("frames/f00000000000000ff"), record::encode(&frame("a", 50, 100_000))).unwrap();
        std::fs::write(dir.path().join("frames/f0000000000000100"), b"partial").unwrap();
        let s = SledSpool::open(cfg(dir.path(), 16, FullPolicy::DropOldest)).unwrap();
        assert_eq!(s.stats().records, 11, "the unindexed frame is indexed again");
        assert_eq!(s.stats().damaged, 1);
        assert!(!dir.path().join("frames/f0000000000000100").exists());
        assert_eq!(std::fs::read(dir.path().join("damaged/f0000000000000100")).unwrap(), b"partial", "moved, not deleted");
        let (got, bad) = drain_all(&s);
        assert_eq!(bad, 0);
        assert_eq!(got.iter().map(|f| f.meta.seq).collect::<Vec<_>>(), (0..10).chain([50]).collect::<Vec<_>>());
    }


    #[test]
    fn a_torn_or_half_rebuilt_index_loses_no_frame() {
        let dir = tempfile::tempdir().unwrap();
        push_and_close(dir.path(), 0..10);
        // The index on disk knows only some of the frames (a torn index, or a rebuild killed
        // half way with the damaged index still set aside).
        {
            let db = sled::open(dir.path().join("index-0")).unwrap();
            let frames = db.open_tree("frames").unwrap();
            for seq in 3..10 {
                frames.remove(SpoolKey::new("a", seq).0).unwrap();
            }
            db.flush().unwrap();
        }
        std::fs::create_dir(dir.path().join("index.damaged")).unwrap();
        let s = SledSpool::open(cfg(dir.path(), 16, FullPolicy::DropOldest)).unwrap();
        assert_eq!(s.stats().records, 10);
        assert_eq!(std::fs::read_dir(dir.path().join("frames")).unwrap().count(), 10, "no frame file deleted");
        // Pushing after the reopen must not reuse the file of a re-indexed frame.
        assert!(s.push(&frame("a", 10, 100_000)).unwrap().stored);
        let (got, bad) = drain_all(&s);
        assert_eq!(bad, 0);
        assert_eq!(got.iter().map(|f| f.meta.seq).collect::<Vec<_>>(), (0..11).collect::<Vec<_>>());
    }


    #[test]
    fn a_damaged_file_found_when_read_is_moved_aside_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        push_and_close(dir.path(), 0..3);
        let (_, bytes) = damage_file_1(dir.path());
        let s = SledSpool::open(cfg(dir.path(), 16, FullPolicy::DropOldest)).unwrap();
        let (got, bad) = drain_all(&s);
        assert_eq!((got.len(), bad), (2, 1));
        assert_eq!(std::fs::read(dir.path().join("damaged/f0000000000000001")).unwrap(), bytes, "kept in damaged/");
    }


    #[test]
    fn a_read_skipping_passes_over_records_without_reading_their_files() {
        let dir = tempfile::tempdir().unwrap();
        push_and_close(dir.path(), 0..6);
        // The file of a skipped record is damaged: a read that opened it would report it and
        // move it aside.
        let (victim, _) = damage_file_1(dir.path());
        let s = SledSpool::open(cfg(dir.path(), 16, FullPolicy::DropOldest)).unwrap();
        let keys: Vec<SpoolKey> = (0..6).map(|seq| SpoolKey::new("a", seq)).collect();
        let held = [keys[0].clone(), keys[1].clone(), keys[3].clone()];
        let skip = |k: &SpoolKey| held.contains(k);
        let got = s.read_after_skipping(None, ReadLimit::records(2), &skip).unwrap();
        let got_keys: Vec<&SpoolKey> = got.iter().map(|(k, _)| k).collect();
        assert_eq!(got_keys, [&keys[2], &keys[4]], "held records do not count toward max");
        assert!(got.iter().all(|(_, f)| f.is_ok()));
        assert!(victim.exists(), "a skipped record's file is not read (nor moved aside)");
        let rest = s.read_after_skipping(Some(&keys[4]), ReadLimit::records(10), &skip).unwrap();
        assert_eq!(rest.iter().map(|(k, _)| k).collect::<Vec<_>>(), [&keys[5]]);
        assert!(s.read_after_skipping(Some(&keys[5]), ReadLimit::records(10), &skip).unwrap().is_empty());
        // Not skipped, the damaged file is found (the check above can fail).
        let all = s.read_after(None, 6).unwrap();
        assert!(all[1].1.is_err() && !victim.exists());
    }


    #[test]
    fn opening_waits_for_sleds_lock_held_a_moment_longer_and_not_forever() {
        let dir = tempfile::tempdir().unwrap();
        push_and_close(dir.path(), 0..3);
        // By hand, as a tool would; waiting for the spool just closed to let go of it first.
        let open_index_by_hand = || {
            let deadline = std::time::Instant::now() + SLED_LOCK_WAIT;
            loop {
                match sled::Config::new().path(dir.path().join("index-0")).open() {
                    Ok(db) => return db,
                    Err(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    Err(e) => panic!("opening the index by hand: {e}"),
                }
            }
        };
        // sled's lock held for 300 ms more (what one of its threads can do after a close):
        // the open waits for it.
        let held = open_index_by_hand();
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(held);
        });
        let s = SledSpool::open(cfg(dir.path(), 16, FullPolicy::DropOldest)).expect("opens once sled's lock is released");
        assert_eq!(s.stats().records, 3);
        release.join().unwrap();
        drop(s);
        // Held for good: the open fails after its wait, naming the cause.
        let _held = open_index_by_hand();
        let started = std::time::Instant::now();
        let e = SledSpool::open(cfg(dir.path(), 16, FullPolicy::DropOldest)).err().expect("a held index fails the open");
        assert!(format!("{e:#}").contains("in use by another process"), "{e:#}");
        assert!(started.elapsed() >= SLED_LOCK_WAIT, "it waited first");
    }

    #[test]
    fn a_left_over_temporary_file_is_kept_as_a_frame_if_whole_and_moved_aside_if_not() {
        let dir = tempfile::tempdir().unwrap();
        push_and_close(dir.path(), 0..2);
        // Crashes between writing a frame and renaming it, and in the middle of the write.
        std::fs::write(dir.path().join("frames/f0000000000000002.tmp"), record::encode(&frame("a", 2, 100_000))).unwrap();
        let cut = &record::encode(&frame("a", 3, 100_000))[..5_000];
        std::fs::write(dir.path().join("frames/f0000000000000003.tmp"), cut).unwrap();
        let s = SledSpool::open(cfg(dir.path(), 16, FullPolicy::DropOldest)).unwrap();
        assert_eq!((s.stats().records, s.stats().damaged), (3, 1));
        assert!(dir.path().join("frames/f0000000000000002").exists());
        assert_eq!(std::fs::read(dir.path().join("damaged/f0000000000000003.tmp")).unwrap(), cut);
        // The next file id follows the left-over ones.
        s.push(&frame("a", 4, 100_000)).unwrap();
        assert!(dir.path().join("frames/f0000000000000004").exists());
        let (got, bad) = drain_all(&s);
        assert_eq!(bad, 0);
        assert_eq!(got.iter().map(|f| f.meta.seq).collect::<Vec<_>>(), vec![0, 1, 2, 4]);
    }

    #[test]
    fn the_flush_log_names_each_cameras_frames_as_ranges() {
        let keys = [SpoolKey::new("b", 7), SpoolKey::new("a", 3), SpoolKey::new("a", 1), SpoolKey::new("a", 2), SpoolKey::new("a", 9)];
        assert_eq!(seq_ranges(&keys.iter().collect::<Vec<_>>()), "a:1-3,9 b:7");
    }

    #[test]
    fn a_second_open_of_a_spool_in_use_fails_naming_dir_and_pid() {
        let dir = tempfile::tempdir().unwrap();
        let first = SledSpool::open(cfg(dir.path(), 16, FullPolicy::DropOldest)).unwrap();
        for seq in 0..5 {
            first.push(&frame("a", seq, 50_000)).unwrap();
        }
        first.flush().unwrap();
        let err = match SledSpool::open(cfg(dir.path(), 16, FullPolicy::DropOldest)) {
            Ok(_) => panic!("a second open of a spool in use succeeded"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        assert!(!dir.path().join("index.damaged").exists());
        assert_eq!(first.stats().records, 5);
        let (got, bad) = drain_all(&first);
        assert_eq!((got.len(), bad), (5, 0), "the first spool keeps all its frames");
    }

    #[test]
    fn sleds_own_lock_error_is_not_damage() {
        let dir = tempfile::tempdir().unwrap();
        push_and_close(dir.path(), 0..4);
        // Another process (e.g. an agent without the spool lock) holds sled's lock.
        let other = sled::open(dir.path().join("index-0")).unwrap();
        let err = match SledSpool::open(cfg(dir.path(), 16, FullPolicy::DropOldest)) {
            Ok(s) => panic!("opened a locked index (damaged count {})", s.stats().damaged),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains("in use"), "{err}");
        assert!(!dir.path().join("index.damaged").exists(), "the index was not set aside");
        drop(other);
        let s = SledSpool::open(cfg(dir.path(), 16, FullPolicy::DropOldest)).unwrap();
        assert_eq!((s.stats().records, s.stats().damaged), (4, 0));
    }


    #[test]
    fn drop_oldest_evicts_by_arrival_even_when_the_clock_steps_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut kept_or_dropped = 0;
        // Every frame's capture time is earlier than the one before (the clock keeps
        // stepping back); half of them arrive after a reopen.
        for range in [0..100, 100..200] {
            let s = SledSpool::open(cfg(dir.path(), 8, FullPolicy::DropOldest)).unwrap();
            for seq in range {
                let out = s.push(&frame_at("a", seq, 200_000, 1_000_000_000 - seq * 1_000)).unwrap();
                assert!(out.stored, "frame {seq} refused: {:?}", out.refused);
                kept_or_dropped += out.evicted.len() as u64;
            }
            s.flush().unwrap();
        }
        let s = SledSpool::open(cfg(dir.path(), 8, FullPolicy::DropOldest)).unwrap();
        let (got, _) = drain_all(&s);
        let seqs: Vec<u64> = got.iter().map(|f| f.meta.seq).collect();
        assert_eq!(seqs.last(), Some(&199), "the newest arrival is kept: {seqs:?}");
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "the first arrivals were evicted: {seqs:?}");
        assert_eq!(kept_or_dropped + seqs.len() as u64, 200);
    }


    #[test]
    fn disk_bytes_is_the_real_allocation_of_everything_in_the_spool_dir() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        push_and_close(dir.path(), 0..3);
        // Files that are not frames but occupy the spool's disk: a 1 MiB sparse file (next to
        // no blocks), a 1-byte file, 200 KB of data.
        let other = dir.path().join("damaged");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::File::create(other.join("sparse")).unwrap().set_len(1024 * 1024).unwrap();
        std::fs::write(other.join("one"), b"x").unwrap();
        std::fs::write(other.join("data"), vec![1u8; 200_000]).unwrap();
        let real = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;
        assert_eq!(disk_usage(&other), real(&other.join("sparse")) + real(&other.join("one")) + real(&other.join("data")));
        assert!(real(&other.join("sparse")) < 1024 * 1024);

        let s = SledSpool::open(cfg(dir.path(), 16, FullPolicy::DropOldest)).unwrap();
        assert_eq!(s.stats().disk_bytes, disk_usage(dir.path()), "after open");
        s.push(&frame("a", 3, 1)).unwrap();
        s.push(&frame("a", 4, 123_457)).unwrap();
        s.flush().unwrap();
        assert_eq!(s.stats().disk_bytes, disk_usage(dir.path()), "after pushes and a flush");
        let batch = s.read_after(None, 1).unwrap();
        s.remove(&batch[0].0).unwrap();
        s.flush().unwrap();
        assert_eq!(s.stats().disk_bytes, disk_usage(dir.path()), "after a removal");
    }


    #[test]
    fn damaged_files_are_held_to_their_share_of_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let damaged = dir.path().join("damaged");
        std::fs::create_dir_all(&damaged).unwrap();
        let now = std::time::SystemTime::now();
        for (name, age_s) in [("old", 30), ("mid", 20), ("new", 10)] {
            std::fs::write(damaged.join(name), vec![7u8; 400_000]).unwrap();
            let f = std::fs::File::options().write(true).open(damaged.join(name)).unwrap();
            f.set_modified(now - std::time::Duration::from_secs(age_s)).unwrap();
        }
        // 8 MiB cap: damaged/ may hold 1 MiB, the three files take 1.2 MB.
        let s = SledSpool::open(cfg(dir.path(), 8, FullPolicy::DropOldest)).unwrap();
        assert!(!damaged.join("old").exists(), "the oldest goes");
        assert!(damaged.join("mid").exists() && damaged.join("new").exists());
        assert_eq!(s.stats().disk_bytes, disk_usage(dir.path()));
        assert_eq!(s.stats().damaged_pruned, 1, "the deletion is counted");
    }

    fn fill(policy: FullPolicy) -> (tempfile::TempDir, SledSpool, BTreeMap<DropReason, u64>) {
        let dir = tempfile::tempdir().unwrap();
        let s = SledSpool::open(cfg(dir.path(), 8, policy)).unwrap();
        let mut drops = BTreeMap::new();
        for seq in 0..200 {
            let out = s.push(&frame("a", seq, 200_000)).unwrap();
            if let Some(r) = out.refused {
                *drops.entry(r).or_insert(0) += 1;
            }
            if !out.evicted.is_empty() {
                *drops.entry(DropReason::FullOldest).or_insert(0) += out.evicted.len() as u64;
            }
            if seq % 20 == 0 {
                s.flush().unwrap();
            }
        }
        s.flush().unwrap();
        (dir, s, drops)
    }

    const SLACK: u64 = 2 * 1024 * 1024;

    #[test]
    fn drop_oldest_keeps_the_newest_within_the_cap() {
        let (dir, s, drops) = fill(FullPolicy::DropOldest);
        let disk = disk_usage(dir.path());
        assert!(disk <= 8 * 1024 * 1024 + SLACK, "disk {disk} within cap + slack");
        let (got, _) = drain_all(&s);
        let seqs: Vec<u64> = got.iter().map(|f| f.meta.seq).collect();
        assert_eq!(*seqs.last().unwrap(), 199, "newest kept");
        assert_eq!(drops[&DropReason::FullOldest] + seqs.len() as u64, 200, "every frame kept or counted");
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "a contiguous tail");
    }

    #[test]
    fn drop_newest_keeps_the_oldest() {
        let (dir, s, drops) = fill(FullPolicy::DropNewest);
        assert!(disk_usage(dir.path()) <= 8 * 1024 * 1024 + SLACK);
        let (got, _) = drain_all(&s);
        let n = got.len() as u64;
        assert_eq!(got.iter().map(|f| f.meta.seq).collect::<Vec<_>>(), (0..n).collect::<Vec<_>>());
        assert_eq!(drops[&DropReason::FullNewest] + n, 200);
    }

    #[test]
    fn decimate_thins_new_frames_past_the_threshold() {
        let (_dir, s, drops) = fill(FullPolicy::Decimate);
        let (got, _) = drain_all(&s);
        let seqs: Vec<u64> = got.iter().map(|f| f.meta.seq).collect();
        assert!(drops[&DropReason::Decimated] > 0);
        let late: Vec<u64> = seqs.iter().copied().filter(|s| *s > 150).collect();
        assert!(!late.is_empty() && late.iter().all(|s| s % 10 == 0), "{late:?}");
        assert_eq!(drops.values().sum::<u64>() + seqs.len() as u64, 200, "every frame kept or counted");
    }

    #[test]
    fn a_flipped_byte_damages_one_record_only() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledSpool::open(cfg(dir.path(), 16, FullPolicy::DropOldest)).unwrap();
            for seq in 0..5 {
                s.push(&frame("a", seq, 200_000)).unwrap();
            }
            s.flush().unwrap();
        }
        let victim = dir.path().join("frames/f0000000000000002");
        let mut bytes = std::fs::read(&victim).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&victim, bytes).unwrap();

        let s = SledSpool::open(cfg(dir.path(), 16, FullPolicy::DropOldest)).unwrap();
        let read = s.read_after(None, 10).unwrap();
        assert_eq!(read.len(), 5);
        let bad: Vec<_> = read.iter().filter(|(_, f)| f.is_err()).collect();
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].0, SpoolKey::new("a", 2), "file 2 holds seq 2");
        let reason = bad[0].1.as_ref().unwrap_err();
        assert!(reason.contains("checksum") && reason.contains("f0000000000000002"), "{reason}");
    }

    #[test]
    fn a_damaged_index_is_rebuilt_from_the_files() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledSpool::open(cfg(dir.path(), 16, FullPolicy::DropOldest)).unwrap();
            for seq in 0..6 {
                s.push(&frame(if seq < 3 { "a" } else { "b" }, seq, 50_000)).unwrap();
            }
            s.flush().unwrap();
        }
        // Overwrite sled's files with garbage.
        for e in std::fs::read_dir(dir.path().join("index-0")).unwrap().flatten() {
            if e.path().is_file() {
                std::fs::write(e.path(), vec![0xA5u8; 4096]).unwrap();
            }
        }
        let s = SledSpool::open(cfg(dir.path(), 16, FullPolicy::DropOldest)).unwrap();
        assert_eq!(s.stats().records, 6);
        assert!(s.stats().damaged >= 1);
        let (got, bad) = drain_all(&s);
        assert_eq!(bad, 0);
        assert_eq!(got.iter().map(|f| f.meta.seq).collect::<Vec<_>>(), (0..6).collect::<Vec<_>>());
    }

    /// sled 0.34 keeps the first I/O error of its log writer and refuses every write after it,
    /// until the index is opened again. The disk fills while the index holds entries it has
    /// not flushed (by another file: the spool's own cap keeps `min_free_bytes` free): once the
    /// disk takes writes again, `probe` finds the index still refusing, rebuilds it from the
    /// frame files, and every frame — the unflushed ones too — is there, in order.
    #[test]
    fn an_index_that_refuses_writes_after_a_full_disk_is_rebuilt_while_running() {
        let fs = framelink_testkit::smallfs::SmallFs::mount("8m");
        let dir = fs.path().join("spool");
        let cfg = SpoolConfig { min_free_bytes: bytesize::ByteSize::b(0), ..cfg(&dir, 64, FullPolicy::DropNewest) };
        let s = SledSpool::open(cfg.clone()).unwrap();
        for seq in 0..5 {
            assert!(s.push(&frame("a", seq, 20_000)).unwrap().stored);
        }
        s.flush().unwrap();
        // Enough unflushed index entries that sled's log needs new pages for them.
        for seq in 5..400 {
            assert!(s.push(&frame("a", seq, 100)).unwrap().stored);
        }
        fs.fill();
        let flushed = s.flush();
        let err = flushed.expect_err("sled cannot write its log on a full disk");
        assert!(is_disk_full(&err), "{err:#}");
        assert!(s.probe().is_err(), "the disk is still full");
        fs.free();
        // The disk takes writes again, the index still does not (sled's kept error).
        assert!(s.index_refuses_writes(), "sled keeps its first I/O error");
        s.probe().unwrap();
        assert_eq!(s.stats().index_rebuilt, 1);
        assert_eq!(s.stats().records, 400);
        assert!(!s.index_refuses_writes());
        assert!(s.push(&frame("a", 400, 20_000)).unwrap().stored);
        s.flush().unwrap();
        let (got, bad) = drain_all(&s);
        assert_eq!(bad, 0);
        assert_eq!(got.iter().map(|f| f.meta.seq).collect::<Vec<_>>(), (0..401).collect::<Vec<_>>());
        drop(s);
        // And the rebuilt index is the one a restart opens.
        let s = crate::spool::model_tests::reopen(&cfg);
        assert_eq!(s.stats().records, 0);
        assert_eq!(s.stats().damaged, 0);
    }

    /// The disk's free space binds the cap: with less than `min_free_bytes` free the spool is
    /// full below `max_bytes`; `drop_oldest` evicts, and a frame refused only for the disk is
    /// `spool_disk_full`.
    #[test]
    fn the_disks_free_space_caps_the_spool_below_max_bytes() {
        let fs = framelink_testkit::smallfs::SmallFs::mount("8m");
        let dir = fs.path().join("spool");
        let min_free = bytesize::ByteSize::mib(2);
        let s = SledSpool::open(SpoolConfig { min_free_bytes: min_free, ..cfg(&dir, 64, FullPolicy::DropOldest) }).unwrap();
        let mut evicted = 0;
        for seq in 0..200 {
            let out = s.push(&frame("a", seq, 60_000)).unwrap();
            assert!(out.stored, "frame {seq}: drop_oldest makes room");
            evicted += out.evicted.len();
        }
        s.flush().unwrap();
        assert!(evicted > 0, "200 frames of 60 kB do not fit on an 8 MiB disk");
        let free = fs2::available_space(fs.path()).unwrap();
        assert!(free + 128 * 1024 >= min_free.as_u64(), "about min_free_bytes stays free: {free}");
        assert!(s.stats().cap_bytes < 8 << 20, "{:?}", s.stats());
        drop(s);
        // Another file takes the rest of the disk: refused, for the disk.
        let s = crate::spool::model_tests::reopen(&SpoolConfig { min_free_bytes: min_free, ..cfg(&dir, 64, FullPolicy::DropNewest) });
        let out = s.push(&frame("b", 0, 60_000)).unwrap();
        assert_eq!(out.refused, Some(DropReason::DiskFull));
    }
}
