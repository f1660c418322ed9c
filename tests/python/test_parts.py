"""`convert --part K/N` + `--part finish`: N independent processes write their shards, a last
call writes the index and the folder's other files; the result is byte-identical to one run,
and a missing or foreign shard stops the finish with nothing written."""

import random
import subprocess

import pytest

from conftest import BIN, ROOT, run

TINY = ROOT / "examples" / "tiny-bert"
TORCH = ROOT / "tests" / "fixtures" / "torch"


def files_of(d):
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


CASES = [
    ("minilm", "out", ["--to", "bf16", "--max-shard-size", "20MB"], 3),
    ("minilm", "out", ["--to", "f8e4m3", "--scale", "channel", "--max-shard-size", "10MB"], 4),
    ("tiny", "out", ["--to", "f16", "--preset", "keep-norms", "--max-shard-size", "16KB"], 2),
    ("tiny", "out/model.safetensors.index.json", ["--to", "bf16", "--max-shard-size", "20KB"], 5),
    ("training", "out/model.safetensors", ["--to", "f16", "--max-shard-size", "100"], 2),
]


@pytest.mark.parametrize("src,out,opts,n", CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_parts_are_byte_identical_to_one_run(tmp_path, minilm, src, out, opts, n):
    src = {"minilm": minilm, "tiny": TINY, "training": TORCH / "training.pt"}[src]
    one, split = tmp_path / "one" / out, tmp_path / "split" / out
    run("convert", src, "-o", one, *opts, "-q")
    # The parts run at the same time, in any order, as independent processes.
    order = list(range(1, n + 1))
    random.Random(n).shuffle(order)
    procs = [subprocess.Popen([BIN, "convert", str(src), "-o", str(split), *opts, "-q",
                               "--part", f"{k}/{n}"], stderr=subprocess.PIPE, text=True)
             for k in order]
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    index = [f for f in (tmp_path / "split").rglob("*.index.json")]
    assert not index, "no index before the finish"
    run("convert", src, "-o", split, *opts, "-q", "--part", "finish")
    assert files_of(tmp_path / "one") == files_of(tmp_path / "split")
    # Shards are split between the parts; a part with no shard writes nothing (tiny-5).
    assert len([f for f in files_of(tmp_path / "one") if f.endswith(".safetensors")]) >= 2


def test_finish_refuses_missing_or_foreign_shards(tmp_path, minilm):
    opts = ["--to", "f16", "--max-shard-size", "20MB", "-q"]
    out = tmp_path / "out"
    p = run("convert", minilm, "-o", out, *opts, "--part", "finish", check=False)
    assert p.returncode == 1 and "missing; run the part that writes shard 1" in p.stderr
    run("convert", minilm, "-o", out, *opts, "--part", "1/2")
    p = run("convert", minilm, "-o", out, *opts, "--part", "finish", check=False)
    assert p.returncode == 1 and "shard 2" in p.stderr
    assert not (out / "model.safetensors.index.json").exists()
    assert not (out / "config.json").exists()
    # Part 2 run with other options: its shards are not this plan's.
    run("convert", minilm, "-o", out, "--to", "bf16", "--max-shard-size", "20MB", "-q",
        "--part", "2/2")
    p = run("convert", minilm, "-o", out, *opts, "--part", "finish", check=False)
    assert p.returncode == 1 and "not the shard this plan writes" in p.stderr
    assert not (out / "model.safetensors.index.json").exists()
    # A part does not overwrite a shard unless --force.
    p = run("convert", minilm, "-o", out, *opts, "--part", "2/2", check=False)
    assert p.returncode == 2 and "already exists" in p.stderr
    run("convert", minilm, "-o", out, *opts, "--part", "2/2", "--force")
    run("convert", minilm, "-o", out, *opts, "--part", "finish")
    run("convert", minilm, "-o", tmp_path / "one", *opts)
    assert files_of(out) == files_of(tmp_path / "one")


def test_part_usage_errors(tmp_path, minilm):
    for part, what in [("0/2", "give K/N"), ("3/2", "give K/N"), ("x", "give K/N")]:
        p = run("convert", minilm, "-o", tmp_path / "o", "--to", "f16", "--part", part,
                check=False)
        assert p.returncode == 2 and what in p.stderr
    p = run("convert", minilm / "model.safetensors", "-o", tmp_path / "o.safetensors", "--to",
            "f16", "--part", "1/2", check=False)
    assert p.returncode == 2 and "--part splits a sharded output" in p.stderr
    p = run("convert", TORCH / "training.pt", "-o", tmp_path / "o.pt", "--to", "f16", "--part",
            "1/2", check=False)
    assert p.returncode == 2 and "--part splits a sharded output" in p.stderr
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "o.pt").exists()
