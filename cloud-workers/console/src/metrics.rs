//! The console's Prometheus metrics (prefix `framelink_console_`): the fleet as gauges, for
//! those who alert from Prometheus (deploy/monitoring/alerts.yml) — edge devices usually
//! cannot be scraped, their heartbeats can be read here. Refreshed from the fleet state at
//! each scrape.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use framelink_common::metrics::{Labels, labels};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::state::{Counts, Fleet, Status};

type FGauge = Gauge<f64, AtomicU64>;

pub struct ConsoleMetrics {
    registry: Registry,
    devices: Family<Labels, Gauge>,
    workers: Family<Labels, Gauge>,
    cameras: Family<Labels, Gauge>,
    device_age: Family<Labels, FGauge>,
    device_fill: Family<Labels, FGauge>,
    device_dropped: Family<Labels, Gauge>,
    camera_fps: Family<Labels, FGauge>,
    worker_age: Family<Labels, FGauge>,
    lag: Family<Labels, Gauge>,
    dead_letters: Family<Labels, Counter>,
    heartbeats: Counter,
    heartbeats_invalid: Counter,
    results: Counter,
    results_invalid: Counter,
    events: Counter,
    pub sse_clients: Gauge,
    /// Large-image jobs: counted by the results reader, by status and memory held at scrape.
    pub job_counters: crate::jobs::state::JobCounters,
    jobs: Family<Labels, Gauge>,
    jobs_held_bytes: Gauge,
    last: Mutex<(Counts, std::collections::BTreeMap<String, u64>)>,
}

impl ConsoleMetrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("framelink_console");
        let m = Self {
            registry: Registry::default(),
            devices: Family::default(),
            workers: Family::default(),
            cameras: Family::default(),
            device_age: Family::default(),
            device_fill: Family::default(),
            device_dropped: Family::default(),
            camera_fps: Family::default(),
            worker_age: Family::default(),
            lag: Family::default(),
            dead_letters: Family::default(),
            heartbeats: Counter::default(),
            heartbeats_invalid: Counter::default(),
            results: Counter::default(),
            results_invalid: Counter::default(),
            events: Counter::default(),
            sse_clients: Gauge::default(),
            job_counters: Default::default(),
            jobs: Family::default(),
            jobs_held_bytes: Gauge::default(),
            last: Mutex::default(),
        };
        r.register("devices", "Devices by status (live, stale, offline)", m.devices.clone());
        r.register("workers", "Workers by status (live, stale, offline)", m.workers.clone());
        r.register("cameras", "Cameras by status (live, stale, offline)", m.cameras.clone());
        r.register("device_heartbeat_age_seconds", "Seconds since the device's last heartbeat was made", m.device_age.clone());
        r.register("device_spool_fill_ratio", "Spool bytes / the spool's cap, by device", m.device_fill.clone());
        r.register("device_dropped_frames", "Frames the device's agent dropped since it started, by reason (from its heartbeat)", m.device_dropped.clone());
        r.register("camera_fps", "Frames per second Kafka acknowledged, by camera (from heartbeats)", m.camera_fps.clone());
        r.register("worker_heartbeat_age_seconds", "Seconds since the worker's last heartbeat was made", m.worker_age.clone());
        r.register("consumer_lag", "The workers' group: records behind the end, by partition (measured by the console)", m.lag.clone());
        r.register("dead_letters", "Dead letters read from the DLQ topic since the console started, by reason", m.dead_letters.clone());
        r.register("heartbeats", "Heartbeats read", m.heartbeats.clone());
        r.register("heartbeats_invalid", "Heartbeats that did not parse (ignored)", m.heartbeats_invalid.clone());
        r.register("results", "Result records read", m.results.clone());
        r.register("results_invalid", "Result records without device/camera headers (ignored)", m.results_invalid.clone());
        r.register("events", "Motion events read", m.events.clone());
        r.register("sse_clients", "Pages connected to the live stream", m.sse_clients.clone());
        r.register("jobs", "Large-image jobs held, by status (queuing, running, done, failed, cancelled)", m.jobs.clone());
        r.register("jobs_held_bytes", "Memory of the stitched images of the jobs held", m.jobs_held_bytes.clone());
        r.register("job_tiles_stitched", "Tile results stitched into their job's image", m.job_counters.stitched.clone());
        r.register("job_tiles_failed", "Tiles a worker reported failed (their job fails, naming them)", m.job_counters.failed.clone());
        r.register("job_tile_duplicates", "Tile results seen before (redelivered), ignored", m.job_counters.duplicates.clone());
        r.register("job_record_writes_failed", "Job records (state, tombstones) Kafka did not take; a restart would read the job's previous state", m.job_counters.record_writes_failed.clone());
        r.register("job_records_ignored", "Job records read back at start that do not parse or cannot be right (those jobs are not restored)", m.job_counters.records_ignored.clone());
        r.register("job_results_ignored", "Tile results ignored, by reason (unknown_job: expired or another console's; job_over: cancelled; bad_result: does not fit its job)", m.job_counters.ignored.clone());
        Self { registry: r, ..m }
    }

    /// Refreshes the jobs' gauges (before `render`).
    pub fn set_jobs(&self, jobs: &crate::jobs::state::Jobs) {
        for (status, n) in jobs.status_counts() {
            self.jobs.get_or_create(&labels(&[("status", status)])).set(n as i64);
        }
        self.jobs_held_bytes.set(jobs.held_bytes() as i64);
    }

    /// The text exposition, refreshed from `fleet` at `now_ms`.
    pub fn render(&self, fleet: &Fleet, now_ms: u64) -> String {
        let counts = fleet.status_counts(now_ms);
        for (family, c) in [(&self.devices, counts[0]), (&self.workers, counts[1]), (&self.cameras, counts[2])] {
            for s in Status::ALL {
                family.get_or_create(&labels(&[("state", s.as_str())])).set(c[s as usize] as i64);
            }
        }
        self.device_age.clear();
        self.device_fill.clear();
        self.device_dropped.clear();
        for (d, age, fill, drops) in fleet.device_figures(now_ms) {
            self.device_age.get_or_create(&labels(&[("device", &d)])).set(age);
            self.device_fill.get_or_create(&labels(&[("device", &d)])).set(fill);
            for (reason, n) in drops {
                self.device_dropped.get_or_create(&labels(&[("device", &d), ("reason", &reason)])).set(n as i64);
            }
        }
        self.camera_fps.clear();
        for (d, c, fps) in fleet.camera_fps() {
            self.camera_fps.get_or_create(&labels(&[("device", &d), ("camera", &c)])).set(fps);
        }
        self.worker_age.clear();
        for (w, age) in fleet.worker_ages(now_ms) {
            self.worker_age.get_or_create(&labels(&[("worker", &w)])).set(age);
        }
        self.lag.clear();
        if let Some(p) = fleet.latest_lag(now_ms) {
            for (tp, lag) in &p.partitions {
                let (topic, partition) = tp.rsplit_once('[').map(|(t, p)| (t, p.trim_end_matches(']'))).unwrap_or((tp, ""));
                self.lag.get_or_create(&labels(&[("topic", topic), ("partition", partition)])).set(*lag);
            }
        }
        {
            let mut last = self.last.lock().expect("metrics lock");
            let now = &fleet.counts;
            self.heartbeats.inc_by(now.heartbeats - last.0.heartbeats);
            self.heartbeats_invalid.inc_by(now.heartbeats_invalid - last.0.heartbeats_invalid);
            self.results.inc_by(now.results - last.0.results);
            self.results_invalid.inc_by(now.results_invalid - last.0.results_invalid);
            self.events.inc_by(now.events - last.0.events);
            for (reason, n) in fleet.dead_letters_by_reason() {
                let before = last.1.get(reason).copied().unwrap_or(0);
                self.dead_letters.get_or_create(&labels(&[("reason", reason)])).inc_by(n - before);
                last.1.insert(reason.clone(), *n);
            }
            last.0 = now.clone();
        }
        framelink_common::metrics::render(&self.registry)
    }
}

impl Default for ConsoleMetrics {
    fn default() -> Self {
        Self::new()
    }
}
