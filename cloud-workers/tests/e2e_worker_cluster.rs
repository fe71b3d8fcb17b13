//! The worker in exactly-once mode against a replicated three-broker cluster (RF 3,
//! `min.insync.replicas=2`, the transaction log replicated): the leader of a results partition
//! is SIGKILLed, then the broker coordinating the worker's transactions, while frames keep
//! coming. A `read_committed` reader must see exactly one result per frame: none lost, none
//! twice.
//!
//! A second test keeps the broker coordinating the worker's *group* down for 30 s, long enough
//! for the cluster to fence it: librdkafka's `send_offsets_to_transaction` can then wait for
//! that coordinator for good (confluentinc/librdkafka#5456, #5511), and the worker must replace
//! its producer in place and go on.
//!
//! A worker whose group coordinator dies is often fenced (`FENCED_INSTANCE_ID`: librdkafka's own
//! session timeout runs out and its rejoin under the same static `group.instance.id` is
//! refused); it must replace its consumer in place. Should it exit anyway, the tests restart it
//! the way systemd's `Restart=always` does (so the rest of the run still says something), print
//! why, and fail: every recovery here must happen without a restart.

mod support {
    pub mod worker;
}

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use framelink_testkit::cluster::{Cluster, NODES};
use framelink_testkit::daemon::Daemon;
use framelink_testkit::{consume_all, init_tracing, rand_topic};
use rdkafka::message::Message;
use support::worker::{SERIAL, Topics, WORKER, produce_frames, result_ids, worker_body};

/// `transaction.state.log.num.partitions` of the test brokers (`scripts/kafka`; Kafka's
/// default is 50).
const TXN_LOG_PARTITIONS: i32 = 4;
/// `offsets.topic.num.partitions` of the test brokers (Kafka's default is 50).
const OFFSETS_PARTITIONS: i32 = 8;

/// The partition of `__transaction_state` (for a transactional id) or `__consumer_offsets`
/// (for a group id) that holds `id`, as the broker computes it: `abs(javaHashCode(id)) %
/// partitions`. Its leader is the transaction or group coordinator.
fn coordinator_partition(id: &str, partitions: i32) -> i32 {
    let hash = id.encode_utf16().fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(c as i32));
    // Kafka's Utils.abs: Integer.MIN_VALUE maps to 0.
    let abs = if hash == i32::MIN { 0 } else { hash.abs() };
    abs % partitions
}

#[test]
fn the_transaction_log_partition_matches_javas_string_hash() {
    // Java 17: "framelink".hashCode() == 545839847, % 50 == 47;
    // "framelink-worker-g-wc-eos-c".hashCode() == 513686861, % 50 == 11.
    assert_eq!(coordinator_partition("framelink", 50), 47);
    assert_eq!(coordinator_partition("framelink-worker-g-wc-eos-c", 50), 11);
    assert_eq!(coordinator_partition("framelink-worker-g-wc-eos-c", 4), 1);
    assert_eq!(coordinator_partition("", 50), 0);
}

/// The worker under test, restarted the way systemd's `Restart=always` does when it exits.
struct Supervised {
    w: Daemon,
    t0: Instant,
    restarts: u32,
}

impl Supervised {
    /// The worker's outputs so far (0 while it restarts), restarting it if it exited.
    fn out(&mut self) -> f64 {
        let before = self.w.log_text().len();
        if self.w.restart_if_exited() {
            self.restarts += 1;
            // The exited run's last lines (the restart appends to the same log).
            let log = self.w.log_text();
            let ended = &log[..before.min(log.len())];
            let lines: Vec<&str> = ended.lines().filter(|l| !l.contains("Connect to ipv4")).collect();
            let tail = lines[lines.len().saturating_sub(12)..].join("\n");
            eprintln!("the worker exited at {:.0} s and was restarted (restart {}); its last lines:\n{tail}", self.t0.elapsed().as_secs_f64(), self.restarts);
        }
        self.w.metric("frames_out_total", &[])
    }

    /// Waits (up to 240 s) until `n` frames have results; then checks that read_committed
    /// shows each exactly once (`exactly_once`) or at least once. A stall (no new output for
    /// 60 s) is caught in the act: the worker's `/healthz`, stacks and log are printed.
    async fn expect_every_frame(mut self, kafka: &framelink_common::kafka_config::KafkaConfig, results_topic: &str, n: u64, exactly_once: bool) {
        let expected: BTreeSet<(String, u64)> = (0..n).map(|i| (format!("c{}", i % 4), i / 4)).collect();
        let mut results = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(240);
        let (mut last_out, mut moved, mut sampled) = (-1.0, Instant::now(), false);
        while Instant::now() < deadline {
            let now_out = self.out();
            if now_out != last_out {
                (last_out, moved) = (now_out, Instant::now());
            } else if !sampled && moved.elapsed() > Duration::from_secs(60) {
                sampled = true;
                // Whether the consumer still fetches (lag, partitions, in flight) tells a stuck
                // fetch from a stuck commit; the stacks say where the poll thread is.
                eprintln!("no output for 60 s (out {now_out}); /healthz {}", self.w.healthz());
                eprintln!("the worker's stacks:\n{}", self.w.stacks().unwrap_or_else(|| "(eu-stack not installed)".into()));
                eprintln!("the worker's log:\n{}", self.w.tail());
            }
            results = consume_all(kafka, results_topic, Duration::from_secs(3)).await.unwrap();
            if result_ids(&results).into_iter().collect::<BTreeSet<_>>() == expected {
                break;
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        self.out();
        let aborted = self.w.metric("transactions_aborted_total", &[]);
        let committed = self.w.metric("transactions_committed_total", &[]);
        let log = self.w.log_text();
        let renewals = log.matches("Replacing the transactional producer").count();
        let fenced = log.matches("replacing the consumer").count();
        self.w.stop();
        let ids = result_ids(&results);
        let unique: BTreeSet<_> = ids.iter().cloned().collect();
        eprintln!("{} committed results for {n} frames; transactions (last run): {committed} committed, {aborted} aborted; producers replaced {renewals}; consumers replaced after fencing {fenced}; worker restarts {}", ids.len(), self.restarts);
        assert_eq!(unique.len(), expected.len(), "every frame has a result (missing {:?})", expected.difference(&unique).take(10).collect::<Vec<_>>());
        assert_eq!(self.restarts, 0, "the worker recovered in place (producer or consumer replaced), without exiting");
        if !exactly_once {
            eprintln!("at-least-once: {} frames processed twice", ids.len() - unique.len());
            return;
        }
        if ids.len() != unique.len() {
            let mut seen: BTreeMap<_, Vec<_>> = BTreeMap::new();
            for (m, id) in results.iter().zip(&ids) {
                seen.entry(id.clone()).or_default().push((m.partition(), m.offset()));
            }
            let dups: Vec<_> = seen.iter().filter(|(_, v)| v.len() > 1).take(10).collect();
            panic!("read_committed shows duplicates: {dups:?}");
        }
        assert_eq!(ids.len() as u64, n, "read_committed: exactly one result per frame");
    }
}

/// A private cluster with the four topics, 300 frames waiting, and a worker (`worker.id` =
/// `id`, exactly-once or at-least-once) that has processed some of them (and, exactly-once,
/// committed some transactions).
async fn cluster_with_worker(group: &str, id: &str, exactly_once: bool) -> (Cluster, Topics, tempfile::TempDir, Supervised) {
    let cluster = Cluster::private().unwrap();
    let t = Topics { frames: rand_topic("wc-in"), results: rand_topic("wc-out"), events: rand_topic("wc-ev"), dlq: rand_topic("wc-dlq") };
    for (name, p) in [(&t.frames, 2), (&t.results, 2), (&t.events, 1), (&t.dlq, 1)] {
        cluster.create_topic(name, p).await.unwrap();
    }
    let kafka = cluster.plaintext();
    produce_frames(&kafka, &t.frames, 300, 0).await;
    let extra = if exactly_once { "delivery = \"exactly-once\"\ntransaction_ms = 200\n" } else { "" };
    let dir = tempfile::tempdir().unwrap();
    let mut w = Daemon::worker(WORKER, dir.path(), &worker_body(&kafka, &t, group, "resize:320x240", extra)).env("FRAMELINK__WORKER__ID", id);
    w.start();
    let committed = if exactly_once { 2.0 } else { 0.0 };
    w.wait_for("some frames processed", Duration::from_secs(90), |w| w.metric("transactions_committed_total", &[]) >= committed && w.metric("frames_out_total", &[]) >= 40.0);
    (cluster, t, dir, Supervised { w, t0: Instant::now(), restarts: 0 })
}

#[tokio::test(flavor = "multi_thread")]
async fn exactly_once_through_a_leader_kill_and_a_coordinator_move() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init_tracing();
    let group = "g-wc";
    let (cluster, t, _dir, mut w) = cluster_with_worker(group, "eos-c", true).await;
    let kafka = cluster.plaintext();

    // The leader of a results partition dies mid-stream (its transactions' writes move).
    let leader = cluster.leader_of(&t.results, 0).unwrap();
    assert!(NODES.contains(&leader));
    cluster.kill(leader).unwrap();
    eprintln!("results leader {leader} SIGKILLed; out {}", w.out());
    produce_frames(&kafka, &t.frames, 150, 300).await;
    std::thread::sleep(Duration::from_secs(8));
    cluster.start(leader).unwrap();
    eprintln!("node {leader} back at {:.0} s; out {}", w.t0.elapsed().as_secs_f64(), w.out());

    // Then the broker coordinating the worker's transactions.
    let tid = format!("framelink-worker-{group}-eos-c");
    let coordinator = cluster.leader_of("__transaction_state", coordinator_partition(&tid, TXN_LOG_PARTITIONS)).unwrap();
    assert!(NODES.contains(&coordinator), "{tid} has a coordinator: {coordinator}");
    cluster.kill(coordinator).unwrap();
    eprintln!("transaction coordinator {coordinator} SIGKILLed at {:.0} s; out {}", w.t0.elapsed().as_secs_f64(), w.out());
    produce_frames(&kafka, &t.frames, 150, 450).await;
    std::thread::sleep(Duration::from_secs(8));
    cluster.start(coordinator).unwrap();
    eprintln!("node {coordinator} back at {:.0} s; out {}", w.t0.elapsed().as_secs_f64(), w.out());

    w.expect_every_frame(&kafka, &t.results, 600, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn exactly_once_through_a_long_group_coordinator_outage() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init_tracing();
    group_coordinator_outage("g-gc", "eos-g", true).await;
}

/// The same outage at-least-once: the fenced consumer is replaced in place as well; frames in
/// flight may be processed twice (counted), none is lost.
#[tokio::test(flavor = "multi_thread")]
async fn at_least_once_through_a_long_group_coordinator_outage() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init_tracing();
    group_coordinator_outage("g-gca", "alo-g", false).await;
}

async fn group_coordinator_outage(group: &str, id: &str, exactly_once: bool) {
    let (cluster, t, _dir, mut w) = cluster_with_worker(group, id, exactly_once).await;
    let kafka = cluster.plaintext();

    // Down for 30 s: past the controller's broker session timeout (9 s), so the cluster fences
    // the node and clients drop it from their metadata while it is down.
    let coordinator = cluster.leader_of("__consumer_offsets", coordinator_partition(group, OFFSETS_PARTITIONS)).unwrap();
    assert!(NODES.contains(&coordinator), "{group} has a coordinator: {coordinator}");
    cluster.kill(coordinator).unwrap();
    eprintln!("group coordinator {coordinator} SIGKILLed; out {}", w.out());
    produce_frames(&kafka, &t.frames, 300, 300).await;
    for _ in 0..15 {
        std::thread::sleep(Duration::from_secs(2));
        w.out();
    }
    cluster.start(coordinator).unwrap();
    eprintln!("node {coordinator} back at {:.0} s; out {}", w.t0.elapsed().as_secs_f64(), w.out());

    w.expect_every_frame(&kafka, &t.results, 600, exactly_once).await;
}
