//! Colour ops on a 4:2:0 JPEG's own YUV planes: `blur`, `sharpen` and `resize`, with `rotate`
//! and `crop` anywhere among them — or no op at all (a re-encode). Decode to planar Y, Cb, Cr (no chroma
//! upsampling, no colour conversion), run each op on the planes (at 4:2:0 the two chroma planes
//! together are half the luma's samples, so a frame is 1.5 bytes a pixel instead of RGB's 3),
//! encode from the planes (no colour conversion, no chroma downsampling). Most of a colour op's
//! frame on the RGB pixel path is that codec work and the doubled samples, not the op.
//!
//! ## Definitions on the planes
//!
//! These are not the RGB-domain definitions of [`crate::ops`] (which tiles and frames that are
//! not plain 4:2:0 YCbCr JPEGs keep); both are exact integer arithmetic and tested against
//! references written independently of the code. The GPU backend runs these too, as one
//! pipeline per plane ([`plane_pipelines`]), with the same results bit for bit:
//!
//! - `blur:σ` — every plane through the same separable Gaussian as on RGB (16-bit fixed-point
//!   weights summing to 65536, radius ⌈3σ⌉, edges clamped, rounded after each pass): the Y plane
//!   with σ, each chroma plane with σ divided by its subsampling factor along each axis (σ/2 at
//!   4:2:0, σ/2 across and σ down at 4:2:2), the same blur measured in the frame's pixels.
//!   Blurring is linear and the colour conversion is affine, so this is the RGB blur up to
//!   rounding and the chroma's coarser grid.
//! - `sharpen` — the 3×3 kernel [0 −1 0; −1 5 −1; 0 −1 0] on the Y plane; chroma unchanged.
//!   Sharpening is for detail, and detail is luminance; the chroma planes are at half resolution
//!   at 4:2:0, where the same kernel would reach twice as far and ring colour fringes around
//!   edges (photo editors sharpen luminance only for the same reason). The RGB definition
//!   sharpens all three channels.
//! - `resize:W×H` — every plane through the same Lanczos3 resampling as on RGB
//!   ([`crate::ops::resize`]): Y to W×H, each chroma plane to W/2×H/2 (its subsampling
//!   factors; both sizes, the frame's and W×H, in whole chroma cells — even at 4:2:0 — or the
//!   frame takes the RGB path, since an odd size's chroma would shift); a leading resize first decodes the frame at the DCT scale the RGB path would use
//!   (the smallest of 1/8, 1/4, 1/2, 1 still at least W×H), its planes at that scale. The RGB
//!   path resamples R, G and B at full resolution after upsampling the chroma; the results
//!   differ by rounding and the chroma grid.
//! - `rotate` and `crop` — samples moved, exact, under the chroma-grid rule of
//!   [`crate::planes`] (a crop's left and top edges on the chroma grid; a rotation moves no
//!   partial chroma cell to the left or top), checked for the whole pipeline before anything
//!   is decoded. A frame that breaks it takes the RGB pixel path.
//!
//! The definitions are written (and tested) for any subsampling, but only 4:2:0 frames take
//! this path, so that results stay 4:2:0 colour JPEGs as on the RGB path.

use std::time::{Duration, Instant};

use turbojpeg::{DecompressHeader, ScalingFactor, Subsamp};

use crate::gpu::stage::GpuClient;
use crate::lossless::Rect;
use crate::ops::{Img, Op, Pipeline};
use crate::planes::{PlaneCodec, factors, pad_plane, plane_rect, plane_sizes, turned};

/// A pipeline of `blur`, `sharpen`, `resize`, `rotate` and `crop` (at least one of the first
/// three), or
/// an empty one, run on YUV planes; one per processing thread.
pub struct PlaneOps {
    ops: Vec<Op>,
    codec: PlaneCodec,
    /// For decoding into the GPU stage's upload buffer (made at the first such frame).
    into: Option<crate::decode_into::PlanesDecoder>,
}

/// A frame's planes: Y (`width`×`height`) then, unless gray, Cb and Cr at the chroma
/// resolution — each an unpadded one-channel [`Img`].
#[derive(Debug, Clone, PartialEq)]
pub struct Planes {
    pub planes: Vec<Img>,
    pub subsamp: Subsamp,
}

impl Planes {
    fn size(&self) -> (u32, u32) {
        (self.planes[0].width, self.planes[0].height)
    }
}

impl PlaneOps {
    /// `None` unless every op of the pipeline has a definition on the planes, and it has a
    /// colour op or no op (geometry alone is [`crate::planes::PlaneGeometry`]'s, a leading crop
    /// the partial decode's).
    pub fn new(pipeline: &Pipeline, quality: u8) -> Option<PlaneOps> {
        let ops = &pipeline.0;
        let on_planes = ops.iter().all(|op| matches!(op, Op::Blur { .. } | Op::Sharpen | Op::Resize { .. } | Op::Rotate { .. } | Op::Crop { .. }));
        let colour = ops.iter().any(|op| matches!(op, Op::Blur { .. } | Op::Sharpen | Op::Resize { .. }));
        let leading_crop = matches!(ops.first(), Some(Op::Crop { .. }));
        (on_planes && (colour || ops.is_empty()) && !leading_crop).then(|| PlaneOps { ops: ops.clone(), codec: PlaneCodec::new(quality), into: None })
    }

    /// The result JPEG and its size, with the time of each op in `op_times` (decoding and
    /// encoding are not an op's), or `None` where the frame takes the RGB pixel path (not plain
    /// YCbCr, its geometry off the chroma grid, or libjpeg-turbo refused it: the pixel path then
    /// names the cause).
    pub fn apply(&mut self, jpeg: &[u8], header: &DecompressHeader, op_times: &mut Vec<(String, Duration)>) -> Option<(Vec<u8>, (u32, u32))> {
        let planes = self.prepare(jpeg, header)?;
        let planes = self.run(planes, op_times);
        self.finish(planes)
    }

    /// The frame's planes when it takes this path, else `None` (see [`PlaneOps::apply`]).
    pub fn prepare(&mut self, jpeg: &[u8], header: &DecompressHeader) -> Option<Planes> {
        let scale = self.scale_for(jpeg, header)?;
        self.decode_scaled(jpeg, header, scale)
    }

    /// The DCT scale the frame's planes are decoded at when it takes this path.
    fn scale_for(&self, jpeg: &[u8], header: &DecompressHeader) -> Option<ScalingFactor> {
        // 4:2:0 frames only: their result is a 4:2:0 JPEG, as the RGB path's is. Other
        // subsamplings would keep theirs (a 4:2:2 camera's results turned into 4:4:0, 4:4:4
        // ones three times the chroma), so they take the RGB path.
        if header.subsamp != Subsamp::Sub2x2 {
            return None;
        }
        let f = PlaneCodec::plain_factors(jpeg, header)?;
        // A leading resize: decoded at the DCT scale the RGB path would use.
        let scale = match self.ops.first() {
            Some(&Op::Resize { width, height }) => crate::decode::dct_scale(header, (width, height)),
            _ => ScalingFactor::ONE,
        };
        let s = header.scaled(scale);
        fits(&self.ops, (s.width as u32, s.height as u32), f).then_some(scale)
    }

    /// The ops on the GPU stage: the frame's planes decoded straight into their places in the
    /// stage's upload buffer ([`GpuClient::reserve_planes`]) where their sizes are even (the
    /// planes then have no padding), otherwise decoded here and copied there. `Ok(None)` where
    /// the frame does not take this path (as [`PlaneOps::prepare`]: the pixel path names what
    /// is wrong with it), `Err` where the GPU stage could not run it (the caller runs the ops
    /// on the CPU; the frame is not at fault).
    pub fn run_on_gpu(&mut self, jpeg: &[u8], header: &DecompressHeader, gpu: &GpuClient) -> Result<Option<Planes>, String> {
        let Some(scale) = self.scale_for(jpeg, header) else { return Ok(None) };
        let s = header.scaled(scale);
        let (w, h) = (s.width as u32, s.height as u32);
        if w % 2 != 0 || h % 2 != 0 {
            let Some(planes) = self.decode_scaled(jpeg, header, scale) else { return Ok(None) };
            return gpu.process_planes(planes.planes).map(|p| Some(Planes { planes: p, subsamp: header.subsamp }));
        }
        let mut lease = gpu.reserve_planes((w, h))?;
        let sizes = lease.plane_sizes();
        let planes = lease.planes();
        let into = self.into.get_or_insert_with(crate::decode_into::PlanesDecoder::new);
        // SAFETY: the lease's places (or its own chroma buffers), of their lengths, are this
        // thread's until it commits or drops the lease.
        if let Err(e) = unsafe { into.decode(jpeg, scale, planes, sizes) } {
            // The places go back as holes; the pixel path names the cause.
            tracing::debug!(error = %e, "decoding to YUV planes failed; the pixel path takes the frame");
            return Ok(None);
        }
        lease.commit().map(|p| Some(Planes { planes: p, subsamp: header.subsamp }))
    }

    /// The ops on the CPU, each timed into `op_times`.
    pub fn run(&self, mut planes: Planes, op_times: &mut Vec<(String, Duration)>) -> Planes {
        for op in &self.ops {
            let t = Instant::now();
            planes = apply(op, planes);
            op_times.push((op.to_string(), t.elapsed()));
        }
        planes
    }

    /// The result JPEG and its size.
    pub fn finish(&mut self, planes: Planes) -> Option<(Vec<u8>, (u32, u32))> {
        let size = planes.size();
        let jpeg = self.encode(planes)?;
        Some((jpeg, size))
    }

    /// The frame's planes as decoded, unpadded.
    #[cfg(test)]
    pub(crate) fn decode(&mut self, jpeg: &[u8], header: &DecompressHeader) -> Option<Planes> {
        self.decode_scaled(jpeg, header, ScalingFactor::ONE)
    }

    /// The planes of the frame decoded at a DCT `scale`, unpadded.
    fn decode_scaled(&mut self, jpeg: &[u8], header: &DecompressHeader, scale: ScalingFactor) -> Option<Planes> {
        let s = header.scaled(scale);
        let (w, h) = (s.width, s.height);
        let mut buf = self.codec.decode_scaled(jpeg, header, scale)?;
        let sizes = plane_sizes(w, h, header.subsamp);
        let (yw, yh) = sizes[0];
        let mut chroma = Vec::new();
        if let [_, (cw, ch), _] = sizes[..] {
            let cr = buf.split_off(yw * yh + cw * ch);
            let cb = buf.split_off(yw * yh);
            chroma = vec![Img::new(cw as u32, ch as u32, 1, cb), Img::new(cw as u32, ch as u32, 1, cr)];
        }
        // Y comes padded to whole chroma cells; the ops see the frame's own pixels.
        let y = if (yw, yh) == (w, h) { buf } else { crate::ops::crop_samples(&buf, yw, 1, 0, 0, w as u32, h as u32) };
        let mut planes = vec![Img::new(w as u32, h as u32, 1, y)];
        planes.extend(chroma);
        Some(Planes { planes, subsamp: header.subsamp })
    }

    fn encode(&mut self, p: Planes) -> Option<Vec<u8>> {
        let (w, h) = p.size();
        let pad = plane_sizes(w as usize, h as usize, p.subsamp)[0];
        let mut planes: Vec<Vec<u8>> = p.planes.into_iter().map(|img| img.data).collect();
        planes[0] = pad_plane(std::mem::take(&mut planes[0]), (w as usize, h as usize), pad);
        self.codec.encode_planes(&planes, (w, h), p.subsamp)
    }
}

/// The definitions above for a 4:2:0 frame as one pipeline per plane, `(luma, chroma)`, each
/// run on one-channel images by [`crate::ops`] (what the GPU backend runs, plane by plane):
/// the luma plane takes the ops as they are; the chroma planes `blur` at σ/2, skip `sharpen`,
/// turn alike and crop the chroma cells under the crop ([`plane_rect`]). 4:2:0 stays 4:2:0
/// through a quarter turn, so the factors are 2 along both axes throughout. `None` unless the
/// pipeline takes this path ([`PlaneOps::new`]).
pub fn plane_pipelines(pipeline: &Pipeline) -> Option<(Pipeline, Pipeline)> {
    PlaneOps::new(pipeline, 90)?;
    let f = factors(Subsamp::Sub2x2).expect("4:2:0 has factors");
    let chroma = pipeline
        .0
        .iter()
        .filter_map(|op| match *op {
            Op::Blur { sigma } => Some(Op::Blur { sigma: sigma / f.0 as f32 }),
            Op::Sharpen => None,
            Op::Resize { width, height } => Some(Op::Resize { width: width.div_ceil(f.0), height: height.div_ceil(f.1) }),
            Op::Crop { x, y, width, height } => {
                let r = plane_rect(Rect { x, y, width, height }, 1, f);
                Some(Op::Crop { x: r.x, y: r.y, width: r.width, height: r.height })
            }
            other => Some(other),
        })
        .collect();
    Some((pipeline.clone(), Pipeline(chroma)))
}

/// Whether every op of `ops` keeps chroma cells whole on a `w`×`h` frame with chroma factors
/// `f`, and every crop is inside the frame it is applied to.
pub(crate) fn fits(ops: &[Op], (mut w, mut h): (u32, u32), (mut fw, mut fh): (u32, u32)) -> bool {
    for op in ops {
        match *op {
            Op::Crop { x, y, width, height } => {
                let inside = x as u64 + width as u64 <= w as u64 && y as u64 + height as u64 <= h as u64;
                if !inside || x % fw != 0 || y % fh != 0 {
                    return false;
                }
                (w, h) = (width, height);
            }
            Op::Rotate { degrees } => {
                // What ends up on the left or top: the bottom rows at 90°, the right columns
                // at 270°, both at 180°.
                let (bottom, right) = match degrees { 90 => (true, false), 180 => (true, true), _ => (false, true) };
                if (bottom && h % fh != 0) || (right && w % fw != 0) {
                    return false;
                }
                if degrees != 180 {
                    (w, h, fw, fh) = (h, w, fh, fw);
                }
            }
            // Whole chroma cells in and out, so the chroma planes resample exactly the frame's
            // extent (an odd size's last chroma sample covers half a cell: it would shift).
            Op::Resize { width, height } => {
                if w % fw != 0 || h % fh != 0 || width % fw != 0 || height % fh != 0 {
                    return false;
                }
                (w, h) = (width, height);
            }
            Op::Blur { .. } | Op::Sharpen => {}
            _ => return false,
        }
    }
    true
}

/// One op on the planes (the frame fits: [`fits`]).
pub(crate) fn apply(op: &Op, p: Planes) -> Planes {
    let (fw, fh) = factors(p.subsamp).expect("plain subsampling");
    match *op {
        Op::Blur { sigma } => {
            let ky = crate::ops::gaussian_kernel(sigma);
            let kc = (crate::ops::gaussian_kernel(sigma / fw as f32), crate::ops::gaussian_kernel(sigma / fh as f32));
            let planes = p.planes.iter().enumerate().map(|(k, plane)| if k == 0 { crate::ops::blur_xy(plane, &ky, &ky) } else { crate::ops::blur_xy(plane, &kc.0, &kc.1) }).collect();
            Planes { planes, ..p }
        }
        Op::Sharpen => {
            let mut planes = p.planes;
            planes[0] = crate::ops::sharpen(&planes[0]);
            Planes { planes, ..p }
        }
        Op::Resize { width, height } => {
            let planes = p.planes.iter().enumerate().map(|(k, plane)| {
                let (w, h) = if k == 0 { (width, height) } else { (width.div_ceil(fw), height.div_ceil(fh)) };
                crate::ops::resize(plane, w, h).expect("a resize to at least 1x1")
            });
            Planes { planes: planes.collect(), ..p }
        }
        Op::Crop { x, y, width, height } => {
            let s = Rect { x, y, width, height };
            let planes = p.planes.iter().enumerate().map(|(k, plane)| {
                let r = plane_rect(s, k, (fw, fh));
                crate::ops::crop(plane, r.x, r.y, r.width, r.height)
            });
            Planes { planes: planes.collect(), ..p }
        }
        Op::Rotate { degrees } => {
            let planes = p.planes.iter().map(|plane| crate::ops::rotate(plane, degrees)).collect();
            let subsamp = if degrees == 180 { p.subsamp } else { turned(p.subsamp) };
            Planes { planes, subsamp }
        }
        _ => unreachable!("{op} has no definition on the planes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::Apply;

    /// testdata/images/coffee.png: texture and saturated colour everywhere.
    fn photo() -> Img {
        crate::ops::tests::coffee()
    }

    /// A `w`×`h` JPEG of the photo's middle.
    fn jpeg_of(img: &Img, w: u32, h: u32, subsamp: Subsamp) -> Vec<u8> {
        let img = crate::ops::crop(img, (img.width - w) / 2, (img.height - h) / 2, w, h);
        let image = turbojpeg::Image { pixels: &img.data[..], width: w as usize, pitch: w as usize * 3, height: h as usize, format: turbojpeg::PixelFormat::RGB };
        turbojpeg::compress(image, 90, subsamp).unwrap().to_vec()
    }

    /// The source's planes as libjpeg-turbo decodes them, each as (width, height, samples),
    /// read out of TurboJPEG's own padded layout (independently of `PlaneOps::decode`).
    fn source_planes(jpeg: &[u8]) -> Vec<(usize, usize, Vec<u8>)> {
        let yuv = turbojpeg::decompress_to_yuv(jpeg).unwrap();
        let (w, h) = (yuv.width, yuv.height);
        let (yw, yh, cw, ch) = (yuv.y_width(), yuv.y_height(), yuv.uv_width(), yuv.uv_height());
        let mut out = vec![(w, h, (0..h).flat_map(|r| yuv.pixels[r * yw..r * yw + w].to_vec()).collect())];
        if yuv.subsamp != Subsamp::Gray {
            for k in 0..2 {
                let at = yw * yh + k * cw * ch;
                let (vw, vh) = (w.div_ceil(yuv.subsamp.width()), h.div_ceil(yuv.subsamp.height()));
                out.push((vw, vh, (0..vh).flat_map(|r| yuv.pixels[at + r * cw..at + r * cw + vw].to_vec()).collect()));
            }
        }
        out
    }

    /// The Gaussian by its definition, one sample at a time: clamped taps, the weights of
    /// `gaussian_kernel` (tested against SciPy in ops.rs), rounding after each pass.
    fn blur_by_definition((w, h, data): &(usize, usize, Vec<u8>), sx: f32, sy: f32) -> Vec<u8> {
        let pass = |src: &[u8], sigma: f32, horizontal: bool| -> Vec<u8> {
            let k = crate::ops::gaussian_kernel(sigma);
            let r = (k.len() / 2) as isize;
            let mut out = vec![0u8; src.len()];
            for y in 0..*h as isize {
                for x in 0..*w as isize {
                    let mut acc = 32768u32;
                    for (i, wt) in k.iter().enumerate() {
                        let d = i as isize - r;
                        let (px, py) = if horizontal { ((x + d).clamp(0, *w as isize - 1), y) } else { (x, (y + d).clamp(0, *h as isize - 1)) };
                        acc += wt * src[(py * *w as isize + px) as usize] as u32;
                    }
                    out[(y * *w as isize + x) as usize] = (acc >> 16) as u8;
                }
            }
            out
        };
        pass(&pass(data, sx, true), sy, false)
    }

    /// The sharpen kernel by its definition, one sample at a time.
    fn sharpen_by_definition((w, h, data): &(usize, usize, Vec<u8>)) -> Vec<u8> {
        let (w, h) = (*w as isize, *h as isize);
        let at = |x: isize, y: isize| data[(y.clamp(0, h - 1) * w + x.clamp(0, w - 1)) as usize] as i32;
        let mut out = Vec::with_capacity(data.len());
        for y in 0..h {
            for x in 0..w {
                out.push((5 * at(x, y) - at(x - 1, y) - at(x + 1, y) - at(x, y - 1) - at(x, y + 1)).clamp(0, 255) as u8);
            }
        }
        out
    }

    fn decoded_planes(jpeg: &[u8]) -> Planes {
        let header = turbojpeg::read_header(jpeg).unwrap();
        PlaneOps::new(&Pipeline::parse("").unwrap(), 90).unwrap().decode(jpeg, &header).unwrap()
    }

    /// Blur and sharpen on every subsampling, odd sizes included: each plane is its source
    /// plane through the definition above, sample for sample.
    #[test]
    fn colour_ops_on_planes_follow_their_definitions() {
        let src = photo();
        for (w, h) in [(96u32, 64u32), (97, 63)] {
            for subsamp in [Subsamp::Sub2x2, Subsamp::Sub2x1, Subsamp::None, Subsamp::Gray] {
                let jpeg = jpeg_of(&src, w, h, subsamp);
                let source = source_planes(&jpeg);
                let (fw, fh) = factors(subsamp).unwrap();
                let planes = decoded_planes(&jpeg);
                for (k, want) in source.iter().enumerate() {
                    let got = &planes.planes[k];
                    assert_eq!(((got.width as usize, got.height as usize), &got.data), ((want.0, want.1), &want.2), "{w}x{h} {subsamp:?}: plane {k} as decoded");
                }
                for sigma in [0.6f32, 1.5, 3.0] {
                    let got = apply(&Op::Blur { sigma }, planes.clone());
                    for (k, plane) in source.iter().enumerate() {
                        let (sx, sy) = if k == 0 { (sigma, sigma) } else { (sigma / fw as f32, sigma / fh as f32) };
                        assert_eq!(got.planes[k].data, blur_by_definition(plane, sx, sy), "{w}x{h} {subsamp:?} blur:{sigma}: plane {k}");
                    }
                }
                // Rotations and a crop by their index formulas (90°: out(x, y) = in(y, H-1-x)).
                let turns: &[u16] = if subsamp == Subsamp::Gray || (h % fh == 0 && w % fw == 0) { &[90, 180, 270] } else { &[] };
                for &degrees in turns {
                    let got = apply(&Op::Rotate { degrees }, planes.clone());
                    let turned_subsamp = if degrees == 180 { subsamp } else { turned(subsamp) };
                    assert_eq!(got.subsamp, turned_subsamp);
                    for (k, (sw, sh, data)) in source.iter().enumerate() {
                        let at = |x: usize, y: usize| data[y * sw + x];
                        let (ow, oh) = if degrees == 180 { (*sw, *sh) } else { (*sh, *sw) };
                        let want: Vec<u8> = (0..oh).flat_map(|y| (0..ow).map(move |x| (x, y))).map(|(x, y)| match degrees {
                            90 => at(y, sh - 1 - x),
                            180 => at(sw - 1 - x, sh - 1 - y),
                            _ => at(sw - 1 - y, x),
                        }).collect();
                        assert_eq!((got.planes[k].width as usize, got.planes[k].height as usize), (ow, oh), "{w}x{h} {subsamp:?} rotate:{degrees}: plane {k} size");
                        assert_eq!(got.planes[k].data, want, "{w}x{h} {subsamp:?} rotate:{degrees}: plane {k}");
                    }
                }
                let (cx, cy, cw, ch) = (4 * fw, 2 * fh, 33, 21);
                assert!(fits(&[Op::Crop { x: cx, y: cy, width: cw, height: ch }], (w, h), (fw, fh)));
                let got = apply(&Op::Crop { x: cx, y: cy, width: cw, height: ch }, planes.clone());
                for (k, (sw, _, data)) in source.iter().enumerate() {
                    let (f, g) = if k == 0 { (1, 1) } else { (fw, fh) };
                    let (x0, y0, pw, ph) = ((cx / f) as usize, (cy / g) as usize, cw.div_ceil(f) as usize, ch.div_ceil(g) as usize);
                    let want: Vec<u8> = (y0..y0 + ph).flat_map(|y| data[y * sw + x0..y * sw + x0 + pw].to_vec()).collect();
                    assert_eq!(got.planes[k].data, want, "{w}x{h} {subsamp:?} crop: plane {k}");
                }
                let got = apply(&Op::Sharpen, planes.clone());
                assert_eq!(got.planes[0].data, sharpen_by_definition(&source[0]), "{w}x{h} {subsamp:?} sharpen: Y");
                for k in 1..source.len() {
                    assert_eq!(got.planes[k].data, source[k].2, "{w}x{h} {subsamp:?} sharpen: chroma plane {k} unchanged");
                }
            }
        }
    }

    /// The per-plane pipelines (what the GPU backend runs) are the definitions: each plane
    /// through its pipeline by `crate::ops` equals the ops applied on the planes together.
    #[test]
    fn per_plane_pipelines_are_the_plane_definitions() {
        let src = photo();
        for (w, h) in [(96u32, 64u32), (97, 63)] {
            let planes = decoded_planes(&jpeg_of(&src, w, h, Subsamp::Sub2x2));
            for spec in ["", "blur:1.5", "sharpen", "blur:0.6,sharpen,blur:3", "rotate:90,blur:2,sharpen", "blur:1,rotate:270,crop:41x23+6+4,sharpen", "rotate:180,crop:33x21+2+8,blur:1",
                         "resize:46x32", "blur:1,resize:130x78,rotate:90"] {
                let pipeline = Pipeline::parse(spec).unwrap();
                let (luma, chroma) = plane_pipelines(&pipeline).unwrap();
                if !fits(&pipeline.0, (w, h), (2, 2)) {
                    assert!(w % 2 == 1 && (spec.contains("rotate") || spec.contains("resize")), "{w}x{h} `{spec}` should fit");
                    continue;
                }
                let want = PlaneOps::new(&pipeline, 90).unwrap().run(planes.clone(), &mut Vec::new());
                for (k, plane) in planes.planes.iter().enumerate() {
                    let got = if k == 0 { &luma } else { &chroma }.apply(plane.clone()).unwrap();
                    assert_eq!(got, want.planes[k], "{w}x{h} `{spec}`: plane {k}");
                }
            }
        }
        for spec in ["blur:1,grayscale", "grayscale", "crop:10x10+0+0,blur:1", "rotate:90"] {
            assert!(plane_pipelines(&Pipeline::parse(spec).unwrap()).is_none(), "`{spec}` does not run on the planes");
        }
    }

    /// Whole pipelines: where the planes path is taken, the JPEG decodes close to the RGB
    /// pixel path's result (the definitions differ by rounding and the chroma grid); where the
    /// chroma grid does not allow it, it is not taken.
    #[test]
    fn pipelines_on_planes_decode_close_to_the_pixel_path() {
        let src = photo();
        for (w, h) in [(320u32, 240u32), (321, 241)] {
            for subsamp in [Subsamp::Sub2x2, Subsamp::Sub2x1, Subsamp::None] {
                let jpeg = jpeg_of(&src, w, h, subsamp);
                let header = turbojpeg::read_header(&jpeg).unwrap();
                let (fw, fh) = factors(subsamp).unwrap();
                for spec in ["", "blur:1.5", "sharpen", "blur:0.8,sharpen", "rotate:90,blur:2", "blur:1,crop:200x100+10+20,rotate:270", "sharpen,rotate:180", "blur:1,crop:200x100+11+20",
                             "resize:150x100", "resize:100x70,blur:1", "blur:1,resize:161x121", "resize:200x150,rotate:90", "resize:640x480"] {
                    let pipeline = Pipeline::parse(spec).unwrap();
                    let what = format!("{w}x{h} {subsamp:?} `{spec}`");
                    let mut p = PlaneOps::new(&pipeline, 90).unwrap();
                    let mut times = Vec::new();
                    let got = p.apply(&jpeg, &header, &mut times);
                    // The chroma grid's verdict, written out for these pipelines; frames that
                    // are not 4:2:0 always take the RGB path.
                    let fits = subsamp == Subsamp::Sub2x2 && match spec {
                        "rotate:90,blur:2" => h % fh == 0,
                        "sharpen,rotate:180" => h % fh == 0 && w % fw == 0,
                        "blur:1,crop:200x100+11+20" | "blur:1,resize:161x121" => false,
                        // Whole chroma cells in and out (the DCT-scaled size of an odd frame is odd).
                        s if s.contains("resize") => w % 2 == 0 && h % 2 == 0,
                        _ => true,
                    };
                    let Some((out, size)) = got else {
                        assert!(!fits, "{what}: fits the chroma grid but was refused");
                        continue;
                    };
                    assert!(fits, "{what}: taken off the chroma grid");
                    assert_eq!(times.len(), pipeline.0.len(), "{what}: a time per op");
                    let decoded = turbojpeg::decompress(&out, turbojpeg::PixelFormat::RGB).unwrap();
                    // The RGB path's own decode: at the DCT scale for a leading resize.
                    let at_least = match pipeline.0.first() {
                        Some(&Op::Resize { width, height }) => Some((width, height)),
                        _ => None,
                    };
                    let reference = pipeline.apply(crate::decode::Decoder::new().decode(&jpeg, u64::MAX, at_least).unwrap()).unwrap();
                    assert_eq!((decoded.width as u32, decoded.height as u32), size, "{what}");
                    assert_eq!(size, (reference.width, reference.height), "{what}");
                    let mean = decoded.pixels.iter().zip(&reference.data).map(|(a, b)| a.abs_diff(*b) as f64).sum::<f64>() / reference.data.len() as f64;
                    // Against what the RGB path's own result loses to its JPEG encode (the same
                    // quality): the planes' result is no further from the RGB definition than that,
                    // give or take half a level (`sharpen` keeps the chroma RGB sharpens; a resize
                    // resamples the chroma on its own grid).
                    let rgb_path = crate::decode::encode(&reference, 90).unwrap();
                    let back = turbojpeg::decompress(&rgb_path, turbojpeg::PixelFormat::RGB).unwrap();
                    let own = back.pixels.iter().zip(&reference.data).map(|(a, b)| a.abs_diff(*b) as f64).sum::<f64>() / reference.data.len() as f64;
                    assert!(mean < own + 0.5 && mean < 5.0, "{what}: decodes {mean:.2} levels from the pixel path on average; the RGB path's own JPEG {own:.2}");
                    eprintln!("{what}: {mean:.2} levels from the RGB definition on average (the RGB path's own JPEG: {own:.2})");
                }
            }
        }
    }

    /// `resize` on the planes: each plane through the Lanczos3 of `ops::resize` (tested against
    /// Pillow in ops.rs) to its own size — Y to W×H, chroma to its subsampling of it (even
    /// frames only: an odd one takes the RGB path); a leading
    /// resize decodes the planes at the RGB path's DCT scale, equal to libjpeg-turbo's own
    /// scaled YUV decode (a fresh decompressor here).
    #[test]
    fn resize_on_planes_follows_its_definition_from_a_dct_scaled_decode() {
        let src = photo();
        for (w, h) in [(320u32, 240u32), (321, 241)] {
            let jpeg = jpeg_of(&src, w, h, Subsamp::Sub2x2);
            let header = turbojpeg::read_header(&jpeg).unwrap();
            for ((tw, th), scale) in [((150u32, 100u32), 4usize), ((70, 50), 2), ((60, 30), 2), ((40, 30), 1), ((200, 200), 8), ((640, 480), 8)] {
                let pipeline = Pipeline::parse(&format!("resize:{tw}x{th}")).unwrap();
                let mut p = PlaneOps::new(&pipeline, 90).unwrap();
                let Some(planes) = p.prepare(&jpeg, &header) else {
                    assert!(w % 2 == 1, "{w}x{h} -> {tw}x{th}: an even 4:2:0 frame takes the planes");
                    continue;
                };
                assert!(w % 2 == 0, "{w}x{h}: an odd frame's chroma would shift: the RGB path");
                let f = turbojpeg::ScalingFactor::new(scale, 8);
                assert_eq!(crate::decode::dct_scale(&header, (tw, th)), if scale == 8 { turbojpeg::ScalingFactor::ONE } else { f });
                let mut d = turbojpeg::Decompressor::new().unwrap();
                d.set_scaling_factor(f).unwrap();
                let s = header.scaled(f);
                let probe = turbojpeg::YuvImage { pixels: (), width: s.width, align: 1, height: s.height, subsamp: Subsamp::Sub2x2 };
                let ((pw, ph), (uw, uh)) = (probe.y_size(), probe.uv_size());
                let mut buf = vec![0u8; pw * ph + 2 * uw * uh];
                d.decompress_to_yuv(&jpeg, turbojpeg::YuvImage { pixels: &mut buf[..], width: s.width, align: 1, height: s.height, subsamp: Subsamp::Sub2x2 }).unwrap();
                let (yw, cw, ch) = (pw, uw, uh);
                assert_eq!((cw, ch), (s.width.div_ceil(2), s.height.div_ceil(2)));
                let y: Vec<u8> = (0..s.height).flat_map(|r| buf[r * yw..r * yw + s.width].to_vec()).collect();
                let at = pw * ph;
                assert_eq!((planes.planes[0].width as usize, planes.planes[0].height as usize, &planes.planes[0].data), (s.width, s.height, &y), "{w}x{h} -> {tw}x{th}: Y at 1/{}", 8 / scale);
                assert_eq!(planes.planes[1].data, buf[at..at + cw * ch], "{w}x{h} -> {tw}x{th}: Cb");
                assert_eq!(planes.planes[2].data, buf[at + cw * ch..at + 2 * cw * ch], "{w}x{h} -> {tw}x{th}: Cr");
                let out = p.run(planes.clone(), &mut Vec::new());
                let want = [crate::ops::resize(&planes.planes[0], tw, th).unwrap(), crate::ops::resize(&planes.planes[1], tw.div_ceil(2), th.div_ceil(2)).unwrap(), crate::ops::resize(&planes.planes[2], tw.div_ceil(2), th.div_ceil(2)).unwrap()];
                assert_eq!(out.planes, want, "{w}x{h} -> {tw}x{th}");
                let (jpeg_out, size) = p.finish(out).unwrap();
                assert_eq!((size, turbojpeg::read_header(&jpeg_out).unwrap().subsamp), ((tw, th), Subsamp::Sub2x2));
            }
        }
    }

    #[test]
    fn only_pipelines_with_a_definition_on_the_planes_take_them() {
        let yes = |spec: &str| PlaneOps::new(&Pipeline::parse(spec).unwrap(), 85).is_some();
        assert!(yes("") && yes("blur:1") && yes("sharpen") && yes("rotate:90,sharpen,crop:10x10+2+2") && yes("resize:64x64,blur:1") && yes("resize:64x64"));
        assert!(!yes("rotate:90") && !yes("crop:10x10+0+0,blur:1") && !yes("blur:1,grayscale") && !yes("resize:64x64,grayscale") && !yes("sobel"));
        // A crop outside the frame it meets: the pixel path names it.
        assert!(!fits(&Pipeline::parse("blur:1,crop:100x100+0+0").unwrap().0, (64, 64), (2, 2)));
        assert!(fits(&Pipeline::parse("rotate:90,crop:10x20+2+4").unwrap().0, (64, 62), (2, 1)));
        assert!(!fits(&Pipeline::parse("rotate:90,crop:10x20+2+3").unwrap().0, (64, 62), (2, 1)), "4:4:0 after the turn: rows in pairs");
    }
}
