"""`weightcast eval` on the real all-MiniLM-L6-v2: the f32 reference equals transformers + torch
(mean pooling + normalize, as the folder's sentence-transformers config says) to 1e-5,
f16/bf16 candidates stay near cosine 1 without NaN, broken candidates are caught."""

import json
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from conftest import run

SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome.",
    "Quantum computers use qubits.",
    "It's so sunny outside!",
    "The Federal Reserve raised interest rates by a quarter point on Wednesday, citing inflation.",
]


def eval_json(*args):
    return json.loads(run("eval", *args, "--json").stdout)


def test_reference_matches_transformers(minilm, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    inputs = tmp_path / "in.txt"
    inputs.write_text("\n".join(SENTENCES) + "\n")
    r = eval_json(minilm, "--dtypes", "", "--inputs", inputs, "--emit-embeddings", "--runs", "1")
    ours = np.array(r["candidates"][0]["embeddings"], dtype=np.float64)
    tok = AutoTokenizer.from_pretrained(minilm)
    model = AutoModel.from_pretrained(minilm).eval()
    with torch.no_grad():
        enc = tok(SENTENCES, padding=True, truncation=True, return_tensors="pt")
        out = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        emb = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        emb = torch.nn.functional.normalize(emb, p=2, dim=1)
    diff = np.abs(ours - emb.double().numpy()).max()
    assert diff < 1e-5, diff


def test_candidates_f16_bf16(minilm):
    r = eval_json(minilm, "--dtypes", "f16,bf16", "--runs", "1")
    by = {c["name"]: c for c in r["candidates"]}
    assert by["float16"]["cosine_min"] > 0.9999 and not by["float16"]["non_finite"]
    assert by["bfloat16"]["cosine_min"] > 0.999 and not by["bfloat16"]["non_finite"]
    assert by["float16"]["weight_bytes"] < 0.51 * by["f32 (reference)"]["weight_bytes"]
    assert r["recommendation"] in ("float16", "bfloat16")
    assert by["f32 (reference)"]["tokens_per_second"] > 0


def test_broken_candidates_are_caught(minilm, tmp_path):
    for name, breaker in [("scaled", lambda t: t * 1e6), ("zeros", torch.zeros_like)]:
        folder = tmp_path / name
        shutil.copytree(minilm, folder)
        sd = load_file(minilm / "model.safetensors")
        key = "encoder.layer.2.attention.self.query.weight"
        sd[key] = breaker(sd[key])
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
        r = eval_json(minilm, "--dtypes", "f16", "--candidate", folder, "--runs", "1")
        broken = r["candidates"][-1]
        assert not broken["passes"], broken
        assert broken["cosine_min"] < 0.99 or broken["non_finite"], broken
        assert r["recommendation"] == "float16"


def torch_embeddings(folder, dtype, sentences=SENTENCES, scale=None):
    """Sentence embeddings from transformers + torch with the model in `dtype` (as after
    `model.half()`), mean pooling + normalize in f32."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval().to(dtype)
    with torch.no_grad():
        enc = tok(sentences, padding=True, truncation=True, return_tensors="pt")
        out = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        emb = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(emb, p=2, dim=1).double().numpy()


def test_half_compute_is_like_torch_half(minilm, tmp_path):
    """--compute same runs f16/bf16 activations, as PyTorch does after model.half(): the error
    against f32 is of the size torch's own half-precision run shows, and the embeddings are
    near torch's half-precision ones."""
    inputs = tmp_path / "in.txt"
    inputs.write_text("\n".join(SENTENCES) + "\n")
    r = eval_json(minilm, "--dtypes", "f16,bf16", "--inputs", inputs, "--emit-embeddings",
                  "--runs", "1")
    ref = torch_embeddings(minilm, torch.float32)
    for c, dtype, near in zip(r["candidates"][1:], [torch.float16, torch.bfloat16], [1e-3, 6e-3]):
        assert c["compute"] == str(dtype).removeprefix("torch."), c["compute"]
        ours = np.array(c["embeddings"], dtype=np.float64)
        theirs = torch_embeddings(minilm, dtype)
        assert np.isfinite(ours).all()
        assert np.abs(ours - theirs).max() < near, (c["name"], np.abs(ours - theirs).max())
        torch_err = np.abs(theirs - ref).max()
        assert 0 < np.abs(ours - ref).max() < 3 * torch_err, (c["name"], torch_err)


def test_activation_overflow_shows_in_f16_compute(minilm, tmp_path):
    """A model whose weights fit f16 (largest 1550) but whose activations do not: weight
    analysis sees no overflow, torch's model.half() gives NaN, and so does eval's f16 candidate;
    bf16 (f32's range) is fine and recommended; --compute f32 isolates storage loss (fine)."""
    folder = scaled_minilm(minilm, tmp_path, layer=0)
    a = json.loads(run("analyze", folder, "--to", "f16", "--json").stdout)
    assert a["totals"]["verdicts"]["overflow"] == 0
    assert not np.isfinite(torch_embeddings(folder, torch.float16)).all(), "torch overflows too"
    p = run("eval", folder, "--dtypes", "f16,bf16", "--runs", "1", "--json")
    r = json.loads(p.stdout)
    by = {c["name"]: c for c in r["candidates"]}
    assert by["float16"]["non_finite"] and not by["float16"]["passes"]
    assert by["bfloat16"]["passes"] and r["recommendation"] == "bfloat16"
    assert "float16 produced NaN or inf outputs first in encoder.layer.0" in p.stderr
    assert by["float16"]["first_non_finite"] == "encoder.layer.0"
    assert by["bfloat16"]["first_non_finite"] is None
    r = eval_json(folder, "--dtypes", "f16", "--compute", "f32", "--runs", "1")
    assert r["candidates"][1]["compute"] == "float32" and r["candidates"][1]["passes"]
    # The layer found is the one whose activations overflow, wherever it is.
    r = eval_json(scaled_minilm(minilm, tmp_path, layer=3), "--dtypes", "f16", "--runs", "1")
    assert r["candidates"][1]["first_non_finite"] == "encoder.layer.3"


def scaled_minilm(minilm, tmp_path, layer):
    """MiniLM with one attention-output LayerNorm scaled by 1000: weights fit f16 (largest
    1550), the activations after that LayerNorm do not."""
    folder = tmp_path / f"scaled{layer}"
    shutil.copytree(minilm, folder)
    sd = load_file(minilm / "model.safetensors")
    for k in ["weight", "bias"]:
        key = f"encoder.layer.{layer}.attention.output.LayerNorm.{k}"
        sd[key] = sd[key] * 1000
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_bad_candidates_get_one_line_errors(minilm, tmp_path):
    """A candidate that is not the model (missing tensor, other shape, integer where the model
    is floating, another architecture) fails before any run, with one line naming the file and
    the tensor, exit 1; RUST_BACKTRACE (candle appends a backtrace to its errors) changes nothing."""
    import os

    sd = load_file(minilm / "model.safetensors")
    key = "encoder.layer.3.output.dense.weight"
    cases = {
        "missing": {k: v for k, v in sd.items() if k != key},
        "shape": {**sd, key: sd[key][:10].contiguous()},
        "int": {**sd, key: sd[key].to(torch.int32)},
    }
    want = {"missing": "cannot find tensor " + key, "shape": "has shape [10, 1536]",
            "int": "is int32 where the model has float32"}
    env = {**os.environ, "RUST_BACKTRACE": "1"}
    for name, tensors in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, path)
        p = run("eval", minilm, "--dtypes", "", "--candidate", path, "--runs", "1",
                check=False, env=env)
        assert p.returncode == 1, (name, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0] and want[name] in lines[0], p.stderr
        assert p.stdout == ""


def test_shipped_example_runs():
    """The example folder the README uses (a config.json without dropout fields, as minimal
    configs are; transformers' defaults fill them) runs out of the box."""
    from conftest import ROOT

    r = eval_json(ROOT / "examples" / "tiny-bert", "--dtypes", "f16,bf16", "--runs", "1")
    assert [c["compute"] for c in r["candidates"]] == ["float32", "float16", "bfloat16"]
    assert all(not c["non_finite"] for c in r["candidates"])
    assert r["candidates"][1]["cosine_min"] > 0.999


def test_recommendation_honours_every_bound():
    """The shipped example's fp8 candidate keeps cosine above --min-cosine but changes nearest
    neighbours: cosine alone would recommend it (it is the smallest), every bound does not. The
    output names the bounds applied, the one fp8 failed, and the bound that does not apply to
    an encoder; loosening --min-neighbours makes fp8 the recommendation (so the bound is what
    decided); with a bound nothing meets, nothing is recommended."""
    from conftest import ROOT

    tiny = ROOT / "examples" / "tiny-bert"
    args = (tiny, "--dtypes", "f16,bf16,f8e4m3", "--runs", "1")
    r = eval_json(*args)
    by = {c["name"]: c for c in r["candidates"]}
    fp8 = by["float8_e4m3fn"]
    assert fp8["weight_bytes"] < by["float16"]["weight_bytes"]
    assert fp8["cosine_min"] >= r["min_cosine"] and not fp8["non_finite"], fp8
    assert fp8["neighbours_kept"] < r["min_neighbours"] == 0.99, fp8
    assert not fp8["passes"]
    assert fp8["failed_bounds"] == [{"bound": "min_neighbours", "measure": "neighbours_kept",
                                     "value": fp8["neighbours_kept"], "min": 0.99}]
    assert r["recommendation"] in ("float16", "bfloat16")
    assert by[r["recommendation"]]["passes"] and by[r["recommendation"]]["failed_bounds"] == []
    assert [b["name"] for b in r["bounds"]] == ["finite", "min_cosine", "min_neighbours"]
    # Every candidate that misses a bound is named with the bounds it missed (bf16 changes
    # one neighbour of 32 on this tiny random model).
    rejected = {x["name"]: x["failed"] for x in r["rejected"]}
    assert rejected == {c["name"]: c["failed_bounds"] for c in r["candidates"][1:]
                        if not c["passes"]}
    assert rejected["float8_e4m3fn"] == fp8["failed_bounds"]
    assert [b["name"] for b in r["ignored_bounds"]] == ["min_top1"]
    assert r["objective"] == "weight_bytes" and "fewest weight bytes" in r["recommended_for"]
    text = run("eval", *args).stdout
    assert "bounds: no NaN/inf in the outputs, cos min >= 0.999 (--min-cosine), NN kept >= 99% " \
           "(--min-neighbours) (not applied: --min-top1 for causal LMs only)" in text, text
    assert "not recommended: float8_e4m3fn: NN kept " in text and "% < 99%" in text, text
    assert f"recommendation: {r['recommendation']}, the smallest candidate" in text, text
    loose = eval_json(*args, "--min-neighbours", str(fp8["neighbours_kept"]))
    assert loose["recommendation"] == "float8_e4m3fn" and loose["rejected"] == []
    none = eval_json(*args, "--min-cosine", "1.5")
    assert none["recommendation"] is None
    assert {x["name"] for x in none["rejected"]} == {"float16", "bfloat16", "float8_e4m3fn"}
    assert all(x["failed"][0]["bound"] == "min_cosine" for x in none["rejected"])
    text = run("eval", *args, "--min-cosine", "1.5").stdout
    assert "recommendation: none: no candidate is within every bound; keep f32" in text, text


def test_unsupported_model_type(tmp_path, minilm):
    folder = tmp_path / "llama"
    shutil.copytree(minilm, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (folder / "config.json").write_text(json.dumps(cfg))
    p = run("eval", folder, check=False)
    assert p.returncode == 2 and "not supported" in p.stderr and "bert, llama, mistral, qwen2" in p.stderr


def tiny_llama(folder, minilm):
    """A small random Llama made by transformers (config + save_pretrained), with a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rms_norm_eps=1e-6, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder, safe_serialization=True)
    shutil.copy(minilm / "tokenizer.json", folder / "tokenizer.json")
    return model


def unpadded_ids(folder, sentences):
    """Token ids as the `tokenizers` library gives them with padding off (the MiniLM
    tokenizer.json pads to 128 by default)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    return [tok.encode(s).ids for s in sentences]


def test_llama_logits_match_transformers(minilm, tmp_path):
    folder = tmp_path / "llama"
    model = tiny_llama(folder, minilm)
    inputs = tmp_path / "in.txt"
    inputs.write_text("\n".join(SENTENCES[:3]) + "\n")
    r = eval_json(folder, "--dtypes", "f16,bf16", "--inputs", inputs, "--emit-embeddings", "--runs", "1")
    ref = r["candidates"][0]
    assert ref["ids"] == unpadded_ids(folder, SENTENCES[:3]), "each input alone, no padding"
    for ids, logits in zip(ref["ids"], ref["logits"]):
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0].double().numpy()
        diff = np.abs(np.array(logits, dtype=np.float64) - want).max()
        assert diff < 1e-4, diff
    by = {c["name"]: c for c in r["candidates"]}
    assert by["float16"]["compute"] == "float16", "a Llama runs in its weights' dtype"
    assert by["float16"]["top1_agreement"] > 0.97 and not by["float16"]["non_finite"]
    assert by["float16"]["kl_mean"] < 1e-4
    assert abs(by["bfloat16"]["perplexity_ratio"] - 1) < 0.01
    # a broken candidate: one projection zeroed
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    sd = load_file(folder / "model.safetensors")
    sd["model.layers.0.mlp.down_proj.weight"] = sd["model.layers.0.mlp.down_proj.weight"] * 1e6
    save_file(sd, broken / "model.safetensors", metadata={"format": "pt"})
    half = tmp_path / "half"
    run("convert", folder, "-o", half, "--to", "f16")
    r = eval_json(folder, "--dtypes", "", "--candidate", broken, "--candidate", half,
                  "--inputs", inputs, "--runs", "1")
    assert not r["candidates"][1]["passes"]
    assert r["candidates"][2]["compute"] == "float16", "a converted folder runs in its dtype"
    assert r["candidates"][2]["passes"] and r["recommendation"] == str(half)


def test_lm_memory_is_bounded_by_a_row(minilm, tmp_path):
    """The reference's logits are spilled to disk and candidates compared a position at a time:
    200 inputs x ~15 positions x 30522 f32 logits would be 350+ MB held in memory."""
    folder = tmp_path / "llama"
    tiny_llama(folder, minilm)
    inputs = tmp_path / "in.txt"
    inputs.write_text("\n".join(SENTENCES * 40) + "\n")
    r = eval_json(folder, "--dtypes", "f16", "--inputs", inputs, "--runs", "1")
    for c in r["candidates"]:
        assert c["peak_rss_bytes"] < 150e6, c
    assert r["candidates"][1]["kl_mean"] < 1e-4


def test_mixed_candidate_says_how_it_computes(minilm, tmp_path):
    r = eval_json(minilm, "--dtypes", "f16", "--preset", "keep-norms", "--runs", "1")
    c = r["candidates"][1]
    assert c["compute"] == "float16" and "float32 tensors computed in float16" in c["note"]
    r = eval_json(minilm, "--dtypes", "f16", "--preset", "keep-norms", "--compute", "f32",
                  "--runs", "1")
    assert r["candidates"][1]["compute"] == "float32" and r["candidates"][1]["note"] is None


def test_bad_configs_get_errors_not_panics(minilm, tmp_path):
    """config.json values candle divides by, unwraps on or allocates from are checked first:
    one line naming the file, exit 1, never a panic (exit 101) or a table sized by the config."""
    llama = tmp_path / "llama"
    tiny_llama(llama, minilm)
    cases = [
        (minilm, {"num_attention_heads": 0}, "none may be 0"),
        (llama, {"num_attention_heads": 0}, "none may be 0"),
        (llama, {"num_key_value_heads": 3}, "must be a multiple of"),
        (llama, {"rope_theta": -1}, "rope_theta -1"),
        (llama, {"intermediate_size": 100}, "gate_proj.weight` has shape [128, 64] where config.json gives [100, 64]"),
        (llama, {"rms_norm_eps": -1}, "the f32 reference gives NaN or inf"),
        (llama, {"vocab_size": 1000}, "outside the model's vocabulary of 1000"),
        (minilm, {"vocab_size": 1000}, "shape mismatch for embeddings.word_embeddings.weight"),
    ]
    for i, (src, change, want) in enumerate(cases):
        folder = tmp_path / f"case{i}"
        shutil.copytree(src, folder)
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(change)
        (folder / "config.json").write_text(json.dumps(cfg))
        p = run("eval", folder, "--dtypes", "f16", "--runs", "1", check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and want in lines[0], (change, p.stderr)
        assert str(folder) in lines[0], p.stderr
    # A huge max_position_embeddings: rotary tables only as long as the inputs need.
    folder = tmp_path / "long"
    shutil.copytree(llama, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["max_position_embeddings"] = 10**11
    (folder / "config.json").write_text(json.dumps(cfg))
    r = eval_json(folder, "--dtypes", "f16", "--runs", "1")
    assert all(c["peak_rss_bytes"] < 150e6 for c in r["candidates"]), r["candidates"]


def test_qwen2_logits_match_transformers(minilm, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    folder = tmp_path / "qwen2"
    model.save_pretrained(folder, safe_serialization=True)
    shutil.copy(minilm / "tokenizer.json", folder / "tokenizer.json")
    inputs = tmp_path / "in.txt"
    inputs.write_text("\n".join(SENTENCES[:2]) + "\n")
    r = eval_json(folder, "--dtypes", "f16", "--inputs", inputs, "--emit-embeddings", "--runs", "1")
    ref = r["candidates"][0]
    for ids, logits in zip(ref["ids"], ref["logits"]):
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0].double().numpy()
        assert np.abs(np.array(logits, dtype=np.float64) - want).max() < 1e-4
    assert r["candidates"][1]["kl_mean"] < 1e-4


def test_llama3_rope_scaling_matches_transformers(minilm, tmp_path):
    """RoPE scaling written the transformers-5 way (`rope_parameters`, rope_type llama3, as
    every Llama 3.1+ config has) is honoured: logits equal transformers' on an input longer
    than the original context; a rope type candle does not implement is refused by name."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "llama31"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rms_norm_eps=1e-6, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16})
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder, safe_serialization=True)
    shutil.copy(minilm / "tokenizer.json", folder / "tokenizer.json")
    saved = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" in saved and saved["rope_parameters"]["rope_type"] == "llama3"
    long = " ".join(SENTENCES[:4])
    inputs = tmp_path / "in.txt"
    inputs.write_text(long + "\n")
    r = eval_json(folder, "--dtypes", "", "--inputs", inputs, "--emit-embeddings", "--runs", "1")
    ref = r["candidates"][0]
    ids = ref["ids"][0]
    assert len(ids) > 16, "longer than original_max_position_embeddings"
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].double().numpy()
    diff = np.abs(np.array(ref["logits"][0], dtype=np.float64) - want).max()
    assert diff < 1e-4, diff
    # without the scaling the logits are measurably different: the test can fail
    plain = LlamaForCausalLM(LlamaConfig(**{**cfg.to_dict(), "rope_parameters": {
        "rope_type": "default", "rope_theta": 500000.0}})).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        other = plain(torch.tensor([ids])).logits[0].double().numpy()
    assert np.abs(other - want).max() > 1e-3
    # a rope type candle's Llama does not implement
    saved["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500000.0,
                                "original_max_position_embeddings": 16}
    (folder / "config.json").write_text(json.dumps(saved))
    p = run("eval", folder, "--dtypes", "f16", check=False)
    assert p.returncode == 1 and "RoPE scaling `yarn`" in p.stderr, p.stderr


def test_candidate_metrics_equal_an_independent_computation(minilm, tmp_path):
    """eval's figures recomputed with torch from the outputs it emits: per-token KL(ref || cand),
    top-1 agreement and perplexity for a causal LM; cosine and nearest-neighbour agreement for
    an encoder. The candidates are f16, bf16 and a damaged model, so the figures differ."""
    folder = tmp_path / "llama"
    tiny_llama(folder, minilm)
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    sd = load_file(folder / "model.safetensors")
    sd["model.layers.0.mlp.down_proj.weight"] = sd["model.layers.0.mlp.down_proj.weight"] * 30
    save_file(sd, damaged / "model.safetensors", metadata={"format": "pt"})
    inputs = tmp_path / "in.txt"
    inputs.write_text("\n".join(SENTENCES) + "\n")
    r = eval_json(folder, "--dtypes", "f16,bf16", "--candidate", damaged, "--inputs", inputs,
                  "--emit-embeddings", "--runs", "1")
    ref = r["candidates"][0]
    ref_logits = [torch.tensor(x, dtype=torch.float64) for x in ref["logits"]]
    ref_ppl = None
    for c in r["candidates"]:
        kls, agree, nll, predicted = [], 0, 0.0, 0
        for ids, lr, lc in zip(ref["ids"], ref_logits, c["logits"]):
            lc = torch.tensor(lc, dtype=torch.float64)
            lp, lq = torch.log_softmax(lr, -1), torch.log_softmax(lc, -1)
            kls += (lp.exp() * (lp - lq)).sum(-1).tolist()
            agree += int((lr.argmax(-1) == lc.argmax(-1)).sum())
            nll -= float(lq[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
            predicted += len(ids) - 1
        ppl = float(np.exp(nll / predicted))
        ref_ppl = ref_ppl or ppl
        assert abs(c["kl_mean"] - np.mean(kls)) <= 1e-9 + 1e-6 * np.mean(kls), c["name"]
        assert abs(c["kl_max"] - max(kls)) <= 1e-9 + 1e-6 * max(kls), c["name"]
        assert c["top1_agreement"] == agree / sum(len(x) for x in ref["ids"]), c["name"]
        assert abs(c["perplexity"] - ppl) <= 1e-6 * ppl, c["name"]
        assert abs(c["perplexity_ratio"] - ppl / ref_ppl) <= 1e-6, c["name"]
    assert r["candidates"][3]["kl_mean"] > 100 * r["candidates"][1]["kl_mean"] > 0

    # The encoder: cosines and nearest neighbours from the emitted embeddings.
    r = eval_json(minilm, "--dtypes", "f16,bf16", "--inputs", inputs, "--emit-embeddings",
                  "--runs", "1")
    ref = torch.tensor(r["candidates"][0]["embeddings"], dtype=torch.float64)

    def nearest(e):
        sim = torch.nn.functional.cosine_similarity(e[:, None], e[None, :], dim=-1)
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(-1)

    for c in r["candidates"]:
        e = torch.tensor(c["embeddings"], dtype=torch.float64)
        cos = torch.nn.functional.cosine_similarity(ref, e, dim=-1)
        assert abs(c["cosine_min"] - float(cos.min())) <= 1e-12, c["name"]
        assert abs(c["cosine_mean"] - float(cos.mean())) <= 1e-12, c["name"]
        assert abs(c["max_abs_diff"] - float((ref - e).abs().max())) <= 1e-12, c["name"]
        kept = float((nearest(ref) == nearest(e)).double().mean())
        assert c["neighbours_kept"] == kept, c["name"]
