//! Per-camera sequence numbers that keep increasing across restarts and crashes.
//!
//! Writing every number to disk would wear flash, so numbers are reserved in blocks: before a
//! camera uses number `n`, a file records that numbers below `n + BLOCK` may be in use
//! (written to a temporary file, fsynced, renamed over the old one, directory fsynced). After
//! a crash the camera resumes at the recorded bound, so a number is never reused; the cost is
//! a gap of at most one block. A clean shutdown records the exact next number, so a restart
//! leaves no gap.

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

    /// The next number for `camera`; reserves a new block on disk when needed.
    pub fn next(&self, camera: &str) -> Result<u64, SequenceError> {
        let mut cams = self.cameras.lock().expect("sequence lock");
        if !cams.contains_key(camera) {
            let start = self.read(camera)?;
            cams.insert(camera.to_owned(), Camera { next: start, reserved: start });
        }
        let c = cams.get_mut(camera).expect("inserted above");
        if c.next >= c.reserved {
            let bound = c.next + BLOCK;
            self.write(camera, bound)?;
            c.reserved = bound;
        }
        let n = c.next;
        c.next += 1;
        Ok(n)
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
    fn a_damaged_file_restarts_above_any_reachable_number() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cam.next"), "garbage").unwrap();
        let s = SequenceStore::open(dir.path()).unwrap();
        let n = s.next("cam").unwrap();
        assert!(n > 1_700_000_000_000_000, "time-based restart, got {n}");
        assert_eq!(s.next("cam").unwrap(), n + 1);
    }
}
