//! The parts that several commands' JSON documents share: a plan (`convert --dry-run --json`,
//! and the summary of a finished conversion) and the figures of one error measurement
//! (`analyze`, `diff`). Serde types: the field order is the document's key order.

use std::path::PathBuf;

use serde::Serialize;

use crate::catalogue::{Catalogue, TensorEntry};
use crate::output::Layout;
use crate::plan::{Plan, QuantPlan, ScaledOut, Scope, TensorPlan};
use crate::stats::ErrorStats;

/// A map whose keys keep their order (a JSON object).
#[derive(Debug, Clone, Default)]
pub struct Ordered<T>(pub Vec<(String, T)>);

impl<T> Ordered<T> {
    /// Whether it has no key.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<T: Serialize> Serialize for Ordered<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// A finite number, or null (JSON has no infinity or NaN).
fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// The figures of one error measurement. An infinite SNR is null; `nonfinite` > 0 says it is
/// `-inf` (finite values became inf or NaN: the error figures are infinite, shown as null
/// too, and cosine is NaN, null).
#[derive(Debug, Clone, Serialize)]
pub struct StatsDoc {
    /// Values measured.
    pub count: u64,
    /// NaN values in the input.
    pub nan_in: u64,
    /// Infinite values in the input.
    pub inf_in: u64,
    /// Smallest finite value.
    pub min: Option<f64>,
    /// Largest finite value.
    pub max: Option<f64>,
    /// Largest magnitude.
    pub max_abs: f64,
    /// Non-zero values.
    pub nonzero: u64,
    /// Values beyond the target's range.
    pub overflow: u64,
    /// `overflow` / `count`.
    pub overflow_fraction: f64,
    /// Finite values that became inf or NaN.
    pub nonfinite: u64,
    /// Non-zero values that became zero.
    pub underflow: u64,
    /// `underflow` / `nonzero`.
    pub underflow_fraction: f64,
    /// Values that became subnormal.
    pub subnormal: u64,
    /// `subnormal` / `count`.
    pub subnormal_fraction: f64,
    /// Largest absolute error.
    pub max_abs_err: f64,
    /// Largest relative error.
    pub max_rel_err: f64,
    /// Mean relative error.
    pub mean_rel_err: f64,
    /// Root mean square error.
    pub rms_err: f64,
    /// Signal-to-noise ratio in dB (null: infinite, or `-inf` when `nonfinite` > 0).
    pub snr_db: Option<f64>,
    /// Cosine similarity.
    pub cosine: f64,
}

impl From<&ErrorStats> for StatsDoc {
    fn from(s: &ErrorStats) -> StatsDoc {
        let frac = |n: u64, d: u64| if d == 0 { 0.0 } else { n as f64 / d as f64 };
        StatsDoc {
            count: s.count,
            nan_in: s.nan_in,
            inf_in: s.inf_in,
            min: finite(s.min),
            max: finite(s.max),
            max_abs: s.max_abs,
            nonzero: s.nonzero,
            overflow: s.overflow,
            overflow_fraction: frac(s.overflow, s.count),
            nonfinite: s.nonfinite,
            underflow: s.underflow,
            underflow_fraction: s.underflow_fraction(),
            subnormal: s.subnormal,
            subnormal_fraction: frac(s.subnormal, s.count),
            max_abs_err: s.max_abs_err,
            max_rel_err: s.max_rel_err,
            mean_rel_err: s.mean_rel_err(),
            rms_err: s.rms_err(),
            snr_db: finite(s.snr_db()),
            cosine: s.cosine(),
        }
    }
}

/// What one tensor of a plan becomes.
#[derive(Debug, Clone, Serialize)]
pub struct PlanEntry {
    /// Its name in the output.
    pub name: String,
    /// Its shape.
    pub shape: Vec<u64>,
    /// Its stored dtype.
    pub from: String,
    /// Its dtype in the output.
    pub to: String,
    /// Whether it is cast.
    pub cast: bool,
    /// Bytes in the input.
    pub bytes_before: u64,
    /// Bytes in the output.
    pub bytes_after: u64,
    /// The rule that decided it.
    pub rule: String,
    /// Written as scaled FP8: its scale, or the payload it scales.
    pub quantize: Option<serde_json::Value>,
    /// Dequantized from a scaled input.
    pub dequantize: Option<serde_json::Value>,
    /// A GGUF output: the ggml type it is written in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ggml_type: Option<&'static str>,
    /// Renamed in the output (a GGUF output of a model folder): its name in the input.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_name: Option<String>,
    /// For a tensor outside the state dict: the checkpoint entry it is in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<String>,
    /// Its values multiplied by this factor (a rules file's `scale`), in f32 before the cast.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    /// How the factor applies, when not to the values as stored: `1+w` (written as
    /// `scale * (1 + w) - 1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub form: Option<&'static str>,
}

/// A tensor removed from the output, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Removed {
    /// Its name.
    pub name: String,
    /// Why.
    pub reason: String,
}

/// A checkpoint entry left out of the output.
#[derive(Debug, Clone, Serialize)]
pub struct Dropped {
    /// The entry.
    pub entry: String,
    /// Tensors in it.
    pub tensors: usize,
    /// Their bytes.
    pub bytes: u64,
    /// What it is, when it is training state.
    pub training_state: Option<&'static str>,
}

/// The plan's totals.
#[derive(Debug, Clone, Serialize)]
pub struct PlanTotals {
    /// Tensors written.
    pub tensors: usize,
    /// Tensors cast.
    pub cast: usize,
    /// Tensors kept as stored.
    pub kept: usize,
    /// Bytes in.
    pub bytes_before: u64,
    /// Bytes out.
    pub bytes_after: u64,
}

/// One output file.
#[derive(Debug, Clone, Serialize)]
pub struct FileDoc {
    /// Its name.
    pub name: String,
    /// Tensors in it.
    pub tensors: usize,
    /// Its bytes.
    pub bytes: u64,
}

/// A quantized input, and what the plan does with it.
#[derive(Debug, Clone, Serialize)]
pub struct PlanQuantization {
    /// The scheme.
    pub scheme: String,
    /// Where it was found.
    pub found_in: String,
    /// The scale layouts in use.
    pub layouts: Vec<String>,
    /// `dequantize`, `keep`, `unsupported` or `none`.
    pub action: &'static str,
    /// Why it cannot be dequantized, when it cannot.
    pub unsupported: Option<String>,
}

/// `convert --dry-run --json`: what every output gets.
#[derive(Debug, Clone, Serialize)]
pub struct PlanDoc {
    /// The input.
    pub input: PathBuf,
    /// The default target (torch's name).
    pub target: &'static str,
    /// The state dict's tensors.
    pub tensors: Vec<PlanEntry>,
    /// Tensors outside the state dict (a whole-file `.pt` output).
    pub other_tensors: Vec<PlanEntry>,
    /// Checkpoint entries left out.
    pub dropped: Vec<Dropped>,
    /// The state dict's entry in a training checkpoint.
    pub state_dict_entry: Option<String>,
    /// Whether the checkpoint is written (not only the state dict): whole, or without its
    /// training state (`scope` says which).
    pub whole_file: bool,
    /// `state_dict`, `whole_file` or `inference` (the checkpoint without its training state).
    pub scope: &'static str,
    /// Totals.
    pub totals: PlanTotals,
    /// The weights files.
    pub files: Vec<FileDoc>,
    /// The index file, when one is written.
    pub index: Option<String>,
    /// The plan's warnings.
    pub warnings: Vec<String>,
    /// Tensors removed (a dequantized scheme's scales).
    pub removed: Vec<Removed>,
    /// A quantized input.
    pub quantization: Option<PlanQuantization>,
    /// The `config.json` keys the output gets (a rules file's `[config]`) and their values.
    #[serde(skip_serializing_if = "Ordered::is_empty")]
    pub config: Ordered<serde_json::Value>,
}

/// The ggml type a GGUF output writes plan entry `p` (of tensor `t`) in.
fn written_ggml(t: &TensorEntry, p: &TensorPlan) -> Option<&'static str> {
    if crate::formats::gguf::copies_blocks(t, p) {
        t.blocks.map(|b| b.ggml.name)
    } else if let Some(g) = p.ggml {
        Some(g.name)
    } else {
        crate::formats::gguf::write::ggml_of(p.to).map(|g| g.name)
    }
}

/// The plan entry of tensor `e` (planned as `p`).
fn entry<I>(cat: &Catalogue, e: &TensorEntry, p: &TensorPlan<I>) -> PlanEntry {
    use serde_json::json;
    PlanEntry {
        name: e.name.clone(),
        shape: e.shape.clone(),
        from: p.from.to_string(),
        to: p.to.to_string(),
        cast: p.is_cast(),
        bytes_before: p.bytes_in,
        bytes_after: p.bytes_out,
        rule: p.reason.clone(),
        quantize: match p.scaled {
            Some(ScaledOut::Payload { scale, layout, .. }) => Some(json!({
                "scale": cat.tensors[scale].name, "layout": layout.describe()})),
            Some(ScaledOut::Scale { payload }) => {
                Some(json!({"scale_of": cat.tensors[payload].name}))
            }
            Some(ScaledOut::Fp4 {
                weight,
                part,
                kind,
                fused,
            }) => {
                use crate::quant::fp4::Fp4Part;
                let w = &cat.tensors[weight].name;
                Some(match part {
                    Fp4Part::Packed => json!({"fp4": kind.name(), "weight": w,
                                              "group_size": kind.group()}),
                    Fp4Part::Scale => json!({"scale_of": w}),
                    Fp4Part::Global => json!({"global_scale_of": w, "shared_with":
                        fused.iter().flatten().map(|s| &cat.tensors[*s].name).collect::<Vec<_>>()}),
                })
            }
            None => None,
        },
        dequantize: p
            .dequant
            .map(|d| {
                json!({
                    "scale": cat.tensors[d.scale].name, "layout": d.layout.describe(),
                    "compute": d.compute.to_string(),
                })
            })
            .or_else(|| {
                // a GGUF block-quantized tensor: `from` is the f32 it reads as
                e.blocks.map(|b| {
                    json!({"ggml_type": b.ggml.name, "stored_bytes": b.nbytes,
                               "as": "gguf.quants.dequantize"})
                })
            })
            .or_else(|| {
                // a packed low-bit weight: `from` is the dtype its reference decodes into
                e.decode.as_ref().map(|d| {
                    json!({"packed": d.what,
                           "parts": d.parts.iter().map(|p| p.name.clone()).collect::<Vec<_>>(),
                           "stored_bytes": d.parts.iter().map(|p| p.nbytes).sum::<u64>()})
                })
            }),
        entry: None,
        ggml_type: None,
        source_name: None,
        scale: p.factor.map(|f| f.scale),
        form: p.factor.and_then(|f| f.form.name()),
    }
}

impl PlanDoc {
    /// The document of `plan` over `cat`, written as `layout`.
    pub fn new(cat: &Catalogue, plan: &Plan, layout: &Layout) -> PlanDoc {
        let others = cat.torch.as_deref().map(|d| &d.others[..]).unwrap_or(&[]);
        let t = plan.totals();
        let gguf_out = (cat.gguf.is_some() || plan.gguf_hf.is_some())
            && layout.files.len() == 1
            && layout.files[0].name.to_ascii_lowercase().ends_with(".gguf");
        let renamed: std::collections::HashMap<usize, &str> = plan
            .gguf_hf
            .iter()
            .flat_map(|h| h.tensors.iter().map(|t| (t.source, t.name.as_str())))
            .collect();
        PlanDoc {
            input: cat.path.clone(),
            target: plan.target.torch_name(),
            tensors: plan
                .tensors()
                .iter()
                .map(|p| {
                    let t = &cat.tensors[p.tensor];
                    let mut e = entry(cat, t, p);
                    if gguf_out {
                        e.ggml_type = written_ggml(t, p);
                    }
                    if let Some(n) = renamed.get(&p.tensor.0) {
                        e.source_name = Some(std::mem::replace(&mut e.name, n.to_string()));
                    }
                    e
                })
                .collect(),
            other_tensors: plan
                .others()
                .iter()
                .map(|p| {
                    let o = &others[p.tensor];
                    PlanEntry {
                        entry: Some(o.section.clone()),
                        ..entry(cat, &o.entry, p)
                    }
                })
                .collect(),
            dropped: plan
                .dropped
                .iter()
                .map(|(n, k, b)| Dropped {
                    entry: n.clone(),
                    tensors: *k,
                    bytes: *b,
                    training_state: cat
                        .torch
                        .as_deref()
                        .and_then(|d| d.training.iter().find(|t| &t.0 == n))
                        .map(|t| t.1),
                })
                .collect(),
            state_dict_entry: cat.torch.as_deref().and_then(|d| d.entry.clone()),
            whole_file: !matches!(plan.scope, Scope::StateDict),
            scope: match plan.scope {
                Scope::StateDict => "state_dict",
                Scope::WholeFile { .. } => "whole_file",
                Scope::Inference => "inference",
            },
            totals: PlanTotals {
                tensors: plan.tensors().len() + plan.others().len(),
                cast: t.cast,
                kept: t.kept,
                bytes_before: t.bytes_in,
                bytes_after: t.bytes_out,
            },
            files: files(layout),
            index: layout.index.clone(),
            warnings: plan.warnings.clone(),
            removed: plan
                .removed
                .iter()
                .map(|(i, why)| Removed {
                    name: cat.tensors[*i].name.clone(),
                    reason: why.clone(),
                })
                .collect(),
            quantization: cat.quant.as_deref().map(|q| PlanQuantization {
                scheme: q.scheme.clone(),
                found_in: q.found_in.clone(),
                layouts: q.layouts(),
                action: match &plan.quant {
                    QuantPlan::Dequantize => "dequantize",
                    QuantPlan::Keep => "keep",
                    QuantPlan::Unsupported(_) => "unsupported",
                    QuantPlan::None => "none",
                },
                unsupported: q.unsupported.clone(),
            }),
            config: Ordered(
                plan.config
                    .iter()
                    .map(|e| (e.key.clone(), e.new.clone()))
                    .collect(),
            ),
        }
    }
}

/// The weights files of a layout.
pub fn files(layout: &Layout) -> Vec<FileDoc> {
    layout
        .files
        .iter()
        .map(|f| FileDoc {
            name: f.name.clone(),
            tensors: f.tensors.len(),
            bytes: f.bytes,
        })
        .collect()
}

/// Decimal sizes, as the Hub shows them.
pub fn bytes(n: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < units.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// SNR as text: `inf` when nothing changed.
pub fn db(x: f64) -> String {
    if x == f64::NEG_INFINITY {
        "-inf".into()
    } else if x.is_infinite() {
        "inf".into()
    } else {
        format!("{x:.1}")
    }
}
