"""audit resolves globals exactly as CPython's unpickler does: generated pickles name globals in
every way the opcodes allow (GLOBAL, INST, STACK_GLOBAL with text or byte strings, strings
fetched from the memo under keys Python's int() accepts, PROTO switching renaming on and off
mid-stream), and the names audit reports equal the ones a recording find_class is asked for
after CPython's protocol-dependent renaming. The recorder never imports or calls anything."""

import _compat_pickle
import io
import json
import pickle
import random
import zipfile

import pytest

from conftest import run

POOL = [
    ("collections", "OrderedDict"), ("__builtin__", "set"), ("__builtin__", "reduce"),
    ("copy_reg", "_reconstructor"), ("UserDict", "UserDict"), ("thread", "get_ident"),
    ("cPickle", "loads"), ("torch._utils", "_rebuild_tensor_v2"), ("exceptions", "ValueError"),
    ("os", "getcwd"), ("builtins", "print"), ("whichdb", "whichdb"), ("urllib2", "urlopen"),
    ("SocketServer", "TCPServer"), ("__builtin__", "intern"), ("itertools", "izip"),
]


class Recorder(pickle._Unpickler):
    """CPython's pure-Python unpickler (same protocol tracking and string decoding as the C
    one), with find_class doing what CPython's does to the name and then only recording it."""

    def __init__(self, data):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self.seen = set()

    def find_class(self, module, name):
        if self.proto < 3 and self.fix_imports:
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        self.seen.add(f"{module}.{name}")
        return lambda *a, **k: None


def text_key(rng, k):
    """A memo key as a protocol-0 line, spelled as Python's int() still reads it."""
    s = str(k)
    return rng.choice([s, f"+{s}", f" {s} ", f"0{s}", f"{s[0]}_{s[1:]}" if len(s) > 1 else s])


def string_op(rng, s):
    b = s.encode()
    kind = rng.randrange(4)
    if kind == 0:
        return b"\x8c" + bytes([len(b)]) + b  # SHORT_BINUNICODE
    if kind == 1:
        return b"X" + len(b).to_bytes(4, "little") + b  # BINUNICODE
    if kind == 2:
        return b"U" + bytes([len(b)]) + b  # SHORT_BINSTRING (bytes, decoded by find_class's caller)
    return b"T" + len(b).to_bytes(4, "little") + b  # BINSTRING


def generate(rng):
    out = bytearray(b"\x80" + bytes([rng.randrange(6)])) if rng.random() < 0.8 else bytearray()
    out += b"("
    memo = 0
    for _ in range(rng.randrange(1, 8)):
        if rng.random() < 0.3:
            out += b"\x80" + bytes([rng.randrange(6)])  # PROTO mid-stream
        m, n = rng.choice(POOL)
        how = rng.randrange(4)
        if how == 0:
            out += b"c" + m.encode() + b"\n" + n.encode() + b"\n"
        elif how == 1:
            out += b"(i" + m.encode() + b"\n" + n.encode() + b"\n"
        elif how == 2:
            out += string_op(rng, m) + string_op(rng, n) + b"\x93"
        else:
            # both strings through the memo, fetched back under other spellings of the key
            km, kn = memo + 10, memo + 11
            memo += 2
            out += string_op(rng, m) + b"p" + text_key(rng, km).encode() + b"\n" + b"0"
            out += string_op(rng, n) + b"p" + text_key(rng, kn).encode() + b"\n" + b"0"
            out += b"g" + text_key(rng, km).encode() + b"\n"
            out += b"g" + text_key(rng, kn).encode() + b"\n" + b"\x93"
    out += b"t."
    return bytes(out)


def audited_names(path):
    p = run("audit", path, "--json", check=False)
    v = json.loads(p.stdout)
    names = set()
    for f in v["files"]:
        for pk in f["pickles"]:
            for g in pk["globals"]:
                names.add(g["name"].split(" -> ")[-1])
    return names


def test_resolved_names_equal_cpythons(tmp_path):
    rng = random.Random(14)
    checked = 0
    for i in range(120):
        data = generate(rng)
        rec = Recorder(data)
        rec.load()
        path = tmp_path / f"g{i}.pt"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            z.writestr("archive/data.pkl", data)
        assert audited_names(path) == rec.seen, data
        checked += 1
    assert checked == 120


@pytest.mark.parametrize("data,want", [
    # protocol 2: __builtin__.reduce is functools.reduce, a dangerous call
    (b"\x80\x02c__builtin__\nreduce\n.", "functools.reduce"),
    # a protocol-4 file turns renaming on again with a later PROTO 2
    (b"\x80\x04\x80\x02ccPickle\nloads\n.", "pickle.loads"),
    # STACK_GLOBAL with byte-string arguments (CPython decodes them)
    (b"\x80\x04U\x02osU\x06system\x93.", "os.system"),
    # memo keys as Python's int() reads them
    (b"\x80\x04\x8c\x02osp+1\n0\x8c\x06systemp 2_0\n0g01\ng20\n\x93.", "os.system"),
])
def test_audit_flags_what_cpython_resolves(tmp_path, data, want):
    rec = Recorder(data)
    rec.load()
    assert want in rec.seen
    path = tmp_path / "x.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data)
    p = run("audit", path, "--json", check=False)
    assert p.returncode == 1, p.stdout
    v = json.loads(p.stdout)
    assert any(d.split(" -> ")[-1] == want for d in v["files"][0]["dangerous"]), p.stdout
