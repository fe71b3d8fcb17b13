//! Per-camera sequence numbers that keep increasing across restarts and crashes.
//!
//! Writing every number to disk would wear flash, so numbers are reserved in blocks: before a
//! camera uses number `n`, a file records that numbers below `n + BLOCK` may be in use
//! (written to a temporary file, fsynced, renamed over the old one, directory fsynced). After
//! a crash the camera resumes at the recorded bound, so a number is never reused; the cost is
//! a gap of at most one block. A clean shutdown records the exact next number, so a restart
//! leaves no gap.
//!
//! The next block is reserved when half of the current one is left, so a disk that refuses
//! writes (full, read-only) does not stop a camera at once: it keeps numbering for at least
//! `BLOCK / 2` frames while [`SequenceStore::next`] reports each failed reservation
//! ([`Next::unreserved`]); only past the recorded bound does it refuse numbers (the caller
//! drops those frames, counted), and it reserves again as soon as the disk takes the write.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Numbers reserved per disk write.
pub const BLOCK: u64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum SequenceError {
    #[error("sequence file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sequence file {}: content {content:?} is not a number", path.display())]
    Corrupt { path: PathBuf, content: String },
}

/// A number, and the reservation error if the disk refused the next block (the number itself
/// is from the block reserved before, so it is safe to use).
#[derive(Debug)]
pub struct Next {
    pub seq: u64,
    pub unreserved: Option<SequenceError>,
}

#[derive(Debug)]
struct Camera {
    next: u64,
    reserved: u64,
}

/// Hands out sequence numbers for each camera.
#[derive(Debug)]
pub struct SequenceStore {
    dir: PathBuf,
    cameras: Mutex<HashMap<String, Camera>>,
}

impl SequenceStore {
    pub fn open(dir: &Path) -> Result<Self, SequenceError> {
        fs::create_dir_all(dir).map_err(|source| SequenceError::Io { path: dir.to_path_buf(), source })?;
        Ok(Self { dir: dir.to_path_buf(), cameras: Mutex::new(HashMap::new()) })
    }

    fn path(&self, camera: &str) -> PathBuf {
        self.dir.join(format!("{camera}.next"))
    }

    fn read(&self, camera: &str) -> Result<u64, SequenceError> {
        let path = self.path(camera);
        match fs::read_to_string(&path) {
            Ok(s) => match s.trim().parse() {
                Ok(n) => Ok(n),
                Err(_) => {
                    // Never crash-loop on a damaged file, and never reuse a number: restart
                    // above anything a camera can have reached, microseconds since the epoch
                    // (a camera would need > 10^15 frames to get there).
                    let fallback = crate::frame::now_ns() / 1000;
                    let e = SequenceError::Corrupt { path, content: s.chars().take(40).collect() };
                    tracing::error!(camera, error = %e, fallback, "Sequence file damaged; continuing from a time-based number.");
                    Ok(fallback)
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(source) => Err(SequenceError::Io { path, source }),
        }
    }

    fn write(&self, camera: &str, value: u64) -> Result<(), SequenceError> {
        let path = self.path(camera);
        let tmp = self.dir.join(format!(".{camera}.next.tmp"));
        let io = |source| SequenceError::Io { path: path.clone(), source };
        let mut f = File::create(&tmp).map_err(io)?;
        writeln!(f, "{value}").map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::rename(&tmp, &path).map_err(io)?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(())
    }

    /// The next number for `camera`; reserves the next block on disk when half of the current
    /// one is used. Fails only when no reserved number is left and the reservation fails.
    pub fn next(&self, camera: &str) -> Result<u64, SequenceError> {
        self.next_checked(camera).map(|n| n.seq)
    }

    /// As [`next`](Self::next), also saying whether a reservation failed (numbers left from
    /// the block reserved earlier are still handed out).
    pub fn next_checked(&self, camera: &str) -> Result<Next, SequenceError> {
        let mut cams = self.cameras.lock().expect("sequence lock");
        if !cams.contains_key(camera) {
            let start = self.read(camera)?;
            cams.insert(camera.to_owned(), Camera { next: start, reserved: start });
        }
        let c = cams.get_mut(camera).expect("inserted above");
        let mut unreserved = None;
        if c.reserved.saturating_sub(c.next) <= BLOCK / 2 {
            let bound = c.next + BLOCK;
            match self.write(camera, bound) {
                Ok(()) => c.reserved = bound,
                Err(e) if c.next < c.reserved => unreserved = Some(e),
                Err(e) => return Err(e),
            }
        }
        let n = c.next;
        c.next += 1;
        Ok(Next { seq: n, unreserved })
    }

    /// Records each camera's exact next number (clean shutdown: no gap on restart).
    pub fn close(&self) -> Result<(), SequenceError> {
        let cams = self.cameras.lock().expect("sequence lock");
        for (camera, c) in cams.iter() {
            self.write(camera, c.next)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_after_clean_close_and_skips_a_block_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let s = SequenceStore::open(dir.path()).unwrap();
        assert_eq!((0..5).map(|_| s.next("a").unwrap()).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
        assert_eq!(s.next("b").unwrap(), 0);
        s.close().unwrap();
        drop(s);

        let s = SequenceStore::open(dir.path()).unwrap();
        assert_eq!(s.next("a").unwrap(), 5, "clean restart: no gap");
        drop(s); // a crash: no close()

        let s = SequenceStore::open(dir.path()).unwrap();
        assert_eq!(s.next("a").unwrap(), 5 + BLOCK, "after a crash the reserved block is skipped, never reused");
        assert_eq!(s.next("b").unwrap(), 1);
    }

    #[test]
    fn a_refused_reservation_uses_the_reserved_numbers_left_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let s = SequenceStore::open(dir.path()).unwrap();
        for _ in 0..BLOCK / 2 {
            s.next("cam").unwrap();
        }
        // The disk refuses writes: the temporary file's path is taken by a directory.
        let tmp = dir.path().join(".cam.next.tmp");
        fs::create_dir(&tmp).unwrap();
        let n = s.next_checked("cam").unwrap();
        assert_eq!(n.seq, BLOCK / 2, "numbers keep coming from the reserved block");
        assert!(n.unreserved.is_some(), "the failed reservation is reported");
        for _ in 0..BLOCK / 2 - 1 {
            s.next("cam").unwrap();
        }
        let e = s.next("cam").unwrap_err();
        assert!(e.to_string().contains("cam.next"), "past the recorded bound: refused, naming the file: {e}");
        // The disk takes writes again: numbering continues without a reuse or a stop.
        fs::remove_dir(&tmp).unwrap();
        let n = s.next_checked("cam").unwrap();
        assert_eq!((n.seq, n.unreserved.is_none()), (BLOCK, true));
        drop(s); // crash
        let s = SequenceStore::open(dir.path()).unwrap();
        assert!(s.next("cam").unwrap() > BLOCK, "after a crash, above every number used");
    }

    #[test]
    fn a_damaged_file_restarts_above_any_reachable_number() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cam.next"), "garbage").unwrap();
        let s = SequenceStore::open(dir.path()).unwrap();
        let n = s.next("cam").unwrap();
        assert!(n > 1_700_000_000_000_000, "time-based restart, got {n}");
        assert_eq!(s.next("cam").unwrap(), n + 1);
    }
}
