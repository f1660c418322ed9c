"""ONNX models as inputs: every weight (initializers stored as raw_data, float_data and
int32_data/int64_data, Constant values, tensors in an If node's branches, external data) listed
by `inspect --json` with onnx's own dtype and shape, and converted to safetensors as
numpy_helper.to_array reads them, cast as numpy casts; hostile models refused on one line."""

import json
import os

import numpy as np
import pytest

from conftest import run

import onnx  # noqa: E402
from onnx import TensorProto as T  # noqa: E402
from onnx import helper as h  # noqa: E402
from onnx import numpy_helper as nh  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

RNG = np.random.default_rng(7)

# our dtype names for onnx's numpy dtypes
DTYPES = {
    np.float32: "F32", np.float16: "F16", np.float64: "F64", np.int64: "I64",
    np.int32: "I32", np.int8: "I8", np.uint8: "U8", np.bool_: "BOOL", np.int16: "I16",
    np.uint64: "U64",
}


def _branch(name, value):
    """An If branch whose output is an initializer."""
    init = nh.from_array(value, "k")
    return h.make_graph([h.make_node("Identity", ["k"], [name])], name, [],
                        [h.make_tensor_value_info(name, T.FLOAT, list(value.shape))], [init])


def mixed_model():
    """A model with every way our reader meets a weight."""
    w = RNG.standard_normal((8, 5)).astype(np.float32) * 100
    inits = [
        nh.from_array(w, "raw.w"),  # raw_data
        h.make_tensor("fd.b", T.FLOAT, [5], RNG.standard_normal(5).astype(np.float32)),
        h.make_tensor("fd.d", T.DOUBLE, [2, 2], [1e-3, 2.5, -7.0, 1e4 + 1 / 3]),
        h.make_tensor("i32.h", T.FLOAT16, [3], [1.5, -65504, 6e-8]),  # bits in int32_data
        h.make_tensor("i32.i8", T.INT8, [4], [-128, -1, 0, 127]),
        h.make_tensor("i32.bool", T.BOOL, [2], [True, False]),
        h.make_tensor("i64.shape", T.INT64, [2], [-1, 5]),
        h.make_tensor("i64.fill", T.INT64, [2], [1, 5]),
        h.make_tensor("i64.big", T.INT64, [2], [2**40 + 3, -(2**62)]),
        h.make_tensor("u64.big", T.UINT64, [2], [2**64 - 1, 9]),
        nh.from_array(np.arange(6, dtype=np.int32), "raw.i32"),
    ]
    const = h.make_node("Constant", [], ["const.out"],
                        value=nh.from_array(np.linspace(-2, 2, 6, dtype=np.float32)
                                            .reshape(2, 3), "ignored"))
    cond = h.make_node("If", ["c"], ["branch"], name="cond",
                       then_branch=_branch("t", np.full((2,), 3.25, np.float32)),
                       else_branch=_branch("e", np.full((2,), -1.0 / 3, np.float32)))
    fill = h.make_node("ConstantOfShape", ["i64.fill"], ["filled"], name="fill",
                       value=h.make_tensor("v", T.FLOAT, [1], [0.1]))
    # a model-local function whose body holds a Constant
    body = [h.make_node("Constant", [], ["fk"], value=nh.from_array(
                np.array([2.0, 3.0], np.float32), "fk")),
            h.make_node("Mul", ["a", "fk"], ["b"])]
    fn = h.make_function("local", "Scale", ["a"], ["b"], body, [h.make_opsetid("", 21)])
    nodes = [
        h.make_node("MatMul", ["x", "raw.w"], ["y"], name="mm"),
        h.make_node("Add", ["y", "fd.b"], ["z"], name="add"),
        h.make_node("Reshape", ["z", "i64.shape"], ["r"], name="reshape"),
        const, cond, fill,
        h.make_node("Scale", ["branch"], ["scaled"], domain="local"),
    ]
    g = h.make_graph(nodes, "mixed",
                     [h.make_tensor_value_info("x", T.FLOAT, [1, 8]),
                      h.make_tensor_value_info("c", T.BOOL, [])],
                     [h.make_tensor_value_info("r", T.FLOAT, [1, 5]),
                      h.make_tensor_value_info("scaled", T.FLOAT, [2]),
                      h.make_tensor_value_info("filled", T.FLOAT, [1, 5])], inits)
    return h.make_model(g, producer_name="weightcast-tests", functions=[fn],
                        opset_imports=[h.make_opsetid("", 21), h.make_opsetid("local", 1)])


def expected(model):
    """{our name: onnx's array} of every weight, read by onnx itself."""
    g = model.graph
    out = {t.name: nh.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            out[n.output[0]] = nh.to_array(n.attribute[0].t)
        if n.op_type == "If":
            # the first branch (attributes in file order) keeps the name, the other is
            # named by its subgraph's path
            first, other = n.attribute
            out["k"] = nh.to_array(first.g.initializer[0])
            out[f"cond.{other.name}/k"] = nh.to_array(other.g.initializer[0])
        if n.op_type == "ConstantOfShape":
            # another node's tensor attribute: named NODE.ATTRIBUTE
            out["fill.value"] = nh.to_array(n.attribute[0].t)
    for f in model.functions:
        out["fk"] = nh.to_array(f.node[0].attribute[0].t)
    return out


def as_f16(a):
    """What --to f16 makes of an array: floats rounded (f64 through f32, as torch does), the
    rest unchanged."""
    if a.dtype == np.float64:
        return a.astype(np.float32).astype(np.float16)
    if a.dtype.kind == "f":
        return a.astype(np.float16)
    return a


def check_reads(path, want):
    doc = json.loads(run("inspect", path, "--json").stdout)
    assert doc["format"] == "ONNX model"
    got = {t["name"]: t for t in doc["tensors"]}
    assert set(got) == set(want)
    for name, a in want.items():
        assert got[name]["dtype"] == DTYPES[a.dtype.type], name
        assert got[name]["shape"] == list(a.shape), name
        assert got[name]["bytes"] == a.nbytes, name
    out = path.parent / (path.stem + "-f16.safetensors")
    run("convert", path, "-o", out, "--to", "f16")
    back = load_file(str(out))
    assert set(back) == set(want)
    for name, a in want.items():
        e = as_f16(a)
        assert back[name].dtype == e.dtype, name
        assert back[name].shape == e.shape, name
        assert back[name].tobytes() == e.tobytes(), name
    # the values as stored, unchanged
    same = path.parent / (path.stem + "-same.safetensors")
    run("convert", path, "-o", same, "--to", "f32", "--keep", "*")
    for name, a in load_file(str(same)).items():
        assert a.tobytes() == want[name].tobytes(), name


def test_every_kind_of_weight(tmp_path):
    m = mixed_model()
    onnx.checker.check_model(m)
    # the storage each initializer is meant to test
    g = {t.name: t for t in m.graph.initializer}
    assert g["raw.w"].raw_data and not g["fd.b"].raw_data and len(g["fd.b"].float_data) == 5
    assert len(g["i32.h"].int32_data) == 3 and len(g["i64.shape"].int64_data) == 2
    assert len(g["fd.d"].double_data) == 4
    path = tmp_path / "mixed.onnx"
    onnx.save_model(m, path)
    check_reads(path, expected(m))


def test_external_data(tmp_path):
    m = mixed_model()
    path = tmp_path / "ext.onnx"
    onnx.save_model(m, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    stub = onnx.load(path, load_external_data=False)
    # onnx moves raw_data out (the typed fields stay in the model: both kinds in one input)
    assert stub.graph.initializer[0].data_location == T.EXTERNAL
    assert stub.graph.initializer[1].data_location != T.EXTERNAL
    loaded = onnx.load(path)
    doc = json.loads(run("inspect", path, "--json").stdout)
    assert "ext.onnx.data" in [f["name"] for f in doc["files"]]
    check_reads(path, expected(loaded))


def test_onnxruntime_agrees(tmp_path):
    """The model we read runs in onnxruntime as built (a sanity check on the fixtures)."""
    import onnxruntime as ort
    m = mixed_model()
    path = tmp_path / "m.onnx"
    onnx.save_model(m, path)
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.ones((1, 8), np.float32)
    r, scaled, filled = s.run(None, {"x": x, "c": np.array(True)})
    w = expected(m)
    np.testing.assert_allclose(r, x @ w["raw.w"] + w["fd.b"], rtol=1e-5)
    assert scaled.tolist() == [6.5, 3.25 * 3] and filled.shape == (1, 5)


def external_model(tmp_path, **entries):
    """A model with one external weight, its external_data entries overridden."""
    m = h.make_model(h.make_graph([], "g", [], [], [nh.from_array(
        np.arange(16, dtype=np.float32), "w")]))
    path = tmp_path / "m.onnx"
    onnx.save_model(m, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.bin", size_threshold=0)
    m = onnx.load(path, load_external_data=False)
    t = m.graph.initializer[0]
    kv = {e.key: e.value for e in t.external_data}
    kv.update(entries)
    del t.external_data[:]
    for k, v in kv.items():
        t.external_data.add(key=k, value=v)
    path.write_bytes(m.SerializeToString())
    return path


def refused(path, what):
    """Every reading command refuses `path` on one line naming `what`, writing nothing."""
    for args in (["inspect", path],
                 ["convert", path, "-o", path.parent / "out.safetensors", "--to", "f16"]):
        p = run(*args, check=False)
        assert p.returncode != 0, args
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and what in lines[0], p.stderr
        assert "Traceback" not in p.stderr and "panicked" not in p.stderr
        assert not (path.parent / "out.safetensors").exists()


def test_external_data_cannot_leave_the_folder(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\0" * 64)
    inner = tmp_path / "model"
    inner.mkdir()
    refused(external_model(inner, location="../x.bin"), "leaves the model's folder")
    refused(external_model(inner, location=str(tmp_path / "x.bin")), "is absolute")
    os.symlink(tmp_path / "x.bin", inner / "link.bin")
    refused(external_model(inner, location="link.bin"), "through a symlink")


def test_external_data_past_the_end(tmp_path):
    refused(external_model(tmp_path, offset="40"), "runs past the end")
    refused(external_model(tmp_path, length="60"), "external data length 60")
    refused(external_model(tmp_path, location="missing.bin"), "cannot be opened")


def test_malformed_models(tmp_path):
    t = nh.from_array(np.arange(8, dtype=np.float32).reshape(2, 4), "w")
    t.raw_data = t.raw_data[:-4]
    m = h.make_model(h.make_graph([], "g", [], [], [t]))
    short = tmp_path / "short.onnx"
    short.write_bytes(m.SerializeToString())
    refused(short, "raw_data holds 28 bytes where dims [2, 4] of FLOAT need 32 bytes")

    good = mixed_model().SerializeToString()
    for cut in (len(good) - 1, len(good) // 2, 7):
        trunc = tmp_path / f"trunc{cut}.onnx"
        trunc.write_bytes(good[:cut])
        refused(trunc, "byte offset")


def test_output_onnx_is_refused(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(mixed_model(), path)
    p = run("convert", path, "-o", tmp_path / "y.onnx", "--to", "f16", check=False)
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert ".onnx" in p.stderr
    assert not (tmp_path / "y.onnx").exists()


def test_real_model_magika(tmp_path):
    """Google's Magika file-type model (an ONNX file its wheel ships, exported by jax2tf):
    every initializer read and converted as onnx reads it."""
    import magika
    import pathlib

    path = next(pathlib.Path(magika.__file__).parent.glob("models/standard_v3_3/model.onnx"))
    m = onnx.load(path)
    want = {t.name: nh.to_array(t) for t in m.graph.initializer}
    assert len(want) > 30 and not any(n.op_type == "Constant" for n in m.graph.node)
    local = tmp_path / "model.onnx"
    local.write_bytes(path.read_bytes())
    check_reads(local, want)


def test_rules_select_onnx_weights_by_the_ops_using_them(tmp_path):
    """`op:NAME` keeps the weights an operator type uses; `kind:norm` and `kind:conv` come from
    the graph (a normalisation op, a Conv), not from the names."""
    rng = np.random.default_rng(1)
    inits = [nh.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "a"),
             nh.from_array(rng.standard_normal(4).astype(np.float32), "b"),
             nh.from_array(rng.standard_normal(4).astype(np.float32), "c"),
             nh.from_array(rng.standard_normal(4).astype(np.float32), "d"),
             nh.from_array(rng.standard_normal((4, 4)).astype(np.float32), "norm_looking.w")]
    nodes = [h.make_node("Conv", ["x", "a", "b"], ["y"]),
             h.make_node("Transpose", ["y"], ["t"], perm=[0, 2, 3, 1]),
             h.make_node("LayerNormalization", ["t", "c", "d"], ["n"], axis=-1),
             h.make_node("MatMul", ["n", "norm_looking.w"], ["z"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                     [h.make_tensor_value_info("z", T.FLOAT, [1, 6, 6, 4])], inits)
    path = tmp_path / "m.onnx"
    onnx.save_model(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), path)

    def kept(*rule):
        plan = json.loads(run("convert", path, "-o", tmp_path / "o.safetensors", "--to", "f16",
                              *rule, "--dry-run", "--json").stdout)
        return sorted(t["name"] for t in plan["tensors"] if not t["cast"])

    assert kept("--keep", "op:Conv") == ["a", "b"]
    assert kept("--keep", "op:LayerNormalization") == ["c", "d"]
    assert kept("--keep", "kind:norm") == ["c", "d"]
    assert kept("--keep", "kind:conv") == ["a", "b"]
    assert kept("--keep", "op:MatMul", "--keep", "op:Conv") == ["a", "b", "norm_looking.w"]
    r = run("convert", path, "-o", tmp_path / "o.safetensors", "--to", "f16", "--keep", "op:",
            check=False)
    assert r.returncode == 2 and "op:Conv" in r.stderr
