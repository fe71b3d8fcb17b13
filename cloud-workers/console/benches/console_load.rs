//! `cargo bench -p framelink-console --bench console_load`: can one core keep up with a large
//! fleet? Simulates 250 devices × 4 cameras = 1 000 cameras: a heartbeat per device every 5 s,
//! a result per camera every second (real JPEG bytes, copied as the Kafka reader copies them),
//! the once-a-second status tick, the live stream's delta for one page, and thumbnails for the
//! 48 cameras a page shows, refreshed every 2 s. Prints, per simulated second, the CPU time
//! spent on one thread and its share of a core (< 100 % keeps up), and the stream's bytes.
//!
//! Not included: librdkafka's own fetch and decompression of those records (its threads).

use std::time::{Duration, Instant};

use bytes::Bytes;
use framelink_common::heartbeat::{AgentBeat, CameraBeat, Heartbeat, ProcessBeat, SpoolBeat};
use framelink_console::state::{Fleet, ResultMeta, Rules};
use framelink_console::thumbs;

const DEVICES: usize = 250;
const CAMERAS: usize = 4;
const SECONDS: u64 = 20;
const SHOWN: usize = 48;

fn beat(d: usize, at_ms: u64, seq: u64) -> Vec<u8> {
    let cameras = (0..CAMERAS)
        .map(|c| CameraBeat { id: format!("cam{c}"), state: "up".into(), fps_captured: 1.0, fps_sent: 1.0, last_seq: Some(seq), last_frame_ms: at_ms, dropped: [("encoder_behind".to_string(), 3)].into() })
        .collect();
    serde_json::to_vec(&Heartbeat::Agent(AgentBeat {
        v: 1,
        device: format!("site{d:03}"),
        version: "0.1.0".into(),
        at_ms,
        interval_s: 5,
        uptime_s: 1000,
        link: "up".into(),
        link_error: None,
        cameras,
        spool: SpoolBeat { bytes: 1 << 20, records: 10, cap_bytes: 1 << 30, max_bytes: 1 << 30, error: None },
        process: ProcessBeat { cpu_percent: 12.5, rss_bytes: 20 << 20 },
    }))
    .unwrap()
}

fn cpu_time() -> Duration {
    // Thread CPU time: what this one thread used, whatever else runs on the machine.
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

fn main() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/images");
    // A 1280x720 result of the kind workers publish (JPEG, ~100 KB), and a 1080p one.
    let photo = std::fs::read(dir.join("rocket.jpg")).unwrap();
    let img = turbojpeg::decompress(&photo, turbojpeg::PixelFormat::RGB).unwrap();
    let results: Vec<Bytes> = [(1280usize, 720usize), (1920, 1080)]
        .iter()
        .map(|&(w, h)| {
            let mut out = vec![0u8; w * h * 3];
            for y in 0..h {
                for x in 0..w {
                    let sx = x * img.width / w;
                    let sy = y * img.height / h;
                    out[(y * w + x) * 3..][..3].copy_from_slice(&img.pixels[sy * img.pitch + sx * 3..][..3]);
                }
            }
            let i = turbojpeg::Image { pixels: &out[..], width: w, pitch: w * 3, height: h, format: turbojpeg::PixelFormat::RGB };
            Bytes::copy_from_slice(&turbojpeg::compress(i, 85, turbojpeg::Subsamp::Sub2x2).unwrap())
        })
        .collect();

    println!("| result size | ingest (beats + results) ms/s | tick + delta ms/s | thumbnails ms/s | total CPU ms per second | share of one core | stream bytes/s per page |");
    println!("|---|---|---|---|---|---|---|");
    for (name, jpeg) in [("1280x720", &results[0]), ("1920x1080", &results[1])] {
        let rules = Rules { stale_after_beats: 3, offline_after_ms: 60_000, forget_after_ms: 7 * 86_400_000, recent: 50, thumb_refresh_ms: 2000, lag_window_ms: 900_000, lag_interval_ms: 5000 };
        let mut fleet = Fleet::new(rules);
        let cache = thumbs::Cache::default();
        let t0 = 1_800_000_000_000u64;
        let (mut ingest, mut ticking, mut thumbing) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        let mut stream_bytes = 0usize;
        let mut since = 0;
        let wall = Instant::now();
        for s in 0..SECONDS {
            let now = t0 + s * 1000;
            let c0 = cpu_time();
            // A fifth of the devices beat each second (every 5 s each).
            for d in (0..DEVICES).filter(|d| (*d as u64 % 5) == s % 5) {
                fleet.heartbeat(&beat(d, now, s), now).unwrap();
            }
            for d in 0..DEVICES {
                for c in 0..CAMERAS {
                    let meta = ResultMeta { device: format!("site{d:03}"), camera: format!("cam{c}"), seq: s, capture_ns: now * 1_000_000, width: 1280, height: 720, pipeline: "grayscale".into(), worker: "w1".into(), latency_ms: Some(40) };
                    // The Kafka reader copies each payload out of librdkafka's buffer.
                    fleet.result(meta, Bytes::copy_from_slice(jpeg), now);
                }
            }
            let c1 = cpu_time();
            fleet.tick(now);
            let delta = fleet.delta(since, now).to_string();
            if s > 0 {
                stream_bytes += delta.len();
            }
            since = fleet.version();
            let c2 = cpu_time();
            if s % 2 == 0 {
                for i in 0..SHOWN {
                    let (d, c) = (format!("site{:03}", i / CAMERAS), format!("cam{}", i % CAMERAS));
                    let latest = fleet.latest(&d, &c).unwrap();
                    if cache.get(&d, &c, latest.seq).is_none() {
                        cache.put(&d, &c, latest.seq, thumbs::make(&latest.jpeg, 320, 75).unwrap());
                    }
                }
            }
            let c3 = cpu_time();
            ingest += c1 - c0;
            ticking += c2 - c1;
            thumbing += c3 - c2;
        }
        let per = |d: Duration| d.as_secs_f64() * 1000.0 / SECONDS as f64;
        let total = per(ingest) + per(ticking) + per(thumbing);
        println!(
            "| {name} ({} KB) | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} % | {} |",
            jpeg.len() / 1024,
            per(ingest),
            per(ticking),
            per(thumbing),
            total,
            total / 10.0,
            stream_bytes / (SECONDS as usize - 1)
        );
        eprintln!("({name}: {SECONDS} simulated seconds in {:.1} s wall)", wall.elapsed().as_secs_f64());
    }
}
