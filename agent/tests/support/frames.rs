//! What the agent's end-to-end tests share: the agent binary, one test at a time, a config
//! body, synthetic cameras, and reading back what arrived in Kafka frame by frame.

use std::collections::BTreeMap;
use std::sync::Mutex;

use framelink_common::KafkaConfig;
use framelink_testkit::daemon::kafka_toml;
use framelink_testkit::{consume_all, frame_meta};
use rdkafka::message::Message;
use std::time::Duration;

pub const AGENT: &str = env!("CARGO_BIN_EXE_framelink-agent");

static SERIAL: Mutex<()> = Mutex::new(());

/// Tests that stop brokers or agents run one at a time (a 2-core machine runs a broker, the
/// agent and a consumer per test).
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// What arrived on a topic: per camera, the sequence numbers in arrival order.
pub struct Arrived {
    pub per_camera: BTreeMap<String, Vec<u64>>,
    pub total: usize,
}

impl Arrived {
    pub fn seqs(&self, camera: &str) -> &[u64] {
        self.per_camera.get(camera).map_or(&[], |v| v.as_slice())
    }
}

/// Reads the whole topic; checks every record against the contract and that its JPEG decodes
/// to the size its headers give.
pub async fn arrived(cfg: &KafkaConfig, topic: &str) -> Arrived {
    let msgs = consume_all(cfg, topic, Duration::from_secs(8)).await.unwrap();
    let mut per_camera: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut partitions = BTreeMap::new();
    for m in &msgs {
        let meta = frame_meta(m).unwrap();
        let header = turbojpeg::read_header(m.payload().unwrap()).expect("payload is a JPEG");
        assert_eq!((header.width as u32, header.height as u32), (meta.width, meta.height), "JPEG size matches headers");
        assert_eq!(*partitions.entry(meta.camera_id.clone()).or_insert(m.partition()), m.partition());
        per_camera.entry(meta.camera_id).or_default().push(meta.seq);
    }
    Arrived { per_camera, total: msgs.len() }
}

pub fn assert_contiguous(seqs: &[u64], from: u64, what: &str) {
    let expected: Vec<u64> = (from..from + seqs.len() as u64).collect();
    assert_eq!(seqs, expected.as_slice(), "{what}: every frame once, in order");
}

pub fn body(device: &str, kafka: &KafkaConfig, topic: &str, dir: &std::path::Path, cameras: &str, extra: &str) -> String {
    format!(
        "[device]\nid = {device:?}\nshutdown_grace_s = 20\n{}\n{cameras}\n[spool]\ndir = {:?}\nflush_interval_ms = 100\n[forwarder]\ntopic = {topic:?}\nmessage_timeout_ms = 10000\nretry_max_ms = 2000\n{extra}",
        kafka_toml(kafka),
        dir.join("spool").display().to_string()
    )
}

pub fn synthetic(id: &str, w: u32, h: u32, fps: u32, count: u64) -> String {
    format!("[[cameras]]\nid = {id:?}\nsynthetic = {{ width = {w}, height = {h}, fps = {fps}, count = {count} }}\n")
}

