//! Finding AWQ packed 4-bit weights (GEMM and GEMV layouts).

use serde_json::Value;

use super::{each_layer, Ctx, Found};
use crate::cast::packed::awq::Awq;
use crate::cast::packed::Packing;
use crate::catalogue::TensorEntry;
use crate::dtype::DType;
use crate::quant::Quantization;

/// The options of an AWQ `quantization_config` weightcast dequantizes.
struct Options {
    /// `group_size`; -1 (one group) as `None`.
    group_size: Option<u64>,
    gemv: bool,
}

/// Reads the config as transformers' `AwqConfig` does (`version` wins over `format`, both
/// lowercased, `gemm` when absent; `group_size` 128 and `zero_point` true when absent), or
/// says what it cannot dequantize.
fn options(c: &Value) -> Result<Options, String> {
    match c.get("bits").map(Value::as_u64) {
        None | Some(Some(4)) => {}
        _ => return Err(format!("awq `bits` {} (AWQ packs 4 bits)", c["bits"])),
    }
    let group_size = match c.get("group_size").map(Value::as_i64) {
        None => Some(128),
        Some(Some(-1)) => None,
        Some(Some(g)) if g > 0 => Some(g as u64),
        Some(_) => {
            return Err(format!(
                "awq `group_size` {} (a positive size or -1)",
                c["group_size"]
            ))
        }
    };
    if c.get("zero_point").and_then(Value::as_bool) == Some(false) {
        return Err(
            "awq with `zero_point` false (autoawq packs only zero-point weights: \
                    `from_linear` needs zeros)"
                .into(),
        );
    }
    let mut version = ["version", "format"]
        .iter()
        .find_map(|k| c.get(*k).and_then(Value::as_str))
        .unwrap_or("gemm")
        .to_lowercase();
    if c.get("backend").and_then(Value::as_str) == Some("llm-awq") {
        version = "llm-awq".into();
    }
    let gemv = match version.as_str() {
        "gemm" => false,
        "gemv" => true,
        v => {
            return Err(format!(
                "awq version `{v}` (weightcast dequantizes the `gemm` and `gemv` layouts)"
            ))
        }
    };
    Ok(Options { group_size, gemv })
}

/// AWQ Linears (`X.qweight`, `X.qzeros`, `X.scales`) when the config says `quant_method: awq`,
/// decoded into `X.weight` `[out, in]` in the scales' dtype as autoawq's `dequantize_gemm`
/// computes it.
pub(super) fn find(ctx: &Ctx, q: &mut Quantization, found: &mut Vec<Found>) {
    if ctx.method != "awq" {
        return;
    }
    let Some(opts) = each_layer(ctx, q, found, options, ".qweight", |o, i, t, stem| {
        layer(ctx, o, i, t, stem)
    }) else {
        return;
    };
    if !found.is_empty() {
        q.scheme = format!(
            "awq {} 4-bit {}",
            if opts.gemv { "gemv" } else { "gemm" },
            group(&opts)
        );
    }
}

fn group(o: &Options) -> String {
    o.group_size
        .map_or("one group".to_string(), |g| format!("group {g}"))
}

/// The AWQ Linear whose `qweight` is tensor `i`, checked against the options.
fn layer(ctx: &Ctx, o: &Options, i: usize, t: &TensorEntry, stem: &str) -> Result<Found, String> {
    let part = |suffix: &str| -> Result<(usize, &TensorEntry), String> {
        ctx.get(&format!("{stem}.{suffix}"))
            .ok_or_else(|| format!("`{}` has no `{stem}.{suffix}`", t.name))
    };
    let (z, zt) = part("qzeros")?;
    let (s, st) = part("scales")?;
    let name = format!("{stem}.weight");
    if ctx.get(&name).is_some() {
        return Err(format!(
            "`{name}` is both a tensor and the weight `{}` decodes into",
            t.name
        ));
    }
    let layout = if o.gemv { "gemv" } else { "gemm" };
    let bad = |why: String| -> String {
        format!(
            "`{}` {} {:?}, `{}` {} {:?}, `{}` {} {:?} do not fit awq {layout} 4-bit {}: {why}",
            t.name,
            t.dtype,
            t.shape,
            zt.name,
            zt.dtype,
            zt.shape,
            st.name,
            st.dtype,
            st.shape,
            group(o)
        )
    };
    let two_d = |e: &TensorEntry| e.shape.len() == 2;
    if !(two_d(t) && two_d(zt) && two_d(st)) {
        return Err(bad("qweight, qzeros and scales are 2-D".into()));
    }
    if !matches!(t.dtype, DType::I32 | DType::U32) || !matches!(zt.dtype, DType::I32 | DType::U32) {
        return Err(bad("qweight and qzeros are int32".into()));
    }
    if !matches!(st.dtype, DType::F16 | DType::BF16 | DType::F32) {
        return Err(bad("scales are f16, bf16 or f32".into()));
    }
    let awq = if o.gemv {
        gemv(o, t, zt, st).map_err(bad)?
    } else {
        gemm(o, t, zt, st).map_err(bad)?
    };
    Ok(Found {
        parts: vec![i, z, s],
        name,
        dtype: st.dtype,
        packing: Packing::Awq(awq),
        what: format!(
            "awq {layout} 4-bit {} (`{}`, `{}`, `{}`)",
            group(o),
            t.name,
            zt.name,
            st.name
        ),
    })
}

/// GEMM: `qweight` `[in, out / 8]`, `qzeros` `[groups, out / 8]`, `scales` `[groups, out]`.
fn gemm(o: &Options, t: &TensorEntry, zt: &TensorEntry, st: &TensorEntry) -> Result<Awq, String> {
    let (inputs, outputs) = (t.shape[0], st.shape[1]);
    if inputs == 0 || outputs == 0 || outputs % 8 != 0 || t.shape[1] != outputs / 8 {
        return Err(format!(
            "qweight [in, out / 8] for scales of {outputs} outputs"
        ));
    }
    let group_size = o.group_size.unwrap_or(inputs);
    let groups = inputs / group_size;
    if inputs % group_size != 0 || st.shape[0] != groups || zt.shape[..] != [groups, outputs / 8] {
        return Err(format!(
            "{inputs} inputs in groups of {group_size} need qzeros [{groups}, {}] and scales \
             [{groups}, {outputs}]",
            outputs / 8
        ));
    }
    Ok(Awq {
        inputs,
        outputs,
        group_size,
        gemv: false,
        zero_words: 0,
        scales: st.dtype,
    })
}

/// GEMV: `qweight` `[out, in / 8]`, `qzeros` `[out, words]`, `scales` `[out, words * 8]`.
fn gemv(o: &Options, t: &TensorEntry, zt: &TensorEntry, st: &TensorEntry) -> Result<Awq, String> {
    let (outputs, inputs) = (t.shape[0], t.shape[1] * 8);
    if inputs == 0 || outputs == 0 {
        return Err("no values".into());
    }
    let group_size = o.group_size.unwrap_or(inputs);
    let groups = inputs / group_size;
    let words = zt.shape[1];
    let fits = inputs % group_size == 0
        && zt.shape[0] == outputs
        && words * 8 >= groups
        && st.shape[..] == [outputs, words * 8];
    if !fits {
        return Err(format!(
            "{inputs} inputs in groups of {group_size} need qzeros [{outputs}, >= {}] and \
             scales [{outputs}, 8 x qzeros' columns]",
            groups.div_ceil(8)
        ));
    }
    Ok(Awq {
        inputs,
        outputs,
        group_size,
        gemv: true,
        zero_words: words,
        scales: st.dtype,
    })
}
