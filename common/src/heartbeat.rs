//! Heartbeats: a small JSON record each agent and worker publishes every `heartbeat_s` to a
//! compacted topic (`framelink.heartbeats`), so that `framelink-console` sees the whole fleet —
//! devices behind NAT that no Prometheus can scrape included — from Kafka alone.
//!
//! Why a topic and not scraping: edge devices dial out to Kafka and accept no connections; the
//! compacted topic keeps the last beat of every agent and worker, so a console that starts
//! reads the fleet's last known state back at once.
//!
//! A beat is never spooled and never retried late: its producer's `message.timeout.ms` is one
//! interval, so an agent that is offline simply stops beating, and a beat that could not be
//! delivered in time is counted (`heartbeats_failed`) and replaced by the next one. The console
//! judges age by the beat's own `at_ms`, not by when it arrived.
//!
//! Record: key `agent/<device id>` or `worker/<worker id>`; value the JSON of [`Heartbeat`]
//! (`"kind": "agent" | "worker"`); header `framelink-heartbeat: 1`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use serde::{Deserialize, Serialize};

use crate::shutdown::Shutdown;

/// The version of the heartbeat JSON; a console refuses (and counts) beats of a newer one.
pub const VERSION: u32 = 1;

/// `[heartbeat]` of the agent and the worker.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatConfig {
    /// Seconds between beats; 0 turns heartbeats off. Default 5.
    #[serde(default = "default_interval")]
    pub heartbeat_s: u64,
    /// The compacted topic beats go to. Default `framelink.heartbeats`.
    #[serde(default = "default_topic")]
    pub topic: String,
}

fn default_interval() -> u64 {
    5
}

pub fn default_topic() -> String {
    "framelink.heartbeats".into()
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        Self { heartbeat_s: default_interval(), topic: default_topic() }
    }
}

impl HeartbeatConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat_s > 3600 {
            return Err(format!("config key `heartbeat.heartbeat_s`: {} is more than an hour; a fleet view needs beats at least hourly", self.heartbeat_s));
        }
        if self.heartbeat_s > 0 && self.topic.trim().is_empty() {
            return Err("config key `heartbeat.topic`: empty (set a topic or heartbeat_s = 0 to turn heartbeats off)".into());
        }
        Ok(())
    }

    pub fn interval(&self) -> Option<Duration> {
        (self.heartbeat_s > 0).then(|| Duration::from_secs(self.heartbeat_s))
    }
}

/// One beat, tagged by `kind`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Heartbeat {
    Agent(AgentBeat),
    Worker(WorkerBeat),
}

impl Heartbeat {
    /// The record key: `agent/<device>` or `worker/<id>`.
    pub fn key(&self) -> String {
        match self {
            Self::Agent(a) => format!("agent/{}", a.device),
            Self::Worker(w) => format!("worker/{}", w.id),
        }
    }

    pub fn at_ms(&self) -> u64 {
        match self {
            Self::Agent(a) => a.at_ms,
            Self::Worker(w) => w.at_ms,
        }
    }
}

/// An agent's beat.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AgentBeat {
    pub v: u32,
    pub device: String,
    /// framelink-agent's version.
    pub version: String,
    /// When the beat was made (Unix ms, the device's clock).
    pub at_ms: u64,
    /// Seconds between beats (a console calls a device stale after a few missed ones).
    pub interval_s: u64,
    pub uptime_s: u64,
    /// `up`, `down` or `draining` (the forwarder's link state).
    pub link: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_error: Option<String>,
    pub cameras: Vec<CameraBeat>,
    pub spool: SpoolBeat,
    pub process: ProcessBeat,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CameraBeat {
    pub id: String,
    /// `up`, `finished`, or what is wrong (`/healthz`'s camera text).
    pub state: String,
    /// Frames per second captured and acknowledged by Kafka since the last beat.
    pub fps_captured: f64,
    pub fps_sent: f64,
    /// The last sequence number captured, if any since the agent started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
    /// When the camera last delivered a frame (Unix ms); 0 = not since start.
    #[serde(default)]
    pub last_frame_ms: u64,
    /// Frames dropped since the agent started, by reason.
    #[serde(default)]
    pub dropped: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SpoolBeat {
    pub bytes: u64,
    pub records: u64,
    /// The cap now (max_bytes, or less while free disk space binds).
    pub cap_bytes: u64,
    pub max_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ProcessBeat {
    /// CPU time used since the last beat, in % of one core.
    pub cpu_percent: f64,
    pub rss_bytes: u64,
}

/// A worker's beat.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct WorkerBeat {
    pub v: u32,
    pub id: String,
    pub version: String,
    pub at_ms: u64,
    pub interval_s: u64,
    pub uptime_s: u64,
    /// `/healthz`'s status: `ok`, `starting`, `degraded`, `stopping`.
    pub status: String,
    pub group: String,
    /// `cpu`, or `gpu: <adapter>`.
    pub backend: String,
    pub pipeline: String,
    pub delivery: String,
    /// `topic[partition]` this member owns.
    pub partitions: Vec<String>,
    pub fps_in: f64,
    pub fps_out: f64,
    pub in_flight: u64,
    /// Records behind the ends of the assigned partitions.
    pub lag: i64,
    /// Dead letters since the worker started, by reason.
    #[serde(default)]
    pub dead_letters: BTreeMap<String, u64>,
    pub process: ProcessBeat,
}

/// Beats Kafka acknowledged and beats not delivered within their interval (each binary
/// registers them as `heartbeats_sent` / `heartbeats_failed`).
#[derive(Clone, Default)]
pub struct BeatCounts {
    pub sent: Counter,
    pub failed: Counter,
}

impl BeatCounts {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register("heartbeats_sent", "Heartbeats Kafka acknowledged (framelink-console's view of this process)", self.sent.clone());
        registry.register("heartbeats_failed", "Heartbeats not delivered within one interval (replaced by the next one)", self.failed.clone());
    }
}

pub struct BeatContext(BeatCounts);

impl ClientContext for BeatContext {}

impl ProducerContext for BeatContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.0.sent.inc(),
            Err((e, _)) => {
                tracing::debug!(error = %e, "Heartbeat not delivered (the next one replaces it).");
                self.0.failed.inc()
            }
        };
    }
}

/// Frames-per-second from a counter sampled at each beat.
#[derive(Default)]
pub struct Rate {
    last: Option<(Instant, u64)>,
}

impl Rate {
    /// The rate since the previous sample (0 at the first).
    pub fn sample(&mut self, now: Instant, total: u64) -> f64 {
        let rate = match self.last {
            Some((t, n)) if now > t => total.saturating_sub(n) as f64 / (now - t).as_secs_f64(),
            _ => 0.0,
        };
        self.last = Some((now, total));
        (rate * 100.0).round() / 100.0
    }
}

/// This process's CPU share and resident memory, from /proc (zeros where there is none).
#[derive(Default)]
pub struct ProcessSampler {
    last: Option<(Instant, f64)>,
}

impl ProcessSampler {
    pub fn sample(&mut self) -> ProcessBeat {
        let now = Instant::now();
        let cpu = cpu_seconds().unwrap_or(0.0);
        let percent = match self.last {
            Some((t, c)) if now > t => ((cpu - c) / (now - t).as_secs_f64() * 100.0).max(0.0),
            _ => 0.0,
        };
        self.last = Some((now, cpu));
        ProcessBeat { cpu_percent: (percent * 10.0).round() / 10.0, rss_bytes: rss_bytes().unwrap_or(0) }
    }
}

/// User + system CPU seconds of this process.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // /proc reports in USER_HZ, which the kernel ABI fixes at 100 on x86-64 and ARM.
    Some(ticks / 100.0)
}

fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Where beats go: the producer and its settings.
pub struct Beater {
    producer: ThreadedProducer<BeatContext>,
    topic: String,
    counts: BeatCounts,
}

impl Beater {
    /// A producer of its own (the frame path's producers never wait on a beat): no retries
    /// past one interval, no idempotence, acks from the leader only.
    pub fn new(mut config: ClientConfig, cfg: &HeartbeatConfig, counts: BeatCounts) -> Result<Self, rdkafka::error::KafkaError> {
        let timeout_ms = (cfg.heartbeat_s * 1000).clamp(1000, 60_000);
        config
            .set("message.timeout.ms", timeout_ms.to_string())
            .set("enable.idempotence", "false")
            .set("acks", "1")
            .set("linger.ms", "0")
            .set("queue.buffering.max.messages", "16")
            .set("compression.type", "none");
        let producer = config.create_with_context(BeatContext(counts.clone()))?;
        Ok(Self { producer, topic: cfg.topic.clone(), counts })
    }

    /// Hands one beat to Kafka (a full local queue counts as failed).
    pub fn send(&self, beat: &Heartbeat) {
        let key = beat.key();
        let value = serde_json::to_vec(beat).expect("a heartbeat serializes");
        let headers = OwnedHeaders::new().insert(Header { key: "framelink-heartbeat", value: Some("1") });
        let record = BaseRecord::to(&self.topic).key(&key).payload(&value).headers(headers);
        if let Err((e, _)) = self.producer.send(record) {
            tracing::debug!(error = %e, "Heartbeat not queued.");
            self.counts.failed.inc();
        }
    }

    /// Runs on a thread of its own: a beat from `make` every interval until `shutdown`.
    pub fn spawn(self, interval: Duration, shutdown: Shutdown, mut make: impl FnMut() -> Heartbeat + Send + 'static) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new().name("heartbeat".into()).spawn(move || {
            loop {
                self.send(&make());
                if shutdown.wait_timeout(interval) {
                    break;
                }
            }
            let _ = crate::flush::flush(&self.producer, Duration::from_millis(500));
        })
    }
}

/// Unix ms now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beats_round_trip_with_their_kind() {
        let beat = Heartbeat::Agent(AgentBeat { v: VERSION, device: "drone-7".into(), link: "up".into(), cameras: vec![CameraBeat { id: "front".into(), state: "up".into(), last_seq: Some(41), ..Default::default() }], ..Default::default() });
        let json = serde_json::to_value(&beat).unwrap();
        assert_eq!(json["kind"], "agent");
        assert_eq!(json["cameras"][0]["last_seq"], 41);
        assert_eq!(serde_json::from_value::<Heartbeat>(json).unwrap(), beat);
        assert_eq!(beat.key(), "agent/drone-7");
        let w = Heartbeat::Worker(WorkerBeat { id: "w-1".into(), ..Default::default() });
        assert_eq!(serde_json::to_value(&w).unwrap()["kind"], "worker");
        assert_eq!(w.key(), "worker/w-1");
    }

    #[test]
    fn rates_come_from_counter_deltas() {
        let mut r = Rate::default();
        let t0 = Instant::now();
        assert_eq!(r.sample(t0, 100), 0.0);
        assert_eq!(r.sample(t0 + Duration::from_secs(2), 130), 15.0);
        // A counter that went back (a restart) gives 0, not a huge number.
        assert_eq!(r.sample(t0 + Duration::from_secs(3), 10), 0.0);
    }

    #[test]
    fn the_process_sampler_reads_this_process() {
        let mut s = ProcessSampler::default();
        let first = s.sample();
        assert!(first.rss_bytes > 1 << 20, "rss {}", first.rss_bytes);
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let second = s.sample();
        assert!(second.cpu_percent > 0.0, "{second:?}");
    }

    #[test]
    fn config_is_validated() {
        assert!(HeartbeatConfig::default().validate().is_ok());
        let e = HeartbeatConfig { heartbeat_s: 7200, ..Default::default() }.validate().unwrap_err();
        assert!(e.contains("heartbeat.heartbeat_s"), "{e}");
        let e = HeartbeatConfig { topic: " ".into(), ..Default::default() }.validate().unwrap_err();
        assert!(e.contains("heartbeat.topic"), "{e}");
        assert_eq!(HeartbeatConfig { heartbeat_s: 0, ..Default::default() }.interval(), None);
    }
}
