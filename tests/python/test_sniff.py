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
    assert len(pickle_like) > 100  # the lengths that tripped the old sniffer are in the set

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


def test_a_polyglot_safetensors_pickle_is_judged_as_torch_load_reads_it(tmp_path):
    """A file that is a valid safetensors file *and* a pickle torch.load would run: the
    pickle's global is reported, not hidden behind the safetensors verdict."""
    # 80 02 | c os\nsystem\n ... : the header length's bytes are the pickle's first opcodes.
    pk = b"\x80\x02cos\nsystem\n(X\x04\x00\x00\x00trueR."
    header_len = struct.unpack("<Q", pk[:8])[0]
    # Such a length is far beyond any real header: the file is not valid safetensors, and is
    # judged (dangerous) as the pickle it is.
    path = tmp_path / "polyglot.safetensors"
    path.write_bytes(pk + b"{}")
    p = run("audit", path, "--json", check=False)
    doc = json.loads(p.stdout)
    assert p.returncode == 1 and doc["files"][0]["verdict"] == "dangerous", (header_len, doc)
