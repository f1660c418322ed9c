"""PyTorch checkpoints: read without executing pickle code, converted to safetensors, compared
with what torch itself loads and casts. Fixtures: tests/fixtures/torch (made by
make_fixtures.py there with real torch)."""

import importlib.util
import json
import pathlib
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import ROOT, run

FIX = ROOT / "tests" / "fixtures" / "torch"
MARKER = pathlib.Path("/tmp/weightcast-malicious-pickle-ran")


def _fixture_module():
    spec = importlib.util.spec_from_file_location("make_fixtures", FIX / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# The custom module fixture pickles `__main__.Custom`: torch.load (our reference, on our own
# fixture) needs that class where the pickle says it is.
setattr(sys.modules["__main__"], "Custom", _fixture_module().Custom)


def state_dict_of(path, key=None):
    # Our own fixtures, so the full unpickler is fine for the reference (torch's weights-only
    # loader refuses modules, and protocol 4's FRAME opcode).
    obj = torch.load(path, weights_only=False, map_location="cpu")
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if key:
        obj = obj[key]
    return obj


def expect(sd, to):
    return {k: (v.detach().to(to) if v.is_floating_point() else v.detach()) for k, v in sd.items()}


def same(got, want):
    assert set(got) == set(want), (sorted(got), sorted(want))
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        g, w = got[k].contiguous().reshape(-1), want[k].contiguous().reshape(-1)
        assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)), k


@pytest.mark.parametrize("name", ["all_dtypes.pt", "protocol4.pt", "cuda.pt", "param.pt",
                                  "sequential.pt", "custom_module.pt"])
@pytest.mark.parametrize("to,dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_pt_to_safetensors_matches_torch(tmp_path, name, to, dtype):
    out = tmp_path / "o.safetensors"
    run("convert", FIX / name, "-o", out, "--to", to, "--on-overflow", "allow")
    same(load_file(out), expect(state_dict_of(FIX / name), dtype))
    with safe_open(out, "pt") as f:
        assert f.metadata()["format"] == "pt"


def test_training_checkpoint_picks_the_model(tmp_path):
    out = tmp_path / "o.safetensors"
    p = run("convert", FIX / "training.pt", "-o", out, "--to", "f16")
    assert "entry `model`" in p.stderr
    same(load_file(out), expect(state_dict_of(FIX / "training.pt", "model"), torch.float16))
    # --key reaches the optimizer's moments
    p = run("inspect", FIX / "training.pt", "--key", "optimizer.state", "--json")
    names = {t["name"] for t in json.loads(p.stdout)["tensors"]}
    assert "0.exp_avg" in names and "3.exp_avg_sq" in names
    p = run("inspect", FIX / "training.pt", "--key", "nope", check=False)
    assert p.returncode == 2 and "no entry `nope`" in p.stderr and "optimizer" in p.stderr


def test_tied_weights_written_once(tmp_path):
    out = tmp_path / "o.safetensors"
    p = run("convert", FIX / "tied.pt", "-o", out, "--to", "f16")
    assert "`lm_head.weight` = `embed.weight`" in p.stderr
    got = load_file(out)
    assert set(got) == {"embed.weight", "norm"}
    with safe_open(out, "pt") as f:
        assert f.metadata()["lm_head.weight"] == "embed.weight", "alias recorded as convert.py does"
    sd = state_dict_of(FIX / "tied.pt")
    assert torch.equal(got["embed.weight"], sd["lm_head.weight"].half())


def test_views(tmp_path):
    out = tmp_path / "o.safetensors"
    p = run("convert", FIX / "views.pt", "-o", out, "--to", "f16")
    assert "`transposed` left out: non-contiguous" in p.stderr
    sd = state_dict_of(FIX / "views.pt")
    got = load_file(out)
    assert torch.equal(got["slice"], sd["slice"].half())
    assert torch.equal(got["whole"], sd["whole"].half())


def test_malicious_pickle_never_runs(tmp_path):
    MARKER.unlink(missing_ok=True)
    out = tmp_path / "o.safetensors"
    p = run("inspect", FIX / "malicious.pt")
    assert "posix.system" in p.stderr and "dangerous" in p.stderr
    p = run("convert", FIX / "malicious.pt", "-o", out, "--to", "f16")
    assert "dangerous globals" in p.stderr
    assert torch.equal(load_file(out)["w"], torch.ones(3).half()), "tensors extracted"
    p = run("audit", FIX / "malicious.pt", FIX / "all_dtypes.pt", check=False)
    assert p.returncode == 1
    assert "dangerous  posix.system" in p.stdout
    a = json.loads(run("audit", FIX / "malicious.pt", "--json", check=False).stdout)
    assert a["dangerous"] and a["files"][0]["dangerous"] == ["posix.system"]
    assert not MARKER.exists(), "the pickle's os.system call must never run"


def test_audit_clean_files():
    p = run("audit", *[FIX / n for n in ["all_dtypes.pt", "training.pt", "tied.pt"]])
    assert p.returncode == 0
    a = json.loads(run("audit", FIX / "sequential.pt", "--json").stdout)
    other = a["files"][0]["other"]
    assert "torch.nn.modules.container.Sequential" in other
    assert "torch._utils._rebuild_parameter" in a["files"][0]["allowed"]


def test_pt_output_refused_clearly(tmp_path):
    p = run("convert", FIX / "all_dtypes.pt", "-o", tmp_path / "x.pt", "--to", "f16", check=False)
    assert p.returncode == 2 and "writing PyTorch files is not supported yet" in p.stderr


def test_truncated_and_mutated_checkpoints_error_cleanly(tmp_path):
    data = (FIX / "training.pt").read_bytes()
    bad = tmp_path / "bad.pt"
    seen = set()
    for i in range(0, len(data), max(1, len(data) // 60)):
        bad.write_bytes(data[:i] if i > 4 else b"PK\x03\x04")
        p = run("inspect", bad, check=False)
        assert p.returncode in (0, 1), p.stderr
        assert "panicked" not in p.stderr
        seen.add(p.returncode)
    import random
    rng = random.Random(0)
    for _ in range(150):
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        bad.write_bytes(bytes(b))
        p = run("inspect", bad, check=False)
        assert p.returncode in (0, 1) and "panicked" not in p.stderr, p.stderr
        if p.returncode == 1:
            assert len(p.stderr.strip().splitlines()) <= 5
    assert 1 in seen
