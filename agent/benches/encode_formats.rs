//! The agent's encoder per camera layout, one thread: 1080p frames made from the test
//! photographs as RGB24, YUYV and NV12 (BT.601 studio range, as cameras deliver them) and J420
//! (full range, what the synthetic pattern draws), JPEG q80 4:2:0, rounds interleaved (RGB,
//! YUYV, NV12, J420, RGB, …) so a noisy machine hits every layout alike. Prints frames/s
//! (median of 7 rounds of 1 s) and ms per frame.
//!
//! Run: `cargo bench -p framelink-agent --bench encode_formats` (release build).

use std::time::{Duration, Instant};

use bytes::Bytes;
use framelink_agent::encoder::{Encoder, EncoderConfig};
use framelink_agent::frame::{Captured, PixelFormat};

mod support;
use support::{H, W, photos, to_j420, to_nv12, to_yuyv};

/// (name, format, stride, buffer) for one photo in every layout.
fn layouts(rgb: &Bytes) -> Vec<(&'static str, PixelFormat, usize, Bytes)> {
    vec![
        ("RGB24", PixelFormat::Rgb24, W * 3, rgb.clone()),
        ("YUYV", PixelFormat::Yuyv, W * 2, to_yuyv(rgb)),
        ("NV12", PixelFormat::Nv12, W, to_nv12(rgb)),
        ("J420", PixelFormat::J420, W, to_j420(rgb)),
    ]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` probing
    }
    let frames: Vec<_> = photos().iter().map(|p| layouts(p)).collect();
    let kinds = frames[0].len();
    let mut enc = Encoder::new(EncoderConfig::default()).unwrap();
    let mut rates = vec![Vec::new(); kinds];
    for _ in 0..7 {
        for (k, rate) in rates.iter_mut().enumerate() {
            let start = Instant::now();
            let mut n = 0;
            while start.elapsed() < Duration::from_secs(1) {
                let (_, format, stride, data) = &frames[n % frames.len()][k];
                let f = Captured { capture_ns: 0, width: W as u32, height: H as u32, stride: *stride, format: *format, source_format: "X", data: data.clone(), clock: Default::default() };
                std::hint::black_box(enc.encode(&f).unwrap());
                n += 1;
            }
            rate.push(n as f64 / start.elapsed().as_secs_f64());
        }
    }
    println!("framelink-agent encoder, one thread, 1920x1080 from testdata/images, JPEG q80 4:2:0; median of 7 interleaved rounds of 1 s");
    println!();
    println!("| camera layout | frames/s | ms per frame | vs RGB24 |");
    println!("| --- | ---: | ---: | ---: |");
    let med: Vec<f64> = rates
        .into_iter()
        .map(|mut r| {
            r.sort_by(|a, b| a.partial_cmp(b).unwrap());
            r[r.len() / 2]
        })
        .collect();
    for (k, m) in med.iter().enumerate() {
        println!("| {} | {m:.1} | {:.2} | {:.2}x |", frames[0][k].0, 1000.0 / m, m / med[0]);
    }
}
