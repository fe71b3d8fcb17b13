//! What the inference tests need from outside Rust: ONNX Runtime's shared library (from the
//! `onnxruntime` Python package, as a worker host would install it), the PP-OCR models
//! (`scripts/fetch-models` extracts them from the rapidocr-onnxruntime wheel into
//! `.cache/models/`), and `cloud-workers/tests/inference/fixtures.py` (small models with known
//! outputs, text rendered onto photographs, onnxruntime's Python API as the reference).

use std::path::PathBuf;
use std::process::Command;

use crate::repo_root;

/// `ORT_DYLIB_PATH` when set, else the library inside the `onnxruntime` Python package.
pub fn onnxruntime_library() -> PathBuf {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let code = "import onnxruntime, os, glob; d = os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'); print(sorted(glob.glob(os.path.join(d, 'libonnxruntime.so*')))[-1])";
    let o = Command::new("python3").args(["-c", code]).output().expect("run python3");
    assert!(o.status.success(), "the onnxruntime Python package is missing (scripts/fetch-models installs it): {}", String::from_utf8_lossy(&o.stderr));
    PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
}

/// A model `scripts/fetch-models` put in `.cache/models/` (e.g. `ch_PP-OCRv4_det_infer.onnx`).
pub fn model(file: &str) -> PathBuf {
    let p = repo_root().join(".cache/models").join(file);
    assert!(p.is_file(), "{} is missing: run scripts/fetch-models (it extracts the PP-OCR models from PyPI's rapidocr-onnxruntime wheel)", p.display());
    p
}

/// Runs `fixtures.py` with `args`.
pub fn fixtures(args: &[&str]) {
    let script = repo_root().join("cloud-workers/tests/inference/fixtures.py");
    let o = Command::new("python3").arg(&script).args(args).output().expect("run python3");
    assert!(o.status.success(), "fixtures.py {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}
