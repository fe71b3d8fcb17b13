//! Rotations and crops of colour frames on the JPEG's own YUV planes, where the DCT domain
//! cannot do them exactly (a 1080-row 4:2:0 frame turned by 90° or 180°, a crop off the MCU
//! grid): decode to planar Y, Cb, Cr (libjpeg-turbo skips chroma upsampling and the colour
//! conversion), move the samples of each plane, encode from the planes (no colour conversion
//! and no chroma downsampling either). At 4:2:0 the chroma planes are a quarter of the pixels.
//!
//! Geometry moves samples; it never computes new ones — so on the planes it is exact when every
//! chroma sample keeps covering the same luma pixels: the kept rectangle's left and top edges on
//! the chroma grid (even coordinates at 4:2:0) and no partial chroma cell moved to the left or
//! top (the same rule as for MCUs in [`crate::lossless`], on a 2×2 grid instead of 16×16). The
//! result keeps the frame's chroma subsampling (turned with the frame: 4:2:2 becomes 4:4:0).
//! Frames that do not fit take the RGB pixel path.
//!
//! Compared with the RGB pixel path, the result differs only by what the codec does: the planes
//! are the source's decoded planes moved (tested sample for sample), where the pixel path
//! upsamples chroma, converts to RGB, rotates, converts back and downsamples.

use turbojpeg::{Compressor, DecompressHeader, Decompressor, ScalingFactor, Subsamp, YuvImage};

use crate::lossless::{Plan, Rect};
use crate::ops::Pipeline;

/// A pipeline of `rotate` and `crop` (no `grayscale`: that one decodes the luma alone) on YUV
/// planes; one per processing thread.
pub struct PlaneGeometry {
    pipeline: Pipeline,
    plan: Plan,
    codec: PlaneCodec,
}

/// libjpeg-turbo's handles for decoding to and encoding from planes (one per processing
/// thread); shared with the colour ops on planes ([`crate::plane_ops`]).
pub(crate) struct PlaneCodec {
    quality: u8,
    d: Decompressor,
    c: Compressor,
}

impl PlaneCodec {
    pub(crate) fn new(quality: u8) -> PlaneCodec {
        let mut d = Decompressor::new().expect("libjpeg-turbo decompressor");
        d.set_scan_limit(crate::decode::MAX_SCANS).expect("libjpeg-turbo scan limit");
        let mut c = Compressor::new().expect("libjpeg-turbo compressor");
        c.set_quality(quality as i32).expect("JPEG quality");
        PlaneCodec { quality, d, c }
    }

    /// The chroma factors of a frame whose planes are what its header says (YCbCr or gray,
    /// 8-bit, not lossless, standard sampling factors), or `None`: such a frame takes the RGB
    /// pixel path.
    pub(crate) fn plain_factors(jpeg: &[u8], header: &DecompressHeader) -> Option<(u32, u32)> {
        if !matches!(header.colorspace, turbojpeg::Colorspace::YCbCr | turbojpeg::Colorspace::Gray) || header.is_lossless {
            return None;
        }
        // The scan limit is the decompressor's own.
        if !crate::lossless::layout(jpeg).is_some_and(|l| crate::lossless::Layout { scans: 0, ..l }.is_plain(header.subsamp)) {
            return None;
        }
        factors(header.subsamp)
    }

    /// The frame's planes, Y then Cb and Cr, rows unpadded (Y padded to whole cells).
    pub(crate) fn decode(&mut self, jpeg: &[u8], header: &DecompressHeader) -> Option<Vec<u8>> {
        self.decode_scaled(jpeg, header, ScalingFactor::ONE)
    }

    /// [`PlaneCodec::decode`] at a DCT scale: the planes of `header.scaled(scale)`.
    pub(crate) fn decode_scaled(&mut self, jpeg: &[u8], header: &DecompressHeader, scale: ScalingFactor) -> Option<Vec<u8>> {
        let s = header.scaled(scale);
        let len = plane_sizes(s.width, s.height, header.subsamp).iter().map(|(a, b)| a * b).sum();
        let mut buf = vec![0u8; len];
        let image = YuvImage { pixels: &mut buf[..], width: s.width, align: 1, height: s.height, subsamp: header.subsamp };
        let decoded = self.d.set_scaling_factor(scale).and_then(|()| self.d.decompress_to_yuv(jpeg, image));
        if scale != ScalingFactor::ONE {
            let _ = self.d.set_scaling_factor(ScalingFactor::ONE);
        }
        match decoded {
            Ok(()) => Some(buf),
            Err(e) => {
                tracing::debug!(error = %e, "decoding to YUV planes failed; the pixel path takes the frame");
                self.reset();
                None
            }
        }
    }

    /// The planes under the rectangle `s` of the frame (luma pixels): only the MCUs it covers
    /// where that is less than the whole frame ([`crate::region::decode_planes`]: the blocks
    /// outside them are not inverse-transformed), otherwise — and for frames the region decode
    /// does not take (progressive or multi-scan ones) — the whole frame; but such a frame's
    /// crop of at most half of it is left (`None`) to the RGB partial decode where
    /// `rgb_region` says the caller has one for it. `None` (logged) where libjpeg-turbo
    /// refused the frame: the pixel path then names the cause.
    fn decode_covering(&mut self, jpeg: &[u8], header: &DecompressHeader, s: Rect, (fw, fh): (u32, u32), rgb_region: bool) -> Option<Decoded> {
        use crate::region::{Mcus, PlanesRefused, decode_planes};
        let (w, h) = (header.width as u32, header.height as u32);
        // The MCU of a standard subsampling: 8×8 chroma blocks under fw×fh luma blocks.
        let (mw, mh) = (8 * fw, 8 * fh);
        let m = Mcus { x0: s.x / mw, x1: (s.x + s.width - 1) / mw, y0: s.y / mh, y1: (s.y + s.height - 1) / mh };
        if m != (Mcus { x0: 0, x1: (w - 1) / mw, y0: 0, y1: (h - 1) / mh }) {
            let (cols, rows) = ((m.x1 - m.x0 + 1) as usize, (m.y1 - m.y0 + 1) as usize);
            let components = if header.subsamp == Subsamp::Gray { 1 } else { 3 };
            let dims: Vec<(usize, usize)> = (0..components).map(|k| if k == 0 { (cols * mw as usize, rows * mh as usize) } else { (cols * 8, rows * 8) }).collect();
            let mut data = vec![0u8; dims.iter().map(|(a, b)| a * b).sum()];
            let mut slices: Vec<&mut [u8]> = Vec::with_capacity(components);
            let mut rest = &mut data[..];
            for &(pw, ph) in &dims {
                let (plane, tail) = rest.split_at_mut(pw * ph);
                slices.push(plane);
                rest = tail;
            }
            let strides: Vec<usize> = dims.iter().map(|d| d.0).collect();
            match decode_planes(jpeg, m, &mut slices, &strides) {
                Ok(()) => {
                    return Some(Decoded { data, planes: one_after_another(dims), origin: (m.x0 * mw, m.y0 * mh) });
                }
                // A progressive frame: the whole frame's planes where the crop keeps more than
                // half of it or nothing else crops it, otherwise the RGB partial decode.
                Err(PlanesRefused::NotTaken) if rgb_region && 2 * s.width as u64 * s.height as u64 <= w as u64 * h as u64 => return None,
                Err(PlanesRefused::NotTaken) => {}
                Err(PlanesRefused::Failed(e)) => {
                    tracing::debug!(error = %e, "decoding a region to YUV planes failed; the pixel path takes the frame");
                    return None;
                }
            }
        }
        let data = self.decode(jpeg, header)?;
        Some(Decoded { data, planes: one_after_another(plane_sizes(w as usize, h as usize, header.subsamp)), origin: (0, 0) })
    }

    /// A JPEG from planes laid out as [`PlaneCodec::decode`] gives them.
    pub(crate) fn encode(&mut self, planes: &[u8], (width, height): (u32, u32), subsamp: Subsamp) -> Option<Vec<u8>> {
        let image = YuvImage { pixels: planes, width: width as usize, align: 1, height: height as usize, subsamp };
        match self.c.compress_yuv_to_vec(image) {
            Ok(jpeg) => Some(jpeg),
            Err(e) => {
                tracing::debug!(error = %e, "encoding from YUV planes failed; the pixel path takes the frame");
                self.reset();
                None
            }
        }
    }

    /// A JPEG from separate planes: Y padded to whole cells (`plane_sizes`), then Cb and Cr
    /// (none for a gray frame), rows unpadded.
    pub(crate) fn encode_planes(&mut self, planes: &[Vec<u8>], (width, height): (u32, u32), subsamp: Subsamp) -> Option<Vec<u8>> {
        let [y, u, v] = planes else {
            return self.encode(&planes[0], (width, height), subsamp);
        };
        let sizes = plane_sizes(width as usize, height as usize, subsamp);
        let image = turbojpeg::YuvPlanesImage { y_plane: &y[..], u_plane: &u[..], v_plane: &v[..], width: width as usize, height: height as usize, y_stride: sizes[0].0, u_stride: sizes[1].0, v_stride: sizes[2].0, subsamp };
        let mut out = turbojpeg::OutputBuf::new_owned();
        match self.c.compress_yuv_planes(&image, &mut out) {
            Ok(()) => Some(out.to_vec()),
            Err(e) => {
                tracing::debug!(error = %e, "encoding from YUV planes failed; the pixel path takes the frame");
                self.reset();
                None
            }
        }
    }

    /// Fresh handles after an error (a stopped libjpeg-turbo handle may keep its state).
    fn reset(&mut self) {
        *self = PlaneCodec::new(self.quality);
    }
}

/// A frame's planes as decoded for a geometry: the whole frame, or the MCUs under the kept
/// rectangle.
struct Decoded {
    data: Vec<u8>,
    /// Where each plane starts in `data`, its row stride and its rows.
    planes: Vec<(usize, usize, usize)>,
    /// The frame's pixel at the planes' top-left corner.
    origin: (u32, u32),
}

/// Where planes of these widths and heights start when they lie one after another.
fn one_after_another(dims: Vec<(usize, usize)>) -> Vec<(usize, usize, usize)> {
    let mut at = 0;
    dims.into_iter()
        .map(|(w, h)| {
            at += w * h;
            (at - w * h, w, h)
        })
        .collect()
}

/// Horizontal and vertical subsampling factors of a JPEG's chroma.
pub(crate) fn factors(s: Subsamp) -> Option<(u32, u32)> {
    Some(match s {
        Subsamp::None | Subsamp::Gray => (1, 1),
        Subsamp::Sub2x1 => (2, 1),
        Subsamp::Sub2x2 => (2, 2),
        Subsamp::Sub1x2 => (1, 2),
        Subsamp::Sub4x1 => (4, 1),
        Subsamp::Sub1x4 => (1, 4),
        _ => return None,
    })
}

/// The subsampling of a frame turned by a quarter.
pub(crate) fn turned(s: Subsamp) -> Subsamp {
    match s {
        Subsamp::Sub2x1 => Subsamp::Sub1x2,
        Subsamp::Sub1x2 => Subsamp::Sub2x1,
        Subsamp::Sub4x1 => Subsamp::Sub1x4,
        Subsamp::Sub1x4 => Subsamp::Sub4x1,
        other => other,
    }
}

/// Bytes of each plane of a `width`×`height` YUV image with `subsamp`, rows unpadded
/// (align 1): Y is padded to whole subsampling cells, chroma rounded up.
pub(crate) fn plane_sizes(width: usize, height: usize, subsamp: Subsamp) -> Vec<(usize, usize)> {
    let probe = YuvImage { pixels: (), width, align: 1, height, subsamp };
    let mut sizes = vec![probe.y_size()];
    if subsamp != Subsamp::Gray {
        sizes.push(probe.uv_size());
        sizes.push(probe.uv_size());
    }
    sizes
}

/// `rect` of a plane `pw` samples wide, turned clockwise by `rotate`, padded to `pad` by
/// repeating the last column and row (what libjpeg-turbo does at an image's edge).
fn move_samples(plane: &[u8], pw: usize, rect: Rect, rotate: u16, pad: (usize, usize)) -> Vec<u8> {
    let (rw, rh) = (rect.width as usize, rect.height as usize);
    // The whole plane (a turn without a crop) is turned where it lies, without a copy first.
    let whole = rect.x == 0 && rect.y == 0 && rw == pw && rw * rh == plane.len();
    let out = match (rotate, whole) {
        (0, _) => crate::ops::crop_samples(plane, pw, 1, rect.x, rect.y, rect.width, rect.height),
        (r, true) => crate::ops::rotate_plane(plane, rw, rh, r),
        (r, false) => crate::ops::rotate_plane(&crate::ops::crop_samples(plane, pw, 1, rect.x, rect.y, rect.width, rect.height), rw, rh, r),
    };
    let (ow, oh) = if rotate % 180 == 90 { (rh, rw) } else { (rw, rh) };
    pad_plane(out, (ow, oh), pad)
}

/// A `w`×`h` plane padded to `pad` by repeating its last column and row (what libjpeg-turbo
/// does at an image's edge).
pub(crate) fn pad_plane(data: Vec<u8>, (w, h): (usize, usize), pad: (usize, usize)) -> Vec<u8> {
    if (w, h) == pad {
        return data;
    }
    let mut padded = Vec::with_capacity(pad.0 * pad.1);
    for row in data.chunks_exact(w) {
        padded.extend_from_slice(row);
        padded.resize(padded.len() + pad.0 - w, row[w - 1]);
    }
    let last = padded[(h - 1) * pad.0..h * pad.0].to_vec();
    for _ in h..pad.1 {
        padded.extend_from_slice(&last);
    }
    padded
}

/// Planes ready for the encoder (rows unpadded, Y padded to whole cells).
struct Moved {
    planes: Vec<u8>,
    width: u32,
    height: u32,
    subsamp: Subsamp,
}

/// The part of plane `k` (0 = Y) that holds the pixels of `s`.
pub(crate) fn plane_rect(s: Rect, k: usize, (fw, fh): (u32, u32)) -> Rect {
    if k == 0 { s } else { Rect { x: s.x / fw, y: s.y / fh, width: s.width.div_ceil(fw), height: s.height.div_ceil(fh) } }
}

impl PlaneGeometry {
    /// `None` unless the pipeline is only `rotate` and `crop`.
    pub fn new(pipeline: &Pipeline, quality: u8) -> Option<PlaneGeometry> {
        let plan = Plan::of(pipeline).filter(|p| !p.gray)?;
        Some(PlaneGeometry { pipeline: pipeline.clone(), plan, codec: PlaneCodec::new(quality) })
    }

    /// The result JPEG and its size, or `None` where the frame takes the RGB pixel path (its
    /// geometry does not fit the chroma grid, or libjpeg-turbo refused it: the pixel path then
    /// names the cause).
    /// `rgb_region`: the caller's RGB partial decode takes a crop-only pipeline this path
    /// leaves (a progressive frame's small crop, see [`PlaneCodec::decode_covering`]).
    pub fn apply(&mut self, jpeg: &[u8], header: &DecompressHeader, rgb_region: bool) -> Option<(Vec<u8>, (u32, u32))> {
        let moved = self.moved_planes(jpeg, header, rgb_region)?;
        let size = (moved.width, moved.height);
        Some((self.codec.encode(&moved.planes, size, moved.subsamp)?, size))
    }

    /// The frame's planes with the pipeline's geometry done, ready for the encoder.
    fn moved_planes(&mut self, jpeg: &[u8], header: &DecompressHeader, rgb_region: bool) -> Option<Moved> {
        let (fw, fh) = PlaneCodec::plain_factors(jpeg, header)?;
        let (w, h) = (header.width as u32, header.height as u32);
        let s = Plan::source_rect(&self.pipeline, w, h)?;
        self.plan.fits(s, (fw, fh)).ok()?;
        let source = self.codec.decode_covering(jpeg, header, s, (fw, fh), rgb_region)?;
        // The kept rectangle within the decoded planes (their origin is on the MCU grid, so on
        // the chroma grid too).
        let s = Rect { x: s.x - source.origin.0, y: s.y - source.origin.1, ..s };
        let quarter = self.plan.rotate % 180 == 90;
        let (ow, oh) = if quarter { (s.height, s.width) } else { (s.width, s.height) };
        let subsamp = if quarter { turned(header.subsamp) } else { header.subsamp };
        let out_sizes = plane_sizes(ow as usize, oh as usize, subsamp);
        let mut out = Vec::with_capacity(out_sizes.iter().map(|(a, b)| a * b).sum());
        for (k, (&(at, pw, ph), &pad)) in source.planes.iter().zip(&out_sizes).enumerate() {
            let plane = &source.data[at..at + pw * ph];
            out.extend_from_slice(&move_samples(plane, pw, plane_rect(s, k, (fw, fh)), self.plan.rotate, pad));
        }
        Some(Moved { planes: out, width: ow, height: oh, subsamp })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::Img;
    use crate::ops::Apply;

    fn photo() -> Img {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/images/retina.jpg");
        crate::decode::Decoder::new().decode(&std::fs::read(&p).unwrap(), u64::MAX, None).unwrap()
    }

    fn jpeg_of(img: &Img, w: u32, h: u32, subsamp: Subsamp) -> Vec<u8> {
        let img = crate::ops::crop(img, 0, 0, w, h);
        let image = turbojpeg::Image { pixels: &img.data[..], width: w as usize, pitch: w as usize * 3, height: h as usize, format: turbojpeg::PixelFormat::RGB };
        turbojpeg::compress(image, 90, subsamp).unwrap().to_vec()
    }

    /// The visible samples of each plane of a padded planar buffer: (width, height, samples).
    fn visible(buf: &[u8], width: usize, height: usize, subsamp: Subsamp) -> Vec<(usize, usize, Vec<u8>)> {
        let (fw, fh) = factors(subsamp).unwrap();
        let (mut at, mut out) = (0, Vec::new());
        for (k, (pw, ph)) in plane_sizes(width, height, subsamp).into_iter().enumerate() {
            let (vw, vh) = if k == 0 { (width, height) } else { (width.div_ceil(fw as usize), height.div_ceil(fh as usize)) };
            let mut v = Vec::with_capacity(vw * vh);
            for y in 0..vh {
                v.extend_from_slice(&buf[at + y * pw..at + y * pw + vw]);
            }
            at += pw * ph;
            out.push((vw, vh, v));
        }
        out
    }

    /// The visible samples of each plane of `jpeg` (`w`×`h`, `subsamp`) decoded whole to planes
    /// by TurboJPEG, or its error.
    fn whole_planes(jpeg: &[u8], w: u32, h: u32, subsamp: Subsamp) -> Result<Vec<(usize, usize, Vec<u8>)>, turbojpeg::Error> {
        let len = plane_sizes(w as usize, h as usize, subsamp).iter().map(|(a, b)| a * b).sum();
        let mut buf = vec![0u8; len];
        let image = YuvImage { pixels: &mut buf[..], width: w as usize, align: 1, height: h as usize, subsamp };
        turbojpeg::Decompressor::new()?.decompress_to_yuv(jpeg, image)?;
        Ok(visible(&buf, w as usize, h as usize, subsamp))
    }

    /// The samples of `rect` of a plane turned clockwise by `rotate`, by the rotation's
    /// definition (90°: out(x, y) = in(y, H-1-x)), written independently of ops::rotate.
    fn expected(plane: &(usize, usize, Vec<u8>), rect: Rect, rotate: u16) -> (usize, usize, Vec<u8>) {
        let (sw, _, data) = plane;
        let (rw, rh) = (rect.width as usize, rect.height as usize);
        let at = |x: usize, y: usize| data[(rect.y as usize + y) * sw + rect.x as usize + x];
        let (ow, oh) = if rotate % 180 == 90 { (rh, rw) } else { (rw, rh) };
        let mut out = Vec::with_capacity(ow * oh);
        for y in 0..oh {
            for x in 0..ow {
                out.push(match rotate {
                    0 => at(x, y),
                    90 => at(y, rh - 1 - x),
                    180 => at(rw - 1 - x, rh - 1 - y),
                    _ => at(rw - 1 - y, x),
                });
            }
        }
        (ow, oh, out)
    }

    /// On every subsampling and on sizes with and without partial chroma cells: where the planes
    /// path is taken, what the encoder gets is the source's decoded planes moved, sample for
    /// sample, and the JPEG decodes close to the RGB pixel path's result (both re-encode);
    /// where it is not taken, the chroma grid says so.
    #[test]
    fn planes_are_the_sources_samples_moved() {
        let src = photo();
        let mut taken = 0;
        for (w, h) in [(640u32, 480u32), (642, 482), (645, 363)] {
            for subsamp in [Subsamp::Sub2x2, Subsamp::Sub2x1, Subsamp::None, Subsamp::Gray] {
                let jpeg = jpeg_of(&src, w, h, subsamp);
                let header = turbojpeg::read_header(&jpeg).unwrap();
                let (fw, fh) = factors(subsamp).unwrap();
                let source = whole_planes(&jpeg, w, h, subsamp).unwrap();
                for spec in ["rotate:90", "rotate:180", "rotate:270", "crop:300x200+2+4", "crop:301x201+10+6,rotate:90", "rotate:270,crop:100x90+4+2,rotate:180", "crop:300x200+3+4"] {
                    let pipeline = Pipeline::parse(spec).unwrap();
                    let plan = Plan::of(&pipeline).unwrap();
                    let s = Plan::source_rect(&pipeline, w, h).unwrap();
                    let what = format!("{w}x{h} {subsamp:?} {spec}");
                    // The chroma grid's verdict, written out: left/top edges on it, and the
                    // edges a rotation moves to the left or top made of whole cells.
                    let (bottom, right) = match plan.rotate { 0 => (false, false), 90 => (true, false), 180 => (true, true), _ => (false, true) };
                    let fits = s.x % fw == 0 && s.y % fh == 0 && !(bottom && s.height % fh != 0) && !(right && s.width % fw != 0);
                    let mut g = PlaneGeometry::new(&pipeline, 90).unwrap();
                    let Some(moved) = g.moved_planes(&jpeg, &header, false) else {
                        assert!(!fits, "{what}: fits the chroma grid but was refused");
                        continue;
                    };
                    assert!(fits, "{what}: taken off the chroma grid");
                    taken += 1;
                    let got = visible(&moved.planes, moved.width as usize, moved.height as usize, moved.subsamp);
                    for (k, plane) in source.iter().enumerate() {
                        let want = expected(plane, plane_rect(s, k, (fw, fh)), plan.rotate);
                        assert_eq!((got[k].0, got[k].1), (want.0, want.1), "{what}: plane {k} size");
                        let first = got[k].2.iter().zip(&want.2).position(|(a, b)| a != b);
                        assert_eq!(first, None, "{what}: plane {k} differs from the moved source at sample {first:?}");
                    }
                    let (out, size) = g.apply(&jpeg, &header, false).unwrap();
                    let decoded = turbojpeg::decompress(&out, turbojpeg::PixelFormat::RGB).unwrap();
                    let reference = pipeline.apply(crate::decode::Decoder::new().decode(&jpeg, u64::MAX, None).unwrap()).unwrap();
                    assert_eq!((decoded.width as u32, decoded.height as u32), size, "{what}");
                    assert_eq!(size, (reference.width, reference.height), "{what}");
                    let mean = decoded.pixels.iter().zip(&reference.data).map(|(a, b)| a.abs_diff(*b) as f64).sum::<f64>() / reference.data.len() as f64;
                    assert!(mean < 2.0, "{what}: decodes {mean:.2} levels from the pixel path on average");
                }
            }
        }
        assert!(taken >= 50, "only {taken} cases took the planes path");
    }

    /// The MCUs under a crop decode to the very samples the whole frame's planes hold there —
    /// on every subsampling, crops inside the frame and at its right and bottom edges (partial
    /// MCUs), arithmetic-coded too — and only those MCUs come back; a progressive frame is
    /// decoded whole, or left to the RGB partial decode for a crop of at most half of it where
    /// there is one; a frame corrupt or cut short anywhere, below the crop too, is refused.
    #[test]
    fn a_crops_mcus_decode_to_the_whole_frames_samples() {
        let src = photo();
        let (w, h) = (653u32, 491u32);
        let mut regions = 0;
        for subsamp in [Subsamp::Sub2x2, Subsamp::Sub2x1, Subsamp::Sub1x2, Subsamp::None, Subsamp::Gray, Subsamp::Sub4x1, Subsamp::Sub1x4] {
            for (progressive, arithmetic) in [(false, false), (false, true), (true, false)] {
                let img = crate::ops::crop(&src, 0, 0, w, h);
                let mut c = turbojpeg::Compressor::new().unwrap();
                c.set_quality(85).unwrap();
                c.set_subsamp(subsamp).unwrap();
                c.set_progressive(progressive).unwrap();
                c.set_arithmetic(arithmetic).unwrap();
                let jpeg = c.compress_to_vec(turbojpeg::Image { pixels: &img.data[..], width: w as usize, pitch: w as usize * 3, height: h as usize, format: turbojpeg::PixelFormat::RGB }).unwrap();
                let header = turbojpeg::read_header(&jpeg).unwrap();
                let (fw, fh) = factors(subsamp).unwrap();
                let whole = whole_planes(&jpeg, w, h, subsamp).unwrap();
                let mut codec = PlaneCodec::new(85);
                for s in [Rect { x: 64, y: 32, width: 300, height: 200 }, Rect { x: 36, y: 20, width: 17, height: 9 }, Rect { x: 600, y: 470, width: 53, height: 21 }, Rect { x: 0, y: 0, width: 653, height: 100 }, Rect { x: 4, y: 4, width: 1, height: 1 }, Rect { x: 0, y: 0, width: w, height: h }] {
                    let what = format!("{subsamp:?} progressive {progressive} arithmetic {arithmetic} {s:?}");
                    let small = 2 * s.width * s.height <= w * h;
                    // Without an RGB partial decode to fall back on, every crop gets planes.
                    assert!(codec.decode_covering(&jpeg, &header, s, (fw, fh), false).is_some(), "{what}: no planes");
                    let Some(d) = codec.decode_covering(&jpeg, &header, s, (fw, fh), true) else {
                        assert!(progressive && small, "{what}: refused");
                        continue;
                    };
                    let region = d.planes[0].1 < w as usize || d.planes[0].2 < h as usize;
                    assert_eq!(region, !progressive && s.width * s.height < w * h, "{what}: region decode taken");
                    regions += region as usize;
                    for (k, (&(at, pw, ph), want)) in d.planes.iter().zip(&whole).enumerate() {
                        let r = plane_rect(s, k, (fw, fh));
                        let o = plane_rect(Rect { x: d.origin.0, y: d.origin.1, width: 1, height: 1 }, k, (fw, fh));
                        assert!((r.x - o.x + r.width) as usize <= pw && (r.y - o.y + r.height) as usize <= ph, "{what}: plane {k} too small");
                        for y in 0..r.height as usize {
                            let got = &d.data[at + (r.y - o.y) as usize * pw + y * pw + (r.x - o.x) as usize..][..r.width as usize];
                            let row = &want.2[(r.y as usize + y) * want.0 + r.x as usize..][..r.width as usize];
                            assert_eq!(got, row, "{what}: plane {k} row {y}");
                        }
                    }
                }
                if !progressive {
                    // Cut short, or a byte of the last rows' entropy-coded data changed: the
                    // crop at the top is refused all the same.
                    let top = Rect { x: 16, y: 16, width: 64, height: 32 };
                    assert!(codec.decode_covering(&jpeg[..jpeg.len() * 3 / 4], &header, top, (fw, fh), true).is_none(), "{subsamp:?}: cut short");
                    let mut bad = jpeg.clone();
                    let at = bad.len() - 40;
                    bad[at..at + 8].fill(0xFF);
                    assert!(codec.decode_covering(&bad, &header, top, (fw, fh), true).is_none(), "{subsamp:?}: corrupt below the crop");
                    for refused in [&jpeg[..jpeg.len() * 3 / 4], &bad[..]] {
                        assert!(whole_planes(refused, w, h, subsamp).is_err(), "{subsamp:?}: the whole decode refuses it too");
                    }
                    assert!(codec.decode_covering(&jpeg, &header, top, (fw, fh), true).is_some(), "{subsamp:?}: the codec works after a refusal");
                }
            }
        }
        assert_eq!(regions, 7 * 2 * 5, "every crop of a single-scan frame decoded its region");
    }

    #[test]
    fn a_1080p_frame_turns_on_its_planes() {
        let img = crate::ops::resize(&photo(), 1920, 1080).unwrap();
        let jpeg = jpeg_of(&img, 1920, 1080, Subsamp::Sub2x2);
        let header = turbojpeg::read_header(&jpeg).unwrap();
        for (spec, want) in [("rotate:90", Some((1080, 1920))), ("rotate:180", Some((1920, 1080))), ("crop:1280x720+320+180", Some((1280, 720))), ("crop:1280x720+321+180", None)] {
            let got = PlaneGeometry::new(&Pipeline::parse(spec).unwrap(), 85).unwrap().apply(&jpeg, &header, false).map(|(_, s)| s);
            assert_eq!(got, want, "{spec}");
        }
        assert!(PlaneGeometry::new(&Pipeline::parse("rotate:90,grayscale").unwrap(), 85).is_none(), "luma pipelines decode the luma");
        assert!(PlaneGeometry::new(&Pipeline::parse("rotate:90,blur:1").unwrap(), 85).is_none());
    }
}
