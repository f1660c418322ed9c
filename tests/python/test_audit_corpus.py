"""audit against picklescan on a generated corpus: dangerous globals from picklescan's own list,
its security advisories and weightcast's list, each written the ways pickles name globals
(GLOBAL, STACK_GLOBAL through the memo, INST) and placed in the containers loaders open (a raw
pickle, a torch.save zip, a legacy stack, an .npz member, a nested zip), plus benign files.
Every file picklescan flags must be dangerous here too; benign files must not be. Nothing is
ever unpickled: the files are written opcode by opcode."""

import io
import json
import pickle
import zipfile

import numpy as np
import pytest

from conftest import ROOT, run

picklescan = pytest.importorskip("picklescan.scanner")

DANGEROUS = [
    ("os", "system"), ("posix", "system"), ("nt", "system"), ("subprocess", "Popen"),
    ("subprocess", "check_output"), ("builtins", "eval"), ("builtins", "exec"),
    ("__builtin__", "eval"), ("builtins", "getattr"), ("builtins", "__import__"),
    ("builtins", "open"), ("builtins", "compile"), ("__builtin__", "apply"),
    ("runpy", "_run_code"), ("runpy", "run_path"), ("pty", "spawn"), ("socket", "create_connection"),
    ("webbrowser", "open"), ("pickle", "loads"), ("_pickle", "loads"), ("shutil", "rmtree"),
    ("functools", "partial"), ("operator", "attrgetter"), ("operator", "methodcaller"),
    ("ctypes", "CDLL"), ("pydoc", "pipepager"), ("pydoc", "locate"), ("timeit", "timeit"),
    ("cProfile", "run"), ("profile", "Profile.run"), ("pdb", "Pdb"), ("bdb", "Bdb.run"),
    ("code", "InteractiveInterpreter.runcode"), ("asyncio", "create_subprocess_shell"),
    ("aiohttp.client", "ClientSession"), ("requests.api", "get"), ("httplib", "HTTPSConnection"),
    ("ssl", "get_server_certificate"), ("venv", "create"), ("ensurepip", "_run_pip"),
    ("pip", "main"), ("distutils.file_util", "write_file"), ("doctest", "debug_script"),
    ("idlelib.pyshell", "ModifiedInterpreter.runcode"), ("lib2to3.pgen2.grammar", "Grammar.loads"),
    ("numpy.f2py", "getlincoef"), ("numpy.testing._private.utils", "runstring"),
    ("torch.serialization", "load"), ("torch._inductor.codecache", "compile_file"),
    ("torch.jit.unsupported_tensor_ops", "execWrapper"), ("torch.utils.collect_env", "run"),
    ("torch.utils._config_module", "ConfigModule.load_config"),
    ("torch.fx.experimental.symbolic_shapes", "ShapeEnv.evaluate_guards_expression"),
    ("trace", "Trace.run"), ("commands", "getoutput"), ("sys", "modules"),
    ("numpy", "load"), ("torch.utils.cpp_extension", "load_inline"), ("pandas", "read_pickle"),
    ("__builtin__", "reduce"), ("cPickle", "loads"), ("types", "FunctionType"),
    # the other targets of picklescan's advisories (its tests/init_data_files.py)
    ("torch.utils.bottleneck.__main__", "run_cprofile"),
    ("torch.utils.bottleneck.__main__", "run_autograd_prof"), ("torch._dynamo.guards", "GuardBuilder.get"),
    ("torch.utils.collect_env", "run_and_read_all"),
    ("torch.utils.data.datapipes.utils.decoder", "basichandlers"), ("trace", "Trace.runctx"),
    ("profile", "Profile.runctx"), ("idlelib.debugobj", "ObjectTreeItem.SetText"),
    ("idlelib.autocomplete", "AutoComplete.get_entity"),
    ("idlelib.autocomplete", "AutoComplete.fetch_completions"), ("idlelib.calltip", "Calltip.fetch_tip"),
    ("idlelib.calltip", "get_entity"), ("lib2to3.pgen2.pgen", "ParserGenerator.make_label"),
    ("idlelib.run", "Executive.runcode"), ("idlelib.pyshell", "ModifiedInterpreter.runcommand"),
    ("cProfile", "runctx"), ("asyncio.unix_events", "_UnixSubprocessTransport._start"),
    ("numpy.f2py.crackfortran", "getlincoef"), ("io", "FileIO"), ("urllib.request", "urlopen"),
    ("subprocess", "run"), ("sys", "exit"), ("builtins", "globals"), ("linecache", "getline"),
]


def global_op(m, n, how, proto):
    """A pickle calling m.n("x"), naming the global one way."""
    call = b"X\x01\x00\x00\x00x\x85R."  # ("x",) REDUCE STOP
    if how == "GLOBAL":
        return bytes([0x80, proto]) + b"c" + m.encode() + b"\n" + n.encode() + b"\n" + call
    if how == "INST":
        return bytes([0x80, proto]) + b"(X\x01\x00\x00\x00xi" + m.encode() + b"\n" + n.encode() + b"\n."
    # STACK_GLOBAL with both strings through the memo
    mb, nb = m.encode(), n.encode()
    return (bytes([0x80, proto]) + b"\x8c" + bytes([len(mb)]) + mb + b"\x94" + b"\x8c" + bytes([len(nb)]) + nb
            + b"\x94" + b"0" + b"0" + b"h\x00h\x01\x93" + call)


def containers(name, data, tmp_path):
    """The same pickle where loaders find it."""
    out = []
    raw = tmp_path / f"{name}.pkl"
    raw.write_bytes(data)
    out.append(raw)
    z = tmp_path / f"{name}.pt"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_STORED) as f:
        f.writestr("archive/data.pkl", data)
        f.writestr("archive/version", "3\n")
    out.append(z)
    leg = tmp_path / f"{name}.legacy.pt"
    magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
    leg.write_bytes(magic + pickle.dumps(1001, protocol=2) + data)
    out.append(leg)
    npz = tmp_path / f"{name}.npz"
    with zipfile.ZipFile(npz, "w") as f:
        f.writestr("x.npy", io.BytesIO(b"").getvalue() or _npy_object(data))
    out.append(npz)
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as f:
        f.writestr("model.pkl", data)
    nested = tmp_path / f"{name}.nested.zip"
    with zipfile.ZipFile(nested, "w") as f:
        f.writestr("inner.zip", inner.getvalue())
    out.append(nested)
    return out


def _npy_object(data):
    """An .npy header for an object array followed by `data` as its pickle."""
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + data


def ours(path):
    p = run("audit", path, "--json", check=False)
    v = json.loads(p.stdout)
    return (v["files"] + v["no_pickle"])[0]["verdict"]


def theirs(path):
    r = picklescan.scan_file_path(str(path))
    return "dangerous" if r.infected_files else ("error" if r.scan_err else "not flagged")


def test_every_file_picklescan_flags_is_dangerous_here(tmp_path):
    table = {}
    for i, (m, n) in enumerate(DANGEROUS):
        for how in ("GLOBAL", "INST", "STACK_GLOBAL"):
            proto = 2 if (m, n) in [("__builtin__", "reduce"), ("cPickle", "loads")] else 4
            data = global_op(m, n, how, proto)
            for path in containers(f"d{i}-{how}", data, tmp_path):
                o, t = ours(path), theirs(path)
                table.setdefault((t, o), 0)
                table[(t, o)] += 1
                if t == "dangerous":
                    assert o == "dangerous", (m, n, how, path.name, o)
                # stronger: everything in this corpus is dangerous to weightcast
                assert o == "dangerous", (m, n, how, path.name, o, t)
    benign = [ROOT / "tests/fixtures/torch" / f for f in
              ["tied.pt", "views.pt", "training.pt", "legacy.pt", "all_dtypes.pt"]]
    ok = tmp_path / "ok.pkl"
    ok.write_bytes(pickle.dumps({"w": [1.0], "s": "x"}, protocol=4))
    arrays = tmp_path / "arrays.npz"
    np.savez(arrays, a=np.ones(3), b=np.arange(4))
    for path in benign + [ok, arrays]:
        o, t = ours(path), theirs(path)
        assert o in ("clean", "other"), (path.name, o)
        table.setdefault((t, o), 0)
        table[(t, o)] += 1
    # printed for the README table (pytest -s)
    print("\npicklescan verdict -> weightcast verdict: files")
    for (t, o), n in sorted(table.items()):
        print(f"{t} -> {o}: {n}")
    total = sum(table.values())
    assert total == len(DANGEROUS) * 3 * 5 + len(benign) + 2
