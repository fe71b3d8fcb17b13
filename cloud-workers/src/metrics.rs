//! The worker's Prometheus metrics (prefix `framelink_worker_`) and what `/healthz` reports.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use framelink_common::link::LinkStatus;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use framelink_common::metrics::Labels;

use crate::topic_partition::TopicPartition;

fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

pub struct Metrics {
    pub registry: Registry,
    pub frames_in: Counter,
    pub frames_out: Counter,
    pub events: Counter,
    pub detection_events: Counter,
    pub outputs: Family<Labels, Counter>,
    pub outputs_refused: Family<Labels, Counter>,
    pub dead_letters_refused: Counter,
    pub stalled_partitions: Gauge,
    pub panics: Counter,
    pub producer_recreated: Counter,
    pub consumer_recreated: Counter,
    pub dead_letters: Family<Labels, Counter>,
    pub op_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    /// Frames of a `rotate`/`crop`/`grayscale` pipeline, by outcome (transformed in the DCT
    /// domain, or why not: crate::lossless::Outcome).
    pub dct_transforms: Family<Labels, Counter>,
    pub latency: Histogram,
    pub lag: Family<Labels, Gauge>,
    pub in_flight: Gauge,
    pub txn_commits: Counter,
    pub txn_aborts: Counter,
    /// 1, labelled with the backend running the ops and the adapter it chose.
    pub backend: Family<Labels, Gauge>,
    pub gpu: std::sync::Arc<crate::gpu::stage::StageStats>,
    pub health: Mutex<Health>,
    /// Wall clock (ns) of the last output Kafka acknowledged; 0 = none yet.
    pub last_output_ns: AtomicU64,
    /// Heartbeats to framelink-console sent and failed.
    pub beats: framelink_common::heartbeat::BeatCounts,
    /// Large-image tiles processed, failed (also dead-lettered) and skipped (job over).
    pub tiles_processed: Counter,
    pub tiles_failed: Counter,
    pub tiles_skipped: Family<Labels, Counter>,
    /// Models (`detect:` ops): runs, frames, failures, time, detections.
    pub infer: crate::infer::InferMetrics,
}

/// State `/healthz` reports besides counters.
#[derive(Default)]
pub struct Health {
    pub group: String,
    pub delivery: &'static str,
    pub pipeline: String,
    /// `topic[partition]` this member owns now.
    pub assigned: BTreeSet<TopicPartition>,
    /// Brokers the consumer is connected to, from librdkafka's statistics; `None` before the
    /// first report.
    pub brokers_up: Option<usize>,
    pub link: Option<Arc<LinkStatus>>,
    pub lag_total: i64,
    pub stopping: bool,
    /// `cpu`, or `gpu: <adapter>`.
    pub backend: String,
    /// Partitions paused because their dead letters are refused.
    pub stalls: Option<Arc<crate::publish::refusals::Stalls>>,
    /// Each output topic's record-size limit as learned from the cluster.
    pub limits: Option<Arc<crate::publish::TopicLimits>>,
    /// The runtime and models, when the pipeline runs any.
    pub inference: Option<serde_json::Value>,
}

impl Metrics {
    /// A transaction that did not commit (aborted, or its producer replaced — which aborts it
    /// too): counted in `transactions_aborted`, a replacement also in `producer_recreated`.
    pub fn txn_not_committed(&self, e: &crate::txn::TxnError) {
        self.txn_aborts.inc();
        if matches!(e, crate::txn::TxnError::Renewed(_)) {
            self.producer_recreated.inc();
        }
    }

    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("framelink_worker");
        let m = Self {
            registry: Registry::default(),
            frames_in: Counter::default(),
            frames_out: Counter::default(),
            events: Counter::default(),
            detection_events: Counter::default(),
            outputs: Family::default(),
            outputs_refused: Family::default(),
            dead_letters_refused: Counter::default(),
            stalled_partitions: Gauge::default(),
            panics: Counter::default(),
            producer_recreated: Counter::default(),
            consumer_recreated: Counter::default(),
            dead_letters: Family::default(),
            op_seconds: Family::new_with_constructor(seconds),
            dct_transforms: Family::default(),
            latency: seconds(),
            lag: Family::default(),
            in_flight: Gauge::default(),
            txn_commits: Counter::default(),
            txn_aborts: Counter::default(),
            backend: Family::default(),
            gpu: Default::default(),
            health: Mutex::default(),
            last_output_ns: AtomicU64::new(0),
            beats: Default::default(),
            tiles_processed: Counter::default(),
            tiles_failed: Counter::default(),
            tiles_skipped: Family::default(),
            infer: crate::infer::InferMetrics::new(),
        };
        registry.register("frames_in", "Records consumed", m.frames_in.clone());
        registry.register("frames_out", "Frames processed", m.frames_out.clone());
        registry.register("events", "Motion events published", m.events.clone());
        registry.register("outputs", "Outputs acknowledged by Kafka, by kind", m.outputs.clone());
        registry.register("outputs_refused", "Outputs Kafka refused for good, by kind (results and events are then dead-lettered)", m.outputs_refused.clone());
        registry.register("dead_letters_refused", "Dead letters Kafka refused (their partition pauses and they are retried)", m.dead_letters_refused.clone());
        registry.register("stalled_partitions", "Partitions paused because their dead letters are refused", m.stalled_partitions.clone());
        registry.register("producer_recreated", "Producers replaced: after a fatal librdkafka error or outputs stuck behind a leaderless partition (at-least-once mode), or a transactional call that hung or kept timing out (exactly-once mode)", m.producer_recreated.clone());
        registry.register("consumer_recreated", "Consumers replaced after Kafka fenced this worker's static group membership (FENCED_INSTANCE_ID)", m.consumer_recreated.clone());
        registry.register("processing_panics", "Frames whose processing panicked (dead-lettered with reason `panic`)", m.panics.clone());
        registry.register("dead_letters", "Records sent to the dead-letter topic, by reason", m.dead_letters.clone());
        registry.register("op_seconds", "Time per operation", m.op_seconds.clone());
        registry.register("dct_transforms", "Frames of a rotate/crop/grayscale pipeline: transformed in the DCT domain (outcome=transformed), or why they were decoded and encoded instead (off_mcu_grid, partial_mcu, unsupported_jpeg, crop_outside, failed)", m.dct_transforms.clone());
        registry.register("latency_seconds", "Capture to processed (end-to-end latency)", m.latency.clone());
        registry.register("consumer_lag", "Records behind the partition's end", m.lag.clone());
        registry.register("in_flight", "Records consumed but not yet committed", m.in_flight.clone());
        registry.register("transactions_committed", "Kafka transactions committed (exactly-once mode)", m.txn_commits.clone());
        registry.register("transactions_aborted", "Kafka transactions aborted and rewound (exactly-once mode)", m.txn_aborts.clone());
        registry.register("backend_info", "The backend running the ops (cpu, gpu) and its adapter", m.backend.clone());
        registry.register("gpu_batches", "Batches the GPU stage ran", m.gpu.batches.clone());
        registry.register("gpu_frames", "Frames the GPU stage ran", m.gpu.frames.clone());
        registry.register("gpu_fallbacks", "Frames processed on the CPU because their GPU batch failed", m.gpu.errors.clone());
        registry.register("gpu_frames_in_place", "Frames of gpu_frames whose YUV planes were decoded straight into the GPU stage's upload buffer", m.gpu.in_place.clone());
        registry.register("tiles_processed", "Large-image tiles processed and published", m.tiles_processed.clone());
        registry.register("tiles_failed", "Large-image tiles that failed (dead-lettered, and reported to the console)", m.tiles_failed.clone());
        registry.register("tiles_skipped", "Large-image tiles not processed because their job is over, by reason (job_cancelled, job_expired, job_done, job_failed)", m.tiles_skipped.clone());
        registry.register("detection_events", "Detection events published (frames with at least one detection left after min_score and only_labels)", m.detection_events.clone());
        m.infer.register(&mut registry);
        m.beats.register(&mut registry);
        Arc::new(Self { registry, ..m })
    }

    /// `/healthz`: `ok` while connected to the cluster, `starting` before the first statistics
    /// report, `degraded` (with the link error) when no broker is up or (with `stalled`) when a
    /// partition is paused because its dead letters are refused, `stopping` on shutdown.
    pub fn health_json(&self) -> serde_json::Value {
        let h = self.health.lock().expect("health lock");
        let link_error = h.link.as_ref().and_then(|l| l.diagnosis()).map(|d| d.to_string());
        let stalled = h.stalls.as_ref().map(|s| s.causes()).unwrap_or_default();
        let status = match (h.stopping, h.brokers_up) {
            (true, _) => "stopping",
            (false, _) if !stalled.is_empty() => "degraded",
            (false, None) => "starting",
            (false, Some(0)) => "degraded",
            (false, Some(_)) => "ok",
        };
        let last = self.last_output_ns.load(Ordering::Relaxed);
        serde_json::json!({
            "status": status,
            "link_error": if status == "ok" { None } else { link_error },
            "group": h.group,
            "delivery": h.delivery,
            "pipeline": h.pipeline,
            "backend": h.backend,
            "partitions": h.assigned.iter().map(|tp| tp.to_string()).collect::<Vec<_>>(),
            "brokers_up": h.brokers_up,
            "frames_in": self.frames_in.get(),
            "frames_out": self.frames_out.get(),
            "in_flight": self.in_flight.get(),
            "lag": h.lag_total,
            "stalled": stalled,
            "output_limits": h.limits.as_ref().map(|l| l.snapshot()),
            "processing_panics": self.panics.get(),
            // The ONNX Runtime library and models (`detect:` ops); null when none run.
            "inference": h.inference.as_ref().map(|i| {
                // Per model: frames run and frames whose run failed (dead-lettered).
                let mut i = i.clone();
                if let Some(models) = i.get_mut("models").and_then(|m| m.as_object_mut()) {
                    for (name, m) in models.iter_mut() {
                        let l = vec![("model", name.clone())];
                        m["frames"] = self.infer.frames.get_or_create(&l).get().into();
                        m["frames_failed"] = self.infer.failed.get_or_create(&l).get().into();
                    }
                }
                i
            }),
            // Large-image tiles; skipped = tiles of jobs that were over (cancelled, expired…).
            "tiles": {
                "processed": self.tiles_processed.get(),
                "failed": self.tiles_failed.get(),
                // Reports of refused tile results that Kafka refused too (their jobs wait).
                "failure_reports_refused": self.outputs_refused.get_or_create(&vec![("kind", "tile_failure_report".to_owned())]).get(),
                "skipped": crate::jobs_watch::SKIP_REASONS.iter().map(|r| (r.to_string(), serde_json::Value::from(self.tiles_skipped.get_or_create(&vec![("reason", r.to_string())]).get()))).collect::<serde_json::Map<_, _>>(),
            },
            // Beats for framelink-console that Kafka acknowledged / did not take in time.
            "heartbeats": {"sent": self.beats.sent.get(), "failed": self.beats.failed.get()},
            // Clients replaced in place (see docs/worker.md): work in flight was processed again.
            "replaced": {"producer": self.producer_recreated.get(), "consumer": self.consumer_recreated.get()},
            "seconds_since_last_output": (last > 0).then(|| now_ns().saturating_sub(last) as f64 / 1e9),
        })
    }

    pub fn render(&self) -> String {
        framelink_common::metrics::render(&self.registry)
    }
}

/// Nanoseconds since the Unix epoch, the clock of `framelink-capture-ns`.
pub use framelink_common::clock::now_ns;
