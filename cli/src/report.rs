//! Human-readable tables for the commands (their JSON documents are the library's:
//! `weightcast::commands`).

use weightcast::catalogue::Catalogue;
use weightcast::commands::analyze::Analyzed;
pub use weightcast::commands::diff::shape;
pub use weightcast::commands::document::{bytes, db};
use weightcast::error::one_line;
use weightcast::output::Layout;
use weightcast::plan::Plan;

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
    if let Some(g) = cat.gguf.as_deref() {
        return gguf_text(cat, g);
    }
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
            "quantized: {} (from {}); {} scaled payload(s){}{}{}\n\n",
            q.scheme,
            q.found_in,
            q.scaled.len(),
            match cat.tensors.iter().filter(|t| t.decode.is_some()).count() {
                0 => String::new(),
                n => format!(", {n} packed weight(s)"),
            },
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
            row.push(match (&t.decode, q.role(i)) {
                (Some(d), None) => format!("dequantized: {}", d.what),
                (_, role) => role_text(cat, role),
            });
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

pub fn plan_text(cat: &Catalogue, plan: &Plan, layout: &Layout) -> String {
    let mut rows = vec![vec![
        "name".into(),
        "shape".into(),
        "from".into(),
        "to".into(),
        "bytes".into(),
        "rule".into(),
    ]];
    for (t, cells) in planned(cat, plan) {
        rows.push([vec![t.name.clone(), shape(&t.shape)], cells].concat());
    }
    let mut s = table(&rows, &[false, false, false, false, true, false]);
    let t = plan.totals();
    if let Some(q) = cat.quant.as_deref() {
        s.push_str(&format!(
            "\nquantized: {} (from {}{}): {}\n",
            q.scheme,
            q.found_in,
            match q.layouts().join(", ") {
                l if l.is_empty() => l,
                l => format!("; {l}"),
            },
            match &plan.quant {
                QuantPlan::Dequantize => format!(
                    "{} payload(s) dequantized; {} scale/companion tensor(s) and the scheme's config left out",
                    q.scaled.len() + cat.tensors.iter().filter(|t| t.decode.is_some()).count(),
                    plan.removed.len()
                        + cat
                            .tensors
                            .iter()
                            .filter_map(|t| t.decode.as_ref())
                            .map(|d| d.parts.len())
                            .sum::<usize>(),
                ),
                QuantPlan::Keep => "payloads and scales kept as stored (--on-quantized keep)".into(),
                QuantPlan::Unsupported(why) => format!("cannot dequantize: {why}"),
                QuantPlan::None => String::new(),
            }
        ));
    }
    if !plan.config.is_empty() {
        s.push('\n');
        for e in &plan.config {
            let old = e
                .old
                .as_ref()
                .map_or("(absent)".to_string(), |v| v.to_string());
            s.push_str(&format!("config.json: {} {old} -> {}\n", e.key, e.new));
        }
    }
    if !plan.dropped.is_empty() {
        s.push_str(&format!(
            "\nleft out: {}\n",
            weightcast::formats::torch::describe_dropped(&plan.dropped)
        ));
    }
    s.push_str(&format!(
        "\n{} tensors: {} cast, {} kept; {} -> {} ({:.0}%)\n",
        plan.tensors().len() + plan.others().len(),
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
/// of the file's, named by their path from the top; with the plan's cells of its row (from, to,
/// bytes, rule).
fn planned<'a>(
    cat: &'a Catalogue,
    plan: &'a Plan,
) -> impl Iterator<Item = (&'a weightcast::catalogue::TensorEntry, Vec<String>)> {
    fn cells<I>(p: &weightcast::plan::TensorPlan<I>) -> Vec<String> {
        let to = match p.factor {
            // scaled: the factor beside the dtype (`F16 x0.125`, `=` never: the values change)
            Some(f) => format!("{} {}", p.to, f.describe()),
            None if p.is_cast() => p.to.to_string(),
            None => "=".into(),
        };
        vec![
            p.from.to_string(),
            to,
            format!("{} -> {}", bytes(p.bytes_in), bytes(p.bytes_out)),
            p.reason.clone(),
        ]
    }
    let others = cat.torch.as_deref().map(|d| &d.others[..]).unwrap_or(&[]);
    plan.tensors()
        .iter()
        .map(|p| (&cat.tensors[p.tensor], cells(p)))
        .chain(
            plan.others()
                .iter()
                .map(move |p| (&others[p.tensor].entry, cells(p))),
        )
}

use weightcast::analysis::totals;
use weightcast::diff::Diff;
use weightcast::plan::QuantPlan;
use weightcast::stats::Verdict;

fn sci(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else {
        format!("{x:.2e}")
    }
}

pub fn analysis_text(an: &Analyzed, all: bool) -> String {
    let (plan, a) = (&an.plan, &an.analyses[..]);
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
            an.name(x).to_string(),
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
    let count = |v: Verdict| an.count(v);
    let tot = plan.totals();
    out.push_str(&format!(
        "\n{} tensors cast to {} ({} not cast): {} overflow, {} underflow, {} lossy, {} ok, {} exact\n\
         model: {} values overflow, {} flush to zero, {} subnormal; SNR {} dB, cosine {:.6}; {} -> {}\n",
        a.len(),
        plan.target.torch_name(),
        plan.tensors().len() - a.len(),
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
    let gone = an.flushed();
    if !gone.is_empty() {
        out.push_str(&format!(
            "{} tensor(s) become all zeros (every non-zero value flushes to zero): {}\n",
            gone.len(),
            weightcast::error::names(&gone)
        ));
    }
    out
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

/// `inspect` of a GGUF file: its metadata (arrays summarised) and every tensor with its ggml
/// type.
fn gguf_text(cat: &Catalogue, g: &weightcast::catalogue::gguf::GgufDoc) -> String {
    let mut s = format!(
        "{}: GGUF v{} (llama.cpp), architecture {}, {} tensors, {} metadata keys, {}\n\n",
        one_line(&cat.path.display().to_string()),
        g.version,
        g.architecture().unwrap_or("(none)"),
        g.tensors.len(),
        g.metadata.len(),
        bytes(g.tensors.iter().map(|t| t.nbytes).sum())
    );
    let mut rows = vec![vec!["key".into(), "type".into(), "value".into()]];
    for (k, v) in &g.metadata {
        let mut text = v.to_json(4).to_string();
        if text.chars().count() > 80 {
            text = text.chars().take(77).collect::<String>() + "...";
        }
        rows.push(vec![one_line(k), v.type_name(), one_line(&text)]);
    }
    s.push_str(&table(&rows, &[false, false, false]));
    let mut rows = vec![vec![
        "name".into(),
        "ggml type".into(),
        "shape".into(),
        "bytes".into(),
    ]];
    for t in &g.tensors {
        let shape_torch: Vec<u64> = t.dims.iter().rev().copied().collect();
        rows.push(vec![
            one_line(&t.name),
            t.ggml.name.to_string(),
            shape(&shape_torch),
            bytes(t.nbytes),
        ]);
    }
    s.push('\n');
    s.push_str(&table(&rows, &[false, false, false, true]));
    for n in &cat.notes {
        s.push_str(&format!("\nnote: {}", one_line(n)));
    }
    s.push('\n');
    s
}
