//! Output-space metrics of a candidate against the f32 reference: pure functions over rows of
//! embeddings.

/// How a candidate's embeddings compare with the reference's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EmbeddingMetrics {
    /// Smallest cosine similarity between a candidate row and its reference row.
    pub cosine_min: f64,
    /// Mean of those cosine similarities.
    pub cosine_mean: f64,
    /// Largest |candidate - reference| over all values.
    pub max_abs_diff: f64,
    /// Fraction of inputs whose nearest neighbour (by cosine, among the other inputs) is the
    /// same for the candidate as for the reference.
    pub neighbours_kept: f64,
    /// NaN or inf in any output value.
    pub non_finite: bool,
}

/// Cosine similarity of two vectors in f64 (1 when both are zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        d += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 && nb == 0.0 {
        1.0
    } else if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        d / (na.sqrt() * nb.sqrt())
    }
}

/// For each row, the index of its most similar other row (None with fewer than two rows).
pub fn nearest(rows: &[Vec<f32>]) -> Vec<Option<usize>> {
    (0..rows.len())
        .map(|i| {
            (0..rows.len())
                .filter(|&j| j != i)
                .map(|j| (j, cosine(&rows[i], &rows[j])))
                .filter(|(_, c)| c.is_finite())
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(j, _)| j)
        })
        .collect()
}

/// Compares candidate rows with reference rows (same count and width).
pub fn compare(reference: &[Vec<f32>], candidate: &[Vec<f32>]) -> EmbeddingMetrics {
    let cos: Vec<f64> = reference
        .iter()
        .zip(candidate)
        .map(|(r, c)| cosine(r, c))
        .collect();
    let non_finite = candidate.iter().flatten().any(|v| !v.is_finite());
    let max_abs_diff = reference
        .iter()
        .flatten()
        .zip(candidate.iter().flatten())
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .fold(0.0, |m, d| if d.is_nan() { f64::NAN } else { m.max(d) });
    let (nr, nc) = (nearest(reference), nearest(candidate));
    let kept = nr.iter().zip(&nc).filter(|(a, b)| a == b).count();
    EmbeddingMetrics {
        cosine_min: cos.iter().copied().fold(f64::INFINITY, |m, c| {
            if c.is_nan() {
                f64::NAN
            } else {
                m.min(c)
            }
        }),
        cosine_mean: cos.iter().sum::<f64>() / cos.len().max(1) as f64,
        max_abs_diff,
        neighbours_kept: kept as f64 / nr.len().max(1) as f64,
        non_finite,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_and_broken() {
        let r = vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![0.9, 0.1]];
        let m = compare(&r, &r);
        assert_eq!(
            (m.cosine_min, m.max_abs_diff, m.neighbours_kept),
            (1.0, 0.0, 1.0)
        );
        let broken = vec![vec![0.0, 1.0], vec![1.0, 0.0], vec![f32::NAN, 0.0]];
        let m = compare(&r, &broken);
        assert!(m.non_finite && m.cosine_min.is_nan() || m.cosine_min < 0.5);
        assert_eq!(nearest(&r), vec![Some(2), Some(2), Some(0)]);
    }
}
