//! The worker loop: a consumer-group member that processes frames on a pool of threads and
//! commits at-least-once, or exactly-once with Kafka transactions (see [`crate::txn`]).
//!
//! - **Order**: frames are routed to processing threads by a hash of their key, so one
//!   camera's frames are processed and produced in order; cameras run in parallel.
//! - **At-least-once**: every consumed offset is tracked until all of its outputs (result,
//!   event, or dead letter) are acknowledged by Kafka (acks=all, idempotent producer,
//!   infinite delivery timeout). Only then may the partition's stored offset move past it,
//!   and never past an offset still in flight (`enable.auto.offset.store=false`; librdkafka
//!   auto-commits the stored offsets).
//! - **Rebalance**: on revocation (cooperative-sticky), the worker waits (up to 30 s) until the
//!   revoked partitions' frames in flight are acknowledged and commits before letting go.
//! - **Shutdown** (SIGTERM/SIGINT): stop taking new records, finish and acknowledge what is in
//!   flight, commit synchronously, leave the group.
//! - **Lag and health** come from librdkafka's statistics callback (no extra requests on the
//!   poll thread).

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use crossbeam_channel::Sender;
use framelink_common::link::{LinkContext, LinkStatus};
use framelink_common::wire::header;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, DeliveryResult, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use rdkafka::statistics::Statistics;

use crate::config::{Delivery, Validated};
use crate::metrics::Metrics;
use crate::process::{Processor, RecordInfo};
use crate::publish::{Job, OutRecord, OutputKind, Refusal, Stalls, TopicLimits, dead_letter};
use crate::tracker::{Tp, Tracker};
use crate::txn::{Transactions, TxnError};

/// Marks outputs done and, in at-least-once mode, stores the partition's offset when it can
/// move (librdkafka auto-commits stored offsets). In exactly-once mode the positions wait in
/// the tracker for the next transaction.
pub struct Committer {
    tracker: Arc<Tracker>,
    consumer: Mutex<Option<Arc<BaseConsumer<ConsumeContext>>>>,
    store: bool,
}

impl Committer {
    fn finish(&self, tp: &Tp, offset: i64, epoch: u64) {
        if epoch != self.tracker.epoch() {
            return; // from before an aborted transaction: already forgotten
        }
        let consumer = self.consumer.lock().unwrap().clone();
        self.tracker.done_then(tp, offset, |next| {
            let Some(c) = consumer.as_ref().filter(|_| self.store) else { return };
            // librdkafka's rd_kafka_offset_store takes the last *processed* offset and
            // commits it + 1; `next` is the next offset to consume.
            if let Err(e) = c.store_offset(&tp.0, tp.1, next - 1) {
                tracing::debug!(error = %e, "Offset not stored (partition no longer assigned).");
            }
        });
    }
}

impl Committer {
    /// Stops (`true`) or restarts fetching `tp` (a partition whose dead letters are refused).
    fn pause(&self, tp: &Tp, pause: bool) {
        let Some(c) = self.consumer.lock().unwrap().clone() else { return };
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition(&tp.0, tp.1);
        let r = if pause { c.pause(&tpl) } else { c.resume(&tpl) };
        if let Err(e) = r {
            tracing::debug!(topic = tp.0, partition = tp.1, error = %e, "Pause/resume of a partition failed (no longer assigned).");
        }
    }
}

/// What a produced output belongs to.
struct Output {
    job: Arc<Job>,
    epoch: u64,
    kind: OutputKind,
    /// Tries of a refused dead letter so far (0 for every first send).
    attempt: u32,
}

struct ProduceContext {
    link: LinkContext,
    committer: Arc<Committer>,
    metrics: Arc<Metrics>,
    /// Refused outputs go here (at-least-once) to be dead-lettered or retried; in exactly-once
    /// mode a refusal aborts the transaction instead (`None`).
    refusals: Option<Sender<Refusal>>,
    stalls: Arc<Stalls>,
    /// Exactly-once: refusals inside a transaction, by input.
    poisoned: Arc<crate::publish::Poisoned>,
}

impl ClientContext for ProduceContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        self.link.log(level, fac, msg)
    }
    fn error(&self, error: KafkaError, reason: &str) {
        self.link.error(error, reason)
    }
}

impl ProducerContext for ProduceContext {
    type DeliveryOpaque = Box<Output>;
    fn delivery(&self, result: &DeliveryResult<'_>, out: Box<Output>) {
        match result {
            Ok(_) => {
                self.metrics.outputs.get_or_create(&vec![("kind", out.kind.as_str().to_owned())]).inc();
                self.metrics.last_output_ns.store(crate::metrics::now_ns(), Ordering::Relaxed);
                if out.kind == OutputKind::DeadLetter
                    && self.refusals.is_none()
                    && self.poisoned.accepted(&out.job.tp, out.job.offset).is_some_and(|p| p.dead_letter_refusals > 0)
                    && self.stalls.resolve(&out.job.tp)
                {
                    tracing::info!(topic = out.job.tp.0, partition = out.job.tp.1, offset = out.job.offset, "Dead letter accepted; the partition resumes.");
                    self.metrics.stalled_partitions.set(self.stalls.count() as i64);
                }
                if out.attempt > 0 && self.stalls.resolve(&out.job.tp) {
                    tracing::info!(topic = out.job.tp.0, partition = out.job.tp.1, offset = out.job.offset, attempts = out.attempt + 1, "Dead letter accepted; the partition resumes.");
                    self.metrics.stalled_partitions.set(self.stalls.count() as i64);
                    self.committer.pause(&out.job.tp, false);
                }
            }
            Err(_) if out.epoch != self.committer.tracker.epoch() => {} // purged by an abort
            Err((e, m)) => {
                // Delivery timeout is infinite (at-least-once): a permanent refusal, unless the
                // producer itself failed (fatal error): then the output is sent again as it is.
                let job = &out.job;
                let resend = producer_failure(e);
                if !resend {
                    tracing::error!(topic = m.topic(), input_partition = job.tp.1, input_offset = job.offset, kind = out.kind.as_str(), error = %e, "Output refused by Kafka.");
                    self.metrics.outputs_refused.get_or_create(&vec![("kind", out.kind.as_str().to_owned())]).inc();
                }
                if self.refusals.is_none() && !resend {
                    // Exactly-once: the transaction aborts; the input comes again and is then
                    // dead-lettered (or, its dead letter refused, waits with its partition).
                    self.poisoned.refused(&job.tp, job.offset, out.kind, m.topic(), e.to_string());
                    if out.kind == OutputKind::DeadLetter {
                        self.metrics.dead_letters_refused.inc();
                        let first = self.poisoned.get(&job.tp, job.offset).is_some_and(|p| p.dead_letter_refusals == 1);
                        self.stalls.add(&job.tp, format!("dead-letter topic {} refuses records: {e}", m.topic()), first);
                        self.metrics.stalled_partitions.set(self.stalls.count() as i64);
                    }
                }
                if let Some(tx) = &self.refusals {
                    let record = OutRecord {
                        topic: m.topic().to_owned(),
                        kind: out.kind,
                        key: m.key().map(<[u8]>::to_vec),
                        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                        headers: m.headers().map(|h| h.detach()).unwrap_or_default(),
                    };
                    // The output's acknowledgement unit moves to its dead letter (or retry).
                    let _ = tx.send(Refusal { job: out.job.clone(), record, error: e.to_string(), attempt: out.attempt, resend });
                    return;
                }
            }
        }
        self.committer.finish(&out.job.tp, out.job.offset, out.epoch);
    }
}

pub struct ConsumeContext {
    link: LinkContext,
    tracker: Arc<Tracker>,
    metrics: Arc<Metrics>,
    /// Exactly-once mode: the transactions (set once the producer is ready).
    txn: OnceLock<Arc<Txn>>,
    /// A fatal transaction error seen in a rebalance callback; the poll loop stops on it.
    fatal: Mutex<Option<String>>,
    /// Asks the topic-limits refresher to read the output topics' limits again.
    refresh_limits: OnceLock<Sender<()>>,
    stalls: Arc<Stalls>,
    revocations: Arc<crate::motion::Revocations>,
    poisoned: OnceLock<Arc<crate::publish::Poisoned>>,
}

/// A processed record and its outputs, waiting for its turn (exactly-once).
type Released = (Arc<Job>, Vec<OutRecord>);
type Txn = Transactions<ProduceContext, Released>;

impl ClientContext for ConsumeContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        self.link.log(level, fac, msg)
    }
    fn error(&self, error: KafkaError, reason: &str) {
        self.link.error(error, reason)
    }
    /// librdkafka's statistics (every 5 s, served by the poll call): consumer lag per owned
    /// partition from the high watermarks the fetches already carry, and brokers up. No extra
    /// requests, nothing blocking the poll loop.
    fn stats(&self, stats: Statistics) {
        let mut h = self.metrics.health.lock().unwrap();
        h.brokers_up = Some(stats.brokers.values().filter(|b| b.nodeid >= 0 && b.state == "UP").count());
        let mut total = 0;
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if !h.assigned.contains(&(topic.clone(), *partition)) || p.consumer_lag < 0 {
                    continue;
                }
                total += p.consumer_lag;
                self.metrics.lag.get_or_create(&lag_labels(topic, *partition)).set(p.consumer_lag);
            }
        }
        h.lag_total = total;
    }
}

fn lag_labels(topic: &str, partition: i32) -> Vec<(&'static str, String)> {
    vec![("topic", topic.to_owned()), ("partition", partition.to_string())]
}

impl ConsumerContext for ConsumeContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let tps: Vec<Tp> = tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
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
                    Err(TxnError::Fatal(e)) => *self.fatal.lock().unwrap() = Some(e.to_string()),
                    Err(e) => {
                        self.metrics.txn_aborts.inc();
                        tracing::warn!(error = %e, "Transaction on revoke not committed; those frames are processed again.");
                    }
                },
            }
            self.tracker.forget(&tps);
            self.stalls.forget(&tps);
            self.revocations.revoked(&tps);
            if let Some(p) = self.poisoned.get() {
                p.forget(&tps);
            }
            self.metrics.stalled_partitions.set(self.stalls.count() as i64);
            if let Some(txn) = self.txn.get() {
                txn.order.forget(&tps);
            }
            let mut h = self.metrics.health.lock().unwrap();
            for tp in &tps {
                h.assigned.remove(tp);
                self.metrics.lag.remove(&lag_labels(&tp.0, tp.1));
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let tps: Vec<String> = tpl.elements().iter().map(|e| format!("{}[{}]", e.topic(), e.partition())).collect();
            tracing::info!(partitions = ?tps, "Partitions assigned.");
            if let Some(poke) = self.refresh_limits.get() {
                let _ = poke.try_send(());
            }
            let mut h = self.metrics.health.lock().unwrap();
            h.assigned.extend(tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())));
        }
    }
}

fn job_from(m: &BorrowedMessage<'_>, epoch: u64) -> Job {
    Job {
        tp: (m.topic().to_owned(), m.partition()),
        offset: m.offset(),
        epoch,
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        headers: m.headers().map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec))).collect()).unwrap_or_default(),
        timestamp_ms: m.timestamp().to_millis(),
    }
}

/// `group.instance.id` (static membership) from the group and the worker's stable id.
fn static_instance_id(group: &str, id: &str) -> String {
    format!("{group}-{id}")
}

fn worker_id() -> String {
    std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| format!("pid-{}", std::process::id()))
}

/// Opens the backend `[gpu]` asks for: the GPU stage's client, or `None` for the CPU. Logs
/// and exports (metric label, /healthz) which adapter runs the ops.
fn open_backend(cfg: &crate::config::WorkerConfig, metrics: &Metrics) -> Result<Option<crate::gpu::executor::GpuClient>> {
    use crate::gpu::{BackendChoice, Gpu, adapters, executor};
    let g = &cfg.gpu;
    let gpu = Gpu::open(g.backend, g.adapter.as_deref()).with_context(|| format!("config key `gpu.backend` = {:?}", g.backend.as_str()))?;
    let (label, adapter, device_type) = match &gpu {
        Some(gpu) => ("gpu", gpu.desc.name.clone(), gpu.desc.device_type.clone()),
        None => ("cpu", String::new(), String::new()),
    };
    metrics.backend.get_or_create(&vec![("backend", label.to_owned()), ("adapter", adapter), ("device_type", device_type)]).set(1);
    let Some(gpu) = gpu else {
        let seen: Vec<String> = if g.backend == BackendChoice::Auto { adapters().iter().map(|a| a.to_string()).collect() } else { vec![] };
        tracing::info!(requested = g.backend.as_str(), adapters_seen = ?seen, "Ops run on the CPU backend.");
        metrics.health.lock().unwrap().backend = "cpu".into();
        return Ok(None);
    };
    tracing::info!(adapter = %gpu.desc, batch = g.batch, batch_wait_ms = g.batch_wait_ms, "Ops run on the GPU backend.");
    metrics.health.lock().unwrap().backend = format!("gpu: {}", gpu.desc);
    if cfg.worker.thread_count() < g.batch {
        tracing::warn!(threads = cfg.worker.thread_count(), batch = g.batch, "Fewer processing threads than gpu.batch: batches cannot fill (each thread has one frame on the GPU at a time).");
    }
    let client = executor::spawn(Arc::new(gpu), cfg.worker.pipeline_ops()?, cfg.motion.enabled, g.batch, Duration::from_millis(g.batch_wait_ms), metrics.gpu.clone())?;
    Ok(Some(client))
}

pub fn run(v: Validated, shutdown: Arc<AtomicBool>, metrics: Arc<Metrics>) -> Result<()> {
    let cfg = &v.config;
    let id = cfg.worker.id.clone().unwrap_or_else(worker_id);
    let exactly_once = cfg.worker.delivery == Delivery::ExactlyOnce;
    let tracker = Arc::new(Tracker::default());
    let link = Arc::new(LinkStatus::default());
    let committer = Arc::new(Committer { tracker: tracker.clone(), consumer: Mutex::new(None), store: !exactly_once });
    let stalls = Arc::new(Stalls::default());
    let limits = Arc::new(TopicLimits::new(crate::publish::PRODUCER_MAX_BYTES));
    let publishing = Publishing { out: cfg.output.clone(), worker: id.clone(), spec: cfg.worker.pipeline.clone(), limits: limits.clone() };
    {
        let mut h = metrics.health.lock().unwrap();
        h.stalls = Some(stalls.clone());
        h.limits = Some(limits.clone());
        h.group = cfg.consumer.group_id.clone();
        h.delivery = cfg.worker.delivery.as_str();
        h.pipeline = cfg.worker.pipeline.clone();
        h.link = Some(link.clone());
    }
    let gpu = open_backend(cfg, &metrics)?;

    let mut pc = v.kafka.client_config(&format!("framelink-worker-{id}"));
    pc.set("acks", "all").set("enable.idempotence", "true").set("linger.ms", "5").set("message.max.bytes", (crate::publish::PRODUCER_MAX_BYTES + 65536).to_string());
    if exactly_once {
        // One transactional id per worker instance; fencing of a worker that lost its
        // partitions goes by the consumer group's generation (KIP-447).
        pc.set("transactional.id", format!("framelink-worker-{}-{id}", cfg.consumer.group_id)).set("transaction.timeout.ms", "60000").set("message.timeout.ms", "60000");
    } else {
        pc.set("message.timeout.ms", "0"); // never give up on an output: the input stays uncommitted meanwhile
    }
    // At-least-once: refused outputs are dead-lettered (and refused dead letters retried) by
    // the refusals thread. Exactly-once: a refusal aborts the transaction.
    let (refusals_tx, refusals_rx) = crossbeam_channel::unbounded::<Refusal>();
    let refusals = (!exactly_once).then_some(refusals_tx);
    let poisoned = Arc::new(crate::publish::Poisoned::default());
    let make_producer = {
        let (link, committer, metrics, refusals, stalls, poisoned) = (link.clone(), committer.clone(), metrics.clone(), refusals.clone(), stalls.clone(), poisoned.clone());
        move || -> Result<Arc<ThreadedProducer<ProduceContext>>> {
            let context = ProduceContext { link: LinkContext::new(link.clone()), committer: committer.clone(), metrics: metrics.clone(), refusals: refusals.clone(), stalls: stalls.clone(), poisoned: poisoned.clone() };
            Ok(Arc::new(pc.create_with_context(context).context("creating the Kafka producer")?))
        }
    };
    let producers = Arc::new(Producers { current: std::sync::RwLock::new(make_producer()?) });
    if refusals.is_some() {
        let handler = RefusalHandler { producers: producers.clone(), committer: committer.clone(), metrics: metrics.clone(), stalls: stalls.clone(), publishing: publishing.clone() };
        spawn_refusals(refusals_rx, handler)?;
    }
    // Tests only: a fatal producer error injected after this many acknowledged outputs.
    let mut inject_fatal_after = framelink_common::fault::fatal_error_after();
    let mut recreate_backoff = Duration::from_millis(500);
    let mut recreate_at = Instant::now();
    // Each output topic's record-size limit, before the first frame (and kept fresh).
    let output_topics = vec![cfg.output.results_topic.clone(), cfg.output.events_topic.clone(), cfg.output.dlq_topic.clone()];
    let admin_config = v.kafka.client_config(&format!("framelink-worker-{id}-admin"));
    match limits.learn(&admin_config, &output_topics) {
        Ok(()) => tracing::info!(limits = ?limits.snapshot(), "Output topics' record-size limits (max.message.bytes)."),
        Err(e) => tracing::warn!(error = %e, "Cannot read the output topics' max.message.bytes yet; records over a topic's real limit are refused by Kafka and dead-lettered."),
    }
    let limits_stop = Arc::new(AtomicBool::new(false));
    let refresh_limits = crate::publish::spawn_limits_refresher(limits.clone(), admin_config, output_topics, limits_stop.clone());

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
        cc.set("group.instance.id", static_instance_id(&cfg.consumer.group_id, &id));
    }
    let context = ConsumeContext {
        link: LinkContext::new(link.clone()),
        tracker: tracker.clone(),
        metrics: metrics.clone(),
        txn: OnceLock::new(),
        fatal: Mutex::new(None),
        refresh_limits: OnceLock::new(),
        stalls: stalls.clone(),
        revocations: Arc::new(crate::motion::Revocations::default()),
        poisoned: OnceLock::new(),
    };
    let _ = context.poisoned.set(poisoned.clone());
    let _ = context.refresh_limits.set(refresh_limits);
    let consumer: Arc<BaseConsumer<ConsumeContext>> = Arc::new(cc.create_with_context(context).context("creating the Kafka consumer")?);
    *committer.consumer.lock().unwrap() = Some(consumer.clone());
    let txn: Option<Arc<Txn>> = if exactly_once {
        let t = Arc::new(Transactions::start(producers.get(), tracker.clone()).context("starting Kafka transactions (worker.delivery = exactly-once)")?);
        let _ = consumer.context().txn.set(t.clone());
        Some(t)
    } else {
        None
    };
    let topics: Vec<&str> = cfg.consumer.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).context("subscribing")?;
    tracing::info!(worker = id, group = cfg.consumer.group_id, topics = ?topics, pipeline = %cfg.worker.pipeline, delivery = cfg.worker.delivery.as_str(), kafka = v.kafka.describe(), "Worker running.");

    // systemd (Type=notify): ready once subscribed; the watchdog is fed while the poll loop runs.
    let heartbeat = Arc::new(framelink_common::systemd::Heartbeat::default());
    heartbeat.beat();
    framelink_common::systemd::ready();
    framelink_common::systemd::spawn_watchdog(heartbeat.clone(), shutdown.clone(), "consumer poll");

    // Processing threads, each fed by a small queue; a camera always goes to the same one.
    let threads = cfg.worker.thread_count();
    let mut queues: Vec<Sender<Arc<Job>>> = Vec::new();
    let mut handles = Vec::new();
    for i in 0..threads {
        let (tx, rx) = crossbeam_channel::bounded::<Arc<Job>>(4);
        queues.push(tx);
        let (producers, tracker, committer, metrics, txn, refusals, poisoned) = (producers.clone(), tracker.clone(), committer.clone(), metrics.clone(), txn.clone(), refusals.clone(), poisoned.clone());
        let mut processor = Processor::new(cfg.worker.pipeline_ops()?, cfg.worker.max_pixels, cfg.worker.jpeg_quality, cfg.worker.events_only, cfg.motion.clone());
        if let Some(g) = &gpu {
            processor = processor.with_gpu(g.clone());
        }
        processor = processor.with_revocations(consumer.context().revocations.clone());
        let publishing = publishing.clone();
        handles.push(std::thread::Builder::new().name(format!("process-{i}")).spawn(move || {
            for job in rx {
                // Exactly-once: an input whose result or event Kafka refused in an aborted
                // transaction is dead-lettered as it comes again (its dead letter, if that was
                // refused, is simply produced again).
                let mut records = process(&job, &mut processor, &metrics, &publishing);
                if let Some(p) = poisoned.get(&job.tp, job.offset)
                    && p.kind != OutputKind::DeadLetter
                {
                    let count = p.dead_letter_refusals == 0;
                    records = vec![refused_dead_letter(&job, p.kind, &p.topic, &p.error, &publishing, &metrics, count)];
                }
                let Some(t) = &txn else {
                    send(&job, records, &producers.get(), &tracker, &committer, &metrics, refusals.as_ref());
                    continue;
                };
                // Exactly-once: produced in offset order, never across a commit.
                let Some(_guard) = t.produce_guard(job.epoch) else { continue }; // aborted meanwhile: rewound
                let (tp, offset) = (job.tp.clone(), job.offset);
                for (job, records) in t.order.complete(&tp, offset, (job, records)) {
                    send(&job, records, &producers.get(), &tracker, &committer, &metrics, None);
                }
            }
        })?);
    }

    let interval = Duration::from_millis(cfg.worker.transaction_ms);
    let reset_to_end = cfg.consumer.auto_offset_reset == "latest";
    let mut failure = None;
    // Exactly-once: partitions paused after a refused dead letter, until when.
    let mut paused_until: Vec<(Instant, Tp)> = Vec::new();
    while !shutdown.load(Ordering::Relaxed) {
        paused_until.retain(|(until, tp)| {
            let due = *until <= Instant::now();
            if due {
                committer.pause(tp, false);
            }
            !due
        });
        heartbeat.beat();
        let polled = consumer.poll(Duration::from_millis(100));
        if let Some(n) = inject_fatal_after
            && metrics.outputs.get_or_create(&vec![("kind", "result".to_owned())]).get() >= n
        {
            inject_fatal_after = None;
            framelink_common::fault::inject_fatal_error(producers.get().client());
        }
        // A fatal producer error leaves that producer unusable. At-least-once: a new one takes
        // over (what the old one held is sent again on it); exactly-once: the transactional id
        // is dead, so stop and let systemd / Kubernetes start afresh from the committed offsets.
        if let Some((code, reason)) = producers.get().client().fatal_error() {
            if exactly_once {
                failure = Some(anyhow::anyhow!("fatal Kafka producer error {code:?}: {reason}"));
                break;
            }
            if Instant::now() >= recreate_at {
                match make_producer() {
                    Ok(p) => {
                        tracing::error!(error = ?code, reason, "Fatal Kafka producer error: the producer is replaced; its outputs are sent again.");
                        metrics.producer_recreated.inc();
                        recreate_backoff = Duration::from_millis(500);
                        let old = producers.replace(p);
                        // Returns what it still holds (delivery reports with purge errors): sent again.
                        old.purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
                    }
                    Err(e) => {
                        tracing::error!(error = %e, retry_in_ms = recreate_backoff.as_millis() as u64, "Cannot create a new Kafka producer after a fatal error.");
                        recreate_at = Instant::now() + recreate_backoff;
                        recreate_backoff = (recreate_backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
        }
        if let Some(e) = consumer.context().fatal.lock().unwrap().take() {
            failure = Some(anyhow::anyhow!("exactly-once: {e}"));
            break;
        }
        if let Some(t) = &txn {
            match t.take_rewind(&consumer, reset_to_end) {
                Ok(false) => {}
                Ok(true) => {
                    // Partitions whose dead letters Kafka refused wait before the next try.
                    for (tp, refusals) in poisoned.stalled() {
                        let wait = crate::publish::backoff(refusals.saturating_sub(1));
                        tracing::error!(topic = tp.0, partition = tp.1, retry_in_ms = wait.as_millis() as u64, "Dead letter refused in a transaction: the partition waits before the next try.");
                        committer.pause(&tp, true);
                        paused_until.push((Instant::now() + wait, tp));
                    }
                    continue; // `polled` is from before the rewind: it comes again
                }
                Err(e) => {
                    failure = Some(anyhow::anyhow!("exactly-once: rewinding after an abort: {e}"));
                    break;
                }
            }
        }
        match polled {
            None => {}
            Some(Err(e)) => {
                // A fatal consumer error (e.g. another member took this group.instance.id) leaves
                // the consumer unusable: stop, so systemd / Kubernetes start a fresh one.
                if let Some((code, reason)) = consumer.client().fatal_error() {
                    failure = Some(anyhow::anyhow!("fatal Kafka consumer error {code:?}: {reason}"));
                    break;
                }
                tracing::warn!(error = %e, "Consumer error.");
            }
            Some(Ok(m)) => {
                let job = Arc::new(job_from(&m, tracker.epoch()));
                drop(m);
                metrics.frames_in.inc();
                tracker.start(&job.tp, job.offset);
                if let Some(t) = &txn {
                    t.order.dispatched(&job.tp, job.offset);
                }
                let mut h = std::collections::hash_map::DefaultHasher::new();
                job.key.hash(&mut h);
                let q = &queues[(h.finish() % threads as u64) as usize];
                // Blocking here is back-pressure: the fetch loop waits for a free thread.
                let _ = q.send(job);
            }
        }
        if let Some(t) = &txn {
            match t.maybe_commit(&consumer, interval) {
                Ok(true) => {
                    metrics.txn_commits.inc();
                }
                Ok(false) => {}
                Err(TxnError::Fatal(e)) => {
                    failure = Some(anyhow::anyhow!("exactly-once: {e} (another worker with this id, or the group moved on)"));
                    break;
                }
                Err(TxnError::NoGroup) => {}
                Err(e) => {
                    metrics.txn_aborts.inc();
                    tracing::warn!(error = %e, "Transaction aborted; rewinding to the last committed offsets.");
                }
            }
        }
        metrics.in_flight.set(tracker.in_flight() as i64);
    }

    metrics.health.lock().unwrap().stopping = true;
    framelink_common::systemd::stopping();
    tracing::info!(in_flight = tracker.in_flight(), "Stopping: finishing frames in flight.");
    if let Ok(assigned) = consumer.assignment() {
        let _ = consumer.pause(&assigned);
    }
    drop(queues);
    for h in handles {
        let _ = h.join();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while tracker.in_flight() > 0 && Instant::now() < deadline {
        let _ = consumer.poll(Duration::from_millis(100));
        let _ = producers.get().flush(Duration::from_millis(100));
    }
    let _ = producers.get().flush(Duration::from_secs(5));
    match &txn {
        None => {
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::debug!(error = %e, "Final commit.");
            }
        }
        Some(t) if failure.is_none() => match t.commit(&consumer) {
            Ok(committed) => {
                if committed {
                    metrics.txn_commits.inc();
                }
            }
            Err(e) => tracing::warn!(error = %e, "Final transaction not committed; those frames will be processed again."),
        },
        Some(_) => {}
    }
    consumer.unsubscribe();
    limits_stop.store(true, Ordering::Relaxed);
    *committer.consumer.lock().unwrap() = None;
    tracing::info!(frames_in = metrics.frames_in.get(), "Worker stopped.");
    failure.map_or(Ok(()), Err)
}

/// What a processing thread needs besides the frame: where outputs go and who it is.
#[derive(Clone)]
pub struct Publishing {
    pub out: crate::config::OutputConfig,
    pub worker: String,
    pub spec: String,
    pub limits: Arc<TopicLimits>,
}

/// Processes one record into the outputs it produces (results, event, or a dead letter).
fn process(job: &Job, processor: &mut Processor, metrics: &Metrics, p: &Publishing) -> Vec<OutRecord> {
    let info = RecordInfo {
        key: job.key.as_deref(),
        headers: job.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect(),
        topic: &job.tp.0,
        partition: job.tp.1,
        offset: job.offset,
        timestamp_ms: job.timestamp_ms,
    };
    // A panic in an op or the codec must not take the thread (and its cameras) down: the frame
    // is dead-lettered and the processor's state (decoder, motion) is started afresh.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| processor.process(&info, job.payload.as_deref())));
    let result = match result {
        Ok(r) => r,
        Err(panic) => {
            let what = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned()).unwrap_or_else(|| "unknown panic".into());
            metrics.panics.inc();
            processor.reset();
            tracing::error!(topic = job.tp.0, partition = job.tp.1, offset = job.offset, panic = what, "Processing panicked; the frame is dead-lettered and the processor restarted.");
            Err(crate::process::Rejected { reason: "panic", detail: format!("processing panicked: {what}") })
        }
    };
    let outputs = result.map(|processed| outputs_of(job, processed, metrics, p)).and_then(|records| check_sizes(records, &p.limits));
    match outputs {
        Ok(records) => {
            metrics.frames_out.inc();
            records
        }
        Err(rej) => {
            count_dead_letter(metrics, job, rej.reason, &rej.detail);
            vec![dead_letter(job, &p.out.dlq_topic, rej.reason, &rej.detail, &p.worker)]
        }
    }
}

/// Logs and counts a frame going to the dead-letter topic.
fn count_dead_letter(metrics: &Metrics, job: &Job, reason: &str, detail: &str) {
    tracing::warn!(topic = job.tp.0, partition = job.tp.1, offset = job.offset, reason, detail, "Frame dead-lettered.");
    metrics.dead_letters.get_or_create(&vec![("reason", reason.to_owned())]).inc();
}

/// The dead letter (`output_refused`) of an input whose `kind` output topic `topic` refused;
/// counted unless `count` is false (the same input dead-lettered again after a rewind).
fn refused_dead_letter(job: &Job, kind: OutputKind, topic: &str, error: &str, p: &Publishing, metrics: &Metrics, count: bool) -> OutRecord {
    let detail = format!("topic {topic} refused the {}: {error}", kind.as_str());
    if count {
        count_dead_letter(metrics, job, "output_refused", &detail);
    }
    dead_letter(job, &p.out.dlq_topic, "output_refused", &detail, &p.worker)
}

/// A result or event bigger than its topic takes would be refused by Kafka: the frame is
/// dead-lettered instead, naming the topic and its limit.
fn check_sizes(records: Vec<OutRecord>, limits: &TopicLimits) -> Result<Vec<OutRecord>, crate::process::Rejected> {
    for r in &records {
        let (size, limit) = (r.size(), limits.limit(&r.topic));
        if size > limit {
            return Err(crate::process::Rejected {
                reason: "result_too_large",
                detail: format!("the {} record is {size} bytes, over topic {}'s max.message.bytes of {limit}", r.kind.as_str(), r.topic),
            });
        }
    }
    Ok(records)
}

/// The result and event records of a processed frame.
fn outputs_of(job: &Job, p: crate::process::Processed, metrics: &Metrics, publishing: &Publishing) -> Vec<OutRecord> {
    let (out, worker) = (&publishing.out, publishing.worker.as_str());
    let mut records = Vec::new();
    for (op, t) in &p.op_times {
        metrics.op_seconds.get_or_create(&vec![("op", op.split(':').next().unwrap_or(op).to_owned())]).observe(t.as_secs_f64());
    }
    let latency_ms = crate::metrics::now_ns().saturating_sub(p.meta.capture_ns) / 1_000_000;
    metrics.latency.observe(latency_ms as f64 / 1000.0);
    let mut meta = p.meta.clone();
    let (src_w, src_h) = (meta.width, meta.height);
    meta.width = p.width;
    meta.height = p.height;
    let mut headers = OwnedHeaders::new();
    // Source headers first (those the contract does not own), then the contract's, then ours.
    for (k, v) in &job.headers {
        if !header::ALL.contains(&k.as_str()) && !k.starts_with("framelink-processed") {
            headers = headers.insert(Header { key: k, value: v.as_deref() });
        }
    }
    headers = meta.append_to(headers);
    let extra = [
        ("framelink-source-width", src_w.to_string()),
        ("framelink-source-height", src_h.to_string()),
        ("framelink-pipeline", publishing.spec.clone()),
        ("framelink-worker", worker.to_owned()),
        ("framelink-processing-us", p.took.as_micros().to_string()),
        ("framelink-latency-ms", latency_ms.to_string()),
    ];
    for (k, v) in &extra {
        headers = headers.insert(Header { key: k, value: Some(v.as_bytes()) });
    }
    let key = meta.key().into_bytes();
    if let Some(ev) = &p.event {
        metrics.events.inc();
        let body = serde_json::json!({
            "device": meta.device_id, "camera": meta.camera_id, "seq": meta.seq,
            "capture_ns": meta.capture_ns, "changed_fraction": ev.changed_fraction,
            "bbox": {"x": ev.bbox[0], "y": ev.bbox[1], "width": ev.bbox[2], "height": ev.bbox[3]},
            "frame_width": p.width, "frame_height": p.height, "worker": worker,
        });
        records.push(OutRecord { topic: out.events_topic.clone(), kind: OutputKind::Event, key: Some(key.clone()), payload: body.to_string().into_bytes(), headers: headers.clone() });
    }
    if let Some(jpeg) = p.jpeg {
        records.push(OutRecord { topic: out.results_topic.clone(), kind: OutputKind::Result, key: Some(key), payload: jpeg, headers });
    }
    records
}

/// Hands one record to the producer, waiting while its queue is full. A record the producer
/// refuses at once (e.g. over its own size limit, unknown topic) is returned with the error.
fn produce(producer: &ThreadedProducer<ProduceContext>, record: &OutRecord, mut opaque: Box<Output>) -> Result<(), (Box<Output>, KafkaError)> {
    loop {
        let mut r = BaseRecord::with_opaque_to(&record.topic, opaque).payload(&record.payload).headers(record.headers.clone());
        if let Some(k) = &record.key {
            r = r.key(k);
        }
        match producer.send(r) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), r)) => {
                opaque = r.delivery_opaque;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err((e, r)) => return Err((r.delivery_opaque, e)),
        }
    }
}

/// Hands a record's outputs to the producer; the record is done once Kafka acknowledged them.
fn send(job: &Arc<Job>, records: Vec<OutRecord>, producer: &ThreadedProducer<ProduceContext>, tracker: &Tracker, committer: &Committer, metrics: &Metrics, refusals: Option<&Sender<Refusal>>) {
    // One unit for the record itself, released below: an offset is never "done" before all
    // of its outputs are handed to the producer.
    tracker.add_outputs(&job.tp, job.offset, records.len() as u32 + 1);
    for record in records {
        let opaque = Box::new(Output { job: job.clone(), epoch: job.epoch, kind: record.kind, attempt: 0 });
        if let Err((o, e)) = produce(producer, &record, opaque) {
            let resend = producer_failure(&e);
            if !resend {
                tracing::error!(topic = record.topic, kind = record.kind.as_str(), input_offset = job.offset, error = %e, "Output refused by the producer.");
                metrics.outputs_refused.get_or_create(&vec![("kind", record.kind.as_str().to_owned())]).inc();
            }
            match refusals {
                Some(tx) => {
                    let _ = tx.send(Refusal { job: o.job, record, error: e.to_string(), attempt: 0, resend });
                }
                None => committer.finish(&o.job.tp, o.job.offset, o.epoch), // exactly-once: the transaction aborts
            }
        }
    }
    committer.finish(&job.tp, job.offset, job.epoch);
}

/// The at-least-once refusal handler: dead-letters refused results and events, produces refused
/// dead letters again with backoff while their partition is paused (see [`crate::publish`]),
/// and sends again, as they are, outputs that failed because the producer did (a fatal error:
/// the producer is being replaced). At-least-once only, so there are no aborted epochs to skip.
/// Runs until every sender is gone.
struct RefusalHandler {
    producers: Arc<Producers>,
    committer: Arc<Committer>,
    metrics: Arc<Metrics>,
    stalls: Arc<Stalls>,
    publishing: Publishing,
}

/// How soon an output that failed with its producer is tried again on the (new) producer.
const RESEND_AFTER: Duration = Duration::from_millis(500);

impl RefusalHandler {
    /// Produces `record` for `job`; `None` when handed over, else when to look at it again.
    fn try_produce(&self, job: &Arc<Job>, record: OutRecord, attempt: u32) -> Option<(Instant, Refusal)> {
        let opaque = Box::new(Output { job: job.clone(), epoch: job.epoch, kind: record.kind, attempt });
        let (_, e) = produce(&self.producers.get(), &record, opaque).err()?;
        let r = Refusal { job: job.clone(), record, error: e.to_string(), attempt, resend: false };
        if producer_failure(&e) {
            return Some((Instant::now() + RESEND_AFTER, Refusal { resend: true, ..r }));
        }
        self.refused(r)
    }

    /// A record Kafka (or the producer, synchronously) refused for good.
    fn refused(&self, r: Refusal) -> Option<(Instant, Refusal)> {
        if r.record.kind == OutputKind::DeadLetter {
            return Some(stall(r, &self.committer, &self.metrics, &self.stalls));
        }
        let dl = refused_dead_letter(&r.job, r.record.kind, &r.record.topic, &r.error, &self.publishing, &self.metrics, true);
        self.try_produce(&r.job, dl, 0)
    }

    /// A refusal reported by a delivery callback or a failed send.
    fn handle(&self, r: Refusal) -> Option<(Instant, Refusal)> {
        if r.resend { Some((Instant::now(), r)) } else { self.refused(r) }
    }

    /// Its time came: send again as it is, or try a refused dead letter once more.
    fn due(&self, r: Refusal) -> Option<(Instant, Refusal)> {
        let attempt = if r.resend { r.attempt } else { r.attempt + 1 };
        self.try_produce(&r.job, r.record, attempt)
    }
}

fn spawn_refusals(rx: crossbeam_channel::Receiver<Refusal>, handler: RefusalHandler) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("refusals".into()).spawn(move || {
        // Records waiting for their next try, with its time.
        let mut waiting: Vec<(Instant, Refusal)> = Vec::new();
        loop {
            let next_due = waiting.iter().map(|(t, _)| *t).min();
            let timeout = next_due.map_or(Duration::from_millis(500), |t| t.saturating_duration_since(Instant::now()));
            match rx.recv_timeout(timeout) {
                Ok(r) => waiting.extend(handler.handle(r)),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) if waiting.is_empty() => return,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => std::thread::sleep(timeout.min(Duration::from_millis(500))),
            }
            let now = Instant::now();
            let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut waiting).into_iter().partition(|(t, _)| *t <= now);
            waiting = later;
            for (_, r) in due {
                waiting.extend(handler.due(r));
            }
        }
    })
}

/// Errors that are the producer's, not the record's: after a fatal error librdkafka purges its
/// queue and refuses every send; the record is sent again on the producer that replaces it.
fn producer_failure(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(e.rdkafka_error_code(), Some(C::Fatal | C::PurgeQueue | C::PurgeInflight))
}

/// The worker's producer. In at-least-once mode it is replaced after a fatal librdkafka error
/// (e.g. an idempotence sequence error after a leader change), which leaves a producer unusable:
/// what it held is sent again on the new one.
struct Producers {
    current: std::sync::RwLock<Arc<ThreadedProducer<ProduceContext>>>,
}

impl Producers {
    fn get(&self) -> Arc<ThreadedProducer<ProduceContext>> {
        self.current.read().unwrap().clone()
    }

    fn replace(&self, p: Arc<ThreadedProducer<ProduceContext>>) -> Arc<ThreadedProducer<ProduceContext>> {
        std::mem::replace(&mut *self.current.write().unwrap(), p)
    }
}

/// A dead letter was refused: its partition stops (paused, the input stays in flight so nothing
/// is committed past it) and the dead letter waits for its retry.
fn stall(r: Refusal, committer: &Committer, metrics: &Metrics, stalls: &Stalls) -> (Instant, Refusal) {
    metrics.dead_letters_refused.inc();
    let cause = format!("dead-letter topic {} refuses records: {}", r.record.topic, r.error);
    // Counted once per dead letter (its first refusal); a retry refused again only updates the cause.
    if stalls.add(&r.job.tp, cause.clone(), r.attempt == 0) {
        committer.pause(&r.job.tp, true);
    }
    metrics.stalled_partitions.set(stalls.count() as i64);
    let wait = crate::publish::backoff(r.attempt);
    tracing::error!(topic = r.job.tp.0, partition = r.job.tp.1, offset = r.job.offset, attempt = r.attempt + 1, retry_in_ms = wait.as_millis() as u64, cause, "Dead letter refused: the partition is paused until it is accepted.");
    (Instant::now() + wait, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rocket() -> Vec<u8> {
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/images/rocket.jpg")).unwrap()
    }

    fn job(offset: i64, payload: Vec<u8>) -> Job {
        Job { tp: ("frames".into(), 0), offset, epoch: 0, key: Some(b"dev/cam".to_vec()), payload: Some(payload), headers: vec![], timestamp_ms: Some(1_700_000_000_000) }
    }

    fn publishing() -> Publishing {
        Publishing { out: crate::config::OutputConfig::default(), worker: "w".into(), spec: "grayscale".into(), limits: Arc::new(TopicLimits::new(crate::publish::PRODUCER_MAX_BYTES)) }
    }

    #[test]
    fn a_panic_in_processing_dead_letters_the_frame_and_the_next_frame_is_processed() {
        let metrics = Metrics::new();
        let mut p = Processor::new(crate::ops::Pipeline::parse("grayscale").unwrap(), 50_000_000, 85, false, crate::motion::MotionConfig::default());
        p.panic_next = true;
        let out = process(&job(7, rocket()), &mut p, &metrics, &publishing());
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].kind, out[0].topic.as_str()), (OutputKind::DeadLetter, "frames.dlq"));
        let reason = out[0].headers.iter().find(|h| h.key == "framelink-error").and_then(|h| h.value);
        assert_eq!(reason, Some(&b"panic"[..]));
        assert_eq!(out[0].payload, rocket(), "the dead letter carries the frame");
        assert_eq!(metrics.panics.get(), 1);
        let next = process(&job(8, rocket()), &mut p, &metrics, &publishing());
        assert_eq!(next.iter().map(|r| r.kind).collect::<Vec<_>>(), vec![OutputKind::Result], "the thread goes on");
    }

    #[test]
    fn a_result_over_its_topics_limit_is_dead_lettered_naming_topic_and_limit() {
        let metrics = Metrics::new();
        let pb = publishing();
        pb.limits.set("frames.processed", 10_000);
        let mut p = Processor::new(crate::ops::Pipeline::parse("grayscale").unwrap(), 50_000_000, 85, false, crate::motion::MotionConfig::default());
        let out = process(&job(9, rocket()), &mut p, &metrics, &pb);
        assert_eq!(out[0].kind, OutputKind::DeadLetter);
        let detail = out[0].headers.iter().find(|h| h.key == "framelink-error-detail").and_then(|h| h.value).unwrap();
        let detail = std::str::from_utf8(detail).unwrap();
        assert!(detail.contains("frames.processed") && detail.contains("10000"), "{detail}");
    }
}
