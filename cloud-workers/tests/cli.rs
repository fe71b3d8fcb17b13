//! The worker's command line: version and `check-config` on the shipped example config and on
//! broken ones.

use std::process::{Command, Output};

use framelink_testkit::{Broker, repo_root};

fn worker(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_framelink-worker"));
    c.args(args).env("FRAMELINK_LOG", "error");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run framelink-worker")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn version() {
    let o = worker(&["--version"], &[]);
    assert!(o.status.success());
    assert_eq!(text(&o).trim(), format!("framelink-worker {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn adapter_probing_on_a_host_without_a_display_prints_no_false_errors() {
    // A service or container has no XDG_RUNTIME_DIR and no display; probing Vulkan adapters
    // there must not print libwayland's "error: XDG_RUNTIME_DIR is invalid" lines.
    let o = Command::new(env!("CARGO_BIN_EXE_framelink-worker")).arg("adapters").env_remove("XDG_RUNTIME_DIR").env_remove("WAYLAND_DISPLAY").env_remove("DISPLAY").env_remove("NODEVICE_SELECT").output().unwrap();
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("backend auto ->"), "{out}");
    assert!(!out.contains("XDG_RUNTIME_DIR"), "{out}");
}

#[test]
fn example_config_checks_and_connects_over_mtls() {
    let b = Broker::shared();
    let mut env = b.mtls_env();
    env.push(("FRAMELINK__CONSUMER__GROUP_ID", "workers-test".into()));
    let config = repo_root().join("configs/worker.toml");
    let o = worker(&["check-config", "--config", config.to_str().unwrap(), "--connect"], &env);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("group \"workers-test\" reading [\"frames\"]"), "{out}");
    assert!(out.contains("connected: 1 broker(s)"), "{out}");
}

#[test]
fn output_topic_that_is_an_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.toml");
    std::fs::write(&p, "[kafka]\nbrokers = \"h:1\"\n[consumer]\ntopics = [\"a\"]\n[output]\nresults_topic = \"a\"\n").unwrap();
    let o = worker(&["check-config", "--config", p.to_str().unwrap()], &[]);
    assert!(!o.status.success());
    assert!(text(&o).contains("config key `output.results_topic`"), "{}", text(&o));
}

#[test]
fn a_bad_delivery_mode_or_transaction_interval_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.toml");
    std::fs::write(&p, "[kafka]\nbrokers = \"h:1\"\n[worker]\ndelivery = \"twice\"\n").unwrap();
    let o = worker(&["check-config", "--config", p.to_str().unwrap()], &[]);
    assert!(!o.status.success());
    let out = text(&o);
    assert!(out.contains("worker.delivery") && out.contains("exactly-once"), "{out}");
    std::fs::write(&p, "[kafka]\nbrokers = \"h:1\"\n[worker]\ndelivery = \"exactly-once\"\ntransaction_ms = 5\n").unwrap();
    let o = worker(&["check-config", "--config", p.to_str().unwrap()], &[]);
    assert!(!o.status.success());
    assert!(text(&o).contains("config key `worker.transaction_ms`: 5 is not from 10 to 60000"), "{}", text(&o));
}

#[test]
fn the_demo_config_checks() {
    let config = repo_root().join("configs/demo/worker.toml");
    let o = worker(&["check-config", "--config", config.to_str().unwrap()], &[("FRAMELINK__KAFKA__SECURITY_PROTOCOL", "PLAINTEXT".into())]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("group \"framelink-demo\""), "{}", text(&o));
}

#[test]
fn fleet_config_checks_and_connects() {
    let b = Broker::shared();
    let env = b.mtls_env();
    let config = repo_root().join("configs/fleet/worker-example.toml");
    let o = worker(&["check-config", "--config", config.to_str().unwrap(), "--connect"], &env);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("reading [\"^frames(\\\\..*)?$\"]") && out.contains("connected: 1 broker(s)"), "{out}");
}

#[test]
fn an_input_pattern_that_matches_an_output_topic_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.toml");
    std::fs::write(&p, "[kafka]\nbrokers = \"h:1\"\n[consumer]\ntopics = [\"^frames.*\"]\n[output]\nresults_topic = \"frames.processed\"\n").unwrap();
    let o = worker(&["check-config", "--config", p.to_str().unwrap()], &[]);
    assert!(!o.status.success());
    assert!(text(&o).contains("config key `output.results_topic`: \"frames.processed\" matches the input pattern \"^frames.*\""), "{}", text(&o));
}

/// configs/gpu-worker: loads and connects; demands a real GPU, so on a machine with only the
/// software adapter (CI) `--connect` refuses it, naming the key and the adapters it saw, and
/// passes once the backend is overridden to that software adapter.
#[test]
fn gpu_worker_config_checks_and_demands_a_gpu() {
    let b = Broker::shared();
    let config = repo_root().join("configs/gpu-worker/worker.toml");
    let mut env = b.mtls_env();
    let o = worker(&["check-config", "--config", config.to_str().unwrap()], &env);
    assert!(o.status.success(), "{}", text(&o));
    let real_gpu = framelink_worker::gpu::Gpu::open(framelink_worker::gpu::BackendChoice::Gpu, None).ok().flatten().is_some();
    let o = worker(&["check-config", "--config", config.to_str().unwrap(), "--connect"], &env);
    if real_gpu {
        assert!(o.status.success() && text(&o).contains("backend gpu: gpu "), "{}", text(&o));
    } else {
        assert!(!o.status.success(), "{}", text(&o));
        assert!(text(&o).contains("config key `gpu.backend` = \"gpu\": backend \"gpu\": no suitable adapter; adapters found: llvmpipe"), "{}", text(&o));
    }
    env.push(("FRAMELINK__GPU__BACKEND", "software".into()));
    let o = worker(&["check-config", "--config", config.to_str().unwrap(), "--connect"], &env);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("backend software: gpu llvmpipe"), "{}", text(&o));
}

#[test]
fn a_bad_gpu_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.toml");
    std::fs::write(&p, "[kafka]\nbrokers = \"h:1\"\n[gpu]\nbackend = \"cuda\"\n").unwrap();
    let o = worker(&["check-config", "--config", p.to_str().unwrap()], &[]);
    assert!(!o.status.success());
    assert!(text(&o).contains("gpu.backend") && text(&o).contains("unknown backend \"cuda\": expected \"auto\", \"gpu\", \"cpu\" or \"software\""), "{}", text(&o));
    std::fs::write(&p, "[kafka]\nbrokers = \"h:1\"\n[gpu]\nbatch = 0\n").unwrap();
    let o = worker(&["check-config", "--config", p.to_str().unwrap()], &[]);
    assert!(text(&o).contains("config key `gpu.batch`: 0 is not from 1 to 256"), "{}", text(&o));
}

fn model_config(dir: &std::path::Path, library: &str) -> std::path::PathBuf {
    let model = framelink_testkit::inference::model("ch_PP-OCRv4_det_infer.onnx");
    let p = dir.join("w.toml");
    std::fs::write(
        &p,
        format!("[kafka]\nbrokers = \"h:1\"\n[worker]\npipeline = \"resize:1280x720,detect:text\"\n[inference]\nlibrary = {library:?}\n[models.text]\npath = {:?}\nfamily = \"dbnet\"\n", model.display().to_string()),
    )
    .unwrap();
    p
}

#[test]
fn check_config_loads_the_runtime_and_opens_the_models() {
    let dir = tempfile::tempdir().unwrap();
    let lib = framelink_testkit::inference::onnxruntime_library();
    let p = model_config(dir.path(), &lib.display().to_string());
    let o = worker(&["check-config", "--config", p.to_str().unwrap()], &[]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains(&format!("from {}", lib.display())), "{out}");
    assert!(out.contains("model text: dbnet ch_PP-OCRv4_det_infer.onnx (unversioned), input dynamic, 0 labels, provider cpu"), "{out}");
}

#[test]
fn a_missing_onnx_runtime_is_named_at_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let p = model_config(dir.path(), "/nonexistent/libonnxruntime.so.1.32.0");
    let o = worker(&["check-config", "--config", p.to_str().unwrap()], &[]);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("ONNX Runtime not found: tried /nonexistent/libonnxruntime.so.1.32.0 (no such file)"), "{out}");
    // Not a library at all: named as such.
    let p = model_config(dir.path(), p.to_str().unwrap());
    let o = worker(&["check-config", "--config", p.to_str().unwrap()], &[]);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains(&format!("ONNX Runtime at {}: failed to load", p.display())), "{out}");
    // A detect: op without its [models.NAME] table is refused before anything loads.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[kafka]\nbrokers = \"h:1\"\n[worker]\npipeline = \"detect:people\"\n").unwrap();
    let o = worker(&["check-config", "--config", bad.to_str().unwrap()], &[]);
    assert!(text(&o).contains("detect:people needs a [models.people] table"), "{}", text(&o));
}
