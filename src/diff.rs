//! Comparing two checkpoints of any readable format: which tensors are only in one, which
//! changed dtype or shape, and the error figures of every common tensor, computed in f64 over the
//! values as stored.

use crate::catalogue::Catalogue;
use crate::dtype::DType;
use crate::error::Result;
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
    let index_b: std::collections::HashMap<&str, usize> = b
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let names_a: std::collections::HashSet<&str> =
        a.tensors.iter().map(|t| t.name.as_str()).collect();
    let mut d = Diff {
        only_b: b
            .tensors
            .iter()
            .filter(|t| !names_a.contains(t.name.as_str()))
            .map(|t| t.name.clone())
            .collect(),
        ..Diff::default()
    };
    for ta in &a.tensors {
        let Some(&ib) = index_b.get(ta.name.as_str()) else {
            d.only_a.push(ta.name.clone());
            continue;
        };
        let tb = &b.tensors[ib];
        let mut c = Common {
            name: ta.name.clone(),
            a_dtype: ta.dtype,
            b_dtype: tb.dtype,
            a_shape: ta.shape.clone(),
            b_shape: tb.shape.clone(),
            stats: None,
            identical: None,
        };
        if ta.shape == tb.shape {
            if ta.dtype.is_castable() && tb.dtype.is_castable() {
                let (asz, bsz) = (ta.dtype.bitsize() / 8, tb.dtype.bitsize() / 8);
                let n = ta.numel() as usize;
                let mut stats = ErrorStats::default();
                let mut bufa = vec![0u8; CHUNK_ELEMS.min(n) * asz];
                let mut bufb = vec![0u8; CHUNK_ELEMS.min(n) * bsz];
                let mut pos = 0usize;
                while pos < n {
                    let k = CHUNK_ELEMS.min(n - pos);
                    sa.read(ta, (pos * asz) as u64, &mut bufa[..k * asz])?;
                    sb.read(tb, (pos * bsz) as u64, &mut bufb[..k * bsz])?;
                    stats = stats.merge(&diff_stats(
                        ta.dtype,
                        &bufa[..k * asz],
                        tb.dtype,
                        &bufb[..k * bsz],
                    ));
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
