"""Benchmark: weightcast against PyTorch, numpy and the machine's limit (dd), in one run.

    .venv/bin/python bench/bench.py [--layers 6] [--runs 3] [--keep] [--set all|pt|fp8|python]

Generates a Llama-shaped f32 safetensors model (about 1.6 GiB with the default 6 layers) in
bench-out/, then times each way of casting it to f16 (and bf16), end to end as a user runs it
(process start, imports, reading, casting, writing), RUNS times each, and reports the median,
the ratio to dd and to weightcast, and peak RSS. The input stays in the page cache for every
contender, so this measures the work on top of the disk, which is the same for all.
"""

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "bench-out"
BIN = pathlib.Path(os.environ.get("WEIGHTCAST_BIN", ROOT / "target" / "release" / "weightcast"))
PY = sys.executable

TORCH_SCRIPT = """
import sys, torch
from safetensors.torch import load_file, save_file
t = load_file(sys.argv[1])  # memory-mapped read
t = {k: (v.to(getattr(torch, sys.argv[3])) if v.is_floating_point() else v) for k, v in t.items()}
save_file(t, sys.argv[2], metadata={"format": "pt"})
"""

TORCH_PT_SCRIPT = """
import sys, torch
sd = torch.load(sys.argv[1], mmap=True, weights_only=True)
sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
torch.save(sd, sys.argv[2])
"""

LLMC_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto")
oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=sys.argv[3],
                                                 ignore=["lm_head"]))
model.save_pretrained(sys.argv[2], save_compressed=True)
"""

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 5632, "num_attention_heads": 16, "num_key_value_heads": 16,
    "num_hidden_layers": None, "vocab_size": 32000, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "float32",
}

SAVE_PT_SCRIPT = """
import sys, torch
from safetensors.torch import load_file
torch.save(load_file(sys.argv[1]), sys.argv[2])
"""

NUMPY_SCRIPT = """
import sys, numpy as np
from safetensors.numpy import load_file, save_file
t = load_file(sys.argv[1])
t = {k: (v.astype(np.float16) if v.dtype.kind == "f" else v) for k, v in t.items()}
save_file(t, sys.argv[2], metadata={"format": "pt"})
"""


# The Python package's contenders run in the venv the wheel is installed in (scripts/api-env).
API_PY = os.environ.get("API_PYTHON", str(ROOT / "target" / "api-venv" / "bin" / "python"))

IMPORT_TORCH = "import torch, safetensors.torch, weightcast"

WC_LOAD = """
import sys, time, torch, weightcast
t = time.perf_counter()
sd = weightcast.load(sys.argv[1], dtype="f16")
print("inproc", time.perf_counter() - t, file=sys.stderr)
assert all(v.dtype == torch.float16 for v in sd.values())
"""

ST_LOAD = """
import sys, time, torch
from safetensors.torch import load_file
t = time.perf_counter()
sd = {k: v.half() for k, v in load_file(sys.argv[1]).items()}
print("inproc", time.perf_counter() - t, file=sys.stderr)
assert all(v.dtype == torch.float16 for v in sd.values())
"""

PT_LOAD = """
import sys, time, torch
t = time.perf_counter()
sd = {k: v.half() for k, v in torch.load(sys.argv[1], mmap=True, weights_only=True).items()}
print("inproc", time.perf_counter() - t, file=sys.stderr)
assert all(v.dtype == torch.float16 for v in sd.values())
"""

WC_CONVERT_PY = """
import sys, time, weightcast
t = time.perf_counter()
weightcast.convert(sys.argv[1], sys.argv[2], "f16", force=True, sync=len(sys.argv) < 4)
print("inproc", time.perf_counter() - t, file=sys.stderr)
"""


def generate(path: pathlib.Path, layers: int):
    import torch
    from safetensors.torch import save_file

    hidden, inter, vocab = 2048, 5632, 32000
    g = torch.Generator().manual_seed(0)
    t = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g) * 0.02}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n, shape in [("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (hidden, hidden)),
                         ("self_attn.v_proj", (hidden, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                         ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)),
                         ("mlp.down_proj", (hidden, inter))]:
            t[p + n + ".weight"] = torch.randn(*shape, generator=g) * 0.02
        t[p + "input_layernorm.weight"] = torch.ones(hidden)
        t[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    t["model.norm.weight"] = torch.ones(hidden)
    t["lm_head.weight"] = torch.randn(vocab, hidden, generator=g) * 0.02
    save_file(t, path, metadata={"format": "pt"})


INPROC: dict = {}


def timed(cmd) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one process. A Python contender that prints
    `inproc SECONDS` on stderr (its work after the imports) has that recorded in INPROC."""
    start = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - start
    err = p.stderr.read().decode()
    if status != 0:
        raise SystemExit(f"{cmd} failed: {err}")
    for line in err.splitlines():
        if line.startswith("inproc "):
            INPROC.setdefault(tuple(cmd), []).append(float(line.split()[1]))
    return wall, ru.ru_maxrss * 1024


# The s3 set: the bucket, and boto3 uploading the same bytes as the output.
S3_SETUP = """
import sys, pathlib, boto3
s3 = boto3.client("s3")
s3.create_bucket(Bucket="bench")
"""
S3_PUT = """
import sys, boto3
boto3.client("s3").upload_file(sys.argv[1], "bench", "boto3-out.safetensors")
"""


QUANTIZE_SCRIPT = """
import ctypes, os, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(sys.argv[3])
p.nthread = os.cpu_count()
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""

# (contender, contender) pairs whose outputs must be the same bytes
GGUF_PAIRS: list = []


def gguf_digest(contender, out: pathlib.Path) -> str:
    import hashlib

    if out.exists():
        out.unlink()
    subprocess.run(contender[1], check=True, capture_output=True)
    h = hashlib.sha256()
    with open(out, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_contenders(layers: int, src: pathlib.Path, out: pathlib.Path) -> list:
    """A Llama folder (the benchmark weights linked in, the test suite's 96-piece SentencePiece
    tokenizer, padded to 32000 tokens by both converters) to GGUF; and a GGUF f32 file retyped."""
    folder = OUT / f"llama-{layers}l"
    folder.mkdir(exist_ok=True)
    if not (folder / "model.safetensors").exists():
        os.link(src, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(dict(LLAMA_CONFIG, num_hidden_layers=layers)))
    shutil.copy(ROOT / "tests" / "fixtures" / "gguf" / "tokenizer.model", folder / "tokenizer.model")
    f32 = OUT / "llama-f32.gguf"
    subprocess.run([str(BIN), "convert", str(folder), "-o", str(f32), "--to", "f32", "--force", "-q"],
                   check=True)

    def wc(inp, to):
        return [str(BIN), "convert", str(inp), "-o", str(out), "--to", to, "--force", "-q"]

    rows = []
    llama_dir = os.environ.get("LLAMA_CPP_DIR")
    llama_py = os.environ.get("LLAMA_PYTHON")
    for to in ["f16", "q8_0"]:
        mine = (f"weightcast folder -> GGUF {to}", wc(folder, to))
        rows.append(mine)
        if llama_dir:
            ref = (f"convert_hf_to_gguf.py --outtype {to}",
                   [PY, str(pathlib.Path(llama_dir) / "convert_hf_to_gguf.py"), str(folder),
                    "--outtype", to, "--outfile", str(out)])
            rows.append(ref)
            GGUF_PAIRS.append((mine, ref))
    for to, ftype in [("f16", 1), ("q8_0", 7)]:
        mine = (f"weightcast GGUF f32 -> {to}", wc(f32, to))
        rows.append(mine)
        if llama_py:
            ref = (f"llama_model_quantize f32 -> {to} ({os.cpu_count()} threads)",
                   [llama_py, "-c", QUANTIZE_SCRIPT, str(f32), str(out), str(ftype)])
            rows.append(ref)
            GGUF_PAIRS.append((mine, ref))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep bench-out/ afterwards")
    ap.add_argument("--generate-only", metavar="PATH")
    ap.add_argument("--set", choices=["all", "pt", "fp8", "python", "io", "remote", "s3", "gguf"],
                    default="all",
                    help="pt: only the PyTorch-file contenders and their references; fp8: "
                         "scaled FP8 quantization and dequantization (and llm-compressor when "
                         "LLMC_PYTHON names a Python with llmcompressor installed); python: "
                         "the Python package's load and convert against safetensors and "
                         "torch.load (the wheel installed by scripts/api-env); io: the "
                         "machine's limits, warm and cold (page cache dropped before each "
                         "cold run, as root), and WEIGHTCAST_BIN_B as a second binary to "
                         "compare; s3: to moto's S3 server on loopback (multipart upload) against "
                         "boto3 uploading the same bytes; gguf: a Llama folder to GGUF (f16, "
                         "q8_0) against llama.cpp's convert_hf_to_gguf.py (LLAMA_CPP_DIR: the "
                         "vendor/llama.cpp folder of llama-cpp-python 0.3.36's sdist; this "
                         "Python needs sentencepiece) and GGUF retypes against "
                         "llama_model_quantize (LLAMA_PYTHON: a Python with llama-cpp-python)")
    args = ap.parse_args()
    if args.generate_only:
        generate(pathlib.Path(args.generate_only), args.layers)
        return
    OUT.mkdir(exist_ok=True)
    src = OUT / f"llama-{args.layers}l-f32.safetensors"
    if not src.exists():
        print(f"generating {src} ...", file=sys.stderr)
        # In a child process, so that this one stays small (a forked child starts with its
        # parent's resident memory, which would show in every peak RSS below).
        subprocess.run([PY, __file__, "--generate-only", str(src), "--layers", str(args.layers)],
                       check=True)
    size = src.stat().st_size
    src_pt = OUT / f"llama-{args.layers}l-f32.pt"
    if not src_pt.exists() and args.set in ("all", "pt", "python"):
        # the same weights saved by torch.save (a state dict of contiguous tensors)
        subprocess.run([PY, "-c", SAVE_PT_SCRIPT, str(src), str(src_pt)], check=True)
    out = OUT / "out.safetensors"
    out_pt = OUT / "out.pt"
    f16_size = None

    def wc(to, *extra):
        return [str(BIN), "convert", str(src), "-o", str(out), "--to", to, "--force", "-q", *extra]

    pt = [
        ("weightcast .pt -> .pt f32->f16", [str(BIN), "convert", str(src_pt), "-o", str(out_pt), "--to",
                                            "f16", "--force", "-q"]),
        ("weightcast .pt -> .safetensors f32->f16", [str(BIN), "convert", str(src_pt), "-o", str(out),
                                                     "--to", "f16", "--force", "-q"]),
        ("PyTorch .pt -> .pt (torch.load mmap, .half, torch.save)",
         [PY, "-c", TORCH_PT_SCRIPT, str(src_pt), str(out_pt)]),
    ]
    contenders = [
        ("weightcast f32->f16", wc("f16")),
        ("weightcast f32->f16 --no-sync", wc("f16", "--no-sync")),
        ("weightcast f32->f16 --no-sync --on-overflow allow (no checks)", wc("f16", "--no-sync", "--on-overflow", "allow")),
        ("weightcast f32->f16 --no-sync --on-overflow keep --max-underflow 0.001 (analysis pass + convert)",
         wc("f16", "--no-sync", "--on-overflow", "keep", "--max-underflow", "0.001")),
        ("weightcast analyze --to f16 --json", [str(BIN), "analyze", str(src), "--to", "f16", "--json"]),
        ("weightcast f32->bf16", wc("bf16")),
        ("weightcast f32->f16 --preset keep-norms", wc("f16", "--preset", "keep-norms")),
        ("PyTorch f32->f16 (load_file mmap, .to, save_file)", [PY, "-c", TORCH_SCRIPT, str(src), str(out), "float16"]),
        ("PyTorch f32->bf16", [PY, "-c", TORCH_SCRIPT, str(src), str(out), "bfloat16"]),
        ("numpy + safetensors.numpy f32->f16", [PY, "-c", NUMPY_SCRIPT, str(src), str(out)]),
    ] + pt
    if args.set == "pt":
        contenders = [("weightcast f32->f16", wc("f16"))] + pt
    if args.set == "fp8":
        # A model folder (what llm-compressor reads and writes), the weights linked in.
        folder = OUT / f"llama-{args.layers}l"
        folder.mkdir(exist_ok=True)
        if not (folder / "model.safetensors").exists():
            os.link(src, folder / "model.safetensors")
        config = dict(LLAMA_CONFIG, num_hidden_layers=args.layers)
        (folder / "config.json").write_text(json.dumps(config))
        qdir, bdir, ddir = OUT / "fp8-channel", OUT / "fp8-block", OUT / "deq"

        def wcf(dst, *extra):
            return [str(BIN), "convert", str(folder), "-o", str(dst), "--force", "-q", *extra]

        # the dequantization inputs, made once
        subprocess.run(wcf(qdir, "--to", "f8e4m3", "--scale", "channel"), check=True)
        subprocess.run(wcf(bdir, "--to", "f8e4m3", "--scale", "block"), check=True)
        contenders = [
            ("weightcast f32->f16", wc("f16")),
            ("weightcast f32->f16 (folder)", wcf(OUT / "f16", "--to", "f16")),
            ("weightcast f32->fp8 channel scales (compressed-tensors)",
             wcf(OUT / "q1", "--to", "f8e4m3", "--scale", "channel")),
            ("weightcast f32->fp8 128x128 block scales (compressed-tensors)",
             wcf(OUT / "q2", "--to", "f8e4m3", "--scale", "block")),
            ("weightcast fp8 channel -> bf16 (dequantize)",
             [str(BIN), "convert", str(qdir), "-o", str(ddir), "--to", "bf16", "--force", "-q"]),
            ("weightcast fp8 block -> bf16 (dequantize)",
             [str(BIN), "convert", str(bdir), "-o", str(ddir), "--to", "bf16", "--force", "-q"]),
        ]
        llmc = os.environ.get("LLMC_PYTHON")
        if llmc:
            for scheme in ["FP8_DYNAMIC", "FP8_BLOCK"]:
                contenders.append((f"llm-compressor oneshot {scheme} (load, quantize, save)",
                                   ["sh", "-c", f"rm -rf {OUT / 'llmc'} && exec {llmc} -c "
                                    f"'{LLMC_SCRIPT}' {folder} {OUT / 'llmc'} {scheme}"]))
    if args.set == "python":
        contenders = [
            ("weightcast f32->f16", wc("f16")),
            ("Python weightcast.convert f32->f16", [API_PY, "-c", WC_CONVERT_PY, str(src), str(out)]),
            # The same two without the disk's write-back noise: to tmpfs, no fsync.
            ("weightcast f32->f16 --no-sync to /dev/shm",
             [str(BIN), "convert", str(src), "-o", "/dev/shm/wc-bench.safetensors", "--to", "f16",
              "--force", "-q", "--no-sync"]),
            ("Python weightcast.convert(sync=False) to /dev/shm",
             [API_PY, "-c", WC_CONVERT_PY, str(src), "/dev/shm/wc-bench.safetensors", "nosync"]),
            ("Python: import torch, safetensors, weightcast (baseline)", [API_PY, "-c", IMPORT_TORCH]),
            ("weightcast.load(.safetensors, dtype=f16)", [API_PY, "-c", WC_LOAD, str(src)]),
            ("safetensors.torch.load_file + .half()", [API_PY, "-c", ST_LOAD, str(src)]),
            ("weightcast.load(.pt, dtype=f16)", [API_PY, "-c", WC_LOAD, str(src_pt)]),
            ("torch.load(.pt, mmap=True) + .half()", [API_PY, "-c", PT_LOAD, str(src_pt)]),
        ]
    if args.set == "io":
        contenders = [("weightcast f32->f16", wc("f16"))]
        other = os.environ.get("WEIGHTCAST_BIN_B")
        if other:
            contenders.append(("B: weightcast f32->f16 (WEIGHTCAST_BIN_B)",
                               [other, *wc("f16")[1:]]))
        contenders += [
            ("cold: weightcast f32->f16", wc("f16")),
            ("cold: cat input > /dev/null (read limit)",
             ["sh", "-c", f"cat '{src}' > /dev/null"]),
        ]
        if other:
            contenders.append(("cold: B: weightcast f32->f16 (WEIGHTCAST_BIN_B)",
                               [other, *wc("f16")[1:]]))
    out_gguf = OUT / "out.gguf"
    if args.set == "gguf":
        contenders = [("weightcast f32->f16", wc("f16"))] + gguf_contenders(args.layers, src, out_gguf)
    server = None
    if args.set == "remote":
        port = 18000 + os.getpid() % 1000
        server = subprocess.Popen([PY, str(ROOT / "bench" / "range_server.py"), str(OUT),
                                   str(port)])
        time.sleep(1.0)
        url = f"http://127.0.0.1:{port}/{src.name}"
        contenders = [
            ("weightcast f32->f16", wc("f16")),
            ("weightcast f32->f16 from http://127.0.0.1 (range requests)",
             [str(BIN), "convert", url, "-o", str(out), "--to", "f16", "--force", "-q"]),
            ("weightcast f32->f16 from http://, --no-sync",
             [str(BIN), "convert", url, "-o", str(out), "--to", "f16", "--force", "-q",
              "--no-sync"]),
            ("curl the input to /dev/null (download limit)", ["curl", "-s", "-o", "/dev/null", url]),
        ]
        if os.environ.get("WEIGHTCAST_BIN_B"):
            contenders.append(("B: weightcast f32->f16 from http:// (WEIGHTCAST_BIN_B)",
                               [os.environ["WEIGHTCAST_BIN_B"], "convert", url, "-o", str(out),
                                "--to", "f16", "--force", "-q"]))
    if args.set == "s3":
        port = 19000 + os.getpid() % 1000
        endpoint = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([PY, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(3.0)
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
        subprocess.run([PY, "-c", S3_SETUP], check=True)
        # Only the upload side: moto answers every range request by reading the whole object
        # and slicing it (moto/s3/responses.py, _handle_range_header), so reading a 1.6 GiB
        # object by ranges from it measures moto, not the client.
        contenders = [
            ("weightcast f32->f16", wc("f16")),
            ("weightcast f32->f16 to s3:// (multipart upload)",
             [str(BIN), "convert", str(src), "-o", "s3://bench/out.safetensors", "--to", "f16",
              "--force", "-q"]),
            ("boto3: upload the output's bytes (upload limit)",
             [PY, "-c", S3_PUT, str(OUT / "upload-src.safetensors")]),
        ]
    # Output size of the f16 cast, for dd.
    subprocess.run(wc("f16"), check=True)
    f16_size = out.stat().st_size
    if args.set == "s3":
        shutil.copy(out, OUT / "upload-src.safetensors")
    dd = ["dd", f"if={src}", f"of={out}", "bs=8M", f"count={f16_size}", "iflag=count_bytes", "status=none"]
    contenders += [
        ("dd, output's size (limit)", dd),
        ("dd, output's size, conv=fsync (limit with sync)", dd + ["conv=fsync"]),
    ]
    if args.set == "io":
        contenders.append(("cold: cat input and dd /dev/zero conv=fsync at once (both limits together)",
                           ["sh", "-c", f"cat '{src}' > /dev/null & dd if=/dev/zero of={out} "
                            f"bs=8M count={f16_size} iflag=count_bytes status=none conv=fsync; wait"]))
        # Warm rows first (each round re-reads the input after the cold rows of the last).
        contenders.sort(key=lambda c: c[0].startswith("cold:"))
        contenders.append(("cold: dd from /dev/zero, output's size, conv=fsync (write limit)",
                           ["dd", "if=/dev/zero", f"of={out}", "bs=8M", f"count={f16_size}",
                            "iflag=count_bytes", "status=none", "conv=fsync"]))
    cold_ok = True

    def drop_caches() -> bool:
        """Drops the page cache (as root); False when this process cannot."""
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return True
        except OSError:
            return False
    results = {}
    for r in range(args.runs):
        subprocess.run(["sh", "-c", f"cat '{src}' > /dev/null"], check=True)  # warm again
        for name, cmd in contenders:
            for o in (out, out_pt, out_gguf):
                if o.exists():
                    o.unlink()
            if name.startswith("cold:") and not drop_caches():
                cold_ok = False
            results.setdefault(name, []).append(timed(cmd))
    med = {n: (statistics.median(w for w, _ in v), max(m for _, m in v)) for n, v in results.items()}
    dd_t = med["dd, output's size (limit)"][0]
    dd_sync_t = med["dd, output's size, conv=fsync (limit with sync)"][0]
    wc_t = med["weightcast f32->f16"][0]
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"],
                         capture_output=True, text=True).stdout.strip()
    lines = [
        f"input: {src.name}, {size / 2**30:.2f} GiB f32 ({args.layers} Llama layers, hidden 2048); "
        f"f16 output {f16_size / 2**30:.2f} GiB; median of {args.runs} runs; {os.cpu_count()} cores, {cpu}",
        "",
        "| contender | median s | input GB/s | vs dd | vs dd+fsync | weightcast f16 speedup | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (t, rss) in med.items():
        lines.append(
            f"| {name} | {t:.2f} | {size / t / 1e9:.2f} | {t / dd_t:.2f}x | {t / dd_sync_t:.2f}x | "
            f"{t / wc_t:.2f}x | {rss / 2**20:.0f} |")
    if not cold_ok:
        lines += ["", "**The page cache could not be dropped (not root): the cold rows ran warm.**"]
    if INPROC:
        lines += ["", "In-process seconds (after the imports; medians):", "",
                  "| contender | in-process s |", "|---|---:|"]
        for name, cmd in contenders:
            if tuple(cmd) in INPROC:
                lines.append(f"| {name} | {statistics.median(INPROC[tuple(cmd)]):.2f} |")
    if args.set == "gguf":
        lines += ["", "Byte-identical outputs (sha256 of one more run each):", ""]
        for a, b in GGUF_PAIRS:
            same = gguf_digest(a, out_gguf) == gguf_digest(b, out_gguf)
            lines.append(f"- {a[0]} / {b[0]}: {'identical' if same else 'DIFFERENT'}")
    print("\n".join(lines))
    if server:
        server.kill()
    (OUT / "results.json").write_text(json.dumps({n: v for n, v in results.items()}, indent=1))
    for o in (out, out_pt, pathlib.Path("/dev/shm/wc-bench.safetensors")):
        if o.exists():
            o.unlink()
    if not args.keep:
        shutil.rmtree(OUT)


if __name__ == "__main__":
    main()
