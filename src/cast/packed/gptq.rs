//! GPTQ packed integer weights (`qweight`, `qzeros`, `scales`, `g_idx`), as gptqmodel 7.7
//! (what transformers loads GPTQ checkpoints with) dequantizes them.

use super::{le, Scheme, Window};
use crate::dtype::DType;

/// A GPTQ Linear as gptqmodel's `TorchLinear.dequantize_weight` computes it
/// (`nn_modules/qlinear/__init__.py`):
/// `scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])` in the scales' dtype (the integer
/// difference is exact, the product rounds once), transposed to the `nn.Linear` weight
/// `[out, in]`.
///
/// Parts, in order: `qweight` int32 `[ceil(in * bits / 32), out]` (packed along the input
/// dimension), `qzeros` int32 `[groups, ceil(out * bits / 32)]` (packed along the output
/// dimension), `scales` `[groups, out]`, and `g_idx` `[in]` when the checkpoint has one (else
/// `k / group_size`). Each column of `qweight` and each row of `qzeros` is a little-endian bit
/// stream: value `i` at bits `i * bits ..` (for 3 bits, 32 values in 3 words, two of them
/// straddling words, as gptqmodel's 3-bit unpacking reads them).
///
/// Zero points: gptqmodel computes with "v2" zeros; a `format: gptq` (v1) checkpoint stores
/// `z - 1`, which `convert_gptq_v1_to_v2_format_module` undoes by adding `0x55555555`
/// (2-bit), `0x11111111` (4-bit) or `0x01010101` (8-bit) to each packed word, wrapping, carries
/// crossing fields as they do there; 3-bit zeros are shifted per field, `(z + 1) & 7`
/// (`_correct_gptq_v1_qzeros`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gptq {
    /// Bits per value: 2, 3, 4 or 8.
    pub bits: u32,
    /// Input features (K): the values per output row.
    pub inputs: u64,
    /// Output features (N): the output rows.
    pub outputs: u64,
    /// Groups: rows of `scales` and `qzeros`.
    pub groups: u64,
    /// The group size that gives a value's group when there is no `g_idx` (`k / group_size`).
    pub group_size: u64,
    /// Zero points stored as v1 (`z - 1`).
    pub v1: bool,
    /// The dtype of `scales` (the values' dtype).
    pub scales: DType,
    /// The dtype of `g_idx` (I32 or I64), when there is one.
    pub g_idx: Option<DType>,
}

impl Gptq {
    /// Packed `qweight` rows: `ceil(in * bits / 32)`.
    pub fn packed_rows(&self) -> u64 {
        (self.inputs * self.bits as u64).div_ceil(32)
    }

    /// Words per `qzeros` row: `ceil(out * bits / 32)`.
    pub fn zero_words(&self) -> u64 {
        (self.outputs * self.bits as u64).div_ceil(32)
    }

    fn scale_bytes(&self) -> u64 {
        (self.scales.bitsize() / 8) as u64
    }

    /// The v1 -> v2 constant added to each packed zero word (2, 4 and 8 bits).
    fn v1_word(&self) -> u32 {
        match self.bits {
            2 => 0x5555_5555,
            4 => 0x1111_1111,
            8 => 0x0101_0101,
            _ => 0,
        }
    }

    /// The v2 zero points of output rows `row0..row0 + rows`, per group (`[groups, rows]`),
    /// from the `qzeros` window (whole words, the first holding row `row0`'s zero).
    fn zeros(&self, rows: usize, window: &[u8]) -> Vec<i32> {
        let groups = self.groups as usize;
        let words = window.len() / 4 / groups.max(1);
        let mut z = vec![0i32; groups * rows];
        let mut row = vec![0u32; words];
        for (g, zg) in z.chunks_exact_mut(rows.max(1)).enumerate().take(groups) {
            for (j, w) in row.iter_mut().enumerate() {
                *w = le(window, (g * words + j) * 4, 4) as u32;
                if self.v1 {
                    *w = w.wrapping_add(self.v1_word());
                }
            }
            for (r, v) in zg.iter_mut().enumerate() {
                let f = field(&row, r, self.bits);
                *v = if self.v1 && self.bits == 3 {
                    ((f + 1) & 7) as i32
                } else {
                    f as i32
                };
            }
        }
        z
    }

    /// Each input's group (`g_idx`, or `k / group_size`); `u64::MAX` where `g_idx` names no
    /// group (refused by `check` before any value is decoded).
    fn groups_of(&self, window: Option<&Vec<u8>>) -> Vec<u64> {
        let k = self.inputs as usize;
        match (self.g_idx, window) {
            (Some(d), Some(b)) => {
                let w = d.bitsize() / 8;
                (0..k)
                    .map(|i| {
                        // sign-extend, then anything outside 0..groups names no group
                        let v = le(b, i * w, w);
                        let v = if w == 4 {
                            v as u32 as i32 as i64
                        } else {
                            v as i64
                        };
                        if v >= 0 && (v as u64) < self.groups {
                            v as u64
                        } else {
                            u64::MAX
                        }
                    })
                    .collect()
            }
            _ => (0..k as u64).map(|i| i / self.group_size.max(1)).collect(),
        }
    }
}

/// Value `i` (`bits` wide) of the little-endian bit stream `words`.
#[inline]
fn field(words: &[u32], i: usize, bits: u32) -> u32 {
    let bit = i * bits as usize;
    let (w, off) = (bit / 32, (bit % 32) as u32);
    let mut v = (words[w] as u64) >> off;
    if off + bits > 32 {
        v |= (words[w + 1] as u64) << (32 - off);
    }
    (v & ((1u64 << bits) - 1)) as u32
}

impl Scheme for Gptq {
    fn shape(&self) -> Vec<u64> {
        vec![self.outputs, self.inputs]
    }

    fn part_bytes(&self) -> Vec<u64> {
        let mut v = vec![
            self.packed_rows() * self.outputs * 4,
            self.groups * self.zero_words() * 4,
            self.groups * self.outputs * self.scale_bytes(),
        ];
        if let Some(d) = self.g_idx {
            v.push(self.inputs * (d.bitsize() / 8) as u64);
        }
        v
    }

    fn row_len(&self) -> u64 {
        self.inputs
    }

    fn rows(&self) -> u64 {
        self.outputs
    }

    fn row_unit(&self) -> u64 {
        // runs of rows start on whole zero words (3 bits: 32 values in 3 words)
        if self.bits == 3 {
            32
        } else {
            32 / self.bits as u64
        }
    }

    fn windows(&self, row0: u64, rows: u64) -> Vec<Window> {
        let b = self.bits as u64;
        let es = self.scale_bytes();
        let (w0, w1) = (row0 * b / 32, ((row0 + rows) * b).div_ceil(32));
        let mut v = vec![
            Window {
                part: 0,
                row0: 0,
                rows: self.packed_rows(),
                row_bytes: self.outputs * 4,
                byte0: row0 * 4,
                bytes: rows * 4,
            },
            Window {
                part: 1,
                row0: 0,
                rows: self.groups,
                row_bytes: self.zero_words() * 4,
                byte0: w0 * 4,
                bytes: (w1 - w0) * 4,
            },
            Window {
                part: 2,
                row0: 0,
                rows: self.groups,
                row_bytes: self.outputs * es,
                byte0: row0 * es,
                bytes: rows * es,
            },
        ];
        if let Some(d) = self.g_idx {
            v.push(Window::rows(
                3,
                0,
                1,
                self.inputs * (d.bitsize() / 8) as u64,
            ));
        }
        v
    }

    fn check(&self, parts: &[Vec<u8>]) -> Result<(), String> {
        if self.g_idx.is_some() {
            if let Some(k) = self
                .groups_of(parts.get(3))
                .iter()
                .position(|&g| g == u64::MAX)
            {
                return Err(format!(
                    "g_idx[{k}] names no group of the {} its scales hold",
                    self.groups
                ));
            }
        }
        Ok(())
    }

    fn decode(&self, _row0: u64, rows: u64, parts: &[Vec<u8>], out: &mut [f32]) {
        let (rows, k) = (rows as usize, self.inputs as usize);
        let z = self.zeros(rows, &parts[1]);
        let mut s = vec![0f32; self.groups as usize * rows];
        crate::cast::decode_f32_slice(self.scales, &parts[2], &mut s);
        let group = self.groups_of(parts.get(3));
        let packed = self.packed_rows() as usize;
        let mut col = vec![0u32; packed];
        for (r, o) in out.chunks_exact_mut(k.max(1)).enumerate().take(rows) {
            // output row r is column r of the qweight window: one bit stream down the column
            for (p, w) in col.iter_mut().enumerate() {
                *w = le(&parts[0], (p * rows + r) * 4, 4) as u32;
            }
            for (i, v) in o.iter_mut().enumerate() {
                let g = group[i];
                *v = if g == u64::MAX {
                    f32::NAN
                } else {
                    let at = g as usize * rows + r;
                    s[at] * (field(&col, i, self.bits) as i32 - z[at]) as f32
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cast::packed::Packing;

    /// Packs `vals` (each `bits` wide) as a little-endian bit stream of u32 words.
    fn pack(vals: &[u32], bits: u32) -> Vec<u32> {
        let mut w = vec![0u32; (vals.len() * bits as usize).div_ceil(32)];
        for (i, &v) in vals.iter().enumerate() {
            let bit = i * bits as usize;
            let (j, off) = (bit / 32, bit % 32);
            w[j] |= v << off;
            if off + bits as usize > 32 {
                w[j + 1] |= v >> (32 - off);
            }
        }
        w
    }

    #[test]
    fn v1_zeros_borrow_as_gptqmodel() {
        // the spec's example: v2 [0,5,15,0,0,7,8,1] is stored (word - 0x11111111) as
        // [15,3,14,15,14,5,7,0]; adding the constant back restores v2 exactly
        let g = Gptq {
            bits: 4,
            inputs: 8,
            outputs: 8,
            groups: 1,
            group_size: 8,
            v1: true,
            scales: DType::F16,
            g_idx: None,
        };
        let stored = pack(&[15, 3, 14, 15, 14, 5, 7, 0], 4)[0];
        assert_eq!(
            g.zeros(8, &stored.to_le_bytes()),
            vec![0, 5, 15, 0, 0, 7, 8, 1]
        );
    }

    #[test]
    fn three_bit_stream_and_slabs() {
        // 64 outputs x 40 inputs, 3 bits, two groups of 20, v2 zeros
        let (n, k, groups) = (64usize, 40usize, 2usize);
        let g = Gptq {
            bits: 3,
            inputs: k as u64,
            outputs: n as u64,
            groups: groups as u64,
            group_size: 20,
            v1: false,
            scales: DType::F32,
            g_idx: None,
        };
        let q: Vec<u32> = (0..k * n).map(|i| (i * 7 % 8) as u32).collect(); // [k, n]
        let z: Vec<u32> = (0..groups * n).map(|i| (i % 5) as u32).collect(); // [g, n]
        let s: Vec<f32> = (0..groups * n).map(|i| 0.5 + i as f32).collect();
        let packed_rows = g.packed_rows() as usize;
        let mut qweight = vec![0u32; packed_rows * n];
        for c in 0..n {
            let col: Vec<u32> = (0..k).map(|i| q[i * n + c]).collect();
            for (p, w) in pack(&col, 3).into_iter().enumerate() {
                qweight[p * n + c] = w;
            }
        }
        let qzeros: Vec<u32> = (0..groups)
            .flat_map(|gi| pack(&z[gi * n..(gi + 1) * n], 3))
            .collect();
        let bytes = |v: &[u32]| -> Vec<u8> { v.iter().flat_map(|w| w.to_le_bytes()).collect() };
        let parts = [
            bytes(&qweight),
            bytes(&qzeros),
            s.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
        ];
        let p = Packing::Gptq(g);
        assert_eq!(
            p.part_bytes(),
            parts.iter().map(|b| b.len() as u64).collect::<Vec<_>>()
        );
        // runs of 32 rows (one 3-word zero unit each), windows cut out of the whole parts
        let mut got = Vec::new();
        for row0 in [0u64, 32] {
            let ws = super::super::cut(&g.windows(row0, 32), &parts);
            let mut out = vec![0f32; 32 * k];
            g.decode(row0, 32, &ws, &mut out);
            got.extend(out);
        }
        for o in 0..n {
            for i in 0..k {
                let gi = i / 20;
                let want = s[gi * n + o] * (q[i * n + o] as f32 - z[gi * n + o] as f32);
                assert_eq!(got[o * k + i], want, "row {o} input {i}");
            }
        }
    }
}
