//! Edge pipeline benchmark: the agent's frames/s from source to Kafka acknowledgement, next
//! to raw libjpeg-turbo encode frames/s measured in the same run, and the agent's peak RSS.
//!
//! Frames: the photographs in testdata/images, resized to 1920x1080 RGB and kept in
//! memory (so the source costs nothing), replayed by one camera at up to 240 fps. The agent
//! part runs the same pipeline, forwarder and spool code as `framelink-agent run`, against
//! the local broker's mTLS listener (started if needed), in a child process so its peak RSS
//! is its own. Run: `cargo bench -p framelink-agent --bench edge_pipeline` (release build).
//! Absolute numbers drift on a shared machine; the ratio is the headline.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use framelink_agent::encoder::{Encoder, EncoderConfig};
use framelink_agent::forwarder::{Forwarder, ForwarderConfig};
use framelink_agent::frame::{PixelFormat, now_ns};
use framelink_agent::metrics::Metrics;
use framelink_agent::sequence::SequenceStore;
use framelink_agent::source::{Captured, Pacer, Source, SourceError};
use framelink_agent::spool::sled_spool::SledSpool;
use framelink_agent::spool::{Spool, SpoolConfig};
use framelink_common::shutdown::Shutdown;

const W: u32 = 1920;
const H: u32 = 1080;

fn frames() -> Vec<Bytes> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/images");
    let mut paths: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "png" || e == "jpg")).collect();
    paths.sort();
    paths
        .iter()
        .map(|p| {
            let img = if p.extension().is_some_and(|e| e == "jpg") {
                let d = turbojpeg::decompress(&std::fs::read(p).unwrap(), turbojpeg::PixelFormat::RGB).unwrap();
                image::RgbImage::from_raw(d.width as u32, d.height as u32, d.pixels).unwrap()
            } else {
                image::open(p).unwrap().into_rgb8()
            };
            Bytes::from(image::imageops::resize(&img, W, H, image::imageops::FilterType::Triangle).into_raw())
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Raw encode: one thread, default encoder settings (quality 80, 4:2:0), 5 rounds.
fn raw_encode(frames: &[Bytes]) -> (f64, f64) {
    let mut enc = Encoder::new(EncoderConfig::default()).unwrap();
    let mut rates = Vec::new();
    let mut bytes = 0usize;
    let mut n = 0usize;
    for _ in 0..5 {
        let start = Instant::now();
        let mut count = 0;
        while start.elapsed() < Duration::from_secs(1) {
            let f = &frames[count % frames.len()];
            let raw = Captured { capture_ns: 0, width: W, height: H, stride: W as usize * 3, format: PixelFormat::Rgb24, source_format: "RGB24", data: f.clone(), clock: Default::default() };
            bytes += enc.encode(&raw).unwrap().jpeg.len();
            count += 1;
            n += 1;
        }
        rates.push(count as f64 / start.elapsed().as_secs_f64());
    }
    (median(rates), bytes as f64 / n as f64)
}

struct Memory {
    frames: Vec<Bytes>,
    i: usize,
    pacer: Pacer,
}

impl Source for Memory {
    fn open(&mut self) -> Result<(), SourceError> {
        Ok(())
    }
    fn next_frame(&mut self) -> Result<Captured, SourceError> {
        self.pacer.wait();
        self.i += 1;
        Ok(Captured { capture_ns: now_ns(), width: W, height: H, stride: W as usize * 3, format: PixelFormat::Rgb24, source_format: "RGB24", data: self.frames[self.i % self.frames.len()].clone(), clock: Default::default() })
    }
    fn describe(&self) -> String {
        "in-memory 1080p photos".into()
    }
}

fn counter(_m: &Metrics, family: &prometheus_client::metrics::family::Family<Vec<(&'static str, String)>, prometheus_client::metrics::counter::Counter>) -> u64 {
    family.get_or_create(&vec![("camera", "bench".to_string())]).get()
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:").and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok()))
        .unwrap_or(0)
}

/// The agent phase (child process): prints `sent_fps drops hwm_kib`.
fn agent_phase() {
    let frames = frames();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let broker = framelink_testkit::Broker::shared();
    let topic = framelink_testkit::rand_topic("bench-edge");
    rt.block_on(broker.create_topic(&topic, 1)).unwrap();
    let kafka = broker.mtls().validate("kafka").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spool_cfg = SpoolConfig { dir: dir.path().join("spool"), ..SpoolConfig::default() };
    let spool: Arc<dyn Spool> = Arc::new(SledSpool::open(spool_cfg).unwrap());
    let seqs = Arc::new(SequenceStore::open(&dir.path().join("seq")).unwrap());
    let metrics = Metrics::new(1 << 30);
    let fwd_cfg = ForwarderConfig { topic: topic.clone(), max_message_bytes: bytesize::ByteSize::mib(4), ..ForwarderConfig::default() };
    let forwarder = Forwarder::new(fwd_cfg, &kafka, spool, metrics.clone(), Duration::from_millis(200)).unwrap();
    let shutdown = Shutdown::new();
    let (tx, rx) = crossbeam_channel::bounded(64);
    let source: Box<dyn Source> = Box::new(Memory { frames, i: 0, pacer: Pacer::new(240.0) });
    let threads = framelink_agent::capture::start_with_sources("bench", vec![("bench".into(), source)], &EncoderConfig::default(), seqs, metrics.clone(), shutdown.clone(), tx).unwrap();
    let sd = shutdown.clone();
    let fwd = std::thread::spawn(move || forwarder.run(rx, &sd, Duration::from_secs(10)).unwrap());
    std::thread::sleep(Duration::from_secs(2)); // warm-up: connection, idempotent PID
    let (s0, t0) = (counter(&metrics, &metrics.sent), Instant::now());
    std::thread::sleep(Duration::from_secs(10));
    let (s1, dt) = (counter(&metrics, &metrics.sent), t0.elapsed().as_secs_f64());
    shutdown.trigger();
    for t in threads {
        t.join().unwrap();
    }
    fwd.join().unwrap();
    let written = metrics.spool_written_bytes.get();
    println!("{} {} {} {}", (s1 - s0) as f64 / dt, metrics.dropped.get_or_create(&vec![("camera", "bench".to_string()), ("reason", "encoder_behind".to_string())]).get(), vm_hwm_kib(), written);
}

fn main() {
    if std::env::var("FRAMELINK_BENCH_PHASE").as_deref() == Ok("agent") {
        agent_phase();
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` probing
    }
    let frames = frames();
    let (raw_fps, avg_jpeg) = raw_encode(&frames);
    let out = Command::new(std::env::current_exe().unwrap()).env("FRAMELINK_BENCH_PHASE", "agent").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    let v: Vec<f64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    assert!(v.len() == 4, "agent phase failed: {}\n{}", text, String::from_utf8_lossy(&out.stderr));
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default().lines().find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())).unwrap_or_default();
    println!("framelink edge pipeline, 1920x1080 RGB from testdata/images, JPEG q80 4:2:0 (avg {:.0} KB)", avg_jpeg / 1000.0);
    println!("machine: {cores} cores, {cpu}; libjpeg-turbo 3.1 (turbojpeg crate), librdkafka 2.12 (mTLS, acks=all, idempotent)");
    println!();
    println!("| measurement | frames/s |");
    println!("| --- | --- |");
    println!("| raw turbojpeg encode, 1 thread (median of 5 × 1 s) | {raw_fps:.1} |");
    println!("| agent: source → encode → Kafka ack, 1 camera (10 s) | {:.1} |", v[0]);
    println!("| ratio agent / raw encode | {:.2} |", v[0] / raw_fps);
    println!();
    println!("agent peak RSS: {:.1} MiB; frames dropped at the source (encoder busy): {}; frame bytes written to the spool: {}", v[2] / 1024.0, v[1], v[3]);
}
