"""Differential test of the pickle reader against the unpickler `torch.load` really runs:
CPython's C unpickler (`_pickle.c`), which frames differently from the pure-Python one.

Reading a file, `_pickle.c` loads a FRAME's bytes into a buffer of their own (`load_frame`),
and an opcode, argument or text line that does not fit in what is left of that buffer discards
the rest and reads from the file after it. A pickle whose frames do not enclose whole opcodes
(which no pickler writes) is therefore read differently by a loader reading a file and one
reading memory: `cmac` at a frame's end followed by `os\\nsystem\\n` is `os.system` to the first
and `macos.system` to the second.

Mutations aimed at frames (insert, resize, split, nest; some with a plain byte mutation on top)
of seed pickles of every protocol. For each case:
- `pickle.Unpickler` (the C class) over `io.BytesIO` (what `torch.load` does with a zip's
  `data.pkl`) with a recording `find_class` that returns a stub: every global it asks for must
  be among audit's findings for the raw file, by the same name;
- the same over the file opened with `open()` (a `BufferedReader`, which has `peek`): every
  global it asks for is reported, or the file is flagged dangerous for its frames;
- for a share of the cases, `torch.load(weights_only=False)` of a torch.save-layout zip holding
  the case as `data.pkl`, with torch's own unpickler (`UnpicklerWrapper`, its `find_class`
  renames) on top of the recording C class: every global it asks for is among audit's findings
  for that zip.
Nothing is ever imported: the recording `find_class` returns a stub for every name. Memo
indices that would make the C unpickler allocate gigabytes are filtered out beforehand."""

import collections
import io
import json
import pathlib
import pickle
import random
import re
import resource
import struct
import subprocess
import sys
import types
import zipfile

import pytest

from conftest import corpus_size, run
from test_audit_differential import Stub, mutate

# Full size 10,000 and 2,000 (WEIGHTCAST_FULL_CORPORA=1); by default the first 2,500 and 500.
CASES = corpus_size(10_000, 2_500)
TORCH_CASES = corpus_size(2_000, 500)


class CRecorder(pickle.Unpickler):  # the C class: pickle.Unpickler is _pickle.Unpickler
    asked: list = []

    def find_class(self, module, name):
        CRecorder.asked.append((module, name))
        return Stub

    def persistent_load(self, pid):
        return None


assert CRecorder.__mro__[1].__module__ == "_pickle", "the C unpickler"


def c_globals(fileobj):
    CRecorder.asked = []
    try:
        CRecorder(fileobj, encoding="utf-8").load()
    except Exception:
        pass
    return list(CRecorder.asked)


def seeds():
    objs = [
        collections.OrderedDict(a=1, b=[1.5, "x" * 40]), {"k": (1, 2, None, True), "s": "é" * 30},
        [b"bytes" * 10, bytearray(b"ba"), {1, 2}, frozenset([3])], collections.Counter("abcab"),
        collections.defaultdict(list, a=[1]), complex(1, 2), 2**100, list(range(40)),
    ]
    out = [pickle.dumps(o, protocol=p) for o in objs for p in range(6)]
    for m, n in [("os", "system"), ("builtins", "getattr"), ("collections", "OrderedDict"),
                 ("torch._utils", "_rebuild_tensor_v2"), ("posix", "system")]:
        mb, nb = m.encode(), n.encode()
        arg = b"X\x06\x00\x00\x00whoami"
        out.append(b"\x80\x02c" + mb + b"\n" + nb + b"\n" + arg + b"\x85R.")
        out.append(b"(" + arg + b"i" + mb + b"\n" + nb + b"\n.")
        body = (b"\x8c" + bytes([len(mb)]) + mb + b"\x94\x8c" + bytes([len(nb)]) + nb
                + b"\x94\x93" + arg + b"\x85R.")
        out.append(b"\x80\x04\x95" + struct.pack("<Q", len(body)) + body)
    return out


def frames(data):
    """(offset, length) of every FRAME opcode pickletools sees."""
    out = []
    try:
        for op, arg, pos in __import__("pickletools").genops(data):
            if op.name == "FRAME":
                out.append((pos, arg))
    except Exception:
        pass
    return out


def frame(n):
    return b"\x95" + struct.pack("<Q", n)


def mutate_frames(rng, data, pool):
    b = bytes(data)
    for _ in range(rng.randint(1, 3)):
        fs = frames(b)
        kind = rng.randrange(5)
        if kind == 0 or not fs:  # insert a frame covering a random span
            i = rng.randrange(len(b) + 1)
            n = rng.choice([rng.randrange(1, 12), rng.randrange(len(b) - i + 4)])
            b = b[:i] + frame(n) + b[i:]
        elif kind == 1:  # resize one
            pos, n = rng.choice(fs)
            n = max(0, n + rng.randint(-8, 8)) if rng.random() < 0.7 else rng.randrange(len(b))
            b = b[:pos + 1] + struct.pack("<Q", n) + b[pos + 9:]
        elif kind == 2:  # split one in two
            pos, n = rng.choice(fs)
            start = pos + 9
            k = rng.randrange(0, n + 1) if n else 0
            first = frame(k)
            b = b[:pos] + first + b[start:start + k] + frame(max(0, n - k)) + b[start + k:]
        elif kind == 3:  # nest one inside another
            pos, n = rng.choice(fs)
            i = pos + 9 + (rng.randrange(n + 1) if n else 0)
            b = b[:i] + frame(rng.randrange(1, n + 20)) + b[i:]
        else:  # a plain mutation on top
            b = mutate(rng, b, pool)
    return b


def bounded(out_json, kind, folder):
    """Runs the recording unpicklers over every file of `folder` in a child process whose
    address space is capped (a mutated memo index can make the C unpickler allocate gigabytes:
    it gets a MemoryError there), and returns {file name: globals asked for}."""
    code = (
        "import sys, resource; sys.path.insert(0, %r); import test_audit_frames as t; "
        "t.worker(%r, %r, %r)" % (str(pathlib.Path(__file__).parent), str(out_json), kind, str(folder))
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(pathlib.Path(out_json).read_text())


def cap_memory(extra=1536 << 20):
    vm = int(re.search(r"VmSize:\s+(\d+) kB", pathlib.Path("/proc/self/status").read_text())[1])
    limit = vm * 1024 + extra
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def worker(out_json, kind, folder):
    out = {}
    if kind == "torch":
        import torch

        recorder = types.ModuleType("recording_pickle")
        recorder.Unpickler = CRecorder
        recorder.load = pickle.load
    cap_memory()
    for path in sorted(pathlib.Path(folder).iterdir()):
        if kind == "raw":
            data = path.read_bytes()
            with open(path, "rb") as fh:
                peeked = c_globals(fh)
            out[path.name] = [c_globals(io.BytesIO(data)), peeked]
        else:
            CRecorder.asked = []
            try:
                torch.load(path, weights_only=False, pickle_module=recorder)
            except Exception:
                pass
            out[path.name] = list(CRecorder.asked)
    pathlib.Path(out_json).write_text(json.dumps(out))


def findings_by_file(report):
    out = {}
    for f in report["files"]:
        out[f["path"].rsplit("/", 1)[1]] = f
    return out


def reported(f, asked):
    found = {x["name"].split(" -> ")[0].removesuffix(" (not a Python name)")
             for x in f.get("findings", [])}
    missing = []
    for m, n in asked:
        g = f"{m}.{n}"
        ok = g in found if g.isascii() and g.isprintable() else len(f.get("findings", [])) >= len(set(asked))
        if not ok:
            missing.append(g)
    return missing


def test_frame_that_splits_a_global_line(tmp_path):
    """The example from the issue, checked with CPython itself first: `c` + `mac` ends the
    frame; the C unpickler reading a file imports `os.system`, one reading memory
    `macos.system`."""
    data = b"\x80\x04" + frame(4) + b"cmac" + b"os\nsystem\nN\x85R."
    assert c_globals(io.BytesIO(data)) == [("os", "system")]
    path = tmp_path / "split.pkl"
    path.write_bytes(data)
    p = run("audit", path, "--json", check=False)
    assert p.returncode == 1
    f = json.loads(p.stdout)["files"][0]
    assert f["verdict"] == "dangerous"
    names = {x["name"] for x in f["findings"]}
    assert {"os.system", "macos.system"} <= names, names
    assert any("FRAME" in a and "skips bytes 12..15" in a for a in f["ambiguities"]), f


def test_audit_reads_frames_as_the_c_unpickler(tmp_path):
    rng = random.Random(2026)
    pool = seeds()
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(CASES):
        data = mutate_frames(rng, rng.choice(pool), pool)
        (raw / f"f{i:05d}.pkl").write_bytes(data)
    cases = {k: (v[0], v[1]) for k, v in bounded(tmp_path / "c.json", "raw", raw).items()}
    cases = {k: ([tuple(g) for g in a], [tuple(g) for g in b]) for k, (a, b) in cases.items()}
    assert len(cases) == CASES
    differ = sum(1 for a, b in cases.values() if a != b)
    assert sum(1 for a, _ in cases.values() if a) > CASES // 5, "enough cases ask for a global"
    p = run("audit", raw, "--json", check=False)
    assert p.returncode in (0, 1, 2), p.stderr
    report = findings_by_file(json.loads(p.stdout))
    missing, unflagged = [], []
    for name, (from_bytesio, from_file) in cases.items():
        f = report.get(name)
        if f is None:
            if from_bytesio or from_file:
                missing.append((name, "no report"))
            continue
        gone = reported(f, from_bytesio)
        if gone:
            missing.append((name, gone, f["verdict"]))
        if reported(f, from_file) and f["verdict"] != "dangerous":
            unflagged.append((name, reported(f, from_file), f["verdict"]))
        if from_bytesio and f["verdict"] == "clean":
            assert all(x["class"] == "allowed" for x in f["findings"]), name
    print(f"{len(cases)} cases, {differ} read differently from BytesIO and from a file",
          file=sys.stderr)
    assert not missing, f"{len(missing)} globals the C unpickler asks for not reported: {missing[:5]}"
    assert not unflagged, f"{len(unflagged)}: {unflagged[:5]}"


def test_torch_load_asks_for_nothing_audit_misses(tmp_path):
    pytest.importorskip("torch")
    rng = random.Random(7)
    pool = seeds()
    folder = tmp_path / "zips"
    folder.mkdir()
    for i in range(TORCH_CASES):
        data = mutate_frames(rng, rng.choice(pool), pool)
        with zipfile.ZipFile(folder / f"t{i:05d}.pt", "w", zipfile.ZIP_STORED) as z:
            z.writestr("archive/data.pkl", data)
            z.writestr("archive/byteorder", "little")
            z.writestr("archive/version", "3\n")
    cases = {k: [tuple(g) for g in v]
             for k, v in bounded(tmp_path / "t.json", "torch", folder).items()}
    assert sum(1 for a in cases.values() if a) > TORCH_CASES * 3 // 20, "torch's unpickler asked"
    p = run("audit", folder, "--json", check=False)
    report = findings_by_file(json.loads(p.stdout))
    missing = [(n, reported(report[n], a)) for n, a in cases.items() if a and reported(report[n], a)]
    assert not missing, f"{len(missing)} cases: {missing[:5]}"


# Opcodes whose edge cases CPython reads on where a stricter parser would stop: each is
# followed by a call to os.system, which the C unpickler then asks for.
EDGE_CASES = {
    "int_hex": b"I0x1f\n0",
    "int_octal": b"I017\n0",
    "int_spaces": b"I  42\n0",
    "int_big": b"I" + b"9" * 40 + b"\n0",
    "long_underscores": b"L1_000L\n0",
    "pop_of_a_mark": b"(0",
    "setitem_on_a_list": b"]K\x05aK\x00K\x07s0",
    "append_on_a_bytearray": b"\x96\x01\x00\x00\x00\x00\x00\x00\x00aK\x01a0",
    "binunicode_surrogate": b"X\x03\x00\x00\x00\xed\xa0\x800",
    "build_twice": b"cbuiltins\nobject\n)R}b}b0",
}


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_opcode_edge_cases_read_as_cpython(tmp_path, name):
    data = b"\x80\x02" + EDGE_CASES[name] + b"cos\nsystem\nX\x02\x00\x00\x00idt\x85R."
    asked = c_globals(io.BytesIO(data))
    assert ("os", "system") in asked, f"CPython stops first: {asked}"
    path = tmp_path / f"{name}.pkl"
    path.write_bytes(data)
    p = run("audit", path, "--json", check=False)
    f = json.loads(p.stdout)["files"][0]
    assert p.returncode == 1 and "os.system" in f["dangerous"], f
