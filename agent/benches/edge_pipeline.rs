//! Edge pipeline benchmark: the agent's frames/s from source to Kafka acknowledgement, next
//! to raw libjpeg-turbo encode frames/s measured in the same run, and the agent's peak RSS.
//!
//! Frames: the photographs in testdata/images, resized to 1920x1080 RGB and kept in
//! memory (so the source costs nothing), offered by one camera at up to 1000 fps (what the
//! encoder cannot take is dropped at the source and counted, as with a real camera). The agent
//! part runs the same pipeline, forwarder and spool code as `framelink-agent run`, against
//! the local broker's mTLS listener (started if needed), in a child process so its peak RSS
//! is its own. Run: `cargo bench -p framelink-agent --bench edge_pipeline` (release build).
//! Absolute numbers drift on a shared machine; the ratio is the headline.
//!
//! Then, as a camera delivers them, the same photographs as YUYV (packed 4:2:2) and NV12
//! (semi-planar 4:2:0) buffers, BT.601 studio range: the agent on **one core** (`taskset -c
//! 0`: its capture, encoder, forwarder and librdkafka threads share it), PLAINTEXT, the camera offering 1000 frames/s.
//! With `FRAMELINK_BENCH_DUMP=DIR` those buffers are also written to DIR (`frame-N.yuyv`,
//! `frame-N.nv12`), so bench/edge.py can run Pillow + confluent-kafka on the very same bytes
//! on the same core (issue #19 item 3).

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

mod support;
use support::{photos as frames, to_nv12, to_yuyv};

const W: u32 = support::W as u32;
const H: u32 = support::H as u32;

/// The frames in the camera layout `format` (`rgb`, `yuyv`, `nv12`): (format, stride, buffers).
fn frames_as(format: &str) -> (PixelFormat, usize, &'static str, Vec<Bytes>) {
    let rgb = frames();
    match format {
        "yuyv" => (PixelFormat::Yuyv, W as usize * 2, "YUYV", rgb.iter().map(|f| to_yuyv(f)).collect()),
        "nv12" => (PixelFormat::Nv12, W as usize, "NV12", rgb.iter().map(|f| to_nv12(f)).collect()),
        _ => (PixelFormat::Rgb24, W as usize * 3, "RGB24", rgb),
    }
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
    format: PixelFormat,
    stride: usize,
    name: &'static str,
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
        Ok(Captured { capture_ns: now_ns(), width: W, height: H, stride: self.stride, format: self.format, source_format: self.name, data: self.frames[self.i % self.frames.len()].clone(), clock: Default::default() })
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

/// The agent phase (child process): prints `sent_fps drops hwm_kib spooled_bytes`. Frames in
/// `FRAMELINK_BENCH_FORMAT` (default rgb), over mTLS unless `FRAMELINK_BENCH_PLAINTEXT` is set.
fn agent_phase() {
    let (format, stride, name, frames) = frames_as(&std::env::var("FRAMELINK_BENCH_FORMAT").unwrap_or_default());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let broker = framelink_testkit::Broker::shared();
    let topic = framelink_testkit::rand_topic("bench-edge");
    rt.block_on(broker.create_topic(&topic, 1)).unwrap();
    let kafka = if std::env::var_os("FRAMELINK_BENCH_PLAINTEXT").is_some() { broker.plaintext() } else { broker.mtls() }.validate("kafka").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spool_cfg = SpoolConfig { dir: dir.path().join("spool"), ..SpoolConfig::default() };
    let spool: Arc<dyn Spool> = Arc::new(SledSpool::open(spool_cfg).unwrap());
    let seqs = Arc::new(SequenceStore::open(&dir.path().join("seq")).unwrap());
    let metrics = Metrics::new(1 << 30);
    let fwd_cfg = ForwarderConfig { topic: topic.clone(), max_message_bytes: bytesize::ByteSize::mib(4), ..ForwarderConfig::default() };
    let forwarder = Forwarder::new(fwd_cfg, &kafka, spool, metrics.clone(), Duration::from_millis(200)).unwrap();
    let shutdown = Shutdown::new();
    let (tx, rx) = crossbeam_channel::bounded(64);
    let source: Box<dyn Source> = Box::new(Memory { frames, format, stride, name, i: 0, pacer: Pacer::new(1000.0) });
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
    let v = run_phase(Command::new(std::env::current_exe().unwrap()));
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
    println!();
    // As a camera delivers them, one core.
    let dump = std::env::var_os("FRAMELINK_BENCH_DUMP").map(PathBuf::from);
    println!("| camera buffers, agent on one core (taskset -c 0), PLAINTEXT | frames/s |");
    println!("| --- | ---: |");
    for format in ["yuyv", "nv12"] {
        if let Some(dir) = &dump {
            std::fs::create_dir_all(dir).unwrap();
            for (i, f) in frames_as(format).3.iter().enumerate() {
                std::fs::write(dir.join(format!("frame-{i}.{format}")), f).unwrap();
            }
        }
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", "0"]).arg(std::env::current_exe().unwrap()).env("FRAMELINK_BENCH_FORMAT", format).env("FRAMELINK_BENCH_PLAINTEXT", "1");
        let v = run_phase(cmd);
        println!("| agent one core {format} | {:.1} |", v[0]);
    }
}

/// Runs the agent phase in a child (`cmd` runs this executable) and returns its four figures.
fn run_phase(mut cmd: Command) -> Vec<f64> {
    let out = cmd.env("FRAMELINK_BENCH_PHASE", "agent").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    let v: Vec<f64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    assert!(v.len() == 4, "agent phase failed: {}\n{}", text, String::from_utf8_lossy(&out.stderr));
    v
}
