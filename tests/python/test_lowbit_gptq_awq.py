"""GPTQ and AWQ checkpoints: each packed Linear (`X.qweight`, `X.qzeros`, `X.scales`,
`X.g_idx`) converts into a plain `X.weight` [out, in] bit-identical to what the real libraries
dequantize (gptqmodel 7.7.0 `dequantize_weight()`, autoawq 0.2.9 `dequantize_gemm`), the
packed tensors and config.json's quantization_config leave; layouts that do not fit are
refused by name and nothing is written.

The fixtures in tests/fixtures/lowbit/{gptq,awq}-* (each with its `reference.safetensors`) are
made by scripts/gen_lowbit_fixtures.py with the real packers: GPTQ 2/3/4/8 bits, sym and asym
(zero points of 0 that make the v1 export borrow), act-order with a shuffled g_idx, one group
and groups of 32/64 (a partial last group), formats gptq (v1) and gptq_v2; AWQ GEMM and GEMV."""

import json
import pathlib
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, run

FIXTURES = ROOT / "tests" / "fixtures" / "lowbit"
FOLDERS = sorted(p.name for p in FIXTURES.iterdir() if p.name.startswith(("gptq-", "awq-")))
PACKED = ("qweight", "qzeros", "scales", "g_idx")
DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}


def bits_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    ints = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
    return torch.equal(a.view(ints[a.dtype]), b.view(ints[b.dtype]))


def test_fixtures_are_there_and_small():
    assert len([f for f in FOLDERS if f.startswith("gptq-")]) >= 8
    assert len([f for f in FOLDERS if f.startswith("awq-")]) >= 4
    total = sum(f.stat().st_size for d in FOLDERS for f in (FIXTURES / d).iterdir())
    assert total < 1_000_000, total


@pytest.mark.parametrize("to", sorted(DTYPES))
@pytest.mark.parametrize("name", FOLDERS)
def test_dequantized_like_the_reference(tmp_path, name, to):
    src = FIXTURES / name
    out = tmp_path / "out"
    run("convert", src, "-o", out, "--to", to)
    dtype = DTYPES[to]
    got = load_file(out / "model.safetensors")
    ref = load_file(src / "reference.safetensors")
    stored = load_file(src / "model.safetensors")
    for n, want in ref.items():
        assert bits_equal(got[n], want.to(dtype)), n
    # every other tensor (embeddings, norms, lm_head, biases) is cast as it is
    for n, t in stored.items():
        if n.rsplit(".", 1)[-1] not in PACKED:
            assert bits_equal(got[n], t.to(dtype)), n
    assert not [n for n in got if n.rsplit(".", 1)[-1] in PACKED]
    assert sorted(got) == sorted(set(ref) | {n for n in stored
                                             if n.rsplit(".", 1)[-1] not in PACKED})
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config


@pytest.mark.parametrize("name", ["gptq-3bit-g32-asym-v1", "awq-gemv-g32"])
def test_inspect_names_the_scheme(name):
    j = json.loads(run("inspect", FIXTURES / name, "--json").stdout)
    scheme = j["quantization"]["scheme"]
    assert scheme.startswith(name.split("-")[0]), scheme
    assert j["quantization"]["unsupported"] is None
    tensors = {t["name"]: t for t in j["tensors"]}
    down = tensors["model.layers.0.mlp.down_proj.weight"]
    assert down["shape"] == [32, 96] and down["dtype"] == "F16"
    assert not [n for n in tensors if n.rsplit(".", 1)[-1] in PACKED]
    if name.startswith("gptq"):
        assert scheme == "gptq 3-bit group 32, format gptq"
    else:
        assert scheme == "awq gemv 4-bit group 32"


def test_v1_fixture_borrows():
    """The v1 asym fixture holds zero points of 0, which gptqmodel's packed-word export
    borrows from: adding 1 per field (auto-gptq's reading) gives other zero points than
    gptqmodel's word add, which weightcast follows (the bit equality above)."""
    t = load_file(FIXTURES / "gptq-4bit-g32-asym-v1" / "model.safetensors")
    qz = t["model.layers.0.mlp.gate_proj.qzeros"].numpy().view(np.uint32).astype(np.uint64)
    fields = lambda w: np.stack([(w >> (4 * j)) & 15 for j in range(8)], -1)  # noqa: E731
    word_add = fields((qz + 0x11111111) & 0xFFFFFFFF)
    per_field = (fields(qz) + 1) & 15
    assert (word_add != per_field).any()


def test_keep_passes_the_packed_tensors_through(tmp_path):
    src = FIXTURES / "gptq-4bit-g32-asym-v1"
    out = tmp_path / "out"
    run("convert", src, "-o", out, "--to", "f16", "--on-quantized", "keep")
    got = load_file(out / "model.safetensors")
    stored = load_file(src / "model.safetensors")
    assert sorted(got) == sorted(stored)
    for n, t in stored.items():
        assert torch.equal(got[n], t), n
    assert "quantization_config" in json.loads((out / "config.json").read_text())


def mutate_tensors(folder, f):
    path = folder / "model.safetensors"
    t = load_file(path)
    f(t)
    save_file(t, path, metadata={"format": "pt"})


def mutate_config(folder, **kv):
    path = folder / "config.json"
    c = json.loads(path.read_text())
    c["quantization_config"].update(kv)
    path.write_text(json.dumps(c))


LAYER = "model.layers.0.mlp.down_proj"

REFUSALS = [
    ("gptq-4bit-g32-asym-v1", "qzeros dropped",
     lambda d: mutate_tensors(d, lambda t: t.pop(f"{LAYER}.qzeros")),
     [f"`{LAYER}.qweight`", f"`{LAYER}.qzeros`"]),
    ("gptq-4bit-g32-asym-v1", "scales transposed",
     lambda d: mutate_tensors(d, lambda t: t.update(
         {f"{LAYER}.scales": t[f"{LAYER}.scales"].T.contiguous()})),
     [f"`{LAYER}.scales`"]),
    ("gptq-3bit-g64-sym-v2-actorder", "g_idx of the wrong length",
     lambda d: mutate_tensors(d, lambda t: t.update(
         {f"{LAYER}.g_idx": t[f"{LAYER}.g_idx"][:-1].contiguous()})),
     [f"`{LAYER}.g_idx`"]),
    ("gptq-3bit-g64-sym-v2-actorder", "g_idx naming no group",
     lambda d: mutate_tensors(d, lambda t: t[f"{LAYER}.g_idx"].__setitem__(3, 99)),
     [f"`{LAYER}.weight`", "g_idx[3]"]),
    ("gptq-2bit-all-sym-v2", "bits 5", lambda d: mutate_config(d, bits=5), ["`bits` 5"]),
    ("gptq-8bit-all-asym-v1", "format marlin",
     lambda d: mutate_config(d, format="marlin"), ["`marlin`"]),
    ("awq-gemm-g32", "version marlin", lambda d: mutate_config(d, version="marlin"),
     ["awq version `marlin`"]),
    ("awq-gemv-g64", "version gemv_fast", lambda d: mutate_config(d, version="gemv_fast"),
     ["`gemv_fast`"]),
    ("awq-gemm-g64", "zero_point false", lambda d: mutate_config(d, zero_point=False),
     ["`zero_point`"]),
    ("awq-gemm-g64", "gemm read as gemv", lambda d: mutate_config(d, version="gemv"),
     [f"`{LAYER}.qweight`", "gemv"]),
    ("awq-gemm-g32", "scales dropped",
     lambda d: mutate_tensors(d, lambda t: t.pop(f"{LAYER}.scales")),
     [f"`{LAYER}.scales`"]),
]


@pytest.mark.parametrize("name,why,mutate,says", REFUSALS, ids=[r[1] for r in REFUSALS])
def test_refusals_name_the_tensor_or_option(tmp_path, name, why, mutate, says):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / name, src)
    mutate(src)
    out = tmp_path / "out"
    p = run("convert", src, "-o", out, "--to", "f16", check=False)
    assert p.returncode != 0, (why, p.stderr)
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1, err
    for s in says:
        assert s in err, (why, err)
    assert not out.exists()


@pytest.mark.parametrize("name", ["gptq-4bit-g32-asym-v1", "awq-gemm-g32"])
def test_converted_folder_runs_in_transformers(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "out"
    run("convert", FIXTURES / name, "-o", out, "--to", "f32")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = load_file(FIXTURES / name / "reference.safetensors")
    params = dict(model.named_parameters())
    for n, want in ref.items():
        assert bits_equal(params[n].data, want.float()), n
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 16) and torch.isfinite(logits).all()
