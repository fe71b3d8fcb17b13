//! Which consumed offsets are still in flight, and how far each partition may be committed.
//!
//! A record is "in flight" from the moment the poll loop hands it to a processing thread
//! until every output it produced (result, event, dead letter) is acknowledged by Kafka.
//! Frames finish out of order (cameras run on different threads), so a partition's committable
//! position is the lowest offset still in flight, or one past the highest offset taken when
//! none is: never past a frame still being worked on, and never short of one already done
//! (with 11 and 12 in flight, `done(12)` then `done(11)` makes the position 13, not 12).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::topic_partition::TopicPartition;


#[derive(Default)]
struct State {
    /// Per partition: offset → outputs still unacknowledged (+1 while the record is processed).
    parts: HashMap<TopicPartition, BTreeMap<i64, u32>>,
    /// Per partition: the highest offset taken since the partition was (re)started.
    high: HashMap<TopicPartition, i64>,
    /// Per partition: the next offset to consume, once everything before it is done; taken by
    /// the transactional committer, overwritten in at-least-once mode.
    ready: HashMap<TopicPartition, i64>,
}

#[derive(Default)]
pub struct Tracker {
    state: Mutex<State>,
    changed: Condvar,
    /// Bumped by [`Tracker::clear`]: acknowledgements for work taken before it are ignored.
    epoch: AtomicU64,
}

impl Tracker {
    /// The poll loop took `offset` of `tp`.
    pub fn start(&self, tp: &TopicPartition, offset: i64) {
        let mut st = self.state.lock().unwrap();
        st.parts.entry(tp.clone()).or_default().insert(offset, 0);
        let high = st.high.entry(tp.clone()).or_insert(offset);
        *high = (*high).max(offset);
    }

    /// `offset` will wait for `n` more acknowledgements.
    pub fn add_outputs(&self, tp: &TopicPartition, offset: i64, n: u32) {
        if let Some(o) = self.state.lock().unwrap().parts.get_mut(tp).and_then(|m| m.get_mut(&offset)) {
            *o += n;
        }
    }

    /// One acknowledgement for `offset` (an output delivered, or the record itself finished).
    /// When the partition's committable position moves, `on_move(next)` runs *under the
    /// tracker's lock* (so a waiter in [`Tracker::wait_idle`] sees the offset stored), and the
    /// new position is returned.
    pub fn done_then(&self, tp: &TopicPartition, offset: i64, on_move: impl FnOnce(i64)) -> Option<i64> {
        let mut st = self.state.lock().unwrap();
        let m = st.parts.get_mut(tp)?;
        let left = m.get_mut(&offset)?;
        *left = left.saturating_sub(1);
        if *left > 0 {
            return None;
        }
        let was_first = m.keys().next() == Some(&offset);
        m.remove(&offset);
        let lowest_left = m.keys().next().copied();
        let high = st.high.get(tp).copied().unwrap_or(offset).max(offset);
        let next = was_first.then(|| lowest_left.unwrap_or(high + 1));
        if let Some(next) = next {
            st.ready.insert(tp.clone(), next);
            on_move(next);
        }
        self.changed.notify_all();
        next
    }

    pub fn done(&self, tp: &TopicPartition, offset: i64) -> Option<i64> {
        self.done_then(tp, offset, |_| {})
    }

    /// Records consumed and not yet done, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.state.lock().unwrap().parts.values().map(BTreeMap::len).sum()
    }

    /// Waits until the given partitions (all when `None`) have nothing in flight.
    pub fn wait_idle(&self, only: Option<&[TopicPartition]>, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock().unwrap();
        loop {
            let busy = st.parts.iter().any(|(tp, m)| !m.is_empty() && only.is_none_or(|o| o.contains(tp)));
            if !busy {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self.changed.wait_timeout(st, deadline - now).unwrap().0;
        }
    }

    /// Takes the positions that moved since the last call (for a transaction's offsets).
    pub fn take_ready(&self) -> HashMap<TopicPartition, i64> {
        std::mem::take(&mut self.state.lock().unwrap().ready)
    }

    /// Drops what is known about these partitions (revoked).
    pub fn forget(&self, tps: &[TopicPartition]) {
        let mut st = self.state.lock().unwrap();
        for tp in tps {
            st.parts.remove(tp);
            st.high.remove(tp);
            st.ready.remove(tp);
        }
        self.changed.notify_all();
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Drops everything and starts a new epoch (after an aborted transaction, before rewinding).
    pub fn clear(&self) {
        let mut st = self.state.lock().unwrap();
        self.epoch.fetch_add(1, Ordering::SeqCst);
        st.parts.clear();
        st.high.clear();
        st.ready.clear();
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committable_position_never_passes_a_frame_in_flight() {
        let t = Tracker::default();
        let tp = TopicPartition::new("frames", 0);
        for o in 10..14 {
            t.start(&tp, o);
            t.add_outputs(&tp, o, 1);
        }
        assert_eq!(t.done(&tp, 12), None, "12 done, but 10 and 11 are in flight");
        assert_eq!(t.done(&tp, 11), None);
        assert!(t.take_ready().is_empty(), "nothing committable while 10 is in flight");
        assert_eq!(t.done(&tp, 10), Some(13), "10 done: 11, 12 done too, 13 is next");
        t.add_outputs(&tp, 13, 1); // two outputs (result + event)
        assert_eq!(t.done(&tp, 13), None);
        assert_eq!(t.done(&tp, 13), Some(14));
        assert_eq!(t.in_flight(), 0);
        assert!(t.wait_idle(None, Duration::from_millis(10)));
        assert_eq!(t.take_ready(), HashMap::from([(tp.clone(), 14)]));
        assert!(t.take_ready().is_empty(), "taken once");
    }

    /// Every completion order of three offsets in flight ends at the position past the last,
    /// and no intermediate position ever passes an offset still in flight.
    #[test]
    fn every_completion_order_of_three_offsets_commits_past_the_last() {
        let orders = [[11, 12, 13], [11, 13, 12], [12, 11, 13], [12, 13, 11], [13, 11, 12], [13, 12, 11]];
        for order in orders {
            let t = Tracker::default();
            let tp = TopicPartition::new("frames", 0);
            for o in 11..=13 {
                t.start(&tp, o);
            }
            let mut done = std::collections::BTreeSet::new();
            let mut position = None;
            for o in order {
                done.insert(o);
                if let Some(next) = t.done(&tp, o) {
                    position = Some(next);
                }
                // The position is the lowest offset not yet done (or one past the last).
                let expected = (11..=14).find(|x| !done.contains(x)).unwrap();
                if let Some(p) = position {
                    assert_eq!(p, expected, "order {order:?}: after {o} done");
                }
            }
            assert_eq!(position, Some(14), "order {order:?}: all done, the next offset to consume is 14");
            assert_eq!(t.take_ready(), HashMap::from([(tp.clone(), 14)]), "order {order:?}");
        }
    }

    #[test]
    fn the_store_runs_before_a_waiter_sees_the_partition_idle() {
        let t = std::sync::Arc::new(Tracker::default());
        let tp = TopicPartition::new("frames", 3);
        t.start(&tp, 7);
        let stored = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(-1));
        let (t2, s2, tp2) = (t.clone(), stored.clone(), tp.clone());
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            t2.done_then(&tp2, 7, |next| {
                std::thread::sleep(Duration::from_millis(20));
                s2.store(next, std::sync::atomic::Ordering::SeqCst);
            });
        });
        assert!(t.wait_idle(Some(std::slice::from_ref(&tp)), Duration::from_secs(5)));
        assert_eq!(stored.load(std::sync::atomic::Ordering::SeqCst), 8, "idle only after the offset was stored");
        h.join().unwrap();
    }

    #[test]
    fn forgotten_and_unknown_offsets_are_ignored() {
        let t = Tracker::default();
        let tp = TopicPartition::new("frames", 0);
        t.start(&tp, 1);
        t.forget(std::slice::from_ref(&tp));
        assert_eq!(t.done(&tp, 1), None);
        t.add_outputs(&tp, 1, 1);
        assert_eq!(t.in_flight(), 0);
        t.start(&tp, 2);
        let before = t.epoch();
        t.clear();
        assert_eq!((t.in_flight(), t.done(&tp, 2), t.epoch()), (0, None, before + 1));
    }
}

/// Property test: under any completion order of any set of records (each waiting for a few
/// outputs), the committable position never passes a record still in flight and ends one past
/// the highest offset taken.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn the_position_never_passes_a_record_in_flight(
            records in proptest::collection::vec((1i64..4, 0u32..3), 1..25),
            order in any::<Vec<proptest::sample::Index>>(),
        ) {
            let tp = TopicPartition::new("frames", 0);
            let t = Tracker::default();
            // Offsets with gaps (compacted or transactional markers), each with its outputs.
            let mut offset = 100;
            let mut units: Vec<i64> = Vec::new();
            let mut left: BTreeMap<i64, u32> = BTreeMap::new();
            for (gap, outputs) in &records {
                offset += gap;
                t.start(&tp, offset);
                t.add_outputs(&tp, offset, outputs + 1);
                left.insert(offset, outputs + 1);
                units.extend(std::iter::repeat_n(offset, (*outputs + 1) as usize));
            }
            let high = offset;
            let mut picks = order.into_iter();
            let mut last = None;
            while !units.is_empty() {
                let i = picks.next().map_or(0, |ix| ix.index(units.len()));
                let o = units.swap_remove(i);
                let n = left.get_mut(&o).unwrap();
                *n -= 1;
                if *n == 0 {
                    left.remove(&o);
                }
                if let Some(next) = t.done(&tp, o) {
                    let lowest = left.keys().next().copied();
                    prop_assert_eq!(next, lowest.unwrap_or(high + 1), "the position is the lowest record in flight, or past the highest");
                    prop_assert!(last.is_none_or(|l| next > l), "the position only moves forward");
                    last = Some(next);
                }
            }
            prop_assert_eq!(t.in_flight(), 0);
            prop_assert_eq!(t.take_ready().get(&tp).copied(), Some(high + 1));
        }
    }
}

