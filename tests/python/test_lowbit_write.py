"""`convert --to nvfp4|mxfp4`: compressed-tensors' packed FP4 written bit for bit as
llm-compressor's weight-only presets (NVFP4A16, MXFP4A16) write it.

The reference runs compressed-tensors 0.20.1 itself: `apply_quantization_config`, the scales
from each weight's minimum and maximum as llm-compressor's QuantizationModifier computes them
with its default weight observer (`generate_gparam` over the tensor for NVFP4's global scale,
the global scales of `q_proj`/`k_proj`/`v_proj` and of `gate_proj`/`up_proj` made one, their
smallest, as `update_fused_layer_weight_global_scales` does, then `calculate_qparams` per group
of 16 or 32), then `ModelCompressor.compress_model` and `save_pretrained`. llm-compressor itself
is not installed here: these are the compressed-tensors calls it makes.
"""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run
from test_lowbit import tensors


def llm_compressor_weights_only(model):
    """The scales llm-compressor's QuantizationModifier gives a model with no calibration data:
    global scales first, fused, then each group's scale (see the module docstring)."""
    from compressed_tensors.quantization import QuantizationStrategy as S
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
    mods = {n: m for n, m in model.named_modules()
            if getattr(m, "quantization_scheme", None) is not None}
    for m in mods.values():
        if m.quantization_scheme.weights.strategy == S.TENSOR_GROUP:
            w = m.weight.data
            m.weight_global_scale.data.copy_(generate_gparam(w.amin(), w.amax()))
    for name, m in model.named_modules():
        for members in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            subs = [getattr(m, k, None) for k in members]
            if all(s is not None and hasattr(s, "weight_global_scale") for s in subs):
                g = torch.min(torch.cat([s.weight_global_scale.data for s in subs])).reshape([1])
                for s in subs:
                    s.weight_global_scale.data.copy_(g)
    for m in mods.values():
        a, w = m.quantization_scheme.weights, m.weight.data
        g = w.unflatten(-1, (w.shape[-1] // a.group_size, a.group_size))
        gs = getattr(m, "weight_global_scale", None)
        scale, _ = calculate_qparams(g.amin(-1), g.amax(-1), a,
                                     global_scale=None if gs is None else gs.data)
        m.weight_scale.data.copy_(scale.to(m.weight_scale.dtype))


def tiny_llama(dtype, seed=3):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        # ranges that reach every branch: tiny rows (subnormal E4M3 scales, f16's global scale
        # of 1), a zero group (the 0.125 / exponent-0 scale), large rows, negative-only groups
        mlp = model.model.layers[0].mlp
        mlp.down_proj.weight[3] *= 1e-4
        mlp.down_proj.weight[5, :40] = 0
        mlp.up_proj.weight[7] *= 300
        mlp.gate_proj.weight[2, :32] = -mlp.gate_proj.weight[2, :32].abs()
        model.model.layers[1].self_attn.k_proj.weight.mul_(8)
        model.model.layers[1].mlp.down_proj.weight.mul_(0.01)
    return model


def reference(folder, preset, model):
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    model = copy.deepcopy(model)
    qcfg = QuantizationConfig(config_groups={"group_0": QuantizationScheme(
        targets=["Linear"], **copy.deepcopy(PRESET_SCHEMES[preset]))}, ignore=["lm_head"])
    apply_quantization_config(model, qcfg)
    llm_compressor_weights_only(model)
    comp = ModelCompressor.from_pretrained_model(model)
    comp.compress_model(model)
    model.save_pretrained(folder)
    comp.update_config(folder)


CASES = [(p, d) for p in ("NVFP4A16", "MXFP4A16")
         for d in (torch.bfloat16, torch.float16, torch.float32)]


@pytest.mark.parametrize("preset, dtype", CASES, ids=[f"{p}-{str(d)[6:]}" for p, d in CASES])
def test_fp4_output_is_what_compressed_tensors_writes(tmp_path, preset, dtype):
    model = tiny_llama(dtype)
    src, ref, out = tmp_path / "src", tmp_path / "ref", tmp_path / "out"
    model.save_pretrained(src)
    reference(ref, preset, model)
    to = preset[:5].lower()
    plan = json.loads(run("convert", src, "-o", out, "--to", to, "--dry-run", "--json").stdout)
    run("convert", src, "-o", out, "--to", to)
    got, want = tensors(out), tensors(ref)
    assert sorted(got) == sorted(want), set(got) ^ set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)), k
    # the plan is the file: every tensor's name, shape, dtype and size
    rows = {r["name"]: r for r in plan["tensors"]}
    assert sorted(rows) == sorted(got)
    for k, r in rows.items():
        assert r["shape"] == list(got[k].shape) and r["bytes_after"] == got[k].nbytes, k
    packed = [r for r in rows.values() if r["quantize"] and "fp4" in r["quantize"]]
    assert len(packed) == 14
    # the fixture reaches the edge cases: subnormal E4M3 scales, the zero group's scale, and
    # (f16) a global scale that overflows to inf and becomes 1
    scales = torch.cat([v.view(torch.uint8).flatten() for k, v in got.items()
                        if k.endswith("weight_scale")])
    if to == "nvfp4":
        assert ((scales & 0x78) == 0).logical_and(scales != 0).any()
        assert (scales == 0x30).any()  # 0.125
        globals_ = [v.item() for k, v in got.items() if k.endswith("global_scale")]
        assert (1.0 in globals_) == (dtype == torch.float16)
    else:
        # the zero group: exponent 0 (2^-127), except in f16 where 2^-127 underflows and the
        # scale becomes 1 (exponent 127)
        assert (0 in scales.tolist()) == (dtype != torch.float16)
        assert scales.max() - scales.min() > 8
    ours = json.loads((out / "config.json").read_text())["quantization_config"]
    theirs = json.loads((ref / "config.json").read_text())["quantization_config"]
    # compressed-tensors 0.20.1 leaves out the fields llm-compressor writes as null or empty
    # (tests/python/test_quantized.py compares with llm-compressor's config itself)
    ours_w = ours["config_groups"]["group_0"].pop("weights")
    theirs_w = theirs["config_groups"]["group_0"].pop("weights")
    assert {k: ours_w[k] for k in theirs_w} == theirs_w
    assert {k for k in ours_w if k not in theirs_w} <= {
        "actorder", "block_structure", "observer", "observer_kwargs", "zp_dtype"}
    for k in ("version", "moe_sparsity_config"):
        theirs.pop(k, None)
    assert ours == theirs


def test_nvfp4_output_loads_in_transformers(tmp_path):
    """transformers loads the output through compressed-tensors, and weightcast reads it back
    to the same values."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig
    model = tiny_llama(torch.bfloat16)
    src, out, back = tmp_path / "src", tmp_path / "out", tmp_path / "back"
    model.save_pretrained(src)
    run("convert", src, "-o", out, "--to", "nvfp4")
    loaded = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(run_compressed=False))
    ids = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        logits = loaded(ids).logits
    assert torch.isfinite(logits).all()
    # NVFP4 keeps about 4 bits: the dequantized weights stay close to the originals
    w = model.model.layers[0].self_attn.q_proj.weight.float()
    q = loaded.model.layers[0].self_attn.q_proj.weight.float()
    assert ((w - q).norm() / w.norm()).item() < 0.2
    run("convert", out, "-o", back, "--to", "bf16")
    sd = loaded.state_dict()
    for k, v in tensors(back).items():
        assert torch.equal(v, sd[k].to(torch.bfloat16)), k


def test_fp4_plan_and_refusals(tmp_path):
    model = tiny_llama(torch.bfloat16)
    src = tmp_path / "src"
    model.save_pretrained(src)
    plan = json.loads(run("convert", src, "-o", tmp_path / "o", "--to", "nvfp4", "--dry-run",
                          "--json").stdout)
    rows = {r["name"]: r for r in plan["tensors"]}
    q = "model.layers.0.self_attn.q_proj.weight"
    assert rows[q + "_global_scale"]["quantize"]["shared_with"] == [
        "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"]
    assert rows["model.layers.0.self_attn.o_proj.weight_global_scale"]["quantize"][
        "shared_with"] == []
    # norms, embeddings and the head keep their dtype
    for k in ("model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert rows[k]["to"] == "BF16" and not rows[k]["cast"], k
    # a rule keeps one layer: it is listed in the config's ignore
    out = tmp_path / "kept"
    run("convert", src, "-o", out, "--to", "mxfp4", "--keep", "*.o_proj.weight")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert sorted(cfg["ignore"]) == ["lm_head", "model.layers.0.self_attn.o_proj",
                                     "model.layers.1.self_attn.o_proj"]
    assert "model.layers.0.self_attn.o_proj.weight" in tensors(out)
    for bad, says in [((tmp_path / "x.pt",), ".pt output"), ((tmp_path / "x.gguf",), ".gguf output"),
                      ((tmp_path / "y", "--scale", "channel"), "--scale")]:
        r = run("convert", src, "-o", *bad, "--to", "nvfp4", check=False)
        assert r.returncode != 0 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    # a non-finite weight is refused by name, and nothing is written
    sd = load_file(src / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][4, 7] = float("inf")
    from safetensors.torch import save_file
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    r = run("convert", src, "-o", tmp_path / "z", "--to", "nvfp4", check=False)
    assert r.returncode != 0 and "model.layers.1.mlp.up_proj.weight" in r.stderr, r.stderr
    assert not (tmp_path / "z").exists()


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def fp4_values(packed, scale, global_scale, group):
    """Packed codes times their scales in f32 (compressed-tensors' layout, low nibble first)."""
    codes = torch.stack([packed & 0xF, packed >> 4], -1).flatten(-2).long()
    vals = E2M1[codes & 7] * torch.where(codes & 8 != 0, -1.0, 1.0)
    if global_scale is None:
        s = torch.exp2(scale.int().float() - 127)
    else:
        s = scale.float() / global_scale.float()
    return vals * s.repeat_interleave(group, -1)


@pytest.mark.parametrize("preset", ["NVFP4A16", "MXFP4A16"])
def test_analyze_reports_the_snr_of_the_written_file(tmp_path, preset):
    """`analyze --to nvfp4|mxfp4` measures, before any write, each weight against exactly the
    values the reference's packed file holds."""
    model = tiny_llama(torch.bfloat16)
    src, ref = tmp_path / "src", tmp_path / "ref"
    model.save_pretrained(src)
    reference(ref, preset, model)
    want, orig = tensors(ref), tensors(src)
    to = preset[:5].lower()
    got = json.loads(run("analyze", src, "--to", to, "--json").stdout)["tensors"]
    assert len(got) == 14
    group = 16 if to == "nvfp4" else 32
    for row in got:
        w = row["name"].removesuffix("_packed")
        x = orig[w].float()
        y = fp4_values(want[w + "_packed"], want[w + "_scale"], want.get(w + "_global_scale"),
                       group)
        snr = 10 * torch.log10((x.double() ** 2).sum() / ((x - y).double() ** 2).sum()).item()
        assert abs(row["snr_db"] - snr) < 1e-6 * abs(snr), (w, row["snr_db"], snr)
        assert 12 < row["snr_db"] < 30


def downcast_to_mxfp_torch(src, axis):
    """triton_kernels' torch reference for `downcast_to_mxfp(w, torch.uint8, axis)` (what
    transformers' mxfp4 integration calls to quantize gpt-oss's experts; triton_kernels needs a
    GPU), transcribed from triton_kernels/numerics_details/mxfp.py with its default
    DequantScaleRoundingMode.ROUND_UP; lengths along `axis` are multiples of 32 here."""
    def shr(x, s):  # right_shift_unsigned
        return (x >> s) & ((1 << (32 - s)) - 1)
    src = src.transpose(axis, src.ndim - 1).to(torch.float32)
    groups = src.reshape(*src.shape[:-1], src.shape[-1] // 32, 32)
    max_val = groups.abs().max(dim=-1, keepdim=True).values
    ds_int = (max_val / 6.0).view(torch.int32)
    ds_rounded = (ds_int + 0x007FFFFF) & 0x7F800000
    rounded = ds_rounded.view(torch.float32)
    qs = torch.where(rounded == 0, torch.tensor(0.0), 1.0 / rounded)
    q = (groups * qs).reshape(src.shape)
    q_int = q.contiguous().view(torch.int32)
    signs = q_int & 0x80000000
    exponents = shr(q_int, 23) & 0xFF
    mantissas = q_int & 0x7FFFFF
    mantissas = torch.where(exponents < 127,
                            (0x400000 | shr(mantissas, 1)) >> (127 - exponents - 1), mantissas)
    exponents = torch.maximum(exponents, torch.tensor(126)) - 126
    e2m1 = shr(((exponents << 2) | shr(mantissas, 21)) + 1, 1)
    e2m1 = torch.minimum(e2m1, torch.tensor(7))
    v = (shr(signs, 28) | e2m1).to(torch.uint8)
    v = v.view(*v.shape[:-1], v.shape[-1] // 2, 2)
    out = v[..., 0] | (v[..., 1] << 4)
    scale = (ds_rounded >> 23).to(torch.uint8).squeeze(-1)
    return out.transpose(axis, src.ndim - 1), scale.transpose(axis, src.ndim - 1)


def test_gpt_oss_experts_take_gpt_oss_layout(tmp_path):
    """A gpt-oss model's `--to mxfp4`: its MoE experts in gpt-oss's own `_blocks` / `_scales`
    layout as triton_kernels quantizes them (blocks `[E, R, I/32, 16]`), everything else kept,
    the config gpt-oss ships; transformers dequantizes the output to the values weightcast
    reads back."""
    from transformers import GptOssConfig, GptOssForCausalLM, Mxfp4Config
    cfg = GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       num_local_experts=4, num_experts_per_tok=2,
                       layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = GptOssForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        e = model.model.layers[0].mlp.experts
        e.down_proj[1, :, 3] *= 1e-30   # a group of subnormal-range values
        e.down_proj[2, :32, 5] = 0      # a zero group: scale byte 0
        e.gate_up_proj[0, :, 7] *= 1e4
    src, out, back = tmp_path / "src", tmp_path / "out", tmp_path / "back"
    model.save_pretrained(src)
    plan = json.loads(run("convert", src, "-o", out, "--to", "mxfp4", "--dry-run",
                          "--json").stdout)
    run("convert", src, "-o", out, "--to", "mxfp4")
    got, orig = tensors(out), tensors(src)
    experts = [k for k in orig if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(experts) == 4
    for k in experts:
        # transformers quantizes the [E, R, I] transpose along I (axis 2 of it): our [E, I, R]
        # along axis 1
        blocks, scales = downcast_to_mxfp_torch(orig[k].transpose(1, 2).contiguous(), axis=2)
        E, R, half = blocks.shape
        assert torch.equal(got[k + "_blocks"], blocks.reshape(E, R, half // 16, 16)), k
        assert torch.equal(got[k + "_scales"], scales), k
    assert sorted(got) == sorted([k for k in orig if k not in experts]
                                 + [k + s for k in experts for s in ("_blocks", "_scales")])
    for k in orig:
        if k not in experts:
            assert torch.equal(got[k], orig[k]), k
    rows = {r["name"]: r for r in plan["tensors"]}
    assert sorted(rows) == sorted(got)
    for k, r in rows.items():
        assert r["shape"] == list(got[k].shape) and r["bytes_after"] == got[k].nbytes, k
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    ref = GptOssForCausalLM.from_pretrained(out, dtype=torch.bfloat16,
                                            quantization_config=Mxfp4Config(dequantize=True))
    run("convert", out, "-o", back, "--to", "bf16")
    mine = tensors(back)
    for k, v in ref.state_dict().items():
        assert torch.equal(mine[k], v), k
    with torch.no_grad():
        assert torch.isfinite(ref(torch.tensor([[1, 5, 9, 33]])).logits).all()
    # analyze measures each expert against those values
    rows = json.loads(run("analyze", src, "--to", "mxfp4", "--json").stdout)["tensors"]
    assert sorted(r["name"] for r in rows) == sorted(k + "_blocks" for k in experts)
    for r in rows:
        w = r["name"].removesuffix("_blocks")
        x, y = orig[w].double(), mine[w].double()
        snr = 10 * torch.log10((x ** 2).sum() / ((x - y) ** 2).sum()).item()
        assert abs(r["snr_db"] - snr) < 1e-3, (w, r["snr_db"], snr)
