//! The forwarder: encoded frames → Kafka, with the spool in between when the link is bad.
//!
//! # Modes
//! - **Direct**: new frames are produced straight to Kafka (nothing touches the disk).
//! - **Spooling**: new frames go to the spool. Entered when a delivery fails or times out,
//!   when librdkafka's memory queue is full, when librdkafka reports all brokers down / a
//!   TLS error, or when frames wait `stall_timeout_ms` for their acknowledgements (a link
//!   that drops packets silently; see [`policy`]). One broker of a cluster refusing
//!   connections is not an outage. While spooling, the spool is drained (oldest first, in per-camera sequence
//!   order) with a bounded number of frames in flight; a failed attempt backs off
//!   exponentially with jitter. When the spool is empty and nothing is in flight, the
//!   forwarder returns to Direct.
//! - `live_first`: new frames go straight to Kafka whenever the link is up, and the spool
//!   back-fills at `backfill_fps` beside them. Per-camera order in Kafka is then not
//!   guaranteed for back-filled frames (consumers sort by `framelink-seq`).
//!
//! Draining starts only when no live frame is in flight, so a frame that fails late cannot
//! be overtaken by spooled frames of the same camera.
//!
//! # Delivery semantics
//! acks=all and an idempotent producer. A frame leaves the agent's care only when Kafka
//! acknowledged it: a live frame whose delivery fails (including librdkafka's
//! `message.timeout.ms`) is spooled, a spooled frame is deleted only after its ack.
//!
//! Frames handed to librdkafka live only in memory until acknowledged. The moment the link is
//! judged down (a delivery failure, a full queue, or librdkafka reporting the brokers
//! unreachable), every live frame still unacknowledged is written to the spool as well
//! (reason `unacknowledged`) and flushed, instead of waiting in memory for the message
//! timeout: a crash during an outage then loses at most the spool's flush window. If such a
//! frame is acknowledged later after all, its spool copy is deleted — unless the copy is being
//! sent at that moment, which makes a duplicate (never a loss). A frame
//! larger than `max_message_bytes` is refused before produce and counted (`too_large`);
//! a frame the broker rejects for good (too large, invalid) is counted (`rejected`).
//! Duplicates are possible only when Kafka stored a frame but its ack was lost (the frame is
//! then spooled and sent again): at-least-once.
//!
//! # A spool that cannot be written
//! A disk full, read-only or unwritable never stops the forwarder: a frame that cannot be
//! spooled is dropped and counted (`spool_io_error`), `/healthz` says `degraded` with the error
//! under `spool.error`, and while the link is up new frames go straight to Kafka (the backlog
//! cannot grow anyway). A delivered spooled frame whose deletion fails is remembered and not
//! sent again; its deletion is retried. Everything resumes by itself once the disk works.
//!
//! # Layout
//! [`policy`] decides (a pure state machine, unit-tested with a fake clock); this module
//! carries out its [`Action`]s with librdkafka and the spool, feeds the results back, and
//! keeps the metrics. [`config`] is `[forwarder]`.

pub mod config;
pub mod policy;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use crossbeam_channel::{Receiver, Sender, select};
use framelink_common::KafkaSettings;
use framelink_common::link::{LinkContext, LinkStatus};
use framelink_common::shutdown::Shutdown;
use rand::RngExt;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, PurgeConfig, ThreadedProducer};

use crate::drop_reason::DropReason;
use crate::frame::{Frame, now_ns};
use crate::metrics::{LinkState, Metrics};
use crate::spool::Spool;
pub use config::ForwarderConfig;
use policy::{Action, Delivery, LinkPolicy, Now, Origin, Refusal};

/// A frame handed to librdkafka, returned to us with its delivery report.
struct Pending {
    origin: Origin,
    frame: Frame,
}

type Report = (Box<Pending>, Result<(), KafkaError>);

/// librdkafka context: link diagnosis plus delivery reports onto a channel.
struct ForwardContext {
    link: LinkContext,
    reports: Sender<Report>,
}

framelink_common::impl_link_client_context!(ForwardContext, link);

impl ProducerContext for ForwardContext {
    type DeliveryOpaque = Box<Pending>;
    fn delivery(&self, result: &DeliveryResult<'_>, pending: Box<Pending>) {
        let outcome = match result {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(e.clone()),
        };
        // The forwarder outlives the producer; if it is gone we are shutting down anyway.
        let _ = self.reports.send((pending, outcome));
    }
}

/// Errors for which sending again cannot help.
fn permanent(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessage | RDKafkaErrorCode::InvalidRecord | RDKafkaErrorCode::InvalidMessageSize)
    )
}

/// The system clock, for the policy (which never reads a clock itself).
fn now() -> Now {
    Now { instant: Instant::now(), wall: SystemTime::now() }
}

/// ±25 % on each retry delay.
fn retry_jitter() -> f64 {
    rand::rng().random_range(0.75..1.25)
}

fn make_producer(client: &rdkafka::ClientConfig, link: &Arc<LinkStatus>, tx: &Sender<Report>) -> Result<ThreadedProducer<ForwardContext>> {
    client.create_with_context(ForwardContext { link: LinkContext::new(link.clone()), reports: tx.clone() }).context("creating the Kafka producer")
}

pub struct Forwarder {
    cfg: ForwarderConfig,
    policy: LinkPolicy,
    producer: ThreadedProducer<ForwardContext>,
    /// The producer's settings and report channel, to replace it after a fatal error.
    client: rdkafka::ClientConfig,
    report_tx: Sender<Report>,
    /// Tests only (`FRAMELINK_TEST_FATAL_ERROR_AFTER`): inject a fatal producer error once this
    /// many frames were acknowledged.
    inject_fatal_after: Option<u64>,
    reports: Receiver<Report>,
    spool: Arc<dyn Spool>,
    metrics: Arc<Metrics>,
    link: Arc<LinkStatus>,
    /// When the spool's disk figures were last exported (every [`STATS_EVERY`]).
    stats_exported: Instant,
}

/// How often a busy forwarder exports the spool's disk figures (the record count: every turn).
const STATS_EVERY: Duration = Duration::from_millis(100);

impl Forwarder {
    pub fn new(
        cfg: ForwarderConfig,
        kafka: &KafkaSettings,
        spool: Arc<dyn Spool>,
        metrics: Arc<Metrics>,
        flush_every: Duration,
    ) -> Result<Self> {
        let (tx, reports) = crossbeam_channel::unbounded();
        let link = Arc::new(LinkStatus::default());
        let mut client = kafka.client_config("framelink-agent");
        client
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", cfg.message_timeout_ms.to_string())
            .set("queue.buffering.max.kbytes", (cfg.queue_max_bytes.as_u64() / 1024).max(1).to_string())
            .set("queue.buffering.max.messages", "100000")
            .set("linger.ms", cfg.linger_ms.to_string())
            // JPEG does not compress; do not spend edge CPU on it.
            .set("compression.type", "none")
            .set("message.max.bytes", (cfg.max_message_bytes.as_u64() + 64 * 1024).to_string())
            // librdkafka adds its own jitter (±20 %) to these.
            .set("reconnect.backoff.ms", "100")
            .set("reconnect.backoff.max.ms", "10000");
        let producer = make_producer(&client, &link, &tx)?;
        let policy = LinkPolicy::new(cfg.clone(), flush_every, spool.stats().records, now(), retry_jitter);
        Ok(Self {
            cfg,
            policy,
            producer,
            client,
            report_tx: tx,
            inject_fatal_after: framelink_common::fault::fatal_error_after(),
            reports,
            spool,
            metrics,
            link,
            stats_exported: Instant::now().checked_sub(STATS_EVERY).unwrap_or_else(Instant::now),
        })
    }

    /// Runs until `shutdown` is set and `frames` is closed (capture stopped), then waits up
    /// to `grace` for what is in flight, spools the rest, and flushes the spool. Cameras that
    /// finish (a directory without `loop`) do not stop it: the spool still has to drain.
    pub fn run(mut self, frames: Receiver<Frame>, shutdown: &Shutdown, grace: Duration) -> Result<()> {
        let tick = crossbeam_channel::tick(Duration::from_millis(50));
        let mut frames = frames;
        let mut capture_done = false;
        loop {
            self.metrics.beat();
            if capture_done && shutdown.is_set() {
                break;
            }
            select! {
                recv(frames) -> f => match f {
                    Ok(f) => {
                        let actions = self.policy.on_frame(f);
                        self.carry_out(actions);
                    }
                    Err(_) => {
                        capture_done = true;
                        frames = crossbeam_channel::never();
                    }
                },
                recv(self.reports) -> r => {
                    let (p, res) = r.expect("the producer context holds a sender");
                    self.on_report(*p, res);
                }
                recv(tick) -> _ => {}
            }
            self.maintain();
        }
        self.shutdown(grace)
    }

    /// Carries out `actions` in order; the actions a result brings run before the rest.
    fn carry_out(&mut self, actions: Vec<Action>) {
        let mut queue = VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            let next = self.perform(action);
            for a in next.into_iter().rev() {
                queue.push_front(a);
            }
        }
    }

    /// Carries out one action and feeds its result to the policy; returns what that brings.
    fn perform(&mut self, action: Action) -> Vec<Action> {
        match action {
            Action::Produce { origin, frame } => return self.produce(origin, frame),
            Action::DropTooLarge { frame } => {
                let camera = &frame.meta.camera_id;
                tracing::warn!(camera, seq = frame.meta.seq, bytes = frame.payload.len(), limit = self.cfg.max_message_bytes.as_u64(), "Frame larger than forwarder.max_message_bytes: dropped.");
                self.metrics.count_drop(camera, DropReason::TooLarge, 1);
            }
            Action::Spool { frame, reason } => {
                if self.push_to_spool(&frame, reason.as_str()).is_none() {
                    self.metrics.count_drop(&frame.meta.camera_id, DropReason::SpoolIoError, 1);
                }
            }
            Action::CopyToSpool { live_id, frame } => {
                // A copy that did not make it leaves the frame with librdkafka: it is spooled (or
                // counted) if its delivery fails.
                if self.push_to_spool(&frame, policy::SpoolReason::Unacknowledged.as_str()) == Some(true) {
                    self.policy.on_copied(live_id);
                }
            }
            Action::FlushSpool => {
                let ok = match self.spool.flush() {
                    Ok(()) => true,
                    Err(e) => {
                        self.spool_failed("flushing", &e);
                        false
                    }
                };
                self.policy.on_spool_flushed(now(), ok);
            }
            Action::RemoveFromSpool(key) => {
                let ok = match self.spool.remove(&key) {
                    Ok(_) => true,
                    Err(e) => {
                        self.spool_failed("deleting a delivered frame", &e);
                        false
                    }
                };
                self.policy.on_spool_removed(&key, ok);
            }
            Action::ReadSpool { after, limit } => match self.spool.read_after_skipping(after.as_ref(), limit, &|k| self.policy.holds(k)) {
                Ok(batch) => return self.policy.on_spool_batch(batch, self.spool.records()),
                Err(e) => {
                    self.spool_failed("reading", &e);
                    self.policy.on_spool_read_failed(now());
                }
            },
            Action::CountEvicted(key) => {
                tracing::debug!(record = %key, "A frame evicted from the full spool while being sent was not delivered.");
                self.metrics.count_drop(key.camera_or_unknown(), DropReason::FullOldest, 1);
            }
            Action::CountDamaged { key, reason } => {
                tracing::error!(record = %key, reason, "Damaged spool record skipped.");
                self.metrics.count_drop(key.camera_or_unknown(), DropReason::SpoolDamaged, 1);
                self.spool.note_damaged();
            }
            Action::ProbeSpool => {
                if self.spool.probe().is_ok() {
                    self.spool_ok();
                }
            }
            Action::ReplaceProducer => self.replace_producer(),
            Action::PurgeProducer => self.producer.purge(PurgeConfig::default().queue().inflight()),
            Action::AwaitReports { at_most } => {
                let until = Instant::now() + at_most;
                while self.policy.in_flight() > 0 && Instant::now() < until {
                    if let Ok((p, res)) = self.reports.recv_timeout(Duration::from_millis(100)) {
                        self.on_report(*p, res);
                    }
                }
            }
            Action::Continue(step) => return self.policy.continue_with(now(), step),
        }
        Vec::new()
    }

    fn produce(&mut self, origin: Origin, frame: Frame) -> Vec<Action> {
        let key = frame.meta.key();
        let headers = frame.meta.to_kafka_headers();
        let payload = frame.payload.clone();
        let live = match &origin {
            Origin::Live(id) => Some((*id, frame.clone())),
            Origin::Spool(_) => None,
        };
        let boxed = Box::new(Pending { origin, frame });
        let record = BaseRecord::with_opaque_to(&self.cfg.topic, boxed).key(&key).payload(payload.as_ref()).headers(headers);
        match self.producer.send(record) {
            Ok(()) => {
                if let Some((id, frame)) = live {
                    self.policy.on_live_accepted(now(), id, frame);
                }
                Vec::new()
            }
            Err((e, record)) => {
                let p = record.delivery_opaque;
                let refusal = if matches!(e, KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) { Refusal::QueueFull } else { Refusal::Other };
                if refusal == Refusal::Other {
                    tracing::warn!(error = %e, "Produce refused; spooling.");
                }
                self.policy.on_produce_refused(now(), p.origin, p.frame, refusal)
            }
        }
    }

    /// A delivery report from librdkafka: counted here, judged by the policy.
    fn on_report(&mut self, p: Pending, res: Result<(), KafkaError>) {
        let camera = &p.frame.meta.camera_id;
        let delivery = match res {
            Ok(()) => {
                self.metrics.inc(&self.metrics.sent, camera);
                let age = now_ns().saturating_sub(p.frame.meta.capture_ns) as f64 / 1e9;
                self.metrics.observe(&self.metrics.delivery_seconds, camera, age);
                Delivery::Acked
            }
            Err(e) if permanent(&e) => {
                tracing::error!(camera, seq = p.frame.meta.seq, error = %e, "Kafka rejected the frame for good: dropped.");
                self.metrics.count_drop(camera, DropReason::Rejected, 1);
                Delivery::Rejected
            }
            Err(e) => Delivery::Failed {
                why: match self.link.diagnosis() {
                    Some(d) => format!("{e}; {d}"),
                    None => e.to_string(),
                },
            },
        };
        let actions = self.policy.on_report(now(), p.origin, p.frame, delivery);
        self.carry_out(actions);
    }

    /// A spool operation failed: the forwarder goes on (see the module doc).
    fn spool_failed(&mut self, what: &str, e: &anyhow::Error) {
        let error = format!("{what}: {e:#}");
        if self.policy.spool_failed(error.clone()) {
            tracing::error!(error, "Spool I/O error: frames that cannot be spooled are dropped and counted (spool_io_error).");
        }
        self.metrics.set_spool_error(Some(error));
    }

    fn spool_ok(&mut self) {
        if self.policy.spool_ok() {
            tracing::info!("Spool writable again.");
            self.metrics.set_spool_error(None);
        }
    }

    /// Writes `frame` to the spool and counts what happened; `Some(stored)`, or `None` when
    /// the spool could not be written (the error is reported by `spool_failed`).
    fn push_to_spool(&mut self, frame: &Frame, reason: &str) -> Option<bool> {
        let out = match self.spool.push(frame) {
            Ok(out) => out,
            Err(e) => {
                self.spool_failed("writing a frame", &e);
                return None;
            }
        };
        self.spool_ok();
        let camera = &frame.meta.camera_id;
        if out.stored {
            self.metrics.add_reason(&self.metrics.spooled, camera, reason, 1);
            self.metrics.spool_written_bytes.inc_by(frame.payload.len() as u64);
            self.policy.on_spool_stored();
        }
        if let Some(why) = out.refused {
            self.metrics.count_drop(camera, why, 1);
        }
        for key in out.evicted {
            // A frame being sent right now is counted only if that send fails (CountEvicted).
            if self.policy.on_spool_evicted(&key) {
                self.metrics.count_drop(key.camera_or_unknown(), DropReason::FullOldest, 1);
            }
        }
        Some(out.stored)
    }

    /// A fatal librdkafka error (e.g. an idempotence sequence error after a leader change)
    /// leaves the producer refusing every send until it is replaced (see
    /// [`LinkPolicy::on_fatal_error`]). Counted in `producer_recreated`.
    fn check_fatal_producer(&mut self) {
        if let Some(n) = self.inject_fatal_after
            && self.metrics.total("frames_sent") >= n
        {
            self.inject_fatal_after = None;
            framelink_common::fault::inject_fatal_error(self.producer.client());
        }
        let Some((code, reason)) = self.producer.client().fatal_error() else { return };
        let actions = self.policy.on_fatal_error(now(), format!("fatal producer error {code:?}: {reason}"));
        self.carry_out(actions);
    }

    fn replace_producer(&mut self) {
        match make_producer(&self.client, &self.link, &self.report_tx) {
            Ok(new) => {
                if let Some((code, reason)) = self.producer.client().fatal_error() {
                    tracing::error!(error = ?code, reason, "Fatal Kafka producer error: the producer is replaced; its frames are in the spool.");
                }
                self.metrics.producer_recreated.inc();
                let old = std::mem::replace(&mut self.producer, new);
                // Its frames come back as failed deliveries (purged) on the report channel.
                old.purge(PurgeConfig::default().queue().inflight());
                drop(old);
                self.policy.on_producer_replaced(now());
            }
            Err(e) => {
                tracing::error!(error = %e, "Cannot create a new Kafka producer after a fatal error.");
                self.policy.on_producer_replacement_failed(now());
            }
        }
    }

    /// Periodic work: a fatal producer, the link's diagnosis, then the policy's tick (drain,
    /// flush, spool retries); exports the state.
    fn maintain(&mut self) {
        self.check_fatal_producer();
        let outage = self.link.outage();
        if let Some(at) = self.link.leaderless() {
            self.policy.on_leaderless(at, now());
        }
        let actions = self.policy.on_tick(now(), outage.as_ref());
        self.carry_out(actions);
        self.metrics.link_stalls.inc_by(self.policy.stalls().saturating_sub(self.metrics.link_stalls.get()));
        self.metrics.spool_records.set(self.spool.records() as i64);
        if self.stats_exported.elapsed() >= STATS_EVERY {
            self.export_spool_stats();
        }
        self.metrics.frames_in_flight.set(self.policy.in_flight() as i64);
        let state = self.policy.link_state();
        let error = self.policy.last_failure().map(str::to_owned).or_else(|| {
            (state != LinkState::Up).then(|| self.link.diagnosis().map(|d| d.to_string())).flatten()
        });
        self.metrics.set_link(state, error);
    }

    /// The spool's disk figures (its cap asks the filesystem: not on every turn of a drain).
    fn export_spool_stats(&mut self) {
        let stats = self.spool.stats();
        self.metrics.spool_records.set(stats.records as i64);
        self.metrics.spool_bytes.set(stats.disk_bytes as i64);
        self.metrics.spool_damaged.set(stats.damaged as i64);
        self.metrics.spool_damaged_pruned.set(stats.damaged_pruned as i64);
        self.metrics.spool_cap_bytes.set(stats.cap_bytes as i64);
        self.metrics.spool_index_rebuilt.set(stats.index_rebuilt as i64);
        self.stats_exported = Instant::now();
    }

    fn shutdown(mut self, grace: Duration) -> Result<()> {
        let actions = self.policy.on_shutdown(grace);
        self.carry_out(actions);
        self.maintain();
        self.export_spool_stats();
        tracing::info!(spooled = self.spool.stats().records, "Forwarder stopped.");
        Ok(())
    }
}
