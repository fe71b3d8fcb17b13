//! A [`Pipeline`] for one input size turned into GPU passes: which shader entry point runs,
//! the image size going in and out, its arguments and the read-only table it reads (blur
//! weights, resize coefficients). Pure data, so it is tested without a GPU.
//!
//! The tables are the CPU backend's own: [`gaussian_kernel`] for blur, and for resize the
//! fixed-point Lanczos3 coefficients computed the way `fast_image_resize` computes them for
//! 8-bit images (Pillow's convolution: adaptive support, weights normalised, rounded to i16
//! at the highest precision that fits, vertical pass first) — so the GPU result is the CPU
//! result, bit for bit, not merely close.

use crate::ops::{Op, OpError, Pipeline, gaussian_kernel};

/// One dispatch over the batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Pass {
    /// Shader entry point (see ops.wgsl).
    pub entry: &'static str,
    pub input: Size,
    pub output: Size,
    /// Entry-specific arguments (`Params.a`..`d` in the shader).
    pub args: [u32; 4],
    /// Read-only table for this pass (`aux`), may be empty.
    pub table: Vec<i32>,
}

/// Width, height, channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Size {
    pub w: u32,
    pub h: u32,
    pub ch: u32,
}

impl Size {
    pub fn bytes(&self) -> u64 {
        self.w as u64 * self.h as u64 * self.ch as u64
    }
    /// u32 words holding the image.
    pub fn words(&self) -> u64 {
        self.bytes().div_ceil(4)
    }
}

/// The passes of `pipeline` for an input of `input`, and the motion pass (reading the final
/// image) when `motion` is set.
pub fn plan(pipeline: &Pipeline, input: Size, motion: bool) -> Result<(Vec<Pass>, Option<Pass>), OpError> {
    let mut passes = Vec::new();
    let mut cur = input;
    for op in &pipeline.0 {
        let err = |reason: &str| OpError::Apply { op: op.to_string(), width: cur.w, height: cur.h, reason: reason.into() };
        macro_rules! add {
            ($entry:expr, $output:expr, $args:expr, $table:expr) => {{
                let output: Size = $output;
                passes.push(Pass { entry: $entry, input: cur, output, args: $args, table: $table });
                cur = output;
            }};
        }
        match *op {
            Op::Grayscale if cur.ch == 1 => {}
            Op::Grayscale => add!("grayscale", Size { ch: 1, ..cur }, [0; 4], vec![]),
            Op::Blur { sigma } => {
                let k: Vec<i32> = gaussian_kernel(sigma).into_iter().map(|v| v as i32).collect();
                let r = (k.len() / 2) as u32;
                add!("blur_h", cur, [r, 0, 0, 0], k.clone());
                add!("blur_v", cur, [r, 0, 0, 0], k);
            }
            Op::Sobel => {
                if cur.ch == 3 {
                    add!("grayscale", Size { ch: 1, ..cur }, [0; 4], vec![]);
                }
                add!("sobel", cur, [0; 4], vec![]);
            }
            Op::Sharpen => add!("sharpen", cur, [0; 4], vec![]),
            Op::Rotate { degrees } => {
                let out = if degrees == 180 { cur } else { Size { w: cur.h, h: cur.w, ch: cur.ch } };
                add!("rotate", out, [degrees as u32, 0, 0, 0], vec![]);
            }
            Op::Crop { x, y, width, height } => {
                if x as u64 + width as u64 > cur.w as u64 || y as u64 + height as u64 > cur.h as u64 {
                    return Err(err("the rectangle is outside the image"));
                }
                add!("crop", Size { w: width, h: height, ch: cur.ch }, [x, y, 0, 0], vec![]);
            }
            Op::Detect { .. } => return Err(err("models run on the CPU backend's frame path, not in the GPU stage")),
            Op::Resize { width, height } => {
                if height != cur.h {
                    let (precision, stride, table) = resize_table(cur.h, height);
                    add!("resize_v", Size { h: height, ..cur }, [precision, stride, 0, 0], table);
                }
                if width != cur.w {
                    let (precision, stride, table) = resize_table(cur.w, width);
                    add!("resize_h", Size { w: width, ..cur }, [precision, stride, 0, 0], table);
                }
            }
        }
    }
    let motion = motion.then(|| {
        let (f, w, h) = crate::motion::small_luma_size(cur.w, cur.h);
        Pass { entry: "small_luma", input: cur, output: Size { w, h, ch: 1 }, args: [f, 0, 0, 0], table: vec![] }
    });
    Ok((passes, motion))
}

fn lanczos3(x: f64) -> f64 {
    fn sinc(x: f64) -> f64 {
        if x == 0.0 {
            1.0
        } else {
            let x = x * std::f64::consts::PI;
            x.sin() / x
        }
    }
    if (-3.0..3.0).contains(&x) { sinc(x) * sinc(x / 3.0) } else { 0.0 }
}

/// Fixed-point Lanczos3 coefficients for resampling `in_size` samples to `out_size`:
/// `(precision bits, words per output sample, table)`, the table holding for each output
/// sample `[first input sample, count, coefficient...]` padded to the stride.
pub fn resize_table(in_size: u32, out_size: u32) -> (u32, u32, Vec<i32>) {
    const SUPPORT: f64 = 3.0;
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let radius = SUPPORT * filter_scale;
    let window = radius.ceil() as usize * 2 + 1;
    let mut rows: Vec<(u32, Vec<f64>)> = Vec::with_capacity(out_size as usize);
    for o in 0..out_size {
        let centre = (o as f64 + 0.5) * scale;
        let lo = (centre - radius).floor().max(0.0) as u32;
        let hi = (centre + radius).ceil().min(in_size as f64) as u32;
        let mut start = lo;
        let mut w: Vec<f64> = Vec::with_capacity(window);
        for x in lo..hi {
            let v = lanczos3((x as f64 - (centre - 0.5)) / filter_scale);
            if x == start && v == 0.0 {
                start += 1; // leading zero weights are not part of the window
            } else {
                w.push(v);
            }
        }
        while w.last() == Some(&0.0) {
            w.pop();
        }
        let total: f64 = w.iter().sum();
        if total != 0.0 {
            w.iter_mut().for_each(|v| *v /= total);
        }
        rows.push((start, w));
    }
    // The highest precision at which the largest weight still fits an i16.
    let max_weight = rows.iter().flat_map(|(_, w)| w.iter().copied()).fold(0.0f64, f64::max);
    let mut precision = 0u32;
    for p in 0..22u32 {
        precision = p;
        if (max_weight * (1u64 << (p + 1)) as f64).round() as i64 >= 1 << 15 {
            break;
        }
    }
    let scale_fp = (1u64 << precision) as f64;
    let stride = window as u32 + 2;
    let mut table = vec![0i32; stride as usize * out_size as usize];
    for (row, (start, w)) in table.chunks_exact_mut(stride as usize).zip(rows) {
        row[0] = start as i32;
        row[1] = w.len() as i32;
        for (dst, v) in row[2..].iter_mut().zip(w) {
            *dst = (v * scale_fp).round() as i16 as i32;
        }
    }
    (precision, stride, table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(w: u32, h: u32, ch: u32) -> Size {
        Size { w, h, ch }
    }

    #[test]
    fn passes_follow_the_ops_and_their_sizes() {
        let p = Pipeline::parse("resize:320x240,grayscale,blur:1,sobel,rotate:90,crop:10x20+1+2").unwrap();
        let (passes, motion) = plan(&p, size(640, 480, 3), true).unwrap();
        let entries: Vec<_> = passes.iter().map(|p| p.entry).collect();
        // grayscale before sobel is skipped: the image is already one channel.
        assert_eq!(entries, ["resize_v", "resize_h", "grayscale", "blur_h", "blur_v", "sobel", "rotate", "crop"]);
        assert_eq!(passes[0].output, size(640, 240, 3));
        assert_eq!(passes[1].output, size(320, 240, 3));
        assert_eq!(passes[6].output, size(240, 320, 1));
        assert_eq!(passes[7].output, size(10, 20, 1));
        for w in passes.windows(2) {
            assert_eq!(w[0].output, w[1].input, "{} -> {}", w[0].entry, w[1].entry);
        }
        let m = motion.unwrap();
        assert_eq!((m.input, m.output, m.args[0]), (size(10, 20, 1), size(10, 20, 1), 1));
    }

    #[test]
    fn a_crop_outside_the_image_is_refused_like_on_the_cpu() {
        let p = Pipeline::parse("crop:100x100+600+0").unwrap();
        let e = plan(&p, size(640, 480, 3), false).unwrap_err();
        assert!(e.to_string().contains("outside the image"), "{e}");
    }

    #[test]
    fn resize_weights_are_normalised_fixed_point() {
        for (from, to) in [(1920, 1280), (1080, 360), (427, 240), (100, 300)] {
            let (precision, stride, table) = resize_table(from, to);
            assert!((4..=21).contains(&precision), "{precision}");
            for row in table.chunks_exact(stride as usize) {
                let (start, n) = (row[0], row[1] as usize);
                assert!(start >= 0 && start as usize + n <= from as usize, "{from}->{to}: {row:?}");
                let sum: i64 = row[2..2 + n].iter().map(|&v| v as i64).sum();
                // Rounding each weight moves the sum by at most half a unit per tap.
                assert!((sum - (1i64 << precision)).abs() <= n as i64, "{from}->{to}: {sum} vs {}", 1 << precision);
            }
        }
    }
}
