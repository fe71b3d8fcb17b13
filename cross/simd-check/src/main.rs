//! Checks the agent's studio-range stretch kernels (`agent/src/encoder/stretch.rs`: NEON on
//! aarch64, SSE2/AVX2 on x86-64, the tables elsewhere) against an independent reference — the
//! formula `⌊((v − lo)·255 + span/2) / span⌋` clamped to 0–255, computed here per sample — on
//! rows of many lengths (every vector width, their tails) and every byte value.
//!
//! Why a program and not the agent's unit tests: `scripts/cross-build` runs this under
//! qemu-user, and the qemu-user of the development machine hangs when a program starts a
//! thread (docs/deployment.md) — the test harness starts one per test; this runs on one.
//! The same checks run natively as the agent's unit tests.
//!
//! Run: `cargo run --manifest-path cross/simd-check/Cargo.toml` (native), or see scripts/cross-build.

#[path = "../../../agent/src/encoder/stretch.rs"]
#[allow(dead_code)]
mod stretch;

/// The reference: studio range `lo..lo+span` to 0–255, rounded, clamped.
fn reference(v: u8, lo: i32, span: i32) -> u8 {
    (((v as i32 - lo) * 255 + span / 2).div_euclid(span)).clamp(0, 255) as u8
}
fn luma(v: u8) -> u8 {
    reference(v, 16, 219)
}
fn chroma(v: u8) -> u8 {
    reference(v, 16, 224)
}

/// Every byte value, then pseudo-random bytes, `n` long.
fn bytes(n: usize, seed: u32) -> Vec<u8> {
    let mut s = seed;
    (0..n)
        .map(|i| {
            if i < 256 {
                i as u8
            } else {
                s = s.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (s >> 16) as u8
            }
        })
        .collect()
}

/// How much of a row the target's SIMD kernels take (the rest is the tables' tail), so that a
/// kernel that did nothing, or a `cfg` that picked none, fails here instead of passing on the
/// tables: (YUYV pixel pairs of an `n`-pixel row, U,V pairs of an `n`-pair row, samples of an
/// `m`-sample planar row).
fn kernel_units(n: usize, m: usize) -> (usize, usize, usize) {
    match std::env::consts::ARCH {
        // 32 pixels, 16 pairs, 16 samples a step.
        "aarch64" => (n / 32 * 16, n / 16 * 16, m / 16 * 16),
        // AVX2 or SSE2 for YUYV (together 16 pixels a step), SSE2 8 pairs and 16 samples.
        "x86_64" => (n / 16 * 8, n / 8 * 8, m / 16 * 16),
        _ => (0, 0, 0),
    }
}

fn main() {
    let mut samples = 0usize;
    for n in [0usize, 2, 14, 16, 30, 32, 34, 62, 64, 66, 96, 128, 130, 258, 512, 1280, 1920, 3840] {
        let src = bytes(2 * n, n as u32 + 1);
        let (yuyv_units, pair_units, plane_units) = kernel_units(n, 2 * n + 1);
        let (mut y, mut u, mut v) = (vec![0; n], vec![0; n / 2], vec![0; n / 2]);
        assert_eq!(stretch::simd::yuyv_row(&src, &mut y, &mut u, &mut v), yuyv_units, "YUYV kernel, {n} pixels");
        let (mut u, mut v) = (vec![0; n], vec![0; n]);
        assert_eq!(stretch::simd::uv_pairs_row(&src, &mut u, &mut v), pair_units, "U,V pair kernel, {n} pairs");
        let odd = bytes(2 * n + 1, 5);
        let mut out = vec![0; 2 * n + 1];
        assert_eq!(stretch::simd::luma_row(&odd, &mut out), plane_units, "luma kernel, {} samples", 2 * n + 1);
        assert_eq!(stretch::simd::chroma_row(&odd, &mut out), plane_units, "chroma kernel, {} samples", 2 * n + 1);
        // YUYV: n pixels.
        let (mut y, mut u, mut v) = (vec![0; n], vec![0; n / 2], vec![0; n / 2]);
        stretch::yuyv_row(&src, &mut y, &mut u, &mut v);
        for (i, px) in src.chunks_exact(4).enumerate() {
            let want = [luma(px[0]), luma(px[2]), chroma(px[1]), chroma(px[3])];
            assert_eq!([y[2 * i], y[2 * i + 1], u[i], v[i]], want, "YUYV row of {n} pixels, pixel pair {i}");
            samples += 4;
        }
        // NV12 chroma: n U, V pairs.
        let (mut u, mut v) = (vec![0; n], vec![0; n]);
        stretch::uv_pairs_row(&src, &mut u, &mut v);
        for (i, p) in src.chunks_exact(2).enumerate() {
            assert_eq!((u[i], v[i]), (chroma(p[0]), chroma(p[1])), "U, V pair row of {n}, pair {i}");
            samples += 2;
        }
        // Planar rows, even and odd lengths.
        for m in [2 * n, 2 * n + 1] {
            let src = bytes(m, 7 * m as u32 + 3);
            let (mut a, mut b) = (vec![0; m], vec![0; m]);
            stretch::luma_row(&src, &mut a);
            stretch::chroma_row(&src, &mut b);
            for i in 0..m {
                assert_eq!((a[i], b[i]), (luma(src[i]), chroma(src[i])), "plane row of {m}, sample {i}");
                samples += 2;
            }
        }
    }
    // The tables the kernels' row tails use are the reference too.
    for v in 0..=255u8 {
        assert_eq!((stretch::LUMA_TO_FULL[v as usize], stretch::CHROMA_TO_FULL[v as usize]), (luma(v), chroma(v)), "table value {v}");
    }
    let kernels = match std::env::consts::ARCH {
        "aarch64" => "NEON",
        "x86_64" => "SSE2/AVX2",
        _ => "table",
    };
    println!("simd-check ({kernels} kernels, {}): {samples} samples equal the reference", std::env::consts::ARCH);
}
