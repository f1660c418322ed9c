"""ONNX models through the Python API: `load` gives every weight as onnx's own reader gives it
(tests/python/test_onnx_read.py checks the command line), `convert` writes what the command
line writes, and a hostile model raises one of weightcast's errors."""

import numpy as np
import pytest
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh
from safetensors.numpy import load_file

import weightcast
from conftest import run


def model(path, external=False):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    inits = [nh.from_array(w, "w"),
             h.make_tensor("h", T.FLOAT16, [3], [1.5, -65504, 6e-8]),
             h.make_tensor("shape", T.INT64, [2], [-1, 4])]
    const = h.make_node("Constant", [], ["c"], value=nh.from_array(
        np.linspace(-1, 1, 4, dtype=np.float32), "v"))
    mm = h.make_node("MatMul", ["x", "w"], ["y"])
    g = h.make_graph([const, mm], "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 6])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 4])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    if external:
        onnx.save_model(m, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location="weights.bin", size_threshold=0)
    else:
        onnx.save_model(m, path)
    return {"w": w, "h": nh.to_array(inits[1]), "shape": nh.to_array(inits[2]),
            "c": np.linspace(-1, 1, 4, dtype=np.float32)}


@pytest.mark.parametrize("external", [False, True])
def test_load_and_convert_onnx(tmp_path, external):
    want = model(tmp_path / "m.onnx", external)
    got = weightcast.load(tmp_path / "m.onnx", framework="np")
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and np.array_equal(got[k].view(np.uint8),
                                                          v.view(np.uint8)), k
    weightcast.convert(tmp_path / "m.onnx", tmp_path / "api.safetensors", to="f16")
    run("convert", tmp_path / "m.onnx", "-o", tmp_path / "cli.safetensors", "--to", "f16")
    a, b = load_file(tmp_path / "api.safetensors"), load_file(tmp_path / "cli.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)), k
    assert np.array_equal(a["w"], want["w"].astype(np.float16))


def test_hostile_onnx_raises(tmp_path):
    model(tmp_path / "m.onnx", external=True)
    m = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    for e in m.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = "../outside.bin"
    onnx.save_model(m, tmp_path / "bad.onnx")
    with pytest.raises(weightcast.InvalidFileError, match="leaves the model's folder"):
        weightcast.load(tmp_path / "bad.onnx")
