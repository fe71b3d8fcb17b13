//! Fuzz checks of framelink-worker: JPEG decoding with the worker's limits, the pipeline
//! syntax, and the config loader.
//!
//! Shared, by `#[path]`, between the cargo-fuzz targets (`fuzz/fuzz_targets/jpeg_decode.rs`,
//! `pipeline_syntax.rs`, `worker_config.rs`) and the stable replay of the committed corpora
//! (`cloud-workers/tests/fuzz_corpus.rs`), so that the byte schemes and the properties live in
//! one place. A check never panics on any input unless a property of the library is broken.

use std::path::Path;
use std::sync::LazyLock;

use framelink_common::config_file;
use framelink_worker::config::{ProcessingConfig, WorkerConfig};
use framelink_worker::decode::{DecodeError, Decoder};
use framelink_worker::ops::{Apply, Img, Op, OpError, Pipeline};

#[path = "kafka_files.rs"]
mod kafka_files;
#[path = "seed_files.rs"]
mod seed_files;
use seed_files::{Failure, LOAD_ERRORS_ARE_DETERMINISTIC, config_files};

/// `worker.max_pixels` when the config leaves it out: the limit a worker runs with.
static DEFAULT_MAX_PIXELS: LazyLock<u64> = LazyLock::new(|| ProcessingConfig::default().max_pixels);

/// A good frame (16x8, by the worker's encoder) and what a fresh decoder makes of it: decoded
/// after each fuzzed input by the same decoder, as the next frame on a worker thread is.
static NEXT_FRAME: LazyLock<(Vec<u8>, Img)> = LazyLock::new(|| {
    let img = Img::new(16, 8, 3, (0..16 * 8 * 3).map(|i| (i * 7 % 256) as u8).collect());
    let jpeg = framelink_worker::decode::encode(&img, 85).unwrap();
    let decoded = Decoder::new().decode(&jpeg, *DEFAULT_MAX_PIXELS, None).unwrap();
    (jpeg, decoded)
});

/// Byte scheme of `jpeg_decode`: a 5-byte prefix, then the record value (the JPEG):
///
/// ```text
/// sel:u8  target_width:u16be  target_height:u16be  jpeg...
/// ```
///
/// - `sel` bits 0-1, the pixel limit: 0 the worker's default `worker.max_pixels` (50 M),
///   1 `1 << 20`, 2 `4096`, 3 `1` (the smallest a config accepts);
/// - `sel` bit 2: decode `at_least` the target size (the worker does when its pipeline starts
///   with `resize:WxH`), else at full size.
///
/// Missing prefix bytes read as zero.
pub fn jpeg_decode_input(data: &[u8]) -> (u64, Option<(u32, u32)>, &[u8]) {
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let sel = byte(0);
    let max_pixels = match sel & 3 {
        0 => *DEFAULT_MAX_PIXELS,
        1 => 1 << 20,
        2 => 4096,
        _ => 1,
    };
    let target = (u16::from_be_bytes([byte(1), byte(2)]) as u32, u16::from_be_bytes([byte(3), byte(4)]) as u32);
    let at_least = (sel & 4 != 0).then_some(target);
    (max_pixels, at_least, data.get(5..).unwrap_or_default())
}

/// The inverse of [`jpeg_decode_input`] (seeds): `limit` is the `sel` bits 0-1.
pub fn jpeg_decode_bytes(limit: u8, at_least: Option<(u16, u16)>, jpeg: &[u8]) -> Vec<u8> {
    let (w, h) = at_least.unwrap_or((0, 0));
    let mut out = vec![(limit & 3) | if at_least.is_some() { 4 } else { 0 }];
    out.extend_from_slice(&w.to_be_bytes());
    out.extend_from_slice(&h.to_be_bytes());
    out.extend_from_slice(jpeg);
    out
}

/// `jpeg_decode`: [`Decoder::decode`] (libjpeg-turbo, with the worker's scan limit) under a
/// pixel limit, at full size or DCT-scaled. Properties:
/// - no panic (nor any memory error the sanitizer sees); every error displays and has a
///   dead-letter reason;
/// - a decoded image never has more pixels than the limit, has 3 channels, and is the
///   header's size, or when scaled the smallest of 1/8, 2/8, 4/8 that is still at least the
///   target (else full size);
/// - `Empty`, `NotJpeg` and `TooLarge` are reported exactly when their condition holds;
/// - no state carries from one frame to the next (the worker reuses a decoder per thread):
///   one decoder decoding the input twice gives the same result, and then decodes a good frame
///   as a fresh decoder does.
pub fn jpeg_decode(data: &[u8]) {
    let (max_pixels, at_least, jpeg) = jpeg_decode_input(data);
    let mut decoder = Decoder::new();
    let first = decoder.decode(jpeg, max_pixels, at_least);
    let second = decoder.decode(jpeg, max_pixels, at_least);
    assert_eq!(first, second, "decoding the same input twice");
    let (next, want) = &*NEXT_FRAME;
    assert_eq!(decoder.decode(next, *DEFAULT_MAX_PIXELS, None).as_ref(), Ok(want), "the next frame");
    let not_jpeg = jpeg.len() < 4 || jpeg[..2] != [0xFF, 0xD8];
    match first {
        Ok(img) => {
            assert!(!not_jpeg);
            assert_eq!(img.channels, 3);
            assert!(img.width >= 1 && img.height >= 1, "{img:?}");
            let pixels = img.width as u64 * img.height as u64;
            assert!(pixels <= max_pixels, "{img:?} above the limit of {max_pixels}");
            assert_eq!(img.data.len() as u64, pixels * 3);
            let header = turbojpeg::read_header(jpeg).expect("a JPEG that decodes has a header");
            let (hw, hh) = (header.width as u32, header.height as u32);
            assert!(hw as u64 * hh as u64 <= max_pixels);
            let scaled = |num: u32| (((hw as u64 * num as u64).div_ceil(8)) as u32, ((hh as u64 * num as u64).div_ceil(8)) as u32);
            let want = match at_least {
                None => (hw, hh),
                Some((tw, th)) => [1, 2, 4].into_iter().map(scaled).find(|&(w, h)| w >= tw && h >= th).unwrap_or((hw, hh)),
            };
            assert_eq!((img.width, img.height), want, "header {hw}x{hh}, at least {at_least:?}");
        }
        Err(e) => {
            let _ = (e.to_string(), e.reason());
            match e {
                DecodeError::Empty => assert!(jpeg.is_empty()),
                DecodeError::NotJpeg(_) => assert!(not_jpeg && !jpeg.is_empty()),
                DecodeError::TooLarge { width, height, pixels, limit } => {
                    assert!(!not_jpeg);
                    assert_eq!(limit, max_pixels);
                    assert_eq!(pixels, width as u64 * height as u64);
                    assert!(pixels > limit || width == 0 || height == 0, "{e}");
                }
                DecodeError::Corrupt(_) => assert!(!not_jpeg),
            }
        }
    }
}

/// Seeds: the repository's test JPEGs (`testdata/images/*.jpg`), decoded by the worker,
/// shrunk to at most 48 pixels wide by its `resize` op and re-encoded the ways cameras and
/// encoders write JPEGs (baseline 4:2:0 by the worker's own encoder, 4:2:2, 4:4:4, gray,
/// progressive, arithmetic-coded, optimised Huffman tables, lossless); each under the default
/// limit, scaled, and under a limit it exceeds; plus a truncated one, one whose header claims
/// 60000x60000, and a progressive one with more scans than the worker's limit.
pub fn jpeg_decode_seeds(repo: &Path) -> Vec<(String, Vec<u8>)> {
    use turbojpeg::{Compressor, Image, PixelFormat, Subsamp};
    let mut seeds = Vec::new();
    let mut decoder = Decoder::new();
    let mut names: Vec<_> = std::fs::read_dir(repo.join("testdata/images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no testdata JPEGs");
    let mut progressive_small = None;
    for path in names {
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        let img = decoder.decode(&std::fs::read(&path).unwrap(), *DEFAULT_MAX_PIXELS, Some((96, 64))).expect("testdata decodes");
        let w = 48.min(img.width);
        let h = (img.height as u64 * w as u64 / img.width as u64).max(1) as u32;
        let img = framelink_worker::ops::resize(&img, w, h).unwrap();
        let gray = framelink_worker::ops::grayscale(&img);
        let variants: Vec<(&str, Vec<u8>)> = {
            let compress = |set: &dyn Fn(&mut Compressor), gray_input: bool| {
                let mut c = Compressor::new().unwrap();
                c.set_quality(75).unwrap();
                set(&mut c);
                let (src, format) = if gray_input { (&gray, PixelFormat::GRAY) } else { (&img, PixelFormat::RGB) };
                let image = Image { pixels: &src.data[..], width: w as usize, pitch: w as usize * src.channels as usize, height: h as usize, format };
                c.compress_to_vec(image).unwrap()
            };
            vec![
                ("baseline-420", framelink_worker::decode::encode(&img, 85).unwrap()),
                ("422", compress(&|c| c.set_subsamp(Subsamp::Sub2x1).unwrap(), false)),
                ("444", compress(&|c| c.set_subsamp(Subsamp::None).unwrap(), false)),
                ("gray", compress(&|c| c.set_subsamp(Subsamp::Gray).unwrap(), true)),
                ("progressive", compress(&|c| c.set_progressive(true).unwrap(), false)),
                ("arithmetic", compress(&|c| c.set_arithmetic(true).unwrap(), false)),
                ("optimized", compress(&|c| c.set_optimize(true).unwrap(), false)),
                ("lossless", compress(&|c| c.set_lossless(true).unwrap(), false)),
            ]
        };
        for (kind, jpeg) in variants {
            if kind == "progressive" {
                progressive_small.get_or_insert_with(|| jpeg.clone());
            }
            seeds.push((format!("{stem}-{kind}"), jpeg_decode_bytes(0, None, &jpeg)));
            seeds.push((format!("{stem}-{kind}-scaled"), jpeg_decode_bytes(0, Some((w as u16 / 4, h as u16 / 4)), &jpeg)));
            seeds.push((format!("{stem}-{kind}-too-large"), jpeg_decode_bytes(3, None, &jpeg)));
        }
    }
    let (name, jpeg) = (seeds[0].0.clone(), seeds[0].1[5..].to_vec());
    seeds.push((format!("{name}-truncated"), jpeg_decode_bytes(0, None, &jpeg[..jpeg.len() * 2 / 3])));
    let mut huge = jpeg.clone();
    let sof = huge.windows(2).position(|w| w == [0xFF, 0xC0]).expect("SOF0");
    huge[sof + 5..sof + 9].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]);
    seeds.push((format!("{name}-claims-60000x60000"), jpeg_decode_bytes(0, None, &huge)));
    // The last scan (SOS to EOI) repeated past the worker's scan limit.
    let p = progressive_small.unwrap();
    let sos = p.windows(2).rposition(|w| w == [0xFF, 0xDA]).unwrap();
    let eoi = p.len() - 2;
    let mut bomb = p[..eoi].to_vec();
    for _ in 0..=framelink_worker::decode::MAX_SCANS {
        bomb.extend_from_slice(&p[sos..eoi]);
    }
    bomb.extend_from_slice(&[0xFF, 0xD9]);
    seeds.push(("progressive-scan-bomb".into(), jpeg_decode_bytes(0, None, &bomb)));
    seeds
}

/// Byte scheme of `pipeline_syntax`: the bytes are a `worker.pipeline` spec (UTF-8; invalid
/// sequences are replaced, lossily).
pub fn pipeline_text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(data)
}

/// Most work (roughly: pixels written, times the taps of a blur) the check spends applying a
/// parsed pipeline; a pipeline above it (`resize:60000x60000`, a hundred `blur:50`) is only
/// parsed and sized.
const APPLY_BUDGET: u64 = 1 << 20;

/// `pipeline_syntax`: [`Pipeline::parse`], then the parsed pipeline's `output_size` and
/// `apply` on small RGB images (7x5 and 1x1; `apply` skipped above [`APPLY_BUDGET`]).
/// Properties:
/// - no panic; every error displays; a parse error names an op by its 1-based position;
/// - a parsed pipeline has one op per comma-separated part, and prints as a spec that parses
///   back to the same pipeline (and prints the same again);
/// - `apply` fails exactly when a crop falls outside the image it gets, naming that op and
///   size; otherwise its result has the size `output_size` predicts, and 1 channel after
///   `grayscale` or `sobel`, else 3.
pub fn pipeline_syntax(data: &[u8]) {
    let text = pipeline_text(data);
    let parts = if text.trim().is_empty() { 0 } else { text.trim().split(',').count() };
    let pipeline = match Pipeline::parse(&text) {
        Ok(p) => p,
        Err(e) => {
            let _ = e.to_string();
            match e {
                OpError::Parse { index, .. } => assert!((1..=parts).contains(&index), "op {index} of {parts}"),
                OpError::Apply { .. } => panic!("parse reported an apply error: {e}"),
            }
            return;
        }
    };
    assert_eq!(pipeline.0.len(), parts);
    let shown = pipeline.to_string();
    let back = Pipeline::parse(&shown).unwrap_or_else(|e| panic!("{shown:?} does not parse back: {e}"));
    assert_eq!(back, pipeline, "{shown:?}");
    assert_eq!(back.to_string(), shown);

    for (w, h) in [(7u32, 5u32), (1, 1)] {
        let (ow, oh) = pipeline.output_size(w, h);
        assert!(ow >= 1 && oh >= 1, "output_size({w}, {h}) = {ow}x{oh}");
        // Walk the sizes: where does a crop fail, and is any image too large to make here?
        let (mut cw, mut ch) = (w, h);
        let mut fails = None;
        let mut work = 0u64;
        for op in &pipeline.0 {
            if let Op::Crop { x, y, width, height } = *op {
                if x as u64 + width as u64 > cw as u64 || y as u64 + height as u64 > ch as u64 {
                    fails = Some((op.to_string(), cw, ch));
                    break;
                }
            }
            (cw, ch) = op.output_size(cw, ch);
            let taps = match op {
                Op::Blur { sigma } => 2 * (2 * (3.0 * sigma).ceil() as u64 + 1),
                _ => 10,
            };
            work = work.saturating_add((cw as u64 * ch as u64 * 3).saturating_mul(taps));
        }
        if work > APPLY_BUDGET {
            continue;
        }
        let data: Vec<u8> = (0..w as usize * h as usize * 3).map(|i| (i * 37 % 251) as u8).collect();
        let result = pipeline.apply(Img::new(w, h, 3, data));
        match (result, fails) {
            (Ok(img), None) => {
                assert_eq!((img.width, img.height), (ow, oh), "{shown} on {w}x{h}");
                let gray = pipeline.0.iter().any(|op| matches!(op, Op::Grayscale | Op::Sobel));
                assert_eq!(img.channels, if gray { 1 } else { 3 }, "{shown}");
            }
            (Err(OpError::Apply { op, width, height, .. }), Some(expected)) => assert_eq!((op, width, height), expected),
            (other, expected) => panic!("{shown} on {w}x{h}: {other:?}, expected a failure at {expected:?}"),
        }
    }
}

/// Seeds: the pipelines of the repository's worker configs, the module's own example, each
/// op once, and the malformed specs the unit tests name.
pub fn pipeline_syntax_seeds(repo: &Path) -> Vec<(String, Vec<u8>)> {
    let mut seeds: Vec<(String, Vec<u8>)> = Vec::new();
    for (name, text) in config_files(repo, "worker") {
        if let Ok(cfg) = config_file::from_toml_str::<WorkerConfig>(&String::from_utf8_lossy(&text)) {
            seeds.push((name, cfg.worker.pipeline.into_bytes()));
        }
    }
    for (i, spec) in [
        "resize:1280x720,grayscale,blur:1.5,sobel",
        "grayscale",
        "gray,sharpen",
        "blur:0.5",
        "rotate:90,rotate:180,rotate:270",
        "crop:3x2+1+1,resize:9x4",
        "resize:640x360, sobel ",
        "",
        "grayscale,blurr:2",
        "blur:-1",
        "rotate:45",
        "resize:0x10",
        "sobel:3",
        "crop:1,2",
    ]
    .into_iter()
    .enumerate()
    {
        seeds.push((format!("spec-{i}"), spec.as_bytes().to_vec()));
    }
    seeds
}

/// Byte scheme of `worker_config`: the bytes are the text of a `worker.toml` (UTF-8; invalid
/// sequences are replaced, lossily).
pub fn config_text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(data)
}

/// `worker_config`: [`config_file::from_toml_str`] into a [`WorkerConfig`], then
/// [`WorkerConfig::validate`] (the whole of `check-config` but the environment overrides).
/// Properties:
/// - no panic; every error displays;
/// - loading is deterministic: the same text loads and validates to the same config, or fails
///   validation with the same error (a load error: see `LOAD_ERRORS_ARE_DETERMINISTIC`);
/// - a config that validates can run: its pipeline parses and prints as a spec that parses
///   back to it, its limits are in range, and no output topic is an input topic.
pub fn worker_config(data: &[u8]) {
    let text = config_text(data);
    let load = || -> Result<Option<framelink_worker::config::Validated>, Failure> {
        let cfg: WorkerConfig = config_file::from_toml_str(&text).map_err(|e| Failure::Load(e.to_string()))?;
        if !kafka_files::reads_only_plain_files(&cfg.kafka) {
            return Ok(None);
        }
        cfg.validate().map(Some).map_err(|e| Failure::Validate(format!("{e:#}")))
    };
    let show = |r: &Result<Option<framelink_worker::config::Validated>, Failure>| match r {
        Ok(v) => format!("{v:?}"),
        Err(Failure::Load(_)) if !LOAD_ERRORS_ARE_DETERMINISTIC => "load error".into(),
        Err(Failure::Load(e)) => format!("load error: {e}"),
        Err(Failure::Validate(e)) => format!("invalid: {e}"),
    };
    let first = load();
    assert_eq!(show(&first), show(&load()), "loading twice");
    let Ok(Some(validated)) = first else { return };
    let cfg = &validated.config;
    let pipeline = cfg.worker.pipeline_ops().expect("a valid config's pipeline parses");
    assert_eq!(Pipeline::parse(&pipeline.to_string()).as_ref(), Ok(&pipeline));
    assert!((1..=100).contains(&cfg.worker.jpeg_quality));
    assert!(cfg.worker.max_pixels >= 1);
    assert!(!cfg.consumer.topics.is_empty());
    for topic in [&cfg.output.results_topic, &cfg.output.events_topic, &cfg.output.dlq_topic] {
        assert!(!topic.is_empty() && !cfg.consumer.topics.contains(topic), "{topic:?}");
    }
    assert!(!validated.kafka.brokers.is_empty());
}

/// Seeds: every worker config under `configs/` (the shipped example, the fleet's, the GPU
/// worker's, the demo's), and the smallest config that validates.
pub fn worker_config_seeds(repo: &Path) -> Vec<(String, Vec<u8>)> {
    let mut seeds = config_files(repo, "worker");
    seeds.push(("minimal".into(), b"[kafka]\nbrokers = \"127.0.0.1:9092\"\nsecurity_protocol = \"PLAINTEXT\"\n".to_vec()));
    seeds
}
