//! Finding compressed-tensors' packed weights (`X.weight_packed` with `X.weight_scale`,
//! `X.weight_shape`, and `X.weight_zero_point` / `X.weight_global_scale`; `int-quantized`'s
//! int8 `X.weight`) and ModelOpt's NVFP4 weights (`X.weight` uint8 with `X.weight_scale` and
//! `X.weight_scale_2`).

use serde_json::Value;

use super::{Ctx, Found};
use crate::cast::packed::ct::{Ct, Global, Kind, Zero};
use crate::cast::packed::Packing;
use crate::catalogue::TensorEntry;
use crate::dtype::DType;
use crate::quant::Quantization;

/// compressed-tensors formats read here.
pub(in crate::quant) const FORMATS: &[&str] = &[
    "pack-quantized",
    "int-quantized",
    "nvfp4-pack-quantized",
    "mxfp4-pack-quantized",
];

/// The weight arguments of a config group that matter here.
struct Args {
    bits: u64,
    group: Option<u64>,
    symmetric: bool,
}

pub(super) fn find(ctx: &Ctx, q: &mut Quantization, found: &mut Vec<Found>) {
    if ctx.method == "compressed-tensors" {
        compressed_tensors(ctx, q, found);
    }
    let algo = |v: Option<&Value>, at: &str| {
        v.and_then(|v| v.pointer(at))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let nvfp4 = (ctx.method == "modelopt"
        && algo(ctx.config, "/quant_algo").as_deref() == Some("NVFP4"))
        || algo(ctx.modelopt, "/quantization/quant_algo").as_deref() == Some("NVFP4");
    if nvfp4 {
        modelopt_nvfp4(ctx, q, found);
    }
}

/// The weight arguments of every config group, with the formats they use.
fn groups(config: &Value) -> (Vec<Args>, Vec<String>) {
    let top = config.get("format").and_then(Value::as_str).unwrap_or("");
    let mut args = Vec::new();
    let mut formats = Vec::new();
    if let Some(groups) = config.get("config_groups").and_then(Value::as_object) {
        for g in groups.values() {
            let f = g.get("format").and_then(Value::as_str).unwrap_or(top);
            formats.push(f.to_string());
            if let Some(w) = g.get("weights").filter(|w| w.is_object()) {
                args.push(Args {
                    bits: w.get("num_bits").and_then(Value::as_u64).unwrap_or(0),
                    group: w.get("group_size").and_then(Value::as_u64),
                    symmetric: w.get("symmetric").and_then(Value::as_bool) != Some(false),
                });
            }
        }
    }
    if formats.is_empty() {
        formats.push(top.to_string());
    }
    (args, formats)
}

fn compressed_tensors(ctx: &Ctx, q: &mut Quantization, found: &mut Vec<Found>) {
    let Some(config) = ctx.config else { return };
    let (args, formats) = groups(config);
    if !formats.iter().any(|f| FORMATS.contains(&f.as_str())) {
        return;
    }
    let int8 = formats.iter().any(|f| f == "int-quantized");
    let before = found.len();
    let mut sources = None;
    for (i, t) in ctx.cat.tensors.iter().enumerate() {
        let stem = if let Some(s) = t.name.strip_suffix(".weight_packed") {
            s
        } else if int8 && t.dtype == DType::I8 && t.name.ends_with(".weight") {
            t.name.strip_suffix(".weight").unwrap_or("")
        } else {
            continue;
        };
        let r = one(ctx, &args, stem, i, t, &mut sources);
        match r {
            Ok(f) => found.push(f),
            Err(why) => {
                q.unsupported.get_or_insert(why);
            }
        }
    }
    if found.len() == before {
        let f = formats.iter().find(|f| FORMATS.contains(&f.as_str()));
        q.unsupported.get_or_insert(format!(
            "config.json declares compressed-tensors format `{}`, and no tensor is packed as it says",
            f.map_or("", |f| f.as_str())
        ));
    }
}

/// The packed weight whose payload is `t` (catalogue index `i`), or why it cannot be read.
fn one<'a>(
    ctx: &Ctx<'a>,
    args: &[Args],
    stem: &str,
    i: usize,
    t: &TensorEntry,
    sources: &mut Option<crate::source::Sources<'a>>,
) -> Result<Found, String> {
    let name = |s: &str| format!("{stem}.{s}");
    let (si, scale) = ctx
        .get(&name("weight_scale"))
        .ok_or_else(|| format!("`{}` has no `{}`", t.name, name("weight_scale")))?;
    let zero = ctx.get(&name("weight_zero_point"));
    let global = ctx.get(&name("weight_global_scale"));
    let mut parts = vec![i, si];
    let (kind, out, inn) = payload(
        ctx,
        args,
        t,
        (scale, global.map(|g| g.1)),
        &mut parts,
        sources,
    )?;
    let group = group_of(&kind, scale, out, inn, args).map_err(|why| {
        format!(
            "scale `{}` {:?} for `{}` [{out}, {inn}]: {why}",
            scale.name, scale.shape, t.name
        )
    })?;
    let mut ct = Ct {
        kind,
        out,
        inn,
        group,
        scale: scale.dtype,
        zero: Zero::None,
    };
    if let Some((zi, z)) = zero {
        ct.zero = match (z.dtype, &kind) {
            (DType::I8, Kind::Int { .. }) if z.numel() == 1 && group == 0 => Zero::Tensor,
            (DType::I32, Kind::Int { packed: true, .. }) if group != 0 => Zero::Packed,
            _ => {
                return Err(format!(
                    "zero point `{}` {} {:?} does not fit `{}`",
                    z.name, z.dtype, z.shape, t.name
                ))
            }
        };
        parts.insert(2, zi);
    } else if !args.is_empty() && args.iter().all(|a| !a.symmetric) {
        return Err(format!(
            "`{}` has no `{}` (the config declares asymmetric weights)",
            t.name,
            name("weight_zero_point")
        ));
    }
    if let (Kind::Nvfp4(_), Some((gi, g))) = (kind, global) {
        if g.dtype != DType::F32 || g.numel() != 1 {
            return Err(format!(
                "global scale `{}` is {} {:?}, not one f32",
                g.name, g.dtype, g.shape
            ));
        }
        // before `weight_shape` (never read by the packing), after the zero point
        let at = if ct.zero == Zero::None { 2 } else { 3 };
        parts.insert(at, gi);
    }
    let scale_ok = match kind {
        Kind::Int { .. } => matches!(scale.dtype, DType::F32 | DType::BF16 | DType::F16),
        Kind::Nvfp4(_) => scale.dtype == DType::F8E4M3,
        Kind::Mxfp4 => scale.dtype == DType::U8,
    };
    if !scale_ok {
        return Err(format!(
            "scale `{}` of `{}` is {}",
            scale.name, t.name, scale.dtype
        ));
    }
    let what = format!(
        "compressed-tensors {} (`{}`)",
        describe(&ct),
        parts
            .iter()
            .map(|&p| ctx.cat.tensors[p].name.as_str())
            .collect::<Vec<_>>()
            .join("`, `")
    );
    Ok(Found {
        parts,
        name: format!("{stem}.weight"),
        dtype: ct.dtype(),
        packing: Packing::Ct(ct),
        what,
    })
}

/// What payload `t` holds, with its `[out, in]` (a packed int payload's `weight_shape` joins
/// `parts`).
fn payload<'a>(
    ctx: &Ctx<'a>,
    args: &[Args],
    t: &TensorEntry,
    (scale, global): (&TensorEntry, Option<&TensorEntry>),
    parts: &mut Vec<usize>,
    sources: &mut Option<crate::source::Sources<'a>>,
) -> Result<(Kind, u64, u64), String> {
    let stem = t.name.rsplit_once('.').map_or("", |(s, _)| s);
    let name = |s: &str| format!("{stem}.{s}");
    Ok(match t.dtype {
        DType::I32 => {
            let (shape_i, shape_t) = ctx
                .get(&name("weight_shape"))
                .ok_or_else(|| format!("`{}` has no `{}`", t.name, name("weight_shape")))?;
            let [out, inn] = read_shape(ctx, shape_t, sources)?;
            let cols = *t.shape.get(1).unwrap_or(&0);
            let fits =
                |b: u64| t.shape.len() == 2 && t.shape[0] == out && (inn * b).div_ceil(32) == cols;
            let declared: Vec<u64> = args.iter().map(|a| a.bits).filter(|&b| fits(b)).collect();
            let bits = match declared.as_slice() {
                [b, ..] if declared.iter().all(|x| x == b) && (1..=8).contains(b) => *b,
                _ => {
                    return Err(format!(
                        "`{}` {:?} does not hold [{out}, {inn}] at any width the config declares",
                        t.name, t.shape
                    ))
                }
            };
            parts.push(shape_i);
            (
                Kind::Int {
                    bits: bits as u8,
                    packed: true,
                },
                out,
                inn,
            )
        }
        DType::I8 if t.shape.len() == 2 => (
            Kind::Int {
                bits: 8,
                packed: false,
            },
            t.shape[0],
            t.shape[1],
        ),
        DType::U8 if t.shape.len() == 2 => {
            let kind = match (scale.dtype, global) {
                (DType::F8E4M3, Some(g)) => Kind::Nvfp4(if g.shape.is_empty() {
                    Global::DivideBf16
                } else {
                    Global::Divide
                }),
                (DType::U8, None) => Kind::Mxfp4,
                _ => {
                    return Err(format!(
                    "`{}` is uint8 with a {} scale `{}`{}: neither NVFP4 (an F8_E4M3 scale and a \
                         global scale) nor MXFP4 (a uint8 scale)",
                    t.name,
                    scale.dtype,
                    scale.name,
                    if global.is_some() {
                        " and a global scale"
                    } else {
                        ""
                    }
                ))
                }
            };
            (kind, t.shape[0], t.shape[1] * 2)
        }
        _ => {
            return Err(format!(
                "`{}` is {} {:?}: not a compressed-tensors packed weight",
                t.name, t.dtype, t.shape
            ))
        }
    })
}

/// Values per scale along a row (0: one for the tensor), from the scale's shape.
fn group_of(
    kind: &Kind,
    scale: &TensorEntry,
    out: u64,
    inn: u64,
    args: &[Args],
) -> Result<u64, String> {
    let fixed = match kind {
        Kind::Nvfp4(_) => Some(16),
        Kind::Mxfp4 => Some(32),
        Kind::Int { .. } => None,
    };
    if scale.numel() == 1 && fixed.is_none() {
        return Ok(0);
    }
    if scale.shape.len() != 2 || scale.shape[0] != out {
        return Err(format!("not one scale per tensor or [{out}, groups]"));
    }
    let n = scale.shape[1];
    if n == 1 && fixed.is_none() {
        return Ok(inn);
    }
    let candidates: Vec<u64> = match fixed {
        Some(g) => vec![g],
        None => args.iter().filter_map(|a| a.group).collect(),
    };
    candidates
        .into_iter()
        .find(|&g| g > 0 && inn.div_ceil(g) == n)
        .ok_or_else(|| "no group size of the config gives that many groups".to_string())
}

fn describe(ct: &Ct) -> String {
    let per = match ct.group {
        0 => "per tensor".to_string(),
        g if g == ct.inn => "per channel".to_string(),
        g => format!("groups of {g}"),
    };
    let kind = match ct.kind {
        Kind::Int { bits, packed: true } => format!("int{bits} packed"),
        Kind::Int { .. } => "int8".into(),
        Kind::Nvfp4(Global::Multiply) => "nvfp4 (modelopt)".into(),
        Kind::Nvfp4(_) => "nvfp4".into(),
        Kind::Mxfp4 => "mxfp4".into(),
    };
    let zero = if ct.zero == Zero::None {
        ""
    } else {
        ", asymmetric"
    };
    format!("{kind}, {per}{zero}")
}

/// The `[out, in]` an int64 `weight_shape` tensor holds.
fn read_shape<'a>(
    ctx: &Ctx<'a>,
    t: &TensorEntry,
    sources: &mut Option<crate::source::Sources<'a>>,
) -> Result<[u64; 2], String> {
    if t.dtype != DType::I64 || t.numel() != 2 || t.nbytes != 16 {
        return Err(format!(
            "`{}` is {} {:?}, not two int64",
            t.name, t.dtype, t.shape
        ));
    }
    if sources.is_none() {
        *sources = Some(crate::source::Sources::open(ctx.cat).map_err(|e| e.to_string())?);
    }
    let mut b = [0u8; 16];
    sources
        .as_ref()
        .expect("opened")
        .read(t, 0, &mut b)
        .map_err(|e| e.to_string())?;
    let (out, inn) = (
        i64::from_le_bytes(b[..8].try_into().expect("8")),
        i64::from_le_bytes(b[8..].try_into().expect("8")),
    );
    if out <= 0 || inn <= 0 {
        return Err(format!("`{}` holds [{out}, {inn}]", t.name));
    }
    Ok([out as u64, inn as u64])
}

/// ModelOpt NVFP4: `X.weight` uint8 `[out, in / 2]`, `X.weight_scale` F8_E4M3 `[out, in / 16]`,
/// `X.weight_scale_2` one f32; values `e2m1 * (scale * scale_2)` in f32, as ModelOpt's
/// `NVFP4QTensor.dequantize` and vLLM compute them.
fn modelopt_nvfp4(ctx: &Ctx, q: &mut Quantization, found: &mut Vec<Found>) {
    for (i, t) in ctx.cat.tensors.iter().enumerate() {
        let Some(stem) = t.name.strip_suffix(".weight") else {
            continue;
        };
        if t.dtype != DType::U8 {
            continue;
        }
        let name = |s: &str| format!("{stem}.{s}");
        let (Some((si, s)), Some((gi, g))) = (
            ctx.get(&name("weight_scale")),
            ctx.get(&name("weight_scale_2")),
        ) else {
            q.unsupported.get_or_insert(format!(
                "`{}` is uint8 without `{}` and `{}` (ModelOpt NVFP4)",
                t.name,
                name("weight_scale"),
                name("weight_scale_2")
            ));
            continue;
        };
        let ok = t.shape.len() == 2
            && s.dtype == DType::F8E4M3
            && s.shape == [t.shape[0], (t.shape[1] * 2).div_ceil(16)]
            && g.dtype == DType::F32
            && g.numel() == 1;
        if !ok {
            q.unsupported.get_or_insert(format!(
                "`{}` {} {:?}, `{}` {} {:?}, `{}` {} {:?} are not ModelOpt NVFP4 (uint8 [out, in/2], \
                 F8_E4M3 [out, in/16], one f32)",
                t.name, t.dtype, t.shape, s.name, s.dtype, s.shape, g.name, g.dtype, g.shape
            ));
            continue;
        }
        let ct = Ct {
            kind: Kind::Nvfp4(Global::Multiply),
            out: t.shape[0],
            inn: t.shape[1] * 2,
            group: 16,
            scale: DType::F8E4M3,
            zero: Zero::None,
        };
        found.push(Found {
            parts: vec![i, si, gi],
            name: t.name.clone(),
            dtype: ct.dtype(),
            packing: Packing::Ct(ct),
            what: format!(
                "modelopt nvfp4, groups of 16 (`{}`, `{}`, `{}`)",
                t.name, s.name, g.name
            ),
        });
    }
}
