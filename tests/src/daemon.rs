//! Runs a framelink binary (agent or worker) for end-to-end tests: writes its config, starts
//! and stops it (SIGTERM or SIGKILL), and reads its `/metrics` and `/healthz` over HTTP.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use framelink_common::KafkaConfig;

/// A TOML `[kafka]` table for `cfg`.
pub fn kafka_toml(cfg: &KafkaConfig) -> String {
    let mut s = format!("[kafka]\nbrokers = {:?}\nsecurity_protocol = {:?}\n", cfg.brokers.join(","), cfg.security_protocol.as_librdkafka().to_ascii_uppercase());
    let t = &cfg.tls;
    let mut tls = String::new();
    for (k, v) in [("ca", &t.ca), ("certificate", &t.certificate), ("key", &t.key), ("client_ca", &t.client_ca)] {
        if let Some(p) = v {
            tls.push_str(&format!("{k} = {:?}\n", p.display().to_string()));
        }
    }
    if !tls.is_empty() {
        s.push_str("[kafka.tls]\n");
        s.push_str(&tls);
    }
    s
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Daemon {
    binary: PathBuf,
    /// Metric name prefix, e.g. `framelink_agent`.
    prefix: &'static str,
    env: Vec<(String, String)>,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub port: u16,
    child: Option<Child>,
    log: PathBuf,
}

/// The agent under test (`binary`: `env!("CARGO_BIN_EXE_framelink-agent")`).
pub type Agent = Daemon;

impl Daemon {
    /// Writes `body` (everything but `[http]`) as the agent's config, in `dir`.
    pub fn agent(binary: &str, dir: &Path, body: &str) -> Daemon {
        Self::configure(binary, "framelink_agent", "agent", dir, body)
    }

    /// Writes `body` (everything but `[http]`) as the worker's config, in `dir`.
    pub fn worker(binary: &str, dir: &Path, body: &str) -> Daemon {
        Self::configure(binary, "framelink_worker", "worker", dir, body)
    }

    /// Writes `body` (everything but `[console]`) and `console` (the keys of `[console]` but
    /// `listen`) as the console's config, in `dir`.
    pub fn console(binary: &str, dir: &Path, body: &str, console: &str) -> Daemon {
        let port = free_port();
        let config = dir.join("console.toml");
        std::fs::write(&config, format!("{body}\n[console]\nlisten = \"127.0.0.1:{port}\"\n{console}\n")).unwrap();
        Self::at(binary, "framelink_console", "console", dir, config, port)
    }

    fn configure(binary: &str, prefix: &'static str, name: &str, dir: &Path, body: &str) -> Daemon {
        let port = free_port();
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, format!("{body}\n[http]\nlisten = \"127.0.0.1:{port}\"\n")).unwrap();
        Self::at(binary, prefix, name, dir, config, port)
    }

    fn at(binary: &str, prefix: &'static str, name: &str, dir: &Path, config: PathBuf, port: u16) -> Daemon {
        Daemon {
            binary: PathBuf::from(binary),
            prefix,
            env: Vec::new(),
            dir: dir.to_path_buf(),
            config,
            port,
            child: None,
            log: dir.join(format!("{name}.log")),
        }
    }

    /// An environment variable for the process (e.g. a config override).
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_owned(), v.to_owned()));
        self
    }

    pub fn start(&mut self) {
        self.spawn();
        self.wait_for("the HTTP listener", Duration::from_secs(20), |a| a.try_get("/healthz").is_some());
    }

    /// Starts the process without waiting for its listener (one that serves HTTPS only).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(&self.binary)
            .args(["run", "--config", self.config.to_str().unwrap()])
            // FRAMELINK_TEST_DAEMON_LOG: another filter for the daemons' logs when debugging a test.
            .env("FRAMELINK_LOG", std::env::var("FRAMELINK_TEST_DAEMON_LOG").unwrap_or_else(|_| "info,librdkafka=warn".into()))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start the daemon");
        self.child = Some(child);
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("running");
        unsafe { libc_kill(child.id() as i32, 15) };
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "exited with {status}; log:\n{}", self.tail());
                return;
            }
            assert!(Instant::now() < deadline, "did not stop after SIGTERM; log:\n{}", self.tail());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What systemd's `Restart=always` does: if the process exited (a fatal error), start it
    /// again (its log keeps growing in the same file); true if it had exited.
    pub fn restart_if_exited(&mut self) -> bool {
        let exited = self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_some());
        if exited {
            self.child = None;
            self.start();
        }
        exited
    }

    /// Every thread's stack of the running process, by `eu-stack` (elfutils) if installed:
    /// evidence when a test sees a daemon stall. The process is stopped for a few seconds.
    pub fn stacks(&self) -> Option<String> {
        let pid = self.child.as_ref()?.id();
        let out = Command::new("eu-stack").args(["-p", &pid.to_string()]).output().ok()?;
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// SIGKILL (a crash or power cut).
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// The log's last 40 lines; the whole log is kept in the system's temp directory (a
    /// test's own directory goes with it) and its path printed, for failures that need more.
    pub fn tail(&self) -> String {
        let t = self.log_text();
        let keep = std::env::temp_dir().join(format!("framelink-{}-{}.log", self.log.file_stem().unwrap_or_default().to_string_lossy(), std::process::id()));
        if std::fs::write(&keep, &t).is_ok() {
            eprintln!("full log: {}", keep.display());
        }
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn try_get(&self, path: &str) -> Option<String> {
        self.get(path).map_err(|e| eprintln!("GET {path}: {e}")).ok()
    }

    fn get(&self, path: &str) -> std::io::Result<String> {
        let (status, body) = self.request("GET", path, &[], "")?;
        if !(200..300).contains(&status) {
            return Err(std::io::Error::other(format!("HTTP {status}: {body}")));
        }
        Ok(body)
    }

    /// One HTTP/1.1 request to the daemon's listener: (status, body).
    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
        write!(s, "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n{body}", body.len())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        let out = String::from_utf8_lossy(&out);
        let (head, body) = out.split_once("\r\n\r\n").ok_or_else(|| std::io::Error::other("no HTTP body"))?;
        let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| std::io::Error::other("no HTTP status"))?;
        // Chunked bodies (axum's JSON answers are not; streams are) are read as they come.
        Ok((status, body.to_owned()))
    }

    /// GET `path` as JSON (panics with the log if the daemon does not answer).
    pub fn get_json(&self, path: &str) -> serde_json::Value {
        let body = self.try_get(path).unwrap_or_else(|| panic!("no {path}; log:\n{}", self.tail()));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    pub fn healthz(&self) -> serde_json::Value {
        let body = self.try_get("/healthz").unwrap_or_else(|| panic!("no /healthz; log:\n{}", self.tail()));
        serde_json::from_str(&body).expect("healthz JSON")
    }

    /// Metric samples: `name{labels}` → value (histogram buckets left out).
    pub fn metrics(&self) -> HashMap<String, f64> {
        let text = self.try_get("/metrics").unwrap_or_else(|| panic!("no /metrics; log:\n{}", self.tail()));
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.contains("_bucket"))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect()
    }

    /// Sum of all samples of `name` whose labels contain every `filter` (`key="value"`).
    pub fn metric(&self, name: &str, filters: &[&str]) -> f64 {
        sum_metric(&self.metrics(), &format!("{}_{name}", self.prefix), filters)
    }

    pub fn wait_for(&self, what: &str, timeout: Duration, cond: impl Fn(&Daemon) -> bool) {
        let deadline = Instant::now() + timeout;
        while !cond(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}; log:\n{}", self.tail());
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// Sum of the samples of the metric `full_name` in a scrape (as [`Daemon::metrics`] returns
/// it) whose labels contain every `filter` (`key="value"`): the one rule the tests, the benches
/// (`bench/benchlib.py`) and the scripts (`scripts/lib.sh`) read a metric by.
pub fn sum_metric(samples: &HashMap<String, f64>, full_name: &str, filters: &[&str]) -> f64 {
    samples.iter().filter(|(k, _)| k.split('{').next() == Some(full_name) && filters.iter().all(|f| k.contains(f))).fold(0.0, |sum, (_, v)| sum + v) // not sum(): an empty f64 sum is -0
}
