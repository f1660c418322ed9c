"""Low-bit packed checkpoints read exactly: gpt-oss's MXFP4 experts, compressed-tensors'
pack-quantized / int-quantized / nvfp4-pack-quantized / mxfp4-pack-quantized weights, ModelOpt's
NVFP4 weights. Each is dequantized by `convert` and compared bit for bit with the reference:
transformers' own loaders (its mxfp4 integration, compressed-tensors through
`CompressedTensorsConfig(run_compressed=False)`), run here on CPU on checkpoints that
compressed-tensors itself writes; ModelOpt, which does not install here, by its formula written
from `NVFP4QTensor.dequantize` in torch."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run

DT = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def bits(t):
    return t.view({torch.bfloat16: torch.int16, torch.float16: torch.int16,
                   torch.float32: torch.int32}[t.dtype])


def same(a, b):
    """Bit-equal, NaN anywhere counting as equal to NaN (their payloads differ by path)."""
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    nan = a.isnan() & b.isnan()
    return torch.equal(bits(a)[~nan], bits(b)[~nan]) and torch.equal(a.isnan(), b.isnan())


def tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# ---------------------------------------------------------------- gpt-oss MXFP4 experts

def test_gpt_oss_blocks_decode_as_transformers_does(tmp_path):
    """Random blocks and every scale byte class (0, 1, 254, 255 and the usual range), experts
    large enough to be read in several slabs each, to bf16/f16/f32."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    rng = np.random.default_rng(0)
    E, R, G = 2, 1100, 160  # 5120 inputs x 1100 rows per expert: two slabs
    blocks = torch.from_numpy(rng.integers(0, 256, (E, R, G, 16), dtype=np.uint8))
    scales = torch.from_numpy(rng.integers(100, 140, (E, R, G), dtype=np.uint8))
    scales[0, 0, :4] = torch.tensor([0, 1, 254, 255], dtype=torch.uint8)
    scales[1, -1, -4:] = torch.tensor([0, 1, 254, 255], dtype=torch.uint8)
    name = "model.layers.0.mlp.experts.down_proj"
    save_file({f"{name}_blocks": blocks, f"{name}_scales": scales,
               f"{name}_bias": torch.randn(E, R).bfloat16()}, tmp_path / "in.safetensors")
    want = convert_moe_packed_tensors(blocks, scales)
    for to, dt in DT.items():
        out = tmp_path / f"out-{to}.safetensors"
        run("convert", tmp_path / "in.safetensors", "-o", out, "--to", to,
            "--on-overflow", "allow")
        got = load_file(out)
        assert sorted(got) == [name, f"{name}_bias"]
        assert same(got[name], want.to(dt)), to


def quantize_mxfp4(w):
    """A weight [E, in, out] as gpt-oss stores it: blocks [E, out, in/32, 16] (low nibble
    first) and E8M0 scales [E, out, in/32] (any valid encoding: the test is the decoding)."""
    e2m1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32)
    x = w.float().transpose(1, 2).contiguous().numpy()
    E, R, C = x.shape
    g = x.reshape(E, R, C // 32, 32)
    e = np.ceil(np.log2(np.maximum(np.abs(g).max(-1), 1e-30) / 6)).astype(np.int32)
    e = np.clip(e, -127, 127)
    y = g / np.exp2(e)[..., None]
    code = (np.abs(np.abs(y)[..., None] - e2m1).argmin(-1) + 8 * (y < 0)).astype(np.uint8)
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).astype(np.uint8)
    return torch.from_numpy(blocks), torch.from_numpy((e + 127).astype(np.uint8))


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    """A tiny gpt-oss folder with MXFP4 experts and the quantization_config gpt-oss ships."""
    from transformers import GptOssConfig, GptOssForCausalLM
    cfg = GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       num_local_experts=4, num_experts_per_tok=2,
                       layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    sd = GptOssForCausalLM(cfg).to(torch.bfloat16).state_dict()
    out = {}
    for k, v in sd.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[k + "_blocks"], out[k + "_scales"] = quantize_mxfp4(v)
        else:
            out[k] = v.contiguous()
    d = tmp_path_factory.mktemp("gpt-oss") / "mxfp4"
    d.mkdir()
    save_file(out, d / "model.safetensors", metadata={"format": "pt"})
    c = cfg.to_dict()
    c["torch_dtype"] = "bfloat16"
    c["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (d / "config.json").write_text(json.dumps(c))
    return d


def test_gpt_oss_folder_runs_as_transformers_dequantizes_it(gpt_oss, tmp_path):
    from transformers import GptOssForCausalLM, Mxfp4Config
    out = tmp_path / "bf16"
    run("convert", gpt_oss, "-o", out, "--to", "bf16")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    got = tensors(out)
    assert not [k for k in got if k.endswith(("_blocks", "_scales"))]
    ref = GptOssForCausalLM.from_pretrained(gpt_oss, dtype=torch.bfloat16,
                                            quantization_config=Mxfp4Config(dequantize=True))
    for k, v in ref.state_dict().items():
        assert same(got[k], v), k
    mine = GptOssForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    ids = torch.tensor([[1, 5, 9, 33, 2, 7]])
    with torch.no_grad():
        assert torch.equal(mine(ids).logits, ref(ids).logits)


def test_gpt_oss_plan_names_the_parts_and_keep_writes_them(gpt_oss, tmp_path):
    doc = json.loads(run("inspect", gpt_oss, "--json").stdout)
    assert doc["quantization"]["scheme"].startswith("mxfp4")
    names = {t["name"]: t for t in doc["tensors"]}
    assert names["model.layers.0.mlp.experts.gate_up_proj"]["shape"] == [4, 64, 128]
    plan = run("convert", gpt_oss, "-o", tmp_path / "x", "--to", "f16", "--dry-run").stdout
    assert "dequantized: mxfp4 (`model.layers.0.mlp.experts.gate_up_proj_blocks`" in plan
    keep = tmp_path / "keep"
    run("convert", gpt_oss, "-o", keep, "--to", "f16", "--on-quantized", "keep")
    src, got = tensors(gpt_oss), tensors(keep)
    for k in ("model.layers.0.mlp.experts.gate_up_proj_blocks",
              "model.layers.1.mlp.experts.down_proj_scales"):
        assert torch.equal(got[k], src[k])
    assert "quantization_config" in json.loads((keep / "config.json").read_text())


@pytest.mark.parametrize("mutate, says", [
    (lambda sd: sd.pop("model.layers.0.mlp.experts.down_proj_scales"), "down_proj_scales"),
    (lambda sd: sd.__setitem__("model.layers.0.mlp.experts.down_proj_scales",
                               sd["model.layers.0.mlp.experts.down_proj_scales"][:, :-1].contiguous()),
     "down_proj_scales"),
])
def test_gpt_oss_broken_layouts_are_refused(gpt_oss, tmp_path, mutate, says):
    d = tmp_path / "bad"
    shutil.copytree(gpt_oss, d)
    sd = load_file(d / "model.safetensors")
    mutate(sd)
    save_file(sd, d / "model.safetensors")
    r = run("convert", d, "-o", tmp_path / "out", "--to", "bf16", check=False)
    assert r.returncode != 0 and says in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- compressed-tensors

def calibrate(model):
    """A weight-only observer: each scale and zero point from the weight's own min and max."""
    from compressed_tensors.quantization import QuantizationStrategy as S
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
    for _, m in model.named_modules():
        s = getattr(m, "quantization_scheme", None)
        if s is None or s.weights is None:
            continue
        a, w = s.weights, m.weight.data
        if a.strategy in (S.GROUP, S.TENSOR_GROUP):
            g = w.unflatten(-1, (w.shape[-1] // a.group_size, a.group_size))
            mn, mx = g.amin(-1), g.amax(-1)
        elif a.strategy == S.CHANNEL:
            mn, mx = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        else:
            mn, mx = w.amin().reshape(1), w.amax().reshape(1)
        gs = None
        if a.strategy == S.TENSOR_GROUP:
            gs = generate_gparam(w.amin(), w.amax())
            m.weight_global_scale.data.copy_(gs)
        scale, zp = calculate_qparams(mn, mx, a, global_scale=gs)
        m.weight_scale.data.copy_(scale.to(m.weight_scale.dtype))
        if hasattr(m, "weight_zero_point"):
            m.weight_zero_point.data.copy_(zp.to(m.weight_zero_point.dtype))


def make_ct(folder, preset, dtype, group_size=None, weights=None, vocab=64):
    """A tiny Llama compressed by compressed-tensors itself (`ModelCompressor`)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(cfg).to(dtype)
    scheme = copy.deepcopy(PRESET_SCHEMES[preset]) if preset else {"weights": weights}
    if group_size is not None:
        scheme["weights"].group_size = group_size
    qcfg = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"],
                                                                           **scheme)},
                              ignore=["lm_head"])
    apply_quantization_config(model, qcfg)
    calibrate(model)
    comp = ModelCompressor.from_pretrained_model(model)
    comp.compress_model(model)
    model.save_pretrained(folder)
    comp.update_config(folder)


CT_CASES = [
    ("W4A16", None, torch.bfloat16),
    ("W4A16_ASYM", None, torch.bfloat16),
    ("W4A16_ASYM", 32, torch.float32),
    ("W4A16", 32, torch.float16),
    ("W8A16", None, torch.bfloat16),
    ("W2A16", None, torch.bfloat16),
    ("W3A16", None, torch.bfloat16),
    ("INT8", None, torch.bfloat16),
    ("NVFP4A16", None, torch.bfloat16),
    ("MXFP4A16", None, torch.bfloat16),
]


@pytest.mark.parametrize("preset, group, dtype", CT_CASES,
                         ids=[f"{p}-{g}-{str(d)[6:]}" for p, g, d in CT_CASES])
def test_compressed_tensors_dequantizes_as_transformers_does(tmp_path, preset, group, dtype):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig
    src = tmp_path / "ct"
    make_ct(src, preset, dtype, group)
    ref = AutoModelForCausalLM.from_pretrained(
        src, dtype=dtype, quantization_config=CompressedTensorsConfig(run_compressed=False)
    ).state_dict()
    to = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}[dtype]
    out = tmp_path / "out"
    plan = json.loads(run("convert", src, "-o", out, "--to", to, "--dry-run", "--json").stdout)
    run("convert", src, "-o", out, "--to", to)
    got = tensors(out)
    assert sorted(got) == sorted(ref), set(got) ^ set(ref)
    # the plan is the file: every row's name, shape and dtype, the packed parts named
    rows = {r["name"]: r for r in plan["tensors"]}
    assert sorted(rows) == sorted(got)
    for k, r in rows.items():
        assert r["shape"] == list(got[k].shape) and r["bytes_after"] == got[k].nbytes, k
    packed = [r for r in rows.values() if r["dequantize"] and "packed" in r["dequantize"]]
    assert len(packed) == 7 and all(len(r["dequantize"]["parts"]) >= 2 for r in packed)
    for k, v in ref.items():
        assert same(got[k], v.to(dtype)), k
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_compressed_tensors_channel_and_tensor_strategies(tmp_path):
    """Asymmetric per-channel int4 (packed zero points) and asymmetric per-tensor int8 (one int8
    zero point)."""
    from compressed_tensors.quantization import QuantizationArgs
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig
    for n, (b, strategy) in enumerate([(4, "channel"), (8, "tensor")]):
        src = tmp_path / f"ct{n}"
        make_ct(src, None, torch.bfloat16, weights=QuantizationArgs(
            num_bits=b, type="int", strategy=strategy, symmetric=False))
        ref = AutoModelForCausalLM.from_pretrained(
            src, dtype=torch.bfloat16,
            quantization_config=CompressedTensorsConfig(run_compressed=False)).state_dict()
        run("convert", src, "-o", tmp_path / f"out{n}", "--to", "bf16")
        got = tensors(tmp_path / f"out{n}")
        for k, v in ref.items():
            assert same(got[k], v), (strategy, k)


@pytest.mark.parametrize("mutate, says", [
    (lambda sd, p: sd.pop(p + "weight_scale"), "weight_scale"),
    # the ComfyUI-style name for the same scale: never a stray tensor written as a weight
    (lambda sd, p: sd.__setitem__(p + "scale_weight", sd.pop(p + "weight_scale")),
     "weight_scale"),
    (lambda sd, p: sd.__setitem__(p + "weight_scale", sd[p + "weight_scale"].to(torch.int32)),
     "weight_scale"),
    (lambda sd, p: sd.pop(p + "weight_zero_point"), "weight_zero_point"),
    (lambda sd, p: sd.pop(p + "weight_shape"), "weight_shape"),
    (lambda sd, p: sd.__setitem__(p + "weight_shape", torch.tensor([256, 999])), "weight_packed"),
    (lambda sd, p: sd.__setitem__(p + "weight_scale", sd[p + "weight_scale"].t().contiguous()),
     "weight_scale"),
])
def test_compressed_tensors_broken_layouts_are_refused(tmp_path, mutate, says):
    src = tmp_path / "ct"
    make_ct(src, "W4A16_ASYM", torch.bfloat16)
    sd = load_file(src / "model.safetensors")
    mutate(sd, "model.layers.0.mlp.down_proj.")
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    r = run("convert", src, "-o", tmp_path / "out", "--to", "bf16", check=False)
    assert r.returncode != 0 and says in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("preset", ["W4A16", "NVFP4A16", "FP8_DYNAMIC"])
def test_compressed_tensors_folder_to_gguf(tmp_path, preset):
    """A packed or scaled-FP8 folder into GGUF (llama.cpp's converter refuses quantized inputs): the weights
    dequantized on the way, the values those of transformers' dequantization in f16."""
    import gguf
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig
    from conftest import ROOT
    src = tmp_path / "ct"
    make_ct(src, preset, torch.bfloat16, vocab=96)
    shutil.copy(ROOT / "tests" / "fixtures" / "gguf" / "tokenizer.model", src / "tokenizer.model")
    ref = AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.bfloat16,
        quantization_config=CompressedTensorsConfig(run_compressed=False)).state_dict()
    out = tmp_path / "out.gguf"
    run("convert", src, "-o", out, "--to", "f16")
    got = {t.name: t for t in gguf.GGUFReader(out).tensors}
    down = np.array(got["blk.0.ffn_down.weight"].data)
    want = ref["model.layers.0.mlp.down_proj.weight"].half().numpy()
    assert down.shape == want.shape and (down.view(np.uint16) == want.view(np.uint16)).all()
    r = run("convert", src, "-o", tmp_path / "keep.gguf", "--to", "f16", "--on-quantized", "keep",
            check=False)
    assert r.returncode != 0 and "--on-quantized keep" in r.stderr


# ---------------------------------------------------------------- ModelOpt NVFP4

def test_modelopt_nvfp4_multiplies_the_two_scales(tmp_path):
    """ModelOpt's `NVFP4QTensor.dequantize`: `e2m1 * (f32(weight_scale) * weight_scale_2)` in
    f32, then the model dtype (vLLM's emulation computes the same)."""
    rng = np.random.default_rng(3)
    out_f, in_f = 48, 64
    packed = torch.from_numpy(rng.integers(0, 256, (out_f, in_f // 2), dtype=np.uint8))
    scale = torch.from_numpy(rng.integers(0, 0x7e, (out_f, in_f // 16), dtype=np.uint8)).view(
        torch.float8_e4m3fn)
    scale_2 = torch.tensor([1.7e-3], dtype=torch.float32)
    d = tmp_path / "mo"
    d.mkdir()
    p = "model.layers.0.mlp.down_proj."
    save_file({p + "weight": packed, p + "weight_scale": scale, p + "weight_scale_2": scale_2,
               p + "input_scale": torch.tensor([0.5]), "model.norm.weight": torch.ones(8)},
              d / "model.safetensors")
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16"}))
    (d / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4", "group_size": 16}}))
    e2m1 = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])
    idx = torch.stack([packed & 15, packed >> 4], -1).reshape(out_f, in_f).long()
    per_block = scale.to(torch.float32) * scale_2
    want = (e2m1[idx].view(out_f, -1, 16) * per_block.unsqueeze(-1)).reshape(out_f, in_f)
    for to, dt in DT.items():
        run("convert", d, "-o", tmp_path / to, "--to", to)
        got = tensors(tmp_path / to)
        assert sorted(got) == [p + "weight", "model.norm.weight"]
        assert same(got[p + "weight"], want.to(dt)), to
        assert not (tmp_path / to / "hf_quant_config.json").exists()


def test_compressed_tensors_several_config_groups(tmp_path):
    """Two config groups with different schemes in one model (int4 groups of 32, asymmetric, on
    the MLP; int8 per channel on attention): each weight read with its own group's width, group
    size and zero points."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,
                                                 QuantizationScheme, apply_quantization_config)
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(2)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1)).to(torch.bfloat16)
    qcfg = QuantizationConfig(config_groups={
        "mlp": QuantizationScheme(targets=["re:.*mlp.*"], weights=QuantizationArgs(
            num_bits=4, type="int", strategy="group", group_size=32, symmetric=False)),
        "attn": QuantizationScheme(targets=["re:.*self_attn.*"], weights=QuantizationArgs(
            num_bits=8, type="int", strategy="channel", symmetric=True)),
    }, ignore=["lm_head"])
    apply_quantization_config(model, qcfg)
    calibrate(model)
    comp = ModelCompressor.from_pretrained_model(model)
    comp.compress_model(model)
    src = tmp_path / "ct"
    model.save_pretrained(src)
    comp.update_config(src)
    # transformers 5.25's loader fails on two groups of different formats: compressed-tensors'
    # own decompression of the saved model is the reference
    comp.decompress_model(model)
    ref = {k: v for k, v in model.state_dict().items()
           if not k.endswith(("_scale", "_zero_point", "_shape", "_packed"))}
    doc = json.loads(run("inspect", src, "--json").stdout)
    schemes = {t["name"]: t["role"]["packed"]["scheme"] for t in doc["tensors"]
               if t.get("role") and "packed" in t["role"]}
    assert "int4 packed, groups of 32, asymmetric" in schemes["model.layers.0.mlp.up_proj.weight"]
    assert "int8 packed, per channel" in schemes["model.layers.0.self_attn.q_proj.weight"]
    run("convert", src, "-o", tmp_path / "out", "--to", "bf16")
    got = tensors(tmp_path / "out")
    assert sorted(got) == sorted(ref)
    for k, v in ref.items():
        assert same(got[k], v), k
