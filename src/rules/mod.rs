//! Casting rules: which tensors get which dtype.
//!
//! Rules are applied in order and the last one that matches a tensor decides. A pattern is
//! - a glob matched per dotted component: `*.layernorm.*` matches a run of whole components
//!   anywhere in the name (`encoder.layer.0.layernorm.weight`) and never a part of one
//!   (`word_embeddings` does not match `wo`); `*` and `?` stay inside a component, `**` spans
//!   any number of components;
//! - `re:REGEX`, a regular expression searched in the full name;
//! - `kind:norm`, `kind:bias`, `kind:embedding`, `kind:1d`, `kind:2d` or `kind:conv`, a kind
//!   of tensor (by name and shape, and by module class where the input records it);
//! - `class:NAME`, the tensors of modules of a class (`class:Linear`, `class:Conv2d`, or the
//!   full path `class:torch.nn.modules.linear.Linear`), for PyTorch files that pickle whole
//!   modules;
//! - `op:NAME`, in an ONNX model the weights an operator of that type uses (`op:Conv`); there
//!   `kind:norm` and `kind:conv` follow the graph (a `*Normalization` op, a `Conv*` op).
//!
//! A rules file's rule may also carry a `scale` (a [`Factor`]): the tensors it matches are
//! multiplied by it on the way out. The last matching rule that has a `scale` decides a
//! tensor's factor, as the last matching rule with `keep`/`to`/`only` decides its dtype; a rule
//! with `scale` alone leaves the dtype to the other rules. The value written is torch's
//! `(w.float() * scale).to(dtype)`: the stored value widened to f32 (f64 rounded to f32), times
//! the scale rounded to f32, rounded to f32, then cast as every cast is (same rounding, same
//! overflow policy). With `form = "1+w"` (a weight the model uses as `1 + w`, Gemma's norms)
//! it is `(scale * (1 + w.float()) - 1).to(dtype)`, each step rounded to f32 in that order.
//! A file's `[config]` table lists `config.json` keys the output gets ([`RuleSet::config`]):
//! existing keys only, in outputs that have a `config.json`.

use std::path::Path;

pub mod transformers_fp32;

use regex::Regex;
use serde::Deserialize;

use crate::dtype::DType;
use crate::error::{Error, Result};

/// A kind of tensor recognised by name and shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Normalisation weights and biases (`LayerNorm`, `rms_norm`, `ln_f`, ...).
    Norm,
    /// Biases.
    Bias,
    /// Token/position embeddings and the output head (`lm_head`, `wte`, ...).
    Embedding,
    /// Tensors of at most one dimension: norms, biases, scales.
    OneD,
    /// Matrices (two dimensions): linear layers' weights, embeddings.
    TwoD,
    /// Convolution weights: of a `Conv*` module, or of three to five dimensions.
    Conv,
}

/// The class given to the rules for a tensor whose module class is unknown but whose module is
/// a norm layer by its structure (see [`norm_by_structure`]): `kind:norm` matches it, `class:`
/// never does.
pub const NORM_BY_STRUCTURE: &str = "(a norm layer, by its structure)";

/// For each of `tensors` (name, shape), whether its module is a norm layer by structure: it
/// has BatchNorm's `running_mean` and `running_var` buffers, or its tensors are exactly a 1-D
/// `weight` and `bias` of the same length (LayerNorm, GroupNorm, an affine norm). For state
/// dicts, where no module class is known.
pub fn norm_by_structure<'a>(tensors: impl Iterator<Item = (&'a str, &'a [u64])>) -> Vec<bool> {
    let tensors: Vec<(&str, &[u64])> = tensors.collect();
    let split = |n: &'a str| n.rsplit_once('.').unwrap_or(("", n));
    let mut modules: std::collections::HashMap<&str, Vec<(&str, &[u64])>> = Default::default();
    for &(n, shape) in &tensors {
        let (m, leaf) = split(n);
        modules.entry(m).or_default().push((leaf, shape));
    }
    let is_norm = |members: &[(&str, &[u64])]| {
        let get = |want: &str| members.iter().find(|(l, _)| *l == want).map(|x| x.1);
        if get("running_mean").is_some() && get("running_var").is_some() {
            return true;
        }
        match (members.len(), get("weight"), get("bias")) {
            (2, Some(w), Some(b)) => w.len() == 1 && w == b,
            _ => false,
        }
    };
    let verdicts: std::collections::HashMap<&str, bool> = modules
        .iter()
        .map(|(m, members)| (*m, is_norm(members)))
        .collect();
    tensors.iter().map(|(n, _)| verdicts[split(n).0]).collect()
}

/// The tensor kinds `kind:NAME` selects, as help names them (each parses with [`Selector::parse`]).
pub const KINDS: &[(&str, &str)] = &[
    (
        "norm",
        "norm layers: by module class, by name (norm, ln_*), or by structure (BatchNorm's \
         running statistics, 1-D weight/bias pairs)",
    ),
    ("bias", "biases"),
    ("embedding", "token/position embeddings and the output head"),
    ("1d", "tensors of at most one dimension"),
    ("2d", "matrices"),
    (
        "conv",
        "convolution weights (by module class; 3-D to 5-D tensors without one)",
    ),
];

/// The pattern syntaxes, as help names them.
pub const PATTERN_SYNTAX: &[(&str, &str)] = &[
    (
        "GLOB",
        "a glob over dotted name components: `*` one component, `**` any run of them \
         (`*.layernorm.*` never matches `word_embeddings`)",
    ),
    ("re:REGEX", "a regular expression searched in the full name"),
    ("kind:KIND", "a kind of tensor (below)"),
    (
        "class:NAME",
        "the class of the module holding the tensor (Linear, torch.nn.Conv2d), where the \
         checkpoint names it",
    ),
    (
        "op:NAME",
        "in an ONNX model, the weights an operator of that type uses (op:Conv, op:MatMul, \
         op:LayerNormalization)",
    ),
];

/// How an ONNX weight's class begins: the op types using it follow, comma-separated.
pub const ONNX_OPS: &str = "onnx:";

/// The op types using an ONNX weight, from its class (none for other inputs).
fn onnx_ops(class: Option<&str>) -> impl Iterator<Item = &str> {
    class
        .and_then(|c| c.strip_prefix(ONNX_OPS))
        .into_iter()
        .flat_map(|ops| ops.split(',').filter(|o| !o.is_empty()))
}

impl Kind {
    fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "norm" | "norms" => Kind::Norm,
            "bias" | "biases" => Kind::Bias,
            "embedding" | "embeddings" | "embed" => Kind::Embedding,
            "1d" | "vector" => Kind::OneD,
            "2d" | "matrix" => Kind::TwoD,
            "conv" | "convolution" => Kind::Conv,
            _ => return None,
        })
    }

    /// Whether a tensor of this name and shape, in a module of class `class` (when known, or
    /// [`NORM_BY_STRUCTURE`]), is of this kind.
    pub fn matches(self, name: &str, shape: &[u64], class: Option<&str>) -> bool {
        let comps: Vec<String> = name.split('.').map(|c| c.to_ascii_lowercase()).collect();
        if class.is_some_and(|c| c.starts_with(ONNX_OPS)) {
            // an ONNX weight: the graph says what uses it
            let mut ops = onnx_ops(class);
            match self {
                Kind::Norm => return ops.any(|o| o.contains("Normalization")),
                Kind::Conv => return ops.any(|o| o.starts_with("Conv")),
                _ => {}
            }
        }
        let by_structure = class == Some(NORM_BY_STRUCTURE);
        let class = class.filter(|_| !by_structure);
        let class_name = class.map(|c| c.rsplit('.').next().unwrap_or(c));
        match self {
            Kind::Norm => {
                by_structure
                    || class_name.is_some_and(|c| c.contains("Norm"))
                    || comps.iter().any(|c| {
                        c.contains("norm") || c == "ln" || c.starts_with("ln_") || c == "ln_f"
                    })
            }
            Kind::TwoD => shape.len() == 2,
            Kind::Conv => match class_name {
                Some(c) => c.starts_with("Conv") || c.starts_with("LazyConv"),
                None => (3..=5).contains(&shape.len()),
            },
            Kind::Bias => comps
                .last()
                .is_some_and(|c| c == "bias" || c.ends_with("_bias")),
            Kind::Embedding => {
                comps.iter().any(|c| {
                    c.contains("embed")
                        || matches!(c.as_str(), "wte" | "wpe" | "lm_head" | "embed_out")
                }) || comps
                    .first()
                    .is_some_and(|c| c == "shared" || c == "output")
            }
            Kind::OneD => shape.len() <= 1,
        }
    }
}

/// What selects the tensors a rule applies to.
#[derive(Debug, Clone)]
pub enum Selector {
    /// A glob over dotted components.
    Glob(Vec<String>),
    /// A regular expression (`re:` prefix).
    Regex(Regex),
    /// A kind of tensor (`kind:` prefix).
    Kind(Kind),
    /// The class of the module holding the tensor (`class:` prefix): its name or full path.
    Class(String),
    /// An ONNX operator type using the weight (`op:` prefix).
    Op(String),
    /// The modules transformers keeps in float32 for the input's model type (preset
    /// `transformers-fp32`): resolved by the plan from `config.json`, nothing until then.
    ModelFp32(Option<Regex>),
}

impl Selector {
    /// Parses a pattern as written on the command line or in a rules file.
    pub fn parse(pattern: &str) -> Result<Selector> {
        if let Some(re) = pattern.strip_prefix("re:") {
            return Regex::new(re).map(Selector::Regex).map_err(|e| {
                // The regex crate's message spans lines (the pattern, a caret, the error):
                // keep the error itself on one line.
                let text = e.to_string();
                let why = text
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .trim()
                    .trim_start_matches("error: ");
                Error::usage(format!("pattern `{pattern}`: invalid regex: {why}"))
            });
        }
        if let Some(k) = pattern.strip_prefix("kind:") {
            return Kind::parse(k).map(Selector::Kind).ok_or_else(|| {
                Error::usage(format!(
                    "pattern `{pattern}`: unknown kind `{k}` (use norm, bias, embedding, 1d, 2d or conv)"
                ))
            });
        }
        if let Some(op) = pattern.strip_prefix("op:") {
            if op.is_empty() || !op.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(Error::usage(format!(
                    "pattern `{pattern}`: give an ONNX operator type (op:Conv, op:MatMul)"
                )));
            }
            return Ok(Selector::Op(op.to_string()));
        }
        if let Some(c) = pattern.strip_prefix("class:") {
            if !crate::audit::is_name_path(c) {
                return Err(Error::usage(format!(
                    "pattern `{pattern}`: give a class name (Linear) or its path (torch.nn.Linear)"
                )));
            }
            return Ok(Selector::Class(c.to_string()));
        }
        if pattern.is_empty() || pattern.split('.').any(str::is_empty) {
            return Err(Error::usage(format!(
                "pattern `{pattern}`: empty component (write `a.*.b`, not `a..b`)"
            )));
        }
        if pattern.contains(['[', ']', '{', '}']) {
            return Err(Error::usage(format!(
                "pattern `{pattern}`: globs take `*`, `?` and `**`; use `re:` for more"
            )));
        }
        Ok(Selector::Glob(
            pattern.split('.').map(str::to_string).collect(),
        ))
    }

    /// Whether the tensor `name` of `shape`, in a module of class `class` (a dotted path, when
    /// the input records it), is selected.
    pub fn matches(&self, name: &str, shape: &[u64], class: Option<&str>) -> bool {
        match self {
            Selector::Regex(re) => re.is_match(name),
            Selector::ModelFp32(re) => re.as_ref().is_some_and(|re| re.is_match(name)),
            Selector::Kind(k) => k.matches(name, shape, class),
            Selector::Op(want) => onnx_ops(class).any(|o| o == want),
            Selector::Class(want) => class
                .filter(|c| *c != NORM_BY_STRUCTURE && !c.starts_with(ONNX_OPS))
                .is_some_and(|c| {
                    c == want
                    || c.rsplit('.').next() == Some(want.as_str())
                    // torch.nn.Linear is torch.nn.modules.linear.Linear
                    || (want.split('.').next() == c.split('.').next()
                        && want.rsplit('.').next() == c.rsplit('.').next())
                }),
            Selector::Glob(pat) => {
                let comps: Vec<&str> = name.split('.').collect();
                (0..comps.len()).any(|start| match_run(pat, &comps[start..]))
            }
        }
    }
}

impl Selector {
    /// For a glob that matches none of `names` only because of case: the pattern spelled as
    /// the names spell it, and a name it would match.
    pub fn case_hint<'n>(&self, names: impl Iterator<Item = &'n str>) -> Option<(String, String)> {
        let Selector::Glob(pat) = self else {
            return None;
        };
        let lower: Vec<String> = pat.iter().map(|c| c.to_lowercase()).collect();
        let lowered = Selector::Glob(lower.clone());
        for name in names {
            if !lowered.matches(&name.to_lowercase(), &[], None) {
                continue;
            }
            let fixed: Vec<String> = pat
                .iter()
                .zip(&lower)
                .map(|(orig, low)| {
                    name.split('.')
                        .find(|c| c.to_lowercase() == *low)
                        .map(str::to_string)
                        .unwrap_or_else(|| orig.clone())
                })
                .collect();
            if fixed == *pat {
                // The pattern itself matches: nothing to suggest.
                return None;
            }
            return Some((fixed.join("."), name.to_string()));
        }
        None
    }
}

/// Whether `pat` matches a prefix of `comps` (a run of whole components).
fn match_run(pat: &[String], comps: &[&str]) -> bool {
    let Some((first, rest)) = pat.split_first() else {
        return true;
    };
    if first == "**" {
        return (0..=comps.len()).any(|skip| match_run(rest, &comps[skip..]));
    }
    match comps.split_first() {
        Some((c, more)) => match_component(first.as_bytes(), c.as_bytes()) && match_run(rest, more),
        None => false,
    }
}

/// `*` and `?` wildcard match of one component.
fn match_component(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// A `config.json` key the output gets (a rules file's `[config]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigEdit {
    /// The key (top level).
    pub key: String,
    /// Its value in the input's `config.json` (None: the input has no such key, or no
    /// `config.json`).
    pub old: Option<serde_json::Value>,
    /// The value written.
    pub new: serde_json::Value,
}

/// What a rule does to the tensors it selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Leave the tensor as it is.
    Keep,
    /// Cast to the default target (`--to`).
    Default,
    /// Cast to this dtype.
    To(DType),
}

/// How a scaled weight is used by its model, which says how its factor applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// Used as stored: the value written is `scale * w`.
    Plain,
    /// Used as `1 + w` (Gemma's norms): the value written is `scale * (1 + w) - 1`.
    OnePlus,
}

impl Form {
    /// The name a rules file gives it (`None` for [`Form::Plain`], which has none).
    pub fn name(self) -> Option<&'static str> {
        match self {
            Form::Plain => None,
            Form::OnePlus => Some("1+w"),
        }
    }
}

/// A factor a tensor's values are multiplied by on the way out (a rule's `scale`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Factor {
    /// The factor as written; the arithmetic uses it rounded to f32, as torch does with a
    /// Python float times an f32 tensor.
    pub scale: f64,
    /// How it applies.
    pub form: Form,
}

impl Factor {
    /// A factor, refused unless it is finite and non-zero (also once rounded to f32).
    pub fn new(scale: f64, form: Form) -> std::result::Result<Factor, String> {
        let s = scale as f32;
        if !scale.is_finite() || scale == 0.0 || !s.is_finite() || s == 0.0 {
            return Err(format!(
                "`scale = {scale}`: give a finite, non-zero factor (within f32's range)"
            ));
        }
        Ok(Factor { scale, form })
    }

    /// The scale in f32, as the arithmetic uses it.
    pub fn scale_f32(self) -> f32 {
        self.scale as f32
    }

    /// The value written for the stored value `w` (already in f32), before the cast: each
    /// step rounded to f32, as torch computes `w.float() * scale` or
    /// `scale * (1 + w.float()) - 1`.
    #[inline]
    pub fn apply(self, w: f32) -> f32 {
        let s = self.scale_f32();
        match self.form {
            Form::Plain => w * s,
            Form::OnePlus => (1.0 + w) * s - 1.0,
        }
    }

    /// Whether two factors give the same values (the same scale in f32, the same form).
    pub fn same(self, other: Factor) -> bool {
        self.scale_f32().to_bits() == other.scale_f32().to_bits() && self.form == other.form
    }

    /// In words, as the plan shows it: `x0.125`, `x8 (1+w)`.
    pub fn describe(self) -> String {
        let a = self.scale.abs();
        let num = if (1e-4..1e6).contains(&a) {
            format!("{}", self.scale)
        } else {
            format!("{:e}", self.scale)
        };
        match self.form.name() {
            Some(f) => format!("x{num} ({f})"),
            None => format!("x{num}"),
        }
    }
}

/// One rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// What it selects.
    pub selector: Selector,
    /// What it does to the dtype (unused when `dtype` is false).
    pub action: Action,
    /// Where it came from, as shown in the plan (`--keep *.norm.*`, `preset keep-norms`).
    pub origin: String,
    /// True for `--only` rules, which make unselected tensors stay as they are.
    pub only: bool,
    /// Whether it decides the dtype (false for a rules file's rule with `scale` alone).
    pub dtype: bool,
    /// The factor its tensors are multiplied by (a rules file's `scale`).
    pub factor: Option<Factor>,
}

/// Named presets.
pub const PRESETS: &[(&str, &str)] = &[
    (
        "keep-norms",
        "keep 1-D tensors (norms, biases, scales) as they are",
    ),
    (
        "keep-embeddings",
        "keep token/position embeddings and the output head as they are",
    ),
    (
        "keep-t5-wo",
        "keep T5's feed-forward output projections (`wo`), which overflow in f16",
    ),
    (
        "transformers-fp32",
        "f32 for the modules transformers keeps in float32 for this model type \
         (`_keep_in_fp32_modules` for f16 targets, `_keep_in_fp32_modules_strict` for f16 and \
         bf16; from config.json's model_type)",
    ),
    (
        "llama-cpp-f32",
        "f32 for the tensors llama.cpp's converter always writes in F32: 1-D tensors, norms, \
         MoE router gates, position and token-type embeddings, SSM conv1d",
    ),
];

/// The tensors `convert_hf_to_gguf.py` always writes in F32 (1-D tensors and `*_norm`, then
/// FFN_GATE_INP, POS_EMBD, TOKEN_TYPES and SSM_CONV1D by their Hugging Face names).
const LLAMA_CPP_F32: &[&str] = &[
    "kind:1d",
    "kind:norm",
    r"re:(^|\.)(mlp|block_sparse_moe|moe|feed_forward)\.(gate|router)\.weight$",
    r"re:(^|\.)(position_embeddings|wpe|embed_positions)\.weight$",
    r"re:(^|\.)token_type_embeddings\.weight$",
    r"re:(^|\.)conv1d\.weight$",
];

/// An ordered list of rules.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    /// The rules, in order.
    pub rules: Vec<Rule>,
    /// `config.json` keys the output gets (a rules file's `[config]`), with their new values
    /// (numbers, strings, bools), in key order; a later file's value for a key replaces an
    /// earlier one's.
    pub config: Vec<(String, serde_json::Value)>,
}

impl RuleSet {
    /// Adds a `--keep PATTERN` rule.
    pub fn keep(&mut self, pattern: &str, origin: impl Into<String>) -> Result<()> {
        self.push(pattern, Action::Keep, origin, false)
    }

    /// Adds an `--only PATTERN` rule.
    pub fn only(&mut self, pattern: &str, origin: impl Into<String>) -> Result<()> {
        self.push(pattern, Action::Default, origin, true)
    }

    /// Adds a `--rule PATTERN=DTYPE` rule (`keep` is accepted as the dtype).
    pub fn rule(&mut self, spec: &str, origin: impl Into<String>) -> Result<()> {
        let (pattern, target) = spec.rsplit_once('=').ok_or_else(|| {
            Error::usage(format!(
                "rule `{spec}`: expected PATTERN=DTYPE (or PATTERN=keep)"
            ))
        })?;
        let action =
            parse_target(target).map_err(|e| Error::usage(format!("rule `{spec}`: {e}")))?;
        self.push(pattern, action, origin, false)
    }

    /// Adds the rules of a preset.
    pub fn preset(&mut self, name: &str) -> Result<()> {
        let origin = format!("preset {name}");
        match name {
            "keep-norms" => self.push("kind:1d", Action::Keep, origin, false),
            "keep-embeddings" => self.push("kind:embedding", Action::Keep, origin, false),
            "keep-t5-wo" => self.push("**.wo.*", Action::Keep, origin, false),
            "transformers-fp32" => {
                self.rules.push(Rule {
                    selector: Selector::ModelFp32(None),
                    action: Action::To(DType::F32),
                    origin,
                    only: false,
                    dtype: true,
                    factor: None,
                });
                Ok(())
            }
            "llama-cpp-f32" => LLAMA_CPP_F32
                .iter()
                .try_for_each(|p| self.push(p, Action::To(DType::F32), origin.clone(), false)),
            _ => Err(Error::usage(format!(
                "unknown preset `{name}` (known: {})",
                PRESETS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// Adds the rules of a TOML rules file; returns the file's default `to`, if it sets one.
    /// Its `[config]` keys join [`RuleSet::config`].
    ///
    /// ```toml
    /// to = "bf16"                 # optional default target
    /// [[rule]]
    /// match = "*.layernorm.*"     # glob, re:REGEX or kind:KIND
    /// keep = true
    /// [[rule]]
    /// match = "lm_head"
    /// to = "f32"
    /// [[rule]]
    /// preset = "keep-norms"
    /// [[rule]]
    /// match = "model.embed_tokens.weight"
    /// scale = 0.125               # multiplied by 0.125 (alone: the dtype is left to the others)
    /// [[rule]]
    /// match = "model.norm.weight"
    /// scale = 8.0
    /// form = "1+w"                # used as 1 + w: written as scale * (1 + w) - 1
    /// [config]                    # config.json keys set in the output
    /// rms_norm_eps = 1.52587890625e-08
    /// ```
    pub fn load_file(&mut self, path: &Path) -> Result<Option<DType>> {
        // A rules file is part of the command line: anything wrong with it is a usage error.
        let usage = |what: String| Error::usage(format!("{}: {what}", path.display()));
        let text = std::fs::read_to_string(path)
            .map_err(|e| usage(format!("cannot read the rules file: {e}")))?;
        let file: RulesFile = toml::from_str(&text)
            .map_err(|e| usage(format!("invalid rules file: {}", one_line(&e.to_string()))))?;
        let default = file
            .to
            .as_deref()
            .map(|t| t.parse::<DType>().map_err(|e| usage(e.to_string())))
            .transpose()?;
        for (i, r) in file.rule.iter().enumerate() {
            let origin = format!("{} rule {}", path.display(), i + 1);
            self.add_entry(r, origin)
                .map_err(|what| usage(format!("rule {}: {what}", i + 1)))?;
        }
        for (key, value) in file.config.unwrap_or_default() {
            let value = config_value(&value).ok_or_else(|| {
                usage(format!(
                    "[config] `{key}`: give a number, a string or a bool"
                ))
            })?;
            match self.config.iter_mut().find(|(k, _)| *k == key) {
                Some(slot) => slot.1 = value,
                None => self.config.push((key, value)),
            }
        }
        Ok(default)
    }

    /// Adds one `[[rule]]` of a rules file; the error says what is wrong with it.
    fn add_entry(&mut self, r: &RuleEntry, origin: String) -> std::result::Result<(), String> {
        let factor = match (r.scale, r.form.as_deref()) {
            (None, None) => None,
            (None, Some(_)) => return Err("`form` goes with `scale`".into()),
            (Some(s), form) => {
                let form = match form {
                    None => Form::Plain,
                    Some("1+w") => Form::OnePlus,
                    Some(f) => return Err(format!("`form = \"{f}\"`: the only form is \"1+w\"")),
                };
                Some(Factor::new(s, form)?)
            }
        };
        match (&r.pattern, &r.preset) {
            (Some(_), Some(_)) | (None, None) => {
                Err("give exactly one of `match` and `preset`".into())
            }
            (None, Some(p)) => {
                if r.keep.is_some() || r.to.is_some() || r.only.is_some() || factor.is_some() {
                    return Err("a preset takes no `keep`, `to`, `only` or `scale`".into());
                }
                self.preset(p).map_err(|e| e.to_string())
            }
            (Some(pat), None) => {
                let decided = match (r.keep, &r.to, r.only) {
                    (None, None, None) if factor.is_some() => None,
                    (Some(true), None, None) => Some((Action::Keep, false)),
                    (None, Some(t), None) => {
                        Some((parse_target(t).map_err(|e| e.to_string())?, false))
                    }
                    (None, None, Some(true)) => Some((Action::Default, true)),
                    _ => {
                        return Err("give exactly one of `keep = true`, `to = DTYPE`, \
                                    `only = true` (or `scale` alone)"
                            .into())
                    }
                };
                let (action, only) = decided.unwrap_or((Action::Default, false));
                self.rules.push(Rule {
                    selector: Selector::parse(pat).map_err(|e| e.to_string())?,
                    action,
                    origin,
                    only,
                    dtype: decided.is_some(),
                    factor,
                });
                Ok(())
            }
        }
    }

    fn push(
        &mut self,
        pattern: &str,
        action: Action,
        origin: impl Into<String>,
        only: bool,
    ) -> Result<()> {
        let selector = Selector::parse(pattern)?;
        self.rules.push(Rule {
            selector,
            action,
            origin: origin.into(),
            only,
            dtype: true,
            factor: None,
        });
        Ok(())
    }

    /// Whether a rule waits for the model type (preset `transformers-fp32`).
    pub fn needs_model_type(&self) -> bool {
        self.rules
            .iter()
            .any(|r| matches!(r.selector, Selector::ModelFp32(_)))
    }

    /// Resolves the `transformers-fp32` rules for `model_type` and the default `target`: the
    /// strict modules always, the others when the target is f16 (as transformers loads). The
    /// rule's origin then names the model type and its patterns.
    pub fn resolve_model_type(&mut self, model_type: Option<&str>, target: DType) {
        for r in &mut self.rules {
            if !matches!(r.selector, Selector::ModelFp32(_)) {
                continue;
            }
            let row = model_type.and_then(|m| {
                transformers_fp32::KEEP_IN_FP32
                    .iter()
                    .find(|(t, _, _)| *t == m)
            });
            let mut pats: Vec<&str> = row.map(|r| r.2.to_vec()).unwrap_or_default();
            if target == DType::F16 {
                pats.extend(row.map(|r| r.1.to_vec()).unwrap_or_default());
            }
            let base = "preset transformers-fp32";
            r.origin = match (model_type, pats.is_empty()) {
                (None, _) => format!("{base} (no model_type in a config.json)"),
                (Some(m), true) => format!("{base} ({m}: nothing kept in float32)"),
                (Some(m), false) => format!("{base} ({m}: {})", pats.join(", ")),
            };
            let re = (!pats.is_empty()).then(|| {
                let body: Vec<String> = pats.iter().map(|p| p.replace('*', ".*")).collect();
                Regex::new(&body.join("|")).expect("transformers' patterns are regexes")
            });
            r.selector = Selector::ModelFp32(re);
        }
    }

    /// The action for a tensor and the index of the rule that decided (None: the default):
    /// the last matching rule that decides dtypes.
    pub fn decide(
        &self,
        name: &str,
        shape: &[u64],
        class: Option<&str>,
    ) -> (Action, Option<usize>) {
        let default = if self.rules.iter().any(|r| r.only) {
            Action::Keep
        } else {
            Action::Default
        };
        self.rules
            .iter()
            .enumerate()
            .rev()
            .find(|(_, r)| r.dtype && r.selector.matches(name, shape, class))
            .map(|(i, r)| (r.action, Some(i)))
            .unwrap_or((default, None))
    }

    /// The factor of a tensor and the index of the rule that gives it: the last matching rule
    /// that has a `scale` (None: the tensor is not scaled).
    pub fn factor(
        &self,
        name: &str,
        shape: &[u64],
        class: Option<&str>,
    ) -> Option<(Factor, usize)> {
        self.rules
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, r)| r.factor.is_some())
            .find(|(_, r)| r.selector.matches(name, shape, class))
            .map(|(i, r)| (r.factor.expect("filtered"), i))
    }
}

fn parse_target(s: &str) -> Result<Action> {
    if s.trim().eq_ignore_ascii_case("keep") {
        Ok(Action::Keep)
    } else {
        s.parse::<DType>().map(Action::To)
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A `[config]` value as JSON: a number, a string or a bool (None for anything else).
fn config_value(v: &toml::Value) -> Option<serde_json::Value> {
    Some(match v {
        toml::Value::String(s) => serde_json::Value::String(s.clone()),
        toml::Value::Integer(i) => serde_json::Value::from(*i),
        toml::Value::Float(f) => serde_json::Value::Number(serde_json::Number::from_f64(*f)?),
        toml::Value::Boolean(b) => serde_json::Value::Bool(*b),
        _ => return None,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    to: Option<String>,
    #[serde(default)]
    rule: Vec<RuleEntry>,
    config: Option<toml::Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleEntry {
    #[serde(rename = "match")]
    pattern: Option<String>,
    preset: Option<String>,
    keep: Option<bool>,
    to: Option<String>,
    only: Option<bool>,
    scale: Option<f64>,
    form: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, name: &str) -> bool {
        Selector::parse(p).unwrap().matches(name, &[4, 4], None)
    }

    #[test]
    fn globs_match_whole_components() {
        assert!(m("*.layernorm.*", "encoder.layer.0.layernorm.weight"));
        assert!(!m("*.layernorm.*", "embeddings.word_embeddings.weight"));
        assert!(m("wo", "encoder.block.0.layer.1.DenseReluDense.wo.weight"));
        assert!(
            !m("wo", "shared.word_embeddings.weight"),
            "the transformers #26589 bug"
        );
        assert!(!m("*norm*", "h.0.LayerNorm.bias"), "case-sensitive");
        assert!(m("*Norm*", "h.0.LayerNorm.bias"));
        assert!(m("layers.*.mlp", "model.layers.12.mlp.up_proj.weight"));
        assert!(!m("layers.*.mlp", "model.layers.12.self_attn.mlp"));
        assert!(m("model.**.weight", "model.layers.0.q.weight"));
        assert!(m("lm_head.weight", "lm_head.weight"));
        assert!(m("q?proj", "a.q_proj.weight"));
    }

    #[test]
    fn regex_and_kinds() {
        assert!(m("re:^lm_head", "lm_head.weight"));
        assert!(!m("re:^lm_head", "x.lm_head.weight"));
        let norm = Selector::parse("kind:norm").unwrap();
        assert!(norm.matches("encoder.layer.0.output.LayerNorm.weight", &[384], None));
        assert!(norm.matches("h.0.ln_1.weight", &[768], None));
        assert!(norm.matches("model.layers.0.input_layernorm.weight", &[4096], None));
        assert!(!norm.matches("model.layers.0.mlp.down_proj.weight", &[4, 4], None));
        let emb = Selector::parse("kind:embedding").unwrap();
        assert!(emb.matches("embeddings.word_embeddings.weight", &[4, 4], None));
        assert!(emb.matches("lm_head.weight", &[4, 4], None));
        assert!(emb.matches("output.weight", &[4, 4], None));
        assert!(!emb.matches("model.layers.0.attn.output.weight", &[4, 4], None));
        let oned = Selector::parse("kind:1d").unwrap();
        assert!(oned.matches("x.bias", &[4], None) && oned.matches("scale", &[], None));
        assert!(!oned.matches("x.weight", &[4, 4], None));
    }

    #[test]
    fn module_classes() {
        let linear = Some("torch.nn.modules.linear.Linear");
        let conv = Some("torch.nn.modules.conv.Conv2d");
        let bn = Some("torch.nn.modules.batchnorm.BatchNorm2d");
        for p in [
            "class:Linear",
            "class:torch.nn.Linear",
            "class:torch.nn.modules.linear.Linear",
        ] {
            let s = Selector::parse(p).unwrap();
            assert!(s.matches("0.weight", &[4, 4], linear), "{p}");
            assert!(!s.matches("0.weight", &[4, 4], conv), "{p}");
            assert!(!s.matches("0.weight", &[4, 4], None), "{p}");
        }
        let norm = Selector::parse("kind:norm").unwrap();
        assert!(norm.matches("1.weight", &[8], bn), "BatchNorm by its class");
        assert!(!norm.matches("1.weight", &[8], conv));
        let k = Selector::parse("kind:conv").unwrap();
        assert!(k.matches("0.weight", &[8, 3, 3, 3], conv));
        assert!(k.matches("0.bias", &[8], conv), "a Conv module's bias");
        assert!(
            k.matches("c.weight", &[8, 3, 3], None),
            "by shape without a class"
        );
        assert!(!k.matches("0.weight", &[4, 4], linear));
        let two = Selector::parse("kind:2d").unwrap();
        assert!(two.matches("w", &[4, 4], None) && !two.matches("w", &[4], None));
        assert!(Selector::parse("class:a b").is_err());
    }

    #[test]
    fn onnx_weights_are_selected_by_the_ops_using_them() {
        let conv = Some("onnx:Conv");
        let ln = Some("onnx:LayerNormalization");
        let mm = Some("onnx:Add,MatMul");
        let op = Selector::parse("op:MatMul").unwrap();
        assert!(op.matches("w", &[4, 4], mm) && !op.matches("w", &[4, 4], conv));
        assert!(
            !op.matches("w", &[4, 4], Some("MatMul")),
            "a PyTorch class is not an op"
        );
        assert!(!Selector::parse("op:Mat").unwrap().matches("w", &[4, 4], mm));
        let norm = Selector::parse("kind:norm").unwrap();
        assert!(norm.matches("scale", &[8], ln));
        // the graph decides, not the name: a `norm`-named MatMul weight is no norm
        assert!(!norm.matches("layernorm.w", &[8, 8], mm));
        let k = Selector::parse("kind:conv").unwrap();
        assert!(k.matches("w", &[8, 3, 3, 3], conv) && !k.matches("w", &[8, 3, 3, 3], mm));
        assert!(!Selector::parse("class:Conv")
            .unwrap()
            .matches("w", &[8, 3, 3, 3], conv));
        for bad in ["op:", "op:a b", "op:x.y"] {
            assert!(Selector::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_patterns_are_errors() {
        for p in ["re:(", "kind:nope", "a..b", "", "a[0]"] {
            assert!(Selector::parse(p).is_err(), "{p}");
        }
    }

    #[test]
    fn last_match_wins_and_only() {
        let mut r = RuleSet::default();
        r.keep("*.LayerNorm.*", "--keep").unwrap();
        r.rule("encoder.layer.0.**=bf16", "--rule").unwrap();
        assert_eq!(
            r.decide("encoder.layer.0.LayerNorm.weight", &[4], None).0,
            Action::To(DType::BF16)
        );
        assert_eq!(
            r.decide("encoder.layer.1.LayerNorm.weight", &[4], None).0,
            Action::Keep
        );
        assert_eq!(
            r.decide("pooler.dense.weight", &[4, 4], None),
            (Action::Default, None)
        );
        r.only("pooler.*", "--only").unwrap();
        assert_eq!(
            r.decide("x.dense.weight", &[4, 4], None),
            (Action::Keep, None)
        );
        assert_eq!(
            r.decide("pooler.dense.weight", &[4, 4], None).0,
            Action::Default
        );
    }

    #[test]
    fn rules_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.toml");
        std::fs::write(
            &p,
            "to = 'bf16'\n[[rule]]\nmatch = 'lm_head'\nto = 'f32'\n[[rule]]\npreset = 'keep-norms'\n",
        )
        .unwrap();
        let mut r = RuleSet::default();
        assert_eq!(r.load_file(&p).unwrap(), Some(DType::BF16));
        assert_eq!(r.rules.len(), 2);
        assert_eq!(
            r.decide("lm_head.weight", &[2, 2], None).0,
            Action::To(DType::F32)
        );
        std::fs::write(&p, "[[rule]]\nmatch = 'x'\nkeep = true\nto = 'f16'\n").unwrap();
        let err = RuleSet::default().load_file(&p).unwrap_err().to_string();
        assert!(err.contains("rule 1"), "{err}");
        std::fs::write(&p, "[[rule]]\nmatch = 'x'\nkep = true\n").unwrap();
        assert!(RuleSet::default().load_file(&p).is_err());
    }

    /// Writes `text` as a rules file and loads it into a fresh rule set.
    fn load(text: &str) -> Result<RuleSet> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.toml");
        std::fs::write(&p, text).unwrap();
        let mut r = RuleSet::default();
        r.load_file(&p).map(|_| r)
    }

    #[test]
    fn scale_alone_leaves_the_dtype_to_the_other_rules() {
        let r = load(
            "[[rule]]\nmatch = 'lm_head'\nto = 'f32'\n\
             [[rule]]\nmatch = 'model.embed_tokens.weight'\nscale = 0.125\n\
             [[rule]]\nmatch = '*.weight'\nscale = 0.5\n\
             [[rule]]\nmatch = 'lm_head.weight'\nscale = 2\n",
        )
        .unwrap();
        assert_eq!(r.rules.len(), 4);
        assert!(r.rules[0].dtype && !r.rules[1].dtype && !r.rules[3].dtype);
        // scale-only rules decide no dtype
        assert_eq!(
            r.decide("model.embed_tokens.weight", &[4, 4], None),
            (Action::Default, None)
        );
        assert_eq!(
            r.decide("lm_head.weight", &[4, 4], None),
            (Action::To(DType::F32), Some(0))
        );
        // the last matching rule with a scale wins (integers are scales too)
        let (f, i) = r.factor("lm_head.weight", &[4, 4], None).unwrap();
        assert_eq!((f.scale, f.form, i), (2.0, Form::Plain, 3));
        let (f, i) = r
            .factor("model.embed_tokens.weight", &[4, 4], None)
            .unwrap();
        assert_eq!(
            (f.scale, i),
            (0.5, 2),
            "`*.weight` comes later and matches too"
        );
        assert!(r.factor("model.embed_tokens.bias", &[4], None).is_none());
    }

    #[test]
    fn scale_beside_to_keep_and_only_does_both() {
        let r = load(
            "[[rule]]\nmatch = 'down_proj'\nscale = 0.25\nto = 'f32'\n\
             [[rule]]\nmatch = 'norm'\nscale = 8.0\nform = '1+w'\nkeep = true\n\
             [[rule]]\nmatch = 'q_proj'\nscale = 0.3\nonly = true\n",
        )
        .unwrap();
        let down = "model.layers.0.mlp.down_proj.weight";
        assert_eq!(r.decide(down, &[4, 4], None).0, Action::To(DType::F32));
        assert_eq!(r.factor(down, &[4, 4], None).unwrap().0.scale, 0.25);
        let norm = "model.norm.weight";
        assert_eq!(r.decide(norm, &[4], None).0, Action::Keep);
        let f = r.factor(norm, &[4], None).unwrap().0;
        assert_eq!((f.scale, f.form), (8.0, Form::OnePlus));
        assert_eq!(f.apply(0.5), 11.0);
        assert_eq!(f.describe(), "x8 (1+w)");
        assert!(r.rules[2].only && r.rules[2].dtype);
        let q = r.factor("a.q_proj.weight", &[4, 4], None).unwrap().0;
        assert_eq!(q.scale_f32(), 0.3f32);
        assert_eq!(q.apply(1.0), 0.3f32);
    }

    #[test]
    fn bad_scales_and_forms_are_refused() {
        for (text, want) in [
            (
                "[[rule]]\nmatch = 'x'\nform = '1+w'\n",
                "`form` goes with `scale`",
            ),
            (
                "[[rule]]\nmatch = 'x'\nform = '1+w'\nkeep = true\n",
                "`form` goes with `scale`",
            ),
            ("[[rule]]\nmatch = 'x'\nscale = 0\n", "non-zero"),
            ("[[rule]]\nmatch = 'x'\nscale = 0.0\n", "non-zero"),
            ("[[rule]]\nmatch = 'x'\nscale = nan\n", "finite"),
            ("[[rule]]\nmatch = 'x'\nscale = inf\n", "finite"),
            ("[[rule]]\nmatch = 'x'\nscale = 1e300\n", "finite"),
            (
                "[[rule]]\nmatch = 'x'\nscale = 2.0\nform = 'w+1'\n",
                "the only form",
            ),
            (
                "[[rule]]\nmatch = 'x'\nscale = 2.0\nfactor = 3\n",
                "invalid rules file",
            ),
            (
                "[[rule]]\npreset = 'keep-norms'\nscale = 2.0\n",
                "a preset takes no",
            ),
            (
                "[[rule]]\nmatch = 'x'\nscale = 2.0\nkeep = true\nto = 'f16'\n",
                "exactly one",
            ),
            (
                "[[rule]]\nmatch = 'x'\nscale = 'big'\n",
                "invalid rules file",
            ),
            (
                "[config]\nrms_norm_eps = [1, 2]\n",
                "`rms_norm_eps`: give a number",
            ),
            ("[confg]\nrms_norm_eps = 1e-6\n", "invalid rules file"),
        ] {
            let err = load(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn config_table_is_parsed_and_later_files_win() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.toml"), dir.path().join("b.toml"));
        std::fs::write(
            &a,
            "to = 'f16'\n[config]\nrms_norm_eps = 1.52587890625e-08\nuse_cache = false\n\
             model_type = 'llama'\nmax_position_embeddings = 4096\n",
        )
        .unwrap();
        std::fs::write(&b, "[config]\nuse_cache = true\n").unwrap();
        let mut r = RuleSet::default();
        assert_eq!(r.load_file(&a).unwrap(), Some(DType::F16));
        r.load_file(&b).unwrap();
        assert!(r.rules.is_empty());
        let get = |k: &str| {
            r.config
                .iter()
                .find(|(key, _)| key == k)
                .map(|x| x.1.clone())
        };
        assert_eq!(
            get("rms_norm_eps"),
            Some(serde_json::json!(1.52587890625e-08))
        );
        assert_eq!(get("use_cache"), Some(serde_json::json!(true)));
        assert_eq!(get("model_type"), Some(serde_json::json!("llama")));
        assert_eq!(
            get("max_position_embeddings"),
            Some(serde_json::json!(4096))
        );
        assert_eq!(r.config.len(), 4);
    }
}
