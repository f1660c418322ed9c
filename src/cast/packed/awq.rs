//! AWQ packed 4-bit weights (GEMM and GEMV layouts), as autoawq 0.2.9 dequantizes them.

use super::{le, Scheme, Window};
use crate::dtype::DType;

/// Where output column `8c + j` of a GEMM word sits: nibble `AWQ_REVERSE_ORDER[j]`
/// (autoawq's `packing_utils.AWQ_REVERSE_ORDER`; `from_linear` packs with
/// `order_map = [0, 2, 4, 6, 1, 3, 5, 7]`).
pub const AWQ_REVERSE_ORDER: [u32; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// An AWQ Linear (4-bit, zero point), its values `(q - z) * scales` in the scales' dtype (the
/// integer difference is exact, the product rounds once), laid out as the `nn.Linear` weight
/// `[out, in]`.
///
/// GEMM (`WQLinear_GEMM`; autoawq's `dequantize_gemm`, whose `[in, out]` result is
/// transposed): parts `qweight` int32 `[in, out / 8]`, `qzeros` int32 `[in / group_size,
/// out / 8]`, both packed along the output dimension with [`AWQ_REVERSE_ORDER`], and `scales`
/// `[in / group_size, out]`.
///
/// GEMV (`WQLinear_GEMV`, sequential nibbles along the input dimension): parts `qweight` int32
/// `[out, in / 8]`, `qzeros` int32 `[out, zero_words]` (group `g` in nibble `g % 8` of word
/// `g / 8`) and `scales` `[out, zero_words * 8]` (columns past the groups are padding).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Awq {
    /// Input features (K).
    pub inputs: u64,
    /// Output features (N).
    pub outputs: u64,
    /// Inputs per group (divides `inputs`).
    pub group_size: u64,
    /// The GEMV layout (else GEMM).
    pub gemv: bool,
    /// GEMV: words per `qzeros` row (unused for GEMM).
    pub zero_words: u64,
    /// The dtype of `scales` (the values' dtype).
    pub scales: DType,
}

impl Awq {
    /// Groups: `in / group_size`.
    pub fn groups(&self) -> u64 {
        self.inputs / self.group_size.max(1)
    }

    fn scale_bytes(&self) -> u64 {
        (self.scales.bitsize() / 8) as u64
    }

    /// GEMM: rows `rows` of the windows (`[in, rows / 8]` words, `[groups, rows / 8]` words,
    /// `[groups, rows]` scales).
    fn decode_gemm(&self, rows: usize, parts: &[Vec<u8>], out: &mut [f32]) {
        let (k, gs, words) = (self.inputs as usize, self.group_size as usize, rows / 8);
        let mut s = vec![0f32; self.groups() as usize * rows];
        crate::cast::decode_f32_slice(self.scales, &parts[2], &mut s);
        for (r, o) in out.chunks_exact_mut(k.max(1)).enumerate().take(rows) {
            let (c, shift) = (r / 8, 4 * AWQ_REVERSE_ORDER[r % 8]);
            let nib = |b: &[u8], row: usize| (le(b, (row * words + c) * 4, 4) >> shift) as i32 & 15;
            for (i, v) in o.iter_mut().enumerate() {
                let g = i / gs;
                let z = nib(&parts[1], g);
                *v = s[g * rows + r] * (nib(&parts[0], i) - z) as f32;
            }
        }
    }

    /// GEMV: whole rows of the three parts.
    fn decode_gemv(&self, rows: usize, parts: &[Vec<u8>], out: &mut [f32]) {
        let (k, gs) = (self.inputs as usize, self.group_size as usize);
        let (qw, zw, sw) = (
            k / 8,
            self.zero_words as usize,
            self.zero_words as usize * 8,
        );
        let mut s = vec![0f32; rows * sw];
        crate::cast::decode_f32_slice(self.scales, &parts[2], &mut s);
        let nib = |b: &[u8], word: usize, j: usize| (le(b, word * 4, 4) >> (4 * j)) as i32 & 15;
        for (r, o) in out.chunks_exact_mut(k.max(1)).enumerate().take(rows) {
            for (i, v) in o.iter_mut().enumerate() {
                let g = i / gs;
                let z = nib(&parts[1], r * zw + g / 8, g % 8);
                *v = s[r * sw + g] * (nib(&parts[0], r * qw + i / 8, i % 8) - z) as f32;
            }
        }
    }
}

impl Scheme for Awq {
    fn shape(&self) -> Vec<u64> {
        vec![self.outputs, self.inputs]
    }

    fn part_bytes(&self) -> Vec<u64> {
        let (k, n, es) = (self.inputs, self.outputs, self.scale_bytes());
        if self.gemv {
            vec![
                n * k / 2,
                n * self.zero_words * 4,
                n * self.zero_words * 8 * es,
            ]
        } else {
            let g = self.groups();
            vec![k * n / 2, g * n / 2, g * n * es]
        }
    }

    fn row_len(&self) -> u64 {
        self.inputs
    }

    fn rows(&self) -> u64 {
        self.outputs
    }

    fn row_unit(&self) -> u64 {
        // GEMM: 8 output columns share a word
        if self.gemv {
            1
        } else {
            8
        }
    }

    fn windows(&self, row0: u64, rows: u64) -> Vec<Window> {
        let es = self.scale_bytes();
        if self.gemv {
            return vec![
                Window::rows(0, row0, rows, self.inputs / 2),
                Window::rows(1, row0, rows, self.zero_words * 4),
                Window::rows(2, row0, rows, self.zero_words * 8 * es),
            ];
        }
        let band = |part, stored_rows, row_bytes, byte0, bytes| Window {
            part,
            row0: 0,
            rows: stored_rows,
            row_bytes,
            byte0,
            bytes,
        };
        let words = self.outputs / 2; // bytes per packed row: out / 8 words
        vec![
            band(0, self.inputs, words, row0 / 2, rows / 2),
            band(1, self.groups(), words, row0 / 2, rows / 2),
            band(2, self.groups(), self.outputs * es, row0 * es, rows * es),
        ]
    }

    fn decode(&self, _row0: u64, rows: u64, parts: &[Vec<u8>], out: &mut [f32]) {
        if self.gemv {
            self.decode_gemv(rows as usize, parts, out)
        } else {
            self.decode_gemm(rows as usize, parts, out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_and_gemv_layouts_agree() {
        // 16 outputs x 64 inputs, groups of 32; the same integers packed both ways
        let (n, k, gs) = (16usize, 64usize, 32usize);
        let groups = k / gs;
        let q = |o: usize, i: usize| ((o * 5 + i * 3) % 16) as u32;
        let z = |o: usize, g: usize| ((o + 3 * g) % 16) as u32;
        let s = |o: usize, g: usize| 0.25 + (o * groups + g) as f32;
        // GEMM: [k, n/8] words, column 8c + j in nibble AWQ_REVERSE_ORDER[j]
        let gemm_word = |f: &dyn Fn(usize) -> u32, c: usize| -> u32 {
            (0..8).fold(0, |w, j| w | f(8 * c + j) << (4 * AWQ_REVERSE_ORDER[j]))
        };
        let mut parts = [Vec::new(), Vec::new(), Vec::new()];
        for i in 0..k {
            for c in 0..n / 8 {
                parts[0].extend(gemm_word(&|o| q(o, i), c).to_le_bytes());
            }
        }
        for g in 0..groups {
            for c in 0..n / 8 {
                parts[1].extend(gemm_word(&|o| z(o, g), c).to_le_bytes());
            }
            for o in 0..n {
                parts[2].extend(s(o, g).to_le_bytes());
            }
        }
        let gemm = Awq {
            inputs: k as u64,
            outputs: n as u64,
            group_size: gs as u64,
            gemv: false,
            zero_words: 0,
            scales: DType::F32,
        };
        // the second run of 8 rows, cut out of the parts as the reader does
        let ws = super::super::cut(&gemm.windows(8, 8), &parts);
        let mut got = vec![0f32; 8 * k];
        gemm.decode(8, 8, &ws, &mut got);
        // GEMV: sequential nibbles along the input dimension
        let seq = |f: &dyn Fn(usize) -> u32, w: usize| {
            (0..8).fold(0u32, |a, j| a | f(8 * w + j) << (4 * j))
        };
        let mut v = [Vec::new(), Vec::new(), Vec::new()];
        for o in 0..n {
            for w in 0..k / 8 {
                v[0].extend(seq(&|i| q(o, i), w).to_le_bytes());
            }
            v[1].extend(seq(&|g| if g < groups { z(o, g) } else { 0 }, 0).to_le_bytes());
            for g in 0..8 {
                v[2].extend((if g < groups { s(o, g) } else { 0.0 }).to_le_bytes());
            }
        }
        let gemv = Awq {
            gemv: true,
            zero_words: 1,
            ..gemm
        };
        assert_eq!(
            gemv.part_bytes(),
            v.iter().map(|b| b.len() as u64).collect::<Vec<_>>()
        );
        let mut all = vec![0f32; n * k];
        gemv.decode(0, n as u64, &v, &mut all);
        for r in 0..8 {
            for i in 0..k {
                let (o, g) = (8 + r, i / gs);
                let want = s(o, g) * (q(o, i) as f32 - z(o, g) as f32);
                assert_eq!(got[r * k + i], want, "gemm row {o} input {i}");
                assert_eq!(all[o * k + i], want, "gemv row {o} input {i}");
            }
        }
    }
}
