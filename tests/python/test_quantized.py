"""Scaled FP8 checkpoints: detected, dequantized bit-identically to the reference
implementations run in torch on CPU (DeepSeek's `weight_dequant`, compressed-tensors'
`dequantize`), scales and quantization_config removed, or refused / kept as asked.

Fixtures are made here with real torch and compressed-tensors."""

import json
import math
import pathlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run

FP8 = torch.float8_e4m3fn


def deepseek_quantize(w, block=(128, 128)):
    """FP8 block quantization as DeepSeek-V3 checkpoints hold it: `weight` in float8_e4m3fn
    and `weight_scale_inv` f32 per block (a multiplier, despite the name)."""
    m, n = w.shape
    br, bc = block
    s = torch.empty(math.ceil(m / br), math.ceil(n / bc), dtype=torch.float32)
    q = torch.empty(m, n, dtype=FP8)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc].float()
            sc = blk.abs().max().clamp(min=1e-12) / 448.0
            s[i, j] = sc
            q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = (blk / sc).clamp(-448, 448).to(FP8)
    return q, s


def weight_dequant(x, s, block=(128, 128), dtype=torch.bfloat16):
    """DeepSeek-V3 `inference/kernel.py` `weight_dequant` on CPU: fp8 -> f32, times the block's
    scale in f32, then cast to the default dtype (bf16 in `fp8_cast_bf16.py`)."""
    m, n = x.shape
    br, bc = block
    full = s.repeat_interleave(br, 0)[:m].repeat_interleave(bc, 1)[:, :n]
    return (x.to(torch.float32) * full).to(dtype)


def make_deepseek(folder: pathlib.Path, sharded=True, block=(128, 128)):
    """A DeepSeek-style folder: two FP8 linear layers with block scales (partial edge blocks),
    bf16 norms and embeddings, config.json with quantization_config, two shards and an index."""
    torch.manual_seed(0)
    folder.mkdir(parents=True)
    tensors = {"model.embed_tokens.weight": (torch.randn(50, 200) * 0.02).bfloat16()}
    for k, (m, n) in enumerate([(300, 200), (200, 300)]):
        w = torch.randn(m, n) * 0.02
        w[0, 0] = 0.3  # a large value in one block: scales differ per block
        q, s = deepseek_quantize(w, block)
        tensors[f"model.layers.{k}.mlp.proj.weight"] = q
        tensors[f"model.layers.{k}.mlp.proj.weight_scale_inv"] = s
        tensors[f"model.layers.{k}.norm.weight"] = torch.ones(n if k else m).bfloat16()
    names = sorted(tensors)
    if sharded:
        halves = [names[: len(names) // 2], names[len(names) // 2:]]
        weight_map = {}
        for i, part in enumerate(halves):
            fname = f"model-0000{i + 1}-of-00002.safetensors"
            save_file({n: tensors[n] for n in part}, folder / fname, metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": 0}, "weight_map": weight_map}))
    else:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic",
                                "fmt": "e4m3", "weight_block_size": list(block)},
    }))
    return tensors


def load_folder(folder: pathlib.Path):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def bits_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    if a.dtype in (torch.bfloat16, torch.float16):
        return torch.equal(a.view(torch.int16), b.view(torch.int16))
    if a.dtype == torch.float32:
        return torch.equal(a.view(torch.int32), b.view(torch.int32))
    return torch.equal(a.view(torch.int64), b.view(torch.int64))


@pytest.mark.parametrize("to,dtype", [("bf16", torch.bfloat16), ("f16", torch.float16),
                                      ("f32", torch.float32)])
def test_deepseek_block_fp8_dequantized_like_weight_dequant(tmp_path, to, dtype):
    src = tmp_path / "ds"
    tensors = make_deepseek(src)
    out = tmp_path / "out"
    run("convert", src, "-o", out, "--to", to)
    got = load_folder(out)
    assert not [n for n in got if n.endswith("_scale_inv")]
    for k in range(2):
        name = f"model.layers.{k}.mlp.proj.weight"
        want = weight_dequant(tensors[name], tensors[name + "_scale_inv"], dtype=dtype)
        assert bits_equal(got[name], want), name
        # the values are the model's (|w| < 0.3), not the raw payload's (up to 448)
        assert got[name].float().abs().max() < 0.31
    assert bits_equal(got["model.embed_tokens.weight"],
                      tensors["model.embed_tokens.weight"].to(dtype))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["torch_dtype"] == {"bf16": "bfloat16", "f16": "float16",
                                     "f32": "float32"}[to]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got)
    assert not [n for n in index["weight_map"] if "scale" in n]
    # transformers' own loader reads the index and config
    from transformers import AutoConfig
    assert getattr(AutoConfig.from_pretrained(out), "quantization_config", None) is None


def test_deepseek_plan_shows_dequantize_and_is_the_output(tmp_path):
    src = tmp_path / "ds"
    make_deepseek(src, sharded=False, block=(64, 128))
    out = tmp_path / "out.safetensors"
    # no config beside a single file given alone: found from the tensor names, 128x128 blocks
    # do not fit 64-row blocks, so the file alone cannot be dequantized: the run refuses, and
    # the dry run refuses the same way (same exit code, same message)
    p = run("convert", src / "model.safetensors", "-o", out, "--to", "bf16", check=False)
    assert p.returncode == 1 and "cannot dequantize" in p.stderr and not out.exists()
    d = run("convert", src / "model.safetensors", "-o", out, "--to", "bf16", "--dry-run",
            check=False)
    assert (d.returncode, d.stderr) == (p.returncode, p.stderr) and not out.exists()
    # the folder's config gives the block
    plan = json.loads(run("convert", src, "-o", tmp_path / "o2", "--to", "bf16",
                          "--dry-run", "--json").stdout)
    q = plan["quantization"]
    assert q["action"] == "dequantize" and q["layouts"] == ["block 64x128"]
    payloads = [t for t in plan["tensors"] if t["dequantize"]]
    assert len(payloads) == 2
    assert all("dequantize (block 64x128" in t["rule"] for t in payloads)
    assert sorted(r["name"] for r in plan["removed"]) == [
        "model.layers.0.mlp.proj.weight_scale_inv", "model.layers.1.mlp.proj.weight_scale_inv"]
    run("convert", src, "-o", tmp_path / "o2", "--to", "bf16")
    got = load_folder(tmp_path / "o2")
    assert sorted(got) == sorted(t["name"] for t in plan["tensors"])
    for t in plan["tensors"]:
        assert got[t["name"]].dtype == {"BF16": torch.bfloat16}[t["to"]]


def test_deepseek_on_quantized_keep_passes_everything_through(tmp_path):
    src = tmp_path / "ds"
    tensors = make_deepseek(src)
    out = tmp_path / "out"
    run("convert", src, "-o", out, "--to", "f16", "--on-quantized", "keep")
    got = load_folder(out)
    assert sorted(got) == sorted(tensors)
    for n, t in tensors.items():
        if t.dtype == FP8 or n.endswith("_scale_inv"):
            assert got[n].dtype == t.dtype and torch.equal(got[n].view(torch.uint8),
                                                           t.view(torch.uint8)), n
        else:
            assert got[n].dtype == torch.float16
    assert "quantization_config" in json.loads((out / "config.json").read_text())


def test_inspect_names_the_scheme_and_roles(tmp_path):
    src = tmp_path / "ds"
    make_deepseek(src)
    text = run("inspect", src).stdout
    assert "quantized: fp8" in text and "block 128x128" in text
    assert "payload (block 128x128, scale `model.layers.0.mlp.proj.weight_scale_inv`)" in text
    j = json.loads(run("inspect", src, "--json").stdout)
    roles = {t["name"]: t["role"] for t in j["tensors"]}
    assert roles["model.layers.1.mlp.proj.weight_scale_inv"] == "scale"
    assert roles["model.layers.1.mlp.proj.weight"]["payload"]["layout"] == "block 128x128"
    assert roles["model.embed_tokens.weight"] is None
    assert j["quantization"]["scheme"].startswith("fp8")


def test_analyze_reads_dequantized_values(tmp_path):
    src = tmp_path / "ds"
    make_deepseek(src)
    j = json.loads(run("analyze", src, "--to", "f16", "--json").stdout)
    rows = {t["name"]: t for t in j["tensors"]}
    w = rows["model.layers.0.mlp.proj.weight"]
    assert w["overflow"] == 0
    # measured on the dequantized f32 values (|w| <= 0.3), not on the raw payload (up to
    # 448, all of it f16-exact): f16 rounds some of them, and flushes none to zero
    assert w["max_abs_err"] > 0 and w["max_abs_err"] < 1e-3 and w["max_abs"] < 0.31


# --- compressed-tensors -------------------------------------------------------------------

def ct_quantize(w, strategy, block=None):
    """Weights quantized with compressed-tensors' own functions (observer-free min/max)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True,
                            dynamic=False, block_structure=block)
    if strategy == "tensor":
        mn, mx = w.min(), w.max()
    elif strategy == "channel":
        mn, mx = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    else:
        br, bc = block
        m, n = w.shape
        pad = torch.zeros(math.ceil(m / br) * br, math.ceil(n / bc) * bc, dtype=w.dtype)
        pad[:m, :n] = w
        blocks = pad.reshape(pad.shape[0] // br, br, pad.shape[1] // bc, bc).transpose(1, 2)
        mn, mx = blocks.amin(dim=(-1, -2)), blocks.amax(dim=(-1, -2))
    scale, zp = calculate_qparams(mn, mx, args)
    q = quantize(w, scale, zp, args, dtype=FP8).contiguous()
    return q, scale, args


def make_ct(folder, strategy, wdtype=torch.bfloat16, block=None):
    torch.manual_seed(1)
    folder.mkdir(parents=True)
    tensors, refs = {}, {}
    for k, (m, n) in enumerate([(96, 160), (160, 96)]):
        w = (torch.randn(m, n) * 0.05).to(wdtype)
        q, s, args = ct_quantize(w, strategy, block)
        tensors[f"layers.{k}.fc.weight"] = q
        tensors[f"layers.{k}.fc.weight_scale"] = s
        tensors[f"layers.{k}.fc.bias"] = torch.zeros(m, dtype=wdtype)
        refs[f"layers.{k}.fc.weight"] = (q, s, args)
    tensors["lm_head.weight"] = (torch.randn(10, 96) * 0.05).to(wdtype)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    weights = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True,
               "dynamic": False}
    if block:
        weights["block_structure"] = list(block)
    (folder / "config.json").write_text(json.dumps({
        "torch_dtype": str(wdtype).removeprefix("torch."),
        "quantization_config": {
            "quant_method": "compressed-tensors", "format": "float-quantized",
            "quantization_status": "compressed", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": None}}}}))
    return tensors, refs


@pytest.mark.parametrize("strategy,block,wdtype", [
    ("channel", None, torch.bfloat16),
    ("tensor", None, torch.float16),
    ("block", (64, 64), torch.bfloat16),
    ("channel", None, torch.float32),
])
@pytest.mark.parametrize("to,dtype", [("bf16", torch.bfloat16), ("f32", torch.float32)])
def test_compressed_tensors_dequantized_like_compressed_tensors(tmp_path, strategy, block,
                                                               wdtype, to, dtype):
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    src = tmp_path / "ct"
    tensors, refs = make_ct(src, strategy, wdtype, block)
    out = tmp_path / "out"
    run("convert", src, "-o", out, "--to", to)
    got = load_folder(out)
    assert not [n for n in got if n.endswith("_scale")]
    for name, (q, s, args) in refs.items():
        want = dequantize(q, s, None, args).to(dtype)
        assert bits_equal(got[name], want), name
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_unsupported_scheme_is_refused_or_kept(tmp_path):
    src = tmp_path / "ct"
    tensors, _ = make_ct(src, "channel")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["format"] = "pack-quantized"
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    p = run("convert", src, "-o", out, "--to", "bf16", check=False)
    assert p.returncode == 1, p.stderr
    assert "pack-quantized" in p.stderr and "--on-quantized keep" in p.stderr
    assert not out.exists()
    run("convert", src, "-o", out, "--to", "bf16", "--on-quantized", "keep")
    got = load_folder(out)
    assert got["layers.0.fc.weight"].dtype == FP8
    assert got["layers.0.fc.weight_scale"].dtype == torch.bfloat16
    assert "quantization_config" in json.loads((out / "config.json").read_text())


def test_names_alone_detect_a_scaled_file(tmp_path):
    """A single file with no config: `X.weight` fp8 beside `X.weight_scale` is a payload."""
    torch.manual_seed(2)
    w = torch.randn(64, 32) * 0.01
    s = w.abs().amax(dim=1, keepdim=True) / 448.0
    q = (w / s).to(FP8)
    save_file({"fc.weight": q, "fc.weight_scale": s, "fc.input_scale": torch.ones(1)},
              tmp_path / "m.safetensors")
    run("convert", tmp_path / "m.safetensors", "-o", tmp_path / "o.safetensors", "--to", "bf16")
    got = load_file(tmp_path / "o.safetensors")
    assert sorted(got) == ["fc.weight"]
    assert bits_equal(got["fc.weight"], (q.float() * s).bfloat16())


def test_comfyui_scaled_fp8(tmp_path):
    """ComfyUI fp8_scaled: per-tensor `scale_weight`, a `scaled_fp8` marker and the
    `_quantization_metadata` key, all gone after dequantizing."""
    torch.manual_seed(3)
    w = torch.randn(40, 24) * 0.1
    s = (w.abs().max() / 448.0).reshape(())
    q = (w / s).to(FP8)
    meta = {"format": "pt", "_quantization_metadata": json.dumps(
        {"format_version": "1.0", "layers": {"blk.lin": {"format": "float8_e4m3fn"}}})}
    save_file({"blk.lin.weight": q, "blk.lin.scale_weight": s.float(),
               "blk.lin.bias": torch.zeros(40, dtype=torch.bfloat16),
               "scaled_fp8": torch.empty(0, dtype=FP8)}, tmp_path / "c.safetensors",
              metadata=meta)
    out = tmp_path / "o.safetensors"
    run("convert", tmp_path / "c.safetensors", "-o", out, "--to", "bf16")
    got = load_file(out)
    assert sorted(got) == ["blk.lin.bias", "blk.lin.weight"]
    assert bits_equal(got["blk.lin.weight"], (q.float() * s).bfloat16())
    from safetensors import safe_open
    with safe_open(out, "pt") as f:
        assert "_quantization_metadata" not in (f.metadata() or {})


# --- writing scaled FP8 -----------------------------------------------------------------

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "quantized"
REFERENCE = json.loads((FIXTURES / "llmcompressor.json").read_text())
# llm-compressor's preset -> weightcast's options
SCHEMES = {"FP8_DYNAMIC": ["--to", "f8e4m3", "--scale", "channel"],
           "FP8_BLOCK": ["--to", "f8e4m3", "--scale", "block"],
           "NVFP4A16": ["--to", "nvfp4"], "MXFP4A16": ["--to", "mxfp4"]}


def digests(folder):
    import hashlib
    from safetensors import safe_open
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            for n in sf.keys():
                t = sf.get_tensor(n).contiguous()
                raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
                out[n] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                          "sha256": hashlib.sha256(raw).hexdigest()}
    return out


def model_dir(label, minilm):
    return FIXTURES / "tiny-llama" if label == "tiny-llama" else minilm


@pytest.mark.parametrize("label", ["tiny-llama", "all-MiniLM-L6-v2"])
@pytest.mark.parametrize("preset", list(SCHEMES))
def test_quantized_output_is_llmcompressor_byte_for_byte(tmp_path, minilm, label, preset):
    """Scaled FP8 (FP8_DYNAMIC, FP8_BLOCK) and FP4 (NVFP4A16, MXFP4A16: packed values, scales,
    global scales): every tensor equals llm-compressor `oneshot`'s (digests made by
    tests/fixtures/quantized/generate.py), and the config is the one it writes."""
    ref = REFERENCE["models"][label][preset]
    out = tmp_path / "out"
    run("convert", model_dir(label, minilm), "-o", out, *SCHEMES[preset])
    got = digests(out)
    assert any(n.endswith(("weight_scale", "weight_packed")) for n in ref["tensors"])
    # transformers' save_pretrained drops the non-persistent buffer `position_ids`; weightcast
    # keeps every tensor of its input
    assert set(got) - set(ref["tensors"]) <= {"embeddings.position_ids"}
    for name, want in ref["tensors"].items():
        assert got.get(name) == want, name
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    want = dict(ref["quantization_config"])
    want.pop("version")
    assert config == want


def test_scaled_fp8_plan_is_the_output(tmp_path):
    out = tmp_path / "out"
    args = ["convert", FIXTURES / "tiny-llama", "-o", out, "--to", "f8e4m3", "--scale",
            "block:32x64", "--keep", "re:q_proj"]
    plan = json.loads(run(*args, "--dry-run", "--json").stdout)
    run(*args)
    got = load_folder(out)
    assert sorted(t["name"] for t in plan["tensors"]) == sorted(got)
    dt = {"F8_E4M3": torch.float8_e4m3fn, "BF16": torch.bfloat16}
    for t in plan["tensors"]:
        assert got[t["name"]].dtype == dt[t["to"]], t["name"]
        assert list(got[t["name"]].shape) == t["shape"]
    q = {t["name"]: t for t in plan["tensors"] if t["quantize"] and "scale" in t["quantize"]}
    # linear weights only: embeddings, lm_head, norms stay; the rule keeps q_proj
    assert sorted(q) == sorted(n for n in got if n.endswith("proj.weight")
                               and "q_proj" not in n)
    assert all(got[n + "_scale"].shape == (math.ceil(got[n].shape[0] / 32),
                                            math.ceil(got[n].shape[1] / 64)) for n in q)
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert sorted(ignore) == sorted(["lm_head", "model.layers.0.self_attn.q_proj",
                                     "model.layers.1.self_attn.q_proj"])
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_scaled_fp8_loads_with_transformers_and_stays_close(tmp_path, minilm):
    from transformers import AutoModel, AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 20, 33, 47, 60, 2]])
    out = tmp_path / "llama"
    run("convert", FIXTURES / "tiny-llama", "-o", out, "--to", "f8e4m3", "--scale", "channel")
    ref = AutoModelForCausalLM.from_pretrained(FIXTURES / "tiny-llama", dtype=torch.float32)
    m = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        r, o = ref(ids).logits, m(ids).logits.float()
    assert (o - r).abs().max() < 0.1 * r.abs().max()

    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    ref = AutoModel.from_pretrained(minilm)
    with torch.no_grad():
        r = ref(ids).last_hidden_state.mean(1)
    for scale in ["channel", "block"]:
        out = tmp_path / f"minilm-{scale}"
        run("convert", minilm, "-o", out, "--to", "f8e4m3", "--scale", scale)
        m = AutoModel.from_pretrained(out)
        with torch.no_grad():
            o = m(ids).last_hidden_state.mean(1).float()
        assert torch.nn.functional.cosine_similarity(o, r).item() > 0.99, scale


def test_scaled_fp8_round_trip_equals_compressed_tensors_decompression(tmp_path):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    for scale in ["channel", "block:32x64", "tensor"]:
        q = tmp_path / f"q-{scale}"
        run("convert", FIXTURES / "tiny-llama", "-o", q, "--to", "f8e4m3", "--scale", scale)
        config = json.loads((q / "config.json").read_text())["quantization_config"]
        group = config["config_groups"]["group_0"]
        scheme = QuantizationScheme(targets=group["targets"],
                                    weights=QuantizationArgs(**group["weights"]))
        compressor = BaseCompressor.load_from_registry("float-quantized")
        back = tmp_path / f"back-{scale}"
        run("convert", q, "-o", back, "--to", "bf16")
        assert "quantization_config" not in json.loads((back / "config.json").read_text())
        qs, got = load_folder(q), load_folder(back)
        assert sorted(got) == sorted(n for n in qs if not n.endswith("_scale"))
        for name in [n for n in qs if n.endswith("_scale")]:
            w = name.removesuffix("_scale")
            want = compressor.decompress({"weight": qs[w], "weight_scale": qs[name]},
                                         scheme=scheme)["weight"].to(torch.bfloat16)
            assert bits_equal(got[w], want), (scale, w)


def test_vllm_fp8_block_format(tmp_path):
    out = tmp_path / "fp8"
    run("convert", FIXTURES / "tiny-llama", "-o", out, "--to", "f8e4m3", "--scale", "block",
        "--scale-format", "fp8")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "fp8" and config["weight_block_size"] == [128, 128]
    got = load_folder(out)
    src = load_folder(FIXTURES / "tiny-llama")
    scales = [n for n in got if n.endswith("_scale_inv")]
    assert len(scales) == 14 and all(got[n].dtype == torch.float32 for n in scales)
    for n in scales:
        w = n.removesuffix("_scale_inv")
        deq = weight_dequant(got[w], got[n], dtype=torch.float32)
        x = src[w].float()
        # each value within e4m3's half-ulp (2^-4 relative) of the original, or below the
        # block's smallest subnormal
        tol = x.abs() / 16 + got[n].max() * 2.0 ** -9
        assert ((deq - x).abs() <= tol).all(), w
    # weightcast reads its own output back as what it is
    back = tmp_path / "back"
    run("convert", out, "-o", back, "--to", "bf16")
    assert not [n for n in load_folder(back) if "scale" in n]


def test_scale_refusals(tmp_path):
    src = FIXTURES / "tiny-llama"
    for args, words in [
        (["--to", "bf16", "--scale", "channel"], "--to f8e4m3"),
        (["--to", "f8e4m3", "--scale", "row"], "--scale row"),
        (["--to", "f8e4m3", "--scale", "channel", "--scale-format", "fp8"], "block"),
    ]:
        p = run("convert", src, "-o", tmp_path / "o", *args, check=False)
        assert p.returncode == 2 and words in p.stderr, (args, p.stderr)
        assert not (tmp_path / "o").exists()
    ds = tmp_path / "ds"
    make_deepseek(ds)
    p = run("convert", ds, "-o", tmp_path / "o", "--to", "f8e4m3", "--scale", "channel",
            check=False)
    assert p.returncode == 2 and "already quantized" in p.stderr


def test_analyze_diff_and_eval_read_scaled_fp8(tmp_path, minilm):
    """What scaling buys, in figures: unscaled e4m3 flushes ~370k MiniLM values to zero,
    channel scales almost none; diff and eval read the scaled output as its values."""
    def flushed(*args):
        j = json.loads(run("analyze", minilm, "--to", "f8e4m3", *args, "--json").stdout)
        return sum(t["underflow"] for t in j["tensors"]), len(j["tensors"])

    plain, n_plain = flushed()
    scaled, n_scaled = flushed("--scale", "channel")
    assert plain > 100_000 and scaled < 1_000, (plain, scaled)
    assert n_scaled == 37 < n_plain  # the linear weights only
    out = tmp_path / "q"
    run("convert", minilm, "-o", out, "--to", "f8e4m3", "--scale", "channel")
    d = json.loads(run("diff", minilm, out, "--json").stdout)
    assert not d["only_a"] and not d["only_b"]  # scales are not tensors of the model
    w = next(c for c in d["common"] if c["name"] == "pooler.dense.weight")
    assert w["b_dtype"] == "F32" and 25 < w["snr_db"] < 40
    p = run("eval", minilm, "--candidate", out, "--dtypes", "f16", "--runs", "1", "--json")
    rows = json.loads(p.stdout)["candidates"]
    c = next(r for r in rows if r["name"] == str(out))
    assert c["cosine_min"] > 0.99 and c["compute"] == "float32"
    # stored FP8 payloads and scales, not the dequantized f32
    assert c["weight_bytes"] < 0.7 * rows[0]["weight_bytes"]


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scale,strategy,block", [("channel", "channel", None),
                                                  ("block:32x48", "block", (32, 48)),
                                                  ("tensor", "tensor", None)])
def test_scaled_fp8_edge_values_match_compressed_tensors(tmp_path, wdtype, scale, strategy,
                                                         block):
    """Zero rows (scale = the dtype's eps), tiny and large magnitudes, partial blocks: payload
    and scale bytes equal compressed-tensors' calculate_qparams + quantize."""
    torch.manual_seed(4)
    w = torch.randn(70, 100) * 0.02
    w[3] = 0.0                      # a zero row / block
    w[5, :10] = 1e-6                # values that flush to zero after scaling
    w[7, 7] = 60.0                  # one large value (within f16)
    w = w.to(wdtype)
    src = tmp_path / "m"
    src.mkdir()
    save_file({"fc.weight": w, "fc.bias": torch.zeros(70, dtype=wdtype)},
              src / "model.safetensors")
    (src / "config.json").write_text(json.dumps({"model_type": "x"}))
    out = tmp_path / "o"
    run("convert", src, "-o", out, "--to", "f8e4m3", "--scale", scale)
    got = load_folder(out)
    q, s, _ = ct_quantize(w, strategy, block)
    assert got["fc.weight_scale"].dtype == wdtype
    assert bits_equal(got["fc.weight_scale"], s.reshape(got["fc.weight_scale"].shape))
    assert torch.equal(got["fc.weight"].view(torch.uint8), q.view(torch.uint8))


# --- precision policy ---------------------------------------------------------------------

def test_to_auto_keeps_the_source_precision(tmp_path):
    src = tmp_path / "ds"
    tensors = make_deepseek(src)
    out = tmp_path / "out"
    plan = json.loads(run("convert", src, "-o", out, "--to", "auto", "--dry-run", "--json").stdout)
    assert plan["target"] == "bfloat16"  # from the tensors (embeddings and norms are bf16)
    run("convert", src, "-o", out, "--to", "auto")
    got = load_folder(out)
    for n, t in got.items():
        assert t.dtype == torch.bfloat16, n
        if n in tensors and tensors[n].dtype == torch.bfloat16:
            assert bits_equal(t, tensors[n])
    w = "model.layers.0.mlp.proj.weight"
    assert bits_equal(got[w], weight_dequant(tensors[w], tensors[w + "_scale_inv"]))
    # a mixed model keeps every tensor's dtype: a pure format move
    mixed = {"a.weight": torch.randn(4, 4), "a.norm": torch.randn(4).bfloat16(),
             "ids": torch.arange(3)}
    save_file(mixed, tmp_path / "mixed.safetensors")
    run("convert", tmp_path / "mixed.safetensors", "-o", tmp_path / "m.pt", "--to", "auto")
    back = torch.load(tmp_path / "m.pt", weights_only=True)
    for n, t in mixed.items():
        assert back[n].dtype == t.dtype and torch.equal(back[n], t), n


def test_llama_cpp_f32_preset(tmp_path):
    t = {"model.layers.0.mlp.gate.weight": torch.randn(8, 16),            # MoE router
         "model.layers.0.mlp.gate_proj.weight": torch.randn(32, 16),      # a linear layer
         "model.layers.0.input_layernorm.weight": torch.ones(16).bfloat16(),
         "embeddings.position_embeddings.weight": torch.randn(10, 16),
         "embeddings.token_type_embeddings.weight": torch.randn(2, 16),
         "backbone.layers.0.mixer.conv1d.weight": torch.randn(32, 1, 4),
         "model.embed_tokens.weight": torch.randn(50, 16)}
    save_file(t, tmp_path / "m.safetensors")
    out = tmp_path / "o.safetensors"
    run("convert", tmp_path / "m.safetensors", "-o", out, "--to", "f16", "--preset",
        "llama-cpp-f32")
    got = load_file(out)
    f32 = {n for n, v in got.items() if v.dtype == torch.float32}
    assert f32 == {"model.layers.0.mlp.gate.weight", "model.layers.0.input_layernorm.weight",
                   "embeddings.position_embeddings.weight",
                   "embeddings.token_type_embeddings.weight",
                   "backbone.layers.0.mixer.conv1d.weight"}
    assert got["model.layers.0.input_layernorm.weight"].equal(torch.ones(16))  # bf16 -> f32
    assert got["model.layers.0.mlp.gate_proj.weight"].dtype == torch.float16


@pytest.mark.parametrize("to,dtype", [("f8e4m3fnuz", torch.float8_e4m3fnuz),
                                      ("float8_e5m2fnuz", torch.float8_e5m2fnuz),
                                      ("f8e8m0", torch.float8_e8m0fnu)])
def test_fnuz_and_e8m0_outputs_load_with_torch(tmp_path, to, dtype):
    x = torch.randn(7, 5) * 10
    save_file({"a": x, "n": torch.arange(3)}, tmp_path / "i.safetensors")
    for out in ["o.safetensors", "o.pt"]:
        run("convert", tmp_path / "i.safetensors", "-o", tmp_path / out, "--to", to,
            "--on-overflow", "allow")
        got = (load_file(tmp_path / out) if out.endswith("safetensors")
               else torch.load(tmp_path / out, weights_only=True))
        assert got["a"].dtype == dtype
        assert torch.equal(got["a"].view(torch.uint8), x.to(dtype).view(torch.uint8))
        assert torch.equal(got["n"], torch.arange(3))
    # read back and cast again (fnuz -> bf16 as torch does)
    run("convert", tmp_path / "o.safetensors", "-o", tmp_path / "b.safetensors", "--to", "bf16")
    assert torch.equal(load_file(tmp_path / "b.safetensors")["a"].view(torch.int16),
                       x.to(dtype).to(torch.bfloat16).view(torch.int16))


def _fp32_params_after_transformers_load(folder, dtype, cls):
    m = cls.from_pretrained(folder, dtype=dtype)
    return {n for n, p in m.state_dict().items() if p.dtype == torch.float32}


@pytest.mark.parametrize("to,dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_transformers_fp32_preset_matches_transformers_loading(tmp_path, to, dtype):
    """The tensors the preset keeps in f32 are exactly those transformers keeps in float32 when
    it loads the model in that dtype (T5: `wo`, for float16 only; DeepSeek-V3: the MoE router
    gate and its score-correction bias, for both)."""
    from transformers import (DeepseekV3Config, DeepseekV3ForCausalLM, T5Config,
                              T5ForConditionalGeneration)

    torch.manual_seed(5)
    models = {
        "t5": T5ForConditionalGeneration(T5Config(
            vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)),
        "ds": DeepseekV3ForCausalLM(DeepseekV3Config(
            vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4,
            num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
            topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=64)),
    }
    for label, model in models.items():
        src, out = tmp_path / label, tmp_path / f"{label}-{to}"
        model.save_pretrained(src)
        plan = json.loads(run("convert", src, "-o", out, "--to", to, "--preset",
                              "transformers-fp32", "--dry-run", "--json").stdout)
        ours = {t["name"] for t in plan["tensors"] if t["to"] == "F32"}
        cls = type(model)
        want = _fp32_params_after_transformers_load(src, dtype, cls)
        saved = set(load_folder(src))
        assert ours == want & saved, (label, to, ours ^ (want & saved))
        if label == "t5":
            assert bool(ours) == (to == "f16")
        else:
            assert ours  # the router gates, in both


def test_modelopt_and_fbgemm_are_dequantized(tmp_path):
    """ModelOpt (hf_quant_config.json, per-tensor f32 weight_scale and input_scale) and
    fbgemm_fp8 (per-channel f32 weight_scale): fp8 times scale in f32, then the target."""
    torch.manual_seed(6)
    w = torch.randn(48, 32) * 0.05
    # ModelOpt
    s = (w.abs().max() / 448.0).reshape(())
    q = (w / s).to(FP8)
    mo = tmp_path / "modelopt"
    mo.mkdir()
    save_file({"l.weight": q, "l.weight_scale": s, "l.input_scale": torch.tensor(0.5),
               "l.bias": torch.zeros(48, dtype=torch.bfloat16)}, mo / "model.safetensors")
    (mo / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16"}))
    (mo / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8"}}))
    assert "modelopt FP8" in run("inspect", mo).stdout
    run("convert", mo, "-o", tmp_path / "mo-bf16", "--to", "bf16")
    got = load_folder(tmp_path / "mo-bf16")
    assert sorted(got) == ["l.bias", "l.weight"]
    assert bits_equal(got["l.weight"], (q.float() * s).bfloat16())
    assert not (tmp_path / "mo-bf16" / "hf_quant_config.json").exists()
    # fbgemm_fp8
    s = w.abs().amax(dim=1, keepdim=True) / 448.0
    q = (w / s).to(FP8)
    fb = tmp_path / "fbgemm"
    fb.mkdir()
    save_file({"l.weight": q, "l.weight_scale": s}, fb / "model.safetensors")
    (fb / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}}))
    plan = json.loads(run("convert", fb, "-o", tmp_path / "fb-f16", "--to", "f16", "--dry-run",
                          "--json").stdout)
    assert plan["quantization"]["layouts"] == ["per channel"]
    run("convert", fb, "-o", tmp_path / "fb-f16", "--to", "f16")
    assert bits_equal(load_folder(tmp_path / "fb-f16")["l.weight"], (q.float() * s).half())
    # a GPTQ config without its options over a lone qweight is refused, naming the scheme
    gp = tmp_path / "gptq"
    gp.mkdir()
    save_file({"l.qweight": torch.zeros(4, 8, dtype=torch.int32)}, gp / "model.safetensors")
    (gp / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    p = run("convert", gp, "-o", tmp_path / "gp", "--to", "f16", check=False)
    assert p.returncode == 1 and "gptq" in p.stderr, p.stderr


def test_dequantized_pt_output_from_an_index(tmp_path):
    """A sharded set given by its index (no config: the scheme from the names, 128x128 blocks)
    dequantized into a .pt that torch.load(weights_only=True) reads."""
    src = tmp_path / "ds"
    tensors = make_deepseek(src)
    out = tmp_path / "ds.pt"
    run("convert", src / "model.safetensors.index.json", "-o", out, "--to", "bf16")
    sd = torch.load(out, weights_only=True)
    assert sorted(sd) == sorted(n for n in tensors if not n.endswith("_scale_inv"))
    for k in range(2):
        w = f"model.layers.{k}.mlp.proj.weight"
        assert bits_equal(sd[w], weight_dequant(tensors[w], tensors[w + "_scale_inv"]))

