//! Consuming: the consumer's client settings, its rdkafka context (statistics → lag and
//! brokers up; rebalance → finish, commit and forget revoked partitions), and turning a
//! fetched message into a [`Job`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crossbeam_channel::Sender;
use framelink_common::link::LinkContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::statistics::Statistics;

use crate::metrics::Metrics;
use crate::offsets::PartitionControl;
use crate::publish::Job;
use crate::publish::refusals::{Poisoned, Stalls};
use crate::topic_partition::TopicPartition;
use crate::tracker::Tracker;
use crate::txn::Txn;

/// The worker's consumer.
pub type WorkerConsumer = BaseConsumer<ConsumeContext>;

pub struct ConsumeContext {
    link: LinkContext,
    tracker: Arc<Tracker>,
    metrics: Arc<Metrics>,
    /// Exactly-once mode: the transactions (set once the producer is ready).
    pub txn: OnceLock<Arc<Txn>>,
    /// A fatal transaction error seen in a rebalance callback; the poll loop stops on it.
    pub fatal: Mutex<Option<String>>,
    /// Asks the topic-limits refresher to read the output topics' limits again.
    refresh_limits: Sender<()>,
    stalls: Arc<Stalls>,
    /// Tells the motion detectors which partitions this worker no longer owns.
    pub revocations: Arc<crate::motion::Revocations>,
    poisoned: Arc<Poisoned>,
    /// This consumer is being replaced: its rebalance callbacks (fired as it closes) must not
    /// touch the state its successor shares.
    detached: AtomicBool,
}

impl ConsumeContext {
    pub fn new(link: LinkContext, tracker: Arc<Tracker>, metrics: Arc<Metrics>, stalls: Arc<Stalls>, poisoned: Arc<Poisoned>, refresh_limits: Sender<()>, revocations: Arc<crate::motion::Revocations>) -> Self {
        Self { link, tracker, metrics, txn: OnceLock::new(), fatal: Mutex::new(None), refresh_limits, stalls, revocations, poisoned, detached: AtomicBool::new(false) }
    }

    /// Lets go of every partition this consumer owns without committing (it was fenced and is
    /// being replaced): what is known about them is forgotten, and from now on its callbacks
    /// do nothing. Returns the partitions.
    pub fn detach(&self) -> Vec<TopicPartition> {
        self.detached.store(true, Ordering::SeqCst);
        let tps: Vec<TopicPartition> = self.metrics.health.lock().unwrap().assigned.iter().cloned().collect();
        self.let_go(&tps);
        tps
    }

    /// Forgets revoked (or abandoned) partitions everywhere the worker keeps state about them.
    fn let_go(&self, tps: &[TopicPartition]) {
        self.tracker.forget(tps);
        self.stalls.forget(tps);
        self.revocations.revoked(tps);
        self.poisoned.forget(tps);
        self.metrics.stalled_partitions.set(self.stalls.count() as i64);
        if let Some(txn) = self.txn.get() {
            txn.order.forget(tps);
        }
        let mut h = self.metrics.health.lock().unwrap();
        for tp in tps {
            h.assigned.remove(tp);
            self.metrics.lag.remove(&lag_labels(&tp.topic, tp.partition));
        }
    }
}

framelink_common::impl_link_client_context!(ConsumeContext, link, {
    /// librdkafka's statistics (every 5 s, served by the poll call): consumer lag per owned
    /// partition from the high watermarks the fetches already carry, and brokers up. No extra
    /// requests, nothing blocking the poll loop.
    fn stats(&self, stats: Statistics) {
        if self.detached.load(Ordering::SeqCst) {
            return;
        }
        let mut h = self.metrics.health.lock().unwrap();
        h.brokers_up = Some(stats.brokers.values().filter(|b| b.nodeid >= 0 && b.state == "UP").count());
        let mut total = 0;
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if !h.assigned.contains(&TopicPartition::new(topic.clone(), *partition)) || p.consumer_lag < 0 {
                    continue;
                }
                total += p.consumer_lag;
                self.metrics.lag.get_or_create(&lag_labels(topic, *partition)).set(p.consumer_lag);
            }
        }
        h.lag_total = total;
    }
});

fn lag_labels(topic: &str, partition: i32) -> Vec<(&'static str, String)> {
    vec![("topic", topic.to_owned()), ("partition", partition.to_string())]
}

impl ConsumerContext for ConsumeContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if self.detached.load(Ordering::SeqCst) {
            return;
        }
        if let Rebalance::Revoke(tpl) = rebalance {
            let tps: Vec<TopicPartition> = tpl.elements().iter().map(|e| TopicPartition::new(e.topic(), e.partition())).collect();
            tracing::info!(partitions = ?tps, "Partitions revoked: finishing their frames in flight.");
            if !self.tracker.wait_idle(Some(&tps), Duration::from_secs(30)) {
                tracing::warn!("Frames still in flight after 30 s; their offsets are not committed (they will be processed again).");
            }
            match self.txn.get() {
                None => {
                    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                        tracing::debug!(error = %e, "Commit on revoke.");
                    }
                }
                Some(txn) => match txn.commit(consumer) {
                    Ok(committed) => {
                        if committed {
                            self.metrics.txn_commits.inc();
                        }
                    }
                    Err(e) if e.is_fatal() => *self.fatal.lock().unwrap() = Some(e.to_string()),
                    Err(e) => {
                        self.metrics.txn_not_committed(&e);
                        tracing::warn!(error = %e, "Transaction on revoke not committed; those frames are processed again.");
                    }
                },
            }
            self.let_go(&tps);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if self.detached.load(Ordering::SeqCst) {
            return;
        }
        if let Rebalance::Assign(tpl) = rebalance {
            let tps: Vec<String> = tpl.elements().iter().map(|e| format!("{}[{}]", e.topic(), e.partition())).collect();
            tracing::info!(partitions = ?tps, "Partitions assigned.");
            let _ = self.refresh_limits.try_send(());
            let mut h = self.metrics.health.lock().unwrap();
            h.assigned.extend(tpl.elements().iter().map(|e| TopicPartition::new(e.topic(), e.partition())));
        }
    }
}

pub fn job_from(m: &BorrowedMessage<'_>, epoch: u64) -> Job {
    Job {
        tp: TopicPartition::new(m.topic(), m.partition()),
        offset: m.offset(),
        epoch,
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        headers: m.headers().map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec))).collect()).unwrap_or_default(),
        timestamp_ms: m.timestamp().to_millis(),
    }
}


impl PartitionControl for WorkerConsumer {
    fn store(&self, tp: &TopicPartition, next: i64) {
        // librdkafka's rd_kafka_offset_store takes the last *processed* offset and commits it
        // + 1; `next` is the next offset to consume.
        if let Err(e) = self.store_offset(&tp.topic, tp.partition, next - 1) {
            tracing::debug!(error = %e, "Offset not stored (partition no longer assigned).");
        }
    }

    fn pause(&self, tp: &TopicPartition, pause: bool) {
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition(&tp.topic, tp.partition);
        let r = if pause { Consumer::pause(self, &tpl) } else { self.resume(&tpl) };
        if let Err(e) = r {
            tracing::debug!(topic = tp.topic, partition = tp.partition, error = %e, "Pause/resume of a partition failed (no longer assigned).");
        }
    }
}

/// `group.instance.id` (static membership) from the group and the worker's stable id.
fn static_instance_id(group: &str, id: &str) -> String {
    format!("{group}-{id}")
}

/// The consumer's client settings: cooperative-sticky assignment, offsets stored only once a
/// record's outputs are acknowledged (auto-committed in at-least-once mode, committed by the
/// transaction in exactly-once mode), read_committed, statistics every 5 s for lag, and static
/// membership when the worker has a stable id.
pub fn consumer_config(v: &crate::config::Validated, id: &str) -> ClientConfig {
    let cfg = &v.config;
    let exactly_once = cfg.worker.delivery == crate::config::Delivery::ExactlyOnce;
    let mut cc = v.kafka.client_config(&format!("framelink-worker-{id}"));
    cc.set("group.id", &cfg.consumer.group_id)
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("enable.auto.commit", if exactly_once { "false" } else { "true" })
        .set("enable.auto.offset.store", "false")
        .set("auto.commit.interval.ms", "1000")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", &cfg.consumer.auto_offset_reset)
        .set("statistics.interval.ms", "5000")
        .set("fetch.max.bytes", "52428800")
        .set("max.partition.fetch.bytes", "16777216")
        .set("session.timeout.ms", cfg.consumer.session_timeout_ms.to_string());
    // KIP-345: a restarted worker with the same id takes its partitions back at once, without a
    // rebalance; a worker that does not come back is replaced after the session timeout. Only
    // with an id set for this worker (the systemd unit and the k8s manifests set one): two
    // workers sharing a host name would fence each other.
    if cfg.consumer.static_membership && cfg.worker.id.is_some() {
        cc.set("group.instance.id", static_instance_id(&cfg.consumer.group_id, id));
    }
    cc
}
