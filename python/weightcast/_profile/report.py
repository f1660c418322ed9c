"""What a profile says to a reader: the text table (``str(profile)``), with the recommendation
and the candidates slower than the reference, and the HTML page (``profile.report(path)``): the
candidates' table, each module's output range against the dtypes' limits, the latencies."""

import math
from typing import Any, Dict, List

from .recommend import slower


def text_table(d: Dict[str, Any]) -> str:
    """The candidates as a table, the first non-finite module, the recommendation and what it
    is for, and a note for each candidate slower than the reference on this machine."""
    rows = [["candidate", "cosine", "max abs", "non-finite", "metric", "p50 ms", "weights"]]
    for c in d["candidates"]:
        m = c.get("metric")
        rows.append([c["name"], f"{c['cosine']:.6f}", f"{c['max_abs']:.3g}",
                     str(c["nonfinite"]), "" if m is None else f"{m:.4g}",
                     "" if c["latency_ms"] is None else f"{c['latency_ms']['p50']:.2f}",
                     str(c["weight_bytes"])])
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    text = "\n".join("  ".join(x.ljust(w[i]) for i, x in enumerate(r)) for r in rows)
    f = d.get("first_nonfinite")
    if f:
        text += f"\nfirst non-finite: {f['module']} ({f['candidate']})"
    rec = d.get("recommended")
    if rec is None:
        text += f"\nrecommended: none: no candidate is within {d.get('bounds')}"
    else:
        text += f"\nrecommended: {rec}, for {d.get('recommended_for')}"
    ref = d["candidates"][0]
    for c in d["candidates"][1:]:
        if c.get("slower_than_reference"):
            name = f"{c['name']} (recommended)" if c["name"] == rec else c["name"]
            text += (f"\nnote: {name} is {slower(c['latency_ratio'])} than the "
                     f"reference on this machine (p50 {c['latency_ms']['p50']:.2f} ms "
                     f"against {ref['latency_ms']['p50']:.2f} ms)")
    return text


def _esc(x: Any) -> str:
    return (str(x).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def _headroom_svg(layers: List[Dict[str, Any]]) -> str:
    """log2 of each module's largest output magnitude, in execution order, with the largest
    finite value and the smallest normal of each dtype as lines."""
    import torch

    mods: List[str] = []
    peak: Dict[str, float] = {}
    for r in layers:
        if r["module"] not in peak and r["max_abs"] > 0:
            mods.append(r["module"])
            peak[r["module"]] = math.log2(r["max_abs"])
    dtypes = sorted({r["dtype"] for r in layers})
    limits = []
    for d in dtypes:
        fi = torch.finfo(getattr(torch, d))
        limits.append((d, math.log2(fi.max), math.log2(fi.tiny)))
    if not mods:
        return "<p>No module output to chart.</p>"
    top = max(max(peak.values()), *(m for _, m, _ in limits if m < 200)) + 2
    low = min(min(peak.values()), -20) - 2
    w, h, left = max(600, 8 * len(mods) + 80), 320, 60

    def y(v: float) -> float:
        v = max(low, min(top, v))
        return 10 + (top - v) / (top - low) * (h - 40)

    out = [f'<svg id="headroom" width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">']
    step = (w - left - 10) / len(mods)
    for i, m in enumerate(mods):
        x = left + i * step
        over = any(r["module"] == m and r["overflow"] for r in layers)
        out.append(f'<rect x="{x:.1f}" y="{y(peak[m]):.1f}" width="{max(step - 1, 1):.1f}" '
                   f'height="{y(low) - y(peak[m]):.1f}" fill="{"#c33" if over else "#4a7"}">'
                   f'<title>{_esc(m)}: max |x| = 2^{peak[m]:.1f}</title></rect>')
    colors = ["#a33", "#36a", "#a60", "#555"]
    for k, (d, big, tiny) in enumerate(limits):
        c = colors[k % len(colors)]
        for v, what in ((big, "max finite"), (tiny, "smallest normal")):
            if low <= v <= top:
                out.append(f'<line x1="{left}" x2="{w - 10}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                           f'stroke="{c}" stroke-dasharray="4 3"/><text x="{w - 12}" '
                           f'y="{y(v) - 3:.1f}" text-anchor="end" font-size="11" fill="{c}">'
                           f'{_esc(d)} {what} (2^{v:.0f})</text>')
    out.append(f'<text x="4" y="{y(top - 2) + 4:.1f}" font-size="11">log2 max|x|</text></svg>')
    return "".join(out)


def _latency_svg(rows: List[Dict[str, Any]]) -> str:
    timed = [r for r in rows if r.get("latency_ms")]
    if not timed:
        return "<p>Not timed.</p>"
    big = max(r["latency_ms"]["p99"] for r in timed) or 1.0
    w, bar = 600, 22
    out = [f'<svg id="latency" width="{w}" height="{bar * len(timed) + 10}" '
           f'xmlns="http://www.w3.org/2000/svg">']
    for i, r in enumerate(timed):
        lat = r["latency_ms"]
        y = 5 + i * bar
        wid = 380 * lat["p50"] / big
        out.append(f'<text x="0" y="{y + 14}" font-size="12">{_esc(r["name"])[:28]}</text>'
                   f'<rect x="200" y="{y + 3}" width="{wid:.1f}" height="{bar - 8}" fill="#36a">'
                   f'<title>p50 {lat["p50"]:.2f} ms, p90 {lat["p90"]:.2f}, p99 '
                   f'{lat["p99"]:.2f}</title></rect><text x="{205 + wid:.1f}" y="{y + 14}" '
                   f'font-size="11">{lat["p50"]:.2f} ms</text>')
    out.append("</svg>")
    return "".join(out)


def html_page(d: Dict[str, Any]) -> str:
    """The HTML page of a profile's dict: self-contained (inline SVG, no script, no network)."""
    rows = d["candidates"]
    head = ("<tr><th>candidate</th><th>cosine</th><th>max abs</th><th>max rel</th>"
            "<th>top-1</th><th>non-finite</th><th>metric</th><th>p50 ms</th><th>weights</th>"
            "<th>note</th></tr>")
    body = []
    for r in rows:
        m, ci, top1, lat = r.get("metric"), r.get("metric_ci"), r.get("top1"), r.get("latency_ms")
        metric = "" if m is None else f"{m:.4g}" + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "")
        cells = [_esc(r["name"]), f"{r['cosine']:.6f}", f"{r['max_abs']:.3g}",
                 f"{r['max_rel']:.3g}", "" if top1 is None else f"{top1:.4f}",
                 str(r["nonfinite"]), metric, "" if not lat else f"{lat['p50']:.2f}",
                 str(r["weight_bytes"]), _esc(r.get("support") or "")]
        cls = "rec" if r["name"] == d["recommended"] else ""
        body.append(f'<tr class="{cls}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    f = d.get("first_nonfinite")
    cards = [("recommended", d.get("recommended") or "none meets the tolerance"),
             ("objective", (d.get("objective") or "").replace("_", " ")),
             ("first non-finite", f"{f['module']} ({f['candidate']})" if f else "none"),
             ("tolerance", ", ".join(f"{k} {v}" for k, v in d["tolerance"].items())),
             ("forward passes", str(d.get("search_passes")))]
    card = "".join(f'<div class="card">{_esc(k)}<b>{_esc(v)}</b></div>' for k, v in cards)
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>weightcast profile'
        '</title><style>body{font:14px system-ui,sans-serif;margin:2em;max-width:1100px;'
        'color:#222}table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px '
        'solid #ddd;text-align:right}td:first-child,th:first-child{text-align:left}'
        'tr.rec{background:#eef6ee}.cards{display:flex;gap:1em;flex-wrap:wrap}'
        '.card{border:1px solid #ccc;border-radius:6px;padding:.6em 1em}.card b{display:block;'
        'font-size:18px}</style></head><body><h1>What each precision does to the model</h1>'
        f'<p>{d["inputs"]} batches on {_esc(d["device"])}, against the reference in '
        f'{_esc(d["reference"]["dtype"])}.</p><div class="cards">{card}</div>'
        f'<h2>Candidates</h2><table id="candidates">{head}{"".join(body)}</table>'
        '<h2>Each module\'s output against the dtypes\' range</h2><p>The largest magnitude of '
        'each module\'s output in the reference run, in execution order, on a log2 scale; red: '
        'beyond a candidate dtype\'s largest finite value.</p>'
        f'{_headroom_svg(d["layers"])}<h2>Latency per batch (p50)</h2>'
        f'{_latency_svg(rows)}<p>Made by weightcast.</p></body></html>\n')
