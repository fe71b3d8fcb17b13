//! The worker loop: a consumer-group member that processes frames on a pool of threads and
//! commits at-least-once.
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

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
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
use rdkafka::{ClientContext, Offset};

use crate::config::Validated;
use crate::metrics::Metrics;
use crate::process::{Processor, RecordInfo};

type Tp = (String, i32);

/// Offsets in flight per partition: offset → outputs still unacknowledged.
#[derive(Default)]
pub struct Tracker {
    parts: Mutex<HashMap<Tp, BTreeMap<i64, u32>>>,
    changed: Condvar,
}

impl Tracker {
    fn start(&self, tp: &Tp, offset: i64) {
        self.parts.lock().unwrap().entry(tp.clone()).or_default().insert(offset, 0);
    }

    fn add_outputs(&self, tp: &Tp, offset: i64, n: u32) {
        if let Some(o) = self.parts.lock().unwrap().get_mut(tp).and_then(|m| m.get_mut(&offset)) {
            *o += n;
        }
    }

    /// One output of `offset` acknowledged (or the record finished with nothing to send);
    /// returns the offset that may now be stored (next to consume), if it moved.
    fn done(&self, tp: &Tp, offset: i64) -> Option<i64> {
        let mut parts = self.parts.lock().unwrap();
        let m = parts.get_mut(tp)?;
        let left = m.get_mut(&offset)?;
        *left = left.saturating_sub(1);
        if *left > 0 {
            return None;
        }
        let was_first = m.keys().next() == Some(&offset);
        m.remove(&offset);
        self.changed.notify_all();
        if !was_first {
            return None;
        }
        Some(m.keys().next().copied().unwrap_or(offset + 1))
    }

    pub fn in_flight(&self) -> usize {
        self.parts.lock().unwrap().values().map(|m| m.len()).sum()
    }

    /// Waits until the given partitions (all when `None`) have nothing in flight.
    fn wait_idle(&self, only: Option<&[Tp]>, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut parts = self.parts.lock().unwrap();
        loop {
            let busy = parts.iter().any(|(tp, m)| !m.is_empty() && only.is_none_or(|o| o.contains(tp)));
            if !busy {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            parts = self.changed.wait_timeout(parts, deadline - now).unwrap().0;
        }
    }

    fn forget(&self, tps: &[Tp]) {
        let mut parts = self.parts.lock().unwrap();
        for tp in tps {
            parts.remove(tp);
        }
    }
}

/// Marks outputs done and stores the partition's offset when it can move.
pub struct Committer {
    tracker: Arc<Tracker>,
    consumer: Mutex<Option<Arc<BaseConsumer<ConsumeContext>>>>,
}

impl Committer {
    fn finish(&self, tp: &Tp, offset: i64) {
        if let Some(next) = self.tracker.done(tp, offset) {
            if let Some(c) = self.consumer.lock().unwrap().as_ref() {
                // librdkafka's rd_kafka_offset_store takes the last *processed* offset and
                // commits it + 1; `next` is the next offset to consume.
                if let Err(e) = c.store_offset(&tp.0, tp.1, next - 1) {
                    tracing::debug!(error = %e, "Offset not stored (partition no longer assigned).");
                }
            }
        }
    }
}

/// What a produced output belongs to.
struct Output {
    tp: Tp,
    offset: i64,
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
            }
            Err((e, _)) => {
                // Delivery timeout is infinite: this is a permanent refusal (e.g. too large).
                tracing::error!(topic = out.tp.0, partition = out.tp.1, offset = out.offset, kind = out.kind, error = %e, "Output refused by Kafka; the input is committed without it.");
                self.metrics.outputs_failed.inc();
            }
        }
        self.committer.finish(&out.tp, out.offset);
    }
}

pub struct ConsumeContext {
    link: LinkContext,
    tracker: Arc<Tracker>,
}

impl ClientContext for ConsumeContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        self.link.log(level, fac, msg)
    }
    fn error(&self, error: KafkaError, reason: &str) {
        self.link.error(error, reason)
    }
}

impl ConsumerContext for ConsumeContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let tps: Vec<Tp> = tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
            tracing::info!(partitions = ?tps, "Partitions revoked: finishing their frames in flight.");
            if !self.tracker.wait_idle(Some(&tps), Duration::from_secs(30)) {
                tracing::warn!("Frames still in flight after 30 s; their offsets are not committed (they will be processed again).");
            }
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::debug!(error = %e, "Commit on revoke.");
            }
            self.tracker.forget(&tps);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let tps: Vec<String> = tpl.elements().iter().map(|e| format!("{}[{}]", e.topic(), e.partition())).collect();
            tracing::info!(partitions = ?tps, "Partitions assigned.");
        }
    }
}

/// A record handed to a processing thread.
struct Job {
    tp: Tp,
    offset: i64,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
    timestamp_ms: Option<i64>,
}

fn job_from(m: &BorrowedMessage<'_>) -> Job {
    Job {
        tp: (m.topic().to_owned(), m.partition()),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        headers: m.headers().map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec))).collect()).unwrap_or_default(),
        timestamp_ms: m.timestamp().to_millis(),
    }
}

fn worker_id() -> String {
    std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| format!("pid-{}", std::process::id()))
}

pub fn run(v: Validated, shutdown: Arc<AtomicBool>, metrics: Arc<Metrics>) -> Result<()> {
    let cfg = &v.config;
    let id = cfg.worker.id.clone().unwrap_or_else(worker_id);
    let tracker = Arc::new(Tracker::default());
    let link = Arc::new(LinkStatus::default());
    let committer = Arc::new(Committer { tracker: tracker.clone(), consumer: Mutex::new(None) });

    let mut pc = v.kafka.client_config(&format!("framelink-worker-{id}"));
    pc.set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "0") // never give up on an output: the input stays uncommitted meanwhile
        .set("linger.ms", "5")
        .set("message.max.bytes", "16777216");
    let producer: Arc<ThreadedProducer<ProduceContext>> = Arc::new(
        pc.create_with_context(ProduceContext { link: LinkContext::new(link.clone()), committer: committer.clone(), metrics: metrics.clone() })
            .context("creating the Kafka producer")?,
    );

    let mut cc = v.kafka.client_config(&format!("framelink-worker-{id}"));
    cc.set("group.id", &cfg.consumer.group_id)
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.commit.interval.ms", "1000")
        .set("auto.offset.reset", &cfg.consumer.auto_offset_reset)
        .set("fetch.max.bytes", "52428800")
        .set("max.partition.fetch.bytes", "16777216");
    let consumer: Arc<BaseConsumer<ConsumeContext>> =
        Arc::new(cc.create_with_context(ConsumeContext { link: LinkContext::new(link.clone()), tracker: tracker.clone() }).context("creating the Kafka consumer")?);
    *committer.consumer.lock().unwrap() = Some(consumer.clone());
    let topics: Vec<&str> = cfg.consumer.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).context("subscribing")?;
    tracing::info!(worker = id, group = cfg.consumer.group_id, topics = ?topics, pipeline = %cfg.worker.pipeline, kafka = v.kafka.describe(), "Worker running.");

    // Processing threads, each fed by a small queue; a camera always goes to the same one.
    let threads = cfg.worker.thread_count();
    let mut queues: Vec<Sender<Job>> = Vec::new();
    let mut handles = Vec::new();
    for i in 0..threads {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(4);
        queues.push(tx);
        let (producer, tracker, committer, metrics) = (producer.clone(), tracker.clone(), committer.clone(), metrics.clone());
        let mut processor = Processor::new(cfg.worker.pipeline_ops()?, cfg.worker.max_pixels, cfg.worker.jpeg_quality, cfg.worker.events_only, cfg.motion.clone());
        let out = cfg.output.clone();
        let (id, spec) = (id.clone(), cfg.worker.pipeline.clone());
        handles.push(std::thread::Builder::new().name(format!("process-{i}")).spawn(move || {
            for job in rx {
                handle(&job, &mut processor, &producer, &tracker, &committer, &metrics, &out, &id, &spec);
            }
        })?);
    }

    let mut last_lag = Instant::now();
    while !shutdown.load(Ordering::Relaxed) {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(e)) => tracing::warn!(error = %e, "Consumer error."),
            Some(Ok(m)) => {
                let job = job_from(&m);
                drop(m);
                metrics.frames_in.inc();
                tracker.start(&job.tp, job.offset);
                let mut h = std::collections::hash_map::DefaultHasher::new();
                job.key.hash(&mut h);
                let q = &queues[(h.finish() % threads as u64) as usize];
                // Blocking here is back-pressure: the fetch loop waits for a free thread.
                let _ = q.send(job);
            }
        }
        if last_lag.elapsed() > Duration::from_secs(5) {
            update_lag(&consumer, &metrics);
            last_lag = Instant::now();
        }
        metrics.in_flight.set(tracker.in_flight() as i64);
    }

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
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::debug!(error = %e, "Final commit.");
    }
    consumer.unsubscribe();
    *committer.consumer.lock().unwrap() = None;
    tracing::info!(frames_in = metrics.frames_in.get(), "Worker stopped.");
    Ok(())
}

fn update_lag(consumer: &BaseConsumer<ConsumeContext>, metrics: &Metrics) {
    let Ok(assigned) = consumer.assignment() else { return };
    let Ok(positions) = consumer.position() else { return };
    for e in assigned.elements() {
        let (topic, partition) = (e.topic(), e.partition());
        let Ok((_, high)) = consumer.fetch_watermarks(topic, partition, Duration::from_millis(500)) else { continue };
        let pos = positions.find_partition(topic, partition).and_then(|p| match p.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        });
        if let Some(pos) = pos {
            metrics.lag.get_or_create(&vec![("topic", topic.to_owned()), ("partition", partition.to_string())]).set((high - pos).max(0));
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn handle(
    job: &Job,
    processor: &mut Processor,
    producer: &ThreadedProducer<ProduceContext>,
    tracker: &Tracker,
    committer: &Committer,
    metrics: &Metrics,
    out: &crate::config::OutputConfig,
    worker: &str,
    spec: &str,
) {
    let info = RecordInfo {
        key: job.key.as_deref(),
        headers: job.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect(),
        topic: &job.tp.0,
        partition: job.tp.1,
        offset: job.offset,
        timestamp_ms: job.timestamp_ms,
    };
    let mut sends: Vec<(String, &'static str, Option<Vec<u8>>, Vec<u8>, OwnedHeaders)> = Vec::new();
    match processor.process(&info, job.payload.as_deref()) {
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
    // One unit for the record itself, released below: an offset is never "done" before all
    // of its outputs are handed to the producer.
    tracker.add_outputs(&job.tp, job.offset, sends.len() as u32 + 1);
    for (topic, kind, key, payload, headers) in sends {
        let mut opaque = Box::new(Output { tp: job.tp.clone(), offset: job.offset, kind });
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
                    committer.finish(&o.tp, o.offset);
                    break;
                }
            }
        }
    }
    committer.finish(&job.tp, job.offset);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_offset_never_passes_a_frame_in_flight() {
        let t = Tracker::default();
        let tp = ("frames".to_string(), 0);
        for o in 10..14 {
            t.start(&tp, o);
            t.add_outputs(&tp, o, 1);
        }
        assert_eq!(t.done(&tp, 12), None, "12 done, but 10 and 11 are in flight");
        assert_eq!(t.done(&tp, 11), None);
        assert_eq!(t.done(&tp, 10), Some(13), "10 done: 11, 12 done too, 13 is next");
        t.add_outputs(&tp, 13, 1); // two outputs (result + event)
        assert_eq!(t.done(&tp, 13), None);
        assert_eq!(t.done(&tp, 13), Some(14));
        assert_eq!(t.in_flight(), 0);
        assert!(t.wait_idle(None, Duration::from_millis(10)));
    }
}
