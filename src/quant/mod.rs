//! Scaled (quantized) weights: FP8 payloads stored with scales beside them (DeepSeek / vLLM
//! `fp8` block scales, compressed-tensors `float-quantized`, ModelOpt, fbgemm, ComfyUI
//! `fp8_scaled`). A payload's values are only its values times its scale, so weightcast never
//! casts one as if it were plain: [`detect`] finds the scheme from the config files, the
//! safetensors metadata and the tensor names; the plan dequantizes each payload with its
//! [`ScaleTable`] (or keeps payload and scale together), and the scale tensors leave the output
//! with the scheme's configuration.

mod detect;
pub mod fp4;
mod packed;
pub mod quantize;

pub use detect::{as_stored, detect};

use crate::cast;
use crate::catalogue::Catalogue;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::source::Sources;

/// Largest scale tensor read into memory (a block scale of a 1M x 1M weight at 128x128 is 64M
/// values; the payload it scales would be a TB).
const MAX_SCALE_VALUES: u64 = 1 << 28;

pub use crate::catalogue::quant::{Declared, Quantization, Role, ScaleLayout, Scaled};

/// What to do with a quantized input (`--on-quantized`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnQuantized {
    /// Dequantize every payload with its scale; scales and the scheme's config leave.
    #[default]
    Dequantize,
    /// Pass payloads and scales through untouched, the config kept.
    Keep,
}

impl std::str::FromStr for OnQuantized {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "dequantize" => Ok(OnQuantized::Dequantize),
            "keep" => Ok(OnQuantized::Keep),
            _ => Err(format!(
                "`{s}` is not a choice: dequantize (the default) or keep"
            )),
        }
    }
}

/// The values of one scale tensor, ready to dequantize its payload chunk by chunk.
#[derive(Debug, Clone)]
pub struct ScaleTable {
    /// How the scale covers the payload.
    pub layout: ScaleLayout,
    /// Columns of the payload (its last dimension; 1 for 0-d and 1-D per-tensor payloads).
    pub cols: u64,
    /// Columns of the scale grid (block layout).
    pub scale_cols: u64,
    /// The scale values, widened exactly to f32.
    pub values: Vec<f32>,
    /// The dtype the product is rounded to: the scale's own dtype, as the references compute
    /// (`q.to(scale.dtype) * scale`; DeepSeek's `weight_dequant` in f32 with its f32 scales).
    pub compute: DType,
}

impl ScaleTable {
    /// Reads the scale of `s` from `sources`.
    pub fn load(cat: &Catalogue, sources: &Sources<'_>, s: &Scaled) -> Result<ScaleTable> {
        let (p, t) = (&cat.tensors[s.payload], &cat.tensors[s.scale]);
        if !matches!(t.dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::invalid(
                sources.path_of(t),
                format!(
                    "scale `{}` is {}: weightcast dequantizes with f32, bf16 or f16 scales",
                    t.name, t.dtype
                ),
            ));
        }
        if t.numel() > MAX_SCALE_VALUES || t.numel() > p.numel().max(1) {
            return Err(Error::invalid(
                sources.path_of(t),
                format!(
                    "scale `{}` has {} values for {} payload values",
                    t.name,
                    t.numel(),
                    p.numel()
                ),
            ));
        }
        let mut raw = vec![0u8; t.nbytes as usize];
        sources.read(t, 0, &mut raw)?;
        let mut values = vec![0f32; t.numel() as usize];
        cast::decode_f32_slice(t.dtype, &raw, &mut values);
        let cols = if p.shape.len() >= 2 {
            *p.shape.last().expect("2-D")
        } else {
            1
        };
        let scale_cols = match s.layout {
            ScaleLayout::Block(_, bc) => cols.div_ceil(bc),
            _ => 1,
        };
        Ok(ScaleTable {
            layout: s.layout,
            cols,
            scale_cols,
            values,
            compute: t.dtype,
        })
    }

    /// Calls `f(range, scale)` for each maximal run of elements `first..first + n` (as
    /// offsets `0..n`) that share one scale.
    #[inline]
    pub fn runs(&self, first: u64, n: usize, mut f: impl FnMut(std::ops::Range<usize>, f32)) {
        if self.layout == ScaleLayout::Tensor {
            f(0..n, self.values[0]);
            return;
        }
        let mut k = 0usize;
        let mut e = first;
        while k < n {
            let (row, col) = (e / self.cols, e % self.cols);
            let (len, s) = match self.layout {
                ScaleLayout::Block(br, bc) => (
                    (bc - col % bc).min(self.cols - col),
                    self.values[(row / br * self.scale_cols + col / bc) as usize],
                ),
                _ => (self.cols - col, self.values[row as usize]),
            };
            let len = (len as usize).min(n - k);
            f(k..k + len, s);
            k += len;
            e += len as u64;
        }
    }

    /// Dequantizes payload elements `first..` (the bytes `q`, of `from`) into `out`: each value
    /// widened to f32, times its scale in f32 (exact for fp8 times a 16-bit scale; the rounding
    /// torch does for f32 scales), rounded to [`ScaleTable::compute`]. `out` holds the same
    /// count of `compute` elements.
    pub fn dequantize(&self, from: DType, q: &[u8], first: u64, out: &mut [u8]) {
        SCRATCH.with(|s| {
            let vals = &mut s.borrow_mut().0;
            self.dequantize_f32(from, q, first, vals);
            cast::encode_f32_slice(self.compute, vals, out);
        })
    }

    /// Dequantizes into f32 values (the products, before rounding to `compute`).
    fn dequantize_f32(&self, from: DType, q: &[u8], first: u64, vals: &mut Vec<f32>) {
        vals.resize(q.len(), 0.0);
        cast::decode_f32_slice(from, q, vals);
        self.runs(first, q.len(), |r, s| {
            vals[r].iter_mut().for_each(|v| *v *= s);
        });
    }
}

thread_local! {
    /// Per-thread scratch for the (de)quantizing kernels: f32 values and intermediate bytes.
    pub(crate) static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<u8>)> = Default::default();
}

impl ScaleTable {
    /// Dequantizes like [`ScaleTable::dequantize`], then casts to `to` (`out` holds `to`
    /// elements); returns how many values left `to`'s range.
    pub fn dequantize_to(
        &self,
        from: DType,
        q: &[u8],
        first: u64,
        to: DType,
        out: &mut [u8],
        range: cast::Range,
    ) -> std::result::Result<u64, cast::CastError> {
        if to == self.compute {
            self.dequantize(from, q, first, out);
            return Ok(0);
        }
        SCRATCH.with(|s| {
            let (vals, mid) = &mut *s.borrow_mut();
            self.dequantize_f32(from, q, first, vals);
            if self.compute == DType::F32 && to.is_castable() {
                // The products are already f32: one pass to the target, counting (or
                // clamping) what leaves its range as the cast kernels do.
                let mut count = 0u64;
                if range != cast::Range::Ignore {
                    let t = cast::overflow_threshold(to);
                    let max = to.max_finite().unwrap_or(f64::MAX) as f32;
                    for v in vals.iter_mut() {
                        if v.is_finite() && v.abs() >= t {
                            count += 1;
                            if range == cast::Range::Clamp {
                                *v = max.copysign(*v);
                            }
                        }
                    }
                }
                cast::encode_f32_slice(to, vals, out);
                return Ok(count);
            }
            mid.resize(q.len() * (self.compute.bitsize() / 8), 0);
            cast::encode_f32_slice(self.compute, vals, mid);
            cast::cast_checked(self.compute, to, mid, out, range)
        })
    }
}

/// The dtypes a payload can be stored in for weightcast to dequantize it.
pub fn is_payload_dtype(d: DType) -> bool {
    matches!(d, DType::F8E4M3 | DType::F8E5M2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Element by element, the way the references index scales.
    fn naive(t: &ScaleTable, q: &[u8], rows: u64) -> Vec<f32> {
        let mut out = Vec::new();
        for r in 0..rows {
            for c in 0..t.cols {
                let s = match t.layout {
                    ScaleLayout::Tensor => t.values[0],
                    ScaleLayout::Channel => t.values[r as usize],
                    ScaleLayout::Block(br, bc) => {
                        t.values[(r / br * t.scale_cols + c / bc) as usize]
                    }
                };
                out.push(cast::fp8::e4m3_to_f32(q[(r * t.cols + c) as usize]) * s);
            }
        }
        out
    }

    #[test]
    fn dequantize_matches_element_indexing_from_any_chunk_start() {
        let (rows, cols) = (5u64, 7u64);
        let q: Vec<u8> = (0..rows * cols).map(|i| (i * 37 % 120) as u8).collect();
        for layout in [
            ScaleLayout::Tensor,
            ScaleLayout::Channel,
            ScaleLayout::Block(2, 3),
        ] {
            let scale_cols = match layout {
                ScaleLayout::Block(_, bc) => cols.div_ceil(bc),
                _ => 1,
            };
            let n = match layout {
                ScaleLayout::Tensor => 1,
                ScaleLayout::Channel => rows,
                ScaleLayout::Block(br, _) => rows.div_ceil(br) * scale_cols,
            };
            let t = ScaleTable {
                layout,
                cols,
                scale_cols,
                values: (0..n).map(|i| 0.5 + i as f32 * 0.25).collect(),
                compute: DType::F32,
            };
            let want = naive(&t, &q, rows);
            for split in [1usize, 4, 7, 11, 35] {
                let mut got = Vec::new();
                for (k, chunk) in q.chunks(split).enumerate() {
                    let mut out = vec![0u8; chunk.len() * 4];
                    t.dequantize(DType::F8E4M3, chunk, (k * split) as u64, &mut out);
                    got.extend(
                        out.chunks(4)
                            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                    );
                }
                assert_eq!(got, want, "{layout:?} in chunks of {split}");
            }
        }
    }
}
