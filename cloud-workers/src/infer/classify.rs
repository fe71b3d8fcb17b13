//! Classifier post-processing: (optionally) softmax, then the top-k classes.

/// `(class, score)` of the `k` best of `logits` scoring at least `min_score`, best first (ties:
/// lower class id first); softmax first when `softmax`.
pub fn top_k(logits: &[f32], softmax: bool, k: usize, min_score: f32) -> Vec<(usize, f32)> {
    let probs: Vec<f32> = if softmax {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f32> = logits.iter().map(|v| (v - max).exp()).collect();
        let sum: f32 = exp.iter().sum();
        exp.iter().map(|e| e / sum).collect()
    } else {
        logits.to_vec()
    };
    let mut idx: Vec<usize> = (0..probs.len()).collect();
    idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    idx.into_iter().take(k).map(|i| (i, probs[i])).filter(|(_, p)| *p >= min_score).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_then_top_k() {
        let t = top_k(&[1.0, 3.0, 2.0, 3.0], true, 3, 0.0);
        assert_eq!(t.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 3, 2]);
        let sum: f32 = [1.0f32, 3.0, 2.0, 3.0].iter().map(|v| v.exp()).sum();
        assert!((t[0].1 - 3f32.exp() / sum).abs() < 1e-6);
        assert_eq!(top_k(&[0.1, 0.7, 0.2], false, 5, 0.15), vec![(1, 0.7), (2, 0.2)]);
    }
}
