//! The agent through network faults that are not a stopped broker: packets to and from the
//! broker silently dropped (no reset, no refusal), a flapping link, random packet loss, made
//! with nftables on loopback ([`framelink_testkit::netfault`]), and a slow link (seconds of
//! latency, [`framelink_testkit::latency`]). What arrives in Kafka is
//! checked frame by frame: every frame once, in order per camera (see
//! `support::frames::wait_and_check_delivery`).
//!
//! Needs root and `nft` (scripts/bootstrap installs nftables); each test has a private broker.

mod support {
    pub mod frames;
}

use std::time::{Duration, Instant};

use framelink_testkit::daemon::Agent;
use framelink_testkit::latency::SlowLink;
use framelink_testkit::netfault::NetFault;
use framelink_testkit::{Broker, init_tracing, rand_topic};
use support::frames::{AGENT, body, serial, synthetic, wait_and_check_delivery};

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

#[tokio::test(flavor = "multi_thread")]
async fn n1_a_silent_blackhole_for_30_s_is_caught_as_a_stall_and_loses_nothing() {
    const PHASE: &str = "n1 blackhole";
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
    wait_and_check_delivery(PHASE, &mut agent, &broker.mtls(), &topic, FRAMES).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn n2_a_link_flapping_every_few_seconds_loses_and_duplicates_nothing() {
    const PHASE: &str = "n2 flapping";
    let _g = serial();
    init_tracing();
    let broker = Broker::private().unwrap();
    let topic = rand_topic("agent-flapping");
    broker.create_topic(&topic, 2).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start_agent(&broker, &topic, dir.path());
    let fault = NetFault::on_ports(&[tls_port(&broker)]).unwrap();
    // 6 cycles of 6-7 s of silence (past stall_timeout_ms: the link is judged stalled, frames
    // are copied and spooled) and 3 s of link (librdkafka's retries and the drain resume).
    for i in 0..6u64 {
        fault.blackhole().unwrap();
        std::thread::sleep(Duration::from_millis(6000 + 500 * (i % 3)));
        fault.heal().unwrap();
        std::thread::sleep(Duration::from_secs(3));
    }
    let (stalls, spooled) = (agent.metric("link_stalls_total", &[]), agent.metric("frames_spooled_total", &[]));
    eprintln!("n2: 6 flaps; stalls {stalls}, spooled {spooled}");
    assert!(stalls >= 1.0 && spooled >= 1.0, "silences past stall_timeout_ms are noticed: stalls {stalls}, spooled {spooled}");
    wait_and_check_delivery(PHASE, &mut agent, &broker.mtls(), &topic, FRAMES).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn n3_two_percent_packet_loss_for_30_s_loses_and_duplicates_nothing() {
    const PHASE: &str = "n3 2 % loss";
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
    wait_and_check_delivery(PHASE, &mut agent, &broker.mtls(), &topic, FRAMES).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn n4_a_slow_link_is_judged_stalled_only_once_its_round_trip_passes_the_stall_timeout() {
    const PHASE: &str = "n4 latency";
    let _g = serial();
    init_tracing();
    let broker = Broker::private().unwrap();
    let topic = rand_topic("agent-slow");
    broker.create_topic(&topic, 2).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Before the agent connects: only new connections go through the slow link.
    let link = SlowLink::on_port(tls_port(&broker)).unwrap();
    let mut agent = start_agent(&broker, &topic, dir.path());
    // 0.75 s each way: a 1.5 s round trip, well under stall_timeout_ms (5 s) — with several
    // requests in flight a frame can wait a few round trips for its acknowledgement. Frames
    // wait longer for it, but nothing is judged stalled or spooled.
    link.set_delay(Duration::from_millis(750));
    let sent0 = agent.metric("frames_sent_total", &[]);
    std::thread::sleep(Duration::from_secs(20));
    let (stalls, spooled, sent) = (agent.metric("link_stalls_total", &[]), agent.metric("frames_spooled_total", &[]), agent.metric("frames_sent_total", &[]) - sent0);
    let health = agent.healthz();
    eprintln!("n4: 20 s at a 1.5 s round trip: sent {sent}, stalls {stalls}, spooled {spooled}; healthz link {}", health["link"]);
    assert_eq!((stalls, spooled), (0.0, 0.0), "a 1.5 s round trip is no stall");
    assert_eq!(health["link"], "up");
    // 400 captured in the 20 s; the first acknowledgements come a round trip late.
    assert!(sent >= 2.0 * 10.0 * 12.5, "frames flowed at about the cameras' rate through the latency: {sent}");
    // 4 s each way: an 8 s round trip passes stall_timeout_ms: the link is judged stalled and
    // the waiting frames are spooled (librdkafka itself sees no error).
    link.set_delay(Duration::from_secs(4));
    agent.wait_for("the slow link judged stalled", Duration::from_secs(20), |a| a.metric("link_stalls_total", &[]) >= 1.0);
    std::thread::sleep(Duration::from_secs(10));
    eprintln!("n4: 8 s round trip: stalls {}, spooled {}", agent.metric("link_stalls_total", &[]), agent.metric("frames_spooled_total", &[]));
    assert!(agent.metric("frames_spooled_total", &[]) > 0.0, "frames went to the spool");
    link.set_delay(Duration::ZERO);
    wait_and_check_delivery(PHASE, &mut agent, &broker.mtls(), &topic, FRAMES).await;
}
