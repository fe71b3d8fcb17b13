//! Exactly-once delivery (`worker.delivery = "exactly-once"`): consume → process → produce
//! with the consumed offsets committed *inside* the producer's Kafka transaction.
//!
//! Outputs of many frames go into one transaction, committed every `worker.transaction_ms`
//! (and on revocation and shutdown) together with the positions the [`Tracker`] says are
//! complete. A reader with `isolation.level=read_committed` then sees every input's outputs
//! exactly once: after a crash the uncommitted transaction is aborted by the broker (its
//! records stay invisible) and the next owner resumes from the offsets committed with the last
//! transaction that succeeded. Fencing uses the consumer group metadata (KIP-447), so a worker
//! that lost its partitions cannot commit for them any more.
//!
//! Frames of one partition finish out of order (cameras run on different threads), but a
//! transaction must only hold outputs of records its offsets cover: committing the output of
//! offset 11 while offset 10 is still being processed would, after a crash, process 11 again.
//! So the [`Sequencer`] releases processed records to the producer in offset order per
//! partition, and processing threads hold the gate's read side while they do; a commit takes
//! the write side. Then, at every commit, what was produced is exactly a contiguous prefix of
//! each partition, which is what the offsets sent with the transaction say.
//!
//! Errors: this worker fenced by a newer producer with its transactional id, or refused the
//! id, stops the worker (another instance owns the id). An *abortable* error (an output was
//! refused, a timeout) aborts the transaction and rewinds every assigned partition to its last
//! committed offset; frames already queued from before the rewind are dropped by epoch. Any
//! other fatal producer error (`INVALID_TXN_STATE` after a coordinator's crash, seen in the
//! cluster test), and an abort that fails or does not finish within [`ABORT_WITHIN`], replace
//! the producer in place (below).
//!
//! Time: a commit (flush, offsets, commit) gets [`COMMIT_WITHIN`], then the transaction is
//! aborted. A stop request
//! shortens a commit under way to [`COMMIT_AFTER_STOP`]. Each librdkafka call waits at most
//! [`SLICE`] and is then called again (librdkafka's transactional calls resume after a
//! timeout), so the deadline and the stop request are seen promptly. Without these bounds a
//! commit whose transaction coordinator died could block the poll thread for minutes (four
//! 60 s tries): no progress, and no exit on SIGTERM. An exit is safe: the transaction left
//! open is aborted by the broker after `transaction.timeout.ms`, or at once when the next
//! instance with this transactional id starts.
//!
//! Failures only a fresh producer cures, and the worker replaces its producer for them in
//! place (see [`Transactions::renew`]): `send_offsets_to_transaction` never returning — it
//! waits for the group coordinator without a timeout (confluentinc/librdkafka#5456, #5511;
//! seen here after a broker's SIGKILL), so it runs on a helper thread the poll thread stops
//! waiting for —, commits timing out [`STUCK_AFTER`] times in a row, a fatal error that is
//! not a fencing, and an abort that fails. The new producer
//! registers the same transactional id, which fences the old one and makes the broker abort
//! its open transaction; the partitions are rewound as after any abort.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use framelink_common::shutdown::Shutdown;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::producer::{Producer, ProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use crate::publish::producer::Producers;
use crate::topic_partition::TopicPartition;
use crate::tracker::Tracker;

/// Registering the transactional id at start.
const TIMEOUT: Duration = Duration::from_secs(60);
/// How long one commit (flush, offsets, commit) may take before the transaction is aborted;
/// below `transaction.timeout.ms` (60 s), past which the broker aborts it anyway.
pub const COMMIT_WITHIN: Duration = Duration::from_secs(30);
/// Once a stop is requested, how long a commit under way may still take.
pub const COMMIT_AFTER_STOP: Duration = Duration::from_secs(10);
/// How long an abort may take; past it the producer is replaced.
pub const ABORT_WITHIN: Duration = Duration::from_secs(10);
/// Reading the committed offsets and seeking to them after an abort, one try.
const REWIND_WITHIN: Duration = Duration::from_secs(20);
/// A rewind that keeps failing (the group coordinator down) is tried again, records polled
/// meanwhile dropped, until this long after its first failure; then the worker stops.
const REWIND_GIVE_UP: Duration = Duration::from_secs(180);
/// The longest a single librdkafka call waits before the deadlines are checked again.
const SLICE: Duration = Duration::from_millis(500);
/// How long past its own deadline a call on a helper thread may take before it is judged hung.
const HUNG_AFTER: Duration = Duration::from_secs(5);
/// Producers left blocked inside librdkafka (each with its threads) beyond which the worker
/// stops instead of replacing its producer once more: a restart frees them.
const LEFT_BEHIND_MAX: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// Another instance owns the transactional id (it fenced this one); the worker must stop.
    #[error("fatal transaction error: {0}")]
    Fatal(KafkaError),
    /// The transaction was aborted; the assigned partitions must be rewound (see `take_rewind`).
    #[error("transaction aborted: {0}")]
    Aborted(KafkaError),
    /// The producer was replaced (a transactional call hung, or commits kept timing out): the
    /// open transaction is aborted and the partitions must be rewound, as after an abort.
    #[error("transactional producer replaced: {0}")]
    Renewed(String),
    /// The producer had to be replaced and the new one could not start; the worker must stop.
    #[error("transactional producer could not be replaced ({why}): {error}")]
    RenewFailed { why: String, error: String },
    /// Offsets can only be sent while the consumer is a member of its group.
    #[error("the consumer has no group metadata (not a group member yet)")]
    NoGroup,
}

impl TxnError {
    /// The worker must stop (systemd / Kubernetes start a fresh one).
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::Fatal(_) | Self::RenewFailed { .. })
    }
}

/// After this many commits in a row timed out the producer is replaced ([`TxnError::Renewed`]).
pub const STUCK_AFTER: u32 = 2;

/// Builds a producer with the worker's transactional settings (to replace a wedged one).
pub type NewProducer<C> = Box<dyn Fn() -> Result<Arc<ThreadedProducer<C>>, String> + Send + Sync>;

/// Told the positions (next offset per partition) each committed transaction made final.
pub type OnCommit = Box<dyn Fn(&HashMap<TopicPartition, i64>) + Send + Sync>;

pub struct Transactions<C: ProducerContext + 'static, T> {
    /// Processed records waiting for their turn to be produced.
    pub order: Sequencer<T>,
    /// The transactional producer, shared with the processing threads (which produce on it).
    producers: Arc<Producers<C>>,
    new_producer: NewProducer<C>,
    on_commit: OnCommit,
    tracker: Arc<Tracker>,
    gate: RwLock<()>,
    /// Something was produced since the last commit.
    dirty: AtomicBool,
    /// Set on abort: the poll loop must seek every assigned partition back to its committed offset.
    rewind: AtomicBool,
    /// When the rewind owed first failed (it is tried again until [`REWIND_GIVE_UP`]).
    rewind_failing_since: std::sync::Mutex<Option<Instant>>,
    last_commit: std::sync::Mutex<Instant>,
    /// The worker's stop request: shortens a commit under way.
    shutdown: Shutdown,
    /// Commits that timed out since the last one that did not.
    timeouts_in_a_row: std::sync::atomic::AtomicU32,
    /// Transactions committed; tests only: the offsets call after this many hangs
    /// (`FRAMELINK_TEST_HANG_SEND_OFFSETS_AFTER`, see [`framelink_common::fault`]).
    committed: std::sync::atomic::AtomicU64,
    /// Calls on helper threads that have not returned (a hung one never does).
    on_helpers: Arc<std::sync::atomic::AtomicUsize>,
    hang_offsets_after: std::sync::Mutex<Option<u64>>,
}

impl<C: ProducerContext + 'static, T> Transactions<C, T> {
    /// Registers the transactional id with the broker (fencing older instances that used it)
    /// and opens the first transaction.
    pub fn start(producers: Arc<Producers<C>>, new_producer: NewProducer<C>, on_commit: OnCommit, tracker: Arc<Tracker>, shutdown: Shutdown) -> KafkaResult<Self> {
        let producer = producers.get();
        producer.init_transactions(TIMEOUT)?;
        producer.begin_transaction()?;
        Ok(Self {
            order: Sequencer::default(),
            producers,
            new_producer,
            on_commit,
            tracker,
            gate: RwLock::new(()),
            dirty: AtomicBool::new(false),
            rewind: AtomicBool::new(false),
            rewind_failing_since: std::sync::Mutex::new(None),
            last_commit: std::sync::Mutex::new(Instant::now()),
            shutdown,
            timeouts_in_a_row: std::sync::atomic::AtomicU32::new(0),
            committed: std::sync::atomic::AtomicU64::new(0),
            on_helpers: Arc::default(),
            hang_offsets_after: std::sync::Mutex::new(framelink_common::fault::hang_send_offsets_after()),
        })
    }

    /// Held by a processing thread while it produces one frame's outputs; `None` when the
    /// frame belongs to an aborted epoch and must be dropped.
    pub fn produce_guard(&self, epoch: u64) -> Option<RwLockReadGuard<'_, ()>> {
        let g = self.gate.read().unwrap();
        if epoch != self.tracker.epoch() {
            return None;
        }
        self.dirty.store(true, Ordering::SeqCst);
        Some(g)
    }

    /// Commits if `interval` passed since the last commit; true when a transaction committed.
    pub fn maybe_commit<X: ConsumerContext>(&self, consumer: &BaseConsumer<X>, interval: Duration) -> Result<bool, TxnError> {
        if self.last_commit.lock().unwrap().elapsed() < interval {
            return Ok(false);
        }
        self.commit(consumer)
    }

    /// Flushes, sends the completed positions with the transaction, commits, begins the next;
    /// true when there was something to commit.
    pub fn commit<X: ConsumerContext>(&self, consumer: &BaseConsumer<X>) -> Result<bool, TxnError> {
        let asked = Instant::now();
        let _w = self.gate.write().unwrap();
        let mut steps = Steps::new(asked);
        steps.done("gate");
        *self.last_commit.lock().unwrap() = Instant::now();
        let deadline = Instant::now() + COMMIT_WITHIN;
        let producer = self.producers.get();
        // Deliver everything produced so far: delivery reports move the tracker's positions.
        let flushed = self.patiently(deadline, |t| framelink_common::flush::flush(&producer, t));
        steps.done("flush");
        if let Err(e) = flushed {
            steps.report_if_slow();
            return Err(self.failed(e));
        }
        let cgm = consumer.group_metadata().ok_or(TxnError::NoGroup)?;
        let ready = self.tracker.take_ready();
        if ready.is_empty() && !self.dirty.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let result = (|| {
            if !ready.is_empty() {
                let offsets = offsets_list(&ready).map_err(Failure::Kafka)?;
                // On a helper thread: librdkafka may never return from this one (see the module doc).
                let (p, stop) = (producer.clone(), self.shutdown.clone());
                let hang = self.injected_hang_due();
                let on_helpers = self.on_helpers.clone();
                on_helpers.fetch_add(1, Ordering::SeqCst);
                let sent = on_helper(&self.shutdown, deadline, move || {
                    if hang {
                        framelink_common::fault::hang("send_offsets_to_transaction");
                    }
                    let r = patiently(&stop, deadline, COMMIT_AFTER_STOP, |t| p.send_offsets_to_transaction(&offsets, &cgm, t));
                    on_helpers.fetch_sub(1, Ordering::SeqCst);
                    r
                });
                sent.ok_or(Failure::Hung("send_offsets_to_transaction"))?.map_err(Failure::Kafka)?;
                steps.done("offsets");
            }
            let r = self.patiently(deadline, |t| producer.commit_transaction(t));
            steps.done("commit");
            r.map_err(Failure::Kafka)
        })();
        steps.report_if_slow();
        match result {
            Ok(()) => {
                self.timeouts_in_a_row.store(0, Ordering::SeqCst);
                self.committed.fetch_add(1, Ordering::SeqCst);
                self.dirty.store(false, Ordering::SeqCst);
                (self.on_commit)(&ready);
                producer.begin_transaction().map_err(TxnError::Fatal)?;
                Ok(true)
            }
            Err(Failure::Kafka(e)) => Err(self.failed(e)),
            Err(Failure::Hung(call)) => Err(self.renew(format!("{call} did not return within {} s of its deadline (confluentinc/librdkafka#5456: it can wait for a dead group coordinator for good)", HUNG_AFTER.as_secs()), true)),
        }
    }

    /// Tests only: whether this offsets call is the one `FRAMELINK_TEST_HANG_SEND_OFFSETS_AFTER`
    /// makes hang (once).
    fn injected_hang_due(&self) -> bool {
        let mut after = self.hang_offsets_after.lock().unwrap();
        let due = *after == Some(self.committed.load(Ordering::SeqCst));
        if due {
            *after = None;
        }
        due
    }

    /// The producer raised a fatal error between transactional calls (`why`; the caller has
    /// ruled out a fencing, see [`fenced_code`]): replaced, as after any fatal error.
    pub fn replace_after_fatal(&self, why: String) -> TxnError {
        let _w = self.gate.write().unwrap();
        self.renew(why, true)
    }

    /// The consumer is being replaced (it was fenced): the open transaction, whose offsets
    /// belong to the old membership, is aborted and the work in flight dropped. No rewind: the
    /// new consumer starts from the committed offsets anyway.
    ///
    /// An abort that fails (the coordinator answered `INVALID_TXN_STATE` after the crash that
    /// fenced the consumer, or it timed out) replaces the producer instead, which aborts that
    /// transaction just as well: `Err(Renewed)`, not fatal.
    pub fn abort_for_new_consumer(&self) -> Result<(), TxnError> {
        let _w = self.gate.write().unwrap();
        *self.last_commit.lock().unwrap() = Instant::now();
        let producer = self.producers.get();
        if let Err(e) = self.patiently(Instant::now() + ABORT_WITHIN, |t| producer.abort_transaction(t)) {
            return Err(self.renew_unless_fenced(e, "aborting the fenced consumer's transaction", false));
        }
        self.forget_work();
        producer.begin_transaction().map_err(|e| self.renew_unless_fenced(e, "beginning a transaction after the abort", false))
    }

    /// A commit failed: aborted, unless it is the [`STUCK_AFTER`]th in a row to time out. A
    /// flush that never finishes is what a partition librdkafka keeps without a leader looks
    /// like (confluentinc/librdkafka#5430, which the agent works around by replacing its
    /// producer); aborting cannot cure that, a fresh producer does. A plain outage also times
    /// out commits: then the new producer cannot register either and the worker stops (and
    /// starts again once Kafka answers).
    fn failed(&self, e: KafkaError) -> TxnError {
        if !is_timeout(&e) {
            self.timeouts_in_a_row.store(0, Ordering::SeqCst);
            return self.abort(e);
        }
        if self.timeouts_in_a_row.fetch_add(1, Ordering::SeqCst) + 1 >= STUCK_AFTER {
            return self.renew(format!("{STUCK_AFTER} transaction commits in a row timed out (last: {e}); librdkafka can keep a partition without a leader for good (confluentinc/librdkafka#5430)"), true);
        }
        self.abort(e)
    }

    /// Replaces the transactional producer (called with the gate held, so no processing thread
    /// is producing). The new producer registers the same transactional id: that fences the
    /// old one (whatever it still sends is refused) and makes the broker abort its open
    /// transaction. Then, as after an abort, the work in flight is dropped and the partitions
    /// are rewound to their committed offsets. The old producer is dropped on a thread of its
    /// own (dropping waits for its threads), or left to the helper thread still inside it.
    fn renew(&self, why: String, rewind: bool) -> TxnError {
        let left_behind = self.on_helpers.load(Ordering::SeqCst);
        if left_behind > LEFT_BEHIND_MAX {
            return TxnError::RenewFailed { why, error: format!("{left_behind} producers are left blocked inside librdkafka; a restart frees them") };
        }
        tracing::error!(reason = %why, "Replacing the transactional producer; the open transaction is aborted and the partitions rewound.");
        let fresh = match (self.new_producer)() {
            Ok(p) => p,
            Err(error) => return TxnError::RenewFailed { why, error },
        };
        let registered = patiently(&self.shutdown, Instant::now() + TIMEOUT, COMMIT_AFTER_STOP, |t| fresh.init_transactions(t)).and_then(|()| fresh.begin_transaction());
        if let Err(e) = registered {
            return TxnError::RenewFailed { why, error: e.to_string() };
        }
        let old = self.producers.replace(fresh);
        let _ = std::thread::Builder::new().name("old-producer".into()).spawn(move || drop(old));
        self.timeouts_in_a_row.store(0, Ordering::SeqCst);
        self.forget_work();
        self.rewind.store(rewind, Ordering::SeqCst);
        TxnError::Renewed(why)
    }

    /// After an abort, a renewal or a new consumer: work taken before it is dropped (a new
    /// epoch). The first two also ask for a rewind to the committed offsets.
    fn forget_work(&self) {
        self.tracker.clear();
        self.order.clear();
        self.dirty.store(false, Ordering::SeqCst);
    }

    /// Classifies `e`; for an abortable error, aborts, bumps the epoch and asks for a rewind.
    /// A fatal error, an abort that fails or times out: the producer is replaced (see
    /// [`Self::renew_unless_fenced`]).
    fn abort(&self, e: KafkaError) -> TxnError {
        if is_fatal(&e) {
            return self.renew_unless_fenced(e, "committing", true);
        }
        tracing::warn!(error = %e, "Aborting the transaction.");
        let producer = self.producers.get();
        if let Err(a) = self.patiently(Instant::now() + ABORT_WITHIN, |t| producer.abort_transaction(t)) {
            return self.renew_unless_fenced(a, "aborting", true);
        }
        self.forget_work();
        self.rewind.store(true, Ordering::SeqCst);
        if let Err(b) = producer.begin_transaction() {
            return self.renew_unless_fenced(b, "beginning a transaction after the abort", true);
        }
        TxnError::Aborted(e)
    }

    /// The producer failed `while_` doing something (a fatal error, or an abort that timed
    /// out). Fenced by a newer producer with this transactional id, or refused the id: fatal,
    /// another instance owns it (replacing ours would fence that one in turn). Anything else
    /// (librdkafka raises `INVALID_TXN_STATE` and similar as fatal after a coordinator's crash)
    /// is cured by a fresh producer, which also aborts whatever transaction was open.
    fn renew_unless_fenced(&self, e: KafkaError, while_: &str, rewind: bool) -> TxnError {
        if fenced(&e) {
            return TxnError::Fatal(e);
        }
        self.renew(format!("{while_} failed: {e}"), rewind)
    }

    /// After an abort: seeks every assigned partition back to its committed offset (the poll
    /// loop calls this, and drops the record it just polled). Returns whether a rewind was
    /// owed: then the polled record is dropped — also when the rewind failed and stays owed
    /// (reading the committed offsets needs the group coordinator, which may be down: tried
    /// again at the next poll, for up to [`REWIND_GIVE_UP`]; records polled meanwhile come
    /// again after the rewind). `Err` once it has failed for that long.
    pub fn take_rewind<X: ConsumerContext>(&self, consumer: &BaseConsumer<X>, reset_to_end: bool) -> KafkaResult<bool> {
        if !self.rewind.swap(false, Ordering::SeqCst) {
            return Ok(false);
        }
        let mut since = self.rewind_failing_since.lock().unwrap();
        match rewind_to_committed(consumer, reset_to_end, REWIND_WITHIN) {
            Ok(n) => {
                *since = None;
                tracing::warn!(partitions = n, "Rewound to the last committed offsets after an aborted transaction.");
                Ok(true)
            }
            Err(e) => {
                let first = *since.get_or_insert_with(Instant::now);
                if !keep_trying(first, Instant::now()) {
                    return Err(e);
                }
                self.rewind.store(true, Ordering::SeqCst);
                tracing::warn!(error = %e, failing_for_s = first.elapsed().as_secs(), "Rewind after an aborted transaction failed; trying again (records polled meanwhile come again).");
                Ok(true)
            }
        }
    }
}

/// Whether a rewind failing since `first` is tried again at `now`.
fn keep_trying(first: Instant, now: Instant) -> bool {
    now.saturating_duration_since(first) < REWIND_GIVE_UP
}

/// Seeks every partition assigned to `consumer` to its committed offset (no committed offset:
/// the end or the beginning, as `auto.offset.reset` says); returns how many it sought.
///
/// Nothing assigned — the abort came from the commit on revocation, or the group's session
/// timed out and the assignment was dropped — is nothing to rewind: whoever is assigned a
/// partition next starts from its committed offset. (librdkafka refuses a seek of an empty
/// list with `_INVALID_ARG`; the worker used to stop on it after a group coordinator's crash.)
///
/// A partition whose committed offset could not be read fails the whole rewind (rather than
/// being sought to the `auto.offset.reset` end, which would skip or repeat records).
fn rewind_to_committed<X: ConsumerContext>(consumer: &BaseConsumer<X>, reset_to_end: bool, within: Duration) -> KafkaResult<usize> {
    if consumer.assignment()?.count() == 0 {
        return Ok(0);
    }
    let committed = consumer.committed(within)?;
    let mut seek = TopicPartitionList::new();
    for e in committed.elements() {
        e.error()?;
        let to = match e.offset() {
            Offset::Offset(o) => Offset::Offset(o),
            _ if reset_to_end => Offset::End,
            _ => Offset::Beginning,
        };
        seek.add_partition_offset(e.topic(), e.partition(), to)?;
    }
    if seek.count() == 0 {
        return Ok(0);
    }
    for e in consumer.seek_partitions(seek, within)?.elements() {
        if let Err(err) = e.error() {
            tracing::warn!(topic = e.topic(), partition = e.partition(), error = %err, "Rewind of a partition failed.");
        }
    }
    Ok(committed.count())
}

impl<C: ProducerContext + 'static, T> Transactions<C, T> {
    fn patiently(&self, deadline: Instant, f: impl FnMut(Duration) -> KafkaResult<()>) -> KafkaResult<()> {
        patiently(&self.shutdown, deadline, COMMIT_AFTER_STOP, f)
    }
}

/// Why a commit's step failed.
enum Failure {
    Kafka(KafkaError),
    /// The call on a helper thread did not return (see [`on_helper`]).
    Hung(&'static str),
}

/// Runs `f` on a helper thread and waits for it until `deadline` (brought forward to
/// [`COMMIT_AFTER_STOP`] from a stop request) plus [`HUNG_AFTER`]; `None` if it has not
/// returned by then (the thread is left behind, still blocked) or could not be started.
fn on_helper<R: Send + 'static>(shutdown: &Shutdown, deadline: Instant, f: impl FnOnce() -> R + Send + 'static) -> Option<R> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    if let Err(e) = std::thread::Builder::new().name("txn-call".into()).spawn(move || {
        let _ = tx.send(f());
    }) {
        tracing::error!(error = %e, "Cannot start a thread for a transactional call.");
        return None;
    }
    let mut give_up = StopDeadline::new(shutdown, deadline + HUNG_AFTER, COMMIT_AFTER_STOP + HUNG_AFTER);
    loop {
        let at = give_up.at();
        match rx.recv_timeout(SLICE.min(at.saturating_duration_since(Instant::now()))) {
            Ok(r) => return Some(r),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if Instant::now() < at => {}
            Err(_) => return None,
        }
    }
}

/// A deadline that a stop request brings forward to `after_stop` from when it is first seen.
struct StopDeadline<'a> {
    shutdown: &'a Shutdown,
    at: Instant,
    after_stop: Duration,
    stop_seen: bool,
}

impl<'a> StopDeadline<'a> {
    fn new(shutdown: &'a Shutdown, at: Instant, after_stop: Duration) -> Self {
        Self { shutdown, at, after_stop, stop_seen: false }
    }

    fn at(&mut self) -> Instant {
        if !self.stop_seen && self.shutdown.is_set() {
            self.stop_seen = true;
            self.at = self.at.min(Instant::now() + self.after_stop);
        }
        self.at
    }
}

/// Calls `f` (a transactional call or a flush, given its timeout) in slices of at most
/// [`SLICE`] while it times out or fails retriably, until `deadline` — brought forward to
/// `after_stop` from the moment a stop is seen. Returns its last result.
fn patiently(shutdown: &Shutdown, deadline: Instant, after_stop: Duration, mut f: impl FnMut(Duration) -> KafkaResult<()>) -> KafkaResult<()> {
    let mut limit = StopDeadline::new(shutdown, deadline, after_stop);
    let mut logged = false;
    loop {
        let deadline = limit.at();
        let started = Instant::now();
        let left = deadline.saturating_duration_since(started);
        match f(left.min(SLICE)) {
            Err(e) if retriable(&e) && Instant::now() < deadline => {
                if !logged && !is_timeout(&e) {
                    logged = true;
                    tracing::warn!(error = %e, "Transactional call failed (retriable); retrying.");
                }
                // A call that failed at once is not retried in a busy loop.
                std::thread::sleep(Duration::from_millis(100).saturating_sub(started.elapsed()));
            }
            r => return r,
        }
    }
}

/// How long each step of a commit took, logged when the whole took over [`SLOW_COMMIT`].
struct Steps {
    start: Instant,
    last: Instant,
    took: Vec<(&'static str, Duration)>,
}

/// A commit this slow is logged with its steps (waiting for the gate, flush, offsets, commit).
const SLOW_COMMIT: Duration = Duration::from_secs(5);

impl Steps {
    fn new(start: Instant) -> Self {
        Self { start, last: start, took: Vec::new() }
    }

    fn done(&mut self, step: &'static str) {
        let now = Instant::now();
        self.took.push((step, now - self.last));
        self.last = now;
    }

    fn report_if_slow(&self) {
        let total = self.last - self.start;
        if total >= SLOW_COMMIT {
            let steps: Vec<String> = self.took.iter().map(|(s, d)| format!("{s} {:.1} s", d.as_secs_f64())).collect();
            tracing::warn!(seconds = total.as_secs_f64(), steps = steps.join(", "), "Slow transaction commit.");
        }
    }
}

/// A timeout or an error librdkafka says the same call may be retried after.
fn retriable(e: &KafkaError) -> bool {
    match e {
        KafkaError::Transaction(rd) => rd.is_retriable(),
        _ => is_timeout(e),
    }
}

/// An error after which this producer cannot go on.
fn is_fatal(e: &KafkaError) -> bool {
    match e {
        KafkaError::Transaction(rd) => rd.is_fatal(),
        _ => false,
    }
}

/// Another producer registered this transactional id after ours (or it is not ours to use):
/// replacing ours would fence the other in turn, so the worker stops.
fn fenced(e: &KafkaError) -> bool {
    match e {
        KafkaError::Transaction(rd) => fenced_code(rd.code()),
        _ => false,
    }
}

/// See [`fenced`].
pub fn fenced_code(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::Fenced | RDKafkaErrorCode::InvalidProducerEpoch | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
    )
}

fn is_timeout(e: &KafkaError) -> bool {
    match e {
        KafkaError::Transaction(rd) => rd.code() == RDKafkaErrorCode::OperationTimedOut,
        KafkaError::Flush(code) => *code == RDKafkaErrorCode::OperationTimedOut,
        _ => false,
    }
}

fn offsets_list(ready: &HashMap<TopicPartition, i64>) -> KafkaResult<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for (tp, next) in ready {
        tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*next))?;
    }
    Ok(tpl)
}

/// Releases completed items in the order they were dispatched, per partition.
pub struct Sequencer<T> {
    parts: std::sync::Mutex<HashMap<TopicPartition, Part<T>>>,
}

struct Part<T> {
    dispatched: VecDeque<i64>,
    done: HashMap<i64, T>,
}

impl<T> Default for Sequencer<T> {
    fn default() -> Self {
        Self { parts: std::sync::Mutex::new(HashMap::new()) }
    }
}

impl<T> Sequencer<T> {
    /// The poll loop handed `offset` to a processing thread (in offset order per partition).
    pub fn dispatched(&self, tp: &TopicPartition, offset: i64) {
        let mut parts = self.parts.lock().unwrap();
        let part = parts.entry(tp.clone()).or_insert_with(|| Part { dispatched: VecDeque::new(), done: HashMap::new() });
        part.dispatched.push_back(offset);
    }

    /// `offset` is processed; returns the items now releasable, in order (possibly none, when
    /// an earlier offset is still being processed; possibly several, when this was the one
    /// holding them back).
    pub fn complete(&self, tp: &TopicPartition, offset: i64, item: T) -> Vec<T> {
        let mut parts = self.parts.lock().unwrap();
        let Some(part) = parts.get_mut(tp) else { return Vec::new() }; // forgotten
        part.done.insert(offset, item);
        let mut out = Vec::new();
        while let Some(head) = part.dispatched.front() {
            let Some(item) = part.done.remove(head) else { break };
            part.dispatched.pop_front();
            out.push(item);
        }
        out
    }

    pub fn forget(&self, tps: &[TopicPartition]) {
        let mut parts = self.parts.lock().unwrap();
        for tp in tps {
            parts.remove(tp);
        }
    }

    pub fn clear(&self) {
        self.parts.lock().unwrap().clear();
    }
}

/// A processed record and its outputs, waiting for its turn (exactly-once).
pub type Released = (std::sync::Arc<crate::publish::Job>, Vec<crate::publish::OutRecord>);

/// The worker's transactions: over its producer, releasing processed records in offset order.
pub type Txn = Transactions<crate::publish::producer::ProduceContext, Released>;

#[cfg(test)]
mod tests {
    use super::*;

    fn timed_out() -> KafkaResult<()> {
        Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut))
    }

    /// A group consumer whose bootstrap address answers nothing.
    fn consumer_without_a_broker() -> BaseConsumer {
        rdkafka::ClientConfig::new().set("bootstrap.servers", "127.0.0.1:9").set("group.id", "fl-unit-rewind").set("log_level", "0").create().unwrap()
    }

    /// After the commit on revocation was aborted, or the session timed out, nothing is
    /// assigned: the rewind is a no-op, not an error that stops the worker (a seek of the empty
    /// list is `_INVALID_ARG` in librdkafka). No broker is needed: nothing is asked of one.
    #[test]
    fn a_rewind_with_nothing_assigned_seeks_nothing_and_succeeds() {
        let consumer = consumer_without_a_broker();
        assert_eq!(consumer.assignment().unwrap().count(), 0);
        let empty = consumer.seek_partitions(TopicPartitionList::new(), Duration::from_secs(1));
        assert!(matches!(&empty, Err(KafkaError::Seek(m)) if m.contains("INVALID_ARG")), "librdkafka refuses an empty seek: {empty:?}");
        let start = Instant::now();
        for reset_to_end in [false, true] {
            assert_eq!(rewind_to_committed(&consumer, reset_to_end, REWIND_WITHIN).unwrap(), 0);
        }
        assert!(start.elapsed() < REWIND_WITHIN, "no wait for a coordinator");
    }

    /// With a partition assigned and no coordinator to answer, the rewind fails within its
    /// time (and is then tried again by `take_rewind`, until `REWIND_GIVE_UP`).
    #[test]
    fn a_rewind_without_a_coordinator_fails_in_time_and_is_retried_for_a_while() {
        let consumer = consumer_without_a_broker();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition("frames", 0);
        consumer.assign(&tpl).unwrap();
        let start = Instant::now();
        assert!(rewind_to_committed(&consumer, false, Duration::from_secs(1)).is_err());
        assert!(start.elapsed() < Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(keep_trying(t0, t0 + Duration::from_secs(60)));
        assert!(keep_trying(t0, t0 + REWIND_GIVE_UP - Duration::from_millis(1)));
        assert!(!keep_trying(t0, t0 + REWIND_GIVE_UP));
    }

    #[test]
    fn a_call_that_times_out_is_called_again_in_slices_until_the_deadline() {
        let start = Instant::now();
        let mut timeouts = Vec::new();
        let r = patiently(&Shutdown::new(), start + Duration::from_millis(1200), COMMIT_AFTER_STOP, |t| {
            timeouts.push(t);
            std::thread::sleep(t);
            timed_out()
        });
        assert!(r.is_err(), "the last result: the timeout");
        assert!((2..=3).contains(&timeouts.len()), "500 + 500 + 200 ms (fewer if a sleep overran): {timeouts:?}");
        assert!(timeouts.iter().all(|t| *t <= SLICE));
        assert!(start.elapsed() >= Duration::from_millis(1200));
    }

    #[test]
    fn a_call_that_succeeds_after_timeouts_returns_its_success_and_other_errors_return_at_once() {
        let mut calls = 0;
        let r = patiently(&Shutdown::new(), Instant::now() + Duration::from_secs(30), COMMIT_AFTER_STOP, |_| {
            calls += 1;
            if calls < 3 { timed_out() } else { Ok(()) }
        });
        assert!(r.is_ok() && calls == 3);
        let mut calls = 0;
        let r = patiently(&Shutdown::new(), Instant::now() + Duration::from_secs(30), COMMIT_AFTER_STOP, |_| {
            calls += 1;
            Err(KafkaError::Flush(RDKafkaErrorCode::Fatal))
        });
        assert!(r.is_err() && calls == 1, "not retriable: returned at once");
    }

    #[test]
    fn a_stop_request_brings_the_deadline_forward() {
        let shutdown = Shutdown::new();
        let start = Instant::now();
        let mut calls = 0;
        let r = patiently(&shutdown, start + Duration::from_secs(30), Duration::from_millis(300), |t| {
            calls += 1;
            if calls == 2 {
                shutdown.trigger();
            }
            std::thread::sleep(t.min(Duration::from_millis(100)));
            timed_out()
        });
        assert!(r.is_err());
        let took = start.elapsed();
        assert!(took < Duration::from_secs(5), "stopped within the after-stop grace, not the 30 s deadline: {took:?}");
    }

    #[test]
    fn a_call_on_a_helper_thread_that_never_returns_is_given_up_after_its_deadline() {
        let start = Instant::now();
        let returns = on_helper(&Shutdown::new(), start, || 7);
        assert_eq!(returns, Some(7));
        let (release, blocked) = std::sync::mpsc::channel::<()>();
        let hangs = on_helper(&Shutdown::new(), Instant::now(), move || blocked.recv().is_ok());
        assert_eq!(hangs, None, "a call still blocked after deadline + HUNG_AFTER is given up");
        assert!(start.elapsed() >= HUNG_AFTER && start.elapsed() < HUNG_AFTER + Duration::from_secs(2), "{:?}", start.elapsed());
        drop(release);
    }

    #[test]
    fn a_stop_request_shortens_the_wait_for_a_helper_thread() {
        let shutdown = Shutdown::new();
        shutdown.trigger();
        let start = Instant::now();
        let (_release, blocked) = std::sync::mpsc::channel::<()>();
        let hangs = on_helper(&shutdown, start + Duration::from_secs(60), move || blocked.recv().is_ok());
        assert_eq!(hangs, None);
        let waited = start.elapsed();
        assert!(waited >= COMMIT_AFTER_STOP + HUNG_AFTER && waited < COMMIT_AFTER_STOP + HUNG_AFTER + Duration::from_secs(2), "{waited:?}");
    }

    #[test]
    fn records_are_released_in_offset_order_per_partition() {
        let s = Sequencer::default();
        let (a, b) = (TopicPartition::new("in", 0), TopicPartition::new("in", 1));
        for o in 10..14 {
            s.dispatched(&a, o);
        }
        s.dispatched(&b, 3);
        assert!(s.complete(&a, 12, "a12").is_empty(), "10 and 11 are still processing");
        assert_eq!(s.complete(&b, 3, "b3"), vec!["b3"], "partitions do not wait for each other");
        assert!(s.complete(&a, 11, "a11").is_empty());
        assert_eq!(s.complete(&a, 10, "a10"), vec!["a10", "a11", "a12"]);
        assert_eq!(s.complete(&a, 13, "a13"), vec!["a13"]);
        s.dispatched(&a, 14);
        s.forget(std::slice::from_ref(&a));
        assert!(s.complete(&a, 14, "a14").is_empty(), "a revoked partition releases nothing");
    }
}
