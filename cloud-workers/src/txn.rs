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
//! Errors: a *fatal* one (this worker was fenced, or the broker refused the transactional id)
//! stops the worker (systemd / Kubernetes start it again). An *abortable* one (an output was
//! refused, a timeout) aborts the transaction and rewinds every assigned partition to its last
//! committed offset; frames already queued from before the rewind are dropped by epoch.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::producer::{Producer, ProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use crate::topic_partition::TopicPartition;
use crate::tracker::Tracker;

const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// The producer cannot go on (e.g. fenced by a newer instance); the worker must stop.
    #[error("fatal transaction error: {0}")]
    Fatal(KafkaError),
    /// The transaction was aborted; the assigned partitions must be rewound (see `take_rewind`).
    #[error("transaction aborted: {0}")]
    Aborted(KafkaError),
    /// Offsets can only be sent while the consumer is a member of its group.
    #[error("the consumer has no group metadata (not a group member yet)")]
    NoGroup,
}

pub struct Transactions<C: ProducerContext + 'static, T> {
    /// Processed records waiting for their turn to be produced.
    pub order: Sequencer<T>,
    producer: Arc<ThreadedProducer<C>>,
    tracker: Arc<Tracker>,
    gate: RwLock<()>,
    /// Something was produced since the last commit.
    dirty: AtomicBool,
    /// Set on abort: the poll loop must seek every assigned partition back to its committed offset.
    rewind: AtomicBool,
    last_commit: std::sync::Mutex<Instant>,
}

impl<C: ProducerContext + 'static, T> Transactions<C, T> {
    /// Registers the transactional id with the broker (fencing older instances that used it)
    /// and opens the first transaction.
    pub fn start(producer: Arc<ThreadedProducer<C>>, tracker: Arc<Tracker>) -> KafkaResult<Self> {
        producer.init_transactions(TIMEOUT)?;
        producer.begin_transaction()?;
        Ok(Self {
            order: Sequencer::default(),
            producer,
            tracker,
            gate: RwLock::new(()),
            dirty: AtomicBool::new(false),
            rewind: AtomicBool::new(false),
            last_commit: std::sync::Mutex::new(Instant::now()),
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
        let _w = self.gate.write().unwrap();
        *self.last_commit.lock().unwrap() = Instant::now();
        // Deliver everything produced so far: delivery reports move the tracker's positions.
        if let Err(e) = self.producer.flush(TIMEOUT) {
            return Err(self.abort(e));
        }
        let cgm = consumer.group_metadata().ok_or(TxnError::NoGroup)?;
        let ready = self.tracker.take_ready();
        if ready.is_empty() && !self.dirty.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let result = (|| {
            if !ready.is_empty() {
                retrying(|| self.producer.send_offsets_to_transaction(&offsets_list(&ready)?, &cgm, TIMEOUT))?;
            }
            retrying(|| self.producer.commit_transaction(TIMEOUT))
        })();
        match result {
            Ok(()) => {
                self.dirty.store(false, Ordering::SeqCst);
                self.producer.begin_transaction().map_err(TxnError::Fatal)?;
                Ok(true)
            }
            Err(e) => Err(self.abort(e)),
        }
    }

    /// Classifies `e`; for an abortable error, aborts, bumps the epoch and asks for a rewind.
    fn abort(&self, e: KafkaError) -> TxnError {
        let fatal = matches!(&e, KafkaError::Transaction(rd) if rd.is_fatal());
        if fatal {
            return TxnError::Fatal(e);
        }
        if let Err(a) = self.producer.abort_transaction(TIMEOUT) {
            return TxnError::Fatal(a);
        }
        self.tracker.clear(); // and a new epoch: work taken before it is dropped
        self.order.clear();
        self.dirty.store(false, Ordering::SeqCst);
        self.rewind.store(true, Ordering::SeqCst);
        if let Err(b) = self.producer.begin_transaction() {
            return TxnError::Fatal(b);
        }
        TxnError::Aborted(e)
    }

    /// After an abort: seeks every assigned partition back to its committed offset (the poll
    /// loop calls this, and drops the record it just polled). Returns whether it rewound.
    pub fn take_rewind<X: ConsumerContext>(&self, consumer: &BaseConsumer<X>, reset_to_end: bool) -> KafkaResult<bool> {
        if !self.rewind.swap(false, Ordering::SeqCst) {
            return Ok(false);
        }
        let committed = consumer.committed(TIMEOUT)?;
        let mut seek = TopicPartitionList::new();
        for e in committed.elements() {
            let to = match e.offset() {
                Offset::Offset(o) => Offset::Offset(o),
                _ if reset_to_end => Offset::End,
                _ => Offset::Beginning,
            };
            seek.add_partition_offset(e.topic(), e.partition(), to)?;
        }
        for e in consumer.seek_partitions(seek, TIMEOUT)?.elements() {
            if let Err(err) = e.error() {
                tracing::warn!(topic = e.topic(), partition = e.partition(), error = %err, "Rewind of a partition failed.");
            }
        }
        tracing::warn!(partitions = committed.count(), "Rewound to the last committed offsets after an aborted transaction.");
        Ok(true)
    }
}

/// Runs a transactional call again (up to 3 times) while librdkafka says it is retriable.
fn retrying(mut f: impl FnMut() -> KafkaResult<()>) -> KafkaResult<()> {
    let mut tries = 0;
    loop {
        match f() {
            Err(KafkaError::Transaction(rd)) if rd.is_retriable() && tries < 3 => {
                tries += 1;
                tracing::warn!(error = %rd, "Transactional call failed (retriable); retrying.");
            }
            r => return r,
        }
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
