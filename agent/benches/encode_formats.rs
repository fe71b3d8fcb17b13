//! The agent's encoder per camera layout, one thread: 1080p frames made from the test
//! photographs as RGB24, YUYV and NV12 (BT.601 studio range, as cameras deliver them) and J420
//! (full range, what the synthetic pattern draws), JPEG q80 4:2:0, rounds interleaved (RGB,
//! YUYV, NV12, J420, RGB, …) so a noisy machine hits every layout alike. Prints frames/s
//! (median of 7 rounds of 1 s) and ms per frame.
//!
//! Run: `cargo bench -p framelink-agent --bench encode_formats` (release build).

use std::time::{Duration, Instant};

use bytes::Bytes;
use framelink_agent::encoder::yuv420::rgb_to_full_range;
use framelink_agent::encoder::{Encoder, EncoderConfig};
use framelink_agent::frame::{Captured, PixelFormat};

const W: usize = 1920;
const H: usize = 1080;

fn photos() -> Vec<Vec<u8>> {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/images");
    let mut paths: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "png" || e == "jpg")).collect();
    paths.sort();
    paths
        .iter()
        .map(|p| {
            // The agent's image crate reads PNG only; JPEGs through libjpeg-turbo.
            let img = if p.extension().is_some_and(|e| e == "jpg") {
                let d = turbojpeg::decompress(&std::fs::read(p).unwrap(), turbojpeg::PixelFormat::RGB).unwrap();
                image::RgbImage::from_raw(d.width as u32, d.height as u32, d.pixels).unwrap()
            } else {
                image::open(p).unwrap().into_rgb8()
            };
            image::imageops::resize(&img, W as u32, H as u32, image::imageops::FilterType::Triangle).into_raw()
        })
        .collect()
}

fn studio(p: &[u8]) -> [i32; 3] {
    let (r, g, b) = (p[0] as i32, p[1] as i32, p[2] as i32);
    [((66 * r + 129 * g + 25 * b + 128) >> 8) + 16, ((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128, ((112 * r - 94 * g - 18 * b + 128) >> 8) + 128]
}

/// (name, format, stride, buffer) for one photo in every layout.
fn layouts(rgb: &[u8]) -> Vec<(&'static str, PixelFormat, usize, Bytes)> {
    let mut yuyv = Vec::with_capacity(W * H * 2);
    for pair in rgb.chunks_exact(6) {
        let (a, b) = (studio(&pair[..3]), studio(&pair[3..]));
        yuyv.extend_from_slice(&[a[0] as u8, ((a[1] + b[1] + 1) / 2) as u8, b[0] as u8, ((a[2] + b[2] + 1) / 2) as u8]);
    }
    let (mut nv12, mut j420) = (vec![0u8; W * H * 3 / 2], vec![0u8; W * H * 3 / 2]);
    for r in (0..H).step_by(2) {
        for c in (0..W).step_by(2) {
            let (mut su, mut sv, mut fu, mut fv) = (0, 0, 0u32, 0u32);
            for (dr, dc) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                let px = &rgb[((r + dr) * W + c + dc) * 3..][..3];
                let s = studio(px);
                let f = rgb_to_full_range([px[0], px[1], px[2]]);
                nv12[(r + dr) * W + c + dc] = s[0] as u8;
                j420[(r + dr) * W + c + dc] = f[0];
                (su, sv, fu, fv) = (su + s[1], sv + s[2], fu + f[1] as u32, fv + f[2] as u32);
            }
            nv12[W * H + (r / 2) * W + c] = ((su + 2) / 4) as u8;
            nv12[W * H + (r / 2) * W + c + 1] = ((sv + 2) / 4) as u8;
            j420[W * H + (r / 2) * (W / 2) + c / 2] = ((fu + 2) / 4) as u8;
            j420[W * H + W * H / 4 + (r / 2) * (W / 2) + c / 2] = ((fv + 2) / 4) as u8;
        }
    }
    vec![
        ("RGB24", PixelFormat::Rgb24, W * 3, Bytes::copy_from_slice(rgb)),
        ("YUYV", PixelFormat::Yuyv, W * 2, Bytes::from(yuyv)),
        ("NV12", PixelFormat::Nv12, W, Bytes::from(nv12)),
        ("J420", PixelFormat::J420, W, Bytes::from(j420)),
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
