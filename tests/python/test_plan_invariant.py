"""The plan is the truth: for every fixture, every output format and a set of rule combinations,
what `convert --dry-run --json` prints is what the written output holds (names, dtypes, shapes)
and every value equals torch's own `.to()` of the dtype the plan chose (of `w.float() * scale`
where the plan gives a tensor a factor)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run
import test_torch  # noqa: F401  (puts the custom-module fixture's class where its pickle says)

FIX = ROOT / "tests" / "fixtures" / "torch"
TORCH_FIXTURES = sorted(p.name for p in FIX.glob("*.pt"))
SAFETENSORS_INPUTS = [ROOT / "examples" / "tiny-bert" / "model.safetensors"]

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64, "U16": torch.uint16,
}

RULE_SETS = [
    [],
    ["--preset", "keep-norms"],
    ["--only", "re:weight$"],
    ["--rule", "re:.*=bf16", "--keep", "kind:1d"],
    ["--rule", "re:^(0|8|fc1|embed|w)\\b.*=f8e4m3"],
    ["--rules", str(ROOT / "tests" / "fixtures" / "scale-rules.toml")],
]


def flatten(obj, prefix=""):
    """Every tensor of a loaded checkpoint by its dotted path, as weightcast names them: dict
    keys and list indices joined by dots, a module by its state_dict()."""
    out = {}
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict(keep_vars=True)
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}.{i}" if prefix else str(i)))
    return out


def same_values(got, want, name):
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape), name
    if got.is_quantized or got.is_sparse:
        return
    g, w = got.detach().contiguous().reshape(-1), want.detach().contiguous().reshape(-1)
    if g.is_floating_point():
        nan = torch.isnan(g.float())
        assert torch.equal(nan, torch.isnan(w.float())), name
        g, w = g[~nan], w[~nan]
    assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)), name


def reference(src):
    if src.suffix == ".safetensors":
        return load_file(src)
    return torch.load(src, weights_only=False, map_location="cpu")


def check(src, out, plan):
    ref_obj = reference(src)
    entry = plan["state_dict_entry"]
    if out.suffix == ".safetensors":
        got = load_file(out)
        # exactly the plan's tensors, by the plan's names
        assert sorted(got) == sorted(t["name"] for t in plan["tensors"])
        assert not plan["other_tensors"]
    else:
        loaded = torch.load(out, weights_only=False, map_location="cpu")
        top = flatten(loaded)
        sd_obj = loaded[entry] if entry and plan["whole_file"] else loaded
        got = flatten(sd_obj)
        for t in plan["other_tensors"]:
            assert t["name"] in top, t["name"]
            got_other = top[t["name"]]
            want = flatten(ref_obj)[t["name"]]
            assert got_other.dtype == DTYPES[t["to"]], t["name"]
            same_values(got_other, want.to(DTYPES[t["to"]]) if t["cast"] else want, t["name"])
        if not plan["whole_file"] and entry:
            # --inference: nothing but the state dict
            assert set(top) == set(got)
        planned = {t["name"] for t in plan["tensors"]}
        # names not in the plan are tied copies of planned tensors (one storage, one decision)
        for name, v in got.items():
            if name not in planned and not v.is_quantized and not v.is_sparse:
                ptr = v.untyped_storage().data_ptr()
                assert any(got[p].untyped_storage().data_ptr() == ptr for p in planned if p in got), name
    ref = flatten(ref_obj[entry] if entry and isinstance(ref_obj, dict) else ref_obj)
    for t in plan["tensors"]:
        name = t["name"]
        assert name in got, name
        v = got[name]
        assert v.dtype == DTYPES[t["to"]], (name, v.dtype, t["to"])
        assert list(v.shape) == t["shape"], name
        want = ref[name]
        if t.get("scale") is not None:
            w, k = want.float(), t["scale"]
            want = k * (1 + w) - 1 if t.get("form") == "1+w" else w * k
        same_values(v, want.to(v.dtype) if t["cast"] else want, name)


def cases():
    for name in TORCH_FIXTURES:
        for out in ["out.safetensors", "out.pt"]:
            yield FIX / name, out
    for src in SAFETENSORS_INPUTS:
        for out in ["out.safetensors", "out.pt"]:
            yield src, out


@pytest.mark.parametrize("rules", RULE_SETS, ids=lambda r: " ".join(r) or "no-rules")
@pytest.mark.parametrize("src,out", list(cases()), ids=lambda x: getattr(x, "name", x))
def test_output_is_the_plan(tmp_path, src, out, rules):
    out = tmp_path / out
    args = ["convert", src, "-o", out, "--to", "f16", "--on-overflow", "allow", *rules]
    dry = run(*args, "--dry-run", "--json", check=False)
    if dry.returncode == 2 and "matches no tensor" in dry.stderr:
        pytest.skip("rule set does not apply")
    if dry.returncode == 2 and ("a scale applies to floating tensors only" in dry.stderr
                                or "give them the same scale" in dry.stderr):
        # refused before anything is written (test_scale_rules.py checks both refusals)
        pytest.skip("the scale rules select an integer tensor, or views with two factors")
    real = run(*args, check=False)
    if src.name == "scripted.pt" and out.suffix == ".pt":
        assert real.returncode == 2 and "TorchScript" in real.stderr and not out.exists()
        return
    if src.name == "malicious.pt" and out.suffix == ".pt":
        assert real.returncode == 1 and "dangerous" in real.stderr and not out.exists()
        return
    if src.name == "custom_module.pt" and out.suffix == ".pt":
        # a user's own class: a call audit does not allow, refused (dry run too) until accepted
        for p in (dry, real):
            assert p.returncode == 1 and "__main__.Custom" in p.stderr, p.stderr
        assert not out.exists()
        args += ["--allow", "__main__.Custom"]
        dry = run(*args, "--dry-run", "--json", check=False)
        real = run(*args, check=False)
    assert dry.returncode == 0, dry.stderr
    assert real.returncode == 0, real.stderr
    check(src, out, json.loads(dry.stdout))


@pytest.mark.parametrize("extra", [["--inference"], ["--state-dict-only"], ["--cast-optimizer"],
                                   ["--key", "model"]])
@pytest.mark.parametrize("name", ["training.pt", "legacy_training.pt"])
def test_training_checkpoint_outputs_are_the_plan(tmp_path, name, extra):
    out = tmp_path / "out.pt"
    args = ["convert", FIX / name, "-o", out, "--to", "bf16", *extra]
    plan = json.loads(run(*args, "--dry-run", "--json").stdout)
    run(*args)
    check(FIX / name, out, plan)
    if "--inference" in extra:
        # the training state (training.pt's optimizer) dropped; `epoch` and the structure kept
        assert plan["scope"] == "inference" and not plan["other_tensors"]
        assert [d["entry"] for d in plan["dropped"]] == (["optimizer"] if name == "training.pt" else [])
        loaded = torch.load(out, weights_only=True)
        assert set(loaded) == set(torch.load(FIX / name, weights_only=True)) - {"optimizer"}
    elif "--state-dict-only" in extra:
        assert plan["scope"] == "state_dict" and plan["dropped"] and not plan["other_tensors"]
    else:
        assert not plan["dropped"]
        assert bool(plan["other_tensors"]) == (name == "training.pt")  # its optimizer state
    if "--cast-optimizer" in extra and plan["other_tensors"]:
        casts = {t["name"]: t["cast"] for t in plan["other_tensors"]}
        assert any(casts.values()) and not all(casts.values())  # moments cast, steps kept
    # totals count what is written
    t = plan["totals"]
    assert t["tensors"] == len(plan["tensors"]) + len(plan["other_tensors"])
    assert not math.isnan(t["bytes_after"])


@pytest.mark.parametrize("rules", RULE_SETS[:3], ids=lambda r: " ".join(r) or "no-rules")
@pytest.mark.parametrize("out", ["out.safetensors", "out.pt"])
def test_real_model_output_is_the_plan(minilm, tmp_path, out, rules):
    """The held-in real model (all-MiniLM-L6-v2) through both output formats."""
    src = minilm / "model.safetensors"
    out = tmp_path / out
    args = ["convert", src, "-o", out, "--to", "bf16", *rules]
    plan = json.loads(run(*args, "--dry-run", "--json").stdout)
    run(*args)
    check(src, out, plan)
