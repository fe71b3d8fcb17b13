//! The worker's heartbeat (see [`framelink_common::heartbeat`]): what `framelink-console`
//! shows of this fleet member — status, backend, pipeline, delivery mode, partitions, fps in
//! and out, in flight, lag and dead letters by reason — from the metrics `/healthz` reports.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use framelink_common::heartbeat::{Heartbeat, ProcessSampler, Rate, VERSION, WorkerBeat, now_ms};

use crate::metrics::Metrics;

/// Makes one beat per call; keeps the previous counters for the rates.
pub struct WorkerBeats {
    id: String,
    interval_s: u64,
    metrics: Arc<Metrics>,
    started: Instant,
    fps_in: Rate,
    fps_out: Rate,
    process: ProcessSampler,
}

impl WorkerBeats {
    pub fn new(id: &str, interval_s: u64, metrics: Arc<Metrics>) -> Self {
        Self { id: id.to_owned(), interval_s, metrics, started: Instant::now(), fps_in: Rate::default(), fps_out: Rate::default(), process: ProcessSampler::default() }
    }

    pub fn make(&mut self) -> Heartbeat {
        let m = &self.metrics;
        let now = Instant::now();
        let health = m.health_json();
        let text = m.render();
        let dead_letters: BTreeMap<String, u64> = framelink_common::metrics::samples(&text, "framelink_worker_dead_letters_total")
            .into_iter()
            .filter_map(|(l, v)| Some((l.get("reason")?.clone(), v as u64)))
            .collect();
        let str_of = |k: &str| health[k].as_str().unwrap_or_default().to_owned();
        Heartbeat::Worker(WorkerBeat {
            v: VERSION,
            id: self.id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            at_ms: now_ms(),
            interval_s: self.interval_s,
            uptime_s: self.started.elapsed().as_secs(),
            status: str_of("status"),
            group: str_of("group"),
            backend: str_of("backend"),
            pipeline: str_of("pipeline"),
            delivery: str_of("delivery"),
            partitions: health["partitions"].as_array().map(|a| a.iter().filter_map(|p| p.as_str().map(str::to_owned)).collect()).unwrap_or_default(),
            fps_in: self.fps_in.sample(now, m.frames_in.get()),
            fps_out: self.fps_out.sample(now, m.frames_out.get()),
            in_flight: m.in_flight.get().max(0) as u64,
            lag: health["lag"].as_i64().unwrap_or(0),
            dead_letters,
            process: self.process.sample(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use framelink_common::metrics::labels;

    #[test]
    fn a_beat_carries_status_rates_and_dead_letters() {
        let m = Metrics::new();
        {
            let mut h = m.health.lock().unwrap();
            h.group = "framelink-workers".into();
            h.delivery = "exactly-once";
            h.pipeline = "grayscale".into();
            h.backend = "cpu".into();
            h.brokers_up = Some(1);
            h.lag_total = 17;
        }
        let mut beats = WorkerBeats::new("w-1", 5, m.clone());
        beats.make();
        m.frames_in.inc_by(20);
        m.frames_out.inc_by(10);
        m.dead_letters.get_or_create(&labels(&[("reason", "decode_error")])).inc_by(3);
        std::thread::sleep(std::time::Duration::from_millis(100));
        let Heartbeat::Worker(b) = beats.make() else { panic!("a worker beat") };
        assert_eq!((b.id.as_str(), b.status.as_str(), b.group.as_str()), ("w-1", "ok", "framelink-workers"));
        assert_eq!((b.delivery.as_str(), b.pipeline.as_str(), b.backend.as_str()), ("exactly-once", "grayscale", "cpu"));
        assert!(b.fps_in > b.fps_out && b.fps_out > 0.0, "{b:?}");
        assert_eq!(b.lag, 17);
        assert_eq!(b.dead_letters.get("decode_error"), Some(&3));
    }
}
