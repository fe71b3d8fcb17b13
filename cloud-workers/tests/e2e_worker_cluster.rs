//! The worker in exactly-once mode against a replicated three-broker cluster (RF 3,
//! `min.insync.replicas=2`, the transaction log replicated): the leader of a results partition
//! is SIGKILLed, then the broker coordinating the worker's transactions, while frames keep
//! coming. A `read_committed` reader must see exactly one result per frame: none lost, none
//! twice.
//!
//! A worker whose group coordinator dies may exit with `FencedInstanceId` (librdkafka's own
//! session timeout rejoins under the same static `group.instance.id`, and the transaction's
//! offsets, sent for the old generation, are refused as fenced): the test restarts it the way
//! systemd's `Restart=always` does, counts the restarts, and still demands exactly-once.

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

/// The partition of `__transaction_state` that holds a transactional id, as the broker
/// computes it: `abs(javaHashCode(id)) % partitions`. Its leader is the transaction
/// coordinator.
fn transaction_log_partition(transactional_id: &str, partitions: i32) -> i32 {
    let hash = transactional_id.encode_utf16().fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(c as i32));
    // Kafka's Utils.abs: Integer.MIN_VALUE maps to 0.
    let abs = if hash == i32::MIN { 0 } else { hash.abs() };
    abs % partitions
}

#[test]
fn the_transaction_log_partition_matches_javas_string_hash() {
    // Java 17: "framelink".hashCode() == 545839847, % 50 == 47;
    // "framelink-worker-g-wc-eos-c".hashCode() == 513686861, % 50 == 11.
    assert_eq!(transaction_log_partition("framelink", 50), 47);
    assert_eq!(transaction_log_partition("framelink-worker-g-wc-eos-c", 50), 11);
    assert_eq!(transaction_log_partition("framelink-worker-g-wc-eos-c", 4), 1);
    assert_eq!(transaction_log_partition("", 50), 0);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "open intermittent stall (#14, docs/worker.md item 16): 1 of 11 loaded runs with bounded commits made no progress for minutes after the coordinator's SIGKILL. Run with --ignored"]
async fn exactly_once_through_a_leader_kill_and_a_coordinator_move() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init_tracing();
    let cluster = Cluster::private().unwrap();
    let t = Topics { frames: rand_topic("wc-in"), results: rand_topic("wc-out"), events: rand_topic("wc-ev"), dlq: rand_topic("wc-dlq") };
    for (name, p) in [(&t.frames, 2), (&t.results, 2), (&t.events, 1), (&t.dlq, 1)] {
        cluster.create_topic(name, p).await.unwrap();
    }
    let kafka = cluster.plaintext();
    produce_frames(&kafka, &t.frames, 300, 0).await;
    let group = "g-wc";
    let extra = "delivery = \"exactly-once\"\ntransaction_ms = 200\n";
    let dir = tempfile::tempdir().unwrap();
    let mut w = Daemon::worker(WORKER, dir.path(), &worker_body(&kafka, &t, group, "resize:320x240", extra)).env("FRAMELINK__WORKER__ID", "eos-c");
    w.start();
    w.wait_for("some transactions committed", Duration::from_secs(90), |w| w.metric("transactions_committed_total", &[]) >= 2.0 && w.metric("frames_out_total", &[]) >= 40.0);
    let t0 = Instant::now();
    let mut restarts = 0;
    // The worker's outputs so far (0 while it restarts), restarting it if it exited.
    let mut out = |w: &mut Daemon| {
        if w.restart_if_exited() {
            restarts += 1;
            eprintln!("the worker exited at {:.0} s and was restarted (restart {restarts})", t0.elapsed().as_secs_f64());
        }
        w.metric("frames_out_total", &[])
    };

    // The leader of a results partition dies mid-stream (its transactions' writes move).
    let leader = cluster.leader_of(&t.results, 0).unwrap();
    assert!(NODES.contains(&leader));
    cluster.kill(leader).unwrap();
    eprintln!("results leader {leader} SIGKILLed; out {}", out(&mut w));
    produce_frames(&kafka, &t.frames, 150, 300).await;
    std::thread::sleep(Duration::from_secs(8));
    cluster.start(leader).unwrap();
    eprintln!("node {leader} back at {:.0} s; out {}", t0.elapsed().as_secs_f64(), out(&mut w));

    // Then the broker coordinating the worker's transactions.
    let tid = format!("framelink-worker-{group}-eos-c");
    let coordinator = cluster.leader_of("__transaction_state", transaction_log_partition(&tid, TXN_LOG_PARTITIONS)).unwrap();
    assert!(NODES.contains(&coordinator), "{tid} has a coordinator: {coordinator}");
    cluster.kill(coordinator).unwrap();
    eprintln!("transaction coordinator {coordinator} SIGKILLed at {:.0} s; out {}", t0.elapsed().as_secs_f64(), out(&mut w));
    produce_frames(&kafka, &t.frames, 150, 450).await;
    std::thread::sleep(Duration::from_secs(8));
    cluster.start(coordinator).unwrap();
    eprintln!("node {coordinator} back at {:.0} s; out {}", t0.elapsed().as_secs_f64(), out(&mut w));

    let expected: BTreeSet<(String, u64)> = (0..600u64).map(|i| (format!("c{}", i % 4), i / 4)).collect();
    let mut results = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    // A stall (no new output for 60 s) is caught in the act: the worker's stacks are printed.
    let (mut last_out, mut moved, mut sampled) = (-1.0, Instant::now(), false);
    while Instant::now() < deadline {
        let now_out = out(&mut w);
        if now_out != last_out {
            (last_out, moved) = (now_out, Instant::now());
        } else if !sampled && moved.elapsed() > Duration::from_secs(60) {
            sampled = true;
            // Whether the consumer still fetches (lag, partitions, in flight) tells a stuck
            // fetch from a stuck commit; the stacks say where the poll thread is.
            eprintln!("no output for 60 s (out {now_out}); /healthz {}", w.healthz());
            eprintln!("the worker's stacks:\n{}", w.stacks().unwrap_or_else(|| "(eu-stack not installed)".into()));
        }
        results = consume_all(&kafka, &t.results, Duration::from_secs(3)).await.unwrap();
        if result_ids(&results).into_iter().collect::<BTreeSet<_>>() == expected {
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    out(&mut w);
    let aborted = w.metric("transactions_aborted_total", &[]);
    let committed = w.metric("transactions_committed_total", &[]);
    w.stop();
    let ids = result_ids(&results);
    let unique: BTreeSet<_> = ids.iter().cloned().collect();
    eprintln!("{} committed results for 600 frames; transactions (last run): {committed} committed, {aborted} aborted; worker restarts {restarts}", ids.len());
    assert_eq!(unique.len(), expected.len(), "every frame has a result (missing {:?})", expected.difference(&unique).take(10).collect::<Vec<_>>());
    if ids.len() != unique.len() {
        let mut seen: BTreeMap<_, Vec<_>> = BTreeMap::new();
        for (m, id) in results.iter().zip(&ids) {
            seen.entry(id.clone()).or_default().push((m.partition(), m.offset()));
        }
        let dups: Vec<_> = seen.iter().filter(|(_, v)| v.len() > 1).take(10).collect();
        panic!("read_committed shows duplicates: {dups:?}");
    }
    assert_eq!(ids.len(), 600, "read_committed: exactly one result per frame");
}
