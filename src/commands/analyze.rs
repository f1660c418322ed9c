//! `analyze`: what a cast would cost each tensor, measured on its data, worst first, with
//! nothing written (but the HTML report, when asked for).

use std::path::PathBuf;

use serde::Serialize;

use crate::analysis::{self, totals, TensorAnalysis};
use crate::catalogue::Catalogue;
use crate::convert::Progress;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::formats;
use crate::plan::Plan;
use crate::stats::{verdict, Bounds, Verdict};

use super::document::{Ordered, StatsDoc};
use super::{build_rules, check_unmatched, single_target, Caller, RuleArg};

/// The self-contained HTML page of an analysis (`--report`).
pub mod html;

/// Everything `analyze` can be asked.
#[derive(Debug, Clone)]
pub struct AnalyzeRequest {
    /// The input.
    pub input: PathBuf,
    /// The target (`None`: from a rules file).
    pub to: Option<String>,
    /// The rules, in order.
    pub rules: Vec<RuleArg>,
    /// A rule that matches nothing is an error.
    pub strict_rules: bool,
    /// The state dict's entry in a training checkpoint.
    pub key: Option<String>,
    /// Measure scaled FP8 with this scale layout.
    pub scale: Option<String>,
    /// The scaled FP8 format.
    pub scale_format: String,
    /// An SNR below this (dB) is lossy.
    pub lossy_below: f64,
    /// Write the HTML report here.
    pub report: Option<PathBuf>,
    /// Who asked.
    pub caller: Caller,
}

impl AnalyzeRequest {
    /// A request with the command line's defaults.
    pub fn new(input: impl Into<PathBuf>) -> AnalyzeRequest {
        AnalyzeRequest {
            input: input.into(),
            to: None,
            rules: vec![],
            strict_rules: false,
            key: None,
            scale: None,
            scale_format: "compressed-tensors".into(),
            lossy_below: Bounds::default().lossy_below_db,
            report: None,
            caller: Caller::Cli,
        }
    }

    /// Plans the input as `convert` would and measures every cast tensor, worst first; writes
    /// the HTML report when asked.
    pub fn run(&self, progress: &dyn Progress) -> Result<Analyzed> {
        let c = self.caller;
        let (rules, file_to) = build_rules(&self.rules)?;
        let fp4 = self
            .to
            .as_deref()
            .and_then(crate::quant::fp4::Fp4Kind::parse);
        let target = match fp4 {
            Some(_) => DType::F4,
            None => single_target(self.to.as_deref(), file_to, c)?,
        };
        let scheme = match &self.scale {
            Some(scale) => {
                use crate::quant::quantize::{Format, Scheme};
                let scheme = Scheme::parse(scale, self.scale_format.parse::<Format>()?)?;
                if target != DType::F8E4M3 {
                    return Err(Error::usage(format!(
                        "{} measures float8_e4m3fn weights: use it with {}",
                        c.given("scale", scale),
                        c.given("to", "f8e4m3")
                    )));
                }
                Some(scheme)
            }
            None => None,
        };
        let mut cat = formats::open_with(&self.input, self.key.as_deref())?;
        formats::gguf::refuse_quantized(&cat, "analyze")?;
        let mut warnings = cat.notes.clone();
        let mut plan = Plan::new(&cat, &rules, target);
        if let Some(scheme) = &scheme {
            crate::quant::quantize::plan_scaled(&mut cat, &mut plan, scheme)?;
        }
        if let Some(kind) = fp4 {
            crate::quant::fp4::plan_fp4(&mut cat, &mut plan, kind)?;
        }
        plan.check_factors(&cat)?;
        warnings.extend(plan.warnings.iter().cloned());
        check_unmatched(&plan, self.strict_rules, c)?;
        let bounds = Bounds {
            lossy_below_db: self.lossy_below,
            ..Bounds::default()
        };
        let mut analyses = analysis::analyze(&cat, &plan, &bounds, progress, None)?;
        analysis::worst_first(&mut analyses);
        let a = Analyzed {
            cat,
            plan,
            analyses,
            bounds,
            warnings,
        };
        if let Some(path) = &self.report {
            super::write_atomic(path, html::analysis_page(&a).as_bytes())?;
        }
        Ok(a)
    }
}

/// What `analyze` measured.
pub struct Analyzed {
    /// The input.
    pub cat: Catalogue,
    /// The plan measured.
    pub plan: Plan,
    /// Every cast tensor, worst first.
    pub analyses: Vec<TensorAnalysis>,
    /// The verdicts' bounds.
    pub bounds: Bounds,
    /// Messages for the user.
    pub warnings: Vec<String>,
}

impl Analyzed {
    /// The name of an analysed tensor.
    pub fn name(&self, a: &TensorAnalysis) -> &str {
        &self.cat.tensors[self.plan.tensors()[a.plan_index].tensor].name
    }

    /// The tensors whose every non-zero value the cast flushes to zero.
    pub fn flushed(&self) -> Vec<String> {
        self.analyses
            .iter()
            .filter(|x| x.stats.flushed_entirely())
            .map(|x| self.name(x).to_string())
            .collect()
    }

    /// How many tensors got verdict `v`.
    pub fn count(&self, v: Verdict) -> usize {
        self.analyses.iter().filter(|x| x.verdict == v).count()
    }

    /// `analyze --json`'s document.
    pub fn doc(&self) -> AnalysisDoc {
        let t = totals(&self.analyses);
        let tot = self.plan.totals();
        let verdicts = [
            Verdict::Overflow,
            Verdict::Underflow,
            Verdict::Lossy,
            Verdict::Ok,
            Verdict::Exact,
        ];
        AnalysisDoc {
            input: self.cat.path.clone(),
            target: self.plan.target.torch_name(),
            bounds: BoundsDoc {
                lossy_below_db: self.bounds.lossy_below_db,
                underflow_above: self.bounds.underflow_above,
            },
            tensors: self
                .analyses
                .iter()
                .map(|x| AnalysisEntry {
                    stats: StatsDoc::from(&x.stats),
                    name: self.name(x).to_string(),
                    from: x.from.to_string(),
                    to: x.to.to_string(),
                    verdict: x.verdict.as_str(),
                    flushed_entirely: x.stats.flushed_entirely(),
                })
                .collect(),
            totals: AnalysisTotals {
                flushed_entirely: self.flushed(),
                analyzed: self.analyses.len(),
                not_cast: self.plan.tensors().len() - self.analyses.len(),
                verdicts: Ordered(
                    verdicts
                        .iter()
                        .map(|&v| (v.as_str().to_string(), self.count(v)))
                        .collect(),
                ),
                model: StatsDoc::from(&t),
                model_verdict: verdict(&t, &self.bounds).as_str(),
                bytes_before: tot.bytes_in,
                bytes_after: tot.bytes_out,
            },
            warnings: self.plan.warnings.clone(),
        }
    }
}

/// `analyze --json`.
#[derive(Debug, Clone, Serialize)]
pub struct AnalysisDoc {
    /// The input.
    pub input: PathBuf,
    /// The default target.
    pub target: &'static str,
    /// The verdicts' bounds.
    pub bounds: BoundsDoc,
    /// Every cast tensor, worst first.
    pub tensors: Vec<AnalysisEntry>,
    /// The whole model.
    pub totals: AnalysisTotals,
    /// The plan's warnings.
    pub warnings: Vec<String>,
}

/// The verdicts' bounds.
#[derive(Debug, Clone, Serialize)]
pub struct BoundsDoc {
    /// An SNR below this is lossy.
    pub lossy_below_db: f64,
    /// A flushed fraction above this is underflow.
    pub underflow_above: f64,
}

/// One tensor's figures.
#[derive(Debug, Clone, Serialize)]
pub struct AnalysisEntry {
    /// The figures.
    #[serde(flatten)]
    pub stats: StatsDoc,
    /// Its name.
    pub name: String,
    /// Stored dtype.
    pub from: String,
    /// Target dtype.
    pub to: String,
    /// overflow, underflow, lossy, ok or exact.
    pub verdict: &'static str,
    /// Every non-zero value flushes to zero.
    pub flushed_entirely: bool,
}

/// The whole model's figures.
#[derive(Debug, Clone, Serialize)]
pub struct AnalysisTotals {
    /// Tensors that become all zeros.
    pub flushed_entirely: Vec<String>,
    /// Tensors measured.
    pub analyzed: usize,
    /// Tensors not cast.
    pub not_cast: usize,
    /// Tensors per verdict.
    pub verdicts: Ordered<usize>,
    /// The figures over every value.
    pub model: StatsDoc,
    /// The model's verdict.
    pub model_verdict: &'static str,
    /// Bytes in.
    pub bytes_before: u64,
    /// Bytes out.
    pub bytes_after: u64,
}
