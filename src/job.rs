//! One conversion as a person asks for it: the command line's `convert` flags and the Python
//! API's `convert()` keywords both become a [`ConvertRequest`], and [`ConvertRequest::prepare`]
//! reads the input and decides everything (rules, targets, the per-tensor checks of `--auto`,
//! `--on-overflow keep` and `--max-underflow`, scaled FP8). What it returns is what is written;
//! [`crate::convert::convert`] then writes it. Messages for the user come back as warnings,
//! never printed here.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::analysis;
use crate::catalogue::Catalogue;
use crate::convert::{OnOverflow, Options, Progress};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::formats;
use crate::plan::{Plan, Scope};
use crate::quant::OnQuantized;
use crate::rules::RuleSet;
use crate::stats::Bounds;

/// A rule as given (`--keep`, `--only`, `--rule`, `--rules FILE`, `--preset`), in order: the
/// last rule that matches a tensor decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleArg {
    /// Keep matching tensors in their dtype.
    Keep(String),
    /// Cast only matching tensors.
    Only(String),
    /// `PATTERN=DTYPE`.
    Rule(String),
    /// A TOML rules file.
    Rules(PathBuf),
    /// A named preset.
    Preset(String),
}

/// Builds the rule set in order; returns it with a default target from a rules file, if one
/// set it.
pub fn build_rules(order: &[RuleArg]) -> Result<(RuleSet, Option<DType>)> {
    let mut rules = RuleSet::default();
    let mut file_to = None;
    for r in order {
        match r {
            RuleArg::Keep(p) => rules.keep(p, format!("--keep {p}"))?,
            RuleArg::Only(p) => rules.only(p, format!("--only {p}"))?,
            RuleArg::Rule(p) => rules.rule(p, format!("--rule {p}"))?,
            RuleArg::Rules(f) => file_to = rules.load_file(f)?.or(file_to),
            RuleArg::Preset(p) => rules.preset(p)?,
        }
    }
    Ok((rules, file_to))
}

/// The one target of `--to` (or of a rules file), checked castable.
pub fn single_target(to: Option<&str>, file_to: Option<DType>) -> Result<DType> {
    let target: DType = match (to, file_to) {
        (Some(t), _) if t.contains(',') => {
            return Err(Error::usage(format!(
                "--to {t}: a list of candidates needs --auto SNR_DB"
            )))
        }
        (Some(t), _) => t.parse()?,
        (None, Some(d)) => d,
        (None, None) => return Err(Error::usage("--to DTYPE is required (e.g. --to f16)")),
    };
    check_castable(target)?;
    Ok(target)
}

/// An error unless weightcast writes `target`.
pub fn check_castable(target: DType) -> Result<()> {
    if target.is_castable() {
        Ok(())
    } else {
        Err(Error::usage(format!(
            "cannot cast to {target}: choose {}",
            crate::dtype::castable_short_names()
        )))
    }
}

/// With `--strict-rules`, a rule that matches no tensor is an error.
pub fn check_unmatched(plan: &Plan, strict_rules: bool) -> Result<()> {
    if strict_rules && !plan.unmatched.is_empty() {
        return Err(Error::usage(format!(
            "--strict-rules: {} rule(s) match no tensor: {}",
            plan.unmatched.len(),
            plan.unmatched.join(", ")
        )));
    }
    Ok(())
}

/// A `.pt`, `.pth` or `.bin` output (a torch.save checkpoint).
pub fn is_pt(out: &Path) -> bool {
    out.extension()
        .is_some_and(|e| e == "pt" || e == "pth" || e == "bin")
}

/// Everything a conversion can be asked.
#[derive(Debug, Clone)]
pub struct ConvertRequest {
    /// The input: a file, an index or a model folder.
    pub input: PathBuf,
    /// The output.
    pub output: PathBuf,
    /// `--to`: a dtype, `auto`, or with [`ConvertRequest::auto`] a comma-separated list.
    pub to: Option<String>,
    /// The rules, in order.
    pub rules: Vec<RuleArg>,
    /// A rule that matches nothing is an error.
    pub strict_rules: bool,
    /// What to do when values would overflow.
    pub on_overflow: OnOverflow,
    /// Keep tensors whose non-zero values would flush to zero above this fraction.
    pub max_underflow: Option<f64>,
    /// Per tensor, the first candidate that keeps this SNR (dB).
    pub auto: Option<f64>,
    /// Shard size in bytes.
    pub max_shard_size: Option<u64>,
    /// The state dict's entry in a training checkpoint.
    pub key: Option<String>,
    /// Keep only the model's weights.
    pub inference: bool,
    /// Cast optimizer state too (`.pt` output of a whole checkpoint).
    pub cast_optimizer: bool,
    /// Refuse globals outside torch's weights-only allowlist in a `.pt` output.
    pub strict: bool,
    /// Remove this prefix from tensor names.
    pub strip_prefix: Option<String>,
    /// What to do with a scaled FP8 input.
    pub on_quantized: OnQuantized,
    /// Write scaled FP8 with this scale layout.
    pub scale: Option<String>,
    /// The scaled FP8 format (`compressed-tensors` or `fp8`); with [`ConvertRequest::scale`]
    /// only (None: `compressed-tensors`).
    pub scale_format: Option<String>,
    /// Replace an existing output.
    pub force: bool,
    /// fsync outputs before renaming them into place.
    pub sync: bool,
    /// Set to stop early.
    pub cancel: Option<Arc<AtomicBool>>,
    /// One part of a split conversion, or the step that finishes it.
    pub part: Option<crate::convert::Part>,
    /// Plan only (`--dry-run`): [`ConvertRequest::prepare`] then also runs the checks the
    /// writing pass makes on the data (the overflow refusal, the flush-to-zero warning).
    pub dry_run: bool,
}

impl ConvertRequest {
    /// A request with the command line's defaults.
    pub fn new(input: impl Into<PathBuf>, output: impl Into<PathBuf>) -> ConvertRequest {
        ConvertRequest {
            input: input.into(),
            output: output.into(),
            to: None,
            rules: vec![],
            strict_rules: false,
            on_overflow: OnOverflow::Error,
            max_underflow: None,
            auto: None,
            max_shard_size: None,
            key: None,
            inference: false,
            cast_optimizer: false,
            strict: false,
            strip_prefix: None,
            on_quantized: OnQuantized::Dequantize,
            scale: None,
            scale_format: None,
            force: false,
            sync: true,
            cancel: None,
            part: None,
            dry_run: false,
        }
    }
}

/// A decided conversion: what is written, how, and what the user should be told.
pub struct Prepared {
    /// The input.
    pub cat: Catalogue,
    /// What is written.
    pub plan: Plan,
    /// How the executor writes it.
    pub options: Options,
    /// Messages for the user, in order.
    pub warnings: Vec<String>,
}

impl ConvertRequest {
    /// Refuses options that the output cannot honour, before any input is read.
    fn check_options(&self, pt_out: bool) -> Result<()> {
        if let (Some(f), None) = (&self.scale_format, &self.scale) {
            return Err(Error::usage(format!(
                "--scale-format {f} applies with --scale LAYOUT (scaled FP8 output) only"
            )));
        }
        if pt_out && self.max_shard_size.is_some() {
            return Err(Error::usage(format!(
                "{}: --max-shard-size splits safetensors outputs; a .pt output is one \
                 torch.save file (write a folder or a .safetensors file to shard it)",
                self.output.display()
            )));
        }
        Ok(())
    }

    /// The passes over the data before writing: `--on-overflow keep` and `--max-underflow`
    /// decide tensors from what their cast would do; a dry run measures whatever the writing
    /// pass would find (the overflow refusal, the flush-to-zero warning), so that it refuses
    /// and warns as the run would.
    fn check_data(
        &self,
        cat: &Catalogue,
        plan: &mut Plan,
        progress: &dyn Progress,
        warnings: &mut Vec<String>,
    ) -> Result<()> {
        // A dry run measures whatever the writing pass would find in the data, so that it
        // refuses and warns as the run would.
        let predict = self.dry_run && plan.tensors.iter().any(|p| p.is_cast());
        if self.on_overflow == OnOverflow::Keep || self.max_underflow.is_some() || predict {
            progress.phase("checking");
            let analyses = analysis::analyze(cat, plan, &Bounds::default(), progress, None)?;
            if self.on_overflow == OnOverflow::Keep {
                let n = analysis::keep_overflowing(cat, plan, &analyses);
                if n > 0 {
                    warnings.push(format!("{n} tensor(s) kept in their dtype: their values would overflow (--on-overflow keep)"));
                }
            }
            if let Some(f) = self.max_underflow {
                let n = analysis::keep_underflowing(cat, plan, &analyses, f);
                if n > 0 {
                    warnings.push(format!("{n} tensor(s) kept in their dtype: more than {f} of their non-zero values would flush to zero"));
                }
            }
            if predict {
                let still_cast =
                    |a: &&analysis::TensorAnalysis| plan.tensors[a.plan_index].is_cast();
                let name = |a: &analysis::TensorAnalysis| {
                    cat.tensors[plan.tensors[a.plan_index].tensor].name.clone()
                };
                if self.on_overflow == OnOverflow::Error {
                    let named: Vec<(String, DType, u64)> = analyses
                        .iter()
                        .filter(still_cast)
                        .filter(|a| a.stats.overflow > 0)
                        .map(|a| (name(a), a.to, a.stats.overflow))
                        .collect();
                    if !named.is_empty() {
                        return Err(crate::convert::overflow_refusal(&cat.path, &named));
                    }
                }
                let flushed: Vec<String> = analyses
                    .iter()
                    .filter(still_cast)
                    .filter(|a| a.stats.flushed_entirely())
                    .map(name)
                    .collect();
                warnings.extend(crate::convert::flushed_warning(&flushed));
            }
        }
        Ok(())
    }

    /// Reads the input and decides everything. `progress` sees the analysis passes of
    /// `auto`, `on_overflow keep` and `max_underflow` (phases `choosing` and `checking`).
    pub fn prepare(&self, progress: &dyn Progress) -> Result<Prepared> {
        let mut warnings = Vec::new();
        let (rules, file_to) = build_rules(&self.rules)?;
        if let Some(f) = self.max_underflow {
            if !(0.0..=1.0).contains(&f) {
                return Err(Error::usage(format!(
                    "--max-underflow {f}: give a fraction between 0 and 1"
                )));
            }
        }
        let candidates: Vec<DType> = match (self.auto, &self.to) {
            (Some(_), Some(list)) => list
                .split(',')
                .map(|t| {
                    t.parse::<DType>()
                        .and_then(|d| check_castable(d).map(|_| d))
                })
                .collect::<Result<_>>()?,
            (Some(_), None) => {
                return Err(Error::usage(
                    "--auto needs --to with candidates (e.g. --to f8e4m3,bf16,f16)",
                ))
            }
            (None, _) => vec![],
        };
        let auto_to = self.to.as_deref() == Some("auto");
        if auto_to && self.auto.is_some() {
            return Err(Error::usage(
                "--to auto keeps the source precision: not with --auto",
            ));
        }
        let target = match candidates.first() {
            Some(&d) => d,
            None if auto_to => DType::F32, // decided from the tensors once they are read
            None => single_target(self.to.as_deref(), file_to)?,
        };
        let pt_out = is_pt(&self.output);
        self.check_options(pt_out)?;
        if self.cast_optimizer && (!pt_out || self.inference) {
            return Err(Error::usage(
                "--cast-optimizer applies to a .pt output of a whole training checkpoint (not with --inference)",
            ));
        }
        let mut cat = formats::open_with(&self.input, self.key.as_deref())?;
        warnings.extend(cat.notes.iter().cloned());
        if let Some(p) = &self.strip_prefix {
            if cat.strip_prefix(p)? == 0 {
                warnings.push(format!("--strip-prefix {p}: no tensor name starts with it"));
            }
        }
        if let (false, Some(doc)) = (pt_out, cat.torch.as_deref()) {
            warnings.extend(formats::torch::tied_note(doc));
        }
        // A .pt output keeps the whole file (optimizer state too) unless --inference keeps
        // only the model's weights; the plan covers exactly what is written.
        let scope = if pt_out && !self.inference {
            Scope::WholeFile {
                cast_others: self.cast_optimizer,
            }
        } else {
            Scope::StateDict
        };
        let target = if auto_to {
            Plan::auto_target(&cat).ok_or_else(|| {
                Error::usage(format!(
                    "--to auto: {} has no floating tensor to take a precision from",
                    self.input.display()
                ))
            })?
        } else {
            target
        };
        let mut plan = Plan::with_scope(&cat, &rules, target, scope);
        if auto_to {
            plan.keep_source_precision();
        }
        if self.on_quantized == OnQuantized::Keep {
            plan.keep_quantized(&cat);
        }
        if let Some(scale) = &self.scale {
            use crate::quant::quantize::{plan_scaled, Format, Scheme};
            let format = self.scale_format.as_deref().unwrap_or("compressed-tensors");
            let scheme = Scheme::parse(scale, format.parse::<Format>()?)?;
            if target != DType::F8E4M3 || self.auto.is_some() {
                return Err(Error::usage(format!(
                    "--scale {scale} writes float8_e4m3fn weights: use it with --to f8e4m3 (not --auto)"
                )));
            }
            if pt_out {
                return Err(Error::usage(
                    "--scale writes a safetensors model (a folder, or a .safetensors file): not .pt",
                ));
            }
            plan_scaled(&mut cat, &mut plan, &scheme)?;
            if cat.folder.is_none() {
                warnings.push(
                    "a single .safetensors file carries no quantization_config: loaders find the \
                     scheme in a model folder's config.json (convert the folder)"
                        .into(),
                );
            }
        }
        warnings.extend(plan.warnings.iter().cloned());
        check_unmatched(&plan, self.strict_rules)?;
        if let (true, Some(doc)) = (self.inference, cat.torch.as_deref()) {
            if let Some(e) = &doc.entry {
                warnings.push(format!(
                    "--inference kept the entry `{e}`; dropped {} ({} tensor bytes saved)",
                    formats::torch::describe_dropped(&plan.dropped),
                    plan.dropped.iter().map(|d| d.2).sum::<u64>()
                ));
            }
        }
        if let Some(snr) = self.auto {
            progress.phase("choosing");
            analysis::choose_auto(&cat, &mut plan, &candidates, snr, progress, None)?;
        }
        self.check_data(&cat, &mut plan, progress, &mut warnings)?;
        if let Some(max) = self.max_shard_size {
            let over: Vec<&crate::plan::TensorPlan> =
                plan.tensors.iter().filter(|p| p.bytes_out > max).collect();
            if let Some(first) = over.first() {
                warnings.push(format!(
                    "{} tensor(s) are larger than --max-shard-size {max} bytes: each is written \
                     in a shard of its own, over the limit (`{}`: {} bytes)",
                    over.len(),
                    cat.tensors[first.tensor].name,
                    first.bytes_out
                ));
            }
        }
        let options = Options {
            force: self.force,
            max_shard_size: self.max_shard_size,
            cancel: self.cancel.clone(),
            sync: self.sync,
            on_overflow: self.on_overflow,
            pt_export: formats::torch_write::PtExport {
                inference: self.inference,
                strip_prefix: self.strip_prefix.clone(),
                strict: self.strict,
            },
            part: self.part,
        };
        Ok(Prepared {
            cat,
            plan,
            options,
            warnings,
        })
    }
}
