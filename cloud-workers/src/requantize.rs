//! Re-encoding a JPEG at the worker's quality in the DCT domain: the plain re-encode (the empty
//! pipeline, the default) without decoding a pixel. The source's quantised DCT coefficients are
//! entropy-decoded, each rescaled from the source's quantisation table to the encoder's table at
//! `worker.jpeg_quality` — `round(c · q_src / q_dst)`, halves away from zero, clamped to the
//! range an 8-bit baseline JPEG holds — and entropy-coded again with the standard Huffman
//! tables, keeping the frame's size and chroma subsampling (csrc/requantize.c, libjpeg's
//! coefficient API on the libjpeg-turbo turbojpeg-sys links).
//!
//! This is its own definition of a re-encode, not the pixel path's (decode, encode): that one
//! rounds and clamps the decoded samples to 8 bits and transforms them again; this one never
//! leaves the frequency domain. Where the source's tables are the encoder's own at that quality
//! (a libjpeg-family encoder at the same quality) it is lossless: every coefficient is kept
//! (clamped only where a malformed frame holds one that baseline cannot code). Where every
//! target step divides the source's (q100's all-ones tables) the decoded pixels are the
//! source's exactly. Otherwise each coefficient is rounded once more to the target step — into
//! coarser tables as far from the source as decoding and encoding lands (within 5 % on the test
//! photographs), and from the agent's q80 into the worker's q85 too. Frames it does not take (progressive, arithmetic-coded, 12-bit,
//! not YCbCr or gray, or libjpeg warns while reading them) go the decoding way, which names
//! what is wrong with a corrupt one.

use std::ffi::{CStr, c_char, c_int, c_uchar, c_ulong};

unsafe extern "C" {
    fn fl_requantize(input: *const c_uchar, in_len: c_ulong, quality: c_int, out: *mut *mut c_uchar, out_len: *mut usize, msg: *mut c_char, msg_len: usize) -> c_int;
    fn fl_requantize_free(buf: *mut c_uchar);
    #[cfg(test)]
    fn fl_requantize_block(block: *mut i16, from: *const u16, to: *const u16);
}

/// Why a frame was not requantised.
#[derive(Debug, PartialEq, Eq)]
pub enum Skipped {
    /// Not a frame this path takes (progressive, arithmetic-coded, 12-bit, not YCbCr or gray,
    /// or libjpeg warned reading it).
    NotTaken,
    /// libjpeg refused it, with its message.
    Failed(String),
}

/// `jpeg` re-encoded at `quality` (1–100) in the DCT domain.
pub fn requantize(jpeg: &[u8], quality: u8) -> Result<Vec<u8>, Skipped> {
    let (mut out, mut out_len) = (std::ptr::null_mut(), 0usize);
    let mut msg = [0 as c_char; 200];
    // SAFETY: `jpeg` is read, never written, for `jpeg.len()` bytes; `out`, `out_len` and `msg`
    // are valid for writes (`msg` is NUL-terminated by snprintf within its length); the
    // returned buffer is ours until freed with fl_requantize_free, after copying it.
    let rc = unsafe { fl_requantize(jpeg.as_ptr(), jpeg.len() as c_ulong, quality.clamp(1, 100) as c_int, &mut out, &mut out_len, msg.as_mut_ptr(), msg.len()) };
    match rc {
        0 => {
            // SAFETY: on success `out` holds `out_len` bytes written by libjpeg.
            let bytes = unsafe { std::slice::from_raw_parts(out, out_len) }.to_vec();
            unsafe { fl_requantize_free(out) };
            Ok(bytes)
        }
        1 => Err(Skipped::NotTaken),
        // SAFETY: the C side wrote a NUL-terminated message into `msg`.
        _ => Err(Skipped::Failed(unsafe { CStr::from_ptr(msg.as_ptr()) }.to_string_lossy().into_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use turbojpeg::{PixelFormat, Subsamp};

    fn photo(name: &str) -> turbojpeg::Image<Vec<u8>> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/images").join(name);
        turbojpeg::decompress(&std::fs::read(p).unwrap(), PixelFormat::RGB).unwrap()
    }

    fn jpeg(img: &turbojpeg::Image<Vec<u8>>, quality: i32, subsamp: Subsamp) -> Vec<u8> {
        turbojpeg::compress(img.as_deref(), quality, subsamp).unwrap().to_vec()
    }

    fn rgb(jpeg: &[u8]) -> Vec<u8> {
        turbojpeg::decompress(jpeg, PixelFormat::RGB).unwrap().pixels
    }

    fn mean_off(a: &[u8], b: &[u8]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x.abs_diff(*y) as f64).sum::<f64>() / a.len() as f64
    }

    /// The definition in integers: round(c · from / to), halves away from zero, clamped.
    fn rescaled(c: i16, from: u16, to: u16, dc: bool) -> i16 {
        let n = c.unsigned_abs() as i64 * from as i64;
        let q = ((n + to as i64 / 2) / to as i64).min(if dc && c < 0 { 1024 } else { 1023 });
        (if c < 0 { -q } else { q }) as i16
    }

    #[test]
    fn the_vector_rescaling_is_the_integer_definition() {
        // Every coefficient a baseline frame holds (and some it cannot), through tables of
        // every baseline step on both sides: the C kernel (float estimate, corrected) against
        // the integer formula.
        let coefs: Vec<i16> = (-2100..=2100).chain([i16::MIN, -32767, 32767, 9000, -9000]).collect();
        for to in [1u16, 2, 3, 4, 7, 10, 16, 31, 64, 99, 128, 200, 254, 255] {
            // (from == to: the clamp alone — the integer formula gives the same.)
            for from in (1u16..=255).chain([256, 1000, 65535]) {
                for chunk in coefs.chunks(64) {
                    let mut block = [0i16; 64];
                    block[..chunk.len()].copy_from_slice(chunk);
                    let want: Vec<i16> = block.iter().enumerate().map(|(k, &c)| rescaled(c, from, to, k == 0)).collect();
                    // SAFETY: a 64-coefficient block and two 64-entry tables.
                    unsafe { fl_requantize_block(block.as_mut_ptr(), [from; 64].as_ptr(), [to; 64].as_ptr()) };
                    assert_eq!(block.to_vec(), want, "from {from} to {to}");
                }
            }
        }
    }

    #[test]
    fn at_the_sources_own_quality_nothing_changes() {
        // The same tables both sides: every coefficient kept, the decoded pixels the source's.
        let img = photo("retina.jpg");
        for (q, s) in [(85, Subsamp::Sub2x2), (50, Subsamp::Sub2x1), (92, Subsamp::None), (70, Subsamp::Gray)] {
            let src = jpeg(&img, q, s);
            let out = requantize(&src, q as u8).unwrap();
            assert_eq!(rgb(&out), rgb(&src), "q{q} {s:?}");
            let h = turbojpeg::read_header(&out).unwrap();
            assert_eq!((h.width, h.height, h.subsamp), (img.width, img.height, s));
        }
    }

    #[test]
    fn into_tables_whose_steps_divide_the_sources_the_pixels_are_the_sources() {
        // q100's tables are all 1: c · q_src is exact, the dequantised coefficients equal.
        for (name, q) in [("rocket.jpg", 40), ("retina.jpg", 15)] {
            let src = jpeg(&photo(name), q, Subsamp::Sub2x2);
            let out = requantize(&src, 100).unwrap();
            assert_eq!(rgb(&out), rgb(&src), "{name} q{q} → q100");
            // The result is larger than the C side's first buffer (1.25 × the source + 4 KiB),
            // which then grew on the way.
            assert!(out.len() > src.len() * 5 / 4 + 4096, "{name}: {} → {} bytes", src.len(), out.len());
        }
    }

    #[test]
    fn into_coarser_tables_it_stays_closer_to_the_source_than_decode_and_encode() {
        let img = photo("retina.jpg");
        let src = jpeg(&img, 92, Subsamp::Sub2x2);
        let src_px = rgb(&src);
        for q in [85u8, 60, 30] {
            let dct = requantize(&src, q).unwrap();
            let pixels = jpeg(&turbojpeg::decompress(&src, PixelFormat::RGB).unwrap(), q as i32, Subsamp::Sub2x2);
            let (d, p) = (mean_off(&rgb(&dct), &src_px), mean_off(&rgb(&pixels), &src_px));
            assert!(d > 0.0 && d <= p * 1.05, "q{q}: requantised {d:.3} vs decoded and encoded {p:.3} levels off the source");
            // The encoder's own tables: as large as the pixel path's output, give or take.
            let ratio = dct.len() as f64 / pixels.len() as f64;
            assert!((0.8..1.2).contains(&ratio), "q{q}: {} vs {} bytes", dct.len(), pixels.len());
        }
    }

    #[test]
    fn frames_it_does_not_take_and_corrupt_ones_say_so() {
        let img = photo("retina.jpg");
        let mut c = turbojpeg::Compressor::new().unwrap();
        c.set_quality(80).unwrap();
        c.set_optimize(true).unwrap();
        let progressive = {
            let mut c = turbojpeg::Compressor::new().unwrap();
            c.set_progressive(true).unwrap();
            c.compress_to_vec(img.as_deref()).unwrap()
        };
        assert_eq!(requantize(&progressive, 80), Err(Skipped::NotTaken));
        // Truncated: libjpeg warns of the premature end.
        let src = jpeg(&img, 80, Subsamp::Sub2x2);
        assert_eq!(requantize(&src[..src.len() / 2], 80), Err(Skipped::NotTaken));
        // Not a JPEG at all: refused, with libjpeg's words.
        match requantize(b"definitely not a jpeg", 80) {
            Err(Skipped::Failed(why)) => assert!(why.contains("JPEG"), "{why}"),
            other => panic!("{other:?}"),
        }
        // Optimised Huffman tables in the source are read like any others.
        assert!(requantize(&c.compress_to_vec(img.as_deref()).unwrap(), 60).is_ok());
    }
}
