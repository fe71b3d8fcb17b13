//! The agent end to end against a real Kafka broker: what arrives in Kafka is checked frame
//! by frame (sequence numbers, order, image size), through outages, crashes, a full spool,
//! bad certificates and a damaged spool.
//!
//! Tests that stop brokers use a private broker each; they run one at a time (a 2-core
//! machine runs a broker, the agent and a consumer per test).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use framelink_common::KafkaConfig;
use framelink_testkit::{Broker, consume_all, frame_meta, init_tracing, rand_topic, rogue_identity};
use rdkafka::message::Message;
use framelink_testkit::daemon::{Agent, kafka_toml};

const AGENT: &str = env!("CARGO_BIN_EXE_framelink-agent");

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// What arrived on a topic: per camera, the sequence numbers in arrival order.
struct Arrived {
    per_camera: BTreeMap<String, Vec<u64>>,
    total: usize,
}

impl Arrived {
    fn seqs(&self, camera: &str) -> &[u64] {
        self.per_camera.get(camera).map_or(&[], |v| v.as_slice())
    }
}

/// Reads the whole topic; checks every record against the contract and that its JPEG decodes
/// to the size its headers give.
async fn arrived(cfg: &KafkaConfig, topic: &str) -> Arrived {
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

fn assert_contiguous(seqs: &[u64], from: u64, what: &str) {
    let expected: Vec<u64> = (from..from + seqs.len() as u64).collect();
    assert_eq!(seqs, expected.as_slice(), "{what}: every frame once, in order");
}

fn body(device: &str, kafka: &KafkaConfig, topic: &str, dir: &std::path::Path, cameras: &str, extra: &str) -> String {
    format!(
        "[device]\nid = {device:?}\nshutdown_grace_s = 20\n{}\n{cameras}\n[spool]\ndir = {:?}\nflush_interval_ms = 100\n[forwarder]\ntopic = {topic:?}\nmessage_timeout_ms = 10000\nretry_max_ms = 2000\n{extra}",
        kafka_toml(kafka),
        dir.join("spool").display().to_string()
    )
}

fn synthetic(id: &str, w: u32, h: u32, fps: u32, count: u64) -> String {
    format!("[[cameras]]\nid = {id:?}\nsynthetic = {{ width = {w}, height = {h}, fps = {fps}, count = {count} }}\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn t1_full_hd_at_30_fps_over_mtls_arrives_complete() {
    let _g = serial();
    init_tracing();
    let broker = Broker::shared();
    let topic = rand_topic("agent-1080p");
    broker.create_topic(&topic, 3).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::agent(AGENT, dir.path(), &body("dev-1", &broker.mtls(), &topic, dir.path(), &synthetic("cam0", 1920, 1080, 30, 300), ""));
    agent.start();
    agent.wait_for("300 frames captured and sent", Duration::from_secs(60), |a| a.metric("frames_sent_total", &[]) >= 300.0);
    assert_eq!(agent.metric("frames_dropped_total", &[]), 0.0, "no drops");
    assert_eq!(agent.metric("spool_written_bytes_total", &[]), 0.0, "a healthy link writes no frame to disk");
    agent.stop();
    let got = arrived(&broker.mtls(), &topic).await;
    assert_eq!(got.total, 300);
    assert_contiguous(got.seqs("cam0"), 0, "cam0");
}

#[tokio::test(flavor = "multi_thread")]
async fn t2_broker_down_for_20s_loses_nothing_and_keeps_order() {
    let _g = serial();
    init_tracing();
    let broker = Broker::private().unwrap();
    let topic = rand_topic("agent-outage");
    broker.create_topic(&topic, 2).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cams = synthetic("a", 640, 360, 15, 750) + &synthetic("b", 320, 240, 15, 750);
    let mut agent = Agent::agent(AGENT, dir.path(), &body("dev-2", &broker.mtls(), &topic, dir.path(), &cams, ""));
    agent.start();
    agent.wait_for("frames flowing", Duration::from_secs(30), |a| a.metric("frames_sent_total", &[]) >= 60.0);
    broker.stop().unwrap();
    agent.wait_for("the agent to notice", Duration::from_secs(30), |a| a.healthz()["link"] == "down");
    agent.wait_for("frames spooled", Duration::from_secs(30), |a| a.metric("spool_records", &[]) >= 100.0);
    std::thread::sleep(Duration::from_secs(12));
    broker.start().unwrap();
    agent.wait_for("all 1500 frames delivered", Duration::from_secs(120), |a| a.metric("frames_sent_total", &[]) >= 1500.0);
    agent.wait_for("spool empty, link up", Duration::from_secs(30), |a| {
        a.metric("spool_records", &[]) == 0.0 && a.healthz()["link"] == "up"
    });
    assert!(agent.metric("frames_spooled_total", &[]) >= 100.0);
    assert_eq!(agent.metric("frames_dropped_total", &[]), 0.0);
    agent.stop();
    let got = arrived(&broker.mtls(), &topic).await;
    assert_contiguous(got.seqs("a"), 0, "camera a");
    assert_contiguous(got.seqs("b"), 0, "camera b");
    assert_eq!(got.total, 1500, "exactly once");
}

#[tokio::test(flavor = "multi_thread")]
async fn t3_sigkill_with_a_full_spool_then_restart_delivers_it_all() {
    let _g = serial();
    init_tracing();
    let broker = Broker::private().unwrap();
    let topic = rand_topic("agent-crash");
    broker.create_topic(&topic, 1).await.unwrap();
    broker.stop().unwrap(); // unreachable at start: normal at the edge
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::agent(AGENT, dir.path(), &body("dev-3", &broker.mtls(), &topic, dir.path(), &synthetic("cam", 640, 360, 25, 120), ""));
    agent.start();
    agent.wait_for("120 frames spooled", Duration::from_secs(60), |a| a.metric("spool_records", &[]) == 120.0);
    std::thread::sleep(Duration::from_millis(500)); // > flush_interval_ms: on disk
    agent.kill();
    broker.start().unwrap();
    agent.start();
    agent.wait_for("the old 120 and 120 new frames delivered", Duration::from_secs(90), |a| {
        a.metric("frames_sent_total", &[]) >= 240.0 && a.metric("spool_records", &[]) == 0.0
    });
    agent.stop();
    let got = arrived(&broker.mtls(), &topic).await;
    let seqs = got.seqs("cam");
    assert_eq!(seqs.len(), 240);
    assert_contiguous(&seqs[..120], 0, "frames spooled before the crash");
    // After a crash the reserved block is skipped: never a reused number.
    let block = framelink_agent::sequence::BLOCK;
    assert_contiguous(&seqs[120..], block, "frames after the restart");
}

#[tokio::test(flavor = "multi_thread")]
async fn t4_a_long_outage_fills_the_spool_to_its_cap_and_drops_are_counted() {
    let _g = serial();
    init_tracing();
    let broker = Broker::private().unwrap();
    let topic = rand_topic("agent-cap");
    broker.create_topic(&topic, 2).await.unwrap();
    broker.stop().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cap = 8 * 1024 * 1024u64;
    let cams = synthetic("x", 1280, 720, 20, 200) + &synthetic("y", 1280, 720, 20, 200);
    let extra = "";
    let mut cfg = body("dev-4", &broker.mtls(), &topic, dir.path(), &cams, extra);
    cfg = cfg.replace("flush_interval_ms = 100", &format!("flush_interval_ms = 100\nmax_bytes = {cap}\nwhen_full = \"drop_oldest\""));
    let mut agent = Agent::agent(AGENT, dir.path(), &cfg);
    agent.start();
    agent.wait_for("all 400 frames captured", Duration::from_secs(90), |a| a.metric("frames_captured_total", &[]) == 400.0);
    // Every frame is either in the spool or counted as dropped (nothing sent: broker down).
    agent.wait_for("every frame spooled or dropped", Duration::from_secs(30), |a| {
        a.metric("spool_records", &[]) + a.metric("frames_dropped_total", &[]) == 400.0
    });
    std::thread::sleep(Duration::from_millis(500));
    let disk = framelink_agent::spool::sled_spool::disk_usage(&dir.path().join("spool"));
    let slack = 2 * 1024 * 1024;
    assert!(disk <= cap + slack, "spool uses {disk} bytes on disk, cap {cap} + slack {slack}");
    let dropped_x = agent.metric("frames_dropped_total", &["camera=\"x\""]);
    let dropped_y = agent.metric("frames_dropped_total", &["camera=\"y\""]);
    assert!(dropped_x + dropped_y > 0.0, "the cap was reached");
    assert_eq!(agent.metric("frames_dropped_total", &["reason=\"spool_full_oldest\""]), dropped_x + dropped_y, "all drops by policy");

    broker.start().unwrap();
    agent.wait_for("spool drained", Duration::from_secs(90), |a| a.metric("spool_records", &[]) == 0.0 && a.healthz()["link"] == "up");
    agent.stop();
    let got = arrived(&broker.mtls(), &topic).await;
    for (cam, dropped) in [("x", dropped_x), ("y", dropped_y)] {
        let seqs = got.seqs(cam);
        assert_eq!(seqs.len() as f64 + dropped, 200.0, "{cam}: arrived + counted drops = captured");
        // drop_oldest: what is missing is the oldest frames; the rest is a contiguous tail.
        assert_contiguous(seqs, 200 - seqs.len() as u64, cam);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn t5_wrong_client_certificate_is_reported_and_frames_wait_in_the_spool() {
    let _g = serial();
    init_tracing();
    let broker = Broker::shared();
    let topic = rand_topic("agent-badcert");
    broker.create_topic(&topic, 1).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (rogue_ca, rogue_cert, rogue_key) = rogue_identity(dir.path()).unwrap();
    let mut bad = broker.mtls();
    bad.tls.certificate = Some(rogue_cert);
    bad.tls.key = Some(rogue_key);
    bad.tls.client_ca = Some(rogue_ca);
    let cams = synthetic("cam", 320, 240, 20, 60);
    let mut agent = Agent::agent(AGENT, dir.path(), &body("dev-5", &bad, &topic, dir.path(), &cams, ""));
    agent.start();
    agent.wait_for("a TLS error on /healthz", Duration::from_secs(60), |a| {
        let h = a.healthz();
        h["link"] == "down" && h["link_error"].as_str().is_some_and(|e| e.contains("TLS handshake / certificate error"))
    });
    agent.wait_for("all 60 frames in the spool", Duration::from_secs(60), |a| a.metric("spool_records", &[]) == 60.0);
    assert!(agent.log_text().contains("TLS handshake / certificate error"), "the log says TLS");
    agent.stop();

    // The operator fixes the certificate and restarts the agent.
    let mut fixed = Agent::agent(AGENT, dir.path(), &body("dev-5", &broker.mtls(), &topic, dir.path(), &cams, ""));
    fixed.start();
    fixed.wait_for("spooled and new frames delivered", Duration::from_secs(60), |a| {
        a.metric("frames_sent_total", &[]) >= 120.0 && a.metric("spool_records", &[]) == 0.0
    });
    fixed.stop();
    let got = arrived(&broker.mtls(), &topic).await;
    assert_contiguous(got.seqs("cam"), 0, "cam");
    assert_eq!(got.total, 120);
}

#[tokio::test(flavor = "multi_thread")]
async fn t6_a_corrupted_spool_record_is_skipped_and_counted() {
    let _g = serial();
    init_tracing();
    let broker = Broker::private().unwrap();
    let topic = rand_topic("agent-corrupt");
    broker.create_topic(&topic, 1).await.unwrap();
    broker.stop().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cams = synthetic("cam", 320, 240, 20, 20);
    let mut agent = Agent::agent(AGENT, dir.path(), &body("dev-6", &broker.mtls(), &topic, dir.path(), &cams, ""));
    agent.start();
    agent.wait_for("20 frames spooled", Duration::from_secs(60), |a| a.metric("spool_records", &[]) == 20.0);
    agent.stop();

    // Flip bytes in the middle of one spooled frame file.
    let frames = dir.path().join("spool/frames");
    let mut files: Vec<_> = std::fs::read_dir(&frames).unwrap().flatten().map(|e| e.path()).collect();
    files.sort();
    assert_eq!(files.len(), 20);
    let mut bytes = std::fs::read(&files[7]).unwrap();
    // The record format puts the sequence number (u64 BE) at bytes 6..14.
    let damaged_seq = u64::from_be_bytes(bytes[6..14].try_into().unwrap());
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 16] {
        *b ^= 0x5a;
    }
    std::fs::write(&files[7], bytes).unwrap();

    broker.start().unwrap();
    agent.start();
    agent.wait_for("the rest delivered", Duration::from_secs(60), |a| {
        a.metric("frames_sent_total", &[]) >= 39.0 && a.metric("spool_records", &[]) == 0.0
    });
    assert_eq!(agent.metric("frames_dropped_total", &["reason=\"spool_damaged\""]), 1.0);
    assert_eq!(agent.healthz()["spool"]["damaged"], 1);
    assert!(agent.log_text().contains("Damaged spool record skipped"));
    agent.stop();
    let got = arrived(&broker.mtls(), &topic).await;
    let seqs = got.seqs("cam");
    let expected: Vec<u64> = (0..40).filter(|s| *s != damaged_seq).collect();
    assert_eq!(seqs, expected.as_slice(), "everything but the damaged frame, once, in order");
}

#[tokio::test(flavor = "multi_thread")]
async fn t7_live_first_sends_new_frames_first_and_backfills_the_rest() {
    let _g = serial();
    init_tracing();
    let broker = Broker::private().unwrap();
    let topic = rand_topic("agent-live-first");
    broker.create_topic(&topic, 1).await.unwrap();
    broker.stop().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cams = synthetic("cam", 320, 240, 20, 400);
    let extra = "live_first = true\nbackfill_fps = 5\n";
    let mut agent = Agent::agent(AGENT, dir.path(), &body("dev-7", &broker.mtls(), &topic, dir.path(), &cams, extra));
    agent.start();
    agent.wait_for("a backlog in the spool", Duration::from_secs(60), |a| a.metric("spool_records", &[]) >= 60.0);
    broker.start().unwrap();
    // Back-filling at 5 frames/s while 20 new frames/s go straight to Kafka.
    agent.wait_for("live frames flowing", Duration::from_secs(60), |a| a.healthz()["link"] != "down" && a.metric("frames_sent_total", &[]) >= 40.0);
    let backlog = agent.metric("spool_records", &[]);
    assert!(backlog >= 30.0, "the backlog drains slowly, beside live frames: {backlog} left");
    agent.wait_for("everything delivered", Duration::from_secs(120), |a| {
        a.metric("frames_sent_total", &[]) >= 400.0 && a.metric("spool_records", &[]) == 0.0
    });
    agent.stop();
    let got = arrived(&broker.mtls(), &topic).await;
    let mut seqs = got.seqs("cam").to_vec();
    assert_ne!(seqs, { let mut s = seqs.clone(); s.sort(); s }, "live frames overtook the backlog");
    seqs.sort();
    assert_contiguous(&seqs, 0, "every frame exactly once (in some order)");
}
