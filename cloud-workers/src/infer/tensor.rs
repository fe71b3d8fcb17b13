//! Frames into model inputs: resize (stretched, or letterboxed keeping the aspect ratio),
//! normalise, and lay out as planar NCHW `f32`, remembering the geometry so that boxes in the
//! model's pixels can be mapped back to the frame's.

use crate::ops::Img;

use super::config::ChannelOrder;

/// How a frame is fitted into the model's input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fit {
    /// Resized to exactly the input size (classifiers, DBNet).
    Stretch,
    /// Scaled to fit inside, aspect kept, centred, the rest filled with grey 114 (Ultralytics).
    Letterbox,
}

/// Where the frame landed in the model input: `model = frame * scale + pad`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Placement {
    pub scale_x: f32,
    pub scale_y: f32,
    pub pad_x: f32,
    pub pad_y: f32,
    /// The frame's size.
    pub width: u32,
    pub height: u32,
}

impl Placement {
    /// A box in model pixels (x0, y0, x1, y1) as a box in frame pixels, clamped to the frame.
    pub fn to_frame(&self, b: [f32; 4]) -> [f32; 4] {
        let (w, h) = (self.width as f32, self.height as f32);
        let x0 = ((b[0] - self.pad_x) / self.scale_x).clamp(0.0, w);
        let y0 = ((b[1] - self.pad_y) / self.scale_y).clamp(0.0, h);
        let x1 = ((b[2] - self.pad_x) / self.scale_x).clamp(0.0, w);
        let y1 = ((b[3] - self.pad_y) / self.scale_y).clamp(0.0, h);
        [x0, y0, x1, y1]
    }
}

/// One frame as a model input: `[3, height, width]` values, and where the frame is in it.
#[derive(Clone, Debug)]
pub struct Input {
    pub data: Vec<f32>,
    pub width: u32,
    pub height: u32,
    pub placement: Placement,
}

/// Letterbox padding value (Ultralytics' grey).
const PAD: u8 = 114;

/// `img` (gray or RGB) as a `[3, height, width]` tensor of `(pixel/255 - mean) / std` in
/// `order`.
pub fn prepare(img: &Img, width: u32, height: u32, fit: Fit, order: ChannelOrder, mean: [f32; 3], std: [f32; 3]) -> Result<Input, String> {
    let rgb = if img.channels == 3 { std::borrow::Cow::Borrowed(img) } else { std::borrow::Cow::Owned(gray_to_rgb(img)) };
    let (rw, rh, placement) = match fit {
        Fit::Stretch => (width, height, Placement { scale_x: width as f32 / img.width as f32, scale_y: height as f32 / img.height as f32, pad_x: 0.0, pad_y: 0.0, width: img.width, height: img.height }),
        Fit::Letterbox => {
            let s = (width as f32 / img.width as f32).min(height as f32 / img.height as f32);
            let (rw, rh) = (((img.width as f32 * s).round() as u32).clamp(1, width), ((img.height as f32 * s).round() as u32).clamp(1, height));
            let (px, py) = ((width - rw) / 2, (height - rh) / 2);
            // The scale actually applied per axis (rounding the size changes it slightly).
            (rw, rh, Placement { scale_x: rw as f32 / img.width as f32, scale_y: rh as f32 / img.height as f32, pad_x: px as f32, pad_y: py as f32, width: img.width, height: img.height })
        }
    };
    let resized = if (rw, rh) == (img.width, img.height) { rgb.into_owned() } else { crate::ops::resize_bilinear(&rgb, rw, rh)? };
    let plane = (width * height) as usize;
    let mut data = vec![0f32; 3 * plane];
    let lut: Vec<[f32; 256]> = (0..3)
        .map(|c| {
            let mut t = [0f32; 256];
            for (v, slot) in t.iter_mut().enumerate() {
                *slot = (v as f32 / 255.0 - mean[c]) / std[c];
            }
            t
        })
        .collect();
    // Padding first (only letterbox leaves any), then the frame over it.
    if fit == Fit::Letterbox {
        for c in 0..3 {
            data[c * plane..(c + 1) * plane].fill(lut[c][PAD as usize]);
        }
    }
    let (px, py) = (placement.pad_x as usize, placement.pad_y as usize);
    let src_channel = |c: usize| match order {
        ChannelOrder::Rgb => c,
        ChannelOrder::Bgr => 2 - c,
    };
    for y in 0..rh as usize {
        let row = &resized.data[y * rw as usize * 3..(y + 1) * rw as usize * 3];
        for c in 0..3 {
            let (s, t) = (src_channel(c), &lut[c]);
            let out = &mut data[c * plane + (y + py) * width as usize + px..][..rw as usize];
            for (o, px) in out.iter_mut().zip(row.chunks_exact(3)) {
                *o = t[px[s] as usize];
            }
        }
    }
    Ok(Input { data, width, height, placement })
}

fn gray_to_rgb(img: &Img) -> Img {
    let mut data = Vec::with_capacity(img.data.len() * 3);
    for &v in &img.data {
        data.extend_from_slice(&[v, v, v]);
    }
    Img::new(img.width, img.height, 3, data)
}

/// DBNet's input size for a `w`×`h` frame: the shorter side enlarged to at least `min_side`
/// (0: never), the longer side then shrunk to at most `max_side`, both sides rounded to a
/// multiple of 32 (at least 32), as PaddleOCR and RapidOCR do.
pub fn dbnet_size(w: u32, h: u32, max_side: u32, min_side: u32) -> (u32, u32) {
    let ratio = dbnet_ratio(w, h, max_side, min_side);
    let round = |v: u32| (((v as f32 * ratio) / 32.0).round() as u32 * 32).max(32);
    (round(w), round(h))
}

/// The scale [`dbnet_size`] applies before rounding.
pub fn dbnet_ratio(w: u32, h: u32, max_side: u32, min_side: u32) -> f32 {
    let mut ratio = if min_side > 0 && w.min(h) < min_side { min_side as f32 / w.min(h) as f32 } else { 1.0 };
    if w.max(h) as f32 * ratio > max_side as f32 {
        ratio = max_side as f32 / w.max(h) as f32;
    }
    ratio
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letterbox_centres_the_frame_and_maps_boxes_back() {
        let img = Img::new(200, 100, 3, vec![255; 200 * 100 * 3]);
        let t = prepare(&img, 64, 64, Fit::Letterbox, ChannelOrder::Rgb, [0.0; 3], [1.0; 3]).unwrap();
        assert_eq!((t.placement.pad_x, t.placement.pad_y), (0.0, 16.0));
        assert_eq!(t.placement.scale_x, 64.0 / 200.0);
        // Padding rows are grey 114, the frame's rows white.
        assert_eq!(t.data[0], 114.0 / 255.0);
        assert_eq!(t.data[16 * 64], 1.0);
        assert_eq!(t.data[47 * 64], 1.0);
        assert_eq!(t.data[48 * 64], 114.0 / 255.0);
        let b = t.placement.to_frame([0.0, 16.0, 32.0, 32.0]);
        assert_eq!(b, [0.0, 0.0, 100.0, 50.0]);
        assert_eq!(t.placement.to_frame([-5.0, 0.0, 80.0, 70.0]), [0.0, 0.0, 200.0, 100.0], "clamped to the frame");
    }

    #[test]
    fn channels_order_and_normalisation() {
        let img = Img::new(1, 1, 3, vec![10, 20, 30]);
        let t = prepare(&img, 1, 1, Fit::Stretch, ChannelOrder::Bgr, [0.5; 3], [0.25; 3]).unwrap();
        let want: Vec<f32> = [30.0f32, 20.0, 10.0].iter().map(|v| (v / 255.0 - 0.5) / 0.25).collect();
        assert_eq!(t.data, want);
        let gray = Img::new(1, 1, 1, vec![40]);
        assert_eq!(prepare(&gray, 1, 1, Fit::Stretch, ChannelOrder::Rgb, [0.0; 3], [1.0; 3]).unwrap().data, vec![40.0 / 255.0; 3]);
    }

    #[test]
    fn dbnet_sizes_are_multiples_of_32() {
        assert_eq!(dbnet_size(1920, 1080, 960, 0), (960, 544));
        assert_eq!(dbnet_size(600, 400, 960, 0), (608, 416), "12.5 rounds up");
        assert_eq!(dbnet_size(10, 10, 960, 0), (32, 32));
        assert_eq!(dbnet_size(600, 400, 2000, 736), (1120, 736));
        assert_eq!(dbnet_size(1920, 1080, 960, 736), (960, 544), "max_side wins");
    }
}
