//! A conversion into memory (`weightcast.load`): the same input readers, rules, targets and
//! refusals as `convert`, into buffers the caller owns instead of files.

use std::path::PathBuf;

use crate::audit::Class;
use crate::catalogue::Catalogue;
use crate::convert::OnOverflow;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::formats;
use crate::load::MemoryLayout;
use crate::plan::{Plan, QuantPlan};

use super::{build_rules, check_castable, Caller, RuleArg};

/// Everything a load can be asked.
#[derive(Debug, Clone)]
pub struct LoadRequest {
    /// The input.
    pub input: PathBuf,
    /// The target: a dtype, `auto` (each tensor keeps the source's precision), or `None`
    /// (every tensor as stored; no rules then).
    pub dtype: Option<String>,
    /// The rules, in order.
    pub rules: Vec<RuleArg>,
    /// The state dict's entry in a training checkpoint.
    pub key: Option<String>,
    /// What to do when values would overflow.
    pub on_overflow: OnOverflow,
    /// Remove this prefix from tensor names.
    pub strip_prefix: Option<String>,
    /// Who asked.
    pub caller: Caller,
}

/// A decided load: fill [`Loaded::mem`]'s buffers with [`crate::convert::convert_into`].
pub struct Loaded {
    /// The input.
    pub cat: Catalogue,
    /// What each tensor becomes.
    pub plan: Plan,
    /// The buffers and the tensors' views on them.
    pub mem: MemoryLayout,
    /// Messages for the user.
    pub warnings: Vec<String>,
}

impl LoadRequest {
    /// A request for `input` as stored.
    pub fn new(input: impl Into<PathBuf>) -> LoadRequest {
        LoadRequest {
            input: input.into(),
            dtype: None,
            rules: vec![],
            key: None,
            on_overflow: OnOverflow::Error,
            strip_prefix: None,
            caller: Caller::Python,
        }
    }

    /// Reads the input and plans the load; refuses a pickle that names dangerous globals and
    /// a quantized scheme that cannot be dequantized.
    pub fn prepare(&self) -> Result<Loaded> {
        let c = self.caller;
        let (rules, _) = build_rules(&self.rules)?;
        let target = match self.dtype.as_deref() {
            None if !self.rules.is_empty() => {
                return Err(Error::usage(format!(
                    "rules without {0}: give {0} (the target of tensors no rule keeps)",
                    c.flag("dtype")
                )))
            }
            None | Some("auto") => None,
            Some(d) => {
                let t: DType = d.parse()?;
                check_castable(t)?;
                Some(t)
            }
        };
        let mut cat = formats::open_with(&self.input, self.key.as_deref())?;
        formats::gguf::refuse_quantized(&cat, "load")?;
        let dangerous: Vec<&str> = cat
            .globals
            .iter()
            .filter(|g| g.1 == Class::Dangerous)
            .map(|g| g.0.as_str())
            .collect();
        if !dangerous.is_empty() {
            return Err(Error::Refused(format!(
                "{}: its pickle references {} (code a pickle loader would run); nothing was \
                 loaded ({} shows where)",
                self.input.display(),
                dangerous.join(", "),
                match c {
                    Caller::Cli => "weightcast audit",
                    Caller::Python => "weightcast.audit",
                }
            )));
        }
        let mut warnings: Vec<String> = cat.notes.clone();
        if let Some(p) = &self.strip_prefix {
            if cat.strip_prefix(p)? == 0 {
                warnings.push(format!(
                    "{}: no tensor name starts with it",
                    c.given("strip-prefix", p)
                ));
            }
        }
        let plan = match (self.dtype.as_deref(), target) {
            (None, _) => Plan::stored(&cat),
            (_, Some(t)) => Plan::new(&cat, &rules, t),
            (_, None) => {
                let to = Plan::auto_target(&cat).ok_or_else(|| {
                    Error::usage(format!(
                        "{}: {} has no floating tensor to take a precision from",
                        c.given("dtype", "auto"),
                        self.input.display()
                    ))
                })?;
                let mut plan = Plan::new(&cat, &rules, to);
                plan.keep_source_precision(&cat);
                plan
            }
        };
        if let QuantPlan::Unsupported(why) = &plan.quant {
            return Err(Error::Refused(format!(
                "{}: quantized in a way weightcast cannot dequantize: {why}",
                self.input.display()
            )));
        }
        plan.check_factors(&cat)?;
        if !plan.config.is_empty() {
            let keys: Vec<&str> = plan.config.iter().map(|e| e.key.as_str()).collect();
            return Err(Error::usage(format!(
                "{}: the rules set config.json keys ({}) but loading returns tensors, with no \
                 config.json (convert a model folder, or cast a module with its config)",
                self.input.display(),
                keys.join(", ")
            )));
        }
        warnings.extend(plan.warnings.iter().cloned());
        let mem = crate::load::layout(&cat, &plan)?;
        Ok(Loaded {
            cat,
            plan,
            mem,
            warnings,
        })
    }
}
