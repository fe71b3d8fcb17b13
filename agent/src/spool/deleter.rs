//! Deleting delivered frames' files on a thread of their own.
//!
//! While the agent drains a backlog, every acknowledged frame's file is deleted. An `unlink` of
//! a 250 KB file cost a median 200 µs on the development VM (ext4 mounted with `discard`;
//! 334 µs under strace on another), as much as a third of the forwarder's time per frame at
//! the drain's rate of well over 1000 frames/s — spent on the one thread that feeds Kafka. The
//! spool therefore takes a delivered frame out of its index at once (it is gone for every
//! reader from then on) and hands the file to this thread.
//!
//! The disk accounting stays exact: a queued file's bytes stay counted ([`Deleter::bytes`])
//! until its `unlink` returns, so the cap never lets a new frame in on space not yet given
//! back. Where that matters — a frame that would be refused, evicted or decimated, a flush, the
//! stats, an index rebuild — the spool first waits for the queue to empty ([`Deleter::settle`]);
//! evicting the oldest frame to make room deletes its file on the caller's thread, since the
//! space is needed now. A file that cannot be deleted stays counted, as a file that is there.
//!
//! A crash between the index update and the `unlink`: the index's removal is made durable only
//! by a flush, which waits for the queue first, so the index usually still names the frame and
//! it is sent again (or, its file already gone, reported as damaged); a removal that did reach
//! the disk leaves a file the index does not name, which the next open indexes again — sent a
//! second time, at-least-once; nothing is lost. Dropping the deleter finishes the queue. If the
//! thread panics, the files it had not deleted stay (counted until the spool measures its
//! directory again) and callers delete on their own thread from then on.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::Sender;

/// Files waiting at most; past that, [`Deleter::delete`] waits for the thread. At a few hundred
/// microseconds an `unlink`, a full queue is under 0.1 s of work for [`Deleter::settle`].
const QUEUE: usize = 256;

#[derive(Default)]
struct Queue {
    /// Files handed over and not yet deleted (or given up on).
    files: usize,
    /// Their allocation, plus that of files the thread could not delete.
    bytes: u64,
    /// The thread is gone (it panicked): callers delete on their own thread.
    dead: bool,
}

/// Marks the queue dead if the thread ends other than by the channel closing (a panic): what
/// it had not deleted is forgotten (those files stay, counted until the spool measures its
/// directory again, and are sent again after a restart), so that [`Deleter::settle`] never
/// waits for a thread that is gone.
struct Obituary(Arc<Shared>);

impl Drop for Obituary {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut q = self.0.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.dead = true;
            q.files = 0;
            self.0.idle.notify_all();
        }
    }
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    idle: Condvar,
    /// Tests: held to stall the thread before its next deletion.
    #[cfg(test)]
    gate: Arc<Mutex<()>>,
    /// Tests: the thread panics at its next file.
    #[cfg(test)]
    kill: std::sync::atomic::AtomicBool,
}

pub struct Deleter {
    tx: Option<Sender<(PathBuf, u64)>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Deleter {
    pub fn start() -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::bounded::<(PathBuf, u64)>(QUEUE);
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new().name("spool-delete".into()).spawn(move || {
            let _obituary = Obituary(s.clone());
            for (path, bytes) in rx {
                #[cfg(test)]
                drop(s.gate.lock());
                #[cfg(test)]
                assert!(!s.kill.load(std::sync::atomic::Ordering::SeqCst), "killed by the test");
                let gone = match std::fs::remove_file(&path) {
                    Ok(()) => true,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                    Err(e) => {
                        // Still there and still counted; the next open finds it without an index
                        // entry and indexes it again: the frame is sent again, not lost.
                        tracing::error!(file = %path.display(), error = %e, "Cannot delete a delivered frame's spool file.");
                        false
                    }
                };
                let mut q = s.queue.lock().unwrap_or_else(|p| p.into_inner());
                q.files = q.files.saturating_sub(1);
                if gone {
                    q.bytes = q.bytes.saturating_sub(bytes);
                }
                if q.files == 0 {
                    s.idle.notify_all();
                }
            }
        })?;
        Ok(Self { tx: Some(tx), shared, thread: Some(thread) })
    }

    /// Queues `path`, which occupies `bytes` on disk, for deletion.
    pub fn delete(&self, path: PathBuf, bytes: u64) {
        let alive = {
            let mut q = self.queue();
            if !q.dead {
                q.files += 1;
                q.bytes += bytes;
            }
            !q.dead
        };
        let path = if alive {
            match self.tx.as_ref().expect("deleter running").send((path, bytes)) {
                Ok(()) => return,
                Err(crossbeam_channel::SendError((path, _))) => {
                    // The thread died meanwhile (its obituary zeroed the count).
                    let mut q = self.queue();
                    q.bytes = q.bytes.saturating_sub(bytes);
                    path
                }
            }
        } else {
            path
        };
        Self::delete_here(&path, bytes, &self.shared);
    }

    /// The thread is gone: `path` is deleted on the caller's thread (counted if it stays).
    fn delete_here(path: &std::path::Path, bytes: u64, shared: &Shared) {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "Cannot delete a delivered frame's spool file.");
                shared.queue.lock().unwrap_or_else(|p| p.into_inner()).bytes += bytes;
            }
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic elsewhere while holding it leaves the counts as they were: still usable.
        self.shared.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes of the files queued, and of those that could not be deleted.
    pub fn bytes(&self) -> u64 {
        self.queue().bytes
    }

    /// Whether files wait to be deleted.
    pub fn busy(&self) -> bool {
        self.queue().files > 0
    }

    /// Waits until every queued file is deleted (or given up on).
    pub fn settle(&self) {
        let q = self.queue();
        drop(self.shared.idle.wait_while(q, |q| q.files > 0 && !q.dead).unwrap_or_else(|p| p.into_inner()));
    }

    /// Tests: the lock the thread takes before each deletion.
    #[cfg(test)]
    pub fn gate(&self) -> Arc<Mutex<()>> {
        self.shared.gate.clone()
    }

    /// Forgets the bytes of files that could not be deleted, after the caller measured the
    /// directory again (they are in that measure).
    pub fn remeasured(&self) {
        self.settle();
        self.queue().bytes = 0;
    }
}

impl Drop for Deleter {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_files_are_deleted_and_counted_until_then() {
        let dir = tempfile::tempdir().unwrap();
        let d = Deleter::start().unwrap();
        let paths: Vec<_> = (0..50).map(|i| dir.path().join(format!("f{i}"))).collect();
        for p in &paths {
            std::fs::write(p, [0u8; 5000]).unwrap();
        }
        for p in &paths {
            d.delete(p.clone(), 8192);
        }
        d.settle();
        assert!(!d.busy());
        assert_eq!(d.bytes(), 0);
        assert!(paths.iter().all(|p| !p.exists()), "every file deleted");
    }

    #[test]
    fn a_file_that_cannot_be_deleted_stays_counted_until_remeasured() {
        let dir = tempfile::tempdir().unwrap();
        let d = Deleter::start().unwrap();
        // A non-empty directory cannot be removed with remove_file.
        let stuck = dir.path().join("stuck");
        std::fs::create_dir(&stuck).unwrap();
        std::fs::write(stuck.join("x"), b"x").unwrap();
        let gone = dir.path().join("gone");
        d.delete(stuck.clone(), 4096);
        d.delete(gone, 8192); // already absent: fine, and uncounted
        d.settle();
        assert_eq!(d.bytes(), 4096, "the file still there is still counted");
        assert!(stuck.exists());
        d.remeasured();
        assert_eq!(d.bytes(), 0);
    }

    #[test]
    fn a_deleter_whose_thread_died_never_leaves_settle_waiting_and_deletes_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let d = Deleter::start().unwrap();
        // The thread panics at its next file (a test-only switch).
        d.shared.kill.store(true, std::sync::atomic::Ordering::SeqCst);
        let a = dir.path().join("a");
        std::fs::write(&a, b"frame").unwrap();
        d.delete(a.clone(), 4096);
        // The thread panics on this file; settle returns, and later files are deleted here.
        d.settle();
        let b = dir.path().join("b");
        std::fs::write(&b, b"frame").unwrap();
        d.delete(b.clone(), 4096);
        d.settle();
        assert!(!b.exists(), "deleted on the caller's thread");
        assert!(d.queue().dead);
    }

    #[test]
    fn dropping_the_deleter_finishes_its_queue() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<_> = (0..20).map(|i| dir.path().join(format!("f{i}"))).collect();
        {
            let d = Deleter::start().unwrap();
            for p in &paths {
                std::fs::write(p, b"frame").unwrap();
                d.delete(p.clone(), 4096);
            }
        }
        assert!(paths.iter().all(|p| !p.exists()));
    }
}
