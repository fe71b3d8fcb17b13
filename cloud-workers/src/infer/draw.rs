//! `draw = true`: boxes and their labels rendered into the result image (a 2-pixel outline in
//! a colour per class, the label and score on a filled tag above it, 8x8 bitmap font).

use font8x8::UnicodeFonts;

use super::model::Detection;
use crate::ops::Img;

const PALETTE: [[u8; 3]; 8] = [[255, 56, 56], [72, 249, 10], [0, 194, 255], [255, 178, 29], [207, 210, 49], [146, 204, 23], [255, 55, 199], [52, 69, 147]];

/// Draws `dets` (boxes in `img`'s pixels) into `img`.
pub fn draw(img: &mut Img, dets: &[Detection]) {
    for d in dets {
        let Some(b) = d.bbox else { continue };
        let colour = PALETTE[d.class_id as usize % PALETTE.len()];
        let (x0, y0) = (b.x.max(0.0) as i64, b.y.max(0.0) as i64);
        let (x1, y1) = ((b.x + b.width).ceil() as i64 - 1, (b.y + b.height).ceil() as i64 - 1);
        for t in 0..2 {
            hline(img, x0, x1, y0 + t, colour);
            hline(img, x0, x1, y1 - t, colour);
            vline(img, x0 + t, y0, y1, colour);
            vline(img, x1 - t, y0, y1, colour);
        }
        let text = format!("{} {:.2}", d.label, d.score);
        let tag_h = 10;
        let ty = if y0 >= tag_h { y0 - tag_h } else { y0 };
        let tag_w = text.chars().count() as i64 * 8 + 2;
        for y in ty..ty + tag_h {
            hline(img, x0, x0 + tag_w - 1, y, colour);
        }
        for (i, c) in text.chars().enumerate() {
            let glyph = font8x8::BASIC_FONTS.get(c).unwrap_or([0; 8]);
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits >> col & 1 == 1 {
                        put(img, x0 + 1 + i as i64 * 8 + col, ty + 1 + row as i64, [0, 0, 0]);
                    }
                }
            }
        }
    }
}

fn put(img: &mut Img, x: i64, y: i64, c: [u8; 3]) {
    if x < 0 || y < 0 || x >= img.width as i64 || y >= img.height as i64 {
        return;
    }
    let i = (y as usize * img.width as usize + x as usize) * img.channels as usize;
    if img.channels == 3 {
        img.data[i..i + 3].copy_from_slice(&c);
    } else {
        // Gray: the colour's luma, pushed to white so a box shows on any background.
        img.data[i] = if c == [0, 0, 0] { 0 } else { 255 };
    }
}

fn hline(img: &mut Img, x0: i64, x1: i64, y: i64, c: [u8; 3]) {
    for x in x0..=x1 {
        put(img, x, y, c);
    }
}

fn vline(img: &mut Img, x: i64, y0: i64, y1: i64, c: [u8; 3]) {
    for y in y0..=y1 {
        put(img, x, y, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::model::BoxPx;

    #[test]
    fn boxes_and_tags_land_where_the_detection_is() {
        let mut img = Img::new(100, 80, 3, vec![100; 100 * 80 * 3]);
        let d = Detection { label: "car".into(), class_id: 0, score: 0.9, bbox: Some(BoxPx { x: 20.0, y: 30.0, width: 40.0, height: 20.0 }) };
        draw(&mut img, &[d]);
        let px = |x: usize, y: usize| &img.data[(y * 100 + x) * 3..][..3];
        assert_eq!(px(20, 40), PALETTE[0], "left edge");
        assert_eq!(px(59, 40), PALETTE[0], "right edge");
        assert_eq!(px(40, 49), PALETTE[0], "bottom edge");
        assert_eq!(px(40, 40), [100, 100, 100], "inside untouched");
        assert_eq!(px(10, 10), [100, 100, 100], "outside untouched");
        // The tag sits above the box: filled with the class colour, with black glyph pixels.
        assert!((20..20 + 8 * 8).any(|x| (20..30).any(|y| px(x, y) == PALETTE[0])));
        assert!((20..20 + 8 * 8).any(|x| (20..30).any(|y| px(x, y) == [0, 0, 0])), "glyphs drawn");
    }
}
