//! Planning: one decision per tensor (target dtype and the rule that chose it), before any byte
//! is read. The plan is what `--dry-run` shows and what conversion executes.

use crate::catalogue::{Catalogue, TensorEntry};
use crate::dtype::DType;
use crate::rules::{Action, RuleSet};

/// The decision for one tensor.
#[derive(Debug, Clone)]
pub struct TensorPlan {
    /// Index into the catalogue's tensors.
    pub tensor: usize,
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
}

impl TensorPlan {
    /// Leaves the tensor in its stored dtype.
    pub fn keep(&mut self) {
        self.to = self.from;
        self.bytes_out = self.bytes_in;
    }

    /// Casts to `to` instead (`numel` elements).
    pub fn set_target(&mut self, to: DType, numel: u64) {
        self.to = to;
        self.bytes_out = to.bytes_for(numel).unwrap_or(self.bytes_in);
    }

    /// Whether the values change representation.
    pub fn is_cast(&self) -> bool {
        self.from != self.to
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
    /// One entry per catalogue tensor, same order.
    pub tensors: Vec<TensorPlan>,
    /// Rules that matched nothing and dtypes that cannot be cast.
    pub warnings: Vec<String>,
    /// The rules the plan was made with (a .pt output applies them per storage).
    pub rules: RuleSet,
}

impl Plan {
    /// Decides every tensor of `cat` with `rules`, casting to `target` by default.
    pub fn new(cat: &Catalogue, rules: &RuleSet, target: DType) -> Plan {
        let mut hits = vec![0usize; rules.rules.len()];
        let mut warnings = Vec::new();
        let mut uncastable = std::collections::BTreeMap::<DType, usize>::new();
        let tensors = cat
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let (action, rule) = rules.decide(&t.name, &t.shape);
                if let Some(r) = rule {
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
                TensorPlan {
                    tensor: i,
                    from: t.dtype,
                    to,
                    bytes_in: t.nbytes,
                    bytes_out,
                    reason,
                    by_default: action == Action::Default && t.dtype.is_castable(),
                }
            })
            .collect();
        for (rule, n) in rules.rules.iter().zip(&hits) {
            if *n == 0 {
                warnings.push(format!("rule `{}` matches no tensor", rule.origin));
            }
        }
        for (d, n) in uncastable {
            warnings.push(format!(
                "{n} tensor(s) of {d} kept as they are: weightcast does not cast {d}"
            ));
        }
        Plan {
            target,
            tensors,
            warnings,
            rules: rules.clone(),
        }
    }

    /// Totals of cast/kept tensors and bytes.
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for p in &self.tensors {
            if p.is_cast() {
                t.cast += 1;
            } else {
                t.kept += 1;
            }
            t.bytes_in += p.bytes_in;
            t.bytes_out += p.bytes_out;
        }
        t
    }

    /// The floating dtype holding most elements after the plan (what `config.json` should say).
    pub fn dominant_float(&self, cat: &Catalogue) -> Option<DType> {
        let mut m = std::collections::BTreeMap::<DType, u64>::new();
        for p in &self.tensors {
            if p.to.is_float() {
                *m.entry(p.to).or_default() += cat.tensors[p.tensor].numel();
            }
        }
        m.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d)
    }
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
