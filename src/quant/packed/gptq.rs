//! Finding GPTQ packed integer weights (`qweight`, `qzeros`, `scales`, `g_idx`).

use serde_json::Value;

use super::{each_layer, Ctx, Found};
use crate::cast::packed::gptq::Gptq;
use crate::cast::packed::Packing;
use crate::catalogue::TensorEntry;
use crate::dtype::DType;
use crate::quant::Quantization;

/// The options of a GPTQ `quantization_config` weightcast dequantizes.
struct Options {
    bits: u32,
    /// `group_size`; -1 (one group) as `None`.
    group_size: Option<u64>,
    v1: bool,
    desc_act: bool,
}

/// Reads the config as transformers' `GPTQConfig` does (`checkpoint_format` wins over
/// `format`, both lowercased; `group_size` 128 when absent), or says what it cannot dequantize.
fn options(c: &Value) -> Result<Options, String> {
    let bits = c.get("bits").and_then(Value::as_u64);
    let bits = match bits {
        Some(b @ (2 | 3 | 4 | 8)) => b as u32,
        _ => {
            return Err(format!(
                "gptq `bits` {} (weightcast dequantizes 2, 3, 4 and 8)",
                c.get("bits").map_or("missing".into(), Value::to_string)
            ))
        }
    };
    let group_size = match c.get("group_size").map(Value::as_i64) {
        None => Some(128),
        Some(Some(-1)) => None,
        Some(Some(g)) if g > 0 => Some(g as u64),
        Some(_) => {
            return Err(format!(
                "gptq `group_size` {} (a positive size or -1)",
                c["group_size"]
            ))
        }
    };
    let format = ["checkpoint_format", "format"]
        .iter()
        .find_map(|k| c.get(*k).and_then(Value::as_str))
        .unwrap_or("gptq")
        .to_lowercase();
    let v1 = match format.as_str() {
        "gptq" => true,
        "gptq_v2" => false,
        f => {
            return Err(format!(
                "gptq checkpoint format `{f}` (weightcast dequantizes `gptq` and `gptq_v2`)"
            ))
        }
    };
    if let Some(p) = c.get("pack_dtype").and_then(Value::as_str) {
        if !matches!(p, "int32" | "torch.int32") {
            return Err(format!(
                "gptq `pack_dtype` `{p}` (weightcast reads int32 words)"
            ));
        }
    }
    Ok(Options {
        bits,
        group_size,
        v1,
        desc_act: c.get("desc_act").and_then(Value::as_bool).unwrap_or(false),
    })
}

/// GPTQ Linears (`X.qweight`, `X.qzeros`, `X.scales` and, usually, `X.g_idx`) when the config
/// says `quant_method: gptq`, decoded into `X.weight` `[out, in]` in the scales' dtype as
/// gptqmodel's `dequantize_weight` computes it.
pub(super) fn find(ctx: &Ctx, q: &mut Quantization, found: &mut Vec<Found>) {
    if ctx.method != "gptq" {
        return;
    }
    let Some(opts) = each_layer(ctx, q, found, options, ".qweight", |o, i, t, stem| {
        layer(ctx, o, i, t, stem)
    }) else {
        return;
    };
    if !found.is_empty() {
        let group = opts
            .group_size
            .map_or("one group".to_string(), |g| format!("group {g}"));
        q.scheme = format!(
            "gptq {}-bit {group}{}, format {}",
            opts.bits,
            if opts.desc_act { " act-order" } else { "" },
            if opts.v1 { "gptq" } else { "gptq_v2" }
        );
    }
}

/// The GPTQ Linear whose `qweight` is tensor `i`, checked against the options.
fn layer(ctx: &Ctx, o: &Options, i: usize, t: &TensorEntry, stem: &str) -> Result<Found, String> {
    let part = |suffix: &str| -> Result<(usize, &TensorEntry), String> {
        ctx.get(&format!("{stem}.{suffix}"))
            .ok_or_else(|| format!("`{}` has no `{stem}.{suffix}`", t.name))
    };
    let (z, zt) = part("qzeros")?;
    let (s, st) = part("scales")?;
    let g_idx = ctx.get(&format!("{stem}.g_idx"));
    let name = format!("{stem}.weight");
    if ctx.get(&name).is_some() {
        return Err(format!(
            "`{name}` is both a tensor and the weight `{}` decodes into",
            t.name
        ));
    }
    let bad = |why: String| -> String {
        format!(
            "`{}` {} {:?}, `{}` {} {:?}, `{}` {} {:?}{} do not fit gptq {}-bit{}: {why}",
            t.name,
            t.dtype,
            t.shape,
            zt.name,
            zt.dtype,
            zt.shape,
            st.name,
            st.dtype,
            st.shape,
            g_idx.map_or(String::new(), |(_, g)| format!(
                ", `{}` {} {:?}",
                g.name, g.dtype, g.shape
            )),
            o.bits,
            o.group_size
                .map_or(" (one group)".to_string(), |g| format!(" group {g}")),
        )
    };
    if g_idx.is_none() && o.desc_act {
        return Err(format!(
            "`{}` has no `{stem}.g_idx`, and `desc_act` (act-order) needs one",
            t.name
        ));
    }
    let gptq = shapes(o, t, zt, st, g_idx.map(|(_, g)| g)).map_err(bad)?;
    let mut parts = vec![i, z, s];
    let mut names = vec![t.name.as_str(), zt.name.as_str(), st.name.as_str()];
    if let Some((g, gt)) = g_idx {
        parts.push(g);
        names.push(gt.name.as_str());
    }
    let names: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    Ok(Found {
        parts,
        name,
        dtype: st.dtype,
        packing: Packing::Gptq(gptq),
        what: format!(
            "gptq {}-bit {} ({})",
            o.bits,
            o.group_size
                .map_or("one group".to_string(), |g| format!("group {g}")),
            names.join(", ")
        ),
    })
}

/// The GPTQ parameters of `qweight` `t`, `qzeros` `zt`, `scales` `st` and `g_idx` `g`, or why
/// their shapes and dtypes do not fit the options.
fn shapes(
    o: &Options,
    t: &TensorEntry,
    zt: &TensorEntry,
    st: &TensorEntry,
    g_idx: Option<&TensorEntry>,
) -> Result<Gptq, String> {
    let two_d = |e: &TensorEntry| e.shape.len() == 2;
    if !(two_d(t) && two_d(zt) && two_d(st)) {
        return Err("qweight, qzeros and scales are 2-D".into());
    }
    if !matches!(t.dtype, DType::I32 | DType::U32) || !matches!(zt.dtype, DType::I32 | DType::U32) {
        return Err("qweight and qzeros are int32".into());
    }
    if !matches!(st.dtype, DType::F16 | DType::BF16 | DType::F32) {
        return Err("scales are f16, bf16 or f32".into());
    }
    let b = o.bits as u64;
    let (packed, outputs, groups) = (t.shape[0], t.shape[1], st.shape[0]);
    // the inputs the words hold (3 bits: 32 in 3 words); gptqmodel's padding of a last
    // partial word is not told apart from a short g_idx, so it is refused
    let holds = if b == 3 {
        packed / 3 * 32
    } else {
        packed * 32 / b
    };
    if b == 3 && packed % 3 != 0 {
        return Err("3-bit qweight packs 32 inputs in 3 rows".into());
    }
    let inputs = match g_idx {
        Some(g) => {
            if g.shape.len() != 1 || !matches!(g.dtype, DType::I32 | DType::I64) {
                return Err("g_idx is 1-D int32".into());
            }
            g.shape[0]
        }
        None => holds,
    };
    if inputs != holds {
        return Err(format!(
            "g_idx gives {inputs} inputs and qweight's {packed} rows hold {holds}"
        ));
    }
    if inputs == 0 || outputs == 0 || groups == 0 {
        return Err("no values".into());
    }
    let group_size = o.group_size.unwrap_or(inputs);
    let gptq = Gptq {
        bits: o.bits,
        inputs,
        outputs,
        groups,
        group_size,
        v1: o.v1,
        scales: st.dtype,
        g_idx: g_idx.map(|g| g.dtype),
    };
    if st.shape[1] != outputs || zt.shape[0] != groups || zt.shape[1] != gptq.zero_words() {
        return Err(format!(
            "{outputs} outputs in {groups} groups need qzeros [{groups}, {}] and scales \
             [{groups}, {outputs}]",
            gptq.zero_words()
        ));
    }
    if b == 3 && outputs % 32 != 0 {
        return Err("3-bit zero points pack 32 outputs in 3 words".into());
    }
    if groups != inputs.div_ceil(group_size) {
        return Err(format!(
            "{inputs} inputs make {} groups",
            inputs.div_ceil(group_size)
        ));
    }
    Ok(gptq)
}
