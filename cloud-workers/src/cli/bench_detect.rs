//! `framelink-worker bench-detect`: frames/s of a model on this host, measured the way the
//! worker runs it — decode the JPEG, prepare the input, run the model in its stage, decode the
//! outputs into detections — one frame at a time, for each ONNX Runtime thread count and both
//! decodes: `full` (a worker that publishes result images) and `scaled` (an `events_only`
//! worker whose pipeline starts with the model: the JPEG is decoded at the smallest DCT scale
//! the model's input needs). Prints one JSON object per cell (bench/inference.py puts them next
//! to Python's).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use framelink_worker::config::WorkerConfig;
use framelink_worker::decode::Decoder;
use framelink_worker::infer::{model::Model, runtime, stage};

pub struct Options {
    pub config: PathBuf,
    pub model: String,
    pub image: PathBuf,
    pub threads: Vec<usize>,
    pub seconds: f64,
}

struct Quiet;
impl stage::StageObserver for Quiet {
    fn ran(&self, _: usize, _: Duration) {}
    fn failed(&self, _: usize, why: &str) {
        tracing::error!(why, "model run failed");
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(o: &Options) -> Result<Vec<serde_json::Value>> {
    let v = WorkerConfig::load(&o.config)?;
    let cfg = v.config.models.get(&o.model).with_context(|| format!("--model {}: no [models.{}] table in {}", o.model, o.model, o.config.display()))?;
    let jpeg = std::fs::read(&o.image).with_context(|| format!("--image {}", o.image.display()))?;
    let mut rows = Vec::new();
    for &threads in &o.threads {
        let mut icfg = v.config.inference.clone();
        icfg.threads = threads;
        let lib = runtime::load(&icfg)?;
        let model = Model::open(&lib, &icfg, &o.model, cfg)?;
        let provider = model.spec.provider.describe();
        let client = stage::spawn(model, 1, Duration::ZERO, Quiet)?;
        let header = turbojpeg::read_header(&jpeg).context("--image: not a JPEG")?;
        let scaled = client.spec.needs(header.width as u32, header.height as u32);
        for (decode, at_least) in [("full", None), ("scaled", Some(scaled))] {
            let mut decoder = Decoder::new();
            let (mut total, mut infer) = (Vec::new(), Vec::new());
            let mut detections = 0;
            // One warm-up frame (ONNX Runtime allocates its arena on the first run).
            let img = decoder.decode(&jpeg, 100_000_000, at_least).map_err(|e| anyhow::anyhow!("{e}"))?;
            let decoded = (img.width, img.height);
            client.detect(&img).map_err(anyhow::Error::msg)?;
            let start = Instant::now();
            while start.elapsed().as_secs_f64() < o.seconds || total.len() < 3 {
                let t = Instant::now();
                let img = decoder.decode(&jpeg, 100_000_000, at_least).map_err(|e| anyhow::anyhow!("{e}"))?;
                let r = client.detect(&img).map_err(anyhow::Error::msg)?;
                total.push(t.elapsed().as_secs_f64() * 1000.0);
                infer.push(r.took.as_secs_f64() * 1000.0);
                detections = r.detections.len();
            }
            let frames = total.len();
            let elapsed = start.elapsed().as_secs_f64();
            if frames == 0 {
                bail!("no frame measured");
            }
            rows.push(serde_json::json!({
                "impl": "framelink", "decode": decode, "decoded": format!("{}x{}", decoded.0, decoded.1), "threads": threads, "frames": frames,
                "fps": frames as f64 / elapsed, "ms_median": median(&mut total), "model_ms_median": median(&mut infer),
                "detections": detections, "provider": provider, "runtime": lib.version,
            }));
        }
    }
    Ok(rows)
}
