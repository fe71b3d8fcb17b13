//! framelink-console as a library: the fleet state, the Kafka readers and the web side, so the
//! tests and the load bench drive them directly.
//!
//! ```text
//! framelink.heartbeats ─┐
//! frames.processed ─────┼─► ingest (one thread) ─► Fleet (in memory) ─► web: page, /api, SSE
//! frames.events, dlq ───┘                               ▲
//! workers' group offsets ─► lag sampler (one thread) ───┘
//! ```

pub mod config;
pub mod ingest;
pub mod jobs;
pub mod lag;
pub mod metrics;
pub mod state;
pub mod thumbs;
pub mod web;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use framelink_common::link::LinkStatus;
use framelink_common::shutdown::Shutdown;

use crate::config::Validated;
use crate::state::{Fleet, Rules};

/// Runs the console until `shutdown`; `bound` receives the address the web side listens on.
pub fn run(v: Validated, shutdown: Shutdown, bound: impl FnOnce(std::net::SocketAddr)) -> Result<()> {
    let cfg = &v.config;
    let fleet = Arc::new(Mutex::new(Fleet::new(Rules::from_config(cfg))));
    let link = Arc::new(LinkStatus::default());
    let ingest = ingest::Ingest::new(&v.kafka, &cfg.topics, fleet.clone(), link.clone()).context("creating the Kafka consumer")?;
    let mut threads = vec![];
    // A reader that fails ends the console (systemd / Kubernetes restart it): a dashboard
    // frozen on stale data while /healthz says ok would be worse than none.
    let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let guarded = |name: &'static str, body: Box<dyn FnOnce() + Send>| {
        let (s, failed) = (shutdown.clone(), failed.clone());
        std::thread::Builder::new().name(name.into()).spawn(move || {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).is_err() {
                tracing::error!(thread = name, "The console's Kafka reader failed; stopping.");
                failed.store(true, std::sync::atomic::Ordering::SeqCst);
                s.trigger();
            }
        })
    };
    {
        let s = shutdown.clone();
        threads.push(guarded("ingest", Box::new(move || ingest.run(s)))?);
    }
    let metrics = Arc::new(metrics::ConsoleMetrics::new());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("web").enable_all().build()?;
    let jobs_api = if cfg.jobs.enabled {
        let kafka = Arc::new(jobs::kafka::JobsKafka::new(&v.kafka, &cfg.jobs, link.clone()).context("creating the jobs' Kafka producer")?);
        let state = Arc::new(Mutex::new(jobs::state::Jobs::new(metrics.job_counters.clone())));
        let (k, j, s, h) = (kafka.clone(), state.clone(), shutdown.clone(), rt.handle().clone());
        threads.push(guarded("jobs", Box::new(move || jobs::run_reader(k, j, s, h)))?);
        Some(jobs::api::JobsApi::new(state, kafka))
    } else {
        None
    };
    if !cfg.lag.group.is_empty() {
        let sampler = lag::LagSampler::new(&v.kafka, &cfg.lag, fleet.clone()).context("creating the lag reader")?;
        let s = shutdown.clone();
        threads.push(guarded("lag", Box::new(move || sampler.run(s)))?);
    }
    let app = web::App {
        fleet: fleet.clone(),
        thumbs: Arc::default(),
        metrics,
        token: v.token.as_deref().map(Arc::from),
        link,
        push_interval: Duration::from_millis(cfg.console.push_interval_ms),
        thumbnail_width: cfg.console.thumbnail_width,
        started: Instant::now(),
        tls: cfg.console.tls_certificate.is_some(),
        shutdown: shutdown.clone(),
        jobs: jobs_api.clone(),
    };
    let result = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(v.addr).await.with_context(|| format!("binding {} (console.listen)", v.addr))?;
        let addr = listener.local_addr()?;
        // TLS files are read before anything says the console is up.
        let tls = match (&cfg.console.tls_certificate, &cfg.console.tls_key) {
            (Some(cert), Some(key)) => Some(tls::server_config(cert, key)?),
            _ => None,
        };
        bound(addr);
        // systemd (Type=notify): ready once the page can be served.
        framelink_common::systemd::ready();
        // Statuses move with time: one ticker for all pages.
        let (f, t, s) = (fleet.clone(), app.thumbs.clone(), shutdown.clone());
        let push = app.push_interval;
        tokio::spawn(async move {
            let mut every = tokio::time::interval(push);
            while !s.is_set() {
                every.tick().await;
                let fleet = &mut f.lock().expect("fleet lock");
                fleet.tick(framelink_common::heartbeat::now_ms());
                t.retain(|d, c| fleet.latest(d, c).is_some());
            }
        });
        // Jobs expire `expire_after_s` after they were created: memory freed, a tombstone
        // written (workers skip what is left of their tiles).
        if let Some(api) = jobs_api.clone() {
            let s = shutdown.clone();
            tokio::spawn(async move {
                let after_ms = api.kafka.cfg.expire_after_s * 1000;
                let mut every = tokio::time::interval(Duration::from_secs(10));
                while !s.is_set() {
                    every.tick().await;
                    let expired = api.jobs.lock().expect("jobs lock").expire(framelink_common::heartbeat::now_ms(), after_ms);
                    for id in expired {
                        tracing::info!(job = id, "Job expired.");
                        jobs::api::write_logged(&api.kafka, &api.jobs, &id).await;
                    }
                }
            });
        }
        let router = web::router(app);
        let stop = shutdown.clone();
        let stopped = async move {
            while !stop.is_set() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        match tls {
            Some(config) => axum::serve(tls::Listener::new(listener, config), router).with_graceful_shutdown(stopped).await?,
            None => axum::serve(listener, router).with_graceful_shutdown(stopped).await?,
        }
        anyhow::Ok(())
    });
    shutdown.trigger();
    framelink_common::systemd::stopping();
    for t in threads {
        let _ = t.join();
    }
    rt.shutdown_timeout(Duration::from_secs(2));
    if failed.load(std::sync::atomic::Ordering::SeqCst) {
        anyhow::bail!("a Kafka reader of the console failed (see the log above)");
    }
    result
}

pub mod tls;
