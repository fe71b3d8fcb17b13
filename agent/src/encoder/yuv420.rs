//! 4:2:0 frames as sources lay them out — planar I420 (studio range, H.264 decoders), planar
//! J420 (JPEG's full range, the synthetic pattern) and semi-planar NV12 (studio range, V4L2
//! and Jetson cameras) — read row by row into the full-range planes libjpeg-turbo compresses,
//! or into RGB for the paths that need it (resize, 4:4:4).
//!
//! Kept apart from the encoder so the layout rules (lengths, strides, odd sizes) are checked in
//! one place: a buffer that is too small is refused here, naming its size, before any pixel is
//! read.

use super::EncodeError;
pub(super) use super::stretch::{IDENTITY, LUMA_TO_FULL};
use crate::frame::{Captured, PixelFormat};

/// The chroma of a 4:2:0 frame.
enum Chroma<'a> {
    /// Two planes, `cw` bytes a row.
    Planar { u: &'a [u8], v: &'a [u8] },
    /// One plane of U, V pairs, rows `stride` bytes apart.
    Interleaved { uv: &'a [u8], stride: usize },
}

/// A validated view of a 4:2:0 frame's planes.
pub(super) struct Yuv420<'a> {
    pub w: usize,
    pub h: usize,
    /// Chroma width and height (`w`, `h` halved, rounded up).
    pub cw: usize,
    pub ch: usize,
    y: &'a [u8],
    pub y_stride: usize,
    chroma: Chroma<'a>,
    /// Already JPEG's full range (J420): no stretching.
    pub full_range: bool,
}

impl<'a> Yuv420<'a> {
    /// Checks `f`'s buffer against its format, size and stride.
    pub fn of(f: &'a Captured) -> Result<Self, EncodeError> {
        let (w, h) = (f.width as usize, f.height as usize);
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        let short = || EncodeError::ShortBuffer { len: f.data.len(), width: f.width, height: f.height, stride: f.stride, format: f.format };
        let data = &f.data[..];
        match f.format {
            PixelFormat::I420 | PixelFormat::J420 => {
                let need = w * h + 2 * cw * ch;
                if f.stride != w || data.len() < need {
                    return Err(short());
                }
                let (y, rest) = data.split_at(w * h);
                let (u, rest) = rest.split_at(cw * ch);
                let chroma = Chroma::Planar { u, v: &rest[..cw * ch] };
                Ok(Self { w, h, cw, ch, y, y_stride: w, chroma, full_range: f.format == PixelFormat::J420 })
            }
            PixelFormat::Nv12 => {
                let s = f.stride;
                // Rows are `s` apart in both planes; the last chroma row needs only its pairs.
                let need = if h == 0 { 0 } else { s * h + s * (ch - 1) + 2 * cw };
                if s < 2 * cw || data.len() < need {
                    return Err(short());
                }
                let (y, uv) = data.split_at(s * h);
                Ok(Self { w, h, cw, ch, y, y_stride: s, chroma: Chroma::Interleaved { uv, stride: s }, full_range: false })
            }
            other => unreachable!("Yuv420::of called with {other:?}"),
        }
    }

    /// Luma row `r`, `w` bytes, as stored (studio or full range).
    pub fn y_row(&self, r: usize) -> &'a [u8] {
        &self.y[r * self.y_stride..][..self.w]
    }

    /// The whole luma plane, when its rows are contiguous and unpadded.
    pub fn y_plane(&self) -> &'a [u8] {
        &self.y[..self.w * self.h]
    }

    /// The U and V planes as stored, when they are separate planes (I420, J420).
    pub fn uv_planes(&self) -> Option<(&'a [u8], &'a [u8])> {
        match self.chroma {
            Chroma::Planar { u, v } => Some((u, v)),
            Chroma::Interleaved { .. } => None,
        }
    }

    /// Appends chroma row `r` (`cw` samples each) to `u` and `v`, stretched to full range.
    pub fn extend_chroma_row(&self, r: usize, u: &mut Vec<u8>, v: &mut Vec<u8>) {
        let (at, cw) = (u.len(), self.cw);
        u.resize(at + cw, 0);
        v.resize(at + cw, 0);
        self.chroma_row_into(r, &mut u[at..], &mut v[at..]);
    }

    /// Chroma row `r` in full range into `u` and `v` (`cw` samples each).
    pub fn chroma_row_into(&self, r: usize, u: &mut [u8], v: &mut [u8]) {
        let cw = self.cw;
        match self.chroma {
            Chroma::Planar { u: pu, v: pv } => {
                let row = r * cw..(r + 1) * cw;
                if self.full_range {
                    u.copy_from_slice(&pu[row.clone()]);
                    v.copy_from_slice(&pv[row]);
                } else {
                    super::stretch::chroma_row(&pu[row.clone()], u);
                    super::stretch::chroma_row(&pv[row], v);
                }
            }
            Chroma::Interleaved { uv, stride } => super::stretch::uv_pairs_row(&uv[r * stride..][..2 * cw], u, v),
        }
    }

    /// The table taking stored luma to JPEG's full range.
    pub fn luma_lut(&self) -> &'static [u8; 256] {
        if self.full_range { &IDENTITY } else { &LUMA_TO_FULL }
    }

    /// Packed RGB, `w` × `h` × 3 (BT.601, each chroma sample shared by its 2×2 block).
    pub fn to_rgb(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.w * self.h * 3);
        let (mut u, mut v) = (Vec::with_capacity(self.cw), Vec::with_capacity(self.cw));
        for r in 0..self.h {
            if r % 2 == 0 {
                u.clear();
                v.clear();
                self.extend_chroma_row(r / 2, &mut u, &mut v);
            }
            let ly = self.luma_lut();
            for (c, &y) in self.y_row(r).iter().enumerate() {
                out.extend_from_slice(&full_range_to_rgb(ly[y as usize], u[c / 2], v[c / 2]));
            }
        }
        out
    }
}

/// One full-range (JFIF) BT.601 YCbCr pixel → RGB, 8-bit fixed point.
pub(super) fn full_range_to_rgb(y: u8, u: u8, v: u8) -> [u8; 3] {
    let c = (y as i32) << 8;
    let d = u as i32 - 128;
    let e = v as i32 - 128;
    let clamp = |x: i32| ((x + 128) >> 8).clamp(0, 255) as u8;
    // 1.402, 0.344136, 0.714136, 1.772 in 1/256ths.
    [clamp(c + 359 * e), clamp(c - 88 * d - 183 * e), clamp(c + 454 * d)]
}

/// One RGB pixel → full-range (JFIF) BT.601 YCbCr, rounded: what a JPEG decoder inverts.
pub fn rgb_to_full_range(rgb: [u8; 3]) -> [u8; 3] {
    let (r, g, b) = (rgb[0] as i32, rgb[1] as i32, rgb[2] as i32);
    // 0.299, 0.587, 0.114 / -0.168736, -0.331264, 0.5 / 0.5, -0.418688, -0.081312 in 1/65536ths.
    let y = (19595 * r + 38470 * g + 7471 * b + 32768) >> 16;
    let u = ((-11059 * r - 21709 * g + 32768 * b + 32768) >> 16) + 128;
    let v = ((32768 * r - 27439 * g - 5329 * b + 32768) >> 16) + 128;
    [y.clamp(0, 255) as u8, u.clamp(0, 255) as u8, v.clamp(0, 255) as u8]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoder::stretch::CHROMA_TO_FULL;
    use bytes::Bytes;

    fn frame(format: PixelFormat, w: u32, h: u32, stride: usize, data: Vec<u8>) -> Captured {
        Captured { capture_ns: 0, width: w, height: h, stride, format, source_format: "X", data: Bytes::from(data), clock: Default::default() }
    }

    #[test]
    fn the_tables_stretch_studio_range_and_identity_keeps_full_range() {
        assert_eq!((LUMA_TO_FULL[16], LUMA_TO_FULL[235], LUMA_TO_FULL[0], LUMA_TO_FULL[255]), (0, 255, 0, 255));
        assert_eq!((CHROMA_TO_FULL[16], CHROMA_TO_FULL[128], CHROMA_TO_FULL[240]), (0, 128, 255));
        assert!((0..256).all(|i| IDENTITY[i] as usize == i));
    }

    #[test]
    fn nv12_rows_deinterleave_with_the_stride_and_i420_reads_its_planes() {
        // 3x3 (odd): chroma 2x2. NV12 with stride 6: 3 luma rows, 2 chroma rows of U,V pairs.
        let mut nv12 = vec![0u8; 6 * 3 + 6 + 4];
        nv12[6 * 3..6 * 3 + 4].copy_from_slice(&[16, 240, 128, 128]);
        nv12[6 * 4..6 * 4 + 4].copy_from_slice(&[240, 16, 100, 200]);
        let f = frame(PixelFormat::Nv12, 3, 3, 6, nv12.clone());
        let p = Yuv420::of(&f).unwrap();
        let (mut u, mut v) = (Vec::new(), Vec::new());
        p.extend_chroma_row(0, &mut u, &mut v);
        p.extend_chroma_row(1, &mut u, &mut v);
        assert_eq!(u, vec![0, 128, 255, CHROMA_TO_FULL[100]]);
        assert_eq!(v, vec![255, 128, 0, CHROMA_TO_FULL[200]]);
        // One byte short of the last chroma pair is refused, naming the sizes.
        let err = Yuv420::of(&frame(PixelFormat::Nv12, 3, 3, 6, nv12[..nv12.len() - 1].to_vec())).err().unwrap().to_string();
        assert!(err.contains("27 bytes") && err.contains("3x3") && err.contains("stride 6"), "{err}");
        // A stride narrower than the chroma pairs is refused.
        assert!(Yuv420::of(&frame(PixelFormat::Nv12, 3, 3, 3, vec![0; 64])).is_err());
        // J420 planes are read as they are.
        let j420: Vec<u8> = (0..9 + 8).map(|i| i as u8 * 10).collect();
        let f = frame(PixelFormat::J420, 3, 3, 3, j420);
        let p = Yuv420::of(&f).unwrap();
        assert_eq!(p.y_row(2), &[60, 70, 80]);
        let (mut u, mut v) = (Vec::new(), Vec::new());
        p.extend_chroma_row(1, &mut u, &mut v);
        assert_eq!((u, v), (vec![110, 120], vec![150, 160]));
    }

    #[test]
    fn full_range_round_trips_through_rgb() {
        for rgb in [[0u8, 0, 0], [255, 255, 255], [235, 16, 16], [16, 235, 235], [12, 200, 90], [128, 128, 128]] {
            let [y, u, v] = rgb_to_full_range(rgb);
            let back = full_range_to_rgb(y, u, v);
            for c in 0..3 {
                assert!((back[c] as i32 - rgb[c] as i32).abs() <= 2, "{rgb:?} -> {:?} -> {back:?}", [y, u, v]);
            }
        }
        assert_eq!(rgb_to_full_range([255, 255, 255]), [255, 128, 128]);
        assert_eq!(rgb_to_full_range([0, 0, 0]), [0, 128, 128]);
    }
}
