//! Outputs stuck behind a partition librdkafka keeps without a leader.
//!
//! librdkafka 2.12 can keep a partition whose leader it lost (a broker that fenced itself, a
//! leader election) without one for good, logging "new leader-1 not found in cache"
//! (confluentinc/librdkafka#5430; recorded by [`framelink_common::link::LinkContext`]). The
//! agent met it after a paused broker came back; its fix is a new producer. An at-least-once
//! worker's outputs never time out (`message.timeout.ms = 0`), so such a partition would hold its
//! outputs — and the offsets behind them — until the worker restarts. This watcher says when to
//! replace the producer the same way as after a fatal error (what the old one held is purged and
//! sent again, see `poll.rs`): once per report, after outputs have waited
//! [`LEADERLESS_GRACE`] with none delivered since the report. A report followed by any delivery
//! counts as resolved (the watcher does not know which partition an output went to: a worker
//! whose other partitions keep delivering is not helped by this rule).

use std::time::{Duration, Instant, SystemTime};

/// How long outputs may wait, with none delivered since a leaderless report, before the
/// producer is replaced (the agent's rule uses the same).
pub const LEADERLESS_GRACE: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct LeaderlessWatch {
    /// The report already acted on (or seen resolved).
    handled: Option<SystemTime>,
    /// Since when outputs have been waiting after an unhandled report.
    waiting_since: Option<Instant>,
}

impl LeaderlessWatch {
    /// Called on every turn of the poll loop: `report`, the last leaderless report;
    /// `last_output`, when an output was last acknowledged; `in_flight`, outputs the producer
    /// holds. True when the producer should be replaced now (then the report counts as handled).
    pub fn due(&mut self, report: Option<SystemTime>, last_output: Option<SystemTime>, in_flight: usize, now: Instant) -> bool {
        let Some(at) = report.filter(|at| self.handled != Some(*at)) else {
            self.waiting_since = None;
            return false;
        };
        if last_output.is_some_and(|o| o >= at) {
            // Something was delivered since the report: the cluster found a leader again.
            self.handled = Some(at);
            self.waiting_since = None;
            return false;
        }
        if in_flight == 0 {
            self.waiting_since = None;
            return false;
        }
        let since = *self.waiting_since.get_or_insert(now);
        if now.duration_since(since) < LEADERLESS_GRACE {
            return false;
        }
        self.handled = Some(at);
        self.waiting_since = None;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_waiting_past_the_grace_after_a_report_replace_the_producer_once() {
        let mut w = LeaderlessWatch::default();
        let t0 = Instant::now();
        let at = SystemTime::now();
        let before = at - Duration::from_secs(1);
        // No report: nothing to do, however long outputs wait.
        assert!(!w.due(None, Some(before), 10, t0));
        assert!(!w.due(None, Some(before), 10, t0 + Duration::from_secs(60)));
        // A report, outputs waiting: not before the grace has passed since they were seen waiting.
        assert!(!w.due(Some(at), Some(before), 3, t0));
        assert!(!w.due(Some(at), Some(before), 3, t0 + LEADERLESS_GRACE - Duration::from_millis(1)));
        assert!(w.due(Some(at), Some(before), 3, t0 + LEADERLESS_GRACE));
        // Once per report.
        assert!(!w.due(Some(at), Some(before), 3, t0 + 10 * LEADERLESS_GRACE));
        // A new report starts over.
        let at2 = at + Duration::from_secs(30);
        assert!(!w.due(Some(at2), Some(before), 3, t0 + Duration::from_secs(100)));
        assert!(w.due(Some(at2), Some(before), 3, t0 + Duration::from_secs(100) + LEADERLESS_GRACE));
    }

    #[test]
    fn a_delivery_after_the_report_or_nothing_in_flight_means_no_replacement() {
        let t0 = Instant::now();
        let at = SystemTime::now();
        // Delivered after the report: resolved, for good.
        let mut w = LeaderlessWatch::default();
        assert!(!w.due(Some(at), Some(at + Duration::from_millis(5)), 3, t0));
        assert!(!w.due(Some(at), Some(at - Duration::from_secs(1)), 3, t0 + LEADERLESS_GRACE * 3));
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
        // Never delivered anything yet (no last output) counts as before the report.
        let mut w = LeaderlessWatch::default();
        assert!(!w.due(Some(at), None, 1, t0));
        assert!(w.due(Some(at), None, 1, t0 + LEADERLESS_GRACE));
    }
}
