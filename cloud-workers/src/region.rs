//! Decoding only the part of a frame that a leading `crop` keeps (libjpeg-turbo's partial
//! decompression: rows above the crop are entropy-decoded and skipped, columns left and right
//! of it are never inverse-transformed, upsampled or converted). The rows below the crop are
//! decoded too (in the crop's columns) and dropped: libjpeg-turbo skipping to the end of a
//! frame reads nothing more, and a frame corrupt or cut short below the crop must be refused
//! here as the whole decode refuses it (its dead letter names the cause).
//!
//! The region's left edge must lie on the MCU grid, so the decoded part starts at the crop's
//! left edge rounded down to it, less one MCU, and ends one MCU right of the crop (the
//! upsampled chroma at the crop's edges then sees its real neighbours, as in a whole decode);
//! the extra columns are cut off in pixels.
//! The `turbojpeg` crate does not expose the cropping region, so this holds a TurboJPEG handle
//! of its own through `turbojpeg-sys` (the same library build).
//!
//! [`decode_planes`] is the same for the YUV planes path ([`crate::planes`]): the MCUs under a
//! crop decoded to the JPEG's own planes, without upsampling or colour conversion (libjpeg's
//! raw mode, which TurboJPEG cannot crop; csrc/region.c says how it is done).

use std::ffi::{CStr, c_char, c_int, c_uchar, c_uint, c_ulong};

use turbojpeg_sys as tj;

use crate::lossless::Rect;
use crate::ops::Img;

/// A TurboJPEG decompression handle of its own (`turbojpeg-sys`), with the worker's scan limit:
/// what the partial decodes here and the decodes into the GPU stage's memory
/// ([`crate::decode_into`]) hold.
pub(crate) struct TjDecompress {
    pub(crate) raw: tj::tjhandle,
}

// SAFETY: a TurboJPEG handle holds no thread-affine state; `&mut self` of its owner keeps it to
// one thread at a time (the turbojpeg crate's Decompressor is `Send` on the same grounds).
unsafe impl Send for TjDecompress {}

impl Drop for TjDecompress {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { tj::tj3Destroy(self.raw) }
    }
}

impl TjDecompress {
    pub(crate) fn new() -> TjDecompress {
        // SAFETY: tj3Init returns a valid handle or null.
        let raw = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as i32) };
        assert!(!raw.is_null(), "libjpeg-turbo decompressor");
        let d = TjDecompress { raw };
        // SAFETY: a valid handle; a parameter TurboJPEG defines.
        let rc = unsafe { tj::tj3Set(d.raw, tj::TJPARAM_TJPARAM_SCANLIMIT as i32, crate::decode::MAX_SCANS as i32) };
        assert_eq!(rc, 0, "libjpeg-turbo scan limit");
        d
    }

    /// The handle's last error.
    pub(crate) fn error(&self) -> String {
        // SAFETY: tj3GetErrorStr returns a NUL-terminated string owned by the handle.
        unsafe { CStr::from_ptr(tj::tj3GetErrorStr(self.raw)) }.to_string_lossy().into_owned()
    }
}

/// A TurboJPEG decompression handle for partial decodes, one per processing thread.
pub struct RegionDecoder {
    handle: TjDecompress,
}

/// MCU width in pixels of a `TJPARAM_SUBSAMP` value (tjMCUWidth), `None` if unknown.
fn mcu_width(subsamp: i32) -> Option<u32> {
    Some(match subsamp {
        tj::TJSAMP_TJSAMP_444 | tj::TJSAMP_TJSAMP_GRAY | tj::TJSAMP_TJSAMP_440 | tj::TJSAMP_TJSAMP_441 => 8,
        tj::TJSAMP_TJSAMP_422 | tj::TJSAMP_TJSAMP_420 => 16,
        tj::TJSAMP_TJSAMP_411 => 32,
        _ => return None,
    })
}

impl RegionDecoder {
    pub fn new() -> RegionDecoder {
        RegionDecoder { handle: TjDecompress::new() }
    }

    fn error(&self) -> String {
        self.handle.error()
    }

    /// The pixels of `rect` (RGB, or the luma plane with `luma_only`) of a frame whose header
    /// the caller has checked (size limits). An error (a corrupt frame, a lossless JPEG, a
    /// rectangle outside the frame) says why; the caller then decodes the whole frame, which
    /// names the cause for the dead letter.
    pub fn decode(&mut self, jpeg: &[u8], rect: Rect, luma_only: bool) -> Result<Img, String> {
        // SAFETY: a valid handle and a buffer of `jpeg.len()` bytes.
        if unsafe { tj::tj3DecompressHeader(self.handle.raw, jpeg.as_ptr(), jpeg.len() as tj::size_t) } != 0 {
            return Err(self.error());
        }
        // SAFETY: a valid handle; parameters TurboJPEG defines.
        let (width, height, subsamp, lossless, progressive) = unsafe {
            (
                tj::tj3Get(self.handle.raw, tj::TJPARAM_TJPARAM_JPEGWIDTH as i32),
                tj::tj3Get(self.handle.raw, tj::TJPARAM_TJPARAM_JPEGHEIGHT as i32),
                tj::tj3Get(self.handle.raw, tj::TJPARAM_TJPARAM_SUBSAMP as i32),
                tj::tj3Get(self.handle.raw, tj::TJPARAM_TJPARAM_LOSSLESS as i32),
                tj::tj3Get(self.handle.raw, tj::TJPARAM_TJPARAM_PROGRESSIVE as i32),
            )
        };
        if lossless != 0 {
            return Err("a lossless JPEG is decoded whole".into());
        }
        let mw = mcu_width(subsamp).ok_or("unknown chroma subsampling")?;
        if rect.width == 0 || rect.height == 0 || rect.x as u64 + rect.width as u64 > width.max(0) as u64 || rect.y as u64 + rect.height as u64 > height.max(0) as u64 {
            return Err(format!("{rect:?} is not inside the {width}x{height} frame"));
        }
        // One MCU more on each side where the frame has it: subsampled chroma is upsampled from
        // its neighbours, which at the region's own edges would be replicated instead. Two for a
        // progressive frame, whose block smoothing reads two blocks each side.
        let context = if progressive != 0 { 2 * mw } else { mw };
        let x0 = (rect.x - rect.x % mw).saturating_sub(context);
        let x1 = (rect.x + rect.width + context).min(width as u32);
        // Down to the frame's last row, so that libjpeg-turbo reads the whole frame.
        let (rw, rh) = (x1 - x0, height as u32 - rect.y);
        let region = tj::tjregion { x: x0 as i32, y: rect.y as i32, w: rw as i32, h: rh as i32 };
        // SAFETY: a valid handle whose header was just read.
        if unsafe { tj::tj3SetCroppingRegion(self.handle.raw, region) } != 0 {
            return Err(self.error());
        }
        let (format, ch) = if luma_only { (tj::TJPF_TJPF_GRAY, 1usize) } else { (tj::TJPF_TJPF_RGB, 3) };
        let mut data = vec![0u8; rw as usize * rh as usize * ch];
        let pitch = rw as usize * ch;
        // SAFETY: `data` holds rh rows of `pitch` bytes, what a region of rw×rh decodes to.
        let rc = unsafe { tj::tj3Decompress8(self.handle.raw, jpeg.as_ptr(), jpeg.len() as tj::size_t, data.as_mut_ptr(), pitch as i32, format as i32) };
        let failed = (rc != 0).then(|| self.error());
        // SAFETY: as above; TJUNCROPPED (all zero) turns cropping off for the next header.
        unsafe { tj::tj3SetCroppingRegion(self.handle.raw, tj::tjregion { x: 0, y: 0, w: 0, h: 0 }) };
        if let Some(e) = failed {
            return Err(e);
        }
        let img = Img::new(rw, rh, ch as u8, data);
        Ok(if (x0, rw, rh) == (rect.x, rect.width, rect.height) { img } else { crate::ops::crop(&img, rect.x - x0, 0, rect.width, rect.height) })
    }
}

unsafe extern "C" {
    fn fl_decode_region_planes(input: *const c_uchar, in_len: c_ulong, mcu_x0: c_uint, mcu_x1: c_uint, mcu_y0: c_uint, mcu_y1: c_uint, planes: *const *mut c_uchar, strides: *const usize, rows: *const usize, nplanes: c_int, msg: *mut c_char, msg_len: usize) -> c_int;
}

/// A rectangle of a JPEG's MCUs: columns `x0..=x1`, rows `y0..=y1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Mcus {
    pub x0: u32,
    pub x1: u32,
    pub y0: u32,
    pub y1: u32,
}

/// Why [`decode_planes`] gave nothing.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PlanesRefused {
    /// Not a frame or a request it takes (progressive or multi-scan, lossless, 12-bit, other
    /// components than planes, MCUs outside the frame, planes too small, a libjpeg-turbo of
    /// another layout): decode the whole frame instead.
    NotTaken,
    /// libjpeg failed or warned (corrupt data), with its message.
    Failed(String),
}

/// Decodes the MCUs `m` of `jpeg` into one plane per component: component k's samples from
/// the region's top-left corner, rows `strides[k]` bytes apart in `planes[k]` (which holds
/// `planes[k].len() / strides[k]` rows). A plane needs `(x1 - x0 + 1) · 8 · h_k` samples per
/// row and `(y1 - y0 + 1) · 8 · v_k` rows (the component's sampling factors); the MCUs at the
/// frame's right and bottom edges fill less. The samples are those the whole frame decoded to
/// planes has at the same places.
pub(crate) fn decode_planes(jpeg: &[u8], m: Mcus, planes: &mut [&mut [u8]], strides: &[usize]) -> Result<(), PlanesRefused> {
    if planes.len() != strides.len() || strides.contains(&0) {
        return Err(PlanesRefused::NotTaken);
    }
    let rows: Vec<usize> = planes.iter().zip(strides).map(|(p, s)| p.len() / s).collect();
    let ptrs: Vec<*mut c_uchar> = planes.iter_mut().map(|p| p.as_mut_ptr()).collect();
    let mut msg = [0 as c_char; 200];
    // SAFETY: `jpeg` is only read, for `jpeg.len()` bytes; plane k is valid for writes of
    // `rows[k]` rows of `strides[k]` bytes, which the C side checks its writes against; `msg`
    // is NUL-terminated by snprintf within its length.
    let rc = unsafe { fl_decode_region_planes(jpeg.as_ptr(), jpeg.len() as c_ulong, m.x0, m.x1, m.y0, m.y1, ptrs.as_ptr(), strides.as_ptr(), rows.as_ptr(), planes.len() as c_int, msg.as_mut_ptr(), msg.len()) };
    match rc {
        0 => Ok(()),
        1 => Err(PlanesRefused::NotTaken),
        // SAFETY: the C side wrote a NUL-terminated message into `msg`.
        _ => Err(PlanesRefused::Failed(unsafe { CStr::from_ptr(msg.as_ptr()) }.to_string_lossy().into_owned())),
    }
}

impl Default for RegionDecoder {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use turbojpeg::Subsamp;

    fn photo() -> Img {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/images/retina.jpg");
        crate::decode::Decoder::new().decode(&std::fs::read(&p).unwrap(), u64::MAX, None).unwrap()
    }

    /// The region decode gives the pixels of the whole decode, cropped — bit for bit, on every
    /// subsampling, on and off the MCU grid, RGB and luma.
    #[test]
    fn a_region_is_the_whole_decode_cropped() {
        let src = photo();
        let mut r = RegionDecoder::new();
        for subsamp in [Subsamp::Sub2x2, Subsamp::Sub2x1, Subsamp::None, Subsamp::Gray, Subsamp::Sub4x1] {
            let img = crate::ops::crop(&src, 0, 0, 653, 491);
            let image = turbojpeg::Image { pixels: &img.data[..], width: 653, pitch: 653 * 3, height: 491, format: turbojpeg::PixelFormat::RGB };
            let jpeg = turbojpeg::compress(image, 85, subsamp).unwrap();
            for luma in [false, true] {
                let whole = crate::decode::Decoder::new().decode_as(&jpeg, u64::MAX, None, luma).unwrap();
                for rect in [Rect { x: 0, y: 0, width: 653, height: 491 }, Rect { x: 32, y: 16, width: 300, height: 200 }, Rect { x: 37, y: 11, width: 301, height: 199 }, Rect { x: 600, y: 480, width: 53, height: 11 }, Rect { x: 1, y: 1, width: 1, height: 1 }] {
                    let got = r.decode(&jpeg, rect, luma).unwrap();
                    let want = crate::ops::crop(&whole, rect.x, rect.y, rect.width, rect.height);
                    assert!(got == want, "{subsamp:?} luma {luma} {rect:?}: {} samples differ", got.data.iter().zip(&want.data).filter(|(a, b)| a != b).count());
                }
            }
        }
    }

    #[test]
    fn bad_input_and_bad_rectangles_are_errors() {
        let src = crate::ops::crop(&photo(), 0, 0, 64, 48);
        let jpeg = crate::decode::encode(&src, 85).unwrap();
        let mut r = RegionDecoder::new();
        assert!(r.decode(&jpeg, Rect { x: 60, y: 0, width: 8, height: 8 }, false).is_err());
        assert!(r.decode(&jpeg[..jpeg.len() / 2], Rect { x: 0, y: 0, width: 8, height: 8 }, false).is_err());
        assert!(r.decode(b"not a jpeg", Rect { x: 0, y: 0, width: 8, height: 8 }, false).is_err());
        // Cut short or corrupt below the crop: refused, as the whole decode refuses it.
        let big = crate::decode::encode(&crate::ops::crop(&photo(), 0, 0, 320, 240), 85).unwrap();
        let mut bad = big.clone();
        let at = bad.len() - 40;
        bad[at..at + 8].fill(0xFF);
        for refused in [&big[..big.len() * 3 / 4], &bad[..]] {
            assert!(crate::decode::Decoder::new().decode(refused, u64::MAX, None).is_err(), "the whole decode refuses it");
            for luma in [false, true] {
                assert!(r.decode(refused, Rect { x: 16, y: 16, width: 64, height: 32 }, luma).is_err(), "luma {luma}: the top crop of a frame damaged below it");
            }
        }
        // The handle is fine afterwards.
        assert_eq!(r.decode(&jpeg, Rect { x: 16, y: 8, width: 8, height: 8 }, false).unwrap(), crate::ops::crop(&crate::decode::Decoder::new().decode(&jpeg, u64::MAX, None).unwrap(), 16, 8, 8, 8));
    }
}
