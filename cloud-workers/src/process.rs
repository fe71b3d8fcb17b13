//! One frame through the worker: headers → decode → ops → encode (+ motion), or the reason it
//! goes to the dead-letter topic. Pure of Kafka, so it is tested with plain bytes.

use framelink_common::wire::DeadLetterReason;
use std::time::{Duration, Instant};

use framelink_common::FrameMeta;
use framelink_common::wire::{self, header};

use crate::decode::{Decoder, encode};
use crate::gpu::stage::GpuClient;
use crate::motion::{MotionConfig, MotionDetector, MotionEvent};
use crate::ops::{Img, Pipeline};

/// Why a record goes to the dead-letter topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// The `framelink-error` header and the metric label.
    pub reason: DeadLetterReason,
    /// Human-readable detail (the `framelink-error-detail` header).
    pub detail: String,
}

/// A processed frame.
#[derive(Debug)]
pub struct Processed {
    /// Source metadata (from headers, or defaults for a plain JPEG).
    pub meta: FrameMeta,
    /// The encoded result, unless events-only.
    pub jpeg: Option<Vec<u8>>,
    pub width: u32,
    pub height: u32,
    pub event: Option<MotionEvent>,
    pub took: Duration,
    /// Time spent in each op, in pipeline order.
    pub op_times: Vec<(String, Duration)>,
    /// What each `detect:` op's model found, in pipeline order.
    pub models: Vec<ModelRun>,
    /// For a pipeline the DCT domain can do (`rotate`, `crop`, `grayscale`): whether this frame
    /// was transformed there, or why it took the pixel path.
    pub dct: Option<crate::lossless::Outcome>,
    /// How the frame was processed: `dct` (lossless transform, or the plain re-encode
    /// requantised in the DCT domain), `planes` (geometry or colour
    /// ops on the YUV planes), `region` (a leading crop's region decoded), `luma` (the Y plane decoded),
    /// `pixels` (decoded to RGB), `gpu` (the GPU backend ran the ops on RGB or luma),
    /// `gpu_planes` (the GPU backend ran colour ops on the YUV planes).
    pub path: &'static str,
}

/// One model's result on a frame; boxes in the source frame's pixels.
#[derive(Debug, Clone)]
pub struct ModelRun {
    pub model: String,
    pub version: String,
    pub family: &'static str,
    pub provider: &'static str,
    /// The source frame's size (what the boxes are in).
    pub frame: (u32, u32),
    /// The model run's wall time (its whole batch's) and the batch's size.
    pub took: Duration,
    pub batch: usize,
    pub detections: Vec<crate::infer::Detection>,
}

/// What the processor knows about a record besides its bytes.
pub struct RecordInfo<'a> {
    pub key: Option<&'a [u8]>,
    pub headers: Vec<(&'a str, Option<&'a [u8]>)>,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// Kafka timestamp, ms.
    pub timestamp_ms: Option<i64>,
}

pub struct Processor {
    pub pipeline: Pipeline,
    pub max_pixels: u64,
    pub quality: u8,
    pub events_only: bool,
    pub motion: MotionConfig,
    decoder: Decoder,
    detector: MotionDetector,
    /// The GPU stage, when the GPU backend runs the ops.
    gpu: Option<GpuClient>,
    /// The models of `detect:` ops.
    inference: Option<std::sync::Arc<crate::infer::Inference>>,
    /// The pipeline needs only the frame's luma: decode the Y plane alone ([`luma_first`]).
    luma_only: bool,
    /// The DCT-domain transform, for a pipeline of `rotate`, `crop` and `grayscale` only.
    lossless: Option<crate::lossless::Lossless>,
    /// Rotations and crops on the YUV planes, where the DCT domain cannot do them exactly.
    planes: Option<crate::planes::PlaneGeometry>,
    /// The plain re-encode (empty pipeline) in the DCT domain ([`crate::requantize`]).
    requantize: bool,
    /// Colour ops (and a plain re-encode) on the YUV planes (the ops on the GPU stage with
    /// the GPU backend; a plain re-encode on the CPU on both).
    plane_ops: Option<crate::plane_ops::PlaneOps>,
    /// Partial decodes of the region a leading `crop` keeps (CPU backend, no models).
    region: Option<crate::region::RegionDecoder>,
    /// Partitions the worker gave up: their cameras' motion state is dropped.
    revocations: Option<std::sync::Arc<crate::motion::Revocations>>,
    /// Tests: the next `process` panics, as a bug in an op would.
    #[cfg(test)]
    pub panic_next: bool,
}

fn reject(reason: DeadLetterReason, detail: impl Into<String>) -> Rejected {
    Rejected { reason, detail: detail.into() }
}

impl Processor {
    pub fn new(pipeline: Pipeline, max_pixels: u64, quality: u8, events_only: bool, motion: MotionConfig) -> Self {
        let lossless = crate::lossless::Lossless::new(&pipeline);
        let luma_only = luma_first(&pipeline);
        // Geometry on the planes (where something turns or crops; a crop decodes only the MCUs
        // under it); the RGB partial decode of a leading crop where the planes cannot take it.
        let planes = crate::planes::PlaneGeometry::new(&pipeline, quality).filter(|_| pipeline.0.iter().any(|op| matches!(op, crate::ops::Op::Rotate { .. } | crate::ops::Op::Crop { .. })));
        let region = matches!(pipeline.0.first(), Some(crate::ops::Op::Crop { .. })) && pipeline.models().is_empty();
        let region = region.then(crate::region::RegionDecoder::new);
        let plane_ops = crate::plane_ops::PlaneOps::new(&pipeline, quality);
        let requantize = pipeline.0.is_empty();
        Self { pipeline, max_pixels, quality, events_only, motion, decoder: Decoder::new(), detector: MotionDetector::default(),
            gpu: None,
            lossless,
            requantize,
            luma_only,
            planes,
            plane_ops,
            region,
            inference: None,
            revocations: None,
            #[cfg(test)]
            panic_next: false,
        }
    }

    /// Starts the per-thread state afresh (decoder and motion history), e.g. after a panic
    /// left it in an unknown state. The pipeline, limits and GPU stage are kept.
    pub fn reset(&mut self) {
        self.decoder = Decoder::new();
        self.detector = MotionDetector::default();
    }

    /// Decodes and encodes also where the DCT domain could transform or requantise the frame
    /// (`worker.dct_transforms = false`; the planes, region and luma paths stay).
    pub fn without_dct_transforms(mut self) -> Self {
        self.lossless = None;
        self.requantize = false;
        self
    }

    /// Colour ops and re-encodes on RGB with the RGB definitions, on either backend
    /// (`worker.plane_ops = false`).
    pub fn without_plane_ops(mut self) -> Self {
        self.plane_ops = None;
        self
    }

    /// Decode → ops → encode for every frame: no DCT-domain transform, no luma-only decode.
    /// What the fast paths are measured against (`cargo bench --bench worker_ops`).
    pub fn without_fast_paths(mut self) -> Self {
        self.lossless = None;
        self.requantize = false;
        self.luma_only = false;
        self.planes = None;
        self.plane_ops = None;
        self.region = None;
        self
    }

    /// Drops the motion state of cameras whose partition is revoked.
    pub fn with_revocations(mut self, r: std::sync::Arc<crate::motion::Revocations>) -> Self {
        self.revocations = Some(r);
        self
    }

    /// Runs the ops (and motion's small luma) on the GPU stage; a frame whose GPU batch fails
    /// is processed on the CPU instead.
    pub fn with_gpu(mut self, gpu: GpuClient) -> Self {
        self.gpu = Some(gpu);
        self
    }

    /// Runs `detect:` ops on their models.
    pub fn with_inference(mut self, inference: std::sync::Arc<crate::infer::Inference>) -> Self {
        self.inference = Some(inference);
        self
    }

    /// For a pipeline of `detect:` ops only: the smallest decode every model is content with.
    fn models_need(&self, h: &turbojpeg::DecompressHeader) -> Option<(u32, u32)> {
        let inference = self.inference.as_ref()?;
        let mut need = (0u32, 0u32);
        for op in &self.pipeline.0 {
            let crate::ops::Op::Detect { model } = op else { return None };
            let (w, h) = inference.client(model)?.spec.needs(h.width as u32, h.height as u32);
            need = (need.0.max(w), need.1.max(h));
        }
        Some(need)
    }

    /// The ops on the CPU, and the models of `detect:` ops (`frame`: the source frame's size,
    /// which boxes are mapped back to).
    /// `start`: the ops before it are done already (a leading crop by the partial decode).
    fn cpu_ops(&self, mut img: Img, frame: (u32, u32), start: usize, op_times: &mut Vec<(String, Duration)>, runs: &mut Vec<ModelRun>) -> Result<Img, Rejected> {
        let decoded = (img.width, img.height);
        for (k, op) in self.pipeline.0.iter().enumerate().skip(start) {
            let t = Instant::now();
            if let crate::ops::Op::Detect { model } = op {
                let failed = |e: String| reject(DeadLetterReason::ModelFailed, format!("detect:{model}: {e}"));
                let client = self.inference.as_ref().and_then(|i| i.client(model)).ok_or_else(|| failed("the model is not loaded".into()))?;
                let r = client.detect(&img).map_err(failed)?;
                if client.spec.cfg.draw {
                    crate::infer::draw::draw(&mut img, &r.detections);
                }
                let ops_before = &self.pipeline.0[..k];
                let detections = r
                    .detections
                    .into_iter()
                    .map(|mut d| {
                        d.bbox = d.bbox.map(|b| crate::infer::geometry::to_source(ops_before, decoded, frame, b));
                        d
                    })
                    .collect();
                let s = &client.spec;
                runs.push(ModelRun { model: s.name.clone(), version: s.version.clone(), family: s.cfg.family.as_str(), provider: s.provider.provider.as_str(), frame, took: r.took, batch: r.batch, detections });
            } else {
                img = crate::ops::apply_op(op, &img).map_err(|e| reject(DeadLetterReason::OpFailed, e.to_string()))?;
            }
            op_times.push((op.to_string(), t.elapsed()));
        }
        Ok(img)
    }

    /// The frame's metadata: from the contract headers; a record with none of them (a plain
    /// JPEG from another producer) gets defaults from its key, offset and timestamp.
    fn meta(&self, r: &RecordInfo<'_>, payload: &[u8]) -> Result<FrameMeta, Rejected> {
        let has_contract = r.headers.iter().any(|(k, _)| k.starts_with("framelink-"));
        if has_contract {
            let meta = FrameMeta::from_header_pairs(r.headers.iter().copied()).map_err(|e| reject(DeadLetterReason::BadHeaders, e.to_string()))?;
            let claimed = meta.width as u64 * meta.height as u64;
            if claimed > self.max_pixels {
                return Err(reject(DeadLetterReason::TooLarge, format!("headers claim {}x{} = {claimed} pixels, above the limit of {}", meta.width, meta.height, self.max_pixels)));
            }
            return Ok(meta);
        }
        let key = r.key.map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
        let (device, camera) = match key.split_once('/') {
            Some((d, c)) if !d.is_empty() && !c.is_empty() => (d.to_owned(), c.to_owned()),
            _ => (r.topic.to_owned(), format!("partition-{}", r.partition)),
        };
        let (device, camera) = (sanitize(&device), sanitize(&camera));
        let (w, h) = turbojpeg::read_header(payload).map(|h| (h.width as u32, h.height as u32)).unwrap_or((1, 1));
        Ok(FrameMeta {
            device_id: device,
            camera_id: camera,
            seq: r.offset.max(0) as u64,
            capture_ns: r.timestamp_ms.unwrap_or(0).max(0) as u64 * 1_000_000,
            width: w.max(1),
            height: h.max(1),
            pixel_format: "JPEG".into(),
            content_type: wire::CONTENT_TYPE_JPEG.into(),
            clock: Default::default(),
        })
    }

    pub fn process(&mut self, r: &RecordInfo<'_>, payload: Option<&[u8]>) -> Result<Processed, Rejected> {
        #[cfg(test)]
        if std::mem::take(&mut self.panic_next) {
            panic!("a bug in an op (test)");
        }
        let started = Instant::now();
        let payload = payload.unwrap_or_default();
        let meta = self.meta(r, payload)?;
        if meta.content_type != wire::CONTENT_TYPE_JPEG {
            return Err(reject(DeadLetterReason::UnsupportedContentType, format!("{} is {:?}, not image/jpeg", header::CONTENT_TYPE, meta.content_type)));
        }
        // Rotations, crops and grayscale in the DCT domain: no decode, no encode. Motion needs
        // the decoded image, and events-only publishes no image.
        // Where that is not exact, rotations and crops of a colour frame on its YUV planes.
        // The header once for every path below (the decode refuses a frame by it first anyway).
        let header = self.decoder.header(payload, self.max_pixels).map_err(|e| reject(e.reason(), e.to_string()))?;
        let mut dct = None;
        if (self.lossless.is_some() || self.planes.is_some()) && !self.motion.enabled && !self.events_only {
            let geometry = |jpeg: Vec<u8>, (width, height): (u32, u32), op: &str, t: Instant, dct| {
                let op_times = vec![(op.to_owned(), t.elapsed())];
                let path = if op == "dct_transform" { "dct" } else { "planes" };
                Processed { meta: meta.clone(), jpeg: Some(jpeg), width, height, event: None, took: started.elapsed(), op_times, models: Vec::new(), dct, path }
            };
            if let Some(l) = self.lossless.as_mut() {
                let t = Instant::now();
                match l.apply(payload, &header) {
                    Ok((jpeg, size)) => return Ok(geometry(jpeg, size, "dct_transform", t, Some(crate::lossless::Outcome::Transformed))),
                    Err(why) => dct = Some(why),
                }
            }
            if let Some(g) = self.planes.as_mut() {
                let t = Instant::now();
                // A crop alone on the CPU: the RGB partial decode below takes what the planes leave.
                let rgb_region = self.region.is_some() && self.gpu.is_none() && self.pipeline.0.iter().all(|op| matches!(op, crate::ops::Op::Crop { .. }));
                if let Some((jpeg, size)) = g.apply(payload, &header, rgb_region) {
                    return Ok(geometry(jpeg, size, "yuv_geometry", t, dct));
                }
            }
        }
        // A plain re-encode in the DCT domain: no decode, no encode (its own definition,
        // requantize.rs); frames it does not take go on to the planes. 4:2:0 and gray frames
        // only: their results keep that subsampling, which is what the other paths encode
        // (a 4:4:4 frame would stay 4:4:4, larger than the 4:2:0 result it gets there).
        let subsampled = matches!(header.subsamp, turbojpeg::Subsamp::Sub2x2 | turbojpeg::Subsamp::Gray);
        if self.requantize && subsampled && !self.motion.enabled && !self.events_only {
            let t = Instant::now();
            match crate::requantize::requantize(payload, self.quality) {
                Ok(jpeg) => {
                    let (width, height) = (header.width as u32, header.height as u32);
                    let op_times = vec![("dct_requantize".to_owned(), t.elapsed())];
                    return Ok(Processed { meta, jpeg: Some(jpeg), width, height, event: None, took: started.elapsed(), op_times, models: Vec::new(), dct: None, path: "dct" });
                }
                Err(why) => tracing::debug!(?why, "DCT-domain re-encode not taken; decoding the frame"),
            }
        }
        // Colour ops on the planes, on the CPU or on the GPU stage (the same definitions, bit
        // for bit). Models run on RGB, motion on the decoded frame.
        if let (Some(p), false, false) = (self.plane_ops.as_mut(), self.motion.enabled, self.events_only) {
            let mut op_times = Vec::with_capacity(self.pipeline.0.len());
            let mut path = "planes";
            let planes = match &self.gpu {
                // A plain re-encode has nothing for the GPU to do.
                Some(gpu) if !self.pipeline.0.is_empty() => {
                    let t = Instant::now();
                    match p.run_on_gpu(payload, &header, gpu) {
                        Ok(planes) => {
                            if planes.is_some() {
                                op_times.push(("gpu".to_owned(), t.elapsed()));
                                path = "gpu_planes";
                            }
                            planes
                        }
                        // As on the RGB path below: the frame is not at fault; processed on
                        // the CPU.
                        Err(why) => {
                            tracing::debug!(why, "GPU fallback");
                            p.prepare(payload, &header).map(|planes| p.run(planes, &mut op_times))
                        }
                    }
                }
                _ => p.prepare(payload, &header).map(|planes| p.run(planes, &mut op_times)),
            };
            if let Some((jpeg, (width, height))) = planes.and_then(|planes| p.finish(planes)) {
                return Ok(Processed { meta, jpeg: Some(jpeg), width, height, event: None, took: started.elapsed(), op_times, models: Vec::new(), dct, path });
            }
        }
        // Decode at a DCT scale when the pipeline starts by shrinking anyway — or when it only
        // runs models and publishes no image (events_only, no motion): at the largest size one
        // of its models needs.
        let at_least = match self.pipeline.0.first() {
            Some(crate::ops::Op::Resize { width, height }) => Some((*width, *height)),
            Some(crate::ops::Op::Detect { .. }) if self.events_only && !self.motion.enabled => self.models_need(&header),
            _ => None,
        };
        let mut op_times = Vec::with_capacity(self.pipeline.0.len());
        let mut runs = Vec::new();
        // A leading crop on the CPU backend: decode only its region (the crop is then done).
        let mut start = 0;
        let mut region_img = None;
        if let (Some(r), None, Some(&crate::ops::Op::Crop { x, y, width, height })) = (self.region.as_mut(), &self.gpu, self.pipeline.0.first()) {
            let t = Instant::now();
            match r.decode(payload, crate::lossless::Rect { x, y, width, height }, self.luma_only) {
                Ok(img) => {
                    op_times.push(("crop".to_owned(), t.elapsed()));
                    (start, region_img) = (1, Some(img));
                }
                // The whole decode below names what is wrong (or the crop does).
                Err(why) => tracing::debug!(why, "partial decode refused; decoding the whole frame"),
            }
        }
        let mut path = match (&region_img, self.luma_only) {
            (Some(_), _) => "region",
            (None, true) => "luma",
            (None, false) => "pixels",
        };
        let img = match region_img {
            Some(img) => img,
            None => self.decoder.decode_as(payload, self.max_pixels, at_least, self.luma_only).map_err(|e| reject(e.reason(), e.to_string()))?,
        };
        let frame = (header.width as u32, header.height as u32);
        let (img, small) = match &self.gpu {
            None => (self.cpu_ops(img, frame, start, &mut op_times, &mut runs)?, None),
            Some(gpu) => {
                let t = Instant::now();
                match gpu.process(img) {
                    Ok(out) => {
                        op_times.push(("gpu".to_owned(), t.elapsed()));
                        path = "gpu";
                        (out.img, out.small)
                    }
                    Err(why) => {
                        // The GPU stage failed this batch (and said why in the log): the
                        // frame is not at fault, so it is processed on the CPU.
                        tracing::debug!(why, "GPU fallback");
                        let img = self.decoder.decode_as(payload, self.max_pixels, at_least, self.luma_only).map_err(|e| reject(e.reason(), e.to_string()))?;
                        (self.cpu_ops(img, frame, 0, &mut op_times, &mut runs)?, None)
                    }
                }
            }
        };
        if let Some(r) = &self.revocations {
            self.detector.apply_revocations(r);
        }
        let partition = Some((r.topic, r.partition));
        let now = Instant::now();
        let event = match (self.motion.enabled, small) {
            (false, _) => None,
            (true, Some((small, f))) => self.detector.update_at(&meta.key(), partition, small, f, (img.width, img.height), &self.motion, now),
            (true, None) => {
                let (small, f) = crate::motion::small_luma(&img);
                self.detector.update_at(&meta.key(), partition, small, f, (img.width, img.height), &self.motion, now)
            }
        };
        let jpeg = if self.events_only { None } else { Some(encode(&img, self.quality).map_err(|e| reject(DeadLetterReason::EncodeFailed, e.to_string()))?) };
        Ok(Processed { meta, jpeg, width: img.width, height: img.height, event, took: started.elapsed(), op_times, models: runs, dct, path })
    }
}

/// Whether the pipeline turns the frame into luma (`grayscale`, `sobel`) before anything that
/// needs colour: only `rotate`, `crop` and `resize` come first, which act on every channel
/// alike. Such a pipeline decodes the JPEG's own luma (Y) plane, so for JPEG frames
/// `grayscale` *is* the encoder's luma, not BT.601 recomputed from the decoded RGB (they differ
/// by rounding; docs/worker.md) — on the CPU and the GPU backend alike, which get the same
/// one-channel image.
pub fn luma_first(pipeline: &Pipeline) -> bool {
    use crate::ops::Op;
    for op in &pipeline.0 {
        match op {
            Op::Grayscale | Op::Sobel => return true,
            Op::Rotate { .. } | Op::Crop { .. } | Op::Resize { .. } => {}
            _ => return false,
        }
    }
    false
}

/// Key parts from foreign producers, made acceptable as ids.
fn sanitize(s: &str) -> String {
    let t: String = s.chars().filter(|c| !c.is_control() && *c != '/').take(wire::MAX_ID_LEN).collect();
    if t.is_empty() { "unknown".into() } else { t }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rocket() -> Vec<u8> {
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/images/rocket.jpg")).unwrap()
    }

    fn meta(w: u32, h: u32) -> FrameMeta {
        FrameMeta {
            device_id: "d".into(),
            camera_id: "c".into(),
            seq: 3,
            capture_ns: 1,
            width: w,
            height: h,
            pixel_format: "YUYV".into(),
            content_type: "image/jpeg".into(),
            clock: Default::default(),
        }
    }

    fn info<'a>(headers: &'a [(&'static str, String)]) -> RecordInfo<'a> {
        RecordInfo {
            key: Some(b"d/c"),
            headers: headers.iter().map(|(k, v)| (*k, Some(v.as_bytes()))).collect(),
            topic: "frames",
            partition: 0,
            offset: 42,
            timestamp_ms: Some(1_700_000_000_000),
        }
    }

    fn processor(spec: &str) -> Processor {
        Processor::new(Pipeline::parse(spec).unwrap(), 50_000_000, 85, false, MotionConfig::default())
    }

    #[test]
    fn a_frame_is_processed_with_its_headers() {
        let jpeg = rocket();
        let h = turbojpeg::read_header(&jpeg).unwrap();
        let headers = meta(h.width as u32, h.height as u32).to_header_pairs();
        let out = processor("resize:320x240,grayscale").process(&info(&headers), Some(&jpeg)).unwrap();
        assert_eq!((out.width, out.height), (320, 240));
        assert_eq!(out.meta.seq, 3);
        assert_eq!(out.op_times.len(), 2);
        let back = turbojpeg::read_header(out.jpeg.as_ref().unwrap()).unwrap();
        assert_eq!((back.width, back.height), (320, 240));
    }

    #[test]
    fn a_plain_jpeg_without_headers_gets_defaults() {
        let jpeg = rocket();
        let out = processor("grayscale").process(&info(&[]), Some(&jpeg)).unwrap();
        assert_eq!((out.meta.device_id.as_str(), out.meta.camera_id.as_str(), out.meta.seq), ("d", "c", 42));
        assert_eq!(out.meta.capture_ns, 1_700_000_000_000 * 1_000_000);
    }

    #[test]
    fn rotations_crops_and_grayscale_skip_the_codec_where_exact() {
        let jpeg = rocket();
        let h = turbojpeg::read_header(&jpeg).unwrap();
        let (w, hh) = (h.width as u32, h.height as u32);
        let (mw, mh) = (h.subsamp.mcu_width() as u32, h.subsamp.mcu_height() as u32);
        // A crop on the MCU grid, then a quarter turn of a height made of whole MCUs.
        let spec = format!("crop:{}x{}+{mw}+{mh},rotate:90,grayscale", w - 2 * mw, (hh / mh - 2) * mh);
        let out = processor(&spec).process(&info(&[]), Some(&jpeg)).unwrap();
        assert_eq!((out.dct, out.path), (Some(crate::lossless::Outcome::Transformed), "dct"));
        assert_eq!(out.op_times.iter().map(|(op, _)| op.as_str()).collect::<Vec<_>>(), ["dct_transform"]);
        let got = turbojpeg::read_header(out.jpeg.as_ref().unwrap()).unwrap();
        assert_eq!((got.width as u32, got.height as u32), ((hh / mh - 2) * mh, w - 2 * mw));
        assert_eq!((out.width, out.height), ((hh / mh - 2) * mh, w - 2 * mw));
        assert_eq!(got.subsamp, turbojpeg::Subsamp::Gray);
        // The same pipeline on pixels gives the same size; its luma agrees within one level
        // (lossless.rs tests the pixels in depth).
        let pixels = processor(&spec).without_dct_transforms().process(&info(&[]), Some(&jpeg)).unwrap();
        assert_eq!((pixels.width, pixels.height, pixels.path), (out.width, out.height, "region"));
        // Off the MCU grid (on the chroma grid of this 4:4:4 frame): the planes of the MCUs
        // under the crop, with the reason the DCT domain did not take it.
        let off = processor(&format!("crop:100x100+{}+0", mw + 1)).process(&info(&[]), Some(&jpeg)).unwrap();
        assert_eq!(off.dct, Some(crate::lossless::Outcome::OffGrid));
        assert_eq!((off.width, off.height), (100, 100));
        assert_eq!((off.op_times[0].0.as_str(), off.path), ("yuv_geometry", "planes"));
        // Turned, off the MCU grid but on the chroma grid: the YUV planes.
        let planes = processor(&format!("crop:100x100+{}+2,rotate:90", mw + 2)).process(&info(&[]), Some(&jpeg)).unwrap();
        assert_eq!(planes.dct, Some(crate::lossless::Outcome::OffGrid));
        assert_eq!(planes.op_times.iter().map(|(op, _)| op.as_str()).collect::<Vec<_>>(), ["yuv_geometry"]);
        assert_eq!(planes.path, "planes");
        assert_eq!((planes.width, planes.height), (100, 100));
        // Motion needs the decoded frame.
        let mut p = Processor::new(Pipeline::parse("grayscale").unwrap(), 50_000_000, 85, false, MotionConfig { enabled: true, ..Default::default() });
        assert_eq!(p.process(&info(&[]), Some(&jpeg)).unwrap().dct, None);
    }

    #[test]
    fn a_leading_crop_decodes_its_region_only_with_the_same_result() {
        let jpeg = rocket();
        // A 4:2:0 frame: a crop at an odd x is off its chroma grid, which the planes refuse.
        let jpeg420 = encode(&Decoder::new().decode(&jpeg, u64::MAX, None).unwrap(), 85).unwrap();
        assert_eq!(turbojpeg::read_header(&jpeg420).unwrap().subsamp, turbojpeg::Subsamp::Sub2x2);
        for (jpeg, spec) in [(&jpeg, "crop:301x203+37+11,blur:1"), (&jpeg420, "crop:300x200+5+7"), (&jpeg, "crop:64x64+16+16,sharpen")] {
            let fast = processor(spec).process(&info(&[]), Some(jpeg)).unwrap();
            assert_eq!((fast.op_times[0].0.as_str(), fast.path), ("crop", "region"), "{spec}");
            let pixels = processor(spec).without_fast_paths().process(&info(&[]), Some(jpeg)).unwrap();
            assert!(fast.jpeg == pixels.jpeg, "{spec}: the partial decode gives the very same bytes");
        }
        // A frame cut short below a crop at its top is refused (a dead letter naming it) on
        // every path a crop takes: the DCT domain (+16+16), the planes (+18+16), the RGB
        // partial decode (+17+16, and before a colour op).
        let cut = &jpeg420[..jpeg420.len() * 3 / 4];
        for spec in ["crop:64x32+16+16", "crop:64x32+18+16", "crop:64x32+17+16", "crop:64x32+18+16,blur:1"] {
            assert!(processor(spec).process(&info(&[]), Some(&jpeg420)).is_ok(), "{spec}: the whole frame");
            assert!(processor(spec).process(&info(&[]), Some(cut)).is_err(), "{spec}: a frame cut short below the crop");
        }
        // With luma: the region of the luma plane.
        let y = turbojpeg::decompress(&jpeg, turbojpeg::PixelFormat::GRAY).unwrap();
        let y = Img::new(y.width as u32, y.height as u32, 1, y.pixels);
        let fast = processor("crop:64x64+19+16,sobel").process(&info(&[]), Some(&jpeg)).unwrap();
        assert_eq!(fast.jpeg.unwrap(), encode(&crate::ops::sobel(&crate::ops::crop(&y, 19, 16, 64, 64)), 85).unwrap());
        // A crop on the chroma grid: the YUV planes of the MCUs under it, the crop's samples
        // moved (planes.rs tests them sample for sample against the whole frame's planes); the
        // same size as the RGB partial decode's, and the same picture up to the codec's rounding.
        let h = turbojpeg::read_header(&jpeg).unwrap();
        let big = format!("crop:{}x{}+2+3", h.width - 6, h.height - 5);
        let planes = processor(&big).process(&info(&[]), Some(&jpeg)).unwrap();
        assert_eq!((planes.path, planes.op_times[0].0.as_str()), ("planes", "yuv_geometry"));
        let mut no_planes = processor(&big);
        no_planes.planes = None;
        let region = no_planes.process(&info(&[]), Some(&jpeg)).unwrap();
        assert_eq!((region.path, region.width, region.height), ("region", planes.width, planes.height));
        let src = turbojpeg::decompress(&jpeg, turbojpeg::PixelFormat::RGB).unwrap();
        let src = crate::ops::crop(&Img::new(src.width as u32, src.height as u32, 3, src.pixels), 2, 3, planes.width, planes.height);
        let off = |p: &Processed| {
            let d = turbojpeg::decompress(p.jpeg.as_ref().unwrap(), turbojpeg::PixelFormat::RGB).unwrap().pixels;
            d.iter().zip(&src.data).map(|(x, y)| x.abs_diff(*y) as f64).sum::<f64>() / d.len() as f64
        };
        // Both re-encode the source's crop; the planes (4:4:4 kept, no colour conversion) stay
        // closer to it than the RGB partial decode (encoded at 4:2:0).
        assert!(off(&planes) < off(&region) && off(&region) < 4.0, "planes {:.2} vs region {:.2} levels off", off(&planes), off(&region));
        // Half the frame or less too (the planes used to decode the whole frame, and such crops
        // took the partial decode).
        let half = format!("crop:{}x{}+2+3", h.width / 2, h.height - 3);
        assert_eq!(processor(&half).process(&info(&[]), Some(&jpeg)).unwrap().path, "planes");
        // Outside the frame: the op names it, as before.
        let e = processor("crop:100x100+100000+0,blur:1").process(&info(&[]), Some(&jpeg)).unwrap_err();
        assert_eq!(e.reason, DeadLetterReason::OpFailed, "{}", e.detail);
    }

    #[test]
    fn colour_ops_run_on_the_yuv_planes_on_the_cpu_backend() {
        // rocket.jpg is 4:4:4: such frames take the RGB path (their results stay 4:2:0)...
        let out = processor("blur:1").process(&info(&[]), Some(&rocket())).unwrap();
        assert_eq!(out.path, "pixels");
        // (Its plain re-encode too: the DCT domain would keep 4:4:4, larger than the 4:2:0
        // result every other path gives it.)
        let out = processor("").process(&info(&[]), Some(&rocket())).unwrap();
        assert_eq!((out.path, turbojpeg::read_header(out.jpeg.as_ref().unwrap()).unwrap().subsamp), ("pixels", turbojpeg::Subsamp::Sub2x2));
        assert_eq!(turbojpeg::read_header(out.jpeg.as_ref().unwrap()).unwrap().subsamp, turbojpeg::Subsamp::Sub2x2);
        // ...4:2:0 ones the planes.
        let rgb = turbojpeg::decompress(&rocket(), turbojpeg::PixelFormat::RGB).unwrap();
        let jpeg = turbojpeg::compress(rgb.as_deref(), 90, turbojpeg::Subsamp::Sub2x2).unwrap().to_vec();
        for spec in ["blur:1.5", "sharpen", "", "rotate:270,blur:1"] {
            // (The plain re-encode is requantised in the DCT domain unless that is off: below.)
            let out = processor(spec).without_dct_transforms().process(&info(&[]), Some(&jpeg)).unwrap();
            assert_eq!(out.path, "planes", "`{spec}`");
            let ops: Vec<String> = Pipeline::parse(spec).unwrap().0.iter().map(|op| op.to_string()).collect();
            assert_eq!(out.op_times.iter().map(|(op, _)| op.clone()).collect::<Vec<_>>(), ops, "`{spec}`: a time per op");
            let pixels = processor(spec).without_fast_paths().process(&info(&[]), Some(&jpeg)).unwrap();
            assert_eq!((pixels.path, pixels.width, pixels.height), ("pixels", out.width, out.height), "`{spec}`");
            // plane_ops.rs tests the planes against their definitions; here the results agree:
            // closely in luma, less where `sharpen` keeps the chroma that RGB sharpens.
            if spec.is_empty() {
                // A re-encode: the planes path skips a chroma upsampling, two colour conversions
                // and a downsampling, so it stays closer to the source than the RGB path.
                let src = turbojpeg::decompress(&jpeg, turbojpeg::PixelFormat::RGB).unwrap();
                let off = |out: &Processed| {
                    let d = turbojpeg::decompress(out.jpeg.as_ref().unwrap(), turbojpeg::PixelFormat::RGB).unwrap();
                    d.pixels.iter().zip(&src.pixels).map(|(x, y)| x.abs_diff(*y) as f64).sum::<f64>() / d.pixels.len() as f64
                };
                let (planes, through_rgb) = (off(&out), off(&pixels));
                assert!(planes < through_rgb && planes < 3.0, "re-encoded: {planes:.2} levels from the source on the planes, {through_rgb:.2} through RGB");
                // Requantised in the DCT domain (the default): as close to the source as the
                // planes (within 5 %: a coarser table rounds either way), nothing decoded.
                let dct = processor(spec).process(&info(&[]), Some(&jpeg)).unwrap();
                assert_eq!((dct.path, dct.width, dct.height, dct.op_times[0].0.as_str()), ("dct", out.width, out.height, "dct_requantize"));
                assert!(off(&dct) < planes * 1.05, "requantised: {:.2} levels from the source, {planes:.2} on the planes", off(&dct));
                // A frame it does not take (progressive) goes to the planes.
                let mut c = turbojpeg::Compressor::new().unwrap();
                c.set_progressive(true).unwrap();
                c.set_subsamp(turbojpeg::Subsamp::Sub2x2).unwrap();
                let progressive = c.compress_to_vec(rgb.as_deref()).unwrap();
                assert_eq!(processor(spec).process(&info(&[]), Some(&progressive)).unwrap().path, "planes");
                continue;
            }
            let sharpen = spec == "sharpen";
            for (format, bound) in [(turbojpeg::PixelFormat::GRAY, if sharpen { 2.0 } else { 1.0 }), (turbojpeg::PixelFormat::RGB, if sharpen { 5.0 } else { 2.0 })] {
                let a = turbojpeg::decompress(out.jpeg.as_ref().unwrap(), format).unwrap();
                let b = turbojpeg::decompress(pixels.jpeg.as_ref().unwrap(), format).unwrap();
                let mean = a.pixels.iter().zip(&b.pixels).map(|(x, y)| x.abs_diff(*y) as f64).sum::<f64>() / a.pixels.len() as f64;
                assert!(mean < bound, "`{spec}` {format:?}: {mean:.2} levels apart on average");
            }
        }
        // `worker.plane_ops = false`: the RGB definitions.
        assert_eq!(processor("blur:1").without_plane_ops().process(&info(&[]), Some(&jpeg)).unwrap().path, "pixels");
        // Motion needs the decoded frame; events-only publishes no image.
        let mut p = Processor::new(Pipeline::parse("blur:1").unwrap(), 50_000_000, 85, false, MotionConfig { enabled: true, ..Default::default() });
        assert_eq!(p.process(&info(&[]), Some(&jpeg)).unwrap().path, "pixels");
        let mut p = Processor::new(Pipeline::parse("blur:1").unwrap(), 50_000_000, 85, true, MotionConfig::default());
        assert_eq!(p.process(&info(&[]), Some(&jpeg)).unwrap().path, "pixels");
    }

    #[test]
    fn luma_pipelines_decode_the_luma_plane_only() {
        let yes = |spec: &str| luma_first(&Pipeline::parse(spec).unwrap());
        assert!(yes("grayscale") && yes("sobel") && yes("resize:640x360,crop:100x100+3+5,rotate:90,sobel,blur:1"));
        assert!(!yes("blur:1,grayscale") && !yes("rotate:90") && !yes("sharpen,sobel") && !yes(""));
        // sobel on the decoded Y plane, encoded: the same bytes as the worker's result.
        let jpeg = rocket();
        let y = turbojpeg::decompress(&jpeg, turbojpeg::PixelFormat::GRAY).unwrap();
        let y = Img::new(y.width as u32, y.height as u32, 1, y.pixels);
        let out = processor("sobel").process(&info(&[]), Some(&jpeg)).unwrap();
        assert_eq!(out.path, "luma");
        assert_eq!(out.jpeg.unwrap(), encode(&crate::ops::sobel(&y), 85).unwrap());
    }

    #[test]
    fn bad_records_are_rejected_with_a_reason() {
        let jpeg = rocket();
        let good = meta(100, 100).to_header_pairs();
        let mut p = processor("grayscale");
        type Case = (&'static str, Vec<u8>, Vec<(&'static str, String)>);
        let cases: Vec<Case> = vec![
            ("empty", vec![], good.clone()),
            ("not_jpeg", b"hello, not an image".to_vec(), good.clone()),
            ("corrupt_jpeg", jpeg[..jpeg.len() / 2].to_vec(), good.clone()),
            ("too_large", jpeg.clone(), meta(60000, 60000).to_header_pairs()),
            ("bad_headers", jpeg.clone(), good.iter().map(|(k, v)| (*k, if *k == header::SEQ { "x".into() } else { v.clone() })).collect()),
            ("bad_headers", jpeg.clone(), good.iter().filter(|(k, _)| *k != header::CAMERA).cloned().collect()),
        ];
        // The same reasons whether the pipeline transforms in the DCT domain or on pixels.
        let mut pixels = processor("blur:1");
        for (reason, payload, headers) in cases {
            for p in [&mut p, &mut pixels] {
                let e = p.process(&info(&headers), Some(&payload)).unwrap_err();
                assert_eq!(e.reason.as_str(), reason, "{}", e.detail);
                assert!(!e.detail.is_empty());
            }
        }
    }
}
