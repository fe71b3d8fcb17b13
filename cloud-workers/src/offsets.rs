//! Committed positions: a record's outputs are acknowledged one by one, and once all of a
//! record's are, its partition's position may move (the [`Tracker`] says how far). In
//! at-least-once mode the position is stored on the consumer and librdkafka auto-commits it;
//! in exactly-once mode it waits in the tracker for the next transaction (see [`crate::txn`]).
//!
//! Pausing a partition lives here too: it is how a partition whose dead letter Kafka refuses
//! stops, so that nothing past that input is fetched while its offset cannot be committed.

use std::sync::{Arc, Mutex};

use crate::topic_partition::TopicPartition;
use crate::tracker::Tracker;

/// What [`Offsets`] needs of the consumer (implemented by the worker's consumer; a fake in
/// tests).
pub trait PartitionControl: Send + Sync {
    /// Stores `next` (the next offset to consume) as `tp`'s position to commit.
    fn store(&self, tp: &TopicPartition, next: i64);
    /// Stops (`true`) or restarts fetching `tp`.
    fn pause(&self, tp: &TopicPartition, pause: bool);
}

pub struct Offsets {
    tracker: Arc<Tracker>,
    /// The consumer, once it exists and until it stops.
    consumer: Mutex<Option<Arc<dyn PartitionControl>>>,
    /// At-least-once: store positions on the consumer (exactly-once: the transaction takes them).
    store: bool,
}

impl Offsets {
    pub fn new(tracker: Arc<Tracker>, store: bool) -> Self {
        Self { tracker, consumer: Mutex::new(None), store }
    }

    pub fn attach(&self, consumer: Option<Arc<dyn PartitionControl>>) {
        *self.consumer.lock().unwrap() = consumer;
    }

    pub fn tracker(&self) -> &Arc<Tracker> {
        &self.tracker
    }

    /// The tracker's epoch (exactly-once: bumped by an abort).
    pub fn epoch(&self) -> u64 {
        self.tracker.epoch()
    }

    /// One unit (an output, or the record's own processing) of `offset` taken in `epoch` is
    /// done; stores the partition's position when it moves.
    pub fn output_done(&self, tp: &TopicPartition, offset: i64, epoch: u64) {
        if epoch != self.tracker.epoch() {
            return; // from before an aborted transaction: already forgotten
        }
        let consumer = self.consumer.lock().unwrap().clone();
        self.tracker.done_then(tp, offset, |next| {
            if let Some(c) = consumer.as_ref().filter(|_| self.store) {
                c.store(tp, next);
            }
        });
    }

    /// Stops (`true`) or restarts fetching `tp` (a partition whose dead letters are refused).
    pub fn pause(&self, tp: &TopicPartition, pause: bool) {
        if let Some(c) = self.consumer.lock().unwrap().clone() {
            c.pause(tp, pause);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct FakeConsumer {
        stored: Mutex<Vec<(TopicPartition, i64)>>,
        paused: Mutex<Vec<(TopicPartition, bool)>>,
    }

    impl PartitionControl for FakeConsumer {
        fn store(&self, tp: &TopicPartition, next: i64) {
            self.stored.lock().unwrap().push((tp.clone(), next));
        }
        fn pause(&self, tp: &TopicPartition, pause: bool) {
            self.paused.lock().unwrap().push((tp.clone(), pause));
        }
    }

    fn tp() -> TopicPartition {
        TopicPartition::new("frames", 3)
    }

    #[test]
    fn a_position_is_stored_only_when_every_unit_of_the_record_is_done() {
        let tracker = Arc::new(Tracker::default());
        let offsets = Offsets::new(tracker.clone(), true);
        let fake = Arc::new(FakeConsumer::default());
        offsets.attach(Some(fake.clone()));
        tracker.start(&tp(), 10);
        tracker.add_outputs(&tp(), 10, 3); // result, event and the record's own processing
        offsets.output_done(&tp(), 10, 0);
        offsets.output_done(&tp(), 10, 0);
        assert!(fake.stored.lock().unwrap().is_empty(), "one unit is still out");
        offsets.output_done(&tp(), 10, 0);
        assert_eq!(*fake.stored.lock().unwrap(), vec![(tp(), 11)], "the next offset to consume is stored");
    }

    #[test]
    fn exactly_once_positions_are_not_stored_and_stale_epochs_are_ignored() {
        let tracker = Arc::new(Tracker::default());
        let offsets = Offsets::new(tracker.clone(), false);
        let fake = Arc::new(FakeConsumer::default());
        offsets.attach(Some(fake.clone()));
        tracker.start(&tp(), 4);
        offsets.output_done(&tp(), 4, 0);
        assert!(fake.stored.lock().unwrap().is_empty(), "exactly-once: the transaction commits");
        assert_eq!(tracker.take_ready().get(&tp()), Some(&5));
        tracker.start(&tp(), 5);
        tracker.clear();
        offsets.output_done(&tp(), 5, 0);
        assert_eq!(tracker.take_ready().get(&tp()), None, "an acknowledgement from before an abort is ignored");
        offsets.pause(&tp(), true);
        offsets.attach(None);
        offsets.pause(&tp(), false);
        assert_eq!(*fake.paused.lock().unwrap(), vec![(tp(), true)], "no consumer, nothing to pause");
    }
}
