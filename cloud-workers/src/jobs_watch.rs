//! Which large-image jobs are over (cancelled, failed, done or expired), read from the console's
//! compacted jobs topic, so that their tiles still queued are skipped instead of processed.
//!
//! One thread with a consumer of its own that assigns every partition of the jobs topic from the
//! beginning (no group, nothing committed), so a worker that starts mid-job knows at once. A
//! job the worker has not heard of is processed: the console writes a job's record before its
//! first tile, but this reader may be behind, and processing a tile too many is harmless.
//! A skipped tile is counted (`tiles_skipped{reason}`) and its offset committed: skipping the
//! tiles of a job that is over is the documented behaviour, not a loss.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use framelink_common::shutdown::Shutdown;
use framelink_common::tile_wire::JobStatus;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

/// Ids of jobs are forgotten this long after the worker learned they are over.
const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The `reason` labels of `tiles_skipped`.
pub const SKIP_REASONS: [&str; 4] = ["job_cancelled", "job_expired", "job_done", "job_failed"];

#[derive(Default)]
pub struct JobsWatch {
    over: Mutex<HashMap<String, (&'static str, Instant)>>,
    /// Set once the topic was read to the end it had at start (or found missing).
    caught_up: (Mutex<bool>, std::sync::Condvar),
}

#[derive(serde::Deserialize)]
struct StatusOnly {
    status: JobStatus,
}

impl JobsWatch {
    /// Why tiles of `job` are not wanted any more (`cancelled`, `failed`, `done`, `expired`).
    pub fn over(&self, job: &str) -> Option<&'static str> {
        self.over.lock().unwrap().get(job).map(|(why, _)| *why)
    }

    /// Waits (up to `limit`) until the jobs topic was read to where it ended at start, so a
    /// worker that starts does not process the tiles of jobs cancelled while it was away.
    pub fn wait_caught_up(&self, limit: Duration) -> bool {
        let (m, cv) = &self.caught_up;
        let guard = m.lock().unwrap();
        let (guard, _) = cv.wait_timeout_while(guard, limit, |c| !*c).unwrap();
        *guard
    }

    fn set_caught_up(&self) {
        let (m, cv) = &self.caught_up;
        *m.lock().unwrap() = true;
        cv.notify_all();
    }

    /// One record of the jobs topic: a job's state, or a tombstone (`None`) when it expired.
    pub fn record(&self, job: &str, value: Option<&[u8]>) {
        let why = match value {
            None => Some("expired"),
            Some(v) => match serde_json::from_slice::<StatusOnly>(v) {
                Ok(s) if s.status.wants_tiles() => None,
                Ok(s) => Some(s.status.as_str()),
                Err(e) => {
                    tracing::debug!(job, error = %e, "A jobs record that does not parse; ignored.");
                    return;
                }
            },
        };
        let mut over = self.over.lock().unwrap();
        match why {
            Some(why) => {
                over.insert(job.to_owned(), (why, Instant::now()));
            }
            None => {
                over.remove(job);
            }
        }
        over.retain(|_, (_, at)| at.elapsed() < FORGET_AFTER);
    }

    /// Starts the reader thread.
    pub fn spawn(self: &Arc<Self>, kafka: &framelink_common::KafkaSettings, topic: &str, id: &str, shutdown: Shutdown) -> anyhow::Result<std::thread::JoinHandle<()>> {
        let mut c = kafka.client_config(&format!("framelink-worker-{id}-jobs"));
        c.set("group.id", "framelink-worker-jobs-reader").set("enable.auto.commit", "false").set("enable.auto.offset.store", "false");
        let consumer: BaseConsumer = c.create()?;
        let (me, topic) = (self.clone(), topic.to_owned());
        Ok(std::thread::Builder::new().name("jobs-watch".into()).spawn(move || me.run(consumer, &topic, shutdown))?)
    }

    fn run(&self, consumer: BaseConsumer, topic: &str, shutdown: Shutdown) {
        let mut assigned = 0usize;
        let mut last_check: Option<Instant> = None;
        // Partition → the end it had when first assigned; emptied as it is reached.
        let mut ends: HashMap<i32, i64> = HashMap::new();
        let started = Instant::now();
        while !shutdown.is_set() {
            // An unreachable cluster for 30 s: the tiles are processed rather than held.
            if started.elapsed() > Duration::from_secs(30) {
                self.set_caught_up();
            }
            // New partitions (or the topic itself, created by the console) are looked for every
            // 30 s, every 2 s while there are none.
            let every = if assigned == 0 { Duration::from_secs(2) } else { Duration::from_secs(30) };
            if last_check.is_none_or(|t| t.elapsed() > every) {
                last_check = Some(Instant::now());
                let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5));
                let found = md.as_ref().ok().and_then(|m| m.topics().iter().find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty()).map(|t| t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>()));
                // No jobs topic (yet): there is nothing to know.
                if md.is_ok() && found.is_none() {
                    self.set_caught_up();
                }
                if let Some(parts) = found
                    && parts.len() > assigned
                {
                    let mut tpl = TopicPartitionList::new();
                    for &p in parts.iter().filter(|p| **p as usize >= assigned) {
                        let _ = tpl.add_partition_offset(topic, p, Offset::Beginning);
                        if assigned == 0 {
                            match consumer.fetch_watermarks(topic, p, Duration::from_secs(5)) {
                                Ok((low, high)) if high > low => {
                                    ends.insert(p, high);
                                }
                                Ok(_) => {}
                                Err(_) => {
                                    ends.insert(p, i64::MAX);
                                }
                            }
                        }
                    }
                    if consumer.incremental_assign(&tpl).is_ok() {
                        assigned = parts.len();
                        if ends.is_empty() {
                            self.set_caught_up();
                        }
                        tracing::info!(topic, partitions = assigned, "Watching the large-image jobs' state.");
                    }
                }
            }
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    if let Some(job) = m.key().and_then(|k| std::str::from_utf8(k).ok()) {
                        self.record(job, m.payload());
                    }
                    if ends.get(&m.partition()).is_some_and(|&end| m.offset() + 1 >= end) {
                        ends.remove(&m.partition());
                        if ends.is_empty() {
                            self.set_caught_up();
                        }
                    }
                }
                Some(Err(e)) => tracing::debug!(error = %e, "Jobs topic."),
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancelled_failed_done_and_expired_jobs_are_over() {
        let w = JobsWatch::default();
        w.record("a", Some(br#"{"status":"running","id":"a"}"#));
        assert_eq!(w.over("a"), None);
        w.record("a", Some(br#"{"status":"cancelled"}"#));
        assert_eq!(w.over("a"), Some("cancelled"));
        w.record("b", None);
        assert_eq!(w.over("b"), Some("expired"));
        w.record("c", Some(b"not json"));
        assert_eq!(w.over("c"), None, "a record that does not parse changes nothing");
        w.record("c", Some(br#"{"status":"done"}"#));
        assert_eq!(w.over("c"), Some("done"));
        assert_eq!(w.over("unknown"), None, "an unknown job's tiles are processed");
    }
}
