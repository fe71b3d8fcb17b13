//! Inference: the `detect:NAME` op runs an ONNX model on the frame as the pipeline has it at
//! that point, and the frame's detections become one JSON event on the events topic.
//!
//! Why it is shaped this way:
//! - **ONNX Runtime, loaded at run time** ([`runtime`]): the one runtime every model exporter
//!   targets, with CPU, CUDA and TensorRT providers from one API; loading it dynamically keeps
//!   the worker's build free of downloads and lets a host use the build that fits its hardware.
//! - **Families, not arbitrary graphs** ([`yolo`], [`dbnet`], [`classify`]): a detector's
//!   output means nothing without its decoding; the worker knows the common families' pre- and
//!   post-processing, configured per model (`[models.NAME]`).
//! - **A stage per model** ([`stage`]): one thread owns the session and batches frames from all
//!   cameras; preparing inputs and decoding outputs stay on the processing threads, in parallel.
//! - **Source coordinates** ([`geometry`]): boxes are mapped back through the crops, resizes
//!   and rotations before the model, so an event's boxes are in the camera frame's pixels.
//!
//! A model that fails on a frame dead-letters the frame (`model_failed`) with the reason.

pub mod classify;
pub mod config;
pub mod dbnet;
pub mod draw;
pub mod geometry;
pub mod model;
pub mod runtime;
pub mod stage;
pub mod tensor;
pub mod yolo;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use framelink_common::pipeline::{ModelName, Pipeline};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family as MetricFamily;
use prometheus_client::metrics::histogram::Histogram;

use framelink_common::metrics::Labels;

pub use config::{InferenceConfig, ModelConfig};
pub use model::{BoxPx, Detection};
pub use stage::{ModelClient, ModelResult};

/// The models a pipeline runs, each behind its stage.
pub struct Inference {
    pub models: HashMap<ModelName, ModelClient>,
    pub library: runtime::Loaded,
}

impl Inference {
    pub fn client(&self, name: &ModelName) -> Option<&ModelClient> {
        self.models.get(name)
    }

    /// `/healthz`'s `inference` object.
    pub fn health(&self) -> serde_json::Value {
        let models: serde_json::Map<String, serde_json::Value> = self
            .models
            .values()
            .map(|c| {
                let s = &c.spec;
                (s.name.clone(), serde_json::json!({
                    "family": s.cfg.family.as_str(), "version": s.version, "file": s.cfg.path.display().to_string(),
                    "provider": s.provider.describe(), "input": s.input_size.map(|(w, h)| format!("{w}x{h}")).unwrap_or_else(|| format!("dynamic (longer side <= {})", s.cfg.max_side)),
                    "labels": s.labels.len(), "batch": if s.batchable { "dynamic" } else { "1" },
                }))
            })
            .collect();
        serde_json::json!({"library": self.library.path.display().to_string(), "version": self.library.version, "models": models})
    }
}

/// Per-model metrics.
pub struct InferMetrics {
    pub runs: MetricFamily<Labels, Counter>,
    pub frames: MetricFamily<Labels, Counter>,
    pub failed: MetricFamily<Labels, Counter>,
    pub seconds: MetricFamily<Labels, Histogram, fn() -> Histogram>,
    pub detections: MetricFamily<Labels, Counter>,
    /// 1, labelled with the model, its family, version and the provider running it.
    pub info: MetricFamily<Labels, prometheus_client::metrics::gauge::Gauge>,
}

impl InferMetrics {
    pub fn new() -> Self {
        Self {
            runs: Default::default(),
            frames: Default::default(),
            failed: Default::default(),
            seconds: MetricFamily::new_with_constructor(|| Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 18))),
            detections: Default::default(),
            info: Default::default(),
        }
    }

    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register("inference_runs", "Model runs (batches), by model", self.runs.clone());
        r.register("inference_frames", "Frames a model ran on, by model", self.frames.clone());
        r.register("inference_failed", "Frames whose model run failed (dead-lettered as model_failed), by model", self.failed.clone());
        r.register("inference_seconds", "Wall time of one model run (a batch), by model", self.seconds.clone());
        r.register("detections", "Detections reported, by model and label", self.detections.clone());
        r.register("inference_info", "The models loaded: family, version, provider asked for and running", self.info.clone());
    }
}

struct Observer {
    model: String,
    m: Arc<crate::metrics::Metrics>,
}

impl stage::StageObserver for Observer {
    fn ran(&self, frames: usize, took: Duration) {
        let l = vec![("model", self.model.clone())];
        self.m.infer.runs.get_or_create(&l).inc();
        self.m.infer.frames.get_or_create(&l).inc_by(frames as u64);
        self.m.infer.seconds.get_or_create(&l).observe(took.as_secs_f64());
    }
    fn failed(&self, frames: usize, why: &str) {
        tracing::warn!(model = self.model, frames, why, "Model failed on a frame; it is dead-lettered (model_failed).");
        self.m.infer.failed.get_or_create(&vec![("model", self.model.clone())]).inc_by(frames as u64);
    }
}

/// Loads the runtime and opens the models `pipeline` runs; `None` when it runs none (the
/// runtime is then not loaded at all).
pub fn open(pipeline: &Pipeline, icfg: &InferenceConfig, models: &BTreeMap<String, ModelConfig>, metrics: &Arc<crate::metrics::Metrics>) -> anyhow::Result<Option<Arc<Inference>>> {
    let used = pipeline.models();
    if used.is_empty() {
        return Ok(None);
    }
    let library = runtime::load(icfg)?;
    tracing::info!(library = %library.path.display(), version = library.version, "ONNX Runtime loaded.");
    let mut clients = HashMap::new();
    for name in used {
        let cfg = models.get(name.as_str()).ok_or_else(|| anyhow::anyhow!("config key `worker.pipeline`: detect:{name} needs a [models.{name}] table"))?;
        let model = model::Model::open(&library, icfg, name.as_str(), cfg)?;
        let s = model.spec.clone();
        match &s.provider.fallback {
            None => tracing::info!(model = s.name, family = s.cfg.family.as_str(), version = s.version, provider = s.provider.provider.as_str(), input = ?s.input_size, labels = s.labels.len(), "Model loaded."),
            Some(why) => tracing::warn!(model = s.name, requested = s.provider.requested.as_str(), why, "Model runs on the CPU: the requested execution provider could not start."),
        }
        metrics
            .infer
            .info
            .get_or_create(&vec![
                ("model", s.name.clone()),
                ("family", s.cfg.family.as_str().to_owned()),
                ("version", s.version.clone()),
                ("provider", s.provider.provider.as_str().to_owned()),
                ("requested", s.provider.requested.as_str().to_owned()),
            ])
            .set(1);
        let observer = Observer { model: s.name.clone(), m: metrics.clone() };
        let client = stage::spawn(model, icfg.batch, Duration::from_millis(icfg.batch_wait_ms), observer)?;
        clients.insert(name, client);
    }
    Ok(Some(Arc::new(Inference { models: clients, library })))
}

/// `check-config`: loads the runtime and opens every model the pipeline runs; one line each.
pub fn check(pipeline: &Pipeline, icfg: &InferenceConfig, models: &BTreeMap<String, ModelConfig>) -> anyhow::Result<Vec<String>> {
    let used = pipeline.models();
    if used.is_empty() {
        return Ok(vec![]);
    }
    let library = runtime::load(icfg)?;
    let mut lines = vec![format!("inference: ONNX Runtime {} from {}", library.version, library.path.display())];
    for name in used {
        let cfg = models.get(name.as_str()).ok_or_else(|| anyhow::anyhow!("config key `worker.pipeline`: detect:{name} needs a [models.{name}] table"))?;
        let m = model::Model::open(&library, icfg, name.as_str(), cfg)?;
        let s = &m.spec;
        lines.push(format!(
            "model {}: {} {} ({}), input {}, {} labels, provider {}",
            s.name,
            s.cfg.family.as_str(),
            model::file_name(&s.cfg.path),
            s.version,
            s.input_size.map(|(w, h)| format!("{w}x{h}")).unwrap_or_else(|| "dynamic".into()),
            s.labels.len(),
            s.provider.describe()
        ));
    }
    Ok(lines)
}
