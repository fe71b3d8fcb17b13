//! The worker end to end against a real Kafka broker: agent → worker → results, consumer
//! group sharing, a worker killed mid-stream, dead letters, restart without reprocessing,
//! exactly-once through a SIGKILL, and partitions moving between workers under load.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use framelink_common::KafkaConfig;
use framelink_testkit::daemon::{Daemon, kafka_toml};
use framelink_testkit::{Broker, Producer, consume_all, consume_all_uncommitted, frame_meta, init_tracing, rand_topic, test_meta};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};

const WORKER: &str = env!("CARGO_BIN_EXE_framelink-worker");
static SERIAL: Mutex<()> = Mutex::new(());

/// The agent binary, built by `cargo test --workspace` next to this test's own.
fn agent_binary() -> String {
    let exe = std::env::current_exe().unwrap();
    let p: PathBuf = exe.parent().unwrap().parent().unwrap().join("framelink-agent");
    assert!(p.exists(), "{} is missing: run the workspace's tests (`cargo test --workspace`)", p.display());
    p.display().to_string()
}

struct Topics {
    frames: String,
    results: String,
    events: String,
    dlq: String,
}

async fn topics(b: &Broker, what: &str, partitions: i32) -> Topics {
    let t = Topics { frames: rand_topic(&format!("{what}-in")), results: rand_topic(&format!("{what}-out")), events: rand_topic(&format!("{what}-ev")), dlq: rand_topic(&format!("{what}-dlq")) };
    for (name, p) in [(&t.frames, partitions), (&t.results, partitions), (&t.events, 1), (&t.dlq, 1)] {
        b.create_topic(name, p).await.unwrap();
    }
    t
}

fn worker_body(kafka: &KafkaConfig, t: &Topics, group: &str, pipeline: &str, extra: &str) -> String {
    format!(
        "{}\n[consumer]\ngroup_id = {group:?}\ntopics = [{:?}]\n[output]\nresults_topic = {:?}\nevents_topic = {:?}\ndlq_topic = {:?}\n[worker]\npipeline = {pipeline:?}\nthreads = 2\n{extra}",
        kafka_toml(kafka),
        t.frames,
        t.results,
        t.events,
        t.dlq
    )
}

fn header<'a>(m: &'a OwnedMessage, name: &str) -> Option<&'a str> {
    m.headers()?.iter().find(|h| h.key == name).and_then(|h| std::str::from_utf8(h.value?).ok())
}

/// (camera, seq) of every result.
fn result_ids(msgs: &[OwnedMessage]) -> Vec<(String, u64)> {
    msgs.iter().map(|m| {
        let meta = frame_meta(m).unwrap();
        (meta.camera_id, meta.seq)
    }).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn w1_agent_to_worker_every_frame_processed_once_with_headers() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init_tracing();
    let b = Broker::shared();
    let t = topics(b, "w1", 2).await;
    let adir = tempfile::tempdir().unwrap();
    let agent_body = format!(
        "[device]\nid = \"site-1\"\n{}\n[[cameras]]\nid = \"a\"\nsynthetic = {{ width = 640, height = 360, fps = 15, count = 45 }}\n[[cameras]]\nid = \"b\"\nsynthetic = {{ width = 320, height = 240, fps = 15, count = 45 }}\n[spool]\ndir = {:?}\n[forwarder]\ntopic = {:?}\n",
        kafka_toml(&b.mtls()),
        adir.path().join("spool").display().to_string(),
        t.frames
    );
    let mut agent = Daemon::agent(&agent_binary(), adir.path(), &agent_body);
    let wdir = tempfile::tempdir().unwrap();
    let mut worker = Daemon::worker(WORKER, wdir.path(), &worker_body(&b.mtls(), &t, "g-w1", "resize:160x90,grayscale", "[motion]\nenabled = true\n")).env("FRAMELINK__WORKER__ID", "w-1");
    worker.start();
    agent.start();
    agent.wait_for("90 frames sent", Duration::from_secs(60), |a| a.metric("frames_sent_total", &[]) >= 90.0);
    worker.wait_for("90 frames processed", Duration::from_secs(60), |w| w.metric("frames_out_total", &[]) >= 90.0);
    agent.stop();
    worker.stop();

    let results = consume_all(&b.plaintext(), &t.results, Duration::from_secs(6)).await.unwrap();
    assert_eq!(results.len(), 90, "every frame processed once");
    let mut per_camera: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for m in &results {
        let meta = frame_meta(m).unwrap();
        assert_eq!(meta.device_id, "site-1");
        assert_eq!((meta.width, meta.height), (160, 90), "result headers give the result's size");
        let h = turbojpeg::read_header(m.payload().unwrap()).unwrap();
        assert_eq!((h.width, h.height, h.subsamp), (160, 90, turbojpeg::Subsamp::Gray));
        assert_eq!(header(m, "framelink-pipeline"), Some("resize:160x90,grayscale"));
        assert_eq!(header(m, "framelink-worker"), Some("w-1"));
        let latency: u64 = header(m, "framelink-latency-ms").unwrap().parse().unwrap();
        assert!(latency < 60_000, "latency {latency} ms");
        assert!(header(m, "framelink-source-width").is_some());
        per_camera.entry(meta.camera_id).or_default().push(meta.seq);
    }
    for cam in ["a", "b"] {
        assert_eq!(per_camera[cam], (0..45).collect::<Vec<_>>(), "camera {cam}: all, in order");
    }
    // The synthetic pattern moves every frame: motion events were published.
    let events = consume_all(&b.plaintext(), &t.events, Duration::from_secs(4)).await.unwrap();
    assert!(!events.is_empty(), "motion events");
    let ev: serde_json::Value = serde_json::from_slice(events[0].payload().unwrap()).unwrap();
    assert!(ev["changed_fraction"].as_f64().unwrap() > 0.0 && ev["bbox"]["width"].as_u64().unwrap() > 0, "{ev}");
}

/// Produces `n` real JPEG frames for cameras c0..c3 with contract headers.
async fn produce_frames(cfg: &KafkaConfig, topic: &str, n: u64, first: u64) {
    let jpeg = std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/images/rocket.jpg")).unwrap();
    let h = turbojpeg::read_header(&jpeg).unwrap();
    let p = Producer::new(cfg).unwrap();
    for i in first..first + n {
        let mut meta = test_meta("dev", &format!("c{}", i % 4), i / 4);
        meta.width = h.width as u32;
        meta.height = h.height as u32;
        p.send_frame(topic, &meta, &jpeg).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn w2_w3_two_workers_share_partitions_and_a_killed_one_is_covered() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init_tracing();
    let b = Broker::shared();
    let t = topics(b, "w2", 4).await;
    let body = worker_body(&b.plaintext(), &t, "g-w2", "resize:320x240,sobel", "");
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut w1 = Daemon::worker(WORKER, d1.path(), &body).env("FRAMELINK__WORKER__ID", "one");
    let mut w2 = Daemon::worker(WORKER, d2.path(), &body).env("FRAMELINK__WORKER__ID", "two");
    w1.start();
    w1.wait_for("worker one assigned", Duration::from_secs(60), |w| w.log_text().contains("Partitions assigned."));
    w2.start();
    w2.wait_for("worker two assigned", Duration::from_secs(60), |w| w.log_text().contains("Partitions assigned."));
    produce_frames(&b.plaintext(), &t.frames, 100, 0).await;
    w1.wait_for("worker one working", Duration::from_secs(60), |w| w.metric("frames_out_total", &[]) >= 10.0);
    w2.wait_for("worker two working", Duration::from_secs(60), |w| w.metric("frames_out_total", &[]) >= 10.0);
    // Test 3: SIGKILL one mid-stream; the other takes its partitions over.
    w1.kill();
    produce_frames(&b.plaintext(), &t.frames, 100, 100).await;
    let expected: BTreeSet<(String, u64)> = (0..200u64).map(|i| (format!("c{}", i % 4), i / 4)).collect();
    let results = wait_for_results(b, &t.results, &expected).await;
    w2.stop();
    let ids = result_ids(&results);
    let unique: BTreeSet<_> = ids.iter().cloned().collect();
    assert_eq!(unique, expected, "every input has an output");
    let duplicates = ids.len() - unique.len();
    println!("w3: {} results for 200 inputs, {duplicates} duplicates after SIGKILL (at-least-once)", ids.len());
    let by_worker: BTreeSet<&str> = results.iter().filter_map(|m| header(m, "framelink-worker")).collect();
    assert_eq!(by_worker, BTreeSet::from(["one", "two"]), "both workers owned partitions");
}

#[tokio::test(flavor = "multi_thread")]
async fn w4_bad_records_go_to_the_dead_letter_topic_with_their_reason() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init_tracing();
    let b = Broker::shared();
    let t = topics(b, "w4", 1).await;
    let jpeg = std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/images/rocket.jpg")).unwrap();
    let h = turbojpeg::read_header(&jpeg).unwrap();
    let p = Producer::new(&b.plaintext()).unwrap();
    let good = |seq: u64| {
        let mut m = test_meta("dev", "cam", seq);
        m.width = h.width as u32;
        m.height = h.height as u32;
        m
    };
    let mut corrupt = jpeg.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid..mid + 200].fill(0);
    let mut huge = good(3);
    huge.width = 60000;
    huge.height = 60000;
    let mut bad_seq = OwnedHeaders::new();
    for (k, v) in good(5).to_header_pairs() {
        let v = if k == "framelink-seq" { "five".to_string() } else { v };
        bad_seq = bad_seq.insert(Header { key: k, value: Some(v.as_bytes()) });
    }
    p.send_frame(&t.frames, &good(0), &jpeg).await.unwrap();
    p.send_frame(&t.frames, &good(1), &jpeg[..jpeg.len() / 3]).await.unwrap(); // truncated
    p.send_frame(&t.frames, &good(2), b"").await.unwrap(); // zero bytes
    p.send_frame(&t.frames, &huge, &jpeg).await.unwrap(); // claims 60000x60000
    p.send_frame(&t.frames, &good(4), b"%PDF-1.7 not an image").await.unwrap();
    p.send_raw(&t.frames, Some(b"dev/cam"), Some(&jpeg), Some(bad_seq)).await.unwrap();
    p.send_raw(&t.frames, Some(b"other/cam9"), Some(&jpeg), None).await.unwrap(); // plain JPEG, no headers
    p.send_frame(&t.frames, &good(6), &corrupt).await.unwrap();
    p.send_frame(&t.frames, &good(7), &jpeg).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut w = Daemon::worker(WORKER, dir.path(), &worker_body(&b.plaintext(), &t, "g-w4", "grayscale", ""));
    w.start();
    w.wait_for("9 records handled", Duration::from_secs(60), |w| w.metric("frames_in_total", &[]) >= 9.0 && w.metric("in_flight", &[]) == 0.0);
    let dead_lettered = w.metric("dead_letters_total", &[]) as usize;
    w.stop();
    let dlq = consume_all(&b.plaintext(), &t.dlq, Duration::from_secs(5)).await.unwrap();
    let reasons: Vec<(&str, usize)> = dlq.iter().map(|m| (header(m, "framelink-error").unwrap(), m.payload().map_or(0, |p| p.len()))).collect();
    let names: BTreeSet<&str> = reasons.iter().map(|r| r.0).collect();
    assert!(names.contains("corrupt_jpeg") && names.contains("empty") && names.contains("too_large") && names.contains("not_jpeg") && names.contains("bad_headers"), "{reasons:?}");
    // The original bytes travel with the reason.
    let pdf = dlq.iter().find(|m| header(m, "framelink-error") == Some("not_jpeg")).unwrap();
    assert_eq!(pdf.payload(), Some(&b"%PDF-1.7 not an image"[..]));
    assert!(header(pdf, "framelink-error-detail").is_some() && header(pdf, "framelink-seq") == Some("4"));
    let results = consume_all(&b.plaintext(), &t.results, Duration::from_secs(4)).await.unwrap();
    let ok: BTreeSet<String> = results.iter().map(|m| { let x = frame_meta(m).unwrap(); format!("{}/{}", x.device_id, x.seq) }).collect();
    assert!(ok.contains("dev/0") && ok.contains("dev/7") && ok.contains("other/6"), "good frames around the bad ones, and the plain JPEG, processed: {ok:?}");
    assert_eq!(results.len() + dlq.len(), 9, "every record accounted for once");
    assert_eq!(dead_lettered, dlq.len(), "dead letters counted");
}

#[tokio::test(flavor = "multi_thread")]
async fn w5_sigterm_then_restart_does_not_process_completed_frames_again() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init_tracing();
    let b = Broker::shared();
    let t = topics(b, "w5", 2).await;
    produce_frames(&b.plaintext(), &t.frames, 60, 0).await;
    let body = worker_body(&b.plaintext(), &t, "g-w5", "resize:320x240", "");
    let dir = tempfile::tempdir().unwrap();
    let mut w = Daemon::worker(WORKER, dir.path(), &body);
    w.start();
    w.wait_for("60 processed", Duration::from_secs(60), |w| w.metric("frames_out_total", &[]) >= 60.0);
    w.stop();
    assert!(w.log_text().contains("Worker stopped."), "clean stop");
    produce_frames(&b.plaintext(), &t.frames, 20, 60).await; // 20 more
    std::thread::sleep(Duration::from_secs(3));
    w.start();
    w.wait_for("the 20 new ones", Duration::from_secs(60), |w| w.metric("frames_in_total", &[]) >= 20.0 && w.metric("in_flight", &[]) == 0.0);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(w.metric("frames_in_total", &[]), 20.0, "after a clean stop only new records are consumed");
    w.stop();
    let results = consume_all(&b.plaintext(), &t.results, Duration::from_secs(5)).await.unwrap();
    assert_eq!(results.len(), 80, "60 + 20, nothing processed twice");
}

/// Lets a dead member's partitions move within seconds instead of the default 45 s.
const SHORT_SESSION: &str = "[kafka.librdkafka]\n\"session.timeout.ms\" = \"6000\"\n";

/// Waits until the results topic (read_committed) holds an output for every expected input.
async fn wait_for_results(b: &Broker, topic: &str, expected: &BTreeSet<(String, u64)>) -> Vec<OwnedMessage> {
    let mut results = Vec::new();
    for _ in 0..30 {
        results = consume_all(&b.plaintext(), topic, Duration::from_secs(3)).await.unwrap();
        if result_ids(&results).into_iter().collect::<BTreeSet<_>>() == *expected {
            break;
        }
    }
    results
}

#[tokio::test(flavor = "multi_thread")]
async fn w6_exactly_once_survives_sigkill_without_duplicates() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init_tracing();
    let b = Broker::shared();
    let t = topics(b, "w6", 2).await;
    produce_frames(&b.plaintext(), &t.frames, 200, 0).await;
    let extra = format!("delivery = \"exactly-once\"\ntransaction_ms = 200\n{SHORT_SESSION}");
    let body = worker_body(&b.plaintext(), &t, "g-w6", "resize:320x240,blur:2", &extra);
    let dir = tempfile::tempdir().unwrap();
    let mut w = Daemon::worker(WORKER, dir.path(), &body).env("FRAMELINK__WORKER__ID", "eos-1");
    w.start();
    w.wait_for("some transactions committed", Duration::from_secs(60), |w| w.metric("transactions_committed_total", &[]) >= 2.0 && w.metric("frames_out_total", &[]) >= 40.0);
    assert_eq!(w.healthz()["delivery"], "exactly-once");
    w.kill(); // mid-transaction: its open transaction must never become visible
    // The same transactional id again: the broker aborts the dead instance's transaction.
    w.start();
    let expected: BTreeSet<(String, u64)> = (0..200u64).map(|i| (format!("c{}", i % 4), i / 4)).collect();
    let results = wait_for_results(b, &t.results, &expected).await;
    w.stop();
    let ids = result_ids(&results);
    let unique: BTreeSet<_> = ids.iter().cloned().collect();
    assert_eq!(unique, expected, "every input has an output");
    if ids.len() != 200 {
        let mut seen = BTreeMap::new();
        for m in &results {
            let id = result_ids(std::slice::from_ref(m)).remove(0);
            seen.entry(id).or_insert_with(Vec::new).push((m.partition(), m.offset(), m.timestamp().to_millis()));
        }
        for (id, at) in seen.iter().filter(|(_, v)| v.len() > 1) {
            println!("duplicate {id:?} at {at:?}");
        }
        for l in w.log_text().lines().filter(|l| !l.contains("librdkafka")) {
            println!("log: {l}");
        }
    }
    assert_eq!(ids.len(), 200, "read_committed: exactly one output per input despite the SIGKILL");
    let seen_raw = consume_all_uncommitted(&b.plaintext(), &t.results, Duration::from_secs(3)).await.unwrap().len();
    println!("w6: 200 committed results for 200 inputs; {} records incl. aborted ones (what a read_uncommitted reader would see)", seen_raw);
    assert!(seen_raw >= 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn w7_partitions_move_under_load_without_loss_or_duplicates() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init_tracing();
    let b = Broker::shared();
    let t = topics(b, "w7", 4).await;
    let body = worker_body(&b.plaintext(), &t, "g-w7", "blur:3,sharpen", SHORT_SESSION);
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut w1 = Daemon::worker(WORKER, d1.path(), &body).env("FRAMELINK__WORKER__ID", "one");
    let mut w2 = Daemon::worker(WORKER, d2.path(), &body).env("FRAMELINK__WORKER__ID", "two");
    w1.start();
    w1.wait_for("worker one assigned", Duration::from_secs(60), |w| w.log_text().contains("Partitions assigned."));
    // A steady camera load while the group changes under it.
    let cfg = b.plaintext();
    let frames = t.frames.clone();
    let load = tokio::spawn(async move {
        for batch in 0..30u64 {
            produce_frames(&cfg, &frames, 20, batch * 20).await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    w1.wait_for("worker one busy", Duration::from_secs(60), |w| w.metric("frames_out_total", &[]) >= 30.0);
    w2.start(); // joins: worker one gives up partitions with frames in flight
    w2.wait_for("worker two working", Duration::from_secs(60), |w| w.metric("frames_out_total", &[]) >= 30.0);
    w2.stop(); // leaves: its partitions go back to worker one, still under load
    load.await.unwrap();
    let expected: BTreeSet<(String, u64)> = (0..600u64).map(|i| (format!("c{}", i % 4), i / 4)).collect();
    let results = wait_for_results(b, &t.results, &expected).await;
    w1.stop();
    let ids = result_ids(&results);
    let unique: BTreeSet<_> = ids.iter().cloned().collect();
    assert_eq!(unique, expected, "every input has an output");
    assert!(w1.log_text().contains("Partitions revoked"), "worker one gave partitions up");
    let by_worker: BTreeSet<&str> = results.iter().filter_map(|m| header(m, "framelink-worker")).collect();
    assert_eq!(by_worker, BTreeSet::from(["one", "two"]), "both workers owned partitions");
    // Handovers are graceful (finish in flight, commit, then let go): nothing done twice.
    assert_eq!(ids.len() - unique.len(), 0, "duplicates after cooperative rebalances");
}

/// The GPU backend in the running worker, on Mesa lavapipe (CI has no GPU): frames travel
/// through the batching GPU stage and come out byte-identical to the CPU backend's results.
#[tokio::test(flavor = "multi_thread")]
async fn w8_gpu_backend_results_equal_the_cpu_backend() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init_tracing();
    let b = Broker::shared();
    let t = topics(b, "w8", 4).await;
    let pipeline = "resize:320x240,sharpen,rotate:90";
    produce_frames(&b.plaintext(), &t.frames, 80, 0).await;
    let extra = "[gpu]\nbackend = \"software\"\nbatch = 4\n[motion]\nenabled = true\n";
    let body = worker_body(&b.plaintext(), &t, "g-w8", pipeline, extra).replace("threads = 2", "threads = 4");
    let dir = tempfile::tempdir().unwrap();
    let mut w = Daemon::worker(WORKER, dir.path(), &body);
    w.start();
    w.wait_for("80 processed", Duration::from_secs(90), |w| w.metric("frames_out_total", &[]) >= 80.0);
    let (gpu_frames, batches, fallbacks) = (w.metric("gpu_frames_total", &[]), w.metric("gpu_batches_total", &[]), w.metric("gpu_fallbacks_total", &[]));
    let backend = w.metric("backend_info", &["backend=\"gpu\"", "device_type=\"Cpu\""]);
    let health = w.healthz();
    w.stop();
    assert_eq!(backend, 1.0, "the backend metric names the GPU backend and the software adapter");
    assert!(health["backend"].as_str().unwrap().starts_with("gpu: llvmpipe"), "{health}");
    assert_eq!((gpu_frames, fallbacks), (80.0, 0.0), "every frame ran on the GPU stage");
    println!("w8: 80 frames in {batches} GPU batches ({:.1} frames per batch)", gpu_frames / batches);

    // The CPU backend on the same input.
    let jpeg = std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/images/rocket.jpg")).unwrap();
    let img = framelink_worker::decode::Decoder::new().decode(&jpeg, 50_000_000, Some((320, 240))).unwrap();
    let cpu = framelink_worker::ops::Pipeline::parse(pipeline).unwrap().apply(img).unwrap();
    let expected = framelink_worker::decode::encode(&cpu, 85).unwrap();
    let results = consume_all(&b.plaintext(), &t.results, Duration::from_secs(5)).await.unwrap();
    assert_eq!(results.len(), 80);
    for m in &results {
        assert!(m.payload() == Some(&expected[..]), "result {:?} differs from the CPU backend's", result_ids(std::slice::from_ref(m)));
    }
}
