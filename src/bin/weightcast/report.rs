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
        cat.kind.describe(),
        cat.files.len(),
        cat.tensors.len(),
        cat.total_params(),
        bytes(cat.total_bytes())
    );
    let mut rows = vec![vec![
        "name".into(),
        "dtype".into(),
        "shape".into(),
        "bytes".into(),
    ]];
    for t in &cat.tensors {
        rows.push(vec![
            t.name.clone(),
            t.dtype.to_string(),
            shape(&t.shape),
            bytes(t.nbytes),
        ]);
    }
    s.push_str(&table(&rows, &[false, false, false, true]));
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
    let meta = cat.metadata();
    if !meta.is_empty() {
        s.push_str("\nmetadata:\n");
        for (k, v) in meta {
            s.push_str(&format!("  {k}: {v}\n"));
        }
    }
    s
}

pub fn inspect_json(cat: &Catalogue) -> Value {
    json!({
        "path": cat.path,
        "format": cat.kind.describe(),
        "files": cat.files.iter().map(|f| json!({"name": f.name, "bytes": f.len})).collect::<Vec<_>>(),
        "tensor_count": cat.tensors.len(),
        "parameter_count": cat.total_params(),
        "bytes": cat.total_bytes(),
        "dtypes": cat.dtype_totals().into_iter().map(|(d, n, p, b)| {
            (d.to_string(), json!({"tensors": n, "parameters": p, "bytes": b}))
        }).collect::<serde_json::Map<_, _>>(),
        "metadata": cat.metadata().into_iter().map(|(k, v)| (k, Value::String(v))).collect::<serde_json::Map<_, _>>(),
        "tensors": cat.tensors.iter().map(|t| json!({
            "name": t.name, "dtype": t.dtype.to_string(), "shape": t.shape,
            "bytes": t.nbytes, "file": cat.files[t.file].name,
        })).collect::<Vec<_>>(),
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
    for p in &plan.tensors {
        let t = &cat.tensors[p.tensor];
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
    s.push_str(&format!(
        "\n{} tensors: {} cast, {} kept; {} -> {} ({:.0}%)\n",
        plan.tensors.len(),
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
    s
}

pub fn plan_json(cat: &Catalogue, plan: &Plan, layout: &Layout) -> Value {
    let t = plan.totals();
    json!({
        "input": cat.path,
        "target": plan.target.torch_name(),
        "tensors": plan.tensors.iter().map(|p| {
            let e = &cat.tensors[p.tensor];
            json!({
                "name": e.name, "shape": e.shape, "from": p.from.to_string(), "to": p.to.to_string(),
                "cast": p.is_cast(), "bytes_before": p.bytes_in, "bytes_after": p.bytes_out,
                "rule": p.reason,
            })
        }).collect::<Vec<_>>(),
        "totals": {"tensors": plan.tensors.len(), "cast": t.cast, "kept": t.kept,
                   "bytes_before": t.bytes_in, "bytes_after": t.bytes_out},
        "files": layout.files.iter().map(|f| json!({"name": f.name, "tensors": f.tensors.len(), "bytes": f.bytes})).collect::<Vec<_>>(),
        "index": layout.index,
        "warnings": plan.warnings,
    })
}
