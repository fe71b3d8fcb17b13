//! The link policy driven by a fake clock, a fake spool and a fake producer: every transition,
//! and that no frame is lost or sent twice on the way.
//!
//! [`World`] carries out the policy's actions the way the forwarder does (in order, results
//! fed back at once, the actions a result brings first); the broker is a queue of frames in
//! flight whose reports the test hands back (acknowledged, failed) when it chooses.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use bytesize::ByteSize;
use framelink_common::FrameMeta;
use framelink_common::link::{LinkError, LinkErrorKind};

use super::*;

const MS: Duration = Duration::from_millis(1);
const TICK: Duration = Duration::from_millis(50);

/// Time only moves when a test moves it.
struct FakeClock {
    instant: Instant,
    wall: SystemTime,
}

impl FakeClock {
    fn new() -> Self {
        Self { instant: Instant::now(), wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000) }
    }
    fn now(&self) -> Now {
        Now { instant: self.instant, wall: self.wall }
    }
    fn advance(&mut self, d: Duration) {
        self.instant += d;
        self.wall += d;
    }
}

fn frame(camera: &str, seq: u64, bytes: usize) -> Frame {
    Frame {
        meta: FrameMeta {
            device_id: "dev".into(),
            camera_id: camera.into(),
            seq,
            capture_ns: 0,
            width: 8,
            height: 8,
            pixel_format: "RGB24".into(),
            content_type: "image/jpeg".into(),
            clock: Default::default(),
        },
        payload: Bytes::from(vec![0u8; bytes]),
    }
}

fn key(seq: u64) -> SpoolKey {
    SpoolKey::new("cam", seq)
}

fn cfg() -> ForwarderConfig {
    ForwarderConfig { drain_window: 4, retry_min_ms: 500, retry_max_ms: 2000, max_message_bytes: ByteSize::kib(4), ..ForwarderConfig::default() }
}

fn unreachable_since(wall: SystemTime) -> LinkError {
    LinkError { kind: LinkErrorKind::Unreachable, message: "Connect to ipv4#127.0.0.1:9092 failed: Connection refused".into(), at: wall }
}

/// Which spool operations fail.
#[derive(Default)]
struct Faults {
    write: bool,
    remove: bool,
    read: bool,
    flush: bool,
    probe: bool,
    /// The producer refuses every frame with a full queue.
    queue_full: bool,
    replace_producer: bool,
}

struct World {
    policy: LinkPolicy,
    clock: FakeClock,
    spool: BTreeMap<SpoolKey, Frame>,
    /// Records that read back damaged, with why.
    damaged: BTreeMap<SpoolKey, String>,
    faults: Faults,
    /// During [`Action::AwaitReports`]: whether the broker acknowledges.
    broker_up: bool,
    /// Frames the producer holds, oldest first.
    in_flight: VecDeque<(Origin, Frame)>,
    /// Frames taken back from a purged producer, whose failed reports are still to come.
    purged: VecDeque<(Origin, Frame)>,
    /// Frames Kafka acknowledged, in order.
    kafka: Vec<Frame>,
    dropped: Vec<(SpoolKey, &'static str)>,
    spooled: Vec<(SpoolKey, SpoolReason)>,
    /// Every origin the producer took, in order.
    produced: Vec<Origin>,
    reads: usize,
    flushes: usize,
    probes: usize,
    replaced: usize,
    purges: usize,
}

impl World {
    fn new(cfg: ForwarderConfig) -> Self {
        Self::with_backlog(cfg, &[])
    }

    /// A world whose spool holds `backlog` (seqs of camera `cam`) at start.
    fn with_backlog(cfg: ForwarderConfig, backlog: &[u64]) -> Self {
        let clock = FakeClock::new();
        let spool: BTreeMap<SpoolKey, Frame> = backlog.iter().map(|&s| (key(s), frame("cam", s, 100))).collect();
        let policy = LinkPolicy::new(cfg, Duration::from_millis(200), spool.len() as u64, clock.now(), || 1.0);
        Self {
            policy,
            clock,
            spool,
            damaged: BTreeMap::new(),
            faults: Faults::default(),
            broker_up: true,
            in_flight: VecDeque::new(),
            purged: VecDeque::new(),
            kafka: Vec::new(),
            dropped: Vec::new(),
            spooled: Vec::new(),
            produced: Vec::new(),
            reads: 0,
            flushes: 0,
            probes: 0,
            replaced: 0,
            purges: 0,
        }
    }

    fn carry_out(&mut self, actions: Vec<Action>) {
        let mut queue = VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            let next = self.perform(action);
            for a in next.into_iter().rev() {
                queue.push_front(a);
            }
        }
    }

    fn push(&mut self, frame: &Frame, reason: SpoolReason) -> Option<bool> {
        if self.faults.write {
            self.policy.spool_failed("writing a frame: disk full".into());
            return None;
        }
        self.policy.spool_ok();
        let k = SpoolKey::new(&frame.meta.camera_id, frame.meta.seq);
        self.spool.insert(k.clone(), frame.clone());
        self.spooled.push((k, reason));
        self.policy.on_spool_stored();
        Some(true)
    }

    fn perform(&mut self, action: Action) -> Vec<Action> {
        let now = self.clock.now();
        match action {
            Action::Produce { origin, frame } => {
                if self.faults.queue_full {
                    return self.policy.on_produce_refused(now, origin, frame, Refusal::QueueFull);
                }
                self.produced.push(origin.clone());
                if let Origin::Live(id) = origin {
                    self.policy.on_live_accepted(now, id, frame.clone());
                }
                self.in_flight.push_back((origin, frame));
            }
            Action::DropTooLarge { frame } => self.dropped.push((SpoolKey::new(&frame.meta.camera_id, frame.meta.seq), "too_large")),
            Action::Spool { frame, reason } => {
                if self.push(&frame, reason).is_none() {
                    self.dropped.push((SpoolKey::new(&frame.meta.camera_id, frame.meta.seq), "spool_io_error"));
                }
            }
            Action::CopyToSpool { live_id, frame } => {
                if self.push(&frame, SpoolReason::Unacknowledged) == Some(true) {
                    self.policy.on_copied(live_id);
                }
            }
            Action::FlushSpool => {
                self.flushes += 1;
                if self.faults.flush {
                    self.policy.spool_failed("flushing: I/O error".into());
                }
                self.policy.on_spool_flushed(now, !self.faults.flush);
            }
            Action::RemoveFromSpool(k) => {
                if self.faults.remove {
                    self.policy.spool_failed("deleting a delivered frame: read-only".into());
                    self.policy.on_spool_removed(&k, false);
                } else {
                    self.spool.remove(&k);
                    self.damaged.remove(&k);
                    self.policy.on_spool_removed(&k, true);
                }
            }
            Action::ReadSpool { after, limit } => {
                self.reads += 1;
                if self.faults.read {
                    self.policy.spool_failed("reading: I/O error".into());
                    self.policy.on_spool_read_failed(now);
                    return Vec::new();
                }
                let mut all: BTreeMap<SpoolKey, Result<Frame, String>> = self.spool.iter().map(|(k, f)| (k.clone(), Ok(f.clone()))).collect();
                all.extend(self.damaged.iter().map(|(k, why)| (k.clone(), Err(why.clone()))));
                // As the spool does: past `after`, passing over what the policy holds.
                let mut batch: Vec<SpoolRead> = Vec::new();
                let mut bytes = 0;
                for (k, f) in all.into_iter().filter(|(k, _)| after.as_ref().is_none_or(|a| k > a) && !self.policy.holds(k)) {
                    let size = f.as_ref().map_or(0, |f| f.payload.len() as u64);
                    if !limit.fits(batch.len(), bytes, size) {
                        break;
                    }
                    bytes += size;
                    batch.push((k, f));
                }
                let records = (self.spool.len() + self.damaged.len()) as u64;
                return self.policy.on_spool_batch(batch, records);
            }
            Action::CountDamaged { key, .. } => self.dropped.push((key, "spool_damaged")),
            Action::CountEvicted(key) => self.dropped.push((key, "spool_full_oldest")),
            Action::ProbeSpool => {
                self.probes += 1;
                if !self.faults.probe {
                    self.policy.spool_ok();
                }
            }
            Action::ReplaceProducer => {
                if self.faults.replace_producer {
                    self.policy.on_producer_replacement_failed(now);
                } else {
                    self.replaced += 1;
                    self.purged.extend(self.in_flight.drain(..));
                    self.policy.on_producer_replaced(now);
                }
            }
            Action::PurgeProducer => {
                self.purges += 1;
                self.purged.extend(self.in_flight.drain(..));
            }
            Action::AwaitReports { at_most } => {
                let until = self.clock.instant + at_most;
                while self.policy.in_flight() > 0 && self.clock.instant < until {
                    if let Some((origin, frame)) = self.purged.pop_front() {
                        self.report(origin, frame, Delivery::Failed { why: "purged".into() });
                    } else if self.broker_up && !self.in_flight.is_empty() {
                        self.ack_next();
                    } else {
                        self.clock.advance(100 * MS);
                    }
                }
            }
            Action::Continue(step) => return self.policy.continue_with(now, step),
        }
        Vec::new()
    }

    fn report(&mut self, origin: Origin, frame: Frame, delivery: Delivery) {
        if delivery == Delivery::Acked {
            self.kafka.push(frame.clone());
        }
        let actions = self.policy.on_report(self.clock.now(), origin, frame, delivery);
        self.carry_out(actions);
    }

    /// The spool evicts `seq` to make room (`drop_oldest`), counted the way the forwarder does.
    fn evict(&mut self, seq: u64) {
        assert!(self.spool.remove(&key(seq)).is_some(), "{seq} is in the spool");
        if self.policy.on_spool_evicted(&key(seq)) {
            self.dropped.push((key(seq), "spool_full_oldest"));
        }
    }

    /// A new frame of camera `cam`.
    fn send(&mut self, seq: u64) {
        let actions = self.policy.on_frame(frame("cam", seq, 100));
        self.carry_out(actions);
    }

    fn tick(&mut self) {
        let actions = self.policy.on_tick(self.clock.now(), None);
        self.carry_out(actions);
    }

    fn tick_with(&mut self, diagnosis: &LinkError) {
        let actions = self.policy.on_tick(self.clock.now(), Some(diagnosis));
        self.carry_out(actions);
    }

    /// Ticks every 50 ms for `d` and reports nothing: the broker is silent.
    fn run_silent(&mut self, d: Duration) {
        let end = self.clock.instant + d;
        while self.clock.instant < end {
            self.clock.advance(TICK);
            self.tick();
        }
    }

    /// Acknowledges the frame in flight with this origin (out of order).
    fn ack(&mut self, origin: &Origin) {
        let i = self.in_flight.iter().position(|(o, _)| o == origin).expect("in flight");
        let (origin, frame) = self.in_flight.remove(i).unwrap();
        self.report(origin, frame, Delivery::Acked);
    }

    fn ack_next(&mut self) {
        let (origin, frame) = self.in_flight.pop_front().expect("a frame in flight");
        self.report(origin, frame, Delivery::Acked);
    }

    fn fail_next(&mut self) {
        let (origin, frame) = self.in_flight.pop_front().expect("a frame in flight");
        self.report(origin, frame, Delivery::Failed { why: "Local: Message timed out".into() });
    }

    /// Reports every frame in flight (purged ones fail): acknowledged if `up`.
    fn settle(&mut self, up: bool) {
        while let Some((origin, frame)) = self.purged.pop_front() {
            self.report(origin, frame, Delivery::Failed { why: "purged".into() });
        }
        while !self.in_flight.is_empty() {
            if up { self.ack_next() } else { self.fail_next() }
        }
    }

    /// Ticks every 50 ms for `d`, acknowledging what is in flight after each tick.
    fn run_up(&mut self, d: Duration) {
        let end = self.clock.instant + d;
        while self.clock.instant < end {
            self.clock.advance(TICK);
            self.tick();
            self.settle(true);
        }
    }

    fn kafka_seqs(&self) -> Vec<u64> {
        self.kafka.iter().map(|f| f.meta.seq).collect()
    }

    fn spool_seqs(&self) -> Vec<u64> {
        self.spool.values().map(|f| f.meta.seq).collect()
    }

    fn spooled_live(&self) -> Vec<(u64, SpoolReason)> {
        self.spooled.iter().map(|(k, r)| (k.parts().unwrap().1, *r)).collect()
    }

    /// Every frame of `seqs` reached Kafka exactly once, nothing is left anywhere, nothing
    /// was dropped.
    fn assert_all_delivered_once(&self, seqs: impl IntoIterator<Item = u64>) {
        let mut got = self.kafka_seqs();
        got.sort();
        let mut want: Vec<u64> = seqs.into_iter().collect();
        want.sort();
        assert_eq!(got, want, "every frame in Kafka exactly once");
        assert!(self.spool.is_empty(), "spool empty: {:?}", self.spool_seqs());
        assert!(self.dropped.is_empty(), "nothing dropped: {:?}", self.dropped);
        assert_eq!(self.policy.in_flight(), 0);
    }
}

fn spool_origins(w: &World) -> Vec<u64> {
    w.produced.iter().filter_map(|o| if let Origin::Spool(k) = o { Some(k.parts().unwrap().1) } else { None }).collect()
}

#[test]
fn a_healthy_link_sends_live_frames_and_never_touches_the_spool() {
    let mut w = World::new(cfg());
    for s in 0..10 {
        w.send(s);
        w.clock.advance(TICK);
        w.tick();
        w.ack_next();
    }
    w.run_up(Duration::from_secs(1));
    assert_eq!(w.kafka_seqs(), (0..10).collect::<Vec<_>>(), "in order");
    assert!(w.spooled.is_empty() && w.reads == 0 && w.flushes == 0, "no disk I/O on a healthy link");
    assert_eq!((w.policy.mode(), w.policy.link_state()), (Mode::Direct, LinkState::Up));
    w.assert_all_delivered_once(0..10);
}

#[test]
fn a_frame_larger_than_max_message_bytes_is_dropped_before_produce() {
    let mut w = World::new(cfg());
    let actions = w.policy.on_frame(frame("cam", 1, 4097));
    assert!(matches!(actions.as_slice(), [Action::DropTooLarge { .. }]), "{actions:?}");
    let actions = w.policy.on_frame(frame("cam", 2, 4096));
    assert!(matches!(actions.as_slice(), [Action::Produce { origin: Origin::Live(_), .. }]), "the limit itself is allowed: {actions:?}");
}

#[test]
fn a_startup_backlog_starts_spooling_and_drains_before_going_direct() {
    let mut w = World::with_backlog(cfg(), &[0, 1, 2]);
    assert_eq!(w.policy.link_state(), LinkState::Draining);
    w.send(3);
    assert_eq!(w.spool_seqs(), [0, 1, 2, 3], "behind the backlog, in order");
    w.run_up(Duration::from_secs(1));
    assert_eq!(w.kafka_seqs(), [0, 1, 2, 3], "per-camera order kept");
    assert_eq!(w.policy.mode(), Mode::Direct);
    w.send(4);
    assert_eq!(w.produced.last(), Some(&Origin::Live(1)), "then straight to Kafka");
}

#[test]
fn an_outage_copies_unacknowledged_frames_spools_new_ones_and_recovers_without_loss() {
    let mut w = World::new(cfg());
    for s in 0..3 {
        w.send(s);
    }
    assert_eq!(w.in_flight.len(), 3);
    // The first delivery fails: the other two are copied (and flushed) at once, the failed one spooled.
    let flushes = w.flushes;
    w.fail_next();
    assert_eq!(w.spooled_live(), [(1, SpoolReason::Unacknowledged), (2, SpoolReason::Unacknowledged), (0, SpoolReason::DeliveryFailed)]);
    assert_eq!(w.flushes, flushes + 1, "the copies are flushed at once");
    assert_eq!((w.policy.mode(), w.policy.link_state()), (Mode::Spooling, LinkState::Down));
    // New frames go to the spool; the copied frames' own failures add nothing.
    w.send(3);
    w.fail_next();
    w.fail_next();
    assert_eq!(w.spooled.len(), 4, "no second copy: {:?}", w.spooled_live());
    assert_eq!(w.spool_seqs(), [0, 1, 2, 3]);
    assert_eq!(w.spooled_live()[3], (3, SpoolReason::Backlog));
    // The link returns: the drain probes one frame at a time, then opens the window.
    w.clock.advance(Duration::from_secs(1));
    w.tick();
    assert_eq!(w.in_flight.len(), 1, "one probe while the link is judged down");
    w.tick();
    assert_eq!(w.in_flight.len(), 1, "no second probe while the first is in flight");
    w.ack_next();
    assert_eq!(w.policy.link_state(), LinkState::Draining);
    w.tick();
    assert_eq!(w.in_flight.len(), 3, "the rest at once once a delivery succeeded");
    w.run_up(Duration::from_secs(1));
    assert_eq!(w.kafka_seqs(), [0, 1, 2, 3]);
    assert_eq!((w.policy.mode(), w.policy.link_state()), (Mode::Direct, LinkState::Up));
    w.assert_all_delivered_once(0..4);
}

#[test]
fn a_copied_frame_acknowledged_late_has_its_copy_deleted_and_is_not_drained() {
    let mut w = World::new(ForwarderConfig { live_first: true, ..cfg() });
    w.send(0);
    w.send(1);
    // librdkafka says the brokers are unreachable: both frames are copied while still in flight.
    let d = unreachable_since(w.clock.wall + MS);
    w.clock.advance(10 * MS);
    w.tick_with(&d);
    assert_eq!(w.spooled_live(), [(0, SpoolReason::Unacknowledged), (1, SpoolReason::Unacknowledged)]);
    assert_eq!(w.policy.last_failure(), Some(d.to_string().as_str()));
    w.send(2);
    assert_eq!(w.spool_seqs(), [0, 1, 2], "link down: a new frame goes to the spool even with live_first");
    // The drain probes, but not with the copies whose originals are in flight.
    // Each read is sized for one probe, so the drain steps past one copy per tick.
    w.clock.advance(Duration::from_secs(1));
    w.tick();
    for _ in 0..2 {
        w.clock.advance(TICK);
        w.tick();
    }
    assert_eq!(spool_origins(&w), [2], "copies are skipped while their originals are in flight");
    // The originals are acknowledged after all: their copies go.
    w.ack_next();
    w.ack_next();
    assert_eq!(w.spool_seqs(), [2], "copies deleted after the late acks");
    w.ack_next();
    w.run_up(Duration::from_secs(1));
    w.assert_all_delivered_once(0..3);
}

#[test]
fn a_copy_being_sent_when_its_original_is_acknowledged_is_kept() {
    // The spool already held a record with the key of a live frame (an earlier run): the drain
    // sends it, the live frame is copied over it; the original's ack must not delete the copy
    // under the record in flight (its own ack deletes it).
    let mut w = World::with_backlog(ForwarderConfig { live_first: true, backfill_fps: 100.0, ..cfg() }, &[7]);
    w.clock.advance(TICK);
    w.tick();
    assert_eq!(spool_origins(&w), [7]);
    w.send(7);
    assert_eq!(w.produced.last(), Some(&Origin::Live(1)));
    let d = unreachable_since(w.clock.wall + MS);
    w.clock.advance(10 * MS);
    // Mode is Spooling already: a diagnosis alone does not copy; a failed delivery does.
    w.tick_with(&d);
    assert_eq!(w.spooled.len(), 0);
    w.send(8);
    let actions = w.policy.on_report(w.clock.now(), Origin::Live(99), frame("cam", 99, 10), Delivery::Failed { why: "x".into() });
    assert!(actions.iter().any(|a| matches!(a, Action::CopyToSpool { live_id: 1, .. })), "{actions:?}");
    w.carry_out(actions);
    // in flight: spool#7, live#7 (copied), live#8 (copied)
    let live7 = w.in_flight.iter().position(|(o, _)| *o == Origin::Live(1)).unwrap();
    let (origin, f) = w.in_flight.remove(live7).unwrap();
    let actions = w.policy.on_report(w.clock.now(), origin, f, Delivery::Acked);
    assert!(!actions.contains(&Action::RemoveFromSpool(key(7))), "the copy is being sent: kept: {actions:?}");
}

#[test]
fn a_diagnosis_judges_the_link_down_only_when_serious_and_newer_than_the_last_ack() {
    let mut w = World::new(cfg());
    w.send(0);
    w.clock.advance(TICK);
    let idle = LinkError { kind: LinkErrorKind::Unreachable, message: "ssl://b:9093/1: Disconnected (after 600000ms in state UP)".into(), at: w.clock.wall };
    w.tick_with(&idle);
    let other = LinkError { kind: LinkErrorKind::Other, message: "something".into(), at: w.clock.wall };
    w.tick_with(&other);
    assert_eq!(w.policy.mode(), Mode::Direct, "an idle disconnect and an unclassified error are routine");
    w.ack_next();
    let old = unreachable_since(w.clock.wall - MS);
    w.clock.advance(TICK);
    w.tick_with(&old);
    assert_eq!(w.policy.mode(), Mode::Direct, "an error older than the last acknowledgement is stale");
    let tls = LinkError { kind: LinkErrorKind::Tls, message: "SSL handshake failed".into(), at: w.clock.wall };
    w.tick_with(&tls);
    assert_eq!((w.policy.mode(), w.policy.link_state()), (Mode::Spooling, LinkState::Down));
    assert!(w.policy.last_failure().unwrap().contains("TLS handshake"));
}

/// A small deterministic generator for the flapping scenario.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn flapping(live_first: bool, seed: u64) {
    let mut w = World::new(ForwarderConfig { live_first, backfill_fps: 50.0, ..cfg() });
    let mut rng = Lcg(seed);
    let mut seq = 0;
    let mut up = true;
    for step in 0..3000 {
        if step % 37 == 0 {
            up = !up;
        }
        match rng.next(10) {
            0..=3 => {
                w.send(seq);
                seq += 1;
            }
            4..=5 if !w.in_flight.is_empty() => {
                if up { w.ack_next() } else { w.fail_next() }
            }
            6 if !up => {
                let d = unreachable_since(w.clock.wall);
                w.tick_with(&d);
            }
            7 => w.faults.queue_full = !up && rng.next(2) == 0,
            _ => {
                w.clock.advance(TICK);
                w.tick();
            }
        }
        // Purged frames are never reported twice, and no frame is both dropped and sent.
        assert!(w.dropped.is_empty(), "nothing dropped: {:?}", w.dropped);
    }
    w.faults.queue_full = false;
    w.settle(true);
    w.run_up(Duration::from_secs(60));
    assert!(seq > 1000);
    w.assert_all_delivered_once(0..seq);
    assert_eq!(w.policy.mode(), Mode::Direct);
}

#[test]
fn a_flapping_link_loses_nothing_and_sends_nothing_twice() {
    for seed in 1..=5 {
        flapping(false, seed);
    }
}

#[test]
fn a_flapping_link_with_live_first_loses_nothing_and_sends_nothing_twice() {
    for seed in 1..=5 {
        flapping(true, seed);
    }
}

#[test]
fn a_full_queue_spools_the_live_frame_without_judging_the_link_down() {
    let mut w = World::new(cfg());
    w.send(0);
    w.faults.queue_full = true;
    w.send(1);
    assert_eq!(w.spooled_live(), [(0, SpoolReason::Unacknowledged), (1, SpoolReason::QueueFull)], "the waiting frame is copied, the refused one spooled");
    assert_eq!(w.policy.link_state(), LinkState::Draining, "spooling, but no delivery failed");
    w.faults.queue_full = false;
    // Strict order: nothing drains while the live frame is in flight (it could still fail late).
    w.clock.advance(TICK);
    w.tick();
    assert_eq!(w.reads, 0, "no drain while a live frame is in flight");
    w.ack_next();
    assert_eq!(w.spool_seqs(), [1], "its copy is deleted");
    w.run_up(Duration::from_secs(1));
    w.assert_all_delivered_once(0..2);
}

#[test]
fn a_spooled_frame_refused_by_a_full_queue_stays_in_the_spool_and_waits_100_ms() {
    let mut w = World::with_backlog(cfg(), &[0, 1, 2]);
    w.faults.queue_full = true;
    w.clock.advance(TICK);
    w.tick();
    assert_eq!(w.reads, 1);
    assert_eq!((w.policy.in_flight(), w.spool.len()), (0, 3), "refused frames stay in the spool, not in flight");
    w.faults.queue_full = false;
    w.clock.advance(99 * MS);
    w.tick();
    assert_eq!(w.reads, 1, "not before 100 ms");
    w.clock.advance(MS);
    w.tick();
    assert_eq!(spool_origins(&w), [0, 1, 2], "from the start again");
    w.settle(true);
    w.run_up(Duration::from_secs(1));
    w.assert_all_delivered_once(0..3);
}

#[test]
fn a_spooled_frame_refused_mid_batch_is_sent_after_the_cursor_wraps() {
    // Not lost, but its camera's order is not kept: the frames read after it go first.
    let mut w = World::with_backlog(cfg(), &[0, 1, 2, 3, 4, 5]);
    w.clock.advance(TICK);
    // Refuse only the first frame of the batch.
    let actions = w.policy.on_tick(w.clock.now(), None);
    assert_eq!(actions, [Action::Continue(Step::Drain)]);
    let actions = w.policy.continue_with(w.clock.now(), Step::Drain);
    assert!(matches!(actions.as_slice(), [Action::ReadSpool { after: None, limit: ReadLimit { records: 4, at_least_one: true, .. } }, Action::Continue(Step::Flush)]), "{actions:?}");
    let batch: Vec<SpoolRead> = w.spool.iter().take(4).map(|(k, f)| (k.clone(), Ok(f.clone()))).collect();
    let produce = w.policy.on_spool_batch(batch, 6);
    assert_eq!(produce.len(), 4);
    for (i, a) in produce.into_iter().enumerate() {
        let Action::Produce { origin, frame } = a else { panic!("{a:?}") };
        if i == 0 {
            assert!(w.policy.on_produce_refused(w.clock.now(), origin, frame, Refusal::QueueFull).is_empty());
        } else {
            w.produced.push(origin.clone());
            w.in_flight.push_back((origin, frame));
        }
    }
    w.settle(true);
    w.run_up(Duration::from_secs(1));
    assert_eq!(w.kafka_seqs(), [1, 2, 3, 4, 5, 0], "the refused frame comes once the drain starts over");
    w.assert_all_delivered_once(0..6);
}

#[test]
fn late_delivery_reports_hold_the_strict_drain_until_the_live_frames_are_settled() {
    let mut w = World::new(cfg());
    w.send(0);
    w.send(1);
    w.fail_next(); // 1 copied, 0 spooled
    w.send(2);
    w.clock.advance(Duration::from_secs(5));
    for _ in 0..10 {
        w.clock.advance(TICK);
        w.tick();
    }
    assert_eq!(w.reads, 0, "a slow broker's report still pending: the spool must not overtake it");
    w.ack_next(); // 1 arrives late after all
    assert_eq!(w.spool_seqs(), [0, 2], "its copy is deleted");
    w.tick();
    assert_eq!(spool_origins(&w), [0, 2], "then the spool drains");
    w.run_up(Duration::from_secs(1));
    w.assert_all_delivered_once(0..3);
}

#[test]
fn the_drain_window_bounds_spooled_frames_in_flight() {
    let mut w = World::with_backlog(cfg(), &(0..20).collect::<Vec<_>>());
    w.clock.advance(TICK);
    w.tick();
    assert_eq!(w.in_flight.len(), 4, "drain_window");
    w.clock.advance(TICK);
    w.tick();
    assert_eq!(w.in_flight.len(), 4, "no more while the window is full");
    w.ack_next();
    w.ack_next();
    w.tick();
    assert_eq!(w.in_flight.len(), 4, "refilled");
    assert_eq!(spool_origins(&w), [0, 1, 2, 3, 4, 5], "oldest first, none twice");
    w.run_up(Duration::from_secs(2));
    w.assert_all_delivered_once(0..20);
}

#[test]
fn the_byte_window_bounds_spooled_bytes_in_flight_and_a_larger_frame_goes_alone() {
    // Backlog frames are 100 bytes; 250 bytes in flight at most.
    let mut w = World::with_backlog(ForwarderConfig { drain_window: 32, drain_window_bytes: ByteSize::b(250), ..cfg() }, &(0..10).collect::<Vec<_>>());
    w.spool.insert(key(10), frame("cam", 10, 1000));
    w.clock.advance(TICK);
    w.tick();
    assert_eq!(w.in_flight.len(), 2, "drain_window_bytes");
    w.clock.advance(TICK);
    w.tick();
    assert_eq!((w.in_flight.len(), spool_origins(&w).len()), (2, 2), "nothing more while the byte window is full");
    w.ack_next();
    w.tick();
    assert_eq!(w.in_flight.len(), 2, "refilled");
    assert_eq!(spool_origins(&w), [0, 1, 2], "oldest first, none twice");
    // Frame 10 is larger than the whole window: it waits until nothing else is in flight.
    while spool_origins(&w).len() < 10 {
        w.ack_next();
        w.tick();
        assert!(w.in_flight.len() <= 2);
    }
    assert!(!spool_origins(&w).contains(&10));
    w.ack_next();
    w.tick();
    assert_eq!(w.in_flight.len(), 1, "the last small frame is still in flight");
    w.ack_next();
    w.tick();
    assert_eq!((w.in_flight.len(), spool_origins(&w).last()), (1, Some(&10)), "then the large one, alone");
    w.run_up(Duration::from_secs(2));
    w.assert_all_delivered_once(0..11);
}

#[test]
fn frames_behind_the_cursor_are_drained_while_newer_ones_keep_the_window_busy() {
    // Review finding: with a frame always in flight (acknowledgements slower than new frames
    // arrive), an empty read must still send the drain back to the start of the spool.
    let mut w = World::with_backlog(ForwarderConfig { drain_window: 32, drain_window_bytes: ByteSize::b(250), ..cfg() }, &[5]);
    w.clock.advance(TICK);
    w.tick();
    assert_eq!(spool_origins(&w), [5]);
    // Behind the cursor (another camera's frame sorts there too).
    w.spool.insert(key(1), frame("cam", 1, 100));
    for i in 0..10 {
        w.spool.insert(key(10 + i), frame("cam", 10 + i, 100));
        w.clock.advance(TICK);
        w.tick();
        w.clock.advance(TICK);
        w.tick();
        assert!(!w.in_flight.is_empty());
        w.ack_next();
    }
    assert!(spool_origins(&w).contains(&1), "frame 1 stranded behind the cursor: {:?}", spool_origins(&w));
    w.run_up(Duration::from_secs(2));
    w.assert_all_delivered_once([1, 5].into_iter().chain(10..20));
}

#[test]
fn live_first_back_fills_at_backfill_fps_beside_live_frames() {
    let mut w = World::with_backlog(ForwarderConfig { live_first: true, backfill_fps: 10.0, drain_window: 32, ..cfg() }, &(0..200).collect::<Vec<_>>());
    let mut seq = 1000;
    for _ in 0..100 {
        // 5 s of 20 fps live frames, ticks every 50 ms
        w.clock.advance(TICK);
        w.send(seq);
        seq += 1;
        w.tick();
        w.settle(true);
    }
    assert_eq!(w.produced.iter().filter(|o| matches!(o, Origin::Live(_))).count(), 100, "live frames go first, all of them");
    let backfilled = spool_origins(&w).len();
    assert!((49..=50).contains(&backfilled), "10 fps over 5 s: {backfilled}");
    // After a pause the budget holds at most one second's worth.
    w.clock.advance(Duration::from_secs(30));
    w.tick();
    assert_eq!(spool_origins(&w).len() - backfilled, 10, "a burst is capped at backfill_fps");
    w.settle(true);
    w.run_up(Duration::from_secs(20));
    w.assert_all_delivered_once((0..200).chain(1000..seq));
}

#[test]
fn a_slow_backfill_rate_still_sends_one_frame_at_a_time() {
    let mut w = World::with_backlog(ForwarderConfig { live_first: true, backfill_fps: 0.5, ..cfg() }, &[0, 1, 2]);
    w.clock.advance(Duration::from_secs(10));
    w.tick();
    assert_eq!(spool_origins(&w), [0], "however long the pause, the budget holds one frame (not fps × 1 s = 0.5)");
    w.settle(true);
    w.clock.advance(Duration::from_secs(1));
    w.tick();
    assert_eq!(spool_origins(&w), [0], "half a frame's budget sends nothing");
    w.clock.advance(Duration::from_secs(1));
    w.tick();
    assert_eq!(spool_origins(&w), [0, 1]);
}

#[test]
fn failed_drain_attempts_back_off_from_retry_min_to_retry_max() {
    let mut w = World::with_backlog(cfg(), &[0]);
    let mut attempts = Vec::new();
    let start = w.clock.instant;
    for _ in 0..(6000 / 10) {
        w.clock.advance(10 * MS);
        w.tick();
        if !w.in_flight.is_empty() {
            attempts.push((w.clock.instant - start).as_millis() as u64);
            w.fail_next();
        }
    }
    // First attempt at once, then 500, 1000, 2000, 2000 ms later (jitter 1.0).
    let gaps: Vec<u64> = attempts.windows(2).map(|p| p[1] - p[0]).collect();
    assert_eq!(attempts[0], 10);
    assert_eq!(gaps, [500, 1000, 2000, 2000], "{attempts:?}");
    assert_eq!(w.policy.link_state(), LinkState::Down);
    // One success resets the backoff to retry_min_ms.
    w.clock.advance(2000 * MS);
    w.tick();
    w.ack_next();
    w.send(1);
    w.clock.advance(TICK);
    w.tick();
    w.fail_next();
    let failed_at = w.clock.instant;
    while w.in_flight.is_empty() {
        w.clock.advance(10 * MS);
        w.tick();
    }
    assert_eq!(w.clock.instant - failed_at, 500 * MS);
}

#[test]
fn retry_delays_carry_the_jitter() {
    let mut w = World::with_backlog(cfg(), &[0]);
    w.policy.jitter = || 0.75;
    w.clock.advance(TICK);
    w.tick();
    w.fail_next();
    let failed_at = w.clock.instant;
    while w.in_flight.is_empty() {
        w.clock.advance(5 * MS);
        w.tick();
    }
    assert_eq!(w.clock.instant - failed_at, 375 * MS, "500 ms × 0.75");
}

#[test]
fn a_spool_read_error_backs_off_like_a_failed_attempt() {
    let mut w = World::with_backlog(cfg(), &[0]);
    w.faults.read = true;
    w.clock.advance(TICK);
    w.tick();
    assert_eq!(w.reads, 1);
    assert!(w.policy.spool_error().is_some());
    w.faults.read = false;
    w.clock.advance(499 * MS);
    w.tick();
    assert_eq!(w.reads, 1, "retry_min_ms");
    w.clock.advance(MS);
    w.tick();
    assert_eq!(w.reads, 2);
}

#[test]
fn the_link_returns_to_direct_only_once_a_delivery_succeeded() {
    let mut w = World::new(cfg());
    w.send(0);
    w.fail_next();
    w.clock.advance(Duration::from_secs(1));
    w.tick();
    w.fail_next(); // the probe fails: spool holds 0
    w.spool.clear(); // the spool lost it (evicted): empty, but the link is still down
    w.clock.advance(Duration::from_secs(2));
    w.tick();
    w.tick();
    assert_eq!(w.policy.mode(), Mode::Spooling, "an empty spool with the link down stays spooling");
    w.send(1);
    assert_eq!(w.spool_seqs(), [1], "new frames serve as probes");
    w.run_up(Duration::from_secs(3));
    assert_eq!(w.policy.mode(), Mode::Direct);
    assert_eq!(w.kafka_seqs(), [1]);
}

#[test]
fn a_fatal_producer_is_replaced_after_its_frames_are_copied_and_nothing_is_lost() {
    let mut w = World::new(cfg());
    for s in 0..3 {
        w.send(s);
    }
    let actions = w.policy.on_fatal_error(w.clock.now(), "fatal producer error OutOfOrderSequenceNumber".into());
    assert!(matches!(actions.as_slice(), [Action::CopyToSpool { .. }, Action::CopyToSpool { .. }, Action::CopyToSpool { .. }, Action::FlushSpool, Action::ReplaceProducer]), "{actions:?}");
    w.carry_out(actions);
    assert_eq!((w.replaced, w.policy.link_state()), (1, LinkState::Down));
    // The old producer's frames come back failed: in the spool already.
    w.settle(false);
    assert_eq!(w.spooled.len(), 3);
    w.run_up(Duration::from_secs(2));
    w.assert_all_delivered_once(0..3);
}

#[test]
fn a_producer_that_cannot_be_replaced_is_retried_with_backoff_to_30_s() {
    let mut w = World::new(cfg());
    w.faults.replace_producer = true;
    let mut tries = Vec::new();
    let start = w.clock.instant;
    for _ in 0..(120_000 / 50) {
        w.clock.advance(TICK);
        let actions = w.policy.on_fatal_error(w.clock.now(), "fatal".into());
        if actions.contains(&Action::ReplaceProducer) {
            tries.push((w.clock.instant - start).as_millis() as u64);
            w.carry_out(actions);
        }
    }
    let gaps: Vec<u64> = tries.windows(2).map(|p| p[1] - p[0]).collect();
    assert_eq!(gaps, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000], "{tries:?}");
    w.faults.replace_producer = false;
    w.clock.advance(Duration::from_secs(30));
    let actions = w.policy.on_fatal_error(w.clock.now(), "fatal".into());
    w.carry_out(actions);
    assert_eq!(w.replaced, 1);
    // The next fatal error (the new producer's) waits 500 ms again after a failed attempt.
    w.faults.replace_producer = true;
    w.clock.advance(TICK);
    let actions = w.policy.on_fatal_error(w.clock.now(), "fatal".into());
    w.carry_out(actions);
    w.clock.advance(499 * MS);
    assert!(w.policy.on_fatal_error(w.clock.now(), "fatal".into()).is_empty());
    w.clock.advance(MS);
    assert!(w.policy.on_fatal_error(w.clock.now(), "fatal".into()).contains(&Action::ReplaceProducer), "success reset the backoff to 500 ms");
}

#[test]
fn shutdown_waits_for_acknowledgements_within_the_grace() {
    let mut w = World::new(cfg());
    for s in 0..3 {
        w.send(s);
    }
    let start = w.clock.instant;
    let actions = w.policy.on_shutdown(Duration::from_secs(20));
    w.carry_out(actions);
    assert_eq!(w.kafka_seqs(), [0, 1, 2]);
    assert_eq!((w.purges, w.spooled.len()), (0, 0), "nothing to take back");
    assert_eq!(w.clock.instant, start, "no waiting once all are acknowledged");
    assert_eq!(w.flushes, 1, "the spool is flushed at the end");
}

#[test]
fn shutdown_with_a_silent_broker_waits_the_grace_then_spools_what_is_in_flight() {
    let mut w = World::with_backlog(ForwarderConfig { live_first: true, ..cfg() }, &[9]);
    w.clock.advance(Duration::from_secs(1));
    w.tick();
    w.send(0);
    w.send(1);
    assert_eq!(w.policy.in_flight(), 3);
    w.broker_up = false;
    let start = w.clock.instant;
    let actions = w.policy.on_shutdown(Duration::from_secs(3));
    w.carry_out(actions);
    assert_eq!(w.clock.instant - start, Duration::from_secs(3), "the whole grace");
    assert_eq!(w.purges, 1);
    assert_eq!(w.policy.in_flight(), 0);
    assert_eq!(w.spool_seqs(), [0, 1, 9], "live frames spooled, the spooled one kept");
    assert!(w.kafka.is_empty() && w.dropped.is_empty());
}

#[test]
fn shutdown_with_the_link_down_does_not_wait() {
    let mut w = World::new(cfg());
    w.send(0);
    w.send(1);
    w.fail_next();
    w.broker_up = false;
    let start = w.clock.instant;
    let actions = w.policy.on_shutdown(Duration::from_secs(20));
    assert_eq!(actions[0], Action::AwaitReports { at_most: Duration::ZERO });
    w.carry_out(actions);
    assert_eq!(w.clock.instant, start);
    assert_eq!(w.purges, 1);
    assert_eq!(w.spool_seqs(), [0, 1], "frame 1 was copied when the link went down, and stays");
    assert_eq!(w.spooled.len(), 2, "no second copy");
}

#[test]
fn a_spool_that_cannot_be_written_drops_and_counts_and_sends_straight_while_the_link_is_up() {
    let mut w = World::new(cfg());
    w.send(0);
    w.faults.write = true;
    w.faults.queue_full = true;
    w.send(1);
    assert_eq!(w.dropped, [(key(1), "spool_io_error")], "1 refused and not spooled: counted; 0's copy failed: not counted, 0 stays with librdkafka");
    assert_eq!(w.policy.link_state(), LinkState::Draining);
    w.faults.queue_full = false;
    w.send(2);
    assert_eq!(w.produced.last(), Some(&Origin::Live(3)), "spool failing, link up: straight to Kafka");
    w.ack_next();
    w.ack_next();
    assert_eq!(w.kafka_seqs(), [0, 2]);
    // The link goes down: what cannot be spooled is dropped and counted, except one frame at
    // a time that goes as a probe of the link.
    w.send(3);
    w.fail_next();
    w.send(4);
    w.send(5);
    assert_eq!(w.produced.last(), Some(&Origin::Live(5)), "4 probes the link");
    assert_eq!(w.dropped.iter().map(|(k, _)| k.parts().unwrap().1).collect::<Vec<_>>(), [1, 3, 5], "5 came while the probe was out");
    w.fail_next();
    assert_eq!(w.dropped.iter().map(|(k, _)| k.parts().unwrap().1).collect::<Vec<_>>(), [1, 3, 5, 4], "the failed probe could not be spooled either");
    let sent = w.kafka_seqs();
    assert!(w.dropped.iter().all(|(k, _)| !sent.contains(&k.parts().unwrap().1)), "no frame both dropped and sent");
    // The disk works again: the retry (once a second) probes and clears the error.
    w.faults.write = false;
    w.clock.advance(Duration::from_secs(1));
    w.tick();
    assert_eq!(w.probes, 1);
    assert!(w.policy.spool_error().is_none());
    w.send(6);
    assert_eq!(w.spool_seqs(), [6], "spooling again while the link is judged down");
}

#[test]
fn with_the_spool_failing_frames_flow_again_once_kafka_is_back_before_the_disk_is() {
    let mut w = World::new(cfg());
    w.faults.write = true;
    w.faults.probe = true;
    w.send(0);
    w.fail_next();
    assert_eq!(w.policy.link_state(), LinkState::Down);
    assert_eq!(w.dropped.len(), 1, "0 failed and could not be spooled");
    // Kafka is back, the disk is not: the next frame probes the link and gets through.
    w.send(1);
    w.ack_next();
    assert_eq!(w.kafka_seqs(), [1]);
    for s in 2..6 {
        w.send(s);
        w.ack_next();
    }
    assert_eq!(w.kafka_seqs(), [1, 2, 3, 4, 5], "straight to Kafka while the spool still fails");
    assert_eq!(w.dropped.len(), 1, "nothing else dropped");
    assert!(w.policy.spool_error().is_some());
}

#[test]
fn a_delivered_frame_whose_deletion_fails_is_not_sent_again_and_deleted_later() {
    let mut w = World::with_backlog(cfg(), &[0, 1]);
    w.faults.remove = true;
    w.clock.advance(TICK);
    w.tick();
    w.settle(true);
    assert_eq!(w.spool_seqs(), [0, 1], "deletions failed");
    for _ in 0..10 {
        w.clock.advance(TICK);
        w.tick();
    }
    assert_eq!(w.kafka_seqs(), [0, 1], "not sent again");
    assert_eq!(w.probes, 0, "no probe while deletions are pending");
    w.faults.remove = false;
    w.clock.advance(Duration::from_secs(1));
    w.tick();
    assert!(w.spool.is_empty(), "deleted by the retry");
    assert_eq!(w.probes, 1, "then the spool is probed");
    w.run_up(Duration::from_secs(1));
    assert_eq!(w.policy.mode(), Mode::Direct);
    w.assert_all_delivered_once(0..2);
}

#[test]
fn a_damaged_record_is_counted_removed_and_skipped() {
    let mut w = World::with_backlog(cfg(), &[0, 2]);
    w.damaged.insert(key(1), "bad CRC".into());
    w.run_up(Duration::from_secs(1));
    assert_eq!(w.kafka_seqs(), [0, 2]);
    assert_eq!(w.dropped, [(key(1), "spool_damaged")]);
    assert!(w.damaged.is_empty() && w.spool.is_empty());
    assert_eq!(w.policy.mode(), Mode::Direct);
}

#[test]
fn a_spool_written_to_is_flushed_every_flush_interval() {
    let mut w = World::new(cfg());
    w.send(0);
    w.fail_next(); // spooled
    let flushes = w.flushes;
    w.clock.advance(150 * MS);
    w.tick();
    assert_eq!(w.flushes, flushes, "not before flush_every (200 ms)");
    w.clock.advance(50 * MS);
    w.tick();
    assert_eq!(w.flushes, flushes + 1);
    w.clock.advance(Duration::from_secs(1));
    w.tick();
    assert_eq!(w.flushes, flushes + 1, "nothing new written: no flush");
}

#[test]
fn a_failing_flush_keeps_the_spool_dirty_and_is_retried() {
    let mut w = World::new(cfg());
    w.send(0);
    w.faults.flush = true;
    w.fail_next();
    w.clock.advance(200 * MS);
    w.tick();
    let flushes = w.flushes;
    assert!(w.policy.spool_error().is_some());
    w.faults.flush = false;
    w.clock.advance(200 * MS);
    w.tick();
    assert_eq!(w.flushes, flushes + 1, "still dirty: flushed again");
    w.clock.advance(200 * MS);
    w.tick();
    assert_eq!(w.flushes, flushes + 1, "clean now");
}

#[test]
fn a_silent_link_is_judged_stalled_and_the_waiting_frames_go_to_the_spool() {
    // Packets dropped without a reset: librdkafka reports nothing until its timeouts.
    let mut w = World::new(cfg());
    assert_eq!(w.policy.cfg.stall_timeout_ms, 5000, "the default");
    for seq in 0..3 {
        w.send(seq);
    }
    w.run_silent(Duration::from_millis(4900));
    assert_eq!((w.policy.mode(), w.spool.len()), (Mode::Direct, 0), "not before stall_timeout_ms");
    w.run_silent(Duration::from_millis(150));
    assert_eq!((w.policy.mode(), w.policy.link_state()), (Mode::Spooling, LinkState::Down));
    assert!(w.policy.last_failure().unwrap().contains("link stalled: no acknowledgement for 5.0 s while 3 frames wait"), "{:?}", w.policy.last_failure());
    assert_eq!(w.spooled_live(), [(0, SpoolReason::Unacknowledged), (1, SpoolReason::Unacknowledged), (2, SpoolReason::Unacknowledged)]);
    assert!(w.flushes > 0, "the copies are flushed at once");
    assert_eq!(w.policy.stalls(), 1);
    w.send(3);
    assert_eq!(w.spool_seqs(), [0, 1, 2, 3], "new frames go to the spool");
    // Judged once per outage, not on every tick.
    w.run_silent(Duration::from_secs(6));
    assert_eq!(w.policy.stalls(), 1);
    // The packets get through after all: the originals are acknowledged, their copies go,
    // and the spool drains in order.
    w.settle(true);
    assert_eq!(w.spool_seqs(), [3]);
    w.run_up(Duration::from_secs(1));
    assert_eq!(w.kafka_seqs(), [0, 1, 2, 3]);
    assert_eq!((w.policy.mode(), w.policy.link_state()), (Mode::Direct, LinkState::Up));
    w.assert_all_delivered_once(0..4);
}

#[test]
fn a_frame_waiting_while_others_are_acknowledged_is_spooled_without_judging_the_link_down() {
    // A slow link, or one partition whose leader is unreachable: acks still come.
    let mut w = World::new(cfg());
    w.send(0);
    for seq in 1..6 {
        w.run_silent(Duration::from_millis(950));
        w.send(seq);
        w.ack(&Origin::Live(seq + 1));
    }
    assert_eq!(w.policy.mode(), Mode::Direct);
    w.run_silent(Duration::from_millis(300));
    assert_eq!((w.policy.mode(), w.policy.link_state()), (Mode::Spooling, LinkState::Draining), "spooling, link not down");
    assert_eq!(w.policy.stalls(), 0);
    assert_eq!(w.spooled_live(), [(0, SpoolReason::Unacknowledged)]);
    w.send(6);
    assert_eq!(w.spool_seqs(), [0, 6], "new frames wait in the spool behind it");
    w.ack_next();
    assert_eq!(w.spool_seqs(), [6], "its late ack deletes the copy");
    w.run_up(Duration::from_secs(1));
    w.assert_all_delivered_once(0..7);
}

#[test]
fn stall_detection_can_be_turned_off() {
    let mut w = World::new(ForwarderConfig { stall_timeout_ms: 0, ..cfg() });
    w.send(0);
    w.run_silent(Duration::from_secs(20));
    assert_eq!((w.policy.mode(), w.spool.len()), (Mode::Direct, 0));
}

#[test]
fn a_producer_silent_for_twice_the_message_timeout_is_replaced_with_growing_patience() {
    // librdkafka#5430: a partition stuck without a leader times out every frame for good.
    let mut w = World::new(ForwarderConfig { message_timeout_ms: 10_000, stall_timeout_ms: 0, ..cfg() });
    w.send(0);
    w.run_silent(Duration::from_secs(10));
    w.fail_next(); // message timeout: the link is judged down
    assert_eq!(w.policy.link_state(), LinkState::Down);
    // The drain probes with spooled frames, which time out too.
    let mut replaced_at = Vec::new();
    let start = w.clock.instant;
    let mut seq = 1;
    while w.clock.instant - start < Duration::from_secs(400) {
        w.run_silent(Duration::from_secs(1));
        if seq < 400 {
            w.send(seq);
            seq += 1;
        }
        if w.replaced > replaced_at.len() {
            replaced_at.push((w.clock.instant - start).as_secs());
        }
        // Whatever the producer holds (or gave back when replaced) times out after 10 s.
        w.settle(false);
    }
    // 20 s after the last ack (10 s before the start), then 40, 80, 160, 160 s after each.
    assert_eq!(replaced_at, [10, 50, 130, 290], "{replaced_at:?}");
    assert_eq!(w.policy.quiet_replacements(), 4);
    // Frames flow again once acknowledged; nothing was lost.
    w.broker_up = true;
    w.run_up(Duration::from_secs(60));
    assert_eq!(w.policy.link_state(), LinkState::Up);
    w.assert_all_delivered_once(0..seq);
    // An acknowledgement resets the patience to twice the message timeout.
    w.send(seq);
    w.run_silent(Duration::from_secs(10));
    w.fail_next();
    w.run_silent(Duration::from_secs(11));
    assert_eq!(w.replaced, 5, "20 s after the last ack");
}

#[test]
fn a_partition_reported_without_a_leader_gets_a_new_producer_after_5_s_not_a_minute() {
    // Seen with the broker paused for 30 s (a dark link): on its return it had fenced itself
    // for a moment, librdkafka took the partition's leader to be -1 and kept it so, and only
    // the quiet rule (twice message_timeout_ms of silence) replaced the producer, 60 s later.
    let mut w = World::new(cfg());
    // A report while the link works, then an ack after it: nothing to do.
    let report = |w: &mut World| {
        let now = w.clock.now();
        w.policy.on_leaderless(now.wall, now);
    };
    report(&mut w);
    w.send(0);
    w.run_silent(Duration::from_secs(1));
    w.ack_next();
    w.send(1);
    w.run_silent(Duration::from_secs(6));
    assert_eq!((w.policy.link_state(), w.replaced), (LinkState::Down, 0), "stalled; the old report predates the last ack");
    report(&mut w);
    w.run_silent(Duration::from_secs(4));
    assert_eq!(w.replaced, 0, "librdkafka is given 5 s to find the leader itself");
    w.run_silent(Duration::from_millis(1500));
    assert_eq!(w.replaced, 1, "then a new producer, from fresh metadata");
    // The same report again, and newer ones (a broker answering "no leader" to every new
    // producer): no second replacement before an acknowledgement.
    for _ in 0..4 {
        report(&mut w);
        w.run_silent(Duration::from_secs(6));
    }
    assert_eq!(w.replaced, 1, "once between two acknowledgements");
    w.settle(false);
    w.broker_up = true;
    w.run_up(Duration::from_secs(30));
    assert_eq!(w.policy.link_state(), LinkState::Up);
    w.assert_all_delivered_once(0..2);
    // After an acknowledgement, a new outage with a new report may replace it again.
    w.send(2);
    w.broker_up = false;
    w.run_silent(Duration::from_secs(6));
    report(&mut w);
    w.run_silent(Duration::from_secs(6));
    assert_eq!(w.replaced, 2);
}

#[test]
fn a_link_that_dies_just_after_an_ack_is_judged_stalled_once_the_acks_stop() {
    // Seen in t8: the oldest frame was copied as "slow" (an ack 0.5 s before), then no ack
    // came at all — the link must still be judged down, not left draining.
    let mut w = World::new(cfg());
    w.send(0);
    w.run_silent(Duration::from_millis(500));
    w.send(1);
    w.ack(&Origin::Live(2));
    w.run_silent(Duration::from_millis(4550));
    assert_eq!((w.policy.mode(), w.policy.link_state()), (Mode::Spooling, LinkState::Draining), "slow: frame 0 copied");
    assert_eq!(w.spooled_live(), [(0, SpoolReason::Unacknowledged)]);
    w.run_silent(Duration::from_millis(500));
    assert_eq!(w.policy.link_state(), LinkState::Down, "no ack for 5 s with a frame waiting: stalled");
    assert_eq!(w.policy.stalls(), 1);
    w.settle(true);
    w.run_up(Duration::from_secs(1));
    w.assert_all_delivered_once(0..2);
}

/// Copies of live frames in flight when the link went down (0, 1) and a new frame (2).
fn copies_in_flight() -> World {
    let mut w = World::new(ForwarderConfig { live_first: true, ..cfg() });
    w.send(0);
    w.send(1);
    let d = unreachable_since(w.clock.wall + MS);
    w.clock.advance(10 * MS);
    w.tick_with(&d);
    w.send(2);
    assert_eq!(w.spool_seqs(), [0, 1, 2]);
    w
}

#[test]
fn an_evicted_copy_whose_original_is_then_acknowledged_is_not_counted_as_dropped() {
    // Seen in t4: the full spool evicted the copy of a frame librdkafka still held and counted
    // it dropped; the broker came back within the message timeout and the frame arrived too.
    let mut w = copies_in_flight();
    w.evict(0);
    assert!(w.dropped.is_empty(), "its original is in flight: not lost yet: {:?}", w.dropped);
    w.ack_next();
    assert!(w.dropped.is_empty(), "delivered: {:?}", w.dropped);
    w.ack_next();
    w.run_up(Duration::from_secs(2));
    w.assert_all_delivered_once(0..3);
}

#[test]
fn an_evicted_copy_whose_original_then_fails_is_counted_once_and_not_spooled_again() {
    let mut w = copies_in_flight();
    w.evict(0);
    let spooled = w.spooled.len();
    w.fail_next();
    assert_eq!(w.dropped, [(key(0), "spool_full_oldest")], "lost when its last send fails");
    assert_eq!(w.spooled.len(), spooled, "evicted as the oldest: not spooled again as the newest");
    w.fail_next();
    assert_eq!(w.dropped.len(), 1, "1's copy is in the spool: nothing more lost");
    w.run_up(Duration::from_secs(3));
    assert_eq!(w.kafka_seqs(), [1, 2]);
    assert!(w.spool.is_empty() && w.policy.in_flight() == 0);
}

#[test]
fn a_spooled_frame_evicted_while_being_sent_is_counted_only_if_that_send_fails() {
    let mut w = World::with_backlog(cfg(), &[0, 1, 2]);
    w.policy.on_report(w.clock.now(), Origin::Live(99), frame("cam", 99, 10), Delivery::Failed { why: "down".into() });
    w.clock.advance(Duration::from_secs(1));
    w.tick();
    assert_eq!(spool_origins(&w), [0], "one probe while the link is judged down");
    w.evict(0);
    w.evict(1);
    assert_eq!(w.dropped, [(key(1), "spool_full_oldest")], "1 was not being sent: lost at once; 0 not yet");
    w.fail_next();
    assert_eq!(w.dropped, [(key(1), "spool_full_oldest"), (key(0), "spool_full_oldest")], "the probe of 0 failed: lost");
    // The next probe is acknowledged while evicted: delivered, not counted, nothing to delete.
    w.clock.advance(Duration::from_secs(1));
    w.tick();
    assert_eq!(spool_origins(&w), [0, 2]);
    w.evict(2);
    let (origin, f) = w.in_flight.pop_front().unwrap();
    let actions = w.policy.on_report(w.clock.now(), origin, f.clone(), Delivery::Acked);
    assert!(actions.is_empty(), "no deletion of an evicted record: {actions:?}");
    w.kafka.push(f);
    assert_eq!(w.dropped.len(), 2, "2 was delivered");
    assert_eq!(w.kafka_seqs(), [2]);
    assert_eq!(w.policy.in_flight(), 0);
}

#[test]
fn a_delivered_frame_whose_deletion_failed_is_not_counted_when_evicted() {
    let mut w = World::with_backlog(cfg(), &[0]);
    w.faults.remove = true;
    w.clock.advance(TICK);
    w.tick();
    w.ack_next();
    assert_eq!(w.spool_seqs(), [0], "delivered, deletion failed");
    w.evict(0);
    assert!(w.dropped.is_empty(), "delivered: not lost: {:?}", w.dropped);
    w.faults.remove = false;
    w.run_up(Duration::from_secs(2));
    assert_eq!(w.kafka_seqs(), [0], "not sent again");
}
