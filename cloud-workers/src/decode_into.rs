//! Decoding a 4:2:0 JPEG's YUV planes into memory someone else owns: the GPU stage's mapped
//! upload buffer ([`crate::gpu::stage::PlanesLease`]), so that a frame's planes are written once,
//! by the thread that decodes them, where the GPU reads them.
//!
//! The `turbojpeg` crate decodes planes only into one buffer of its own layout, so this holds a
//! TurboJPEG handle through `turbojpeg-sys` ([`crate::region::TjDecompress`]) (the same library build, the same call the crate
//! makes: `tj3DecompressToYUVPlanes8`), with a pointer and a stride per plane. The samples are
//! those of [`crate::planes::PlaneCodec::decode_scaled`] — the same function of libjpeg-turbo —
//! and the tests below check it sample for sample.

use std::ffi::c_int;

use turbojpeg::ScalingFactor;
use turbojpeg_sys as tj;

use crate::region::TjDecompress;

/// A TurboJPEG decompression handle for decoding planes in place, one per processing thread.
pub struct PlanesDecoder {
    handle: TjDecompress,
}

impl Default for PlanesDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl PlanesDecoder {
    pub fn new() -> PlanesDecoder {
        PlanesDecoder { handle: TjDecompress::new() }
    }

    fn error(&self) -> String {
        self.handle.error()
    }

    /// Decodes the Y, Cb and Cr planes of a 4:2:0 `jpeg` at DCT `scale` into `planes` (each a
    /// pointer and the bytes there), rows unpadded: plane `k` is `sizes[k]` (width, height) —
    /// the scaled frame's size for Y, half of it for the chroma planes; both must be even
    /// (otherwise libjpeg-turbo would pad the planes). An error names the cause (a frame that
    /// is not 4:2:0, of another size, corrupt, or libjpeg-turbo's warning).
    ///
    /// # Safety
    /// Each pointer must be valid for writes of its length, and nothing else may read or write
    /// that memory during the call.
    pub unsafe fn decode(&mut self, jpeg: &[u8], scale: ScalingFactor, planes: [(*mut u8, usize); 3], sizes: [(u32, u32); 3]) -> Result<(), String> {
        let (w, h) = sizes[0];
        if w % 2 != 0 || h % 2 != 0 || sizes[1] != (w / 2, h / 2) || sizes[2] != sizes[1] {
            return Err(format!("planes of {:?} are not an even 4:2:0 frame's", sizes));
        }
        for (k, (&(_, len), &(pw, ph))) in planes.iter().zip(&sizes).enumerate() {
            if len < pw as usize * ph as usize {
                return Err(format!("plane {k} has {len} bytes for {pw}x{ph} samples"));
            }
        }
        // SAFETY: a valid handle and a buffer of `jpeg.len()` bytes.
        if unsafe { tj::tj3DecompressHeader(self.handle.raw, jpeg.as_ptr(), jpeg.len() as tj::size_t) } != 0 {
            let e = self.error();
            *self = PlanesDecoder::new();
            return Err(e);
        }
        // SAFETY: a valid handle whose header was just read; parameters TurboJPEG defines.
        let (jw, jh, subsamp) = unsafe {
            (
                tj::tj3Get(self.handle.raw, tj::TJPARAM_TJPARAM_JPEGWIDTH as i32),
                tj::tj3Get(self.handle.raw, tj::TJPARAM_TJPARAM_JPEGHEIGHT as i32),
                tj::tj3Get(self.handle.raw, tj::TJPARAM_TJPARAM_SUBSAMP as i32),
            )
        };
        if subsamp != tj::TJSAMP_TJSAMP_420 as i32 {
            return Err("not a 4:2:0 frame".into());
        }
        let (sw, sh) = (scale.scale(jw.max(0) as usize), scale.scale(jh.max(0) as usize));
        if (sw, sh) != (w as usize, h as usize) {
            return Err(format!("a {jw}x{jh} frame at {}/{} is {sw}x{sh}, not {w}x{h}", scale.num(), scale.denom()));
        }
        let factor = tj::tjscalingfactor { num: scale.num() as c_int, denom: scale.denom() as c_int };
        // SAFETY: a valid handle with a header read; a scaling factor of TurboJPEG's list (the
        // caller's came from it), checked by the call.
        if unsafe { tj::tj3SetScalingFactor(self.handle.raw, factor) } != 0 {
            return Err(self.error());
        }
        let mut ptrs: [*mut u8; 3] = planes.map(|(p, _)| p);
        let mut strides: [c_int; 3] = sizes.map(|(pw, _)| pw as c_int);
        // SAFETY: a valid handle; three planes each valid for `stride × rows` bytes (checked
        // above, and the caller's contract), which is what a w×h 4:2:0 frame decodes to.
        let rc = unsafe { tj::tj3DecompressToYUVPlanes8(self.handle.raw, jpeg.as_ptr(), jpeg.len() as tj::size_t, ptrs.as_mut_ptr(), strides.as_mut_ptr()) };
        let failed = (rc != 0).then(|| self.error());
        // SAFETY: as above; back to full size for the next frame.
        unsafe { tj::tj3SetScalingFactor(self.handle.raw, tj::tjscalingfactor { num: 1, denom: 1 }) };
        match failed {
            Some(e) => {
                // A handle that stopped mid-frame may keep some of its state: a fresh one.
                *self = PlanesDecoder::new();
                Err(e)
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planes::PlaneCodec;

    fn jpeg(w: u32, h: u32, subsamp: turbojpeg::Subsamp) -> Vec<u8> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/images/retina.jpg");
        let img = crate::decode::Decoder::new().decode(&std::fs::read(&p).unwrap(), u64::MAX, None).unwrap();
        let img = crate::ops::crop(&img, 0, 0, w, h);
        let image = turbojpeg::Image { pixels: &img.data[..], width: w as usize, pitch: w as usize * 3, height: h as usize, format: turbojpeg::PixelFormat::RGB };
        turbojpeg::compress(image, 88, subsamp).unwrap().to_vec()
    }

    fn decode(d: &mut PlanesDecoder, jpeg: &[u8], scale: ScalingFactor, (w, h): (u32, u32)) -> Result<Vec<u8>, String> {
        let sizes = [(w, h), (w / 2, h / 2), (w / 2, h / 2)];
        let lens = sizes.map(|(a, b)| a as usize * b as usize);
        let mut buf = vec![0xA5u8; lens.iter().sum()];
        let (y, rest) = buf.split_at_mut(lens[0]);
        let (cb, cr) = rest.split_at_mut(lens[1]);
        let planes = [(y.as_mut_ptr(), y.len()), (cb.as_mut_ptr(), cb.len()), (cr.as_mut_ptr(), cr.len())];
        // SAFETY: three disjoint parts of `buf`, of their lengths.
        unsafe { d.decode(jpeg, scale, planes, sizes) }?;
        Ok(buf)
    }

    /// The planes are libjpeg-turbo's own decode to planes (the turbojpeg crate's, which the CPU
    /// path uses), sample for sample, at full size and at DCT scales — also after a scaled
    /// decode (the handle goes back to full size), and with MCU-padded rows (1080 is not a
    /// multiple of 16).
    #[test]
    fn planes_decoded_in_place_equal_the_crates_decode_to_planes() {
        let mut d = PlanesDecoder::new();
        let mut codec = PlaneCodec::new(85);
        for (w, h) in [(640, 360), (320, 1080 / 4), (96, 64)] {
            let jpeg = jpeg(w, h, turbojpeg::Subsamp::Sub2x2);
            let header = turbojpeg::read_header(&jpeg).unwrap();
            for scale in [ScalingFactor::ONE, ScalingFactor::ONE_HALF, ScalingFactor::ONE_QUARTER, ScalingFactor::ONE, ScalingFactor::ONE_EIGHTH] {
                let s = header.scaled(scale);
                if s.width % 2 != 0 || s.height % 2 != 0 {
                    continue;
                }
                let want = codec.decode_scaled(&jpeg, &header, scale).unwrap();
                let got = decode(&mut d, &jpeg, scale, (s.width as u32, s.height as u32)).unwrap();
                assert!(got == want, "{w}x{h} at {}/{}: planes differ", scale.num(), scale.denom());
            }
        }
    }

    /// What it does not take is named: another subsampling, a size that is not the frame's,
    /// odd planes, planes too small, a corrupt frame.
    #[test]
    fn frames_it_does_not_take_are_refused_with_the_cause() {
        let mut d = PlanesDecoder::new();
        let j420 = jpeg(64, 48, turbojpeg::Subsamp::Sub2x2);
        let e = decode(&mut d, &jpeg(64, 48, turbojpeg::Subsamp::Sub2x1), ScalingFactor::ONE, (64, 48)).unwrap_err();
        assert!(e.contains("not a 4:2:0"), "{e}");
        let e = decode(&mut d, &j420, ScalingFactor::ONE, (32, 24)).unwrap_err();
        assert!(e.contains("not 32x24"), "{e}");
        let e = decode(&mut d, &j420, ScalingFactor::ONE, (63, 48)).unwrap_err();
        assert!(e.contains("not an even 4:2:0"), "{e}");
        let mut small = [0u8; 10];
        let p = small.as_mut_ptr();
        // SAFETY: refused before anything is written (the lengths say 10 bytes).
        let e = unsafe { d.decode(&j420, ScalingFactor::ONE, [(p, 10), (p, 10), (p, 10)], [(64, 48), (32, 24), (32, 24)]) }.unwrap_err();
        assert!(e.contains("plane 0 has 10 bytes"), "{e}");
        let mut cut = j420.clone();
        cut.truncate(j420.len() / 2);
        assert!(decode(&mut d, &cut, ScalingFactor::ONE, (64, 48)).is_err());
        // Still decodes a good frame after the failures.
        assert!(decode(&mut d, &j420, ScalingFactor::ONE, (64, 48)).is_ok());
    }
}
