//! MXFP4 (OCP microscaling: E2M1 values in blocks of 32 sharing an E8M0 exponent) as gpt-oss
//! stores its MoE experts.

use super::{Scheme, Window, E2M1};

/// gpt-oss's MoE experts, as transformers' `convert_moe_packed_tensors`
/// (`integrations/mxfp4.py`) dequantizes them: parts `blocks` `[E, R, G, 16]` (two E2M1 codes a
/// byte, low nibble first) and `scales` `[E, R, G]` (E8M0: `2^(s - 127)`, one per 32 values);
/// the values `lut[code] * 2^(s - 127)` (`torch.ldexp`, exact), laid out `[E, G * 32, R]` (the
/// `transpose(1, 2)` it returns) or, untransposed, `[E, R, G * 32]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mxfp4Experts {
    /// Experts (E).
    pub experts: u64,
    /// Rows of each expert as stored (R).
    pub rows: u64,
    /// Blocks of 32 per row (G).
    pub groups: u64,
    /// Values laid out `[E, G * 32, R]`.
    pub transpose: bool,
}

impl Scheme for Mxfp4Experts {
    fn shape(&self) -> Vec<u64> {
        if self.transpose {
            vec![self.experts, self.groups * 32, self.rows]
        } else {
            vec![self.experts, self.rows, self.groups * 32]
        }
    }

    fn part_bytes(&self) -> Vec<u64> {
        let n = self.experts * self.rows * self.groups;
        vec![n * 16, n]
    }

    fn row_len(&self) -> u64 {
        if self.transpose {
            self.rows
        } else {
            self.groups * 32
        }
    }

    fn rows(&self) -> u64 {
        self.experts * self.segment()
    }

    fn row_unit(&self) -> u64 {
        // transposed, an output row is one input column: a block's 32 share a window
        if self.transpose {
            32
        } else {
            1
        }
    }

    fn segment(&self) -> u64 {
        if self.transpose {
            self.groups * 32
        } else {
            self.rows
        }
    }

    fn windows(&self, row0: u64, rows: u64) -> Vec<Window> {
        let (e, first) = (row0 / self.segment(), row0 % self.segment());
        let (bytes, scales) = (self.groups * 16, self.groups);
        if self.transpose {
            // output rows are input columns: blocks first/32.. of every stored row
            let (g0, gn) = (first / 32, rows.div_ceil(32));
            vec![
                Window {
                    part: 0,
                    row0: e * self.rows,
                    rows: self.rows,
                    row_bytes: bytes,
                    byte0: g0 * 16,
                    bytes: gn * 16,
                },
                Window {
                    part: 1,
                    row0: e * self.rows,
                    rows: self.rows,
                    row_bytes: scales,
                    byte0: g0,
                    bytes: gn,
                },
            ]
        } else {
            vec![
                Window::rows(0, row0, rows, bytes),
                Window::rows(1, row0, rows, scales),
            ]
        }
    }

    fn decode(&self, _row0: u64, rows: u64, parts: &[Vec<u8>], out: &mut [f32]) {
        let (blocks, scales) = (&parts[0], &parts[1]);
        if self.transpose {
            // window rows are the stored rows r (all of them), holding rows/32 blocks each
            let gn = rows.div_ceil(32) as usize;
            let stored = self.rows as usize;
            for r in 0..stored {
                for g in 0..gn {
                    let s = scales[r * gn + g];
                    let b = &blocks[(r * gn + g) * 16..(r * gn + g + 1) * 16];
                    for (j, &byte) in b.iter().enumerate() {
                        let i = g * 32 + 2 * j;
                        out[i * stored + r] = e8m0_scaled(E2M1[(byte & 15) as usize], s);
                        out[(i + 1) * stored + r] = e8m0_scaled(E2M1[(byte >> 4) as usize], s);
                    }
                }
            }
        } else {
            for ((o, b), &s) in out
                .chunks_exact_mut(32)
                .zip(blocks.chunks_exact(16))
                .zip(scales.iter())
            {
                for (j, &byte) in b.iter().enumerate() {
                    o[2 * j] = e8m0_scaled(E2M1[(byte & 15) as usize], s);
                    o[2 * j + 1] = e8m0_scaled(E2M1[(byte >> 4) as usize], s);
                }
            }
        }
    }
}

/// `v * 2^(s - 127)` exactly, as `torch.ldexp` computes it (byte 255 too: `ldexp(0.5, 128)` is
/// 2^127, `ldexp(1, 128)` inf; every E2M1 value times a power of two is exact in f32 and bf16
/// down to 2^-128).
#[inline]
pub fn e8m0_scaled(v: f32, s: u8) -> f32 {
    let e = s as i32 - 127;
    // two steps keep each factor a normal f32 (2^-127 is subnormal, 2^128 overflows)
    let (a, b) = (e / 2, e - e / 2);
    v * f32::from_bits(((a + 127) as u32) << 23) * f32::from_bits(((b + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e8m0_is_ldexp() {
        assert_eq!(e8m0_scaled(0.0, 255), 0.0);
        assert_eq!(e8m0_scaled(-0.5, 255), -(2f32.powi(127)));
        assert_eq!(e8m0_scaled(1.0, 255), f32::INFINITY);
        for s in 0..=254u8 {
            for &v in &E2M1 {
                let want = (v as f64) * 2f64.powi(s as i32 - 127);
                assert_eq!(e8m0_scaled(v, s), want as f32, "{v} * 2^({s} - 127)");
            }
        }
    }
}
