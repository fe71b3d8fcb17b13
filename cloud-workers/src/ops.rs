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

    fn px(&self, x: usize, y: usize, c: usize) -> u8 {
        self.data[(y * self.w() + x) * self.channels as usize + c]
    }

    /// Mean of all samples (for tests and metrics).
    pub fn mean(&self) -> f64 {
        self.data.iter().map(|&v| v as u64).sum::<u64>() as f64 / self.data.len().max(1) as f64
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Op {
    Grayscale,
    Blur { sigma: f32 },
    Sobel,
    Sharpen,
    Rotate { degrees: u16 },
    Resize { width: u32, height: u32 },
    Crop { x: u32, y: u32, width: u32, height: u32 },
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Grayscale => write!(f, "grayscale"),
            Op::Blur { sigma } => write!(f, "blur:{sigma}"),
            Op::Sobel => write!(f, "sobel"),
            Op::Sharpen => write!(f, "sharpen"),
            Op::Rotate { degrees } => write!(f, "rotate:{degrees}"),
            Op::Resize { width, height } => write!(f, "resize:{width}x{height}"),
            Op::Crop { x, y, width, height } => write!(f, "crop:{width}x{height}+{x}+{y}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OpError {
    #[error("pipeline op {index} `{text}`: {reason}")]
    Parse { index: usize, text: String, reason: String },
    #[error("{op} on a {width}x{height} image: {reason}")]
    Apply { op: String, width: u32, height: u32, reason: String },
}

fn parse_size(s: &str) -> Option<(u32, u32)> {
    let (w, h) = s.split_once('x')?;
    let (w, h) = (w.parse().ok()?, h.parse().ok()?);
    (w > 0 && h > 0).then_some((w, h))
}

impl Op {
    fn parse(index: usize, text: &str) -> Result<Op, OpError> {
        let err = |reason: &str| OpError::Parse { index, text: text.to_owned(), reason: reason.to_owned() };
        let (name, arg) = match text.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (text, None),
        };
        let no_arg = |op: Op| if arg.is_some() { Err(err("takes no argument")) } else { Ok(op) };
        match name {
            "grayscale" | "gray" => no_arg(Op::Grayscale),
            "sobel" => no_arg(Op::Sobel),
            "sharpen" => no_arg(Op::Sharpen),
            "blur" => {
                let sigma: f32 = arg.ok_or_else(|| err("needs a sigma, e.g. blur:1.5"))?.parse().map_err(|_| err("sigma must be a number"))?;
                if !(sigma > 0.0 && sigma <= 50.0) {
                    return Err(err("sigma must be above 0 and at most 50"));
                }
                Ok(Op::Blur { sigma })
            }
            "rotate" => match arg {
                Some("90") => Ok(Op::Rotate { degrees: 90 }),
                Some("180") => Ok(Op::Rotate { degrees: 180 }),
                Some("270") => Ok(Op::Rotate { degrees: 270 }),
                _ => Err(err("needs 90, 180 or 270, e.g. rotate:90")),
            },
            "resize" => {
                let (width, height) = arg.and_then(parse_size).ok_or_else(|| err("needs a size, e.g. resize:1280x720"))?;
                Ok(Op::Resize { width, height })
            }
            "crop" => {
                let bad = || err("needs WxH+X+Y, e.g. crop:640x480+100+50");
                let mut parts = arg.ok_or_else(bad)?.split('+');
                let size = parts.next().and_then(parse_size);
                let x = parts.next().and_then(|v| v.parse().ok());
                let y = parts.next().and_then(|v| v.parse().ok());
                match (size, x, y, parts.next()) {
                    (Some((width, height)), Some(x), Some(y), None) => Ok(Op::Crop { x, y, width, height }),
                    _ => Err(bad()),
                }
            }
            "" => Err(err("empty op")),
            _ => Err(err("unknown op (grayscale, blur, sobel, sharpen, rotate, resize, crop)")),
        }
    }

    /// The output size for an input of `w`×`h`.
    pub fn output_size(&self, w: u32, h: u32) -> (u32, u32) {
        match *self {
            Op::Rotate { degrees: 90 | 270 } => (h, w),
            Op::Resize { width, height } | Op::Crop { width, height, .. } => (width, height),
            _ => (w, h),
        }
    }

    pub fn apply(&self, img: &Img) -> Result<Img, OpError> {
        Ok(match *self {
            Op::Grayscale => grayscale(img),
            Op::Blur { sigma } => blur(img, sigma),
            Op::Sobel => sobel(img),
            Op::Sharpen => sharpen(img),
            Op::Rotate { degrees } => rotate(img, degrees),
            Op::Resize { width, height } => resize(img, width, height).map_err(|reason| self.apply_err(img, reason))?,
            Op::Crop { x, y, width, height } => {
                if x as u64 + width as u64 > img.width as u64 || y as u64 + height as u64 > img.height as u64 {
                    return Err(self.apply_err(img, "the rectangle is outside the image".into()));
                }
                crop(img, x, y, width, height)
            }
        })
    }

    fn apply_err(&self, img: &Img, reason: String) -> OpError {
        OpError::Apply { op: self.to_string(), width: img.width, height: img.height, reason }
    }
}

/// Ops applied in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pipeline(pub Vec<Op>);

impl Pipeline {
    /// Parses `op[:arg],op[:arg],...`; an empty string is the empty pipeline.
    pub fn parse(spec: &str) -> Result<Self, OpError> {
        let spec = spec.trim();
        if spec.is_empty() {
            return Ok(Self(Vec::new()));
        }
        spec.split(',').enumerate().map(|(i, t)| Op::parse(i + 1, t.trim())).collect::<Result<_, _>>().map(Self)
    }

    pub fn apply(&self, img: Img) -> Result<Img, OpError> {
        self.0.iter().try_fold(img, |img, op| op.apply(&img))
    }

    /// The final size for an input of `w`×`h`.
    pub fn output_size(&self, w: u32, h: u32) -> (u32, u32) {
        self.0.iter().fold((w, h), |(w, h), op| op.output_size(w, h))
    }
}

impl fmt::Display for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(Op::to_string).collect();
        f.write_str(&parts.join(","))
    }
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
    let radius = (3.0 * sigma).ceil().max(1.0) as i32;
    let raw: Vec<f64> = (-radius..=radius).map(|i| (-(i as f64).powi(2) / (2.0 * sigma as f64 * sigma as f64)).exp()).collect();
    let total: f64 = raw.iter().sum();
    let mut k: Vec<u32> = raw.iter().map(|v| (v / total * 65536.0).round() as u32).collect();
    // Put the rounding remainder on the centre tap so the weights sum to exactly 1.0.
    let sum: i64 = k.iter().map(|&v| v as i64).sum();
    let c = radius as usize;
    k[c] = (k[c] as i64 + 65536 - sum) as u32;
    k
}

fn convolve_1d(img: &Img, kernel: &[u32], horizontal: bool) -> Img {
    let (w, h, ch) = (img.w(), img.h(), img.channels as usize);
    let r = (kernel.len() / 2) as isize;
    let mut out = vec![0u8; img.data.len()];
    for y in 0..h {
        for x in 0..w {
            for c in 0..ch {
                let mut acc: u32 = 0;
                for (k, &wt) in kernel.iter().enumerate() {
                    let d = k as isize - r;
                    let (sx, sy) = if horizontal {
                        ((x as isize + d).clamp(0, w as isize - 1) as usize, y)
                    } else {
                        (x, (y as isize + d).clamp(0, h as isize - 1) as usize)
                    };
                    acc += wt * img.px(sx, sy, c) as u32;
                }
                out[(y * w + x) * ch + c] = ((acc + 32768) >> 16) as u8;
            }
        }
    }
    Img::new(img.width, img.height, img.channels, out)
}

pub fn blur(img: &Img, sigma: f32) -> Img {
    let k = gaussian_kernel(sigma);
    convolve_1d(&convolve_1d(img, &k, true), &k, false)
}

/// 3×3 integer convolution with clamped edges; `f` maps the 9 neighbours to the output.
fn neighbourhood(img: &Img, mut f: impl FnMut([i32; 9]) -> u8) -> Img {
    let (w, h, ch) = (img.w(), img.h(), img.channels as usize);
    let mut out = vec![0u8; img.data.len()];
    for y in 0..h {
        let ys = [y.saturating_sub(1), y, (y + 1).min(h - 1)];
        for x in 0..w {
            let xs = [x.saturating_sub(1), x, (x + 1).min(w - 1)];
            for c in 0..ch {
                let mut n = [0i32; 9];
                for (j, &yy) in ys.iter().enumerate() {
                    for (i, &xx) in xs.iter().enumerate() {
                        n[j * 3 + i] = img.px(xx, yy, c) as i32;
                    }
                }
                out[(y * w + x) * ch + c] = f(n);
            }
        }
    }
    Img::new(img.width, img.height, img.channels, out)
}

pub fn sobel(img: &Img) -> Img {
    neighbourhood(&grayscale(img), |n| {
        let gx = (n[2] + 2 * n[5] + n[8]) - (n[0] + 2 * n[3] + n[6]);
        let gy = (n[6] + 2 * n[7] + n[8]) - (n[0] + 2 * n[1] + n[2]);
        ((gx * gx + gy * gy) as u32).isqrt().min(255) as u8
    })
}

pub fn sharpen(img: &Img) -> Img {
    neighbourhood(img, |n| (5 * n[4] - n[1] - n[3] - n[5] - n[7]).clamp(0, 255) as u8)
}

pub fn rotate(img: &Img, degrees: u16) -> Img {
    let (w, h, ch) = (img.w(), img.h(), img.channels as usize);
    let (ow, oh) = if degrees == 180 { (w, h) } else { (h, w) };
    let mut out = vec![0u8; img.data.len()];
    for y in 0..h {
        for x in 0..w {
            let (ox, oy) = match degrees {
                90 => (h - 1 - y, x),
                180 => (w - 1 - x, h - 1 - y),
                _ => (y, w - 1 - x), // 270
            };
            let src = (y * w + x) * ch;
            let dst = (oy * ow + ox) * ch;
            out[dst..dst + ch].copy_from_slice(&img.data[src..src + ch]);
        }
    }
    Img::new(ow as u32, oh as u32, img.channels, out)
}

pub fn crop(img: &Img, x: u32, y: u32, width: u32, height: u32) -> Img {
    let ch = img.channels as usize;
    let mut out = Vec::with_capacity(width as usize * height as usize * ch);
    for row in y..y + height {
        let start = (row as usize * img.w() + x as usize) * ch;
        out.extend_from_slice(&img.data[start..start + width as usize * ch]);
    }
    Img::new(width, height, img.channels, out)
}

pub fn resize(img: &Img, width: u32, height: u32) -> Result<Img, String> {
    use fast_image_resize::images::{Image, ImageRef};
    use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
    let pt = if img.channels == 3 { PixelType::U8x3 } else { PixelType::U8 };
    let src = ImageRef::new(img.width, img.height, &img.data, pt).map_err(|e| e.to_string())?;
    let mut dst = Image::new(width, height, pt);
    Resizer::new()
        .resize(&src, &mut dst, &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3)))
        .map_err(|e| e.to_string())?;
    Ok(Img::new(width, height, img.channels, dst.into_vec()))
}

#[cfg(test)]
pub(crate) mod tests {
    //! Reference values were computed independently with numpy / SciPy / Pillow on
    //! shared/testdata/images/coffee.png (600x400 RGB): exact ops against a numpy version of the
    //! same definition, floating-point ones against `scipy.ndimage.gaussian_filter` (sigma 1.5,
    //! mode nearest, truncate 3) and Pillow's `resize(LANCZOS)`.
    use super::*;

    /// shared/testdata/images/coffee.png as RGB (also used by the motion tests).
    pub(crate) fn coffee() -> Img {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/images/coffee.png");
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
    fn pipeline_syntax_and_errors_naming_the_op() {
        let p = Pipeline::parse("resize:1280x720, grayscale,blur:1.5,sobel").unwrap();
        assert_eq!(p.0, vec![Op::Resize { width: 1280, height: 720 }, Op::Grayscale, Op::Blur { sigma: 1.5 }, Op::Sobel]);
        assert_eq!(p.to_string(), "resize:1280x720,grayscale,blur:1.5,sobel");
        assert_eq!(Pipeline::parse("rotate:90,crop:30x40+10+20").unwrap().output_size(1920, 1080), (30, 40));
        assert_eq!(Pipeline::parse("").unwrap().0.len(), 0);
        for (spec, needle) in [
            ("grayscale,blurr:2", "op 2 `blurr:2`: unknown op"),
            ("blur", "needs a sigma"),
            ("blur:-1", "above 0"),
            ("rotate:45", "90, 180 or 270"),
            ("resize:0x10", "needs a size"),
            ("sobel:3", "takes no argument"),
            ("crop:1,2", "WxH+X+Y"),
        ] {
            let e = Pipeline::parse(spec).unwrap_err().to_string();
            assert!(e.contains(needle), "{spec}: {e}");
        }
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
        let c = Op::Crop { x: 100, y: 50, width: 20, height: 10 }.apply(&img).unwrap();
        assert_eq!((c.width, c.height), (20, 10));
        assert_eq!(at(&c, 0, 0), at(&img, 100, 50));
        assert_eq!(at(&c, 19, 9), at(&img, 119, 59));
        let e = Op::Crop { x: 590, y: 0, width: 20, height: 10 }.apply(&img).unwrap_err().to_string();
        assert!(e.contains("crop:20x10+590+0 on a 600x400 image"), "{e}");
    }
}
