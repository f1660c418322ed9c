//! Comparing two checkpoints of any readable format: which tensors are only in one, which
//! changed dtype or shape, and the error figures of every common tensor, computed in f64 over the
//! values as stored. A scaled FP8 checkpoint is read as the values it stands for: each payload
//! dequantized with its scale (in the scale's dtype), the scales themselves not compared.

use crate::catalogue::{Catalogue, TensorEntry};
use crate::dtype::DType;
use crate::error::Result;
use crate::plan::Plan;
use crate::quant::ScaleTable;
use crate::source::Sources;
use crate::stats::{diff_stats, ErrorStats};

/// Elements compared per step.
const CHUNK_ELEMS: usize = 1 << 20;

/// One tensor present in both checkpoints.
#[derive(Debug, Clone)]
pub struct Common {
    /// Name.
    pub name: String,
    /// Dtype in A.
    pub a_dtype: DType,
    /// Dtype in B.
    pub b_dtype: DType,
    /// Shape in A.
    pub a_shape: Vec<u64>,
    /// Shape in B.
    pub b_shape: Vec<u64>,
    /// Error figures (A is the reference), when both are castable floats of the same shape.
    pub stats: Option<ErrorStats>,
    /// For other dtypes of the same shape: whether the bytes are identical.
    pub identical: Option<bool>,
}

/// The comparison of two checkpoints.
#[derive(Debug, Clone, Default)]
pub struct Diff {
    /// Names only in A.
    pub only_a: Vec<String>,
    /// Names only in B.
    pub only_b: Vec<String>,
    /// Tensors in both, in A's order.
    pub common: Vec<Common>,
}

/// Compares `a` (the reference) with `b`.
pub fn diff(a: &Catalogue, b: &Catalogue) -> Result<Diff> {
    let sa = Sources::open(a)?;
    let sb = Sources::open(b)?;
    let (pa, pb) = (Plan::stored(a), Plan::stored(b));
    let index_b: std::collections::HashMap<&str, usize> = pb
        .tensors()
        .iter()
        .enumerate()
        .map(|(i, p)| (b.tensors[p.tensor].name.as_str(), i))
        .collect();
    let names_a: std::collections::HashSet<&str> = pa
        .tensors()
        .iter()
        .map(|p| a.tensors[p.tensor].name.as_str())
        .collect();
    let mut d = Diff {
        only_b: pb
            .tensors()
            .iter()
            .map(|p| &b.tensors[p.tensor])
            .filter(|t| !names_a.contains(t.name.as_str()))
            .map(|t| t.name.clone())
            .collect(),
        ..Diff::default()
    };
    for qa in pa.tensors() {
        let ta = &a.tensors[qa.tensor];
        let Some(&ib) = index_b.get(ta.name.as_str()) else {
            d.only_a.push(ta.name.clone());
            continue;
        };
        let qb = &pb.tensors()[ib];
        let tb = &b.tensors[qb.tensor];
        let (table_a, table_b) = (table(a, &sa, qa)?, table(b, &sb, qb)?);
        let mut c = Common {
            name: ta.name.clone(),
            a_dtype: qa.to,
            b_dtype: qb.to,
            a_shape: ta.shape.clone(),
            b_shape: tb.shape.clone(),
            stats: None,
            identical: None,
        };
        if ta.shape == tb.shape {
            if qa.to.is_castable() && qb.to.is_castable() {
                let (asz, bsz) = (qa.to.bitsize() / 8, qb.to.bitsize() / 8);
                let n = ta.numel() as usize;
                let mut stats = ErrorStats::default();
                let mut bufa = vec![0u8; CHUNK_ELEMS.min(n) * asz];
                let mut bufb = vec![0u8; CHUNK_ELEMS.min(n) * bsz];
                let mut raw = Vec::new();
                let mut pos = 0usize;
                while pos < n {
                    let k = CHUNK_ELEMS.min(n - pos);
                    let (da, db) = (&mut bufa[..k * asz], &mut bufb[..k * bsz]);
                    read_values(&sa, ta, table_a.as_ref(), pos, da, &mut raw)?;
                    read_values(&sb, tb, table_b.as_ref(), pos, db, &mut raw)?;
                    stats = stats.merge(&diff_stats(qa.to, da, qb.to, db));
                    pos += k;
                }
                c.stats = Some(stats);
            } else if ta.dtype == tb.dtype {
                let mut same = true;
                let mut bufa = vec![0u8; (8 << 20).min(ta.nbytes as usize)];
                let mut bufb = bufa.clone();
                let mut pos = 0u64;
                while pos < ta.nbytes && same {
                    let k = (bufa.len() as u64).min(ta.nbytes - pos) as usize;
                    sa.read(ta, pos, &mut bufa[..k])?;
                    sb.read(tb, pos, &mut bufb[..k])?;
                    same = bufa[..k] == bufb[..k];
                    pos += k as u64;
                }
                c.identical = Some(same);
            }
        }
        d.common.push(c);
    }
    Ok(d)
}

/// The scale of a dequantized plan entry.
fn table(
    cat: &Catalogue,
    sources: &Sources<'_>,
    p: &crate::plan::TensorPlan,
) -> Result<Option<ScaleTable>> {
    p.dequant
        .map(|d| d.table(cat, sources, p.tensor.0))
        .transpose()
}

/// Elements `pos..` of `t` into `out` (as stored, or dequantized with `table`).
fn read_values(
    sources: &Sources<'_>,
    t: &TensorEntry,
    table: Option<&ScaleTable>,
    pos: usize,
    out: &mut [u8],
    raw: &mut Vec<u8>,
) -> Result<()> {
    let isz = t.dtype.bitsize() / 8;
    match table {
        None => sources.read(t, (pos * isz) as u64, out),
        Some(s) => {
            let k = out.len() / (s.compute.bitsize() / 8);
            raw.resize(k * isz, 0);
            sources.read(t, (pos * isz) as u64, raw)?;
            s.dequantize(t.dtype, raw, pos as u64, out);
            Ok(())
        }
    }
}
