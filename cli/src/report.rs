//! Human-readable tables and JSON for the commands.

use serde_json::{json, Value};
use weightcast::catalogue::Catalogue;
use weightcast::output::Layout;
use weightcast::plan::Plan;

/// Decimal sizes, as the Hub shows them.
pub fn bytes(n: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < units.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

pub fn shape(s: &[u64]) -> String {
    format!(
        "[{}]",
        s.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn table(rows: &[Vec<String>], right: &[bool]) -> String {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, s)| {
                if right.get(c).copied().unwrap_or(false) {
                    format!("{s:>w$}", w = widths[c])
                } else {
                    format!("{s:<w$}", w = widths[c])
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

pub fn inspect_text(cat: &Catalogue) -> String {
    let mut s = format!(
        "{}: {}, {} file(s), {} tensors, {} parameters, {}\n\n",
        cat.path.display(),
        cat.describe(),
        cat.files.len(),
        cat.tensors.len(),
        cat.total_params(),
        bytes(cat.total_bytes())
    );
    if let Some(q) = cat.quant.as_deref() {
        s.push_str(&format!(
            "quantized: {} (from {}); {} scaled payload(s){}{}\n\n",
            q.scheme,
            q.found_in,
            q.scaled.len(),
            if q.layouts().is_empty() {
                String::new()
            } else {
                format!(", scales {}", q.layouts().join(", "))
            },
            match &q.unsupported {
                Some(why) => format!("; weightcast cannot dequantize it: {why}"),
                None => "; convert dequantizes it (--on-quantized keep passes it through)".into(),
            }
        ));
    }
    let classes = cat.tensors.iter().any(|t| t.module_class.is_some());
    let mut rows = vec![vec![
        "name".into(),
        "dtype".into(),
        "shape".into(),
        "bytes".into(),
    ]];
    if classes {
        rows[0].push("module class".into());
    }
    if cat.quant.is_some() {
        rows[0].push("role".into());
    }
    for (i, t) in cat.tensors.iter().enumerate() {
        let mut row = vec![
            t.name.clone(),
            t.dtype.to_string(),
            shape(&t.shape),
            bytes(t.nbytes),
        ];
        if classes {
            row.push(t.module_class.clone().unwrap_or_default());
        }
        if let Some(q) = cat.quant.as_deref() {
            row.push(role_text(cat, q.role(i)));
        }
        rows.push(row);
    }
    s.push_str(&table(&rows, &[false, false, false, true, false, false]));
    s.push_str("\nper dtype:\n");
    let mut rows = vec![vec![
        "dtype".into(),
        "tensors".into(),
        "parameters".into(),
        "bytes".into(),
    ]];
    for (d, n, p, b) in cat.dtype_totals() {
        rows.push(vec![d.to_string(), n.to_string(), p.to_string(), bytes(b)]);
    }
    s.push_str(&table(&rows, &[false, true, true, true]));
    if !cat.globals.is_empty() {
        use weightcast::audit::Class;
        let n = |c: Class| cat.globals.iter().filter(|g| g.1 == c).count();
        s.push_str(&format!(
            "\npickle globals: {} allowed by torch's weights_only loader, {} other, {} dangerous{}\n",
            n(Class::Allowed),
            n(Class::Other),
            n(Class::Dangerous),
            if n(Class::Dangerous) > 0 { " (weightcast audit lists them)" } else { "" }
        ));
    }
    let meta = cat.metadata();
    if !meta.is_empty() {
        s.push_str("\nmetadata:\n");
        for (k, v) in meta {
            s.push_str(&format!("  {k}: {v}\n"));
        }
    }
    s
}

/// What a tensor is to a quantization scheme, in words.
fn role_text(cat: &Catalogue, role: Option<weightcast::quant::Role>) -> String {
    use weightcast::quant::Role;
    match role {
        Some(Role::Payload(s, l)) => format!(
            "payload ({}, scale `{}`)",
            l.describe(),
            cat.tensors[s].name
        ),
        Some(Role::Scale) => "scale".into(),
        Some(Role::Companion) => "companion".into(),
        None => String::new(),
    }
}

pub fn inspect_json(cat: &Catalogue) -> Value {
    json!({
        "quantization": cat.quant.as_deref().map(|q| json!({
            "scheme": q.scheme, "found_in": q.found_in, "layouts": q.layouts(),
            "payloads": q.scaled.len(), "unsupported": q.unsupported,
        })),
        "path": cat.path,
        "format": cat.describe(),
        "files": cat.files.iter().map(|f| json!({"name": f.name, "bytes": f.len})).collect::<Vec<_>>(),
        "tensor_count": cat.tensors.len(),
        "parameter_count": cat.total_params(),
        "bytes": cat.total_bytes(),
        "dtypes": cat.dtype_totals().into_iter().map(|(d, n, p, b)| {
            (d.to_string(), json!({"tensors": n, "parameters": p, "bytes": b}))
        }).collect::<serde_json::Map<_, _>>(),
        "metadata": cat.metadata().into_iter().map(|(k, v)| (k, Value::String(v))).collect::<serde_json::Map<_, _>>(),
        "globals": {
            "allowed": cat.globals.iter().filter(|g| g.1 == weightcast::audit::Class::Allowed).map(|g| &g.0).collect::<Vec<_>>(),
            "other": cat.globals.iter().filter(|g| g.1 == weightcast::audit::Class::Other).map(|g| &g.0).collect::<Vec<_>>(),
            "dangerous": cat.globals.iter().filter(|g| g.1 == weightcast::audit::Class::Dangerous).map(|g| &g.0).collect::<Vec<_>>(),
        },
        "notes": cat.notes,
        "tensors": cat.tensors.iter().map(|t| json!({
            "name": t.name, "dtype": t.dtype.to_string(), "shape": t.shape,
            "bytes": t.nbytes, "file": cat.files[t.file].name, "module_class": t.module_class,
        })).enumerate().map(|(i, mut v)| {
            if let Some(q) = cat.quant.as_deref() {
                v["role"] = match q.role(i) {
                    Some(weightcast::quant::Role::Payload(s, l)) => json!({
                        "payload": {"scale": cat.tensors[s].name, "layout": l.describe()}}),
                    Some(weightcast::quant::Role::Scale) => json!("scale"),
                    Some(weightcast::quant::Role::Companion) => json!("companion"),
                    None => Value::Null,
                };
            }
            v
        }).collect::<Vec<_>>(),
    })
}

pub fn plan_text(cat: &Catalogue, plan: &Plan, layout: &Layout) -> String {
    let mut rows = vec![vec![
        "name".into(),
        "shape".into(),
        "from".into(),
        "to".into(),
        "bytes".into(),
        "rule".into(),
    ]];
    for (t, p) in planned(cat, plan) {
        let to = if p.is_cast() {
            p.to.to_string()
        } else {
            "=".into()
        };
        rows.push(vec![
            t.name.clone(),
            shape(&t.shape),
            p.from.to_string(),
            to,
            format!("{} -> {}", bytes(p.bytes_in), bytes(p.bytes_out)),
            p.reason.clone(),
        ]);
    }
    let mut s = table(&rows, &[false, false, false, false, true, false]);
    let t = plan.totals();
    if let Some(q) = cat.quant.as_deref() {
        s.push_str(&format!(
            "\nquantized: {} (from {}; {}): {}\n",
            q.scheme,
            q.found_in,
            q.layouts().join(", "),
            match &plan.quant {
                QuantPlan::Dequantize => format!(
                    "{} payload(s) dequantized; {} scale/companion tensor(s) and the scheme's config left out",
                    q.scaled.len(),
                    plan.removed.len()
                ),
                QuantPlan::Keep => "payloads and scales kept as stored (--on-quantized keep)".into(),
                QuantPlan::Unsupported(why) => format!("cannot dequantize: {why}"),
                QuantPlan::None => String::new(),
            }
        ));
    }
    if !plan.dropped.is_empty() {
        s.push_str(&format!(
            "\nleft out: {}\n",
            weightcast::formats::torch::describe_dropped(&plan.dropped)
        ));
    }
    s.push_str(&format!(
        "\n{} tensors: {} cast, {} kept; {} -> {} ({:.0}%)\n",
        plan.tensors.len() + plan.others.len(),
        t.cast,
        t.kept,
        bytes(t.bytes_in),
        bytes(t.bytes_out),
        if t.bytes_in > 0 {
            100.0 * t.bytes_out as f64 / t.bytes_in as f64
        } else {
            100.0
        }
    ));
    if !layout.files.is_empty() {
        s.push_str("files:");
        for f in &layout.files {
            s.push_str(&format!(
                " {} ({} tensors, {})",
                f.name,
                f.tensors.len(),
                bytes(f.bytes)
            ));
        }
        if let Some(i) = &layout.index {
            s.push_str(&format!(" + {i}"));
        }
        s.push('\n');
    }
    s
}

/// Every plan entry with its tensor: the state dict's, then (a whole-file .pt output) the rest
/// of the file's, named by their path from the top.
fn planned<'a>(
    cat: &'a Catalogue,
    plan: &'a Plan,
) -> impl Iterator<
    Item = (
        &'a weightcast::catalogue::TensorEntry,
        &'a weightcast::plan::TensorPlan,
    ),
> {
    let others = cat.torch.as_deref().map(|d| &d.others[..]).unwrap_or(&[]);
    plan.tensors
        .iter()
        .map(|p| (&cat.tensors[p.tensor], p))
        .chain(
            plan.others
                .iter()
                .map(move |p| (&others[p.tensor].entry, p)),
        )
}

pub fn plan_json(cat: &Catalogue, plan: &Plan, layout: &Layout) -> Value {
    let t = plan.totals();
    let entry = |e: &weightcast::catalogue::TensorEntry, p: &weightcast::plan::TensorPlan| {
        json!({
            "name": e.name, "shape": e.shape, "from": p.from.to_string(), "to": p.to.to_string(),
            "cast": p.is_cast(), "bytes_before": p.bytes_in, "bytes_after": p.bytes_out,
            "rule": p.reason,
            "quantize": match p.scaled {
                Some(weightcast::plan::ScaledOut::Payload { scale, layout, .. }) => json!({
                    "scale": cat.tensors[scale].name, "layout": layout.describe()}),
                Some(weightcast::plan::ScaledOut::Scale { payload }) => json!({
                    "scale_of": cat.tensors[payload].name}),
                None => Value::Null,
            },
            "dequantize": p.dequant.map(|d| json!({
                "scale": cat.tensors[d.scale].name, "layout": d.layout.describe(),
                "compute": d.compute.to_string(),
            })),
        })
    };
    let others = cat.torch.as_deref().map(|d| &d.others[..]).unwrap_or(&[]);
    json!({
        "input": cat.path,
        "target": plan.target.torch_name(),
        "tensors": plan.tensors.iter().map(|p| entry(&cat.tensors[p.tensor], p)).collect::<Vec<_>>(),
        "other_tensors": plan.others.iter().map(|p| {
            let o = &others[p.tensor];
            let mut v = entry(&o.entry, p);
            v["entry"] = json!(o.section);
            v
        }).collect::<Vec<_>>(),
        "dropped": plan.dropped.iter().map(|(n, k, b)| json!({"entry": n, "tensors": k, "bytes": b})).collect::<Vec<_>>(),
        "state_dict_entry": cat.torch.as_deref().and_then(|d| d.entry.clone()),
        "whole_file": matches!(plan.scope, weightcast::plan::Scope::WholeFile { .. }),
        "totals": {"tensors": plan.tensors.len() + plan.others.len(), "cast": t.cast, "kept": t.kept,
                   "bytes_before": t.bytes_in, "bytes_after": t.bytes_out},
        "files": layout.files.iter().map(|f| json!({"name": f.name, "tensors": f.tensors.len(), "bytes": f.bytes})).collect::<Vec<_>>(),
        "index": layout.index,
        "warnings": plan.warnings,
        "removed": plan.removed.iter().map(|(i, why)| json!({"name": cat.tensors[*i].name, "reason": why})).collect::<Vec<_>>(),
        "quantization": cat.quant.as_deref().map(|q| json!({
            "scheme": q.scheme, "found_in": q.found_in, "layouts": q.layouts(),
            "action": match &plan.quant {
                QuantPlan::Dequantize => "dequantize", QuantPlan::Keep => "keep",
                QuantPlan::Unsupported(_) => "unsupported", QuantPlan::None => "none",
            },
            "unsupported": q.unsupported,
        })),
    })
}

use weightcast::analysis::{totals, TensorAnalysis};
use weightcast::diff::Diff;
use weightcast::plan::QuantPlan;
use weightcast::stats::{verdict, Bounds, ErrorStats, Verdict};

/// SNR as text: `inf` when nothing changed.
pub fn db(x: f64) -> String {
    if x == f64::NEG_INFINITY {
        "-inf".into()
    } else if x.is_infinite() {
        "inf".into()
    } else {
        format!("{x:.1}")
    }
}

fn sci(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else {
        format!("{x:.2e}")
    }
}

/// The figures of one stats record as JSON. JSON has no infinity: an infinite SNR is null,
/// `nonfinite` > 0 says it is `-inf` (finite values became inf or NaN: the error figures are
/// infinite, shown as null too, and cosine is NaN, null).
pub fn stats_json(s: &ErrorStats) -> Value {
    let frac = |n: u64, d: u64| if d == 0 { 0.0 } else { n as f64 / d as f64 };
    json!({
        "count": s.count, "nan_in": s.nan_in, "inf_in": s.inf_in,
        "min": if s.min.is_finite() { json!(s.min) } else { Value::Null },
        "max": if s.max.is_finite() { json!(s.max) } else { Value::Null },
        "max_abs": s.max_abs, "nonzero": s.nonzero,
        "overflow": s.overflow, "overflow_fraction": frac(s.overflow, s.count),
        "nonfinite": s.nonfinite,
        "underflow": s.underflow, "underflow_fraction": s.underflow_fraction(),
        "subnormal": s.subnormal, "subnormal_fraction": frac(s.subnormal, s.count),
        "max_abs_err": s.max_abs_err, "max_rel_err": s.max_rel_err,
        "mean_rel_err": s.mean_rel_err(), "rms_err": s.rms_err(),
        "snr_db": if s.snr_db().is_finite() { json!(s.snr_db()) } else { Value::Null },
        "cosine": s.cosine(),
    })
}

pub fn analysis_json(cat: &Catalogue, plan: &Plan, a: &[TensorAnalysis], bounds: &Bounds) -> Value {
    let t = totals(a);
    let mut verdicts = serde_json::Map::new();
    for v in [
        Verdict::Overflow,
        Verdict::Underflow,
        Verdict::Lossy,
        Verdict::Ok,
        Verdict::Exact,
    ] {
        verdicts.insert(
            v.as_str().into(),
            json!(a.iter().filter(|x| x.verdict == v).count()),
        );
    }
    let tot = plan.totals();
    json!({
        "input": cat.path,
        "target": plan.target.torch_name(),
        "bounds": {"lossy_below_db": bounds.lossy_below_db, "underflow_above": bounds.underflow_above},
        "tensors": a.iter().map(|x| {
            let mut v = stats_json(&x.stats);
            v["name"] = json!(cat.tensors[plan.tensors[x.plan_index].tensor].name);
            v["from"] = json!(x.from.to_string());
            v["to"] = json!(x.to.to_string());
            v["verdict"] = json!(x.verdict.as_str());
            v["flushed_entirely"] = json!(x.stats.flushed_entirely());
            v
        }).collect::<Vec<_>>(),
        "totals": {
            "flushed_entirely": flushed(cat, plan, a),
            "analyzed": a.len(),
            "not_cast": plan.tensors.len() - a.len(),
            "verdicts": verdicts,
            "model": stats_json(&t),
            "model_verdict": verdict(&t, bounds).as_str(),
            "bytes_before": tot.bytes_in,
            "bytes_after": tot.bytes_out,
        },
        "warnings": plan.warnings,
    })
}

pub fn analysis_text(cat: &Catalogue, plan: &Plan, a: &[TensorAnalysis], all: bool) -> String {
    let mut rows = vec![[
        "verdict",
        "name",
        "cast",
        "max|x|",
        "overflow",
        "underflow",
        "subnormal",
        "max abs err",
        "max rel err",
        "mean rel err",
        "rms err",
        "SNR dB",
        "cosine",
    ]
    .map(String::from)
    .to_vec()];
    let shown = if all { a.len() } else { a.len().min(25) };
    for x in &a[..shown] {
        let s = &x.stats;
        rows.push(vec![
            x.verdict.as_str().into(),
            cat.tensors[plan.tensors[x.plan_index].tensor].name.clone(),
            format!("{}->{}", x.from, x.to),
            sci(s.max_abs),
            s.overflow.to_string(),
            s.underflow.to_string(),
            s.subnormal.to_string(),
            sci(s.max_abs_err),
            sci(s.max_rel_err),
            sci(s.mean_rel_err()),
            sci(s.rms_err()),
            db(s.snr_db()),
            format!("{:.6}", s.cosine()),
        ]);
    }
    let mut out = table(
        &rows,
        &[
            false, false, false, true, true, true, true, true, true, true, true, true, true,
        ],
    );
    if shown < a.len() {
        out.push_str(&format!(
            "... {} more (--all shows every tensor)\n",
            a.len() - shown
        ));
    }
    let t = totals(a);
    let count = |v: Verdict| a.iter().filter(|x| x.verdict == v).count();
    let tot = plan.totals();
    out.push_str(&format!(
        "\n{} tensors cast to {} ({} not cast): {} overflow, {} underflow, {} lossy, {} ok, {} exact\n\
         model: {} values overflow, {} flush to zero, {} subnormal; SNR {} dB, cosine {:.6}; {} -> {}\n",
        a.len(),
        plan.target.torch_name(),
        plan.tensors.len() - a.len(),
        count(Verdict::Overflow),
        count(Verdict::Underflow),
        count(Verdict::Lossy),
        count(Verdict::Ok),
        count(Verdict::Exact),
        t.overflow,
        t.underflow,
        t.subnormal,
        db(t.snr_db()),
        t.cosine(),
        bytes(tot.bytes_in),
        bytes(tot.bytes_out),
    ));
    let gone = flushed(cat, plan, a);
    if !gone.is_empty() {
        out.push_str(&format!(
            "{} tensor(s) become all zeros (every non-zero value flushes to zero): {}\n",
            gone.len(),
            names_list(&gone)
        ));
    }
    out
}

/// The tensors whose every non-zero value the cast flushes to zero.
fn flushed(cat: &Catalogue, plan: &Plan, a: &[TensorAnalysis]) -> Vec<String> {
    a.iter()
        .filter(|x| x.stats.flushed_entirely())
        .map(|x| cat.tensors[plan.tensors[x.plan_index].tensor].name.clone())
        .collect()
}

/// Up to five names in backticks, then how many more.
pub fn names_list(names: &[String]) -> String {
    let mut s = names
        .iter()
        .take(5)
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > 5 {
        s.push_str(&format!(" and {} more", names.len() - 5));
    }
    s
}

/// Why `diff` fails: one line per missing tensor, shape change, or tensor below tolerance.
pub fn diff_failures(d: &Diff, tolerance: Option<f64>) -> Vec<String> {
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

pub fn diff_json(
    a: &std::path::Path,
    b: &std::path::Path,
    d: &Diff,
    tolerance: Option<f64>,
    failures: &[String],
) -> Value {
    json!({
        "a": a, "b": b, "tolerance_db": tolerance,
        "only_a": d.only_a, "only_b": d.only_b,
        "common": d.common.iter().map(|c| {
            let mut v = c.stats.as_ref().map(stats_json).unwrap_or_else(|| json!({}));
            v["name"] = json!(c.name);
            v["a_dtype"] = json!(c.a_dtype.to_string());
            v["b_dtype"] = json!(c.b_dtype.to_string());
            v["a_shape"] = json!(c.a_shape);
            v["b_shape"] = json!(c.b_shape);
            if let Some(i) = c.identical { v["identical"] = json!(i); }
            v
        }).collect::<Vec<_>>(),
        "failures": failures,
        "ok": failures.is_empty(),
    })
}

pub fn diff_text(d: &Diff, tolerance: Option<f64>, failures: &[String], all: bool) -> String {
    let mut rows = vec![[
        "name",
        "A",
        "B",
        "max abs err",
        "max rel err",
        "rms err",
        "SNR dB",
        "cosine",
    ]
    .map(String::from)
    .to_vec()];
    let mut common: Vec<_> = d.common.iter().collect();
    common.sort_by(|x, y| {
        let s = |c: &weightcast::diff::Common| c.stats.map_or(f64::INFINITY, |s| s.snr_db());
        s(x).total_cmp(&s(y))
    });
    let shown = if all {
        common.len()
    } else {
        common.len().min(25)
    };
    for c in &common[..shown] {
        let (a, b) = (
            format!("{} {}", c.a_dtype, shape(&c.a_shape)),
            format!("{} {}", c.b_dtype, shape(&c.b_shape)),
        );
        match (&c.stats, c.identical) {
            (Some(s), _) => rows.push(vec![
                c.name.clone(),
                a,
                b,
                sci(s.max_abs_err),
                sci(s.max_rel_err),
                sci(s.rms_err()),
                db(s.snr_db()),
                format!("{:.6}", s.cosine()),
            ]),
            (None, Some(i)) => rows.push(vec![
                c.name.clone(),
                a,
                b,
                (if i { "identical" } else { "differs" }).into(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ]),
            (None, None) => rows.push(vec![c.name.clone(), a, b, "not comparable".into()]),
        }
    }
    let mut out = table(&rows, &[false, false, false, true, true, true, true, true]);
    if shown < common.len() {
        out.push_str(&format!(
            "... {} more (--all shows every tensor)\n",
            common.len() - shown
        ));
    }
    let changed = d.common.iter().filter(|c| c.a_dtype != c.b_dtype).count();
    out.push_str(&format!(
        "\n{} common tensors ({} changed dtype), {} only in A, {} only in B{}\n",
        d.common.len(),
        changed,
        d.only_a.len(),
        d.only_b.len(),
        tolerance
            .map(|t| format!(", tolerance {t} dB"))
            .unwrap_or_default()
    ));
    if failures.is_empty() {
        out.push_str("ok\n");
    } else {
        for f in failures {
            out.push_str(&format!("FAIL {f}\n"));
        }
    }
    out
}

/// A message on one line: control characters (a newline in a tensor or zip entry name read
/// from the file, an escape sequence) are written escaped, as `\u{1c}`.
pub fn one_line(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for c in msg.chars() {
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}
