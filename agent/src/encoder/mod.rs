//! JPEG encoding with libjpeg-turbo, and the pool of threads that runs it.
//!
//! - RGB frames are compressed as they are.
//! - YUYV (packed 4:2:2) is split into Y, U, V planes and compressed from YUV with
//!   `tj3CompressFromYUVPlanes8` — no RGB round trip. Studio-range camera values are stretched
//!   to JPEG's full range on the way (a lookup table). 4:2:0 output averages each pair of chroma
//!   rows; 4:2:2 keeps them. (4:4:4 goes through RGB; gray uses the Y plane only.)
//! - 4:2:0 sources ([`yuv420`]: I420 and NV12 in studio range, J420 in full range) are
//!   compressed from their planes the same way; a J420 frame of even size at 4:2:0 (or gray)
//!   is handed to libjpeg-turbo as it is, with no pass over its pixels.
//! - JPEG/MJPEG input is forwarded untouched unless it must be downscaled; then it is decoded
//!   with DCT-domain scaling to the nearest size ≥ the target and resized.
//! - Rows may be padded (`stride` > width × bytes per pixel), as V4L2 drivers do.
//!
//! Each camera is pinned to one encoder thread, so a camera's frames leave the pool in order.

use bytes::Bytes;
use serde::Deserialize;
use turbojpeg::{Compressor, Decompressor, Image, OutputBuf, PixelFormat as TjFormat, Subsamp, YuvPlanesImage};

use crate::frame::{Captured, PixelFormat};

pub mod stretch;
pub mod strips;
pub mod yuv420;
use yuv420::{LUMA_TO_FULL, Yuv420};

/// `[encoder]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderConfig {
    /// JPEG quality 1–100. Default 80.
    #[serde(default = "default_quality")]
    pub quality: u8,
    /// Chroma subsampling: `4:2:0` (default), `4:2:2`, `4:4:4` or `gray`.
    #[serde(default)]
    pub subsampling: Subsampling,
    /// Downscale frames wider than this (keeping the aspect ratio). Default: no limit.
    pub max_width: Option<u32>,
    /// Downscale frames taller than this (keeping the aspect ratio). Default: no limit.
    pub max_height: Option<u32>,
    /// Encoder threads; 0 = one per CPU core. Default 0.
    #[serde(default)]
    pub threads: usize,
}

fn default_quality() -> u8 {
    80
}

impl Default for EncoderConfig {
    fn default() -> Self {
        crate::defaults::section("encoder")
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum Subsampling {
    #[default]
    #[serde(rename = "4:2:0")]
    S420,
    #[serde(rename = "4:2:2")]
    S422,
    #[serde(rename = "4:4:4")]
    S444,
    #[serde(rename = "gray")]
    Gray,
}

impl Subsampling {
    fn tj(self) -> Subsamp {
        match self {
            Self::S420 => Subsamp::Sub2x2,
            Self::S422 => Subsamp::Sub2x1,
            Self::S444 => Subsamp::None,
            Self::Gray => Subsamp::Gray,
        }
    }
}

impl EncoderConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(1..=100).contains(&self.quality) {
            anyhow::bail!("config key `encoder.quality`: {} is not from 1 to 100", self.quality);
        }
        for (k, v) in [("encoder.max_width", self.max_width), ("encoder.max_height", self.max_height)] {
            if v == Some(0) {
                anyhow::bail!("config key `{k}`: must be at least 1");
            }
        }
        Ok(())
    }

    pub fn thread_count(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        }
    }

    /// The size a `w`×`h` frame is encoded at.
    pub fn target_size(&self, w: u32, h: u32) -> (u32, u32) {
        let sx = self.max_width.map_or(1.0, |m| (m as f64 / w as f64).min(1.0));
        let sy = self.max_height.map_or(1.0, |m| (m as f64 / h as f64).min(1.0));
        let s = sx.min(sy);
        if s >= 1.0 {
            (w, h)
        } else {
            (((w as f64 * s).round() as u32).max(1), ((h as f64 * s).round() as u32).max(1))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("frame buffer of {len} bytes is too small for {width}x{height} {format:?} with stride {stride}")]
    ShortBuffer { len: usize, width: u32, height: u32, stride: usize, format: PixelFormat },
    #[error("YUYV frames need an even width, got {0}")]
    OddYuyvWidth(u32),
    #[error("libjpeg-turbo: {0}")]
    Turbo(#[from] turbojpeg::Error),
    #[error("libjpeg-turbo (strip encoder): {0}")]
    Strips(String),
}

/// An encoded image and its size.
#[derive(Debug)]
pub struct Encoded {
    pub jpeg: Bytes,
    pub width: u32,
    pub height: u32,
}

/// One encoder (per thread): reusable libjpeg-turbo handles and buffers.
pub struct Encoder {
    cfg: EncoderConfig,
    compressor: Compressor,
    decompressor: Option<Decompressor>,
    planes: [Vec<u8>; 3],
    strips: strips::StripEncoder,
}

impl Encoder {
    pub fn new(cfg: EncoderConfig) -> Result<Self, EncodeError> {
        let mut compressor = Compressor::new()?;
        compressor.set_quality(cfg.quality as i32)?;
        compressor.set_subsamp(cfg.subsampling.tj())?;
        Ok(Self { cfg, compressor, decompressor: None, planes: Default::default(), strips: Default::default() })
    }

    pub fn encode(&mut self, f: &Captured) -> Result<Encoded, EncodeError> {
        let (tw, th) = self.cfg.target_size(f.width, f.height);
        let resize = (tw, th) != (f.width, f.height);
        match f.format {
            PixelFormat::Jpeg if !resize => Ok(Encoded { jpeg: f.data.clone(), width: f.width, height: f.height }),
            PixelFormat::Jpeg => {
                let rgb = self.decode_scaled(&f.data, tw, th)?;
                self.compress_rgb(&rgb.0, rgb.1, rgb.2, rgb.1 as usize * 3, Some((tw, th)))
            }
            PixelFormat::Rgb24 => {
                check_len(f, 3)?;
                self.compress_rgb(&f.data, f.width, f.height, f.stride, resize.then_some((tw, th)))
            }
            PixelFormat::I420 | PixelFormat::J420 | PixelFormat::Nv12 => {
                let planes = Yuv420::of(f)?;
                if resize || matches!(self.cfg.subsampling, Subsampling::S444) {
                    let rgb = planes.to_rgb();
                    self.compress_rgb(&rgb, f.width, f.height, f.width as usize * 3, resize.then_some((tw, th)))
                } else {
                    self.compress_yuv420(&planes)
                }
            }
            PixelFormat::Yuyv => {
                check_len(f, 2)?;
                if !f.width.is_multiple_of(2) {
                    return Err(EncodeError::OddYuyvWidth(f.width));
                }
                if resize || matches!(self.cfg.subsampling, Subsampling::S444) {
                    let rgb = yuyv_to_rgb(&f.data, f.width, f.height, f.stride);
                    self.compress_rgb(&rgb, f.width, f.height, f.width as usize * 3, resize.then_some((tw, th)))
                } else {
                    self.compress_yuyv(f)
                }
            }
        }
    }

    fn compress_rgb(&mut self, data: &[u8], w: u32, h: u32, stride: usize, resize: Option<(u32, u32)>) -> Result<Encoded, EncodeError> {
        let resized;
        let (data, w, h, stride) = match resize {
            Some((tw, th)) => {
                let mut tight = Vec::with_capacity(w as usize * h as usize * 3);
                for row in data.chunks(stride).take(h as usize) {
                    tight.extend_from_slice(&row[..w as usize * 3]);
                }
                let img = image::RgbImage::from_raw(w, h, tight).expect("sized above");
                resized = image::imageops::resize(&img, tw, th, image::imageops::FilterType::Triangle).into_raw();
                (&resized[..], tw, th, tw as usize * 3)
            }
            None => (data, w, h, stride),
        };
        let image = Image { pixels: data, width: w as usize, pitch: stride, height: h as usize, format: TjFormat::RGB };
        self.compressor.set_subsamp(self.cfg.subsampling.tj())?;
        let jpeg = self.compressor.compress_to_vec(image)?;
        Ok(Encoded { jpeg: Bytes::from(jpeg), width: w, height: h })
    }

    /// YUYV → Y, U, V planes (4:2:2, or 4:2:0 by averaging chroma row pairs) → JPEG, one strip
    /// at a time ([`strips`]); gray: the luma plane.
    fn compress_yuyv(&mut self, f: &Captured) -> Result<Encoded, EncodeError> {
        let (w, h) = (f.width as usize, f.height as usize);
        let cw = w / 2;
        if self.cfg.subsampling == Subsampling::Gray {
            let y = &mut self.planes[0];
            y.resize(w * h, 0);
            for (row, yrow) in f.data.chunks(f.stride).take(h).zip(y.chunks_exact_mut(w)) {
                for (d, px) in yrow.chunks_exact_mut(2).zip(row[..w * 2].chunks_exact(4)) {
                    (d[0], d[1]) = (LUMA_TO_FULL[px[0] as usize], LUMA_TO_FULL[px[2] as usize]);
                }
            }
            return self.compress_planes(w, h, w, cw);
        }
        let s420 = self.cfg.subsampling == Subsampling::S420;
        let row = |r: usize| &f.data[r * f.stride..r * f.stride + w * 2];
        // The second row of a 4:2:0 pair lands here and is averaged into the first.
        let (mut u2, mut v2) = (vec![0u8; cw], vec![0u8; cw]);
        let fill = |s: strips::Strip<'_>| {
            let [y, u, v] = s.planes;
            let [yw, cpw, _] = s.widths;
            for j in 0..s.rows[0] {
                let r = s.first_row + j;
                let (c, second) = if s420 { (j / 2, j % 2 == 1) } else { (j, false) };
                if r >= h {
                    // Past the frame's last row (never a strip's first): it repeats, and so
                    // does the last chroma row.
                    y.copy_within((j - 1) * yw..j * yw, j * yw);
                    if !second {
                        u.copy_within((c - 1) * cpw..c * cpw, c * cpw);
                        v.copy_within((c - 1) * cpw..c * cpw, c * cpw);
                    }
                    continue;
                }
                let yrow = &mut y[j * yw..j * yw + w];
                let (urow, vrow) = (&mut u[c * cpw..c * cpw + cw], &mut v[c * cpw..c * cpw + cw]);
                if second {
                    stretch::yuyv_row(row(r), yrow, &mut u2, &mut v2);
                    stretch::average_into(urow, &u2);
                    stretch::average_into(vrow, &v2);
                } else {
                    stretch::yuyv_row(row(r), yrow, urow, vrow);
                }
            }
            // Rows padded to whole blocks with their last sample.
            for yrow in y.chunks_exact_mut(yw) {
                pad_row(yrow, w);
            }
            for (urow, vrow) in u.chunks_exact_mut(cpw).zip(v.chunks_exact_mut(cpw)) {
                pad_row(urow, cw);
                pad_row(vrow, cw);
            }
        };
        let samp = if s420 { (2, 2) } else { (2, 1) };
        let jpeg = self.strips.encode(f.width, f.height, self.cfg.quality, samp, fill).map_err(EncodeError::Strips)?;
        Ok(Encoded { jpeg: Bytes::from(jpeg), width: f.width, height: f.height })
    }

    /// A 4:2:0 frame → full-range Y, U, V planes (4:2:0 as they are, 4:2:2 by repeating
    /// chroma rows, or luma alone) → JPEG: no RGB round trip. Full-range planar input that
    /// needs no padding goes to libjpeg-turbo straight from the frame's buffer; the rest
    /// (NV12, studio-range I420, odd sizes) is converted one strip at a time, gray output
    /// through the luma plane.
    fn compress_yuv420(&mut self, p: &Yuv420) -> Result<Encoded, EncodeError> {
        let (w, h, cw) = (p.w, p.h, p.cw);
        let gray = self.cfg.subsampling == Subsampling::Gray;
        let s420 = self.cfg.subsampling == Subsampling::S420;
        if let (true, Some((u, v))) = (p.full_range && (gray || (s420 && w % 2 == 0 && h % 2 == 0)), p.uv_planes()) {
            return self.compress_yuv(p.y_plane(), u, v, w, h, w, cw);
        }
        if !gray {
            return self.compress_yuv420_strips(p, s420);
        }
        self.compress_yuv420_planes(p)
    }

    /// [`Encoder::compress_yuv420`] one strip at a time ([`strips`]): each iMCU row's planes are
    /// converted from the frame's buffer (NV12's chroma pairs split, studio range stretched)
    /// into cache-sized strips and encoded at once — TurboJPEG's JPEG of the whole planes that
    /// [`Encoder::compress_yuv420_planes`] makes, byte for byte.
    fn compress_yuv420_strips(&mut self, p: &Yuv420, s420: bool) -> Result<Encoded, EncodeError> {
        let (w, h, cw, ch) = (p.w, p.h, p.cw, p.ch);
        let fill = |s: strips::Strip<'_>| {
            let [y, u, v] = s.planes;
            let [yw, cpw, _] = s.widths;
            for (j, yrow) in y.chunks_exact_mut(yw).take(s.rows[0]).enumerate() {
                // Rows past the frame's last repeat it; samples past a row's end its last one.
                let src = p.y_row((s.first_row + j).min(h - 1));
                if p.full_range {
                    yrow[..w].copy_from_slice(src);
                } else {
                    stretch::luma_row(src, &mut yrow[..w]);
                }
                pad_row(yrow, w);
            }
            for (j, (urow, vrow)) in u.chunks_exact_mut(cpw).zip(v.chunks_exact_mut(cpw)).take(s.rows[1]).enumerate() {
                // 4:2:0: the strip's chroma rows are the source's; 4:2:2: each source row twice.
                let r = if s420 { (s.first_row / 2 + j).min(ch - 1) } else { (s.first_row + j).min(h - 1) / 2 };
                p.chroma_row_into(r, &mut urow[..cw], &mut vrow[..cw]);
                pad_row(urow, cw);
                pad_row(vrow, cw);
            }
        };
        let samp = if s420 { (2, 2) } else { (2, 1) };
        let jpeg = self.strips.encode(w as u32, h as u32, self.cfg.quality, samp, fill).map_err(EncodeError::Strips)?;
        Ok(Encoded { jpeg: Bytes::from(jpeg), width: w as u32, height: h as u32 })
    }

    /// [`Encoder::compress_yuv420`] through whole-frame planes: gray output (the luma plane),
    /// and the reference the strips are tested against.
    fn compress_yuv420_planes(&mut self, p: &Yuv420) -> Result<Encoded, EncodeError> {
        let (w, h, cw, ch) = (p.w, p.h, p.cw, p.ch);
        let gray = self.cfg.subsampling == Subsampling::Gray;
        let s420 = self.cfg.subsampling == Subsampling::S420;
        let out_ch = if s420 { ch } else { h };
        // libjpeg-turbo wants the luma plane padded to whole chroma blocks (odd sizes): the
        // last column and row are repeated.
        let pw = if gray { w } else { cw * 2 };
        let ph = if s420 { ch * 2 } else { h };
        let [y, u, v] = &mut self.planes;
        y.clear();
        for r in 0..ph {
            let row = p.y_row(r.min(h - 1));
            let at = y.len();
            if p.full_range {
                y.extend_from_slice(row);
            } else {
                y.resize(at + w, 0);
                stretch::luma_row(row, &mut y[at..]);
            }
            if pw > w {
                y.push(y[at + w - 1]);
            }
        }
        u.clear();
        v.clear();
        if !gray {
            for r in 0..out_ch {
                p.extend_chroma_row(if s420 { r } else { r / 2 }, u, v);
            }
        }
        self.compress_planes(w, h, pw, cw)
    }

    /// Compresses the planes in `self.planes` — luma rows `y_stride` apart, chroma `cw` wide,
    /// full range, laid out for the configured subsampling — into a `w`×`h` JPEG.
    fn compress_planes(&mut self, w: usize, h: usize, y_stride: usize, cw: usize) -> Result<Encoded, EncodeError> {
        // libjpeg-turbo wants luma rows for whole chroma blocks (an odd height at 4:2:0): the
        // last row is repeated.
        let rows = if self.cfg.subsampling == Subsampling::S420 { h.div_ceil(2) * 2 } else { h };
        let [y, u, v] = &mut self.planes;
        while y.len() < y_stride * rows {
            let last = y[y.len() - y_stride..].to_vec();
            y.extend_from_slice(&last);
        }
        let (y, u, v) = (std::mem::take(y), std::mem::take(u), std::mem::take(v));
        let out = self.compress_yuv(&y, &u, &v, w, h, y_stride, cw);
        self.planes = [y, u, v];
        out
    }

    /// Compresses full-range planes laid out for the configured subsampling (luma padded to
    /// whole chroma blocks) into a `w`×`h` JPEG.
    #[allow(clippy::too_many_arguments)]
    fn compress_yuv(&mut self, y: &[u8], u: &[u8], v: &[u8], w: usize, h: usize, y_stride: usize, cw: usize) -> Result<Encoded, EncodeError> {
        let mut out = OutputBuf::new_owned();
        if self.cfg.subsampling == Subsampling::Gray {
            // The luma plane is the gray image (the crate's YUV-planes call refuses a gray
            // layout without chroma planes).
            self.compressor.set_subsamp(Subsamp::Gray)?;
            let image = Image { pixels: y, width: w, pitch: y_stride, height: h, format: TjFormat::GRAY };
            self.compressor.compress(image, &mut out)?;
        } else {
            let subsamp = if self.cfg.subsampling == Subsampling::S420 { Subsamp::Sub2x2 } else { Subsamp::Sub2x1 };
            let planes = YuvPlanesImage { y_plane: y, u_plane: u, v_plane: v, width: w, height: h, y_stride, u_stride: cw, v_stride: cw, subsamp };
            self.compressor.compress_yuv_planes(&planes, &mut out)?;
        }
        Ok(Encoded { jpeg: Bytes::copy_from_slice(&out), width: w as u32, height: h as u32 })
    }

    /// Decodes a JPEG at the smallest DCT scale still ≥ (tw, th); returns RGB and its size.
    fn decode_scaled(&mut self, jpeg: &[u8], tw: u32, th: u32) -> Result<(Vec<u8>, u32, u32), EncodeError> {
        let d = match &mut self.decompressor {
            Some(d) => d,
            None => self.decompressor.insert(Decompressor::new()?),
        };
        let header = d.read_header(jpeg)?;
        let mut best = turbojpeg::ScalingFactor::ONE;
        for num in [1usize, 2, 3, 4, 5, 6, 7] {
            let f = turbojpeg::ScalingFactor::new(num, 8);
            let scaled = header.scaled(f);
            if scaled.width >= tw as usize && scaled.height >= th as usize {
                best = f;
                break;
            }
        }
        d.set_scaling_factor(best)?;
        let scaled = header.scaled(best);
        let mut rgb = vec![0u8; scaled.width * scaled.height * 3];
        let image = Image { pixels: &mut rgb[..], width: scaled.width, pitch: scaled.width * 3, height: scaled.height, format: TjFormat::RGB };
        d.decompress(jpeg, image)?;
        d.set_scaling_factor(turbojpeg::ScalingFactor::ONE)?;
        Ok((rgb, scaled.width as u32, scaled.height as u32))
    }
}

/// `row[n..]` set to `row[n - 1]` (a row padded to whole blocks, as libjpeg-turbo pads).
fn pad_row(row: &mut [u8], n: usize) {
    let last = row[n - 1];
    row[n..].fill(last);
}

fn check_len(f: &Captured, bpp: usize) -> Result<(), EncodeError> {
    let row = f.width as usize * bpp;
    let need = if f.height == 0 { 0 } else { f.stride * (f.height as usize - 1) + row };
    if f.stride < row || f.data.len() < need {
        return Err(EncodeError::ShortBuffer { len: f.data.len(), width: f.width, height: f.height, stride: f.stride, format: f.format });
    }
    Ok(())
}

/// One BT.601 studio-range YUV pixel → RGB.
fn yuv_to_rgb(y: u8, u: u8, v: u8) -> [u8; 3] {
    let c = (y as i32 - 16) * 298;
    let d = u as i32 - 128;
    let e = v as i32 - 128;
    let clamp = |x: i32| ((x + 128) >> 8).clamp(0, 255) as u8;
    [clamp(c + 409 * e), clamp(c - 100 * d - 208 * e), clamp(c + 516 * d)]
}

/// BT.601 (studio range) YUYV → RGB, for the paths that need RGB (resize, 4:4:4).
pub fn yuyv_to_rgb(data: &[u8], width: u32, height: u32, stride: usize) -> Vec<u8> {
    let w = width as usize;
    let mut out = Vec::with_capacity(w * height as usize * 3);
    for row in data.chunks(stride).take(height as usize) {
        for px in row[..w * 2].chunks_exact(4) {
            out.extend_from_slice(&yuv_to_rgb(px[0], px[1], px[3]));
            out.extend_from_slice(&yuv_to_rgb(px[2], px[1], px[3]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(format: PixelFormat, w: u32, h: u32, stride: usize, data: Vec<u8>) -> Captured {
        Captured { capture_ns: 0, width: w, height: h, stride, format, source_format: "X", data: Bytes::from(data), clock: Default::default() }
    }

    fn decode(jpeg: &[u8]) -> turbojpeg::Image<Vec<u8>> {
        turbojpeg::decompress(jpeg, TjFormat::RGB).unwrap()
    }

    fn photo_rgb() -> (Vec<u8>, u32, u32) {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/images/coffee.png");
        let img = image::open(p).unwrap().into_rgb8();
        let (w, h) = img.dimensions();
        (img.into_raw(), w, h)
    }

    /// RGB → YUYV (BT.601 studio range), as a camera would deliver, with `pad` bytes per row.
    fn rgb_to_yuyv(rgb: &[u8], w: usize, h: usize, pad: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let yuv = |p: &[u8]| {
            let (r, g, b) = (p[0] as i32, p[1] as i32, p[2] as i32);
            (
                (((66 * r + 129 * g + 25 * b + 128) >> 8) + 16) as u8,
                (((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128) as u8,
                (((112 * r - 94 * g - 18 * b + 128) >> 8) + 128) as u8,
            )
        };
        for y in 0..h {
            for x in (0..w).step_by(2) {
                let a = yuv(&rgb[(y * w + x) * 3..]);
                let b = yuv(&rgb[(y * w + x + 1) * 3..]);
                out.extend_from_slice(&[a.0, ((a.1 as u16 + b.1 as u16) / 2) as u8, b.0, ((a.2 as u16 + b.2 as u16) / 2) as u8]);
            }
            out.extend(std::iter::repeat_n(0xEE, pad));
        }
        out
    }

    fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (*x as i32 - *y as i32).abs() as f64).sum::<f64>() / a.len() as f64
    }

    #[test]
    fn rgb_photo_encodes_and_decodes_close_to_the_original() {
        let (rgb, w, h) = photo_rgb();
        let mut e = Encoder::new(EncoderConfig::default()).unwrap();
        let out = e.encode(&raw(PixelFormat::Rgb24, w, h, w as usize * 3, rgb.clone())).unwrap();
        assert_eq!((out.width, out.height), (w, h));
        let back = decode(&out.jpeg);
        assert_eq!((back.width, back.height), (w as usize, h as usize));
        let d = mean_abs_diff(&back.pixels, &rgb);
        assert!(d < 4.0, "mean abs error {d}");
    }

    /// RGB → I420 (BT.601 studio range, chroma of each 2x2 block averaged), as an H.264
    /// decoder delivers.
    fn rgb_to_i420(rgb: &[u8], w: usize, h: usize) -> Vec<u8> {
        let yuv = |p: &[u8]| {
            let (r, g, b) = (p[0] as i32, p[1] as i32, p[2] as i32);
            [((66 * r + 129 * g + 25 * b + 128) >> 8) + 16, ((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128, ((112 * r - 94 * g - 18 * b + 128) >> 8) + 128]
        };
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        let mut out = vec![0u8; w * h + 2 * cw * ch];
        let (mut us, mut vs) = (vec![(0i32, 0i32); cw * ch], vec![0i32; cw * ch]);
        for y in 0..h {
            for x in 0..w {
                let p = yuv(&rgb[(y * w + x) * 3..]);
                out[y * w + x] = p[0] as u8;
                let ci = (y / 2) * cw + x / 2;
                us[ci].0 += p[1];
                us[ci].1 += 1;
                vs[ci] += p[2];
            }
        }
        for (i, ((u, n), v)) in us.iter().zip(&vs).enumerate() {
            out[w * h + i] = (u / n) as u8;
            out[w * h + cw * ch + i] = (v / n) as u8;
        }
        out
    }

    #[test]
    fn i420_encodes_from_its_planes_and_through_rgb_close_to_the_photo() {
        let (rgb, w, h) = photo_rgb();
        let (w, h) = (w as usize - 1, h as usize - 1); // odd sizes: chroma planes round up
        let rgb: Vec<u8> = rgb.chunks((w + 1) * 3).take(h).flat_map(|r| r[..w * 3].to_vec()).collect();
        let i420 = rgb_to_i420(&rgb, w, h);
        for sub in [Subsampling::S420, Subsampling::S422, Subsampling::S444] {
            let mut e = Encoder::new(EncoderConfig { subsampling: sub, ..EncoderConfig::default() }).unwrap();
            let out = e.encode(&raw(PixelFormat::I420, w as u32, h as u32, w, i420.clone())).unwrap();
            let back = decode(&out.jpeg);
            assert_eq!((back.width, back.height), (w, h));
            let d = mean_abs_diff(&back.pixels, &rgb);
            assert!(d < 6.0, "{sub:?}: mean abs error {d}");
        }
        let mut e = Encoder::new(EncoderConfig::default()).unwrap();
        let err = e.encode(&raw(PixelFormat::I420, w as u32, h as u32, w, i420[..w * h].to_vec())).unwrap_err().to_string();
        assert!(err.contains("too small"), "{err}");
    }

    /// RGB → J420 (full range, chroma of each 2x2 block averaged).
    fn rgb_to_j420(rgb: &[u8], w: usize, h: usize) -> Vec<u8> {
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        let mut out = vec![0u8; w * h + 2 * cw * ch];
        let mut sums = vec![(0u32, 0u32, 0u32); cw * ch];
        for y in 0..h {
            for x in 0..w {
                let [l, u, v] = yuv420::rgb_to_full_range(rgb[(y * w + x) * 3..][..3].try_into().unwrap());
                out[y * w + x] = l;
                let s = &mut sums[(y / 2) * cw + x / 2];
                *s = (s.0 + u as u32, s.1 + v as u32, s.2 + 1);
            }
        }
        for (i, (u, v, n)) in sums.into_iter().enumerate() {
            out[w * h + i] = ((u + n / 2) / n) as u8;
            out[w * h + cw * ch + i] = ((v + n / 2) / n) as u8;
        }
        out
    }

    /// I420 → NV12 with rows `stride` bytes apart (padding bytes 0xEE).
    fn i420_to_nv12(i420: &[u8], w: usize, h: usize, stride: usize) -> Vec<u8> {
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        let mut out = vec![0xEE; stride * (h + ch)];
        for r in 0..h {
            out[r * stride..][..w].copy_from_slice(&i420[r * w..][..w]);
        }
        for r in 0..ch {
            for c in 0..cw {
                out[stride * (h + r) + 2 * c] = i420[w * h + r * cw + c];
                out[stride * (h + r) + 2 * c + 1] = i420[w * h + cw * ch + r * cw + c];
            }
        }
        out
    }

    #[test]
    fn nv12_and_full_range_j420_encode_close_to_the_photo_at_every_subsampling() {
        let (photo, pw, _) = photo_rgb();
        let pw = pw as usize;
        // Even sizes (J420 goes to libjpeg-turbo without a copy at 4:2:0) and odd ones.
        for (w, h) in [(pw & !1, 200), (pw - 1, 201)] {
            let rgb: Vec<u8> = photo.chunks(pw * 3).take(h).flat_map(|r| r[..w * 3].to_vec()).collect();
            let luma: Vec<u8> = rgb.chunks(3).map(|p| yuv420::rgb_to_full_range([p[0], p[1], p[2]])[0]).collect();
            let stride = w.div_ceil(2) * 2 + 16;
            let nv12 = i420_to_nv12(&rgb_to_i420(&rgb, w, h), w, h, stride);
            let j420 = rgb_to_j420(&rgb, w, h);
            for sub in [Subsampling::S420, Subsampling::S422, Subsampling::S444, Subsampling::Gray] {
                let mut e = Encoder::new(EncoderConfig { subsampling: sub, ..EncoderConfig::default() }).unwrap();
                for (format, data, stride) in [(PixelFormat::Nv12, &nv12, stride), (PixelFormat::J420, &j420, w)] {
                    let out = e.encode(&raw(format, w as u32, h as u32, stride, data.clone())).unwrap();
                    assert_eq!(turbojpeg::read_header(&out.jpeg).unwrap().subsamp, sub.tj(), "{format:?} {sub:?}");
                    let back = decode(&out.jpeg);
                    assert_eq!((back.width, back.height), (w, h));
                    let d = if sub == Subsampling::Gray {
                        mean_abs_diff(&back.pixels.iter().step_by(3).copied().collect::<Vec<_>>(), &luma)
                    } else {
                        mean_abs_diff(&back.pixels, &rgb)
                    };
                    assert!(d < 6.0, "{format:?} {w}x{h} {sub:?}: mean abs error {d}");
                }
            }
            // Resizing goes through RGB from either layout.
            let mut small = Encoder::new(EncoderConfig { max_width: Some(w as u32 / 2), ..EncoderConfig::default() }).unwrap();
            for (format, data, stride) in [(PixelFormat::Nv12, &nv12, stride), (PixelFormat::J420, &j420, w)] {
                let out = small.encode(&raw(format, w as u32, h as u32, stride, data.clone())).unwrap();
                assert_eq!(out.width, w as u32 / 2, "{format:?}");
            }
        }
    }

    /// RGB frames of `sizes` for the strip tests: 1920x1080 a synthetic pattern, the others
    /// crops of the test photograph (widths held even with `even`, as YUYV needs).
    fn strip_test_frames(sizes: &[(usize, usize)], even: bool) -> Vec<(usize, usize, Vec<u8>)> {
        let (photo, pw, ph) = photo_rgb();
        let (pw, ph) = (pw as usize, ph as usize);
        let max_w = if even { pw & !1 } else { pw };
        sizes
            .iter()
            .map(|&(w, h)| {
                let rgb = if (w, h) == (1920, 1080) {
                    (0..h).flat_map(|y| (0..w).flat_map(move |x| [(x % 251) as u8, (y % 241) as u8, ((x + y) % 239) as u8])).collect()
                } else {
                    let (cw, ch) = (w.min(max_w), h.min(ph));
                    photo.chunks(pw * 3).take(ch).flat_map(|r| r[..cw * 3].to_vec()).collect()
                };
                (w, h, rgb)
            })
            .collect()
    }

    /// The strip encoder's JPEG of a YUYV frame is TurboJPEG's JPEG of the whole-frame planes
    /// (converted here the plain way, with the tables: each row stretched, 4:2:0 chroma the
    /// rounded-up mean of a row pair, the last row of an odd height alone, luma padded to whole
    /// chroma rows), byte for byte: 4:2:0 and 4:2:2, sizes of partial blocks and MCUs, padded
    /// rows, 1080p.
    #[test]
    fn yuyv_strips_are_turbojpegs_jpeg_of_the_whole_planes() {
        use crate::encoder::stretch::CHROMA_TO_FULL;
        let sizes = [(64, 48, 0), (66, 35, 8), (130, 17, 0), (18, 2, 4), (2, 1, 0), (2, 16, 0), (34, 33, 2), (1920, 1080, 0)];
        let frames = strip_test_frames(&sizes.map(|(w, h, _)| (w, h)), true);
        for ((cw, ch, rgb), (_, _, pad)) in frames.into_iter().zip(sizes) {
            let yuyv = rgb_to_yuyv(&rgb, cw, ch, pad);
            let stride = cw * 2 + pad;
            for (sub, s420) in [(Subsampling::S420, true), (Subsampling::S422, false)] {
                let rows = if s420 { ch.div_ceil(2) * 2 } else { ch };
                let (mut y, mut u, mut v) = (Vec::new(), Vec::new(), Vec::new());
                for r in 0..rows {
                    let row = &yuyv[r.min(ch - 1) * stride..][..cw * 2];
                    y.extend(row.iter().step_by(2).map(|&s| LUMA_TO_FULL[s as usize]));
                    if r >= ch || (s420 && r % 2 == 1) {
                        continue;
                    }
                    let next = (s420 && r + 1 < ch).then(|| &yuyv[(r + 1) * stride..][..cw * 2]);
                    for (i, px) in row.chunks_exact(4).enumerate() {
                        let mut c = [CHROMA_TO_FULL[px[1] as usize], CHROMA_TO_FULL[px[3] as usize]];
                        if let Some(n) = next {
                            let m = [CHROMA_TO_FULL[n[4 * i + 1] as usize], CHROMA_TO_FULL[n[4 * i + 3] as usize]];
                            c = [(c[0] as u16 + m[0] as u16).div_ceil(2) as u8, (c[1] as u16 + m[1] as u16).div_ceil(2) as u8];
                        }
                        u.push(c[0]);
                        v.push(c[1]);
                    }
                }
                let mut c = Compressor::new().unwrap();
                c.set_quality(EncoderConfig::default().quality as i32).unwrap();
                let planes = YuvPlanesImage { y_plane: &y[..], u_plane: &u[..], v_plane: &v[..], width: cw, height: ch, y_stride: cw, u_stride: cw / 2, v_stride: cw / 2, subsamp: sub.tj() };
                let mut want = OutputBuf::new_owned();
                c.compress_yuv_planes(&planes, &mut want).unwrap();
                let mut e = Encoder::new(EncoderConfig { subsampling: sub, ..EncoderConfig::default() }).unwrap();
                let got = e.encode(&raw(PixelFormat::Yuyv, cw as u32, ch as u32, stride, yuyv.clone())).unwrap();
                assert!(got.jpeg[..] == want[..], "{cw}x{ch} pad {pad} {sub:?}: {} bytes vs TurboJPEG's {}", got.jpeg.len(), want.len());
            }
        }
    }

    /// 4:2:0 frames (NV12 with padded rows, I420, J420) strip by strip give TurboJPEG's JPEG
    /// of the whole-frame planes the encoder made before, byte for byte: 4:2:0 and 4:2:2
    /// output, odd sizes, partial blocks and MCUs, 1080p.
    #[test]
    fn yuv420_strips_are_turbojpegs_jpeg_of_the_whole_planes() {
        let cases = strip_test_frames(&[(64, 48), (65, 35), (130, 17), (17, 2), (1, 1), (2, 16), (33, 33), (7, 9), (1920, 1080)], false);
        for (w, h, rgb) in cases {
            let i420 = rgb_to_i420(&rgb, w, h);
            let stride = w.div_ceil(2) * 2 + 6;
            let inputs = [(PixelFormat::Nv12, i420_to_nv12(&i420, w, h, stride), stride), (PixelFormat::I420, i420, w), (PixelFormat::J420, rgb_to_j420(&rgb, w, h), w)];
            for sub in [Subsampling::S420, Subsampling::S422] {
                let mut e = Encoder::new(EncoderConfig { subsampling: sub, ..EncoderConfig::default() }).unwrap();
                for (format, data, stride) in &inputs {
                    let f = raw(*format, w as u32, h as u32, *stride, data.clone());
                    let p = Yuv420::of(&f).unwrap();
                    let want = e.compress_yuv420_planes(&p).unwrap();
                    let got = e.compress_yuv420_strips(&p, sub == Subsampling::S420).unwrap();
                    assert!(got.jpeg == want.jpeg, "{format:?} {w}x{h} {sub:?}: {} bytes vs the planes' {}", got.jpeg.len(), want.jpeg.len());
                }
            }
        }
    }

    #[test]
    fn yuyv_with_padded_rows_encodes_from_yuv_for_422_and_420() {
        let (rgb, w, h) = photo_rgb();
        let (w2, h2) = (w as usize & !1, h as usize);
        let rgb: Vec<u8> = rgb.chunks(w as usize * 3).flat_map(|r| r[..w2 * 3].to_vec()).collect();
        let pad = 24;
        let yuyv = rgb_to_yuyv(&rgb, w2, h2, pad);
        for sub in [Subsampling::S422, Subsampling::S420] {
            let mut e = Encoder::new(EncoderConfig { subsampling: sub, ..EncoderConfig::default() }).unwrap();
            let out = e.encode(&raw(PixelFormat::Yuyv, w2 as u32, h2 as u32, w2 * 2 + pad, yuyv.clone())).unwrap();
            let back = decode(&out.jpeg);
            assert_eq!((back.width, back.height), (w2, h2));
            let d = mean_abs_diff(&back.pixels, &rgb);
            assert!(d < 4.0, "{sub:?}: mean abs error {d} against the source photo");
            let header = turbojpeg::read_header(&out.jpeg).unwrap();
            assert_eq!(header.subsamp, sub.tj(), "{sub:?}");
            // An odd height (the rows of a last, half chroma block at 4:2:0).
            let odd = e.encode(&raw(PixelFormat::Yuyv, w2 as u32, h2 as u32 - 1, w2 * 2 + pad, yuyv.clone())).unwrap();
            assert_eq!((odd.width, odd.height), (w2 as u32, h2 as u32 - 1), "{sub:?}");
            let back = decode(&odd.jpeg);
            let d = mean_abs_diff(&back.pixels, &rgb[..w2 * 3 * (h2 - 1)]);
            assert!(d < 4.0, "{sub:?}, odd height: mean abs error {d}");
        }
    }

    #[test]
    fn gray_output_from_yuyv_and_i420_is_their_luma() {
        let (rgb, pw, ph) = photo_rgb();
        let (w, h) = (pw as usize & !1, ph as usize);
        let rgb: Vec<u8> = rgb.chunks(pw as usize * 3).flat_map(|r| r[..w * 3].to_vec()).collect();
        let studio_luma = |p: &[u8]| ((66 * p[0] as i32 + 129 * p[1] as i32 + 25 * p[2] as i32 + 128) >> 8) + 16;
        let luma: Vec<u8> = rgb.chunks(3).map(|p| LUMA_TO_FULL[studio_luma(p) as usize]).collect();
        let mut e = Encoder::new(EncoderConfig { subsampling: Subsampling::Gray, ..EncoderConfig::default() }).unwrap();
        for (format, data, stride) in [(PixelFormat::Yuyv, rgb_to_yuyv(&rgb, w, h, 8), w * 2 + 8), (PixelFormat::I420, rgb_to_i420(&rgb, w, h), w)] {
            let out = e.encode(&raw(format, w as u32, h as u32, stride, data)).unwrap();
            assert_eq!(turbojpeg::read_header(&out.jpeg).unwrap().subsamp, Subsamp::Gray, "{format:?}");
            let back = turbojpeg::decompress(&out.jpeg, TjFormat::GRAY).unwrap();
            let d = mean_abs_diff(&back.pixels, &luma);
            assert!(d < 4.0, "{format:?}: mean abs error {d} against the photo's luma");
        }
    }

    #[test]
    fn yuyv_errors_are_clear() {
        let mut e = Encoder::new(EncoderConfig::default()).unwrap();
        let err = e.encode(&raw(PixelFormat::Yuyv, 4, 4, 8, vec![0; 20])).unwrap_err().to_string();
        assert!(err.contains("too small") && err.contains("stride 8"), "{err}");
        let err = e.encode(&raw(PixelFormat::Yuyv, 3, 2, 6, vec![0; 12])).unwrap_err().to_string();
        assert!(err.contains("even width"), "{err}");
    }

    #[test]
    fn mjpeg_passes_through_and_is_downscaled_when_asked() {
        let jpeg = std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/images/rocket.jpg")).unwrap();
        let h = turbojpeg::read_header(&jpeg).unwrap();
        let f = raw(PixelFormat::Jpeg, h.width as u32, h.height as u32, 0, jpeg.clone());
        let mut e = Encoder::new(EncoderConfig::default()).unwrap();
        let out = e.encode(&f).unwrap();
        assert_eq!(out.jpeg.as_ref(), jpeg.as_slice(), "byte for byte");
        let mut small = Encoder::new(EncoderConfig { max_width: Some(320), ..EncoderConfig::default() }).unwrap();
        let out = small.encode(&f).unwrap();
        let back = decode(&out.jpeg);
        assert_eq!(back.width, 320);
        assert_eq!(back.height as u32, (h.height as f64 * 320.0 / h.width as f64).round() as u32);
        assert_eq!((out.width, out.height), (320, back.height as u32));
    }

    #[test]
    fn target_size_keeps_aspect() {
        let c = EncoderConfig { max_width: Some(1280), max_height: Some(1280), ..EncoderConfig::default() };
        assert_eq!(c.target_size(1920, 1080), (1280, 720));
        assert_eq!(c.target_size(1080, 1920), (720, 1280));
        assert_eq!(c.target_size(640, 480), (640, 480));
    }
}
