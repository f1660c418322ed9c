//! Low-bit packed weights: finding them (from the config and the tensor names) and listing each
//! in the catalogue as the weight it decodes into, read through its stored parts
//! ([`crate::cast::packed`] holds the arithmetic). The stored tensors are kept aside for
//! `--on-quantized keep`.

use std::collections::HashMap;

use serde_json::Value;

use super::Quantization;
use crate::cast::packed::Packing;
use crate::catalogue::quant::Decode;
use crate::catalogue::{Catalogue, TensorEntry};
use crate::dtype::DType;

mod awq;
mod bnb;
pub(super) mod ct;
mod gptq;
mod mxfp4;

pub(in crate::quant) use ct::FORMATS as CT_FORMATS;

/// One packed weight found (see [`find`]).
pub(super) struct Found {
    /// Catalogue indices of its stored parts, in the order its packing names them.
    parts: Vec<usize>,
    /// The name of the weight it decodes into.
    name: String,
    /// The dtype of its values (the reference's).
    dtype: DType,
    /// How the parts give the values.
    packing: Packing,
    /// The scheme and the parts, in words, for the plan.
    what: String,
}

/// What every scheme's finder reads: the catalogue, tensor indices by name, the config's
/// `quantization_config` and its `quant_method`.
struct Ctx<'a> {
    cat: &'a Catalogue,
    by_name: HashMap<&'a str, usize>,
    config: Option<&'a Value>,
    /// ModelOpt's `hf_quant_config.json`.
    modelopt: Option<&'a Value>,
    method: &'a str,
}

impl Ctx<'_> {
    /// The catalogue tensor named `name`.
    fn get(&self, name: &str) -> Option<(usize, &TensorEntry)> {
        self.by_name.get(name).map(|&i| (i, &self.cat.tensors[i]))
    }
}

/// Parses the config's options with `parse` (none without a config) and runs `layer` on every
/// tensor whose name ends with `suffix`, collecting the weights found; the first failure makes
/// `q` unsupported. Returns the options when there were any.
fn each_layer<O>(
    ctx: &Ctx,
    q: &mut Quantization,
    found: &mut Vec<Found>,
    parse: impl FnOnce(&Value) -> Result<O, String>,
    suffix: &str,
    layer: impl Fn(&O, usize, &TensorEntry, &str) -> Result<Found, String>,
) -> Option<O> {
    let opts = match ctx.config.map(parse)? {
        Ok(o) => o,
        Err(e) => {
            q.unsupported.get_or_insert(e);
            return None;
        }
    };
    for (i, t) in ctx.cat.tensors.iter().enumerate() {
        let Some(stem) = t.name.strip_suffix(suffix) else {
            continue;
        };
        match layer(&opts, i, t, stem) {
            Ok(f) => found.push(f),
            Err(e) => {
                q.unsupported.get_or_insert(e);
            }
        }
    }
    Some(opts)
}

impl Found {
    /// Catalogue indices of its stored parts.
    pub(super) fn parts(&self) -> &[usize] {
        &self.parts
    }
}

/// Finds the packed weights of `cat`. A layout that does not fit its scheme makes `q`
/// unsupported, naming the tensors.
pub(super) fn find(
    cat: &Catalogue,
    config: Option<&Value>,
    modelopt: Option<&Value>,
    q: &mut Quantization,
) -> Vec<Found> {
    let ctx = Ctx {
        cat,
        by_name: cat
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect(),
        config,
        modelopt,
        method: config
            .and_then(|c| c.get("quant_method"))
            .and_then(Value::as_str)
            .unwrap_or(""),
    };
    let mut found = Vec::new();
    mxfp4::experts(&ctx, q, &mut found);
    ct::find(&ctx, q, &mut found);
    gptq::find(&ctx, q, &mut found);
    awq::find(&ctx, q, &mut found);
    bnb::find(&ctx, q, &mut found);
    let packed_method = matches!(ctx.method, "mxfp4" | "gptq" | "awq" | "bitsandbytes");
    if packed_method && found.is_empty() {
        q.unsupported.get_or_insert(format!(
            "config.json declares quant_method `{}`, and no tensor is packed as it says",
            ctx.method
        ));
    }
    for f in &found {
        if let Some((i, t)) = ctx.get(&f.name) {
            if !f.parts.contains(&i) {
                q.unsupported.get_or_insert(format!(
                    "`{}` is both a tensor and the weight {} decodes into",
                    t.name, f.what
                ));
            }
        }
        let want = f.packing.part_bytes();
        for (&p, w) in f.parts.iter().zip(want) {
            let t = &cat.tensors[p];
            if t.nbytes != w || t.strided.is_some() || t.blocks.is_some() || t.rows.is_some() {
                q.unsupported.get_or_insert(format!(
                    "`{}` holds {} bytes where {} needs {w} in one contiguous run",
                    t.name, t.nbytes, f.what
                ));
            }
        }
    }
    found
}

/// Lists each packed weight of `found` in `cat` as the weight it decodes into, at its
/// payload's place; its parts leave the list and the tensors as stored are kept in
/// `q.stored`.
pub(super) fn unpack(cat: &mut Catalogue, found: Vec<Found>, q: &mut Quantization) {
    if found.is_empty() || q.unsupported.is_some() {
        return;
    }
    let stored = cat.tensors.clone();
    let mut part_of = vec![None; cat.tensors.len()];
    for (k, f) in found.iter().enumerate() {
        for &p in &f.parts {
            part_of[p] = Some(k);
        }
    }
    let mut tensors = Vec::with_capacity(cat.tensors.len());
    for (i, t) in stored.iter().enumerate() {
        match part_of[i] {
            None => tensors.push(t.clone()),
            // the decoded weight takes its payload's place
            Some(k) if found[k].parts[0] == i => {
                let f = &found[k];
                let payload = &stored[f.parts[0]];
                let shape = f.packing.shape();
                let nbytes = f.packing.numel() * (f.dtype.bitsize() / 8) as u64;
                let entry = TensorEntry::new(
                    f.name.clone(),
                    f.dtype,
                    shape,
                    payload.file,
                    payload.offset,
                    nbytes,
                )
                .with_decode(Decode {
                    packing: f.packing,
                    parts: f.parts.iter().map(|&p| stored[p].clone()).collect(),
                    what: f.what.clone(),
                });
                tensors.push(entry);
            }
            Some(_) => {}
        }
    }
    cat.tensors = tensors;
    q.stored = Some(stored);
}
