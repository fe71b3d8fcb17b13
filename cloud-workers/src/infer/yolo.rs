//! YOLO (Ultralytics v5 / v8-style exports) post-processing: decode the raw head output into
//! scored boxes, then class-aware non-maximum suppression.
//!
//! Two layouts exist and are told apart by shape: v5 `[N, boxes, 5 + classes]` (cx, cy, w, h,
//! objectness, class scores; score = objectness × class score) and v8 `[N, 4 + classes, boxes]`
//! (cx, cy, w, h, class scores; no objectness). Boxes are in the model input's pixels.

/// One candidate or kept box, in model pixels (x0, y0, x1, y1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    pub class: usize,
    pub score: f32,
    pub bbox: [f32; 4],
}

/// The output layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `[boxes, 5 + classes]`.
    V5,
    /// `[4 + classes, boxes]`.
    V8,
}

/// The layout of one frame's `[a, b]` output: from the class count when the labels are known
/// (`a = 4 + classes`: v8; `b = 5 + classes`: v5), else by shape — v8 heads put the (many)
/// boxes last, v5 heads first; a square output cannot be told and is refused.
pub fn layout(a: usize, b: usize, classes: usize) -> Result<Layout, String> {
    if classes > 0 {
        if a == 4 + classes {
            return Ok(Layout::V8);
        }
        if b == 5 + classes {
            return Ok(Layout::V5);
        }
        return Err(format!("output [{a}, {b}] fits neither [4 + {classes} classes, boxes] (v8) nor [boxes, 5 + {classes} classes] (v5)"));
    }
    match b.cmp(&a) {
        std::cmp::Ordering::Greater => Ok(Layout::V8),
        std::cmp::Ordering::Less => Ok(Layout::V5),
        std::cmp::Ordering::Equal => Err(format!("output [{a}, {b}] is square: set the model's labels so its class count tells v5 from v8")),
    }
}

/// Decodes one frame's output `out` (`[a, b]`, row-major, in `layout`) into candidates scoring
/// at least `min_score`, each with its best class.
pub fn decode(out: &[f32], a: usize, b: usize, layout: Layout, min_score: f32) -> Result<Vec<Candidate>, String> {
    if out.len() != a * b {
        return Err(format!("output has {} values, not {a}x{b}", out.len()));
    }
    let mut found = Vec::new();
    match layout {
        Layout::V5 => {
            if b < 6 {
                return Err(format!("a v5-style output needs at least 6 values per box, has {b}"));
            }
            for row in out.chunks_exact(b) {
                let obj = row[4];
                let (class, cls) = best(&row[5..]);
                let score = obj * cls;
                if score > 0.0 && score >= min_score {
                    found.push(Candidate { class, score, bbox: corners(row[0], row[1], row[2], row[3]) });
                }
            }
        }
        Layout::V8 => {
            if a < 5 {
                return Err(format!("a v8-style output needs at least 5 rows, has {a}"));
            }
            let row = |k: usize| &out[k * b..(k + 1) * b];
            let mut scores = vec![0f32; a - 4];
            for i in 0..b {
                for (c, s) in scores.iter_mut().enumerate() {
                    *s = row(4 + c)[i];
                }
                let (class, score) = best(&scores);
                if score > 0.0 && score >= min_score {
                    found.push(Candidate { class, score, bbox: corners(row(0)[i], row(1)[i], row(2)[i], row(3)[i]) });
                }
            }
        }
    }
    Ok(found)
}

/// The first highest value and its index.
fn best(v: &[f32]) -> (usize, f32) {
    let mut bi = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[bi] {
            bi = i;
        }
    }
    (bi, v[bi])
}

fn corners(cx: f32, cy: f32, w: f32, h: f32) -> [f32; 4] {
    [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0]
}

/// Intersection over union of two (x0, y0, x1, y1) boxes; 0 when either is empty.
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union <= 0.0 { 0.0 } else { inter / union }
}

/// Class-aware NMS: highest score first (ties: earlier candidate first); a box is dropped
/// when it overlaps a kept box of the same class by more than `max_iou`. At most `keep` boxes.
pub fn nms(mut c: Vec<Candidate>, max_iou: f32, keep: usize) -> Vec<Candidate> {
    // Stable sort: equal scores keep their decode order.
    c.sort_by(|x, y| y.score.total_cmp(&x.score));
    let mut kept: Vec<Candidate> = Vec::new();
    for cand in c {
        if kept.len() == keep {
            break;
        }
        if kept.iter().all(|k| k.class != cand.class || iou(&k.bbox, &cand.bbox) <= max_iou) {
            kept.push(cand);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v5_and_v8_layouts_decode_the_same_boxes() {
        // Two boxes, two classes (and six empty rows: v5 heads have more boxes than values).
        let mut v5 = vec![10.0, 10.0, 4.0, 4.0, 0.9, 0.1, 0.8, 50.0, 50.0, 10.0, 20.0, 0.5, 0.6, 0.2];
        v5.resize(8 * 7, 0.0);
        let d5 = decode(&v5, 8, 7, layout(8, 7, 0).unwrap(), 0.1).unwrap();
        assert_eq!(layout(8, 7, 2).unwrap(), Layout::V5, "5 + 2 classes");
        assert_eq!(d5.len(), 2);
        assert_eq!(d5[0].class, 1);
        assert!((d5[0].score - 0.72).abs() < 1e-6);
        assert_eq!(d5[0].bbox, [8.0, 8.0, 12.0, 12.0]);
        assert_eq!(d5[1].class, 0);
        // v8: [4 + 2 classes, 8 boxes]; only boxes 0 and 5 score.
        let mut v8 = vec![0f32; 6 * 8];
        for (k, v) in [10.0, 10.0, 4.0, 4.0, 0.1, 0.72].iter().enumerate() {
            v8[k * 8] = *v;
        }
        for (k, v) in [50.0, 50.0, 10.0, 20.0, 0.3, 0.0].iter().enumerate() {
            v8[k * 8 + 5] = *v;
        }
        let d8 = decode(&v8, 6, 8, layout(6, 8, 0).unwrap(), 0.25).unwrap();
        assert_eq!(layout(6, 8, 2).unwrap(), Layout::V8, "4 + 2 classes");
        assert!(layout(7, 7, 0).is_err() && layout(6, 8, 5).is_err());
        assert_eq!(d8.iter().map(|c| (c.class, c.bbox)).collect::<Vec<_>>(), vec![(1, [8.0, 8.0, 12.0, 12.0]), (0, [45.0, 40.0, 55.0, 60.0])]);
        assert!(decode(&v8, 6, 9, Layout::V8, 0.1).is_err());
    }

    #[test]
    fn nms_suppresses_within_a_class_only() {
        let b = |class, score, x: f32| Candidate { class, score, bbox: [x, 0.0, x + 10.0, 10.0] };
        let kept = nms(vec![b(0, 0.5, 1.0), b(0, 0.9, 0.0), b(1, 0.8, 0.0), b(0, 0.7, 30.0)], 0.45, 10);
        assert_eq!(kept.iter().map(|c| (c.class, c.score)).collect::<Vec<_>>(), vec![(0, 0.9), (1, 0.8), (0, 0.7)]);
        assert_eq!(nms(vec![b(0, 0.5, 0.0), b(1, 0.9, 0.0)], 0.45, 1).len(), 1);
        assert!((iou(&[0.0, 0.0, 10.0, 10.0], &[5.0, 0.0, 15.0, 10.0]) - 1.0 / 3.0).abs() < 1e-6);
    }
}
