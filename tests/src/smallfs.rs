//! A small file system (tmpfs) of a test's own, to fill a disk up without filling the machine's:
//! the spool's full-disk tests mount one under the spool. Mounting needs root, as CI has.

use std::io::Write;
use std::path::Path;

/// A size-limited tmpfs mounted on a temporary directory, unmounted when dropped.
pub struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    /// Mounts a tmpfs of `size` (`mount -o size=`, e.g. `"24m"`); panics, saying why, if it
    /// cannot (not root).
    pub fn mount(size: &str) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir.path()).output().expect("running mount");
        assert!(out.status.success(), "this test mounts a size-limited tmpfs (needs root, as CI has): {}", String::from_utf8_lossy(&out.stderr));
        SmallFs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the file system with a ballast file until it refuses more.
    pub fn fill(&self) {
        let mut f = std::fs::File::create(self.dir.path().join("ballast")).unwrap();
        let chunk = vec![0xA5u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        for len in [4096, 512, 1] {
            while f.write_all(&chunk[..len]).is_ok() {}
        }
        let _ = f.sync_all();
    }

    /// Deletes the ballast of [`SmallFs::fill`].
    pub fn free(&self) {
        std::fs::remove_file(self.dir.path().join("ballast")).unwrap();
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}
