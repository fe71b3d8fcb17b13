//! What happens when Kafka refuses an output: the refusal itself, the backoff of a refused
//! dead letter, the partitions stalled behind one ([`Stalls`], shown in `/healthz`), the
//! exactly-once bookkeeping of inputs whose outputs were refused inside a transaction
//! ([`Poisoned`]), and the at-least-once refusals thread that dead-letters refused results
//! and retries refused dead letters.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::producer::{Output, Producers, produce, producer_failure};
use super::record::{Job, OutRecord, OutputKind, Publishing, refused_dead_letter};
use crate::metrics::Metrics;
use crate::offsets::Offsets;
use crate::topic_partition::TopicPartition;

/// Backoff before the `attempt`-th retry of a refused dead letter: 1 s doubling to 60 s, with
/// ±20 % jitter so a fleet does not retry in step.
pub fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_secs(1u64 << attempt.min(6)).min(Duration::from_secs(60));
    let jitter = 0.8 + 0.4 * rand_unit();
    base.mul_f64(jitter)
}

fn rand_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// An output Kafka refused, to be dead-lettered (or, a dead letter, retried).
pub struct Refusal {
    pub job: Arc<Job>,
    /// What was refused.
    pub record: OutRecord,
    pub error: String,
    /// Tries of this dead letter so far (0 for a refused result or event).
    pub attempt: u32,
    /// Not refused by Kafka: the producer failed (fatal error); send it again as it is.
    pub resend: bool,
}

/// Partitions stopped because their dead letters are refused, and why (for `/healthz`).
#[derive(Default)]
pub struct Stalls {
    by_tp: Mutex<BTreeMap<TopicPartition, (u32, String)>>,
}

impl Stalls {
    /// Notes a refused dead letter on `tp` (`first`: its first refusal, counted; else a retry
    /// refused again, which only updates the cause); true when the partition was not stalled.
    pub fn add(&self, tp: &TopicPartition, cause: String, first: bool) -> bool {
        let mut m = self.by_tp.lock().unwrap();
        let e = m.entry(tp.clone()).or_insert((0, String::new()));
        e.0 += u32::from(first);
        e.1 = cause;
        first && e.0 == 1
    }

    /// One refused dead letter on `tp` went through; true when the partition has none left.
    pub fn resolve(&self, tp: &TopicPartition) -> bool {
        let mut m = self.by_tp.lock().unwrap();
        let Some(e) = m.get_mut(tp) else { return false };
        e.0 = e.0.saturating_sub(1);
        if e.0 == 0 {
            m.remove(tp);
            return true;
        }
        false
    }

    pub fn forget(&self, tps: &[TopicPartition]) {
        let mut m = self.by_tp.lock().unwrap();
        for tp in tps {
            m.remove(tp);
        }
    }

    /// `topic[partition]: cause` for each stalled partition.
    pub fn causes(&self) -> Vec<String> {
        self.by_tp.lock().unwrap().iter().map(|(tp, (_, c))| format!("{tp}: {c}")).collect()
    }

    pub fn count(&self) -> usize {
        self.by_tp.lock().unwrap().len()
    }
}

/// Exactly-once: outputs Kafka refused inside a transaction, by input. The transaction is
/// aborted and the partitions rewound; when the input comes again its outputs are replaced by
/// a dead letter (`output_refused`), in the next transaction. A refused dead letter keeps its
/// partition paused for a backoff before the next try, so the worker never loops aborting on
/// the same record.
///
/// An input is forgotten only when a transaction holding its dead letter **commits**
/// ([`Self::committed`]), not when the dead letter is delivered: that transaction can still be
/// aborted by another input's refusal, and an input forgotten then would produce its refused
/// result again, abort again, and so on — inputs on one partition taking turns to abort each
/// other's transactions.
#[derive(Default)]
pub struct Poisoned {
    by_input: Mutex<HashMap<(TopicPartition, i64), PoisonedInput>>,
}

/// What was refused for one input.
#[derive(Clone, Debug)]
pub struct PoisonedInput {
    pub kind: OutputKind,
    pub topic: String,
    pub error: String,
    /// Refusals of its dead letter so far.
    pub dead_letter_refusals: u32,
    /// Its dead letter was delivered in the open transaction (kept until that commits).
    pub dead_letter_delivered: bool,
}

impl Poisoned {
    /// Notes a refusal for input `offset` of `tp`.
    pub fn refused(&self, tp: &TopicPartition, offset: i64, kind: OutputKind, topic: &str, error: String) {
        let mut m = self.by_input.lock().unwrap();
        let e = m.entry((tp.clone(), offset)).or_insert_with(|| PoisonedInput { kind, topic: topic.to_owned(), error: error.clone(), dead_letter_refusals: 0, dead_letter_delivered: false });
        if kind == OutputKind::DeadLetter {
            if e.dead_letter_delivered {
                // Delivered once, its transaction aborted, refused now: stalled afresh.
                (e.dead_letter_delivered, e.dead_letter_refusals) = (false, 0);
            }
            e.dead_letter_refusals += 1;
            e.error = error;
        } else if e.kind != OutputKind::DeadLetter {
            (e.kind, e.topic, e.error) = (kind, topic.to_owned(), error);
        }
    }

    pub fn get(&self, tp: &TopicPartition, offset: i64) -> Option<PoisonedInput> {
        self.by_input.lock().unwrap().get(&(tp.clone(), offset)).cloned()
    }

    /// The input's dead letter was delivered (in the open transaction): returns the input the
    /// first time (to resume a partition its refused dead letter stalled), `None` after that
    /// or for an input never refused. Kept until the transaction commits.
    pub fn delivered(&self, tp: &TopicPartition, offset: i64) -> Option<PoisonedInput> {
        let mut m = self.by_input.lock().unwrap();
        let e = m.get_mut(&(tp.clone(), offset))?;
        if e.dead_letter_delivered {
            return None;
        }
        e.dead_letter_delivered = true;
        Some(e.clone())
    }

    /// A transaction committed the positions `next` (per partition, the next offset to read):
    /// the inputs before them are done for good.
    pub fn committed(&self, next: &HashMap<TopicPartition, i64>) {
        self.by_input.lock().unwrap().retain(|(tp, offset), _| next.get(tp).is_none_or(|n| offset >= n));
    }

    /// Partitions whose dead letters were refused, with the refusal count (for the backoff).
    pub fn stalled(&self) -> Vec<(TopicPartition, u32)> {
        let m = self.by_input.lock().unwrap();
        let mut v: Vec<(TopicPartition, u32)> = m.iter().filter(|(_, p)| p.dead_letter_refusals > 0).map(|((tp, _), p)| (tp.clone(), p.dead_letter_refusals)).collect();
        v.sort();
        v.dedup_by(|a, b| a.0 == b.0);
        v
    }

    pub fn forget(&self, tps: &[TopicPartition]) {
        self.by_input.lock().unwrap().retain(|(tp, _), _| !tps.contains(tp));
    }
}


/// The at-least-once refusal handler: dead-letters refused results and events, produces refused
/// dead letters again with backoff while their partition is paused (see [`crate::publish`]),
/// and sends again, as they are, outputs that failed because the producer did (a fatal error:
/// the producer is being replaced). At-least-once only, so there are no aborted epochs to skip.
/// Runs until every sender is gone.
pub struct RefusalHandler {
    pub producers: Arc<Producers>,
    pub offsets: Arc<Offsets>,
    pub metrics: Arc<Metrics>,
    pub stalls: Arc<Stalls>,
    pub publishing: Publishing,
}

/// How soon an output that failed with its producer is tried again on the (new) producer.
const RESEND_AFTER: Duration = Duration::from_millis(500);

impl RefusalHandler {
    /// Produces `record` for `job`; nothing when handed over, else when to look at it again.
    fn try_produce(&self, job: &Arc<Job>, record: OutRecord, attempt: u32) -> Vec<(Instant, Refusal)> {
        let opaque = Box::new(Output { job: job.clone(), epoch: job.epoch, kind: record.kind, attempt });
        let Some((_, e)) = produce(&self.producers.get(), &record, opaque).err() else { return Vec::new() };
        let r = Refusal { job: job.clone(), record, error: e.to_string(), attempt, resend: false };
        if producer_failure(&e) {
            return vec![(Instant::now() + RESEND_AFTER, Refusal { resend: true, ..r })];
        }
        self.refused(r)
    }

    /// A record Kafka (or the producer, synchronously) refused for good.
    fn refused(&self, r: Refusal) -> Vec<(Instant, Refusal)> {
        if r.record.kind == OutputKind::DeadLetter {
            return vec![stall(r, &self.offsets, &self.metrics, &self.stalls)];
        }
        let mut later = Vec::new();
        match crate::tile::tile_result_kind(&r.record, &self.publishing) {
            // A tile's failure report refused: the tile is dead-lettered already (this report
            // went out with its dead letter); logged and counted, nothing more.
            Some(false) => {
                tracing::error!(topic = r.record.topic, input_offset = r.job.offset, error = r.error, "A tile's failure report was refused; its job waits for the tile until it expires.");
                self.metrics.outputs_refused.get_or_create(&vec![("kind", "tile_failure_report".to_owned())]).inc();
                self.offsets.output_done(&r.job.tp, r.job.offset, r.job.epoch);
                return later;
            }
            // A tile's result refused: the console is told the tile failed (one more output for
            // the input), so its job does not wait for it.
            Some(true) => {
                self.offsets.tracker().add_outputs(&r.job.tp, r.job.offset, 1);
                later.extend(self.try_produce(&r.job, crate::tile::failure_report(&r.job, &r.error, &self.publishing), 0));
            }
            None => {}
        }
        let dl = refused_dead_letter(&r.job, r.record.kind, &r.record.topic, &r.error, &self.publishing, &self.metrics, true);
        later.extend(self.try_produce(&r.job, dl, 0));
        later
    }

    /// A refusal reported by a delivery callback or a failed send.
    fn handle(&self, r: Refusal) -> Vec<(Instant, Refusal)> {
        if r.resend { vec![(Instant::now(), r)] } else { self.refused(r) }
    }

    /// Its time came: send again as it is, or try a refused dead letter once more.
    fn due(&self, r: Refusal) -> Vec<(Instant, Refusal)> {
        let attempt = if r.resend { r.attempt } else { r.attempt + 1 };
        self.try_produce(&r.job, r.record, attempt)
    }
}

pub fn spawn_refusals(rx: crossbeam_channel::Receiver<Refusal>, handler: RefusalHandler) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("refusals".into()).spawn(move || {
        // Records waiting for their next try, with its time.
        let mut waiting: Vec<(Instant, Refusal)> = Vec::new();
        loop {
            let next_due = waiting.iter().map(|(t, _)| *t).min();
            let timeout = next_due.map_or(Duration::from_millis(500), |t| t.saturating_duration_since(Instant::now()));
            match rx.recv_timeout(timeout) {
                Ok(r) => waiting.extend(handler.handle(r)),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) if waiting.is_empty() => return,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => std::thread::sleep(timeout.min(Duration::from_millis(500))),
            }
            let now = Instant::now();
            let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut waiting).into_iter().partition(|(t, _)| *t <= now);
            waiting = later;
            for (_, r) in due {
                waiting.extend(handler.due(r));
            }
        }
    })
}

/// A dead letter was refused: its partition stops (paused, the input stays in flight so nothing
/// is committed past it) and the dead letter waits for its retry.
fn stall(r: Refusal, offsets: &Offsets, metrics: &Metrics, stalls: &Stalls) -> (Instant, Refusal) {
    metrics.dead_letters_refused.inc();
    let cause = format!("dead-letter topic {} refuses records: {}", r.record.topic, r.error);
    // Counted once per dead letter (its first refusal); a retry refused again only updates the cause.
    if stalls.add(&r.job.tp, cause.clone(), r.attempt == 0) {
        offsets.pause(&r.job.tp, true);
    }
    metrics.stalled_partitions.set(stalls.count() as i64);
    let wait = backoff(r.attempt);
    tracing::error!(topic = r.job.tp.topic, partition = r.job.tp.partition, offset = r.job.offset, attempt = r.attempt + 1, retry_in_ms = wait.as_millis() as u64, cause, "Dead letter refused: the partition is paused until it is accepted.");
    (Instant::now() + wait, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalls_count_refusals_per_partition_until_each_went_through() {
        let s = Stalls::default();
        let tp: TopicPartition = TopicPartition::new("frames", 0);
        assert!(s.add(&tp, "dlq refused: RecordTooLarge".into(), true), "first refusal stalls the partition");
        assert!(!s.add(&tp, "dlq refused: RecordTooLarge".into(), true), "a second dead letter on it");
        assert!(!s.add(&tp, "dlq refused: TopicAuthorizationFailed".into(), false), "a retry refused again is not counted");
        assert_eq!(s.causes(), vec!["frames[0]: dlq refused: TopicAuthorizationFailed".to_string()]);
        assert!(!s.resolve(&tp), "one dead letter still refused");
        assert!(s.resolve(&tp), "all through: resume");
        assert_eq!(s.count(), 0);
    }

    #[test]
    fn backoff_grows_to_a_minute_with_jitter() {
        for attempt in 0..12 {
            let b = backoff(attempt).as_secs_f64();
            let base = (1u64 << attempt.min(6)).min(60) as f64;
            assert!(b >= base * 0.8 - 1e-9 && b <= base * 1.2 + 1e-9, "attempt {attempt}: {b}");
        }
    }
}

#[cfg(test)]
mod poisoned_tests {
    use super::*;

    #[test]
    fn a_refused_output_then_its_refused_dead_letter_are_remembered_per_input() {
        let p = Poisoned::default();
        let tp: TopicPartition = TopicPartition::new("frames", 1);
        p.refused(&tp, 5, OutputKind::Result, "out", "too large".into());
        let e = p.get(&tp, 5).unwrap();
        assert_eq!((e.kind, e.topic.as_str(), e.dead_letter_refusals), (OutputKind::Result, "out", 0));
        assert!(p.stalled().is_empty(), "a refused result is dead-lettered, not stalled");
        p.refused(&tp, 5, OutputKind::DeadLetter, "dlq", "denied".into());
        p.refused(&tp, 5, OutputKind::DeadLetter, "dlq", "denied".into());
        assert_eq!(p.get(&tp, 5).unwrap().kind, OutputKind::Result, "the original refusal stays the reason");
        assert_eq!(p.stalled(), vec![(tp.clone(), 2)]);
        assert_eq!(p.delivered(&tp, 5).unwrap().dead_letter_refusals, 2);
        assert!(p.delivered(&tp, 5).is_none(), "reported delivered once");
        p.refused(&tp, 6, OutputKind::Event, "ev", "x".into());
        p.forget(std::slice::from_ref(&tp));
        assert!(p.get(&tp, 6).is_none());
    }

    /// The bug this guards against: input 5's dead letter delivered, then the transaction
    /// aborted for input 6's refusal. Forgotten at delivery, 5 would produce its refused result
    /// again and abort the next transaction, 6's dead letter with it, and so on.
    #[test]
    fn an_input_is_forgotten_when_its_transaction_commits_not_when_its_dead_letter_is_delivered() {
        let p = Poisoned::default();
        let (tp, other) = (TopicPartition::new("frames", 0), TopicPartition::new("frames", 1));
        p.refused(&tp, 5, OutputKind::Result, "out", "too large".into());
        p.refused(&other, 2, OutputKind::Result, "out", "too large".into());
        assert!(p.delivered(&tp, 5).is_some());
        p.refused(&tp, 6, OutputKind::Result, "out", "too large".into()); // the transaction aborts
        assert_eq!(p.get(&tp, 5).map(|e| e.kind), Some(OutputKind::Result), "5 is dead-lettered again after the abort");
        p.committed(&HashMap::from([(tp.clone(), 6)]));
        assert!(p.get(&tp, 5).is_none(), "committed");
        assert!(p.get(&tp, 6).is_some(), "6 is past the committed position");
        assert!(p.get(&other, 2).is_some(), "another partition is untouched");
        p.committed(&HashMap::from([(tp.clone(), 7), (other.clone(), 3)]));
        assert!(p.get(&tp, 6).is_none() && p.get(&other, 2).is_none());
    }

    #[test]
    fn a_dead_letter_refused_after_its_aborted_delivery_stalls_afresh() {
        let p = Poisoned::default();
        let tp = TopicPartition::new("frames", 0);
        p.refused(&tp, 5, OutputKind::Result, "out", "too large".into());
        p.refused(&tp, 5, OutputKind::DeadLetter, "dlq", "denied".into());
        p.refused(&tp, 5, OutputKind::DeadLetter, "dlq", "denied".into());
        assert!(p.delivered(&tp, 5).is_some());
        p.refused(&tp, 5, OutputKind::DeadLetter, "dlq", "denied".into());
        let e = p.get(&tp, 5).unwrap();
        assert_eq!((e.dead_letter_refusals, e.dead_letter_delivered), (1, false), "a first refusal again: counted as a new stall");
        assert!(p.delivered(&tp, 5).is_some(), "and resolved again when delivered");
    }
}
