//! Precision statistics as pure functions: what a cast (or the difference between two
//! checkpoints) does to a tensor's values, accumulated in f64 and mergeable across threads.

use rayon::prelude::*;

use crate::cast;
use crate::dtype::DType;

/// Elements per parallel task.
const PAR_CHUNK: usize = 1 << 16;

/// Figures for one tensor (or a whole model, merged).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ErrorStats {
    /// Elements seen.
    pub count: u64,
    /// NaN values already in the input.
    pub nan_in: u64,
    /// inf values already in the input.
    pub inf_in: u64,
    /// Smallest finite input value.
    pub min: f64,
    /// Largest finite input value.
    pub max: f64,
    /// Largest finite |input|.
    pub max_abs: f64,
    /// Finite non-zero input values.
    pub nonzero: u64,
    /// Finite values that became inf (or saturated, for f8e4m3fn).
    pub overflow: u64,
    /// Finite non-zero values that became zero.
    pub underflow: u64,
    /// Non-zero results in the target's subnormal range.
    pub subnormal: u64,
    /// Pairs where both values are finite (the error figures cover these).
    pub compared: u64,
    /// Largest |y - x|.
    pub max_abs_err: f64,
    /// Largest |y - x| / |x| over x != 0.
    pub max_rel_err: f64,
    /// Sum of |y - x| / |x| over x != 0.
    pub sum_rel_err: f64,
    /// Pairs with x != 0 (the relative error covers these).
    pub rel_count: u64,
    /// Sum of (y - x)².
    pub sum_sq_err: f64,
    /// Sum of x².
    pub sum_sq_x: f64,
    /// Sum of y².
    pub sum_sq_y: f64,
    /// Sum of x·y.
    pub dot: f64,
}

impl Default for ErrorStats {
    fn default() -> Self {
        ErrorStats {
            count: 0,
            nan_in: 0,
            inf_in: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            max_abs: 0.0,
            nonzero: 0,
            overflow: 0,
            underflow: 0,
            subnormal: 0,
            compared: 0,
            max_abs_err: 0.0,
            max_rel_err: 0.0,
            sum_rel_err: 0.0,
            rel_count: 0,
            sum_sq_err: 0.0,
            sum_sq_x: 0.0,
            sum_sq_y: 0.0,
            dot: 0.0,
        }
    }
}

impl ErrorStats {
    /// Adds one pair: `x` the original value, `y` what it became. `overflowed` marks a finite
    /// value that left the target's range; `min_normal` is the target's smallest normal (0 to
    /// skip the subnormal count).
    #[inline]
    pub fn push(&mut self, x: f64, y: f64, overflowed: bool, min_normal: f64) {
        self.count += 1;
        if x.is_nan() {
            self.nan_in += 1;
            return;
        }
        if x.is_infinite() {
            self.inf_in += 1;
            return;
        }
        self.min = self.min.min(x);
        self.max = self.max.max(x);
        self.max_abs = self.max_abs.max(x.abs());
        if x != 0.0 {
            self.nonzero += 1;
            if y == 0.0 {
                self.underflow += 1;
            }
        }
        if overflowed {
            self.overflow += 1;
        }
        if y != 0.0 && y.abs() < min_normal {
            self.subnormal += 1;
        }
        if !y.is_finite() {
            return;
        }
        self.compared += 1;
        let err = y - x;
        let abs = err.abs();
        self.max_abs_err = self.max_abs_err.max(abs);
        if x != 0.0 {
            let rel = abs / x.abs();
            self.max_rel_err = self.max_rel_err.max(rel);
            self.sum_rel_err += rel;
            self.rel_count += 1;
        }
        self.sum_sq_err += err * err;
        self.sum_sq_x += x * x;
        self.sum_sq_y += y * y;
        self.dot += x * y;
    }

    /// Combines two partial results.
    pub fn merge(mut self, o: &ErrorStats) -> ErrorStats {
        self.count += o.count;
        self.nan_in += o.nan_in;
        self.inf_in += o.inf_in;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        self.max_abs = self.max_abs.max(o.max_abs);
        self.nonzero += o.nonzero;
        self.overflow += o.overflow;
        self.underflow += o.underflow;
        self.subnormal += o.subnormal;
        self.compared += o.compared;
        self.max_abs_err = self.max_abs_err.max(o.max_abs_err);
        self.max_rel_err = self.max_rel_err.max(o.max_rel_err);
        self.sum_rel_err += o.sum_rel_err;
        self.rel_count += o.rel_count;
        self.sum_sq_err += o.sum_sq_err;
        self.sum_sq_x += o.sum_sq_x;
        self.sum_sq_y += o.sum_sq_y;
        self.dot += o.dot;
        self
    }

    /// Root-mean-square error over the compared pairs.
    pub fn rms_err(&self) -> f64 {
        if self.compared == 0 {
            0.0
        } else {
            (self.sum_sq_err / self.compared as f64).sqrt()
        }
    }

    /// Mean relative error over pairs with x != 0.
    pub fn mean_rel_err(&self) -> f64 {
        if self.rel_count == 0 {
            0.0
        } else {
            self.sum_rel_err / self.rel_count as f64
        }
    }

    /// Signal-to-noise ratio in dB: 10·log10(Σx² / Σ(y-x)²); infinite when nothing changed.
    pub fn snr_db(&self) -> f64 {
        if self.sum_sq_err == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (self.sum_sq_x / self.sum_sq_err).log10()
        }
    }

    /// Cosine similarity of the original and the cast values (1 when both are all zeros).
    pub fn cosine(&self) -> f64 {
        if self.sum_sq_x == 0.0 && self.sum_sq_y == 0.0 {
            1.0
        } else if self.sum_sq_x == 0.0 || self.sum_sq_y == 0.0 {
            0.0
        } else {
            self.dot / (self.sum_sq_x.sqrt() * self.sum_sq_y.sqrt())
        }
    }

    /// Fraction of finite non-zero values flushed to zero.
    pub fn underflow_fraction(&self) -> f64 {
        if self.nonzero == 0 {
            0.0
        } else {
            self.underflow as f64 / self.nonzero as f64
        }
    }
}

/// The smallest positive normal value of a float type.
pub fn min_normal(d: DType) -> f64 {
    match d {
        DType::F64 => f64::MIN_POSITIVE,
        DType::F32 | DType::BF16 => f32::MIN_POSITIVE as f64,
        DType::F16 | DType::F8E5M2 => 2f64.powi(-14),
        DType::F8E4M3 => 2f64.powi(-6),
        _ => 0.0,
    }
}

/// What casting the little-endian `bytes` of `from` to `to` does, computed in f64 against the
/// exact values the cast kernels produce.
pub fn cast_stats(from: DType, to: DType, bytes: &[u8]) -> ErrorStats {
    if from == DType::F64 || to == DType::F64 {
        return cast_stats_generic(from, to, bytes);
    }
    // Fast path: every other castable type is exact in f32, so both sides are decoded in blocks
    // to f32 and only the figures are accumulated in f64.
    const BLOCK: usize = 2048;
    let isz = from.bitsize() / 8;
    let osz = to.bitsize() / 8;
    let mn = min_normal(to);
    let t = cast::overflow_threshold(to);
    bytes
        .par_chunks(PAR_CHUNK * isz)
        .map(|chunk| {
            let mut s = ErrorStats::default();
            let mut out = [0u8; BLOCK * 4];
            let mut xs = [0f32; BLOCK];
            let mut ys = [0f32; BLOCK];
            for block in chunk.chunks(BLOCK * isz) {
                let n = block.len() / isz;
                let out = &mut out[..n * osz];
                cast::decode_f32_slice(from, block, &mut xs[..n]);
                cast::cast(from, to, block, out).expect("matching buffers");
                cast::decode_f32_slice(to, out, &mut ys[..n]);
                for (&x, &y) in xs[..n].iter().zip(&ys[..n]) {
                    let ovf = x.is_finite() && x.abs() >= t;
                    s.push(x as f64, y as f64, ovf, mn);
                }
            }
            s
        })
        .reduce(ErrorStats::default, |a, b| a.merge(&b))
}

fn cast_stats_generic(from: DType, to: DType, bytes: &[u8]) -> ErrorStats {
    let isz = from.bitsize() / 8;
    let osz = to.bitsize() / 8;
    let mn = min_normal(to);
    bytes
        .par_chunks(PAR_CHUNK * isz)
        .map(|chunk| {
            let mut out = vec![0u8; chunk.len() / isz * osz];
            let mut flags = vec![false; chunk.len() / isz];
            cast::cast_flagged(from, to, chunk, &mut out, &mut flags);
            let mut s = ErrorStats::default();
            for ((i, o), ovf) in chunk
                .chunks_exact(isz)
                .zip(out.chunks_exact(osz))
                .zip(&flags)
            {
                s.push(cast::decode_f64(from, i), cast::decode_f64(to, o), *ovf, mn);
            }
            s
        })
        .reduce(ErrorStats::default, |a, b| a.merge(&b))
}

/// Compares two tensors' stored values element by element (`a` is the reference), in f64.
pub fn diff_stats(a_dtype: DType, a: &[u8], b_dtype: DType, b: &[u8]) -> ErrorStats {
    let asz = a_dtype.bitsize() / 8;
    let bsz = b_dtype.bitsize() / 8;
    a.par_chunks(PAR_CHUNK * asz)
        .zip(b.par_chunks(PAR_CHUNK * bsz))
        .map(|(ca, cb)| {
            let mut s = ErrorStats::default();
            for (x, y) in ca.chunks_exact(asz).zip(cb.chunks_exact(bsz)) {
                let (x, y) = (cast::decode_f64(a_dtype, x), cast::decode_f64(b_dtype, y));
                s.push(x, y, x.is_finite() && !y.is_finite(), 0.0);
            }
            s
        })
        .reduce(ErrorStats::default, |a, b| a.merge(&b))
}

/// How a tensor fares, worst first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// Finite values would become inf (or saturate).
    Overflow,
    /// Too many non-zero values would become zero.
    Underflow,
    /// The error is above the lossy bound (SNR below it).
    Lossy,
    /// Small error.
    Ok,
    /// No value changes (a widening cast, or identical tensors).
    Exact,
}

impl Verdict {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Overflow => "overflow",
            Verdict::Underflow => "underflow",
            Verdict::Lossy => "lossy",
            Verdict::Ok => "ok",
            Verdict::Exact => "exact",
        }
    }
}

/// Thresholds for verdicts.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// SNR (dB) under which a cast is called lossy.
    pub lossy_below_db: f64,
    /// Fraction of non-zero values flushed to zero above which a cast is called underflow.
    pub underflow_above: f64,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            lossy_below_db: 40.0,
            underflow_above: 1e-3,
        }
    }
}

/// The verdict for a tensor's figures.
pub fn verdict(s: &ErrorStats, b: &Bounds) -> Verdict {
    if s.overflow > 0 {
        Verdict::Overflow
    } else if s.underflow_fraction() > b.underflow_above {
        Verdict::Underflow
    } else if s.sum_sq_err == 0.0 {
        Verdict::Exact
    } else if s.snr_db() < b.lossy_below_db {
        Verdict::Lossy
    } else {
        Verdict::Ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn overflow_underflow_subnormal_in_f16() {
        let s = cast_stats(
            DType::F32,
            DType::F16,
            &f32s(&[1e5, -1e5, 1e-9, 1e-6, 1.0, f32::NAN, f32::INFINITY, 0.0]),
        );
        assert_eq!(s.overflow, 2);
        assert_eq!(s.underflow, 1);
        assert_eq!(s.subnormal, 1, "1e-6 lands in f16's subnormal range");
        assert_eq!((s.nan_in, s.inf_in), (1, 1));
        assert_eq!(s.max_abs, 1e5);
        assert_eq!(verdict(&s, &Bounds::default()), Verdict::Overflow);
    }

    #[test]
    fn fp8_saturation_counts_as_overflow() {
        let s = cast_stats(DType::F32, DType::F8E4M3, &f32s(&[500.0, 449.0, 1.0]));
        assert_eq!(s.overflow, 1, "449 rounds to 448 normally; 500 saturates");
        let s = cast_stats(DType::BF16, DType::F16, &[0x80, 0x47, 0x80, 0x3F]); // 65536, 1.0
        assert_eq!(s.overflow, 1, "bf16 beyond the f16 range");
    }

    #[test]
    fn widening_is_exact() {
        let s = cast_stats(DType::F16, DType::F32, &[0x00, 0x3C, 0xFF, 0x7B]);
        assert_eq!(s.snr_db(), f64::INFINITY);
        assert_eq!(s.cosine(), 1.0);
        assert_eq!(verdict(&s, &Bounds::default()), Verdict::Exact);
    }

    #[test]
    fn figures_by_hand() {
        let a = f32s(&[1.0, 2.0, -4.0]);
        let b = f32s(&[1.5, 2.0, -4.0]);
        let s = diff_stats(DType::F32, &a, DType::F32, &b);
        assert_eq!(s.max_abs_err, 0.5);
        assert_eq!(s.max_rel_err, 0.5);
        assert!((s.mean_rel_err() - 0.5 / 3.0).abs() < 1e-12);
        assert!((s.rms_err() - (0.25f64 / 3.0).sqrt()).abs() < 1e-12);
        assert!((s.snr_db() - 10.0 * (21.0f64 / 0.25).log10()).abs() < 1e-9);
        assert!((s.cosine() - 21.5 / (21f64.sqrt() * 22.25f64.sqrt())).abs() < 1e-12);
    }
}
