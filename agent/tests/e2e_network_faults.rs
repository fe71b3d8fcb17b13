//! The agent through network faults that are not a stopped broker: packets to and from the
//! broker silently dropped (no reset, no refusal), a flapping link, and random packet loss,
//! made with nftables on loopback ([`framelink_testkit::netfault`]). What arrives in Kafka is
//! checked frame by frame: every frame once, in order per camera.
//!
//! Needs root and `nft` (scripts/bootstrap installs nftables); each test has a private broker.

mod support {
    pub mod frames;
}

use std::time::{Duration, Instant};

use framelink_testkit::daemon::Agent;
use framelink_testkit::netfault::NetFault;
use framelink_testkit::{Broker, init_tracing, rand_topic};
use support::frames::{AGENT, arrived, assert_contiguous, body, serial, synthetic};

/// Frames per camera; two cameras at 10 fps, so a minute of capture.
const FRAMES: u64 = 600;

/// The broker's mTLS port (the agent's only connection).
fn tls_port(broker: &Broker) -> u16 {
    broker.bootstrap_tls.rsplit(':').next().and_then(|p| p.parse().ok()).expect("host:port")
}

/// An agent on two 10 fps cameras; `message_timeout_ms` above the faults' length, so that
/// librdkafka's own retries (idempotent: no duplicates) deliver what the fault held up.
fn start_agent(broker: &Broker, topic: &str, dir: &std::path::Path) -> Agent {
    let cams = synthetic("a", 320, 240, 10, FRAMES) + &synthetic("b", 320, 240, 10, FRAMES);
    let cfg = body("dev-net", &broker.mtls(), topic, dir, &cams, "").replace("message_timeout_ms = 10000", "message_timeout_ms = 60000");
    let mut agent = Agent::agent(AGENT, dir, &cfg);
    agent.start();
    agent.wait_for("frames flowing", Duration::from_secs(30), |a| a.metric("frames_sent_total", &[]) >= 20.0);
    agent
}

/// Waits for every frame, then checks Kafka frame by frame: each once, in order per camera.
async fn assert_all_delivered_once(agent: &mut Agent, broker: &Broker, topic: &str) {
    let total = 2.0 * FRAMES as f64;
    agent.wait_for("every frame delivered", Duration::from_secs(240), |a| a.metric("frames_sent_total", &[]) >= total);
    agent.wait_for("spool empty, link up", Duration::from_secs(60), |a| a.metric("spool_records", &[]) == 0.0 && a.healthz()["link"] == "up");
    assert_eq!(agent.metric("frames_dropped_total", &[]), 0.0);
    agent.stop();
    let got = arrived(&broker.mtls(), topic).await;
    assert_contiguous(got.seqs("a"), 0, "camera a");
    assert_contiguous(got.seqs("b"), 0, "camera b");
    assert_eq!(got.total, 2 * FRAMES as usize, "exactly once");
}

#[tokio::test(flavor = "multi_thread")]
async fn n1_a_silent_blackhole_for_30_s_is_caught_as_a_stall_and_loses_nothing() {
    let _g = serial();
    init_tracing();
    let broker = Broker::private().unwrap();
    let topic = rand_topic("agent-blackhole");
    broker.create_topic(&topic, 2).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start_agent(&broker, &topic, dir.path());
    let fault = NetFault::on_ports(&[tls_port(&broker)]).unwrap();
    fault.blackhole().unwrap();
    let t0 = Instant::now();
    // librdkafka sees no error: only the missing acknowledgements tell.
    agent.wait_for("the stall to be noticed", Duration::from_secs(20), |a| a.healthz()["link"] == "down");
    let noticed = t0.elapsed();
    let health = agent.healthz();
    eprintln!("n1: stall noticed {:.2} s after the blackhole began (stall_timeout_ms 5000); healthz {health}", noticed.as_secs_f64());
    // 5 s of stall_timeout_ms, plus the acknowledgements of the frames just before the fault
    // and the forwarder's 50 ms turn; the slack is for a loaded 2-core machine.
    assert!(noticed >= Duration::from_millis(4500) && noticed < Duration::from_secs(9), "noticed after {noticed:?}");
    assert!(health["link_error"].as_str().unwrap_or_default().starts_with("link stalled: no acknowledgement"), "/healthz says why: {health}");
    assert_eq!(agent.metric("link_stalls_total", &[]), 1.0);
    assert!(agent.metric("frames_spooled_total", &["reason=\"unacknowledged\""]) > 0.0, "the waiting frames were copied to the spool");
    agent.wait_for("new frames spooled", Duration::from_secs(30), |a| a.metric("frames_spooled_total", &["reason=\"backlog\""]) >= 50.0);
    std::thread::sleep(Duration::from_secs(30).saturating_sub(t0.elapsed()));
    fault.heal().unwrap();
    eprintln!("n1: healed after {:.1} s", t0.elapsed().as_secs_f64());
    assert_all_delivered_once(&mut agent, &broker, &topic).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn n2_a_link_flapping_every_few_seconds_loses_and_duplicates_nothing() {
    let _g = serial();
    init_tracing();
    let broker = Broker::private().unwrap();
    let topic = rand_topic("agent-flapping");
    broker.create_topic(&topic, 2).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start_agent(&broker, &topic, dir.path());
    let fault = NetFault::on_ports(&[tls_port(&broker)]).unwrap();
    // 8 cycles: 3 s of silence, 2 s of link (the silences differ a little, like a real one).
    for i in 0..8u64 {
        fault.blackhole().unwrap();
        std::thread::sleep(Duration::from_millis(2500 + 250 * (i % 3)));
        fault.heal().unwrap();
        std::thread::sleep(Duration::from_secs(2));
    }
    eprintln!("n2: 8 flaps; stalls {}, spooled {}", agent.metric("link_stalls_total", &[]), agent.metric("frames_spooled_total", &[]));
    assert_all_delivered_once(&mut agent, &broker, &topic).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn n3_two_percent_packet_loss_for_30_s_loses_and_duplicates_nothing() {
    let _g = serial();
    init_tracing();
    let broker = Broker::private().unwrap();
    let topic = rand_topic("agent-lossy");
    broker.create_topic(&topic, 2).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start_agent(&broker, &topic, dir.path());
    let fault = NetFault::on_ports(&[tls_port(&broker)]).unwrap();
    fault.lossy(2).unwrap();
    std::thread::sleep(Duration::from_secs(30));
    let sent = agent.metric("frames_sent_total", &[]);
    fault.heal().unwrap();
    eprintln!("n3: 30 s at 2 % loss: sent {sent}, stalls {}, spooled {}", agent.metric("link_stalls_total", &[]), agent.metric("frames_spooled_total", &[]));
    // TCP retransmits what is lost: frames keep flowing through the loss.
    assert!(sent >= 2.0 * 10.0 * 25.0, "frames flowed through the loss: {sent}");
    assert_all_delivered_once(&mut agent, &broker, &topic).await;
}
