//! The agent against a replicated three-broker cluster (RF 3, `min.insync.replicas=2`): a
//! partition leader SIGKILLed and a rolling restart of all three; one broker down for the whole
//! run (the cluster still serves: the agent stays direct); two of three down (below min ISR:
//! the agent spools, then drains when one returns). Kafka's content is checked frame by frame.
//!
//! One cluster serves the phases one after another (three JVMs are heavy on 2 cores).

mod support {
    pub mod frames;
}

use std::time::{Duration, Instant};

use framelink_testkit::cluster::{Cluster, NODES};
use framelink_testkit::daemon::Agent;
use framelink_testkit::{Producer, init_tracing, rand_topic, test_meta};
use support::frames::{AGENT, body, serial, synthetic, wait_and_check_delivery};

/// An agent on two cameras at `fps` sending to the cluster's three brokers (mTLS).
fn start_agent(cluster: &Cluster, topic: &str, dir: &std::path::Path, fps: u32, frames: u64) -> Agent {
    let cams = synthetic("a", 320, 240, fps, frames) + &synthetic("b", 320, 240, fps, frames);
    let cfg = body("dev-cluster", &cluster.mtls(), topic, dir, &cams, "").replace("message_timeout_ms = 10000", "message_timeout_ms = 30000");
    let mut agent = Agent::agent(AGENT, dir, &cfg);
    agent.start();
    agent.wait_for("frames flowing", Duration::from_secs(60), |a| a.metric("frames_sent_total", &[]) >= 20.0);
    agent
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_through_leader_kills_rolling_restarts_and_lost_brokers_of_a_cluster() {
    let _g = serial();
    init_tracing();
    let cluster = Cluster::private().unwrap();

    // 1. One broker of three down for the whole run: the cluster still serves, so the agent
    //    stays direct (a refused connection to one broker is not an outage) and writes nothing
    //    to disk.
    {
        let topic = rand_topic("cluster-one-down");
        cluster.create_topic(&topic, 2).await.unwrap();
        let probe_topic = rand_topic("cluster-probe");
        cluster.create_topic(&probe_topic, 1).await.unwrap();
        cluster.kill(3).unwrap();
        // The run starts once the cluster has moved node 3's leaderships (the controller fences
        // a dead node after ≈ 9 s): from then on the cluster serves everything without it.
        let deadline = Instant::now() + Duration::from_secs(60);
        while (0..2).any(|p| cluster.leader_of(&topic, p).unwrap() == 3) {
            assert!(Instant::now() < deadline, "node 3's partitions got new leaders");
            std::thread::sleep(Duration::from_millis(500));
        }
        // … and the transaction-state partitions it led are loaded elsewhere: until then no
        // idempotent producer gets a producer id ("Coordinator load in progress"), and frames
        // would rightly wait. An idempotent probe on a topic of its own tells.
        let probe = Producer::new(&cluster.mtls()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while probe.send_frame(&probe_topic, &test_meta("probe", "p", 0), b"probe").await.is_err() {
            assert!(Instant::now() < deadline, "an idempotent producer gets through with node 3 down");
        }
        let dir = tempfile::tempdir().unwrap();
        let frames = 300;
        let mut agent = start_agent(&cluster, &topic, dir.path(), 15, frames);
        let mut states = std::collections::BTreeSet::new();
        while agent.metric("frames_sent_total", &[]) + agent.metric("frames_dropped_total", &[]) < 2.0 * frames as f64 {
            states.insert(agent.healthz()["link"].as_str().unwrap_or_default().to_owned());
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(states.into_iter().collect::<Vec<_>>(), ["up"], "the link stayed up with one broker of three down; log:\n{}", agent.tail());
        assert_eq!(agent.metric("spool_written_bytes_total", &[]), 0.0, "no frame touched the disk");
        assert_eq!(agent.metric("link_stalls_total", &[]), 0.0);
        wait_and_check_delivery("one broker down", &mut agent, &cluster.mtls(), &topic, frames).await;
        cluster.start(3).unwrap();
    }

    // 2. 30 fps on two cameras while the partitions' leader is SIGKILLed and restarted, then
    //    a rolling restart of all three: every frame once, in order per camera.
    {
        let topic = rand_topic("cluster-leader-kill");
        cluster.create_topic(&topic, 2).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let frames = 30 * 100;
        let mut agent = start_agent(&cluster, &topic, dir.path(), 30, frames);
        let t0 = Instant::now();
        let leader = cluster.leader_of(&topic, 0).unwrap();
        assert!(NODES.contains(&leader), "partition 0 has a leader: {leader}");
        cluster.kill(leader).unwrap();
        eprintln!("leader kill: node {leader} SIGKILLed at {:.1} s", t0.elapsed().as_secs_f64());
        std::thread::sleep(Duration::from_secs(10));
        cluster.start(leader).unwrap();
        eprintln!("leader kill: node {leader} back at {:.1} s; sent {}", t0.elapsed().as_secs_f64(), agent.metric("frames_sent_total", &[]));
        for n in NODES {
            cluster.restart(n).unwrap();
            eprintln!("rolling restart: node {n} back at {:.1} s; sent {}", t0.elapsed().as_secs_f64(), agent.metric("frames_sent_total", &[]));
        }
        wait_and_check_delivery("leader kill and rolling restart", &mut agent, &cluster.mtls(), &topic, frames).await;
    }

    // 3. Two of three down: below min.insync.replicas (and the controllers' quorum) nothing
    //    is acknowledged, so the agent spools; one node back, it drains.
    {
        let topic = rand_topic("cluster-two-down");
        cluster.create_topic(&topic, 2).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let frames = 15 * 60;
        let mut agent = start_agent(&cluster, &topic, dir.path(), 15, frames);
        cluster.kill(2).unwrap();
        cluster.kill(3).unwrap();
        agent.wait_for("two down: the link judged down", Duration::from_secs(40), |a| a.healthz()["link"] == "down");
        agent.wait_for("two down: frames spooled", Duration::from_secs(40), |a| a.metric("spool_records", &[]) >= 50.0);
        eprintln!("two down: {}", agent.healthz());
        cluster.start(2).unwrap();
        wait_and_check_delivery("two of three down", &mut agent, &cluster.mtls(), &topic, frames).await;
        cluster.start(3).unwrap();
    }
}
