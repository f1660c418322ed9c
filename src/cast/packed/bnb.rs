//! bitsandbytes serialized weights (NF4/FP4 4-bit with absmax, int8 with `SCB`), as
//! transformers' `save_pretrained` writes a model loaded with `BitsAndBytesConfig`, dequantized
//! as bitsandbytes 0.50.2 does on the CPU.

use super::{Scheme, Window};

/// bitsandbytes' NF4 code (`backends/utils.py` `_NF4_QUANT_TABLE`), as f32 bits.
const NF4: [u32; 16] = [
    0xbf80_0000,
    0xbf32_39b1,
    0xbf06_6b30,
    0xbeca_32a0,
    0xbe91_a24d,
    0xbe3d_353f,
    0xbdba_7871,
    0x0000_0000,
    0x3da2_faff,
    0x3e24_cae3,
    0x3e7c_04dd,
    0x3ead_033a,
    0x3ee1_a4b8,
    0x3f10_07ab,
    0x3f39_13b3,
    0x3f80_0000,
];

/// bitsandbytes' own FP4 code (`get_4bit_type("fp4")`: `[0, 0.0625, 8, 12, 4, 6, 2, 3, -0, ...]
/// / 12`, not E2M1's order), as f32 bits; code 8 is +0.0 there (the integer `-0`), -0.0 in the
/// native kernels (see [`code`]).
const FP4: [u32; 16] = [
    0x0000_0000,
    0x3baa_aaab,
    0x3f2a_aaab,
    0x3f80_0000,
    0x3eaa_aaab,
    0x3f00_0000,
    0x3e2a_aaab,
    0x3e80_0000,
    0x0000_0000,
    0xbbaa_aaab,
    0xbf2a_aaab,
    0xbf80_0000,
    0xbeaa_aaab,
    0xbf00_0000,
    0xbe2a_aaab,
    0xbe80_0000,
];

/// The factor `int8_vectorwise_dequant` multiplies by: `7.874015718698502e-3` (1/127) as the
/// f32 torch rounds the Python scalar to.
const INV_127: u32 = 0x3c01_0204;

/// Bytes of the stored 4-bit code (`quant_map`, 16 f32) and nested code (`nested_quant_map`,
/// 256 f32).
const QUANT_MAP_BYTES: u64 = 16 * 4;
const NESTED_MAP_BYTES: u64 = 256 * 4;

/// A bitsandbytes weight `[rows, cols]`.
///
/// 4-bit (`Params4bit`): parts `X.weight` (the flattened weight's codes, two a byte, element
/// `2i` in the HIGH nibble), `X.weight.absmax` (one per `blocksize` consecutive elements of the
/// flattened weight, blocks spanning rows, the last one partial; f32, or uint8 codes when
/// double-quantized), `X.weight.quant_map`, `X.weight.quant_state.bitsandbytes__nf4|fp4` (JSON;
/// neither read here), and when double-quantized `X.weight.nested_absmax` (f32, one per
/// `nested_blocksize` absmax codes) and `X.weight.nested_quant_map` (256 f32). As
/// `functional.dequantize_4bit` computes (`backends/default/ops.py`, the native CPU kernel gives
/// the same bits but for the sign of FP4 zeros, see [`code`]): when double-quantized,
/// `absmax[j] = nested_quant_map[code[j]] * nested_absmax[j / nested_blocksize] +
/// nested_offset` in f32; then `W[i] = CODE[nibble(i)] * absmax[i / blocksize]` in f32 with the
/// built-in code table (the stored `quant_map` is not used), rounded once to the JSON's `dtype`.
///
/// int8 (`Int8Params`, LLM.int8 row format): parts `X.weight` int8, `X.SCB` f32 (one per row)
/// and, when stored, `X.weight_format` (checked to be 0, row, when found). As
/// `int8_vectorwise_dequant` computes: `(f32(q) * SCB[row]) * f32(1/127)`, an f32.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bnb {
    /// Output rows (the weight's first dimension).
    pub rows: u64,
    /// Values per row.
    pub cols: u64,
    /// The format and its parameters.
    pub kind: Kind,
}

/// The two bitsandbytes weight formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// NF4 or FP4 codes in blocks.
    Four {
        /// bitsandbytes' FP4 code, else NF4.
        fp4: bool,
        /// Elements per absmax.
        blocksize: u64,
        /// Bytes of the quant_state JSON part.
        state_bytes: u64,
        /// Double quantization of the absmax.
        nested: Option<Nested>,
    },
    /// LLM.int8 rows.
    Int8 {
        /// A `weight_format` part is stored.
        format_part: bool,
    },
}

/// Double quantization: the absmax stored as uint8 codes of `nested_quant_map`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nested {
    /// Absmax codes per `nested_absmax` value.
    pub blocksize: u64,
    /// `nested_offset`, as f32 bits.
    pub offset: u32,
}

impl Bnb {
    /// Values in all.
    fn numel(&self) -> u64 {
        self.rows * self.cols
    }
}

impl Scheme for Bnb {
    fn shape(&self) -> Vec<u64> {
        vec![self.rows, self.cols]
    }

    fn part_bytes(&self) -> Vec<u64> {
        let n = self.numel();
        match self.kind {
            Kind::Four {
                blocksize,
                state_bytes,
                nested,
                ..
            } => {
                let blocks = n.div_ceil(blocksize);
                let mut v = vec![n.div_ceil(2)];
                match nested {
                    None => v.extend([blocks * 4, QUANT_MAP_BYTES, state_bytes]),
                    Some(d) => v.extend([
                        blocks,
                        QUANT_MAP_BYTES,
                        state_bytes,
                        blocks.div_ceil(d.blocksize) * 4,
                        NESTED_MAP_BYTES,
                    ]),
                }
                v
            }
            Kind::Int8 { format_part } => {
                let mut v = vec![n, self.rows * 4];
                if format_part {
                    v.push(1);
                }
                v
            }
        }
    }

    fn row_len(&self) -> u64 {
        self.cols
    }

    fn rows(&self) -> u64 {
        self.rows
    }

    fn row_unit(&self) -> u64 {
        // a run starts on an even element: a byte's two codes in one slab
        match self.kind {
            Kind::Four { .. } if self.cols % 2 == 1 => 2,
            _ => 1,
        }
    }

    fn windows(&self, row0: u64, rows: u64) -> Vec<Window> {
        match self.kind {
            Kind::Four {
                blocksize, nested, ..
            } => {
                let (e0, e1) = (row0 * self.cols, (row0 + rows) * self.cols);
                let (j0, j1) = (e0 / blocksize, e1.div_ceil(blocksize));
                let mut w = vec![
                    Window::rows(0, e0 / 2, e1.div_ceil(2) - e0 / 2, 1),
                    Window::rows(1, j0, j1 - j0, if nested.is_some() { 1 } else { 4 }),
                ];
                if let Some(d) = nested {
                    let (k0, k1) = (j0 / d.blocksize, j1.div_ceil(d.blocksize));
                    w.push(Window::rows(4, k0, k1 - k0, 4));
                    w.push(Window::rows(5, 0, 256, 4));
                }
                w
            }
            Kind::Int8 { .. } => vec![
                Window::rows(0, row0, rows, self.cols),
                Window::rows(1, row0, rows, 4),
            ],
        }
    }

    fn decode(&self, row0: u64, rows: u64, parts: &[Vec<u8>], out: &mut [f32]) {
        match self.kind {
            Kind::Four {
                fp4,
                blocksize,
                nested,
                ..
            } => {
                let (e0, e1) = (row0 * self.cols, (row0 + rows) * self.cols);
                let j0 = e0 / blocksize;
                let absmax = absmax(parts, j0, nested);
                let code = code(fp4, self.cols);
                let codes = &parts[0];
                for (jj, &a) in absmax.iter().enumerate() {
                    let j = j0 + jj as u64;
                    let (s, e) = ((j * blocksize).max(e0), ((j + 1) * blocksize).min(e1));
                    for i in s..e {
                        let byte = codes[(i / 2 - e0 / 2) as usize];
                        let nib = if i % 2 == 0 { byte >> 4 } else { byte & 15 };
                        out[(i - e0) as usize] = f32::from_bits(code[nib as usize]) * a;
                    }
                }
            }
            Kind::Int8 { .. } => {
                let cols = self.cols as usize;
                let inv = f32::from_bits(INV_127);
                for (r, scb) in parts[1].chunks_exact(4).enumerate().take(rows as usize) {
                    let s = f32::from_le_bytes(scb.try_into().expect("4 bytes"));
                    let q = &parts[0][r * cols..(r + 1) * cols];
                    for (o, &b) in out[r * cols..(r + 1) * cols].iter_mut().zip(q) {
                        *o = (b as i8 as f32 * s) * inv;
                    }
                }
            }
        }
    }
}

/// The 4-bit code a weight of `cols` columns is dequantized with on the CPU. bitsandbytes'
/// CPU backend (`backends/cpu/ops.py`) runs its native kernel
/// (`cdequantize_blockwise_cpu_fp4_*`, whose FP4 code 8 is -0.0, as in the CUDA kernel) when the
/// last dimension is even, and its pure-torch op with `get_4bit_type`'s table (code 8 +0.0) when
/// it is odd; only the sign of FP4 zeros differs. (On AVX-512 machines it also takes the torch
/// op for blocks of 2048 and more; the native kernel's sign is kept there.)
fn code(fp4: bool, cols: u64) -> [u32; 16] {
    if !fp4 {
        return NF4;
    }
    let mut c = FP4;
    if cols % 2 == 0 {
        c[8] = (-0.0f32).to_bits();
    }
    c
}

/// The f32 absmax of the blocks from `j0` the windows hold: stored as f32, or, double-quantized,
/// `nested_quant_map[code] * nested_absmax[j / nested_blocksize] + offset` in f32 (bitsandbytes'
/// `dequantize_blockwise`, then `absmax += offset`).
fn absmax(parts: &[Vec<u8>], j0: u64, nested: Option<Nested>) -> Vec<f32> {
    let f32s = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()
    };
    let Some(d) = nested else {
        return f32s(&parts[1]);
    };
    let (scales, map) = (f32s(&parts[2]), f32s(&parts[3]));
    let k0 = j0 / d.blocksize;
    let offset = f32::from_bits(d.offset);
    parts[1]
        .iter()
        .enumerate()
        .map(|(jj, &c)| {
            let k = ((j0 + jj as u64) / d.blocksize - k0) as usize;
            map[c as usize] * scales[k] + offset
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes every value of `b` in runs of `per` row units, windows cut from the whole parts.
    fn decode_all(b: &Bnb, per: u64, parts: &[Vec<u8>]) -> Vec<f32> {
        let mut all = Vec::new();
        let step = per * b.row_unit();
        let mut row0 = 0;
        while row0 < b.rows {
            let rows = step.min(b.rows - row0);
            let cut: Vec<Vec<u8>> = b
                .windows(row0, rows)
                .iter()
                .map(|w| {
                    assert_eq!(w.bytes, w.row_bytes);
                    let s = (w.row0 * w.row_bytes) as usize;
                    parts[w.part][s..s + (w.rows * w.row_bytes) as usize].to_vec()
                })
                .collect();
            let mut out = vec![f32::NAN; (rows * b.cols) as usize];
            b.decode(row0, rows, &cut, &mut out);
            all.extend(out);
            row0 += rows;
        }
        all
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// A small deterministic byte sequence.
    fn bytes(n: usize, seed: u32) -> Vec<u8> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s >> 8) as u8
            })
            .collect()
    }

    #[test]
    fn four_bit_blocks_span_rows_and_nibbles_are_high_first() {
        // odd rows of 5 columns: blocks of 4 span rows, the last block is partial
        for (rows, cols, bs) in [(7u64, 5u64, 4u64), (3, 64, 64), (5, 3, 32), (1, 9, 2)] {
            for nested in [false, true] {
                let n = rows * cols;
                let blocks = n.div_ceil(bs);
                let payload = bytes(n.div_ceil(2) as usize, 1);
                let nbs = 3u64;
                let nmap: Vec<f32> = (0..256).map(|i| (i as f32 - 100.0) / 37.0).collect();
                let nabs: Vec<f32> = (0..blocks.div_ceil(nbs)).map(|k| 0.5 + k as f32).collect();
                let offset = 0.052_281_856_f32;
                let (absmax_part, absmax): (Vec<u8>, Vec<f32>) = if nested {
                    let c = bytes(blocks as usize, 2);
                    let a = c
                        .iter()
                        .enumerate()
                        .map(|(j, &c)| nmap[c as usize] * nabs[j / nbs as usize] + offset)
                        .collect();
                    (c, a)
                } else {
                    let a: Vec<f32> = (0..blocks).map(|j| 0.25 + j as f32 * 1.5).collect();
                    (f32_bytes(&a), a)
                };
                let kind = Kind::Four {
                    fp4: nested,
                    blocksize: bs,
                    state_bytes: 7,
                    nested: nested.then_some(Nested {
                        blocksize: nbs,
                        offset: offset.to_bits(),
                    }),
                };
                let b = Bnb { rows, cols, kind };
                let parts = vec![
                    payload.clone(),
                    absmax_part,
                    vec![0; 64],
                    vec![0; 7],
                    f32_bytes(&nabs),
                    f32_bytes(&nmap),
                ];
                for (w, part) in b.part_bytes().iter().zip(&parts) {
                    assert_eq!(*w, part.len() as u64);
                }
                let code = code(nested, cols);
                let want: Vec<f32> = (0..n as usize)
                    .map(|i| {
                        let b = payload[i / 2];
                        let nib = if i % 2 == 0 { b >> 4 } else { b & 15 };
                        f32::from_bits(code[nib as usize]) * absmax[i / bs as usize]
                    })
                    .collect();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                for per in [1, 2, 3, rows] {
                    let got = decode_all(&b, per, &parts);
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "{rows}x{cols} blocks of {bs}, {per}"
                    );
                }
            }
        }
    }

    #[test]
    fn int8_rows_times_scb_times_inverse_127() {
        let (rows, cols) = (5u64, 3u64);
        let q = bytes((rows * cols) as usize, 3);
        let scb = [1.5f32, 127.0, 0.1, -2.0, 3.25];
        let b = Bnb {
            rows,
            cols,
            kind: Kind::Int8 { format_part: true },
        };
        assert_eq!(b.part_bytes(), vec![15, 20, 1]);
        let got = decode_all(&b, 2, &[q.clone(), f32_bytes(&scb), vec![0]]);
        for (i, g) in got.iter().enumerate() {
            let want = (q[i] as i8 as f32 * scb[i / cols as usize]) * f32::from_bits(0x3c01_0204);
            assert_eq!(g.to_bits(), want.to_bits());
        }
        assert_eq!(f32::from_bits(INV_127), 7.874_015_718_698_502e-3_f64 as f32);
    }

    #[test]
    fn fp4_zero_sign_follows_the_cpu_path() {
        assert_eq!(code(true, 100)[8], 0x8000_0000);
        assert_eq!(code(true, 203)[8], 0);
        assert_eq!(code(false, 100), NF4);
    }

    #[test]
    fn fp4_code_is_bitsandbytes_table() {
        // `get_4bit_type("fp4")`: the integers, over their largest magnitude in f32; `-0` is
        // the integer 0 there, so +0.0
        let t = [0.0f32, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0];
        for (i, v) in t.iter().enumerate() {
            assert_eq!(FP4[i], (v / 12.0).to_bits());
            let neg = if i == 0 { 0.0 } else { -v / 12.0 };
            assert_eq!(FP4[i + 8], neg.to_bits());
        }
    }
}
