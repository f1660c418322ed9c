"""Precision safety: `analyze` figures against numpy (float64), overflow/underflow policies in
`convert`, `--auto`, `diff`, and the HTML report rendered by headless Chromium."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run

TORCH = {"f16": torch.float16, "bf16": torch.bfloat16, "f8e4m3": torch.float8_e4m3fn,
         "f8e5m2": torch.float8_e5m2}
MIN_NORMAL = {"f16": 2.0**-14, "bf16": 2.0**-126, "f8e4m3": 2.0**-6, "f8e5m2": 2.0**-14}


def analyze(path, to, *extra):
    return json.loads(run("analyze", path, "--to", to, "--json", *extra).stdout)


def numpy_figures(x: torch.Tensor, to: str) -> dict:
    """The reference: torch casts, numpy computes every figure in float64."""
    y = x.to(TORCH[to]).to(torch.float64).numpy().ravel()
    x = x.to(torch.float64).numpy().ravel()
    fin = np.isfinite(x)
    both = fin & np.isfinite(y)
    xs, ys = x[both], y[both]
    err = ys - xs
    nz = xs != 0
    rel = np.abs(err[nz]) / np.abs(xs[nz])
    sxx, syy, sdot = (xs * xs).sum(), (ys * ys).sum(), (xs * ys).sum()
    nonfinite = int((fin & ~np.isfinite(y)).sum())
    if nonfinite:
        # A finite value that became inf or NaN makes every error figure infinite (JSON null)
        # and the cosine NaN (null): the tensor no longer computes.
        return {
            "overflow": int((fin & ~np.isfinite(y)).sum()), "nonfinite": nonfinite,
            "underflow": int((fin & (x != 0) & (y == 0)).sum()),
            "subnormal": int(((y != 0) & (np.abs(y) < MIN_NORMAL[to])).sum()),
            "max_abs": float(np.abs(x[fin]).max()),
            **{k: None for k in ["max_abs_err", "max_rel_err", "mean_rel_err", "rms_err",
                                 "snr_db", "cosine"]},
        }
    return {
        "nonfinite": 0,
        "overflow": int((fin & ((~np.isfinite(y)) | ((to == "f8e4m3") & (np.abs(x) >= 464))))
                        .sum()),
        "underflow": int((fin & (x != 0) & (y == 0)).sum()),
        "subnormal": int(((y != 0) & (np.abs(y) < MIN_NORMAL[to])).sum()),
        "max_abs": float(np.abs(x[fin]).max()) if fin.any() else 0.0,
        "max_abs_err": float(np.abs(err).max()) if err.size else 0.0,
        "max_rel_err": float(rel.max()) if rel.size else 0.0,
        "mean_rel_err": float(rel.mean()) if rel.size else 0.0,
        "rms_err": float(np.sqrt((err * err).mean())) if err.size else 0.0,
        "snr_db": float(10 * np.log10(sxx / (err * err).sum())) if (err * err).sum() else None,
        "cosine": float(sdot / np.sqrt(sxx * syy)) if sxx and syy else 1.0,
    }


def check(got: dict, want: dict, name: str):
    for k in ["overflow", "nonfinite", "underflow", "subnormal"]:
        assert got[k] == want[k], f"{name} {k}: {got[k]} != {want[k]}"
    for k in ["max_abs", "max_abs_err", "max_rel_err", "mean_rel_err", "rms_err", "snr_db", "cosine"]:
        if want[k] is None:
            assert got[k] is None, f"{name} {k}"
        else:
            assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-300), f"{name} {k}"


def test_synthetic_known_counts(tmp_path):
    f = tmp_path / "s.safetensors"
    save_file({
        "big": torch.tensor([1e5, -2e5, 1.0, 65504.0, 65519.0, 65520.0]),
        "tiny": torch.tensor([1e-9, -1e-9, 1e-6, 6e-8, 1.0, 0.0]),
        "special": torch.tensor([float("nan"), float("inf"), 2.0]),
        "fp8": torch.tensor([500.0, 449.0, 1000.0, -1e4, 1.0]),
        "bf16": torch.tensor([1e5, 7e4, 1.0]).bfloat16(),
        "ints": torch.arange(4),
    }, f)
    a = {t["name"]: t for t in analyze(f, "f16")["tensors"]}
    assert "ints" not in a, "integers are never cast, so never analysed"
    assert a["big"]["overflow"] == 3 and a["big"]["verdict"] == "overflow"
    assert (a["tiny"]["underflow"], a["tiny"]["subnormal"]) == (2, 2)
    assert a["tiny"]["verdict"] == "underflow"
    assert (a["special"]["nan_in"], a["special"]["inf_in"], a["special"]["overflow"]) == (1, 1, 0)
    assert a["bf16"]["overflow"] == 2, "bf16 beyond the f16 range is range-checked"
    p = {t["name"]: t for t in analyze(f, "f8e4m3")["tensors"]}
    assert p["fp8"]["overflow"] == 3, "500, 1000 and -1e4 saturate; 449 rounds to 448"
    assert p["fp8"]["max_abs"] == 1e4
    w = analyze(f, "f64")
    assert {t["verdict"] for t in w["tensors"]} == {"exact"}, "widening is exact and says so"
    assert all(t["snr_db"] is None for t in w["tensors"])
    for name, t in load_file(f).items():
        if name in a:
            check(a[name], numpy_figures(t, "f16"), name)


@pytest.mark.parametrize("to", ["f16", "bf16", "f8e4m3"])
def test_minilm_figures_match_numpy(minilm, to):
    got = {t["name"]: t for t in analyze(minilm, to)["tensors"]}
    src = load_file(minilm / "model.safetensors")
    assert len(got) == sum(1 for t in src.values() if t.is_floating_point())
    for name, x in src.items():
        if x.is_floating_point():
            check(got[name], numpy_figures(x, to), name)


def overflow_model(tmp_path):
    f = tmp_path / "m.safetensors"
    save_file({"ok": torch.randn(64), "hot": torch.tensor([1.0, 7e4, -1e5, 2.0]),
               "fp8hot": torch.tensor([1.0, 600.0])}, f)
    return f


def test_on_overflow_error_writes_nothing(tmp_path):
    f = overflow_model(tmp_path)
    out = tmp_path / "o.safetensors"
    p = run("convert", f, "-o", out, "--to", "f16", check=False)
    assert p.returncode == 1
    assert "`hot` (2 values beyond F16)" in p.stderr and "nothing was written" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not out.exists() and sorted(x.name for x in tmp_path.iterdir()) == ["m.safetensors"]
    p = run("convert", f, "-o", out, "--to", "f8e4m3", check=False)
    assert p.returncode == 1 and "`fp8hot` (1 values beyond F8_E4M3)" in p.stderr


def test_on_overflow_keep_clamp_allow(tmp_path):
    f = overflow_model(tmp_path)
    src = load_file(f)
    o = tmp_path / "keep.safetensors"
    p = run("convert", f, "-o", o, "--to", "f16", "--on-overflow", "keep")
    assert "1 tensor(s) kept" in p.stderr
    got = load_file(o)
    assert got["hot"].dtype == torch.float32 and torch.equal(got["hot"], src["hot"])
    assert got["ok"].dtype == torch.float16 and torch.equal(got["ok"], src["ok"].half())
    o = tmp_path / "clamp.safetensors"
    p = run("convert", f, "-o", o, "--to", "f16", "--on-overflow", "clamp")
    assert "2 values in 1 tensor(s) clamped" in p.stderr
    assert load_file(o)["hot"].tolist() == [1.0, 65504.0, -65504.0, 2.0]
    o = tmp_path / "allow.safetensors"
    p = run("convert", f, "-o", o, "--to", "f16", "--on-overflow", "allow")
    assert torch.equal(load_file(o)["hot"], src["hot"].half()), "exactly torch: inf"
    p = run("convert", f, "-o", o, "--to", "f16", "--on-overflow", "nope", check=False)
    assert p.returncode == 2


def test_max_underflow(tmp_path):
    f = tmp_path / "u.safetensors"
    save_file({"tiny": torch.full((100,), 1e-9), "fine": torch.randn(100)}, f)
    o = tmp_path / "o.safetensors"
    p = run("convert", f, "-o", o, "--to", "f16", "--max-underflow", "0.01")
    assert "1 tensor(s) kept" in p.stderr
    got = load_file(o)
    assert got["tiny"].dtype == torch.float32 and got["fine"].dtype == torch.float16


def test_auto_picks_per_tensor(tmp_path):
    f = tmp_path / "a.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({
        "exact_in_fp8": torch.tensor([1.0, 2.0, 0.5, -4.0] * 64),   # fp8 represents these exactly
        "normal": torch.randn(4096, generator=g),                   # fp8 ~31 dB, bf16 ~50, f16 ~70
        "wide": torch.tensor([1e5, 1.0, 3.3e-5] * 64),                # f16 overflows; bf16 fits
        "keep_me": torch.randn(16, generator=g),
    }, f)
    def plan(snr):
        p = run("convert", f, "-o", tmp_path / "x.safetensors", "--to", "f8e4m3,bf16,f16",
                "--auto", snr, "--keep", "keep_me", "--dry-run", "--json")
        return {t["name"]: t for t in json.loads(p.stdout)["tensors"]}
    p = plan("40")
    assert p["exact_in_fp8"]["to"] == "F8_E4M3"
    assert p["normal"]["to"] == "BF16"
    assert p["wide"]["to"] == "BF16"
    assert p["keep_me"]["to"] == "F32", "rules still apply under --auto"
    p = plan("60")
    assert p["normal"]["to"] == "F16"
    assert p["wide"]["to"] == "F32", "no candidate keeps 60 dB without overflow"
    o = tmp_path / "auto.safetensors"
    run("convert", f, "-o", o, "--to", "f8e4m3,bf16,f16", "--auto", "40")
    assert load_file(o)["normal"].dtype == torch.bfloat16
    r = run("convert", f, "-o", o, "--to", "f8e4m3,bf16", "--force", check=False)
    assert r.returncode == 2 and "needs --auto" in r.stderr


def test_diff(minilm, tmp_path):
    f16 = tmp_path / "f16"
    run("convert", minilm, "-o", f16, "--to", "f16")
    d = json.loads(run("diff", minilm, f16, "--json").stdout)
    assert d["ok"] and not d["only_a"] and not d["only_b"]
    a = {t["name"]: t for t in analyze(minilm, "f16")["tensors"]}
    for c in d["common"]:
        if c["name"] in a:
            assert c["a_dtype"] == "F32" and c["b_dtype"] == "F16"
            want = a[c["name"]]["snr_db"]
            assert c["snr_db"] == (None if want is None else pytest.approx(want, rel=1e-9))
        else:
            assert c["identical"] is True  # position_ids
    same = json.loads(run("diff", minilm, minilm, "--json", "--tolerance", "200").stdout)
    assert same["ok"] and all(c.get("snr_db", None) is None for c in same["common"])
    p = run("diff", minilm, f16, "--tolerance", "80", check=False)
    assert p.returncode == 1 and "FAIL" in p.stdout
    # a missing tensor fails
    part = tmp_path / "part.safetensors"
    t = load_file(minilm / "model.safetensors")
    t.pop("pooler.dense.bias")
    save_file(t, part)
    p = run("diff", minilm / "model.safetensors", part, check=False)
    assert p.returncode == 1 and "`pooler.dense.bias` is only in A" in p.stdout


def test_html_report_content(minilm, tmp_path):
    """What the page says, read from the HTML itself (no browser needed)."""
    report = tmp_path / "r.html"
    a = analyze(minilm, "f8e4m3", "--report", report, "--preset", "keep-norms")
    html = report.read_text()
    # SNR bars coloured against the lossy line (MiniLM's ~31 dB in e4m3 is below 40 dB), the
    # line drawn, the rules named, and a range picture per tensor with the target's bounds
    assert 'id="lossy-line"' in html and "lossy below 40 dB" in html
    assert html.count('class="snr-lossy"') == 7 and 'class="snr-ok"' not in html
    assert "preset keep-norms" in html and "--to float8_e4m3fn" in html
    assert html.count('class="range"') == 30 and html.count('class="maxabs"') == 30
    assert "min subnormal 2.0e-3" in html and "max 4.5e2" in html
    high = tmp_path / "high.html"
    analyze(minilm, "f16", "--report", high, "--lossy-below", "20")
    assert 'class="snr-ok"' in high.read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html
    snr = a["totals"]["model"]["snr_db"]
    assert f"{snr:.1f} dB" in html, "the model SNR is on the page"
    assert a["tensors"][0]["name"] in html and html.count("<rect") >= 3 * 7, \
        "the worst tensor, and three charts of 7 layer groups"


def test_html_report_renders(minilm, tmp_path):
    """What a browser shows: the rendered DOM and a screenshot (Chromium, headless)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("chromium is not installed (scripts/test installs it)")
    report = tmp_path / "r.html"
    a = analyze(minilm, "f8e4m3", "--report", report, "--preset", "keep-norms")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", report.as_uri()], capture_output=True,
                         text=True, timeout=120).stdout
    snr = a["totals"]["model"]["snr_db"]
    assert f"{snr:.1f} dB" in dom, "the model SNR is on the rendered page"
    worst = a["tensors"][0]["name"]
    assert worst in dom and dom.count("<rect") >= 3 * 7, "three charts of 7 layer groups"
    png = tmp_path / "r.png"
    subprocess.run([chromium, *flags, "--window-size=1200,1600", f"--screenshot={png}",
                    report.as_uri()], capture_output=True, timeout=120)
    from PIL import Image  # noqa: PLC0415
    img = Image.open(png).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 20, "the page drew charts and text, not a blank"
