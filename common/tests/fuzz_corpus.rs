//! Replays the committed fuzz corpus of `wire_headers` (cargo-fuzz; `scripts/fuzz`, see
//! docs/testing.md "Fuzzing") in ordinary stable `cargo test`, through the check the fuzz
//! target runs, so that every past finding stays checked.

#[path = "../../fuzz/checks/common.rs"]
mod checks;
#[path = "../../fuzz/checks/replay.rs"]
mod replay;

#[test]
fn wire_headers_corpus_replays() {
    replay::corpus("wire_headers", checks::wire_headers);
}

#[test]
fn wire_headers_seeds_pass() {
    replay::seeds(checks::wire_headers_seeds(), checks::wire_headers);
}

/// `scripts/fuzz --reseed`: writes the seeds into fuzz/seeds/wire_headers.
#[test]
#[ignore]
fn write_seeds() {
    replay::write_seeds("wire_headers", checks::wire_headers_seeds());
}
