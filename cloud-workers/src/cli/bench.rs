//! `framelink-worker bench`: frames/s per op, CPU backend against the GPU backend at several
//! batch sizes, on frames made from real photographs; prints a markdown table. One command on
//! any machine (`framelink-worker bench`), so a fleet operator can see what a host's GPU buys.
//!
//! What is timed: for the CPU, the op on a decoded frame (one thread, and one frame per thread
//! on every core); for the GPU, upload + op + read-back of whole batches, two in flight, as
//! the worker's GPU stage runs them. JPEG decode and encode stay on the CPU with either
//! backend; their rate is printed too, since it bounds a worker end to end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use framelink_worker::decode::{Decoder, encode};
use framelink_worker::gpu::{BackendChoice, Gpu, Runner};
use framelink_worker::ops::{Apply, Img, Pipeline, resize};

pub struct BenchOptions {
    pub backend: BackendChoice,
    pub adapter: Option<String>,
    pub images: std::path::PathBuf,
    pub size: (u32, u32),
    pub ops: Vec<String>,
    pub batches: Vec<usize>,
    /// Time per measurement; each cell is the median of three.
    pub seconds: f64,
    pub threads: usize,
}

/// Frames of `size` from every photograph in `dir` (resized on the CPU).
pub fn frames(dir: &std::path::Path, size: (u32, u32)) -> anyhow::Result<Vec<Img>> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    let mut out = Vec::new();
    for p in paths {
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("").to_lowercase();
        if ext != "jpg" && ext != "jpeg" {
            continue;
        }
        let img = Decoder::new().decode(&std::fs::read(&p)?, 100_000_000, None)?;
        out.push(resize(&img, size.0, size.1).map_err(anyhow::Error::msg)?);
    }
    anyhow::ensure!(!out.is_empty(), "no JPEG photographs in {}", dir.display());
    Ok(out)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `f` (which processes some frames and returns how many) for `secs`; frames/s.
fn rate(secs: f64, mut f: impl FnMut() -> anyhow::Result<usize>) -> anyhow::Result<f64> {
    f()?; // warm-up: plans, buffers, caches
    let mut runs = Vec::new();
    for _ in 0..3 {
        let (start, mut n) = (Instant::now(), 0usize);
        while start.elapsed() < Duration::from_secs_f64(secs) {
            n += f()?;
        }
        runs.push(n as f64 / start.elapsed().as_secs_f64());
    }
    Ok(median(runs))
}

/// Frames/s of `threads` threads for `secs`, median of 3 after a warm-up round: each thread
/// gets its own state from `make(thread)` and processes frame `n` with `step(&mut state, n)`.
fn parallel_rate<S>(threads: usize, secs: f64, make: impl Fn(usize) -> S + Sync, step: impl Fn(&mut S, usize) + Sync) -> f64 {
    let deadline = Duration::from_secs_f64(secs);
    let mut runs = Vec::new();
    for round in 0..4 {
        let start = Instant::now();
        let total: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                .map(|t| {
                    let (make, step) = (&make, &step);
                    s.spawn(move || {
                        let mut state = make(t);
                        let mut n = 0;
                        while start.elapsed() < deadline {
                            step(&mut state, t + n);
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        if round > 0 {
            runs.push(total as f64 / start.elapsed().as_secs_f64()); // round 0 warms up
        }
    }
    median(runs)
}

/// The CPU backend's ops alone, one frame per thread on `threads` threads.
fn cpu_parallel(frames: &[Img], pipeline: &Pipeline, threads: usize, secs: f64) -> f64 {
    parallel_rate(threads, secs, |_| (), |_, i| {
        let _ = pipeline.apply(frames[i % frames.len()].clone());
    })
}

fn gpu_rate(gpu: &Arc<Gpu>, frames: &[Img], pipeline: &Pipeline, batch: usize, secs: f64) -> anyhow::Result<(f64, framelink_worker::gpu::Times)> {
    let mut runner = Runner::new(gpu.clone(), pipeline.clone(), false, batch);
    let f0 = &frames[0];
    let batch = batch.min(runner.capacity((f0.width, f0.height, f0.channels))?);
    let mut next = 0usize;
    let mut inflight = std::collections::VecDeque::new();
    let fps = rate(secs, || {
        let refs: Vec<&Img> = (0..batch).map(|i| &frames[(next + i) % frames.len()]).collect();
        next += batch;
        inflight.push_back(runner.submit(&refs)?);
        let mut n = 0;
        if inflight.len() >= 2 {
            n += runner.finish(inflight.pop_front().unwrap())?.len();
        }
        Ok(n)
    })?;
    Ok((fps, runner.take_times()))
}

/// The worker's whole per-frame path (`Processor::process`: decode -> ops -> encode) on
/// `threads` threads, each with its own processor, optionally all sharing one GPU stage.
fn worker_path(jpegs: &[Vec<u8>], pipeline: &Pipeline, threads: usize, gpu: Option<&framelink_worker::gpu::stage::GpuClient>, secs: f64) -> f64 {
    use framelink_worker::motion::MotionConfig;
    use framelink_worker::process::{Processor, RecordInfo};
    let make = |t: usize| {
        let mut p = Processor::new(pipeline.clone(), 100_000_000, 85, false, MotionConfig::default());
        if let Some(g) = gpu {
            p = p.with_gpu(g.clone());
        }
        (p, format!("bench/cam{t}"))
    };
    parallel_rate(threads, secs, make, |(p, key), i| {
        let info = RecordInfo { key: Some(key.as_bytes()), headers: vec![], topic: "bench", partition: 0, offset: 0, timestamp_ms: None };
        p.process(&info, Some(&jpegs[i % jpegs.len()])).expect("a good frame");
    })
}

pub fn run(o: &BenchOptions) -> anyhow::Result<String> {
    let frames = frames(&o.images, o.size)?;
    let gpu = Gpu::open(o.backend, o.adapter.as_deref())?.map(Arc::new);
    let threads = if o.threads == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { o.threads };
    let mut t = String::new();
    let cpu_name = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())).unwrap_or_default();
    t.push_str(&format!(
        "framelink-worker {} bench: {} frames of {}x{} RGB from {}; CPU: {} ({} threads); GPU: {}; median of 3 × {:.1} s per cell\n\n",
        env!("CARGO_PKG_VERSION"),
        frames.len(),
        o.size.0,
        o.size.1,
        o.images.display(),
        cpu_name,
        threads,
        gpu.as_ref().map_or("none (CPU backend only)".to_owned(), |g| g.desc.to_string()),
        o.seconds
    ));
    let mut head = format!("| op | CPU 1 thread | CPU {threads} threads |");
    let mut rule = "| --- | ---: | ---: |".to_owned();
    if gpu.is_some() {
        for b in &o.batches {
            head.push_str(&format!(" GPU batch {b} |"));
            rule.push_str(" ---: |");
        }
        head.push_str(" best GPU / CPU all threads |");
        rule.push_str(" ---: |");
    }
    t.push_str(&format!("{head}\n{rule}\n"));
    let mut breakdown: Vec<String> = Vec::new();
    for spec in &o.ops {
        let pipeline = Pipeline::parse(spec)?;
        let mut i = 0usize;
        let one = rate(o.seconds, || {
            let _ = pipeline.apply(frames[i % frames.len()].clone())?;
            i += 1;
            Ok(1)
        })?;
        let all = cpu_parallel(&frames, &pipeline, threads, o.seconds);
        let mut row = format!("| `{spec}` | {one:.1} | {all:.1} |");
        if let Some(g) = &gpu {
            let mut best = 0f64;
            let mut split = format!("| `{spec}` |");
            for &b in &o.batches {
                let (r, times) = gpu_rate(g, &frames, &pipeline, b, o.seconds)?;
                best = best.max(r);
                row.push_str(&format!(" {r:.1} |"));
                let per = |d: Duration| d.as_secs_f64() * 1e3 / times.frames.max(1) as f64;
                split.push_str(&format!(" {:.2} / {:.2} / {:.2} / {:.2} |", per(times.upload), per(times.submit), per(times.wait), per(times.readback)));
            }
            breakdown.push(split);
            row.push_str(&format!(" {:.2}x |", best / all));
        }
        t.push_str(&row);
        t.push('\n');
    }
    if !breakdown.is_empty() {
        t.push_str("\nWhere the GPU backend's time goes, ms per frame on the host: copy into the upload buffer / record + submit / wait for the GPU (transfers + compute) / copy out of the read-back buffer:\n\n");
        t.push_str(&format!("| op |{}\n| --- |{}\n", o.batches.iter().map(|b| format!(" batch {b} |")).collect::<String>(), " ---: |".repeat(o.batches.len())));
        for l in &breakdown {
            t.push_str(l);
            t.push('\n');
        }
    }
    // What both backends share: JPEG decode + encode on the CPU.
    let jpegs: Vec<Vec<u8>> = frames.iter().map(|f| encode(f, 85)).collect::<Result<_, _>>()?;
    if let Some(g) = &gpu {
        // What a GPU buys a worker: its whole per-frame path on every core, CPU backend vs
        // the same threads handing the ops to one GPU stage (batch = default `gpu.batch`).
        let batch = framelink_worker::gpu::GpuConfig::default().batch;
        t.push_str(&format!(
            "\nThe worker's whole per-frame path (decode → ops → encode q85, `Processor::process`) on {threads} threads, frames/s; GPU = the same threads sharing one GPU stage (batch {batch}):\n\n| op | CPU backend | GPU backend | GPU / CPU |\n| --- | ---: | ---: | ---: |\n"
        ));
        for spec in &o.ops {
            let pipeline = Pipeline::parse(spec)?;
            let cpu = worker_path(&jpegs, &pipeline, threads, None, o.seconds);
            let client = framelink_worker::gpu::stage::spawn(g.clone(), pipeline.clone(), false, batch, Duration::from_millis(2), Default::default())?;
            let with_gpu = worker_path(&jpegs, &pipeline, threads, Some(&client), o.seconds);
            t.push_str(&format!("| `{spec}` | {cpu:.1} | {with_gpu:.1} | {:.2}x |\n", with_gpu / cpu));
        }
    }
    let mut dec = Decoder::new();
    let mut i = 0usize;
    let codec = rate(o.seconds, || {
        let img = dec.decode(&jpegs[i % jpegs.len()], 100_000_000, None)?;
        encode(&img, 85)?;
        i += 1;
        Ok(1)
    })?;
    t.push_str(&format!(
        "\nJPEG decode + encode (q85) on the CPU, which both backends do: {codec:.1} frames/s on one thread — a worker's end-to-end ceiling is about that times its processing threads.\n"
    ));
    Ok(t)
}
