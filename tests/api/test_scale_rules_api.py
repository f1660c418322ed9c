"""A rules file's `scale` and `[config]` through the Python API: `convert(rules=)` writes what
the command line writes, `cast_module(rules=)` gives in memory the bits `convert` writes (a
tied Parameter scaled once and still one Parameter, the config and the norms' epsilon edited),
`load(rules=)` applies the factors. The command line's side, every output format against
torch's arithmetic, is tests/python/test_scale_rules.py."""

import json

import pytest
import torch
from safetensors.torch import load_file

import weightcast
from conftest import run

EPS = 1.52587890625e-08  # 2**-26
INT_VIEW = {2: torch.int16, 4: torch.int32}

RULES = """
[[rule]]
match = "model.embed_tokens.weight"
scale = 0.125

[[rule]]
match = "model.layers.*.mlp.down_proj"
scale = 0.3

[[rule]]
match = "model.layers.0.self_attn.o_proj.weight"
scale = 0.5
to = "f32"

[[rule]]
match = "model.norm.weight"
scale = 8.0
form = "1+w"
"""
CONFIG = f"\n[config]\nrms_norm_eps = {EPS!r}\n"


def llama(tied=True, seed=0):
    """A small LlamaForCausalLM in f32, its embedding tied with lm_head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      rms_norm_eps=1e-6, tie_word_embeddings=tied)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():  # norms away from 1, so that 1+w shows
            p.add_(torch.randn_like(p) * 0.02)
    return m


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = INT_VIEW[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "llama"
    llama().save_pretrained(d)
    return d


@pytest.fixture()
def rules(tmp_path):
    with_config, plain = tmp_path / "with-config.toml", tmp_path / "plain.toml"
    with_config.write_text(RULES + CONFIG)
    plain.write_text(RULES)
    return with_config, plain


def test_convert_writes_what_the_command_line_writes(folder, rules, tmp_path):
    with_config, _ = rules
    res = weightcast.convert(folder, tmp_path / "py", to="f16", rules=with_config)
    run("convert", folder, "-o", tmp_path / "cli", "--to", "f16", "--rules", with_config)
    assert (tmp_path / "py" / "model.safetensors").read_bytes() == \
        (tmp_path / "cli" / "model.safetensors").read_bytes()
    cfg = json.loads((tmp_path / "py" / "config.json").read_text())
    assert cfg["rms_norm_eps"] == EPS and cfg.get("dtype", cfg.get("torch_dtype")) == "float16"
    assert res["config"] == {"rms_norm_eps": EPS}
    rows = {e.name: e for e in res.tensors}
    assert rows["model.embed_tokens.weight"]["scale"] == 0.125
    assert rows["model.norm.weight"]["form"] == "1+w"
    assert rows["model.layers.0.self_attn.o_proj.weight"].to == "F32"
    got = load_file(tmp_path / "py" / "model.safetensors")
    want = (load_file(folder / "model.safetensors")["model.embed_tokens.weight"].float() * 0.125)
    assert same_bits(got["model.embed_tokens.weight"], want.half())
    # a single file cannot carry [config]: refused, nothing written
    with pytest.raises(weightcast.UsageError, match="no config.json"):
        weightcast.convert(folder, tmp_path / "one.safetensors", to="f16", rules=with_config)
    assert not (tmp_path / "one.safetensors").exists()


def test_cast_module_gives_convert_bits_and_keeps_ties(folder, rules, tmp_path):
    with_config, _ = rules
    run("convert", folder, "-o", tmp_path / "cli", "--to", "f16", "--rules", with_config)
    written = load_file(tmp_path / "cli" / "model.safetensors")
    m = llama()
    emb = m.model.embed_tokens.weight
    assert m.lm_head.weight is emb
    before = {k: v.clone() for k, v in m.state_dict().items()}

    plan = weightcast.cast_module(m, "f16", rules=with_config, dry_run=True)
    assert plan["config"] == {"rms_norm_eps": EPS}
    rows = {e.name: e for e in plan.tensors}
    assert rows["model.embed_tokens.weight"]["scale"] == 0.125
    assert "lm_head.weight" not in rows, "a tied Parameter is planned once"
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items()), "dry run"
    assert m.config.rms_norm_eps == 1e-6

    weightcast.cast_module(m, "f16", rules=with_config)
    assert m.lm_head.weight is emb and m.model.embed_tokens.weight is emb, "still one Parameter"
    assert isinstance(emb, torch.nn.Parameter)
    sd = m.state_dict()
    for name, t in written.items():
        assert same_bits(sd[name], t), name
    assert same_bits(sd["lm_head.weight"], written["model.embed_tokens.weight"]), "scaled once"
    assert m.config.rms_norm_eps == EPS
    norms = [x for x in m.modules() if hasattr(x, "variance_epsilon")]
    assert norms and all(x.variance_epsilon == EPS for x in norms)


def test_cast_module_refusals_change_nothing(rules):
    with_config, _ = rules
    bad = with_config.parent / "bad.toml"
    bad.write_text(RULES + "\n[config]\nrms_norm_epsilon = 1e-8\n")
    m = llama()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(weightcast.UsageError, match="no `rms_norm_epsilon`"):
        weightcast.cast_module(m, "f16", rules=bad)
    # a module without a config
    seq = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    plain = torch.nn.Sequential(*[torch.nn.Linear(4, 4)])
    cfg_only = with_config.parent / "cfg.toml"
    cfg_only.write_text(CONFIG)
    with pytest.raises(weightcast.UsageError, match="has no `config`"):
        weightcast.cast_module(seq, "f16", rules=cfg_only)
    assert seq[0].weight.dtype == torch.float32
    # an integer buffer matched by a scale rule
    plain.register_buffer("steps", torch.arange(3))
    ints = with_config.parent / "ints.toml"
    ints.write_text("[[rule]]\nmatch = 'steps'\nscale = 2.0\n")
    with pytest.raises(weightcast.UsageError, match="tensor `steps`"):
        weightcast.cast_module(plain, "f16", rules=ints)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert m.config.rms_norm_eps == 1e-6


def test_load_applies_factors_and_refuses_config(folder, rules, tmp_path):
    with_config, plain = rules
    run("convert", folder, "-o", tmp_path / "cli", "--to", "f16", "--rules", with_config)
    written = load_file(tmp_path / "cli" / "model.safetensors")
    got = weightcast.load(folder, dtype="f16", rules=plain)
    for name, t in written.items():
        assert same_bits(got[name], t), name
    with pytest.raises(weightcast.UsageError, match="config"):
        weightcast.load(folder, dtype="f16", rules=with_config)
