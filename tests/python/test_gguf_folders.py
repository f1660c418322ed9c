"""GGUF from Hugging Face folders, and GGUF retypes, byte for byte what llama.cpp writes.

The folders are built by tests/fixtures/gguf/models.py (numpy weights with fixed seeds, a
committed SentencePiece tokenizer). tests/fixtures/gguf/generate.py ran llama.cpp's own
`convert_hf_to_gguf.py` and `llama_model_quantize` (llama-cpp-python 0.3.36) on the same folders
and committed the sha256 of every file they wrote: weightcast's outputs must have those digests.
The gguf reader checks the rest: the q/k rows permuted as the converter permutes them, the plan
(`--dry-run --json`) equal to the file, and the refusals."""

import hashlib
import json
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import ROOT, run

gguf = pytest.importorskip("gguf")
FIX = ROOT / "tests" / "fixtures" / "gguf"
sys.path.insert(0, str(FIX))
import models  # noqa: E402

REF = json.loads((FIX / "reference.json").read_text())


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-folders")
    return {name: make(root) for name, make in {**models.MODELS, **models.QWEN, **models.REAL}.items()}


ALL = list(models.MODELS) + list(models.QWEN) + list(models.REAL)


@pytest.mark.parametrize("outtype", models.OUTTYPES)
@pytest.mark.parametrize("name", ALL)
def test_folder_to_gguf_is_the_converters_file(folders, tmp_path, name, outtype):
    out = tmp_path / "out.gguf"
    run("convert", folders[name], "-o", out, "--to", outtype)
    want = REF["convert"][f"{name}/{outtype}"]
    assert out.stat().st_size == want["bytes"]
    assert sha256(out) == want["sha256"], f"{name} --to {outtype} differs from convert_hf_to_gguf.py's file"


@pytest.mark.parametrize("to", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("name", ALL)
def test_gguf_retype_is_llama_model_quantize(folders, tmp_path, name, to):
    src = tmp_path / "converted-f32.gguf"
    run("convert", folders[name], "-o", src, "--to", "f32")
    out = tmp_path / f"{to}.gguf"
    run("convert", src, "-o", out, "--to", to)
    for key in (f"{name}/{to}", f"{name}/{to}/default-mixture"):
        want = REF["quantize"][key]
        assert sha256(out) == want["sha256"], f"{key}: differs from llama_model_quantize's file"


def test_llama_cpp_logits_were_checked():
    # generate.py ran llama.cpp on weightcast's files too and found the converter's logits
    # (the BERT model's embeddings)
    for outtype in ["f32", "f16", "bf16", "q8_0"]:
        for name in ALL:
            assert REF["logits"][f"{name}/{outtype}"]["weightcast_equal"] is True


def unpermute(w, heads):
    """The inverse of LlamaModel.permute."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_values_names_and_permutation(folders, tmp_path):
    d = folders["Tiny-Mistral-v0.2-Instruct"]
    out = tmp_path / "m.gguf"
    run("convert", d, "-o", out, "--to", "f32")
    src = {}
    for f in sorted(d.glob("*.safetensors")):
        src.update(load_file(f))
    r = gguf.GGUFReader(str(out))
    got = {t.name: np.array(t.data) for t in r.tensors}
    cfg = json.loads((d / "config.json").read_text())
    assert "output.weight" not in got  # tied: llama.cpp reuses token_embd
    assert not any("rotary" in n for n in got)
    for i in range(cfg["num_hidden_layers"]):
        q = got[f"blk.{i}.attn_q.weight"]
        k = got[f"blk.{i}.attn_k.weight"]
        assert not np.array_equal(q, src[f"model.layers.{i}.self_attn.q_proj.weight"].astype(np.float32))
        np.testing.assert_array_equal(unpermute(q, cfg["num_attention_heads"]),
                                      src[f"model.layers.{i}.self_attn.q_proj.weight"].astype(np.float32))
        np.testing.assert_array_equal(unpermute(k, cfg["num_key_value_heads"]),
                                      src[f"model.layers.{i}.self_attn.k_proj.weight"].astype(np.float32))
        np.testing.assert_array_equal(got[f"blk.{i}.ffn_down.weight"],
                                      src[f"model.layers.{i}.mlp.down_proj.weight"].astype(np.float32))
    fields = {f.name: f.contents() for f in r.fields.values() if not f.name.startswith("GGUF.")}
    assert fields["general.name"] == "Tiny Mistral v0.2 Instruct"
    # a version at the start belongs to the base name (gguf-py's heuristics)
    assert fields["general.basename"] == "Tiny-Mistral-v0.2"
    assert fields["general.finetune"] == "Instruct"
    assert "general.version" not in fields
    assert fields["llama.rope.scaling.type"] == "linear"
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.chat_template"].startswith("{% for m in messages %}")
    assert abs(fields["general.sampling.temp"] - 0.7) < 1e-6
    # the model card: a creator, three base models (a Hub id, a Hub URL, a mapping), a license
    # list, datasets, tags with the pipeline tag, Norwegian kept a string
    assert fields["general.author"] == "Some One"
    assert fields["general.license"] == "apache-2.0,mit"
    assert fields["general.base_model.count"] == 3
    assert fields["general.base_model.0.repo_url"] == "https://huggingface.co/mistralai/Mistral-7B-v0.1"
    assert fields["general.base_model.2.name"] == "Custom Base"
    assert fields["general.dataset.1.organization"] == "HuggingFaceH4"
    assert fields["general.tags"] == ["text-generation-inference", "tiny", "text-generation"]
    assert fields["general.languages"] == ["en", "no"]


def test_plan_is_the_file(folders, tmp_path):
    d = folders["Tiny-Mistral-v0.2-Instruct"]
    out = tmp_path / "m.gguf"
    plan = json.loads(run("convert", d, "-o", out, "--to", "q8_0", "--dry-run", "--json").stdout)
    assert not out.exists()
    run("convert", d, "-o", out, "--to", "q8_0")
    r = gguf.GGUFReader(str(out))
    written = {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in r.tensors}
    planned = {e["name"]: (e["ggml_type"], e["bytes_after"]) for e in plan["tensors"]}
    assert planned == written
    # the ffn_down rows (72 values) are no whole Q8_0 block: F16, as llama.cpp falls back
    assert written["blk.0.ffn_down.weight"][0] == "F16"
    assert written["blk.0.attn_norm.weight"][0] == "F32"
    sources = {e["name"]: e.get("source_name") for e in plan["tensors"]}
    assert sources["blk.1.attn_q.weight"] == "model.layers.1.self_attn.q_proj.weight"
    removed = [e["name"] for e in plan["removed"]]
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in removed


def test_overflow_refused_not_a_broken_file(tmp_path):
    def big(w):
        dtype, shape, raw = w["model.layers.0.mlp.up_proj.weight"]
        a = np.frombuffer(raw, dtype=np.uint16).copy()
        a[0] = models.bf16_bits(np.array([1e6], dtype=np.float32))[0]
        w["model.layers.0.mlp.up_proj.weight"] = (dtype, shape, a.tobytes())

    d = models.tiny_llama(tmp_path, edit=big)
    out = tmp_path / "o.gguf"
    p = run("convert", d, "-o", out, "--to", "f16", check=False)
    assert p.returncode != 0 and "model.layers.0.mlp.up_proj.weight" in p.stderr, p.stderr
    assert not out.exists()
    run("convert", d, "-o", out, "--to", "f16", "--on-overflow", "clamp")
    t = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}["blk.0.ffn_up.weight"]
    v = np.array(t.data)
    assert np.isfinite(v).all() and v.max() == np.float16(65504)


def test_qwen_tokens_and_merges(folders, tmp_path):
    """Qwen2: the byte-level BPE vocabulary, llama.cpp's `qwen2` pre-tokenizer, the merges,
    ids past the tokenizer's padded as the converter pads them, biases in F32."""
    out = tmp_path / "q.gguf"
    run("convert", folders["tiny-qwen2"], "-o", out, "--to", "q8_0")
    r = gguf.GGUFReader(str(out))
    f = {x.name: x for x in r.fields.values()}
    assert f["general.architecture"].contents() == "qwen2"
    assert f["tokenizer.ggml.pre"].contents() == "qwen2"
    toks = f["tokenizer.ggml.tokens"].contents()
    assert len(toks) == 151936 and toks[151643] == "<|endoftext|>" and toks[151700] == "[PAD151700]"
    types = f["tokenizer.ggml.token_type"].contents()
    assert types[151643] == 3 and types[151700] == 5 and types[100] == 1
    assert f["tokenizer.ggml.merges"].contents()[:2] == ["\u0120 \u0120", "\u0120\u0120 \u0120\u0120"]
    tt = {t.name: t.tensor_type.name for t in r.tensors}
    assert tt["blk.0.attn_q.bias"] == "F32" and tt["blk.0.attn_q.weight"] == "Q8_0"


def test_minilm_plan_and_tokens(folders, tmp_path):
    """The real all-MiniLM-L6-v2: BERT names, F32 position and token-type embeddings, the
    WordPiece vocabulary in llama.cpp's phantom-space form, llama.cpp's name for its
    pre-tokenizer, mean pooling, the pooler left out."""
    out = tmp_path / "m.gguf"
    plan = json.loads(run("convert", folders["all-MiniLM-L6-v2"], "-o", out, "--to", "f16",
                          "--json").stdout)
    types = {e["name"]: e["ggml_type"] for e in plan["tensors"]}
    assert types["position_embd.weight"] == "F32" and types["token_types.weight"] == "F32"
    assert types["blk.5.ffn_up.weight"] == "F16" and types["blk.5.layer_output_norm.weight"] == "F32"
    assert {e["name"] for e in plan["removed"]} >= {"pooler.dense.weight", "pooler.dense.bias"}
    r = gguf.GGUFReader(str(out))
    f = {x.name: x for x in r.fields.values()}
    assert f["tokenizer.ggml.pre"].contents() == "jina-v2-en"
    assert f["bert.pooling_type"].contents() == 1
    toks = f["tokenizer.ggml.tokens"].contents()
    assert toks[0] == "[PAD]" and toks[101] == "[CLS]" and toks[2023] == "\u2581this"
    vocab = (folders["all-MiniLM-L6-v2"] / "vocab.txt").read_text().splitlines()
    sub = next(i for i, t in enumerate(vocab) if t.startswith("##"))
    assert toks[sub] == vocab[sub][2:]


def test_refusals(folders, tmp_path):
    out = tmp_path / "o.gguf"
    other = models.tiny_llama(tmp_path / "phi")
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(cfg, architectures=["Phi3ForCausalLM"])))
    p = run("convert", other, "-o", out, "--to", "f16", check=False)
    assert p.returncode == 2 and "not `Phi3ForCausalLM`" in p.stderr, p.stderr
    # a Qwen3 reranker (the converter writes a classifier head for it): refused by name
    rr = models.tiny_qwen3(tmp_path / "rr")
    (rr / "README.md").write_text("# Qwen3-Reranker\n")
    p = run("convert", rr, "-o", out, "--to", "f16", check=False)
    assert p.returncode == 2 and "reranker" in p.stderr, p.stderr
    # a WordPiece vocabulary llama.cpp does not know: its pre-tokenizer hash is named
    p = run("convert", ROOT / "examples" / "tiny-bert", "-o", out, "--to", "f16", check=False)
    assert p.returncode == 2 and "chkhsh" in p.stderr, p.stderr
    d = models.tiny_llama(tmp_path / "card")
    # a card value PyYAML (YAML 1.1) reads as a bool: refused, not written as a string
    (d / "README.md").write_text("---\nlicense: mit\ntags:\n- on\n---\n# tiny\n")
    p = run("convert", d, "-o", out, "--to", "f16", check=False)
    assert p.returncode == 2 and "model card `tags`" in p.stderr, p.stderr
    (d / "README.md").write_text("---\nlicense: [mit\n---\n")
    p = run("convert", d, "-o", out, "--to", "f16", check=False)
    assert p.returncode != 0 and "README.md" in p.stderr and "panicked" not in p.stderr, p.stderr
    (d / "README.md").unlink()
    (d / "tokenizer.model").unlink()
    p = run("convert", d, "-o", out, "--to", "f16", check=False)
    assert p.returncode == 2 and "tokenizer.model" in p.stderr, p.stderr
    (d / "tokenizer.model").write_bytes(b"\x0a\xff\xff\xff")
    p = run("convert", d, "-o", out, "--to", "f16", check=False)
    assert p.returncode != 0 and "SentencePiece" in p.stderr and "panicked" not in p.stderr, p.stderr
    single = d / "model.safetensors"
    p = run("convert", single, "-o", out, "--to", "f16", check=False)
    assert p.returncode == 2 and "model folder" in p.stderr, p.stderr
    assert not out.exists()


def transformers_gguf(path, model_config=None):
    """What transformers loads from a GGUF file: config, tensors (load_gguf_checkpoint into a
    meta model, as from_pretrained(gguf_file=) does) and tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config or config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return config, tensors, tok


TEXTS = ["the quick brown fox", " hello  world\n\n", "lazy dogs weights, in bounded memory!",
         "3333 \u2026\U0001F680 <|im_start|>user\nhi<|im_end|>", "\u00dcn\u00efc\u00f6d\u00e9 \u6211\u60f3\u5728apple\u5de5\u4f5c"]


# (the Qwen vocabulary takes transformers seconds to rebuild: one file type each)
@pytest.mark.parametrize("name,gguf_type", [(m, t) for m in models.MODELS for t in ["f32", "q8_0"]]
                         + [("tiny-qwen2", "f32"), ("tiny-qwen3", "q8_0")])
def test_gguf_to_folder_is_what_transformers_loads(folders, tmp_path, name, gguf_type):
    import torch
    from safetensors.torch import load_file as load_torch
    from transformers import AutoConfig, AutoTokenizer

    g = tmp_path / f"{gguf_type}.gguf"
    run("convert", folders[name], "-o", g, "--to", gguf_type)
    out = tmp_path / "back"
    run("convert", g, "-o", out, "--to", "f32")
    # transformers' GGUF loader reads no head width for qwen3 and takes Qwen3Config's 128; the
    # folder's config.json has the file's own (its key length): the meta model is built from it
    config, tensors, tok = transformers_gguf(g, AutoConfig.from_pretrained(out))
    got = load_torch(out / "model.safetensors")
    assert sorted(got) == sorted(tensors)
    for k, v in tensors.items():
        assert torch.equal(got[k], v), k
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(out)
    if name == "Tiny-Mistral-v0.2-Instruct":  # its sampling defaults come back, valid
        assert gen.do_sample and gen.temperature == 0.7 and gen.top_k == 40
        gen.validate(strict=True)
    mine = AutoConfig.from_pretrained(out).to_dict()
    theirs = config.to_dict()
    differ = {k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k)}
    allowed = {"dtype", "architectures", "_name_or_path", "_model_name_or_path"}
    if name == "tiny-qwen3":
        allowed.add("head_dim")
        assert mine["head_dim"] == 16 and theirs["head_dim"] == 128
    assert differ <= allowed, differ
    arch = json.loads((folders[name] / "config.json").read_text())["architectures"]
    want = ["LlamaForCausalLM"] if arch == ["MistralForCausalLM"] else arch
    assert mine["architectures"] == want and mine["dtype"] == "float32"
    ours = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert ours(text)["input_ids"] == tok(text)["input_ids"], text
    if gguf_type == "f32":
        # the whole round trip: the folder's own tensors again (the inv_freq buffer aside)
        src = {}
        for f in sorted(folders[name].glob("*.safetensors")):
            src.update(load_torch(f))
        src = {k: v.float() for k, v in src.items() if "rotary_emb" not in k}
        assert sorted(src) == sorted(got)
        for k, v in src.items():
            assert torch.equal(got[k], v), k


def test_gguf_to_safetensors_gets_hugging_face_names(folders, tmp_path):
    g = tmp_path / "m.gguf"
    run("convert", folders["tiny-llama"], "-o", g, "--to", "bf16")
    out = tmp_path / "m.safetensors"
    plan = json.loads(run("convert", g, "-o", out, "--to", "bf16", "--json").stdout)
    names = [t["name"] for t in plan["tensors"]]
    assert "model.layers.1.self_attn.k_proj.weight" in names and "lm_head.weight" in names
    from safetensors import safe_open

    with safe_open(out, "np") as f:
        assert sorted(f.keys()) == sorted(names)
