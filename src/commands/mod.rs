//! Every command as a request: the command line's flags and the Python API's keywords both
//! become one of these types, and the request decides everything (checks, plan, document)
//! whoever called. The engines they drive live in their own folders (`formats`, `plan`,
//! `convert`, `analysis`, `diff`, `audit`); the front ends only translate and print.
//!
//! - [`convert::ConvertRequest`]: `convert` (and `weightcast.convert`);
//! - [`load::LoadRequest`]: `weightcast.load`, a conversion into memory;
//! - [`analyze::AnalyzeRequest`]: `analyze`, the cost of a cast per tensor;
//! - [`audit::AuditRequest`]: `audit`, what a pickle would run;
//! - [`inspect`] and [`diff::DiffRequest`]: what a file holds, what two files differ in.
//!
//! Each command's JSON document is a serde type beside its request.

use std::path::{Path, PathBuf};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::rules::RuleSet;

pub mod analyze;
pub mod audit;
pub mod convert;
pub mod diff;
pub mod document;
pub mod inspect;
pub mod load;

pub use crate::error::Caller;
pub use convert::{ConvertRequest, Prepared};

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
pub fn single_target(to: Option<&str>, file_to: Option<DType>, caller: Caller) -> Result<DType> {
    let target: DType = match (to, file_to) {
        (Some(t), _) if t.contains(',') => {
            return Err(Error::usage(format!(
                "{}: a list of candidates needs {}",
                caller.given("to", t),
                caller.flag("auto")
            )))
        }
        (Some(t), _) => t.parse()?,
        (None, Some(d)) => d,
        (None, None) => {
            return Err(Error::usage(format!(
                "{} is required (e.g. {})",
                match caller {
                    Caller::Cli => "--to DTYPE",
                    Caller::Python => "to=",
                },
                caller.given("to", "f16")
            )))
        }
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
pub fn check_unmatched(plan: &Plan, strict_rules: bool, caller: Caller) -> Result<()> {
    if strict_rules && !plan.unmatched.is_empty() {
        return Err(Error::usage(format!(
            "{}: {} rule(s) match no tensor: {}",
            caller.flag("strict-rules"),
            plan.unmatched.len(),
            plan.unmatched.join(", ")
        )));
    }
    Ok(())
}

/// A `.pt`, `.pth` or `.bin` output (a torch.save checkpoint).
pub fn is_pt(out: &Path) -> bool {
    crate::output::Named::of(out) == crate::output::Named::Pt
}

/// Writes a small file atomically (a temporary file beside it, then a rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".weightcast-")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}
