//! Finding bitsandbytes serialized weights (NF4/FP4 4-bit with absmax, int8 with `SCB`), as
//! transformers' `save_pretrained` writes a model loaded with `BitsAndBytesConfig`.

use serde_json::Value;

use super::{Ctx, Found};
use crate::cast::packed::bnb::{Bnb, Kind, Nested};
use crate::cast::packed::Packing;
use crate::catalogue::{Catalogue, TensorEntry};
use crate::dtype::DType;
use crate::quant::Quantization;
use crate::source::Sources;

/// Largest quant_state JSON read (bitsandbytes writes ~170 bytes).
const MAX_STATE_BYTES: u64 = 64 * 1024;

/// Largest `weight_format` read (a 0-d integer).
const MAX_FORMAT_BYTES: u64 = 8;

/// Where a 4-bit weight's quant_state tensor name starts after the weight's name.
const STATE: &str = ".quant_state.bitsandbytes__";

/// Suffixes of the parts of a 4-bit weight `X.weight`, after its name, in part order: payload,
/// absmax, quant_map (the quant_state JSON comes next), then those of double quantization.
const ABSMAX: &str = ".absmax";
const QUANT_MAP: &str = ".quant_map";
const NESTED_ABSMAX: &str = ".nested_absmax";
const NESTED_MAP: &str = ".nested_quant_map";

/// bitsandbytes' weights: each 4-bit weight, found by its
/// `X.weight.quant_state.bitsandbytes__nf4|fp4` JSON tensor (read here for the shape, dtype and
/// block sizes), and each int8 weight, found by its `X.SCB`; decoded into `X.weight` (see
/// [`Bnb`]). Found from the names alone; under `quant_method: bitsandbytes`, a part that belongs
/// to no weight makes `q` unsupported too.
pub(super) fn find(ctx: &Ctx, q: &mut Quantization, found: &mut Vec<Found>) {
    let mut small = Small {
        cat: ctx.cat,
        sources: None,
    };
    let first = found.len();
    for (i, t) in ctx.cat.tensors.iter().enumerate() {
        let got = if let Some((weight, kind)) = t.name.split_once(STATE) {
            four_bit(ctx, &mut small, i, weight, kind)
        } else if let Some(stem) = t.name.strip_suffix(".SCB") {
            int8(ctx, &mut small, i, stem)
        } else {
            continue;
        };
        match got {
            Ok(f) => found.push(f),
            Err(m) => {
                q.unsupported.get_or_insert(m);
            }
        }
    }
    if ctx.method == "bitsandbytes" || found.len() > first {
        if let Some(m) = stray(ctx, &found[first..]) {
            q.unsupported.get_or_insert(m);
        }
    }
    if found.len() > first && q.scheme.is_empty() {
        q.scheme = "bitsandbytes".into();
        q.found_in = "tensor names".into();
    }
}

/// Reads small tensors (the quant_state JSON, `weight_format`) at detection time, the input's
/// files opened on first use.
struct Small<'a> {
    cat: &'a Catalogue,
    sources: Option<Sources<'a>>,
}

impl Small<'_> {
    /// The bytes of `t`, refused past `cap`.
    fn read(&mut self, t: &TensorEntry, cap: u64) -> Result<Vec<u8>, String> {
        if t.nbytes > cap {
            return Err(format!(
                "`{}` holds {} bytes, more than the {cap} bitsandbytes writes at most",
                t.name, t.nbytes
            ));
        }
        if self.sources.is_none() {
            self.sources = Some(Sources::open(self.cat).map_err(|e| e.to_string())?);
        }
        let Some(sources) = &self.sources else {
            return Err(format!("cannot read `{}`", t.name));
        };
        let mut b = vec![0u8; t.nbytes as usize];
        sources
            .read(t, 0, &mut b)
            .map_err(|e| format!("cannot read `{}`: {e}", t.name))?;
        Ok(b)
    }
}

/// What a 4-bit weight's quant_state JSON says.
struct State {
    fp4: bool,
    blocksize: u64,
    dtype: DType,
    rows: u64,
    cols: u64,
    /// `nested_blocksize` and `nested_offset` (f32), when given.
    nested: Option<(u64, f32)>,
}

/// Parses the quant_state JSON `bytes` of tensor `name`, whose name says quant type `kind`.
fn parse_state(name: &str, kind: &str, bytes: &[u8]) -> Result<State, String> {
    let bad = |what: &str| format!("bitsandbytes quant_state `{name}`: {what}");
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| bad(&format!("not JSON ({})", e.to_string().replace('\n', " "))))?;
    let key = |k: &str| v.get(k).ok_or_else(|| bad(&format!("no `{k}`")));
    let uint = |k: &str| -> Result<u64, String> {
        key(k)?
            .as_u64()
            .filter(|&b| b > 0)
            .ok_or_else(|| bad(&format!("`{k}` is not a positive integer")))
    };
    let quant_type = key("quant_type")?.as_str().unwrap_or("");
    let fp4 = match quant_type {
        "nf4" => false,
        "fp4" => true,
        t => return Err(bad(&format!("quant_type `{t}` (nf4 or fp4 are read)"))),
    };
    if quant_type != kind {
        return Err(bad(&format!(
            "its name says {kind}, its quant_type {quant_type}"
        )));
    }
    let dtype = match key("dtype")?.as_str().unwrap_or("") {
        "float32" => DType::F32,
        "bfloat16" => DType::BF16,
        "float16" => DType::F16,
        d => {
            return Err(bad(&format!(
                "dtype `{d}` (float32, bfloat16 or float16 are read)"
            )))
        }
    };
    let shape: Vec<u64> = key("shape")?
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let [rows, cols] = shape[..] else {
        return Err(bad(&format!("shape {} is not [out, in]", key("shape")?)));
    };
    let nested = match v.get("nested_blocksize") {
        None => None,
        Some(_) => {
            let offset = key("nested_offset")?
                .as_f64()
                .ok_or_else(|| bad("`nested_offset` is not a number"))?;
            if v.get("nested_dtype").and_then(Value::as_str) != Some("float32") {
                return Err(bad("`nested_dtype` is not float32"));
            }
            // as `torch.tensor(float(nested_offset))`: rounded to f32
            Some((uint("nested_blocksize")?, offset as f32))
        }
    };
    Ok(State {
        fp4,
        blocksize: uint("blocksize")?,
        dtype,
        rows,
        cols,
        nested,
    })
}

/// The 4-bit weight `weight` whose quant_state JSON is tensor `s` (quant type `kind`).
fn four_bit(
    ctx: &Ctx,
    small: &mut Small,
    s: usize,
    weight: &str,
    kind: &str,
) -> Result<Found, String> {
    let st = &ctx.cat.tensors[s];
    if st.dtype != DType::U8 {
        return Err(format!(
            "bitsandbytes quant_state `{}` is {}, not uint8",
            st.name, st.dtype
        ));
    }
    let state = parse_state(&st.name, kind, &small.read(st, MAX_STATE_BYTES)?)?;
    let part = |suffix: &str, dtype: DType| -> Result<usize, String> {
        let name = format!("{weight}{suffix}");
        let (i, t) = ctx
            .get(&name)
            .ok_or_else(|| format!("bitsandbytes 4-bit weight `{weight}` has no `{name}`"))?;
        if t.dtype != dtype {
            return Err(format!(
                "`{name}` is {} where bitsandbytes stores {dtype}",
                t.dtype
            ));
        }
        Ok(i)
    };
    let nested_part = ctx.get(&format!("{weight}{NESTED_ABSMAX}")).is_some();
    let absmax_dtype = if nested_part { DType::U8 } else { DType::F32 };
    let mut parts = vec![
        part("", DType::U8)?,
        part(ABSMAX, absmax_dtype)?,
        part(QUANT_MAP, DType::F32)?,
        s,
    ];
    let nested = match (nested_part, state.nested) {
        (false, None) => None,
        (true, Some((blocksize, offset))) => {
            parts.push(part(NESTED_ABSMAX, DType::F32)?);
            parts.push(part(NESTED_MAP, DType::F32)?);
            Some(Nested {
                blocksize,
                offset: offset.to_bits(),
            })
        }
        (true, None) => {
            return Err(format!(
                "`{weight}{NESTED_ABSMAX}` is stored, and quant_state `{}` has no nested_blocksize",
                st.name
            ))
        }
        (false, Some(_)) => {
            return Err(format!(
                "quant_state `{}` is double-quantized, and `{weight}{NESTED_ABSMAX}` is missing",
                st.name
            ))
        }
    };
    let payload = &ctx.cat.tensors[parts[0]];
    let n = state.rows.checked_mul(state.cols);
    if n.map(|n| n.div_ceil(2)) != Some(payload.nbytes) {
        return Err(format!(
            "`{weight}` holds {} bytes, and the shape [{}, {}] its quant_state gives needs {}",
            payload.nbytes,
            state.rows,
            state.cols,
            n.map_or("more".into(), |n| n.div_ceil(2).to_string())
        ));
    }
    let packing = Packing::Bnb(Bnb {
        rows: state.rows,
        cols: state.cols,
        kind: Kind::Four {
            fp4: state.fp4,
            blocksize: state.blocksize,
            state_bytes: st.nbytes,
            nested,
        },
    });
    let what = format!(
        "bitsandbytes {kind}, blocks of {}{} ({})",
        state.blocksize,
        if nested.is_some() {
            ", double-quantized"
        } else {
            ""
        },
        names(ctx, &parts)
    );
    Ok(Found {
        parts,
        name: weight.to_string(),
        dtype: state.dtype,
        packing,
        what,
    })
}

/// The int8 weight `stem.weight` whose row scales are tensor `s` (`stem.SCB`).
fn int8(ctx: &Ctx, small: &mut Small, s: usize, stem: &str) -> Result<Found, String> {
    let scb = &ctx.cat.tensors[s];
    let name = format!("{stem}.weight");
    let (w, wt) = ctx
        .get(&name)
        .ok_or_else(|| format!("bitsandbytes `{}` has no `{name}`", scb.name))?;
    let fits = wt.dtype == DType::I8
        && wt.shape.len() == 2
        && scb.dtype == DType::F32
        && scb.shape == wt.shape[..1];
    if !fits {
        return Err(format!(
            "`{name}` {} {:?} and `{}` {} {:?} are not bitsandbytes int8 rows [out, in] and \
             their f32 scales [out]",
            wt.dtype, wt.shape, scb.name, scb.dtype, scb.shape
        ));
    }
    let mut parts = vec![w, s];
    let mut format_part = false;
    let format_name = format!("{stem}.weight_format");
    if let Some((f, ft)) = ctx.get(&format_name) {
        // 0 is bitsandbytes' "row", the only format it reads (absent means row too)
        let integer = matches!(ft.dtype, DType::U8 | DType::I8 | DType::I32 | DType::I64);
        let b = small.read(ft, MAX_FORMAT_BYTES)?;
        if !integer || ft.numel() != 1 || b.iter().any(|&x| x != 0) {
            return Err(format!(
                "`{format_name}` is not 0 (row): bitsandbytes int8 weights are read in row \
                 format only"
            ));
        }
        parts.push(f);
        format_part = true;
    }
    let packing = Packing::Bnb(Bnb {
        rows: wt.shape[0],
        cols: wt.shape[1],
        kind: Kind::Int8 { format_part },
    });
    let what = format!("bitsandbytes int8 rows ({})", names(ctx, &parts));
    Ok(Found {
        parts,
        name,
        // `int8_vectorwise_dequant` gives f32; transformers' `dequantize()` then casts to the
        // model's dtype, one rounding, as `--to` that dtype does
        dtype: DType::F32,
        packing,
        what,
    })
}

/// The tensors `parts` names, quoted, comma-separated; those named after the first by a suffix
/// of its name by that suffix (`X.weight` and its `.absmax`, ...).
fn names(ctx: &Ctx, parts: &[usize]) -> String {
    let first = &ctx.cat.tensors[parts[0]].name;
    let rest: Vec<String> = parts[1..]
        .iter()
        .map(|&p| {
            let n = &ctx.cat.tensors[p].name;
            format!("`{}`", n.strip_prefix(first.as_str()).unwrap_or(n))
        })
        .collect();
    if parts[1..]
        .iter()
        .all(|&p| ctx.cat.tensors[p].name.starts_with(first.as_str()))
    {
        format!("`{first}` and its {}", rest.join(", "))
    } else {
        format!("`{first}`, {}", rest.join(", "))
    }
}

/// A bitsandbytes part no weight of `found` claims (an absmax without its quant_state, an int8
/// weight without its SCB), in words.
fn stray(ctx: &Ctx, found: &[Found]) -> Option<String> {
    let claimed: std::collections::HashSet<usize> =
        found.iter().flat_map(|f| f.parts.iter().copied()).collect();
    ctx.cat.tensors.iter().enumerate().find_map(|(i, t)| {
        if claimed.contains(&i) {
            return None;
        }
        let n = t.name.as_str();
        if let Some(w) = [ABSMAX, QUANT_MAP, NESTED_ABSMAX, NESTED_MAP]
            .iter()
            .find_map(|s| n.strip_suffix(s))
        {
            return Some(format!(
                "`{n}` belongs to no bitsandbytes weight: `{w}` has no quant_state"
            ));
        }
        if let Some(stem) = n.strip_suffix(".weight_format") {
            return Some(format!(
                "`{n}` belongs to no bitsandbytes weight: no `{stem}.SCB`"
            ));
        }
        let int8_weight = t.dtype == DType::I8 && n.ends_with(".weight");
        (int8_weight && ctx.method == "bitsandbytes").then(|| {
            format!(
                "`{n}` is int8 with no `{}.SCB` beside it",
                &n[..n.len() - ".weight".len()]
            )
        })
    })
}
