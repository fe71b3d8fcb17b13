//! Thumbnails of the latest result per camera, made when a page asks for one and cached per
//! camera until a newer result replaces it: the live stream carries only their URLs, never
//! image bytes, and a camera nobody looks at costs nothing beyond keeping its latest JPEG.
//!
//! libjpeg-turbo decodes straight to 1/8, 1/4, … of the size (DCT scaling: the skipped
//! coefficients are never computed), so a 1080p frame becomes a 240x135 thumbnail for about the
//! cost of an entropy decode.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use turbojpeg::{Decompressor, Image, PixelFormat, ScalingFactor, Subsamp};

/// Most pixels a result may have for a thumbnail to be made of it (decompression bombs).
pub const MAX_PIXELS: u64 = 100_000_000;

#[derive(Debug, thiserror::Error)]
pub enum ThumbError {
    #[error("the latest result is not a JPEG the console can read: {0}")]
    Jpeg(String),
    #[error("the latest result is {width}x{height}, over the {MAX_PIXELS}-pixel limit for thumbnails")]
    TooLarge { width: usize, height: usize },
}

/// A thumbnail no wider than `max_width` (and at least 1/8 of the source).
pub fn make(jpeg: &[u8], max_width: u32, quality: i32) -> Result<Bytes, ThumbError> {
    let mut d = Decompressor::new().map_err(|e| ThumbError::Jpeg(e.to_string()))?;
    d.set_scan_limit(100).map_err(|e| ThumbError::Jpeg(e.to_string()))?;
    let header = d.read_header(jpeg).map_err(|e| ThumbError::Jpeg(e.to_string()))?;
    if header.width as u64 * header.height as u64 > MAX_PIXELS {
        return Err(ThumbError::TooLarge { width: header.width, height: header.height });
    }
    let mut scale = ScalingFactor::new(1, 8);
    for num in [2usize, 3, 4, 5, 6, 7, 8] {
        let f = ScalingFactor::new(num, 8);
        if header.scaled(f).width as u32 <= max_width {
            scale = f;
        }
    }
    d.set_scaling_factor(scale).map_err(|e| ThumbError::Jpeg(e.to_string()))?;
    let s = header.scaled(scale);
    let mut data = vec![0u8; s.width * s.height * 3];
    let image = Image { pixels: &mut data[..], width: s.width, pitch: s.width * 3, height: s.height, format: PixelFormat::RGB };
    d.decompress(jpeg, image).map_err(|e| ThumbError::Jpeg(e.to_string()))?;
    let image = Image { pixels: &data[..], width: s.width, pitch: s.width * 3, height: s.height, format: PixelFormat::RGB };
    let out = turbojpeg::compress(image, quality, Subsamp::Sub2x2).map_err(|e| ThumbError::Jpeg(e.to_string()))?;
    Ok(Bytes::copy_from_slice(&out))
}

/// The last thumbnail made per camera, keyed by the result's sequence number.
#[derive(Default)]
pub struct Cache {
    made: Mutex<HashMap<(String, String), (u64, Bytes)>>,
}

impl Cache {
    pub fn get(&self, device: &str, camera: &str, seq: u64) -> Option<Bytes> {
        let made = self.made.lock().expect("thumbnail cache");
        made.get(&(device.to_owned(), camera.to_owned())).filter(|(s, _)| *s == seq).map(|(_, b)| b.clone())
    }

    pub fn put(&self, device: &str, camera: &str, seq: u64, thumb: Bytes) {
        self.made.lock().expect("thumbnail cache").insert((device.to_owned(), camera.to_owned()), (seq, thumb));
    }

    /// Drops cameras that left the view.
    pub fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        self.made.lock().expect("thumbnail cache").retain(|(d, c), _| keep(d, c));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn photo() -> Vec<u8> {
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/images/rocket.jpg")).unwrap()
    }

    #[test]
    fn thumbnails_are_dct_scaled_below_the_width() {
        let jpeg = photo();
        let h = turbojpeg::read_header(&jpeg).unwrap();
        let t = make(&jpeg, 320, 75).unwrap();
        let th = turbojpeg::read_header(&t).unwrap();
        assert!(th.width <= 320 && th.width >= 320 / 2, "{}x{} from {}x{}", th.width, th.height, h.width, h.height);
        // Aspect ratio kept (to a pixel of rounding).
        let expect = th.width as f64 * h.height as f64 / h.width as f64;
        assert!((th.height as f64 - expect).abs() <= 1.0);
        assert!(t.len() < jpeg.len() / 4);
    }

    #[test]
    fn a_bad_result_is_an_error_not_a_panic() {
        let e = make(b"\xff\xd8garbage", 320, 75).unwrap_err();
        assert!(e.to_string().contains("not a JPEG"), "{e}");
    }

    #[test]
    fn the_cache_serves_only_the_same_result() {
        let c = Cache::default();
        c.put("d", "c", 7, Bytes::from_static(b"t7"));
        assert_eq!(c.get("d", "c", 7).as_deref(), Some(&b"t7"[..]));
        assert!(c.get("d", "c", 8).is_none());
        c.retain(|_, _| false);
        assert!(c.get("d", "c", 7).is_none());
    }
}
