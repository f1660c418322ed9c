//! Planning: one decision per tensor (target dtype and the rule that chose it), before any byte
//! is read. The plan is what `--dry-run` shows and what conversion executes, for every output
//! format: which tensors are written, in which dtype, under which names, and what is left out.
//!
//! For PyTorch inputs the plan also settles storages: every tensor on one storage (views, tied
//! weights) gets the same dtype, or the storage is kept whole and the plan says why, so a `.pt`
//! output (which converts storages) and a safetensors output (which writes tensors) agree.
//!
//! A rules file's `scale` gives a tensor a [`Factor`] (its values are multiplied on the way
//! out: see [`crate::rules`]), and its `[config]` the `config.json` edits the output gets
//! ([`Plan::config`]). Tensors on one storage must share a factor ([`Plan::check_factors`]):
//! a stored tensor is scaled once.

use crate::catalogue::torch::OtherId;
use crate::catalogue::{Catalogue, TensorEntry, TensorId};
use crate::dtype::DType;
use crate::quant::{Role, ScaleLayout};
use crate::rules::{Action, Factor, RuleSet};

/// The decision for one tensor: a catalogue tensor ([`TensorId`], the state dict's) or, for a
/// whole-file `.pt` output, a tensor outside the state dict ([`OtherId`]).
#[derive(Debug, Clone)]
pub struct TensorPlan<I = TensorId> {
    /// Which tensor.
    pub tensor: I,
    /// Stored dtype.
    pub from: DType,
    /// Dtype to write.
    pub to: DType,
    /// Bytes read.
    pub bytes_in: u64,
    /// Bytes written.
    pub bytes_out: u64,
    /// Why: the rule that decided, or the reason it is left alone.
    pub reason: String,
    /// Whether the default target (`--to`) chose this dtype, rather than a rule naming one
    /// (`--auto` picks among candidates only for these).
    pub by_default: bool,
    /// For a scaled FP8 payload: dequantized with this scale (its values are the payload times
    /// the scale, rounded to the scale's dtype, then cast to `to`).
    pub dequant: Option<Dequant>,
    /// For a scaled FP8 output (`--scale`): this entry is a payload quantized with a scale
    /// computed from it, or that scale.
    pub scaled: Option<ScaledOut>,
    /// For a GGUF output: written in this ggml block type (Q8_0), quantized from its values
    /// as f32 (`to`).
    pub ggml: Option<crate::catalogue::gguf::GgmlType>,
    /// Its values multiplied by this factor on the way out (a rules file's `scale`), whatever
    /// its dtype becomes.
    pub factor: Option<Factor>,
}

pub use crate::rules::ConfigEdit;

/// A tensor of a scaled FP8 output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaledOut {
    /// Quantized to f8e4m3fn with the scale at catalogue index `scale`.
    Payload {
        /// Catalogue index of its scale (an entry the planner added).
        scale: TensorId,
        /// How the scale covers it.
        layout: ScaleLayout,
        /// The scale's dtype (the quotient is rounded to it before the cast).
        compute: DType,
    },
    /// The scale of the payload at catalogue index `payload`, computed from the weight.
    Scale {
        /// Catalogue index of the weight it scales.
        payload: TensorId,
    },
    /// A part of a weight quantized to FP4 (`--to nvfp4|mxfp4`): its packed values, its
    /// scales or its global scale, all computed from `weight`.
    Fp4 {
        /// The weight (catalogue index) it comes from.
        weight: TensorId,
        /// Which part.
        part: crate::catalogue::quant::Fp4Part,
        /// The layout.
        kind: crate::catalogue::quant::Fp4Kind,
        /// The weights that share its NVFP4 global scale (fused in vLLM).
        fused: [Option<TensorId>; 2],
    },
}

/// How a payload is dequantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dequant {
    /// The scale tensor.
    pub scale: TensorId,
    /// How it covers the payload.
    pub layout: ScaleLayout,
    /// The scale's dtype, in which the product is rounded.
    pub compute: DType,
}

impl Dequant {
    /// The scale table that dequantizes payload `payload` (catalogue index), read from
    /// `sources`.
    pub fn table(
        &self,
        cat: &Catalogue,
        sources: &crate::source::Sources<'_>,
        payload: usize,
    ) -> crate::error::Result<crate::quant::ScaleTable> {
        crate::quant::ScaleTable::load(
            cat,
            sources,
            &crate::quant::Scaled {
                payload,
                scale: self.scale.0,
                layout: self.layout,
            },
        )
    }
}

/// What the plan does with a quantized input.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum QuantPlan {
    /// The input is not quantized.
    #[default]
    None,
    /// Every payload dequantized; scales and the scheme's config leave the output.
    Dequantize,
    /// Payloads and scales pass through untouched, the config kept (`--on-quantized keep`).
    Keep,
    /// The scheme cannot be dequantized (the reason): converting is refused unless kept.
    Unsupported(String),
}

impl<I> TensorPlan<I> {
    /// Kept as stored because its storage is kept whole (`why`).
    fn keep_whole(&mut self, why: &str) {
        self.keep();
        self.reason = why.to_string();
        self.by_default = false;
    }

    /// Leaves the tensor in its stored dtype; a dequantized payload in its scale's dtype (its
    /// stored form needs the scale).
    pub fn keep(&mut self) {
        match self.dequant {
            Some(d) => {
                let numel = self.bytes_in / (self.from.bitsize() / 8).max(1) as u64;
                self.set_target(d.compute, numel);
            }
            None => {
                self.to = self.from;
                self.bytes_out = self.bytes_in;
            }
        }
    }

    /// Casts to `to` instead (`numel` elements).
    pub fn set_target(&mut self, to: DType, numel: u64) {
        self.to = to;
        self.bytes_out = to.bytes_for(numel).unwrap_or(self.bytes_in);
    }

    /// Whether the values change (representation, or by a factor).
    pub fn is_cast(&self) -> bool {
        self.from != self.to
            || self.factor.is_some()
            || self.dequant.is_some()
            || matches!(self.scaled, Some(ScaledOut::Payload { .. }))
            || matches!(
                self.scaled,
                Some(ScaledOut::Fp4 {
                    part: crate::catalogue::quant::Fp4Part::Packed,
                    ..
                })
            )
            || self.ggml.is_some()
    }
}

/// Totals over a plan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Tensors whose dtype changes.
    pub cast: usize,
    /// Tensors written as they are.
    pub kept: usize,
    /// Bytes of tensor data read.
    pub bytes_in: u64,
    /// Bytes of tensor data written.
    pub bytes_out: u64,
}

/// A plan for every tensor of a catalogue.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The default target (`--to`).
    pub target: DType,
    /// One entry per catalogue tensor, same order ([`Plan::tensors`]; changed through
    /// [`Plan::update`], which settles storages after every change).
    tensors: Vec<TensorPlan>,
    /// For a `.pt` output of a whole PyTorch file: the tensors outside the selected state dict
    /// (optimizer state, EMA copies), one entry per [`crate::formats::torch::TorchDoc::others`],
    /// same order (`tensor` indexes that list).
    others: Vec<TensorPlan<OtherId>>,
    /// Top-level entries of a training checkpoint that the output leaves out: (name, tensors,
    /// tensor bytes).
    pub dropped: Vec<(String, usize, u64)>,
    /// Rules that matched nothing and dtypes that cannot be cast.
    pub warnings: Vec<String>,
    /// The rules (by origin) that match no tensor.
    pub unmatched: Vec<String>,
    /// What the output holds of a PyTorch file.
    pub scope: Scope,
    /// Catalogue tensors the output leaves out (a dequantized input's scales), and why.
    pub removed: Vec<(usize, String)>,
    /// What happens to a quantized input.
    pub quant: QuantPlan,
    /// For a scaled FP8 output: the `quantization_config` a folder output's `config.json`
    /// gets.
    pub quant_config: Option<serde_json::Value>,
    /// For a GGUF output of a Hugging Face folder: its metadata, tensor names and order.
    pub gguf_hf: Option<std::sync::Arc<crate::formats::gguf::hf::HfGguf>>,
    /// The `config.json` keys the output gets (a rules file's `[config]`), in order.
    pub config: Vec<ConfigEdit>,
}

/// What the output holds of a PyTorch file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Scope {
    /// The state dict alone (safetensors outputs, `.pt` with `--inference`): the other entries
    /// of a training checkpoint are dropped.
    #[default]
    StateDict,
    /// The whole file (a `.pt` output): the other entries are kept, their tensors as stored
    /// unless `cast_others` (`--cast-optimizer`), which casts those of one or more dimensions
    /// (optimizer moments, EMA weights; `step` counters stay).
    WholeFile {
        /// Cast the floating tensors outside the state dict too.
        cast_others: bool,
    },
    /// The checkpoint for inference (a `.pt` output with `--inference`): its structure and
    /// every entry but the training state (optimizer, scheduler, AMP scaler, RNG states,
    /// gradient buffers), which is dropped; the kept entries' tensors outside the state dict
    /// keep their dtypes.
    Inference,
}

impl Plan {
    /// Decides every tensor of `cat` with `rules`, casting to `target` by default, for an output
    /// of the state dict alone.
    pub fn new(cat: &Catalogue, rules: &RuleSet, target: DType) -> Plan {
        Plan::with_scope(cat, rules, target, Scope::StateDict)
    }

    /// The precision a checkpoint is in, decided from its tensors (not from `config.json`,
    /// which fine-tunes often get wrong): the floating dtype holding most elements among the
    /// tensors that are not scaled FP8 payloads or scales; for a checkpoint of nothing else,
    /// its scales' dtype (compressed-tensors keeps them in the original weights' dtype).
    pub fn auto_target(cat: &Catalogue) -> Option<DType> {
        let q = cat.quant.as_deref();
        let mut plain = std::collections::BTreeMap::<DType, u64>::new();
        let mut scales = std::collections::BTreeMap::<DType, u64>::new();
        for (i, t) in cat.tensors.iter().enumerate() {
            if !t.dtype.is_castable() {
                continue;
            }
            match q.and_then(|q| q.role(i)) {
                None => *plain.entry(t.dtype).or_default() += t.numel(),
                Some(Role::Scale) => *scales.entry(t.dtype).or_default() += 1,
                Some(_) => {}
            }
        }
        let best = |m: std::collections::BTreeMap<DType, u64>| {
            m.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d)
        };
        best(plain).or_else(|| best(scales))
    }

    /// `--to auto`: every tensor the default target would cast keeps its stored dtype (a
    /// dequantized payload goes to the plan's target, the checkpoint's own precision).
    pub fn keep_source_precision(&mut self, cat: &Catalogue) {
        self.update(cat, |tensors| {
            for p in tensors {
                if p.by_default && p.dequant.is_none() {
                    p.keep();
                    p.reason = "--to auto: as stored".into();
                    p.by_default = false;
                }
            }
        })
    }

    /// Every tensor as stored, but a scaled payload dequantized to its scale's dtype (its
    /// scales removed): the values a quantized checkpoint stands for, as `eval` and `diff`
    /// read it.
    pub fn stored(cat: &Catalogue) -> Plan {
        let mut plan = Plan::new(cat, &RuleSet::default(), DType::F32);
        for p in &mut plan.tensors {
            p.keep();
            if p.dequant.is_none() {
                p.reason = "as stored".into();
            }
        }
        plan.warnings.clear();
        plan
    }

    /// Decides every tensor of `cat`, and for [`Scope::WholeFile`] those outside the state dict.
    pub fn with_scope(cat: &Catalogue, rules: &RuleSet, target: DType, scope: Scope) -> Plan {
        let resolved;
        let rules = if rules.needs_model_type() {
            let mut r = rules.clone();
            r.resolve_model_type(model_type(cat).as_deref(), target);
            resolved = r;
            &resolved
        } else {
            rules
        };
        let mut hits = vec![0usize; rules.rules.len()];
        let classes = classes(cat);
        let mut uncastable = std::collections::BTreeMap::<DType, usize>::new();
        let tensors = cat
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let (action, rule) = rules.decide(&t.name, &t.shape, classes[i]);
                if let Some(r) = rule {
                    hits[r] += 1;
                }
                let factor = rules.factor(&t.name, &t.shape, classes[i]);
                if let Some((_, r)) = factor.filter(|f| Some(f.1) != rule) {
                    hits[r] += 1;
                }
                let origin = || match rule {
                    Some(r) => rules.rules[r].origin.clone(),
                    None if action == Action::Keep => "not selected by --only".to_string(),
                    None => format!("--to {}", target.torch_name()),
                };
                let (to, reason) = if !t.dtype.is_float() {
                    (t.dtype, format!("{}: never cast", kind_of(t)))
                } else {
                    match action {
                        Action::Keep => (t.dtype, origin()),
                        Action::Default | Action::To(_) => {
                            let want = match action {
                                Action::To(d) => d,
                                _ => target,
                            };
                            if !t.dtype.is_castable() {
                                *uncastable.entry(t.dtype).or_default() += 1;
                                (t.dtype, format!("no cast from {}", t.dtype))
                            } else {
                                (want, origin())
                            }
                        }
                    }
                };
                let bytes_out = to.bytes_for(t.numel()).unwrap_or(t.nbytes);
                let reason = match factor {
                    Some((f, r)) if Some(r) != rule => {
                        format!("{reason}; {} {}", f.describe(), rules.rules[r].origin)
                    }
                    _ => reason,
                };
                TensorPlan {
                    tensor: TensorId(i),
                    from: t.dtype,
                    to,
                    bytes_in: t.nbytes,
                    bytes_out,
                    reason,
                    by_default: action == Action::Default && t.dtype.is_castable(),
                    dequant: None,
                    scaled: None,
                    ggml: None,
                    factor: factor.map(|f| f.0),
                }
            })
            .collect();
        let (mut warnings, unmatched) = rule_diagnostics(cat, rules, &hits, &classes);
        for (d, n) in uncastable {
            warnings.push(format!(
                "{n} tensor(s) of {d} kept as they are: weightcast does not cast {d}"
            ));
        }
        let (others, dropped) = others_and_dropped(cat, scope, target);
        let mut plan = Plan {
            target,
            tensors,
            others,
            dropped,
            warnings,
            unmatched,
            scope,
            removed: vec![],
            quant: QuantPlan::None,
            quant_config: None,
            gguf_hf: None,
            config: config_edits(cat, rules),
        };
        plan.dequantize(cat, rules);
        plan.settle(cat);
        plan
    }

    /// Dequantizes every payload of a quantized input (to the rule's or `--to`'s dtype when it
    /// is 16 bits or wider, else to its scale's dtype) and removes the scales and the scheme's
    /// other tensors. A scheme weightcast cannot dequantize leaves the plan refusing.
    fn dequantize(&mut self, cat: &Catalogue, rules: &RuleSet) {
        let Some(q) = cat.quant.as_deref() else {
            return;
        };
        if let Some(why) = &q.unsupported {
            self.quant = QuantPlan::Unsupported(why.clone());
            return;
        }
        self.quant = QuantPlan::Dequantize;
        let mut removed = Vec::new();
        for p in &mut self.tensors {
            let t = &cat.tensors[p.tensor];
            match q.role(p.tensor.0) {
                Some(Role::Payload(scale, layout)) => {
                    let compute = cat.tensors[scale].dtype;
                    let (action, rule) = rules.decide(&t.name, &t.shape, t.module_class.as_deref());
                    let wanted = match action {
                        Action::To(d) => Some(d),
                        Action::Default => Some(self.target),
                        Action::Keep => None,
                    };
                    let how = format!(
                        "dequantize ({}, `{}`)",
                        layout.describe(),
                        cat.tensors[scale].name
                    );
                    let (to, why) = match wanted {
                        Some(d) if d.is_castable() && d.bitsize() >= 16 => (
                            d,
                            match rule {
                                Some(r) => format!("{how}; {}", rules.rules[r].origin),
                                None => how,
                            },
                        ),
                        Some(d) => (
                            compute,
                            format!("{how} to its scale's {compute}: {d} would need new scales"),
                        ),
                        None => (
                            compute,
                            format!(
                                "{how} to its scale's {compute}: kept payloads need the scales this output drops (--on-quantized keep keeps both)"
                            ),
                        ),
                    };
                    p.set_target(to, t.numel());
                    p.reason = why;
                    p.by_default = false;
                    p.dequant = Some(Dequant {
                        scale: TensorId(scale),
                        layout,
                        compute,
                    });
                }
                Some(Role::Scale) => {
                    removed.push((p.tensor.0, "scale of a dequantized payload".to_string()))
                }
                Some(Role::Companion) => removed.push((
                    p.tensor.0,
                    format!(
                        "part of the {} scheme, meaningless once dequantized",
                        q.scheme
                    ),
                )),
                None => {
                    if let Some(d) = &t.decode {
                        p.reason = match p.reason.as_str() {
                            "" => format!("dequantized: {}", d.what),
                            r => format!("dequantized: {}; {r}", d.what),
                        };
                    }
                }
            }
        }
        self.tensors
            .retain(|p| !removed.iter().any(|(i, _)| *i == p.tensor.0));
        self.removed = removed;
    }

    /// Leaves catalogue tensors `ids` out of the output, each with its reason.
    pub fn remove(&mut self, ids: &[(usize, String)]) {
        self.tensors
            .retain(|p| !ids.iter().any(|(i, _)| *i == p.tensor.0));
        self.removed.extend(ids.iter().cloned());
    }

    /// Passes a quantized input's payloads, scales and other tensors through untouched
    /// (`--on-quantized keep`); the other tensors are cast as planned.
    pub fn keep_quantized(&mut self, cat: &Catalogue) {
        let Some(q) = cat.quant.as_deref() else {
            return;
        };
        if self.quant == QuantPlan::Dequantize {
            // Rebuild the entries that dequantizing removed or changed.
            let mut back: Vec<TensorPlan> = self
                .removed
                .drain(..)
                .map(|(i, _)| {
                    let t = &cat.tensors[i];
                    TensorPlan {
                        tensor: TensorId(i),
                        from: t.dtype,
                        to: t.dtype,
                        bytes_in: t.nbytes,
                        bytes_out: t.nbytes,
                        reason: String::new(),
                        by_default: false,
                        dequant: None,
                        scaled: None,
                        ggml: None,
                        factor: None,
                    }
                })
                .collect();
            self.tensors.append(&mut back);
            self.tensors.sort_by_key(|p| p.tensor);
        }
        for p in &mut self.tensors {
            if let Some(role) = q.role(p.tensor.0) {
                p.dequant = None;
                p.keep();
                p.by_default = false;
                p.reason = match role {
                    Role::Payload(..) => format!("{} payload: kept with its scale", q.scheme),
                    Role::Scale => format!("{} scale: kept", q.scheme),
                    Role::Companion => format!("part of the {} scheme: kept", q.scheme),
                };
            }
        }
        self.quant = QuantPlan::Keep;
        self.settle(cat);
    }

    /// Gives every tensor on one storage the same dtype: a storage whose tensors the plan sends
    /// to different dtypes (or that a tensor weightcast does not read uses) is kept whole, and
    /// each of its tensors says so. Called after every change to the plan; idempotent.
    fn settle(&mut self, cat: &Catalogue) {
        if cat.storages.is_empty() {
            return;
        }
        let others = cat.torch.as_deref().map(|d| &d.others[..]).unwrap_or(&[]);
        // A plan entry on a storage: the state dict's, or outside it (both lists' positions).
        #[derive(Clone, Copy)]
        enum Member {
            Tensor(usize),
            Other(usize),
        }
        let mut on: Vec<Vec<Member>> = vec![vec![]; cat.storages.len()];
        for (i, p) in self.tensors.iter().enumerate() {
            if let Some(s) = cat.tensors[p.tensor].storage {
                on[s].push(Member::Tensor(i));
            }
        }
        for (i, p) in self.others.iter().enumerate() {
            if let Some(s) = others[p.tensor].entry.storage {
                on[s].push(Member::Other(i));
            }
        }
        // (from, to, name) of a member.
        let about = |plan: &Plan, m: Member| -> (DType, DType, String) {
            match m {
                Member::Tensor(i) => {
                    let p = &plan.tensors[i];
                    (p.from, p.to, cat.tensors[p.tensor].name.clone())
                }
                Member::Other(i) => {
                    let p = &plan.others[i];
                    (p.from, p.to, others[p.tensor].entry.name.clone())
                }
            }
        };
        for (s, members) in on.iter().enumerate() {
            let Some(&first) = members.first() else {
                continue;
            };
            let (from0, to0, _) = about(self, first);
            let agree = members.iter().all(|&m| {
                let (f, t, _) = about(self, m);
                (f, t) == (from0, to0)
            });
            let storage = &cat.storages[s];
            let all_kept = members.iter().all(|&m| {
                let (f, t, _) = about(self, m);
                f == t
            });
            if (agree && !storage.pinned) || all_kept {
                continue;
            }
            let why = if storage.pinned {
                format!(
                    "storage data/{} kept whole: a tensor weightcast does not read uses it",
                    storage.key
                )
            } else {
                let names: Vec<String> = members
                    .iter()
                    .map(|&m| {
                        let (_, to, name) = about(self, m);
                        format!("`{name}` -> {to}")
                    })
                    .collect();
                format!(
                    "storage data/{} kept whole: its views would get different dtypes ({})",
                    storage.key,
                    names.join(", ")
                )
            };
            for &m in members {
                match m {
                    Member::Tensor(i) => self.tensors[i].keep_whole(&why),
                    Member::Other(i) => self.others[i].keep_whole(&why),
                }
            }
        }
    }

    /// Refuses the factors that cannot be applied, naming the tensors (a usage error): on a
    /// tensor that is not floating (or of a dtype weightcast does not cast), on a payload of a
    /// scaled FP8 output, and on one storage: every tensor on it must get the same factor (a
    /// stored tensor is scaled once), and a storage that a tensor weightcast does not read
    /// uses cannot be scaled.
    pub fn check_factors(&self, cat: &Catalogue) -> crate::error::Result<()> {
        let refuse =
            |what: String| crate::error::Error::usage(format!("{}: {what}", cat.path.display()));
        for p in &self.tensors {
            let Some(f) = p.factor else { continue };
            let t = &cat.tensors[p.tensor];
            let why = if !t.dtype.is_float() {
                format!(
                    "it is {}: a scale applies to floating tensors only",
                    t.dtype
                )
            } else if !t.dtype.is_castable() {
                format!("weightcast does not cast {}", t.dtype)
            } else if p.scaled.is_some() {
                "a scale does not combine with a scaled FP8 output (--scale)".to_string()
            } else {
                continue;
            };
            return Err(refuse(format!(
                "tensor `{}` ({}): {why}",
                t.name,
                f.describe()
            )));
        }
        if cat.storages.is_empty() || self.tensors.iter().all(|p| p.factor.is_none()) {
            return Ok(());
        }
        let others = cat.torch.as_deref().map(|d| &d.others[..]).unwrap_or(&[]);
        let mut on: Vec<Vec<(&str, Option<Factor>)>> = vec![vec![]; cat.storages.len()];
        for p in &self.tensors {
            let t = &cat.tensors[p.tensor];
            if let Some(s) = t.storage {
                on[s].push((&t.name, p.factor));
            }
        }
        for p in &self.others {
            let t = &others[p.tensor].entry;
            if let Some(s) = t.storage {
                on[s].push((&t.name, p.factor));
            }
        }
        let describe = |f: Option<Factor>| f.map_or("no scale".to_string(), |f| f.describe());
        for (s, members) in on.iter().enumerate() {
            let Some(&(name, f)) = members.iter().find(|m| m.1.is_some()) else {
                continue;
            };
            let key = &cat.storages[s].key;
            if cat.storages[s].pinned {
                return Err(refuse(format!(
                    "tensor `{name}` ({}) cannot be scaled: its storage data/{key} is also used \
                     by a tensor weightcast does not read",
                    describe(f)
                )));
            }
            let same = |g: Option<Factor>| matches!((f, g), (Some(a), Some(b)) if a.same(b));
            if let Some(&(other, g)) = members.iter().find(|m| !same(m.1)) {
                return Err(refuse(format!(
                    "tensors `{name}` ({}) and `{other}` ({}) share storage data/{key} (tied, or \
                     views of one tensor): give them the same scale (a stored tensor is scaled \
                     once)",
                    describe(f),
                    describe(g)
                )));
            }
        }
        Ok(())
    }

    /// One entry per catalogue tensor, same order.
    pub fn tensors(&self) -> &[TensorPlan] {
        &self.tensors
    }

    /// For a `.pt` output of a whole PyTorch file: the entries of the tensors outside the
    /// state dict that the output holds (`tensor` indexes [`crate::catalogue::torch::TorchDoc::others`]).
    pub fn others(&self) -> &[TensorPlan<OtherId>] {
        &self.others
    }

    /// Changes the state dict's entries with `f`, then settles storages (every tensor on one
    /// storage gets the same dtype): the one way to change a plan's decisions.
    pub fn update<R>(&mut self, cat: &Catalogue, f: impl FnOnce(&mut Vec<TensorPlan>) -> R) -> R {
        let r = f(&mut self.tensors);
        self.settle(cat);
        r
    }

    /// Every plan entry's (is cast, to, bytes in, bytes out): the state dict's tensors, then
    /// those outside it.
    fn all(&self) -> impl Iterator<Item = (bool, DType, u64, u64)> + '_ {
        self.tensors
            .iter()
            .map(|p| (p.is_cast(), p.to, p.bytes_in, p.bytes_out))
            .chain(
                self.others
                    .iter()
                    .map(|p| (p.is_cast(), p.to, p.bytes_in, p.bytes_out)),
            )
    }

    /// Per target dtype of the cast tensors: how many, in dtype order (for summaries).
    pub fn cast_counts(&self) -> Vec<(DType, usize)> {
        let mut m = std::collections::BTreeMap::<DType, usize>::new();
        for (_, to, _, _) in self.all().filter(|p| p.0) {
            *m.entry(to).or_default() += 1;
        }
        m.into_iter().collect()
    }

    /// Totals of cast/kept tensors and bytes, over every entry the output holds.
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for (cast, _, bytes_in, bytes_out) in self.all() {
            if cast {
                t.cast += 1;
            } else {
                t.kept += 1;
            }
            t.bytes_in += bytes_in;
            t.bytes_out += bytes_out;
        }
        t
    }

    /// The floating dtype holding most elements after the plan (what `config.json` should say).
    pub fn dominant_float(&self, cat: &Catalogue) -> Option<DType> {
        let mut m = std::collections::BTreeMap::<DType, u64>::new();
        for p in &self.tensors {
            // A scaled FP8 payload is not the model's dtype (config.json keeps the
            // unquantized layers' dtype, as llm-compressor writes it).
            let scaled = matches!(
                p.scaled,
                Some(ScaledOut::Payload { .. } | ScaledOut::Fp4 { .. })
            );
            if p.to.is_float() && !scaled {
                *m.entry(p.to).or_default() += cat.tensors[p.tensor].numel();
            }
        }
        m.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d)
    }
}

/// The plans of the tensors outside a state dict, and the checkpoint entries left out (name,
/// tensors, tensor bytes).
type OthersAndDropped = (Vec<TensorPlan<OtherId>>, Vec<(String, usize, u64)>);

/// For a `.pt` output of a whole PyTorch file (or without its training state): the plans of
/// the tensors outside the state dict it holds; and the checkpoint entries it leaves out.
fn others_and_dropped(cat: &Catalogue, scope: Scope, target: DType) -> OthersAndDropped {
    let doc = cat.torch.as_deref();
    match (doc, scope) {
        (None, _) => (vec![], vec![]),
        (Some(d), Scope::StateDict) => (vec![], d.entries.clone()),
        (Some(d), Scope::WholeFile { cast_others }) => {
            let others = d
                .others
                .iter()
                .enumerate()
                .map(|(i, o)| other_plan(i, &o.entry, &o.section, cast_others, target))
                .collect();
            (others, vec![])
        }
        (Some(d), Scope::Inference) => {
            let training = |section: &str| d.training.iter().any(|t| t.0 == section);
            let others = d
                .others
                .iter()
                .enumerate()
                .filter(|(_, o)| !training(&o.section))
                .map(|(i, o)| other_plan(i, &o.entry, &o.section, false, target))
                .collect();
            let dropped = d
                .entries
                .iter()
                .filter(|e| training(&e.0))
                .cloned()
                .collect();
            (others, dropped)
        }
    }
}

/// The plan of a tensor outside the state dict (a `.pt` output of a whole file).
fn other_plan(
    i: usize,
    t: &TensorEntry,
    section: &str,
    cast: bool,
    target: DType,
) -> TensorPlan<OtherId> {
    let (to, reason) = if !t.dtype.is_float() {
        (t.dtype, format!("{}: never cast", kind_of(t)))
    } else if !cast {
        (
            t.dtype,
            format!(
                "`{section}`: not the model's weights, kept as stored (--cast-optimizer casts it)"
            ),
        )
    } else if t.shape.is_empty() {
        (t.dtype, "0-d (a step counter): kept".to_string())
    } else if !t.dtype.is_castable() {
        (t.dtype, format!("no cast from {}", t.dtype))
    } else {
        (target, "--cast-optimizer".to_string())
    };
    TensorPlan {
        tensor: OtherId(i),
        from: t.dtype,
        to,
        bytes_in: t.nbytes,
        bytes_out: to.bytes_for(t.numel()).unwrap_or(t.nbytes),
        reason,
        by_default: false,
        dequant: None,
        scaled: None,
        ggml: None,
        factor: None,
    }
}

/// The `config.json` of a folder input, when it has one that is a JSON object.
fn input_config(cat: &Catalogue) -> Option<serde_json::Map<String, serde_json::Value>> {
    let dir = &cat.folder.as_ref()?.dir;
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    match serde_json::from_str(&text).ok()? {
        serde_json::Value::Object(m) => Some(m),
        _ => None,
    }
}

/// `config.json`'s `model_type` of a folder input.
pub(crate) fn model_type(cat: &Catalogue) -> Option<String> {
    input_config(cat)?
        .get("model_type")?
        .as_str()
        .map(String::from)
}

/// The rules' `[config]` edits, each with the input's value of its key.
fn config_edits(cat: &Catalogue, rules: &RuleSet) -> Vec<ConfigEdit> {
    if rules.config.is_empty() {
        return vec![];
    }
    let cfg = input_config(cat);
    rules
        .config
        .iter()
        .map(|(key, new)| ConfigEdit {
            key: key.clone(),
            old: cfg.as_ref().and_then(|c| c.get(key)).cloned(),
            new: new.clone(),
        })
        .collect()
}

fn kind_of(t: &TensorEntry) -> &'static str {
    if t.dtype == DType::Bool {
        "bool"
    } else if t.dtype == DType::C64 {
        "complex"
    } else {
        "integer"
    }
}

/// What the rules that decide no tensor are told: overridden by a later rule (each match
/// decided by it), or matching nothing (with a "did you mean" where only case differs). Returns
/// the warnings and the origins of the rules that match nothing (`--strict-rules` refuses those).
fn rule_diagnostics(
    cat: &Catalogue,
    rules: &RuleSet,
    hits: &[usize],
    classes: &[Option<&str>],
) -> (Vec<String>, Vec<String>) {
    let mut warnings = Vec::new();
    let mut unmatched = Vec::new();
    // A preset's rules share one origin: it is unmatched only when none of them matches.
    let mut by_origin = std::collections::HashMap::<&str, usize>::new();
    for (rule, n) in rules.rules.iter().zip(hits) {
        *by_origin.entry(rule.origin.as_str()).or_default() += n;
    }
    let mut told = std::collections::HashSet::new();
    for rule in &rules.rules {
        let origin = rule.origin.as_str();
        if by_origin[origin] > 0 || !told.insert(origin) {
            continue;
        }
        // Matched, but every tensor it matches is decided by a later rule: say which.
        let same: Vec<&crate::rules::Rule> =
            rules.rules.iter().filter(|r| r.origin == origin).collect();
        let matched: Vec<usize> = cat
            .tensors
            .iter()
            .enumerate()
            .filter(|(i, t)| {
                same.iter()
                    .any(|r| r.selector.matches(&t.name, &t.shape, classes[*i]))
            })
            .map(|(i, _)| i)
            .collect();
        if let Some(&first) = matched.first() {
            let t = &cat.tensors[first];
            let decider = if rule.dtype {
                rules.decide(&t.name, &t.shape, classes[first]).1
            } else {
                rules.factor(&t.name, &t.shape, classes[first]).map(|f| f.1)
            };
            let by = decider.map_or("a later rule", |r| rules.rules[r].origin.as_str());
            warnings.push(format!(
                "rule `{origin}` decides no tensor: each of the {} it matches is decided by a \
 later rule (`{}` by `{by}`); the last rule that matches wins",
                matched.len(),
                t.name
            ));
            continue;
        }
        let hint = rule
            .selector
            .case_hint(cat.tensors.iter().map(|t| t.name.as_str()))
            .map(|(p, ex)| {
                format!(" (globs are case-sensitive: did you mean `{p}`? it matches `{ex}`)")
            })
            .unwrap_or_default();
        warnings.push(format!("rule `{origin}` matches no tensor{hint}"));
        unmatched.push(rule.origin.clone());
    }
    (warnings, unmatched)
}

/// The class the rules see for each tensor: its module's class where the input names one,
/// else [`NORM_BY_STRUCTURE`](crate::rules::NORM_BY_STRUCTURE) where its module is a norm layer
/// by structure (a state dict's BatchNorm, LayerNorm), else none.
fn classes(cat: &Catalogue) -> Vec<Option<&str>> {
    let norms = crate::rules::norm_by_structure(
        cat.tensors
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice())),
    );
    if let Some(doc) = cat.onnx.as_deref() {
        // an ONNX weight's class is the op types that use it
        return (0..cat.tensors.len())
            .map(|i| doc.classes.get(i).map(String::as_str))
            .collect();
    }
    cat.tensors
        .iter()
        .zip(norms)
        .map(|(t, norm)| match (&t.module_class, norm) {
            (Some(c), _) => Some(c.as_str()),
            (None, true) => Some(crate::rules::NORM_BY_STRUCTURE),
            (None, false) => None,
        })
        .collect()
}
