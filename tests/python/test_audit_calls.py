"""Default-deny for calls: a global a pickle calls (REDUCE, INST, OBJ; a class instantiated
outside the model-definition packages) that no allowlist names fails the audit as an "unknown
call" (exit 1), with the global, how it is used and the byte offset; `--allow`/`--allow-file`
accept a user's own names; `convert` never carries such a call into a `.pt`, and says whether
its output loads with `torch.load(weights_only=True)`, which is checked against torch itself.

No payload is ever run: the callables are stand-ins registered under the real names only while
torch.save pickles them."""

import contextlib
import json
import sys
import types

import pytest

from conftest import run

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


@contextlib.contextmanager
def fake_global(module, name):
    """A stand-in function that pickles as `module.name` (the real one is never imported)."""
    mod = types.ModuleType(module)

    def stand_in(*a):
        raise AssertionError("a stand-in was called")

    stand_in.__module__, stand_in.__qualname__ = module, name
    setattr(mod, name, stand_in)
    parts = module.split(".")
    names = [".".join(parts[:i + 1]) for i in range(len(parts))]
    saved = {n: sys.modules.get(n) for n in names}
    for n in names[:-1]:
        sys.modules.setdefault(n, types.ModuleType(n))
    sys.modules[module] = mod
    try:
        yield stand_in
    finally:
        for n, old in saved.items():
            if old is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = old


class Calls:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def checkpoint_calling(path, module, name):
    with fake_global(module, name) as fn:
        torch.save({"model": {"w": torch.ones(4, 4)}, "config": Calls(fn, "a: 1")}, path)


def audit_json(*args):
    p = run("audit", *args, "--json", check=False)
    return p.returncode, json.loads(p.stdout)


# Callables that run code, touch files or open connections that no blocklist needs to name:
# default-deny fails every one of them when a pickle calls it.
UNLISTED = [
    ("yaml", "unsafe_load"), ("yaml", "load"), ("ruamel.yaml", "load"), ("gzip", "open"),
    ("bz2", "open"), ("lzma", "open"), ("dbm", "open"), ("logging.config", "listen"),
    ("logging.config", "fileConfig"), ("huggingface_hub", "hf_hub_download"),
    ("requests_toolbelt.downloadutils.stream", "stream_response_to_file"),
    ("test.support.script_helper", "assert_python_ok"), ("modelscan.scanner", "Scanner"),
    ("picklescan.scanner", "scan_file_path"), ("_xxsubinterpreters", "run_string"),
    ("torch.fx.graph_module", "reduce_graph_module"), ("torch.package", "PackageImporter"),
]


def test_unlisted_callables_fail_as_unknown_calls(tmp_path):
    for i, (m, n) in enumerate(UNLISTED):
        checkpoint_calling(tmp_path / f"c{i:02d}.pt", m, n)
    code, j = audit_json(tmp_path)
    assert code == 1
    for i, (m, n) in enumerate(UNLISTED):
        f = next(f for f in j["files"] if f["path"].endswith(f"c{i:02d}.pt"))
        assert f["verdict"] in ("unknown call", "dangerous"), (m, n, f["verdict"])
        # protocol 2 writes Python 2 names where there are ones (`anydbm.open -> dbm.open`)
        hit = [x for x in f["findings"] if x["name"].split(" -> ")[-1] == f"{m}.{n}"]
        assert hit and hit[0]["use"] == "called" and hit[0]["class"] in ("unknown call", "dangerous")
        assert isinstance(hit[0]["offset"], int) and hit[0]["opcode"]


def test_convert_never_launders_a_call_into_a_pt(tmp_path):
    src = tmp_path / "ckpt.pt"
    checkpoint_calling(src, "yaml", "unsafe_load")
    out = tmp_path / "out.pt"
    for extra in ([], ["--dry-run"]):
        p = run("convert", src, "-o", out, "--to", "bf16", *extra, check=False)
        assert p.returncode == 1 and "yaml.unsafe_load" in p.stderr, p.stderr
        assert not out.exists()
    # extracting the tensors is how to clean such a file, with a warning that names the call
    p = run("convert", src, "-o", tmp_path / "out.safetensors", "--to", "bf16")
    assert "yaml.unsafe_load" in p.stderr and "no allowlist" in p.stderr, p.stderr
    # accepted by name: carried, and the output says it needs weights_only=False
    p = run("convert", src, "-o", out, "--to", "bf16", "--allow", "yaml.unsafe_load", "--json")
    doc = json.loads(p.stdout)
    assert doc["pickle"] == {"loads_with_weights_only": False,
                             "outside_weights_only": ["yaml.unsafe_load"]}
    code, j = audit_json(out)
    assert code == 1 and j["files"][0]["unknown_calls"] == ["yaml.unsafe_load"]
    code, j = audit_json(out, "--allow", "yaml.unsafe_load")
    assert code == 0 and j["files"][0]["verdict"] == "other"


def test_weights_only_claim_is_what_torch_does(tmp_path):
    """The recipe's whole-model pickle converts (its classes are instantiated, not called) and
    is said to need weights_only=False; a state dict is said to load with weights_only=True.
    torch agrees with both claims."""
    import numpy as np

    m = torchvision.models.resnet18()
    torch.save(m, tmp_path / "whole.pt")
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    # a checkpoint of dicts, tensors and numbers loads with weights_only=True...
    torch.save({"model": m.state_dict(), "optimizer": opt.state_dict(), "epoch": 3},
               tmp_path / "sd.pt")
    # ...one with numpy's RNG state does not (numpy's rebuild globals are clean to audit, but
    # torch asks for them to be allowlisted first)
    torch.save({"model": m.state_dict(), "rng": np.random.get_state()}, tmp_path / "rng.pt")
    code, j = audit_json(tmp_path / "whole.pt")
    assert code == 0 and j["files"][0]["verdict"] == "other"
    assert "torchvision.models.resnet.ResNet" in j["files"][0]["other"]
    uses = {x["name"]: x["use"] for x in j["files"][0]["findings"]}
    assert uses["torchvision.models.resnet.ResNet"] == "instantiated"
    for name in ("whole", "sd", "rng"):
        out = tmp_path / f"{name}-bf16.pt"
        doc = json.loads(run("convert", tmp_path / f"{name}.pt", "-o", out, "--to", "bf16",
                             "--json").stdout)
        claim = doc["pickle"]["loads_with_weights_only"]
        assert claim == (name == "sd"), doc["pickle"]
        try:
            torch.load(out, weights_only=True)
            loaded = True
        except Exception:
            loaded = False
        assert loaded == claim, name
        dry = json.loads(run("convert", tmp_path / f"{name}.pt", "-o", tmp_path / "d.pt", "--to",
                             "bf16", "--dry-run", "--json").stdout)
        assert dry["pickle"] == doc["pickle"], "the plan is the truth"


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)


def test_a_users_own_class_needs_allow(tmp_path):
    src = tmp_path / "net.pt"
    Net.__module__ = "__main__"
    sys.modules["__main__"].Net = Net
    try:
        torch.save(Net(), src)
    finally:
        del sys.modules["__main__"].Net
    code, j = audit_json(src)
    assert code == 1 and j["files"][0]["unknown_calls"] == ["__main__.Net"]
    assert run("audit", src, "--allow", "__main__.Net", check=False).returncode == 0
    allow = tmp_path / "allow.txt"
    allow.write_text("# my classes\n__main__.*  # everything of my script\n")
    assert run("audit", src, "--allow-file", allow, check=False).returncode == 0
    # --strict still fails on anything outside torch's weights-only list
    assert run("audit", src, "--allow", "__main__.Net", "--strict", check=False).returncode == 1
    p = run("audit", src, "--allow-file", tmp_path / "nope.txt", check=False)
    assert p.returncode == 2 and "nope.txt" in p.stderr


def pickle_globals(data):
    import io
    import pickle

    asked = []

    class R(pickle.Unpickler):
        def find_class(self, m, n):
            asked.append((m, n))
            return types.SimpleNamespace()

    R(io.BytesIO(data)).load()  # BUILD sets the stand-in's attribute: the real module's would be
    return asked


def test_build_into_a_module_is_dangerous(tmp_path):
    # GLOBAL torch._utils (a module object), then BUILD {'_rebuild_tensor': 'x'} into it
    def text(t):
        return b"X" + len(t).to_bytes(4, "little") + t
    data = b"\x80\x02ctorch\n_utils\n}" + text(b"_rebuild_tensor") + text(b"x") + b"sb."
    assert pickle_globals(data) == [("torch", "_utils")]
    path = tmp_path / "build.pkl"
    path.write_bytes(data)
    code, j = audit_json(path)
    f = j["files"][0]
    assert code == 1 and f["verdict"] == "dangerous"
    assert any("rewrites imported code" in d for d in f["dangerous"]), f


def test_dangerous_stays_dangerous_when_allowed(tmp_path):
    checkpoint_calling(tmp_path / "c.pt", "posix", "system")
    code, j = audit_json(tmp_path / "c.pt", "--allow", "posix.system")
    assert code == 1 and j["files"][0]["verdict"] == "dangerous"
