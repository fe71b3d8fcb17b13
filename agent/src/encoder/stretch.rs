//! Camera rows to the full-range planes libjpeg-turbo compresses: deinterleave (YUYV's
//! Y U Y V, NV12's U V pairs) and stretch studio range (Y 16–235, Cb/Cr 16–240) to JPEG's
//! 0–255 in one pass. On a 1080p YUYV frame this pass was most of what the agent spent beyond
//! libjpeg-turbo's own SIMD encode (a table lookup per sample), so x86-64 runs it 16 samples
//! at a time with SSE2 (part of the x86-64 baseline; YUYV 32 at a time with AVX2 where the CPU
//! has it) and aarch64 with NEON (its baseline); other targets (armv7), and the tail of a row,
//! use the tables below.
//!
//! The SIMD arithmetic is the tables' formula exactly — `⌊((v − lo)·255 + span/2) / span⌋`
//! clamped to 0–255 — with the division by 219 (luma) and 224 (chroma) done as a 16-bit
//! multiply-high; every one of the 256 inputs is tested against the table, and rows of every
//! length against the table loop.
//!
//! The file uses nothing outside `std`, so that `cross/simd-check` can build it alone for an
//! ARM target and check the NEON kernels under qemu-user (see that crate).

/// Cameras send studio-range YUV (Y 16–235, Cb/Cr 16–240, BT.601); JPEG (JFIF) planes are
/// full range (0–255). These tables stretch the values while deinterleaving.
pub static LUMA_TO_FULL: [u8; 256] = range_lut(16, 219);
pub static CHROMA_TO_FULL: [u8; 256] = range_lut(128 - 112, 224);
/// Full-range samples as they are.
pub static IDENTITY: [u8; 256] = range_lut(0, 255);

const fn range_lut(lo: i32, span: i32) -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let v = ((i as i32 - lo) * 255 + span / 2) / span;
        t[i] = if v < 0 { 0 } else if v > 255 { 255 } else { v as u8 };
        i += 1;
    }
    t
}

/// Studio-range luma `src` → full range in `dst` (same length).
pub fn luma_row(src: &[u8], dst: &mut [u8]) {
    assert_eq!(src.len(), dst.len(), "luma row lengths");
    let done = simd::luma_row(src, dst);
    for (d, &s) in dst[done..].iter_mut().zip(&src[done..]) {
        *d = LUMA_TO_FULL[s as usize];
    }
}

/// Studio-range chroma `src` → full range in `dst` (same length): a planar chroma row.
pub fn chroma_row(src: &[u8], dst: &mut [u8]) {
    assert_eq!(src.len(), dst.len(), "chroma row lengths");
    let done = simd::chroma_row(src, dst);
    for (d, &s) in dst[done..].iter_mut().zip(&src[done..]) {
        *d = CHROMA_TO_FULL[s as usize];
    }
}

/// A row of studio-range U, V pairs (NV12's chroma) → full-range `u` and `v` (`src.len() / 2`
/// each).
pub fn uv_pairs_row(src: &[u8], u: &mut [u8], v: &mut [u8]) {
    assert!(src.len() == 2 * u.len() && u.len() == v.len(), "chroma pair row lengths");
    let done = simd::uv_pairs_row(src, u, v);
    for ((pair, u), v) in src[2 * done..].chunks_exact(2).zip(&mut u[done..]).zip(&mut v[done..]) {
        (*u, *v) = (CHROMA_TO_FULL[pair[0] as usize], CHROMA_TO_FULL[pair[1] as usize]);
    }
}

/// A studio-range YUYV row (`Y0 U Y1 V`, `2·y.len()` bytes) → full-range `y` and, for each
/// pixel pair, `u` and `v` (`y.len() / 2` each; `y.len()` even).
pub fn yuyv_row(src: &[u8], y: &mut [u8], u: &mut [u8], v: &mut [u8]) {
    assert!(src.len() == 2 * y.len() && y.len() == 2 * u.len() && u.len() == v.len(), "YUYV row lengths");
    let done = simd::yuyv_row(src, y, u, v);
    for (i, px) in src[4 * done..].chunks_exact(4).enumerate() {
        let (p, k) = (done + i, 2 * (done + i));
        (y[k], y[k + 1]) = (LUMA_TO_FULL[px[0] as usize], LUMA_TO_FULL[px[2] as usize]);
        (u[p], v[p]) = (CHROMA_TO_FULL[px[1] as usize], CHROMA_TO_FULL[px[3] as usize]);
    }
}

/// `dst[i] = ⌈(dst[i] + src[i]) / 2⌉`: two chroma rows into one (4:2:2 → 4:2:0). Written so
/// that the compiler vectorises it (`pavgb` on x86-64, `urhadd` on ARM).
pub fn average_into(dst: &mut [u8], src: &[u8]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = ((*d as u16 + s as u16 + 1) >> 1) as u8;
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod simd {
    //! SSE2 (every x86-64 CPU has it). Each function returns how many of its units (samples,
    //! pairs or pixel pairs) it did; the caller finishes the row with the tables.
    use std::arch::x86_64::*;

    /// Luma, eight 16-bit lanes: `((sat(v − 16)·255 + 109) · 38304) >> 23` = `⌊(…)/219⌋`.
    #[inline(always)]
    unsafe fn luma16(v: __m128i) -> __m128i {
        unsafe {
            let x = _mm_add_epi16(_mm_mullo_epi16(_mm_subs_epu16(v, _mm_set1_epi16(16)), _mm_set1_epi16(255)), _mm_set1_epi16(109));
            _mm_srli_epi16(_mm_mulhi_epu16(x, _mm_set1_epi16(38304u16 as i16)), 7)
        }
    }

    /// Chroma, eight 16-bit lanes: `(((sat(v − 16)·255 + 112) >> 5) · 9363) >> 16` = `⌊(…)/224⌋`.
    #[inline(always)]
    unsafe fn chroma16(v: __m128i) -> __m128i {
        unsafe {
            let x = _mm_add_epi16(_mm_mullo_epi16(_mm_subs_epu16(v, _mm_set1_epi16(16)), _mm_set1_epi16(255)), _mm_set1_epi16(112));
            _mm_mulhi_epu16(_mm_srli_epi16(x, 5), _mm_set1_epi16(9363))
        }
    }

    /// 16 bytes of U, V pairs (full range) → 8 U to `u`, 8 V to `v`.
    #[inline(always)]
    unsafe fn split_pairs(uv: __m128i, u: *mut u8, v: *mut u8) {
        unsafe {
            let lo = _mm_set1_epi16(0x00FF);
            let us = _mm_and_si128(uv, lo);
            let vs = _mm_srli_epi16(uv, 8);
            _mm_storel_epi64(u as *mut __m128i, _mm_packus_epi16(us, us));
            _mm_storel_epi64(v as *mut __m128i, _mm_packus_epi16(vs, vs));
        }
    }

    /// One plane's row, luma or chroma (a constant, so each is its own inlined loop).
    fn plane_row<const LUMA: bool>(src: &[u8], dst: &mut [u8]) -> usize {
        assert_eq!(src.len(), dst.len());
        let n = src.len() / 16;
        for i in 0..n {
            // SAFETY: 16 bytes at 16·i are inside both slices (i < len / 16, equal lengths);
            // unaligned loads and stores.
            unsafe {
                let x = _mm_loadu_si128(src.as_ptr().add(16 * i) as *const __m128i);
                let z = _mm_setzero_si128();
                let f = |v| if LUMA { luma16(v) } else { chroma16(v) };
                let out = _mm_packus_epi16(f(_mm_unpacklo_epi8(x, z)), f(_mm_unpackhi_epi8(x, z)));
                _mm_storeu_si128(dst.as_mut_ptr().add(16 * i) as *mut __m128i, out);
            }
        }
        16 * n
    }

    pub fn luma_row(src: &[u8], dst: &mut [u8]) -> usize {
        plane_row::<true>(src, dst)
    }

    pub fn chroma_row(src: &[u8], dst: &mut [u8]) -> usize {
        plane_row::<false>(src, dst)
    }

    pub fn uv_pairs_row(src: &[u8], u: &mut [u8], v: &mut [u8]) -> usize {
        assert!(src.len() == 2 * u.len() && u.len() == v.len());
        let n = src.len() / 16;
        for i in 0..n {
            // SAFETY: 16 source bytes at 16·i and 8 output bytes at 8·i are in bounds
            // (src.len() == 2·u.len() == 2·v.len()).
            unsafe {
                let x = _mm_loadu_si128(src.as_ptr().add(16 * i) as *const __m128i);
                let z = _mm_setzero_si128();
                let uv = _mm_packus_epi16(chroma16(_mm_unpacklo_epi8(x, z)), chroma16(_mm_unpackhi_epi8(x, z)));
                split_pairs(uv, u.as_mut_ptr().add(8 * i), v.as_mut_ptr().add(8 * i));
            }
        }
        8 * n
    }

    /// AVX2 where the CPU has it (32 pixels a step), SSE2 otherwise (16).
    pub fn yuyv_row(src: &[u8], y: &mut [u8], u: &mut [u8], v: &mut [u8]) -> usize {
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            let done = unsafe { yuyv_row_avx2(src, y, u, v) };
            let rest = yuyv_row_sse2(&src[4 * done..], &mut y[2 * done..], &mut u[done..], &mut v[done..]);
            return done + rest;
        }
        yuyv_row_sse2(src, y, u, v)
    }

    /// [`luma16`] on sixteen 16-bit lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn luma16x2(v: __m256i) -> __m256i {
        let x = _mm256_add_epi16(_mm256_mullo_epi16(_mm256_subs_epu16(v, _mm256_set1_epi16(16)), _mm256_set1_epi16(255)), _mm256_set1_epi16(109));
        _mm256_srli_epi16(_mm256_mulhi_epu16(x, _mm256_set1_epi16(38304u16 as i16)), 7)
    }

    /// [`chroma16`] on sixteen 16-bit lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn chroma16x2(v: __m256i) -> __m256i {
        let x = _mm256_add_epi16(_mm256_mullo_epi16(_mm256_subs_epu16(v, _mm256_set1_epi16(16)), _mm256_set1_epi16(255)), _mm256_set1_epi16(112));
        _mm256_mulhi_epu16(_mm256_srli_epi16(x, 5), _mm256_set1_epi16(9363))
    }

    /// Two vectors of 16-bit lanes packed to bytes in order (AVX2's pack works per 128-bit
    /// half: the quarters are put back in order).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn pack_in_order(a: __m256i, b: __m256i) -> __m256i {
        _mm256_permute4x64_epi64(_mm256_packus_epi16(a, b), 0b11_01_10_00)
    }

    /// [`yuyv_row_sse2`] 32 pixels at a time; returns the pixel pairs done.
    #[target_feature(enable = "avx2")]
    pub(super) fn yuyv_row_avx2(src: &[u8], y: &mut [u8], u: &mut [u8], v: &mut [u8]) -> usize {
        assert!(src.len() == 2 * y.len() && y.len() == 2 * u.len() && u.len() == v.len());
        let n = src.len() / 64;
        let lo = _mm256_set1_epi16(0x00FF);
        for i in 0..n {
            // SAFETY: 64 source bytes at 64·i, 32 luma bytes at 32·i and 16 chroma bytes at
            // 16·i are in bounds (src.len() == 2·y.len() == 4·u.len() == 4·v.len()).
            unsafe {
                let a = _mm256_loadu_si256(src.as_ptr().add(64 * i) as *const __m256i);
                let b = _mm256_loadu_si256(src.as_ptr().add(64 * i + 32) as *const __m256i);
                let ys = pack_in_order(luma16x2(_mm256_and_si256(a, lo)), luma16x2(_mm256_and_si256(b, lo)));
                _mm256_storeu_si256(y.as_mut_ptr().add(32 * i) as *mut __m256i, ys);
                // U, V pairs in order, then split.
                let uv = pack_in_order(chroma16x2(_mm256_srli_epi16(a, 8)), chroma16x2(_mm256_srli_epi16(b, 8)));
                let us = pack_in_order(_mm256_and_si256(uv, lo), _mm256_setzero_si256());
                let vs = pack_in_order(_mm256_srli_epi16(uv, 8), _mm256_setzero_si256());
                _mm_storeu_si128(u.as_mut_ptr().add(16 * i) as *mut __m128i, _mm256_castsi256_si128(us));
                _mm_storeu_si128(v.as_mut_ptr().add(16 * i) as *mut __m128i, _mm256_castsi256_si128(vs));
            }
        }
        16 * n
    }

    pub(super) fn yuyv_row_sse2(src: &[u8], y: &mut [u8], u: &mut [u8], v: &mut [u8]) -> usize {
        assert!(src.len() == 2 * y.len() && y.len() == 2 * u.len() && u.len() == v.len());
        let n = src.len() / 32;
        for i in 0..n {
            // SAFETY: 32 source bytes at 32·i, 16 luma bytes at 16·i and 8 chroma bytes at
            // 8·i are in bounds (src.len() == 2·y.len() == 4·u.len() == 4·v.len()).
            unsafe {
                let a = _mm_loadu_si128(src.as_ptr().add(32 * i) as *const __m128i);
                let b = _mm_loadu_si128(src.as_ptr().add(32 * i + 16) as *const __m128i);
                let lo = _mm_set1_epi16(0x00FF);
                let ys = _mm_packus_epi16(luma16(_mm_and_si128(a, lo)), luma16(_mm_and_si128(b, lo)));
                _mm_storeu_si128(y.as_mut_ptr().add(16 * i) as *mut __m128i, ys);
                let uv = _mm_packus_epi16(chroma16(_mm_srli_epi16(a, 8)), chroma16(_mm_srli_epi16(b, 8)));
                split_pairs(uv, u.as_mut_ptr().add(8 * i), v.as_mut_ptr().add(8 * i));
            }
        }
        8 * n
    }
}

#[cfg(target_arch = "aarch64")]
pub(crate) mod simd {
    //! NEON (every aarch64 CPU has it). The same arithmetic as the SSE2 kernels, written with
    //! NEON's widening multiply where x86 has a multiply-high; structured loads and stores do
    //! the deinterleaving (`ld4` splits YUYV into Y0, U, Y1, V; `st2` interleaves the luma
    //! back). Each function returns how many of its units it did; the tables finish the row.
    use std::arch::aarch64::*;

    /// `⌊x·m / 2¹⁶⌋` for eight 16-bit lanes (x86's `mulhi_epu16`).
    #[inline(always)]
    fn mulhi(x: uint16x8_t, m: u16) -> uint16x8_t {
        // SAFETY: NEON is part of the aarch64 baseline; register-only intrinsics.
        unsafe {
            let lo = vmull_u16(vget_low_u16(x), vdup_n_u16(m));
            let hi = vmull_high_u16(x, vdupq_n_u16(m));
            vcombine_u16(vshrn_n_u32::<16>(lo), vshrn_n_u32::<16>(hi))
        }
    }

    /// Luma of 16 samples: `⌊(sat(v − 16)·255 + 109) / 219⌋` clamped to 255, as
    /// `((…)·38304) >> 23`.
    #[inline(always)]
    fn luma(v: uint8x16_t) -> uint8x16_t {
        // SAFETY: as above.
        unsafe {
            let f = |w: uint16x8_t| {
                let x = vaddq_u16(vmulq_n_u16(vqsubq_u16(w, vdupq_n_u16(16)), 255), vdupq_n_u16(109));
                vqshrn_n_u16::<7>(mulhi(x, 38304))
            };
            vcombine_u8(f(vmovl_u8(vget_low_u8(v))), f(vmovl_high_u8(v)))
        }
    }

    /// Chroma of 16 samples: `⌊(sat(v − 16)·255 + 112) / 224⌋` clamped to 255, as
    /// `(((…) >> 5)·9363) >> 16`.
    #[inline(always)]
    fn chroma(v: uint8x16_t) -> uint8x16_t {
        // SAFETY: as above.
        unsafe {
            let f = |w: uint16x8_t| {
                let x = vaddq_u16(vmulq_n_u16(vqsubq_u16(w, vdupq_n_u16(16)), 255), vdupq_n_u16(112));
                vqmovn_u16(mulhi(vshrq_n_u16::<5>(x), 9363))
            };
            vcombine_u8(f(vmovl_u8(vget_low_u8(v))), f(vmovl_high_u8(v)))
        }
    }

    fn plane_row<const LUMA: bool>(src: &[u8], dst: &mut [u8]) -> usize {
        assert_eq!(src.len(), dst.len());
        let n = src.len() / 16;
        for i in 0..n {
            // SAFETY: 16 bytes at 16·i are inside both slices (i < len / 16, equal lengths).
            unsafe {
                let x = vld1q_u8(src.as_ptr().add(16 * i));
                vst1q_u8(dst.as_mut_ptr().add(16 * i), if LUMA { luma(x) } else { chroma(x) });
            }
        }
        16 * n
    }

    pub fn luma_row(src: &[u8], dst: &mut [u8]) -> usize {
        plane_row::<true>(src, dst)
    }

    pub fn chroma_row(src: &[u8], dst: &mut [u8]) -> usize {
        plane_row::<false>(src, dst)
    }

    pub fn uv_pairs_row(src: &[u8], u: &mut [u8], v: &mut [u8]) -> usize {
        assert!(src.len() == 2 * u.len() && u.len() == v.len());
        let n = src.len() / 32;
        for i in 0..n {
            // SAFETY: 32 source bytes at 32·i and 16 output bytes at 16·i are in bounds
            // (src.len() == 2·u.len() == 2·v.len()).
            unsafe {
                let uv = vld2q_u8(src.as_ptr().add(32 * i));
                vst1q_u8(u.as_mut_ptr().add(16 * i), chroma(uv.0));
                vst1q_u8(v.as_mut_ptr().add(16 * i), chroma(uv.1));
            }
        }
        16 * n
    }

    /// 32 pixels a step; returns the pixel pairs done.
    pub fn yuyv_row(src: &[u8], y: &mut [u8], u: &mut [u8], v: &mut [u8]) -> usize {
        assert!(src.len() == 2 * y.len() && y.len() == 2 * u.len() && u.len() == v.len());
        let n = src.len() / 64;
        for i in 0..n {
            // SAFETY: 64 source bytes at 64·i, 32 luma bytes at 32·i and 16 chroma bytes at
            // 16·i are in bounds (src.len() == 2·y.len() == 4·u.len() == 4·v.len()).
            unsafe {
                let px = vld4q_u8(src.as_ptr().add(64 * i));
                vst2q_u8(y.as_mut_ptr().add(32 * i), uint8x16x2_t(luma(px.0), luma(px.2)));
                vst1q_u8(u.as_mut_ptr().add(16 * i), chroma(px.1));
                vst1q_u8(v.as_mut_ptr().add(16 * i), chroma(px.3));
            }
        }
        16 * n
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub(crate) mod simd {
    //! No SIMD kernel on this target: the tables do every sample.
    pub fn luma_row(_: &[u8], _: &mut [u8]) -> usize {
        0
    }
    pub fn chroma_row(_: &[u8], _: &mut [u8]) -> usize {
        0
    }
    pub fn uv_pairs_row(_: &[u8], _: &mut [u8], _: &mut [u8]) -> usize {
        0
    }
    pub fn yuyv_row(_: &[u8], _: &mut [u8], _: &mut [u8], _: &mut [u8]) -> usize {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte value, then a pseudo-random tail, `n` long.
    fn bytes(n: usize, seed: u32) -> Vec<u8> {
        let mut s = seed;
        (0..n).map(|i| if i < 256 { i as u8 } else {
            s = s.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (s >> 16) as u8
        }).collect()
    }

    #[test]
    fn every_value_stretches_as_the_tables_say() {
        // 256 samples: the SIMD part takes all of them (16 at a time).
        let all = bytes(256, 0);
        let (mut y, mut c) = (vec![0; 256], vec![0; 256]);
        luma_row(&all, &mut y);
        chroma_row(&all, &mut c);
        for i in 0..256 {
            assert_eq!((y[i], c[i]), (LUMA_TO_FULL[i], CHROMA_TO_FULL[i]), "value {i}");
        }
    }

    /// Both x86-64 kernels of a YUYV row, called directly (the dispatcher picks AVX2 where the
    /// CPU has it, so the SSE2 one is otherwise untested there): every sample they did is the
    /// tables' value.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_sse2_and_avx2_yuyv_kernels_equal_the_tables() {
        let check = |name: &str, n: usize, done: usize, src: &[u8], y: &[u8], u: &[u8], v: &[u8]| {
            for (i, px) in src.chunks_exact(4).take(done).enumerate() {
                assert_eq!([y[2 * i], y[2 * i + 1], u[i], v[i]], [LUMA_TO_FULL[px[0] as usize], LUMA_TO_FULL[px[2] as usize], CHROMA_TO_FULL[px[1] as usize], CHROMA_TO_FULL[px[3] as usize]], "{name}, {n} pixels, pair {i}");
            }
        };
        for n in [16usize, 32, 48, 64, 96, 1920] {
            let src = bytes(2 * n, 3 * n as u32);
            let (mut y, mut u, mut v) = (vec![0; n], vec![0; n / 2], vec![0; n / 2]);
            let done = simd::yuyv_row_sse2(&src, &mut y, &mut u, &mut v);
            assert_eq!(done, n / 16 * 8, "SSE2 takes 16 pixels a step");
            check("SSE2", n, done, &src, &y, &u, &v);
            if !is_x86_feature_detected!("avx2") {
                eprintln!("this CPU has no AVX2: only the SSE2 kernel was checked");
            } else {
                let (mut y, mut u, mut v) = (vec![0; n], vec![0; n / 2], vec![0; n / 2]);
                // SAFETY: the CPU has AVX2.
                let done = unsafe { simd::yuyv_row_avx2(&src, &mut y, &mut u, &mut v) };
                assert_eq!(done, n / 32 * 16, "AVX2 takes 32 pixels a step");
                check("AVX2", n, done, &src, &y, &u, &v);
            }
        }
    }

    #[test]
    fn rows_of_every_length_equal_the_table_loop() {
        for n in [0usize, 2, 14, 16, 30, 32, 34, 62, 64, 66, 258, 1920] {
            let src = bytes(2 * n, n as u32);
            // YUYV: n pixels.
            let (mut y, mut u, mut v) = (vec![0; n], vec![0; n / 2], vec![0; n / 2]);
            yuyv_row(&src, &mut y, &mut u, &mut v);
            for (i, px) in src.chunks_exact(4).enumerate() {
                assert_eq!([y[2 * i], y[2 * i + 1], u[i], v[i]], [LUMA_TO_FULL[px[0] as usize], LUMA_TO_FULL[px[2] as usize], CHROMA_TO_FULL[px[1] as usize], CHROMA_TO_FULL[px[3] as usize]], "YUYV, {n} pixels, pair {i}");
            }
            // NV12 chroma: n pairs.
            let (mut u, mut v) = (vec![0; n], vec![0; n]);
            uv_pairs_row(&src, &mut u, &mut v);
            for (i, pair) in src.chunks_exact(2).enumerate() {
                assert_eq!((u[i], v[i]), (CHROMA_TO_FULL[pair[0] as usize], CHROMA_TO_FULL[pair[1] as usize]), "pairs, {n}, pair {i}");
            }
            // Planes: 2n samples.
            let (mut y, mut c) = (vec![0; 2 * n], vec![0; 2 * n]);
            luma_row(&src, &mut y);
            chroma_row(&src, &mut c);
            assert!(src.iter().zip(&y).all(|(&s, &d)| d == LUMA_TO_FULL[s as usize]), "luma row of {}", 2 * n);
            assert!(src.iter().zip(&c).all(|(&s, &d)| d == CHROMA_TO_FULL[s as usize]), "chroma row of {}", 2 * n);
        }
        // Planar rows of odd lengths (I420's odd widths and chroma widths).
        for n in [1usize, 15, 17, 33, 255, 961] {
            let src = bytes(n, 7 * n as u32);
            let (mut y, mut c) = (vec![0; n], vec![0; n]);
            luma_row(&src, &mut y);
            chroma_row(&src, &mut c);
            assert!(src.iter().zip(&y).all(|(&s, &d)| d == LUMA_TO_FULL[s as usize]), "luma row of {n}");
            assert!(src.iter().zip(&c).all(|(&s, &d)| d == CHROMA_TO_FULL[s as usize]), "chroma row of {n}");
        }
        let mut a = vec![0u8, 1, 255, 254, 100];
        average_into(&mut a, &[1, 1, 255, 255, 103]);
        assert_eq!(a, [1, 1, 255, 255, 102]);
    }
}
