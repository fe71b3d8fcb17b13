//! Producer throughput and delivery latency with librdkafka through rdkafka — the client the
//! agent's forwarder uses — for one set of producer settings. Driven by `bench/suite.py`, which
//! runs the same settings with Python confluent-kafka and kcat.
//!
//! `framelink-bench-producer --brokers B --topic T --count N [--set key=value ...] FILE...`
//! sends N records cycling over the files (as fast as the client accepts them), waits for every
//! acknowledgement and prints one JSON line: records/s, MB/s, p50/p99 delivery latency (send →
//! acknowledgement), all measured in this process.
//!
//! `--inline-poll` uses a `BaseProducer` polled after every send (as the Python client is
//! driven) instead of a `ThreadedProducer` whose own thread serves delivery reports.
//!
//! `--window-bytes N` keeps at most N payload bytes unacknowledged (the first record goes
//! whatever its size), as the agent's drain does (`forwarder.drain_window_bytes`): an
//! idempotent librdkafka producer carries 5 requests at a time, and records queued behind them
//! make its broker thread poll without sleeping until one completes.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;

#[derive(Default)]
struct Acks {
    latencies_us: Mutex<Vec<u64>>,
    failed: Mutex<u64>,
    /// Payload bytes sent and not yet reported, and its change.
    in_flight: Mutex<u64>,
    reported: Condvar,
    /// When the first and the last delivery report came.
    first_last: Mutex<Option<(Instant, Instant)>>,
}

impl ClientContext for Acks {}

/// When a record was sent, and its payload size.
type Sent = Box<(Instant, u64)>;

impl ProducerContext for Acks {
    type DeliveryOpaque = Sent;
    fn delivery(&self, result: &DeliveryResult<'_>, sent: Sent) {
        match result {
            Ok(_) => self.latencies_us.lock().unwrap().push(sent.0.elapsed().as_micros() as u64),
            Err(_) => *self.failed.lock().unwrap() += 1,
        }
        let now = Instant::now();
        let mut fl = self.first_last.lock().unwrap();
        *fl = Some((fl.map_or(now, |(first, _)| first), now));
        drop(fl);
        *self.in_flight.lock().unwrap() -= sent.1;
        self.reported.notify_all();
    }
}

impl Acks {
    fn take(&self) -> (Vec<u64>, u64, Option<(Instant, Instant)>) {
        (std::mem::take(&mut *self.latencies_us.lock().unwrap()), *self.failed.lock().unwrap(), *self.first_last.lock().unwrap())
    }
}

type Record<'a> = BaseRecord<'a, String, Vec<u8>, Sent>;

/// Sends `count` records cycling over `payloads`; `after_send` runs after each (inline
/// polling); `wait_room(bytes)` returns once `bytes` more may be in flight.
#[allow(clippy::too_many_arguments)]
fn produce_all<'a>(
    topic: &'a str,
    count: usize,
    payloads: &'a [Vec<u8>],
    keys: &'a [String],
    acks: &Acks,
    mut send: impl FnMut(Record<'a>) -> Result<(), (KafkaError, Record<'a>)>,
    mut after_send: impl FnMut(),
    mut wait_room: impl FnMut(u64),
) -> Result<u64> {
    let mut bytes = 0u64;
    for i in 0..count {
        let payload = &payloads[i % payloads.len()];
        let size = payload.len() as u64;
        wait_room(size);
        *acks.in_flight.lock().unwrap() += size;
        let mut record = BaseRecord::with_opaque_to(topic, Box::new((Instant::now(), size))).key(&keys[i % keys.len()]).payload(payload);
        loop {
            match send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    after_send();
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => bail!("producing: {e}"),
            }
        }
        after_send();
        bytes += payload.len() as u64;
    }
    Ok(bytes)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut brokers, mut topic, mut count, mut sets, mut files, mut inline) = (None, None, 100usize, Vec::new(), Vec::new(), false);
    let mut window = u64::MAX;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--brokers" => brokers = args.next(),
            "--topic" => topic = args.next(),
            "--count" => count = args.next().context("--count N")?.parse()?,
            "--set" => sets.push(args.next().context("--set key=value")?),
            "--inline-poll" => inline = true,
            "--window-bytes" => window = args.next().context("--window-bytes N")?.parse()?,
            f => files.push(f.to_owned()),
        }
    }
    let (Some(brokers), Some(topic)) = (brokers, topic) else { bail!("--brokers and --topic are required") };
    if inline && window < u64::MAX {
        bail!("--window-bytes goes with the ThreadedProducer (as the agent drives it), not --inline-poll");
    }
    if files.is_empty() {
        bail!("give at least one payload file");
    }
    let payloads: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).with_context(|| f.clone())).collect::<Result<_>>()?;
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &brokers).set("acks", "all").set("enable.idempotence", "true").set("message.max.bytes", "16777216");
    for s in &sets {
        let (k, v) = s.split_once('=').with_context(|| format!("--set {s}: not key=value"))?;
        cfg.set(k, v);
    }
    let keys: Vec<String> = (0..4).map(|c| format!("bench/cam{c}")).collect();
    // Each branch stops the clock once every record is acknowledged, before the producer is
    // dropped (joining a ThreadedProducer's thread waits out its 100 ms poll).
    let (started, secs, bytes, (lat, failed, first_last)) = if inline {
        let producer: BaseProducer<Acks> = cfg.create_with_context(Acks::default())?;
        let started = Instant::now();
        let bytes = produce_all(&topic, count, &payloads, &keys, producer.context(), |r| producer.send(r), || {
            producer.poll(Duration::ZERO);
        }, |_| {})?;
        // Not `producer.flush`: BaseProducer::poll runs to its deadline, so flush returns on
        // 100 ms steps.
        let deadline = Instant::now() + Duration::from_secs(120);
        while producer.in_flight_count() > 0 && Instant::now() < deadline {
            producer.poll(Duration::from_millis(1));
        }
        let secs = started.elapsed().as_secs_f64();
        (started, secs, bytes, producer.context().take())
    } else {
        let producer: ThreadedProducer<Acks> = cfg.create_with_context(Acks::default())?;
        let started = Instant::now();
        let acks = producer.context();
        let bytes = produce_all(&topic, count, &payloads, &keys, acks, |r| producer.send(r), || {}, |size| {
            let mut f = acks.in_flight.lock().unwrap();
            while *f != 0 && *f + size > window {
                f = acks.reported.wait(f).unwrap();
            }
        })?;
        // Not `producer.flush`: it returns on 100 ms steps here (see framelink_common::flush).
        framelink_common::flush::flush(&producer, Duration::from_secs(120))?;
        let secs = started.elapsed().as_secs_f64();
        (started, secs, bytes, producer.context().take())
    };
    let mut lat = lat;
    let since_start = |t: Instant| t.duration_since(started).as_secs_f64();
    lat.sort_unstable();
    println!(
        "{}",
        serde_json::json!({
            "impl": match (inline, window < u64::MAX) {
                (true, _) => "framelink (rdkafka, inline poll)".to_owned(),
                (false, false) => "framelink (rdkafka)".to_owned(),
                (false, true) => format!("framelink (rdkafka, {} KiB in-flight window)", window / 1024),
            },
            "records": count, "acknowledged": lat.len(), "failed": failed, "bytes": bytes,
            "seconds": secs, "records_per_s": lat.len() as f64 / secs, "mb_per_s": bytes as f64 / secs / 1e6,
            "p50_ms": percentile(&lat, 0.5), "p99_ms": percentile(&lat, 0.99),
            "first_ack_s": first_last.map(|(f, _)| since_start(f)), "last_ack_s": first_last.map(|(_, l)| since_start(l)),
        })
    );
    if failed > 0 || lat.len() != count {
        bail!("{failed} of {count} records failed");
    }
    Ok(())
}
