//! Measuring what a planned cast does to every tensor, before anything is written: the pass
//! behind `analyze`, `--on-overflow keep`, `--max-underflow` and `--auto`.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::catalogue::Catalogue;
use crate::convert::Progress;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::rules::Factor;
use crate::source::Sources;
use crate::stats::{cast_stats, verdict, Bounds, ErrorStats, Verdict};

/// Bytes read per step.
const CHUNK: usize = 8 << 20;

/// What a cast does to one tensor.
#[derive(Debug, Clone)]
pub struct TensorAnalysis {
    /// Index into the plan's tensors.
    pub plan_index: usize,
    /// Stored dtype.
    pub from: DType,
    /// Target measured.
    pub to: DType,
    /// The figures.
    pub stats: ErrorStats,
    /// The verdict under the bounds used.
    pub verdict: Verdict,
}

/// Figures of casting tensor `t` (stored as `from`) to each of `targets`, in one read; with
/// a `factor` (a rules file's `scale`), of casting its scaled values (in f32, as the run
/// computes them), a finite value the product takes beyond f32's range counted as overflow.
pub fn measure(
    sources: &Sources<'_>,
    cat: &Catalogue,
    tensor: usize,
    targets: &[DType],
    factor: Option<Factor>,
    cancel: Option<&AtomicBool>,
) -> Result<Vec<ErrorStats>> {
    let t = &cat.tensors[tensor];
    let mut acc = vec![ErrorStats::default(); targets.len()];
    let align = (t.dtype.bitsize() / 8).max(1);
    sources.for_each_chunk(t, CHUNK, align, |chunk| {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(Error::Interrupted);
        }
        merge_stats(&mut acc, t.dtype, chunk, targets, factor);
        Ok(())
    })?;
    Ok(acc)
}

/// Adds to `acc[k]` the figures of casting `bytes` (elements of `dtype`), scaled by `factor`
/// when there is one, to `targets[k]`.
fn merge_stats(
    acc: &mut [ErrorStats],
    dtype: DType,
    bytes: &[u8],
    targets: &[DType],
    factor: Option<Factor>,
) {
    let Some(f) = factor else {
        for (a, &to) in acc.iter_mut().zip(targets) {
            *a = a.merge(&cast_stats(dtype, to, bytes));
        }
        return;
    };
    let (vals, beyond) =
        crate::cast::map_f32(dtype, bytes, |w| f.apply(w), crate::cast::Range::Count, 0.0);
    let mut staged = vec![0u8; vals.len() * 4];
    crate::cast::encode_f32_slice(DType::F32, &vals, &mut staged);
    for (a, &to) in acc.iter_mut().zip(targets) {
        let mut s = cast_stats(DType::F32, to, &staged);
        s.overflow += beyond;
        *a = a.merge(&s);
    }
}

/// Figures of casting payload `tensor`'s dequantized values (in its scale's dtype, as the
/// reference dequantization gives them; scaled by `factor` when there is one) to each of
/// `targets`.
pub fn measure_dequantized(
    sources: &Sources<'_>,
    cat: &Catalogue,
    tensor: usize,
    d: crate::plan::Dequant,
    targets: &[DType],
    factor: Option<Factor>,
    cancel: Option<&AtomicBool>,
) -> Result<Vec<ErrorStats>> {
    let t = &cat.tensors[tensor];
    let table = d.table(cat, sources, tensor)?;
    let mut acc = vec![ErrorStats::default(); targets.len()];
    let (isz, csz) = (t.dtype.bitsize() / 8, d.compute.bitsize() / 8);
    let mut first = 0u64;
    let mut vals = Vec::new();
    sources.for_each_chunk(t, CHUNK / csz.max(1), isz, |chunk| {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(Error::Interrupted);
        }
        let n = chunk.len() / isz;
        vals.resize(n * csz, 0);
        table.dequantize(t.dtype, chunk, first, &mut vals);
        first += n as u64;
        merge_stats(&mut acc, d.compute, &vals, targets, factor);
        Ok(())
    })?;
    Ok(acc)
}

/// Figures of quantizing weight `tensor` to f8e4m3fn with scales computed from it (`layout`,
/// scales in `compute`): each value against what a loader gets back (payload times scale, in
/// the scale's dtype). Nothing overflows: quotients are clamped within the scale's range.
pub fn measure_scaled(
    sources: &Sources<'_>,
    cat: &Catalogue,
    tensor: usize,
    layout: crate::quant::ScaleLayout,
    compute: DType,
    cancel: Option<&AtomicBool>,
) -> Result<ErrorStats> {
    let t = &cat.tensors[tensor];
    let table = crate::quant::quantize::compute_scales(cat, sources, tensor, layout, compute)?;
    let (isz, csz) = (t.dtype.bitsize() / 8, compute.bitsize() / 8);
    let mut acc = ErrorStats::default();
    let mut first = 0u64;
    let (mut q, mut back, mut xs, mut ys) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    sources.for_each_chunk(t, CHUNK, isz, |chunk| {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(Error::Interrupted);
        }
        let n = chunk.len() / isz;
        q.resize(n, 0u8);
        back.resize(n * csz, 0u8);
        xs.resize(n, 0f32);
        ys.resize(n, 0f32);
        table.quantize(t.dtype, chunk, first, &mut q);
        table.dequantize(DType::F8E4M3, &q, first, &mut back);
        crate::cast::decode_f32_slice(t.dtype, chunk, &mut xs);
        crate::cast::decode_f32_slice(compute, &back, &mut ys);
        acc = acc.merge(&{
            let mut s = ErrorStats::default();
            s.push_block(&xs, &ys, f32::INFINITY, 0.0);
            s
        });
        first += n as u64;
        Ok(())
    })?;
    Ok(acc)
}

/// Figures of quantizing weight `tensor` to FP4 (`kind`, the global scale shared with
/// `fused` for NVFP4): each value against the packed code times its scale, in f32.
pub fn measure_fp4(
    sources: &Sources<'_>,
    cat: &Catalogue,
    tensor: crate::catalogue::TensorId,
    kind: crate::quant::fp4::Fp4Kind,
    fused: [Option<crate::catalogue::TensorId>; 2],
    cancel: Option<&AtomicBool>,
) -> Result<ErrorStats> {
    let t = &cat.tensors[tensor];
    let amax = std::sync::Mutex::new(Default::default());
    let table = crate::quant::fp4::table(cat, sources, tensor, kind, fused, &amax)?;
    let isz = t.dtype.bitsize() / 8;
    let mut acc = ErrorStats::default();
    let mut first = 0u64;
    let (mut q, mut xs, mut ys) = (Vec::new(), Vec::new(), Vec::new());
    let align = match table.expert_values() {
        0 => 32,
        n => n as usize,
    };
    sources.for_each_chunk(t, CHUNK, isz * align, |chunk| {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(Error::Interrupted);
        }
        let n = chunk.len() / isz;
        q.resize(n / 2, 0u8);
        xs.resize(n, 0f32);
        ys.resize(n, 0f32);
        table.quantize(chunk, first, &mut q);
        table.dequantize(&q, first, &mut ys);
        crate::cast::decode_f32_slice(t.dtype, chunk, &mut xs);
        let mut s = ErrorStats::default();
        s.push_block(&xs, &ys, f32::INFINITY, 0.0);
        acc = acc.merge(&s);
        first += n as u64;
        Ok(())
    })?;
    Ok(acc)
}

/// Measures every tensor that `plan` casts, against its planned target.
pub fn analyze(
    cat: &Catalogue,
    plan: &Plan,
    bounds: &Bounds,
    progress: &dyn Progress,
    cancel: Option<&AtomicBool>,
) -> Result<Vec<TensorAnalysis>> {
    let sources = Sources::open(cat)?;
    let todo: Vec<usize> = (0..plan.tensors().len())
        .filter(|&i| plan.tensors()[i].is_cast())
        .collect();
    progress.begin(
        todo.iter().map(|&i| plan.tensors()[i].bytes_in).sum(),
        todo.len(),
    );
    let mut out = Vec::with_capacity(todo.len());
    for i in todo {
        let p = &plan.tensors()[i];
        let stats = match (p.dequant, p.scaled) {
            (Some(d), _) => {
                measure_dequantized(&sources, cat, p.tensor.0, d, &[p.to], p.factor, cancel)?[0]
            }
            (
                None,
                Some(crate::plan::ScaledOut::Payload {
                    layout, compute, ..
                }),
            ) => measure_scaled(&sources, cat, p.tensor.0, layout, compute, cancel)?,
            (
                None,
                Some(crate::plan::ScaledOut::Fp4 {
                    weight,
                    kind,
                    fused,
                    ..
                }),
            ) => measure_fp4(&sources, cat, weight, kind, fused, cancel)?,
            _ => measure(&sources, cat, p.tensor.0, &[p.to], p.factor, cancel)?[0],
        };
        out.push(TensorAnalysis {
            plan_index: i,
            from: p.from,
            to: p.to,
            verdict: verdict(&stats, bounds),
            stats,
        });
        progress.advance(p.bytes_in);
    }
    Ok(out)
}

/// Sorts analyses worst first: by verdict, then by SNR (lowest first).
pub fn worst_first(a: &mut [TensorAnalysis]) {
    a.sort_by(|x, y| {
        x.verdict
            .cmp(&y.verdict)
            .then(x.stats.snr_db().total_cmp(&y.stats.snr_db()))
    });
}

/// The whole model's figures: every analysed tensor merged.
pub fn totals(a: &[TensorAnalysis]) -> ErrorStats {
    a.iter()
        .fold(ErrorStats::default(), |acc, t| acc.merge(&t.stats))
}

/// Leaves in their stored dtype the tensors whose cast would overflow (`--on-overflow keep`);
/// returns how many were kept.
pub fn keep_overflowing(cat: &Catalogue, plan: &mut Plan, analyses: &[TensorAnalysis]) -> usize {
    plan.update(cat, |tensors| {
        let mut n = 0;
        for a in analyses.iter().filter(|a| a.stats.overflow > 0) {
            let p = &mut tensors[a.plan_index];
            p.reason = format!(
                "kept: {} values would overflow {} (--on-overflow keep)",
                a.stats.overflow, a.to
            );
            p.keep();
            n += 1;
        }
        n
    })
}

/// Leaves in their stored dtype the tensors that would flush more than `fraction` of their
/// non-zero values to zero (`--max-underflow`); returns how many were kept.
pub fn keep_underflowing(
    cat: &Catalogue,
    plan: &mut Plan,
    analyses: &[TensorAnalysis],
    fraction: f64,
) -> usize {
    plan.update(cat, |tensors| {
        let mut n = 0;
        for a in analyses
            .iter()
            .filter(|a| a.stats.underflow_fraction() > fraction)
        {
            let p = &mut tensors[a.plan_index];
            p.reason = format!(
                "kept: {:.4}% of non-zero values would flush to zero in {} (--max-underflow {fraction})",
                100.0 * a.stats.underflow_fraction(),
                a.to
            );
            p.keep();
            n += 1;
        }
        n
    })
}

/// `--auto SNR_DB`: for each tensor the rules leave to the default target, picks the first of
/// `candidates` (in preference order) whose cast does not overflow and keeps the SNR at or above
/// `min_snr_db`; a tensor that no candidate serves stays as it is.
pub fn choose_auto(
    cat: &Catalogue,
    plan: &mut Plan,
    candidates: &[DType],
    min_snr_db: f64,
    progress: &dyn Progress,
    cancel: Option<&AtomicBool>,
) -> Result<()> {
    let sources = Sources::open(cat)?;
    let todo: Vec<usize> = (0..plan.tensors().len())
        .filter(|&i| plan.tensors()[i].by_default && plan.tensors()[i].from.is_castable())
        .collect();
    progress.begin(
        todo.iter().map(|&i| plan.tensors()[i].bytes_in).sum(),
        todo.len(),
    );
    let mut picks = Vec::with_capacity(todo.len());
    for i in todo {
        let (tensor, factor) = (plan.tensors()[i].tensor, plan.tensors()[i].factor);
        let stats = measure(&sources, cat, tensor.0, candidates, factor, cancel)?;
        progress.advance(plan.tensors()[i].bytes_in);
        picks.push((i, stats));
    }
    plan.update(cat, |tensors| {
        for (i, stats) in picks {
            let p = &mut tensors[i];
            let (tensor, from) = (p.tensor, p.from);
            let pick = candidates
                .iter()
                .zip(&stats)
                .find(|(_, s)| s.overflow == 0 && s.snr_db() >= min_snr_db);
            match pick {
                Some((&d, s)) => {
                    p.set_target(d, cat.tensors[tensor].numel());
                    p.reason = format!("--auto {min_snr_db} dB: {d} keeps {:.1} dB", s.snr_db());
                }
                None => {
                    p.keep();
                    p.reason = format!(
                        "--auto {min_snr_db} dB: no candidate does (best {:.1} dB), kept {from}",
                        stats
                            .iter()
                            .map(|s| s.snr_db())
                            .fold(f64::NEG_INFINITY, f64::max)
                    );
                }
            }
        }
    });
    Ok(())
}
