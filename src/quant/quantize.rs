//! Writing scaled FP8: scales computed from the weights alone (weights-only, no calibration
//! data; activations quantized dynamically by the engine), in the layouts serving engines
//! load:
//! - compressed-tensors `float-quantized` (what llm-compressor's FP8_DYNAMIC and FP8_BLOCK
//!   presets write): `X.weight_scale` in the weight's dtype, the quotient rounded to the
//!   weight's dtype before the FP8 cast, exactly as `compressed_tensors` quantizes;
//! - vLLM's native `fp8` block format (DeepSeek-V3 layout): `X.weight_scale_inv` in f32.
//!
//! Which tensors: the 2-D weights of linear layers. Embeddings, the output head, norms, biases
//! and MoE router gates are kept, as llm-compressor does by default; rules naming f8e4m3
//! explicitly override the choice.

use serde_json::{json, Value};

use super::{ScaleLayout, ScaleTable};
use crate::cast;
use crate::catalogue::{Catalogue, TensorEntry};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::plan::{Plan, ScaledOut, TensorPlan};
use crate::rules::Kind;
use crate::source::Sources;

/// The largest e4m3fn value: quotients are clamped to +-448 before the cast, as the
/// references do.
const FP8_MAX: f32 = 448.0;

/// The file layout written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// compressed-tensors `float-quantized` (`weight_scale` in the weight's dtype).
    CompressedTensors,
    /// vLLM's / DeepSeek's `fp8` (`weight_scale_inv` in f32, `weight_block_size`).
    Fp8,
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Format> {
        match s {
            "compressed-tensors" => Ok(Format::CompressedTensors),
            "fp8" | "vllm-fp8" => Ok(Format::Fp8),
            _ => Err(Error::usage(format!(
                "--scale-format {s}: use compressed-tensors (the default) or fp8 (vLLM/DeepSeek \
                 block scales)"
            ))),
        }
    }
}

/// How weights are scaled and written (`--scale`, `--scale-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheme {
    /// One scale per tensor, per output channel or per block.
    pub layout: ScaleLayout,
    /// The file layout.
    pub format: Format,
}

impl Scheme {
    /// Parses `--scale tensor|channel|block[:RxC]` with a format.
    pub fn parse(scale: &str, format: Format) -> Result<Scheme> {
        let layout = match scale {
            "tensor" => ScaleLayout::Tensor,
            "channel" => ScaleLayout::Channel,
            "block" => ScaleLayout::Block(128, 128),
            s => {
                let dims = s.strip_prefix("block:").and_then(|d| {
                    let (r, c) = d.split_once('x')?;
                    Some((r.parse::<u64>().ok()?, c.parse::<u64>().ok()?))
                });
                match dims {
                    Some((r, c)) if r > 0 && c > 0 => ScaleLayout::Block(r, c),
                    _ => {
                        return Err(Error::usage(format!(
                            "--scale {s}: use tensor, channel, block or block:RxC (e.g. \
                             block:128x128)"
                        )))
                    }
                }
            }
        };
        if format == Format::Fp8 && !matches!(layout, ScaleLayout::Block(..)) {
            return Err(Error::usage(
                "--scale-format fp8 writes block scales (vLLM's and DeepSeek's layout): use \
                 --scale block, or compressed-tensors for tensor and channel scales",
            ));
        }
        Ok(Scheme { layout, format })
    }

    /// The scale's dtype for weights of `weight`.
    pub fn scale_dtype(&self, weight: DType) -> DType {
        match self.format {
            Format::CompressedTensors => weight,
            Format::Fp8 => DType::F32,
        }
    }

    /// The name of the scale of payload `name` (`X.weight` -> `X.weight_scale`).
    pub fn scale_name(&self, name: &str) -> String {
        match self.format {
            Format::CompressedTensors => format!("{name}_scale"),
            Format::Fp8 => format!("{name}_scale_inv"),
        }
    }

    /// The scale tensor's shape for a `[out, in]` weight.
    pub fn scale_shape(&self, shape: &[u64]) -> Vec<u64> {
        match self.layout {
            ScaleLayout::Tensor => vec![1],
            ScaleLayout::Channel => vec![shape[0], 1],
            ScaleLayout::Block(r, c) => vec![shape[0].div_ceil(r), shape[1].div_ceil(c)],
        }
    }

    /// What `config.json`'s `quantization_config` says, with `ignore` the linear layers left
    /// unquantized: the same fields llm-compressor writes for its FP8_DYNAMIC / FP8_BLOCK
    /// presets (and FP8_DYNAMIC's dynamic activations for per-tensor weights), or vLLM's `fp8`.
    pub fn config(&self, ignore: &[String]) -> Value {
        match self.format {
            Format::Fp8 => {
                let ScaleLayout::Block(r, c) = self.layout else {
                    unreachable!("checked by Scheme::parse")
                };
                json!({
                    "quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                    "weight_block_size": [r, c], "ignored_layers": ignore,
                })
            }
            Format::CompressedTensors => {
                let args = |strategy: &str, block: Value, group: Value, dynamic: bool| {
                    json!({
                        "actorder": null, "block_structure": block, "dynamic": dynamic,
                        "group_size": group, "num_bits": 8,
                        "observer": if dynamic { Value::Null } else { json!("memoryless_minmax") },
                        "observer_kwargs": {}, "scale_dtype": null, "strategy": strategy,
                        "symmetric": true, "type": "float", "zp_dtype": null,
                    })
                };
                let (weights, inputs) = match self.layout {
                    ScaleLayout::Tensor => (
                        args("tensor", Value::Null, Value::Null, false),
                        args("token", Value::Null, Value::Null, true),
                    ),
                    ScaleLayout::Channel => (
                        args("channel", Value::Null, Value::Null, false),
                        args("token", Value::Null, Value::Null, true),
                    ),
                    ScaleLayout::Block(r, c) => (
                        args("block", json!([r, c]), Value::Null, false),
                        args("group", Value::Null, json!(c), true),
                    ),
                };
                json!({
                    "config_groups": {"group_0": {
                        "format": "float-quantized", "input_activations": inputs,
                        "output_activations": null, "targets": ["Linear"], "weights": weights,
                    }},
                    "format": "float-quantized", "global_compression_ratio": null,
                    "ignore": ignore, "kv_cache_scheme": null,
                    "quant_method": "compressed-tensors", "quantization_status": "compressed",
                    "sparsity_config": {}, "transform_config": {},
                })
            }
        }
    }
}

/// Whether `t` is the weight of a linear layer (what llm-compressor's `targets: Linear`
/// reaches): 2-D, named `*.weight`, not an embedding or the output head, not a MoE router
/// gate; a pickled module's class decides when known.
pub fn is_linear_weight(t: &TensorEntry) -> bool {
    if t.shape.len() != 2 || !t.name.ends_with("weight") {
        return false;
    }
    if let Some(c) = &t.module_class {
        return c.rsplit('.').next() == Some("Linear");
    }
    let lower = t.name.to_ascii_lowercase();
    !Kind::Embedding.matches(&t.name, &t.shape, None)
        && !lower.ends_with(".gate.weight")
        && !lower.contains("router")
}

/// The output head (a linear layer that llm-compressor leaves out by default).
fn is_head(t: &TensorEntry) -> bool {
    t.shape.len() == 2 && (t.name == "lm_head.weight" || t.name.ends_with(".lm_head.weight"))
}

/// Turns every 2-D linear weight the plan sends to f8e4m3 into a scaled payload and adds its
/// scale tensor to `cat` (appended) and to the plan (right after its payload). Tensors sent to
/// f8e4m3 by default that are not linear weights keep their dtype; a rule naming f8e4m3
/// forces any 2-D weight. The plan's `quant_config` lists the linear layers left unquantized
/// (the config's `ignore`).
pub fn plan_scaled(cat: &mut Catalogue, plan: &mut Plan, scheme: &Scheme) -> Result<()> {
    if let Some(q) = cat.quant.as_deref() {
        return Err(Error::usage(format!(
            "{}: already quantized ({}); convert it to bf16 (dequantize) before scaling it again",
            cat.path.display(),
            q.scheme
        )));
    }
    let mut out = Vec::with_capacity(plan.tensors().len());
    let mut ignore = Vec::new();
    for mut p in plan.tensors().to_vec() {
        let t = cat.tensors[p.tensor].clone();
        let linear = is_linear_weight(&t);
        let wanted = p.to == DType::F8E4M3 && p.is_cast();
        let weight_dtype = matches!(t.dtype, DType::F32 | DType::BF16 | DType::F16);
        let eligible = t.shape.len() == 2 && t.name.ends_with("weight") && weight_dtype;
        if !wanted || !(linear || (eligible && !p.by_default)) {
            if wanted {
                p.keep();
                p.reason = if p.by_default {
                    "not a linear layer's weight: kept (as llm-compressor keeps it)".into()
                } else {
                    "a scale needs a 2-D f32/bf16/f16 weight: kept".into()
                };
                p.by_default = false;
            }
            if linear || is_head(&t) {
                let module = t.name.strip_suffix(".weight").unwrap_or(&t.name);
                ignore.push(module.to_string());
            }
            out.push(p);
            continue;
        }
        if !weight_dtype {
            p.keep();
            p.reason = format!("a scale needs an f32, bf16 or f16 weight, not {}", t.dtype);
            out.push(p);
            continue;
        }
        if let (Format::Fp8, ScaleLayout::Block(r, c)) = (scheme.format, scheme.layout) {
            if t.shape[0] % r != 0 || t.shape[1] % c != 0 {
                plan.warnings.push(format!(
                    "`{}` {:?} is not a whole number of {r}x{c} blocks: vLLM's fp8 block \
                     kernels need whole blocks",
                    t.name, t.shape
                ));
            }
        }
        let sdtype = scheme.scale_dtype(t.dtype);
        let shape = scheme.scale_shape(&t.shape);
        let numel: u64 = shape.iter().product();
        let nbytes = sdtype.bytes_for(numel).expect("scale size");
        let name = scheme.scale_name(&t.name);
        if cat.tensors.iter().any(|x| x.name == name) {
            return Err(Error::usage(format!(
                "{}: a tensor is already named `{name}`",
                cat.path.display()
            )));
        }
        let scale_index = cat.tensors.len();
        cat.tensors.push(TensorEntry::new(
            name.clone(),
            sdtype,
            shape,
            t.file,
            0,
            nbytes,
        ));
        p.set_target(DType::F8E4M3, t.numel());
        p.reason = format!(
            "quantize ({} scale `{name}`){}",
            scheme.layout.describe(),
            if p.by_default {
                String::new()
            } else {
                format!("; {}", p.reason)
            }
        );
        p.by_default = false;
        p.scaled = Some(ScaledOut::Payload {
            scale: crate::catalogue::TensorId(scale_index),
            layout: scheme.layout,
            compute: sdtype,
        });
        let payload = p.tensor;
        out.push(p);
        out.push(TensorPlan {
            tensor: crate::catalogue::TensorId(scale_index),
            from: sdtype,
            to: sdtype,
            bytes_in: nbytes,
            bytes_out: nbytes,
            reason: format!("scale of `{}`", t.name),
            by_default: false,
            dequant: None,
            scaled: Some(ScaledOut::Scale { payload }),
            ggml: None,
            factor: None,
        });
    }
    plan.update(cat, |tensors| *tensors = out);
    plan.quant_config = Some(scheme.config(&ignore));
    Ok(())
}

/// Computes the scales of `payload` (the weight, read from `sources`): the largest magnitude
/// of each group over 448, in `compute` (the scale's dtype), zeros replaced by that dtype's
/// epsilon, as compressed-tensors' `calculate_qparams` does.
pub fn compute_scales(
    cat: &Catalogue,
    sources: &Sources<'_>,
    payload: usize,
    layout: ScaleLayout,
    compute: DType,
) -> Result<ScaleTable> {
    let t = &cat.tensors[payload];
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let scale_cols = match layout {
        ScaleLayout::Block(_, bc) => cols.div_ceil(bc),
        _ => 1,
    };
    let groups = match layout {
        ScaleLayout::Tensor => 1,
        ScaleLayout::Channel => rows,
        ScaleLayout::Block(br, _) => rows.div_ceil(br) * scale_cols,
    } as usize;
    let mut table = ScaleTable {
        layout,
        cols,
        scale_cols,
        values: vec![0f32; groups],
        compute,
    };
    let isz = t.dtype.bitsize() / 8;
    let mut first = 0u64;
    // Largest magnitude per group, as sign-cleared bits: for IEEE formats the integer order of
    // |x|'s bits is the order of |x|, and every NaN sorts above inf, so NaN propagates as
    // torch's amax propagates it. No decoding, and the loop vectorises.
    let mut amax = vec![0u32; groups];
    sources.for_each_chunk(t, 8 << 20, isz, |chunk| {
        let n = chunk.len() / isz;
        let mut e = first;
        table.runs(first, n, |r, _| {
            let g = table.group_of(e);
            let bytes = &chunk[r.start * isz..r.end * isz];
            let m = match t.dtype {
                DType::F32 => max_bits::<4>(bytes, 0x7FFF_FFFF),
                _ => max_bits::<2>(bytes, 0x7FFF),
            };
            amax[g] = amax[g].max(m);
            e += r.len() as u64;
        });
        first += n as u64;
        Ok(())
    })?;
    let amax: Vec<f32> = amax
        .into_iter()
        .map(|bits| match t.dtype {
            DType::F32 => f32::from_bits(bits),
            DType::BF16 => f32::from_bits(bits << 16),
            _ => half::f16::from_bits(bits as u16).to_f32(),
        })
        .collect();
    let eps = match compute {
        DType::BF16 => 0.0078125,
        DType::F16 => 0.0009765625,
        _ => f32::EPSILON,
    };
    for (v, a) in table.values.iter_mut().zip(amax) {
        let s = round_to(compute, a / FP8_MAX);
        *v = if s == 0.0 { eps } else { s };
    }
    Ok(table)
}

/// The largest `W`-byte little-endian word of `bytes` masked with `mask`; eight lanes so the
/// loop vectorises.
fn max_bits<const W: usize>(bytes: &[u8], mask: u32) -> u32 {
    let word = |b: &[u8]| -> u32 {
        let mut v = [0u8; 4];
        v[..W].copy_from_slice(&b[..W]);
        u32::from_le_bytes(v) & mask
    };
    let mut acc = [0u32; 8];
    let mut blocks = bytes.chunks_exact(8 * W);
    for c in &mut blocks {
        for (j, a) in acc.iter_mut().enumerate() {
            *a = (*a).max(word(&c[j * W..]));
        }
    }
    let tail = blocks
        .remainder()
        .chunks_exact(W)
        .map(word)
        .max()
        .unwrap_or(0);
    acc.into_iter().max().unwrap_or(0).max(tail)
}

/// `x` rounded to `d` (f32, bf16 or f16) and widened back.
#[inline]
pub(super) fn round_to(d: DType, x: f32) -> f32 {
    match d {
        DType::BF16 => f32::from_bits((cast::f32_to_bf16_bits(x) as u32) << 16),
        DType::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}

impl ScaleTable {
    /// Quantizes weight elements `first..` (the bytes `x`, of `from`) into f8e4m3fn bytes:
    /// `x / scale` in f32 rounded to [`ScaleTable::compute`] (the weight's dtype for
    /// compressed-tensors, where torch divides), clamped to +-448, cast to f8e4m3fn.
    pub fn quantize(&self, from: DType, x: &[u8], first: u64, out: &mut [u8]) {
        fn run(out: &mut [u8], vals: &[f32], s: f32, round: impl Fn(f32) -> f32) {
            for (o, v) in out.iter_mut().zip(vals) {
                *o = cast::fp8::f32_to_e4m3(round(*v / s).clamp(-FP8_MAX, FP8_MAX));
            }
        }
        let n = out.len();
        super::SCRATCH.with(|scratch| {
            let vals = &mut scratch.borrow_mut().0;
            vals.resize(n, 0.0);
            cast::decode_f32_slice(from, x, vals);
            self.runs(first, n, |r, s| {
                let (o, v) = (&mut out[r.clone()], &vals[r]);
                match self.compute {
                    DType::BF16 => run(o, v, s, |q| round_to(DType::BF16, q)),
                    DType::F16 => run(o, v, s, |q| round_to(DType::F16, q)),
                    _ => run(o, v, s, |q| q),
                }
            });
        });
    }

    /// The index in [`ScaleTable::values`] of the scale of element `e`.
    pub fn group_of(&self, e: u64) -> usize {
        match self.layout {
            ScaleLayout::Tensor => 0,
            ScaleLayout::Channel => (e / self.cols) as usize,
            ScaleLayout::Block(br, bc) => {
                ((e / self.cols) / br * self.scale_cols + (e % self.cols) / bc) as usize
            }
        }
    }

    /// The scale values as little-endian bytes of [`ScaleTable::compute`].
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.values.len() * (self.compute.bitsize() / 8)];
        cast::encode_f32_slice(self.compute, &self.values, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_parse() {
        let ct = Format::CompressedTensors;
        assert_eq!(
            Scheme::parse("channel", ct).unwrap().layout,
            ScaleLayout::Channel
        );
        assert_eq!(
            Scheme::parse("block", ct).unwrap().layout,
            ScaleLayout::Block(128, 128)
        );
        assert_eq!(
            Scheme::parse("block:64x32", ct).unwrap().layout,
            ScaleLayout::Block(64, 32)
        );
        assert!(Scheme::parse("block:0x32", ct).is_err());
        assert!(Scheme::parse("row", ct).is_err());
        assert!(Scheme::parse("channel", Format::Fp8).is_err());
    }

    #[test]
    fn quantized_values_times_scale_come_back_within_fp8_precision() {
        let (rows, cols) = (3u64, 5u64);
        let x: Vec<f32> = (0..15).map(|i| (i as f32 - 7.0) * 0.013).collect();
        let mut raw = vec![0u8; 60];
        cast::encode_f32_slice(DType::F32, &x, &mut raw);
        for layout in [
            ScaleLayout::Tensor,
            ScaleLayout::Channel,
            ScaleLayout::Block(2, 2),
        ] {
            let scale_cols = match layout {
                ScaleLayout::Block(_, c) => cols.div_ceil(c),
                _ => 1,
            };
            let groups = match layout {
                ScaleLayout::Tensor => 1,
                ScaleLayout::Channel => rows,
                ScaleLayout::Block(r, _) => rows.div_ceil(r) * scale_cols,
            };
            let t = ScaleTable {
                layout,
                cols,
                scale_cols,
                values: vec![0.1 / FP8_MAX; groups as usize],
                compute: DType::F32,
            };
            let mut q = vec![0u8; 15];
            t.quantize(DType::F32, &raw, 0, &mut q);
            let mut back = vec![0u8; 60];
            t.dequantize(DType::F8E4M3, &q, 0, &mut back);
            let mut got = vec![0f32; 15];
            cast::decode_f32_slice(DType::F32, &back, &mut got);
            for (a, b) in x.iter().zip(&got) {
                assert!(
                    (a - b).abs() <= a.abs() / 16.0 + 1e-6,
                    "{layout:?}: {a} vs {b}"
                );
            }
        }
    }
}
