//! `framelink-worker tail`: watch what the fleet produces. Reads the results and events topics
//! of a worker config (its own throw-away consumer group, nothing committed, committed
//! transactions only), prints one line per record with its latency, and optionally writes the
//! result JPEGs to a folder as `DIR/<device>/<camera>/<seq>.jpg`.
//!
//! Two latencies are shown: `processed` (capture → the worker finished, from the
//! `framelink-latency-ms` header) and `seen` (capture → this reader got it, from the
//! `framelink-capture-ns` header and this machine's clock).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use framelink_common::link::LinkContext;
use framelink_common::shutdown::Shutdown;
use framelink_common::wire::{FrameMeta, result_header};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers};

use framelink_worker::config::Validated;

pub struct TailOptions {
    /// Write result JPEGs under this folder.
    pub out: Option<PathBuf>,
    /// Stop after this long (None: until SIGINT/SIGTERM).
    pub duration: Option<Duration>,
    /// Stop after this many results.
    pub count: Option<u64>,
    /// Print every n-th result and every n-th event.
    pub print_every: u64,
    /// Read from the start of the topics instead of only new records.
    pub from_beginning: bool,
}

/// What a tail run saw.
#[derive(Debug, Default)]
pub struct TailSummary {
    pub results: u64,
    pub events: u64,
    pub written: u64,
    /// Capture → worker finished, ms, per result.
    pub processed_ms: Vec<u64>,
    /// Capture → seen here, ms, per result.
    pub seen_ms: Vec<u64>,
}

impl TailSummary {
    pub fn describe(&self) -> String {
        let pct = |v: &[u64], p: f64| -> String {
            if v.is_empty() {
                return "-".into();
            }
            let mut s = v.to_vec();
            s.sort_unstable();
            s[((s.len() - 1) as f64 * p).round() as usize].to_string()
        };
        format!(
            "{} results ({} written), {} events; latency capture->processed p50 {} ms p99 {} ms, capture->seen p50 {} ms p99 {} ms",
            self.results,
            self.written,
            self.events,
            pct(&self.processed_ms, 0.5),
            pct(&self.processed_ms, 0.99),
            pct(&self.seen_ms, 0.5),
            pct(&self.seen_ms, 0.99)
        )
    }
}

fn header<'a>(m: &'a BorrowedMessage<'_>, name: &str) -> Option<&'a str> {
    m.headers()?.iter().find(|h| h.key == name).and_then(|h| std::str::from_utf8(h.value?).ok())
}

pub fn run(v: &Validated, opts: &TailOptions, stop: Shutdown) -> Result<TailSummary> {
    let out = &v.config.output;
    let mut cc = v.kafka.client_config("framelink-tail");
    cc.set("group.id", format!("framelink-tail-{}-{}", std::process::id(), framelink_worker::metrics::now_ns()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", if opts.from_beginning { "earliest" } else { "latest" })
        .set("fetch.max.bytes", "52428800")
        .set("max.partition.fetch.bytes", "16777216");
    let consumer: BaseConsumer<LinkContext> = cc.create_with_context(LinkContext::default()).context("creating the Kafka consumer")?;
    consumer.subscribe(&[&out.results_topic, &out.events_topic]).context("subscribing")?;
    eprintln!("tail: reading {} and {} ({})", out.results_topic, out.events_topic, v.kafka.describe());
    let started = Instant::now();
    let mut s = TailSummary::default();
    while !stop.is_set() && opts.duration.is_none_or(|d| started.elapsed() < d) && opts.count.is_none_or(|c| s.results < c) {
        let m = match consumer.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Err(e)) => {
                eprintln!("tail: {e}");
                continue;
            }
            Some(Ok(m)) => m,
        };
        let payload = m.payload().unwrap_or_default();
        if m.topic() == out.events_topic {
            s.events += 1;
            if (s.events - 1) % opts.print_every.max(1) == 0 {
                println!("event   {}", String::from_utf8_lossy(payload));
            }
            continue;
        }
        s.results += 1;
        let Some(meta) = m.headers().and_then(|h| FrameMeta::from_kafka_headers(h).ok()) else {
            println!("result  (no framelink headers) {} bytes at {}/{}/{}", payload.len(), m.topic(), m.partition(), m.offset());
            continue;
        };
        let processed: Option<u64> = header(&m, result_header::LATENCY_MS).and_then(|x| x.parse().ok());
        let seen = framelink_worker::metrics::now_ns().saturating_sub(meta.capture_ns) / 1_000_000;
        if let Some(p) = processed {
            s.processed_ms.push(p);
        }
        s.seen_ms.push(seen);
        let mut path = String::new();
        if let Some(dir) = &opts.out {
            let d = dir.join(&meta.device_id).join(&meta.camera_id);
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            let f = d.join(format!("{:08}.jpg", meta.seq));
            std::fs::write(&f, payload).with_context(|| format!("writing {}", f.display()))?;
            s.written += 1;
            path = format!("  -> {}", f.display());
        }
        if (s.results - 1) % opts.print_every.max(1) == 0 {
            println!(
                "result  {}/{} seq {:>6} {}x{} {:>7} B  processed +{} ms  seen +{seen} ms  by {} [{}]{path}",
                meta.device_id,
                meta.camera_id,
                meta.seq,
                meta.width,
                meta.height,
                payload.len(),
                processed.map_or("?".into(), |p| p.to_string()),
                header(&m, result_header::WORKER).unwrap_or("?"),
                header(&m, result_header::PIPELINE).unwrap_or(""),
            );
        }
    }
    consumer.unsubscribe();
    Ok(s)
}
