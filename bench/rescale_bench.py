"""The rescale against the other ways to run a model whose activations pass f16, in one run on
this machine (the wheel installed in target/api-venv by scripts/api-env): for each test model
of tests/api/rescale_models.py (activations planted beyond f16) and examples/tiny-llama-massive,
`weightcast.profile` with the candidates plain f16, f16 with the keep-wide search (the fewest
modules kept in f32 to meet cosine 0.9999), the rescaled f16 and bf16: the logits' cosine and
top-1 agreement against f32 and non-finite values; and the latency of the rescaled f16 model
against plain f16 of the same model without the planted values (the same graph with finite
values; plain f16 of the planted model computes with inf and NaN), timed in alternation, the
median of 31 rounds. Prints a Markdown table, one row per model.

    target/api-venv/bin/python bench/rescale_bench.py
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "api"))

import torch  # noqa: E402

import weightcast  # noqa: E402
import rescale_models as rm  # noqa: E402

TOLERANCE = {"cosine": 0.9999}


def tiny_llama_massive():
    import transformers

    folder = ROOT / "examples" / "tiny-llama-massive"
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.eos_token or tok.unk_token
    texts = ["A man is eating food.", "The cat sits outside.", "A monkey is playing drums.",
             "Half precision halves the memory of every weight."]
    return model.eval(), [dict(tok(texts[i:i + 2], padding=True, return_tensors="pt"))
                          for i in (0, 2)]


def tiny_llama():
    import transformers

    model, batches = tiny_llama_massive()
    clean = transformers.AutoModelForCausalLM.from_pretrained(
        ROOT / "examples" / "tiny-llama", dtype=torch.float32)
    return clean.eval(), batches


# (name, the planted model and its batches, the same model without the planted values)
MODELS = [(mt, lambda mt=mt: (rm.decoder(mt), rm.batches()),
           lambda mt=mt: rm.decoder(mt, plant=False))
          for mt in ("llama", "qwen3", "gemma", "gemma2", "gemma3_text")]
MODELS += [("mixtral", lambda: (rm.moe("mixtral"), rm.batches()),
            lambda: rm.moe("mixtral", plant=False)),
           ("vit", lambda: (rm.vit(), rm.images()), lambda: rm.vit(plant=False)),
           ("t5 (relu, tied)", lambda: (rm.t5(), rm.batches(True)), lambda: rm.t5(plant=False)),
           ("t5 v1.1 (gated-gelu)", lambda: (rm.t5(gated=True, tie=False), rm.batches(True)),
            lambda: rm.t5(gated=True, tie=False, plant=False)),
           ("examples/tiny-llama-massive (bf16)", tiny_llama_massive,
            lambda: tiny_llama()[0])]


def cell(row) -> str:
    """cosine / top-1 (non-finite values when any)."""
    cos, top1 = row["cosine"], row["top1"]
    text = (f"{cos:.6f}" if cos == cos else "nan") + (f" / {top1:.3f}" if top1 is not None else "")
    return text + (f" ({row['nonfinite']} non-finite)" if row["nonfinite"] else "")


def interleaved_ms(modules, batches, rounds=31):
    """Median milliseconds of a pass over the batches for each module, timed in alternation
    (so that the machine's noise falls on all of them alike)."""
    import statistics
    import time

    times = [[] for _ in modules]
    with torch.no_grad():
        for _ in range(3):
            for m in modules:
                for b in batches:
                    m(**b) if isinstance(b, dict) else m(b)
        for _ in range(rounds):
            for i, m in enumerate(modules):
                t0 = time.perf_counter()
                for b in batches:
                    m(**b) if isinstance(b, dict) else m(b)
                times[i].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def main() -> None:
    import copy

    print("| model | plain f16 | f16, keep-wide search | f16 rescaled | bf16 | rescale | "
          "rescaled f16 / plain f16 (unplanted) latency |")
    print("|---|---|---|---|---|---|---|")
    for name, make, make_clean in MODELS:
        model, batches = make()
        p = weightcast.profile(model, batches, ["f16", {"to": "f16", "rescale": True}, "bf16"],
                               search=True, tolerance=TOLERANCE, timing=False)
        rows = {c["name"]: c for c in p.candidates}
        kept = [c for c in p.candidates if c.get("kept_modules") is not None
                and c["name"].startswith("f16 keeping")]
        wide = (f"{cell(kept[0])}, {len(kept[0]['kept_modules'])} module(s) in f32" if kept
                else "meets it as it is" if rows["f16"]["nonfinite"] == 0 else "none found")
        r = weightcast.rescale(model, batches)
        # Both cast the same way (.to: no mixed-precision hooks), so that the figure is the
        # rescale's own cost.
        rescaled = r.apply(copy.deepcopy(model)).to(torch.float16)
        plain = copy.deepcopy(make_clean()).to(torch.float16)
        ms = interleaved_ms([plain, rescaled], batches)
        print(f"| {name} | {cell(rows['f16'])} | {wide} | {cell(rows['f16 rescaled'])} | "
              f"{cell(rows['bf16'])} | alpha 2^{int(__import__('math').log2(r.alpha))}, "
              f"{len(r.factors)} tensors, stream max {r.stream_max:.3g}; f32 max rel diff "
              f"{r.proof['f32']['max_rel_diff']:.3g} | {ms[1] / ms[0]:.2f}x "
              f"({ms[1]:.2f} / {ms[0]:.2f} ms) |")


if __name__ == "__main__":
    main()
