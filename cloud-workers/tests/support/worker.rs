//! What the worker's end-to-end tests share: the binary, one test at a time, the topics of a
//! run, a config body, real JPEG frames produced with contract headers, and reading results.
//! Each test binary uses a part of it.
#![allow(dead_code)]

use std::sync::Mutex;

use framelink_common::KafkaConfig;
use framelink_testkit::daemon::kafka_toml;
use framelink_testkit::{Producer, frame_meta, test_meta};
use rdkafka::message::OwnedMessage;

pub const WORKER: &str = env!("CARGO_BIN_EXE_framelink-worker");

/// The agent binary, built by `cargo test --workspace` next to this test's own.
pub fn agent_binary() -> String {
    let exe = std::env::current_exe().unwrap();
    let p: std::path::PathBuf = exe.parent().unwrap().parent().unwrap().join("framelink-agent");
    assert!(p.exists(), "{} is missing: build the workspace's tests (`cargo test --workspace --no-run`)", p.display());
    p.display().to_string()
}
pub static SERIAL: Mutex<()> = Mutex::new(());

pub struct Topics {
    pub frames: String,
    pub results: String,
    pub events: String,
    pub dlq: String,
}

pub fn worker_body(kafka: &KafkaConfig, t: &Topics, group: &str, pipeline: &str, extra: &str) -> String {
    format!(
        "{}\n[consumer]\ngroup_id = {group:?}\ntopics = [{:?}]\n# A dead member's partitions move within 6 s (the broker's minimum session timeout).\nsession_timeout_ms = 6000\n[output]\nresults_topic = {:?}\nevents_topic = {:?}\ndlq_topic = {:?}\n[worker]\npipeline = {pipeline:?}\nthreads = 2\n{extra}",
        kafka_toml(kafka),
        t.frames,
        t.results,
        t.events,
        t.dlq
    )
}

/// (camera, seq) of every result.
pub fn result_ids(msgs: &[OwnedMessage]) -> Vec<(String, u64)> {
    msgs.iter().map(|m| {
        let meta = frame_meta(m).unwrap();
        (meta.camera_id, meta.seq)
    }).collect()
}

/// Produces `n` real JPEG frames for cameras c0..c3 with contract headers.
pub async fn produce_frames(cfg: &KafkaConfig, topic: &str, n: u64, first: u64) {
    let jpeg = std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/images/rocket.jpg")).unwrap();
    let h = turbojpeg::read_header(&jpeg).unwrap();
    let p = Producer::new(cfg).unwrap();
    for i in first..first + n {
        let mut meta = test_meta("dev", &format!("c{}", i % 4), i / 4);
        meta.width = h.width as u32;
        meta.height = h.height as u32;
        p.send_frame(topic, &meta, &jpeg).await.unwrap();
    }
}

