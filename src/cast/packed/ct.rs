//! compressed-tensors' packed weights (0.20.1: `pack-quantized`, `int-quantized`,
//! `nvfp4-pack-quantized`, `mxfp4-pack-quantized`) and ModelOpt's NVFP4 weights: a 2-D
//! `[out, in]` weight whose rows are packed values with per-tensor, per-channel or per-group
//! scales (and zero points), decoded as each reference computes it:
//! - integers: compressed-tensors' `_dequantize`, `(q - zp) * scale` in the scale's dtype (the
//!   difference is exact, so the product is rounded once);
//! - NVFP4 (compressed-tensors): `e2m1 * (f32(scale) / global)`, two f32 roundings, then bf16;
//! - NVFP4 (ModelOpt, vLLM): `e2m1 * (f32(scale) * scale_2)` in f32;
//! - MXFP4 (compressed-tensors): `e2m1 * bf16(2^(e - 127))` in bf16 (byte 255 is inf).

use super::{le, Scheme, Window, E2M1};
use crate::cast::f32_to_bf16_bits;
use crate::cast::fp8::e4m3_to_f32;
use crate::dtype::DType;

/// What the payload holds and how its values are scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Signed integers of `bits` bits: packed in a little-endian bit stream of int32 words per
    /// row, value `i` at bit `i * bits`, stored plus `2^(bits - 1)` (`pack-quantized`), or one
    /// int8 each (`int-quantized`, `packed: false`).
    Int {
        /// Bits per value.
        bits: u8,
        /// Packed in int32 words.
        packed: bool,
    },
    /// E2M1 pairs per byte (low nibble first) with an FP8 E4M3 scale per 16 and an f32
    /// global scale.
    Nvfp4(Global),
    /// E2M1 pairs per byte (low nibble first) with an E8M0 scale per 32.
    Mxfp4,
}

/// How NVFP4's global scale applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Global {
    /// compressed-tensors: the block scale divided by it (a `[1]` tensor: in f32).
    Divide,
    /// compressed-tensors with a 0-d global scale: the quotient rounded to bf16 first (torch's
    /// type promotion keeps the block scale's bf16).
    DivideBf16,
    /// ModelOpt: the block scale times `weight_scale_2`, in f32.
    Multiply,
}

/// Zero points of an asymmetric integer scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zero {
    /// Symmetric: none.
    None,
    /// One per scale, packed down the output dimension (`[ceil(out * bits / 32), groups]`
    /// int32, the same bit stream per column).
    Packed,
    /// One int8 for the whole tensor.
    Tensor,
}

/// A compressed-tensors or ModelOpt packed weight. Parts: payload, scale, then the zero point
/// (when there is one), then the global scale (NVFP4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ct {
    /// The payload's kind.
    pub kind: Kind,
    /// Output rows.
    pub out: u64,
    /// Input columns.
    pub inn: u64,
    /// Values per scale along a row (`inn` per channel; 0 for one scale for the tensor).
    pub group: u64,
    /// The scale's dtype (f32, bf16, f16; F8E4M3 for NVFP4; U8 for MXFP4).
    pub scale: DType,
    /// Zero points.
    pub zero: Zero,
}

impl Ct {
    /// Scales per row (1 for one per tensor).
    pub fn groups(&self) -> u64 {
        if self.group == 0 {
            1
        } else {
            self.inn.div_ceil(self.group)
        }
    }

    /// Bytes per payload row.
    pub fn payload_row(&self) -> u64 {
        match self.kind {
            Kind::Int { bits, packed: true } => (self.inn * bits as u64).div_ceil(32) * 4,
            Kind::Int { packed: false, .. } => self.inn,
            Kind::Nvfp4(_) | Kind::Mxfp4 => self.inn.div_ceil(2),
        }
    }

    fn bits(&self) -> u64 {
        match self.kind {
            Kind::Int { bits, .. } => bits as u64,
            _ => 4,
        }
    }

    fn scale_size(&self) -> u64 {
        (self.scale.bitsize() / 8).max(1) as u64
    }

    /// The dtype its values are given in (the reference's).
    pub fn dtype(&self) -> DType {
        match self.kind {
            Kind::Int { .. } => self.scale,
            Kind::Nvfp4(Global::Multiply) => DType::F32,
            Kind::Nvfp4(_) | Kind::Mxfp4 => DType::BF16,
        }
    }
}

impl Scheme for Ct {
    fn shape(&self) -> Vec<u64> {
        vec![self.out, self.inn]
    }

    fn part_bytes(&self) -> Vec<u64> {
        let scales = if self.group == 0 {
            1
        } else {
            self.out * self.groups()
        };
        let mut v = vec![self.out * self.payload_row(), scales * self.scale_size()];
        match self.zero {
            Zero::None => {}
            Zero::Packed => v.push((self.out * self.bits()).div_ceil(32) * 4 * self.groups()),
            Zero::Tensor => v.push(1),
        }
        if matches!(self.kind, Kind::Nvfp4(_)) {
            v.push(4);
        }
        v
    }

    fn row_len(&self) -> u64 {
        self.inn
    }

    fn rows(&self) -> u64 {
        self.out
    }

    fn row_unit(&self) -> u64 {
        // 32 rows of packed zero points are a whole number of words for any width
        if self.zero == Zero::Packed {
            32
        } else {
            1
        }
    }

    fn windows(&self, row0: u64, rows: u64) -> Vec<Window> {
        let mut w = vec![Window::rows(0, row0, rows, self.payload_row())];
        w.push(if self.group == 0 {
            Window::rows(1, 0, 1, self.scale_size())
        } else {
            Window::rows(1, row0, rows, self.groups() * self.scale_size())
        });
        let mut next = 2;
        match self.zero {
            Zero::None => {}
            Zero::Packed => {
                let b = self.bits();
                let (w0, w1) = (row0 * b / 32, ((row0 + rows) * b).div_ceil(32));
                w.push(Window::rows(next, w0, w1 - w0, self.groups() * 4));
                next += 1;
            }
            Zero::Tensor => {
                w.push(Window::rows(next, 0, 1, 1));
                next += 1;
            }
        }
        if matches!(self.kind, Kind::Nvfp4(_)) {
            w.push(Window::rows(next, 0, 1, 4));
        }
        w
    }

    fn decode(&self, row0: u64, rows: u64, parts: &[Vec<u8>], out: &mut [f32]) {
        let (payload, scales) = (&parts[0], &parts[1]);
        let inn = self.inn as usize;
        let groups = self.groups() as usize;
        let ss = self.scale_size() as usize;
        let scale_at = |r: usize, g: usize| -> f32 {
            let at = if self.group == 0 {
                0
            } else {
                (r * groups + g) * ss
            };
            match self.scale {
                DType::F8E4M3 => e4m3_to_f32(scales[at]),
                DType::U8 => mx_scale(scales[at]),
                d => crate::cast::decode_f32(d, &scales[at..at + ss]),
            }
        };
        let global = match self.kind {
            Kind::Nvfp4(_) => {
                f32::from_le_bytes(parts[parts.len() - 1][..4].try_into().unwrap_or([0; 4]))
            }
            _ => 1.0,
        };
        let prow = self.payload_row() as usize;
        let group = if self.group == 0 {
            inn.max(1)
        } else {
            self.group as usize
        };
        for r in 0..rows as usize {
            let row = &payload[r * prow..(r + 1) * prow];
            let o = &mut out[r * inn..(r + 1) * inn];
            for g in 0..groups {
                let s = scale_at(r, g);
                let (c0, c1) = (g * group, ((g + 1) * group).min(inn));
                match self.kind {
                    Kind::Int { bits, packed } => {
                        let z = self.zero_point(parts, row0, r as u64, g);
                        for (c, v) in o[c0..c1].iter_mut().enumerate().map(|(k, v)| (c0 + k, v)) {
                            let q = if packed {
                                field(row, c as u64 * bits as u64, bits) - (1 << (bits - 1))
                            } else {
                                row[c] as i8 as i64
                            };
                            *v = (q - z) as f32 * s;
                        }
                    }
                    Kind::Nvfp4(how) => {
                        let s = match how {
                            Global::Divide => s / global,
                            Global::DivideBf16 => bf16_round(s / global),
                            Global::Multiply => s * global,
                        };
                        for (c, v) in o[c0..c1].iter_mut().enumerate().map(|(k, v)| (c0 + k, v)) {
                            *v = nibble(row, c) * s;
                        }
                    }
                    Kind::Mxfp4 => {
                        for (c, v) in o[c0..c1].iter_mut().enumerate().map(|(k, v)| (c0 + k, v)) {
                            *v = nibble(row, c) * s;
                        }
                    }
                }
            }
        }
    }
}

impl Ct {
    /// The zero point of row `r` of the window starting at `row0`, group `g`.
    fn zero_point(&self, parts: &[Vec<u8>], row0: u64, r: u64, g: usize) -> i64 {
        let b = self.bits();
        match self.zero {
            Zero::None => 0,
            Zero::Tensor => parts[2][0] as i8 as i64,
            Zero::Packed => {
                // column g's words, from the window's first word row
                let zp = &parts[2];
                let groups = self.groups() as usize;
                let bit = (row0 + r) * b - row0 * b / 32 * 32;
                let word = |w: u64| -> u64 {
                    let at = (w as usize * groups + g) * 4;
                    zp.get(at..at + 4).map(|x| le(x, 0, 4)).unwrap_or(0)
                };
                let (w, shift) = (bit / 32, bit % 32);
                let mut v = word(w) >> shift;
                if shift + b > 32 {
                    v |= word(w + 1) << (32 - shift);
                }
                (v & ((1 << b) - 1)) as i64 - (1 << (b - 1))
            }
        }
    }
}

/// Bits `at..at + bits` of a row's little-endian bit stream (values may straddle bytes and
/// words).
#[inline]
fn field(row: &[u8], at: u64, bits: u8) -> i64 {
    let (byte, shift) = ((at / 8) as usize, at % 8);
    let need = ((shift + bits as u64).div_ceil(8)) as usize;
    let v = le(row, byte, need.min(row.len() - byte));
    ((v >> shift) & ((1u64 << bits) - 1)) as i64
}

/// The E2M1 value of element `c` of a row of nibble pairs (low nibble first).
#[inline]
fn nibble(row: &[u8], c: usize) -> f32 {
    let b = row[c / 2];
    E2M1[if c % 2 == 0 { b & 15 } else { b >> 4 } as usize]
}

/// compressed-tensors' `decompress_mx_scale`: `2.0 ** (e - 127)` as bf16 (2^-127 is a bf16
/// subnormal, exact; byte 255 gives 2^128, inf, so zero values become NaN).
#[inline]
fn mx_scale(e: u8) -> f32 {
    super::mxfp4::e8m0_scaled(1.0, e)
}

/// `x` rounded to bf16 (torch's round-to-nearest-even), as f32.
#[inline]
fn bf16_round(x: f32) -> f32 {
    f32::from_bits((f32_to_bf16_bits(x) as u32) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_straddle_bytes_and_words() {
        // 3-bit values 0..=7 then 5, 6 in one stream
        let vals = [0u64, 1, 2, 3, 4, 5, 6, 7, 5, 6, 7];
        let mut stream = 0u128;
        for (i, v) in vals.iter().enumerate() {
            stream |= (*v as u128) << (3 * i);
        }
        let bytes = stream.to_le_bytes();
        for (i, v) in vals.iter().enumerate() {
            assert_eq!(field(&bytes, 3 * i as u64, 3), *v as i64);
        }
    }
}
