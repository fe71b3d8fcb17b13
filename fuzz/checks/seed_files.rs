//! What the config checks share: real data from the repository for their seeds, and how they
//! compare two loads.

use std::path::Path;

/// The repository's config files whose name contains `kind` (`configs/**/*<kind>*.toml`), as
/// (`configs-dir-name.toml`, contents), sorted; each also bare (`…-bare`: without its comment
/// and blank lines), which fits the length the config targets fuzz at (512 bytes, scripts/fuzz)
/// better.
pub fn config_files(repo: &Path, kind: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut dirs = vec![repo.join("configs")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "toml") && path.file_name().unwrap().to_string_lossy().contains(kind) {
                let name = path.strip_prefix(repo).unwrap().to_string_lossy().replace('/', "-");
                let text = std::fs::read_to_string(&path).unwrap();
                let bare: String = text.lines().filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#')).map(|l| format!("{l}\n")).collect();
                out.push((format!("{name}-bare"), bare.into_bytes()));
                out.push((name, text.into_bytes()));
            }
        }
    }
    out.sort();
    out
}

/// Whether loading the same config text twice fails with the same error. True since the
/// workspace turned on the `config` crate's `preserve_order` feature: without it a table's keys
/// sit in a `HashMap`, so of two unknown or mistyped keys a load named either, at random
/// (found by fuzzing: fuzz/regressions/{agent,worker}_config). With `false` the config checks
/// compare load errors by kind only, and validation errors (made from the typed config) exactly.
pub const LOAD_ERRORS_ARE_DETERMINISTIC: bool = true;

/// Why a config text is refused: by the loader (TOML syntax, unknown keys, types) or by the
/// daemon's own validation.
#[derive(Debug)]
pub enum Failure {
    Load(String),
    Validate(String),
}
