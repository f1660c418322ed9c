"""Content sniffing: files written by the `safetensors` library are read as safetensors for
every header length it can write (multiples of 8 from 8 to 64 KiB: 0x280-0x580 start with a
pickle's `80 02`..`80 05`), whatever their first bytes look like; the Rust unit test in
src/formats/sniff.rs covers every length 2..65536, padded by hand."""

import json
import struct

import numpy as np
from safetensors.numpy import save_file

from conftest import run

MAX = 64 * 1024


def library_files(folder):
    """One file per header length the library writes (every multiple of 8 up to 64 KiB),
    written by `safetensors.numpy.save_file`: a tensor name 8 characters longer makes the
    (space-padded) header exactly 8 bytes longer."""
    seen = {}
    t = np.arange(3, dtype=np.float32)
    k = 1
    while True:
        path = folder / "probe.safetensors"
        save_file({"w" * k: t}, str(path))
        n = struct.unpack("<Q", path.read_bytes()[:8])[0]
        if n > MAX:
            path.unlink()
            return seen
        seen[n] = path.rename(folder / f"h{n:05d}.safetensors")
        k += 8


def test_every_library_header_length_reads_as_safetensors(tmp_path):
    files = library_files(tmp_path)
    lengths = sorted(files)
    assert lengths == list(range(lengths[0], MAX + 1, 8)), "a header length was not produced"
    assert len(lengths) >= 8000
    pickle_like = [n for n in lengths if files[n].read_bytes()[:2] in
                   (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")]
    # The lengths that tripped the old sniffer (0x280, 0x380, 0x480, 0x580) are in the set.
    assert pickle_like == [0x280, 0x380, 0x480, 0x580]

    # audit: one process over the whole folder, every file "no pickle", exit 0.
    p = run("audit", tmp_path, "--json", check=False)
    doc = json.loads(p.stdout)
    assert p.returncode == 0, p.stderr
    assert doc["files"] == []
    assert len(doc["no_pickle"]) == len(lengths)
    assert {f["format"] for f in doc["no_pickle"]} == {"a safetensors file"}

    # inspect reads the ones that start like a pickle, and a sample of the rest.
    for n in pickle_like + lengths[::512]:
        p = run("inspect", files[n], "--json")
        doc = json.loads(p.stdout)
        assert len(doc["tensors"]) == 1 and doc["tensors"][0]["shape"] == [3], doc
        assert set(doc["tensors"][0]["name"]) == {"w"}


def test_a_pickle_with_a_json_object_after_it_is_still_a_pickle(tmp_path):
    """The sniffer validates the length before it believes the JSON: a dangerous pickle
    followed by `{}` (its first 8 bytes read as a header length far past the file) is judged
    as the pickle torch.load would run, not passed as safetensors."""
    pk = b"\x80\x02cos\nsystem\n(X\x04\x00\x00\x00trueR."
    assert struct.unpack("<Q", pk[:8])[0] > 1 << 40
    path = tmp_path / "polyglot.safetensors"
    path.write_bytes(pk + b"{}")
    p = run("audit", path, "--json", check=False)
    doc = json.loads(p.stdout)
    assert p.returncode == 1 and doc["files"][0]["verdict"] == "dangerous", doc
    assert doc["files"][0]["dangerous"] == ["os.system"], doc
    p = run("inspect", path, check=False)
    assert p.returncode != 0 and "safetensors" not in p.stderr.split(":")[-1], p.stderr


def test_kind_norm_finds_norm_layers_of_state_dicts_by_structure(tmp_path):
    """torchvision's state dicts name BatchNorm `bn1`, `layer1.0.bn2`, `downsample.1`: no
    module class, no "norm" in the name. kind:norm finds them by their running statistics;
    an nn.Sequential's LayerNorm by its 1-D weight/bias pair. Nothing else is kept."""
    import torch
    import torchvision

    for name, model in [
        ("resnet18", torchvision.models.resnet18(weights=None)),
        ("seq", torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8),
                                    torch.nn.Conv1d(8, 8, 3), torch.nn.BatchNorm1d(8))),
    ]:
        sd = model.state_dict()
        path = tmp_path / f"{name}.pt"
        torch.save(sd, path)
        p = run("convert", path, "-o", tmp_path / f"{name}.safetensors", "--to", "f16",
                "--keep", "kind:norm", "--dry-run", "--json")
        to = {t["name"]: t["to"] for t in json.loads(p.stdout)["tensors"]}
        norms = {m for m, mod in model.named_modules()
                 if isinstance(mod, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d,
                                     torch.nn.LayerNorm))}
        assert norms, name
        for n, t in sd.items():
            in_norm = n.rsplit(".", 1)[0] in norms
            if not t.is_floating_point():
                continue
            assert (to[n] == "F32") == in_norm, (name, n, to[n])
