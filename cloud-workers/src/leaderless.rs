//! Outputs stuck behind a partition librdkafka keeps without a leader.
//!
//! librdkafka 2.12 can keep a partition whose leader it lost (a broker that fenced itself, a
//! leader election) without one for good, logging "new leader-1 not found in cache"
//! (confluentinc/librdkafka#5430; recorded by [`framelink_common::link::LinkContext`], for the
//! worker's producer and consumer alike, again with each response that says so). The agent met
//! it after a paused broker came back; its fix is a new producer. An at-least-once worker's
//! outputs never time out (`message.timeout.ms = 0`), so such a partition would hold its
//! outputs — and the offsets behind them — until the worker restarts. This watcher says when to
//! replace the producer the same way as after a fatal error (what the old one held is purged and
//! sent again, see `poll.rs`): when outputs have waited [`LEADERLESS_GRACE`] with none
//! acknowledged since the latest report, and at most once between two acknowledgements (the
//! report keeps coming while the partition stays leaderless: without that, a new producer every
//! few seconds, each purge sending its outputs again). Reports and acknowledgements are both
//! wall-clock times of this process. The watcher does not know which partition an output went
//! to: a worker whose other partitions keep delivering is not helped by this rule.

use std::time::{Duration, Instant, SystemTime};

/// How long outputs may wait, with none acknowledged since a leaderless report, before the
/// producer is replaced (the agent waits as long after the report).
pub const LEADERLESS_GRACE: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct LeaderlessWatch {
    /// The last acknowledgement time when the producer was last replaced for a report: no
    /// second replacement before an acknowledgement after it.
    replaced_at_output: Option<Option<SystemTime>>,
    /// Since when outputs have been waiting after a report.
    waiting_since: Option<Instant>,
}

impl LeaderlessWatch {
    /// Called on every turn of the poll loop: `report`, the latest leaderless report;
    /// `last_output`, when an output was last acknowledged; `in_flight`, outputs the producer
    /// holds. True when the producer should be replaced now; call [`Self::replaced`] once it was.
    pub fn due(&mut self, report: Option<SystemTime>, last_output: Option<SystemTime>, in_flight: usize, now: Instant) -> bool {
        let stuck = report.is_some_and(|at| last_output.is_none_or(|o| o < at)) && in_flight > 0 && self.replaced_at_output != Some(last_output);
        if !stuck {
            self.waiting_since = None;
            return false;
        }
        now.duration_since(*self.waiting_since.get_or_insert(now)) >= LEADERLESS_GRACE
    }

    /// The producer was replaced while the last acknowledgement was `last_output`.
    pub fn replaced(&mut self, last_output: Option<SystemTime>) {
        self.replaced_at_output = Some(last_output);
        self.waiting_since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_waiting_past_the_grace_after_a_report_replace_the_producer_once_between_acknowledgements() {
        let mut w = LeaderlessWatch::default();
        let t0 = Instant::now();
        let at = SystemTime::now();
        let before = Some(at - Duration::from_secs(1));
        // No report: nothing to do, however long outputs wait.
        assert!(!w.due(None, before, 10, t0));
        assert!(!w.due(None, before, 10, t0 + Duration::from_secs(60)));
        // A report, outputs waiting: not before the grace has passed since they were seen waiting.
        assert!(!w.due(Some(at), before, 3, t0));
        assert!(!w.due(Some(at), before, 3, t0 + LEADERLESS_GRACE - Duration::from_millis(1)));
        assert!(w.due(Some(at), before, 3, t0 + LEADERLESS_GRACE));
        // Not replaced (making a producer failed): still due on the next turn.
        assert!(w.due(Some(at), before, 3, t0 + LEADERLESS_GRACE + Duration::from_millis(100)));
        w.replaced(before);
        // The report keeps coming, nothing acknowledged: no second replacement, however long.
        for k in 1..20u32 {
            let again = at + Duration::from_secs(k as u64);
            assert!(!w.due(Some(again), before, 3, t0 + LEADERLESS_GRACE * (k + 1)), "turn {k}");
        }
        // An acknowledgement, then a new report and outputs waiting again: once more.
        let acked = Some(at + Duration::from_secs(30));
        let at2 = at + Duration::from_secs(31);
        let t1 = t0 + Duration::from_secs(200);
        assert!(!w.due(Some(at2), acked, 3, t1));
        assert!(w.due(Some(at2), acked, 3, t1 + LEADERLESS_GRACE));
    }

    #[test]
    fn a_delivery_after_the_report_or_nothing_in_flight_means_no_replacement() {
        let t0 = Instant::now();
        let at = SystemTime::now();
        // Acknowledged after the report: resolved.
        let mut w = LeaderlessWatch::default();
        let after = Some(at + Duration::from_millis(5));
        assert!(!w.due(Some(at), after, 3, t0));
        assert!(!w.due(Some(at), after, 3, t0 + LEADERLESS_GRACE * 3));
        // Nothing in flight (an idle worker): no waiting, and the clock starts only when outputs do wait.
        let mut w = LeaderlessWatch::default();
        let before = Some(at - Duration::from_secs(1));
        assert!(!w.due(Some(at), before, 0, t0));
        assert!(!w.due(Some(at), before, 0, t0 + LEADERLESS_GRACE * 4));
        assert!(!w.due(Some(at), before, 2, t0 + LEADERLESS_GRACE * 4), "outputs just sent have not waited yet");
        // Outputs that leave before the grace reset it.
        assert!(!w.due(Some(at), before, 0, t0 + LEADERLESS_GRACE * 5));
        assert!(!w.due(Some(at), before, 2, t0 + LEADERLESS_GRACE * 6));
        assert!(w.due(Some(at), before, 2, t0 + LEADERLESS_GRACE * 7));
        // Never acknowledged anything yet (no last output) counts as before the report.
        let mut w = LeaderlessWatch::default();
        assert!(!w.due(Some(at), None, 1, t0));
        assert!(w.due(Some(at), None, 1, t0 + LEADERLESS_GRACE));
    }
}
