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

use std::sync::Mutex;
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
}

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = Box<Instant>;
    fn delivery(&self, result: &DeliveryResult<'_>, sent: Box<Instant>) {
        match result {
            Ok(_) => self.latencies_us.lock().unwrap().push(sent.elapsed().as_micros() as u64),
            Err(_) => *self.failed.lock().unwrap() += 1,
        }
    }
}

impl Acks {
    fn take(&self) -> (Vec<u64>, u64) {
        (std::mem::take(&mut *self.latencies_us.lock().unwrap()), *self.failed.lock().unwrap())
    }
}

type Record<'a> = BaseRecord<'a, String, Vec<u8>, Box<Instant>>;

/// Sends `count` records cycling over `payloads`; `after_send` runs after each (inline polling).
fn produce_all<'a>(
    topic: &'a str,
    count: usize,
    payloads: &'a [Vec<u8>],
    keys: &'a [String],
    mut send: impl FnMut(Record<'a>) -> Result<(), (KafkaError, Record<'a>)>,
    mut after_send: impl FnMut(),
) -> Result<u64> {
    let mut bytes = 0u64;
    for i in 0..count {
        let payload = &payloads[i % payloads.len()];
        let mut record = BaseRecord::with_opaque_to(topic, Box::new(Instant::now())).key(&keys[i % keys.len()]).payload(payload);
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
    while let Some(a) = args.next() {
        match a.as_str() {
            "--brokers" => brokers = args.next(),
            "--topic" => topic = args.next(),
            "--count" => count = args.next().context("--count N")?.parse()?,
            "--set" => sets.push(args.next().context("--set key=value")?),
            "--inline-poll" => inline = true,
            f => files.push(f.to_owned()),
        }
    }
    let (Some(brokers), Some(topic)) = (brokers, topic) else { bail!("--brokers and --topic are required") };
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
    let (started, bytes, (lat, failed)) = if inline {
        let producer: BaseProducer<Acks> = cfg.create_with_context(Acks::default())?;
        let started = Instant::now();
        let bytes = produce_all(&topic, count, &payloads, &keys, |r| producer.send(r), || {
            producer.poll(Duration::ZERO);
        })?;
        producer.flush(Duration::from_secs(120))?;
        (started, bytes, producer.context().take())
    } else {
        let producer: ThreadedProducer<Acks> = cfg.create_with_context(Acks::default())?;
        let started = Instant::now();
        let bytes = produce_all(&topic, count, &payloads, &keys, |r| producer.send(r), || {})?;
        producer.flush(Duration::from_secs(120))?;
        (started, bytes, producer.context().take())
    };
    let mut lat = lat;
    let secs = started.elapsed().as_secs_f64();
    lat.sort_unstable();
    println!(
        "{}",
        serde_json::json!({
            "impl": if inline { "framelink (rdkafka, inline poll)" } else { "framelink (rdkafka)" },
            "records": count, "acknowledged": lat.len(), "failed": failed, "bytes": bytes,
            "seconds": secs, "records_per_s": lat.len() as f64 / secs, "mb_per_s": bytes as f64 / secs / 1e6,
            "p50_ms": percentile(&lat, 0.5), "p99_ms": percentile(&lat, 0.99),
        })
    );
    if failed > 0 || lat.len() != count {
        bail!("{failed} of {count} records failed");
    }
    Ok(())
}
