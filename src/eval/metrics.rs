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

/// How a causal LM candidate's next-token distributions compare with the reference's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LmMetrics {
    /// Mean per-token KL(reference || candidate), in nats.
    pub kl_mean: f64,
    /// Largest per-token KL.
    pub kl_max: f64,
    /// Fraction of positions where both pick the same top-1 token.
    pub top1_agreement: f64,
    /// The candidate's perplexity on the inputs (next-token prediction).
    pub perplexity: f64,
    /// NaN or inf in any logit.
    pub non_finite: bool,
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let m = x
        .iter()
        .map(|&v| v as f64)
        .fold(f64::NEG_INFINITY, f64::max);
    let lse = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
    x.iter().map(|&v| v as f64 - lse).collect()
}

fn argmax(x: &[f32]) -> usize {
    x.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// Accumulates [`LmMetrics`] one position at a time, so that no input set's logits need to be
/// held at once.
#[derive(Debug, Clone, Default)]
pub struct LmAccumulator {
    kl_sum: f64,
    kl_max: f64,
    n: usize,
    agree: usize,
    nll: f64,
    predicted: usize,
    non_finite: bool,
}

impl LmAccumulator {
    /// Adds one position: the reference's and the candidate's logits there, and the token that
    /// follows in the input (None at the last position).
    pub fn add(&mut self, reference: &[f32], candidate: &[f32], next: Option<u32>) {
        self.non_finite |= candidate.iter().any(|v| !v.is_finite());
        let (lp, lq) = (log_softmax(reference), log_softmax(candidate));
        let kl: f64 = lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum();
        self.kl_sum += kl;
        self.kl_max = self.kl_max.max(kl);
        self.n += 1;
        self.agree += (argmax(reference) == argmax(candidate)) as usize;
        if let Some(next) = next {
            self.nll -= lq.get(next as usize).copied().unwrap_or(f64::NEG_INFINITY);
            self.predicted += 1;
        }
    }

    /// The metrics over every position added.
    pub fn finish(&self) -> LmMetrics {
        LmMetrics {
            kl_mean: self.kl_sum / self.n.max(1) as f64,
            kl_max: self.kl_max,
            top1_agreement: self.agree as f64 / self.n.max(1) as f64,
            perplexity: (self.nll / self.predicted.max(1) as f64).exp(),
            non_finite: self.non_finite,
        }
    }
}

/// Compares logits (per input, per position) of a candidate with the reference; `ids` are the
/// input tokens (position t's logits predict token t + 1).
pub fn compare_lm(
    ids: &[Vec<u32>],
    reference: &[Vec<Vec<f32>>],
    candidate: &[Vec<Vec<f32>>],
) -> LmMetrics {
    let mut acc = LmAccumulator::default();
    for ((seq, r), c) in ids.iter().zip(reference).zip(candidate) {
        for (t, (rl, cl)) in r.iter().zip(c).enumerate() {
            acc.add(rl, cl, seq.get(t + 1).copied());
        }
    }
    acc.finish()
}

/// A lower bound on one of a candidate's measures, which it must reach to be recommended
/// (`eval`'s `--min-cosine`, `--min-neighbours`, `--min-top1`). A NaN measure fails it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bound {
    /// Its name in `--json`: the flag's, with underscores (`min_cosine`), or `finite`.
    pub name: &'static str,
    /// The measure it bounds, as `--json` names it (`cosine_min`).
    pub measure: &'static str,
    /// The measure as the table heads it (`cos min`).
    pub label: &'static str,
    /// The least value that passes.
    pub min: f64,
    /// The measure is a fraction, shown as a percentage.
    pub percent: bool,
}

/// No NaN or inf in any output: a bound every candidate must meet (its measure is 1 for
/// finite outputs, 0 otherwise).
pub const FINITE: Bound = Bound {
    name: "finite",
    measure: "non_finite",
    label: "NaN/inf",
    min: 1.0,
    percent: false,
};

impl Bound {
    /// The bound on a measure.
    pub fn new(name: &'static str, measure: &'static str, label: &'static str, min: f64) -> Bound {
        Bound {
            name,
            measure,
            label,
            min,
            percent: false,
        }
    }

    /// The same bound, its measure a fraction shown as a percentage.
    pub fn percent(self) -> Bound {
        Bound {
            percent: true,
            ..self
        }
    }

    /// The failure when `value` is below the bound (or NaN).
    pub fn check(&self, value: f64) -> Option<Failure> {
        if value >= self.min {
            None
        } else {
            // Below, or NaN (which compares false with everything).
            Some(Failure {
                bound: *self,
                value,
            })
        }
    }
}

/// A bound a candidate missed, with the value it had.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Failure {
    /// The bound missed.
    pub bound: Bound,
    /// The candidate's measure.
    pub value: f64,
}

impl std::fmt::Display for Failure {
    /// `NN kept 93.8% < 99%`, `cos min 0.998120 < 0.999`, `NaN/inf in its outputs`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = &self.bound;
        if b.name == FINITE.name {
            write!(f, "NaN/inf in its outputs")
        } else if b.percent {
            write!(
                f,
                "{} {:.1}% < {}%",
                b.label,
                100.0 * self.value,
                percent(b.min)
            )
        } else {
            write!(f, "{} {:.6} < {}", b.label, self.value, b.min)
        }
    }
}

/// A fraction as a percentage, without trailing zeros: 0.99 gives `99`, 0.995 `99.5`.
pub fn percent(x: f64) -> String {
    let s = format!("{:.3}", 100.0 * x);
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The bounds a candidate misses: `values` are its measures, one per bound, in order; a
/// candidate whose outputs hold NaN or inf fails [`FINITE`] (and is not judged further: its
/// other measures mean nothing).
pub fn failures(bounds: &[Bound], values: &[f64], non_finite: bool) -> Vec<Failure> {
    if non_finite {
        return vec![Failure {
            bound: FINITE,
            value: 0.0,
        }];
    }
    bounds
        .iter()
        .zip(values)
        .filter_map(|(b, &v)| b.check(v))
        .collect()
}

/// The candidate to recommend, by index: the fewest weight bytes among those that miss no
/// bound (the first of equals); None when every candidate misses one. `candidates` are
/// (weight bytes, bounds missed).
pub fn recommend(candidates: &[(u64, &[Failure])]) -> Option<usize> {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, (_, failed))| failed.is_empty())
        .min_by_key(|(_, (bytes, _))| *bytes)
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    #[test]
    fn lm_identical_and_perplexity() {
        let ids = vec![vec![0u32, 1, 0]];
        let logits = vec![vec![vec![0.0f32, 0.0], vec![0.0, 0.0], vec![1.0, 0.0]]];
        let m = super::compare_lm(&ids, &logits, &logits);
        assert_eq!((m.kl_mean, m.top1_agreement), (0.0, 1.0));
        assert!(
            (m.perplexity - 2.0).abs() < 1e-12,
            "uniform over 2 tokens: {}",
            m.perplexity
        );
        let other = vec![vec![vec![5.0f32, 0.0], vec![0.0, 5.0], vec![0.0, 1.0]]];
        assert!(super::compare_lm(&ids, &logits, &other).kl_mean > 0.1);
    }

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

    #[test]
    fn recommendation_honours_every_bound() {
        let cos = Bound::new("min_cosine", "cosine_min", "cos min", 0.999);
        let nn = Bound::new("min_neighbours", "neighbours_kept", "NN kept", 0.99).percent();
        let bounds = [cos, nn];
        // f16/bf16: within both; fp8: cosine fine, 6% of neighbours changed.
        let f16 = failures(&bounds, &[0.9999, 1.0], false);
        let fp8 = failures(&bounds, &[0.9995, 0.9375], false);
        let nan = failures(&bounds, &[f64::NAN, 1.0], true);
        assert!(f16.is_empty());
        assert_eq!(fp8.len(), 1);
        assert_eq!(fp8[0].bound.name, "min_neighbours");
        assert_eq!(fp8[0].to_string(), "NN kept 93.8% < 99%");
        assert_eq!(
            (percent(0.29), percent(0.995), percent(1.0)),
            ("29".into(), "99.5".into(), "100".into())
        );
        assert_eq!(nan[0].bound, FINITE);
        assert_eq!(
            failures(&bounds, &[f64::NAN, 1.0], false)[0].bound.name,
            "min_cosine"
        );
        let rows: Vec<(u64, &[Failure])> = vec![(200, &f16), (100, &fp8), (200, &f16), (50, &nan)];
        assert_eq!(
            recommend(&rows),
            Some(0),
            "the cheapest that passes, not the cheapest"
        );
        assert_eq!(recommend(&[(100, &fp8[..]), (50, &nan[..])]), None);
    }
}
