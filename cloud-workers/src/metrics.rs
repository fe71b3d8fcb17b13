//! The worker's Prometheus metrics (prefix `framelink_worker_`).

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

pub struct Metrics {
    pub registry: Registry,
    pub frames_in: Counter,
    pub frames_out: Counter,
    pub events: Counter,
    pub outputs: Family<Labels, Counter>,
    pub outputs_failed: Counter,
    pub dead_letters: Family<Labels, Counter>,
    pub op_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    pub latency: Histogram,
    pub lag: Family<Labels, Gauge>,
    pub in_flight: Gauge,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("framelink_worker");
        let m = Self {
            registry: Registry::default(),
            frames_in: Counter::default(),
            frames_out: Counter::default(),
            events: Counter::default(),
            outputs: Family::default(),
            outputs_failed: Counter::default(),
            dead_letters: Family::default(),
            op_seconds: Family::new_with_constructor(seconds),
            latency: seconds(),
            lag: Family::default(),
            in_flight: Gauge::default(),
        };
        registry.register("frames_in", "Records consumed", m.frames_in.clone());
        registry.register("frames_out", "Frames processed", m.frames_out.clone());
        registry.register("events", "Motion events published", m.events.clone());
        registry.register("outputs", "Outputs acknowledged by Kafka, by kind", m.outputs.clone());
        registry.register("outputs_failed", "Outputs Kafka refused for good", m.outputs_failed.clone());
        registry.register("dead_letters", "Records sent to the dead-letter topic, by reason", m.dead_letters.clone());
        registry.register("op_seconds", "Time per operation", m.op_seconds.clone());
        registry.register("latency_seconds", "Capture to processed (end-to-end latency)", m.latency.clone());
        registry.register("consumer_lag", "Records behind the partition's end", m.lag.clone());
        registry.register("in_flight", "Records consumed but not yet committed", m.in_flight.clone());
        Arc::new(Self { registry, ..m })
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("formatting to a String");
        out
    }
}

pub fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}
