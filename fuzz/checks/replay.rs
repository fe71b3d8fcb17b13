//! Replays a fuzz target's committed inputs in ordinary stable `cargo test` (the crates'
//! `tests/fuzz_corpus.rs`): every file of `fuzz/corpus/<target>/` (the minimized corpus that
//! `scripts/fuzz` commits; it must not be empty), of `fuzz/seeds/<target>/` (the seeds as the
//! fuzzer last read them) and of `fuzz/regressions/<target>/` (inputs that once failed),
//! through the same check the fuzz target runs.

use std::path::{Path, PathBuf};

/// The repository root (every crate that includes this sits one level below it).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

/// Runs `check` on every committed input of `target`; fails naming each input that fails.
pub fn corpus(target: &str, check: fn(&[u8])) {
    let corpus = files(&repo().join("fuzz/corpus").join(target));
    assert!(!corpus.is_empty(), "fuzz/corpus/{target} is missing or empty: run scripts/fuzz {target}");
    let seeds = files(&repo().join("fuzz/seeds").join(target));
    let regressions = files(&repo().join("fuzz/regressions").join(target));
    let mut failed = Vec::new();
    for path in corpus.iter().chain(&seeds).chain(&regressions) {
        let data = std::fs::read(path).unwrap();
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            failed.push(path.strip_prefix(repo()).unwrap_or(path).display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} inputs of {target} fail (each one's panic is printed above; reproduce one with \
         `cd fuzz && cargo +nightly fuzz run {target} ../<path>`):\n{}",
        failed.len(),
        corpus.len() + seeds.len() + regressions.len(),
        failed.join("\n")
    );
}

/// Runs `check` on the seeds built from the repository's real data (so they are checked even
/// where the corpus has minimized them away).
pub fn seeds(seeds: Vec<(String, Vec<u8>)>, check: fn(&[u8])) {
    assert!(!seeds.is_empty());
    for (name, data) in seeds {
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            panic!("seed {name} fails");
        }
    }
}

/// Writes the seeds into `fuzz/seeds/<target>/` as `seed-<name>`, in place of those there
/// (`scripts/fuzz --reseed`). The fuzzer reads them beside the corpus, and `cmin` leaves them
/// whole: libjpeg-turbo (C) has no coverage instrumentation, so to the fuzzer every JPEG looks
/// alike and minimizing would keep only a few of the real ones.
pub fn write_seeds(target: &str, seeds: Vec<(String, Vec<u8>)>) {
    let dir = repo().join("fuzz/seeds").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    for old in files(&dir) {
        std::fs::remove_file(old).unwrap();
    }
    for (name, data) in seeds {
        std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
    }
}
