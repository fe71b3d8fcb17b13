//! Model test of the spool: random sequences of pushes, reads, removals, flushes and reopens
//! run against a real [`SledSpool`] (sled index and frame files in a temporary directory) and
//! against a plain in-memory model of what the spool promises. After every step the two must
//! agree; proptest shrinks a failing sequence to a short one.
//!
//! The model holds the records in key order (a `BTreeMap`: what `read_after` returns) and in
//! arrival order (a `VecDeque`: what the full policies evict first). It states exactly:
//! - the records: which keys, their frames byte for byte, `read_after`'s key order and paging;
//! - the full policies: `drop_oldest` (and `decimate` when full) evicts the records that
//!   arrived first, across reopens, no more than needed to fit the new frame; `drop_newest`
//!   refuses the new frame and evicts nothing; `decimate` past its threshold keeps one sequence
//!   number in N; a frame that would not fit even with every frame evicted is refused and
//!   evicts nothing; and what each push reports: the keys it evicted, oldest first, and why it refused the frame;
//! - a push of a key already spooled keeps the first copy, and drops and evicts nothing;
//! - `remove` is true exactly for a spooled key, and its file is gone at once;
//! - `frames/` holds one file per record and nothing else, and file ids grow with arrival;
//! - `stats()`: `records`, no damage, and `disk_bytes`: between flushes it moves by exactly the
//!   allocation of the files written and deleted; after a flush or an open it equals the
//!   allocation measured under the directory.
//!
//! What depends on the filesystem is read from it, not modelled: the allocation of each frame
//! file (`stat`) and the size of the sled index (inside `disk_bytes`). Whether a frame fits is
//! then exact: the spool's own rule (length rounded up to 4 KiB, against `disk_bytes`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use framelink_common::FrameMeta;
use proptest::prelude::*;
use proptest::sample::Index;

use super::ReadLimit;
use super::record::{self, SpoolKey};
use super::sled_spool::{SledSpool, disk_usage};
use super::{DropReason, FullPolicy, PushOutcome, Spool, SpoolConfig};
use crate::frame::Frame;

const CAMERAS: u8 = 3;
/// Sequence numbers drawn per camera: few enough that keys repeat (retries of a frame).
const SEQS: u64 = 40;
/// Largest payload of an ordinary push; about 20 such frames fill the cap.
const MAX_PAYLOAD: usize = 100_000;
/// The cap: small, so that pushes hit it within a few dozen steps. The spool's own minimum
/// (4 MiB) is a config check, not a limit of the store.
const MAX_BYTES: u64 = 1536 * 1024;

#[derive(Clone, Debug)]
enum Op {
    Push { camera: u8, seq: u64, len: usize },
    /// A frame larger than the whole cap.
    PushOversized { camera: u8, seq: u64 },
    /// `skip_odd`: passing over the records with odd sequence numbers (as the drain passes
    /// over the frames it holds).
    /// `bytes`: a byte limit on the files read, and whether the first record comes regardless.
    Read { after: Option<(u8, u64)>, max: usize, skip_odd: bool, bytes: Option<(u64, bool)> },
    /// Removes a spooled record (any, when the spool is empty: then absent).
    RemoveSpooled(Index),
    /// Removes a key that may or may not be spooled.
    RemoveKey { camera: u8, seq: u64 },
    /// What the forwarder does when the link is back: read the first records, remove them.
    Drain(usize),
    Flush,
    /// Drops the spool (after a flush, or not) and opens the directory again.
    Reopen { flush: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        20 => (0..CAMERAS, 0..SEQS, 1..MAX_PAYLOAD).prop_map(|(camera, seq, len)| Op::Push { camera, seq, len }),
        1 => (0..CAMERAS, 0..SEQS).prop_map(|(camera, seq)| Op::PushOversized { camera, seq }),
        3 => (proptest::option::of((0..CAMERAS, 0..SEQS)), 1..8usize, any::<bool>(), proptest::option::of((0..4 * MAX_PAYLOAD as u64, any::<bool>())))
            .prop_map(|(after, max, skip_odd, bytes)| Op::Read { after, max, skip_odd, bytes }),
        3 => any::<Index>().prop_map(Op::RemoveSpooled),
        1 => (0..CAMERAS, 0..SEQS).prop_map(|(camera, seq)| Op::RemoveKey { camera, seq }),
        1 => (1..8usize).prop_map(Op::Drain),
        2 => Just(Op::Flush),
        2 => any::<bool>().prop_map(|flush| Op::Reopen { flush }),
    ]
}

fn policy() -> impl Strategy<Value = (FullPolicy, u32)> {
    (prop_oneof![Just(FullPolicy::DropOldest), Just(FullPolicy::DropNewest), Just(FullPolicy::Decimate)], 2..5u32)
}

fn camera(c: u8) -> String {
    format!("cam{c}")
}

/// A frame whose payload depends on its length too: a retry with another length is told apart.
fn frame(camera_no: u8, seq: u64, len: usize) -> Frame {
    let fill = (seq as u8).wrapping_mul(31) ^ (len as u8) ^ camera_no;
    let payload: Vec<u8> = (0..len).map(|i| fill.wrapping_add((i / 4096) as u8)).collect();
    Frame {
        meta: FrameMeta {
            device_id: "dev".into(),
            camera_id: camera(camera_no),
            seq,
            capture_ns: 1_000_000 + seq,
            width: 8,
            height: 8,
            pixel_format: "RGB24".into(),
            content_type: "image/jpeg".into(),
            clock: Default::default(),
        },
        payload: Bytes::from(payload),
    }
}

/// Disk space a record is expected to take when judging whether it fits: whole 4 KiB blocks.
fn predicted(record_len: usize) -> u64 {
    (record_len as u64).div_ceil(4096) * 4096
}

fn allocation(path: &Path) -> u64 {
    std::fs::symlink_metadata(path).map_or(0, |md| md.blocks() * 512)
}

/// The frame files: id -> allocation. Anything else in `frames/` (a temporary file, a stray) fails.
fn frame_files(frames_dir: &Path) -> BTreeMap<u64, u64> {
    let mut files = BTreeMap::new();
    for e in std::fs::read_dir(frames_dir).unwrap().flatten() {
        let name = e.file_name().into_string().unwrap();
        let id = name
            .strip_prefix('f')
            .filter(|hex| hex.len() == 16)
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .unwrap_or_else(|| panic!("frames/ holds {name:?}, not a frame file"));
        files.insert(id, allocation(&e.path()));
    }
    files
}

/// What the spool promises, in memory.
#[derive(Default)]
struct Model {
    /// Key order, as `read_after` returns them.
    frames: BTreeMap<SpoolKey, Frame>,
    /// Arrival order, oldest first, as the full policies evict them.
    arrival: VecDeque<SpoolKey>,
    /// The file each record was written to (observed at its push, not predicted).
    file_of: BTreeMap<SpoolKey, u64>,
}

impl Model {
    fn remove(&mut self, key: &SpoolKey) -> Option<u64> {
        self.frames.remove(key)?;
        self.arrival.retain(|k| k != key);
        self.file_of.remove(key)
    }
}

struct Harness {
    cfg: SpoolConfig,
    frames_dir: PathBuf,
    spool: Option<SledSpool>,
    model: Model,
    /// Steps so far, for failure messages.
    step: usize,
}

/// Opens the spool again in the same process. sled's flusher thread may still hold the dropped
/// database (and its file lock), and with it the spool's own directory lock, for a moment; a
/// new process never meets this, since the locks go with the old one's exit.
pub(in crate::spool) fn reopen(cfg: &SpoolConfig) -> SledSpool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match SledSpool::open(cfg.clone()) {
            Ok(s) => return s,
            Err(e) if format!("{e:#}").contains("in use by another") && std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(e) => panic!("reopening the spool: {e:#}"),
        }
    }
}

impl Harness {
    fn new(dir: &Path, (when_full, keep_one_in): (FullPolicy, u32)) -> Self {
        let cfg = SpoolConfig {
            dir: dir.to_path_buf(),
            max_bytes: bytesize::ByteSize::b(MAX_BYTES),
            when_full,
            decimate_keep_one_in: keep_one_in,
            decimate_from: 0.5,
            ..SpoolConfig::default()
        };
        let spool = SledSpool::open(cfg.clone()).unwrap();
        Self { frames_dir: dir.join("frames"), cfg, spool: Some(spool), model: Model::default(), step: 0 }
    }

    fn spool(&self) -> &SledSpool {
        self.spool.as_ref().expect("open")
    }

    fn apply(&mut self, op: &Op) {
        self.step += 1;
        match *op {
            Op::Push { camera, seq, len } => self.push(frame(camera, seq, len)),
            Op::PushOversized { camera, seq } => self.push(frame(camera, seq, MAX_BYTES as usize + 1)),
            Op::Read { after, max, skip_odd, bytes } => {
                let after = after.map(|(c, s)| SpoolKey::new(&camera(c), s));
                let limit = match bytes {
                    Some((bytes, at_least_one)) => ReadLimit { records: max, bytes, at_least_one },
                    None => ReadLimit::records(max),
                };
                self.read_skipping(after.as_ref(), limit, skip_odd);
            }
            Op::RemoveSpooled(i) => {
                let key = match self.model.frames.len() {
                    0 => SpoolKey::new("absent", 0),
                    n => self.model.frames.keys().nth(i.index(n)).unwrap().clone(),
                };
                self.remove(&key);
            }
            Op::RemoveKey { camera: c, seq } => self.remove(&SpoolKey::new(&camera(c), seq)),
            Op::Drain(n) => {
                for key in self.read(None, n) {
                    self.remove(&key);
                }
            }
            Op::Flush => {
                self.spool().flush().unwrap();
                self.check_measured("after a flush");
            }
            Op::Reopen { flush } => {
                if flush {
                    self.spool().flush().unwrap();
                }
                drop(self.spool.take());
                self.spool = Some(reopen(&self.cfg));
                self.check_measured("after a reopen");
                self.check_all_records();
            }
        }
        self.check_cheap();
    }

    fn push(&mut self, frame: Frame) {
        let step = self.step;
        let key = SpoolKey::new(&frame.meta.camera_id, frame.meta.seq);
        let before = self.spool().stats();
        let files = frame_files(&self.frames_dir);
        let size = predicted(record::encode(&frame).len());
        let max = MAX_BYTES;

        // What the model says: refuse, or evict the first arrivals until the frame fits.
        let mut expected = PushOutcome::default();
        let mut disk = before.disk_bytes;
        let mut evict = 0;
        let mut refused = None;
        let frames_bytes: u64 = files.values().sum();
        if self.model.frames.contains_key(&key) {
            // A retry: stored already.
        } else if self.cfg.when_full == FullPolicy::Decimate
            && disk as f64 >= self.cfg.decimate_from * max as f64
            && !frame.meta.seq.is_multiple_of(u64::from(self.cfg.decimate_keep_one_in))
        {
            refused = Some(DropReason::Decimated);
        } else if disk + size > max {
            if self.cfg.when_full == FullPolicy::DropNewest || disk - frames_bytes + size > max {
                refused = Some(DropReason::FullNewest);
            } else {
                while disk + size > max {
                    let Some(oldest) = self.model.arrival.get(evict) else {
                        refused = Some(DropReason::FullNewest);
                        break;
                    };
                    disk -= files[&self.model.file_of[oldest]];
                    evict += 1;
                }
            }
        }
        let mut freed = 0;
        for key in self.model.arrival.clone().iter().take(evict) {
            expected.evicted.push(key.clone());
            freed += files[&self.model.remove(key).unwrap()];
        }
        expected.refused = refused;
        expected.stored = refused.is_none();
        let new_record = expected.stored && !self.model.frames.contains_key(&key);

        let out = self.spool().push(&frame).unwrap();
        assert_eq!(out, expected, "step {step}: push {key} ({} bytes, disk_bytes {} before)", frame.payload.len(), before.disk_bytes);

        let after = frame_files(&self.frames_dir);
        let added: Vec<u64> = after.keys().filter(|id| !files.contains_key(id)).copied().collect();
        let mut written = 0;
        if new_record {
            assert_eq!(added.len(), 1, "step {step}: push {key} wrote one file");
            let id = added[0];
            assert!(files.keys().all(|old| *old < id), "step {step}: file ids grow with arrival ({id} after {:?})", files.keys().last());
            written = after[&id];
            self.model.frames.insert(key.clone(), frame);
            self.model.arrival.push_back(key.clone());
            self.model.file_of.insert(key, id);
        } else {
            assert!(added.is_empty(), "step {step}: push {key} wrote no file");
        }
        assert_eq!(self.spool().stats().disk_bytes, before.disk_bytes - freed + written, "step {step}: disk_bytes moves by the files written and deleted");
    }

    /// Reads as the forwarder does and compares with the model's records after `after`.
    fn read(&mut self, after: Option<&SpoolKey>, max: usize) -> Vec<SpoolKey> {
        self.read_skipping(after, ReadLimit::records(max), false)
    }

    fn read_skipping(&mut self, after: Option<&SpoolKey>, limit: ReadLimit, skip_odd: bool) -> Vec<SpoolKey> {
        let skip = |k: &SpoolKey| skip_odd && k.parts().is_some_and(|(_, seq)| seq % 2 == 1);
        let got = self.spool().read_after_skipping(after, limit, &skip).unwrap();
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        // The limit counts each record's file: the record as written.
        let mut want: Vec<(&SpoolKey, &Frame)> = Vec::new();
        let mut bytes = 0;
        for (k, f) in self.model.frames.range((lower, Bound::Unbounded)).filter(|(k, _)| !skip(k)) {
            let size = record::encode(f).len() as u64;
            // Written out, not `ReadLimit::fits`: the oracle must not share the code it checks.
            let first_anyway = want.is_empty() && limit.at_least_one;
            if want.len() >= limit.records || (!first_anyway && bytes + size > limit.bytes) {
                break;
            }
            bytes += size;
            want.push((k, f));
        }
        let max = limit.records;
        let got_keys: Vec<&SpoolKey> = got.iter().map(|(k, _)| k).collect();
        let want_keys: Vec<&SpoolKey> = want.iter().map(|(k, _)| *k).collect();
        assert_eq!(got_keys, want_keys, "step {}: read_after({after:?}, {limit:?} (max {max}), skip_odd {skip_odd})", self.step);
        for ((key, frame), (_, model)) in got.iter().zip(&want) {
            assert_eq!(frame.as_ref().unwrap_or_else(|e| panic!("step {}: {key} damaged: {e}", self.step)), *model, "step {}: {key}", self.step);
        }
        got.into_iter().map(|(k, _)| k).collect()
    }

    fn remove(&mut self, key: &SpoolKey) {
        let step = self.step;
        let before = self.spool().stats().disk_bytes;
        let file = self.model.remove(key);
        let alloc = file.map_or(0, |id| frame_files(&self.frames_dir)[&id]);
        assert_eq!(self.spool().remove(key).unwrap(), file.is_some(), "step {step}: remove {key}");
        // `stats` waits for the deleting thread: the file is gone and its space given back.
        assert_eq!(self.spool().stats().disk_bytes, before - alloc, "step {step}: remove {key} gives its file's space back");
        if let Some(id) = file {
            assert!(!frame_files(&self.frames_dir).contains_key(&id), "step {step}: the file of {key} is deleted");
        }
    }

    /// After every step: counts, no damage, one file per record.
    fn check_cheap(&self) {
        let stats = self.spool().stats();
        assert_eq!(stats.records, self.model.frames.len() as u64, "step {}: records", self.step);
        assert_eq!(stats.damaged, 0, "step {}: damaged", self.step);
        let files: BTreeSet<u64> = frame_files(&self.frames_dir).into_keys().collect();
        let model: BTreeSet<u64> = self.model.file_of.values().copied().collect();
        assert_eq!(files, model, "step {}: frame files", self.step);
    }

    /// After a flush or an open, `disk_bytes` is what the directory occupies.
    fn check_measured(&self, when: &str) {
        assert_eq!(self.spool().stats().disk_bytes, disk_usage(&self.cfg.dir), "step {}: disk_bytes {when}", self.step);
    }

    /// Every record, in key order, byte for byte.
    fn check_all_records(&mut self) {
        let n = self.model.frames.len();
        assert_eq!(self.read(None, usize::MAX).len(), n);
    }
}

fn run(policy: (FullPolicy, u32), ops: &[Op]) {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(dir.path(), policy);
    for op in ops {
        h.apply(op);
    }
    h.check_all_records();
    h.spool().flush().unwrap();
    h.check_measured("at the end");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_spool_behaves_as_its_model(policy in policy(), ops in proptest::collection::vec(op(), 1..100)) {
        run(policy, &ops);
    }
}
