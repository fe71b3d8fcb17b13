//! DBNet (text detection) post-processing: the model outputs, per pixel, the probability of
//! text; pixels above `pixel_threshold` are grouped into 8-connected regions, each region's box
//! is scored by the mean probability inside it, and boxes scoring `min_score` or more are grown
//! by the "unclip" distance (area × ratio / perimeter, as DBNet's label shrinking was) —
//! PaddleOCR's post-processing with axis-aligned boxes instead of rotated rectangles.

/// Post-processing settings.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    pub pixel_threshold: f32,
    pub min_score: f32,
    pub unclip_ratio: f32,
    pub min_box_size: u32,
    pub max_detections: usize,
}

/// Regions looked at most (PaddleOCR's `max_candidates`): a noise map cannot stall a frame.
const MAX_REGIONS: usize = 1000;

/// Text boxes (x0, y0, x1, y1 in map pixels) with their scores, top to bottom.
pub fn boxes(prob: &[f32], w: usize, h: usize, p: &Params) -> Result<Vec<([f32; 4], f32)>, String> {
    if prob.len() != w * h {
        return Err(format!("probability map has {} values, not {w}x{h}", prob.len()));
    }
    let mut seen = vec![false; w * h];
    let mut stack = Vec::new();
    let mut out = Vec::new();
    let mut regions = 0;
    for start in 0..w * h {
        if seen[start] || prob[start] <= p.pixel_threshold {
            continue;
        }
        regions += 1;
        if regions > MAX_REGIONS {
            break;
        }
        // Flood fill the region, tracking its bounding box.
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        seen[start] = true;
        stack.push(start);
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                    if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                        continue;
                    }
                    let j = ny as usize * w + nx as usize;
                    if !seen[j] && prob[j] > p.pixel_threshold {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        let (bw, bh) = ((x1 - x0 + 1) as f32, (y1 - y0 + 1) as f32);
        if bw.min(bh) < p.min_box_size as f32 {
            continue;
        }
        // PaddleOCR's "fast" score: the mean probability over the box.
        let mut sum = 0f64;
        for y in y0..=y1 {
            sum += prob[y * w + x0..=y * w + x1].iter().map(|&v| v as f64).sum::<f64>();
        }
        let score = (sum / (bw as f64 * bh as f64)) as f32;
        if score < p.min_score {
            continue;
        }
        let d = bw * bh * p.unclip_ratio / (2.0 * (bw + bh));
        let b = [(x0 as f32 - d).max(0.0), (y0 as f32 - d).max(0.0), (x1 as f32 + 1.0 + d).min(w as f32), (y1 as f32 + 1.0 + d).min(h as f32)];
        out.push((b, score));
    }
    // Best first when there are too many; then reading order.
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    out.truncate(p.max_detections);
    out.sort_by(|a, b| a.0[1].total_cmp(&b.0[1]).then(a.0[0].total_cmp(&b.0[0])));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Params = Params { pixel_threshold: 0.3, min_score: 0.5, unclip_ratio: 1.5, min_box_size: 3, max_detections: 100 };

    #[test]
    fn regions_become_grown_boxes() {
        let (w, h) = (40, 20);
        let mut m = vec![0f32; w * h];
        // A 10x4 region at (5, 3) of probability 0.9, a 2x2 speck, a faint 6x6 region.
        for y in 3..7 {
            for x in 5..15 {
                m[y * w + x] = 0.9;
            }
        }
        for y in 15..17 {
            for x in 30..32 {
                m[y * w + x] = 0.9;
            }
        }
        for y in 10..16 {
            for x in 20..26 {
                m[y * w + x] = 0.35;
            }
        }
        let b = boxes(&m, w, h, &P).unwrap();
        assert_eq!(b.len(), 1, "{b:?}");
        let d = 10.0 * 4.0 * 1.5 / (2.0 * 14.0);
        assert_eq!(b[0].0, [5.0 - d, 3.0 - d, 15.0 + d, 7.0 + d]);
        assert!((b[0].1 - 0.9).abs() < 1e-6);
        assert!(boxes(&m, w, h - 1, &P).is_err());
    }
}
