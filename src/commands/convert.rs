//! One conversion as a person asks for it: the command line's `convert` flags and the Python
//! API's `convert()` keywords both become a [`ConvertRequest`], and [`ConvertRequest::prepare`]
//! reads the input and decides everything (rules, targets, the per-tensor checks of `--auto`,
//! `--on-overflow keep` and `--max-underflow`, scaled FP8) and the output (resolved once, every
//! pre-write check made: [`crate::convert::plan_output`]). What it returns, a [`Prepared`], is
//! what is written: [`Prepared::execute`] is the one way a conversion runs, from the command
//! line and from Python ([`ConvertRequest::run`] does both steps and returns the `--json`
//! document). Messages for the user come back as warnings, never printed here.

use std::path::{Path, PathBuf};

use serde::Serialize;
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
use crate::stats::Bounds;

use super::document::PlanDoc;
use super::{build_rules, check_castable, check_unmatched, is_pt, single_target, Caller, RuleArg};

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
    /// For inference: a `.pt` output keeps the checkpoint without its training state
    /// (optimizer, scheduler, AMP scaler, RNG states, gradient buffers); `requires_grad` is
    /// cleared.
    pub inference: bool,
    /// A `.pt` output holds the state dict alone (the other entries of a training checkpoint
    /// are dropped).
    pub state_dict_only: bool,
    /// Cast optimizer state too (`.pt` output of a whole checkpoint).
    pub cast_optimizer: bool,
    /// Refuse globals outside torch's weights-only allowlist in a `.pt` output.
    pub strict: bool,
    /// Globals a `.pt` output may call although no allowlist names them (`--allow`).
    pub allow: crate::audit::Allow,
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
    /// Who asked (the vocabulary of messages).
    pub caller: Caller,
    /// The output is the caller's memory (`cast_module`): the plan's `config.json` edits (a
    /// rules file's `[config]`) are the caller's to apply, not refused for want of an output
    /// `config.json`.
    pub memory: bool,
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
            state_dict_only: false,
            cast_optimizer: false,
            strict: false,
            allow: crate::audit::Allow::default(),
            strip_prefix: None,
            on_quantized: OnQuantized::Dequantize,
            scale: None,
            scale_format: None,
            force: false,
            sync: true,
            cancel: None,
            part: None,
            dry_run: false,
            caller: Caller::Cli,
            memory: false,
        }
    }
}

/// A decided conversion: what is written, how, and what the user should be told. Nothing
/// about it changes after [`ConvertRequest::prepare`]: a dry run shows it, [`Prepared::execute`]
/// writes it.
pub struct Prepared {
    /// The input.
    pub cat: Catalogue,
    /// What is written.
    pub plan: Plan,
    /// How the executor writes it.
    pub options: Options,
    /// Where it is written: the target, its files, the `.pt` writer's plan, the checks passed.
    pub output: crate::convert::Output,
    /// Messages for the user, in order.
    pub warnings: Vec<String>,
}

impl Prepared {
    /// A `.pt` output: what its pickle asks of `torch.load` (a call audit does not allow was
    /// refused while preparing: nothing is written).
    pub fn pickle(&self) -> Option<&crate::formats::torch::write::PickleReport> {
        self.output.pt.as_ref().map(|pt| &pt.report)
    }

    /// Writes the output as decided: the one way a conversion runs.
    pub fn execute(&self, progress: &dyn Progress) -> Result<crate::convert::Summary> {
        progress.phase("converting");
        crate::convert::write(&self.cat, &self.plan, &self.output, &self.options, progress)
    }
}

impl ConvertRequest {
    /// Option `name` as the caller wrote it.
    fn flag(&self, name: &str) -> String {
        self.caller.flag(name)
    }

    /// The candidates of `auto` (empty without it) and the default target (f32 for `to =
    /// auto` until the tensors are read), checked before any input is read.
    fn targets(&self, file_to: Option<DType>) -> Result<(Vec<DType>, DType)> {
        let c = self.caller;
        let auto_to = self.to.as_deref() == Some("auto");
        if auto_to && self.auto.is_some() {
            return Err(Error::usage(format!(
                "{} keeps the source precision: not with {}",
                c.given("to", "auto"),
                c.flag("auto")
            )));
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
                return Err(Error::usage(format!(
                    "{} needs {} with candidates (e.g. {})",
                    c.flag("auto"),
                    c.flag("to"),
                    c.given("to", "f8e4m3,bf16,f16")
                )))
            }
            (None, _) => vec![],
        };
        if !self.gguf_q8()
            && self
                .to
                .as_deref()
                .is_some_and(|t| t.eq_ignore_ascii_case("q8_0"))
        {
            return Err(Error::usage(format!(
                "{}: q8_0 is a GGUF type: write a .gguf output",
                c.given("to", "q8_0")
            )));
        }
        let target = match candidates.first() {
            Some(&d) => d,
            None if auto_to => DType::F32, // decided from the tensors once they are read
            // FP4 weights: planned as f4, the linear weights then packed with their scales
            None if self.fp4().is_some() => DType::F4,
            // a GGUF output in Q8_0: planned as f32, the retyped tensors quantized from it
            None if self.gguf_q8() => DType::F32,
            None => single_target(self.to.as_deref(), file_to, c)?,
        };
        Ok((candidates, target))
    }

    /// The llama.cpp file type of a GGUF output of a model folder: `--to`, or for `auto` the
    /// converter's guess from the tensors.
    fn folder_gguf_type(
        &self,
        cat: &Catalogue,
        auto_to: bool,
        target: DType,
    ) -> formats::gguf::hf::FileType {
        use formats::gguf::hf::FileType;
        if auto_to {
            formats::gguf::hf::guess_file_type(cat)
        } else if self.gguf_q8() {
            FileType::Q8_0
        } else {
            match target {
                DType::F32 => FileType::F32,
                DType::BF16 => FileType::BF16,
                _ => FileType::F16,
            }
        }
    }

    /// `--to nvfp4|mxfp4`: FP4 weights in compressed-tensors' packed layout.
    fn fp4(&self) -> Option<crate::quant::fp4::Fp4Kind> {
        self.to
            .as_deref()
            .and_then(crate::quant::fp4::Fp4Kind::parse)
    }

    /// `--to q8_0` with a `.gguf` output: llama.cpp's Q8_0 for the tensors it retypes.
    fn gguf_q8(&self) -> bool {
        is_gguf(&self.output)
            && self
                .to
                .as_deref()
                .is_some_and(|t| t.eq_ignore_ascii_case("q8_0"))
    }

    /// Refuses options that the output cannot honour, before any input is read.
    fn check_options(&self, pt_out: bool, target: DType) -> Result<()> {
        if let Some(f) = self.max_underflow {
            if !(0.0..=1.0).contains(&f) {
                return Err(Error::usage(format!(
                    "{}: give a fraction between 0 and 1",
                    self.caller.number("max-underflow", f)
                )));
            }
        }
        if let (Some(f), None) = (&self.scale_format, &self.scale) {
            return Err(Error::usage(format!(
                "{} applies with {} (scaled FP8 output) only",
                self.caller.given("scale-format", f),
                self.flag("scale")
            )));
        }
        if let Some(kind) = self.fp4() {
            let clash = if pt_out {
                Some(format!("{}: a .pt output", self.output.display()))
            } else if is_gguf(&self.output) {
                Some(format!("{}: a .gguf output", self.output.display()))
            } else if self.scale.is_some() {
                Some(self.flag("scale"))
            } else {
                None
            };
            if let Some(what) = clash {
                return Err(Error::usage(format!(
                    "{} writes compressed-tensors' packed FP4 (a safetensors folder or file): \
                     {what} does not apply",
                    self.caller.given("to", kind.name())
                )));
            }
        }
        if pt_out && self.max_shard_size.is_some() {
            return Err(Error::usage(format!(
                "{}: {} splits safetensors outputs; a .pt output is one torch.save file (write \
                 a folder or a .safetensors file to shard it)",
                self.output.display(),
                self.flag("max-shard-size")
            )));
        }
        if is_gguf(&self.output) {
            let what = if self.max_shard_size.is_some() {
                Some(self.flag("max-shard-size"))
            } else if self.part.is_some() {
                Some(self.flag("part"))
            } else if self.scale.is_some() {
                Some(self.flag("scale"))
            } else if crate::remote::is_url(&self.output) {
                Some("an object-store destination".to_string())
            } else {
                None
            };
            if let Some(what) = what {
                return Err(Error::usage(format!(
                    "{}: a .gguf output is one local file: {what} does not apply",
                    self.output.display()
                )));
            }
            if !matches!(target, DType::F32 | DType::F16 | DType::BF16) {
                return Err(Error::usage(format!(
                    "{}: a .gguf output is retyped to f32, f16 or bf16, not {target}",
                    self.output.display()
                )));
            }
        }
        if self.cast_optimizer && (!pt_out || self.inference || self.state_dict_only) {
            return Err(Error::usage(format!(
                "{} applies to a .pt output of a whole training checkpoint (not with {} or {})",
                self.flag("cast-optimizer"),
                self.flag("inference"),
                self.flag("state-dict-only")
            )));
        }
        if let Some(scale) = &self.scale {
            use crate::quant::quantize::{Format, Scheme};
            let format = self.scale_format.as_deref().unwrap_or("compressed-tensors");
            Scheme::parse(scale, format.parse::<Format>()?)?;
            if target != DType::F8E4M3 || self.auto.is_some() {
                return Err(Error::usage(format!(
                    "{} writes float8_e4m3fn weights: use it with {} (not {})",
                    self.caller.given("scale", scale),
                    self.caller.given("to", "f8e4m3"),
                    self.flag("auto")
                )));
            }
            if pt_out {
                return Err(Error::usage(format!(
                    "{} writes a safetensors model (a folder, or a .safetensors file): not .pt",
                    self.flag("scale")
                )));
            }
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
        let predict = self.dry_run && plan.tensors().iter().any(|p| p.is_cast());
        if self.on_overflow != OnOverflow::Keep && self.max_underflow.is_none() && !predict {
            return Ok(());
        }
        progress.phase("checking");
        let analyses = analysis::analyze(cat, plan, &Bounds::default(), progress, None)?;
        if self.on_overflow == OnOverflow::Keep {
            let n = analysis::keep_overflowing(cat, plan, &analyses);
            if n > 0 {
                warnings.push(format!(
                    "{n} tensor(s) kept in their dtype: their values would overflow ({})",
                    self.caller.given("on-overflow", "keep")
                ));
            }
        }
        if let Some(f) = self.max_underflow {
            let n = analysis::keep_underflowing(cat, plan, &analyses, f);
            if n > 0 {
                warnings.push(format!("{n} tensor(s) kept in their dtype: more than {f} of their non-zero values would flush to zero"));
            }
        }
        if predict {
            let still_cast = |a: &&analysis::TensorAnalysis| plan.tensors()[a.plan_index].is_cast();
            let name = |a: &analysis::TensorAnalysis| {
                cat.tensors[plan.tensors()[a.plan_index].tensor]
                    .name
                    .clone()
            };
            if self.on_overflow == OnOverflow::Error {
                let named: Vec<(String, DType, u64)> = analyses
                    .iter()
                    .filter(still_cast)
                    .filter(|a| a.stats.overflow > 0)
                    .map(|a| (name(a), a.to, a.stats.overflow))
                    .collect();
                if !named.is_empty() {
                    return Err(crate::convert::overflow_refusal(
                        &cat.path,
                        &named,
                        self.caller,
                    ));
                }
            }
            let flushed: Vec<String> = analyses
                .iter()
                .filter(still_cast)
                .filter(|a| a.stats.flushed_entirely())
                .map(name)
                .collect();
            warnings.extend(crate::convert::flushed_warning(&flushed, self.caller));
        }
        Ok(())
    }

    /// Takes the opened input as asked (`strip_prefix`); its notes become warnings.
    fn adopt(
        &self,
        mut cat: Catalogue,
        pt_out: bool,
        warnings: &mut Vec<String>,
    ) -> Result<Catalogue> {
        warnings.extend(cat.notes.iter().cloned());
        if let Some(p) = &self.strip_prefix {
            if cat.strip_prefix(p)? == 0 {
                warnings.push(format!(
                    "{}: no tensor name starts with it",
                    self.caller.given("strip-prefix", p)
                ));
            }
        }
        if let (false, Some(doc)) = (pt_out, cat.torch.as_deref()) {
            warnings.extend(formats::torch::tied_note(doc));
        }
        Ok(cat)
    }

    /// The plan of `cat`: the rules' targets, `to = auto`, `on_quantized`, scaled FP8.
    fn plan(
        &self,
        cat: &mut Catalogue,
        rules: &crate::rules::RuleSet,
        target: DType,
        pt_out: bool,
        warnings: &mut Vec<String>,
    ) -> Result<Plan> {
        // A .pt output keeps the whole file (optimizer state too), or without its training
        // state (--inference), or the state dict alone (--state-dict-only); the plan covers
        // exactly what is written.
        let scope = match (pt_out, self.state_dict_only, self.inference) {
            (false, _, _) | (true, true, _) => Scope::StateDict,
            (true, false, true) => Scope::Inference,
            (true, false, false) => Scope::WholeFile {
                cast_others: self.cast_optimizer,
            },
        };
        if self.on_quantized == OnQuantized::Keep {
            if is_gguf(&self.output) && cat.quant.is_some() {
                return Err(Error::usage(format!(
                    "{}: --on-quantized keep writes payloads and scales as stored, which a .gguf \
                     output cannot hold (leave it out: GGUF gets the dequantized weights)",
                    self.input.display()
                )));
            }
            // packed low-bit weights are written as stored, parts and all
            crate::quant::as_stored(cat);
        }
        let auto_to = self.to.as_deref() == Some("auto");
        // a GGUF output of a model folder: what llama.cpp's converter writes
        let folder_gguf = is_gguf(&self.output) && cat.gguf.is_none();
        let ftype = folder_gguf.then(|| self.folder_gguf_type(cat, auto_to, target));
        let target = if let Some(f) = ftype {
            f.planned()
        } else if auto_to {
            Plan::auto_target(cat).ok_or_else(|| {
                Error::usage(format!(
                    "{}: {} has no floating tensor to take a precision from",
                    self.caller.given("to", "auto"),
                    self.input.display()
                ))
            })?
        } else {
            target
        };
        let mut plan = Plan::with_scope(cat, rules, target, scope);
        if let Some(f) = ftype {
            formats::gguf::plan_from_folder(cat, &mut plan, f)?;
        } else if auto_to {
            plan.keep_source_precision(cat);
        }
        if self.on_quantized == OnQuantized::Keep {
            plan.keep_quantized(cat);
        }
        if let Some(scale) = &self.scale {
            use crate::quant::quantize::{plan_scaled, Format, Scheme};
            let format = self.scale_format.as_deref().unwrap_or("compressed-tensors");
            let scheme = Scheme::parse(scale, format.parse::<Format>()?)?;
            plan_scaled(cat, &mut plan, &scheme)?;
            if cat.folder.is_none() {
                warnings.push(
                    "a single .safetensors file carries no quantization_config: loaders find the \
                     scheme in a model folder's config.json (convert the folder)"
                        .into(),
                );
            }
        }
        if let Some(kind) = self.fp4() {
            crate::quant::fp4::plan_fp4(cat, &mut plan, kind)?;
            if cat.folder.is_none() {
                warnings.push(
                    "a single .safetensors file carries no quantization_config: loaders find the \
                     scheme in a model folder's config.json (convert the folder)"
                        .into(),
                );
            }
        }
        if cat.gguf.is_some() && is_gguf(&self.output) {
            formats::gguf::write::plan_retype(cat, &mut plan, self.gguf_q8());
        }
        // before any pass reads a tensor: a factor on an integer tensor cannot be measured
        plan.check_factors(cat)?;
        warnings.extend(plan.warnings.iter().cloned());
        check_unmatched(&plan, self.strict_rules, self.caller)?;
        if let Some(w) = self.dropped_note(cat, &plan) {
            warnings.push(w);
        }
        Ok(plan)
    }

    /// What `inference` or `state_dict_only` left out of a training checkpoint, in words.
    fn dropped_note(&self, cat: &Catalogue, plan: &Plan) -> Option<String> {
        let doc = cat.torch.as_deref()?;
        let e = doc.entry.as_ref()?;
        let saved = plan.dropped.iter().map(|d| d.2).sum::<u64>();
        match plan.scope {
            Scope::Inference if plan.dropped.is_empty() => Some(format!(
                "{}: the checkpoint holds no training state; every entry kept",
                self.flag("inference")
            )),
            Scope::Inference => {
                let what: Vec<String> = plan
                    .dropped
                    .iter()
                    .map(|d| {
                        let why = doc.training.iter().find(|t| t.0 == d.0).map(|t| t.1);
                        format!("`{}` ({})", d.0, why.unwrap_or("training state"))
                    })
                    .collect();
                let kept: Vec<String> = doc
                    .entries
                    .iter()
                    .filter(|x| !plan.dropped.iter().any(|d| d.0 == x.0))
                    .map(|x| format!("`{}`", x.0))
                    .collect();
                Some(format!(
                    "{} dropped the training state: {} ({saved} tensor bytes saved); kept the \
                     state dict `{e}`{}",
                    self.flag("inference"),
                    what.join(", "),
                    if kept.is_empty() {
                        String::new()
                    } else {
                        format!(" and {}", kept.join(", "))
                    }
                ))
            }
            Scope::StateDict if self.inference || self.state_dict_only => Some(format!(
                "{} kept the entry `{e}`; dropped {} ({saved} tensor bytes saved)",
                self.flag(if self.state_dict_only {
                    "state-dict-only"
                } else {
                    "inference"
                }),
                formats::torch::describe_dropped(&plan.dropped),
            )),
            _ => None,
        }
    }

    /// Reads the input and decides everything. `progress` sees the analysis passes of
    /// `auto`, `on_overflow keep` and `max_underflow` (phases `choosing` and `checking`).
    pub fn prepare(&self, progress: &dyn Progress) -> Result<Prepared> {
        self.prepare_from(None, progress)
    }

    /// [`ConvertRequest::prepare`] with the input already in a catalogue (tensors in memory:
    /// `weightcast.save`), or read from [`ConvertRequest::input`] when `cat` is `None`.
    pub fn prepare_from(
        &self,
        cat: Option<Catalogue>,
        progress: &dyn Progress,
    ) -> Result<Prepared> {
        let mut warnings = Vec::new();
        let (rules, file_to) = build_rules(&self.rules)?;
        let (candidates, target) = self.targets(file_to)?;
        let pt_out = is_pt(&self.output);
        self.check_options(pt_out, target)?;
        let cat = match cat {
            Some(c) => c,
            None => formats::open_with(&self.input, self.key.as_deref())?,
        };
        formats::gguf::refuse_quantized(&cat, "convert")?;
        // a GGUF file to anything but GGUF: the Hugging Face checkpoint it came from
        let cat = if cat.gguf.is_some() && !is_gguf(&self.output) {
            formats::gguf::hf::to_hf::as_hugging_face(cat)?
        } else {
            cat
        };
        let mut cat = self.adopt(cat, pt_out, &mut warnings)?;
        let mut plan = self.plan(&mut cat, &rules, target, pt_out, &mut warnings)?;
        if !self.memory {
            // before any pass reads a tensor
            crate::convert::check_config(&cat, &plan, &self.output)?;
        }
        if let Some(snr) = self.auto {
            progress.phase("choosing");
            analysis::choose_auto(&cat, &mut plan, &candidates, snr, progress, None)?;
        }
        self.check_data(&cat, &mut plan, progress, &mut warnings)?;
        if let Some(max) = self.max_shard_size {
            let over: Vec<&crate::plan::TensorPlan> = plan
                .tensors()
                .iter()
                .filter(|p| p.bytes_out > max)
                .collect();
            if let Some(first) = over.first() {
                warnings.push(format!(
                    "{} tensor(s) are larger than {} bytes: each is written in a shard of \
                     its own, over the limit (`{}`: {} bytes)",
                    over.len(),
                    self.caller.number("max-shard-size", max),
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
            pt_export: formats::torch::write::PtExport {
                inference: self.inference,
                strip_prefix: self.strip_prefix.clone(),
                strict: self.strict,
                allow: self.allow.clone(),
            },
            part: self.part,
            caller: self.caller,
            gguf_ftype: self.gguf_q8().then_some(7),
            config_in_memory: self.memory,
        };
        let output = crate::convert::plan_output(&cat, &plan, &self.output, &options)?;
        Ok(Prepared {
            cat,
            plan,
            options,
            output,
            warnings,
        })
    }

    /// Prepares and runs the conversion (with [`ConvertRequest::dry_run`], only checks it):
    /// the `--json` document and the warnings for the user, in order.
    pub fn run(&self, progress: &dyn Progress) -> Result<(ConvertDoc, Vec<String>)> {
        self.run_from(None, progress)
    }

    /// [`ConvertRequest::run`] with the input already in a catalogue (see
    /// [`ConvertRequest::prepare_from`]).
    pub fn run_from(
        &self,
        cat: Option<Catalogue>,
        progress: &dyn Progress,
    ) -> Result<(ConvertDoc, Vec<String>)> {
        let p = self.prepare_from(cat, progress)?;
        if self.dry_run {
            return Ok((ConvertDoc::planned(&p), p.warnings));
        }
        let summary = p.execute(progress)?;
        let doc = ConvertDoc::finished(&p.cat, &p.plan, &summary, &self.output);
        let mut warnings = p.warnings;
        warnings.extend(summary.warnings.iter().cloned());
        Ok((doc, warnings))
    }
}

/// Whether `out` names a GGUF file.
fn is_gguf(out: &Path) -> bool {
    crate::output::Named::of(out) == crate::output::Named::Gguf
}

/// `convert --json`: the plan, and for a finished run what was written.
#[derive(Debug, Clone, Serialize)]
pub struct ConvertDoc {
    /// What every output gets.
    #[serde(flatten)]
    pub plan: PlanDoc,
    /// Whether nothing was written.
    pub dry_run: bool,
    /// The output asked for.
    pub output: PathBuf,
    /// A dry run: whether the run would replace an existing output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replaces_existing: Option<bool>,
    /// A `.pt` output: whether `torch.load(weights_only=True)` loads it, and the globals
    /// outside torch's allowlist it carries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pickle: Option<crate::formats::torch::write::PickleReport>,
    /// A finished run: what it wrote.
    #[serde(flatten)]
    pub written: Option<Written>,
}

/// What a finished conversion wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Written {
    /// The files written.
    pub written: Vec<PathBuf>,
    /// Files of a model folder copied as they are.
    pub files_copied: usize,
    /// The dtype written into `config.json`.
    pub config_dtype: Option<&'static str>,
    /// Wall time.
    pub seconds: f64,
    /// Tensors with values clamped (`on_overflow clamp`), and how many values.
    pub overflowed: Vec<(String, u64)>,
    /// Input bytes per second.
    pub input_bytes_per_second: f64,
}

impl ConvertDoc {
    /// The document of a dry run.
    pub fn planned(p: &Prepared) -> ConvertDoc {
        ConvertDoc {
            plan: PlanDoc::new(&p.cat, &p.plan, &p.output.layout),
            dry_run: true,
            output: p.output.path.clone(),
            replaces_existing: Some(p.output.replaces_existing),
            pickle: p.pickle().cloned(),
            written: None,
        }
    }

    /// The document of a finished conversion.
    pub fn finished(
        cat: &Catalogue,
        plan: &Plan,
        summary: &crate::convert::Summary,
        output: &Path,
    ) -> ConvertDoc {
        let secs = summary.elapsed.as_secs_f64();
        ConvertDoc {
            plan: PlanDoc::new(cat, plan, &summary.layout),
            dry_run: false,
            output: output.to_path_buf(),
            replaces_existing: None,
            pickle: summary.pickle.clone(),
            written: Some(Written {
                written: summary.files.clone(),
                files_copied: summary.files_copied,
                config_dtype: summary.config_dtype.map(|d| d.torch_name()),
                seconds: secs,
                overflowed: summary.overflowed.clone(),
                input_bytes_per_second: summary.bytes_in as f64 / secs.max(1e-9),
            }),
        }
    }
}
