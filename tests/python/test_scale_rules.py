"""A rules file's `scale` (per-tensor factors) and `[config]` (config.json edits), applied by
`convert` to every output: each value written is bit-identical to torch's
`(w.float() * scale).to(dtype)` (form `1+w`: `(scale * (1 + w.float()) - 1).to(dtype)`), the
plan (`--dry-run --json`) says so and equals what is written, and the config edits land in
config.json and in a GGUF file's metadata. The Python API's side (`convert(rules=)`,
`cast_module`) is tests/api/test_scale_rules_api.py."""

import json
import struct
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, run

INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
         "I64": torch.int64}
EPS = 1.52587890625e-08  # 2**-26

# (pattern, scale, form, to) per rule; f32 -> f32 (`to = "f32"`) must still write scaled values
RULES = [
    ("w32", 0.125, None, None),
    ("w32x", 0.5, None, "f32"),
    ("w32y", 0.3, None, "f32"),  # f32 out: the product's own rounding shows
    ("wbf", 0.3, None, None),
    ("w16", 0.5, None, None),
    ("w16b", 3.0, None, None),
    ("w64", 0.3, None, None),
    ("norm.weight", 8.0, "1+w", None),
    ("norm2.weight", 0.7, "1+w", "f32"),
]


def rules_toml(config: bool, rules=RULES) -> str:
    lines = []
    for pat, scale, form, to in rules:
        lines += ["[[rule]]", f"match = {json.dumps(pat)}", f"scale = {scale!r}"]
        if form:
            lines.append(f"form = {json.dumps(form)}")
        if to:
            lines.append(f"to = {json.dumps(to)}")
    if config:
        lines += ["[config]", f"rms_norm_eps = {EPS!r}"]
    return "\n".join(lines) + "\n"


def bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(INT_VIEW[t.element_size()]).numpy()


def expected(w: torch.Tensor, scale, form, dtype) -> torch.Tensor:
    """What torch gives: the stored value in f32, the factor, then the cast."""
    x = w.float()
    v = scale * (1 + x) - 1 if form == "1+w" else x * scale
    return v.to(dtype)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    g, w = got.flatten(), want.flatten()
    # NaN stays NaN; its payload bits are not compared (torch's own casts disagree on them:
    # see test_cast_bits.py)
    nan = torch.isnan(w.float())
    assert torch.equal(torch.isnan(g.float()), nan), f"{what}: NaN positions differ"
    diff = np.nonzero(bits(g[~nan]) != bits(w[~nan]))[0]
    assert diff.size == 0, (f"{what}: {diff.size} values differ, first at {diff[0]}: got "
                            f"{g[~nan][diff[0]].item()!r}, torch {w[~nan][diff[0]].item()!r}")


def tensors() -> dict:
    g = torch.Generator().manual_seed(7)
    n = lambda k, s=1.0: torch.randn(k, generator=g) * s  # noqa: E731
    specials = torch.tensor([0.0, -0.0, float("nan"), float("inf"), float("-inf"), 65504.0,
                             -65504.0, 100000.0, 6e-8, -6e-8, 1e-40, -1e-42, 2.0**-24, 2.0**-25,
                             3.4e38, -3.3e38, 1.0, -1.0])
    w16b = torch.cat([n(64), torch.tensor([6e-8, 2.0**-24, -(2.0**-24), 1e-5, 21000.0, -21845.0,
                                           float("nan")])])
    return {
        "w32": torch.cat([n(200, 3.0), specials]).reshape(-1, 2),
        "w32x": torch.cat([n(30), specials]),
        "wbf": torch.cat([n(100, 50.0), torch.tensor([1e30, -1e-30, 1e-38, float("nan"),
                                                      60000.0, 1e-40, -0.0])]).to(torch.bfloat16),
        "w16": torch.cat([n(100, 100.0), torch.tensor([65504.0, -65504.0, 6e-8, -6e-8, 1e-5])])
                    .to(torch.float16),
        "w16b": w16b.to(torch.float16),
        "w64": torch.cat([n(50, 10.0).double(),
                          torch.tensor([1e-300, 1e300, 1e4, 0.1, 2.0**-30, float("nan")],
                                       dtype=torch.float64)]),
        "w32y": torch.cat([n(180, 7.0), specials]),
        "norm.weight": n(64, 0.05),
        "norm2.weight": torch.cat([n(180, 0.3), torch.tensor([-1.0, 1e-9, -1e-9, 3e38])]),
        "plain": n(16),  # no rule: cast as usual
        "ids": torch.arange(6, dtype=torch.int64),
    }


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A model folder: the tensors above, a config.json with rms_norm_eps."""
    d = tmp_path_factory.mktemp("scale") / "model"
    d.mkdir()
    save_file(tensors(), d / "model.safetensors")
    cfg = {"architectures": ["X"], "model_type": "x", "hidden_size": 8, "rms_norm_eps": 1e-06,
           "torch_dtype": "float32", "vocab_size": 6}
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return d


@pytest.fixture(scope="module")
def rules(tmp_path_factory):
    d = tmp_path_factory.mktemp("rules")
    (d / "with-config.toml").write_text(rules_toml(True))
    (d / "no-config.toml").write_text(rules_toml(False))
    return d


def plan(src, out, *args):
    p = run("convert", src, "-o", out, *args, "--dry-run", "--json")
    return json.loads(p.stdout)


def check_against_plan(doc: dict, got: dict, inputs: dict):
    """Every tensor written is what the plan row says: torch's arithmetic on the input with
    the row's scale/form, cast to the row's dtype; unscaled rows are plain casts."""
    rows = {r["name"]: r for r in doc["tensors"]}
    assert set(rows) == set(got)
    for name, w in inputs.items():
        r = rows[name]
        dtype = TORCH[r["to"]]
        if not w.is_floating_point():
            assert torch.equal(got[name], w)
            continue
        want = expected(w, r["scale"], r.get("form"), dtype) if "scale" in r else w.to(dtype)
        assert_same_bits(got[name], want, f"{name} ({r['from']} -> {r['to']})")


def check_rows(doc: dict, to: str):
    """The plan shows the rules' factors and forms, and the scaled tensors as cast."""
    rows = {r["name"]: r for r in doc["tensors"]}
    for pat, scale, form, rule_to in RULES:
        r = rows[pat]
        assert r["scale"] == scale and r.get("form") == form, r
        assert r["cast"] is True
        assert r["to"] == (rule_to or to).upper()
    assert "scale" not in rows["plain"] and "form" not in rows["plain"]
    assert "scale" not in rows["ids"] and rows["ids"]["cast"] is False


@pytest.mark.parametrize("to", ["f16", "bf16"])
def test_folder_output_is_torch_bit_for_bit_and_config_edited(src, rules, tmp_path, to):
    out = tmp_path / "out"
    args = ("--to", to, "--rules", rules / "with-config.toml", "--on-overflow", "allow")
    doc = plan(src, out, *args)
    check_rows(doc, to)
    assert doc["config"] == {"rms_norm_eps": EPS}
    text = run("convert", src, "-o", out, *args, "--dry-run").stdout
    assert "config.json: rms_norm_eps 1e-6 -> 1.52587890625e-8" in text
    line = next(x for x in text.splitlines() if x.startswith("norm.weight "))
    assert f"{to.upper()} x8 (1+w)" in line, line
    assert "F32 x0.5" in next(x for x in text.splitlines() if x.startswith("w32x "))
    run("convert", src, "-o", out, *args)
    check_against_plan(doc, load_file(out / "model.safetensors"), tensors())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rms_norm_eps"] == EPS
    assert list(cfg) == ["architectures", "model_type", "hidden_size", "rms_norm_eps",
                         "torch_dtype", "vocab_size"], "key order kept"
    assert cfg["torch_dtype"] == {"f16": "float16", "bf16": "bfloat16"}[to]


def test_sharded_folder_and_file_outputs(src, rules, tmp_path):
    args = ("--to", "f16", "--on-overflow", "allow")
    out = tmp_path / "sharded"
    doc = plan(src, out, *args, "--rules", rules / "with-config.toml", "--max-shard-size", "1kB")
    run("convert", src, "-o", out, *args, "--rules", rules / "with-config.toml",
        "--max-shard-size", "1kB")
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(f))
    assert len(list(out.glob("*.safetensors"))) > 1
    check_against_plan(doc, got, tensors())
    assert json.loads((out / "config.json").read_text())["rms_norm_eps"] == EPS
    # a single file: scales apply, a [config] cannot (no config.json): refused, nothing written
    one = tmp_path / "one.safetensors"
    p = run("convert", src, "-o", one, *args, "--rules", rules / "with-config.toml", check=False)
    assert p.returncode == 2, p.stderr
    assert "rms_norm_eps" in p.stderr and "no config.json" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not one.exists()
    doc = plan(src, one, *args, "--rules", rules / "no-config.toml")
    assert "config" not in doc
    run("convert", src, "-o", one, *args, "--rules", rules / "no-config.toml")
    check_against_plan(doc, load_file(one), tensors())


@pytest.mark.parametrize("to", ["f16", "bf16"])
def test_pt_output(src, rules, tmp_path, to):
    out = tmp_path / "out.pt"
    args = ("--to", to, "--on-overflow", "allow")
    p = run("convert", src, "-o", out, *args, "--rules", rules / "with-config.toml", check=False)
    assert p.returncode == 2 and "no config.json" in p.stderr, p.stderr
    assert not out.exists()
    doc = plan(src, out, *args, "--rules", rules / "no-config.toml")
    run("convert", src, "-o", out, *args, "--rules", rules / "no-config.toml")
    check_against_plan(doc, torch.load(out, weights_only=True), tensors())


def test_overflow_checks_see_the_scaled_values(tmp_path):
    """The default policy refuses what the scaled values would overflow, not the stored
    ones: 100000 x 0.5 fits f16; 40000 x 2 does not, and `clamp` clamps it."""
    d = tmp_path / "m"
    d.mkdir()
    save_file({"big": torch.tensor([100000.0, -3.0]), "grow": torch.tensor([40000.0, 1.0])},
              d / "model.safetensors")
    r = tmp_path / "r.toml"
    r.write_text(rules_toml(False, [("big", 0.5, None, None)]))
    run("convert", d, "-o", tmp_path / "a.safetensors", "--to", "f16", "--rules", r)
    got = load_file(tmp_path / "a.safetensors")["big"]
    assert got.tolist() == [49984.0, -1.5]  # 50000 in f16
    r.write_text(rules_toml(False, [("big", 0.5, None, None), ("grow", 2.0, None, None)]))
    for extra in ([], ["--dry-run"]):
        p = run("convert", d, "-o", tmp_path / "b.safetensors", "--to", "f16", "--rules", r,
                *extra, check=False)
        assert p.returncode == 1 and "`grow` (1 values beyond F16)" in p.stderr, p.stderr
    run("convert", d, "-o", tmp_path / "c.safetensors", "--to", "f16", "--rules", r,
        "--on-overflow", "clamp")
    assert load_file(tmp_path / "c.safetensors")["grow"].tolist() == [65504.0, 2.0]
    # a finite f32 the product takes to inf overflows f32 itself: counted, refused
    save_file({"huge": torch.tensor([3e38, 1.0])}, d / "model.safetensors")
    r.write_text(rules_toml(False, [("huge", 4.0, None, "f32")]))
    p = run("convert", d, "-o", tmp_path / "d.safetensors", "--to", "f16", "--rules", r,
            check=False)
    assert p.returncode == 1 and "`huge` (1 values beyond F32)" in p.stderr, p.stderr
    run("convert", d, "-o", tmp_path / "d.safetensors", "--to", "f16", "--rules", r,
        "--on-overflow", "clamp")
    assert load_file(tmp_path / "d.safetensors")["huge"].tolist() == [torch.finfo().max, 4.0]


def test_refusals(src, tmp_path):
    r = tmp_path / "r.toml"
    out = tmp_path / "out"
    cases = [
        ("[[rule]]\nmatch = 'ids'\nscale = 2.0\n", "tensor `ids` (x2): it is I64"),
        ("[[rule]]\nmatch = 'w32'\nform = '1+w'\n", "`form` goes with `scale`"),
        ("[[rule]]\nmatch = 'w32'\nscale = 0.0\n", "non-zero"),
        ("[[rule]]\nmatch = 'w32'\nscale = nan\n", "finite"),
        ("[[rule]]\nmatch = 'w32'\nscale = 2.0\nfrom = 'f16'\n", "invalid rules file"),
        ("[config]\nrms_norm_epsilon = 1e-8\n", "no key `rms_norm_epsilon`"),
    ]
    for text, want in cases:
        r.write_text(text)
        for extra in ([], ["--dry-run"], ["--dry-run", "--json"], ["--on-overflow", "keep"]):
            p = run("convert", src, "-o", out, "--to", "f16", "--rules", r, *extra, check=False)
            assert p.returncode == 2, (text, extra, p.stderr)
            assert want in p.stderr, (text, extra, p.stderr)
            assert len(p.stderr.strip().splitlines()) == 1, p.stderr
            assert not out.exists()


def test_pt_storages_scaled_once(tmp_path):
    """Views of one storage in a .pt: one factor for all of them (the storage is scaled once,
    in a .pt output as in a safetensors one); different factors are refused, naming both."""
    base = torch.randn(8, 4, generator=torch.Generator().manual_seed(3))
    sd = {"a": base[:4], "b": base[4:], "own": torch.randn(3)}
    src = tmp_path / "in.pt"
    torch.save(sd, src)
    r = tmp_path / "r.toml"
    r.write_text(rules_toml(False, [("a", 0.25, None, None)]))
    p = run("convert", src, "-o", tmp_path / "x.pt", "--to", "f16", "--rules", r, check=False)
    assert p.returncode == 2, p.stderr
    assert "`a` (x0.25) and `b` (no scale) share storage" in p.stderr, p.stderr
    r.write_text(rules_toml(False, [("re:^(a|b)$", 0.25, None, None), ("own", 3.0, None, None)]))
    for out in (tmp_path / "x.pt", tmp_path / "x.safetensors"):
        run("convert", src, "-o", out, "--to", "f16", "--rules", r)
        got = torch.load(out, weights_only=True) if out.suffix == ".pt" else load_file(out)
        for name, w in sd.items():
            s = 3.0 if name == "own" else 0.25
            assert_same_bits(got[name], expected(w, s, None, torch.float16), f"{out.name} {name}")
        if out.suffix == ".pt":
            # still views of one storage, converted once
            assert got["a"].untyped_storage().data_ptr() == got["b"].untyped_storage().data_ptr()


# --- GGUF, from a tiny Llama folder --------------------------------------------------------

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "gguf"))
import models  # noqa: E402

# HF name -> GGUF name, for tensors the converter writes unpermuted
LLAMA_RULES = [
    ("model.embed_tokens.weight", "token_embd.weight", 0.125, None),
    ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight", 0.3, None),
    ("model.norm.weight", "output_norm.weight", 8.0, "1+w"),
]


@pytest.mark.parametrize("to", ["f16", "bf16", "q8_0"])
def test_gguf_from_a_folder(tmp_path, to):
    src = models.tiny_llama(tmp_path)
    inputs = load_file(src / "model.safetensors")
    r = tmp_path / "r.toml"
    r.write_text(rules_toml(True, [(hf, s, form, None) for hf, _, s, form in LLAMA_RULES]))
    out = tmp_path / "out.gguf"
    doc = plan(src, out, "--to", to, "--rules", r)
    assert doc["config"] == {"rms_norm_eps": EPS}
    rows = {r["source_name"]: r for r in doc["tensors"]}
    run("convert", src, "-o", out, "--to", to, "--rules", r)
    reader = gguf.GGUFReader(out)
    eps = reader.fields["llama.attention.layer_norm_rms_epsilon"]
    assert float(eps.parts[eps.data[0]][0]) == np.float32(EPS)
    by_name = {t.name: t for t in reader.tensors}
    for hf, name, s, form in LLAMA_RULES:
        row = rows[hf]
        assert row["name"] == name and row["scale"] == s and row.get("form") == form, row
        t = by_name[name]
        want = expected(inputs[hf], s, form, torch.float32)  # the f32 values, scaled
        if row.get("ggml_type") == "Q8_0":
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
            q = gguf.quants.quantize(want.numpy().reshape(-1, want.shape[-1]),
                                     gguf.GGMLQuantizationType.Q8_0)
            assert np.array_equal(np.asarray(t.data).view(np.uint8).ravel(), q.view(np.uint8).ravel())
            continue
        dtype = TORCH[row["to"]]
        raw = torch.from_numpy(np.array(t.data).view(np.uint8).ravel().copy())
        got = raw.view(dtype)
        assert_same_bits(got, expected(inputs[hf], s, form, dtype).flatten(), f"{name} {to}")
    # no config.json in a GGUF input: a GGUF -> GGUF retype with [config] is refused
    p = run("convert", out, "-o", tmp_path / "again.gguf", "--to", "f32", "--rules", r,
            check=False)
    assert p.returncode == 2 and "no config.json" in p.stderr, p.stderr
