//! The GPU backend: the worker's image operations as WGSL compute shaders run through wgpu
//! (Vulkan on Linux and Jetson, Metal on Apple, DX12 on Windows).
//!
//! Why it is shaped this way:
//! - **Same results as the CPU backend.** Every op is integer arithmetic mirroring
//!   [`crate::ops`] — including resize, whose fixed-point Lanczos3 tables are computed on the
//!   CPU exactly as the CPU backend's resizer computes them ([`plan`]) — so the two backends
//!   agree bit for bit; the parity tests compare them pixel by pixel on real photographs. A
//!   4:2:0 frame's colour ops run on its YUV planes on both backends (the stage's plane lanes,
//!   [`stage`]; definitions in [`crate::plane_ops`]).
//! - **Batches.** Frames of one size are uploaded into one buffer and every pass is a single
//!   dispatch over the whole batch (`workgroup_id.z` = frame), so a GPU sees work large enough
//!   to fill it; buffers, bind groups and pipelines are created once per input size and reused.
//! - **Pipelined.** [`Runner::submit`] uploads, dispatches and queues the read-back of a batch
//!   and returns at once; [`Runner::finish`] waits for it. Each input size has two buffer sets,
//!   so the next batch is gathered and uploaded while the previous one computes.
//! - **Adapter choice is explicit.** wgpu happily returns a software rasteriser (Mesa lavapipe)
//!   when no GPU exists; `auto` only takes an adapter whose device type is not `Cpu`, `gpu`
//!   fails with the list of adapters it saw, and `software` picks lavapipe on purpose (tests).
//!
//! Motion detection's expensive part (reducing the whole frame to a small luma image) runs on
//! the GPU in the same batch; comparing two 160-pixel-wide images and keeping per-camera state
//! stays on the CPU, where it costs microseconds.

pub mod plan;
mod runner;
pub mod stage;

use std::fmt;
use std::sync::Arc;

pub use runner::{GpuOutput, Runner, Ticket, Times};

/// Where frames are processed (`worker.backend`, `--backend`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum BackendChoice {
    /// A real GPU when there is one, else the CPU.
    #[default]
    Auto,
    /// A real GPU or a startup error.
    Gpu,
    /// The CPU backend (crate::ops).
    Cpu,
    /// A software Vulkan adapter (Mesa lavapipe): for tests and CI, never fast.
    Software,
}

impl TryFrom<String> for BackendChoice {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "gpu" => Ok(Self::Gpu),
            "cpu" => Ok(Self::Cpu),
            "software" => Ok(Self::Software),
            other => Err(format!("unknown backend {other:?}: expected \"auto\", \"gpu\", \"cpu\" or \"software\"")),
        }
    }
}

impl BackendChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Gpu => "gpu",
            Self::Cpu => "cpu",
            Self::Software => "software",
        }
    }
}

/// `[gpu]`: which backend runs the ops, and how the GPU stage batches.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuConfig {
    /// `auto` (default): a real GPU if there is one, else the CPU; `gpu`: a real GPU or a
    /// startup error; `cpu`; `software`: Mesa lavapipe, for tests.
    #[serde(default)]
    pub backend: BackendChoice,
    /// Only adapters whose name contains this (case-insensitive), e.g. "H100" or "Orin".
    #[serde(default)]
    pub adapter: Option<String>,
    /// Frames per GPU batch at most. Default 4 (measured best or near it at 1080p on an
    /// H200; see docs/gpu.md). A batch fills from the processing threads, so `worker.threads`
    /// should be at least this.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// How long the stage waits for a batch to fill after its first frame, ms. Default 2.
    #[serde(default = "default_batch_wait_ms")]
    pub batch_wait_ms: u64,
}

fn default_batch() -> usize {
    4
}
fn default_batch_wait_ms() -> u64 {
    2
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self { backend: BackendChoice::Auto, adapter: None, batch: default_batch(), batch_wait_ms: default_batch_wait_ms() }
    }
}

impl GpuConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=256).contains(&self.batch) {
            return Err(format!("config key `gpu.batch`: {} is not from 1 to 256", self.batch));
        }
        if self.batch_wait_ms > 1000 {
            return Err(format!("config key `gpu.batch_wait_ms`: {} is above 1000", self.batch_wait_ms));
        }
        if self.adapter.as_deref() == Some("") {
            return Err("config key `gpu.adapter`: empty; leave it out to accept any adapter".into());
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("backend {choice:?}: no suitable adapter{filter}; adapters found: {found}")]
    NoAdapter { choice: &'static str, filter: String, found: String },
    #[error("opening a device on {adapter}: {reason}")]
    Device { adapter: String, reason: String },
    #[error("GPU: {0}")]
    Runtime(String),
    #[error(transparent)]
    Op(#[from] crate::ops::OpError),
}

/// What was chosen, for logs and the metric label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterDesc {
    pub name: String,
    /// `DiscreteGpu`, `IntegratedGpu`, `VirtualGpu`, `Cpu` or `Other`.
    pub device_type: String,
    pub backend: String,
    pub driver: String,
}

impl From<&wgpu::AdapterInfo> for AdapterDesc {
    fn from(i: &wgpu::AdapterInfo) -> Self {
        Self {
            name: i.name.clone(),
            device_type: format!("{:?}", i.device_type),
            backend: format!("{:?}", i.backend),
            driver: format!("{} {}", i.driver, i.driver_info).trim().to_owned(),
        }
    }
}

impl fmt::Display for AdapterDesc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, {}, {})", self.name, self.device_type, self.backend, self.driver)
    }
}

/// For a process without a display (no `WAYLAND_DISPLAY`, no `DISPLAY`): turns off Mesa's
/// Vulkan device-select layer, whose job is to put the GPU driving the display first. Without
/// a display it has nothing to choose, but while probing it tries to reach a Wayland
/// compositor, and libwayland prints `error: XDG_RUNTIME_DIR is invalid or not set in the
/// environment.` once per probe on a service or container without a session: an "error" that
/// is none. Adapter choice is the worker's own (`gpu.backend`, `gpu.adapter`).
///
/// # Safety
/// Sets an environment variable: call it before any other thread exists (first thing in `main`).
pub unsafe fn quiet_headless_probe() {
    let unset = |k: &str| std::env::var_os(k).is_none_or(|v| v.is_empty());
    if unset("WAYLAND_DISPLAY") && unset("DISPLAY") && unset("NODEVICE_SELECT") {
        // SAFETY: the caller guarantees no other thread reads the environment meanwhile.
        unsafe { std::env::set_var("NODEVICE_SELECT", "1") };
    }
}

fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

/// Every adapter wgpu can see on this machine.
pub fn adapters() -> Vec<AdapterDesc> {
    pollster::block_on(instance().enumerate_adapters(wgpu::Backends::all())).iter().map(|a| AdapterDesc::from(&a.get_info())).collect()
}

/// An opened GPU device with the compiled op pipelines.
pub struct Gpu {
    pub desc: AdapterDesc,
    device: wgpu::Device,
    queue: wgpu::Queue,
    layout: wgpu::BindGroupLayout,
    pipelines: std::collections::HashMap<&'static str, wgpu::ComputePipeline>,
    /// Largest storage binding and buffer, bytes (bounds the batch).
    max_binding: u64,
    /// Validation or device-lost errors reported by wgpu's callbacks.
    errors: Arc<std::sync::Mutex<Option<String>>>,
}

/// Shader entry points, one per op (see ops.wgsl).
const ENTRIES: &[&str] = &["grayscale", "blur_h", "blur_v", "sobel", "sharpen", "rotate", "crop", "resize_v", "resize_h", "small_luma"];

/// ops.wgsl plus one generated entry point per op: each invocation computes one output word
/// (four bytes) by calling `op_<name>` for each of its bytes.
fn shader_source() -> String {
    let mut s = include_str!("ops.wgsl").to_owned();
    for e in ENTRIES {
        s.push_str(&format!(
            "
@compute @workgroup_size(256)
fn {e}(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {{
    let word = (wg.y * p.n_wg_x + wg.x) * 256u + li;
    let n = p.out_w * p.out_h * p.out_ch;
    if (word * 4u >= n) {{ return; }}
    in_base = wg.z * p.in_stride;
    var acc = 0u;
    for (var k = 0u; k < 4u; k++) {{
        let i = word * 4u + k;
        if (i < n) {{ acc |= op_{e}(i) << (8u * k); }}
    }}
    dst[wg.z * p.out_stride + word] = acc;
}}
"
        ));
    }
    s
}

impl Gpu {
    /// Opens the adapter `choice` asks for; `Ok(None)` means "use the CPU" (`cpu`, or `auto`
    /// with no real GPU). `adapter` narrows the choice to adapters whose name contains it.
    pub fn open(choice: BackendChoice, adapter: Option<&str>) -> Result<Option<Gpu>, GpuError> {
        if choice == BackendChoice::Cpu {
            return Ok(None);
        }
        let instance = instance();
        let all = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
        let name_ok = |a: &wgpu::Adapter| adapter.is_none_or(|n| a.get_info().name.to_lowercase().contains(&n.to_lowercase()));
        let is_software = |a: &wgpu::Adapter| a.get_info().device_type == wgpu::DeviceType::Cpu;
        let rank = |a: &wgpu::Adapter| match a.get_info().device_type {
            wgpu::DeviceType::DiscreteGpu => 0,
            wgpu::DeviceType::IntegratedGpu => 1,
            wgpu::DeviceType::VirtualGpu => 2,
            _ => 3,
        };
        let mut candidates: Vec<&wgpu::Adapter> = all
            .iter()
            .filter(|a| name_ok(a))
            .filter(|a| if choice == BackendChoice::Software { is_software(a) } else { !is_software(a) })
            .collect();
        candidates.sort_by_key(|a| rank(a));
        let Some(chosen) = candidates.first() else {
            if choice == BackendChoice::Auto {
                return Ok(None);
            }
            let found: Vec<String> = all.iter().map(|a| AdapterDesc::from(&a.get_info()).to_string()).collect();
            return Err(GpuError::NoAdapter {
                choice: choice.as_str(),
                filter: adapter.map(|n| format!(" named like {n:?}")).unwrap_or_default(),
                found: if found.is_empty() { "none (is a Vulkan driver installed? libvulkan1 + the GPU's ICD, or mesa-vulkan-drivers for lavapipe)".into() } else { found.join("; ") },
            });
        };
        Self::on(chosen).map(Some)
    }

    fn on(adapter: &wgpu::Adapter) -> Result<Gpu, GpuError> {
        let info = adapter.get_info();
        let desc = AdapterDesc::from(&info);
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("framelink"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| GpuError::Device { adapter: desc.to_string(), reason: e.to_string() })?;
        let errors = Arc::new(std::sync::Mutex::new(None));
        let e1 = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            tracing::error!(error = %e, "GPU error");
            e1.lock().unwrap().get_or_insert_with(|| e.to_string());
        }));
        let e2 = errors.clone();
        device.set_device_lost_callback(move |reason, msg| {
            tracing::error!(?reason, msg, "GPU device lost");
            e2.lock().unwrap().get_or_insert_with(|| format!("device lost ({reason:?}): {msg}"));
        });
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor { label: Some("framelink ops"), source: wgpu::ShaderSource::Wgsl(shader_source().into()) });
        let storage = |binding, read_only| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer { ty: wgpu::BufferBindingType::Storage { read_only }, has_dynamic_offset: false, min_binding_size: None },
            count: None,
        };
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("framelink op"),
            entries: &[
                storage(0, true),
                storage(1, false),
                storage(2, true),
                wgpu::BindGroupLayoutEntry {
                    binding: 3,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer { ty: wgpu::BufferBindingType::Uniform, has_dynamic_offset: false, min_binding_size: None },
                    count: None,
                },
            ],
        });
        let pl = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor { label: Some("framelink op"), bind_group_layouts: &[Some(&layout)], immediate_size: 0 });
        let pipelines = ENTRIES
            .iter()
            .map(|&e| {
                let p = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(e),
                    layout: Some(&pl),
                    module: &module,
                    entry_point: Some(e),
                    compilation_options: Default::default(),
                    cache: None,
                });
                (e, p)
            })
            .collect();
        let max_binding = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        let gpu = Gpu { desc, device, queue, layout, pipelines, max_binding, errors };
        gpu.check()?;
        Ok(gpu)
    }

    /// The first error wgpu reported, if any (then the device is not to be trusted).
    fn check(&self) -> Result<(), GpuError> {
        match self.errors.lock().unwrap().clone() {
            Some(e) => Err(GpuError::Runtime(e)),
            None => Ok(()),
        }
    }
}
