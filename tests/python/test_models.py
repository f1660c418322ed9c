"""Converting the real all-MiniLM-L6-v2 (and torch-made checkpoints): outputs load with real
safetensors/torch and equal torch's own conversion."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import run


def torch_reference(path, dtype, keep=lambda name, t: False):
    """What a user gets with torch: load, `.to(dtype)` every floating tensor except `keep`."""
    return {k: (v if (not v.is_floating_point() or keep(k, v)) else v.to(dtype))
            for k, v in load_file(path).items()}


def assert_same(got, want):
    assert list(got) == list(want) or sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)) if got[k].numel() else True, k


@pytest.mark.parametrize("to,dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_minilm_folder(minilm, tmp_path, to, dtype):
    out = tmp_path / "out"
    p = run("convert", minilm, "-o", out, "--to", to)
    assert "cast to" in p.stderr
    got = load_file(out / "model.safetensors")
    assert_same(got, torch_reference(minilm / "model.safetensors", dtype))
    assert got["embeddings.position_ids"].dtype == torch.int64, "integer tensors are never cast"
    # every other file is copied byte for byte, config.json gets the new dtype
    for f in ["tokenizer.json", "vocab.txt", "modules.json", "1_Pooling/config.json", "README.md"]:
        assert (out / f).read_bytes() == (minilm / f).read_bytes(), f
    cfg_in = json.loads((minilm / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == str(dtype).removeprefix("torch.")
    assert [k for k in cfg if k in cfg_in] == list(cfg_in), "key order kept"
    assert set(cfg) - set(cfg_in) <= {"torch_dtype"}
    assert {k: v for k, v in cfg.items() if k != "torch_dtype"} == \
        {k: v for k, v in cfg_in.items() if k != "torch_dtype"}
    # tensor order and metadata survive
    with safe_open(out / "model.safetensors", "pt") as f, \
            safe_open(minilm / "model.safetensors", "pt") as g:
        assert f.metadata() == g.metadata()
        assert list(f.keys()) == list(g.keys())


def test_minilm_keep_norms_matches_torch_selective_cast(minilm, tmp_path):
    out = tmp_path / "m.safetensors"
    run("convert", minilm / "model.safetensors", "-o", out, "--to", "f16", "--preset", "keep-norms")
    want = torch_reference(minilm / "model.safetensors", torch.float16, keep=lambda k, t: t.dim() <= 1)
    assert_same(load_file(out), want)


def test_f32_to_f32_is_byte_identical(minilm, tmp_path):
    out = tmp_path / "same.safetensors"
    run("convert", minilm / "model.safetensors", "-o", out, "--to", "f32")
    src = load_file(minilm / "model.safetensors")
    got = load_file(out)
    assert list(got) == list(src)
    for k in src:
        assert torch.equal(src[k], got[k]), k


def test_sharded_output_hub_layout(minilm, tmp_path):
    out = tmp_path / "sharded"
    run("convert", minilm, "-o", out, "--to", "bf16", "--max-shard-size", "15MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n >= 3
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    merged = {}
    total = 0
    for s in shards:
        part = load_file(out / s)
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= 15_000_000 or len(part) == 1, "only a tensor over the limit gets a shard alone"
        total += sum(t.numel() * t.element_size() for t in part.values())
        for k in part:
            assert index["weight_map"][k] == s
        merged.update(part)
        with safe_open(out / s, "pt") as f:
            assert f.metadata() == {"format": "pt"}
    assert index["metadata"]["total_size"] == total
    assert_same(merged, torch_reference(minilm / "model.safetensors", torch.bfloat16))

    # the sharded set converts again, through its index, to one file
    again = tmp_path / "again.safetensors"
    run("convert", out / "model.safetensors.index.json", "-o", again, "--to", "f32")
    back = load_file(again)
    assert_same(back, {k: v.float() if v.is_floating_point() else v for k, v in merged.items()})
    # and the folder keeps its shard names without --max-shard-size
    folder2 = tmp_path / "f2"
    run("convert", out, "-o", folder2, "--to", "f16")
    assert sorted(p.name for p in folder2.glob("*.safetensors")) == shards
    assert (folder2 / "model.safetensors.index.json").exists()


def test_rules_and_dry_run_json(minilm, tmp_path):
    out = tmp_path / "x"
    p = run("convert", minilm, "-o", out, "--to", "f16", "--preset", "keep-embeddings",
            "--rule", "pooler.*=bf16", "--keep", "encoder.layer.5.**", "--keep", "nothing.here",
            "--dry-run", "--json")
    assert not out.exists(), "dry run writes nothing"
    plan = json.loads(p.stdout)
    by = {t["name"]: t for t in plan["tensors"]}
    assert by["embeddings.word_embeddings.weight"]["to"] == "F32"
    assert by["embeddings.word_embeddings.weight"]["rule"] == "preset keep-embeddings"
    assert by["pooler.dense.weight"]["to"] == "BF16"
    assert by["encoder.layer.5.output.dense.weight"]["to"] == "F32"
    assert by["encoder.layer.4.output.dense.weight"]["to"] == "F16"
    assert by["embeddings.position_ids"]["to"] == "I64"
    assert any("nothing.here" in w for w in plan["warnings"])
    assert "matches no tensor" in p.stderr
    t = plan["totals"]
    assert t["bytes_before"] == sum(x["bytes_before"] for x in plan["tensors"])
    assert t["cast"] + t["kept"] == len(plan["tensors"]) == 104


def test_mixed_dtypes_from_torch(tmp_path):
    """A torch-made file with every dtype: ints and bools untouched, floats cast like torch."""
    g = torch.Generator().manual_seed(0)
    src = {
        "w16": torch.randn(7, 9, generator=g).half(),
        "wbf": torch.randn(33, generator=g).bfloat16(),
        "w64": torch.randn(3, 3, generator=g, dtype=torch.float64),
        "w8": torch.randn(5, generator=g).to(torch.float8_e4m3fn),
        "i32": torch.arange(10, dtype=torch.int32),
        "u8": torch.arange(10, dtype=torch.uint8),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    inp, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(src, inp, metadata={"format": "pt", "note": "kept"})
    run("convert", inp, "-o", out, "--to", "bf16")
    got = load_file(out)
    for k, v in src.items():
        want = v.to(torch.bfloat16) if v.is_floating_point() else v
        assert got[k].dtype == want.dtype and got[k].shape == want.shape, k
        assert torch.equal(got[k].float() if got[k].is_floating_point() else got[k],
                           want.float() if want.is_floating_point() else want), k
    with safe_open(out, "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "kept"}
    assert misaligned(out) == [], "every tensor starts at a multiple of its element size"


def misaligned(path):
    """Tensors whose data does not start at a multiple of their element size in the file."""
    import struct

    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    width = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
             "I16": 2, "U16": 2}
    return [k for k, v in header.items() if k != "__metadata__"
            and (8 + n + v["data_offsets"][0]) % width.get(v["dtype"], 1)]


def test_outputs_are_aligned(tmp_path):
    """In input order, f64 cast to bf16 (18 bytes) would leave the int32 after it at offset 18;
    with keep rules and fp8 the same happens between kept f32 and odd-sized fp8 tensors."""
    g = torch.Generator().manual_seed(0)
    src = {
        "a.w64": torch.randn(3, 3, generator=g, dtype=torch.float64),
        "b.i32": torch.arange(10, dtype=torch.int32),
        "c.bias": torch.randn(7, generator=g),
        "d.norm.weight": torch.randn(5, generator=g),
        "e.w": torch.randn(3, 3, generator=g),
    }
    inp = tmp_path / "in.safetensors"
    save_file(src, inp)
    for args in (["--to", "bf16"], ["--to", "f8e4m3", "--keep", "*.norm.*"]):
        out = tmp_path / "out.safetensors"
        run("convert", inp, "-o", out, *args, "--force", "--on-overflow", "allow")
        assert misaligned(out) == [], args
        got = load_file(out)
        assert torch.equal(got["b.i32"], src["b.i32"])
        assert set(got) == set(src)
