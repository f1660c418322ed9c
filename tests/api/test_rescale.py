"""weightcast.rescale: for every family in the symmetry table, a model built from a small config
with activations planted beyond f16 (tests/api/rescale_models.py): plain f16 breaks, the
rescaled model in f32 equals the original (its relative difference printed), in f16 it is
finite and meets the tolerance plain f16 meets on the same model without the planted values.
Then the files: the rules convert applies, loaded by transformers in f16 with nothing of
weightcast, equal to the in-memory cast bit for bit; GGUF from the rescaled folder; the
command line; the profile candidate; a real model without overflow left as it was."""

import copy
import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import weightcast  # noqa: E402

import rescale_models as rm  # noqa: E402
from conftest import run  # noqa: E402

DECODERS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"]
# (model type, gated feed-forward, tied head)
T5S = [("t5", False, True), ("t5", True, False), ("mt5", True, False), ("umt5", True, False)]
TOLERANCE = 0.9999  # cosine of the logits against f32


def _report(name, r, clean):
    p = r.proof
    print(f"{name}: alpha {r.alpha}, {len(r.factors)} factors; rescaled f32 vs original: max "
          f"relative difference {p['f32']['max_rel_diff']:.3g}; f16 cosine "
          f"{p['target']['cosine']:.7f} (plain f16 {p['plain']['cosine']:.7f}, plain f16 on the "
          f"model without the planted values {clean.proof['plain']['cosine']:.7f})")


def _assert_fits(r, clean):
    p = r.proof
    assert p["f32"]["max_rel_diff"] <= 1e-6, p["f32"]
    assert p["target"]["nonfinite"] == 0, p["target"]
    assert r.unreachable == []
    assert clean.proof["plain"]["cosine"] >= TOLERANCE  # the tolerance plain f16 meets
    assert p["target"]["cosine"] >= TOLERANCE, p["target"]
    assert p["target"]["top1"] == pytest.approx(1.0)
    assert r.ok


FAMILIES = [pytest.param(lambda mt=mt, **k: rm.decoder(mt, **k), rm.batches, "rms_norm_eps",
                         id=mt) for mt in DECODERS]
FAMILIES += [pytest.param(lambda mt=mt, **k: rm.moe(mt, **k), rm.batches, "rms_norm_eps", id=mt)
             for mt in ("qwen2_moe", "qwen3_moe", "mixtral")]
FAMILIES += [pytest.param(rm.vit, rm.images, "layer_norm_eps", id="vit")]


@pytest.mark.parametrize("make,inputs,eps", FAMILIES)
def test_pre_norm_families_fit_f16_exactly(make, inputs, eps, request):
    batches = inputs()
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = weightcast.rescale(model, batches, to="f16")
    clean = weightcast.rescale(make(plant=False), batches, to="f16")
    _report(request.node.callspec.id, r, clean)
    assert r.proof["plain"]["nonfinite"] > 0  # the planted values break plain f16
    assert r.stream_max > 65504
    _assert_fits(r, clean)
    assert r.alpha < 1 and r.stream_max * r.alpha <= r.limit
    assert r.config == {eps: getattr(model.config, eps) * r.alpha ** 2}
    # The module given is not changed.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Nothing to do on the model without the planted values.
    assert clean.alpha == 1.0 and clean.factors == {} and clean.config == {}


@pytest.mark.parametrize("model_type", ["llama", "gemma"])
def test_a_linear_path_inside_a_block_takes_its_own_factor(model_type):
    """The planted MLP's inner activation (act(gate) * up) passes the limit: up_proj takes
    beta, down_proj its inverse (beside alpha)."""
    r = weightcast.rescale(rm.decoder(model_type), rm.batches())
    pairs = {pr["producer"]: pr["beta"] for pr in r.pairs}
    assert list(pairs) == ["model.layers.3.mlp.up_proj"] and pairs["model.layers.3.mlp.up_proj"] < 1
    f = r.factors
    assert f["model.layers.3.mlp.up_proj.weight"] == pairs["model.layers.3.mlp.up_proj"]
    # alpha over beta (1 here, so no factor at all)
    assert f.get("model.layers.3.mlp.down_proj.weight", 1.0) == (
        r.alpha / pairs["model.layers.3.mlp.up_proj"])


@pytest.mark.parametrize("model_type,gated,tied", T5S)
def test_t5_families_fit_f16_beside_transformers_clamp(model_type, gated, tied):
    """T5's modelling code clamps f16 hidden states (finfo.max - 1000) instead of overflowing:
    plain f16 is that clamp; the rescale needs none."""
    batches = rm.batches(seq2seq=True)
    r = weightcast.rescale(rm.t5(gated=gated, tie=tied, model_type=model_type), batches)
    clean = weightcast.rescale(
        rm.t5(gated=gated, tie=tied, model_type=model_type, plant=False), batches)
    _report(f"{model_type} gated={gated} tied={tied}", r, clean)
    assert r.stream_max > 65504
    _assert_fits(r, clean)
    assert r.tied_head == tied
    assert set(r.config) == {"layer_norm_epsilon"}
    if not gated:
        assert [pr["producer"].rsplit(".", 1)[1] for pr in r.pairs] == ["wi"]
    assert r.proof["target"]["max_rel_diff"] <= r.proof["plain"]["max_rel_diff"] * 1.01 + 1e-3


def test_a_family_outside_the_table_and_a_model_that_fits_are_left_as_they_are(minilm):
    """all-MiniLM-L6-v2 (real weights; BERT is post-norm, not in the table) fits f16 as it is:
    no factor, no edit, the same numbers as plain f16."""
    model = transformers.AutoModel.from_pretrained(minilm, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(minilm)
    batches = [dict(tok(["A man is eating food.", "The cat sits outside."], padding=True,
                        return_tensors="pt"))]
    r = weightcast.rescale(model, batches)
    assert r.family is None and r.factors == {} and r.config == {} and r.unreachable == []
    assert r.proof["f32"]["max_rel_diff"] == 0
    assert r.proof["target"] == r.proof["plain"]


def test_a_family_outside_the_table_that_overflows_says_which_module():
    """A planted overflow in a model with no table entry: nothing is scaled, and the result
    names the module, with profile's keep-wide search as the way out."""
    model = rm.decoder("llama")
    model.config.model_type = "not-in-the-table"
    r = weightcast.rescale(model, rm.batches())
    assert r.family is None and r.factors == {} and not r.ok
    assert any("down_proj" in u["module"] for u in r.unreachable), r.unreachable
    assert "profile(search=True)" in r.unreachable[0]["why"]
    assert "not reached" in str(r)


def test_a_module_without_its_tied_head_is_refused():
    model = rm.decoder("gemma")  # Gemma ties its head to the embedding
    with pytest.raises(weightcast.UsageError, match="with its head"):
        weightcast.rescale(model.model, rm.batches())


def _folder(model, path):
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("make", [
    pytest.param(lambda: rm.decoder("llama"), id="llama"),
    pytest.param(lambda: rm.decoder("llama", tie=True), id="llama-tied"),
    pytest.param(lambda: rm.decoder("gemma2"), id="gemma2-tied-1+w"),
    pytest.param(lambda: rm.t5(), id="t5-tied"),
    pytest.param(lambda: rm.moe("mixtral"), id="mixtral-experts-one-per-file-tensor"),
    pytest.param(lambda: rm.vit(), id="vit-renamed-on-disk"),
])
def test_the_converted_folder_runs_in_f16_in_transformers_as_it_ran_in_memory(make, tmp_path):
    """rescale -> save_rules -> `weightcast convert --rules` -> transformers'
    from_pretrained(dtype=float16), nothing of weightcast at load time: finite, within the
    tolerance, and every tensor bit-identical to the in-memory cast (the plan is the truth);
    plain convert to f16 of the same folder gives non-finite logits."""
    model = make()
    seq2seq = model.config.is_encoder_decoder
    batches = rm.images() if model.config.model_type == "vit" else rm.batches(seq2seq)
    r = weightcast.rescale(model, batches)
    assert r.alpha < 1
    src = _folder(model, tmp_path / "f32")
    rules = tmp_path / "rescale.toml"
    r.save_rules(rules)
    run("convert", src, "-o", tmp_path / "f16", "--to", "f16", "--rules", rules)
    run("convert", src, "-o", tmp_path / "plain", "--to", "f16")
    config = json.loads((tmp_path / "f16" / "config.json").read_text())
    for k, v in r.config.items():
        assert config[k] == v
    cls = type(model)
    loaded = cls.from_pretrained(tmp_path / "f16", dtype=torch.float16).eval()
    memory = r.apply(copy.deepcopy(model), "f16")
    keep_fp32 = set(getattr(cls, "_keep_in_fp32_modules", None) or [])
    for name, t in memory.state_dict().items():
        got = loaded.state_dict()[name]
        if got.dtype != t.dtype:  # transformers keeps T5's `wo` in f32: compare in f32
            assert any(k in name for k in keep_fp32), name
            assert torch.equal(got, t.float().to(got.dtype)) or torch.equal(
                got.half(), t), name
            continue
        assert torch.equal(got, t), name
    ref, _ = rm.outputs(model, batches)
    got, _ = rm.outputs(loaded, batches)
    cos = rm.cosine(ref, got)
    print(f"{tmp_path.name}: from_pretrained f16 cosine {cos:.7f}")
    assert cos >= TOLERANCE
    if not seq2seq:  # T5's clamp keeps plain f16 finite
        plain = cls.from_pretrained(tmp_path / "plain", dtype=torch.float16).eval()
        bad, _ = rm.outputs(plain, batches)
        assert not all(torch.isfinite(t).all() for t in bad)


def test_gguf_from_the_rescaled_folder(tmp_path):
    """A GGUF f16 file from the rescaled folder carries the edited epsilon and the scaled
    tensors; a folder written back from it runs in f16 in transformers."""
    gguf = pytest.importorskip("gguf")
    model = rm.decoder("llama")
    batches = rm.batches()
    r = weightcast.rescale(model, batches)
    src = _folder(model, tmp_path / "f32")
    rules = tmp_path / "rescale.toml"
    r.save_rules(rules)
    rm.add_tokenizer(src)
    run("convert", src, "-o", tmp_path / "m.gguf", "--to", "f16", "--rules", rules)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    eps = reader.fields["llama.attention.layer_norm_rms_epsilon"]
    assert float(eps.parts[eps.data[0]][0]) == pytest.approx(r.config["rms_norm_eps"], rel=1e-6)
    run("convert", tmp_path / "m.gguf", "-o", tmp_path / "back", "--to", "f16")
    loaded = type(model).from_pretrained(tmp_path / "back", dtype=torch.float16).eval()
    ref, _ = rm.outputs(model, batches)
    got, _ = rm.outputs(loaded, batches)
    assert rm.cosine(ref, got) >= TOLERANCE


def test_cast_module_applies_the_rules_file(tmp_path):
    """cast_module(rules=) is the in-memory path: the same factors and config edits."""
    model = rm.decoder("qwen3")
    batches = rm.batches()
    r = weightcast.rescale(model, batches)
    rules = tmp_path / "rescale.toml"
    r.save_rules(rules)
    text = rules.read_text()
    assert "[config]" in text and "scale = 0.125" in text
    m = weightcast.cast_module(copy.deepcopy(model), "f16", rules=rules)
    assert m.config.rms_norm_eps == r.config["rms_norm_eps"]
    assert all(layer.input_layernorm.variance_epsilon == r.config["rms_norm_eps"]
               for layer in m.model.layers)
    ref, _ = rm.outputs(model, batches)
    got, _ = rm.outputs(m, batches)
    assert rm.cosine(ref, got) >= TOLERANCE


def test_profile_puts_the_rescale_beside_plain_f16_and_bf16(tmp_path):
    model = rm.decoder("llama")
    p = weightcast.profile(model, rm.batches(),
                           ["f16", {"to": "f16", "rescale": True}, "bf16"],
                           timing=False, tolerance={"cosine": TOLERANCE})
    rows = {c["name"]: c for c in p.candidates}
    assert set(rows) == {"reference", "f16", "f16 rescaled", "bf16"}, set(rows)
    assert rows["f16"]["nonfinite"] > 0
    assert rows["f16 rescaled"]["nonfinite"] == 0
    assert rows["f16 rescaled"]["cosine"] >= TOLERANCE
    assert rows["f16 rescaled"]["rescale"]["alpha"] == 0.125
    assert p.recommended == "f16 rescaled"
    p.save_rules(tmp_path / "rules.toml")
    text = (tmp_path / "rules.toml").read_text()
    assert 'to = "f16"' in text and "scale = " in text and "[config]" in text


def test_command_line_rescale(tmp_path):
    """`weightcast profile FOLDER --rescale --rules-out` then `convert --rules`."""
    model = rm.decoder("llama")
    src = _folder(model, tmp_path / "f32")
    rm.add_tokenizer(src)
    cmd = [sys.executable, "-m", "weightcast", "profile", str(src), "--rescale", "--rules-out",
           str(tmp_path / "rescale.toml")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "alpha 2^-" in p.stdout and "non-finite 0" in p.stdout, p.stdout
    run("convert", src, "-o", tmp_path / "f16", "--to", "f16", "--rules", tmp_path / "rescale.toml")
    p = subprocess.run(cmd[:-2] + ["--json"], capture_output=True, text=True, timeout=600)
    d = json.loads(p.stdout)
    assert d["proof"]["target"]["nonfinite"] == 0 and d["config"]["rms_norm_eps"] < 1e-6


def test_every_model_type_of_the_table_is_built_and_tested_here():
    from weightcast._rescale.families import FAMILIES

    tested = set(DECODERS) | {"qwen2_moe", "qwen3_moe", "mixtral", "vit"} | {t for t, _, _ in T5S}
    table = {t for f in FAMILIES for t in f.model_types}
    assert table == tested, table ^ tested
