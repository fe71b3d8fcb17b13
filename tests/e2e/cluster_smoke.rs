//! A private three-node cluster (`scripts/kafka cluster`, testkit `Cluster`): an idempotent
//! acks=all producer neither loses nor duplicates a record when the partition leader is
//! SIGKILLed mid-stream and comes back; and with two of the three nodes stopped, acks=all is
//! refused (`min.insync.replicas=2`) instead of being acknowledged by the last node alone.
//!
//! One test per binary on purpose: a cluster is three JVMs (see `framelink_testkit::cluster`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use framelink_testkit::cluster::NODES;
use framelink_testkit::*;
use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

/// Keeps librdkafka's log lines (with `debug=msg`: every produce error and retry).
#[derive(Default, Clone)]
struct Recorder(Arc<Mutex<Vec<String>>>);

impl ClientContext for Recorder {
    fn log(&self, _level: RDKafkaLogLevel, fac: &str, line: &str) {
        self.0.lock().unwrap().push(format!("{fac}: {line}"));
    }
}

impl Recorder {
    fn tail(&self, n: usize) -> Vec<String> {
        let all = self.0.lock().unwrap();
        all[all.len().saturating_sub(n)..].to_vec()
    }

    fn matching(&self, what: &str) -> Vec<String> {
        self.0.lock().unwrap().iter().filter(|l| l.to_lowercase().contains(&what.to_lowercase())).cloned().collect()
    }
}

fn producer(cluster: &Cluster, settings: &[(&str, &str)]) -> FutureProducer {
    let mut c = cluster.plaintext().validate("kafka").unwrap().client_config("cluster-smoke");
    c.set("acks", "all");
    for (k, v) in settings {
        c.set(*k, *v);
    }
    c.create().unwrap()
}

fn send<C: ClientContext + 'static>(p: &FutureProducer<C>, topic: &str, seq: u64) -> DeliveryFuture {
    let meta = test_meta("dev", "cam0", seq);
    let (key, payload) = (meta.key(), seq.to_be_bytes());
    let record = FutureRecord::to(topic).key(&key).payload(&payload[..]).headers(meta.to_kafka_headers());
    p.send_result(record).map_err(|(e, _)| e).expect("queued")
}

/// Every record of partition 0, from the first offset to the high watermark (assigned, not
/// subscribed: no group membership, no committed offsets).
fn read_partition(cluster: &Cluster, topic: &str) -> Vec<(i64, u64)> {
    let c: BaseConsumer = cluster
        .plaintext()
        .validate("kafka")
        .unwrap()
        .client_config("cluster-smoke")
        .set("group.id", rand_topic("cluster-reader")) // librdkafka's assign() wants one
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let (low, high) = c.fetch_watermarks(topic, 0, Duration::from_secs(10)).unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.last().map_or(low, |(o, _)| o + 1) < high {
        assert!(Instant::now() < deadline, "read {} records of offsets {low}..{high} in 60 s", out.len());
        if let Some(m) = c.poll(Duration::from_millis(200)) {
            let m = m.unwrap();
            out.push((m.offset(), frame_meta(&m.detach()).unwrap().seq));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_keeps_every_record_once_through_a_leader_crash_and_refuses_acks_all_below_min_isr() {
    init_tracing();
    let t0 = Instant::now();
    let cluster = Cluster::private().unwrap();
    eprintln!("cluster up in {:.1?}", t0.elapsed());
    let topic = rand_topic("cluster");
    cluster.create_topic(&topic, 1).await.unwrap();
    assert_eq!(cluster.isr_of(&topic, 0).unwrap(), vec![1, 2, 3]);
    assert_eq!(
        cluster.topic_config(&topic, "min.insync.replicas").await.unwrap().as_deref(),
        Some("2"),
        "the cluster default reaches new topics"
    );

    // 1. 200 records, acks=all + idempotence; the leader is SIGKILLed with records in flight.
    let p = producer(&cluster, &[("enable.idempotence", "true"), ("message.timeout.ms", "90000"), ("linger.ms", "5")]);
    let mut pending: Vec<DeliveryFuture> = (0..100).map(|seq| send(&p, &topic, seq)).collect();
    for d in pending.drain(..) {
        d.await.unwrap().unwrap();
    }
    let leader = cluster.leader_of(&topic, 0).unwrap();
    assert!(NODES.contains(&leader), "leader {leader}");
    let t_kill = Instant::now();
    for seq in 100..200 {
        pending.push(send(&p, &topic, seq));
        if seq == 120 {
            cluster.kill(leader).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut offsets = Vec::new();
    for d in pending.drain(..) {
        let delivery = d.await.unwrap().map_err(|(e, _)| e).expect("acknowledged after the failover");
        offsets.push(delivery.offset);
    }
    eprintln!("records 100..200 acknowledged {:.1?} after the kill of leader {leader}", t_kill.elapsed());
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "acknowledged in order: {offsets:?}");
    let new_leader = cluster.leader_of(&topic, 0).unwrap();
    assert!(new_leader != leader && NODES.contains(&new_leader), "a new leader: {new_leader}");

    let t_start = Instant::now();
    cluster.start(leader).unwrap();
    cluster.wait_for_isr(&topic, 0, &[1, 2, 3], Duration::from_secs(60)).await.unwrap();
    eprintln!("node {leader} restarted and back in sync in {:.1?}", t_start.elapsed());

    let got = read_partition(&cluster, &topic);
    let seqs: Vec<u64> = got.iter().map(|(_, s)| *s).collect();
    assert_eq!(seqs, (0..200).collect::<Vec<_>>(), "every record exactly once, in order");

    // A topic created by a producer's first record gets three replicas too.
    let strict = producer(&cluster, &[("enable.idempotence", "false"), ("retries", "0"), ("message.timeout.ms", "20000")]);
    let auto = rand_topic("cluster-auto");
    send(&strict, &auto, 0).await.unwrap().map_err(|(e, _)| e).expect("auto-created");
    cluster.wait_for_isr(&auto, 0, &[1, 2, 3], Duration::from_secs(30)).await.unwrap();

    // An idempotent producer (as the agent's), with its producer id from the healthy cluster:
    // with the quorum gone later, a new one could not get an id at all.
    let log = Recorder::default();
    let idempotent: FutureProducer<Recorder> = {
        let mut c = cluster.plaintext().validate("kafka").unwrap().client_config("cluster-smoke");
        c.set("acks", "all").set("enable.idempotence", "true").set("message.timeout.ms", "8000").set("debug", "msg");
        c.set_log_level(RDKafkaLogLevel::Debug);
        c.create_with_context(log.clone()).unwrap()
    };
    send(&idempotent, &topic, 200).await.unwrap().map_err(|(e, _)| e).expect("idempotent, 3 of 3");

    // 2. One node stopped: two replicas in sync, acks=all still succeeds.
    let t_stop = Instant::now();
    let [a, b] = [new_leader, NODES.into_iter().find(|&n| n != new_leader).unwrap()];
    let last = NODES.into_iter().find(|&n| n != a && n != b).unwrap();
    cluster.stop(a).unwrap();
    send(&strict, &topic, 201).await.unwrap().map_err(|(e, _)| e).expect("acks=all with 2 of 3 in sync");
    send(&idempotent, &topic, 202).await.unwrap().map_err(|(e, _)| e).expect("idempotent, 2 of 3 in sync");

    // 3. Two nodes stopped: the last one alone must not acknowledge acks=all.
    cluster.stop(b).unwrap();
    eprintln!("nodes {a} and {b} stopped in {:.1?}", t_stop.elapsed());
    assert_eq!(cluster.leader_of(&topic, 0).unwrap(), last, "leadership moved to the last node");
    let err = send(&strict, &topic, 203).await.unwrap().map_err(|(e, _)| e).expect_err("acks=all with 1 of 3 in sync");
    assert!(
        matches!(
            err,
            KafkaError::MessageProduction(RDKafkaErrorCode::NotEnoughReplicas | RDKafkaErrorCode::NotEnoughReplicasAfterAppend)
        ),
        "refused for too few in-sync replicas: {err:?}"
    );
    // The idempotent producer retries that error until its delivery timeout: it fails too,
    // as a timeout, never succeeds.
    let err = send(&idempotent, &topic, 204).await.unwrap().map_err(|(e, _)| e).expect_err("acks=all, idempotent, 1 of 3 in sync");
    let seen = log.matching("Not enough in-sync replicas");
    eprintln!("idempotent producer with 1 of 3 in sync: {err:?}; librdkafka saw: {:?}", seen.first());
    assert!(
        matches!(
            err,
            KafkaError::MessageProduction(
                RDKafkaErrorCode::NotEnoughReplicas | RDKafkaErrorCode::NotEnoughReplicasAfterAppend | RDKafkaErrorCode::MessageTimedOut
            )
        ),
        "{err:?}"
    );
    assert!(!seen.is_empty(), "the broker answered NOT_ENOUGH_REPLICAS to the retries; log tail: {:#?}", log.tail(40));
    eprintln!("whole test {:.1?}", t0.elapsed());
}
