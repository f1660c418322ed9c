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
    /// Finite values that became inf or NaN: any one makes every error figure infinite (SNR
    /// `-inf`, cosine NaN), since the tensor no longer computes.
    pub nonfinite: u64,
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
            nonfinite: 0,
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
            self.nonfinite += 1;
            self.max_abs_err = f64::INFINITY;
            if x != 0.0 {
                self.max_rel_err = f64::INFINITY;
            }
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

    /// Adds a block of pairs decoded to f32 (every castable dtype but f64 is exact in f32):
    /// `xs` the originals, `ys` what they became; a finite |x| at or above `threshold` left the
    /// target's range. The same figures as [`ErrorStats::push`] on each pair; a block where
    /// every value is finite (the usual case) is accumulated branch-free in four lanes, which
    /// the compiler vectorises (only the order of the f64 sums differs).
    pub fn push_block(&mut self, xs: &[f32], ys: &[f32], threshold: f32, min_normal: f64) {
        let n = xs.len().min(ys.len()) / 8 * 8;
        // Without an early exit, so that the check vectorises too.
        let special = |acc: u32, v: &f32| acc | ((v.to_bits() & 0x7F80_0000) == 0x7F80_0000) as u32;
        if xs[..n].iter().fold(0, special) | ys[..n].iter().fold(0, special) != 0 {
            self.push_pairs(xs, ys, threshold, min_normal);
            return;
        }
        let block = finite_block(&xs[..n], &ys[..n], threshold, min_normal as f32);
        *self = self.merge(&block);
        self.push_pairs(&xs[n..], &ys[n..], threshold, min_normal);
    }

    /// [`ErrorStats::push`] on each pair of f32 values.
    fn push_pairs(&mut self, xs: &[f32], ys: &[f32], threshold: f32, min_normal: f64) {
        for (&x, &y) in xs.iter().zip(ys) {
            let ovf = x.is_finite() && x.abs() >= threshold;
            self.push(x as f64, y as f64, ovf, min_normal);
        }
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
        self.nonfinite += o.nonfinite;
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

    /// Root-mean-square error over the compared pairs (infinite once a finite value became
    /// inf or NaN).
    pub fn rms_err(&self) -> f64 {
        if self.nonfinite > 0 {
            f64::INFINITY
        } else if self.compared == 0 {
            0.0
        } else {
            (self.sum_sq_err / self.compared as f64).sqrt()
        }
    }

    /// Mean relative error over pairs with x != 0 (infinite once a finite value became inf or
    /// NaN).
    pub fn mean_rel_err(&self) -> f64 {
        if self.nonfinite > 0 {
            f64::INFINITY
        } else if self.rel_count == 0 {
            0.0
        } else {
            self.sum_rel_err / self.rel_count as f64
        }
    }

    /// Signal-to-noise ratio in dB: 10·log10(Σx² / Σ(y-x)²); infinite when nothing changed,
    /// `-inf` once a finite value became inf or NaN (the noise is infinite).
    pub fn snr_db(&self) -> f64 {
        if self.nonfinite > 0 {
            f64::NEG_INFINITY
        } else if self.sum_sq_err == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (self.sum_sq_x / self.sum_sq_err).log10()
        }
    }

    /// Cosine similarity of the original and the cast values (1 when both are all zeros; NaN,
    /// which no threshold accepts, once a finite value became inf or NaN).
    pub fn cosine(&self) -> f64 {
        if self.nonfinite > 0 {
            f64::NAN
        } else if self.sum_sq_x == 0.0 && self.sum_sq_y == 0.0 {
            1.0
        } else if self.sum_sq_x == 0.0 || self.sum_sq_y == 0.0 {
            0.0
        } else {
            self.dot / (self.sum_sq_x.sqrt() * self.sum_sq_y.sqrt())
        }
    }

    /// Whether the cast flushed every finite non-zero value to zero (the tensor became all
    /// zeros where it was not).
    pub fn flushed_entirely(&self) -> bool {
        self.nonzero > 0 && self.underflow == self.nonzero
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

/// The figures of a block where every value is finite, `xs.len()` a multiple of eight:
/// branch-free, in lanes the compiler vectorises, compiled for the CPU's widest vectors
/// (AVX2/AVX-512 where present, chosen at run time). `mn` is the target's smallest normal
/// (exact in f32: 2^-14, 2^-6 or f32's own).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn finite_block(xs: &[f32], ys: &[f32], threshold: f32, mn: f32) -> ErrorStats {
    // Eight f32/u32 lanes for the range and counts, four f64 lanes for the sums (a 256-bit
    // register each), in two passes over the block so that the accumulators stay in registers.
    const L4: usize = 8;
    const L2: usize = 4;
    let n = xs.len().min(ys.len());
    let (mut lo, mut hi) = ([f32::INFINITY; L4], [f32::NEG_INFINITY; L4]);
    let (mut nonzero, mut under, mut over, mut sub) =
        ([0u32; L4], [0u32; L4], [0u32; L4], [0u32; L4]);
    for (cx, cy) in xs.chunks_exact(L4).zip(ys.chunks_exact(L4)) {
        for l in 0..L4 {
            let (x, y) = (cx[l], cy[l]);
            lo[l] = if x < lo[l] { x } else { lo[l] };
            hi[l] = if x > hi[l] { x } else { hi[l] };
            let nz = x != 0.0;
            nonzero[l] += nz as u32;
            under[l] += (nz & (y == 0.0)) as u32;
            over[l] += (x.abs() >= threshold) as u32;
            sub[l] += ((y != 0.0) & (y.abs() < mn)) as u32;
        }
    }
    let (mut max_err, mut max_rel, mut sum_rel) = ([0f64; L2], [0f64; L2], [0f64; L2]);
    let (mut sse, mut sxx, mut syy, mut dot) = ([0f64; L2], [0f64; L2], [0f64; L2], [0f64; L2]);
    for (cx, cy) in xs.chunks_exact(L2).zip(ys.chunks_exact(L2)) {
        for l in 0..L2 {
            let (xd, yd) = (cx[l] as f64, cy[l] as f64);
            let err = yd - xd;
            let abs = err.abs();
            max_err[l] = if abs > max_err[l] { abs } else { max_err[l] };
            let rel = if xd != 0.0 { abs / xd.abs() } else { 0.0 };
            max_rel[l] = if rel > max_rel[l] { rel } else { max_rel[l] };
            sum_rel[l] += rel;
            sse[l] += err * err;
            sxx[l] += xd * xd;
            syy[l] += yd * yd;
            dot[l] += xd * yd;
        }
    }
    let sum = |c: [u32; L4]| c.iter().map(|&v| v as u64).sum::<u64>();
    let nz = sum(nonzero);
    let mut block = ErrorStats {
        count: n as u64,
        compared: n as u64,
        nonzero: nz,
        rel_count: nz,
        underflow: sum(under),
        overflow: sum(over),
        subnormal: sum(sub),
        sum_rel_err: sum_rel.iter().sum(),
        sum_sq_err: sse.iter().sum(),
        sum_sq_x: sxx.iter().sum(),
        sum_sq_y: syy.iter().sum(),
        dot: dot.iter().sum(),
        max_abs_err: max_err.iter().copied().fold(0.0, f64::max),
        max_rel_err: max_rel.iter().copied().fold(0.0, f64::max),
        ..ErrorStats::default()
    };
    if n > 0 {
        let min = lo.iter().copied().fold(f32::INFINITY, f32::min) as f64;
        let max = hi.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        block.min = min;
        block.max = max;
        block.max_abs = min.abs().max(max.abs());
    }
    block
}

/// The smallest positive value of a float type (its smallest subnormal; e8m0 has none).
pub fn min_subnormal(d: DType) -> f64 {
    match d {
        DType::F64 => 2f64.powi(-1074),
        DType::F32 => 2f64.powi(-149),
        DType::BF16 => 2f64.powi(-133),
        DType::F16 => 2f64.powi(-24),
        DType::F8E4M3 => 2f64.powi(-9),
        DType::F8E5M2 => 2f64.powi(-16),
        DType::F8E4M3Fnuz => 2f64.powi(-10),
        DType::F8E5M2Fnuz => 2f64.powi(-17),
        DType::F8E8M0 => 2f64.powi(-127),
        _ => 0.0,
    }
}

/// The smallest positive normal value of a float type.
pub fn min_normal(d: DType) -> f64 {
    match d {
        DType::F64 => f64::MIN_POSITIVE,
        DType::F32 | DType::BF16 => f32::MIN_POSITIVE as f64,
        DType::F16 | DType::F8E5M2 => 2f64.powi(-14),
        DType::F8E4M3 => 2f64.powi(-6),
        DType::F8E4M3Fnuz => 2f64.powi(-7),
        DType::F8E5M2Fnuz => 2f64.powi(-15),
        DType::F8E8M0 => 2f64.powi(-127),
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
                s.push_block(&xs[..n], &ys[..n], t, mn);
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
    if s.overflow > 0 || s.nonfinite > 0 {
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

    #[test]
    fn block_figures_equal_pair_by_pair() {
        // A small xorshift for reproducible values of every magnitude, zeros included.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        // (target, a value that overflows it, length, an inf in the input): e4m3 saturates to a
        // finite 448 (the fast path counts it), f16 overflows to inf (pair by pair).
        for (to, big, len, with_inf) in [
            (DType::F8E4M3, 500.0f32, 4096, false),
            (DType::F16, 1e3, 4099, false),
            (DType::F16, 7e4, 1001, false),
            (DType::BF16, 1.0, 37, true),
            (DType::F16, 1.0, 3, false),
            (DType::F16, 1.0, 0, false),
        ] {
            let xs: Vec<f32> = (0..len)
                .map(|i| match next() % 8 {
                    0 => 0.0,
                    1 => 1e-9,
                    2 => -1e-6,
                    3 => big,
                    _ if with_inf && i == 5 => f32::INFINITY,
                    _ => f32::from_bits((next() as u32 & 0x3FFF_FFFF) | 0x2000_0000) - 1.0,
                })
                .collect();
            let raw: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
            let mut out = vec![0u8; len * to.bitsize() / 8];
            cast::cast(DType::F32, to, &raw, &mut out).unwrap();
            let mut ys = vec![0f32; len];
            cast::decode_f32_slice(to, &out, &mut ys);
            let (t, mn) = (cast::overflow_threshold(to), min_normal(to));
            let mut a = ErrorStats::default();
            a.push_block(&xs, &ys, t, mn);
            let mut b = ErrorStats::default();
            for (&x, &y) in xs.iter().zip(&ys) {
                b.push(x as f64, y as f64, x.is_finite() && x.abs() >= t, mn);
            }
            let counts = |s: &ErrorStats| {
                (
                    s.count,
                    s.nan_in,
                    s.inf_in,
                    s.nonzero,
                    s.overflow,
                    s.underflow,
                )
            };
            assert_eq!(counts(&a), counts(&b), "{to} {len}");
            assert_eq!(
                (a.subnormal, a.compared, a.rel_count),
                (b.subnormal, b.compared, b.rel_count)
            );
            assert_eq!((a.min, a.max, a.max_abs), (b.min, b.max, b.max_abs));
            assert_eq!(
                (a.max_abs_err, a.max_rel_err),
                (b.max_abs_err, b.max_rel_err)
            );
            for (p, q) in [
                (a.sum_rel_err, b.sum_rel_err),
                (a.sum_sq_err, b.sum_sq_err),
                (a.sum_sq_x, b.sum_sq_x),
                (a.sum_sq_y, b.sum_sq_y),
                (a.dot, b.dot),
            ] {
                assert!((p - q).abs() <= 1e-12 * q.abs(), "{to} {len}: {p} vs {q}");
            }
            if len > 1000 {
                assert!(
                    a.underflow > 0 && (to != DType::F16 || a.subnormal > 0),
                    "{a:?}"
                );
                assert_eq!(a.overflow > 0, big >= t, "{a:?}");
            }
        }
    }

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
