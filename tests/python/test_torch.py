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
                                  "sequential.pt", "custom_module.pt", "legacy.pt"])
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
    """Contiguous views are byte ranges; non-contiguous ones (a transpose, a stride-2 slice,
    an expand) are gathered, as torch's `.contiguous()` would."""
    out = tmp_path / "o.safetensors"
    p = run("convert", FIX / "views.pt", "-o", out, "--to", "f16")
    assert "left out" not in p.stderr
    sd = state_dict_of(FIX / "views.pt")
    got = load_file(out)
    for k in ["slice", "whole", "transposed"]:
        assert torch.equal(got[k], sd[k].contiguous().half()), k
    odd = tmp_path / "odd.pt"
    base = torch.arange(60, dtype=torch.float32).view(3, 4, 5)
    torch.save({"perm": base.permute(2, 0, 1), "step": base[:, ::2, 1:4], "expand": torch.ones(3, 1).expand(3, 4),
                "big_endian_free": base[1]}, odd)
    run("convert", odd, "-o", tmp_path / "odd.safetensors", "--to", "bf16")
    got = load_file(tmp_path / "odd.safetensors")
    ref = torch.load(odd, weights_only=True)
    for k, v in ref.items():
        assert torch.equal(got[k], v.contiguous().bfloat16()), k


def test_the_malicious_fixture_is_armed(marker):
    """The control: torch.load without weights_only runs its payload, which leaves the mark."""
    torch.load(FIX / "malicious.pt", weights_only=False)
    assert marker.exists()


def test_malicious_pickle_never_runs(tmp_path, marker):
    out = tmp_path / "o.safetensors"
    p = run("inspect", FIX / "malicious.pt")
    assert "posix.system" in p.stderr and "dangerous" in p.stderr
    assert "1 dangerous (weightcast audit lists them)" in p.stdout
    j = json.loads(run("inspect", FIX / "malicious.pt", "--json").stdout)
    assert j["globals"]["dangerous"] == ["posix.system"]
    p = run("convert", FIX / "malicious.pt", "-o", out, "--to", "f16")
    assert "dangerous globals" in p.stderr
    assert torch.equal(load_file(out)["w"], torch.ones(3).half()), "tensors extracted"
    p = run("audit", FIX / "malicious.pt", FIX / "all_dtypes.pt", check=False)
    assert p.returncode == 1
    assert "dangerous  posix.system" in p.stdout
    a = json.loads(run("audit", FIX / "malicious.pt", "--json", check=False).stdout)
    assert a["dangerous"] and a["files"][0]["dangerous"] == ["posix.system"]
    assert not marker.exists(), "the pickle's os.system call must never run"


def test_audit_clean_files():
    p = run("audit", *[FIX / n for n in ["all_dtypes.pt", "training.pt", "tied.pt"]])
    assert p.returncode == 0
    a = json.loads(run("audit", FIX / "sequential.pt", "--json").stdout)
    other = a["files"][0]["other"]
    assert "torch.nn.modules.container.Sequential" in other
    assert "torch._utils._rebuild_parameter" in a["files"][0]["allowed"]


def test_safetensors_to_pt(minilm, tmp_path):
    out = tmp_path / "m.pt"
    run("convert", minilm / "model.safetensors", "-o", out, "--to", "f16", "--preset", "keep-norms")
    sd = load_file(minilm / "model.safetensors")
    want = {k: (v.half() if v.is_floating_point() and v.dim() > 1 else v) for k, v in sd.items()}
    got = torch.load(out, weights_only=True)
    assert_same_tree(got, type(got)(want))
    assert_same_tree(torch.load(out, weights_only=True, mmap=True), got)
    # every dtype, f8 and uint16 through _rebuild_tensor_v3
    from safetensors.torch import save_file
    src = tmp_path / "all.safetensors"
    save_file(torch.load(FIX / "all_dtypes.pt", weights_only=True), src)
    run("convert", src, "-o", tmp_path / "all.pt", "--to", "f32", "--on-overflow", "allow")
    got = torch.load(tmp_path / "all.pt", weights_only=True)
    want = torch_cast(load_file(src), torch.float32)
    assert_same_tree(dict(got), want)


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


def test_mutated_deflated_archives_error_cleanly(tmp_path):
    """Corrupted deflate streams, sizes and CRCs in a re-zipped archive: converting to
    safetensors (which inflates the records) ends in a result or a one-line error, never a
    panic, and never leaves an output after an error."""
    import random
    import zipfile
    src = tmp_path / "deflated.pt"
    with zipfile.ZipFile(FIX / "all_dtypes.pt") as z, zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as out:
        for n in z.namelist():
            out.writestr(n, z.read(n))
    data = src.read_bytes()
    bad, out = tmp_path / "bad.pt", tmp_path / "out.safetensors"
    rng = random.Random(1)
    codes = set()
    for _ in range(120):
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        bad.write_bytes(bytes(b))
        p = run("convert", bad, "-o", out, "--to", "bf16", "--on-overflow", "allow", "--force",
                check=False)
        assert p.returncode in (0, 1) and "panicked" not in p.stderr, p.stderr
        lines = p.stderr.strip().splitlines()
        assert all(l.startswith("weightcast: ") for l in lines), p.stderr
        if p.returncode == 1:
            assert sum(l.startswith("weightcast: error: ") for l in lines) == 1, p.stderr
            assert not out.exists()
        out.unlink(missing_ok=True)
        codes.add(p.returncode)
    assert codes == {0, 1}


def torch_cast(obj, dtype):
    """What a user gets with torch: every floating tensor `.to(dtype)`, everything else kept."""
    if isinstance(obj, torch.nn.Parameter):
        return torch.nn.Parameter(obj.detach().to(dtype) if obj.is_floating_point() else obj.detach(),
                                  requires_grad=obj.requires_grad)
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return type(obj)((k, torch_cast(v, dtype)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(torch_cast(v, dtype) for v in obj)
    return obj


STATE_DICT_KEYS = ["state_dict", "model_state_dict", "model", "module", "net", "network"]


def torch_cast_checkpoint(obj, dtype):
    """torch's cast of what weightcast converts by default: a training checkpoint's state dict
    entry (found as weightcast finds it); optimizer state and the rest keep their dtypes."""
    if isinstance(obj, dict):
        for k in STATE_DICT_KEYS:
            if isinstance(obj.get(k), dict) and obj[k]:
                return type(obj)((n, torch_cast(v, dtype) if n == k else v) for n, v in obj.items())
    return torch_cast(obj, dtype)


def assert_same_tree(got, want, path="root"):
    assert type(got) is type(want), f"{path}: {type(got)} != {type(want)}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert got.requires_grad == want.requires_grad, path
        g, w = got.detach().contiguous().reshape(-1), want.detach().contiguous().reshape(-1)
        assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)), path
    elif isinstance(want, dict):
        assert list(got) == list(want), path
        for k in want:
            assert_same_tree(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_tree(g, w, f"{path}[{i}]")
    else:
        assert got == want, path


@pytest.mark.parametrize("name", ["all_dtypes.pt", "protocol4.pt", "training.pt", "cuda.pt",
                                  "param.pt", "tied.pt", "views.pt", "legacy.pt",
                                  "legacy_training.pt"])
@pytest.mark.parametrize("to,dtype", [("f16", torch.float16), ("bf16", torch.bfloat16),
                                      ("f8e4m3", torch.float8_e4m3fn), ("f32", torch.float32)])
def test_pt_to_pt_is_torch_load_cast_save(tmp_path, name, to, dtype):
    out = tmp_path / "out.pt"
    run("convert", FIX / name, "-o", out, "--to", to, "--on-overflow", "allow")
    src = torch.load(FIX / name, weights_only=False, map_location="cpu")
    got = torch.load(out, weights_only=True)
    assert_same_tree(got, torch_cast_checkpoint(src, dtype))
    mm = torch.load(out, weights_only=True, mmap=True)
    assert_same_tree(mm, got)
    # storages saved on cuda:0 come back as cpu
    for t in (v for v in (got.values() if isinstance(got, dict) else []) if isinstance(v, torch.Tensor)):
        assert t.device.type == "cpu"


def test_pt_views_stay_views_and_tied_stay_tied(tmp_path):
    out = tmp_path / "v.pt"
    run("convert", FIX / "views.pt", "-o", out, "--to", "f16")
    v = torch.load(out, weights_only=True)
    ptr = v["whole"].untyped_storage().data_ptr()
    assert all(v[k].untyped_storage().data_ptr() == ptr for k in ["slice", "row", "transposed"])
    assert torch.equal(v["transposed"], torch.arange(20.0).view(4, 5).t().half())
    run("convert", FIX / "tied.pt", "-o", out, "--to", "bf16", "--force")
    t = torch.load(out, weights_only=True)
    assert t["embed.weight"].untyped_storage().data_ptr() == t["lm_head.weight"].untyped_storage().data_ptr()


def test_pt_modules_and_rules(tmp_path):
    out = tmp_path / "m.pt"
    run("convert", FIX / "sequential.pt", "-o", out, "--to", "f16", "--keep", "2.*")
    m = torch.load(out, weights_only=False)
    assert isinstance(m, torch.nn.Sequential)
    assert isinstance(m[0].weight, torch.nn.Parameter) and m[0].weight.requires_grad
    assert m[0].weight.dtype == torch.float16 and m[2].weight.dtype == torch.float32
    ref = torch.load(FIX / "sequential.pt", weights_only=False)
    assert torch.equal(m[0].weight, ref[0].weight.half()) and torch.equal(m[2].bias, ref[2].bias)
    # a training checkpoint keeps its optimizer state, epoch and vocab
    run("convert", FIX / "training.pt", "-o", out, "--to", "bf16", "--force")
    t = torch.load(out, weights_only=True)
    src = torch.load(FIX / "training.pt")
    assert t["epoch"] == 3 and t["vocab"] == {"a": 0, "b": 1}
    # optimizer state keeps its dtypes by default ...
    assert_same_tree(t["optimizer"], src["optimizer"])
    # ... and --cast-optimizer casts its moments, never the 0-d step counters
    run("convert", FIX / "training.pt", "-o", out, "--to", "bf16", "--force", "--cast-optimizer")
    t = torch.load(out, weights_only=True)
    for k, st in t["optimizer"]["state"].items():
        for name, v in st.items():
            ref = src["optimizer"]["state"][k][name]
            want = ref.to(torch.bfloat16) if ref.is_floating_point() and ref.dim() > 0 else ref
            assert_same_tree(v, want, f"state.{k}.{name}")
    assert t["optimizer"]["param_groups"] == src["optimizer"]["param_groups"]


def test_pt_refuses_dangerous_and_overflow(tmp_path, marker):
    out = tmp_path / "x.pt"
    p = run("convert", FIX / "malicious.pt", "-o", out, "--to", "f16", check=False)
    assert p.returncode == 1 and "dangerous globals (posix.system)" in p.stderr
    assert not out.exists() and not marker.exists()
    hot = tmp_path / "hot.pt"
    torch.save({"w": torch.tensor([1.0, 1e6])}, hot)
    p = run("convert", hot, "-o", out, "--to", "f16", check=False)
    assert p.returncode == 1 and "would overflow" in p.stderr and not out.exists()
    run("convert", hot, "-o", out, "--to", "f16", "--on-overflow", "clamp")
    assert torch.load(out)["w"].tolist() == [1.0, 65504.0]


def test_pt_to_pt_per_tensor_plans(tmp_path):
    """--on-overflow keep, --max-underflow and --auto decide per tensor for .pt outputs too: a
    training checkpoint keeps its structure, every tensor equals torch's own .to() of the dtype
    the plan chose, and a storage shared by tensors with different decisions is kept whole."""
    g = torch.Generator().manual_seed(0)
    model = {
        "hot.weight": torch.tensor([1.0, 1e6, -3.0]),
        "tiny.weight": torch.full((4,), 1e-9),
        "plain.weight": torch.randn(16, 16, generator=g),
        "bias": torch.randn(16, generator=g) * 1e-3,
    }
    base = torch.randn(8, generator=g)
    model["view.a"], model["view.b"] = base[:4], base[4:]
    ckpt = {"model": model, "epoch": 7, "optimizer": {"state": {0: {"exp_avg": torch.randn(3)}}}}
    src = tmp_path / "ckpt.pt"
    torch.save(ckpt, src)
    out = tmp_path / "out.pt"

    p = run("convert", src, "-o", out, "--to", "f16", "--on-overflow", "keep")
    assert "1 tensor(s) kept in their dtype" in p.stderr
    got = torch.load(out, weights_only=True)
    assert got["epoch"] == 7
    m = got["model"]
    assert m["hot.weight"].dtype == torch.float32 and torch.equal(m["hot.weight"], model["hot.weight"])
    assert torch.equal(m["plain.weight"], model["plain.weight"].half())
    assert m["view.a"].untyped_storage().data_ptr() == m["view.b"].untyped_storage().data_ptr()

    run("convert", src, "-o", out, "--to", "f16", "--max-underflow", "0.5", "--on-overflow", "keep",
        "--force")
    m = torch.load(out, weights_only=True)["model"]
    assert m["tiny.weight"].dtype == torch.float32, "1e-9 flushes to zero in f16: kept"
    assert m["plain.weight"].dtype == torch.float16

    p = run("convert", src, "-o", out, "--auto", "30", "--to", "f8e4m3,bf16,f16",
            "--on-overflow", "keep", "--force", "--dry-run", "--json")
    chosen = {t["name"]: t["to"] for t in json.loads(p.stdout)["tensors"]}
    run("convert", src, "-o", out, "--auto", "30", "--to", "f8e4m3,bf16,f16",
        "--on-overflow", "keep", "--force")
    got = torch.load(out, weights_only=True)
    names = {"F8_E4M3": torch.float8_e4m3fn, "BF16": torch.bfloat16, "F16": torch.float16,
             "F32": torch.float32}
    for k, v in got["model"].items():
        want = chosen[k]  # the same names as inspect and safetensors outputs
        if k.startswith("view."):
            continue  # one storage: cast once if both views agree, kept whole otherwise
        assert v.dtype == names[want], (k, want)
        assert torch.equal(v.view(torch.uint8), model[k].to(v.dtype).view(torch.uint8)), k
    assert len({v.dtype for v in got["model"].values()}) > 1, "the plan mixes dtypes"


def test_legacy_is_told_by_content(tmp_path):
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes((FIX / "legacy.pt").read_bytes())
    p = run("inspect", renamed, "--json")
    assert json.loads(p.stdout)["format"] == "PyTorch checkpoint (legacy stacked pickles)"


def test_quantized_and_sparse_left_untouched(tmp_path):
    out = tmp_path / "o.safetensors"
    p = run("convert", FIX / "quant_sparse.pt", "-o", out, "--to", "f16")
    assert "`q` left out: quantized" in p.stderr and "`sparse` left out: sparse" in p.stderr
    assert set(load_file(out)) == {"dense"}
    pt = tmp_path / "o.pt"
    run("convert", FIX / "quant_sparse.pt", "-o", pt, "--to", "f16")
    src = torch.load(FIX / "quant_sparse.pt", weights_only=True)
    got = torch.load(pt, weights_only=True)
    assert got["q"].is_quantized and torch.equal(got["q"].int_repr(), src["q"].int_repr())
    assert got["sparse"].is_sparse and torch.equal(got["sparse"].to_dense(), src["sparse"].to_dense())
    assert torch.equal(got["dense"], src["dense"].half())


def test_torchscript_read_only(tmp_path):
    p = run("inspect", FIX / "scripted.pt", "--json")
    v = json.loads(p.stdout)
    assert v["format"] == "TorchScript archive"
    assert [t["name"] for t in v["tensors"]] == ["0.weight", "0.bias"]
    out = tmp_path / "o.safetensors"
    run("convert", FIX / "scripted.pt", "-o", out, "--to", "f16")
    m = torch.jit.load(FIX / "scripted.pt")
    got = load_file(out)
    assert torch.equal(got["0.weight"], m.state_dict()["0.weight"].half())
    p = run("convert", FIX / "scripted.pt", "-o", tmp_path / "o.pt", "--to", "f16", check=False)
    assert p.returncode == 2 and "TorchScript" in p.stderr and "refused" in p.stderr
    assert not (tmp_path / "o.pt").exists()


def test_hf_folder_with_pytorch_bins(minilm, tmp_path):
    """A Hub folder with pytorch_model.bin (single, then sharded + index) converts to a
    safetensors folder named as the Hub's convert script names it."""
    sd = load_file(minilm / "model.safetensors")
    single = tmp_path / "single"
    single.mkdir()
    torch.save(sd, single / "pytorch_model.bin")
    (single / "config.json").write_text((minilm / "config.json").read_text())
    (single / "vocab.txt").write_text((minilm / "vocab.txt").read_text())
    out = tmp_path / "single-f16"
    run("convert", single, "-o", out, "--to", "f16")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    same(load_file(out / "model.safetensors"), expect(sd, torch.float16))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = list(sd)
    half = len(names) // 2
    parts = {"pytorch_model-00001-of-00002.bin": names[:half], "pytorch_model-00002-of-00002.bin": names[half:]}
    weight_map = {}
    for fname, keys in parts.items():
        torch.save({k: sd[k] for k in keys}, sharded / fname)
        weight_map.update({k: fname for k in keys})
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 1}, "weight_map": weight_map}))
    (sharded / "config.json").write_text((minilm / "config.json").read_text())
    out = tmp_path / "sharded-bf16"
    run("convert", sharded, "-o", out, "--to", "bf16")
    files = sorted(p.name for p in out.iterdir())
    assert files == ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json"], files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    merged = {}
    for f in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]:
        merged.update(load_file(out / f))
    same(merged, expect(sd, torch.bfloat16))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())


def test_inference_export_and_strip_prefix(tmp_path):
    out = tmp_path / "inf.pt"
    # --inference drops the optimizer and keeps the checkpoint around the state dict
    p = run("convert", FIX / "training.pt", "-o", out, "--to", "f16", "--inference")
    assert "dropped the training state: `optimizer` (optimizer state)" in p.stderr, p.stderr
    assert "kept the state dict `model` and `epoch`, `vocab`, `config`" in p.stderr, p.stderr
    got = torch.load(out, weights_only=True)
    full = torch.load(FIX / "training.pt", weights_only=True)
    assert set(got) == {"epoch", "model", "vocab", "config"}
    assert got["vocab"] == full["vocab"] and got["config"] == full["config"]
    assert_same_tree(got["model"], torch_cast(full["model"], torch.float16))
    assert out.stat().st_size < (FIX / "training.pt").stat().st_size
    # --state-dict-only writes the bare state dict
    bare = tmp_path / "bare.pt"
    p = run("convert", FIX / "training.pt", "-o", bare, "--to", "f16", "--state-dict-only")
    assert "dropped `epoch`, `optimizer` (12 tensors, 480 bytes)" in p.stderr
    assert_same_tree(torch.load(bare, weights_only=True), torch_cast(full["model"], torch.float16))
    # a pickled module: parameters stay Parameters, requires_grad cleared
    run("convert", FIX / "sequential.pt", "-o", out, "--to", "f16", "--inference", "--force")
    m = torch.load(out, weights_only=False)
    assert isinstance(m[0].weight, torch.nn.Parameter) and not m[0].weight.requires_grad
    # DataParallel prefixes
    dp = tmp_path / "dp.pt"
    torch.save({"module.w": torch.ones(2), "module.b": torch.zeros(1)}, dp)
    run("convert", dp, "-o", out, "--to", "bf16", "--strip-prefix", "module.", "--force")
    assert list(torch.load(out, weights_only=True)) == ["w", "b"]
    st = tmp_path / "dp.safetensors"
    run("convert", dp, "-o", st, "--to", "bf16", "--strip-prefix", "module.")
    assert sorted(load_file(st)) == ["b", "w"]
    clash = tmp_path / "clash.pt"
    torch.save({"module.w": torch.ones(2), "w": torch.ones(2)}, clash)
    p = run("convert", clash, "-o", tmp_path / "c.safetensors", "--to", "f16", "--strip-prefix", "module.", check=False)
    assert p.returncode == 2 and "two tensors would be named `w`" in p.stderr


@pytest.mark.parametrize("to,dtype", [("f16", torch.float16), ("f32", torch.float32)])
def test_big_endian_checkpoint(tmp_path, to, dtype):
    """byteorder `big` (as written on s390x): storages are swapped on read, written little."""
    ref = torch.load(FIX / "big_endian.pt", weights_only=True)  # torch swaps on load
    out = tmp_path / "o.safetensors"
    run("convert", FIX / "big_endian.pt", "-o", out, "--to", to, "--on-overflow", "allow")
    same(load_file(out), expect(ref, dtype))
    pt = tmp_path / "o.pt"
    run("convert", FIX / "big_endian.pt", "-o", pt, "--to", to, "--on-overflow", "allow")
    assert_same_tree(torch.load(pt, weights_only=True), torch_cast(ref, dtype))
    a = json.loads(run("analyze", FIX / "big_endian.pt", "--to", "f16", "--json").stdout)
    b = json.loads(run("analyze", FIX / "all_dtypes.pt", "--to", "f16", "--json").stdout)
    snr = lambda r: {t["name"]: t["snr_db"] for t in r["tensors"]}
    assert snr(a) == {k: v for k, v in snr(b).items() if k in snr(a)}


def test_deflated_archive(tmp_path):
    """An archive re-zipped with deflate (torch.load reads it): a .pt output decompresses the
    storages while streaming; a safetensors output (and analyze) reads them through records
    inflated into temporary files: every tensor, equal to torch's cast."""
    import zipfile
    src = tmp_path / "deflated.pt"
    with zipfile.ZipFile(FIX / "all_dtypes.pt") as z, zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as out:
        for n in z.namelist():
            out.writestr(n, z.read(n))
    ref = torch.load(src, weights_only=True)
    out = tmp_path / "o.pt"
    run("convert", src, "-o", out, "--to", "bf16", "--on-overflow", "allow")
    assert_same_tree(torch.load(out, weights_only=True), torch_cast(ref, torch.bfloat16))
    st = tmp_path / "o.safetensors"
    p = run("convert", src, "-o", st, "--to", "bf16", "--on-overflow", "allow")
    assert "left out" not in p.stderr, p.stderr
    same(load_file(st), expect(ref, torch.bfloat16))
    a = json.loads(run("analyze", src, "--to", "bf16", "--json").stdout)
    b = json.loads(run("analyze", FIX / "all_dtypes.pt", "--to", "bf16", "--json").stdout)
    assert a["totals"] == b["totals"] and a["tensors"] == b["tensors"]
    # A record whose inflated size disagrees with the zip directory is an error, not a tensor.
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 8)
    # the uncompressed-size field (byte 24) of that entry's central directory header (46 bytes
    # before its name, the first copy of the name after the first central directory signature)
    at = data.find(info.filename.encode(), data.find(b"PK\x01\x02")) - 46 + 24
    data[at:at + 4] = (info.file_size + 4).to_bytes(4, "little")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data))
    p = run("convert", bad, "-o", tmp_path / "b.safetensors", "--to", "bf16", "--on-overflow", "allow",
            check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and sum(l.startswith("weightcast: error: ") for l in lines) == 1
    # the directory and the local header disagree on its size: flagged before the error
    assert "ambiguous file" in lines[0] and "inflates to" in lines[-1], p.stderr
    assert not (tmp_path / "b.safetensors").exists()


def test_pt_output_follows_the_plan_cases_from_the_tour(tmp_path):
    """The four outputs that disagreed with their own plan (each failed before the one-executor
    rewrite): a tensor with Python attributes, --key with --only, --key alone (optimizer state),
    and the summary's dtype under a rule."""
    t = torch.ones(2)
    t.foo = 3
    attr = tmp_path / "attr.pt"
    torch.save({"t": t}, attr)
    out = tmp_path / "o.pt"
    plan = json.loads(run("convert", attr, "-o", out, "--to", "f16", "--dry-run", "--json").stdout)
    assert plan["tensors"][0]["to"] == "F16"
    p = run("convert", attr, "-o", out, "--to", "f16")
    got = torch.load(out, weights_only=False)["t"]
    assert got.dtype == torch.float16 and got.foo == 3 and "1 cast to float16, 0 kept" in p.stderr

    m = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(12)])
    opt = torch.optim.Adam(m.parameters())
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    ckpt = tmp_path / "train.pt"
    torch.save({"model_state_dict": m.state_dict(), "optimizer_state_dict": opt.state_dict(),
                "epoch": 1}, ckpt)
    only = ["--key", "model_state_dict", "--only", r"re:^(8|11)\.weight$"]
    plan = json.loads(run("convert", ckpt, "-o", out, "--to", "bf16", *only, "--dry-run", "--json",
                          "--force").stdout)
    assert sorted(t["name"] for t in plan["tensors"] if t["cast"]) == ["11.weight", "8.weight"]
    run("convert", ckpt, "-o", out, "--to", "bf16", *only, "--force")
    sd = torch.load(out)["model_state_dict"]
    assert sorted(k for k, v in sd.items() if v.dtype == torch.bfloat16) == ["11.weight", "8.weight"]

    p = run("convert", ckpt, "-o", out, "--to", "bf16", "--key", "model_state_dict", "--force")
    state = torch.load(out)["optimizer_state_dict"]["state"][0]
    assert state["step"].dtype == torch.float32 and state["exp_avg"].dtype == torch.float32
    assert "use --key" not in p.stderr

    p = run("convert", ckpt, "-o", out, "--to", "f32", "--rule", "8.weight=bf16", "--force")
    assert "1 cast to bfloat16" in p.stderr and "cast to float32" not in p.stderr
    assert torch.load(out)["model_state_dict"]["8.weight"].dtype == torch.bfloat16


def crafted_archive(path, data_pkl):
    """A torch.save-shaped zip whose data.pkl is `data_pkl` (no storages)."""
    import zipfile
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


def test_a_global_name_with_a_newline_is_dangerous_and_never_written(tmp_path):
    """STACK_GLOBAL takes any two strings. A name holding a newline, written back as a text
    GLOBAL opcode, would become opcodes of its own (here: posix.system)."""
    name = b"OrderedDict\ncposix\nsystem"
    pkl = (b"\x80\x04\x8c\x0bcollections\x8c" + bytes([len(name)]) + name + b"\x93)R.")
    bad = tmp_path / "bad.pt"
    crafted_archive(bad, pkl)
    with pytest.raises(Exception):
        torch.load(bad, weights_only=False)  # torch itself cannot even load it
    p = run("audit", bad, check=False)
    assert p.returncode == 1 and "1 dangerous" in p.stdout
    assert "OrderedDict\\ncposix\\nsystem (not a Python name)" in p.stdout
    assert len(p.stdout.strip().splitlines()) == 2  # the name stays on one line
    out = tmp_path / "out.pt"
    p = run("convert", bad, "-o", out, "--to", "f16", check=False)
    assert p.returncode == 1 and "dangerous globals" in p.stderr and not out.exists()


def test_strict_audit_and_convert(tmp_path):
    p = run("audit", FIX / "sequential.pt")
    assert p.returncode == 0
    p = run("audit", "--strict", FIX / "sequential.pt", check=False)
    assert p.returncode == 1  # torch.nn.modules.* is not on the weights-only allowlist
    out = tmp_path / "o.pt"
    p = run("convert", FIX / "sequential.pt", "-o", out, "--to", "f16", "--strict", check=False)
    assert p.returncode == 1 and "weights-only allowlist" in p.stderr and not out.exists()
    run("convert", FIX / "training.pt", "-o", out, "--to", "f16", "--strict")
    assert torch.load(out, weights_only=True)["epoch"] == 3


@pytest.mark.parametrize("module,name", [
    ("torch.utils.cpp_extension", "load_inline"), ("numpy", "load"), ("numpy.lib.npyio", "load"),
    ("pandas", "read_pickle"), ("keras.models", "load_model"), ("setuptools", "setup"),
    ("jinja2", "Template"), ("__builtin__", "file"),
])
def test_loaders_and_code_runners_are_dangerous(tmp_path, module, name):
    pkl = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n)R."
    bad = tmp_path / "bad.pt"
    crafted_archive(bad, pkl)
    p = run("audit", bad, check=False)
    assert p.returncode == 1 and "dangerous" in p.stdout and f"{module}.{name}" in p.stdout


class _Touch:
    """Pickles as a call to os.system: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def _legacy_bytes(obj):
    import io
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def test_audit_reads_what_torch_load_runs(tmp_path):
    """Two files whose code torch.load runs while a reader that looks elsewhere sees a benign
    checkpoint: audit must judge the pickles torch unpickles, in torch's order."""
    import io
    import pickle as pypickle
    marker = tmp_path / "ran"
    benign = tmp_path / "benign.pt"
    torch.save({"w": torch.ones(2)}, benign)

    # 1. a pickle at byte 0, then a whole benign torch.save zip: torch takes the legacy path
    #    (not "PK\x03\x04" at byte 0) and unpickles the leading pickle.
    front = tmp_path / "front.pt"
    front.write_bytes(pypickle.dumps(_Touch(marker), protocol=2) + benign.read_bytes())
    # 2. a legacy file whose sys_info pickle (the third of the stack) runs code.
    legacy = _legacy_bytes({"w": torch.ones(2)})
    f = io.BytesIO(legacy)
    for _ in range(3):
        pypickle.load(f)
    third = tmp_path / "third.pt"
    third.write_bytes(pypickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)
                      + pypickle.dumps(1001, protocol=2)
                      + pypickle.dumps(_Touch(marker), protocol=2) + legacy[f.tell():])

    for bad in [front, third]:
        marker.unlink(missing_ok=True)
        try:
            torch.load(bad, weights_only=False)
        except Exception:
            pass
        assert marker.exists(), f"torch.load really runs {bad.name}"
        marker.unlink()
        p = run("audit", bad, check=False)
        assert p.returncode == 1, p.stdout
        assert "posix.system" in p.stdout and "1 dangerous" in p.stdout, p.stdout
        out = tmp_path / "o.pt"
        p = run("convert", bad, "-o", out, "--to", "f16", check=False)
        assert p.returncode != 0 and not out.exists() and not marker.exists()
    assert "ambiguous" in run("audit", front, check=False).stdout  # a zip lies behind it
    assert "pickle 3 of the legacy stack" in run("audit", third, check=False).stdout


def test_ambiguous_zips_are_flagged_and_not_written(tmp_path):
    import zipfile
    src = (FIX / "training.pt").read_bytes()
    trailing = tmp_path / "trailing.pt"
    trailing.write_bytes(src + b"\0" * 100)
    dup = tmp_path / "dup.pt"
    with zipfile.ZipFile(FIX / "training.pt") as zin, zipfile.ZipFile(dup, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info))
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zout.writestr("training/DATA.PKL", b"\x80\x02}q\x00.")
    # a local header naming another size than the central directory
    lied = tmp_path / "lied.pt"
    b = bytearray(src)
    assert b[:4] == b"PK\x03\x04"
    b[18:22] = (int.from_bytes(b[18:22], "little") + 1).to_bytes(4, "little")
    lied.write_bytes(bytes(b))
    # the 32-bit end record counting one entry less than the zip64 one torch reads
    z64 = tmp_path / "z64.pt"
    b = bytearray(src)
    e = b.rfind(b"PK\x05\x06")
    n = int.from_bytes(b[e + 10:e + 12], "little") - 1
    b[e + 8:e + 12] = n.to_bytes(2, "little") * 2
    z64.write_bytes(bytes(b))
    assert torch.load(z64, weights_only=True)["epoch"] == 3, "torch reads it (through zip64)"
    for bad, why in [(trailing, "after the zip's end record"), (dup, "two entries named"),
                     (lied, "local header"), (z64, "zip64 end record")]:
        p = run("audit", bad, check=False)
        assert p.returncode == 1 and "ambiguous" in p.stdout and why in p.stdout, p.stdout
        out = tmp_path / "o.pt"
        p = run("convert", bad, "-o", out, "--to", "f16", check=False)
        assert p.returncode != 0 and not out.exists(), p.stderr
    # the clean original is not ambiguous
    assert run("audit", FIX / "training.pt").returncode == 0


def test_rules_by_module_class(tmp_path):
    """A pickled module names each layer's class: `--only class:Linear` casts the linear layers
    and keeps the convolutions (and BatchNorm, found by `kind:norm` through its class)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 8),
                              torch.nn.Linear(8, 2))
    src = tmp_path / "net.pt"
    torch.save(net, src)
    v = json.loads(run("inspect", src, "--json").stdout)
    classes = {t["name"]: t["module_class"] for t in v["tensors"]}
    assert classes["0.weight"] == "torch.nn.modules.conv.Conv2d"
    assert classes["4.weight"] == "torch.nn.modules.linear.Linear"
    out = tmp_path / "out.pt"
    run("convert", src, "-o", out, "--to", "bf16", "--only", "class:Linear")
    m = torch.load(out, weights_only=False)
    assert m[4].weight.dtype == m[5].bias.dtype == torch.bfloat16
    assert m[0].weight.dtype == m[1].weight.dtype == m[1].running_mean.dtype == torch.float32
    assert torch.equal(m[4].weight, net[4].weight.detach().to(torch.bfloat16))
    plan = json.loads(run("convert", src, "-o", out, "--to", "f16", "--keep", "kind:norm",
                          "--keep", "kind:conv", "--dry-run", "--json", "--force").stdout)
    cast = {t["name"] for t in plan["tensors"] if t["cast"]}
    assert cast == {"4.weight", "4.bias", "5.weight", "5.bias"}, cast


def test_legacy_file_saved_with_protocol_4(tmp_path):
    """A legacy (non-zip) torch.save with pickle_protocol=4 starts `80 04 95` (FRAME): read,
    converted as torch casts it, and every pickle of its stack audited."""
    src = tmp_path / "leg4.pt"
    obj = {"w": torch.arange(6.0).view(2, 3), "n": 3}
    torch.save(obj, src, _use_new_zipfile_serialization=False, pickle_protocol=4)
    assert src.read_bytes()[:3] == b"\x80\x04\x95"
    out = tmp_path / "o.pt"
    run("convert", src, "-o", out, "--to", "f16")
    assert_same_tree(torch.load(out, weights_only=True), torch_cast(obj, torch.float16))
    p = run("audit", src)
    assert "5 pickle(s) a loader would unpickle" in p.stdout


def _tar_checkpoint(path, storages_first=b"", pickle_member=None, fmt="ustar"):
    """A checkpoint in torch < 0.4's tar format: one float storage, no tensors, the object.
    `fmt` pax: a global pax header and a local one per member; gnu: GNU long names (an extra
    member with a long name)."""
    import io
    import pickle as pypickle
    import tarfile
    storages = (storages_first or pypickle.dumps(1, protocol=2))
    storages += pypickle.dumps(("0", "cpu", torch.FloatStorage), protocol=2)
    storages += (2).to_bytes(8, "little") + b"\0" * 8
    storages += pypickle.dumps([], protocol=2)
    members = {
        "sys_info": pypickle.dumps({"little_endian": True}, protocol=2),
        "storages": storages,
        "tensors": pypickle.dumps(0, protocol=2),
        "pickle": pickle_member or pypickle.dumps({"epoch": 1}, protocol=2),
    }
    formats = {"ustar": tarfile.USTAR_FORMAT, "pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT}
    extra = {"pax_headers": {"comment": "global"}} if fmt == "pax" else {}
    with tarfile.open(path, "w", format=formats[fmt], **extra) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if fmt == "pax":
                info.pax_headers = {"comment": "a local header"}
            tar.addfile(info, io.BytesIO(data))
        if fmt != "ustar":
            info = tarfile.TarInfo("notes-" + "x" * 120)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))


def test_tar_checkpoints_are_audited_as_torch_reads_them(tmp_path):
    import pickle as pypickle
    marker = tmp_path / "ran"
    evil = pypickle.dumps(_Touch(marker), protocol=2)
    clean = tmp_path / "clean.tar.pt"
    _tar_checkpoint(clean)
    assert torch.load(clean, weights_only=False) == {"epoch": 1}, "torch reads the format"
    p = run("audit", clean)
    assert "tar-format" in p.stdout and "0 dangerous" in p.stdout, p.stdout
    in_pickle = tmp_path / "a.tar.pt"
    _tar_checkpoint(in_pickle, pickle_member=evil)
    # code in the first pickle of `storages`: run before anything else is read
    in_storages = tmp_path / "b.tar.pt"
    _tar_checkpoint(in_storages, storages_first=b"\x80\x02(" + evil[2:-1] + b"K\x01t." )
    # pax headers and GNU long names, as tarfile (torch's reader) writes them: the same verdicts
    for fmt in ("pax", "gnu"):
        ext_clean, ext_bad = tmp_path / f"clean-{fmt}.tar.pt", tmp_path / f"a-{fmt}.tar.pt"
        _tar_checkpoint(ext_clean, fmt=fmt)
        _tar_checkpoint(ext_bad, pickle_member=evil, fmt=fmt)
        assert torch.load(ext_clean, weights_only=False) == {"epoch": 1}
        p = run("audit", ext_clean)
        assert "tar-format" in p.stdout and "0 dangerous" in p.stdout, p.stdout
        p = run("audit", ext_bad, check=False)
        assert p.returncode == 1 and "posix.system" in p.stdout, p.stdout
    for bad, where in [(in_pickle, "tar member `pickle`"), (in_storages, "tar member `storages`")]:
        marker.unlink(missing_ok=True)
        try:
            torch.load(bad, weights_only=False)
        except Exception:
            pass
        assert marker.exists(), f"torch.load runs {bad.name}"
        marker.unlink()
        p = run("audit", bad, check=False)
        assert p.returncode == 1 and "posix.system" in p.stdout and where in p.stdout, p.stdout
    # converting one is refused with a clear message
    p = run("convert", clean, "-o", tmp_path / "o.safetensors", "--to", "f16", check=False)
    assert p.returncode != 0 and "tar-format" in p.stderr, p.stderr
    # mutated and truncated tar checkpoints: a verdict or one error line, never a panic
    import random
    rng = random.Random(3)
    data = in_pickle.read_bytes()
    bad = tmp_path / "m.tar.pt"
    for i in range(150):
        b = bytearray(data[:rng.randrange(len(data))] if i % 3 == 0 else data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        bad.write_bytes(bytes(b))
        p = run("audit", bad, check=False)
        # a verdict (0 or 1) or "could not read it to its end" (2), never a panic
        assert p.returncode in (0, 1, 2) and "panicked" not in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) <= 1, p.stderr


def test_inference_keeps_what_inference_needs(tmp_path):
    """A training checkpoint as an OCR project saves it, entries renamed: --inference drops the
    optimizer, scheduler, AMP scaler and RNG states (found by structure, whatever their names)
    and keeps the vocabularies and the class count the model cannot be used without."""
    import random

    import numpy as np

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 5))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    char2idx = {c: i for i, c in enumerate("abcde")}
    ckpt = {
        "net": model.state_dict(),
        "char2idx": char2idx,
        "idx2char": {i: c for c, i in char2idx.items()},
        "num_classes": 5,
        "epoch": 7,
        "o": opt.state_dict(),          # an optimizer under a name that says nothing
        "lr_sched": sched.state_dict(),
        "gs": scaler.state_dict(),      # a grad scaler, renamed too
        "torch_rng": torch.get_rng_state(),
        "np_rng": np.random.get_state(),
        "py_rng": random.getstate(),
    }
    assert ckpt["gs"], "the CPU grad scaler has a state to save"
    src = tmp_path / "ocr.pt"
    torch.save(ckpt, src)
    out = tmp_path / "ocr-f16.pt"
    args = ["convert", src, "-o", out, "--to", "f16", "--key", "net", "--inference"]
    plan = json.loads(run(*args, "--dry-run", "--json").stdout)
    assert plan["scope"] == "inference" and plan["whole_file"]
    dropped = {d["entry"]: d["training_state"] for d in plan["dropped"]}
    assert dropped == {
        "o": "optimizer state",
        "lr_sched": "learning-rate scheduler state",
        "gs": "AMP grad scaler state",
        "torch_rng": "random number generator state",
        "np_rng": "random number generator state",
        "py_rng": "random number generator state",
    }, dropped
    # The tensors the output holds outside the state dict: none (the RNG tensor is dropped).
    assert plan["other_tensors"] == []
    p = run(*args)
    assert "dropped the training state" in p.stderr
    got = torch.load(out, weights_only=False)
    assert set(got) == {"net", "char2idx", "idx2char", "num_classes", "epoch"}
    assert got["char2idx"] == char2idx and got["idx2char"][2] == "c" and got["num_classes"] == 5
    for k, v in model.state_dict().items():
        assert got["net"][k].dtype == torch.float16 and torch.equal(got["net"][k], v.half()), k
    # The converted model runs.
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 5))
    m.load_state_dict({k: v.float() for k, v in got["net"].items()})
    assert m(torch.randn(2, 4)).shape == (2, 5)
    # The bare state dict stays a flag away; without either flag every entry is kept.
    bare = tmp_path / "bare.pt"
    run("convert", src, "-o", bare, "--to", "f16", "--key", "net", "--state-dict-only")
    assert set(torch.load(bare, weights_only=True)) == set(model.state_dict())
    whole = tmp_path / "whole.pt"
    run("convert", src, "-o", whole, "--to", "f16", "--key", "net")
    assert set(torch.load(whole, weights_only=False)) == set(ckpt)


def test_to_auto_settles_shared_storages(tmp_path):
    """--to auto keeps the tensors the default target would cast as stored, after the rules
    decided: a view that a rule casts, on a storage another tensor now keeps, is kept whole
    with it (one storage, one dtype), in the plan and in the .pt written."""
    a = torch.randn(4, 4)
    src = tmp_path / "views.pt"
    torch.save({"big": torch.randn(64, 64).bfloat16(), "a": a, "b": a[0]}, src)
    out = tmp_path / "out.pt"
    args = ["convert", src, "-o", out, "--to", "auto", "--rule", "b=bf16"]
    plan = json.loads(run(*args, "--dry-run", "--json").stdout)
    rows = {t["name"]: t for t in plan["tensors"]}
    assert rows["a"]["to"] == rows["b"]["to"] == rows["a"]["from"], rows
    assert "kept whole" in rows["b"]["rule"], rows["b"]
    run(*args)
    got = torch.load(out, weights_only=True)
    assert got["a"].dtype == got["b"].dtype == torch.float32
    assert got["b"].untyped_storage().data_ptr() == got["a"].untyped_storage().data_ptr()
    assert torch.equal(got["b"], a[0])
