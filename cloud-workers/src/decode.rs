//! JPEG decoding for the worker: refuses absurd sizes before allocating (decompression
//! bombs), and decodes with libjpeg-turbo's DCT-domain scaling when the pipeline starts by
//! shrinking the image anyway (decoding at 1/2, 1/4 … is several times cheaper).
//!
//! Limits on hostile input: the pixel count (`worker.max_pixels`) is checked from the header
//! before anything is allocated, and it also bounds a progressive JPEG's coefficient buffer
//! (about 2 bytes per sample); the number of scans of a progressive JPEG is capped at
//! [`MAX_SCANS`] (libjpeg-turbo's scan limit), since each scan walks the whole coefficient
//! buffer and a file of thousands of tiny scans would hold a thread for minutes.

use framelink_common::wire::DeadLetterReason;
use turbojpeg::{DecompressHeader, Decompressor, Image, PixelFormat, ScalingFactor};

use crate::ops::Img;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("empty payload")]
    Empty,
    #[error("not a JPEG: {0}")]
    NotJpeg(String),
    #[error("image is {width}x{height} = {pixels} pixels, above the limit of {limit}")]
    TooLarge { width: usize, height: usize, pixels: u64, limit: u64 },
    #[error("corrupt or truncated JPEG: {0}")]
    Corrupt(String),
}

impl DecodeError {
    /// Why the frame is dead-lettered (its `framelink-error` header and metric label).
    pub fn reason(&self) -> DeadLetterReason {
        match self {
            Self::Empty => DeadLetterReason::Empty,
            Self::NotJpeg(_) => DeadLetterReason::NotJpeg,
            Self::TooLarge { .. } => DeadLetterReason::TooLarge,
            Self::Corrupt(_) => DeadLetterReason::CorruptJpeg,
        }
    }
}

/// Most scans a progressive JPEG may have. Encoders write about 10 (libjpeg's default
/// progression) and rarely more than a few dozen; libjpeg-turbo's own tools suggest 500 as a
/// safe bound for untrusted input; camera frames never come near 100.
pub const MAX_SCANS: u32 = 100;

pub struct Decoder {
    d: Decompressor,
}

impl Decoder {
    pub fn new() -> Self {
        let mut d = Decompressor::new().expect("libjpeg-turbo decompressor");
        d.set_scan_limit(MAX_SCANS).expect("libjpeg-turbo scan limit");
        Self { d }
    }

    /// Decodes to RGB. With `at_least = Some((w, h))` the smallest DCT scale whose result is
    /// still ≥ w×h is used.
    pub fn decode(&mut self, jpeg: &[u8], max_pixels: u64, at_least: Option<(u32, u32)>) -> Result<Img, DecodeError> {
        self.decode_as(jpeg, max_pixels, at_least, false)
    }

    /// As [`Decoder::decode`]; with `luma_only`, to the frame's luma (Y) plane, one channel:
    /// libjpeg-turbo then skips the chroma's IDCT, upsampling and the colour conversion.
    pub fn decode_as(&mut self, jpeg: &[u8], max_pixels: u64, at_least: Option<(u32, u32)>, luma_only: bool) -> Result<Img, DecodeError> {
        let result = self.decode_once(jpeg, max_pixels, at_least, luma_only);
        if matches!(result, Err(DecodeError::Corrupt(_))) {
            // libjpeg-turbo stopped by an error may leave the handle part-way through a header
            // (tj3DecompressHeader does not abort it) and would read the next frame's header on
            // from there, refusing a good frame (found by fuzzing): the next frame gets a fresh one.
            *self = Self::new();
        }
        result
    }

    /// The frame's header, refused as [`Decoder::decode`] would refuse the frame before
    /// decoding it (empty, not a JPEG, unreadable header, above `max_pixels`).
    pub fn header(&mut self, jpeg: &[u8], max_pixels: u64) -> Result<DecompressHeader, DecodeError> {
        let result = self.header_once(jpeg, max_pixels);
        if matches!(result, Err(DecodeError::Corrupt(_))) {
            *self = Self::new(); // as in decode
        }
        result
    }

    fn header_once(&mut self, jpeg: &[u8], max_pixels: u64) -> Result<DecompressHeader, DecodeError> {
        if jpeg.is_empty() {
            return Err(DecodeError::Empty);
        }
        if jpeg.len() < 4 || jpeg[0] != 0xFF || jpeg[1] != 0xD8 {
            return Err(DecodeError::NotJpeg(format!("starts with {:02x?}", &jpeg[..jpeg.len().min(4)])));
        }
        let header = self.d.read_header(jpeg).map_err(|e| DecodeError::Corrupt(e.to_string()))?;
        let pixels = header.width as u64 * header.height as u64;
        if pixels > max_pixels || header.width == 0 || header.height == 0 {
            return Err(DecodeError::TooLarge { width: header.width, height: header.height, pixels, limit: max_pixels });
        }
        Ok(header)
    }

    fn decode_once(&mut self, jpeg: &[u8], max_pixels: u64, at_least: Option<(u32, u32)>, luma_only: bool) -> Result<Img, DecodeError> {
        let header = self.header_once(jpeg, max_pixels)?;
        let scale = at_least.map_or(ScalingFactor::ONE, |t| dct_scale(&header, t));
        self.d.set_scaling_factor(scale).map_err(|e| DecodeError::Corrupt(e.to_string()))?;
        let s = header.scaled(scale);
        let (format, ch) = if luma_only { (PixelFormat::GRAY, 1) } else { (PixelFormat::RGB, 3) };
        let mut data = vec![0u8; s.width * s.height * ch];
        let image = Image { pixels: &mut data[..], width: s.width, pitch: s.width * ch, height: s.height, format };
        let result = self.d.decompress(jpeg, image).map_err(|e| DecodeError::Corrupt(e.to_string()));
        let _ = self.d.set_scaling_factor(ScalingFactor::ONE);
        result?;
        Ok(Img::new(s.width as u32, s.height as u32, ch as u8, data))
    }
}

/// The smallest DCT scale (1/8, 2/8, 4/8 or 1) at which the frame is still at least
/// `tw`×`th`: decoding at it does part of a shrinking resize for free.
pub fn dct_scale(header: &DecompressHeader, (tw, th): (u32, u32)) -> ScalingFactor {
    for num in [1usize, 2, 4] {
        let f = ScalingFactor::new(num, 8);
        let s = header.scaled(f);
        if s.width >= tw as usize && s.height >= th as usize {
            return f;
        }
    }
    ScalingFactor::ONE
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

/// Encodes an RGB or gray image as JPEG.
pub fn encode(img: &Img, quality: u8) -> Result<Vec<u8>, turbojpeg::Error> {
    let (format, subsamp) = if img.channels == 1 { (PixelFormat::GRAY, turbojpeg::Subsamp::Gray) } else { (PixelFormat::RGB, turbojpeg::Subsamp::Sub2x2) };
    let image = Image { pixels: &img.data[..], width: img.width as usize, pitch: img.width as usize * img.channels as usize, height: img.height as usize, format };
    turbojpeg::compress(image, quality as i32, subsamp).map(|b| b.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rocket() -> Vec<u8> {
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/images/rocket.jpg")).unwrap()
    }

    #[test]
    fn decodes_and_scales_in_the_dct_domain() {
        let jpeg = rocket();
        let h = turbojpeg::read_header(&jpeg).unwrap();
        let mut d = Decoder::new();
        let full = d.decode(&jpeg, 100_000_000, None).unwrap();
        assert_eq!((full.width as usize, full.height as usize), (h.width, h.height));
        let quarter = d.decode(&jpeg, 100_000_000, Some((h.width as u32 / 4, h.height as u32 / 4))).unwrap();
        assert_eq!(quarter.width as usize, h.width.div_ceil(4));
        // The DCT-scaled image looks like the full one, smaller: means agree.
        assert!((quarter.mean() - full.mean()).abs() < 1.5, "{} vs {}", quarter.mean(), full.mean());
        let back = encode(&full, 85).unwrap();
        assert_eq!(turbojpeg::read_header(&back).unwrap().width, h.width);
    }

    #[test]
    fn bad_input_is_named() {
        let mut d = Decoder::new();
        assert_eq!(d.decode(&[], 1000, None).unwrap_err(), DecodeError::Empty);
        assert_eq!(d.decode(b"GIF89a....", 1000, None).unwrap_err().reason(), DeadLetterReason::NotJpeg);
        let jpeg = rocket();
        assert_eq!(d.decode(&jpeg[..jpeg.len() / 3], 100_000_000, None).unwrap_err().reason(), DeadLetterReason::CorruptJpeg);
        let e = d.decode(&jpeg, 1000, None).unwrap_err();
        assert_eq!(e.reason(), DeadLetterReason::TooLarge);
        assert!(e.to_string().contains("above the limit of 1000"), "{e}");
    }

    /// A progressive JPEG whose last scan is repeated `extra` times (a "scan bomb").
    fn with_repeated_scans(extra: usize) -> Vec<u8> {
        let img = turbojpeg::decompress(&rocket(), PixelFormat::RGB).unwrap();
        let mut c = turbojpeg::Compressor::new().unwrap();
        c.set_progressive(true).unwrap();
        let jpeg = c.compress_to_vec(img.as_deref()).unwrap();
        // The last SOS marker starts the last scan; it runs to the EOI marker.
        let sos = jpeg.windows(2).rposition(|w| w == [0xFF, 0xDA]).expect("SOS");
        let eoi = jpeg.len() - 2;
        assert_eq!(&jpeg[eoi..], &[0xFF, 0xD9]);
        let scan = &jpeg[sos..eoi];
        let mut out = jpeg[..eoi].to_vec();
        for _ in 0..extra {
            out.extend_from_slice(scan);
        }
        out.extend_from_slice(&[0xFF, 0xD9]);
        out
    }

    #[test]
    fn a_progressive_jpeg_with_thousands_of_scans_is_refused() {
        let mut d = Decoder::new();
        // An ordinary progressive JPEG decodes.
        assert!(d.decode(&with_repeated_scans(0), 100_000_000, None).is_ok());
        let bomb = with_repeated_scans(3000);
        let e = d.decode(&bomb, 100_000_000, None).unwrap_err();
        assert_eq!(e.reason(), DeadLetterReason::CorruptJpeg, "{e}");
        assert!(e.to_string().contains("scans"), "the error names the scan limit: {e}");
        // The decoder stays usable for the next frame.
        assert!(d.decode(&rocket(), 100_000_000, None).is_ok());
    }

    /// Found by fuzzing (fuzz/regressions/jpeg_decode): libjpeg-turbo's header reader, stopped
    /// by an error (here a JPEG cut between its frame header and its first scan), leaves the
    /// handle half-way through a header, and the next frame's header was read on from there.
    #[test]
    fn a_frame_cut_off_in_its_headers_does_not_spoil_the_next() {
        let jpeg = rocket();
        let sos = jpeg.windows(2).position(|w| w == [0xFF, 0xDA]).expect("SOS");
        let cut = &jpeg[..sos];
        let mut d = Decoder::new();
        let first = d.decode(cut, 100_000_000, None);
        assert!(matches!(first, Err(DecodeError::Corrupt(_))), "{first:?}");
        assert_eq!(d.decode(cut, 100_000_000, None), first, "the same frame again");
        let next = d.decode(&jpeg, 100_000_000, None).expect("the next frame decodes");
        assert_eq!(next, Decoder::new().decode(&jpeg, 100_000_000, None).unwrap());
    }

    #[test]
    fn a_header_claiming_60000x60000_is_refused_before_allocating() {
        // A real JPEG with its SOF0 size rewritten to 60000x60000.
        let mut jpeg = rocket();
        let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0] || w == [0xFF, 0xC2]).expect("SOF marker");
        jpeg[sof + 5..sof + 7].copy_from_slice(&60000u16.to_be_bytes());
        jpeg[sof + 7..sof + 9].copy_from_slice(&60000u16.to_be_bytes());
        let e = Decoder::new().decode(&jpeg, 50_000_000, None).unwrap_err();
        assert!(matches!(e, DecodeError::TooLarge { width: 60000, height: 60000, .. }), "{e}");
    }
}
