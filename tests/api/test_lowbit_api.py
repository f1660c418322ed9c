"""Low-bit packed checkpoints through the Python API: `load` gives the dequantized weights and
`convert` writes what the command line writes (tests/python/test_lowbit.py checks the command
line's values against the references)."""

import sys
import pathlib

import torch
from safetensors.torch import load_file

import weightcast

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "python"))
from test_lowbit import make_ct, same  # noqa: E402


def test_load_and_convert_dequantize_compressed_tensors(tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig
    src = tmp_path / "ct"
    make_ct(src, "W4A16_ASYM", torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.bfloat16,
        quantization_config=CompressedTensorsConfig(run_compressed=False)).state_dict()
    got = weightcast.load(src)
    assert not [k for k in got if "weight_packed" in k or "zero_point" in k]
    for k in ("model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
        assert same(got[k], ref[k]), k
    half = weightcast.load(src, dtype="f16")
    assert same(half["model.layers.0.mlp.down_proj.weight"],
                ref["model.layers.0.mlp.down_proj.weight"].half())
    weightcast.convert(src, tmp_path / "out", to="f16")
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert same(written["model.layers.0.mlp.up_proj.weight"],
                ref["model.layers.0.mlp.up_proj.weight"].half())


def test_convert_and_analyze_to_fp4(tmp_path):
    """`convert(to="nvfp4")` writes the command line's bytes (checked there against
    compressed-tensors), `analyze(to="mxfp4")` gives its figures."""
    from test_lowbit_write import tiny_llama, tensors
    from conftest import run
    model = tiny_llama(torch.bfloat16)
    src = tmp_path / "src"
    model.save_pretrained(src)
    r = weightcast.convert(src, tmp_path / "api", to="nvfp4")
    run("convert", src, "-o", tmp_path / "cli", "--to", "nvfp4")
    api, cli = tensors(tmp_path / "api"), tensors(tmp_path / "cli")
    assert sorted(api) == sorted(cli) and any(k.endswith("_global_scale") for k in api)
    for k in api:
        assert torch.equal(api[k].view(torch.uint8), cli[k].view(torch.uint8)), k
    assert r is not None
    a = weightcast.analyze(src, "mxfp4")
    assert len(a.tensors) == 14 and all(t.name.endswith("_packed") for t in a.tensors)
