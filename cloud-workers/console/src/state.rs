//! The fleet as the console knows it: devices and workers from their last heartbeat, cameras
//! from beats and results, the workers' lag over the chart window, dead letters and motion
//! events — kept in memory, rebuilt from Kafka at start (the heartbeats topic is compacted).
//!
//! Everything that changes gets the fleet's next `version`, so the live stream sends a client
//! only what changed since the version it has (no full-state pushes). Statuses move with time
//! alone (a device stops beating); [`Fleet::tick`] recomputes them and bumps what changed.
//!
//! Status rule (devices, workers): `live` while the last beat is younger than
//! `stale_after_beats` of its own intervals, `stale` until `offline_after_s`, then `offline`.
//! Age is by the beat's own clock (`at_ms`), so a beat that arrives late is never shown as
//! live. A camera is `live` when its device is live, its state is `up` and it delivered a frame
//! within the same window; `offline` with its device; otherwise `stale`.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;
use framelink_common::heartbeat::{AgentBeat, CameraBeat, Heartbeat, WorkerBeat};
use serde::Serialize;
use serde_json::{Value, json};

/// What the fleet's statuses depend on.
#[derive(Clone, Debug)]
pub struct Rules {
    pub stale_after_beats: u32,
    pub offline_after_ms: u64,
    pub forget_after_ms: u64,
    pub recent: usize,
    pub thumb_refresh_ms: u64,
    pub lag_window_ms: u64,
    /// Samples further apart than 3 of these leave the lag gauges empty (not frozen).
    pub lag_interval_ms: u64,
}

impl Rules {
    pub fn from_config(c: &crate::config::ConsoleConfig) -> Self {
        Self {
            stale_after_beats: c.console.stale_after_beats,
            offline_after_ms: c.console.offline_after_s * 1000,
            forget_after_ms: c.console.forget_after_s * 1000,
            recent: c.console.recent,
            thumb_refresh_ms: c.console.thumbnail_refresh_s * 1000,
            lag_window_ms: c.lag.window_s * 1000,
            lag_interval_ms: c.lag.interval_s * 1000,
        }
    }

    fn status(&self, now_ms: u64, seen_ms: u64, interval_s: u64) -> Status {
        let age = now_ms.saturating_sub(seen_ms);
        // One second of slack: a beat is made, sent and read within it.
        let stale_after = (self.stale_after_beats as u64).saturating_mul(interval_s.clamp(1, MAX_INTERVAL_S) * 1000).saturating_add(1000);
        if age <= stale_after {
            Status::Live
        } else if age <= self.offline_after_ms.max(stale_after) {
            Status::Stale
        } else {
            Status::Offline
        }
    }
}

/// Longest heartbeat interval a beat may claim (the agents' and workers' own limit): a larger
/// one would keep a dead device live for days.
pub const MAX_INTERVAL_S: u64 = 3600;

/// Tombstones kept for pages that were told about an entity before it left the view.
const MAX_TOMBSTONES: usize = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Live,
    Stale,
    Offline,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Stale => "stale",
            Self::Offline => "offline",
        }
    }
    pub const ALL: [Status; 3] = [Status::Live, Status::Stale, Status::Offline];
}

struct Device {
    beat: AgentBeat,
    status: Status,
    changed: u64,
}

struct Worker {
    beat: WorkerBeat,
    status: Status,
    changed: u64,
}

/// The latest result image of a camera (thumbnails are made from it on request).
#[derive(Clone)]
pub struct Latest {
    pub seq: u64,
    pub capture_ns: u64,
    pub received_ms: u64,
    pub width: u32,
    pub height: u32,
    pub pipeline: String,
    pub worker: String,
    pub latency_ms: Option<u64>,
    pub jpeg: Bytes,
}

/// The result a page was last told about (its thumbnail URL carries `seq`).
#[derive(Clone)]
struct Shown {
    seq: u64,
    capture_ms: u64,
    received_ms: u64,
    width: u32,
    height: u32,
    latency_ms: Option<u64>,
    pipeline: String,
    worker: String,
}

impl Shown {
    fn of(l: &Latest) -> Self {
        Self { seq: l.seq, capture_ms: l.capture_ns / 1_000_000, received_ms: l.received_ms, width: l.width, height: l.height, latency_ms: l.latency_ms, pipeline: l.pipeline.clone(), worker: l.worker.clone() }
    }
}

#[derive(Default)]
struct Camera {
    beat: Option<CameraBeat>,
    latest: Option<Latest>,
    announced: Option<Shown>,
    announced_ms: u64,
    /// Version of the last announcement (sent compactly, apart from the camera's other fields).
    announced_v: u64,
    /// Version of the last beat that changed only the camera's figures (sent compactly too).
    beat_v: u64,
    status: Option<Status>,
    changed: u64,
}

/// A result's metadata, from its headers.
pub struct ResultMeta {
    pub device: String,
    pub camera: String,
    pub seq: u64,
    pub capture_ns: u64,
    pub width: u32,
    pub height: u32,
    pub pipeline: String,
    pub worker: String,
    pub latency_ms: Option<u64>,
}

#[derive(Clone, Serialize)]
pub struct DeadLetter {
    pub v: u64,
    pub at_ms: u64,
    pub reason: String,
    pub detail: String,
    pub source: String,
    pub worker: String,
    pub key: String,
}

#[derive(Clone, Serialize)]
pub struct MotionEvent {
    pub v: u64,
    pub at_ms: u64,
    pub device: String,
    pub camera: String,
    pub event: Value,
}

/// One lag sample: per `topic[partition]`, records behind the end.
#[derive(Clone, Serialize)]
pub struct LagPoint {
    pub v: u64,
    pub at_ms: u64,
    pub total: i64,
    pub partitions: BTreeMap<String, i64>,
}

/// Counters since the console started (exported on /metrics and /healthz).
#[derive(Default, Clone, Serialize)]
pub struct Counts {
    pub heartbeats: u64,
    pub heartbeats_invalid: u64,
    pub results: u64,
    pub results_invalid: u64,
    pub events: u64,
    pub dead_letters: u64,
}

pub struct Fleet {
    rules: Rules,
    version: u64,
    devices: BTreeMap<String, Device>,
    workers: BTreeMap<String, Worker>,
    cameras: BTreeMap<(String, String), Camera>,
    /// Entities that left the view: (kind, id) → the version they left at. An entity that
    /// comes back loses its tombstone.
    removed: HashMap<(&'static str, String), u64>,
    dlq_by_reason: BTreeMap<String, u64>,
    dlq_changed: u64,
    dead_letters: VecDeque<DeadLetter>,
    events: VecDeque<MotionEvent>,
    lag: VecDeque<LagPoint>,
    lag_error: Option<String>,
    pub counts: Counts,
}

impl Fleet {
    pub fn new(rules: Rules) -> Self {
        Self {
            rules,
            version: 0,
            devices: BTreeMap::new(),
            workers: BTreeMap::new(),
            cameras: BTreeMap::new(),
            removed: HashMap::new(),
            dlq_by_reason: BTreeMap::new(),
            dlq_changed: 0,
            dead_letters: VecDeque::new(),
            events: VecDeque::new(),
            lag: VecDeque::new(),
            lag_error: None,
            counts: Counts::default(),
        }
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    fn next(&mut self) -> u64 {
        self.version += 1;
        self.version
    }

    fn tombstone(&mut self, kind: &'static str, id: String, v: u64) {
        self.removed.insert((kind, id), v);
        if self.removed.len() > MAX_TOMBSTONES
            && let Some(oldest) = self.removed.iter().min_by_key(|(_, v)| **v).map(|(k, _)| k.clone())
        {
            // A page that missed this one reconnects to a full snapshot sooner or later.
            self.removed.remove(&oldest);
        }
    }

    fn revive(&mut self, kind: &'static str, id: &str) {
        if !self.removed.is_empty() {
            self.removed.remove(&(kind, id.to_owned()));
        }
    }

    /// A heartbeat record's value; `now_ms` is the console's clock. A beat that does not parse
    /// is counted (`heartbeats_invalid`) and returns the error.
    pub fn heartbeat(&mut self, value: &[u8], now_ms: u64) -> Result<(), String> {
        let beat: Heartbeat = match serde_json::from_slice(value) {
            Ok(b) => b,
            Err(e) => {
                self.counts.heartbeats_invalid += 1;
                return Err(e.to_string());
            }
        };
        let v_beat = match &beat {
            Heartbeat::Agent(a) => a.v,
            Heartbeat::Worker(w) => w.v,
        };
        if v_beat > framelink_common::heartbeat::VERSION {
            self.counts.heartbeats_invalid += 1;
            return Err(format!("heartbeat version {v_beat} is newer than this console reads ({}): upgrade the console", framelink_common::heartbeat::VERSION));
        }
        self.counts.heartbeats += 1;
        let v = self.next();
        match beat {
            Heartbeat::Agent(mut a) => {
                // A device clock ahead of ours must not make a device look live forever.
                a.at_ms = a.at_ms.min(now_ms);
                a.interval_s = a.interval_s.clamp(1, MAX_INTERVAL_S);
                // An older beat read after a newer one (never within a partition) is ignored.
                if self.devices.get(&a.device).is_some_and(|d| d.beat.at_ms > a.at_ms) {
                    return Ok(());
                }
                let status = self.rules.status(now_ms, a.at_ms, a.interval_s);
                for c in &mut a.cameras {
                    c.last_frame_ms = c.last_frame_ms.min(now_ms);
                    let key = (a.device.clone(), c.id.clone());
                    if !self.cameras.contains_key(&key) {
                        self.revive("camera", &format!("{}/{}", key.0, key.1));
                    }
                    let cam = self.cameras.entry(key).or_default();
                    // A new state or new drops change the card; fps and frame times alone go
                    // compactly.
                    match &cam.beat {
                        Some(b) if b.state == c.state && b.dropped == c.dropped => cam.beat_v = v,
                        _ => cam.changed = v,
                    }
                    cam.beat = Some(c.clone());
                }
                // Cameras the agent no longer has (taken out of its config) leave the view.
                let gone: Vec<(String, String)> = self
                    .cameras
                    .iter()
                    .filter(|((d, c), cam)| *d == a.device && cam.beat.is_some() && !a.cameras.iter().any(|b| b.id == *c))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in gone {
                    self.cameras.remove(&k);
                    self.tombstone("camera", format!("{}/{}", k.0, k.1), v);
                }
                if !self.devices.contains_key(&a.device) {
                    self.revive("device", &a.device);
                }
                self.devices.insert(a.device.clone(), Device { beat: a, status, changed: v });
            }
            Heartbeat::Worker(mut w) => {
                w.at_ms = w.at_ms.min(now_ms);
                w.interval_s = w.interval_s.clamp(1, MAX_INTERVAL_S);
                if !self.workers.contains_key(&w.id) {
                    self.revive("worker", &w.id);
                }
                if self.workers.get(&w.id).is_some_and(|x| x.beat.at_ms > w.at_ms) {
                    return Ok(());
                }
                let status = self.rules.status(now_ms, w.at_ms, w.interval_s);
                self.workers.insert(w.id.clone(), Worker { beat: w, status, changed: v });
            }
        }
        Ok(())
    }

    /// A result image arrived. The page hears of it at most every `thumbnail_refresh_s` per
    /// camera ([`Fleet::tick`] announces the ones held back).
    pub fn result(&mut self, meta: ResultMeta, jpeg: Bytes, now_ms: u64) {
        self.counts.results += 1;
        let refresh = self.rules.thumb_refresh_ms;
        let key = (meta.device, meta.camera);
        let known = self.cameras.contains_key(&key);
        if !known {
            self.revive("camera", &format!("{}/{}", key.0, key.1));
        }
        self.version += 1;
        let v = self.version;
        let cam = self.cameras.entry(key).or_default();
        if !known {
            // A camera known from results only: its entry reaches the pages once in full.
            cam.changed = v;
        }
        if cam.latest.as_ref().is_some_and(|l| l.seq > meta.seq && l.capture_ns > meta.capture_ns) {
            // An older frame (a redelivery after a rebalance) does not replace a newer one.
            return;
        }
        cam.latest = Some(Latest {
            seq: meta.seq,
            capture_ns: meta.capture_ns,
            received_ms: now_ms,
            width: meta.width,
            height: meta.height,
            pipeline: meta.pipeline,
            worker: meta.worker,
            latency_ms: meta.latency_ms,
            jpeg,
        });
        if now_ms.saturating_sub(cam.announced_ms) >= refresh {
            cam.announced = cam.latest.as_ref().map(Shown::of);
            cam.announced_ms = now_ms;
            cam.announced_v = v;
        }
    }

    pub fn result_invalid(&mut self) {
        self.counts.results_invalid += 1;
    }

    /// The latest result of a camera (for its thumbnail).
    pub fn latest(&self, device: &str, camera: &str) -> Option<Latest> {
        self.cameras.get(&(device.to_owned(), camera.to_owned()))?.latest.clone()
    }

    pub fn event(&mut self, device: String, camera: String, at_ms: u64, event: Value) {
        self.counts.events += 1;
        let v = self.next();
        self.events.push_back(MotionEvent { v, at_ms, device, camera, event });
        while self.events.len() > self.rules.recent {
            self.events.pop_front();
        }
    }

    pub fn dead_letter(&mut self, mut d: DeadLetter) {
        self.counts.dead_letters += 1;
        let v = self.next();
        d.v = v;
        *self.dlq_by_reason.entry(d.reason.clone()).or_default() += 1;
        self.dlq_changed = v;
        self.dead_letters.push_back(d);
        while self.dead_letters.len() > self.rules.recent {
            self.dead_letters.pop_front();
        }
    }

    pub fn dead_letters_by_reason(&self) -> &BTreeMap<String, u64> {
        &self.dlq_by_reason
    }

    pub fn lag_sample(&mut self, at_ms: u64, partitions: BTreeMap<String, i64>) {
        let v = self.next();
        let total = partitions.values().sum();
        self.lag.push_back(LagPoint { v, at_ms, total, partitions });
        let window = self.rules.lag_window_ms;
        while self.lag.front().is_some_and(|p| at_ms.saturating_sub(p.at_ms) > window) {
            self.lag.pop_front();
        }
        self.lag_error = None;
    }

    pub fn lag_failed(&mut self, error: String) {
        if self.lag_error.as_ref() != Some(&error) {
            self.lag_error = Some(error);
            self.dlq_changed = self.next();
        }
    }

    /// The latest lag sample if it is current: none while sampling fails or its newest sample
    /// is older than three intervals (so gauges and alerts never run on a frozen value).
    pub fn latest_lag(&self, now_ms: u64) -> Option<&LagPoint> {
        let p = self.lag.back()?;
        (self.lag_error.is_none() && now_ms.saturating_sub(p.at_ms) <= 3 * self.rules.lag_interval_ms.max(1000)).then_some(p)
    }

    /// Recomputes statuses at `now_ms`, bumps what changed, announces held-back results and
    /// forgets entities silent past `forget_after_s`.
    pub fn tick(&mut self, now_ms: u64) {
        let rules = self.rules.clone();
        let mut bumped = Vec::new();
        let mut forget = Vec::new();
        for (id, d) in &self.devices {
            let s = rules.status(now_ms, d.beat.at_ms, d.beat.interval_s);
            if now_ms.saturating_sub(d.beat.at_ms) > rules.forget_after_ms {
                forget.push(("device", id.clone()));
            } else if s != d.status {
                bumped.push(("device", id.clone()));
            }
        }
        for (id, w) in &self.workers {
            let s = rules.status(now_ms, w.beat.at_ms, w.beat.interval_s);
            if now_ms.saturating_sub(w.beat.at_ms) > rules.forget_after_ms {
                forget.push(("worker", id.clone()));
            } else if s != w.status {
                bumped.push(("worker", id.clone()));
            }
        }
        for (kind, id) in bumped {
            let v = self.next();
            if kind == "device" {
                let d = self.devices.get_mut(&id).expect("listed above");
                d.status = rules.status(now_ms, d.beat.at_ms, d.beat.interval_s);
                d.changed = v;
            } else {
                let w = self.workers.get_mut(&id).expect("listed above");
                w.status = rules.status(now_ms, w.beat.at_ms, w.beat.interval_s);
                w.changed = v;
            }
        }
        for (kind, id) in forget {
            let v = self.next();
            if kind == "device" {
                self.devices.remove(&id);
                let cams: Vec<_> = self.cameras.keys().filter(|(d, _)| *d == id).cloned().collect();
                for k in cams {
                    self.cameras.remove(&k);
                    self.tombstone("camera", format!("{}/{}", k.0, k.1), v);
                }
            } else {
                self.workers.remove(&id);
            }
            self.tombstone(kind, id, v);
        }
        // Cameras known from results only (no device beats for them), silent that long, too.
        let stale: Vec<(String, String)> = self
            .cameras
            .iter()
            .filter(|((d, _), c)| !self.devices.contains_key(d) && c.latest.as_ref().is_none_or(|l| now_ms.saturating_sub(l.received_ms) > rules.forget_after_ms))
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            let v = self.next();
            self.cameras.remove(&k);
            self.tombstone("camera", format!("{}/{}", k.0, k.1), v);
        }
        // Cameras: status changes and results held back by the refresh interval.
        let keys: Vec<(String, String)> = self.cameras.keys().cloned().collect();
        for k in keys {
            let status = self.camera_status(&k.0, self.cameras.get(&k).expect("listed"), now_ms);
            let cam = self.cameras.get(&k).expect("listed");
            let due = cam.latest.as_ref().is_some_and(|l| Some(l.seq) != cam.announced.as_ref().map(|a| a.seq)) && now_ms.saturating_sub(cam.announced_ms) >= rules.thumb_refresh_ms;
            let moved = cam.status != Some(status);
            if moved || due {
                let v = self.next();
                let cam = self.cameras.get_mut(&k).expect("listed");
                if moved {
                    cam.status = Some(status);
                    cam.changed = v;
                }
                if due {
                    cam.announced = cam.latest.as_ref().map(Shown::of);
                    cam.announced_ms = now_ms;
                    cam.announced_v = v;
                }
            }
        }
    }

    fn camera_status(&self, device: &str, cam: &Camera, now_ms: u64) -> Status {
        let window = |interval_s: u64| self.rules.stale_after_beats as u64 * interval_s.max(1) * 1000 + 1000;
        match self.devices.get(device) {
            Some(d) => {
                let ds = self.rules.status(now_ms, d.beat.at_ms, d.beat.interval_s);
                if ds != Status::Live {
                    return ds;
                }
                match &cam.beat {
                    Some(b) if b.state == "up" && now_ms.saturating_sub(b.last_frame_ms) <= window(d.beat.interval_s) => Status::Live,
                    _ => Status::Stale,
                }
            }
            // Known from results only (an agent without heartbeats): by the last result's age.
            None => match &cam.latest {
                Some(l) => self.rules.status(now_ms, l.received_ms, 5),
                None => Status::Offline,
            },
        }
    }

    fn device_json(&self, d: &Device, now_ms: u64) -> Value {
        let b = &d.beat;
        let cap = if b.spool.cap_bytes > 0 { b.spool.cap_bytes } else { b.spool.max_bytes };
        let dropped: u64 = b.cameras.iter().flat_map(|c| c.dropped.values()).fold(0u64, |a, n| a.saturating_add(*n));
        json!({
            "id": b.device,
            "status": self.rules.status(now_ms, b.at_ms, b.interval_s),
            "last_seen_ms": b.at_ms,
            "interval_s": b.interval_s,
            "version": b.version,
            "uptime_s": b.uptime_s,
            "link": b.link,
            "link_error": b.link_error,
            "spool": {"bytes": b.spool.bytes, "records": b.spool.records, "cap_bytes": cap, "max_bytes": b.spool.max_bytes,
                      "fill": if cap > 0 { b.spool.bytes as f64 / cap as f64 } else { 0.0 }, "error": b.spool.error},
            "cameras": b.cameras.len(),
            "dropped": dropped,
            "cpu_percent": b.process.cpu_percent,
            "rss_bytes": b.process.rss_bytes,
        })
    }

    fn worker_json(&self, w: &Worker, now_ms: u64) -> Value {
        let b = &w.beat;
        json!({
            "id": b.id,
            "status": self.rules.status(now_ms, b.at_ms, b.interval_s),
            "health": b.status,
            "last_seen_ms": b.at_ms,
            "interval_s": b.interval_s,
            "version": b.version,
            "uptime_s": b.uptime_s,
            "group": b.group,
            "backend": b.backend,
            "pipeline": b.pipeline,
            "delivery": b.delivery,
            "partitions": b.partitions,
            "fps_in": b.fps_in,
            "fps_out": b.fps_out,
            "in_flight": b.in_flight,
            "lag": b.lag,
            "dead_letters": b.dead_letters,
            "cpu_percent": b.process.cpu_percent,
            "rss_bytes": b.process.rss_bytes,
        })
    }

    fn camera_json(&self, key: &(String, String), cam: &Camera, now_ms: u64) -> Value {
        let (device, camera) = key;
        let b = cam.beat.as_ref();
        let thumbnail = cam.announced.as_ref().map(|a| format!("/thumbs/{}/{}?seq={}", urlencode(device), urlencode(camera), a.seq));
        json!({
            "id": format!("{device}/{camera}"),
            "device": device,
            "camera": camera,
            "status": self.camera_status(device, cam, now_ms),
            "state": b.map(|b| b.state.as_str()),
            "fps_captured": b.map(|b| b.fps_captured),
            "fps_sent": b.map(|b| b.fps_sent),
            "last_seq": b.and_then(|b| b.last_seq),
            "last_frame_ms": b.map(|b| b.last_frame_ms),
            "dropped": b.map(|b| b.dropped.values().fold(0u64, |a, n| a.saturating_add(*n))).unwrap_or(0),
            "dropped_by_reason": b.map(|b| b.dropped.clone()).unwrap_or_default(),
            "result": cam.announced.as_ref().map(|a| json!({
                "seq": a.seq, "capture_ms": a.capture_ms, "received_ms": a.received_ms,
                "width": a.width, "height": a.height, "pipeline": a.pipeline, "worker": a.worker, "latency_ms": a.latency_ms,
            })),
            "thumbnail": thumbnail,
        })
    }

    /// Everything changed after version `since` (0: everything), as the live stream sends it.
    pub fn delta(&self, since: u64, now_ms: u64) -> Value {
        let devices: Vec<Value> = self.devices.values().filter(|d| d.changed > since).map(|d| self.device_json(d, now_ms)).collect();
        let workers: Vec<Value> = self.workers.values().filter(|w| w.changed > since).map(|w| self.worker_json(w, now_ms)).collect();
        let cameras: Vec<Value> = self.cameras.iter().filter(|(_, c)| c.changed > since).map(|(k, c)| self.camera_json(k, c, now_ms)).collect();
        // Newer results of cameras otherwise unchanged, compactly (most of a large fleet's
        // traffic): id → [seq, capture_ms, received_ms, latency_ms, width, height]; the page
        // makes the thumbnail URL from the id and seq.
        let results: serde_json::Map<String, Value> = self
            .cameras
            .iter()
            .filter(|(_, c)| c.announced_v > since && c.changed <= since)
            .filter_map(|((d, c), cam)| {
                let a = cam.announced.as_ref()?;
                Some((format!("{d}/{c}"), json!([a.seq, a.capture_ms, a.received_ms, a.latency_ms, a.width, a.height])))
            })
            .collect();
        // Beats that moved only a camera's figures: id → [fps_captured, fps_sent, last_seq,
        // last_frame_ms].
        let beats: serde_json::Map<String, Value> = self
            .cameras
            .iter()
            .filter(|(_, c)| c.beat_v > since && c.changed <= since)
            .filter_map(|((d, c), cam)| {
                let b = cam.beat.as_ref()?;
                Some((format!("{d}/{c}"), json!([b.fps_captured, b.fps_sent, b.last_seq, b.last_frame_ms])))
            })
            .collect();
        // A snapshot has no tombstones: it lists what exists.
        let removed: Vec<Value> = if since == 0 { Vec::new() } else { self.removed.iter().filter(|(_, v)| **v > since).map(|((kind, id), _)| json!({"kind": kind, "id": id})).collect() };
        let lag: Vec<&LagPoint> = self.lag.iter().filter(|p| p.v > since).collect();
        let dead_letters: Vec<&DeadLetter> = self.dead_letters.iter().filter(|d| d.v > since).collect();
        let events: Vec<&MotionEvent> = self.events.iter().filter(|e| e.v > since).collect();
        json!({
            "version": self.version,
            "full": since == 0,
            "now_ms": now_ms,
            "devices": devices,
            "workers": workers,
            "cameras": cameras,
            "results": results,
            "beats": beats,
            "removed": removed,
            "lag": lag,
            "lag_window_ms": self.rules.lag_window_ms,
            "lag_error": if since == 0 || self.dlq_changed > since { json!(self.lag_error) } else { Value::Null },
            "dead_letters_by_reason": if since == 0 || self.dlq_changed > since { json!(self.dlq_by_reason) } else { Value::Null },
            "dead_letters": dead_letters,
            "events": events,
        })
    }

    /// The `/api/…` views.
    pub fn devices_json(&self, now_ms: u64) -> Value {
        Value::Array(self.devices.values().map(|d| self.device_json(d, now_ms)).collect())
    }
    pub fn workers_json(&self, now_ms: u64) -> Value {
        Value::Array(self.workers.values().map(|w| self.worker_json(w, now_ms)).collect())
    }
    pub fn cameras_json(&self, now_ms: u64) -> Value {
        Value::Array(self.cameras.iter().map(|(k, c)| self.camera_json(k, c, now_ms)).collect())
    }
    pub fn lag_json(&self) -> Value {
        json!({"window_ms": self.rules.lag_window_ms, "error": self.lag_error, "points": self.lag})
    }
    pub fn dead_letters_json(&self) -> Value {
        json!({"by_reason": self.dlq_by_reason, "recent": self.dead_letters})
    }
    pub fn events_json(&self) -> Value {
        json!({"recent": self.events})
    }

    /// Counts by status at `now_ms`: (devices, workers, cameras), each [live, stale, offline].
    pub fn status_counts(&self, now_ms: u64) -> [[u64; 3]; 3] {
        let idx = |s: Status| s as usize;
        let mut out = [[0u64; 3]; 3];
        for d in self.devices.values() {
            out[0][idx(self.rules.status(now_ms, d.beat.at_ms, d.beat.interval_s))] += 1;
        }
        for w in self.workers.values() {
            out[1][idx(self.rules.status(now_ms, w.beat.at_ms, w.beat.interval_s))] += 1;
        }
        for (k, c) in &self.cameras {
            out[2][idx(self.camera_status(&k.0, c, now_ms))] += 1;
        }
        out
    }

    /// Per-entity figures for /metrics: (device, heartbeat age s, spool fill, drops by reason).
    pub fn device_figures(&self, now_ms: u64) -> Vec<(String, f64, f64, BTreeMap<String, u64>)> {
        self.devices
            .values()
            .map(|d| {
                let b = &d.beat;
                let cap = if b.spool.cap_bytes > 0 { b.spool.cap_bytes } else { b.spool.max_bytes };
                let mut drops: BTreeMap<String, u64> = BTreeMap::new();
                for c in &b.cameras {
                    for (r, n) in &c.dropped {
                        let e = drops.entry(r.clone()).or_default();
                        *e = e.saturating_add(*n);
                    }
                }
                (b.device.clone(), now_ms.saturating_sub(b.at_ms) as f64 / 1000.0, if cap > 0 { b.spool.bytes as f64 / cap as f64 } else { 0.0 }, drops)
            })
            .collect()
    }

    /// (device, camera, fps sent) of cameras with a beat.
    pub fn camera_fps(&self) -> Vec<(String, String, f64)> {
        self.cameras.iter().filter_map(|((d, c), cam)| Some((d.clone(), c.clone(), cam.beat.as_ref()?.fps_sent))).collect()
    }

    /// (worker, heartbeat age s).
    pub fn worker_ages(&self, now_ms: u64) -> Vec<(String, f64)> {
        self.workers.values().map(|w| (w.beat.id.clone(), now_ms.saturating_sub(w.beat.at_ms) as f64 / 1000.0)).collect()
    }
}

/// Percent-encodes an id for a URL path segment (ids may hold any printable character but `/`);
/// the page's `enc()` encodes the same way, so both make the same thumbnail URL.
pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        // `.` is encoded too: a camera named `..` must not become a path step.
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use framelink_common::heartbeat::{ProcessBeat, SpoolBeat};

    fn rules() -> Rules {
        Rules { stale_after_beats: 3, offline_after_ms: 60_000, forget_after_ms: 3_600_000, recent: 3, thumb_refresh_ms: 2000, lag_window_ms: 900_000, lag_interval_ms: 5000 }
    }

    fn agent(device: &str, at_ms: u64, cams: &[(&str, &str, u64)]) -> Vec<u8> {
        serde_json::to_vec(&Heartbeat::Agent(AgentBeat {
            v: 1,
            device: device.into(),
            at_ms,
            interval_s: 5,
            link: "up".into(),
            cameras: cams.iter().map(|(id, state, last)| CameraBeat { id: (*id).into(), state: (*state).into(), last_frame_ms: *last, fps_sent: 10.0, ..Default::default() }).collect(),
            spool: SpoolBeat { bytes: 900, cap_bytes: 1000, max_bytes: 1000, ..Default::default() },
            process: ProcessBeat::default(),
            ..Default::default()
        }))
        .unwrap()
    }

    fn meta(seq: u64) -> ResultMeta {
        ResultMeta { device: "d1".into(), camera: "c1".into(), seq, capture_ns: seq * 1_000_000_000, width: 64, height: 48, pipeline: "grayscale".into(), worker: "w".into(), latency_ms: Some(5) }
    }

    #[test]
    fn devices_go_stale_then_offline_by_their_own_beats() {
        let mut f = Fleet::new(rules());
        let t0 = 1_000_000;
        f.heartbeat(&agent("d1", t0, &[("c1", "up", t0)]), t0).unwrap();
        f.tick(t0);
        assert_eq!(f.devices_json(t0)[0]["status"], "live");
        assert_eq!(f.cameras_json(t0)[0]["status"], "live");
        assert_eq!(f.devices_json(t0)[0]["spool"]["fill"], 0.9);
        let v = f.version();
        // 3 intervals of 5 s + 1 s slack.
        f.tick(t0 + 16_000);
        assert_eq!(f.version(), v, "still live at the edge of the window");
        f.tick(t0 + 16_001);
        assert_eq!(f.devices_json(t0 + 16_001)[0]["status"], "stale");
        let d = f.delta(v, t0 + 16_001);
        assert_eq!(d["devices"][0]["status"], "stale", "the change reaches the stream: {d}");
        assert_eq!(d["cameras"][0]["status"], "stale");
        // A beat that moves only the figures goes compactly; one with a new state in full.
        let v = f.version();
        f.heartbeat(&agent("d1", t0 + 17_000, &[("c1", "up", t0 + 17_000)]), t0 + 17_000).unwrap();
        let d = f.delta(v, t0 + 17_000);
        assert_eq!(d["cameras"].as_array().unwrap().len(), 0, "{d}");
        assert_eq!(d["beats"]["d1/c1"], json!([0.0, 10.0, null, t0 + 17_000]), "{d}");
        let v = f.version();
        f.heartbeat(&agent("d1", t0 + 18_000, &[("c1", "reconnecting", t0 + 17_000)]), t0 + 18_000).unwrap();
        assert_eq!(f.delta(v, t0 + 18_000)["cameras"][0]["state"], "reconnecting");
        f.heartbeat(&agent("d1", t0 + 19_000, &[("c1", "up", t0 + 19_000)]), t0 + 19_000).unwrap();
        f.tick(t0 + 19_000);
        f.tick(t0 + 79_000);
        assert_eq!(f.status_counts(t0 + 79_000), [[0, 1, 0], [0, 0, 0], [0, 1, 0]], "60 s after the last beat: still stale");
        f.tick(t0 + 79_001);
        assert_eq!(f.status_counts(t0 + 79_001), [[0, 0, 1], [0, 0, 0], [0, 0, 1]]);
        // A beat again: live at once.
        f.heartbeat(&agent("d1", t0 + 82_000, &[("c1", "up", t0 + 82_000)]), t0 + 82_000).unwrap();
        assert_eq!(f.devices_json(t0 + 82_000)[0]["status"], "live");
    }

    #[test]
    fn a_late_or_older_beat_is_not_live() {
        let mut f = Fleet::new(rules());
        let now = 10_000_000;
        // Made two minutes ago (delivered late): offline by its own clock.
        f.heartbeat(&agent("d1", now - 120_000, &[]), now).unwrap();
        assert_eq!(f.devices_json(now)[0]["status"], "offline");
        f.heartbeat(&agent("d1", now, &[]), now).unwrap();
        f.heartbeat(&agent("d1", now - 50_000, &[]), now).unwrap();
        assert_eq!(f.devices_json(now)[0]["last_seen_ms"], now, "an older beat does not replace a newer one");
        // A device clock ahead of the console's is clamped to now.
        f.heartbeat(&agent("d2", now + 3_600_000, &[]), now).unwrap();
        f.tick(now + 61_000);
        assert_eq!(f.devices_json(now + 61_000)[1]["status"], "offline");
    }

    #[test]
    fn a_camera_not_delivering_frames_is_stale_while_its_device_beats() {
        let mut f = Fleet::new(rules());
        let t = 5_000_000;
        f.heartbeat(&agent("d1", t, &[("c1", "reconnecting: connection refused", t - 30_000), ("c2", "up", t - 30_000)]), t).unwrap();
        let cams = f.cameras_json(t);
        assert_eq!(cams[0]["status"], "stale");
        assert_eq!(cams[1]["status"], "stale", "up but no frame for 30 s");
        assert_eq!(f.devices_json(t)[0]["status"], "live");
    }

    #[test]
    fn results_are_announced_at_most_every_refresh_interval() {
        let mut f = Fleet::new(rules());
        let t = 1_000_000;
        f.result(meta(1), Bytes::from_static(b"a"), t);
        let first = f.delta(0, t);
        assert!(first["cameras"][0]["thumbnail"].as_str().unwrap().ends_with("?seq=1"), "a new camera comes in full: {first}");
        f.tick(t);
        let v1 = f.version();
        f.result(meta(2), Bytes::from_static(b"b"), t + 500);
        assert_eq!(f.delta(v1, t + 500)["results"].as_object().unwrap().len(), 0, "held back");
        assert_eq!(&f.latest("d1", "c1").unwrap().jpeg[..], b"b", "but kept as the latest");
        f.tick(t + 1000);
        assert_eq!(f.delta(v1, t + 1000)["results"].as_object().unwrap().len(), 0);
        f.tick(t + 2000);
        let d = f.delta(v1, t + 2000);
        assert_eq!(d["cameras"].as_array().unwrap().len(), 0, "only the result moved: {d}");
        assert_eq!(d["results"]["d1/c1"], json!([2, 2000, 1_000_500, 5, 64, 48]), "{d}");
        assert!(f.cameras_json(t + 2000)[0]["thumbnail"].as_str().unwrap().ends_with("?seq=2"));
        // A redelivered older result does not replace the newer one.
        f.result(meta(1), Bytes::from_static(b"old"), t + 5000);
        assert_eq!(f.latest("d1", "c1").unwrap().seq, 2);
    }

    #[test]
    fn recent_lists_are_bounded_and_dead_letters_counted_by_reason() {
        let mut f = Fleet::new(rules());
        for i in 0..5 {
            f.dead_letter(DeadLetter { v: 0, at_ms: i, reason: if i % 2 == 0 { "decode_error" } else { "too_large" }.into(), detail: String::new(), source: String::new(), worker: String::new(), key: String::new() });
            f.event("d".into(), "c".into(), i, json!({"i": i}));
        }
        let j = f.dead_letters_json();
        assert_eq!(j["by_reason"]["decode_error"], 3);
        assert_eq!(j["by_reason"]["too_large"], 2);
        assert_eq!(j["recent"].as_array().unwrap().len(), 3);
        assert_eq!(f.events_json()["recent"].as_array().unwrap().len(), 3);
        assert_eq!(f.counts.dead_letters, 5);
    }

    #[test]
    fn lag_keeps_its_window_and_the_delta_sends_new_points_only() {
        let mut f = Fleet::new(rules());
        for i in 0..10u64 {
            f.lag_sample(i * 300_000, BTreeMap::from([("frames[0]".to_string(), i as i64), ("frames[1]".to_string(), 1)]));
        }
        let lag = f.lag_json();
        let points = lag["points"].as_array().unwrap();
        assert_eq!(points.len(), 4, "15 minutes of 5-minute samples");
        assert_eq!(points[3]["total"], 10);
        let v = f.version();
        f.lag_sample(3_000_000, BTreeMap::from([("frames[0]".to_string(), 0)]));
        assert_eq!(f.delta(v, 3_000_000)["lag"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn silent_devices_are_forgotten_with_their_cameras() {
        let mut f = Fleet::new(rules());
        f.heartbeat(&agent("d1", 1000, &[("c1", "up", 1000)]), 1000).unwrap();
        let v = f.version();
        f.tick(1000 + 3_600_001);
        assert_eq!(f.devices_json(0).as_array().unwrap().len(), 0);
        assert_eq!(f.cameras_json(0).as_array().unwrap().len(), 0);
        let removed = f.delta(v, 0)["removed"].clone();
        assert_eq!(removed.as_array().unwrap().len(), 2, "{removed}");
    }

    #[test]
    fn an_entity_that_comes_back_is_not_removed_again() {
        let mut f = Fleet::new(rules());
        f.heartbeat(&agent("d1", 1000, &[("c1", "up", 1000), ("c2", "up", 1000)]), 1000).unwrap();
        let v = f.version();
        // c2 taken out of the agent's config: it leaves the view.
        f.heartbeat(&agent("d1", 2000, &[("c1", "up", 2000)]), 2000).unwrap();
        let d = f.delta(v, 2000);
        assert_eq!(d["removed"], json!([{"kind": "camera", "id": "d1/c2"}]), "{d}");
        assert_eq!(f.cameras_json(2000).as_array().unwrap().len(), 1);
        // Silent past forget_after: gone with its cameras; a snapshot lists no tombstones.
        f.tick(2000 + 3_600_001);
        assert_eq!(f.delta(0, 2000 + 3_600_001)["removed"], json!([]));
        // Back: its tombstones go, and it reaches a page in full.
        let v = f.version();
        let t = 2000 + 3_700_000;
        f.heartbeat(&agent("d1", t, &[("c1", "up", t)]), t).unwrap();
        let d = f.delta(v, t);
        assert_eq!(d["removed"], json!([]), "{d}");
        assert_eq!(d["devices"][0]["id"], "d1");
        assert_eq!(d["cameras"][0]["id"], "d1/c1");
    }

    #[test]
    fn absurd_intervals_and_future_frames_are_bounded() {
        let mut f = Fleet::new(rules());
        let mut beat: Heartbeat = serde_json::from_slice(&agent("d1", 1000, &[("c1", "up", 99_999_999)])).unwrap();
        if let Heartbeat::Agent(a) = &mut beat {
            a.interval_s = u64::MAX;
        }
        f.heartbeat(&serde_json::to_vec(&beat).unwrap(), 1000).unwrap();
        // At most an hour's interval: offline after 3 hours + 1 s, not never.
        assert_eq!(f.devices_json(1000 + 3 * 3_600_000 + 1001)[0]["status"], "offline");
        assert_eq!(f.cameras_json(1000)[0]["last_frame_ms"], 1000, "a frame time ahead of the console is clamped");
    }

    #[test]
    fn lag_gauges_go_empty_when_sampling_stops() {
        let mut f = Fleet::new(rules());
        f.lag_sample(10_000, BTreeMap::from([("frames[0]".to_string(), 7)]));
        assert_eq!(f.latest_lag(12_000).map(|p| p.total), Some(7));
        assert!(f.latest_lag(10_000 + 15_001).is_none(), "three 5 s intervals without a sample");
        f.lag_sample(30_000, BTreeMap::from([("frames[0]".to_string(), 8)]));
        f.lag_failed("the group coordinator is unreachable".into());
        assert!(f.latest_lag(30_000).is_none());
    }

    #[test]
    fn bad_beats_are_counted() {
        let mut f = Fleet::new(rules());
        assert!(f.heartbeat(b"{not json", 0).is_err());
        assert!(f.heartbeat(br#"{"kind":"toaster"}"#, 0).is_err());
        assert_eq!(f.counts.heartbeats_invalid, 2);
        assert_eq!(urlencode("cam 1/ä"), "cam%201%2F%C3%A4");
        assert_eq!(urlencode(".."), "%2E%2E");
        // A beat of a newer format is refused, not misread.
        let newer = br#"{"kind":"worker","v":2,"id":"w","version":"9","at_ms":0,"interval_s":5,"uptime_s":0,"status":"ok","group":"g","backend":"cpu","pipeline":"","delivery":"at-least-once","partitions":[],"fps_in":0,"fps_out":0,"in_flight":0,"lag":0,"process":{"cpu_percent":0,"rss_bytes":0}}"#;
        assert!(f.heartbeat(newer, 0).unwrap_err().contains("version 2"));
        assert_eq!(f.counts.heartbeats_invalid, 3);
    }
}
