"""Dequantizing low-bit checkpoints: weightcast's `convert` against the reference code path, in
one run on this machine. Builds a Llama-shaped model (hidden 2048, intermediate 5632, LAYERS
layers: about 0.1 B parameters a layer), packs it with compressed-tensors itself (W4A16 group
128 and NVFP4), and a gpt-oss-shaped MXFP4 expert file; then times, each in its own process
with its peak RSS (`/usr/bin/time -f %M`):
- weightcast: `convert FOLDER -o OUT --to bf16`;
- the reference: transformers' `from_pretrained(..., CompressedTensorsConfig(run_compressed=False))`
  then `save_pretrained` (what users run to dequantize), and for MXFP4 `convert_moe_packed_tensors`
  per tensor then `safetensors.torch.save_file`;
- the machine's limit: `cp` of the input folder (read and write of the packed bytes).
Outputs are checked bit-equal before the table is printed.

    .venv/bin/python bench/lowbit_bench.py [LAYERS]

`big` instead of LAYERS runs on bench/bench.py's 1.6 GiB f32 Llama (6 layers) as a model
folder, quantized each way that runs on a CPU here: NVFP4 and MXFP4 written by weightcast
(`convert --to nvfp4|mxfp4`) against the same scales through compressed-tensors'
`ModelCompressor` (what llm-compressor runs; outputs bit-equal), W4A16 group 128 packed by
compressed-tensors, and bitsandbytes NF4 (double-quantized) packed by transformers; then each
read back to bf16 by weightcast against transformers' dequantization (bit-equal).
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))
BIN = os.environ.get("WEIGHTCAST_BIN", str(ROOT / "target" / "release" / "weightcast"))
BIG = len(sys.argv) > 1 and sys.argv[1] == "big"
LAYERS = 6 if BIG else int(sys.argv[1]) if len(sys.argv) > 1 else 4
PY = sys.executable


def timed(cmd):
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", *map(str, cmd)], capture_output=True,
                       text=True)
    if r.returncode:
        raise SystemExit(f"{cmd}: {r.stderr[-2000:]}")
    return time.perf_counter() - t, int(r.stderr.strip().splitlines()[-1]) / 1024


REF_CT = """
import sys, torch
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16,
    quantization_config=CompressedTensorsConfig(run_compressed=False))
m.save_pretrained(sys.argv[2])
"""

REF_MX = """
import sys
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors
sd = load_file(sys.argv[1]); out = {}
for k in [k for k in sd if k.endswith("_blocks")]:
    s = k[: -len("_blocks")]
    out[s] = convert_moe_packed_tensors(sd.pop(k), sd.pop(s + "_scales"))
out.update(sd)
save_file(out, sys.argv[2])
"""


def make_ct(folder, preset):
    import test_lowbit as tl
    from transformers import LlamaConfig, LlamaForCausalLM
    orig = LlamaConfig

    def big(**kw):
        kw.update(hidden_size=2048, intermediate_size=5632, num_hidden_layers=LAYERS,
                  num_attention_heads=16, num_key_value_heads=16, vocab_size=32000)
        return orig(**kw)
    import transformers
    transformers.LlamaConfig = big
    try:
        tl.make_ct(folder, preset, torch.bfloat16)
    finally:
        transformers.LlamaConfig = orig
    del LlamaForCausalLM


def size(p):
    p = pathlib.Path(p)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main():
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        tmp = pathlib.Path(tmp)
        for preset in ["W4A16", "NVFP4A16"]:
            src = tmp / preset
            make_ct(src, preset)
            wc, ref, cp = tmp / f"{preset}-wc", tmp / f"{preset}-ref", tmp / f"{preset}-cp"
            t_cp, _ = timed(["cp", "-r", src, cp])
            t_wc, m_wc = timed([BIN, "convert", src, "-o", wc, "--to", "bf16"])
            t_ref, m_ref = timed([PY, "-c", REF_CT, src, ref])
            check(wc, ref)
            rows.append((f"compressed-tensors {preset}", size(src), size(wc), t_wc, m_wc, t_ref,
                         m_ref, t_cp))
            for p in (src, wc, ref, cp):
                shutil.rmtree(p)
        # gpt-oss-shaped MXFP4 experts: 32 experts of 2880 x 2880, two tensors a layer
        rng = np.random.default_rng(0)
        from safetensors.torch import save_file
        sd = {}
        for layer in range(max(1, LAYERS // 2)):
            for proj, rows_ in (("gate_up_proj", 5760), ("down_proj", 2880)):
                k = f"model.layers.{layer}.mlp.experts.{proj}"
                sd[k + "_blocks"] = torch.from_numpy(
                    rng.integers(0, 256, (32, rows_, 90, 16), dtype=np.uint8))
                sd[k + "_scales"] = torch.from_numpy(
                    rng.integers(115, 130, (32, rows_, 90), dtype=np.uint8))
        src = tmp / "mx.safetensors"
        save_file(sd, src)
        del sd
        wc, ref = tmp / "mx-wc.safetensors", tmp / "mx-ref.safetensors"
        t_cp, _ = timed(["cp", src, tmp / "mx-cp"])
        t_wc, m_wc = timed([BIN, "convert", src, "-o", wc, "--to", "bf16"])
        t_ref, m_ref = timed([PY, "-c", REF_MX, src, ref])
        check_files(wc, ref)
        rows.append(("gpt-oss MXFP4 experts", size(src), size(wc), t_wc, m_wc, t_ref, m_ref, t_cp))
    print(f"{LAYERS} layers; weightcast {BIN}; seconds, peak RSS in MiB\n")
    print_read_rows(rows)


def print_read_rows(rows):
    print("| input | packed | bf16 out | weightcast s | RSS | reference s | RSS | speed-up | "
          "cp of the input s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, a, b, tw, mw, tr, mr, tc in rows:
        print(f"| {name} | {a / 2**20:.0f} MiB | {b / 2**20:.0f} MiB | {tw:.2f} | {mw:.0f} | "
              f"{tr:.2f} | {mr:.0f} | {tr / tw:.1f}x | {tc:.2f} |")


def load_folder(p):
    from safetensors.torch import load_file
    out = {}
    for f in pathlib.Path(p).glob("*.safetensors"):
        out.update(load_file(f))
    return out


def check(a, b):
    x, y = load_folder(a), load_folder(b)
    for k, v in y.items():
        assert torch.equal(x[k].view(torch.int16), v.view(torch.int16)), k


def check_files(a, b):
    from safetensors.torch import load_file
    x, y = load_file(a), load_file(b)
    assert sorted(x) == sorted(y)
    for k, v in y.items():
        assert torch.equal(x[k].view(torch.int16), v.view(torch.int16)), k


REF_FP4 = """
import sys, copy, torch
sys.path.insert(0, sys.argv[4])
from test_lowbit_write import llm_compressor_weights_only
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (QuantizationConfig, QuantizationScheme,
                                             apply_quantization_config)
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
scheme = copy.deepcopy(PRESET_SCHEMES[sys.argv[3]])
if sys.argv[3] == "W4A16":
    scheme["weights"].group_size = 128
apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": QuantizationScheme(
    targets=["Linear"], **scheme)}, ignore=["lm_head"]))
llm_compressor_weights_only(model)
comp = ModelCompressor.from_pretrained_model(model)
comp.compress_model(model)
model.save_pretrained(sys.argv[2])
comp.update_config(sys.argv[2])
"""

REF_BNB_PACK = """
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, quantization_config=q,
                                         device_map="cpu")
m.save_pretrained(sys.argv[2])
"""

REF_BNB = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cpu")
m = m.dequantize()
m.save_pretrained(sys.argv[2])
"""


def main_big():
    sys.path.insert(0, str(ROOT / "bench"))
    import json
    from bench import LLAMA_CONFIG, generate
    rows, writes = [], []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        tmp = pathlib.Path(tmp)
        src = tmp / "f32"
        src.mkdir()
        generate(src / "model.safetensors", LAYERS)
        (src / "config.json").write_text(json.dumps(dict(LLAMA_CONFIG, num_hidden_layers=LAYERS)))
        tests = ROOT / "tests" / "python"
        packed = {}
        for to, preset in [("nvfp4", "NVFP4A16"), ("mxfp4", "MXFP4A16"), (None, "W4A16")]:
            ref = tmp / f"{preset}-ref"
            t_ref, m_ref = timed([PY, "-c", REF_FP4, src, ref, preset, tests])
            if to:
                wc = tmp / f"{preset}-wc"
                t_wc, m_wc = timed([BIN, "convert", src, "-o", wc, "--to", to])
                check_bytes(wc, ref)
                writes.append((preset, size(src), size(wc), t_wc, m_wc, t_ref, m_ref))
                shutil.rmtree(wc)
            packed[f"compressed-tensors {preset}"] = ref
        bnb = tmp / "bnb-nf4"
        timed([PY, "-c", REF_BNB_PACK, src, bnb])
        packed["bitsandbytes NF4 (double quant)"] = bnb
        for name, folder in packed.items():
            wc, ref, cp = tmp / "deq-wc", tmp / "deq-ref", tmp / "deq-cp"
            t_cp, _ = timed(["cp", "-r", folder, cp])
            t_wc, m_wc = timed([BIN, "convert", folder, "-o", wc, "--to", "bf16"])
            script = REF_BNB if "bitsandbytes" in name else REF_CT
            t_ref, m_ref = timed([PY, "-c", script, folder, ref])
            check(wc, ref)
            rows.append((name, size(folder), size(wc), t_wc, m_wc, t_ref, m_ref, t_cp))
            for p in (wc, ref, cp):
                shutil.rmtree(p)
    print(f"the 1.6 GiB f32 Llama ({LAYERS} layers); weightcast {BIN}; seconds, peak RSS MiB\n")
    print("writing FP4 from f32:\n")
    print("| output | f32 in | packed out | weightcast s | RSS | compressed-tensors s | RSS | "
          "speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for name, a, b, tw, mw, tr, mr in writes:
        print(f"| {name} | {a / 2**20:.0f} MiB | {b / 2**20:.0f} MiB | {tw:.2f} | {mw:.0f} | "
              f"{tr:.2f} | {mr:.0f} | {tr / tw:.1f}x |")
    print("\nreading back to bf16:\n")
    print_read_rows(rows)


def check_bytes(a, b):
    x, y = load_folder(a), load_folder(b)
    assert sorted(x) == sorted(y), set(x) ^ set(y)
    for k, v in y.items():
        assert torch.equal(x[k].view(torch.uint8), v.view(torch.uint8)), k


if __name__ == "__main__":
    main_big() if BIG else main()
