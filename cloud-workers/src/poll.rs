//! The poll loop: the one thread that drives the consumer. It hands each fetched record to the
//! processing pool, runs the exactly-once transaction cadence (commit every
//! `worker.transaction_ms`, rewind after an abort, pause partitions whose dead letters were
//! refused), replaces a producer a fatal error left unusable, or whose outputs wait behind a
//! partition librdkafka keeps without a leader (at-least-once), and a consumer
//! whose group membership Kafka fenced, and on shutdown
//! finishes what is in flight and commits before leaving the group.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use framelink_common::link::LinkStatus;
use framelink_common::shutdown::Shutdown;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::producer::{Producer, ThreadedProducer};

use crate::consume::{WorkerConsumer, job_from};
use crate::leaderless::LeaderlessWatch;
use crate::metrics::Metrics;
use crate::offsets::Offsets;
use crate::pool::Pool;
use crate::publish::producer::{ProduceContext, Producers};
use crate::publish::refusals::Poisoned;
use crate::topic_partition::TopicPartition;
use crate::tracker::Tracker;
use crate::txn::{Txn, TxnError};

pub struct PollLoop {
    pub consumer: Arc<WorkerConsumer>,
    /// Builds, subscribes and attaches a consumer to replace one Kafka fenced.
    pub make_consumer: Box<dyn Fn() -> Result<Arc<WorkerConsumer>>>,
    pub pool: Pool,
    pub producers: Arc<Producers>,
    /// Builds a producer to replace one a fatal error left unusable (at-least-once).
    pub make_producer: Box<dyn Fn() -> Result<Arc<ThreadedProducer<ProduceContext>>>>,
    pub offsets: Arc<Offsets>,
    pub metrics: Arc<Metrics>,
    pub txn: Option<Arc<Txn>>,
    pub poisoned: Arc<Poisoned>,
    /// The clients' link status: its leaderless reports (see [`crate::leaderless`]).
    pub link: Arc<LinkStatus>,
    pub heartbeat: Arc<framelink_common::systemd::Heartbeat>,
    /// Exactly-once: how often the transaction commits.
    pub transaction_interval: Duration,
    /// `auto.offset.reset = latest`: a rewound partition without a committed offset goes to the end.
    pub reset_to_end: bool,
}

/// When the next replacement of a failed producer may be tried, and the backoff after that.
struct Replacement {
    at: Instant,
    backoff: Duration,
}

/// A fenced consumer is replaced at most this many times within [`REBUILD_WINDOW`]; past that
/// another live worker most likely has the same `worker.id`, and the worker stops.
const REBUILDS_ALLOWED: usize = 3;
const REBUILD_WINDOW: Duration = Duration::from_secs(600);

impl PollLoop {
    /// Runs until `shutdown` is set or a fatal error; then finishes and commits what is in flight.
    pub fn run(mut self, shutdown: &Shutdown) -> Result<()> {
        let failure = self.poll_until(shutdown);
        self.stop(failure)
    }

    fn tracker(&self) -> &Tracker {
        self.offsets.tracker()
    }

    fn poll_until(&mut self, shutdown: &Shutdown) -> Option<anyhow::Error> {
        let mut rebuilds: std::collections::VecDeque<Instant> = std::collections::VecDeque::new();
        // Tests only: a fatal producer error injected after this many acknowledged outputs.
        let mut inject_fatal_after = framelink_common::fault::fatal_error_after();
        let mut replacement = Replacement { at: Instant::now(), backoff: Duration::from_millis(500) };
        let mut leaderless = LeaderlessWatch::default();
        // Tests only: a leaderless report recorded once this file exists.
        let mut inject_leaderless = framelink_common::fault::leaderless_file();
        // Exactly-once: partitions paused after a refused dead letter, until when.
        let mut paused_until: Vec<(Instant, TopicPartition)> = Vec::new();
        while !shutdown.is_set() {
            let (consumer, metrics) = (self.consumer.clone(), self.metrics.clone());
            paused_until.retain(|(until, tp)| {
                let due = *until <= Instant::now();
                if due {
                    self.offsets.pause(tp, false);
                }
                !due
            });
            self.heartbeat.beat();
            let polled = consumer.poll(Duration::from_millis(100));
            if let Some(n) = inject_fatal_after
                && metrics.outputs.get_or_create(&vec![("kind", "result".to_owned())]).get() >= n
            {
                inject_fatal_after = None;
                framelink_common::fault::inject_fatal_error(self.producers.get().client());
            }
            if let Some(e) = self.replace_failed_producer(&mut replacement) {
                return Some(e);
            }
            if inject_leaderless.as_ref().is_some_and(|f| f.exists()) {
                inject_leaderless = None;
                tracing::warn!("FRAMELINK_TEST_LEADERLESS_FILE: recording a leaderless partition report.");
                self.link.record_leaderless();
            }
            if self.txn.is_none() {
                let last = match metrics.last_output_ns.load(std::sync::atomic::Ordering::Relaxed) {
                    0 => None,
                    ns => Some(std::time::UNIX_EPOCH + Duration::from_nanos(ns)),
                };
                let in_flight = self.producers.get().in_flight_count().max(0) as usize;
                if leaderless.due(self.link.leaderless(), last, in_flight, Instant::now())
                    && Instant::now() >= replacement.at
                    && self.replace_producer(&mut replacement, format!("{in_flight} outputs waited {} s behind a partition librdkafka keeps without a leader (confluentinc/librdkafka#5430), none acknowledged since", crate::leaderless::LEADERLESS_GRACE.as_secs()))
                {
                    leaderless.replaced(last);
                }
            }
            if let Some(e) = consumer.context().fatal.lock().unwrap().take() {
                return Some(anyhow::anyhow!("exactly-once: {e}"));
            }
            if let Some(t) = &self.txn {
                match t.take_rewind(&consumer, self.reset_to_end) {
                    Ok(false) => {}
                    Ok(true) => {
                        // Partitions whose dead letters Kafka refused wait before the next try.
                        for (tp, refusals) in self.poisoned.stalled() {
                            let wait = crate::publish::refusals::backoff(refusals.saturating_sub(1));
                            tracing::error!(topic = tp.topic, partition = tp.partition, retry_in_ms = wait.as_millis() as u64, "Dead letter refused in a transaction: the partition waits before the next try.");
                            self.offsets.pause(&tp, true);
                            paused_until.push((Instant::now() + wait, tp));
                        }
                        continue; // `polled` is from before the rewind: it comes again
                    }
                    Err(e) => return Some(anyhow::anyhow!("exactly-once: rewinding after an abort: {e}")),
                }
            }
            match polled {
                None => {}
                Some(Err(e)) => {
                    // A fatal consumer error leaves the consumer unusable. Fenced membership (most
                    // often after the group coordinator's crash) gets a new consumer in place, a
                    // few times; anything else stops the worker, so systemd / Kubernetes start a
                    // fresh one.
                    if let Some((code, reason)) = consumer.client().fatal_error() {
                        rebuilds.retain(|at| at.elapsed() < REBUILD_WINDOW);
                        if code != rdkafka::types::RDKafkaErrorCode::FencedInstanceId || rebuilds.len() >= REBUILDS_ALLOWED {
                            return Some(anyhow::anyhow!("fatal Kafka consumer error {code:?}: {reason}"));
                        }
                        rebuilds.push_back(Instant::now());
                        if let Err(e) = self.replace_fenced_consumer(&reason) {
                            return Some(e);
                        }
                        paused_until.clear(); // the new consumer has nothing paused
                        continue;
                    }
                    tracing::warn!(error = %e, "Consumer error.");
                }
                Some(Ok(m)) => {
                    let job = Arc::new(job_from(&m, self.tracker().epoch()));
                    drop(m);
                    metrics.frames_in.inc();
                    self.tracker().start(&job.tp, job.offset);
                    if let Some(t) = &self.txn {
                        t.order.dispatched(&job.tp, job.offset);
                    }
                    // Blocking here is back-pressure: the fetch loop waits for a free thread.
                    self.pool.dispatch(job);
                }
            }
            if let Some(t) = &self.txn {
                match t.maybe_commit(&consumer, self.transaction_interval) {
                    Ok(true) => {
                        metrics.txn_commits.inc();
                    }
                    Ok(false) | Err(TxnError::NoGroup) => {}
                    Err(e) if e.is_fatal() => return Some(anyhow::anyhow!("exactly-once: {e}: the worker stops; the next instance with this id fences the open transaction (aborted, its frames processed again)")),
                    Err(e) => {
                        metrics.txn_not_committed(&e);
                        tracing::warn!(error = %e, "Transaction aborted; rewinding to the last committed offsets.");
                    }
                }
            }
            metrics.in_flight.set(self.tracker().in_flight() as i64);
        }
        None
    }

    /// Kafka fenced this worker's static membership (`FENCED_INSTANCE_ID`: after a crash of the
    /// group's coordinator librdkafka's own session timeout can run out, and its rejoin under
    /// the same `group.instance.id` is refused). The consumer is unusable; a new one joins in
    /// its place, without a restart. What the old membership had in flight is dropped: in
    /// exactly-once mode the open transaction is aborted (its offsets belong to the old
    /// membership); in at-least-once mode the positions not yet committed are processed again.
    fn replace_fenced_consumer(&mut self, reason: &str) -> Result<()> {
        tracing::error!(reason, "Kafka fenced this worker's group membership; replacing the consumer (frames in flight are processed again).");
        let old = self.consumer.clone();
        let abandoned = old.context().detach();
        match &self.txn {
            Some(t) => match t.abort_for_new_consumer() {
                Ok(()) => {}
                Err(e) if e.is_fatal() => anyhow::bail!("exactly-once: aborting the fenced membership's transaction: {e}"),
                Err(e) => {
                    // The abort failed and the producer was replaced instead (its transaction aborted).
                    self.metrics.txn_not_committed(&e);
                    tracing::warn!(error = %e, "The fenced membership's transaction could not be aborted; the producer was replaced instead.");
                }
            },
            None => self.tracker().clear(),
        }
        self.consumer = (self.make_consumer)()?;
        self.metrics.consumer_recreated.inc();
        tracing::info!(partitions = ?abandoned, "New consumer subscribed; the group assigns its partitions again.");
        // Closing a fenced consumer may wait on the group coordinator: not on the poll thread.
        let _ = std::thread::Builder::new().name("old-consumer".into()).spawn(move || drop(old));
        Ok(())
    }

    /// A fatal producer error leaves that producer unusable. At-least-once: a new one takes
    /// over (what the old one held is sent again on it). Exactly-once: fenced by another
    /// instance with this transactional id, the worker stops; any other fatal error replaces
    /// the transactional producer in place (its transaction aborted, the partitions rewound).
    fn replace_failed_producer(&self, r: &mut Replacement) -> Option<anyhow::Error> {
        let (code, reason) = self.producers.get().client().fatal_error()?;
        if let Some(t) = &self.txn {
            if crate::txn::fenced_code(code) {
                return Some(anyhow::anyhow!("fatal Kafka producer error {code:?}: {reason}: another instance with this worker.id fenced it; the worker stops"));
            }
            match t.replace_after_fatal(format!("fatal Kafka producer error {code:?}: {reason}")) {
                e if e.is_fatal() => return Some(anyhow::anyhow!("exactly-once: {e}")),
                e => {
                    self.metrics.txn_not_committed(&e);
                    tracing::warn!(error = %e, "Transaction aborted; rewinding to the last committed offsets.");
                }
            }
            return None;
        }
        if Instant::now() < r.at {
            return None;
        }
        self.replace_producer(r, format!("fatal Kafka producer error {code:?}: {reason}"));
        None
    }

    /// At-least-once: a new producer takes over from the current one, which is purged — what it
    /// held comes back as purge errors and is sent again on the new one. False when no producer
    /// could be made: the caller tries again (the fatal-error path after a backoff, the
    /// leaderless one on its next turn).
    fn replace_producer(&self, r: &mut Replacement, why: String) -> bool {
        match (self.make_producer)() {
            Ok(p) => {
                tracing::error!(why, "The Kafka producer is replaced; its outputs are sent again.");
                self.metrics.producer_recreated.inc();
                r.backoff = Duration::from_millis(500);
                let old = self.producers.replace(p);
                // Returns what it still holds (delivery reports with purge errors): sent again.
                old.purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
                // Closing it may wait on brokers that do not answer: not on the poll thread.
                let _ = std::thread::Builder::new().name("old-producer".into()).spawn(move || drop(old));
                true
            }
            Err(e) => {
                tracing::error!(error = %e, why, retry_in_ms = r.backoff.as_millis() as u64, "Cannot create a new Kafka producer to replace one.");
                r.at = Instant::now() + r.backoff;
                r.backoff = (r.backoff * 2).min(Duration::from_secs(30));
                false
            }
        }
    }

    /// Stops taking records, lets the threads finish, waits (up to 30 s) for the outputs in
    /// flight to be acknowledged, commits, and leaves the group.
    fn stop(self, failure: Option<anyhow::Error>) -> Result<()> {
        let (consumer, metrics) = (&self.consumer, &self.metrics);
        metrics.health.lock().unwrap().stopping = true;
        framelink_common::systemd::stopping();
        tracing::info!(in_flight = self.tracker().in_flight(), "Stopping: finishing frames in flight.");
        if let Ok(assigned) = consumer.assignment() {
            let _ = consumer.pause(&assigned);
        }
        self.pool.stop();
        let tracker = self.offsets.tracker();
        let deadline = Instant::now() + Duration::from_secs(30);
        while tracker.in_flight() > 0 && Instant::now() < deadline {
            let _ = consumer.poll(Duration::from_millis(100));
            let _ = framelink_common::flush::flush(&self.producers.get(), Duration::from_millis(100));
        }
        let _ = framelink_common::flush::flush(&self.producers.get(), Duration::from_secs(5));
        match &self.txn {
            None => {
                if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                    tracing::debug!(error = %e, "Final commit.");
                }
            }
            Some(t) if failure.is_none() => match t.commit(consumer) {
                Ok(committed) => {
                    if committed {
                        metrics.txn_commits.inc();
                    }
                }
                Err(e) => tracing::warn!(error = %e, "Final transaction not committed; those frames will be processed again."),
            },
            Some(_) => {}
        }
        consumer.unsubscribe();
        self.offsets.attach(None);
        tracing::info!(frames_in = metrics.frames_in.get(), "Worker stopped.");
        failure.map_or(Ok(()), Err)
    }
}
