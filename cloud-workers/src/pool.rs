//! The processing threads: each runs its own [`Processor`] (decoder, ops, motion state) fed by
//! a small bounded queue. A frame goes to the thread chosen by a hash of its key, so one
//! camera's frames are processed and produced in order while cameras run in parallel; a full
//! queue blocks the poll loop, which is the back-pressure on fetching.
//!
//! A panic in an op or the codec does not take a thread (and its cameras) down: the frame is
//! dead-lettered as `panic` and the processor's state is started afresh.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Result;
use crossbeam_channel::Sender;

use framelink_common::wire::DeadLetterReason;

use crate::config::WorkerConfig;
use crate::gpu::stage::GpuClient;
use crate::metrics::Metrics;
use crate::motion::Revocations;
use crate::offsets::Offsets;
use crate::process::{Processor, RecordInfo, Rejected};
use crate::publish::producer::{Producers, send};
use crate::publish::record::{check_sizes, count_dead_letter, dead_letter, outputs_of, refused_dead_letter};
use crate::publish::refusals::{Poisoned, Refusal};
use crate::publish::{Job, OutRecord, OutputKind, Publishing};
use crate::txn::Txn;

/// What every processing thread shares.
#[derive(Clone)]
pub struct Shared {
    pub producers: Arc<Producers>,
    pub offsets: Arc<Offsets>,
    pub metrics: Arc<Metrics>,
    /// Exactly-once: the transactions outputs are produced in.
    pub txn: Option<Arc<Txn>>,
    /// At-least-once: where refused outputs go.
    pub refusals: Option<Sender<Refusal>>,
    pub poisoned: Arc<Poisoned>,
    pub publishing: Publishing,
    pub gpu: Option<GpuClient>,
    /// The models `detect:` ops run; `None` when the pipeline has none.
    pub inference: Option<Arc<crate::infer::Inference>>,
    pub revocations: Arc<Revocations>,
    /// Large-image jobs that are over (their tiles are skipped); `None` without `[tiles]`.
    pub jobs: Option<Arc<crate::jobs_watch::JobsWatch>>,
}

pub struct Pool {
    queues: Vec<Sender<Arc<Job>>>,
    handles: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `worker.threads` processing threads.
    pub fn spawn(cfg: &WorkerConfig, shared: &Shared) -> Result<Pool> {
        let mut pool = Pool { queues: Vec::new(), handles: Vec::new() };
        for i in 0..cfg.worker.thread_count() {
            let (tx, rx) = crossbeam_channel::bounded::<Arc<Job>>(4);
            pool.queues.push(tx);
            let mut processor = Processor::new(cfg.worker.pipeline_ops()?, cfg.worker.max_pixels, cfg.worker.jpeg_quality, cfg.worker.events_only, cfg.motion.clone());
            if !cfg.worker.plane_ops {
                processor = processor.without_plane_ops();
            }
            if !cfg.worker.dct_transforms {
                processor = processor.without_dct_transforms();
            }
            if let Some(g) = &shared.gpu {
                processor = processor.with_gpu(g.clone());
            }
            if let Some(i) = &shared.inference {
                processor = processor.with_inference(i.clone());
            }
            processor = processor.with_revocations(shared.revocations.clone());
            let s = shared.clone();
            pool.handles.push(std::thread::Builder::new().name(format!("process-{i}")).spawn(move || {
                for job in rx {
                    run_one(&job, &mut processor, &s);
                }
            })?);
        }
        Ok(pool)
    }

    /// Hands `job` to its camera's thread; blocks while that thread's queue is full.
    pub fn dispatch(&self, job: Arc<Job>) {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        job.key.hash(&mut h);
        let q = &self.queues[(h.finish() % self.queues.len() as u64) as usize];
        let _ = q.send(job);
    }

    /// Lets the threads finish what they hold, then joins them.
    pub fn stop(self) {
        drop(self.queues);
        for h in self.handles {
            let _ = h.join();
        }
    }
}

/// Processes one record on its thread and hands its outputs to the producer.
fn run_one(job: &Arc<Job>, processor: &mut Processor, s: &Shared) {
    // Exactly-once: an input whose result or event Kafka refused in an aborted transaction is
    // dead-lettered as it comes again (its dead letter, if that was refused, is simply
    // produced again).
    // Tiles come from the tiles topic only: a frame topic's record is a frame whatever its headers.
    let tiles = &s.publishing.tiles;
    let mut records = if tiles.enabled && job.tp.topic == tiles.topic { tile(job, processor.max_pixels, s) } else { process(job, processor, &s.metrics, &s.publishing) };
    if let Some(p) = s.poisoned.get(&job.tp, job.offset)
        && p.kind != OutputKind::DeadLetter
    {
        let count = p.dead_letter_refusals == 0 && !p.dead_letter_delivered; // once, not again after an abort
        records = vec![refused_dead_letter(job, p.kind, &p.topic, &p.error, &s.publishing, &s.metrics, count)];
    }
    let Some(t) = &s.txn else {
        send(job, records, &s.producers.get(), &s.offsets, &s.metrics, s.refusals.as_ref());
        return;
    };
    // Exactly-once: produced in offset order, never across a commit.
    let Some(_guard) = t.produce_guard(job.epoch) else { return }; // aborted meanwhile: rewound
    for (job, records) in t.order.complete(&job.tp, job.offset, (job.clone(), records)) {
        send(&job, records, &s.producers.get(), &s.offsets, &s.metrics, None);
    }
}

/// A large-image tile: its result (or its failure, reported to the console and dead-lettered);
/// nothing for a tile of a job that is over (counted).
fn tile(job: &Job, max_pixels: u64, s: &Shared) -> Vec<OutRecord> {
    let (metrics, p) = (&s.metrics, &s.publishing);
    if let Some(w) = &s.jobs
        && !w.wait_caught_up(std::time::Duration::from_secs(30))
    {
        tracing::warn!("The jobs topic is not read yet after 30 s; processing tiles without knowing which jobs are over.");
    }
    if let Some(why) = crate::tile::job_of(&job.headers).and_then(|j| s.jobs.as_ref()?.over(j)) {
        metrics.tiles_skipped.get_or_create(&vec![("reason", format!("job_{why}"))]).inc();
        tracing::debug!(topic = job.tp.topic, partition = job.tp.partition, offset = job.offset, why, "Tile of a job that is over: skipped.");
        return Vec::new();
    }
    let info = record_info(job);
    let result = std::panic::catch_unwind(|| crate::tile::process_tile(&info, job.payload.as_deref(), max_pixels)).unwrap_or_else(|panic| {
        let what = panic_text(&*panic);
        metrics.panics.inc();
        Err(Rejected { reason: DeadLetterReason::Panic, detail: format!("processing panicked: {what}") })
    });
    let records = result.map(|done| {
        metrics.op_seconds.get_or_create(&vec![("op", "tile".to_owned())]).observe(done.took.as_secs_f64());
        let headers = crate::tile::result_headers(&job.headers, &done, &p.worker);
        vec![OutRecord { topic: p.tiles.results_topic.clone(), kind: OutputKind::Result, key: job.key.clone(), payload: done.core.data, headers }]
    });
    match records.and_then(|r| check_sizes(r, &p.limits)) {
        Ok(records) => {
            metrics.tiles_processed.inc();
            records
        }
        Err(rej) => {
            count_dead_letter(metrics, job, rej.reason, &rej.detail);
            metrics.tiles_failed.inc();
            let failure = OutRecord { topic: p.tiles.results_topic.clone(), kind: OutputKind::Result, key: job.key.clone(), payload: Vec::new(), headers: crate::tile::failure_headers(&job.headers, rej.reason, &rej.detail, &p.worker) };
            vec![dead_letter(job, &p.out.dlq_topic, rej.reason, &rej.detail, &p.worker), failure]
        }
    }
}

/// What the processor knows about a consumed record besides its bytes.
fn record_info(job: &Job) -> RecordInfo<'_> {
    RecordInfo {
        key: job.key.as_deref(),
        headers: job.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect(),
        topic: &job.tp.topic,
        partition: job.tp.partition,
        offset: job.offset,
        timestamp_ms: job.timestamp_ms,
    }
}

/// A panic's message.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned()).unwrap_or_else(|| "unknown panic".into())
}

fn process(job: &Job, processor: &mut Processor, metrics: &Metrics, p: &Publishing) -> Vec<OutRecord> {
    let info = record_info(job);
    // A panic in an op or the codec must not take the thread (and its cameras) down: the frame
    // is dead-lettered and the processor's state (decoder, motion) is started afresh.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| processor.process(&info, job.payload.as_deref())));
    let result = match result {
        Ok(r) => r,
        Err(panic) => {
            let what = panic_text(&*panic);
            metrics.panics.inc();
            processor.reset();
            tracing::error!(topic = job.tp.topic, partition = job.tp.partition, offset = job.offset, panic = what, "Processing panicked; the frame is dead-lettered and the processor restarted.");
            Err(Rejected { reason: DeadLetterReason::Panic, detail: format!("processing panicked: {what}") })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic_partition::TopicPartition;
    use framelink_common::wire::dead_letter_header;
    use rdkafka::message::Headers;

    fn rocket() -> Vec<u8> {
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/images/rocket.jpg")).unwrap()
    }

    fn job(offset: i64, payload: Vec<u8>) -> Job {
        Job { tp: TopicPartition::new("frames", 0), offset, epoch: 0, key: Some(b"dev/cam".to_vec()), payload: Some(payload), headers: vec![], timestamp_ms: Some(1_700_000_000_000) }
    }

    fn publishing() -> Publishing {
        Publishing { out: crate::config::OutputConfig::default(), worker: "w".into(), spec: "grayscale".into(), limits: Arc::new(crate::publish::TopicLimits::new(crate::publish::PRODUCER_MAX_BYTES)), tiles: Default::default() }
    }

    #[test]
    fn a_panic_in_processing_dead_letters_the_frame_and_the_next_frame_is_processed() {
        let metrics = Metrics::new();
        let mut p = Processor::new(crate::ops::Pipeline::parse("grayscale").unwrap(), 50_000_000, 85, false, crate::motion::MotionConfig::default());
        p.panic_next = true;
        let out = process(&job(7, rocket()), &mut p, &metrics, &publishing());
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].kind, out[0].topic.as_str()), (OutputKind::DeadLetter, "frames.dlq"));
        let reason = out[0].headers.iter().find(|h| h.key == dead_letter_header::ERROR).and_then(|h| h.value);
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
        let detail = out[0].headers.iter().find(|h| h.key == dead_letter_header::ERROR_DETAIL).and_then(|h| h.value).unwrap();
        let detail = std::str::from_utf8(detail).unwrap();
        assert!(detail.contains("frames.processed") && detail.contains("10000"), "{detail}");
    }
}
