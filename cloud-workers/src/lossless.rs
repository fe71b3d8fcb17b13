//! Pipelines of `rotate`, `crop` and `grayscale` done in the DCT domain: libjpeg-turbo's
//! lossless transform (`tj3Transform`) moves, transposes and drops the JPEG's 8×8 coefficient
//! blocks and rewrites only the entropy coding — no IDCT, no colour conversion, no FDCT, no
//! quantisation. A 1080p frame costs a fraction of a decode + encode, and the result is the
//! source's own coefficients: no generation loss, the source's quantisation (the worker's
//! `jpeg_quality` does not apply), `grayscale` is the frame's own luma (Y) plane.
//!
//! Blocks can only be moved whole, so a transform is exact only on the MCU grid (8×8 pixels
//! for gray and 4:4:4 frames and for any `grayscale` result, which keeps the luma blocks only;
//! 16×16 for 4:2:0, 16×8 for 4:2:2):
//! - a crop's left and top edges must lie on the grid (its right and bottom edges may not);
//! - a rotation may not move a partial MCU (the right column / bottom row of MCUs of a frame
//!   whose size is not a multiple of the MCU) to the left or top of the result: `rotate:90`
//!   needs the height of what is rotated to be a multiple of the MCU height, `rotate:270` the
//!   width a multiple of the MCU width, `rotate:180` both. A crop before or after the
//!   rotation that leaves the partial MCUs out is enough.
//!
//! A chain of these ops is folded into one rotation of one source rectangle ([`Plan`]), which is
//! one transform. Frames it does not fit exactly (off the grid, partial MCUs that would move,
//! progressive, lossless, arithmetic-coded, 12-bit or CMYK JPEGs, sampling factors other than
//! the standard ones, more than [`crate::decode::MAX_SCANS`] scans) are decoded instead — on
//! their YUV planes ([`crate::planes`]) or to RGB — and counted by reason ([`Outcome`]), so an
//! operator sees why a pipeline is slow. Results carry no EXIF or ICC markers, like every other
//! path's.

use turbojpeg::{DecompressHeader, Subsamp, Transform, TransformCrop, TransformOp, Transformer};

use crate::ops::{Op, Pipeline};

/// A rectangle in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// What a pipeline of `rotate` / `crop` / `grayscale` ops does to a frame, folded: crop
/// `source` (in the frame's pixels, `None` = whole frame), rotate the crop clockwise by
/// `rotate` degrees, then keep only the luma if `gray`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Whether the chain crops (the rectangle depends on the frame's size: [`Plan::source_rect`]).
    crops: bool,
    pub rotate: u16,
    pub gray: bool,
}

/// Why a frame took (or did not take) the DCT-domain path; the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Transformed in the DCT domain.
    Transformed,
    /// A crop's left or top edge is off the MCU grid.
    OffGrid,
    /// A rotation would move a partial MCU to the left or top edge.
    PartialMcu,
    /// Progressive, lossless, arithmetic-coded, 12-bit or CMYK JPEG, non-standard sampling
    /// factors, or more scans than the decoder's limit.
    Unsupported,
    /// A crop falls outside the frame (the pixel path dead-letters it, naming the op).
    Outside,
    /// libjpeg-turbo refused the transform (a corrupt frame; its decode names the cause).
    Failed,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [Outcome::Transformed, Outcome::OffGrid, Outcome::PartialMcu, Outcome::Unsupported, Outcome::Outside, Outcome::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Transformed => "transformed",
            Outcome::OffGrid => "off_mcu_grid",
            Outcome::PartialMcu => "partial_mcu",
            Outcome::Unsupported => "unsupported_jpeg",
            Outcome::Outside => "crop_outside",
            Outcome::Failed => "failed",
        }
    }
}

/// What a frame's markers say about its layout, beyond TurboJPEG's header: the sample
/// precision, each component's sampling factors, and the number of scans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub precision: u8,
    pub factors: Vec<(u8, u8)>,
    pub scans: usize,
}

/// Reads the frame's frame header (SOFn) and counts its scans (SOS markers: `FF DA` cannot
/// occur inside entropy-coded data, where every `FF` is followed by `00` or a restart marker).
/// `None` when the markers cannot be walked to the first scan.
pub fn layout(jpeg: &[u8]) -> Option<Layout> {
    if jpeg.get(..2)? != [0xFF, 0xD8] {
        return None;
    }
    let (mut i, mut sof) = (2, None);
    while i + 4 <= jpeg.len() {
        if jpeg[i] != 0xFF {
            return None;
        }
        let marker = jpeg[i + 1];
        if marker == 0xFF {
            i += 1; // fill byte
            continue;
        }
        if marker == 0x01 || (0xD0..=0xD8).contains(&marker) {
            i += 2; // markers without a length
            continue;
        }
        let len = u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]) as usize;
        let seg = jpeg.get(i + 4..i + 2 + len.max(2))?;
        if matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) {
            let n = *seg.get(5)? as usize;
            let factors = (0..n).map(|k| seg.get(7 + 3 * k).map(|hv| (hv >> 4, hv & 15))).collect::<Option<Vec<_>>>()?;
            sof = Some((seg[0], factors));
        }
        if marker == 0xDA {
            let (precision, factors) = sof?;
            let scans = 1 + memchr::memmem::find_iter(&jpeg[i + 2 + len..], &[0xFF, 0xDA]).count();
            return Some(Layout { precision, factors, scans });
        }
        i += 2 + len;
    }
    None
}

impl Layout {
    /// Whether the frame is what TurboJPEG's subsampling label says: 8-bit samples, at most
    /// [`crate::decode::MAX_SCANS`] scans, and the label's own sampling factors (luma
    /// (h, v), chroma 1×1; one component of any factors is gray). TurboJPEG names some other
    /// factor sets by the nearest label (e.g. luma 2×2 with chroma 1×2 as "4:2:2"), whose real
    /// MCU differs from the label's: the lossless transform and the plane geometry would then
    /// work on the wrong grid.
    pub fn is_plain(&self, subsamp: Subsamp) -> bool {
        let standard = match (self.factors.as_slice(), subsamp) {
            ([_], Subsamp::Gray) => true,
            ([y, cb, cr], s) if s != Subsamp::Gray && s != Subsamp::Unknown => {
                *y == (s.width() as u8, s.height() as u8) && *cb == (1, 1) && *cr == (1, 1)
            }
            _ => false,
        };
        self.precision == 8 && self.scans <= crate::decode::MAX_SCANS as usize && standard
    }
}

impl Plan {
    /// The pipeline as one transform, when every op is `rotate`, `crop` or `grayscale` (and
    /// there is at least one).
    pub fn of(pipeline: &Pipeline) -> Option<Plan> {
        if pipeline.0.is_empty() {
            return None;
        }
        let mut plan = Plan { crops: false, rotate: 0, gray: false };
        for op in &pipeline.0 {
            match op {
                Op::Rotate { degrees } => plan.rotate = (plan.rotate + degrees) % 360,
                Op::Grayscale => plan.gray = true,
                Op::Crop { .. } => plan.crops = true,
                _ => return None,
            }
        }
        Some(plan)
    }

    /// The rectangle of a `width`×`height` frame that the pipeline's crops keep, in the frame's
    /// pixels (`None`: a crop falls outside the image; the pixel path reports it).
    pub fn source_rect(pipeline: &Pipeline, width: u32, height: u32) -> Option<Rect> {
        let mut s = Rect { x: 0, y: 0, width, height };
        let mut rot = 0u16;
        for op in &pipeline.0 {
            match *op {
                Op::Rotate { degrees } => rot = (rot + degrees) % 360,
                Op::Crop { x, y, width: w, height: h } => {
                    // The current view is rot(crop_s(frame)); its size:
                    let (vw, vh) = if rot % 180 == 0 { (s.width, s.height) } else { (s.height, s.width) };
                    if x as u64 + w as u64 > vw as u64 || y as u64 + h as u64 > vh as u64 {
                        return None;
                    }
                    // The view rectangle, back in the crop's own (unrotated) pixels.
                    let (lx, ly, lw, lh) = match rot {
                        0 => (x, y, w, h),
                        90 => (y, s.height - x - w, h, w),
                        180 => (s.width - x - w, s.height - y - h, w, h),
                        _ => (s.width - y - h, x, h, w),
                    };
                    s = Rect { x: s.x + lx, y: s.y + ly, width: lw, height: lh };
                }
                _ => {}
            }
        }
        Some(s)
    }

    /// Which edges of the kept rectangle end up at the left or top of the result: (bottom, right).
    fn moved_edges(&self) -> (bool, bool) {
        match self.rotate {
            0 => (false, false),
            90 => (true, false),
            180 => (true, true),
            _ => (false, true),
        }
    }

    /// Whether the plan moves whole cells of a `grid` (MCUs; for planes, chroma samples) when
    /// it keeps `s`: its left and top edges on the grid, and no partial cell moved to the left
    /// or top of the result.
    pub fn fits(&self, s: Rect, grid: (u32, u32)) -> Result<(), Outcome> {
        let (gw, gh) = grid;
        if s.x % gw != 0 || s.y % gh != 0 {
            return Err(Outcome::OffGrid);
        }
        let (bottom_moves, right_moves) = self.moved_edges();
        if (bottom_moves && s.height % gh != 0) || (right_moves && s.width % gw != 0) {
            return Err(Outcome::PartialMcu);
        }
        Ok(())
    }

    /// The transform that does `pipeline` (of which this is the plan) exactly on a frame with
    /// `header`, and the size of its result; or why there is none.
    pub fn transform_for(&self, pipeline: &Pipeline, header: &DecompressHeader, layout: &Layout) -> Result<(Transform, (u32, u32)), Outcome> {
        if header.is_progressive || header.is_lossless || header.is_arithmetic || !layout.is_plain(header.subsamp) {
            return Err(Outcome::Unsupported);
        }
        if !matches!(header.colorspace, turbojpeg::Colorspace::YCbCr | turbojpeg::Colorspace::Gray) || header.subsamp == Subsamp::Unknown {
            return Err(Outcome::Unsupported);
        }
        let (w, h) = (header.width as u32, header.height as u32);
        // A gray result keeps the luma blocks only, whose grid is 8×8 at any subsampling.
        let (mw, mh) = if self.gray { (8, 8) } else { (header.subsamp.mcu_width() as u32, header.subsamp.mcu_height() as u32) };
        let s = match self.crops {
            false => Rect { x: 0, y: 0, width: w, height: h },
            // Outside the image: the pixel path names the op that fails.
            true => Plan::source_rect(pipeline, w, h).ok_or(Outcome::Outside)?,
        };
        self.fits(s, (mw, mh))?;
        let (bottom_moves, right_moves) = self.moved_edges();
        // libjpeg-turbo rotates the whole frame, less the partial MCUs it would have to move
        // (`trim`), and crops in the rotated frame's pixels.
        let tw = if right_moves { w - w % mw } else { w };
        let th = if bottom_moves { h - h % mh } else { h };
        let (out, op) = match self.rotate {
            0 => (s, TransformOp::None),
            90 => (Rect { x: th - s.y - s.height, y: s.x, width: s.height, height: s.width }, TransformOp::Rot90),
            180 => (Rect { x: tw - s.x - s.width, y: th - s.y - s.height, width: s.width, height: s.height }, TransformOp::Rot180),
            _ => (Rect { x: s.y, y: tw - s.x - s.width, width: s.height, height: s.width }, TransformOp::Rot270),
        };
        let mut t = Transform::op(op);
        t.trim = true;
        // Like every other path's result: no EXIF (an Orientation tag would turn the turned
        // result again in viewers; GPS), no ICC profile (an RGB profile on a gray result).
        t.copy_none = true;
        t.gray = self.gray;
        let (rw, rh) = if self.rotate % 180 == 0 { (tw, th) } else { (th, tw) };
        if out != (Rect { x: 0, y: 0, width: rw, height: rh }) {
            t.crop = Some(TransformCrop { x: out.x as usize, y: out.y as usize, width: Some(out.width as usize), height: Some(out.height as usize) });
        }
        Ok((t, (out.width, out.height)))
    }
}

/// A pipeline's DCT-domain transform, one per processing thread.
pub struct Lossless {
    pipeline: Pipeline,
    plan: Plan,
    transformer: SendTransformer,
}

/// A libjpeg-turbo transform handle, moved to the processing thread that then owns it.
struct SendTransformer(Transformer);

// SAFETY: a TurboJPEG handle holds no thread-affine state; it must only not be used from two
// threads at once, which `&mut self` ensures. The turbojpeg crate declares its Compressor and
// Decompressor, the same kind of handle, `Send` on the same grounds (Transformer lacks it).
unsafe impl Send for SendTransformer {}

fn transformer() -> SendTransformer {
    SendTransformer(Transformer::new().expect("libjpeg-turbo transformer"))
}

impl Lossless {
    /// `None` when the pipeline is not made only of `rotate`, `crop` and `grayscale`.
    pub fn new(pipeline: &Pipeline) -> Option<Lossless> {
        let plan = Plan::of(pipeline)?;
        Some(Lossless { pipeline: pipeline.clone(), plan, transformer: transformer() })
    }

    /// The transformed JPEG and its size, or why the frame takes the pixel path.
    pub fn apply(&mut self, jpeg: &[u8], header: &DecompressHeader) -> Result<(Vec<u8>, (u32, u32)), Outcome> {
        let layout = layout(jpeg).ok_or(Outcome::Unsupported)?;
        let (t, size) = self.plan.transform_for(&self.pipeline, header, &layout)?;
        match self.transformer.0.transform_to_vec(&t, jpeg) {
            Ok(out) => Ok((out, size)),
            Err(e) => {
                tracing::debug!(error = %e, "DCT-domain transform failed; the pixel path decodes the frame");
                // A handle stopped by an error may hold state from the failed frame.
                self.transformer = transformer();
                Err(Outcome::Failed)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{Decoder, encode};
    use crate::ops::{Apply, Img};

    fn photo(name: &str) -> Img {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/images").join(name);
        Decoder::new().decode(&std::fs::read(&p).unwrap(), u64::MAX, None).unwrap()
    }

    fn jpeg_of(img: &Img, w: u32, h: u32, subsamp: Subsamp) -> Vec<u8> {
        let img = crate::ops::crop(img, 0, 0, w, h);
        let image = turbojpeg::Image { pixels: &img.data[..], width: w as usize, pitch: w as usize * 3, height: h as usize, format: turbojpeg::PixelFormat::RGB };
        turbojpeg::compress(image, 85, subsamp).unwrap().to_vec()
    }

    /// Decodes to the luma plane (exactly the Y samples) or to RGB.
    fn decode(jpeg: &[u8], format: turbojpeg::PixelFormat) -> Img {
        let img = turbojpeg::decompress(jpeg, format).unwrap();
        let ch = format.size() as u8;
        Img::new(img.width as u32, img.height as u32, ch, img.pixels)
    }

    fn max_diff(a: &Img, b: &Img) -> (u8, usize) {
        assert_eq!((a.width, a.height, a.channels), (b.width, b.height, b.channels), "sizes");
        let d = a.data.iter().zip(&b.data).map(|(x, y)| x.abs_diff(*y));
        (d.clone().max().unwrap_or(0), d.filter(|&v| v > 0).count())
    }

    /// Every chain on every subsampling and on sizes on and off the MCU grid: where the DCT
    /// path is taken, its result decodes to what the pixel path computes from the decoded
    /// frame — the luma plane exactly, but for 90°/270° rotations within one level (the IDCT
    /// rounds rows and columns in a fixed order, which a transposition swaps); RGB exactly for
    /// 4:4:4 and gray frames without such a rotation (subsampled chroma is upsampled with a
    /// filter that sees different neighbours at a crop's edges). Where it is not taken, the
    /// reason is the one the geometry gives.
    #[test]
    fn dct_results_decode_to_the_pixel_paths_pixels() {
        let src = photo("retina.jpg");
        let chains = ["rotate:90", "rotate:180", "rotate:270", "grayscale", "crop:320x200+16+32", "rotate:90,crop:200x96+16+32", "rotate:270,rotate:180,grayscale", "crop:304x208+32+48,rotate:270,grayscale", "rotate:180,crop:100x100+0+0", "crop:400x300+0+0,rotate:90,crop:96x160+64+32,rotate:180"];
        let mut transformed = 0;
        for (w, h) in [(640u32, 480u32), (642, 481), (653, 357)] {
            for subsamp in [Subsamp::Sub2x2, Subsamp::None, Subsamp::Sub2x1, Subsamp::Gray] {
                let jpeg = jpeg_of(&src, w, h, subsamp);
                let header = turbojpeg::read_header(&jpeg).unwrap();
                for spec in chains {
                    let pipeline = Pipeline::parse(spec).unwrap();
                    let plan = Plan::of(&pipeline).unwrap();
                    let (mw, mh) = if plan.gray { (8, 8) } else { (subsamp.mcu_width() as u32, subsamp.mcu_height() as u32) };
                    let mut l = Lossless::new(&pipeline).unwrap();
                    let s = Plan::source_rect(&pipeline, w, h).unwrap();
                    // The geometry's verdict, written out independently of transform_for.
                    let (bottom, right) = match plan.rotate { 0 => (false, false), 90 => (true, false), 180 => (true, true), _ => (false, true) };
                    let expected = if s.x % mw != 0 || s.y % mh != 0 {
                        Err(Outcome::OffGrid)
                    } else if (bottom && s.height % mh != 0) || (right && s.width % mw != 0) {
                        Err(Outcome::PartialMcu)
                    } else {
                        Ok(())
                    };
                    let what = format!("{w}x{h} {subsamp:?} {spec}");
                    match (l.apply(&jpeg, &header), expected) {
                        (Err(got), Err(want)) => assert_eq!(got, want, "{what}"),
                        (Ok((out, size)), Ok(())) => {
                            transformed += 1;
                            let luma = pipeline.apply(decode(&jpeg, turbojpeg::PixelFormat::GRAY)).unwrap();
                            let got = decode(&out, turbojpeg::PixelFormat::GRAY);
                            assert_eq!((got.width, got.height), size, "{what}");
                            let (d, n) = max_diff(&luma, &got);
                            let turned = plan.rotate % 180 == 90;
                            assert!(d <= turned as u8, "{what}: luma differs by up to {d}");
                            assert!(n * 20 <= got.data.len(), "{what}: {n} of {} luma samples differ", got.data.len());
                            if !plan.gray && !turned && matches!(subsamp, Subsamp::None | Subsamp::Gray) {
                                let rgb = pipeline.apply(decode(&jpeg, turbojpeg::PixelFormat::RGB)).unwrap();
                                assert_eq!(max_diff(&rgb, &decode(&out, turbojpeg::PixelFormat::RGB)), (0, 0), "{what}: RGB");
                            }
                            if plan.gray {
                                assert_eq!(turbojpeg::read_header(&out).unwrap().subsamp, Subsamp::Gray, "{what}: one channel");
                            }
                        }
                        (got, want) => panic!("{what}: got {:?}, expected {want:?}", got.map(|(_, s)| s)),
                    }
                }
            }
        }
        assert!(transformed >= 40, "only {transformed} cases took the DCT path");
    }

    #[test]
    fn a_1080p_frame_takes_the_dct_path_where_its_mcus_allow() {
        let jpeg = jpeg_of(&crate::ops::resize(&photo("retina.jpg"), 1920, 1080).unwrap(), 1920, 1080, Subsamp::Sub2x2);
        let header = turbojpeg::read_header(&jpeg).unwrap();
        // 1080 = 67.5 MCUs of 16 rows: the bottom row of MCUs is partial.
        for (spec, want) in [
            ("rotate:270", Ok((1080, 1920))),
            ("grayscale", Ok((1920, 1080))),
            ("crop:1280x720+320+176", Ok((1280, 720))),
            ("crop:1920x1072+0+0,rotate:90", Ok((1072, 1920))),
            ("rotate:90", Err(Outcome::PartialMcu)),
            ("rotate:180", Err(Outcome::PartialMcu)),
            ("crop:1280x720+320+180", Err(Outcome::OffGrid)),
            ("crop:1280x720+640+400", Err(Outcome::Outside)),
        ] {
            let pipeline = Pipeline::parse(spec).unwrap();
            let got = Lossless::new(&pipeline).unwrap().apply(&jpeg, &header).map(|(_, s)| s);
            assert_eq!(got, want, "{spec}");
        }
        assert!(Lossless::new(&Pipeline::parse("rotate:90,blur:1").unwrap()).is_none());
        assert!(Lossless::new(&Pipeline::parse("").unwrap()).is_none());
    }

    #[test]
    fn the_layout_is_read_from_the_markers_and_only_plain_frames_are_transformed() {
        let img = crate::ops::crop(&photo("retina.jpg"), 0, 0, 320, 240);
        let jpeg = jpeg_of(&img, 320, 240, Subsamp::Sub2x2);
        let header = turbojpeg::read_header(&jpeg).unwrap();
        let l = layout(&jpeg).unwrap();
        assert_eq!(l, Layout { precision: 8, factors: vec![(2, 2), (1, 1), (1, 1)], scans: 1 });
        assert!(l.is_plain(Subsamp::Sub2x2));
        // Factor sets TurboJPEG names by a nearby label are not plain.
        for (factors, label) in [(vec![(2, 2), (1, 2), (1, 2)], Subsamp::Sub2x1), (vec![(2, 1), (2, 1), (2, 1)], Subsamp::None), (vec![(2, 2), (2, 1), (2, 1)], Subsamp::Sub1x2)] {
            assert!(!Layout { precision: 8, factors, scans: 1 }.is_plain(label), "{label:?}");
        }
        assert!(Layout { precision: 8, factors: vec![(2, 2)], scans: 1 }.is_plain(Subsamp::Gray));
        let mut l = Lossless::new(&Pipeline::parse("rotate:270").unwrap()).unwrap();
        // 12-bit samples (the SOF's precision byte): refused before the transform.
        let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        let mut twelve = jpeg.clone();
        twelve[sof + 4] = 12;
        assert_eq!(layout(&twelve).unwrap().precision, 12);
        assert_eq!(l.apply(&twelve, &header).unwrap_err(), Outcome::Unsupported);
        // More scans than the decoder allows: refused without walking them.
        let mut scans = jpeg[..jpeg.len() - 2].to_vec();
        for _ in 0..crate::decode::MAX_SCANS {
            scans.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x08, 0x01, 0x01, 0x00, 0x00, 0x3F, 0x00]);
        }
        scans.extend_from_slice(&[0xFF, 0xD9]);
        assert_eq!(layout(&scans).unwrap().scans, 1 + crate::decode::MAX_SCANS as usize);
        assert_eq!(l.apply(&scans, &header).unwrap_err(), Outcome::Unsupported);
        // No metadata travels: a comment (as EXIF would) is not in the result.
        let mut commented = jpeg[..2].to_vec();
        commented.extend_from_slice(&[0xFF, 0xFE, 0x00, 0x0C]);
        commented.extend_from_slice(b"GPS 48.85N");
        commented.extend_from_slice(&jpeg[2..]);
        assert_eq!(layout(&commented).unwrap().scans, 1);
        let (out, _) = l.apply(&commented, &turbojpeg::read_header(&commented).unwrap()).unwrap();
        assert!(!out.windows(10).any(|w| w == b"GPS 48.85N"), "the comment was copied");
        assert!(layout(b"not a jpeg").is_none() && layout(&jpeg[..20]).is_none());
    }

    #[test]
    fn progressive_and_corrupt_frames_take_the_pixel_path() {
        let img = crate::ops::crop(&photo("retina.jpg"), 0, 0, 320, 240);
        let mut c = turbojpeg::Compressor::new().unwrap();
        c.set_progressive(true).unwrap();
        let image = turbojpeg::Image { pixels: &img.data[..], width: 320, pitch: 960, height: 240, format: turbojpeg::PixelFormat::RGB };
        let progressive = c.compress_to_vec(image).unwrap();
        let mut l = Lossless::new(&Pipeline::parse("rotate:90").unwrap()).unwrap();
        assert_eq!(l.apply(&progressive, &turbojpeg::read_header(&progressive).unwrap()).unwrap_err(), Outcome::Unsupported);
        let good = encode(&img, 85).unwrap();
        let header = turbojpeg::read_header(&good).unwrap();
        let truncated = &good[..good.len() / 2];
        assert_eq!(l.apply(truncated, &header).unwrap_err(), Outcome::Failed);
        // The handle is fine for the next frame.
        assert_eq!(l.apply(&good, &header).unwrap().1, (240, 320));
    }
}
