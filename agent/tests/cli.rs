//! The agent's command line: version, help, and `check-config` on the shipped example config
//! (pointed at the test broker through FRAMELINK__ environment overrides) and on broken ones.

use std::path::Path;
use std::process::{Command, Output};

use framelink_testkit::{Broker, repo_root, rogue_identity};

fn agent(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_framelink-agent"));
    c.args(args).env("FRAMELINK_LOG", "error");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run framelink-agent")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Overrides that point configs/agent.toml at the test broker's mTLS listener.
fn example() -> String {
    repo_root().join("configs/agent.toml").display().to_string()
}

#[test]
fn version_and_help() {
    let o = agent(&["--version"], &[]);
    assert!(o.status.success());
    assert_eq!(text(&o).trim(), format!("framelink-agent {}", env!("CARGO_PKG_VERSION")));
    let o = agent(&["--help"], &[]);
    assert!(o.status.success());
    assert!(text(&o).contains("check-config"), "{}", text(&o));
}

#[test]
fn example_config_checks_and_connects_over_mtls() {
    let b = Broker::shared();
    let o = agent(&["check-config", "--config", &example(), "--connect"], &b.mtls_env());
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("config OK: device \"site1-gate\", 1 camera(s), topic \"frames\""), "{out}");
    assert!(out.contains("connected: 1 broker(s)") && out.contains("mTLS"), "{out}");
}

#[test]
fn example_config_without_its_tls_files_names_the_file() {
    // On a machine without /etc/framelink/tls the example must fail, naming key and file.
    if Path::new("/etc/framelink/tls/ca.pem").exists() {
        return;
    }
    let o = agent(&["check-config", "--config", &example()], &[]);
    assert!(!o.status.success());
    let out = text(&o);
    assert!(out.contains("kafka.tls.ca") && out.contains("/etc/framelink/tls/ca.pem"), "{out}");
}

#[test]
fn unknown_and_invalid_keys_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.toml");
    std::fs::write(&p, "[device]\nid = \"d\"\n[kafka]\nbrokers = \"h:1\"\n[forwarder]\ntopik = \"x\"\n").unwrap();
    let o = agent(&["check-config", "--config", p.to_str().unwrap()], &[]);
    assert!(!o.status.success());
    assert!(text(&o).contains("config key `forwarder.topik`: unknown field"), "{}", text(&o));

    std::fs::write(&p, "[device]\nid = \"a/b\"\n[kafka]\nbrokers = \"h:1\"\n").unwrap();
    let o = agent(&["check-config", "--config", p.to_str().unwrap()], &[]);
    assert!(!o.status.success());
    assert!(text(&o).contains("device.id"), "{}", text(&o));

    // An environment override is checked like the file.
    std::fs::write(&p, "[device]\nid = \"d\"\n[kafka]\nbrokers = \"h:1\"\n").unwrap();
    let o = agent(
        &["check-config", "--config", p.to_str().unwrap()],
        &[("FRAMELINK__KAFKA__SECURITY_PROTOCOL", "TLS".into())],
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("kafka.security_protocol"), "{}", text(&o));

    // A decoder this build lacks, or that does not exist, is named with its key.
    let cam = |decoder: &str| format!("[device]\nid = \"d\"\n[kafka]\nbrokers = \"h:1\"\n[[cameras]]\nid = \"c\"\nrtsp = {{ url = \"rtsp://192.0.2.1/s\", decoder = \"{decoder}\" }}\n");
    std::fs::write(&p, cam("ffmpeg")).unwrap();
    let o = agent(&["check-config", "--config", p.to_str().unwrap()], &[]);
    assert!(!o.status.success() && text(&o).contains("config key `cameras[0].rtsp.decoder`") && text(&o).contains("ffmpeg"), "{}", text(&o));
    if !cfg!(feature = "libav") {
        std::fs::write(&p, cam("libav")).unwrap();
        let o = agent(&["check-config", "--config", p.to_str().unwrap()], &[]);
        assert!(!o.status.success(), "{}", text(&o));
        assert!(text(&o).contains("config key `cameras[0].rtsp.decoder`") && text(&o).contains("`libav` feature"), "{}", text(&o));
    }
}

/// An environment override is text: a string key keeps it as written (leading zeros), numeric
/// keys parse it.
#[test]
fn environment_overrides_keep_strings_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.toml");
    std::fs::write(&p, "[device]\nid = \"d\"\n[kafka]\nbrokers = \"h:1\"\n").unwrap();
    let o = agent(
        &["check-config", "--config", p.to_str().unwrap()],
        &[
            ("FRAMELINK__DEVICE__ID", "007".into()),
            ("FRAMELINK__DEVICE__SHUTDOWN_GRACE_S", "5".into()),
            ("FRAMELINK__FORWARDER__QUEUE_MAX_BYTES", "33554432".into()),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("config OK: device \"007\""), "{}", text(&o));
}

#[test]
fn a_client_key_of_another_certificate_is_named() {
    let b = Broker::shared();
    let dir = tempfile::tempdir().unwrap();
    let (_, _, rogue_key) = rogue_identity(dir.path()).unwrap();
    let mut env = b.mtls_env();
    env.push(("FRAMELINK__KAFKA__TLS__KEY", rogue_key.display().to_string()));
    let o = agent(&["check-config", "--config", &example()], &env);
    assert!(!o.status.success());
    let out = text(&o);
    assert!(out.contains("kafka.tls.key") && out.contains("rogue-client.key"), "{out}");
    assert!(out.contains("does not match the certificate"), "{out}");
}

#[test]
fn demo_config_checks() {
    let b = Broker::shared();
    let config = repo_root().join("configs/demo/agent.toml");
    let o = agent(&["check-config", "--config", config.to_str().unwrap(), "--connect"], &b.mtls_env());
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("2 camera(s)"), "{out}");
}

/// Every shipped agent config for a setup (configs/*/agent.toml) loads, validates and, pointed
/// at the test broker's mTLS listener, connects.
#[test]
fn setup_configs_check_and_connect() {
    let b = Broker::shared();
    let mut checked = Vec::new();
    for setup in ["cctv-site", "drone-lte", "demo"] {
        let config = repo_root().join("configs").join(setup).join("agent.toml");
        let o = agent(&["check-config", "--config", config.to_str().unwrap(), "--connect"], &b.mtls_env());
        let out = text(&o);
        assert!(o.status.success(), "{setup}: {out}");
        assert!(out.contains("config OK") && out.contains("connected: 1 broker(s)"), "{setup}: {out}");
        checked.push(setup);
    }
    let on_disk: Vec<String> = std::fs::read_dir(repo_root().join("configs"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("agent.toml").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for d in &on_disk {
        assert!(checked.contains(&d.as_str()), "configs/{d}/agent.toml is not checked by this test");
    }
    // The setups differ where they should: 4 cameras on the CCTV box, a decimating spool on the drone.
    let cctv = std::fs::read_to_string(repo_root().join("configs/cctv-site/agent.toml")).unwrap();
    assert_eq!(cctv.matches("[[cameras]]").count(), 4);
    let o = agent(&["check-config", "--config", repo_root().join("configs/cctv-site/agent.toml").to_str().unwrap()], &b.mtls_env());
    assert!(text(&o).contains("4 camera(s)"), "{}", text(&o));
}
