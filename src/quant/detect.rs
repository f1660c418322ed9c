//! Finding the quantization scheme of an input: from `config.json`'s `quantization_config`,
//! ModelOpt's `hf_quant_config.json`, ComfyUI's `_quantization_metadata`, and, when none says
//! anything, from the tensor names (`X.weight` in FP8 beside `X.weight_scale_inv`,
//! `X.weight_scale` or `X.scale_weight`).

use std::collections::HashMap;

use serde_json::Value;

use super::{is_payload_dtype, Declared, Quantization, ScaleLayout, Scaled};
use crate::catalogue::{Catalogue, TensorEntry};

/// Largest config file read.
const MAX_CONFIG: u64 = 16 << 20;

/// Suffixes of scale tensors, with the payload suffix they scale.
const SCALE_NAMES: &[(&str, &str)] = &[
    ("weight_scale_inv", "weight"),
    ("weight_scale", "weight"),
    ("scale_weight", "weight"),
];

/// Suffixes of the other tensors a scaled-FP8 scheme writes (activation and KV-cache scales,
/// ComfyUI's marker).
const COMPANION_NAMES: &[&str] = &[
    "input_scale",
    "scale_input",
    "output_scale",
    "k_scale",
    "v_scale",
    "q_scale",
    "prob_scale",
];

/// Tensor suffixes of quantization schemes weightcast does not dequantize.
const FOREIGN_NAMES: &[(&str, &str)] = &[
    (
        "weight_packed",
        "packed integer weights (compressed-tensors pack-quantized)",
    ),
    ("weight_zero_point", "zero points (asymmetric quantization)"),
    ("weight_global_scale", "global scales (NVFP4)"),
    ("qweight", "packed integer weights (GPTQ/AWQ)"),
    ("SCB", "bitsandbytes int8"),
    ("absmax", "bitsandbytes 4-bit"),
    ("quant_map", "bitsandbytes 4-bit"),
];

/// Reads what the input says about quantization. `None` for a plain input.
/// Weights packed in a low-bit scheme are listed as the weights they decode into (see
/// [`super::packed`]), their stored parts kept in [`Quantization::stored`].
pub fn detect(cat: &mut Catalogue) -> Option<Quantization> {
    detect_with(cat, true)
}

/// The catalogue as stored: packed weights listed as their parts again (each part a companion
/// of its scheme), for `--on-quantized keep`. Unchanged when nothing was unpacked.
pub fn as_stored(cat: &mut Catalogue) {
    let Some(stored) = cat.quant.as_ref().and_then(|q| q.stored.clone()) else {
        return;
    };
    cat.tensors = stored;
    cat.quant = detect_with(cat, false).map(std::sync::Arc::new);
}

/// [`detect`]; `unpack`: list packed weights as the weights they decode into (else their
/// parts stay, as companions of the scheme).
fn detect_with(cat: &mut Catalogue, unpack: bool) -> Option<Quantization> {
    let dir = cat.folder.as_ref().map(|f| f.dir.clone());
    let config = dir
        .as_ref()
        .and_then(|d| read_json(&d.join("config.json")))
        .and_then(|c| c.get("quantization_config").cloned())
        .filter(|q| q.is_object());
    let modelopt = dir
        .as_ref()
        .and_then(|d| read_json(&d.join("hf_quant_config.json")));
    let comfy = cat
        .metadata()
        .iter()
        .any(|(k, _)| k == "_quantization_metadata");
    let declared = Declared {
        config: config.is_some(),
        hf_quant_config: modelopt.is_some(),
        metadata: comfy,
    };

    let mut q = Quantization {
        declared: declared.clone(),
        ..Default::default()
    };
    // What the declarations say: the scheme's name, the block shape and the strategy they give.
    let (block, strategy) = declared_scheme(&mut q, config.as_ref(), modelopt.as_ref(), comfy);
    let found = super::packed::find(cat, config.as_ref(), modelopt.as_ref(), &mut q);
    if unpack {
        super::packed::unpack(cat, found, &mut q);
    } else {
        q.companions
            .extend(found.iter().flat_map(|f| f.parts().iter().copied()));
    }
    let cat = &*cat;
    let by_name: HashMap<&str, usize> = cat
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let fp8_payloads = cat.tensors.iter().any(|t| is_payload_dtype(t.dtype));
    pair_scales(cat, &mut q, &by_name, block, strategy.as_deref());
    find_companions(cat, &mut q);
    let declared_any = declared.config || declared.hf_quant_config || declared.metadata;
    if !declared_any && q.scaled.is_empty() && q.unsupported.is_none() && q.stored.is_none() {
        return None;
    }
    if q.scheme.is_empty() {
        q.scheme = "scaled fp8".into();
        q.found_in = "tensor names".into();
    }
    // FP8 tensors that no scale covers under a declared FP8 scheme: their scale is missing.
    if declared_any && q.unsupported.is_none() && fp8_payloads {
        let ignore = ignored(&config);
        if let Some(t) = cat.tensors.iter().enumerate().find(|(i, t)| {
            is_payload_dtype(t.dtype)
                && t.shape.len() >= 2
                && !q.scaled.iter().any(|s| s.payload == *i)
                && !ignore.iter().any(|g| t.name.starts_with(g.as_str()))
        }) {
            q.unsupported = Some(format!("`{}` is {} and has no scale", t.1.name, t.1.dtype));
        }
    }
    if q.scaled.is_empty() && q.unsupported.is_none() && !declared_any && q.stored.is_none() {
        return None;
    }
    Some(q)
}

/// The scheme the declarations name (config.json, hf_quant_config.json, safetensors
/// metadata, in that order), with the block shape and the scale strategy they give.
fn declared_scheme(
    q: &mut Quantization,
    config: Option<&Value>,
    modelopt: Option<&Value>,
    comfy: bool,
) -> (Option<(u64, u64)>, Option<String>) {
    let mut block: Option<(u64, u64)> = None;
    let mut strategy: Option<String> = None;
    if let Some(c) = config {
        let method = c
            .get("quant_method")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        q.found_in = "config.json quantization_config".into();
        match method.as_str() {
            "fp8" => {
                q.scheme = "fp8 (DeepSeek/vLLM scaled FP8)".into();
                block = pair(c.get("weight_block_size"));
                strategy = Some(if block.is_some() { "block" } else { "tensor" }.into());
                if let Some(f) = c.get("fmt").and_then(Value::as_str) {
                    if f != "e4m3" && f != "float8_e4m3fn" {
                        q.unsupported = Some(format!("fp8 with fmt `{f}`"));
                    }
                }
            }
            "compressed-tensors" => compressed_tensors(c, q, &mut block, &mut strategy),
            "modelopt" => {
                let algo = c
                    .get("quant_algo")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                q.scheme = format!("modelopt {algo}");
                if algo != "FP8" && algo != "NVFP4" && !algo.is_empty() {
                    q.unsupported = Some(format!("modelopt `{algo}`"));
                }
            }
            "mxfp4" => q.scheme = "mxfp4 (gpt-oss MoE experts)".into(),
            // packed low-bit schemes: their finders (quant::packed) check the options
            "gptq" | "awq" | "bitsandbytes" => q.scheme = method.clone(),
            "fbgemm_fp8" => {
                q.scheme = "fbgemm_fp8 (per-channel scaled FP8)".into();
                strategy = Some("channel".into());
            }
            "" => {
                q.scheme = "quantization_config without quant_method".into();
                q.unsupported = Some("a quantization_config with no quant_method".into());
            }
            m => {
                q.scheme = m.to_string();
                q.unsupported = Some(format!("quant_method `{m}`"));
            }
        }
    } else if let Some(m) = modelopt {
        let algo = m
            .pointer("/quantization/quant_algo")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        q.scheme = format!("modelopt {algo}");
        q.found_in = "hf_quant_config.json".into();
        if algo != "FP8" && algo != "NVFP4" {
            q.unsupported = Some(format!("modelopt `{algo}`"));
        }
    } else if comfy {
        q.scheme = "ComfyUI scaled fp8".into();
        q.found_in = "safetensors metadata _quantization_metadata".into();
    }
    (block, strategy)
}

/// compressed-tensors' `quantization_config`: float-quantized 8-bit symmetric weights only.
fn compressed_tensors(
    c: &Value,
    q: &mut Quantization,
    block: &mut Option<(u64, u64)>,
    strategy: &mut Option<String>,
) {
    let format = c.get("format").and_then(Value::as_str).unwrap_or("");
    q.scheme = format!("compressed-tensors {format}");
    let groups = c
        .get("config_groups")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut formats: Vec<String> = groups
        .values()
        .filter_map(|g| g.get("format").and_then(Value::as_str))
        .map(String::from)
        .collect();
    formats.push(format.to_string());
    formats.retain(|f| !f.is_empty());
    formats.dedup();
    let packed = |f: &str| super::packed::CT_FORMATS.contains(&f);
    if let Some(f) = formats
        .iter()
        .find(|f| f.as_str() != "float-quantized" && !packed(f))
    {
        q.unsupported = Some(format!(
            "compressed-tensors format `{f}` (weightcast dequantizes \
                 float-quantized)"
        ));
    }
    for g in groups.values() {
        let Some(w) = g.get("weights").filter(|w| w.is_object()) else {
            continue;
        };
        // packed formats: their finder (quant::packed) checks the arguments
        if packed(g.get("format").and_then(Value::as_str).unwrap_or(format)) {
            continue;
        }
        let ty = w.get("type").and_then(Value::as_str).unwrap_or("");
        let bits = w.get("num_bits").and_then(Value::as_u64).unwrap_or(0);
        if q.unsupported.is_none() && (ty != "float" || bits != 8) {
            q.unsupported = Some(format!(
                "compressed-tensors weights of type `{ty}` with {bits} bits"
            ));
        }
        if w.get("symmetric").and_then(Value::as_bool) == Some(false) && q.unsupported.is_none() {
            q.unsupported = Some("asymmetric compressed-tensors weights".into());
        }
        let s = w.get("strategy").and_then(Value::as_str).unwrap_or("");
        if s == "group" || s == "tensor_group" {
            q.unsupported
                .get_or_insert(format!("compressed-tensors `{s}` strategy"));
        }
        strategy.get_or_insert(s.to_string());
        *block = block.or(pair(w.get("block_structure")));
    }
}

/// Pairs every scale with its payload (`X.weight` beside `X.weight_scale_inv`, ...).
fn pair_scales(
    cat: &Catalogue,
    q: &mut Quantization,
    by_name: &HashMap<&str, usize>,
    block: Option<(u64, u64)>,
    strategy: Option<&str>,
) {
    for (i, t) in cat.tensors.iter().enumerate() {
        let Some((stem, payload_suffix)) = split_scale(&t.name) else {
            continue;
        };
        let payload_name = join(stem, payload_suffix);
        let Some(&p) = by_name.get(payload_name.as_str()) else {
            continue;
        };
        let payload = &cat.tensors[p];
        if !payload.dtype.is_float() || payload.dtype.bitsize() != 8 {
            if payload.dtype.is_float() && payload.dtype.bitsize() >= 16 {
                // A scale beside a wide float weight (e.g. an unquantized layer that kept its
                // observer's scale): nothing to dequantize, but it is not part of the model.
                q.companions.push(i);
            } else {
                q.unsupported.get_or_insert(format!(
                    "`{}` is {} with a scale `{}`",
                    payload.name, payload.dtype, t.name
                ));
            }
            continue;
        }
        if !is_payload_dtype(payload.dtype) {
            q.unsupported.get_or_insert(format!(
                "`{}` is {} (weightcast dequantizes float8_e4m3fn and float8_e5m2)",
                payload.name, payload.dtype
            ));
            continue;
        }
        match layout_of(payload, t, block, strategy) {
            Ok(layout) => q.scaled.push(Scaled {
                payload: p,
                scale: i,
                layout,
            }),
            Err(why) => {
                q.unsupported.get_or_insert(format!(
                    "scale `{}` {:?} for `{}` {:?}: {why}",
                    t.name, t.shape, payload.name, payload.shape
                ));
            }
        }
    }
    // A payload with two scales (`weight_scale` and `weight_scale_inv`) is ambiguous.
    let mut seen = HashMap::new();
    for s in &q.scaled {
        if let Some(other) = seen.insert(s.payload, s.scale) {
            q.unsupported.get_or_insert(format!(
                "`{}` has two scales, `{}` and `{}`",
                cat.tensors[s.payload].name, cat.tensors[other].name, cat.tensors[s.scale].name
            ));
        }
    }
}

/// The scheme's other tensors (activation scales, markers) and foreign schemes' tensors.
fn find_companions(cat: &Catalogue, q: &mut Quantization) {
    for (i, t) in cat.tensors.iter().enumerate() {
        let last = t.name.rsplit('.').next().unwrap_or("");
        if COMPANION_NAMES.contains(&last) || t.name == "scaled_fp8" {
            q.companions.push(i);
        }
        if let Some((_, what)) = FOREIGN_NAMES.iter().find(|(s, _)| *s == last) {
            q.unsupported.get_or_insert(format!("`{}`: {what}", t.name));
        }
    }
    q.companions.sort_unstable();
    q.companions.dedup();
}

/// Module prefixes a config leaves unquantized (not a full matcher: used to avoid asking for
/// scales of layers left in FP8 on purpose, which never happens in practice).
fn ignored(config: &Option<Value>) -> Vec<String> {
    let Some(c) = config else { return vec![] };
    ["ignore", "ignored_layers", "modules_to_not_convert"]
        .iter()
        .filter_map(|k| c.get(*k).and_then(Value::as_array))
        .flatten()
        .filter_map(Value::as_str)
        .filter(|s| !s.starts_with("re:"))
        .map(String::from)
        .collect()
}

/// `(stem, payload suffix)` of a scale tensor's name.
fn split_scale(name: &str) -> Option<(&str, &str)> {
    let (stem, last) = match name.rsplit_once('.') {
        Some((s, l)) => (s, l),
        None => ("", name),
    };
    SCALE_NAMES
        .iter()
        .find(|(s, _)| *s == last)
        .map(|(_, p)| (stem, *p))
}

fn join(stem: &str, last: &str) -> String {
    if stem.is_empty() {
        last.to_string()
    } else {
        format!("{stem}.{last}")
    }
}

/// How scale `s` covers payload `p`, from their shapes and what the config declares.
fn layout_of(
    p: &TensorEntry,
    s: &TensorEntry,
    block: Option<(u64, u64)>,
    strategy: Option<&str>,
) -> Result<ScaleLayout, String> {
    let n = s.numel();
    if n == 1 && !matches!(strategy, Some("block")) {
        return Ok(ScaleLayout::Tensor);
    }
    if p.shape.len() != 2 {
        return Err("a scale per channel or block needs a 2-D weight".into());
    }
    let (out, inn) = (p.shape[0], p.shape[1]);
    let is_channel = n == out && (s.shape == [out, 1] || s.shape == [out]);
    if is_channel && !matches!(strategy, Some("block") | Some("tensor")) {
        return Ok(ScaleLayout::Channel);
    }
    if s.shape.len() == 2 && !matches!(strategy, Some("channel") | Some("tensor")) {
        let (r, c) = (s.shape[0], s.shape[1]);
        let fits = |(br, bc): (u64, u64)| {
            br > 0 && bc > 0 && out.div_ceil(br) == r && inn.div_ceil(bc) == c
        };
        if let Some(b) = block {
            return if fits(b) {
                Ok(ScaleLayout::Block(b.0, b.1))
            } else {
                Err(format!("does not fit blocks of {}x{}", b.0, b.1))
            };
        }
        if fits((128, 128)) {
            return Ok(ScaleLayout::Block(128, 128));
        }
        return Err("no block size in the config, and 128x128 does not fit".into());
    }
    Err(match strategy {
        Some(s) if !s.is_empty() => format!("does not fit the `{s}` strategy the config declares"),
        _ => "not a per-tensor, per-channel or block shape".into(),
    })
}

fn pair(v: Option<&Value>) -> Option<(u64, u64)> {
    let a = v?.as_array()?;
    match a.as_slice() {
        [r, c] => Some((r.as_u64()?, c.as_u64()?)),
        _ => None,
    }
}

fn read_json(path: &std::path::Path) -> Option<Value> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() || meta.len() > MAX_CONFIG {
        return None;
    }
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}
