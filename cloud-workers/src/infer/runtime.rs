//! Finding and loading ONNX Runtime, and opening model sessions on the chosen execution
//! provider.
//!
//! The worker links nothing of ONNX Runtime at build time (`ort`'s `load-dynamic`): the shared
//! library is loaded when the first model is opened, from `inference.library`, else
//! `ORT_DYLIB_PATH`, else the standard places. A worker without `detect:` ops never loads it,
//! so hosts that run no models need no runtime. A library that is missing, not ONNX Runtime, or
//! older than `ort` needs is an error naming every path tried.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::ep::ExecutionProvider;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;

use super::config::{InferenceConfig, Provider};

/// Why inference could not start.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("ONNX Runtime not found: tried {tried}. Install it (pip install onnxruntime, or the onnxruntime release archive) and set `inference.library` or ORT_DYLIB_PATH to libonnxruntime.so; see docs/inference.md")]
    NotFound { tried: String },
    #[error("ONNX Runtime at {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("ONNX Runtime is already loaded from {loaded}; one worker process uses one library (asked for {asked})")]
    Conflict { loaded: String, asked: String },
    #[error("model {name} ({path}): {reason}")]
    Model { name: String, path: String, reason: String },
}

/// The standard places, after `inference.library` and `ORT_DYLIB_PATH`: the dynamic loader's
/// own search (LD_LIBRARY_PATH, ld.so.cache) by name, then the usual install prefixes.
pub fn candidates(cfg: &InferenceConfig) -> Vec<PathBuf> {
    if let Some(p) = &cfg.library {
        return vec![p.clone()];
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return vec![PathBuf::from(p)];
    }
    let mut out = vec![PathBuf::from("libonnxruntime.so"), PathBuf::from("libonnxruntime.so.1")];
    for dir in ["/usr/local/lib", "/usr/lib", "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/opt/onnxruntime/lib"] {
        out.push(Path::new(dir).join("libonnxruntime.so"));
    }
    out
}

/// The library this process loaded, its version, and the environment sessions are made in.
#[derive(Clone)]
pub struct Loaded {
    pub path: PathBuf,
    pub version: String,
    pub env: ort::environment::Environment,
}

static LOADED: OnceLock<Loaded> = OnceLock::new();
static LOADING: Mutex<()> = Mutex::new(());

/// Loads ONNX Runtime once per process (later calls return the same library, or a conflict
/// when asked for another one).
pub fn load(cfg: &InferenceConfig) -> Result<Loaded, RuntimeError> {
    let _g = LOADING.lock().unwrap_or_else(|e| e.into_inner());
    let tried = candidates(cfg);
    if let Some(l) = LOADED.get() {
        let explicit = cfg.library.is_some() || std::env::var_os("ORT_DYLIB_PATH").is_some_and(|p| !p.is_empty());
        if explicit && tried[0] != l.path {
            return Err(RuntimeError::Conflict { loaded: l.path.display().to_string(), asked: tried[0].display().to_string() });
        }
        return Ok(l.clone());
    }
    let mut failures = Vec::new();
    for path in &tried {
        // A bare file name goes to the dynamic loader's search; a path must exist.
        if path.components().count() > 1 && !path.exists() {
            failures.push(format!("{} (no such file)", path.display()));
            continue;
        }
        match ort::init_from(path) {
            Ok(builder) => {
                let version = ort_version();
                let env = builder.with_name("framelink-worker").build().map_err(|e| RuntimeError::Load { path: path.display().to_string(), reason: e.to_string() })?;
                let l = Loaded { path: path.clone(), version, env };
                let _ = LOADED.set(l.clone());
                return Ok(l);
            }
            // Found but unusable (not ONNX Runtime, too old): that is the answer, not a miss.
            Err(e @ (ort::LoadDynamicError::BadVersion { .. } | ort::LoadDynamicError::MissingApi { .. } | ort::LoadDynamicError::InvalidVersionString)) => {
                return Err(RuntimeError::Load { path: path.display().to_string(), reason: e.to_string() });
            }
            // A file that is there but does not load (wrong architecture, missing dependencies,
            // not a library): that is the answer too.
            Err(e) if path.components().count() > 1 => return Err(RuntimeError::Load { path: path.display().to_string(), reason: e.to_string() }),
            Err(e) => failures.push(format!("{} ({e})", path.display())),
        }
    }
    Err(RuntimeError::NotFound { tried: failures.join("; ") })
}

/// The loaded library's version string, e.g. `1.32.0`.
fn ort_version() -> String {
    let info = ort::info();
    // "ORT Build Info: git-branch=rel-1.32.0, ..."
    info.split("git-branch=rel-").nth(1).and_then(|s| s.split(',').next()).map(str::to_owned).unwrap_or_else(|| info.chars().take(80).collect())
}

/// The provider a session got: what was asked for, what runs, and why they differ.
#[derive(Clone, Debug, PartialEq)]
pub struct Chosen {
    pub requested: Provider,
    pub provider: Provider,
    /// Why the requested GPU provider is not used.
    pub fallback: Option<String>,
}

impl Chosen {
    pub fn describe(&self) -> String {
        match &self.fallback {
            None => self.provider.as_str().to_owned(),
            Some(why) => format!("{} ({} unavailable: {why})", self.provider.as_str(), self.requested.as_str()),
        }
    }
}

/// Opens `path` on the configured provider (falling back to the CPU with the reason).
pub fn open_session(lib: &Loaded, cfg: &InferenceConfig, name: &str, path: &Path) -> Result<(Session, Chosen), RuntimeError> {
    let err = |reason: String| RuntimeError::Model { name: name.to_owned(), path: path.display().to_string(), reason };
    let builder = || -> ort::Result<ort::session::builder::SessionBuilder> {
        Ok(Session::builder(&lib.env)?.with_optimization_level(GraphOptimizationLevel::All)?.with_intra_threads(cfg.threads)?.with_inter_threads(1)?)
    };
    let mut fallback = None;
    if cfg.provider != Provider::Cpu {
        let mut b = builder().map_err(|e| err(e.to_string()))?;
        let registered = match cfg.provider {
            Provider::Cuda => register(ort::ep::CUDA::default().with_device_id(cfg.device_id), &mut b),
            Provider::TensorRt => register(ort::ep::TensorRT::default().with_device_id(cfg.device_id), &mut b),
            Provider::Cpu => unreachable!(),
        };
        match registered.and_then(|()| b.commit_from_file(path).map_err(|e| e.to_string())) {
            Ok(s) => return Ok((s, Chosen { requested: cfg.provider, provider: cfg.provider, fallback: None })),
            Err(why) => fallback = Some(why),
        }
    }
    let s = builder().and_then(|mut b| b.commit_from_file(path)).map_err(|e| err(e.to_string()))?;
    Ok((s, Chosen { requested: cfg.provider, provider: Provider::Cpu, fallback }))
}

fn register<E: ExecutionProvider>(ep: E, b: &mut ort::session::builder::SessionBuilder) -> Result<(), String> {
    if !E::is_available().unwrap_or(false) {
        return Err(format!("this ONNX Runtime build has no {}", E::NAME));
    }
    ep.register(b).map_err(|e| e.to_string())
}
