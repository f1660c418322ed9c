//! The self-contained HTML report of `analyze --report`: inline SVG charts, no script, no
//! network.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::analysis::{totals, TensorAnalysis};
use crate::catalogue::Catalogue;
use crate::plan::Plan;
use crate::stats::{min_normal, min_subnormal, ErrorStats, Verdict};

use super::Analyzed;
use crate::commands::document::{bytes, db};

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The layer number in a tensor name (`model.layers.12.mlp...`, `encoder.layer.3...`, `h.0...`).
pub fn layer_of(name: &str) -> Option<u64> {
    let parts: Vec<&str> = name.split('.').collect();
    parts.windows(2).find_map(|w| {
        matches!(
            w[0],
            "layers" | "layer" | "h" | "blocks" | "block" | "decoder_layers"
        )
        .then(|| w[1].parse().ok())
        .flatten()
    })
}

struct Group {
    label: String,
    stats: ErrorStats,
    tensors: usize,
}

/// Per layer (in depth order; tensors outside numbered layers grouped as "other").
fn by_layer(cat: &Catalogue, plan: &Plan, a: &[TensorAnalysis]) -> Vec<Group> {
    let mut m: BTreeMap<Option<u64>, (ErrorStats, usize)> = BTreeMap::new();
    for x in a {
        let name = &cat.tensors[plan.tensors()[x.plan_index].tensor].name;
        let e = m.entry(layer_of(name)).or_default();
        e.0 = e.0.merge(&x.stats);
        e.1 += 1;
    }
    let mut groups: Vec<Group> = m
        .iter()
        .filter_map(|(k, (s, n))| {
            k.map(|l| Group {
                label: l.to_string(),
                stats: *s,
                tensors: *n,
            })
        })
        .collect();
    if let Some((s, n)) = m.get(&None) {
        groups.push(Group {
            label: "other".into(),
            stats: *s,
            tensors: *n,
        });
    }
    groups
}

/// A bar chart as inline SVG: one bar per group, values `v`, `fmt` for the labels.
fn bars(
    title: &str,
    labels: &[String],
    v: &[f64],
    color: &str,
    fmt: &dyn Fn(f64) -> String,
) -> String {
    let (w, h, left, bottom) = (760.0, 220.0, 50.0, 30.0);
    let finite: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    let max = finite.iter().copied().fold(0.0, f64::max).max(1e-12);
    let n = v.len().max(1) as f64;
    let bw = (w - left) / n;
    let mut s = format!(
        "<figure><figcaption>{}</figcaption><svg viewBox=\"0 0 {w} {}\" width=\"{w}\" height=\"{}\" role=\"img\" aria-label=\"{}\">",
        esc(title), h + bottom, h + bottom, esc(title)
    );
    let _ = write!(
        s,
        "<line x1=\"{left}\" y1=\"{h}\" x2=\"{w}\" y2=\"{h}\" stroke=\"#999\"/>"
    );
    let _ = write!(
        s,
        "<text x=\"0\" y=\"12\" font-size=\"11\">{}</text>",
        esc(&fmt(max))
    );
    for (i, (&x, l)) in v.iter().zip(labels).enumerate() {
        let bh = if x.is_finite() {
            x / max * (h - 20.0)
        } else {
            h - 20.0
        };
        let bx = left + i as f64 * bw;
        let fill = if x.is_finite() { color } else { "#bbb" };
        let _ = write!(
            s,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{fill}\"><title>{}: {}</title></rect>",
            bx + 1.0, h - bh, (bw - 2.0).max(1.0), bh, esc(l), esc(&fmt(x))
        );
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" font-size=\"10\" text-anchor=\"middle\">{}</text>",
            bx + bw / 2.0,
            h + 14.0,
            esc(l)
        );
    }
    s.push_str("</svg></figure>");
    s
}

/// SNR per layer as bars coloured against the lossy line (red below it, amber within 6 dB
/// above, green beyond; grey when exact), the line drawn and labelled, each bar's value on it.
fn snr_bars(labels: &[String], v: &[f64], lossy: f64) -> String {
    let (w, h, left, bottom) = (760.0, 220.0, 50.0, 30.0);
    let top = v
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(lossy, f64::max)
        * 1.15;
    let y = |x: f64| h - (x.clamp(0.0, top) / top) * (h - 20.0);
    let n = v.len().max(1) as f64;
    let bw = (w - left) / n;
    let title = format!(
        "SNR per layer (dB, higher is better): red below the lossy line ({lossy} dB, --lossy-below), amber within 6 dB above it, green beyond, grey when exact"
    );
    let mut s = format!(
        "<figure id=\"snr-chart\"><figcaption>{}</figcaption><svg viewBox=\"0 0 {w} {}\" width=\"{w}\" height=\"{}\" role=\"img\" aria-label=\"SNR per layer\">",
        esc(&title), h + bottom, h + bottom
    );
    let _ = write!(
        s,
        "<line x1=\"{left}\" y1=\"{h}\" x2=\"{w}\" y2=\"{h}\" stroke=\"#999\"/>\
 <text x=\"0\" y=\"12\" font-size=\"11\">{top:.0} dB</text>"
    );
    for (i, (&x, l)) in v.iter().zip(labels).enumerate() {
        let (fill, class) = if !x.is_finite() {
            ("#bbb", "exact")
        } else if x < lossy {
            ("#c33", "lossy")
        } else if x < lossy + 6.0 {
            ("#d90", "near")
        } else {
            ("#3a7", "ok")
        };
        let top_y = if x.is_finite() { y(x) } else { 20.0 };
        let bx = left + i as f64 * bw;
        let _ = write!(
            s,
            "<rect class=\"snr-{class}\" x=\"{:.1}\" y=\"{top_y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{fill}\"><title>{}: {} dB</title></rect>\
 <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\">{}</text>\
 <text x=\"{:.1}\" y=\"{}\" font-size=\"10\" text-anchor=\"middle\">{}</text>",
            bx + 1.0, (bw - 2.0).max(1.0), h - top_y, esc(l), esc(&db(x)),
            bx + bw / 2.0, (top_y - 3.0).max(10.0), esc(&db(x)),
            bx + bw / 2.0, h + 14.0, esc(l)
        );
    }
    let ly = y(lossy);
    let _ = write!(
        s,
        "<line id=\"lossy-line\" x1=\"{left}\" y1=\"{ly:.1}\" x2=\"{w}\" y2=\"{ly:.1}\" stroke=\"#c33\" stroke-dasharray=\"6 4\"/>\
 <text x=\"{}\" y=\"{:.1}\" font-size=\"10\" fill=\"#c33\" text-anchor=\"end\">lossy below {lossy} dB</text>",
        w - 2.0, ly - 3.0
    );
    s.push_str("</svg></figure>");
    s
}

/// Where a tensor's values fall against the target's range, on a log2 axis: the flush-to-zero
/// zone (below half the smallest subnormal), the subnormals, the normal range and overflow,
/// with the tensor's largest magnitude marked and the counts in each zone.
fn range_strip(x: &TensorAnalysis) -> String {
    let to = x.to;
    let (sub, norm) = (min_subnormal(to), min_normal(to));
    let max = to.max_finite().unwrap_or(f64::MAX);
    if sub <= 0.0 || !max.is_finite() || max > 1e300 {
        return String::new();
    }
    let (lo, hi) = ((sub / 2.0).log2() - 6.0, max.log2() + 4.0);
    let (w, h) = (420.0, 22.0);
    let px = |v: f64| ((v.log2() - lo) / (hi - lo) * w).clamp(0.0, w);
    let zones = [
        (0.0, px(sub / 2.0), "#e8a33c", "flushes to zero"),
        (px(sub / 2.0), px(norm), "#f3d36b", "subnormal"),
        (px(norm), px(max), "#9fd3a8", "normal"),
        (px(max), w, "#e06666", "overflow"),
    ];
    let mut s = format!(
        "<svg class=\"range\" viewBox=\"0 0 {w} {}\" width=\"{w}\" height=\"{}\" role=\"img\" aria-label=\"range of {}\">",
        h + 12.0,
        h + 12.0,
        esc(&to.to_string())
    );
    for (a, b, c, t) in zones {
        let _ = write!(
            s,
            "<rect x=\"{a:.1}\" y=\"0\" width=\"{:.1}\" height=\"{h}\" fill=\"{c}\"><title>{t}</title></rect>",
            (b - a).max(0.0)
        );
    }
    for (v, label, anchor) in [
        (sub, "min subnormal", "end"),
        (norm, "min normal", "start"),
        (max, "max", "middle"),
    ] {
        let x0 = px(v);
        let _ = write!(
            s,
            "<line x1=\"{x0:.1}\" y1=\"0\" x2=\"{x0:.1}\" y2=\"{h}\" stroke=\"#555\"/>\
 <text x=\"{x0:.1}\" y=\"{}\" font-size=\"8\" text-anchor=\"{anchor}\">{label} {v:.1e}</text>",
            h + 10.0
        );
    }
    if x.stats.max_abs > 0.0 && x.stats.max_abs.is_finite() {
        let m = px(x.stats.max_abs);
        let _ = write!(
            s,
            "<line class=\"maxabs\" x1=\"{m:.1}\" y1=\"0\" x2=\"{m:.1}\" y2=\"{h}\" stroke=\"#000\" stroke-width=\"3\"><title>max |x| {:.3e}</title></line>",
            x.stats.max_abs
        );
    }
    s.push_str("</svg>");
    s
}

/// The whole page.
pub fn analysis_page(an: &Analyzed) -> String {
    let mut s = head(an);
    depth(an, &mut s);
    worst(an, &mut s);
    rules(&an.plan, &mut s);
    s.push_str("</table><p>Made by weightcast; figures in float64 against the exact values the cast writes.</p></body></html>\n");
    s
}

/// The title and the summary cards.
fn head(an: &Analyzed) -> String {
    let (cat, plan, a) = (&an.cat, &an.plan, &an.analyses[..]);
    let t = totals(a);
    let tot = plan.totals();
    let count = |v: Verdict| an.count(v);
    let mut s = String::new();
    let _ = write!(
        s,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>weightcast: {path} to {to}</title>\
         <style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}}\
         table{{border-collapse:collapse}}td,th{{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}}\
         td:first-child,th:first-child,td:nth-child(2),th:nth-child(2){{text-align:left}}\
         .overflow{{color:#b00;font-weight:bold}}.underflow{{color:#a60}}.lossy{{color:#a60}}\
         .cards{{display:flex;gap:1em;flex-wrap:wrap}}.card{{border:1px solid #ccc;border-radius:6px;padding:.6em 1em}}\
         .card b{{display:block;font-size:20px}}figure{{margin:1em 0}}</style></head><body>\
         <h1>What casting to {to} does</h1><p>{path}: {n} tensors cast, {k} left as they are.</p>",
        path = esc(&cat.path.display().to_string()),
        to = plan.target.torch_name(),
        n = a.len(),
        k = plan.tensors().len() - a.len(),
    );
    let card = |label: &str, value: String, id: &str| {
        format!(
            "<div class=\"card\" id=\"{id}\">{label}<b>{}</b></div>",
            esc(&value)
        )
    };
    s.push_str("<div class=\"cards\">");
    s.push_str(&card(
        "size",
        format!("{} → {}", bytes(tot.bytes_in), bytes(tot.bytes_out)),
        "size",
    ));
    s.push_str(&card("model SNR", format!("{} dB", db(t.snr_db())), "snr"));
    s.push_str(&card("cosine", format!("{:.6}", t.cosine()), "cosine"));
    s.push_str(&card(
        "values overflowing",
        t.overflow.to_string(),
        "overflow",
    ));
    s.push_str(&card(
        "values flushed to zero",
        t.underflow.to_string(),
        "underflow",
    ));
    s.push_str(&card(
        "verdicts",
        format!(
            "{} overflow · {} underflow · {} lossy · {} ok · {} exact",
            count(Verdict::Overflow),
            count(Verdict::Underflow),
            count(Verdict::Lossy),
            count(Verdict::Ok),
            count(Verdict::Exact)
        ),
        "verdicts",
    ));
    s.push_str("</div>");
    s
}

/// Charts and a table per layer.
fn depth(an: &Analyzed, s: &mut String) {
    let groups = by_layer(&an.cat, &an.plan, &an.analyses);
    let labels: Vec<String> = groups.iter().map(|g| g.label.clone()).collect();
    s.push_str("<h2>Along the depth of the model</h2>");
    let snr: Vec<f64> = groups.iter().map(|g| g.stats.snr_db()).collect();
    s.push_str(&snr_bars(&labels, &snr, an.bounds.lossy_below_db));
    // A chart of zeros says nothing: one sentence instead.
    if groups.iter().any(|g| g.stats.overflow > 0) {
        let ovf: Vec<f64> = groups.iter().map(|g| g.stats.overflow as f64).collect();
        s.push_str(&bars(
            "values overflowing per layer",
            &labels,
            &ovf,
            "#c33",
            &|x| format!("{x:.0}"),
        ));
    } else {
        s.push_str("<p id=\"no-overflow\">No value overflows: every one is within the target's finite range.</p>");
    }
    if groups.iter().any(|g| g.stats.underflow > 0) {
        let unf: Vec<f64> = groups.iter().map(|g| g.stats.underflow as f64).collect();
        s.push_str(&bars(
            "values flushed to zero per layer",
            &labels,
            &unf,
            "#d90",
            &|x| format!("{x:.0}"),
        ));
    } else {
        s.push_str("<p id=\"no-underflow\">No non-zero value is flushed to zero.</p>");
    }
    s.push_str("<h2>Per layer</h2><table><tr><th>layer</th><th>tensors</th><th>SNR dB</th><th>cosine</th><th>overflow</th><th>underflow</th></tr>");
    for g in &groups {
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.6}</td><td>{}</td><td>{}</td></tr>",
            esc(&g.label),
            g.tensors,
            db(g.stats.snr_db()),
            g.stats.cosine(),
            g.stats.overflow,
            g.stats.underflow
        );
    }
    s.push_str("</table>");
}

/// The worst tensors: figures, and where their values fall against the target's range.
fn worst(an: &Analyzed, s: &mut String) {
    let (plan, a) = (&an.plan, &an.analyses[..]);
    s.push_str("<h2>Worst tensors</h2><table id=\"worst\"><tr><th>verdict</th><th>name</th><th>cast</th><th>max |x|</th><th>overflow</th><th>underflow</th><th>max rel err</th><th>SNR dB</th><th>cosine</th></tr>");
    for x in a.iter().take(30) {
        let st = &x.stats;
        let _ = write!(
            s,
            "<tr><td class=\"{v}\">{v}</td><td>{}</td><td>{}→{}</td><td>{:.3e}</td><td>{}</td><td>{}</td><td>{:.3e}</td><td>{}</td><td>{:.6}</td></tr>",
            esc(an.name(x)),
            x.from, x.to, st.max_abs, st.overflow, st.underflow, st.max_rel_err, db(st.snr_db()), st.cosine(),
            v = x.verdict.as_str()
        );
    }
    s.push_str("</table><h2>Where values fall against the target's range</h2><p>Per tensor, worst first, on a log scale: below half the smallest subnormal a value flushes to zero, between that and the smallest normal it keeps only a few bits, beyond the largest finite value it overflows. The black bar is the tensor's largest magnitude.</p><table id=\"ranges\"><tr><th>name</th><th>cast</th><th>range</th><th>flushed</th><th>subnormal</th><th>overflow</th></tr>");
    for x in a.iter().take(30) {
        let p = &plan.tensors()[x.plan_index];
        let scaled = p.scaled.is_some() || p.dequant.is_some();
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}→{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&an.cat.tensors[p.tensor].name),
            x.from,
            x.to,
            if scaled {
                "scaled: each group has its own range".to_string()
            } else {
                range_strip(x)
            },
            x.stats.underflow,
            x.stats.subnormal,
            x.stats.overflow
        );
    }
    s.push_str("</table>");
}

/// How many tensors each rule decided.
fn rules(plan: &Plan, s: &mut String) {
    s.push_str("<h2>Rules applied</h2><table id=\"rules\"><tr><th>rule</th><th>tensors</th></tr>");
    let mut rules: Vec<(String, usize)> = Vec::new();
    for p in plan.tensors() {
        match rules.iter_mut().find(|r| r.0 == p.reason) {
            Some(r) => r.1 += 1,
            None => rules.push((p.reason.clone(), 1)),
        }
    }
    for (r, n) in &rules {
        let _ = write!(s, "<tr><td>{}</td><td>{n}</td></tr>", esc(r));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers() {
        assert_eq!(layer_of("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(layer_of("encoder.layer.3.output.dense.weight"), Some(3));
        assert_eq!(layer_of("transformer.h.0.attn.c_attn.weight"), Some(0));
        assert_eq!(layer_of("lm_head.weight"), None);
    }

    /// The report of casting to f16 a safetensors file of F32 tensors `(name, values)`.
    fn page(tensors: &[(&str, &[f32])]) -> String {
        let mut header = String::from("{");
        let mut data = Vec::new();
        for (i, (name, v)) in tensors.iter().enumerate() {
            let start = data.len();
            for x in *v {
                data.extend_from_slice(&x.to_le_bytes());
            }
            let _ = write!(
                header,
                "{}\"{name}\":{{\"dtype\":\"F32\",\"shape\":[{}],\"data_offsets\":[{start},{}]}}",
                if i > 0 { "," } else { "" },
                v.len(),
                data.len()
            );
        }
        header.push('}');
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("m.safetensors");
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header.as_bytes());
        file.extend_from_slice(&data);
        std::fs::write(&path, file).unwrap();
        let mut req = super::super::AnalyzeRequest::new(&path);
        req.to = Some("f16".into());
        let an = req.run(&crate::convert::NoProgress).unwrap();
        analysis_page(&an)
    }

    #[test]
    fn per_layer_charts_only_when_something_overflows_or_flushes() {
        let quiet = page(&[
            ("layers.0.w", &[1.0, -2.5, 0.125]),
            ("layers.1.w", &[3.0, 4.0, -0.5]),
        ]);
        assert!(!quiet.contains("values overflowing per layer"), "{quiet}");
        assert!(quiet.contains("<p id=\"no-overflow\">No value overflows"));
        assert!(!quiet.contains("values flushed to zero per layer"));
        assert!(quiet.contains("<p id=\"no-underflow\">"));
        // the SNR chart and the per-layer table stay
        assert!(quiet.contains("id=\"snr-chart\"") && quiet.contains("<h2>Per layer</h2>"));
        let loud = page(&[
            ("layers.0.w", &[1.0, 1e6, 1e-30]),
            ("layers.1.w", &[3.0, 4.0, -0.5]),
        ]);
        assert!(loud.contains("values overflowing per layer"), "{loud}");
        assert!(loud.contains("values flushed to zero per layer"));
        assert!(!loud.contains("no-overflow") && !loud.contains("no-underflow"));
    }
}
