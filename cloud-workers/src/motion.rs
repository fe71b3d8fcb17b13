//! Per-camera motion detection: each frame is reduced to a small luma image (at most 160
//! pixels wide, box-averaged), compared with the same camera's previous one, and the pixels
//! whose luma changed by more than `threshold` are counted. An event carries the changed
//! fraction and the bounding box of the change in the frame's own coordinates.
//!
//! State is one small image per camera, rebuilt from the next frame after a restart or a
//! partition moving to another worker (the first frame of a camera never fires). It is
//! bounded: a camera not seen for `forget_after_s` is forgotten, and so are the cameras of a
//! partition this worker no longer owns ([`Revocations`]) — a fleet of many short-lived
//! cameras does not grow a worker's memory, and a partition that comes back later does not
//! compare its first frame with one from long ago.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::ops::{Img, grayscale};
use crate::topic_partition::TopicPartition;

/// `[motion]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MotionConfig {
    /// Detect motion and publish events. Default false.
    #[serde(default)]
    pub enabled: bool,
    /// Luma difference (0–255) that counts as a change. Default 25.
    #[serde(default = "default_threshold")]
    pub threshold: u8,
    /// Fraction of changed pixels (0–1) that makes an event. Default 0.01.
    #[serde(default = "default_fraction")]
    pub min_changed_fraction: f64,
    /// A camera with no frame for this many seconds is forgotten (its next frame starts
    /// afresh and does not fire). Default 300.
    #[serde(default = "default_forget_after_s")]
    pub forget_after_s: u64,
}

fn default_forget_after_s() -> u64 {
    300
}

fn default_threshold() -> u8 {
    25
}
fn default_fraction() -> f64 {
    0.01
}

impl Default for MotionConfig {
    fn default() -> Self {
        Self { enabled: false, threshold: default_threshold(), min_changed_fraction: default_fraction(), forget_after_s: default_forget_after_s() }
    }
}

/// A motion event (the value of a record on the events topic, JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MotionEvent {
    pub changed_fraction: f64,
    /// x, y, width, height in the frame's pixels.
    pub bbox: [u32; 4],
}

const SMALL_WIDTH: u32 = 160;

/// The box factor and the size of the small luma image of a `width`×`height` frame (the GPU
/// backend computes the same image; see `gpu::plan`).
pub fn small_luma_size(width: u32, height: u32) -> (u32, u32, u32) {
    let f = width.div_ceil(SMALL_WIDTH).max(1);
    (f, (width / f).max(1), (height / f).max(1))
}

/// Box-averaged luma at most `SMALL_WIDTH` wide.
pub fn small_luma(img: &Img) -> (Img, u32) {
    let g = grayscale(img);
    let (f, w, h) = small_luma_size(g.width, g.height);
    let mut out = Vec::with_capacity((w * h) as usize);
    for y in 0..h {
        for x in 0..w {
            let mut acc = 0u32;
            let mut n = 0u32;
            for dy in 0..f {
                for dx in 0..f {
                    let (sx, sy) = (x * f + dx, y * f + dy);
                    if sx < g.width && sy < g.height {
                        acc += g.data[(sy * g.width + sx) as usize] as u32;
                        n += 1;
                    }
                }
            }
            out.push((acc / n.max(1)) as u8);
        }
    }
    (Img::new(w, h, 1, out), f)
}

struct Frame {
    width: u32,
    height: u32,
}

/// Partitions this worker gave up, shared with every processing thread's detector.
#[derive(Default)]
pub struct Revocations {
    generation: AtomicU64,
    /// (generation, partition), the most recent [`Revocations::KEEP`].
    recent: Mutex<VecDeque<(u64, TopicPartition)>>,
}

impl Revocations {
    const KEEP: usize = 4096;

    pub fn revoked(&self, tps: &[TopicPartition]) {
        let mut r = self.recent.lock().unwrap();
        let g = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        for tp in tps {
            r.push_back((g, tp.clone()));
        }
        while r.len() > Self::KEEP {
            r.pop_front();
        }
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Partitions revoked after generation `since`.
    fn since(&self, since: u64) -> Vec<TopicPartition> {
        self.recent.lock().unwrap().iter().filter(|(g, _)| *g > since).map(|(_, tp)| tp.clone()).collect()
    }
}

struct Seen {
    small: Img,
    at: Instant,
    /// The partition the camera's frames came from.
    partition: Option<TopicPartition>,
}

#[derive(Default)]
pub struct MotionDetector {
    previous: HashMap<String, Seen>,
    updates: u64,
    revocations_seen: u64,
}

impl MotionDetector {
    /// Compares `frame` with the camera's previous frame; `Some` when enough changed.
    pub fn update(&mut self, camera: &str, frame: &Img, cfg: &MotionConfig) -> Option<MotionEvent> {
        let (small, f) = small_luma(frame);
        self.update_small(camera, small, f, (frame.width, frame.height), cfg)
    }

    /// As [`update`](Self::update), with the frame's small luma (box factor `f`) already made
    /// (the GPU backend computes it in the frame's batch).
    pub fn update_small(&mut self, camera: &str, small: Img, f: u32, frame_size: (u32, u32), cfg: &MotionConfig) -> Option<MotionEvent> {
        self.update_at(camera, None, small, f, frame_size, cfg, Instant::now())
    }

    /// Cameras remembered.
    pub fn cameras(&self) -> usize {
        self.previous.len()
    }

    /// Forgets the cameras of partitions revoked since the last call.
    pub fn apply_revocations(&mut self, revocations: &Revocations) {
        let g = revocations.generation();
        if g == self.revocations_seen {
            return;
        }
        let gone = revocations.since(self.revocations_seen);
        self.revocations_seen = g;
        self.previous.retain(|_, s| s.partition.as_ref().is_none_or(|p| !gone.contains(p)));
    }

    /// Forgets cameras not seen for `forget_after` (checked every 256 frames, and at once when
    /// the map is large).
    fn evict_idle(&mut self, now: Instant, forget_after: Duration) {
        self.updates += 1;
        if !self.updates.is_multiple_of(256) && self.previous.len() < 4096 {
            return;
        }
        self.previous.retain(|_, s| now.saturating_duration_since(s.at) <= forget_after);
    }

    /// The full form: `partition` is where the frame came from, `now` the clock.
    #[allow(clippy::too_many_arguments)]
    pub fn update_at(&mut self, camera: &str, partition: Option<(&str, i32)>, small: Img, f: u32, frame_size: (u32, u32), cfg: &MotionConfig, now: Instant) -> Option<MotionEvent> {
        self.evict_idle(now, Duration::from_secs(cfg.forget_after_s));
        let frame = Frame { width: frame_size.0, height: frame_size.1 };
        let seen = Seen { small: small.clone(), at: now, partition: partition.map(|(t, p)| TopicPartition::new(t, p)) };
        let prev = self.previous.insert(camera.to_owned(), seen)?;
        if now.saturating_duration_since(prev.at) > Duration::from_secs(cfg.forget_after_s) {
            return None; // too old to compare with
        }
        let prev = prev.small;
        if (prev.width, prev.height) != (small.width, small.height) {
            return None; // the camera changed resolution: start over
        }
        let (mut changed, mut x0, mut y0, mut x1, mut y1) = (0u64, u32::MAX, u32::MAX, 0u32, 0u32);
        for y in 0..small.height {
            for x in 0..small.width {
                let i = (y * small.width + x) as usize;
                if small.data[i].abs_diff(prev.data[i]) > cfg.threshold {
                    changed += 1;
                    (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
                }
            }
        }
        let fraction = changed as f64 / small.data.len() as f64;
        if changed == 0 || fraction < cfg.min_changed_fraction {
            return None;
        }
        let bx = (x0 * f).min(frame.width);
        let by = (y0 * f).min(frame.height);
        let bw = ((x1 + 1) * f).min(frame.width) - bx;
        let bh = ((y1 + 1) * f).min(frame.height) - by;
        Some(MotionEvent { changed_fraction: fraction, bbox: [bx, by, bw, bh] })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::coffee;

    #[test]
    fn a_moved_object_is_found_where_it_moved() {
        let cfg = MotionConfig { enabled: true, ..MotionConfig::default() };
        let base = coffee(); // 600x400: small image is 150x100 at factor 4
        let mut moved = base.clone();
        // Paint a white 80x60 block at (300, 200).
        for y in 200..260 {
            for x in 300..380 {
                let i = (y * 600 + x) * 3;
                moved.data[i..i + 3].copy_from_slice(&[255, 255, 255]);
            }
        }
        let mut m = MotionDetector::default();
        assert_eq!(m.update("a", &base, &cfg), None, "the first frame never fires");
        assert_eq!(m.update("a", &base, &cfg), None, "no change, no event");
        let e = m.update("a", &moved, &cfg).expect("motion");
        let [x, y, w, h] = e.bbox;
        assert!((296..=300).contains(&x) && (196..=200).contains(&y), "{:?}", e.bbox);
        assert!((80..=88).contains(&w) && (60..=68).contains(&h), "{:?}", e.bbox);
        // 80x60 of 600x400 = 2 %; darker pixels under the block changed, some may not have.
        assert!(e.changed_fraction > 0.01 && e.changed_fraction <= 0.0225, "{}", e.changed_fraction);
        // Cameras are independent.
        assert_eq!(m.update("b", &moved, &cfg), None);
    }

    fn tiny(v: u8) -> Img {
        Img::new(16, 9, 1, vec![v; 16 * 9])
    }

    #[test]
    fn idle_cameras_are_forgotten() {
        let cfg = MotionConfig { enabled: true, forget_after_s: 60, ..MotionConfig::default() };
        let mut m = MotionDetector::default();
        let t0 = Instant::now();
        // 10 000 cameras that each sent one frame, then went away.
        for i in 0..10_000 {
            m.update_at(&format!("dev/{i}"), None, tiny(0), 1, (16, 9), &cfg, t0);
        }
        assert!(m.cameras() <= 10_000);
        // One live camera keeps sending, two minutes later.
        for k in 0..300 {
            m.update_at("live/cam", None, tiny(0), 1, (16, 9), &cfg, t0 + Duration::from_secs(120) + Duration::from_millis(k));
        }
        assert_eq!(m.cameras(), 1, "only the live camera is remembered");
        // A camera back after longer than forget_after_s starts afresh: no event against the old frame.
        let late = t0 + Duration::from_secs(500);
        assert_eq!(m.update_at("live/cam", None, tiny(255), 1, (16, 9), &cfg, late), None);
        assert!(m.update_at("live/cam", None, tiny(0), 1, (16, 9), &cfg, late + Duration::from_secs(1)).is_some(), "then it compares again");
    }

    #[test]
    fn cameras_of_revoked_partitions_are_forgotten() {
        let cfg = MotionConfig { enabled: true, ..MotionConfig::default() };
        let mut m = MotionDetector::default();
        let now = Instant::now();
        m.update_at("a/1", Some(("frames", 0)), tiny(0), 1, (16, 9), &cfg, now);
        m.update_at("b/1", Some(("frames", 1)), tiny(0), 1, (16, 9), &cfg, now);
        let r = Revocations::default();
        m.apply_revocations(&r);
        assert_eq!(m.cameras(), 2, "nothing revoked yet");
        r.revoked(&[TopicPartition::new("frames", 1)]);
        m.apply_revocations(&r);
        assert_eq!(m.cameras(), 1);
        // Partition 1 comes back: its camera's first frame does not fire against a stale one.
        assert_eq!(m.update_at("b/1", Some(("frames", 1)), tiny(255), 1, (16, 9), &cfg, now), None);
        assert!(m.update_at("a/1", Some(("frames", 0)), tiny(255), 1, (16, 9), &cfg, now).is_some(), "partition 0 kept its state");
    }
}
