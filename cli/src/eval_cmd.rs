//! `weightcast eval`: runs the model and its candidates through candle (the `eval` feature).

use anyhow::Result;
use serde_json::json;
use weightcast::commands::{build_rules, check_castable};
use weightcast::eval::metrics::{Bound, Failure, FINITE};
use weightcast::rules::RuleSet;
use weightcast::{formats, DType, Error, Plan};

use crate::cli::{EvalArgs, RuleArg};
use crate::commands::*;
use crate::report;

struct EvalRow {
    name: String,
    weight_bytes: u64,
    compute: DType,
    run: weightcast::eval::Run,
    metrics: weightcast::eval::metrics::EmbeddingMetrics,
    peak_rss: Option<u64>,
    note: Option<String>,
    /// The bounds it misses (none: it may be recommended).
    failed: Vec<Failure>,
}

/// The bounds an encoder's candidate must meet to be recommended (with [`FINITE`]).
fn encoder_bounds(e: &EvalArgs) -> [Bound; 2] {
    [
        Bound::new("min_cosine", "cosine_min", "cos min", e.min_cosine),
        Bound::new(
            "min_neighbours",
            "neighbours_kept",
            "NN kept",
            e.min_neighbours,
        )
        .percent(),
    ]
}

/// The bounds a causal LM's candidate must meet to be recommended (with [`FINITE`]).
fn lm_bounds(e: &EvalArgs) -> [Bound; 1] {
    [Bound::new("min_top1", "top1_agreement", "top-1", e.min_top1).percent()]
}

/// The bounds that do not apply to this kind of model (`lm`: a causal LM), with why: given
/// or not, they are named, so that no bound is silently ignored.
fn ignored_bounds(e: &EvalArgs, lm: bool) -> Vec<(Bound, &'static str)> {
    if lm {
        encoder_bounds(e)
            .into_iter()
            .map(|b| {
                (
                    b,
                    "for encoders only: a causal LM's outputs are next-token distributions",
                )
            })
            .collect()
    } else {
        lm_bounds(e)
            .into_iter()
            .map(|b| (b, "for causal LMs only: an encoder predicts no next token"))
            .collect()
    }
}

/// The flag that sets a bound (`min_cosine`: `--min-cosine`).
fn flag(b: &Bound) -> String {
    format!("--{}", b.name.replace('_', "-"))
}

/// A bound as the text output states it: `cos min >= 0.999 (--min-cosine)`.
fn bound_text(b: &Bound) -> String {
    if b.name == FINITE.name {
        "no NaN/inf in the outputs".into()
    } else if b.percent {
        format!(
            "{} >= {}% ({})",
            b.label,
            weightcast::eval::metrics::percent(b.min),
            flag(b)
        )
    } else {
        format!("{} >= {} ({})", b.label, b.min, flag(b))
    }
}

/// The `--json` fields that say how the recommendation was made: the bounds applied, those
/// that do not apply to this model, and each candidate that misses a bound and which.
fn recommendation_json<'a>(
    bounds: &[Bound],
    ignored: &[(Bound, &str)],
    rejected: impl Iterator<Item = (&'a str, u64, &'a [Failure])>,
) -> serde_json::Value {
    let bound = |b: &Bound| {
        if b.name == FINITE.name {
            json!({"name": b.name, "measure": b.measure, "rule": "no NaN or inf in any output"})
        } else {
            json!({"name": b.name, "measure": b.measure, "min": b.min, "flag": flag(b)})
        }
    };
    json!({
        "objective": "weight_bytes",
        "recommended_for": "the fewest weight bytes among the candidates within every bound \
                            (null: none is; keep f32)",
        "bounds": std::iter::once(&FINITE).chain(bounds).map(bound).collect::<Vec<_>>(),
        "ignored_bounds": ignored.iter().map(|(b, why)| {
            json!({"name": b.name, "min": b.min, "flag": flag(b), "why": why})
        }).collect::<Vec<_>>(),
        "rejected": rejected.map(|(name, bytes, failed)| {
            json!({"name": name, "weight_bytes": bytes, "failed": failures_json(failed)})
        }).collect::<Vec<_>>(),
    })
}

/// The bounds a candidate missed, for `--json`.
fn failures_json(failed: &[Failure]) -> serde_json::Value {
    failed
        .iter()
        .map(|f| {
            if f.bound.name == FINITE.name {
                json!({"bound": f.bound.name, "measure": f.bound.measure, "value": true})
            } else {
                json!({"bound": f.bound.name, "measure": f.bound.measure, "value": f.value,
                       "min": f.bound.min})
            }
        })
        .collect()
}

/// The lines under the table that say how the recommendation was made: the bounds (and those
/// not applied), why each candidate that misses one was not recommended, and the
/// recommendation.
fn print_recommendation<'a>(
    bounds: &[Bound],
    ignored: &[(Bound, &str)],
    rejected: impl Iterator<Item = (&'a str, &'a [Failure])>,
    best: Option<&str>,
) {
    let applied: Vec<String> = std::iter::once(&FINITE)
        .chain(bounds)
        .map(bound_text)
        .collect();
    let others: Vec<String> = ignored
        .iter()
        .map(|(b, why)| format!("{} {}", flag(b), why.split(':').next().unwrap_or(why)))
        .collect();
    println!(
        "bounds: {}{}",
        applied.join(", "),
        if others.is_empty() {
            String::new()
        } else {
            format!(" (not applied: {})", others.join(", "))
        }
    );
    for (name, failed) in rejected {
        let why: Vec<String> = failed.iter().map(|f| f.to_string()).collect();
        println!("not recommended: {name}: {}", why.join(", "));
    }
    match best {
        Some(b) => println!(
            "recommendation: {b}, the smallest candidate (weight bytes) within every bound"
        ),
        None => println!(
            "recommendation: none: no candidate is within every bound; keep f32 (the reference)"
        ),
    }
}

/// A row's verdict in the table: `ok`, `NaN/inf!`, or the bounds it misses.
fn verdict(failed: &[Failure]) -> String {
    match failed.first() {
        None => "ok".into(),
        Some(f) if f.bound.name == FINITE.name => "NaN/inf!".into(),
        Some(_) => {
            let labels: Vec<&str> = failed.iter().map(|f| f.bound.label).collect();
            format!("fails {}", labels.join(", "))
        }
    }
}

pub(crate) fn eval_cmd(e: EvalArgs, order: &[RuleArg]) -> Result<ExitCode> {
    use weightcast::eval::{embed, metrics, peak_rss, EvalModel, DEFAULT_INPUTS};
    let f32_compute = match e.compute.as_str() {
        "same" => false,
        "f32" => true,
        other => return Err(Error::usage(format!("--compute {other}: use same or f32")).into()),
    };
    let (rules, _) = build_rules(order)?;
    let what = formats::what_is(&e.model)?;
    if what != "a folder" {
        return Err(Error::usage(format!(
            "{}: eval needs a Hugging Face model folder (config.json, the weights, tokenizer.json); \
             this is {what}",
            e.model.display()
        ))
        .into());
    }
    let model = EvalModel::open(&e.model)?;
    let inputs: Vec<String> = match &e.inputs {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|err| Error::io(p, err))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
        None => DEFAULT_INPUTS.iter().map(|s| s.to_string()).collect(),
    };
    if inputs.is_empty() {
        return Err(Error::usage("no inputs: the --inputs file has no non-empty line").into());
    }
    let cat = open(&e.model, None)?;
    if !matches!(model.arch, weightcast::eval::Arch::Bert(_)) {
        return eval_lm(&e, &rules, &model, &cat, &inputs);
    }
    // Candidates are opened and checked first, so that a bad one fails before any run.
    let candidates = eval_candidates(&e, &rules, &cat)?;
    // The reference: the model as its authors run it, in f32.
    let ref_plan = Plan::new(&cat, &RuleSet::default(), DType::F32);
    let Loaded {
        weights: w,
        bytes: ref_bytes,
        ..
    } = load_candidate(&model, &cat, Some(&ref_plan), true)?;
    let reference = embed(&model, w, DType::F32, &inputs, e.batch, e.runs)
        .map_err(|err| in_weights(&e.model, err))?;
    let mut rows = vec![EvalRow {
        name: "f32 (reference)".into(),
        weight_bytes: ref_bytes,
        compute: DType::F32,
        metrics: metrics::compare(&reference.embeddings, &reference.embeddings),
        peak_rss: peak_rss(),
        run: reference,
        note: None,
        failed: Vec::new(),
    }];
    if rows[0].metrics.non_finite {
        return Err(broken_reference(&e.model).into());
    }
    for (name, c, plan) in candidates {
        let Loaded {
            compute,
            note,
            weights: w,
            bytes,
        } = load_candidate(&model, &c, plan.as_ref(), f32_compute)?;
        let run = embed(&model, w, compute, &inputs, e.batch, e.runs)
            .map_err(|err| in_weights(&c.path, err))?;
        let m = metrics::compare(&rows[0].run.embeddings, &run.embeddings);
        let failed = metrics::failures(
            &encoder_bounds(&e),
            &[m.cosine_min, m.neighbours_kept],
            m.non_finite,
        );
        rows.push(EvalRow {
            name,
            weight_bytes: bytes,
            compute,
            metrics: m,
            peak_rss: peak_rss(),
            run,
            note,
            failed,
        });
    }
    let judged: Vec<(u64, &[Failure])> = rows[1..]
        .iter()
        .map(|r| (r.weight_bytes, r.failed.as_slice()))
        .collect();
    let best = metrics::recommend(&judged).map(|i| rows[1 + i].name.clone());
    print_encoder(&e, inputs.len(), &rows, best.as_deref())?;
    warn_non_finite(rows.iter().filter(|r| r.metrics.non_finite).map(|r| {
        (
            r.name.as_str(),
            r.compute,
            r.run.first_non_finite.as_deref(),
        )
    }));
    Ok(0)
}

/// A candidate's weights loaded for a run: the dtype it computes in (and why, when not its
/// own), its tensors and their stored bytes.
struct Loaded {
    compute: DType,
    note: Option<String>,
    weights: std::collections::HashMap<String, weightcast::eval::Tensor>,
    bytes: u64,
}

/// Loads a candidate for a run. The peak-memory mark is reset first, so that the run's peak
/// counts this candidate only.
fn load_candidate(
    model: &weightcast::eval::EvalModel,
    cat: &weightcast::Catalogue,
    plan: Option<&Plan>,
    f32_compute: bool,
) -> Result<Loaded> {
    let mix = weightcast::eval::float_mix(cat, plan);
    let (compute, note) = model.compute_dtype(&mix, f32_compute);
    weightcast::eval::reset_peak_rss();
    let (weights, bytes) = weightcast::eval::weights(cat, plan, compute)?;
    Ok(Loaded {
        compute,
        note,
        weights,
        bytes,
    })
}

/// The error when the f32 reference itself gives NaN or inf: nothing can be compared with it.
fn broken_reference(model: &std::path::Path) -> weightcast::Error {
    weightcast::Error::invalid(
        model,
        "the f32 reference gives NaN or inf outputs: its weights or config.json are broken, so \
         there is nothing to compare candidates with",
    )
}

/// Names, on stderr, each candidate whose outputs hold NaN or inf, with what it means.
fn warn_non_finite<'a>(bad: impl Iterator<Item = (&'a str, DType, Option<&'a str>)>) {
    for (name, compute, at) in bad {
        let at = at.map(|a| format!(" first in {a}")).unwrap_or_default();
        let why = if compute == DType::F32 {
            "its weights hold NaN/inf or values f32 arithmetic cannot carry".to_string()
        } else {
            format!(
                "activations overflow {} arithmetic (try bf16, which has f32's range; --compute \
                 f32 shows the storage loss alone)",
                compute.torch_name()
            )
        };
        warn(&format!("{name} produced NaN or inf outputs{at}: {why}"));
    }
}

/// One candidate of a causal LM's `eval`.
struct LmRow {
    name: String,
    bytes: u64,
    compute: DType,
    m: weightcast::eval::metrics::LmMetrics,
    run: weightcast::eval::LmRun,
    rss: Option<u64>,
    note: Option<String>,
    /// The bounds it misses (none: it may be recommended).
    failed: Vec<Failure>,
}

/// `eval`'s table (or `--json` document) for an encoder.
fn print_encoder(e: &EvalArgs, inputs: usize, rows: &[EvalRow], best: Option<&str>) -> Result<()> {
    let (bounds, ignored) = (encoder_bounds(e), ignored_bounds(e, false));
    let rejected = || {
        rows[1..]
            .iter()
            .filter(|r| !r.failed.is_empty())
            .map(|r| (r.name.as_str(), r.weight_bytes, r.failed.as_slice()))
    };
    if e.json {
        let mut v = json!({
            "model": e.model,
            "inputs": inputs,
            "compute": e.compute,
            "min_cosine": e.min_cosine,
            "min_neighbours": e.min_neighbours,
            "candidates": rows.iter().map(|r| {
                let mut v = json!({
                    "name": r.name, "weight_bytes": r.weight_bytes, "compute": r.compute.torch_name(),
                    "cosine_min": r.metrics.cosine_min, "cosine_mean": r.metrics.cosine_mean,
                    "max_abs_diff": r.metrics.max_abs_diff, "neighbours_kept": r.metrics.neighbours_kept,
                    "non_finite": r.metrics.non_finite, "median_batch_seconds": r.run.median_batch_s,
                    "tokens_per_second": r.run.tokens_per_s, "peak_rss_bytes": r.peak_rss,
                    "passes": r.failed.is_empty(), "failed_bounds": failures_json(&r.failed),
                    "note": r.note, "first_non_finite": r.run.first_non_finite,
                });
                if e.emit_embeddings {
                    v["embeddings"] = json!(r.run.embeddings);
                }
                v
            }).collect::<Vec<_>>(),
            "recommendation": best,
        });
        let how = recommendation_json(&bounds, &ignored, rejected());
        v.as_object_mut()
            .expect("an object")
            .extend(how.as_object().expect("an object").clone());
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{}: {} inputs, batch {}, compute {}, median of {} timed passes",
            e.model.display(),
            inputs,
            e.batch,
            e.compute,
            e.runs
        );
        let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(24);
        println!(
            "{:<w$} {:>10} {:>9} {:>10} {:>11} {:>11} {:>10} {:>10} {:>9} {:>9}  verdict",
            "candidate",
            "weights",
            "compute",
            "cos min",
            "cos mean",
            "max |diff|",
            "NN kept",
            "ms/batch",
            "tok/s",
            "peak RSS"
        );
        for r in rows {
            let verdict = verdict(&r.failed);
            println!(
                "{:<w$} {:>10} {:>9} {:>10.6} {:>11.6} {:>11.2e} {:>9.0}% {:>10.1} {:>9.0} {:>9}  {verdict}{}",
                r.name,
                report::bytes(r.weight_bytes),
                r.compute.torch_name(),
                r.metrics.cosine_min,
                r.metrics.cosine_mean,
                r.metrics.max_abs_diff,
                100.0 * r.metrics.neighbours_kept,
                1000.0 * r.run.median_batch_s,
                r.run.tokens_per_s,
                r.peak_rss.map(report::bytes).unwrap_or_else(|| "?".into()),
                r.note.as_deref().map(|n| format!(" ({n})")).unwrap_or_default()
            );
        }
        print_recommendation(&bounds, &ignored, rejected().map(|(n, _, f)| (n, f)), best);
        println!(
            "speed is this machine's CPU ({} threads): f16/bf16 matmuls may run slower than f32 here \
             even though they halve memory; on GPUs they are usually faster",
            weightcast::eval::thread_count()
        );
    }
    Ok(())
}

/// `eval`'s table (or `--json` document) for a causal LM.
fn print_lm(
    e: &EvalArgs,
    inputs: usize,
    rows: &[LmRow],
    best: Option<&str>,
    emitted: &[Vec<Vec<Vec<f32>>>],
    ids: &[Vec<u32>],
) -> Result<()> {
    let ref_ppl = rows[0].m.perplexity;
    let (bounds, ignored) = (lm_bounds(e), ignored_bounds(e, true));
    let rejected = || {
        rows[1..]
            .iter()
            .filter(|r| !r.failed.is_empty())
            .map(|r| (r.name.as_str(), r.bytes, r.failed.as_slice()))
    };
    if e.json {
        let mut v = json!({
            "model": e.model, "inputs": inputs, "compute": e.compute, "min_top1": e.min_top1,
            "candidates": rows.iter().enumerate().map(|(i, r)| {
                let mut v = json!({
                    "name": r.name, "weight_bytes": r.bytes, "compute": r.compute.torch_name(),
                    "kl_mean": r.m.kl_mean, "kl_max": r.m.kl_max, "top1_agreement": r.m.top1_agreement,
                    "perplexity": r.m.perplexity, "perplexity_ratio": r.m.perplexity / ref_ppl,
                    "non_finite": r.m.non_finite, "median_token_seconds": r.run.median_token_s,
                    "tokens_per_second": r.run.tokens_per_s, "peak_rss_bytes": r.rss,
                    "passes": r.failed.is_empty(), "failed_bounds": failures_json(&r.failed),
                    "note": r.note,
                });
                if e.emit_embeddings {
                    v["logits"] = json!(emitted[i]);
                    v["ids"] = json!(ids);
                }
                v
            }).collect::<Vec<_>>(),
            "recommendation": best,
        });
        let how = recommendation_json(&bounds, &ignored, rejected());
        v.as_object_mut()
            .expect("an object")
            .extend(how.as_object().expect("an object").clone());
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{}: {} inputs, compute {}, causal LM",
            e.model.display(),
            inputs,
            e.compute
        );
        let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(24);
        println!(
            "{:<w$} {:>10} {:>9} {:>10} {:>10} {:>8} {:>10} {:>9} {:>10} {:>8} {:>9}  verdict",
            "candidate",
            "weights",
            "compute",
            "KL mean",
            "KL max",
            "top-1",
            "ppl",
            "ppl ratio",
            "ms/token",
            "tok/s",
            "peak RSS"
        );
        for r in rows {
            println!(
                "{:<w$} {:>10} {:>9} {:>10.2e} {:>10.2e} {:>7.1}% {:>10.3} {:>9.4} {:>10.2} {:>8.0} {:>9}  {}{}",
                r.name,
                report::bytes(r.bytes),
                r.compute.torch_name(),
                r.m.kl_mean,
                r.m.kl_max,
                100.0 * r.m.top1_agreement,
                r.m.perplexity,
                r.m.perplexity / ref_ppl,
                1000.0 * r.run.median_token_s,
                r.run.tokens_per_s,
                r.rss.map(report::bytes).unwrap_or_else(|| "?".into()),
                verdict(&r.failed),
                r.note.as_deref().map(|n| format!(" ({n})")).unwrap_or_default()
            );
        }
        print_recommendation(&bounds, &ignored, rejected().map(|(n, _, f)| (n, f)), best);
        println!(
            "speed is this machine's CPU ({} threads), one token at a time with the KV cache: \
             f16/bf16 matmuls may run slower than f32 here even though they halve memory; on \
             GPUs they are usually faster",
            weightcast::eval::thread_count()
        );
    }
    Ok(())
}

/// `eval` for causal LMs: per-token KL, top-1 agreement and perplexity against the f32 reference.
fn eval_lm(
    e: &EvalArgs,
    rules: &RuleSet,
    model: &weightcast::eval::EvalModel,
    cat: &weightcast::Catalogue,
    inputs: &[String],
) -> Result<ExitCode> {
    use weightcast::eval::{metrics, peak_rss, run_lm, spill::RowSpill};
    let f32_compute = e.compute == "f32";
    let todo = eval_candidates(e, rules, cat)?;
    let ids = model.token_ids(inputs)?;
    let next = |s: usize, pos: usize| ids[s].get(pos + 1).copied();
    // The reference's logits go to a temporary file, one row per position; each candidate is
    // compared with them as its own rows come, so memory holds a row, not the input set.
    let mut spill = RowSpill::new()?;
    let mut ref_acc = metrics::LmAccumulator::default();
    let mut emitted: Vec<Vec<Vec<Vec<f32>>>> = Vec::new();
    let keep = |all: &mut Vec<Vec<Vec<Vec<f32>>>>, s: usize, row: &[f32]| {
        if e.emit_embeddings {
            if all.last().is_none_or(|c| c.len() <= s) {
                all.last_mut()
                    .expect("pushed before the run")
                    .push(Vec::new());
            }
            all.last_mut().expect("pushed before the run")[s].push(row.to_vec());
        }
    };
    let ref_plan = Plan::new(cat, &RuleSet::default(), DType::F32);
    let Loaded {
        weights: w,
        bytes: ref_bytes,
        ..
    } = load_candidate(model, cat, Some(&ref_plan), true)?;
    emitted.push(Vec::new());
    let reference = run_lm(model, w, DType::F32, &ids, e.runs, |s, pos, row| {
        ref_acc.add(row, row, next(s, pos));
        keep(&mut emitted, s, row);
        spill.push(row)
    })
    .map_err(|err| in_weights(&e.model, err))?;
    let mut rows = vec![LmRow {
        name: "f32 (reference)".into(),
        bytes: ref_bytes,
        compute: DType::F32,
        m: ref_acc.finish(),
        run: reference,
        rss: peak_rss(),
        note: None,
        failed: Vec::new(),
    }];
    if rows[0].m.non_finite {
        return Err(broken_reference(&e.model).into());
    }
    for (name, c, plan) in todo {
        let Loaded {
            compute,
            note,
            weights: w,
            bytes,
        } = load_candidate(model, &c, plan.as_ref(), f32_compute)?;
        let mut reader = spill.reader()?;
        let mut ref_row = Vec::new();
        let mut acc = metrics::LmAccumulator::default();
        emitted.push(Vec::new());
        let run = run_lm(model, w, compute, &ids, e.runs, |s, pos, row| {
            reader.next_row(&mut ref_row)?;
            acc.add(&ref_row, row, next(s, pos));
            keep(&mut emitted, s, row);
            Ok(())
        })
        .map_err(|err| in_weights(&c.path, err))?;
        let m = acc.finish();
        let failed = metrics::failures(&lm_bounds(e), &[m.top1_agreement], m.non_finite);
        rows.push(LmRow {
            name,
            bytes,
            compute,
            m,
            run,
            rss: peak_rss(),
            note,
            failed,
        });
    }
    let judged: Vec<(u64, &[Failure])> = rows[1..]
        .iter()
        .map(|r| (r.bytes, r.failed.as_slice()))
        .collect();
    let best = metrics::recommend(&judged).map(|i| rows[1 + i].name.clone());
    print_lm(e, inputs.len(), &rows, best.as_deref(), &emitted, &ids)?;
    warn_non_finite(
        rows.iter()
            .filter(|r| r.m.non_finite)
            .map(|r| (r.name.as_str(), r.compute, None)),
    );
    Ok(0)
}

/// The candidates of `eval`: each `--dtypes` entry (MODEL converted on the fly with the rules,
/// labelled with them) and each `--candidate` path.
fn eval_candidates(
    e: &EvalArgs,
    rules: &RuleSet,
    cat: &weightcast::Catalogue,
) -> Result<Vec<(String, weightcast::Catalogue, Option<Plan>)>> {
    let mut out = Vec::new();
    for d in e.dtypes.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let d: DType = d.parse()?;
        check_castable(d)?;
        let label = if rules.rules.is_empty() {
            d.torch_name().to_string()
        } else {
            let origins: Vec<&str> = rules.rules.iter().map(|r| r.origin.as_str()).collect();
            format!("{} + {}", d.torch_name(), origins.join(", "))
        };
        out.push((label, cat.clone(), Some(Plan::new(cat, rules, d))));
    }
    for p in &e.candidate {
        let c = open(p, None)?;
        weightcast::eval::check_candidate(cat, &c)?;
        out.push((p.display().to_string(), c, None));
    }
    Ok(out)
}

/// An error while loading or running a model (the reference or a candidate), named by its
/// file: what is wrong is in its weights (a missing tensor, a shape the architecture does not
/// take), not in usage.
fn in_weights(path: &std::path::Path, e: weightcast::Error) -> weightcast::Error {
    match e {
        weightcast::Error::Usage(m) => weightcast::Error::invalid(path, m),
        other => other,
    }
}
