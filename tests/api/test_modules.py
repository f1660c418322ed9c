"""Mixed precision that runs: runnable, cast_module and load_module against real torch,
torchvision and transformers models."""

import pytest
import torch
import torch.nn.functional as F

import weightcast
from conftest import run


def resnet18():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def by_hand(model, x):
    """resnet18 with the convolutions in f32 and `fc` in bf16, written out."""
    m = model
    with torch.no_grad():
        y = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        y = m.layer4(m.layer3(m.layer2(m.layer1(y))))
        y = torch.flatten(m.avgpool(y), 1)
        return F.linear(y.bfloat16(), m.fc.weight.bfloat16(), m.fc.bias.bfloat16())


def test_the_recipes_layer_specific_cast_runs(tmp_path):
    """torch.save(resnet18) converted with --only class:Linear loads back mixed, as planned; its
    forward raises in plain torch, runs once runnable, and equals the same math by hand; the
    same rules applied in memory by cast_module give the same output bit for bit."""
    model = resnet18()
    src, out = tmp_path / "resnet18.pt", tmp_path / "resnet18-mixed.pt"
    torch.save(model, src)
    run("convert", src, "-o", out, "--to", "bf16", "--only", "class:Linear")
    mixed = torch.load(out, weights_only=False).eval()
    assert mixed.fc.weight.dtype == torch.bfloat16 and mixed.conv1.weight.dtype == torch.float32
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match="dtype"):
        with torch.no_grad():
            mixed(x)
    handle = weightcast.runnable(mixed)
    assert handle.mixed and weightcast.runnable(mixed) is handle  # idempotent
    with torch.no_grad():
        got = mixed(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, by_hand(model, x))
    with torch.inference_mode():
        assert torch.equal(mixed(x), got)
    # The invariant: convert + load equals cast_module in memory.
    in_memory = weightcast.cast_module(resnet18(), "bf16", only="class:Linear")
    assert in_memory.fc.weight.dtype == torch.bfloat16
    assert in_memory.layer1[0].bn1.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(in_memory(x), got)
    # remove() undoes it: plain torch refuses again.
    handle.remove()
    with pytest.raises(RuntimeError):
        with torch.no_grad():
            mixed(x)


def test_runnable_leaves_uniform_modules_alone_and_keeps_integer_inputs():
    lin = torch.nn.Linear(4, 2)
    h = weightcast.runnable(lin)
    assert not h.mixed and not lin._forward_pre_hooks
    emb = torch.nn.Sequential(torch.nn.Embedding(10, 4).bfloat16(), torch.nn.Linear(4, 3))
    weightcast.runnable(emb)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        out = emb(ids)  # ids stay integers; the bf16 embedding meets the f32 linear
    want = F.linear(emb[0].weight[ids].float(), emb[1].weight, emb[1].bias)
    assert out.dtype == torch.float32 and torch.equal(out, want)


def test_cast_module_rules_dry_run_overflow_and_ties():
    model = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.LayerNorm(4),
                                torch.nn.Linear(4, 8, bias=False))
    model[2].weight = model[0].weight  # tied, as a language model's head
    plan = weightcast.cast_module(model, "f16", keep="kind:norm", dry_run=True)
    rows = {t.name: t for t in plan.tensors}
    assert rows["1.weight"].to == "F32" and rows["0.weight"].to == "F16"
    assert "2.weight" not in rows  # a tied weight is planned once
    assert model[0].weight.dtype == torch.float32  # dry run: nothing changed
    weightcast.cast_module(model, "f16", keep="kind:norm")
    assert model[2].weight is model[0].weight and model[0].weight.dtype == torch.float16
    assert model[1].weight.dtype == torch.float32
    with torch.no_grad():
        assert model(torch.tensor([1, 2])).dtype == torch.float16
    big = torch.nn.Linear(2, 2)
    with torch.no_grad():
        big.weight[0, 0] = 1e6
    with pytest.raises(weightcast.RefusedError, match='on_overflow="keep"'):
        weightcast.cast_module(big, "f16")
    assert big.weight.dtype == torch.float32
    weightcast.cast_module(big, "f16", on_overflow="clamp")
    assert big.weight[0, 0].item() == 65504.0


def bert_inputs(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return tok(["weights cast to half precision", "a norm kept in float32 stays float32",
                "the quick brown fox"], padding=True, return_tensors="pt")


def test_load_module_keeps_the_stored_dtypes(tmp_path, minilm):
    """A keep-norms folder: transformers' from_pretrained would load every parameter in one
    dtype; load_module keeps the norms in f32, runs, is no worse than all-f16, and equals
    cast_module with the same rules in memory."""
    from transformers import AutoConfig, AutoModel

    mixed_dir, f16_dir = tmp_path / "mixed", tmp_path / "f16"
    run("convert", minilm, "-o", mixed_dir, "--to", "f16", "--preset", "keep-norms")
    run("convert", minilm, "-o", f16_dir, "--to", "f16")
    cfg = AutoConfig.from_pretrained(minilm)
    inputs = bert_inputs(minilm)

    def output(model):
        with torch.no_grad():
            return model(**inputs).last_hidden_state.float()

    reference = output(AutoModel.from_pretrained(minilm, dtype=torch.float32).eval())
    mixed = weightcast.load_module(AutoModel.from_config(cfg).eval(), mixed_dir)
    assert mixed.embeddings.LayerNorm.weight.dtype == torch.float32
    assert mixed.encoder.layer[0].attention.self.query.weight.dtype == torch.float16
    got_mixed = output(mixed)
    plain = weightcast.load_module(AutoModel.from_config(cfg).eval(), f16_dir)
    assert not weightcast.runnable(plain).mixed
    got_f16 = output(plain)
    # Errors over the real tokens (padding positions are not outputs anyone reads); measured:
    # mixed 1.6e-3 max, 3.1e-4 RMS; all-f16 3.5e-3 max, 6.4e-4 RMS.
    real = inputs["attention_mask"].bool()

    def errors(got):
        d = (got - reference)[real]
        return d.abs().max().item(), d.pow(2).mean().sqrt().item()

    (max_mixed, rms_mixed), (max_f16, rms_f16) = errors(got_mixed), errors(got_f16)
    assert torch.isfinite(got_mixed).all()
    assert max_mixed <= max_f16 and rms_mixed <= rms_f16, (max_mixed, rms_mixed, max_f16, rms_f16)
    in_memory = AutoModel.from_pretrained(minilm, dtype=torch.float32).eval()
    weightcast.cast_module(in_memory, "f16", preset="keep-norms")
    assert torch.equal(output(in_memory), got_mixed)


def test_load_module_refuses_names_that_do_not_match(tmp_path):
    from safetensors.torch import save_file

    m = torch.nn.Linear(3, 2)
    f = tmp_path / "w.safetensors"
    save_file({"weight": torch.ones(2, 3).half(), "extra": torch.ones(1)}, f)
    before = m.weight.clone()
    with pytest.raises(weightcast.UsageError, match="missing bias; unexpected extra"):
        weightcast.load_module(m, f)
    assert torch.equal(m.weight, before)  # nothing was loaded
    weightcast.load_module(m, f, strict=False)
    assert m.weight.dtype == torch.float16 and m.bias.dtype == torch.float32
    with torch.no_grad():
        assert m(torch.ones(1, 3)).shape == (1, 2)
