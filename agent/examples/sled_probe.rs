//! Measures what sled 0.34 occupies on disk for spool-like use (200 KB values) at several
//! segment sizes: the figures behind the spool design (see src/spool/sled_spool.rs).
//! Run: `cargo run --release -p framelink-agent --example sled_probe`.
use std::time::Instant;
fn du(p: &std::path::Path) -> u64 { framelink_agent::spool::sled_spool::disk_usage(p) }
fn main() {
    for (seg, mode) in [(512 * 1024usize, sled::Mode::LowSpace), (1 << 20, sled::Mode::LowSpace), (2 << 20, sled::Mode::LowSpace), (4 << 20, sled::Mode::LowSpace), (8 << 20, sled::Mode::LowSpace)] {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).mode(mode).cache_capacity(4 << 20).segment_size(seg).flush_every_ms(Some(200)).open().unwrap();
        db.flush().unwrap();
        let empty = du(dir.path());
        let v = vec![7u8; 200_000];
        let t = Instant::now();
        for i in 0..100u64 { db.insert(i.to_be_bytes(), v.clone()).unwrap(); }
        db.flush().unwrap();
        let full = du(dir.path());
        let blobs = du(&dir.path().join("blobs"));
        let files: Vec<String> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| format!("{}={}", e.file_name().to_string_lossy(), du(&e.path()).max(e.metadata().unwrap().len()))).collect();
        println!("   blobs {blobs} files {files:?}");
        for i in 0..100u64 { db.remove(i.to_be_bytes()).unwrap(); }
        db.flush().unwrap();
        let after = du(dir.path());
        println!("seg {seg:>8} {mode:?}: empty {empty:>9}  100x200KB {full:>9} ({:.2}x)  after delete {after:>9}  {:?}", full as f64 / 20e6, t.elapsed());
    }
}
