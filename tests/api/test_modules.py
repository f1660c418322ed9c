"""Mixed precision that runs: runnable, cast_module and load_module against real torch,
torchvision and transformers models."""

import pytest
import torch
import torch.nn.functional as F

import weightcast
from conftest import run


def resnet18():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def by_hand(model, x):
    """resnet18 with the convolutions in f32 and `fc` in bf16, written out."""
    m = model
    with torch.no_grad():
        y = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        y = m.layer4(m.layer3(m.layer2(m.layer1(y))))
        y = torch.flatten(m.avgpool(y), 1)
        return F.linear(y.bfloat16(), m.fc.weight.bfloat16(), m.fc.bias.bfloat16())


def test_the_recipes_layer_specific_cast_runs(tmp_path):
    """torch.save(resnet18) converted with --only class:Linear loads back mixed, as planned; its
    forward raises in plain torch, runs once runnable, and equals the same math by hand; the
    same rules applied in memory by cast_module give the same output bit for bit."""
    model = resnet18()
    src, out = tmp_path / "resnet18.pt", tmp_path / "resnet18-mixed.pt"
    torch.save(model, src)
    run("convert", src, "-o", out, "--to", "bf16", "--only", "class:Linear")
    mixed = torch.load(out, weights_only=False).eval()
    assert mixed.fc.weight.dtype == torch.bfloat16 and mixed.conv1.weight.dtype == torch.float32
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match="dtype"):
        with torch.no_grad():
            mixed(x)
    handle = weightcast.runnable(mixed)
    assert handle.mixed and weightcast.runnable(mixed) is handle  # idempotent
    with torch.no_grad():
        got = mixed(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, by_hand(model, x))
    with torch.inference_mode():
        assert torch.equal(mixed(x), got)
    # The invariant: convert + load equals cast_module in memory.
    in_memory = weightcast.cast_module(resnet18(), "bf16", only="class:Linear")
    assert in_memory.fc.weight.dtype == torch.bfloat16
    assert in_memory.layer1[0].bn1.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(in_memory(x), got)
    # remove() undoes it: plain torch refuses again.
    handle.remove()
    with pytest.raises(RuntimeError):
        with torch.no_grad():
            mixed(x)


def test_runnable_leaves_uniform_modules_alone_and_keeps_integer_inputs():
    lin = torch.nn.Linear(4, 2)
    h = weightcast.runnable(lin)
    assert not h.mixed and not lin._forward_pre_hooks
    emb = torch.nn.Sequential(torch.nn.Embedding(10, 4).bfloat16(), torch.nn.Linear(4, 3))
    weightcast.runnable(emb)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        out = emb(ids)  # ids stay integers; the bf16 embedding meets the f32 linear
    want = F.linear(emb[0].weight[ids].float(), emb[1].weight, emb[1].bias)
    assert out.dtype == torch.float32 and torch.equal(out, want)


def test_cast_module_rules_dry_run_overflow_and_ties():
    model = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.LayerNorm(4),
                                torch.nn.Linear(4, 8, bias=False))
    model[2].weight = model[0].weight  # tied, as a language model's head
    plan = weightcast.cast_module(model, "f16", keep="kind:norm", dry_run=True)
    rows = {t.name: t for t in plan.tensors}
    assert rows["1.weight"].to == "F32" and rows["0.weight"].to == "F16"
    assert "2.weight" not in rows  # a tied weight is planned once
    assert model[0].weight.dtype == torch.float32  # dry run: nothing changed
    weightcast.cast_module(model, "f16", keep="kind:norm")
    assert model[2].weight is model[0].weight and model[0].weight.dtype == torch.float16
    assert model[1].weight.dtype == torch.float32
    with torch.no_grad():
        assert model(torch.tensor([1, 2])).dtype == torch.float16
    big = torch.nn.Linear(2, 2)
    with torch.no_grad():
        big.weight[0, 0] = 1e6
    with pytest.raises(weightcast.RefusedError, match='on_overflow="keep"'):
        weightcast.cast_module(big, "f16")
    assert big.weight.dtype == torch.float32
    weightcast.cast_module(big, "f16", on_overflow="clamp")
    assert big.weight[0, 0].item() == 65504.0


def bert_inputs(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return tok(["weights cast to half precision", "a norm kept in float32 stays float32",
                "the quick brown fox"], padding=True, return_tensors="pt")


def test_load_module_keeps_the_stored_dtypes(tmp_path, minilm):
    """A keep-norms folder: transformers' from_pretrained would load every parameter in one
    dtype; load_module keeps the norms in f32, runs, is no worse than all-f16, and equals
    cast_module with the same rules in memory."""
    from transformers import AutoConfig, AutoModel

    mixed_dir, f16_dir = tmp_path / "mixed", tmp_path / "f16"
    run("convert", minilm, "-o", mixed_dir, "--to", "f16", "--preset", "keep-norms")
    run("convert", minilm, "-o", f16_dir, "--to", "f16")
    cfg = AutoConfig.from_pretrained(minilm)
    inputs = bert_inputs(minilm)

    def output(model):
        with torch.no_grad():
            return model(**inputs).last_hidden_state.float()

    reference = output(AutoModel.from_pretrained(minilm, dtype=torch.float32).eval())
    mixed = weightcast.load_module(AutoModel.from_config(cfg).eval(), mixed_dir)
    assert mixed.embeddings.LayerNorm.weight.dtype == torch.float32
    assert mixed.encoder.layer[0].attention.self.query.weight.dtype == torch.float16
    got_mixed = output(mixed)
    plain = weightcast.load_module(AutoModel.from_config(cfg).eval(), f16_dir)
    assert not weightcast.runnable(plain).mixed
    got_f16 = output(plain)
    # Errors over the real tokens (padding positions are not outputs anyone reads); measured:
    # mixed 1.6e-3 max, 3.1e-4 RMS; all-f16 3.5e-3 max, 6.4e-4 RMS.
    real = inputs["attention_mask"].bool()

    def errors(got):
        d = (got - reference)[real]
        return d.abs().max().item(), d.pow(2).mean().sqrt().item()

    (max_mixed, rms_mixed), (max_f16, rms_f16) = errors(got_mixed), errors(got_f16)
    assert torch.isfinite(got_mixed).all()
    assert max_mixed <= max_f16 and rms_mixed <= rms_f16, (max_mixed, rms_mixed, max_f16, rms_f16)
    in_memory = AutoModel.from_pretrained(minilm, dtype=torch.float32).eval()
    weightcast.cast_module(in_memory, "f16", preset="keep-norms")
    assert torch.equal(output(in_memory), got_mixed)


def test_load_module_refuses_names_that_do_not_match(tmp_path):
    from safetensors.torch import save_file

    m = torch.nn.Linear(3, 2)
    f = tmp_path / "w.safetensors"
    save_file({"weight": torch.ones(2, 3).half(), "extra": torch.ones(1)}, f)
    before = m.weight.clone()
    with pytest.raises(weightcast.UsageError, match="missing bias; unexpected extra"):
        weightcast.load_module(m, f)
    assert torch.equal(m.weight, before)  # nothing was loaded
    weightcast.load_module(m, f, strict=False)
    assert m.weight.dtype == torch.float16 and m.bias.dtype == torch.float32
    with torch.no_grad():
        assert m(torch.ones(1, 3)).shape == (1, 2)


# ---------------------------------------------------------------------------------------------
# profile


def t5_with_hot_ffn():
    """A T5 encoder from a small config whose FFN output projections are scaled so that their
    f16 activations exceed 65504 (the reason transformers keeps T5's `wo` in f32), while every
    weight fits f16."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                   feed_forward_proj="relu")
    model = T5EncoderModel(cfg).eval()
    with torch.no_grad():
        for block in model.encoder.block:
            block.layer[-1].DenseReluDense.wo.weight.mul_(1e5)
    assert max(p.abs().max().item() for p in model.parameters()) < 65504
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 100, (2, 12), generator=g)} for _ in range(3)]
    return model, batches


def test_profile_names_the_layer_and_search_keeps_only_it(tmp_path):
    """Weights cannot tell this T5 from a safe one; running it can: the f16 candidate degrades,
    the profile names a `wo` layer as where outputs first went non-finite (and as beyond f16's
    range), the search keeps the two `wo` layers and nothing else, and those rules, through
    convert and load_module, meet the tolerance."""
    model, batches = t5_with_hot_ffn()
    p = weightcast.profile(model, batches, ["f16", "bf16"], search=True,
                           tolerance={"cosine": 0.9999}, repeats=2)
    rows = {r["name"]: r for r in p.candidates}
    assert rows["f16"]["cosine"] < 0.99  # degraded (T5's own clamp keeps it finite)
    assert p.first_nonfinite == {"candidate": "f16",
                                 "module": "encoder.block.0.layer.1.DenseReluDense.wo"}
    hot = {r["module"] for r in p.layers if r["dtype"] == "float16" and r["overflow"]}
    assert "encoder.block.0.layer.1.DenseReluDense.wo" in hot
    searched = [r for r in p.candidates if r["name"].startswith("f16 keeping")]
    assert len(searched) == 1, [r["name"] for r in p.candidates]
    kept = searched[0]["kept_modules"]
    assert sorted(kept) == [f"encoder.block.{i}.layer.1.DenseReluDense.wo" for i in (0, 1)]
    assert searched[0]["cosine"] >= 0.9999 and searched[0]["nonfinite"] == 0
    assert searched[0]["bytes_saved"] == rows["reference"]["weight_bytes"] - searched[0]["weight_bytes"] > 0
    assert 0 < p.search_passes <= 32
    with pytest.raises(weightcast.UsageError, match="tolerance cosin"):
        weightcast.profile(model, batches, ["f16"], tolerance={"cosin": 0.9}, timing=False)
    with pytest.raises(weightcast.UsageError, match="f17"):
        weightcast.profile(model, batches, ["f17"], timing=False)
    # Consistency of the figures.
    for r in p.candidates:
        lat = r["latency_ms"]
        assert lat["p50"] <= lat["p90"] <= lat["p99"], r
        assert r["peak_memory_bytes"] >= r["weight_bytes"] > 0
    assert rows["f16"]["weight_bytes"] * 2 == rows["reference"]["weight_bytes"]
    # The rules, through the converter and load_module.
    rules = tmp_path / "rules.toml"
    p.save_rules(rules, searched[0]["name"])
    folder = tmp_path / "t5"
    model.save_pretrained(folder)
    run("convert", folder, "-o", tmp_path / "t5-mixed", "--rules", rules)
    from transformers import T5EncoderModel

    loaded = weightcast.load_module(T5EncoderModel(model.config).eval(), tmp_path / "t5-mixed")
    wo = loaded.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert wo.dtype == torch.float32
    assert loaded.encoder.block[0].layer[1].DenseReluDense.wi.weight.dtype == torch.float16
    with torch.no_grad():
        for b in batches:
            want = model(**b).last_hidden_state.double().flatten()
            got = loaded(**b).last_hidden_state.double().flatten()
            assert F.cosine_similarity(want, got, dim=0) >= 0.9999
    # What the table and the frame say.
    assert "first non-finite: encoder.block.0.layer.1.DenseReluDense.wo" in str(p)
    assert list(p.to_pandas()["name"])[:2] == ["reference", "f16"]


def test_profile_of_a_cnn_the_converter_refuses(tmp_path):
    """BatchNorm statistics beyond f16's range: convert refuses f16; with --on-overflow keep the
    model loads mixed and runs, and the profile compares the task (how often the class
    changes, with its bootstrap interval) instead of judging from the weights."""
    model = resnet18()
    with torch.no_grad():
        model.layer1[0].bn1.running_var.mul_(1e6)  # ~1e6: beyond 65504
        model.layer1[0].conv1.weight.mul_(1e3)     # ... and the activations it normalizes
    src = tmp_path / "cnn.pt"
    torch.save(model, src)
    p = run("convert", src, "-o", tmp_path / "cnn16.pt", "--to", "f16", check=False)
    assert p.returncode == 1 and "would overflow" in p.stderr
    run("convert", src, "-o", tmp_path / "cnn16.pt", "--to", "f16", "--on-overflow", "keep")
    mixed = torch.load(tmp_path / "cnn16.pt", weights_only=False).eval()
    assert mixed.layer1[0].bn1.running_var.dtype == torch.float32
    assert mixed.layer1[0].bn1.weight.dtype == torch.float16
    weightcast.runnable(mixed)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(4)]
    with torch.no_grad():
        assert torch.isfinite(mixed(batches[0]).float()).all()

    def changed(ref, out, batch):
        return float((ref.argmax(-1) != out.argmax(-1)).float().mean())

    prof = weightcast.profile(model, batches, [{"to": "f16", "on_overflow": "keep"}],
                              metric=changed, repeats=1, layers=False)
    row = prof.candidates[1]
    assert row["nonfinite"] == 0 and row["cosine"] > 0.99
    lo, hi = row["metric_ci"]
    assert lo <= row["metric"] <= hi and 0.0 <= row["metric"] <= 1.0
    # What the device does with f16, from what the CPU reports (the measured speed beside it).
    flags = open("/proc/cpuinfo").read()
    want = "reports f16 arithmetic" if "avx512_fp16" in flags else "f16 is emulated"
    assert want in row["support"], row["support"]


def test_profile_from_the_command_line(tmp_path, minilm):
    """The wheel's `weightcast profile` on a model folder: JSON, a search, rules that convert
    reads; a folder without a tokenizer says what it needs; the Rust binary says where the
    command lives."""
    import json
    import pathlib
    import subprocess
    import sys

    cli = pathlib.Path(sys.executable).parent / "weightcast"
    rules = tmp_path / "rules.toml"
    p = subprocess.run([str(cli), "profile", str(minilm), "--dtypes", "f16,bf16", "--json",
                        "--repeats", "1", "--search", "--tolerance", "cosine=0.99999",
                        "--rules-out", str(rules), "--report", str(tmp_path / "p.html")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert 'id="headroom"' in (tmp_path / "p.html").read_text()
    doc = json.loads(p.stdout)
    names = [c["name"] for c in doc["candidates"]]
    assert names[:3] == ["reference", "f16", "bf16"] and doc["recommended"] in names
    assert rules.read_text().startswith('to = "')
    run("convert", minilm, "-o", tmp_path / "out", "--rules", rules)
    (tmp_path / "bare").mkdir()
    for f in ("config.json", "model.safetensors"):  # weights, but no tokenizer
        (tmp_path / "bare" / f).symlink_to(minilm / f)
    p = subprocess.run([str(cli), "profile", str(tmp_path / "bare")], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 2 and "needs images or audio" in p.stderr
    p = run("profile", minilm, check=False)
    assert p.returncode == 2 and "Python package" in p.stderr


def test_profile_report_renders(tmp_path):
    """The profile's HTML page as a browser shows it (Chromium, headless): the candidates, the
    module named as the first non-finite, the headroom chart with the f16 limit line, the
    latency bars."""
    import shutil
    import subprocess

    model, batches = t5_with_hot_ffn()
    p = weightcast.profile(model, batches, ["f16", "bf16"], repeats=1)
    page = tmp_path / "profile.html"
    p.report(page)
    html = page.read_text()
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org", "")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("chromium is not installed (scripts/test installs it)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=120).stdout
    assert "encoder.block.0.layer.1.DenseReluDense.wo (f16)" in dom
    assert 'id="headroom"' in dom and "float16 max finite (2^16)" in dom
    n_modules = len({r["module"] for r in p.layers if r["max_abs"] > 0})
    assert dom.count("<rect") >= n_modules + 3, "a bar per module and per candidate"
    assert all(f"<td>{c['name']}</td>" in dom for c in p.candidates)


def timed_rows(p50s, cosines, weights):
    """Synthetic profile rows (the reference first): what recommend reads, no measuring."""
    return [{"name": name, "cosine": cos, "nonfinite": 0, "max_abs": 0.0, "metric": None,
             "weight_bytes": w, "support": None,
             "latency_ms": None if p50 is None else {"p50": p50, "p90": p50, "p99": p50}}
            for (name, p50), cos, w in zip(p50s, cosines, weights)]


def test_profile_recommendation_states_its_objective_and_flags_slower_candidates():
    """From synthetic timings (so nothing depends on this machine's speed): the recommendation
    says what it optimised (weight bytes within the tolerance), every candidate whose p50 is
    above the reference's is flagged, in the dict and under the table, by how much; of equal
    weights the faster is recommended; a lone candidate recommended although slower is named
    as such; untimed rows are not judged; with none within the tolerance, none is
    recommended."""
    from weightcast._profile import Profile
    from weightcast._profile.recommend import recommend

    def judged(rows, tolerance=None):
        d = {"candidates": rows, "first_nonfinite": None, "tolerance": tolerance or {}}
        d.update(recommend(rows, tolerance or {"cosine": 0.999}, False))
        return d, str(Profile(d, {}))

    # f16 14.4x slower (no f16 arithmetic on this CPU), bf16 a little faster, both within.
    rows = timed_rows([("reference", 2.5), ("f16", 35.9), ("bf16", 2.4)],
                      [1.0, 0.99999, 0.9995], [400, 200, 200])
    d, text = judged(rows)
    by = {r["name"]: r for r in d["candidates"]}
    assert d["objective"] == "weight_bytes"
    assert "fewest weight bytes within the tolerance (cosine >= 0.999" in d["recommended_for"]
    assert by["f16"]["slower_than_reference"] is True
    assert by["bf16"]["slower_than_reference"] is False
    assert by["f16"]["latency_ratio"] == pytest.approx(35.9 / 2.5)
    assert "14.4x slower than the reference" in by["f16"]["support"]
    assert d["recommended"] == "bf16", "same bytes: the faster one"
    assert "note: f16 is 14.4x slower than the reference on this machine" in text
    assert "recommended: bf16, for the fewest weight bytes within the tolerance" in text
    assert "note: bf16" not in text
    # Only f16 within the tolerance: recommended for its bytes, and said to be slower.
    rows = timed_rows([("reference", 2.5), ("f16", 35.9), ("bf16", 2.4)],
                      [1.0, 0.99999, 0.99], [400, 200, 200])
    d, text = judged(rows)
    assert d["recommended"] == "f16"
    assert "note: f16 (recommended) is 14.4x slower than the reference on this machine" in text
    # A p50 just above the reference's is flagged too; an untimed one is not judged.
    rows = timed_rows([("reference", 2.5), ("f16", 2.51), ("bf16", None)],
                      [1.0, 0.99999, 0.9995], [400, 200, 200])
    d, text = judged(rows)
    assert [r["slower_than_reference"] for r in d["candidates"]] == [False, True, None]
    assert "note: f16 (recommended) is 0.4% slower than the reference" in text
    # Nothing within the tolerance: no recommendation, and what was required.
    d, text = judged(rows, {"cosine": 0.999999})
    assert d["recommended"] is None
    assert "recommended: none: no candidate is within cosine >= 0.999999" in text


def test_profile_command_states_the_objective_without_transformers_load_report(tmp_path):
    """`weightcast profile examples/tiny-bert`: transformers prints a load report for this folder
    (its pooler is not in the weights) when it loads it; the command's output holds none of it
    (nor transformers' progress bar), states what the recommendation optimised, and flags each
    candidate whose p50 is above the reference's, in the JSON and under the table."""
    import json
    import pathlib
    import subprocess
    import sys

    from conftest import ROOT

    tiny = ROOT / "examples" / "tiny-bert"
    # What transformers' report says (5.x: a LOAD REPORT table; 4.x: "Some weights ... newly
    # initialized"), and its progress bar.
    report = ("LOAD REPORT", "MISSING", "newly initialized", "Loading weights")
    # transformers itself reports the missing pooler: the assertions below can fail.
    plain = subprocess.run([sys.executable, "-c", "import sys; from transformers import AutoModel; "
                            "AutoModel.from_pretrained(sys.argv[1])", str(tiny)],
                           capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0 and "pooler" in plain.stderr, plain.stderr
    cli = pathlib.Path(sys.executable).parent / "weightcast"
    p = subprocess.run([str(cli), "profile", str(tiny), "--dtypes", "f16,bf16", "--repeats", "1",
                        "--json"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert "pooler" not in p.stderr, p.stderr  # (the JSON's layers name the pooler's module)
    assert not any(r in p.stdout + p.stderr for r in report), (p.stdout, p.stderr)
    assert doc["objective"] == "weight_bytes" and "fewest weight bytes" in doc["recommended_for"]
    ref = doc["candidates"][0]["latency_ms"]["p50"]
    for c in doc["candidates"][1:]:
        assert c["slower_than_reference"] == (c["latency_ms"]["p50"] > ref), c
    p = subprocess.run([str(cli), "profile", str(tiny), "--dtypes", "f16,bf16", "--repeats", "1"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    out = p.stdout + p.stderr
    assert "pooler" not in out and not any(r in out for r in report), out
    assert "recommended: " in p.stdout and "fewest weight bytes within the tolerance" in p.stdout
    p50 = {line.split()[0]: float(line.split()[-2]) for line in p.stdout.splitlines()[1:4]}
    for name in ("f16", "bf16"):
        slower = f"note: {name} is " in p.stdout or f"note: {name} (recommended) is " in p.stdout
        if abs(p50[name] - p50["reference"]) > 0.01:  # the table rounds to 0.01 ms
            assert slower == (p50[name] > p50["reference"]), (name, p.stdout)
