//! Replays the committed fuzz corpora of `jpeg_decode`, `pipeline_syntax` and
//! `worker_config` (cargo-fuzz; `scripts/fuzz`, see docs/testing.md "Fuzzing") in ordinary
//! stable `cargo test`, through the checks the fuzz targets run, so that every past finding
//! stays checked.

#[path = "../../fuzz/checks/worker.rs"]
mod checks;
#[path = "../../fuzz/checks/replay.rs"]
mod replay;

#[test]
fn jpeg_decode_corpus_replays() {
    replay::corpus("jpeg_decode", checks::jpeg_decode);
}

#[test]
fn jpeg_decode_seeds_pass() {
    replay::seeds(checks::jpeg_decode_seeds(&replay::repo()), checks::jpeg_decode);
}

#[test]
fn pipeline_syntax_corpus_replays() {
    replay::corpus("pipeline_syntax", checks::pipeline_syntax);
}

#[test]
fn pipeline_syntax_seeds_pass() {
    replay::seeds(checks::pipeline_syntax_seeds(&replay::repo()), checks::pipeline_syntax);
}

#[test]
fn worker_config_corpus_replays() {
    replay::corpus("worker_config", checks::worker_config);
}

#[test]
fn worker_config_seeds_pass() {
    replay::seeds(checks::worker_config_seeds(&replay::repo()), checks::worker_config);
}

/// `scripts/fuzz --reseed`: writes the seeds into fuzz/seeds/{jpeg_decode,pipeline_syntax,worker_config}.
#[test]
#[ignore]
fn write_seeds() {
    let repo = replay::repo();
    replay::write_seeds("jpeg_decode", checks::jpeg_decode_seeds(&repo));
    replay::write_seeds("pipeline_syntax", checks::pipeline_syntax_seeds(&repo));
    replay::write_seeds("worker_config", checks::worker_config_seeds(&repo));
}
