//! Writing FP4 (E2M1) weights in compressed-tensors' packed layouts, with the scales
//! llm-compressor's weight-only presets compute (no calibration data):
//! - `nvfp4-pack-quantized` (NVFP4A16): one FP8 E4M3 scale per 16 values and an f32 global
//!   scale per tensor, shared by `q_proj`/`k_proj`/`v_proj` and by `gate_proj`/`up_proj` as
//!   llm-compressor's `update_fused_layer_weight_global_scales` does (vLLM fuses them);
//! - `mxfp4-pack-quantized` (MXFP4A16): one E8M0 exponent per 32 values.
//!
//! Each step follows compressed-tensors 0.20.1 (`generate_gparam`, `calculate_qparams`,
//! `generate_mx_scales`, `quantize`, `pack_fp4_to_uint8`) in the dtypes torch computes them:
//! a group's largest magnitude and the divisions by 6 and by the tensor's magnitude are
//! rounded to the weight's dtype, the NVFP4 quotient is taken in f32, the MXFP4 quotient in
//! the weight's dtype. `X.weight` becomes `X.weight_packed` (`uint8`, two values per byte, the
//! even column in the low nibble), `X.weight_scale` and, for NVFP4, `X.weight_global_scale`.
//! Which tensors: linear layers' weights, as for scaled FP8 ([`super::quantize`]).

use std::collections::HashMap;

use serde_json::{json, Value};

use super::quantize::{is_linear_weight, round_to};
use crate::cast;
use crate::catalogue::{Catalogue, TensorEntry, TensorId};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::plan::{Plan, ScaledOut, TensorPlan};
use crate::source::Sources;

/// FP4's largest magnitude.
const FP4_MAX: f32 = 6.0;

/// The modules gpt-oss's release leaves in bf16 (its `quantization_config`).
const GPT_OSS_UNCONVERTED: [&str; 4] = [
    "model.layers.*.self_attn",
    "model.layers.*.mlp.router",
    "model.embed_tokens",
    "lm_head",
];

pub use crate::catalogue::quant::{Fp4Kind, Fp4Part};

impl Fp4Kind {
    /// `--to nvfp4` / `--to mxfp4`.
    pub fn parse(s: &str) -> Option<Fp4Kind> {
        match s.to_ascii_lowercase().as_str() {
            "nvfp4" => Some(Fp4Kind::Nv),
            "mxfp4" => Some(Fp4Kind::Mx),
            _ => None,
        }
    }

    /// What users type and the plan says.
    pub fn name(self) -> &'static str {
        match self {
            Fp4Kind::Nv => "nvfp4",
            Fp4Kind::Mx | Fp4Kind::GptOss => "mxfp4",
        }
    }

    /// Values per scale.
    pub fn group(self) -> u64 {
        match self {
            Fp4Kind::Nv => 16,
            Fp4Kind::Mx | Fp4Kind::GptOss => 32,
        }
    }

    /// The stored scale's dtype.
    pub fn scale_dtype(self) -> DType {
        match self {
            Fp4Kind::Nv => DType::F8E4M3,
            Fp4Kind::Mx | Fp4Kind::GptOss => DType::U8,
        }
    }

    /// compressed-tensors' format name.
    fn format(self) -> &'static str {
        match self {
            Fp4Kind::Nv => "nvfp4-pack-quantized",
            Fp4Kind::Mx | Fp4Kind::GptOss => "mxfp4-pack-quantized",
        }
    }

    /// `config.json`'s `quantization_config`, as llm-compressor writes it for the NVFP4A16 /
    /// MXFP4A16 presets, with `ignore` the linear layers left unquantized.
    pub fn config(self, ignore: &[String]) -> Value {
        let (strategy, scale_dtype) = match self {
            Fp4Kind::Nv => ("tensor_group", "torch.float8_e4m3fn"),
            Fp4Kind::Mx => ("group", "torch.uint8"),
            Fp4Kind::GptOss => {
                return json!({"modules_to_not_convert": GPT_OSS_UNCONVERTED,
                              "quant_method": "mxfp4"})
            }
        };
        json!({
            "config_groups": {"group_0": {
                "format": self.format(), "input_activations": null,
                "output_activations": null, "targets": ["Linear"],
                "weights": {
                    "actorder": null, "block_structure": null, "dynamic": false,
                    "group_size": self.group(), "num_bits": 4,
                    "observer": "memoryless_minmax", "observer_kwargs": {},
                    "scale_dtype": scale_dtype, "strategy": strategy, "symmetric": true,
                    "type": "float", "zp_dtype": null,
                },
            }},
            "format": self.format(), "global_compression_ratio": null, "ignore": ignore,
            "kv_cache_scheme": null, "quant_method": "compressed-tensors",
            "quantization_status": "compressed", "sparsity_config": {}, "transform_config": {},
        })
    }
}

/// Largest magnitudes of one weight, as bits of its dtype (sign cleared).
pub struct Amax {
    /// Per group of [`Fp4Kind::group`] consecutive values (groups never cross a row).
    pub groups: Vec<u32>,
    /// Over the whole tensor.
    pub tensor: u32,
}

/// Reads weight `t` once and returns its largest magnitudes per group of `kind`'s layout
/// (runs of consecutive values along a row; for gpt-oss's experts `[E, I, R]`, runs along `I`
/// ordered as `[E, R, I/32]`); refuses a non-finite value (the references give no defined
/// code for it).
pub fn amax(sources: &Sources<'_>, t: &TensorEntry, kind: Fp4Kind) -> Result<Amax> {
    let group = kind.group();
    let isz = t.dtype.bitsize() / 8;
    let (mask, inf) = match t.dtype {
        DType::F32 => (0x7FFF_FFFFu32, 0x7F80_0000u32),
        DType::BF16 => (0x7FFF, 0x7F80),
        DType::F16 => (0x7FFF, 0x7C00),
        d => unreachable!("planned only for f32/bf16/f16 weights, not {d}"),
    };
    let word = |v: &[u8]| {
        let mut b = [0u8; 4];
        b[..isz].copy_from_slice(v);
        u32::from_le_bytes(b) & mask
    };
    let n_groups = (t.numel() / group) as usize;
    let mut groups = vec![0u32; n_groups];
    let mut e = 0u64;
    let mut bad = None;
    if kind == Fp4Kind::GptOss {
        let (i_len, r_len) = (t.shape[1], t.shape[2]);
        sources.for_each_chunk(t, 8 << 20, isz, |chunk| {
            for v in chunk.chunks_exact(isz) {
                let m = word(v);
                if m >= inf && bad.is_none() {
                    bad = Some(e);
                }
                let (x, i, r) = (e / (i_len * r_len), (e / r_len) % i_len, e % r_len);
                let g = ((x * r_len + r) * (i_len / group) + i / group) as usize;
                groups[g] = groups[g].max(m);
                e += 1;
            }
            Ok(())
        })?;
    } else {
        sources.for_each_chunk(t, 8 << 20, isz * group as usize, |chunk| {
            for (g, vals) in chunk.chunks_exact(isz * group as usize).enumerate() {
                let m = vals.chunks_exact(isz).map(word).max().unwrap_or(0);
                if m >= inf && bad.is_none() {
                    bad = Some(e + g as u64 * group);
                }
                groups[(e / group) as usize + g] = m;
            }
            e += (chunk.len() / isz) as u64;
            Ok(())
        })?;
    }
    if let Some(at) = bad {
        return Err(Error::invalid(
            sources.path_of(t),
            format!(
                "tensor `{}`: a non-finite value near element {at}: FP4 has no code for it",
                t.name
            ),
        ));
    }
    let tensor = groups.iter().copied().max().unwrap_or(0);
    Ok(Amax { groups, tensor })
}

/// The value of magnitude bits `bits` of `d`.
fn value(d: DType, bits: u32) -> f32 {
    match d {
        DType::F32 => f32::from_bits(bits),
        DType::BF16 => f32::from_bits(bits << 16),
        _ => half::f16::from_bits(bits as u16).to_f32(),
    }
}

/// The smallest normal value of `d` (`torch.finfo(d).tiny`).
fn tiny(d: DType) -> f32 {
    match d {
        DType::F16 => 6.103_515_6e-5,
        _ => f32::MIN_POSITIVE,
    }
}

/// NVFP4's global scale of a tensor whose largest magnitude is `amax` (bits of `d`):
/// `448 * 6 / amax` as torch computes it in `d` (the reciprocal, then the product, each
/// rounded to `d`), 1 where that is not finite (`generate_gparam`).
pub fn global_scale(d: DType, amax: u32) -> f32 {
    let a = value(d, amax).max(tiny(d));
    let g = round_to(d, round_to(d, 1.0 / a) * (448.0 * FP4_MAX));
    if g.is_finite() {
        g
    } else {
        1.0
    }
}

/// The scales of one weight, ready to quantize it chunk by chunk.
#[derive(Debug, Clone)]
pub struct Fp4Table {
    /// The layout.
    pub kind: Fp4Kind,
    /// The weight's dtype.
    pub dtype: DType,
    /// The stored scale per group: E4M3 bytes (NVFP4) or E8M0 exponents (MXFP4).
    pub scales: Vec<u8>,
    /// The global scale (NVFP4; 1 for MXFP4).
    pub global: f32,
    /// gpt-oss's experts: `I` and `R` of the weight `[E, I, R]` (zero otherwise).
    pub experts: (u64, u64),
}

impl Fp4Table {
    /// The scales of a weight of dtype `d` with group magnitudes `amax` and, for NVFP4, the
    /// global scale `global` (its own or the smallest of its fused group).
    pub fn new(
        kind: Fp4Kind,
        d: DType,
        shape: &[u64],
        amax: &Amax,
        global: f32,
    ) -> Result<Fp4Table> {
        let scales = match kind {
            // triton_kernels' downcast_to_mxfp: amax / 6 in f32, rounded up to a power of two
            Fp4Kind::GptOss => amax
                .groups
                .iter()
                .map(|&a| (gpt_oss_scale_bits(value(d, a)) >> 23) as u8)
                .collect(),
            Fp4Kind::Nv => amax
                .groups
                .iter()
                .map(|&a| {
                    // calculate_qparams: amax / 6 in the weight's dtype, times the global
                    // scale in f32, clamped and rounded to E4M3; a zero becomes 0.125
                    let s = global * round_to(d, value(d, a) / FP4_MAX);
                    let b = cast::fp8::f32_to_e4m3(s.clamp(-448.0, 448.0));
                    if b & 0x7F == 0 {
                        cast::fp8::f32_to_e4m3(0.125)
                    } else {
                        b
                    }
                })
                .collect(),
            Fp4Kind::Mx => amax
                .groups
                .iter()
                .map(|&a| mx_exponent(d, a))
                .collect::<Option<Vec<u8>>>()
                .ok_or_else(|| {
                    Error::usage("a group's magnitude reaches 2^127: beyond MXFP4's scales")
                })?,
        };
        let experts = match kind {
            Fp4Kind::GptOss => (shape[1], shape[2]),
            _ => (0, 0),
        };
        Ok(Fp4Table {
            kind,
            dtype: d,
            scales,
            global,
            experts,
        })
    }

    /// Bytes of the weight per expert (gpt-oss's layout: chunks are whole experts), else 0.
    pub fn expert_values(&self) -> u64 {
        self.experts.0 * self.experts.1
    }

    /// What the quotient of group `g` divides by: the E4M3 scale over the global scale in
    /// f32 (NVFP4), or the power of two in the weight's dtype (MXFP4).
    #[inline]
    fn divisor(&self, g: usize) -> f32 {
        match self.kind {
            Fp4Kind::Nv => cast::fp8::e4m3_to_f32(self.scales[g]) / self.global,
            Fp4Kind::Mx | Fp4Kind::GptOss => exp2(self.scales[g] as i32 - 127),
        }
    }

    /// gpt-oss's layout: quantizes whole experts `[I, R]` (elements `first..`, `first` a
    /// multiple of `I * R`) into `[R, I/2]` bytes each, every value times the reciprocal of its
    /// group's power of two, rounded as triton_kernels' bit manipulation does.
    fn quantize_experts(&self, vals: &[f32], first: u64, out: &mut [u8]) {
        let (i_len, r_len) = (self.experts.0 as usize, self.experts.1 as usize);
        let size = i_len * r_len;
        let groups = i_len / 32;
        for (x, (src, dst)) in vals
            .chunks_exact(size)
            .zip(out.chunks_exact_mut(size / 2))
            .enumerate()
        {
            let e = first as usize / size + x;
            for r in 0..r_len {
                for g in 0..groups {
                    let s = self.scales[(e * r_len + r) * groups + g];
                    let qs = if s == 0 {
                        0.0
                    } else {
                        1.0 / exp2(s as i32 - 127)
                    };
                    for j in 0..16 {
                        let i = g * 32 + 2 * j;
                        let (a, b) = (src[i * r_len + r] * qs, src[(i + 1) * r_len + r] * qs);
                        dst[r * (i_len / 2) + i / 2] = e2m1_up(a) | (e2m1_up(b) << 4);
                    }
                }
            }
        }
    }

    /// Quantizes weight elements `first..` (the bytes `x`, of the weight's dtype) into packed
    /// FP4 bytes (`out`: half as many bytes as values; `first` even).
    pub fn quantize(&self, x: &[u8], first: u64, out: &mut [u8]) {
        let group = self.kind.group() as usize;
        let n = x.len() / (self.dtype.bitsize() / 8);
        super::SCRATCH.with(|scratch| {
            let vals = &mut scratch.borrow_mut().0;
            vals.resize(n, 0.0);
            cast::decode_f32_slice(self.dtype, x, vals);
            if self.kind == Fp4Kind::GptOss {
                self.quantize_experts(vals, first, out);
                return;
            }
            let mut k = 0;
            while k < n {
                let e = first as usize + k;
                let g = e / group;
                let len = (group - e % group).min(n - k);
                let div = self.divisor(g);
                for v in &mut vals[k..k + len] {
                    let q = *v / div;
                    *v = match self.kind {
                        Fp4Kind::Nv => q,
                        Fp4Kind::Mx | Fp4Kind::GptOss => round_to(self.dtype, q),
                    };
                }
                k += len;
            }
            for (o, pair) in out.iter_mut().zip(vals.chunks_exact(2)) {
                *o = e2m1(pair[0]) | (e2m1(pair[1]) << 4);
            }
        });
    }

    /// The values that packed bytes `codes` (elements `first..`) stand for, in f32: each
    /// code times its scale, as compressed-tensors dequantizes (for `analyze`).
    pub fn dequantize(&self, codes: &[u8], first: u64, out: &mut [f32]) {
        const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        let group = self.kind.group();
        let decode = |c: u8| {
            let v = E2M1[(c & 7) as usize];
            if c & 8 != 0 {
                -v
            } else {
                v
            }
        };
        if self.kind == Fp4Kind::GptOss {
            // `out` in the weight's order [E, I, R], `codes` in [E, R, I/2]
            let (i_len, r_len) = self.experts;
            let size = i_len * r_len;
            let base = first / size * size;
            for (k, o) in out.iter_mut().enumerate() {
                let k = first + k as u64;
                let (e, i, r) = (k / size, (k / r_len) % i_len, k % r_len);
                let b = ((e * r_len + r) * (i_len / 2) + i / 2 - base / 2) as usize;
                let c = (codes[b] >> (4 * (i % 2))) & 0xF;
                let g = ((e * r_len + r) * (i_len / group) + i / group) as usize;
                *o = decode(c) * exp2(self.scales[g] as i32 - 127);
            }
            return;
        }
        for (i, o) in out.iter_mut().enumerate() {
            let c = (codes[i / 2] >> (4 * (i % 2))) & 0xF;
            let g = ((first + i as u64) / group) as usize;
            *o = decode(c) * self.divisor(g);
        }
    }

    /// The stored scale tensor's bytes.
    pub fn scale_bytes(&self) -> Vec<u8> {
        self.scales.clone()
    }

    /// The global scale's bytes (f32, little-endian).
    pub fn global_bytes(&self) -> Vec<u8> {
        self.global.to_le_bytes().to_vec()
    }
}

/// triton_kernels' `downcast_to_mxfp` (torch reference `downcast_to_mxfp_torch`,
/// `DequantScaleRoundingMode.ROUND_UP`): the f32 bits of `amax / 6` rounded up to a power of
/// two (0 for 0).
fn gpt_oss_scale_bits(amax: f32) -> u32 {
    ((amax / FP4_MAX).to_bits() + 0x007F_FFFF) & 0x7F80_0000
}

/// triton_kernels' E2M1 conversion of an f32 quotient: the exponent clamped to E2M1's, the
/// mantissa shifted for values below 1, then rounded half up on the two kept bits and
/// saturated to 6; the sign bit kept (so -0.0 is code 8).
#[inline]
fn e2m1_up(q: f32) -> u8 {
    let b = q.to_bits();
    let sign = ((b >> 28) & 0x8) as u8;
    let exp = (b >> 23) & 0xFF;
    let mut man = b & 0x7F_FFFF;
    if exp < 127 {
        // torch's `>>` of a shift past 31 gives 0
        man = (0x40_0000 | (man >> 1))
            .checked_shr(127 - exp - 1)
            .unwrap_or(0);
    }
    let exp = exp.max(126) - 126;
    let code = ((((exp << 2) | (man >> 21)) + 1) >> 1).min(7);
    code as u8 | sign
}

/// 2^e in f32 (e in -127..=127).
fn exp2(e: i32) -> f32 {
    if e >= -126 {
        f32::from_bits(((e + 127) as u32) << 23)
    } else {
        f32::from_bits(1 << (e + 149))
    }
}

/// The E8M0 exponent MXFP4 stores for a group of dtype `d` with largest magnitude bits `a`
/// (`generate_mx_scales`, then the scale rounded to `d` and re-encoded by
/// `compress_mx_scale`), or `None` when it would be 2^128.
fn mx_exponent(d: DType, a: u32) -> Option<u8> {
    // round_to_power_2: add half of the mantissa below E2M1's one bit, keep the exponent
    let (mantissa, exponent) = match d {
        DType::F32 => (23, 8),
        DType::BF16 => (7, 8),
        _ => (10, 5),
    };
    let p2 = value(
        d,
        (a + (1 << (mantissa - 2))) & (((1u32 << (exponent + 1)) - 1) << mantissa),
    );
    let e = if p2 == 0.0 {
        0
    } else if p2.is_infinite() {
        return None;
    } else {
        // 127 + log2(p2) - 2, exact for a power of two, clamped to a byte
        (127 + p2.log2() as i32 - 2).clamp(0, 255)
    };
    if e == 255 {
        return None;
    }
    // the scale 2^(e-127) in the weight's dtype; one that underflows (f16) becomes 1
    let s = round_to(d, exp2(e - 127));
    let s = if s == 0.0 { 1.0 } else { s };
    Some((127 + s.log2().floor() as i32) as u8)
}

/// E2M1 code of quotient `q`: clamped to +-6, rounded at the midpoints with ties to even
/// (`cast_to_fp4`), the sign bit set for every negative quotient (one that rounds to zero
/// too), as `pack_fp4_to_uint8` reads `signbit` of `sign(q) * |rounded|`.
#[inline]
fn e2m1(q: f32) -> u8 {
    let a = q.abs();
    let code = if a <= 0.25 {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    };
    code | (u8::from(q < 0.0) << 3)
}

/// `X.weight` -> `X.weight_packed` / `X.weight_scale` / `X.weight_global_scale`; gpt-oss's
/// `X` -> `X_blocks` / `X_scales`.
fn part_name(weight: &str, part: Fp4Part, kind: Fp4Kind) -> String {
    if kind == Fp4Kind::GptOss {
        return match part {
            Fp4Part::Packed => format!("{weight}_blocks"),
            _ => format!("{weight}_scales"),
        };
    }
    match part {
        Fp4Part::Packed => format!("{weight}_packed"),
        Fp4Part::Scale => format!("{weight}_scale"),
        Fp4Part::Global => format!("{weight}_global_scale"),
    }
}

/// The weights whose NVFP4 global scales llm-compressor makes one (the smallest of them):
/// `q_proj`/`k_proj`/`v_proj` of one attention, `gate_proj`/`up_proj` of one MLP, when all of
/// them are quantized. Returns, per weight, the others of its group.
fn fused_groups(cat: &Catalogue, quantized: &[usize]) -> HashMap<usize, Vec<usize>> {
    let by_name: HashMap<&str, usize> = quantized
        .iter()
        .map(|&i| (cat.tensors[i].name.as_str(), i))
        .collect();
    let mut out = HashMap::new();
    for &i in quantized {
        let name = &cat.tensors[i].name;
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        let Some((parent, leaf)) = module.rsplit_once('.') else {
            continue;
        };
        let members: &[&str] = match leaf {
            "q_proj" | "k_proj" | "v_proj" => &["q_proj", "k_proj", "v_proj"],
            "gate_proj" | "up_proj" => &["gate_proj", "up_proj"],
            _ => continue,
        };
        let ids: Option<Vec<usize>> = members
            .iter()
            .map(|m| {
                by_name
                    .get(format!("{parent}.{m}.weight").as_str())
                    .copied()
            })
            .collect();
        if let Some(ids) = ids {
            out.insert(i, ids.into_iter().filter(|&j| j != i).collect());
        }
    }
    out
}

/// Turns every linear weight the plan sends to FP4 into its packed tensor, scale and (NVFP4)
/// global scale, added to `cat` and to the plan in place of the weight. Tensors sent to FP4
/// that are not linear weights, or whose rows are not whole groups, keep their dtype. The
/// plan's `quant_config` lists the linear layers left unquantized.
pub fn plan_fp4(cat: &mut Catalogue, plan: &mut Plan, kind: Fp4Kind) -> Result<()> {
    if let Some(q) = cat.quant.as_deref() {
        return Err(Error::usage(format!(
            "{}: already quantized ({}); convert it to bf16 (dequantize) before quantizing it \
             again",
            cat.path.display(),
            q.scheme
        )));
    }
    // gpt-oss: its MoE experts in its own layout, the rest as its release keeps it
    let kind = match kind {
        Fp4Kind::Mx if crate::plan::model_type(cat).as_deref() == Some("gpt_oss") => {
            Fp4Kind::GptOss
        }
        k => k,
    };
    let group = kind.group();
    let mut rows = Vec::with_capacity(plan.tensors().len());
    let mut ignore = Vec::new();
    let mut quantized = Vec::new();
    for mut p in plan.tensors().to_vec() {
        let t = cat.tensors[p.tensor].clone();
        let linear = match kind {
            Fp4Kind::GptOss => {
                t.shape.len() == 3
                    && (t.name.ends_with(".experts.gate_up_proj")
                        || t.name.ends_with(".experts.down_proj"))
            }
            _ => is_linear_weight(&t),
        };
        let module = t
            .name
            .strip_suffix(".weight")
            .unwrap_or(&t.name)
            .to_string();
        if p.to != DType::F4 {
            if linear {
                ignore.push(module);
            }
            rows.push(p);
            continue;
        }
        let why = if !linear && kind == Fp4Kind::GptOss {
            Some("not a MoE expert: kept (gpt-oss's modules_to_not_convert)".to_string())
        } else if !linear {
            Some("not a linear layer's weight: kept (as llm-compressor keeps it)".to_string())
        } else if !matches!(t.dtype, DType::F32 | DType::BF16 | DType::F16) {
            Some(format!(
                "{} needs an f32, bf16 or f16 weight, not {}",
                kind.name(),
                t.dtype
            ))
        } else if t.shape[1] % group != 0 {
            Some(format!(
                "{} columns are not whole groups of {group}: kept",
                t.shape[1]
            ))
        } else if p.factor.is_some() {
            Some("a rules file's scale does not apply to an FP4 weight: kept".to_string())
        } else {
            None
        };
        if let Some(why) = why {
            p.keep();
            p.reason = why;
            p.by_default = false;
            if linear || (t.shape.len() == 2 && t.name.ends_with("lm_head.weight")) {
                ignore.push(module);
            }
            rows.push(p);
            continue;
        }
        quantized.push(p.tensor.0);
        rows.push(p);
    }
    let fused = match kind {
        Fp4Kind::Nv => fused_groups(cat, &quantized),
        Fp4Kind::Mx | Fp4Kind::GptOss => HashMap::new(),
    };
    let mut out = Vec::with_capacity(rows.len() + 2 * quantized.len());
    for p in rows {
        if p.to != DType::F4 {
            out.push(p);
            continue;
        }
        let mut siblings = [None; 2];
        for (s, &j) in siblings
            .iter_mut()
            .zip(fused.get(&p.tensor.0).into_iter().flatten())
        {
            *s = Some(TensorId(j));
        }
        push_parts(cat, &mut out, &p, kind, siblings)?;
    }
    plan.update(cat, |tensors| *tensors = out);
    plan.quant_config = Some(kind.config(&ignore));
    Ok(())
}

/// The packed values, scale and (NVFP4) global scale of the weight planned as `p`: catalogue
/// entries added to `cat`, their plan entries to `out`.
fn push_parts(
    cat: &mut Catalogue,
    out: &mut Vec<TensorPlan>,
    p: &TensorPlan,
    kind: Fp4Kind,
    siblings: [Option<TensorId>; 2],
) -> Result<()> {
    let group = kind.group();
    let t = cat.tensors[p.tensor].clone();
    let mut parts = match kind {
        Fp4Kind::GptOss => {
            let (e, i, r) = (t.shape[0], t.shape[1], t.shape[2]);
            vec![
                (Fp4Part::Packed, DType::U8, vec![e, r, i / 32, 16]),
                (Fp4Part::Scale, DType::U8, vec![e, r, i / 32]),
            ]
        }
        _ => {
            let (r, c) = (t.shape[0], t.shape[1]);
            vec![
                (Fp4Part::Packed, DType::U8, vec![r, c / 2]),
                (Fp4Part::Scale, kind.scale_dtype(), vec![r, c / group]),
            ]
        }
    };
    if kind == Fp4Kind::Nv {
        parts.push((Fp4Part::Global, DType::F32, vec![1]));
    }
    for (part, dtype, shape) in parts {
        let name = part_name(&t.name, part, kind);
        if cat.tensors.iter().any(|x| x.name == name) {
            return Err(Error::usage(format!(
                "{}: a tensor is already named `{name}`",
                cat.path.display()
            )));
        }
        let numel: u64 = shape.iter().product();
        let nbytes = dtype.bytes_for(numel).expect("whole bytes");
        let id = TensorId(cat.tensors.len());
        cat.tensors
            .push(TensorEntry::new(name, dtype, shape, t.file, 0, nbytes));
        let (from, bytes_in, reason) = match part {
            Fp4Part::Packed => (
                t.dtype,
                t.nbytes,
                format!(
                    "quantize to {} (`{}`, two values per byte){}",
                    kind.name(),
                    t.name,
                    if p.by_default {
                        String::new()
                    } else {
                        format!("; {}", p.reason)
                    }
                ),
            ),
            Fp4Part::Scale => (dtype, nbytes, format!("scale of `{}`", t.name)),
            Fp4Part::Global => (
                dtype,
                nbytes,
                match siblings {
                    [None, None] => format!("global scale of `{}`", t.name),
                    _ => format!(
                        "global scale of `{}` (shared with {})",
                        t.name,
                        siblings
                            .iter()
                            .flatten()
                            .map(|s| format!("`{}`", cat.tensors[*s].name))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                },
            ),
        };
        out.push(TensorPlan {
            tensor: id,
            from,
            to: dtype,
            bytes_in,
            bytes_out: nbytes,
            reason,
            by_default: false,
            dequant: None,
            scaled: Some(ScaledOut::Fp4 {
                weight: p.tensor,
                part,
                kind,
                fused: siblings,
            }),
            ggml: None,
            factor: None,
        });
    }
    Ok(())
}

/// The table of weight `weight` of an FP4 output: one pass over it, and for NVFP4 over the
/// members of its fused group (`tensor_amax` caches their magnitudes).
pub fn table(
    cat: &Catalogue,
    sources: &Sources<'_>,
    weight: TensorId,
    kind: Fp4Kind,
    fused: [Option<TensorId>; 2],
    tensor_amax: &std::sync::Mutex<HashMap<usize, u32>>,
) -> Result<Fp4Table> {
    let t = &cat.tensors[weight];
    let a = amax(sources, t, kind)?;
    tensor_amax.lock().expect("amax").insert(weight.0, a.tensor);
    let mut global = 1.0;
    if kind == Fp4Kind::Nv {
        global = global_scale(t.dtype, a.tensor);
        for s in fused.into_iter().flatten() {
            let known = tensor_amax.lock().expect("amax").get(&s.0).copied();
            let m = match known {
                Some(m) => m,
                None => {
                    let m = amax(sources, &cat.tensors[s], kind)?.tensor;
                    tensor_amax.lock().expect("amax").insert(s.0, m);
                    m
                }
            };
            global = global.min(global_scale(cat.tensors[s].dtype, m));
        }
    }
    Fp4Table::new(kind, t.dtype, &t.shape, &a, global).map_err(|e| match e {
        Error::Usage(m) => Error::invalid(sources.path_of(t), format!("tensor `{}`: {m}", t.name)),
        e => e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_at_midpoints_to_even() {
        let cases = [
            (0.25, 0),
            (0.2500001, 1),
            (0.75, 2),
            (0.7499999, 1),
            (1.25, 2),
            (1.75, 4),
            (2.5, 4),
            (2.5000002, 5),
            (3.5, 6),
            (5.0, 6),
            (5.0000005, 7),
            (1e9, 7),
            (-0.1, 8),
            (-6.0, 15),
        ];
        for (q, c) in cases {
            assert_eq!(e2m1(q), c, "{q}");
        }
        assert_eq!(e2m1(-0.0), 0, "torch.sign(-0.0) is 0: the code is +0");
    }

    #[test]
    fn mx_exponents_round_up_past_the_e2m1_mantissa() {
        // 6.0 = 1.5 * 2^2 -> 2^2, exponent 127 + 2 - 2; 7.0 = 1.75 * 2^2 rounds up to 2^3
        let bf = |x: f32| (cast::f32_to_bf16_bits(x) as u32) & 0x7FFF;
        assert_eq!(mx_exponent(DType::BF16, bf(6.0)), Some(127));
        assert_eq!(mx_exponent(DType::BF16, bf(7.0)), Some(128));
        assert_eq!(mx_exponent(DType::BF16, 0), Some(0));
        // f16: 2^(0 - 127) underflows to 0 and becomes 1, stored as exponent 127
        assert_eq!(mx_exponent(DType::F16, 0), Some(127));
        assert_eq!(exp2(-127), f32::from_bits(1 << 22));
        assert_eq!(exp2(3), 8.0);
    }
}
