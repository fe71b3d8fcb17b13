//! The forwarder's link policy: which way each frame goes (Kafka, the spool, or counted and
//! dropped), when the link is judged down and up again, how the spool drains, when the spool
//! is flushed and retried, when a fatal producer is replaced, and what shutdown waits for.
//!
//! It is a pure state machine so that every transition can be driven by a fake clock in unit
//! tests: it touches neither librdkafka nor the spool nor the system clock. Its inputs are
//! the events ([`LinkPolicy::on_frame`], [`LinkPolicy::on_report`], [`LinkPolicy::on_tick`]
//! with librdkafka's link diagnosis, [`LinkPolicy::on_fatal_error`], [`LinkPolicy::on_shutdown`])
//! and the results of the I/O it asked for (`on_live_accepted`, `on_produce_refused`,
//! `on_spool_*`, `on_copied`, `on_producer_*`, `spool_failed` / `spool_ok`), each with the
//! time it happened ([`Now`]) where time matters. It logs its own transitions (link degraded,
//! back, spool drained); the forwarder logs and counts what it carries out. Its outputs are [`Action`]s, which the forwarder
//! carries out in order; the result of an action is fed back before the next action runs, and
//! the actions a result returns run before the rest (depth first). Decisions that depend on
//! the result of earlier actions come as [`Action::Continue`], decided when it is reached.
//!
//! The policy owns every piece of state that decides where a frame goes, so the rules of the
//! module doc of [`crate::forwarder`] are all here: live frames in flight are tracked until
//! acknowledged and copied to the spool when the link is judged down; a spool copy whose
//! original is still in flight is not drained (that would send it twice) and is deleted or
//! kept by the original's report; a delivered spooled frame whose deletion failed is not sent
//! again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use framelink_common::link::{LinkError, LinkErrorKind};

use super::config::ForwarderConfig;
use crate::frame::Frame;
use crate::metrics::LinkState;
use crate::spool::{ReadLimit, SpoolKey, SpoolRead};

/// A moment as the forwarder's clock reads it: monotonic time for every timer, wall time only
/// to compare with the times librdkafka's errors carry.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub instant: Instant,
    pub wall: SystemTime,
}

/// Where a frame handed to the producer came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A live frame, by its id among the policy's live frames.
    Live(u64),
    Spool(SpoolKey),
}

/// Why a frame is written to the spool (the `reason` label of `frames_spooled`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpoolReason {
    /// The link is down or the spool holds older frames.
    Backlog,
    /// Its delivery failed or timed out.
    DeliveryFailed,
    /// librdkafka's memory queue (`queue_max_bytes`) was full.
    QueueFull,
    /// librdkafka refused it for another reason.
    ProduceError,
    /// A copy of a live frame still unacknowledged when the link was judged down.
    Unacknowledged,
}

impl SpoolReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Backlog => "backlog",
            Self::DeliveryFailed => "delivery_failed",
            Self::QueueFull => "queue_full",
            Self::ProduceError => "produce_error",
            Self::Unacknowledged => "unacknowledged",
        }
    }
}

/// What a delivery report says about a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Kafka acknowledged it.
    Acked,
    /// Kafka refused it for good (too large, invalid): sending again cannot help.
    Rejected,
    /// It failed or timed out; `why` says how (with librdkafka's diagnosis of the link).
    Failed { why: String },
}

/// Why the producer refused a frame at produce time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    QueueFull,
    Other,
}

/// The rest of a tick or of the shutdown, decided once the actions before it were carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Send spooled frames (while spooling).
    Drain,
    /// Flush the spool if frames were written and `flush_every` passed.
    Flush,
    /// Retry failed deletions and a failing spool, at most once a second.
    RetrySpool,
    /// After that retry: check that the spool's disk takes writes again.
    ProbeSpool,
    /// At shutdown, after the grace period: take back from librdkafka what is still in flight.
    Purge,
}

/// What the forwarder is to do; carried out in order.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Hand a frame to the producer; report a live frame taken with [`LinkPolicy::on_live_accepted`], a refusal with
    /// [`LinkPolicy::on_produce_refused`].
    Produce { origin: Origin, frame: Frame },
    /// A frame larger than `max_message_bytes`: refused before produce, counted (`too_large`).
    DropTooLarge { frame: Frame },
    /// Write a frame to the spool; one that cannot be written is dropped and counted
    /// (`spool_io_error`). Report a stored frame with [`LinkPolicy::on_spool_stored`].
    Spool { frame: Frame, reason: SpoolReason },
    /// Copy a live frame still in flight to the spool (reason `unacknowledged`); a copy that
    /// cannot be written leaves the frame with librdkafka (not counted as a drop). Report a
    /// stored copy with [`LinkPolicy::on_spool_stored`] and [`LinkPolicy::on_copied`].
    CopyToSpool { live_id: u64, frame: Frame },
    /// Report with [`LinkPolicy::on_spool_flushed`].
    FlushSpool,
    /// Delete a delivered (or refused, or damaged) spooled frame; report with
    /// [`LinkPolicy::on_spool_removed`].
    RemoveFromSpool(SpoolKey),
    /// Read up to `max` spool records after `after`, passing over those
    /// [`LinkPolicy::holds`]; report with [`LinkPolicy::on_spool_batch`] or
    /// [`LinkPolicy::on_spool_read_failed`].
    ReadSpool { after: Option<SpoolKey>, limit: ReadLimit },
    /// A spool record that cannot be read: count it (`spool_damaged`). Its removal follows.
    CountDamaged { key: SpoolKey, reason: String },
    /// A frame the spool evicted (`drop_oldest`) while it was being sent, whose every send
    /// then failed: count it now (`spool_full_oldest`). See [`LinkPolicy::on_spool_evicted`].
    CountEvicted(SpoolKey),
    /// Check that the spool's disk takes writes again; on success report
    /// [`LinkPolicy::spool_ok`].
    ProbeSpool,
    /// Replace a producer that had a fatal error (purging the old one, whose frames come back
    /// as failed deliveries); report with [`LinkPolicy::on_producer_replaced`] or
    /// [`LinkPolicy::on_producer_replacement_failed`].
    ReplaceProducer,
    /// Take every frame back from librdkafka: they come back as failed deliveries.
    PurgeProducer,
    /// Feed delivery reports to [`LinkPolicy::on_report`] for at most this long, while
    /// [`LinkPolicy::in_flight`] is not zero.
    AwaitReports { at_most: Duration },
    /// Ask [`LinkPolicy::continue_with`] what comes next.
    Continue(Step),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// New frames go straight to Kafka.
    Direct,
    /// New frames go to the spool (or beside it, see `live_first`), and the spool drains.
    Spooling,
}

/// A live frame handed to librdkafka and not yet acknowledged.
#[derive(Debug)]
struct LiveFrame {
    frame: Frame,
    /// A copy is in the spool (the link was judged down while it waited).
    spooled: bool,
    /// When the producer took it.
    since: Instant,
}

/// A frame evicted from the spool while sends of it were in flight: lost only if none of them
/// is delivered.
#[derive(Debug)]
struct EvictedInFlight {
    /// Sends not reported yet.
    sends: u32,
    /// One was acknowledged (or rejected for good, which is counted as such).
    settled: bool,
}

/// The first delay before replacing a fatal producer again after a failed attempt.
const RECREATE_BACKOFF_MIN: Duration = Duration::from_millis(500);
const RECREATE_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long a spooled frame refused at produce time (the queue is full) waits.
const REFUSED_RETRY: Duration = Duration::from_millis(100);
/// Failed deletions and a failing spool are retried at most this often.
const SPOOL_RETRY_EVERY: Duration = Duration::from_secs(1);
/// With the link judged down and no acknowledgement for this many `message_timeout_ms`, the
/// producer is replaced; the factor doubles with each replacement up to the maximum.
const QUIET_REPLACE_FIRST: u32 = 2;
const QUIET_REPLACE_MAX: u32 = 16;
/// With the link judged down, a partition reported without a leader after the last
/// acknowledgement, and still no acknowledgement this long after the report, the producer is
/// replaced at once (librdkafka refreshes a leaderless partition's metadata within a second or
/// two when it does at all).
const LEADERLESS_PATIENCE: Duration = Duration::from_secs(5);
/// At shutdown, how long frames taken back from librdkafka may take to come back.
const PURGE_WAIT: Duration = Duration::from_secs(5);

pub struct LinkPolicy {
    cfg: ForwarderConfig,
    flush_every: Duration,
    /// A factor in [0.75, 1.25) for each retry delay.
    jitter: fn() -> f64,
    mode: Mode,
    /// Live frames in librdkafka's hands, by id (ids increase, so this is arrival order).
    live: BTreeMap<u64, LiveFrame>,
    next_live_id: u64,
    /// Spooled frames in flight, with their payload sizes (summed in `spool_in_flight_bytes`).
    spool_in_flight: HashMap<SpoolKey, u64>,
    spool_in_flight_bytes: u64,
    /// Where the drain goes on; `None`: from the start of the spool.
    cursor: Option<SpoolKey>,
    /// The limit of the last [`Action::ReadSpool`].
    drain_limit: ReadLimit,
    next_attempt: Instant,
    backoff: Duration,
    last_ok: SystemTime,
    /// The last acknowledgement, on the monotonic clock (for stall detection).
    last_ack: Instant,
    /// Times the link was judged stalled (no acknowledgement for `stall_timeout_ms`).
    stalls: u64,
    /// Why the link is judged down; `None` while deliveries succeed.
    last_failure: Option<String>,
    spool_dirty: bool,
    /// The last spool I/O error, while the spool keeps failing.
    spool_error: Option<String>,
    /// Spooled frames delivered whose deletion failed: not sent again, deletion retried.
    undeleted: HashSet<SpoolKey>,
    /// Spool copies of live frames librdkafka still holds: not drained while the original is
    /// in flight (that would send the frame twice); kept or deleted by the original's report.
    copied: HashSet<SpoolKey>,
    /// Frames the spool evicted while being sent (see [`LinkPolicy::on_spool_evicted`]).
    evicted: HashMap<SpoolKey, EvictedInFlight>,
    last_flush: Instant,
    backfill_budget: f64,
    last_backfill: Instant,
    recreate_at: Instant,
    recreate_backoff: Duration,
    /// When the producer was last replaced (or created).
    last_replaced: Instant,
    /// The current multiple of `message_timeout_ms` of silence that replaces the producer.
    quiet_factor: u32,
    /// Producers replaced because the link stayed silent (see [`LinkPolicy::on_tick`]).
    quiet_replacements: u64,
    /// The last report of a partition without a leader ([`LinkPolicy::on_leaderless`]; its
    /// wall time, compared with acknowledgements', and when the policy first saw it, for the
    /// wait), and the last one that replaced the producer.
    leaderless: Option<(SystemTime, Instant)>,
    leaderless_acted: Option<SystemTime>,
}

impl LinkPolicy {
    /// `spool_records`: frames in the spool at start (a backlog starts in [`Mode::Spooling`]).
    pub fn new(cfg: ForwarderConfig, flush_every: Duration, spool_records: u64, now: Now, jitter: fn() -> f64) -> Self {
        let backoff = Duration::from_millis(cfg.retry_min_ms);
        Self {
            cfg,
            flush_every,
            jitter,
            mode: if spool_records > 0 { Mode::Spooling } else { Mode::Direct },
            live: BTreeMap::new(),
            next_live_id: 0,
            spool_in_flight: HashMap::new(),
            spool_in_flight_bytes: 0,
            cursor: None,
            drain_limit: ReadLimit::records(0),
            next_attempt: now.instant,
            backoff,
            last_ok: now.wall,
            last_ack: now.instant,
            stalls: 0,
            last_failure: None,
            spool_dirty: false,
            spool_error: None,
            undeleted: HashSet::new(),
            copied: HashSet::new(),
            evicted: HashMap::new(),
            last_flush: now.instant,
            backfill_budget: 0.0,
            last_backfill: now.instant,
            recreate_at: now.instant,
            recreate_backoff: RECREATE_BACKOFF_MIN,
            last_replaced: now.instant,
            quiet_factor: QUIET_REPLACE_FIRST,
            quiet_replacements: 0,
            leaderless: None,
            leaderless_acted: None,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Why the link is judged down, while it is.
    pub fn last_failure(&self) -> Option<&str> {
        self.last_failure.as_deref()
    }

    /// What `/healthz` and `link_state` say.
    pub fn link_state(&self) -> LinkState {
        match (self.mode, &self.last_failure) {
            (Mode::Direct, None) => LinkState::Up,
            (_, Some(_)) => LinkState::Down,
            (Mode::Spooling, None) => LinkState::Draining,
        }
    }

    /// librdkafka reported a partition without a leader at `at` (see
    /// [`framelink_common::link::LinkStatus::leaderless`]); the same report may come again.
    /// The wait before acting runs on the monotonic clock from the moment a new report is seen.
    pub fn on_leaderless(&mut self, at: SystemTime, now: Now) {
        if self.leaderless.is_none_or(|(last, _)| at != last) {
            self.leaderless = Some((at, now.instant));
        }
    }

    /// Times the link was judged stalled (for the `link_stalls` counter).
    pub fn stalls(&self) -> u64 {
        self.stalls
    }

    /// Producers replaced because no acknowledgement came for long (see [`LinkPolicy::on_tick`]).
    pub fn quiet_replacements(&self) -> u64 {
        self.quiet_replacements
    }

    /// Frames handed to librdkafka and not reported yet (live and spooled).
    pub fn in_flight(&self) -> usize {
        self.live.len() + self.spool_in_flight.len()
    }

    /// A new frame from the encoders.
    pub fn on_frame(&mut self, frame: Frame) -> Vec<Action> {
        if frame.payload.len() as u64 > self.cfg.max_message_bytes.as_u64() {
            return vec![Action::DropTooLarge { frame }];
        }
        let direct = match self.mode {
            Mode::Direct => true,
            // A spool that cannot be written cannot hold a backlog: with the link up, send;
            // with the link judged down, one frame at a time goes as a probe of the link (the
            // spool would drop it), so frames flow again as soon as Kafka is back, not only
            // once the disk is.
            Mode::Spooling if self.spool_error.is_some() => self.last_failure.is_none() || self.in_flight() == 0,
            Mode::Spooling => self.cfg.live_first && self.last_failure.is_none(),
        };
        if direct {
            self.next_live_id += 1;
            vec![Action::Produce { origin: Origin::Live(self.next_live_id), frame }]
        } else {
            vec![Action::Spool { frame, reason: SpoolReason::Backlog }]
        }
    }

    /// The producer took live frame `id` ([`Action::Produce`]): it is tracked until its report.
    /// (A spooled frame is tracked from the moment the drain chose it.)
    pub fn on_live_accepted(&mut self, now: Now, id: u64, frame: Frame) {
        self.live.insert(id, LiveFrame { frame, spooled: false, since: now.instant });
    }

    /// The producer refused the frame of an [`Action::Produce`].
    pub fn on_produce_refused(&mut self, now: Now, origin: Origin, frame: Frame, refusal: Refusal) -> Vec<Action> {
        match origin {
            Origin::Live(_) => {
                let reason = match refusal {
                    Refusal::QueueFull => SpoolReason::QueueFull,
                    Refusal::Other => SpoolReason::ProduceError,
                };
                let mut actions = self.enter_spooling(reason.as_str());
                actions.push(Action::Spool { frame, reason });
                actions
            }
            Origin::Spool(key) => {
                // Stays in the spool; try again after the queue drains. The drain moved its
                // cursor past the frame unless it was the last one read.
                self.untrack_spooled(&key);
                if self.cursor.as_ref() == Some(&key) {
                    self.cursor = None;
                }
                self.next_attempt = now.instant + REFUSED_RETRY;
                // Evicted while the drain chose it: this send was its last chance.
                match self.settle_evicted(&key, false) {
                    Some(true) => vec![Action::CountEvicted(key)],
                    _ => Vec::new(),
                }
            }
        }
    }

    /// A delivery report for a frame handed to the producer.
    pub fn on_report(&mut self, now: Now, origin: Origin, frame: Frame, delivery: Delivery) -> Vec<Action> {
        let camera = &frame.meta.camera_id;
        let key = SpoolKey::new(camera, frame.meta.seq);
        // Evicted from the spool while this send was out: `Some(lost)`, see `on_spool_evicted`.
        let evicted = self.settle_evicted(&key, matches!(delivery, Delivery::Acked | Delivery::Rejected));
        // A live frame whose copy is in the spool already.
        let spooled_copy = match &origin {
            Origin::Live(id) => self.live.remove(id).is_some_and(|l| l.spooled).then(|| key.clone()).filter(|k| self.copied.remove(k)),
            Origin::Spool(key) => {
                self.untrack_spooled(key);
                None
            }
        };
        let mut actions = Vec::new();
        // Its copy is not needed (delivered, or refused for good) unless being sent right now.
        let drop_copy = |this: &Self, actions: &mut Vec<Action>| {
            if let Some(key) = &spooled_copy
                && !this.spool_in_flight.contains_key(key)
            {
                actions.push(Action::RemoveFromSpool(key.clone()));
            }
        };
        match delivery {
            Delivery::Acked => {
                self.last_ok = now.wall;
                self.last_ack = now.instant;
                self.quiet_factor = QUIET_REPLACE_FIRST;
                if self.last_failure.take().is_some() {
                    tracing::info!("Kafka link back: deliveries succeed.");
                }
                self.backoff = Duration::from_millis(self.cfg.retry_min_ms);
                if let Origin::Spool(key) = &origin
                    && evicted.is_none()
                {
                    actions.push(Action::RemoveFromSpool(key.clone()));
                }
                drop_copy(self, &mut actions);
            }
            Delivery::Rejected => {
                if let Origin::Spool(key) = &origin
                    && evicted.is_none()
                {
                    actions.push(Action::RemoveFromSpool(key.clone()));
                }
                drop_copy(self, &mut actions);
            }
            Delivery::Failed { why } => {
                if self.last_failure.is_none() {
                    tracing::warn!(camera, seq = frame.meta.seq, error = %why, "Delivery failed; frame kept in the spool.");
                }
                self.last_failure = Some(why);
                actions.extend(self.enter_spooling("delivery_failed"));
                if matches!(origin, Origin::Spool(_)) {
                    self.schedule_retry(now);
                }
                match (origin, evicted) {
                    // Evicted by the full policy: not spooled again (it was the oldest).
                    (_, Some(true)) => actions.push(Action::CountEvicted(key)),
                    (_, Some(false)) => {} // another send of it is out, or one was delivered
                    (Origin::Live(_), None) if spooled_copy.is_some() => {} // in the spool already
                    (Origin::Live(_), None) => actions.push(Action::Spool { frame, reason: SpoolReason::DeliveryFailed }),
                    (Origin::Spool(_), None) => {} // stays in the spool
                }
            }
        }
        actions
    }

    /// The link is judged down: new frames go to the spool, and so do copies of the live frames
    /// librdkafka still holds (flushed at once), so that a crash during the outage cannot lose
    /// them.
    fn enter_spooling(&mut self, why: &str) -> Vec<Action> {
        if self.mode == Mode::Direct {
            tracing::warn!(reason = why, "Kafka link degraded: spooling frames to disk.");
        }
        self.mode = Mode::Spooling;
        let mut actions: Vec<Action> = self.live.iter().filter(|(_, l)| !l.spooled).map(|(id, l)| Action::CopyToSpool { live_id: *id, frame: l.frame.clone() }).collect();
        if actions.is_empty() {
            return actions;
        }
        tracing::info!(frames = actions.len(), "Unacknowledged frames copied to the spool.");
        actions.push(Action::FlushSpool);
        actions
    }

    /// The copy of live frame `live_id` ([`Action::CopyToSpool`]) is in the spool.
    pub fn on_copied(&mut self, live_id: u64) {
        if let Some(l) = self.live.get_mut(&live_id) {
            self.copied.insert(SpoolKey::new(&l.frame.meta.camera_id, l.frame.meta.seq));
            l.spooled = true;
        }
    }

    /// The spool evicted `key` to make room (`drop_oldest`); true if the frame is lost (count it
    /// now). Not while it is being sent: a copy of a live frame librdkafka still holds, or a
    /// spooled frame in flight, is lost only if every such send fails ([`Action::CountEvicted`]
    /// then); it is not spooled again. A delivered frame whose deletion failed is not lost.
    pub fn on_spool_evicted(&mut self, key: &SpoolKey) -> bool {
        if self.undeleted.remove(key) {
            return false;
        }
        self.copied.remove(key);
        let live = key.parts().map_or(0, |(camera, seq)| self.live.values().filter(|l| l.frame.meta.seq == seq && l.frame.meta.camera_id == camera).count());
        let sends = live as u32 + u32::from(self.spool_in_flight.contains_key(key));
        if sends == 0 {
            return true;
        }
        self.evicted.insert(key.clone(), EvictedInFlight { sends, settled: false });
        false
    }

    /// A send of `key` reported; `None` if `key` was not evicted while in flight, else whether
    /// that was its last send and none settled it (the frame is lost).
    fn settle_evicted(&mut self, key: &SpoolKey, settled: bool) -> Option<bool> {
        let e = self.evicted.get_mut(key)?;
        e.settled |= settled;
        e.sends = e.sends.saturating_sub(1);
        if e.sends > 0 {
            return Some(false);
        }
        let lost = !e.settled;
        self.evicted.remove(key);
        Some(lost)
    }

    /// A frame was stored in the spool: a flush is due within `flush_every`.
    pub fn on_spool_stored(&mut self) {
        self.spool_dirty = true;
    }

    pub fn on_spool_flushed(&mut self, now: Now, ok: bool) {
        if ok {
            self.spool_dirty = false;
        }
        self.last_flush = now.instant;
    }

    /// The result of an [`Action::RemoveFromSpool`]: a frame whose deletion failed is not
    /// sent again, and its deletion is retried.
    pub fn on_spool_removed(&mut self, key: &SpoolKey, ok: bool) {
        if ok {
            // Flushed like a write: a deletion lost to a power cut would send the frame again.
            self.spool_dirty = true;
            self.undeleted.remove(key);
        } else {
            self.undeleted.insert(key.clone());
        }
    }

    /// A spool operation failed (the forwarder goes on, see [`crate::forwarder`]); true if the
    /// spool was working until now.
    pub fn spool_failed(&mut self, error: String) -> bool {
        self.spool_error.replace(error).is_none()
    }

    /// A spool write succeeded, or the probe did; true if the spool was failing until now.
    pub fn spool_ok(&mut self) -> bool {
        self.spool_error.take().is_some()
    }

    /// Whether the spool is failing, with its last error.
    pub fn spool_error(&self) -> Option<&str> {
        self.spool_error.as_deref()
    }

    fn schedule_retry(&mut self, now: Now) {
        self.next_attempt = now.instant + self.backoff.mul_f64((self.jitter)());
        self.backoff = (self.backoff * 2).min(Duration::from_millis(self.cfg.retry_max_ms));
        self.cursor = None;
    }

    /// A fatal librdkafka error (e.g. an idempotence sequence error after a leader change)
    /// leaves the producer refusing every send until it is replaced: the frames it held come
    /// back as failed deliveries and go to the spool (they are copied there first), a new
    /// producer sends them. `description` says which error.
    pub fn on_fatal_error(&mut self, now: Now, description: String) -> Vec<Action> {
        if now.instant < self.recreate_at {
            return Vec::new();
        }
        self.last_failure = Some(description);
        let mut actions = self.enter_spooling("producer_fatal");
        actions.push(Action::ReplaceProducer);
        actions
    }

    pub fn on_producer_replaced(&mut self, now: Now) {
        self.last_replaced = now.instant;
        self.recreate_backoff = RECREATE_BACKOFF_MIN;
        self.next_attempt = now.instant;
    }

    pub fn on_producer_replacement_failed(&mut self, now: Now) {
        self.recreate_at = now.instant + self.recreate_backoff;
        self.recreate_backoff = (self.recreate_backoff * 2).min(RECREATE_BACKOFF_MAX);
    }

    /// Periodic work (every loop turn): notice a dead link from librdkafka's `outage` (an
    /// error that concerns the whole link, see [`LinkStatus::outage`]; its time is compared
    /// with the last acknowledgement's) or from frames waiting too long for their
    /// acknowledgements, then drain, flush, and retry a failing spool ([`Action::Continue`],
    /// each at the time it is reached).
    ///
    /// [`LinkStatus::outage`]: framelink_common::link::LinkStatus::outage
    ///
    /// A link judged down with no acknowledgement for twice `message_timeout_ms` (then 4, 8,
    /// up to 16 times, until an acknowledgement) gets a new producer: librdkafka can keep a
    /// partition without a leader for good after a leader briefly went missing
    /// (confluentinc/librdkafka#5430, seen here when a loaded broker fenced itself), and then
    /// every frame times out while the broker serves others; a new producer starts from fresh
    /// metadata. During a plain outage this costs a reconnection now and then.
    pub fn on_tick(&mut self, now: Now, outage: Option<&LinkError>) -> Vec<Action> {
        let mut actions = self.check_stall(now);
        actions.extend(self.check_quiet(now));
        // librdkafka reports unreachable brokers / TLS failures long before message timeouts.
        if let Some(d) = outage {
            // Not every disconnect: a broker closing an idle connection ("in state UP") is
            // routine; refused connections, TLS and authentication failures are not.
            let serious = d.kind != LinkErrorKind::Other && !d.message.contains("in state UP");
            if serious && d.at > self.last_ok && self.mode == Mode::Direct {
                tracing::error!(error = %d, "Kafka unreachable: spooling frames to disk.");
                self.last_failure = Some(d.to_string());
                actions = self.enter_spooling(d.kind.as_str());
            }
        }
        actions.push(Action::Continue(Step::Drain));
        actions
    }

    fn check_quiet(&mut self, now: Now) -> Vec<Action> {
        // Once between two acknowledgements: a broker that keeps answering "no leader" would
        // otherwise cost a new producer every few seconds; the quiet rule below, with its
        // growing patience, goes on from there.
        if let Some((at, seen)) = self.leaderless
            && self.last_failure.is_some()
            && at > self.last_ok
            && self.leaderless_acted.is_none_or(|acted| self.last_ok > acted)
            && now.instant.saturating_duration_since(seen) >= LEADERLESS_PATIENCE
            && now.instant >= self.recreate_at
        {
            tracing::warn!(
                "A partition has been without a leader for {:.0} s, with the link judged down and no acknowledgement since: replacing the Kafka producer (librdkafka can keep a partition without a leader for good, confluentinc/librdkafka#5430).",
                now.instant.saturating_duration_since(seen).as_secs_f64()
            );
            self.leaderless_acted = Some(at);
            self.quiet_replacements += 1;
            let mut actions = self.enter_spooling("producer_leaderless");
            actions.push(Action::ReplaceProducer);
            return actions;
        }
        let quiet_for = Duration::from_millis(self.cfg.message_timeout_ms) * self.quiet_factor;
        let since = self.last_ack.max(self.last_replaced);
        if self.last_failure.is_none() || now.instant.saturating_duration_since(since) < quiet_for || now.instant < self.recreate_at {
            return Vec::new();
        }
        tracing::warn!(
            "No acknowledgement for {:.0} s with the link judged down: replacing the Kafka producer (librdkafka can keep a partition without a leader for good, confluentinc/librdkafka#5430).",
            now.instant.saturating_duration_since(self.last_ack).as_secs_f64()
        );
        self.quiet_factor = (self.quiet_factor * 2).min(QUIET_REPLACE_MAX);
        self.quiet_replacements += 1;
        // Treated as if it were fatal: the frames it holds are copied to the spool first.
        let mut actions = self.enter_spooling("producer_quiet");
        actions.push(Action::ReplaceProducer);
        actions
    }

    /// Frames waiting `stall_timeout_ms` for their acknowledgement are copied to the spool
    /// rather than left in memory for the whole `message_timeout_ms`: a link that drops packets
    /// silently shows no error until librdkafka's timeouts. With no acknowledgement at all for
    /// that long the link is judged stalled (down: new frames go to the spool, the drain probes
    /// one at a time); while acknowledgements still come (a slow link, one partition's leader
    /// unreachable) only the spooling starts, and the drain's window bounds what waits in memory.
    fn check_stall(&mut self, now: Now) -> Vec<Action> {
        if self.cfg.stall_timeout_ms == 0 || self.last_failure.is_some() {
            return Vec::new();
        }
        let stall = Duration::from_millis(self.cfg.stall_timeout_ms);
        // Ids increase: the first live frame waited longest (copied to the spool or not).
        let Some(oldest) = self.live.values().next() else { return Vec::new() };
        let waited = now.instant.saturating_duration_since(oldest.since);
        if waited < stall {
            return Vec::new();
        }
        let quiet = now.instant.saturating_duration_since(self.last_ack);
        if quiet >= stall {
            let waiting = self.live.len();
            let why = format!("link stalled: no acknowledgement for {:.1} s while {waiting} frames wait (forwarder.stall_timeout_ms)", quiet.as_secs_f64());
            tracing::error!(waiting, "Kafka link stalled: no acknowledgement for {:.1} s; spooling frames to disk.", quiet.as_secs_f64());
            self.stalls += 1;
            self.last_failure = Some(why);
            return self.enter_spooling("stalled");
        }
        // Acknowledgements still come: copy what waited too long, without judging the link down.
        let late = self.live.values().filter(|l| !l.spooled && now.instant.saturating_duration_since(l.since) >= stall).count();
        if late == 0 {
            return Vec::new();
        }
        tracing::warn!(late, "Frames waited {:.1} s for their acknowledgement: spooling.", waited.as_secs_f64());
        self.enter_spooling("slow_acknowledgements")
    }

    /// The rest of a tick or of the shutdown, from `step` on.
    pub fn continue_with(&mut self, now: Now, step: Step) -> Vec<Action> {
        match step {
            Step::Drain => {
                let mut actions = if self.mode == Mode::Spooling { self.drain(now) } else { Vec::new() };
                actions.push(Action::Continue(Step::Flush));
                actions
            }
            Step::Flush => {
                let mut actions = Vec::new();
                if self.spool_dirty && now.instant.saturating_duration_since(self.last_flush) >= self.flush_every {
                    actions.push(Action::FlushSpool);
                }
                actions.push(Action::Continue(Step::RetrySpool));
                actions
            }
            Step::RetrySpool => {
                // Deletions that failed, and a spool that failed: try again now and then.
                if (self.undeleted.is_empty() && self.spool_error.is_none()) || now.instant.saturating_duration_since(self.last_flush) < SPOOL_RETRY_EVERY {
                    return Vec::new();
                }
                let mut undeleted: Vec<SpoolKey> = self.undeleted.iter().cloned().collect();
                undeleted.sort();
                let mut actions: Vec<Action> = undeleted.into_iter().map(Action::RemoveFromSpool).collect();
                actions.push(Action::FlushSpool);
                actions.push(Action::Continue(Step::ProbeSpool));
                actions
            }
            Step::ProbeSpool => {
                if self.undeleted.is_empty() && self.spool_error.is_some() {
                    vec![Action::ProbeSpool]
                } else {
                    Vec::new()
                }
            }
            Step::Purge => {
                let mut actions = Vec::new();
                if self.in_flight() > 0 {
                    // Give the frames back from librdkafka (purged reports arrive as errors) and spool them.
                    actions.push(Action::PurgeProducer);
                    actions.push(Action::AwaitReports { at_most: PURGE_WAIT });
                }
                actions.push(Action::FlushSpool);
                actions
            }
        }
    }

    /// Sends spooled frames: oldest first, at most `drain_window` in flight, at `backfill_fps`
    /// with `live_first`, one at a time while the link is judged down (a probe), and not before
    /// the retry delay. Without `live_first`, only once no live frame is in flight, so a frame
    /// that fails late cannot be overtaken by spooled frames of the same camera.
    fn drain(&mut self, now: Now) -> Vec<Action> {
        if now.instant < self.next_attempt || (!self.cfg.live_first && !self.live.is_empty()) {
            return Vec::new();
        }
        let mut room = self.cfg.drain_window.saturating_sub(self.spool_in_flight.len());
        if self.cfg.live_first {
            self.backfill_budget = (self.backfill_budget + now.instant.saturating_duration_since(self.last_backfill).as_secs_f64() * self.cfg.backfill_fps)
                .min(self.cfg.backfill_fps.max(1.0));
            self.last_backfill = now.instant;
            room = room.min(self.backfill_budget as usize);
        }
        if self.last_failure.is_some() {
            // Probe with one frame until a delivery succeeds.
            room = room.min(1).min(usize::from(self.spool_in_flight.is_empty()));
        }
        // Bytes in flight stay under `drain_window_bytes` (see its doc); the first frame goes
        // whatever its size.
        let bytes = self.cfg.drain_window_bytes.as_u64().saturating_sub(self.spool_in_flight_bytes);
        if room == 0 || (bytes == 0 && !self.spool_in_flight.is_empty()) {
            return Vec::new();
        }
        self.drain_limit = ReadLimit { records: room, bytes, at_least_one: self.spool_in_flight.is_empty() };
        vec![Action::ReadSpool { after: self.cursor.clone(), limit: self.drain_limit }]
    }

    /// A spooled frame the drain must not read now: in flight, delivered but not yet deleted,
    /// or the copy of a live frame still in flight. [`Action::ReadSpool`] passes over these
    /// (without reading their files); [`LinkPolicy::on_spool_batch`] skips any that come back.
    pub fn holds(&self, key: &SpoolKey) -> bool {
        self.spool_in_flight.contains_key(key) || self.undeleted.contains(key) || self.copied.contains(key)
    }

    /// A spooled frame's send ended (reported or refused).
    fn untrack_spooled(&mut self, key: &SpoolKey) {
        if let Some(bytes) = self.spool_in_flight.remove(key) {
            self.spool_in_flight_bytes -= bytes;
        }
    }

    /// The records an [`Action::ReadSpool`] returned; `spool_records`: the frames in the spool.
    pub fn on_spool_batch(&mut self, batch: Vec<SpoolRead>, spool_records: u64) -> Vec<Action> {
        if batch.is_empty() && !self.drain_limit.at_least_one {
            // Nothing left past the cursor, or nothing that fits beside the frames in flight:
            // from the start next time either way (frames behind the cursor — other cameras',
            // a refused one's — wait for this), but no judgement on the spool being empty.
            self.cursor = None;
            return Vec::new();
        }
        if batch.is_empty() {
            // Back to Direct only once the link is known to work: with the link down and an
            // empty spool, new frames keep going to the spool and serve as probes.
            if self.cursor.take().is_none() && self.spool_in_flight.is_empty() && self.last_failure.is_none() && spool_records == 0 {
                if self.mode == Mode::Spooling {
                    tracing::info!("Spool drained: frames go straight to Kafka again.");
                }
                self.mode = Mode::Direct;
            }
            return Vec::new();
        }
        let mut room = self.drain_limit.records;
        let mut actions = Vec::new();
        for (key, frame) in batch {
            if room == 0 {
                break;
            }
            if self.holds(&key) {
                self.cursor = Some(key);
                continue;
            }
            match frame {
                Ok(frame) => {
                    let bytes = frame.payload.len() as u64;
                    if !self.spool_in_flight.is_empty() && self.spool_in_flight_bytes + bytes > self.cfg.drain_window_bytes.as_u64() {
                        // Over the byte window (a spool that returned more than asked): next time.
                        break;
                    }
                    self.cursor = Some(key.clone());
                    self.spool_in_flight.insert(key.clone(), bytes);
                    self.spool_in_flight_bytes += bytes;
                    room -= 1;
                    if self.cfg.live_first {
                        self.backfill_budget -= 1.0;
                    }
                    actions.push(Action::Produce { origin: Origin::Spool(key), frame });
                }
                Err(reason) => {
                    self.cursor = Some(key.clone());
                    actions.push(Action::CountDamaged { key: key.clone(), reason });
                    actions.push(Action::RemoveFromSpool(key));
                }
            }
        }
        actions
    }

    /// An [`Action::ReadSpool`] failed: the drain backs off.
    pub fn on_spool_read_failed(&mut self, now: Now) {
        self.schedule_retry(now);
    }

    /// Capture stopped: wait up to `grace` for what is in flight (not at all with the link
    /// down: waiting cannot help), take back from librdkafka what is left and spool it, flush.
    pub fn on_shutdown(&mut self, grace: Duration) -> Vec<Action> {
        let grace = if self.last_failure.is_some() { Duration::ZERO } else { grace };
        tracing::info!(in_flight = self.in_flight(), "Forwarder stopping: waiting for acknowledgements.");
        vec![Action::AwaitReports { at_most: grace }, Action::Continue(Step::Purge)]
    }
}

#[cfg(test)]
mod tests;
