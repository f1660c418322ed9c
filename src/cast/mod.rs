//! Cast kernels: pure functions from little-endian bytes of one float type to another.
//!
//! Every conversion is bit-identical to torch's CPU `tensor.to(dtype)`:
//! - f64 goes through f32 first (torch's `c10::Half(float)`/`BFloat16(float)` constructors do the
//!   same, so f64 -> f16 is rounded twice, exactly as torch rounds it);
//! - f16 uses IEEE round-to-nearest-even (F16C on x86 through the `half` crate's slice
//!   conversions); overflow becomes inf;
//! - bf16 uses round-to-nearest-even and turns every NaN into `0xFFFF`, as torch's vectorised
//!   CPU kernel does;
//! - f8e4m3fn saturates to +-448, f8e5m2 overflows to inf (see [`fp8`]).

pub mod fp8;
pub mod packed;

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::dtype::DType;

/// Elements converted per inner block (kept on the stack).
const BLOCK: usize = 2048;
/// Elements per parallel task.
const PAR_CHUNK: usize = 1 << 16;

/// Why a cast could not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CastError {
    /// One of the types is not handled by the kernels.
    #[error("no cast from {0} to {1}")]
    Unsupported(DType, DType),
    /// Input and output buffers hold different element counts.
    #[error("buffer sizes do not match: {0} input bytes, {1} output bytes")]
    Length(usize, usize),
}

/// f32 to bf16 bits, torch's round-to-nearest-even with NaN mapped to `0xFFFF`.
#[inline]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    if x.is_nan() {
        return 0xFFFF;
    }
    let u = x.to_bits();
    let bias = 0x7FFF + ((u >> 16) & 1);
    (u.wrapping_add(bias) >> 16) as u16
}

/// Decodes one element of a castable type to f64 (exact for every type but none is lossy here:
/// f32 and narrower widen exactly).
#[inline]
pub fn decode_f64(dtype: DType, b: &[u8]) -> f64 {
    match dtype {
        DType::F64 => f64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
        _ => decode_f32(dtype, b) as f64,
    }
}

/// Decodes one element to f32 (f64 is rounded to nearest, as torch does).
#[inline]
pub fn decode_f32(dtype: DType, b: &[u8]) -> f32 {
    match dtype {
        DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        DType::F16 => f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
        DType::BF16 => f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16),
        DType::F8E4M3 => fp8::e4m3_to_f32(b[0]),
        DType::F8E5M2 => fp8::e5m2_to_f32(b[0]),
        DType::F8E4M3Fnuz => fp8::fnuz_to_f32::<4, 3>(b[0]),
        DType::F8E5M2Fnuz => fp8::fnuz_to_f32::<5, 2>(b[0]),
        DType::F8E8M0 => fp8::e8m0_to_f32(b[0]),
        DType::F64 => f64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as f32,
        _ => f32::NAN,
    }
}

/// Encodes one f32 into `out` (which holds exactly one element of `dtype`).
#[inline]
pub fn encode_f32(dtype: DType, x: f32, out: &mut [u8]) {
    match dtype {
        DType::F32 => out.copy_from_slice(&x.to_le_bytes()),
        DType::F16 => out.copy_from_slice(&f16::from_f32(x).to_bits().to_le_bytes()),
        DType::BF16 => out.copy_from_slice(&f32_to_bf16_bits(x).to_le_bytes()),
        DType::F8E4M3 => out[0] = fp8::f32_to_e4m3(x),
        DType::F8E5M2 => out[0] = fp8::f32_to_e5m2(x),
        DType::F8E4M3Fnuz => out[0] = fp8::f32_to_e4m3fnuz(x),
        DType::F8E5M2Fnuz => out[0] = fp8::f32_to_e5m2fnuz(x),
        DType::F8E8M0 => out[0] = fp8::f32_to_e8m0(x),
        DType::F64 => out.copy_from_slice(&(x as f64).to_le_bytes()),
        _ => {}
    }
}

/// Whether any element of the little-endian `bytes` of `dtype` is non-zero (a NaN counts; both
/// zeros do not). For the flush-to-zero check of a cast: a pass at memory speed.
pub fn any_nonzero(dtype: DType, bytes: &[u8]) -> bool {
    fn any<const N: usize>(bytes: &[u8], mask: [u8; N]) -> bool {
        // Without an early exit within a block, so that it vectorises.
        bytes.chunks(4096).any(|block| {
            block.chunks_exact(N).fold(0u8, |acc, e| {
                acc | e.iter().zip(&mask).fold(0u8, |a, (b, m)| a | (b & m))
            }) != 0
        })
    }
    match dtype {
        DType::F64 => any(bytes, [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]),
        DType::F32 => any(bytes, [0xFF, 0xFF, 0xFF, 0x7F]),
        DType::F16 | DType::BF16 => any(bytes, [0xFF, 0x7F]),
        DType::F8E4M3 | DType::F8E5M2 => any(bytes, [0x7F]),
        // fnuz: 0x80 is NaN, not -0; e8m0 has no zero at all.
        _ => bytes.iter().any(|&b| b != 0) || dtype == DType::F8E8M0,
    }
}

/// What the kernels do about finite values beyond the target's range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// Cast as torch does (inf, or saturation for f8e4m3fn) and count nothing.
    Ignore,
    /// Cast as torch does and count the values that left the range.
    Count,
    /// Saturate them to the largest finite value of the target, and count them.
    Clamp,
}

/// The smallest f32 magnitude that a cast to `to` can no longer represent as a finite value
/// within rounding: it becomes inf (f16, bf16, f8e5m2) or saturates (f8e4m3fn, beyond the
/// rounding interval of 448). `inf` for f32 and f64 targets.
pub fn overflow_threshold(to: DType) -> f32 {
    match to {
        DType::F16 => 65520.0,
        DType::BF16 => f32::from_bits(0x7F7F_8000),
        DType::F8E5M2 => 61440.0,
        DType::F8E4M3 => 464.0,
        // fnuz: what rounds beyond the largest finite value becomes NaN
        DType::F8E4M3Fnuz => 248.0,
        DType::F8E5M2Fnuz => 61440.0,
        DType::F8E8M0 => f32::from_bits(0x7F40_0000), // 1.5 * 2^127 rounds up to NaN
        _ => f32::INFINITY,
    }
}

/// Whether casting the finite-or-not value `x` (already decoded) to `to` leaves the range.
#[inline]
pub fn overflows(x: f64, to: DType) -> bool {
    if !x.is_finite() || to == DType::F64 {
        return false;
    }
    let v = x as f32;
    v.is_infinite() || v.abs() >= overflow_threshold(to)
}

/// Casts `input` (elements of `from`) into `output` (the same count of `to`), on this thread.
pub fn cast(from: DType, to: DType, input: &[u8], output: &mut [u8]) -> Result<(), CastError> {
    cast_checked(from, to, input, output, Range::Ignore).map(|_| ())
}

/// Casts like [`cast`], spread over the rayon thread pool.
pub fn cast_par(from: DType, to: DType, input: &[u8], output: &mut [u8]) -> Result<(), CastError> {
    cast_par_checked(from, to, input, output, Range::Ignore).map(|_| ())
}

/// Casts on this thread; returns how many finite values left the target's range.
pub fn cast_checked(
    from: DType,
    to: DType,
    input: &[u8],
    output: &mut [u8],
    range: Range,
) -> Result<u64, CastError> {
    check(from, to, input, output)?;
    let (isz, osz) = (from.bitsize() / 8, to.bitsize() / 8);
    Ok(input
        .chunks(BLOCK * isz)
        .zip(output.chunks_mut(BLOCK * osz))
        .map(|(i, o)| cast_block(from, to, i, o, range))
        .sum())
}

/// Casts in parallel over the rayon pool; returns how many finite values left the range.
pub fn cast_par_checked(
    from: DType,
    to: DType,
    input: &[u8],
    output: &mut [u8],
    range: Range,
) -> Result<u64, CastError> {
    check(from, to, input, output)?;
    let (isz, osz) = (from.bitsize() / 8, to.bitsize() / 8);
    Ok(input
        .par_chunks(PAR_CHUNK * isz)
        .zip(output.par_chunks_mut(PAR_CHUNK * osz))
        .map(|(i, o)| {
            i.chunks(BLOCK * isz)
                .zip(o.chunks_mut(BLOCK * osz))
                .map(|(i, o)| cast_block(from, to, i, o, range))
                .sum::<u64>()
        })
        .sum())
}

/// Casts and marks, per element, the finite values that left the range (for statistics).
/// Panics if the buffers do not match (callers size them).
pub fn cast_flagged(from: DType, to: DType, input: &[u8], output: &mut [u8], flags: &mut [bool]) {
    cast_checked(from, to, input, output, Range::Ignore).expect("matching buffers");
    let isz = from.bitsize() / 8;
    for (f, x) in flags.iter_mut().zip(input.chunks_exact(isz)) {
        *f = overflows(decode_f64(from, x), to);
    }
}

fn check(from: DType, to: DType, input: &[u8], output: &mut [u8]) -> Result<(), CastError> {
    if !(from.is_castable() && to.is_castable()) {
        return Err(CastError::Unsupported(from, to));
    }
    let (isz, osz) = (from.bitsize() / 8, to.bitsize() / 8);
    if input.len() % isz != 0 || input.len() / isz * osz != output.len() {
        return Err(CastError::Length(input.len(), output.len()));
    }
    Ok(())
}

/// One block of at most [`BLOCK`] elements; returns the values that left the range (counted
/// unless `range` is [`Range::Ignore`]).
fn cast_block(from: DType, to: DType, input: &[u8], output: &mut [u8], range: Range) -> u64 {
    if from == to {
        output.copy_from_slice(input);
        return 0;
    }
    if let Some(count) = f32_to_16_aligned(from, to, input, output, range) {
        return count;
    }
    let isz = from.bitsize() / 8;
    let n = input.len() / isz;
    if to == DType::F64 {
        for (i, o) in input.chunks_exact(isz).zip(output.chunks_exact_mut(8)) {
            o.copy_from_slice(&decode_f64(from, i).to_le_bytes());
        }
        return 0;
    }
    let mut buf = [0f32; BLOCK];
    let vals = &mut buf[..n];
    let mut count = 0u64;
    let max = to.max_finite().unwrap_or(f64::MAX) as f32;
    if from == DType::F64 {
        for (v, b) in vals.iter_mut().zip(input.chunks_exact(8)) {
            let x = f64::from_le_bytes(b.try_into().expect("8 bytes"));
            *v = x as f32;
            if range != Range::Ignore && x.is_finite() && v.is_infinite() {
                count += 1;
                if range == Range::Clamp {
                    *v = max.copysign(*v);
                }
            }
        }
    } else {
        decode_block(from, input, vals);
    }
    let t = overflow_threshold(to);
    if range != Range::Ignore && t.is_finite() {
        // On the bits, branch-free and in 32-bit lanes, so that it vectorises: finite values
        // at or above the threshold (NaN and inf bits are >= 0x7F80_0000).
        let tb = t.to_bits();
        let out_of_range = |v: f32| {
            let a = v.to_bits() & 0x7FFF_FFFF;
            (a >= tb) & (a < 0x7F80_0000)
        };
        count += vals.iter().map(|&v| out_of_range(v) as u32).sum::<u32>() as u64;
        if range == Range::Clamp && count > 0 {
            for v in vals.iter_mut().filter(|v| out_of_range(**v)) {
                *v = max.copysign(*v);
            }
        }
    }
    encode_block(to, vals, output);
    count
}

/// f32 -> f16/bf16 straight between aligned buffers (the common case, and most of a model's
/// bytes): no staging copies. `None` when it does not apply (other types, misaligned
/// buffers, a big-endian host, or clamping, which the general path does).
fn f32_to_16_aligned(
    from: DType,
    to: DType,
    input: &[u8],
    output: &mut [u8],
    range: Range,
) -> Option<u64> {
    if from != DType::F32
        || !matches!(to, DType::F16 | DType::BF16)
        || range == Range::Clamp
        || cfg!(target_endian = "big")
    {
        return None;
    }
    // SAFETY: every bit pattern is a valid f32 and u16; align_to only reinterprets the
    // aligned middle, and the fast path runs only when there is nothing before or after it.
    let (pre, vals, post) = unsafe { input.align_to::<f32>() };
    let (opre, out, opost) = unsafe { output.align_to_mut::<u16>() };
    if !pre.is_empty() || !post.is_empty() || !opre.is_empty() || !opost.is_empty() {
        return None;
    }
    let mut count = 0u64;
    let t = overflow_threshold(to);
    if range == Range::Count && t.is_finite() {
        let tb = t.to_bits();
        count = vals
            .iter()
            .map(|&v| {
                let a = v.to_bits() & 0x7FFF_FFFF;
                ((a >= tb) & (a < 0x7F80_0000)) as u32
            })
            .sum::<u32>() as u64;
    }
    match to {
        DType::F16 => out
            .reinterpret_cast_mut::<f16>()
            .convert_from_f32_slice(vals),
        _ => {
            for (o, &v) in out.iter_mut().zip(vals) {
                *o = f32_to_bf16_bits(v);
            }
        }
    }
    Some(count)
}

/// Decodes little-endian elements of any castable type but f64 into f32 (exact). `vals` holds
/// `input.len() / element size` values.
pub fn decode_f32_slice(from: DType, input: &[u8], vals: &mut [f32]) {
    for (i, v) in input
        .chunks(BLOCK * (from.bitsize() / 8))
        .zip(vals.chunks_mut(BLOCK))
    {
        decode_block(from, i, v);
    }
}

fn decode_block(from: DType, input: &[u8], vals: &mut [f32]) {
    match from {
        DType::F32 => {
            for (v, b) in vals.iter_mut().zip(input.chunks_exact(4)) {
                *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::F16 => {
            let mut bits = [0u16; BLOCK];
            let bits = &mut bits[..vals.len()];
            for (v, b) in bits.iter_mut().zip(input.chunks_exact(2)) {
                *v = u16::from_le_bytes([b[0], b[1]]);
            }
            bits.reinterpret_cast::<f16>().convert_to_f32_slice(vals);
        }
        DType::BF16 => {
            for (v, b) in vals.iter_mut().zip(input.chunks_exact(2)) {
                *v = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        DType::F8E4M3 => fp8::decode_e4m3(input, vals),
        DType::F8E5M2 => fp8::decode_e5m2(input, vals),
        _ => {
            let isz = from.bitsize() / 8;
            for (v, b) in vals.iter_mut().zip(input.chunks_exact(isz)) {
                *v = decode_f32(from, b);
            }
        }
    }
}

/// Encodes f32 values into little-endian elements of a castable type, rounding as torch's
/// `.to()` from f32 does (f8e4m3fn saturating). `output` holds `vals.len()` elements.
pub fn encode_f32_slice(to: DType, vals: &[f32], output: &mut [u8]) {
    let osz = to.bitsize() / 8;
    for (v, o) in vals.chunks(BLOCK).zip(output.chunks_mut(BLOCK * osz)) {
        encode_block(to, v, o);
    }
}

fn encode_block(to: DType, vals: &[f32], output: &mut [u8]) {
    match to {
        DType::F32 => {
            for (v, o) in vals.iter().zip(output.chunks_exact_mut(4)) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::F16 => {
            let mut halves = [f16::ZERO; BLOCK];
            let halves = &mut halves[..vals.len()];
            halves.convert_from_f32_slice(vals);
            for (h, o) in halves.iter().zip(output.chunks_exact_mut(2)) {
                o.copy_from_slice(&h.to_bits().to_le_bytes());
            }
        }
        DType::BF16 => {
            for (v, o) in vals.iter().zip(output.chunks_exact_mut(2)) {
                o.copy_from_slice(&f32_to_bf16_bits(*v).to_le_bytes());
            }
        }
        _ => {
            let osz = to.bitsize() / 8;
            for (v, o) in vals.iter().zip(output.chunks_exact_mut(osz)) {
                encode_f32(to, *v, o);
            }
        }
    }
}

/// The values of `bytes` (elements of `from`) widened to f32 (f64 rounded to nearest, as
/// torch's `.float()`), each mapped by `f` (arithmetic in f32); with the count of finite
/// values that `f` took beyond f32's range (none under [`Range::Ignore`]), which
/// [`Range::Clamp`] sets to `clamp` with their sign. For a rules file's `scale`: the values
/// are then cast from f32 as any cast is.
pub fn map_f32(
    from: DType,
    bytes: &[u8],
    f: impl Fn(f32) -> f32,
    range: Range,
    clamp: f32,
) -> (Vec<f32>, u64) {
    let isz = from.bitsize() / 8;
    let mut vals = vec![0f32; bytes.len() / isz];
    // whether each input is finite: an f64 one may already leave f32's range in `.float()`
    let finite: Vec<bool> = if from == DType::F64 {
        bytes
            .chunks_exact(8)
            .zip(vals.iter_mut())
            .map(|(b, v)| {
                let x = f64::from_le_bytes(b.try_into().expect("8 bytes"));
                *v = x as f32;
                x.is_finite()
            })
            .collect()
    } else {
        decode_f32_slice(from, bytes, &mut vals);
        vals.iter().map(|v| v.is_finite()).collect()
    };
    let mut count = 0u64;
    for (v, finite) in vals.iter_mut().zip(finite) {
        *v = f(*v);
        if finite && !v.is_finite() && range != Range::Ignore {
            count += 1;
            if range == Range::Clamp {
                *v = clamp.copysign(*v);
            }
        }
    }
    (vals, count)
}

/// bf16 value of an f32 (for callers that want the `half` type).
pub fn to_bf16(x: f32) -> bf16 {
    bf16::from_bits(f32_to_bf16_bits(x))
}

#[cfg(test)]
mod nonzero_tests {
    use super::*;

    #[test]
    fn signed_zeros_are_zero_and_everything_else_is_not() {
        assert!(!any_nonzero(DType::F16, &[0, 0x80, 0, 0]));
        assert!(any_nonzero(DType::F16, &[1, 0x80, 0, 0]));
        assert!(!any_nonzero(DType::F32, &(-0.0f32).to_le_bytes()));
        assert!(any_nonzero(DType::F32, &f32::MIN_POSITIVE.to_le_bytes()));
        assert!(!any_nonzero(DType::F64, &(-0.0f64).to_le_bytes()));
        assert!(any_nonzero(DType::F64, &1e-300f64.to_le_bytes()));
        assert!(!any_nonzero(DType::F8E4M3, &[0x80, 0]));
        assert!(any_nonzero(DType::F8E4M3Fnuz, &[0x80]));
        let mut big = vec![0u8; 1 << 16];
        assert!(!any_nonzero(DType::BF16, &big));
        big[40001] = 1;
        assert!(any_nonzero(DType::BF16, &big));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn f32_to_f16_basic() {
        let input = f32_bytes(&[1.0, 65504.0, 65520.0, -0.0, 1e-8, f32::NAN]);
        let mut out = vec![0u8; 12];
        cast(DType::F32, DType::F16, &input, &mut out).unwrap();
        let bits: Vec<u16> = out
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(&bits[..5], &[0x3C00, 0x7BFF, 0x7C00, 0x8000, 0x0000]);
        assert_eq!(bits[5] & 0x7C00, 0x7C00);
        assert_ne!(bits[5] & 0x03FF, 0);
    }

    #[test]
    fn bf16_rounding_and_nan() {
        assert_eq!(f32_to_bf16_bits(1.0), 0x3F80);
        // exactly halfway between 1.0 and the next bf16: ties to even (1.0)
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3F80_8000)), 0x3F80);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3F81_8000)), 0x3F82);
        assert_eq!(f32_to_bf16_bits(f32::NAN), 0xFFFF);
        assert_eq!(f32_to_bf16_bits(f32::MAX), 0x7F80, "rounds up to inf");
    }

    #[test]
    fn f64_goes_through_f32_like_torch() {
        // 1 + 2^-11 + 2^-40: nearest f16 is 1+2^-10 directly, but torch rounds to f32 first
        // (1 + 2^-11 exactly, a tie) and then to even: 1.0.
        let x = 1.0 + 2f64.powi(-11) + 2f64.powi(-40);
        let mut out = [0u8; 2];
        cast(DType::F64, DType::F16, &x.to_le_bytes(), &mut out).unwrap();
        assert_eq!(u16::from_le_bytes(out), 0x3C00);
    }

    #[test]
    fn widening_is_exact_and_par_matches_serial() {
        let vals: Vec<f32> = (0..200_000).map(|i| (i as f32 - 1e5) * 0.37).collect();
        let input = f32_bytes(&vals);
        for to in [
            DType::F16,
            DType::BF16,
            DType::F8E4M3,
            DType::F8E5M2,
            DType::F64,
        ] {
            let osz = to.bitsize() / 8;
            let mut a = vec![0u8; vals.len() * osz];
            let mut b = vec![0u8; vals.len() * osz];
            cast(DType::F32, to, &input, &mut a).unwrap();
            cast_par(DType::F32, to, &input, &mut b).unwrap();
            assert_eq!(a, b, "{to}");
        }
        let mut wide = vec![0u8; vals.len() * 8];
        cast(DType::F32, DType::F64, &input, &mut wide).unwrap();
        let mut back = vec![0u8; input.len()];
        cast(DType::F64, DType::F32, &wide, &mut back).unwrap();
        assert_eq!(back, input);
    }

    #[test]
    fn counts_and_clamps_overflow() {
        let input = f32_bytes(&[1e5, -7e4, 65519.0, 1.0, f32::INFINITY]);
        let mut out = vec![0u8; 10];
        let n = cast_checked(DType::F32, DType::F16, &input, &mut out, Range::Count).unwrap();
        assert_eq!(n, 2, "65519 rounds to 65504; inf was already inf");
        assert_eq!(u16::from_le_bytes([out[0], out[1]]), 0x7C00);
        let n = cast_checked(DType::F32, DType::F16, &input, &mut out, Range::Clamp).unwrap();
        assert_eq!(n, 2);
        assert_eq!(u16::from_le_bytes([out[0], out[1]]), 0x7BFF, "65504");
        assert_eq!(u16::from_le_bytes([out[2], out[3]]), 0xFBFF, "-65504");
        assert_eq!(
            u16::from_le_bytes([out[8], out[9]]),
            0x7C00,
            "inf stays inf"
        );
        let big = 1e300f64.to_le_bytes();
        let mut o = [0u8; 4];
        assert_eq!(
            cast_checked(DType::F64, DType::F32, &big, &mut o, Range::Count).unwrap(),
            1
        );
        let mut o = [0u8; 2];
        assert_eq!(
            cast_checked(DType::F64, DType::BF16, &big, &mut o, Range::Clamp).unwrap(),
            1
        );
        assert_eq!(u16::from_le_bytes(o), 0x7F7F, "bf16 max");
        assert!(overflows(1e300, DType::F16) && !overflows(1e300, DType::F64));
    }

    #[test]
    fn rejects_bad_lengths_and_types() {
        let mut out = [0u8; 3];
        assert_eq!(
            cast(DType::F32, DType::F16, &[0u8; 4], &mut out),
            Err(CastError::Length(4, 3))
        );
        assert!(matches!(
            cast(DType::I32, DType::F16, &[0u8; 4], &mut [0u8; 2]),
            Err(CastError::Unsupported(..))
        ));
    }
}
