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

/// What a produced output belongs to.
struct Output {
    tp: Tp,
    offset: i64,
    epoch: u64,
    kind: &'static str,
}

struct ProduceContext {
    link: LinkContext,
    committer: Arc<Committer>,
    metrics: Arc<Metrics>,
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
                self.metrics.outputs.get_or_create(&vec![("kind", out.kind.to_owned())]).inc();
                self.metrics.last_output_ns.store(crate::metrics::now_ns(), Ordering::Relaxed);
            }
            Err(_) if out.epoch != self.committer.tracker.epoch() => {} // purged by an abort
            Err((e, _)) => {
                // Delivery timeout is infinite: this is a permanent refusal (e.g. too large).
                tracing::error!(topic = out.tp.0, partition = out.tp.1, offset = out.offset, kind = out.kind, error = %e, "Output refused by Kafka; the input is committed without it.");
                self.metrics.outputs_failed.inc();
            }
        }
        self.committer.finish(&out.tp, out.offset, out.epoch);
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
}

/// A processed record and its outputs, waiting for its turn (exactly-once).
type Released = (Job, Vec<Send>);
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
            let mut h = self.metrics.health.lock().unwrap();
            h.assigned.extend(tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())));
        }
    }
}

/// A record handed to a processing thread.
struct Job {
    tp: Tp,
    offset: i64,
    /// The tracker's epoch when it was taken (exactly-once: stale after an abort).
    epoch: u64,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
    timestamp_ms: Option<i64>,
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

fn worker_id() -> String {
    std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| format!("pid-{}", std::process::id()))
}

/// Largest record the producer will send (`message.max.bytes`); bigger results are dead-lettered.
const MAX_OUTPUT_BYTES: usize = 16 * 1024 * 1024;

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
    {
        let mut h = metrics.health.lock().unwrap();
        h.group = cfg.consumer.group_id.clone();
        h.delivery = cfg.worker.delivery.as_str();
        h.pipeline = cfg.worker.pipeline.clone();
        h.link = Some(link.clone());
    }
    let gpu = open_backend(cfg, &metrics)?;

    let mut pc = v.kafka.client_config(&format!("framelink-worker-{id}"));
    pc.set("acks", "all").set("enable.idempotence", "true").set("linger.ms", "5").set("message.max.bytes", (MAX_OUTPUT_BYTES + 65536).to_string());
    if exactly_once {
        // One transactional id per worker instance; fencing of a worker that lost its
        // partitions goes by the consumer group's generation (KIP-447).
        pc.set("transactional.id", format!("framelink-worker-{}-{id}", cfg.consumer.group_id)).set("transaction.timeout.ms", "60000").set("message.timeout.ms", "60000");
    } else {
        pc.set("message.timeout.ms", "0"); // never give up on an output: the input stays uncommitted meanwhile
    }
    let producer: Arc<ThreadedProducer<ProduceContext>> = Arc::new(
        pc.create_with_context(ProduceContext { link: LinkContext::new(link.clone()), committer: committer.clone(), metrics: metrics.clone() })
            .context("creating the Kafka producer")?,
    );

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
        .set("max.partition.fetch.bytes", "16777216");
    let context = ConsumeContext { link: LinkContext::new(link.clone()), tracker: tracker.clone(), metrics: metrics.clone(), txn: OnceLock::new(), fatal: Mutex::new(None) };
    let consumer: Arc<BaseConsumer<ConsumeContext>> = Arc::new(cc.create_with_context(context).context("creating the Kafka consumer")?);
    *committer.consumer.lock().unwrap() = Some(consumer.clone());
    let txn: Option<Arc<Txn>> = if exactly_once {
        let t = Arc::new(Transactions::start(producer.clone(), tracker.clone()).context("starting Kafka transactions (worker.delivery = exactly-once)")?);
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
    let mut queues: Vec<Sender<Job>> = Vec::new();
    let mut handles = Vec::new();
    for i in 0..threads {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(4);
        queues.push(tx);
        let (producer, tracker, committer, metrics, txn) = (producer.clone(), tracker.clone(), committer.clone(), metrics.clone(), txn.clone());
        let mut processor = Processor::new(cfg.worker.pipeline_ops()?, cfg.worker.max_pixels, cfg.worker.jpeg_quality, cfg.worker.events_only, cfg.motion.clone());
        if let Some(g) = &gpu {
            processor = processor.with_gpu(g.clone());
        }
        let out = cfg.output.clone();
        let (id, spec) = (id.clone(), cfg.worker.pipeline.clone());
        handles.push(std::thread::Builder::new().name(format!("process-{i}")).spawn(move || {
            for job in rx {
                let sends = process(&job, &mut processor, &metrics, &out, &id, &spec);
                let Some(t) = &txn else {
                    send(&job, sends, &producer, &tracker, &committer, &metrics);
                    continue;
                };
                // Exactly-once: produced in offset order, never across a commit.
                let Some(_guard) = t.produce_guard(job.epoch) else { continue }; // aborted meanwhile: rewound
                let (tp, offset) = (job.tp.clone(), job.offset);
                for (job, sends) in t.order.complete(&tp, offset, (job, sends)) {
                    send(&job, sends, &producer, &tracker, &committer, &metrics);
                }
            }
        })?);
    }

    let interval = Duration::from_millis(cfg.worker.transaction_ms);
    let reset_to_end = cfg.consumer.auto_offset_reset == "latest";
    let mut failure = None;
    while !shutdown.load(Ordering::Relaxed) {
        heartbeat.beat();
        let polled = consumer.poll(Duration::from_millis(100));
        if let Some(e) = consumer.context().fatal.lock().unwrap().take() {
            failure = Some(anyhow::anyhow!("exactly-once: {e}"));
            break;
        }
        if let Some(t) = &txn {
            match t.take_rewind(&consumer, reset_to_end) {
                Ok(false) => {}
                Ok(true) => continue, // `polled` is from before the rewind: it comes again
                Err(e) => {
                    failure = Some(anyhow::anyhow!("exactly-once: rewinding after an abort: {e}"));
                    break;
                }
            }
        }
        match polled {
            None => {}
            Some(Err(e)) => tracing::warn!(error = %e, "Consumer error."),
            Some(Ok(m)) => {
                let job = job_from(&m, tracker.epoch());
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
        let _ = producer.flush(Duration::from_millis(100));
    }
    let _ = producer.flush(Duration::from_secs(5));
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
    *committer.consumer.lock().unwrap() = None;
    tracing::info!(frames_in = metrics.frames_in.get(), "Worker stopped.");
    failure.map_or(Ok(()), Err)
}

/// One output record: topic, kind (metric label), key, payload, headers.
type Send = (String, &'static str, Option<Vec<u8>>, Vec<u8>, OwnedHeaders);

/// Processes one record into the outputs it produces (results, event, or a dead letter).
fn process(job: &Job, processor: &mut Processor, metrics: &Metrics, out: &crate::config::OutputConfig, worker: &str, spec: &str) -> Vec<Send> {
    let info = RecordInfo {
        key: job.key.as_deref(),
        headers: job.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect(),
        topic: &job.tp.0,
        partition: job.tp.1,
        offset: job.offset,
        timestamp_ms: job.timestamp_ms,
    };
    let mut sends: Vec<Send> = Vec::new();
    let result = processor.process(&info, job.payload.as_deref()).and_then(|p| match &p.jpeg {
        Some(j) if j.len() > MAX_OUTPUT_BYTES => Err(crate::process::Rejected { reason: "result_too_large", detail: format!("the result JPEG is {} bytes, over the {MAX_OUTPUT_BYTES}-byte record limit", j.len()) }),
        _ => Ok(p),
    });
    match result {
        Ok(p) => {
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
                ("framelink-pipeline", spec.to_owned()),
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
                sends.push((out.events_topic.clone(), "event", Some(key.clone()), body.to_string().into_bytes(), headers.clone()));
            }
            if let Some(jpeg) = p.jpeg {
                sends.push((out.results_topic.clone(), "result", Some(key), jpeg, headers));
            }
            metrics.frames_out.inc();
        }
        Err(rej) => {
            tracing::warn!(topic = job.tp.0, partition = job.tp.1, offset = job.offset, reason = rej.reason, detail = rej.detail, "Frame dead-lettered.");
            metrics.dead_letters.get_or_create(&vec![("reason", rej.reason.to_owned())]).inc();
            let mut headers = OwnedHeaders::new();
            for (k, v) in &job.headers {
                headers = headers.insert(Header { key: k, value: v.as_deref() });
            }
            let src = format!("{}/{}/{}", job.tp.0, job.tp.1, job.offset);
            for (k, v) in [("framelink-error", rej.reason), ("framelink-error-detail", rej.detail.as_str()), ("framelink-source", src.as_str()), ("framelink-worker", worker)] {
                headers = headers.insert(Header { key: k, value: Some(v.as_bytes()) });
            }
            sends.push((out.dlq_topic.clone(), "dead_letter", job.key.clone(), job.payload.clone().unwrap_or_default(), headers));
        }
    }
    sends
}

/// Hands a record's outputs to the producer; the record is done once Kafka acknowledged them.
fn send(job: &Job, sends: Vec<Send>, producer: &ThreadedProducer<ProduceContext>, tracker: &Tracker, committer: &Committer, metrics: &Metrics) {
    // One unit for the record itself, released below: an offset is never "done" before all
    // of its outputs are handed to the producer.
    tracker.add_outputs(&job.tp, job.offset, sends.len() as u32 + 1);
    for (topic, kind, key, payload, headers) in sends {
        let mut opaque = Box::new(Output { tp: job.tp.clone(), offset: job.offset, epoch: job.epoch, kind });
        loop {
            let mut record = BaseRecord::with_opaque_to(&topic, opaque).payload(&payload).headers(headers.clone());
            if let Some(k) = &key {
                record = record.key(k);
            }
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), r)) => {
                    opaque = r.delivery_opaque;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err((e, r)) => {
                    tracing::error!(topic, error = %e, "Cannot produce output.");
                    metrics.outputs_failed.inc();
                    let o = r.delivery_opaque;
                    committer.finish(&o.tp, o.offset, o.epoch);
                    break;
                }
            }
        }
    }
    committer.finish(&job.tp, job.offset, job.epoch);
}
