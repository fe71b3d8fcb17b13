//! Image operations of the worker's CPU backend, and the pipeline syntax that chains them.
//!
//! `resize:1280x720,grayscale,blur:1.5,sobel` — ops separated by commas, arguments after `:`.
//!
//! | op | what | arithmetic |
//! | --- | --- | --- |
//! | `grayscale` | BT.601 luma | integer: (77 R + 150 G + 29 B + 128) >> 8 — exact |
//! | `blur:SIGMA` | Gaussian blur, separable, radius ⌈3σ⌉, edges clamped | 16-bit fixed-point weights summing to 65536, rounded — exact |
//! | `sobel` | edge magnitude √(gx² + gy²) of the luma, 3×3 Sobel, edges clamped, capped at 255 | integer square root — exact |
//! | `sharpen` | 3×3 kernel [0 −1 0; −1 5 −1; 0 −1 0], edges clamped, clamped to 0–255 | integer — exact |
//! | `rotate:90\|180\|270` | clockwise rotation | exact |
//! | `resize:WxH` | Lanczos3 resampling (fast_image_resize, SIMD) | floating point |
//! | `crop:WxH+X+Y` | a rectangle (ImageMagick geometry) | exact |
//!
//! "Exact" means a GPU backend can reproduce the result bit for bit with integer arithmetic.
//! A JPEG frame whose pipeline starts with luma (`grayscale`, `sobel`) is decoded to its own
//! Y plane instead ([`crate::process::luma_first`]), and a pipeline of only `rotate`, `crop`
//! and `grayscale` may be done in the DCT domain ([`crate::lossless`]), and `blur` and
//! `sharpen` of a 4:2:0 JPEG frame run on its YUV planes with their own definitions
//! ([`crate::plane_ops`]; on both backends); each is defined and tested there. The definitions
//! below are the RGB ones: large-image tiles', and any frame's that takes the pixel path (the
//! GPU backend's shaders compute the same, bit for bit).
//! Motion detection is stateful per camera and lives in [`crate::motion`].

use std::fmt;

/// An 8-bit image with 1 (gray) or 3 (RGB) channels, rows tightly packed.
#[derive(Clone, PartialEq, Eq)]
pub struct Img {
    pub width: u32,
    pub height: u32,
    pub channels: u8,
    pub data: Vec<u8>,
}

impl fmt::Debug for Img {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Img({}x{}x{})", self.width, self.height, self.channels)
    }
}

impl Img {
    pub fn new(width: u32, height: u32, channels: u8, data: Vec<u8>) -> Self {
        assert_eq!(data.len(), width as usize * height as usize * channels as usize, "image buffer size");
        Self { width, height, channels, data }
    }

    fn w(&self) -> usize {
        self.width as usize
    }

    fn h(&self) -> usize {
        self.height as usize
    }

    #[cfg(test)]
    fn px(&self, x: usize, y: usize, c: usize) -> u8 {
        self.data[(y * self.w() + x) * self.channels as usize + c]
    }

    /// Mean of all samples (for tests and metrics).
    pub fn mean(&self) -> f64 {
        self.data.iter().map(|&v| v as u64).sum::<u64>() as f64 / self.data.len().max(1) as f64
    }
}

pub use framelink_common::pipeline::{Op, OpError, Pipeline};

/// Running ops on images: the CPU backend's implementation of the shared pipeline syntax
/// (`framelink_common::pipeline`).
pub trait Apply {
    fn apply(&self, img: Img) -> Result<Img, OpError>;
}

impl Apply for Op {
    fn apply(&self, img: Img) -> Result<Img, OpError> {
        apply_op(self, &img)
    }
}

impl Apply for Pipeline {
    fn apply(&self, img: Img) -> Result<Img, OpError> {
        self.0.iter().try_fold(img, |img, op| apply_op(op, &img))
    }
}

fn apply_err(op: &Op, img: &Img, reason: String) -> OpError {
    OpError::Apply { op: op.to_string(), width: img.width, height: img.height, reason }
}

/// One op on `img`.
pub fn apply_op(op: &Op, img: &Img) -> Result<Img, OpError> {
    Ok(match *op {
        Op::Grayscale => grayscale(img),
        Op::Blur { sigma } => blur(img, sigma),
        Op::Sobel => sobel(img),
        Op::Sharpen => sharpen(img),
        Op::Rotate { degrees } => rotate(img, degrees),
        Op::Resize { width, height } => resize(img, width, height).map_err(|reason| apply_err(op, img, reason))?,
        Op::Crop { x, y, width, height } => {
            if x as u64 + width as u64 > img.width as u64 || y as u64 + height as u64 > img.height as u64 {
                return Err(apply_err(op, img, "the rectangle is outside the image".into()));
            }
            crop(img, x, y, width, height)
        }
        // The frame processor runs models (crate::infer); anywhere else (a tile) there is none.
        Op::Detect { .. } => return Err(apply_err(op, img, "models run only in the worker's frame pipeline (worker.pipeline with its [models.NAME] table)".into())),
    })
}

pub fn grayscale(img: &Img) -> Img {
    if img.channels == 1 {
        return img.clone();
    }
    let data = img
        .data
        .chunks_exact(3)
        .map(|p| ((77 * p[0] as u32 + 150 * p[1] as u32 + 29 * p[2] as u32 + 128) >> 8) as u8)
        .collect();
    Img::new(img.width, img.height, 1, data)
}

/// Gaussian weights for `sigma`, radius ⌈3σ⌉, as integers summing to exactly 65536.
pub fn gaussian_kernel(sigma: f32) -> Vec<u32> {
    let radius = framelink_common::pipeline::blur_radius(sigma) as i32;
    let raw: Vec<f64> = (-radius..=radius).map(|i| (-(i as f64).powi(2) / (2.0 * sigma as f64 * sigma as f64)).exp()).collect();
    let total: f64 = raw.iter().sum();
    let mut k: Vec<u32> = raw.iter().map(|v| (v / total * 65536.0).round() as u32).collect();
    // Put the rounding remainder on the centre tap so the weights sum to exactly 1.0.
    let sum: i64 = k.iter().map(|&v| v as i64).sum();
    let c = radius as usize;
    k[c] = (k[c] as i64 + 65536 - sum) as u32;
    k
}

/// One row with `r` pixels of clamped edge on each side (all channels).
fn padded_row(row: &[u8], ch: usize, r: usize, out: &mut Vec<u8>) {
    out.clear();
    let (first, last) = (&row[..ch], &row[row.len() - ch..]);
    for _ in 0..r {
        out.extend_from_slice(first);
    }
    out.extend_from_slice(row);
    for _ in 0..r {
        out.extend_from_slice(last);
    }
}

// The inner loops below are compiled for several instruction sets (AVX2, SSE4.1, NEON…) and
// picked at run time (`multiversion`): the portable x86-64 baseline has no 32-bit SIMD
// multiply, and these loops are what the worker spends its time in.

#[multiversion::multiversion(targets = "simd")]
fn mac_row(acc: &mut [u32], src: &[u8], wt: u32) {
    for (a, &p) in acc.iter_mut().zip(src) {
        *a += wt * p as u32;
    }
}

/// `acc += wt · (a + b)`: the two taps of a symmetric kernel that share a weight, with one
/// multiply (the same integers as two [`mac_row`] calls).
#[multiversion::multiversion(targets = "simd")]
fn mac2_row(acc: &mut [u32], a: &[u8], b: &[u8], wt: u32) {
    for ((x, &p), &q) in acc.iter_mut().zip(a).zip(b) {
        *x += wt * (p as u32 + q as u32);
    }
}

#[multiversion::multiversion(targets = "simd")]
fn shift_row(dst: &mut [u8], acc: &[u32]) {
    for (d, &a) in dst.iter_mut().zip(acc) {
        *d = (a >> 16) as u8;
    }
}

#[multiversion::multiversion(targets = "simd")]
fn sobel_row(u: &[u8], m: &[u8], d: &[u8], out: &mut [u8]) {
    let n = out.len();
    let (u0, u1, u2) = (&u[..n], &u[1..n + 1], &u[2..n + 2]);
    let (m0, m2) = (&m[..n], &m[2..n + 2]);
    let (d0, d1, d2) = (&d[..n], &d[1..n + 1], &d[2..n + 2]);
    for i in 0..n {
        let gx = (u2[i] as i32 + 2 * m2[i] as i32 + d2[i] as i32) - (u0[i] as i32 + 2 * m0[i] as i32 + d0[i] as i32);
        let gy = (d0[i] as i32 + 2 * d1[i] as i32 + d2[i] as i32) - (u0[i] as i32 + 2 * u1[i] as i32 + u2[i] as i32);
        out[i] = sqrt_capped(gx * gx + gy * gy);
    }
}

#[multiversion::multiversion(targets = "simd")]
fn sharpen_row(u: &[u8], m: &[u8], d: &[u8], out: &mut [u8], ch: usize) {
    let n = out.len();
    let (u1, m0, m1, m2, d1) = (&u[ch..ch + n], &m[..n], &m[ch..ch + n], &m[2 * ch..2 * ch + n], &d[ch..ch + n]);
    for i in 0..n {
        let v = 5 * m1[i] as i16 - m0[i] as i16 - m2[i] as i16 - u1[i] as i16 - d1[i] as i16;
        out[i] = v.clamp(0, 255) as u8;
    }
}

/// `acc` = the taps of `kernel` over the rows `row(0)…row(len − 1)`; a symmetric kernel of odd
/// length (the Gaussian's) pairs its taps, one multiply for two.
fn mac_taps<'a>(acc: &mut [u32], kernel: &[u32], row: impl Fn(usize) -> &'a [u8]) {
    acc.fill(32768);
    let last = kernel.len() - 1;
    if kernel.len() % 2 == 1 && kernel.iter().eq(kernel.iter().rev()) {
        for k in 0..kernel.len() / 2 {
            mac2_row(acc, row(k), row(last - k), kernel[k]);
        }
        mac_row(acc, row(last / 2), kernel[last / 2]);
    } else {
        for (k, &wt) in kernel.iter().enumerate() {
            mac_row(acc, row(k), wt);
        }
    }
}

/// Separable pass along rows: each tap is a whole-row multiply-add (vectorised by the
/// compiler); rounding `(acc + 2^15) >> 16` per pass.
fn convolve_rows(img: &Img, kernel: &[u32]) -> Img {
    let (w, ch) = (img.w(), img.channels as usize);
    let r = kernel.len() / 2;
    let n = w * ch;
    let mut out = vec![0u8; img.data.len()];
    let (mut pad, mut acc) = (Vec::with_capacity((w + 2 * r) * ch), vec![0u32; n]);
    for (src, dst) in img.data.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        padded_row(src, ch, r, &mut pad);
        mac_taps(&mut acc, kernel, |k| &pad[k * ch..k * ch + n]);
        shift_row(dst, &acc);
    }
    Img::new(img.width, img.height, img.channels, out)
}

/// Separable pass along columns: output row y sums whole input rows y-r..=y+r (clamped).
fn convolve_cols(img: &Img, kernel: &[u32]) -> Img {
    let (w, h, ch) = (img.w(), img.h(), img.channels as usize);
    let r = (kernel.len() / 2) as isize;
    let n = w * ch;
    let mut out = vec![0u8; img.data.len()];
    let mut acc = vec![0u32; n];
    for (y, dst) in out.chunks_exact_mut(n).enumerate() {
        mac_taps(&mut acc, kernel, |k| {
            let sy = (y as isize + k as isize - r).clamp(0, h as isize - 1) as usize;
            &img.data[sy * n..sy * n + n]
        });
        shift_row(dst, &acc);
    }
    Img::new(img.width, img.height, img.channels, out)
}

pub fn blur(img: &Img, sigma: f32) -> Img {
    let k = gaussian_kernel(sigma);
    blur_xy(img, &k, &k)
}

/// The separable blur with its own kernel along rows (`kx`) and columns (`ky`): a chroma plane
/// subsampled along one axis only ([`crate::plane_ops`]).
pub fn blur_xy(img: &Img, kx: &[u32], ky: &[u32]) -> Img {
    convolve_cols(&convolve_rows(img, kx), ky)
}

/// 3×3 neighbourhood op with clamped edges, a row at a time: `f(up, mid, down, out)` gets the
/// three padded rows (one pixel of edge on each side) and writes one output row; pixel `i`'s
/// left / centre / right neighbours are at `i`, `i + ch`, `i + 2ch` of each padded row.
fn rows3(img: &Img, mut f: impl FnMut(&[u8], &[u8], &[u8], &mut [u8])) -> Img {
    let (w, h, ch) = (img.w(), img.h(), img.channels as usize);
    let n = w * ch;
    let row = |y: usize| &img.data[y * n..y * n + n];
    let mut out = vec![0u8; img.data.len()];
    // Each row is padded once; the three buffers move up a row as `y` goes down.
    let (mut up, mut mid, mut down) = (Vec::new(), Vec::new(), Vec::new());
    padded_row(row(0), ch, 1, &mut mid);
    up.clone_from(&mid);
    for (y, dst) in out.chunks_exact_mut(n).enumerate() {
        padded_row(row((y + 1).min(h - 1)), ch, 1, &mut down);
        f(&up, &mid, &down, dst);
        std::mem::swap(&mut up, &mut mid);
        std::mem::swap(&mut mid, &mut down);
    }
    Img::new(img.width, img.height, img.channels, out)
}

/// ⌊√v⌋ capped at 255, exact: below 255² an f32 square root cannot round up to the next
/// integer (the gap to it is far above f32's precision there).
#[inline(always)]
fn sqrt_capped(v: i32) -> u8 {
    // Clamped first and converted through i32, not straight to u8: the compiler does a
    // float-to-u8 cast one lane at a time, this one in vector registers (a 1080p sobel took
    // 5.0 ms with the u8 cast, 2.1 ms with this).
    let v = v.clamp(0, 255 * 255);
    // SAFETY: √v of 0 ≤ v ≤ 255² is finite and in 0..=255, representable as i32.
    (unsafe { (v as f32).sqrt().to_int_unchecked::<i32>() }) as u8
}

pub fn sobel(img: &Img) -> Img {
    match img.channels {
        // The luma-only decode hands over one channel: no copy.
        1 => rows3(img, sobel_row),
        _ => rows3(&grayscale(img), sobel_row),
    }
}

pub fn sharpen(img: &Img) -> Img {
    let ch = img.channels as usize;
    rows3(img, |u, m, d, out| sharpen_row(u, m, d, out, ch))
}

/// A `w`×`h` one-byte plane turned clockwise by `degrees` (what [`rotate`] does to a
/// one-channel image), read from a borrowed slice: planes need no copy before turning.
pub fn rotate_plane(data: &[u8], w: usize, h: usize, degrees: u16) -> Vec<u8> {
    assert_eq!(data.len(), w * h, "plane size");
    match degrees {
        180 => data.iter().rev().copied().collect(),
        90 | 270 => rotate_quarter_plane(data, w, h, degrees == 90),
        d => unreachable!("rotations are 90, 180 or 270 degrees, not {d}"),
    }
}

pub fn rotate(img: &Img, degrees: u16) -> Img {
    let (w, h, ch) = (img.w(), img.h(), img.channels as usize);
    if ch == 1 {
        let (ow, oh) = if degrees == 180 { (img.width, img.height) } else { (img.height, img.width) };
        return Img::new(ow, oh, 1, rotate_plane(&img.data, w, h, degrees));
    }
    if degrees == 180 {
        let mut out = img.data.clone();
        out.reverse(); // reverses pixel order and, within each pixel, the channels...
        for px in out.chunks_exact_mut(ch) {
            px.reverse(); // ...which this puts back
        }
        return Img::new(img.width, img.height, img.channels, out);
    }
    // 90 / 270: a transpose, walked in tiles so that both sides stay in cache.
    let out = match ch {
        3 => rotate_quarter::<3>(&img.data, w, h, degrees == 90),
        c => unreachable!("images have 1 or 3 channels, not {c}"),
    };
    Img::new(h as u32, w as u32, img.channels, out)
}

/// Transposes an 8×8 block of bytes held as eight little-endian rows: afterwards `a[j]`'s byte
/// `i` is what `a[i]`'s byte `j` was. Three rounds swap the off-diagonal 4×4, 2×2 and 1×1
/// blocks with shifts and masks, 24 operations on whole rows instead of 64 byte moves.
#[inline(always)]
fn transpose8(a: &mut [u64; 8]) {
    for (d, mask) in [(4usize, 0x0000_0000_FFFF_FFFFu64), (2, 0x0000_FFFF_0000_FFFF), (1, 0x00FF_00FF_00FF_00FF)] {
        let shift = 8 * d as u32;
        for i in (0..8).filter(|i| i & d == 0) {
            let t = ((a[i] >> shift) ^ a[i + d]) & mask;
            a[i + d] ^= t;
            a[i] ^= t << shift;
        }
    }
}

/// Rotates a `w`×`h` one-byte plane by 90° clockwise (`cw`) or 270°: whole 8×8 blocks through
/// [`transpose8`] (a quarter of a 1080p frame's rotation time on the planes was the byte-at-a-time
/// transpose), the edges that do not fill a block one sample at a time.
fn rotate_quarter_plane(src: &[u8], w: usize, h: usize, cw: bool) -> Vec<u8> {
    let mut out = vec![0u8; src.len()];
    let (bw, bh) = (w / 8 * 8, h / 8 * 8);
    for y0 in (0..bh).step_by(8) {
        for x0 in (0..bw).step_by(8) {
            let mut a = [0u64; 8];
            for (i, row) in a.iter_mut().enumerate() {
                let at = (y0 + i) * w + x0;
                *row = u64::from_le_bytes(src[at..at + 8].try_into().unwrap());
            }
            transpose8(&mut a);
            for (j, &col) in a.iter().enumerate() {
                // Clockwise, the block's last source row comes first in each output row.
                let (at, v) = if cw { ((x0 + j) * h + h - 8 - y0, col.swap_bytes()) } else { ((w - 1 - x0 - j) * h + y0, col) };
                out[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
        }
    }
    for y in 0..h {
        for x in (if y < bh { bw } else { 0 })..w {
            let at = if cw { x * h + h - 1 - y } else { (w - 1 - x) * h + y };
            out[at] = src[y * w + x];
        }
    }
    out
}

/// Rotates a `w`×`h` image of `C`-byte pixels by 90° clockwise (`cw`) or 270°.
fn rotate_quarter<const C: usize>(src: &[u8], w: usize, h: usize, cw: bool) -> Vec<u8> {
    const T: usize = 32;
    let ow = h;
    let mut out = vec![0u8; src.len()];
    for ty in (0..h).step_by(T) {
        for tx in (0..w).step_by(T) {
            for y in ty..(ty + T).min(h) {
                let row = &src[y * w * C..(y + 1) * w * C];
                for x in tx..(tx + T).min(w) {
                    let (ox, oy) = if cw { (h - 1 - y, x) } else { (y, w - 1 - x) };
                    let dst = (oy * ow + ox) * C;
                    let px: [u8; C] = row[x * C..x * C + C].try_into().unwrap();
                    out[dst..dst + C].copy_from_slice(&px);
                }
            }
        }
    }
    out
}

pub fn crop(img: &Img, x: u32, y: u32, width: u32, height: u32) -> Img {
    Img::new(width, height, img.channels, crop_samples(&img.data, img.w(), img.channels as usize, x, y, width, height))
}

/// The samples of a rectangle of a `stride`-pixels-wide image of `ch` channels, rows packed
/// (what [`crop`] keeps, also for planes that are not an [`Img`]).
pub fn crop_samples(data: &[u8], stride: usize, ch: usize, x: u32, y: u32, width: u32, height: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(width as usize * height as usize * ch);
    for row in y..y + height {
        let start = (row as usize * stride + x as usize) * ch;
        out.extend_from_slice(&data[start..start + width as usize * ch]);
    }
    out
}

pub fn resize(img: &Img, width: u32, height: u32) -> Result<Img, String> {
    use fast_image_resize::{FilterType, ResizeAlg};
    resize_with(img, width, height, ResizeAlg::Convolution(FilterType::Lanczos3))
}

/// `img` resampled to `width`×`height` with fast_image_resize's `alg`.
fn resize_with(img: &Img, width: u32, height: u32, alg: fast_image_resize::ResizeAlg) -> Result<Img, String> {
    use fast_image_resize::images::{Image, ImageRef};
    use fast_image_resize::{PixelType, ResizeOptions, Resizer};
    let pt = if img.channels == 3 { PixelType::U8x3 } else { PixelType::U8 };
    let src = ImageRef::new(img.width, img.height, &img.data, pt).map_err(|e| e.to_string())?;
    let mut dst = Image::new(width, height, pt);
    Resizer::new().resize(&src, &mut dst, &ResizeOptions::new().resize_alg(alg)).map_err(|e| e.to_string())?;
    Ok(Img::new(width, height, img.channels, dst.into_vec()))
}

/// Bilinear interpolation (each output pixel from its 2x2 source neighbours, as OpenCV's
/// `INTER_LINEAR`, which most vision models were trained with): how frames are scaled into a
/// model's input. Not for ops: shrinking by more than 2x skips source pixels (aliasing).
pub fn resize_bilinear(img: &Img, width: u32, height: u32) -> Result<Img, String> {
    use fast_image_resize::{FilterType, ResizeAlg};
    resize_with(img, width, height, ResizeAlg::Interpolation(FilterType::Bilinear))
}

#[cfg(test)]
pub(crate) mod tests {
    //! Reference values were computed independently with numpy / SciPy / Pillow on
    //! testdata/images/coffee.png (600x400 RGB): exact ops against a numpy version of the
    //! same definition, floating-point ones against `scipy.ndimage.gaussian_filter` (sigma 1.5,
    //! mode nearest, truncate 3) and Pillow's `resize(LANCZOS)`.
    use super::*;

    /// testdata/images/coffee.png as RGB (also used by the motion tests).
    pub(crate) fn coffee() -> Img {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/images/coffee.png");
        let img = image::open(p).unwrap().into_rgb8();
        let (w, h) = img.dimensions();
        Img::new(w, h, 3, img.into_raw())
    }

    fn sum(img: &Img) -> u64 {
        img.data.iter().map(|&v| v as u64).sum()
    }

    fn at(img: &Img, x: usize, y: usize) -> Vec<u8> {
        let c = img.channels as usize;
        img.data[(y * img.w() + x) * c..(y * img.w() + x + 1) * c].to_vec()
    }

    #[test]
    fn grayscale_matches_bt601_reference() {
        let g = grayscale(&coffee());
        assert_eq!((g.width, g.height, g.channels), (600, 400, 1));
        assert_eq!(sum(&g), 24_914_078);
        assert_eq!(at(&g, 20, 10), vec![22]);
        // Pillow's convert("L") (R*299/1000 + G*587/1000 + B*114/1000) has mean 103.6499.
        assert!((g.mean() - 103.6499).abs() < 0.6, "{}", g.mean());
    }

    #[test]
    fn sobel_matches_reference() {
        let s = sobel(&coffee());
        assert_eq!(sum(&s), 11_982_861);
        assert_eq!(at(&s, 200, 100), vec![14]);
        // A vertical step edge 0 → 100: gx = 4 × 100 on the two columns beside it.
        let mut step = vec![0u8; 8 * 4];
        for y in 0..4 {
            for x in 4..8 {
                step[y * 8 + x] = 100;
            }
        }
        let e = sobel(&Img::new(8, 4, 1, step));
        assert_eq!(&e.data[0..8], &[0, 0, 0, 255, 255, 0, 0, 0]);
    }

    #[test]
    fn the_sobel_magnitude_is_the_exact_integer_square_root_capped() {
        // Every gx² + gy² a 3×3 Sobel can give (|gx|, |gy| ≤ 1020), against integer ⌊√v⌋.
        for v in 0..=2 * 1020 * 1020 {
            let exact = (0..=255u32).rev().find(|r| r * r <= v as u32).unwrap();
            assert_eq!(sqrt_capped(v) as u32, exact.min(255), "v = {v}");
        }
    }

    #[test]
    fn sharpen_matches_reference() {
        let s = sharpen(&coffee());
        assert_eq!(sum(&s), 71_146_075);
        assert_eq!(at(&s, 60, 50), vec![31, 18, 22]);
    }

    #[test]
    fn blur_matches_scipy_within_rounding() {
        let img = coffee();
        let b = blur(&img, 1.5);
        assert!((b.mean() - 98.6167).abs() < 0.5, "mean {}", b.mean());
        let reference: [(usize, usize, [f64; 3]); 6] = [
            (13, 37, [31.4, 20.3, 12.62]),
            (211, 37, [187.67, 113.66, 72.89]),
            (407, 151, [137.13, 25.9, 7.51]),
            (211, 263, [160.0, 35.98, 11.66]),
            (211, 389, [21.72, 3.94, 1.43]),
            (587, 389, [153.49, 70.32, 29.35]),
        ];
        for (x, y, want) in reference {
            for (c, w) in want.iter().enumerate() {
                let got = at(&b, x, y)[c] as f64;
                assert!((got - w).abs() <= 1.5, "({x},{y}) channel {c}: {got} vs SciPy {w}");
            }
        }
        // The weights sum to exactly 1: a flat image stays flat.
        let flat = Img::new(9, 9, 1, vec![200; 81]);
        assert_eq!(blur(&flat, 2.0), flat);
        assert_eq!(gaussian_kernel(1.5).iter().sum::<u32>(), 65536);
    }

    #[test]
    fn resize_matches_pillow_lanczos() {
        let r = resize(&coffee(), 300, 200).unwrap();
        assert_eq!((r.width, r.height), (300, 200));
        assert!((r.mean() - 98.6169).abs() < 0.5, "mean {}", r.mean());
        let reference: [(usize, usize, [f64; 3]); 6] = [
            (3, 5, [21.0, 13.0, 7.0]),
            (101, 77, [246.0, 234.0, 218.0]),
            (199, 133, [33.0, 14.0, 5.0]),
            (296, 133, [175.0, 95.0, 46.0]),
            (101, 194, [21.0, 4.0, 3.0]),
            (296, 194, [161.0, 72.0, 31.0]),
        ];
        for (x, y, want) in reference {
            for (c, w) in want.iter().enumerate() {
                let got = at(&r, x, y)[c] as f64;
                assert!((got - w).abs() <= 3.0, "({x},{y}) channel {c}: {got} vs Pillow {w}");
            }
        }
    }

    /// The definition, pixel by pixel: clamped taps, 16-bit weights, rounding after each pass.
    fn blur_by_definition(img: &Img, sigma: f32) -> Img {
        let k = gaussian_kernel(sigma);
        let r = (k.len() / 2) as isize;
        let (w, h, ch) = (img.w() as isize, img.h() as isize, img.channels as usize);
        let pass = |src: &Img, horizontal: bool| {
            let mut out = vec![0u8; src.data.len()];
            for y in 0..h {
                for x in 0..w {
                    for c in 0..ch {
                        let acc: u32 = k.iter().enumerate().map(|(i, &wt)| {
                            let d = i as isize - r;
                            let (sx, sy) = if horizontal { ((x + d).clamp(0, w - 1), y) } else { (x, (y + d).clamp(0, h - 1)) };
                            wt * src.px(sx as usize, sy as usize, c) as u32
                        }).sum();
                        out[(y * w + x) as usize * ch + c] = ((acc + 32768) >> 16) as u8;
                    }
                }
            }
            Img::new(src.width, src.height, src.channels, out)
        };
        pass(&pass(img, true), false)
    }

    #[test]
    fn fast_blur_equals_the_definition_bit_for_bit() {
        let img = coffee();
        for sigma in [0.5, 1.5, 4.0] {
            assert_eq!(blur(&img, sigma), blur_by_definition(&img, sigma), "sigma {sigma}");
        }
        let gray = grayscale(&img);
        assert_eq!(blur(&gray, 2.0), blur_by_definition(&gray, 2.0));
        // Smaller than the kernel: every tap clamps.
        let tiny = Img::new(3, 2, 3, (0..18).map(|v| v * 13).collect());
        assert_eq!(blur(&tiny, 3.0), blur_by_definition(&tiny, 3.0));
    }

    #[test]
    fn rotate_and_crop_are_exact() {
        let img = coffee();
        let r90 = rotate(&img, 90);
        assert_eq!((r90.width, r90.height), (400, 600));
        // Clockwise: the bottom-left pixel comes to the top-left.
        assert_eq!(at(&r90, 0, 0), at(&img, 0, 399));
        assert_eq!(at(&r90, 399, 0), at(&img, 0, 0));
        assert_eq!(at(&rotate(&img, 270), 0, 0), at(&img, 599, 0));
        assert_eq!(at(&rotate(&img, 180), 0, 0), at(&img, 599, 399));
        let round = [90, 90, 90, 90].iter().fold(img.clone(), |i, d| rotate(&i, *d));
        assert_eq!(round, img);
        // One-channel planes go through 8×8 block transposes; sizes with and without edges
        // that fill no block, against the definition (90°: out(x, y) = in(y, H-1-x)).
        for (w, h) in [(16usize, 8usize), (37, 21), (8, 19), (5, 3), (1920, 1080)] {
            let plane = Img::new(w as u32, h as u32, 1, (0..w * h).map(|i| (i * 7 + i / w) as u8).collect());
            let (r90, r270) = (rotate(&plane, 90), rotate(&plane, 270));
            assert_eq!((r90.width, r90.height), (h as u32, w as u32));
            for y in 0..w {
                for x in 0..h {
                    assert_eq!(r90.px(x, y, 0), plane.px(y, h - 1 - x, 0), "{w}x{h} 90° at ({x},{y})");
                    assert_eq!(r270.px(x, y, 0), plane.px(w - 1 - y, x, 0), "{w}x{h} 270° at ({x},{y})");
                }
            }
        }
        let c = Op::Crop { x: 100, y: 50, width: 20, height: 10 }.apply(img.clone()).unwrap();
        assert_eq!((c.width, c.height), (20, 10));
        assert_eq!(at(&c, 0, 0), at(&img, 100, 50));
        assert_eq!(at(&c, 19, 9), at(&img, 119, 59));
        let e = Op::Crop { x: 590, y: 0, width: 20, height: 10 }.apply(img.clone()).unwrap_err().to_string();
        assert!(e.contains("crop:20x10+590+0 on a 600x400 image"), "{e}");
    }
}
