//! Worker throughput per op on one core: decode → op → encode of a 1080p JPEG, through the
//! worker's own per-frame path (`Processor::process`, the code a consumed record runs).
//!
//! `cargo bench -p framelink-worker --bench worker_ops -- [--seconds S] [--input F.jpg]
//! [--write-input F.jpg] [--tsv OUT.tsv] [--only 'SPEC;SPEC']`
//!
//! Without `--input` the 1080p frame is made from testdata/images/retina.jpg
//! (Lanczos3 to 1920×1080, quality 85); `--write-input` saves it so that `bench/worker_ops.py`
//! runs OpenCV and Pillow on the very same bytes. Each op runs for `--seconds` (default 2)
//! after a warm-up; the table gives the median time per frame and frames/s on one thread, for
//! the worker's path (with its fast paths: DCT-domain transforms, geometry on YUV planes,
//! luma-only decode; `path`
//! says which one a pipeline took) and for the plain decode → ops → encode path measured in
//! the same run (`pixels`), the "before" of the fast paths.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use framelink_worker::decode::{Decoder, encode};
use framelink_worker::motion::MotionConfig;
use framelink_worker::ops::{Img, Pipeline, resize};
use framelink_worker::process::{Processor, RecordInfo};

/// The pipelines measured, in the order of the table (same list in bench/worker_ops.py).
const PIPELINES: &[&str] = &["", "grayscale", "blur:1.5", "sobel", "sharpen", "rotate:90", "rotate:180", "rotate:270", "rotate:90,grayscale", "resize:1280x720", "resize:640x360", "crop:1280x720+320+180", "crop:1280x720+320+176"];

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn frame_1080p() -> Vec<u8> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/images/retina.jpg");
    let jpeg = std::fs::read(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    let img: Img = Decoder::new().decode(&jpeg, u64::MAX, None).expect("decoding retina.jpg");
    let img = resize(&img, 1920, 1080).expect("resize to 1080p");
    encode(&img, 85).expect("encode")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    framelink_worker::alloc::tune_for_frames(); // as `framelink-worker` does at start
    // `cargo bench` passes `--bench`; ignore what is not ours.
    let seconds: f64 = arg("--seconds").map_or(2.0, |s| s.parse().expect("--seconds N"));
    let frame = match arg("--input") {
        Some(p) => std::fs::read(&p).unwrap_or_else(|e| panic!("{p}: {e}")),
        None => frame_1080p(),
    };
    if let Some(p) = arg("--write-input") {
        std::fs::write(&p, &frame).unwrap_or_else(|e| panic!("{p}: {e}"));
    }
    let h = turbojpeg::read_header(&frame).expect("input is a JPEG");
    println!("framelink-worker ops, one thread, decode -> op -> encode (q85) of a {}x{} JPEG ({} KiB), {seconds} s per op", h.width, h.height, frame.len() / 1024);
    println!("{:<28} {:>10} {:>10} {:>10} {:>10} {:>8} {:>12}", "pipeline", "median ms", "frames/s", "pixels ms", "pixels f/s", "path", "output");
    let mut tsv = String::from("pipeline\tmedian_ms\tfps\tpixel_path_ms\tpath\n");
    // `--only`: just these pipelines (a development loop), separated by `;`.
    let only = arg("--only");
    let pipelines: Vec<&str> = match &only {
        Some(list) => list.split(';').collect(),
        None => PIPELINES.to_vec(),
    };
    for spec in &pipelines {
        let pipeline = Pipeline::parse(spec).expect("pipeline");
        let fast = Processor::new(pipeline.clone(), 50_000_000, 85, false, MotionConfig::default());
        let pixels = Processor::new(pipeline, 50_000_000, 85, false, MotionConfig::default()).without_fast_paths();
        let ((m, size, first_op), (base, _, _)) = (measure(fast, &frame, seconds), measure(pixels, &frame, seconds));
        // How the worker's own path handled the frame.
        let path = first_op;
        let fps = 1.0 / m.as_secs_f64();
        let name = if spec.is_empty() { "(re-encode only)" } else { spec };
        println!("{name:<28} {:>10.2} {fps:>10.1} {:>10.2} {:>10.1} {path:>8} {:>12}", m.as_secs_f64() * 1e3, base.as_secs_f64() * 1e3, 1.0 / base.as_secs_f64(), format!("{}x{}", size.0, size.1));
        tsv.push_str(&format!("{spec}\t{:.3}\t{fps:.2}\t{:.3}\t{path}\n", m.as_secs_f64() * 1e3, base.as_secs_f64() * 1e3));
    }
    // The plain re-encode once more, of the same picture encoded at q80 (the agent's default
    // quality) — into the worker's q85 the DCT-domain re-encode rescales every coefficient,
    // where from the q85 frame above its tables are the source's and it only re-codes them.
    let q80 = encode(&Decoder::new().decode(&frame, u64::MAX, None).expect("decoding the input"), 80).expect("encode at q80");
    if let Some(p) = arg("--write-input") {
        std::fs::write(format!("{p}.q80.jpg"), &q80).unwrap_or_else(|e| panic!("{p}.q80.jpg: {e}"));
    }
    let ((m, _, path), (base, _, _)) = (
        measure(Processor::new(Pipeline::default(), 50_000_000, 85, false, MotionConfig::default()), &q80, seconds),
        measure(Processor::new(Pipeline::default(), 50_000_000, 85, false, MotionConfig::default()).without_fast_paths(), &q80, seconds),
    );
    println!("{:<28} {:>10.2} {:>10.1} {:>10.2} {:>10.1} {path:>8}", "(re-encode of a q80 frame)", m.as_secs_f64() * 1e3, 1.0 / m.as_secs_f64(), base.as_secs_f64() * 1e3, 1.0 / base.as_secs_f64());
    tsv.push_str(&format!("@q80\t{:.3}\t{:.2}\t{:.3}\t{path}\n", m.as_secs_f64() * 1e3, 1.0 / m.as_secs_f64(), base.as_secs_f64() * 1e3));
    if let Some(p) = arg("--tsv") {
        std::fs::write(&p, tsv).unwrap_or_else(|e| panic!("{p}: {e}"));
    }
}

/// The median time per frame of `p` on `frame`, the result's size and how it was processed
/// (`Processed::path`).
fn measure(mut p: Processor, frame: &[u8], seconds: f64) -> (Duration, (u32, u32), &'static str) {
    let info = RecordInfo { key: Some(b"bench/cam"), headers: Vec::new(), topic: "frames", partition: 0, offset: 0, timestamp_ms: None };
    let mut run = || {
        let t = Instant::now();
        let out = p.process(&info, Some(frame)).expect("process");
        (t.elapsed(), (out.width, out.height), out.path)
    };
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_millis(300) {
        run();
    }
    let mut times = Vec::new();
    let (mut size, mut first) = ((0, 0), "");
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < seconds || times.len() < 5 {
        let (t, s, d) = run();
        times.push(t);
        (size, first) = (s, d);
    }
    (median(times), size, first)
}
