//! What the agent's end-to-end tests share: the agent binary, one test at a time, a config
//! body, synthetic cameras, and reading back what arrived in Kafka frame by frame. Each test
//! binary uses a part of it.
#![allow(dead_code)]

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


/// Waits until the agent accounted for every frame of cameras `a` and `b` (`frames` each:
/// sent or dropped), stops it, and checks Kafka frame by frame: per camera the sequence
/// numbers strictly increase (in order, none twice), and exactly the frames not dropped
/// arrived. The only drop allowed is `encoder_behind` (counted: a loaded 2-core machine can
/// starve an encoder thread, which has nothing to do with the link under test); any other
/// drop fails. `what` names the phase in messages.
pub async fn wait_and_check_delivery(what: &str, agent: &mut framelink_testkit::daemon::Agent, cfg: &KafkaConfig, topic: &str, frames: u64) {
    check_delivery(what, agent, cfg, topic, frames, false).await
}

/// [`wait_and_check_delivery`], allowing duplicates when `at_least_once`: an outage longer
/// than `message_timeout_ms` sends again a frame the broker stored but whose acknowledgement
/// was lost (at its shutdown, say) — the agent's documented at-least-once. Each camera's
/// frames must then still arrive in order (a duplicate next to its original) and every frame
/// not dropped at least once; duplicates are printed.
pub async fn check_delivery(what: &str, agent: &mut framelink_testkit::daemon::Agent, cfg: &KafkaConfig, topic: &str, frames: u64, at_least_once: bool) {
    let total = 2.0 * frames as f64;
    agent.wait_for(&format!("{what}: every frame sent or dropped"), Duration::from_secs(300), |a| {
        a.metric("frames_sent_total", &[]) + a.metric("frames_dropped_total", &[]) >= total
    });
    agent.wait_for(&format!("{what}: spool empty, link up"), Duration::from_secs(60), |a| a.metric("spool_records", &[]) == 0.0 && a.healthz()["link"] == "up");
    let dropped = agent.metric("frames_dropped_total", &[]);
    let behind = agent.metric("frames_dropped_total", &["reason=\"encoder_behind\""]);
    assert_eq!(dropped, behind, "{what}: no drop but encoder_behind");
    assert!(dropped < total / 2.0, "{what}: most frames went through, not dropped by starved encoders: {dropped} of {total}");
    let per_camera: Vec<f64> = ["a", "b"].iter().map(|c| agent.metric("frames_dropped_total", &[&format!("camera=\"{c}\"")])).collect();
    let recreated = agent.metric("producer_recreated_total", &[]);
    agent.stop();
    let got = arrived(cfg, topic).await;
    eprintln!("{what}: {} frames in Kafka, {dropped} dropped (encoder_behind), producer recreated {recreated} times", got.total);
    for (cam, dropped) in ["a", "b"].iter().zip(per_camera) {
        let all = got.seqs(cam);
        let mut seqs = all.to_vec();
        if at_least_once {
            assert!(all.windows(2).all(|w| w[0] <= w[1]), "{what}: camera {cam}: in order: {all:?}");
            seqs.dedup();
            if seqs.len() < all.len() {
                let dups: Vec<u64> = all.windows(2).filter(|w| w[0] == w[1]).map(|w| w[0]).collect();
                eprintln!("{what}: camera {cam}: sent again (at-least-once): {dups:?}");
            }
        }
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{what}: camera {cam}: in order, none twice: {all:?}");
        assert_eq!(seqs.len() as f64, frames as f64 - dropped, "{what}: camera {cam}: every frame not dropped arrived");
        if dropped == 0.0 {
            assert_contiguous(&seqs, 0, &format!("{what}: camera {cam}"));
        }
    }
}
