"""Generates the GPTQ and AWQ fixtures in tests/fixtures/lowbit/ (gptq-*, awq-*).

Each fixture is a tiny Llama folder (config.json with the quantization_config the real
libraries write + model.safetensors) whose Linear layers are packed by the real packers, and
`reference.safetensors`: each packed Linear's `X.weight` [out, in] as the real library
dequantizes it (gptqmodel `TorchLinear.dequantize_weight()`, autoawq `dequantize_gemm`,
transposed), which tests/python/test_lowbit_gptq_awq.py compares weightcast's output to.

* GPTQ (gptqmodel 7.7.0): `TorchLinear.pack_original` packs integers chosen per layer (random
  q, scales f16, zero points including 0 and the maximum, `g_idx` shuffled for act-order);
  the reference is `dequantize_weight()` of that module (gptqmodel's internal v2 zeros); v1
  (`format: gptq`) files are then written through gptqmodel's own v2 -> v1 export
  (`convert_gptq_v2_to_v1_format_module`: a packed-word subtract, so a zero point of 0 borrows).
  Every fixture is also loaded back with transformers (+ optimum + gptqmodel, CPU) and each
  layer's `dequantize_weight()` there must equal the reference.
* AWQ (autoawq 0.2.9): autoawq's `pseudo_quantize_tensor` (RTN, zero point) gives scales and
  zeros, `WQLinear_GEMM.from_linear` / `WQLinear_GEMV.from_linear` pack; the reference is
  `dequantize_gemm` of the GEMM packing (autoawq has no CPU dequantization for GEMV; its
  layout is checked here to hold the same integers).

Run (needs torch, transformers, gptqmodel 7.7.0, autoawq 0.2.9, optimum, CPU only; about two
minutes, mostly imports and the transformers load checks), in a venv made like this:

    .venv/bin/python -m venv /tmp/lowbit-venv
    .venv/bin/python -c 'import site; print(site.getsitepackages()[0])' \
        > "$(/tmp/lowbit-venv/bin/python -c 'import site; print(site.getsitepackages()[0])')/test-env.pth"
    /tmp/lowbit-venv/bin/pip install gptqmodel==7.7.0 autoawq==0.2.9 optimum==2.3.0 \
        torch==2.15.0 transformers==$(.venv/bin/python -c 'import transformers; print(transformers.__version__)')
    /tmp/lowbit-venv/bin/python scripts/gen_lowbit_fixtures.py
"""

import copy
import json
import math
import pathlib
import shutil
import sys
import types

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "lowbit"

# (name, bits, group_size, sym, desc_act, format key, format, attention bias)
GPTQ = [
    ("gptq-4bit-g32-asym-v1", 4, 32, False, False, "checkpoint_format", "gptq", True),
    ("gptq-4bit-g64-sym-v2-actorder", 4, 64, True, True, "format", "gptq_v2", False),
    ("gptq-2bit-g32-asym-v1-actorder", 2, 32, False, True, "format", "gptq", False),
    ("gptq-3bit-g32-asym-v1", 3, 32, False, False, "checkpoint_format", "gptq", False),
    ("gptq-3bit-g64-sym-v2-actorder", 3, 64, True, True, "format", "gptq_v2", False),
    ("gptq-8bit-all-asym-v1", 8, -1, False, False, "format", "gptq", False),
    ("gptq-8bit-g32-sym-v1-actorder", 8, 32, True, True, "checkpoint_format", "gptq", False),
    ("gptq-2bit-all-sym-v2", 2, -1, True, False, "format", "gptq_v2", True),
]

# (name, version, group_size, attention bias, hidden size, intermediate size)
AWQ = [
    ("awq-gemm-g32", "gemm", 32, True, 32, 96),
    ("awq-gemm-g64", "gemm", 64, False, 64, 64),
    ("awq-gemv-g32", "gemv", 32, True, 32, 96),
    ("awq-gemv-g64", "gemv", 64, False, 64, 64),
]


def llama(bias: bool, seed: int, hidden=32, inter=96):
    """A one-layer f16 Llama, heads of 32: by default q/k/v/o 32x32, gate/up 96x32, down
    32x96 (a partial last group at group size 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=16, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=1, num_attention_heads=hidden // 32, num_key_value_heads=1,
                      head_dim=32, attention_bias=bias, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.float16)
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n}
    return cfg, model, linears


def write(folder: pathlib.Path, cfg, qcfg: dict, tensors: dict, refs: dict):
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    c = cfg.to_dict()
    c["dtype"] = "float16"
    c["architectures"] = ["LlamaForCausalLM"]
    c["quantization_config"] = qcfg
    (folder / "config.json").write_text(json.dumps(c, indent=1, sort_keys=True))
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in refs.items()}, folder / "reference.safetensors")


def gptq_pack(lin, bits, gs, sym, desc_act, gen):
    """Packs `lin` (its weight replaced by exact integers times scales) with gptqmodel; returns
    the TorchLinear (v2 zeros) and the reference `dequantize_weight().T`."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    out_f, in_f = lin.weight.shape
    size = in_f if gs == -1 else gs
    groups = math.ceil(in_f / size)
    maxq = 2 ** bits - 1
    scales = (torch.rand(out_f, groups, generator=gen) * 0.02 + 1e-3).half().float()
    if sym:
        zeros = torch.full((out_f, groups), float(2 ** (bits - 1)))
    else:
        zeros = torch.randint(0, maxq + 1, (out_f, groups), generator=gen).float()
        zeros[::3, 0] = 0  # v1 export borrows from the next field
        zeros[1::5, -1] = maxq
    g_idx = torch.arange(in_f, dtype=torch.int32) // size
    if desc_act:
        g_idx = g_idx[torch.randperm(in_f, generator=gen)]
    q = torch.randint(0, maxq + 1, (out_f, in_f), generator=gen)
    gl = g_idx.long()
    lin = copy.deepcopy(lin).float()
    lin.weight.data = (q - zeros[:, gl]) * scales[:, gl]  # exact in f32
    m = TorchLinear(bits=bits, group_size=size, sym=sym, desc_act=desc_act, in_features=in_f,
                    out_features=out_f, bias=lin.bias is not None, pack_dtype=torch.int32)
    m.pack_original(lin, scales, zeros, g_idx)
    m.post_init()
    m.eval()
    ref = m.dequantize_weight().T.contiguous()
    assert ref.dtype == torch.float16
    assert torch.equal(ref, lin.weight.data.half()), "packed integers do not round-trip"
    return m, ref


def gptq_fixture(name, bits, gs, sym, desc_act, fkey, fmt, bias, seed):
    from gptqmodel.utils.model import (convert_gptq_v1_to_v2_format_module,
                                       convert_gptq_v2_to_v1_format_module)

    cfg, model, linears = llama(bias, seed)
    gen = torch.Generator().manual_seed(seed)
    tensors = dict(model.state_dict())
    refs = {}
    for n, lin in linears.items():
        m, ref = gptq_pack(lin, bits, gs, sym, desc_act, gen)
        if fmt == "gptq":
            convert_gptq_v2_to_v1_format_module(
                m, types.SimpleNamespace(bits=bits, pack_dtype=torch.int32))
            stored = m.qzeros.clone()
            # gptqmodel's own load-side conversion restores the v2 zeros exactly
            convert_gptq_v1_to_v2_format_module(m, bits, torch.int32)
            m._stream_reset_cache()
            m.clear_weight_cache()
            assert torch.equal(m.dequantize_weight().T, ref), n
            m.qzeros.data = stored
        del tensors[n + ".weight"]
        tensors[n + ".qweight"] = m.qweight
        tensors[n + ".qzeros"] = m.qzeros
        tensors[n + ".scales"] = m.scales
        tensors[n + ".g_idx"] = m.g_idx
        refs[n + ".weight"] = ref
    qcfg = {"quant_method": "gptq", "bits": bits, "group_size": gs, "desc_act": desc_act,
            "sym": sym, "lm_head": False, "pack_dtype": "int32", fkey: fmt,
            "meta": {"quantizer": ["gptqmodel:7.7.0"]}}
    write(OUT / name, cfg, qcfg, tensors, refs)
    return refs


def gptq_loads_in_transformers(folder: pathlib.Path, refs: dict):
    """transformers (optimum + gptqmodel) loads the folder on CPU; each layer's
    `dequantize_weight()` equals the reference."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float16)
    mods = dict(m.named_modules())
    for n, ref in refs.items():
        mod = mods[n[: -len(".weight")]]
        w = mod.dequantize_weight().T
        assert torch.equal(w.view(torch.int16), ref.view(torch.int16)), (folder.name, n)


def awq_quantize(w, gs):
    """autoawq's RTN with zero point (`AwqQuantizer.pseudo_quantize_tensor`)."""
    from awq.quantize.quantizer import AwqQuantizer

    qz = AwqQuantizer.__new__(AwqQuantizer)
    qz.w_bit, qz.group_size, qz.zero_point = 4, gs, True
    return qz.pseudo_quantize_tensor(w)


def unpack_gemv(qweight, qzeros, scales, gs, in_f):
    """The GEMV layout read back: sequential nibbles along the input dimension."""
    w = qweight.numpy().astype(np.int64) & 0xFFFFFFFF
    q = np.stack([(w >> (4 * j)) & 15 for j in range(8)], -1).reshape(w.shape[0], -1)
    zw = qzeros.numpy().astype(np.int64) & 0xFFFFFFFF
    z = np.stack([(zw >> (4 * j)) & 15 for j in range(8)], -1).reshape(zw.shape[0], -1)
    g = np.arange(in_f) // gs
    d = torch.from_numpy(q - z[:, g]).to(torch.int8)
    return d * scales[:, torch.from_numpy(g)]


def awq_fixture(name, version, gs, bias, hidden, inter, seed):
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.modules.linear.gemv import WQLinear_GEMV
    from awq.utils.packing_utils import dequantize_gemm

    cfg, model, linears = llama(bias, seed, hidden, inter)
    gen = torch.Generator().manual_seed(seed)
    tensors = dict(model.state_dict())
    refs = {}
    for n, lin in linears.items():
        lin = copy.deepcopy(lin)
        w = lin.weight.data.float()
        w[: w.shape[0] // 4, :gs] = w[: w.shape[0] // 4, :gs].abs()  # zero point 0 groups
        w = w + torch.randn(w.shape, generator=gen) * 0.01
        wq, scales, zeros = awq_quantize(w.half(), gs)
        lin.weight.data = wq
        g = WQLinear_GEMM.from_linear(lin, 4, gs, scales=scales.t().contiguous(),
                                      zeros=zeros.t().contiguous())
        ref = dequantize_gemm(g.qweight, g.qzeros, g.scales, 4, gs).T.contiguous()
        assert ref.dtype == torch.float16
        if version == "gemm":
            parts = (g.qweight, g.qzeros, g.scales)
        else:
            v = WQLinear_GEMV.from_linear(lin, 4, gs, scales=scales, zeros=zeros)
            got = unpack_gemv(v.qweight, v.qzeros, v.scales, gs, lin.in_features)
            assert torch.equal(got.view(torch.int16), ref.view(torch.int16)), n
            parts = (v.qweight, v.qzeros, v.scales)
        del tensors[n + ".weight"]
        for suffix, t in zip(("qweight", "qzeros", "scales"), parts):
            tensors[f"{n}.{suffix}"] = t
        refs[n + ".weight"] = ref
    qcfg = {"quant_method": "awq", "bits": 4, "group_size": gs, "zero_point": True,
            "version": version, "modules_to_not_convert": None}
    write(OUT / name, cfg, qcfg, tensors, refs)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for seed, (name, *args) in enumerate(GPTQ):
        refs = gptq_fixture(name, *args, seed=seed)
        try:
            gptq_loads_in_transformers(OUT / name, refs)
            print(f"{name}: transformers + gptqmodel load agrees")
        except (ImportError, RuntimeError, ValueError) as e:  # loader missing here
            print(f"{name}: transformers load not checked ({type(e).__name__}: {e})",
                  file=sys.stderr)
    for seed, (name, *args) in enumerate(AWQ, start=100):
        awq_fixture(name, *args, seed=seed)
        print(f"{name}: written")
    total = sum(f.stat().st_size for d in OUT.iterdir() if d.name.startswith(("gptq-", "awq-"))
                for f in d.iterdir())
    print(f"GPTQ/AWQ fixtures: {total} bytes")


if __name__ == "__main__":
    main()
