"""What the command says about what it did and what it read: the summary names files that
exist, the input is described as what it is, and with --json an error is a JSON document."""

import json
import pathlib

import torch
from safetensors.torch import save_file

from conftest import run


def test_json_errors_are_json_documents(tmp_path):
    p = run("convert", tmp_path / "missing.safetensors", "-o", tmp_path / "o.safetensors",
            "--to", "f16", "--json", check=False)
    doc = json.loads(p.stdout)
    assert p.returncode == 1 and doc["exit_code"] == 1 and "missing.safetensors" in doc["error"]
    save_file({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    p = run("convert", tmp_path / "m.safetensors", "-o", tmp_path / "o.safetensors",
            "--to", "f17", "--json", check=False)
    doc = json.loads(p.stdout)
    assert p.returncode == 2 and doc == {"error": doc["error"], "exit_code": 2}
    assert "unknown dtype `f17`" in doc["error"]
    p = run("audit", tmp_path / "nothing-here", "--format", "json", check=False)
    assert json.loads(p.stdout)["exit_code"] == p.returncode != 0


def test_the_summary_names_files_that_exist(tmp_path, minilm):
    out = tmp_path / "out.safetensors"
    p = run("convert", minilm / "model.safetensors", "-o", out, "--to", "f16",
            "--max-shard-size", "20MB")
    named = p.stderr.strip().splitlines()[-1].split(" -> ")[-1]
    path = pathlib.Path(named.split(" (")[0])
    assert path.exists() and path.name == "out.safetensors.index.json", p.stderr
    assert not out.exists()
    shards = set(json.loads(path.read_text())["weight_map"].values())
    assert all((tmp_path / s).exists() for s in shards)
    assert f"({len(shards)} shards beside it)" in named


def test_a_folder_of_pytorch_weights_is_said_to_be_one(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    torch.save({"w": torch.ones(2)}, folder / "pytorch_model.bin")
    (folder / "config.json").write_text("{}")
    doc = json.loads(run("inspect", folder, "--json").stdout)
    assert doc["format"] == "model folder (PyTorch weights)"
    p = run("inspect", folder / "pytorch_model.bin", "--json")
    assert json.loads(p.stdout)["format"].startswith("PyTorch checkpoint")


FIX = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "torch"


def test_key_entries_and_notes(tmp_path):
    """--key on an entry that holds no tensor is refused; an explicit --key is not "found";
    tied tensors are told for safetensors outputs (written once) and not for .pt outputs
    (kept tied); a plain state dict has no module class."""
    out = tmp_path / "o.safetensors"
    p = run("convert", FIX / "training.pt", "-o", out, "--to", "f16", "--key", "epoch",
            check=False)
    assert p.returncode == 2 and "--key epoch: the entry holds no tensor" in p.stderr
    assert "model" in p.stderr and not out.exists()
    p = run("convert", FIX / "training.pt", "-o", out, "--to", "f16", "--key", "model", "-q")
    assert "state dict is the entry" not in p.stderr, p.stderr
    p = run("convert", FIX / "training.pt", "-o", tmp_path / "auto.safetensors", "--to", "f16")
    assert "the state dict is the entry `model` (found by its name" in p.stderr
    p = run("convert", FIX / "tied.pt", "-o", tmp_path / "t.safetensors", "--to", "f16")
    assert "tied tensor(s)" in p.stderr
    p = run("convert", FIX / "tied.pt", "-o", tmp_path / "t.pt", "--to", "f16")
    assert "tied tensor(s)" not in p.stderr, p.stderr
    doc = json.loads(run("inspect", FIX / "tied.pt", "--json").stdout)
    assert {t["module_class"] for t in doc["tensors"]} == {None}


def test_regex_errors_are_one_readable_line(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    p = run("convert", tmp_path / "m.safetensors", "-o", tmp_path / "o.safetensors", "--to",
            "f16", "--keep", "re:(", check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert "\\u{a}" not in p.stderr and "unclosed group" in p.stderr, p.stderr
