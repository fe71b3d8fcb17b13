//! Uploads in (PNG, JPEG, TIFF → 8-bit gray or RGB), results out (PNG or JPEG). Hostile input
//! is refused before it costs memory: the type from the file's first bytes, the pixel count from
//! its header before anything is decoded (a "pixel bomb" — a tiny file claiming 100000x100000 —
//! never allocates), and the decoder's own allocations capped.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

/// Why an upload is refused; each maps to an HTTP status.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum UploadError {
    /// 415
    #[error("unsupported image type ({0}); upload a PNG, JPEG or TIFF")]
    Unsupported(String),
    /// 413
    #[error("the image is {width}x{height} = {pixels} pixels, above jobs.max_pixels = {limit}")]
    TooManyPixels { width: u32, height: u32, pixels: u64, limit: u64 },
    /// 400
    #[error("the {format} file is truncated or corrupt: {detail}")]
    Corrupt { format: &'static str, detail: String },
}

/// A decoded upload: 8-bit, 1 (gray) or 3 (RGB) channels, rows packed.
pub struct Decoded {
    pub width: u32,
    pub height: u32,
    pub channels: u8,
    pub data: Vec<u8>,
    pub format: &'static str,
}

/// The format from the first bytes.
pub fn sniff(bytes: &[u8]) -> Result<(ImageFormat, &'static str), UploadError> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Ok((ImageFormat::Png, "PNG"));
    }
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return Ok((ImageFormat::Jpeg, "JPEG"));
    }
    if bytes.starts_with(b"II*\0") || bytes.starts_with(b"MM\0*") {
        return Ok((ImageFormat::Tiff, "TIFF"));
    }
    let what = match bytes {
        [] => "an empty file".to_owned(),
        b if b.iter().take(512).all(|c| c.is_ascii_graphic() || c.is_ascii_whitespace()) => "text".to_owned(),
        b => format!("a file starting with {:02x?}", &b[..b.len().min(8)]),
    };
    Err(UploadError::Unsupported(what))
}

/// The image's size from its header (nothing decoded).
pub fn dimensions(bytes: &[u8]) -> Result<(u32, u32), UploadError> {
    let (format, name) = sniff(bytes)?;
    let decoder = ImageReader::with_format(Cursor::new(bytes), format).into_decoder().map_err(|e| UploadError::Corrupt { format: name, detail: e.to_string() })?;
    Ok(decoder.dimensions())
}

/// Decodes an upload within `max_pixels`. Alpha is dropped (the ops work on gray or RGB);
/// 16-bit samples are scaled to 8 bits; gray stays one channel.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<Decoded, UploadError> {
    let (format, name) = sniff(bytes)?;
    let corrupt = |e: image::ImageError| UploadError::Corrupt { format: name, detail: e.to_string() };
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = Limits::default();
    // The decoder's own buffers: the image at 16 bits per sample, 4 channels, at most.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).max(64 << 20));
    reader.limits(limits.clone());
    let decoder = reader.into_decoder().map_err(corrupt)?;
    let (width, height) = decoder.dimensions();
    let pixels = width as u64 * height as u64;
    if pixels > max_pixels || width == 0 || height == 0 {
        return Err(UploadError::TooManyPixels { width, height, pixels, limit: max_pixels });
    }
    let img = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    let gray = matches!(img.color(), image::ColorType::L8 | image::ColorType::L16 | image::ColorType::La8 | image::ColorType::La16);
    let (channels, data) = if gray { (1, img.into_luma8().into_raw()) } else { (3, img.into_rgb8().into_raw()) };
    Ok(Decoded { width, height, channels, data, format: name })
}

/// Result formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutFormat {
    Png,
    Jpeg,
}

impl OutFormat {
    pub fn content_type(self) -> &'static str {
        match self {
            OutFormat::Png => "image/png",
            OutFormat::Jpeg => "image/jpeg",
        }
    }
    pub fn ext(self) -> &'static str {
        match self {
            OutFormat::Png => "png",
            OutFormat::Jpeg => "jpg",
        }
    }
    /// `?format=png|jpeg` first, else the `Accept` header (JPEG only when asked for and PNG is
    /// not); PNG, lossless, by default.
    pub fn choose(query: Option<&str>, accept: Option<&str>) -> Result<Self, String> {
        match query.map(str::to_ascii_lowercase).as_deref() {
            Some("png") => return Ok(OutFormat::Png),
            Some("jpeg" | "jpg") => return Ok(OutFormat::Jpeg),
            Some(other) => return Err(format!("format={other:?}: use png or jpeg")),
            None => {}
        }
        let accept = accept.unwrap_or("");
        Ok(if accept.contains("image/jpeg") && !accept.contains("image/png") { OutFormat::Jpeg } else { OutFormat::Png })
    }
}

/// Encodes a result (PNG: fast deflate; JPEG: quality 90, 4:2:0 for RGB).
pub fn encode(width: u32, height: u32, channels: u8, data: &[u8], format: OutFormat) -> Result<Vec<u8>, String> {
    match format {
        OutFormat::Png => {
            use image::ImageEncoder;
            use image::codecs::png::{CompressionType, FilterType, PngEncoder};
            let mut out = Vec::new();
            let color = if channels == 1 { image::ExtendedColorType::L8 } else { image::ExtendedColorType::Rgb8 };
            PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive).write_image(data, width, height, color).map_err(|e| e.to_string())?;
            Ok(out)
        }
        OutFormat::Jpeg => {
            let (pf, sub) = if channels == 1 { (turbojpeg::PixelFormat::GRAY, turbojpeg::Subsamp::Gray) } else { (turbojpeg::PixelFormat::RGB, turbojpeg::Subsamp::Sub2x2) };
            let image = turbojpeg::Image { pixels: data, width: width as usize, pitch: width as usize * channels as usize, height: height as usize, format: pf };
            turbojpeg::compress(image, 90, sub).map(|b| b.to_vec()).map_err(|e| e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coffee_png() -> Vec<u8> {
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/images/coffee.png")).unwrap()
    }

    #[test]
    fn png_and_jpeg_uploads_decode_and_results_round_trip() {
        let d = decode(&coffee_png(), 1 << 30).unwrap();
        assert_eq!((d.width, d.height, d.channels, d.format), (600, 400, 3, "PNG"));
        let png = encode(d.width, d.height, 3, &d.data, OutFormat::Png).unwrap();
        let back = decode(&png, 1 << 30).unwrap();
        assert!(back.data == d.data, "PNG results are lossless");
        let jpeg = encode(d.width, d.height, 3, &d.data, OutFormat::Jpeg).unwrap();
        assert_eq!(decode(&jpeg, 1 << 30).unwrap().format, "JPEG");
        let gray: Vec<u8> = d.data.chunks(3).map(|p| p[1]).collect();
        let g = decode(&encode(600, 400, 1, &gray, OutFormat::Png).unwrap(), 1 << 30).unwrap();
        assert_eq!((g.channels, g.data == gray), (1, true));
        // TIFF, written by the same crate.
        let mut tiff = Vec::new();
        image::RgbImage::from_raw(600, 400, d.data.clone()).unwrap().write_to(&mut Cursor::new(&mut tiff), ImageFormat::Tiff).unwrap();
        let t = decode(&tiff, 1 << 30).unwrap();
        assert_eq!((t.format, t.data == d.data), ("TIFF", true));
    }

    #[test]
    fn bad_uploads_are_named() {
        let png = coffee_png();
        assert!(matches!(decode(b"hello, I am text\n", 1 << 30), Err(UploadError::Unsupported(w)) if w == "text"));
        assert!(matches!(decode(b"GIF89a\x01\x00\x01\x00\x80", 1 << 30), Err(UploadError::Unsupported(_))));
        let e = decode(&png[..png.len() / 2], 1 << 30).err().unwrap();
        assert!(matches!(e, UploadError::Corrupt { format: "PNG", .. }), "{e}");
        // A pixel bomb: the PNG's header rewritten to claim 100000x100000.
        let mut bomb = png.clone();
        bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32(&bomb[12..29]);
        bomb[29..33].copy_from_slice(&crc.to_be_bytes());
        let e = decode(&bomb, 1 << 28).err().unwrap();
        assert_eq!(e, UploadError::TooManyPixels { width: 100_000, height: 100_000, pixels: 10_000_000_000, limit: 1 << 28 });
        assert!(e.to_string().contains("jobs.max_pixels"));
        assert_eq!(OutFormat::choose(None, Some("image/jpeg")).unwrap(), OutFormat::Jpeg);
        assert_eq!(OutFormat::choose(None, Some("image/png,image/jpeg")).unwrap(), OutFormat::Png);
        assert_eq!(OutFormat::choose(Some("JPG"), None).unwrap(), OutFormat::Jpeg);
        assert!(OutFormat::choose(Some("gif"), None).is_err());
    }

    /// CRC-32 (PNG chunks), for the test's rewritten header.
    pub fn crc32(data: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &b in data {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }
}
