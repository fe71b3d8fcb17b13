//! The agent end to end against a real Kafka broker: what arrives in Kafka is checked frame
//! by frame (sequence numbers, order, image size), through outages, crashes, a full spool,
//! bad certificates and a damaged spool.
//!
//! Tests that stop brokers use a private broker each; they run one at a time (a 2-core
//! machine runs a broker, the agent and a consumer per test).

use std::time::Duration;

use framelink_testkit::daemon::{Agent, sum_metric};
use framelink_testkit::smallfs::SmallFs;
use framelink_testkit::{Broker, init_tracing, rand_topic, rogue_identity};

mod support {
    pub mod frames;
}
use support::frames::{AGENT, arrived, assert_contiguous, body, check_delivery, serial, synthetic};

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
    // A live camera drops a frame its encoder is two frames behind on (counted as
    // encoder_behind): a loaded 2-core machine can starve the encoder, which is not the link.
    let behind = |a: &Agent| a.metric("frames_dropped_total", &["reason=\"encoder_behind\""]);
    agent.wait_for("300 frames captured and sent", Duration::from_secs(60), |a| a.metric("frames_sent_total", &[]) + behind(a) >= 300.0);
    let dropped = behind(&agent);
    assert_eq!(agent.metric("frames_dropped_total", &[]), dropped, "no drops but encoder_behind");
    assert!(dropped <= 30.0, "at most 10 % of the frames dropped by a starved encoder: {dropped}");
    assert_eq!(agent.metric("spool_written_bytes_total", &[]), 0.0, "a healthy link writes no frame to disk");
    agent.stop();
    let got = arrived(&broker.mtls(), &topic).await;
    assert_eq!(got.total as f64, 300.0 - dropped, "every frame not dropped arrived ({dropped} encoder_behind)");
    let seqs = got.seqs("cam0");
    assert!(seqs.windows(2).all(|w| w[0] < w[1]) && seqs.iter().all(|s| *s < 300), "cam0: in order, none twice: {seqs:?}");
    if dropped == 0.0 {
        assert_contiguous(seqs, 0, "cam0");
    }
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
    assert!(agent.metric("frames_spooled_total", &[]) >= 100.0);
    // A loaded run once saw no delivery for good after the broker's return: librdkafka#5430
    // (a partition left without a leader), now worked around by replacing the producer.
    // The outage outlasts message_timeout_ms (10 s): a frame the broker stored as it shut down,
    // its acknowledgement lost, is sent again (seen once: frame 51) — at-least-once, in order.
    check_delivery("t2", &mut agent, &broker.mtls(), &topic, 750, true).await;
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
    // Drops by camera and reason. Besides the policy's evictions, a busy machine may make the
    // capture stage drop a frame while the encoder waits on the spool (`encoder_behind`): also
    // counted, and the only other reason allowed here.
    let drops = |cam: &str, reason: &str| agent.metric("frames_dropped_total", &[&format!("camera=\"{cam}\""), &format!("reason=\"{reason}\"")]);
    let mut by_cam = Vec::new();
    for cam in ["x", "y"] {
        let all = agent.metric("frames_dropped_total", &[&format!("camera=\"{cam}\"")]);
        let (policy, behind) = (drops(cam, "spool_full_oldest"), drops(cam, "encoder_behind"));
        assert_eq!(policy + behind, all, "{cam}: every drop by policy or encoder_behind; metrics:\n{:?}", agent.metrics());
        by_cam.push((cam, all, policy, behind));
    }
    assert!(by_cam.iter().map(|c| c.2).sum::<f64>() > 0.0, "the cap was reached");

    broker.start().unwrap();
    agent.wait_for("spool drained", Duration::from_secs(90), |a| a.metric("spool_records", &[]) == 0.0 && a.healthz()["link"] == "up");
    agent.stop();
    let got = arrived(&broker.mtls(), &topic).await;
    for (cam, all, policy, behind) in by_cam {
        let seqs = got.seqs(cam);
        assert_eq!(seqs.len() as f64 + all, 200.0, "{cam}: arrived + counted drops = captured");
        if behind == 0.0 {
            // drop_oldest: what is missing is the oldest frames; the rest is a contiguous tail.
            assert_contiguous(seqs, 200 - seqs.len() as u64, cam);
        } else {
            // The evicted frames are the oldest: the tail starts after them, and the only gaps
            // in it are the frames the capture stage dropped.
            let (first, policy, behind) = (seqs[0], policy as u64, behind as u64);
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{cam}: every frame once, in order");
            assert!(first >= policy && first <= policy + behind, "{cam}: tail starts at {first}, {policy} evicted, {behind} behind");
            assert!(200 - first - seqs.len() as u64 <= behind, "{cam}: gaps in the tail beyond the {behind} encoder_behind drops");
        }
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
    // A busy machine may make the live camera drop a frame while the encoder is behind
    // (`encoder_behind`, counted — CI once timed out here waiting for all 400 sent): every
    // frame is sent or counted so.
    let behind = |a: &Agent| a.metric("frames_dropped_total", &["reason=\"encoder_behind\""]);
    agent.wait_for("everything delivered or counted as dropped", Duration::from_secs(120), |a| {
        a.metric("frames_sent_total", &[]) + behind(a) >= 400.0 && a.metric("spool_records", &[]) == 0.0
    });
    let (dropped, behind) = (agent.metric("frames_dropped_total", &[]), behind(&agent) as usize);
    assert_eq!(dropped as usize, behind, "no drop but encoder_behind; metrics:\n{:?}", agent.metrics());
    agent.stop();
    let got = arrived(&broker.mtls(), &topic).await;
    let mut seqs = got.seqs("cam").to_vec();
    assert_ne!(seqs, { let mut s = seqs.clone(); s.sort(); s }, "live frames overtook the backlog");
    seqs.sort();
    if behind == 0 {
        assert_contiguous(&seqs, 0, "every frame exactly once (in some order)");
    } else {
        assert!(seqs.windows(2).all(|w| w[0] < w[1]) && seqs.last() < Some(&400), "every frame at most once");
        assert_eq!(seqs.len() + behind, 400, "arrived + encoder_behind drops = captured");
    }
}

/// Frames handed to librdkafka just before the broker went away must not die with the agent:
/// once the link is judged down they are copied to the spool. Broker SIGKILLed under two
/// 30 fps cameras, the agent SIGKILLed 3 s into the outage, both restarted: every frame
/// captured before the crash, except the last flush window and the encoder queue, arrives.
#[tokio::test(flavor = "multi_thread")]
async fn t8_frames_in_flight_when_the_link_fails_survive_an_agent_crash() {
    let _g = serial();
    init_tracing();
    let broker = Broker::private().unwrap();
    let topic = rand_topic("agent-inflight");
    broker.create_topic(&topic, 2).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cams = synthetic("a", 640, 360, 30, 100_000) + &synthetic("b", 640, 360, 30, 100_000);
    // A long message timeout: without the fix, unacknowledged frames would wait in memory for it.
    let body = body("dev-8", &broker.mtls(), &topic, dir.path(), &cams, "").replace("message_timeout_ms = 10000", "message_timeout_ms = 30000");
    let mut agent = Agent::agent(AGENT, dir.path(), &body);
    agent.start();
    agent.wait_for("frames flowing", Duration::from_secs(30), |a| a.metric("frames_sent_total", &[]) >= 120.0);
    broker.kill().unwrap();
    agent.wait_for("the agent to notice", Duration::from_secs(30), |a| a.healthz()["link"] == "down");
    std::thread::sleep(Duration::from_secs(3));
    let captured: Vec<u64> = ["a", "b"].iter().map(|c| agent.metric("frames_captured_total", &[&format!("camera=\"{c}\"")]) as u64).collect();
    agent.kill();
    broker.start().unwrap();
    agent.start();
    agent.wait_for("the spool drained", Duration::from_secs(120), |a| {
        a.metric("spool_records", &[]) == 0.0 && a.healthz()["link"] == "up" && a.metric("frames_sent_total", &[]) >= 60.0
    });
    agent.stop();
    let got = arrived(&broker.mtls(), &topic).await;
    // Allowed loss at a crash: the spool's flush window (100 ms here = 3 frames at 30 fps) and
    // the encoder queue (2 frames), plus one frame of slack for the metric read before the kill.
    let window = 6;
    for (cam, n) in ["a", "b"].iter().zip(captured) {
        let seen: std::collections::BTreeSet<u64> = got.seqs(cam).iter().copied().collect();
        let missing: Vec<u64> = (0..n.saturating_sub(window)).filter(|s| !seen.contains(s)).collect();
        println!("t8: camera {cam}: {n} captured before the crash, {} missing, {} duplicates", missing.len(), got.seqs(cam).len() - seen.len());
        assert!(missing.is_empty(), "camera {cam}: frames captured before the crash never arrived: {missing:?}");
    }
}

/// The disk under the spool fills up. The spool keeps `min_free_bytes` free on its disk, so it
/// never runs into ENOSPC itself (after which sled 0.34 would refuse every index write): while
/// another file holds the disk, live frames keep flowing with the link up; during an outage
/// frames are refused before they are written and counted (`spool_disk_full`), `/healthz` shows
/// the lower cap; once space returns the spool takes frames again, and when it fills its own
/// disk (its `max_bytes` is far above the disk) it evicts the oldest (`spool_full_oldest`)
/// instead of failing. Then it drains; every captured frame is delivered or counted as dropped.
#[tokio::test(flavor = "multi_thread")]
async fn t9_a_full_disk_under_the_spool_drops_counted_and_recovers_by_itself() {
    let _g = serial();
    init_tracing();
    let fs = SmallFs::mount("24m");
    let broker = Broker::private().unwrap();
    let topic = rand_topic("agent-diskfull");
    broker.create_topic(&topic, 1).await.unwrap();
    let cams = synthetic("a", 640, 360, 30, 100_000) + &synthetic("b", 640, 360, 30, 100_000);
    let body = body("dev-9", &broker.mtls(), &topic, fs.path(), &cams, "").replace("[spool]\n", "[spool]\nmax_bytes = \"1 GiB\"\nmin_free_bytes = \"1 MiB\"\n");
    let logs = tempfile::tempdir().unwrap();
    let mut agent = Agent::agent(AGENT, logs.path(), &body);
    agent.start();
    agent.wait_for("frames flowing", Duration::from_secs(30), |a| a.metric("frames_sent_total", &[]) >= 60.0);
    // 1. Disk full, link up: frames still go straight to Kafka.
    fs.fill();
    let sent = agent.metric("frames_sent_total", &[]);
    agent.wait_for("frames flowing on a full disk", Duration::from_secs(30), |a| a.metric("frames_sent_total", &[]) >= sent + 60.0);
    // 2. Disk full and the link down: refused before writing, counted; the agent keeps running.
    broker.stop().unwrap();
    // Frames that waited stall_timeout_ms are copied to the spool (and refused) as soon as
    // they are late; the link is judged down once no acknowledgement came for that long, which
    // can be a little later when acknowledgements were still arriving as the broker stopped.
    agent.wait_for("refusals for the full disk counted, the link down", Duration::from_secs(60), |a| {
        a.metric("frames_dropped_total", &["reason=\"spool_disk_full\""]) >= 30.0 && a.healthz()["link"] != "up"
    });
    let health = agent.healthz();
    assert_eq!(health["status"], "degraded", "{health}");
    let cap = health["spool"]["cap_bytes"].as_u64().unwrap();
    assert!(cap < 24 << 20, "the disk's free space binds the cap: {health}");
    // 3. Space returns: spooling resumes by itself.
    fs.free();
    agent.wait_for("spooling again", Duration::from_secs(60), |a| a.metric("spool_records", &[]) >= 30.0);
    // 4. The spool fills its own disk: the oldest frames make room, no I/O error.
    agent.wait_for("evicting at the disk's limit", Duration::from_secs(120), |a| a.metric("frames_dropped_total", &["reason=\"spool_full_oldest\""]) >= 30.0);
    let health = agent.healthz();
    assert!(health["spool"]["error"].is_null(), "no spool I/O error when the spool fills its own disk: {health}");
    assert_eq!(health["spool"]["index_rebuilt"], 0, "{health}");
    // At most the disk less min_free_bytes, plus what the index's own log wrote since its last
    // flush (counted only then): those writes use that margin, which is what it is for.
    assert!(health["spool"]["bytes"].as_u64().unwrap() <= (23 << 20) + (256 << 10), "1 MiB stays free, less the index's writes since its last flush: {health}");
    // 5. The link returns: the spool drains.
    broker.start().unwrap();
    agent.wait_for("drained", Duration::from_secs(120), |a| a.metric("spool_records", &[]) == 0.0 && a.healthz()["link"] == "up");
    let metrics = agent.metrics();
    agent.stop();
    let got = arrived(&broker.mtls(), &topic).await;
    for cam in ["a", "b"] {
        let camera = format!("camera=\"{cam}\"");
        let captured = sum_metric(&metrics, "framelink_agent_frames_captured_total", &[&camera]);
        let dropped = sum_metric(&metrics, "framelink_agent_frames_dropped_total", &[&camera]);
        let disk = sum_metric(&metrics, "framelink_agent_frames_dropped_total", &[&camera, "reason=\"spool_disk_full\""]);
        let io = sum_metric(&metrics, "framelink_agent_frames_dropped_total", &[&camera, "reason=\"spool_io_error\""]);
        let unique: std::collections::BTreeSet<u64> = got.seqs(cam).iter().copied().collect();
        println!("t9: camera {cam}: captured {captured} (at the last scrape), delivered {} unique, dropped {dropped} ({disk} spool_disk_full, {io} spool_io_error)", unique.len());
        // Frames captured after the last scrape may have arrived too: delivered + dropped ≥ captured.
        assert!(unique.len() as f64 + dropped >= captured, "camera {cam}: every captured frame is delivered or counted as dropped");
        let max_seq = *unique.iter().max().unwrap();
        let lost = (0..=max_seq).filter(|s| !unique.contains(s)).count() as f64;
        assert!(lost <= dropped, "camera {cam}: {lost} sequence numbers missing in Kafka, only {dropped} counted as dropped");
    }
}

/// A fatal librdkafka producer error (injected after 60 frames, as an idempotence sequence
/// error after a leader change would raise it) makes that producer refuse every send: the agent
/// replaces it, the frames it held go through the spool, and every frame arrives.
#[tokio::test(flavor = "multi_thread")]
async fn t10_a_fatal_producer_error_replaces_the_producer_and_loses_nothing() {
    let _g = serial();
    init_tracing();
    let broker = Broker::shared();
    let topic = rand_topic("agent-fatal");
    broker.create_topic(&topic, 2).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cams = synthetic("a", 640, 360, 30, 150) + &synthetic("b", 320, 240, 30, 150);
    let mut agent = Agent::agent(AGENT, dir.path(), &body("dev-10", &broker.mtls(), &topic, dir.path(), &cams, "")).env("FRAMELINK_TEST_FATAL_ERROR_AFTER", "60");
    agent.start();
    // Live cameras: a frame the encoder is two behind on is dropped and counted as
    // encoder_behind (a starved encoder on a loaded machine, not the producer under test).
    let behind = |a: &Agent, cam: &str| a.metric("frames_dropped_total", &["reason=\"encoder_behind\"", &format!("camera=\"{cam}\"")]);
    agent.wait_for("every frame sent, spool empty", Duration::from_secs(90), |a| {
        a.metric("frames_sent_total", &[]) + behind(a, "a") + behind(a, "b") >= 300.0 && a.metric("spool_records", &[]) == 0.0 && a.healthz()["link"] == "up"
    });
    assert_eq!(agent.metric("producer_recreated_total", &[]), 1.0, "the producer was replaced once");
    let dropped = [behind(&agent, "a"), behind(&agent, "b")];
    assert_eq!(agent.metric("frames_dropped_total", &[]), dropped[0] + dropped[1], "no drops but encoder_behind");
    assert!(dropped.iter().all(|d| *d <= 15.0), "at most 10 % of each camera's frames dropped by a starved encoder: {dropped:?}");
    assert!(agent.log_text().contains("injecting a fatal producer error"));
    agent.stop();
    let got = arrived(&broker.mtls(), &topic).await;
    for (cam, dropped) in ["a", "b"].into_iter().zip(dropped) {
        let unique: std::collections::BTreeSet<u64> = got.seqs(cam).iter().copied().collect();
        assert!(unique.iter().all(|s| *s < 150), "camera {cam}: {unique:?}");
        assert_eq!(unique.len() as f64, 150.0 - dropped, "camera {cam}: every frame not dropped arrived ({dropped} encoder_behind)");
        println!("t10: camera {cam}: {} records for 150 frames, {dropped} encoder_behind", got.seqs(cam).len());
    }
}

/// A device clock behind the client certificate's start (a board without RTC before NTP):
/// `check-config` refuses, naming the certificate and the clock; `run` starts anyway, captures
/// and spools, and reports the TLS failure on `/healthz`.
#[tokio::test(flavor = "multi_thread")]
async fn t11_a_certificate_not_yet_valid_by_the_device_clock_does_not_stop_capture() {
    let _g = serial();
    init_tracing();
    let broker = Broker::shared();
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = framelink_testkit::rogue_identity_valid_from(dir.path(), 2).unwrap();
    let mut kafka = broker.mtls();
    kafka.tls.ca = Some(ca);
    kafka.tls.certificate = Some(cert);
    kafka.tls.key = Some(key);
    let topic = rand_topic("agent-clock");
    let mut agent = Agent::agent(AGENT, dir.path(), &body("dev-11", &kafka, &topic, dir.path(), &synthetic("cam", 320, 240, 10, 100_000), ""));
    let check = std::process::Command::new(AGENT).args(["check-config", "--config"]).arg(dir.path().join("agent.toml")).output().unwrap();
    let out = format!("{}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
    assert!(!check.status.success() && out.contains("not valid yet") && out.contains("tls.certificate"), "check-config fails hard: {out}");
    agent.start();
    agent.wait_for("frames spooled, TLS failure reported", Duration::from_secs(60), |a| {
        let h = a.healthz();
        a.metric("spool_records", &[]) >= 20.0 && h["link"] == "down" && h["link_error"].as_str().is_some()
    });
    assert!(agent.log_text().contains("validity period"), "the clock problem is logged");
    agent.stop();
}

/// A second agent on a running agent's spool directory refuses to start, naming the directory
/// and the running agent's pid, and touches nothing: the first goes on delivering.
#[tokio::test(flavor = "multi_thread")]
async fn t12_a_second_agent_on_the_same_spool_refuses_to_start() {
    let _g = serial();
    init_tracing();
    let broker = Broker::shared();
    let topic = rand_topic("agent-twice");
    broker.create_topic(&topic, 1).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::agent(AGENT, dir.path(), &body("dev-12", &broker.mtls(), &topic, dir.path(), &synthetic("cam", 320, 240, 10, 100_000), ""));
    agent.start();
    agent.wait_for("frames flowing", Duration::from_secs(30), |a| a.metric("frames_sent_total", &[]) >= 10.0);
    // The same config with another HTTP port: only the spool is shared.
    let config = std::fs::read_to_string(dir.path().join("agent.toml")).unwrap();
    let second = dir.path().join("second.toml");
    let port = framelink_testkit::daemon::free_port();
    let listen = config.lines().find(|l| l.starts_with("listen = ")).unwrap().to_string();
    std::fs::write(&second, config.replace(&listen, &format!("listen = \"127.0.0.1:{port}\""))).unwrap();
    let out = std::process::Command::new(AGENT).args(["run", "--config"]).arg(&second).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "the second agent must not run: {text}");
    let spool = dir.path().join("spool");
    assert!(text.contains(&spool.display().to_string()) && text.contains("in use by another framelink-agent (pid "), "names the directory and the other process: {text}");
    let sent = agent.metric("frames_sent_total", &[]);
    agent.wait_for("the first agent goes on", Duration::from_secs(30), |a| a.metric("frames_sent_total", &[]) >= sent + 10.0);
    assert_eq!(agent.metric("spool_damaged", &[]), 0.0, "nothing was treated as damage");
    agent.stop();
}
