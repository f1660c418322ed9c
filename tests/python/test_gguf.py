"""Reading llama.cpp's GGUF: `inspect` lists every metadata key and tensor as the `gguf`
package's reader reads them; plain tensors convert with the values the reader gives and
block-quantized ones (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K to Q6_K, MXFP4) with the values
`gguf.quants.dequantize` gives, bit for bit; other ggml types are named and refused; audit says
a GGUF holds no pickle; a broken header is a one-line error."""

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import ROOT, run

ROOT_TINY = ROOT / "examples" / "tiny-bert"

gguf = pytest.importorskip("gguf")


def write_gguf(path, quantized=True):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(128)
    w.add_uint8("test.u8", 7)
    w.add_int16("test.i16", -3)
    w.add_float32("test.f32", 0.5)
    w.add_float64("test.f64", -2.25)
    w.add_bool("test.bool", True)
    w.add_int64("test.i64", -(1 << 40))
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(20)])
    w.add_array("tokenizer.ggml.scores", [float(i) / 4 for i in range(20)])
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((20, 32)).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((32, 32)).astype(np.float16))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(32, dtype=np.float32))
    w.add_tensor("positions", np.arange(12, dtype=np.int32).reshape(3, 4))
    if quantized:
        q = rng.standard_normal((16, 64)).astype(np.float32)
        data = gguf.quants.quantize(q, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor("blk.0.ffn_down.weight", data, raw_shape=data.shape,
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_inspect_lists_what_the_gguf_reader_reads(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    doc = json.loads(run("inspect", path, "--json").stdout)
    g = doc["gguf"]
    r = gguf.GGUFReader(str(path))
    assert g["version"] == 3 and g["architecture"] == "llama"
    assert g["data_offset"] == r.data_offset and g["alignment"] == r.alignment
    keys = [k for k in r.fields if not k.startswith("GGUF.")]
    assert list(g["metadata"]) == keys
    for k in keys:
        f = r.fields[k]
        want = f.contents()
        got = g["metadata"][k]["value"]
        if isinstance(got, dict):  # a long array, summarised
            assert got["len"] == len(want) and got["first"] == want[:len(got["first"])], k
        elif isinstance(want, float):
            assert got == pytest.approx(want), k
        else:
            assert got == want, k
    assert g["metadata"]["tokenizer.ggml.tokens"]["type"] == "array[string; 20]"
    by_name = {t["name"]: t for t in g["tensors"]}
    assert list(by_name) == [t.name for t in r.tensors]
    for t in r.tensors:
        mine = by_name[t.name]
        assert mine["ggml_type"] == t.tensor_type.name
        assert mine["gguf_dims"] == [int(d) for d in t.shape]
        assert mine["bytes"] == t.n_bytes and mine["offset"] == t.data_offset
    assert g["block_quantized"] == [{"ggml_type": "Q8_0", "tensors": 1}]
    # the catalogue's tensors: torch's shape; a block-quantized one reads as f32
    plain = {t["name"]: t for t in doc["tensors"]}
    assert plain["token_embd.weight"]["shape"] == [20, 32]
    assert plain["positions"]["dtype"] == "I32" and plain["positions"]["shape"] == [3, 4]
    q = plain["blk.0.ffn_down.weight"]
    assert (q["dtype"], q["ggml_type"], q["shape"]) == ("F32", "Q8_0", [16, 64])
    text = run("inspect", path).stdout
    assert "GGUF v3" in text and "Q8_0" in text and "tokenizer.ggml.tokens" in text


def test_plain_tensors_convert_with_the_readers_values(tmp_path):
    path = tmp_path / "plain.gguf"
    write_gguf(path, quantized=False)
    out = tmp_path / "out.safetensors"
    run("convert", path, "-o", out, "--to", "f32")
    got = load_file(out)
    r = gguf.GGUFReader(str(path))
    for t in r.tensors:
        want = np.asarray(t.data)
        if want.dtype.kind == "f":
            want = want.astype(np.float32)
        np.testing.assert_array_equal(got[t.name], want, err_msg=t.name)
    assert got["token_embd.weight"].shape == (20, 32)


DEQUANTIZED = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]

# the f16 fields of each block type (byte offsets): set to finite values in the random blocks
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
              "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_blocks(rng, qtype, rows, cols):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for at in F16_FIELDS[qtype.name]:
        raw[:, at:at + 2] = rng.uniform(-2, 2, size=(raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, cols // block * size)


def test_block_quantized_tensors_dequantize_as_gguf_does(tmp_path):
    path = tmp_path / "q.gguf"
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(str(path), "llama")
    for name in DEQUANTIZED:
        qtype = gguf.GGMLQuantizationType[name]
        raw = random_blocks(rng, qtype, 6, 512)
        w.add_tensor(f"t.{name}", raw, raw_shape=raw.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    doc = json.loads(run("inspect", path, "--json").stdout)
    assert {t["name"]: t.get("ggml_type") for t in doc["tensors"]} == {
        f"t.{n}": n for n in DEQUANTIZED}
    out = tmp_path / "out.safetensors"
    plan = json.loads(run("convert", path, "-o", out, "--to", "f32", "--dry-run", "--json").stdout)
    r = gguf.GGUFReader(str(path))
    assert {t["name"]: (t["from"], t["dequantize"]["ggml_type"], t["dequantize"]["stored_bytes"])
            for t in plan["tensors"]} == {t.name: ("F32", t.tensor_type.name, t.n_bytes)
                                          for t in r.tensors}
    run("convert", path, "-o", out, "--to", "f32")
    got = load_file(out)
    for t in r.tensors:
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        assert got[t.name].shape == want.shape == (6, 512), t.name
        np.testing.assert_array_equal(got[t.name].view(np.uint32), want.view(np.uint32),
                                      err_msg=t.name)
    # analyze and diff read the same values
    a = json.loads(run("analyze", path, "--to", "bf16", "--json").stdout)
    assert len(a["tensors"]) == len(DEQUANTIZED)
    d = json.loads(run("diff", path, out, "--json", check=False).stdout)
    assert len(d["common"]) == len(DEQUANTIZED) and not d["only_a"] and not d["only_b"]
    assert all(c["max_abs_err"] == 0.0 for c in d["common"]), d["common"][:1]


def test_mxfp4_dequantizes_as_gguf_does(tmp_path):
    # MXFP4 blocks: one E8M0 exponent byte, 16 bytes of e2m1 nibbles (low nibbles first)
    path = tmp_path / "mxfp4.gguf"
    rng = np.random.default_rng(5)
    qtype = gguf.GGMLQuantizationType.MXFP4
    w = gguf.GGUFWriter(str(path), "llama")
    # quantized by gguf-py from floats of many magnitudes
    x = rng.standard_normal((6, 512)).astype(np.float32)
    x *= np.exp2(np.arange(-12, 12, 4, dtype=np.float32)).reshape(6, 1)
    q = gguf.quants.quantize(x, qtype)
    w.add_tensor("quantized", q, raw_shape=q.shape, raw_dtype=qtype)
    # raw blocks: exponent bytes in a realistic range, and the edges (subnormal scales for
    # 0 and 1, 255 is 2^127 rather than NaN, large nibbles overflow to inf at 254 and 255)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(4 * 256 // block, size), dtype=np.uint8)
    raw[:, 0] = rng.integers(100, 141, size=raw.shape[0])
    edges = [0, 1, 2, 126, 127, 128, 253, 254, 255]
    raw[:len(edges), 0] = edges
    raw = raw.reshape(4, 256 // block * size)
    w.add_tensor("raw", raw, raw_shape=raw.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    doc = json.loads(run("inspect", path, "--json").stdout)
    assert {t["name"]: (t["dtype"], t.get("ggml_type"), t["shape"]) for t in doc["tensors"]} == {
        "quantized": ("F32", "MXFP4", [6, 512]), "raw": ("F32", "MXFP4", [4, 256])}
    out = tmp_path / "out.safetensors"
    run("convert", path, "-o", out, "--to", "f32")
    got = load_file(out)
    r = gguf.GGUFReader(str(path))
    assert [t.tensor_type for t in r.tensors] == [qtype, qtype]
    for t in r.tensors:
        with np.errstate(over="ignore"):
            want = gguf.quants.dequantize(t.data, t.tensor_type)
        assert got[t.name].shape == want.shape, t.name
        np.testing.assert_array_equal(got[t.name].view(np.uint32), want.view(np.uint32),
                                      err_msg=t.name)
    # the edges are there: subnormals, +0 only, infinities, no NaN
    edge = got["raw"].reshape(-1, block)[:len(edges)]
    sub = np.abs(edge[0])
    assert sub.max() <= 12 * 2.0**-128 and ((sub > 0) & (sub < np.finfo(np.float32).tiny)).any()
    assert np.isinf(edge[-1]).any() and not np.isnan(got["raw"]).any()
    assert not np.signbit(got["raw"][got["raw"] == 0]).any()
    np.testing.assert_array_equal(got["quantized"], gguf.quants.dequantize(q, qtype))


def test_other_ggml_types_are_refused_by_name(tmp_path):
    path = tmp_path / "iq.gguf"
    rng = np.random.default_rng(2)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("ok", np.ones((2, 32), dtype=np.float32))
    raw = rng.integers(0, 256, size=(4, 18 * 8), dtype=np.uint8)
    w.add_tensor("blk.0.ffn_down.weight", raw, raw_shape=raw.shape,
                 raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for cmd in (["convert", path, "-o", tmp_path / "o.safetensors", "--to", "f16"],
                ["analyze", path, "--to", "f16"]):
        p = run(*cmd, check=False)
        assert p.returncode == 2, p.stderr
        assert "blk.0.ffn_down.weight" in p.stderr and "IQ4_NL" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.safetensors").exists()
    assert "IQ4_NL" in run("inspect", path).stdout


def test_audit_says_a_gguf_holds_no_pickle(tmp_path):
    path = tmp_path / "q.gguf"
    write_gguf(path)
    j = json.loads(run("audit", path, "--json").stdout)
    assert j["files"] == [] and j["no_pickle"][0]["format"] == "a GGUF file"


def test_broken_headers_are_one_line_errors(tmp_path):
    path = tmp_path / "q.gguf"
    write_gguf(path)
    data = path.read_bytes()
    cases = {
        "truncated": data[:200],
        "huge_array": data.replace(struct.pack("<Q", 20), struct.pack("<Q", 1 << 60), 1),
        "version": data[:4] + struct.pack("<I", 9) + data[8:],
        "tensors_past_end": data[:-100],
    }
    for name, bad in cases.items():
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(bad)
        r = run("inspect", p, check=False)
        assert r.returncode != 0 and "panicked" not in r.stderr, (name, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and str(p) in r.stderr, (name, r.stderr)


def write_model(path, rng):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_file_type(0)
    w.add_quantization_version(2)
    w.add_context_length(64)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", f32(20, 32))
    w.add_tensor("blk.10.attn_k.weight", f32(32, 32))
    w.add_tensor("blk.0.attn_q.weight", f32(32, 32))
    w.add_tensor("blk.0.attn_norm.weight", f32(32))
    qk = random_blocks(rng, gguf.GGMLQuantizationType.Q4_K, 4, 256)
    w.add_tensor("blk.1.ffn_down.weight", qk, raw_shape=qk.shape,
                 raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    q = gguf.quants.quantize(f32(4, 64), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.ffn_gate_inp.weight", q, raw_shape=q.shape,
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("output.weight", f32(20, 32).astype(np.float16))
    w.add_tensor("blk.2.attn_v.weight", f32(8, 48))  # rows of 48: no whole Q8_0 blocks
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_order(name):
    import re
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


@pytest.mark.parametrize("to", ["f16", "bf16", "f32", "q8_0"])
def test_gguf_to_gguf_retypes_as_llama_cpp_decides(tmp_path, to):
    src = tmp_path / "in.gguf"
    write_model(src, np.random.default_rng(3))
    out = tmp_path / f"out-{to}.gguf"
    plan = json.loads(run("convert", src, "-o", out, "--to", to, "--dry-run", "--json").stdout)
    run("convert", src, "-o", out, "--to", to)
    r_in, r = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out))
    # metadata: the input's in order, quantization_version and file_type removed and appended
    want_kv = [(k, f.contents()) for k, f in r_in.fields.items()
               if not k.startswith("GGUF.") and k not in ("general.quantization_version",
                                                          "general.file_type")]
    want_kv += [("general.quantization_version", 2),
                ("general.file_type", {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[to])]
    assert [(k, f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")] == want_kv
    assert r.fields["general.file_type"].types == [gguf.GGUFValueType.UINT32]
    # tensors in llama.cpp's order; 1-D, norms and the expert gate as they were
    names = [t.name for t in r.tensors]
    assert names == sorted(names, key=llama_order)
    assert names.index("blk.1.ffn_down.weight") < names.index("blk.10.attn_k.weight")
    inp = {t.name: t for t in r_in.tensors}
    planned = {t["name"]: t["to"] for t in plan["tensors"]}
    # the plan is the truth: the ggml type and bytes it shows are the ones written
    assert {t["name"]: t["bytes_after"] for t in plan["tensors"]} == {
        t.name: int(t.n_bytes) for t in r.tensors}
    assert {t["name"]: t["ggml_type"] for t in plan["tensors"]} == {
        t.name: t.tensor_type.name for t in r.tensors}
    for t in r.tensors:
        src_t = inp[t.name]
        kept = t.name in ("blk.0.attn_norm.weight", "blk.0.ffn_gate_inp.weight")
        if kept:
            assert t.tensor_type == src_t.tensor_type, t.name
            assert bytes(t.data.tobytes()) == bytes(src_t.data.tobytes()), t.name
            continue
        x = gguf.quants.dequantize(src_t.data, src_t.tensor_type)
        kind = to
        if to == "q8_0" and x.shape[-1] % 32:
            kind = "f16"  # llama.cpp's fallback for rows of no whole block
        assert t.tensor_type.name == {"f32": "F32", "f16": "F16", "bf16": "BF16",
                                      "q8_0": "Q8_0"}[kind], t.name
        want = {"f32": lambda v: v.astype(np.float32),
                "f16": lambda v: v.astype(np.float16),
                "bf16": lambda v: gguf.quants.quantize(v, gguf.GGMLQuantizationType.BF16),
                "q8_0": lambda v: gguf.quants.quantize(v, gguf.GGMLQuantizationType.Q8_0),
                }[kind](x.astype(np.float32))
        assert t.data.tobytes() == np.ascontiguousarray(want).tobytes(), t.name
        assert t.data_offset % 32 == 0


def test_gguf_output_refusals(tmp_path):
    src = tmp_path / "in.gguf"
    write_model(src, np.random.default_rng(4))
    for extra, what in [(["--max-shard-size", "1MB"], "max-shard-size"),
                        (["--part", "1/2"], "part")]:
        p = run("convert", src, "-o", tmp_path / "o.gguf", "--to", "f16", *extra, check=False)
        assert p.returncode == 2 and what in p.stderr, p.stderr
    p = run("convert", src, "-o", tmp_path / "o.gguf", "--to", "f8e4m3", check=False)
    assert p.returncode == 2 and "f32, f16 or bf16" in p.stderr
    p = run("convert", ROOT_TINY, "-o", tmp_path / "o.gguf", "--to", "f16", check=False)
    assert p.returncode == 2 and "pre-tokenizer" in p.stderr
    assert not (tmp_path / "o.gguf").exists()
