//! `diff`: what two models differ in, tensor by tensor, and whether that is within a
//! tolerance.

use std::path::PathBuf;

use serde::Serialize;

use crate::diff::Diff;
use crate::error::Result;
use crate::formats;

use super::document::{db, StatsDoc};

/// Everything `diff` can be asked.
#[derive(Debug, Clone)]
pub struct DiffRequest {
    /// The reference.
    pub a: PathBuf,
    /// The model compared with it.
    pub b: PathBuf,
    /// A tensor whose SNR falls below this (dB) fails.
    pub tolerance: Option<f64>,
}

/// What `diff` found.
pub struct Diffed {
    /// The comparison.
    pub diff: Diff,
    /// Why it fails, one line each (empty: it passes).
    pub failures: Vec<String>,
    /// Messages for the user (what reading the inputs noted).
    pub warnings: Vec<String>,
}

impl DiffRequest {
    /// Reads both inputs and compares them.
    pub fn run(&self) -> Result<Diffed> {
        let ca = formats::open_with(&self.a, None)?;
        let cb = formats::open_with(&self.b, None)?;
        formats::gguf::refuse_quantized(&ca, "diff")?;
        formats::gguf::refuse_quantized(&cb, "diff")?;
        let diff = crate::diff::diff(&ca, &cb)?;
        let failures = failures(&diff, self.tolerance);
        let mut warnings = ca.notes;
        warnings.extend(cb.notes);
        Ok(Diffed {
            diff,
            failures,
            warnings,
        })
    }

    /// `diff --json`'s document.
    pub fn doc(&self, d: &Diffed) -> DiffDoc {
        DiffDoc {
            a: self.a.clone(),
            b: self.b.clone(),
            tolerance_db: self.tolerance,
            only_a: d.diff.only_a.clone(),
            only_b: d.diff.only_b.clone(),
            common: d
                .diff
                .common
                .iter()
                .map(|c| CommonDoc {
                    stats: c.stats.as_ref().map(StatsDoc::from),
                    name: c.name.clone(),
                    a_dtype: c.a_dtype.to_string(),
                    b_dtype: c.b_dtype.to_string(),
                    a_shape: c.a_shape.clone(),
                    b_shape: c.b_shape.clone(),
                    identical: c.identical,
                })
                .collect(),
            failures: d.failures.clone(),
            ok: d.failures.is_empty(),
        }
    }
}

/// A shape as text: `[768, 3072]`.
pub fn shape(s: &[u64]) -> String {
    format!(
        "[{}]",
        s.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Why `diff` fails: one line per missing tensor, shape change, or tensor below tolerance.
pub fn failures(d: &Diff, tolerance: Option<f64>) -> Vec<String> {
    let mut f: Vec<String> = d
        .only_a
        .iter()
        .map(|n| format!("`{n}` is only in A"))
        .collect();
    f.extend(d.only_b.iter().map(|n| format!("`{n}` is only in B")));
    for c in &d.common {
        if c.a_shape != c.b_shape {
            f.push(format!(
                "`{}` changed shape {} -> {}",
                c.name,
                shape(&c.a_shape),
                shape(&c.b_shape)
            ));
        } else if c.identical == Some(false) {
            f.push(format!("`{}` ({}) differs", c.name, c.a_dtype));
        } else if let Some(s) = c.stats.as_ref().filter(|s| s.nonfinite > 0) {
            f.push(format!(
                "`{}`: {} finite value(s) of A are inf or NaN in B",
                c.name, s.nonfinite
            ));
        } else if let (Some(s), Some(tol)) = (&c.stats, tolerance) {
            if s.snr_db() < tol || s.overflow > 0 {
                f.push(format!(
                    "`{}`: SNR {} dB below {tol} dB",
                    c.name,
                    db(s.snr_db())
                ));
            }
        }
    }
    f
}

/// `diff --json`.
#[derive(Debug, Clone, Serialize)]
pub struct DiffDoc {
    /// The reference.
    pub a: PathBuf,
    /// The model compared.
    pub b: PathBuf,
    /// The tolerance.
    pub tolerance_db: Option<f64>,
    /// Tensors only in A.
    pub only_a: Vec<String>,
    /// Tensors only in B.
    pub only_b: Vec<String>,
    /// Tensors in both.
    pub common: Vec<CommonDoc>,
    /// Why it fails.
    pub failures: Vec<String>,
    /// Whether it passes.
    pub ok: bool,
}

/// A tensor in both models.
#[derive(Debug, Clone, Serialize)]
pub struct CommonDoc {
    /// B against A (floating tensors).
    #[serde(flatten)]
    pub stats: Option<StatsDoc>,
    /// Its name.
    pub name: String,
    /// Its dtype in A.
    pub a_dtype: String,
    /// Its dtype in B.
    pub b_dtype: String,
    /// Its shape in A.
    pub a_shape: Vec<u64>,
    /// Its shape in B.
    pub b_shape: Vec<u64>,
    /// Other tensors: whether the bytes are the same.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identical: Option<bool>,
}
