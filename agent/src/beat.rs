//! The agent's heartbeat (see [`framelink_common::heartbeat`]): what `framelink-console` shows
//! of this device — link, cameras (state, fps captured and sent, last sequence number, drops by
//! reason), spool fill, CPU and memory — built from the same metrics `/healthz` reports.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use framelink_common::heartbeat::{AgentBeat, CameraBeat, Heartbeat, ProcessSampler, Rate, SpoolBeat, VERSION, now_ms};
use framelink_common::metrics::labels;

use crate::metrics::Metrics;

/// Makes one beat per call; keeps the counters of the previous one for the rates.
pub struct AgentBeats {
    device: String,
    cameras: Vec<String>,
    interval_s: u64,
    metrics: Arc<Metrics>,
    started: Instant,
    captured: BTreeMap<String, Rate>,
    sent: BTreeMap<String, Rate>,
    process: ProcessSampler,
}

impl AgentBeats {
    pub fn new(device: &str, cameras: Vec<String>, interval_s: u64, metrics: Arc<Metrics>) -> Self {
        Self { device: device.to_owned(), cameras, interval_s, metrics, started: Instant::now(), captured: BTreeMap::new(), sent: BTreeMap::new(), process: ProcessSampler::default() }
    }

    pub fn make(&mut self) -> Heartbeat {
        let m = &self.metrics;
        let now = Instant::now();
        let health = m.health.lock().expect("health lock").clone();
        let text = m.render();
        let mut dropped: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for (l, v) in framelink_common::metrics::samples(&text, "framelink_agent_frames_dropped_total") {
            if let (Some(c), Some(r)) = (l.get("camera"), l.get("reason")) {
                dropped.entry(c.clone()).or_default().insert(r.clone(), v as u64);
            }
        }
        let cameras = self
            .cameras
            .iter()
            .map(|id| {
                let l = labels(&[("camera", id)]);
                let captured = m.captured.get_or_create(&l).get();
                let sent = m.sent.get_or_create(&l).get();
                CameraBeat {
                    id: id.clone(),
                    state: health.cameras.get(id).cloned().unwrap_or_else(|| "starting".into()),
                    fps_captured: self.captured.entry(id.clone()).or_default().sample(now, captured),
                    fps_sent: self.sent.entry(id.clone()).or_default().sample(now, sent),
                    last_seq: health.last_seq.get(id).copied(),
                    last_frame_ms: m.camera_last_frame.get_or_create(&l).get().max(0) as u64 * 1000,
                    dropped: dropped.remove(id).unwrap_or_default(),
                }
            })
            .collect();
        Heartbeat::Agent(AgentBeat {
            v: VERSION,
            device: self.device.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            at_ms: now_ms(),
            interval_s: self.interval_s,
            uptime_s: self.started.elapsed().as_secs(),
            link: health.link.as_str().into(),
            link_error: health.link_error,
            cameras,
            spool: SpoolBeat {
                bytes: m.spool_bytes.get().max(0) as u64,
                records: m.spool_records.get().max(0) as u64,
                cap_bytes: m.spool_cap_bytes.get().max(0) as u64,
                max_bytes: health.spool_max_bytes,
                error: health.spool_error,
            },
            process: self.process.sample(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drop_reason::DropReason;

    #[test]
    fn a_beat_carries_cameras_rates_drops_and_the_spool() {
        let m = Metrics::new(1 << 30);
        m.set_camera("front", true, "up");
        m.spool_bytes.set(4096);
        m.spool_cap_bytes.set(1 << 20);
        let mut beats = AgentBeats::new("drone-7", vec!["front".into(), "rear".into()], 5, m.clone());
        let Heartbeat::Agent(first) = beats.make() else { panic!("an agent beat") };
        assert_eq!(first.cameras[0].fps_captured, 0.0);
        for seq in 0..30 {
            m.inc(&m.captured, "front");
            m.last_frame("front", seq, 1_700_000_000_000_000_000);
        }
        m.count_drop("front", DropReason::EncoderBehind, 2);
        std::thread::sleep(std::time::Duration::from_millis(200));
        let Heartbeat::Agent(b) = beats.make() else { panic!("an agent beat") };
        assert_eq!(b.device, "drone-7");
        assert_eq!(b.link, "up");
        let front = &b.cameras[0];
        assert_eq!(front.state, "up");
        assert!(front.fps_captured > 30.0, "{front:?}");
        assert_eq!(front.last_seq, Some(29));
        assert_eq!(front.last_frame_ms, 1_700_000_000_000);
        assert_eq!(front.dropped.get("encoder_behind"), Some(&2));
        let rear = &b.cameras[1];
        assert_eq!((rear.state.as_str(), rear.last_seq), ("starting", None));
        assert_eq!((b.spool.bytes, b.spool.cap_bytes, b.spool.max_bytes), (4096, 1 << 20, 1 << 30));
        assert!(b.process.rss_bytes > 0);
    }
}
