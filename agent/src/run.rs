//! `framelink-agent run`: wires the stages together and runs until SIGTERM / SIGINT.
//!
//! Start-up never needs the network: a broker that cannot be reached is normal at the edge
//! (frames go to the spool). Under systemd (Type=notify) the agent reports READY once capture
//! runs, and pings the watchdog only while the forwarder loop is alive.
//!
//! Shutdown: cameras stop, encoders finish their queues, the forwarder waits up to
//! `device.shutdown_grace_s` for acknowledgements and spools whatever is left, the spool is
//! flushed, and each camera's next sequence number is recorded.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use framelink_common::shutdown::Shutdown;

use crate::config::Validated;
use crate::forwarder::Forwarder;
use crate::metrics::Metrics;
use crate::sequence::SequenceStore;
use crate::spool::Spool;
use crate::spool::sled_spool::SledSpool;

pub fn run(v: Validated) -> Result<()> {
    let cfg = v.config;
    if !cfg.device.huge_pages
        && let Err(e) = crate::huge_pages::disable()
    {
        tracing::warn!(error = %e, "could not turn transparent huge pages off for the agent (device.huge_pages); it may use more memory");
    }
    let shutdown = Shutdown::on_signals().context("installing signal handlers")?;

    let spool: Arc<dyn Spool> = Arc::new(SledSpool::open(cfg.spool.clone())?);
    let seqs = Arc::new(SequenceStore::open(&cfg.spool.dir.join("sequence"))?);
    let metrics = Metrics::new(cfg.spool.max_bytes.as_u64());
    if let Some(addr) = cfg.http.addr()? {
        let bound = crate::http::spawn(addr, metrics.clone())?;
        tracing::info!(%bound, "Serving /metrics and /healthz.");
    }
    let forwarder = Forwarder::new(
        cfg.forwarder.clone(),
        &v.kafka,
        spool.clone(),
        metrics.clone(),
        Duration::from_millis(cfg.spool.flush_interval_ms),
    )?;
    tracing::info!(device = cfg.device.id, kafka = v.kafka.describe(), topic = cfg.forwarder.topic, spool = %cfg.spool.dir.display(), "Agent starting.");

    let (tx, frames) = crossbeam_channel::bounded(64);
    let beats = start_heartbeats(&cfg, &v.kafka, &metrics, &shutdown);
    let threads = crate::capture::start(&cfg.device.id, &cfg.cameras, &cfg.spool.dir, &cfg.encoder, seqs.clone(), metrics.clone(), shutdown.clone(), tx)?;
    systemd_ready(&metrics, &shutdown);

    let result = forwarder.run(frames, &shutdown, Duration::from_secs(cfg.device.shutdown_grace_s));
    shutdown.trigger();
    for t in threads.into_iter().chain(beats) {
        let _ = t.join();
    }
    if let Err(e) = seqs.close() {
        // The next start then resumes above the reserved bound (a gap, never a reuse).
        tracing::warn!(error = %e, "Cannot record the exact next sequence numbers; the next start skips to the reserved bound.");
    }
    framelink_common::systemd::stopping();
    tracing::info!(
        captured = metrics.total("frames_captured"),
        sent = metrics.total("frames_sent"),
        spooled = metrics.total("frames_spooled"),
        dropped = metrics.total("frames_dropped"),
        in_spool = spool.stats().records,
        "Agent stopped."
    );
    result
}

/// The heartbeat thread (none with `heartbeat_s = 0`); a producer that cannot be made is
/// logged, never fatal — the frames matter more than the fleet view.
fn start_heartbeats(cfg: &crate::config::AgentConfig, kafka: &framelink_common::KafkaSettings, metrics: &Arc<Metrics>, shutdown: &Shutdown) -> Option<std::thread::JoinHandle<()>> {
    let interval = cfg.heartbeat.interval()?;
    let client = kafka.client_config(&format!("framelink-agent-{}-heartbeat", cfg.device.id));
    let started = framelink_common::heartbeat::Beater::new(client, &cfg.heartbeat, metrics.beats.clone()).and_then(|b| {
        let cameras = cfg.cameras.iter().map(|c| c.id.clone()).collect();
        let mut beats = crate::beat::AgentBeats::new(&cfg.device.id, cameras, cfg.heartbeat.heartbeat_s, metrics.clone());
        b.spawn(interval, shutdown.clone(), move || beats.make()).map_err(|e| rdkafka::error::KafkaError::ClientCreation(e.to_string()))
    });
    match started {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::error!(error = %e, "Cannot start heartbeats; framelink-console will show this device as offline.");
            None
        }
    }
}

/// Tells systemd we are ready and, if a watchdog is configured, pings it while the
/// forwarder's heartbeat is fresh (a hung forwarder gets the agent restarted).
fn systemd_ready(metrics: &Arc<Metrics>, shutdown: &Shutdown) {
    framelink_common::systemd::ready();
    framelink_common::systemd::spawn_watchdog(metrics.heartbeat.clone(), shutdown.clone(), "forwarder");
}
