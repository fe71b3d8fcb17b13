//! Boxes found at some point of a pipeline, mapped back to the source frame's pixels through
//! the geometric ops before that point (crop, resize, rotate), so that events always speak of
//! the frame the camera sent, whatever the pipeline did before the model saw it.

use framelink_common::pipeline::Op;

use super::model::BoxPx;

/// `b`, found on the image that `ops` made from a `decoded`-sized image, in the pixels of the
/// `frame`-sized source (`decoded` is smaller when the decoder scaled the JPEG down).
pub fn to_source(ops: &[Op], decoded: (u32, u32), frame: (u32, u32), b: BoxPx) -> BoxPx {
    let mut sizes = vec![decoded];
    for op in ops {
        let (w, h) = *sizes.last().expect("non-empty");
        sizes.push(op.output_size(w, h));
    }
    let (mut x, mut y, mut bw, mut bh) = (b.x, b.y, b.width, b.height);
    for (k, op) in ops.iter().enumerate().rev() {
        let (w, h) = (sizes[k].0 as f32, sizes[k].1 as f32);
        match *op {
            Op::Crop { x: cx, y: cy, .. } => {
                x += cx as f32;
                y += cy as f32;
            }
            Op::Resize { width, height } => {
                let (sx, sy) = (w / width as f32, h / height as f32);
                (x, y, bw, bh) = (x * sx, y * sy, bw * sx, bh * sy);
            }
            // (w, h) is the size before the clockwise rotation.
            Op::Rotate { degrees: 90 } => (x, y, bw, bh) = (y, h - (x + bw), bh, bw),
            Op::Rotate { degrees: 180 } => (x, y) = (w - (x + bw), h - (y + bh)),
            Op::Rotate { degrees: 270 } => (x, y, bw, bh) = (w - (y + bh), x, bh, bw),
            _ => {}
        }
    }
    let (sx, sy) = (frame.0 as f32 / decoded.0 as f32, frame.1 as f32 / decoded.1 as f32);
    BoxPx { x: x * sx, y: y * sy, width: bw * sx, height: bh * sy }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{Apply, Img, Pipeline};

    /// A frame with one white pixel block; after each pipeline, find the block, map its box
    /// back and compare with where it was.
    #[test]
    fn boxes_map_back_through_crop_resize_and_rotate() {
        let (w, h) = (64u32, 48u32);
        let mut data = vec![0u8; (w * h) as usize];
        let (bx, by, bw, bh) = (40u32, 8u32, 8u32, 4u32);
        for y in by..by + bh {
            for x in bx..bx + bw {
                data[(y * w + x) as usize] = 255;
            }
        }
        let img = Img::new(w, h, 1, data);
        for spec in ["rotate:90", "rotate:180", "rotate:270", "crop:32x32+24+4", "rotate:90,crop:16x30+30+30", "resize:128x96", "crop:40x40+20+0,rotate:270,resize:80x80"] {
            let p = Pipeline::parse(spec).unwrap();
            let out = p.apply(img.clone()).unwrap();
            // The bright block's bounding box in the output.
            let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
            for y in 0..out.height {
                for x in 0..out.width {
                    if out.data[(y * out.width + x) as usize] > 127 {
                        (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x + 1), y1.max(y + 1));
                    }
                }
            }
            let found = BoxPx::from_corners([x0 as f32, y0 as f32, x1 as f32, y1 as f32]);
            let back = to_source(&p.0, (w, h), (w, h), found);
            let want = [bx as f32, by as f32, (bx + bw) as f32, (by + bh) as f32];
            for (got, want) in back.corners().iter().zip(want) {
                assert!((got - want).abs() <= 1.0, "{spec}: {back:?} vs {want:?}");
            }
        }
        // A decoder that scaled by 1/2: boxes double.
        let b = to_source(&[], (32, 24), (64, 48), BoxPx { x: 1.0, y: 2.0, width: 3.0, height: 4.0 });
        assert_eq!(b, BoxPx { x: 2.0, y: 4.0, width: 6.0, height: 8.0 });
    }
}
