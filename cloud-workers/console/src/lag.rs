//! The workers' consumer lag, measured from outside the group: every `lag.interval_s` the
//! committed offsets of `lag.group` on `lag.topics` against the partitions' ends. Workers
//! report their own lag in their heartbeats too, but a stopped worker reports nothing — this
//! keeps the chart honest exactly when it matters.
//!
//! The console asks the group coordinator for the committed offsets (OffsetFetch) and never
//! joins the group, so it cannot disturb the workers' assignment.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use framelink_common::heartbeat::now_ms;
use framelink_common::shutdown::Shutdown;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::LagConfig;
use crate::state::Fleet;

pub struct LagSampler {
    consumer: BaseConsumer,
    cfg: LagConfig,
    fleet: Arc<Mutex<Fleet>>,
}

impl LagSampler {
    pub fn new(kafka: &framelink_common::KafkaSettings, cfg: &LagConfig, fleet: Arc<Mutex<Fleet>>) -> anyhow::Result<Self> {
        let mut c = kafka.client_config("framelink-console-lag");
        c.set("group.id", &cfg.group).set("enable.auto.commit", "false").set("enable.auto.offset.store", "false");
        Ok(Self { consumer: c.create()?, cfg: cfg.clone(), fleet })
    }

    /// One sample: `topic[partition]` → records behind the end (all of them where the group
    /// has committed nothing yet).
    pub fn sample(&self) -> Result<BTreeMap<String, i64>, String> {
        let timeout = Duration::from_secs(5);
        let mut tpl = TopicPartitionList::new();
        for topic in &self.cfg.topics {
            let md = self.consumer.fetch_metadata(Some(topic), timeout).map_err(|e| format!("reading the partitions of {topic}: {e}"))?;
            for t in md.topics() {
                if t.error().is_some() {
                    return Err(format!("topic {topic} is not readable: {:?}", t.error()));
                }
                for p in t.partitions() {
                    tpl.add_partition(topic, p.id());
                }
            }
        }
        let committed = self.consumer.committed_offsets(tpl, timeout).map_err(|e| format!("reading group {}'s committed offsets: {e}", self.cfg.group))?;
        let mut out = BTreeMap::new();
        for e in committed.elements() {
            let (low, high) = self.consumer.fetch_watermarks(e.topic(), e.partition(), timeout).map_err(|x| format!("reading the end of {}[{}]: {x}", e.topic(), e.partition()))?;
            let lag = match e.offset() {
                Offset::Offset(n) => (high - n).max(0),
                _ => high - low,
            };
            out.insert(format!("{}[{}]", e.topic(), e.partition()), lag);
        }
        Ok(out)
    }

    pub fn run(self, shutdown: Shutdown) {
        let interval = Duration::from_secs(self.cfg.interval_s);
        let mut last_error: Option<String> = None;
        loop {
            let sample = self.sample();
            {
                let mut fleet = self.fleet.lock().expect("fleet lock");
                match sample {
                    Ok(points) => {
                        if last_error.take().is_some() {
                            tracing::info!("Measuring the workers' lag again.");
                        }
                        fleet.lag_sample(now_ms(), points)
                    }
                    Err(e) => {
                        // Logged when it changes (the page and /api/lag show it meanwhile).
                        if last_error.as_ref() != Some(&e) {
                            tracing::warn!(error = %e, "Cannot measure the workers' lag.");
                            last_error = Some(e.clone());
                        }
                        fleet.lag_failed(e);
                    }
                }
            }
            if shutdown.wait_timeout(interval) {
                break;
            }
        }
    }
}
