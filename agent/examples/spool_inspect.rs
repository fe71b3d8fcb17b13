//! Reads a spool directory the way the agent finds it after a crash, for tests/vm/powercut:
//! `spool_inspect <spool dir>` prints one JSON object.
//!
//! 1. `raw`: every file of `frames/` as it lies, decoded without the index: the frames per
//!    camera (sequence ranges), files that hold no valid record (with the reason), and
//!    sequence numbers held by more than one file.
//! 2. `open`: the agent's own `SledSpool::open` on the directory — this CHANGES it (damaged
//!    files are moved aside, the index completed), so run it on a copy — then every record
//!    read back in key order (`read_after`, nothing removed): records, damaged as counted by
//!    the spool, frames per camera, records that failed to read.
//! 3. `sequence`: each camera's persisted sequence reservation (`sequence/<camera>.next`).
//!
//! Build: `cargo build -p framelink-agent --example spool_inspect`.
use std::collections::BTreeMap;
use std::path::Path;

use framelink_agent::spool::sled_spool::SledSpool;
use framelink_agent::spool::{Spool, SpoolConfig, SpoolKey, record};
use serde_json::{Value, json};

/// Sorted, deduplicated sequence numbers as `[[first, last], …]`.
fn ranges(mut seqs: Vec<u64>) -> Value {
    seqs.sort_unstable();
    seqs.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for s in seqs {
        match out.last_mut() {
            Some(r) if r.1 + 1 == s => r.1 = s,
            _ => out.push((s, s)),
        }
    }
    json!(out.iter().map(|&(a, b)| [a, b]).collect::<Vec<_>>())
}

fn raw(dir: &Path) -> Value {
    let mut by_key: BTreeMap<(String, u64), Vec<String>> = BTreeMap::new();
    let mut bad = Vec::new();
    let (mut files, mut tmp) = (0, 0);
    let frames = dir.join("frames");
    let mut names: Vec<_> = std::fs::read_dir(&frames).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    names.sort();
    for name in names {
        let name = name.to_string_lossy().into_owned();
        files += 1;
        if name.ends_with(".tmp") {
            tmp += 1;
        }
        let bytes = match std::fs::read(frames.join(&name)) {
            Ok(b) => b,
            Err(e) => {
                bad.push(json!({"file": name, "why": e.to_string()}));
                continue;
            }
        };
        match record::decode_unkeyed(&bytes) {
            Ok(f) => by_key.entry((f.meta.camera_id.clone(), f.meta.seq)).or_default().push(name),
            Err(e) => bad.push(json!({"file": name, "bytes": bytes.len(), "why": e})),
        }
    }
    let mut cameras: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut dups = Vec::new();
    for ((camera, seq), holders) in by_key {
        if holders.len() > 1 {
            dups.push(json!({"camera": camera, "seq": seq, "files": holders}));
        }
        cameras.entry(camera).or_default().push(seq);
    }
    json!({
        "files": files,
        "tmp": tmp,
        "bad": bad,
        "duplicates": dups,
        "cameras": cameras.into_iter().map(|(c, s)| (c, ranges(s))).collect::<BTreeMap<_, _>>(),
    })
}

fn opened(dir: &Path) -> Value {
    // A cap far above the test disk, so that nothing is evicted or pruned here.
    let cfg = SpoolConfig { dir: dir.to_path_buf(), max_bytes: bytesize::ByteSize::gib(64), ..SpoolConfig::default() };
    let spool = match SledSpool::open(cfg) {
        Ok(s) => s,
        Err(e) => return json!({"ok": false, "error": format!("{e:#}")}),
    };
    let at_open = spool.stats();
    let mut cameras: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut unreadable = Vec::new();
    let mut after: Option<SpoolKey> = None;
    loop {
        let batch = match spool.read_after(after.as_ref(), 256) {
            Ok(b) => b,
            Err(e) => return json!({"ok": false, "error": format!("reading: {e:#}")}),
        };
        let Some((last, _)) = batch.last() else { break };
        after = Some(last.clone());
        for (key, frame) in batch {
            match frame {
                Ok(f) => cameras.entry(f.meta.camera_id.clone()).or_default().push(f.meta.seq),
                Err(why) => {
                    spool.note_damaged();
                    unreadable.push(json!({"record": key.to_string(), "why": why}));
                }
            }
        }
    }
    json!({
        "ok": true,
        "records": at_open.records,
        "damaged_at_open": at_open.damaged,
        "damaged": spool.stats().damaged,
        "unreadable": unreadable,
        "cameras": cameras.into_iter().map(|(c, s)| (c, ranges(s))).collect::<BTreeMap<_, _>>(),
    })
}

fn sequence(dir: &Path) -> Value {
    let mut out = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(dir.join("sequence")) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(camera) = name.strip_suffix(".next").filter(|_| !name.starts_with('.')) {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                out.insert(camera.to_owned(), text.trim().parse::<u64>().map_or_else(|_| json!(text), |n| json!(n)));
            }
        }
    }
    json!(out)
}

fn main() {
    let Some(dir) = std::env::args().nth(1) else {
        eprintln!("usage: spool_inspect <spool dir>   (changes the directory: run it on a copy)");
        std::process::exit(2);
    };
    let dir = Path::new(&dir);
    let damaged_before = std::fs::read_dir(dir.join("damaged")).map_or(0, |d| d.count());
    let raw = raw(dir);
    let sequence = sequence(dir);
    let opened = opened(dir);
    println!("{}", json!({"raw": raw, "damaged_dir_before": damaged_before, "sequence": sequence, "open": opened}));
}
