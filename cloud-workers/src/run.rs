//! `framelink-worker run`: wires the boxes of the design together and runs them until
//! SIGTERM / SIGINT — the output topics' limits, the backend, the producer (and, at-least-once,
//! its refusals thread), the consumer, the transactions (exactly-once), the processing pool and
//! the poll loop. The work itself lives in the modules named here.
//!
//! - **Order**: frames are routed to processing threads by a hash of their key, so one
//!   camera's frames are processed and produced in order; cameras run in parallel.
//! - **At-least-once**: every consumed offset is tracked until all of its outputs (result,
//!   event, or dead letter) are acknowledged by Kafka (acks=all, idempotent producer,
//!   infinite delivery timeout). Only then may the partition's stored offset move past it,
//!   and never past an offset still in flight (`enable.auto.offset.store=false`; librdkafka
//!   auto-commits the stored offsets).
//! - **Exactly-once**: outputs and offsets go in Kafka transactions (see [`crate::txn`]).
//! - **Rebalance**: on revocation (cooperative-sticky), the worker waits (up to 30 s) until the
//!   revoked partitions' frames in flight are acknowledged and commits before letting go.
//! - **Shutdown** (SIGTERM/SIGINT): stop taking new records, finish and acknowledge what is in
//!   flight, commit synchronously, leave the group.
//! - **Lag and health** come from librdkafka's statistics callback (no extra requests on the
//!   poll thread).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use framelink_common::link::{LinkContext, LinkStatus};
use framelink_common::shutdown::Shutdown;
use rdkafka::consumer::Consumer;
use rdkafka::producer::ThreadedProducer;

use crate::backend::open_backend;
use crate::config::{Delivery, Validated};
use crate::consume::{ConsumeContext, WorkerConsumer, consumer_config};
use crate::metrics::Metrics;
use crate::offsets::{Offsets, PartitionControl};
use crate::poll::PollLoop;
use crate::pool::{Pool, Shared};
use crate::publish::limits::spawn_limits_refresher;
use crate::publish::producer::{ProduceContext, Producers, producer_config};
use crate::publish::refusals::{Poisoned, Refusal, RefusalHandler, Stalls, spawn_refusals};
use crate::publish::{PRODUCER_MAX_BYTES, Publishing, TopicLimits};
use crate::tracker::Tracker;
use crate::txn::{Transactions, Txn};

/// This worker's id: `worker.id`, else the host name (a pod's name), else the process id.
fn worker_id() -> String {
    std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| format!("pid-{}", std::process::id()))
}

pub fn run(v: Validated, shutdown: Shutdown, metrics: Arc<Metrics>) -> Result<()> {
    let cfg = &v.config;
    let id = cfg.worker.id.clone().unwrap_or_else(worker_id);
    let exactly_once = cfg.worker.delivery == Delivery::ExactlyOnce;
    let tracker = Arc::new(Tracker::default());
    let link = Arc::new(LinkStatus::default());
    let offsets = Arc::new(Offsets::new(tracker.clone(), !exactly_once));
    let stalls = Arc::new(Stalls::default());
    let limits = Arc::new(TopicLimits::new(PRODUCER_MAX_BYTES));
    let publishing = Publishing { out: cfg.output.clone(), worker: id.clone(), spec: cfg.worker.pipeline.clone(), limits: limits.clone(), tiles: cfg.tiles.clone() };
    {
        let mut h = metrics.health.lock().unwrap();
        h.stalls = Some(stalls.clone());
        h.limits = Some(limits.clone());
        h.group = cfg.consumer.group_id.clone();
        h.delivery = cfg.worker.delivery.as_str();
        h.pipeline = cfg.worker.pipeline.clone();
        h.link = Some(link.clone());
    }
    let gpu = open_backend(cfg, &metrics)?;
    let inference = crate::infer::open(&cfg.worker.pipeline_ops()?, &cfg.inference, &cfg.models, &metrics)?;
    metrics.health.lock().unwrap().inference = inference.as_ref().map(|i| i.health());

    // At-least-once: refused outputs are dead-lettered (and refused dead letters retried) by
    // the refusals thread. Exactly-once: a refusal aborts the transaction.
    let (refusals_tx, refusals_rx) = crossbeam_channel::unbounded::<Refusal>();
    let refusals = (!exactly_once).then_some(refusals_tx);
    let poisoned = Arc::new(Poisoned::default());
    let make_producer = {
        let pc = producer_config(&v, &id);
        let (link, offsets, metrics, refusals, stalls, poisoned) = (link.clone(), offsets.clone(), metrics.clone(), refusals.clone(), stalls.clone(), poisoned.clone());
        move || -> Result<Arc<ThreadedProducer<ProduceContext>>> {
            let context = ProduceContext::new(LinkContext::new(link.clone()), offsets.clone(), metrics.clone(), refusals.clone(), stalls.clone(), poisoned.clone());
            Ok(Arc::new(pc.create_with_context(context).context("creating the Kafka producer")?))
        }
    };
    let producers = Arc::new(Producers::new(make_producer()?));
    if refusals.is_some() {
        let handler = RefusalHandler { producers: producers.clone(), offsets: offsets.clone(), metrics: metrics.clone(), stalls: stalls.clone(), publishing: publishing.clone() };
        spawn_refusals(refusals_rx, handler)?;
    }
    // Each output topic's record-size limit, before the first frame (and kept fresh).
    let mut output_topics = vec![cfg.output.results_topic.clone(), cfg.output.events_topic.clone(), cfg.output.dlq_topic.clone()];
    if cfg.tiles.enabled {
        output_topics.push(cfg.tiles.results_topic.clone());
    }
    let admin_config = v.kafka.client_config(&format!("framelink-worker-{id}-admin"));
    match limits.learn(&admin_config, &output_topics) {
        Ok(()) => tracing::info!(limits = ?limits.snapshot(), "Output topics' record-size limits (max.message.bytes)."),
        Err(e) => tracing::warn!(error = %e, "Cannot read the output topics' max.message.bytes yet; records over a topic's real limit are refused by Kafka and dead-lettered."),
    }
    let limits_stop = Arc::new(AtomicBool::new(false));
    let (refresh_limits, limits_thread) = spawn_limits_refresher(limits.clone(), admin_config, output_topics, limits_stop.clone());

    let txn: Option<Arc<Txn>> = if exactly_once {
        let fresh = make_producer.clone();
        let new_producer: crate::txn::NewProducer<ProduceContext> = Box::new(move || fresh().map_err(|e| format!("{e:#}")));
        let poisoned = poisoned.clone();
        let on_commit: crate::txn::OnCommit = Box::new(move |next| poisoned.committed(next));
        Some(Arc::new(Transactions::start(producers.clone(), new_producer, on_commit, tracker.clone(), shutdown.clone()).context("starting Kafka transactions (worker.delivery = exactly-once)")?))
    } else {
        None
    };
    // A consumer, subscribed and attached; again if Kafka fences this one (see `PollLoop`).
    let make_consumer = {
        let cc = consumer_config(&v, &id);
        let revocations = Arc::new(crate::motion::Revocations::default());
        let mut topics = cfg.consumer.topics.clone();
        if cfg.tiles.enabled {
            topics.push(cfg.tiles.topic.clone());
        }
        let (link, tracker, metrics, stalls, poisoned, offsets, txn) = (link.clone(), tracker.clone(), metrics.clone(), stalls.clone(), poisoned.clone(), offsets.clone(), txn.clone());
        move || -> Result<Arc<WorkerConsumer>> {
            let context = ConsumeContext::new(LinkContext::new(link.clone()), tracker.clone(), metrics.clone(), stalls.clone(), poisoned.clone(), refresh_limits.clone(), revocations.clone());
            let consumer: Arc<WorkerConsumer> = Arc::new(cc.create_with_context(context).context("creating the Kafka consumer")?);
            if let Some(t) = &txn {
                let _ = consumer.context().txn.set(t.clone());
            }
            offsets.attach(Some(consumer.clone() as Arc<dyn PartitionControl>));
            let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
            consumer.subscribe(&topics).context("subscribing")?;
            Ok(consumer)
        }
    };
    let consumer = make_consumer()?;
    let topics = &cfg.consumer.topics;
    // Large-image jobs: which are over, so their queued tiles are skipped.
    let jobs = if cfg.tiles.enabled {
        let watch = Arc::new(crate::jobs_watch::JobsWatch::default());
        watch.spawn(&v.kafka, &cfg.tiles.jobs_topic, &id, shutdown.clone()).context("starting the jobs reader")?;
        Some(watch)
    } else {
        None
    };
    tracing::info!(worker = id, group = cfg.consumer.group_id, topics = ?topics, tiles = cfg.tiles.enabled.then_some(cfg.tiles.topic.as_str()), pipeline = %cfg.worker.pipeline, delivery = cfg.worker.delivery.as_str(), kafka = v.kafka.describe(), "Worker running.");

    // systemd (Type=notify): ready once subscribed; the watchdog is fed while the poll loop runs.
    let heartbeat = Arc::new(framelink_common::systemd::Heartbeat::default());
    heartbeat.beat();
    framelink_common::systemd::ready();
    framelink_common::systemd::spawn_watchdog(heartbeat.clone(), shutdown.clone(), "consumer poll");

    let beats = start_heartbeats(&v, &id, &metrics, &shutdown);
    let shared = Shared { producers: producers.clone(), offsets: offsets.clone(), metrics: metrics.clone(), txn: txn.clone(), refusals, poisoned: poisoned.clone(), publishing, gpu, inference, revocations: consumer.context().revocations.clone(), jobs };
    let pool = Pool::spawn(cfg, &shared)?;
    drop(shared);
    let poll = PollLoop {
        consumer,
        make_consumer: Box::new(make_consumer),
        pool,
        producers,
        make_producer: Box::new(make_producer),
        offsets,
        metrics,
        txn,
        poisoned,
        link,
        heartbeat,
        transaction_interval: Duration::from_millis(cfg.worker.transaction_ms),
        reset_to_end: cfg.consumer.auto_offset_reset == "latest",
    };
    let result = poll.run(&shutdown);
    limits_stop.store(true, Ordering::Relaxed);
    // Before the consumer closes (its last revocation pokes the refresher) and the process
    // exits: at most 0.5 s, or one DescribeConfigs call (10 s timeout) already under way.
    if let Some(t) = limits_thread {
        let _ = t.join();
    }
    // The poll loop may also end on a fatal error: the heartbeat thread stops either way.
    shutdown.trigger();
    if let Some(t) = beats {
        let _ = t.join();
    }
    result
}

/// The heartbeat thread (none with `heartbeat_s = 0`); a producer that cannot be made is
/// logged, never fatal — the frames matter more than the fleet view.
fn start_heartbeats(v: &Validated, id: &str, metrics: &Arc<Metrics>, shutdown: &Shutdown) -> Option<std::thread::JoinHandle<()>> {
    let cfg = &v.config;
    let interval = cfg.heartbeat.interval()?;
    let client = v.kafka.client_config(&format!("framelink-worker-{id}-heartbeat"));
    let started = framelink_common::heartbeat::Beater::new(client, &cfg.heartbeat, metrics.beats.clone()).and_then(|b| {
        let mut beats = crate::beat::WorkerBeats::new(id, cfg.heartbeat.heartbeat_s, metrics.clone());
        b.spawn(interval, shutdown.clone(), move || beats.make()).map_err(|e| rdkafka::error::KafkaError::ClientCreation(e.to_string()))
    });
    match started {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::error!(error = %e, "Cannot start heartbeats; framelink-console will show this worker as offline.");
            None
        }
    }
}
