//! The agent's Prometheus metrics, and the shared state `/healthz` reports.
//!
//! Every drop is a counter with a reason, so "frames missing in Kafka" can always be
//! explained: `captured = sent + spooled-now + dropped(all reasons)` per camera.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use framelink_common::metrics::{Labels, labels};
use prometheus_client::registry::Registry;

use crate::drop_reason::DropReason;

type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms … ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// What the link to Kafka looks like from the forwarder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Frames go straight to Kafka.
    Up,
    /// Deliveries fail or the brokers are unreachable: frames go to the spool.
    Down,
    /// Deliveries succeed and the spool is being drained.
    Draining,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
            Self::Draining => "draining",
        }
    }
}

pub struct Metrics {
    pub registry: Registry,
    pub captured: Family<Labels, Counter>,
    pub encoded: Family<Labels, Counter>,
    pub sent: Family<Labels, Counter>,
    pub spooled: Family<Labels, Counter>,
    pub dropped: Family<Labels, Counter>,
    pub spool_records: Gauge,
    pub spool_bytes: Gauge,
    pub spool_damaged: Gauge,
    pub spool_damaged_pruned: Gauge,
    pub spool_cap_bytes: Gauge,
    pub spool_index_rebuilt: Gauge,
    pub spool_written_bytes: Counter,
    pub producer_recreated: Counter,
    pub link_stalls: Counter,
    pub link_up: Gauge,
    /// Frames handed to Kafka and not yet acknowledged (a bulk source waits above a bound).
    pub frames_in_flight: Gauge,
    pub link_state: Family<Labels, Gauge>,
    pub camera_up: Family<Labels, Gauge>,
    pub camera_reconnects: Family<Labels, Counter>,
    pub camera_received: Family<Labels, Gauge>,
    pub camera_decoded: Family<Labels, Gauge>,
    pub camera_undecodable: Family<Labels, Gauge>,
    pub camera_last_frame: Family<Labels, Gauge>,
    pub encode_seconds: HistogramFamily,
    pub delivery_seconds: HistogramFamily,
    /// For /healthz.
    pub health: Mutex<Health>,
    /// Unix ms of the forwarder's last loop turn (the systemd watchdog checks it).
    pub heartbeat: Arc<framelink_common::systemd::Heartbeat>,
    /// Heartbeats to framelink-console sent and failed.
    pub beats: framelink_common::heartbeat::BeatCounts,
}

/// State for `/healthz` that is not a plain number.
#[derive(Clone, Debug)]
pub struct Health {
    pub link: LinkState,
    pub link_error: Option<String>,
    pub cameras: BTreeMap<String, String>,
    pub spool_max_bytes: u64,
    /// The last spool I/O error (disk full, read-only, permissions) while it lasts; `None`
    /// once the spool works again.
    pub spool_error: Option<String>,
    /// Each camera's last sequence number captured since start (heartbeats).
    pub last_seq: BTreeMap<String, u64>,
}

impl Metrics {
    pub fn new(spool_max_bytes: u64) -> Arc<Self> {
        let mut registry = Registry::with_prefix("framelink_agent");
        let m = Self {
            captured: Family::default(),
            encoded: Family::default(),
            sent: Family::default(),
            spooled: Family::default(),
            dropped: Family::default(),
            spool_records: Gauge::default(),
            spool_bytes: Gauge::default(),
            spool_damaged: Gauge::default(),
            spool_damaged_pruned: Gauge::default(),
            spool_cap_bytes: Gauge::default(),
            spool_index_rebuilt: Gauge::default(),
            spool_written_bytes: Counter::default(),
            producer_recreated: Counter::default(),
            link_stalls: Counter::default(),
            link_up: Gauge::default(),
            frames_in_flight: Gauge::default(),
            link_state: Family::default(),
            camera_up: Family::default(),
            camera_reconnects: Family::default(),
            camera_received: Family::default(),
            camera_decoded: Family::default(),
            camera_undecodable: Family::default(),
            camera_last_frame: Family::default(),
            encode_seconds: Family::new_with_constructor(latency_histogram),
            delivery_seconds: Family::new_with_constructor(latency_histogram),
            health: Mutex::new(Health {
                link: LinkState::Up,
                link_error: None,
                cameras: BTreeMap::new(),
                spool_max_bytes,
                spool_error: None,
                last_seq: BTreeMap::new(),
            }),
            heartbeat: Arc::default(),
            beats: Default::default(),
            registry: Registry::default(),
        };
        registry.register("frames_captured", "Frames captured, by camera", m.captured.clone());
        registry.register("frames_encoded", "Frames encoded (or passed through), by camera", m.encoded.clone());
        registry.register("frames_sent", "Frames acknowledged by Kafka, by camera", m.sent.clone());
        registry.register("frames_spooled", "Frames written to the spool, by camera and reason", m.spooled.clone());
        registry.register("frames_dropped", "Frames lost on purpose, by camera and reason", m.dropped.clone());
        registry.register("spool_records", "Frames in the spool", m.spool_records.clone());
        registry.register("spool_bytes", "Disk space the spool occupies (bytes)", m.spool_bytes.clone());
        registry.register("spool_damaged", "Damaged spool records or indexes found since start", m.spool_damaged.clone());
        registry.register("spool_damaged_pruned", "Damaged files deleted from spool.dir/damaged/ to keep it within 1/8 of max_bytes", m.spool_damaged_pruned.clone());
        registry.register("spool_cap_bytes", "The spool's cap now: max_bytes, or less while the disk's free space above min_free_bytes binds", m.spool_cap_bytes.clone());
        registry.register("spool_index_rebuilt", "Spool indexes rebuilt from the frame files while running (sled refused writes after an I/O error)", m.spool_index_rebuilt.clone());
        registry.register("spool_written_bytes", "Frame bytes written to the spool since start", m.spool_written_bytes.clone());
        registry.register("producer_recreated", "Kafka producers replaced after a fatal librdkafka error", m.producer_recreated.clone());
        registry.register("link_stalls", "Times the Kafka link was judged stalled: no acknowledgement for forwarder.stall_timeout_ms while frames waited", m.link_stalls.clone());
        registry.register("link_up", "1 when frames go straight to Kafka", m.link_up.clone());
        registry.register("frames_in_flight", "Frames handed to Kafka and not yet acknowledged or spooled", m.frames_in_flight.clone());
        registry.register("link_state", "1 for the current link state (up, down, draining)", m.link_state.clone());
        registry.register("camera_up", "1 while the camera delivers frames", m.camera_up.clone());
        registry.register("camera_reconnects", "Times a camera's stream was lost while running and the camera re-opened", m.camera_reconnects.clone());
        registry.register("camera_frames_received", "Frames a stream camera (RTSP) sent, or samples read from a video file, since the agent started, handed over or not", m.camera_received.clone());
        registry.register("camera_frames_decoded", "Frames of a stream camera (RTSP H.264) or video file fed to the decoder since the agent started", m.camera_decoded.clone());
        registry.register("camera_frames_undecodable", "Frames of a stream camera or video file that could not be decoded (never handed over)", m.camera_undecodable.clone());
        registry.register("camera_last_frame_unix_seconds", "When the camera last delivered a frame (Unix time; age = now - this)", m.camera_last_frame.clone());
        registry.register("encode_seconds", "Time to encode one frame", m.encode_seconds.clone());
        registry.register("delivery_seconds", "Capture to Kafka acknowledgement", m.delivery_seconds.clone());
        m.beats.register(&mut registry);
        Arc::new(Self { registry, ..m })
    }

    pub fn inc(&self, family: &Family<Labels, Counter>, camera: &str) {
        family.get_or_create(&labels(&[("camera", camera)])).inc();
    }

    /// Counts `n` frames of `camera` lost on purpose (`frames_dropped{camera,reason}`).
    pub fn count_drop(&self, camera: &str, reason: DropReason, n: u64) {
        self.add_reason(&self.dropped, camera, reason.as_str(), n);
    }

    pub fn add_reason(&self, family: &Family<Labels, Counter>, camera: &str, reason: &str, n: u64) {
        family.get_or_create(&labels(&[("camera", camera), ("reason", reason)])).inc_by(n);
    }

    pub fn observe(&self, family: &HistogramFamily, camera: &str, seconds: f64) {
        family.get_or_create(&labels(&[("camera", camera)])).observe(seconds);
    }

    pub fn set_link(&self, state: LinkState, error: Option<String>) {
        for s in [LinkState::Up, LinkState::Down, LinkState::Draining] {
            self.link_state.get_or_create(&labels(&[("state", s.as_str())])).set((s == state) as i64);
        }
        self.link_up.set((state == LinkState::Up) as i64);
        let mut h = self.health.lock().expect("health lock");
        h.link = state;
        h.link_error = error;
    }

    /// The link's state as the forwarder last set it.
    pub fn link(&self) -> LinkState {
        self.health.lock().expect("health lock").link
    }

    pub fn set_spool_error(&self, error: Option<String>) {
        self.health.lock().expect("health lock").spool_error = error;
    }

    /// A stream camera's totals so far.
    pub fn stream_counts(&self, camera: &str, c: crate::source::StreamCounts) {
        self.camera_received.get_or_create(&labels(&[("camera", camera)])).set(c.received as i64);
        self.camera_decoded.get_or_create(&labels(&[("camera", camera)])).set(c.decoded as i64);
        self.camera_undecodable.get_or_create(&labels(&[("camera", camera)])).set(c.undecodable as i64);
    }

    /// The camera delivered frame `seq`, captured at `capture_ns`.
    pub fn last_frame(&self, camera: &str, seq: u64, capture_ns: u64) {
        self.camera_last_frame.get_or_create(&labels(&[("camera", camera)])).set((capture_ns / 1_000_000_000) as i64);
        self.health.lock().expect("health lock").last_seq.insert(camera.to_owned(), seq);
    }

    pub fn set_camera(&self, camera: &str, up: bool, detail: &str) {
        self.camera_up.get_or_create(&labels(&[("camera", camera)])).set(up as i64);
        self.health.lock().expect("health lock").cameras.insert(camera.to_owned(), detail.to_owned());
    }

    /// The camera's state as `/healthz` shows it.
    pub fn camera_state(&self, camera: &str) -> Option<String> {
        self.health.lock().expect("health lock").cameras.get(camera).cloned()
    }

    pub fn beat(&self) {
        self.heartbeat.beat();
    }

    /// Sum of every sample of a counter family (`frames_sent`, ...), for log summaries.
    pub fn total(&self, name: &str) -> u64 {
        let prefix = format!("framelink_agent_{name}_total");
        self.render()
            .lines()
            .filter(|l| l.split(['{', ' ']).next() == Some(prefix.as_str()))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        framelink_common::metrics::render(&self.registry)
    }
}
