//! The forwarder: encoded frames → Kafka, with the spool in between when the link is bad.
//!
//! # Modes
//! - **Direct**: new frames are produced straight to Kafka (nothing touches the disk).
//! - **Spooling**: new frames go to the spool. Entered when a delivery fails or times out,
//!   when librdkafka's memory queue is full, or when librdkafka reports the brokers down / a
//!   TLS error. While spooling, the spool is drained (oldest first, in per-camera sequence
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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use bytesize::ByteSize;
use crossbeam_channel::{Receiver, Sender, select};
use framelink_common::KafkaSettings;
use framelink_common::link::{LinkContext, LinkStatus};
use rand::RngExt;
use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, PurgeConfig, ThreadedProducer};
use serde::Deserialize;

use crate::frame::{Frame, now_ns};
use crate::metrics::{LinkState, Metrics};
use crate::spool::{Spool, SpoolKey};

/// `[forwarder]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwarderConfig {
    /// Kafka topic for frames. Default `frames`.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Largest frame sent; larger ones are refused before produce and counted. Must not
    /// exceed the topic's / broker's `max.message.bytes`. Default 1 MiB (Kafka's default).
    #[serde(default = "default_max_message")]
    pub max_message_bytes: ByteSize,
    /// Memory librdkafka may hold for frames not yet acknowledged; beyond it frames are
    /// spooled. Default 32 MiB.
    #[serde(default = "default_queue")]
    pub queue_max_bytes: ByteSize,
    /// librdkafka's delivery timeout; a frame not acknowledged in time is spooled (not lost).
    /// Default 30000.
    #[serde(default = "default_timeout")]
    pub message_timeout_ms: u64,
    /// librdkafka `linger.ms`. Default 5.
    #[serde(default = "default_linger")]
    pub linger_ms: u64,
    /// New frames first, spool back-filled beside them. Default false (strict per-camera order).
    #[serde(default)]
    pub live_first: bool,
    /// With `live_first`: spooled frames sent per second. Default 10.
    #[serde(default = "default_backfill")]
    pub backfill_fps: f64,
    /// Spooled frames in flight at once while draining. Default 32.
    #[serde(default = "default_drain_window")]
    pub drain_window: usize,
    /// First retry delay after a failed drain attempt; doubles to `retry_max_ms`, ±25 % jitter.
    /// Default 500.
    #[serde(default = "default_retry_min")]
    pub retry_min_ms: u64,
    /// Default 15000.
    #[serde(default = "default_retry_max")]
    pub retry_max_ms: u64,
}

fn default_topic() -> String {
    "frames".into()
}
fn default_max_message() -> ByteSize {
    ByteSize::mib(1)
}
fn default_queue() -> ByteSize {
    ByteSize::mib(32)
}
fn default_timeout() -> u64 {
    30_000
}
fn default_linger() -> u64 {
    5
}
fn default_backfill() -> f64 {
    10.0
}
fn default_drain_window() -> usize {
    32
}
fn default_retry_min() -> u64 {
    500
}
fn default_retry_max() -> u64 {
    15_000
}

impl Default for ForwarderConfig {
    fn default() -> Self {
        crate::config::defaults("forwarder")
    }
}

impl ForwarderConfig {
    pub fn validate(&self) -> Result<()> {
        use anyhow::bail;
        if self.topic.is_empty() {
            bail!("config key `forwarder.topic`: must not be empty");
        }
        if self.max_message_bytes.as_u64() < 1024 || self.max_message_bytes.as_u64() > 1_000_000_000 {
            bail!("config key `forwarder.max_message_bytes`: {} is not from 1 KiB to 1 GB", self.max_message_bytes);
        }
        if self.queue_max_bytes.as_u64() < self.max_message_bytes.as_u64() {
            bail!("config key `forwarder.queue_max_bytes`: must be at least `max_message_bytes`");
        }
        if self.message_timeout_ms < 1000 {
            bail!("config key `forwarder.message_timeout_ms`: must be at least 1000");
        }
        if self.drain_window == 0 {
            bail!("config key `forwarder.drain_window`: must be at least 1");
        }
        if !(self.backfill_fps > 0.0) {
            bail!("config key `forwarder.backfill_fps`: must be above 0");
        }
        if self.retry_min_ms == 0 || self.retry_max_ms < self.retry_min_ms {
            bail!("config key `forwarder.retry_max_ms`: must be ≥ `retry_min_ms` ≥ 1");
        }
        Ok(())
    }
}

/// Where a frame in flight came from.
#[derive(Debug)]
enum Origin {
    /// A live frame, by its id in [`Forwarder::live`].
    Live(u64),
    Spool(SpoolKey),
}

/// A live frame handed to librdkafka and not yet acknowledged.
struct LiveFrame {
    frame: Frame,
    /// A copy is in the spool (the link was judged down while it waited).
    spooled: bool,
}

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

impl ClientContext for ForwardContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.link.log(level, fac, log_message)
    }
    fn error(&self, error: KafkaError, reason: &str) {
        self.link.error(error, reason)
    }
}

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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Direct,
    Spooling,
}

fn make_producer(client: &rdkafka::ClientConfig, link: &Arc<LinkStatus>, tx: &Sender<Report>) -> Result<ThreadedProducer<ForwardContext>> {
    client.create_with_context(ForwardContext { link: LinkContext::new(link.clone()), reports: tx.clone() }).context("creating the Kafka producer")
}

pub struct Forwarder {
    cfg: ForwarderConfig,
    producer: ThreadedProducer<ForwardContext>,
    /// The producer's settings and report channel, to replace it after a fatal error.
    client: rdkafka::ClientConfig,
    report_tx: Sender<Report>,
    recreate_at: Instant,
    recreate_backoff: Duration,
    /// Tests only (`FRAMELINK_TEST_FATAL_ERROR_AFTER`): inject a fatal producer error once this
    /// many frames were acknowledged.
    inject_fatal_after: Option<u64>,
    reports: Receiver<Report>,
    spool: Arc<dyn Spool>,
    metrics: Arc<Metrics>,
    link: Arc<LinkStatus>,
    mode: Mode,
    /// Live frames in librdkafka's hands, by id.
    live: HashMap<u64, LiveFrame>,
    next_live_id: u64,
    spool_in_flight: HashSet<SpoolKey>,
    cursor: Option<SpoolKey>,
    next_attempt: Instant,
    backoff: Duration,
    last_ok: SystemTime,
    last_failure: Option<String>,
    spool_dirty: bool,
    /// The last spool I/O error, while the spool keeps failing.
    spool_error: Option<String>,
    /// Spooled frames delivered whose deletion failed: not sent again, deletion retried.
    undeleted: HashSet<SpoolKey>,
    /// Spool copies of live frames librdkafka still holds: not drained while the original is
    /// in flight (that would send the frame twice); kept or deleted by the original's report.
    copied: HashSet<SpoolKey>,
    last_flush: Instant,
    flush_every: Duration,
    backfill_budget: f64,
    last_backfill: Instant,
}

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
        let records = spool.stats().records;
        let mode = if records > 0 { Mode::Spooling } else { Mode::Direct };
        let backoff = Duration::from_millis(cfg.retry_min_ms);
        Ok(Self {
            cfg,
            producer,
            client,
            report_tx: tx,
            recreate_at: Instant::now(),
            recreate_backoff: Duration::from_millis(500),
            inject_fatal_after: framelink_common::fault::fatal_error_after(),
            reports,
            spool,
            metrics,
            link,
            mode,
            live: HashMap::new(),
            next_live_id: 0,
            spool_in_flight: HashSet::new(),
            cursor: None,
            next_attempt: Instant::now(),
            backoff,
            last_ok: SystemTime::now(),
            last_failure: None,
            spool_dirty: false,
            spool_error: None,
            undeleted: HashSet::new(),
            copied: HashSet::new(),
            last_flush: Instant::now(),
            flush_every,
            backfill_budget: 0.0,
            last_backfill: Instant::now(),
        })
    }

    /// Runs until `shutdown` is set and `frames` is closed (capture stopped), then waits up
    /// to `grace` for what is in flight, spools the rest, and flushes the spool. Cameras that
    /// finish (a directory without `loop`) do not stop it: the spool still has to drain.
    pub fn run(mut self, frames: Receiver<Frame>, shutdown: &AtomicBool, grace: Duration) -> Result<()> {
        let tick = crossbeam_channel::tick(Duration::from_millis(50));
        let mut frames = frames;
        let mut capture_done = false;
        loop {
            self.metrics.beat();
            if capture_done && shutdown.load(Ordering::Relaxed) {
                break;
            }
            select! {
                recv(frames) -> f => match f {
                    Ok(f) => self.on_frame(f)?,
                    Err(_) => {
                        capture_done = true;
                        frames = crossbeam_channel::never();
                    }
                },
                recv(self.reports) -> r => {
                    let (p, res) = r.expect("the producer context holds a sender");
                    self.on_report(*p, res)?;
                }
                recv(tick) -> _ => {}
            }
            self.maintain()?;
        }
        self.shutdown(grace)
    }

    fn on_frame(&mut self, frame: Frame) -> Result<()> {
        let camera = frame.meta.camera_id.clone();
        if frame.payload.len() as u64 > self.cfg.max_message_bytes.as_u64() {
            tracing::warn!(camera, seq = frame.meta.seq, bytes = frame.payload.len(), limit = self.cfg.max_message_bytes.as_u64(), "Frame larger than forwarder.max_message_bytes: dropped.");
            self.metrics.add_reason(&self.metrics.dropped, &camera, "too_large", 1);
            return Ok(());
        }
        let direct = match self.mode {
            Mode::Direct => true,
            // A spool that cannot be written cannot hold a backlog: with the link up, send.
            Mode::Spooling => (self.cfg.live_first || self.spool_error.is_some()) && self.link_looks_up(),
        };
        if direct {
            self.next_live_id += 1;
            self.produce(Pending { origin: Origin::Live(self.next_live_id), frame })
        } else {
            self.to_spool(&frame, "backlog")
        }
    }

    fn link_looks_up(&self) -> bool {
        self.last_failure.is_none()
    }

    fn produce(&mut self, p: Pending) -> Result<()> {
        let key = p.frame.meta.key();
        let headers = p.frame.meta.to_kafka_headers();
        let payload = p.frame.payload.clone();
        let live = match &p.origin {
            Origin::Live(id) => Some((*id, p.frame.clone())),
            Origin::Spool(_) => None,
        };
        let boxed = Box::new(p);
        let record = BaseRecord::with_opaque_to(&self.cfg.topic, boxed).key(&key).payload(payload.as_ref()).headers(headers);
        match self.producer.send(record) {
            Ok(()) => {
                if let Some((id, frame)) = live {
                    self.live.insert(id, LiveFrame { frame, spooled: false });
                }
                Ok(())
            }
            Err((e, record)) => {
                let p = record.delivery_opaque;
                let reason = if matches!(e, KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) { "queue_full" } else { "produce_error" };
                if reason == "produce_error" {
                    tracing::warn!(error = %e, "Produce refused; spooling.");
                }
                match p.origin {
                    Origin::Live(_) => {
                        self.enter_spooling(reason)?;
                        self.to_spool(&p.frame, reason)
                    }
                    Origin::Spool(key) => {
                        // Stays in the spool; try again after the queue drains.
                        self.spool_in_flight.remove(&key);
                        self.cursor = None;
                        self.next_attempt = Instant::now() + Duration::from_millis(100);
                        Ok(())
                    }
                }
            }
        }
    }

    /// A spool operation failed: the forwarder goes on (see the module doc).
    fn spool_failed(&mut self, what: &str, e: &anyhow::Error) {
        let error = format!("{what}: {e:#}");
        if self.spool_error.is_none() {
            tracing::error!(error, "Spool I/O error: frames that cannot be spooled are dropped and counted (spool_io_error).");
        }
        self.metrics.set_spool_error(Some(error.clone()));
        self.spool_error = Some(error);
    }

    fn spool_ok(&mut self) {
        if self.spool_error.take().is_some() {
            tracing::info!("Spool writable again.");
            self.metrics.set_spool_error(None);
        }
    }

    /// Deletes a delivered (or refused) spooled frame; if that fails, it is remembered so it
    /// is not sent again, and deleted later.
    fn remove_from_spool(&mut self, key: &SpoolKey) {
        match self.spool.remove(key) {
            Ok(_) => {
                self.undeleted.remove(key);
            }
            Err(e) => {
                self.spool_failed("deleting a delivered frame", &e);
                self.undeleted.insert(key.clone());
            }
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
            self.spool_dirty = true;
        }
        for (cam, n, why) in out.dropped {
            self.metrics.add_reason(&self.metrics.dropped, &cam, why.as_str(), n);
        }
        Some(out.stored)
    }

    fn to_spool(&mut self, frame: &Frame, reason: &str) -> Result<()> {
        if self.push_to_spool(frame, reason).is_none() {
            self.metrics.add_reason(&self.metrics.dropped, &frame.meta.camera_id, "spool_io_error", 1);
        }
        Ok(())
    }

    /// The link is judged down: new frames go to the spool, and so do copies of the live frames
    /// librdkafka still holds (flushed at once), so that a crash during the outage cannot lose
    /// them.
    fn enter_spooling(&mut self, why: &str) -> Result<()> {
        if self.mode == Mode::Direct {
            tracing::warn!(reason = why, "Kafka link degraded: spooling frames to disk.");
        }
        self.mode = Mode::Spooling;
        let waiting: Vec<(u64, Frame)> = self.live.iter().filter(|(_, l)| !l.spooled).map(|(id, l)| (*id, l.frame.clone())).collect();
        if waiting.is_empty() {
            return Ok(());
        }
        tracing::info!(frames = waiting.len(), "Unacknowledged frames copied to the spool.");
        for (id, frame) in waiting {
            // A copy that did not make it leaves the frame with librdkafka: it is spooled (or
            // counted) if its delivery fails.
            if self.push_to_spool(&frame, "unacknowledged") == Some(true) {
                self.copied.insert(SpoolKey::new(&frame.meta.camera_id, frame.meta.seq));
                if let Some(l) = self.live.get_mut(&id) {
                    l.spooled = true;
                }
            }
        }
        self.flush_spool();
        Ok(())
    }

    fn flush_spool(&mut self) {
        match self.spool.flush() {
            Ok(()) => self.spool_dirty = false,
            Err(e) => self.spool_failed("flushing", &e),
        }
        self.last_flush = Instant::now();
    }

    fn on_report(&mut self, p: Pending, res: Result<(), KafkaError>) -> Result<()> {
        let camera = p.frame.meta.camera_id.clone();
        // A live frame whose copy is in the spool already.
        let spooled_copy = match &p.origin {
            Origin::Live(id) => self.live.remove(id).is_some_and(|l| l.spooled).then(|| SpoolKey::new(&camera, p.frame.meta.seq)).filter(|k| self.copied.remove(k)),
            Origin::Spool(key) => {
                self.spool_in_flight.remove(key);
                None
            }
        };
        // Its copy is not needed (delivered, or refused for good) unless being sent right now.
        let drop_copy = |this: &mut Self| {
            if let Some(key) = &spooled_copy
                && !this.spool_in_flight.contains(key)
            {
                this.remove_from_spool(key);
            }
        };
        match res {
            Ok(()) => {
                self.metrics.inc(&self.metrics.sent, &camera);
                let age = now_ns().saturating_sub(p.frame.meta.capture_ns) as f64 / 1e9;
                self.metrics.observe(&self.metrics.delivery_seconds, &camera, age);
                self.last_ok = SystemTime::now();
                if self.last_failure.take().is_some() {
                    tracing::info!("Kafka link back: deliveries succeed.");
                }
                self.backoff = Duration::from_millis(self.cfg.retry_min_ms);
                if let Origin::Spool(key) = &p.origin {
                    self.remove_from_spool(key);
                }
                drop_copy(self);
            }
            Err(e) if permanent(&e) => {
                tracing::error!(camera, seq = p.frame.meta.seq, error = %e, "Kafka rejected the frame for good: dropped.");
                self.metrics.add_reason(&self.metrics.dropped, &camera, "rejected", 1);
                if let Origin::Spool(key) = &p.origin {
                    self.remove_from_spool(key);
                }
                drop_copy(self);
            }
            Err(e) => {
                let why = match self.link.diagnosis() {
                    Some(d) => format!("{e}; {d}"),
                    None => e.to_string(),
                };
                if self.last_failure.is_none() {
                    tracing::warn!(camera, seq = p.frame.meta.seq, error = %why, "Delivery failed; frame kept in the spool.");
                }
                self.last_failure = Some(why);
                self.enter_spooling("delivery_failed")?;
                match p.origin {
                    Origin::Live(_) if spooled_copy.is_some() => {} // in the spool already
                    Origin::Live(_) => self.to_spool(&p.frame, "delivery_failed")?,
                    Origin::Spool(_) => self.schedule_retry(),
                }
            }
        }
        Ok(())
    }

    fn schedule_retry(&mut self) {
        let jitter = rand::rng().random_range(0.75..1.25);
        self.next_attempt = Instant::now() + self.backoff.mul_f64(jitter);
        self.backoff = (self.backoff * 2).min(Duration::from_millis(self.cfg.retry_max_ms));
        self.cursor = None;
    }

    /// A fatal librdkafka error (e.g. an idempotence sequence error after a leader change)
    /// leaves the producer refusing every send until it is replaced: the frames it held come
    /// back as failed deliveries and go to the spool (they were copied there already), a new
    /// producer sends them. Counted in `producer_recreated`.
    fn replace_fatal_producer(&mut self) -> Result<()> {
        if let Some(n) = self.inject_fatal_after
            && self.metrics.total("frames_sent") >= n
        {
            self.inject_fatal_after = None;
            framelink_common::fault::inject_fatal_error(self.producer.client());
        }
        let Some((code, reason)) = self.producer.client().fatal_error() else { return Ok(()) };
        if Instant::now() < self.recreate_at {
            return Ok(());
        }
        self.last_failure = Some(format!("fatal producer error {code:?}: {reason}"));
        self.enter_spooling("producer_fatal")?;
        match make_producer(&self.client, &self.link, &self.report_tx) {
            Ok(new) => {
                tracing::error!(error = ?code, reason, "Fatal Kafka producer error: the producer is replaced; its frames are in the spool.");
                self.metrics.producer_recreated.inc();
                self.recreate_backoff = Duration::from_millis(500);
                let old = std::mem::replace(&mut self.producer, new);
                // Its frames come back as failed deliveries (purged) on the report channel.
                old.purge(PurgeConfig::default().queue().inflight());
                drop(old);
                self.next_attempt = Instant::now();
            }
            Err(e) => {
                tracing::error!(error = %e, "Cannot create a new Kafka producer after a fatal error.");
                self.recreate_at = Instant::now() + self.recreate_backoff;
                self.recreate_backoff = (self.recreate_backoff * 2).min(Duration::from_secs(30));
            }
        }
        Ok(())
    }

    /// Periodic work: notice a dead link, drain, flush, export state.
    fn maintain(&mut self) -> Result<()> {
        self.replace_fatal_producer()?;
        // librdkafka reports unreachable brokers / TLS failures long before message timeouts.
        if let Some(d) = self.link.diagnosis() {
            // Not every disconnect: a broker closing an idle connection ("in state UP") is
            // routine; refused connections, TLS and authentication failures are not.
            let serious = d.kind != framelink_common::link::LinkErrorKind::Other && !d.message.contains("in state UP");
            if serious && d.at > self.last_ok && self.mode == Mode::Direct {
                tracing::error!(error = %d, "Kafka unreachable: spooling frames to disk.");
                self.last_failure = Some(d.to_string());
                self.enter_spooling(d.kind.as_str())?;
            }
        }
        if self.mode == Mode::Spooling {
            self.drain()?;
        }
        if self.spool_dirty && self.last_flush.elapsed() >= self.flush_every {
            self.flush_spool();
        }
        // Deletions that failed, and a spool that failed: try again now and then.
        if (!self.undeleted.is_empty() || self.spool_error.is_some()) && self.last_flush.elapsed() >= Duration::from_secs(1) {
            for key in self.undeleted.clone() {
                self.remove_from_spool(&key);
            }
            self.flush_spool();
            if self.undeleted.is_empty() && self.spool_error.is_some() && self.spool.probe().is_ok() {
                self.spool_ok();
            }
        }
        let stats = self.spool.stats();
        self.metrics.spool_records.set(stats.records as i64);
        self.metrics.spool_bytes.set(stats.disk_bytes as i64);
        self.metrics.spool_damaged.set(stats.damaged as i64);
        self.metrics.spool_damaged_pruned.set(stats.damaged_pruned as i64);
        let state = match (self.mode, &self.last_failure) {
            (Mode::Direct, None) => LinkState::Up,
            (_, Some(_)) => LinkState::Down,
            (Mode::Spooling, None) => LinkState::Draining,
        };
        let error = self.last_failure.clone().or_else(|| {
            (state != LinkState::Up).then(|| self.link.diagnosis().map(|d| d.to_string())).flatten()
        });
        self.metrics.set_link(state, error);
        Ok(())
    }

    fn drain(&mut self) -> Result<()> {
        if Instant::now() < self.next_attempt || (!self.cfg.live_first && !self.live.is_empty()) {
            return Ok(());
        }
        let mut room = self.cfg.drain_window.saturating_sub(self.spool_in_flight.len());
        if self.cfg.live_first {
            let now = Instant::now();
            self.backfill_budget = (self.backfill_budget + now.duration_since(self.last_backfill).as_secs_f64() * self.cfg.backfill_fps)
                .min(self.cfg.backfill_fps.max(1.0));
            self.last_backfill = now;
            room = room.min(self.backfill_budget as usize);
        }
        if self.last_failure.is_some() {
            // Probe with one frame until a delivery succeeds.
            room = room.min(1).min(usize::from(self.spool_in_flight.is_empty()));
        }
        if room == 0 {
            return Ok(());
        }
        let batch = match self.spool.read_after(self.cursor.as_ref(), room + self.spool_in_flight.len() + self.undeleted.len()) {
            Ok(b) => b,
            Err(e) => {
                self.spool_failed("reading", &e);
                self.schedule_retry();
                return Ok(());
            }
        };
        if batch.is_empty() {
            // Back to Direct only once the link is known to work: with the link down and an
            // empty spool, new frames keep going to the spool and serve as probes.
            if self.cursor.take().is_none()
                && self.spool_in_flight.is_empty()
                && self.last_failure.is_none()
                && self.spool.stats().records == 0
            {
                if self.mode == Mode::Spooling {
                    tracing::info!("Spool drained: frames go straight to Kafka again.");
                }
                self.mode = Mode::Direct;
            }
            return Ok(());
        }
        for (key, frame) in batch {
            if room == 0 {
                break;
            }
            self.cursor = Some(key.clone());
            if self.spool_in_flight.contains(&key) || self.undeleted.contains(&key) || self.copied.contains(&key) {
                continue;
            }
            match frame {
                Ok(frame) => {
                    self.spool_in_flight.insert(key.clone());
                    room -= 1;
                    if self.cfg.live_first {
                        self.backfill_budget -= 1.0;
                    }
                    self.produce(Pending { origin: Origin::Spool(key), frame })?;
                }
                Err(reason) => {
                    let camera = key.parts().map_or("<unknown>".to_owned(), |(c, _)| c.to_owned());
                    tracing::error!(record = %key, reason, "Damaged spool record skipped.");
                    self.metrics.add_reason(&self.metrics.dropped, &camera, "spool_damaged", 1);
                    self.spool.note_damaged();
                    self.remove_from_spool(&key);
                }
            }
        }
        Ok(())
    }

    fn shutdown(mut self, grace: Duration) -> Result<()> {
        // With the link down, waiting cannot help: spool at once.
        let grace = if self.last_failure.is_some() { Duration::ZERO } else { grace };
        let deadline = Instant::now() + grace;
        tracing::info!(in_flight = self.live.len() + self.spool_in_flight.len(), "Forwarder stopping: waiting for acknowledgements.");
        while self.live.len() + self.spool_in_flight.len() > 0 && Instant::now() < deadline {
            if let Ok((p, res)) = self.reports.recv_timeout(Duration::from_millis(100)) {
                self.on_report(*p, res)?;
            }
        }
        if self.live.len() + self.spool_in_flight.len() > 0 {
            // Give the frames back from librdkafka (purged reports arrive as errors) and spool them.
            self.producer.purge(PurgeConfig::default().queue().inflight());
            let until = Instant::now() + Duration::from_secs(5);
            while self.live.len() + self.spool_in_flight.len() > 0 && Instant::now() < until {
                if let Ok((p, res)) = self.reports.recv_timeout(Duration::from_millis(100)) {
                    self.on_report(*p, res)?;
                }
            }
        }
        self.flush_spool();
        self.maintain()?;
        tracing::info!(spooled = self.spool.stats().records, "Forwarder stopped.");
        Ok(())
    }
}
