//! Backend selection: the GPU stage (Vulkan / Metal / DX12 through wgpu) when `[gpu]` asks for
//! it and an adapter is there, else the CPU ops. Exported as the `backend` metric label and in
//! `/healthz`, so an operator sees which adapter runs the ops.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::config::WorkerConfig;
use crate::gpu::stage::GpuClient;
use crate::metrics::Metrics;

/// Opens the backend `[gpu]` asks for: the GPU stage's client, or `None` for the CPU. Logs
/// and exports (metric label, /healthz) which adapter runs the ops.
pub fn open_backend(cfg: &WorkerConfig, metrics: &Metrics) -> Result<Option<GpuClient>> {
    use crate::gpu::{BackendChoice, Gpu, adapters, stage};
    let g = &cfg.gpu;
    // Models run on their own provider (crate::infer); the ops of a pipeline with a model run
    // on the CPU backend, frame by frame around the model.
    if !cfg.worker.pipeline_ops()?.models().is_empty() && g.backend != BackendChoice::Cpu {
        tracing::info!(requested = g.backend.as_str(), "The pipeline runs a model (detect:): its ops run on the CPU backend; the model runs on inference.provider.");
        metrics.backend.get_or_create(&vec![("backend", "cpu".to_owned()), ("adapter", String::new()), ("device_type", String::new())]).set(1);
        metrics.health.lock().unwrap().backend = "cpu (the pipeline runs a model)".into();
        return Ok(None);
    }
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
    let client = stage::spawn(Arc::new(gpu), cfg.worker.pipeline_ops()?, cfg.motion.enabled, g.batch, Duration::from_millis(g.batch_wait_ms), metrics.gpu.clone())?;
    Ok(Some(client))
}
