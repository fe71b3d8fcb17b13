//! Each output topic's record-size limit (`max.message.bytes`), learned from the cluster at
//! start, after every rebalance and once a minute, so a result too large for its topic is
//! dead-lettered before Kafka would refuse it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;

/// The largest record the worker's producer sends (its `message.max.bytes`); a topic may set
/// a lower limit, never a higher one that the worker would use.
pub const PRODUCER_MAX_BYTES: usize = 16 * 1024 * 1024;

/// Kafka's default `max.message.bytes` (1 MiB + 12).
pub const KAFKA_DEFAULT_MAX_BYTES: usize = 1_048_588;

/// Each output topic's record-size limit, as the cluster says (`max.message.bytes`, which
/// includes the broker's default when the topic does not override it).
pub struct TopicLimits {
    limits: Mutex<HashMap<String, usize>>,
    /// Producer cap (the worker's `message.max.bytes`).
    cap: usize,
}

impl TopicLimits {
    pub fn new(cap: usize) -> Self {
        Self { limits: Mutex::new(HashMap::new()), cap }
    }

    /// The largest record `topic` takes: its learned limit, capped by the producer's. A topic
    /// whose limit could not be read gets the producer's cap: a record over the real limit is
    /// then refused by the broker and dead-lettered as `output_refused`.
    pub fn limit(&self, topic: &str) -> usize {
        self.limits.lock().unwrap().get(topic).copied().unwrap_or(self.cap).min(self.cap)
    }

    pub fn set(&self, topic: &str, limit: usize) {
        self.limits.lock().unwrap().insert(topic.to_owned(), limit);
    }

    /// Reads `max.message.bytes` of `topics` from the cluster (DescribeConfigs). Topics whose
    /// configuration cannot be read keep what was known and are returned with the error.
    pub fn learn(&self, client: &ClientConfig, topics: &[String]) -> Result<(), String> {
        use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
        use rdkafka::client::DefaultClientContext;
        let admin: AdminClient<DefaultClientContext> = client.create().map_err(|e| format!("admin client: {e}"))?;
        let specs: Vec<ResourceSpecifier<'_>> = topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
        let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        let results = pollster::block_on(admin.describe_configs(&specs, &opts)).map_err(|e| format!("DescribeConfigs: {e}"))?;
        let mut errors = Vec::new();
        for (topic, r) in topics.iter().zip(results) {
            match r {
                Ok(res) => match res.get("max.message.bytes").and_then(|e| e.value.as_deref()).and_then(|v| v.parse::<usize>().ok()) {
                    Some(limit) => self.set(topic, limit),
                    None => errors.push(format!("{topic}: no max.message.bytes in its configuration")),
                },
                Err(e) => errors.push(format!("{topic}: {e}")),
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
    }

    pub fn snapshot(&self) -> BTreeMap<String, usize> {
        self.limits.lock().unwrap().iter().map(|(t, l)| (t.clone(), (*l).min(self.cap))).collect()
    }
}

/// Keeps [`TopicLimits`] fresh (they were read once at start): reads them again every minute
/// and whenever poked (after a rebalance). Runs until `stop` is set; join the handle before the
/// process exits: a Kafka client made while the process tears down (a poke from the consumer's
/// last revocation) crashed the worker at exit (SIGSEGV in this thread).
pub fn spawn_limits_refresher(limits: Arc<TopicLimits>, client: ClientConfig, topics: Vec<String>, stop: Arc<AtomicBool>) -> (crossbeam_channel::Sender<()>, Option<std::thread::JoinHandle<()>>) {
    let (poke, rx) = crossbeam_channel::bounded::<()>(1);
    let handle = std::thread::Builder::new().name("topic-limits".into()).spawn(move || {
        let mut warned = false;
        while !stop.load(Ordering::Relaxed) {
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                if rx.recv_timeout(Duration::from_millis(500)).is_ok() {
                    break;
                }
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
            match limits.learn(&client, &topics) {
                Ok(()) => warned = false,
                Err(e) if !warned => {
                    tracing::warn!(error = %e, "Cannot read the output topics' max.message.bytes; results are checked against what is known.");
                    warned = true;
                }
                Err(_) => {}
            }
        }
    });
    (poke, handle.ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_default_to_kafkas_and_are_capped_by_the_producer() {
        let l = TopicLimits::new(PRODUCER_MAX_BYTES);
        assert_eq!(l.limit("unknown"), PRODUCER_MAX_BYTES, "not learned: the broker decides");
        l.set("big", 64 << 20);
        assert_eq!(l.limit("big"), PRODUCER_MAX_BYTES);
        l.set("small", 500_000);
        assert_eq!(l.limit("small"), 500_000);
    }
}
