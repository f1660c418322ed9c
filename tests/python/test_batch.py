"""`convert --batch FILE`: a model zoo in one command, each line the same bytes as its own
convert, failures reported without stopping the rest."""

import json

from conftest import ROOT, run

EXAMPLE = ROOT / "examples" / "tiny-bert"


def test_batch_converts_every_line_like_single_runs(tmp_path):
    batch = tmp_path / "zoo.txt"
    batch.write_text(
        "# a model zoo\n"
        f"{EXAMPLE} -> {tmp_path / 'folder'}\n"
        "\n"
        f"{tmp_path / 'missing'} -> {tmp_path / 'never'}\n"
        f"{EXAMPLE / 'model.safetensors'} -> {tmp_path / 'one.safetensors'}\n")
    p = run("convert", "--batch", batch, "--to", "f16", "--preset", "keep-norms", "--json",
            check=False)
    assert p.returncode == 1
    r = json.loads(p.stdout)
    assert [x["ok"] for x in r["results"]] == [True, False, True]
    assert "missing" in r["results"][1]["error"] and not (tmp_path / "never").exists()
    assert (r["converted"], r["failed"]) == (2, 1)
    run("convert", EXAMPLE / "model.safetensors", "-o", tmp_path / "alone.safetensors", "--to",
        "f16", "--preset", "keep-norms")
    assert (tmp_path / "one.safetensors").read_bytes() == \
        (tmp_path / "alone.safetensors").read_bytes()
    assert (tmp_path / "folder" / "config.json").exists()


def test_batch_file_errors_are_usage_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{EXAMPLE} {tmp_path / 'x'}\n")
    p = run("convert", "--batch", bad, "--to", "f16", check=False)
    assert p.returncode == 2 and "bad.txt:1: expected `INPUT -> OUTPUT`" in p.stderr
    assert not (tmp_path / "x").exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    assert run("convert", "--batch", empty, "--to", "f16", check=False).returncode == 2
    p = run("convert", "--batch", bad, EXAMPLE, "--to", "f16", check=False)
    assert p.returncode == 2
