"""bitsandbytes checkpoints read exactly: a tiny Llama loaded with transformers'
`BitsAndBytesConfig` (NF4 / FP4, with and without double quantization; LLM.int8) and written
by `save_pretrained`, then `convert`ed to a plain model. Every weight is compared bit for bit
with bitsandbytes' own CPU dequantization of the saved tensors (`dequantize_4bit` on the
`QuantState` it rebuilds from them, `int8_vectorwise_dequant`) cast to the target dtype, and
with transformers' `model.dequantize()` at the model's dtype.

Dimensions are chosen so that blocks of 64 span rows, last blocks are partial, some weights
need two nested absmax blocks (more than 256 blocks) and `down_proj` has an odd last dimension
(bitsandbytes' CPU backend then takes its pure-torch path instead of its native kernel)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run
from test_lowbit import DT, same, tensors  # the shared bit-equality helpers

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

PARTS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.",
         ".SCB", ".weight_format")




# name -> (BitsAndBytesConfig arguments, model dtype)
CASES = {
    "nf4-dq": (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                    bnb_4bit_use_double_quant=True), torch.bfloat16),
    "nf4": (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"), torch.float16),
    "fp4-dq": (dict(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                    bnb_4bit_use_double_quant=True), torch.float32),
    "fp4": (dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"), torch.bfloat16),
    "int8": (dict(load_in_8bit=True), torch.bfloat16),
    "int8-f32": (dict(load_in_8bit=True), torch.float32),
}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A tiny Llama in f32: hidden 100 (q_proj 10000 values: 156.25 blocks of 64; k_proj
    [50, 100]), intermediate 203 (gate/up 20300 values: 318 blocks, two nested blocks;
    down_proj [100, 203], odd last dimension)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=48, hidden_size=100, intermediate_size=203,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
        # one large value: a block whose absmax differs from its neighbours'
        model.model.layers[0].mlp.gate_proj.weight[3, 7] = 1.5
    folder = tmp_path_factory.mktemp("bnb") / "dense"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def quantized(dense):
    """Each case's checkpoint as `save_pretrained` writes it from the quantized model."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    out = {}
    for name, (qc, dtype) in CASES.items():
        m = AutoModelForCausalLM.from_pretrained(
            dense, quantization_config=BitsAndBytesConfig(**qc), dtype=dtype, device_map="cpu")
        folder = dense.parent / name
        m.save_pretrained(folder)
        out[name] = folder
    return out


def bnb_reference(folder):
    """bitsandbytes' own dequantization of every quantized weight of `folder`, by name; the
    plain tensors as stored."""
    from bitsandbytes.functional import (QuantState, dequantize_4bit,
                                         int8_vectorwise_dequant)
    sd = tensors(folder)
    out = {}
    for k, v in sd.items():
        if any(p in k for p in PARTS):
            continue
        scb = k.removesuffix(".weight") + ".SCB"
        if k.endswith(".weight") and scb in sd:
            out[k] = int8_vectorwise_dequant(v, sd[scb])
        elif k + ".absmax" in sd:
            qs = QuantState.from_dict({n[len(k) + 1:]: t for n, t in sd.items()
                                       if n.startswith(k + ".")}, device=torch.device("cpu"))
            out[k] = dequantize_4bit(v, qs)
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_bnb_dequantized_bit_exact(quantized, case, tmp_path):
    src = quantized[case]
    sd = tensors(src)
    four = case != "int8" and case != "int8-f32"
    assert any(".quant_state.bitsandbytes__" in k for k in sd) == four
    assert any(k.endswith(".SCB") for k in sd) != four
    if case.endswith("-dq"):
        assert any(k.endswith(".nested_absmax") for k in sd)
    ref = bnb_reference(src)
    for to, dt in DT.items():
        out = tmp_path / to
        run("convert", src, "-o", out, "--to", to)
        got = tensors(out)
        assert set(got) == set(ref), set(got) ^ set(ref)
        assert not [k for k in got if any(p in k for p in PARTS)]
        for k, v in ref.items():
            assert same(got[k], v.to(dt)), (case, to, k)
        cfg = json.loads((out / "config.json").read_text())
        assert "quantization_config" not in cfg


@pytest.mark.parametrize("case", list(CASES))
def test_bnb_matches_transformers_dequantize(quantized, case, tmp_path):
    """transformers' `model.dequantize()` (at the model's dtype) gives the same weights as
    `convert --to` that dtype."""
    from transformers import AutoModelForCausalLM
    src = quantized[case]
    dtype = CASES[case][1]
    m = AutoModelForCausalLM.from_pretrained(src, device_map="cpu")
    m.dequantize()
    want = {k: v for k, v in m.state_dict().items()}
    to = {v: k for k, v in DT.items()}[dtype]
    run("convert", src, "-o", tmp_path / "o", "--to", to)
    got = tensors(tmp_path / "o")
    n = 0
    for k, v in got.items():
        if k in want and k.endswith("proj.weight"):
            assert same(v, want[k].to(dtype)), (case, k)
            n += 1
    assert n == 14


def mutated(src, dst, change):
    """A copy of checkpoint folder `src` at `dst`, its tensors changed by `change(dict)`."""
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    sd = load_file(f)
    change(sd)
    save_file(sd, f, metadata={"format": "pt"})
    return dst


W = "model.layers.1.mlp.gate_proj.weight"


def corrupt_json(sd):
    k = W + ".quant_state.bitsandbytes__nf4"
    sd[k] = torch.full_like(sd[k], ord("x"))


def nested_too_long(sd):
    k = W + ".nested_absmax"
    sd[k] = torch.cat([sd[k], sd[k][:1]])


def odd_format(sd):
    sd["model.layers.0.self_attn.q_proj.weight_format"] = torch.tensor(1, dtype=torch.uint8)


@pytest.mark.parametrize("case,change,words", [
    pytest.param("nf4-dq", lambda sd: sd.pop(W + ".absmax"), f"has no `{W}.absmax`",
                 id="absmax-dropped"),
    pytest.param("nf4-dq", corrupt_json, "not JSON", id="json-corrupt"),
    pytest.param("nf4-dq", nested_too_long, f"`{W}.nested_absmax` holds",
                 id="nested-absmax-size"),
    pytest.param("nf4-dq", lambda sd: sd.pop(W + ".quant_state.bitsandbytes__nf4"),
                 "no quant_state", id="quant-state-dropped"),
    pytest.param("int8", lambda sd: sd.pop("model.layers.0.mlp.up_proj.SCB"),
                 "no `model.layers.0.mlp.up_proj.SCB`", id="scb-dropped"),
    pytest.param("int8", odd_format, "row format only", id="weight-format-not-row"),
])
def test_bnb_refusals(quantized, tmp_path, case, change, words):
    src = mutated(quantized[case], tmp_path / "bad", change)
    out = tmp_path / "o"
    p = run("convert", src, "-o", out, "--to", "bf16", check=False)
    assert p.returncode != 0, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], p.stderr
    assert not out.exists()
