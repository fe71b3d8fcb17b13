//! Replays the committed fuzz corpora of `spool_record` and `agent_config` (cargo-fuzz;
//! `scripts/fuzz`, see docs/testing.md "Fuzzing") in ordinary stable `cargo test`, through the
//! checks the fuzz targets run, so that every past finding stays checked.

#[path = "../../fuzz/checks/agent.rs"]
mod checks;
#[path = "../../fuzz/checks/replay.rs"]
mod replay;

#[test]
fn spool_record_corpus_replays() {
    replay::corpus("spool_record", checks::spool_record);
}

#[test]
fn spool_record_seeds_pass() {
    replay::seeds(checks::spool_record_seeds(), checks::spool_record);
}

#[test]
fn agent_config_corpus_replays() {
    replay::corpus("agent_config", checks::agent_config);
}

#[test]
fn agent_config_seeds_pass() {
    replay::seeds(checks::agent_config_seeds(&replay::repo()), checks::agent_config);
}

/// `scripts/fuzz --reseed`: writes the seeds into fuzz/seeds/{spool_record,agent_config}.
#[test]
#[ignore]
fn write_seeds() {
    replay::write_seeds("spool_record", checks::spool_record_seeds());
    replay::write_seeds("agent_config", checks::agent_config_seeds(&replay::repo()));
}
