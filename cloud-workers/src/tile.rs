//! Tiles of large-image jobs (`framelink-console`'s `/api/jobs`): a tile record carries raw
//! pixels of a region of the source image plus a halo, and the tile's own pipeline (see
//! `framelink_common::tiling`); the worker runs that pipeline with the same ops as frames, keeps
//! only the tile's core and publishes it, raw (lossless), to the tile-results topic. A tile that
//! cannot be processed is dead-lettered like a frame **and** reported on the tile-results topic
//! (empty payload, `framelink-error` headers), so the job's status names the tile and reason.
//!
//! Tiles come through the same consumer group, processing threads, at-least-once /
//! exactly-once machinery and dead-letter rules as frames; a record is a tile when it comes from
//! `tiles.topic`. Tiles run on the CPU backend.

use std::time::{Duration, Instant};

use framelink_common::tile_wire::{TileMeta, tile_header};
use framelink_common::tiling::Rect;
use framelink_common::wire::{DeadLetterReason, dead_letter_header, result_header};
use rdkafka::message::{Header, OwnedHeaders};
use serde::Deserialize;

use crate::ops::{Apply, Img, Pipeline, crop};
use crate::process::{RecordInfo, Rejected};

/// `[tiles]`: large-image jobs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TilesConfig {
    /// Also consume `topic` (the console's tiles) and process large-image tiles. Default false.
    #[serde(default)]
    pub enabled: bool,
    /// Tiles to process. Default `framelink.tiles`.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Where processed tiles go. Default `framelink.tiles.results`.
    #[serde(default = "default_results")]
    pub results_topic: String,
    /// The jobs' state (read to skip the tiles of cancelled and expired jobs). Default
    /// `framelink.jobs`.
    #[serde(default = "default_jobs")]
    pub jobs_topic: String,
}

fn default_topic() -> String {
    framelink_common::wire::defaults::TILES_TOPIC.into()
}
fn default_results() -> String {
    framelink_common::wire::defaults::TILE_RESULTS_TOPIC.into()
}
fn default_jobs() -> String {
    framelink_common::wire::defaults::JOBS_TOPIC.into()
}

impl Default for TilesConfig {
    fn default() -> Self {
        framelink_common::config_file::from_toml_str("").expect("defaults")
    }
}

/// A processed tile: its core's pixels.
#[derive(Debug)]
pub struct TileDone {
    pub meta: TileMeta,
    pub core: Img,
    pub took: Duration,
}

fn reject(reason: DeadLetterReason, detail: impl Into<String>) -> Rejected {
    Rejected { reason, detail: detail.into() }
}

/// Runs a tile record: headers checked, pixels checked against them, the tile's pipeline, the
/// core cut out.
pub fn process_tile(r: &RecordInfo<'_>, payload: Option<&[u8]>, max_pixels: u64) -> Result<TileDone, Rejected> {
    let started = Instant::now();
    let meta = TileMeta::from_header_pairs(r.headers.iter().copied()).map_err(|e| reject(DeadLetterReason::BadHeaders, e.to_string()))?;
    let pixels = meta.region.w as u64 * meta.region.h as u64;
    if pixels > max_pixels {
        return Err(reject(DeadLetterReason::TooLarge, format!("tile region {} is {pixels} pixels, above the limit of {max_pixels}", meta.region)));
    }
    let payload = payload.unwrap_or_default();
    if payload.is_empty() {
        return Err(reject(DeadLetterReason::Empty, "the tile has no pixels"));
    }
    if payload.len() as u64 != meta.payload_len() {
        return Err(reject(DeadLetterReason::BadHeaders, format!("the tile is {} bytes; {} {} x {} channels is {}", payload.len(), tile_header::REGION, meta.region, meta.channels, meta.payload_len())));
    }
    let pipeline = Pipeline::parse(&meta.pipeline).map_err(|e| reject(DeadLetterReason::BadHeaders, e.to_string()))?;
    // Only what the console plans: no resize (it could ask for any size), crops inside.
    framelink_common::tiling::check(&pipeline, meta.region.w, meta.region.h).map_err(|e| reject(DeadLetterReason::BadHeaders, format!("{}: {e}", tile_header::PIPELINE)))?;
    let img = Img::new(meta.region.w, meta.region.h, meta.channels, payload.to_vec());
    let out = pipeline.apply(img).map_err(|e| reject(DeadLetterReason::OpFailed, e.to_string()))?;
    let core = cut_core(&out, meta.core_offset, meta.core).map_err(|e| reject(DeadLetterReason::BadHeaders, e))?;
    Ok(TileDone { meta, core, took: started.elapsed() })
}

/// The core (`core.w`×`core.h` at `offset`) of a processed tile.
pub fn cut_core(out: &Img, offset: (u32, u32), core: Rect) -> Result<Img, String> {
    if offset.0 as u64 + core.w as u64 > out.width as u64 || offset.1 as u64 + core.h as u64 > out.height as u64 {
        return Err(format!("{} {},{} with {} {}x{} is outside the processed tile ({}x{})", tile_header::CORE_OFFSET, offset.0, offset.1, tile_header::CORE, core.w, core.h, out.width, out.height));
    }
    if (offset, core.w, core.h) == ((0, 0), out.width, out.height) {
        return Ok(out.clone());
    }
    Ok(crop(out, offset.0, offset.1, core.w, core.h))
}

/// Headers a tile result repeats from its tile (the console files the result by them).
const ECHOED: [&str; 3] = [tile_header::JOB, tile_header::TILE, tile_header::GRID];

fn echoed(headers: &[(String, Option<Vec<u8>>)]) -> OwnedHeaders {
    let mut out = OwnedHeaders::new();
    for (k, v) in headers {
        if ECHOED.contains(&k.as_str()) {
            out = out.insert(Header { key: k, value: v.as_deref() });
        }
    }
    out
}

/// The tile-result record of a processed tile: the core's raw pixels.
pub fn result_headers(headers: &[(String, Option<Vec<u8>>)], done: &TileDone, worker: &str) -> OwnedHeaders {
    let core = Rect::new(done.meta.core.x, done.meta.core.y, done.core.width, done.core.height);
    let pairs = [
        (tile_header::CONTENT_TYPE, framelink_common::tile_wire::CONTENT_TYPE_PIXELS.to_owned()),
        (tile_header::CORE, core.to_string()),
        (tile_header::CHANNELS, done.core.channels.to_string()),
        (result_header::WORKER, worker.to_owned()),
        (result_header::PROCESSING_US, done.took.as_micros().to_string()),
    ];
    let mut h = echoed(headers);
    for (k, v) in &pairs {
        h = h.insert(Header { key: k, value: Some(v.as_bytes()) });
    }
    h
}

/// The tile-result record of a tile that failed: no pixels, the reason.
pub fn failure_headers(headers: &[(String, Option<Vec<u8>>)], reason: DeadLetterReason, detail: &str, worker: &str) -> OwnedHeaders {
    let mut h = echoed(headers);
    for (k, v) in [(dead_letter_header::ERROR, reason.as_str()), (dead_letter_header::ERROR_DETAIL, detail), (result_header::WORKER, worker)] {
        h = h.insert(Header { key: k, value: Some(v.as_bytes()) });
    }
    h
}

/// The failure report (empty value, `output_refused`) of a tile whose result Kafka refused.
pub fn failure_report(job: &crate::publish::Job, error: &str, p: &crate::publish::Publishing) -> crate::publish::OutRecord {
    let detail = format!("topic {} refused the tile's result: {error}", p.tiles.results_topic);
    crate::publish::OutRecord {
        topic: p.tiles.results_topic.clone(),
        kind: crate::publish::OutputKind::Result,
        key: job.key.clone(),
        payload: Vec::new(),
        headers: failure_headers(&job.headers, DeadLetterReason::OutputRefused, &detail, &p.worker),
    }
}

/// Whether `r` is a tile result (`Some(true)` a processed core, `Some(false)` a failure report).
pub fn tile_result_kind(r: &crate::publish::OutRecord, p: &crate::publish::Publishing) -> Option<bool> {
    (p.tiles.enabled && r.topic == p.tiles.results_topic).then_some(!r.payload.is_empty())
}

/// The job a tile belongs to, from its headers.
pub fn job_of(headers: &[(String, Option<Vec<u8>>)]) -> Option<&str> {
    headers.iter().find(|(k, _)| k == tile_header::JOB).and_then(|(_, v)| v.as_deref()).and_then(|v| std::str::from_utf8(v).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use framelink_common::tiling::plan;

    fn photo(name: &str) -> Img {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/images").join(name);
        if name.ends_with(".jpg") {
            return crate::decode::Decoder::new().decode(&std::fs::read(&p).unwrap(), u64::MAX, None).unwrap();
        }
        let img = image::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).into_rgb8();
        let (w, h) = img.dimensions();
        Img::new(w, h, 3, img.into_raw())
    }

    fn region(img: &Img, r: Rect) -> Vec<u8> {
        crop(img, r.x, r.y, r.w, r.h).data
    }

    /// Tiles `img` under `spec` at `tile`, runs every tile as a worker does (through the tile
    /// record's headers and `process_tile`) and stitches the cores.
    fn tiled(img: &Img, spec: &str, tile: u32) -> Img {
        let pipeline = Pipeline::parse(spec).unwrap();
        let plan = plan(&pipeline, img.width, img.height, img.channels, tile).unwrap();
        let ch = plan.out_channels as usize;
        let mut out = vec![0u8; plan.out_width as usize * plan.out_height as usize * ch];
        for t in &plan.tiles {
            let meta = TileMeta::of("job", &plan, t, img.channels);
            let pairs = meta.to_header_pairs();
            let info = RecordInfo { key: None, headers: pairs.iter().map(|(k, v)| (*k, Some(v.as_bytes()))).collect(), topic: "tiles", partition: 0, offset: 0, timestamp_ms: None };
            let done = process_tile(&info, Some(&region(img, t.region)), u64::MAX).unwrap_or_else(|e| panic!("{spec} tile {}: {e:?}", t.index));
            assert_eq!((done.core.width, done.core.height, done.core.channels as usize), (t.core.w, t.core.h, ch));
            for y in 0..t.core.h as usize {
                let dst = ((t.core.y as usize + y) * plan.out_width as usize + t.core.x as usize) * ch;
                let src = y * t.core.w as usize * ch;
                out[dst..dst + t.core.w as usize * ch].copy_from_slice(&done.core.data[src..src + t.core.w as usize * ch]);
            }
        }
        Img::new(plan.out_width, plan.out_height, plan.out_channels, out)
    }

    /// The whole point: a tiled run equals the whole-image run, bit for bit, for every op that
    /// can be tiled and chains of them, at odd tile sizes that cut through everything.
    #[test]
    fn stitched_tiles_equal_the_whole_image_bit_for_bit() {
        let photos = [photo("coffee.png"), photo("rocket.jpg")];
        let specs = [
            "",
            "grayscale",
            "blur:0.5",
            "blur:1.5",
            "blur:4",
            "sobel",
            "sharpen",
            "rotate:90",
            "rotate:180",
            "rotate:270",
            "crop:301x177+33+41",
            "blur:1.5,sobel",
            "sharpen,blur:1,grayscale,sharpen",
            "rotate:90,blur:2,crop:150x333+7+21,sobel",
            "crop:400x300+101+55,sharpen,rotate:270,blur:0.8",
            "grayscale,rotate:180,sharpen,rotate:90,blur:3",
        ];
        for img in &photos {
            for spec in specs {
                let whole = Pipeline::parse(spec).unwrap().apply(img.clone()).unwrap();
                for tile in [37, 128, 211] {
                    let t = tiled(img, spec, tile);
                    assert!(t == whole, "{spec:?} at tile {tile} on a {}x{} photo differs from the whole-image run", img.width, img.height);
                }
            }
        }
    }

    /// Without the halo the seams show: the check above can fail.
    #[test]
    fn tiles_without_a_halo_would_differ() {
        let img = photo("coffee.png");
        let whole = Pipeline::parse("blur:2").unwrap().apply(img.clone()).unwrap();
        let mut seamed = whole.clone();
        let core = Rect::new(0, 0, 100, 100);
        let alone = Pipeline::parse("blur:2").unwrap().apply(crop(&img, 0, 0, 100, 100)).unwrap();
        for y in 0..core.h as usize {
            let d = y * img.width as usize * 3;
            seamed.data[d..d + 300].copy_from_slice(&alone.data[y * 300..y * 300 + 300]);
        }
        assert_ne!(seamed, whole);
    }

    #[test]
    fn bad_tiles_are_rejected_with_a_reason() {
        let img = photo("coffee.png");
        let p = plan(&Pipeline::parse("sobel").unwrap(), img.width, img.height, 3, 128).unwrap();
        let meta = TileMeta::of("j", &p, &p.tiles[0], 3);
        let pairs = meta.to_header_pairs();
        let info = RecordInfo { key: None, headers: pairs.iter().map(|(k, v)| (*k, Some(v.as_bytes()))).collect(), topic: "tiles", partition: 0, offset: 0, timestamp_ms: None };
        let px = region(&img, p.tiles[0].region);
        assert_eq!(process_tile(&info, Some(&px[1..]), u64::MAX).unwrap_err().reason, DeadLetterReason::BadHeaders);
        assert_eq!(process_tile(&info, None, u64::MAX).unwrap_err().reason, DeadLetterReason::Empty);
        let e = process_tile(&info, Some(&px), 100).unwrap_err();
        assert_eq!(e.reason, DeadLetterReason::TooLarge);
        assert!(e.detail.contains("above the limit of 100"), "{}", e.detail);
        let mut bad = pairs.clone();
        bad.retain(|(k, _)| *k != tile_header::HALO);
        let info = RecordInfo { key: None, headers: bad.iter().map(|(k, v)| (*k, Some(v.as_bytes()))).collect(), topic: "tiles", partition: 0, offset: 0, timestamp_ms: None };
        let e = process_tile(&info, Some(&px), u64::MAX).unwrap_err();
        assert!(e.detail.contains("framelink-tile-halo: missing"), "{}", e.detail);
    }
}
