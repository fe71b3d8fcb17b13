//! The GPU backend against the CPU backend, pixel by pixel, on the real photographs in
//! testdata/images. Runs on Mesa lavapipe (a software Vulkan adapter) by default, which
//! is what CI has; `FRAMELINK_TEST_BACKEND=gpu` runs the same checks on a real GPU.
//!
//! Every op is integer arithmetic on both sides (resize included: the GPU reads the CPU
//! resizer's fixed-point tables), so the documented tolerance is zero: results must be equal.

use std::sync::Arc;

use framelink_worker::decode::Decoder;
use framelink_worker::gpu::{BackendChoice, Gpu, Runner};
use framelink_worker::motion::small_luma;
use framelink_worker::ops::{Apply, Img, Pipeline};

fn images() -> Vec<(String, Img)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/images");
    let mut out = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    for p in names {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let img = match p.extension().and_then(|e| e.to_str()) {
            Some("png") => {
                let i = image::open(&p).unwrap().into_rgb8();
                let (w, h) = i.dimensions();
                Img::new(w, h, 3, i.into_raw())
            }
            Some("jpg") => Decoder::new().decode(&std::fs::read(&p).unwrap(), 50_000_000, None).unwrap(),
            _ => continue,
        };
        out.push((name, img));
    }
    assert!(out.len() >= 5, "test photographs missing from {}", dir.display());
    out
}

fn gpu() -> Arc<Gpu> {
    let choice: BackendChoice = std::env::var("FRAMELINK_TEST_BACKEND").unwrap_or_else(|_| "software".into()).parse().unwrap();
    let gpu = Gpu::open(choice, None).expect("a Vulkan adapter (CI installs mesa-vulkan-drivers for lavapipe)").expect("not the CPU backend");
    eprintln!("GPU parity on {}", gpu.desc);
    Arc::new(gpu)
}

/// "" when equal, else how they differ.
fn diff(cpu: &Img, gpu: &Img) -> String {
    if (cpu.width, cpu.height, cpu.channels) != (gpu.width, gpu.height, gpu.channels) {
        return format!("size {:?} vs {:?}", cpu, gpu);
    }
    let bad: Vec<(usize, u8, u8)> = cpu.data.iter().zip(&gpu.data).enumerate().filter(|(_, (a, b))| a != b).map(|(i, (a, b))| (i, *a, *b)).collect();
    match bad.first() {
        None => String::new(),
        Some((i, a, b)) => {
            let max = bad.iter().map(|(_, a, b)| a.abs_diff(*b)).max().unwrap();
            let px = i / cpu.channels as usize;
            format!("{} of {} samples differ (max {max}); first at x={} y={} c={}: cpu {a} gpu {b}", bad.len(), cpu.data.len(), px % cpu.width as usize, px / cpu.width as usize, i % cpu.channels as usize)
        }
    }
}

const SPECS: &[&str] = &[
    "",
    "grayscale",
    "blur:1.5",
    "blur:4",
    "sobel",
    "sharpen",
    "grayscale,sharpen",
    "rotate:90",
    "rotate:180",
    "rotate:270",
    "crop:201x99+17+9",
    "resize:640x360",
    "resize:333x211",
    "resize:1280x720",
    "grayscale,resize:300x200",
    "resize:640x360,grayscale,blur:1.5,sobel",
];

#[test]
fn every_op_matches_the_cpu_backend_on_every_photograph() {
    let gpu = gpu();
    let imgs = images();
    let mut failures = Vec::new();
    for spec in SPECS {
        let pipeline = Pipeline::parse(spec).unwrap();
        let mut runner = Runner::new(gpu.clone(), pipeline.clone(), true, 4);
        for (name, img) in &imgs {
            let cpu = pipeline.apply(img.clone()).unwrap();
            let out = runner.run(std::slice::from_ref(img)).unwrap().pop().unwrap();
            let d = diff(&cpu, &out.img);
            if !d.is_empty() {
                failures.push(format!("{name} `{spec}`: {d}"));
            }
            // Motion detection's small luma of the final image.
            let (small_cpu, f_cpu) = small_luma(&cpu);
            let (small_gpu, f_gpu) = out.small.expect("motion on");
            let d = diff(&small_cpu, &small_gpu);
            if !d.is_empty() || f_cpu != f_gpu {
                failures.push(format!("{name} `{spec}` small luma (factor {f_cpu} vs {f_gpu}): {d}"));
            }
        }
    }
    assert!(failures.is_empty(), "GPU differs from CPU:\n{}", failures.join("\n"));
}

#[test]
fn a_batch_keeps_frames_apart_and_in_order() {
    let gpu = gpu();
    let imgs = images();
    let pipeline = Pipeline::parse("blur:2,sharpen").unwrap();
    let mut runner = Runner::new(gpu, pipeline.clone(), false, 8);
    // Five photographs of four sizes, each also flipped (same size, other content), mixed.
    let mut frames = Vec::new();
    for (_, img) in &imgs {
        frames.push(img.clone());
        frames.push(framelink_worker::ops::rotate(img, 180));
    }
    frames.push(imgs[0].1.clone());
    let outs = runner.run(&frames).unwrap();
    assert_eq!(outs.len(), frames.len());
    for (i, (f, o)) in frames.iter().zip(&outs).enumerate() {
        let d = diff(&pipeline.apply(f.clone()).unwrap(), &o.img);
        assert!(d.is_empty(), "frame {i}: {d}");
    }
    // Pipelined: two batches of the same size in flight before either is read back.
    let coffee = &imgs.iter().find(|(n, _)| n == "coffee.png").unwrap().1;
    let flipped = framelink_worker::ops::rotate(coffee, 180);
    let t1 = runner.submit(&[coffee, &flipped]).unwrap();
    let t2 = runner.submit(&[&flipped]).unwrap();
    let (o2, o1) = (runner.finish(t2).unwrap(), runner.finish(t1).unwrap());
    assert_eq!(diff(&pipeline.apply(coffee.clone()).unwrap(), &o1[0].img), "");
    assert_eq!(diff(&pipeline.apply(flipped.clone()).unwrap(), &o1[1].img), "");
    assert_eq!(diff(&pipeline.apply(flipped).unwrap(), &o2[0].img), "");
}

#[test]
fn an_impossible_op_is_refused_with_the_same_error_as_on_the_cpu() {
    let (_, img) = images().remove(0);
    let pipeline = Pipeline::parse("crop:100x100+5000+0").unwrap();
    let cpu = pipeline.apply(img.clone()).unwrap_err().to_string();
    let gpu = Runner::new(gpu(), pipeline, false, 1).run(&[img]).unwrap_err().to_string();
    assert_eq!(cpu, gpu);
}

/// A 4:2:0 JPEG (quality 90) of the middle `w`×`h` of `img`.
fn jpeg_420(img: &Img, w: u32, h: u32) -> Vec<u8> {
    let (w, h) = (w.min(img.width), h.min(img.height));
    let img = framelink_worker::ops::crop(img, (img.width - w) / 2, (img.height - h) / 2, w, h);
    let rgb = if img.channels == 3 { img } else { Img::new(img.width, img.height, 3, img.data.iter().flat_map(|&v| [v, v, v]).collect()) };
    let image = turbojpeg::Image { pixels: &rgb.data[..], width: w as usize, pitch: w as usize * 3, height: h as usize, format: turbojpeg::PixelFormat::RGB };
    turbojpeg::compress(image, 90, turbojpeg::Subsamp::Sub2x2).unwrap().to_vec()
}

/// Colour ops and re-encodes of 4:2:0 frames run on their YUV planes on both backends: the GPU
/// stage takes the three planes (1.5 bytes a pixel up and down, RGB's half) through the plane
/// definitions of `plane_ops`, so a frame's result is the CPU backend's JPEG byte for byte.
/// Three threads share the stage, so planes of different frames and sizes share batches.
#[test]
fn colour_ops_on_the_yuv_planes_give_the_cpu_backends_jpeg_byte_for_byte() {
    use framelink_worker::motion::MotionConfig;
    use framelink_worker::process::{Processor, RecordInfo};
    let gpu = gpu();
    // Even sizes (every op fits the chroma grid) and an odd one (a quarter turn does not).
    let mut frames = Vec::new();
    for (name, img) in images() {
        frames.push((format!("{name} 640x360"), jpeg_420(&img, 640, 360)));
        frames.push((format!("{name} 333x221"), jpeg_420(&img, 333, 221)));
    }
    let info = || RecordInfo { key: Some(b"d/c"), headers: Vec::new(), topic: "frames", partition: 0, offset: 1, timestamp_ms: None };
    let new = |p: &Pipeline| Processor::new(p.clone(), 50_000_000, 85, false, MotionConfig::default());
    let mut failures = Vec::new();
    for spec in ["", "blur:1.5", "blur:4", "sharpen", "blur:0.7,sharpen", "rotate:90,blur:2,sharpen", "blur:1,rotate:270,crop:201x99+18+10,sharpen", "resize:320x180", "resize:160x100,blur:1", "resize:161x101"] {
        let pipeline = Pipeline::parse(spec).unwrap();
        let mut cpu = new(&pipeline);
        let want: Vec<_> = frames.iter().map(|(_, jpeg)| cpu.process(&info(), Some(jpeg)).unwrap()).collect();
        // (A plain re-encode is requantised in the DCT domain instead, on either backend.)
        let on_planes = want.iter().filter(|p| p.path == "planes" || (spec.is_empty() && p.path == "dct")).count();
        // An odd resize target leaves every frame on RGB (its chroma would shift on the planes).
        let least = if spec == "resize:161x101" { 0 } else { frames.len() / 2 };
        assert!(on_planes >= least, "`{spec}`: {on_planes} of {} frames on the planes", frames.len());
        let stats = std::sync::Arc::new(framelink_worker::gpu::stage::StageStats::default());
        let client = framelink_worker::gpu::stage::spawn(gpu.clone(), pipeline.clone(), false, 4, std::time::Duration::from_millis(2), stats.clone()).unwrap();
        let got: Vec<Vec<_>> = std::thread::scope(|s| {
            let runs: Vec<_> = (0..3)
                .map(|_| {
                    let mut p = new(&pipeline).with_gpu(client.clone());
                    let frames = &frames;
                    s.spawn(move || frames.iter().map(|(_, jpeg)| p.process(&info(), Some(jpeg)).unwrap()).collect::<Vec<_>>())
                })
                .collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        });
        // Every frame the GPU ran counts once, planes or not; none fell back to the CPU.
        let on_gpu = got.iter().flatten().filter(|p| p.path.starts_with("gpu")).count() as u64;
        assert_eq!((stats.frames.get(), stats.errors.get()), (on_gpu, 0), "`{spec}`: gpu_frames, gpu_fallbacks");
        // The 640x360 frames' planes are decoded straight into the stage's upload buffer (at the
        // DCT scale of a leading resize too: 320x180 is even); the 333x221 ones (odd planes,
        // padded by the decoder, also when halved) are decoded here and copied there.
        let in_place = got.iter().flat_map(|run| run.iter().zip(&frames)).filter(|(b, (name, _))| b.path == "gpu_planes" && name.ends_with("640x360")).count();
        assert!(spec.is_empty() || spec == "resize:161x101" || in_place > 0, "`{spec}`: no frame decoded in place");
        assert_eq!(stats.in_place.get(), in_place as u64, "`{spec}`: frames decoded in place");
        for (t, run) in got.iter().enumerate() {
            for (((name, _), a), b) in frames.iter().zip(&want).zip(run) {
                // A plain re-encode has nothing for the GPU to do: on the CPU with either backend.
                let path = match (a.path, spec) {
                    ("dct", "") => "dct",
                    ("planes", "") => "planes",
                    ("planes", _) => "gpu_planes",
                    _ => "gpu",
                };
                if b.path != path || a.jpeg != b.jpeg {
                    failures.push(format!("`{spec}` {name} (thread {t}): cpu {} {}x{}, gpu {} {}x{}, JPEGs equal: {}", a.path, a.width, a.height, b.path, b.width, b.height, a.jpeg == b.jpeg));
                }
            }
        }
    }
    assert!(failures.is_empty(), "GPU differs from CPU:\n{}", failures.join("\n"));
}
